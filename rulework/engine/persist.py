"""Persisted rule results (`@rule(persist=True)`): cache keys users can trust, and cache explain.

API (used by `rulework cache explain MODULE:QUERY [ARGS]`)::

    async def explain(
        session_or_engine: Session | Engine, output_type: type, *params: object
    ) -> ExplainReport
    ExplainReport.render() -> str

`explain` runs the request (in a new session of the engine, or in the given session) and
reports, for every persisted node it visited, whether the caches served it and, for a miss,
which part of its key changed since the last recorded run. Misses are computed and stored as
in any run, so a second `explain` of the same request shows hits.

The key of a persisted node (DESIGN.md, "Caching"):

    blake3(key-schema version (with the Python minor version), [cache] salt, rule id,
           code digest of the rule and of every rule reachable from it in the solved graph,
           the rule's declared `version`,
           (param type, fingerprint(param value)) for each param the node consumes)

- Code digests come from `codehash.CodeHasher` (normalized AST, plus the values the code reads),
  once per Engine. Reachability follows `RuleNode.dependencies` and `RuleNode.gets` (union
  members included); the digest of a node covers its strongly connected component of the graph
  and everything below it (a Merkle hash over the condensation), so thousands of nodes share
  the work. Intrinsics count by name and rulework version; the union-membership rule also by
  the membership itself. Each reachable rule's `version` counts too.
- A rule that can run a Process also has the session's process environment in its key (the
  default environment's name and the settings of every configured environment): the same
  request run elsewhere is not served from a result computed here.
- A rule whose code (or a reachable rule's code) reads a value that cannot be fingerprinted is
  not persisted (`PersistWarning`, once per rule and reason): it runs every time, and `explain`
  shows the reason. So is a rule that reaches an intrinsic reading the workspace (`PathGlobs`
  -> `Snapshot`): file contents are not in the key. Such a rule should take the `Snapshot` (or
  `Digest`) as a param instead; content-addressed params are. A node whose *param* cannot be
  fingerprinted is not persisted either.
- Values are stored as the canonical, compact JSON of the cattrs-unstructured output (a copy of
  `fingerprint.converter` configured for JSON: bytes as base85, sets as sorted lists). A value
  is only stored if it survives the round trip exactly (same types all the way down). Digests
  inside the value (a `Snapshot`, a directory `Digest`, a `FileEntry`...) are recorded with the
  entry, so a result whose blobs are gone is a miss. Errors are never stored.
- Beside each entry, `explain` records: the key's parts under (rule id, param fingerprints),
  the latest parts of each rule under its rule id alone (first write per session), the code
  digests of the reachable rules under (rule id, code digest), and the parts of each rule's
  code digest under (rule, digest) -- the last two only when absent.

Known limits: code reached only dynamically (`getattr(module, name)`) is not read (see
`codehash`); a rule with a side effect outside the engine is the user's to not persist.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import enum
import json
import logging
import types
import typing
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
import blake3
import cattrs
import cattrs.preconf.json

from .codehash import CODE_SCHEMA, CodeHasher, UncacheableCodeError, hash_parts, rulework_version
from .errors import CacheError, MissingDigestError, RuleDefinitionError, StoreError
from .fingerprint import FingerprintError, converter, fingerprint
from .fs import Digest, FileEntry, Snapshot
from .graph import ParamSource, RuleNode, UnionDispatch
from .process import FrozenDict
from .scheduler import Session

if TYPE_CHECKING:
    from .cache import CacheLayer
    from .config import Config
    from .engine import Engine
    from .graph import RuleGraph
    from .rules import RuleInfo
    from .scheduler import Compiled, CompiledGraph, Node, Workunit
    from .services import Services

__all__ = [
    "KEY_SCHEMA",
    "ExplainReport",
    "KeyChange",
    "NodeExplanation",
    "PersistWarning",
    "attach_persistence",
    "explain",
    "persisted_key",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the key's composition or the stored value's format changes.
KEY_SCHEMA: Final = f"rulework.persist.v1/{CODE_SCHEMA}"

# The name of the key part that stands for the process environment.
_ENVIRONMENT_PART: Final = "<process environment>"

# Side entries for `explain`. Their keys leave out the salt and the code on purpose: a changed
# salt or code must still find the previous record to explain itself.
_EXPLAIN_SCHEMA: Final = "rulework.persist.explain.v1"


class PersistWarning(UserWarning):
    """A `@rule(persist=True)` rule (or one of its nodes) is not persisted; the message says why.

    Shown once per rule and reason in a process; the rule still runs, every time.
    """


_WARNED: set[tuple[str, str]] = set()


def _warn_once(rule: str, message: str) -> None:
    if (rule, message) in _WARNED:
        return
    _WARNED.add((rule, message))
    warnings.warn(PersistWarning(message), stacklevel=3)


def persisted_key(
    *,
    salt: str,
    rule_id: str,
    code: str,
    version: str | None,
    params: Sequence[tuple[type, object]],
    environment: str | None = None,
) -> str:
    """The cache key of a persisted node (hex BLAKE3); see the module docstring.

    `code` is the code digest of the rule and the rules it reaches; `params` the consumed
    params as (param type, value); `environment` the process-environment digest, for a rule
    that can run processes. Raises `FingerprintError` if a param cannot be fingerprinted.
    """
    names = [_type_name(t) for t, _ in params]
    fps = [fingerprint(v) for _, v in params]
    if environment is not None:
        if len(environment) != 64:
            raise ValueError(f"environment must be a 64-digit hex digest, got {environment!r}")
        names.append(_ENVIRONMENT_PART)
        fps.append(environment)
    return _KeyMaker(_key_prefix(salt, rule_id, code, version), names).key(fps)


def _key_prefix(salt: str, rule_id: str, code: str, version: str | None) -> str:
    return hash_parts(
        "rulework persisted rule",
        KEY_SCHEMA,
        salt,
        rule_id,
        code,
        "no version" if version is None else f"version {version}",
    )


def _length_prefixed(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(8, "big") + data


class _KeyMaker:
    """Node keys of one rule: `hash_parts(prefix, *(f"{param type}\\0{fingerprint}" ...))`, with
    everything but the fingerprints precomputed (the hot path of every cache hit)."""

    __slots__ = ("_heads", "_prefix")

    def __init__(self, prefix: str, names: Sequence[str]) -> None:
        self._prefix = _length_prefixed(prefix)
        # Each param part is f"{name}\0{fp}" with a 64-digit fp: its length is known.
        self._heads = tuple(
            (len(n.encode("utf-8", "surrogatepass")) + 1 + 64).to_bytes(8, "big")
            + n.encode("utf-8", "surrogatepass")
            + b"\x00"
            for n in names
        )

    def key(self, fps: Sequence[str]) -> str:
        material = [self._prefix]
        for head, fp in zip(self._heads, fps, strict=True):
            material.append(head)
            material.append(fp.encode("ascii"))
        return blake3.blake3(b"".join(material)).hexdigest()


def _type_name(tp: type) -> str:
    return f"{getattr(tp, '__module__', '?')}.{getattr(tp, '__qualname__', repr(tp))}"


def _short_type(name: str) -> str:
    return name.rpartition(".")[2]


def _short_repr(value: object, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not break the cache
        text = f"<{type(value).__qualname__} with a failing repr>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Values: the JSON converter


def _canonical_list(items: Iterable[Any]) -> list[Any]:
    """Set members in a canonical order (their JSON text), so equal sets store equal bytes."""
    listed = list(items)
    try:
        return sorted(listed, key=lambda item: json.dumps(item, sort_keys=True))
    except (TypeError, ValueError):
        return listed


def _is_frozendict(tp: Any) -> bool:
    return tp is FrozenDict or typing.get_origin(tp) is FrozenDict


def _frozendict_structure(tp: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    args = typing.get_args(tp)
    as_dict: Any = dict[args[0], args[1]] if len(args) == 2 else dict  # type: ignore[valid-type]
    inner = conv.get_structure_hook(as_dict)

    def structure(value: Any, _tp: Any) -> FrozenDict[Any, Any]:
        return FrozenDict(inner(value, as_dict))

    return structure


def _make_converter() -> cattrs.Converter:
    """A copy of `fingerprint.converter` (so users' hooks apply) configured for JSON."""
    conv = converter.copy(unstruct_collection_overrides={AbstractSet: _canonical_list})
    cattrs.preconf.json.configure_converter(conv)
    conv.register_unstructure_hook_func(
        lambda tp: isinstance(tp, type) and issubclass(tp, FrozenDict),
        lambda value: conv.unstructure(dict(value)),
    )
    conv.register_structure_hook_factory(
        _is_frozendict,
        lambda tp: _frozendict_structure(tp, conv),
    )
    return conv


def _same_value(restored: object, value: object) -> bool:
    """Equal with the same types all the way down (`1`, `1.0` and `True` differ)."""
    try:
        return fingerprint(restored) == fingerprint(value)
    except FingerprintError:
        return type(restored) is type(value) and bool(restored == value)


def _output_problem(info: RuleInfo, conv: cattrs.Converter) -> str | None:
    """Why a persisted rule's output type cannot be stored, or None if it can."""
    problem = _storage_problem(info.output_type, conv, _type_name(info.output_type), set())
    if problem is None:
        return None
    return (
        f"Rule `{info.name}` ({info.location()}) is declared with persist=True, but its "
        f"output type `{_type_name(info.output_type)}` cannot be stored in the cache: {problem}. "
        "Make the output a frozen dataclass (or attrs class) whose fields are primitives, "
        "tuples, frozensets, enums, Digests or other such classes; or register structure and "
        "unstructure hooks for the type on rulework.engine.fingerprint.converter; or drop "
        "persist=True."
    )


_PRIMITIVES: Final = (str, int, float, bool, bytes, type(None))
_CONTAINERS: Final = frozenset(
    {tuple, frozenset, set, list, dict, FrozenDict}
    | {
        getattr(collections.abc, name)
        for name in ("Sequence", "Set", "Mapping", "Collection", "Iterable")
    }
)


def _storage_problem(tp: Any, conv: cattrs.Converter, where: str, seen: set[int]) -> str | None:
    """Why values of `tp` cannot go through the converter (`where` names it), or None.

    Checked by walking the type: cattrs generates (and compiles) a hook per class, which for
    thousands of persisted rules is seconds at every Engine build; hooks are made on first use
    instead. Types this walk does not know are asked to cattrs itself.
    """
    if id(tp) in seen or tp in _PRIMITIVES or tp is typing.Any:
        return None
    seen.add(id(tp))
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum | PurePath | datetime.date) or tp is FrozenDict:
            return None
        if dataclasses.is_dataclass(tp) or attrs.has(tp):
            try:
                hints = typing.get_type_hints(tp)
            except Exception as exc:  # an annotation naming something undefined
                return f"the annotations of `{_type_name(tp)}` cannot be resolved ({exc})"
            names = (
                [f.name for f in dataclasses.fields(tp)]
                if dataclasses.is_dataclass(tp)
                else [a.name for a in attrs.fields(tp)]
            )
            for name in names:
                problem = _storage_problem(
                    hints.get(name, typing.Any), conv, f"{_type_name(tp)}.{name}", seen
                )
                if problem is not None:
                    return problem
            return None
    else:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Literal:
            return None
        if origin in _CONTAINERS:
            for arg in args:
                if arg is not Ellipsis:
                    problem = _storage_problem(arg, conv, where, seen)
                    if problem is not None:
                        return problem
            return None
        if origin in (typing.Union, types.UnionType) and all(a in _PRIMITIVES for a in args):
            return None
    try:
        conv.get_unstructure_hook(tp)
        conv.get_structure_hook(tp)
    except Exception as exc:
        return f"`{where}` has the type `{tp!r}`, which cattrs cannot convert ({exc})"
    return None


