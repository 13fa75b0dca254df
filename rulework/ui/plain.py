"""Plain progress: one log line per finished node worth reporting, for logs, pipes and CI."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TextIO

from ..engine.scheduler import Workunit
from .nodes import PROCESS_RULES, node_kind, node_label, process_info
from .summary import format_seconds

_SOURCES = {"local_cache": "local cache", "remote_cache": "remote cache"}


class PlainProgress:
    """A subscriber writing a line for each finished cacheable node (Processes and persisted
    rules: whether each ran or came from a cache) and for each failure; with `verbose`, for
    every finished node. Lines look like::

        [   0.41s] ran     process  resize cat.jpg to 64px (0.39s)
        [   0.42s] cached  rule     inspect_image(Upload=...) (local cache)
        [   0.43s] FAILED  rule     make_thumbnail(...)

    A failure is reported where it happened, not again by every rule it propagates through.

    Args:
        stream: where lines go (the CLI uses stderr so that stdout holds the goal's output).
        cacheable: names of the rules whose nodes a cache can serve (see
            `rulework.ui.cacheable_rule_names`).
        verbose: report every finished node, intrinsics included.
        clock: the time source for the elapsed-time prefix (tests pass a fake one).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        cacheable: Collection[str] = PROCESS_RULES,
        verbose: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._stream = stream
        self._cacheable = frozenset(cacheable)
        self._verbose = verbose
        self._clock = clock
        self._started = clock()
        # Nodes (by id) whose failure was reported or that have a failed child: their
        # parents' failures are the same error propagating.
        self._failed_below: set[int] = set()
        # Invariant: the parent of every started node that has not ended (if it has one).
        self._parents: dict[int, int] = {}

    def __call__(self, unit: Workunit) -> None:
        if unit.kind == "start":
            if unit.parent_id is not None:
                self._parents[unit.node_id] = unit.parent_id
            return
        if unit.kind != "end":
            return
        # End events do not carry the parent: it was recorded when the node started.
        parent_id = self._parents.pop(unit.node_id, unit.parent_id)
        outcome = unit.outcome
        if outcome == "failure":
            propagated = unit.node_id in self._failed_below
            if parent_id is not None:
                self._failed_below.add(parent_id)
            if propagated and not self._verbose:
                return
            self._line("FAILED", unit)
            return
        if outcome == "cancelled":
            if self._verbose:
                self._line("cancel", unit)
            return
        if unit.cache is not None:
            self._line("cached", unit, f"({_SOURCES.get(unit.cache, unit.cache)})")
        elif unit.name in self._cacheable or self._verbose:
            verb = "ran" if outcome == "success" else outcome or "done"
            duration = unit.duration_seconds
            info = process_info(unit)
            if info is not None and info.duration_seconds is not None:
                duration = info.duration_seconds
            suffix = f"({format_seconds(duration)})" if duration is not None else ""
            self._line(verb, unit, suffix)

    def _line(self, verb: str, unit: Workunit, suffix: str = "") -> None:
        elapsed = self._clock() - self._started
        kind = node_kind(unit.name)
        text = f"[{elapsed:8.2f}s] {verb:<7} {kind:<8} {node_label(unit)}"
        if suffix:
            text += f" {suffix}"
        self._stream.write(text + "\n")
        self._stream.flush()
