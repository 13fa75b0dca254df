"""The gRPC side of the REAPI backends: one connection, retries, error translation, the CAS.

grpc's asyncio API needs asyncio, so it cannot run on trio. Unary calls are issued with
`.future()` and awaited through a done-callback that wakes the trio task (no thread is held
while waiting); streaming responses are read in worker threads. Either way a cancelled trio
task cancels its RPC (`call.cancel()`), so nothing keeps running on our side.

The local store is keyed by BLAKE3; REAPI servers key their CAS by the digest function they
advertise in `GetCapabilities` (SHA-256 is the one every server has). `DigestMap` remembers,
for this process, which SHA-256 digest each BLAKE3 digest's bytes have, so a blob is hashed
again only the first time it crosses the boundary.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc  # type: ignore[import-untyped,unused-ignore]
import trio

from ...engine.errors import ConfigError
from ...engine.fs import Digest
from ._generated.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from ._generated.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as _re_grpc
from ._generated.google.bytestream import bytestream_pb2
from ._generated.google.bytestream import bytestream_pb2_grpc as _bytestream_grpc
from ._generated.google.longrunning import operations_pb2
from ._generated.google.longrunning import operations_pb2_grpc as _operations_grpc

# The generated service stubs are untyped (grpc has no type information): use them as Any.
re_grpc: Any = _re_grpc
bytestream_pb2_grpc: Any = _bytestream_grpc
operations_pb2_grpc: Any = _operations_grpc

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_MiB = 1024 * 1024

# gRPC's default message limit is 4 MiB; batches stay well under it (protobuf framing included).
_DEFAULT_BATCH_BYTES = 4 * _MiB - 64 * 1024
# ByteStream chunks.
_CHUNK_BYTES = 1 * _MiB
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_BACKOFF_BASE_SECONDS = 0.1
_BACKOFF_MAX_SECONDS = 5.0

ErrorFactory = Callable[[str], Exception]


@dataclass(frozen=True, slots=True)
class ReapiConnectionConfig:
    """How to reach a REAPI server (the keys shared by `kind = "reapi"` and `[cache.reapi]`).

    Attributes:
        address: `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS).
        instance_name: the server's instance name (often "" or "main").
        tls_ca_file: PEM CA certificates to check a grpcs server with (default: system roots).
        tls_client_cert_file / tls_client_key_file: PEM client certificate and key (mTLS).
        headers: metadata sent with every call, e.g. {"authorization": "Bearer ..."}.
        timeout_seconds: deadline of one small RPC (FindMissingBlobs, GetActionResult...).
        max_attempts: tries per RPC on UNAVAILABLE / RESOURCE_EXHAUSTED, with backoff.
    """

    address: str
    instance_name: str = ""
    tls_ca_file: Path | None = None
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float = 30.0
    max_attempts: int = 4


def connection_problems(config: Any, section: str) -> list[tuple[str, str]]:
    """Every problem of the connection keys of `config` (a dataclass with those fields)."""
    problems: list[tuple[str, str]] = []

    def problem(name: str, message: str) -> None:
        problems.append((f"{section}.{name}", message))

    address = config.address
    if not isinstance(address, str) or not address:
        problem("address", f"must be 'grpc://host:port' or 'grpcs://host:port', found {address!r}")
    else:
        parts = urlsplit(address)
        if (
            parts.scheme not in ("grpc", "grpcs")
            or not parts.hostname
            or parts.path not in ("", "/")
        ):
            problem(
                "address",
                f"must be 'grpc://host:port' or 'grpcs://host:port', found {address!r}",
            )
        else:
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                problem("address", f"has an invalid port: {address!r}")
    if not isinstance(config.instance_name, str):
        problem("instance_name", f"must be a string, found {config.instance_name!r}")
    for name in ("tls_ca_file", "tls_client_cert_file", "tls_client_key_file"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, Path):
            problem(name, f"must be a file path, found {value!r}")
    if (config.tls_client_cert_file is None) != (config.tls_client_key_file is None):
        problem("tls_client_cert_file", "and tls_client_key_file must be given together")
    if not isinstance(config.headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.headers.items()
    ):
        problem("headers", f"must be a table of strings, found {config.headers!r}")
    else:
        for key in config.headers:
            if not key or key != key.lower() or not all(c.isalnum() or c in "-_." for c in key):
                problem("headers", f"{key!r} is not a valid gRPC metadata key (lowercase, -_.)")
    timeout = config.timeout_seconds
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        problem("timeout_seconds", f"must be a positive number, found {timeout!r}")
    attempts = config.max_attempts
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        problem("max_attempts", f"must be an integer of at least 1, found {attempts!r}")
    return problems


def sha256_digest(data: bytes | memoryview) -> re_pb2.Digest:
    """The REAPI (SHA-256) digest of `data`."""
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _key(digest: re_pb2.Digest) -> tuple[str, int]:
    return (digest.hash, digest.size_bytes)


class DigestMap:
    """BLAKE3 (local) -> SHA-256 (remote) digests of the same bytes, learned this session.

    Thread-safe: it is filled from worker threads that hash blobs.
    """

    _LIMIT = 2_000_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Invariant: every entry maps a BLAKE3 digest to the SHA-256 digest of the same bytes
        # (each was computed from, or verified against, those bytes).
        self._to_remote: dict[Digest, tuple[str, int]] = {}

    def get(self, digest: Digest) -> re_pb2.Digest | None:
        found = self._to_remote.get(digest)
        return None if found is None else re_pb2.Digest(hash=found[0], size_bytes=found[1])

    def add(self, digest: Digest, remote: re_pb2.Digest) -> None:
        with self._lock:
            if len(self._to_remote) > self._LIMIT:
                self._to_remote.clear()
            self._to_remote[digest] = _key(remote)

    def forget(self, digests: Iterable[Digest]) -> None:
        with self._lock:
            for digest in digests:
                self._to_remote.pop(digest, None)


class Connection:
    """One gRPC channel to a REAPI server, with retries and errors that name the server and RPC.

    `error` builds the exception raised for a failed RPC (an `ExecutorError` subclass for the
    executor, a `CacheBackendError` subclass for the cache).
    """

    def __init__(self, config: Any, *, section: str, error: ErrorFactory) -> None:
        problems = connection_problems(config, section)
        if problems:
            raise ConfigError(f"[{section}]", problems)
        self.config = config
        self.address: str = config.address
        self.instance_name: str = config.instance_name
        self._error = error
        self._metadata = tuple(sorted(config.headers.items()))
        self._channel: grpc.Channel | None = None
        self.capabilities: re_pb2.ServerCapabilities | None = None
        self.max_batch_bytes = _DEFAULT_BATCH_BYTES
        self.digest_function = re_pb2.DigestFunction.SHA256
        self.ac_update_enabled = True
        self.exec_enabled = False
        self.api_version = (2, 0)

    # -- channel ---------------------------------------------------------------------------------

    def _open_channel(self) -> grpc.Channel:
        parts = urlsplit(self.address)
        target = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'grpcs' else 80)}"
        if ":" in (parts.hostname or ""):
            target = f"[{parts.hostname}]:{parts.port}"
        options = [
            ("grpc.max_receive_message_length", 64 * _MiB),
            ("grpc.max_send_message_length", 64 * _MiB),
            # Reconnect quickly after a server restart rather than waiting out a long backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if parts.scheme == "grpcs":
            config = self.config

            def read(path: Path | None) -> bytes | None:
                if path is None:
                    return None
                try:
                    return path.expanduser().read_bytes()
                except OSError as exc:
                    raise self._error(
                        f"Cannot read the TLS file {str(path)!r} for the REAPI server "
                        f"{self.address}: {exc.strerror}."
                    ) from exc

            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(config.tls_ca_file),
                private_key=read(config.tls_client_key_file),
                certificate_chain=read(config.tls_client_cert_file),
            )
            return grpc.secure_channel(target, credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            raise self._error(f"The connection to the REAPI server {self.address} is closed.")
        return self._channel

    async def open(self) -> None:
        """Connect and read the server's capabilities (digest function, batch size, API)."""
        if self._channel is not None:
            return
        self._channel = self._open_channel()
        try:
            caps = await self.unary(
                "GetCapabilities",
                re_grpc.CapabilitiesStub(self.channel).GetCapabilities,
                re_pb2.GetCapabilitiesRequest(instance_name=self.instance_name),
            )
        except BaseException:
            self.close()
            raise
        self.capabilities = caps
        functions = set(caps.cache_capabilities.digest_functions)
        if caps.execution_capabilities.digest_function:
            functions.add(caps.execution_capabilities.digest_function)
        if functions and re_pb2.DigestFunction.SHA256 not in functions:
            self.close()
            names = ", ".join(re_pb2.DigestFunction.Value.Name(f) for f in sorted(functions))
            raise self._error(
                f"The REAPI server {self.address} supports the digest functions {names}; "
                "rulework talks SHA-256 to REAPI servers. Configure the server for SHA256."
            )
        if caps.cache_capabilities.max_batch_total_size_bytes > 0:
            self.max_batch_bytes = min(
                _DEFAULT_BATCH_BYTES, caps.cache_capabilities.max_batch_total_size_bytes - 1024
            )
        self.ac_update_enabled = (
            caps.cache_capabilities.action_cache_update_capabilities.update_enabled
        )
        self.exec_enabled = caps.execution_capabilities.exec_enabled
        high = caps.high_api_version
        self.api_version = (high.major, high.minor) if high.major else (2, 0)

    def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    # -- calls -----------------------------------------------------------------------------------

    def failure(self, rpc: str, exc: grpc.RpcError, what: str = "") -> Exception:
        """The rulework error for a failed RPC: names the server, the RPC, the status."""
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code is not None else "ERROR"
        hint = ""
        if code is grpc.StatusCode.UNAVAILABLE:
            hint = " Is the server running and the address right?"
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
            hint = " The server did not answer in time (timeout_seconds)."
        elif code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            hint = " Check the credentials in `headers` / the TLS files."
        message = (
            f"REAPI {rpc}{what} on {self.address}"
            f"{' instance ' + repr(self.instance_name) if self.instance_name else ''} "
            f"failed: {name}: {details}.{hint}"
        )
        error = self._error(message)
        setattr(error, "grpc_code", code)  # noqa: B010 - the error class is the caller's
        return error

    async def _backoff(self, attempt: int) -> None:
        delay = min(_BACKOFF_MAX_SECONDS, _BACKOFF_BASE_SECONDS * 2**attempt)
        await trio.sleep(delay * (0.5 + random.random() / 2))

    async def unary(
        self,
        rpc: str,
        method: Any,
        request: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a gRPC deadline
        what: str = "",
        retry: bool = True,
    ) -> Any:
        """Call a unary RPC, retrying UNAVAILABLE / RESOURCE_EXHAUSTED with backoff.

        Raises:
            The connection's error type, naming the server and `rpc`; grpc.RpcError never leaves.
        """
        attempts = self.config.max_attempts if retry else 1
        for attempt in range(attempts):
            try:
                return await self._unary_once(method, request, timeout)
            except grpc.RpcError as exc:
                if exc.code() in _RETRYABLE and attempt + 1 < attempts:
                    logger.debug("REAPI %s on %s: %s; retrying", rpc, self.address, exc)
                    await self._backoff(attempt)
                    continue
                raise self.failure(rpc, exc, what) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _unary_once(
        self,
        method: Any,
        request: Any,
        timeout: float | None,  # noqa: ASYNC109 - a gRPC deadline
    ) -> Any:
        future = method.future(
            request,
            timeout=self.config.timeout_seconds if timeout is None else timeout,
            metadata=self._metadata,
        )
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            # RunFinishedError: the caller's run ended meanwhile (it was cancelled).
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    async def stream(self, call: Any, consume: Callable[[Any], bool]) -> None:
        """Read a server-streaming `call` in a worker thread, passing each message to `consume`
        (on the trio side) until it returns True or the stream ends. Cancels the call when the
        trio task is cancelled. grpc.RpcError propagates (the caller names the RPC)."""
        iterator: Iterator[Any] = iter(call)
        sentinel = object()
        try:
            while True:
                message = await trio.to_thread.run_sync(
                    next, iterator, sentinel, abandon_on_cancel=True
                )
                if message is sentinel or consume(message):
                    return
        finally:
            call.cancel()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    # -- stubs -----------------------------------------------------------------------------------

    @property
    def cas(self) -> Any:
        return re_grpc.ContentAddressableStorageStub(self.channel)

    @property
    def action_cache(self) -> Any:
        return re_grpc.ActionCacheStub(self.channel)

    @property
    def execution(self) -> Any:
        return re_grpc.ExecutionStub(self.channel)

    @property
    def operations(self) -> Any:
        return operations_pb2_grpc.OperationsStub(self.channel)

    @property
    def bytestream(self) -> Any:
        return bytestream_pb2_grpc.ByteStreamStub(self.channel)

    # -- CAS -------------------------------------------------------------------------------------

    async def find_missing(self, digests: Sequence[re_pb2.Digest]) -> set[tuple[str, int]]:
        """The (hash, size) of the digests the server does not hold."""
        missing: set[tuple[str, int]] = set()
        wanted = [d for d in {_key(d): d for d in digests if d.size_bytes > 0}.values()]
        for start in range(0, len(wanted), 10_000):
            response = await self.unary(
                "FindMissingBlobs",
                self.cas.FindMissingBlobs,
                re_pb2.FindMissingBlobsRequest(
                    instance_name=self.instance_name,
                    blob_digests=wanted[start : start + 10_000],
                    digest_function=self.digest_function,
                ),
            )
            missing.update(_key(d) for d in response.missing_blob_digests)
        return missing

    async def upload(self, blobs: Mapping[tuple[str, int], bytes]) -> None:
        """Upload blobs (keyed by SHA-256 (hash, size)): batches, ByteStream for large ones."""
        batch: list[tuple[tuple[str, int], bytes]] = []
        size = 0
        jobs: list[Callable[[], Awaitable[None]]] = []
        for key, data in blobs.items():
            if key[1] == 0:
                continue
            if len(data) > self.max_batch_bytes // 2:
                jobs.append(lambda key=key, data=data: self._write_stream(key, data))  # type: ignore[misc]
                continue
            if size + len(data) > self.max_batch_bytes and batch:
                jobs.append(lambda batch=batch: self._batch_update(batch))  # type: ignore[misc]
                batch, size = [], 0
            batch.append((key, data))
            size += len(data) + 200
        if batch:
            jobs.append(lambda batch=batch: self._batch_update(batch))  # type: ignore[misc]
        await run_all(jobs)

    async def _batch_update(self, batch: Sequence[tuple[tuple[str, int], bytes]]) -> None:
        request = re_pb2.BatchUpdateBlobsRequest(
            instance_name=self.instance_name, digest_function=self.digest_function
        )
        for (hash_, size), data in batch:
            request.requests.add(digest=re_pb2.Digest(hash=hash_, size_bytes=size), data=data)
        nbytes = sum(len(data) for _, data in batch)
        response = await self.unary(
            "BatchUpdateBlobs",
            self.cas.BatchUpdateBlobs,
            request,
            timeout=self.config.timeout_seconds + nbytes / _MiB,
        )
        failed = [r for r in response.responses if r.status.code != 0]
        if failed:
            first = failed[0]
            raise self._error(
                f"REAPI BatchUpdateBlobs on {self.address} refused {len(failed)} blob(s), e.g. "
                f"{first.digest.hash}/{first.digest.size_bytes}: status {first.status.code}: "
                f"{first.status.message}."
            )

    def _resource(self, key: tuple[str, int], *, write: bool) -> str:
        prefix = f"{self.instance_name}/" if self.instance_name else ""
        if write:
            return f"{prefix}uploads/{uuid.uuid4()}/blobs/{key[0]}/{key[1]}"
        return f"{prefix}blobs/{key[0]}/{key[1]}"

    async def _write_stream(self, key: tuple[str, int], data: bytes | Path) -> None:
        resource = self._resource(key, write=True)

        def requests() -> Iterator[bytestream_pb2.WriteRequest]:
            # Runs on grpc's own thread: reading the file here never blocks the event loop.
            offset = 0
            if isinstance(data, Path):
                with open(data, "rb") as f:
                    while True:
                        chunk = f.read(_CHUNK_BYTES)
                        last = offset + len(chunk) >= key[1]
                        yield bytestream_pb2.WriteRequest(
                            resource_name=resource if offset == 0 else "",
                            write_offset=offset,
                            finish_write=last,
                            data=chunk,
                        )
                        offset += len(chunk)
                        if last or not chunk:
                            return
            view = memoryview(data)
            while True:
                chunk = bytes(view[offset : offset + _CHUNK_BYTES])
                last = offset + len(chunk) >= len(view)
                yield bytestream_pb2.WriteRequest(
                    resource_name=resource if offset == 0 else "",
                    write_offset=offset,
                    finish_write=last,
                    data=chunk,
                )
                offset += len(chunk)
                if last:
                    return

        await self._write_once(requests, key)

    async def _write_once(
        self, requests: Callable[[], Iterator[bytestream_pb2.WriteRequest]], key: tuple[str, int]
    ) -> None:
        # A client-streaming call is retried as a whole: the request iterator is made afresh.
        attempts = self.config.max_attempts
        for attempt in range(attempts):
            try:
                await self._unary_once(
                    self.bytestream.Write, requests(), self.config.timeout_seconds + key[1] / _MiB
                )
                return
            except grpc.RpcError as exc:
                if exc.code() in _RETRYABLE and attempt + 1 < attempts:
                    await self._backoff(attempt)
                    continue
                raise self.failure("ByteStream.Write", exc, f" of blob {key[0]}/{key[1]}") from None

    async def upload_file(self, key: tuple[str, int], path: Path) -> None:
        """Upload one (large) blob from a file, streamed."""
        await self._write_stream(key, path)

    async def download(self, digests: Sequence[re_pb2.Digest]) -> dict[tuple[str, int], bytes]:
        """The bytes of each digest the server holds (absent ones are left out)."""
        found: dict[tuple[str, int], bytes] = {}
        small: list[re_pb2.Digest] = []
        jobs: list[Callable[[], Awaitable[None]]] = []
        for digest in {_key(d): d for d in digests}.values():
            if digest.size_bytes == 0:
                found[_key(digest)] = b""
            elif digest.size_bytes > self.max_batch_bytes // 2:
                jobs.append(lambda d=digest: self._read_stream_into(d, found))  # type: ignore[misc]
            else:
                small.append(digest)
        batch: list[re_pb2.Digest] = []
        size = 0
        for digest in small:
            if size + digest.size_bytes > self.max_batch_bytes and batch:
                jobs.append(lambda b=batch: self._batch_read(b, found))  # type: ignore[misc]
                batch, size = [], 0
            batch.append(digest)
            size += digest.size_bytes + 200
        if batch:
            jobs.append(lambda b=batch: self._batch_read(b, found))  # type: ignore[misc]
        await run_all(jobs)
        return found

    async def _batch_read(
        self, batch: Sequence[re_pb2.Digest], found: dict[tuple[str, int], bytes]
    ) -> None:
        response = await self.unary(
            "BatchReadBlobs",
            self.cas.BatchReadBlobs,
            re_pb2.BatchReadBlobsRequest(
                instance_name=self.instance_name,
                digests=batch,
                digest_function=self.digest_function,
            ),
            timeout=self.config.timeout_seconds + sum(d.size_bytes for d in batch) / _MiB,
        )
        for item in response.responses:
            if item.status.code == 0 and len(item.data) == item.digest.size_bytes:
                found[_key(item.digest)] = item.data
            elif item.status.code not in (0, grpc.StatusCode.NOT_FOUND.value[0]):
                raise self._error(
                    f"REAPI BatchReadBlobs on {self.address} failed for blob "
                    f"{item.digest.hash}/{item.digest.size_bytes}: status {item.status.code}: "
                    f"{item.status.message}."
                )

    async def _read_stream_into(
        self, digest: re_pb2.Digest, found: dict[tuple[str, int], bytes]
    ) -> None:
        chunks: list[bytes] = []
        if await self.read_stream(digest, chunks.append):
            found[_key(digest)] = b"".join(chunks)

    async def read_stream(self, digest: re_pb2.Digest, sink: Callable[[bytes], object]) -> bool:
        """Stream one blob through `sink` (called in a worker thread); False if absent."""
        attempts = self.config.max_attempts
        for attempt in range(attempts):
            received = 0
            call = self.bytestream.Read(
                bytestream_pb2.ReadRequest(resource_name=self._resource(_key(digest), write=False)),
                timeout=self.config.timeout_seconds + digest.size_bytes / _MiB,
                metadata=self._metadata,
            )

            def pump(call: Any = call) -> int:
                total = 0
                for response in call:
                    sink(response.data)
                    total += len(response.data)
                return total

            try:
                try:
                    received = await trio.to_thread.run_sync(pump, abandon_on_cancel=True)
                finally:
                    call.cancel()
            except grpc.RpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.NOT_FOUND:
                    return False
                if code in _RETRYABLE and attempt + 1 < attempts:
                    await self._backoff(attempt)
                    continue
                raise self.failure(
                    "ByteStream.Read", exc, f" of blob {digest.hash}/{digest.size_bytes}"
                ) from None
            if received != digest.size_bytes:
                raise self._error(
                    f"REAPI ByteStream.Read of blob {digest.hash}/{digest.size_bytes} on "
                    f"{self.address} returned {received} bytes."
                )
            return True
        return False  # pragma: no cover - the loop returns or raises

    async def cancel_operation(self, name: str) -> None:
        """Ask the server to stop an operation; servers without CancelOperation are ignored."""
        if not name:
            return
        try:
            await self._unary_once(
                self.operations.CancelOperation,
                operations_pb2.CancelOperationRequest(name=name),
                5.0,
            )
        except grpc.RpcError as exc:
            logger.debug("CancelOperation(%s) on %s: %s", name, self.address, exc)


async def run_all(jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run `jobs` concurrently; the first failure cancels the others and is raised as is."""
    if len(jobs) == 1:
        await jobs[0]()
        return
    failure: list[BaseException] = []

    async def one(job: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
        try:
            await job()
        except Exception as exc:
            if not failure:
                failure.append(exc)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job, nursery.cancel_scope)
    if failure:
        raise failure[0]