def _may_hold_digests(tp: Any, seen: set[int] | None = None) -> bool:
    """Whether values of `tp` can contain a Digest (decided once per rule, from the type)."""
    seen = set() if seen is None else seen
    if id(tp) in seen:
        return False
    seen.add(id(tp))
    if tp in (str, bytes, int, float, bool, type(None)):
        return False
    if isinstance(tp, type):
        if issubclass(tp, Digest | FileEntry | Snapshot):
            return True
        if issubclass(tp, enum.Enum):
            return False
        if dataclasses.is_dataclass(tp) or attrs.has(tp):
            try:
                hints = typing.get_type_hints(tp)
            except Exception:
                return True
            return any(_may_hold_digests(h, seen) for h in hints.values())
        # A subclass of a primitive holds none; another type (with user hooks): cannot tell.
        return not issubclass(tp, str | bytes | int | float)
    args = typing.get_args(tp)
    if not args:
        return True  # Any, bare generics...
    return any(_may_hold_digests(a, seen) for a in args if a is not Ellipsis)


def _walk_digests(value: Any, files: set[Digest], maybe_trees: set[Digest]) -> None:
    """Collect the Digests inside `value`: file blobs, and digests that may name trees."""
    stack = [value]
    while stack:
        item = stack.pop()
        cls = type(item)
        if cls in (str, bytes, int, float, bool) or item is None or isinstance(item, enum.Enum):
            continue
        if isinstance(item, Digest):
            maybe_trees.add(item)
        elif isinstance(item, FileEntry):
            files.add(item.file_digest)
        elif isinstance(item, Snapshot):
            maybe_trees.add(item.digest)
        elif dataclasses.is_dataclass(item):
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        elif attrs.has(cls):
            stack.extend(getattr(item, a.name) for a in attrs.fields(cls))
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, tuple | list | set | frozenset):
            stack.extend(item)


