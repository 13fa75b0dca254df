"""The rule graph: which rule serves each parameter and Get, for which params, decided statically.

`RuleGraph.build(rules)` solves every `QueryRule` once, when the Engine is created, and reports
every problem at once. The result is *monomorphized*: one `RuleNode` per use of a rule with a
distinct set of consumed params, and that set (`RuleNode.params`) is the node's memo key.

Resolution (DESIGN.md, "The rule graph"), for a type `T` needed in a scope of params `S`:

1. A Get's subgraph must consume the Get's input params (a Get computes its result *from* its
   input; it never returns a param of the output type that happens to be in scope).
2. Among the ways satisfying 1, params in scope are used rather than rules producing their type.
   If several ways remain and none uses params everywhere the others do: ambiguity error.
3. Otherwise exactly one rule may be able to produce `T` in `S`; two or more is an ambiguity error.

Params stay in scope below the rules that consume them; a Get adds its input types to the scope
of its subgraph (replacing params of the same types). Params nothing consumes are ignored.

How the solver stays fast (5,000 rules well under a second):
- Everything is memoized per `(type, scope, required inputs)`.
- The scope is first cut down to the param types that could ever be consumed below `T`
  (`_Builder.rel`: a fixpoint over the rule set, restricted to types that are query params or
  Get inputs). Solving `T` in two scopes that differ only in irrelevant params is one memo entry.
- The common case, no requirement (rule parameters, and Gets whose preferred way already
  consumes the inputs), is a greedy choice: param if in scope, else the single able rule. Only
  when a Get's preferred way ignores its inputs are alternatives enumerated, and then only
  deviations that bring in a required input.
- A rule whose parameters cannot be provided in a scope is explored no further there: its
  Gets would open new scopes for nothing (with nested Gets of one type, one per subset of the
  levels of a hierarchy).

Recursion (a rule reaching its own output type through Gets) is solved optimistically: a
`(type, scope)` still being solved is referenced through a placeholder, patched when everything
is solved; params are then completed by a fixpoint, and cycles made only of parameters (which
could never run) are reported. A Get met while its preferred way was in progress (hierarchical
aggregation: `Get(Sum, Group)` inside the rule for `Sum` from a `SuperGroup`, with the outer
levels' params still in scope) is pointed at that way only once it is known to consume the
Get's inputs; otherwise the Get is solved again, by rule 1, among the ways that do.
"""

from __future__ import annotations

import gc
import itertools
import sys
import typing
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from .errors import NoSuchQueryError, RuleDefinitionError, RuleGraphError
from .rules import (
    GetKey,
    GetSpec,
    QueryRule,
    RuleInfo,
    UnionMembership,
    UnionRule,
    _rule_info_of,
    _short_repr,
    _tn,
    _where,
    is_union,
)

__all__ = [
    "ParamSource",
    "RuleGraph",
    "RuleGraphWarning",
    "RuleNode",
    "UnionDispatch",
    "union_membership_rule",
]


class RuleGraphWarning(UserWarning):
    """A rule graph problem that is not an error by default (unreachable rules)."""


@dataclass(frozen=True, slots=True)
class ParamSource:
    """A rule parameter or Get result satisfied directly by a param in scope."""

    type: type


class RuleNode:
    """One monomorphized use of a rule: the rule applied to the params it transitively consumes.

    Invariants (the scheduler relies on them; `RuleGraph.build` checks them):
    - `params` lists the param types the node transitively consumes, sorted by
      (module, qualname); the node's memo key is the tuple of their values in that order.
    - each dependency that is a RuleNode `D` has `set(D.params) <= set(self.params)`; a
      ParamSource dependency's type is in `self.params`.
    - each Get target `T` (or union member target) has
      `set(T.params) <= set(self.params) | set(the Get's input types)` (for a union, the member
      type replaces the base).
    Identity semantics: two RuleNodes are equal only if they are the same object.
    """

    __slots__ = ("_consumed", "dependencies", "gets", "id", "params", "rule")

    id: int
    rule: RuleInfo
    params: tuple[type, ...]
    dependencies: tuple[RuleNode | ParamSource, ...]
    gets: dict[GetKey, RuleNode | ParamSource | UnionDispatch]

    def __init__(
        self,
        rule: RuleInfo,
        dependencies: tuple[Any, ...],
        gets: dict[GetKey, Any],
        consumed: frozenset[type],
    ) -> None:
        self.id = -1
        self.rule = rule
        self.dependencies = dependencies
        self.gets = gets
        self._consumed = consumed
        self.params = ()

    def describe(self) -> str:
        """`module.rule(params: A, B)`, for messages."""
        return f"{self.rule.name}(params: {', '.join(_tn(t) for t in self.params) or 'none'})"

    def __repr__(self) -> str:
        return f"<RuleNode {self.id} {self.describe()}>"


@dataclass(frozen=True, eq=False, slots=True)
class UnionDispatch:
    """The target of a union Get `Get(Out, Base, member)`: one subgraph per member type."""

    base: type
    members: Mapping[type, RuleNode | ParamSource]


def union_membership_rule(membership: UnionMembership) -> RuleInfo:
    """The built-in rule providing `UnionMembership` to rules that take it as a parameter."""

    async def union_membership() -> UnionMembership:
        return membership

    return RuleInfo.create(
        union_membership,
        output_type=UnionMembership,
        name="rulework.engine.graph.union_membership",
        builtin=True,
    )


# ----------------------------------------------------------------------------------------------
# The solver's intermediate results

_EMPTY: frozenset[type] = frozenset()
_Key: TypeAlias = tuple[type, frozenset[type], frozenset[type]]


class _Pending:
    """A reference to a `(type, scope, requirement)` key still being solved (recursion).

    `key` is the key in progress; `requirement` is non-empty when a Get needed `key`'s type
    from inputs while the *preferred* way (`key`, solved without requirement) was in
    progress: whether that way consumes the inputs is unknown until it is solved and the
    params are complete, so `_Solution._patch` then checks it, and re-solves the Get's key
    `(type, scope, requirement)` when it does not (rule 1). A placeholder is never memoized:
    once the key in progress is finished, asking again gives the real answer.
    """

    __slots__ = ("key", "requirement")

    def __init__(self, key: _Key, requirement: frozenset[type]) -> None:
        self.key = key
        self.requirement = requirement


class _Failure:
    __slots__ = ("output_type",)

    def __init__(self, output_type: type) -> None:
        self.output_type = output_type


class _NoRule(_Failure):
    """No rule returns the type, and it is not a param in scope."""

    __slots__ = ()


class _AllFailed(_Failure):
    """Rules return the type, but none of them can run in this scope."""

    __slots__ = ("attempts",)

    def __init__(self, output_type: type, attempts: tuple[_Attempt, ...]) -> None:
        super().__init__(output_type)
        self.attempts = attempts


class _Ambiguous(_Failure):
    """Several ways to compute the type, none preferable (rules 2 and 3)."""

    __slots__ = ("requirement", "ways")

    def __init__(
        self, output_type: type, requirement: frozenset[type], ways: tuple[Any, ...]
    ) -> None:
        super().__init__(output_type)
        self.requirement = requirement
        self.ways = ways


class _Unconsumed(_Failure):
    """Ways to compute the type exist, but none consumes the Get's input(s) (rule 1)."""

    __slots__ = ("preferred", "requirement")

    def __init__(self, output_type: type, requirement: frozenset[type], preferred: Any) -> None:
        super().__init__(output_type)
        self.requirement = requirement
        self.preferred = preferred


class _CycleFailure(_Failure):
    """Rules needing each other through parameters only: none of them could ever run."""

    __slots__ = ("cycle",)

    def __init__(self, output_type: type, cycle: tuple[RuleNode, ...]) -> None:
        super().__init__(output_type)
        self.cycle = cycle


class _Site(typing.NamedTuple):
    """Where a type is needed: a query, a rule's parameter, or a Get (for a union member)."""

    kind: str  # "query" | "param" | "get"
    query: QueryRule | None = None
    rule: RuleInfo | None = None
    position: int = -1
    get: GetSpec | None = None
    member: type | None = None


@dataclass(frozen=True, slots=True)
class _Attempt:
    """Why one rule cannot run in a scope: the failing parameters and Gets."""

    rule: RuleInfo
    problems: tuple[tuple[_Site, _Failure], ...]


