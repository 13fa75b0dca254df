"""The rule API: `@rule`, `@rule_helper`, `Get`, `MultiGet`, `QueryRule`, unions, `collect_rules`.

A rule is an `async def` whose annotations say what it consumes and produces::

    @rule
    async def make_thumbnail(image: ImageFile, opts: ResizeOptions) -> Thumbnail:
        meta = await Get(ImageMetadata, ImageFile, image)
        ...

`@rule` validates the signature when the module is imported and attaches a `RuleInfo` to the
function (`func.__rulework_rule__`). The Gets a rule may await are found statically by reading its
source (the AST), like Pants does; the rule graph (`rulework.engine.graph`) is built from the
annotations and those Gets before anything runs.

Names used in annotations or Gets that are not defined yet when the decorator runs (a type defined
further down the module, `from __future__ import annotations` naming a local class...) are resolved
lazily, the first time the engine needs them (`collect_rules()` or building the rule graph).
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import inspect
import linecache
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from .context import get_handler_or_raise
from .errors import RuleDefinitionError

__all__ = [
    "Get",
    "GetKey",
    "GetSpec",
    "MultiGet",
    "QueryRule",
    "RuleInfo",
    "UnionMembership",
    "UnionRule",
    "collect_rules",
    "is_union",
    "rule",
    "rule_helper",
    "union",
]

_Out = TypeVar("_Out")
_T = TypeVar("_T")
_T0 = TypeVar("_T0")
_T1 = TypeVar("_T1")
_T2 = TypeVar("_T2")
_T3 = TypeVar("_T3")
_T4 = TypeVar("_T4")
_T5 = TypeVar("_T5")
_T6 = TypeVar("_T6")
_T7 = TypeVar("_T7")
_T8 = TypeVar("_T8")
_T9 = TypeVar("_T9")
_C = TypeVar("_C", bound=type)
_F = TypeVar("_F", bound=Callable[..., Coroutine[Any, Any, Any]])

#: How the engine identifies a Get: `(Out, In)` for one input type, `(Out, frozenset({A, B}))`
#: for several. A union Get `Get(Out, Base, member)` has the key `(Out, Base)`.
GetKey = tuple[type, "type | frozenset[type]"]

_RULE_ATTR = "__rulework_rule__"
_HELPER_ATTR = "__rulework_rule_helper__"
_UNION_ATTR = "__rulework_union__"


# ----------------------------------------------------------------------------------------------
# Unions


def union(cls: _C) -> _C:
    """Mark `cls` as a union base: `Get(Out, Base, member)` dispatches on the member's type.

    Members are declared with `UnionRule(Base, Member)`; a member need not subclass the base.

    Example::

        @union
        class LintRequest: ...

        rules = [*collect_rules(), UnionRule(LintRequest, PythonLintRequest)]
    """
    if not isinstance(cls, type):
        raise RuleDefinitionError(f"@union decorates classes; got {cls!r}.")
    setattr(cls, _UNION_ATTR, True)
    return cls


def is_union(tp: object) -> bool:
    """Whether `tp` was decorated with `@union` (subclasses of a union base are not unions)."""
    return isinstance(tp, type) and tp.__dict__.get(_UNION_ATTR, False) is True


@dataclass(frozen=True, slots=True)
class UnionRule:
    """Declares `member` as a member of the `@union` class `base`."""

    base: type
    member: type

    def __post_init__(self) -> None:
        if not isinstance(self.member, type):
            raise RuleDefinitionError(
                f"UnionRule({_tn(self.base)}, {self.member!r}): the member must be a class."
            )
        if not is_union(self.base):
            raise RuleDefinitionError(
                f"UnionRule({_tn(self.base)}, {_tn(self.member)}): `{_tn(self.base)}` is not a "
                f"union. Decorate it with @union (from rulework import union)."
            )


class UnionMembership:
    """Which members each `@union` base has, from the `UnionRule`s given to the engine.

    Immutable and hashable. A rule may take a `UnionMembership` parameter: the engine provides it.
    """

    __slots__ = ("_hash", "_members")

    _members: dict[type, tuple[type, ...]]
    _hash: int

    def __init__(self, members: Mapping[type, Iterable[type]] | None = None) -> None:
        frozen: dict[type, tuple[type, ...]] = {}
        for base, ms in (members or {}).items():
            frozen[base] = tuple(dict.fromkeys(ms))
        object.__setattr__(self, "_members", frozen)
        object.__setattr__(self, "_hash", hash(frozenset(frozen.items())))

    @classmethod
    def from_rules(cls, union_rules: Iterable[UnionRule]) -> UnionMembership:
        """Group `UnionRule`s by base, keeping their order (duplicates dropped)."""
        grouped: dict[type, list[type]] = {}
        for union_rule in union_rules:
            grouped.setdefault(union_rule.base, []).append(union_rule.member)
        return cls(grouped)

    def get(self, base: type) -> tuple[type, ...]:
        """The members of `base`, in declaration order (empty if it has none)."""
        return self._members.get(base, ())

    def is_member(self, base: type, member: type) -> bool:
        """Whether `member` was registered with `UnionRule(base, member)`."""
        return member in self._members.get(base, ())

    def bases(self) -> tuple[type, ...]:
        """Every union base that has at least one member."""
        return tuple(self._members)

    def items(self) -> Iterator[tuple[type, tuple[type, ...]]]:
        """`(base, members)` pairs."""
        return iter(self._members.items())

    def __contains__(self, base: object) -> bool:
        return base in self._members

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UnionMembership):
            return NotImplemented
        return self._members == other._members

    def __hash__(self) -> int:
        return self._hash

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"UnionMembership is immutable (setting {name!r})")

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{_tn(b)}: ({', '.join(_tn(m) for m in ms)})" for b, ms in self._members.items()
        )
        return f"UnionMembership({{{inner}}})"


# ----------------------------------------------------------------------------------------------
# Get and MultiGet

_NO_VALUE: Any = object()


class Get(Generic[_Out]):
    """Request a value of type `Out` computed from the given input(s), inside a rule.

    Three forms::

        await Get(Out, In, value)          # explicit input type (may be a @union base)
        await Get(Out, In(...))            # input type = the constructor's class
        await Get(Out, {a: A, b: B})       # several inputs, each with its type

    `await Get(Out, ...)` returns an `Out`. The engine finds each rule's Gets by reading its
    source, so write them literally in the rule (or in a `@rule_helper` it calls).
    """

    __slots__ = ("input_types", "inputs", "key", "output_type")

    output_type: type[_Out]
    input_types: tuple[type, ...]
    inputs: tuple[object, ...]
    key: GetKey

    @overload
    def __init__(
        self, output_type: type[_Out], input_type: type[Any], input_value: Any, /
    ) -> None: ...

    @overload
    def __init__(self, output_type: type[_Out], input_value: Any, /) -> None: ...

    def __init__(
        self, output_type: type[_Out], input_arg: Any, input_value: Any = _NO_VALUE, /
    ) -> None:
        # Hot path (every Get a rule awaits): plain checks only, no reflection.
        if not isinstance(output_type, type):
            raise RuleDefinitionError(
                f"Get's first argument must be the output type (a class); got {output_type!r}."
            )
        self.output_type = output_type
        if input_value is not _NO_VALUE:
            if not isinstance(input_arg, type):
                raise RuleDefinitionError(
                    f"Get({output_type.__name__}, {input_arg!r}, ...): in the three-argument "
                    "form the second argument must be the input type (a class)."
                )
            if not isinstance(input_value, input_arg) and not is_union(input_arg):
                raise RuleDefinitionError(
                    f"Get({output_type.__name__}, {input_arg.__name__}, value): the value "
                    f"{_short_repr(input_value)} is a {type(input_value).__qualname__}, not a "
                    f"{input_arg.__qualname__}. Pass a {input_arg.__qualname__}, or change the "
                    "declared input type."
                )
            self.input_types = (input_arg,)
            self.inputs = (input_value,)
            self.key = (output_type, input_arg)
        elif isinstance(input_arg, dict):
            self._init_many(output_type, input_arg)
        else:
            input_type = type(input_arg)
            self.input_types = (input_type,)
            self.inputs = (input_arg,)
            self.key = (output_type, input_type)

    def _init_many(self, output_type: type, by_value: dict[Any, Any]) -> None:
        if not by_value:
            raise RuleDefinitionError(
                f"Get({output_type.__name__}, {{}}): give at least one input, as "
                "{value: Type, ...}."
            )
        types_: list[type] = []
        for value, tp in by_value.items():
            if not isinstance(tp, type):
                raise RuleDefinitionError(
                    f"Get({output_type.__name__}, {{...}}): each input is written `value: Type`; "
                    f"{_short_repr(tp)} (for value {_short_repr(value)}) is not a class."
                )
            if not isinstance(value, tp) and not is_union(tp):
                raise RuleDefinitionError(
                    f"Get({output_type.__name__}, {{...}}): the value {_short_repr(value)} is a "
                    f"{type(value).__qualname__}, not the declared {tp.__qualname__}."
                )
            if tp in types_:
                raise RuleDefinitionError(
                    f"Get({output_type.__name__}, {{...}}): two inputs have the type "
                    f"{tp.__qualname__}; each input type may appear once."
                )
            types_.append(tp)
        self.input_types = tuple(types_)
        self.inputs = tuple(by_value)
        self.key = (
            (output_type, types_[0]) if len(types_) == 1 else (output_type, frozenset(types_))
        )

    def __await__(self) -> Generator[Any, None, _Out]:
        handler = get_handler_or_raise("Get(...)")
        result: _Out = yield from handler.get(self).__await__()
        return result

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Get):
            return NotImplemented
        return (
            self.output_type is other.output_type
            and self.input_types == other.input_types
            and self.inputs == other.inputs
        )

    def __hash__(self) -> int:
        return hash((self.output_type, self.input_types, self.inputs))

    def __repr__(self) -> str:
        if len(self.inputs) == 1:
            return (
                f"Get({self.output_type.__name__}, {self.input_types[0].__name__}, "
                f"{_short_repr(self.inputs[0])})"
            )
        inner = ", ".join(
            f"{_short_repr(v)}: {t.__name__}"
            for v, t in zip(self.inputs, self.input_types, strict=True)
        )
        return f"Get({self.output_type.__name__}, {{{inner}}})"


class MultiGet(Generic[_T]):
    """Await several Gets concurrently; the results come back as a tuple, in order.

    `MultiGet(get_a, get_b)` is typed per position (`tuple[A, B]`);
    `MultiGet(Get(T, ...) for x in xs)` is `tuple[T, ...]`. The first failure cancels the
    others and is raised as is.
    """

    __slots__ = ("gets",)

    gets: tuple[Get[Any], ...]

    @overload
    def __init__(self: MultiGet[tuple[_T, ...]], gets: Iterable[Get[_T]], /) -> None: ...
    @overload
    def __init__(self: MultiGet[tuple[()]], /) -> None: ...
    @overload
    def __init__(self: MultiGet[tuple[_T0]], g0: Get[_T0], /) -> None: ...
    @overload
    def __init__(self: MultiGet[tuple[_T0, _T1]], g0: Get[_T0], g1: Get[_T1], /) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2]], g0: Get[_T0], g1: Get[_T1], g2: Get[_T2], /
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2, _T3]],
        g0: Get[_T0],
        g1: Get[_T1],
        g2: Get[_T2],
        g3: Get[_T3],
        /,
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2, _T3, _T4]],
        g0: Get[_T0],
        g1: Get[_T1],
        g2: Get[_T2],
        g3: Get[_T3],
        g4: Get[_T4],
        /,
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2, _T3, _T4, _T5]],
        g0: Get[_T0],
        g1: Get[_T1],
        g2: Get[_T2],
        g3: Get[_T3],
        g4: Get[_T4],
        g5: Get[_T5],
        /,
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2, _T3, _T4, _T5, _T6]],
        g0: Get[_T0],
        g1: Get[_T1],
        g2: Get[_T2],
        g3: Get[_T3],
        g4: Get[_T4],
        g5: Get[_T5],
        g6: Get[_T6],
        /,
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7]],
        g0: Get[_T0],
        g1: Get[_T1],
        g2: Get[_T2],
        g3: Get[_T3],
        g4: Get[_T4],
        g5: Get[_T5],
        g6: Get[_T6],
        g7: Get[_T7],
        /,
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7, _T8]],
        g0: Get[_T0],
        g1: Get[_T1],
        g2: Get[_T2],
        g3: Get[_T3],
        g4: Get[_T4],
        g5: Get[_T5],
        g6: Get[_T6],
        g7: Get[_T7],
        g8: Get[_T8],
        /,
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T0, _T1, _T2, _T3, _T4, _T5, _T6, _T7, _T8, _T9]],
        g0: Get[_T0],
        g1: Get[_T1],
        g2: Get[_T2],
        g3: Get[_T3],
        g4: Get[_T4],
        g5: Get[_T5],
        g6: Get[_T6],
        g7: Get[_T7],
        g8: Get[_T8],
        g9: Get[_T9],
        /,
    ) -> None: ...
    @overload
    def __init__(
        self: MultiGet[tuple[_T, ...]],
        g0: Get[_T],
        g1: Get[_T],
        g2: Get[_T],
        g3: Get[_T],
        g4: Get[_T],
        g5: Get[_T],
        g6: Get[_T],
        g7: Get[_T],
        g8: Get[_T],
        g9: Get[_T],
        g10: Get[_T],
        /,
        *gets: Get[_T],
    ) -> None: ...

    def __init__(self, *gets: Any) -> None:
        items: tuple[Any, ...]
        if len(gets) == 1 and not isinstance(gets[0], Get):
            try:
                items = tuple(gets[0])
            except TypeError:
                raise RuleDefinitionError(
                    f"MultiGet takes Gets, or one iterable of Gets; got {_short_repr(gets[0])}."
                ) from None
        else:
            items = gets
        for position, item in enumerate(items):
            if not isinstance(item, Get):
                raise RuleDefinitionError(
                    f"MultiGet: item {position} is {_short_repr(item)}, not a Get. "
                    "Write MultiGet(Get(...), Get(...)) or MultiGet(Get(...) for x in xs)."
                )
        self.gets = items

    def __await__(self) -> Generator[Any, None, _T]:
        handler = get_handler_or_raise("MultiGet(...)")
        result: _T = yield from handler.multi_get(self.gets).__await__()  # type: ignore[assignment]
        return result

    def __repr__(self) -> str:
        return f"MultiGet({', '.join(map(repr, self.gets))})"


# ----------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True, slots=True)
class GetSpec:
    """A Get found statically in a rule (or a @rule_helper it calls), at `filename:lineno`."""

    output_type: type
    input_types: tuple[type, ...]
    filename: str
    lineno: int

    @property
    def key(self) -> GetKey:
        """The key the awaited `Get` will have (`Get.key`)."""
        if len(self.input_types) == 1:
            return (self.output_type, self.input_types[0])
        return (self.output_type, frozenset(self.input_types))

    def describe(self) -> str:
        """`Get(Out, In)` / `Get(Out, {A, B})`, for messages."""
        if len(self.input_types) == 1:
            return f"Get({_tn(self.output_type)}, {_tn(self.input_types[0])})"
        return f"Get({_tn(self.output_type)}, {{{', '.join(_tn(t) for t in self.input_types)}}})"


@dataclass(frozen=True, slots=True)
class QueryRule:
    """A root the caller may request: compute `output_type` from values of `param_types`."""

    output_type: type
    param_types: tuple[type, ...]

    def __init__(self, output_type: type, param_types: Iterable[type] = ()) -> None:
        if isinstance(param_types, type):
            param_types = (param_types,)
        params = tuple(param_types)
        problems = [
            f"`{_short_repr(tp)}` is not a class"
            for tp in (output_type, *params)
            if not isinstance(tp, type)
        ]
        if len(set(params)) != len(params):
            problems.append("a param type is listed twice")
        if problems:
            raise RuleDefinitionError(
                f"QueryRule({_short_repr(output_type)}, {_short_repr(params)}): "
                + "; ".join(problems)
                + ". Write QueryRule(OutputType, (ParamType, ...))."
            )
        object.__setattr__(self, "output_type", output_type)
        object.__setattr__(self, "param_types", params)

    def __repr__(self) -> str:
        params = ", ".join(_tn(t) for t in self.param_types)
        if len(self.param_types) == 1:
            params += ","
        return f"QueryRule({_tn(self.output_type)}, ({params}))"


class _Unresolved(Exception):
    """A name could not be resolved (yet): decoration time defers, graph time reports it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Scope:
    """Where the names a function's code uses are looked up, the way Python would.

    Closure cells first (nested rules), then the locals of the frame that defined the function
    (string annotations naming local classes, with `from __future__ import annotations`), then
    the module globals, then builtins.
    """

    __slots__ = ("frame", "func")

    def __init__(self, func: Callable[..., Any], frame: types.FrameType | None) -> None:
        self.func: types.FunctionType = inspect.unwrap(func)
        # A module-level definition needs no frame: its locals are the globals.
        self.frame = frame if frame is not None and frame.f_locals is not frame.f_globals else None

    def frame_locals(self) -> dict[str, Any] | None:
        return dict(self.frame.f_locals) if self.frame is not None else None

    def lookup(self, parts: tuple[str, ...]) -> object:
        name = parts[0]
        code = self.func.__code__
        value: object
        if name in code.co_freevars:
            cell = (self.func.__closure__ or ())[code.co_freevars.index(name)]
            try:
                value = cell.cell_contents
            except ValueError:  # the enclosing function has not assigned it yet
                raise _Unresolved(name) from None
        elif self.frame is not None and name in self.frame.f_locals:
            value = self.frame.f_locals[name]
        elif name in self.func.__globals__:
            value = self.func.__globals__[name]
        elif hasattr(builtins, name):
            value = getattr(builtins, name)
        else:
            raise _Unresolved(name)
        for i, attr in enumerate(parts[1:], 1):
            try:
                value = getattr(value, attr)
            except AttributeError:
                raise _Unresolved(".".join(parts[: i + 1])) from None
        return value


