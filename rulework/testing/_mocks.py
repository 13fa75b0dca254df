"""Unit-test one rule without an engine: its Gets are answered by mock functions.

Example::

    def test_make_all() -> None:
        result = run_rule_with_mocks(
            make_all,
            [Batch(paths=("a.jpg",))],
            mocks={(Thumbnail, ImageFile): lambda image: Thumbnail(image.path, 64)},
        )
        assert result == Thumbnails((Thumbnail("a.jpg", 64),))
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from rulework.engine.context import current_get_handler
from rulework.engine.errors import RuleDefinitionError, RuleworkError
from rulework.engine.rules import Get, GetKey, RuleInfo, UnionMembership, is_union, rule_info

__all__ = ["UnmockedGetError", "arun_rule_with_mocks", "run_rule_with_mocks"]

#: `{(Out, In): fn}`; for a Get with several inputs, `{(Out, frozenset({A, B})): fn}`.
#: `fn` receives the Get's input value(s), in the order the Get lists them, and may be async.
Mocks = Mapping[tuple[type, Any], Callable[..., Any]]


class UnmockedGetError(RuleworkError, LookupError):
    """A rule run by `run_rule_with_mocks` awaited a Get that no mock answers."""


def run_rule_with_mocks(
    rule: Any,
    args: Sequence[object] = (),
    mocks: Mocks | None = None,
    union_membership: UnionMembership | None = None,
) -> Any:
    """Run `rule`'s body with `args` (in parameter order) under `trio.run`; return its result.

    Each `await Get(Out, ...)` inside the rule (or the @rule_helpers it calls) is answered by
    `mocks[(Out, InputType)](input_value)`. trio primitives (timeouts, nurseries, sleep) work in
    the rule as they do under the engine. From inside a trio test, use `arun_rule_with_mocks`.

    Args:
        rule: a @rule function (or its RuleInfo).
        args: one value per rule parameter, in order.
        mocks: `{(Out, In): fn}`; for a union Get, key by the union base or the member type;
            for several inputs, key by `(Out, frozenset({A, B}))`.
        union_membership: when given, a union Get whose value is not a registered member fails
            as it would in the engine.

    Raises:
        UnmockedGetError: the rule awaited a Get that no mock answers.
        RuleDefinitionError: wrong arguments, a Get the rule does not declare in its source, or
            a result (from the rule or a mock) of the wrong type.
    """
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "run_rule_with_mocks() starts its own trio run, so it cannot be called from inside "
            "trio (an async test): use `await arun_rule_with_mocks(...)` instead."
        )
    return trio.run(
        functools.partial(
            arun_rule_with_mocks, rule, args, mocks=mocks, union_membership=union_membership
        )
    )


async def arun_rule_with_mocks(
    rule: Any,
    args: Sequence[object] = (),
    mocks: Mocks | None = None,
    union_membership: UnionMembership | None = None,
) -> Any:
    """Like `run_rule_with_mocks`, in the current trio run (for async tests)."""
    info = rule_info(rule)
    values = tuple(args)
    _check_args(info, values)
    handler = _MockGetHandler(info, mocks or {}, union_membership)
    token = current_get_handler.set(handler)
    try:
        result = await info.func(*values)
    finally:
        current_get_handler.reset(token)
    if not isinstance(result, info.output_type):
        raise RuleDefinitionError(
            f"Rule `{info.name}` returned {_short(result)} ({type(result).__qualname__}), but "
            f"its return annotation says {info.output_type.__qualname__}."
        )
    return result


def _check_args(info: RuleInfo, values: tuple[object, ...]) -> None:
    names = info.parameter_names
    if len(values) != len(names):
        expected = ", ".join(
            f"{n}: {t.__qualname__}" for n, t in zip(names, info.parameter_types, strict=True)
        )
        raise RuleDefinitionError(
            f"Rule `{info.name}` takes {len(names)} argument{'s' if len(names) != 1 else ''} "
            f"({expected}); got {len(values)}. Pass them in parameter order."
        )
    for name, tp, value in zip(names, info.parameter_types, values, strict=True):
        if not isinstance(value, tp):
            raise RuleDefinitionError(
                f"Rule `{info.name}`: the argument for parameter `{name}` should be a "
                f"{tp.__qualname__}; got {_short(value)} ({type(value).__qualname__})."
            )


def _normalize(key: Any) -> Any:
    """Accept `(Out, (A, B))` as well as `(Out, frozenset({A, B}))` for several inputs."""
    if not (isinstance(key, tuple) and len(key) == 2):
        raise RuleDefinitionError(
            f"Mock keys are (OutputType, InputType) pairs; got {_short(key)}."
        )
    out, inputs = key
    if isinstance(inputs, tuple | list | set | frozenset):
        inputs = frozenset(inputs)
        if len(inputs) == 1:
            (inputs,) = inputs
    return (out, inputs)


class _MockGetHandler:
    """A GetHandler answering from mocks; Gets run one after another (deterministic)."""

    def __init__(
        self, info: RuleInfo, mocks: Mocks, union_membership: UnionMembership | None
    ) -> None:
        self.info = info
        self.mocks: dict[Any, Callable[..., Any]] = {_normalize(k): v for k, v in mocks.items()}
        self.union_membership = union_membership
        self.declared: set[GetKey] = {spec.key for spec in info.gets}

    async def get(self, get: Get[Any]) -> Any:
        info = self.info
        if get.key not in self.declared:
            declared = ", ".join(sorted(_describe(k) for k in self.declared)) or "none"
            raise RuleDefinitionError(
                f"Rule `{info.name}` awaited {get!r}, but no such Get appears in its source "
                f"(found: {declared}); the engine would reject it. Write the Get literally in "
                "the rule or in a @rule_helper it calls."
            )
        mock = self.mocks.get(get.key)
        base = get.input_types[0] if len(get.input_types) == 1 else None
        if base is not None and is_union(base):
            member = type(get.inputs[0])
            if self.union_membership is not None and not self.union_membership.is_member(
                base, member
            ):
                raise RuleDefinitionError(
                    f"Rule `{info.name}` awaited {get!r}, but {member.__qualname__} is not a "
                    f"member of the union {base.__qualname__} in the given UnionMembership. "
                    f"Add UnionRule({base.__name__}, {member.__name__})."
                )
            mock = self.mocks.get((get.output_type, member), mock)
        if mock is None:
            given = ", ".join(sorted(_describe(k) for k in self.mocks)) or "none"
            raise UnmockedGetError(
                f"Rule `{info.name}` awaited {get!r}, but no mock answers "
                f"{_describe(get.key)}. Mocks given: {given}. Add "
                f"mocks={{{_describe(get.key, as_key=True)}: lambda ...: ...}}."
            )
        result = mock(*get.inputs)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, get.output_type):
            raise RuleDefinitionError(
                f"The mock for {_describe(get.key)} returned {_short(result)} "
                f"({type(result).__qualname__}); the rule expects a "
                f"{get.output_type.__qualname__}."
            )
        return result

    async def multi_get(self, gets: Sequence[Get[Any]]) -> tuple[Any, ...]:
        return tuple([await self.get(get) for get in gets])


def _describe(key: Any, *, as_key: bool = False) -> str:
    out, inputs = key
    if isinstance(inputs, frozenset):
        names = ", ".join(sorted(t.__qualname__ for t in inputs))
        inner = f"frozenset({{{names}}})" if as_key else f"{{{names}}}"
    else:
        inner = inputs.__qualname__
    return f"({out.__qualname__}, {inner})"


def _short(value: object, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real problem
        text = f"<{type(value).__qualname__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
