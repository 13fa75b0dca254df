"""The `memory` cache backend: the conformance suite plus its LRU byte budget."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rulework.abc import CacheBackend
from rulework.backends.memory import MemoryCache, MemoryCacheConfig
from rulework.engine.errors import ConfigError
from rulework.engine.fs import Digest
from rulework.testing._cache_suite import CacheBackendSuite, CorruptHook


class TestMemoryCache(CacheBackendSuite):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[CacheBackend]:
        cache = MemoryCache(MemoryCacheConfig(max_bytes=1024 * 1024 * 1024))
        yield cache
        await cache.aclose()

    @pytest.fixture
    def corrupt(self) -> CorruptHook:
        async def corrupt(backend: CacheBackend, digest: Digest) -> None:
            assert isinstance(backend, MemoryCache)
            data = backend._entries[digest]
            backend._entries[digest] = bytes([data[0] ^ 0xFF]) + data[1:]

        return corrupt


def _blob(n: int, size: int = 100) -> tuple[Digest, bytes]:
    data = n.to_bytes(4, "big") * (size // 4)
    return Digest.of_bytes(data), data


async def test_lru_evicts_least_recently_used_first() -> None:
    cache = MemoryCache(MemoryCacheConfig(max_bytes=1000))
    a, b, c, d = (_blob(i, 300) for i in range(4))
    await cache.write_blobs(dict([a, b, c]))
    # Reading `a` makes `b` the least recently used.
    assert await cache.read_blobs([a[0]]) == dict([a])
    await cache.write_blobs(dict([d]))
    assert await cache.find_missing_blobs([a[0], b[0], c[0], d[0]]) == {b[0]}
    assert cache.bytes_used == 900


async def test_actions_and_blobs_share_the_budget() -> None:
    cache = MemoryCache(MemoryCacheConfig(max_bytes=1000))
    blob = _blob(1, 600)
    await cache.write_blobs(dict([blob]))
    await cache.put_action("k" * 64, b"v" * 400)  # 464 bytes with its key: the blob must go
    assert await cache.find_missing_blobs([blob[0]]) == {blob[0]}
    assert await cache.get_action("k" * 64) == b"v" * 400
    assert cache.bytes_used == 464


async def test_overwriting_an_action_accounts_for_the_old_value() -> None:
    cache = MemoryCache(MemoryCacheConfig(max_bytes=10_000))
    await cache.put_action("k", b"x" * 5000)
    await cache.put_action("k", b"y" * 10)
    assert cache.bytes_used == 11
    assert len(cache) == 1


async def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    cache = MemoryCache(MemoryCacheConfig(max_bytes=1000))
    small, huge = _blob(1, 100), _blob(2, 2000)
    await cache.write_blobs(dict([small, huge]))
    assert await cache.find_missing_blobs([small[0], huge[0]]) == {huge[0]}
    assert cache.bytes_used == 100


async def test_unbounded() -> None:
    cache = MemoryCache(MemoryCacheConfig(max_bytes=None))
    blobs = dict(_blob(i, 1000) for i in range(50))
    await cache.write_blobs(blobs)
    assert await cache.find_missing_blobs(blobs) == frozenset()


@pytest.mark.parametrize("bad", [0, -5, 1.5, "1GB", True])
def test_config_rejects_bad_max_bytes(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"cache\.memory\.max_bytes"):
        MemoryCacheConfig(max_bytes=bad)  # type: ignore[arg-type]


def test_defaults() -> None:
    assert MemoryCache().config.max_bytes == 512 * 1024 * 1024
    assert MemoryCache.config_type is MemoryCacheConfig
