from calc.arith import product, total


def test_total() -> None:
    assert total([1, 2, 3.5]) == 6.5
    assert total([]) == 0


def test_product() -> None:
    assert product([2, 3, 4]) == 24
    assert product([]) == 1