class _RuleParts:
    """The lazily resolved part of a RuleInfo: types from annotations, and Gets from the source.

    Invariant: once `done` is True, `output_type`, `parameter_types` and `gets` are final and
    `scope` is None (the defining frame is released).
    """

    __slots__ = ("done", "gets", "gets_by_key", "output_type", "parameter_types", "scope")

    def __init__(self, scope: _Scope | None) -> None:
        self.scope = scope
        self.done = False
        self.output_type: type | None = None
        self.parameter_types: tuple[type, ...] | None = None
        self.gets: tuple[GetSpec, ...] | None = None
        self.gets_by_key: dict[GetKey, GetSpec] | None = None


@dataclass(frozen=True, eq=False, slots=True, repr=False)
class RuleInfo:
    """What the engine knows about one rule. Found on a decorated function as `__rulework_rule__`.

    `output_type`, `parameter_types` and `gets` are resolved on first access (a type may be
    defined below the rule in its module); they raise `RuleDefinitionError` if a name never
    resolves. `func` is called by the scheduler as `func(*args)`, in parameter order.
    """

    func: Callable[..., Coroutine[Any, Any, Any]]
    name: str
    parameter_names: tuple[str, ...]
    persist: bool
    version: str | None
    source_file: str
    lineno: int
    builtin: bool = False
    _parts: _RuleParts = field(default_factory=lambda: _RuleParts(None), repr=False)

    @classmethod
    def create(
        cls,
        func: Callable[..., Coroutine[Any, Any, Any]],
        *,
        output_type: type,
        parameter_types: Iterable[type] = (),
        parameter_names: Iterable[str] | None = None,
        gets: Iterable[GetSpec] = (),
        name: str | None = None,
        persist: bool = False,
        version: str | None = None,
        builtin: bool = False,
    ) -> RuleInfo:
        """A rule described explicitly, without reading annotations or source.

        For rules generated by code (and the engine's own built-in rules): `gets` must list
        every Get the function may await.
        """
        ptypes = tuple(parameter_types)
        pnames = (
            tuple(parameter_names)
            if parameter_names is not None
            else tuple(f"arg{i}" for i in range(len(ptypes)))
        )
        if len(pnames) != len(ptypes):
            raise RuleDefinitionError(
                f"RuleInfo.create: {len(pnames)} parameter names for {len(ptypes)} types."
            )
        code = getattr(func, "__code__", None)
        info = cls(
            func=func,
            name=name or f"{func.__module__}.{func.__qualname__}",
            parameter_names=pnames,
            persist=persist,
            version=version,
            source_file=code.co_filename if code is not None else "<unknown>",
            lineno=code.co_firstlineno if code is not None else 0,
            builtin=builtin,
        )
        problems = [
            f"{where}: {problem}"
            for where, tp in [("the output type", output_type)]
            + [(f"parameter `{n}`", t) for n, t in zip(pnames, ptypes, strict=True)]
            if (problem := _type_problem(tp, is_output=where == "the output type")) is not None
        ]
        if problems:
            raise RuleDefinitionError(f"Rule `{info.name}`: " + "; ".join(problems))
        parts = info._parts
        parts.output_type = output_type
        parts.parameter_types = ptypes
        parts.gets = tuple(gets)
        parts.done = True
        return info

    @property
    def output_type(self) -> type:
        """The rule's return annotation."""
        return self._resolved().output_type  # type: ignore[return-value]

    @property
    def parameter_types(self) -> tuple[type, ...]:
        """The parameters' annotations, in signature order."""
        return self._resolved().parameter_types  # type: ignore[return-value]

    @property
    def gets(self) -> tuple[GetSpec, ...]:
        """The Gets the rule may await: its own in source order, then its @rule_helpers'."""
        return self._resolved().gets  # type: ignore[return-value]

    @property
    def gets_by_key(self) -> Mapping[GetKey, GetSpec]:
        """The rule's Gets by `key` (the first occurrence of each key)."""
        parts = self._parts
        found = parts.gets_by_key
        if found is None:
            found = {}
            for spec in self.gets:
                found.setdefault(spec.key, spec)
            parts.gets_by_key = found
        return found

    def _resolved(self) -> _RuleParts:
        """The parts, resolving annotations and Gets first if that has not happened yet."""
        parts = self._parts
        if not parts.done:
            self.resolve()
        return parts

    @property
    def is_resolved(self) -> bool:
        """Whether annotations and Gets are resolved already."""
        return self._parts.done

    def resolve(self) -> None:
        """Resolve annotations and Gets now; raise `RuleDefinitionError` naming what failed."""
        parts = self._parts
        if parts.done:
            return
        assert parts.scope is not None
        if parts.output_type is None:
            _resolve_annotations(self, parts, final=True)
        if parts.gets is None:
            problems: list[str] = []
            gets, complete = _discover_gets(parts.scope, final=True, problems=problems)
            if problems:
                raise RuleDefinitionError(_rule_problem_text(self, problems))
            assert complete
            parts.gets = gets
        parts.scope = None
        parts.done = True

    def signature(self) -> str:
        """`name(param: Type, ...) -> Output`, for messages."""
        parts = self._parts
        ptypes = parts.parameter_types
        if ptypes is None:
            args = ", ".join(self.parameter_names)
        else:
            args = ", ".join(
                f"{n}: {_tn(t)}" for n, t in zip(self.parameter_names, ptypes, strict=True)
            )
        out = _tn(parts.output_type) if parts.output_type is not None else "?"
        return f"{self.name}({args}) -> {out}"

    def location(self) -> str:
        """`file:line` of the rule's definition."""
        return f"{_short_path(self.source_file)}:{self.lineno}"

    def __repr__(self) -> str:
        return f"<RuleInfo {self.signature()}>"


