"""The `s3` cache backend against a real S3-compatible server (moto's, on 127.0.0.1).

The conformance suite first, then what is S3-specific: the key layout and prefixes,
`If-None-Match` writes, multipart uploads, read/write switches, credentials and access
errors (on a server that checks signatures and IAM policies), and faults: a server killed in
the middle of an upload, a frozen one, a closed port — each a `CacheBackendError` in bounded
time, which the cache layer turns into one warning.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio

from rulework import Engine, Get, MultiGet, Process, ProcessResult, QueryRule, rule
from rulework.abc import CacheBackend
from rulework.backends import s3 as s3_module
from rulework.backends.memory import MemoryCache
from rulework.backends.s3 import (
    S3AccessDeniedError,
    S3BucketNotFoundError,
    S3Cache,
    S3CacheConfig,
    S3CacheError,
    S3TimeoutError,
    S3UnavailableError,
)
from rulework.engine.cache import RemoteCacheWarning, open_cache_layer
from rulework.engine.errors import CacheBackendError, ConfigError
from rulework.engine.fs import Digest
from rulework.testing._cache_suite import CacheBackendSuite, CorruptHook

from .svc_s3 import DUMMY_SECRET_KEY, AuthUsers, MotoServer, S3Bucket, make_bucket

_MiB = 1024 * 1024


def _data(seed: int, size: int) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "big")).digest(length=size)


def _blob(seed: int, size: int = 100) -> tuple[Digest, bytes]:
    data = _data(seed, size)
    return Digest.of_bytes(data), data


async def _in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


# -- the conformance suite ------------------------------------------------------------------


class TestS3Cache(CacheBackendSuite):
    @pytest.fixture
    async def backend(self, s3_bucket: S3Bucket) -> AsyncIterator[CacheBackend]:
        cache = S3Cache(s3_bucket.config(prefix="suite/", timeout_seconds=30.0))
        yield cache
        await cache.aclose()

    @pytest.fixture
    async def second_backend(
        self, s3_bucket: S3Bucket, backend: CacheBackend
    ) -> AsyncIterator[CacheBackend]:
        cache = S3Cache(s3_bucket.config(prefix="suite/", timeout_seconds=30.0))
        yield cache
        await cache.aclose()

    @pytest.fixture
    def corrupt(self, s3_bucket: S3Bucket) -> CorruptHook:
        async def corrupt(backend: CacheBackend, digest: Digest) -> None:
            assert isinstance(backend, S3Cache)
            key = backend.cas_key(digest)
            client = s3_bucket.client
            data = await _in_thread(
                lambda: client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()
            )
            flipped = bytes([data[0] ^ 0xFF]) + data[1:]  # same size: only the hash tells
            await _in_thread(
                lambda: client.put_object(Bucket=s3_bucket.name, Key=key, Body=flipped)
            )

        return corrupt


# -- configuration and registration ---------------------------------------------------------


def test_config_defaults() -> None:
    config = S3CacheConfig(bucket="rulework-cache")
    assert (config.prefix, config.endpoint_url, config.region) == ("", None, "us-east-1")
    assert config.read and config.write
    assert config.timeout_seconds > 0 and config.max_concurrency >= 1


def test_config_reports_every_problem_with_its_key_path() -> None:
    with pytest.raises(ConfigError) as info:
        S3CacheConfig(
            bucket="team/bucket",
            prefix="/abs",
            endpoint_url="ftp://example",
            timeout_seconds=0,
            max_concurrency=0,
            multipart_part_bytes=1024,
            addressing_style="sideways",  # type: ignore[arg-type]
        )
    paths = [path for path, _ in info.value.problems]
    assert paths == [
        "cache.s3.bucket",
        "cache.s3.prefix",
        "cache.s3.endpoint_url",
        "cache.s3.timeout_seconds",
        "cache.s3.max_concurrency",
        "cache.s3.multipart_part_bytes",
        "cache.s3.addressing_style",
    ]
    message = str(info.value)
    assert "'team/bucket'" in message and "put a key prefix in `prefix`" in message
    assert "http:// or https://" in message


def test_config_file_section(tmp_path: Path) -> None:
    from rulework.engine.config import load_config

    good = tmp_path / "rulework.toml"
    good.write_text(
        '[cache]\nremote = "s3"\n\n[cache.s3]\nbucket = "rulework-cache"\nprefix = "team-a/"\n'
        'endpoint_url = "http://127.0.0.1:9000"\nwrite = false\ntimeout_seconds = 3\n'
        'addressing_style = "path"\n'
    )
    settings = load_config(good).cache.settings("s3")
    assert settings == S3CacheConfig(
        bucket="rulework-cache",
        prefix="team-a/",
        endpoint_url="http://127.0.0.1:9000",
        write=False,
        timeout_seconds=3.0,
        addressing_style="path",
    )
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[cache]\nremote = "s3"\n\n[cache.s3]\nbucket = "b"\nprefix = "/x"\n'
        'secret_access_key = "never here"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "cache.s3.secret_access_key" in str(info.value)
    bad.write_text('[cache]\nremote = "s3"\n\n[cache.s3]\nbucket = "b"\nmax_concurrency = 0\n')
    with pytest.raises(ConfigError, match=r"at least 1.* @ cache\.s3\.max_concurrency"):
        load_config(bad)


def test_registered_under_its_entry_point() -> None:
    from rulework.engine.registry import cache_backend_class

    assert cache_backend_class("s3") is S3Cache
    assert S3Cache.config_type is S3CacheConfig


def test_addressing_styles() -> None:
    aws = S3Cache(S3CacheConfig(bucket="my-cache", region="eu-west-1"))
    assert aws._base_url == "https://my-cache.s3.eu-west-1.amazonaws.com"
    dotted = S3Cache(S3CacheConfig(bucket="my.cache", region="eu-west-1"))
    assert dotted._base_url == "https://s3.eu-west-1.amazonaws.com/my.cache"
    custom = S3Cache(S3CacheConfig(bucket="c", endpoint_url="http://127.0.0.1:9000/"))
    assert custom._base_url == "http://127.0.0.1:9000/c"
    virtual = S3Cache(
        S3CacheConfig(bucket="cache", endpoint_url="http://minio:9000", addressing_style="virtual")
    )
    assert virtual._base_url == "http://cache.minio:9000"


def test_counters_cover_every_statistic() -> None:
    cache = S3Cache(S3CacheConfig(bucket="b"))
    assert cache.statistics() == type(cache.statistics())()


# -- layout, prefixes, conditional writes ---------------------------------------------------


async def test_layout_and_prefix_isolation(s3_bucket: S3Bucket) -> None:
    team_a = S3Cache(s3_bucket.config(prefix="team-a/"))
    team_b = S3Cache(s3_bucket.config(prefix="team b+"))  # a '/' is added; odd characters work
    digest, data = _blob(1)
    try:
        await team_a.put_action("k1", b"from a")
        await team_b.put_action("k1", b"from b")
        await team_a.write_blobs({digest: data})
        assert await team_a.get_action("k1") == b"from a"
        assert await team_b.get_action("k1") == b"from b"
        assert await team_b.find_missing_blobs([digest]) == {digest}
        assert await team_b.read_blobs([digest]) == {}
        assert await team_a.read_blobs([digest]) == {digest: data}
    finally:
        await team_a.aclose()
        await team_b.aclose()
    assert await _in_thread(s3_bucket.keys) == sorted(
        ["team-a/ac/k1", f"team-a/cas/{digest.fingerprint}", "team b+/ac/k1"]
    )


async def test_blob_writes_never_replace_an_existing_object(s3_bucket: S3Bucket) -> None:
    cache = S3Cache(s3_bucket.config())
    digest, data = _blob(2, 1000)
    try:
        await cache.write_blobs({digest: data})
        written = cache.statistics().bytes_written
        # A second write is a no-op (the server answers 412), not an error.
        await cache.write_blobs({digest: data})
        assert cache.statistics().bytes_written == written
        assert cache.statistics().errors == 0
        # Another writer's object of the same size stays as it is: If-None-Match guards it.
        other = _data(3, 1000)
        key = cache.cas_key(digest)
        await _in_thread(
            lambda: s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=other)
        )
        await cache.write_blobs({digest: data})
        assert await cache.read_blobs([digest]) == {digest: other}
    finally:
        await cache.aclose()


async def test_action_entries_are_replaced(s3_bucket: S3Bucket) -> None:
    cache = S3Cache(s3_bucket.config())
    try:
        await cache.put_action("k", b"first")
        await cache.put_action("k", b"second")  # a repair must be able to overwrite
        assert await cache.get_action("k") == b"second"
    finally:
        await cache.aclose()


async def test_object_of_the_wrong_size_is_missing_and_repaired(
    s3_bucket: S3Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    cache = S3Cache(s3_bucket.config())
    digest, data = _blob(4, 500)
    key = cache.cas_key(digest)
    await _in_thread(
        lambda: s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=key, Body=b"truncated")
    )
    try:
        with caplog.at_level(logging.WARNING, logger="rulework"):
            assert await cache.find_missing_blobs([digest]) == {digest}
        assert "9 bytes but its digest says 500" in caplog.text
        assert cache.statistics().corrupt_evicted == 1
        await cache.write_blobs({digest: data})
        assert await cache.read_blobs([digest]) == {digest: data}
    finally:
        await cache.aclose()


async def test_read_false_serves_nothing(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    writer = S3Cache(s3_bucket.config())
    reader = S3Cache(s3_bucket.config(read=False))
    digest, data = _blob(5)
    try:
        await writer.put_action("k", b"v")
        await writer.write_blobs({digest: data})
        assert await reader.get_action("k") is None
        assert await reader.read_blobs([digest]) == {}
        assert await reader.read_blob_to_file(digest, tmp_path / "out") is False
        # Still asked before uploading, so that a write-only cache does not resend blobs.
        assert await reader.find_missing_blobs([digest]) == frozenset()
        assert reader.statistics().bytes_read == 0
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_write_false_writes_nothing(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    cache = S3Cache(s3_bucket.config(write=False))
    digest, data = _blob(6)
    src = tmp_path / "src"
    src.write_bytes(data)
    try:
        await cache.put_action("k", b"v")
        await cache.write_blobs({digest: data})
        await cache.write_blob_from_file(digest, src)
        assert await cache.get_action("k") is None
        assert await cache.find_missing_blobs([digest]) == {digest}
    finally:
        await cache.aclose()
    assert await _in_thread(s3_bucket.keys) == []


# -- multipart uploads ----------------------------------------------------------------------

_PART = 5 * _MiB


def _write_file(path: Path, size: int) -> Digest:
    data = _data(size, size)
    path.write_bytes(data)
    return Digest.of_bytes(data)


async def test_big_files_go_up_in_parts(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    cache = S3Cache(s3_bucket.config(multipart_part_bytes=_PART))
    src = tmp_path / "big"
    digest = await _in_thread(lambda: _write_file(src, 2 * _PART + 123))
    try:
        await cache.write_blob_from_file(digest, src)
        head = await _in_thread(
            lambda: s3_bucket.client.head_object(Bucket=s3_bucket.name, Key=cache.cas_key(digest))
        )
        assert head["ETag"].strip('"').endswith("-3")  # three parts
        assert head["ContentLength"] == digest.serialized_bytes_length
        assert await _in_thread(s3_bucket.multipart_uploads) == []
        dest = tmp_path / "back"
        assert await cache.read_blob_to_file(digest, dest) is True
        assert dest.read_bytes() == src.read_bytes()
        left = await _in_thread(lambda: sorted(p.name for p in tmp_path.iterdir()))
        assert left == ["back", "big"]  # no temporary file left behind
        # Uploading it again only asks whether it is there: one HEAD request.
        before, requests = cache.statistics().bytes_written, cache.requests_sent
        await cache.write_blob_from_file(digest, src)
        assert cache.statistics().bytes_written == before
        assert cache.requests_sent == requests + 1
    finally:
        await cache.aclose()


class _PartGate:
    """Holds the upload of part 2 in its worker thread until the test says so."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = trio.Event()
        self.release = threading.Event()
        token = trio.lowlevel.current_trio_token()
        original = s3_module._pread_and_hash

        def gated(fd: int, length: int, offset: int) -> tuple[bytes, str]:
            if offset > 0:
                trio.from_thread.run_sync(self.reached.set, trio_token=token)
                self.release.wait(timeout=60)
            return original(fd, length, offset)

        monkeypatch.setattr(s3_module, "_pread_and_hash", gated)


