"""The local executor: the conformance suite plus what is specific to running on this machine."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import rulework.backends.local as local_module
from rulework.abc import ProcessExecutor
from rulework.backends.local import LocalExecutor, LocalExecutorConfig
from rulework.engine.errors import ExecutorError
from rulework.engine.fs import CreateDigest, FileContent
from rulework.engine.process import Process
from rulework.engine.store import FileBlobStore, Store
from rulework.testing._executor_suite import ProcessExecutorSuite

from .services._common import unavailable


def _config(tmp_path: Path, **options: object) -> LocalExecutorConfig:
    settings: dict[str, object] = {
        "parallelism": 2,
        "kill_grace_seconds": 0.5,
        "sandbox_root": tmp_path / "sandboxes",
    }
    settings.update(options)
    return LocalExecutorConfig(**settings)  # type: ignore[arg-type]


class TestLocalExecutorConformance(ProcessExecutorSuite):
    # A local shell reports its pids within milliseconds; no container or network to wait for.
    timeout_test_seconds = 1.5

    @pytest.fixture(params=[False, True], ids=["spawn-on-loop", "spawn-in-thread"])
    async def executor(
        self, store: Store, tmp_path: Path, request: pytest.FixtureRequest
    ) -> AsyncIterator[ProcessExecutor]:
        executor = LocalExecutor("local", _config(tmp_path, spawn_in_thread=request.param))
        await executor.open(store)
        yield executor
        await executor.aclose()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(FileBlobStore(tmp_path / "store"))


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _count(directory: Path, pattern: str = "*") -> int:
    return len(list(directory.glob(pattern)))


def _is_empty_or_absent(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


async def _wait_gone(pid: int) -> None:
    # SIGKILL is asynchronous and the pid belongs to no process of ours: poll until it is gone.
    with trio.fail_after(30):
        while _running(pid):  # noqa: ASYNC110
            await trio.sleep(0.02)


# --- config -----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = LocalExecutorConfig()
    assert config.parallelism == (os.cpu_count() or 1)
    assert config.keep_sandboxes == "never"
    assert config.sandbox_root is None
    assert config.inherit_env == ()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"parallelism": 0}, "parallelism must be at least 1"),
        ({"parallelism": True}, "parallelism must be an integer"),
        ({"keep_sandboxes": "sometimes"}, "keep_sandboxes must be"),
        ({"inherit_env": ("A=B",)}, "not a valid variable name"),
        ({"kill_grace_seconds": -1}, "kill_grace_seconds"),
        ({"spawn_in_thread": "yes"}, "spawn_in_thread must be true or false"),
    ],
)
def test_config_rejects_bad_values(options: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        LocalExecutorConfig(**options)  # type: ignore[arg-type]


# --- identity -----------------------------------------------------------------------------------


async def test_identity_names_the_platform() -> None:
    executor = LocalExecutor("local", LocalExecutorConfig())
    try:
        uname = os.uname()
        assert await executor.identity() == f"local:{uname.sysname}-{uname.machine}"
    finally:
        await executor.aclose()


async def test_identity_covers_inherited_values(monkeypatch: pytest.MonkeyPatch) -> None:
    identities = []
    for value in ("one", "two", "one"):
        monkeypatch.setenv("RW_TEST_INHERITED", value)
        executor = LocalExecutor("local", LocalExecutorConfig(inherit_env=("RW_TEST_INHERITED",)))
        identities.append(await executor.identity())
        await executor.aclose()
    assert identities[0] != identities[1]
    assert identities[0] == identities[2]
    assert identities[0].startswith("local:")


# --- environment --------------------------------------------------------------------------------


async def test_inherit_env_passes_only_the_named_variables(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RW_TEST_PASSED", "passed")
    monkeypatch.setenv("RW_TEST_HIDDEN", "hidden")
    monkeypatch.delenv("RW_TEST_ABSENT", raising=False)
    executor = LocalExecutor(
        "local", _config(tmp_path, inherit_env=("RW_TEST_PASSED", "RW_TEST_ABSENT"))
    )
    try:
        result = await executor.execute(Process(("env",), env={"OWN": "x"}), store)
        seen = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
        assert seen == {"RW_TEST_PASSED": "passed", "OWN": "x"}
        # The Process's own value wins over an inherited one.
        result = await executor.execute(Process(("env",), env={"RW_TEST_PASSED": "mine"}), store)
        assert result.stdout == b"RW_TEST_PASSED=mine\n"
    finally:
        await executor.aclose()


# --- sandboxes ----------------------------------------------------------------------------------


async def test_sandboxes_are_removed(tmp_path: Path, store: Store) -> None:
    root = tmp_path / "sandboxes"
    executor = LocalExecutor("local", _config(tmp_path))
    digest = await store.create_digest(CreateDigest([FileContent("in/f.txt", b"x")]))
    await executor.execute(Process(("sh", "-c", "pwd; echo y > made"), input_digest=digest), store)
    result = await executor.execute(Process(("pwd",)), store)
    sandbox = Path(result.stdout.decode().strip())
    assert sandbox.parent.parent == root
    # Only the (empty) sandbox pool remains while open; nothing at all after closing.
    for remaining in sandbox.parent.iterdir():
        assert list(remaining.iterdir()) == []
    await executor.aclose()
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(("keep", "kept_exit_codes"), [("always", {0, 1}), ("on_failure", {1})])
async def test_keep_sandboxes(
    tmp_path: Path,
    store: Store,
    caplog: pytest.LogCaptureFixture,
    keep: str,
    kept_exit_codes: set[int],
) -> None:
    executor = LocalExecutor("keeper", _config(tmp_path, keep_sandboxes=keep))
    digest = await store.create_digest(CreateDigest([FileContent("input.txt", b"in")]))
    kept: dict[int, Path] = {}
    with caplog.at_level(logging.WARNING, logger="rulework.backends.local"):
        for code in (0, 1):
            caplog.clear()
            result = await executor.execute(
                Process(
                    ("sh", "-c", f"pwd; echo out > made.txt; exit {code}"),
                    description=f"exit-{code}",
                    input_digest=digest,
                ),
                store,
            )
            sandbox = Path(result.stdout.decode().strip())
            if code in kept_exit_codes:
                assert str(sandbox) in caplog.text and f"exit-{code}" in caplog.text
                kept[code] = sandbox
            else:
                assert _is_empty_or_absent(sandbox)
    await executor.aclose()
    for sandbox in kept.values():
        assert (sandbox / "made.txt").read_text() == "out\n"
        assert (sandbox / "input.txt").read_text() == "in"
    shutil.rmtree(tmp_path / "sandboxes")


async def test_default_sandbox_root_is_the_temp_dir(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    executor = LocalExecutor("local", LocalExecutorConfig(parallelism=1))
    result = await executor.execute(Process(("pwd",)), store)
    assert Path(result.stdout.decode().strip()).is_relative_to(tmp_path.resolve())  # noqa: ASYNC240
    await executor.aclose()
    assert [name for name in os.listdir(tmp_path) if name.startswith("rulework-")] == []


# --- spawning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_thread", [False, True])
async def test_processes_start_on_the_event_loop_thread_unless_configured(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch, in_thread: bool
) -> None:
    threads: list[int] = []
    protected: list[bool] = []
    real_popen = subprocess.Popen

    def recording_popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        threads.append(threading.get_ident())
        if not in_thread:
            # A Ctrl-C must not land between fork and the executor knowing the child.
            protected.append(trio.lowlevel.currently_ki_protected())
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(local_module.subprocess, "Popen", recording_popen)
    executor = LocalExecutor("local", _config(tmp_path, spawn_in_thread=in_thread))
    try:
        result = await executor.execute(Process(("/bin/sh", "-c", "echo $$")), store)
    finally:
        await executor.aclose()
    assert result.exit_code == 0 and int(result.stdout) > 0
    assert len(threads) == 1
    assert (threads[0] == threading.get_ident()) is not in_thread
    assert protected == ([] if in_thread else [True])


# --- spawning errors ----------------------------------------------------------------------------


async def test_missing_program_names_the_path_searched(tmp_path: Path, store: Store) -> None:
    executor = LocalExecutor("local", _config(tmp_path))
    try:
        with pytest.raises(ExecutorError) as info:
            await executor.execute(Process(("no-such-prog",)), store)
        assert "'no-such-prog'" in str(info.value)
        assert os.defpath in str(info.value)
        with pytest.raises(ExecutorError) as info:
            await executor.execute(
                Process(("no-such-prog",), env={"PATH": "/nowhere:/else"}), store
            )
        assert "PATH='/nowhere:/else'" in str(info.value)
        with pytest.raises(ExecutorError, match=r"'./missing.sh'.*no such file"):
            await executor.execute(Process(("./missing.sh",)), store)
    finally:
        await executor.aclose()


async def test_program_found_on_the_process_path(tmp_path: Path, store: Store) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "my-tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    executor = LocalExecutor("local", _config(tmp_path))
    try:
        result = await executor.execute(
            Process(("my-tool",), env={"PATH": f"{bin_dir}:/usr/bin:/bin"}), store
        )
        assert result.stdout == b"tool ran\n"
    finally:
        await executor.aclose()


async def test_non_executable_program_is_an_executor_error(tmp_path: Path, store: Store) -> None:
    executor = LocalExecutor("local", _config(tmp_path))
    digest = await store.create_digest(CreateDigest([FileContent("script.sh", b"echo hi\n")]))
    try:
        with pytest.raises(ExecutorError, match=r"'./script.sh'.*executable"):
            await executor.execute(Process(("./script.sh",), input_digest=digest), store)
    finally:
        await executor.aclose()


async def test_working_directory_that_is_a_file(tmp_path: Path, store: Store) -> None:
    executor = LocalExecutor("local", _config(tmp_path))
    digest = await store.create_digest(CreateDigest([FileContent("sub", b"a file")]))
    try:
        with pytest.raises(ExecutorError, match="working directory 'sub'"):
            await executor.execute(
                Process(("true",), input_digest=digest, working_directory="sub"), store
            )
    finally:
        await executor.aclose()


# --- process groups -----------------------------------------------------------------------------


async def test_background_children_are_killed_when_the_process_exits(
    tmp_path: Path, store: Store
) -> None:
    executor = LocalExecutor("local", _config(tmp_path))
    try:
        # The background child does not hold the pipes, so the process "finishes" at once.
        result = await executor.execute(
            Process(("sh", "-c", "sleep 300 </dev/null >/dev/null 2>&1 & echo $!")), store
        )
        assert result.exit_code == 0
        await _wait_gone(int(result.stdout))
    finally:
        await executor.aclose()


async def test_a_descendant_escaping_the_group_cannot_hang_the_executor(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    if shutil.which("setsid") is None:
        unavailable("needs util-linux setsid")  # a failure under CI=true, never a skip
    executor = LocalExecutor("local", _config(tmp_path))
    # The main process exits once its child has left the group; the child keeps stdout open.
    script = (
        "setsid sh -c 'echo $$ > escaped.tmp; mv escaped.tmp escaped; exec sleep 300' & "
        "while [ ! -e escaped ]; do sleep 0.01; done; cat escaped"
    )
    try:
        with trio.fail_after(30):
            result = await executor.execute(Process(("sh", "-c", script)), store)
        assert "outside its process group" in caplog.text
        escaped = int(result.stdout)
    finally:
        await executor.aclose()
    # It left the group on purpose: rulework cannot kill it; the test cleans up after itself.
    os.kill(escaped, 9)
    await _wait_gone(escaped)


async def test_cancelling_many_running_processes_leaves_none(tmp_path: Path, store: Store) -> None:
    executor = LocalExecutor("local", _config(tmp_path, parallelism=4))
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir()
    script = 'sleep 300 & echo $$ $! > "$1.tmp"; mv "$1.tmp" "$1"; wait'
    try:
        with trio.move_on_after(30) as scope:
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(
                        executor.execute,
                        Process(("sh", "-c", script, "sh", str(marker_dir / str(i)))),
                        store,
                    )
                with trio.fail_after(20):
                    while _count(marker_dir, "[0-9]") < 4:  # noqa: ASYNC110 - files from processes
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
    finally:
        await executor.aclose()
    pids = [int(pid) for m in marker_dir.glob("[0-9]") for pid in m.read_text().split()]
    assert len(pids) == 8  # only `parallelism` processes ever started
    for pid in pids:
        await _wait_gone(pid)


async def test_parallelism_is_bounded_by_a_capacity_limiter(tmp_path: Path, store: Store) -> None:
    executor = LocalExecutor("local", _config(tmp_path, parallelism=3))
    assert executor.parallelism == 3
    gate = tmp_path / "gate"
    marker_dir = tmp_path / "started"
    marker_dir.mkdir()
    # Each process announces itself, then blocks until the test opens the gate.
    script = 'touch "$1/$$"; while [ ! -e "$2" ]; do sleep 0.01; done'
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(7):
                nursery.start_soon(
                    executor.execute,
                    Process(("sh", "-c", script, "sh", str(marker_dir), str(gate))),
                    store,
                )
            with trio.fail_after(20):
                while _count(marker_dir) < 3:  # noqa: ASYNC110 - files from processes
                    await trio.sleep(0.01)
            # Three are running and blocked: no fourth may start however long we look.
            await trio.sleep(0.3)
            assert len(list(marker_dir.iterdir())) == 3
            gate.touch()
        assert len(list(marker_dir.iterdir())) == 7
    finally:
        await executor.aclose()


async def test_execute_before_open_opens_lazily(tmp_path: Path, store: Store) -> None:
    executor = LocalExecutor("lazy", _config(tmp_path))
    result = await executor.execute(Process(("printf", "ok")), store)
    assert result.stdout == b"ok"
    await executor.aclose()
    await executor.aclose()  # idempotent


async def test_unusable_sandbox_root_is_an_executor_error(tmp_path: Path, store: Store) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    executor = LocalExecutor("local", LocalExecutorConfig(sandbox_root=blocker / "sub"))
    with pytest.raises(ExecutorError, match="sandbox_root"):
        await executor.open(store)
