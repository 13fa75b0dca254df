"""Tests for the rule API: @rule validation, Get/MultiGet, static Get discovery, unions, queries.

This module uses `from __future__ import annotations`, so every rule below has string
annotations: resolving them (module globals, local classes, types defined later) is tested
everywhere.
"""

from __future__ import annotations

import ast
import functools
import importlib
import linecache
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs
import pytest

import rulework
import rulework.engine.rules as rw
from rulework.engine.errors import RuleDefinitionError
from rulework.engine.rules import (
    Get,
    GetSpec,
    MultiGet,
    QueryRule,
    RuleInfo,
    UnionMembership,
    UnionRule,
    collect_rules,
    is_union,
    rule,
    rule_helper,
    union,
)
from rulework.engine.rules import Get as AliasedGet

THIS_FILE = __file__


def line_of(func: Any, needle: str) -> int:
    """The absolute line number of the first line of `func`'s source containing `needle`."""
    import inspect

    lines, start = inspect.getsourcelines(func)
    for offset, text in enumerate(lines):
        if needle in text:
            return start + offset
    raise AssertionError(f"{needle!r} not in the source of {func}")


# ----------------------------------------------------------------------------------------------
# Module-level rules whose types are defined *below* them: resolved lazily.


@rule
async def later_defined(x: LaterIn) -> LaterOut:
    mid = await Get(LaterOut, LaterMid, LaterMid(x.value))
    return mid


@dataclass(frozen=True)
class LaterIn:
    value: int


@dataclass(frozen=True)
class LaterMid:
    value: int


@dataclass(frozen=True)
class LaterOut:
    value: int


def test_rule_returns_the_function_with_its_info() -> None:
    info = later_defined.__rulework_rule__
    assert isinstance(info, RuleInfo)
    assert info.func is later_defined
    assert info.name == f"{__name__}.later_defined"
    assert info.parameter_names == ("x",)
    assert info.parameter_types == (LaterIn,)
    assert info.output_type is LaterOut
    assert info.persist is False and info.version is None
    assert info.source_file == THIS_FILE
    assert info.lineno == later_defined.__code__.co_firstlineno
    coro = later_defined(LaterIn(1))
    assert coro.__class__.__name__ == "coroutine"
    coro.close()


def test_types_defined_after_the_rule_are_resolved_lazily() -> None:
    info = later_defined.__rulework_rule__
    assert info.gets == (
        GetSpec(LaterOut, (LaterMid,), THIS_FILE, line_of(later_defined, "await Get(")),
    )
    assert info.gets[0].key == (LaterOut, LaterMid)


def test_rule_options() -> None:
    @rule(persist=True, version="3", canonical_name="pipeline.thumbnail")
    async def thumb(x: LaterIn) -> LaterOut:
        return LaterOut(x.value)

    info = thumb.__rulework_rule__
    assert (info.persist, info.version, info.name) == (True, "3", "pipeline.thumbnail")
    assert info.builtin is False


def test_a_name_that_never_resolves_is_reported_when_resolving() -> None:
    @rule
    async def uses_missing(x: NeverDefined) -> LaterOut:  # type: ignore[name-defined]  # noqa: F821
        return LaterOut(1)

    info = uses_missing.__rulework_rule__
    with pytest.raises(RuleDefinitionError) as exc:
        info.resolve()
    message = str(exc.value)
    assert "uses_missing" in message
    assert "`NeverDefined`" in message
    assert "Import or define it at module level" in message
    with pytest.raises(RuleDefinitionError, match="NeverDefined"):
        collect_rules({"uses_missing": uses_missing})


def test_local_classes_resolve_from_string_annotations() -> None:
    @rule
    async def local_rule(x: Local) -> LocalOut:
        return LocalOut()

    @dataclass(frozen=True)
    class Local:
        pass

    @dataclass(frozen=True)
    class LocalOut:
        pass

    info = local_rule.__rulework_rule__
    assert info.parameter_types == (Local,)
    assert info.output_type is LocalOut


# ----------------------------------------------------------------------------------------------
# Decoration-time validation


@dataclass
class PlainDataclass:
    value: int


class EqWithoutHash:
    def __eq__(self, other: object) -> bool:
        return True

    __hash__ = None  # type: ignore[assignment]


@attrs.define
class MutableAttrs:
    value: int


@attrs.frozen
class FrozenAttrs:
    value: int


