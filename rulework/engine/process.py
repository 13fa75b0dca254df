"""Processes: the `Process` request, its results, and the service that runs them with caching.

A rule runs a subprocess with `await Get(ProcessResult, Process(argv=(...), ...))` (or
`FallibleProcessResult` to handle a non-zero exit itself). The engine hands the request to a
`ProcessRunner`, which picks the environment (`Process.environment` or the configured default),
serves the result from the process cache when it can, and otherwise runs it on that
environment's `ProcessExecutor` (see `rulework.abc`).

Paths: `output_files`, `output_directories` are relative to the working directory, which is
itself relative to the sandbox root (the root of `input_digest`), as in the Remote Execution API.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import posixpath
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol, TypeAlias, TypeVar

import blake3
import trio

from .cache import ActionWrite
from .errors import (
    CacheError,
    ExecutorError,
    MissingDigestError,
    ProcessExecutionFailure,
    ProcessTimeout,
    RuleworkError,
    StoreError,
)
from .fingerprint import fingerprint
from .fs import EMPTY_DIGEST, Digest

if TYPE_CHECKING:
    from ..abc import ExecutedProcess, ProcessExecutor
    from .store import Store

logger = logging.getLogger(__name__)

_K = TypeVar("_K")
_V = TypeVar("_V")


class FrozenDict(Mapping[_K, _V]):
    """An immutable, hashable mapping that keeps insertion order.

    Equal to any mapping with the same items (like `dict`); hashable when its values are.

    >>> env = FrozenDict({"LANG": "C"})
    >>> env["LANG"], hash(env) == hash(FrozenDict(LANG="C"))
    ('C', True)
    """

    __slots__ = ("_data", "_hash")

    _data: dict[_K, _V]
    _hash: int | None

    def __init__(
        self, items: Mapping[_K, _V] | Iterable[tuple[_K, _V]] = (), /, **kwargs: _V
    ) -> None:
        data: dict[Any, _V] = dict(items)
        if kwargs:
            data.update(kwargs)
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_hash", None)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"FrozenDict is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"FrozenDict is immutable; cannot delete {name!r}")

    def __getitem__(self, key: _K) -> _V:
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[_K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        cached = self._hash
        if cached is None:
            cached = hash(frozenset(self._data.items()))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenDict):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __or__(self, other: Mapping[_K, _V]) -> FrozenDict[_K, _V]:
        return FrozenDict({**self._data, **other})

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"

    def __reduce__(self) -> tuple[type[FrozenDict[_K, _V]], tuple[dict[_K, _V]]]:
        return (type(self), (self._data,))


class ProcessSpecError(RuleworkError, ValueError):
    """A `Process` was constructed with an invalid field; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"Invalid Process.{field}: {message}")


class ProcessSpecTypeError(ProcessSpecError, TypeError):
    """A `Process` field has the wrong type; `field` names it."""


class ProcessCacheScope(enum.Enum):
    """Which results of a `Process` the process cache keeps."""

    #: Persist results with exit code 0 only (the default).
    SUCCESSFUL = "successful"
    #: Persist every result, whatever its exit code (never a timed-out one).
    ALWAYS = "always"
    #: Memoize within one session only; never read from or written to the persistent caches.
    PER_SESSION = "per_session"


def _check_relative_path(field: str, path: object) -> str:
    if not isinstance(path, str):
        raise ProcessSpecTypeError(
            field, f"expected a str path, got {path!r} ({type(path).__name__})"
        )
    if not path:
        raise ProcessSpecError(field, "the path is empty")
    if "\0" in path:
        raise ProcessSpecError(field, f"{path!r} contains a NUL character")
    if path.startswith("/"):
        raise ProcessSpecError(
            field, f"{path!r} is absolute; paths are relative to the process's sandbox"
        )
    if ".." in path.split("/"):
        raise ProcessSpecError(field, f"{path!r} contains '..'; paths must stay inside the sandbox")
    normalized = posixpath.normpath(path)
    if normalized == ".":
        raise ProcessSpecError(field, f"{path!r} names the sandbox root itself")
    if normalized != path:
        raise ProcessSpecError(field, f"{path!r} is not normalized; write {normalized!r}")
    return path