_Result: TypeAlias = "RuleNode | ParamSource | _Failure | _Pending"
_Chain: TypeAlias = "list[tuple[_Site, RuleInfo]]"

# Above this many combinations the search for alternative ways to satisfy one Get stops; real
# rule sets need a handful, and an enumeration this large would be a pathological rule set.
_MAX_COMBINATIONS = 4096


class _Builder:
    """Solves queries over one rule set. Used once, by `RuleGraph.build`."""

    def __init__(
        self,
        rules: Sequence[RuleInfo],
        membership: UnionMembership,
        queries: Sequence[QueryRule],
    ) -> None:
        self.membership = membership
        self.by_output: dict[type, list[RuleInfo]] = {}
        for info in rules:
            self.by_output.setdefault(info.output_type, []).append(info)
        self.gets_of: dict[RuleInfo, tuple[GetSpec, ...]] = {
            info: tuple(info.gets_by_key.values()) for info in rules
        }
        # Invariant: a key is in `memo` only once its computation finished, and in `in_progress`
        # exactly while it is being computed (a reference to it then yields a `_Pending`).
        # Invariant: no value in `memo` is a `_Pending` (a placeholder stands for a key still
        # in progress; memoizing it would hide that key's real result once it is known).
        self.memo: dict[_Key, _Result] = {}
        self.in_progress: set[_Key] = set()
        self.param_sources: dict[type, ParamSource] = {}
        self.dominance: dict[tuple[int, int], bool] = {}
        self.gets_memo: dict[tuple[RuleInfo, frozenset[type]], tuple[Any, ...]] = {}
        self.pending_seen = False
        self.scopable: set[type] = {t for q in queries for t in q.param_types}
        self.rel = self._relevant_params(rules)

    # -- relevance ----------------------------------------------------------------------------

    def _get_scopes(self, spec: GetSpec) -> list[frozenset[type]]:
        """The input sets a Get brings into scope: its inputs, or each union member."""
        inputs = spec.input_types
        if len(inputs) == 1 and is_union(inputs[0]):
            return [frozenset((member,)) for member in self.membership.get(inputs[0])]
        return [frozenset(inputs)]

    def _relevant_params(self, rules: Sequence[RuleInfo]) -> dict[type, frozenset[type]]:
        """For each type T: the param types that could ever be consumed below T.

        Only types that can be in a scope at all matter (query params, Get inputs, union
        members); the solver intersects scopes with this, so irrelevant params never split
        memo entries. A Get's own inputs are provided by the Get, hence subtracted.
        """
        edges: dict[type, list[tuple[type, frozenset[type]]]] = {}
        for info in rules:
            out_edges = edges.setdefault(info.output_type, [])
            out_edges.extend((p, _EMPTY) for p in info.parameter_types)
            for spec in self.gets_of[info]:
                for inputs in self._get_scopes(spec):
                    self.scopable.update(inputs)
                    out_edges.append((spec.output_type, inputs))
        scopable = self.scopable
        universe: set[type] = set(edges)
        users: dict[type, list[type]] = {}
        for t, out_edges in edges.items():
            for u, _minus in out_edges:
                universe.add(u)
                users.setdefault(u, []).append(t)
        rel: dict[type, frozenset[type]] = {
            t: (frozenset((t,)) if t in scopable else _EMPTY) for t in universe
        }
        queue = deque(universe)
        queued = set(universe)
        while queue:
            t = queue.popleft()
            queued.discard(t)
            current = rel[t]
            grown = set(current)
            for u, minus in edges.get(t, ()):
                grown.update(rel[u] - minus if minus else rel[u])
            if len(grown) != len(current):
                rel[t] = frozenset(grown)
                for user in users.get(t, ()):
                    if user not in queued:
                        queued.add(user)
                        queue.append(user)
        return rel

    # -- solving ------------------------------------------------------------------------------

    def param(self, tp: type) -> ParamSource:
        found = self.param_sources.get(tp)
        if found is None:
            found = self.param_sources[tp] = ParamSource(tp)
        return found

    def consumed(self, result: Any) -> frozenset[type]:
        if isinstance(result, RuleNode):
            return result._consumed
        if isinstance(result, ParamSource):
            return frozenset((result.type,))
        return _EMPTY

    def solve(self, tp: type, scope: frozenset[type], requirement: frozenset[type]) -> _Result:
        rel = self.rel.get(tp)
        if rel is None:
            rel = frozenset((tp,)) if tp in self.scopable else _EMPTY
        scope = scope & rel
        if requirement and not requirement <= scope:
            # Nothing below `tp` can ever consume one of the Get's inputs.
            return _Unconsumed(tp, requirement, None)
        key = (tp, scope, requirement)
        found = self.memo.get(key)
        if found is not None:
            return found
        if key in self.in_progress:
            self.pending_seen = True
            return _Pending(key, _EMPTY)
        self.in_progress.add(key)
        try:
            if requirement:
                result = self._solve_required(tp, scope, requirement)
            else:
                result = self._solve_greedy(tp, scope)
        finally:
            self.in_progress.discard(key)
        if not isinstance(result, _Pending):
            self.memo[key] = result
        return result

    def _solve_greedy(self, tp: type, scope: frozenset[type]) -> _Result:
        if tp in scope:
            return self.param(tp)  # rule 2: a param in scope beats any rule
        providers = self.by_output.get(tp)
        if not providers:
            return _NoRule(tp)
        able: list[RuleNode] = []
        attempts: list[_Attempt] = []
        for info in providers:
            outcome = self._apply_rule(info, scope)
            if isinstance(outcome, RuleNode):
                able.append(outcome)
            else:
                attempts.append(outcome)
        if len(able) == 1:
            return able[0]
        if able:
            return _Ambiguous(tp, _EMPTY, tuple(able))  # rule 3
        return _AllFailed(tp, tuple(attempts))

    def _apply_rule(self, info: RuleInfo, scope: frozenset[type]) -> RuleNode | _Attempt:
        problems: list[tuple[_Site, _Failure]] = []
        deps: list[Any] = []
        consumed: set[type] = set()
        for index, ptype in enumerate(info.parameter_types):
            dep = self.solve(ptype, scope, _EMPTY)
            if isinstance(dep, _Failure):
                problems.append((_Site("param", rule=info, position=index), dep))
            else:
                deps.append(dep)
                consumed |= self.consumed(dep)
        if problems:
            # The rule cannot run in this scope whatever its Gets do: solving them would open
            # the scopes of their subgraphs for nothing. With nested Gets of one type (each
            # level of a hierarchy Getting from the level below, every level's param staying
            # in scope), that was one scope per *subset* of the levels: exponential in depth.
            return _Attempt(info, tuple(problems))
        gets, gets_consumed, get_problems = self._solve_gets(info, scope)
        if get_problems:
            return _Attempt(info, get_problems)
        return RuleNode(info, tuple(deps), dict(gets), frozenset(consumed | gets_consumed))

    def _solve_gets(
        self, info: RuleInfo, scope: frozenset[type]
    ) -> tuple[dict[GetKey, Any], frozenset[type], tuple[tuple[_Site, _Failure], ...]]:
        memo_key = (info, scope)
        found = self.gets_memo.get(memo_key)
        if found is not None:
            return found
        gets: dict[GetKey, Any] = {}
        consumed: set[type] = set()
        problems: list[tuple[_Site, _Failure]] = []
        for spec in self.gets_of[info]:
            inputs = spec.input_types
            if len(inputs) == 1 and is_union(inputs[0]):
                members: dict[type, Any] = {}
                for member in self.membership.get(inputs[0]):
                    provided = frozenset((member,))
                    target = self.solve(spec.output_type, scope | provided, provided)
                    if isinstance(target, _Failure):
                        problems.append((_Site("get", rule=info, get=spec, member=member), target))
                    else:
                        members[member] = target
                        consumed |= self.consumed(target) - provided
                gets[spec.key] = UnionDispatch(inputs[0], members)
            else:
                provided = frozenset(inputs)
                target = self.solve(spec.output_type, scope | provided, provided)
                if isinstance(target, _Failure):
                    problems.append((_Site("get", rule=info, get=spec), target))
                else:
                    gets[spec.key] = target
                    consumed |= self.consumed(target) - provided
        result = (gets, frozenset(consumed), tuple(problems))
        # Results depending on a key still in progress are not reused: the placeholder may
        # have to be re-solved once that key is known.
        if not any(isinstance(t, _Pending) for t in _targets(gets)):
            self.gets_memo[memo_key] = result
        return result

    def _solve_required(
        self, tp: type, scope: frozenset[type], requirement: frozenset[type]
    ) -> _Result:
        """Solve `tp` for a Get: the way must consume every type in `requirement` (rule 1)."""
        preferred = self.solve(tp, scope, _EMPTY)
        if isinstance(preferred, _Pending):
            # Recursion: the preferred way is still being solved. Whether it consumes the
            # inputs is decided once it is known (`_Solution._patch`), and if it does not,
            # this key is solved again then.
            return _Pending(preferred.key, requirement)
        if isinstance(preferred, RuleNode | ParamSource) and requirement <= self.consumed(
            preferred
        ):
            return preferred
        if isinstance(preferred, _NoRule):
            return preferred
        # The preferred way ignores an input, is ambiguous or failed (maybe on an ambiguity the
        # inputs resolve): look for the ways that consume the inputs, deviating from the
        # preferred way as little as possible (rule 2).
        ways: list[RuleNode] = []
        attempts: list[_Attempt] = []
        blocked: list[_Attempt] = []
        for info in self.by_output.get(tp, ()):
            found, blocker = self._rule_ways(info, scope, requirement)
            for way in found:
                if isinstance(way, RuleNode):
                    ways.append(way)
                else:
                    attempts.append(way)
            if blocker is not None:
                blocked.append(blocker)
        if len(ways) == 1 and not attempts:
            return ways[0]
        if len(ways) + len(attempts) > 1:
            return _Ambiguous(tp, requirement, (*ways, *attempts))
        if attempts or blocked:
            # Rules that would consume the inputs but cannot run here: their problems (an
            # ambiguous Get below them, say) are the explanation the user needs.
            return _AllFailed(tp, (*attempts, *blocked))
        if isinstance(preferred, _AllFailed):
            return preferred  # nothing works here at all: its explanation is the useful one
        return _Unconsumed(tp, requirement, preferred)

    def _rule_ways(
        self, info: RuleInfo, scope: frozenset[type], requirement: frozenset[type]
    ) -> tuple[list[RuleNode | _Attempt], _Attempt | None]:
        """The maximal ways (most params used) to run `info` in `scope` consuming `requirement`.

        Returns the ways (an `_Attempt` for a way blocked by an ambiguous parameter: a
        candidate that cannot be chosen), and, when the rule would consume `requirement` but
        its Gets fail on an ambiguity (here or below), that blocked attempt separately: it is
        no competitor for the ways other rules have (as in `_solve_greedy`), only the reason
        when no rule has one.
        """
        greedy = [self.solve(p, scope, _EMPTY) for p in info.parameter_types]
        for dep in greedy:
            if isinstance(dep, _Failure) and not isinstance(dep, _Ambiguous):
                return [], None  # the rule cannot run here at all
        gets, gets_consumed, get_problems = self._solve_gets(info, scope)
        if get_problems and not all(_is_choice(f) for _s, f in get_problems):
            return [], None
        remaining = requirement - gets_consumed
        base_cover = [
            None if isinstance(d, _Failure) else self.consumed(d) & remaining for d in greedy
        ]
        forced = [i for i, c in enumerate(base_cover) if c is None]
        if (
            not forced
            and not get_problems
            and remaining <= frozenset().union(*(c for c in base_cover if c))
        ):
            consumed = frozenset().union(*(self.consumed(d) for d in greedy)) | gets_consumed
            return [RuleNode(info, tuple(greedy), dict(gets), consumed)], None
        # Per parameter: the alternatives that consume some of the remaining inputs.
        subsets = _subsets(remaining)
        options: list[list[tuple[Any, frozenset[type]]]] = []
        for index, ptype in enumerate(info.parameter_types):
            opts: list[tuple[Any, frozenset[type]]] = []
            seen: set[int] = set()
            for subset in subsets:
                alt = self.solve(ptype, scope, subset)
                if isinstance(alt, _Pending) or alt is greedy[index] or id(alt) in seen:
                    continue
                seen.add(id(alt))
                if isinstance(alt, RuleNode | ParamSource):
                    gain = self.consumed(alt) & remaining
                    if gain:
                        opts.append((alt, gain))
                elif isinstance(alt, _Ambiguous):
                    opts.append((alt, subset))
            options.append(opts)
        candidates = [i for i, opts in enumerate(options) if opts]
        reachable: set[type] = set()
        for c in base_cover:
            if c:
                reachable |= c
        for opts in options:
            for _alt, c in opts:
                reachable |= c
        if not remaining <= reachable:
            # No way of running this rule here consumes the inputs (rule 1): it is not a
            # candidate at all, even if one of its parameters or Gets is ambiguous here.
            return [], None
        if get_problems:
            return [], _Attempt(info, get_problems)
        stuck = [i for i in forced if i not in candidates]
        if stuck:
            # A parameter is ambiguous here, no way that uses the inputs resolves it, and the
            # rule would otherwise consume the inputs: a candidate that cannot be chosen.
            return [
                _Attempt(
                    info,
                    tuple(
                        (_Site("param", rule=info, position=i), typing.cast(_Failure, greedy[i]))
                        for i in stuck
                    ),
                )
            ], None
        combos: list[dict[int, tuple[Any, frozenset[type]]]] = []
        budget = _MAX_COMBINATIONS
        free = [i for i in candidates if i not in forced]
        for size in range(0, min(len(remaining), len(free)) + 1):
            for extra in itertools.combinations(free, size):
                deviating = (*forced, *extra)
                if not deviating:
                    continue
                for choice in itertools.product(*(options[i] for i in deviating)):
                    budget -= 1
                    if budget < 0:
                        break
                    cover: set[type] = set()
                    for i, c in enumerate(base_cover):
                        if c and i not in deviating:
                            cover |= c
                    for _alt, c in choice:
                        cover |= c
                    if remaining <= cover:
                        combos.append(dict(zip(deviating, choice, strict=True)))
        maximal = [
            combo
            for combo in combos
            if not any(
                other is not combo
                and self._combo_dominates(other, combo)
                and not self._combo_dominates(combo, other)
                for other in combos
            )
        ]
        result: list[RuleNode | _Attempt] = []
        for combo in maximal:
            ambiguous = [(i, alt) for i, (alt, _c) in combo.items() if isinstance(alt, _Ambiguous)]
            if ambiguous:
                result.append(
                    _Attempt(
                        info,
                        tuple((_Site("param", rule=info, position=i), alt) for i, alt in ambiguous),
                    )
                )
                continue
            deps = tuple(combo[i][0] if i in combo else greedy[i] for i in range(len(greedy)))
            consumed = frozenset().union(*(self.consumed(d) for d in deps)) | gets_consumed
            result.append(RuleNode(info, deps, dict(gets), consumed))
        return result, None

    def _combo_dominates(
        self, a: dict[int, tuple[Any, frozenset[type]]], b: dict[int, tuple[Any, frozenset[type]]]
    ) -> bool:
        """Whether combination `a` uses params everywhere `b` does (deviates at a subset)."""
        for index, (alt, _cover) in a.items():
            other = b.get(index)
            if other is None or not self.dominates(alt, other[0]):
                return False
        return True

    def dominates(self, a: Any, b: Any) -> bool:
        """Whether way `a` uses a param at every point where way `b` does (same type, scope)."""
        if a is b or isinstance(a, ParamSource):
            return True
        if not isinstance(a, RuleNode) or not isinstance(b, RuleNode) or a.rule is not b.rule:
            return False
        key = (id(a), id(b))
        found = self.dominance.get(key)
        if found is None:
            found = True
            for x, y in zip(a.dependencies, b.dependencies, strict=True):
                if not self.dominates(x, y):
                    found = False
                    break
            self.dominance[key] = found
        return found


