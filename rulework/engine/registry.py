"""The backend registry: executors and cache backends found by name through entry points.

Every backend, built-in or third-party, is an entry point in one of two groups:

```toml
[project.entry-points."rulework.executors"]
mycloud = "mycloud_rulework:CloudExecutor"

[project.entry-points."rulework.cache_backends"]
redis = "redis_rulework:RedisCache"
```

Nothing is imported until a backend is asked for by name (`executor_class("ssh")`), so a
backend whose optional dependencies are not installed costs nothing until it is selected, and
then fails with the command that installs them. The engine never imports `rulework.backends`
directly: it only goes through here.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping
from dataclasses import dataclass, is_dataclass
from typing import TYPE_CHECKING, Any

from .errors import RuleworkError

if TYPE_CHECKING:
    from ..abc import CacheBackend, ProcessExecutor
    from .config import EnvironmentConfig

EXECUTORS_GROUP = "rulework.executors"
CACHE_BACKENDS_GROUP = "rulework.cache_backends"

_WHAT = {EXECUTORS_GROUP: "executor", CACHE_BACKENDS_GROUP: "cache backend"}

#: The extra of the `rulework` distribution that installs a built-in backend's dependencies.
_BUILTIN_EXTRAS: dict[tuple[str, str], str] = {
    (EXECUTORS_GROUP, "reapi"): "reapi",
    (CACHE_BACKENDS_GROUP, "s3"): "s3",
    (CACHE_BACKENDS_GROUP, "reapi"): "reapi",
}


class UnknownBackendError(RuleworkError, LookupError):
    """No backend of that name is registered; `available` lists the registered names."""

    def __init__(self, group: str, name: str, available: tuple[str, ...]) -> None:
        self.group = group
        self.name = name
        self.available = available
        what = _WHAT.get(group, group)
        installed = ", ".join(available) if available else "(none)"
        super().__init__(
            f"Unknown {what} {name!r}; installed: {installed}. A third-party {what} is found "
            f"once its package, which registers it under the entry-point group {group!r}, is "
            "installed in this Python environment."
        )


class BackendLoadError(RuleworkError, ImportError):
    """A registered backend could not be loaded (missing dependency, broken plugin)."""

    def __init__(self, group: str, name: str, message: str) -> None:
        self.group = group
        self.name = name
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class _Registration:
    name: str
    value: str  # "module:attr"
    distribution: str | None


# Entry points are read once per `sys.path` (a plugin put on sys.path later is then seen);
# loaded classes are kept per entry-point value.
_registrations_cache: dict[tuple[str, tuple[str, ...]], dict[str, tuple[_Registration, ...]]] = {}
_loaded: dict[tuple[str, str], type[Any]] = {}


def _registrations(group: str) -> dict[str, tuple[_Registration, ...]]:
    cache_key = (group, tuple(sys.path))
    found = _registrations_cache.get(cache_key)
    if found is not None:
        return found
    by_name: dict[str, dict[str, _Registration]] = {}
    for ep in importlib.metadata.entry_points(group=group):
        dist = ep.dist.name if ep.dist is not None else None
        # The same distribution can be seen twice (an editable install on sys.path twice):
        # only different targets under one name are a conflict.
        by_name.setdefault(ep.name, {}).setdefault(ep.value, _Registration(ep.name, ep.value, dist))
    found = {name: tuple(regs.values()) for name, regs in by_name.items()}
    _registrations_cache[cache_key] = found
    return found


def _available(group: str) -> tuple[str, ...]:
    return tuple(sorted(_registrations(group)))


def available_executors() -> tuple[str, ...]:
    """The names of every registered executor kind, sorted (nothing is imported)."""
    return _available(EXECUTORS_GROUP)


def available_cache_backends() -> tuple[str, ...]:
    """The names of every registered cache backend, sorted (nothing is imported)."""
    return _available(CACHE_BACKENDS_GROUP)


def _install_hint(group: str, reg: _Registration, missing: str | None) -> str:
    """What to do when `reg` cannot be imported; `missing` is the absent dependency's module
    (None when the backend's own module or attribute is what is missing: a broken install)."""
    package = reg.distribution or "the package that registers it"
    if missing is None:
        return f"Reinstall {package} (pip install --force-reinstall {package})"
    extra = _BUILTIN_EXTRAS.get((group, reg.name))
    if reg.distribution == "rulework" and extra is not None:
        return f"Install its dependencies with: pip install 'rulework[{extra}]'"
    return f"Install {package} with its dependencies (the module {missing!r} is missing)"


def _load(group: str, name: str) -> type[Any]:
    regs = _registrations(group).get(name)
    what = _WHAT[group]
    if not regs:
        raise UnknownBackendError(group, name, _available(group))
    if len(regs) > 1:
        listed = "; ".join(f"{r.value} (from {r.distribution or 'unknown'})" for r in regs)
        raise BackendLoadError(
            group,
            name,
            f"The {what} name {name!r} is registered more than once: {listed}. "
            "Uninstall one of those packages.",
        )
    reg = regs[0]
    cached = _loaded.get((group, reg.value))
    if cached is not None:
        return cached
    module_name, _, attr = reg.value.partition(":")
    try:
        target: Any = importlib.import_module(module_name.strip())
        for part in attr.strip().split(".") if attr.strip() else ():
            target = getattr(target, part)
    except ModuleNotFoundError as exc:
        missing = exc.name
        module = module_name.strip()
        if missing is not None and (missing == module or module.startswith(missing + ".")):
            # The backend's own module is absent: a broken install, not a missing dependency.
            missing = None
        raise BackendLoadError(
            group,
            name,
            f"The {what} {name!r} ({reg.value}) cannot be loaded: {exc}. "
            f"{_install_hint(group, reg, missing)}.",
        ) from exc
    except (ImportError, AttributeError) as exc:
        raise BackendLoadError(
            group,
            name,
            f"The {what} {name!r} ({reg.value}) cannot be loaded: {exc}. "
            f"{_install_hint(group, reg, None)}.",
        ) from exc
    config_type = getattr(target, "config_type", None)
    if not isinstance(target, type) or not (
        isinstance(config_type, type) and is_dataclass(config_type)
    ):
        raise BackendLoadError(
            group,
            name,
            f"The entry point {name!r} = {reg.value!r} in group {group!r} does not name a "
            f"{what} class with a `config_type` dataclass (see rulework.abc).",
        )
    _loaded[(group, reg.value)] = target
    return target


def executor_class(kind: str) -> type[ProcessExecutor]:
    """The `ProcessExecutor` class registered as `kind` (e.g. "local", "ssh").

    Raises:
        UnknownBackendError: nothing is registered under that name (lists the installed ones).
        BackendLoadError: it is registered but cannot be imported (says what to install).
    """
    return _load(EXECUTORS_GROUP, kind)


def cache_backend_class(name: str) -> type[CacheBackend]:
    """The `CacheBackend` class registered as `name` (e.g. "sqlite", "s3").

    Raises:
        UnknownBackendError: nothing is registered under that name (lists the installed ones).
        BackendLoadError: it is registered but cannot be imported (says what to install).
    """
    return _load(CACHE_BACKENDS_GROUP, name)


def create_executors(environments: Mapping[str, EnvironmentConfig]) -> dict[str, ProcessExecutor]:
    """One (unopened) executor per configured environment: `cls(name, settings)`.

    Raises:
        UnknownBackendError, BackendLoadError: an environment's kind cannot be loaded.
    """
    executors: dict[str, ProcessExecutor] = {}
    for name, env in environments.items():
        # The protocol cannot declare the constructor; `rulework.abc` documents it.
        cls: Any = executor_class(env.kind)
        executors[name] = cls(name, env.settings)
    return executors


__all__ = [
    "CACHE_BACKENDS_GROUP",
    "EXECUTORS_GROUP",
    "BackendLoadError",
    "UnknownBackendError",
    "available_cache_backends",
    "available_executors",
    "cache_backend_class",
    "create_executors",
    "executor_class",
]
