"""The `reapi` cache backend: a REAPI server's ActionCache and CAS as rulework's remote cache.

Config (`[cache.reapi]`, with `remote = "reapi"`): the connection keys of the `reapi`
executor (`address`, `instance_name`, `headers`, TLS files, `timeout_seconds`,
`max_attempts`).

Mapping onto REAPI:

- Blobs are stored in the server's CAS under their SHA-256 digest; this backend remembers the
  BLAKE3 -> SHA-256 correspondence of every blob it wrote or read.
- An action entry `key -> value` is an `ActionResult` stored under the digest of a synthetic
  `Action` (whose `Command` is `["rulework-cache-entry", key]`, uploaded with it, so servers that
  check that an action exists are satisfied). The result's output file `value` holds the value;
  one output file `blobs/<blake3>-<size>` per blob of the entry's closure (the digests the cache
  layer lists in front of the value) records its SHA-256 digest. A fresh client that reads the
  entry thus learns where every blob of it lives, with one `GetActionResult`.
- `evict` forgets the correspondence (REAPI has no delete): the blob is then unknown here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

import grpc  # type: ignore[import-untyped,unused-ignore]
import trio

from ...abc import CacheStatistics
from ...engine.cache import decode_entry
from ...engine.errors import CacheBackendError, ConfigError
from ...engine.fs import Digest
from ._client import Connection, DigestMap, connection_problems, sha256_digest
from ._generated.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

_T = TypeVar("_T")

_VALUE_PATH = "value"
_BLOB_PREFIX = "blobs/"


class ReapiCacheError(CacheBackendError):
    """An RPC of the REAPI remote cache failed (the message names the server and the RPC)."""


@dataclass(frozen=True, slots=True)
class ReapiCacheConfig:
    """`[cache.reapi]`: the REAPI server used as the remote cache (see the module docstring)."""

    address: str
    instance_name: str = ""
    tls_ca_file: Path | None = None
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 30.0
    max_attempts: int = 4

    def __post_init__(self) -> None:
        problems = connection_problems(self, "cache.reapi")
        if problems:
            raise ConfigError("[cache.reapi]", problems)


def _entry_action(key: str) -> tuple[re_pb2.Digest, dict[tuple[str, int], bytes]]:
    """The digest of the synthetic Action naming entry `key`, and its blobs."""
    command = re_pb2.Command(arguments=["rulework-cache-entry", key]).SerializeToString(
        deterministic=True
    )
    empty = re_pb2.Directory().SerializeToString(deterministic=True)
    command_digest, empty_digest = sha256_digest(command), sha256_digest(empty)
    action = re_pb2.Action(
        command_digest=command_digest, input_root_digest=empty_digest
    ).SerializeToString(deterministic=True)
    action_digest = sha256_digest(action)
    blobs = {
        (command_digest.hash, command_digest.size_bytes): command,
        (action_digest.hash, action_digest.size_bytes): action,
    }
    return action_digest, blobs


def _k(digest: re_pb2.Digest) -> tuple[str, int]:
    return (digest.hash, digest.size_bytes)


class ReapiCache:
    """A `CacheBackend` over a REAPI server's ActionCache and CAS.

    Constructed as `ReapiCache(ReapiCacheConfig(address="grpc://host:port"))`.
    """

    config_type: ClassVar[type[ReapiCacheConfig]] = ReapiCacheConfig

    def __init__(self, config: ReapiCacheConfig) -> None:
        self.config = config
        self._connection = Connection(config, section="cache.reapi", error=ReapiCacheError)
        self._digests = DigestMap()
        self._counts = dict.fromkeys(CacheStatistics.__dataclass_fields__, 0)
        self._lock = trio.Lock()
        # One UpdateActionResult per key at a time from this client: casd was seen leaving no
        # readable entry after many concurrent updates of one key (12 writers, about half the
        # runs), so this process never races itself; writers in other processes still may.
        self._put_locks: dict[str, trio.Lock] = {}
        self._closed = False

    def statistics(self) -> CacheStatistics:
        """Counters since this backend was created."""
        return CacheStatistics(**self._counts)

    async def _connect(self) -> Connection:
        if self._closed:
            raise ReapiCacheError(f"The REAPI cache on {self.config.address} is closed.")
        if self._connection.capabilities is None:
            async with self._lock:
                try:
                    await self._connection.open()
                except ReapiCacheError:
                    self._counts["errors"] += 1
                    raise
        return self._connection

    async def aclose(self) -> None:
        """Close the channel; every later operation raises `ReapiCacheError`."""
        self._closed = True
        self._connection.close()

    # -- blobs -----------------------------------------------------------------------------------

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The digests the server does not hold (or whose SHA-256 this backend never learned)."""
        connection = await self._connect()
        wanted = list(dict.fromkeys(digests))
        known = {d: self._digests.get(d) for d in wanted}
        remote = [r for r in known.values() if r is not None]
        missing_remote = await self._call(connection.find_missing(remote)) if remote else set()
        return frozenset(
            d
            for d, r in known.items()
            if r is None or (r.size_bytes > 0 and _k(r) in missing_remote)
        )

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of each digest held (the store verifies them against their BLAKE3)."""
        connection = await self._connect()
        wanted = list(dict.fromkeys(digests))
        known = {d: self._digests.get(d) for d in wanted}
        remote = [r for r in known.values() if r is not None]
        found = await self._call(connection.download(remote)) if remote else {}
        result = {d: found[_k(r)] for d, r in known.items() if r is not None and _k(r) in found}
        self._counts["blob_hits"] += len(result)
        self._counts["blob_misses"] += len(wanted) - len(result)
        self._counts["bytes_read"] += sum(len(v) for v in result.values())
        return result

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Upload these blobs under their SHA-256 digests (only those the server lacks)."""
        connection = await self._connect()
        items = dict(blobs)

        def hash_all() -> dict[tuple[str, int], bytes]:
            out = {}
            for digest, data in items.items():
                remote = sha256_digest(data)
                self._digests.add(digest, remote)
                out[_k(remote)] = data
            return out

        by_remote = await trio.to_thread.run_sync(hash_all)
        missing = await self._call(
            connection.find_missing([re_pb2.Digest(hash=h, size_bytes=s) for h, s in by_remote])
        )
        upload = {k: v for k, v in by_remote.items() if k in missing}
        if upload:
            await self._call(connection.upload(upload))
        self._counts["blob_writes"] += len(upload)
        self._counts["bytes_written"] += sum(len(v) for v in upload.values())

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        """Stream one blob into `dest` (ByteStream); False when absent or unknown."""
        connection = await self._connect()
        remote = self._digests.get(digest)
        if remote is None:
            self._counts["blob_misses"] += 1
            return False
        handle = await trio.to_thread.run_sync(open, dest, "wb")
        try:
            found = await self._call(connection.read_stream(remote, handle.write))
        finally:
            await trio.to_thread.run_sync(handle.close)
        self._counts["blob_hits" if found else "blob_misses"] += 1
        if found:
            self._counts["bytes_read"] += remote.size_bytes
        return bool(found)

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        """Upload the content of `src` (known to hash to `digest`), streamed."""
        connection = await self._connect()

        def hash_file() -> re_pb2.Digest:
            hasher = hashlib.sha256()
            size = 0
            with open(src, "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
                    size += len(chunk)
            return re_pb2.Digest(hash=hasher.hexdigest(), size_bytes=size)

        remote = await trio.to_thread.run_sync(hash_file)
        self._digests.add(digest, remote)
        if _k(remote) in await self._call(connection.find_missing([remote])):
            await self._call(connection.upload_file(_k(remote), src))
            self._counts["blob_writes"] += 1
            self._counts["bytes_written"] += remote.size_bytes

    async def evict(self, digests: Iterable[Digest]) -> None:
        """Forget these blobs here (REAPI cannot delete from the server's CAS)."""
        if self._closed:
            raise ReapiCacheError(f"The REAPI cache on {self.config.address} is closed.")
        self._digests.forget(digests)

    # -- actions ---------------------------------------------------------------------------------

    async def get_action(self, key: str) -> bytes | None:
        """The value stored under `key`, or None."""
        connection = await self._connect()
        action_digest, _ = _entry_action(key)
        try:
            result: re_pb2.ActionResult = await self._call(
                connection.unary(
                    "GetActionResult",
                    connection.action_cache.GetActionResult,
                    re_pb2.GetActionResultRequest(
                        instance_name=connection.instance_name,
                        action_digest=action_digest,
                        inline_output_files=[_VALUE_PATH],
                        digest_function=connection.digest_function,
                    ),
                    what=f" of cache entry {key!r}",
                )
            )
        except ReapiCacheError as exc:
            if getattr(exc, "grpc_code", None) is grpc.StatusCode.NOT_FOUND:
                self._counts["action_misses"] += 1
                return None
            raise
        value: bytes | None = None
        for output in result.output_files:
            if output.path.startswith(_BLOB_PREFIX):
                local = _local_digest(output.path[len(_BLOB_PREFIX) :])
                if local is not None:
                    self._digests.add(local, output.digest)
            elif output.path == _VALUE_PATH:
                if output.contents or output.digest.size_bytes == 0:
                    value = output.contents
                else:
                    found = await self._call(connection.download([output.digest]))
                    value = found.get(_k(output.digest))
        if value is None or hashlib.sha256(value).hexdigest() != _value_digest(result):
            self._counts["action_misses"] += 1
            return None
        self._counts["action_hits"] += 1
        self._counts["bytes_read"] += len(value)
        return value

    async def put_action(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (an UpdateActionResult, after its blobs)."""
        lock = self._put_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                await self._put_action(key, value)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._put_locks.pop(key, None)

    async def _put_action(self, key: str, value: bytes) -> None:
        connection = await self._connect()
        if not connection.ac_update_enabled:
            raise ReapiCacheError(
                f"The REAPI server {connection.address} does not let clients write its "
                "ActionCache (action_cache_update_capabilities.update_enabled is false); set "
                "the remote cache's write = false, or give this client write access."
            )
        action_digest, blobs = _entry_action(key)
        value_digest = sha256_digest(value)
        blobs[_k(value_digest)] = value
        missing = await self._call(
            connection.find_missing([re_pb2.Digest(hash=h, size_bytes=s) for h, s in blobs])
        )
        if missing:
            await self._call(connection.upload({k: v for k, v in blobs.items() if k in missing}))
        result = re_pb2.ActionResult(exit_code=0)
        result.output_files.add(path=_VALUE_PATH, digest=value_digest)
        decoded = decode_entry(value)
        if decoded is not None:
            for digest in sorted(set(decoded[1])):
                remote = self._digests.get(digest)
                if remote is not None:
                    result.output_files.add(
                        path=f"{_BLOB_PREFIX}{digest.fingerprint}-{digest.serialized_bytes_length}",
                        digest=remote,
                    )
        await self._call(
            connection.unary(
                "UpdateActionResult",
                connection.action_cache.UpdateActionResult,
                re_pb2.UpdateActionResultRequest(
                    instance_name=connection.instance_name,
                    action_digest=action_digest,
                    action_result=result,
                    digest_function=connection.digest_function,
                ),
                what=f" of cache entry {key!r}",
            )
        )
        self._counts["action_writes"] += 1
        self._counts["bytes_written"] += len(value)

    async def _call(self, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except ReapiCacheError as exc:
            if getattr(exc, "grpc_code", None) is not grpc.StatusCode.NOT_FOUND:
                self._counts["errors"] += 1
            raise


def _value_digest(result: re_pb2.ActionResult) -> str:
    for output in result.output_files:
        if output.path == _VALUE_PATH:
            return str(output.digest.hash)
    return ""


def _local_digest(name: str) -> Digest | None:
    fingerprint, _, size = name.rpartition("-")
    try:
        return Digest(fingerprint, int(size))
    except (ValueError, TypeError):
        return None


__all__ = ["ReapiCache", "ReapiCacheConfig", "ReapiCacheError"]