def _define(kind: str) -> None:
    """Define an invalid rule of the given kind (the decorator must raise)."""
    if kind == "sync":

        @rule  # type: ignore[type-var]
        def not_async(x: LaterIn) -> LaterOut:
            return LaterOut(1)

    elif kind == "param_annotation":

        @rule
        async def missing_param_annotation(x) -> LaterOut:  # type: ignore[no-untyped-def]
            return LaterOut(1)

    elif kind == "return_annotation":

        @rule
        async def missing_return(x: LaterIn):  # type: ignore[no-untyped-def]
            return LaterOut(1)

    elif kind == "list":

        @rule
        async def takes_list(paths: list[str]) -> LaterOut:
            return LaterOut(1)

    elif kind == "list_class":

        @rule
        async def takes_list_class(paths: list) -> LaterOut:  # type: ignore[type-arg]
            return LaterOut(1)

    elif kind == "dict":

        @rule
        async def returns_dict(x: LaterIn) -> dict:  # type: ignore[type-arg]
            return {}

    elif kind == "set":

        @rule
        async def takes_set(s: set) -> LaterOut:  # type: ignore[type-arg]
            return LaterOut(1)

    elif kind == "dataclass":

        @rule
        async def takes_plain_dataclass(d: PlainDataclass) -> LaterOut:
            return LaterOut(1)

    elif kind == "unhashable":

        @rule
        async def takes_unhashable(e: EqWithoutHash) -> LaterOut:
            return LaterOut(1)

    elif kind == "attrs":

        @rule
        async def takes_mutable_attrs(a: MutableAttrs) -> LaterOut:
            return LaterOut(1)

    elif kind == "args":

        @rule
        async def takes_args(*paths: LaterIn) -> LaterOut:
            return LaterOut(1)

    elif kind == "kwargs":

        @rule
        async def takes_kwargs(**options: LaterIn) -> LaterOut:
            return LaterOut(1)

    elif kind == "kwonly":

        @rule
        async def takes_kwonly(*, x: LaterIn) -> LaterOut:
            return LaterOut(1)

    elif kind == "default":

        @rule
        async def takes_default(x: LaterIn = LaterIn(1)) -> LaterOut:
            return LaterOut(1)

    elif kind == "union_type":

        @rule
        async def takes_optional(x: LaterIn | None) -> LaterOut:
            return LaterOut(1)

    elif kind == "generic":

        @rule
        async def takes_tuple_generic(x: tuple[int, ...]) -> LaterOut:
            return LaterOut(1)

    elif kind == "none_return":

        @rule
        async def returns_none(x: LaterIn) -> None:
            return None

    elif kind == "same_type_twice":

        @rule
        async def same_type_twice(a: LaterIn, b: LaterIn) -> LaterOut:
            return LaterOut(1)

    else:  # pragma: no cover
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("sync", ["not_async", "it is not async", "async def not_async"]),
        ("param_annotation", ["missing_param_annotation", "parameter `x`", "no type annotation"]),
        ("return_annotation", ["missing_return", "no return annotation", "-> OutputType"]),
        ("list", ["takes_list", "parameter `paths`", "parameterized generic", "frozen"]),
        ("list_class", ["takes_list_class", "parameter `paths`", "mutable", "tuple"]),
        ("dict", ["returns_dict", "return type", "`dict` is mutable"]),
        ("set", ["takes_set", "parameter `s`", "`set` is mutable", "frozenset"]),
        ("dataclass", ["takes_plain_dataclass", "parameter `d`", "@dataclass(frozen=True)"]),
        ("unhashable", ["takes_unhashable", "parameter `e`", "not hashable"]),
        ("attrs", ["takes_mutable_attrs", "parameter `a`", "@attrs.frozen"]),
        ("args", ["takes_args", "`*paths`", "*args"]),
        ("kwargs", ["takes_kwargs", "`**options`", "**kwargs"]),
        ("kwonly", ["takes_kwonly", "parameter `x` is keyword-only", "remove the `*`"]),
        ("default", ["takes_default", "parameter `x` has a default", "remove the default"]),
        ("union_type", ["takes_optional", "parameter `x`", "union of types", "@union"]),
        ("generic", ["takes_tuple_generic", "parameterized generic", "frozen"]),
        ("none_return", ["returns_none", "must return a value"]),
        ("same_type_twice", ["same_type_twice", "`a` and `b`", "same type `LaterIn`"]),
    ],
)
def test_invalid_rules_fail_at_decoration(kind: str, fragments: list[str]) -> None:
    with pytest.raises(RuleDefinitionError) as exc:
        _define(kind)
    message = str(exc.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert "test_rules.py:" in message  # points at the rule's file and line


def test_all_signature_problems_are_reported_together() -> None:
    with pytest.raises(RuleDefinitionError) as exc:

        @rule
        async def many_problems(a, *rest, b: LaterIn = LaterIn(1)):  # type: ignore[no-untyped-def]
            return None

    message = str(exc.value)
    assert "has 5 problems" in message
    for fragment in ("parameter `a` has no type", "`*rest`", "keyword-only", "default", "return"):
        assert fragment in message


def test_frozen_attrs_and_plain_immutable_types_are_accepted() -> None:
    @rule
    async def fine(a: FrozenAttrs, b: int, c: str, d: frozenset, e: tuple) -> bytes:  # type: ignore[type-arg]
        return b""

    assert fine.__rulework_rule__.parameter_types == (FrozenAttrs, int, str, frozenset, tuple)


def test_rule_on_a_class_is_rejected() -> None:
    with pytest.raises(RuleDefinitionError, match="decorates async functions"):
        rule(LaterIn)  # type: ignore[type-var]


# ----------------------------------------------------------------------------------------------
# Get and MultiGet


@union
class Request:
    pass


@dataclass(frozen=True)
class MemberRequest:
    name: str


def test_get_three_forms_and_keys() -> None:
    explicit = Get(LaterOut, LaterIn, LaterIn(1))
    assert explicit.output_type is LaterOut
    assert explicit.input_types == (LaterIn,)
    assert explicit.inputs == (LaterIn(1),)
    assert explicit.key == (LaterOut, LaterIn)

    inferred = Get(LaterOut, LaterMid(2))
    assert inferred.input_types == (LaterMid,)
    assert inferred.inputs == (LaterMid(2),)
    assert inferred.key == (LaterOut, LaterMid)

    several = Get(LaterOut, {LaterIn(1): LaterIn, LaterMid(2): LaterMid})
    assert several.input_types == (LaterIn, LaterMid)
    assert several.inputs == (LaterIn(1), LaterMid(2))
    assert several.key == (LaterOut, frozenset({LaterIn, LaterMid}))

    single_dict = Get(LaterOut, {LaterIn(1): LaterIn})
    assert single_dict.key == (LaterOut, LaterIn)


def test_get_on_a_union_base_keeps_the_base_in_the_key() -> None:
    get = Get(LaterOut, Request, MemberRequest("a"))
    assert get.input_types == (Request,)
    assert get.inputs == (MemberRequest("a"),)
    assert get.key == (LaterOut, Request)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: Get("LaterOut", LaterIn(1)), "first argument must be the output type"),
        (lambda: Get(LaterOut, LaterIn, LaterMid(1)), "is a LaterMid, not a LaterIn"),
        (lambda: Get(LaterOut, "LaterIn", LaterIn(1)), "second argument must be the input type"),
        (lambda: Get(LaterOut, {LaterIn(1): "LaterIn"}), "is not a class"),
        (lambda: Get(LaterOut, {LaterIn(1): LaterIn, LaterIn(2): LaterIn}), "two inputs"),
        (lambda: Get(LaterOut, {}), "at least one input"),
        (lambda: Get(LaterOut, {LaterIn(1): LaterMid}), "not the declared LaterMid"),
    ],
)
def test_get_validates_at_construction(make: Any, fragment: str) -> None:
    with pytest.raises(RuleDefinitionError, match=fragment.replace("(", r"\(")):
        make()