# ----------------------------------------------------------------------------------------------
# Code digests over the rule graph


@dataclass(frozen=True, slots=True)
class RuleCode:
    """The code digest of one rule (`parts` as in `CodeFingerprint`) and its declared version."""

    rule: str
    digest: str
    version: str | None
    parts: Mapping[str, str]

    @property
    def combined(self) -> str:
        return hash_parts(
            "rule code", self.rule, self.digest, "-" if self.version is None else f"v{self.version}"
        )


class _Uncacheable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _successors(node: RuleNode) -> Iterator[RuleNode]:
    for dep in node.dependencies:
        if isinstance(dep, RuleNode):
            yield dep
    for target in node.gets.values():
        if isinstance(target, RuleNode):
            yield target
        elif isinstance(target, UnionDispatch):
            for member in target.members.values():
                if isinstance(member, RuleNode):
                    yield member
        else:
            assert isinstance(target, ParamSource)


class _GraphCode:
    """Code digests per rule and per RuleNode (covering every rule it reaches), memoized."""

    def __init__(self, graph: RuleGraph) -> None:
        from . import intrinsics
        from .rules import rule_info

        self._hasher = CodeHasher()
        self._intrinsics = {id(rule_info(r)) for r in intrinsics.rules()}
        self._process_rules = {
            id(rule_info(r)) for r in (intrinsics.run_process, intrinsics.run_fallible_process)
        }
        self._membership_rule = graph.union_membership_rule
        self._membership = graph.union_membership
        self._rules: dict[int, RuleCode | _Uncacheable] = {}
        # id(RuleNode) -> digest of everything it reaches, or why that cannot be computed.
        # Invariant: an entry exists only once every node it reaches has one.
        self._reach: dict[int, str | _Uncacheable] = {}
        # id(RuleNode) -> whether it can reach a process execution (set with `_reach`).
        self._processes: dict[int, bool] = {}
        self._keep: list[RuleNode] = []  # keeps ids in `_reach` unique

    def reaches_processes(self, node: RuleNode) -> bool:
        """Whether `node` can run a Process (its results then depend on the environment)."""
        self.reachable_digest(node)
        return self._processes[id(node)]

    def rule_code(self, info: RuleInfo) -> RuleCode:
        found = self._rules.get(id(info))
        if found is None:
            found = self._rules[id(info)] = self._compute_rule_code(info)
        if isinstance(found, _Uncacheable):
            raise found
        return found

    def _compute_rule_code(self, info: RuleInfo) -> RuleCode | _Uncacheable:
        name = info.name
        if getattr(info.func, "__rulework_reads_paths__", None) is not None:
            return _Uncacheable(
                "it reads files from the workspace, whose contents the cache key cannot see. "
                "Read the files in a rule that is not persisted and pass their "
                "Snapshot or Digest to the persisted rule as a param (content-addressed inputs "
                "are part of the key)"
            )
        if info is self._membership_rule:
            members = sorted(
                f"{_type_name(base)}: {', '.join(sorted(_type_name(m) for m in ms))}"
                for base, ms in self._membership.items()
            )
            digest = hash_parts("union membership", name, rulework_version(), *members)
            return RuleCode(name, digest, info.version, {"<union members>": hash_parts(*members)})
        if info.builtin or id(info) in self._intrinsics:
            version = rulework_version()
            digest = hash_parts("intrinsic", name, version)
            return RuleCode(name, digest, info.version, {"<rulework>": hash_parts(version)})
        try:
            code = self._hasher.function(info.func)
            output = self._hasher.value(info.output_type, f"the output type of `{name}`")
            params = {
                f"<param type {_type_name(tp)}>": self._hasher.value(
                    tp, f"the parameter type `{_type_name(tp)}` of `{name}`"
                )
                for tp in info.parameter_types
            }
        except UncacheableCodeError as exc:
            return _Uncacheable(f"{exc}")
        parts = {**code.parts, "<output type>": output, **params}
        digest = hash_parts("rule", name, code.digest, output, *sorted(params.values()))
        return RuleCode(name, digest, info.version, parts)

    def reachable_digest(self, node: RuleNode) -> str:
        """The digest of `node`'s rule code and of every rule it reaches.

        Raises:
            _Uncacheable: some reachable rule's code cannot be fingerprinted.
        """
        found = self._reach.get(id(node))
        if found is None:
            self._solve(node)
            found = self._reach[id(node)]
        if isinstance(found, _Uncacheable):
            raise found
        return found

    def reachable_rules(self, node: RuleNode) -> dict[str, RuleCode]:
        """Every rule `node` reaches (itself included), by name."""
        rules: dict[str, RuleCode] = {}
        seen: set[int] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            code = self.rule_code(current.rule)
            rules[code.rule] = code
            stack.extend(_successors(current))
        return rules

    def _solve(self, start: RuleNode) -> None:
        """Tarjan's strongly connected components from `start` (iterative: graphs are deep),
        finishing each component's digest as soon as it is complete."""
        index: dict[int, int] = {}
        low: dict[int, int] = {}
        on_stack: set[int] = set()
        stack: list[RuleNode] = []
        work: list[tuple[RuleNode, Iterator[RuleNode]]] = []

        def visit(node: RuleNode) -> None:
            index[id(node)] = low[id(node)] = len(index)
            stack.append(node)
            on_stack.add(id(node))
            work.append((node, _successors(node)))

        visit(start)
        while work:
            node, children = work[-1]
            descended = False
            for child in children:
                key = id(child)
                if key in self._reach:
                    continue
                if key not in index:
                    visit(child)
                    descended = True
                    break
                if key in on_stack:
                    low[id(node)] = min(low[id(node)], index[key])
            if descended:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[id(parent)] = min(low[id(parent)], low[id(node)])
            if low[id(node)] == index[id(node)]:
                members: list[RuleNode] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(id(member))
                    members.append(member)
                    if member is node:
                        break
                self._finish(members)

    def _finish(self, members: list[RuleNode]) -> None:
        inside = {id(m) for m in members}
        codes: set[str] = set()
        below: set[str] = set()
        problems: list[str] = []
        processes = False
        for member in sorted(members, key=lambda m: m.rule.name):
            processes = processes or id(member.rule) in self._process_rules
            try:
                codes.add(self.rule_code(member.rule).combined)
            except _Uncacheable as exc:
                problems.append(f"in rule `{member.rule.name}`: {exc.reason}")
            for child in _successors(member):
                if id(child) in inside:
                    continue
                found = self._reach[id(child)]
                processes = processes or self._processes[id(child)]
                if isinstance(found, _Uncacheable):
                    problems.append(found.reason)
                else:
                    below.add(found)
        result: str | _Uncacheable
        if problems:
            result = _Uncacheable(sorted(problems)[0])
        else:
            result = hash_parts("reachable code", *sorted(codes), *sorted(below))
        for member in members:
            self._reach[id(member)] = result
            self._processes[id(member)] = processes
            self._keep.append(member)