# ----------------------------------------------------------------------------------------------
# @rule and @rule_helper


@overload
def rule(func: _F, /) -> _F: ...


@overload
def rule(
    *,
    persist: bool = False,
    version: str | None = None,
    canonical_name: str | None = None,
    builtin: bool = False,
) -> Callable[[_F], _F]: ...


def rule(
    func: Any = None,
    /,
    *,
    persist: bool = False,
    version: str | None = None,
    canonical_name: str | None = None,
    builtin: bool = False,
) -> Any:
    """Declare an async function as a rule: its annotations say what it consumes and produces.

    Args:
        persist: persist the output in the caches (its type must be serializable by cattrs).
        version: bump to invalidate persisted results when the rule's behaviour changes in a way
            its code fingerprint cannot see.
        canonical_name: the rule's stable name (default `module.qualname`), used in cache keys
            and messages.
        builtin: for rules shipped with rulework itself: exempt from the unreachable-rule check.

    Raises:
        RuleDefinitionError: at decoration time, naming the rule, the parameter and the fix.

    Example::

        @rule
        async def thumbnail(image: ImageFile, opts: ResizeOptions) -> Thumbnail: ...
    """
    if func is not None:
        return _make_rule(func, sys._getframe(1), persist, version, canonical_name, builtin)

    def decorator(f: _F) -> _F:
        made: _F = _make_rule(f, sys._getframe(1), persist, version, canonical_name, builtin)
        return made

    return decorator


