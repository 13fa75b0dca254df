"""Private container runtimes for the tests (Docker, Podman) and a busybox image built without
any registry.

`docker_daemon` starts its own `dockerd` (Debian's `docker.io`, installed by
`.ci/setup.d/docker.sh`) with every piece of state under one temporary directory and no
networking set-up on the host (no bridge, no iptables), points `DOCKER_HOST` at it for the
session, and stops it by PID at the end. `busybox_image` is a rootfs made of Debian's static
busybox, imported with `docker import`; `import_busybox_image` "rebuilds" an image under a tag
(the same rootfs plus a changed file), which gives it a new content ID.

`podman_runtime` gives Podman (daemonless) its own storage and run directories through
`CONTAINERS_STORAGE_CONF`, and a `containers.conf` in `CONTAINERS_CONF` that selects `runc`
(this kernel's hybrid cgroup set-up defeats `crun`), caps ulimits at what the kernel allows
(`nofile=20000`, `nproc=32768`) and keeps events and temporary files under its directory.

Locally a missing runtime or busybox skips the tests that need them; under `CI=true` it fails.
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import signal
import struct
import subprocess
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._common import unavailable

BUSYBOX = Path("/bin/busybox")
TEST_IMAGE = "localhost/rulework-test/busybox:latest"
# Safety nets only: dockerd answers in well under a second here.
_START_DEADLINE = 60.0
_STOP_DEADLINE = 30.0


@dataclass(frozen=True, slots=True)
class DockerDaemon:
    """A running private dockerd: `host` is its `DOCKER_HOST` URL."""

    host: str
    root: Path
    process: subprocess.Popen[bytes] | None
    storage_driver: str
    docker: str

    def cli(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """Run the docker client against this daemon and return its stdout."""
        result = subprocess.run(
            [self.docker, *args],
            input=input,
            capture_output=True,
            env={**os.environ, "DOCKER_HOST": self.host},
            timeout=_START_DEADLINE,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"`docker {' '.join(args)}` failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode()

    def containers(self, label: str) -> list[str]:
        """IDs of all containers (running or not) carrying `label` (`key` or `key=value`)."""
        return self.cli("ps", "--all", "--quiet", f"--filter=label={label}").split()


@dataclass(frozen=True, slots=True)
class BusyboxImage:
    """An image imported into the private daemon."""

    tag: str
    id: str


def _is_static_elf(path: Path) -> bool:
    """True when `path` is an ELF executable without a program interpreter (statically linked)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit ELF only
            return False
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        for index in range(phnum):
            f.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack("<I", f.read(4))
            if p_type == 3:  # PT_INTERP
                return False
    return True


def start_dockerd(dockerd: str, docker: str, root: Path, driver: str) -> DockerDaemon | str:
    """Start dockerd with `driver`; the daemon once `docker info` answers, else its log tail."""
    root.mkdir(parents=True, exist_ok=True)
    host = f"unix://{root}/docker.sock"
    log_path = root / f"dockerd-{driver}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                dockerd,
                f"--data-root={root}/data",
                f"--exec-root={root}/exec",
                f"--pidfile={root}/dockerd.pid",
                f"--host={host}",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
                "--bridge=none",
                f"--storage-driver={driver}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest must not hit the daemon mid-teardown
            preexec_fn=_terminate_with_parent,
        )
    env = {**os.environ, "DOCKER_HOST": host}
    deadline = time.monotonic() + _START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return log_path.read_text(errors="replace")[-3000:]
        probe = subprocess.run(
            [docker, "info", "--format", "{{.Driver}}"], env=env, capture_output=True, check=False
        )
        if probe.returncode == 0:
            return DockerDaemon(host, root, proc, probe.stdout.decode().strip(), docker)
        # A readiness probe of a daemon we cannot be notified by: poll, bounded by the deadline.
        time.sleep(0.05)
    stop_dockerd(proc)
    return (
        f"dockerd did not answer within {_START_DEADLINE}s:\n"
        + log_path.read_text(errors="replace")[-3000:]
    )


