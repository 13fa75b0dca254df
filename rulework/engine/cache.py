"""The cache layer: a local and a remote `CacheBackend`, used as one action cache.

Reads go to the local cache first, then to the remote one; a remote hit fills the local cache,
the blobs it names included. Writes go to the local cache at once and to the remote one in the
background, flushed (with a bounded wait) when the layer closes. A remote that is down, slow,
failing or refusing access degrades the layer to local-only for the rest of its life, with one
warning (`RemoteCacheWarning`); it never fails the workflow. Every blob read back from a
backend by the layer is verified against its digest: a corrupt one is a miss, is evicted, and
is reported once (`CorruptBlobWarning`, as the `Store` does).

Action entries and their blobs. The layer stores, with each action value, the digests of every
blob the value refers to (its "closure": stdout, stderr and every blob of its output trees).
A lookup only answers a hit when the whole closure is in the local blob store — fetching from
the remote what is missing — so a hit costs one action read plus one `find_missing_blobs`, and
an entry whose blobs are gone is a miss, repaired by the next write.

Example:
    async with open_cache_layer(local_backend, remote_backend) as layer:
        store = Store(layer.local_blobs)
        hit = await layer.get_action(key)
        ...
        await layer.put_action(key, value, digests=(stdout, stderr), tree_roots=(outputs,))
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeVar

import blake3
import trio

from .errors import CacheError, MissingDigestError
from .fs import Digest
from .store import CorruptBlobWarning, MemoryBlobStore, Store, is_intrinsic

if TYPE_CHECKING:
    from ..abc import BlobStore, CacheBackend, CacheStatistics

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_MiB = 1024 * 1024

CacheSource = Literal["local_cache", "remote_cache"]

# Blobs at least this large move between backends through a temporary file
# (`read_blob_to_file` / `write_blob_from_file`), never whole in memory.
_STREAM_THRESHOLD = 8 * _MiB
# Smaller blobs move in batches of about this many bytes.
_BATCH_BYTES = 16 * _MiB
# Hash in a worker thread when verifying more than this many bytes at once.
_THREAD_HASH_BYTES = 256 * 1024
# A remote transfer may take `remote_timeout` plus this long per byte moved (1 MiB/s).
_SECONDS_PER_BYTE = 1 / _MiB
# The digests known to be in the remote are forgotten past this many (a long watch session).
_KNOWN_REMOTE_LIMIT = 1_000_000


# -- the entry format ---------------------------------------------------------------------------

# An action entry as stored in a backend: magic, closure size, the closure's digests (32-byte
# BLAKE3 + 64-bit size each, sorted), then the caller's value. A value that does not start
# with the magic (written by something else) is treated as a miss, never misread.
# Entries written to a remote (`rwc2`) also carry the bytes of the closure's small blobs after
# the digests (an inline flag per digest, then the inlined blobs in digest order), so that a
# remote hit is one request instead of one per blob; the blobs are uploaded to the CAS as well.
_MAGIC: Final = b"rwc1"
_MAGIC_INLINE: Final = b"rwc2"
_HEADER = struct.Struct(">4sI")
_DIGEST = struct.Struct(">32sQ")
# A blob up to this size is inlined in a remote entry, up to this many bytes per entry.
_INLINE_BLOB_BYTES = 64 * 1024
_INLINE_ENTRY_BYTES = 1 * _MiB


def encode_entry(
    value: bytes, blobs: Iterable[Digest], inline: Mapping[Digest, bytes] | None = None
) -> bytes:
    """An action entry: `value` plus the digests of the blobs it refers to, and optionally the
    (already verified) bytes of some of them."""
    items = sorted(set(blobs))
    parts = [
        _HEADER.pack(_MAGIC_INLINE if inline else _MAGIC, len(items)),
        *(_DIGEST.pack(bytes.fromhex(d.fingerprint), d.serialized_bytes_length) for d in items),
    ]
    if inline:
        parts.append(bytes(1 if d in inline else 0 for d in items))
        parts.extend(inline[d] for d in items if d in inline)
    parts.append(value)
    return b"".join(parts)


def decode_entry(raw: bytes) -> tuple[bytes, tuple[Digest, ...]] | None:
    """`(value, blobs)` from an entry written by `encode_entry`; None if it is not one."""
    decoded = decode_entry_inline(raw)
    return None if decoded is None else decoded[:2]


def decode_entry_inline(
    raw: bytes,
) -> tuple[bytes, tuple[Digest, ...], dict[Digest, bytes]] | None:
    """`(value, blobs, inlined blob bytes)` from an entry; None if it is not one. The inlined
    bytes are as stored: verify them before use."""
    if len(raw) < _HEADER.size:
        return None
    magic, count = _HEADER.unpack_from(raw)
    end = _HEADER.size + count * _DIGEST.size
    if magic not in (_MAGIC, _MAGIC_INLINE) or len(raw) < end:
        return None
    blobs = tuple(
        Digest(hash_.hex(), size) for hash_, size in _DIGEST.iter_unpack(raw[_HEADER.size : end])
    )
    inline: dict[Digest, bytes] = {}
    if magic == _MAGIC_INLINE:
        flags = raw[end : end + count]
        if len(flags) != count:
            return None
        offset = end + count
        for digest, flag in zip(blobs, flags, strict=True):
            if flag:
                size = digest.serialized_bytes_length
                if offset + size > len(raw):
                    return None
                inline[digest] = raw[offset : offset + size]
                offset += size
        end = offset
    return raw[end:], blobs, inline


def _needs_storage(digest: Digest) -> bool:
    # Blobs every Store knows without storing them (the empty file and directory).
    return not is_intrinsic(digest)


class RemoteCacheWarning(RuntimeWarning):
    """The remote cache failed; the session goes on with the local cache only."""


def _warn(warning: Warning) -> None:
    try:
        warnings.warn(warning, stacklevel=3)
    except Warning:
        # Warnings escalated to errors (`-W error`) must still not fail the workflow.
        logger.warning("%s", warning)


def _verify(digest: Digest, data: bytes) -> bool:
    return (
        len(data) == digest.serialized_bytes_length
        and blake3.blake3(data).hexdigest() == digest.fingerprint
    )


def _verify_many(blobs: Mapping[Digest, bytes]) -> list[Digest]:
    """The digests whose bytes do not match."""
    return [d for d, data in blobs.items() if not _verify(d, data)]


def _verify_file(digest: Digest, path: Path) -> bool:
    try:
        size = path.stat().st_size
        if size != digest.serialized_bytes_length:
            return False
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if size:
            hasher.update_mmap(path)
        return bool(hasher.hexdigest() == digest.fingerprint)
    except OSError:
        return False


# -- statistics ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheLayerStatistics:
    """What a `CacheLayer` did since it was opened, with its backends' own statistics."""

    local_hits: int
    remote_hits: int
    misses: int
    incomplete_entries: int
    """Entries found whose blobs were not available (each also counts as a miss)."""
    writes: int
    remote_writes: int
    """Action entries uploaded to the remote, blobs first."""
    blobs_downloaded: int
    blobs_inline: int
    """Blobs that came with a remote entry, so needed no download of their own."""
    blobs_uploaded: int
    remote_failures: int
    """Remote operations that failed or timed out."""
    remote_skipped: int
    """Remote operations not attempted because the remote had failed earlier."""
    remote_degraded: bool
    corrupt_blobs: int
    uploads_pending: int
    uploads_abandoned: int
    """Uploads still queued when the flush at close ran out of time (or was cancelled)."""
    local: CacheStatistics | None
    remote: CacheStatistics | None


