"""Process, its results, FrozenDict, and the ProcessRunner (environments + process cache)."""

from __future__ import annotations

import logging
import pickle
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from rulework.backends.local import LocalExecutor, LocalExecutorConfig
from rulework.backends.memory import MemoryCache
from rulework.engine.cache import ActionWrite, CacheSource, open_cache_layer
from rulework.engine.errors import (
    CacheError,
    ExecutorError,
    ProcessExecutionFailure,
    ProcessTimeout,
    RuleworkError,
)
from rulework.engine.fingerprint import fingerprint
from rulework.engine.fs import EMPTY_DIGEST, CreateDigest, Digest, FileContent
from rulework.engine.process import (
    FallibleProcessResult,
    FrozenDict,
    Process,
    ProcessCacheScope,
    ProcessResult,
    ProcessResultMetadata,
    ProcessRunner,
    ProcessSpecError,
    ProcessSpecTypeError,
    process_cache_key,
)
from rulework.engine.store import MemoryBlobStore, Store

# --- FrozenDict ---------------------------------------------------------------------------------


def test_frozen_dict_is_an_immutable_hashable_mapping() -> None:
    d = FrozenDict({"b": "2", "a": "1"})
    assert d["a"] == "1" and len(d) == 2 and list(d) == ["b", "a"]
    assert d == {"a": "1", "b": "2"} and d == FrozenDict(a="1", b="2")
    assert hash(d) == hash(FrozenDict([("a", "1"), ("b", "2")]))
    assert d != FrozenDict({"a": "1"})
    assert {d: "usable as a key"}[FrozenDict(b="2", a="1")] == "usable as a key"
    with pytest.raises(TypeError):
        d["c"] = "3"  # type: ignore[index]
    with pytest.raises(AttributeError):
        d._data = {}
    assert "a" in d and "z" not in d
    assert d | {"c": "3"} == {"a": "1", "b": "2", "c": "3"}
    assert isinstance(d | {"c": "3"}, FrozenDict)
    assert pickle.loads(pickle.dumps(d)) == d
    assert repr(FrozenDict(x=1)) == "FrozenDict({'x': 1})"


def test_frozen_dict_with_unhashable_values_is_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(FrozenDict(x=[1]))


# --- Process ------------------------------------------------------------------------------------


def test_process_stores_its_fields_immutably() -> None:
    argv = ["echo", "hi"]
    env = {"B": "2", "A": "1"}
    process = Process(argv, env=env, output_files=["z.txt", "a.txt", "a.txt"])
    argv.append("mutated")
    env["C"] = "3"
    assert process.argv == ("echo", "hi")
    assert isinstance(process.env, FrozenDict) and process.env == {"A": "1", "B": "2"}
    assert list(process.env) == ["A", "B"]
    assert process.output_files == ("a.txt", "z.txt")
    assert process.input_digest == EMPTY_DIGEST
    assert process.cache_scope is ProcessCacheScope.SUCCESSFUL
    assert process.description == "Run echo"
    with pytest.raises(AttributeError):
        process.argv = ("x",)  # type: ignore[misc]


def test_equal_processes_are_equal_hashable_and_fingerprint_alike() -> None:
    one = Process(("cc", "-c", "a.c"), env={"A": "1", "B": "2"}, timeout_seconds=5)
    two = Process(["cc", "-c", "a.c"], env=FrozenDict(B="2", A="1"), timeout_seconds=5.0)
    assert one == two and hash(one) == hash(two)
    assert fingerprint(one) == fingerprint(two)
    assert fingerprint(one) != fingerprint(Process(("cc", "-c", "b.c")))


