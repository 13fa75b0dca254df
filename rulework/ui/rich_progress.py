"""The live progress display for terminals (needs rich: `pip install 'rulework[ui]'`).

Shows, refreshed eight times a second: the goal, nodes done / started, cache hits, failures,
the elapsed time, and the nodes running now (Processes first, the longest-running first;
a node whose child is running is waiting for it, and not listed).
Failures are printed above the display as they happen.

Events arrive on the trio thread while rich redraws from its own refresh thread, so the state
is guarded by a lock that both take for a few microseconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from ..engine.scheduler import Workunit
from .nodes import PROCESS_RULES, NodeKind, node_kind, node_label
from .summary import format_seconds

_KIND_ORDER: dict[NodeKind, int] = {"process": 0, "rule": 1, "intrinsic": 2}
_KIND_STYLE: dict[NodeKind, str] = {"process": "cyan", "rule": "green", "intrinsic": "dim"}


@dataclass(frozen=True, slots=True)
class _Running:
    label: str
    kind: NodeKind
    started: float
    parent_id: int | None


class RichProgress:
    """A subscriber that keeps the state of a live display; `live()` shows it on `console`.

    Args:
        console: the rich console to draw on (the CLI uses one on stderr).
        title: what is running, e.g. the goal's name.
        cacheable: names of the rules whose nodes a cache can serve.
        max_rows: how many running nodes to list.
        clock: the time source (tests pass a fake one).
    """

    def __init__(
        self,
        console: Console,
        *,
        title: str,
        cacheable: Collection[str] = PROCESS_RULES,
        max_rows: int = 10,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console = console
        self._title = title
        self._cacheable = frozenset(cacheable)
        self._max_rows = max_rows
        self._clock = clock
        self._started_at = clock()
        self._spinner = Spinner("dots", style="bold blue")
        self._lock = threading.Lock()
        # Guarded by _lock: every started node without an end event is in `_running`.
        self._running: dict[int, _Running] = {}
        self._started = 0
        self._done = 0
        self._failed = 0
        self._cached: dict[str, int] = {}
        self._failed_below: set[int] = set()

    def __call__(self, unit: Workunit) -> None:
        if unit.kind == "start":
            started = _Running(
                node_label(unit), node_kind(unit.name), self._clock(), unit.parent_id
            )
            with self._lock:
                self._running[unit.node_id] = started
                self._started += 1
            return
        if unit.kind != "end":
            return
        report: str | None = None
        with self._lock:
            running: _Running | None = self._running.pop(unit.node_id, None)
            if unit.outcome == "cancelled":
                return
            self._done += 1
            if unit.cache is not None:
                self._cached[unit.cache] = self._cached.get(unit.cache, 0) + 1
            if unit.outcome == "failure":
                self._failed += 1
                propagated = unit.node_id in self._failed_below
                # End events do not carry the parent: it was recorded when the node started.
                parent_id = running.parent_id if running is not None else unit.parent_id
                if parent_id is not None:
                    self._failed_below.add(parent_id)
                if not propagated:
                    report = running.label if running is not None else node_label(unit)
        if report is not None:
            line = Text("FAILED ", style="bold red")
            line.append(f"{node_kind(unit.name):<8} ", style="dim")
            line.append(report)
            self.console.print(line, soft_wrap=True)

    def render(self) -> RenderableType:
        """The display as it is now."""
        now = self._clock()
        with self._lock:
            # A node with a running child is waiting for it: list where the work happens.
            waiting = {r.parent_id for r in self._running.values()}
            running = sorted(
                (r for node_id, r in self._running.items() if node_id not in waiting),
                key=lambda r: (_KIND_ORDER[r.kind], r.started),
            )
            started, done, failed = self._started, self._done, self._failed
            cached = sum(self._cached.values())
        header = Table.grid(padding=(0, 1))
        header.add_column(no_wrap=True)
        header.add_column()
        status = Text()
        status.append(self._title, style="bold")
        status.append(f"  {done}/{started} nodes done")
        if cached:
            status.append(f", {cached} from cache", style="green")
        if failed:
            status.append(f", {failed} failed", style="bold red")
        status.append(f"  {format_seconds(now - self._started_at)}", style="dim")
        header.add_row(self._spinner, status)
        rows = Table.grid(padding=(0, 1), expand=False)
        rows.add_column(width=2)
        rows.add_column(no_wrap=True)
        rows.add_column(
            no_wrap=True, overflow="ellipsis", max_width=max(20, self.console.width - 24)
        )
        rows.add_column(no_wrap=True, justify="right")
        for item in running[: self._max_rows]:
            rows.add_row(
                "",
                Text(item.kind, style=_KIND_STYLE[item.kind]),
                Text(item.label, overflow="ellipsis", no_wrap=True),
                Text(format_seconds(now - item.started), style="dim"),
            )
        if len(running) > self._max_rows:
            rows.add_row(
                "", "", Text(f"... and {len(running) - self._max_rows} more", style="dim"), ""
            )
        return Group(header, rows)

    @contextmanager
    def live(self) -> Iterator[None]:
        """Show the display until the block exits (then it disappears; print the summary after).

        While it is shown, whatever is written to stdout or stderr is printed above it.
        """
        with Live(
            console=self.console,
            get_renderable=self.render,
            auto_refresh=True,
            refresh_per_second=8,
            transient=True,
            redirect_stdout=True,
            redirect_stderr=True,
        ):
            yield
