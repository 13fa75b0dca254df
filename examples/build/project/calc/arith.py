"""Arithmetic on sequences of numbers."""

from __future__ import annotations

from collections.abc import Sequence


def total(values: Sequence[float]) -> float:
    """The sum of `values` (0 for none)."""
    result = 0.0
    for value in values:
        result += value
    return result


def product(values: Sequence[float]) -> float:
    """The product of `values` (1 for none)."""
    result = 1.0
    for value in values:
        result *= value
    return result
