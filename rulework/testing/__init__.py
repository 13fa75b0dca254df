"""Helpers for testing rules and backends.

- `run_rule_with_mocks` / `arun_rule_with_mocks`: run one rule's body with its Gets answered
  by mocks, without an engine.
- `ScriptedExecutor`: a `ProcessExecutor` that answers Processes from a script, for testing
  rules that run processes without running them.
- `MemoryCache` and `memory_store()`: an in-memory cache backend and store.
- `CacheBackendSuite`, `ProcessExecutorSuite`: conformance suites (pytest classes) that every
  built-in backend passes; subclass them in a plugin's tests. They import pytest, so they are
  loaded on first use.
"""

from __future__ import annotations

from typing import Any

from ..backends.memory import MemoryCache as MemoryCache
from ..backends.memory import MemoryCacheConfig as MemoryCacheConfig
from ..engine.store import MemoryBlobStore, Store
from ._mocks import UnmockedGetError as UnmockedGetError
from ._mocks import arun_rule_with_mocks as arun_rule_with_mocks
from ._mocks import run_rule_with_mocks as run_rule_with_mocks
from ._scripted import ScriptedExecutor as ScriptedExecutor
from ._scripted import ScriptedExecutorConfig as ScriptedExecutorConfig
from ._scripted import ScriptedResult as ScriptedResult


def memory_store() -> Store:
    """A `Store` keeping every blob in memory."""
    return Store(MemoryBlobStore())


def __getattr__(name: str) -> Any:
    if name == "CacheBackendSuite":
        from ._cache_suite import CacheBackendSuite

        return CacheBackendSuite
    if name == "CorruptHook":
        from ._cache_suite import CorruptHook

        return CorruptHook
    if name == "ProcessExecutorSuite":
        from ._executor_suite import ProcessExecutorSuite

        return ProcessExecutorSuite
    raise AttributeError(f"module 'rulework.testing' has no attribute {name!r}")


__all__ = [
    "CacheBackendSuite",
    "CorruptHook",
    "MemoryCache",
    "MemoryCacheConfig",
    "ProcessExecutorSuite",
    "ScriptedExecutor",
    "ScriptedExecutorConfig",
    "ScriptedResult",
    "UnmockedGetError",
    "arun_rule_with_mocks",
    "memory_store",
    "run_rule_with_mocks",
]