def test_get_equality_hash_and_repr() -> None:
    a = Get(LaterOut, LaterIn, LaterIn(1))
    assert a == Get(LaterOut, LaterIn(1))
    assert hash(a) == hash(Get(LaterOut, LaterIn(1)))
    assert a != Get(LaterOut, LaterIn(2))
    assert repr(a) == "Get(LaterOut, LaterIn, LaterIn(value=1))"


async def test_awaiting_a_get_outside_a_rule_explains_how_to_test() -> None:
    with pytest.raises(RuntimeError, match="run_rule_with_mocks"):
        await Get(LaterOut, LaterIn(1))
    with pytest.raises(RuntimeError, match="MultiGet"):
        await MultiGet(Get(LaterOut, LaterIn(1)))


def test_multiget_forms() -> None:
    g1, g2 = Get(LaterOut, LaterIn(1)), Get(LaterMid, LaterIn(2))
    assert MultiGet(g1, g2).gets == (g1, g2)
    assert MultiGet([g1, g2]).gets == (g1, g2)
    assert MultiGet(Get(LaterOut, LaterIn(i)) for i in range(3)).gets == tuple(
        Get(LaterOut, LaterIn(i)) for i in range(3)
    )
    assert MultiGet(g1).gets == (g1,)
    assert MultiGet().gets == ()
    with pytest.raises(RuleDefinitionError, match="item 1 is 'nope', not a Get"):
        MultiGet(g1, "nope")  # type: ignore[call-overload]
    with pytest.raises(RuleDefinitionError, match="one iterable of Gets"):
        MultiGet(42)  # type: ignore[call-overload]


