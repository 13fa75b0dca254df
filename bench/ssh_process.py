"""Process throughput of the `ssh` executor on loopback, against plain multiplexed `ssh`.

COUNT trivial Processes (`true`) run through `SshExecutor.execute` (remote sandbox created and
removed, env reset, process group watched, exit code/stdout/stderr shipped back as a tar) with
PARALLELISM at once; the baseline runs the same number of bare `ssh -o ControlPath=... HOST true`
commands over the executor's own ControlMaster connection, at the same parallelism, in the same
run. Prints one line:

    process_throughput env=ssh parallelism=P rulework_per_s=A baseline_per_s=B ratio=B/A

(ratio above 1: rulework is that many times slower than bare multiplexed ssh). The goal is
A >= 30 at parallelism 8.

A private sshd is started on 127.0.0.1 for the run (see tests/services/svc_sshd.py; as root it
logs in the dedicated user that .ci/setup.d/ssh.sh creates).

Usage: python bench/ssh_process.py [--parallelism P] [--count N]
"""

from __future__ import annotations

import argparse
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

from rulework.backends.ssh import SshEnvironmentConfig, SshExecutor  # noqa: E402
from rulework.engine.process import Process  # noqa: E402
from rulework.engine.store import FileBlobStore, Store  # noqa: E402
from tests.services.svc_sshd import SshdUnavailable, SshServer, running_sshd  # noqa: E402


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


async def measure(server: SshServer, parallelism: int, count: int, work: Path) -> str:
    store = Store(FileBlobStore(work / "cas"))
    config = SshEnvironmentConfig(
        host=server.host,
        port=server.port,
        user=server.user,
        identity_file=server.identity_file,
        known_hosts=server.known_hosts,
        ssh_config=Path("/dev/null"),
        remote_dir=f"/tmp/rw-bench-ssh-{work.name}",
        parallelism=parallelism,
    )
    executor = SshExecutor("bench", config)
    await executor.open(store)
    try:
        process = Process(("true",))

        async def through_rulework() -> None:
            result = await executor.execute(process, store)
            assert result.exit_code == 0, result.stderr

        async def bare() -> None:
            # The same options (and so the same ControlMaster) as the executor's sessions.
            argv = [*executor._ssh_argv(), "--", config.host, "true"]
            await trio.run_process(argv, stdin=subprocess.DEVNULL, capture_stdout=True)

        for _ in range(parallelism):  # warm-up
            await through_rulework()
            await bare()
        rulework_s = await run_all(count, parallelism, through_rulework)
        baseline_s = await run_all(count, parallelism, bare)
    finally:
        await executor.aclose()
        shutil.rmtree(config.remote_dir, ignore_errors=True)

    rulework_per_s, baseline_per_s = count / rulework_s, count / baseline_s
    return (
        f"process_throughput env=ssh parallelism={parallelism} "
        f"rulework_per_s={rulework_per_s:.2f} baseline_per_s={baseline_per_s:.2f} "
        f"ratio={baseline_per_s / rulework_per_s:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallelism", type=int, default=8)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rw-bench-ssh-"))
    try:
        with running_sshd() as server:
            print(trio.run(measure, server, args.parallelism, args.count, work), flush=True)
    except SshdUnavailable as exc:
        sys.exit(str(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
