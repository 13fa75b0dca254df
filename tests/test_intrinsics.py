"""Rules reaching the store and process execution through Get, end to end through an Engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from rulework import (
    AddPrefix,
    CreateDigest,
    Digest,
    DigestContents,
    Engine,
    FallibleProcessResult,
    FileContent,
    Get,
    MergeDigests,
    MultiGet,
    PathGlobs,
    Process,
    ProcessExecutionFailure,
    ProcessResult,
    QueryRule,
    Snapshot,
    rule,
)


@dataclass(frozen=True)
class Sources:
    globs: tuple[str, ...]


@dataclass(frozen=True)
class Listing:
    files: tuple[str, ...]
    contents: tuple[bytes, ...]


@rule
async def list_sources(sources: Sources) -> Listing:
    snapshot = await Get(Snapshot, PathGlobs(sources.globs))
    contents = await Get(DigestContents, Digest, snapshot.digest)
    return Listing(snapshot.files, tuple(fc.content for fc in contents))


async def test_a_rule_snapshots_globs_under_the_engine_root(tmp_path: Path) -> None:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("a = 1\n")
    (tmp_path / "src" / "pkg" / "b.py").write_text("b = 2\n")
    (tmp_path / "src" / "pkg" / "skip.txt").write_text("no\n")
    engine = Engine([list_sources, QueryRule(Listing, (Sources,))], root=tmp_path)
    async with engine.session() as session:
        listing = await session.get(Listing, Sources(("src/**/*.py", "!src/pkg/skip*")))
    assert listing.files == ("src/a.py", "src/pkg/b.py")
    assert listing.contents == (b"a = 1\n", b"b = 2\n")


@dataclass(frozen=True)
class Bundle:
    name: str


@dataclass(frozen=True)
class BundleFiles:
    paths: tuple[str, ...]
    texts: tuple[str, ...]


@rule
async def build_bundle(bundle: Bundle) -> BundleFiles:
    one, two = await MultiGet(
        Get(Digest, CreateDigest([FileContent("one.txt", b"1")])),
        Get(Digest, CreateDigest([FileContent("two.txt", b"2", is_executable=True)])),
    )
    merged = await Get(Digest, MergeDigests([one, two]))
    prefixed = await Get(Digest, AddPrefix(merged, bundle.name))
    contents = await Get(DigestContents, Digest, prefixed)
    return BundleFiles(
        tuple(fc.path for fc in contents), tuple(fc.content.decode() for fc in contents)
    )


async def test_digest_intrinsics_compose_inside_a_rule() -> None:
    engine = Engine([build_bundle, QueryRule(BundleFiles, (Bundle,))])
    async with engine.session() as session:
        files = await session.get(BundleFiles, Bundle("out"))
    assert files == BundleFiles(("out/one.txt", "out/two.txt"), ("1", "2"))


@dataclass(frozen=True)
class Shout:
    text: str


@dataclass(frozen=True)
class Shouted:
    stdout: str
    output: str
    source: str


@rule
async def shout(request: Shout) -> Shouted:
    inputs = await Get(Digest, CreateDigest([FileContent("in.txt", request.text.encode())]))
    result = await Get(
        ProcessResult,
        Process(
            argv=("/bin/sh", "-c", "tr a-z A-Z < in.txt > out.txt; echo done"),
            description=f"shout {request.text}",
            input_digest=inputs,
            output_files=("out.txt",),
        ),
    )
    contents = await Get(DigestContents, Digest, result.output_digest)
    return Shouted(result.stdout.decode(), contents[0].content.decode(), result.metadata.source)


async def test_a_process_runs_once_and_is_then_served_from_the_local_cache() -> None:
    engine = Engine([shout, QueryRule(Shouted, (Shout,))])
    async with engine.session() as session:
        first = await session.get(Shouted, Shout("hello"))
    assert first == Shouted("done\n", "HELLO", "ran")
    async with engine.session() as session:
        second = await session.get(Shouted, Shout("hello"))
        assert session.statistics().cache_hits == {"local_cache": 1}
    assert second == Shouted("done\n", "HELLO", "local_cache")


@dataclass(frozen=True)
class Attempt:
    code: int


@dataclass(frozen=True)
class Outcome:
    exit_code: int


def _failing(code: int) -> Process:
    return Process(
        argv=("/bin/sh", "-c", f"echo 'something broke' >&2; exit {code}"),
        description=f"fail with {code}",
    )


@rule
async def fallible(attempt: Attempt) -> Outcome:
    result = await Get(FallibleProcessResult, Process, _failing(attempt.code))
    return Outcome(result.exit_code)


@dataclass(frozen=True)
class Strict:
    code: int


@rule
async def strict(attempt: Strict) -> Outcome:
    await Get(ProcessResult, Process, _failing(attempt.code))
    return Outcome(0)


async def test_fallible_results_report_the_exit_code_and_strict_ones_raise() -> None:
    engine = Engine(
        [fallible, strict, QueryRule(Outcome, (Attempt,)), QueryRule(Outcome, (Strict,))]
    )
    async with engine.session() as session:
        assert await session.get(Outcome, Attempt(3)) == Outcome(3)
        with pytest.raises(ProcessExecutionFailure) as info:
            await session.get(Outcome, Strict(4))
    assert info.value.exit_code == 4
    assert "something broke" in str(info.value)
    assert "fail with 4" in str(info.value)


@dataclass(frozen=True)
class Where:
    pass


@dataclass(frozen=True)
class Ran:
    environment: str
    marker: str


@rule
async def where(_: Where) -> Ran:
    result = await Get(
        ProcessResult,
        Process(argv=("/bin/sh", "-c", 'printf %s "$MARKER"'), description="where am I"),
    )
    return Ran(result.metadata.environment, result.stdout.decode())


def test_switching_the_default_environment_in_config_moves_execution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARKER", "from-the-host")
    config = tmp_path / "rulework.toml"
    config.write_text(
        """
[execution]
default_environment = "plain"

[environments.plain]
kind = "local"

[environments.marked]
kind = "local"
inherit_env = ["MARKER"]
"""
    )
    rules = [where, QueryRule(Ran, (Where,))]
    assert Engine(rules, config=config).run(Ran, Where()) == Ran("plain", "")
    config.write_text(config.read_text().replace('= "plain"', '= "marked"', 1))
    assert Engine(rules, config=config).run(Ran, Where()) == Ran("marked", "from-the-host")
