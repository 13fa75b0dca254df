"""The `sqlite` cache backend: the conformance suite, several processes, GC and verify."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio
import trio.testing

import rulework.backends.sqlite as sqlite_module
from rulework.abc import CacheBackend
from rulework.backends.sqlite import (
    BLOBS_DIRNAME,
    DATABASE_NAME,
    SqliteCache,
    SqliteCacheConfig,
    SqliteWriteStatistics,
)
from rulework.engine.errors import CacheBackendError, ConfigError
from rulework.engine.fs import Digest
from rulework.engine.store import FileBlobStore
from rulework.testing._cache_suite import CacheBackendSuite, CorruptHook


async def _corrupt(backend: CacheBackend, digest: Digest) -> None:
    assert isinstance(backend, SqliteCache)
    path = backend.local_path(digest)
    if path is not None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.chmod(0o644)
        path.write_bytes(bytes(data))
        return
    con = sqlite3.connect(backend.database_path)
    with con:
        changed = con.execute(
            "UPDATE blobs SET data = CAST(? AS BLOB) WHERE hash = ?",
            (b"corrupted!", bytes.fromhex(digest.fingerprint)),
        ).rowcount
    con.close()
    assert changed == 1


class TestSqliteCache(CacheBackendSuite):
    large_blob_peak_factor = 0.25

    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[CacheBackend]:
        cache = SqliteCache(SqliteCacheConfig(), tmp_path / "cache")
        await cache.open()
        yield cache
        await cache.aclose()

    @pytest.fixture
    async def second_backend(self, backend: CacheBackend) -> AsyncIterator[CacheBackend]:
        assert isinstance(backend, SqliteCache)
        other = SqliteCache(backend.config, backend.directory)
        yield other
        await other.aclose()

    @pytest.fixture
    def corrupt(self) -> CorruptHook:
        return _corrupt


class TestSqliteCacheInWorkerThreadsOnly(TestSqliteCache):
    """The same suite with the event-loop fast path switched off."""

    large_blob_size = 16 * 1024 * 1024

    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[CacheBackend]:
        cache = SqliteCache(SqliteCacheConfig(loop_thread_reads=False), tmp_path / "cache")
        yield cache  # opened lazily by the first operation
        await cache.aclose()


# -- helpers -------------------------------------------------------------------------------------


def _data(seed: int, size: int) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "big")).digest(length=size)


def _blob(seed: int, size: int) -> tuple[Digest, bytes]:
    data = _data(seed, size)
    return Digest.of_bytes(data), data


def _sql(cache: SqliteCache, statement: str, params: tuple[object, ...] = ()) -> list[Any]:
    """Run one statement on a separate connection, as another process would."""
    con = sqlite3.connect(cache.database_path, timeout=10)
    try:
        with con:
            return con.execute(statement, params).fetchall()
    finally:
        con.close()


def _data_version(con: sqlite3.Connection) -> int:
    # Changes whenever another connection commits a change to the database.
    return int(con.execute("PRAGMA data_version").fetchone()[0])


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[SqliteCache]:
    cache = SqliteCache(SqliteCacheConfig(inline_threshold=1000), tmp_path / "cache")
    await cache.open()
    yield cache
    await cache.aclose()


# -- several processes ---------------------------------------------------------------------------

_WORKER = """
import sys
import blake3, trio
from pathlib import Path
from rulework.backends.sqlite import SqliteCache, SqliteCacheConfig
from rulework.engine.fs import Digest

def data(seed, size):
    return blake3.blake3(seed.to_bytes(8, "big")).digest(length=size)

async def main():
    directory, me, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    cache = SqliteCache(SqliteCacheConfig(inline_threshold=1000), directory)
    try:
        for i in range(count if count >= 0 else 10**9):
            shared = data(i, 500 if i % 2 else 5000)  # inline and file-backed, both workers
            own = data(me * 1_000_000 + i, 800 + (i % 2) * 4000)
            ds, do = Digest.of_bytes(shared), Digest.of_bytes(own)
            await cache.write_blobs({ds: shared, do: own})
            await cache.put_action(f"shared-{i}", ds.fingerprint.encode())
            await cache.put_action(f"w{me}-{i}", do.fingerprint.encode())
            other = await cache.get_action(f"w{1 - me}-{i}")
            if other is not None:
                size = 800 + (i % 2) * 4000
                digest = Digest(other.decode(), size)
                got = await cache.read_blobs([digest])
                assert got[digest] == data((1 - me) * 1_000_000 + i, size), i
            print(i, flush=True)
    finally:
        await cache.aclose()

