"""The `ssh` executor: runs each Process in a fresh sandbox on another machine, over OpenSSH.

Config (`[environments.NAME]` with `kind = "ssh"`):

```toml
[environments.builder]
kind = "ssh"
host = "build1.internal"             # a host name, address or ssh_config alias
port = 22
user = "ci"                          # default: ssh's (from ssh_config, else the local user)
identity_file = "~/.ssh/id_ed25519"  # default: ssh's own choice of keys and agent
known_hosts = "~/.ssh/known_hosts"   # the only file host keys are checked against (default: ssh's)
remote_dir = "/tmp/rulework"         # the remote CAS and sandboxes live here ("~/..." allowed)
parallelism = 4                      # processes at once (the server's MaxSessions must be larger)
ssh_config = "~/.ssh/config"         # default: ssh's usual files; "/dev/null" reads none
extra_options = ["Compression=yes"]  # more `-o Key=Value` options for ssh
connect_timeout = 10                 # seconds to connect and log in
inherit_env = ["PATH"]               # variables passed through from the remote login environment
kill_grace_seconds = 2.0             # SIGTERM -> SIGKILL delay on timeout or cancellation
```

How it works. Everything goes through the OpenSSH client (`ssh`), never a shell string built
from unquoted input:

- One ControlMaster connection per environment, started on first use (`open`), with its socket
  in a private local temp dir; each remote step is a multiplexed session over it (milliseconds,
  no new handshake). Host keys are always checked (`StrictHostKeyChecking=yes`, `BatchMode=yes`:
  never a prompt). The master is closed in `aclose`; if rulework dies it exits by itself once
  idle for a few minutes (`ControlPersist`).
- The remote keeps a CAS directory (`<remote_dir>/cas`, one file per blob, never pruned by
  rulework). Before a Process runs, one round trip asks which of its input blobs the remote
  lacks (blobs this executor has seen there are not asked about again), one tar stream uploads
  the missing ones (renamed into the CAS atomically, so a concurrent sandbox never links half a
  blob), and the sandbox `<remote_dir>/jobs/<token>/s` is built from hard links to the CAS (by
  the run wrapper itself for a few files, else by `tar` from a skeleton archive of links).
  Input files are therefore read-only in the sandbox: they are shared with the CAS. A CAS
  emptied behind rulework's back is noticed and refilled.
- The Process runs under a small POSIX `sh` wrapper, as `env -i NAME=VALUE... ARGV...` (every
  word `shlex.quote`d), in its own session (`setsid`) with stdin from /dev/null. The wrapper sends
  back one tar stream holding the exit code, stdout, stderr and the declared outputs that exist,
  which is unpacked into a private local temp dir and captured into the store, and removes the
  remote sandbox.
- Kill: the wrapper keeps the session's stdin open and watches it. When rulework kills the local
  `ssh` (cancellation, Ctrl-C) or the connection drops, stdin reaches EOF and the wrapper sends
  SIGTERM to the process group, then SIGKILL after `kill_grace_seconds`, and cleans up. A timeout
  closes stdin on purpose: the same kill happens and the partial stdout/stderr still come back.
  Whatever the process left running in its group after exiting is killed too.
- A connection lost mid-run (ssh exits 255) is retried once on a fresh master; a second loss is
  an `SshConnectionError`.

The remote needs a POSIX `sh` at /bin/sh, a login shell that accepts POSIX quoting (sh, bash,
zsh, ksh, dash, ash), `tar`, the usual `mkdir/ln/mv/rm/cat/find/uname`, and (for killing whole
process groups) `setsid`, which every Linux has; without it only the main process is killed.
Differences from `local`: a remote process killed by signal N by something other than rulework
reports exit code 128+N (a shell cannot tell it from an exit with that code), and a startup
failure (program not found, unusable working directory) is detected by the wrapper before it
starts the process.
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, ClassVar, Literal

import blake3
import trio

from ..abc import ExecutedProcess
from ..engine.errors import ExecutorError
from ..engine.fs import EMPTY_DIGEST, Digest, Directory, FileEntry

if TYPE_CHECKING:
    from ..engine.process import Process
    from ..engine.store import Store

logger = logging.getLogger(__name__)

# An idle master exits after this long, so that a master left behind by a crashed rulework does
# not live forever; a live executor restarts it on its next use.
_CONTROL_PERSIST_SECONDS = 300
_SERVER_ALIVE_COUNT_MAX = 3
# Sandboxes with at most this many files and no upload are linked by the run wrapper itself
# (one `ln` each); larger ones are built by `tar` from a skeleton archive of hard links.
_INLINE_LINK_LIMIT = 16
# Upload archives are written in chunks of about this size (one worker-thread call each).
_UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024
# Run scripts longer than this are uploaded as a file rather than passed as an argument.
_MAX_INLINE_SCRIPT_BYTES = 64 * 1024
# Printed by the remote scripts right before their machine-readable output, so that whatever a
# login shell's rc file prints first is skipped instead of corrupting the stream.
_MARKER = b"\n=rulework-ssh-v1=\n"
_MARKER_SEARCH_BYTES = 1024 * 1024
# What the run wrapper sends back stays in memory up to this size, then goes to a temp file.
_SPOOL_MEMORY_BYTES = 4 * 1024 * 1024
# Results at most this big (no declared outputs) are parsed without a worker thread.
_PARSE_INLINE_BYTES = 256 * 1024

# Exit codes of the remote wrapper scripts (ssh itself uses 255; 1, 2 and 126/127 come from
# failed shell commands and mean "wrapper failed" in general).
_EXIT_SETUP = 3  # the job directory could not be created
_EXIT_CAS = 4  # a CAS blob the sandbox needs is missing
_EXIT_CWD = 5  # the working directory is unusable
_EXIT_NOT_FOUND = 6  # the program does not exist
_EXIT_NOT_EXECUTABLE = 7  # the program is not an executable file
_EXIT_FOREIGN_DIR = 8  # remote_dir belongs to another user
_EXIT_NO_TAR = 9  # tar is not installed on the remote
_EXIT_SSH = 255

# Options rulework sets itself (ssh keeps the first value it sees for an option, and these come
# first): accepting them in `extra_options` would only pretend to change them.
_RESERVED_OPTIONS = {
    "batchmode": "rulework always sets BatchMode=yes so that ssh never prompts",
    "stricthostkeychecking": "host keys are always checked (StrictHostKeyChecking=yes)",
    "userknownhostsfile": "use the `known_hosts` key",
    "globalknownhostsfile": "use the `known_hosts` key",
    "controlmaster": "rulework manages the ControlMaster connection itself",
    "controlpath": "rulework manages the ControlMaster connection itself",
    "controlpersist": "rulework manages the ControlMaster connection itself",
    "port": "use the `port` key",
    "user": "use the `user` key",
    "identityfile": "use the `identity_file` key",
    "identitiesonly": "it is set when `identity_file` is given",
    "connecttimeout": "use the `connect_timeout` key",
    "requesttty": "sessions never use a terminal",
    "permitlocalcommand": "local commands are disabled",
    "localcommand": "local commands are disabled",
}

_OPTION_RE = re.compile(r"^([A-Za-z][A-Za-z0-9]*)(?:\s*=\s*|\s+)(\S.*)$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class SshEnvironmentConfig:
    """Settings of a `kind = "ssh"` environment (see the module docstring for each key)."""

    host: str
    port: int = 22
    user: str | None = None
    identity_file: Path | None = None
    known_hosts: Path | None = None
    remote_dir: str = "/tmp/rulework"
    parallelism: int = 4
    ssh_config: Path | None = None
    extra_options: tuple[str, ...] = ()
    connect_timeout: int = 10
    inherit_env: tuple[str, ...] = ()
    kill_grace_seconds: float = 2.0
    server_alive_interval: int = 15
    ssh_program: str = "ssh"

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError("host must be a non-empty host name, address or ssh_config alias")
        if self.host.startswith("-") or any(c.isspace() for c in self.host) or "\0" in self.host:
            raise ValueError(f"host {self.host!r} is not a valid host name")
        if "@" in self.host:
            user, _, host = self.host.rpartition("@")
            raise ValueError(
                f"host {self.host!r} contains a user name; write host = {host!r} and "
                f"user = {user!r}"
            )
        _check_int("port", self.port, 1, 65535)
        if self.user is not None and (
            not self.user
            or self.user.startswith("-")
            or any(c.isspace() or c == "\0" for c in self.user)
        ):
            raise ValueError(f"user {self.user!r} is not a valid user name")
        _check_int("parallelism", self.parallelism, 1, 10_000)
        _check_int("connect_timeout", self.connect_timeout, 1, 3600)
        _check_int("server_alive_interval", self.server_alive_interval, 1, 3600)
        if (
            isinstance(self.kill_grace_seconds, bool)
            or not isinstance(self.kill_grace_seconds, int | float)
            or not 0 <= self.kill_grace_seconds <= 3600
        ):
            raise ValueError(
                f"kill_grace_seconds must be a number of seconds between 0 and 3600, found "
                f"{self.kill_grace_seconds!r}"
            )
        remote = self.remote_dir
        if (
            not isinstance(remote, str)
            or not (remote.startswith("/") or remote == "~" or remote.startswith("~/"))
            or any(c in remote for c in "\0\n")
        ):
            raise ValueError(
                f"remote_dir must be an absolute path or start with '~/', found {remote!r}"
            )
        if remote.rstrip("/") in ("", "~"):
            raise ValueError(
                f"remote_dir {remote!r} would put rulework's files directly in / or the home "
                "directory; name a directory of its own, e.g. '~/.cache/rulework'"
            )
        for option in self.extra_options:
            match = _OPTION_RE.match(option) if isinstance(option, str) else None
            if match is None:
                raise ValueError(
                    f"extra_options: {option!r} is not an ssh option; write 'Key=Value', "
                    "e.g. 'Compression=yes'"
                )
            why = _RESERVED_OPTIONS.get(match.group(1).lower())
            if why is not None:
                raise ValueError(f"extra_options: {match.group(1)} cannot be set here: {why}")
        for name in self.inherit_env:
            if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
                raise ValueError(
                    f"inherit_env: {name!r} is not a valid variable name (letters, digits and _)"
                )
        if not self.ssh_program or not isinstance(self.ssh_program, str):
            raise ValueError("ssh_program must name the OpenSSH client, e.g. 'ssh'")


def _check_int(key: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an integer, found {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low} and {high}, found {value}")


SshFailure = Literal[
    "host_key_unknown",
    "host_key_changed",
    "login_refused",
    "unreachable",
    "timeout",
    "connection_lost",
    "session_refused",
    "other",
]


class SshConnectionError(ExecutorError):
    """The ssh executor could not connect to, log in to, or stay connected to its host.

    `environment`, `host`, `port` and `reason` (one of `SshFailure`) say which and why;
    `ssh_stderr` holds what the OpenSSH client said.
    """

    def __init__(
        self,
        environment: str,
        host: str,
        port: int,
        reason: SshFailure,
        message: str,
        ssh_stderr: str = "",
    ) -> None:
        self.environment = environment
        self.host = host
        self.port = port
        self.reason = reason
        self.ssh_stderr = ssh_stderr
        said = f"\nssh said: {ssh_stderr.strip()}" if ssh_stderr.strip() else ""
        super().__init__(f"Environment {environment!r} ({host}:{port}): {message}{said}")


class _ConnectionLost(Exception):
    """An ssh session failed at the connection level (exit 255); retried once."""

    def __init__(self, stderr: str) -> None:
        super().__init__(stderr)
        self.stderr = stderr


class _CasMissing(Exception):
    """A blob this executor believed to be in the remote CAS is not there (any more)."""


@dataclass(frozen=True, slots=True)
class _Remote:
    """What the probe learnt about the remote, once per executor."""

    root: str  # absolute, resolved remote_dir
    platform: str  # `uname -sm`
    setsid: str  # absolute path of setsid(1), or "" when the remote has none
    inherited: tuple[tuple[str, str], ...]  # inherit_env values found in the login environment


@dataclass(frozen=True, slots=True)
class _Outcome:
    exit_code: int
    stdout: bytes
    stderr: bytes
    output_digest: Digest
    timed_out: bool


def _q(word: str) -> str:
    return shlex.quote(word)


def _cas_key(entry: FileEntry) -> str:
    # Hard links share their mode, so executable and plain copies of one content are two blobs.
    return entry.file_digest.fingerprint + (".x" if entry.is_executable else "")


def _find_marker(head: bytes) -> int | None:
    index = head.find(_MARKER)
    return None if index < 0 else index + len(_MARKER)


def _remote_dir_expression(remote_dir: str) -> str:
    # `~` is expanded by the remote shell (the local one knows nothing of the remote $HOME).
    if remote_dir == "~":
        return '"$HOME"'
    if remote_dir.startswith("~/"):
        return '"$HOME"/' + _q(remote_dir[2:])
    return _q(remote_dir)


class SshExecutor:
    """Runs Processes on a remote host over OpenSSH, each in a fresh sandbox there.

    Constructed as `SshExecutor(name, SshEnvironmentConfig(host=...))`; see the module docstring
    for the config keys, what the remote needs and how processes are killed.

    >>> executor = SshExecutor("builder", SshEnvironmentConfig(host="build1", user="ci"))
    >>> executor.parallelism
    4
    """

    config_type: ClassVar[type[SshEnvironmentConfig]] = SshEnvironmentConfig

    def __init__(self, name: str, config: SshEnvironmentConfig) -> None:
        if not isinstance(config, SshEnvironmentConfig):
            raise TypeError(
                f"SshExecutor needs an SshEnvironmentConfig, got {type(config).__name__}"
            )
        self.name = name
        self.config = config
        self.parallelism = config.parallelism
        self._limiter = trio.CapacityLimiter(config.parallelism)
        self._connect_lock = trio.Lock()
        # Invariant: `_local_dir` is None or a private (0700) directory this executor created;
        # it holds the control socket `c` and one work directory per running execution.
        self._local_dir: Path | None = None
        # Invariant: `_generation` counts master starts; a session that fails at the connection
        # level restarts the master only if no one else did since the session began.
        self._generation = 0
        self._master_pid: int | None = None
        self._remote: _Remote | None = None
        # CAS keys known to be in the remote CAS (uploaded or seen by this executor). It can only
        # be wrong if someone deletes the remote CAS: the wrapper then exits with _EXIT_CAS and
        # the set is cleared.
        self._remote_blobs: set[str] = set()
        # Remote job directories left behind by a session cut off with its connection.
        self._orphan_jobs: list[str] = []
        self._counter = itertools.count()
        self._token = secrets.token_hex(4)

    # --- connection ---------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        user = f"{self.config.user}@" if self.config.user else ""
        return f"{user}{self.config.host}:{self.config.port}"

    def _control_path(self) -> Path:
        assert self._local_dir is not None
        return self._local_dir / "c"

    def _ssh_argv(self, *, control: str = "no") -> list[str]:
        """The ssh command line up to (not including) the destination."""
        cfg = self.config
        argv = [cfg.ssh_program]
        if cfg.ssh_config is not None:
            argv += ["-F", str(cfg.ssh_config)]
        argv += ["-p", str(cfg.port), "-T", "-x", "-a"]
        if cfg.user is not None:
            argv += ["-l", cfg.user]
        if cfg.identity_file is not None:
            argv += ["-i", str(cfg.identity_file), "-o", "IdentitiesOnly=yes"]
        options = [
            "BatchMode=yes",
            "StrictHostKeyChecking=yes",
            "PermitLocalCommand=no",
            "RequestTTY=no",
            f"ConnectTimeout={cfg.connect_timeout}",
            f"ServerAliveInterval={cfg.server_alive_interval}",
            f"ServerAliveCountMax={_SERVER_ALIVE_COUNT_MAX}",
            f"ControlPath={self._control_path()}",
            f"ControlMaster={control}",
            "LogLevel=ERROR",
        ]
        if cfg.known_hosts is not None:
            # The configured file is the only source of trusted host keys.
            options += [f"UserKnownHostsFile={cfg.known_hosts}", "GlobalKnownHostsFile=/dev/null"]
        if control == "yes":
            options.append(f"ControlPersist={_CONTROL_PERSIST_SECONDS}")
        for option in (*options, *cfg.extra_options):
            argv += ["-o", option]
        return argv

    def _command(self, script: str) -> list[str]:
        """ssh argv that runs `script` with /bin/sh on the remote, over the master."""
        # The login shell only ever sees this one line, so any POSIX-quoting shell will do.
        return [*self._ssh_argv(), "--", self.config.host, "exec /bin/sh -c " + _q(script)]

    async def open(self, store: Store) -> None:
        """Connect (start the ControlMaster) and probe the remote once.

        Raises:
            SshConnectionError: the host is unreachable, its key unknown or changed, or the
                login was refused (the message says how to fix it).
            ExecutorError: the remote lacks what the executor needs (tar, a writable remote_dir).
        """
        await self._ensure_connected()

    async def identity(self) -> str:
        """The cache identity: `ssh:<host>:<uname -sm>` (e.g. "ssh:build1:Linux x86_64"), plus a
        hash of the values of `inherit_env` when it names any; probed once from the remote."""
        remote = await self._ensure_connected()
        identity = f"ssh:{self.config.host}:{remote.platform}"
        if remote.inherited:
            material = json.dumps(list(remote.inherited)).encode()
            identity += f";inherit_env={blake3.blake3(material).hexdigest()[:32]}"
        return identity

    async def _ensure_connected(self) -> _Remote:
        remote = self._remote
        if remote is not None and self._master_socket_exists():
            return remote
        generation = self._generation
        async with self._connect_lock:
            if self._remote is None or self._generation == generation:
                await self._start_master()
                if self._remote is None:
                    try:
                        self._remote = await self._probe()
                    except _ConnectionLost as lost:
                        cfg = self.config
                        raise SshConnectionError(
                            self.name,
                            cfg.host,
                            cfg.port,
                            "connection_lost",
                            f"the connection to {self._where} was lost right after logging in. "
                            "Check the server's logs (MaxSessions, ForceCommand, a login shell "
                            "that exits).",
                            lost.stderr,
                        ) from None
            assert self._remote is not None
            return self._remote

    async def _restart_master(self, generation: int) -> None:
        async with self._connect_lock:
            if self._generation == generation:
                await self._stop_master()
                await self._start_master()

    def _master_socket_exists(self) -> bool:
        # One stat of a local socket: cheaper than a thread hop. A master that exited (idle
        # ControlPersist timeout, killed) removes its socket, and is then started again.
        return self._local_dir is not None and os.path.exists(self._control_path())

    def _ensure_local_dir(self) -> Path:
        if self._local_dir is None:
            # A short path: a unix socket path is limited to ~104 bytes, and ssh appends a
            # random suffix to it while it binds.
            base = "/tmp" if os.path.isdir("/tmp") else None
            self._local_dir = Path(tempfile.mkdtemp(prefix="rw-ssh-", dir=base))
        return self._local_dir

    async def _start_master(self) -> None:
        self._ensure_local_dir()
        control = self._control_path()
        control.unlink(missing_ok=True)
        cfg = self.config
        argv = [*self._ssh_argv(control="yes"), "-N", "-f", "--", cfg.host]
        # ConnectTimeout bounds the TCP connect and the banner; this bounds the whole login.
        with trio.move_on_after(cfg.connect_timeout * 3 + 10) as scope:
            result = await self._run_ssh(argv, stdin=b"")
        if scope.cancelled_caught:
            raise SshConnectionError(
                self.name,
                cfg.host,
                cfg.port,
                "timeout",
                f"connecting and logging in as {self._where} took longer than "
                f"{cfg.connect_timeout * 3 + 10} s. Check that the host is up and that nothing "
                "between here and there drops the connection.",
            )
        if result.returncode != 0:
            raise self._connect_error(result.stderr.decode("utf-8", "replace"))
        self._generation += 1
        check = await self._run_ssh([*self._ssh_argv(), "-O", "check", "--", cfg.host], stdin=b"")
        found = re.search(rb"pid=(\d+)", check.stderr)
        self._master_pid = int(found.group(1)) if found else None

    async def _stop_master(self) -> None:
        if not self._master_socket_exists():
            self._master_pid = None
            return
        with trio.move_on_after(10):
            result = await self._run_ssh(
                [*self._ssh_argv(), "-O", "exit", "--", self.config.host], stdin=b""
            )
            if result.returncode == 0:
                self._master_pid = None
        pid, self._master_pid = self._master_pid, None
        if pid is not None and _is_master(pid, self._control_path()):
            # `-O exit` failed (a wedged master): make sure it goes.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        self._control_path().unlink(missing_ok=True)

    async def _run_ssh(
        self, argv: Sequence[str], *, stdin: bytes | IO[bytes]
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            return await trio.run_process(
                list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
            )
        except FileNotFoundError as exc:
            raise ExecutorError(
                f"Environment {self.name!r}: the OpenSSH client {self.config.ssh_program!r} is "
                "not installed (Debian/Ubuntu: apt-get install openssh-client), or set "
                f"ssh_program in [environments.{self.name}]."
            ) from exc

    def _connect_error(self, stderr: str) -> SshConnectionError:
        cfg = self.config
        known_hosts = str(cfg.known_hosts) if cfg.known_hosts is not None else "~/.ssh/known_hosts"
        host_pattern = cfg.host if cfg.port == 22 else f"[{cfg.host}]:{cfg.port}"
        section = f"[environments.{self.name}]"
        text = stderr.lower()
        reason: SshFailure
        if "remote host identification has changed" in text or (
            "host key for" in text and "has changed" in text
        ):
            reason = "host_key_changed"
            message = (
                f"the host key of {cfg.host} does not match the one recorded in {known_hosts}, "
                "so the connection was refused (someone may be impersonating the host). If the "
                "host was legitimately reinstalled, verify its new key fingerprint out of band, "
                f"then remove the old entry with `ssh-keygen -R '{host_pattern}' -f {known_hosts}` "
                "and add the new one."
            )
        elif "host key verification failed" in text or (
            "no " in text and "host key is known" in text
        ):
            reason = "host_key_unknown"
            message = (
                f"the host key of {cfg.host} is not in {known_hosts}, and rulework never accepts "
                "unknown host keys. Add it after checking its fingerprint: "
                f"`ssh-keyscan -p {cfg.port} {cfg.host} >> {known_hosts}`, or point "
                f"known_hosts in {section} at a file that has it."
            )
        elif "permission denied" in text or "too many authentication failures" in text:
            reason = "login_refused"
            key = f"identity_file {cfg.identity_file}" if cfg.identity_file else "your ssh keys"
            message = (
                f"the login as {self._where} was refused. Check `user` and `identity_file` in "
                f"{section}, and that the public key of {key} is in the remote user's "
                "authorized_keys."
            )
        elif any(
            s in text
            for s in (
                "connection refused",
                "connection timed out",
                "no route to host",
                "network is unreachable",
                "could not resolve hostname",
                "name or service not known",
                "operation timed out",
                "connection closed by",
                "connection reset",
                "kex_exchange_identification",
                "temporary failure in name resolution",
            )
        ):
            reason = "unreachable"
            message = (
                f"cannot reach an ssh server at {cfg.host} port {cfg.port}. Check `host` and "
                f"`port` in {section}, that sshd runs there, and that no firewall is in the way."
            )
        else:
            reason = "other"
            message = f"ssh could not connect as {self._where}."
        return SshConnectionError(self.name, cfg.host, cfg.port, reason, message, stderr)

    async def _probe(self) -> _Remote:
        names = self.config.inherit_env
        lines = [
            "umask 077",
            f"R={_remote_dir_expression(self.config.remote_dir)}",
            'mkdir -p -- "$R" 2>/dev/null',
            f'[ -d "$R" ] && [ -O "$R" ] || {{ echo "remote_dir $R is not a directory owned by '
            f'$(id -un)" >&2; exit {_EXIT_FOREIGN_DIR}; }}',
            f'chmod 700 "$R" && mkdir -p "$R/cas" "$R/jobs" && cd "$R" && R=$(pwd -P) || exit {_EXIT_SETUP}',
            f'command -v tar >/dev/null 2>&1 || {{ echo "tar is not installed" >&2; exit {_EXIT_NO_TAR}; }}',
            f"printf %s {_q(_MARKER.decode())}",
            'printf \'%s\\0\' "$R" "$(uname -sm)" "$(command -v setsid 2>/dev/null)"',
        ]
        for name in names:
            lines.append(
                f'if [ "${{{name}+set}}" = set ]; then printf \'1%s\\0\' "${name}"; '
                "else printf '0\\0'; fi"
            )
        result = await self._session(self._command("\n".join(lines)), stdin=b"")
        if result.returncode != 0:
            stderr = result.stderr.decode("utf-8", "replace").strip()
            section = f"[environments.{self.name}]"
            if result.returncode == _EXIT_FOREIGN_DIR:
                hint = (
                    f"Another user owns it (or it is not a directory): set remote_dir in {section} "
                    "to a directory of this user's own, e.g. '~/.cache/rulework'."
                )
            elif result.returncode == _EXIT_NO_TAR:
                hint = "Install tar on the remote host."
            else:
                hint = f"Check that remote_dir ({self.config.remote_dir}) can be created there."
            raise ExecutorError(
                f"Environment {self.name!r}: preparing remote_dir on {self._where} failed: "
                f"{stderr or 'exit code ' + str(result.returncode)}. {hint}"
            )
        start = _find_marker(result.stdout)
        fields = [] if start is None else result.stdout[start:].split(b"\0")
        if len(fields) < 4 + len(names):
            raise ExecutorError(
                f"Environment {self.name!r}: the remote probe on {self._where} answered "
                f"{result.stdout[-200:]!r}; is /bin/sh a POSIX shell there?"
            )
        root, platform, setsid = (f.decode("utf-8", "replace") for f in fields[:3])
        inherited = tuple(
            (name, raw[1:].decode("utf-8", "surrogateescape"))
            for name, raw in zip(names, fields[3 : 3 + len(names)], strict=True)
            if raw.startswith(b"1")
        )
        if not setsid:
            logger.warning(
                "Environment %r: %s has no setsid(1); a timed-out or cancelled process is "
                "killed, but not the processes it started.",
                self.name,
                self._where,
            )
        return _Remote(root, platform.strip(), setsid, inherited)

    async def _session(
        self, argv: Sequence[str], *, stdin: bytes | IO[bytes]
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one multiplexed ssh session; a connection-level failure is `_ConnectionLost`."""
        result = await self._run_ssh(argv, stdin=stdin)
        if result.returncode == _EXIT_SSH:
            raise self._session_failure(result.stderr.decode("utf-8", "replace"))
        return result

    def _session_failure(self, stderr: str) -> Exception:
        text = stderr.lower()
        if "administratively prohibited" in text or "session open refused" in text:
            cfg = self.config
            return SshConnectionError(
                self.name,
                cfg.host,
                cfg.port,
                "session_refused",
                f"the server refused to open another session over the shared connection. "
                f"Lower parallelism (now {cfg.parallelism}) in [environments.{self.name}], or "
                f"raise MaxSessions in the server's sshd_config above it.",
                stderr,
            )
        if "host key" in text or "permission denied" in text:
            # The master was gone and ssh tried on its own: the same errors as connecting.
            return self._connect_error(stderr)
        return _ConnectionLost(stderr)

    async def aclose(self) -> None:
        """Close the ControlMaster connection and remove the local temp dir."""
        with trio.CancelScope(shield=True):
            if self._orphan_jobs and self._remote is not None:
                with trio.move_on_after(self.config.connect_timeout):
                    await self._remove_orphans(self._remote)
            await self._stop_master()
            local, self._local_dir = self._local_dir, None
            self._remote = None
            self._remote_blobs.clear()
            if local is not None:
                await trio.to_thread.run_sync(shutil.rmtree, local, True)

    async def _remove_orphans(self, remote: _Remote) -> None:
        jobs, self._orphan_jobs = self._orphan_jobs, []
        script = "rm -rf -- " + " ".join(_q(job) for job in jobs)
        try:
            await self._session(self._command(script), stdin=b"")
        except (_ConnectionLost, ExecutorError):
            logger.warning("Environment %r: could not remove %s", self.name, ", ".join(jobs))

    # --- execution ----------------------------------------------------------------------------

    async def execute(self, process: Process, store: Store) -> ExecutedProcess:
        """Run `process` in a fresh sandbox on the remote and capture its outputs into `store`.

        Raises:
            SshConnectionError: the host cannot be reached or logged in to, or the connection
                was lost twice.
            ExecutorError: the program does not exist or cannot be executed, the working
                directory is unusable, or the remote failed to prepare the sandbox.
        """
        async with self._limiter:
            started = time.monotonic()
            reconnected = refreshed = False
            while True:
                remote = await self._ensure_connected()
                generation = self._generation
                if self._orphan_jobs:
                    await self._remove_orphans(remote)
                try:
                    outcome = await self._execute_once(process, store, remote)
                except _ConnectionLost as lost:
                    if reconnected:
                        cfg = self.config
                        raise SshConnectionError(
                            self.name,
                            cfg.host,
                            cfg.port,
                            "connection_lost",
                            f"the connection was lost while running '{process.description}', "
                            "and again on a fresh connection. Check the network and the "
                            "server's logs.",
                            lost.stderr,
                        ) from None
                    reconnected = True
                    logger.warning(
                        "Environment %r: connection to %s lost while running '%s'; retrying "
                        "once on a fresh connection.",
                        self.name,
                        self._where,
                        process.description,
                    )
                    await self._restart_master(generation)
                    continue
                except _CasMissing:
                    if refreshed:
                        raise ExecutorError(
                            f"Environment {self.name!r}: input blobs of '{process.description}' "
                            f"disappeared from the remote CAS under {remote.root} twice while "
                            "preparing its sandbox. Is something else deleting files there?"
                        ) from None
                    refreshed = True
                    self._remote_blobs.clear()
                    continue
                return ExecutedProcess(
                    outcome.exit_code,
                    outcome.stdout,
                    outcome.stderr,
                    outcome.output_digest,
                    time.monotonic() - started,
                    outcome.timed_out,
                )

    async def _execute_once(self, process: Process, store: Store, remote: _Remote) -> _Outcome:
        job = f"{remote.root}/jobs/{self._token}-{os.getpid()}-{next(self._counter)}"
        files: list[tuple[str, str]] = []
        dirs: list[str] = []
        blobs: dict[str, Digest] = {}
        if process.input_digest != EMPTY_DIGEST:
            for entry in await store.entries(process.input_digest):
                if isinstance(entry, FileEntry):
                    key = _cas_key(entry)
                    files.append((entry.path, key))
                    blobs[key] = entry.file_digest
                elif isinstance(entry, Directory):
                    dirs.append(entry.path)
        unknown = sorted(key for key in blobs if key not in self._remote_blobs)
        missing = await self._find_missing(remote, unknown) if unknown else []
        self._remote_blobs.update(set(unknown).difference(missing))
        prepared = bool(missing) or len(files) > _INLINE_LINK_LIMIT
        # A prepared sandbox is built by the upload; otherwise the wrapper links it itself.
        script = self._run_script(process, remote, job, *(((), ()) if prepared else (files, dirs)))
        # The script travels as one argument (to ssh here, to `sh -c` there), and Linux caps
        # one argument at 128 KiB: a huge argv or env goes up as a file instead.
        script_file = len(script.encode()) > _MAX_INLINE_SCRIPT_BYTES
        if script_file and not prepared:
            prepared = True
            script = self._run_script(process, remote, job, (), ())
        try:
            if prepared:
                await self._upload(
                    remote,
                    job,
                    {k: blobs[k] for k in missing},
                    files,
                    dirs,
                    store,
                    script if script_file else None,
                )
                self._remote_blobs.update(missing)
            if script_file:
                command = self._command(f"exec /bin/sh {_q(job + '/run.sh')}")
            else:
                command = self._command(script)
            return await self._run(process, store, command)
        except BaseException:
            if prepared:
                # The sandbox may exist while the wrapper that removes it never ran (cancelled
                # in between, connection lost): remove it with the next session.
                self._orphan_jobs.append(job)
            raise

    async def _find_missing(self, remote: _Remote, keys: Sequence[str]) -> list[str]:
        script = "\n".join(
            [
                f"cd {_q(remote.root + '/cas')} || exit {_EXIT_SETUP}",
                f"printf %s {_q(_MARKER.decode())}",
                'while IFS= read -r k; do [ -e "$k" ] || printf \'%s\\n\' "$k"; done',
            ]
        )
        stdin = "".join(f"{key}\n" for key in keys).encode()
        result = await self._session(self._command(script), stdin=stdin)
        start = _find_marker(result.stdout)
        if result.returncode != 0 or start is None:
            raise ExecutorError(
                f"Environment {self.name!r}: listing the remote CAS under {remote.root} on "
                f"{self._where} failed (exit code {result.returncode}): "
                f"{result.stderr.decode('utf-8', 'replace').strip()}"
            )
        wanted = set(keys)
        return [key for key in result.stdout[start:].decode().split() if key in wanted]

    async def _upload(
        self,
        remote: _Remote,
        job: str,
        blobs: Mapping[str, Digest],
        files: Sequence[tuple[str, str]],
        dirs: Sequence[str],
        store: Store,
        script: str | None,
    ) -> None:
        """Send the missing blobs into the remote CAS and build the sandbox from hard links
        (and send the run script as `<job>/run.sh` when it is given)."""
        work = self._work_dir()
        try:
            archive = work / "upload.tar"
            prefix = job[len(remote.root) + 1 :] + "/s"
            with (
                archive.open("wb") as raw,
                tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                pending: list[tuple[str, bytes]] = []
                size = 0
                for key, digest in sorted(blobs.items()):
                    data = await store.load_bytes(digest)
                    pending.append((key, data))
                    size += len(data)
                    if size >= _UPLOAD_CHUNK_BYTES:
                        await trio.to_thread.run_sync(_add_blobs, tar, pending)
                        pending, size = [], 0
                pending.append(("skel.tar", _skeleton(prefix, files, dirs)))
                if script is not None:
                    pending.append(("run.sh", script.encode()))
                await trio.to_thread.run_sync(_add_blobs, tar, pending)
            cas = _q(remote.root + "/cas/")
            incoming = _q(job + "/in")
            script = "\n".join(
                [
                    "umask 022",
                    f"J={_q(job)}",
                    f'mkdir -p -- "$J/in" "$J/s" || exit {_EXIT_SETUP}',
                    'tar -xf - -C "$J/in" || { rm -rf "$J"; exit 2; }',
                    # Renames are atomic: a concurrent sandbox never links a half-written blob.
                    f'if [ -d "$J/in/b" ]; then find "$J/in/b" -type f -exec sh -c '
                    f'\'mv -f -- "$@" "$0"\' {cas} {{}} + || {{ rm -rf "$J"; exit {_EXIT_SETUP}; }}; fi',
                    f'tar -xf "$J/in/skel.tar" -C {_q(remote.root)} || {{ rm -rf "$J"; exit {_EXIT_CAS}; }}',
                    'if [ -f "$J/in/run.sh" ]; then mv -f "$J/in/run.sh" "$J/run.sh"; fi',
                    f"rm -rf -- {incoming}",
                ]
            )
            with archive.open("rb") as stdin:
                result = await self._session(self._command(script), stdin=stdin)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, work, True)
        if result.returncode == _EXIT_CAS:
            raise _CasMissing()
        if result.returncode != 0:
            raise ExecutorError(
                f"Environment {self.name!r}: uploading inputs to {remote.root} on {self._where} "
                f"failed (exit code {result.returncode}): "
                f"{result.stderr.decode('utf-8', 'replace').strip()}. Is the remote disk full?"
            )

    def _work_dir(self) -> Path:
        assert self._local_dir is not None
        return Path(tempfile.mkdtemp(prefix="w", dir=self._local_dir))

    def _run_script(
        self,
        process: Process,
        remote: _Remote,
        job: str,
        files: Sequence[tuple[str, str]],
        dirs: Sequence[str],
    ) -> str:
        cfg = self.config
        env = {**dict(remote.inherited), **process.env}
        program = process.argv[0]
        search_path = env.get("PATH", os.defpath)
        wd = process.working_directory
        lines = [
            "umask 022",
            f"J={_q(job)}",
            'fail() { c=$1; shift; printf "%s\\n" "$*" >&2; rm -rf "$J"; exit "$c"; }',
            f'mkdir -p -- "$J/s" "$J/m" || fail {_EXIT_SETUP} "cannot create $J"',
        ]
        if files or dirs:
            parents = sorted({*dirs, *(p for path, _ in files if (p := _dirname(path)))})
            lines.append('cd "$J/s" || exit 3')
            if parents:
                lines.append(
                    "mkdir -p -- "
                    + " ".join(_q(d) for d in parents)
                    + f' || fail {_EXIT_SETUP} "cannot create the input directories"'
                )
            lines.append(
                f'l() {{ ln -- {_q(remote.root + "/cas/")}"$1" "$2" 2>/dev/null || '
                f'cp -- {_q(remote.root + "/cas/")}"$1" "$2" || '
                f'fail {_EXIT_CAS} "CAS blob $1 is missing"; }}'
            )
            lines.extend(f"l {key} {_q(path)}" for path, key in files)
        lines.append('cd "$J/s" || exit 3')
        if wd is not None:
            lines.append(
                f"mkdir -p -- {_q(wd)} 2>/dev/null; cd -- {_q(wd)} 2>/dev/null || "
                f'fail {_EXIT_CWD} "cannot enter the working directory"'
            )
        # The same lookup as execvp in env(1), done first so that a missing program is an
        # ExecutorError (as with the local executor), not exit code 127.
        lines += [
            "set -f",
            f"p={_q(program)}",
            f'case $p in */*) [ -e "$p" ] || fail {_EXIT_NOT_FOUND} "no such file"; '
            f'[ -f "$p" ] && [ -x "$p" ] || fail {_EXIT_NOT_EXECUTABLE} "not an executable file";;',
            f"*) f=; S={_q(search_path)}; IFS=:; for d in $S; do "
            '[ -f "${d:-.}/$p" ] && [ -x "${d:-.}/$p" ] && { f=1; break; }; done; unset IFS; '
            f'[ -n "$f" ] || fail {_EXIT_NOT_FOUND} "not found";; esac',
        ]
        if "=" in program:
            # env(1) would read the program as a variable assignment: run it through a shell
            # that receives it as a plain argument instead.
            command = " ".join(
                [
                    "env",
                    "-i",
                    *(_q(f"{k}={v}") for k, v in env.items()),
                    "/bin/sh",
                    "-c",
                    _q('exec "$@"'),
                    "sh",
                    *(_q(a) for a in process.argv),
                ]
            )
        else:
            command = " ".join(
                [
                    "env",
                    "-i",
                    *(_q(f"{k}={v}") for k, v in env.items()),
                    *(_q(a) for a in process.argv),
                ]
            )
        if remote.setsid:
            command = f"{_q(remote.setsid)} {command}"
        grace = f"{cfg.kill_grace_seconds:g}"
        lines += [
            # fd 3 keeps the session's stdin (background jobs get /dev/null as stdin).
            "exec 3<&0",
            f'{command} </dev/null >"$J/m/stdout" 2>"$J/m/stderr" 3<&- &',
            "pid=$!",
            # The watcher: EOF on stdin means rulework gave up on this process (timeout,
            # cancellation, a dropped connection): kill its group, TERM first.
            "(while read -r _ <&3; do :; done; kill -TERM -$pid 2>/dev/null || kill -TERM $pid; "
            f"sleep {grace}; kill -KILL -$pid 2>/dev/null || kill -KILL $pid) "
            "</dev/null >/dev/null 2>&1 &",
            "w=$!",
            "exec 3<&-",
            "wait $pid; rc=$?",
            # Whatever the process left running in its group goes too (as with `local`).
            "kill -KILL -$pid 2>/dev/null",
            "kill $w 2>/dev/null",
            # From here on a closed stdout (rulework gone) must not kill the wrapper before it
            # removes the sandbox; the process already runs with the default SIGPIPE.
            "trap '' PIPE",
            'echo "$rc" >"$J/m/exit"',
            'cd "$J" || exit 3',
            "set --",
        ]
        outputs = [*process.output_files, *process.output_directories]
        if outputs:
            base = "s" if wd is None else f"s/{wd}"
            lines.append(
                "for o in "
                + " ".join(_q(f"{base}/{o}") for o in outputs)
                + '; do if [ -e "$o" ] || [ -h "$o" ]; then set -- "$@" "$o"; fi; done'
            )
        lines += [
            f"printf %s {_q(_MARKER.decode())}",
            'tar -cf - m/exit m/stdout m/stderr "$@"; t=$?',
            'cd / && rm -rf "$J" 2>/dev/null || { chmod -R u+rwx "$J"; rm -rf "$J"; }',
            "exit $t",
        ]
        return "\n".join(lines)

    async def _run(self, process: Process, store: Store, argv: Sequence[str]) -> _Outcome:
        """Run the wrapper session `argv` and collect what it sends back."""
        assert self._local_dir is not None
        stdout = _Spool(self._local_dir)
        stderr = bytearray()
        timed_out = False
        try:
            try:
                proc = await trio.lowlevel.open_process(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
            except FileNotFoundError as exc:
                raise ExecutorError(
                    f"Environment {self.name!r}: the OpenSSH client "
                    f"{self.config.ssh_program!r} is not installed."
                ) from exc
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stdout.drain, proc.stdout)
                    nursery.start_soon(_drain, proc.stderr, stderr)
                    timeout = process.timeout_seconds
                    with trio.move_on_after(float("inf") if timeout is None else timeout) as scope:
                        await proc.wait()
                    if scope.cancelled_caught:
                        timed_out = True
                        # EOF on the session's stdin: the remote watcher kills the process
                        # group, and the wrapper still sends back what it produced.
                        assert proc.stdin is not None
                        await proc.stdin.aclose()
                        await proc.wait()
            finally:
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        # Cancelled: killing the client closes the channel; the remote
                        # watcher sees EOF and kills the process group.
                        proc.kill()
                    code = await proc.wait()
                    for stream in (proc.stdin, proc.stdout, proc.stderr):
                        if stream is not None:
                            await stream.aclose()
            message = stderr.decode("utf-8", "replace").strip()
            if code == _EXIT_SSH:
                raise self._session_failure(message)
            if code == _EXIT_CAS:
                raise _CasMissing()
            if code != 0:
                raise self._wrapper_error(process, code, message)
            return await self._collect(process, store, stdout, timed_out)
        finally:
            with trio.CancelScope(shield=True):
                await stdout.aclose()

    def _wrapper_error(self, process: Process, code: int, message: str) -> ExecutorError:
        program = process.argv[0]
        where = f"in environment {self.name!r} ({self._where})"
        if code == _EXIT_NOT_FOUND:
            if "/" in program:
                return ExecutorError(
                    f"Cannot run {program!r} for '{process.description}' {where}: no such file "
                    "(relative paths are resolved from the working directory in the sandbox)."
                )
            inherited = dict(self._remote.inherited) if self._remote is not None else {}
            if "PATH" in process.env:
                searched = f"PATH={process.env['PATH']!r} (from the Process env)"
            elif "PATH" in inherited:
                searched = f"PATH={inherited['PATH']!r} (inherited from the remote login)"
            else:
                searched = (
                    f"the default search path {os.defpath!r}, because the Process env has no PATH"
                )
            return ExecutorError(
                f"Cannot run {program!r} for '{process.description}' {where}: executable not "
                f"found in {searched}. Give an absolute path, or set PATH in Process.env."
            )
        if code == _EXIT_NOT_EXECUTABLE:
            return ExecutorError(
                f"Cannot run {program!r} for '{process.description}' {where}: "
                f"{os.strerror(errno.EACCES)} (is it an executable file? scripts need a #! line "
                "and the executable bit)."
            )
        if code == _EXIT_CWD:
            return ExecutorError(
                f"Cannot start '{process.description}' {where}: the working directory "
                f"{process.working_directory!r} is unusable (is it a file in the input digest?)."
            )
        return ExecutorError(
            f"Running '{process.description}' {where} failed in rulework's remote wrapper "
            f"(exit code {code}): {message or '(no message)'}. Check that remote_dir "
            f"({self.config.remote_dir}) is writable and the disk is not full."
        )

    async def _collect(
        self, process: Process, store: Store, received: _Spool, timed_out: bool
    ) -> _Outcome:
        outputs = bool(process.output_files or process.output_directories)
        # Declared outputs are extracted into a work dir and captured from `root` there.
        work: Path | None = None
        root: Path | None = None
        try:
            try:
                if outputs:
                    work = self._work_dir()
                    root = work / "s" / (process.working_directory or "")
                    unpacked = await trio.to_thread.run_sync(_unpack, received.source(), work, root)
                elif received.path is None and len(received.buffer) <= _PARSE_INLINE_BYTES:
                    # The common small case: a few kB, cheaper to parse than to hand to a thread.
                    unpacked = _unpack(received.source(), None, None)
                else:
                    unpacked = await trio.to_thread.run_sync(_unpack, received.source(), None, None)
            except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
                raise ExecutorError(
                    f"Environment {self.name!r}: the results of '{process.description}' from "
                    f"{self._where} could not be read: {exc}. If the remote login shell prints "
                    "something on startup (~/.bashrc), make it print only for interactive shells."
                ) from exc
            exit_code, stdout, stderr = unpacked
            if timed_out and 128 < exit_code < 128 + 65:
                # Killed by rulework's signal: report it as the local executor does.
                exit_code = -(exit_code - 128)
            output_digest = EMPTY_DIGEST
            if root is not None:
                output_digest = await store.capture(
                    root, process.output_files, process.output_directories
                )
            return _Outcome(exit_code, stdout, stderr, output_digest, timed_out)
        finally:
            if work is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, work, True)