def _check_paths(field: str, paths: object) -> tuple[str, ...]:
    if paths == () or paths == []:
        return ()  # the common case, without the (slow) ABC isinstance checks
    if isinstance(paths, str | bytes) or not isinstance(paths, Iterable):
        raise ProcessSpecTypeError(
            field, f"expected a sequence of str paths, got {paths!r} ({type(paths).__name__})"
        )
    # Sorted and deduplicated: the order of declared outputs means nothing, and a stable order
    # keeps the cache key stable.
    return tuple(sorted({_check_relative_path(field, p) for p in paths}))


def _check_argv(argv: object) -> tuple[str, ...]:
    if isinstance(argv, str | bytes):
        raise ProcessSpecTypeError(
            "argv",
            f"expected a sequence of str, got the string {argv!r}; pass a tuple such as "
            f"({argv!r},) or split it with shlex.split (rulework never runs a shell string)",
        )
    if type(argv) is tuple:
        result: tuple[Any, ...] = argv
    elif isinstance(argv, Iterable):
        result = tuple(argv)
    else:
        raise ProcessSpecTypeError(
            "argv", f"expected a sequence of str, got {argv!r} ({type(argv).__name__})"
        )
    if not result:
        raise ProcessSpecError("argv", "it is empty; give at least the program to run")
    for index, arg in enumerate(result):
        if type(arg) is not str and not isinstance(arg, str):
            raise ProcessSpecTypeError(
                "argv", f"argv[{index}] is {arg!r} ({type(arg).__name__}), expected str"
            )
        if "\0" in arg:
            raise ProcessSpecError("argv", f"argv[{index}] = {arg!r} contains a NUL character")
    if not result[0]:
        raise ProcessSpecError("argv", "argv[0] (the program) is empty")
    return result


_EMPTY_ENV: FrozenDict[str, str] = FrozenDict()


def _check_env(env: object) -> FrozenDict[str, str]:
    if env is None or (type(env) is dict and not env):
        return _EMPTY_ENV
    if type(env) is not dict and not isinstance(env, Mapping):
        raise ProcessSpecTypeError(
            "env", f"expected a mapping of str to str, got {env!r} ({type(env).__name__})"
        )
    for key, value in env.items():
        if not isinstance(key, str):
            raise ProcessSpecTypeError(
                "env", f"key {key!r} is a {type(key).__name__}, expected str"
            )
        if not isinstance(value, str):
            raise ProcessSpecTypeError(
                "env", f"env[{key!r}] = {value!r} is a {type(value).__name__}, expected str"
            )
        if not key or "=" in key or "\0" in key:
            raise ProcessSpecError(
                "env", f"{key!r} is not a valid variable name (empty, or contains '=' or NUL)"
            )
        if "\0" in value:
            raise ProcessSpecError("env", f"env[{key!r}] contains a NUL character")
    if isinstance(env, FrozenDict) and list(env) == sorted(env):
        return env
    # Sorted so that two Processes with the same variables given in another order are equal
    # and share one cache entry.
    return FrozenDict(sorted(env.items()))


def _check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ProcessSpecTypeError(
            "timeout_seconds",
            f"expected a positive number of seconds or None, got {timeout!r} "
            f"({type(timeout).__name__})",
        )
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ProcessSpecError(
            "timeout_seconds",
            f"expected a positive, finite number of seconds (or None for no timeout), got {timeout!r}",
        )
    return float(timeout)


