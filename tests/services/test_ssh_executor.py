"""The `ssh` executor against a real OpenSSH server on 127.0.0.1 (see `svc_sshd.py`).

The server runs on this machine, so a test can see the remote side directly: the remote CAS
and sandboxes under `remote_dir`, and the remote processes by pid. Where a test must know that
a Process has started, the Process writes its pids to a FIFO the test holds open: no test waits
by sleeping.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio

from rulework import (
    CreateDigest,
    Digest,
    DigestContents,
    Engine,
    FileContent,
    Get,
    ProcessResult,
    QueryRule,
    rule,
)
from rulework.abc import ProcessExecutor
from rulework.backends.local import LocalExecutor, LocalExecutorConfig
from rulework.backends.memory import MemoryCache, MemoryCacheConfig
from rulework.backends.ssh import SshConnectionError, SshEnvironmentConfig, SshExecutor
from rulework.engine.cache import open_cache_layer
from rulework.engine.config import load_config
from rulework.engine.errors import ConfigError, ExecutorError, InvalidPathError
from rulework.engine.fs import EMPTY_DIGEST, Directory
from rulework.engine.process import Process, ProcessRunner
from rulework.engine.store import FileBlobStore, Store
from rulework.testing._executor_suite import ProcessExecutorSuite

from . import svc_sshd
from ._common import unavailable
from .svc_sshd import SshServer

# Only a safety net against hangs: nothing waits this long when things work.
SAFETY_TIMEOUT = 30
PATH = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
OpenExecutor = Callable[..., Awaitable[SshExecutor]]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FileBlobStore(tmp_path / "cas"))


@pytest.fixture
def remote_dir() -> Iterator[Path]:
    """A fresh remote_dir for one test (created by the login user on first use)."""
    path = Path(f"/tmp/rw-remote-{secrets.token_hex(6)}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_config(server: SshServer, **settings: Any) -> SshEnvironmentConfig:
    """Settings that reach the test server; `settings` override any of them."""
    defaults: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "identity_file": server.identity_file,
        "known_hosts": server.known_hosts,
        "ssh_config": Path("/dev/null"),
        "parallelism": 8,
    }
    return SshEnvironmentConfig(**{**defaults, **settings})


@pytest.fixture
async def open_executor(
    sshd_server: SshServer, store: Store, remote_dir: Path
) -> AsyncIterator[OpenExecutor]:
    """Opens ssh executors on the test server; all are closed after the test."""
    opened: list[SshExecutor] = []

    async def open_(**settings: Any) -> SshExecutor:
        settings.setdefault("remote_dir", str(remote_dir))
        executor = SshExecutor("builder", make_config(sshd_server, **settings))
        opened.append(executor)
        await executor.open(store)
        return executor

    yield open_
    for executor in opened:
        await executor.aclose()


class Signals:
    """A FIFO that remote Processes write lines to (`$FIFO`), held open by the test.

    Opened for reading and writing, so writers never block and a line is never lost.
    """

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="rw-ssh-signals-", dir="/tmp"))
        self.directory.chmod(0o777)  # the remote login user writes here
        self.fifo = self.directory / "fifo"
        os.mkfifo(self.fifo)
        self.fifo.chmod(0o666)
        self._fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
        self._buffer = b""

    async def line(self) -> str:
        with trio.fail_after(SAFETY_TIMEOUT):
            while b"\n" not in self._buffer:
                await trio.lowlevel.wait_readable(self._fd)
                self._buffer += os.read(self._fd, 4096)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def close(self) -> None:
        trio.lowlevel.notify_closing(self._fd)
        os.close(self._fd)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
async def signals() -> AsyncIterator[Signals]:
    found = Signals()
    yield found
    found.close()


async def wait_gone(pid: int) -> None:
    """Wait until process `pid` has exited (it need not be our child)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(SAFETY_TIMEOUT):
            await trio.lowlevel.wait_readable(fd)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


def jobs_left(remote_dir: Path) -> list[str]:
    return sorted(os.listdir(remote_dir / "jobs"))


# --- the executor conformance suite ----------------------------------------------------------