# ----------------------------------------------------------------------------------------------
# Static Get discovery


class Holder:
    @dataclass(frozen=True)
    class Inner:
        pass


@rule
async def three_forms(x: LaterIn) -> LaterOut:
    a = await Get(LaterOut, LaterIn, x)
    b = await Get(LaterMid, LaterIn(2))
    c = await Get(Holder.Inner, {x: LaterIn, LaterMid(1): LaterMid})
    return LaterOut(a.value + b.value + len(repr(c)))


def test_discovers_each_get_form_in_source_order() -> None:
    gets = three_forms.__rulework_rule__.gets
    assert [(g.output_type, g.input_types) for g in gets] == [
        (LaterOut, (LaterIn,)),
        (LaterMid, (LaterIn,)),
        (Holder.Inner, (LaterIn, LaterMid)),
    ]
    assert [g.lineno for g in gets] == [
        line_of(three_forms, "a = await"),
        line_of(three_forms, "b = await"),
        line_of(three_forms, "c = await"),
    ]
    assert all(g.filename == THIS_FILE for g in gets)
    assert gets[2].key == (Holder.Inner, frozenset({LaterIn, LaterMid}))


@rule
async def dotted_aliased_and_multiget(x: LaterIn) -> LaterOut:
    a = await rw.Get(LaterOut, LaterIn, x)
    b = await AliasedGet(LaterMid, LaterIn, x)
    many = await MultiGet(Get(Holder.Inner, LaterMid(i)) for i in range(x.value))
    more = await MultiGet([rw.Get(LaterIn, LaterMid(i)) for i in range(2)])

    async def nested() -> LaterOut:
        return await Get(LaterOut, LaterMid, LaterMid(0))

    return LaterOut(a.value + b.value + len(many) + len(more) + (await nested()).value)


@rule
async def via_package_name(x: LaterIn) -> LaterOut:
    return await rulework.Get(LaterOut, LaterIn, x)


def test_discovers_gets_spelled_through_the_package() -> None:
    assert [g.key for g in via_package_name.__rulework_rule__.gets] == [(LaterOut, LaterIn)]


def test_discovers_dotted_aliased_multiget_and_nested_gets() -> None:
    gets = dotted_aliased_and_multiget.__rulework_rule__.gets
    assert [g.key for g in gets] == [
        (LaterOut, LaterIn),
        (LaterMid, LaterIn),
        (Holder.Inner, LaterMid),
        (LaterIn, LaterMid),
        (LaterOut, LaterMid),
    ]


def test_nested_rule_resolves_types_from_its_closure() -> None:
    @dataclass(frozen=True)
    class Inp:
        pass

    @dataclass(frozen=True)
    class Res:
        pass

    @rule
    async def nested(x: Inp) -> LaterOut:
        await Get(Res, Inp, x)
        await Get(Res, Inp())
        return LaterOut(1)

    assert [g.key for g in nested.__rulework_rule__.gets] == [(Res, Inp), (Res, Inp)]


def test_nested_rule_with_a_type_defined_after_it_in_the_function() -> None:
    @rule
    async def early(x: LaterIn) -> LaterOut:
        await Get(DefinedLater, LaterIn, x)
        return LaterOut(1)

    @dataclass(frozen=True)
    class DefinedLater:
        pass

    assert early.__rulework_rule__.gets[0].output_type is DefinedLater


def _passthrough(func: Any) -> Any:
    @functools.wraps(func)
    async def wrapper(*args: Any) -> Any:
        return await func(*args)

    return wrapper