class _Failed:
    """Sentinel: a remote operation failed (already counted and reported)."""


_FAILED: Final = _Failed()


@dataclass(frozen=True, slots=True)
class _Upload:
    key: str
    entry: bytes
    blobs: tuple[Digest, ...]


@dataclass(frozen=True, slots=True)
class ActionWrite:
    """One entry for `CacheLayer.put_actions`: the arguments of one `put_action` call."""

    key: str
    value: bytes
    digests: tuple[Digest, ...] = ()
    tree_roots: tuple[Digest, ...] = ()


# -- the layer ----------------------------------------------------------------------------------


class CacheLayer:
    """A local and a remote cache used as one; open it with `open_cache_layer`.

    It satisfies the process runner's `ActionCache` protocol (`get_action`, `put_action`) and
    gives the engine's `Store` its blob store (`local_blobs`). See the module docstring.
    """

    def __init__(
        self,
        local: CacheBackend | None,
        remote: CacheBackend | None,
        *,
        remote_read: bool,
        remote_write: bool,
        flush_timeout: float,
        remote_timeout: float,
        upload_concurrency: int,
    ) -> None:
        self.local = local
        self.remote = remote
        #: Where the engine's Store keeps blobs: the local cache, or memory without one.
        self.local_blobs: BlobStore = local if local is not None else MemoryBlobStore()
        # Walks trees in `local_blobs` (directory decoding is the Store's business).
        self._local_store = Store(self.local_blobs)
        self._remote_read = remote is not None and remote_read
        self._remote_write = remote is not None and remote_write
        self._flush_timeout = flush_timeout
        self._remote_timeout = remote_timeout
        self._upload_concurrency = upload_concurrency
        # Invariant: once False, stays False; no remote operation starts after that.
        self._remote_ok = remote is not None
        self._reported_corrupt: set[Digest] = set()
        # Digests this session has seen present in (or uploaded to) the remote.
        self._known_remote: set[Digest] = set()
        self._tmpdir: Path | None = None
        self._tmp_counter = 0
        self._send: trio.MemorySendChannel[_Upload] | None = None
        self._upload_scope = trio.CancelScope()
        # Invariant: _pending == uploads queued or running; `_idle` is set whenever it is 0.
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self._counts = dict.fromkeys(
            (
                "local_hits",
                "remote_hits",
                "misses",
                "incomplete_entries",
                "writes",
                "remote_writes",
                "blobs_downloaded",
                "blobs_inline",
                "blobs_uploaded",
                "remote_failures",
                "remote_skipped",
                "corrupt_blobs",
                "uploads_abandoned",
            ),
            0,
        )

    # -- statistics --------------------------------------------------------------------------------

    def use_store(self, store: Store) -> None:
        """Walk output trees with `store` (the engine's, over `local_blobs`), which already
        knows the directories it just wrote, instead of re-reading them through a Store of
        the layer's own."""
        self._local_store = store

    def statistics(self) -> CacheLayerStatistics:
        """Counters since the layer was opened, with each backend's own statistics."""
        return CacheLayerStatistics(
            **self._counts,
            remote_degraded=self.remote is not None and not self._remote_ok,
            uploads_pending=self._pending,
            local=self.local.statistics() if self.local is not None else None,
            remote=self.remote.statistics() if self.remote is not None else None,
        )

    # -- the action cache ------------------------------------------------------------------------

    async def get_action(self, key: str) -> tuple[bytes, CacheSource] | None:
        """The value stored under `key` and which cache served it, or None on a miss.

        On a hit, every blob the entry names is in `local_blobs` (fetched from the remote
        if needed). A remote hit is copied into the local cache.

        Raises:
            CacheError: the local cache failed (remote faults never raise).
        """
        local_entry_found = False
        if self.local is not None:
            raw = await self.local.get_action(key)
            if raw is not None:
                entry = decode_entry(raw)
                if entry is not None:
                    local_entry_found = True
                    if await self._ensure_local(entry[1]):
                        self._counts["local_hits"] += 1
                        return entry[0], "local_cache"
                    self._counts["incomplete_entries"] += 1
        # A local entry whose blobs the remote could not supply either is not retried through
        # the remote's entry: it names the same blobs.
        if self._remote_read and not local_entry_found:
            remote = self.remote
            assert remote is not None
            found = await self._remote_call(
                "reading an action entry", functools.partial(remote.get_action, key)
            )
            if isinstance(found, bytes):
                remote_entry = decode_entry_inline(found)
                if remote_entry is not None:
                    value, blobs, inline = remote_entry
                    if inline:
                        await self._accept_inline(inline)
                    if await self._ensure_local(blobs):
                        if self.local is not None:
                            await self.local.put_action(key, encode_entry(value, blobs))
                        self._counts["remote_hits"] += 1
                        return value, "remote_cache"
                    self._counts["incomplete_entries"] += 1
        self._counts["misses"] += 1
        return None

    async def put_action(
        self,
        key: str,
        value: bytes,
        *,
        digests: Iterable[Digest] = (),
        tree_roots: Iterable[Digest] = (),
    ) -> None:
        """Store `value` under `key`: in the local cache now, in the remote in the background.

        Args:
            digests: blobs the value refers to (e.g. stdout and stderr).
            tree_roots: directory digests the value refers to; every blob of those trees is
                recorded with the entry.

        The named blobs must already be in `local_blobs`: they are uploaded before the entry,
        so that no reader ever sees an entry without its blobs.

        Raises:
            CacheError: a named blob is not in `local_blobs` (nothing is stored), or the local
                cache failed.
        """
        write = ActionWrite(key, value, tuple(digests), tuple(tree_roots))
        failed = await self.put_actions([write])
        if failed:
            raise failed[key]

    async def put_actions(self, writes: Sequence[ActionWrite]) -> dict[str, CacheError]:
        """Store several entries, each as `put_action` would, with one write to the local cache
        when it can take many at once (a `put_actions(entries)` method, as the sqlite cache
        has: one transaction instead of one per entry).

        Returns the entries not stored, by key, with why (an entry naming a blob missing from
        the local store); the others are stored.

        Raises:
            CacheError: the local cache failed (then none of the entries may be stored).
        """
        failed: dict[str, CacheError] = {}
        closures: list[tuple[ActionWrite, set[Digest]]] = []
        for write in writes:
            try:
                closures.append((write, await self._closure(write.digests, write.tree_roots)))
            except MissingDigestError as exc:
                error = CacheError(
                    f"Not caching the entry {write.key}: a tree it refers to is incomplete in "
                    f"the local store ({exc})."
                )
                error.__cause__ = exc
                failed[write.key] = error
        every_blob = set().union(*(blobs for _, blobs in closures))
        missing = await self.local_blobs.find_missing_blobs(every_blob) if every_blob else set()
        entries: list[tuple[str, bytes, set[Digest]]] = []
        for write, blobs in closures:
            absent = blobs & missing
            if absent:
                failed[write.key] = CacheError(
                    f"Not caching the entry {write.key}: {len(absent)} blob(s) it refers to are "
                    f"not in the local store (e.g. {min(absent)}). Store blobs before the entry "
                    "naming them."
                )
            else:
                entries.append((write.key, encode_entry(write.value, blobs), blobs))
        if self.local is not None and entries:
            put_many = getattr(self.local, "put_actions", None)
            if callable(put_many) and len(entries) > 1:
                await put_many([(key, entry) for key, entry, _ in entries])
            else:
                for key, entry, _ in entries:
                    await self.local.put_action(key, entry)
        self._counts["writes"] += len(entries)
        if self._remote_write:
            for key, entry, blobs in entries:
                self._enqueue(_Upload(key, entry, tuple(sorted(blobs))))
        return failed

    async def ensure_blobs(
        self, digests: Iterable[Digest], tree_roots: Iterable[Digest] = ()
    ) -> bool:
        """Make sure these blobs and every blob of the trees under `tree_roots` are in
        `local_blobs`, fetching what is missing from the remote; False if any is unavailable."""
        try:
            blobs = await self._closure(digests, tree_roots, fetch=True)
        except MissingDigestError:
            return False
        return await self._ensure_local(blobs)

    async def _closure(
        self, digests: Iterable[Digest], tree_roots: Iterable[Digest], *, fetch: bool = False
    ) -> set[Digest]:
        blobs = {d for d in digests if _needs_storage(d)}
        roots = [r for r in tree_roots]
        if roots:
            store = Store(_FillingBlobStore(self)) if fetch else self._local_store
            for root in roots:
                blobs.update(await store.tree_blobs(root))
        return {d for d in blobs if _needs_storage(d)}

    # -- moving blobs between the layers ---------------------------------------------------------

    async def _accept_inline(self, blobs: Mapping[Digest, bytes]) -> None:
        """Write the verified blobs of a remote entry into `local_blobs` (corrupt ones are
        skipped: `_ensure_local` then downloads them like any other missing blob)."""
        corrupt = set(_verify_many(blobs))
        good = {d: data for d, data in blobs.items() if d not in corrupt and _needs_storage(d)}
        if good:
            missing = await self.local_blobs.find_missing_blobs(good)
            if missing:
                await self.local_blobs.write_blobs({d: good[d] for d in missing})
                self._counts["blobs_inline"] += len(missing)

    async def _ensure_local(self, blobs: Sequence[Digest] | set[Digest]) -> bool:
        if not blobs:
            return True
        missing = await self.local_blobs.find_missing_blobs(blobs)
        if not missing:
            return True
        if not self._remote_read:
            return False
        return await self._download(sorted(missing))

    async def _download(self, digests: Sequence[Digest]) -> bool:
        """Copy these blobs from the remote into `local_blobs`, verified; False if any is
        absent, corrupt, or the remote failed."""
        remote = self.remote
        assert remote is not None
        small = [d for d in digests if d.serialized_bytes_length < _STREAM_THRESHOLD]
        large = [d for d in digests if d.serialized_bytes_length >= _STREAM_THRESHOLD]
        for batch in _batches(small):
            nbytes = sum(d.serialized_bytes_length for d in batch)
            found = await self._remote_call(
                "downloading blobs", functools.partial(remote.read_blobs, batch), nbytes=nbytes
            )
            if isinstance(found, _Failed):
                return False
            if nbytes > _THREAD_HASH_BYTES:
                corrupt = await trio.to_thread.run_sync(_verify_many, found)
            else:
                corrupt = _verify_many(found)
            if corrupt:
                await self._corrupt(remote, "remote", corrupt)
            good = {d: data for d, data in found.items() if d not in corrupt}
            if good:
                await self.local_blobs.write_blobs(good)
                self._counts["blobs_downloaded"] += len(good)
                self._known_remote.update(good)
            if len(good) < len(batch):
                return False
        for digest in large:
            if not await self._download_file(remote, digest):
                return False
        return True

    async def _download_file(self, remote: CacheBackend, digest: Digest) -> bool:
        path = await self._temp_path()
        try:
            ok = await self._remote_call(
                "downloading a blob",
                lambda: remote.read_blob_to_file(digest, path),
                nbytes=digest.serialized_bytes_length,
            )
            if ok is not True:
                return False
            if not await trio.to_thread.run_sync(_verify_file, digest, path):
                await self._corrupt(remote, "remote", [digest])
                return False
            await self.local_blobs.write_blob_from_file(digest, path)
            self._counts["blobs_downloaded"] += 1
            self._known_remote.add(digest)
            return True
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink, path)

    async def _upload(self, job: _Upload) -> None:
        """Upload the entry's missing blobs (verified), then the entry itself."""
        remote = self.remote
        assert remote is not None
        if len(self._known_remote) > _KNOWN_REMOTE_LIMIT:
            self._known_remote.clear()
        unknown = [d for d in job.blobs if d not in self._known_remote]
        if unknown:
            missing = await self._remote_call(
                "checking which blobs the remote holds",
                lambda: remote.find_missing_blobs(unknown),
            )
            if isinstance(missing, _Failed):
                return
            self._known_remote.update(d for d in unknown if d not in missing)
            todo = sorted(missing)
            small = [d for d in todo if d.serialized_bytes_length < _STREAM_THRESHOLD]
            large = [d for d in todo if d.serialized_bytes_length >= _STREAM_THRESHOLD]
            for batch in _batches(small):
                data = await self.local_blobs.read_blobs(batch)
                nbytes = sum(d.serialized_bytes_length for d in batch)
                if nbytes > _THREAD_HASH_BYTES:
                    corrupt = await trio.to_thread.run_sync(_verify_many, data)
                else:
                    corrupt = _verify_many(data)
                if corrupt:
                    await self._corrupt(self.local_blobs, "local", corrupt)
                if corrupt or len(data) < len(batch):
                    return  # never upload an entry whose blobs are not all there
                result = await self._remote_call(
                    "uploading blobs", functools.partial(remote.write_blobs, data), nbytes=nbytes
                )
                if isinstance(result, _Failed):
                    return
                self._counts["blobs_uploaded"] += len(data)
                self._known_remote.update(data)
            for digest in large:
                if not await self._upload_file(remote, digest):
                    return
        entry = await self._with_inline_blobs(job)
        result = await self._remote_call(
            "uploading an action entry", lambda: remote.put_action(job.key, entry)
        )
        if not isinstance(result, _Failed):
            self._counts["remote_writes"] += 1

    async def _with_inline_blobs(self, job: _Upload) -> bytes:
        """The entry to upload: with the bytes of its small blobs inlined, when it has any."""
        small: list[Digest] = []
        total = 0
        for digest in job.blobs:
            size = digest.serialized_bytes_length
            if size <= _INLINE_BLOB_BYTES and total + size <= _INLINE_ENTRY_BYTES:
                small.append(digest)
                total += size
        if not small:
            return job.entry
        decoded = decode_entry(job.entry)
        assert decoded is not None  # built by put_action
        data = await self.local_blobs.read_blobs(small)
        corrupt = set(_verify_many(data))
        inline = {d: b for d, b in data.items() if d not in corrupt}
        return encode_entry(decoded[0], decoded[1], inline) if inline else job.entry

    async def _upload_file(self, remote: CacheBackend, digest: Digest) -> bool:
        path = await self._temp_path()
        try:
            if not await self.local_blobs.read_blob_to_file(digest, path):
                return False
            if not await trio.to_thread.run_sync(_verify_file, digest, path):
                await self._corrupt(self.local_blobs, "local", [digest])
                return False
            result = await self._remote_call(
                "uploading a blob",
                lambda: remote.write_blob_from_file(digest, path),
                nbytes=digest.serialized_bytes_length,
            )
            if isinstance(result, _Failed):
                return False
            self._counts["blobs_uploaded"] += 1
            self._known_remote.add(digest)
            return True
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink, path)

    async def _temp_path(self) -> Path:
        if self._tmpdir is None:
            self._tmpdir = Path(
                await trio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="rulework-cache-"))
            )
        self._tmp_counter += 1
        return self._tmpdir / f"blob-{self._tmp_counter}"

    async def _corrupt(self, backend: BlobStore, where: str, digests: Sequence[Digest]) -> None:
        """Report (once each) and evict blobs whose bytes did not match their digest."""
        self._counts["corrupt_blobs"] += len(digests)
        for digest in digests:
            if digest not in self._reported_corrupt:
                self._reported_corrupt.add(digest)
                _warn(
                    CorruptBlobWarning(
                        f"Blob {digest.fingerprint} ({digest.serialized_bytes_length} bytes) in "
                        f"the {where} cache ({type(backend).__name__}) is corrupt: its content "
                        "does not hash to its digest. It has been evicted and is treated as "
                        "missing."
                    )
                )
        if backend is self.remote:
            await self._remote_call("evicting corrupt blobs", lambda: backend.evict(digests))
        else:
            await backend.evict(digests)

    # -- remote fault handling -------------------------------------------------------------------

    async def _remote_call(
        self, doing: str, operation: Callable[[], Awaitable[_T]], *, nbytes: int = 0
    ) -> _T | _Failed:
        """Run one remote operation with a timeout; a fault degrades the layer to local-only
        (one warning) and returns `_FAILED`. Cancellation is never swallowed."""
        if not self._remote_ok:
            self._counts["remote_skipped"] += 1
            return _FAILED
        timeout = self._remote_timeout + nbytes * _SECONDS_PER_BYTE
        try:
            with trio.fail_after(timeout):
                return await operation()
        except trio.TooSlowError:
            self._degrade(doing, f"no answer within {timeout:.3g}s")
        except Exception as exc:
            # Any fault, not only CacheBackendError: a remote cache must never fail the workflow,
            # and a plugin's untranslated SDK error is still reported (type and message).
            self._degrade(doing, f"{type(exc).__name__}: {exc}")
        return _FAILED

    def _degrade(self, doing: str, reason: str) -> None:
        self._counts["remote_failures"] += 1
        if self._remote_ok:
            self._remote_ok = False
            _warn(
                RemoteCacheWarning(
                    f"The remote cache ({type(self.remote).__name__}) failed while {doing}: "
                    f"{reason}. Continuing with the local cache only for the rest of this "
                    "session; the statistics count the remote operations that failed."
                )
            )

    # -- background uploads --------------------------------------------------------------------

    def _enqueue(self, job: _Upload) -> None:
        if self._send is None or not self._remote_ok:
            self._counts["remote_skipped"] += 1
            return
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._send.send_nowait(job)

    async def _run_uploads(self, receive: trio.MemoryReceiveChannel[_Upload]) -> None:
        with self._upload_scope:
            async with receive, trio.open_nursery() as nursery:
                for _ in range(self._upload_concurrency):
                    nursery.start_soon(self._upload_worker, receive.clone())

    async def _upload_worker(self, receive: trio.MemoryReceiveChannel[_Upload]) -> None:
        async with receive:
            async for job in receive:
                try:
                    if self._remote_ok:
                        await self._upload(job)
                    else:
                        self._counts["remote_skipped"] += 1
                finally:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()

    def _start(self, nursery: trio.Nursery) -> None:
        send, receive = trio.open_memory_channel[_Upload](math.inf)
        self._send = send
        if self._remote_write:
            nursery.start_soon(self._run_uploads, receive)
        else:
            receive.close()

    async def _flush(self) -> None:
        """Wait (at most `flush_timeout`) for queued uploads, then stop the uploaders."""
        if self._send is not None:
            self._send.close()
            self._send = None
        if self._pending:
            with trio.move_on_after(self._flush_timeout):
                await self._idle.wait()
        self._abandon()

    def _abandon(self) -> None:
        if self._send is not None:
            self._send.close()
            self._send = None
        if self._pending:
            self._counts["uploads_abandoned"] += self._pending
            _warn(
                RemoteCacheWarning(
                    f"{self._pending} upload(s) to the remote cache did not finish before the "
                    f"session closed (flush timeout {self._flush_timeout:g}s); those results "
                    "stay in the local cache only."
                )
            )
        self._upload_scope.cancel()

    async def _cleanup(self) -> None:
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is not None:
            await trio.to_thread.run_sync(lambda: shutil.rmtree(tmpdir, ignore_errors=True))


