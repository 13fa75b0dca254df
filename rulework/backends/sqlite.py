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
the cache's writer thread commits every queued operation in a single transaction, and each
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
import threading
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
# A write cancelled while in a transaction waits (shielded) at most this long for it to end.
_WITHDRAW_WAIT_SECONDS = 30.0
# Automatic garbage collection when a session closes is bounded by this much time.
_CLOSE_GC_BUDGET_SECONDS = 2.0
# A group commit takes at most this many queued operations (and about this many bytes); the
# rest wait for the next one, so that one transaction never grows without bound.
_BATCH_MAX_OPERATIONS = 1024
_BATCH_MAX_BYTES = 16 * 1024 * _KiB
# SQLite's automatic checkpoint (after 1000 WAL pages by default) runs inside the COMMIT that
# crosses the threshold and fsyncs twice: measured here, one commit in ~250 took 5-20 ms,
# which was half the average cost of a write. It is off; the writer thread asks the
# checkpointer thread for a PASSIVE checkpoint after about this many pages (estimated from
# what it wrote), once the batch's callers have their answers...
_CHECKPOINT_AFTER_PAGES = 1000
# ... and checkpoints itself once this many pages were written without a complete checkpoint.
_CHECKPOINT_INLINE_AFTER_PAGES = 16 * _CHECKPOINT_AFTER_PAGES
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
        lock_timeout_seconds: how long a write waits for other processes' write locks before
            failing with `CacheBackendError`.
    """

    max_bytes: int | None = 10 * _GiB
    inline_threshold: int = 64 * _KiB
    loop_thread_reads: bool = True
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
        if not isinstance(self.loop_thread_reads, bool):
            problems.append(
                (
                    "cache.sqlite.loop_thread_reads",
                    f"must be true or false, found {self.loop_thread_reads!r}",
                )
            )
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
    largest_batch: int = 0
    """The most operations committed in one transaction."""
    busy_retries: int = 0
    """Attempts that found the write lock held by another process (or connection)."""
    checkpoints: int = 0
    """WAL checkpoints run (by the checkpointer thread, or by the writer when the WAL outgrew
    what the checkpointer kept up with)."""


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


# An operation's body: runs inside the group's transaction, in the writer thread.
_WriteFn = Callable[[sqlite3.Connection, _Tx], _T]

# _WriteOp.state values. Transitions happen under SqliteCache._cond.
_QUEUED: Final = 0  # in SqliteCache._queue; its caller may still withdraw it
_RUNNING: Final = 1  # taken by the writer thread into a transaction
_DONE: Final = 2  # committed or failed: `value` / `error` hold the outcome

# A transaction's outcome per operation: ("ok", value), ("error", exception), or None when it
# did not run because another connection held the write lock.
_Result = tuple[str, Any] | None


@dataclass(eq=False, slots=True)
class _WriteOp:
    """One caller's write, queued for the writer thread's next group commit."""

    fn: _WriteFn[Any]
    doing: str
    retry: bool
    weight: int
    """Bytes it writes, to bound the size of a batch."""
    deadline: float
    """`time.monotonic()` past which waiting for another process's lock fails it."""
    token: trio.lowlevel.TrioToken
    """Where to deliver the outcome (the caller's trio run)."""
    touches: tuple[dict[str, int], dict[bytes, int]] | None
    """Access-time updates taken from the queue with it; given back if they are not written."""
    done: trio.Event = field(default_factory=trio.Event)
    state: int = _QUEUED
    value: Any = None
    error: BaseException | None = None
    touches_written: bool = False
    withdrawn: bool = False
    """Its caller was cancelled while it was in a transaction attempt: never retry it."""