@rule
@_passthrough
async def decorated(x: LaterIn) -> LaterOut:
    return await Get(LaterOut, LaterMid(x.value))


def test_a_rule_wrapped_by_another_decorator() -> None:
    info = decorated.__rulework_rule__
    assert info.parameter_names == ("x",)
    assert info.parameter_types == (LaterIn,)
    assert [g.key for g in info.gets] == [(LaterOut, LaterMid)]
    assert info.func is decorated


@rule_helper
async def fetch_out(x: LaterIn) -> LaterOut:
    return await Get(LaterOut, LaterIn, x)


@rule_helper
async def fetch_twice(x: LaterIn) -> LaterOut:
    await fetch_out(x)
    return await Get(LaterOut, LaterMid, LaterMid(x.value))


@rule
async def uses_helpers(x: LaterIn) -> Holder.Inner:
    await fetch_twice(x)
    await helper_defined_later(x)
    return Holder.Inner()


@rule_helper
async def helper_defined_later(x: LaterIn) -> LaterMid:
    return await Get(LaterMid, LaterIn, x)


def test_gets_of_helpers_count_transitively_even_when_defined_later() -> None:
    gets = uses_helpers.__rulework_rule__.gets
    assert {g.key for g in gets} == {
        (LaterOut, LaterIn),
        (LaterOut, LaterMid),
        (LaterMid, LaterIn),
    }
    by_key = {g.key: g for g in gets}
    assert by_key[(LaterOut, LaterIn)].lineno == line_of(fetch_out, "await Get(")


def test_rule_helper_must_be_async() -> None:
    with pytest.raises(RuleDefinitionError, match="must be defined with `async def`"):

        @rule_helper  # type: ignore[type-var]
        def helper(x: LaterIn) -> LaterOut:
            return LaterOut(1)


@pytest.fixture
def tmp_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Write modules into a temporary package directory and import them."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created: list[str] = []

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    def load(name: str) -> Any:
        created.append(name)
        return importlib.import_module(name)

    yield write, load
    for name in created:
        sys.modules.pop(name, None)


def test_helpers_imported_from_another_module_under_aliases(tmp_modules: Any) -> None:
    write, load = tmp_modules
    write(
        "rw_helpers_mod",
        """
        from dataclasses import dataclass
        from rulework.engine.rules import Get, rule_helper

        @dataclass(frozen=True)
        class Req:
            n: int

        @dataclass(frozen=True)
        class Res:
            n: int

        @rule_helper
        async def fetch(r: Req) -> Res:
            return await Get(Res, Req, r)
        """,
    )
    path = write(
        "rw_rules_mod",
        """
        from __future__ import annotations
        from dataclasses import dataclass
        import rw_helpers_mod
        from rw_helpers_mod import Req, fetch as grab
        from rulework.engine import rules as engine_rules
        from rulework.engine.rules import Get as G

        @dataclass(frozen=True)
        class Out:
            n: int

        @engine_rules.rule
        async def top(r: Req) -> Out:
            a = await grab(r)
            b = await rw_helpers_mod.fetch(r)
            c = await G(Out, rw_helpers_mod.Res, a)
            return Out(a.n + b.n + c.n)
        """,
    )
    helpers = load("rw_helpers_mod")
    mod = load("rw_rules_mod")
    gets = mod.top.__rulework_rule__.gets
    # The rule's own Gets first, in source order, then those of the helpers it calls.
    assert [g.key for g in gets] == [(mod.Out, helpers.Res), (helpers.Res, helpers.Req)]
    assert gets[0].filename == str(path)
    assert gets[1].filename == str(Path(helpers.__file__))
    assert collect_rules(mod) == [mod.top]


