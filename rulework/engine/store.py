"""The content-addressed store: blobs by BLAKE3 digest, directory trees as Merkle trees.

`Store` is the engine's file layer. It sits over any `BlobStore` (`FileBlobStore` on disk,
`MemoryBlobStore` in memory, or a cache backend) and gives the file intrinsics as async
methods: `snapshot` (workspace files matched by `PathGlobs`), `create_digest`,
`merge_digests`, `add_prefix`, `remove_prefix`, `digest_subset`, `contents`, `entries`,
`snapshot_of`, plus `materialize` / `capture` for process sandboxes.

Integrity: every blob read through a `Store` is hashed and compared with its digest. A blob
that does not match is *corrupt*: it is evicted from the blob store, reported once with a
`CorruptBlobWarning` (a `warnings` category, so applications can log, filter or escalate it),
and treated as missing (`MissingDigestError`). Wrong bytes are never returned.

Blocking I/O and hashing run in worker threads (`trio.to_thread.run_sync`), batched so that
thousands of small files cost a handful of thread hops, not one each.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import operator
import os
import re
import secrets
import stat
import time
import warnings
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import blake3
import trio

from ..abc import BlobStore
from .errors import InvalidPathError, MissingDigestError, StoreError
from .fs import (
    EMPTY_DIGEST,
    EMPTY_FILE_DIGEST,
    AddPrefix,
    CreateDigest,
    Digest,
    DigestContents,
    DigestEntries,
    DigestSubset,
    Directory,
    DirectoryEntry,
    FileContent,
    FileEntry,
    GlobExpansionConjunction,
    GlobMatchErrorBehavior,
    MergeDigests,
    PathGlobs,
    RemovePrefix,
    Snapshot,
    _trusted_digest,
    decode_directory,
    encode_directory,
    split_path,
)

__all__ = [
    "INTRINSIC_DIGESTS",
    "CorruptBlobWarning",
    "DigestConflictError",
    "FileBlobStore",
    "MemoryBlobStore",
    "Store",
    "StoreStatistics",
    "UnmatchedGlobsError",
    "UnmatchedGlobsWarning",
    "is_intrinsic",
]

_T = TypeVar("_T")

# Blobs this size or larger are hashed from the file with BLAKE3's multithreaded mode and
# copied file-to-file; smaller ones are read into memory and handled in batches.
_LARGE_FILE_BYTES: Final = 4 << 20
# A batch of small files sent to one worker thread: bounded by count and by bytes held.
_BATCH_FILES: Final = 8192
_BATCH_BYTES: Final = 64 << 20
# Verifying blobs in the event loop is fine for small ones; above this, hash in a thread.
_INLINE_HASH_BYTES: Final = 256 << 10
# Decoded directory listings kept per Store (they are immutable, so never stale).
_LISTING_CACHE_ENTRIES: Final = 100_000
# Digests this Store knows to be present (see Store._present); reset past this size.
_PRESENT_SET_ENTRIES: Final = 2_000_000
# FICLONE ioctl (Linux): share extents copy-on-write on btrfs/xfs; fails fast elsewhere.
_FICLONE: Final = 0x40049409


# --- errors and warnings -------------------------------------------------------------------------


class CorruptBlobWarning(RuntimeWarning):
    """A blob did not hash to its digest; it was evicted and treated as missing."""


class UnmatchedGlobsWarning(UserWarning):
    """`PathGlobs` with `glob_match_error_behavior=warn` matched nothing for some globs."""


class UnmatchedGlobsError(StoreError, ValueError):
    """`PathGlobs` with `glob_match_error_behavior=error` matched nothing for some globs.

    `globs` are the include globs that matched nothing.
    """

    def __init__(self, message: str, globs: Sequence[str]) -> None:
        super().__init__(message)
        self.globs = tuple(globs)


class DigestConflictError(StoreError, ValueError):
    """Two inputs put different content (or a file and a directory) at the same path.

    `path` is the conflicting path.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """Counters of one `Store` since it was created."""

    files_hashed: int = 0
    bytes_hashed: int = 0
    stat_cache_hits: int = 0
    stat_cache_misses: int = 0
    corrupt_blobs_evicted: int = 0


# --- helpers ------------------------------------------------------------------------------------


def _hash_bytes(data: bytes | memoryview) -> Digest:
    return _trusted_digest(blake3.blake3(data).hexdigest(), len(data))


def _hash_file_large(path: str, use_mmap: bool) -> Digest:
    """Hash a large file with BLAKE3's multithreaded mode, reading it once."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if use_mmap:
        try:
            hasher.update_mmap(path)
            # update_mmap does not report the length; the size is what was mapped.
            return _trusted_digest(hasher.hexdigest(), os.stat(path).st_size)
        except OSError:
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)  # e.g. not mappable
    size = 0
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            hasher.update(view[:count])
            size += count
    return _trusted_digest(hasher.hexdigest(), size)


def _read_file(path: str, expected: int) -> bytes:
    """Read a whole (small) regular file; `expected` is the size its stat reported."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, expected + 1)
        if len(data) <= expected:
            return data  # a short read of a regular file is its end
        parts = [data]  # the file grew since its stat: read what is there now
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_fd(src_fd: int, dst_fd: int) -> None:
    """Copy a whole file: reflink where the filesystem can, else in the kernel, else by hand."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return
    except OSError:
        pass
    offset = 0
    try:
        while sent := os.sendfile(dst_fd, src_fd, offset, 1 << 30):
            offset += sent
        return
    except OSError as exc:
        if offset or exc.errno not in (
            errno.EINVAL,
            errno.ENOSYS,
            errno.EOPNOTSUPP,
            errno.ESPIPE,
            errno.ENOTSOCK,
        ):
            raise
    while chunk := os.read(src_fd, 1 << 20):  # pipes and other files sendfile cannot read
        _write_all(dst_fd, chunk)


def _chunks_by_size(items: Sequence[_T], size_of: Callable[[_T], int]) -> Iterator[list[_T]]:
    batch: list[_T] = []
    batch_bytes = 0
    for item in items:
        batch.append(item)
        batch_bytes += size_of(item)
        if len(batch) >= _BATCH_FILES or batch_bytes >= _BATCH_BYTES:
            yield batch
            batch, batch_bytes = [], 0
    if batch:
        yield batch


_entry_name: Final = operator.attrgetter("name")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _describe_entry(entry: DirectoryEntry | None) -> str:
    if entry is None:
        return "absent"
    if entry.is_dir:
        return f"a directory ({entry.digest.fingerprint[:12]}…)"
    executable = "executable " if entry.is_executable else ""
    return (
        f"an {executable}file ({entry.digest.fingerprint[:12]}…, "
        f"{entry.digest.serialized_bytes_length} bytes)"
    )


# Blobs every Store knows without storing them: the empty file and the empty directory. A
# Store never writes them to its blob store, and answers them without asking it.
_INTRINSIC_BLOBS: Final = {
    EMPTY_FILE_DIGEST: b"",
    EMPTY_DIGEST: encode_directory({}),
}

INTRINSIC_DIGESTS: Final[frozenset[Digest]] = frozenset(_INTRINSIC_BLOBS)
"""The digests a `Store` never stores in its blob store (`EMPTY_FILE_DIGEST`, `EMPTY_DIGEST`):
their content is known, so they are never written, read, or reported missing."""


def is_intrinsic(digest: Digest) -> bool:
    """True for a digest a `Store` never stores (see `INTRINSIC_DIGESTS`): a blob store need
    not hold it, and code that checks or copies a tree's blobs should skip it."""
    return digest in _INTRINSIC_BLOBS


# --- blob stores --------------------------------------------------------------------------------


