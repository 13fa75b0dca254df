"""Persisted rule results: exactly the expected misses after each kind of edit, type-safe keys,
no persisted errors, blobs kept with entries, uncacheable rules, and `explain`.

Rules live in modules written to a temporary directory, edited on disk and re-imported; every
run builds a fresh Engine over the same sqlite cache (the test's own cache directory).
Executions are counted from workunits: a node that ran (not served from a cache).
"""

from __future__ import annotations

import importlib
import math
import os
import struct
import subprocess
import sys
import textwrap
import types
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rulework import Digest, Engine, RuleDefinitionError, Workunit
from rulework.backends.sqlite import SqliteCache, SqliteCacheConfig
from rulework.engine.persist import (
    KEY_SCHEMA,
    ExplainReport,
    KeyChange,
    PersistWarning,
    explain,
    persisted_key,
)


class Modules:
    """Write modules into a temporary directory on sys.path and (re)import them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loaded: list[str] = []
        self._clock = 1_000_000_000

    def load(self, name: str, source: str) -> types.ModuleType:
        path = self.root / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        # A distinct mtime for every version, so no stale bytecode or source cache is used.
        self._clock += 10
        os.utime(path, (self._clock, self._clock))
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        self.loaded.append(name)
        return importlib.import_module(name)


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Modules]:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    found = Modules(tmp_path)
    yield found
    for name in found.loaded:
        sys.modules.pop(name, None)


def make_engine(module: types.ModuleType, *, salt: str = "") -> Engine:
    return Engine(module.rules(), config={"cache": {"local": "sqlite", "salt": salt}})


async def run(
    module: types.ModuleType, output: type, *params: object, salt: str = ""
) -> tuple[Any, Counter[str]]:
    """Run a request in a new Engine; returns the value and how many nodes of each rule ran."""
    executed: Counter[str] = Counter()

    def on_event(unit: Workunit) -> None:
        if unit.kind == "end" and unit.outcome in ("success", "failure") and unit.cache is None:
            executed[unit.name.rpartition(".")[2]] += 1

    engine = make_engine(module, salt=salt)
    async with engine.session(subscribers=[on_event]) as session:
        value = await session.get(output, *params)
    return value, executed


PIPELINE = '''
    from dataclasses import dataclass
    from rulework import Get, MultiGet, QueryRule, collect_rules, rule

    OFFSET = 1

    @dataclass(frozen=True)
    class Req:
        n: int

    @dataclass(frozen=True)
    class Part:
        v: int

    @dataclass(frozen=True)
    class Total:
        v: int

    def scale(x):
        return x * 2

    @rule(persist=True)
    async def part(req: Req) -> Part:
        """One part."""
        return Part(scale(req.n))

    @rule(persist=True, version="1")
    async def total(req: Req) -> Total:
        parts = await MultiGet(Get(Part, Req, Req(i)) for i in range(req.n))
        return Total(sum(p.v for p in parts) + OFFSET)

    def rules():
        return [*collect_rules(), QueryRule(Total, (Req,))]
'''


async def baseline(modules: Modules, name: str) -> str:
    source = textwrap.dedent(PIPELINE)
    module = modules.load(name, source)
    value, executed = await run(module, module.Total, module.Req(3))
    assert value == module.Total(0 + 2 + 4 + 1)
    assert executed == {"total": 1, "part": 3}
    # A new Engine (and session) is served from the cache: the root hits, nothing runs.
    value, executed = await run(module, module.Total, module.Req(3))
    assert value == module.Total(7)
    assert executed == {}
    return source


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda s: (
                s.replace('"""One part."""', '"""One part, edited."""  # a comment')
                .replace("return Part(scale(req.n))", "return Part(  scale( req.n )  )")
                .replace("OFFSET = 1", "# the offset\nOFFSET = 1")
            ),
            {},
            id="comment-docstring-formatting",
        ),
        pytest.param(
            lambda s: s.replace("return Part(scale(req.n))", "return Part(scale(req.n) + 1)"),
            {"total": 1, "part": 3},
            id="helper-rule-body",
        ),
        pytest.param(
            lambda s: s.replace("return x * 2", "return x * 3"),
            {"total": 1, "part": 3},
            id="plain-helper-function",
        ),
        pytest.param(
            lambda s: s.replace("OFFSET = 1", "OFFSET = 2"),
            {"total": 1},
            id="constant-read-by-the-root",
        ),
        pytest.param(
            lambda s: s.replace('version="1"', 'version="2"'),
            {"total": 1},
            id="version",
        ),
    ],
)
async def test_each_edit_causes_exactly_the_expected_misses(
    modules: Modules, edit: Any, expected: dict[str, int]
) -> None:
    source = await baseline(modules, "persist_edit")
    module = modules.load("persist_edit", edit(source))
    _, executed = await run(module, module.Total, module.Req(3))
    assert executed == expected
    # And the new results are stored: the next run is all hits.
    _, executed = await run(module, module.Total, module.Req(3))
    assert executed == {}


async def test_a_new_param_value_misses_only_where_it_is_consumed(modules: Modules) -> None:
    await baseline(modules, "persist_param")
    module = sys.modules["persist_param"]
    value, executed = await run(module, module.Total, module.Req(4))
    # Req(4) is new for `total` and for one `part`; parts 0..2 are served from the cache.
    assert value == module.Total(0 + 2 + 4 + 6 + 1)
    assert executed == {"total": 1, "part": 1}


async def test_changing_the_salt_misses_everywhere(modules: Modules) -> None:
    await baseline(modules, "persist_salt")
    module = sys.modules["persist_salt"]
    _, executed = await run(module, module.Total, module.Req(3), salt="fresh start")
    assert executed == {"total": 1, "part": 3}
    _, executed = await run(module, module.Total, module.Req(3), salt="fresh start")
    assert executed == {}


BOXES = """
    from dataclasses import dataclass
    from rulework import QueryRule, collect_rules, rule

    @dataclass(frozen=True)
    class Box:
        value: object

    @dataclass(frozen=True)
    class Shown:
        text: str

    @rule(persist=True)
    async def show(box: Box) -> Shown:
        return Shown(f"{type(box.value).__name__}:{box.value!r}")

    def rules():
        return [*collect_rules(), QueryRule(Shown, (Box,))]