@pytest.mark.parametrize(
    ("kwargs", "field", "error", "fragment"),
    [
        ({"argv": "echo hi"}, "argv", ProcessSpecTypeError, "shlex.split"),
        ({"argv": ()}, "argv", ProcessSpecError, "empty"),
        ({"argv": ("echo", 3)}, "argv", ProcessSpecTypeError, "argv[1]"),
        ({"argv": ("",)}, "argv", ProcessSpecError, "argv[0]"),
        ({"argv": ("echo", "a\0b")}, "argv", ProcessSpecError, "NUL"),
        ({"argv": 5}, "argv", ProcessSpecTypeError, "sequence of str"),
        ({"env": {"A": 1}}, "env", ProcessSpecTypeError, "env['A']"),
        ({"env": {1: "a"}}, "env", ProcessSpecTypeError, "key 1"),
        ({"env": {"A=B": "x"}}, "env", ProcessSpecError, "not a valid variable name"),
        ({"env": ["A=1"]}, "env", ProcessSpecTypeError, "mapping"),
        ({"output_files": ("/abs",)}, "output_files", ProcessSpecError, "absolute"),
        ({"output_files": ("a/../b",)}, "output_files", ProcessSpecError, "'..'"),
        ({"output_files": ("a//b",)}, "output_files", ProcessSpecError, "'a/b'"),
        ({"output_files": ("a/",)}, "output_files", ProcessSpecError, "not normalized"),
        ({"output_files": "out.txt"}, "output_files", ProcessSpecTypeError, "sequence"),
        ({"output_directories": (".",)}, "output_directories", ProcessSpecError, "root"),
        ({"output_directories": ("",)}, "output_directories", ProcessSpecError, "empty"),
        ({"output_directories": (5,)}, "output_directories", ProcessSpecTypeError, "str path"),
        ({"working_directory": "../up"}, "working_directory", ProcessSpecError, "'..'"),
        ({"working_directory": "./a"}, "working_directory", ProcessSpecError, "'a'"),
        ({"timeout_seconds": 0}, "timeout_seconds", ProcessSpecError, "positive"),
        ({"timeout_seconds": -1.5}, "timeout_seconds", ProcessSpecError, "positive"),
        ({"timeout_seconds": float("inf")}, "timeout_seconds", ProcessSpecError, "finite"),
        ({"timeout_seconds": "5"}, "timeout_seconds", ProcessSpecTypeError, "number"),
        ({"timeout_seconds": True}, "timeout_seconds", ProcessSpecTypeError, "number"),
        ({"input_digest": "abc"}, "input_digest", ProcessSpecTypeError, "Digest"),
        ({"description": 5}, "description", ProcessSpecTypeError, "str"),
        ({"environment": ""}, "environment", ProcessSpecTypeError, "environment"),
        ({"cache_scope": "always"}, "cache_scope", ProcessSpecTypeError, "ProcessCacheScope"),
    ],
)
def test_invalid_process_names_the_field(
    kwargs: dict[str, Any], field: str, error: type[Exception], fragment: str
) -> None:
    kwargs = {"argv": ("true",), **kwargs}
    with pytest.raises(error) as info:
        Process(**kwargs)
    assert info.value.field == field  # type: ignore[attr-defined]
    assert f"Process.{field}" in str(info.value)
    assert fragment in str(info.value)
    assert isinstance(info.value, RuleworkError)
    assert isinstance(info.value, ValueError)
    if error is ProcessSpecTypeError:
        assert isinstance(info.value, TypeError)


def test_check_result_conversions() -> None:
    meta = ProcessResultMetadata("ran", "local", 0.1)
    ok = FallibleProcessResult(0, b"o", b"e", EMPTY_DIGEST, meta)
    from rulework.engine.process import check_process_result

    process = Process(("x",), description="do x")
    assert check_process_result(process, ok) == ProcessResult(b"o", b"e", EMPTY_DIGEST, meta)
    failed = FallibleProcessResult(2, b"", b"line1\nboom\n", EMPTY_DIGEST, meta)
    with pytest.raises(ProcessExecutionFailure, match=r"(?s)'do x'.*exit code 2.*boom") as info:
        check_process_result(process, failed)
    assert not isinstance(info.value, ProcessTimeout)
    timed_out = FallibleProcessResult(-15, b"", b"", EMPTY_DIGEST, meta, timed_out=True)
    with pytest.raises(ProcessTimeout):
        check_process_result(process, timed_out)


# --- cache keys ---------------------------------------------------------------------------------


