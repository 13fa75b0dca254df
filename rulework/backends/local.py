"""The `local` executor: runs each Process in a fresh sandbox directory on this machine.

Config (`[environments.NAME]` with `kind = "local"`):

```toml
[environments.local]
kind = "local"
parallelism = 8                 # processes at once (default: the CPU count)
keep_sandboxes = "on_failure"   # "never" (default) | "on_failure" | "always"
sandbox_root = "/tmp/rw"        # where sandboxes are created (default: the system temp dir)
inherit_env = ["HOME", "LANG"]  # variables passed through from rulework's own environment
kill_grace_seconds = 2.0        # SIGTERM -> SIGKILL delay on timeout or cancellation
spawn_in_thread = false         # start processes from a worker thread (see LocalExecutor._spawn)
```

Each process starts in a new session (its own process group). When it times out or the
caller is cancelled, the whole group gets SIGTERM, then SIGKILL after `kill_grace_seconds`;
when the main process exits, whatever it left running in its group is killed too, so no
descendant outlives its Process (one that calls `setsid` itself escapes, as everywhere).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import blake3
import trio

from ..abc import ExecutedProcess
from ..engine.errors import ExecutorError
from ..engine.fs import EMPTY_DIGEST

if TYPE_CHECKING:
    from ..engine.process import Process
    from ..engine.store import Store

logger = logging.getLogger(__name__)

KeepSandboxes = Literal["never", "on_failure", "always"]

# After the group is killed its pipes reach EOF at once, unless a descendant that left the
# group (setsid) still holds them: then stop reading after this long instead of hanging.
_EOF_GRACE_SECONDS = 2.0


def _cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class LocalExecutorConfig:
    """Settings of a `kind = "local"` environment (see the module docstring)."""

    parallelism: int = field(default_factory=_cpu_count)
    keep_sandboxes: KeepSandboxes = "never"
    sandbox_root: Path | None = None
    inherit_env: tuple[str, ...] = ()
    kill_grace_seconds: float = 2.0
    spawn_in_thread: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.parallelism, bool) or not isinstance(self.parallelism, int):
            raise TypeError(f"parallelism must be an integer, found {self.parallelism!r}")
        if self.parallelism < 1:
            raise ValueError(f"parallelism must be at least 1, found {self.parallelism}")
        if self.keep_sandboxes not in ("never", "on_failure", "always"):
            raise ValueError(
                f"keep_sandboxes must be 'never', 'on_failure' or 'always', "
                f"found {self.keep_sandboxes!r}"
            )
        for name in self.inherit_env:
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise ValueError(f"inherit_env: {name!r} is not a valid variable name")
        if not isinstance(self.spawn_in_thread, bool):
            raise TypeError(
                f"spawn_in_thread must be true or false, found {self.spawn_in_thread!r}"
            )
        if not (
            isinstance(self.kill_grace_seconds, int | float)
            and not isinstance(self.kill_grace_seconds, bool)
            and 0 <= self.kill_grace_seconds < math.inf
        ):
            raise ValueError(
                f"kill_grace_seconds must be a non-negative number, found {self.kill_grace_seconds!r}"
            )


def _killpg(pgid: int, sig: signal.Signals) -> None:
    # ESRCH: nobody is left in the group; EPERM is what macOS reports for a group whose only
    # member is a zombie.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _wait_exited_unreaped(process: subprocess.Popen[bytes]) -> None:
    """Wait until `process` has exited, without reaping it.

    While it is an unreaped zombie its pid, which is also its process group's id, cannot be
    reused, so signalling the group afterwards cannot hit an unrelated process.
    """
    if sys.platform == "linux":
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError:
            pass
        else:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                trio.lowlevel.notify_closing(pidfd)
                os.close(pidfd)
            return
    await trio.to_thread.run_sync(
        os.waitid, os.P_PID, process.pid, os.WEXITED | os.WNOWAIT, abandon_on_cancel=True
    )


async def _reap(process: subprocess.Popen[bytes]) -> int:
    """Reap `process`, which has exited or was sent SIGKILL, so reaping cannot block for long.
    On the normal path it has exited already and `poll` reaps it at once."""
    returncode = process.poll()
    if returncode is None:
        await _wait_exited_unreaped(process)
        returncode = process.wait()
    return returncode


async def _drain(stream: trio.abc.ReceiveStream | None, buffer: bytearray) -> None:
    if stream is None:
        return
    async for chunk in stream:
        buffer += chunk


@dataclass(slots=True)
class _Spawned:
    popen: subprocess.Popen[bytes]
    stdout: trio.lowlevel.FdStream
    stderr: trio.lowlevel.FdStream


@dataclass(slots=True)
class _Outcome:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_seconds: float
    timed_out: bool


class LocalExecutor:
    """Runs Processes on this machine, each in a fresh sandbox directory.

    Constructed as `LocalExecutor(name, LocalExecutorConfig(...))`. See the module docstring
    for the config keys and the kill semantics.
    """

    config_type: ClassVar[type[LocalExecutorConfig]] = LocalExecutorConfig

    def __init__(self, name: str = "local", config: LocalExecutorConfig | None = None) -> None:
        self.name = name
        self.config = config if config is not None else LocalExecutorConfig()
        self.parallelism = self.config.parallelism
        self._limiter = trio.CapacityLimiter(self.parallelism)
        # Invariant: `_base` is None or a directory this executor created (with mkdtemp, so no
        # one else uses it); sandboxes are its numbered children, named from `_counter`.
        self._base: Path | None = None
        self._counter = itertools.count()
        # Invariant: every directory in `_idle` is an empty sandbox with mode 0o700 that no
        # running process uses. Creating and removing a directory costs up to a millisecond on
        # some file systems (ext4 with `discard` frees a block per rmdir), more than running
        # /bin/true, so the sandboxes of processes that leave them empty are reused.
        self._idle: list[Path] = []
        self._kept = 0
        self._inherited: dict[str, str] = {}
        self._identity = ""

    async def open(self, store: Store) -> None:
        """Create this executor's sandbox base directory and read the inherited variables."""
        self._ensure_open()

    def _ensure_open(self) -> Path:
        if self._base is None:
            root = self.config.sandbox_root
            if root is not None:
                root = root.expanduser()
                try:
                    root.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ExecutorError(
                        f"Environment {self.name!r}: cannot create sandbox_root {str(root)!r}: "
                        f"{exc.strerror}. Fix sandbox_root in [environments.{self.name}]."
                    ) from exc
            # Read once, so that the identity (a part of every cache key) and the variables
            # processes actually see can never disagree.
            self._inherited = {
                name: os.environ[name] for name in self.config.inherit_env if name in os.environ
            }
            self._identity = self._compute_identity()
            self._base = Path(tempfile.mkdtemp(prefix=f"rulework-{self.name}-", dir=root)).resolve()
        return self._base

    def _compute_identity(self) -> str:
        uname = os.uname()
        identity = f"local:{uname.sysname}-{uname.machine}"
        if self._inherited:
            # Inherited values change what processes see, so they are part of the identity.
            material = json.dumps(sorted(self._inherited.items())).encode()
            identity += f";inherit_env={blake3.blake3(material).hexdigest()[:32]}"
        return identity

    async def identity(self) -> str:
        """ "local:<system>-<machine>" (e.g. "local:Linux-x86_64"), plus a hash of the values of
        `inherit_env` when it names any: results from different platforms never mix."""
        self._ensure_open()
        return self._identity

    async def aclose(self) -> None:
        """Remove the sandbox base directory (unless it holds kept sandboxes)."""
        base, self._base = self._base, None
        idle, self._idle = self._idle, []
        if base is None:
            return
        with trio.CancelScope(shield=True):
            if self._kept:
                logger.info("Kept sandboxes of environment %r are under %s", self.name, base)
                for sandbox in idle:
                    await trio.to_thread.run_sync(_remove_tree, sandbox)
            else:
                await trio.to_thread.run_sync(_remove_tree, base)

    async def execute(self, process: Process, store: Store) -> ExecutedProcess:
        """Run `process` in a fresh sandbox and capture its outputs into `store`.

        Raises:
            ExecutorError: the program does not exist or cannot be executed, or the sandbox
                cannot be prepared.
        """
        async with self._limiter:
            base = self._ensure_open()
            if self._idle:
                sandbox = self._idle.pop()
            else:
                sandbox = base / str(next(self._counter))
                os.mkdir(sandbox)
                os.chmod(sandbox, 0o700)  # whatever the umask, so that _is_pristine can compare
            outcome: _Outcome | None = None
            errored = False
            try:
                if process.input_digest != EMPTY_DIGEST:
                    await store.materialize(process.input_digest, sandbox)
                cwd = sandbox
                if process.working_directory is not None:
                    cwd = sandbox / process.working_directory
                    try:
                        cwd.mkdir(parents=True, exist_ok=True)
                    except OSError as exc:
                        raise ExecutorError(
                            f"Cannot start '{process.description}' in environment "
                            f"{self.name!r}: the working directory "
                            f"{process.working_directory!r} cannot be created in the sandbox "
                            f"({exc.strerror}); is it a file in the input digest?"
                        ) from exc
                env = {**self._inherited, **process.env}
                outcome = await self._run(process, cwd, env)
                if process.output_files or process.output_directories:
                    output_digest = await store.capture(
                        cwd, process.output_files, process.output_directories
                    )
                else:
                    output_digest = EMPTY_DIGEST
            except Exception:
                # (Not a cancellation: that is no failure of the process, nothing to debug.)
                errored = True
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await self._dispose(sandbox, process, outcome, errored=errored)
        return ExecutedProcess(
            outcome.exit_code,
            outcome.stdout,
            outcome.stderr,
            output_digest,
            outcome.duration_seconds,
            outcome.timed_out,
        )

    async def _dispose(
        self, sandbox: Path, process: Process, outcome: _Outcome | None, *, errored: bool
    ) -> None:
        keep = self.config.keep_sandboxes
        failed = errored or (outcome is not None and (outcome.exit_code != 0 or outcome.timed_out))
        if keep == "always" or (keep == "on_failure" and failed):
            self._kept += 1
            logger.warning(
                "Kept the sandbox of '%s' (environment %r) at %s",
                process.description,
                self.name,
                sandbox,
            )
            return
        if _is_pristine(sandbox):
            self._idle.append(sandbox)
            return
        await trio.to_thread.run_sync(_remove_tree, sandbox)

    @trio.lowlevel.enable_ki_protection
    def _spawn(self, process: Process, cwd: Path, env: Mapping[str, str]) -> _Spawned:
        """Start `process` in its own session, its stdout and stderr on pipes.

        On the event-loop thread, not in a worker thread as `trio.lowlevel.open_process` does:
        CPython starts children with vfork (no page tables copied, whatever this process's
        size), so `Popen` returns as soon as the child has called exec, in ~0.2 ms here, while
        the thread hop around it cost more than that again in CPU, on the thread every process
        needs. Measured with 2,000 `/bin/true` at parallelism 2: 10-25% more processes per
        second. Set `spawn_in_thread = true` where exec itself may block (programs on a slow
        network file system).

        KI-protected: a Ctrl-C during the call is raised at the caller's next checkpoint, where
        the child is known and its group gets killed, instead of between fork and the return,
        which would leave the child running unseen.
        """
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            popen = subprocess.Popen(
                process.argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                start_new_session=True,
            )
        except BaseException:
            for fd in (out_read, err_read):
                os.close(fd)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        return _Spawned(popen, trio.lowlevel.FdStream(out_read), trio.lowlevel.FdStream(err_read))

    async def _run(self, process: Process, cwd: Path, env: Mapping[str, str]) -> _Outcome:
        started = time.monotonic()
        try:
            if self.config.spawn_in_thread:
                spawned = await trio.to_thread.run_sync(self._spawn, process, cwd, env)
            else:
                spawned = self._spawn(process, cwd, env)
        except OSError as exc:
            raise self._spawn_error(process, cwd, env, exc) from exc
        proc = spawned.popen
        stdout, stderr = bytearray(), bytearray()
        timed_out = False
        # Invariant: the process is reaped (poll/wait) only after its group got its last
        # signal, so the group id can never name another process when we signal it.
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, spawned.stdout, stdout)
                nursery.start_soon(_drain, spawned.stderr, stderr)
                timeout = process.timeout_seconds
                with trio.move_on_after(math.inf if timeout is None else timeout) as wait_scope:
                    await _wait_exited_unreaped(proc)
                duration = time.monotonic() - started
                timed_out = wait_scope.cancelled_caught
                await self._stop_group(proc, exited=not timed_out)
                nursery.cancel_scope.deadline = trio.current_time() + _EOF_GRACE_SECONDS
            if nursery.cancel_scope.cancelled_caught:
                logger.warning(
                    "Process '%s' left a descendant outside its process group holding its "
                    "stdout/stderr open; its output may be incomplete.",
                    process.description,
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._stop_group(proc, exited=False)
            raise
        finally:
            with trio.CancelScope(shield=True):
                exit_code = await _reap(proc)
                await spawned.stdout.aclose()
                await spawned.stderr.aclose()
        return _Outcome(exit_code, bytes(stdout), bytes(stderr), duration, timed_out)

    async def _stop_group(self, proc: subprocess.Popen[bytes], *, exited: bool) -> None:
        """Kill the process group of `proc` (which must not have been reaped yet)."""
        with trio.CancelScope(shield=True):
            if not exited:
                _killpg(proc.pid, signal.SIGTERM)
                with trio.move_on_after(self.config.kill_grace_seconds):
                    await _wait_exited_unreaped(proc)
            # Also reaches what the process left running after a normal exit.
            _killpg(proc.pid, signal.SIGKILL)

    def _spawn_error(
        self, process: Process, cwd: Path, env: Mapping[str, str], exc: OSError
    ) -> ExecutorError:
        program = process.argv[0]
        where = f"in environment {self.name!r}"
        if exc.filename is not None and os.fspath(exc.filename) == os.fspath(cwd):
            return ExecutorError(
                f"Cannot start '{process.description}' {where}: the working directory "
                f"{process.working_directory!r} is unusable: {exc.strerror}."
            )
        if exc.errno == errno.ENOENT:
            if "/" in program:
                return ExecutorError(
                    f"Cannot run {program!r} for '{process.description}' {where}: no such file "
                    f"(relative paths are resolved from the working directory in the sandbox)."
                )
            if "PATH" in env:
                searched = f"PATH={env['PATH']!r} (from the Process env)"
            else:
                searched = (
                    f"the default search path {os.defpath!r}, because the Process env has no PATH"
                )
            return ExecutorError(
                f"Cannot run {program!r} for '{process.description}' {where}: executable not "
                f"found in {searched}. Give an absolute path, or set PATH in Process.env."
            )
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOEXEC):
            return ExecutorError(
                f"Cannot run {program!r} for '{process.description}' {where}: {exc.strerror} "
                "(is it an executable file? scripts need a #! line and the executable bit)."
            )
        return ExecutorError(f"Cannot start {program!r} for '{process.description}' {where}: {exc}")


def _is_pristine(sandbox: Path) -> bool:
    """Whether `sandbox` is an empty directory with the mode it was created with."""
    try:
        with os.scandir(sandbox) as entries:
            if next(entries, None) is not None:
                return False
        info = os.lstat(sandbox)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700


def _remove_tree(path: Path) -> None:
    def on_error(func: object, failed: str, exc_info: object) -> None:
        # A process may leave read-only directories behind; make them writable and retry once.
        try:
            os.chmod(os.path.dirname(failed), 0o700)
            os.chmod(failed, 0o700)
            if os.path.isdir(failed) and not os.path.islink(failed):
                shutil.rmtree(failed, ignore_errors=True)
            else:
                os.unlink(failed)
        except OSError as exc:
            logger.warning("Could not remove %s: %s", failed, exc)

    shutil.rmtree(path, onerror=on_error)


__all__ = ["LocalExecutor", "LocalExecutorConfig"]
