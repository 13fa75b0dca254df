"""`--trace FILE`: a Chrome trace-event JSON of a run, for Perfetto or chrome://tracing.

One complete event (`"ph": "X"`) per finished node, named after its rule (or its Process's
description), with its outcome and cache outcome in `args`. Nodes run concurrently, so events
are laid out on lanes (`tid`s): a node goes on its parent's lane when it nests entirely inside
the innermost event open there, else on a lane that is free at its start, else on a new lane.
That keeps a parent with (some of) its children and never draws two partially overlapping
events on one lane (the viewers require proper nesting within a lane).
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.scheduler import Workunit
from .nodes import PROCESS_RULES, node_kind, node_label, process_info, short_name

_PID = 1


@dataclass(frozen=True, slots=True)
class _Span:
    node_id: int
    parent_id: int | None
    start: float
    duration: float
    name: str
    category: str
    args: dict[str, Any]


class TraceRecorder:
    """A subscriber that records every finished node; `write(path)` saves the trace.

    Each event's `args.cache` is the cache layer that served the node ("local_cache",
    "remote_cache"), "miss" for a cacheable node that ran, or null for a node no cache keeps.

    Args:
        cacheable: names of the rules whose nodes a cache can serve (see
            `rulework.ui.cacheable_rule_names`); by default the Process intrinsics.
    """

    def __init__(self, *, cacheable: Collection[str] = PROCESS_RULES) -> None:
        self._cacheable = frozenset(cacheable)
        self._spans: list[_Span] = []
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
        duration = unit.duration_seconds or 0.0
        kind = node_kind(unit.name)
        args: dict[str, Any] = {
            "node_id": unit.node_id,
            "rule": unit.name,
            "description": unit.description,
            "outcome": unit.outcome,
            "cache": unit.cache
            or ("miss" if unit.name in self._cacheable and unit.outcome != "cancelled" else None),
        }
        if parent_id is not None:
            args["parent_id"] = parent_id
        name = short_name(unit.name)
        info = process_info(unit)
        if info is not None:
            name = info.description
            args["process"] = {
                "description": info.description,
                "environment": info.environment,
                "source": info.source,
                "duration_seconds": info.duration_seconds,
                "exit_code": info.exit_code,
            }
        elif kind == "rule":
            name = node_label(unit)
        self._spans.append(
            _Span(
                node_id=unit.node_id,
                parent_id=parent_id,
                start=unit.timestamp - duration,  # end events are stamped when the node ended
                duration=duration,
                name=name,
                category=kind,
                args=args,
            )
        )

    def __len__(self) -> int:
        return len(self._spans)

    def trace_events(self) -> list[dict[str, Any]]:
        """The events: lane names (metadata events) first, then one complete event per node."""
        if not self._spans:
            return []
        origin = min(span.start for span in self._spans)
        spans = sorted(self._spans, key=lambda s: (s.start, -s.duration, s.node_id))
        # Invariants: `lanes[i]` holds the end times of the events still open on lane i,
        # outermost first, each nested in the one before; `free` holds exactly one entry
        # `(lanes[i][0], i)` per lane: the time from which lane i is entirely free.
        lanes: list[list[float]] = []
        free: list[tuple[float, int]] = []
        lane_of: dict[int, int] = {}
        events: list[dict[str, Any]] = []
        for span in spans:
            end = span.start + span.duration
            lane = self._nest_in_parent(span, end, lanes, lane_of)
            if lane is None:
                if free and free[0][0] <= span.start:
                    _, lane = heapq.heappop(free)
                else:
                    lane = len(lanes)
                    lanes.append([])
                lanes[lane] = [end]
                heapq.heappush(free, (end, lane))
            lane_of[span.node_id] = lane
            events.append(
                {
                    "name": span.name,
                    "cat": span.category,
                    "ph": "X",
                    "ts": round((span.start - origin) * 1e6, 3),
                    "dur": round(span.duration * 1e6, 3),
                    "pid": _PID,
                    "tid": lane + 1,
                    "args": span.args,
                }
            )
        names: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": _PID, "args": {"name": "rulework"}}
        ]
        names.extend(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": _PID,
                "tid": index + 1,
                "args": {"name": f"lane {index + 1}"},
            }
            for index in range(len(lanes))
        )
        return names + events

    @staticmethod
    def _nest_in_parent(
        span: _Span, end: float, lanes: list[list[float]], lane_of: dict[int, int]
    ) -> int | None:
        """The parent's lane, if the span nests inside the innermost event still open there."""
        if span.parent_id is None:
            return None
        lane = lane_of.get(span.parent_id)
        if lane is None:
            return None
        stack = lanes[lane]
        while len(stack) > 1 and stack[-1] <= span.start:
            stack.pop()  # the outermost entry stays: it is the lane's entry in `free`
        if stack[-1] <= span.start or stack[-1] < end:
            return None
        stack.append(end)
        return lane

    def to_json(self) -> dict[str, Any]:
        """The whole trace document (JSON object format)."""
        return {"traceEvents": self.trace_events(), "displayTimeUnit": "ms"}

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace to `path` atomically (a temporary file renamed into place)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, default=str)
                f.write("\n")
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        return target
