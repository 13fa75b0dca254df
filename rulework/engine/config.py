"""Configuration: `rulework.toml` (or `[tool.rulework]` in `pyproject.toml`), environment
variables and command-line overrides, structured strictly into frozen dataclasses.

```toml
[cache]
dir = "~/.cache/rulework"   # relative paths in a file are relative to that file
local = "sqlite"            # "none" or an installed cache backend: memory, sqlite, ...
remote = "none"             # "none" or an installed cache backend: s3, ...
salt = ""                   # mixed into every cache key: change it to start afresh

[cache.s3]                  # settings of a backend: that backend's `config_type`
bucket = "rulework-cache"

[execution]
default_environment = "local"

[environments.local]        # the `local` environment exists even when not written
kind = "local"              # an installed executor: local, ssh, container, or a plugin's
parallelism = 8             # the rest: that kind's `config_type`
```

Precedence, lowest first: defaults, the file, environment variables, `overrides`.

Environment variables (the whole mapping; any other `RULEWORK_CACHE_*` or
`RULEWORK_EXECUTION_*` variable is an error, so that a typo does not pass silently):

| variable                                 | key                             |
| ---------------------------------------- | ------------------------------- |
| `RULEWORK_CONFIG`                        | the config file to read (when no path is given) |
| `RULEWORK_CACHE_DIR`                     | `cache.dir`                     |
| `RULEWORK_CACHE_LOCAL`                   | `cache.local`                   |
| `RULEWORK_CACHE_REMOTE`                  | `cache.remote`                  |
| `RULEWORK_CACHE_SALT`                    | `cache.salt`                    |
| `RULEWORK_EXECUTION_DEFAULT_ENVIRONMENT` | `execution.default_environment` |

`overrides` (the CLI's `--set key=value`) set any key by its dotted path, e.g.
`{"cache.remote": "none", "environments.local.parallelism": "4"}`. Their string values are
converted to the key's type: integers and floats as written, booleans as true/false (also
1/0, yes/no, on/off), lists as comma-separated items or a TOML array (`["A", "B"]`), "none"
for an optional value that should be unset.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import json
import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cattrs
import platformdirs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from .errors import ConfigError
from .process import FrozenDict
from .registry import (
    BackendLoadError,
    UnknownBackendError,
    available_cache_backends,
    available_executors,
    cache_backend_class,
    executor_class,
)

#: Environment variables and the key each one sets.
ENV_VARS: Mapping[str, str] = FrozenDict(
    {
        "RULEWORK_CACHE_DIR": "cache.dir",
        "RULEWORK_CACHE_LOCAL": "cache.local",
        "RULEWORK_CACHE_REMOTE": "cache.remote",
        "RULEWORK_CACHE_SALT": "cache.salt",
        "RULEWORK_EXECUTION_DEFAULT_ENVIRONMENT": "execution.default_environment",
    }
)
CONFIG_FILE_VAR = "RULEWORK_CONFIG"
_CHECKED_ENV_PREFIXES = ("RULEWORK_CACHE_", "RULEWORK_EXECUTION_")

DEFAULTS_SOURCE = "<defaults>"
_DEFAULT = "default"

Problems = list[tuple[str, str]]


def default_cache_dir() -> Path:
    """The user cache directory for rulework (per `platformdirs`)."""
    return Path(platformdirs.user_cache_dir("rulework"))


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """`[cache]`: where the caches live and which backends serve them.

    `backends` holds the settings (each an instance of the backend's `config_type`) of every
    backend that has a `[cache.NAME]` table or is selected as `local` / `remote`.
    """

    dir: Path = field(default_factory=default_cache_dir)
    local: str = "sqlite"
    remote: str = "none"
    salt: str = ""
    backends: FrozenDict[str, Any] = field(default_factory=FrozenDict)

    def settings(self, name: str) -> Any:
        """The settings of cache backend `name` (its `config_type` defaults if not configured)."""
        found = self.backends.get(name)
        if found is None:
            found = cache_backend_class(name).config_type()
        return found


@dataclass(frozen=True, slots=True)
class ExecutionConfig:
    """`[execution]`: the environment of a Process that names none."""

    default_environment: str = "local"


@dataclass(frozen=True, slots=True)
class EnvironmentConfig:
    """`[environments.NAME]`: a named environment, its executor kind and that kind's settings
    (an instance of the executor class's `config_type`)."""

    name: str
    kind: str
    settings: Any


def _default_local_environment() -> EnvironmentConfig:
    return EnvironmentConfig("local", "local", executor_class("local").config_type())


def _default_environments() -> FrozenDict[str, EnvironmentConfig]:
    return FrozenDict({"local": _default_local_environment()})


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Build it with `load_config`; `Config()` is the defaults.

    `source` names the file read (or "<defaults>"); `origins` maps dotted key paths to where
    their values came from (the file, "env RULEWORK_...", "override"); keys not in it have
    their default value.
    """

    cache: CacheConfig = field(default_factory=CacheConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    environments: FrozenDict[str, EnvironmentConfig] = field(default_factory=_default_environments)
    source: str = DEFAULTS_SOURCE
    origins: FrozenDict[str, str] = field(default_factory=FrozenDict)

    def environment(self, name: str | None = None) -> EnvironmentConfig:
        """The environment `name` (the default environment for None).

        Raises:
            ConfigError: no environment of that name is configured (lists the configured ones).
        """
        name = self.execution.default_environment if name is None else name
        try:
            return self.environments[name]
        except KeyError:
            raise ConfigError(
                self.source,
                [(f"environments.{name}", _unknown_environment_message(name, self.environments))],
            ) from None

    def origin(self, key: str) -> str:
        """Where the value of the dotted `key` came from: a file path, "env VAR", "override
        key=value" or "default"."""
        return self.origins.get(key, _DEFAULT)

    def describe(self) -> list[str]:
        """Every setting as `key = value  # origin` lines (what `rulework config` prints)."""
        lines: list[str] = []

        def emit(key: str, value: object) -> None:
            lines.append(f"{key} = {_render(value)}  # {self.origin(key)}")

        for name in ("dir", "local", "remote", "salt"):
            emit(f"cache.{name}", getattr(self.cache, name))
        for backend, settings in sorted(self.cache.backends.items()):
            for key, value in _flatten(f"cache.{backend}", settings):
                emit(key, value)
        emit("execution.default_environment", self.execution.default_environment)
        for name, env in sorted(self.environments.items()):
            emit(f"environments.{name}.kind", env.kind)
            for key, value in _flatten(f"environments.{name}", env.settings):
                emit(key, value)
        return lines


def _flatten(prefix: str, value: object) -> list[tuple[str, object]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items: list[tuple[str, object]] = []
        for f in dataclasses.fields(value):
            items.extend(_flatten(f"{prefix}.{f.name}", getattr(value, f.name)))
        return items
    return [(prefix, value)]


def _render(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _render(value.value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, tuple | list | frozenset):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_render(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- finding and reading the file -----------------------------------------------------------


def find_config_file(cwd: Path) -> Path | None:
    """The config file that applies in `cwd`: the nearest `rulework.toml`, or `pyproject.toml`
    with a `[tool.rulework]` table, from `cwd` upwards (`rulework.toml` wins in one directory)."""
    for directory in (cwd, *cwd.parents):
        candidate = directory / "rulework.toml"
        if candidate.is_file():
            return candidate
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and "rulework" in _read_toml(pyproject).get("tool", {}):
            return pyproject
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), [("", "the file does not exist")]) from None
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read the file: {exc.strerror}")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [("", f"not valid TOML: {exc}")]) from exc


def _read_config_table(path: Path) -> dict[str, Any]:
    data = _read_toml(path)
    if path.name != "pyproject.toml":
        return data
    tool = data.get("tool", {})
    table = tool.get("rulework") if isinstance(tool, dict) else None
    if table is None:
        raise ConfigError(str(path), [("tool.rulework", "the file has no [tool.rulework] table")])
    if not isinstance(table, dict):
        raise ConfigError(str(path), [("tool.rulework", "must be a table")])
    return table


# --- strict structuring ---------------------------------------------------------------------


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _found(value: object) -> str:
    return f"found {_toml_type(value)} {value!r}"


class _LeafProblems(Exception):
    """Problems below one value, as (relative key path, message) pairs."""

    def __init__(self, problems: list[tuple[tuple[str, ...], str]]) -> None:
        super().__init__(problems)
        self.problems = problems


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _is_sequence(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return len(args) == 2 and args[1] is Ellipsis
    return origin in (list, frozenset, set, collections.abc.Sequence, collections.abc.Set)


def _make_converter(base_dir: Path | None) -> cattrs.Converter:
    """A converter that accepts only values of exactly the declared TOML types.

    cattrs' default hooks coerce (`str(5)`, `int("8")`); a config must not silently accept a
    quoted number or a bare number for a name. Relative paths resolve against `base_dir` (the
    config file's directory), `~` against the home directory.
    """
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=True)

    def strict(expected: type, label: str) -> Callable[[Any, Any], Any]:
        def hook(value: Any, _: Any) -> Any:
            if isinstance(value, bool) and expected is not bool:
                raise _LeafProblems([((), f"expected {label}, {_found(value)}")])
            if not isinstance(value, expected):
                raise _LeafProblems([((), f"expected {label}, {_found(value)}")])
            return value

        return hook

    conv.register_structure_hook(str, strict(str, "a string"))
    conv.register_structure_hook(bool, strict(bool, "a boolean (true or false)"))
    conv.register_structure_hook(int, strict(int, "an integer"))

    def float_hook(value: Any, _: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _LeafProblems([((), f"expected a number, {_found(value)}")])
        return float(value)

    conv.register_structure_hook(float, float_hook)

    def path_hook(value: Any, _: Any) -> Path:
        if not isinstance(value, str | Path):
            raise _LeafProblems([((), f"expected a path (a string), {_found(value)}")])
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path

    conv.register_structure_hook(Path, path_hook)

    def literal_hook(value: Any, tp: Any) -> Any:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(
            isinstance(a, bool) for a in allowed
        ):
            options = ", ".join(json.dumps(a) for a in allowed)
            raise _LeafProblems([((), f"expected one of {options}, {_found(value)}")])
        return value

    conv.register_structure_hook_func(_is_literal, literal_hook)

    def enum_hook(value: Any, tp: Any) -> Any:
        try:
            return tp(value)
        except ValueError:
            options = ", ".join(json.dumps(m.value) for m in tp)
            raise _LeafProblems([((), f"expected one of {options}, {_found(value)}")]) from None

    conv.register_structure_hook_func(
        lambda tp: isinstance(tp, type) and issubclass(tp, enum.Enum), enum_hook
    )

    def sequence_hook(value: Any, tp: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _LeafProblems([((), f"expected an array, {_found(value)}")])
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items: list[Any] = []
        problems: list[tuple[tuple[str, ...], str]] = []
        for index, item in enumerate(value):
            try:
                items.append(conv.structure(item, item_type))
            except Exception as exc:  # every problem is reported with its path
                problems.extend(((str(index), *p), m) for p, m in _problems_of(exc))
        if problems:
            raise _LeafProblems(problems)
        origin = typing.get_origin(tp)
        if origin in (list,):
            return items
        if origin in (frozenset, collections.abc.Set):
            return frozenset(items)
        if origin is set:
            return set(items)
        return tuple(items)

    conv.register_structure_hook_func(_is_sequence, sequence_hook)
    return conv


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    candidates = sorted(candidates)
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    allowed = ", ".join(candidates) if candidates else "(none)"
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}allowed: {allowed}"


def _problems_of(exc: BaseException) -> list[tuple[tuple[str, ...], str]]:
    """Every problem in a (cattrs) structuring exception, with its relative key path."""
    if isinstance(exc, _LeafProblems):
        return exc.problems
    if isinstance(exc, ConfigError):
        # A config_type's own validation: its key paths are already complete.
        return [((f"\0{path}",), message) for path, message in exc.problems]
    if isinstance(exc, ClassValidationError | IterableValidationError):
        found: list[tuple[tuple[str, ...], str]] = []
        for sub in exc.exceptions:
            step: tuple[str, ...] = ()
            for note in getattr(sub, "__notes__", ()):
                if isinstance(note, cattrs.AttributeValidationNote):
                    step = (note.name,)
                elif isinstance(note, cattrs.IterableValidationNote):
                    step = (str(note.index),)
            if isinstance(sub, KeyError) and step:
                found.append((step, "missing required key"))
                continue
            found.extend(((*step, *p), m) for p, m in _problems_of(sub))
        return found
    if isinstance(exc, ForbiddenExtraKeysError):
        fields = (
            [f.name for f in dataclasses.fields(exc.cl)] if dataclasses.is_dataclass(exc.cl) else []
        )
        return [
            ((key,), f"unknown key; {_did_you_mean(key, fields)}")
            for key in sorted(exc.extra_fields)
        ]
    message = str(exc) or type(exc).__name__
    return [((), message)]


def _join(prefix: str, path: tuple[str, ...]) -> str:
    if path and path[0].startswith("\0"):
        return path[0][1:]
    return ".".join((prefix, *path)) if prefix else ".".join(path)


# --- overrides ------------------------------------------------------------------------------


def _optional_inner(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            rest = [a for a in args if a is not type(None)]
            return (rest[0] if len(rest) == 1 else Any), True
    return tp, False


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert_override(text: str, tp: Any, cwd: Path) -> Any:
    """Convert the string `text` to a value of type `tp` (as TOML would have given it).

    Raises ValueError with a message saying what was expected.
    """
    inner, optional = _optional_inner(tp)
    if optional and text.strip().lower() in ("none", ""):
        return None
    tp = inner
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"expected a boolean (true or false), found {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, found {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, found {text!r}") from None
    if tp is Path:
        path = Path(text).expanduser()
        return str(path if path.is_absolute() else cwd / path)
    if _is_sequence(tp):
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                return tomllib.loads(f"v = {stripped}")["v"]
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"expected a TOML array, found {text!r}: {exc}") from None
        return [item.strip() for item in stripped.split(",") if item.strip()]
    if tp is str or _is_literal(tp) or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return text
    # Anything else (a table, an untyped field): read it as a TOML value when it is one.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _field_type(cls: Any, name: str) -> Any:
    if not dataclasses.is_dataclass(cls):
        return None
    try:
        return typing.get_type_hints(cls).get(name)
    except Exception:  # an unresolvable annotation: fall back to TOML
        return None


def _settings_type(group: Literal["executor", "cache"], name: object) -> Any:
    if not isinstance(name, str):
        return None
    try:
        cls = executor_class(name) if group == "executor" else cache_backend_class(name)
    except (UnknownBackendError, BackendLoadError):
        return None
    return cls.config_type


def _override_type(raw: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The declared type of the key at `path`, or None when unknown."""
    match path:
        case ("cache", name) if name in CacheConfig.__dataclass_fields__ and name != "backends":
            return _field_type(CacheConfig, name)
        case ("cache", backend, key):
            return _field_type(_settings_type("cache", backend), key)
        case ("execution", key):
            return _field_type(ExecutionConfig, key)
        case ("environments", _, "kind"):
            return str
        case ("environments", env_name, key):
            env = raw.get("environments", {})
            section = env.get(env_name, {}) if isinstance(env, dict) else {}
            kind = section.get("kind") if isinstance(section, dict) else None
            if kind is None and env_name == "local":
                kind = "local"
            return _field_type(_settings_type("executor", kind), key)
    return None


def _apply_override(
    raw: dict[str, Any],
    key: str,
    text: str,
    origin: str,
    origins: dict[str, str],
    problems: Problems,
    cwd: Path,
) -> None:
    path = tuple(key.split("."))
    if not key or any(not part for part in path):
        problems.append((key, f"not a dotted key path ({origin})"))
        return
    tp = _override_type(raw, path)
    try:
        value = text if tp is None else _convert_override(text, tp, cwd)
    except ValueError as exc:
        problems.append((key, f"{exc} ({origin})"))
        return
    table = raw
    for depth, part in enumerate(path[:-1]):
        nxt = table.setdefault(part, {})
        if not isinstance(nxt, dict):
            problems.append(
                (".".join(path[: depth + 1]), f"is not a table, so {key} cannot be set ({origin})")
            )
            return
        table = nxt
    table[path[-1]] = value
    origins[key] = origin


def _leaf_paths(prefix: str, table: Mapping[str, Any]) -> Iterable[str]:
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            yield from _leaf_paths(path, value)
        else:
            yield path


# --- building the Config --------------------------------------------------------------------


def _unknown_environment_message(name: str, environments: Iterable[str]) -> str:
    return (
        f"no environment named {name!r} is configured; {_did_you_mean(name, environments)}. "
        f"Add an [environments.{name}] table, or name a configured one."
    )


class _Builder:
    """Structures a raw config table section by section, collecting every problem."""

    def __init__(self, raw: dict[str, Any], base_dir: Path | None, origins: Mapping[str, str]):
        self.raw = raw
        self.conv = _make_converter(base_dir)
        self.origins = origins
        self.problems: Problems = []

    def problem(self, path: str, message: str) -> None:
        origin = self.origins.get(path)
        if origin is not None and (origin.startswith("env ") or origin.startswith("override")):
            message = f"{message} (set by {origin})"
        self.problems.append((path, message))

    def table(self, path: str, value: object) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.problem(path, f"expected a table, {_found(value)}")
            return None
        return value

    def structure(self, path: str, data: dict[str, Any], cls: type[Any]) -> Any:
        try:
            return self.conv.structure(data, cls)
        except Exception as exc:  # each problem is reported with its key path
            for rel, message in _problems_of(exc):
                self.problem(_join(path, rel), message)
            return None

    def build(self, source: str) -> Config:
        raw = self.raw
        for key in raw:
            if key not in ("cache", "execution", "environments"):
                self.problem(
                    key,
                    f"unknown key; {_did_you_mean(key, ['cache', 'execution', 'environments'])}",
                )
        cache = self.cache(raw.get("cache", {}))
        execution_raw = self.table("execution", raw.get("execution", {}))
        execution = (
            self.structure("execution", execution_raw, ExecutionConfig)
            if execution_raw is not None
            else None
        )
        environments, names = self.environments(raw.get("environments", {}))
        if execution is not None and execution.default_environment not in names:
            self.problem(
                "execution.default_environment",
                _unknown_environment_message(execution.default_environment, names),
            )
        if self.problems or cache is None or execution is None or environments is None:
            raise ConfigError(source, self.problems)
        return Config(
            cache, execution, environments, source, FrozenDict(sorted(self.origins.items()))
        )

    def cache(self, value: object) -> CacheConfig | None:
        table = self.table("cache", value)
        if table is None:
            return None
        core_names = ("dir", "local", "remote", "salt")
        installed = available_cache_backends()
        sections: dict[str, dict[str, Any]] = {}
        for key, item in table.items():
            if key in core_names:
                continue
            if isinstance(item, dict):
                if key in installed:
                    sections[key] = item
                else:
                    self.problem(
                        f"cache.{key}",
                        f"unknown cache backend {key!r}; {_did_you_mean(key, installed)}",
                    )
            else:
                self.problem(
                    f"cache.{key}", f"unknown key; {_did_you_mean(key, [*core_names, *installed])}"
                )
        core: _CacheCore | None = self.structure(
            "cache", {k: v for k, v in table.items() if k in core_names}, _CacheCore
        )
        # Even when a core key is invalid, the selected backends are still checked, so that one
        # run reports every problem.
        selected: dict[str, str] = {}
        for role in ("local", "remote"):
            name = getattr(core, role) if core is not None else table.get(role, "none")
            if not isinstance(name, str) or name == "none":
                continue
            if name not in installed:
                self.problem(
                    f"cache.{role}",
                    f'unknown cache backend {name!r}; expected "none" or an installed '
                    f"backend: {_did_you_mean(name, installed)}",
                )
                continue
            selected[role] = name
            sections.setdefault(name, {})
        backends: dict[str, Any] = {}
        for name, section in sorted(sections.items()):
            try:
                cls = cache_backend_class(name)
            except (UnknownBackendError, BackendLoadError) as exc:
                if name in selected.values():
                    self.problem(f"cache.{name}", str(exc))
                # An unselected backend that cannot load is unused: its table is not checked.
                continue
            settings = self.structure(f"cache.{name}", section, cls.config_type)
            if settings is not None:
                backends[name] = settings
        if core is None:
            return None
        return CacheConfig(
            core.dir if core.dir is not None else default_cache_dir(),
            core.local,
            core.remote,
            core.salt,
            FrozenDict(backends),
        )

    def environments(
        self, value: object
    ) -> tuple[FrozenDict[str, EnvironmentConfig] | None, tuple[str, ...]]:
        """The environments (None if any is invalid) and the names of all of them."""
        table = self.table("environments", value)
        if table is None:
            return None, ("local",)
        names = tuple(dict.fromkeys(["local", *table]))
        result: dict[str, EnvironmentConfig] = {}
        kinds = available_executors()
        ok = True
        for name, section in table.items():
            path = f"environments.{name}"
            environment = self.environment(path, name, section, kinds)
            if environment is None:
                ok = False
            else:
                result[name] = environment
        if "local" not in table:
            result = {"local": _default_local_environment(), **result}
        return (FrozenDict(result) if ok else None), names

    def environment(
        self, path: str, name: str, value: object, kinds: tuple[str, ...]
    ) -> EnvironmentConfig | None:
        section = self.table(path, value)
        if section is None:
            return None
        kind = section.get("kind")
        if kind is None and name == "local":
            # A [environments.local] table without `kind` tunes the default local environment.
            kind = "local"
        if kind is None:
            self.problem(
                f"{path}.kind",
                f"missing required key: the executor kind, one of: {', '.join(kinds)}",
            )
            return None
        if not isinstance(kind, str):
            self.problem(f"{path}.kind", f"expected a string, {_found(kind)}")
            return None
        try:
            cls = executor_class(kind)
        except UnknownBackendError:
            self.problem(
                f"{path}.kind",
                f"unknown executor kind {kind!r}; {_did_you_mean(kind, kinds)} "
                "(a plugin's kind is available once its package is installed)",
            )
            return None
        except BackendLoadError as exc:
            self.problem(f"{path}.kind", str(exc))
            return None
        settings = self.structure(
            path, {k: v for k, v in section.items() if k != "kind"}, cls.config_type
        )
        return None if settings is None else EnvironmentConfig(name, kind, settings)


@dataclass(frozen=True, slots=True)
class _CacheCore:
    dir: Path | None = None
    local: str = "sqlite"
    remote: str = "none"
    salt: str = ""


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | Iterable[str] | None = None,
) -> Config:
    """Read, validate and structure the configuration.

    Args:
        path: The TOML file (`rulework.toml`, or a `pyproject.toml` whose `[tool.rulework]`
            table is read). None: `$RULEWORK_CONFIG`, else the nearest file from `cwd` upwards
            (see `find_config_file`), else the defaults.
        cwd: Where discovery starts and relative override paths resolve (default: os.getcwd()).
        environ: The environment variables to read (default: os.environ).
        overrides: Dotted keys set last, as `{"cache.remote": "none"}` or `["cache.remote=none"]`.

    Raises:
        ConfigError: anything invalid, with every problem at once (file, key path, message).

    >>> load_config(overrides={"execution.default_environment": "local"}).execution
    ExecutionConfig(default_environment='local')
    """
    cwd_path = Path(os.getcwd() if cwd is None else cwd)
    environ = os.environ if environ is None else environ
    if path is None and environ.get(CONFIG_FILE_VAR):
        path = Path(environ[CONFIG_FILE_VAR]).expanduser()
    file = Path(path) if path is not None else find_config_file(cwd_path)
    if file is None:
        return _build({}, DEFAULTS_SOURCE, None, None, cwd_path, environ, overrides)
    file = file if file.is_absolute() else cwd_path / file
    label = f"{file}" if file.name != "pyproject.toml" else f"{file} [tool.rulework]"
    return _build(
        _read_config_table(file), str(file), label, file.parent, cwd_path, environ, overrides
    )


def config_from_mapping(
    table: Mapping[str, Any],
    *,
    source: str = "<mapping>",
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | Iterable[str] | None = None,
) -> Config:
    """Like `load_config`, from a mapping with the TOML file's structure (relative paths in it
    resolve against `cwd`). Environment variables and `overrides` apply on top, as for a file.

    Raises:
        ConfigError: anything invalid, with every problem at once.
    """
    cwd_path = Path(os.getcwd() if cwd is None else cwd)
    environ = os.environ if environ is None else environ
    raw = _deep_copy_tables(table)
    return _build(raw, source, source, cwd_path, cwd_path, environ, overrides)


def resolve_config(config: object, *, cwd: str | os.PathLike[str] | None = None) -> Config:
    """The `Config` an `Engine(config=...)` argument stands for.

    None: discover the file from `cwd` upwards (defaults when there is none); a `str` or path:
    that TOML file; a `Config`: itself; a mapping: `config_from_mapping`.

    Raises:
        ConfigError: the configuration is invalid.
        TypeError: `config` is none of those.
    """
    if config is None:
        return load_config(cwd=cwd)
    if isinstance(config, Config):
        return config
    if isinstance(config, str | os.PathLike):
        path = Path(config)
        if not path.is_absolute() and cwd is not None:
            path = Path(cwd) / path
        return load_config(path, cwd=cwd)
    if isinstance(config, Mapping):
        return config_from_mapping(config, cwd=cwd)
    raise TypeError(
        f"config must be None, a path to a TOML file, a Config (from rulework.load_config) or "
        f"a mapping with the file's structure; got {config!r} ({type(config).__name__})"
    )


def _deep_copy_tables(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy_tables(v) if isinstance(v, Mapping) else v for k, v in table.items()}


def _build(
    raw: dict[str, Any],
    source: str,
    label: str | None,
    base_dir: Path | None,
    cwd: Path,
    environ: Mapping[str, str],
    overrides: Mapping[str, str] | Iterable[str] | None,
) -> Config:
    origins: dict[str, str] = {}
    if label is not None:
        origins.update(dict.fromkeys(_leaf_paths("", raw), label))
    problems: Problems = []
    for var, value in sorted(environ.items()):
        if var in ENV_VARS:
            _apply_override(raw, ENV_VARS[var], value, f"env {var}", origins, problems, cwd)
        elif var.startswith(_CHECKED_ENV_PREFIXES):
            problems.append(
                (var, f"unknown rulework environment variable; {_did_you_mean(var, ENV_VARS)}")
            )
    for key, value in _override_items(overrides, problems):
        _apply_override(raw, key, value, f"override {key}={value}", origins, problems, cwd)
    builder = _Builder(raw, base_dir, origins)
    builder.problems.extend(problems)
    return builder.build(source)


def _override_items(
    overrides: Mapping[str, str] | Iterable[str] | None, problems: Problems
) -> list[tuple[str, str]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for entry in overrides:
            key, sep, value = entry.partition("=")
            if not sep:
                problems.append((entry, "an override must be written key=value"))
                continue
            items.append((key.strip(), value))
    # Kinds first: the type of an environment's other keys depends on its kind.
    return sorted(items, key=lambda kv: not kv[0].endswith(".kind"))


__all__ = [
    "CONFIG_FILE_VAR",
    "ENV_VARS",
    "CacheConfig",
    "Config",
    "EnvironmentConfig",
    "ExecutionConfig",
    "config_from_mapping",
    "default_cache_dir",
    "find_config_file",
    "load_config",
    "resolve_config",
]