"""


async def test_values_differing_only_in_type_never_share_a_key(modules: Modules) -> None:
    module = modules.load("persist_types", BOXES)
    values: list[object] = [1, "1", b"1", True, 1.0, (1,), frozenset({1})]
    expected = [f"{type(v).__name__}:{v!r}" for v in values]
    for value, text in zip(values, expected, strict=True):
        # One session each: the point is the persisted key, not the session's memo.
        shown, executed = await run(module, module.Shown, module.Box(value))
        assert shown == module.Shown(text)
        assert executed == {"show": 1}, f"{value!r} was served another value's result"
    for value, text in zip(values, expected, strict=True):
        shown, executed = await run(module, module.Shown, module.Box(value))
        assert (shown, executed) == (module.Shown(text), {})


@dataclass(frozen=True)
class Holder:
    value: object


def canonical(value: object) -> object:
    """Strict identity of a generated value: types all the way down, floats by their bits
    (every NaN alike, -0.0 apart from 0.0), sets by their members' identities."""
    kind = type(value).__name__
    if isinstance(value, float):
        return (kind, b"nan" if math.isnan(value) else struct.pack(">d", value))
    if isinstance(value, tuple):
        return (kind, tuple(canonical(v) for v in value))
    if isinstance(value, frozenset):
        return (kind, tuple(sorted((canonical(v) for v in value), key=repr)))
    return (kind, value)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3) | st.tuples(inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=2, max_size=6))
