"""The `reapi` executor: runs Processes on a Remote Execution API v2 server.

Config (`[environments.NAME]` with `kind = "reapi"`):

```toml
[environments.farm]
kind = "reapi"
address = "grpcs://remote.example.com:443"   # or grpc://host:port for plaintext
instance_name = "main"
headers = { authorization = "Bearer ..." }   # sent with every call
tls_ca_file = "~/ca.pem"                      # optional; client cert/key for mTLS too
platform = { OSFamily = "linux", container-image = "docker://..." }
parallelism = 16
timeout_seconds = 30                          # one small RPC (uploads scale with size)
max_attempts = 4                              # on UNAVAILABLE / RESOURCE_EXHAUSTED
sandbox_subdirectory = ""                     # run in this subdirectory of the input root
cache_read = true                             # use results from the server's ActionCache
cache_write = true                            # let the server cache results (do_not_cache)
```

A Process becomes a `Command` (argv, env sorted by name, working directory, output paths,
platform) and an `Action` (command and input root digests, timeout, `do_not_cache` for
`PER_SESSION` processes). Blobs the server lacks are uploaded (`FindMissingBlobs`, then
`BatchUpdateBlobs` or ByteStream), `GetActionResult` is asked first so a cached action never
runs, then `Execute` is streamed until the operation is done. Outputs, stdout and stderr are
fetched into the local store. A `FAILED_PRECONDITION` from Execute (blobs evicted from the
server's CAS meanwhile) re-uploads what is missing and retries.

`sandbox_subdirectory`: some servers (buildbox-casd with bubblewrap) make the input root the
sandbox's `/`, with system directories mounted into it; set e.g. "work" to give processes a
working directory that holds exactly their inputs.

Cancellation cancels the Execute call and asks the server to cancel the operation
(`CancelOperation`); the server kills the remote command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import grpc  # type: ignore[import-untyped,unused-ignore]
import trio

from ...abc import ExecutedProcess
from ...engine.errors import ConfigError, ExecutorError
from ...engine.fs import EMPTY_DIGEST, CreateDigest, Digest, Directory, FileEntry
from ._client import Connection, DigestMap, connection_problems, sha256_digest
from ._generated.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from ._generated.google.rpc import status_pb2

if TYPE_CHECKING:
    from ...engine.process import Process
    from ...engine.store import Store

logger = logging.getLogger(__name__)

_FAILED_PRECONDITION_RETRIES = 2
_EXECUTE_UNAVAILABLE_RETRIES = 3


class ReapiExecutorError(ExecutorError):
    """An RPC to the REAPI server failed, or the server could not run an action."""


@dataclass(frozen=True, slots=True)
class ReapiExecutorConfig:
    """Settings of a `kind = "reapi"` environment (see the module docstring)."""

    address: str
    instance_name: str = ""
    tls_ca_file: Path | None = None
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 30.0
    max_attempts: int = 4
    platform: dict[str, str] = field(default_factory=dict)
    parallelism: int = 8
    sandbox_subdirectory: str = ""
    cache_read: bool = True
    cache_write: bool = True

    def __post_init__(self) -> None:
        problems = connection_problems(self, "environments.reapi")
        if (
            isinstance(self.parallelism, bool)
            or not isinstance(self.parallelism, int)
            or (self.parallelism < 1)
        ):
            problems.append(
                (
                    "environments.reapi.parallelism",
                    f"must be at least 1, found {self.parallelism!r}",
                )
            )
        if not isinstance(self.platform, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.platform.items()
        ):
            problems.append(
                (
                    "environments.reapi.platform",
                    f"must be a table of strings, found {self.platform!r}",
                )
            )
        for name in ("cache_read", "cache_write"):
            if not isinstance(getattr(self, name), bool):
                problems.append(
                    (
                        f"environments.reapi.{name}",
                        f"must be true or false, found {getattr(self, name)!r}",
                    )
                )
        sub = self.sandbox_subdirectory
        if (
            not isinstance(sub, str)
            or sub.startswith("/")
            or ".." in sub.split("/")
            or (sub and "" in sub.split("/"))
        ):
            problems.append(
                (
                    "environments.reapi.sandbox_subdirectory",
                    f"must be a relative path without '..' (or \"\"), found {sub!r}",
                )
            )
        if problems:
            raise ConfigError("[environments.reapi]", problems)


@dataclass(frozen=True, slots=True)
class ReapiExecutorStatistics:
    """Counters of one `ReapiExecutor` since it was opened."""

    executed: int = 0
    """Actions the server ran (Execute without a cached result)."""
    action_cache_hits: int = 0
    """Actions served from the server's ActionCache (GetActionResult or a cached Execute)."""
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0
    blobs_downloaded: int = 0
    bytes_downloaded: int = 0
    precondition_retries: int = 0