# ----------------------------------------------------------------------------------------------
# The scheduler hook


class _EngineState:
    """What one Engine's persistence knows: its hooks, its uncacheable rules, its converter."""

    def __init__(self, salt: str, code: _GraphCode, conv: cattrs.Converter) -> None:
        self.salt = salt
        self.salt_digest = hash_parts("salt", salt)
        self.code = code
        self.converter = conv
        #: Persisted rules that are not persisted, by name, with the reason.
        self.uncacheable: dict[str, str] = {}
        # Per-rule code records known to be in the cache (each is written at most once).
        self._rule_codes_written: set[tuple[str, str]] = set()
        # Default environment name -> digest of what decides where processes run.
        self._environments: dict[str, str] = {}

    def environment(self, services: Services) -> tuple[str, str]:
        """The session's default environment and the digest of the environments' settings
        (a Process may name any of them): the key part of rules that can run processes.

        Raises:
            FingerprintError: an executor's settings cannot be fingerprinted.
        """
        name = services.processes.default_environment
        digest = self._environments.get(name)
        if digest is None:
            digest = hash_parts(
                "process environments", name, fingerprint(services.config.environments)
            )
            self._environments[name] = digest
        return name, digest

    async def write_rule_code(self, cache: CacheLayer, code: RuleCode) -> None:
        """Record which parts make up a rule's code digest, if not recorded yet."""
        marker = (code.rule, code.digest)
        if marker in self._rule_codes_written:
            return
        key = _rule_code_key(code.rule, code.digest)
        if await cache.get_action(key) is None:
            await cache.put_action(key, _encode_json({"parts": dict(code.parts)}))
        self._rule_codes_written.add(marker)


# Per compiled graph (one per Engine): how `explain` finds what the Engine decided.
_STATES: weakref.WeakKeyDictionary[CompiledGraph, _EngineState] = weakref.WeakKeyDictionary()
# Sessions in which `explain` is recording, with their recorder.
_RECORDERS: dict[Session, _Recorder] = {}


