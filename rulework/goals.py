"""Goals: the entry points `rulework run MODULE:GOAL [ARGS...]` runs.

A goal is an `async def` decorated with `@goal` in a user module. It receives a `GoalContext`
(the engine, an open session, an output channel) and, optionally, its command-line arguments
parsed into a frozen dataclass that the goal declares by annotation. It does what rules must
not: print, write files, commit to a database. It returns an exit code (None means 0).

The module also says which rules its engine has, with a module-level `rules()` function
(without one, the module's `@rule` functions are collected). Example::

    @dataclass(frozen=True)
    class GreetArgs:
        \"\"\"Attributes:
            name: who to greet.
            times: how many times.
        \"\"\"

        name: str
        times: int = 1

    def rules() -> list[object]:
        return [*collect_rules(), QueryRule(Greeting, (Person,))]

    @goal
    async def greet(ctx: GoalContext, args: GreetArgs) -> int:
        greeting = await ctx.session.get(Greeting, Person(args.name))
        for _ in range(args.times):
            ctx.print(greeting.text)
        return 0

and on the command line: `rulework run greet.py:greet Ada --times 2`.

Argument fields map to options by their annotation: `str`, `int`, `float`, `pathlib.Path`,
`bool` (`--flag/--no-flag`), `Literal[...]` and `enum.Enum` (choices), `tuple[X, ...]` (one or
more values, also comma-separated), and `X | None`. A field without a default is a positional
argument. Help texts come from `field(metadata={"help": ...})` or from the dataclass
docstring's `Attributes:` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import os
import re
import types
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import trio

from .engine.errors import RuleDefinitionError, RuleworkError
from .engine.fs import Digest

if TYPE_CHECKING:
    from .engine.engine import Engine
    from .engine.scheduler import Session

__all__ = [
    "GoalArgumentError",
    "GoalContext",
    "GoalDefinitionError",
    "GoalInfo",
    "goal",
    "goal_info",
    "goals_of",
]

_GOAL_ATTR = "__rulework_goal__"
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


class GoalDefinitionError(RuleDefinitionError):
    """A `@goal` function or its arguments dataclass is malformed."""


class GoalArgumentError(RuleworkError, ValueError):
    """The command-line arguments given to a goal are invalid (the message says how)."""


@dataclass(frozen=True, slots=True, eq=False)
class GoalContext:
    """What a goal runs with.

    Attributes:
        engine: the Engine built from the module's rules.
        session: an open session of that engine; request values with `session.get(...)`.
        output: where `print` writes (the CLI routes it above the progress display).
    """

    engine: Engine
    session: Session
    output: Callable[[str], None]

    @property
    def root(self) -> Path:
        """The workspace root: `PathGlobs` and `workspace_path` are relative to it."""
        return self.engine.root

    def print(self, *objects: object, sep: str = " ") -> None:
        """Print one line of the goal's output (stdout)."""
        self.output(sep.join(str(o) for o in objects))

    def workspace_path(self, path: str | os.PathLike[str]) -> str:
        """`path` (absolute, or relative to the working directory) relative to the workspace
        root, as `PathGlobs` wants it.

        Raises:
            GoalArgumentError: the path is outside the workspace root.
        """
        absolute = Path(os.path.abspath(path))
        try:
            relative = absolute.relative_to(self.root)
        except ValueError:
            raise GoalArgumentError(
                f"{os.fspath(path)!r} is outside the workspace root {self.root}; rules only read "
                "files under the root. Run from a directory that contains it, or pass --root."
            ) from None
        text = relative.as_posix()
        return "" if text == "." else text

    async def write_digest(self, digest: Digest, dest: str | os.PathLike[str]) -> tuple[Path, ...]:
        """Write the files of `digest` under the directory `dest`, replacing existing files
        (each atomically: written to a temporary name, then renamed). Returns the paths.
        """
        contents = await self.session.services.store.contents(digest)
        base = Path(dest)

        def write_all() -> tuple[Path, ...]:
            written: list[Path] = []
            for entry in contents:
                target = base / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                temp = target.with_name(f".{target.name}.rulework-tmp")
                temp.write_bytes(entry.content)
                if entry.is_executable:
                    temp.chmod(0o755)
                temp.replace(target)
                written.append(target)
            return tuple(written)

        return await trio.to_thread.run_sync(write_all)