def test_distinct_generated_values_give_distinct_keys(items: list[object]) -> None:
    def key(value: object) -> str:
        return persisted_key(
            salt="s",
            rule_id="pkg.rule",
            code="c" * 64,
            version=None,
            params=[(Holder, Holder(value))],
        )

    by_identity: dict[object, str] = {}
    for item in items:
        identity = canonical(item)
        found = by_identity.setdefault(identity, key(item))
        assert found == key(item)  # stable
    # Distinct values, distinct keys.
    assert len(set(by_identity.values())) == len(by_identity)


def test_every_part_of_the_key_counts() -> None:
    base: dict[str, Any] = {
        "salt": "",
        "rule_id": "m.r",
        "code": "a" * 64,
        "version": None,
        "params": [(Holder, Holder(1))],
    }
    key = persisted_key(**base)
    for change in (
        {"salt": "x"},
        {"rule_id": "m.s"},
        {"code": "b" * 64},
        {"version": "1"},
        {"version": ""},
        {"params": [(Holder, Holder(2))]},
        {"params": [(Digest, Holder(1))]},
        {"params": []},
        {"environment": "e" * 64},
    ):
        assert persisted_key(**{**base, **change}) != key, change


async def test_errors_are_never_persisted(modules: Modules, tmp_path: Path) -> None:
    module = modules.load(
        "persist_errors",
        """
        from dataclasses import dataclass
        from pathlib import Path
        from rulework import QueryRule, collect_rules, rule

        @dataclass(frozen=True)
        class Flag:
            path: str

        @dataclass(frozen=True)
        class Checked:
            text: str

        @rule(persist=True)
        async def check(flag: Flag) -> Checked:
            text = Path(flag.path).read_text()
            if text == "fail":
                raise ValueError("the flag says fail")
            return Checked(text)

        def rules():
            return [*collect_rules(), QueryRule(Checked, (Flag,))]
        """,
    )
    flag = tmp_path / "flag.txt"
    flag.write_text("fail")
    for _ in range(2):  # the failure is not replayed from the cache: the rule runs again
        with pytest.raises(ValueError, match="the flag says fail"):
            await run(module, module.Checked, module.Flag(str(flag)))
    with pytest.raises(ValueError) as info:
        await explain(make_engine(module), module.Checked, module.Flag(str(flag)))
    # explain attaches what it saw before the failure: no result was ever recorded.
    assert "no previous run recorded" in "\n".join(info.value.__notes__)
    flag.write_text("fine")
    value, executed = await run(module, module.Checked, module.Flag(str(flag)))
    assert (value, executed) == (module.Checked("fine"), {"check": 1})
    flag.write_text("fail")  # the success is now stored: the rule does not run
    value, executed = await run(module, module.Checked, module.Flag(str(flag)))
    assert (value, executed) == (module.Checked("fine"), {})


FILES = """
    from dataclasses import dataclass
    from rulework import (
        CreateDigest, Digest, DigestContents, FileContent, Get, QueryRule, Snapshot,
        collect_rules, rule,
    )

    @dataclass(frozen=True)
    class Make:
        text: str

    @dataclass(frozen=True)
    class Made:
        snapshot: Snapshot

    @dataclass(frozen=True)
    class Read:
        text: str

    @rule(persist=True)
    async def make(request: Make) -> Made:
        digest = await Get(Digest, CreateDigest([FileContent("out/a.txt", request.text.encode())]))
        return Made(await Get(Snapshot, Digest, digest))

    @rule
    async def read(request: Make) -> Read:
        made = await Get(Made, Make, request)
        contents = await Get(DigestContents, Digest, made.snapshot.digest)
        return Read(contents[0].content.decode())

    def rules():
        return [*collect_rules(), QueryRule(Read, (Make,))]
"""