@dataclass(frozen=True, slots=True)
class Process:
    """A subprocess to run in a sandbox: request it with `Get(ProcessResult, Process(...))`.

    Args:
        argv: The program and its arguments, passed literally (never through a shell).
            A bare program name is looked up on the `PATH` of `env` (or the system default path).
        description: Shown in progress and errors; not part of the cache key. Defaults to
            "Run <argv[0]>".
        input_digest: Files materialized into the sandbox before the process starts.
        env: Exactly the environment the process sees (nothing is inherited, except the names
            an environment's config lists in `inherit_env`).
        working_directory: Where the process starts, relative to the sandbox root.
        output_files: Files to capture afterwards, relative to the working directory; declared
            files that were not created are left out of `output_digest`.
        output_directories: Directories to capture (recursively), relative to the working directory.
        timeout_seconds: Kill the process (and its process group) after this many seconds.
        environment: The configured environment to run in; None for the default one.
        cache_scope: Which results the process cache keeps (see `ProcessCacheScope`).

    Raises:
        ProcessSpecError: a field is invalid (a `ValueError`; `ProcessSpecTypeError`, also a
            `TypeError`, for a wrong type). The message names the field.

    >>> Process(("python", "-c", "print(1)"), env={"PATH": "/usr/bin"}).argv
    ('python', '-c', 'print(1)')
    """

    argv: tuple[str, ...]
    description: str
    input_digest: Digest
    env: FrozenDict[str, str]
    working_directory: str | None
    output_files: tuple[str, ...]
    output_directories: tuple[str, ...]
    timeout_seconds: float | None
    environment: str | None
    cache_scope: ProcessCacheScope

    def __init__(
        self,
        argv: Sequence[str],
        description: str = "",
        input_digest: Digest = EMPTY_DIGEST,
        env: Mapping[str, str] | None = None,
        working_directory: str | None = None,
        output_files: Sequence[str] = (),
        output_directories: Sequence[str] = (),
        timeout_seconds: float | None = None,
        environment: str | None = None,
        cache_scope: ProcessCacheScope = ProcessCacheScope.SUCCESSFUL,
    ) -> None:
        checked_argv = _check_argv(argv)
        if not isinstance(description, str):
            raise ProcessSpecTypeError(
                "description", f"expected str, got {description!r} ({type(description).__name__})"
            )
        if not isinstance(input_digest, Digest):
            raise ProcessSpecTypeError(
                "input_digest",
                f"expected a Digest (e.g. Snapshot.digest), got {input_digest!r} "
                f"({type(input_digest).__name__})",
            )
        if environment is not None and (not isinstance(environment, str) or not environment):
            raise ProcessSpecTypeError(
                "environment",
                f"expected the name of a configured environment or None, got {environment!r}",
            )
        if not isinstance(cache_scope, ProcessCacheScope):
            raise ProcessSpecTypeError(
                "cache_scope", f"expected a ProcessCacheScope member, got {cache_scope!r}"
            )
        set_ = object.__setattr__
        set_(self, "argv", checked_argv)
        set_(self, "description", description or f"Run {checked_argv[0]}")
        set_(self, "input_digest", input_digest)
        set_(self, "env", _check_env(env))
        set_(
            self,
            "working_directory",
            None
            if working_directory is None
            else _check_relative_path("working_directory", working_directory),
        )
        set_(self, "output_files", _check_paths("output_files", output_files))
        set_(self, "output_directories", _check_paths("output_directories", output_directories))
        set_(self, "timeout_seconds", _check_timeout(timeout_seconds))
        set_(self, "environment", environment)
        set_(self, "cache_scope", cache_scope)


ResultSource = Literal["ran", "local_cache", "remote_cache"]
CacheSource = Literal["local_cache", "remote_cache"]