trio.run(main)
"""


async def test_two_processes_share_one_cache_dir(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    count = 120
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def worker(me: int) -> None:
        results.append(
            await trio.run_process(
                [sys.executable, "-c", _WORKER, str(directory), str(me), str(count)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker, 0)
        nursery.start_soon(worker, 1)
    for result in results:
        assert result.returncode == 0, result.stderr.decode()

    cache = SqliteCache(SqliteCacheConfig(inline_threshold=1000), directory)
    try:
        expected_total = 0
        for i in range(count):
            shared = _data(i, 500 if i % 2 else 5000)
            digest = Digest.of_bytes(shared)
            assert await cache.get_action(f"shared-{i}") == digest.fingerprint.encode()
            assert await cache.read_blobs([digest]) == {digest: shared}
            expected_total += len(shared) + len(f"shared-{i}") + 64
            for me in (0, 1):
                own = _data(me * 1_000_000 + i, 800 + (i % 2) * 4000)
                own_digest = Digest.of_bytes(own)
                assert await cache.get_action(f"w{me}-{i}") == own_digest.fingerprint.encode()
                assert await cache.read_blobs([own_digest]) == {own_digest: own}
                expected_total += len(own) + len(f"w{me}-{i}") + 64
        assert await cache.total_bytes() == expected_total
        report = await cache.verify()
        assert report.ok, report
        assert report.blobs_checked == 3 * count
    finally:
        await cache.aclose()


async def test_a_killed_writer_leaves_no_partial_entry(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _WORKER, str(directory), "0", "-1"], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        buffered = b""
        # Let it complete some writes first; it is killed in the middle of a later one.
        with trio.fail_after(60):
            while buffered.count(b"\n") < 20:
                chunk = await process.stdout.receive_some()
                assert chunk, "the writer exited early"
                buffered += chunk
    finally:
        process.kill()
        await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
    cache = SqliteCache(SqliteCacheConfig(inline_threshold=1000), directory)
    try:
        report = await cache.verify()
        assert report.corrupt == ()
        assert report.missing_files == ()
        assert report.database_problems == ()
        # Every entry that is visible is whole, and names a whole blob.
        keys = _sql(cache, "SELECT key, value FROM actions WHERE key LIKE 'w0-%'")
        assert len(keys) >= 20
        for key, value in keys:
            i = int(key.split("-")[1])
            size = 800 + (i % 2) * 4000
            digest = Digest(value.decode(), size)
            got = await cache.read_blobs([digest])
            assert got == {digest: _data(0 * 1_000_000 + i, size)}
    finally:
        await cache.aclose()


# -- group commit ----------------------------------------------------------------------------------


class _HeldWriter:
    """Keeps the cache's writer thread busy inside a transaction until `release()`, so that the
    writes started meanwhile queue up, deterministically, for the next group commit."""

    def __init__(self, cache: SqliteCache) -> None:
        self.cache = cache
        self._started = threading.Event()
        self._release = threading.Event()

    def _block(self, con: sqlite3.Connection, tx: object) -> None:
        self._started.set()
        self._release.wait(60)

    async def hold(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.cache._run_write, "holding the writer", self._block)
        await trio.to_thread.run_sync(self._started.wait, 60)

    def release(self) -> None:
        self._release.set()


def _delta(before: SqliteWriteStatistics, after: SqliteWriteStatistics) -> tuple[int, int]:
    return (
        after.operations - before.operations,
        after.transactions - before.transactions,
    )


async def test_put_actions_writes_many_entries_in_one_transaction(cache: SqliteCache) -> None:
    await cache.put_action("key-0", b"old value")
    before = cache.write_statistics()
    stats_before = cache.statistics()
    await cache.put_actions([(f"key-{i}", b"value %d" % i) for i in range(100)])
    assert _delta(before, cache.write_statistics()) == (1, 1)
    # New keys are added and an existing key is replaced, as put_action does.
    assert await cache.get_action("key-0") == b"value 0"
    assert await cache.get_action("key-99") == b"value 99"
    assert cache.statistics().action_writes - stats_before.action_writes == 100
    await cache.put_actions([])
    assert _delta(before, cache.write_statistics()) == (1, 1)  # nothing to write: no transaction


async def test_concurrent_writes_share_one_transaction(cache: SqliteCache) -> None:
    blobs = dict(_blob(i, 300 + i) for i in range(10))
    before = cache.write_statistics()

    async def put(i: int) -> None:
        await cache.put_action(f"key-{i}", b"value %d" % i)
        # Returned only once committed: readable at once, on either read path.
        assert await cache.get_action(f"key-{i}") == b"value %d" % i

    async def write(digest: Digest, data: bytes) -> None:
        await cache.write_blobs({digest: data})
        assert await cache.read_blobs([digest]) == {digest: data}

    held = _HeldWriter(cache)
    async with trio.open_nursery() as nursery:
        await held.hold(nursery)
        for i in range(40):
            nursery.start_soon(put, i)
        for digest, data in blobs.items():
            nursery.start_soon(write, digest, data)
        await trio.testing.wait_all_tasks_blocked()
        assert _delta(before, cache.write_statistics()) == (0, 0)  # all waiting, none answered
        assert await cache.get_action("key-0") is None
        held.release()
    after = cache.write_statistics()
    # The held transaction, then all 50 writes together.
    assert _delta(before, after) == (51, 2)
    assert after.largest_batch == 50
    assert _sql(cache, "SELECT count(*) FROM actions") == [(40,)]
    expected = sum(len(f"key-{i}") + len(b"value %d" % i) for i in range(40))
    assert await cache.total_bytes() == expected + sum(len(d) for d in blobs.values())


async def test_a_cancelled_write_leaves_nothing_and_the_rest_of_its_batch_commits(
    cache: SqliteCache,
) -> None:
    blobs = [_blob(i, 400 + i) for i in range(6)]
    scopes: dict[str, trio.CancelScope] = {}
    finished: set[str] = set()

    async def run(name: str, write: Callable[[], Awaitable[None]]) -> None:
        with trio.CancelScope() as scope:
            scopes[name] = scope
            await write()
            finished.add(name)

    held = _HeldWriter(cache)
    async with trio.open_nursery() as nursery:
        await held.hold(nursery)
        for i in range(6):
            nursery.start_soon(run, f"put-{i}", lambda i=i: cache.put_action(f"k{i}", b"v" * 50))
            nursery.start_soon(run, f"blob-{i}", lambda i=i: cache.write_blobs(dict([blobs[i]])))
        await trio.testing.wait_all_tasks_blocked()
        # Cancelled while queued behind the held transaction: withdrawn from the batch.
        scopes["put-2"].cancel()
        scopes["blob-4"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        held.release()
    assert scopes["put-2"].cancelled_caught and scopes["blob-4"].cancelled_caught
    assert finished == {f"{kind}-{i}" for kind in ("put", "blob") for i in range(6)} - {
        "put-2",
        "blob-4",
    }
    assert await cache.get_action("k2") is None
    assert await cache.find_missing_blobs(d for d, _ in blobs) == {blobs[4][0]}
    for i in (0, 1, 3, 4, 5):
        assert await cache.get_action(f"k{i}") == b"v" * 50
    # The size accounting saw exactly what was committed.
    expected = 5 * (2 + 50) + sum(len(data) for i, (_, data) in enumerate(blobs) if i != 4)
    assert await cache.total_bytes() == expected
    assert cache.write_statistics().largest_batch == 10


async def test_a_write_cancelled_inside_a_transaction_returns_once_it_ended(
    cache: SqliteCache,
) -> None:
    first, second = _HeldWriter(cache), _HeldWriter(cache)
    seen_after_cancel: list[bytes | None] = []

    async def put() -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            await cache.put_action("k", b"v")
        assert scope.cancelled_caught
        # Settled when the cancelled call returns: its transaction committed, whole.
        seen_after_cancel.append(await cache.get_action("k"))

    scopes: list[trio.CancelScope] = []
    async with trio.open_nursery() as nursery:
        await first.hold(nursery)
        nursery.start_soon(put)
        await trio.testing.wait_all_tasks_blocked()
        # Queued behind the put, so that both share the next transaction, held open.
        nursery.start_soon(cache._run_write, "holding the writer", second._block)
        await trio.testing.wait_all_tasks_blocked()
        first.release()
        await trio.to_thread.run_sync(second._started.wait, 60)
        scopes[0].cancel()  # the put has run inside the open transaction
        await trio.testing.wait_all_tasks_blocked()
        assert seen_after_cancel == []  # still waiting for its transaction to end
        second.release()
    assert seen_after_cancel == [b"v"]


async def test_a_failing_write_fails_alone(cache: SqliteCache) -> None:
    def broken(con: sqlite3.Connection, tx: object) -> None:
        con.execute("INSERT INTO no_such_table VALUES (1)")

    async def put(i: int) -> None:
        await cache.put_action(f"k{i}", b"v")

    async def fail() -> None:
        with pytest.raises(CacheBackendError, match="failed while doing something broken"):
            await cache._run_write("doing something broken", broken)

    held = _HeldWriter(cache)
    async with trio.open_nursery() as nursery:
        await held.hold(nursery)
        for i in range(5):
            nursery.start_soon(put, i)
        nursery.start_soon(fail)
        await trio.testing.wait_all_tasks_blocked()
        held.release()
    for i in range(5):
        assert await cache.get_action(f"k{i}") == b"v"
    assert await cache.total_bytes() == 5 * (2 + 1)


async def test_the_checkpointer_thread_checkpoints_the_wal(cache: SqliteCache) -> None:
    value = b"x" * 40_000  # about 10 WAL pages per put
    for i in range(120):
        await cache.put_action(f"k{i}", value)
    # The checkpointer runs beside the writer, so its count may lag the last put a little.
    for _ in range(1000):
        if cache.write_statistics().checkpoints >= 1:
            break
        await trio.sleep(0.01)
    else:
        pytest.fail("no checkpoint within 10 s of the WAL passing the threshold")
    con = sqlite3.connect(cache.database_path)
    try:
        # SQLite's own checkpoint-in-COMMIT is off for the writer's connection.
        assert cache._writer is not None
        assert cache._writer.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM actions").fetchone() == (120,)
    finally:
        con.close()


async def test_the_writer_checkpoints_itself_when_the_checkpointer_lags(
    cache: SqliteCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if every checkpoint request found the checkpointer still busy with the previous one.
    monkeypatch.setattr(sqlite_module, "_CHECKPOINT_INLINE_AFTER_PAGES", 1)
    value = b"x" * 40_000
    for i in range(120):
        await cache.put_action(f"k{i}", value)
    # Inline checkpoints run in the writer thread before it takes the next batch, so the last
    # put's answer comes after them: no waiting needed.
    assert cache.write_statistics().checkpoints >= 1
    assert cache._checkpoint_wanted is False


async def test_closing_stops_the_writer_thread(tmp_path: Path) -> None:
    cache = SqliteCache(SqliteCacheConfig(), tmp_path)
    await cache.put_action("k", b"v")
    threads = (cache._writer_thread, cache._checkpointer_thread)
    assert all(thread is not None and thread.is_alive() for thread in threads)
    await cache.aclose()
    assert not any(thread is not None and thread.is_alive() for thread in threads)
    with pytest.raises(CacheBackendError, match="closed"):
        await cache.put_action("k2", b"v")


_CONCURRENT_WORKER = """
import json, sys
import blake3, trio
from pathlib import Path
from rulework.backends.sqlite import SqliteCache, SqliteCacheConfig
from rulework.engine.fs import Digest