def _terminate_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (even by SIGKILL), so a
    crashed test run leaves no daemon behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_dockerd(process: subprocess.Popen[bytes]) -> None:
    """Stop dockerd by its PID: SIGTERM (it stops its containerd too), SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DockerDaemon]:
    """A private dockerd for this test session; `DOCKER_HOST` points at it meanwhile."""
    dockerd, docker = shutil.which("dockerd"), shutil.which("docker")
    if dockerd is None or docker is None:
        unavailable("dockerd/docker not installed (run .ci/setup.d/docker.sh)")
    assert dockerd is not None and docker is not None
    if os.geteuid() != 0:
        unavailable("starting a private dockerd needs root")
    root = Path(tempfile.mkdtemp(prefix="rw-dockerd-"))
    try:
        started = start_dockerd(dockerd, docker, root, "overlay2")
        if isinstance(started, str):
            # Some kernels (or an overlayfs /tmp) refuse overlay2: fall back to the slow but
            # universal vfs driver, and say so, since it changes what the timings mean.
            warnings.warn(
                "dockerd could not start with the overlay2 storage driver on this kernel; "
                f"falling back to vfs. dockerd said:\n{started[-1500:]}",
                stacklevel=1,
            )
            shutil.rmtree(root / "data", ignore_errors=True)
            started = start_dockerd(dockerd, docker, root, "vfs")
        if isinstance(started, str):
            raise RuntimeError(f"could not start dockerd:\n{started}")
        previous = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = started.host
        try:
            yield started
        finally:
            if previous is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = previous
            leftovers = started.cli("ps", "--all", "--quiet", check=False).split()
            if leftovers:
                started.cli("rm", "--force", *leftovers, check=False)
            assert started.process is not None
            stop_dockerd(started.process)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class PodmanRuntime:
    """Podman with private storage: `env` holds the variables that select it."""

    root: Path
    podman: str
    env: Mapping[str, str]

    def cli(self, *args: str, input: bytes | None = None, check: bool = True) -> str:
        """Run podman with this runtime's configuration and return its stdout."""
        result = subprocess.run(
            [self.podman, *args],
            input=input,
            capture_output=True,
            env={**os.environ, **self.env},
            timeout=_START_DEADLINE,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"`podman {' '.join(args)}` failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode()

    def containers(self, label: str) -> list[str]:
        """IDs of all containers (running or not) carrying `label` (`key` or `key=value`)."""
        return self.cli("ps", "--all", "--quiet", f"--filter=label={label}").split()


def _write_podman_config(root: Path, driver: str) -> dict[str, str]:
    (root / "containers.conf").write_text(
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        'init_path = "/usr/bin/catatonit"\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{root}/events.log"\n'
        # Not `static_dir`: moving podman's database there makes every `run` wait 20 s for
        # conmon on this version (4.3).
        f'tmp_dir = "{root}/tmp"\n'
        "[network]\n"
        f'network_config_dir = "{root}/net"\n'
    )
    (root / "storage.conf").write_text(
        f'[storage]\ndriver = "{driver}"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n'
    )
    return {
        "CONTAINERS_CONF": str(root / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
    }


def _unmount_below(root: Path) -> None:
    """Unmount what podman left mounted below `root` (its storage), deepest first."""
    with open("/proc/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(f"{root}/")), reverse=True):
        subprocess.run(["umount", point], capture_output=True, check=False)


@pytest.fixture(scope="session")
def podman_runtime() -> Iterator[PodmanRuntime]:
    """Podman with private storage; `CONTAINERS_CONF`/`CONTAINERS_STORAGE_CONF` are set for the
    session (a ContainerExecutor with `runtime = "podman"` picks them up)."""
    podman = shutil.which("podman")
    if podman is None or shutil.which("runc") is None:
        unavailable("podman/runc not installed (run .ci/setup.d/docker.sh)")
    assert podman is not None
    if os.geteuid() != 0:
        unavailable("the podman tests use rootful podman and need root")
    root = Path(tempfile.mkdtemp(prefix="rw-podman-"))
    previous = {
        name: os.environ.get(name) for name in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")
    }
    try:
        runtime = PodmanRuntime(root, podman, _write_podman_config(root, "overlay"))
        probe = subprocess.run(
            [podman, "info", "--format", "{{.Store.GraphDriverName}}"],
            env={**os.environ, **runtime.env},
            capture_output=True,
            check=False,
        )
        if probe.returncode != 0:
            warnings.warn(
                "podman could not use the overlay storage driver on this kernel; falling back "
                f"to vfs. podman said:\n{probe.stderr.decode(errors='replace')[-1500:]}",
                stacklevel=1,
            )
            runtime = PodmanRuntime(root, podman, _write_podman_config(root, "vfs"))
            runtime.cli("info")
        os.environ.update(runtime.env)
        try:
            yield runtime
        finally:
            leftovers = runtime.cli("ps", "--all", "--quiet", check=False).split()
            if leftovers:
                runtime.cli("rm", "--force", *leftovers, check=False)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _unmount_below(root)
        shutil.rmtree(root, ignore_errors=True)


def _busybox_rootfs_tar(extra_files: Mapping[str, bytes]) -> bytes:
    """A tar of a minimal rootfs: static busybox with its applets, /sandbox, /tmp, /etc/passwd."""
    applets = (
        subprocess.run([str(BUSYBOX), "--list"], capture_output=True, check=True)
        .stdout.decode()
        .split()
    )
    buffer = io.BytesIO()

    def add(name: str, *, data: bytes | None = None, mode: int = 0o755, link: str = "") -> None:
        info = tarfile.TarInfo(name)
        info.mode = mode
        info.mtime = 0
        if link:
            info.type, info.linkname = tarfile.SYMTYPE, link
            tar.addfile(info)
        elif data is None:
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for directory in ("bin", "etc", "root", "sandbox"):
            add(directory)
        add("tmp", mode=0o1777)
        add("bin/busybox", data=BUSYBOX.read_bytes())
        for applet in applets:
            if applet != "busybox":
                add(f"bin/{applet}", link="busybox")
        add(
            "etc/passwd",
            data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            mode=0o644,
        )
        add("etc/group", data=b"root:x:0:\nnogroup:x:65534:\n", mode=0o644)
        for name, data in extra_files.items():
            add(name, data=data, mode=0o644)
    return buffer.getvalue()


def import_busybox_image(
    runtime: DockerDaemon | PodmanRuntime, tag: str, extra_files: Mapping[str, bytes] | None = None
) -> BusyboxImage:
    """Import the busybox rootfs (plus `extra_files`) as `tag`; a different file set gives a
    different image ID, which is how tests "rebuild" an image."""
    _require_static_busybox()
    tar = _busybox_rootfs_tar(extra_files or {})
    image_id = runtime.cli("import", "-", tag, input=tar).strip().splitlines()[-1]
    if not image_id.startswith("sha256:"):
        image_id = f"sha256:{image_id}"
    return BusyboxImage(tag=tag, id=image_id)


def _require_static_busybox() -> None:
    if not BUSYBOX.exists() or not _is_static_elf(BUSYBOX):
        unavailable(f"{BUSYBOX} from Debian's busybox-static is needed to build the test image")


@pytest.fixture(scope="session")
def busybox_image(docker_daemon: DockerDaemon) -> BusyboxImage:
    """The busybox test image, imported once per session into the private daemon."""
    return import_busybox_image(docker_daemon, TEST_IMAGE)


@pytest.fixture(scope="session")
def podman_busybox_image(podman_runtime: PodmanRuntime) -> BusyboxImage:
    """The busybox test image, imported once per session into the private podman storage."""
    return import_busybox_image(podman_runtime, TEST_IMAGE)
