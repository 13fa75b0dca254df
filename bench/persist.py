"""Persisted rule results: a cold run versus a warm run in a new process, from the sqlite cache.

A persisted rule `work(Item) -> Result` runs over N items (default 10,000), requested through
one non-persisted rule that MultiGets them all. Each node does 1 ms of CPU work: an arithmetic
loop calibrated to take 1 ms on this machine (real work on the event loop, no sleep), whose
result depends on the item.

1. Cold: a fresh process, an empty sqlite cache: every node runs and is stored.
2. Warm: another fresh process on the same cache directory: every node is a cache hit (the
   benchmark checks that no node ran and that the results are identical).

`cold_s` / `warm_s` are measured inside each process, from before `Engine(...)` is built until
the session is closed (rule graph, code fingerprints, cache open, the run, the close): the
engine's cost. Interpreter start-up and imports are the same for both and are reported on a
second line, measured around the whole subprocess; the third line gives the CPU time of the
engine's part (threads included), which a busy shared machine disturbs less. The warm run is repeated three times (each
in a new process, on the same cache) and the median is reported.

    persist nodes=N cold_s=A warm_s=B ratio=A/B
    persist_process nodes=N cold_s=A2 warm_s=B2 ratio=A2/B2
    persist_cpu nodes=N cold_s=A3 warm_s=B3 ratio=A3/B3

Usage: python bench/persist.py [N]        (goal: ratio >= 20 with N=10000)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import trio

from rulework import Engine, Get, MultiGet, QueryRule, rule

WARM_RUNS = 3

# Set by the parent process (calibrated there), read by `work` in the children.
ITERATIONS = int(os.environ.get("RULEWORK_BENCH_ITERATIONS", "1"))


@dataclass(frozen=True)
class Item:
    i: int


@dataclass(frozen=True)
class Result:
    i: int
    value: int


@dataclass(frozen=True)
class Batch:
    n: int


@dataclass(frozen=True)
class Summary:
    count: int
    checksum: int


def spin(seed: int, iterations: int) -> int:
    """CPU work: a linear congruential loop."""
    x = seed
    for _ in range(iterations):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    return x


@rule(persist=True)
async def work(item: Item) -> Result:
    return Result(item.i, spin(item.i, ITERATIONS))


@rule
async def run_all(batch: Batch) -> Summary:
    results = await MultiGet(Get(Result, Item, Item(i)) for i in range(batch.n))
    return Summary(len(results), sum(r.value for r in results) % 1_000_000_007)


def calibrate() -> int:
    """Iterations of `spin` that take 1 ms here (best of several tries)."""
    iterations = 10_000
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        spin(1, iterations)
        best = min(best, time.perf_counter() - start)
    return max(1, round(iterations * 0.001 / best))


async def phase(cache_dir: str, n: int) -> dict[str, object]:
    started = time.perf_counter()
    cpu_started = time.process_time()
    engine = Engine(
        [work, run_all, QueryRule(Summary, (Batch,))],
        config={"cache": {"local": "sqlite", "dir": cache_dir, "remote": "none"}},
    )
    async with engine.session() as session:
        summary = await session.get(Summary, Batch(n))
        stats = session.statistics()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    name = f"{work.__module__}.{work.__qualname__}"
    return {
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "checksum": summary.checksum,
        "count": summary.count,
        "hits": stats.cache_hits.get("local_cache", 0),
        "nodes": stats.per_rule[name].runs,
    }


def child(which: str, cache_dir: str, n: int, iterations: int) -> tuple[dict[str, object], float]:
    env = dict(os.environ, RULEWORK_BENCH_ITERATIONS=str(iterations))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--phase", which, cache_dir, str(n)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - started
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--phase":
        _, _, _which, cache_dir, count = sys.argv
        print(json.dumps(trio.run(phase, cache_dir, int(count))))
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    iterations = calibrate()
    with tempfile.TemporaryDirectory(prefix="rulework-bench-persist-") as cache_dir:
        cold, cold_wall = child("cold", cache_dir, n, iterations)
        # The machine is shared: the warm run is repeated (each in a new process) and the
        # median is reported.
        warms = [child("warm", cache_dir, n, iterations) for _ in range(WARM_RUNS)]
    if cold["hits"] != 0 or any(w["hits"] != n for w, _ in warms):
        sys.exit(f"unexpected cache hits: cold={cold} warm={warms} (want 0 then {n})")
    if any((w["checksum"], w["count"]) != (cold["checksum"], cold["count"]) for w, _ in warms):
        sys.exit(f"warm results differ from cold ones: {warms} vs {cold}")
    cold_s = float(cold["seconds"])  # type: ignore[arg-type]
    warm_s = statistics.median(float(w["seconds"]) for w, _ in warms)  # type: ignore[arg-type]
    warm_wall = statistics.median(wall for _, wall in warms)
    print(f"persist nodes={n} cold_s={cold_s:.3f} warm_s={warm_s:.3f} ratio={cold_s / warm_s:.1f}")
    print(
        f"persist_process nodes={n} cold_s={cold_wall:.3f} warm_s={warm_wall:.3f} "
        f"ratio={cold_wall / warm_wall:.1f}"
    )
    cold_cpu = float(cold["cpu_seconds"])  # type: ignore[arg-type]
    warm_cpu = statistics.median(float(w["cpu_seconds"]) for w, _ in warms)  # type: ignore[arg-type]
    print(
        f"persist_cpu nodes={n} cold_s={cold_cpu:.3f} warm_s={warm_cpu:.3f} "
        f"ratio={cold_cpu / warm_cpu:.1f}"
    )


if __name__ == "__main__":
    main()