def data(seed, size):
    return blake3.blake3(seed.to_bytes(8, "big")).digest(length=size)

async def main():
    directory, me, tasks, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cache = SqliteCache(SqliteCacheConfig(inline_threshold=1000), directory)

    async def task(t):
        for i in range(count):
            n = t * count + i
            shared = data(n, 500 if n % 2 else 5000)  # both processes write these
            own = data(me * 1_000_000 + n, 700)
            ds, do = Digest.of_bytes(shared), Digest.of_bytes(own)
            await cache.write_blobs({ds: shared, do: own})
            await cache.put_action(f"shared-{n}", ds.fingerprint.encode())
            await cache.put_action(f"p{me}-{n}", do.fingerprint.encode())
            assert await cache.get_action(f"p{me}-{n}") == do.fingerprint.encode()

    try:
        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(task, t)
        stats = cache.write_statistics()
        print(json.dumps({"operations": stats.operations, "transactions": stats.transactions}))
    finally:
        await cache.aclose()

trio.run(main)
"""


async def test_two_processes_group_committing_share_one_cache_dir(tmp_path: Path) -> None:
    directory = tmp_path / "cache"
    tasks, count = 8, 20
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def worker(me: int) -> None:
        argv = [sys.executable, "-c", _CONCURRENT_WORKER, str(directory), str(me)]
        results.append(
            await trio.run_process(
                [*argv, str(tasks), str(count)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker, 0)
        nursery.start_soon(worker, 1)
    for result in results:
        assert result.returncode == 0, result.stderr.decode()
        stats = json.loads(result.stdout)
        assert stats["operations"] == tasks * count * 3
        assert stats["transactions"] < stats["operations"]  # writes were grouped

    cache = SqliteCache(SqliteCacheConfig(inline_threshold=1000), directory)
    try:
        expected_total = 0
        for n in range(tasks * count):
            shared = _data(n, 500 if n % 2 else 5000)
            digest = Digest.of_bytes(shared)
            assert await cache.get_action(f"shared-{n}") == digest.fingerprint.encode()
            assert await cache.read_blobs([digest]) == {digest: shared}
            expected_total += len(shared) + len(f"shared-{n}") + 64
            for me in (0, 1):
                own = _data(me * 1_000_000 + n, 700)
                own_digest = Digest.of_bytes(own)
                assert await cache.get_action(f"p{me}-{n}") == own_digest.fingerprint.encode()
                assert await cache.read_blobs([own_digest]) == {own_digest: own}
                expected_total += len(own) + len(f"p{me}-{n}") + 64
        assert await cache.total_bytes() == expected_total
        report = await cache.verify()
        assert report.ok, report
    finally:
        await cache.aclose()


# -- access times are batched --------------------------------------------------------------------


async def test_hits_do_not_write(cache: SqliteCache) -> None:
    digest, data = _blob(1, 500)
    await cache.write_blobs({digest: data})
    await cache.put_action("key", b"value")
    observer = sqlite3.connect(cache.database_path)
    try:
        version = _data_version(observer)
        for _ in range(200):
            assert await cache.get_action("key") == b"value"
            assert await cache.find_missing_blobs([digest]) == frozenset()
        assert _data_version(observer) == version

        # Entries last used long ago: hits queue their access times instead of writing them.
        _sql(cache, "UPDATE actions SET atime = 1000")
        _sql(cache, "UPDATE blobs SET atime = 1000")
        version = _data_version(observer)
        for _ in range(200):
            assert await cache.get_action("key") == b"value"
            assert await cache.read_blobs([digest]) == {digest: data}
        assert _data_version(observer) == version
        assert _sql(cache, "SELECT atime FROM actions") == [(1000,)]

        # ...and the next write carries them along, in the same transaction.
        await cache.put_action("other", b"x")
        assert _data_version(observer) == version + 1
        (atime,) = _sql(cache, "SELECT atime FROM actions WHERE key = 'key'")[0]
        assert atime > time.time() - 60
        (atime,) = _sql(cache, "SELECT atime FROM blobs")[0]
        assert atime > time.time() - 60
    finally:
        observer.close()


async def test_access_times_are_flushed_on_close(tmp_path: Path) -> None:
    cache = SqliteCache(SqliteCacheConfig(), tmp_path)
    await cache.put_action("key", b"value")
    _sql(cache, "UPDATE actions SET atime = 1000")
    assert await cache.get_action("key") == b"value"
    await cache.aclose()
    (atime,) = _sql(cache, "SELECT atime FROM actions")[0]
    assert atime > time.time() - 60


async def test_concurrent_lookups_are_answered_by_one_statement(
    cache: SqliteCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rulework.backends import sqlite as sqlite_module

    for i in range(0, 60, 2):  # even keys exist, odd ones do not
        await cache.put_action(f"k{i}", f"v{i}".encode())
    statements: list[int] = []
    real = sqlite_module._get_actions_sync

    def counting(con: sqlite3.Connection, keys: Any) -> Any:
        statements.append(len(keys))
        return real(con, keys)

    monkeypatch.setattr(sqlite_module, "_get_actions_sync", counting)
    found: dict[str, bytes | None] = {}

    async def look(key: str) -> None:
        found[key] = await cache.get_action(key)

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(look, f"k{i}")
    assert found == {f"k{i}": (f"v{i}".encode() if i % 2 == 0 else None) for i in range(60)}
    assert statements == [60]  # one round, one statement
    assert cache.statistics().action_hits == 30
    assert cache.statistics().action_misses == 30
    # A lookup on its own still works, in a round of one.
    assert await cache.get_action("k2") == b"v2"
    assert statements == [60, 1]


async def test_a_cancelled_first_lookup_does_not_strand_the_others(cache: SqliteCache) -> None:
    await cache.put_action("a", b"1")
    await cache.put_action("b", b"2")
    results: dict[str, bytes | None] = {}
    first_scope = trio.CancelScope()

    async def first() -> None:
        with first_scope:
            results["a"] = await cache.get_action("a")

    async def look(key: str) -> None:
        results[key] = await cache.get_action(key)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # The first lookup of the round is cancelled at the round's checkpoint.
            first_scope.cancel()
            nursery.start_soon(first)
            nursery.start_soon(look, "b")
            nursery.start_soon(look, "a")
    assert results == {"a": b"1", "b": b"2"}  # the cancelled lookup set nothing
    assert first_scope.cancelled_caught


async def test_small_reads_take_the_event_loop_fast_path(
    cache: SqliteCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, data = _blob(1, 500)
    await cache.write_blobs({digest: data})
    await cache.put_action("key", b"value")
    hops = 0
    real = trio.to_thread.run_sync

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    for _ in range(10):
        assert await cache.get_action("key") == b"value"
        assert await cache.find_missing_blobs([digest]) == frozenset()
        assert await cache.read_blobs([digest]) == {digest: data}
    assert hops == 0
    # Writes go to the cache's own writer thread: no trio thread hop either.
    await cache.put_action("key2", b"v")
    assert await cache.get_action("key2") == b"v"
    assert hops == 0


# -- several processes: locking ------------------------------------------------------------------


async def test_a_long_foreign_write_lock_fails_writes_clearly_but_not_reads(
    tmp_path: Path,
) -> None:
    cache = SqliteCache(SqliteCacheConfig(lock_timeout_seconds=0.3), tmp_path)
    await cache.put_action("key", b"value")
    other = sqlite3.connect(cache.database_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock, like a long GC elsewhere
        with pytest.raises(CacheBackendError, match="stayed locked by another process"):
            await cache.put_action("key2", b"v")
        assert await cache.get_action("key") == b"value"  # WAL readers never wait
        other.execute("ROLLBACK")
        await cache.put_action("key2", b"v")
        assert await cache.get_action("key2") == b"v"
    finally:
        other.close()
        await cache.aclose()


async def test_an_exclusively_locked_database_fails_opening_clearly(tmp_path: Path) -> None:
    first = SqliteCache(SqliteCacheConfig(), tmp_path)
    await first.open()
    await first.aclose()
    other = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    try:
        other.execute("PRAGMA locking_mode=EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        other.execute("COMMIT")  # keeps the exclusive lock in this locking mode
        cache = SqliteCache(SqliteCacheConfig(lock_timeout_seconds=0.3), tmp_path)
        with pytest.raises(CacheBackendError, match="locked"):
            await cache.get_action("key")
        await cache.aclose()
    finally:
        other.close()


# -- garbage collection --------------------------------------------------------------------------


async def test_gc_removes_least_recently_used_first(cache: SqliteCache) -> None:
    blobs = dict(_blob(i, 10_000) for i in range(10))  # file-backed
    blobs.update(_blob(100 + i, 500) for i in range(4))  # inline
    await cache.write_blobs(blobs)
    await cache.put_action("old-action", b"x" * 1000)
    order = [*blobs]
    for age, digest in enumerate(reversed(order)):
        _sql(
            cache,
            "UPDATE blobs SET atime = ? WHERE hash = ?",
            (10_000 - age, bytes.fromhex(digest.fingerprint)),
        )
    _sql(cache, "UPDATE actions SET atime = 5")  # the oldest of all
    total = await cache.total_bytes()
    assert total == 10 * 10_000 + 4 * 500 + 1000 + len("old-action")

    report = await cache.gc(target_bytes=60_000)

    assert report.bytes_before == total
    assert report.bytes_after == await cache.total_bytes() <= 60_000
    assert report.actions_removed == 1
    assert report.complete
    missing = await cache.find_missing_blobs(order)
    # The oldest blobs went first: what is left is a suffix of the insertion order.
    kept = [d for d in order if d not in missing]
    assert kept == order[len(order) - len(kept) :]
    assert report.blobs_removed == len(missing)
    for digest in missing:
        assert cache.local_path(digest) is None  # files of removed blobs are deleted
    assert await cache.read_blobs(kept) == {d: blobs[d] for d in kept}


async def test_gc_keeps_what_was_used_recently(cache: SqliteCache) -> None:
    blobs = dict(_blob(i, 5000) for i in range(6))
    await cache.write_blobs(blobs)
    _sql(cache, "UPDATE blobs SET atime = 1000")
    favourite = next(iter(blobs))
    await cache.read_blobs([favourite])  # queued access time, not yet written
    report = await cache.gc(target_bytes=10_000, min_age_seconds=3600)
    assert await cache.find_missing_blobs([favourite]) == frozenset()
    assert report.bytes_after <= 10_000


async def test_gc_respects_min_age(cache: SqliteCache) -> None:
    await cache.write_blobs(dict(_blob(i, 5000) for i in range(4)))
    report = await cache.gc(target_bytes=0, min_age_seconds=3600)
    assert report.blobs_removed == 0
    assert not report.complete
    assert await cache.total_bytes() == 20_000


async def test_gc_without_a_limit_does_nothing(tmp_path: Path) -> None:
    cache = SqliteCache(SqliteCacheConfig(max_bytes=None), tmp_path)
    await cache.write_blobs(dict([_blob(1, 100)]))
    report = await cache.gc()
    assert (report.bytes_before, report.bytes_after, report.blobs_removed) == (100, 100, 0)
    await cache.aclose()


async def test_closing_over_the_limit_collects_garbage(tmp_path: Path) -> None:
    cache = SqliteCache(SqliteCacheConfig(max_bytes=20_000, inline_threshold=1000), tmp_path)
    await cache.write_blobs(dict(_blob(i, 5000) for i in range(10)))
    _sql(cache, "UPDATE blobs SET atime = 1000")  # older than the grace period
    await cache.aclose()
    reopened = SqliteCache(SqliteCacheConfig(max_bytes=20_000), tmp_path)
    assert await reopened.total_bytes() <= 18_000  # 90% of max_bytes
    await reopened.aclose()


# -- verify --------------------------------------------------------------------------------------


async def test_verify_finds_and_repairs_every_kind_of_damage(cache: SqliteCache) -> None:
    inline_bad, inline_data = _blob(1, 500)
    file_bad, file_data = _blob(2, 5000)
    file_gone, gone_data = _blob(3, 5000)
    healthy = dict([_blob(4, 500), _blob(5, 5000)])
    await cache.write_blobs(
        {inline_bad: inline_data, file_bad: file_data, file_gone: gone_data, **healthy}
    )
    await _corrupt(cache, inline_bad)
    await _corrupt(cache, file_bad)
    gone_path = cache.local_path(file_gone)
    assert gone_path is not None
    gone_path.unlink()
    # Files without a row: one complete blob (as a crash after its rename leaves), one not.
    files = FileBlobStore(cache.directory / BLOBS_DIRNAME)
    stray, stray_data = _blob(6, 7000)
    await files.write_blobs({stray: stray_data})
    fake = Digest.of_bytes(b"what the name promises" * 100)
    await files.write_blobs({fake: b"something else entirely" * 100})

    report = await cache.verify()

    assert set(report.corrupt) == {inline_bad, file_bad}
    assert report.missing_files == (file_gone,)
    assert report.orphans_adopted == 1
    assert report.orphans_removed == 1
    assert report.database_problems == ()
    assert not report.ok
    assert report.blobs_checked == 5
    assert await cache.find_missing_blobs([inline_bad, file_bad, file_gone, stray, *healthy]) == {
        inline_bad,
        file_bad,
        file_gone,
    }
    assert await cache.read_blobs([stray, *healthy]) == {stray: stray_data, **healthy}
    assert files.local_path(fake) is None
    assert cache.statistics().corrupt_evicted == 2
    again = await cache.verify()
    assert again.ok
    assert again.blobs_checked == 3


# -- accounting, opening, configuration ----------------------------------------------------------


async def test_total_bytes_follows_writes_overwrites_and_evictions(cache: SqliteCache) -> None:
    a, b = _blob(1, 500), _blob(2, 5000)
    await cache.write_blobs(dict([a, b]))
    await cache.write_blobs(dict([a, b]))  # already held: adds nothing
    await cache.put_action("k", b"x" * 100)
    await cache.put_action("k", b"y" * 10)
    assert await cache.total_bytes() == 500 + 5000 + 1 + 10
    await cache.evict([b[0]])
    assert await cache.total_bytes() == 500 + 1 + 10


async def test_large_blobs_are_files_small_ones_inline(cache: SqliteCache) -> None:
    small, large = _blob(1, 1000), _blob(2, 1001)
    await cache.write_blobs(dict([small, large]))
    assert cache.local_path(small[0]) is None
    path = cache.local_path(large[0])
    assert path is not None and path.read_bytes() == large[1]
    rows = _sql(cache, "SELECT size, data IS NULL FROM blobs ORDER BY size")
    assert rows == [(1000, 0), (1001, 1)]


async def test_a_vanished_blob_file_is_a_miss(cache: SqliteCache) -> None:
    digest, data = _blob(1, 5000)
    await cache.write_blobs({digest: data})
    path = cache.local_path(digest)
    assert path is not None
    path.unlink()
    assert await cache.find_missing_blobs([digest]) == {digest}
    assert await cache.read_blobs([digest]) == {}
    await cache.write_blobs({digest: data})  # repaired by the next write
    assert await cache.read_blobs([digest]) == {digest: data}


async def test_another_schema_version_is_refused_clearly(tmp_path: Path) -> None:
    con = sqlite3.connect(tmp_path / DATABASE_NAME)
    con.execute("PRAGMA user_version = 99")
    con.close()
    cache = SqliteCache(SqliteCacheConfig(), tmp_path)
    with pytest.raises(CacheBackendError, match=r"schema version 99.*Delete"):
        await cache.open()
    await cache.aclose()


async def test_a_damaged_database_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DATABASE_NAME).write_bytes(b"this is not a database" * 100)
    cache = SqliteCache(SqliteCacheConfig(), tmp_path)
    with pytest.raises(CacheBackendError, match=r"cache\.sqlite3.*rulework cache verify"):
        await cache.get_action("key")
    await cache.aclose()


async def test_an_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cache = SqliteCache(SqliteCacheConfig(), tmp_path / "file" / "cache")
    with pytest.raises(CacheBackendError, match="RULEWORK_CACHE_DIR"):
        await cache.open()
    await cache.aclose()


async def test_open_is_idempotent_and_concurrent(tmp_path: Path) -> None:
    caches = [SqliteCache(SqliteCacheConfig(), tmp_path / "new") for _ in range(3)]
    async with trio.open_nursery() as nursery:
        for cache in caches:
            nursery.start_soon(cache.open)
            nursery.start_soon(cache.open)
    await caches[0].put_action("k", b"v")
    assert await caches[2].get_action("k") == b"v"
    for cache in caches:
        await cache.aclose()


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        SqliteCacheConfig(
            max_bytes=-1,
            inline_threshold="big",  # type: ignore[arg-type]
            loop_thread_reads="yes",  # type: ignore[arg-type]
            lock_timeout_seconds=0,
        )
    paths = [path for path, _ in info.value.problems]
    assert paths == [
        "cache.sqlite.max_bytes",
        "cache.sqlite.inline_threshold",
        "cache.sqlite.loop_thread_reads",
        "cache.sqlite.lock_timeout_seconds",
    ]


def test_config_defaults() -> None:
    config = SqliteCacheConfig()
    assert config.max_bytes == 10 * 1024**3
    assert config.inline_threshold == 64 * 1024
    assert SqliteCache.config_type is SqliteCacheConfig
