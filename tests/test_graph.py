"""Tests for the rule graph solver: resolution, monomorphization, validation messages, rendering.

Most rule sets here are built with `RuleInfo.create` (explicit types and Gets) to keep each test
to the point; the tests of messages use real `@rule` functions, whose file and line appear in
the messages.
"""

import itertools
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rulework.engine import graph as graph_module
from rulework.engine.errors import NoSuchQueryError, RuleDefinitionError, RuleGraphError
from rulework.engine.graph import (
    ParamSource,
    RuleGraph,
    RuleGraphWarning,
    RuleNode,
    UnionDispatch,
    check_invariants,
)
from rulework.engine.rules import (
    Get,
    GetSpec,
    MultiGet,
    QueryRule,
    RuleInfo,
    UnionMembership,
    UnionRule,
    is_union,
    rule,
    union,
)


class A: ...


class B: ...


class C: ...


class D: ...


class P: ...


class Q: ...


class X: ...


class Y: ...


class Out: ...


class Cfg: ...


def r(
    name: str,
    out: type,
    params: Sequence[type] = (),
    gets: Iterable[tuple[type, type | tuple[type, ...]]] = (),
) -> RuleInfo:
    """A rule described explicitly (its body is never run by these tests)."""

    async def body(*args: Any) -> Any:
        raise AssertionError("not run")

    specs = [
        GetSpec(o, i if isinstance(i, tuple) else (i,), "synthetic_rules.py", 100 + n)
        for n, (o, i) in enumerate(gets)
    ]
    return RuleInfo.create(
        body,
        output_type=out,
        parameter_types=params,
        parameter_names=[t.__name__.lower() for t in params],
        gets=specs,
        name=name,
    )


def build(*items: object, strict: bool = False) -> RuleGraph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuleGraphWarning)
        graph = RuleGraph.build(items, strict=strict)
    assert check_invariants(graph.nodes(), dict(_roots(graph))) == []
    return graph


def _roots(graph: RuleGraph) -> Iterable[tuple[QueryRule, Any]]:
    for query in graph.queries:
        yield query, graph.root(query.output_type, query.param_types)


def problems_of(*items: object, strict: bool = False) -> tuple[str, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuleGraphWarning)
        with pytest.raises(RuleGraphError) as exc:
            RuleGraph.build(items, strict=strict)
    return exc.value.problems


def node_of(graph: RuleGraph, name: str) -> list[RuleNode]:
    return [n for n in graph.nodes() if n.rule.name == name]


# ----------------------------------------------------------------------------------------------
# Resolution


def test_chain_consumes_params_and_ignores_unused_ones() -> None:
    graph = build(r("a", A, [P]), r("b", B, [A]), QueryRule(B, (P, Q)))
    root = graph.root(B, (Q, P))
    assert isinstance(root, RuleNode) and root.rule.name == "b"
    assert root.params == (P,)  # Q is in scope but nothing consumes it
    (dep,) = root.dependencies
    assert isinstance(dep, RuleNode) and dep.rule.name == "a"
    assert dep.params == (P,)
    assert dep.dependencies == (ParamSource(P),)
    assert [n.id for n in graph.nodes()] == [0, 1]


def test_a_param_in_scope_beats_a_rule_producing_its_type() -> None:
    graph = build(
        r("default_cfg", Cfg),
        r("use", Out, [Cfg]),
        QueryRule(Out, (Cfg,)),
        QueryRule(Out, ()),
    )
    with_param = graph.root(Out, (Cfg,))
    without = graph.root(Out, ())
    assert isinstance(with_param, RuleNode) and isinstance(without, RuleNode)
    assert with_param.dependencies == (ParamSource(Cfg),)
    assert with_param.params == (Cfg,)
    assert isinstance(without.dependencies[0], RuleNode)
    assert without.dependencies[0].rule.name == "default_cfg"
    assert without.params == ()
    assert with_param is not without  # one node per set of consumed params


def test_root_is_a_param_when_the_query_asks_for_one_of_its_params() -> None:
    graph = build(r("a", A, [P]), QueryRule(A, (A, P)))
    assert graph.root(A, (A, P)) == ParamSource(A)


def test_two_rules_for_one_type_are_ambiguous_whatever_their_params() -> None:
    (problem,) = problems_of(
        r("cfg_default", Cfg), r("cfg_from_p", Cfg, [P]), r("use", Out, [Cfg]), QueryRule(Out, (P,))
    )
    assert problem.startswith("Ambiguous: 2 rules can compute `Cfg` for parameter `cfg: Cfg`")
    assert "cfg_default() -> Cfg" in problem and "cfg_from_p(p: P) -> Cfg" in problem
    assert "add `Cfg` to the params of QueryRule(Out, (P,))" in problem


def test_a_get_adds_its_input_to_the_scope_of_its_subgraph() -> None:
    graph = build(
        r("top", Out, [P], gets=[(B, C)]),
        r("b", B, [C, P]),
        QueryRule(Out, (P,)),
    )
    root = graph.root(Out, (P,))
    assert isinstance(root, RuleNode)
    target = root.gets[(B, C)]
    assert isinstance(target, RuleNode) and target.rule.name == "b"
    assert set(target.params) == {C, P}  # P from the outer scope, C from the Get
    assert root.params == (P,)  # C is provided by the Get, not consumed from outside


def test_a_get_must_consume_its_input() -> None:
    class Digest: ...

    class CreateDigest: ...

    (problem,) = problems_of(
        r("uses_digest", Out, [Digest], gets=[(Digest, CreateDigest)]),
        QueryRule(Out, (Digest,)),
    )
    assert problem.startswith(
        "`Get(Digest, CreateDigest)` in rule `uses_digest` at synthetic_rules.py:100 cannot use "
        "its input"
    )
    assert "Params in scope there: Digest; the Get adds CreateDigest." in problem
    assert "async def make(x: CreateDigest) -> Digest" in problem
    graph = build(
        r("uses_digest", Out, [Digest], gets=[(Digest, CreateDigest)]),
        r("create_digest", Digest, [CreateDigest]),
        QueryRule(Out, (Digest,)),
    )
    root = graph.root(Out, (Digest,))
    assert isinstance(root, RuleNode)
    target = root.gets[(Digest, CreateDigest)]
    assert isinstance(target, RuleNode) and target.rule.name == "create_digest"