@dataclass(slots=True, eq=False)
class _GetBatch:
    """Action lookups started in one scheduling round, answered by one statement."""

    keys: list[str]
    done: trio.Event = field(default_factory=trio.Event)
    # None: not answered together (each caller reads on its own).
    rows: dict[str, tuple[bytes, int]] | None = None


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
    times, GC batches) is an operation handed to one writer thread, which the cache starts when
    it opens. The writer takes everything queued (up to a bound), commits it in one
    `BEGIN IMMEDIATE` transaction, and hands each caller its own outcome; meanwhile the next
    operations queue up for the following transaction. A caller returns only once its
    operation is committed, so it can read its write back at once. A caller cancelled while its
    operation is still queued withdraws it: nothing of it is written and the others are not
    disturbed; once the writer has taken it into a transaction (or an attempt at one, waiting
    for another process's lock), the cancelled call returns when that transaction has ended:
    the write then happened whole, or not at all and is not retried. An operation that fails (other than on the lock) is retried alone, so that it fails
    only its own caller. While another process holds the write lock, the writer waits for it
    (`busy_timeout`) and retries, re-forming the batch at each attempt from what is still
    queued, until each operation's `lock_timeout_seconds` has passed.

    Why a dedicated thread: measured on a 2-core machine, `trio.to_thread.run_sync` costs the
    event loop ~80 us of CPU per hop, a hand-off to a waiting thread and back through
    `TrioToken.run_sync_soon` ~40 us, and batching divides either by the batch size; the
    writer also starts the next batch the moment one is committed. Why not commit on the
    event-loop thread, as small reads run: a commit writes to the WAL file, and on a shared
    ext4 file system such writes were measured to block for 10-90 ms whenever the file
    system's journal commits (checkpoints, any process's fsync; p99.9 of 10 ms with no fsync
    of ours at all), which would freeze the whole engine. Reads do not wait on the journal.
    SQLite's own automatic checkpoint is off: a checkpointer thread, on its own connection,
    runs PASSIVE checkpoints when the writer has written enough, so that neither a COMMIT that
    callers wait for nor the next batch waits for a checkpoint's copying and fsyncs (measured:
    a 10,000-file snapshot's writes went from 0.36 s to 0.19 s). WAL readers and the writer
    run alongside a PASSIVE checkpoint; if writes ever outrun it, the writer checkpoints
    itself once the WAL holds several times the threshold, which bounds the WAL file.

    Threads and connections. Three connections: the writer thread's, a reader for the larger
    reads (in worker threads, behind a trio Lock; WAL readers never wait for writers), and the
    fast-path reader on the event-loop thread. Cross-process ordering is SQLite's file locking
    with `BEGIN IMMEDIATE`.

    The fast path (`loop_thread_reads`, default on). Measured on an idle 2-core machine: a trio
    thread hop costs 130-160 us (several times more when the cores are busy), while the two
    indexed reads of a process-cache hit (the action row, and the index rows of a few blobs)
    cost 20-40 us together when run directly. Two hops would be ~350 us per hit against a goal
    of 200 us, so small reads run on the event-loop thread, on a read-only connection with
    `busy_timeout=0` and the database memory-mapped: it never waits for a lock (a busy database
    falls back to the worker-thread path), and what it may block on is a few page reads, which
    the OS page cache serves in microseconds once the cache is warm; a cold page costs about
    what the thread hop would have. On a slow or network file system, set
    `loop_thread_reads = false`.
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
        self._loop_reader: sqlite3.Connection | None = None
        self._read_lock = trio.Lock()
        self._open_lock = trio.Lock()
        self._closed = False
        # The write queue, shared by the event-loop thread and the writer thread.
        # Invariant (under _cond): every op in _queue has state _QUEUED; an op leaves _queue
        # only when the writer takes it (-> _RUNNING) or its caller withdraws it.
        self._cond = threading.Condition(threading.Lock())
        self._queue: collections.deque[_WriteOp] = collections.deque()
        self._stopping = False  # set (under _cond) when the writer thread is to exit
        self._writer_thread: threading.Thread | None = None
        # The checkpointer thread and its connection. It waits on _checkpoint_cond (its own, so
        # that a notify meant for the writer never wakes only the checkpointer) for
        # _checkpoint_wanted, or _stopping.
        self._checkpoint_cond = threading.Condition(threading.Lock())
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpointer_thread: threading.Thread | None = None
        self._checkpoint_wanted = False
        # Access times to record, batched. Mutated on the event-loop thread only; each write
        # takes the whole dicts along into its transaction (`_take_touches`).
        # The round of action lookups being gathered (see `_get_action_row`), if any.
        self._get_batch: _GetBatch | None = None
        self._touch_actions: dict[str, int] = {}
        self._touch_blobs: dict[bytes, int] = {}
        self._touches_since = 0.0
        # Written by the writer thread only.
        self._write_stats = dict.fromkeys(SqliteWriteStatistics.__slots__, 0)
        self._wal_pages = 0  # WAL pages written since the last checkpoint request (an estimate)
        self._wal_pages_unchecked = 0  # ... since the last checkpoint known to have finished

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
                        break
                    except _BusyError:
                        if trio.current_time() > deadline:
                            raise self._locked_error("opening the cache") from None
                        await trio.sleep(0.02)
                assert self._writer is not None
                thread = threading.Thread(
                    target=self._writer_main,
                    args=(self._writer,),
                    name=f"rulework sqlite writer ({self.directory})",
                    daemon=True,  # an unclosed cache must not keep the interpreter alive
                )
                thread.start()
                self._writer_thread = thread
                checkpointer = threading.Thread(
                    target=self._checkpointer_main,
                    args=(self._checkpointer,),
                    name=f"rulework sqlite checkpointer ({self.directory})",
                    daemon=True,
                )
                checkpointer.start()
                self._checkpointer_thread = checkpointer

    def _connect(self, *, busy_timeout_ms: int, read_only: bool) -> sqlite3.Connection:
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
            if read_only:
                con.execute("PRAGMA query_only=1")
                con.execute("PRAGMA mmap_size=268435456")
            else:
                # The writer thread checkpoints (`_maybe_checkpoint`), never inside a COMMIT.
                con.execute("PRAGMA wal_autocheckpoint=0")
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
            writer = self._connect(busy_timeout_ms=_THREAD_BUSY_TIMEOUT_MS, read_only=False)
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
            loop_reader = self._connect(busy_timeout_ms=0, read_only=True)
            opened.append(loop_reader)
            checkpointer = self._connect(busy_timeout_ms=_THREAD_BUSY_TIMEOUT_MS, read_only=False)
        except BaseException as exc:
            _close_all(opened)
            if isinstance(exc, sqlite3.Error):
                if _is_busy(exc):
                    raise _BusyError() from exc
                raise self._database_error("opening", exc) from exc
            raise
        self._writer, self._reader, self._loop_reader = writer, reader, loop_reader
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
            # The writer thread commits what is queued and exits (it fails operations still
            # waiting for another process's lock at once); the read lock waits for reads still
            # running in worker threads.
            with self._cond:
                self._stopping = True
                self._cond.notify()
            with self._checkpoint_cond:
                self._checkpoint_cond.notify()
            for thread in (self._writer_thread, self._checkpointer_thread):
                if thread is not None:
                    await trio.to_thread.run_sync(thread.join)
            async with self._read_lock:
                connections = (self._writer, self._reader, self._loop_reader, self._checkpointer)
                self._writer = self._reader = self._loop_reader = self._checkpointer = None
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

    def _closed_error(self) -> CacheBackendError:
        return CacheBackendError(f"The sqlite cache at {self.directory} was closed.")

    # -- writes: the caller's side of the group commit -------------------------------------------

    async def _run_write(
        self, doing: str, fn: _WriteFn[_T], *, retry: bool = True, weight: int = 0
    ) -> _T:
        """Run `fn(connection, tx)` in the writer thread, inside a transaction shared with the
        other writes queued meanwhile and the pending access-time updates; return once it is
        committed. Retries while another process holds the lock (with `retry=False`, raises
        `_BusyError` at once instead). `weight`: the bytes `fn` writes."""
        if self._writer is None:
            await self._ensure_open()
        touches = self._take_touches() if self._touch_actions or self._touch_blobs else None
        op = _WriteOp(
            fn,
            doing,
            retry,
            weight,
            time.monotonic() + self.config.lock_timeout_seconds,
            trio.lowlevel.current_trio_token(),
            touches,
        )
        with self._cond:
            if self._stopping:
                op.state = _DONE
                op.error = self._closed_error()
            else:
                self._queue.append(op)
                self._cond.notify()
        try:
            if op.state != _DONE:
                await op.done.wait()
            else:
                await trio.lowlevel.checkpoint()
        except BaseException:
            with self._cond:
                state = op.state
                if state == _QUEUED:
                    self._queue.remove(op)  # never written: as if it had not been asked for
                    op.state = _DONE
                elif state == _RUNNING:
                    op.withdrawn = True
            if state == _QUEUED and touches is not None:
                self._restore_touches(*touches)
            elif state == _RUNNING:
                # It is in a transaction: wait for that one to end (it is not retried after),
                # so that when this call returns the write has happened whole or not at all, as
                # with a cancelled worker-thread call. `_wake` gives back unwritten touches.
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(_WITHDRAW_WAIT_SECONDS):
                        await op.done.wait()
            raise
        error = op.error
        if error is not None:
            if isinstance(error, sqlite3.Error):
                raise self._database_error(doing, error) from error
            if isinstance(error, _LockTimeout):
                raise self._locked_error(doing) from None
            raise error
        return cast(_T, op.value)

    def write_statistics(self) -> SqliteWriteStatistics:
        """How this process's writes were grouped into transactions so far."""
        return SqliteWriteStatistics(**self._write_stats)

    # -- writes: the writer thread -----------------------------------------------------------------

    def _writer_main(self, con: sqlite3.Connection) -> None:
        """The writer thread: commit what is queued, batch after batch, until told to stop."""
        cond = self._cond
        queue = self._queue
        while True:
            with cond:
                while not queue and not self._stopping:
                    cond.wait()
                if not queue:
                    return  # stopping, and everything queued was answered
                batch: list[_WriteOp] = []
                weight = 0
                while queue and len(batch) < _BATCH_MAX_OPERATIONS and weight < _BATCH_MAX_BYTES:
                    op = queue.popleft()
                    op.state = _RUNNING
                    batch.append(op)
                    weight += op.weight
            try:
                self._commit_batch_sync(con, batch, weight)
            except BaseException as exc:
                # A bug of ours: never leave a caller waiting. Everything queued fails, and so
                # does every later write (the cache counts as closed).
                logger.exception("The sqlite cache writer thread failed")
                with cond:
                    self._stopping = True
                    pending = [op for op in batch if op.state != _DONE] + list(queue)
                    queue.clear()
                self._deliver(
                    pending,
                    CacheBackendError(
                        f"The sqlite cache {self.database_path} stopped writing after an "
                        f"internal error ({type(exc).__name__}: {exc}); reopen it."
                    ),
                )
                return

    def _commit_batch_sync(
        self, con: sqlite3.Connection, batch: list[_WriteOp], weight: int
    ) -> None:
        touch_actions: dict[str, int] = {}
        touch_blobs: dict[bytes, int] = {}
        for op in batch:
            if op.touches is not None:
                touch_actions.update(op.touches[0])
                touch_blobs.update(op.touches[1])
        results, touched = _commit_sync(con, [op.fn for op in batch], touch_actions, touch_blobs)
        stats = self._write_stats
        committed = 0
        finished: list[_WriteOp] = []
        retry: list[_WriteOp] = []
        now = time.monotonic()
        for op, result in zip(batch, results, strict=True):
            op.touches_written = touched
            if result is None:
                if not op.retry:
                    op.error = _BusyError()
                elif self._stopping:
                    op.error = self._closed_error()
                elif now > op.deadline:
                    op.error = _LockTimeout()
                else:
                    retry.append(op)
                    continue
            elif result[0] == "ok":
                committed += 1
                op.value = result[1]
            else:
                op.error = result[1]
            finished.append(op)
        if committed:
            stats["operations"] += committed
            stats["transactions"] += 1
            stats["largest_batch"] = max(stats["largest_batch"], committed)
            self._wal_pages += 2 + 2 * committed + weight // _PAGE_BYTES
        if retry:
            # Another process holds the lock (SQLite already waited `busy_timeout` for it):
            # back to the head of the queue, where their callers may still withdraw them, and
            # the next batch tries again with whatever else was queued meanwhile.
            stats["busy_retries"] += 1
            requeued: list[_WriteOp] = []
            with self._cond:
                for op in retry:
                    if op.withdrawn:  # cancelled during this attempt: answer, do not retry
                        op.error = _Withdrawn()
                        finished.append(op)
                    else:
                        op.state = _QUEUED
                        requeued.append(op)
                self._queue.extendleft(reversed(requeued))
        self._deliver(finished)
        if self._wal_pages >= _CHECKPOINT_AFTER_PAGES:
            self._wal_pages_unchecked += self._wal_pages
            self._wal_pages = 0
            if self._wal_pages_unchecked >= _CHECKPOINT_INLINE_AFTER_PAGES:
                # Writes outran the checkpointer: checkpoint here, which bounds the WAL.
                self._wal_pages_unchecked = 0
                self._count_checkpoint(_checkpoint(con, self.database_path))
            else:
                with self._checkpoint_cond:
                    self._checkpoint_wanted = True
                    self._checkpoint_cond.notify()

    def _checkpointer_main(self, con: sqlite3.Connection) -> None:
        """The checkpointer thread: a PASSIVE checkpoint whenever the writer asks, until told
        to stop (a checkpoint in progress then finishes first)."""
        cond = self._checkpoint_cond
        while True:
            with cond:
                while not self._checkpoint_wanted and not self._stopping:
                    cond.wait()
                if not self._checkpoint_wanted:
                    return
                self._checkpoint_wanted = False
            if self._count_checkpoint(_checkpoint(con, self.database_path)):
                # Read without the lock by the writer: a stale value only delays its fallback.
                self._wal_pages_unchecked = 0

    def _count_checkpoint(self, outcome: bool | None) -> bool:
        """Count a checkpoint that ran (from either thread, so under the lock)."""
        if outcome is not None:
            with self._checkpoint_cond:
                self._write_stats["checkpoints"] += 1
        return bool(outcome)

    def _deliver(self, ops: list[_WriteOp], error: BaseException | None = None) -> None:
        """In the writer thread: mark `ops` done and wake their callers, one hand-off per run."""
        with self._cond:
            for op in ops:
                if error is not None and op.error is None:
                    op.error = error
                op.state = _DONE
        by_token: dict[trio.lowlevel.TrioToken, list[_WriteOp]] = {}
        for op in ops:
            by_token.setdefault(op.token, []).append(op)
        for token, group in by_token.items():
            # The run may be over (its callers gone): then there is nobody left to wake.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._wake, group)

    def _wake(self, ops: Sequence[_WriteOp]) -> None:
        """On the event-loop thread: wake the callers of answered ops."""
        for op in ops:
            if op.touches is not None and not op.touches_written:
                self._restore_touches(*op.touches)
            op.done.set()

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
        loop_reader = self._loop_reader
        if small and loop_reader is not None and self.config.loop_thread_reads:
            try:
                result = fn(loop_reader)
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
        if self._loop_reader is None:
            await self._ensure_open()
        row = await self._get_action_row(key)
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

    async def _get_action_row(self, key: str) -> tuple[bytes, int] | None:
        """Look `key` up together with the lookups other tasks start in the same scheduling
        round: one `SELECT ... IN (...)` answers them all (a statement costs far more than a
        row). The first caller of a round waits one checkpoint for the others, then reads for
        everyone on the event-loop fast path; if that is not possible (busy database, fast
        path off, the first caller cancelled) each caller reads on its own."""
        if not self.config.loop_thread_reads:
            return await self._read(lambda con: _get_action_sync(con, key), small=True)
        batch = self._get_batch
        if batch is not None:
            batch.keys.append(key)
            await batch.done.wait()
            if batch.rows is not None:
                return batch.rows.get(key)
            return await self._read(lambda con: _get_action_sync(con, key), small=True)
        batch = self._get_batch = _GetBatch([key])
        try:
            await trio.lowlevel.checkpoint()  # the round in which the others join
        finally:
            self._get_batch = None
            reader = self._loop_reader
            if reader is not None:
                try:
                    batch.rows = _get_actions_sync(reader, batch.keys)
                except sqlite3.Error as exc:
                    if not _is_busy(exc):
                        batch.done.set()
                        raise self._database_error("reading", exc) from exc
            batch.done.set()
        if batch.rows is not None:
            return batch.rows.get(key)
        return await self._read(lambda con: _get_action_sync(con, key), small=True)

    async def put_action(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (replacing any older value); returns once committed."""
        await self.put_actions([(key, value)])

    async def put_actions(self, entries: Sequence[tuple[str, bytes]]) -> None:
        """Store several `(key, value)` entries in one transaction; returns once committed.

        What a writer of many entries at once (the process runner's background writes) uses
        instead of one `put_action` each: a transaction costs more than the rows in it."""
        rows = [(key, bytes(value)) for key, value in entries]
        if not rows:
            await trio.lowlevel.checkpoint()
            return
        size = sum(len(value) for _, value in rows)
        await self._run_write(
            "writing action entries", functools.partial(_put_actions_sync, rows=rows), weight=size
        )
        self._counters.action_writes += len(rows)
        self._counters.bytes_written += size

    # -- blobs -----------------------------------------------------------------------------------

    def _is_inline(self, digest: Digest) -> bool:
        return digest.serialized_bytes_length <= self.config.inline_threshold

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` not held. Held blobs count as used for the LRU."""
        pairs = [(_hash_key(d), d) for d in dict.fromkeys(digests)]
        if not pairs:
            await trio.lowlevel.checkpoint()
            return frozenset()
        if self._loop_reader is None:
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


def _checkpoint(con: sqlite3.Connection, path: Path) -> bool | None:
    """Run a PASSIVE checkpoint: True if it copied every frame of the WAL back, False if it
    ran but left frames (readers or writers were using them), None if it failed."""
    try:
        busy, log, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    except sqlite3.Error as exc:
        # Nothing is lost: the WAL keeps the data and the next checkpoint retries.
        logger.debug("Checkpoint of %s failed: %s", path, exc)
        return None
    return not busy and log == done


class _LockTimeout(Exception):
    """Marks an operation that waited for another process's lock past its deadline."""


class _Withdrawn(Exception):
    """Marks an operation whose caller was cancelled during a failed attempt (never seen)."""


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


# SQLite's default limit on the parameters of one statement is 32,766; stay well below.
_KEYS_PER_SELECT = 500


def _get_actions_sync(con: sqlite3.Connection, keys: Sequence[str]) -> dict[str, tuple[bytes, int]]:
    found: dict[str, tuple[bytes, int]] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), _KEYS_PER_SELECT):
        chunk = unique[start : start + _KEYS_PER_SELECT]
        marks = ",".join("?" * len(chunk))
        for key, value, atime in con.execute(
            f"SELECT key, value, atime FROM actions WHERE key IN ({marks})", chunk
        ):
            found[key] = (value, atime)
    return found