class MemoryBlobStore:
    """A `BlobStore` in a dict: unbounded, for `cache.local = "none"` sessions and tests."""

    def __init__(self) -> None:
        self._blobs: dict[Digest, bytes] = {}

    def __len__(self) -> int:
        return len(self._blobs)

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` not held."""
        return frozenset(d for d in digests if d not in self._blobs)

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of each held digest."""
        blobs = self._blobs
        return {d: blobs[d] for d in digests if d in blobs}

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Store each blob (bytes are immutable, so no copy is needed)."""
        for digest, data in blobs.items():
            self._blobs.setdefault(digest, bytes(data))

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        """Write one blob to `dest`; False when absent."""
        data = self._blobs.get(digest)
        if data is None:
            return False
        await trio.to_thread.run_sync(Path(dest).write_bytes, data)
        return True

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        """Store the content of `src` under `digest`."""
        if digest not in self._blobs:
            self._blobs[digest] = await trio.to_thread.run_sync(Path(src).read_bytes)

    async def evict(self, digests: Iterable[Digest]) -> None:
        """Forget these blobs."""
        for digest in digests:
            self._blobs.pop(digest, None)


class FileBlobStore:
    """The on-disk `BlobStore`: one read-only file per blob at `root/ab/cdef…` (the hex digest
    split after two characters, so no directory holds more than 1/256 of the blobs).

    Writes are atomic: a blob is written to a temporary file `.tmp-*` in its shard directory and
    renamed onto its final name with `os.replace`, so a reader (or a crash) never sees a partial
    blob under a digest name. A writer killed mid-write leaves only a temporary file, which
    `remove_stale_temp_files` deletes.

    Durability: by default blobs are *not* fsynced. The store is a cache and every read is
    verified against the digest, so a blob torn by a power loss is detected, evicted and
    recomputed; fsyncing each of ten thousand small files would instead make every snapshot
    several times slower. Pass `fsync=True` to fsync each blob and its directory before the
    rename is considered done (e.g. for a store shared by machines that must not recompute).

    All methods do their I/O in one worker-thread hop per call, whatever the number of blobs.
    """

    def __init__(self, root: Path | str, *, fsync: bool = False) -> None:
        self._root = Path(root)
        self._root_str = os.fspath(root)
        self._fsync = fsync

    @property
    def root(self) -> Path:
        """The directory holding the shards."""
        return self._root

    def __repr__(self) -> str:
        return f"FileBlobStore({self._root_str!r})"

    def _path(self, digest: Digest) -> str:
        fp = digest.fingerprint
        return f"{self._root_str}/{fp[:2]}/{fp[2:]}"

    def local_path(self, digest: Digest) -> Path | None:
        """The file holding `digest`'s blob, or None if absent (blocking: one `stat`).

        The file is read-only and shared: never write to it, and hard-link it only where the
        link stays read-only. Its content is *not* verified here.
        """
        path = self._path(digest)
        return Path(path) if self._has(digest, path) else None

    def _has(self, digest: Digest, path: str) -> bool:
        try:
            return os.stat(path).st_size == digest.serialized_bytes_length
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"Cannot read the local store at {path}: {exc}") from exc

    def _find_missing_sync(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        return frozenset(d for d in digests if not self._has(d, self._path(d)))

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` without a file of the right size."""
        digests = list(digests)
        if not digests:
            return frozenset()
        return await trio.to_thread.run_sync(self._find_missing_sync, digests)

    def _read_sync(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        result: dict[Digest, bytes] = {}
        for digest in digests:
            path = self._path(digest)
            try:
                result[digest] = _read_blob_file(path, digest.serialized_bytes_length)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StoreError(f"Cannot read blob {path} from the local store: {exc}") from exc
        return result

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of each digest held (unverified; `Store` verifies)."""
        digests = list(digests)
        if not digests:
            return {}
        return await trio.to_thread.run_sync(self._read_sync, digests)

    def _open_temp(self, shard: str) -> tuple[int, str]:
        for _ in range(2):
            temp = f"{shard}/.tmp-{secrets.token_hex(8)}"
            try:
                return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444), temp
            except FileNotFoundError:
                os.makedirs(shard, exist_ok=True)
        temp = f"{shard}/.tmp-{secrets.token_hex(8)}"
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444), temp

    def _commit(self, fd: int, temp: str, final: str) -> None:
        try:
            if self._fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, final)
        if self._fsync:
            dir_fd = os.open(os.path.dirname(final), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _write_with(self, digest: Digest, fill: Callable[[int], None]) -> bool:
        """Write a blob atomically with `fill(fd)`; False if it was already present."""
        final = self._path(digest)
        if self._has(digest, final):
            return False
        shard = os.path.dirname(final)
        try:
            fd, temp = self._open_temp(shard)
        except OSError as exc:
            raise StoreError(f"Cannot write to the local store at {shard}: {exc}") from exc
        try:
            try:
                fill(fd)
            except BaseException:
                os.close(fd)
                raise
            self._commit(fd, temp, final)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if isinstance(exc, OSError):
                raise StoreError(f"Cannot write blob {final} to the local store: {exc}") from exc
            raise
        return True

    def _write_sync(self, blobs: Mapping[Digest, bytes]) -> None:
        for digest, data in blobs.items():
            self._write_with(digest, functools.partial(_write_all, data=data))

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Store each blob atomically; present blobs are not rewritten."""
        if blobs:
            await trio.to_thread.run_sync(self._write_sync, dict(blobs))

    def _write_from_file_sync(self, digest: Digest, src: str) -> None:
        def fill(fd: int) -> None:
            src_fd = os.open(src, os.O_RDONLY)
            try:
                _copy_fd(src_fd, fd)
            finally:
                os.close(src_fd)

        self._write_with(digest, fill)

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        """Copy `src` into the store under `digest` (reflink or in-kernel copy where possible)."""
        await trio.to_thread.run_sync(self._write_from_file_sync, digest, os.fspath(src))

    def _read_to_file_sync(self, digest: Digest, dest: str) -> bool:
        try:
            src_fd = os.open(self._path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            dst_fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _copy_fd(src_fd, dst_fd)
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        return True

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        """Copy one blob to `dest`; False when absent."""
        return await trio.to_thread.run_sync(self._read_to_file_sync, digest, os.fspath(dest))

    def _evict_sync(self, digests: Iterable[Digest]) -> None:
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(digest))

    async def evict(self, digests: Iterable[Digest]) -> None:
        """Delete these blobs (read-only files in a writable directory can be unlinked)."""
        digests = list(digests)
        if digests:
            await trio.to_thread.run_sync(self._evict_sync, digests)

    def _remove_stale_sync(self, max_age_seconds: float) -> int:
        removed = 0
        cutoff = time.time() - max_age_seconds
        try:
            shards = list(os.scandir(self._root_str))
        except FileNotFoundError:
            return 0
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                if entry.name.startswith(".tmp-"):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat(follow_symlinks=False).st_mtime <= cutoff:
                            os.unlink(entry.path)
                            removed += 1
        return removed

    async def remove_stale_temp_files(self, max_age_seconds: float = 3600.0) -> int:
        """Delete temporary files left by writers that died mid-write; returns how many.

        Only files older than `max_age_seconds` are removed, so concurrent writers (other
        processes sharing the store) are not disturbed.
        """
        return await trio.to_thread.run_sync(self._remove_stale_sync, max_age_seconds)


def _read_blob_file(path: str, expected: int) -> bytes:
    """Read a whole blob file (normally exactly `expected` bytes long).

    A file of another size is read whole too, so the Store can tell a corrupt blob (evict it)
    from a digest that merely lies about the size (keep the blob).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, max(size, expected) + 1)
        if len(data) <= size:
            return data
        parts = [data]  # the file grew while we read it
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


# --- globs ---------------------------------------------------------------------------------------

# A glob component: None for `**`, a str for a literal name, or a compiled matcher.
_Component = None | str | Callable[[str], Any]
_State = tuple[int, int]  # (pattern index, position in its components)
_States = frozenset[_State]


def _compile_component(component: str) -> _Component:
    if component == "**":
        return None
    if not any(ch in component for ch in "*?["):
        return component
    return re.compile(_translate_component(component), re.DOTALL).fullmatch