@dataclass(frozen=True, slots=True, eq=False)
class GoalInfo:
    """A goal found on a function decorated with `@goal`."""

    name: str
    func: Callable[..., Awaitable[int | None]]
    help: str

    @property
    def module(self) -> str:
        return str(getattr(self.func, "__module__", "?"))

    def arguments_type(self) -> type[Any] | None:
        """The dataclass the goal's arguments are parsed into (None: the goal takes none).

        Raises:
            GoalDefinitionError: the signature is not `(ctx: GoalContext[, args: Dataclass])`,
                or a field of the dataclass has a type the command line cannot give.
        """
        params = list(inspect.signature(self.func).parameters.values())
        if not params or len(params) > 2:
            raise self._problem(
                f"takes {len(params)} parameters; a goal takes `(ctx: GoalContext)` or "
                "`(ctx: GoalContext, args: YourArgs)` where YourArgs is a frozen dataclass"
            )
        for param in params:
            if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                raise self._problem(f"parameter `{param.name}` must be a plain positional one")
        if len(params) == 1:
            return None
        try:
            hints = typing.get_type_hints(self.func)
        except Exception as exc:  # a name in an annotation that does not resolve
            raise self._problem(f"its annotations cannot be resolved: {exc}") from exc
        args_type = hints.get(params[1].name)
        if args_type is None:
            raise self._problem(
                f"parameter `{params[1].name}` has no annotation; annotate it with the frozen "
                "dataclass its command-line arguments are parsed into"
            )
        if not (isinstance(args_type, type) and dataclasses.is_dataclass(args_type)):
            raise self._problem(
                f"parameter `{params[1].name}` is annotated {_type_name(args_type)}, which is not "
                "a dataclass; annotate it with a frozen dataclass whose fields are the options"
            )
        _fields_of(args_type, self)  # validates every field now
        return args_type

    def parser(self, prog: str) -> argparse.ArgumentParser:
        """An argument parser for the goal's arguments."""
        parser = argparse.ArgumentParser(prog=prog, description=self.help or None)
        args_type = self.arguments_type()
        if args_type is not None:
            for spec in _fields_of(args_type, self):
                spec.add_to(parser)
        return parser

    def parse_arguments(self, argv: Sequence[str], prog: str) -> Any:
        """The goal's arguments dataclass built from `argv` (None if it takes none).

        argparse prints usage and raises SystemExit(2) for a malformed command line (and
        SystemExit(0) after `--help`).

        Raises:
            GoalArgumentError: the dataclass rejected the values (its `__post_init__` raised).
        """
        parser = self.parser(prog)
        namespace = parser.parse_args(list(argv))
        args_type = self.arguments_type()
        if args_type is None:
            return None
        values = {
            spec.name: spec.convert(getattr(namespace, spec.name))
            for spec in _fields_of(args_type, self)
        }
        try:
            return args_type(**values)
        except (ValueError, TypeError) as exc:
            raise GoalArgumentError(f"Invalid arguments for goal `{self.name}`: {exc}") from exc

    def _problem(self, message: str) -> GoalDefinitionError:
        return GoalDefinitionError(f"Goal `{self.name}` ({_location(self.func)}) {message}.")


@overload
def goal(func: _F, /) -> _F: ...
@overload
def goal(*, name: str | None = None, help: str | None = None) -> Callable[[_F], _F]: ...
def goal(
    func: _F | None = None, /, *, name: str | None = None, help: str | None = None
) -> _F | Callable[[_F], _F]:
    """Mark an `async def` as a goal that `rulework run MODULE:GOAL` can run.

    Args:
        name: the goal's name on the command line (default: the function name, with `_`
            written as `-` also accepted).
        help: the description `--help` shows (default: the docstring's first paragraph).

    Raises:
        GoalDefinitionError: the function is not an `async def`.
    """

    def decorate(f: _F) -> _F:
        is_async = inspect.iscoroutinefunction(f)  # (no narrowing: `f` stays an _F)
        if not is_async:
            raise GoalDefinitionError(
                f"@goal decorates an `async def`; `{getattr(f, '__qualname__', f)}` "
                f"({_location(f)}) is not one. Write `async def {getattr(f, '__name__', 'goal')}"
                "(ctx: GoalContext, ...)`."
            )
        doc = inspect.getdoc(f) or ""
        info = GoalInfo(
            name=name or f.__name__,
            func=f,
            help=help if help is not None else doc.split("\n\n", 1)[0].strip(),
        )
        setattr(f, _GOAL_ATTR, info)
        return f

    if func is not None:
        return decorate(func)
    return decorate