async def test_cancelled_multipart_upload_is_aborted(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = S3Cache(s3_bucket.config(multipart_part_bytes=_PART))
    src = tmp_path / "big"
    digest = await _in_thread(lambda: _write_file(src, 2 * _PART + 1))
    gate = _PartGate(monkeypatch)
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cache.write_blob_from_file, digest, src)
                await gate.reached.wait()
                assert len(await _in_thread(s3_bucket.multipart_uploads)) == 1
                scope.cancel()
                gate.release.set()
        assert scope.cancelled_caught
        assert await cache.find_missing_blobs([digest]) == {digest}
        assert await _in_thread(s3_bucket.multipart_uploads) == []
    finally:
        gate.release.set()
        await cache.aclose()


# -- faults: every failure is a CacheBackendError, in bounded time -------------------------


@pytest.fixture
def private_server(
    s3_server_factory: Callable[[], MotoServer], s3_env: None
) -> Iterator[MotoServer]:
    server = s3_server_factory()
    yield server
    server.stop()


async def test_server_killed_in_the_middle_of_an_upload(
    private_server: MotoServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = await _in_thread(lambda: make_bucket(private_server))
    cache = S3Cache(bucket.config(multipart_part_bytes=_PART, timeout_seconds=2.0))
    src = tmp_path / "big"
    digest = await _in_thread(lambda: _write_file(src, 2 * _PART + 1))
    await cache.put_action("before", b"ok")
    gate = _PartGate(monkeypatch)
    failure: list[BaseException] = []

    async def upload() -> None:
        try:
            await cache.write_blob_from_file(digest, src)
        except CacheBackendError as exc:
            failure.append(exc)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                await gate.reached.wait()
                await _in_thread(private_server.kill)
                started = time.monotonic()
                gate.release.set()
        assert time.monotonic() - started < 15
        assert len(failure) == 1 and isinstance(failure[0], S3UnavailableError)
        assert "write_blob_from_file" in str(failure[0])
        assert bucket.name in str(failure[0])
        # Later calls fail at once, without waiting on a dead server again.
        started = time.monotonic()
        with pytest.raises(S3UnavailableError, match="not retrying"):
            await cache.get_action("before")
        assert time.monotonic() - started < 1
        assert cache.statistics().errors == 2
    finally:
        gate.release.set()
        await cache.aclose()


async def test_frozen_server_times_out(private_server: MotoServer) -> None:
    bucket = await _in_thread(lambda: make_bucket(private_server))
    cache = S3Cache(bucket.config(timeout_seconds=0.5))
    digests = [_blob(i)[0] for i in range(100)]
    private_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(S3TimeoutError) as info:
            await cache.find_missing_blobs(digests)
        assert time.monotonic() - started < 5  # one timeout, not one per queued request
        assert "0.5s" in str(info.value) and "find_missing_blobs" in str(info.value)
        assert isinstance(info.value, TimeoutError)
    finally:
        private_server.thaw()
        await cache.aclose()


async def test_closed_port_fails_fast(s3_env: None) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens there once closed
    cache = S3Cache(
        S3CacheConfig(bucket="nowhere", endpoint_url=f"http://127.0.0.1:{port}", timeout_seconds=5)
    )
    try:
        started = time.monotonic()
        with pytest.raises(S3UnavailableError) as info:
            await cache.get_action("some-key")
        assert time.monotonic() - started < 3
        message = str(info.value)
        assert "get_action" in message and "s3://nowhere/ac/some-key" in message
        assert f"127.0.0.1:{port}" in message and "endpoint_url" in message
        assert DUMMY_SECRET_KEY not in message
        assert isinstance(info.value, CacheBackendError)
    finally:
        await cache.aclose()


async def test_missing_bucket(s3_server: MotoServer, s3_env: None) -> None:
    cache = S3Cache(S3CacheConfig(bucket="no-such-bucket-here", endpoint_url=s3_server.endpoint))
    try:
        with pytest.raises(S3BucketNotFoundError, match="does not exist there: create it"):
            await cache.put_action("k", b"v")
    finally:
        await cache.aclose()


async def test_no_credentials(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    cache = S3Cache(s3_bucket.config())
    try:
        with pytest.raises(S3AccessDeniedError, match="cannot get AWS credentials"):
            await cache.get_action("k")
    finally:
        await cache.aclose()


async def test_unknown_profile(s3_bucket: S3Bucket) -> None:
    cache = S3Cache(s3_bucket.config(profile="no-such-profile"))
    try:
        with pytest.raises(S3AccessDeniedError, match="no-such-profile"):
            await cache.get_action("k")
    finally:
        await cache.aclose()


async def test_cache_layer_degrades_to_local_with_one_warning(private_server: MotoServer) -> None:
    bucket = await _in_thread(lambda: make_bucket(private_server))
    remote = S3Cache(bucket.config(timeout_seconds=2.0))
    local = MemoryCache()
    digest, data = _blob(7)
    await local.write_blobs({digest: data})
    async with open_cache_layer(local, remote) as layer:
        await layer.put_action("shared", b"value", digests=[digest])
    # Closing the layer flushed the upload: the entry is in the bucket. The next session
    # loses the server half-way.
    with pytest.warns(RemoteCacheWarning) as caught:
        async with open_cache_layer(local, remote) as layer:
            assert await layer.get_action("shared") == (b"value", "local_cache")
            await _in_thread(private_server.kill)
            for i in range(20):
                assert await layer.get_action(f"absent-{i}") is None
                await layer.put_action(f"new-{i}", b"v", digests=[digest])
            assert await layer.get_action("shared") == (b"value", "local_cache")
            stats = layer.statistics()
    await remote.aclose()
    await local.aclose()
    assert stats.remote_degraded
    warned = [str(w.message) for w in caught if issubclass(w.category, RemoteCacheWarning)]
    assert len(warned) == 1, warned
    assert "S3UnavailableError" in warned[0] and bucket.name in warned[0]


async def test_remote_hit_through_the_cache_layer(s3_bucket: S3Bucket) -> None:
    # What a second machine sees: an empty local cache served from the shared bucket.
    digest, data = _blob(8, 3000)
    first_local, second_local = MemoryCache(), MemoryCache()
    remote = S3Cache(s3_bucket.config(prefix="shared/"))
    try:
        await first_local.write_blobs({digest: data})
        async with open_cache_layer(first_local, remote) as layer:
            await layer.put_action("key", b"result", digests=[digest])
        async with open_cache_layer(second_local, remote) as layer:
            assert await layer.get_action("key") == (b"result", "remote_cache")
        assert await second_local.read_blobs([digest]) == {digest: data}
    finally:
        await remote.aclose()
        await first_local.aclose()
        await second_local.aclose()


# -- whole engines sharing a bucket ---------------------------------------------------------


@dataclass(frozen=True)
class Build:
    name: str
    log: str  # an absolute path outside the sandbox: each real run appends a line to it


@dataclass(frozen=True)
class Built:
    output: str
    source: str


def _build_process(build: Build) -> Process:
    return Process(
        argv=("/bin/sh", "-c", f"echo {build.name} >> {build.log}; printf %s {build.name}-built"),
        description=f"build {build.name}",
    )


@rule
async def run_build(build: Build) -> Built:
    result = await Get(ProcessResult, Process, _build_process(build))
    return Built(result.stdout.decode(), result.metadata.source)


@dataclass(frozen=True)
class Workflow:
    names: tuple[str, ...]
    log: str
    kill_server: int  # the PID a step of the workflow kills half-way


@dataclass(frozen=True)
class WorkflowDone:
    outputs: tuple[str, ...]


@rule
async def run_workflow(workflow: Workflow) -> WorkflowDone:
    half = len(workflow.names) // 2
    first = await MultiGet(Get(Built, Build(n, workflow.log)) for n in workflow.names[:half])
    # The remote cache's server dies here, while the first half's uploads are in flight.
    await Get(
        ProcessResult,
        Process(argv=("/bin/kill", "-9", str(workflow.kill_server)), description="kill s3"),
    )
    second = await MultiGet(Get(Built, Build(n, workflow.log)) for n in workflow.names[half:])
    return WorkflowDone(tuple(b.output for b in (*first, *second)))


def _engine_config(bucket: S3Bucket, prefix: str) -> dict[str, Any]:
    # Each Engine keeps its own in-memory local cache: only the bucket is shared.
    settings = {"bucket": bucket.name, "endpoint_url": bucket.endpoint, "prefix": prefix}
    return {"cache": {"local": "memory", "remote": "s3", "s3": settings | {"timeout_seconds": 5}}}


async def test_two_engines_share_results_through_the_bucket(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    log = tmp_path / "runs.log"
    rules = [run_build, QueryRule(Built, (Build,))]
    first = Engine(rules, config=_engine_config(s3_bucket, "engines/"), root=tmp_path)
    async with first.session() as session:
        assert await session.get(Built, Build("lib", str(log))) == Built("lib-built", "ran")
    # The first session's close flushed its uploads. Another engine, another local cache:
    second = Engine(rules, config=_engine_config(s3_bucket, "engines/"), root=tmp_path)
    async with second.session() as session:
        built = await session.get(Built, Build("lib", str(log)))
        assert session.statistics().cache_hits == {"remote_cache": 1}
    assert built == Built("lib-built", "remote_cache")
    assert log.read_text() == "lib\n"  # the process ran once, on the first engine only


async def test_server_killed_in_the_middle_of_a_workflow(
    private_server: MotoServer, tmp_path: Path
) -> None:
    bucket = await _in_thread(lambda: make_bucket(private_server))
    log = tmp_path / "runs.log"
    names = tuple(f"step{i}" for i in range(8))
    engine = Engine(
        [run_build, run_workflow, QueryRule(WorkflowDone, (Workflow,))],
        config=_engine_config(bucket, "workflow/"),
        root=tmp_path,
    )
    started = time.monotonic()
    with pytest.warns(RemoteCacheWarning) as caught:
        async with engine.session() as session:
            done = await session.get(WorkflowDone, Workflow(names, str(log), private_server.pid))
    assert done == WorkflowDone(tuple(f"{n}-built" for n in names))
    assert sorted(log.read_text().split()) == sorted(names)
    assert private_server.process.wait(timeout=30) == -9
    warned = [str(w.message) for w in caught if issubclass(w.category, RemoteCacheWarning)]
    assert len(warned) == 1, warned
    assert "S3UnavailableError" in warned[0]
    assert time.monotonic() - started < 60


# -- credentials and access, on a server that checks them -----------------------------------


def _use_keys(monkeypatch: pytest.MonkeyPatch, keys: tuple[str, str]) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[1])


def _auth_config(users: AuthUsers, **overrides: Any) -> S3CacheConfig:
    return S3CacheConfig(
        bucket=users.bucket, endpoint_url=users.server.endpoint, timeout_seconds=10, **overrides
    )


async def test_signed_requests_are_accepted(
    s3_auth_server: AuthUsers, s3_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_keys(monkeypatch, s3_auth_server.writer)
    # Odd characters in the prefix must be encoded exactly as they are signed.
    cache = S3Cache(_auth_config(s3_auth_server, prefix="signed b+=/", multipart_part_bytes=_PART))
    small, data = _blob(9, 2000)
    src = tmp_path / "big"
    big = await _in_thread(lambda: _write_file(src, _PART + 10))
    try:
        # Every kind of request: PUT (plain and If-None-Match), GET, HEAD, DELETE, multipart.
        await cache.put_action("k", b"v")
        assert await cache.get_action("k") == b"v"
        await cache.write_blobs({small: data})
        await cache.write_blobs({small: data})
        assert await cache.find_missing_blobs([small, big]) == {big}
        await cache.write_blob_from_file(big, src)
        assert await cache.read_blob_to_file(big, tmp_path / "back") is True
        assert (tmp_path / "back").read_bytes() == src.read_bytes()
        await cache.evict([small])
        assert await cache.read_blobs([small]) == {}
    finally:
        await cache.aclose()


async def test_credentials_from_a_profile(
    s3_auth_server: AuthUsers, s3_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    access, secret = s3_auth_server.writer
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[ci]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    cache = S3Cache(_auth_config(s3_auth_server, prefix="profile/", profile="ci"))
    try:
        await cache.put_action("k", b"from a profile")
        assert await cache.get_action("k") == b"from a profile"
    finally:
        await cache.aclose()


async def test_access_denied_is_a_clear_error(
    s3_auth_server: AuthUsers, s3_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_keys(monkeypatch, s3_auth_server.nobody)
    cache = S3Cache(_auth_config(s3_auth_server))
    try:
        with pytest.raises(S3AccessDeniedError) as info:
            await cache.get_action("k")
    finally:
        await cache.aclose()
    message = str(info.value)
    assert "get_action" in message and f"s3://{s3_auth_server.bucket}/ac/k" in message
    assert "HTTP 403" in message and "s3:GetObject" in message
    assert s3_auth_server.nobody[1] not in message
    assert isinstance(info.value, PermissionError)


async def test_read_only_credentials_cannot_write(
    s3_auth_server: AuthUsers, s3_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_keys(monkeypatch, s3_auth_server.writer)
    writer = S3Cache(_auth_config(s3_auth_server, prefix="ro/"))
    try:
        await writer.put_action("k", b"shared")
    finally:
        await writer.aclose()
    _use_keys(monkeypatch, s3_auth_server.reader)
    reader = S3Cache(_auth_config(s3_auth_server, prefix="ro/"))
    try:
        assert await reader.get_action("k") == b"shared"
        with pytest.raises(S3AccessDeniedError, match="put_action"):
            await reader.put_action("k2", b"nope")
    finally:
        await reader.aclose()


async def test_wrong_secret_is_reported_as_invalid_credentials(
    s3_auth_server: AuthUsers, s3_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    access, _ = s3_auth_server.writer
    _use_keys(monkeypatch, (access, "not-the-secret"))
    cache = S3Cache(_auth_config(s3_auth_server))
    try:
        with pytest.raises(S3AccessDeniedError, match="invalid or expired") as info:
            await cache.get_action("k")
    finally:
        await cache.aclose()
    assert "not-the-secret" not in str(info.value)
    assert info.value.code == "SignatureDoesNotMatch"


# -- trio runs ------------------------------------------------------------------------------


def test_one_backend_across_trio_runs(s3_bucket: S3Bucket) -> None:
    # `engine.run()` starts a trio run per call: the backend must work in each of them.
    cache = S3Cache(s3_bucket.config())

    async def read_and_close() -> bytes | None:
        value = await cache.get_action("k")
        await cache.aclose()
        return value

    trio.run(cache.put_action, "k", b"one run")
    assert trio.run(read_and_close) == b"one run"


async def test_errors_are_counted(s3_env: None) -> None:
    cache = S3Cache(S3CacheConfig(bucket="b", endpoint_url="http://127.0.0.1:1", max_attempts=1))
    try:
        for _ in range(3):
            with pytest.raises(S3CacheError):
                await cache.get_action("k")
        assert cache.statistics().errors == 3
    finally:
        await cache.aclose()


def test_config_has_no_place_for_secrets() -> None:
    fields = set(S3CacheConfig.__dataclass_fields__)
    assert not {f for f in fields if "secret" in f or "key" in f or "token" in f}