@dataclass(frozen=True, slots=True)
class ProcessResultMetadata:
    """Where a process result came from.

    `source` is "ran" (executed now), "local_cache" or "remote_cache"; `environment` names the
    configured environment the Process ran in (for a cached result: the one it was looked up
    for; results are shared by environments whose executors have the same identity);
    `duration_seconds` is how long it ran (for a cached result: when it was executed).
    """

    source: ResultSource
    environment: str
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class FallibleProcessResult:
    """The outcome of a `Process`, whatever its exit code.

    `output_digest` holds the declared outputs that the process created. `timed_out` is True
    when the process was killed for exceeding `timeout_seconds` (its `exit_code` is then the
    negative signal number, and stderr ends with a note saying so).
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    output_digest: Digest
    metadata: ProcessResultMetadata
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class ProcessResult:
    """The outcome of a `Process` that exited with code 0.

    Requesting it for a process that fails raises `ProcessExecutionFailure` (`ProcessTimeout`
    when it timed out); request `FallibleProcessResult` to handle failures yourself.
    """

    stdout: bytes
    stderr: bytes
    output_digest: Digest
    metadata: ProcessResultMetadata


def check_process_result(process: Process, result: FallibleProcessResult) -> ProcessResult:
    """`result` as a `ProcessResult`, or raise if the process failed.

    Raises:
        ProcessTimeout: the process was killed after `process.timeout_seconds`.
        ProcessExecutionFailure: the process exited with a non-zero code.
    """
    if result.timed_out:
        raise ProcessTimeout(
            result.exit_code,
            result.stdout,
            result.stderr,
            process.description,
            environment=result.metadata.environment,
        )
    if result.exit_code != 0:
        raise ProcessExecutionFailure(
            result.exit_code,
            result.stdout,
            result.stderr,
            process.description,
            environment=result.metadata.environment,
        )
    return ProcessResult(result.stdout, result.stderr, result.output_digest, result.metadata)


class ActionCache(Protocol):
    """The part of the cache the process runner needs: opaque values under string keys.

    `get_action` returns the value and which layer served it, or None on a miss. Both may raise
    `CacheError`; the runner then degrades to running the process (reads) or to not caching
    (writes), with a warning. `rulework.engine.cache.CacheLayer` implements it.

    Optionally, `put_actions(writes: Sequence[ActionWrite]) -> dict[str, CacheError]` stores
    several entries at once and returns the ones it could not store; the runner's background
    writer then hands over its batches whole (`CacheLayer.put_actions`).
    """

    async def get_action(self, key: str) -> tuple[bytes, CacheSource] | None: ...

    async def put_action(
        self,
        key: str,
        value: bytes,
        *,
        digests: Iterable[Digest] = (),
        tree_roots: Iterable[Digest] = (),
    ) -> None:
        """Store `value` under `key`. `digests` are the blobs it names (already in the store)
        and `tree_roots` the directory trees it names, so that a cache can keep (or fetch)
        them together with the entry."""
        ...


@dataclass(frozen=True, slots=True)
class ProcessRunnerStatistics:
    """Counters of a `ProcessRunner` since it was created."""

    ran: int = 0
    local_cache_hits: int = 0
    remote_cache_hits: int = 0
    cache_misses: int = 0
    #: Action-cache entries ignored because a blob they name (stdout, stderr or an output file)
    #: was missing; each also counts as a miss.
    incomplete_cache_entries: int = 0
    cache_writes: int = 0


#: Bumped whenever the cache key's inputs or the action entry's format change, so that entries
#: written by an older rulework are never misread.
PROCESS_CACHE_KEY_SCHEMA = "rulework.process.v1"


@dataclass(frozen=True, slots=True)
class _ActionKeyParts:
    """The fields of a Process that decide its result: all but description and environment
    name (the environment is keyed by its executor's identity instead)."""

    argv: tuple[str, ...]
    input_digest: Digest
    env: FrozenDict[str, str]
    working_directory: str | None
    output_files: tuple[str, ...]
    output_directories: tuple[str, ...]
    timeout_seconds: float | None
    cache_scope: ProcessCacheScope


def process_cache_key(process: Process, *, identity: str, salt: str = "") -> str:
    """The process-cache key of `process` run by an executor of `identity`: a hex BLAKE3.

    Covers the key-schema version, the user's salt, every field of the Process that can change
    its outcome (not `description`, nor the environment's name) and the executor identity.
    """
    parts = _ActionKeyParts(
        process.argv,
        process.input_digest,
        process.env,
        process.working_directory,
        process.output_files,
        process.output_directories,
        process.timeout_seconds,
        process.cache_scope,
    )
    # Length prefixes make the encoding unambiguous: no salt or identity can forge a separator.
    material = (
        f"{PROCESS_CACHE_KEY_SCHEMA}\n{len(salt)}:{salt}\n{fingerprint(parts)}\n"
        f"{len(identity)}:{identity}"
    )
    return blake3.blake3(material.encode("utf-8", "surrogatepass")).hexdigest()


def _digest_to_json(digest: Digest) -> list[object]:
    return [digest.fingerprint, digest.serialized_bytes_length]


def _digest_from_json(value: object) -> Digest:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not isinstance(value[0], str)
        or not isinstance(value[1], int)
    ):
        raise ValueError(f"bad digest {value!r}")
    return Digest(value[0], value[1])


#: stdout / stderr up to this size are kept inside the action entry itself: a hit then needs
#: no blob reads (and the entry no blobs), which is most of the cost of a hit.
INLINE_OUTPUT_BYTES = 16 * 1024
# Background cache writes (ProcessRunner.write_in_background): how long the writer waits for
# more entries after the first, and how many it writes at once at most.
_WRITE_LINGER_SECONDS = 0.005
_WRITE_BATCH_MAX = 256
# A cache entry waiting for the background writer: (key, result, what the executor reported).
_PendingWrite: TypeAlias = "tuple[str, FallibleProcessResult, ExecutedProcess]"


def _stream_to_json(value: bytes | Digest) -> dict[str, object]:
    if isinstance(value, Digest):
        return {"digest": _digest_to_json(value)}
    return {"inline": len(value)}