def test_a_get_prefers_computing_from_its_input_over_a_param_in_scope() -> None:
    # Pants' test_potentially_ambiguous_get: below Get(B, C), B's rule needs an A that is both a
    # param in scope and computable from C; the computation from C is used.
    graph = build(
        r("b_from_a", B, [A]),
        r("a_from_c", A, [C]),
        r("top", Out, [A], gets=[(B, C)]),
        QueryRule(Out, (A,)),
    )
    root = graph.root(Out, (A,))
    assert isinstance(root, RuleNode)
    b_node = root.gets[(B, C)]
    assert isinstance(b_node, RuleNode) and b_node.params == (C,)
    (a_node,) = b_node.dependencies
    assert isinstance(a_node, RuleNode) and a_node.rule.name == "a_from_c"


def test_a_get_deviates_as_deep_as_needed_to_use_its_input() -> None:
    graph = build(
        r("b_from_a", B, [A]),
        r("a_from_x", A, [X]),
        r("x_from_c", X, [C]),
        r("top", Out, [A, X], gets=[(B, C)]),
        QueryRule(Out, (A, X)),
    )
    root = graph.root(Out, (A, X))
    assert isinstance(root, RuleNode)
    chain = []
    node: Any = root.gets[(B, C)]
    while isinstance(node, RuleNode):
        chain.append(node.rule.name)
        node = node.dependencies[0]
    assert chain == ["b_from_a", "a_from_x", "x_from_c"]
    assert node == ParamSource(C)


def test_a_get_input_can_resolve_an_ambiguity_of_the_preferred_way() -> None:
    # In scope {C, D} two rules make A; the Get's input C selects the one that consumes it.
    graph = build(
        r("b", B, [A]),
        r("a_from_c", A, [C]),
        r("a_from_d", A, [D]),
        r("top", Out, [D], gets=[(B, C)]),
        QueryRule(Out, (D,)),
    )
    root = graph.root(Out, (D,))
    assert isinstance(root, RuleNode)
    b_node = root.gets[(B, C)]
    assert isinstance(b_node, RuleNode)
    assert b_node.dependencies[0].rule.name == "a_from_c"  # type: ignore[union-attr]
    assert b_node.params == (C,)


def test_a_get_with_two_equally_good_ways_is_ambiguous() -> None:
    (problem,) = problems_of(
        r("b", B, [A, X]),
        r("a_from_c", A, [C]),
        r("x_from_c", X, [C]),
        r("top", Out, [A, X], gets=[(B, C)]),
        QueryRule(Out, (A, X)),
    )
    assert problem.startswith("Ambiguous: `Get(B, C)` in rule `top`")
    assert "none of them uses params everywhere the others do" in problem
    assert "b(a=a_from_c(c=param), x=param)" in problem
    assert "b(a=param, x=x_from_c(c=param))" in problem


def test_a_get_with_several_inputs() -> None:
    graph = build(
        r("from_two", B, [A, C]),
        r("top", Out, [P], gets=[(B, (A, C))]),
        QueryRule(Out, (P,)),
    )
    root = graph.root(Out, (P,))
    assert isinstance(root, RuleNode)
    key = (B, frozenset({A, C}))
    assert key == Get(B, {A(): A, C(): C}).key
    target = root.gets[key]
    assert isinstance(target, RuleNode) and set(target.params) == {A, C}


def test_get_targets_are_keyed_like_the_awaited_get() -> None:
    @rule
    async def three(p: P) -> Out:
        await Get(A, P, p)
        await Get(B, P())
        await Get(C, {p: P, Q(): Q})
        return Out()

    graph = build(three, r("a", A, [P]), r("b", B, [P]), r("c", C, [P, Q]), QueryRule(Out, (P,)))
    root = graph.root(Out, (P,))
    assert isinstance(root, RuleNode)
    for get in (Get(A, P, P()), Get(B, P()), Get(C, {P(): P, Q(): Q})):
        assert get.key in root.gets


def test_recursion_through_a_get_points_back_at_the_same_node() -> None:
    class N(int): ...

    class Fib(int): ...

    graph = build(r("fib", Fib, [N], gets=[(Fib, N)]), QueryRule(Fib, (N,)))
    (node,) = graph.nodes()
    assert node.gets[(Fib, N)] is node
    assert node.params == (N,)


def test_mutual_recursion_through_gets() -> None:
    class N(int): ...

    class IsEven: ...

    class IsOdd: ...

    graph = build(
        r("is_even", IsEven, [N], gets=[(IsOdd, N)]),
        r("is_odd", IsOdd, [N], gets=[(IsEven, N)]),
        QueryRule(IsEven, (N,)),
    )
    even, odd = graph.nodes()
    assert (even.rule.name, odd.rule.name) == ("is_even", "is_odd")
    assert even.gets[(IsOdd, N)] is odd and odd.gets[(IsEven, N)] is even


# Hierarchical aggregation: a rule Gets its own output type from a finer-grained input, whose
# rule does the same one level down. The params of the outer levels stay in scope below, so at
# each Get several rules producing the type can run; rule 1 keeps the one consuming the input.


@dataclass(frozen=True)
class Group:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class SuperGroup:
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class Everything:
    supers: tuple[SuperGroup, ...]


@dataclass(frozen=True)
class Sum:
    value: int


@rule
async def group_sum(group: Group) -> Sum:
    return Sum(len(group.paths))


@rule
async def super_sum(sg: SuperGroup) -> Sum:
    parts = await MultiGet(Get(Sum, Group, g) for g in sg.groups)
    return Sum(sum(s.value for s in parts))


@rule
async def total(everything: Everything) -> Sum:
    parts = await MultiGet(Get(Sum, SuperGroup, sg) for sg in everything.supers)
    return Sum(sum(s.value for s in parts))