@dataclass(slots=True)
class _Prepared:
    action_digest: re_pb2.Digest
    # Blobs the action needs, by SHA-256 key: their bytes when known without a store read,
    # else the local BLAKE3 digest to load them from.
    blobs: dict[tuple[str, int], bytes | Digest]


class ReapiExecutor:
    """Runs Processes on a REAPI v2 server (Buildbarn, BuildGrid, BuildBuddy, buildbox-casd...).

    Constructed as `ReapiExecutor(name, ReapiExecutorConfig(address=...))`.
    """

    config_type: ClassVar[type[ReapiExecutorConfig]] = ReapiExecutorConfig

    def __init__(self, name: str, config: ReapiExecutorConfig) -> None:
        self.name = name
        self.config = config
        self.parallelism = config.parallelism
        self._limiter = trio.CapacityLimiter(self.parallelism)
        self._connection = Connection(
            config, section=f"environments.{name}", error=ReapiExecutorError
        )
        self._digests = DigestMap()
        self._counts = dict.fromkeys(ReapiExecutorStatistics.__dataclass_fields__, 0)
        self._opened = False

    @property
    def address(self) -> str:
        return self.config.address

    def statistics(self) -> ReapiExecutorStatistics:
        """Counters since this executor was created."""
        return ReapiExecutorStatistics(**self._counts)

    async def open(self, store: Store) -> None:
        """Connect to the server and check that it executes actions with SHA-256."""
        await self._connection.open()
        if not self._connection.exec_enabled:
            self._connection.close()
            raise ReapiExecutorError(
                f"The REAPI server {self.address} (environment {self.name!r}) does not offer "
                "remote execution (exec_enabled is false in its capabilities); use it as a "
                'remote cache (`remote = "reapi"`) instead.'
            )
        self._opened = True

    async def identity(self) -> str:
        """ "reapi:<instance>;platform=<hash>": results of other platforms never mix."""
        material = json.dumps(sorted(self.config.platform.items())).encode()
        return (
            f"reapi:{self.config.instance_name};"
            f"platform={hashlib.sha256(material).hexdigest()[:32]}"
        )

    async def aclose(self) -> None:
        """Close the channel."""
        self._opened = False
        self._connection.close()

    # -- execution -------------------------------------------------------------------------------

    async def execute(self, process: Process, store: Store) -> ExecutedProcess:
        """Run `process` remotely (or take its result from the server's ActionCache).

        Raises:
            ReapiExecutorError: an RPC failed (naming the server and RPC), the server could not
                run the action, or the program does not exist on the server.
        """
        if not self._opened:
            await self.open(store)
        async with self._limiter:
            started = time.monotonic()
            prepared = await self._prepare(process, store)
            await self._upload_missing(prepared, store)
            cacheable = self.config.cache_read and process.cache_scope.name != "PER_SESSION"
            result: re_pb2.ActionResult | None = None
            status = status_pb2.Status()
            if cacheable:
                result = await self._cached_result(process, prepared.action_digest)
            if result is None:
                result, status = await self._execute_remote(process, prepared, store)
            else:
                self._counts["action_cache_hits"] += 1
            return await self._to_executed(process, result, status, store, started)

    def _command(self, process: Process) -> re_pb2.Command:
        sub = self.config.sandbox_subdirectory
        workdir = "/".join(p for p in (sub, process.working_directory or "") if p and p != ".")
        command = re_pb2.Command(arguments=process.argv, working_directory=workdir)
        for key in sorted(process.env):
            command.environment_variables.add(name=key, value=process.env[key])
        outputs = [
            ("" if p == "." else p) for p in (*process.output_files, *process.output_directories)
        ]
        if self._connection.api_version >= (2, 1):
            command.output_paths.extend(sorted(set(outputs)))
        else:
            command.output_files.extend(sorted(set(process.output_files)))
            command.output_directories.extend(
                sorted({"" if p == "." else p for p in process.output_directories})
            )
        for key in sorted(self.config.platform):
            command.platform.properties.add(name=key, value=self.config.platform[key])
        return command

    async def _prepare(self, process: Process, store: Store) -> _Prepared:
        blobs: dict[tuple[str, int], bytes | Digest] = {}
        root = await self._input_root(process.input_digest, store, blobs)
        sub = self.config.sandbox_subdirectory
        if sub:
            for name in reversed(sub.split("/")):
                data = root.SerializeToString(deterministic=True)
                digest = sha256_digest(data)
                blobs[(digest.hash, digest.size_bytes)] = data
                root = re_pb2.Directory(
                    directories=[re_pb2.DirectoryNode(name=name, digest=digest)]
                )
        root_bytes = root.SerializeToString(deterministic=True)
        root_digest = sha256_digest(root_bytes)
        blobs[(root_digest.hash, root_digest.size_bytes)] = root_bytes
        command_bytes = self._command(process).SerializeToString(deterministic=True)
        command_digest = sha256_digest(command_bytes)
        blobs[(command_digest.hash, command_digest.size_bytes)] = command_bytes
        action = re_pb2.Action(
            command_digest=command_digest,
            input_root_digest=root_digest,
            do_not_cache=not self.config.cache_write or process.cache_scope.name == "PER_SESSION",
        )
        if process.timeout_seconds is not None:
            seconds = math.floor(process.timeout_seconds)
            action.timeout.seconds = seconds
            action.timeout.nanos = int((process.timeout_seconds - seconds) * 1e9)
        for key in sorted(self.config.platform):
            action.platform.properties.add(name=key, value=self.config.platform[key])
        action_bytes = action.SerializeToString(deterministic=True)
        action_digest = sha256_digest(action_bytes)
        blobs[(action_digest.hash, action_digest.size_bytes)] = action_bytes
        return _Prepared(action_digest, blobs)

    async def _input_root(
        self, digest: Digest, store: Store, blobs: dict[tuple[str, int], bytes | Digest]
    ) -> re_pb2.Directory:
        """The REAPI Directory tree of a local tree; its blobs are added to `blobs`."""
        if digest == EMPTY_DIGEST:
            return re_pb2.Directory()
        entries = await store.entries(digest)
        files = [e for e in entries if isinstance(e, FileEntry)]
        unknown = [f.file_digest for f in files if self._digests.get(f.file_digest) is None]
        if unknown:
            await self._learn(unknown, store, blobs)
        # Build the directories deepest first, so a parent knows its children's digests.
        listings: dict[str, re_pb2.Directory] = {"": re_pb2.Directory()}
        for entry in entries:
            if isinstance(entry, Directory):
                listings.setdefault(entry.path, re_pb2.Directory())
        for entry in files:
            parent, _, name = entry.path.rpartition("/")
            remote = self._digests.get(entry.file_digest)
            assert remote is not None
            listings.setdefault(parent, re_pb2.Directory()).files.add(
                name=name, digest=remote, is_executable=entry.is_executable
            )
            blobs.setdefault((remote.hash, remote.size_bytes), entry.file_digest)
        for path in sorted(listings, key=lambda p: p.count("/") if p else -1, reverse=True):
            listing = listings[path]
            listing.files.sort(key=lambda node: node.name.encode())
            listing.directories.sort(key=lambda node: node.name.encode())
            if not path:
                continue
            data = listing.SerializeToString(deterministic=True)
            remote = sha256_digest(data)
            blobs[(remote.hash, remote.size_bytes)] = data
            parent, _, name = path.rpartition("/")
            listings.setdefault(parent, re_pb2.Directory()).directories.add(
                name=name, digest=remote
            )
        root = listings[""]
        root.directories.sort(key=lambda node: node.name.encode())
        return root

    async def _learn(
        self, digests: list[Digest], store: Store, blobs: dict[tuple[str, int], bytes | Digest]
    ) -> None:
        """Hash these local blobs with SHA-256 (their bytes are kept for the upload)."""
        distinct = list(dict.fromkeys(digests))
        for start in range(0, len(distinct), 256):
            chunk = distinct[start : start + 256]
            loaded = {d: await store.load_bytes(d) for d in chunk}

            def hash_all(loaded: dict[Digest, bytes] = loaded) -> None:
                for local, data in loaded.items():
                    remote = sha256_digest(data)
                    self._digests.add(local, remote)
                    blobs[(remote.hash, remote.size_bytes)] = data

            await trio.to_thread.run_sync(hash_all)

    async def _upload_missing(self, prepared: _Prepared, store: Store) -> None:
        keys = list(prepared.blobs)
        missing = await self._connection.find_missing(
            [re_pb2.Digest(hash=h, size_bytes=s) for h, s in keys]
        )
        if not missing:
            return
        data: dict[tuple[str, int], bytes] = {}
        for key in missing:
            value = prepared.blobs[key]
            if isinstance(value, Digest):
                # Known mapping, but the server lost the blob (evicted, deleted): re-read it.
                value = await store.load_bytes(value)
            data[key] = value
        await self._connection.upload(data)
        self._counts["blobs_uploaded"] += len(data)
        self._counts["bytes_uploaded"] += sum(len(v) for v in data.values())

    async def _cached_result(
        self, process: Process, action_digest: re_pb2.Digest
    ) -> re_pb2.ActionResult | None:
        try:
            result: re_pb2.ActionResult = await self._connection.unary(
                "GetActionResult",
                self._connection.action_cache.GetActionResult,
                re_pb2.GetActionResultRequest(
                    instance_name=self.config.instance_name,
                    action_digest=action_digest,
                    inline_stdout=True,
                    inline_stderr=True,
                    digest_function=self._connection.digest_function,
                ),
            )
        except ReapiExecutorError as exc:
            if getattr(exc, "grpc_code", None) is grpc.StatusCode.NOT_FOUND:
                return None
            raise
        # Servers may cache failures; only `ALWAYS` processes may reuse one.
        if result.exit_code != 0 and process.cache_scope.name != "ALWAYS":
            return None
        return result

    async def _execute_remote(
        self, process: Process, prepared: _Prepared, store: Store
    ) -> tuple[re_pb2.ActionResult, status_pb2.Status]:
        preconditions = 0
        unavailable = 0
        while True:
            try:
                response = await self._execute_once(prepared)
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED) and (
                    unavailable < _EXECUTE_UNAVAILABLE_RETRIES
                ):
                    unavailable += 1
                    await trio.sleep(0.2 * 2**unavailable)
                    continue
                if code is grpc.StatusCode.FAILED_PRECONDITION and (
                    preconditions < _FAILED_PRECONDITION_RETRIES
                ):
                    preconditions += 1
                    self._counts["precondition_retries"] += 1
                    await self._upload_missing(prepared, store)
                    continue
                raise self._connection.failure(
                    "Execute", exc, f" of '{process.description or process.argv[0]}'"
                ) from None
            status = response.status
            if status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and (
                preconditions < _FAILED_PRECONDITION_RETRIES
            ):
                preconditions += 1
                self._counts["precondition_retries"] += 1
                await self._upload_missing(prepared, store)
                continue
            if response.cached_result:
                self._counts["action_cache_hits"] += 1
            else:
                self._counts["executed"] += 1
            return response.result, status

    async def _execute_once(self, prepared: _Prepared) -> re_pb2.ExecuteResponse:
        request = re_pb2.ExecuteRequest(
            instance_name=self.config.instance_name,
            action_digest=prepared.action_digest,
            # GetActionResult was asked already (or the result must not come from a cache).
            skip_cache_lookup=True,
            digest_function=self._connection.digest_function,
            inline_stdout=True,
            inline_stderr=True,
        )
        call = self._connection.execution.Execute(request, metadata=self._connection.metadata)
        operation_name = ""
        final: list[Any] = []

        def consume(operation: Any) -> bool:
            nonlocal operation_name
            operation_name = operation.name or operation_name
            if operation.done:
                final.append(operation)
                return True
            return False

        try:
            await self._connection.stream(call, consume)
        except BaseException as exc:
            if not isinstance(exc, grpc.RpcError):
                # Cancelled (or failed on our side): the remote command must not run on.
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 10):
                    await self._connection.cancel_operation(operation_name)
            raise
        if not final:
            raise ReapiExecutorError(
                f"REAPI Execute on {self.address}: the operation stream ended before the "
                "operation was done."
            )
        operation = final[0]
        if operation.HasField("error"):
            raise ReapiExecutorError(
                f"REAPI Execute on {self.address} failed: status {operation.error.code}: "
                f"{operation.error.message}."
            )
        response = re_pb2.ExecuteResponse()
        if not operation.response.Unpack(response):
            raise ReapiExecutorError(
                f"REAPI Execute on {self.address} returned an operation without an ExecuteResponse."
            )
        return response

    # -- results ---------------------------------------------------------------------------------

    async def _to_executed(
        self,
        process: Process,
        result: re_pb2.ActionResult,
        status: status_pb2.Status,
        store: Store,
        started: float,
    ) -> ExecutedProcess:
        timed_out = status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        if status.code not in (0, grpc.StatusCode.DEADLINE_EXCEEDED.value[0]):
            raise ReapiExecutorError(
                f"The REAPI server {self.address} could not run "
                f"'{process.description or process.argv[0]}' (environment {self.name!r}): "
                f"status {status.code}: {status.message}."
            )
        wanted: list[re_pb2.Digest] = []
        if not result.stdout_raw and result.stdout_digest.size_bytes:
            wanted.append(result.stdout_digest)
        if not result.stderr_raw and result.stderr_digest.size_bytes:
            wanted.append(result.stderr_digest)
        trees = [d.tree_digest for d in result.output_directories]
        fetched = await self._fetch(wanted + trees)
        stdout = result.stdout_raw or fetched.get(_k(result.stdout_digest), b"")
        stderr = result.stderr_raw or fetched.get(_k(result.stderr_digest), b"")
        exit_code = result.exit_code
        if exit_code == 1 and not stdout and stderr.startswith(b"bwrap: execvp "):
            # bubblewrap-based runners (buildbox-run) report a program they cannot start so.
            raise ReapiExecutorError(
                f"Cannot run {process.argv[0]!r} for '{process.description}' in environment "
                f"{self.name!r} ({self.address}): {stderr.decode(errors='replace').strip()}. "
                "Give an absolute path, or set PATH in Process.env."
            )
        if timed_out and exit_code == 0:
            exit_code = -9
        output_digest = await self._outputs(result, fetched, store)
        duration = _duration(result) or (time.monotonic() - started)
        return ExecutedProcess(exit_code, stdout, stderr, output_digest, duration, timed_out)

    async def _fetch(self, digests: list[re_pb2.Digest]) -> dict[tuple[str, int], bytes]:
        if not digests:
            return {}
        found = await self._connection.download(digests)
        missing = [d for d in digests if _k(d) not in found]
        if missing:
            raise ReapiExecutorError(
                f"The REAPI server {self.address} lost blob {missing[0].hash}/"
                f"{missing[0].size_bytes} of an action result (evicted from its CAS?)."
            )
        self._counts["blobs_downloaded"] += len(found)
        self._counts["bytes_downloaded"] += sum(len(v) for v in found.values())
        return found

    async def _outputs(
        self,
        result: re_pb2.ActionResult,
        fetched: dict[tuple[str, int], bytes],
        store: Store,
    ) -> Digest:
        files: list[tuple[str, re_pb2.Digest, bool]] = []
        directories: list[str] = []
        for output in result.output_files:
            files.append((output.path, output.digest, output.is_executable))
        for output in result.output_directories:
            tree = re_pb2.Tree.FromString(fetched[_k(output.tree_digest)])
            children = {
                _k(sha256_digest(child.SerializeToString(deterministic=True))): child
                for child in tree.children
            }
            prefix = "" if output.path in ("", ".") else output.path
            if prefix:
                directories.append(prefix)
            self._walk_tree(tree.root, prefix, children, files, directories)
        if (
            result.output_symlinks
            or result.output_file_symlinks
            or result.output_directory_symlinks
        ):
            logger.warning(
                "The REAPI server %s returned symlinks among the outputs; they are left out.",
                self.address,
            )
        if not files and not directories:
            return EMPTY_DIGEST
        contents = await self._fetch([d for _, d, _ in files])
        local: dict[tuple[str, int], Digest] = {}
        for key, data in contents.items():
            digest = await store.store_bytes(data)
            self._digests.add(digest, re_pb2.Digest(hash=key[0], size_bytes=key[1]))
            local[key] = digest
        entries: list[FileEntry | Directory] = [
            FileEntry(path, local[_k(d)], executable) for path, d, executable in files
        ]
        entries.extend(Directory(path) for path in directories)
        return await store.create_digest(CreateDigest(entries))

    def _walk_tree(
        self,
        directory: re_pb2.Directory,
        prefix: str,
        children: dict[tuple[str, int], re_pb2.Directory],
        files: list[tuple[str, re_pb2.Digest, bool]],
        directories: list[str],
    ) -> None:
        for node in directory.files:
            files.append((_join(prefix, node.name), node.digest, node.is_executable))
        for node in directory.directories:
            path = _join(prefix, node.name)
            directories.append(path)
            child = children.get(_k(node.digest))
            if child is None:
                raise ReapiExecutorError(
                    f"The REAPI server {self.address} returned an output tree without its "
                    f"directory {path!r}."
                )
            self._walk_tree(child, path, children, files, directories)


def _k(digest: re_pb2.Digest) -> tuple[str, int]:
    return (digest.hash, digest.size_bytes)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _duration(result: re_pb2.ActionResult) -> float:
    meta = result.execution_metadata
    start, end = meta.execution_start_timestamp, meta.execution_completed_timestamp
    if not start.seconds or not end.seconds:
        return 0.0
    return max(0.0, float((end.seconds - start.seconds) + (end.nanos - start.nanos) / 1e9))


__all__ = [
    "ReapiExecutor",
    "ReapiExecutorConfig",
    "ReapiExecutorError",
    "ReapiExecutorStatistics",
]