class TestSshExecutorConformance(ProcessExecutorSuite):
    """The same Processes and checks as the local executor's, run over ssh."""

    @pytest.fixture
    async def executor(
        self, sshd_server: SshServer, store: Store, remote_dir: Path
    ) -> AsyncIterator[ProcessExecutor]:
        executor = SshExecutor(
            "builder",
            make_config(
                sshd_server, parallelism=3, kill_grace_seconds=0.5, remote_dir=str(remote_dir)
            ),
        )
        await executor.open(store)
        yield executor
        await executor.aclose()

    @pytest.fixture
    def probe_dir(self) -> Iterator[Path | None]:
        # The remote login user must reach it: pytest's own temp root is private to root.
        path = Path(tempfile.mkdtemp(prefix="rw-ssh-probe-", dir="/tmp"))
        path.chmod(0o777)
        yield path
        shutil.rmtree(path, ignore_errors=True)


# --- through the engine: the environment is chosen by config only ----------------------------


@dataclass(frozen=True)
class Shout:
    text: str


@dataclass(frozen=True)
class Shouted:
    output: str
    uname: str
    environment: str
    source: str


@rule
async def shout(request: Shout) -> Shouted:
    inputs = await Get(Digest, CreateDigest([FileContent("in.txt", request.text.encode())]))
    result = await Get(
        ProcessResult,
        Process(
            argv=("/bin/sh", "-c", "tr a-z A-Z < in.txt > out.txt; uname -s"),
            description=f"shout {request.text}",
            input_digest=inputs,
            env={"PATH": "/usr/bin:/bin"},
            output_files=("out.txt",),
        ),
    )
    contents = await Get(DigestContents, Digest, result.output_digest)
    return Shouted(
        contents[0].content.decode(),
        result.stdout.decode().strip(),
        result.metadata.environment,
        result.metadata.source,
    )