def rule_helper(func: _F) -> _F:
    """Mark an async helper whose Gets count for the rules that call it.

    Rules calling the helper (directly, or through other helpers, also when imported from
    another module or under another name) declare the helper's Gets as their own.
    """
    if not inspect.iscoroutinefunction(func):
        raise RuleDefinitionError(
            f"@rule_helper `{_func_name(func)}` must be defined with `async def` (its Gets are "
            "awaited)."
        )
    scope = _Scope(func, sys._getframe(1))
    try:
        setattr(func, _HELPER_ATTR, scope)
    except AttributeError:
        raise RuleDefinitionError(
            f"@rule_helper cannot mark {func!r}: it accepts no attributes."
        ) from None
    _early_get_check(scope, _func_name(func))
    return func


def _make_rule(
    func: Any,
    frame: types.FrameType,
    persist: bool,
    version: str | None,
    canonical_name: str | None,
    builtin: bool,
) -> Any:
    name = canonical_name or _func_name(func)
    if isinstance(func, type) or not callable(func):
        raise RuleDefinitionError(f"@rule decorates async functions; got {func!r}.")
    if not inspect.iscoroutinefunction(func):
        raise RuleDefinitionError(
            _rule_problem_text_named(
                name,
                func,
                [
                    f"it is not async: define it with `async def {func.__name__}(...)`; rules "
                    "are coroutines so that they can await Gets"
                ],
            )
        )
    if version is not None and not isinstance(version, str):
        raise RuleDefinitionError(
            _rule_problem_text_named(name, func, [f"version must be a str, got {version!r}"])
        )
    problems: list[str] = []
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise RuleDefinitionError(f"Rule `{name}`: cannot read its signature ({exc}).") from None
    raw_annotations = getattr(inspect.unwrap(func), "__annotations__", {})
    names: list[str] = []
    for param in signature.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            problems.append(
                f"parameter `*{param.name}`: rules cannot take *args; declare one parameter per "
                "input type"
            )
            continue
        if param.kind is param.VAR_KEYWORD:
            problems.append(
                f"parameter `**{param.name}`: rules cannot take **kwargs; declare one parameter "
                "per input type"
            )
            continue
        if param.kind is param.KEYWORD_ONLY:
            problems.append(
                f"parameter `{param.name}` is keyword-only; the engine passes parameters by "
                "position, so remove the `*` before it"
            )
        if param.default is not param.empty:
            problems.append(
                f"parameter `{param.name}` has a default value; the engine always provides "
                "every parameter, so remove the default"
            )
        if param.name not in raw_annotations:
            problems.append(
                f"parameter `{param.name}` has no type annotation; annotate it with the type the "
                f"rule consumes, e.g. `{param.name}: SomeType`"
            )
        names.append(param.name)
    if "return" not in raw_annotations:
        problems.append(
            "it has no return annotation; add `-> OutputType` (the type the rule produces)"
        )
    if problems:
        raise RuleDefinitionError(_rule_problem_text_named(name, func, problems))
    code = inspect.unwrap(func).__code__
    info = RuleInfo(
        func=func,
        name=name,
        parameter_names=tuple(names),
        persist=persist,
        version=version,
        source_file=code.co_filename,
        lineno=code.co_firstlineno,
        builtin=builtin,
        _parts=_RuleParts(_Scope(func, frame)),
    )
    # Resolve what can be resolved now, so most mistakes surface at import time; names not
    # defined yet (a class further down the module) are resolved lazily by `info.resolve()`.
    _resolve_annotations(info, info._parts, final=False)
    _early_get_check(info._parts.scope, name, info=info)  # type: ignore[arg-type]
    try:
        setattr(func, _RULE_ATTR, info)
    except AttributeError:
        raise RuleDefinitionError(
            f"@rule cannot mark {func!r}: it accepts no attributes."
        ) from None
    return func