def goal_info(value: object) -> GoalInfo | None:
    """The GoalInfo of a `@goal` function, else None."""
    if not callable(value) or isinstance(value, type):
        return None
    try:
        info = getattr(value, _GOAL_ATTR, None)
    except Exception:  # an object with a hostile __getattr__ is not a goal
        return None
    return info if isinstance(info, GoalInfo) else None


def goals_of(module: types.ModuleType) -> dict[str, GoalInfo]:
    """The goals defined in `module` (not those it imported), by name, in definition order."""
    found: dict[str, GoalInfo] = {}
    for value in vars(module).values():
        info = goal_info(value)
        if info is not None and info.module == module.__name__:
            found.setdefault(info.name, info)
    return found


def find_goal(goals: dict[str, GoalInfo], name: str) -> GoalInfo | None:
    """The goal called `name`, accepting `-` for `_` and the reverse."""
    if name in goals:
        return goals[name]
    for candidate in (name.replace("-", "_"), name.replace("_", "-")):
        if candidate in goals:
            return goals[candidate]
    return None


# ----------------------------------------------------------------------------------------------
# Arguments from a dataclass


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    """How one dataclass field is given on the command line."""

    name: str
    kind: Literal["scalar", "bool", "many"]
    parse: Callable[[str], Any]
    default: Any
    required: bool
    help: str | None
    choices: tuple[str, ...] | None
    metavar: str

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        help_text = self.help or ""
        if self.choices:
            help_text = f"{help_text} (one of: {', '.join(self.choices)})".strip()
        if self.required:
            parser.add_argument(
                self.name,
                metavar=self.name.upper(),
                type=self._argparse_type(),
                nargs="+" if self.kind == "many" else None,
                help=help_text or None,
            )
            return
        flag = "--" + self.name.replace("_", "-")
        if self.kind == "bool":
            parser.add_argument(
                flag,
                dest=self.name,
                action=argparse.BooleanOptionalAction,
                default=self.default,
                help=help_text or None,
            )
            return
        if self.default is not None:
            help_text = f"{help_text} (default: {_default_text(self.default)})".strip()
        parser.add_argument(
            flag,
            dest=self.name,
            metavar=self.metavar,
            type=self._argparse_type(),
            nargs="+" if self.kind == "many" else None,
            default=self.default,
            help=help_text or None,
        )

    def _argparse_type(self) -> Callable[[str], Any]:
        parse, choices, label = self.parse, self.choices, self.metavar

        def convert(text: str) -> Any:
            if self.kind == "many":
                return [_one(item) for item in text.split(",") if item.strip()]
            return _one(text)

        def _one(text: str) -> Any:
            text = text.strip()
            if choices is not None and text not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {text!r} (choose from {', '.join(choices)})"
                )
            try:
                return parse(text)
            except (ValueError, TypeError):
                raise argparse.ArgumentTypeError(f"expected {label}, got {text!r}") from None

        convert.__name__ = label  # argparse names the type in its messages
        return convert

    def convert(self, value: Any) -> Any:
        """The parsed namespace value as the field's value."""
        if self.kind == "many" and isinstance(value, list | tuple):
            flat: list[Any] = []
            for item in value:
                flat.extend(item if isinstance(item, list) else [item])
            return tuple(flat)
        return value