async def test_the_same_rule_runs_on_ssh_when_the_config_says_so(
    sshd_server: SshServer, remote_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "rulework.toml"
    config.write_text(
        f"""
[cache]
local = "memory"

[execution]
default_environment = "local"

[environments.builder]
kind = "ssh"
host = "{sshd_server.host}"
port = {sshd_server.port}
user = "{sshd_server.user}"
identity_file = "{sshd_server.identity_file}"
known_hosts = "{sshd_server.known_hosts}"
ssh_config = "/dev/null"
remote_dir = "{remote_dir}"
parallelism = 2
"""
    )
    rules = [shout, QueryRule(Shouted, (Shout,))]
    async with Engine(rules, config=config).session() as session:
        on_local = await session.get(Shouted, Shout("hello"))
    config.write_text(config.read_text().replace('= "local"', '= "builder"', 1))
    async with Engine(rules, config=config).session() as session:
        on_ssh = await session.get(Shouted, Shout("hello"))
        again = await session.get(Shouted, Shout("hello"))
    assert on_local == Shouted("HELLO", os.uname().sysname, "local", "ran")
    assert on_ssh == Shouted("HELLO", os.uname().sysname, "builder", "ran")
    assert again == on_ssh  # memoized in the session
    assert jobs_left(remote_dir) == []


# --- running processes ------------------------------------------------------------------------

HOSTILE = (
    "two words",
    "it's",
    'say "hi"',
    "$(touch /tmp/rulework-pwned)",
    "`touch /tmp/rulework-pwned`",
    "a;b && c || d | e > f < g",
    "line\nbreak",
    "tab\there",
    "back\\slash\\\\",
    "$HOME ${PATH} $1 $@ $$ !x",
    "*",
    "~",
    "-n",
    "--",
    "",
    " ",
    "ünïcødé ✓ 日本",
    "'\"'\"'",
    "%s%d%n",
)


async def test_hostile_argv_reaches_the_program_verbatim(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    result = await executor.execute(Process(["printf", "<%s>", *HOSTILE]), store)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.decode() == "".join(f"<{arg}>" for arg in HOSTILE)
    assert not await trio.Path("/tmp/rulework-pwned").exists()


async def test_an_argv_larger_than_one_shell_argument_may_be(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    # Linux caps one argument at 128 KiB, and the wrapper script is one argument.
    args = [f"{i:05d}-" + "x" * 60 for i in range(3000)]
    inputs = await store.create_digest(CreateDigest([FileContent("a.txt", b"A")]))
    process = Process(
        ["/bin/sh", "-c", 'cat a.txt; echo " $#"', "sh", *args],
        input_digest=inputs,
        env={"BIG": "y" * 50_000},
    )
    result = await executor.execute(process, store)
    assert (result.exit_code, result.stdout) == (0, b"A 3000\n"), result.stderr


async def test_hostile_env_values_and_file_names(open_executor: OpenExecutor, store: Store) -> None:
    executor = await open_executor()
    names = ["with space.txt", "quote'd.txt", "-dash.txt", "ünï/cødé.txt", "$(x).txt", "new\nline"]
    inputs = await store.create_digest(
        CreateDigest(FileContent(f"in/{name}", name.encode()) for name in names)
    )
    value = "$(id) `id` 'q' \"dq\" \n;|&"
    process = Process(
        ["/bin/sh", "-c", 'cp -R in out && printf %s "$V"'],
        input_digest=inputs,
        env={**PATH, "V": value},
        output_directories=["out"],
    )
    result = await executor.execute(process, store)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.decode() == value
    contents = {f.path: f.content for f in await store.contents(result.output_digest)}
    assert contents == {f"out/{name}": name.encode() for name in names}


async def test_env_is_exactly_the_process_env(open_executor: OpenExecutor, store: Store) -> None:
    executor = await open_executor()
    result = await executor.execute(
        Process(["/usr/bin/env"], env={"A": "1", "B": "two words"}), store
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(result.stdout.decode().splitlines()) == ["A=1", "B=two words"]
    # Nothing from the login environment (HOME, USER, SSH_CONNECTION...) leaks in.
    result = await executor.execute(Process(["/usr/bin/env"]), store)
    assert result.stdout == b""


async def test_inherit_env_passes_remote_login_variables(
    open_executor: OpenExecutor, store: Store, sshd_server: SshServer
) -> None:
    plain = await open_executor()
    inheriting = await open_executor(inherit_env=("USER", "NOT_SET_ANYWHERE"))
    result = await inheriting.execute(Process(["/usr/bin/env"], env={"A": "1"}), store)
    assert sorted(result.stdout.decode().splitlines()) == ["A=1", f"USER={sshd_server.user}"]
    # The inherited values change what processes see, so they are part of the identity.
    assert await plain.identity() != await inheriting.identity()


async def test_exit_code_stdout_stderr_and_outputs(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    inputs = await store.create_digest(
        CreateDigest(
            [
                FileContent("src/data.txt", b"payload\n"),
                FileContent("tool.sh", b"#!/bin/sh\necho run by tool\n", is_executable=True),
                Directory("empty"),
            ]
        )
    )
    script = (
        "test -d ../empty && test -x ../tool.sh && test ! -x ../src/data.txt || exit 90\n"
        "mkdir -p out/sub && cp ../src/data.txt out/sub/copy.txt && ../tool.sh > result.txt\n"
        "printf 'exec' > run.sh && chmod +x run.sh\n"
        "echo to-stdout; echo to-stderr >&2; exit 7\n"
    )
    process = Process(
        ["/bin/sh", "-c", script],
        input_digest=inputs,
        env=PATH,
        working_directory="work",
        output_files=["result.txt", "run.sh", "never-created.txt"],
        output_directories=["out"],
    )
    result = await executor.execute(process, store)
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"to-stdout\n", b"to-stderr\n")
    assert not result.timed_out
    expected = await store.create_digest(
        CreateDigest(
            [
                FileContent("out/sub/copy.txt", b"payload\n"),
                FileContent("result.txt", b"run by tool\n"),
                FileContent("run.sh", b"exec", is_executable=True),
            ]
        )
    )
    assert result.output_digest == expected


async def test_output_symlinks_follow_the_local_policy(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    inside = Process(
        ["/bin/sh", "-c", "mkdir out && printf t > out/target && ln -s target out/link"],
        env=PATH,
        output_directories=["out"],
    )
    result = await executor.execute(inside, store)
    contents = {f.path: f.content for f in await store.contents(result.output_digest)}
    assert contents == {"out/link": b"t", "out/target": b"t"}
    # A link leaving the sandbox is refused by the store, exactly as for local outputs.
    outside = Process(["/bin/ln", "-s", "/etc/passwd", "leak"], output_files=["leak"])
    with pytest.raises(InvalidPathError, match="outside the root"):
        await executor.execute(outside, store)


async def test_no_declared_outputs_give_the_empty_digest(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    result = await executor.execute(Process(["/bin/sh", "-c", "echo x > f"]), store)
    assert result.output_digest == EMPTY_DIGEST


async def test_sandboxes_are_removed_and_inputs_shipped_once(
    open_executor: OpenExecutor, store: Store, remote_dir: Path
) -> None:
    executor = await open_executor()
    # More files than the wrapper links itself: the sandbox comes from a skeleton archive.
    files = [FileContent(f"d{i % 4}/f{i}.txt", f"file {i}\n".encode()) for i in range(40)]
    inputs = await store.create_digest(CreateDigest(files))
    process = Process(
        ["/bin/sh", "-c", "cat d*/f*.txt | wc -l > count"],
        input_digest=inputs,
        env=PATH,
        output_files=["count"],
    )
    first = await executor.execute(process, store)
    assert first.exit_code == 0, first.stderr
    cas = sorted(os.listdir(remote_dir / "cas"))
    assert len(cas) == 40
    # Input files are hard links to the CAS, so the CAS files are read-only.
    assert all(not os.stat(remote_dir / "cas" / name).st_mode & 0o222 for name in cas)
    second = await executor.execute(process, store)
    assert second.output_digest == first.output_digest
    (count,) = await store.contents(first.output_digest)
    assert count.content.strip() == b"40"
    assert sorted(os.listdir(remote_dir / "cas")) == cas
    assert jobs_left(remote_dir) == []


async def test_a_remote_cas_emptied_behind_its_back_is_refilled(
    open_executor: OpenExecutor, store: Store, remote_dir: Path
) -> None:
    executor = await open_executor()
    inputs = await store.create_digest(CreateDigest([FileContent("a.txt", b"A\n")]))
    process = Process(["/bin/cat", "a.txt"], input_digest=inputs)
    assert (await executor.execute(process, store)).stdout == b"A\n"
    for name in os.listdir(remote_dir / "cas"):
        os.unlink(remote_dir / "cas" / name)
    assert (await executor.execute(process, store)).stdout == b"A\n"
    assert jobs_left(remote_dir) == []


async def test_missing_program_and_bad_working_directory_are_executor_errors(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    with pytest.raises(ExecutorError, match=r"'no-such-program'.*not found in PATH="):
        await executor.execute(Process(["no-such-program"], env=PATH), store)
    with pytest.raises(ExecutorError, match=r"'./missing.sh'.*no such file"):
        await executor.execute(Process(["./missing.sh"]), store)
    inputs = await store.create_digest(
        CreateDigest([FileContent("plain.txt", b"x"), FileContent("file", b"")])
    )
    with pytest.raises(ExecutorError, match=r"Permission denied.*executable file"):
        await executor.execute(Process(["./plain.txt"], input_digest=inputs), store)
    with pytest.raises(ExecutorError, match="working directory 'file' is unusable"):
        await executor.execute(
            Process(["/bin/true"], input_digest=inputs, working_directory="file"), store
        )
    # The executor is still usable afterwards.
    assert (await executor.execute(Process(["/bin/echo", "ok"]), store)).stdout == b"ok\n"


async def test_program_name_with_equals_sign_is_not_an_assignment(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    inputs = await store.create_digest(
        CreateDigest([FileContent("a=b", b"#!/bin/sh\necho ran a=b\n", is_executable=True)])
    )
    result = await executor.execute(Process(["./a=b"], input_digest=inputs, env={"X": "1"}), store)
    assert (result.exit_code, result.stdout) == (0, b"ran a=b\n")


async def test_parallelism_is_respected(
    open_executor: OpenExecutor, store: Store, signals: Signals
) -> None:
    executor = await open_executor(parallelism=2)
    # Each process announces itself, then waits for a line on the gate FIFO (which the test
    # holds open, so lines written early wait there for their reader).
    gate = signals.directory / "gate"
    os.mkfifo(gate)
    gate.chmod(0o666)
    gate_fd = os.open(gate, os.O_RDWR | os.O_NONBLOCK)
    script = f'echo "$N" > {signals.fifo}; read line < {gate}'
    started: set[str] = set()
    try:
        async with trio.open_nursery() as nursery:
            for n in range(4):
                process = Process(["/bin/sh", "-c", script], env={"N": str(n)})
                nursery.start_soon(executor.execute, process, store)
            started |= {await signals.line(), await signals.line()}
            with trio.move_on_after(0.5) as quiet:
                await signals.line()
            assert quiet.cancelled_caught, "a third process started with parallelism=2"
            os.write(gate_fd, b"go\n" * 4)
            started |= {await signals.line(), await signals.line()}
    finally:
        os.close(gate_fd)
    assert started == {"0", "1", "2", "3"}


# --- kill semantics ---------------------------------------------------------------------------


async def test_timeout_kills_the_remote_process_group(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor(kill_grace_seconds=5)
    script = "sleep 1000 & echo $$ $!; trap 'echo got TERM >&2; exit 3' TERM; wait"
    with trio.fail_after(30):
        result = await executor.execute(
            Process(["/bin/sh", "-c", script], env=PATH, timeout_seconds=2), store
        )
    assert result.timed_out
    # The shell got SIGTERM (it traps it, exits 3) and the partial output came back.
    assert result.stderr == b"got TERM\n"
    assert result.exit_code == 3
    for pid in map(int, result.stdout.split()):
        await wait_gone(pid)


async def test_cancellation_kills_the_remote_process(
    open_executor: OpenExecutor, store: Store, signals: Signals, remote_dir: Path
) -> None:
    executor = await open_executor(kill_grace_seconds=0.2)
    script = f"sleep 1000 & echo $$ $! > {signals.fifo}; trap '' TERM; wait"
    with trio.move_on_after(60) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                executor.execute, Process(["/bin/sh", "-c", script], env=PATH), store
            )
            pids = [int(p) for p in (await signals.line()).split()]
            for pid in pids:
                os.kill(pid, 0)  # running remotely
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    # The shell ignores SIGTERM: only the SIGKILL after the grace period ends it.
    for pid in pids:
        await wait_gone(pid)
    # And the executor still works.
    assert (await executor.execute(Process(["/bin/echo", "after"]), store)).stdout == b"after\n"


async def test_without_setsid_the_main_process_is_still_killed(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor(kill_grace_seconds=0.2)
    assert executor._remote is not None and executor._remote.setsid
    executor._remote = replace(executor._remote, setsid="")  # as on a remote without setsid(1)
    with trio.fail_after(SAFETY_TIMEOUT):
        result = await executor.execute(
            Process(["/bin/sh", "-c", "echo $$; exec sleep 1000"], env=PATH, timeout_seconds=1),
            store,
        )
    assert result.timed_out and result.exit_code == -signal.SIGTERM
    await wait_gone(int(result.stdout))


async def test_a_process_left_running_after_exit_is_killed(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    result = await executor.execute(
        Process(["/bin/sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"], env=PATH), store
    )
    assert result.exit_code == 0
    await wait_gone(int(result.stdout))


async def test_connection_lost_mid_run_is_retried_once(
    open_executor: OpenExecutor, store: Store, signals: Signals
) -> None:
    executor = await open_executor()
    marker = signals.directory / "first-run-done"
    script = (
        f"if [ -e {marker} ]; then echo second run; exit 0; fi\n"
        f"touch {marker}; echo $$ > {signals.fifo}; exec sleep 1000"
    )
    async with trio.open_nursery() as nursery:
        results: list[Any] = []

        async def run() -> None:
            results.append(
                await executor.execute(Process(["/bin/sh", "-c", script], env=PATH), store)
            )

        nursery.start_soon(run)
        first_pid = int(await signals.line())
        master = executor._master_pid
        assert master is not None
        os.kill(master, signal.SIGKILL)  # the connection drops mid-run
    (result,) = results
    assert (result.exit_code, result.stdout) == (0, b"second run\n")
    assert executor._master_pid not in (None, master)  # a fresh connection
    # The remote wrapper killed the first run when its connection went away.
    await wait_gone(first_pid)


async def test_connection_lost_twice_is_a_clear_error(
    open_executor: OpenExecutor, store: Store, signals: Signals
) -> None:
    executor = await open_executor()
    script = f"echo $$ > {signals.fifo}; exec sleep 1000"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            failures: list[BaseException] = []

            async def run() -> None:
                try:
                    await executor.execute(Process(["/bin/sh", "-c", script], env=PATH), store)
                except SshConnectionError as exc:
                    failures.append(exc)

            nursery.start_soon(run)
            for _ in range(2):
                pid = int(await signals.line())
                assert executor._master_pid is not None
                os.kill(executor._master_pid, signal.SIGKILL)
                await wait_gone(pid)
    (error,) = failures
    assert isinstance(error, SshConnectionError)
    assert error.reason == "connection_lost"
    assert "'builder'" in str(error) and "again on a fresh connection" in str(error)


# --- connection errors ------------------------------------------------------------------------


async def _connect_error(config: SshEnvironmentConfig, store: Store) -> SshConnectionError:
    executor = SshExecutor("builder", config)
    try:
        with trio.fail_after(30):  # never a hang
            with pytest.raises(SshConnectionError) as caught:
                await executor.open(store)
    finally:
        await executor.aclose()
    return caught.value


async def test_changed_host_key_is_refused(
    sshd_server: SshServer, store: Store, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(sshd_server.other_host_key_line)
    error = await _connect_error(make_config(sshd_server, known_hosts=known_hosts), store)
    assert error.reason == "host_key_changed"
    message = str(error)
    assert "'builder'" in message and "127.0.0.1" in message
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd_server.port}' -f {known_hosts}" in message


async def test_unknown_host_key_is_refused(
    sshd_server: SshServer, store: Store, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    error = await _connect_error(make_config(sshd_server, known_hosts=known_hosts), store)
    assert error.reason == "host_key_unknown"
    assert f"ssh-keyscan -p {sshd_server.port} 127.0.0.1 >> {known_hosts}" in str(error)
    assert known_hosts.read_text() == ""  # nothing was added behind the user's back


async def test_refused_login_names_the_fix(sshd_server: SshServer, store: Store) -> None:
    config = make_config(sshd_server, identity_file=sshd_server.other_identity_file)
    error = await _connect_error(config, store)
    assert error.reason == "login_refused"
    assert "authorized_keys" in str(error) and str(sshd_server.other_identity_file) in str(error)


async def test_closed_port_is_unreachable(sshd_server: SshServer, store: Store) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        error = await _connect_error(replace(make_config(sshd_server), port=port), store)
    assert error.reason == "unreachable"
    assert f"port {port}" in str(error) and "'builder'" in str(error)


async def test_remote_dir_of_another_user_is_refused(
    sshd_server: SshServer, store: Store, tmp_path: Path
) -> None:
    foreign = Path(tempfile.mkdtemp(prefix="rw-foreign-", dir="/tmp"))
    try:
        if sshd_server.user == pwd.getpwuid(os.geteuid()).pw_name:
            # CI provisions one (.ci/setup.d/ssh.sh); a local run as that user cannot check this.
            unavailable("needs a login user other than the test runner")
        executor = SshExecutor("builder", make_config(sshd_server, remote_dir=str(foreign)))
        try:
            with pytest.raises(ExecutorError, match=r"owned by.*set remote_dir"):
                await executor.open(store)
        finally:
            await executor.aclose()
    finally:
        shutil.rmtree(foreign)


# --- identity, caching, lifecycle -------------------------------------------------------------


async def test_identity_names_host_and_platform_and_differs_from_local(
    open_executor: OpenExecutor,
) -> None:
    executor = await open_executor()
    uname = os.uname()
    assert await executor.identity() == f"ssh:127.0.0.1:{uname.sysname} {uname.machine}"
    local = LocalExecutor("local", LocalExecutorConfig())
    assert await local.identity() != await executor.identity()
    await local.aclose()


async def test_same_process_is_served_from_cache_and_not_shared_with_local(
    sshd_server: SshServer, remote_dir: Path, tmp_path: Path
) -> None:
    process = Process(["/bin/sh", "-c", "echo $$"], env=PATH)
    memory = MemoryCache(MemoryCacheConfig())
    async with open_cache_layer(memory, None) as layer:
        store = Store(layer.local_blobs)
        ssh = SshExecutor("builder", make_config(sshd_server, remote_dir=str(remote_dir)))
        local = LocalExecutor("local", LocalExecutorConfig(sandbox_root=tmp_path / "sandboxes"))
        executors: dict[str, ProcessExecutor] = {"builder": ssh, "local": local}
        async with ProcessRunner(executors, "builder", store, layer) as runner:
            first = await runner.run(process)
            second = await runner.run(process)
            on_local = await runner.run(replace(process, environment="local"))
    await memory.aclose()
    assert first.metadata.source == "ran" and first.metadata.environment == "builder"
    assert (second.metadata.source, second.stdout) == ("local_cache", first.stdout)
    # The same Process on another platform identity is a different cache entry.
    assert on_local.metadata.source == "ran" and on_local.metadata.environment == "local"
    assert memory.statistics().action_writes == 2


async def test_aclose_stops_the_master_and_removes_local_files(
    open_executor: OpenExecutor, store: Store
) -> None:
    executor = await open_executor()
    await executor.execute(Process(["/bin/true"]), store)
    master, local_dir = executor._master_pid, executor._local_dir
    assert master is not None and local_dir is not None and local_dir.exists()
    # The control socket path must stay well under the unix socket limit.
    assert len(str(local_dir / "c")) + 17 < 100
    assert stat.S_IMODE(local_dir.stat().st_mode) == 0o700
    await executor.aclose()
    await wait_gone(master)
    assert not local_dir.exists()


# --- config -----------------------------------------------------------------------------------


def test_config_from_toml(tmp_path: Path) -> None:
    (tmp_path / "rulework.toml").write_text(
        "[environments.builder]\n"
        'kind = "ssh"\nhost = "build1.internal"\nport = 2222\nuser = "ci"\n'
        'identity_file = "keys/id"\nknown_hosts = "~/.ssh/known_hosts"\n'
        'extra_options = ["Compression=yes"]\nparallelism = 8\n'
    )
    config = load_config(tmp_path / "rulework.toml")
    settings = config.environments["builder"].settings
    assert isinstance(settings, SshEnvironmentConfig)
    assert (settings.host, settings.port, settings.user, settings.parallelism) == (
        "build1.internal",
        2222,
        "ci",
        8,
    )
    assert settings.identity_file == tmp_path / "keys" / "id"
    assert settings.known_hosts == Path("~/.ssh/known_hosts").expanduser()
    assert settings.extra_options == ("Compression=yes",)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"host": "ci@build1"}, "host = 'build1' and user = 'ci'"),
        ({"host": "-oProxyCommand=x"}, "not a valid host name"),
        ({"port": 0}, "port must be between 1 and 65535"),
        ({"remote_dir": "relative/dir"}, "absolute path or start with '~/'"),
        ({"remote_dir": "~"}, "directly in / or the home directory"),
        ({"extra_options": ["StrictHostKeyChecking=no"]}, "host keys are always checked"),
        ({"extra_options": ["ControlPath=/x"]}, "manages the ControlMaster"),
        ({"extra_options": ["nonsense"]}, "is not an ssh option"),
        ({"inherit_env": ["$(x)"]}, "not a valid variable name"),
        ({"parallelism": 0}, "parallelism must be between"),
    ],
)
def test_config_validation(settings: dict[str, Any], problem: str) -> None:
    settings = {"host": "build1", **settings}
    with pytest.raises(
        (ValueError, TypeError), match=problem.replace("(", r"\(").replace("$", r"\$")
    ):
        SshEnvironmentConfig(**settings)


def test_config_errors_name_the_key_in_toml(tmp_path: Path) -> None:
    config = tmp_path / "rulework.toml"
    config.write_text('[environments.builder]\nkind = "ssh"\nhost = "b"\nprot = 22\n')
    with pytest.raises(ConfigError, match=r"did you mean 'port'.* @ environments\.builder\.prot"):
        load_config(config)
    config.write_text(
        '[environments.builder]\nkind = "ssh"\nhost = "b"\nextra_options = ["BatchMode=no"]\n'
    )
    with pytest.raises(ConfigError, match=r"BatchMode cannot be set here.*environments\.builder"):
        load_config(config)


def test_a_missing_sshd_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(svc_sshd, "_SSHD", "/nonexistent/sshd")
    with (
        pytest.raises(svc_sshd.SshdUnavailable, match=r"openssh-server.*\.ci/setup\.d/ssh\.sh"),
        svc_sshd.running_sshd(),
    ):
        pass