class _PersistedRule:
    """The PersistHook of one compiled node of a `@rule(persist=True)` rule."""

    def __init__(self, state: _EngineState, compiled: Compiled, code: str) -> None:
        info = compiled.rule_node.rule
        self._state = state
        self._rule_node = compiled.rule_node
        self.rule_id = info.name
        self.code = code
        self.version = info.version
        self._param_names = tuple(_type_name(t) for t in compiled.params)
        # A rule that can run processes computes what the environment they run in computes.
        self._uses_environment = state.code.reaches_processes(compiled.rule_node)
        self._keys = _KeyMaker(
            _key_prefix(state.salt, info.name, code, info.version),
            self._param_names + ((_ENVIRONMENT_PART,) if self._uses_environment else ()),
        )
        self._output_type = info.output_type
        # The converter's hooks for the output type, made on first use (see _storage_problem).
        self._hooks: tuple[Callable[[Any, Any], Any], Callable[[Any], Any]] | None = None
        self._may_hold_digests = _may_hold_digests(info.output_type)
        # Sessions in which the rule-level side entries were written already.
        self._side_written: weakref.WeakSet[Session] = weakref.WeakSet()
        self._code_map: dict[str, RuleCode] | None = None

    def _structure(self, data: Any, tp: Any) -> Any:
        hooks = self._hooks or self._make_hooks()
        return hooks[0](data, tp)

    def _unstructure(self, value: Any) -> Any:
        hooks = self._hooks or self._make_hooks()
        return hooks[1](value)

    def _make_hooks(self) -> tuple[Callable[[Any, Any], Any], Callable[[Any], Any]]:
        conv = self._state.converter
        hooks = (
            conv.get_structure_hook(self._output_type),
            conv.get_unstructure_hook(self._output_type),
        )
        self._hooks = hooks
        return hooks

    # -- keys ----------------------------------------------------------------------------------

    def _key_parts(
        self, node: Node, services: Services
    ) -> tuple[list[str], tuple[str, str] | None] | None:
        """The fingerprints of the node's params, plus the process environment's digest for a
        rule that can run processes; and the environment's name. None (after a warning) if a
        part cannot be fingerprinted: the node is then not persisted."""
        try:
            fps = [fingerprint(value) for value in node.values]
            environment = None
            if self._uses_environment:
                environment = self._state.environment(services)
                fps.append(environment[1])
        except FingerprintError as exc:
            message = (
                f"A node of rule `{self.rule_id}` is not persisted: a part of its key cannot be "
                f"fingerprinted ({exc})"
            )
            _warn_once(self.rule_id, message)
            recorder = _RECORDERS.get(node.session)
            if recorder is not None:
                recorder.uncacheable(node, message)
            return None
        return fps, environment

    def _named(self, fps: Sequence[str]) -> list[tuple[str, str]]:
        """The params' (type name, fingerprint) pairs (without the environment part)."""
        return list(zip(self._param_names, fps[: len(self._param_names)], strict=True))

    # -- PersistHook ---------------------------------------------------------------------------

    async def load(self, node: Node) -> tuple[Any, str] | None:
        services: Services | None = node.session.services
        if services is None or not _has_cache(services):
            return None
        parts = self._key_parts(node, services)
        if parts is None:
            return None
        fps, environment = parts
        key = self._keys.key(fps)
        try:
            found = await services.cache.get_action(key)
        except CacheError as exc:
            logger.warning("Persisted-rule cache lookup failed, running %s: %s", self.rule_id, exc)
            found = None
        result: tuple[Any, str] | None = None
        if found is not None:
            data, source = found
            try:
                result = (self._structure(json.loads(data), self._output_type), source)
            except Exception as exc:  # an entry this rulework cannot read is a miss
                _warn_once(
                    self.rule_id,
                    f"Ignoring an unreadable cached result of rule `{self.rule_id}` (key {key}): "
                    f"{type(exc).__name__}: {exc}",
                )
        recorder = _RECORDERS.get(node.session)
        if recorder is not None:
            await recorder.persisted(
                self, node, key, self._named(fps), environment, result, services
            )
        return result

    async def save(self, node: Node, value: Any) -> None:
        services: Services | None = node.session.services
        if services is None or not _has_cache(services):
            return
        parts = self._key_parts(node, services)
        if parts is None:
            return
        fps, environment = parts
        key = self._keys.key(fps)
        data = self._encode(value)
        if data is None:
            return
        blobs = await self._blobs(value, services) if self._may_hold_digests else set()
        if blobs is None:
            return
        try:
            await services.cache.put_action(key, data, digests=blobs)
        except CacheError as exc:
            _warn_once(
                self.rule_id,
                f"A result of rule `{self.rule_id}` was not persisted: {exc}",
            )
            return
        await self._write_side_entries(node, key, self._named(fps), environment, services)

    def _encode(self, value: Any) -> bytes | None:
        try:
            text = json.dumps(
                self._unstructure(value), sort_keys=True, separators=(",", ":"), allow_nan=True
            )
            restored = self._structure(json.loads(text), self._output_type)
        except Exception as exc:
            _warn_once(
                self.rule_id,
                f"A result of rule `{self.rule_id}` was not persisted: it cannot be converted to "
                f"JSON and back ({type(exc).__name__}: {exc}). Register hooks for the types "
                "involved on rulework.engine.fingerprint.converter.",
            )
            return None
        if not _same_value(restored, value):
            _warn_once(
                self.rule_id,
                f"A result of rule `{self.rule_id}` was not persisted: it does not survive the "
                f"round trip through the cache unchanged ({_short_repr(value)} came back as "
                f"{_short_repr(restored)}). Annotate its fields with the exact types they hold "
                "(e.g. not `Any` or a union that cattrs cannot tell apart).",
            )
            return None
        return text.encode("ascii")

    async def _blobs(self, value: Any, services: Services) -> set[Digest] | None:
        """Every blob `value` refers to (trees expanded), or None if some are not stored."""
        files: set[Digest] = set()
        maybe_trees: set[Digest] = set()
        _walk_digests(value, files, maybe_trees)
        blobs = set(files)
        for digest in sorted(maybe_trees):
            try:
                blobs.update(await services.store.tree_blobs(digest))
            except MissingDigestError as exc:
                _warn_once(
                    self.rule_id,
                    f"A result of rule `{self.rule_id}` was not persisted: it refers to blobs "
                    f"that are not in the local store ({exc})",
                )
                return None
            except StoreError:
                blobs.add(digest)  # a file's digest, not a directory's
        return blobs

    # -- explain records -----------------------------------------------------------------------

    def record(
        self,
        node: Node,
        key: str,
        fps: Sequence[tuple[str, str]],
        environment: tuple[str, str] | None,
    ) -> dict[str, Any]:
        """The key's parts for node `node`, as `explain` stores and compares them."""
        return {
            "schema": KEY_SCHEMA,
            "salt": self._state.salt_digest,
            "rule": self.rule_id,
            "code": self.code,
            "version": self.version,
            "environment": list(environment) if environment is not None else None,
            "params": [
                [name, fp, _short_repr(value)]
                for (name, fp), value in zip(fps, node.values, strict=True)
            ],
            "key": key,
        }

    def code_map(self) -> dict[str, RuleCode]:
        """Every rule this node's rule reaches, with its code digest (computed once)."""
        found = self._code_map
        if found is None:
            found = self._code_map = self._state.code.reachable_rules(self._rule_node)
        return found

    async def _write_side_entries(
        self,
        node: Node,
        key: str,
        fps: Sequence[tuple[str, str]],
        environment: tuple[str, str] | None,
        services: Services,
    ) -> None:
        record = _encode_json(self.record(node, key, fps, environment))
        cache = services.cache
        try:
            await cache.put_action(_explain_key(self.rule_id, fps), record)
            session = node.session
            if session in self._side_written:
                return
            self._side_written.add(session)
            await cache.put_action(_latest_key(self.rule_id), record)
            # The per-rule digests, for "code of rule X changed": content-addressed, so
            # written only when absent (a graph reaching thousands of rules writes them once).
            rules = self.code_map()
            map_key = _code_map_key(self.rule_id, self.code)
            if await cache.get_action(map_key) is None:
                listing = {name: [code.digest, code.version] for name, code in rules.items()}
                for code in rules.values():
                    await self._state.write_rule_code(cache, code)
                await cache.put_action(map_key, _encode_json({"rules": listing}))
        except CacheError as exc:
            logger.warning("Could not record the key of %s for `explain`: %s", self.rule_id, exc)


