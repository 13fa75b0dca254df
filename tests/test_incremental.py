"""Incremental re-runs in a long-lived session: invalidation, lazy refresh, early cutoff."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import trio

from rulework import (
    Digest,
    DigestContents,
    Engine,
    Get,
    MultiGet,
    PathGlobs,
    QueryRule,
    Snapshot,
    rule,
)

runs: Counter[str] = Counter()


@dataclass(frozen=True)
class SourceFile:
    path: str


@dataclass(frozen=True)
class LineCount:
    path: str
    lines: int


@dataclass(frozen=True)
class Parity:
    path: str
    even: bool


@dataclass(frozen=True)
class Project:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Report:
    even_files: int
    total_lines: int


@rule
async def count_lines(source: SourceFile) -> LineCount:
    runs["count_lines"] += 1
    snapshot = await Get(Snapshot, PathGlobs([source.path]))
    contents = await Get(DigestContents, Digest, snapshot.digest)
    lines = sum(fc.content.count(b"\n") for fc in contents)
    return LineCount(source.path, lines)


@rule
async def parity(source: SourceFile) -> Parity:
    runs["parity"] += 1
    count = await Get(LineCount, SourceFile, source)
    return Parity(source.path, count.lines % 2 == 0)


@rule
async def report(project: Project) -> Report:
    runs["report"] += 1
    parities = await MultiGet(Get(Parity, SourceFile(p)) for p in project.paths)
    counts = await MultiGet(Get(LineCount, SourceFile(p)) for p in project.paths)
    return Report(sum(p.even for p in parities), sum(c.lines for c in counts))


def make_tree(root: Path, n: int) -> tuple[str, ...]:
    paths = []
    for i in range(n):
        rel = f"pkg{i % 10}/f{i}.txt"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n" * (i % 3))
        paths.append(rel)
    return tuple(paths)


def engine(root: Path) -> Engine:
    return Engine([count_lines, parity, report, QueryRule(Report, (Project,))], root=root)


async def test_changing_one_of_250_files_reruns_only_its_path(tmp_path: Path) -> None:
    # 250 files x (snapshot, contents, count, parity) + report = 1,001 nodes.
    paths = make_tree(tmp_path, 250)
    e = engine(tmp_path)
    async with e.session() as s:
        first = await s.get(Report, Project(paths))
        assert s.statistics().nodes_completed >= 1000
        runs.clear()
        (tmp_path / paths[4]).write_text("x\n" * 7)  # 1 line -> 7 lines: odd stays odd
        dirtied = s.invalidate_paths([paths[4]])
        # The snapshot, and what used it: count_lines, parity, report. DigestContents is keyed
        # by the digest value, so the new content is a new node rather than a dirty one.
        assert dirtied == 4
        second = await s.get(Report, Project(paths))
        assert second.total_lines == first.total_lines + 6
        assert second.even_files == first.even_files  # parity re-ran, same value
        assert runs == {"count_lines": 1, "parity": 1, "report": 1}
        stats = s.statistics()
        assert stats.nodes_rerun == 4


async def test_an_unchanged_intermediate_value_stops_the_propagation(tmp_path: Path) -> None:
    paths = make_tree(tmp_path, 20)
    e = engine(tmp_path)
    async with e.session() as s:
        await s.get(Report, Project(paths))
        runs.clear()
        # Same content, new mtime: the snapshot is re-taken but its digest is unchanged.
        (tmp_path / paths[3]).write_text((tmp_path / paths[3]).read_text())
        s.invalidate_paths([paths[3]])
        await s.get(Report, Project(paths))
        assert runs == {}
        assert s.statistics().nodes_rerun == 1  # only the snapshot itself


async def test_a_deleted_then_recreated_file(tmp_path: Path) -> None:
    paths = make_tree(tmp_path, 5)
    e = engine(tmp_path)
    async with e.session() as s:
        before = await s.get(Report, Project(paths))
        (tmp_path / paths[2]).unlink()
        s.invalidate_paths([paths[2]])
        gone = await s.get(Report, Project(paths))
        assert gone.total_lines == before.total_lines - 2
        (tmp_path / paths[2]).write_text("x\nx\n")
        s.invalidate_paths([paths[2]])
        assert await s.get(Report, Project(paths)) == before


async def test_a_new_file_matching_a_recursive_glob_invalidates_it(tmp_path: Path) -> None:
    make_tree(tmp_path, 3)
    e = engine(tmp_path)
    async with e.session() as s:
        assert (await s.get(Report, Project(("pkg*/**/*.txt",)))).total_lines == 0 + 1 + 2
        (tmp_path / "pkg7" / "deep").mkdir(parents=True)
        (tmp_path / "pkg7" / "deep" / "new.txt").write_text("a\nb\nc\n")
        assert s.invalidate_paths(["pkg7/deep/new.txt"]) > 0
        assert (await s.get(Report, Project(("pkg*/**/*.txt",)))).total_lines == 6
        # A path no glob can match dirties nothing.
        assert s.invalidate_paths(["elsewhere/file.py"]) == 0


async def test_garbage_collection_forgets_nodes_no_longer_used(tmp_path: Path) -> None:
    paths = make_tree(tmp_path, 10)
    e = engine(tmp_path)
    async with e.session() as s:
        await s.get(Report, Project(paths))
        assert s.collect_garbage() == 0  # everything was used by the request since
        await s.get(Report, Project(paths[:2]))
        # Only the first 2 files' nodes were used since: the other 8 files' are forgotten.
        assert s.collect_garbage() > 8 * 3
        runs.clear()
        await s.get(Report, Project(paths[:2]))
        assert runs == {}  # what the last request used was kept
        await s.get(Report, Project(paths[2:4]))
        assert runs["count_lines"] == 2  # forgotten nodes are computed again


async def test_watch_reruns_once_for_a_burst_of_changes(tmp_path: Path) -> None:
    paths = make_tree(tmp_path, 100)
    e = engine(tmp_path)
    results: list[object] = []
    got_result = trio.Event()

    def on_result(result: object) -> None:
        results.append(result)
        got_result.set()

    async with e.session() as s, trio.open_nursery() as nursery:
        ready = trio.Event()
        nursery.start_soon(
            functools.partial(
                s.watch,
                Report,
                Project(paths),
                on_result=on_result,
                debounce_ms=3000,
                step_ms=300,
                ready=ready,
            )
        )
        await ready.wait()
        got_result = trio.Event()
        runs.clear()
        for p in paths:  # a burst of 100 events
            (tmp_path / p).write_text("y\n" * 4)
        with trio.fail_after(20):
            await got_result.wait()
        nursery.cancel_scope.cancel()
    first, second = results
    assert first.iteration == 0 and first.error is None  # type: ignore[attr-defined]
    assert second.value == Report(even_files=100, total_lines=400)  # type: ignore[attr-defined]
    assert len(second.changed) == 100  # type: ignore[attr-defined]
    assert runs["report"] == 1
