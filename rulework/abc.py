"""Extension interfaces for backend authors: cache backends and process executors.

A backend is a class registered by name under the entry-point group `rulework.cache_backends`
or `rulework.executors` (the built-ins register the same way, see `pyproject.toml`). The class
carries `config_type`, a frozen dataclass that the strict config parser structures the backend's
section into (`[cache.NAME]` or `[environments.NAME]`), and is constructed with that config.

Backends only ever see rulework errors cross their boundary: translate your SDK's exceptions
into `CacheBackendError` / `ExecutorError` (`raise ... from exc`) where they happen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .engine.fs import Digest

if TYPE_CHECKING:
    from .engine.process import FallibleProcessResult, Process
    from .engine.store import FileBlobStore, MemoryBlobStore, Store


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """Counters a cache backend reports; all are totals since the backend was opened."""

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


@runtime_checkable
class BlobStore(Protocol):
    """A content-addressed blob store keyed by BLAKE3 `Digest`.

    Implementations need not verify what they return: the engine verifies every blob it reads
    against its digest and calls `evict` on corrupt ones. Writes must be atomic: a blob is either
    fully visible under its digest or absent, whatever happens (crash, cancellation).
    """

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` this store does not hold."""
        ...

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of each digest held; absent digests are left out of the result."""
        ...

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Store each blob under its digest (a no-op for blobs already present)."""
        ...

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        """Stream one (large) blob into `dest`; False when absent. Must not hold it twice in memory."""
        ...

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        """Store the content of `src` (already known to hash to `digest`) without reading it whole."""
        ...

    async def evict(self, digests: Iterable[Digest]) -> None:
        """Remove these blobs (used when a blob is found corrupt)."""
        ...


@runtime_checkable
class CacheBackend(BlobStore, Protocol):
    """A cache: an action cache (key -> opaque bytes) plus a `BlobStore` (the CAS).

    Action-cache values are small serialized records; the blobs they name are stored in the
    CAS part. `get_action` returns None on a miss.
    """

    config_type: ClassVar[type[Any]]

    async def get_action(self, key: str) -> bytes | None: ...

    async def put_action(self, key: str, value: bytes) -> None: ...

    def statistics(self) -> CacheStatistics: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ExecutedProcess:
    """What an executor reports for one run: the raw outcome, before caching.

    `output_digest` is a directory digest already written to the engine's store.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    output_digest: Digest
    duration_seconds: float
    timed_out: bool = False


@runtime_checkable
class ProcessExecutor(Protocol):
    """Runs `Process`es in one named environment (local, ssh host, container image...).

    Constructed as `cls(name, config)` where `config` is an instance of `config_type`.
    `open` is called once before the first `execute` (start connections, resolve image ids);
    `aclose` once at session end (close connections, remove containers). `execute` must kill
    everything it started when cancelled or on timeout, and must not run more than
    `parallelism` processes at once.
    """

    config_type: ClassVar[type[Any]]
    name: str
    parallelism: int

    async def open(self, store: Store) -> None: ...

    async def identity(self) -> str:
        """A string naming where results come from (kind, platform, image digest, host class):
        part of the process cache key, so results from different platforms never mix."""
        ...

    async def execute(self, process: Process, store: Store) -> ExecutedProcess: ...

    async def aclose(self) -> None: ...


def __getattr__(name: str) -> Any:
    # Building blocks for backends that keep blobs as files or in memory (loaded lazily so
    # that importing the interfaces does not import the store).
    if name in ("FileBlobStore", "MemoryBlobStore"):
        from .engine import store

        return getattr(store, name)
    raise AttributeError(f"module 'rulework.abc' has no attribute {name!r}")


__all__ = [
    "BlobStore",
    "CacheBackend",
    "CacheStatistics",
    "ExecutedProcess",
    "FileBlobStore",
    "MemoryBlobStore",
    "ProcessExecutor",
]

if TYPE_CHECKING:  # pragma: no cover - re-exported for annotations only
    _ = (FallibleProcessResult, FileBlobStore, MemoryBlobStore)
