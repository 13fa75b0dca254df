"""Rule graph construction time for 100 / 1,000 / 5,000 synthetic rules.

Prints one line per size:

    rule_graph rules=N seconds=S nodes=... baseline_seconds=B growth_vs_nlogn=G

- `seconds`: `RuleGraph.build` (solving, validation, deduplication, numbering) for N rules.
- `baseline_seconds`: the same run's unavoidable linear pass over those rules (reading every
  rule's types and Gets and indexing them by output type): the floor any solver pays.
- `growth_vs_nlogn`: (S_N / S_100) / (N log N / (100 log 100)); about 1 or below means the
  solver grows no faster than N log N.
Also `rule_define rules=N seconds=S`: decorating the N rules (signature checks and reading the
source for Gets), paid when the modules are imported.

The rules come from generated source text run with exec(); the text is registered in
`linecache` under a made-up file name so that the engine can read the rules' source for Gets,
as it does for a real module.

Goal: 5,000 rules in under 1 second on a 2-core machine. Run: `python bench/rule_graph.py`.
"""

from __future__ import annotations

import gc
import linecache
import math
import sys
import time
import types
import warnings

from rulework.engine.graph import RuleGraph
from rulework.engine.rules import QueryRule, UnionRule, collect_rules

SIZES = (100, 1_000, 5_000)


def generate(n_rules: int) -> str:
    """Source of a module with `n_rules` rules in groups of 5-10, linked as a binary tree.

    Group kinds, in turn: a chain of 9 rules; diamonds (6 rules); a rule whose Gets' subgraph
    consumes the Get's input and a query param (3 rules); a union with 3 members dispatched by
    a Get (4 rules); a 5-level aggregation in which every level Gets the same output type from
    the next finer input (6 rules: the hardest shape for the solver, since the params of every
    level stay in scope below it). Each group has a top rule that also takes the tops of groups 2g+1 and
    2g+2, so that one query reaches everything and the graph is ~log N groups deep.
    """
    groups: list[list[str]] = []
    count = 0
    g = 0
    while count < n_rules:
        body = [f"class Top{g}: pass"]
        kind = g % 5
        if kind == 0:  # a chain
            for j in range(9):
                prev = "p: P" if j == 0 else f"x: C{g}_{j - 1}"
                body.append(f"class C{g}_{j}: pass")
                body.append(
                    f"@rule\nasync def c{g}_{j}({prev}) -> C{g}_{j}:\n    return C{g}_{j}()"
                )
        elif kind == 1:  # diamonds
            body.append("\n".join(f"class D{x}{g}: pass" for x in "ABCDEF"))
            body += [
                f"@rule\nasync def da{g}(p: P) -> DA{g}:\n    return DA{g}()",
                f"@rule\nasync def db{g}(a: DA{g}) -> DB{g}:\n    return DB{g}()",
                f"@rule\nasync def dc{g}(a: DA{g}, q: Q) -> DC{g}:\n    return DC{g}()",
                f"@rule\nasync def dd{g}(b: DB{g}, c: DC{g}) -> DD{g}:\n    return DD{g}()",
                f"@rule\nasync def de{g}(d: DD{g}) -> DE{g}:\n    return DE{g}()",
                f"@rule\nasync def df{g}(d: DD{g}, e: DE{g}) -> DF{g}:\n    return DF{g}()",
            ]
        elif kind == 2:  # Gets
            body.append(
                f"class GI{g}: pass\nclass GR{g}: pass\nclass GS{g}: pass\nclass GT{g}: pass"
            )
            body += [
                f"@rule\nasync def gs{g}(i: GI{g}) -> GS{g}:\n    return GS{g}()",
                f"@rule\nasync def gr{g}(s: GS{g}, q: Q) -> GR{g}:\n    return GR{g}()",
                f"@rule\nasync def gt{g}(p: P) -> GT{g}:\n"
                f"    a, b = await MultiGet(Get(GR{g}, GI{g}()), Get(GR{g}, GI{g}, GI{g}()))\n"
                f"    return GT{g}()",
            ]
        elif kind == 4:  # a hierarchical aggregation: every level produces HS{g}
            body.append(f"class HS{g}: pass\nclass HT{g}: pass")
            body += [f"class H{g}_{k}: pass" for k in range(5)]
            body.append(f"@rule\nasync def h{g}_0(x: H{g}_0) -> HS{g}:\n    return HS{g}()")
            for k in range(1, 5):
                body.append(
                    f"@rule\nasync def h{g}_{k}(x: H{g}_{k}) -> HS{g}:\n"
                    f"    return await Get(HS{g}, H{g}_{k - 1}, H{g}_{k - 1}())"
                )
            body.append(
                f"@rule\nasync def ht{g}(p: P) -> HT{g}:\n"
                f"    await Get(HS{g}, H{g}_4, H{g}_4())\n    return HT{g}()"
            )
        else:  # a union
            body.append(f"@union\nclass U{g}: pass\nclass UR{g}: pass\nclass UT{g}: pass")
            for k in range(3):
                body.append(f"class M{g}_{k}: pass")
                body.append(
                    f"@rule\nasync def u{g}_{k}(m: M{g}_{k}, q: Q) -> UR{g}:\n    return UR{g}()"
                )
            body.append(
                f"@rule\nasync def ut{g}(p: P) -> UT{g}:\n    return await Get(UR{g}, U{g}, M{g}_0())"
            )
        groups.append(body)
        count += sum(chunk.count("@rule") for chunk in body) + 1  # + the group's top rule
        g += 1
    n_groups = g
    lines = [
        "from rulework.engine.rules import Get, MultiGet, rule, union",
        "class P: pass",
        "class Q: pass",
        "class Extra: pass",
    ]
    for g, body in enumerate(groups):
        kids = [c for c in (2 * g + 1, 2 * g + 2) if c < n_groups]
        params = ", ".join([f"x: {_last_type(g)}", *(f"k{c}: Top{c}" for c in kids)])
        body.append(f"@rule\nasync def top{g}({params}) -> Top{g}:\n    return Top{g}()")
        lines.extend(body)
    lines.append(f"N_GROUPS = {n_groups}")
    return "\n".join(lines) + "\n"


