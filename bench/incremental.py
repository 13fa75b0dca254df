"""Incremental re-run: a ~10,000-node graph over 1,000 files, one file changed.

Per file: Snapshot -> DigestContents -> LineCount -> 7 derived stages (10 nodes); files are
summed in groups of 10, groups in groups of 10, then one root (10,111 nodes). The full run and
the incremental re-run (after `invalidate_paths` of the one changed file) happen in the same
session, so the comparison is in the same process:

    incremental nodes=N full_s=A rerun_s=B speedup=A/B reran=K expected=E

K counts the rule bodies that ran during the re-run (re-run dirty nodes plus new ones); E is the
true number of affected nodes: the file's snapshot, its new DigestContents node, LineCount, the
7 stages, its group, its super-group and the root.

Usage: python bench/incremental.py
"""

from __future__ import annotations

import tempfile
import time
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

FILES = 1000
STAGES = 7


@dataclass(frozen=True)
class Source:
    path: str


@dataclass(frozen=True)
class Lines:
    path: str
    count: int


@dataclass(frozen=True)
class Stage:
    path: str
    level: int


@dataclass(frozen=True)
class Derived:
    value: int


@dataclass(frozen=True)
class Group:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class SuperGroup:
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class Everything:
    supers: tuple[SuperGroup, ...]


@dataclass(frozen=True)
class Sum:
    value: int


@dataclass(frozen=True)
class GroupSum:
    value: int


@dataclass(frozen=True)
class SuperSum:
    value: int


@rule
async def count(source: Source) -> Lines:
    snapshot = await Get(Snapshot, PathGlobs([source.path]))
    contents = await Get(DigestContents, Digest, snapshot.digest)
    return Lines(source.path, sum(fc.content.count(b"\n") for fc in contents))


@rule
async def stage(s: Stage) -> Derived:
    if s.level == 0:
        lines = await Get(Lines, Source, Source(s.path))
        return Derived(lines.count)
    below = await Get(Derived, Stage, Stage(s.path, s.level - 1))
    return Derived(below.value * 3 + s.level)


@rule
async def group_sum(group: Group) -> GroupSum:
    parts = await MultiGet(Get(Derived, Stage(p, STAGES - 1)) for p in group.paths)
    return GroupSum(sum(d.value for d in parts))


@rule
async def super_sum(sg: SuperGroup) -> SuperSum:
    parts = await MultiGet(Get(GroupSum, Group, g) for g in sg.groups)
    return SuperSum(sum(s.value for s in parts))


@rule
async def total(everything: Everything) -> Sum:
    parts = await MultiGet(Get(SuperSum, SuperGroup, sg) for sg in everything.supers)
    return Sum(sum(s.value for s in parts))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rulework-incremental-") as tmp:
        root = Path(tmp) / "ws"
        paths = []
        for i in range(FILES):
            rel = f"d{i // 100}/f{i}.txt"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x\n" * (i % 5))
            paths.append(rel)
        groups = [Group(tuple(paths[i : i + 10])) for i in range(0, FILES, 10)]
        supers = tuple(SuperGroup(tuple(groups[i : i + 10])) for i in range(0, len(groups), 10))
        request = Everything(supers)
        engine = Engine(
            [count, stage, group_sum, super_sum, total, QueryRule(Sum, (Everything,))],
            root=root,
            config={"cache": {"local": "memory", "dir": str(Path(tmp) / "cache")}},
        )

        async def run() -> None:
            async with engine.session() as session:
                start = time.perf_counter()
                await session.get(Sum, request)
                full = time.perf_counter() - start
                nodes = session.statistics().nodes_started
                (root / paths[123]).write_text("x\n" * 9)
                before = session.statistics()
                start = time.perf_counter()
                session.invalidate_paths([paths[123]])
                await session.get(Sum, request)
                rerun = time.perf_counter() - start
                after = session.statistics()
                reran = (after.nodes_rerun - before.nodes_rerun) + (
                    after.nodes_started - before.nodes_started
                )
                expected = 1 + 1 + 1 + STAGES + 1 + 1 + 1
                print(
                    f"incremental nodes={nodes} full_s={full:.3f} rerun_s={rerun:.4f} "
                    f"speedup={full / rerun:.0f} reran={reran} expected={expected}",
                    flush=True,
                )

        trio.run(run)


if __name__ == "__main__":
    main()
