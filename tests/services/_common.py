"""What every service fixture needs: a free loopback port, waiting for a listener, and the
policy for a missing service (skip locally, fail under CI=true)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from typing import NoReturn

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
