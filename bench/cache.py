"""Process-cache hits and puts per cache backend, against baselines measured in the same run.

    python bench/cache.py [--hits 2000]

A *hit* is what the process runner does for a cached process: `CacheLayer.get_action(key)`,
i.e. the backend's `get_action` plus a `find_missing_blobs` of the blobs the entry names
(stdout, stderr and a small output tree: 5 blobs). A *put* stores stdout and stderr
(`write_blobs`) and the entry (`CacheLayer.put_action`, which checks its blobs are present).
Backends named `..._x8` run 8 hits (and puts) at once, as an engine running 8 processes does:
the sqlite backend group-commits concurrent writes, `cache_put_commits` says how many
transactions its puts took.

Output, one line per figure:

    cache_baseline kind=K us_per_op=U
    cache_hit backend=B us_per_hit=U
    cache_put backend=B us_per_put=U
    cache_put_commits backend=B operations=N transactions=T

Backends are listed in `BACKENDS`; another backend's owner adds a `BenchBackend` there (the
s3 backend runs as a layer's remote, with `concurrency` hits in flight).
"""

from __future__ import annotations

import argparse
import itertools
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import trio

from rulework.abc import CacheBackend
from rulework.backends.memory import MemoryCache, MemoryCacheConfig
from rulework.backends.sqlite import SqliteCache, SqliteCacheConfig
from rulework.engine.cache import CacheLayer, open_cache_layer
from rulework.engine.fs import CreateDigest, Digest, FileContent
from rulework.engine.store import Store

_T = TypeVar("_T")


@dataclass(frozen=True)
class BenchBackend:
    """A backend to measure: `open(directory)` yields an opened backend and closes it."""

    name: str
    open: Callable[[Path], AbstractAsyncContextManager[CacheBackend]]
    #: "local": the layer's local cache. "remote": the layer's remote, with no local cache,
    #: so every hit reads the entry over the network and downloads its blobs.
    role: Literal["local", "remote"] = "local"
    #: Hits (and puts) in flight at once.
    concurrency: int = 1


@asynccontextmanager
async def _memory(directory: Path) -> AsyncIterator[CacheBackend]:
    cache = MemoryCache(MemoryCacheConfig(max_bytes=None))
    yield cache
    await cache.aclose()


@asynccontextmanager
async def _sqlite(directory: Path) -> AsyncIterator[CacheBackend]:
    cache = SqliteCache(SqliteCacheConfig(), directory / f"sqlite-{next(_COUNTER)}")
    await cache.open()
    try:
        yield cache
    finally:
        await cache.aclose()


_COUNTER = itertools.count()


@asynccontextmanager
async def _sqlite_threads_only(directory: Path) -> AsyncIterator[CacheBackend]:
    options: dict[str, bool] = {"loop_thread_reads": False}
    if "loop_thread_writes" in SqliteCacheConfig.__dataclass_fields__:
        options["loop_thread_writes"] = False
    cache = SqliteCache(SqliteCacheConfig(**options), directory / f"sqlite-t{next(_COUNTER)}")
    await cache.open()
    try:
        yield cache
    finally:
        await cache.aclose()


BACKENDS: list[BenchBackend] = [
    BenchBackend("memory", _memory),
    BenchBackend("sqlite", _sqlite),
    # The same database without the event-loop fast paths, to show what they buy.
    BenchBackend("sqlite_threads_only", _sqlite_threads_only),
    # 8 operations in flight, as under an engine running 8 processes: group commits form.
    BenchBackend("memory_x8", _memory, concurrency=8),
    BenchBackend("sqlite_x8", _sqlite, concurrency=8),
    BenchBackend("sqlite_threads_only_x8", _sqlite_threads_only, concurrency=8),
]


def _write_counts(backend: CacheBackend) -> tuple[int, int] | None:
    """(operations, transactions) a group-committing backend reports so far; None if it does
    not (the memory backend, or a sqlite backend from before group commit)."""
    write_statistics = getattr(backend, "write_statistics", None)
    if write_statistics is None:
        return None
    stats = write_statistics()
    return stats.operations, stats.transactions


# -- timing ----------------------------------------------------------------------------------

# The machine is shared: each figure is the median over ROUNDS equal slices of the work, so a
# burst of load from elsewhere spoils one slice, not the figure.
ROUNDS = 10


def _median_us_sync(items: Sequence[_T], op: Callable[[_T], object]) -> float:
    per_round = []
    for chunk in _slices(items):
        start = time.perf_counter()
        for item in chunk:
            op(item)
        per_round.append((time.perf_counter() - start) / len(chunk) * 1e6)
    return statistics.median(per_round)


