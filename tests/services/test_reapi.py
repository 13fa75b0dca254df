"""The REAPI backends against a real buildbox-casd: conformance, remote cache sharing, faults."""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from rulework.abc import CacheBackend, ProcessExecutor
from rulework.backends.memory import MemoryCache
from rulework.backends.reapi import ReapiCache, ReapiCacheConfig, ReapiExecutor, ReapiExecutorConfig
from rulework.engine.cache import CacheLayer, RemoteCacheWarning, open_cache_layer
from rulework.engine.errors import ConfigError, ExecutorError
from rulework.engine.fs import CreateDigest, Digest, FileContent
from rulework.engine.process import Process, ProcessCacheScope, ProcessRunner
from rulework.engine.store import MemoryBlobStore, Store
from rulework.testing import CacheBackendSuite, ProcessExecutorSuite
from rulework.testing._cache_suite import CorruptHook

from .svc_reapi import CasdServer


def _innermost_pids(server_pid: int) -> dict[int, int]:
    """Host pid -> innermost-namespace pid of the live processes descended from `server_pid`."""
    parents: dict[int, int] = {}
    inner: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("State", "").startswith("Z"):
            continue
        parents[int(entry)] = int(fields.get("PPid", "0"))
        inner[int(entry)] = int(fields.get("NSpid", entry).split()[-1])
    result = {}
    for pid, ns_pid in inner.items():
        ancestor = parents.get(pid, 0)
        while ancestor > 1 and ancestor != server_pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == server_pid:
            result[pid] = ns_pid
    return result


class TestReapiExecutor(ProcessExecutorSuite):
    # bubblewrap sets PWD in the sandbox.
    allowed_extra_env: ClassVar[frozenset[str]] = frozenset({"PWD"})
    server_pid: ClassVar[int] = 0

    @pytest.fixture
    async def executor(
        self, store: Store, reapi_server: CasdServer
    ) -> AsyncIterator[ProcessExecutor]:
        # pytest binds fixtures to another instance of the class than the test's.
        type(self).server_pid = reapi_server.pid
        executor = ReapiExecutor(
            "farm",
            ReapiExecutorConfig(
                address=reapi_server.address,
                parallelism=2,
                sandbox_subdirectory="work",
                # The suite runs identical processes and counts them: none may be a cache hit.
                cache_read=False,
                cache_write=False,
            ),
        )
        await executor.open(store)
        yield executor
        await executor.aclose()

    @pytest.fixture
    def probe_dir(self) -> Path | None:
        # The sandbox shares no writable directory with the test.
        return None

    async def pid_is_running(self, pid: int) -> bool:
        # Processes print their pid in bubblewrap's pid namespace: look for a live descendant
        # of the server with that innermost pid.
        return pid in _innermost_pids(self.server_pid).values()


async def _blob_content(backend: CacheBackend, digest: Digest) -> bytes:
    blobs = await backend.read_blobs([digest])
    if digest in blobs:
        return blobs[digest]
    with tempfile.TemporaryDirectory() as tmp:  # a large blob: streamed
        path = Path(tmp) / "blob"
        assert await backend.read_blob_to_file(digest, path)
        return path.read_bytes()


# -- the remote cache ------------------------------------------------------------------------


class TestReapiCacheConformance(CacheBackendSuite):
    evicts_from_storage = False  # REAPI has no delete

    @pytest.fixture
    async def backend(self, reapi_server: CasdServer) -> AsyncIterator[CacheBackend]:
        cache = ReapiCache(ReapiCacheConfig(address=reapi_server.address))
        yield cache
        await cache.aclose()

    @pytest.fixture
    def corrupt(self, reapi_server: CasdServer) -> CorruptHook:
        async def corrupt(backend: CacheBackend, digest: Digest) -> None:
            # casd keeps blobs by SHA-256 in files: flip a byte there, as a bad disk would.
            data = await _blob_content(backend, digest)
            path = reapi_server.cas_path(hashlib.sha256(data).hexdigest())
            assert path.exists(), "casd's CAS layout changed: fix CasdServer.cas_path"
            path.chmod(0o644)
            path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])

        return corrupt


