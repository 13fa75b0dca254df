"""Watch mode: re-run a request whenever files under the engine root change.

Each batch of file events (debounced by watchfiles) invalidates the nodes that read those paths
(`Session.invalidate_paths`), re-requests the goal (only what changed re-runs; early cutoff
stops at unchanged values), forgets nodes the new run no longer uses, and reports the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .errors import RuleworkError

if TYPE_CHECKING:
    from .scheduler import Session


@dataclass(frozen=True, slots=True)
class WatchResult:
    """One run of a watched request.

    `value` is the result, or `error` the exception the run raised (watching goes on either
    way). `changed` lists the paths (relative to the root) whose events caused this run (empty
    for the first run), `dirtied` how many nodes they invalidated, `reran` how many rule bodies
    ran again, `collected` how many no longer used nodes were forgotten.
    """

    iteration: int
    value: Any
    error: BaseException | None
    changed: tuple[str, ...]
    dirtied: int
    reran: int
    collected: int
    seconds: float


async def watch(
    session: Session,
    output_type: type[Any],
    params: Sequence[object],
    *,
    root: Path,
    on_result: Callable[[WatchResult], None],
    debounce_ms: int = 1600,
    step_ms: int = 50,
    ready: trio.Event | None = None,
) -> None:
    """Run the request, then again after every batch of file changes, until cancelled.

    Args:
        on_result: called with every run's `WatchResult`, the first run included.
        debounce_ms, step_ms: watchfiles' grouping: events are gathered until none came for
            `step_ms` (at most `debounce_ms`), so a burst of changes causes one re-run.
        ready: set once the watcher is watching (after the first run), for tests and UIs.
    """
    try:
        import watchfiles
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuleworkError(
            "Watch mode needs the watchfiles package: pip install 'rulework[watch]'"
        ) from exc

    iteration = 0

    async def run(changed: tuple[str, ...], dirtied: int) -> None:
        nonlocal iteration
        before = session.statistics().nodes_rerun
        started = time.perf_counter()
        value: Any = None
        error: BaseException | None = None
        try:
            value = await session.get(output_type, *params)
        except Exception as exc:  # reported to the caller; watching continues
            error = exc
        seconds = time.perf_counter() - started
        collected = session.collect_garbage()
        reran = session.statistics().nodes_rerun - before
        on_result(WatchResult(iteration, value, error, changed, dirtied, reran, collected, seconds))
        iteration += 1

    await run((), 0)
    # watchfiles stops its watcher thread at the next step once `stop` is set, so leaving
    # (cancellation, Ctrl-C) leaves no thread behind for longer than `step_ms`.
    stop = trio.Event()
    try:
        # With yield_on_timeout, the first (empty) batch says the watcher is in place.
        watcher = watchfiles.awatch(
            root,
            debounce=debounce_ms,
            step=step_ms,
            stop_event=stop,
            rust_timeout=max(step_ms * 4, 200),
            yield_on_timeout=True,
        )
        async for changes in watcher:
            if ready is not None and not ready.is_set():
                ready.set()
            if not changes:
                continue
            changed = tuple(sorted({relative_path(path, root) for _, path in changes}))
            dirtied = session.invalidate_paths(changed)
            await run(changed, dirtied)
    finally:
        stop.set()


def relative_path(path: str, root: Path) -> str:
    """A watched path as `invalidate_paths` expects it: relative to the root, with `/`."""
    return os.path.relpath(path, root).replace(os.sep, "/")