def _resolve_annotations(info: RuleInfo, parts: _RuleParts, *, final: bool) -> None:
    scope = parts.scope
    assert scope is not None
    try:
        hints = _type_hints(scope, info.func)
    except NameError as exc:
        if not final:
            return
        missing = getattr(exc, "name", None) or str(exc)
        raise RuleDefinitionError(
            _rule_problem_text(
                info,
                [
                    f"its annotations name `{missing}`, which is not defined in module "
                    f"`{scope.func.__module__}`. Import or define it at module level (an "
                    "import only under `if TYPE_CHECKING:` is not visible to the engine)"
                ],
            )
        ) from None
    except Exception as exc:  # a malformed string annotation, an evaluation error...
        raise RuleDefinitionError(
            _rule_problem_text(info, [f"its annotations cannot be evaluated: {exc}"])
        ) from None
    problems: list[str] = []
    ptypes: list[type] = []
    for pname in info.parameter_names:
        tp = hints[pname]
        problem = _type_problem(tp, is_output=False)
        if problem is not None:
            problems.append(f"parameter `{pname}`: {problem}")
        ptypes.append(tp)
    seen: dict[object, str] = {}
    for pname, tp in zip(info.parameter_names, ptypes, strict=True):
        if tp in seen:
            problems.append(
                f"parameters `{seen[tp]}` and `{pname}` have the same type `{_tn(tp)}`; a rule "
                "receives one value per type, so they would always be equal. Keep one of them, "
                "or wrap one in a distinct type"
            )
        else:
            seen[tp] = pname
    output = hints["return"]
    problem = _type_problem(output, is_output=True)
    if problem is not None:
        problems.append(f"return type: {problem}")
    if problems:
        raise RuleDefinitionError(_rule_problem_text(info, problems))
    parts.parameter_types = tuple(ptypes)
    parts.output_type = output


