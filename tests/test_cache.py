"""The cache layer: local + remote backends used as one action cache.

The "remote" here is a second local-type backend (sqlite in its own directory, or memory):
real backends, not mocks. The S3 backend's own tests cover a remote over the network.
"""

from __future__ import annotations

import sqlite3
import sys
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from rulework.abc import CacheBackend
from rulework.backends.local import LocalExecutor
from rulework.backends.memory import MemoryCache, MemoryCacheConfig
from rulework.backends.sqlite import DATABASE_NAME, SqliteCache, SqliteCacheConfig
from rulework.engine.cache import (
    ActionWrite,
    CacheLayer,
    RemoteCacheWarning,
    decode_entry,
    encode_entry,
    open_cache_layer,
)
from rulework.engine.errors import CacheError
from rulework.engine.fs import (
    EMPTY_DIGEST,
    EMPTY_FILE_DIGEST,
    CreateDigest,
    Digest,
    Directory,
    FileContent,
)
from rulework.engine.process import FallibleProcessResult, Process, ProcessRunner
from rulework.engine.store import CorruptBlobWarning, MemoryBlobStore, Store

KEY = "ab" * 32
BIG = 9 * 1024 * 1024  # above the layer's streaming threshold


@pytest.fixture
async def sqlite_factory(tmp_path: Path) -> AsyncIterator[Callable[[str], SqliteCache]]:
    """Makes sqlite caches in separate directories; closes them all afterwards."""
    made: list[SqliteCache] = []

    def make(name: str, **options: object) -> SqliteCache:
        cache = SqliteCache(SqliteCacheConfig(**options), tmp_path / name)  # type: ignore[arg-type]
        made.append(cache)
        return cache

    yield make
    for cache in made:
        await cache.aclose()


async def _outputs(layer: CacheLayer, tag: bytes = b"") -> tuple[Digest, Digest, Digest]:
    """Store what a process run would: stdout, stderr, and an output tree with a large file."""
    store = Store(layer.local_blobs)
    stdout = await store.store_bytes(b"out " + tag)
    stderr = await store.store_bytes(b"err " + tag)
    tree = await store.create_digest(
        CreateDigest(
            [
                FileContent("bin/tool", b"#!/bin/sh\n" + tag, is_executable=True),
                FileContent("data/a.txt", b"a" * 1000 + tag),
                FileContent("data/nested/b.txt", b"b" * 70_000 + tag),
                FileContent("data/big.bin", tag + b"\x01" * BIG),
                FileContent("empty.txt", b""),
                Directory("logs"),
            ]
        )
    )
    return stdout, stderr, tree


async def _put(
    layer: CacheLayer, key: str = KEY, tag: bytes = b""
) -> tuple[Digest, Digest, Digest]:
    stdout, stderr, tree = await _outputs(layer, tag)
    await layer.put_action(key, b"value " + tag, digests=(stdout, stderr), tree_roots=(tree,))
    return stdout, stderr, tree


async def _assert_tree_local(
    layer: CacheLayer, outputs: tuple[Digest, Digest, Digest], tag: bytes = b""
) -> None:
    store = Store(layer.local_blobs)
    stdout, stderr, tree = outputs
    assert await store.load_bytes(stdout) == b"out " + tag
    assert await store.load_bytes(stderr) == b"err " + tag
    contents = {f.path: f.content for f in await store.contents(tree)}
    assert contents["data/big.bin"] == tag + b"\x01" * BIG
    assert contents["data/nested/b.txt"] == b"b" * 70_000 + tag


# -- the entry format ----------------------------------------------------------------------------


def test_entry_round_trip() -> None:
    blobs = [Digest.of_bytes(b"x"), Digest.of_bytes(b"y" * 100)]
    entry = encode_entry(b"\x00value", [*blobs, blobs[0]])
    assert decode_entry(entry) == (b"\x00value", tuple(sorted(blobs)))
    assert decode_entry(encode_entry(b"", [])) == (b"", ())