def _subsets(items: frozenset[type]) -> list[frozenset[type]]:
    ordered = sorted(items, key=_type_key)
    if len(ordered) > 4:  # keep the enumeration bounded: singletons and the whole set
        return [frozenset((t,)) for t in ordered] + [items]
    return [
        frozenset(c)
        for size in range(1, len(ordered) + 1)
        for c in itertools.combinations(ordered, size)
    ]


def _targets(gets: Mapping[GetKey, Any]) -> Iterator[Any]:
    for target in gets.values():
        if isinstance(target, UnionDispatch):
            yield from target.members.values()
        else:
            yield target


def _type_key(tp: type) -> tuple[str, str]:
    return (getattr(tp, "__module__", ""), getattr(tp, "__qualname__", repr(tp)))


# ----------------------------------------------------------------------------------------------
# The graph


class RuleGraph:
    """The solved, validated rule graph. Build it with `RuleGraph.build(rules)`.

    Inspect it with `nodes()` (every node, deterministic order), `root(...)` (the node
    serving a query), `to_dot()` and `to_mermaid()`.

    Attributes:
        queries: the QueryRules, in the order given (duplicates dropped).
        union_membership: the members of each `@union` base, from the UnionRules.
        union_membership_rule: the built-in rule providing `union_membership` to rules
            that take a `UnionMembership` parameter.
        rules: every rule of the graph, the built-in one last.
        unreachable: rules no query reaches (reported as a warning, or an error if strict).

    Example::

        graph = RuleGraph.build([*collect_rules(), QueryRule(Thumbnails, (Batch,))])
        for node in graph.nodes():
            print(node.id, node.rule.name, [t.__name__ for t in node.params])
    """

    queries: tuple[QueryRule, ...]
    union_membership: UnionMembership
    union_membership_rule: RuleInfo
    rules: tuple[RuleInfo, ...]
    unreachable: tuple[RuleInfo, ...]

    def __init__(
        self,
        *,
        queries: tuple[QueryRule, ...],
        union_membership: UnionMembership,
        union_membership_rule: RuleInfo,
        rules: tuple[RuleInfo, ...],
        roots: dict[QueryRule, RuleNode | ParamSource],
        nodes: tuple[RuleNode, ...],
        unreachable: tuple[RuleInfo, ...],
    ) -> None:
        self.queries = queries
        self.union_membership = union_membership
        self.union_membership_rule = union_membership_rule
        self.rules = rules
        self.unreachable = unreachable
        self._roots = roots
        self._by_request = {(q.output_type, frozenset(q.param_types)): q for q in queries}
        self._nodes = nodes

    @classmethod
    def build(
        cls, rules: Iterable[object], *, strict: bool = False, exempt: Iterable[object] = ()
    ) -> RuleGraph:
        """Solve and validate the graph of `rules`: rule functions, RuleInfos, QueryRules, UnionRules.

        Args:
            strict: report rules that no query can reach as errors instead of a warning.
                Reachability is checked once the graph otherwise builds: while a query
                fails, the rules below the failure would look unreachable for no reason.
            exempt: rules never reported as unreachable (e.g. the engine's intrinsics).

        Raises:
            RuleDefinitionError: a rule's annotations or Gets cannot be resolved (all listed).
            RuleGraphError: every unsatisfiable, ambiguous, cyclic (and, when strict,
                unreachable) problem, each with where it was found and how to fix it.
        """
        infos, queries, union_rules = _classify(rules)
        exempt_infos = {id(info) for info in _classify(exempt)[0]}
        problems: list[str] = []
        for info in infos:
            try:
                info.resolve()
            except RuleDefinitionError as exc:
                problems.append(str(exc))
        if problems:
            raise RuleDefinitionError("\n\n".join(problems))
        by_name: dict[str, RuleInfo] = {}
        for info in infos:
            other = by_name.setdefault(info.name, info)
            if other is not info:
                problems.append(
                    f"Two different rules are named `{info.name}` ({other.location()} and "
                    f"{info.location()}); rule names identify rules in caches and messages. "
                    "Rename one, or give it @rule(canonical_name=...)."
                )
        if problems:
            raise RuleDefinitionError("\n".join(problems))
        membership = UnionMembership.from_rules(union_rules)
        builtin = union_membership_rule(membership)
        all_rules = [*infos, builtin]
        # Solving allocates many small long-lived objects and frees almost none; the cyclic
        # garbage collector would rescan them again and again (measured: half the build time
        # for 5,000 rules). The solver recurses once per level of the graph: allow deep chains.
        gc_was_enabled = gc.isenabled()
        recursion_limit = sys.getrecursionlimit()
        gc.disable()
        sys.setrecursionlimit(max(recursion_limit, 10_000 + 8 * len(all_rules)))
        try:
            builder = _Builder(all_rules, membership, queries)
            solved = _Solution(builder, queries)
        finally:
            sys.setrecursionlimit(recursion_limit)
            if gc_was_enabled:
                gc.enable()
        problems = solved.problems
        reachable = {id(n.rule) for n in solved.nodes}
        unreachable = tuple(
            info
            for info in infos
            if id(info) not in reachable and not info.builtin and id(info) not in exempt_infos
        )
        if unreachable and not problems:
            text = _unreachable_text(unreachable, solved)
            if strict:
                problems.append(text)
            else:
                warnings.warn(RuleGraphWarning(text), stacklevel=2)
        if problems:
            raise RuleGraphError(problems)
        return cls(
            queries=queries,
            union_membership=membership,
            union_membership_rule=builtin,
            rules=tuple(all_rules),
            roots=solved.roots,
            nodes=solved.nodes,
            unreachable=unreachable,
        )

    def root(self, output_type: type, param_types: Iterable[type]) -> RuleNode | ParamSource:
        """The solved root of the QueryRule for `output_type` whose params are `param_types`.

        `param_types` is matched as a set. The root consumes a subset of the query's params
        (`root.params`, or `{root.type}` for a ParamSource): the others are ignored.

        Raises:
            NoSuchQueryError: no QueryRule has that output type and exactly those param types.
        """
        params = frozenset(param_types)
        query = self._by_request.get((output_type, params))
        if query is None:
            declared = "\n".join(f"  - {q!r}" for q in self.queries) or "  (none)"
            wanted = ", ".join(sorted(_tn(t) for t in params))
            raise NoSuchQueryError(
                f"No QueryRule computes `{_tn(output_type)}` from params ({wanted}). "
                f"Declared queries:\n{declared}\nAdd QueryRule({_tn(output_type)}, ({wanted}"
                f"{',' if len(params) == 1 else ''})) to the engine's rules, or request with the "
                "params of one of the queries above."
            )
        return self._roots[query]

    def nodes(self) -> Sequence[RuleNode]:
        """Every solved node reachable from a query, ordered by `id` (deterministic)."""
        return self._nodes

    def to_dot(self) -> str:
        """The graph as Graphviz DOT text (deterministic)."""
        lines = [
            "digraph rulework {",
            "  rankdir=LR;",
            '  node [shape=box, fontname="monospace"];',
        ]
        params: dict[type, str] = {}

        def ref(target: RuleNode | ParamSource) -> str:
            if isinstance(target, RuleNode):
                return f"n{target.id}"
            name = params.get(target.type)
            if name is None:
                name = params[target.type] = f"p{len(params)}"
            return name

        edges: list[str] = []
        for index, query in enumerate(self.queries):
            lines.append(f"  q{index} [shape=oval, label={_dot_str(repr(query))}];")
            edges.append(f"  q{index} -> {ref(self._roots[query])};")
        for node in self._nodes:
            label = f"{node.rule.name}\\nparams: {', '.join(_tn(t) for t in node.params) or '-'}"
            lines.append(f"  n{node.id} [label={_dot_str(label, raw=True)}];")
            for name, dep in zip(node.rule.parameter_names, node.dependencies, strict=True):
                edges.append(f"  n{node.id} -> {ref(dep)} [label={_dot_str(name)}];")
            for key, target in node.gets.items():
                for label, sub in _get_edges(key, target):
                    edges.append(
                        f"  n{node.id} -> {ref(sub)} [label={_dot_str(label)}, style=dashed];"
                    )
        for tp, name in params.items():
            lines.append(f"  {name} [shape=ellipse, style=dotted, label={_dot_str(_tn(tp))}];")
        lines.extend(edges)
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart (deterministic)."""
        lines = ["flowchart LR"]
        params: dict[type, str] = {}

        def ref(target: RuleNode | ParamSource) -> str:
            if isinstance(target, RuleNode):
                return f"n{target.id}"
            name = params.get(target.type)
            if name is None:
                name = params[target.type] = f"p{len(params)}"
            return name

        edges: list[str] = []
        for index, query in enumerate(self.queries):
            lines.append(f"  q{index}([{_mermaid_str(repr(query))}])")
            edges.append(f"  q{index} --> {ref(self._roots[query])}")
        for node in self._nodes:
            label = f"{node.rule.name}<br/>params: {', '.join(_tn(t) for t in node.params) or '-'}"
            lines.append(f"  n{node.id}[{_mermaid_str(label)}]")
            for name, dep in zip(node.rule.parameter_names, node.dependencies, strict=True):
                edges.append(f"  n{node.id} -->|{_mermaid_str(name)}| {ref(dep)}")
            for key, target in node.gets.items():
                for label, sub in _get_edges(key, target):
                    edges.append(f"  n{node.id} -.->|{_mermaid_str(label)}| {ref(sub)}")
        for tp, name in params.items():
            lines.append(f"  {name}(({_mermaid_str(_tn(tp))}))")
        lines.extend(edges)
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        return f"<RuleGraph: {len(self.queries)} queries, {len(self._nodes)} nodes>"


def _get_edges(key: GetKey, target: Any) -> Iterator[tuple[str, RuleNode | ParamSource]]:
    label = _describe_key(key)
    if isinstance(target, UnionDispatch):
        for member, sub in target.members.items():
            yield f"{label} for {_tn(member)}", sub
    else:
        yield label, target


def _describe_key(key: GetKey) -> str:
    out, inputs = key
    if isinstance(inputs, frozenset):
        return f"Get({_tn(out)}, {{{', '.join(sorted(_tn(t) for t in inputs))}}})"
    return f"Get({_tn(out)}, {_tn(inputs)})"


def _dot_str(text: str, *, raw: bool = False) -> str:
    escaped = text.replace('"', '\\"') if raw else text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _mermaid_str(text: str) -> str:
    return '"' + text.replace('"', "#quot;") + '"'


def _classify(
    items: Iterable[object],
) -> tuple[list[RuleInfo], tuple[QueryRule, ...], list[UnionRule]]:
    infos: dict[int, RuleInfo] = {}
    queries: dict[QueryRule, None] = {}
    union_rules: list[UnionRule] = []
    for item in items:
        if isinstance(item, RuleInfo):
            infos.setdefault(id(item), item)
        elif isinstance(item, QueryRule):
            queries[item] = None
        elif isinstance(item, UnionRule):
            union_rules.append(item)
        else:
            info = _rule_info_of(item)
            if info is None:
                hint = (
                    " (a list or tuple: unpack it with `*`, e.g. [*collect_rules(), ...])"
                    if isinstance(item, list | tuple | set | frozenset)
                    else ""
                )
                raise RuleDefinitionError(
                    f"The engine's rules must be @rule functions, QueryRules or UnionRules; "
                    f"got {_short_repr(item)}{hint}."
                )
            infos.setdefault(id(info), info)
    return list(infos.values()), tuple(queries), union_rules


# ----------------------------------------------------------------------------------------------
# Post-processing: patch recursion, complete params, check, deduplicate, number


class _Solution:
    """Solves every query, then turns the solver's output into the final nodes, or problems."""

    def __init__(self, builder: _Builder, queries: tuple[QueryRule, ...]) -> None:
        self.builder = builder
        self.queries = queries
        self.problems: list[str] = []
        self.roots: dict[QueryRule, RuleNode | ParamSource] = {}
        self.nodes: tuple[RuleNode, ...] = ()
        self._seen_problems: set[tuple[_Site, int]] = set()
        self.type_order = _type_order(builder, queries)
        for query in queries:
            site = _Site("query", query=query)
            result = builder.solve(query.output_type, frozenset(query.param_types), _EMPTY)
            if isinstance(result, _Failure):
                self._explain(site, result, [])
            else:
                assert not isinstance(result, _Pending)  # nothing is in progress at top level
                self.roots[query] = result
        if self.problems:
            return
        parents = self._patch()
        if self.problems:
            return
        self._check_dependency_cycles(parents)
        if self.problems:
            return
        self._deduplicate()
        self._number()
        violations = check_invariants(self.nodes, self.roots)
        if violations:  # a solver bug: say so plainly rather than run a wrong graph
            raise AssertionError("rule graph invariants violated:\n" + "\n".join(violations))

    # -- reachable nodes ----------------------------------------------------------------------

    def _walk(self) -> dict[RuleNode, tuple[RuleNode | None, _Site]]:
        """Reachable nodes, each with the first (parent, site) it was reached from (BFS)."""
        parents: dict[RuleNode, tuple[RuleNode | None, _Site]] = {}
        queue: deque[RuleNode] = deque()
        for query, root in self.roots.items():
            if isinstance(root, RuleNode) and root not in parents:
                parents[root] = (None, _Site("query", query=query))
                queue.append(root)
        while queue:
            node = queue.popleft()
            for site, target in _edges(node):
                if isinstance(target, RuleNode) and target not in parents:
                    parents[target] = (node, site)
                    queue.append(target)
        return parents

    def _patch(self) -> dict[RuleNode, tuple[RuleNode | None, _Site]]:
        """Replace recursion placeholders by the solved nodes; complete params; check Gets.

        Repeats until nothing changes: re-solving a Get can itself meet recursion (new
        placeholders). It terminates because each re-solve replaces a placeholder whose
        assumption failed by a concrete result, and there are finitely many keys.
        """
        builder = self.builder
        if not builder.pending_seen:
            return self._walk()
        for _round in range(1000):
            builder.pending_seen = False
            recheck: list[tuple[RuleNode, _Site, _Pending]] = []
            parents = self._walk()
            for node in list(parents):
                self._patch_node(node, parents, recheck)
            if self.problems:
                return parents
            parents = self._walk()
            self._complete_params(parents)
            # A Get solved while its preferred way was in progress was pointed at that way;
            # rule 1 holds only if the way consumes the Get's inputs once params are complete.
            # Where it does not (or the way failed), the Get's own key is solved now that the
            # preferred way is known: `_solve_required` then looks for the ways that do.
            redo = [
                (node, site, pending)
                for node, site, pending in recheck
                if not pending.requirement <= builder.consumed(_get_target(node, site))
            ]
            solved: dict[_Key, _Result] = {}
            for node, site, pending in redo:
                key = (pending.key[0], pending.key[1], pending.requirement)
                result = solved.get(key)
                if result is None:
                    result = solved[key] = builder.solve(*key)
                if isinstance(result, _Failure):
                    self._explain(site, result, self._chain(node, parents))
                else:
                    _set_target(node, site, result)
            if self.problems:
                return parents
            if not redo and not any(
                isinstance(t, _Pending) for n in parents for _s, t in _edges(n)
            ):
                return parents
        raise AssertionError("recursion placeholders did not settle")  # pragma: no cover

    def _patch_node(
        self,
        node: RuleNode,
        parents: dict[RuleNode, tuple[RuleNode | None, _Site]],
        recheck: list[tuple[RuleNode, _Site, _Pending]],
    ) -> None:
        for site, target in list(_edges(node)):
            if not isinstance(target, _Pending):
                continue
            resolved = self.builder.memo[target.key]  # finished: nothing is in progress now
            if target.requirement:
                # Only a candidate: checked once params are complete. A failure of the
                # preferred way is not this Get's failure (the Get's inputs may resolve it):
                # the placeholder stays until its own key is solved.
                recheck.append((node, site, target))
                if isinstance(resolved, _Failure):
                    continue
            elif isinstance(resolved, _Failure):
                self._explain(site, resolved, self._chain(node, parents))
                continue
            _set_target(node, site, resolved)

    def _complete_params(self, parents: dict[RuleNode, tuple[RuleNode | None, _Site]]) -> None:
        """Least fixpoint: a node consumes what its dependencies and Get targets (minus inputs) do.

        Computed afresh over the reachable nodes rather than grown from their current sets:
        a target replaced by `_patch` must not leave behind params that only the replaced
        target consumed. For nodes without recursion below them this gives back exactly the
        sets computed when they were built; it only adds what placeholders hid.
        """
        users: dict[RuleNode, list[RuleNode]] = {}
        for node in parents:
            node._consumed = _EMPTY
            for _site, target in _edges(node):
                if isinstance(target, RuleNode):
                    users.setdefault(target, []).append(node)
        queue = deque(parents)
        queued = set(parents)
        consumed = self.builder.consumed
        while queue:
            node = queue.popleft()
            queued.discard(node)
            grown = set(node._consumed)
            for site, target in _edges(node):
                if site.kind == "param":
                    grown |= consumed(target)
                else:
                    grown |= consumed(target) - _provided(site)
            if len(grown) != len(node._consumed):
                node._consumed = frozenset(grown)
                for user in users.get(node, ()):
                    if user not in queued:
                        queued.add(user)
                        queue.append(user)

    def _check_dependency_cycles(
        self, parents: dict[RuleNode, tuple[RuleNode | None, _Site]]
    ) -> None:
        """Nodes needing themselves through parameters only can never run: report each cycle."""
        state: dict[RuleNode, int] = {}  # 1: on the DFS stack, 2: done
        for start in parents:
            if start in state:
                continue
            stack: list[tuple[RuleNode, Iterator[Any]]] = [(start, iter(start.dependencies))]
            path: list[RuleNode] = [start]
            state[start] = 1
            while stack:
                node, deps = stack[-1]
                dep = next(deps, None)
                if dep is None:
                    stack.pop()
                    path.pop()
                    state[node] = 2
                    continue
                if not isinstance(dep, RuleNode):
                    continue
                seen = state.get(dep)
                if seen == 1:
                    cycle = tuple(path[path.index(dep) :])
                    failure = _CycleFailure(dep.rule.output_type, cycle)
                    parent, site = parents[cycle[0]]
                    chain = self._chain(parent, parents) if parent is not None else []
                    self._explain(site, failure, chain)
                elif seen is None:
                    state[dep] = 1
                    stack.append((dep, iter(dep.dependencies)))
                    path.append(dep)

    def _chain(
        self, node: RuleNode | None, parents: dict[RuleNode, tuple[RuleNode | None, _Site]]
    ) -> _Chain:
        """The (site, rule) steps from a query down to `node`, outermost first."""
        chain: _Chain = []
        seen: set[RuleNode] = set()
        while node is not None and node not in seen:
            seen.add(node)
            parent, site = parents[node]
            chain.append((site, node.rule))
            node = parent
        chain.reverse()
        return chain

    # -- deduplication and numbering ----------------------------------------------------------

    def _deduplicate(self) -> None:
        """Merge structurally identical nodes, so that each use of a rule has one memo table.

        Hash-consing bottom-up over strongly connected components (Tarjan, sinks first): a
        node outside a cycle is identified by its rule and its (already canonical) targets;
        a node recursing into itself by the same with a marker for the self-reference. Nodes
        of larger cycles are kept as they are.
        """
        parents = self._walk()
        canon: dict[RuleNode, RuleNode] = {}
        table: dict[tuple[Any, ...], RuleNode] = {}

        def canonical(target: Any) -> Any:
            if isinstance(target, RuleNode):
                return canon.get(target, target)
            return target

        def signature(target: Any, me: RuleNode) -> Any:
            if isinstance(target, ParamSource):
                return ("param", target.type)
            if target is me:
                return ("self",)
            return ("node", id(target))

        def node_signature(node: RuleNode) -> tuple[Any, ...]:
            gets_sig: list[Any] = []
            for key, t in node.gets.items():
                if isinstance(t, UnionDispatch):
                    gets_sig.append(
                        (key, tuple((m, signature(s, node)) for m, s in t.members.items()))
                    )
                else:
                    gets_sig.append((key, signature(t, node)))
            return (
                id(node.rule),
                tuple(signature(d, node) for d in node.dependencies),
                tuple(gets_sig),
            )

        for component in _strongly_connected(list(parents)):
            for node in component:
                node.dependencies = tuple(canonical(d) for d in node.dependencies)
                node.gets = {
                    key: (
                        UnionDispatch(t.base, {m: canonical(s) for m, s in t.members.items()})
                        if isinstance(t, UnionDispatch)
                        else canonical(t)
                    )
                    for key, t in node.gets.items()
                }
            if len(component) > 1:
                # Kept as they are, but registered: a later node identical to one of them
                # (same rule, same targets) is merged into it.
                for node in component:
                    canon[node] = node
                for node in component:
                    table.setdefault(node_signature(node), node)
                continue
            (node,) = component
            canon[node] = table.setdefault(node_signature(node), node)
        self.roots = {q: canonical(r) for q, r in self.roots.items()}

    def _number(self) -> None:
        """Ids by depth-first preorder from the queries, in order: deterministic."""
        order: list[RuleNode] = []
        seen: set[RuleNode] = set()
        for query in self.queries:
            root = self.roots[query]
            if not isinstance(root, RuleNode):
                continue
            stack: list[RuleNode] = [root]
            while stack:
                node = stack.pop()
                if node in seen:
                    continue
                seen.add(node)
                order.append(node)
                children = [t for _s, t in _edges(node) if isinstance(t, RuleNode)]
                stack.extend(reversed(children))
        rank = self.type_order
        for index, node in enumerate(order):
            node.id = index
            node.params = tuple(sorted(node._consumed, key=lambda t: rank.get(t, (9, "", "", 0))))
        self.nodes = tuple(order)

    # -- explanations -------------------------------------------------------------------------

    def _explain(self, site: _Site, failure: _Failure, chain: _Chain) -> None:
        seen_key = (site, id(failure))
        if seen_key in self._seen_problems:
            return
        self._seen_problems.add(seen_key)
        attempts = failure.attempts if isinstance(failure, _AllFailed) else ()
        if len(attempts) > 1:
            # Only one rule fails on a choice (an ambiguity or cycle below it) rather than on
            # something missing here: that is the rule meant to be used.
            chosen = [a for a in attempts if _fails_on_choices(a)]
            if len(chosen) == 1:
                attempts = tuple(chosen)
        if len(attempts) == 1:
            # One rule could have provided it: the problem is further down, in that rule.
            (attempt,) = attempts
            step = [*chain, (site, attempt.rule)]
            for sub_site, sub_failure in attempt.problems:
                self._explain(sub_site, sub_failure, step)
            return
        self.problems.append(_render(site, failure, chain))
        if isinstance(failure, _AllFailed):
            # Whichever rule is meant to be used, an ambiguity or a cycle below it is a problem
            # of its own: report it where it happens, too.
            for attempt in failure.attempts:
                self._explain_choices(attempt, [*chain, (site, attempt.rule)], depth=0)

    def _explain_choices(self, attempt: _Attempt, chain: _Chain, depth: int) -> None:
        for sub_site, sub_failure in attempt.problems:
            if isinstance(sub_failure, _Ambiguous | _CycleFailure):
                self._explain(sub_site, sub_failure, chain)
            elif isinstance(sub_failure, _AllFailed) and depth < 8:
                for sub_attempt in sub_failure.attempts:
                    step = [*chain, (sub_site, sub_attempt.rule)]
                    self._explain_choices(sub_attempt, step, depth + 1)


