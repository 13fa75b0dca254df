"""The rulework exception hierarchy.

Every error the engine raises for a user mistake or an environmental fault is a
`RuleworkError`. Each message says what happened, where, and what to do about it; the
structured data is kept on attributes so that tools can render it differently.
"""

from __future__ import annotations

from collections.abc import Sequence


class RuleworkError(Exception):
    """Base class of every error rulework raises on purpose."""


class RuleDefinitionError(RuleworkError, TypeError):
    """A `@rule` (or `@rule_helper`, `Get`, `QueryRule`...) is malformed.

    Raised at decoration time, or when the engine reads a rule's source for its Gets.
    """


class RuleGraphError(RuleworkError):
    """The rule graph cannot be built: unsatisfiable, ambiguous or (when strict) unreachable rules.

    `problems` holds one rendered message per problem; `str(error)` lists all of them.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        header = f"The rule graph has {count} problem{'s' if count != 1 else ''}:"
        body = "\n\n".join(f"{i}. {p}" for i, p in enumerate(self.problems, 1))
        super().__init__(f"{header}\n\n{body}")


class CycleError(RuleworkError):
    """A request would wait on itself through a chain of Gets.

    `cycle` lists the node descriptions along the cycle, starting and ending with the same node.
    """

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = tuple(cycle)
        chain = "\n  -> ".join(self.cycle)
        super().__init__(
            f"Dependency cycle detected:\n  {chain}\n"
            "A rule's Gets must not lead back to the same rule with the same params. Break the "
            "cycle by changing the params of one of the Gets."
        )


class NoSuchQueryError(RuleworkError, LookupError):
    """A request named an output type and params for which no `QueryRule` exists."""


class ProcessExecutionFailure(RuleworkError):
    """A `Process` requested as `ProcessResult` exited with a non-zero code."""

    def __init__(
        self,
        exit_code: int,
        stdout: bytes,
        stderr: bytes,
        description: str,
        *,
        environment: str = "local",
        tail_lines: int = 20,
    ) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.description = description
        self.environment = environment
        tail = stderr.decode("utf-8", "replace").splitlines()[-tail_lines:]
        rendered = "\n".join(f"  {line}" for line in tail) or "  (stderr was empty)"
        super().__init__(
            f"Process '{description}' failed with exit code {exit_code} "
            f"in environment '{environment}'.\nstderr (last {len(tail)} lines):\n{rendered}\n"
            "Request FallibleProcessResult instead of ProcessResult to handle failures yourself."
        )


class ProcessTimeout(ProcessExecutionFailure, TimeoutError):
    """A `Process` ran past its `timeout_seconds` and was killed with its process group."""


class ConfigError(RuleworkError, ValueError):
    """A configuration file, environment variable or flag is invalid.

    `problems` are `(key_path, message)` pairs; all of a file's problems are reported at once.
    """

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = tuple(problems)
        lines = "\n".join(f"  {msg} @ {path}" for path, msg in self.problems)
        count = len(self.problems)
        super().__init__(
            f"Invalid rulework configuration in {source} "
            f"({count} problem{'s' if count != 1 else ''}):\n{lines}"
        )


class CacheError(RuleworkError):
    """A cache backend failed in a way the engine could not degrade around."""


class CacheBackendError(CacheError):
    """A cache backend's storage or service failed (translated at the backend boundary)."""


class StoreError(RuleworkError):
    """A digest, path or blob in the content-addressed store is invalid or missing."""


class InvalidPathError(StoreError, ValueError):
    """A path inside a digest is absolute, contains `..` or NUL, or escapes the root."""


class MissingDigestError(StoreError, LookupError):
    """A blob named by a digest is not in the store (or was corrupt and has been evicted)."""


class ExecutorError(RuleworkError):
    """A process executor could not run a Process (not a non-zero exit: an infrastructure fault)."""


__all__ = [
    "CacheBackendError",
    "CacheError",
    "ConfigError",
    "CycleError",
    "ExecutorError",
    "InvalidPathError",
    "MissingDigestError",
    "NoSuchQueryError",
    "ProcessExecutionFailure",
    "ProcessTimeout",
    "RuleDefinitionError",
    "RuleGraphError",
    "RuleworkError",
    "StoreError",
]
