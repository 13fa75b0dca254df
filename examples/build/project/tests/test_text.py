from calc.text import percent, with_thousands


def test_with_thousands() -> None:
    assert with_thousands(1234567) == "1,234,567"


def test_percent() -> None:
    assert percent(1, 3) == "33.3%"
