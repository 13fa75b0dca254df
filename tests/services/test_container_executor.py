"""The `container` executor against real runtimes: a private dockerd and a private Podman
(see `svc_docker.py`), both running a busybox image imported without any registry.

- `TestContainerExecutorConformance`: the executor conformance suite (the same tests as the
  local and ssh executors), with Docker in both modes ("run": a container per Process,
  "exec": one container per session), the executor made from a config table only.
- What the suite cannot see: no network, no container left behind after cancellation or a
  timeout, image rebuilds invalidating cached results, leftovers of crashed runs, the errors
  for a missing runtime, daemon, image or socket permission. These run with each runtime in
  each mode (`flavour`) where they depend on both; Podman also gets the basics the suite checks.

Where a test must know that the Process has started, the Process says so through a FIFO on a
read-only bind mount: no test waits by sleeping.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from rulework.abc import ProcessExecutor
from rulework.backends.container import (
    LABEL,
    LABEL_OWNER,
    LABEL_SESSION,
    ContainerEnvironmentConfig,
    ContainerExecutor,
    _owner_token,
)
from rulework.backends.memory import MemoryCache
from rulework.engine.cache import open_cache_layer
from rulework.engine.config import config_from_mapping
from rulework.engine.errors import ConfigError, ExecutorError
from rulework.engine.fs import CreateDigest, Digest, FileContent
from rulework.engine.process import Process, ProcessRunner
from rulework.engine.registry import create_executors
from rulework.engine.store import FileBlobStore, Store
from rulework.testing import _executor_suite
from rulework.testing._executor_suite import ProcessExecutorSuite

from .svc_docker import BusyboxImage, DockerDaemon, PodmanRuntime, import_busybox_image

OpenExecutor = Callable[..., Awaitable[ContainerExecutor]]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FileBlobStore(tmp_path / "cas"))


Runtime = DockerDaemon | PodmanRuntime


@dataclass(frozen=True)
class Flavour:
    """A runtime and a mode to run a test with; `runtime` drives it directly."""

    runtime_name: str
    mode: str
    runtime: Runtime
    image: BusyboxImage


def _flavour(request: pytest.FixtureRequest) -> Flavour:
    runtime_name, mode = str(request.param).split("-")
    if runtime_name == "docker":
        runtime = request.getfixturevalue("docker_daemon")
        image = request.getfixturevalue("busybox_image")
    else:
        runtime = request.getfixturevalue("podman_runtime")
        image = request.getfixturevalue("podman_busybox_image")
    return Flavour(runtime_name, mode, runtime, image)


@pytest.fixture(params=["docker-run", "docker-exec", "podman-run", "podman-exec"])
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """Each runtime in each mode: for the behaviour every combination must get right."""
    return _flavour(request)


@pytest.fixture(params=["podman-run", "podman-exec"])
def podman_flavour(request: pytest.FixtureRequest) -> Flavour:
    """Podman in each mode: for what the conformance suite (run with Docker) already covers."""
    return _flavour(request)


@pytest.fixture(params=["docker-run", "podman-run"])
def runtime_flavour(request: pytest.FixtureRequest) -> Flavour:
    """Each runtime (in mode "run"): for what the mode does not change."""
    return _flavour(request)


@pytest.fixture(params=["docker-run", "docker-exec"])
def docker_flavour(request: pytest.FixtureRequest) -> Flavour:
    """Docker in each mode: for the executor's own logic, which does not vary by runtime."""
    return _flavour(request)


@pytest.fixture
async def open_executor(
    request: pytest.FixtureRequest, store: Store
) -> AsyncIterator[OpenExecutor]:
    """Opens container executors on the test image (Docker unless `flavour` says otherwise);
    all are closed (their containers removed) after the test."""
    opened: list[ContainerExecutor] = []

    async def open_(flavour: Flavour | str = "run", **settings: Any) -> ContainerExecutor:
        if isinstance(flavour, str):  # a mode, with Docker
            settings["mode"] = flavour
            settings.setdefault("image", request.getfixturevalue("busybox_image").tag)
        else:
            settings["mode"] = flavour.mode
            settings["runtime"] = flavour.runtime_name
            settings.setdefault("image", flavour.image.tag)
        executor = ContainerExecutor("box", ContainerEnvironmentConfig(**settings))
        opened.append(executor)
        await executor.open(store)
        return executor

    yield open_
    for executor in opened:
        await executor.aclose()