def test_nested_gets_of_one_type_are_served_by_the_rule_consuming_the_input() -> None:
    # Inside super_sum (reached from total), Everything and SuperGroup are still in scope, so
    # total and super_sum could run for Get(Sum, Group) too: neither consumes the Group.
    graph = build(group_sum, super_sum, total, QueryRule(Sum, (Everything,)))
    root = graph.root(Sum, (Everything,))
    assert isinstance(root, RuleNode) and root.rule.name == f"{__name__}.total"
    middle = root.gets[(Sum, SuperGroup)]
    assert isinstance(middle, RuleNode) and middle.rule.name == f"{__name__}.super_sum"
    leaf = middle.gets[(Sum, Group)]
    assert isinstance(leaf, RuleNode) and leaf.rule.name == f"{__name__}.group_sum"
    assert (root.params, middle.params, leaf.params) == ((Everything,), (SuperGroup,), (Group,))
    assert len(graph.nodes()) == 3


def hierarchy(
    depth: int, *, opt: bool = False, outer_at_leaf: bool = False, union_at: int | None = None
) -> tuple[list[Any], list[type], QueryRule]:
    """`sum_i(level_i) -> Out` Getting `Out` from `level_{i-1}`, i = 0..depth-1; query at the top.

    The query also passes `Y`, which nothing consumes.

    Args:
        opt: the leaf also takes `Cfg`, a query param (so every level consumes it).
        outer_at_leaf: the leaf also takes the top level's type, still in scope down there.
        union_at: the Get of that level goes through a union whose members are the level
            below and `Other` (served by `other_sum(other: Other) -> Out`).
    """
    levels = [type(f"Level{i}", (), {}) for i in range(depth)]
    items: list[Any] = []
    for i, level in enumerate(levels):
        params = [level]
        if i == 0 and opt:
            params.append(Cfg)
        if i == 0 and outer_at_leaf:
            params.append(levels[-1])
        gets: list[tuple[type, type]] = []
        if i > 0 and union_at == i:
            base = union(type(f"Part{i}", (), {}))
            other = type("Other", (), {})
            items += [UnionRule(base, levels[i - 1]), UnionRule(base, other)]
            items.append(r("other_sum", Out, [other]))
            gets.append((Out, base))
        elif i > 0:
            gets.append((Out, levels[i - 1]))
        items.append(r(f"sum{i}", Out, params, gets=gets))
    query = QueryRule(Out, (levels[-1], *([Cfg] if opt else []), Y))
    return [*items, query], levels, query