def _fails_on_choices(attempt: _Attempt, depth: int = 0) -> bool:
    """Whether all that stops `attempt` is ambiguities or cycles (nothing it needs is missing)."""
    return all(_is_choice(failure, depth) for _site, failure in attempt.problems)


def _is_choice(failure: _Failure, depth: int = 0) -> bool:
    """Whether `failure` comes from an ambiguity or cycle, not from something missing."""
    if isinstance(failure, _Ambiguous | _CycleFailure):
        return True
    return (
        isinstance(failure, _AllFailed)
        and depth < 8
        and any(_fails_on_choices(a, depth + 1) for a in failure.attempts)
    )


def _edges(node: RuleNode) -> Iterator[tuple[_Site, Any]]:
    info = node.rule
    for index, dep in enumerate(node.dependencies):
        yield _Site("param", None, info, index), dep
    if not node.gets:
        return
    specs = info.gets_by_key
    for key, target in node.gets.items():
        spec = specs[key]
        if isinstance(target, UnionDispatch):
            for member, sub in target.members.items():
                yield _Site("get", rule=info, get=spec, member=member), sub
        else:
            yield _Site("get", rule=info, get=spec), target


def _provided(site: _Site) -> frozenset[type]:
    if site.member is not None:
        return frozenset((site.member,))
    assert site.get is not None
    return frozenset(site.get.input_types)