def _translate_component(component: str) -> str:
    """A regex for one glob component: `*`, `?`, `[...]`/`[!...]`; everything else literal."""
    out: list[str] = []
    i, n = 0, len(component)
    while i < n:
        ch = component[i]
        i += 1
        if ch == "*":
            while i < n and component[i] == "*":
                i += 1
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            j = i
            if j < n and component[j] in "!^":
                j += 1
            if j < n and component[j] == "]":
                j += 1
            while j < n and component[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
            else:
                body = component[i:j]
                i = j + 1
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = "".join(c if c == "-" else re.escape(c) for c in body)
                out.append(f"[{'^' if negate else ''}{body}]")
        else:
            out.append(re.escape(ch))
    return "".join(out)


class _Plan:
    """Everything about one set of NFA states, computed once: the walk asks it per entry."""

    __slots__ = ("accepted", "all_below", "const", "literal_names", "literals", "live", "patterns")

    def __init__(
        self,
        const: _States,
        literals: dict[str, _States],
        patterns: list[tuple[Callable[[str], Any], _States]],
        accepted: tuple[int, ...],
        live: bool,
        all_below: bool,
        literal_names: frozenset[str] | None,
    ) -> None:
        self.const = const  # states reached whatever the name (through `**`)
        self.literals = literals  # name -> states reached (const included)
        self.patterns = patterns  # (matcher, states reached when it matches)
        self.accepted = accepted  # patterns that match the path leading here
        self.live = live  # can anything below still match?
        self.all_below = all_below  # does some pattern match everything below?
        self.literal_names = literal_names  # if only literal names can match next: those


class _Patterns:
    """A set of path patterns run as one NFA over path components.

    A state `(g, p)` means "pattern g has matched its first p components". State sets are kept
    closed under `**` matching zero components. Per state set a `_Plan` is built once, so a
    walk of ten thousand entries costs a dict lookup per entry for `**`-style globs.
    """

    __slots__ = ("_components", "_plans", "start", "texts")

    def __init__(self, texts: Sequence[str], components: Sequence[Sequence[_Component]]) -> None:
        self.texts = tuple(texts)
        self._components = tuple(tuple(c) for c in components)
        # Invariant: _plans[s] describes exactly the state set s (states are immutable).
        self._plans: dict[_States, _Plan] = {}
        self.start = self._close({(g, 0) for g in range(len(self._components))})

    @classmethod
    def globs(cls, globs: Sequence[str]) -> _Patterns:
        return cls(globs, [[_compile_component(c) for c in g.split("/")] for g in globs])

    @classmethod
    def literal(cls, paths: Sequence[tuple[str, ...]], recursive: Sequence[bool]) -> _Patterns:
        """Literal paths (no glob syntax); with `recursive`, also everything below them."""
        components: list[list[_Component]] = []
        for comps, deep in zip(paths, recursive, strict=True):
            components.append([*comps, None] if deep else list(comps))
        return cls(["/".join(p) for p in paths], components)

    def _close(self, states: Iterable[_State]) -> _States:
        closed = set(states)
        pending = list(closed)
        while pending:
            g, p = pending.pop()
            comps = self._components[g]
            if p < len(comps) and comps[p] is None and (g, p + 1) not in closed:
                closed.add((g, p + 1))
                pending.append((g, p + 1))
        return frozenset(closed)

    def plan(self, states: _States) -> _Plan:
        """The (cached) plan of a state set."""
        plan = self._plans.get(states)
        if plan is None:
            plan = self._plans[states] = self._make_plan(states)
        return plan

    def _make_plan(self, states: _States) -> _Plan:
        const: set[_State] = set()
        literal_targets: dict[str, set[_State]] = {}
        pattern_targets: list[tuple[Callable[[str], Any], _States]] = []
        accepted: list[int] = []
        live = all_below = False
        only_literals = True
        for g, p in sorted(states):
            comps = self._components[g]
            if p == len(comps):
                accepted.append(g)
                continue
            live = True
            if all(c is None for c in comps[p:]):
                all_below = True
            comp = comps[p]
            if comp is None:
                const.add((g, p))
                only_literals = False
            elif isinstance(comp, str):
                literal_targets.setdefault(comp, set()).add((g, p + 1))
            else:
                pattern_targets.append((comp, self._close([(g, p + 1)])))
                only_literals = False
        const_closed = self._close(const)
        literals = {name: const_closed | self._close(t) for name, t in literal_targets.items()}
        return _Plan(
            const_closed,
            literals,
            pattern_targets,
            tuple(accepted),
            live,
            all_below,
            frozenset(literal_targets) if only_literals else None,
        )

    def step(self, states: _States, name: str) -> _States:
        """The states after matching one more path component `name`."""
        return self.step_with(self.plan(states), name)

    @staticmethod
    def step_with(plan: _Plan, name: str) -> _States:
        """`step` from the states whose plan is `plan`."""
        result = plan.literals.get(name, plan.const)
        for matches, targets in plan.patterns:
            if matches(name):
                result = result | targets
        return result


def _check_unmatched(
    globs: PathGlobs, matched: set[int], includes: Sequence[str], where: str
) -> None:
    behavior = globs.glob_match_error_behavior
    if behavior is GlobMatchErrorBehavior.ignore or not includes:
        return
    unmatched = [g for i, g in enumerate(includes) if i not in matched]
    if globs.conjunction is GlobExpansionConjunction.any_match and len(unmatched) < len(includes):
        return
    if not unmatched:
        return
    origin = globs.description_of_origin or "PathGlobs"
    listed = ", ".join(repr(g) for g in unmatched)
    plural = "s" if len(unmatched) > 1 else ""
    message = (
        f"Unmatched glob{plural} from {origin}: {listed} matched no files or directories "
        f"{where}. Fix the glob{plural} or create the files; to allow this, use "
        "glob_match_error_behavior=GlobMatchErrorBehavior.ignore."
    )
    if behavior is GlobMatchErrorBehavior.error:
        raise UnmatchedGlobsError(message, unmatched)
    warnings.warn(UnmatchedGlobsWarning(message), stacklevel=4)


# --- walking the file system --------------------------------------------------------------------


@dataclass(slots=True)
class _Found:
    """What a walk of a real directory found."""

    files: list[tuple[str, str, os.stat_result]]  # (relative path, path to read, stat)
    dirs: list[str]  # directories matched themselves (may be empty)
    matched: set[int]  # include patterns that matched something
    # Files whose stat matched the stat cache: (relative path, path, digest, executable).
    hits: list[tuple[str, str, Digest, bool]]


def _walk(
    root: str,
    includes: _Patterns,
    excludes: _Patterns,
    stat_cache: Mapping[str, tuple[int, int, int, int, Digest]] | None = None,
) -> _Found:
    """Walk `root` (a real path) for paths `includes` match and `excludes` do not.

    Symlinks are followed when they resolve inside `root`; a symlink resolving outside is an
    `InvalidPathError`; a dangling one is ignored, as is one leading back to an ancestor.
    Files found unchanged in `stat_cache` go to `hits` instead of `files`.
    """
    found = _Found([], [], set(), [])
    hits = found.hits
    files = found.files
    cache_get = stat_cache.get if stat_cache is not None else None
    root_prefix = root.rstrip("/") + "/"
    try:
        root_stat = os.stat(root)
    except OSError as exc:
        raise StoreError(f"Cannot snapshot {root}: {exc.strerror}.") from exc
    if not stat.S_ISDIR(root_stat.st_mode):
        raise StoreError(f"Cannot snapshot {root}: it is not a directory.")
    ancestors = {(root_stat.st_dev, root_stat.st_ino)}

    def visit(dir_path: str, rel: str, inc: _States, exc: _States) -> None:
        # The hot loop of a snapshot: per entry, a dict lookup or two for the glob NFA (the
        # plans of the state sets are looked up once per distinct set, not per entry), one
        # stat, and a stat-cache comparison.
        inc_plan = includes.plan(inc)
        names = inc_plan.literal_names
        if names is not None:
            candidates: Iterable[tuple[str, os.DirEntry[str] | None]] = (
                (name, None) for name in sorted(names)
            )
        else:
            try:
                with os.scandir(dir_path) as it:
                    candidates = [(e.name, e) for e in sorted(it, key=_entry_name)]
            except OSError as error:
                raise StoreError(f"Cannot list directory {dir_path}: {error.strerror}.") from error
        exc_plan = excludes.plan(exc) if exc else None
        literal_get = inc_plan.literals.get
        const = inc_plan.const
        matchers = inc_plan.patterns
        last_states: _States | None = None
        plan = inc_plan
        prefix = f"{dir_path}/" if dir_path != "/" else "/"
        rel_prefix = f"{rel}/" if rel else ""
        for name, entry in candidates:
            inc2 = literal_get(name, const)
            for matches, targets in matchers:
                if matches(name):
                    inc2 = inc2 | targets
            if not inc2:
                continue
            if exc_plan is not None:
                exc2 = excludes.step_with(exc_plan, name)
                if exc2 and excludes.plan(exc2).accepted:
                    continue
            else:
                exc2 = exc
            path = prefix + name
            rel_path = rel_prefix + name
            try:
                st = entry.stat(follow_symlinks=False) if entry is not None else os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(path)
                if not (target + "/").startswith(root_prefix):
                    raise InvalidPathError(
                        f"{rel_path!r} is a symlink to {target}, outside the root {root}. "
                        "Snapshots and captured outputs may only contain symlinks that stay "
                        "inside the root; exclude it (e.g. '!" + rel_path + "') or replace it."
                    )
                try:
                    st = os.stat(target)
                except OSError:
                    continue  # dangling (or a loop): nothing to read
                path = target
                mode = st.st_mode
            if inc2 is not last_states:
                plan = includes.plan(inc2)
                last_states = inc2
            if stat.S_ISDIR(mode):
                if plan.accepted:
                    found.dirs.append(rel_path)
                    found.matched.update(plan.accepted)
                if plan.live:
                    key = (st.st_dev, st.st_ino)
                    if key in ancestors:
                        continue  # a symlink back to an ancestor: do not loop
                    ancestors.add(key)
                    visit(path, rel_path, inc2, exc2)
                    ancestors.discard(key)
            elif stat.S_ISREG(mode) and plan.accepted:
                found.matched.update(plan.accepted)
                if cache_get is not None:
                    cached = cache_get(path)
                    if (
                        cached is not None
                        and cached[0] == st.st_size
                        and cached[1] == st.st_mtime_ns
                        and cached[2] == st.st_ino
                        and cached[3] == st.st_ctime_ns
                    ):
                        hits.append((rel_path, path, cached[4], bool(mode & stat.S_IXUSR)))
                        continue
                files.append((rel_path, path, st))

    visit(root.rstrip("/") or "/", "", includes.start, excludes.start)
    return found


# --- building trees -----------------------------------------------------------------------------


class _Builder:
    """A mutable directory tree under construction: name -> subtree, or file/verbatim-dir entry."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[str, _Builder | DirectoryEntry] = {}

    def directory(self, comps: Sequence[str], what: str) -> _Builder:
        node = self
        for i, name in enumerate(comps):
            child = node.entries.get(name)
            if child is None:
                child = node.entries[name] = _Builder()
            elif isinstance(child, DirectoryEntry):
                path = "/".join(comps[: i + 1])
                if not child.is_dir:
                    raise DigestConflictError(
                        f"{what}: {path!r} is both a file ({_describe_entry(child)}) and a "
                        f"directory containing {'/'.join(comps)!r}.",
                        path,
                    )
                raise AssertionError(f"cannot add below verbatim directory {path!r}")
            node = child
        return node

    def add(self, comps: Sequence[str], entry: DirectoryEntry, what: str) -> None:
        parent = self.directory(comps[:-1], what)
        name = comps[-1]
        existing = parent.entries.get(name)
        if existing is None:
            parent.entries[name] = entry
            return
        path = "/".join(comps)
        if existing == entry:
            return
        existing_desc = (
            "a directory" if isinstance(existing, _Builder) else _describe_entry(existing)
        )
        raise DigestConflictError(
            f"{what}: conflicting entries for {path!r}: {existing_desc} and "
            f"{_describe_entry(entry)}. Each path may only be given once (or with identical "
            "content).",
            path,
        )

    def encode(
        self, blobs: dict[Digest, bytes], listings: dict[Digest, dict[str, DirectoryEntry]]
    ) -> Digest:
        """Encode this tree bottom-up, collecting every directory blob into `blobs`."""
        entries: dict[str, DirectoryEntry] = {}
        for name, child in self.entries.items():
            if isinstance(child, _Builder):
                entries[name] = DirectoryEntry(True, child.encode(blobs, listings))
            else:
                entries[name] = child
        data = encode_directory(entries)
        digest = _hash_bytes(data)
        blobs[digest] = data
        listings[digest] = entries
        return digest


class _FileToIngest(NamedTuple):
    rel: str
    path: str
    size: int
    is_executable: bool
    stat_key: tuple[int, int, int, int] | None  # (size, mtime_ns, ino, ctime_ns) if cacheable


# --- the store ----------------------------------------------------------------------------------


class Store:
    """The engine's content-addressed file store over a `BlobStore`.

    Args:
        blobs: where blobs live. A blob store with a `local_path(digest) -> Path | None`
            method (`FileBlobStore`, the sqlite cache for its large blobs) lets `materialize`
            hard-link or copy blob files instead of reading them.
        stat_cache_path: persist the stat cache (see `snapshot`) to this file on `aclose()`
            and load it on first use, so that a new process re-snapshots an unchanged tree
            without rehashing it.
        use_mmap: hash large files with `update_mmap` (fastest). Memory-mapping a file that is
            truncated while being hashed raises SIGBUS, so disable this if workspace files may
            be truncated in place during a snapshot.

    Example:
        >>> store = Store(FileBlobStore(cache_dir / "blobs"))  # doctest: +SKIP
        >>> snapshot = await store.snapshot(root, PathGlobs(["src/**/*.py"]))  # doctest: +SKIP
    """

    def __init__(
        self,
        blobs: BlobStore,
        *,
        stat_cache_path: Path | None = None,
        use_mmap: bool = True,
        io_threads: int | None = None,
    ) -> None:
        self._blobs = blobs
        # Where a blob's file is, if the blob store keeps it as one (called in worker threads).
        self._path_of = _path_function(blobs)
        self._use_mmap = use_mmap
        # Large files are hashed and copied in parallel (BLAKE3's threads and the copies release
        # the GIL); small files are read by one thread at a time (see `_ingest_small`).
        self._limiter = trio.CapacityLimiter(io_threads or min(8, max(4, os.cpu_count() or 1)))
        # Invariant: every digest in _present was written or read-and-verified by this Store
        # (or confirmed by find_missing_blobs) and not evicted since. Stat-cache hits and
        # directory writes trust it instead of asking the blob store again; a garbage collector
        # deleting blobs under a live Store would surface as MissingDigestError on use.
        self._present: set[Digest] = set()
        self._listings: dict[Digest, dict[str, DirectoryEntry]] = {}
        # Directory listings this Store encoded, as their entries in order -> digest.
        self._encoded: dict[tuple[tuple[str, DirectoryEntry], ...], Digest] = {}
        # Stat cache: real path -> (size, mtime_ns, inode, ctime_ns, digest). An entry is only
        # added when the file's mtime and ctime are older than the racy window, so a write in
        # the same timestamp tick as our read can never be mistaken for "unchanged".
        self._stat_cache: dict[str, tuple[int, int, int, int, Digest]] = {}
        self._stat_cache_path = stat_cache_path
        self._stat_cache_loaded = stat_cache_path is None
        # Blob files verified by hashing, by (device, inode, size, mtime_ns) at that time; a
        # changed file is re-verified before it is linked or copied into a sandbox.
        self._verified: dict[Digest, tuple[int, int, int, int]] = {}
        self._counters = dict.fromkeys(StoreStatistics.__slots__, 0)
        self._hard_links_work = True

    @property
    def blobs(self) -> BlobStore:
        """The underlying `BlobStore`."""
        return self._blobs

    def statistics(self) -> StoreStatistics:
        """Counters since this Store was created."""
        return StoreStatistics(**self._counters)

    async def aclose(self) -> None:
        """Persist the stat cache (when `stat_cache_path` was given)."""
        if self._stat_cache_path is not None and self._stat_cache_loaded:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 30):
                await trio.to_thread.run_sync(self._save_stat_cache_sync)

    # -- blobs ----------------------------------------------------------------------------------

    def _mark_present(self, digests: Iterable[Digest]) -> None:
        if len(self._present) > _PRESENT_SET_ENTRIES:
            self._present.clear()
        self._present.update(digests)

    async def store_bytes(self, data: bytes) -> Digest:
        """Store one blob; returns its digest."""
        if len(data) > _INLINE_HASH_BYTES:
            digest = await trio.to_thread.run_sync(_hash_bytes, data)
        else:
            digest = _hash_bytes(data)
        if digest not in self._present and not is_intrinsic(digest):
            await self._blobs.write_blobs({digest: data})
            self._mark_present((digest,))
        return digest

    async def load_bytes(self, digest: Digest) -> bytes:
        """The verified bytes of one blob.

        Raises:
            MissingDigestError: the blob is absent, or was corrupt (and has been evicted).
        """
        data = await self._read_verified((digest,))
        if digest not in data:
            raise MissingDigestError(_missing_message(digest))
        return data[digest]

    async def _read_verified(self, digests: Collection[Digest]) -> dict[Digest, bytes]:
        result: dict[Digest, bytes] = {}
        wanted: list[Digest] = []
        for digest in digests:
            intrinsic = _INTRINSIC_BLOBS.get(digest)
            if intrinsic is not None:
                result[digest] = intrinsic
            else:
                wanted.append(digest)
        if not wanted:
            return result
        raw: dict[Digest, bytes] = await self._blobs.read_blobs(wanted)
        total = sum(len(data) for data in raw.values())
        if total > _INLINE_HASH_BYTES:
            bad = await trio.to_thread.run_sync(_find_corrupt, raw)
        else:
            bad = _find_corrupt(raw)
        good = [d for d in raw if d not in bad]
        for digest in good:
            result[digest] = raw[digest]
        self._mark_present(good)
        corrupt = [d for d, kind in bad.items() if kind == "corrupt"]
        if corrupt:
            await self._evict_corrupt(corrupt)
        return result

    async def _evict_corrupt(self, digests: Sequence[Digest], where: str = "") -> None:
        for digest in digests:
            self._present.discard(digest)
            self._verified.pop(digest, None)
            self._listings.pop(digest, None)
            warnings.warn(
                CorruptBlobWarning(
                    f"Blob {digest.fingerprint} ({digest.serialized_bytes_length} bytes){where} "
                    f"in {self._blobs!r} is corrupt: its content does not hash to its digest. "
                    "It has been evicted and is treated as missing."
                ),
                stacklevel=3,
            )
        self._counters["corrupt_blobs_evicted"] += len(digests)
        await self._blobs.evict(digests)

    async def _ensure_present(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` that is missing (asking the blob store only when needed)."""
        present = self._present
        unknown = {d for d in digests if d not in present}
        unknown.difference_update(_INTRINSIC_BLOBS)
        if not unknown:
            return frozenset()
        missing: frozenset[Digest] = await self._blobs.find_missing_blobs(unknown)
        self._mark_present(d for d in unknown if d not in missing)
        return missing

    async def _write_new(self, blobs: Mapping[Digest, bytes], *, ask_first: bool = False) -> None:
        """Write the blobs not known to be present.

        With `ask_first`, ask the blob store which it lacks and write only those: a write of
        blobs it already holds still costs a transaction or a stat per blob, and a snapshot of
        a known tree (a new process, no stat cache) finds most of its files stored.
        """
        present = self._present
        new = {d: b for d, b in blobs.items() if d not in present and d not in _INTRINSIC_BLOBS}
        if not new:
            return
        if ask_first:
            missing = await self._blobs.find_missing_blobs(new)
            if missing:
                await self._blobs.write_blobs({d: new[d] for d in missing})
        else:
            await self._blobs.write_blobs(new)
        self._mark_present(new)

    # -- trees ----------------------------------------------------------------------------------

    def _cache_listing(self, digest: Digest, listing: dict[str, DirectoryEntry]) -> None:
        if len(self._listings) >= _LISTING_CACHE_ENTRIES:
            # Drop the older half (dicts keep insertion order): cheap, and hot entries return.
            for key in list(self._listings)[: _LISTING_CACHE_ENTRIES // 2]:
                del self._listings[key]
        self._listings[digest] = listing

    async def _load_listings(
        self, digests: Iterable[Digest], where: Mapping[Digest, str] | None = None
    ) -> dict[Digest, dict[str, DirectoryEntry]]:
        result: dict[Digest, dict[str, DirectoryEntry]] = {}
        needed: list[Digest] = []
        for digest in digests:
            listing = self._listings.get(digest)
            if listing is not None:
                result[digest] = listing
            elif digest == EMPTY_DIGEST:
                result[digest] = {}
            else:
                needed.append(digest)
        if needed:
            data = await self._read_verified(needed)
            for digest in needed:
                blob = data.get(digest)
                if blob is None:
                    place = where.get(digest, "") if where else ""
                    raise MissingDigestError(_missing_message(digest, place))
                listing = decode_directory(blob, digest)
                self._cache_listing(digest, listing)
                result[digest] = listing
        return result

    async def _load_tree(self, root: Digest) -> dict[Digest, dict[str, DirectoryEntry]]:
        """Every directory listing of the tree `root`, loaded level by level (one read each)."""
        tree: dict[Digest, dict[str, DirectoryEntry]] = {}
        frontier: dict[Digest, str] = {root: ""}
        while frontier:
            where = {
                d: f" (directory {p!r} of tree {root.fingerprint[:12]}…)"
                for d, p in frontier.items()
                if p
            }
            loaded = await self._load_listings(frontier, where)
            tree.update(loaded)
            next_frontier: dict[Digest, str] = {}
            for digest, listing in loaded.items():
                prefix = frontier[digest]
                for name, entry in listing.items():
                    if entry.is_dir and entry.digest not in tree:
                        next_frontier.setdefault(entry.digest, _join(prefix, name))
            frontier = next_frontier
        return tree

    @staticmethod
    def _iter_tree(
        tree: Mapping[Digest, Mapping[str, DirectoryEntry]], root: Digest, prefix: str = ""
    ) -> Iterator[tuple[str, DirectoryEntry]]:
        for name, entry in tree[root].items():
            path = _join(prefix, name)
            yield path, entry
            if entry.is_dir:
                yield from Store._iter_tree(tree, entry.digest, path)

    async def _store_builder(self, builder: _Builder) -> Digest:
        blobs: dict[Digest, bytes] = {}
        listings: dict[Digest, dict[str, DirectoryEntry]] = {}
        digest = builder.encode(blobs, listings)
        for listing_digest, listing in listings.items():
            self._cache_listing(listing_digest, listing)
        await self._write_new(blobs)
        return digest

    async def _store_flat_tree(
        self, files: Sequence[tuple[str, Digest, bool]], dirs: Iterable[str]
    ) -> tuple[Digest, list[str]]:
        """Store the tree of distinct, non-conflicting paths (as a walk of a real directory
        finds them) and return its digest and all its directory paths.

        Cheaper than `_Builder` (one dict operation per file): a file system cannot hold two
        entries with one path, so there is nothing to check.
        """
        listings: dict[str, dict[str, DirectoryEntry]] = {"": {}}
        children: dict[str, list[str]] = {}

        def ensure(path: str) -> dict[str, DirectoryEntry]:
            listing = listings.get(path)
            if listing is None:
                listing = listings[path] = {}
                parent, _, name = path.rpartition("/")
                ensure(parent)
                children.setdefault(parent, []).append(name)
            return listing

        for directory in dirs:
            ensure(directory)
        for rel, digest, executable in files:
            parent, _, name = rel.rpartition("/")
            listing = listings.get(parent)
            if listing is None:
                listing = ensure(parent)
            listing[name] = DirectoryEntry(False, digest, executable)
        blobs: dict[Digest, bytes] = {}
        digests: dict[str, Digest] = {}
        # Deepest first, so every subdirectory's digest is known before its parent's listing.
        memo = self._encoded
        for path in sorted(listings, key=lambda p: p.count("/") if p else -1, reverse=True):
            listing = listings[path]
            for name in children.get(path, ()):
                listing[name] = DirectoryEntry(True, digests[_join(path, name)])
            # An unchanged directory (a re-snapshot) has the very same entries, usually the
            # very same objects (from the stat cache): a lookup instead of encoding and hashing.
            key = tuple(listing.items())
            known = memo.get(key)
            if known is None:
                data = encode_directory(listing)
                known = _hash_bytes(data)
                blobs[known] = data
                if len(memo) >= _LISTING_CACHE_ENTRIES // 10:
                    memo.clear()
                memo[key] = known
                self._cache_listing(known, listing)
            elif known not in self._present:
                blobs[known] = encode_directory(listing)  # evicted since: store it again
            digests[path] = known
        await self._write_new(blobs)
        del listings[""]
        return digests[""], list(listings)

    # -- intrinsics -----------------------------------------------------------------------------

    async def create_digest(self, request: CreateDigest) -> Digest:
        """A digest holding exactly the given files and directories.

        Raises:
            DigestConflictError: the same path is given twice with different content, or both
                as a file and as a directory.
            MissingDigestError: a `FileEntry` names a blob that is not in the store.
        """
        builder = _Builder()
        contents: dict[Digest, bytes] = {}
        referenced: dict[Digest, str] = {}
        big = sum(len(e.content) for e in request.entries if isinstance(e, FileContent))
        if big > _INLINE_HASH_BYTES:
            digests = await trio.to_thread.run_sync(_hash_contents, request.entries)
        else:
            digests = _hash_contents(request.entries)
        for entry, digest in zip(request.entries, digests, strict=True):
            comps = tuple(entry.path.split("/"))
            if isinstance(entry, Directory):
                builder.directory(comps, "CreateDigest")
            elif isinstance(entry, FileContent):
                assert digest is not None
                contents[digest] = entry.content
                builder.add(
                    comps, DirectoryEntry(False, digest, entry.is_executable), "CreateDigest"
                )
            else:
                referenced.setdefault(entry.file_digest, entry.path)
                builder.add(
                    comps,
                    DirectoryEntry(False, entry.file_digest, entry.is_executable),
                    "CreateDigest",
                )
        missing = await self._ensure_present(d for d in referenced if d not in contents)
        if missing:
            paths = ", ".join(repr(referenced[d]) for d in sorted(missing))
            raise MissingDigestError(
                f"CreateDigest: the FileEntry blobs for {paths} are not in the store. A "
                "FileEntry must name a file digest that was stored before (e.g. one from "
                "DigestEntries)."
            )
        await self._write_new(contents)
        return await self._store_builder(builder)

    async def merge_digests(self, request: MergeDigests) -> Digest:
        """One tree holding the entries of all the given trees.

        Identical entries are merged; directories are merged recursively.

        Raises:
            DigestConflictError: a path is a file in one input and a directory in another, or a
                file with different content or executable bit; names both inputs' entries.
        """
        inputs: dict[Digest, int] = {}
        for index, digest in enumerate(request.digests):
            if digest != EMPTY_DIGEST:
                inputs.setdefault(digest, index)
        if not inputs:
            return EMPTY_DIGEST
        if len(inputs) == 1:
            (only,) = inputs
            await self._load_listings((only,))  # a file digest or a missing one fails here
            return only
        blobs: dict[Digest, bytes] = {}
        digest = await self._merge([(i, d) for d, i in inputs.items()], "", request, blobs)
        await self._write_new(blobs)
        return digest

    async def _merge(
        self,
        sources: list[tuple[int, Digest]],
        prefix: str,
        request: MergeDigests,
        blobs: dict[Digest, bytes],
    ) -> Digest:
        listings = await self._load_listings(d for _, d in sources)
        names: dict[str, list[tuple[int, DirectoryEntry]]] = {}
        for index, digest in sources:
            for name, entry in listings[digest].items():
                names.setdefault(name, []).append((index, entry))
        merged: dict[str, DirectoryEntry] = {}
        for name, candidates in names.items():
            first_index, first = candidates[0]
            distinct: dict[Digest, int] = {}
            for index, entry in candidates:
                if entry == first:
                    continue
                path = _join(prefix, name)
                if not (entry.is_dir and first.is_dir):
                    raise DigestConflictError(
                        f"MergeDigests: conflicting entries for {path!r}: in input "
                        f"#{first_index} ({request.digests[first_index]}) it is "
                        f"{_describe_entry(first)}, in input #{index} "
                        f"({request.digests[index]}) it is {_describe_entry(entry)}. Remove "
                        "one of them (e.g. with DigestSubset) before merging.",
                        path,
                    )
                distinct.setdefault(entry.digest, index)
            if not distinct:
                merged[name] = first
            else:
                sub_sources = [(first_index, first.digest)] + [(i, d) for d, i in distinct.items()]
                merged[name] = DirectoryEntry(
                    True, await self._merge(sub_sources, _join(prefix, name), request, blobs)
                )
        data = encode_directory(merged)
        digest = _hash_bytes(data)
        blobs[digest] = data
        self._cache_listing(digest, merged)
        return digest

    async def add_prefix(self, request: AddPrefix) -> Digest:
        """The same tree moved under the directory `request.prefix`."""
        comps = split_path(request.prefix, "AddPrefix.prefix", allow_root=True)
        await self._load_listings((request.digest,))
        digest = request.digest
        blobs: dict[Digest, bytes] = {}
        for name in reversed(comps):
            listing = {name: DirectoryEntry(True, digest)}
            data = encode_directory(listing)
            digest = _hash_bytes(data)
            blobs[digest] = data
            self._cache_listing(digest, listing)
        await self._write_new(blobs)
        return digest

    async def remove_prefix(self, request: RemovePrefix) -> Digest:
        """The subtree at `request.prefix`, as a tree of its own.

        Raises:
            StoreError: the tree has entries outside the prefix, or the prefix is a file or
                is absent from a non-empty tree.
        """
        comps = split_path(request.prefix, "RemovePrefix.prefix", allow_root=True)
        digest = request.digest
        for i, name in enumerate(comps):
            listing = (await self._load_listings((digest,)))[digest]
            if not listing and i == 0:
                return EMPTY_DIGEST
            here = "/".join(comps[: i + 1])
            entry = listing.get(name)
            if entry is None or not entry.is_dir:
                what = "is a file" if entry is not None else "does not exist"
                raise StoreError(
                    f"RemovePrefix({request.prefix!r}) of {request.digest}: {here!r} {what} in "
                    "the tree; the prefix must be a directory of the tree."
                )
            others = sorted(_join("/".join(comps[:i]), n) for n in listing if n != name)
            if others:
                shown = ", ".join(repr(o) for o in others[:5])
                more = f" and {len(others) - 5} more" if len(others) > 5 else ""
                raise StoreError(
                    f"RemovePrefix({request.prefix!r}) of {request.digest}: the tree has entries "
                    f"outside the prefix: {shown}{more}. Take the prefix's subset first "
                    f"(DigestSubset with PathGlobs([{request.prefix + '/**'!r}]))."
                )
            digest = entry.digest
        await self._load_listings((digest,))
        return digest

    async def digest_subset(self, request: DigestSubset) -> Digest:
        """The part of a tree matched by globs (same glob semantics as `snapshot`).

        Subtrees matched whole (`dir/**` with no exclude reaching into them) are reused by
        digest without being read.
        """
        globs = request.globs
        includes = _Patterns.globs(globs.includes)
        excludes = _Patterns.globs(globs.excludes)
        builder = _Builder()
        matched: set[int] = set()
        what = "DigestSubset"
        # Frontier: directory digest -> [(relative path, include states, exclude states)].
        frontier: list[tuple[Digest, str, _States, _States]] = [
            (request.digest, "", includes.start, excludes.start)
        ]
        while frontier:
            listings = await self._load_listings({d for d, _, _, _ in frontier})
            next_frontier: list[tuple[Digest, str, _States, _States]] = []
            for digest, rel, inc, exc in frontier:
                for name, entry in listings[digest].items():
                    inc2 = includes.step(inc, name)
                    if not inc2:
                        continue
                    exc2 = excludes.step(exc, name)
                    if exc2 and excludes.plan(exc2).accepted:
                        continue
                    path = _join(rel, name)
                    plan = includes.plan(inc2)
                    accepted = plan.accepted
                    if accepted:
                        matched.update(accepted)
                    comps = path.split("/")
                    if not entry.is_dir:
                        if accepted:
                            builder.add(comps, entry, what)
                    elif plan.all_below and not excludes.plan(exc2).live:
                        builder.add(comps, entry, what)  # the whole subtree, by digest
                    else:
                        if accepted:
                            builder.directory(comps, what)
                        if plan.live:
                            next_frontier.append((entry.digest, path, inc2, exc2))
            frontier = next_frontier
        _check_unmatched(globs, matched, includes.texts, f"in digest {request.digest}")
        return await self._store_builder(builder)

    async def contents(self, digest: Digest) -> DigestContents:
        """Every file of a tree with its content, sorted by path.

        Raises:
            MissingDigestError: a directory or file blob of the tree is absent or corrupt.
        """
        tree = await self._load_tree(digest)
        files = [(p, e) for p, e in self._iter_tree(tree, digest) if not e.is_dir]
        wanted = {e.digest: p for p, e in reversed(files)}
        data = await self._read_verified(wanted)
        missing = [d for d in wanted if d not in data]
        if missing:
            raise MissingDigestError(
                _missing_message(missing[0], f" (file {wanted[missing[0]]!r} of tree {digest})")
            )
        files.sort(key=lambda item: item[0])
        return DigestContents(FileContent(p, data[e.digest], e.is_executable) for p, e in files)

    async def entries(self, digest: Digest) -> DigestEntries:
        """Every file (by digest) and directory of a tree, sorted by path."""
        tree = await self._load_tree(digest)
        items: list[FileEntry | Directory] = [
            Directory(p) if e.is_dir else FileEntry(p, e.digest, e.is_executable)
            for p, e in self._iter_tree(tree, digest)
        ]
        items.sort(key=lambda item: item.path)
        return DigestEntries(items)

    async def snapshot_of(self, digest: Digest) -> Snapshot:
        """The `Snapshot` (sorted files and directories) of a tree."""
        tree = await self._load_tree(digest)
        files: list[str] = []
        dirs: list[str] = []
        for path, entry in self._iter_tree(tree, digest):
            (dirs if entry.is_dir else files).append(path)
        return Snapshot(digest, tuple(sorted(files)), tuple(sorted(dirs)))

    async def tree_blobs(self, digest: Digest) -> frozenset[Digest]:
        """Every blob the tree references (its directory listings and its files).

        Raises:
            MissingDigestError: a part of the tree is not in the store.
        """
        tree = await self._load_tree(digest)
        files: dict[Digest, str] = {}
        for path, entry in self._iter_tree(tree, digest):
            if not entry.is_dir:
                files.setdefault(entry.digest, path)
        missing = await self._ensure_present(files)
        if missing:
            first = min(missing)
            raise MissingDigestError(
                _missing_message(first, f" (file {files[first]!r} of tree {digest})")
            )
        return frozenset(tree) | frozenset(files)

    # -- snapshots and captures -----------------------------------------------------------------

    async def snapshot(self, root: Path | str, globs: PathGlobs) -> Snapshot:
        """Store the files under `root` that `globs` match; returns their `Snapshot`.

        Globs are relative to `root` (see `PathGlobs`). Symlinks are followed when they resolve
        inside `root` (their target's content is stored as a regular file, or walked as a
        directory); a symlink resolving outside `root` is an `InvalidPathError` naming it;
        dangling symlinks are ignored. Only regular files and directories are stored (an
        executable bit is kept when the owner may execute the file).

        A stat cache keyed by (path, size, mtime, inode, ctime) remembers each file's digest,
        so re-snapshotting an unchanged tree reads no file content.

        Raises:
            UnmatchedGlobsError: with `glob_match_error_behavior=error`, globs matched nothing.
            InvalidPathError: an escaping symlink.
            StoreError: `root` is not a readable directory.
        """
        root_real = await trio.to_thread.run_sync(os.path.realpath, root)
        includes = _Patterns.globs(globs.includes)
        excludes = _Patterns.globs(globs.excludes)
        if not self._stat_cache_loaded:
            await trio.to_thread.run_sync(self._load_stat_cache_sync)
        started_ns = time.time_ns()
        found = await trio.to_thread.run_sync(
            _walk, root_real, includes, excludes, self._stat_cache
        )
        _check_unmatched(globs, found.matched, includes.texts, f"under {root_real}")
        files = await self._ingest(found, started_ns, use_stat_cache=True)
        digest, dirs = await self._store_flat_tree(files, found.dirs)
        return Snapshot(digest, tuple(sorted(rel for rel, _, _ in files)), tuple(sorted(dirs)))

    async def capture(
        self, root: Path | str, files: Sequence[str], directories: Sequence[str]
    ) -> Digest:
        """Store a sandbox's declared outputs: `files` and whole `directories` under `root`.

        Declared outputs that do not exist are left out. `"."` as a directory captures all of
        `root`. Symlinks follow the same policy as `snapshot`.

        Raises:
            InvalidPathError: a declared path is absolute, has `..`, an empty component or NUL,
                or a symlink escapes `root`.
            StoreError: a declared file is a directory, or a declared directory is a file.
        """
        file_comps = [split_path(f, "capture output file") for f in files]
        dir_comps = [
            split_path(d, "capture output directory", allow_root=True) for d in directories
        ]
        if not file_comps and not dir_comps:
            return EMPTY_DIGEST
        includes = _Patterns.literal(
            [*file_comps, *dir_comps], [False] * len(file_comps) + [True] * len(dir_comps)
        )
        excludes = _Patterns.globs(())
        root_real = await trio.to_thread.run_sync(os.path.realpath, root)
        found = await trio.to_thread.run_sync(_walk, root_real, includes, excludes)
        declared_files = {"/".join(c) for c in file_comps}
        declared_dirs = {"/".join(c) for c in dir_comps}
        for directory in found.dirs:
            if directory in declared_files:
                raise StoreError(
                    f"Declared output file {directory!r} is a directory in {root}; declare it "
                    "as an output directory instead."
                )
        for rel, _, _ in found.files:
            if rel in declared_dirs:
                raise StoreError(
                    f"Declared output directory {rel!r} is a file in {root}; declare it as "
                    "an output file instead."
                )
        ingested = await self._ingest(found, time.time_ns(), use_stat_cache=False)
        digest, _ = await self._store_flat_tree(ingested, found.dirs)
        return digest

    async def _ingest(
        self, found: _Found, started_ns: int, *, use_stat_cache: bool
    ) -> list[tuple[str, Digest, bool]]:
        """Hash and store found files (stat-cache hits first); returns (rel, digest, executable)."""
        results: list[tuple[str, Digest, bool]] = []
        to_hash: list[_FileToIngest] = []
        for rel, path, st in found.files:
            key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            cacheable = use_stat_cache and _settled(st, started_ns)
            to_hash.append(
                _FileToIngest(rel, path, st.st_size, _executable(st), key if cacheable else None)
            )
        if found.hits:
            missing = await self._ensure_present(hit[2] for hit in found.hits)
            gone: list[tuple[str, str, bool]] = []
            for rel, path, digest, executable in found.hits:
                if digest in missing:
                    gone.append((rel, path, executable))
                else:
                    results.append((rel, digest, executable))
            if gone:  # blobs deleted from the store behind the cache's back: read them again
                stats = await trio.to_thread.run_sync(_stat_all, [path for _, path, _ in gone])
                for (rel, path, executable), st in zip(gone, stats, strict=True):
                    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
                    cacheable = _settled(st, started_ns)
                    to_hash.append(
                        _FileToIngest(rel, path, st.st_size, executable, key if cacheable else None)
                    )
        self._counters["stat_cache_hits"] += len(found.hits) - (len(to_hash) - len(found.files))
        self._counters["stat_cache_misses"] += len(to_hash)
        cache = self._stat_cache
        small = [f for f in to_hash if f.size < _LARGE_FILE_BYTES]
        large = [f for f in to_hash if f.size >= _LARGE_FILE_BYTES]
        hashed: list[tuple[_FileToIngest, Digest]] = []

        async def ingest_large(item: _FileToIngest) -> None:
            async with self._limiter:
                digest = await self._ingest_large_file(item)
            if digest is not None:
                hashed.append((item, digest))

        jobs: list[Callable[[], Awaitable[None]]] = [
            functools.partial(ingest_large, item) for item in large
        ]
        if small:
            jobs.append(functools.partial(self._ingest_small, small, hashed))
        if jobs:
            await _run_all(jobs)

        self._counters["files_hashed"] += len(hashed)
        self._counters["bytes_hashed"] += sum(d.serialized_bytes_length for _, d in hashed)
        for item, digest in hashed:
            results.append((item.rel, digest, item.is_executable))
            if item.stat_key is not None:
                cache[item.path] = (*item.stat_key, digest)
        return results

    async def _ingest_small(
        self, files: Sequence[_FileToIngest], hashed: list[tuple[_FileToIngest, Digest]]
    ) -> None:
        """Read, hash and store small files, a batch at a time: the batch is read and hashed
        in one worker-thread hop, then its new blobs are written.

        Nothing else runs meanwhile, on purpose. Reading and hashing small files is mostly
        Python holding the GIL, between short system calls; any other Python work at the same
        time (a second reader, the event loop asking the blob store about the previous batch)
        takes the GIL at each of those calls and keeps it for up to the switch interval, so
        the reader crawls. Measured on 10,000 small files, whole snapshots into the sqlite
        cache: four parallel readers 0.47-0.53 s, one reader overlapped with the writes
        0.43-0.58 s, one reader with nothing beside it 0.41-0.45 s (of which reading and
        hashing 0.11-0.13 s, against 0.20-0.34 s of thread time before).
        """
        for batch in _chunks_by_size(files, lambda f: f.size):
            read = await trio.to_thread.run_sync(_read_and_hash, batch)
            hashed.extend((item, digest) for item, digest, _ in read)
            await self._write_new({digest: data for _, digest, data in read}, ask_first=True)

    async def _ingest_large_file(self, item: _FileToIngest) -> Digest | None:
        """Hash a large file from disk and copy it into the store; None if it vanished."""
        try:
            for _ in range(3):
                before = await trio.to_thread.run_sync(os.stat, item.path)
                digest = await trio.to_thread.run_sync(_hash_file_large, item.path, self._use_mmap)
                if digest in self._present:
                    return digest
                await self._blobs.write_blob_from_file(digest, Path(item.path))
                after = await trio.to_thread.run_sync(os.stat, item.path)
                if _same_content_stat(before, after):
                    self._mark_present((digest,))
                    return digest
                # The file changed while we hashed or copied it: the stored blob may not match
                # its digest. Check it (evicting it if wrong) and read the file again.
                await self._verify_stored(digest)
        except FileNotFoundError:
            return None  # deleted while we snapshotted: as if the snapshot ran a bit later
        except OSError as exc:
            raise StoreError(f"Cannot read {item.rel!r} ({item.path}): {exc.strerror}.") from exc
        raise StoreError(
            f"{item.rel!r} kept changing while it was being snapshotted; retry when it is "
            "no longer being written."
        )

    async def _verify_stored(self, digest: Digest) -> None:
        """Hash one stored blob (from its file when possible) and evict it if corrupt."""
        path_of = self._path_of
        path = None if path_of is None else await trio.to_thread.run_sync(path_of, digest)
        if path is None:
            await self._read_verified((digest,))
            return
        try:
            actual = await trio.to_thread.run_sync(_hash_file_large, path, False)
        except FileNotFoundError:
            return  # not stored (any more): nothing to check
        if actual != digest:
            await self._evict_corrupt([digest])

    # -- materializing --------------------------------------------------------------------------

    async def materialize(
        self, digest: Digest, dest: Path | str, *, read_only: bool = False
    ) -> None:
        """Write the tree `digest` into the directory `dest` (created if needed).

        Files keep their executable bit (0o755/0o644, or 0o555/0o444 with `read_only`). Every
        blob is verified before it is placed (once per blob file and Store, re-checked when the
        file's inode, size or mtime change).

        Where the blob store keeps a blob as a file (it has `local_path`: `FileBlobStore`, or
        the sqlite cache for blobs above its inline threshold), the file is placed from there,
        never read into memory: with `read_only=True`, non-executable files are *hard links*
        to the store's read-only blob files, fast and space-free. A process that `chmod`s such
        a link and writes to it would change the shared blob; the next read of that blob
        detects the mismatch, evicts it and treats it as missing, so wrong bytes still never
        come back. Otherwise files are copies (a copy-on-write reflink where the filesystem
        supports it, else an in-kernel copy), which the process may modify freely. Other blobs
        are read in batches when small, and streamed into place (`read_blob_to_file`) when
        large.

        Raises:
            MissingDigestError: a blob of the tree is absent or corrupt.
            StoreError: `dest` already contains one of the tree's paths.
        """
        dest_str = os.fspath(dest)
        tree = await self._load_tree(digest)
        dirs: list[str] = []
        files: list[tuple[str, DirectoryEntry]] = []
        for path, entry in self._iter_tree(tree, digest):
            if entry.is_dir:
                dirs.append(path)
            else:
                files.append((path, entry))
        await trio.to_thread.run_sync(_make_dirs, dest_str, dirs)
        missing: list[tuple[str, Digest]] = []
        corrupt: dict[Digest, str] = {}
        path_of = self._path_of

        async def place_batch(batch: list[tuple[str, DirectoryEntry]]) -> None:
            async with self._limiter:
                elsewhere = batch
                if path_of is not None:
                    placed = await trio.to_thread.run_sync(
                        self._place_local, path_of, dest_str, batch, read_only
                    )
                    corrupt.update(placed.corrupt)
                    elsewhere = placed.elsewhere
                small: list[tuple[str, DirectoryEntry]] = []
                for path, entry in elsewhere:
                    if entry.digest.serialized_bytes_length < _LARGE_FILE_BYTES:
                        small.append((path, entry))
                    else:
                        await self._place_streamed(
                            dest_str, path, entry, read_only, missing, corrupt
                        )
                if small:
                    await self._place_generic(dest_str, small, read_only, missing)

        await _run_all(
            [
                functools.partial(place_batch, batch)
                for batch in _chunks_by_size(files, lambda f: f[1].digest.serialized_bytes_length)
            ]
        )
        if corrupt:
            await self._evict_corrupt(list(corrupt))
            missing.extend((path, d) for d, path in corrupt.items())
        if missing:
            path, blob = min(missing)
            raise MissingDigestError(
                _missing_message(blob, f" (file {path!r} of tree {digest})")
                + (f" ({len(missing) - 1} more files are missing.)" if len(missing) > 1 else "")
            )

    def _place_local(
        self,
        path_of: Callable[[Digest], str | None],
        dest: str,
        batch: list[tuple[str, DirectoryEntry]],
        read_only: bool,
    ) -> _Placed:
        """In a worker thread: link or copy a batch of files out of the blob store's files.
        Files whose blob is not a local file are left for the caller (`elsewhere`)."""
        placed = _Placed()
        for path, entry in batch:
            digest = entry.digest
            target = f"{dest}/{path}"
            mode = _file_mode(entry.is_executable, read_only)
            if digest == EMPTY_FILE_DIGEST:
                _write_new_file(target, b"", mode)
                continue
            source = path_of(digest)
            if source is None:
                placed.elsewhere.append((path, entry))
                continue
            try:
                st = os.stat(source)
            except FileNotFoundError:
                placed.elsewhere.append((path, entry))  # gone (or never there): ask the store
                continue
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            data: bytes | None = None
            if self._verified.get(digest) != key:
                if st.st_size < _LARGE_FILE_BYTES:
                    data = _read_blob_file(source, digest.serialized_bytes_length)
                    ok = _hash_bytes(data) == digest
                else:
                    ok = st.st_size == digest.serialized_bytes_length and (
                        _hash_file_large(source, self._use_mmap) == digest
                    )
                if not ok:
                    placed.corrupt[digest] = path
                    continue
                self._verified[digest] = key
            try:
                if read_only and not entry.is_executable and self._hard_links_work:
                    try:
                        os.link(source, target)
                        continue
                    except FileExistsError:
                        raise StoreError(_exists_message(target)) from None
                    except FileNotFoundError:
                        raise  # the blob file went away: see below
                    except OSError as exc:  # copy instead
                        if exc.errno in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                            self._hard_links_work = False  # another filesystem: stop trying
                        # else EMLINK (too many links to this blob) and the like: just this file
                if data is not None:
                    _write_new_file(target, data, mode)
                else:
                    _copy_new_file(source, target, mode)
            except FileNotFoundError:
                # Removed since the stat (another process's GC): ask the store for it.
                self._verified.pop(digest, None)
                placed.elsewhere.append((path, entry))
        return placed

    async def _place_generic(
        self,
        dest: str,
        batch: list[tuple[str, DirectoryEntry]],
        read_only: bool,
        missing: list[tuple[str, Digest]],
    ) -> None:
        """Place small files read (and verified) through the blob store, in one batch."""
        data = await self._read_verified({e.digest for _, e in batch})
        writes: list[tuple[str, bytes, int]] = []
        for path, entry in batch:
            blob = data.get(entry.digest)
            if blob is None:
                missing.append((path, entry.digest))
            else:
                writes.append((f"{dest}/{path}", blob, _file_mode(entry.is_executable, read_only)))
        await trio.to_thread.run_sync(_write_new_files, writes)

    async def _place_streamed(
        self,
        dest: str,
        path: str,
        entry: DirectoryEntry,
        read_only: bool,
        missing: list[tuple[str, Digest]],
        corrupt: dict[Digest, str],
    ) -> None:
        """Place one large file the blob store does not keep as a local file: streamed into
        place by the store, then verified from disk, never held in memory here."""
        digest = entry.digest
        target = f"{dest}/{path}"
        # Created here first (exclusively), so that an existing path is an error, as for any
        # other file; `read_blob_to_file` then fills our own empty file.
        await trio.to_thread.run_sync(_create_new_file, target)
        if await self._blobs.read_blob_to_file(digest, Path(target)):
            actual = await trio.to_thread.run_sync(_hash_file_large, target, self._use_mmap)
            if actual == digest:
                mode = _file_mode(entry.is_executable, read_only)
                await trio.to_thread.run_sync(os.chmod, target, mode)
                return
            if actual.fingerprint == digest.fingerprint:
                # The right bytes under a digest that lies about the size: missing, not corrupt.
                missing.append((path, digest))
            else:
                corrupt[digest] = path
        else:
            missing.append((path, digest))
        # Never leave wrong (or no) content under the tree's path.
        await trio.to_thread.run_sync(_unlink_if_present, target)

    # -- the stat cache file ------------------------------------------------------------------

    def _load_stat_cache_sync(self) -> None:
        self._stat_cache_loaded = True
        path = self._stat_cache_path
        if path is None:
            return
        try:
            document = json.loads(Path(path).read_bytes())
            if document.get("version") != 1:
                return
            for item in document["entries"]:
                file_path, size, mtime, ino, ctime, fp, length = item
                self._stat_cache.setdefault(
                    file_path, (size, mtime, ino, ctime, Digest(fp, length))
                )
        except (OSError, ValueError, KeyError, TypeError):
            return  # a missing or unreadable cache only costs rehashing

    def _save_stat_cache_sync(self) -> None:
        path = self._stat_cache_path
        if path is None:
            return
        entries = [
            [p, size, mtime, ino, ctime, d.fingerprint, d.serialized_bytes_length]
            for p, (size, mtime, ino, ctime, d) in self._stat_cache.items()
        ]
        data = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            temp.write_bytes(data)
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


@dataclass(slots=True)
class _Placed:
    """What `Store._place_local` could not place from a local blob file."""

    corrupt: dict[Digest, str] = field(default_factory=dict)
    """Blob files that do not hash to their digest, with one path each (to evict)."""
    elsewhere: list[tuple[str, DirectoryEntry]] = field(default_factory=list)
    """Files whose blob is not a local file: read or streamed through the blob store."""


def _path_function(blobs: BlobStore) -> Callable[[Digest], str | None] | None:
    """How to find a blob's file in `blobs`, if it keeps blobs as files (duck-typed on a
    `local_path(digest) -> Path | None` method); None if it does not."""
    if isinstance(blobs, FileBlobStore):
        # The path without a stat: `_place_local` stats it anyway.
        return blobs._path
    local_path = getattr(blobs, "local_path", None)
    if not callable(local_path):
        return None

    def path_of(digest: Digest) -> str | None:
        path = local_path(digest)
        return None if path is None else os.fspath(path)

    return path_of


async def _run_all(jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run jobs concurrently; the first failure cancels the rest and is raised *unwrapped*
    (not as an ExceptionGroup), so callers can `except StoreError`."""
    if len(jobs) == 1:
        await jobs[0]()
        return
    errors: list[Exception] = []

    async def run(job: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        try:
            await job()
        except Exception as exc:  # trio.Cancelled is a BaseException and passes through
            errors.append(exc)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(run, job, nursery.cancel_scope)
    if errors:
        raise errors[0]


# --- module-level helpers used in worker threads -------------------------------------------------


def _missing_message(digest: Digest, where: str = "") -> str:
    return (
        f"Digest {digest.fingerprint} ({digest.serialized_bytes_length} bytes){where} is not in "
        "the store: it was never stored here, or it was corrupt and has been evicted. Re-run "
        "whatever produced it (snapshot the files again, or rerun the process)."
    )


def _exists_message(target: str) -> str:
    return (
        f"Cannot materialize into {target}: the path already exists. Materialize into a fresh "
        "(or empty) directory."
    )


def _find_corrupt(raw: Mapping[Digest, bytes]) -> dict[Digest, str]:
    """Digests whose bytes do not match: "corrupt" (evict) or "mislabeled" (wrong size only)."""
    bad: dict[Digest, str] = {}
    for digest, data in raw.items():
        if len(data) == digest.serialized_bytes_length:
            if blake3.blake3(data).hexdigest() != digest.fingerprint:
                bad[digest] = "corrupt"
        elif blake3.blake3(data).hexdigest() == digest.fingerprint:
            # The bytes are right but the digest claims another size: a bad digest, not a bad
            # blob. Treat as missing without evicting good data.
            bad[digest] = "mislabeled"
        else:
            bad[digest] = "corrupt"
    return bad


def _hash_contents(entries: Sequence[FileContent | FileEntry | Directory]) -> list[Digest | None]:
    return [_hash_bytes(e.content) if isinstance(e, FileContent) else None for e in entries]


def _stat_all(paths: Sequence[str]) -> list[os.stat_result]:
    return [os.stat(path) for path in paths]


def _executable(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IXUSR)


# A file is "settled" (safe to cache by stat) once its timestamps are older than this: a later
# write then necessarily gets a different mtime or ctime, even on coarse-grained clocks.
_RACY_WINDOW_NS: Final = 100_000_000
_RACY_WINDOW_COARSE_NS: Final = 2_000_000_000


def _settled(st: os.stat_result, now_ns: int) -> bool:
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    # Whole-second timestamps mean a coarse filesystem (or a coincidence): be conservative.
    window = _RACY_WINDOW_COARSE_NS if newest % 1_000_000_000 == 0 else _RACY_WINDOW_NS
    return now_ns - newest > window


def _same_content_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns, a.st_ino) == (
        b.st_size,
        b.st_mtime_ns,
        b.st_ctime_ns,
        b.st_ino,
    )


def _read_and_hash(batch: Sequence[_FileToIngest]) -> list[tuple[_FileToIngest, Digest, bytes]]:
    out: list[tuple[_FileToIngest, Digest, bytes]] = []
    for item in batch:
        try:
            data = _read_file(item.path, item.size)
        except FileNotFoundError:
            continue  # deleted while we snapshotted: as if the snapshot ran a bit later
        except OSError as exc:
            raise StoreError(f"Cannot read {item.rel!r} ({item.path}): {exc.strerror}.") from exc
        out.append((item, _hash_bytes(data), data))
    return out


def _file_mode(executable: bool, read_only: bool) -> int:
    if read_only:
        return 0o555 if executable else 0o444
    return 0o755 if executable else 0o644


def _make_dirs(dest: str, dirs: Sequence[str]) -> None:
    os.makedirs(dest, exist_ok=True)
    for directory in dirs:
        path = f"{dest}/{directory}"
        try:
            os.mkdir(path)
        except FileExistsError:
            if not os.path.isdir(path):
                raise StoreError(_exists_message(path)) from None


def _open_new(target: str, mode: int) -> int:
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise StoreError(_exists_message(target)) from None
    return fd


def _write_new_file(target: str, data: bytes, mode: int) -> None:
    fd = _open_new(target, mode)
    try:
        _write_all(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _create_new_file(target: str) -> None:
    os.close(_open_new(target, 0o600))


def _unlink_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_new_files(writes: Sequence[tuple[str, bytes, int]]) -> None:
    for target, data, mode in writes:
        _write_new_file(target, data, mode)


def _copy_new_file(source: str, target: str, mode: int) -> None:
    src_fd = os.open(source, os.O_RDONLY)
    try:
        fd = _open_new(target, mode)
        try:
            _copy_fd(src_fd, fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(src_fd)
