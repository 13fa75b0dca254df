"""`CacheBackendSuite`: the conformance tests every `CacheBackend` passes.

Subclass it in a test module (the subclass's name must start with `Test`) and override the
`backend` fixture; provide `corrupt` to run the corruption tests, and `second_backend` when
two instances can share one storage (a directory, a bucket), as in:

    class TestMyCache(CacheBackendSuite):
        @pytest.fixture
        async def backend(self, tmp_path):
            cache = MyCache(MyCacheConfig(root=tmp_path))
            yield cache
            await cache.aclose()

        @pytest.fixture
        def corrupt(self):
            async def corrupt(backend, digest):
                ...  # change the stored bytes of `digest` behind the backend's back
            return corrupt

Requirements the suite checks, beyond the `rulework.abc` docstrings:
- `statistics()` counts `action_hits`/`action_misses` per `get_action`, `blob_hits`/
  `blob_misses` per digest asked of `read_blobs`/`read_blob_to_file`, and `action_writes`,
  `blob_writes`, `bytes_read`, `bytes_written` at least for what was actually transferred.
- Operations are cancellable, and a cancelled write leaves the entry either absent or whole.
- After `aclose()` (idempotent) every operation raises `CacheBackendError`.
- Large blobs move through `read_blob_to_file` / `write_blob_from_file` without the backend
  holding more than `large_blob_peak_factor` times their size in memory at once.
"""

from __future__ import annotations

import tracemalloc
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import blake3
import pytest
import trio

from ..abc import CacheBackend
from ..engine.cache import encode_entry, open_cache_layer
from ..engine.errors import CacheBackendError
from ..engine.fs import Digest
from ..engine.store import CorruptBlobWarning

CorruptHook = Callable[[CacheBackend, Digest], Awaitable[None]]
"""`await corrupt(backend, digest)` changes the stored content of `digest` (same length or not)
without the backend noticing, the way a bad disk or a buggy writer would."""


def _blob(seed: int, size: int) -> bytes:
    # BLAKE3's extendable output: fast, deterministic, incompressible test data.
    return blake3.blake3(seed.to_bytes(8, "big")).digest(length=size)


def _blobs(count: int, size: int, first_seed: int = 0) -> dict[Digest, bytes]:
    out = {}
    for seed in range(first_seed, first_seed + count):
        data = _blob(seed, size)
        out[Digest.of_bytes(data)] = data
    return out


def _write_large_file(path: Path, size: int) -> Digest:
    hasher = blake3.blake3()
    chunk = 1 << 20
    with open(path, "wb") as f:
        written = 0
        seed = 1 << 40
        while written < size:
            data = _blob(seed, min(chunk, size - written))
            f.write(data)
            hasher.update(data)
            written += len(data)
            seed += 1
    return Digest(hasher.hexdigest(), size)


def _hash_file(path: Path) -> Digest:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = path.stat().st_size
    if size:
        hasher.update_mmap(path)
    return Digest(hasher.hexdigest(), size)


