"""Persisted rule results (`@rule(persist=True)`): cache keys and the scheduler's PersistHook.

(Being written: see issue 11.)
"""

from __future__ import annotations

from typing import Any


def attach_persistence(compiled: Any, graph: Any, config: Any) -> None:
    """Give every compiled node of a `@rule(persist=True)` rule its PersistHook."""
    return None
