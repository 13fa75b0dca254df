"""Process throughput of the `container` executor, in both modes, against the plain CLI.

For each mode, COUNT trivial Processes (`true`) run through `ContainerExecutor.execute`
(sandbox materialized and removed, container started or exec'd, outputs captured) with
PARALLELISM at once; the baseline runs the same number of bare runtime commands at the same
parallelism in the same run: `docker run --rm IMAGE true` for mode "run", and
`docker exec CONTAINER true` into one idle container for mode "exec". Prints one line per mode:

    process_throughput env=container mode=run|exec parallelism=P rulework_per_s=A
        baseline_per_s=B ratio=B/A

(ratio above 1: rulework is that many times slower than the bare CLI.)

The image is a busybox rootfs imported into the daemon (no registry needed). With DOCKER_HOST
unset, a private dockerd is started for the run (needs root and Debian's docker.io +
busybox-static, see .ci/setup.d/docker.sh); with DOCKER_HOST set, that daemon is used.

Usage: python bench/container_process.py [--parallelism P] [--count N] [--modes run,exec]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rulework.backends.container import (  # noqa: E402
    ContainerEnvironmentConfig,
    ContainerExecutor,
)
from rulework.engine.process import Process  # noqa: E402
from rulework.engine.store import FileBlobStore, Store  # noqa: E402
from tests.services.svc_docker import (  # noqa: E402
    DockerDaemon,
    import_busybox_image,
    start_dockerd,
    stop_dockerd,
)

IMAGE = "rulework-bench/busybox:latest"


async def run_all(count: int, parallelism: int, one: Callable[[], Awaitable[None]]) -> float:
    """Run `one` `count` times, `parallelism` at once; the wall time in seconds."""
    limiter = trio.CapacityLimiter(parallelism)

    async def limited() -> None:
        async with limiter:
            await one()

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(limited)
    return time.perf_counter() - started


async def bare(argv: list[str]) -> None:
    await trio.run_process(argv, stdin=subprocess.DEVNULL, capture_stdout=True, capture_stderr=True)


async def measure(mode: str, parallelism: int, count: int, docker: str, store: Store) -> str:
    executor = ContainerExecutor(
        "bench",
        ContainerEnvironmentConfig(
            image=IMAGE, mode="exec" if mode == "exec" else "run", parallelism=parallelism
        ),
    )
    await executor.open(store)
    try:
        process = Process(("true",))

        async def through_rulework() -> None:
            result = await executor.execute(process, store)
            assert result.exit_code == 0, result.stderr

        await through_rulework()  # warm-up (and, in exec mode, starts the container)
        rulework_s = await run_all(count, parallelism, through_rulework)
    finally:
        await executor.aclose()

    idle = ""
    if mode == "run":
        baseline_argv = [docker, "run", "--rm", "--network=none", IMAGE, "true"]
    else:
        started = await trio.run_process(
            [docker, "run", "-d", "-i", "--init", "--network=none", IMAGE, "sh", "-c", "read _"],
            capture_stdout=True,
        )
        idle = started.stdout.decode().strip()
        baseline_argv = [docker, "exec", idle, "true"]
    try:
        await bare(baseline_argv)  # warm-up
        baseline_s = await run_all(count, parallelism, lambda: bare(baseline_argv))
    finally:
        if idle:
            await trio.run_process([docker, "rm", "-f", idle], capture_stdout=True, check=False)

    rulework_per_s, baseline_per_s = count / rulework_s, count / baseline_s
    return (
        f"process_throughput env=container mode={mode} parallelism={parallelism} "
        f"rulework_per_s={rulework_per_s:.2f} baseline_per_s={baseline_per_s:.2f} "
        f"ratio={baseline_per_s / rulework_per_s:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallelism", type=int, default=4)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--modes", default="run,exec")
    args = parser.parse_args()
    docker = shutil.which("docker")
    if docker is None:
        sys.exit("docker CLI not found (see .ci/setup.d/docker.sh)")

    work = Path(tempfile.mkdtemp(prefix="rw-bench-container-"))
    daemon: DockerDaemon | None = None
    try:
        if not os.environ.get("DOCKER_HOST"):
            dockerd = shutil.which("dockerd")
            if dockerd is None:
                sys.exit("DOCKER_HOST is unset and dockerd is not installed")
            started = start_dockerd(dockerd, docker, work / "dockerd", "overlay2")
            if isinstance(started, str):
                started = start_dockerd(dockerd, docker, work / "dockerd-vfs", "vfs")
            if isinstance(started, str):
                sys.exit(f"could not start dockerd:\n{started}")
            daemon = started
            os.environ["DOCKER_HOST"] = daemon.host
        host = os.environ["DOCKER_HOST"]
        import_busybox_image(DockerDaemon(host, work, None, "", docker), IMAGE)
        store = Store(FileBlobStore(work / "cas"))
        for mode in args.modes.split(","):
            line = trio.run(measure, mode, args.parallelism, args.count, docker, store)
            print(line, flush=True)
    finally:
        if daemon is not None:
            assert daemon.process is not None
            stop_dockerd(daemon.process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