def _get_action_sync(con: sqlite3.Connection, key: str) -> tuple[bytes, int] | None:
    rows = con.execute("SELECT value, atime FROM actions WHERE key = ?", (key,)).fetchall()
    return (rows[0][0], rows[0][1]) if rows else None


def _put_action_sync(con: sqlite3.Connection, tx: _Tx, key: str, value: bytes) -> None:
    cost = len(key.encode()) + len(value)
    # A new key (the usual case: a process that just ran) costs one statement.
    inserted = con.execute(
        "INSERT INTO actions (key, atime, cost, value) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (key) DO NOTHING",
        (key, tx.now, cost, value),
    ).rowcount
    if inserted == 1:
        tx.total_delta += cost
        return
    (old_cost,) = con.execute("SELECT cost FROM actions WHERE key = ?", (key,)).fetchone()
    con.execute(
        "UPDATE actions SET atime = ?, cost = ?, value = ? WHERE key = ?",
        (tx.now, cost, value, key),
    )
    tx.total_delta += cost - old_cost


def _put_actions_sync(con: sqlite3.Connection, tx: _Tx, rows: Sequence[tuple[str, bytes]]) -> None:
    for key, value in rows:
        _put_action_sync(con, tx, key, value)


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
    bytes newly added.

    One lookup per chunk and `executemany` for the rest: the loop over rows then runs in C,
    which matters because this runs while the event loop and readers want the GIL (a Python
    loop of one `execute` per row made a 10,000-blob write 2x slower)."""
    now = tx.now
    added = 0
    for chunk in _chunks(rows):
        hashes = [hash_ for hash_, _, _ in chunk]
        held = dict(
            con.execute(
                f"SELECT hash, atime FROM blobs WHERE hash IN ({_placeholders(len(hashes))})",
                hashes,
            ).fetchall()
        )
        new = {hash_: (hash_, size, now, data) for hash_, size, data in chunk if hash_ not in held}
        if new:
            con.executemany(
                "INSERT INTO blobs (hash, size, atime, data) VALUES (?, ?, ?, ?)", new.values()
            )
            added += sum(row[1] for row in new.values())
        stale = [(now, hash_) for hash_, atime in held.items() if atime < now]
        if stale:
            con.executemany("UPDATE blobs SET atime = ? WHERE hash = ?", stale)
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