@pytest.mark.parametrize(
    "raw", [b"", b"rwc1", b"{json: 1}", encode_entry(b"v", [EMPTY_DIGEST])[:-10]]
)
def test_foreign_or_truncated_entries_are_not_entries(raw: bytes) -> None:
    assert decode_entry(raw) is None


# -- local only ----------------------------------------------------------------------------------


async def test_local_hit_and_miss() -> None:
    local = MemoryCache()
    async with open_cache_layer(local, None) as layer:
        assert await layer.get_action(KEY) is None
        await _put(layer)
        assert await layer.get_action(KEY) == (b"value ", "local_cache")
        stats = layer.statistics()
    assert (stats.local_hits, stats.remote_hits, stats.misses, stats.writes) == (1, 0, 1, 1)
    assert stats.local is not None and stats.local.action_hits == 1
    assert stats.remote is None


async def test_an_entry_whose_blobs_are_gone_is_a_miss_and_is_repaired(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    local = sqlite_factory("local")
    async with open_cache_layer(local, None) as layer:
        stdout, _, _ = await _put(layer)
        await local.evict([stdout])
        assert await layer.get_action(KEY) is None
        assert layer.statistics().incomplete_entries == 1
        await _put(layer)  # the next run rewrites the blob and the entry
        assert await layer.get_action(KEY) == (b"value ", "local_cache")


async def test_a_foreign_value_in_the_backend_is_a_miss() -> None:
    local = MemoryCache()
    await local.put_action(KEY, b'{"not": "an entry of this layer"}')
    async with open_cache_layer(local, None) as layer:
        assert await layer.get_action(KEY) is None


async def test_put_refuses_entries_naming_absent_blobs() -> None:
    async with open_cache_layer(MemoryCache(), None) as layer:
        absent = Digest.of_bytes(b"never stored")
        with pytest.raises(CacheError, match="not in the local store"):
            await layer.put_action(KEY, b"v", digests=[absent])
        with pytest.raises(CacheError, match="tree it refers to is incomplete"):
            await layer.put_action(KEY, b"v", tree_roots=[absent])
        assert await layer.get_action(KEY) is None


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_put_actions_stores_the_good_entries_and_names_the_bad(
    backend: str, sqlite_factory: Callable[..., SqliteCache]
) -> None:
    # sqlite takes all entries in one call (put_actions); memory gets one put_action each.
    local: CacheBackend = MemoryCache() if backend == "memory" else sqlite_factory("local")
    async with open_cache_layer(local, None) as layer:
        outputs = [await _outputs(layer, b"%d" % i) for i in range(3)]
        absent = Digest.of_bytes(b"never stored")
        writes = [
            ActionWrite(f"{i:064x}", b"value %d" % i, (stdout, stderr), (tree,))
            for i, (stdout, stderr, tree) in enumerate(outputs)
        ]
        writes.append(ActionWrite("ee" * 32, b"names an absent blob", (absent,)))
        writes.append(ActionWrite("ff" * 32, b"names an absent tree", (), (absent,)))
        failed = await layer.put_actions(writes)
        assert set(failed) == {"ee" * 32, "ff" * 32}
        assert "not in the local store" in str(failed["ee" * 32])
        assert "tree it refers to is incomplete" in str(failed["ff" * 32])
        for i in range(3):
            assert await layer.get_action(f"{i:064x}") == (b"value %d" % i, "local_cache")
        assert await layer.get_action("ee" * 32) is None
        assert layer.statistics().writes == 3


async def test_intrinsic_blobs_need_not_be_stored() -> None:
    async with open_cache_layer(MemoryCache(), None) as layer:
        await layer.put_action(KEY, b"v", digests=[EMPTY_FILE_DIGEST], tree_roots=[EMPTY_DIGEST])
        assert await layer.get_action(KEY) == (b"v", "local_cache")


# -- local + remote ------------------------------------------------------------------------------


@pytest.mark.parametrize("remote_kind", ["sqlite", "memory"])
async def test_a_remote_hit_fills_the_local_cache(
    sqlite_factory: Callable[..., SqliteCache], remote_kind: str
) -> None:
    remote: CacheBackend = sqlite_factory("remote") if remote_kind == "sqlite" else MemoryCache()
    first = sqlite_factory("first")
    async with open_cache_layer(first, remote) as layer:
        outputs = await _put(layer)
    assert layer.statistics().remote_writes == 1
    uploaded = layer.statistics().blobs_uploaded
    assert uploaded >= 7  # stdout, stderr, 4 non-empty files, directories

    second = sqlite_factory("second")
    async with open_cache_layer(second, remote) as layer:
        assert await layer.get_action(KEY) == (b"value ", "remote_cache")
        await _assert_tree_local(layer, outputs)
        # Now it is local: the remote is not asked again.
        remote_hits_before = remote.statistics().action_hits
        assert await layer.get_action(KEY) == (b"value ", "local_cache")
        assert remote.statistics().action_hits == remote_hits_before
        stats = layer.statistics()
    assert (stats.remote_hits, stats.local_hits) == (1, 1)
    # Small blobs travel inside the remote entry: one request instead of one per blob.
    assert stats.blobs_inline >= 6
    assert stats.blobs_downloaded + stats.blobs_inline == uploaded
    assert stats.remote_failures == 0


async def test_without_a_local_cache_blobs_are_kept_in_memory(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    remote = sqlite_factory("remote")
    async with open_cache_layer(sqlite_factory("first"), remote) as layer:
        outputs = await _put(layer, tag=b"x")
    async with open_cache_layer(None, remote) as layer:
        assert isinstance(layer.local_blobs, MemoryBlobStore)
        assert await layer.get_action(KEY) == (b"value x", "remote_cache")
        await _assert_tree_local(layer, outputs, tag=b"x")
        await _put(layer, key="cd" * 32, tag=b"y")  # no local cache: straight to the remote
    assert await remote.get_action("cd" * 32) is not None


async def test_local_entry_with_blobs_missing_locally_is_completed_from_the_remote(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    local, remote = sqlite_factory("local"), sqlite_factory("remote")
    async with open_cache_layer(local, remote) as layer:
        stdout, _, tree = await _put(layer)
    big = [d for d in await Store(local).tree_blobs(tree) if d.serialized_bytes_length >= BIG]
    await local.evict([stdout, *big])
    async with open_cache_layer(local, remote) as layer:
        assert await layer.get_action(KEY) == (b"value ", "local_cache")
        assert layer.statistics().blobs_downloaded == 2
    assert await local.find_missing_blobs([stdout, *big]) == frozenset()


async def test_ensure_blobs_fetches_whole_trees(sqlite_factory: Callable[..., SqliteCache]) -> None:
    remote = sqlite_factory("remote")
    async with open_cache_layer(sqlite_factory("first"), remote) as layer:
        outputs = await _put(layer)
    async with open_cache_layer(sqlite_factory("second"), remote) as layer:
        stdout, stderr, tree = outputs
        assert await layer.ensure_blobs([stdout, stderr], tree_roots=[tree])
        await _assert_tree_local(layer, outputs)
        assert not await layer.ensure_blobs([Digest.of_bytes(b"nowhere")])
        assert not await layer.ensure_blobs([], tree_roots=[Digest.of_bytes(b"no tree")])


async def test_remote_read_and_write_can_be_switched_off(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    remote = sqlite_factory("remote")
    async with open_cache_layer(sqlite_factory("a"), remote, remote_write=False) as layer:
        await _put(layer)
    assert await remote.get_action(KEY) is None
    assert layer.statistics().remote_writes == 0

    async with open_cache_layer(sqlite_factory("b"), remote) as layer:
        await _put(layer)
    assert await remote.get_action(KEY) is not None

    remote_reads = remote.statistics().action_hits + remote.statistics().action_misses
    async with open_cache_layer(sqlite_factory("c"), remote, remote_read=False) as layer:
        assert await layer.get_action(KEY) is None
    assert remote.statistics().action_hits + remote.statistics().action_misses == remote_reads


async def test_uploads_run_in_the_background_and_are_flushed_on_close(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    remote = sqlite_factory("remote")
    keys = [f"{i:064x}" for i in range(5)]
    async with open_cache_layer(sqlite_factory("local"), remote, upload_concurrency=2) as layer:
        store = Store(layer.local_blobs)
        for i, key in enumerate(keys):
            blob = await store.store_bytes(b"output %d" % i)
            await layer.put_action(key, b"v%d" % i, digests=[blob])
        # put_action returned before the uploads: they are queued or running.
        assert layer.statistics().uploads_pending > 0
    stats = layer.statistics()
    assert (stats.remote_writes, stats.uploads_pending, stats.uploads_abandoned) == (5, 0, 0)
    for i, key in enumerate(keys):
        entry = decode_entry(await remote.get_action(key) or b"")
        assert entry is not None and entry[0] == b"v%d" % i
        assert await remote.find_missing_blobs(entry[1]) == frozenset()


async def test_uploads_are_flushed_when_the_body_fails(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    remote = sqlite_factory("remote")
    with pytest.raises(ValueError, match="workflow failed"):
        async with open_cache_layer(sqlite_factory("local"), remote) as layer:
            await _put(layer)
            raise ValueError("workflow failed")
    assert await remote.get_action(KEY) is not None


async def test_cancellation_abandons_uploads_at_once(
    sqlite_factory: Callable[..., SqliteCache], tmp_path: Path
) -> None:
    remote = sqlite_factory("remote")
    await remote.open()
    blocker = sqlite3.connect(tmp_path / "remote" / DATABASE_NAME, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the remote cannot write: uploads wait
    try:
        with trio.CancelScope() as scope, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with open_cache_layer(sqlite_factory("local"), remote, flush_timeout=60) as layer:
                await _put(layer)
                scope.cancel()
                await trio.sleep_forever()
        assert layer.statistics().uploads_abandoned == 1
        assert any("did not finish" in str(w.message) for w in caught)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await remote.get_action(KEY) is None


async def test_a_slow_flush_is_bounded(
    sqlite_factory: Callable[..., SqliteCache], tmp_path: Path
) -> None:
    remote = sqlite_factory("remote")
    await remote.open()
    blocker = sqlite3.connect(tmp_path / "remote" / DATABASE_NAME, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.warns(RemoteCacheWarning, match=r"1 upload\(s\) .* did not finish"):
            with trio.fail_after(30):  # a safety net; the flush gives up after 0.2 s
                async with open_cache_layer(
                    sqlite_factory("local"), remote, flush_timeout=0.2, remote_timeout=60
                ) as layer:
                    await _put(layer)
        stats = layer.statistics()
        assert stats.uploads_abandoned == 1
        assert stats.remote_failures == 0  # abandoned, not failed
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


# -- remote faults -------------------------------------------------------------------------------


async def test_a_remote_that_is_down_degrades_to_local_only_with_one_warning(
    sqlite_factory: Callable[..., SqliteCache], tmp_path: Path
) -> None:
    (tmp_path / "not-a-dir").write_text("")
    unreachable = SqliteCache(SqliteCacheConfig(), tmp_path / "not-a-dir" / "remote")
    local = sqlite_factory("local")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with open_cache_layer(local, unreachable) as layer:
            assert await layer.get_action(KEY) is None  # remote read fails: a miss
            for i in range(3):
                await _put(layer, key=f"{i:064x}", tag=b"%d" % i)
            for i in range(3):
                assert await layer.get_action(f"{i:064x}") == (b"value %d" % i, "local_cache")
            assert await layer.get_action("ef" * 32) is None
    remote_warnings = [w for w in caught if issubclass(w.category, RemoteCacheWarning)]
    assert len(remote_warnings) == 1, [str(w.message) for w in caught]
    assert "CacheBackendError" in str(remote_warnings[0].message)
    assert "local cache only" in str(remote_warnings[0].message)
    stats = layer.statistics()
    assert stats.remote_degraded
    assert stats.remote_failures == 1
    assert stats.remote_skipped >= 4  # three uploads and one lookup not even attempted
    assert stats.local_hits == 3
    await unreachable.aclose()


async def test_a_slow_remote_times_out_and_degrades(
    sqlite_factory: Callable[..., SqliteCache], tmp_path: Path
) -> None:
    # Another process holds the remote database exclusively: opening it waits, and waits.
    holder_dir = tmp_path / "remote"
    created = SqliteCache(SqliteCacheConfig(), holder_dir)
    await created.open()
    await created.aclose()
    holder = sqlite3.connect(holder_dir / DATABASE_NAME, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("COMMIT")
    remote = sqlite_factory("remote")
    try:
        with pytest.warns(RemoteCacheWarning, match=r"no answer within 0\.3s"):
            with trio.fail_after(30):  # safety net only
                async with open_cache_layer(
                    sqlite_factory("local"), remote, remote_timeout=0.3
                ) as layer:
                    assert await layer.get_action(KEY) is None
                    await _put(layer)
                    assert await layer.get_action(KEY) == (b"value ", "local_cache")
        assert layer.statistics().remote_failures == 1
    finally:
        holder.close()


async def test_a_closed_remote_is_a_fault_not_a_crash(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    remote = MemoryCache()
    await remote.aclose()
    with pytest.warns(RemoteCacheWarning):
        async with open_cache_layer(MemoryCache(), remote) as layer:
            await _put(layer)
            assert await layer.get_action(KEY) == (b"value ", "local_cache")
    assert layer.statistics().remote_degraded


# -- corruption ----------------------------------------------------------------------------------


async def test_a_corrupt_local_blob_is_not_uploaded(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    local = MemoryCache(MemoryCacheConfig(max_bytes=None))
    remote = sqlite_factory("remote")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with open_cache_layer(local, remote, remote_read=False) as layer:
            blob = await Store(layer.local_blobs).store_bytes(b"precious output")
            local._entries[blob] = b"precious outpuT"  # the disk flipped a bit
            await layer.put_action(KEY, b"v", digests=[blob])
    assert [issubclass(w.category, CorruptBlobWarning) for w in caught] == [True]
    assert layer.statistics().corrupt_blobs == 1
    assert layer.statistics().remote_writes == 0
    assert await remote.get_action(KEY) is None  # never an entry without its blobs
    assert await local.find_missing_blobs([blob]) == {blob}  # evicted


# -- argument checking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("flush_timeout", -1), ("remote_timeout", float("nan")), ("upload_concurrency", 0)],
)
async def test_bad_options_are_rejected(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        async with open_cache_layer(None, None, **{option: value}):  # type: ignore[arg-type]
            pass


# -- with the process runner ---------------------------------------------------------------------


async def test_two_runners_with_separate_local_caches_share_results_through_the_remote(
    sqlite_factory: Callable[..., SqliteCache],
) -> None:
    remote = sqlite_factory("remote")
    script = (
        "import pathlib; out = pathlib.Path('out'); out.mkdir(); "
        "(out / 'big.bin').write_bytes(b'x' * 200_000); (out / 'note.txt').write_text('hi'); "
        "print('ran')"
    )
    process = Process((sys.executable, "-c", script), output_directories=("out",))

    async def run(local: SqliteCache) -> tuple[FallibleProcessResult, int, dict[str, bytes]]:
        async with open_cache_layer(local, remote) as layer:
            store = Store(layer.local_blobs)
            async with ProcessRunner(
                {"local": LocalExecutor("local")}, "local", store, layer
            ) as runner:
                result = await runner.run(process)
                files = {f.path: f.content for f in await store.contents(result.output_digest)}
        return result, runner.statistics().ran, files

    first, ran, files = await run(sqlite_factory("first"))
    assert (first.metadata.source, ran) == ("ran", 1)
    second, ran, second_files = await run(sqlite_factory("second"))
    assert (second.metadata.source, ran) == ("remote_cache", 0)
    assert (second.exit_code, second.stdout, second.output_digest) == (
        0,
        b"ran\n",
        first.output_digest,
    )
    assert second_files == files == {"out/big.bin": b"x" * 200_000, "out/note.txt": b"hi"}