def _executor(server: CasdServer, **options: Any) -> ReapiExecutor:
    config = ReapiExecutorConfig(
        address=server.address, parallelism=2, sandbox_subdirectory="work", **options
    )
    return ReapiExecutor("farm", config)


@asynccontextmanager
async def _runner(
    server: CasdServer, cache_server: CasdServer | None, executor: ReapiExecutor
) -> AsyncIterator[tuple[ProcessRunner, Store, CacheLayer]]:
    """A ProcessRunner with its own local (memory) cache and the REAPI remote cache."""
    remote = ReapiCache(ReapiCacheConfig(address=(cache_server or server).address))
    try:
        async with open_cache_layer(MemoryCache(), remote, remote_timeout=5.0) as layer:
            store = Store(layer.local_blobs)
            async with ProcessRunner({"farm": executor}, "farm", store, layer) as runner:
                yield runner, store, layer
    finally:
        await remote.aclose()


def _salted(salt: str) -> Process:
    # Writes an output file and a nested directory, so that results carry trees.
    script = (
        'mkdir -p out/sub; printf "%s" "$1" > out/sub/f; printf "%s-top" "$1" > top.txt; '
        'echo "ran $1"'
    )
    return Process(
        ("sh", "-c", script, "sh", salt),
        description=f"salted {salt}",
        output_files=("top.txt",),
        output_directories=("out",),
    )


async def test_two_runners_share_results_through_the_action_cache(
    reapi_server: CasdServer,
) -> None:
    salt = uuid.uuid4().hex
    first_executor = _executor(reapi_server)
    async with _runner(reapi_server, None, first_executor) as (runner, store, _layer):
        first = await runner.run(_salted(salt))
        assert first.metadata.source == "ran"
        assert first.stdout == f"ran {salt}\n".encode()
        first_contents = {fc.path: fc.content for fc in await store.contents(first.output_digest)}
    assert first_contents == {"out/sub/f": salt.encode(), "top.txt": f"{salt}-top".encode()}
    assert first_executor.statistics().executed == 1

    # A second engine: a fresh local cache, a fresh executor, the same server.
    second_executor = _executor(reapi_server)
    async with _runner(reapi_server, None, second_executor) as (runner, store, layer):
        second = await runner.run(_salted(salt))
        assert second.metadata.source == "remote_cache"
        assert second.stdout == first.stdout
        assert second.output_digest == first.output_digest
        contents = {fc.path: fc.content for fc in await store.contents(second.output_digest)}
        assert layer.statistics().remote_hits == 1
    assert contents == first_contents
    stats = second_executor.statistics()
    assert (stats.executed, stats.action_cache_hits) == (0, 0), "nothing may run remotely"


async def test_executor_uses_the_servers_action_cache(reapi_server: CasdServer) -> None:
    # Without any rulework cache, the executor still asks GetActionResult first.
    salt = uuid.uuid4().hex
    store = Store(MemoryBlobStore())
    results = []
    executors = []
    for _ in range(2):
        executor = _executor(reapi_server)
        await executor.open(store)
        try:
            results.append(await executor.execute(_salted(salt), store))
        finally:
            await executor.aclose()
        executors.append(executor.statistics())
    assert [s.executed for s in executors] == [1, 0]
    assert executors[1].action_cache_hits == 1
    assert results[0].output_digest == results[1].output_digest
    assert results[0].stdout == results[1].stdout


async def test_a_cached_failure_is_rerun_unless_the_scope_is_always(
    reapi_server: CasdServer,
) -> None:
    store = Store(MemoryBlobStore())
    marker = uuid.uuid4().hex
    executor = _executor(reapi_server)
    await executor.open(store)
    try:
        for scope in (ProcessCacheScope.SUCCESSFUL, ProcessCacheScope.SUCCESSFUL):
            failing = Process(("sh", "-c", f"echo {marker}; exit 3"), cache_scope=scope)
            assert (await executor.execute(failing, store)).exit_code == 3
        assert executor.statistics().executed == 2
        always = Process(
            ("sh", "-c", f"echo {marker}; exit 3"), cache_scope=ProcessCacheScope.ALWAYS
        )
        assert (await executor.execute(always, store)).exit_code == 3
        assert executor.statistics().executed == 2  # served by the server's cached failure
    finally:
        await executor.aclose()