def test_cache_key_covers_what_changes_the_result() -> None:
    base = Process(("cc", "a.c"), env={"A": "1"})
    key = process_cache_key(base, identity="local:Linux-x86_64")
    assert len(key) == 64
    same = [
        Process(("cc", "a.c"), env={"A": "1"}, description="another description"),
        Process(("cc", "a.c"), env={"A": "1"}, environment="other-env-same-platform"),
    ]
    for process in same:
        assert process_cache_key(process, identity="local:Linux-x86_64") == key
    different = [
        Process(("cc", "b.c"), env={"A": "1"}),
        Process(("cc", "a.c"), env={"A": "2"}),
        Process(("cc", "a.c"), env={"A": "1"}, input_digest=Digest.of_bytes(b"x")),
        Process(("cc", "a.c"), env={"A": "1"}, working_directory="sub"),
        Process(("cc", "a.c"), env={"A": "1"}, output_files=("a.o",)),
        Process(("cc", "a.c"), env={"A": "1"}, output_directories=("out",)),
        Process(("cc", "a.c"), env={"A": "1"}, timeout_seconds=10),
        Process(("cc", "a.c"), env={"A": "1"}, cache_scope=ProcessCacheScope.ALWAYS),
    ]
    keys = {process_cache_key(p, identity="local:Linux-x86_64") for p in different}
    assert len(keys) == len(different) and key not in keys
    assert process_cache_key(base, identity="local:Darwin-arm64") != key
    assert process_cache_key(base, identity="local:Linux-x86_64", salt="v2") != key


# --- the runner ---------------------------------------------------------------------------------