def _get_target(node: RuleNode, site: _Site) -> Any:
    if site.kind == "param":
        return node.dependencies[site.position]
    assert site.get is not None
    target = node.gets[site.get.key]
    if isinstance(target, UnionDispatch):
        assert site.member is not None
        return target.members[site.member]
    return target


def _set_target(node: RuleNode, site: _Site, value: Any) -> None:
    if site.kind == "param":
        deps = list(node.dependencies)
        deps[site.position] = value
        node.dependencies = tuple(deps)
        return
    assert site.get is not None
    key = site.get.key
    target = node.gets[key]
    if isinstance(target, UnionDispatch):
        assert site.member is not None
        members = dict(target.members)
        members[site.member] = value
        node.gets[key] = UnionDispatch(target.base, members)
    else:
        node.gets[key] = value


def _strongly_connected(nodes: list[RuleNode]) -> list[list[RuleNode]]:
    """Tarjan's algorithm, iterative; components come out sinks first."""
    index_of: dict[RuleNode, int] = {}
    low: dict[RuleNode, int] = {}
    on_stack: set[RuleNode] = set()
    stack: list[RuleNode] = []
    components: list[list[RuleNode]] = []
    counter = 0
    for start in nodes:
        if start in index_of:
            continue
        work: list[tuple[RuleNode, Iterator[Any]]] = [(start, _successors(start))]
        index_of[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index_of:
                    index_of[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, _successors(succ)))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index_of[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index_of[node]:
                component: list[RuleNode] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member is node:
                        break
                components.append(component)
    return components


def _successors(node: RuleNode) -> Iterator[RuleNode]:
    for dep in node.dependencies:
        if isinstance(dep, RuleNode):
            yield dep
    for target in _targets(node.gets):
        if isinstance(target, RuleNode):
            yield target


def _type_order(builder: _Builder, queries: Sequence[QueryRule]) -> dict[type, tuple[Any, ...]]:
    """A deterministic sort key per type: (module, qualname), ties broken by first appearance."""
    seen: dict[type, int] = {}
    for query in queries:
        for tp in (query.output_type, *query.param_types):
            seen.setdefault(tp, len(seen))
    for infos in builder.by_output.values():
        for info in infos:
            for tp in (info.output_type, *info.parameter_types):
                seen.setdefault(tp, len(seen))
            for spec in info.gets:
                for tp in (spec.output_type, *spec.input_types):
                    seen.setdefault(tp, len(seen))
    for _base, members in builder.membership.items():
        for tp in members:
            seen.setdefault(tp, len(seen))
    return {tp: (0, *_type_key(tp), n) for tp, n in seen.items()}


def check_invariants(
    nodes: Sequence[RuleNode], roots: Mapping[QueryRule, RuleNode | ParamSource]
) -> list[str]:
    """Violations of the invariants documented on `RuleNode` (empty for a correct graph)."""
    problems: list[str] = []
    for query, root in roots.items():
        root_params = {root.type} if isinstance(root, ParamSource) else set(root.params)
        if not root_params <= set(query.param_types):
            problems.append(f"{query!r}: root consumes {root_params} beyond the query's params")
    for node in nodes:
        own = set(node.params)
        if len(node.dependencies) != len(node.rule.parameter_names):
            problems.append(f"{node!r}: {len(node.dependencies)} dependencies")
        for site, target in _edges(node):
            if isinstance(target, ParamSource):
                needed = {target.type}
            elif isinstance(target, RuleNode):
                needed = set(target.params)
            else:
                problems.append(f"{node!r}: unresolved target {target!r}")
                continue
            allowed = own if site.kind == "param" else own | _provided(site)
            if not needed <= allowed:
                problems.append(f"{node!r}: {_site_text(site)} needs {needed - allowed}")
            if site.kind == "get" and not _provided(site) <= needed:
                problems.append(f"{node!r}: {_site_text(site)} does not consume its inputs")
    return problems


# ----------------------------------------------------------------------------------------------
# Messages


def _names(types_: Iterable[type]) -> str:
    return ", ".join(sorted(_tn(t) for t in types_)) or "none"


def _site_text(site: _Site) -> str:
    if site.kind == "query":
        return repr(site.query)
    info = site.rule
    assert info is not None
    if site.kind == "param":
        pname = info.parameter_names[site.position]
        return (
            f"parameter `{pname}: {_tn(info.parameter_types[site.position])}` of rule "
            f"`{info.name}` ({info.location()})"
        )
    assert site.get is not None
    member = f" (for union member `{_tn(site.member)}`)" if site.member is not None else ""
    return (
        f"`{site.get.describe()}`{member} in rule `{info.name}` at "
        f"{_where(site.get.filename, site.get.lineno)}"
    )


def _scope_of(chain: _Chain, site: _Site) -> tuple[frozenset[type], frozenset[type]]:
    """(params in scope at the site, params the site's own Get adds)."""
    scope: set[type] = set()
    for step_site, _info in chain:
        if step_site.kind == "query":
            assert step_site.query is not None
            scope.update(step_site.query.param_types)
        elif step_site.kind == "get":
            scope.update(_provided(step_site))
    if site.kind == "query":
        assert site.query is not None
        scope.update(site.query.param_types)
    added = _provided(site) if site.kind == "get" else _EMPTY
    return frozenset(scope), added


def _query_of(chain: _Chain, site: _Site) -> QueryRule | None:
    first = chain[0][0] if chain else site
    return first.query


def _render_chain(chain: _Chain, site: _Site) -> str:
    if not chain:
        return ""
    lines = ["  How the engine got there, from the query:"]
    for step_site, info in chain:
        if step_site.kind == "query":
            lines.append(f"    {step_site.query!r}")
        else:
            lines.append(f"    -> {_site_tail(step_site)}")
        lines.append(f"    -> {info.signature()}   [{info.location()}]")
    lines.append(f"    -> {_site_tail(site)}   <- here")
    return "\n".join(lines) + "\n"


def _site_tail(site: _Site) -> str:
    if site.kind == "param":
        assert site.rule is not None
        pname = site.rule.parameter_names[site.position]
        return f"parameter `{pname}: {_tn(site.rule.parameter_types[site.position])}`"
    if site.kind == "get":
        assert site.get is not None
        member = f" for union member `{_tn(site.member)}`" if site.member is not None else ""
        return f"{site.get.describe()}{member} at {_where(site.get.filename, site.get.lineno)}"
    return repr(site.query)


def _providers_text(failure: _AllFailed, indent: str = "    ") -> str:
    lines = []
    for attempt in failure.attempts:
        reasons = "; ".join(f"{_site_short(s)}: {_reason(f)}" for s, f in attempt.problems)
        lines.append(f"{indent}- {attempt.rule.signature()}   [{attempt.rule.location()}]")
        lines.append(f"{indent}    cannot run here: {reasons}")
    return "\n".join(lines)


def _site_short(site: _Site) -> str:
    if site.kind == "param":
        assert site.rule is not None
        return f"parameter `{site.rule.parameter_names[site.position]}`"
    if site.kind == "get":
        assert site.get is not None
        member = f" for `{_tn(site.member)}`" if site.member is not None else ""
        return f"{site.get.describe()}{member} (line {site.get.lineno})"
    return repr(site.query)


def _reason(failure: _Failure, depth: int = 0) -> str:
    """One line saying why a type is unavailable, following single-rule chains to the cause."""
    tp = _tn(failure.output_type)
    if isinstance(failure, _NoRule):
        return f"no rule returns `{tp}` and it is not a param in scope"
    if isinstance(failure, _AllFailed):
        names = ", ".join(a.rule.name for a in failure.attempts)
        if depth >= 4:
            return f"none of the rules returning `{tp}` can run here ({names})"
        causes = [
            "; ".join(f"{_site_short(s)}: {_reason(f, depth + 1)}" for s, f in a.problems)
            for a in failure.attempts
        ]
        if len(failure.attempts) == 1:
            return f"its only rule {names} cannot run here ({causes[0]})"
        if len(set(causes)) == 1:
            return (
                f"none of the rules returning `{tp}` ({names}) can run here: all need {causes[0]}"
            )
        listing = "; ".join(
            f"{a.rule.name} needs {c}" for a, c in zip(failure.attempts, causes, strict=True)
        )
        return f"none of the rules returning `{tp}` can run here ({listing})"
    if isinstance(failure, _Ambiguous):
        names = ", ".join(
            sorted({w.rule.name for w in failure.ways if isinstance(w, RuleNode | _Attempt)})
        )
        return f"`{tp}` is ambiguous here ({len(failure.ways)} ways: {names})"
    if isinstance(failure, _Unconsumed):
        return f"no way to compute `{tp}` uses the input {_names(failure.requirement)}"
    if isinstance(failure, _CycleFailure):
        return f"`{tp}` depends on itself"
    return type(failure).__name__


def _describe_way(way: Any, depth: int = 2) -> str:
    if isinstance(way, ParamSource):
        return f"the param `{_tn(way.type)}`"
    if isinstance(way, _Attempt):
        return f"{way.rule.name}(...) with an ambiguous parameter"
    if not isinstance(way, RuleNode):
        return repr(way)
    if depth == 0:
        return f"{way.rule.name}(...)"
    parts = []
    for name, dep in zip(way.rule.parameter_names, way.dependencies, strict=True):
        if isinstance(dep, ParamSource):
            parts.append(f"{name}=param")
        else:
            parts.append(f"{name}={_describe_way(dep, depth - 1)}")
    return f"{way.rule.name}({', '.join(parts)})"


def _render(site: _Site, failure: _Failure, chain: _Chain) -> str:
    tp = _tn(failure.output_type)
    scope, added = _scope_of(chain, site)
    query = _query_of(chain, site)
    query_text = repr(query) if query is not None else "the QueryRule"
    in_scope = f"  Params in scope there: {_names(scope)}"
    if added:
        in_scope += f"; the Get adds {_names(added)}"
    in_scope += ".\n"
    how = _render_chain(chain, site)
    where = _site_text(site)
    is_get = site.kind == "get"
    inputs = _names(added) if is_get else ""

    if isinstance(failure, _NoRule):
        if is_get:
            fix = (
                f"add a @rule that computes `{tp}` from `{inputs}`, e.g. "
                f"`async def make(x: {inputs.split(', ')[0]}) -> {tp}`"
            )
        else:
            fix = (
                f"add a @rule returning `{tp}` (it may take any of: {_names(scope)}), or add "
                f"`{tp}` to the params of {query_text}"
            )
        return (
            f"No rule can compute `{tp}` for {where}.\n{in_scope}"
            f"  No rule returns `{tp}`, and it is not one of the params in scope.\n{how}"
            f"  Fix: {fix}."
        )
    if isinstance(failure, _AllFailed):
        return (
            f"No rule can compute `{tp}` for {where}.\n{in_scope}"
            f"  Each rule returning `{tp}` needs something that is missing here:\n"
            f"{_providers_text(failure)}\n{how}"
            f"  Fix: give one of these rules what it needs (a rule producing it, or the type as "
            f"a param of {query_text})"
            + ("" if is_get else f", or add `{tp}` to the params of {query_text}")
            + "."
        )
    if isinstance(failure, _Ambiguous):
        rules = {id(w.rule) for w in failure.ways if isinstance(w, RuleNode | _Attempt)}
        distinct_rules = len(rules) == len(failure.ways)
        listing = "\n".join(
            f"    - {w.rule.signature() if distinct_rules else _describe_way(w)}   "
            f"[{w.rule.location()}]"
            if isinstance(w, RuleNode | _Attempt)
            else f"    - {_describe_way(w)}"
            for w in failure.ways
        )
        if distinct_rules:
            return (
                f"Ambiguous: {len(failure.ways)} rules can compute `{tp}` for {where}.\n"
                f"{in_scope}  Candidates:\n{listing}\n"
                "  rulework does not choose between rules: in a given scope exactly one rule "
                "may provide a type.\n"
                f"{how}"
                "  Fix: remove all but one of these rules (or make them return distinct types)"
                + (
                    ""
                    if is_get
                    else f", or add `{tp}` to the params of {query_text} so that "
                    "the caller's value is used"
                )
                + "."
            )
        return (
            f"Ambiguous: {where} can be computed in {len(failure.ways)} ways that use "
            f"{_names(failure.requirement)}, and none of them uses params everywhere the others "
            f"do.\n{in_scope}  Ways:\n{listing}\n{how}"
            "  Fix: remove the rule that makes the difference in all but one of these ways, or "
            "make the rules return distinct types."
        )
    if isinstance(failure, _Unconsumed):
        req = _names(failure.requirement)
        preferred = failure.preferred
        if preferred is None:
            instead = f"No rule that computes `{tp}` can, even indirectly, consume a `{req}`."
        elif isinstance(preferred, ParamSource):
            instead = (
                f"The only way found returns the `{tp}` param already in scope, ignoring the "
                f"`{req}` the Get passes."
            )
        elif isinstance(preferred, RuleNode):
            instead = (
                f"The only way found is {_describe_way(preferred)}, which does not use the "
                f"`{req}` the Get passes."
            )
        else:
            instead = f"No way to compute `{tp}` uses the `{req}` the Get passes."
        union_fix = (
            f", or remove UnionRule({_tn(site.get.input_types[0])}, {_tn(site.member)})"
            if site.member is not None and site.get is not None
            else ""
        )
        return (
            f"{where[0].upper()}{where[1:]} cannot use its input: a Get computes its result from "
            f"its input, but no way to compute `{tp}` here consumes `{req}`.\n{in_scope}"
            f"  {instead}\n{how}"
            f"  Fix: add a @rule that computes `{tp}` from `{req}` (directly or through other "
            f"rules), e.g. `async def make(x: {sorted(_tn(t) for t in failure.requirement)[0]})"
            f" -> {tp}`{union_fix}."
        )
    if isinstance(failure, _CycleFailure):
        steps = " -> ".join(
            f"{n.rule.name} (needs `{_tn(n.rule.parameter_types[_dep_index(n, nxt)])}`)"
            for n, nxt in zip(failure.cycle, (*failure.cycle[1:], failure.cycle[0]), strict=True)
        )
        return (
            f"Rules need each other through their parameters, in a cycle, so none of them can "
            f"ever run: {steps} -> {failure.cycle[0].rule.name} again.\n"
            f"  Reached from {where}.\n{in_scope}{how}"
            f"  Fix: break the cycle: one of these parameters must come from a param in scope "
            f"(add it to {query_text}) or from a Get with its own input."
        )
    raise AssertionError(f"unknown failure {failure!r}")


def _dep_index(node: RuleNode, dep: RuleNode) -> int:
    for index, d in enumerate(node.dependencies):
        if d is dep:
            return index
    return 0


def _unreachable_text(unreachable: Sequence[RuleInfo], solved: _Solution) -> str:
    # What serves each requested type in the solved graph: "param" or rule names.
    served: dict[type, set[str]] = {}

    def note(target: Any) -> None:
        if isinstance(target, ParamSource):
            served.setdefault(target.type, set()).add("param")
        elif isinstance(target, RuleNode):
            served.setdefault(target.rule.output_type, set()).add(target.rule.name)

    for root in solved.roots.values():
        note(root)
    for node in solved.nodes:
        for _site, target in _edges(node):
            note(target)
    count = len(unreachable)
    lines = [
        f"{count} rule{'s are' if count != 1 else ' is'} not reachable from any QueryRule, so "
        f"the engine would never run {'them' if count != 1 else 'it'}:"
    ]
    for info in unreachable:
        out = _tn(info.output_type)
        servers = served.get(info.output_type)
        if not servers:
            why = f"nothing requests `{out}`"
        elif servers == {"param"}:
            why = f"wherever `{out}` is needed, a param in scope provides it"
        else:
            others = ", ".join(sorted(servers - {"param"}))
            param = " or a param in scope" if "param" in servers else ""
            why = (
                f"wherever `{out}` is needed, {others}{param} provides it (this rule's "
                "parameters are not available there)"
            )
        lines.append(f"  - {info.signature()}   [{info.location()}]: {why}")
    lines.append(
        "Fix: request their output from a rule (parameter or Get) or add a QueryRule for it, or "
        "remove them. (Engine(..., strict=True) makes this an error.)"
    )
    return "\n".join(lines)