async def test_a_result_whose_blobs_are_gone_is_a_miss(modules: Modules) -> None:
    module = modules.load("persist_blobs", FILES)
    text = "content that lives in the store"
    value, executed = await run(module, module.Read, module.Make(text))
    assert (value, executed["make"]) == (module.Read(text), 1)
    value, executed = await run(module, module.Read, module.Make(text))
    assert (value, executed["make"]) == (module.Read(text), 0)
    # Evict the file's blob from the sqlite cache: the stored result refers to it.
    cache = SqliteCache(SqliteCacheConfig(), Path(make_engine(module).config.cache.dir) / "sqlite")
    await cache.open()
    try:
        blob = Digest.of_bytes(text.encode())
        assert not await cache.find_missing_blobs([blob])
        await cache.evict([blob])
        assert await cache.find_missing_blobs([blob])
    finally:
        await cache.aclose()
    value, executed = await run(module, module.Read, module.Make(text))
    assert (value, executed["make"]) == (module.Read(text), 1)
    value, executed = await run(module, module.Read, module.Make(text))
    assert (value, executed["make"]) == (module.Read(text), 0)


async def test_a_rule_reading_an_unfingerprintable_global_is_uncacheable(
    modules: Modules,
) -> None:
    source = """
        import threading
        from dataclasses import dataclass
        from rulework import QueryRule, collect_rules, rule

        LOCK = threading.Lock()

        @dataclass(frozen=True)
        class Job:
            n: int

        @dataclass(frozen=True)
        class Done:
            n: int

        @rule(persist=True)
        async def guarded(job: Job) -> Done:
            with LOCK:
                return Done(job.n)

        def rules():
            return [*collect_rules(), QueryRule(Done, (Job,))]
    """
    module = modules.load("persist_lock", source)
    with pytest.warns(PersistWarning, match="`LOCK`") as caught:
        engine = make_engine(module)
    assert "persist_lock.guarded" in str(caught[0].message)
    assert "runs every time" in str(caught[0].message)
    for _ in range(2):
        _, executed = await run(module, module.Done, module.Job(1))
        assert executed == {"guarded": 1}
    report = await explain(engine, module.Done, module.Job(1))
    (node,) = report.nodes
    assert node.outcome == "uncacheable"
    assert node.reason is not None and "`LOCK`" in node.reason
    assert "uncacheable" in report.render()


async def test_output_types_that_cannot_be_stored_fail_at_engine_build(modules: Modules) -> None:
    module = modules.load(
        "persist_badout",
        """
        from dataclasses import dataclass
        from typing import Callable
        from rulework import QueryRule, collect_rules, rule

        @dataclass(frozen=True)
        class Job:
            n: int

        @dataclass(frozen=True)
        class WithCallback:
            callback: Callable[[int], int]

        @rule(persist=True)
        async def make(job: Job) -> WithCallback:
            return WithCallback(lambda x: x)

        def rules():
            return [*collect_rules(), QueryRule(WithCallback, (Job,))]
        """,
    )
    with pytest.raises(RuleDefinitionError) as info:
        make_engine(module)
    message = str(info.value)
    assert "persist_badout.make" in message
    assert "persist_badout.WithCallback" in message
    assert "persist=True" in message


async def test_values_that_do_not_survive_the_round_trip_are_not_stored(
    modules: Modules,
) -> None:
    module = modules.load(
        "persist_roundtrip",
        """
        from dataclasses import dataclass
        from typing import Any
        from rulework import QueryRule, collect_rules, rule

        @dataclass(frozen=True)
        class Job:
            n: int

        @dataclass(frozen=True)
        class Inner:
            n: int

        @dataclass(frozen=True)
        class Loose:
            payload: Any

        @rule(persist=True)
        async def make(job: Job) -> Loose:
            return Loose(Inner(job.n) if job.n else "plain")

        def rules():
            return [*collect_rules(), QueryRule(Loose, (Job,))]
        """,
    )
    # An `Any` field holding a dataclass would come back as a dict: never stored.
    with pytest.warns(PersistWarning, match="round trip"):
        await run(module, module.Loose, module.Job(1))
    value, executed = await run(module, module.Loose, module.Job(1))
    assert (value, executed) == (module.Loose(module.Inner(1)), {"make": 1})
    # A str in the same field survives, so it is stored.
    await run(module, module.Loose, module.Job(0))
    value, executed = await run(module, module.Loose, module.Job(0))
    assert (value, executed) == (module.Loose("plain"), {})


