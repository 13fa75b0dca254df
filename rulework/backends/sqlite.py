"""The `sqlite` cache backend: one SQLite database (WAL mode) plus a file store, in `cache.dir`.

Layout of the cache directory:

    cache.sqlite3 (+ -wal, -shm)   action entries, blob index, small blobs inline
    blobs/                         blobs larger than `inline_threshold`, one file each
                                   (`rulework.engine.store.FileBlobStore`)

Several processes may use one directory at once: SQLite's locking orders their writes, every
write transaction is a short `BEGIN IMMEDIATE` one (retried while another process holds the
lock), and a large blob's file is complete (written to a temporary name, then renamed) before
the row that makes it visible is committed. A crash at any point leaves at worst a file without
a row, which is invisible, adopted by the next write of the same blob, and tidied by `verify()`.

Within one process, concurrent writes are *group-committed*: each caller queues its operation,
one of them (the committer) runs every queued operation in a single transaction, and each
caller returns once its own operation is committed. See `SqliteCache` for the details.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar, cast

import blake3
import trio

from ..abc import CacheStatistics
from ..engine.errors import CacheBackendError, ConfigError, StoreError
from ..engine.fs import Digest
from ..engine.store import FileBlobStore
from .memory import CacheCounters

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_KiB = 1024
_GiB = 1024 * 1024 * 1024

DATABASE_NAME = "cache.sqlite3"
BLOBS_DIRNAME = "blobs"
# Bumped when the schema changes incompatibly; a database with another version is refused
# with a message saying what to do, never silently reinterpreted.
SCHEMA_VERSION = 1

# A hit only queues an access-time update when the stored time is older than this, so a hot
# entry costs at most one (batched) write per interval, and a hit is a pure read otherwise.
_TOUCH_GRANULARITY_SECONDS = 60
# Pending access-time updates ride along with the next write transaction; failing that they
# are written on their own once this many are queued or the oldest is this old.
_TOUCH_FLUSH_COUNT = 512
_TOUCH_FLUSH_AGE_SECONDS = 30.0
# Inside a worker thread SQLite waits this long for another connection's lock before handing
# control back to trio, which retries after a short sleep: waiting stays cancellable.
_THREAD_BUSY_TIMEOUT_MS = 100
# Bound on host parameters per statement (SQLite's limit is 32766 since 3.32).
_CHUNK = 500
# Reads at most this large (in digests and bytes) may take the event-loop fast path.
_FAST_PATH_MAX_DIGESTS = 64
_FAST_PATH_MAX_BYTES = 256 * _KiB
# Automatic garbage collection when a session closes is bounded by this much time.
_CLOSE_GC_BUDGET_SECONDS = 2.0
# A group commit takes at most this many queued operations (and about this many bytes); the
# rest wait for the next one, so that one transaction never grows without bound.
_BATCH_MAX_OPERATIONS = 1024
_BATCH_MAX_BYTES = 16 * 1024 * _KiB
# A batch this small (operations, bytes written, access times carried) commits on the event-loop
# thread when `loop_thread_writes` is on; anything larger goes to a worker thread.
_LOOP_WRITE_MAX_OPERATIONS = 128
_LOOP_WRITE_MAX_BYTES = 256 * _KiB
_LOOP_WRITE_MAX_TOUCHES = 64
# SQLite's own automatic checkpoint (the default after 1000 WAL pages) runs inside the commit
# that crosses the threshold and fsyncs twice: measured here it made one commit in ~200 take
# 5-15 ms, half the average write cost. We switch it off and run a PASSIVE checkpoint in a
# background thread after about this many pages (estimated from what we wrote) instead.
_CHECKPOINT_AFTER_PAGES = 1000
_PAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class SqliteCacheConfig:
    """`[cache.sqlite]` settings; the directory itself is `cache.dir`.

    Attributes:
        max_bytes: size the cache is kept under by LRU garbage collection (`gc()`, run
            automatically when a session closes over the limit); None: unbounded. 10 GiB.
        inline_threshold: blobs up to this size live inside the database, larger ones as
            files. 64 KiB: below ~100 KB SQLite reads blobs faster than the file system does
            (sqlite.org/intern-v-extern-blob.html), above it files stream without copies.
        loop_thread_reads: answer small indexed reads (`get_action`, `find_missing_blobs` of a
            few digests, `read_blobs` of a few small blobs) directly on the event-loop thread;
            see `SqliteCache` for why this is the default.
        loop_thread_writes: commit small group commits (a few operations, a few small blobs)
            directly on the event-loop thread when the write lock is free; see `SqliteCache`.
        lock_timeout_seconds: how long a write waits for other processes' write locks before
            failing with `CacheBackendError`.
    """

    max_bytes: int | None = 10 * _GiB
    inline_threshold: int = 64 * _KiB
    loop_thread_reads: bool = True
    loop_thread_writes: bool = True
    lock_timeout_seconds: float = 60.0

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []

        def _int_ok(value: object, minimum: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

        if self.max_bytes is not None and not _int_ok(self.max_bytes, 1):
            problems.append(
                (
                    "cache.sqlite.max_bytes",
                    f"must be a positive integer (bytes), found {self.max_bytes!r}; "
                    "omit it for the default of 10 GiB",
                )
            )
        if not _int_ok(self.inline_threshold, 0):
            problems.append(
                (
                    "cache.sqlite.inline_threshold",
                    f"must be an integer >= 0 (bytes), found {self.inline_threshold!r}",
                )
            )
        for name in ("loop_thread_reads", "loop_thread_writes"):
            flag = getattr(self, name)
            if not isinstance(flag, bool):
                problems.append((f"cache.sqlite.{name}", f"must be true or false, found {flag!r}"))
        timeout = self.lock_timeout_seconds
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            problems.append(
                (
                    "cache.sqlite.lock_timeout_seconds",
                    f"must be a positive number of seconds, found {timeout!r}",
                )
            )
        if problems:
            raise ConfigError("[cache.sqlite]", problems)


@dataclass(frozen=True, slots=True)
class GcReport:
    """What one `SqliteCache.gc()` did."""

    bytes_before: int
    bytes_after: int
    actions_removed: int
    blobs_removed: int
    complete: bool
    """False when the time budget ran out or only recently used entries were left."""


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What one `SqliteCache.verify()` found (and repaired)."""

    blobs_checked: int
    bytes_checked: int
    corrupt: tuple[Digest, ...]
    """Blobs whose content did not match their digest; all were evicted."""
    missing_files: tuple[Digest, ...]
    """Blobs indexed as files whose file was gone; their rows were removed."""
    orphans_adopted: int
    """Complete blob files without a row (left by a crash) that were indexed again."""
    orphans_removed: int
    """Files in the blob directory that were not valid blobs, removed."""
    temp_files_removed: int
    """Temporary files of writers that died mid-write (older than an hour), removed."""
    database_problems: tuple[str, ...]
    """What SQLite's `PRAGMA quick_check` reported, if anything."""

    @property
    def ok(self) -> bool:
        """True when nothing was wrong."""
        return not (
            self.corrupt or self.missing_files or self.orphans_removed or self.database_problems
        )