class _FillingBlobStore:
    """`local_blobs`, reading through to the remote for what it lacks (filling it)."""

    def __init__(self, layer: CacheLayer) -> None:
        self._layer = layer
        self._local = layer.local_blobs

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        wanted = list(digests)
        missing = await self._local.find_missing_blobs(wanted)
        if missing and self._layer._remote_read:
            await self._layer._download(sorted(missing))
            missing = await self._local.find_missing_blobs(missing)
        return missing

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        wanted = list(digests)
        await self.find_missing_blobs(wanted)
        return await self._local.read_blobs(wanted)

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        await self._local.write_blobs(blobs)

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        await self.find_missing_blobs([digest])
        return await self._local.read_blob_to_file(digest, dest)

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        await self._local.write_blob_from_file(digest, src)

    async def evict(self, digests: Iterable[Digest]) -> None:
        await self._local.evict(digests)


def _batches(digests: Sequence[Digest]) -> list[list[Digest]]:
    batches: list[list[Digest]] = []
    current: list[Digest] = []
    size = 0
    for digest in digests:
        if current and size + digest.serialized_bytes_length > _BATCH_BYTES:
            batches.append(current)
            current, size = [], 0
        current.append(digest)
        size += digest.serialized_bytes_length
    if current:
        batches.append(current)
    return batches


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@asynccontextmanager
async def open_cache_layer(
    local: CacheBackend | None,
    remote: CacheBackend | None,
    *,
    remote_read: bool = True,
    remote_write: bool = True,
    flush_timeout: float = 60.0,
    remote_timeout: float = 10.0,
    upload_concurrency: int = 4,
) -> AsyncIterator[CacheLayer]:
    """Open a `CacheLayer` over `local` and `remote` (either may be None).

    The caller opens and closes the backends (close them after the layer). On a normal exit,
    or when the body raised an ordinary exception, queued remote uploads are given up to
    `flush_timeout` seconds to finish; on cancellation they are abandoned at once.

    Args:
        local: the local cache (`memory`, `sqlite`); None keeps blobs in memory and no
            action entries locally.
        remote: the shared cache (`s3`, a plugin); None for none.
        remote_read: look entries up in the remote (a per-run override).
        remote_write: upload new entries to the remote (a per-run override).
        flush_timeout: the bound on waiting for uploads when the layer closes.
        remote_timeout: the bound on one remote operation (plus 1 s per MiB transferred);
            past it the remote counts as failed.
        upload_concurrency: how many entries upload at once.

    Example:
        async with open_cache_layer(local, remote, remote_write=False) as layer:
            ...
    """
    for name, value in (("flush_timeout", flush_timeout), ("remote_timeout", remote_timeout)):
        if not (isinstance(value, int | float) and value >= 0 and not math.isnan(value)):
            raise ValueError(f"open_cache_layer: {name} must be a number >= 0, got {value!r}")
    if not (isinstance(upload_concurrency, int) and upload_concurrency >= 1):
        raise ValueError(
            f"open_cache_layer: upload_concurrency must be an int >= 1, got {upload_concurrency!r}"
        )
    layer = CacheLayer(
        local,
        remote,
        remote_read=remote_read,
        remote_write=remote_write,
        flush_timeout=flush_timeout,
        remote_timeout=remote_timeout,
        upload_concurrency=upload_concurrency,
    )
    try:
        async with trio.open_nursery() as nursery:
            layer._start(nursery)
            try:
                yield layer
            except Exception:
                # The session failed, but what it computed is still worth sharing.
                await layer._flush()
                raise
            except BaseException:
                layer._abandon()
                raise
            else:
                await layer._flush()
    except BaseExceptionGroup as group:
        # The uploaders never raise (remote faults are absorbed), so a lone exception here is
        # the body's own: hand it back as it was raised, not wrapped in a group.
        if len(group.exceptions) == 1:
            error = group.exceptions[0]
            raise error from error.__cause__
        raise
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await layer._cleanup()


__all__ = [
    "ActionWrite",
    "CacheLayer",
    "CacheLayerStatistics",
    "CacheSource",
    "RemoteCacheWarning",
    "decode_entry",
    "encode_entry",
    "open_cache_layer",
]