async def test_explain_names_the_part_of_the_key_that_changed(modules: Modules) -> None:
    source = textwrap.dedent(PIPELINE)
    module = modules.load("persist_explain", source)
    first = await explain(make_engine(module), module.Total, module.Req(2))
    assert [(n.rule.rpartition(".")[2], n.outcome) for n in first.nodes] == [
        ("total", "miss"),
        ("part", "miss"),
        ("part", "miss"),
    ]
    assert all(n.changes == (KeyChange("no_previous_run"),) for n in first.nodes)

    again = await explain(make_engine(module), module.Total, module.Req(2))
    assert [(n.outcome, n.source) for n in again.nodes] == [("hit", "local_cache")]

    # A constant read by the root rule.
    module = modules.load("persist_explain", source.replace("OFFSET = 1", "OFFSET = 5"))
    report = await explain(make_engine(module), module.Total, module.Req(2))
    root, *parts = report.nodes
    assert root.outcome == "miss"
    assert root.changes == (KeyChange("code", "persist_explain.total", detail="`OFFSET`"),)
    assert [p.outcome for p in parts] == ["hit", "hit"]
    assert "code of rule `persist_explain.total` changed (`OFFSET`)" in report.render()

    # A helper rule's body: the root misses because of the rule it reaches.
    module = modules.load(
        "persist_explain",
        source.replace("OFFSET = 1", "OFFSET = 5").replace(
            "return Part(scale(req.n))", "return Part(scale(req.n) - 1)"
        ),
    )
    report = await explain(make_engine(module), module.Total, module.Req(2))
    assert report.nodes[0].changes == (
        KeyChange("code", "persist_explain.part", detail="its body"),
    )
    assert report.misses == 3

    # The version, the salt and a param.
    module = modules.load(
        "persist_explain",
        source.replace("OFFSET = 1", "OFFSET = 5")
        .replace("return Part(scale(req.n))", "return Part(scale(req.n) - 1)")
        .replace('version="1"', 'version="2"'),
    )
    report = await explain(make_engine(module), module.Total, module.Req(2))
    assert report.nodes[0].changes == (KeyChange("version", "persist_explain.total", "1", "2"),)
    report = await explain(make_engine(module, salt="new"), module.Total, module.Req(2))
    assert report.nodes[0].changes == (KeyChange("salt"),)
    report = await explain(make_engine(module, salt="new"), module.Total, module.Req(3))
    assert report.nodes[0].changes == (
        KeyChange("no_record_for_params"),
        KeyChange("param", "Req", "Req(n=2)", "Req(n=3)"),
    )
    text = report.render()
    assert "param Req changed (Req(n=2) -> Req(n=3))" in text
    assert text.splitlines()[-1] == "4 persisted nodes: 2 hits, 2 misses, 0 uncacheable"


async def test_explain_in_an_open_session(modules: Modules) -> None:
    module = modules.load("persist_session", PIPELINE)
    engine = make_engine(module)
    async with engine.session() as session:
        report = await explain(session, module.Total, module.Req(1))
        assert isinstance(report, ExplainReport)
        assert report.misses == 2
        # Nodes the session computed already are not visited again.
        assert (await explain(session, module.Total, module.Req(1))).nodes == ()


