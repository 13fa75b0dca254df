"""A third-party rulework executor, registered only through its dist-info entry point.

It runs processes on this machine (with trio, outside any sandbox) and exports its configured
`greeting` to them as $DEMO_GREETING, so a test can tell that it, and not `local`, ran them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from rulework.abc import ExecutedProcess
from rulework.engine.fs import EMPTY_DIGEST


@dataclass(frozen=True, slots=True)
class DemoConfig:
    greeting: str
    parallelism: int = 1


class DemoExecutor:
    config_type: ClassVar[type[Any]] = DemoConfig

    def __init__(self, name: str, config: DemoConfig) -> None:
        self.name = name
        self.config = config
        self.parallelism = config.parallelism
        self.opened = False

    async def open(self, store: Any) -> None:
        self.opened = True

    async def identity(self) -> str:
        return "demo:" + self.config.greeting

    async def execute(self, process: Any, store: Any) -> ExecutedProcess:
        started = time.monotonic()
        result = await trio.run_process(
            process.argv,
            env={**process.env, "DEMO_GREETING": self.config.greeting},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return ExecutedProcess(
            result.returncode,
            result.stdout,
            result.stderr,
            EMPTY_DIGEST,
            time.monotonic() - started,
        )

    async def aclose(self) -> None:
        self.opened = False
