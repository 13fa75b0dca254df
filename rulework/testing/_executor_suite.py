"""`ProcessExecutorSuite`: the conformance tests every `ProcessExecutor` must pass.

Subclass it in a test module (the class name must start with `Test` for pytest to collect
it) and override the `executor` fixture; every built-in executor (local, ssh, container...)
runs it, and so can any plugin::

    from rulework.testing import ProcessExecutorSuite

    class TestMyExecutor(ProcessExecutorSuite):
        @pytest.fixture
        async def executor(self, store):
            executor = MyExecutor("mine", MyConfig(parallelism=2))
            await executor.open(store)
            yield executor
            await executor.aclose()

What the suite assumes of the environment: a POSIX `sh` and the usual utilities (`printf`,
`cat`, `env`, `sleep`, `head`, `tr`, `date` with `%N`, `mkdir`, `ls`, `kill`), found on the
default search path `/bin:/usr/bin` when the Process env sets no `PATH`. Keep the fixture's
`parallelism` small (2 to 4): the parallelism test runs `2 * parallelism + 1` processes.

Hooks to override when the environment differs from "this machine":

- `store` fixture: the `Store` processes read inputs from and write outputs to (default: a
  `FileBlobStore` in a temporary directory).
- `probe_dir` fixture: a directory the processes can write to *at the same absolute path* the
  test reads it from (default: a temporary directory, right for local and for ssh to
  localhost). Return None if there is none: the cancellation test then only checks that
  `execute` returns promptly, instead of checking that the process group died.
- `pid_is_running(pid)`: whether a pid printed by a process is still running (default: this
  machine's `/proc`, where a zombie counts as dead).
- `allowed_extra_env`: variables the environment unavoidably adds to what a process sees.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from ..abc import ExecutedProcess, ProcessExecutor
from ..engine.errors import ExecutorError
from ..engine.fs import EMPTY_DIGEST, CreateDigest, Directory, FileContent
from ..engine.process import Process
from ..engine.store import FileBlobStore, Store

__all__ = ["ProcessExecutorSuite"]

# Generous: these bound how long a broken executor can hang a test, they never pace one.
_SAFETY_SECONDS = 60.0


def _local_pid_is_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # Gone before the open, or (ESRCH) between the open and the read.
        return False
    # The state follows the parenthesized command name; a zombie has exited already (its
    # parent, maybe an init that never reaps, has just not collected it).
    return stat.rpartition(")")[2].split()[0] != "Z"


# Prints an integer clock reading: nanoseconds from `date +%s%N` where it has %N (GNU), else
# the centiseconds of /proc/uptime scaled to nanoseconds (busybox). Every process of one
# environment takes the same branch, so their readings compare.
_CLOCK = (
    't=$(date +%s%N 2>/dev/null); case "$t" in *N*|"") read -r up _ < /proc/uptime; '
    't="${up%.*}${up#*.}0000000";; esac; echo "$t"'
)


def _sh(script: str, *args: str, **options: Any) -> Process:
    """A Process running `script` with POSIX sh (arguments as $1, $2...)."""
    return Process(("sh", "-c", script, "sh", *args), **options)


@pytest.mark.trio
class ProcessExecutorSuite:
    """Conformance tests for a `ProcessExecutor` (see the module docstring)."""

    #: Variables the environment adds to every process that it cannot avoid adding.
    allowed_extra_env: ClassVar[frozenset[str]] = frozenset()
    #: The `timeout_seconds` of the timeout tests: long enough for a process to start and
    #: report its pids in this environment (container start-up included), under load.
    timeout_test_seconds: ClassVar[float] = 3.0

    # -- fixtures and hooks to override ---------------------------------------------------------

    @pytest.fixture
    def store(self, tmp_path: Path) -> Store:
        """The store the executor reads inputs from and writes outputs to."""
        return Store(FileBlobStore(tmp_path / "suite-store"))

    @pytest.fixture
    async def executor(self, store: Store) -> AsyncIterator[ProcessExecutor]:
        """Override: yield an opened executor with a small `parallelism`; close it afterwards."""
        pytest.fail(f"{type(self).__name__} must override the `executor` fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def probe_dir(self, tmp_path: Path) -> Path | None:
        """A directory processes can write to, readable by the test at the same path (or None)."""
        path = tmp_path / "suite-probe"
        path.mkdir()
        path.chmod(0o777)
        return path

    async def pid_is_running(self, pid: int) -> bool:
        """Whether `pid` (as printed by a process the executor ran) is still running."""
        return _local_pid_is_running(pid)

    # -- helpers ---------------------------------------------------------------------------------

    async def run(
        self, executor: ProcessExecutor, store: Store, process: Process
    ) -> ExecutedProcess:
        """Execute `process`, bounded by a safety timeout."""
        with trio.fail_after(_SAFETY_SECONDS + (process.timeout_seconds or 0)):
            return await executor.execute(process, store)

    @staticmethod
    def reported_pids(result: ExecutedProcess) -> list[int]:
        """The two pids (shell, background child) a timed-out test process printed."""
        pids = [int(pid) for pid in result.stdout.split()]
        assert len(pids) == 2, (
            f"the process was killed before it reported its pids (stdout {result.stdout!r}, "
            f"stderr {result.stderr!r}); raise `timeout_test_seconds` for this environment"
        )
        return pids

    async def wait_until_gone(self, pids: list[int]) -> None:
        """Wait until none of `pids` runs (SIGKILL is asynchronous); fail after a safety bound."""
        with trio.move_on_after(_SAFETY_SECONDS):
            while True:
                running = [pid for pid in pids if await self.pid_is_running(pid)]
                if not running:
                    return
                await trio.sleep(0.02)
        pytest.fail(f"processes {running} survived their Process")

    # -- the tests -------------------------------------------------------------------------------

    async def test_exit_codes(self, executor: ProcessExecutor, store: Store) -> None:
        for code in (0, 1, 3, 255):
            result = await self.run(executor, store, _sh(f"exit {code}"))
            assert result.exit_code == code
            assert not result.timed_out

    async def test_stdout_and_stderr_are_captured_separately(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        result = await self.run(
            executor, store, _sh("printf 'to out\\n'; printf 'to err\\n' >&2; printf more")
        )
        assert result.stdout == b"to out\nmore"
        assert result.stderr == b"to err\n"
        assert result.output_digest == EMPTY_DIGEST
        assert result.duration_seconds >= 0

    async def test_large_output_on_both_streams_does_not_deadlock(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        # Several MB on stderr *before* stdout: an executor that reads stdout to its end first
        # would wait forever on a child blocked writing to a full stderr pipe.
        script = (
            "head -c 3000000 /dev/zero | tr '\\000' e >&2; "
            "head -c 5000000 /dev/zero | tr '\\000' o; "
            "head -c 1000000 /dev/zero | tr '\\000' E >&2"
        )
        result = await self.run(executor, store, _sh(script))
        assert result.exit_code == 0
        assert result.stdout == b"o" * 5_000_000
        assert result.stderr == b"e" * 3_000_000 + b"E" * 1_000_000

    async def test_stdin_is_empty(self, executor: ProcessExecutor, store: Store) -> None:
        result = await self.run(executor, store, Process(("cat",), timeout_seconds=30))
        assert (result.exit_code, result.stdout, result.timed_out) == (0, b"", False)

    async def test_env_is_exactly_the_process_env(
        self, executor: ProcessExecutor, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("RULEWORK_SUITE_MUST_NOT_LEAK", "leaked")
        env = {"RW_ONE": "1", "RW_TWO": "two words", "RW_EMPTY": ""}
        result = await self.run(executor, store, Process(("env",), env=env))
        assert result.exit_code == 0, result.stderr
        seen = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
        extra = set(seen) - set(env) - self.allowed_extra_env
        assert not extra, f"variables not in the Process env are visible: {sorted(extra)}"
        assert {k: seen.get(k) for k in env} == env

    async def test_env_values_are_passed_literally(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        value = "$(echo pwned) `id` 'single' \"double\" \\ ; | & * ~\nsecond line ünï ✓"
        result = await self.run(
            executor, store, _sh('printf %s "$HOSTILE"', env={"HOSTILE": value})
        )
        assert result.stdout.decode() == value

    async def test_hostile_argv_is_passed_literally(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        hostile = (
            "a b",
            "  leading and trailing  ",
            "'single'",
            '"double"',
            "$(touch pwned)",
            "`touch pwned2`",
            "$HOME ${PATH}",
            "line1\nline2",
            "tab\there",
            "ünïcødé ✓ 🚀",
            "*",
            "; touch pwned3",
            "| cat",
            "&& touch pwned4",
            "\\",
            "",
            "-n",
            "--",
            "%s %d",
            "> redirect",
        )
        result = await self.run(
            executor,
            store,
            Process(
                ("printf", "<%s>\\n", *hostile),
                output_files=("pwned", "pwned2", "pwned3", "pwned4", "redirect"),
            ),
        )
        assert result.exit_code == 0, result.stderr
        assert result.stdout.decode() == "".join(f"<{arg}>\n" for arg in hostile)
        assert result.output_digest == EMPTY_DIGEST, "a shell interpreted the argv"

    async def test_input_files_are_visible(self, executor: ProcessExecutor, store: Store) -> None:
        digest = await store.create_digest(
            CreateDigest(
                [
                    FileContent("data/in.txt", b"input bytes\n"),
                    FileContent("run.sh", b"#!/bin/sh\necho script ran\n", is_executable=True),
                    Directory("empty"),
                ]
            )
        )
        result = await self.run(
            executor,
            store,
            _sh("./run.sh && cat data/in.txt && test -d empty && echo dir ok", input_digest=digest),
        )
        assert result.exit_code == 0, result.stderr
        assert result.stdout == b"script ran\ninput bytes\ndir ok\n"

    async def test_declared_outputs_are_captured(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        script = (
            "printf one > out.txt; mkdir -p dir/sub; printf a > dir/sub/a; printf b > dir/b; "
            "printf junk > undeclared.txt"
        )
        result = await self.run(
            executor,
            store,
            _sh(script, output_files=("out.txt", "missing.txt"), output_directories=("dir",)),
        )
        assert result.exit_code == 0, result.stderr
        contents = {fc.path: fc.content for fc in await store.contents(result.output_digest)}
        assert contents == {"out.txt": b"one", "dir/sub/a": b"a", "dir/b": b"b"}

    async def test_working_directory(self, executor: ProcessExecutor, store: Store) -> None:
        digest = await store.create_digest(CreateDigest([FileContent("sub/x.txt", b"x\n")]))
        result = await self.run(
            executor,
            store,
            _sh(
                'cat x.txt; basename "$PWD"; printf made > y.txt',
                input_digest=digest,
                working_directory="sub",
                output_files=("y.txt",),
            ),
        )
        assert result.exit_code == 0, result.stderr
        assert result.stdout == b"x\nsub\n"
        # Outputs are relative to the working directory.
        contents = {fc.path: fc.content for fc in await store.contents(result.output_digest)}
        assert contents == {"y.txt": b"made"}

    async def test_each_process_gets_a_fresh_sandbox(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        first = await self.run(executor, store, _sh("printf x > leftover.txt; mkdir leftdir"))
        assert first.exit_code == 0
        for _ in range(2):
            listing = await self.run(executor, store, Process(("ls", "-A")))
            assert listing.exit_code == 0
            assert listing.stdout == b""

    async def test_missing_executable_is_an_executor_error(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        with pytest.raises(ExecutorError, match="rulework-no-such-program"):
            await self.run(executor, store, Process(("rulework-no-such-program",)))

    async def test_identity_is_a_stable_nonempty_string(self, executor: ProcessExecutor) -> None:
        first = await executor.identity()
        assert isinstance(first, str) and first
        assert await executor.identity() == first

    async def test_timeout_kills_the_process_group(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        result = await self.run(
            executor,
            store,
            _sh("sleep 300 & echo $$ $!; wait", timeout_seconds=self.timeout_test_seconds),
        )
        assert result.timed_out
        assert result.exit_code != 0
        assert result.duration_seconds < _SAFETY_SECONDS
        await self.wait_until_gone(self.reported_pids(result))

    async def test_timeout_escalates_to_sigkill(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        # SIGTERM is ignored by the shell and (inherited) by its child: only SIGKILL ends them.
        result = await self.run(
            executor,
            store,
            _sh(
                "trap '' TERM; sleep 300 & echo $$ $!; wait; wait",
                timeout_seconds=self.timeout_test_seconds,
            ),
        )
        assert result.timed_out
        await self.wait_until_gone(self.reported_pids(result))

    async def test_cancellation_kills_the_process_group(
        self, executor: ProcessExecutor, store: Store, probe_dir: Path | None
    ) -> None:
        if probe_dir is None:
            # No shared file system: all we can see is that execute gives up promptly.
            with trio.move_on_after(1.0):
                await self.run(executor, store, _sh("sleep 300"))
            return
        marker = probe_dir / f"pids-{uuid.uuid4().hex}"
        script = 'sleep 300 & echo $$ $! > "$1.tmp"; mv "$1.tmp" "$1"; wait'
        pids: list[int] = []
        with trio.fail_after(_SAFETY_SECONDS):
            async with trio.open_nursery() as nursery:
                cancel_scope = trio.CancelScope()

                async def execute() -> None:
                    with cancel_scope:
                        await executor.execute(_sh(script, str(marker)), store)
                    # Cancellation must not be swallowed into a result.
                    assert cancel_scope.cancelled_caught

                nursery.start_soon(execute)
                # The process announces itself through the shared directory; nothing in
                # this process could be signalled, so poll.
                while not marker.exists():  # noqa: ASYNC110
                    await trio.sleep(0.01)
                pids = [int(pid) for pid in marker.read_text().split()]
                assert all([await self.pid_is_running(pid) for pid in pids])
                cancel_scope.cancel()
        await self.wait_until_gone(pids)

    async def test_parallelism_bound_is_respected(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        bound = executor.parallelism
        assert bound >= 1
        # Each process reports when it started and ended on the environment's own clock; the
        # reported interval lies inside the process's life, so overlaps can only be undercounted.
        script = f"{_CLOCK}; sleep 0.3; {_CLOCK}"
        results: list[ExecutedProcess] = []

        async def one() -> None:
            results.append(await self.run(executor, store, _sh(script)))

        async with trio.open_nursery() as nursery:
            for _ in range(2 * bound + 1):
                nursery.start_soon(one)
        events: list[tuple[int, int]] = []
        for result in results:
            assert result.exit_code == 0, result.stderr
            start, end = (int(line) for line in result.stdout.split())
            events += [(start, 1), (end, -1)]
        running = peak = 0
        for _, delta in sorted(events):  # at equal times, an end (-1) sorts before a start
            running += delta
            peak = max(peak, running)
        assert peak <= bound, f"{peak} processes ran at once with parallelism {bound}"

    async def test_many_processes_concurrently(
        self, executor: ProcessExecutor, store: Store
    ) -> None:
        outputs: dict[int, bytes] = {}

        async def one(i: int) -> None:
            result = await self.run(executor, store, Process(("printf", f"{i}")))
            outputs[i] = result.stdout

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
        assert outputs == {i: str(i).encode() for i in range(20)}