async def _median_us(
    items: Sequence[_T], op: Callable[[_T], Awaitable[object]], concurrency: int = 1
) -> float:
    per_round = []
    for chunk in _slices(items):
        start = time.perf_counter()
        await _run(chunk, op, concurrency)
        per_round.append((time.perf_counter() - start) / len(chunk) * 1e6)
    return statistics.median(per_round)


def _slices(items: Sequence[_T]) -> list[Sequence[_T]]:
    size = max(1, len(items) // ROUNDS)
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _run(
    items: Sequence[_T], op: Callable[[_T], Awaitable[object]], concurrency: int
) -> None:
    if concurrency == 1:
        for item in items:
            await op(item)
        return
    limiter = trio.CapacityLimiter(concurrency)

    async def one(item: _T) -> None:
        async with limiter:
            await op(item)

    async with trio.open_nursery() as nursery:
        for item in items:
            nursery.start_soon(one, item)


# -- s3 (section owned by the s3 backend) -----------------------------------------------------
# moto's S3 server on loopback, started as in tests/services/svc_s3.py; skipped with a note when
# moto is not installed. Dummy credentials only, set for the bench's duration.


@asynccontextmanager
async def _s3(directory: Path) -> AsyncIterator[CacheBackend]:
    import os

    from rulework.backends.s3 import S3Cache, S3CacheConfig
    from tests.services.svc_s3 import DUMMY_ACCESS_KEY, DUMMY_SECRET_KEY, start_moto_server

    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID=DUMMY_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=DUMMY_SECRET_KEY,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(directory / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(directory / "no-aws-credentials"),
    )
    server = await trio.to_thread.run_sync(start_moto_server, directory)
    cache = None
    try:
        client = server.boto3_client()
        await trio.to_thread.run_sync(lambda: client.create_bucket(Bucket="bench"))
        await _s3_request_floor(server.endpoint, S3_CONCURRENCY)
        cache = S3Cache(
            S3CacheConfig(
                bucket="bench", endpoint_url=server.endpoint, max_concurrency=S3_CONCURRENCY
            )
        )
        yield cache
    finally:
        if cache is not None:
            _report("cache_s3_requests", backend="s3", total=cache.requests_sent)
            await cache.aclose()
        await trio.to_thread.run_sync(server.stop)
        for name in [k for k in os.environ if k.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)


async def _s3_request_floor(endpoint: str, concurrency: int, n: int = 1000) -> None:
    """The server's floor: bare HTTP GETs (a 404 for an absent key) from http.client in
    `concurrency` threads, no signing; what one S3 request costs on this machine at best."""
    import http.client
    from urllib.parse import urlsplit

    host, port = urlsplit(endpoint).hostname, urlsplit(endpoint).port
    # moto routes by the credential scope of the Authorization header; it checks no signature.
    auth = "AWS4-HMAC-SHA256 Credential=x/20200101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"

    def get(i: int) -> None:
        connection = http.client.HTTPConnection(host or "127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", f"/bench/floor/{i}", headers={"Authorization": auth})
            connection.getresponse().read()
        finally:
            connection.close()

    limiter = trio.CapacityLimiter(concurrency)
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(
                lambda i=i: trio.to_thread.run_sync(get, i, limiter=limiter)  # type: ignore[misc]
            )
    _report("cache_baseline", kind="s3_bare_get_loopback", us_per_op=_us(start, n))


def _s3_available() -> bool:
    # The moto launcher lives with the test fixtures (tests/services/svc_s3.py).
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import boto3  # type: ignore[import-untyped]  # noqa: F401
        import moto.server  # noqa: F401

        import rulework.backends.s3  # noqa: F401
        import tests.services.svc_s3  # noqa: F401
    except ImportError as exc:
        print(f"# s3 skipped: {exc} (pip install 'rulework[s3,test]')", flush=True)
        return False
    return True


#: Hits in flight at once, and requests in flight per backend, for the s3 run.
S3_CONCURRENCY = 32

if _s3_available():
    # The remote role: no local cache, so every hit reads the entry and its 5 blobs over HTTP.
    BACKENDS.append(BenchBackend("s3", _s3, role="remote", concurrency=S3_CONCURRENCY))


# -- baselines ---------------------------------------------------------------------------------


async def _baselines(directory: Path, n: int) -> None:
    table = {f"{i:064x}": b"v" * 200 for i in range(n)}
    keys = list(table)
    _report("cache_baseline", kind="dict_lookup", us_per_op=_median_us_sync(keys, table.get))

    path = directory / "baseline.sqlite3"
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (key TEXT PRIMARY KEY, value BLOB)")
    con.execute("BEGIN")
    con.executemany("INSERT INTO t VALUES (?, ?)", table.items())
    con.execute("COMMIT")

    def select(key: str) -> bytes:
        row = con.execute("SELECT value FROM t WHERE key = ?", (key,)).fetchone()
        return bytes(row[0])

    _report("cache_baseline", kind="sqlite_select_direct", us_per_op=_median_us_sync(keys, select))

    # What the writes of a put cost without any batching: one row, one transaction, directly
    # on this thread (SQLite's defaults otherwise: automatic checkpoints included).
    commit_con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    commit_con.execute("PRAGMA synchronous=NORMAL")

    def insert_commit(key: str) -> None:
        commit_con.execute("BEGIN IMMEDIATE")
        commit_con.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", ("w" + key, table[key]))
        commit_con.execute("COMMIT")

    _report(
        "cache_baseline",
        kind="sqlite_commit_one_row_direct",
        us_per_op=_median_us_sync(keys, insert_commit),
    )
    commit_con.close()

    async def select_in_thread(key: str) -> bytes:
        return await trio.to_thread.run_sync(select, key)

    _report(
        "cache_baseline",
        kind="sqlite_select_in_thread",
        us_per_op=await _median_us(keys, select_in_thread),
    )

    async def hop(key: str) -> None:
        await trio.to_thread.run_sync(_nothing)

    _report("cache_baseline", kind="empty_thread_hop", us_per_op=await _median_us(keys, hop))
    con.close()


def _nothing() -> None:
    return None


# -- hits and puts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    key: str
    value: bytes
    stdout: bytes
    stderr: bytes
    tree: Digest


async def _make_entries(layer: CacheLayer, n: int) -> list[_Entry]:
    store = Store(layer.local_blobs)
    entries = []
    for i in range(n):
        tree = await store.create_digest(
            CreateDigest([FileContent(f"out/{i}.o", b"object %d" % i), FileContent("log", b"ok")])
        )
        entries.append(
            _Entry(f"{i:064x}", b"result %d" % i, b"stdout %d" % i, b"stderr %d" % i, tree)
        )
    return entries


async def _put_all(layer: CacheLayer, entries: list[_Entry], concurrency: int) -> float:
    async def put(entry: _Entry) -> None:
        out, err = Digest.of_bytes(entry.stdout), Digest.of_bytes(entry.stderr)
        await layer.local_blobs.write_blobs({out: entry.stdout, err: entry.stderr})
        await layer.put_action(entry.key, entry.value, digests=(out, err), tree_roots=(entry.tree,))

    return await _median_us(entries, put, concurrency)


async def _hit_all(layer: CacheLayer, entries: list[_Entry], concurrency: int) -> float:
    async def hit(entry: _Entry) -> None:
        found = await layer.get_action(entry.key)
        assert found is not None and found[0] == entry.value, entry.key

    return await _median_us(entries, hit, concurrency)


async def _bench_backend(spec: BenchBackend, directory: Path, n: int) -> None:
    async with spec.open(directory) as backend:
        if spec.role == "local":
            async with open_cache_layer(backend, None) as layer:
                entries = await _make_entries(layer, n)
                before = _write_counts(backend)
                put_us = await _put_all(layer, entries, spec.concurrency)
                after = _write_counts(backend)
                if before is not None and after is not None:
                    _report(
                        "cache_put_commits",
                        backend=spec.name,
                        operations=after[0] - before[0],
                        transactions=after[1] - before[1],
                    )
                await _hit_all(layer, entries[: n // 10], spec.concurrency)  # warm up
                hit_us = await _hit_all(layer, entries, spec.concurrency)
        else:
            # Write through a layer whose remote is the backend, then read from a fresh layer
            # without local cache: every hit crosses to the remote.
            async with open_cache_layer(None, backend) as layer:
                entries = await _make_entries(layer, n)
                put_us = await _put_all(layer, entries, spec.concurrency)
            async with open_cache_layer(None, backend) as layer:
                hit_us = await _hit_all(layer, entries, spec.concurrency)
            assert layer.statistics().remote_hits == n, layer.statistics()
    _report("cache_hit", backend=spec.name, us_per_hit=hit_us)
    _report("cache_put", backend=spec.name, us_per_put=put_us)


def _us(start: float, n: int) -> float:
    return (time.perf_counter() - start) / n * 1e6


def _number(value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _report(figure: str, **fields: object) -> None:
    rendered = " ".join(f"{k}={_number(v)}" for k, v in fields.items())
    print(f"{figure} {rendered}", flush=True)


async def main(n: int, only: set[str] | None) -> None:
    with tempfile.TemporaryDirectory(prefix="rulework-bench-cache-") as tmp:
        directory = Path(tmp)
        await _baselines(directory, n)
        for spec in BACKENDS:
            if only is None or spec.name in only:
                await _bench_backend(spec, directory, n)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hits", type=int, default=2000, help="entries written and hit")
    parser.add_argument("--backend", action="append", help="only these backends (repeatable)")
    args = parser.parse_args()
    trio.run(main, args.hits, set(args.backend) if args.backend else None)
    sys.exit(0)