def _early_get_check(scope: _Scope, name: str, info: RuleInfo | None = None) -> None:
    """At decoration time: report malformed Gets now; keep the result if fully resolved."""
    problems: list[str] = []
    gets, complete = _discover_gets(scope, final=False, problems=problems)
    if problems:
        text = (
            _rule_problem_text(info, problems)
            if info is not None
            else f"@rule_helper `{name}`:\n" + "\n".join(f"  - {p}" for p in problems)
        )
        raise RuleDefinitionError(text)
    if info is not None and complete:
        parts = info._parts
        parts.gets = gets
        if parts.output_type is not None:
            parts.scope = None
            parts.done = True


# Compiled string annotations (`from __future__ import annotations`), shared by every rule:
# modules repeat the same few annotation strings many times.
_ANNOTATION_CODE: dict[str, types.CodeType] = {}


def _type_hints(scope: _Scope, func: Callable[..., Any]) -> dict[str, Any]:
    """Like `typing.get_type_hints` for a rule, evaluating string annotations in its scope."""
    raw = getattr(func, "__annotations__", None) or getattr(scope.func, "__annotations__", {})
    localns = scope.frame_locals()
    hints: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, str):
            code = _ANNOTATION_CODE.get(value)
            if code is None:
                code = _ANNOTATION_CODE[value] = compile(value, "<annotation>", "eval")
            value = eval(code, scope.func.__globals__, localns)
        if typing.get_origin(value) is typing.Annotated:
            value = value.__origin__
        hints[name] = value
    return hints


_MUTABLE_TYPES: tuple[type, ...] = (list, dict, set, bytearray)


def _type_problem(tp: object, *, is_output: bool) -> str | None:
    """Why `tp` cannot be a rule's parameter or output type, or None if it can."""
    if tp is type(None) or tp is None:
        if is_output:
            return (
                "rules must return a value (`-> None` is not allowed); return a frozen "
                "dataclass describing the result"
            )
        return "`None` is not a type a rule can consume"
    if not isinstance(tp, type):
        origin = typing.get_origin(tp)
        if origin is typing.Union or origin is types.UnionType:
            return (
                f"`{tp}` is a union of types; a rule consumes and produces exactly one class "
                "(for extensibility, use a @union base class and UnionRule)"
            )
        if origin is not None:
            return (
                f"`{tp}` is a parameterized generic; the rule graph is keyed by class, so use a "
                f"class of your own, e.g. a @dataclass(frozen=True) wrapping the "
                f"{getattr(origin, '__name__', origin)}"
            )
        return f"`{tp!r}` is not a class; annotate with a class"
    if issubclass(tp, _MUTABLE_TYPES):
        return (
            f"`{tp.__name__}` is mutable and unhashable; use a tuple or frozenset, or a "
            "@dataclass(frozen=True) wrapping one"
        )
    if dataclasses.is_dataclass(tp) and not tp.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        return (
            f"`{tp.__qualname__}` is a dataclass that is not frozen; use "
            "@dataclass(frozen=True) so that its values are immutable and hashable"
        )
    if getattr(tp, "__attrs_attrs__", None) is not None and (
        getattr(tp.__setattr__, "__name__", "") != "_frozen_setattrs"
    ):
        return (
            f"`{tp.__qualname__}` is an attrs class that is not frozen; use @attrs.frozen so "
            "that its values are immutable and hashable"
        )
    if tp.__hash__ is None:
        return (
            f"`{tp.__qualname__}` is not hashable (it defines __eq__ without __hash__); make it "
            "immutable and hashable, e.g. with @dataclass(frozen=True)"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Static Get discovery


@dataclass(frozen=True, slots=True)
class _CallSite:
    parts: tuple[str, ...]
    call: ast.Call
    lineno: int


@dataclass(frozen=True, slots=True)
class _FunctionSource:
    filename: str
    calls: tuple[_CallSite, ...]


@dataclass(slots=True)
class _ParsedFile:
    lines: list[str]
    functions: dict[tuple[int, str], ast.FunctionDef | ast.AsyncFunctionDef]


# Parsed source files by filename, so that a module with many rules is parsed once. Only the
# few most recent files are kept: rules are decorated (and resolved) module by module, and a
# large AST kept alive forever would slow every garbage collection down.
# Invariant: `_PARSED[f].lines is linecache.getlines(f)` for a current entry; a new lines list
# (the file was re-read) means the entry is stale and gets re-parsed.
_PARSED: dict[str, _ParsedFile] = {}
_PARSED_MAX = 4
# Call sites per function code object (the syntactic half of Get discovery), keyed by the code
# object's id: code objects compare by value, and two identical functions from different files
# (or namespaces) must not share an entry. The code object is kept so that its id stays unique.
_CALL_SITES: dict[int, tuple[types.CodeType, _FunctionSource]] = {}


class _NoSource(Exception):
    pass


def _function_source(func: types.FunctionType) -> _FunctionSource:
    code = func.__code__
    found = _CALL_SITES.get(id(code))
    if found is not None:
        return found[1]
    filename = code.co_filename
    node, line_offset = _function_node(func)
    calls: list[_CallSite] = []
    # Walk the body only: the decorators (`@rule(...)`) and annotations are not Gets.
    for stmt in node.body:
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Call):
                parts = _dotted(sub.func)
                if parts is not None:
                    calls.append(_CallSite(parts, sub, sub.lineno + line_offset))
    calls.sort(key=lambda c: (c.lineno, c.call.col_offset))
    result = _FunctionSource(filename, tuple(calls))
    _CALL_SITES[id(code)] = (code, result)
    return result


def _function_node(func: types.FunctionType) -> tuple[ast.FunctionDef | ast.AsyncFunctionDef, int]:
    """The function's AST node and the offset to add to its line numbers.

    Source comes from `linecache`, like `inspect.getsource`. Code made with `exec`/`compile`
    has a source there only if it was registered:
    `linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)` (an mtime of
    None keeps `linecache.checkcache` from dropping it).
    """
    code = func.__code__
    filename = code.co_filename
    key = (code.co_firstlineno, code.co_name)
    for attempt in range(2):
        lines = linecache.getlines(filename, func.__globals__)
        if not lines:
            break
        parsed = _PARSED.get(filename)
        if parsed is None or parsed.lines is not lines:
            try:
                tree = ast.parse("".join(lines), filename)
            except (SyntaxError, ValueError):
                break
            parsed = _ParsedFile(lines, _index_functions(tree))
            _PARSED.pop(filename, None)
            while len(_PARSED) >= _PARSED_MAX:
                del _PARSED[next(iter(_PARSED))]
            _PARSED[filename] = parsed
        node = parsed.functions.get(key)
        if node is not None:
            return node, 0
        if attempt == 0:
            # The file may have changed on disk since it was cached: re-read it once.
            linecache.checkcache(filename)
    # Fall back to inspect (e.g. a source file that does not parse as a whole).
    try:
        source = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError) as exc:
        raise _NoSource(str(exc)) from None
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            return stmt, code.co_firstlineno - 1 - _first_line(stmt) + 1
    raise _NoSource("no function definition found in its source")