@dataclass(frozen=True, slots=True)
class _ActionEntry:
    """What the action cache holds for one process run.

    stdout and stderr are either inline bytes (small ones) or the digest of a blob in the store.
    Encoded as one line of JSON (the metadata), a newline, then the inline bytes (stdout's,
    then stderr's).
    """

    exit_code: int
    stdout: bytes | Digest
    stderr: bytes | Digest
    output_digest: Digest
    duration_seconds: float

    def encode(self) -> bytes:
        header = json.dumps(
            {
                "schema": PROCESS_CACHE_KEY_SCHEMA,
                "exit_code": self.exit_code,
                "stdout": _stream_to_json(self.stdout),
                "stderr": _stream_to_json(self.stderr),
                "output": _digest_to_json(self.output_digest),
                "duration": self.duration_seconds,
            },
            separators=(",", ":"),
        ).encode()
        inline = [v for v in (self.stdout, self.stderr) if isinstance(v, bytes)]
        return b"\n".join([header, b"".join(inline)])

    @classmethod
    def decode(cls, data: bytes) -> _ActionEntry:
        """Raises ValueError (or KeyError, TypeError) when `data` is not an entry of this schema."""
        header, _, payload = data.partition(b"\n")
        raw = json.loads(header)
        if not isinstance(raw, dict) or raw.get("schema") != PROCESS_CACHE_KEY_SCHEMA:
            raise ValueError("not a process action entry of this schema")
        exit_code, duration = raw["exit_code"], raw["duration"]
        if not isinstance(exit_code, int) or not isinstance(duration, int | float):
            raise ValueError("bad exit code or duration")
        offset = 0
        streams: list[bytes | Digest] = []
        for name in ("stdout", "stderr"):
            spec = raw[name]
            if "inline" in spec:
                size = spec["inline"]
                if not isinstance(size, int) or not 0 <= size <= len(payload) - offset:
                    raise ValueError(f"bad inline {name} size")
                streams.append(payload[offset : offset + size])
                offset += size
            else:
                streams.append(_digest_from_json(spec["digest"]))
        if offset != len(payload):
            raise ValueError("inline payload size mismatch")
        return cls(
            exit_code, streams[0], streams[1], _digest_from_json(raw["output"]), float(duration)
        )


def _timeout_note(process: Process) -> bytes:
    return (
        f"\n[rulework] Process '{process.description}' exceeded its timeout of "
        f"{process.timeout_seconds:g} seconds and was killed with its process group.\n"
    ).encode()