class DictActionCache:
    """A real in-memory action cache (a dict), with a switch to fail like a broken backend."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.failing = False
        self.puts = 0

    async def get_action(self, key: str) -> tuple[bytes, CacheSource] | None:
        if self.failing:
            raise CacheError("the action cache is down")
        value = self.entries.get(key)
        return None if value is None else (value, "local_cache")

    async def put_action(
        self,
        key: str,
        value: bytes,
        *,
        digests: Iterable[Digest] = (),
        tree_roots: Iterable[Digest] = (),
    ) -> None:
        if self.failing:
            raise CacheError("the action cache is down")
        self.puts += 1
        self.entries[key] = value


def _local(tmp_path: Path, name: str = "local", **options: Any) -> LocalExecutor:
    root = tmp_path / f"sandboxes-{name}"
    return LocalExecutor(name, LocalExecutorConfig(parallelism=2, sandbox_root=root, **options))


@pytest.fixture
def store() -> Store:
    return Store(MemoryBlobStore())


@pytest.fixture
def cache() -> DictActionCache:
    return DictActionCache()


@pytest.fixture
async def runner(
    tmp_path: Path, store: Store, cache: DictActionCache
) -> AsyncIterator[ProcessRunner]:
    async with ProcessRunner({"local": _local(tmp_path)}, "local", store, cache) as runner:
        yield runner


def _counting(counter: Path, script: str = "", **options: Any) -> Process:
    """A Process that appends a line to `counter` (outside its sandbox) each time it runs."""
    return Process(("sh", "-c", f'echo ran >> "$1"; {script}', "sh", str(counter)), **options)


def _runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


async def test_success_is_cached_and_served_without_running(
    runner: ProcessRunner, tmp_path: Path
) -> None:
    counter = tmp_path / "count"
    process = _counting(counter, "echo out; echo err >&2", description="first")
    first = await runner.run(process)
    assert (first.exit_code, first.stdout, first.stderr) == (0, b"out\n", b"err\n")
    assert first.metadata.source == "ran" and first.metadata.environment == "local"
    again = await runner.run(_counting(counter, "echo out; echo err >&2", description="second"))
    assert _runs(counter) == 1
    assert again.metadata.source == "local_cache"
    assert (again.exit_code, again.stdout, again.stderr) == (0, b"out\n", b"err\n")
    assert again.metadata.duration_seconds == first.metadata.duration_seconds
    stats = runner.statistics()
    assert (stats.ran, stats.local_cache_hits, stats.cache_misses, stats.cache_writes) == (
        1,
        1,
        1,
        1,
    )


async def test_outputs_are_restored_from_cache(
    runner: ProcessRunner, tmp_path: Path, store: Store
) -> None:
    counter = tmp_path / "count"
    process = _counting(
        counter,
        "mkdir d; echo data > d/f; echo x > out",
        output_files=("out",),
        output_directories=("d",),
    )
    first = await runner.run(process)
    second = await runner.run(process)
    assert _runs(counter) == 1 and second.metadata.source == "local_cache"
    assert second.output_digest == first.output_digest
    contents = {fc.path: fc.content for fc in await store.contents(second.output_digest)}
    assert contents == {"out": b"x\n", "d/f": b"data\n"}


async def test_a_hit_whose_blobs_are_gone_is_a_miss(tmp_path: Path, cache: DictActionCache) -> None:
    counter = tmp_path / "count"
    process = _counting(counter, "echo big; echo x > out", output_files=("out",))
    async with ProcessRunner(
        {"local": _local(tmp_path)}, "local", Store(MemoryBlobStore()), cache
    ) as runner:
        await runner.run(process)
    # A new, empty store: the entry is still in the action cache but its blobs are not.
    fresh = Store(MemoryBlobStore())
    async with ProcessRunner({"local": _local(tmp_path)}, "local", fresh, cache) as runner:
        result = await runner.run(process)
        assert result.metadata.source == "ran"
        assert runner.statistics().incomplete_cache_entries == 1
        assert (await fresh.contents(result.output_digest))[0].content == b"x\n"
        assert (await runner.run(process)).metadata.source == "local_cache"
    assert _runs(counter) == 2


async def test_failures_are_not_cached_by_default(runner: ProcessRunner, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    for _ in range(2):
        result = await runner.run(_counting(counter, "echo bad >&2; exit 3"))
        assert result.exit_code == 3 and result.metadata.source == "ran"
    assert _runs(counter) == 2


async def test_always_scope_caches_failures(runner: ProcessRunner, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    process = _counting(counter, "echo bad >&2; exit 3", cache_scope=ProcessCacheScope.ALWAYS)
    await runner.run(process)
    cached = await runner.run(process)
    assert (cached.exit_code, cached.stderr, cached.metadata.source) == (3, b"bad\n", "local_cache")
    assert _runs(counter) == 1


async def test_per_session_scope_never_touches_the_cache(
    runner: ProcessRunner, tmp_path: Path, cache: DictActionCache
) -> None:
    counter = tmp_path / "count"
    process = _counting(counter, cache_scope=ProcessCacheScope.PER_SESSION)
    await runner.run(process)
    await runner.run(process)
    assert _runs(counter) == 2
    assert cache.entries == {} and cache.puts == 0


async def test_timeouts_are_never_cached(runner: ProcessRunner, cache: DictActionCache) -> None:
    process = Process(
        ("sleep", "300"),
        timeout_seconds=0.5,
        cache_scope=ProcessCacheScope.ALWAYS,
        description="sleepy",
    )
    result = await runner.run(process)
    assert result.timed_out and result.exit_code != 0
    assert b"exceeded its timeout of 0.5 seconds" in result.stderr
    with pytest.raises(ProcessTimeout, match="sleepy") as info:
        await runner.run_checked(process)
    assert isinstance(info.value, TimeoutError)
    assert runner.statistics().ran == 2
    assert cache.entries == {}


async def test_run_checked(runner: ProcessRunner) -> None:
    ok = await runner.run_checked(Process(("printf", "fine")))
    assert isinstance(ok, ProcessResult) and ok.stdout == b"fine"
    with pytest.raises(ProcessExecutionFailure) as info:
        await runner.run_checked(
            Process(
                ("sh", "-c", "for i in $(seq 1 50); do echo line$i >&2; done; exit 4"),
                description="noisy",
            )
        )
    message = str(info.value)
    assert "'noisy'" in message and "exit code 4" in message
    assert "line50" in message and "line31" in message and "line30\n" not in message
    assert info.value.exit_code == 4 and info.value.environment == "local"


async def test_unknown_environment_lists_the_configured_ones(runner: ProcessRunner) -> None:
    with pytest.raises(ExecutorError, match=r"'gpu'.*configured environments: local"):
        await runner.run(Process(("true",), environment="gpu"))


def test_unknown_default_environment(tmp_path: Path, store: Store) -> None:
    with pytest.raises(ExecutorError, match=r"'remote'.*local"):
        ProcessRunner({"local": _local(tmp_path)}, "remote", store, None)


async def test_environments_and_identities_keep_results_apart(
    tmp_path: Path, store: Store, cache: DictActionCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RW_TEST_FLAVOUR", "vanilla")
    executors = {
        "plain": _local(tmp_path, "plain"),
        "flavoured": _local(tmp_path, "flavoured", inherit_env=("RW_TEST_FLAVOUR",)),
        "plain-too": _local(tmp_path, "plain-too"),
    }
    async with ProcessRunner(executors, "plain", store, cache) as runner:
        script = ("sh", "-c", 'printf "%s" "${RW_TEST_FLAVOUR:-none}"')
        plain = await runner.run(Process(script))
        flavoured = await runner.run(Process(script, environment="flavoured"))
        assert (plain.stdout, flavoured.stdout) == (b"none", b"vanilla")
        assert flavoured.metadata.source == "ran"
        assert flavoured.metadata.environment == "flavoured"
        # Same platform, same settings: the result is shared, and says who asked.
        shared = await runner.run(Process(script, environment="plain-too"))
        assert shared.metadata.source == "local_cache"
        assert shared.metadata.environment == "plain-too"


async def test_executors_are_opened_lazily_and_closed_once(tmp_path: Path, store: Store) -> None:
    used, unused = _local(tmp_path, "used"), _local(tmp_path, "unused")
    async with ProcessRunner({"used": used, "unused": unused}, "used", store, None) as runner:
        assert not (tmp_path / "sandboxes-used").exists()
        await runner.run(Process(("true",)))
        assert list((tmp_path / "sandboxes-used").iterdir())
    assert list((tmp_path / "sandboxes-used").iterdir()) == []  # closed: base removed
    assert not (tmp_path / "sandboxes-unused").exists()  # never opened


async def test_a_failing_cache_degrades_to_running(
    runner: ProcessRunner, cache: DictActionCache, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache.failing = True
    counter = tmp_path / "count"
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert (await runner.run(_counting(counter))).exit_code == 0
    assert _runs(counter) == 2
    assert "the action cache is down" in caplog.text


async def test_an_unreadable_entry_is_a_miss(
    runner: ProcessRunner, cache: DictActionCache, tmp_path: Path
) -> None:
    counter = tmp_path / "count"
    process = _counting(counter, "echo hi")
    await runner.run(process)
    for key in cache.entries:
        cache.entries[key] = b'{"not": "an entry"}'
    result = await runner.run(process)
    assert result.metadata.source == "ran" and result.stdout == b"hi\n"
    assert _runs(counter) == 2


async def test_inputs_reach_the_process(runner: ProcessRunner, store: Store) -> None:
    digest = await store.create_digest(CreateDigest([FileContent("src/a.txt", b"hello")]))
    result = await runner.run_checked(Process(("cat", "src/a.txt"), input_digest=digest))
    assert result.stdout == b"hello"


async def test_cancelled_run_leaves_no_cache_entry(
    runner: ProcessRunner, cache: DictActionCache
) -> None:
    with trio.move_on_after(0.5):
        await runner.run(Process(("sleep", "300")))
    assert cache.entries == {}


async def test_with_the_real_cache_layer(tmp_path: Path) -> None:
    """The runner over `CacheLayer` + the memory backend, as the engine wires it."""
    counter = tmp_path / "count"
    async with open_cache_layer(MemoryCache(), None) as layer:
        store = Store(layer.local_blobs)
        async with ProcessRunner({"local": _local(tmp_path)}, "local", store, layer) as runner:
            process = _counting(counter, "echo x > out; echo done", output_files=("out",))
            first = await runner.run(process)
            second = await runner.run(process)
    assert _runs(counter) == 1
    assert first.metadata.source == "ran" and second.metadata.source == "local_cache"
    assert second.stdout == b"done\n" and second.output_digest == first.output_digest


class BatchingActionCache(DictActionCache):
    """A DictActionCache that also takes many entries at once, recording each call's size;
    its first write waits until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.release = trio.Event()

    async def put_action(
        self,
        key: str,
        value: bytes,
        *,
        digests: Iterable[Digest] = (),
        tree_roots: Iterable[Digest] = (),
    ) -> None:
        await self.put_actions([ActionWrite(key, value, tuple(digests), tuple(tree_roots))])

    async def put_actions(self, writes: Sequence[ActionWrite]) -> dict[str, CacheError]:
        await self.release.wait()
        self.batches.append(len(writes))
        for write in writes:
            self.entries[write.key] = write.value
        return {}


