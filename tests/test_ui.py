"""The displays: plain log lines, the rich live display, the Chrome trace and the summary."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pytest
from rich.console import Console

from rulework import (
    Engine,
    FallibleProcessResult,
    Get,
    MultiGet,
    Process,
    ProcessResult,
    QueryRule,
    Workunit,
    rule,
)
from rulework.ui import (
    PlainProgress,
    RunSummary,
    SummaryCollector,
    TraceRecorder,
    cacheable_rule_names,
    node_kind,
    node_label,
    render_summary,
)
from rulework.ui.nodes import PROCESS_RULES
from rulework.ui.rich_progress import RichProgress

RUN_PROCESS = next(name for name in PROCESS_RULES if name.endswith(".run_process"))


@dataclass(frozen=True)
class Word:
    text: str


@dataclass(frozen=True)
class Echoed:
    text: str
    source: str


@dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]


@dataclass(frozen=True)
class Echoes:
    items: tuple[Echoed, ...]


@rule
async def echo(word: Word) -> Echoed:
    result = await Get(
        ProcessResult,
        Process(("/bin/sh", "-c", f"printf %s {word.text}"), description=f"echo {word.text}"),
    )
    return Echoed(result.stdout.decode(), result.metadata.source)


@dataclass(frozen=True)
class Loud:
    text: str


@rule(persist=True)
async def shout(word: Word) -> Loud:
    return Loud(word.text.upper())


@rule
async def echo_all(sentence: Sentence) -> Echoes:
    echoed = await MultiGet(Get(Echoed, Word(w)) for w in sentence.words)
    await MultiGet(Get(Loud, Word, Word(w)) for w in sentence.words)
    return Echoes(echoed)


@dataclass(frozen=True)
class Doomed:
    code: int


@dataclass(frozen=True)
class Outcome:
    code: int


@rule
async def fail_inside(doomed: Doomed) -> FallibleProcessResult:
    return await Get(
        FallibleProcessResult,
        Process(("/bin/sh", "-c", "true"), description="fine"),
    )


@rule
async def doom(doomed: Doomed) -> Outcome:
    await Get(FallibleProcessResult, Doomed, doomed)
    await Get(ProcessResult, Process(("/bin/sh", "-c", f"exit {doomed.code}"), description="die"))
    return Outcome(0)


@rule
async def doom_twice(outcome: Outcome) -> Sentence:
    await Get(Outcome, Doomed(outcome.code))
    return Sentence(())


def _engine() -> Engine:
    return Engine(
        [
            echo,
            shout,
            echo_all,
            fail_inside,
            doom,
            doom_twice,
            QueryRule(Echoes, (Sentence,)),
            QueryRule(Sentence, (Outcome,)),
        ]
    )


async def _run(engine: Engine, *subscribers: Any, words: tuple[str, ...] = ("a", "b")) -> Any:
    async with engine.session(subscribers=list(subscribers)) as session:
        await session.get(Echoes, Sentence(words))
        return session.statistics()


# ----------------------------------------------------------------------------------------------
# Node names


def test_nodes_are_classified_and_labelled() -> None:
    assert node_kind(RUN_PROCESS) == "process"
    assert node_kind("rulework.engine.intrinsics.digest_contents") == "intrinsic"
    assert node_kind("my.module.rule") == "rule"
    unit = Workunit("start", 1, "pkg.mod.make", "pkg.mod.make(Word=Word(text='a'))", None, 0.0)
    assert node_label(unit) == "make(Word(text='a'))"


def test_cacheable_rules_are_the_processes_and_the_persisted_rules() -> None:
    names = cacheable_rule_names(_engine())
    assert names >= PROCESS_RULES
    assert any(name.endswith(".shout") for name in names)
    assert not any(name.endswith(".echo") for name in names)


# ----------------------------------------------------------------------------------------------
# Summary


async def test_summary_counts_runs_cache_hits_and_time_saved() -> None:
    engine = _engine()
    first = SummaryCollector(cacheable=cacheable_rule_names(engine))
    stats = await _run(engine, first)
    cold = first.summary(stats)
    assert cold.processes_run == 2 and cold.processes_cached == 0
    assert cold.cacheable_nodes == 4  # two echo Processes, two persisted shouts
    assert cold.cached_nodes == 0
    assert cold.process_seconds > 0
    assert cold.memo_hits == stats.memo_hits

    second = SummaryCollector(cacheable=cacheable_rule_names(engine))
    warm = second.summary(await _run(engine, second))
    assert warm.processes_run == 0 and warm.processes_cached == 2
    assert warm.cache_hits == {"local_cache": 4}
    assert warm.fully_cached
    # What the cached processes took when they ran is what the cache saved.
    assert warm.seconds_saved == pytest.approx(cold.process_seconds, rel=0.01)


def test_summary_text() -> None:
    summary = RunSummary(
        nodes_completed=57,
        nodes_failed=1,
        memo_hits=212,
        cache_hits={"local_cache": 10, "remote_cache": 2},
        cacheable_nodes=12,
        processes_run=0,
        processes_cached=9,
        seconds_saved=3.14,
    )
    lines = render_summary(summary, title="ingest", elapsed_seconds=0.8, ok=False)
    assert lines == [
        "ingest: FAILED in 0.800s",
        "  nodes      57 completed, 1 failed, 212 memo hits",
        "  cache      all 12 cacheable nodes served from cache (local 10, remote 2)",
        "  processes  0 ran, 9 from cache, saving 3.1s",
    ]
    partial = RunSummary(cache_hits={"local_cache": 3}, cacheable_nodes=5, processes_run=2)
    text = "\n".join(render_summary(partial, title="t", elapsed_seconds=75))
    assert "t: finished in 1m15s" in text
    assert "3 of 5 cacheable nodes served from cache (local 3)" in text
    assert "2 ran (0.000s), 0 from cache" in text


# ----------------------------------------------------------------------------------------------
# Plain progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.25
        return self.now


async def test_plain_lines_report_runs_then_cache_hits() -> None:
    engine = _engine()
    cacheable = cacheable_rule_names(engine)
    cold, warm = io.StringIO(), io.StringIO()
    await _run(engine, PlainProgress(cold, cacheable=cacheable, clock=FakeClock()))
    await _run(engine, PlainProgress(warm, cacheable=cacheable, clock=FakeClock()))
    cold_lines = sorted(cold.getvalue().splitlines())
    assert len(cold_lines) == 4
    assert any(" ran     process  echo a (" in line for line in cold_lines)
    assert any(" ran     rule     shout(Word(text='b')) (" in line for line in cold_lines)
    warm_lines = sorted(warm.getvalue().splitlines())
    assert len(warm_lines) == 4
    assert all(line.endswith("(local cache)") for line in warm_lines)
    assert any("cached  process  echo b (local cache)" in line for line in warm_lines)
    assert warm_lines[0].startswith("[    0.")  # elapsed seconds from the fake clock


async def test_a_failure_is_logged_once_where_it_happened() -> None:
    engine = _engine()
    out = io.StringIO()
    async with engine.session(subscribers=[PlainProgress(out)]) as session:
        with pytest.raises(Exception, match="exit code 7"):
            await session.get(Sentence, Outcome(7))
    failures = [line for line in out.getvalue().splitlines() if "FAILED" in line]
    # The Process failed; doom and doom_twice only passed its error on.
    assert len(failures) == 1
    assert "FAILED  process  die" in failures[0]


async def test_verbose_plain_progress_logs_every_node() -> None:
    engine = _engine()
    quiet, verbose = io.StringIO(), io.StringIO()
    await _run(engine, PlainProgress(quiet), PlainProgress(verbose, verbose=True))
    assert len(verbose.getvalue().splitlines()) > len(quiet.getvalue().splitlines())
    assert "echo_all(Sentence(words=('a', 'b')))" in verbose.getvalue()


# ----------------------------------------------------------------------------------------------
# The live display, rendered through rich's console recording


def _unit(kind: str, node_id: int, name: str, description: str, **extra: Any) -> Workunit:
    return Workunit(kind, node_id, name, description, extra.pop("parent_id", None), 0.0, **extra)


def test_the_live_display_renders_running_nodes_counts_and_cache_hits() -> None:
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True)
    clock = FakeClock()
    display = RichProgress(console, title="ingest", clock=clock)
    root = "app.ingest"
    display(_unit("start", 1, root, f"{root}(Batch=Batch(n=3))"))
    display(_unit("start", 2, "app.thumb", "app.thumb(Image=Image(path='a.jpg'))", parent_id=1))
    display(
        _unit(
            "start",
            3,
            RUN_PROCESS,
            "run_process(...)",
            parent_id=2,
            metadata={"description": "resize a.jpg to 64px"},
        )
    )
    display(_unit("start", 4, "app.thumb", "app.thumb(Image=Image(path='b.jpg'))", parent_id=1))
    display(_unit("start", 5, "app.meta", "app.meta(Image=Image(path='b.jpg'))", parent_id=1))
    display(_unit("end", 5, "app.meta", "", outcome="success", cache="local_cache"))
    console.print(display.render())
    text = console.export_text()
    assert "ingest  1/5 nodes done, 1 from cache" in text
    assert "process resize a.jpg to 64px" in text
    assert "rule    thumb(Image(path='b.jpg'))" in text
    # Nodes waiting for a running child are not listed: the work is below them.
    assert "thumb(Image(path='a.jpg'))" not in text
    assert "ingest(" not in text
    assert "meta(" not in text  # finished
    lines = [line for line in text.splitlines() if line.strip()]
    assert "resize a.jpg" in lines[1]  # processes first


def test_the_live_display_prints_a_failure_once_and_counts_it() -> None:
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True)
    display = RichProgress(console, title="t", clock=FakeClock())
    display(_unit("start", 1, "app.outer", "app.outer()"))
    display(_unit("start", 2, "app.inner", "app.inner(X=X(1))", parent_id=1))
    display(_unit("end", 2, "app.inner", "app.inner(X=X(1))", parent_id=1, outcome="failure"))
    display(_unit("end", 1, "app.outer", "app.outer()", outcome="failure"))
    console.print(display.render())
    text = console.export_text()
    assert text.count("FAILED") == 1
    assert "FAILED rule     inner(X(1))" in text
    assert "2/2 nodes done, 2 failed" in text


async def test_the_live_display_runs_during_a_real_session() -> None:
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=True)
    engine = _engine()
    display = RichProgress(console, title="echo", cacheable=cacheable_rule_names(engine))
    with display.live():
        await _run(engine, display)
    console.print(display.render())
    text = console.export_text()
    assert "echo  " in text
    assert "nodes done" in text
    assert display._running == {}  # every started node ended


# ----------------------------------------------------------------------------------------------
# The trace


async def test_the_trace_has_one_complete_event_per_node_with_its_cache_outcome(
    tmp_path: Any,
) -> None:
    engine = _engine()
    cacheable = cacheable_rule_names(engine)
    await _run(engine)  # fill the cache: the traced run is a warm one, with a new word
    events: list[Workunit] = []
    trace = TraceRecorder(cacheable=cacheable)
    await _run(engine, trace, events.append, words=("a", "b", "c"))
    path = trace.write(tmp_path / "sub" / "trace.json")

    document = json.loads(path.read_text())
    complete = [e for e in document["traceEvents"] if e["ph"] == "X"]
    ends = [u for u in events if u.kind == "end"]
    assert len(complete) == len(ends) == len(trace)
    assert sorted(e["args"]["node_id"] for e in complete) == sorted(u.node_id for u in ends)
    by_name = {e["name"]: e for e in complete}
    assert by_name["echo a"]["args"]["cache"] == "local_cache"
    assert by_name["echo c"]["args"]["cache"] == "miss"
    assert by_name["echo c"]["args"]["process"]["source"] == "ran"
    assert by_name["echo c"]["cat"] == "process"
    assert by_name["echo_all(Sentence(words=('a', 'b', 'c')))"]["args"]["cache"] is None
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in complete)
    lanes = {e["tid"] for e in complete}
    named = {e["tid"] for e in document["traceEvents"] if e.get("name") == "thread_name"}
    assert lanes == named
    _assert_properly_nested(complete)
    # Parents are known (from the start events) and a child shares its parent's lane.
    lane_of = {e["args"]["node_id"]: e["tid"] for e in complete}
    parents = {e["args"]["node_id"]: e["args"].get("parent_id") for e in complete}
    assert sum(p is not None for p in parents.values()) == len(complete) - 1
    assert any(lane_of[n] == lane_of[p] for n, p in parents.items() if p is not None)


def _assert_properly_nested(events: list[dict[str, Any]]) -> None:
    """Within a lane, any two events are disjoint or one contains the other."""
    by_lane: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for event in events:
        by_lane[event["tid"]].append((event["ts"], event["ts"] + event["dur"]))
    for spans in by_lane.values():
        for a_start, a_end in spans:
            for b_start, b_end in spans:
                disjoint = a_end <= b_start or b_end <= a_start
                nested = (a_start <= b_start and b_end <= a_end) or (
                    b_start <= a_start and a_end <= b_end
                )
                assert disjoint or nested


def test_lanes_keep_nested_children_with_their_parent() -> None:
    trace = TraceRecorder()
    # parent [0, 10]; child 1 [1, 5] nests in it; child 2 [3, 8] overlaps child 1 partially;
    # grandchild [3.5, 4] of child 2 nests in child 2; a later node [6, 7] fits child 1's lane.
    for node_id, parent, start, end in [
        (1, None, 0.0, 10.0),
        (2, 1, 1.0, 5.0),
        (3, 1, 3.0, 8.0),
        (4, 3, 3.5, 4.0),
        (5, 1, 6.0, 7.0),
    ]:
        trace(Workunit("end", node_id, f"n{node_id}", "", parent, end, "success", end - start))
    lane = {e["args"]["node_id"]: e["tid"] for e in trace.trace_events() if e["ph"] == "X"}
    assert lane[1] == lane[2] == lane[5]
    assert lane[3] == lane[4] != lane[1]
    _assert_properly_nested([e for e in trace.trace_events() if e["ph"] == "X"])


def test_an_empty_trace_is_still_a_valid_document() -> None:
    assert TraceRecorder().to_json() == {"traceEvents": [], "displayTimeUnit": "ms"}