class ProcessRunner:
    """Runs `Process`es on configured executors, through the process cache.

    Args:
        executors: The environments by name (`ProcessExecutor`s constructed, not yet opened;
            the runner opens each on first use and closes it in `aclose`).
        default_environment: The environment of a Process that names none.
        store: Where inputs are read from and outputs, stdout and stderr are written.
        cache: The action cache (None: no process cache at all).
        salt: The user's cache salt from config, mixed into every key.

    Use `async with ProcessRunner(...) as runner:` or call `aclose()`.
    """

    def __init__(
        self,
        executors: Mapping[str, ProcessExecutor],
        default_environment: str,
        store: Store,
        cache: ActionCache | None,
        *,
        salt: str = "",
    ) -> None:
        self._executors = dict(executors)
        if default_environment not in self._executors:
            raise ExecutorError(
                f"The default environment {default_environment!r} is not configured; "
                f"configured environments: {self._environment_names()}."
            )
        self._default_environment = default_environment
        self._store = store
        self._cache = cache
        self._salt = salt
        # Invariant: an executor is in `_opened` iff its `open()` and `identity()` returned
        # (its identity is then in `_identities`); it is closed exactly once, by `aclose`.
        self._opened: dict[str, ProcessExecutor] = {}
        self._open_locks: dict[str, trio.Lock] = {}
        self._identities: dict[str, str] = {}
        self._stats: dict[str, int] = dict.fromkeys(ProcessRunnerStatistics.__dataclass_fields__, 0)
        # Where `run` queues cache entries for the background writer (write_in_background).
        self._background: trio.MemorySendChannel[_PendingWrite] | None = None

    def _environment_names(self) -> str:
        return ", ".join(sorted(self._executors)) or "(none)"

    @property
    def default_environment(self) -> str:
        """The environment of a Process that names none."""
        return self._default_environment

    def statistics(self) -> ProcessRunnerStatistics:
        """Counters since this runner was created."""
        return ProcessRunnerStatistics(**self._stats)

    async def __aenter__(self) -> ProcessRunner:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every executor this runner opened (each exactly once, even if one fails).

        Raises:
            The error of a failing `aclose` (an ExceptionGroup if several failed).
        """
        opened, self._opened = self._opened, {}
        self._identities.clear()
        errors: list[Exception] = []
        with trio.CancelScope(shield=True):
            for executor in opened.values():
                try:
                    await executor.aclose()
                except Exception as exc:  # collected: the other executors must close too
                    errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("several executors failed to close", errors)

    async def _executor(self, name: str) -> tuple[ProcessExecutor, str]:
        """The opened executor of environment `name` and its identity."""
        executor = self._opened.get(name)
        if executor is not None:
            return executor, self._identities[name]
        try:
            executor = self._executors[name]
        except KeyError:
            raise ExecutorError(
                f"No environment named {name!r} is configured; configured environments: "
                f"{self._environment_names()}. Add an [environments.{name}] table to the "
                "config, or fix Process.environment."
            ) from None
        lock = self._open_locks.setdefault(name, trio.Lock())
        async with lock:
            if name not in self._opened:
                await executor.open(self._store)
                try:
                    identity = await executor.identity()
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await executor.aclose()
                    raise
                self._identities[name] = identity
                self._opened[name] = executor
        return executor, self._identities[name]

    async def run(self, process: Process) -> FallibleProcessResult:
        """Run `process` (or serve it from the process cache), whatever its exit code.

        Raises:
            ExecutorError: the environment is unknown or could not run the process.
        """
        environment = process.environment or self._default_environment
        executor, identity = await self._executor(environment)
        cache = self._cache if process.cache_scope is not ProcessCacheScope.PER_SESSION else None
        key = ""
        if cache is not None:
            key = process_cache_key(process, identity=identity, salt=self._salt)
            cached = await self._lookup(cache, key, environment)
            if cached is not None:
                return cached
            self._stats["cache_misses"] += 1
        executed = await executor.execute(process, self._store)
        self._stats["ran"] += 1
        result = self._to_result(process, executed, environment)
        if cache is not None and self._should_persist(process, result):
            if self._background is not None:
                self._background.send_nowait((key, result, executed))
            else:
                await self._persist([(key, result, executed)])
        return result

    def write_in_background(self, nursery: trio.Nursery) -> None:
        """Write process cache entries from a task in `nursery` instead of before `run` returns.

        The result does not wait for its entry to be written. The writer gathers the entries
        of processes that finish within `_WRITE_LINGER_SECONDS` of each other and writes them
        together (one transaction of the sqlite cache: measured, one transaction per entry
        cost ~0.3 ms of CPU per process, which on two cores throttled `/bin/true` throughput
        by a third). Call `stop_writing_in_background` before waiting for the nursery: the
        writer then writes what is queued and returns, so a session that ends normally has
        written every entry.
        """
        send, receive = trio.open_memory_channel[_PendingWrite](math.inf)
        self._background = send
        nursery.start_soon(self._write_queued, receive)

    def stop_writing_in_background(self) -> None:
        """Let the background writer finish the queued entries and return; later entries are
        written before `run` returns."""
        if self._background is not None:
            self._background.close()
            self._background = None

    async def _write_queued(self, receive: trio.MemoryReceiveChannel[_PendingWrite]) -> None:
        async with receive:
            ended = False
            while not ended:
                try:
                    batch = [await receive.receive()]
                except trio.EndOfChannel:
                    return
                with trio.move_on_after(_WRITE_LINGER_SECONDS):
                    while len(batch) < _WRITE_BATCH_MAX:
                        try:
                            batch.append(await receive.receive())
                        except trio.EndOfChannel:
                            ended = True
                            break
                await self._persist(batch)

    async def run_checked(self, process: Process) -> ProcessResult:
        """Run `process` (or serve it from cache) and require exit code 0.

        Raises:
            ProcessTimeout: it was killed after its timeout.
            ProcessExecutionFailure: it exited with a non-zero code (the message has the tail
                of its stderr).
            ExecutorError: the environment is unknown or could not run the process.
        """
        return check_process_result(process, await self.run(process))

    @staticmethod
    def _should_persist(process: Process, result: FallibleProcessResult) -> bool:
        if result.timed_out:
            return False
        if process.cache_scope is ProcessCacheScope.ALWAYS:
            return True
        return process.cache_scope is ProcessCacheScope.SUCCESSFUL and result.exit_code == 0

    @staticmethod
    def _to_result(
        process: Process, executed: ExecutedProcess, environment: str
    ) -> FallibleProcessResult:
        stderr = executed.stderr
        if executed.timed_out:
            stderr += _timeout_note(process)
        return FallibleProcessResult(
            executed.exit_code,
            executed.stdout,
            stderr,
            executed.output_digest,
            ProcessResultMetadata("ran", environment, executed.duration_seconds),
            timed_out=executed.timed_out,
        )

    async def _persist(self, batch: Sequence[_PendingWrite]) -> None:
        """Write cache entries; a failure is a warning (the results stand, uncached)."""
        cache = self._cache
        assert cache is not None
        writes: list[ActionWrite] = []
        for key, result, executed in batch:
            # The blobs go first: an entry must never be visible before what it names.
            try:
                stdout = await self._store_output(result.stdout)
                stderr = await self._store_output(result.stderr)
            except (CacheError, StoreError) as exc:
                logger.warning("Could not write the process cache entry %s: %s", key, exc)
                continue
            entry = _ActionEntry(
                result.exit_code, stdout, stderr, result.output_digest, executed.duration_seconds
            )
            blobs = tuple(d for d in (stdout, stderr) if isinstance(d, Digest))
            roots = (result.output_digest,) if result.output_digest != EMPTY_DIGEST else ()
            writes.append(ActionWrite(key, entry.encode(), blobs, roots))
        put_many = getattr(cache, "put_actions", None)
        if callable(put_many):
            try:
                failed: dict[str, CacheError] = await put_many(writes)
            except CacheError as exc:
                logger.warning("Could not write %d process cache entries: %s", len(writes), exc)
                return
            for key, error in failed.items():
                logger.warning("Could not write the process cache entry %s: %s", key, error)
            self._stats["cache_writes"] += len(writes) - len(failed)
            return
        for write in writes:
            try:
                await cache.put_action(
                    write.key, write.value, digests=write.digests, tree_roots=write.tree_roots
                )
            except CacheError as exc:
                logger.warning("Could not write the process cache entry %s: %s", write.key, exc)
                continue
            self._stats["cache_writes"] += 1

    async def _store_output(self, data: bytes) -> bytes | Digest:
        if len(data) <= INLINE_OUTPUT_BYTES:
            return data
        return await self._store.store_bytes(data)

    async def _load_output(self, value: bytes | Digest) -> bytes:
        if isinstance(value, bytes):
            return value
        return await self._store.load_bytes(value)

    async def _lookup(
        self, cache: ActionCache, key: str, environment: str
    ) -> FallibleProcessResult | None:
        try:
            found = await cache.get_action(key)
        except CacheError as exc:
            logger.warning("Process cache lookup failed, running the process instead: %s", exc)
            return None
        if found is None:
            return None
        data, source = found
        try:
            entry = _ActionEntry.decode(data)
        except (ValueError, KeyError, TypeError):
            logger.warning("Ignoring an unreadable process cache entry under key %s", key)
            return None
        try:
            stdout = await self._load_output(entry.stdout)
            stderr = await self._load_output(entry.stderr)
            if entry.output_digest != EMPTY_DIGEST:
                # Raises MissingDigestError unless every listing and file of the tree is there.
                await self._store.tree_blobs(entry.output_digest)
        except MissingDigestError:
            # Entries can outlive their blobs (a CAS evicted independently, a corrupt blob):
            # such an entry is a miss, and running the process rewrites it whole.
            self._stats["incomplete_cache_entries"] += 1
            return None
        self._stats["local_cache_hits" if source == "local_cache" else "remote_cache_hits"] += 1
        return FallibleProcessResult(
            entry.exit_code,
            stdout,
            stderr,
            entry.output_digest,
            ProcessResultMetadata(source, environment, entry.duration_seconds),
        )


__all__ = [
    "ActionCache",
    "FallibleProcessResult",
    "FrozenDict",
    "Process",
    "ProcessCacheScope",
    "ProcessResult",
    "ProcessResultMetadata",
    "ProcessRunner",
    "ProcessRunnerStatistics",
    "ProcessSpecError",
    "ProcessSpecTypeError",
    "check_process_result",
    "process_cache_key",
]
