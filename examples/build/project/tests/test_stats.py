import pytest
from calc import stats


def test_mean() -> None:
    assert stats.mean([1, 2, 3, 4]) == 2.5


def test_mean_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        stats.mean([])


def test_variance() -> None:
    assert stats.variance([2, 4, 4, 4, 5, 5, 7, 9]) == 4
