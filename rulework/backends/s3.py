"""The `s3` cache backend: a remote cache in any S3-compatible object store.

Layout in the bucket (`prefix` first, a `/` is added to it when missing):

    <prefix>cas/<blake3 fingerprint>   content-addressed blobs, written only if absent
    <prefix>ac/<action key>            action-cache entries, overwritten on each put

Why httpx + botocore rather than obstore or boto3 (all three were measured here from trio
against moto on loopback: obstore's sync API in worker threads ~2.2 ms per serial op, httpx +
botocore's SigV4 signer ~3 ms, boto3 in worker threads ~3.5 ms; the server dominates as soon
as requests run concurrently, which is how this backend issues them):

- Cancellation and timeouts. httpx runs natively on trio, so a cancelled or timed-out request
  closes its connection at once and nothing keeps running. obstore's async API needs asyncio
  (it fails under trio) and boto3 is blocking: both would run every request in a worker thread
  that trio can only abandon, leaving it uploading in the background after a cancellation.
- Streaming with bounded memory is ours to control: downloads go chunk by chunk to a file,
  big uploads are multipart with at most a few parts in memory, and every payload is still
  SHA-256 signed (hashing big payloads in worker threads).
- Credentials: botocore provides the complete standard AWS chain (environment, shared
  config/credentials files and profiles, SSO, assume-role, credential_process, container and
  instance metadata), and the reference SigV4 signer. obstore's own chain has no profiles.
- Weight and upkeep: httpx and botocore are pure Python and ubiquitous; we own only a small,
  stable subset of the S3 REST API (HEAD, GET, PUT with If-None-Match, DELETE, multipart).

Every failure leaves through `_map_exceptions` as an `S3CacheError` (a `CacheBackendError`)
naming the operation, bucket and key; never credentials or request headers.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import re
import ssl
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import quote, urlsplit

import botocore.exceptions
import botocore.session
import httpx
import trio
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials

from ..abc import CacheStatistics
from ..engine.errors import CacheBackendError, ConfigError
from ..engine.fs import Digest

logger = logging.getLogger(__name__)

_KiB = 1024
_MiB = 1024 * _KiB
_GiB = 1024 * _MiB

# S3's own limits on multipart uploads.
_MIN_PART_BYTES = 5 * _MiB
_MAX_PART_BYTES = 5 * _GiB
_MAX_PARTS = 10_000

# Payloads up to this size are hashed (for the SigV4 payload signature) on the event loop;
# larger ones in a worker thread (SHA-256 runs at roughly 1 GB/s: 256 KiB is a fraction of a ms).
_HASH_INLINE_BYTES = 256 * _KiB
# Downloads are written to disk in batches of this size, one worker-thread call each.
_WRITE_BATCH_BYTES = 1 * _MiB
# Parts of one multipart upload in flight at once (each held in memory while it is sent).
_PARTS_IN_FLIGHT = 4
# Error bodies are small XML documents; never read more than this from a failed response.
_MAX_ERROR_BODY = 64 * _KiB
# Credentials are re-read (in a worker thread, when they can expire) at most this often.
_CREDENTIALS_TTL_SECONDS = 60.0

_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_AWS_ENDPOINT = "https://s3.{region}.amazonaws.com"
_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DNS_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")

T = TypeVar("T")
R = TypeVar("R")

AddressingStyle = Literal["auto", "path", "virtual"]


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3CacheConfig:
    """`[cache.s3]`: where the remote cache lives and how to talk to it.

    Credentials never come from this section: they come from the standard AWS chain
    (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE` or `profile`
    below, `~/.aws/credentials`, SSO, container or instance metadata).

    Attributes:
        bucket: the bucket name; it must exist.
        prefix: key prefix inside the bucket (e.g. `"team-a/"`); a `/` is appended if missing.
        endpoint_url: the service URL for non-AWS services (MinIO, Ceph, R2...), e.g.
            `"http://127.0.0.1:9000"`; omit for AWS.
        region: the bucket's region (used for signing and the AWS endpoint).
        read: use results from the remote cache.
        write: upload results to the remote cache.
        timeout_seconds: bound on one small request, retries included, and on any pause in a
            streaming transfer; a slower server fails the operation with `S3TimeoutError`.
        max_concurrency: requests in flight at once (also the connection pool size).
        addressing_style: `"path"` (`endpoint/bucket/key`), `"virtual"`
            (`bucket.endpoint/key`) or `"auto"` (virtual on AWS, path on custom endpoints).
        profile: the AWS profile to take credentials from (default: `AWS_PROFILE` or "default").
        ca_bundle: a PEM file of CA certificates for TLS (default: `AWS_CA_BUNDLE`, the
            profile's `ca_bundle`, then the system's/certifi's).
        verify_tls: check the server's TLS certificate; only turn off for a test server.
        max_attempts: tries per request on connection errors and 5xx responses.
        multipart_part_bytes: files larger than this are uploaded in parts of this size
            (at least 5 MiB; raised automatically so a file needs at most 10,000 parts).
        unavailable_cooldown_seconds: after the service was found unreachable, fail fast for
            this long instead of waiting on every queued request.
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = "us-east-1"
    read: bool = True
    write: bool = True
    timeout_seconds: float = 10.0
    max_concurrency: int = 32
    addressing_style: AddressingStyle = "auto"
    profile: str | None = None
    ca_bundle: str | None = None
    verify_tls: bool = True
    max_attempts: int = 3
    multipart_part_bytes: int = 8 * _MiB
    unavailable_cooldown_seconds: float = 30.0

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ConfigError("[cache.s3]", problems)


def _config_problems(config: S3CacheConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []

    def problem(field: str, message: str) -> None:
        problems.append((f"cache.s3.{field}", message))

    def found(value: object) -> str:
        return f"found {value!r} of type {type(value).__name__}"

    if not isinstance(config.bucket, str) or not config.bucket:
        problem("bucket", f"must be a non-empty bucket name, {found(config.bucket)}")
    elif len(config.bucket) > 255 or any(c in config.bucket for c in "/\\ \t\r\n?#"):
        problem(
            "bucket",
            f"must be a bare bucket name (no '/', spaces, '?' or '#'), found {config.bucket!r}; "
            "put a key prefix in `prefix` and the service URL in `endpoint_url`",
        )
    if not isinstance(config.prefix, str):
        problem("prefix", f"must be a string such as 'team-a/', {found(config.prefix)}")
    elif config.prefix.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in config.prefix):
        problem(
            "prefix",
            f"must not start with '/' nor contain control characters, found {config.prefix!r}",
        )
    if config.endpoint_url is not None:
        if not isinstance(config.endpoint_url, str):
            problem("endpoint_url", f"must be a URL string, {found(config.endpoint_url)}")
        else:
            parts = urlsplit(config.endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                problem(
                    "endpoint_url",
                    "must be an http:// or https:// URL with a host, e.g. "
                    f"'http://127.0.0.1:9000', found {config.endpoint_url!r}; omit it for AWS",
                )
            elif parts.query or parts.fragment:
                problem(
                    "endpoint_url",
                    f"must not have a query or fragment, found {config.endpoint_url!r}",
                )
    if not isinstance(config.region, str) or not _REGION_RE.match(config.region):
        problem("region", f"must be a region name such as 'us-east-1', {found(config.region)}")
    for name in ("read", "write", "verify_tls"):
        value = getattr(config, name)
        if not isinstance(value, bool):
            problem(name, f"must be true or false, {found(value)}")
    for name in ("timeout_seconds", "unavailable_cooldown_seconds"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            problem(name, f"must be a positive number of seconds, {found(value)}")
    for name in ("max_concurrency", "max_attempts"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problem(name, f"must be an integer of at least 1, {found(value)}")
    part = config.multipart_part_bytes
    if (
        isinstance(part, bool)
        or not isinstance(part, int)
        or not _MIN_PART_BYTES <= part <= _MAX_PART_BYTES
    ):
        problem(
            "multipart_part_bytes",
            f"must be an integer between {_MIN_PART_BYTES} (5 MiB) and {_MAX_PART_BYTES} "
            f"(5 GiB), {found(part)}",
        )
    if config.addressing_style not in ("auto", "path", "virtual"):
        problem(
            "addressing_style",
            f"must be 'auto', 'path' or 'virtual', {found(config.addressing_style)}",
        )
    for name in ("profile", "ca_bundle"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, str) or not value):
            problem(name, f"must be a non-empty string or omitted, {found(value)}")
    if (
        config.addressing_style == "virtual"
        and isinstance(config.bucket, str)
        and not _DNS_BUCKET_RE.match(config.bucket.replace(".", "-"))
    ):
        problem(
            "addressing_style",
            f"'virtual' needs a bucket name that is a valid host name, found {config.bucket!r}; "
            "use 'path'",
        )
    return problems


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class S3CacheError(CacheBackendError):
    """An S3 request of the cache failed. The attributes say which one and how.

    Attributes:
        operation: what the cache was doing (e.g. "get_action", "write_blobs").
        bucket, key: where (`key` is None for bucket-wide failures).
        endpoint: the service URL.
        status: the HTTP status, when the server answered.
        code: the S3 error code (e.g. "AccessDenied"), when the server sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        bucket: str,
        key: str | None,
        endpoint: str,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.operation = operation
        self.bucket = bucket
        self.key = key
        self.endpoint = endpoint
        self.status = status
        self.code = code
        where = f"s3://{bucket}/{key}" if key is not None else f"s3://{bucket}"
        super().__init__(f"S3 cache {operation} failed for {where} at {endpoint}: {message}")


class S3AccessDeniedError(S3CacheError, PermissionError):
    """The service refused the credentials (missing, invalid, or lacking a permission)."""


class S3BucketNotFoundError(S3CacheError, LookupError):
    """The configured bucket does not exist at the endpoint."""


class S3UnavailableError(S3CacheError, ConnectionError):
    """The service could not be reached or kept failing (connection errors, 5xx)."""


class S3TimeoutError(S3UnavailableError, TimeoutError):
    """The service did not answer within `timeout_seconds`."""


class _S3ResponseError(Exception):
    """Internal: a response with an unexpected status; translated by `_map_exceptions`."""

    def __init__(self, status: int, code: str | None, message: str | None, region: str | None):
        self.status = status
        self.code = code
        self.message = message
        self.region = region
        super().__init__(f"HTTP {status} {code or ''}: {message or ''}")


class _CircuitOpen(Exception):
    """Internal: the service was found unavailable moments ago; fail without a request."""

    def __init__(self, seconds_ago: float, reason: str) -> None:
        self.seconds_ago = seconds_ago
        self.reason = reason
        super().__init__(reason)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class _Counters:
    """Mutable counters behind `CacheStatistics` (the record itself is frozen)."""

    __slots__ = (
        "action_hits",
        "action_misses",
        "action_writes",
        "blob_hits",
        "blob_misses",
        "blob_writes",
        "bytes_read",
        "bytes_written",
        "corrupt_evicted",
        "errors",
    )

    def __init__(self) -> None:
        self.action_hits = self.action_misses = self.action_writes = 0
        self.blob_hits = self.blob_misses = self.blob_writes = 0
        self.bytes_read = self.bytes_written = self.corrupt_evicted = self.errors = 0

    def snapshot(self) -> CacheStatistics:
        return CacheStatistics(**{name: getattr(self, name) for name in self.__slots__})


@dataclass(frozen=True, slots=True)
class _Connection:
    """What `_connect` resolves once, off the event loop."""

    credentials: Credentials
    verify: ssl.SSLContext | bool


class _PresetPayloadSigner(S3SigV4Auth):
    """SigV4 for S3 with the payload's SHA-256 computed by us (off the loop for big bodies).

    The stock signer hashes `request.body` itself, synchronously; we never give it the body.
    """

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


class S3Cache:
    """A `CacheBackend` in an S3-compatible bucket: blobs under `cas/`, actions under `ac/`.

    Constructed as `S3Cache(config)`; no opening is needed: credentials are resolved and the
    HTTP connection pool is created on first use (in the trio run that uses it), and `aclose`
    releases them. Every operation is bounded by `config.timeout_seconds` and at most
    `config.max_concurrency` requests are in flight. Batches (`find_missing_blobs`,
    `read_blobs`, `write_blobs`, `evict`) run their requests concurrently.

    Blobs are written with `If-None-Match: *`, so an existing blob is never rewritten and a
    concurrent writer of the same blob is not an error. With `read=False` nothing is ever
    served (`get_action` misses, reads find nothing) but `find_missing_blobs` still asks the
    service when `write=True`, so uploads skip what is already there; with `write=False` puts,
    writes and evictions do nothing.

    Example:
        cache = S3Cache(S3CacheConfig(bucket="rulework-cache", prefix="team-a/"))
        await cache.put_action(key, value)
        assert await cache.get_action(key) == value
        await cache.aclose()

    Raises (from any operation): `S3AccessDeniedError`, `S3BucketNotFoundError`,
    `S3UnavailableError`, `S3TimeoutError`, or `S3CacheError`; all are `CacheBackendError`.
    """

    config_type: ClassVar[type[S3CacheConfig]] = S3CacheConfig

    def __init__(self, config: S3CacheConfig) -> None:
        if not isinstance(config, S3CacheConfig):
            raise TypeError(
                f"S3Cache takes an S3CacheConfig, got {type(config).__name__}; build one with "
                "S3CacheConfig(bucket=...)"
            )
        self.config = config
        prefix = config.prefix
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self._prefix = prefix
        self._endpoint, self._base_url = _base_url(config)
        self._counters = _Counters()
        self._requests_sent = 0
        self._closed = False
        # Created lazily, once per trio run: httpx pools and trio primitives belong to one run.
        # Invariant: self._http is None or self._http_token is the token of the run it serves.
        self._http: httpx.AsyncClient | None = None
        self._http_token: trio.lowlevel.TrioToken | None = None
        self._limiter: trio.CapacityLimiter | None = None
        self._connect_lock: tuple[trio.Lock, trio.lowlevel.TrioToken] | None = None
        self._connection: _Connection | None = None
        self._frozen: ReadOnlyCredentials | None = None
        self._frozen_at = -math.inf
        # Circuit breaker: while time.monotonic() < _unavailable_until, fail without a request.
        self._unavailable_until = -math.inf
        self._unavailable_since = -math.inf
        self._unavailable_reason = ""

    def __repr__(self) -> str:
        return (
            f"S3Cache(bucket={self.config.bucket!r}, prefix={self._prefix!r}, "
            f"endpoint={self._endpoint!r}, read={self.config.read}, write={self.config.write})"
        )

    # -- keys ----------------------------------------------------------------------------------

    def cas_key(self, digest: Digest) -> str:
        """The object key of a blob."""
        return f"{self._prefix}cas/{digest.fingerprint}"

    def action_key(self, key: str) -> str:
        """The object key of an action-cache entry."""
        if not isinstance(key, str) or not key or any(ord(c) < 32 for c in key):
            raise ValueError(f"An action-cache key must be a non-empty printable string: {key!r}")
        return f"{self._prefix}ac/{key}"

    # -- action cache --------------------------------------------------------------------------

    async def get_action(self, key: str) -> bytes | None:
        """The entry stored under `key`, or None (always None with `read=False`)."""
        object_key = self.action_key(key)
        self._check_open()
        if not self.config.read:
            await trio.lowlevel.checkpoint()
            return None
        with self._map_exceptions("get_action", object_key):
            data = await self._get_object(object_key)
        if data is None:
            self._counters.action_misses += 1
        else:
            self._counters.action_hits += 1
            self._counters.bytes_read += len(data)
        return data

    async def put_action(self, key: str, value: bytes) -> None:
        """Store `value` under `key`, replacing any previous entry (no-op with `write=False`)."""
        object_key = self.action_key(key)
        self._check_open()
        if not self.config.write:
            await trio.lowlevel.checkpoint()
            return
        data = bytes(value)
        with self._map_exceptions("put_action", object_key):
            await self._put_object(object_key, data, if_absent=False)
        self._counters.action_writes += 1
        self._counters.bytes_written += len(data)

    # -- blobs ---------------------------------------------------------------------------------

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        """The subset of `digests` not in the bucket (HEAD requests, concurrently).

        An object whose size differs from its digest's is corrupt: it is reported missing and,
        with `write=True`, deleted so that the next write can repair it.
        """
        self._check_open()
        wanted = list(dict.fromkeys(digests))
        if not wanted or not (self.config.read or self.config.write):
            await trio.lowlevel.checkpoint()
            return frozenset(wanted)
        missing: list[Digest] = []

        async def check(digest: Digest) -> None:
            key = self.cas_key(digest)
            with self._map_exceptions("find_missing_blobs", key):
                size = await self._head_object(key)
                if size is not None and size != digest.serialized_bytes_length:
                    await self._discard_corrupt(key, size, digest)
                    size = None
            if size is None:
                missing.append(digest)

        await self._for_each(wanted, check)
        return frozenset(missing)

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The bytes of each digest held (GET requests, concurrently); absent ones left out."""
        self._check_open()
        wanted = list(dict.fromkeys(digests))
        found: dict[Digest, bytes] = {}
        if not self.config.read:
            await trio.lowlevel.checkpoint()
            self._counters.blob_misses += len(wanted)
            return found

        async def read(digest: Digest) -> None:
            key = self.cas_key(digest)
            with self._map_exceptions("read_blobs", key):
                data = await self._get_object(key, expected_size=digest.serialized_bytes_length)
                if data is not None and len(data) != digest.serialized_bytes_length:
                    await self._discard_corrupt(key, len(data), digest)
                    data = None
            if data is None:
                self._counters.blob_misses += 1
            else:
                found[digest] = data
                self._counters.blob_hits += 1
                self._counters.bytes_read += len(data)

        await self._for_each(wanted, read)
        return found

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        """Upload each blob unless present (PUT `If-None-Match: *`, concurrently)."""
        self._check_open()
        todo = [(d, bytes(b)) for d, b in blobs.items()]
        if not self.config.write or not todo:
            await trio.lowlevel.checkpoint()
            return

        async def write(item: tuple[Digest, bytes]) -> None:
            digest, data = item
            key = self.cas_key(digest)
            with self._map_exceptions("write_blobs", key):
                written = await self._put_object(key, data, if_absent=True)
            self._counters.blob_writes += 1
            if written:
                self._counters.bytes_written += len(data)

        await self._for_each(todo, write)

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        """Stream one blob into `dest` (atomically: a temp file renamed); False when absent.

        At most `_WRITE_BATCH_BYTES` of it are in memory at a time.
        """
        self._check_open()
        dest = Path(dest)
        if not self.config.read:
            await trio.lowlevel.checkpoint()
            self._counters.blob_misses += 1
            return False
        key = self.cas_key(digest)
        with self._map_exceptions("read_blob_to_file", key):
            size = await self._download_to_file(key, dest)
            if size is not None and size != digest.serialized_bytes_length:
                await _remove_quietly(dest)
                await self._discard_corrupt(key, size, digest)
                size = None
        if size is None:
            self._counters.blob_misses += 1
            return False
        self._counters.blob_hits += 1
        self._counters.bytes_read += size
        return True

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        """Upload `src` under `digest` unless present; big files go in parts (multipart).

        Memory use is bounded by a few parts (`multipart_part_bytes` each), whatever the size.
        """
        self._check_open()
        size = digest.serialized_bytes_length
        if not self.config.write:
            await trio.lowlevel.checkpoint()
            return
        key = self.cas_key(digest)
        with self._map_exceptions("write_blob_from_file", key):
            actual = (await trio.to_thread.run_sync(os.stat, src)).st_size
            if actual != size:
                raise _LocalError(
                    f"the source file {src} has {actual} bytes but its digest says {size}; "
                    "it changed after it was hashed"
                )
            present = await self._head_object(key)
            if present == size:
                self._counters.blob_writes += 1
                return
            if present is not None:
                await self._discard_corrupt(key, present, digest)
            if size <= self._part_bytes(size):
                data, sha = await trio.to_thread.run_sync(_read_and_hash, src)
                written = await self._put_object(key, data, if_absent=True, sha256=sha)
                del data
            else:
                written = await self._multipart_upload(key, src, size)
        self._counters.blob_writes += 1
        if written:
            self._counters.bytes_written += size

    async def evict(self, digests: Iterable[Digest]) -> None:
        """Delete these blobs (they were found corrupt); a no-op with `write=False`."""
        self._check_open()
        todo = list(dict.fromkeys(digests))
        if not self.config.write or not todo:
            await trio.lowlevel.checkpoint()
            return

        async def delete(digest: Digest) -> None:
            key = self.cas_key(digest)
            with self._map_exceptions("evict", key):
                await self._delete_object(key)
            self._counters.corrupt_evicted += 1

        await self._for_each(todo, delete)

    # -- the rest ------------------------------------------------------------------------------

    def statistics(self) -> CacheStatistics:
        """Counters since this cache was created (`errors` counts failed operations)."""
        return self._counters.snapshot()

    @property
    def requests_sent(self) -> int:
        """HTTP requests sent since this cache was created, retries included."""
        return self._requests_sent

    async def aclose(self) -> None:
        """Close the connection pool; further use raises `CacheBackendError`. Idempotent."""
        self._closed = True
        http, self._http = self._http, None
        same_run = self._http_token is _current_token()
        self._http_token = None
        if http is not None and same_run:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 5
                await http.aclose()
        else:
            await trio.lowlevel.checkpoint()

    # -- internals: errors ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CacheBackendError(f"{self!r} was closed (aclose); create a new one.")

    @contextmanager
    def _map_exceptions(self, operation: str, key: str | None) -> Iterator[None]:
        """Translate every failure inside into an `S3CacheError` naming operation/bucket/key."""
        bucket, endpoint = self.config.bucket, self._endpoint
        error: S3CacheError
        try:
            yield
        except S3CacheError:
            self._counters.errors += 1
            raise
        except _S3ResponseError as exc:
            error = _error_for_response(exc, operation, bucket, key, endpoint, self.config)
            self._counters.errors += 1
            if isinstance(error, S3UnavailableError):
                self._trip(str(error))
            raise error from exc
        except _CircuitOpen as exc:
            self._counters.errors += 1
            raise S3UnavailableError(
                f"the service was unreachable {exc.seconds_ago:.1f}s ago ({exc.reason}); not "
                f"retrying for {self.config.unavailable_cooldown_seconds:g}s "
                "(`unavailable_cooldown_seconds`)",
                operation=operation,
                bucket=bucket,
                key=key,
                endpoint=endpoint,
            ) from exc
        except trio.TooSlowError as exc:
            self._counters.errors += 1
            message = (
                f"no answer within {self.config.timeout_seconds:g}s (`timeout_seconds`); "
                "is the service up and reachable?"
            )
            self._trip(message)
            raise S3TimeoutError(
                message, operation=operation, bucket=bucket, key=key, endpoint=endpoint
            ) from exc
        except httpx.TimeoutException as exc:
            self._counters.errors += 1
            message = (
                f"{type(exc).__name__}: no progress within {self.config.timeout_seconds:g}s "
                "(`timeout_seconds`); is the service up and reachable?"
            )
            self._trip(message)
            raise S3TimeoutError(
                message, operation=operation, bucket=bucket, key=key, endpoint=endpoint
            ) from exc
        except httpx.HTTPError as exc:
            self._counters.errors += 1
            message = (
                f"cannot talk to the service ({type(exc).__name__}: {exc}); check "
                "`endpoint_url` and that the service is running"
            )
            self._trip(message)
            raise S3UnavailableError(
                message, operation=operation, bucket=bucket, key=key, endpoint=endpoint
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            # Credential-chain failures (profile not found, SSO expired, bad config file).
            self._counters.errors += 1
            raise S3AccessDeniedError(
                f"cannot get AWS credentials: {exc}. Fix your AWS configuration (environment "
                "variables, `profile`, ~/.aws/config)",
                operation=operation,
                bucket=bucket,
                key=key,
                endpoint=endpoint,
            ) from exc
        except _LocalError as exc:
            self._counters.errors += 1
            raise S3CacheError(
                str(exc), operation=operation, bucket=bucket, key=key, endpoint=endpoint
            ) from exc
        except OSError as exc:
            # Local files (the source of an upload, the destination of a download).
            self._counters.errors += 1
            raise S3CacheError(
                f"local file error: {exc}",
                operation=operation,
                bucket=bucket,
                key=key,
                endpoint=endpoint,
            ) from exc

    def _trip(self, reason: str) -> None:
        now = time.monotonic()
        if now >= self._unavailable_until:
            self._unavailable_since = now
            self._unavailable_reason = reason
        self._unavailable_until = now + self.config.unavailable_cooldown_seconds

    def _check_circuit(self) -> None:
        now = time.monotonic()
        if now < self._unavailable_until:
            raise _CircuitOpen(now - self._unavailable_since, self._unavailable_reason)

    # -- internals: connection -----------------------------------------------------------------

    def _run_state(self) -> tuple[httpx.AsyncClient, trio.CapacityLimiter]:
        token = _current_token()
        if self._http is None or self._http_token is not token or self._limiter is None:
            if self._connection is None:
                raise AssertionError("_connect() must run before _run_state()")
            # A client left from an earlier trio run cannot be closed from this one; its
            # sockets are released when it is collected.
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.config.timeout_seconds),
                limits=httpx.Limits(
                    max_connections=self.config.max_concurrency,
                    max_keepalive_connections=self.config.max_concurrency,
                ),
                verify=self._connection.verify,
                follow_redirects=False,
                headers={"Accept-Encoding": "identity", "User-Agent": "rulework-s3-cache"},
            )
            self._http_token = token
            self._limiter = trio.CapacityLimiter(self.config.max_concurrency)
        return self._http, self._limiter

    async def _connect(self) -> None:
        """Resolve the credentials chain and TLS settings once (blocking: in a worker thread)."""
        if self._connection is not None:
            return
        token = _current_token()
        if self._connect_lock is None or self._connect_lock[1] is not token:
            self._connect_lock = (trio.Lock(), token)
        async with self._connect_lock[0]:
            if self._connection is None:
                # abandon_on_cancel: the chain may wait on instance metadata; a cancelled
                # caller need not wait for it (botocore bounds those calls itself).
                self._connection = await trio.to_thread.run_sync(
                    _resolve_connection, self.config, abandon_on_cancel=True
                )

    async def _credentials(self) -> ReadOnlyCredentials:
        connection = self._connection
        if connection is None:
            raise AssertionError("_connect() must run before _credentials()")
        now = time.monotonic()
        if self._frozen is None or now - self._frozen_at > _CREDENTIALS_TTL_SECONDS:
            # Static credentials never change; refreshable ones (SSO, assume-role, metadata)
            # are re-read at most once a minute, well inside botocore's refresh margins.
            credentials = connection.credentials
            if isinstance(credentials, RefreshableCredentials):
                # A refresh may call STS/SSO/metadata endpoints: not on the event loop.
                frozen = await trio.to_thread.run_sync(
                    credentials.get_frozen_credentials, abandon_on_cancel=True
                )
            else:
                frozen = credentials.get_frozen_credentials()
            self._frozen, self._frozen_at = frozen, now
        return self._frozen

    # -- internals: requests -------------------------------------------------------------------

    def _url(self, key: str | None, query: str = "") -> str:
        path = "" if key is None else quote(key, safe="/-_.~")
        url = f"{self._base_url}/{path}"
        return f"{url}?{query}" if query else url

    async def _signed_headers(
        self, method: str, url: str, headers: Mapping[str, str], sha256: str
    ) -> list[tuple[str, str]]:
        credentials = await self._credentials()
        request = AWSRequest(method=method, url=url, headers=dict(headers))
        request.context["payload_sha256"] = sha256
        signer = _PresetPayloadSigner(credentials, "s3", self.config.region)
        signer.add_auth(request)
        return list(request.headers.items())

    async def _send(
        self,
        method: str,
        key: str | None,
        *,
        query: str = "",
        body: bytes = b"",
        sha256: str | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One request with retries on connection errors and 5xx (not on timeouts).

        The caller holds a limiter token and, for small requests, a `fail_after` deadline.
        With `stream=True` the response body is not read: the caller must `aclose()` it.
        """
        await self._connect()
        http, _ = self._run_state()
        url = self._url(key, query)
        if sha256 is None:
            sha256 = _sha256(body) if body else _EMPTY_SHA256
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            self._check_circuit()
            signed = await self._signed_headers(method, url, headers or {}, sha256)
            request = http.build_request(method, url, headers=signed, content=body)
            self._requests_sent += 1
            try:
                response = await http.send(request, stream=True)
            except httpx.TimeoutException:
                raise
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise
                logger.debug("S3 %s %s failed (%s); retrying", method, key, exc)
                await trio.sleep(_backoff(attempt))
                continue
            if response.status_code in _RETRY_STATUSES and attempt < attempts:
                await response.aclose()
                logger.debug("S3 %s %s: HTTP %s; retrying", method, key, response.status_code)
                await trio.sleep(_backoff(attempt))
                continue
            if not stream:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    @asynccontextmanager
    async def _slot(self, *, deadline: bool = True) -> AsyncIterator[None]:
        """A concurrency token, then (for small requests) the whole-request deadline."""
        await self._connect()
        _, limiter = self._run_state()
        async with limiter:
            # Checked again after queueing: requests queued behind a dead server fail at once.
            self._check_circuit()
            if deadline:
                with trio.fail_after(self.config.timeout_seconds):
                    yield
            else:
                yield

    async def _head_object(self, key: str) -> int | None:
        """The size of the object, or None if absent."""
        async with self._slot():
            response = await self._send("HEAD", key)
        if response.status_code == 404:
            return None
        _raise_for_status(response, (200,))
        return int(response.headers.get("content-length", "0"))

    async def _get_object(self, key: str, *, expected_size: int | None = None) -> bytes | None:
        """The object's bytes, or None if absent."""
        if expected_size is not None and expected_size > _HASH_INLINE_BYTES * 16:
            # Big blobs in a batch still get a streaming-sized deadline (per-read timeouts).
            async with self._slot(deadline=False):
                response = await self._send("GET", key)
        else:
            async with self._slot():
                response = await self._send("GET", key)
        if response.status_code == 404:
            return None
        _raise_for_status(response, (200,))
        return response.content

    async def _put_object(
        self, key: str, data: bytes, *, if_absent: bool, sha256: str | None = None
    ) -> bool:
        """PUT the object; with `if_absent`, False when it already existed (412/409)."""
        if sha256 is None:
            sha256 = await _sha256_async(data)
        headers = {"Content-Type": "application/octet-stream"}
        if if_absent:
            headers["If-None-Match"] = "*"
        async with self._slot(deadline=len(data) <= 16 * _MiB):
            response = await self._send("PUT", key, body=data, sha256=sha256, headers=headers)
        if if_absent and response.status_code in (409, 412):
            # 412: the blob is there already. 409 (ConditionalRequestConflict): a concurrent
            # conditional write of the same key is in progress; by content addressing it
            # carries the same bytes, so either way the blob is (about to be) present.
            return False
        _raise_for_status(response, (200,))
        return True

    async def _delete_object(self, key: str) -> None:
        async with self._slot():
            response = await self._send("DELETE", key)
        _raise_for_status(response, (200, 204, 404))

    async def _discard_corrupt(self, key: str, size: int, digest: Digest) -> None:
        """Delete an object whose size contradicts its digest (it can only be corrupt)."""
        logger.warning(
            "S3 cache: s3://%s/%s has %d bytes but its digest says %d; treating it as missing%s",
            self.config.bucket,
            key,
            size,
            digest.serialized_bytes_length,
            " and deleting it" if self.config.write else "",
        )
        if self.config.write:
            await self._delete_object(key)
            self._counters.corrupt_evicted += 1

    async def _download_to_file(self, key: str, dest: Path) -> int | None:
        """Stream the object into `dest` via a temp file; its size, or None if absent."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.s3part")
        async with self._slot(deadline=False):
            # The deadline covers the wait for the response headers; the body is bounded by
            # httpx's per-read timeout (a stalled transfer fails, a slow but steady one not).
            with trio.fail_after(self.config.timeout_seconds):
                response = await self._send("GET", key, stream=True)
            try:
                if response.status_code == 404:
                    return None
                if response.status_code != 200:
                    await response.aread()
                    _raise_for_status(response, (200,))
                return await _stream_to_file(response, tmp, dest)
            finally:
                with trio.CancelScope(shield=True):
                    await response.aclose()

    def _part_bytes(self, size: int) -> int:
        return max(self.config.multipart_part_bytes, math.ceil(size / _MAX_PARTS))

    async def _multipart_upload(self, key: str, src: Path, size: int) -> bool:
        """Upload `src` in parts; False if the object appeared meanwhile (412 on completion).

        Nothing is visible until the completion succeeds; a failure or cancellation aborts the
        upload (shielded, bounded), so no partial object is ever visible.
        """
        part_bytes = self._part_bytes(size)
        count = math.ceil(size / part_bytes)
        async with self._slot():
            response = await self._send("POST", key, query="uploads")
        _raise_for_status(response, (200,))
        upload_id = _xml_text(response.content, "UploadId")
        if not upload_id:
            raise _S3ResponseError(response.status_code, None, "no UploadId in the answer", None)
        upload_query = f"uploadId={quote(upload_id, safe='-_.~')}"
        etags: dict[int, str] = {}
        completed = False
        fd = await trio.to_thread.run_sync(os.open, src, os.O_RDONLY)
        try:

            async def upload_part(number: int) -> None:
                offset = (number - 1) * part_bytes
                length = min(part_bytes, size - offset)
                data, sha = await trio.to_thread.run_sync(_pread_and_hash, fd, length, offset)
                async with self._slot(deadline=False):
                    part = await self._send(
                        "PUT",
                        key,
                        query=f"partNumber={number}&{upload_query}",
                        body=data,
                        sha256=sha,
                    )
                del data
                _raise_for_status(part, (200,))
                etag = part.headers.get("etag")
                if not etag:
                    raise _S3ResponseError(200, None, f"no ETag for part {number}", None)
                etags[number] = etag

            await _for_each_limited(range(1, count + 1), upload_part, _PARTS_IN_FLIGHT)
            body = _complete_body(etags).encode()
            async with self._slot():
                response = await self._send(
                    "POST",
                    key,
                    query=upload_query,
                    body=body,
                    headers={"If-None-Match": "*", "Content-Type": "application/xml"},
                )
            if response.status_code in (409, 412):
                return False
            _raise_for_status(response, (200,))
            # CompleteMultipartUpload may answer 200 with an error document in the body.
            error = _parse_error(response.content)
            if error[0] is not None:
                raise _S3ResponseError(200, error[0], error[1], None)
            completed = True
            return True
        finally:
            os.close(fd)
            if not completed:
                await self._abort_multipart(key, upload_query)

    async def _abort_multipart(self, key: str, upload_query: str) -> None:
        # Parts of an unfinished upload are invisible but billed; abort them even when we are
        # being cancelled, within a bounded time. A failure here is only logged: the caller is
        # already failing, and a bucket lifecycle rule (AbortIncompleteMultipartUpload) is the
        # backstop.
        with trio.move_on_after(min(self.config.timeout_seconds, 10.0), shield=True):
            try:
                _, limiter = self._run_state()
                async with limiter:
                    await self._send("DELETE", key, query=upload_query)
            except (httpx.HTTPError, _CircuitOpen, botocore.exceptions.BotoCoreError) as exc:
                logger.warning(
                    "S3 cache: could not abort the multipart upload of s3://%s/%s (%s); "
                    "its parts stay until a lifecycle rule removes them",
                    self.config.bucket,
                    key,
                    exc,
                )

    async def _for_each(self, items: Iterable[T], fn: Callable[[T], Awaitable[None]]) -> None:
        await _for_each_limited(items, fn, self.config.max_concurrency)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class _LocalError(Exception):
    """Internal: a local precondition failed (reported as a plain `S3CacheError`)."""


def _current_token() -> trio.lowlevel.TrioToken:
    return trio.lowlevel.current_trio_token()


def _base_url(config: S3CacheConfig) -> tuple[str, str]:
    """(endpoint for messages, base URL that object keys are appended to after a '/')."""
    endpoint = config.endpoint_url or _AWS_ENDPOINT.format(region=config.region)
    endpoint = endpoint.rstrip("/")
    style = config.addressing_style
    if style == "auto":
        # Virtual-hosted style is AWS's default (path style is deprecated there); other
        # services (MinIO, Ceph, moto...) generally expect path style. Bucket names with dots
        # break TLS host matching in virtual style, so they stay on path style.
        dns_ok = bool(_DNS_BUCKET_RE.match(config.bucket)) and "." not in config.bucket
        style = "virtual" if config.endpoint_url is None and dns_ok else "path"
    bucket = quote(config.bucket, safe="-_.~")
    if style == "virtual":
        parts = urlsplit(endpoint)
        netloc = f"{config.bucket}.{parts.netloc}"
        return endpoint, f"{parts.scheme}://{netloc}{parts.path}"
    return endpoint, f"{endpoint}/{bucket}"


def _resolve_connection(config: S3CacheConfig) -> _Connection:
    """Blocking: build the botocore session, resolve credentials and the TLS context."""
    session = botocore.session.Session(profile=config.profile)
    credentials = session.get_credentials()
    if credentials is None:
        raise botocore.exceptions.NoCredentialsError()
    verify: ssl.SSLContext | bool
    if not config.verify_tls:
        verify = False
    else:
        cafile = config.ca_bundle or session.get_config_variable("ca_bundle")
        verify = ssl.create_default_context(cafile=cafile) if cafile else True
    return _Connection(credentials=credentials, verify=verify)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _sha256_async(data: bytes) -> str:
    if len(data) <= _HASH_INLINE_BYTES:
        return _sha256(data)
    return await trio.to_thread.run_sync(_sha256, data)


def _read_and_hash(path: Path) -> tuple[bytes, str]:
    data = Path(path).read_bytes()
    return data, _sha256(data)


def _pread_and_hash(fd: int, length: int, offset: int) -> tuple[bytes, str]:
    chunks: list[bytes] = []
    remaining = length
    while remaining:
        chunk = os.pread(fd, remaining, offset + length - remaining)
        if not chunk:
            raise _LocalError("the source file ended early (it changed while being uploaded)")
        chunks.append(chunk)
        remaining -= len(chunk)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return data, _sha256(data)


async def _stream_to_file(response: httpx.Response, tmp: Path, dest: Path) -> int:
    """Write the body to `tmp` in batches off the loop, then rename it to `dest`."""
    file = await trio.to_thread.run_sync(open, tmp, "wb")
    done = False
    try:
        size = 0
        batch = bytearray()
        async for chunk in response.aiter_raw():
            batch += chunk
            size += len(chunk)
            if len(batch) >= _WRITE_BATCH_BYTES:
                await trio.to_thread.run_sync(file.write, batch)
                batch = bytearray()
        if batch:
            await trio.to_thread.run_sync(file.write, batch)
        await trio.to_thread.run_sync(file.close)
        await trio.to_thread.run_sync(os.replace, tmp, dest)
        done = True
        return size
    finally:
        if not done:
            file.close()
            await _remove_quietly(tmp)


async def _remove_quietly(path: Path) -> None:
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(_unlink_missing_ok, path)


def _unlink_missing_ok(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # pragma: no cover - a leftover temp file is only untidy
        logger.debug("cannot remove %s: %s", path, exc)


def _backoff(attempt: int) -> float:
    # Full jitter (AWS's recommendation), capped: 0-50 ms, 0-100 ms, 0-200 ms...
    return random.uniform(0, min(1.0, 0.05 * 2 ** (attempt - 1)))


async def _for_each_limited(
    items: Iterable[T], fn: Callable[[T], Awaitable[None]], limit: int
) -> None:
    """Run `fn` on every item with at most `limit` in flight; the first error cancels the rest
    and is raised as itself (not wrapped in an ExceptionGroup)."""
    pending = list(items)
    if not pending:
        await trio.lowlevel.checkpoint()
        return
    if len(pending) == 1:
        await fn(pending[0])
        return
    iterator = iter(pending)
    failures: list[BaseException] = []

    async def worker(cancel_scope: trio.CancelScope) -> None:
        for item in iterator:
            try:
                await fn(item)
            except Exception as exc:
                failures.append(exc)
                cancel_scope.cancel()
                return

    async with trio.open_nursery() as nursery:
        for _ in range(min(limit, len(pending))):
            nursery.start_soon(worker, nursery.cancel_scope)
    if failures:
        raise failures[0]


def _raise_for_status(response: httpx.Response, ok: tuple[int, ...]) -> None:
    if response.status_code in ok:
        return
    code, message = _parse_error(response.content[:_MAX_ERROR_BODY])
    if code is None:
        # HEAD answers have no body: S3 puts the code in a header at best.
        code = response.headers.get("x-amz-error-code") or response.headers.get(
            "x-minio-error-code"
        )
        message = message or response.headers.get("x-amz-error-message")
    region = response.headers.get("x-amz-bucket-region")
    raise _S3ResponseError(response.status_code, code, message, region)


def _parse_error(body: bytes) -> tuple[str | None, str | None]:
    if b"<Error" not in body[:512]:
        return None, None
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None, None
    if _local(root.tag) != "Error":
        return None, None
    values = {_local(child.tag): (child.text or "") for child in root}
    return values.get("Code"), values.get("Message")


def _xml_text(body: bytes, tag: str) -> str | None:
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if _local(element.tag) == tag:
            return element.text
    return None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _complete_body(etags: Mapping[int, str]) -> str:
    parts = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml_escape(etags[n])}</ETag></Part>"
        for n in sorted(etags)
    )
    return f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>"


def _xml_escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AccountProblem",
        "InvalidSecurity",
    }
)


def _error_for_response(
    exc: _S3ResponseError,
    operation: str,
    bucket: str,
    key: str | None,
    endpoint: str,
    config: S3CacheConfig,
) -> S3CacheError:
    status, code = exc.status, exc.code
    said = (
        f"HTTP {status}"
        + (f" {code}" if code else "")
        + (f": {exc.message}" if exc.message else "")
    )
    where: dict[str, Any] = dict(
        operation=operation, bucket=bucket, key=key, endpoint=endpoint, status=status, code=code
    )
    if code == "NoSuchBucket":
        return S3BucketNotFoundError(
            f"{said}. The bucket {bucket!r} does not exist there: create it, or fix "
            "`bucket`/`endpoint_url` in [cache.s3]",
            **where,
        )
    if status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
        hint = (
            f"set `region = {exc.region!r}` in [cache.s3]"
            if exc.region
            else "check `region` (and `endpoint_url`) in [cache.s3]"
        )
        return S3CacheError(f"{said}. The bucket is in another region: {hint}", **where)
    if status in (401, 403) or code in _ACCESS_CODES:
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            hint = "the credentials from the AWS chain are invalid or expired; refresh them"
        else:
            hint = (
                "grant these credentials s3:GetObject, s3:PutObject, s3:DeleteObject and "
                "s3:ListBucket on the bucket (without s3:ListBucket, S3 answers 403 instead of "
                "404 for absent keys)"
            )
        return S3AccessDeniedError(f"{said}. Access denied: {hint}", **where)
    if status in _RETRY_STATUSES or status == 429:
        return S3UnavailableError(
            f"{said} (after {config.max_attempts} attempts). The service is failing or throttling",
            **where,
        )
    return S3CacheError(f"unexpected answer: {said}", **where)


__all__ = [
    "S3AccessDeniedError",
    "S3BucketNotFoundError",
    "S3Cache",
    "S3CacheConfig",
    "S3CacheError",
    "S3TimeoutError",
    "S3UnavailableError",
]
