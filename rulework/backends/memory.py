"""The `memory` cache backend: a bounded in-process LRU cache, for tests and short sessions.

Nothing survives the process. Action entries and blobs share one LRU order and one byte budget
(`max_bytes`): when a write would exceed it, the least recently used entries are dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import trio

from ..abc import CacheStatistics
from ..engine.errors import CacheBackendError, ConfigError
from ..engine.fs import Digest

_MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class MemoryCacheConfig:
    """`[cache.memory]`: `max_bytes` bounds action entries plus blobs (None: unbounded)."""

    max_bytes: int | None = 512 * _MiB

    def __post_init__(self) -> None:
        if self.max_bytes is not None and (
            isinstance(self.max_bytes, bool)
            or not isinstance(self.max_bytes, int)
            or self.max_bytes <= 0
        ):
            raise ConfigError(
                "[cache.memory]",
                [
                    (
                        "cache.memory.max_bytes",
                        f"must be a positive integer (bytes), found {self.max_bytes!r} "
                        f"of type {type(self.max_bytes).__name__}; omit it for the default "
                        f"of {512 * _MiB} (512 MiB)",
                    )
                ],
            )


@dataclass(slots=True)
class CacheCounters:
    """The mutable counters behind a backend's `statistics()` (the record itself is frozen)."""

    action_hits: int = 0
    action_misses: int = 0
    action_writes: int = 0
    blob_hits: int = 0
    blob_misses: int = 0
    blob_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt_evicted: int = 0
    errors: int = 0

    def snapshot(self) -> CacheStatistics:
        return CacheStatistics(**{name: getattr(self, name) for name in _STATISTICS_FIELDS})


_STATISTICS_FIELDS = tuple(CacheStatistics.__dataclass_fields__)


class MemoryCache:
    """An in-memory `CacheBackend` with LRU eviction by bytes over action entries and blobs.

    Constructed as `MemoryCache(config)` (or `MemoryCache()` for the defaults); it needs no
    opening. Every operation is atomic with respect to trio cancellation: a mutation never
    spans an await. A single entry larger than `max_bytes` is not kept at all.

    As the local cache it is also the session's blob store: a session that produces more than
    `max_bytes` may find its oldest blobs evicted (a cache entry naming them becomes a miss and
    the process runs again; a digest a rule still holds fails with `MissingDigestError`). Size
    `max_bytes` for the session, or use `None` (unbounded) for short-lived ones.

    Example:
        cache = MemoryCache(MemoryCacheConfig(max_bytes=64 * 1024 * 1024))
        await cache.put_action("key", b"value")
        assert await cache.get_action("key") == b"value"
    """

    config_type: ClassVar[type[MemoryCacheConfig]] = MemoryCacheConfig

    def __init__(self, config: MemoryCacheConfig | None = None) -> None:
        self.config = config if config is not None else MemoryCacheConfig()
        # One LRU order over both kinds of entries: action keys are `str`, blobs are `Digest`,
        # and the two never compare equal. Oldest first.
        # Invariant: self._bytes == sum(self._cost(k, v) for k, v in self._entries.items())
        #            and (max_bytes is None or self._bytes <= max_bytes) between operations.
        self._entries: OrderedDict[str | Digest, bytes] = OrderedDict()
        self._bytes = 0
        self._counters = CacheCounters()
        self._closed = False

    # -- bookkeeping ---------------------------------------------------------------------------

    @staticmethod
    def _cost(key: str | Digest, value: bytes) -> int:
        # Action keys count too, so that many tiny entries cannot grow without bound.
        return len(value) + (len(key) if isinstance(key, str) else 0)

    def _check_open(self) -> None:
        if self._closed:
            raise CacheBackendError("This MemoryCache was closed (aclose); open a new one.")

    def _insert(self, key: str | Digest, value: bytes) -> bool:
        """Insert or replace `key`, then evict LRU entries over budget; False if too large."""
        cost = self._cost(key, value)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self._cost(key, old)
        limit = self.config.max_bytes
        if limit is not None and cost > limit:
            return False
        self._entries[key] = value
        self._bytes += cost
        if limit is not None:
            while self._bytes > limit:
                old_key, old_value = self._entries.popitem(last=False)
                self._bytes -= self._cost(old_key, old_value)
        return True

    def _get(self, key: str | Digest) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    @property
    def bytes_used(self) -> int:
        """Bytes currently held (action keys and values plus blobs)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    # -- action cache --------------------------------------------------------------------------

    async def get_action(self, key: str) -> bytes | None:
        """The value stored under `key`, or None."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        value = self._get(key)
        if value is None:
            self._counters.action_misses += 1
        else:
            self._counters.action_hits += 1
            self._counters.bytes_read += len(value)
        return value

    async def put_action(self, key: str, value: bytes) -> None:
        """Store `value` under `key`, replacing any previous value."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        value = bytes(value)
        if self._insert(key, value):
            self._counters.action_writes += 1
            self._counters.bytes_written += len(value)

    # -- blobs ---------------------------------------------------------------------------------

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` not held (a lookup does not count as a use for the LRU)."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        entries = self._entries
        return frozenset(d for d in digests if d not in entries)

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of each digest held; absent ones are left out."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        found: dict[Digest, bytes] = {}
        for digest in digests:
            data = self._get(digest)
            if data is None:
                self._counters.blob_misses += 1
            else:
                found[digest] = data
                self._counters.blob_hits += 1
                self._counters.bytes_read += len(data)
        return found

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Store each blob; one already held only becomes the most recently used."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        for digest, data in blobs.items():
            self._store_blob(digest, bytes(data))

    def _store_blob(self, digest: Digest, data: bytes) -> None:
        self._counters.blob_writes += 1
        if self._get(digest) is None and self._insert(digest, data):
            self._counters.bytes_written += len(data)

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        """Write one blob into `dest` from the single copy held (no second copy is made)."""
        self._check_open()
        data = self._get(digest)
        if data is None:
            self._counters.blob_misses += 1
            await trio.lowlevel.checkpoint()
            return False
        await trio.to_thread.run_sync(_write_file, dest, data)
        self._counters.blob_hits += 1
        self._counters.bytes_read += len(data)
        return True

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        """Read `src` once into memory and keep it under `digest`."""
        self._check_open()
        if self._get(digest) is not None:
            self._counters.blob_writes += 1
            await trio.lowlevel.checkpoint()
            return
        try:
            data = await trio.to_thread.run_sync(Path(src).read_bytes)
        except OSError as exc:
            raise CacheBackendError(f"Cannot read blob source file {src}: {exc}") from exc
        # The thread finished whatever happened to our task; inserting here, with no await
        # in between, keeps the write all-or-nothing under cancellation.
        self._store_blob(digest, data)

    async def evict(self, digests: Iterable[Digest]) -> None:
        """Drop these blobs if held."""
        self._check_open()
        await trio.lowlevel.checkpoint()
        for digest in digests:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._bytes -= len(old)

    # -- the rest --------------------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        """Counters since this cache was created."""
        return self._counters.snapshot()

    async def aclose(self) -> None:
        """Drop every entry; further use raises `CacheBackendError`. Idempotent."""
        self._closed = True
        self._entries.clear()
        self._bytes = 0
        await trio.lowlevel.checkpoint()


def _write_file(dest: Path, data: bytes) -> None:
    with open(dest, "wb") as f:
        f.write(memoryview(data))


__all__ = ["MemoryCache", "MemoryCacheConfig"]
