"""The `container` executor: run Processes inside Docker or Podman containers.

```toml
[environments.py311]
kind = "container"
runtime = "docker"                # "docker" | "podman"
image = "localhost/py311:latest"  # must be present locally: rulework never pulls
parallelism = 4
mode = "exec"                     # "run": `run --rm` per Process; "exec": one container per session
network = "none"
mounts = ["/opt/toolchain:/opt/toolchain"]   # read-only bind mounts, "HOST:CONTAINER"
```

How a Process runs: its `input_digest` is materialized into a fresh local sandbox directory,
which the container sees at `/sandbox` (mode "run": the sandbox itself is mounted there; mode
"exec": the session's sandbox root is mounted once at `/sandbox` and each Process gets its own
`/sandbox/<id>`). argv runs in the sandbox (or its `working_directory`) with the Process's
`env` given variable by variable: nothing of the caller's environment reaches the container.
The container still sees what the runtime itself defines: `HOSTNAME`, `HOME`, the image's
`ENV` and a default `PATH` when neither sets one. The declared outputs are captured from the
local sandbox, which is then removed. Since the sandbox is a bind mount, the daemon must see
this machine's file system (a local daemon, rootful or rootless; not a remote `DOCKER_HOST`).

The runtime is driven through its command-line client, whose own configuration
(`DOCKER_HOST`, `CONTAINER_HOST`, `DOCKER_CONTEXT`, `CONTAINERS_CONF`...) is honoured as usual.
The image is resolved to its content ID once per session, in `open`; that ID is part of
`identity()` (so rebuilding the image under the same tag invalidates its cached results) and
containers are started from the ID, so a rebuild during a session cannot mix two images.

Every container carries the labels `rulework=1`, `rulework.session=<id>` and
`rulework.owner=<host>:<pid>:<start time>`. `aclose` removes all the containers of its session,
even when the session was cancelled (Ctrl-C); `open` removes the leftovers of runs on this host
whose owning process is gone (a crash, `kill -9`). To clean up by hand:
`docker rm -f $(docker ps -aq --filter label=rulework=1)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar, Literal

import trio

from ..abc import ExecutedProcess
from ..engine.errors import ExecutorError
from ..engine.fs import EMPTY_DIGEST

if TYPE_CHECKING:
    from ..engine.process import Process
    from ..engine.store import Store

logger = logging.getLogger(__name__)

#: Where the sandbox appears inside the container.
SANDBOX_MOUNT = "/sandbox"
#: Every container rulework starts carries this label (value "1").
LABEL = "rulework"
LABEL_SESSION = "rulework.session"
LABEL_OWNER = "rulework.owner"
LABEL_ENVIRONMENT = "rulework.environment"

# Safety nets, not expected durations: a management command (inspect, ps, rm) that takes longer
# means the daemon is wedged, and cleanup after a cancellation must not hang a Ctrl-C forever.
_CLI_DEADLINE = 120.0
_STOP_DEADLINE = 30.0

# Runs each Process of an "exec" mode container, as `sh -c WRAPPER CONTROL argv...` (CONTROL in
# $0: the script sets no variable, which could clash with one of the Process env). It records
# its pid (which `docker exec` makes a session and process-group leader) in `CONTROL.pid`, then
# checks for `CONTROL.cancel`: a canceller writes `.cancel` first and reads `.pid` second, so
# either the wrapper sees the marker and never starts argv, or the canceller sees the pid and
# kills its group. `.notfound` tells a missing (or, given as a path, not executable) program
# from argv's own exit code 127. `exec` keeps the pid.
_EXEC_WRAPPER = (
    'echo $$ > "$0.pid" || exit 126; [ -e "$0.cancel" ] && exit 137; {unset}'
    'case $1 in */*) [ -f "$1" ] && [ -x "$1" ];; *) command -v "$1" >/dev/null 2>&1;; esac'
    ' || {{ : > "$0.notfound"; exit 127; }}; exec "$@"'
)
# Variables a POSIX shell may add to its own environment (busybox ash exports PWD and SHLVL);
# the wrapper unsets those the Process did not set, so that argv sees exactly what "run" gives.
_SHELL_ADDED_VARIABLES = ("PWD", "OLDPWD", "SHLVL", "_")
# Keeps the "exec" mode container alive: `read` blocks on the stdin that `run -i` holds open.
_KEEP_ALIVE = "read _; while sleep 3600; do :; done"


@dataclass(frozen=True, slots=True)
class ContainerEnvironmentConfig:
    """The settings of a `kind = "container"` environment.

    Attributes:
        image: Image reference (tag or ID) present in the runtime's local image store.
        runtime: `"docker"` or `"podman"`: the client binary, looked up on `PATH`.
        parallelism: At most this many Processes run at once in this environment.
        platform: If set (`"linux/amd64"`), the image must be of that platform.
        mounts: Extra read-only bind mounts, each `"HOST_PATH:CONTAINER_PATH"` (toolchains,
            caches). Their paths are part of `identity()`, their content is not.
        user: `--user` for the container (`"1000:1000"`, `"nobody"`); default: the image's.
        network: `--network`; `"none"` (the default) gives the container no network at all.
        extra_args: Appended verbatim to the `run` command (e.g. `["--memory", "2g"]`).
        mode: `"run"`: a fresh container per Process (`run --rm`); `"exec"`: one long-lived
            container per session, each Process started with `exec` (much cheaper; the image
            needs `/bin/sh`).
        sandbox_dir: Local directory under which sandboxes are created (default: the system's
            temporary directory); the runtime must be able to bind-mount it.
        selinux_label: Relabel the bind mounts for SELinux (`:z`), which hosts that enforce it
            (Fedora, RHEL) need for the container to use them; ignored where SELinux is off.
    """

    image: str
    runtime: Literal["docker", "podman"] = "docker"
    parallelism: int = 4
    platform: str | None = None
    mounts: tuple[str, ...] = ()
    user: str | None = None
    network: str = "none"
    extra_args: tuple[str, ...] = ()
    mode: Literal["run", "exec"] = "run"
    sandbox_dir: str | None = None
    selinux_label: bool = False

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            # ValueError, like every config_type: the config loader adds the file and key path.
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))

    def _problems(self) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        if not isinstance(self.image, str) or not self.image.strip():
            found.append(("image", f"expected a non-empty image reference, found {self.image!r}"))
        if self.runtime not in ("docker", "podman"):
            found.append(("runtime", f"expected 'docker' or 'podman', found {self.runtime!r}"))
        if isinstance(self.parallelism, bool) or not isinstance(self.parallelism, int):
            found.append(("parallelism", f"expected an integer >= 1, found {self.parallelism!r}"))
        elif self.parallelism < 1:
            found.append(("parallelism", f"expected an integer >= 1, found {self.parallelism}"))
        if self.mode not in ("run", "exec"):
            found.append(("mode", f"expected 'run' or 'exec', found {self.mode!r}"))
        if not isinstance(self.network, str) or not self.network:
            found.append(
                ("network", f"expected a network name such as 'none', found {self.network!r}")
            )
        if self.platform is not None and self.platform.count("/") not in (1, 2):
            found.append(
                (
                    "platform",
                    f"expected OS/ARCH[/VARIANT] such as 'linux/amd64', found {self.platform!r}",
                )
            )
        for index, mount in enumerate(self.mounts):
            problem = _mount_problem(mount)
            if problem:
                found.append((f"mounts[{index}]", problem))
        if self.sandbox_dir is not None and (":" in self.sandbox_dir or "," in self.sandbox_dir):
            found.append(
                (
                    "sandbox_dir",
                    f"must not contain ':' or ',' (they end a --volume value), found {self.sandbox_dir!r}",
                )
            )
        return found


def _mount_problem(mount: object) -> str | None:
    if not isinstance(mount, str) or mount.count(":") != 1:
        return f"expected 'HOST_PATH:CONTAINER_PATH' (mounted read-only), found {mount!r}"
    host, container = mount.split(":")
    if not os.path.isabs(os.path.expanduser(host)):
        return f"the host path of {mount!r} must be absolute (or start with ~)"
    if not container.startswith("/"):
        return f"the container path of {mount!r} must be absolute"
    if (
        PurePosixPath(container) == PurePosixPath(SANDBOX_MOUNT)
        or PurePosixPath(SANDBOX_MOUNT) in PurePosixPath(container).parents
    ):
        return f"{mount!r} would hide the sandbox, which is mounted at {SANDBOX_MOUNT}"
    return None


class _ContainerGone(Exception):
    """The "exec" mode container no longer exists or no longer runs."""


@dataclass(frozen=True, slots=True)
class _Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True, slots=True)
class _ImageInfo:
    id: str
    platform: str


class ContainerExecutor:
    """Runs Processes in containers of one image, through the Docker or Podman CLI.

    See the module docstring for the semantics; `config_type` for the settings.

    Example:
        ```python
        executor = ContainerExecutor("py311", ContainerEnvironmentConfig(image="py311:latest"))
        await executor.open(store)
        try:
            result = await executor.execute(Process(argv=("python", "-V")), store)
        finally:
            await executor.aclose()
        ```
    """

    config_type: ClassVar[type[ContainerEnvironmentConfig]] = ContainerEnvironmentConfig

    def __init__(self, name: str, config: ContainerEnvironmentConfig) -> None:
        self.name = name
        self.config = config
        self.parallelism = config.parallelism
        #: Labels every container of this executor; also names its sandbox directory.
        self.session_id = secrets.token_hex(6)
        self._runtime_path: str | None = None
        self._image: _ImageInfo | None = None
        self._session_dir: Path | None = None
        self._limiter: trio.CapacityLimiter | None = None
        self._exec_lock: trio.Lock | None = None
        self._exec_container: str | None = None
        # Invariant: every container this executor may have created (started, or only
        # requested) and not yet seen removed is named here; `aclose` removes what is left.
        self._containers: set[str] = set()
        self._counter = 0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, store: Store) -> None:
        """Find the runtime, check the daemon and resolve the image's content ID.

        Also removes leftover containers of crashed runs on this host.

        Raises:
            ExecutorError: the runtime binary is missing, its daemon is unreachable or denies
                access, or the image is not present locally (the message says how to fix it).
        """
        del store  # sandboxes are materialized per Process
        if self._image is not None:
            return
        runtime = self.config.runtime
        found = shutil.which(runtime)
        if found is None:
            raise ExecutorError(
                f"Environment '{self.name}': the container runtime '{runtime}' was not found "
                f"on PATH. Install {_INSTALL_HINTS[runtime]}, or set `runtime` in "
                f"[environments.{self.name}] to the runtime you have."
            )
        self._runtime_path = found
        self._image = await self._inspect_image()
        if self.config.platform is not None and not _same_platform(
            self.config.platform, self._image.platform
        ):
            raise ExecutorError(
                f"Environment '{self.name}': image '{self.config.image}' is for "
                f"{self._image.platform}, but the environment asks for platform "
                f"{self.config.platform}. Build or pull the image for that platform "
                f"(`{runtime} pull --platform {self.config.platform} {self.config.image}`), "
                "or change `platform`."
            )
        self._limiter = trio.CapacityLimiter(self.parallelism)
        self._exec_lock = trio.Lock()
        self._session_dir = await trio.to_thread.run_sync(self._make_session_dir)
        await self._remove_leftovers()

    async def identity(self) -> str:
        """`container:` and a canonical JSON of the image's content ID, its platform and every
        setting that can change what a Process produces (user, network, mounts, extra args).

        `runtime`, `mode` and `parallelism` are left out: they do not change results.
        """
        image = self._require_open()
        return "container:" + json.dumps(
            {
                "image_id": image.id,
                "platform": image.platform,
                "user": self.config.user,
                "network": self.config.network,
                "mounts": list(self.config.mounts),
                "extra_args": list(self.config.extra_args),
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    async def aclose(self) -> None:
        """Remove every container of this session and the session's sandbox directory.

        Safe to call from a cancelled scope (after Ctrl-C) and more than once.
        """
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _STOP_DEADLINE
            try:
                if self._runtime_path is not None:
                    await self._remove_session_containers()
            finally:
                if self._session_dir is not None:
                    await trio.to_thread.run_sync(_remove_tree, self._session_dir)
        if scope.cancelled_caught:
            logger.warning(
                "Environment '%s': removing the containers of session %s took longer than %ss; "
                "remove them with `%s rm -f $(%s ps -aq --filter label=%s=%s)`.",
                self.name, self.session_id, _STOP_DEADLINE, self.config.runtime,
                self.config.runtime, LABEL_SESSION, self.session_id,
            )  # fmt: skip

    # -- execution -------------------------------------------------------------------------

    async def execute(self, process: Process, store: Store) -> ExecutedProcess:
        """Run `process` in a container; see the module docstring.

        Raises:
            ExecutorError: the runtime failed to start the container (not a non-zero exit of
                argv, which is reported in the result).
        """
        self._require_open()
        assert self._limiter is not None
        async with self._limiter:
            container = await self._exec_mode_container() if self.config.mode == "exec" else None
            sandbox = await trio.to_thread.run_sync(self._make_sandbox)
            try:
                if process.input_digest != EMPTY_DIGEST:
                    await store.materialize(process.input_digest, sandbox)
                workdir = sandbox
                if process.working_directory:
                    workdir = sandbox / process.working_directory
                await trio.to_thread.run_sync(self._prepare_sandbox, sandbox, workdir)
                stdout, stderr = bytearray(), bytearray()
                started = trio.current_time()
                timeout = process.timeout_seconds
                with trio.move_on_after(math.inf if timeout is None else timeout) as deadline:
                    if container is None:
                        exit_code = await self._run_in_new_container(
                            process, sandbox, stdout, stderr
                        )
                    else:
                        try:
                            exit_code = await self._run_in_exec_container(
                                container, process, sandbox, stdout, stderr
                            )
                        except _ContainerGone:
                            # Removed or crashed behind our back (`docker rm -f`, the OOM
                            # killer): start a new one and run the Process there, once.
                            logger.warning(
                                "Environment '%s': container %s is gone; starting a new one.",
                                self.name, container,
                            )  # fmt: skip
                            container = await self._exec_mode_container(replacing=container)
                            del stdout[:], stderr[:]
                            exit_code = await self._run_in_exec_container(
                                container, process, sandbox, stdout, stderr
                            )
                duration = trio.current_time() - started
                timed_out = deadline.cancelled_caught
                if timed_out:
                    exit_code = -9
                output_digest = EMPTY_DIGEST
                if process.output_files or process.output_directories:
                    output_digest = await store.capture(
                        workdir, process.output_files, process.output_directories
                    )
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._remove_sandbox, sandbox)
        return ExecutedProcess(
            exit_code=exit_code,
            stdout=bytes(stdout),
            stderr=bytes(stderr),
            output_digest=output_digest,
            duration_seconds=duration,
            timed_out=timed_out,
        )

    async def _run_in_new_container(
        self, process: Process, sandbox: Path, stdout: bytearray, stderr: bytearray
    ) -> int:
        name = self._new_container_name()
        argv = [
            *self._runtime_command("run"),
            "--rm",
            f"--name={name}",
            *self._container_options(sandbox),
            f"--workdir={self._container_workdir(process, SANDBOX_MOUNT)}",
            *_env_options(process.env),
            f"--entrypoint={process.argv[0]}",
            *self.config.extra_args,
            self._require_open().id,
            *process.argv[1:],
        ]

        async def stop() -> None:
            # Kills and removes in one call; the `run` client then sees its container gone.
            await self._remove_containers([name])

        self._containers.add(name)
        returncode = await _run_streaming(argv, stdout, stderr, stop)
        # `run --rm` returns once the container is removed: nothing left to clean up.
        self._containers.discard(name)
        if _is_runtime_failure(returncode, stderr):
            lowered = bytes(stderr).lower()
            if any(
                text in lowered
                for text in (b"executable file not found", b"no such file", b"permission denied")
            ):
                raise self._program_not_found(process)
            raise self._diagnose(bytes(stderr), f"starting a container for '{_describe(process)}'")
        return returncode

    async def _run_in_exec_container(
        self,
        container: str,
        process: Process,
        sandbox: Path,
        stdout: bytearray,
        stderr: bytearray,
    ) -> int:
        session_dir = self._require_session_dir()
        control = session_dir / ".rulework" / sandbox.name
        in_container = f"{SANDBOX_MOUNT}/{sandbox.name}"
        unset = [v for v in _SHELL_ADDED_VARIABLES if v not in process.env]
        wrapper = _EXEC_WRAPPER.format(unset=f"unset {' '.join(unset)}; " if unset else "")
        argv = [
            *self._runtime_command("exec"),
            f"--workdir={self._container_workdir(process, in_container)}",
            *([f"--user={self.config.user}"] if self.config.user else []),
            *_env_options(process.env),
            container,
            "/bin/sh",
            "-c",
            wrapper,
            f"{SANDBOX_MOUNT}/.rulework/{sandbox.name}",
            *process.argv,
        ]

        async def stop() -> None:
            await self._kill_exec(container, control)

        try:
            returncode = await _run_streaming(argv, stdout, stderr, stop)
            pid_written, not_found = await trio.to_thread.run_sync(
                lambda: (
                    control.with_suffix(".pid").exists(),
                    control.with_suffix(".notfound").exists(),
                )
            )
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove_control_files, control)
        if not pid_written:
            # The wrapper never ran: the runtime could not exec in the container.
            lowered = bytes(stderr).lower()
            if b"no such container" in lowered or b"is not running" in lowered:
                raise _ContainerGone(container)
            raise self._diagnose(
                bytes(stderr), f"running '{_describe(process)}' in container {container}"
            )
        if not_found:
            raise self._program_not_found(process)
        return returncode

    async def _kill_exec(self, container: str, control: Path) -> None:
        def mark_cancelled() -> str:
            control.with_suffix(".cancel").touch()
            try:
                return control.with_suffix(".pid").read_text().strip()
            except FileNotFoundError:
                return ""

        pid = await trio.to_thread.run_sync(mark_cancelled)
        if not pid.isdigit():
            return  # the wrapper has not written its pid yet, so it will see `.cancel`
        result = await self._cli(
            "exec",
            container,
            "/bin/sh",
            "-c",
            'kill -KILL -- "-$1" 2>/dev/null || kill -KILL "$1"',
            "rulework-kill",
            pid,
        )
        if result.returncode != 0 and b"No such process" not in result.stderr:
            logger.warning(
                "Environment '%s': could not kill process %s in container %s: %s",
                self.name, pid, container, result.stderr.decode(errors="replace").strip(),
            )  # fmt: skip

    async def _exec_mode_container(self, *, replacing: str | None = None) -> str:
        """The session's long-lived container, started on first use (or to replace one that
        is gone; concurrent callers replacing the same one start a single new container)."""
        assert self._exec_lock is not None
        async with self._exec_lock:
            if replacing is not None and self._exec_container == replacing:
                await self._remove_containers([replacing])
                self._exec_container = None
            if self._exec_container is not None:
                return self._exec_container
            name = self._new_container_name("exec")
            argv = [
                *self._runtime_command("run"),
                "--detach",
                "--interactive",
                "--init",
                f"--name={name}",
                *self._container_options(self._require_session_dir()),
                "--entrypoint=/bin/sh",
                *self.config.extra_args,
                self._require_open().id,
                "-c",
                _KEEP_ALIVE,
            ]
            self._containers.add(name)
            result = await _run_cli(argv)
            if result.returncode != 0:
                await self._remove_containers([name])
                error = self._diagnose(result.stderr, "starting the long-lived container")
                if b"/bin/sh" in result.stderr:
                    error = ExecutorError(
                        f"{error}\nmode = 'exec' needs /bin/sh in the image; use mode = 'run' "
                        "for images without a shell."
                    )
                raise error
            self._exec_container = name
            return name

    # -- helpers ---------------------------------------------------------------------------

    def _require_open(self) -> _ImageInfo:
        if self._closed:
            raise ExecutorError(f"Environment '{self.name}': the executor was already closed.")
        if self._image is None:
            raise ExecutorError(
                f"Environment '{self.name}': the executor was not opened; call `await "
                "executor.open(store)` before `execute` (the engine does this for you)."
            )
        return self._image

    def _require_session_dir(self) -> Path:
        assert self._session_dir is not None, "open() creates the session directory"
        return self._session_dir

    def _runtime_command(self, *args: str) -> list[str]:
        assert self._runtime_path is not None
        return [self._runtime_path, *args]

    async def _cli(self, *args: str) -> _Completed:
        return await _run_cli(self._runtime_command(*args))

    def _new_container_name(self, kind: str = "run") -> str:
        self._counter += 1
        safe_name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in self.name)
        return f"rulework-{safe_name}-{self.session_id}-{kind}{self._counter}"

    def _container_options(self, sandbox: Path) -> list[str]:
        """Options shared by both modes' `run`: labels, isolation and mounts."""
        options = [
            f"--label={LABEL}=1",
            f"--label={LABEL_SESSION}={self.session_id}",
            f"--label={LABEL_OWNER}={_owner_token(os.getpid())}",
            f"--label={LABEL_ENVIRONMENT}={self.name}",
            f"--network={self.config.network}",
            f"--volume={sandbox}:{SANDBOX_MOUNT}{':z' if self.config.selinux_label else ''}",
        ]
        for mount in self.config.mounts:
            host, container = mount.split(":")
            label = ",z" if self.config.selinux_label else ""
            options.append(f"--volume={os.path.expanduser(host)}:{container}:ro{label}")
        if self.config.user:
            options.append(f"--user={self.config.user}")
        if self.config.runtime == "podman":
            # Podman also defines these two by default, Docker does not: drop them so that a
            # Process sees the same environment under both (its own `--env` still wins).
            options.extend(f"--unsetenv={name}" for name in _PODMAN_DEFAULT_VARIABLES)
        return options

    @staticmethod
    def _container_workdir(process: Process, sandbox_in_container: str) -> str:
        if process.working_directory:
            return f"{sandbox_in_container}/{process.working_directory}"
        return sandbox_in_container

    async def _inspect_image(self) -> _ImageInfo:
        # The whole record as JSON: a template naming an absent key (`.Variant` on most
        # images) fails on some runtime versions.
        result = await self._cli("image", "inspect", "--format", "{{json .}}", self.config.image)
        if result.returncode != 0:
            raise self._diagnose(result.stderr, f"looking up image '{self.config.image}'")
        try:
            record = json.loads(result.stdout)
            if isinstance(record, list):  # podman answers a list even with --format
                record = record[0]
            image_id = record["Id"]
            platform = "/".join(
                str(part)
                for part in (record.get("Os"), record.get("Architecture"), record.get("Variant"))
                if part
            )
        except (ValueError, LookupError, TypeError, AttributeError) as exc:
            raise ExecutorError(
                f"Environment '{self.name}': could not read the answer of `{self.config.runtime} "
                f"image inspect {self.config.image}` ({exc!r}): {result.stdout[:300]!r}"
            ) from exc
        if not image_id.startswith("sha256:") and ":" not in image_id:
            image_id = f"sha256:{image_id}"  # podman gives the bare hex
        return _ImageInfo(id=image_id, platform=platform)

    def _program_not_found(self, process: Process) -> ExecutorError:
        program = process.argv[0]
        if "/" in program:
            return ExecutorError(
                f"Cannot run {program!r} for '{process.description}' in environment "
                f"{self.name!r}: no such file in the sandbox or image '{self.config.image}', or "
                "it is not executable (relative paths are resolved from the working directory "
                "in the sandbox; scripts need a #! line and the executable bit)."
            )
        searched = (
            f"PATH={process.env['PATH']!r} (from the Process env)"
            if "PATH" in process.env
            else "the PATH of the image (or the runtime's default), since the Process env has no PATH"
        )
        return ExecutorError(
            f"Cannot run {program!r} for '{process.description}' in environment {self.name!r}: "
            f"executable not found in image '{self.config.image}' on {searched}. Give an "
            "absolute path, set PATH in Process.env, or add the program to the image."
        )

    def _diagnose(self, stderr: bytes, doing: str) -> ExecutorError:
        """Turn a runtime client's failure into an ExecutorError that says what to do."""
        runtime = self.config.runtime
        message = stderr.decode(errors="replace").strip()
        lowered = message.lower()
        where = f"Environment '{self.name}' ({runtime}): {doing} failed"
        host = os.environ.get("CONTAINER_HOST" if runtime == "podman" else "DOCKER_HOST")
        if "permission denied" in lowered and ("daemon socket" in lowered or ".sock" in lowered):
            fix = (
                f"Your user may not use the {runtime} socket. Add it to the '{runtime}' group "
                f"(`sudo usermod -aG {runtime} $USER`, then log in again), use a rootless "
                f"daemon, or point {'CONTAINER_HOST' if runtime == 'podman' else 'DOCKER_HOST'} "
                "at a socket you may use."
            )
        elif any(
            text in lowered
            for text in (
                "cannot connect to the docker daemon",
                "is the docker daemon running",
                "cannot connect to podman",
                "connection refused",
                "connect: no such file or directory",
                "error during connect",
            )
        ):
            fix = (
                f"The {runtime} daemon is not reachable"
                + (f" at {host}" if host else "")
                + f". Start it (`sudo systemctl start {runtime}`"
                + (", or `systemctl --user start podman.socket`" if runtime == "podman" else "")
                + f"), or set {'CONTAINER_HOST' if runtime == 'podman' else 'DOCKER_HOST'} to "
                "the socket of one that runs."
            )
        elif any(
            text in lowered
            for text in (
                "no such image",
                "image not known",
                "unable to find image",
                "not found: manifest",
            )
        ):
            fix = (
                f"Image '{self.config.image}' is not present locally, and rulework never pulls "
                f"images. Build it (`{runtime} build -t {self.config.image} .`) or pull it "
                f"(`{runtime} pull {self.config.image}`), then run again."
            )
        else:
            fix = "The runtime said what went wrong above."
        return ExecutorError(f"{where}:\n  {message or '(no message)'}\n{fix}")

    def _make_session_dir(self) -> Path:
        parent = self.config.sandbox_dir or tempfile.gettempdir()
        parent = os.path.expanduser(parent)
        os.makedirs(parent, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"rulework-{self.session_id}-", dir=parent))
        # A container user other than root must be able to reach its sandbox.
        path.chmod(0o777 if self.config.user else 0o755)
        if self.config.mode == "exec":
            control = path / ".rulework"
            control.mkdir()
            control.chmod(0o777 if self.config.user else 0o755)
        return path

    def _make_sandbox(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="p", dir=self._require_session_dir()))

    def _prepare_sandbox(self, sandbox: Path, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        if self.config.user:
            # The image's user is usually not this host user: let it create its outputs.
            for directory, _, _ in os.walk(sandbox):
                os.chmod(directory, 0o777)
        else:
            sandbox.chmod(0o755)

    def _remove_sandbox(self, sandbox: Path) -> None:
        _remove_tree(sandbox)

    # -- containers ------------------------------------------------------------------------

    async def _remove_containers(self, names: Iterable[str]) -> None:
        names = list(names)
        if not names:
            return
        # Podman's `rm --force` first stops with SIGTERM and waits 10 s; Docker's kills at once.
        timeout = ["--time=0"] if self.config.runtime == "podman" else []
        result = await self._cli("rm", "--force", *timeout, *names)
        failed = [
            line
            for line in result.stderr.decode(errors="replace").splitlines()
            if line.strip()
            and "no such container" not in line.lower()
            and "already in progress" not in line.lower()
        ]
        if result.returncode != 0 and failed:
            logger.warning(
                "Environment '%s': could not remove containers %s: %s",
                self.name, " ".join(names), "; ".join(failed),
            )  # fmt: skip
        else:
            self._containers.difference_update(names)

    async def _list_containers(self, label: str) -> list[str]:
        result = await self._cli("ps", "--all", "--quiet", "--no-trunc", f"--filter=label={label}")
        if result.returncode != 0:
            raise self._diagnose(result.stderr, "listing containers")
        return result.stdout.decode().split()

    async def _remove_session_containers(self) -> None:
        # First those we know by name, then whatever else carries the session's label (a
        # container whose `run` was interrupted between its create and our bookkeeping).
        await self._remove_containers(sorted(self._containers))
        try:
            await self._remove_containers(
                await self._list_containers(f"{LABEL_SESSION}={self.session_id}")
            )
        except ExecutorError as exc:
            logger.warning("%s", exc)
        self._exec_container = None

    async def _remove_leftovers(self) -> None:
        """Remove containers of earlier runs on this host whose owning process is gone."""
        ids = await self._list_containers(f"{LABEL}=1")
        if not ids:
            return
        result = await self._cli("inspect", "--format", "{{.Id}} {{json .Config.Labels}}", *ids)
        orphans = []
        for line in result.stdout.decode(errors="replace").splitlines():
            container_id, _, labels_json = line.partition(" ")
            try:
                labels = json.loads(labels_json) or {}
            except ValueError:
                continue
            owner = labels.get(LABEL_OWNER, "")
            if _owner_is_gone(owner):
                orphans.append(container_id)
        if orphans:
            logger.info(
                "Environment '%s': removing %d container(s) left behind by crashed runs.",
                self.name, len(orphans),
            )  # fmt: skip
            await self._remove_containers(orphans)


_PODMAN_DEFAULT_VARIABLES = ("TERM", "container")

_INSTALL_HINTS = {
    "docker": "Docker (https://docs.docker.com/engine/install/, or Debian's `docker.io`)",
    "podman": "Podman (`apt-get install podman`, `dnf install podman`...)",
}


def _env_options(env: object) -> list[str]:
    # Always NAME=VALUE: a bare `--env NAME` would copy NAME from the client's environment.
    assert hasattr(env, "items")
    return [f"--env={key}={value}" for key, value in sorted(env.items())]


def _describe(process: Process) -> str:
    return process.description or " ".join(process.argv)[:80]


def _same_platform(wanted: str, actual: str) -> bool:
    wanted_parts, actual_parts = wanted.split("/"), actual.split("/")
    # "linux/arm64" matches an image of "linux/arm64/v8": a missing variant is any variant.
    return wanted_parts == actual_parts[: len(wanted_parts)]


def _is_runtime_failure(returncode: int, stderr: bytearray) -> bool:
    """Whether `run` failed itself rather than reporting argv's exit code.

    `docker run` / `podman run` exit 125 when they fail, 126/127 when the program cannot be
    executed or found; argv may exit with those codes too, but then stderr is argv's, not the
    runtime's message ("docker: Error response from daemon: ...", "Error: runc: ... OCI
    runtime ...").
    """
    head = bytes(stderr[:2000])
    from_runtime = head.startswith((b"docker: ", b"Error: ", b"Error response from daemon"))
    if returncode == 125:
        return from_runtime or b"Cannot connect to" in head
    return returncode in (126, 127) and from_runtime and b"OCI runtime" in head


def _remove_tree(path: Path) -> None:
    def make_writable_and_retry(function: Callable[..., object], name: str, _: object) -> None:
        # Read-only inputs (or outputs) in a read-only directory: unlock the parent, retry.
        parent = os.path.dirname(name)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        try:
            function(name)
        except FileNotFoundError:
            pass
        except PermissionError:
            logger.warning(
                "Could not remove %s: it belongs to another user (files written by the "
                "container's root user?). Set `user` in the container environment to your "
                "uid:gid, or use a rootless runtime.",
                name,
            )

    if path.exists():
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _remove_control_files(control: Path) -> None:
    for suffix in (".pid", ".cancel", ".notfound"):
        with contextlib.suppress(FileNotFoundError):
            control.with_suffix(suffix).unlink()


def _owner_token(pid: int) -> str:
    """`host:pid:start-time` naming a live process on this host, robust to pid reuse."""
    return f"{socket.gethostname()}:{pid}:{_process_start_time(pid) or ''}"


def _process_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None  # field 22: start time in clock ticks


def _owner_is_gone(owner: str) -> bool:
    """True when `owner` names a process on this host that no longer runs."""
    host, _, rest = owner.partition(":")
    pid_text, _, start_time = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's (or an unlabelled) container: not ours to judge
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # the pid exists, run by another user
    current = _process_start_time(pid)
    return bool(start_time) and current is not None and current != start_time


async def _run_cli(argv: Sequence[str]) -> _Completed:
    """Run a short management command of the runtime (inspect, ps, rm...), output captured."""
    with trio.move_on_after(_CLI_DEADLINE) as scope:
        try:
            result = await trio.run_process(
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                # Ctrl-C reaches rulework, which cancels and cleans up; a client killed by the
                # terminal's SIGINT under our feet would only muddle that.
                start_new_session=True,
            )
        except OSError as exc:
            raise ExecutorError(f"Could not run `{' '.join(argv[:3])}`: {exc}") from exc
        return _Completed(result.returncode, result.stdout, result.stderr)
    assert scope.cancelled_caught
    raise ExecutorError(
        f"`{' '.join(argv[:4])} ...` did not finish within {_CLI_DEADLINE:.0f}s: the container "
        "runtime's daemon seems wedged. Check it (`docker info` / `podman info`)."
    )


async def _run_streaming(
    argv: Sequence[str],
    stdout: bytearray,
    stderr: bytearray,
    stop: Callable[[], Awaitable[None]],
) -> int:
    """Run the runtime client that runs a Process, collecting its output as it comes.

    When cancelled (Ctrl-C, a MultiGet sibling failed, the Process's timeout), `stop` kills
    the process inside the container (killing the client alone would leave it running), then
    the client is killed; both under a shielded scope with a deadline. What was read so far
    stays in `stdout`/`stderr`.
    """
    try:
        proc = await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Not in the terminal's process group: on Ctrl-C the client must not exit (with
            # a result that could be mistaken for the Process's) before we stop the container.
            start_new_session=True,
        )
    except OSError as exc:
        raise ExecutorError(f"Could not run `{' '.join(argv[:3])}`: {exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, proc.stdout, stdout)
            nursery.start_soon(_drain, proc.stderr, stderr)
            returncode = await proc.wait()
    except BaseException:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _STOP_DEADLINE
            try:
                await stop()
            except Exception as exc:  # the original cancellation or error matters more
                logger.warning("Stopping a container after cancellation failed: %s", exc)
            finally:
                proc.kill()
                await proc.wait()
        raise
    finally:
        with trio.CancelScope(shield=True):
            await proc.stdout.aclose()
            await proc.stderr.aclose()
    return returncode


async def _drain(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    async for chunk in stream:
        into += chunk


__all__ = ["ContainerEnvironmentConfig", "ContainerExecutor"]