def _has_cache(services: Services) -> bool:
    """Whether any cache is configured (`[cache] local = "none"` and no remote: nothing to do)."""
    cache = services.cache
    return cache.local is not None or cache.remote is not None


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("ascii")


def _explain_key(rule_id: str, fps: Sequence[tuple[str, str]]) -> str:
    return hash_parts(_EXPLAIN_SCHEMA, "params", rule_id, *(f"{n}\x00{f}" for n, f in fps))


def _latest_key(rule_id: str) -> str:
    return hash_parts(_EXPLAIN_SCHEMA, "latest", rule_id)


def _code_map_key(rule_id: str, code: str) -> str:
    return hash_parts(_EXPLAIN_SCHEMA, "code map", rule_id, code)


def _rule_code_key(rule_id: str, digest: str) -> str:
    return hash_parts(_EXPLAIN_SCHEMA, "rule code", rule_id, digest)


# ----------------------------------------------------------------------------------------------
# Engine build


def attach_persistence(compiled_graph: CompiledGraph, graph: RuleGraph, config: Config) -> None:
    """Give every compiled node of a `@rule(persist=True)` rule its PersistHook.

    Called once per Engine, after the graph is compiled. A rule whose code (or reachable code)
    cannot be fingerprinted gets no hook (it runs every time) and a `PersistWarning`.

    Raises:
        RuleDefinitionError: a persisted rule's output type cannot be stored (all such rules
            are listed).
    """
    persisted = [c for c in compiled_graph.compiled_nodes() if c.rule_node.rule.persist]
    if not persisted:
        return
    conv = _make_converter()
    problems: list[str] = []
    checked: set[int] = set()
    for compiled in persisted:
        info = compiled.rule_node.rule
        if id(info) in checked:
            continue
        checked.add(id(info))
        problem = _output_problem(info, conv)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise RuleDefinitionError("\n\n".join(problems))
    state = _EngineState(config.cache.salt, _GraphCode(graph), conv)
    for compiled in persisted:
        name = compiled.rule_node.rule.name
        try:
            code = state.code.reachable_digest(compiled.rule_node)
        except _Uncacheable as exc:
            reason = f"Rule `{name}` is not persisted (it runs every time): {exc.reason}"
            state.uncacheable.setdefault(name, reason)
            _warn_once(name, reason)
            continue
        compiled.persist = _PersistedRule(state, compiled, code)
    _STATES[compiled_graph] = state


# ----------------------------------------------------------------------------------------------
# explain