def _last_type(g: int) -> str:
    return [f"C{g}_8", f"DF{g}", f"GT{g}", f"UT{g}", f"HT{g}"][g % 5]


def load(n_rules: int) -> tuple[types.ModuleType, float]:
    source = generate(n_rules)
    filename = f"<rulework-bench-{n_rules}>"
    # Register the source so that the engine can read it back (inspect/linecache), like a file.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType(f"rulework_bench_{n_rules}")
    module.__file__ = filename
    sys.modules[module.__name__] = module
    code = compile(source, filename, "exec")
    started = time.perf_counter()
    exec(code, module.__dict__)
    return module, time.perf_counter() - started


def rule_set(module: types.ModuleType) -> list[object]:
    from rulework.engine.rules import is_union

    rules: list[object] = list(collect_rules(module))
    for name, value in vars(module).items():
        if isinstance(value, type) and is_union(value):
            g = name[1:]
            rules.extend(UnionRule(value, getattr(module, f"M{g}_{k}")) for k in range(3))
    rules.append(QueryRule(module.Top0, (module.P, module.Q)))
    # A few more roots, with an extra param that nothing consumes (must not split nodes).
    for g in range(0, module.N_GROUPS, 50):
        rules.append(QueryRule(getattr(module, f"Top{g}"), (module.P, module.Q, module.Extra)))
    return rules


def baseline(rules: list[object]) -> float:
    """The linear floor: read every rule's types and Gets, index rules by output type."""
    from rulework.engine.rules import RuleInfo, rule_info

    started = time.perf_counter()
    index: dict[type, list[RuleInfo]] = {}
    for item in rules:
        if isinstance(item, QueryRule | UnionRule):
            continue
        info = rule_info(item)
        index.setdefault(info.output_type, []).append(info)
        for spec in info.gets:
            _ = spec.key
        _ = info.parameter_types
    return time.perf_counter() - started


def main() -> None:
    results: dict[int, float] = {}
    for size in SIZES:
        module, define_seconds = load(size)
        rules = rule_set(module)
        n = sum(1 for r in rules if not isinstance(r, QueryRule | UnionRule))
        base = baseline(rules)
        gc.collect()
        best = math.inf
        graph = None
        for _ in range(3):
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # every synthetic rule must be reachable
                graph = RuleGraph.build(rules)
            best = min(best, time.perf_counter() - started)
        assert graph is not None
        results[size] = best
        growth = ""
        if SIZES[0] in results and size != SIZES[0]:
            nlogn = (n * math.log(n)) / (results_n[SIZES[0]] * math.log(results_n[SIZES[0]]))
            growth = f" growth_vs_nlogn={best / results[SIZES[0]] / nlogn:.2f}"
        results_n[size] = n
        print(f"rule_define rules={n} seconds={define_seconds:.4f}")
        print(
            f"rule_graph rules={n} seconds={best:.4f} nodes={len(graph.nodes())} "
            f"baseline_seconds={base:.4f}{growth}",
            flush=True,
        )


results_n: dict[int, int] = {}

if __name__ == "__main__":
    main()
