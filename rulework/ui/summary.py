"""The summary printed at the end of a run: nodes, memo and cache hits, process time saved."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from ..engine.scheduler import SessionStatistics, Workunit
from .nodes import PROCESS_RULES, process_info

_LAYER_NAMES = {"local_cache": "local", "remote_cache": "remote"}


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What happened in a run, from its `Workunit` events and the session's statistics.

    Attributes:
        nodes_completed: nodes that produced a value (computed, served from a cache, or
            verified unchanged).
        nodes_failed: nodes that raised (a failure propagating through several rules counts
            once per rule).
        nodes_cancelled: nodes cancelled before they finished.
        memo_hits: requests answered from the session's memo table without running anything.
        cache_hits: nodes served from a persistent cache, by layer ("local_cache",
            "remote_cache").
        cacheable_nodes: nodes a cache could have served (Processes, persisted rules).
        processes_run: Processes executed in this run.
        processes_cached: Processes whose results came from a cache.
        process_seconds: the time the executed Processes took.
        seconds_saved: the time the cached Processes took when they originally ran.
    """

    nodes_completed: int = 0
    nodes_failed: int = 0
    nodes_cancelled: int = 0
    memo_hits: int = 0
    cache_hits: Mapping[str, int] = field(default_factory=dict)
    cacheable_nodes: int = 0
    processes_run: int = 0
    processes_cached: int = 0
    process_seconds: float = 0.0
    seconds_saved: float = 0.0

    @property
    def cached_nodes(self) -> int:
        """Nodes served from any persistent cache."""
        return sum(self.cache_hits.values())

    @property
    def fully_cached(self) -> bool:
        """True when there was cacheable work and a cache served all of it."""
        return self.cacheable_nodes > 0 and self.cached_nodes >= self.cacheable_nodes


class SummaryCollector:
    """A subscriber that counts what the summary reports.

    Args:
        cacheable: names of the rules whose nodes a cache can serve (see
            `rulework.ui.cacheable_rule_names`); by default the Process intrinsics.
    """

    def __init__(self, *, cacheable: Collection[str] = PROCESS_RULES) -> None:
        self._cacheable = frozenset(cacheable)
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._cache_hits: dict[str, int] = {}
        self._cacheable_nodes = 0
        self._processes_run = 0
        self._processes_cached = 0
        self._process_seconds = 0.0
        self._seconds_saved = 0.0

    def __call__(self, unit: Workunit) -> None:
        if unit.kind != "end":
            return
        outcome = unit.outcome
        if outcome == "cancelled":
            self._cancelled += 1
            return
        if outcome == "failure":
            self._failed += 1
        else:
            self._completed += 1
        if outcome == "verified":
            return  # an unchanged node of an incremental re-run: neither ran nor was fetched
        if unit.cache is not None:
            self._cache_hits[unit.cache] = self._cache_hits.get(unit.cache, 0) + 1
        if unit.name in self._cacheable:
            self._cacheable_nodes += 1
        if unit.name in PROCESS_RULES:
            info = process_info(unit)
            duration = info.duration_seconds if info is not None else None
            if unit.cache is not None:
                self._processes_cached += 1
                self._seconds_saved += duration or 0.0
            else:
                self._processes_run += 1
                self._process_seconds += (
                    duration if duration is not None else unit.duration_seconds or 0.0
                )

    def summary(self, statistics: SessionStatistics | None = None) -> RunSummary:
        """The numbers so far; `statistics` (from `Session.statistics()`) adds memo hits."""
        return RunSummary(
            nodes_completed=self._completed,
            nodes_failed=self._failed,
            nodes_cancelled=self._cancelled,
            memo_hits=statistics.memo_hits if statistics is not None else 0,
            cache_hits=dict(sorted(self._cache_hits.items())),
            cacheable_nodes=self._cacheable_nodes,
            processes_run=self._processes_run,
            processes_cached=self._processes_cached,
            process_seconds=self._process_seconds,
            seconds_saved=self._seconds_saved,
        )


def format_seconds(seconds: float) -> str:
    """`0.042s`, `1.3s`, `2m05s`."""
    if seconds < 1:
        return f"{seconds:.3f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def render_summary(
    summary: RunSummary, *, title: str, elapsed_seconds: float, ok: bool = True
) -> list[str]:
    """The summary as text lines, e.g.::

    ingest: finished in 0.8s
      nodes      57 completed, 0 failed, 212 memo hits
      cache      12 of 12 cacheable nodes served from cache (local 12)
      processes  0 ran, 9 from cache, saving 3.1s
    """
    status = "finished" if ok else "FAILED"
    lines = [f"{title}: {status} in {format_seconds(elapsed_seconds)}"]
    nodes = f"{summary.nodes_completed} completed, {summary.nodes_failed} failed"
    if summary.nodes_cancelled:
        nodes += f", {summary.nodes_cancelled} cancelled"
    nodes += f", {summary.memo_hits} memo hits"
    lines.append(f"  nodes      {nodes}")
    layers = ", ".join(
        f"{_LAYER_NAMES.get(layer, layer)} {count}" for layer, count in summary.cache_hits.items()
    )
    if summary.cacheable_nodes:
        if summary.fully_cached and summary.cacheable_nodes == 1:
            cache = "the one cacheable node was served from cache"
        elif summary.fully_cached:
            cache = f"all {summary.cacheable_nodes} cacheable nodes served from cache"
        else:
            cache = (
                f"{summary.cached_nodes} of {summary.cacheable_nodes} cacheable nodes served "
                "from cache"
            )
        if layers:
            cache += f" ({layers})"
    else:
        cache = "no cacheable nodes (no processes or persisted rules ran)"
    lines.append(f"  cache      {cache}")
    if summary.processes_run or summary.processes_cached:
        processes = f"{summary.processes_run} ran"
        if summary.processes_run:
            processes += f" ({format_seconds(summary.process_seconds)})"
        processes += f", {summary.processes_cached} from cache"
        if summary.processes_cached:
            processes += f", saving {format_seconds(summary.seconds_saved)}"
        lines.append(f"  processes  {processes}")
    return lines
