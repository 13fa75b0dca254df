"""What every service fixture needs: a free loopback port, waiting for a listener, and the
policy for a missing service (skip locally, fail under CI=true)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import NoReturn, Protocol, TypeVar

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_listening(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Poll until something accepts connections on `port` (True), `process` exits or the
    timeout passes (False). Servers that print no readiness line leave nothing else to wait on.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            return True
        time.sleep(0.02)
    return False


def unavailable(reason: str) -> NoReturn:
    """A service the tests need is missing: skip locally, but fail in CI, where it must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: service tests must run in CI, not skip)")
    pytest.skip(reason)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server by PID: resume it if frozen, SIGTERM, then SIGKILL if it lingers; reap."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)  # a frozen process cannot handle SIGTERM
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class _Stoppable(Protocol):
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Stoppable)


@contextlib.contextmanager
def private_servers(start: Callable[[], _S]) -> Iterator[Callable[[], _S]]:
    """For a test that stops, kills or freezes servers: `start()` makes one; all are stopped
    on the way out (never the session's shared one)."""
    servers: list[_S] = []

    def launch() -> _S:
        server = start()
        servers.append(server)
        return server

    try:
        yield launch
    finally:
        for server in servers:
            server.stop()