class _Spool:
    """Bytes read from a stream: in memory up to `_SPOOL_MEMORY_BYTES`, then in a temp file.

    Invariant: `path` is None while everything is in `buffer`; once spilled, the file at `path`
    holds everything received except the tail still in `buffer`.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.buffer = bytearray()
        self.path: Path | None = None
        self._file: IO[bytes] | None = None

    async def drain(self, stream: trio.abc.ReceiveStream | None) -> None:
        if stream is None:
            return
        async for chunk in stream:
            self.buffer += chunk
            if len(self.buffer) >= _SPOOL_MEMORY_BYTES:
                await trio.to_thread.run_sync(self._flush)
        if self.path is not None:
            await trio.to_thread.run_sync(self._flush)

    def _flush(self) -> None:
        if self._file is None:
            fd, name = tempfile.mkstemp(prefix="out", dir=self._directory)
            self._file = os.fdopen(fd, "wb")
            self.path = Path(name)
        self._file.write(self.buffer)
        self._file.flush()
        self.buffer = bytearray()

    def source(self) -> bytes | Path:
        """What was received: the bytes, or the file that holds them (once drained)."""
        return bytes(self.buffer) if self.path is None else self.path

    async def aclose(self) -> None:
        """Close and remove the spill file, if there is one."""
        file, self._file = self._file, None
        path, self.path = self.path, None
        if file is not None:
            file.close()
        if path is not None:
            await trio.to_thread.run_sync(path.unlink, True)


def _is_master(pid: int, control: Path) -> bool:
    """Whether `pid` is still our master (not a process that reused its pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        # No /proc (macOS) or no such process: only a live pid is worth a signal, and without
        # /proc we cannot tell ours from another, so leave it (it exits once idle anyway).
        return False
    return str(control).encode() in cmdline


def _dirname(path: str) -> str:
    """The parent of a normalized relative path ("" at the top)."""
    return path.rpartition("/")[0]


async def _drain(stream: trio.abc.ReceiveStream | None, buffer: bytearray) -> None:
    if stream is None:
        return
    async for chunk in stream:
        buffer += chunk


def _add_blobs(tar: tarfile.TarFile, blobs: Iterable[tuple[str, bytes]]) -> None:
    """Append (CAS key or member name, bytes) pairs to the upload archive."""
    now = int(time.time())
    for key, data in blobs:
        # CAS blobs go under b/; the skeleton archive and the run script by their own name.
        info = tarfile.TarInfo(key if key in ("skel.tar", "run.sh") else f"b/{key}")
        info.size = len(data)
        info.mtime = now
        info.mode = 0o555 if key.endswith(".x") else 0o444
        tar.addfile(info, io.BytesIO(data))


def _skeleton(prefix: str, files: Sequence[tuple[str, str]], dirs: Sequence[str]) -> bytes:
    """A tar of the sandbox: directories, and hard links `prefix/PATH` -> `cas/KEY`."""
    buffer = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in sorted({*dirs, *(p for path, _ in files if (p := _dirname(path)))}):
            info = tarfile.TarInfo(f"{prefix}/{directory}")
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            info.mtime = now
            tar.addfile(info)
        for path, key in files:
            info = tarfile.TarInfo(f"{prefix}/{path}")
            info.type = tarfile.LNKTYPE
            info.linkname = f"cas/{key}"
            info.mtime = now
            tar.addfile(info)
    return buffer.getvalue()


def _unpack(source: bytes | Path, dest: Path | None, root: Path | None) -> tuple[int, bytes, bytes]:
    """Read the wrapper's tar: (exit code, stdout, stderr).

    With `dest`, everything is extracted there (declared outputs under `root`, created even
    when no output came back); without, only the three result members are read.
    """
    with io.BytesIO(source) if isinstance(source, bytes) else source.open("rb") as raw:
        start = _find_marker(raw.read(_MARKER_SEARCH_BYTES))
        if start is None:
            raise ValueError("the remote wrapper's output has no start marker")
        raw.seek(start)
        with tarfile.open(fileobj=raw, mode="r:") as tar:
            if dest is not None:
                tar.extractall(dest, filter=_output_filter)
                assert root is not None
                root.mkdir(parents=True, exist_ok=True)
                meta = {name: (dest / name).read_bytes() for name in _RESULT_MEMBERS}
            else:
                meta = {}
                for member in tar:
                    if member.name in _RESULT_MEMBERS and member.isfile():
                        extracted = tar.extractfile(member)
                        assert extracted is not None
                        meta[member.name] = extracted.read()
    return int(meta["m/exit"].strip()), meta["m/stdout"], meta["m/stderr"]


_RESULT_MEMBERS = ("m/exit", "m/stdout", "m/stderr")


def _output_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        # Devices, FIFOs: not something a digest can hold.
        return None
    if member.issym():
        # Where a symlink points is for `Store.capture` to judge (it follows links that stay
        # inside the root and rejects the others), exactly as for the local executor; here only
        # its own path must stay inside `dest`. A later member extracted through it is still
        # checked by `data_filter`, which resolves existing links.
        dest = os.path.realpath(dest_path)
        where = os.path.realpath(os.path.join(dest, member.name))
        if os.path.commonpath([dest, where]) != dest:
            raise tarfile.OutsideDestinationError(member, where)
        return member
    return tarfile.data_filter(member, dest_path)


__all__ = ["SshConnectionError", "SshEnvironmentConfig", "SshExecutor"]
