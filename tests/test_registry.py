"""The backend registry: built-ins and third-party plugins found through entry points."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rulework.backends.local import LocalExecutor
from rulework.engine import registry
from rulework.engine.config import load_config
from rulework.engine.process import Process, ProcessRunner
from rulework.engine.registry import (
    BackendLoadError,
    UnknownBackendError,
    available_cache_backends,
    available_executors,
    cache_backend_class,
    create_executors,
    executor_class,
)

PLUGIN_DIR = Path(__file__).parent / "data" / "plugin_executor"


@pytest.fixture
def plugin_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Put the test plugin distributions (dist-info + module, as pip installs them) on sys.path."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    yield PLUGIN_DIR
    for name in ("rulework_plugin_demo", "rulework_plugin_broken"):
        sys.modules.pop(name, None)


def test_builtins_are_registered_through_entry_points() -> None:
    assert {"local", "ssh", "container"} <= set(available_executors())
    assert {"memory", "sqlite", "s3"} <= set(available_cache_backends())
    assert available_executors() == tuple(sorted(available_executors()))


def test_executor_class_loads_the_builtin_local_executor() -> None:
    assert executor_class("local") is LocalExecutor


def test_cache_backend_class_loads_memory() -> None:
    from rulework.backends.memory import MemoryCache

    assert cache_backend_class("memory") is MemoryCache


def test_unknown_executor_lists_the_installed_ones() -> None:
    with pytest.raises(UnknownBackendError) as info:
        executor_class("nonexistent-kind")
    message = str(info.value)
    assert "'nonexistent-kind'" in message
    for name in available_executors():
        assert name in message
    assert info.value.available == available_executors()
    assert isinstance(info.value, LookupError)


def test_unknown_cache_backend_lists_the_installed_ones() -> None:
    with pytest.raises(UnknownBackendError, match=r"cache backend 'redis'.*memory"):
        cache_backend_class("redis")


def test_plugin_is_found_without_touching_rulework(plugin_path: Path) -> None:
    assert "demo" in available_executors()
    cls = executor_class("demo")
    assert cls.__module__ == "rulework_plugin_demo"
    assert cls.config_type.__name__ == "DemoConfig"


def test_plugin_disappears_with_its_path(
    plugin_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "demo" in available_executors()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(plugin_path)])
    assert "demo" not in available_executors()


def test_plugin_with_a_missing_dependency_says_what_is_missing(plugin_path: Path) -> None:
    assert "broken" in available_executors()
    with pytest.raises(BackendLoadError) as info:
        executor_class("broken")
    message = str(info.value)
    assert "rulework_plugin_missing_dependency" in message
    assert "rulework-plugin-broken" in message
    assert isinstance(info.value, ImportError)


def test_builtin_missing_dependency_hint_names_the_extra() -> None:
    reg = registry._Registration("s3", "rulework.backends.s3:S3Cache", "rulework")
    hint = registry._install_hint(registry.CACHE_BACKENDS_GROUP, reg, "boto3")
    assert "pip install 'rulework[s3]'" in hint
    # The backend's own module missing is a broken install, not a missing extra.
    assert "pip install 'rulework[s3]'" not in registry._install_hint(
        registry.CACHE_BACKENDS_GROUP, reg, None
    )


async def test_plugin_selected_from_config_runs_processes(
    plugin_path: Path, tmp_path: Path
) -> None:
    (tmp_path / "rulework.toml").write_text(
        '[cache]\nlocal = "memory"\n\n'
        '[execution]\ndefault_environment = "plug"\n\n'
        '[environments.plug]\nkind = "demo"\ngreeting = "hello from a plugin"\n'
    )
    config = load_config(cwd=tmp_path, environ={})
    env = config.environment()
    assert (env.name, env.kind) == ("plug", "demo")
    assert type(env.settings).__name__ == "DemoConfig"
    executors = create_executors(config.environments)
    assert type(executors["plug"]).__name__ == "DemoExecutor"
    assert isinstance(executors["local"], LocalExecutor)

    from rulework.backends.memory import MemoryCache
    from rulework.engine.store import Store

    async with ProcessRunner(
        executors, config.execution.default_environment, Store(MemoryCache()), None
    ) as runner:
        result = await runner.run_checked(Process(("sh", "-c", 'printf %s "$DEMO_GREETING"')))
    assert result.stdout == b"hello from a plugin"
    assert result.metadata.environment == "plug"


def test_plugin_config_is_validated_strictly(plugin_path: Path, tmp_path: Path) -> None:
    from rulework.engine.errors import ConfigError

    (tmp_path / "rulework.toml").write_text(
        '[environments.plug]\nkind = "demo"\ngreting = "typo"\nparallelism = "2"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(cwd=tmp_path, environ={})
    problems = dict(info.value.problems)
    assert "did you mean 'greeting'" in problems["environments.plug.greting"]
    assert problems["environments.plug.greeting"] == "missing required key"
    assert "expected an integer" in problems["environments.plug.parallelism"]