ChangeKind = Literal[
    "schema",
    "salt",
    "version",
    "environment",
    "code",
    "rule_version",
    "rule_added",
    "rule_removed",
    "graph",
    "param",
    "no_record_for_params",
    "no_previous_run",
    "unchanged",
]


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One part of a persisted node's key that differs from the last recorded run.

    `kind` says which part; `subject` names the rule or param concerned; `old`/`new` are the
    previous and current values where they can be shown; `detail` says more (e.g. which names
    a rule's code reads changed).
    """

    kind: ChangeKind
    subject: str | None = None
    old: str | None = None
    new: str | None = None
    detail: str | None = None

    def describe(self) -> str:
        """One line for people."""
        kind = self.kind
        if kind == "schema":
            return (
                f"the key schema changed ({self.old} -> {self.new}): rulework or Python was "
                "upgraded"
            )
        if kind == "salt":
            return "the cache salt changed (`[cache] salt` in the config)"
        if kind == "version":
            return f"version changed ({self.old!r} -> {self.new!r})"
        if kind == "environment":
            what = (
                f"{self.old} -> {self.new}"
                if self.old != self.new
                else f"{self.new}: {self.detail}"
            )
            return f"the process environment changed ({what}); this rule can run processes"
        if kind == "code":
            suffix = f" ({self.detail})" if self.detail else ""
            return f"code of rule `{self.subject}` changed{suffix}"
        if kind == "rule_version":
            return f"version of rule `{self.subject}` changed ({self.old!r} -> {self.new!r})"
        if kind == "rule_added":
            return f"rule `{self.subject}` is now reachable from this rule"
        if kind == "rule_removed":
            return f"rule `{self.subject}` is no longer reachable from this rule"
        if kind == "graph":
            return "the shape of the rule graph below this rule changed"
        if kind == "param":
            return f"param {self.subject} changed ({self.old} -> {self.new})"
        if kind == "no_record_for_params":
            return (
                "no run recorded with these params; compared with the latest recorded run of "
                "this rule:"
            )
        if kind == "no_previous_run":
            return "no previous run recorded"
        return (
            "the key is the same as in the last recorded run: the entry was evicted, or its "
            "blobs are gone, or it was written by a run whose cache writes failed"
        )


@dataclass(frozen=True, slots=True)
class NodeExplanation:
    """What happened to one persisted node in an `explain` run.

    `outcome` is "hit", "miss" or "uncacheable"; `source` the cache that served a hit
    ("local_cache", "remote_cache"); `changes` why a miss missed; `reason` why an uncacheable
    node is not persisted.
    """

    node_id: int
    rule: str
    description: str
    outcome: Literal["hit", "miss", "uncacheable"]
    source: str | None = None
    key: str | None = None
    changes: tuple[KeyChange, ...] = ()
    reason: str | None = None

    @property
    def hit(self) -> bool:
        """Whether the caches served this node."""
        return self.outcome == "hit"


@dataclass(frozen=True, slots=True)
class ExplainReport:
    """Every persisted node an `explain` run visited, in the order they started."""

    request: str
    nodes: tuple[NodeExplanation, ...]

    @property
    def hits(self) -> int:
        return sum(n.outcome == "hit" for n in self.nodes)

    @property
    def misses(self) -> int:
        return sum(n.outcome == "miss" for n in self.nodes)

    @property
    def uncacheable(self) -> int:
        return sum(n.outcome == "uncacheable" for n in self.nodes)

    def render(self) -> str:
        """The report as text, for the CLI."""
        lines = [f"cache explain: {self.request}"]
        if not self.nodes:
            lines.append("  no persisted node was visited (no rule with persist=True ran)")
        for node in self.nodes:
            head = f"  hit ({node.source})" if node.outcome == "hit" else f"  {node.outcome}"
            lines.append(f"{head:<22} {node.description}")
            if node.reason:
                lines.append(f"{'':<25}- {node.reason}")
            indent = 25
            for change in node.changes:
                lines.append(f"{'':<{indent}}- {change.describe()}")
                if change.kind == "no_record_for_params":
                    indent = 27  # what follows compares with another run: nest it
        total = len(self.nodes)
        lines.append(
            f"{total} persisted node{'s' if total != 1 else ''}: "
            f"{self.hits} hit{'s' if self.hits != 1 else ''}, "
            f"{self.misses} miss{'es' if self.misses != 1 else ''}, "
            f"{self.uncacheable} uncacheable"
        )
        return "\n".join(lines)


class _Recorder:
    """Collects NodeExplanations for one `explain` request in one session."""

    def __init__(self, state: _EngineState | None) -> None:
        self._state = state
        self.nodes: dict[int, NodeExplanation] = {}

    def uncacheable(self, node: Node, reason: str) -> None:
        self.nodes[node.node_id] = NodeExplanation(
            node.node_id, node.compiled.name, node.describe(), "uncacheable", reason=reason
        )

    def on_workunit(self, unit: Workunit) -> None:
        """Nodes of persisted rules that have no hook (their code is not fingerprintable)."""
        if unit.kind != "end" or unit.node_id in self.nodes or self._state is None:
            return
        reason = self._state.uncacheable.get(unit.name)
        if reason is not None and unit.outcome in ("success", "failure"):
            self.nodes[unit.node_id] = NodeExplanation(
                unit.node_id, unit.name, unit.description, "uncacheable", reason=reason
            )

    async def persisted(
        self,
        hook: _PersistedRule,
        node: Node,
        key: str,
        fps: Sequence[tuple[str, str]],
        environment: tuple[str, str] | None,
        result: tuple[Any, str] | None,
        services: Services,
    ) -> None:
        description = node.describe()
        if result is not None:
            self.nodes[node.node_id] = NodeExplanation(
                node.node_id, hook.rule_id, description, "hit", source=result[1], key=key
            )
            return
        current = hook.record(node, key, fps, environment)
        changes: list[KeyChange] = []
        previous = await _read_json(services, _explain_key(hook.rule_id, fps))
        if previous is None:
            previous = await _read_json(services, _latest_key(hook.rule_id))
            if previous is None:
                changes.append(KeyChange("no_previous_run"))
            else:
                changes.append(KeyChange("no_record_for_params"))
        if previous is not None:
            changes.extend(await _differences(previous, current, hook, services))
        self.nodes[node.node_id] = NodeExplanation(
            node.node_id, hook.rule_id, description, "miss", key=key, changes=tuple(changes)
        )


async def _read_json(services: Services, key: str) -> dict[str, Any] | None:
    try:
        found = await services.cache.get_action(key)
    except CacheError:
        return None
    if found is None:
        return None
    try:
        value = json.loads(found[0])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _differences(
    previous: Mapping[str, Any],
    current: Mapping[str, Any],
    hook: _PersistedRule,
    services: Services,
) -> list[KeyChange]:
    changes: list[KeyChange] = []
    if previous.get("schema") != current["schema"]:
        changes.append(KeyChange("schema", old=str(previous.get("schema")), new=current["schema"]))
    if previous.get("salt") != current["salt"]:
        changes.append(KeyChange("salt"))
    if previous.get("version") != current["version"]:
        changes.append(
            KeyChange("version", hook.rule_id, old=previous.get("version"), new=current["version"])
        )
    old_environment, new_environment = previous.get("environment"), current["environment"]
    if old_environment != new_environment:
        old_name = old_environment[0] if isinstance(old_environment, list) else None
        new_name = new_environment[0] if new_environment is not None else None
        changes.append(
            KeyChange(
                "environment",
                old=str(old_name),
                new=str(new_name),
                detail="its settings changed" if old_name == new_name else None,
            )
        )
    if previous.get("code") != current["code"]:
        changes.extend(await _code_changes(previous, hook, services))
    old_params = previous.get("params") or []
    new_params = current["params"]
    old_by_type = {p[0]: p for p in old_params if isinstance(p, list) and len(p) == 3}
    for name, fp, text in new_params:
        old = old_by_type.get(name)
        if old is None:
            changes.append(KeyChange("param", _short_type(name), old="(not consumed)", new=text))
        elif old[1] != fp:
            changes.append(KeyChange("param", _short_type(name), old=old[2], new=text))
    for name in sorted(set(old_by_type) - {p[0] for p in new_params}):
        changes.append(
            KeyChange("param", _short_type(name), old=old_by_type[name][2], new="(not consumed)")
        )
    if not changes:
        changes.append(KeyChange("unchanged"))
    return changes


_PART_LABELS: Final = {
    "<body>": "its body",
    "<output type>": "its output type",
    "<defaults>": "its default arguments",
    "<kwdefaults>": "its default arguments",
    "<rulework>": "the rulework version",
    "<union members>": "the union members",
}


def _part_label(name: str) -> str:
    label = _PART_LABELS.get(name)
    if label is not None:
        return label
    if name.startswith("<param type "):
        return f"param type `{_short_type(name[len('<param type ') : -1])}`"
    return f"`{name}`"


async def _code_changes(
    previous: Mapping[str, Any], hook: _PersistedRule, services: Services
) -> list[KeyChange]:
    old_map_entry = await _read_json(
        services, _code_map_key(hook.rule_id, str(previous.get("code")))
    )
    old_map = old_map_entry.get("rules") if old_map_entry is not None else None
    if not isinstance(old_map, dict):
        return [
            KeyChange(
                "code",
                hook.rule_id,
                detail="or the code of a rule it reaches; the previous per-rule digests are no "
                "longer in the cache",
            )
        ]
    new_map = hook.code_map()
    changes: list[KeyChange] = []
    # The rule's own version is part of the code digest too; it is reported on its own.
    own_version_changed = False
    for name in sorted(set(old_map) | set(new_map)):
        old, new = old_map.get(name), new_map.get(name)
        if old is None:
            changes.append(KeyChange("rule_added", name))
            continue
        if new is None:
            changes.append(KeyChange("rule_removed", name))
            continue
        if not (isinstance(old, list) and len(old) == 2):
            continue
        old_digest, old_version = old
        if old_digest != new.digest:
            changes.append(
                KeyChange(
                    "code", name, detail=await _changed_parts(services, name, old_digest, new)
                )
            )
        if old_version != new.version:
            if name == hook.rule_id:
                own_version_changed = True
            else:
                changes.append(KeyChange("rule_version", name, old=old_version, new=new.version))
    if not changes and not own_version_changed:
        changes.append(KeyChange("graph"))
    return changes


async def _changed_parts(
    services: Services, rule: str, old_digest: object, new: RuleCode
) -> str | None:
    """Which parts of a rule's code changed ("its body, `LIMIT`"), if the old ones are known."""
    entry = await _read_json(services, _rule_code_key(rule, str(old_digest)))
    old_parts = entry.get("parts") if entry is not None else None
    if not isinstance(old_parts, dict):
        return None
    new_parts = new.parts
    changed = sorted(
        p for p in set(old_parts) | set(new_parts) if old_parts.get(p) != new_parts.get(p)
    )
    return ", ".join(_part_label(p) for p in changed) or None


def _state_of(session: Session) -> _EngineState | None:
    # The session's compiled graph identifies its Engine.
    compiled_graph = getattr(session, "_graph", None)
    if compiled_graph is None:
        return None
    return _STATES.get(compiled_graph)


async def explain(
    session_or_engine: Session | Engine, output_type: type, *params: object
) -> ExplainReport:
    """Run a request and explain each persisted node's cache hit or miss.

    Args:
        session_or_engine: an open `Session` (nodes it already computed are not visited
            again), or an `Engine` (a new session is opened for the request).
        output_type, params: the request, as for `Session.get`.

    Returns:
        An `ExplainReport`: one `NodeExplanation` per persisted node visited, in start order;
        `render()` gives the text the CLI prints.

    Raises:
        Whatever the request raises (a failing rule, `NoSuchQueryError`...).

    Example::

        report = await explain(engine, Thumbnails, Batch(paths=("a.jpg",)))
        print(report.render())
    """
    if isinstance(session_or_engine, Session):
        return await _explain_in(session_or_engine, output_type, params)
    async with session_or_engine.session() as session:
        return await _explain_in(session, output_type, params)


async def _explain_in(
    session: Session, output_type: type, params: tuple[object, ...]
) -> ExplainReport:
    if session in _RECORDERS:
        raise RuntimeError("explain is already running in this session; run one at a time.")
    recorder = _Recorder(_state_of(session))
    _RECORDERS[session] = recorder
    unsubscribe = session.subscribe(recorder.on_workunit)
    args = ", ".join(_short_repr(p, 80) for p in params)
    request = f"{getattr(output_type, '__qualname__', output_type)} from ({args})"
    try:
        await session.get(output_type, *params)
    except Exception as exc:
        # What was explained before the failure still helps: attach it to the error.
        partial = ExplainReport(request, tuple(recorder.nodes[k] for k in sorted(recorder.nodes)))
        exc.add_note(f"Before the request failed, {partial.render()}")
        raise
    finally:
        unsubscribe()
        del _RECORDERS[session]
    return ExplainReport(request, tuple(recorder.nodes[k] for k in sorted(recorder.nodes)))
