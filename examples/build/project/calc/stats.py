"""Descriptive statistics, built on `calc.arith`."""

from __future__ import annotations

from collections.abc import Sequence

from calc.arith import total


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; raises ValueError for no values."""
    if not values:
        raise ValueError("mean of no values")
    return total(values) / len(values)


def variance(values: Sequence[float]) -> float:
    """The population variance."""
    centre = mean(values)
    return total([(v - centre) ** 2 for v in values]) / len(values)