def assert_levels_chain(
    graph: RuleGraph, levels: Sequence[type], query: QueryRule, extra: set[type]
) -> None:
    """One node per level; `sum_i` Gets `Out` from `sum_{i-1}` and consumes `level_i` + `extra`."""
    for i, level in enumerate(levels):
        (node,) = node_of(graph, f"sum{i}")
        assert set(node.params) == {level} | extra, node
        for key, target in node.gets.items():
            targets = target.members.values() if isinstance(target, UnionDispatch) else [target]
            names = {t.rule.name for t in targets if isinstance(t, RuleNode)}
            assert names - {"other_sum"} == {f"sum{i - 1}"}, (key, names)
    root = graph.root(query.output_type, query.param_types)
    assert isinstance(root, RuleNode) and root.rule.name == f"sum{len(levels) - 1}"


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize(
    ("opt", "outer_at_leaf"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_hierarchical_aggregation_builds_at_every_depth(
    depth: int, opt: bool, outer_at_leaf: bool
) -> None:
    items, levels, query = hierarchy(depth, opt=opt, outer_at_leaf=outer_at_leaf)
    extra = ({Cfg} if opt else set()) | ({levels[-1]} if outer_at_leaf else set())
    assert_levels_chain(build(*items), levels, query, extra)
    # The solver must not depend on which level it meets first.
    assert_levels_chain(build(*reversed(items)), levels, query, extra)


@pytest.mark.parametrize(("depth", "union_at"), [(2, 1), (3, 1), (3, 2), (4, 2), (5, 1), (5, 4)])
def test_hierarchical_aggregation_through_a_union_level(depth: int, union_at: int) -> None:
    items, levels, query = hierarchy(depth, opt=True, union_at=union_at)
    graph = build(*items)
    assert_levels_chain(graph, levels, query, {Cfg})
    (node,) = node_of(graph, f"sum{union_at}")
    (dispatch,) = node.gets.values()
    assert isinstance(dispatch, UnionDispatch)
    served = {m.__name__: t for m, t in dispatch.members.items() if isinstance(t, RuleNode)}
    assert {member: node.rule.name for member, node in served.items()} == {
        f"Level{union_at - 1}": f"sum{union_at - 1}",
        "Other": "other_sum",
    }
    (other,) = node_of(graph, "other_sum")
    assert [t.__name__ for t in other.params] == ["Other"]


def test_nested_gets_of_one_type_cost_polynomially_in_depth(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every level's rule can run wherever its level is in scope, and the levels above stay in
    # scope: exploring the Gets of rules that cannot run opened one scope per subset of the
    # levels (doubling the work per level). Counted in solver steps, not timed.
    calls = 0
    solve = graph_module._Builder.solve

    def counting(self: Any, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        return solve(self, *args)

    monkeypatch.setattr(graph_module._Builder, "solve", counting)
    steps = []
    for depth in (6, 12):
        calls = 0
        items, levels, query = hierarchy(depth, opt=True, union_at=depth // 2)
        assert_levels_chain(build(*items), levels, query, {Cfg})
        steps.append(calls)
    assert steps[1] < 16 * steps[0], steps  # cubic: 8 times the steps for twice the depth


def test_hierarchical_aggregation_with_a_recursive_level() -> None:
    # A directory sums its files and, recursively, its subdirectories; a tree sums its dirs.
    class File: ...

    class Dir: ...

    class Tree: ...

    graph = build(
        r("file_sum", Out, [File, Cfg]),
        r("dir_sum", Out, [Dir], gets=[(Out, Dir), (Out, File)]),
        r("tree_sum", Out, [Tree], gets=[(Out, Dir)]),
        QueryRule(Out, (Tree, Cfg)),
    )
    (tree,) = node_of(graph, "tree_sum")
    (dir_node,) = node_of(graph, "dir_sum")
    (file_node,) = node_of(graph, "file_sum")
    assert tree.gets[(Out, Dir)] is dir_node
    assert dir_node.gets == {(Out, Dir): dir_node, (Out, File): file_node}
    assert (tree.params, dir_node.params, file_node.params) == (
        (Cfg, Tree),
        (Cfg, Dir),
        (Cfg, File),
    )


def test_a_real_ambiguity_in_nested_gets_is_reported_where_it_is() -> None:
    # Two rules compute Sum from a Group in super_sum's scope: a true ambiguity, reported once,
    # at the Get, with only those two candidates (not the rules that cannot use the Group).
    (problem,) = problems_of(
        r("group_sum", Out, [A]),
        r("group_sum_too", Out, [A, B]),
        r("super_sum", Out, [B], gets=[(Out, A)]),
        r("total", Out, [C], gets=[(Out, B)]),
        QueryRule(Out, (C,)),
    )
    lines = problem.splitlines()
    assert lines[0].startswith(
        "Ambiguous: 2 rules can compute `Out` for `Get(Out, A)` in rule `super_sum`"
    )
    assert lines[1] == "  Params in scope there: B, C; the Get adds A."
    assert [line.split("(")[0] for line in lines[3:5]] == ["    - group_sum", "    - group_sum_too"]
    assert "    -> total(c: C) -> Out" in lines[lines.index("    QueryRule(Out, (C,))") + 1]


def test_a_rule_that_cannot_use_the_get_input_is_no_candidate_even_if_ambiguous() -> None:
    # t_from_a's parameter is ambiguous, but no way of running it consumes G: not a candidate.
    class G: ...

    graph = build(
        r("t_from_g", B, [G]),
        r("t_from_p", B, [P]),
        r("t_from_a", B, [A]),
        r("a_one", A, [P]),
        r("a_two", A, [P]),
        r("top", Out, [P], gets=[(B, G)]),
        QueryRule(Out, (P,)),
    )
    root = graph.root(Out, (P,))
    assert isinstance(root, RuleNode)
    target = root.gets[(B, G)]
    assert isinstance(target, RuleNode) and target.rule.name == "t_from_g"


def test_a_cycle_through_parameters_only_is_an_error() -> None:
    (problem,) = problems_of(
        r("x_from_y", X, [Y]), r("y_from_x", Y, [X]), r("use", Out, [X]), QueryRule(Out, ())
    )
    assert problem.startswith("Rules need each other through their parameters, in a cycle")
    assert "x_from_y (needs `Y`) -> y_from_x (needs `X`) -> x_from_y again" in problem


def test_union_get_dispatches_on_each_member() -> None:
    @union
    class Request: ...

    class M1: ...

    class M2: ...

    graph = build(
        r("m1", Out, [M1]),
        r("m2", Out, [M2, P]),
        r("top", B, [P], gets=[(Out, Request)]),
        UnionRule(Request, M1),
        UnionRule(Request, M2),
        QueryRule(B, (P,)),
    )
    root = graph.root(B, (P,))
    assert isinstance(root, RuleNode)
    dispatch = root.gets[(Out, Request)]
    assert isinstance(dispatch, UnionDispatch) and dispatch.base is Request
    assert list(dispatch.members) == [M1, M2]
    m1, m2 = dispatch.members[M1], dispatch.members[M2]
    assert isinstance(m1, RuleNode) and m1.params == (M1,)
    assert isinstance(m2, RuleNode) and set(m2.params) == {M2, P}
    assert root.params == (P,)  # P is consumed below the member M2
    assert graph.union_membership.get(Request) == (M1, M2)


def test_a_union_member_without_a_rule_is_an_error() -> None:
    @union
    class Request: ...

    class M1: ...

    class M2: ...

    (problem,) = problems_of(
        r("m1", Out, [M1]),
        r("top", B, [P], gets=[(Out, Request)]),
        UnionRule(Request, M1),
        UnionRule(Request, M2),
        QueryRule(B, (P,)),
    )
    assert "`Get(Out, Request)` (for union member `M2`) in rule `top`" in problem
    assert "or remove UnionRule(Request, M2)" in problem


def test_union_membership_is_injected_by_a_builtin_rule() -> None:
    @union
    class Request: ...

    class M1: ...

    graph = build(
        r("needs_membership", Out, [UnionMembership]),
        UnionRule(Request, M1),
        QueryRule(Out, ()),
    )
    root = graph.root(Out, ())
    assert isinstance(root, RuleNode)
    (provider,) = root.dependencies
    assert isinstance(provider, RuleNode)
    assert provider.rule is graph.union_membership_rule
    assert provider.rule.builtin and provider.params == ()
    coro = provider.rule.func()
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    assert stop.value.value == graph.union_membership == UnionMembership({Request: [M1]})


def test_a_union_without_members_dispatches_to_nothing() -> None:
    @union
    class Request: ...

    graph = build(r("top", B, [P], gets=[(Out, Request)]), QueryRule(B, (P,)))
    root = graph.root(B, (P,))
    assert isinstance(root, RuleNode)
    assert root.gets[(Out, Request)] == UnionDispatch(Request, {}) or (
        isinstance(root.gets[(Out, Request)], UnionDispatch)
        and not root.gets[(Out, Request)].members  # type: ignore[union-attr]
    )


def test_identical_uses_of_a_rule_share_one_node() -> None:
    # `t` is solved in scopes {U, Y} and {U}; both use the param U and consume only U.
    class U: ...

    class T: ...

    class Top1: ...

    class Top2: ...

    graph = build(
        r("t", T, [U]),
        r("u_from_y", U, [Y]),
        r("top1", Top1, [T]),
        r("top2", Top2, [T]),
        QueryRule(Top1, (U, Y)),
        QueryRule(Top2, (U,)),
    )
    (t_node,) = node_of(graph, "t")
    assert t_node.params == (U,)
    top1, top2 = node_of(graph, "top1")[0], node_of(graph, "top2")[0]
    assert top1.dependencies[0] is t_node and top2.dependencies[0] is t_node


def test_node_params_are_sorted_by_module_and_qualname() -> None:
    graph = build(r("d", D, [Q, B, A]), QueryRule(D, (Q, B, A)))
    (node,) = graph.nodes()
    assert node.params == (A, B, Q)


def test_a_long_chain_builds_without_hitting_the_recursion_limit() -> None:
    types_ = [type(f"Link{i}", (), {}) for i in range(3000)]
    rules = [r(f"link{i}", types_[i], [types_[i - 1]]) for i in range(1, len(types_))]
    graph = build(*rules, QueryRule(types_[-1], (types_[0],)))
    assert len(graph.nodes()) == len(types_) - 1
    assert all(n.params == (types_[0],) for n in graph.nodes())


# ----------------------------------------------------------------------------------------------
# Validation and messages


@dataclass(frozen=True)
class Batch:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class ImageFile:
    path: str


@dataclass(frozen=True)
class ResizeOptions:
    width: int


@dataclass(frozen=True)
class Thumbnail:
    path: str


@dataclass(frozen=True)
class Thumbnails:
    items: tuple[Thumbnail, ...]


@dataclass(frozen=True)
class Settings:
    name: str


@dataclass(frozen=True)
class Env:
    name: str


@dataclass(frozen=True)
class SettingsPath:
    path: str


@rule
async def make_thumbnail(image: ImageFile, opts: ResizeOptions) -> Thumbnail:
    return Thumbnail(image.path)


@rule
async def make_all(batch: Batch) -> Thumbnails:
    thumbs = await Get(Thumbnail, ImageFile(batch.paths[0]))
    return Thumbnails((thumbs,))


@rule
async def settings_from_env(env: Env) -> Settings:
    return Settings(env.name)


@rule
async def settings_from_file(path: SettingsPath) -> Settings:
    return Settings(path.path)


@rule
async def needs_settings(batch: Batch, settings: Settings) -> Out:
    return Out()


def test_unsatisfiable_parameter_message_starts_at_the_call_site() -> None:
    (problem,) = problems_of(make_thumbnail, make_all, QueryRule(Thumbnails, (Batch,)))
    lines = problem.splitlines()
    assert lines[0] == (
        "No rule can compute `ResizeOptions` for parameter `opts: ResizeOptions` of rule "
        f"`{__name__}.make_thumbnail` ({make_thumbnail.__rulework_rule__.location()})."
    )
    assert lines[1] == "  Params in scope there: Batch, ImageFile."
    get_line = make_all.__code__.co_firstlineno + 2
    assert lines[3:9] == [
        "  How the engine got there, from the query:",
        "    QueryRule(Thumbnails, (Batch,))",
        f"    -> {__name__}.make_all(batch: Batch) -> Thumbnails   "
        f"[{make_all.__rulework_rule__.location()}]",
        f"    -> Get(Thumbnail, ImageFile) at tests/test_graph.py:{get_line}",
        f"    -> {__name__}.make_thumbnail(image: ImageFile, opts: ResizeOptions) -> Thumbnail"
        f"   [{make_thumbnail.__rulework_rule__.location()}]",
        "    -> parameter `opts: ResizeOptions`   <- here",
    ]
    assert lines[-1] == (
        "  Fix: add a @rule returning `ResizeOptions` (it may take any of: Batch, ImageFile), "
        "or add `ResizeOptions` to the params of QueryRule(Thumbnails, (Batch,))."
    )


def test_failing_providers_are_listed_with_what_each_needs() -> None:
    (problem,) = problems_of(
        settings_from_env, settings_from_file, needs_settings, QueryRule(Out, (Batch,))
    )
    assert problem.startswith(
        f"No rule can compute `Settings` for parameter `settings: Settings` of rule "
        f"`{__name__}.needs_settings`"
    )
    assert "Each rule returning `Settings` needs something that is missing here:" in problem
    assert (
        "cannot run here: parameter `env`: no rule returns `Env` and it is not a param in scope"
        in problem
    )
    assert "parameter `path`: no rule returns `SettingsPath`" in problem
    assert "or add `Settings` to the params of QueryRule(Out, (Batch,))" in problem


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        make_thumbnail,
        make_all,
        needs_settings,
        settings_from_env,
        QueryRule(Thumbnails, (Batch,)),
        QueryRule(Out, (Batch,)),
    )
    assert len(problems) == 2
    assert "`ResizeOptions`" in problems[0]
    assert "`Env`" in problems[1]
    with (
        pytest.raises(RuleGraphError, match=r"The rule graph has 2 problems:\n\n1\. "),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", RuleGraphWarning)
        RuleGraph.build(
            [
                make_thumbnail,
                make_all,
                needs_settings,
                settings_from_env,
                QueryRule(Thumbnails, (Batch,)),
                QueryRule(Out, (Batch,)),
            ]
        )


def test_a_missing_query_output_is_reported_at_the_query() -> None:
    (problem,) = problems_of(r("a", A, [P]), QueryRule(B, (P,)))
    assert problem.startswith("No rule can compute `B` for QueryRule(B, (P,)).")
    assert "add `B` to the params of QueryRule(B, (P,))" in problem


def test_unreachable_rules_warn_by_default_and_fail_when_strict() -> None:
    items = (r("a", A, [P]), r("lonely", B, [C]), QueryRule(A, (P,)))
    with pytest.warns(RuleGraphWarning) as record:
        graph = RuleGraph.build(items)
    assert [info.name for info in graph.unreachable] == ["lonely"]
    (warning,) = record
    text = str(warning.message)
    assert text.startswith("1 rule is not reachable from any QueryRule")
    assert "lonely(c: C) -> B" in text and "nothing requests `B`" in text
    (problem,) = problems_of(*items, strict=True)
    assert "lonely(c: C) -> B" in problem


def test_unreachable_rules_say_what_serves_their_type_instead() -> None:
    with pytest.warns(RuleGraphWarning) as record:
        RuleGraph.build(
            [
                r("default_cfg", Cfg),
                r("use", Out, [Cfg, A]),
                r("a_from_p", A, [P]),
                r("a_from_q", A, [Q]),
                QueryRule(Out, (Cfg, P)),
            ]
        )
    text = str(record[0].message)
    assert "default_cfg() -> Cfg" in text
    assert "wherever `Cfg` is needed, a param in scope provides it" in text
    assert "wherever `A` is needed, a_from_p provides it" in text


def test_exempt_and_builtin_rules_are_never_unreachable() -> None:
    lonely = r("lonely", B, [C])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = RuleGraph.build([r("a", A, [P]), lonely, QueryRule(A, (P,))], exempt=[lonely])
    assert graph.unreachable == ()


def test_no_such_query_lists_the_declared_queries() -> None:
    graph = build(r("a", A, [P]), QueryRule(A, (P,)))
    with pytest.raises(NoSuchQueryError) as exc:
        graph.root(A, (Q,))
    message = str(exc.value)
    assert "No QueryRule computes `A` from params (Q)." in message
    assert "  - QueryRule(A, (P,))" in message
    assert "Add QueryRule(A, (Q,))" in message


def test_bad_items_and_duplicate_names_are_definition_errors() -> None:
    with pytest.raises(RuleDefinitionError, match=r"unpack it with `\*`"):
        RuleGraph.build([[r("a", A, [P])], QueryRule(A, (P,))])
    with pytest.raises(RuleDefinitionError, match="Two different rules are named `a`"):
        RuleGraph.build([r("a", A, [P]), r("a", B, [P]), QueryRule(A, (P,))])


def test_unresolvable_rules_are_reported_before_solving() -> None:
    @rule
    async def broken(x: P) -> Out:
        return await Get(Missing, P, x)  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(RuleDefinitionError, match="`Missing` cannot be resolved"):
        RuleGraph.build([broken, QueryRule(Out, (P,))])


# ----------------------------------------------------------------------------------------------
# Rendering and determinism


def test_dot_and_mermaid_render_nodes_params_and_edges() -> None:
    graph = build(r("top", Out, [P], gets=[(B, C)]), r("b", B, [C, P]), QueryRule(Out, (P,)))
    assert graph.to_dot() == (
        "digraph rulework {\n"
        "  rankdir=LR;\n"
        '  node [shape=box, fontname="monospace"];\n'
        '  q0 [shape=oval, label="QueryRule(Out, (P,))"];\n'
        '  n0 [label="top\\nparams: P"];\n'
        '  n1 [label="b\\nparams: C, P"];\n'
        '  p0 [shape=ellipse, style=dotted, label="P"];\n'
        '  p1 [shape=ellipse, style=dotted, label="C"];\n'
        "  q0 -> n0;\n"
        '  n0 -> p0 [label="p"];\n'
        '  n0 -> n1 [label="Get(B, C)", style=dashed];\n'
        '  n1 -> p1 [label="c"];\n'
        '  n1 -> p0 [label="p"];\n'
        "}\n"
    )
    assert graph.to_mermaid() == (
        "flowchart LR\n"
        '  q0(["QueryRule(Out, (P,))"])\n'
        '  n0["top<br/>params: P"]\n'
        '  n1["b<br/>params: C, P"]\n'
        '  p0(("P"))\n'
        '  p1(("C"))\n'
        "  q0 --> n0\n"
        '  n0 -->|"p"| p0\n'
        '  n0 -.->|"Get(B, C)"| n1\n'
        '  n1 -->|"c"| p1\n'
        '  n1 -->|"p"| p0\n'
    )


def test_building_twice_gives_the_same_graph() -> None:
    items = (
        r("a", A, [P]),
        r("b", B, [A, Q]),
        r("c", C, [P], gets=[(B, Q), (A, X)]),
        r("a_from_x", A, [X]),
        QueryRule(C, (P,)),
        QueryRule(B, (P, Q)),
    )
    first, second = build(*items), build(*items)
    assert first.to_dot() == second.to_dot()
    assert [(n.id, n.rule.name, n.params) for n in first.nodes()] == [
        (n.id, n.rule.name, n.params) for n in second.nodes()
    ]


# ----------------------------------------------------------------------------------------------
# Properties: random rule sets either solve with every invariant holding, or report why.

TYPES = [type(f"T{i}", (), {}) for i in range(5)]
UNION_BASE = union(type("Base", (), {}))
PROBLEM_STARTS = (
    "No rule can compute",
    "Ambiguous:",
    "Rules need each other",
    "`Get(",
    "1 rule is not reachable",
)

type_index = st.integers(min_value=0, max_value=len(TYPES) - 1)
type_set = st.sets(type_index, max_size=2).map(sorted)


Case = tuple[list[RuleInfo], list[UnionRule], list[QueryRule]]
get_inputs = st.one_of(
    st.sets(type_index, min_size=1, max_size=2).map(lambda s: tuple(TYPES[i] for i in sorted(s))),
    st.just((UNION_BASE,)),
)


@st.composite
def rule_sets(draw: st.DrawFn, with_gets: bool) -> Case:
    count = draw(st.integers(min_value=1, max_value=7))
    rules = []
    for n in range(count):
        out = draw(type_index)
        params = draw(type_set)
        # Half the Gets ask for the rule's own output type (from other inputs): nested Gets of
        # one type are how hierarchical aggregation and recursion are written.
        get_output = st.one_of(st.just(out), type_index)
        gets = draw(st.lists(st.tuples(get_output, get_inputs), max_size=2)) if with_gets else []
        rules.append(
            r(
                f"r{n}",
                TYPES[out],
                [TYPES[p] for p in params],
                gets=[(TYPES[o], ins) for o, ins in gets],
            )
        )
    members = draw(st.sets(type_index, max_size=2)) if with_gets else set()
    unions = [UnionRule(UNION_BASE, TYPES[m]) for m in sorted(members)]
    queries = draw(
        st.lists(
            st.tuples(type_index, st.sets(type_index, max_size=3).map(sorted)),
            min_size=1,
            max_size=2,
            unique_by=lambda q: (q[0], tuple(q[1])),
        )
    )
    return rules, unions, [QueryRule(TYPES[o], [TYPES[p] for p in ps]) for o, ps in queries]


def oracle_ways(
    rules: Sequence[RuleInfo],
    out: type,
    scope: frozenset[type],
    membership: UnionMembership = UnionMembership(),  # noqa: B008
) -> set[frozenset[type]]:
    """Every set of params some way of computing `out` in `scope` consumes.

    Brute force, independent of the solver and more permissive than it (no preference between
    ways, no ambiguity; the Gets inside a rule may be served by any of their ways). A nested
    fixpoint: least over parameters (a rule must not need itself to run), greatest over Gets
    (recursion through a Get is fine: the values decide when it stops).
    """
    Key = tuple[type, frozenset[type]]

    def all_subsets(items: frozenset[type]) -> set[frozenset[type]]:
        ordered = sorted(items, key=lambda t: t.__name__)
        return {
            frozenset(c)
            for n in range(len(ordered) + 1)
            for c in itertools.combinations(ordered, n)
        }

    def least(assumed: dict[Key, set[frozenset[type]]]) -> tuple[dict[Key, Any], set[Key]]:
        ways: dict[Key, set[frozenset[type]]] = {}
        keys: set[Key] = {(out, scope)}
        get_keys: set[Key] = set()
        changed = True
        while changed:
            known = len(keys)
            changed = False
            for key in list(keys):
                tp, sc = key
                found: set[frozenset[type]] = {frozenset({tp})} if tp in sc else set()
                for info in rules:
                    if info.output_type is not tp:
                        continue
                    partial: set[frozenset[type]] = {frozenset()}
                    for ptype in info.parameter_types:
                        keys.add((ptype, sc))
                        options = ways.get((ptype, sc), set())
                        partial = {a | b for a in partial for b in options}
                    for spec in info.gets:
                        base = spec.input_types[0]
                        # A union Get needs every member served (each from the member alone).
                        inputs = (
                            [frozenset((m,)) for m in membership.get(base)]
                            if is_union(base)
                            else [frozenset(spec.input_types)]
                        )
                        for provided in inputs:
                            sub = (spec.output_type, sc | provided)
                            keys.add(sub)
                            get_keys.add(sub)
                            served = assumed.get(sub)
                            if served is None:
                                served = all_subsets(sub[1])
                            options = {w - provided for w in served if provided <= w}
                            partial = {a | b for a in partial for b in options}
                    found |= partial
                if found != ways.get(key, set()):
                    ways[key] = found
                    changed = True
            changed = changed or len(keys) != known
        return ways, get_keys

    assumed: dict[Key, set[frozenset[type]]] = {}
    while True:
        ways, get_keys = least(assumed)
        refined = {key: ways.get(key, set()) for key in get_keys}
        if refined == assumed:
            return ways.get((out, scope), set())
        assumed = refined


def describe(rules: Sequence[RuleInfo]) -> str:
    """A rule set, one rule per line with its Gets, for failure messages."""
    return "\n".join(
        f"{info.signature()} gets: {', '.join(g.describe() for g in info.gets) or '-'}"
        for info in rules
    )


def check_solved_graph(graph: RuleGraph) -> None:
    """Every dependency and Get of every node is served, with the right types and params."""
    for query, root in _roots(graph):
        produced = root.type if isinstance(root, ParamSource) else root.rule.output_type
        assert produced is query.output_type
    for node in graph.nodes():
        info = node.rule
        assert len(node.dependencies) == len(info.parameter_types)
        for ptype, dep in zip(info.parameter_types, node.dependencies, strict=True):
            if isinstance(dep, ParamSource):
                assert dep.type is ptype and ptype in node.params
            else:
                assert dep.rule.output_type is ptype
                assert set(dep.params) <= set(node.params)
        assert set(node.gets) == {spec.key for spec in info.gets}
        for spec in info.gets:
            served = node.gets[spec.key]
            if isinstance(served, UnionDispatch):
                assert served.base is spec.input_types[0]
                assert tuple(served.members) == graph.union_membership.get(served.base)
                targets = [({m}, t) for m, t in served.members.items()]
            else:
                targets = [(set(spec.input_types), served)]
            for provided, target in targets:
                consumed = {target.type} if isinstance(target, ParamSource) else set(target.params)
                produced = (
                    target.type if isinstance(target, ParamSource) else target.rule.output_type
                )
                assert produced is spec.output_type
                assert provided <= consumed, "rule 1: a Get's subgraph consumes its inputs"
                assert consumed <= set(node.params) | provided


def check_preference_without_gets(graph: RuleGraph) -> None:
    """Without Gets the scope is the query's everywhere: params in scope are always used."""
    for query, root in _roots(graph):
        scope = set(query.param_types)
        stack = [root] if isinstance(root, RuleNode) else []
        seen: set[int] = set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            for ptype, dep in zip(node.rule.parameter_types, node.dependencies, strict=True):
                assert isinstance(dep, ParamSource) == (ptype in scope)
                if isinstance(dep, RuleNode):
                    stack.append(dep)


AMBIGUITY = re.compile(
    r"Ambiguous: \d+ rules can compute `(?P<out>\w+)` for .*\n"
    r"  Params in scope there: (?P<scope>[^;\n]*?)(?:; the Get adds (?P<added>[^\n]*?))?\.\n"
    r"  Candidates:\n(?P<candidates>(?:    - .*\n)+)"
)


def check_ambiguities_are_real(
    rules: Sequence[RuleInfo], membership: UnionMembership, problems: Sequence[str]
) -> None:
    """Every rule an ambiguity at a Get names could compute the type there from the inputs.

    A rule that cannot consume the Get's inputs in any way is no candidate (rule 1); naming it
    is a false ambiguity. Checked with the brute-force oracle, applied to a copy of each
    candidate rule returning a fresh type (so that only that rule provides it). Left out:
    ambiguities at parameters and queries, and candidates with no finite way at all (a rule
    needing its own output type as a parameter, with no other rule to start from): the solver
    counts those optimistically, and the build fails either way.
    """
    by_name = {t.__name__: t for t in (*TYPES, UNION_BASE)}
    by_rule = {info.name: info for info in rules}

    def types_of(names: str | None) -> frozenset[type]:
        if not names or names == "none":
            return frozenset()
        return frozenset(by_name[n] for n in names.split(", "))

    for problem in problems:
        match = AMBIGUITY.search(problem)
        if match is None:
            continue
        scope, added = types_of(match["scope"]), types_of(match["added"])
        if not added:
            continue
        for line in match["candidates"].splitlines():
            info = by_rule[line.removeprefix("    - ").split("(", 1)[0]]
            fresh = type("Candidate", (), {})
            copy = r(
                "candidate",
                fresh,
                info.parameter_types,
                gets=[(g.output_type, g.input_types) for g in info.gets],
            )
            ways = oracle_ways([*rules, copy], fresh, scope | added, membership)
            assert not ways or any(added <= way for way in ways), (
                f"{info.name} named in an ambiguity but it cannot consume {added}:\n{problem}\n"
                f"rules:\n{describe(rules)}"
            )


def _outcome(case: Case) -> tuple[RuleGraph | None, tuple[str, ...]]:
    rules, unions, queries = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuleGraphWarning)
        try:
            return RuleGraph.build([*rules, *unions, *queries]), ()
        except RuleGraphError as exc:
            return None, exc.problems
        except Exception as exc:
            exc.add_note(f"rules:\n{describe(rules)}\n{unions}\nqueries: {queries}")
            raise


PROPERTY_SETTINGS = settings(
    # RULEWORK_GRAPH_EXAMPLES raises the count for a longer bug hunt.
    max_examples=int(os.environ.get("RULEWORK_GRAPH_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(rule_sets(with_gets=True))
def test_random_rule_sets_solve_soundly_or_report_why(case: Case) -> None:
    rules, unions, queries = case
    membership = UnionMembership.from_rules(unions)
    graph, problems = _outcome(case)
    if graph is None:
        assert problems
        for problem in problems:
            assert problem.startswith(PROBLEM_STARTS), problem
            assert "Fix:" in problem, problem
        check_ambiguities_are_real(rules, membership, problems)
        return
    check_solved_graph(graph)
    for query in queries:
        assert oracle_ways(rules, query.output_type, frozenset(query.param_types), membership), (
            f"solved {query!r}, which no way satisfies:\n{describe(rules)}\n{graph.to_dot()}"
        )
    again, _ = _outcome(case)
    assert again is not None and again.to_dot() == graph.to_dot()


@PROPERTY_SETTINGS
@given(rule_sets(with_gets=False))
def test_random_rule_sets_without_gets_match_the_brute_force_oracle(case: Case) -> None:
    rules, _unions, queries = case
    graph, problems = _outcome(case)
    satisfiable = [
        bool(oracle_ways(rules, q.output_type, frozenset(q.param_types))) for q in queries
    ]
    if graph is not None:
        assert all(satisfiable)
        check_solved_graph(graph)
        check_preference_without_gets(graph)
        return
    if all(satisfiable):
        # Every query has a way: what failed must be a choice or a cycle, not a missing rule.
        for problem in problems:
            assert re.search(r"mbiguous|depends on itself|in a cycle", problem), (
                f"{problem}\nrules:\n{describe(rules)}"
            )


@dataclass(frozen=True)
class Aggregation:
    """A generated hierarchical aggregation (see `aggregations`) and what must come of it."""

    items: list[Any]
    levels: list[type]
    queries: list[QueryRule]
    extra: frozenset[type]  # params every level consumes besides its own
    recursive: int | None
    twin: bool


@st.composite
def aggregations(draw: st.DrawFn) -> Aggregation:
    """`hierarchy` with every option drawn, plus: Gets that skip a level, a level that also
    Gets from its own type (recursion), a second query at a middle level, a rule order, and
    maybe a `twin` of the leaf rule, which makes the leaf's Gets truly ambiguous."""
    depth = draw(st.integers(min_value=2, max_value=5))
    opt, outer_at_leaf, skip, twin = (draw(st.booleans()) for _ in range(4))
    union_at = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=depth - 1)))
    recursive = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=depth - 1)))
    items, levels, query = hierarchy(depth, opt=opt, outer_at_leaf=outer_at_leaf, union_at=union_at)
    rules = {info.name: info for info in items if isinstance(info, RuleInfo)}
    for i in range(depth):
        info = rules[f"sum{i}"]
        gets = [(g.output_type, g.input_types) for g in info.gets]
        if skip and i >= 2:
            gets.append((Out, (levels[i - 2],)))
        if recursive == i:
            gets.append((Out, (levels[i],)))
        rules[info.name] = r(info.name, Out, info.parameter_types, gets=gets)
    if twin:
        rules["twin"] = r("twin", Out, [levels[0]])
    queries = [query]
    if not outer_at_leaf and depth > 2:  # the leaf would need the top level there
        queries.append(QueryRule(Out, (levels[depth // 2], *([Cfg] if opt else []))))
    others = [item for item in items if not isinstance(item, RuleInfo | QueryRule)]
    ordered = draw(st.permutations([*rules.values(), *others]))
    extra = frozenset(([Cfg] if opt else []) + ([levels[-1]] if outer_at_leaf else []))
    return Aggregation([*ordered, *queries], levels, queries, extra, recursive, twin)


@PROPERTY_SETTINGS
@given(aggregations())
def test_hierarchical_aggregations_solve_as_expected(case: Aggregation) -> None:
    if case.twin:
        problems = problems_of(*case.items)
        for problem in problems:
            match = AMBIGUITY.search(problem)
            assert problem.startswith("Ambiguous: 2 rules") and match is not None, problem
            names = {line.split("(")[0] for line in match["candidates"].splitlines()}
            assert names == {"    - sum0", "    - twin"}, problem
        return
    graph = build(*case.items)
    levels = case.levels
    for i, level in enumerate(levels):
        (node,) = node_of(graph, f"sum{i}")
        assert set(node.params) == {level} | case.extra, node
        for (_out, inputs), target in node.gets.items():
            if isinstance(target, UnionDispatch):
                served: Mapping[type, object] = target.members
            else:
                assert isinstance(inputs, type)  # every Get here has one input: a level
                served = {inputs: target}
            for member, sub in served.items():
                # A level is served by its own rule; the union's other member by other_sum.
                expected = f"sum{levels.index(member)}" if member in levels else "other_sum"
                assert isinstance(sub, RuleNode) and sub.rule.name == expected, (node, sub)
        if case.recursive == i:
            assert node.gets[(Out, level)] is node
    for query in case.queries:
        root = graph.root(query.output_type, query.param_types)
        assert isinstance(root, RuleNode)
        assert root.rule.name == f"sum{levels.index(query.param_types[0])}"


def test_oracle_sanity() -> None:
    rules = [r("a", A, [P]), r("b", B, [A], gets=[(C, Q)]), r("c", C, [Q])]
    assert oracle_ways(rules, B, frozenset({P})) == {frozenset({P})}
    assert oracle_ways(rules, B, frozenset()) == set()
    assert oracle_ways(rules, C, frozenset({Q})) == {frozenset({Q})}
    assert list(itertools.islice(iter(oracle_ways(rules, A, frozenset({A, P}))), 3))