def test_a_module_is_parsed_once_and_only_if_needed(
    tmp_modules: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    write, load = tmp_modules
    body = "\n".join(
        f"""
@rule
async def r{i}(x: In) -> Out{i}:
    return await Get(Out{i}, In, x)
"""
        for i in range(5)
    )
    types_ = "\n".join(f"class Out{i}: pass" for i in range(5))
    with_gets = write(
        "rw_parse_once",
        f"from rulework.engine.rules import Get, rule\nclass In: pass\n{types_}\n{body}",
    )
    without_gets = write(
        "rw_parse_never",
        "from rulework.engine.rules import rule\nclass In: pass\nclass Out: pass\n"
        "@rule\nasync def plain(x: In) -> Out:\n    return Out()\n",
    )
    parsed: list[str] = []
    real_parse = ast.parse

    def counting_parse(source: Any, filename: str = "<unknown>", *args: Any, **kw: Any) -> Any:
        parsed.append(filename)
        return real_parse(source, filename, *args, **kw)

    monkeypatch.setattr(rw.ast, "parse", counting_parse)
    mod = load("rw_parse_once")
    plain = load("rw_parse_never")
    assert parsed.count(str(with_gets)) == 1
    assert [len(getattr(mod, f"r{i}").__rulework_rule__.gets) for i in range(5)] == [1] * 5
    assert str(without_gets) not in parsed
    assert plain.plain.__rulework_rule__.gets == ()


def test_unresolvable_get_type_points_at_file_and_line() -> None:
    @rule
    async def bad_get(x: LaterIn) -> LaterOut:
        return await Get(NoSuchType, LaterIn, x)  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(RuleDefinitionError) as exc:
        bad_get.__rulework_rule__.resolve()
    message = str(exc.value)
    assert f"test_rules.py:{line_of(bad_get, 'await Get(')}" in message
    assert "`NoSuchType` cannot be resolved" in message
    assert "bad_get" in message


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("value = LaterIn(1)\n    return await Get(LaterOut, value)", "cannot tell the input type"),
        ("return await Get(LaterOut, LaterIn, x, x)", "has 4 arguments"),
        ("return await Get(output_type=LaterOut, x=x)", "positionally"),
        ("return await Get(LaterOut, make_in(1))", "Get(Out, InputType, make_input(...))"),
        ("return await Get(LaterOut, {**{}})", "literal {value: Type, ...} dict"),
        ("return await Get(LaterOut, types_list[0], x)", "must be a class name"),
    ],
)
def test_malformed_gets_fail_at_decoration(body: str, fragment: str) -> None:
    source = (
        "from __future__ import annotations\n"
        "@rule\n"
        f"async def malformed(x: LaterIn) -> LaterOut:\n    {body}\n"
    )
    filename = f"<rulework-test-malformed-{abs(hash(body))}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {
        "rule": rule,
        "Get": Get,
        "LaterIn": LaterIn,
        "LaterOut": LaterOut,
        "make_in": lambda n: LaterIn(n),
        "types_list": [LaterIn],
        "__name__": "malformed_module",
    }
    with pytest.raises(RuleDefinitionError) as exc:
        exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    message = str(exc.value)
    assert fragment in message, message
    assert f"{filename}:{3 + body.count(chr(10)) + 1}" in message  # the Get's own line


def test_rules_made_with_exec_need_their_source_registered() -> None:
    source = (
        "@rule\n"
        "async def generated(x: LaterIn) -> LaterOut:\n"
        "    return await Get(LaterOut, LaterMid, LaterMid(1))\n"
    )
    namespace: dict[str, Any] = {
        "rule": rule,
        "Get": Get,
        "LaterIn": LaterIn,
        "LaterMid": LaterMid,
        "LaterOut": LaterOut,
        "__name__": "generated_module",
    }
    filename = "<rulework-test-generated>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    assert namespace["generated"].__rulework_rule__.gets[0].key == (LaterOut, LaterMid)

    with pytest.raises(RuleDefinitionError) as exc:
        exec(compile(source, "<unregistered>", "exec", dont_inherit=True), namespace)
    assert "linecache.cache[filename]" in str(exc.value)


# ----------------------------------------------------------------------------------------------
# QueryRule, collect_rules, unions


def test_query_rule() -> None:
    query = QueryRule(LaterOut, [LaterIn, LaterMid])
    assert query.param_types == (LaterIn, LaterMid)
    assert query == QueryRule(LaterOut, (LaterIn, LaterMid))
    assert hash(query) == hash(QueryRule(LaterOut, (LaterIn, LaterMid)))
    assert repr(query) == "QueryRule(LaterOut, (LaterIn, LaterMid))"
    assert repr(QueryRule(LaterOut, (LaterIn,))) == "QueryRule(LaterOut, (LaterIn,))"
    assert QueryRule(LaterOut, LaterIn).param_types == (LaterIn,)
    with pytest.raises(RuleDefinitionError, match="listed twice"):
        QueryRule(LaterOut, (LaterIn, LaterIn))
    with pytest.raises(RuleDefinitionError, match="is not a class"):
        QueryRule("LaterOut", (LaterIn,))  # type: ignore[arg-type]