def test_a_new_process_is_served_from_the_cache(modules: Modules, tmp_path: Path) -> None:
    modules.load("persist_proc", PIPELINE)
    cache_dir = tmp_path / "shared-cache"
    script = textwrap.dedent(
        """
        import sys, trio
        sys.path.insert(0, sys.argv[1])
        import persist_proc as m
        from rulework import Engine
        engine = Engine(m.rules(), config={"cache": {"local": "sqlite", "dir": sys.argv[2]}})
        async def main():
            async with engine.session() as session:
                value = await session.get(m.Total, m.Req(3))
                print(value.v, session.statistics().cache_hits.get("local_cache", 0))
        trio.run(main)
        """
    )
    outputs = []
    for seed in ("1", "2"):  # keys must not depend on the hash seed
        env = {**os.environ, "PYTHONHASHSEED": seed, "RULEWORK_CACHE_DIR": str(cache_dir)}
        out = subprocess.run(
            [sys.executable, "-c", script, str(modules.root), str(cache_dir)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        outputs.append(out.stdout.split())
    assert outputs == [["7", "0"], ["7", "1"]]


def test_the_key_schema_names_the_python_version() -> None:
    assert f"py{sys.version_info[0]}.{sys.version_info[1]}" in KEY_SCHEMA


GRAPH = """
    from dataclasses import dataclass
    from rulework import Get, QueryRule, UnionRule, collect_rules, rule, union

    @union
    class Shape:
        pass

    @dataclass(frozen=True)
    class Square:
        side: int

    @dataclass(frozen=True)
    class Area:
        value: int

    @dataclass(frozen=True)
    class Job:
        side: int

    @dataclass(frozen=True)
    class Report:
        area: int

    @dataclass(frozen=True)
    class Countdown:
        n: int

    @dataclass(frozen=True)
    class Sum:
        v: int

    @rule
    async def square_area(shape: Square) -> Area:
        return Area(shape.side * shape.side)

    @rule(persist=True)
    async def report(job: Job) -> Report:
        area = await Get(Area, Shape, Square(job.side))
        return Report(area.value)

    @rule(persist=True)
    async def countdown(c: Countdown) -> Sum:
        if c.n == 0:
            return Sum(0)
        rest = await Get(Sum, Countdown, Countdown(c.n - 1))
        return Sum(rest.v + c.n)

    def rules():
        return [
            *collect_rules(),
            UnionRule(Shape, Square),
            QueryRule(Report, (Job,)),
            QueryRule(Sum, (Countdown,)),
        ]
"""


async def test_union_members_and_recursive_rules_are_part_of_the_code(modules: Modules) -> None:
    source = textwrap.dedent(GRAPH)
    module = modules.load("persist_graph", source)
    assert (await run(module, module.Report, module.Job(3))) == (
        module.Report(9),
        {"report": 1, "square_area": 1},
    )
    assert (await run(module, module.Sum, module.Countdown(3))) == (module.Sum(6), {"countdown": 4})
    assert (await run(module, module.Report, module.Job(3)))[1] == {}
    assert (await run(module, module.Sum, module.Countdown(3)))[1] == {}
    # The union member's rule is reached through the union Get: editing it invalidates.
    module = modules.load(
        "persist_graph", source.replace("shape.side * shape.side", "shape.side * 4")
    )
    assert (await run(module, module.Report, module.Job(3))) == (
        module.Report(12),
        {"report": 1, "square_area": 1},
    )
    assert (await run(module, module.Sum, module.Countdown(3)))[1] == {}
    # A recursive rule reaches itself: editing it invalidates every level.
    module = modules.load(
        "persist_graph",
        source.replace("shape.side * shape.side", "shape.side * 4").replace(
            "rest.v + c.n", "rest.v + 2 * c.n"
        ),
    )
    assert (await run(module, module.Sum, module.Countdown(3))) == (
        module.Sum(12),
        {"countdown": 4},
    )
    assert (await run(module, module.Report, module.Job(3)))[1] == {}


WORKSPACE = """
    from dataclasses import dataclass
    from rulework import (
        Digest, DigestContents, Get, PathGlobs, QueryRule, Snapshot, collect_rules, rule,
    )

    @dataclass(frozen=True)
    class Sources:
        glob: str

    @dataclass(frozen=True)
    class Count:
        lines: int

    @dataclass(frozen=True)
    class Direct:
        glob: str

    @rule(persist=True)
    async def count_lines(snapshot: Snapshot) -> Count:
        contents = await Get(DigestContents, Digest, snapshot.digest)
        return Count(sum(len(f.content.splitlines()) for f in contents))

    @rule
    async def count_sources(sources: Sources) -> Count:
        snapshot = await Get(Snapshot, PathGlobs([sources.glob]))
        return await Get(Count, Snapshot, snapshot)

    @rule(persist=True)
    async def count_directly(direct: Direct) -> Count:
        snapshot = await Get(Snapshot, PathGlobs([direct.glob]))
        return Count(len(snapshot.files))

    def rules():
        return [*collect_rules(), QueryRule(Count, (Sources,)), QueryRule(Count, (Direct,))]
"""


async def test_rules_reading_the_workspace_are_uncacheable_but_their_inputs_can_be(
    modules: Modules, tmp_path: Path
) -> None:
    module = modules.load("persist_workspace", WORKSPACE)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "a.txt").write_text("1\n2\n")

    def engine() -> Engine:
        return Engine(module.rules(), config={"cache": {"local": "sqlite"}}, root=workspace)

    # What a rule reads from the workspace is not in its key: such a rule is never persisted.
    with pytest.warns(PersistWarning, match="reads files from the workspace") as caught:
        engine()
    assert "persist_workspace.count_directly" in str(caught[0].message)

    async def count(request: object) -> tuple[Any, Counter[str]]:
        executed: Counter[str] = Counter()

        def on_event(unit: Workunit) -> None:
            if unit.kind == "end" and unit.outcome == "success" and unit.cache is None:
                executed[unit.name.rpartition(".")[2]] += 1

        async with engine().session(subscribers=[on_event]) as session:
            return await session.get(module.Count, request), executed

    value, executed = await count(module.Direct("*.txt"))
    assert (value, executed["count_directly"]) == (module.Count(1), 1)
    value, executed = await count(module.Direct("*.txt"))
    assert executed["count_directly"] == 1  # ran again
    # The Snapshot, a content-addressed input, is part of the key of the rule consuming it.
    value, executed = await count(module.Sources("*.txt"))
    assert (value, executed["count_lines"]) == (module.Count(2), 1)
    value, executed = await count(module.Sources("*.txt"))
    assert (value, executed["count_lines"]) == (module.Count(2), 0)
    (workspace / "a.txt").write_text("1\n2\n3\n")
    value, executed = await count(module.Sources("*.txt"))
    assert (value, executed["count_lines"]) == (module.Count(3), 1)


PROCESSES = """
    from dataclasses import dataclass
    from rulework import Get, Process, ProcessResult, QueryRule, collect_rules, rule

    @dataclass(frozen=True)
    class Greet:
        name: str

    @dataclass(frozen=True)
    class Greeting:
        text: str

    @rule(persist=True)
    async def greet(request: Greet) -> Greeting:
        result = await Get(
            ProcessResult, Process(("/bin/echo", "hello", request.name), description="greet")
        )
        return Greeting(result.stdout.decode().strip())

    def rules():
        return [*collect_rules(), QueryRule(Greeting, (Greet,))]
"""


async def test_rules_running_processes_are_keyed_by_the_process_environment(
    modules: Modules,
) -> None:
    module = modules.load("persist_process", PROCESSES)
    config = {
        "cache": {"local": "sqlite"},
        "execution": {"default_environment": "here"},
        "environments": {"here": {"kind": "local"}, "there": {"kind": "local"}},
    }

    async def greet(environment: str | None) -> tuple[Any, int]:
        runs = 0

        def on_event(unit: Workunit) -> None:
            nonlocal runs
            if unit.name.endswith(".greet") and unit.kind == "end" and unit.cache is None:
                runs += 1

        engine = Engine(module.rules(), config=config)
        async with engine.session(
            subscribers=[on_event], default_environment=environment
        ) as session:
            return await session.get(module.Greeting, module.Greet("you")), runs

    assert await greet(None) == (module.Greeting("hello you"), 1)
    assert await greet(None) == (module.Greeting("hello you"), 0)
    # Processes would run elsewhere: the persisted result is not reused.
    assert await greet("there") == (module.Greeting("hello you"), 1)
    assert await greet("there") == (module.Greeting("hello you"), 0)
    report = await explain(
        Engine(module.rules(), config=config), module.Greeting, module.Greet("you")
    )
    assert report.nodes[0].outcome == "hit"
    async with Engine(module.rules(), config=config).session(default_environment="there") as s:
        await s.get(module.Greeting, module.Greet("again"))
    report = await explain(
        Engine(module.rules(), config=config), module.Greeting, module.Greet("again")
    )
    assert report.nodes[0].changes == (KeyChange("environment", old="there", new="here"),)
    assert "the process environment changed (there -> here)" in report.render()


RICH = """
    import enum
    from dataclasses import dataclass
    from typing import Literal, Optional
    from rulework import FrozenDict, QueryRule, collect_rules, rule

    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    @dataclass(frozen=True)
    class Inner:
        name: str
        weight: float

    @dataclass(frozen=True)
    class Rich:
        data: bytes
        tags: frozenset[str]
        counts: FrozenDict[str, int]
        maybe: Optional[int]
        color: Color
        mode: Literal["a", "b"]
        items: tuple[Inner, ...]
        pair: tuple[int, str]

    @dataclass(frozen=True)
    class Make:
        n: int

    @rule(persist=True)
    async def make(request: Make) -> Rich:
        return Rich(
            data=bytes(range(request.n)),
            tags=frozenset({"x", "y", "z"}),
            counts=FrozenDict({"b": 2, "a": 1}),
            maybe=None if request.n % 2 else request.n,
            color=Color.BLUE,
            mode="b",
            items=tuple(Inner(f"i{i}", i / 3) for i in range(request.n)),
            pair=(request.n, "n"),
        )

    def rules():
        return [*collect_rules(), QueryRule(Rich, (Make,))]
"""


async def test_rich_values_come_back_from_the_cache_exactly(modules: Modules) -> None:
    module = modules.load("persist_rich", RICH)
    for n in (3, 4):
        first, executed = await run(module, module.Rich, module.Make(n))
        assert executed == {"make": 1}
        again, executed = await run(module, module.Rich, module.Make(n))
        assert executed == {}
        assert again == first
        assert type(again.counts) is type(first.counts)
        assert [type(i.weight) for i in again.items] == [float] * n


async def test_a_persisted_hit_on_an_orphaned_node_completes_unobserved(tmp_path: Path) -> None:
    """Hits are looked up outside the node's cancel scope: a requester that gives up while
    the lookup runs must not break the session, and a later request is still served."""
    from rulework import Engine, QueryRule, rule

    @dataclass(frozen=True)
    class Orphan:
        n: int

    @dataclass(frozen=True)
    class Kept:
        n: int

    @rule(persist=True)
    async def keep(o: Orphan) -> Kept:
        return Kept(o.n * 2)

    engine = Engine(
        [keep, QueryRule(Kept, (Orphan,))], config={"cache": {"dir": str(tmp_path / "c")}}
    )
    assert engine.run(Kept, Orphan(4)) == Kept(8)  # stored
    async with engine.session() as session:
        with trio.move_on_after(0):  # the requester gives up at once
            await session.get(Kept, Orphan(4))
        assert await session.get(Kept, Orphan(4)) == Kept(8)
        assert session.statistics().cache_hits.get("local_cache", 0) >= 1