async def test_background_writes_are_batched_and_all_written_when_stopped(
    tmp_path: Path, store: Store
) -> None:
    cache = BatchingActionCache()
    processes = [Process(("true", str(i))) for i in range(12)]
    async with ProcessRunner({"local": _local(tmp_path)}, "local", store, cache) as runner:
        async with trio.open_nursery() as background:
            runner.write_in_background(background)
            async with trio.open_nursery() as nursery:
                for process in processes:
                    nursery.start_soon(runner.run, process)
            # Every run returned without waiting for its entry; none is written yet.
            assert cache.entries == {}
            cache.release.set()
            runner.stop_writing_in_background()
        # While the first write waited, the rest queued up: they went in one more write.
        assert sum(cache.batches) == 12 and len(cache.batches) <= 2
        assert runner.statistics().cache_writes == 12
        for process in processes:
            assert (await runner.run(process)).metadata.source == "local_cache"
        # After stopping, entries are written before run returns.
        await runner.run(Process(("true", "late")))
        assert len(cache.entries) == 13


async def test_large_stdout_lives_in_the_store(tmp_path: Path, cache: DictActionCache) -> None:
    counter = tmp_path / "count"
    # 100 KB of stdout: too big to inline in the entry, so it is a blob the entry names.
    process = _counting(counter, "head -c 100000 /dev/zero | tr '\\000' x")
    async with ProcessRunner(
        {"local": _local(tmp_path)}, "local", Store(MemoryBlobStore()), cache
    ) as runner:
        assert (await runner.run(process)).stdout == b"x" * 100_000
        hit = await runner.run(process)
        assert hit.metadata.source == "local_cache" and hit.stdout == b"x" * 100_000
    (entry,) = cache.entries.values()
    assert len(entry) < 1000
    # Without the blob (another store), the entry is incomplete: a miss that reruns.
    async with ProcessRunner(
        {"local": _local(tmp_path)}, "local", Store(MemoryBlobStore()), cache
    ) as runner:
        rerun = await runner.run(process)
        assert rerun.metadata.source == "ran" and rerun.stdout == b"x" * 100_000
        assert runner.statistics().incomplete_cache_entries == 1
    assert _runs(counter) == 2


class _FailsToClose(LocalExecutor):
    """A local executor whose shutdown fails after it cleaned up (like a lost connection)."""

    async def aclose(self) -> None:
        await super().aclose()
        raise ExecutorError(f"{self.name} could not close")


async def test_every_executor_is_closed_even_if_one_fails(tmp_path: Path, store: Store) -> None:
    executors = {
        "bad": _FailsToClose("bad", LocalExecutorConfig(sandbox_root=tmp_path / "bad")),
        "good": _local(tmp_path, "good"),
    }
    runner = ProcessRunner(executors, "bad", store, None)
    await runner.run(Process(("true",)))
    await runner.run(Process(("true",), environment="good"))
    with pytest.raises(ExecutorError, match="bad could not close"):
        await runner.aclose()
    assert list((tmp_path / "sandboxes-good").iterdir()) == []
    await runner.aclose()  # already closed: nothing left to close, nothing raised
