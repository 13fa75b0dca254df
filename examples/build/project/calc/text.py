"""Formatting numbers for people."""

from __future__ import annotations


def with_thousands(value: int) -> str:
    """`1234567` -> `1,234,567`."""
    return f"{value:,}"


def percent(part: float, whole: float) -> str:
    """`percent(1, 3)` -> `33.3%`."""
    return f"{100 * part / whole:.1f}%"
