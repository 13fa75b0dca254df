"""A real OpenSSH server on 127.0.0.1 for the ssh executor's tests.

`sshd_server` (session-scoped) starts `/usr/sbin/sshd -D -e` with its own config, host key,
`authorized_keys` and `known_hosts` in a directory under /tmp that the login user can read
(sshd reads `authorized_keys` as that user, and pytest's temp root is private to root). As root
it logs in a dedicated user created with `useradd --shell /bin/sh --password '*'` (a `!` password
would lock the account); otherwise it runs unprivileged and logs in the current user. Stopped by
PID at the end of the session.

Locally a missing `sshd` skips the tests that need it, with the reason; under `CI=true` it is
a failure (`.ci/setup.d/ssh.sh` installs it).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._common import free_port, unavailable

_SSHD = "/usr/sbin/sshd"
#: The login user of the test server when the tests run as root (see `.ci/setup.d/ssh.sh`).
_LOGIN_USER = "rulework-ssh"
_START_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class SshServer:
    """A running test sshd and the client-side files that reach it.

    `identity_file` is authorized for `user`; `known_hosts` holds the server's host key under
    `[host]:port`; `other_identity_file` is a valid key the server does not accept;
    `other_host_key_line` is a known_hosts line with a key that is not the server's.
    """

    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts: Path
    other_identity_file: Path
    other_host_key_line: str
    directory: Path
    pid: int

    def log(self) -> str:
        """What sshd logged so far (for assertion messages)."""
        return (self.directory / "sshd.log").read_text(errors="replace")


class SshdUnavailable(RuntimeError):
    """A binary the test server needs is not installed."""


def _require(binary: str, why: str) -> str:
    found = (
        shutil.which(binary)
        if "/" not in binary
        else (binary if os.access(binary, os.X_OK) else None)
    )
    if found is None:
        raise SshdUnavailable(
            f"{binary} is not installed ({why}); run .ci/setup.d/ssh.sh as root to install it"
        )
    return found


def _login_user() -> str:
    if os.geteuid() != 0:
        # An unprivileged sshd can only log in the user it runs as.
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(_LOGIN_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", "--password", "*", _LOGIN_USER],
            check=True,
            capture_output=True,
        )
    return _LOGIN_USER


def _keygen(path: Path, comment: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def _write_config(directory: Path, port: int, user: str) -> Path:
    config = directory / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {directory / 'host_key'}",
                f"PidFile {directory / 'sshd.pid'}",
                f"AuthorizedKeysFile {directory / 'authorized_keys'}",
                f"AllowUsers {user}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin no",
                "UsePAM no",
                # The directory is under /tmp, which StrictModes would reject.
                "StrictModes no",
                # The executor multiplexes up to `parallelism` sessions over one connection, and
                # the error tests open several connections at once.
                "MaxSessions 100",
                "MaxStartups 100:30:200",
                "PrintMotd no",
                "PrintLastLog no",
                "LogLevel INFO",
                "",
            ]
        )
    )
    return config


def _drain(stream: object, log: Path, ready: threading.Event) -> None:
    # sshd -e logs to stderr: keep reading it so that sshd never blocks on a full pipe, and
    # signal readiness when it says it listens.
    assert hasattr(stream, "readline")
    with log.open("ab") as out:
        for line in iter(stream.readline, b""):
            out.write(line)
            out.flush()
            if b"Server listening on" in line:
                ready.set()
    ready.set()  # EOF: sshd exited; the caller sees it through poll()


@contextlib.contextmanager
def running_sshd() -> Iterator[SshServer]:
    """Start a private sshd on 127.0.0.1 (see the module docstring); stop it on exit.

    Raises:
        SshdUnavailable: sshd, ssh or ssh-keygen is not installed.
    """
    sshd = _require(_SSHD, "Debian package openssh-server")
    _require("ssh", "Debian package openssh-client")
    _require("ssh-keygen", "Debian package openssh-client")
    user = _login_user()
    if os.geteuid() == 0:
        # sshd refuses to start without its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="rulework-sshd-", dir="/tmp"))
    try:
        # sshd reads authorized_keys as the login user: the directory must be reachable by it.
        directory.chmod(0o755)
        _keygen(directory / "host_key", "rulework-test-host")
        client_public = _keygen(directory / "id_ed25519", "rulework-test-client")
        _keygen(directory / "other_id_ed25519", "rulework-test-unauthorized")
        other_host_public = _keygen(directory / "other_host_key", "rulework-test-other-host")
        authorized = directory / "authorized_keys"
        authorized.write_text(client_public + "\n")
        authorized.chmod(0o644)
        port = free_port()
        host_public = (directory / "host_key.pub").read_text().split()
        known_hosts = directory / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
        other_type, other_key = other_host_public.split()[:2]
        config = _write_config(directory, port, user)
        log = directory / "sshd.log"
        proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        ready = threading.Event()
        drainer = threading.Thread(
            target=_drain, args=(proc.stderr, log, ready), name="sshd-log", daemon=True
        )
        drainer.start()
        try:
            if not ready.wait(_START_TIMEOUT) or proc.poll() is not None:
                raise RuntimeError(
                    f"sshd did not start on 127.0.0.1:{port}:\n{log.read_text(errors='replace')}"
                )
            yield SshServer(
                host="127.0.0.1",
                port=port,
                user=user,
                identity_file=directory / "id_ed25519",
                known_hosts=known_hosts,
                other_identity_file=directory / "other_id_ed25519",
                other_host_key_line=f"[127.0.0.1]:{port} {other_type} {other_key}\n",
                directory=directory,
                pid=proc.pid,
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            drainer.join(timeout=10)
            assert proc.stderr is not None
            proc.stderr.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshServer]:
    """A real OpenSSH server on 127.0.0.1 with a free port, stopped at the end of the session.

    A missing sshd skips the tests locally and fails them under `CI=true`.
    """
    try:
        with running_sshd() as server:
            yield server
    except SshdUnavailable as exc:  # raised before the yield only
        unavailable(str(exc))
