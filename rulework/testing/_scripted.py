"""A `ProcessExecutor` answering Processes from a script instead of running them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..abc import ExecutedProcess
from ..engine.errors import ExecutorError
from ..engine.fs import CreateDigest, FileContent

if TYPE_CHECKING:
    from ..engine.process import Process
    from ..engine.store import Store


@dataclass(frozen=True, slots=True)
class ScriptedResult:
    """What a scripted Process "did": its exit code, streams and output files."""

    exit_code: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    outputs: Mapping[str, bytes] = field(default_factory=dict)


Script = Callable[["Process"], ScriptedResult | Awaitable[ScriptedResult]]


@dataclass(frozen=True, slots=True)
class ScriptedExecutorConfig:
    """Settings of a scripted environment (for config-driven tests)."""

    parallelism: int = 4
    identity: str = "scripted"


class ScriptedExecutor:
    """Answers each Process with `script(process)`; records every Process it was given.

    Example::

        executor = ScriptedExecutor(lambda p: ScriptedResult(stdout=b"hi\\n"))
        runner = ProcessRunner({"local": executor}, "local", store, cache=None)

    A Process the script does not handle should make it raise; the error reaches the rule as
    an `ExecutorError` naming the Process.
    """

    config_type: ClassVar[type[ScriptedExecutorConfig]] = ScriptedExecutorConfig

    def __init__(
        self,
        script: Script,
        *,
        name: str = "scripted",
        config: ScriptedExecutorConfig | None = None,
    ) -> None:
        self.name = name
        self.config = config or ScriptedExecutorConfig()
        self.parallelism = self.config.parallelism
        self.calls: list[Process] = []
        self._script = script

    async def open(self, store: Store) -> None:
        return None

    async def identity(self) -> str:
        return self.config.identity

    async def execute(self, process: Process, store: Store) -> ExecutedProcess:
        self.calls.append(process)
        started = time.perf_counter()
        try:
            answer = self._script(process)
            result = answer if isinstance(answer, ScriptedResult) else await answer
        except Exception as exc:
            raise ExecutorError(
                f"The scripted executor has no answer for Process '{process.description}' "
                f"(argv {list(process.argv)!r}): {exc}"
            ) from exc
        digest = await store.create_digest(
            CreateDigest(FileContent(path, data) for path, data in sorted(result.outputs.items()))
        )
        return ExecutedProcess(
            exit_code=result.exit_code,
            stdout=result.stdout,
            stderr=result.stderr,
            output_digest=digest,
            duration_seconds=time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        return None