@dataclass(frozen=True, slots=True)
class SqliteWriteStatistics:
    """How this process's writes to one `SqliteCache` were committed (since it was created).

    `operations / transactions` is the average group-commit size.
    """

    operations: int = 0
    """Write operations committed (a `put_action`, a `write_blobs`, an eviction...)."""
    transactions: int = 0
    """Transactions committed, each holding one or more operations."""
    event_loop_transactions: int = 0
    """Of `transactions`, those committed directly on the event-loop thread."""
    largest_batch: int = 0
    """The most operations committed in one transaction."""
    busy_retries: int = 0
    """Attempts that found the write lock held by another process (or connection)."""
    checkpoints: int = 0
    """Background WAL checkpoints completed."""


class _BusyError(Exception):
    """Another connection held the lock longer than one worker-thread wait."""


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _now() -> int:
    return int(time.time())


def _hash_key(digest: Digest) -> bytes:
    return bytes.fromhex(digest.fingerprint)


def _chunks(items: Sequence[_T], size: int = _CHUNK) -> Sequence[Sequence[_T]]:
    if len(items) <= size:
        return (items,)
    return [items[start : start + size] for start in range(0, len(items), size)]


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


@dataclass(slots=True)
class _Tx:
    """What the operations of one transaction share: one clock reading, and the change to
    `meta.total_bytes` (written once, at the end, instead of once per operation)."""

    now: int
    total_delta: int = 0


# An operation's body: runs inside the group's transaction, on whatever thread commits it.
_WriteFn = Callable[[sqlite3.Connection, _Tx], _T]

# _WriteOp.state values.
_QUEUED: Final = 0  # in SqliteCache._queue, waiting for a committer
_RUNNING: Final = 1  # taken into a transaction that is being committed
_DONE: Final = 2  # committed or failed: `value` / `error` hold the outcome


@dataclass(eq=False, slots=True)
class _WriteOp:
    """One caller's write, queued for the next group commit."""

    fn: _WriteFn[Any]
    doing: str
    retry: bool
    weight: int
    """Bytes it writes (inline data), to size batches and choose the thread."""
    heavy: bool
    """Never committed on the event-loop thread (GC batches, large deletions)."""
    deadline: float
    state: int = _QUEUED
    value: Any = None
    error: BaseException | None = None
    # Set when the op is done, or when its caller is asked to become the committer; replaced
    # by a fresh Event each time the caller waits again.
    wakeup: trio.Event = field(default_factory=trio.Event)


# A transaction's outcome per operation: ("ok", value), ("error", exception), or None when it
# did not run because another connection held the write lock.
_Result = tuple[str, Any] | None