def _fields_of(args_type: type[Any], info: GoalInfo) -> list[_FieldSpec]:
    try:
        hints = typing.get_type_hints(args_type)
    except Exception as exc:  # a name in an annotation that does not resolve
        raise info._problem(
            f"has arguments type {args_type.__qualname__} whose annotations cannot be "
            f"resolved: {exc}"
        ) from exc
    docs = _attribute_docs(args_type)
    specs: list[_FieldSpec] = []
    for f in dataclasses.fields(args_type):
        if not f.init:
            continue
        tp = hints[f.name]
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        help_text = f.metadata.get("help") or docs.get(f.name)
        try:
            specs.append(_spec(f.name, tp, default, required, help_text))
        except _Unsupported as exc:
            raise info._problem(
                f"has argument field `{args_type.__qualname__}.{f.name}` of type "
                f"{_type_name(tp)}, which the command line cannot give ({exc}); use str, int, "
                "float, bool, pathlib.Path, a Literal, an Enum, tuple[X, ...] or X | None"
            ) from None
    return specs


class _Unsupported(Exception):
    pass


def _spec(name: str, tp: Any, default: Any, required: bool, help_text: str | None) -> _FieldSpec:
    inner, optional = _optional(tp)
    if optional and required:
        raise _Unsupported("an optional field needs a default")
    if inner is bool:
        if required:
            raise _Unsupported("a bool field needs a default (it becomes --flag/--no-flag)")
        return _FieldSpec(name, "bool", bool, default, False, help_text, None, "BOOL")
    origin = typing.get_origin(inner)
    if origin is tuple:
        args = typing.get_args(inner)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise _Unsupported("only variable-length tuple[X, ...] is supported")
        parse, choices, metavar = _scalar(args[0])
        return _FieldSpec(name, "many", parse, default, required, help_text, choices, metavar)
    parse, choices, metavar = _scalar(inner)
    # argparse keeps a non-string default as it is (it converts only string defaults).
    return _FieldSpec(name, "scalar", parse, default, required, help_text, choices, metavar)


def _default_text(value: object) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple | list):
        return ",".join(_default_text(v) for v in value)
    return str(value)


def _scalar(tp: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None, str]:
    if tp is str:
        return str, None, "TEXT"
    if tp is int:
        return int, None, "INT"
    if tp is float:
        return float, None, "NUMBER"
    if tp is Path:
        return Path, None, "PATH"
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
        if not all(isinstance(v, str) for v in values):
            raise _Unsupported("only Literals of strings are supported")
        return str, tuple(values), "CHOICE"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        members = list(tp)
        if not all(isinstance(m.value, str) for m in members):
            raise _Unsupported("only Enums with string values are supported")
        by_value = {m.value: m for m in members}
        return by_value.__getitem__, tuple(by_value), "CHOICE"
    raise _Unsupported("unsupported type")


def _optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise _Unsupported("unions other than `X | None` are not supported")
    return tp, False


_ATTRIBUTE_LINE = re.compile(r"^\s{2,}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$")


def _attribute_docs(cls: type[Any]) -> dict[str, str]:
    """Field descriptions from a Google-style `Attributes:` section of the class docstring."""
    doc = inspect.getdoc(cls) or ""
    if cls.__doc__ is None or doc.startswith(f"{cls.__name__}("):
        return {}  # dataclasses make up a docstring from the signature
    found: dict[str, str] = {}
    in_section = False
    current: str | None = None
    for line in doc.splitlines():
        if line.strip() in ("Attributes:", "Args:", "Arguments:"):
            in_section, current = True, None
            continue
        if not in_section:
            continue
        if line and not line[0].isspace():
            in_section, current = False, None
            continue
        match = _ATTRIBUTE_LINE.match(line)
        if match and len(line) - len(line.lstrip()) <= 4:
            current = match.group(1)
            found[current] = match.group(2).strip()
        elif current is not None and line.strip():
            found[current] = f"{found[current]} {line.strip()}".strip()
    return found


def _type_name(tp: object) -> str:
    name = getattr(tp, "__qualname__", None)
    return name if isinstance(name, str) and typing.get_origin(tp) is None else repr(tp)


def _location(func: object) -> str:
    code = getattr(func, "__code__", None)
    if code is None:
        return "unknown location"
    return f"{code.co_filename}:{code.co_firstlineno}"