def test_collect_rules_from_the_calling_module_a_dict_and_a_module() -> None:
    collected = collect_rules()
    for expected in (later_defined, three_forms, uses_helpers, decorated):
        assert expected in collected
    assert fetch_out not in collected  # helpers are not rules
    assert collect_rules({"a": three_forms, "b": three_forms, "c": 1}) == [three_forms]
    assert three_forms in collect_rules(sys.modules[__name__])


def test_collect_rules_reports_every_problem() -> None:
    @rule
    async def first(x: Missing1) -> LaterOut:  # type: ignore[name-defined]  # noqa: F821
        return LaterOut(1)

    @rule
    async def second(x: LaterIn) -> LaterOut:
        return await Get(Missing2, LaterIn, x)  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(RuleDefinitionError) as exc:
        collect_rules({"first": first, "second": second})
    assert "Missing1" in str(exc.value) and "Missing2" in str(exc.value)


def test_union_marks_only_the_decorated_class() -> None:
    class Sub(Request):
        pass

    assert is_union(Request)
    assert not is_union(Sub)
    assert not is_union(MemberRequest)
    with pytest.raises(RuleDefinitionError, match="decorates classes"):
        union(42)  # type: ignore[type-var]


def test_union_rule_validates_its_base() -> None:
    assert UnionRule(Request, MemberRequest).member is MemberRequest
    with pytest.raises(RuleDefinitionError, match="Decorate it with @union"):
        UnionRule(MemberRequest, LaterIn)
    with pytest.raises(RuleDefinitionError, match="must be a class"):
        UnionRule(Request, "MemberRequest")  # type: ignore[arg-type]


def test_union_membership() -> None:
    class Other:
        pass

    membership = UnionMembership.from_rules(
        [UnionRule(Request, MemberRequest), UnionRule(Request, Other), UnionRule(Request, Other)]
    )
    assert membership.get(Request) == (MemberRequest, Other)
    assert membership.get(LaterIn) == ()
    assert membership.is_member(Request, Other)
    assert not membership.is_member(Request, LaterIn)
    assert Request in membership
    assert membership == UnionMembership({Request: [MemberRequest, Other]})
    assert hash(membership) == hash(UnionMembership({Request: (MemberRequest, Other)}))
    assert membership != UnionMembership({})
    with pytest.raises(AttributeError):
        membership._members = {}  # type: ignore[misc]
    assert "Request: (MemberRequest, Other)" in repr(membership)


def test_rule_info_create_validates_types() -> None:
    async def body(a: Any) -> Any:
        return a

    info = RuleInfo.create(body, output_type=LaterOut, parameter_types=(LaterIn,), name="x.body")
    assert (info.name, info.parameter_names, info.gets) == ("x.body", ("arg0",), ())
    with pytest.raises(RuleDefinitionError, match="parameter `arg0`: `list` is mutable"):
        RuleInfo.create(body, output_type=LaterOut, parameter_types=(list,))
    with pytest.raises(RuleDefinitionError, match="2 parameter names for 1 types"):
        RuleInfo.create(
            body, output_type=LaterOut, parameter_types=(LaterIn,), parameter_names=("a", "b")
        )


# ----------------------------------------------------------------------------------------------
# Static typing of Get / MultiGet


TYPING_SNIPPET = """
from typing import assert_type
from rulework.engine.rules import Get, MultiGet

class A: ...
class B: ...
class C: ...

async def check(a: A) -> None:
    assert_type(await Get(B, A, a), B)
    assert_type(await Get(B, A()), B)
    assert_type(await Get(C, {a: A}), C)
    assert_type(await MultiGet(Get(B, A()), Get(C, A())), tuple[B, C])
    assert_type(await MultiGet(Get(B, A()), Get(C, A()), Get(A, B())), tuple[B, C, A])
    assert_type(await MultiGet(Get(B, A()) for _ in range(3)), tuple[B, ...])
    assert_type(await MultiGet([Get(C, A())]), tuple[C, ...])
"""


def test_get_and_multiget_are_typed_for_mypy(tmp_path: Path) -> None:
    from mypy import api as mypy_api  # a test dependency: this never skips

    snippet = tmp_path / "typing_snippet.py"
    snippet.write_text(TYPING_SNIPPET)
    stdout, stderr, status = mypy_api.run(
        [
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(snippet),
        ]
    )
    assert status == 0, stdout + stderr