class SqliteCache:
    """A persistent `CacheBackend` in one directory, shared safely by concurrent processes.

    Construction does no I/O: `SqliteCache(config, directory)`; the database is created or
    opened by `await cache.open()`, or lazily by the first operation. `aclose()` writes pending
    access times, garbage-collects (within a small time budget) when over `max_bytes`, and
    closes the connections.

    Example:
        cache = SqliteCache(SqliteCacheConfig(), Path("~/.cache/rulework").expanduser())
        await cache.open()
        try:
            await cache.put_action(key, value)
        finally:
            await cache.aclose()

    Group commit. Every write (`put_action`, the rows of `write_blobs`, evictions, access
    times, GC batches) is an operation queued in this process. The caller that finds no commit
    in progress becomes the *committer*: it yields once, so that the other tasks ready to write
    queue theirs, then commits everything queued in one `BEGIN IMMEDIATE` transaction, hands
    each caller its own outcome, and returns when its own operation is done; if operations were
    queued meanwhile (while it waited for a worker thread), the first of their callers takes
    over. Every caller returns only once its operation is committed, so it can read its write
    back at once. A caller cancelled while its operation is still queued takes it out of the
    queue: nothing of it is written and the others are not disturbed; once its operation is in a
    transaction, that transaction commits or rolls back whole. One operation failing (other
    than on the lock) is retried alone, so that it fails only its own caller. While another
    process holds the write lock, the batch waits in a worker thread and retries until
    `lock_timeout_seconds`, re-formed at each attempt from what is still queued.

    Threads and connections. Four connections, each used by one thread at a time: the *loop*
    connection (the event-loop thread's: small reads and small commits, `busy_timeout=0`), a
    writer for larger commits in worker threads (the committer is unique, so the two never
    write at once), a reader for larger reads (behind a trio Lock; WAL readers never wait for
    writers), and one for background WAL checkpoints. Cross-process ordering is SQLite's file
    locking with `BEGIN IMMEDIATE`.

    The event-loop fast paths (`loop_thread_reads`, `loop_thread_writes`, default on).
    Measured on a 2-core machine: a trio thread hop costs 130-250 us, while the two indexed reads
    of a process-cache hit cost 20-40 us together and a small commit 25-55 us when run
    directly (WAL mode with `synchronous=NORMAL` does not fsync on commit; its writes go to the
    OS page cache). So small reads and small commits run on the event-loop thread with
    `busy_timeout=0`: they never wait for a lock (a busy database falls back to the worker
    thread path), and what they may block on is a few page reads or writes that the page cache
    absorbs in microseconds. Sharing one connection for both also keeps its page cache valid
    across this process's own writes (a separate reader re-reads its pages after every commit
    of another connection: 40-100 us more per hit). SQLite's automatic checkpoint, which would
    fsync inside a commit, is off; a background thread checkpoints instead. On a slow or network
    file system, set both options to false.
    """

    config_type: ClassVar[type[SqliteCacheConfig]] = SqliteCacheConfig

    def __init__(self, config: SqliteCacheConfig | None, directory: Path | str) -> None:
        self.config = config if config is not None else SqliteCacheConfig()
        self.directory = Path(directory).expanduser()
        self.database_path = self.directory / DATABASE_NAME
        self._files = FileBlobStore(self.directory / BLOBS_DIRNAME)
        self._counters = CacheCounters()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._loop: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        # Held by the committer for as long as it commits (and by `aclose`).
        # Invariant: every _WriteOp in _queue has state _QUEUED, and while _queue is non-empty
        # either _write_lock is held or the first op's caller has been woken to take it.
        self._write_lock = trio.Lock()
        self._queue: collections.deque[_WriteOp] = collections.deque()
        self._read_lock = trio.Lock()
        self._open_lock = trio.Lock()
        self._closed = False
        # Access times to record, batched. Mutated on the event-loop thread only; a commit
        # takes the whole dict with it into its transaction (`_take_touches`).
        self._touch_actions: dict[str, int] = {}
        self._touch_blobs: dict[bytes, int] = {}
        self._touches_since = 0.0
        # WAL pages written since the last checkpoint started (an estimate), and the Event
        # set when the running background checkpoint ends (None when none runs).
        self._wal_pages = 0
        self._checkpoint_done: trio.Event | None = None
        self._write_stats = dict.fromkeys(SqliteWriteStatistics.__slots__, 0)

    # -- opening and closing -------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the database (idempotent). Raises `CacheBackendError` when the
        directory is unusable or holds a database of another schema version."""
        if self._writer is not None:
            return
        async with self._open_lock:
            if self._closed:
                raise CacheBackendError(
                    f"The sqlite cache at {self.directory} was closed; create a new SqliteCache."
                )
            if self._writer is None:
                deadline = trio.current_time() + self.config.lock_timeout_seconds
                while True:
                    try:
                        await trio.to_thread.run_sync(self._open_sync)
                        return
                    except _BusyError:
                        if trio.current_time() > deadline:
                            raise self._locked_error("opening the cache") from None
                        await trio.sleep(0.02)

    def _connect(
        self, *, busy_timeout_ms: int, read_only: bool = False, mapped: bool = False
    ) -> sqlite3.Connection:
        con = sqlite3.connect(
            self.database_path,
            timeout=busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # used from several threads, one at a time (class doc)
            cached_statements=256,
        )
        try:
            # NORMAL in WAL mode: commits are atomic and the database never corrupts; only
            # the last transactions may be lost on power failure, which a cache can afford.
            con.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints run in the background (`_maybe_checkpoint`), never inside a commit.
            con.execute("PRAGMA wal_autocheckpoint=0")
            if read_only:
                con.execute("PRAGMA query_only=1")
            if mapped:
                con.execute("PRAGMA mmap_size=268435456")
        except BaseException:
            con.close()
            raise
        return con

    def _open_sync(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / BLOBS_DIRNAME).mkdir(exist_ok=True)
        except OSError as exc:
            raise CacheBackendError(
                f"Cannot create the cache directory {self.directory}: {exc}. Set cache.dir "
                "(or RULEWORK_CACHE_DIR) to a writable directory."
            ) from exc
        opened: list[sqlite3.Connection] = []
        try:
            writer = self._connect(busy_timeout_ms=_THREAD_BUSY_TIMEOUT_MS)
            opened.append(writer)
            mode = writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise CacheBackendError(
                    f"SQLite refused WAL mode for {self.database_path} (journal_mode={mode}); "
                    "the cache directory must be on a local file system."
                )
            writer.execute("BEGIN IMMEDIATE")
            try:
                version = writer.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for statement in _SCHEMA:
                        writer.execute(statement)
                    writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise CacheBackendError(
                        f"The cache database {self.database_path} has schema version {version}, "
                        f"this rulework uses {SCHEMA_VERSION}. Delete {self.directory} (it is "
                        "only a cache) or point cache.dir elsewhere."
                    )
                writer.execute("COMMIT")
            except BaseException:
                if writer.in_transaction:
                    writer.execute("ROLLBACK")
                raise
            reader = self._connect(busy_timeout_ms=_THREAD_BUSY_TIMEOUT_MS, read_only=True)
            opened.append(reader)
            loop = self._connect(busy_timeout_ms=0, mapped=True)
            opened.append(loop)
            checkpointer = self._connect(busy_timeout_ms=0)
        except BaseException as exc:
            _close_all(opened)
            if isinstance(exc, sqlite3.Error):
                if _is_busy(exc):
                    raise _BusyError() from exc
                raise self._database_error("opening", exc) from exc
            raise
        self._writer, self._reader, self._loop = writer, reader, loop
        self._checkpointer = checkpointer

    async def aclose(self) -> None:
        """Flush access times, GC within a small budget if over `max_bytes`, close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return
        # Shielded: closing runs to the end even in a cancelled session; the bookkeeping is
        # bounded in time, and what it does not finish the next session does.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10 + _CLOSE_GC_BUDGET_SECONDS):
                # Closing must not fail a session: the next open redoes what failed here.
                with contextlib.suppress(CacheBackendError):
                    await self._flush_touches()
                    if self.config.max_bytes is not None:
                        total = await self._run_read(_total_bytes_sync)
                        if total > self.config.max_bytes:
                            await self._gc(
                                target_bytes=int(self.config.max_bytes * 0.9),
                                min_age_seconds=300,
                                time_budget=_CLOSE_GC_BUDGET_SECONDS,
                            )
            # The locks wait for operations still running in worker threads.
            async with self._write_lock, self._read_lock:
                checkpointer = self._checkpointer
                if self._checkpoint_done is not None:
                    with trio.move_on_after(30):
                        await self._checkpoint_done.wait()
                    if self._checkpoint_done is not None:
                        checkpointer = None  # still in use by its thread: leave it be
                connections = (self._writer, self._reader, self._loop, checkpointer)
                self._writer = self._reader = self._loop = self._checkpointer = None
                closed = CacheBackendError(f"The sqlite cache at {self.directory} was closed.")
                while self._queue:
                    self._finish(self._queue.popleft(), error=closed)
                await trio.to_thread.run_sync(_close_all, connections)

    async def _ensure_open(self) -> None:
        if self._writer is None:
            if self._closed:
                raise CacheBackendError(
                    f"The sqlite cache at {self.directory} was closed (aclose); open a new one."
                )
            await self.open()

    # -- errors --------------------------------------------------------------------------------

    def _database_error(self, doing: str, exc: BaseException) -> CacheBackendError:
        self._counters.errors += 1
        return CacheBackendError(
            f"The sqlite cache {self.database_path} failed while {doing}: "
            f"{type(exc).__name__}: {exc}. If the file is damaged, run `rulework cache verify` "
            f"or delete {self.directory} (it is only a cache)."
        )

    def _locked_error(self, doing: str) -> CacheBackendError:
        self._counters.errors += 1
        return CacheBackendError(
            f"The sqlite cache {self.database_path} stayed locked by another process for "
            f"{self.config.lock_timeout_seconds:g}s while {doing}. Another rulework (or "
            "`rulework cache gc`) may be holding it; retry, or raise "
            "cache.sqlite.lock_timeout_seconds."
        )

    # -- writes: the group commit ----------------------------------------------------------------

    async def _run_write(
        self,
        doing: str,
        fn: _WriteFn[_T],
        *,
        retry: bool = True,
        weight: int = 0,
        heavy: bool = False,
    ) -> _T:
        """Run `fn(connection, tx)` inside a transaction shared with the other writes queued
        now (and the pending access-time updates); return once it is committed. Retries while
        another process holds the lock (with `retry=False`, raises `_BusyError` at once).

        Args:
            weight: bytes `fn` writes, so that large batches go to a worker thread.
            heavy: `fn` does a lot of work (never on the event-loop thread).
        """
        await self._ensure_open()
        op = _WriteOp(
            fn, doing, retry, weight, heavy, trio.current_time() + self.config.lock_timeout_seconds
        )
        self._queue.append(op)
        try:
            while op.state != _DONE:
                if not self._write_lock.locked():
                    self._write_lock.acquire_nowait()
                    try:
                        await self._commit_until_done(op)
                    finally:
                        self._write_lock.release()
                else:
                    await op.wakeup.wait()
                    if op.state != _DONE:
                        op.wakeup = trio.Event()
        except BaseException:
            if op.state == _QUEUED:
                self._queue.remove(op)  # never written: as if it had not been asked for
            raise
        finally:
            # If no commit is in progress, the next queued caller becomes the committer.
            if self._queue and not self._write_lock.locked():
                self._queue[0].wakeup.set()
        if op.error is not None:
            raise op.error
        return cast(_T, op.value)

    async def _commit_until_done(self, mine: _WriteOp) -> None:
        """As the committer: commit batches of queued operations until `mine` is done."""
        # Let the other tasks that are ready to write queue their operations, so that they
        # share this transaction (a checkpoint: a put cancelled here writes nothing).
        await trio.lowlevel.checkpoint()
        while mine.state != _DONE:
            if await self._commit_batch(self._take_batch()):
                # Another process holds the write lock (its worker-thread wait timed out).
                self._write_stats["busy_retries"] += 1
                await trio.sleep(0.01)

    def _take_batch(self) -> list[_WriteOp]:
        batch: list[_WriteOp] = []
        weight = 0
        queue = self._queue
        while queue and len(batch) < _BATCH_MAX_OPERATIONS and weight < _BATCH_MAX_BYTES:
            op = queue.popleft()
            op.state = _RUNNING
            batch.append(op)
            weight += op.weight
        return batch

    def _finish(
        self, op: _WriteOp, *, value: Any = None, error: BaseException | None = None
    ) -> None:
        op.state = _DONE
        op.value = value
        op.error = error
        op.wakeup.set()

    async def _commit_batch(self, batch: list[_WriteOp]) -> bool:
        """Commit `batch` in one transaction and hand each operation its outcome. Operations
        that could not run because the lock was held go back to the head of the queue (or fail,
        past their deadline); returns True when some did (the caller waits, then retries)."""
        writer, loop = self._writer, self._loop
        if writer is None or loop is None:
            closed = CacheBackendError(f"The sqlite cache at {self.directory} was closed.")
            for op in batch:
                self._finish(op, error=closed)
            return False
        actions, blobs = self._take_touches()
        fns = [op.fn for op in batch]
        weight = sum(op.weight for op in batch)
        results: list[_Result] | None = None
        touched = False
        try:
            if (
                self.config.loop_thread_writes
                and len(batch) <= _LOOP_WRITE_MAX_OPERATIONS
                and weight <= _LOOP_WRITE_MAX_BYTES
                and len(actions) + len(blobs) <= _LOOP_WRITE_MAX_TOUCHES
                and not any(op.heavy for op in batch)
            ):
                results, touched = _commit_sync(loop, fns, actions, blobs)
                if results[0] is None:
                    # Another process holds the lock: wait for it in a worker thread, never here.
                    self._write_stats["busy_retries"] += 1
                    results = None
                else:
                    self._write_stats["event_loop_transactions"] += 1
            if results is None:
                results, touched = await trio.to_thread.run_sync(
                    _commit_sync, writer, fns, actions, blobs
                )
        except BaseException as exc:
            # Not a database error (those are in `results`): an interrupt while the worker
            # thread ran, for instance. Whether the transaction committed is unknown.
            unknown = CacheBackendError(
                f"A write to the sqlite cache {self.database_path} was interrupted "
                f"({type(exc).__name__}); it may or may not have been committed."
            )
            for op in batch:
                self._finish(op, error=unknown)
            raise
        finally:
            if not touched:
                self._restore_touches(actions, blobs)
        assert results is not None
        committed = 0
        requeue: list[_WriteOp] = []
        now = trio.current_time()
        for op, result in zip(batch, results, strict=True):
            if result is None:
                if not op.retry:
                    self._finish(op, error=_BusyError())
                elif now > op.deadline:
                    self._finish(op, error=self._locked_error(op.doing))
                else:
                    op.state = _QUEUED
                    requeue.append(op)
            elif result[0] == "ok":
                committed += 1
                self._finish(op, value=result[1])
            else:
                error = result[1]
                if isinstance(error, sqlite3.Error):
                    error = self._database_error(op.doing, error)
                self._finish(op, error=error)
        self._queue.extendleft(reversed(requeue))
        if committed:
            stats = self._write_stats
            stats["operations"] += committed
            stats["transactions"] += 1  # (a failed op's solo retries are not counted apart)
            stats["largest_batch"] = max(stats["largest_batch"], committed)
            self._wal_pages += 2 + 2 * committed + weight // _PAGE_BYTES
            self._maybe_checkpoint()
        return bool(requeue)

    def write_statistics(self) -> SqliteWriteStatistics:
        """How this process's writes were grouped into transactions so far."""
        return SqliteWriteStatistics(**self._write_stats)

    # -- background checkpoints ------------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        """Start a PASSIVE checkpoint in a background thread once enough was written.

        PASSIVE never waits for (nor blocks) readers and writers, ours or other processes'; it
        copies what it can and leaves the rest for the next one. `aclose` waits for it.
        """
        con = self._checkpointer
        if self._wal_pages < _CHECKPOINT_AFTER_PAGES or self._checkpoint_done is not None:
            return
        if con is None:
            return
        self._wal_pages = 0
        done = self._checkpoint_done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def finished(error: BaseException | None) -> None:
            self._checkpoint_done = None
            done.set()
            if error is None:
                self._write_stats["checkpoints"] += 1
            else:
                # Nothing is lost: the WAL keeps the data and the next checkpoint retries.
                logger.debug("Background checkpoint of %s failed: %s", self.database_path, error)

        def deliver(result: Any) -> None:  # in the worker thread: hand back to trio
            error = getattr(result, "error", None)
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finished, error)

        trio.lowlevel.start_thread_soon(
            functools.partial(_checkpoint_sync, con), deliver, name="rulework sqlite checkpoint"
        )

    # -- reads -----------------------------------------------------------------------------------

    async def _run_read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        await self._ensure_open()
        deadline = trio.current_time() + self.config.lock_timeout_seconds
        async with self._read_lock:
            while True:
                reader = self._reader
                if reader is None:
                    raise CacheBackendError(f"The sqlite cache at {self.directory} was closed.")
                try:
                    return await trio.to_thread.run_sync(_busy_guard, reader, fn)
                except _BusyError:
                    if trio.current_time() > deadline:
                        raise self._locked_error("reading") from None
                    await trio.sleep(0.01)
                except sqlite3.Error as exc:
                    raise self._database_error("reading", exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], _T], *, small: bool) -> _T:
        """Run a read: directly on this thread when small and allowed, else in a worker."""
        loop = self._loop
        if small and loop is not None and self.config.loop_thread_reads:
            try:
                result = fn(loop)
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise self._database_error("reading", exc) from exc
                # Locked (e.g. another process recovering the WAL): take the waiting path.
            else:
                await trio.lowlevel.checkpoint()
                return result
        return await self._run_read(fn)

    # -- access times ----------------------------------------------------------------------------

    def _take_touches(self) -> tuple[dict[str, int], dict[bytes, int]]:
        actions, blobs = self._touch_actions, self._touch_blobs
        self._touch_actions, self._touch_blobs = {}, {}
        return actions, blobs

    def _restore_touches(self, actions: dict[str, int], blobs: dict[bytes, int]) -> None:
        if actions or blobs:
            for key, stamp in actions.items():
                self._touch_actions.setdefault(key, stamp)
            for hash_, stamp in blobs.items():
                self._touch_blobs.setdefault(hash_, stamp)

    def _queue_touch(self, actions: Iterable[str] = (), blobs: Iterable[bytes] = ()) -> None:
        now = _now()
        if not (self._touch_actions or self._touch_blobs):
            self._touches_since = time.monotonic()
        for key in actions:
            self._touch_actions[key] = now
        for hash_ in blobs:
            self._touch_blobs[hash_] = now

    async def _maybe_flush_touches(self) -> None:
        pending = len(self._touch_actions) + len(self._touch_blobs)
        if pending and (
            pending >= _TOUCH_FLUSH_COUNT
            or time.monotonic() - self._touches_since > _TOUCH_FLUSH_AGE_SECONDS
        ):
            # One attempt only: a hit never waits for another process's lock, nor fails for
            # bookkeeping. What is not written now is kept for the next write.
            with contextlib.suppress(_BusyError, CacheBackendError):
                await self._run_write("recording access times", _noop, retry=False)

    async def _flush_touches(self) -> None:
        if self._touch_actions or self._touch_blobs:
            await self._run_write("recording access times", _noop)

    # -- action cache ----------------------------------------------------------------------------

    async def get_action(self, key: str) -> bytes | None:
        """The value stored under `key`, or None."""
        if self._loop is None:
            await self._ensure_open()
        row = await self._read(lambda con: _get_action_sync(con, key), small=True)
        if row is None:
            self._counters.action_misses += 1
            return None
        value, atime = row
        self._counters.action_hits += 1
        self._counters.bytes_read += len(value)
        if atime < _now() - _TOUCH_GRANULARITY_SECONDS:
            self._queue_touch(actions=(key,))
        if self._touch_actions or self._touch_blobs:
            await self._maybe_flush_touches()
        return value

    async def put_action(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (replacing any older value); returns once committed."""
        value = bytes(value)
        await self._run_write(
            "writing an action entry",
            functools.partial(_put_action_sync, key=key, value=value),
            weight=len(value),
        )
        self._counters.action_writes += 1
        self._counters.bytes_written += len(value)

    # -- blobs -----------------------------------------------------------------------------------

    def _is_inline(self, digest: Digest) -> bool:
        return digest.serialized_bytes_length <= self.config.inline_threshold

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` not held. Held blobs count as used for the LRU."""
        pairs = [(_hash_key(d), d) for d in dict.fromkeys(digests)]
        if not pairs:
            await trio.lowlevel.checkpoint()
            return frozenset()
        if self._loop is None:
            await self._ensure_open()
        hashes = [h for h, _ in pairs]
        small = len(pairs) <= _FAST_PATH_MAX_DIGESTS
        rows = await self._read(lambda con: _index_rows_sync(con, hashes), small=small)
        missing: set[Digest] = set()
        stale: list[bytes] = []
        cutoff = _now() - _TOUCH_GRANULARITY_SECONDS
        files_to_check: list[Digest] = []
        for hash_, digest in pairs:
            row = rows.get(hash_)
            if row is None or row[0] != digest.serialized_bytes_length:
                missing.add(digest)
                continue
            if row[2]:
                files_to_check.append(digest)
            if row[1] < cutoff:
                stale.append(hash_)
        if files_to_check:
            # A file-backed row whose file vanished (removed by hand, or by another process's
            # GC racing this one's write) must not count as held. A few stats are done right
            # here for the reason given in the class docstring; many go to a worker thread.
            try:
                if small and self.config.loop_thread_reads:
                    gone = self._missing_files_sync(files_to_check)
                else:
                    gone = await trio.to_thread.run_sync(self._missing_files_sync, files_to_check)
            except StoreError as exc:
                raise self._database_error("checking blob files", exc) from exc
            if gone:
                missing.update(gone)
                await self._forget(gone)
        if stale:
            self._queue_touch(blobs=stale)
        if self._touch_actions or self._touch_blobs:
            await self._maybe_flush_touches()
        return frozenset(missing)

    def _missing_files_sync(self, digests: Sequence[Digest]) -> list[Digest]:
        return [d for d in digests if self._files.local_path(d) is None]

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of each digest held; absent ones are left out."""
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return {}
        await self._ensure_open()
        inline = [d for d in wanted if self._is_inline(d)]
        small = (
            len(inline) <= _FAST_PATH_MAX_DIGESTS
            and sum(d.serialized_bytes_length for d in inline) <= _FAST_PATH_MAX_BYTES
        )
        found: dict[Digest, bytes] = {}
        file_backed: list[Digest] = []
        hashes = [_hash_key(d) for d in wanted]
        rows = await self._read(lambda con: _read_rows_sync(con, hashes), small=small)
        stale: list[bytes] = []
        cutoff = _now() - _TOUCH_GRANULARITY_SECONDS
        for digest in wanted:
            row = rows.get(_hash_key(digest))
            if row is None or row[0] != digest.serialized_bytes_length:
                continue
            _, atime, data = row
            if data is None:
                file_backed.append(digest)
            else:
                found[digest] = data
            if atime < cutoff:
                stale.append(_hash_key(digest))
        if file_backed:
            try:
                from_files = await self._files.read_blobs(file_backed)
            except (OSError, StoreError) as exc:
                raise self._database_error("reading blob files", exc) from exc
            found.update(from_files)
            gone = [d for d in file_backed if d not in from_files]
            if gone:
                await self._forget(gone)
        hits = len(found)
        self._counters.blob_hits += hits
        self._counters.blob_misses += len(wanted) - hits
        self._counters.bytes_read += sum(len(v) for v in found.values())
        if stale:
            self._queue_touch(blobs=stale)
        await self._maybe_flush_touches()
        return found

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Store each blob (a no-op for those already held) in one transaction."""
        if not blobs:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_open()
        large = {d: bytes(v) for d, v in blobs.items() if not self._is_inline(d)}
        if large:
            # Files first: a row is only ever committed for a complete file.
            try:
                await self._files.write_blobs(large)
            except (OSError, StoreError) as exc:
                raise self._database_error("writing blob files", exc) from exc
        rows = [
            (_hash_key(d), d.serialized_bytes_length, None if d in large else bytes(v))
            for d, v in blobs.items()
        ]
        added = await self._run_write(
            "writing blobs",
            functools.partial(_insert_blobs_sync, rows=rows),
            weight=sum(len(data) + 64 for _, _, data in rows if data is not None),
            heavy=len(rows) > _FAST_PATH_MAX_DIGESTS,
        )
        self._counters.blob_writes += len(rows)
        self._counters.bytes_written += added

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        """Store the content of `src`: copied into the blob directory when large, never read
        whole into memory; read and stored inline when small."""
        await self._ensure_open()
        if self._is_inline(digest):
            try:
                data = await trio.to_thread.run_sync(Path(src).read_bytes)
            except OSError as exc:
                raise CacheBackendError(f"Cannot read blob source file {src}: {exc}") from exc
            await self.write_blobs({digest: data})
            return
        try:
            await self._files.write_blob_from_file(digest, Path(src))
        except (OSError, StoreError) as exc:
            raise self._database_error(f"copying {src} into the blob directory", exc) from exc
        row = [(_hash_key(digest), digest.serialized_bytes_length, None)]
        added = await self._run_write(
            "writing blobs", functools.partial(_insert_blobs_sync, rows=row)
        )
        self._counters.blob_writes += 1
        self._counters.bytes_written += added

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        """Stream one blob into `dest` (a file copy for large blobs); False when absent."""
        await self._ensure_open()
        key = _hash_key(digest)
        rows = await self._read(lambda con: _read_rows_sync(con, [key]), small=False)
        row = rows.get(key)
        if row is None or row[0] != digest.serialized_bytes_length:
            self._counters.blob_misses += 1
            return False
        size, atime, data = row
        if data is None:
            try:
                ok = await self._files.read_blob_to_file(digest, Path(dest))
            except (OSError, StoreError) as exc:
                raise self._database_error(f"copying a blob to {dest}", exc) from exc
            if not ok:
                await self._forget([digest])
                self._counters.blob_misses += 1
                return False
        else:
            await trio.to_thread.run_sync(_write_file, Path(dest), data)
        self._counters.blob_hits += 1
        self._counters.bytes_read += size
        if atime < _now() - _TOUCH_GRANULARITY_SECONDS:
            self._queue_touch(blobs=(key,))
        return True

    async def evict(self, digests: Iterable[Digest]) -> None:
        """Remove these blobs (rows first, then files)."""
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            await trio.lowlevel.checkpoint()
            return
        await self._forget(wanted, count_as_corrupt=True)

    async def _forget(self, digests: Sequence[Digest], *, count_as_corrupt: bool = False) -> None:
        hashes = [_hash_key(d) for d in digests]
        removed = await self._run_write(
            "removing blobs",
            functools.partial(_delete_blobs_sync, hashes=hashes),
            heavy=len(hashes) > _FAST_PATH_MAX_DIGESTS,
        )
        files = [d for d in digests if removed.get(_hash_key(d))]
        if files:
            await self._remove_files(files)
        if count_as_corrupt:
            self._counters.corrupt_evicted += len(removed)

    async def _remove_files(self, digests: Sequence[Digest]) -> None:
        try:
            await self._files.evict(digests)
        except (OSError, StoreError) as exc:
            raise self._database_error("removing blob files", exc) from exc

    def local_path(self, digest: Digest) -> Path | None:
        """The file holding a large blob, for hard-linking (None for inline or absent blobs)."""
        if self._is_inline(digest):
            return None
        return self._files.local_path(digest)

    # -- maintenance -----------------------------------------------------------------------------

    async def total_bytes(self) -> int:
        """Bytes held: action keys and values plus blobs (inline or as files)."""
        return await self._run_read(_total_bytes_sync)

    async def gc(
        self,
        *,
        target_bytes: int | None = None,
        min_age_seconds: float = 0.0,
        time_budget: float | None = None,
    ) -> GcReport:
        """Remove least recently used entries until the cache holds at most `target_bytes`.

        Args:
            target_bytes: defaults to 90% of `max_bytes` (a cache without `max_bytes` is left
                alone), so that a cache at its limit is not collected again at every close.
            min_age_seconds: never remove entries used more recently than this (protects
                what concurrent sessions are using right now).
            time_budget: stop after about this many seconds (None: no limit).
        """
        if target_bytes is None:
            if self.config.max_bytes is None:
                total = await self.total_bytes()
                return GcReport(total, total, 0, 0, True)
            target_bytes = int(self.config.max_bytes * 0.9)
        await self._flush_touches()
        return await self._gc(
            target_bytes=target_bytes, min_age_seconds=min_age_seconds, time_budget=time_budget
        )

    async def _gc(
        self, *, target_bytes: int, min_age_seconds: float, time_budget: float | None
    ) -> GcReport:
        start = trio.current_time()
        before = await self._run_read(_total_bytes_sync)
        total = before
        actions_removed = blobs_removed = 0
        complete = True
        newest_allowed = _now() - int(min_age_seconds)
        while total > target_bytes:
            if time_budget is not None and trio.current_time() - start > time_budget:
                complete = False
                break
            # Short transactions, so that other processes' writes interleave with a long GC.
            batch = await self._run_write(
                "collecting garbage",
                functools.partial(
                    _gc_batch_sync, excess=total - target_bytes, newest_allowed=newest_allowed
                ),
                heavy=True,
            )
            if not batch.removed_any:
                complete = False  # only entries younger than min_age_seconds are left
                break
            actions_removed += batch.actions
            blobs_removed += len(batch.blob_hashes)
            total = batch.total_after
            if batch.file_digests:
                await self._remove_files(batch.file_digests)
        return GcReport(before, total, actions_removed, blobs_removed, complete)

    async def verify(self) -> VerifyReport:
        """Re-hash every blob; evict corrupt ones, drop rows whose file is gone, adopt or remove
        stray files, delete stale temporary files, and run SQLite's own consistency check.
        Reads the whole cache; safe while other processes use it."""
        await self._flush_touches()
        problems = await self._run_read(_quick_check_sync)
        corrupt: list[Digest] = []
        missing_files: list[Digest] = []
        checked = checked_bytes = 0
        indexed_files: set[str] = set()
        after: bytes = b""
        while True:
            rows = await self._run_read(functools.partial(_blob_page_sync, after=after))
            if not rows:
                break
            after = rows[-1][0]
            result = await trio.to_thread.run_sync(self._verify_rows_sync, rows)
            checked += result.checked
            checked_bytes += result.checked_bytes
            corrupt.extend(result.corrupt)
            missing_files.extend(result.missing_files)
            indexed_files.update(d.fingerprint for d in result.files)
        if corrupt:
            await self._forget(corrupt, count_as_corrupt=True)
        if missing_files:
            await self._forget(missing_files)
        adopted, removed = await self._verify_stray_files(indexed_files)
        try:
            temp_removed = await self._files.remove_stale_temp_files()
        except OSError as exc:
            raise self._database_error("removing stale temporary files", exc) from exc
        return VerifyReport(
            blobs_checked=checked,
            bytes_checked=checked_bytes,
            corrupt=tuple(corrupt),
            missing_files=tuple(missing_files),
            orphans_adopted=adopted,
            orphans_removed=removed,
            temp_files_removed=temp_removed,
            database_problems=tuple(problems),
        )

    def _verify_rows_sync(self, rows: list[tuple[bytes, int, bytes | None]]) -> _VerifyChunk:
        chunk = _VerifyChunk()
        for hash_, size, data in rows:
            digest = Digest(hash_.hex(), size)
            chunk.checked += 1
            if data is not None:
                chunk.checked_bytes += len(data)
                if len(data) != size or blake3.blake3(data).digest() != hash_:
                    chunk.corrupt.append(digest)
                continue
            chunk.files.append(digest)
            path = self._files.local_path(digest)
            if path is None:
                chunk.missing_files.append(digest)
                continue
            actual = _hash_file(path)
            chunk.checked_bytes += actual[1]
            if actual != (digest.fingerprint, size):
                chunk.corrupt.append(digest)
        return chunk

    async def _verify_stray_files(self, indexed: set[str]) -> tuple[int, int]:
        """Files in the blob directory that no row names: index the complete ones again (a
        crash between the file's rename and the row's commit leaves those), remove the rest."""
        strays = await trio.to_thread.run_sync(self._stray_files_sync, indexed)
        adopted: list[tuple[bytes, int, None]] = []
        bad: list[Path] = []
        for path, fingerprint in strays:
            result = await trio.to_thread.run_sync(_hash_file, path)
            if result[0] == fingerprint and result[1] > self.config.inline_threshold:
                adopted.append((bytes.fromhex(fingerprint), result[1], None))
            else:
                bad.append(path)
        if adopted:
            await self._run_write(
                "indexing stray blob files",
                functools.partial(_insert_blobs_sync, rows=adopted),
                heavy=True,
            )
        if bad:
            await trio.to_thread.run_sync(_unlink_all, bad)
        return len(adopted), len(bad)

    def _stray_files_sync(self, indexed: set[str]) -> list[tuple[Path, str]]:
        # FileBlobStore's layout: root/ab/cdef... (the fingerprint split after two characters);
        # its in-flight temporary files (`.tmp-*`) are left to `remove_stale_temp_files`.
        strays: list[tuple[Path, str]] = []
        try:
            shards = [e for e in os.scandir(self._files.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return strays
        for shard in shards:
            for entry in os.scandir(shard.path):
                fingerprint = shard.name + entry.name
                if entry.name.startswith(".tmp-") or fingerprint in indexed:
                    continue
                strays.append((Path(entry.path), fingerprint))
        return strays

    # -- statistics ------------------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        """Counters since this backend was created (this process only)."""
        return self._counters.snapshot()


# -- schema and the synchronous halves (run in worker threads, or on the fast path) -----------

_SCHEMA = (
    # `meta.total_bytes` is kept exact by every transaction that adds or removes an entry, so
    # that checking the size limit never scans the tables.
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO meta (name, value) VALUES ('total_bytes', 0)",
    # Rowid tables (not WITHOUT ROWID): inline values up to 64 KiB are far beyond the row size
    # WITHOUT ROWID suits. `value`/`data` come last so that reading the other columns never
    # touches a value's overflow pages.
    "CREATE TABLE actions (key TEXT NOT NULL UNIQUE, atime INTEGER NOT NULL, "
    "cost INTEGER NOT NULL, value BLOB NOT NULL)",
    "CREATE INDEX actions_by_atime ON actions (atime)",
    # data NULL: the blob is a file in blobs/ (a zero-length blob is stored inline as x'').
    "CREATE TABLE blobs (hash BLOB NOT NULL UNIQUE, size INTEGER NOT NULL, "
    "atime INTEGER NOT NULL, data BLOB)",
    "CREATE INDEX blobs_by_atime ON blobs (atime)",
)


def _noop(con: sqlite3.Connection, tx: _Tx) -> None:
    return None


def _transaction(
    con: sqlite3.Connection,
    fns: Sequence[_WriteFn[Any]],
    touch_actions: Mapping[str, int],
    touch_blobs: Mapping[bytes, int],
) -> list[Any]:
    """Run `fns` in one IMMEDIATE transaction with the given access-time updates; returns
    their results. Raises `_BusyError` when the write lock is held elsewhere."""
    try:
        con.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            raise _BusyError() from exc
        raise
    try:
        tx = _Tx(_now())
        results = [fn(con, tx) for fn in fns]
        if touch_actions:
            con.executemany(
                "UPDATE actions SET atime = max(atime, ?) WHERE key = ?",
                [(t, k) for k, t in touch_actions.items()],
            )
        if touch_blobs:
            con.executemany(
                "UPDATE blobs SET atime = max(atime, ?) WHERE hash = ?",
                [(t, h) for h, t in touch_blobs.items()],
            )
        if tx.total_delta:
            con.execute(
                "UPDATE meta SET value = value + ? WHERE name = 'total_bytes'", (tx.total_delta,)
            )
        con.execute("COMMIT")
    except BaseException as exc:
        if con.in_transaction:
            con.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and _is_busy(exc):
            raise _BusyError() from exc
        raise
    return results


def _commit_sync(
    con: sqlite3.Connection,
    fns: Sequence[_WriteFn[Any]],
    touch_actions: Mapping[str, int],
    touch_blobs: Mapping[bytes, int],
) -> tuple[list[_Result], bool]:
    """Commit a group of operations: one transaction, or, when one of them fails, each in its
    own so that only that one fails. Returns each one's outcome (None: not run, the lock was
    held elsewhere) and whether the access times were written."""
    try:
        values = _transaction(con, fns, touch_actions, touch_blobs)
        return [("ok", value) for value in values], True
    except _BusyError:
        return [None] * len(fns), False
    except Exception as exc:
        if len(fns) == 1:
            return [("error", exc)], False
    results: list[_Result] = []
    for index, fn in enumerate(fns):
        try:
            results.append(("ok", _transaction(con, (fn,), {}, {})[0]))
        except _BusyError:
            # Another process took the lock between two of these: the rest wait for a retry.
            results.extend([None] * (len(fns) - index))
            break
        except Exception as exc:
            results.append(("error", exc))
    return results, False


def _checkpoint_sync(con: sqlite3.Connection) -> None:
    con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _busy_guard(con: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    try:
        return fn(con)
    except sqlite3.OperationalError as exc:
        if _is_busy(exc):
            raise _BusyError() from exc
        raise


def _total_bytes_sync(con: sqlite3.Connection) -> int:
    row = con.execute("SELECT value FROM meta WHERE name = 'total_bytes'").fetchone()
    return int(row[0]) if row else 0


def _get_action_sync(con: sqlite3.Connection, key: str) -> tuple[bytes, int] | None:
    rows = con.execute("SELECT value, atime FROM actions WHERE key = ?", (key,)).fetchall()
    return (rows[0][0], rows[0][1]) if rows else None


def _put_action_sync(con: sqlite3.Connection, tx: _Tx, key: str, value: bytes) -> None:
    cost = len(key.encode()) + len(value)
    old = con.execute("SELECT cost FROM actions WHERE key = ?", (key,)).fetchall()
    con.execute(
        "INSERT INTO actions (key, atime, cost, value) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET atime = excluded.atime, cost = excluded.cost, "
        "value = excluded.value",
        (key, tx.now, cost, value),
    )
    tx.total_delta += cost - (old[0][0] if old else 0)


@functools.cache
def _index_query(count: int) -> str:
    return (
        f"SELECT hash, size, atime, data IS NULL FROM blobs WHERE hash IN ({_placeholders(count)})"
    )


@functools.cache
def _read_query(count: int) -> str:
    return f"SELECT hash, size, atime, data FROM blobs WHERE hash IN ({_placeholders(count)})"


def _index_rows_sync(
    con: sqlite3.Connection, hashes: Sequence[bytes]
) -> dict[bytes, tuple[int, int, int]]:
    """hash -> (size, atime, is_file) of the rows present."""
    out: dict[bytes, tuple[int, int, int]] = {}
    for chunk in _chunks(hashes):
        for hash_, size, atime, is_file in con.execute(_index_query(len(chunk)), chunk).fetchall():
            out[hash_] = (size, atime, is_file)
    return out


def _read_rows_sync(
    con: sqlite3.Connection, hashes: Sequence[bytes]
) -> dict[bytes, tuple[int, int, bytes | None]]:
    """hash -> (size, atime, data or None when file-backed) of the rows present."""
    out: dict[bytes, tuple[int, int, bytes | None]] = {}
    for chunk in _chunks(hashes):
        for hash_, size, atime, data in con.execute(_read_query(len(chunk)), chunk).fetchall():
            out[hash_] = (size, atime, data)
    return out


def _insert_blobs_sync(
    con: sqlite3.Connection, tx: _Tx, rows: Sequence[tuple[bytes, int, bytes | None]]
) -> int:
    """Insert blob rows; those already present only get a fresh access time. Returns the
    bytes newly added."""
    now = tx.now
    added = 0
    for hash_, size, data in rows:
        cursor = con.execute(
            "INSERT OR IGNORE INTO blobs (hash, size, atime, data) VALUES (?, ?, ?, ?)",
            (hash_, size, now, data),
        )
        if cursor.rowcount == 1:
            added += size
        else:
            con.execute(
                "UPDATE blobs SET atime = ? WHERE hash = ? AND atime < ?", (now, hash_, now)
            )
    tx.total_delta += added
    return added


def _delete_blobs_sync(
    con: sqlite3.Connection, tx: _Tx, hashes: Sequence[bytes]
) -> dict[bytes, bool]:
    """Delete rows; returns the deleted hashes, each with whether it was file-backed (the
    caller removes those files after the commit)."""
    deleted: dict[bytes, bool] = {}
    freed = 0
    for chunk in _chunks(hashes):
        marks = _placeholders(len(chunk))
        # Not DELETE ... RETURNING: SQLite 3.40 evaluates `data IS NULL` wrongly there.
        rows = con.execute(
            f"SELECT hash, size, data IS NULL FROM blobs WHERE hash IN ({marks})", list(chunk)
        ).fetchall()
        con.execute(f"DELETE FROM blobs WHERE hash IN ({marks})", list(chunk))
        for hash_, size, is_file in rows:
            freed += size
            deleted[hash_] = bool(is_file)
    tx.total_delta -= freed
    return deleted


@dataclass(slots=True)
class _GcBatch:
    actions: int
    blob_hashes: list[bytes]
    file_digests: list[Digest]
    total_after: int

    @property
    def removed_any(self) -> bool:
        return bool(self.actions or self.blob_hashes)


def _gc_batch_sync(con: sqlite3.Connection, tx: _Tx, excess: int, newest_allowed: int) -> _GcBatch:
    candidates = con.execute(
        "SELECT kind, id, cost, hash, is_file FROM ("
        "  SELECT 'a' AS kind, rowid AS id, atime, cost, NULL AS hash, 0 AS is_file"
        "  FROM actions WHERE atime <= ?1"
        "  UNION ALL"
        "  SELECT 'b', rowid, atime, size, hash, data IS NULL FROM blobs WHERE atime <= ?1"
        ") ORDER BY atime LIMIT ?2",
        (newest_allowed, _CHUNK),
    ).fetchall()
    action_ids: list[int] = []
    blob_ids: list[int] = []
    blob_hashes: list[bytes] = []
    file_digests: list[Digest] = []
    freed = 0
    for kind, rowid, cost, hash_, is_file in candidates:
        if freed >= excess:
            break
        freed += cost
        if kind == "a":
            action_ids.append(rowid)
            continue
        blob_ids.append(rowid)
        blob_hashes.append(hash_)
        if is_file:
            file_digests.append(Digest(hash_.hex(), cost))
    for table, ids in (("actions", action_ids), ("blobs", blob_ids)):
        for chunk in _chunks(ids):
            con.execute(f"DELETE FROM {table} WHERE rowid IN ({_placeholders(len(chunk))})", chunk)
    tx.total_delta -= freed
    # meta.total_bytes is updated at the end of the transaction: add what is pending.
    total_after = _total_bytes_sync(con) + tx.total_delta
    return _GcBatch(len(action_ids), blob_hashes, file_digests, total_after)


def _quick_check_sync(con: sqlite3.Connection) -> list[str]:
    results = [str(row[0]) for row in con.execute("PRAGMA quick_check").fetchall()]
    return [] if results == ["ok"] else results


def _blob_page_sync(con: sqlite3.Connection, after: bytes) -> list[tuple[bytes, int, bytes | None]]:
    return con.execute(
        "SELECT hash, size, data FROM blobs WHERE hash > ? ORDER BY hash LIMIT 256", (after,)
    ).fetchall()


@dataclass(slots=True)
class _VerifyChunk:
    checked: int = 0
    checked_bytes: int = 0
    corrupt: list[Digest] = field(default_factory=list)
    missing_files: list[Digest] = field(default_factory=list)
    files: list[Digest] = field(default_factory=list)


def _hash_file(path: Path) -> tuple[str, int]:
    """(BLAKE3 hex, size) of a file, memory-mapped, or ("", -1) when it cannot be read."""
    try:
        size = path.stat().st_size
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        if size:
            hasher.update_mmap(path)
        return hasher.hexdigest(), size
    except OSError:
        return "", -1


def _write_file(dest: Path, data: bytes) -> None:
    with open(dest, "wb") as f:
        f.write(data)


def _unlink_all(paths: Iterable[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _close_all(connections: Iterable[sqlite3.Connection | None]) -> None:
    for con in connections:
        if con is not None:
            con.close()


__all__ = [
    "GcReport",
    "SqliteCache",
    "SqliteCacheConfig",
    "SqliteWriteStatistics",
    "VerifyReport",
]