class CacheBackendSuite:
    """Conformance tests for a `CacheBackend`; see the module docstring for how to use it."""

    #: Size of the blob streamed by the large-blob tests (the issue asks for 100 MB).
    large_blob_size: ClassVar[int] = 100 * 1024 * 1024
    #: Peak Python memory allowed while streaming a large blob, as a multiple of its size.
    #: 1.5 allows a backend that keeps blobs in memory to hold one copy, never two.
    large_blob_peak_factor: ClassVar[float] = 1.5
    #: Whether `evict` deletes blobs from the backend's storage. REAPI has no delete: a corrupt
    #: blob stays on the server (a rewrite does not replace it), so each read meets (and
    #: counts) it again; it is still reported once and never served.
    evicts_from_storage: ClassVar[bool] = True

    # -- fixtures a subclass overrides -------------------------------------------------------

    @pytest.fixture
    async def backend(self) -> AsyncIterator[CacheBackend]:
        """An opened, empty backend, closed after the test. Override this."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the `backend` fixture (see CacheBackendSuite)"
        )
        yield  # pragma: no cover

    @pytest.fixture
    async def second_backend(self, backend: CacheBackend) -> AsyncIterator[CacheBackend]:
        """Another instance over the same storage as `backend` (a second connection to the
        same directory or bucket). Override it; the default, for backends without shared
        storage (an in-memory cache), is `backend` itself."""
        yield backend

    @pytest.fixture
    def corrupt(self) -> CorruptHook | None:
        """A hook that corrupts a stored blob; override to enable the corruption tests."""
        return None

    @pytest.fixture(scope="class")
    @classmethod
    def large_file(cls, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Digest]:
        """A `large_blob_size` file of incompressible bytes, made once per test class."""
        path = tmp_path_factory.mktemp("large-blob") / "large.bin"
        return path, _write_large_file(path, cls.large_blob_size)

    # -- the action cache ----------------------------------------------------------------------

    async def test_action_round_trip(self, backend: CacheBackend) -> None:
        await backend.put_action("a" * 64, b"value")
        assert await backend.get_action("a" * 64) == b"value"

    async def test_action_overwrite_replaces_the_value(self, backend: CacheBackend) -> None:
        await backend.put_action("b" * 64, b"old")
        await backend.put_action("b" * 64, b"new value, longer")
        assert await backend.get_action("b" * 64) == b"new value, longer"

    async def test_missing_action_is_none(self, backend: CacheBackend) -> None:
        assert await backend.get_action("0" * 64) is None

    async def test_action_values_are_arbitrary_bytes(self, backend: CacheBackend) -> None:
        values = {
            "c" * 64: b"",
            "d" * 64: bytes(range(256)) * 4,
            "e" * 64: _blob(7, 1024 * 1024),
        }
        for key, value in values.items():
            await backend.put_action(key, value)
        for key, value in values.items():
            assert await backend.get_action(key) == value

    # -- blobs -----------------------------------------------------------------------------------

    async def test_blob_round_trip(self, backend: CacheBackend) -> None:
        # The empty blob, tiny ones, and sizes on both sides of usual inline thresholds.
        blobs = {Digest.of_bytes(b""): b""}
        for seed, size in enumerate((1, 100, 64 * 1024, 64 * 1024 + 1, 300_000, 2_000_000)):
            data = _blob(seed, size)
            blobs[Digest.of_bytes(data)] = data
        assert await backend.find_missing_blobs(blobs) == frozenset(blobs)
        await backend.write_blobs(blobs)
        assert await backend.find_missing_blobs(blobs) == frozenset()
        assert await backend.read_blobs(blobs) == blobs

    async def test_absent_blobs_are_left_out(self, backend: CacheBackend) -> None:
        present = _blobs(3, 50)
        absent = _blobs(2, 50, first_seed=100)
        await backend.write_blobs(present)
        asked = [*present, *absent]
        assert await backend.find_missing_blobs(asked) == frozenset(absent)
        assert await backend.read_blobs(asked) == present

    async def test_empty_batches(self, backend: CacheBackend) -> None:
        assert await backend.find_missing_blobs([]) == frozenset()
        assert await backend.read_blobs([]) == {}
        await backend.write_blobs({})
        await backend.evict([])

    async def test_batches_accept_iterators_and_duplicates(self, backend: CacheBackend) -> None:
        blobs = _blobs(3, 10)
        await backend.write_blobs(blobs)
        digests = list(blobs)
        assert await backend.find_missing_blobs(iter(digests + digests)) == frozenset()
        assert await backend.read_blobs(iter(digests + digests)) == blobs

    async def test_writing_a_held_blob_is_harmless(self, backend: CacheBackend) -> None:
        blobs = _blobs(2, 1000)
        await backend.write_blobs(blobs)
        await backend.write_blobs(blobs)
        assert await backend.read_blobs(blobs) == blobs

    async def test_many_blobs_in_one_batch(self, backend: CacheBackend) -> None:
        blobs = _blobs(1500, 64)
        await backend.write_blobs(blobs)
        assert await backend.find_missing_blobs(blobs) == frozenset()
        assert await backend.read_blobs(blobs) == blobs

    async def test_evict(self, backend: CacheBackend) -> None:
        blobs = _blobs(3, 200_000)
        blobs.update(_blobs(3, 20, first_seed=10))
        await backend.write_blobs(blobs)
        gone = list(blobs)[::2]
        await backend.evict([*gone, *_blobs(1, 5, first_seed=99)])
        assert await backend.find_missing_blobs(blobs) == frozenset(gone)
        kept = {d: v for d, v in blobs.items() if d not in gone}
        assert await backend.read_blobs(blobs) == kept
        # An evicted blob can be written again.
        await backend.write_blobs({d: blobs[d] for d in gone})
        assert await backend.read_blobs(blobs) == blobs

    async def test_blob_files_round_trip(self, backend: CacheBackend, tmp_path: Path) -> None:
        for seed, size in enumerate((0, 10, 3_000_000)):
            data = _blob(seed, size)
            digest = Digest.of_bytes(data)
            src = tmp_path / f"src-{seed}"
            src.write_bytes(data)
            await backend.write_blob_from_file(digest, src)
            assert await backend.find_missing_blobs([digest]) == frozenset()
            dest = tmp_path / f"dest-{seed}"
            assert await backend.read_blob_to_file(digest, dest) is True
            assert dest.read_bytes() == data
            assert (await backend.read_blobs([digest]))[digest] == data

    async def test_read_absent_blob_to_file(self, backend: CacheBackend, tmp_path: Path) -> None:
        dest = tmp_path / "dest"
        assert await backend.read_blob_to_file(Digest.of_bytes(b"never written"), dest) is False
        assert not dest.exists() or dest.stat().st_size == 0

    # -- concurrency -----------------------------------------------------------------------------

    async def test_concurrent_writers_of_the_same_key(self, backend: CacheBackend) -> None:
        key = "f" * 64
        values = [_blob(i, 10_000 + i) for i in range(12)]
        seen: list[bytes | None] = []

        async def write(value: bytes) -> None:
            await backend.put_action(key, value)

        async def read() -> None:
            for _ in range(5):
                seen.append(await backend.get_action(key))

        async with trio.open_nursery() as nursery:
            for value in values:
                nursery.start_soon(write, value)
                nursery.start_soon(read)
        final = await backend.get_action(key)
        assert final in values
        # A reader sees nothing or one whole value, never a mix.
        assert all(v is None or v in values for v in seen)

    async def test_concurrent_writers_of_the_same_blobs(self, backend: CacheBackend) -> None:
        blobs = _blobs(20, 5000)
        blobs.update(_blobs(2, 500_000, first_seed=50))
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(backend.write_blobs, blobs)
        assert await backend.read_blobs(blobs) == blobs

    async def test_two_instances_share_storage(
        self, backend: CacheBackend, second_backend: CacheBackend
    ) -> None:
        blobs = _blobs(5, 100_000)
        key = "9" * 64
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.write_blobs, blobs)
            nursery.start_soon(second_backend.write_blobs, blobs)
            nursery.start_soon(backend.put_action, key, b"one")
            nursery.start_soon(second_backend.put_action, key, b"two")
        assert await second_backend.read_blobs(blobs) == blobs
        assert await backend.read_blobs(blobs) == blobs
        assert await backend.get_action(key) in (b"one", b"two")
        assert await backend.get_action(key) == await second_backend.get_action(key)

    # -- cancellation ----------------------------------------------------------------------------

    async def test_cancelled_put_leaves_no_partial_entry(self, backend: CacheBackend) -> None:
        # Cancel after 0, 1, 2... scheduling steps, so that every await point of a put is hit.
        for ticks in range(12):
            key = f"{ticks:064x}"
            value = _blob(ticks, 100_000)
            blobs = _blobs(3, 30_000 + ticks, first_seed=1000 + 10 * ticks)
            blobs.update(_blobs(1, 400_000 + ticks, first_seed=2000 + ticks))

            async def put() -> None:
                await backend.write_blobs(blobs)  # noqa: B023 - run within this iteration
                await backend.put_action(key, value)  # noqa: B023

            await _cancel_after(ticks, put)
            assert await backend.get_action(key) in (None, value)
            found = await backend.read_blobs(blobs)
            assert all(found[d] == blobs[d] for d in found)
        # The backend still works afterwards.
        await backend.put_action("1" * 64, b"after")
        assert await backend.get_action("1" * 64) == b"after"

    async def test_cancelled_file_write_leaves_no_partial_blob(
        self, backend: CacheBackend, tmp_path: Path
    ) -> None:
        size = 20 * 1024 * 1024
        src = tmp_path / "src"
        digest = await trio.to_thread.run_sync(_write_large_file, src, size)
        for ticks in (0, 1, 3, 10, 50):
            await _cancel_after(ticks, lambda: backend.write_blob_from_file(digest, src))
            dest = tmp_path / "dest"
            if await backend.read_blob_to_file(digest, dest):
                assert await trio.to_thread.run_sync(_hash_file, dest) == digest
                await backend.evict([digest])
            else:
                assert await backend.find_missing_blobs([digest]) == frozenset([digest])
        await backend.write_blob_from_file(digest, src)
        assert await backend.find_missing_blobs([digest]) == frozenset()

    # -- large blobs -----------------------------------------------------------------------------

    async def test_large_blob_is_streamed(
        self, backend: CacheBackend, large_file: tuple[Path, Digest], tmp_path: Path
    ) -> None:
        src, digest = large_file
        limit = int(self.large_blob_peak_factor * digest.serialized_bytes_length)
        tracemalloc.start()
        try:
            await backend.write_blob_from_file(digest, src)
            _, write_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            dest = tmp_path / "large.out"
            assert await backend.read_blob_to_file(digest, dest) is True
            _, read_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert write_peak < limit, f"writing held {write_peak} bytes at once (limit {limit})"
        assert read_peak < limit, f"reading held {read_peak} bytes at once (limit {limit})"
        assert await trio.to_thread.run_sync(_hash_file, dest) == digest
        await trio.to_thread.run_sync(dest.unlink)

    # -- corruption ------------------------------------------------------------------------------

    async def test_corrupt_blob_is_never_served(
        self, backend: CacheBackend, corrupt: CorruptHook | None
    ) -> None:
        """Through a cache layer reading this backend as its remote: a corrupt blob makes the
        entry a miss, is evicted from the backend, and is reported once; rewriting repairs."""
        if corrupt is None:
            pytest.skip(f"{type(self).__name__} provides no `corrupt` fixture")
        from ..backends.memory import MemoryCache

        for size in (1000, 9 * 1024 * 1024):  # in memory, and streamed through a file
            data = _blob(size, size)
            digest = Digest.of_bytes(data)
            key = f"{size:064x}"
            await backend.write_blobs({digest: data})
            await backend.put_action(key, encode_entry(b"value", [digest]))
            await corrupt(backend, digest)
            local = MemoryCache()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                async with open_cache_layer(local, backend, remote_write=False) as layer:
                    assert await layer.get_action(key) is None
                    assert await layer.get_action(key) is None
                    stats = layer.statistics()
            await local.aclose()
            assert not stats.remote_degraded
            reports = [w for w in caught if digest.fingerprint in str(w.message)]
            assert len(reports) == 1, [str(w.message) for w in caught]
            assert issubclass(reports[0].category, CorruptBlobWarning)
            if self.evicts_from_storage:
                assert stats.corrupt_blobs == 1
                assert await backend.find_missing_blobs([digest]) == frozenset([digest])
            else:
                assert stats.corrupt_blobs == 2  # met by both reads, reported once
            # The next write repairs the entry where the blob could be evicted; where the bad
            # copy stays (the server keeps the first copy of a digest), it is still never served.
            await backend.write_blobs({digest: data})
            local = MemoryCache()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CorruptBlobWarning)
                async with open_cache_layer(local, backend, remote_write=False) as layer:
                    found = await layer.get_action(key)
            if self.evicts_from_storage:
                assert found == (b"value", "remote_cache")
                assert await local.read_blobs([digest]) == {digest: data}
            else:
                assert found is None
                assert await local.read_blobs([digest]) == {}
            await local.aclose()

    # -- statistics and closing ------------------------------------------------------------------

    async def test_statistics_are_counted(self, backend: CacheBackend, tmp_path: Path) -> None:
        before = backend.statistics()
        blobs = _blobs(2, 300)
        absent = Digest.of_bytes(b"absent")
        await backend.put_action("7" * 64, b"12345")
        assert await backend.get_action("7" * 64) == b"12345"
        assert await backend.get_action("8" * 64) is None
        await backend.write_blobs(blobs)
        await backend.read_blobs([*blobs, absent])
        first = next(iter(blobs))
        assert await backend.read_blob_to_file(first, tmp_path / "out") is True
        assert await backend.read_blob_to_file(absent, tmp_path / "none") is False
        after = backend.statistics()
        assert after.action_hits - before.action_hits == 1
        assert after.action_misses - before.action_misses == 1
        assert after.action_writes - before.action_writes >= 1
        assert after.blob_hits - before.blob_hits == 3
        assert after.blob_misses - before.blob_misses == 2
        assert after.blob_writes - before.blob_writes >= 2
        assert after.bytes_read - before.bytes_read >= 5 + 3 * 300
        assert after.bytes_written - before.bytes_written >= 5 + 2 * 300

    async def test_closed_backend_raises(self, backend: CacheBackend) -> None:
        await backend.aclose()
        await backend.aclose()  # idempotent
        with pytest.raises(CacheBackendError):
            await backend.get_action("a" * 64)
        with pytest.raises(CacheBackendError):
            await backend.write_blobs(_blobs(1, 10))


async def _cancel_after(ticks: int, operation: Callable[[], Awaitable[object]]) -> None:
    """Run `operation`, cancelling it after `ticks` scheduling steps of another task."""
    with trio.CancelScope() as scope:

        async def cancel() -> None:
            for _ in range(ticks):
                await trio.lowlevel.checkpoint()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel)
            await operation()
            nursery.cancel_scope.cancel()


__all__ = ["CacheBackendSuite", "CorruptHook"]