class Signals:
    """Lines that Processes write to `/signal/started`, a FIFO on a read-only mount.

    The host holds the FIFO open for reading and writing, so writers never block and lines
    from several writers are never lost between two reads.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.mount = f"{directory}:/signal"
        os.mkfifo(directory / "started")
        fd = os.open(directory / "started", os.O_RDWR | os.O_NONBLOCK)
        self._stream = trio.lowlevel.FdStream(fd)
        self._buffer = b""

    async def next_line(self) -> bytes:
        while b"\n" not in self._buffer:
            self._buffer += await self._stream.receive_some()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def lines_so_far(self) -> list[bytes]:
        """The complete lines written so far, without waiting."""
        while True:
            try:
                chunk = os.read(self._stream.fileno(), 65536)
            except BlockingIOError:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return lines

    async def aclose(self) -> None:
        await self._stream.aclose()


@pytest.fixture
async def signals(tmp_path: Path) -> AsyncIterator[Signals]:
    directory = tmp_path / "signal"
    directory.mkdir()
    signals = Signals(directory)
    yield signals
    await signals.aclose()


async def file_contents(store: Store, digest: Digest) -> dict[str, bytes]:
    return {entry.path: entry.content for entry in await store.contents(digest)}


# -- protocol and config -----------------------------------------------------------------------


def test_is_a_process_executor() -> None:
    executor = ContainerExecutor("box", ContainerEnvironmentConfig(image="x", parallelism=3))
    assert isinstance(executor, ProcessExecutor)
    assert executor.name == "box"
    assert executor.parallelism == 3
    assert ContainerExecutor.config_type is ContainerEnvironmentConfig


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"image": ""}, "image"),
        ({"image": "x", "runtime": "lxc"}, "runtime"),
        ({"image": "x", "parallelism": 0}, "parallelism"),
        ({"image": "x", "mode": "spawn"}, "mode"),
        ({"image": "x", "mounts": ("/data",)}, "mounts[0]"),
        ({"image": "x", "mounts": ("relative:/data",)}, "mounts[0]"),
        ({"image": "x", "mounts": ("/a:/b", "/data:/sandbox/x")}, "mounts[1]"),
        ({"image": "x", "platform": "amd64"}, "platform"),
    ],
)
def test_invalid_settings_name_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        ContainerEnvironmentConfig(**settings)


def test_settings_come_from_the_config_file_table() -> None:
    table = {
        "kind": "container",
        "runtime": "podman",
        "image": "localhost/py311:latest",
        "parallelism": 3,
        "platform": "linux/amd64",
        "mounts": ["/opt/tools:/opt/tools"],
        "user": "1000:1000",
        "network": "none",
        "extra_args": ["--memory", "2g"],
        "mode": "exec",
        "sandbox_dir": "/var/tmp/rw",
        "selinux_label": True,
    }
    config = config_from_mapping({"environments": {"py311": table}})
    assert config.environments["py311"].settings == ContainerEnvironmentConfig(
        image="localhost/py311:latest",
        runtime="podman",
        parallelism=3,
        platform="linux/amd64",
        mounts=("/opt/tools:/opt/tools",),
        user="1000:1000",
        network="none",
        extra_args=("--memory", "2g"),
        mode="exec",
        sandbox_dir="/var/tmp/rw",
        selinux_label=True,
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"mode": "spawn", "ulimit": 1},
            ["'spawn' @ environments.py311.mode", "unknown key; allowed: extra_args"],
        ),
        (
            {"mounts": ["/a"], "parallelism": 0},
            ["parallelism: expected an integer >= 1, found 0", "mounts[0]: expected 'HOST_PATH"],
        ),
    ],
)
def test_bad_settings_in_the_config_file_name_the_environment_and_key(
    table: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(
            {"environments": {"py311": {"kind": "container", "image": "x", **table}}}
        )
    for text in expected:
        assert text in str(caught.value)


# -- running processes -------------------------------------------------------------------------


async def test_outputs_exit_code_and_streams(
    open_executor: OpenExecutor, store: Store, podman_flavour: Flavour
) -> None:
    executor = await open_executor(podman_flavour)
    inputs = await store.create_digest(
        CreateDigest(
            [
                FileContent("src/in.txt", b"hello\n"),
                FileContent("tool.sh", b"#!/bin/sh\necho tool\n", is_executable=True),
            ]
        )
    )
    script = (
        "cat src/in.txt; ./tool.sh; echo oops >&2; "
        "mkdir -p out/deep && echo a > out/deep/a.txt && echo r > result.txt && echo x > undeclared; "
        "exit 3"
    )
    result = await executor.execute(
        Process(
            ("sh", "-c", script),
            input_digest=inputs,
            output_files=("result.txt", "missing.txt"),
            output_directories=("out",),
        ),
        store,
    )
    assert result.exit_code == 3
    assert not result.timed_out
    assert result.stdout == b"hello\ntool\n"
    assert result.stderr == b"oops\n"
    assert await file_contents(store, result.output_digest) == {
        "out/deep/a.txt": b"a\n",
        "result.txt": b"r\n",
    }
    assert result.duration_seconds > 0


async def test_exit_code_125_of_the_program_is_not_a_runtime_failure(
    open_executor: OpenExecutor, store: Store, docker_flavour: Flavour
) -> None:
    executor = await open_executor(docker_flavour)
    result = await executor.execute(Process(("sh", "-c", "echo mine >&2; exit 125")), store)
    assert (result.exit_code, result.stderr) == (125, b"mine\n")


async def test_env_is_exactly_the_process_env(
    open_executor: OpenExecutor,
    store: Store,
    podman_flavour: Flavour,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RULEWORK_HOST_SECRET", "leaked")
    executor = await open_executor(podman_flavour)
    env = {
        "PLAIN": "1",
        "SPACES": "a b  c",
        "MULTI": "line1\nline2",
        "EQUALS": "k=v",
        "EMPTY": "",
        "TERM": "dumb",  # podman defines TERM itself: the Process's value must win
    }
    # `env -0` prints exactly the environment argv received, NUL-separated.
    result = await executor.execute(Process(("env", "-0"), env=env), store)
    assert result.exit_code == 0, result.stderr
    seen = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if item)
    assert {k: v for k, v in seen.items() if k in env} == env
    # Nothing of the host's environment; only what the runtime itself always defines.
    assert set(seen) - set(env) <= {"HOSTNAME", "HOME", "PATH"}
    assert "RULEWORK_HOST_SECRET" not in seen


async def test_program_not_found_is_an_executor_error(
    open_executor: OpenExecutor, store: Store, podman_flavour: Flavour
) -> None:
    executor = await open_executor(podman_flavour)
    with pytest.raises(ExecutorError, match=r"'no-such-program'.*executable not found"):
        await executor.execute(Process(("no-such-program", "x")), store)


async def test_a_file_that_is_not_executable_is_an_executor_error(
    open_executor: OpenExecutor, store: Store, docker_flavour: Flavour
) -> None:
    executor = await open_executor(docker_flavour)
    inputs = await store.create_digest(CreateDigest([FileContent("tool.sh", b"echo hi\n")]))
    with pytest.raises(ExecutorError, match=r"Cannot run './tool.sh'.*not executable"):
        await executor.execute(Process(("./tool.sh",), input_digest=inputs), store)


async def test_network_none_has_only_loopback(
    open_executor: OpenExecutor, store: Store, flavour: Flavour
) -> None:
    executor = await open_executor(flavour)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with listener:
        result = await executor.execute(
            Process(
                (
                    "sh",
                    "-c",
                    f"cat /proc/net/dev; nc -w 2 127.0.0.1 {port} </dev/null && echo CONNECTED",
                )
            ),
            store,
        )
    interfaces = {
        line.split(":")[0].strip() for line in result.stdout.decode().splitlines() if ":" in line
    }
    assert interfaces == {"lo"}
    # The host's 127.0.0.1 listener is not reachable: the container's loopback is its own.
    assert b"CONNECTED" not in result.stdout


async def test_user_setting_runs_as_that_user_and_can_write_outputs(
    open_executor: OpenExecutor, store: Store, docker_flavour: Flavour
) -> None:
    executor = await open_executor(docker_flavour, user="65534:65534")
    inputs = await store.create_digest(CreateDigest([FileContent("sub/in.txt", b"i")]))
    result = await executor.execute(
        Process(
            ("sh", "-c", "id -u; cat sub/in.txt > sub/copy.txt"),
            input_digest=inputs,
            output_files=("sub/copy.txt",),
        ),
        store,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"65534\n"
    assert await file_contents(store, result.output_digest) == {"sub/copy.txt": b"i"}


async def test_mounts_are_read_only(
    open_executor: OpenExecutor, store: Store, docker_flavour: Flavour, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "tool.txt").write_text("from host\n")
    # `selinux_label` only adds `z` to the mounts: harmless where SELinux is off, as here.
    executor = await open_executor(
        docker_flavour, mounts=(f"{shared}:/opt/shared",), selinux_label=True
    )
    result = await executor.execute(
        Process(("sh", "-c", "cat /opt/shared/tool.txt; echo x > /opt/shared/new || echo DENIED")),
        store,
    )
    assert result.stdout == b"from host\nDENIED\n"
    assert not (shared / "new").exists()


# -- timeouts, cancellation and clean-up -------------------------------------------------------


async def test_timeout_kills_the_process(
    open_executor: OpenExecutor,
    store: Store,
    podman_flavour: Flavour,
    signals: Signals,
) -> None:
    executor = await open_executor(podman_flavour, mounts=(signals.mount,))
    result = await executor.execute(
        Process(
            ("sh", "-c", "echo partial; echo started > /signal/started; exec sleep 600"),
            timeout_seconds=2,
        ),
        store,
    )
    assert result.timed_out
    assert result.exit_code < 0
    if signals.lines_so_far() == [b"started"]:  # else the container was slower than 2 s
        # What the process wrote before it was killed is kept.
        assert result.stdout == b"partial\n"
    await assert_nothing_running(executor, podman_flavour.runtime)


async def assert_nothing_running(executor: ContainerExecutor, runtime: Runtime) -> None:
    """No container of the session still runs a Process (in exec mode, its container idles)."""
    containers = runtime.containers(f"{LABEL_SESSION}={executor.session_id}")
    if executor.config.mode == "run":
        assert containers == []
    else:
        assert len(containers) <= 1
        for container in containers:
            processes = runtime.cli("exec", container, "ps", "-o", "args")
            assert "sleep 600" not in processes, processes


async def test_cancellation_leaves_no_container_behind(
    open_executor: OpenExecutor,
    store: Store,
    flavour: Flavour,
    signals: Signals,
) -> None:
    executor = await open_executor(flavour, mounts=(signals.mount,))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            executor.execute,
            Process(("sh", "-c", "echo started > /signal/started; sleep 600 & sleep 600; wait")),
            store,
        )
        assert await signals.next_line() == b"started"
        assert flavour.runtime.containers(f"{LABEL_SESSION}={executor.session_id}")
        nursery.cancel_scope.cancel()
    await assert_nothing_running(executor, flavour.runtime)
    await executor.aclose()
    assert flavour.runtime.containers(f"{LABEL_SESSION}={executor.session_id}") == []


async def test_aclose_removes_containers_even_when_cancelled(
    open_executor: OpenExecutor, store: Store, docker_daemon: DockerDaemon
) -> None:
    executor = await open_executor("exec")
    await executor.execute(Process(("true",)), store)
    assert len(docker_daemon.containers(f"{LABEL_SESSION}={executor.session_id}")) == 1
    with trio.CancelScope() as scope:
        scope.cancel()  # as after Ctrl-C: aclose runs in an already-cancelled scope
        await executor.aclose()
    assert docker_daemon.containers(f"{LABEL_SESSION}={executor.session_id}") == []
    with pytest.raises(ExecutorError, match="already closed"):
        await executor.execute(Process(("true",)), store)


async def test_exec_mode_replaces_a_container_removed_behind_its_back(
    open_executor: OpenExecutor, store: Store, docker_daemon: DockerDaemon
) -> None:
    executor = await open_executor("exec")
    await executor.execute(Process(("true",)), store)
    [first] = docker_daemon.containers(f"{LABEL_SESSION}={executor.session_id}")
    docker_daemon.cli("rm", "--force", first)
    result = await executor.execute(Process(("echo", "again")), store)
    assert (result.exit_code, result.stdout) == (0, b"again\n")
    [second] = docker_daemon.containers(f"{LABEL_SESSION}={executor.session_id}")
    assert second != first


async def test_open_removes_leftovers_of_dead_runs_only(
    open_executor: OpenExecutor, docker_daemon: DockerDaemon, busybox_image: BusyboxImage
) -> None:
    finished = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
    await finished.wait()  # its pid now names no process: the owner of a crashed run
    host = socket.gethostname()
    dead_owner = f"{host}:{finished.pid}:1"

    def create(owner: str) -> str:
        return docker_daemon.cli(
            "create",
            f"--label={LABEL}=1",
            f"--label={LABEL_SESSION}=old",
            f"--label={LABEL_OWNER}={owner}",
            busybox_image.tag,
            "true",
        ).strip()

    orphan = create(dead_owner)
    alive = create(_owner_token(os.getpid()))  # another session of a process still running
    elsewhere = create(f"other-host-{host}:1:1")  # not ours to judge
    try:
        await open_executor()
        remaining = set(docker_daemon.containers(f"{LABEL_SESSION}=old"))
        assert orphan[:12] not in {c[:12] for c in remaining}
        assert {alive[:12], elsewhere[:12]} <= {c[:12] for c in remaining}
    finally:
        docker_daemon.cli("rm", "--force", orphan, alive, elsewhere, check=False)


# -- identity and images -----------------------------------------------------------------------


async def test_identity_names_the_image_content(
    open_executor: OpenExecutor, busybox_image: BusyboxImage
) -> None:
    executor = await open_executor(network="none")
    identity = await executor.identity()
    assert identity.startswith("container:")
    details = json.loads(identity.removeprefix("container:"))
    assert details["image_id"] == busybox_image.id
    assert details["platform"].startswith("linux/")
    assert details["network"] == "none"
    # Settings that change results change the identity; the mode does not.
    other_user = await open_executor(user="65534")
    exec_mode = await open_executor("exec")
    assert await other_user.identity() != identity
    assert await exec_mode.identity() == identity


async def test_rebuilding_the_image_changes_identity(
    open_executor: OpenExecutor, store: Store, runtime_flavour: Flavour
) -> None:
    tag = "localhost/rulework-test/rebuilt:latest"
    import_busybox_image(runtime_flavour.runtime, tag, {"etc/version": b"1\n"})
    before = await open_executor(runtime_flavour, image=tag)
    rebuilt = import_busybox_image(runtime_flavour.runtime, tag, {"etc/version": b"2\n"})
    after = await open_executor(runtime_flavour, image=tag)
    assert await before.identity() != await after.identity()
    assert rebuilt.id in await after.identity()
    # A session keeps the image it resolved at open: a rebuild mid-session mixes nothing.
    old = await before.execute(Process(("cat", "/etc/version")), store)
    new = await after.execute(Process(("cat", "/etc/version")), store)
    assert (old.stdout, new.stdout) == (b"1\n", b"2\n")


async def test_rebuilding_the_image_invalidates_cached_results(
    docker_daemon: DockerDaemon,
) -> None:
    """End to end through the process cache: a hit while the image is unchanged, a fresh run
    (with the new image's output) once it was rebuilt under the same tag."""
    tag = "localhost/rulework-test/cached:latest"
    import_busybox_image(docker_daemon, tag, {"etc/version": b"1\n"})
    process = Process(("cat", "/etc/version"))
    local = MemoryCache()
    async with open_cache_layer(local, None) as layer:
        store = Store(layer.local_blobs)

        async def run_in_a_new_session() -> tuple[str, bytes]:
            executor = ContainerExecutor("box", ContainerEnvironmentConfig(image=tag))
            async with ProcessRunner({"box": executor}, "box", store, layer) as runner:
                result = await runner.run(process)
            return result.metadata.source, result.stdout

        assert await run_in_a_new_session() == ("ran", b"1\n")
        assert await run_in_a_new_session() == ("local_cache", b"1\n")
        import_busybox_image(docker_daemon, tag, {"etc/version": b"2\n"})
        assert await run_in_a_new_session() == ("ran", b"2\n")
        assert await run_in_a_new_session() == ("local_cache", b"2\n")
    await local.aclose()


async def test_platform_mismatch_is_an_executor_error(
    docker_daemon: DockerDaemon, busybox_image: BusyboxImage, store: Store
) -> None:
    executor = ContainerExecutor(
        "box", ContainerEnvironmentConfig(image=busybox_image.tag, platform="linux/s390x")
    )
    with pytest.raises(
        ExecutorError, match=r"is for linux/\w+, but the environment asks for platform linux/s390x"
    ):
        await executor.open(store)
    await executor.aclose()


# -- infrastructure errors ---------------------------------------------------------------------


async def test_missing_runtime_binary(
    store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    executor = ContainerExecutor("box", ContainerEnvironmentConfig(image="x", runtime="podman"))
    with pytest.raises(ExecutorError, match=r"'podman' was not found on PATH\. Install Podman"):
        await executor.open(store)


async def test_missing_image_says_how_to_get_it(docker_daemon: DockerDaemon, store: Store) -> None:
    executor = ContainerExecutor("box", ContainerEnvironmentConfig(image="rulework-test/absent:1"))
    with pytest.raises(ExecutorError) as caught:
        await executor.open(store)
    message = str(caught.value)
    assert "not present locally" in message
    assert "docker pull rulework-test/absent:1" in message
    assert "docker build -t rulework-test/absent:1" in message


async def test_unreachable_daemon(
    docker_daemon: DockerDaemon, store: Store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    socket_path = tmp_path / "nothing-listens.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_path}")
    executor = ContainerExecutor("box", ContainerEnvironmentConfig(image="any"))
    with pytest.raises(ExecutorError, match=f"daemon is not reachable at unix://{socket_path}"):
        await executor.open(store)


async def test_permission_denied_on_the_socket(
    docker_daemon: DockerDaemon,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # A `docker` that runs the real client as `nobody`, who may not use the root-owned socket.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    config_dir = tmp_path / "docker-config"
    config_dir.mkdir(mode=0o777)
    wrapper = bin_dir / "docker"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"DOCKER_CONFIG={config_dir} exec setpriv --reuid=65534 --regid=65534 --clear-groups "
        f'{docker_daemon.docker} "$@"\n'
    )
    wrapper.chmod(0o755)
    socket_path = Path(docker_daemon.host.removeprefix("unix://"))
    assert stat.S_IMODE(os.stat(socket_path).st_mode) & 0o007 == 0
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    executor = ContainerExecutor("box", ContainerEnvironmentConfig(image="any"))
    with pytest.raises(ExecutorError, match=r"may not use the docker socket.*usermod -aG docker"):
        await executor.open(store)


# -- the executor conformance suite ------------------------------------------------------------


class TestContainerExecutorConformance(ProcessExecutorSuite):
    """The same Processes and checks as the local executor's, run in containers.

    The executor is made the way an Engine makes it: from a configuration table, through the
    `rulework.executors` registry, so only the config says "container".
    """

    # What Docker and Podman define in every container (the image's ENV would add more).
    allowed_extra_env = frozenset({"HOSTNAME", "HOME", "PATH"})
    # Set by the `executor` fixture, for `pid_is_running`.
    runtime: Runtime
    session_id: str

    @pytest.fixture(params=["docker-run", "docker-exec"])
    def suite_flavour(self, request: pytest.FixtureRequest) -> Flavour:
        return _flavour(request)

    @pytest.fixture
    async def executor(
        self,
        request: pytest.FixtureRequest,
        store: Store,
        suite_flavour: Flavour,
        probe_dir: Path,
    ) -> AsyncIterator[ProcessExecutor]:
        config = config_from_mapping(
            {
                "execution": {"default_environment": "box"},
                "environments": {
                    "box": {
                        "kind": "container",
                        "runtime": suite_flavour.runtime_name,
                        "image": suite_flavour.image.tag,
                        "mode": suite_flavour.mode,
                        "parallelism": 4,
                        # The suite's probe directory, writable at the same path inside.
                        "extra_args": [f"--volume={probe_dir}:{probe_dir}"],
                    }
                },
            }
        )
        executor = create_executors(config.environments)["box"]
        assert isinstance(executor, ContainerExecutor)
        await executor.open(store)
        # For `pid_is_running` (pytest-trio does not bind async fixtures to the test instance).
        request.instance.runtime = suite_flavour.runtime
        request.instance.session_id = executor.session_id
        yield executor
        await executor.aclose()

    async def pid_is_running(self, pid: int) -> bool:
        """Whether a container of the session runs `pid` (pids are per container)."""

        def check() -> bool:
            running = self.runtime.cli(
                "ps", "--quiet", f"--filter=label={LABEL_SESSION}={self.session_id}"
            ).split()
            for container in running:
                stat = self.runtime.cli("exec", container, "cat", f"/proc/{pid}/stat", check=False)
                if stat and stat.rpartition(")")[2].split()[0] != "Z":
                    return True
            return False

        return await trio.to_thread.run_sync(check)

    async def test_parallelism_bound_is_respected(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        # The suite times processes with `date +%s%N`; busybox's `date` has no %N and its shell
        # always runs its own applet, so read the same clock through `adjtimex` instead. The
        # test itself is the suite's.
        make_process = _executor_suite._sh

        def with_busybox_clock(script: str, *args: str, **options: Any) -> Process:
            return make_process(
                script.replace("date +%s%N", _BUSYBOX_NANOSECONDS), *args, **options
            )

        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(_executor_suite, "_sh", with_busybox_clock)
            await super().test_parallelism_bound_is_respected(executor, store)


_BUSYBOX_NANOSECONDS = (
    "adjtimex | awk '/tv_sec/ {s = $2} /tv_usec/ {u = $2} END {printf \"%d%06d000\\n\", s, u}'"
)
