"""Scheduler overhead: a DAG of N trivial rule nodes, node i depending on i//2 and i//3.

Every one of the N nodes is requested from the session. Two plain-trio lower bounds run in the
same process: (a) one task per node awaiting `trio.Event`s; (b) a memoized recursive `get(i)`
whose MultiGet opens a nursery (the engine's shape without its features). Prints one line per N:

    engine_overhead n=N rulework_s=A trio_event_s=B trio_memo_s=C ratio_event=A/B
        ratio_memo=A/C us_per_node=U retained_kib_per_node=K

Each time is the best of 3 runs (the machines are shared; noise only adds time).

Usage: python bench/engine_overhead.py [N ...]   (default: 10000 100000)
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc
from dataclasses import dataclass

import trio

from rulework import Engine, Get, MultiGet, QueryRule, rule


@dataclass(frozen=True)
class Key:
    i: int


@dataclass(frozen=True)
class Value:
    v: int


@rule
async def compute(key: Key) -> Value:
    if key.i == 0:
        return Value(1)
    a, b = await MultiGet(Get(Value, Key, Key(key.i // 2)), Get(Value, Key, Key(key.i // 3)))
    return Value((a.v + b.v) % 1_000_003)


def make_engine() -> Engine:
    return Engine([compute, QueryRule(Value, (Key,))], config={"cache": {"local": "none"}})


async def run_rulework(engine: Engine, n: int) -> int:
    async with engine.session() as session:
        values = await session.get_many(Value, [(Key(i),) for i in range(n)])
    return sum(v.v for v in values)


async def run_trio_events(n: int) -> int:
    events = [trio.Event() for _ in range(n)]
    values = [0] * n

    async def node(i: int) -> None:
        if i == 0:
            values[0] = 1
        else:
            await events[i // 2].wait()
            await events[i // 3].wait()
            values[i] = (values[i // 2] + values[i // 3]) % 1_000_003
        events[i].set()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(node, i)
    return sum(values)


class _Cell:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value = 0


async def run_trio_memo(n: int) -> int:
    memo: dict[int, _Cell] = {}

    async def get(i: int) -> int:
        cell = memo.get(i)
        if cell is not None:
            await cell.event.wait()
            return cell.value
        cell = memo[i] = _Cell()
        if i == 0:
            value = 1
        else:
            results = [0, 0]

            async def one(j: int, slot: int) -> None:
                results[slot] = await get(j)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, i // 2, 0)
                nursery.start_soon(one, i // 3, 1)
            value = (results[0] + results[1]) % 1_000_003
        cell.value = value
        cell.event.set()
        return value

    out = [0] * n

    async def request(i: int) -> None:
        out[i] = await get(i)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(request, i)
    return sum(out)


def timed(fn, *args, repeat: int = 3) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """The best of `repeat` runs: the machine is shared, and noise only ever adds time."""
    best = float("inf")
    result = 0
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        result = trio.run(fn, *args)
        best = min(best, time.perf_counter() - start)
    return best, result


def retained_per_node(engine: Engine, n: int) -> float:
    """KiB still allocated while the session holds n memoized nodes (after the run)."""

    async def main() -> float:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        async with engine.session() as session:
            await session.get_many(Value, [(Key(i),) for i in range(n)])
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return (after - before) / n / 1024

    return trio.run(main)


def main(sizes: list[int]) -> None:
    engine = make_engine()
    trio.run(run_rulework, engine, 100)  # warm up imports and caches
    for n in sizes:
        rw_s, rw = timed(run_rulework, engine, n)
        ev_s, ev = timed(run_trio_events, n)
        memo_s, memo = timed(run_trio_memo, n)
        assert rw == ev == memo, (rw, ev, memo)
        kib = retained_per_node(engine, min(n, 20_000))
        print(
            f"engine_overhead n={n} rulework_s={rw_s:.3f} trio_event_s={ev_s:.3f} "
            f"trio_memo_s={memo_s:.3f} ratio_event={rw_s / ev_s:.2f} "
            f"ratio_memo={rw_s / memo_s:.2f} us_per_node={rw_s / n * 1e6:.1f} "
            f"retained_kib_per_node={kib:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [10_000, 100_000])