# -- faults ----------------------------------------------------------------------------------


async def test_server_stopped_mid_run_degrades_the_cache_and_fails_execution_clearly(
    reapi_server_factory: Callable[[], CasdServer],
) -> None:
    server = reapi_server_factory()
    executor = _executor(server, max_attempts=2, timeout_seconds=5.0)
    with pytest.warns(RemoteCacheWarning):
        async with _runner(server, None, executor) as (runner, _store, layer):
            assert (await runner.run(_salted(uuid.uuid4().hex))).metadata.source == "ran"
            server.kill()
            with pytest.raises(ExecutorError) as caught:
                await runner.run(_salted(uuid.uuid4().hex))
            assert layer.statistics().remote_degraded
    message = str(caught.value)
    assert server.address in message
    assert "UNAVAILABLE" in message
    assert any(rpc in message for rpc in ("FindMissingBlobs", "GetActionResult", "Execute"))


async def test_unreachable_server_is_a_clear_executor_error(
    reapi_server_factory: Callable[[], CasdServer],
) -> None:
    server = reapi_server_factory()
    server.stop()  # a port nobody listens on any more
    executor = _executor(server, max_attempts=2, timeout_seconds=5.0)
    with pytest.raises(
        ExecutorError, match=r"GetCapabilities on grpc://127\.0\.0\.1:\d+.*UNAVAILABLE"
    ):
        await executor.open(Store(MemoryBlobStore()))
    await executor.aclose()


async def test_blob_deleted_from_the_server_between_runs_is_uploaded_again(
    reapi_server: CasdServer,
) -> None:
    store = Store(MemoryBlobStore())
    content = f"input {uuid.uuid4().hex}\n".encode()
    digest = await store.create_digest(CreateDigest([FileContent("data/in.txt", content)]))
    executor = _executor(reapi_server, cache_read=False)
    await executor.open(store)
    try:
        first = await executor.execute(Process(("cat", "data/in.txt"), input_digest=digest), store)
        assert first.stdout == content
        uploaded = executor.statistics().blobs_uploaded
        blob = reapi_server.cas_path(hashlib.sha256(content).hexdigest())
        assert blob.exists(), "casd's CAS layout changed: fix CasdServer.cas_path"
        blob.unlink()
        # The executor still maps the input to its SHA-256 digest, but the server lost it.
        second = await executor.execute(
            Process(("cat", "data/in.txt"), input_digest=digest, description="again"), store
        )
        assert second.stdout == content
        assert executor.statistics().blobs_uploaded > uploaded
    finally:
        await executor.aclose()


async def test_cancellation_cancels_the_remote_command(reapi_server: CasdServer) -> None:
    store = Store(MemoryBlobStore())
    executor = _executor(reapi_server)
    await executor.open(store)
    marker = uuid.uuid4().hex
    try:
        with trio.move_on_after(1.5) as scope:
            await executor.execute(
                Process(
                    ("sh", "-c", f"sleep 300; echo {marker}"),
                    cache_scope=ProcessCacheScope.PER_SESSION,
                ),
                store,
            )
        assert scope.cancelled_caught

        def cmdline(pid: int) -> bytes:
            try:
                return Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # it exited between the listing and the read
                return b""

        def sleepers() -> list[int]:
            return [pid for pid in _innermost_pids(reapi_server.pid) if b"sleep" in cmdline(pid)]

        with trio.fail_after(30):
            while sleepers():  # noqa: ASYNC110 - nothing to wait on but the server's processes
                await trio.sleep(0.05)
    finally:
        await executor.aclose()


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        ReapiExecutorConfig(address="http://x", parallelism=0, platform={"a": 1})  # type: ignore[dict-item]
    text = str(caught.value)
    assert "address" in text and "parallelism" in text and "platform" in text
    with pytest.raises(ConfigError, match="address"):
        ReapiCacheConfig(address="")
