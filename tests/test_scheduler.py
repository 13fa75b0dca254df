"""The trio scheduler: memoization, MultiGet cancel scopes, cycles, engine tracebacks, events."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import pytest
import trio
import trio.lowlevel
import trio.testing

from rulework import (
    CycleError,
    Engine,
    Get,
    MultiGet,
    NoSuchQueryError,
    QueryRule,
    RuleDefinitionError,
    UnionRule,
    rule,
    union,
)

NO_CACHE = {"cache": {"local": "none"}}
calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


@dataclass(frozen=True)
class N:
    i: int


@dataclass(frozen=True)
class Out:
    v: int


@dataclass(frozen=True)
class Total:
    v: int


@rule
async def leaf(n: N) -> Out:
    calls[f"leaf{n.i}"] += 1
    await trio.lowlevel.checkpoint()
    return Out(n.i * 10)


@rule
async def total(n: N) -> Total:
    outs = await MultiGet(Get(Out, N, N(i)) for i in range(n.i))
    return Total(sum(o.v for o in outs))


def engine(*rules: object, **kwargs: object) -> Engine:
    return Engine(list(rules), config=NO_CACHE, **kwargs)  # type: ignore[arg-type]


async def test_memoizes_within_a_session_and_shares_concurrent_requests() -> None:
    e = engine(leaf, total, QueryRule(Out, (N,)), QueryRule(Total, (N,)))
    async with e.session() as s:
        results = await s.get_many(Out, [(N(1),)] * 5 + [(N(2),)])
        assert [r.v for r in results] == [10] * 5 + [20]
        assert (await s.get(Total, N(3))).v == 0 + 10 + 20
        assert calls == {"leaf0": 1, "leaf1": 1, "leaf2": 1}
        stats = s.statistics()
        assert stats.per_rule[f"{__name__}.leaf"].runs == 3
        assert stats.nodes_completed == 4
    async with e.session() as s2:  # a new session computes again
        await s2.get(Out, N(1))
    assert calls["leaf1"] == 2


def test_sync_run_returns_the_value() -> None:
    e = engine(leaf, QueryRule(Out, (N,)))
    assert e.run(Out, N(4)) == Out(40)


def test_run_from_inside_an_asyncio_loop_and_asyncio_session() -> None:
    e = engine(leaf, QueryRule(Out, (N,)))

    async def main() -> tuple[Out, Out]:
        from_run = e.run(Out, N(5))  # blocking call from inside a running loop
        async with e.asyncio_session() as s:
            awaited = await s.get(Out, N(6))
        return from_run, awaited

    assert asyncio.run(main()) == (Out(50), Out(60))


async def test_no_such_query_lists_the_existing_queries() -> None:
    e = engine(leaf, QueryRule(Out, (N,)))
    async with e.session() as s:
        with pytest.raises(NoSuchQueryError) as info:
            await s.get(Total, N(1))
    assert "QueryRule(Out, (N,))" in str(info.value) or "Out" in str(info.value)


# -- failures inside MultiGet ----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    i: int


@dataclass(frozen=True)
class JobDone:
    i: int


@dataclass(frozen=True)
class Batch:
    n: int


@dataclass(frozen=True)
class BatchDone:
    cancelled: int


class JobFailed(Exception):
    pass


cancelled_jobs: list[int] = []
started_jobs: list[int] = []


@rule
async def run_job(job: Job) -> JobDone:
    started_jobs.append(job.i)
    if job.i == 0:
        await trio.sleep(0.01)
        raise JobFailed(f"job {job.i} broke")
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        cancelled_jobs.append(job.i)
        raise
    raise AssertionError("unreachable")


@rule
async def run_batch(batch: Batch) -> BatchDone:
    try:
        await MultiGet(Get(JobDone, Job(i)) for i in range(batch.n))
    except JobFailed as exc:  # unwrapped: not an ExceptionGroup
        assert "job 0 broke" in str(exc)
        # Siblings are cancelled once the scheduler has delivered the cancellation to them.
        await trio.testing.wait_all_tasks_blocked()
        return BatchDone(len(cancelled_jobs))
    raise AssertionError("the MultiGet should have failed")


async def test_first_failure_in_a_multiget_of_100_cancels_the_other_99() -> None:
    cancelled_jobs.clear()
    started_jobs.clear()
    e = engine(run_job, run_batch, QueryRule(BatchDone, (Batch,)), QueryRule(JobDone, (Job,)))
    async with e.session() as s:
        done = await s.get(BatchDone, Batch(100))
        assert done.cancelled == 99
        assert sorted(cancelled_jobs) == list(range(1, 100))
        # Cancelled nodes were forgotten: asking again starts them afresh.
        started_jobs.clear()
        with trio.move_on_after(0.05):
            await s.get(JobDone, Job(7))
        assert started_jobs == [7]


@dataclass(frozen=True)
class Slow:
    token: int


@dataclass(frozen=True)
class SlowDone:
    token: int


@dataclass(frozen=True)
class WaitsShort:
    token: int


@dataclass(frozen=True)
class WaitsLong:
    token: int


@dataclass(frozen=True)
class Gave:
    got: bool


slow_gate: list[trio.Event] = []


@rule
async def slow_node(slow: Slow) -> SlowDone:
    calls["slow"] += 1
    await slow_gate[0].wait()
    return SlowDone(slow.token)


@rule
async def waits_short(w: WaitsShort) -> Gave:
    with trio.move_on_after(0.01):
        await MultiGet(Get(SlowDone, Slow(w.token)))
        return Gave(True)
    return Gave(False)


@dataclass(frozen=True)
class LongGave:
    value: int


@rule
async def waits_long(w: WaitsLong) -> LongGave:
    (done,) = await MultiGet(Get(SlowDone, Slow(w.token)))
    return LongGave(done.token)


async def test_a_node_shared_by_two_multigets_survives_one_being_cancelled() -> None:
    slow_gate[:] = [trio.Event()]
    e = engine(
        slow_node,
        waits_short,
        waits_long,
        QueryRule(Gave, (WaitsShort,)),
        QueryRule(LongGave, (WaitsLong,)),
    )
    async with e.session() as s, trio.open_nursery() as nursery:
        results: dict[str, object] = {}

        async def long() -> None:
            results["long"] = await s.get(LongGave, WaitsLong(1))

        nursery.start_soon(long)
        await trio.testing.wait_all_tasks_blocked()
        assert (await s.get(Gave, WaitsShort(1))) == Gave(False)  # gave up after 10 ms
        slow_gate[0].set()
    assert results["long"] == LongGave(1)
    assert calls["slow"] == 1  # never restarted: the long waiter kept it alive


async def test_an_orphaned_node_is_cancelled_and_restarted_on_the_next_request() -> None:
    slow_gate[:] = [trio.Event()]
    e = engine(
        slow_node,
        waits_short,
        waits_long,
        QueryRule(Gave, (WaitsShort,)),
        QueryRule(LongGave, (WaitsLong,)),
    )
    async with e.session() as s:
        assert (await s.get(Gave, WaitsShort(2))) == Gave(False)
        await trio.testing.wait_all_tasks_blocked()
        assert s.statistics().nodes_cancelled == 1
        slow_gate[0].set()
        assert (await s.get(LongGave, WaitsLong(2))) == LongGave(2)
    assert calls["slow"] == 2


# -- engine tracebacks -----------------------------------------------------------------------


@dataclass(frozen=True)
class Depth:
    n: int


@dataclass(frozen=True)
class Reached:
    n: int


class DeepError(ValueError):
    pass


@rule
async def descend(d: Depth) -> Reached:
    if d.n == 5:
        raise DeepError("bottom of the chain")
    return await Get(Reached, Depth, Depth(d.n + 1))


async def test_an_error_five_rules_deep_keeps_its_type_and_shows_the_chain() -> None:
    e = engine(descend, QueryRule(Reached, (Depth,)))
    async with e.session() as s:
        with pytest.raises(DeepError, match="bottom of the chain") as info:
            await s.get(Reached, Depth(1))
    notes = "\n".join(info.value.__notes__)
    assert "Engine traceback" in notes
    positions = [notes.index(f"Depth=Depth(n={k})") for k in range(1, 6)]
    assert positions == sorted(positions), notes  # outermost first
    assert notes.count("descend") == 5


# -- cycles ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class A:
    i: int


@dataclass(frozen=True)
class B:
    i: int


@dataclass(frozen=True)
class C:
    i: int


@rule
async def a_from_c(c: C) -> A:
    b = await Get(B, A, A(c.i))
    return A(b.i)


@rule
async def b_from_a(a: A) -> B:
    c = await Get(C, B, B(a.i))
    return B(c.i)


@rule
async def c_from_b(b: B) -> C:
    a = await Get(A, C, C(b.i))
    return C(a.i)


async def test_a_three_rule_cycle_raises_cycle_error_quickly() -> None:
    e = engine(a_from_c, b_from_a, c_from_b, QueryRule(A, (C,)))
    async with e.session() as s:
        with trio.fail_after(1):
            with pytest.raises(CycleError) as info:
                await s.get(A, C(1))
    text = str(info.value)
    for name in ("a_from_c", "b_from_a", "c_from_b"):
        assert name in text
    assert info.value.cycle[0] == info.value.cycle[-1]


# -- undeclared gets, wrong outputs ----------------------------------------------------------


@dataclass(frozen=True)
class Sneaky:
    i: int


def _hidden_get(cls: type) -> Get[Out]:
    return Get(cls, N, N(1))


@rule
async def sneaky(s: Sneaky) -> Total:
    await Get(Out, N, N(1))
    value = await _hidden_get(Total)  # not visible to the static analysis as Get(Total, N)
    return Total(value.v)


async def test_a_get_the_rule_did_not_declare_is_an_error_naming_rule_and_get() -> None:
    e = engine(sneaky, leaf, total, QueryRule(Total, (Sneaky,)), QueryRule(Total, (N,)))
    async with e.session() as s:
        with pytest.raises(RuleDefinitionError) as info:
            await s.get(Total, Sneaky(1))
    assert "sneaky" in str(info.value)
    assert "Get(Total, N, ...)" in str(info.value)


@dataclass(frozen=True)
class Liar:
    i: int


@rule
async def liar(x: Liar) -> Out:
    return Total(1)  # type: ignore[return-value]


async def test_a_rule_returning_the_wrong_type_is_a_clear_error() -> None:
    e = engine(liar, QueryRule(Out, (Liar,)))
    async with e.session() as s:
        with pytest.raises(RuleDefinitionError, match="returned a value of type Total"):
            await s.get(Out, Liar(1))


# -- unions ----------------------------------------------------------------------------------


@union
class Shape:
    pass


@dataclass(frozen=True)
class Square(Shape):
    side: int


@dataclass(frozen=True)
class Circle(Shape):
    r: int


@dataclass(frozen=True)
class Area:
    value: float


@dataclass(frozen=True)
class Shapes:
    items: tuple[Shape, ...]


@dataclass(frozen=True)
class Areas:
    values: tuple[float, ...]


@rule
async def square_area(s: Square) -> Area:
    return Area(float(s.side * s.side))


@rule
async def circle_area(c: Circle) -> Area:
    return Area(3.0 * c.r * c.r)


@rule
async def all_areas(shapes: Shapes) -> Areas:
    areas = await MultiGet(Get(Area, Shape, s) for s in shapes.items)
    return Areas(tuple(a.value for a in areas))


async def test_union_gets_dispatch_on_the_members_concrete_type() -> None:
    e = engine(
        square_area,
        circle_area,
        all_areas,
        UnionRule(Shape, Square),
        UnionRule(Shape, Circle),
        QueryRule(Areas, (Shapes,)),
    )
    async with e.session() as s:
        result = await s.get(Areas, Shapes((Square(2), Circle(1), Square(3))))
    assert result == Areas((4.0, 3.0, 9.0))


# -- deadlines and events --------------------------------------------------------------------


@dataclass(frozen=True)
class Forever:
    pass


@rule
async def forever(f: Forever) -> Out:
    await trio.sleep_forever()
    raise AssertionError


async def test_session_timeout_raises_too_slow_and_leaves_no_task() -> None:
    e = engine(forever, QueryRule(Out, (Forever,)))
    with trio.fail_after(5):
        async with e.session(timeout_seconds=0.05) as s:
            with pytest.raises(trio.TooSlowError):
                await s.get(Out, Forever())


async def test_workunits_are_delivered_to_subscribers_with_parents() -> None:
    events: list[object] = []
    e = engine(leaf, total, QueryRule(Total, (N,)))
    async with e.session(subscribers=[events.append]) as s:
        await s.get(Total, N(2))
    starts = [ev for ev in events if ev.kind == "start"]  # type: ignore[attr-defined]
    ends = [ev for ev in events if ev.kind == "end"]  # type: ignore[attr-defined]
    assert len(starts) == len(ends) == 3
    root = next(ev for ev in starts if ev.name.endswith(".total"))  # type: ignore[attr-defined]
    leaves = [ev for ev in starts if ev.name.endswith(".leaf")]  # type: ignore[attr-defined]
    assert {ev.parent_id for ev in leaves} == {root.node_id}  # type: ignore[attr-defined]
    assert all(ev.outcome == "success" and ev.duration_seconds >= 0 for ev in ends)  # type: ignore[attr-defined]


async def test_sessions_relax_the_gc_threshold_and_restore_it() -> None:
    import gc

    before = gc.get_threshold()
    e = engine(leaf, QueryRule(Out, (N,)))
    async with e.session() as s1:
        assert gc.get_threshold()[0] >= 20_000
        async with e.session() as s2:  # nested sessions share the relaxed setting
            assert await s2.get(Out, N(1)) == Out(10)
        assert gc.get_threshold()[0] >= 20_000
        assert await s1.get(Out, N(2)) == Out(20)
    assert gc.get_threshold() == before


async def test_end_events_keep_their_parent() -> None:
    events: list[object] = []
    e = engine(leaf, total, QueryRule(Total, (N,)))
    async with e.session(subscribers=[events.append]) as s:
        await s.get(Total, N(2))
    by_kind: dict[str, dict[int, object]] = {"start": {}, "end": {}}
    for ev in events:
        by_kind[ev.kind][ev.node_id] = ev.parent_id  # type: ignore[attr-defined]
    assert by_kind["start"] == by_kind["end"]
    assert sorted(by_kind["end"].values(), key=str)[-1] is None  # the root has no parent


def test_a_chain_of_2000_rules_compiles_and_runs() -> None:
    from rulework.engine.rules import RuleInfo

    links = [type(f"Link{i}", (), {"__slots__": ("n",)}) for i in range(2000)]

    def make(i: int) -> RuleInfo:
        async def body(previous: object) -> object:
            value = links[i]()
            value.n = previous.n + 1  # type: ignore[attr-defined]
            return value

        return RuleInfo.create(
            body, output_type=links[i], parameter_types=[links[i - 1]], name=f"chain.link{i}"
        )

    rules = [make(i) for i in range(1, len(links))]
    first = links[0]()
    first.n = 0  # type: ignore[attr-defined]
    e = engine(*rules, QueryRule(links[-1], (links[0],)))
    assert e.run(links[-1], first).n == 1999  # type: ignore[attr-defined]