def _first_line(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    return min([node.lineno, *(d.lineno for d in node.decorator_list)])


def _index_functions(
    tree: ast.Module,
) -> dict[tuple[int, str], ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function definition in a module, nested ones included, by (first line, name).

    Functions are statements, so only statement bodies are visited (much cheaper than
    `ast.walk` over every expression of a large module).
    """
    index: dict[tuple[int, str], ast.FunctionDef | ast.AsyncFunctionDef] = {}
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            # co_firstlineno is the first decorator's line (3.8+); index the `def` line too.
            index[(_first_line(node), node.name)] = node
            index.setdefault((node.lineno, node.name), node)
        for field_name in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field_name, None)
            if children:
                for child in children:
                    if isinstance(child, ast.stmt):
                        stack.append(child)
                    else:  # except handlers and match cases hold statements in their body
                        stack.extend(getattr(child, "body", ()))
    return index


def _dotted(expr: ast.expr) -> tuple[str, ...] | None:
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Name):
        parts.append(expr.id)
        return tuple(reversed(parts))
    return None


def _discover_gets(
    scope: _Scope, *, final: bool, problems: list[str]
) -> tuple[tuple[GetSpec, ...], bool]:
    """The Gets in `scope.func` and in the @rule_helpers it calls, transitively.

    Returns `(gets, complete)`. With `final=False` (decoration time) names that do not resolve
    yet make the result incomplete instead of an error; malformed Gets are problems either way.
    """
    found: list[GetSpec] = []
    complete = True
    visited: set[int] = set()  # ids of functions (code objects compare by value)
    pending: list[_Scope] = [scope]
    while pending:
        current = pending.pop(0)
        if id(current.func) in visited:
            continue
        visited.add(id(current.func))
        may = _may_await_gets(current)
        if may is False:
            continue  # no name its code uses is Get or a helper: no need to read the source
        if may is None and not final:
            complete = False  # undecidable until the module is fully defined
            continue
        try:
            source = _function_source(current.func)
        except _NoSource as exc:
            problems.append(_no_source_text(current.func, str(exc)))
            continue
        for site in source.calls:
            try:
                target = current.lookup(site.parts)
            except _Unresolved:
                # A local variable, or a helper defined further down: only Get must resolve.
                if site.parts[-1] == "Get":
                    if final:
                        problems.append(
                            f"{_where(source.filename, site.lineno)}: `{'.'.join(site.parts)}` "
                            "is called like rulework's Get but that name is not defined; "
                            "import it (from rulework import Get)"
                        )
                    else:
                        complete = False
                elif not final:
                    complete = False
                continue
            if target is Get:
                spec = _parse_get(site, source.filename, current, final=final, problems=problems)
                if spec is None:
                    complete = False
                else:
                    found.append(spec)
            else:
                helper_scope = getattr(target, _HELPER_ATTR, None)
                if isinstance(helper_scope, _Scope):
                    pending.append(helper_scope)
    if problems:
        complete = False
    return tuple(found), complete


def _code_names(code: types.CodeType) -> tuple[set[str], set[str]]:
    """(names the code and its nested code objects use, free variable names)."""
    names: set[str] = set()
    free: set[str] = set(code.co_freevars)
    stack = [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return names, free


def _may_await_gets(scope: _Scope) -> bool | None:
    """Whether the function may call Get or a @rule_helper, judged from the names it uses.

    False: certainly not, so its source need not be parsed. True: it may. None: some name is
    not defined yet, so this cannot be decided before the module is fully imported.
    `co_names` mixes globals and attribute names; an attribute name that resolves to nothing
    is harmless (None at decoration time, ignored later), one that resolves only adds a check.
    """
    names, free = _code_names(scope.func.__code__)
    unresolved = False
    containers: list[object] = []
    for name in names | free:
        try:
            value = scope.lookup((name,))
        except _Unresolved:
            unresolved = True
            continue
        if _is_get_or_helper(value):
            return True
        if isinstance(value, types.ModuleType | type):
            containers.append(value)
    # `module.Get(...)`, `module.helper(...)`, `Class.helper(...)`, a couple of levels deep.
    for _depth in range(3):
        found: list[object] = []
        for container in containers:
            for name in names:
                value = getattr(container, name, None)
                if value is None:
                    continue
                if _is_get_or_helper(value):
                    return True
                if isinstance(value, types.ModuleType | type) and value is not container:
                    found.append(value)
        containers = found
        if not containers:
            break
    return None if unresolved else False


def _is_get_or_helper(value: object) -> bool:
    if value is Get:
        return True
    try:
        return isinstance(getattr(value, _HELPER_ATTR, None), _Scope)
    except Exception:  # a hostile __getattr__ is not a helper
        return False


def _parse_get(
    site: _CallSite, filename: str, scope: _Scope, *, final: bool, problems: list[str]
) -> GetSpec | None:
    call = site.call
    where = _where(filename, site.lineno)
    text = _snippet(call)
    if call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
        problems.append(
            f"{where}: `{text}` must pass its arguments positionally and literally "
            "(no keywords, no *args), so that the engine can read them"
        )
        return None
    args = call.args
    input_exprs: list[ast.expr]
    if len(args) == 3:
        input_exprs = [args[1]]
    elif len(args) == 2:
        second = args[1]
        if isinstance(second, ast.Dict):
            if not second.values or any(k is None for k in second.keys):
                problems.append(
                    f"{where}: `{text}`: write the inputs as a literal {{value: Type, ...}} "
                    "dict with at least one entry (no ** unpacking)"
                )
                return None
            input_exprs = list(second.values)
        elif isinstance(second, ast.Call):
            input_exprs = [second.func]
        else:
            problems.append(
                f"{where}: `{text}`: the engine cannot tell the input type of "
                f"`{_snippet(second)}`. Write Get(Out, InputType, value), or construct the "
                "input in place: Get(Out, InputType(...))"
            )
            return None
    else:
        problems.append(
            f"{where}: `{text}` has {len(args)} arguments; write Get(Out, InputType, value), "
            "Get(Out, InputType(...)) or Get(Out, {value: InputType, ...})"
        )
        return None
    output = _resolve_type(args[0], "output type", where, text, scope, final, problems)
    inputs = [
        _resolve_type(
            e,
            "input type",
            where,
            text,
            scope,
            final,
            problems,
            constructor=len(args) == 2 and isinstance(args[1], ast.Call),
        )
        for e in input_exprs
    ]
    if output is None or any(i is None for i in inputs):
        return None
    input_types = tuple(typing.cast(list[type], inputs))
    if len(set(input_types)) != len(input_types):
        problems.append(f"{where}: `{text}` names the same input type twice")
        return None
    return GetSpec(output, input_types, filename, site.lineno)


def _resolve_type(
    expr: ast.expr,
    what: str,
    where: str,
    text: str,
    scope: _Scope,
    final: bool,
    problems: list[str],
    *,
    constructor: bool = False,
) -> type | None:
    parts = _dotted(expr)
    if parts is None:
        problems.append(
            f"{where}: in `{text}`, the {what} `{_snippet(expr)}` must be a class name (like "
            "`Digest` or `module.Digest`) so that the engine can read it without running the rule"
        )
        return None
    try:
        value = scope.lookup(parts)
    except _Unresolved as exc:
        if final:
            problems.append(
                f"{where}: in `{text}`, the {what} `{'.'.join(parts)}` cannot be resolved: "
                f"`{exc.name}` is not defined in module `{scope.func.__module__}`. Types in Gets "
                "are read statically: import the class at module level (a local variable "
                "holding a type cannot be seen)"
            )
        return None
    if not isinstance(value, type):
        fix = (
            " Write Get(Out, InputType, make_input(...)) to name the input type explicitly."
            if constructor
            else ""
        )
        problems.append(
            f"{where}: in `{text}`, the {what} `{'.'.join(parts)}` is {_short_repr(value)}, not "
            f"a class.{fix}"
        )
        return None
    return value


# ----------------------------------------------------------------------------------------------
# collect_rules


def collect_rules(
    namespace: Mapping[str, Any] | types.ModuleType | None = None,
) -> list[Callable[..., Coroutine[Any, Any, Any]]]:
    """The `@rule` functions in the calling module (or in `namespace`: a module or a dict).

    Resolves every rule's annotations and Gets, raising one `RuleDefinitionError` that lists
    every problem found.

    Example::

        engine = Engine([*collect_rules(), QueryRule(Out, (In,))])
    """
    if namespace is None:
        ns: Mapping[str, Any] = sys._getframe(1).f_globals
    elif isinstance(namespace, types.ModuleType):
        ns = vars(namespace)
    else:
        ns = namespace
    found: list[Callable[..., Coroutine[Any, Any, Any]]] = []
    seen: set[int] = set()
    for value in list(ns.values()):
        info = _rule_info_of(value)
        if info is not None and id(info) not in seen:
            seen.add(id(info))
            found.append(value)
    problems: list[str] = []
    for value in found:
        try:
            _rule_info_of(value).resolve()  # type: ignore[union-attr]
        except RuleDefinitionError as exc:
            problems.append(str(exc))
    if problems:
        raise RuleDefinitionError("\n\n".join(problems))
    return found


def _rule_info_of(value: object) -> RuleInfo | None:
    if not callable(value) or isinstance(value, type):
        return None
    try:
        info = getattr(value, _RULE_ATTR, None)
    except Exception:  # an object with a hostile __getattr__ is not a rule
        return None
    return info if isinstance(info, RuleInfo) else None


def rule_info(value: object) -> RuleInfo:
    """The RuleInfo of a decorated rule function (or `value` itself if it is a RuleInfo)."""
    if isinstance(value, RuleInfo):
        return value
    info = _rule_info_of(value)
    if info is None:
        raise RuleDefinitionError(
            f"{_short_repr(value)} is not a rule: decorate the async function with @rule."
        )
    return info


# ----------------------------------------------------------------------------------------------
# Text helpers


def _tn(tp: object) -> str:
    """A type's short name for messages."""
    name = getattr(tp, "__qualname__", None)
    if not isinstance(name, str):
        return repr(tp)
    # `test_x.<locals>.Thing` reads better as `Thing`.
    return name.rsplit("<locals>.", 1)[-1]


def _short_repr(value: object, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _snippet(node: ast.AST, limit: int = 80) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_path(path: str) -> str:
    import os

    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def _where(filename: str, lineno: int) -> str:
    return f"{_short_path(filename)}:{lineno}"


def _func_name(func: Any) -> str:
    module = getattr(func, "__module__", None) or "?"
    qualname = getattr(func, "__qualname__", None) or repr(func)
    return f"{module}.{qualname}"


def _rule_problem_text(info: RuleInfo | None, problems: list[str]) -> str:
    assert info is not None
    return _rule_problem_text_named(info.name, info.func, problems, info.location())


def _rule_problem_text_named(
    name: str, func: Any, problems: list[str], location: str | None = None
) -> str:
    if location is None:
        code = getattr(inspect.unwrap(func), "__code__", None)
        location = _where(code.co_filename, code.co_firstlineno) if code is not None else "?"
    if len(problems) == 1:
        return f"Rule `{name}` ({location}): {problems[0]}."
    body = "\n".join(f"  - {p}" for p in problems)
    return f"Rule `{name}` ({location}) has {len(problems)} problems:\n{body}"


def _no_source_text(func: types.FunctionType, reason: str) -> str:
    return (
        f"cannot read the source of `{_func_name(func)}` ({reason}); the engine reads each "
        "rule's source to find its Gets. For code made with exec()/compile(), compile it with a "
        "file name and register the source: linecache.cache[filename] = (len(src), None, "
        "src.splitlines(True), filename)"
    )
