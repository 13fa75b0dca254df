"""Code fingerprints: what a rule's code *is*, for the cache keys of persisted rule results.

`CodeHasher().function(func)` returns a `CodeFingerprint`: a BLAKE3 digest of

- the function's normalized AST: what `ast.dump(tree, include_attributes=False)` shows (no
  line/column positions), docstrings stripped (of the function and of everything nested in
  it) and the function's own decorators left out (`@rule(version=...)` is keyed separately).
  Comments and formatting are not in the AST, so they do not count either. The source is
  trusted only if it compiles to the code object that is loaded (the file may have been
  edited since the import; keying the old code by the new source would file the old code's
  results under the new code's key). A function whose source cannot be found or does not
  match, or a lambda, is fingerprinted by its code object instead (bytecode, constants and
  names; line numbers excluded): as complete, only not stable across cosmetic edits.
- its default argument values;
- the current value of every name the code reads that is not local: module globals and
  builtins it loads (found in the bytecode, nested functions and comprehensions included),
  closure cells (free variables count like globals), names it imports inside its body, and
  attribute chains through user modules (`helpers.scale(...)` counts `helpers.scale`).

How a value read by the code is fingerprinted:

- user functions (defined outside the standard library and installed distributions): their
  own code fingerprint, recursively, with cycle protection (mutually recursive helpers);
- user classes: qualified name, bases, dataclass/attrs fields (name, type, default), enum
  members, and the class-body attributes and methods (generated dataclass methods excluded);
- modules: their name (attribute reads through user modules are resolved, see above);
- functions, classes and modules from the standard library, from rulework itself or from an
  installed distribution: their qualified name plus the Python, rulework or distribution
  version (their code is not read);
- bound methods, `functools.partial`, `staticmethod`/`classmethod`/`property`, wrappers with
  `__wrapped__` (e.g. `functools.lru_cache`): what they wrap; loggers: their name; typing
  constructs: their repr;
- tuples, lists, sets, dicts: their items; anything else: `fingerprint(value)` (so
  registering an unstructure hook on `rulework.engine.fingerprint.converter` makes a type
  fingerprintable); an instance of a user class also counts its class (methods, enum values).
- A user module is told from a library one by where its file lives (site-packages and the
  standard library's directory are libraries), not by its name: a user's `code.py` counts.

A value that none of these covers raises `UncacheableCodeError` naming it and the function that
reads it: the caller makes the rule uncacheable, it never computes a weaker fingerprint.

Known blind spots (documented for users): code reached only dynamically (`getattr(module,
name)`, methods of objects whose class the code never names), and mutable state changed
*while* a session runs (the fingerprint is computed once per Engine).

Example:
    hasher = CodeHasher()
    print(hasher.function(my_rule_function).digest)
"""

from __future__ import annotations
import __future__

import ast
import builtins
import contextlib
import dataclasses
import dis
import enum
import functools
import importlib
import importlib.metadata
import importlib.util
import linecache
import logging
import os
import site
import sys
import sysconfig
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import attrs
import blake3

from .errors import RuleworkError
from .fingerprint import FingerprintError, fingerprint

__all__ = [
    "BODY",
    "CODE_SCHEMA",
    "CodeFingerprint",
    "CodeHasher",
    "UncacheableCodeError",
    "code_fingerprint",
    "hash_parts",
    "rulework_version",
]

#: Bumped whenever what a code fingerprint covers changes. Includes the Python minor version:
#: ASTs, bytecode and the standard library all change with it.
CODE_SCHEMA: Final = f"rulework.code.v1/py{sys.version_info[0]}.{sys.version_info[1]}"

_PYTHON: Final = f"python {sys.version_info[0]}.{sys.version_info[1]}"

#: The part name of a function's own AST (or code object) in `CodeFingerprint.parts`.
BODY: Final = "<body>"


class UncacheableCodeError(RuleworkError):
    """A value that a rule's code reads cannot be fingerprinted, so the rule cannot be cached.

    `subject` names the value (e.g. "`LOCK`, read by `pkg.helpers.scale`") and `reason` says
    why; `str(error)` also says what to do.
    """

    def __init__(self, subject: str, reason: str) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(
            f"{subject} cannot be fingerprinted: {reason}. Make it a value that can be (a str, "
            "int, tuple, frozenset, enum or frozen dataclass...), register an unstructure hook "
            "for its type on rulework.engine.fingerprint.converter, or pass it to the rule as a "
            "param instead of reading it from the module."
        )


@dataclass(frozen=True, slots=True)
class CodeFingerprint:
    """The fingerprint of one function's code.

    `parts` maps what went into `digest` to each part's own digest: `"<body>"` for the AST,
    and one entry per name the code reads (`"LIMIT"`, `"helpers.scale"`, `"<defaults>"`...),
    so that a change can be explained ("`LIMIT` changed").
    """

    digest: str
    parts: Mapping[str, str]


def code_fingerprint(func: Callable[..., Any]) -> str:
    """The code fingerprint of `func`, computed afresh (see the module docstring).

    Raises:
        UncacheableCodeError: a value the code reads cannot be fingerprinted.
    """
    return CodeHasher().function(func).digest


def hash_parts(*parts: str) -> str:
    """BLAKE3 of length-prefixed strings: no choice of parts can forge a separator."""
    hasher = blake3.blake3()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        hasher.update(len(data).to_bytes(8, "big"))
        hasher.update(data)
    return hasher.hexdigest()


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or "?"
    return f"{module}.{name}"


# ----------------------------------------------------------------------------------------------
# Which code is the user's: everything outside the standard library, rulework itself and
# installed distributions. Only user code is read; the rest is identified by name and version.


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            paths.add(os.path.realpath(path))
    with contextlib.suppress(AttributeError):  # old virtualenvs lack getsitepackages
        paths.update(os.path.realpath(p) for p in site.getsitepackages())
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user_site, str):
        paths.add(os.path.realpath(user_site))
    return tuple(sorted(p.rstrip(os.sep) + os.sep for p in paths))


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def rulework_version() -> str:
    """The installed rulework's version: what intrinsics and rulework's own code count as."""
    module = sys.modules.get("rulework")
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("rulework")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        return "unknown"


def _file_identity(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return "file " + blake3.blake3(file.read()).hexdigest()
    except OSError:
        return "file " + path


def _library_identity(module_name: str) -> str | None:
    """How library code is identified ("python 3.11", "cattrs 26.2.1"), or None for user code."""
    module = sys.modules.get(module_name)
    return _library_identity_of(module_name, id(module) if module is not None else None)


@functools.cache
def _library_identity_of(module_name: str, module_id: int | None) -> str | None:
    # Cached per module object (modules live until the process ends, or are kept in
    # sys.modules): where a loaded module comes from does not change.
    top = module_name.partition(".")[0]
    if top == "__main__":
        # A script is the user's code, whatever runs it (`python -m cProfile script.py` puts
        # another module under that name in sys.modules).
        return None
    if top == "rulework":
        return f"rulework {rulework_version()}"
    if top == "builtins":
        return _PYTHON
    # Decided by where the code lives, not by its name: a user's `code.py` or `test/` package
    # shadows the standard library's and must be read like any user code.
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        search = list(getattr(module, "__path__", None) or ())
        if module is None:
            try:
                spec = importlib.util.find_spec(module_name)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                return None
            file = spec.origin if spec.has_location else None
            search = list(spec.submodule_search_locations or ())
        if not isinstance(file, str):
            if not search:
                return _PYTHON  # a built-in or frozen module
            file = search[0]
    real = os.path.realpath(file)
    if not real.startswith(_library_dirs()):
        return None
    if (
        f"{os.sep}site-packages{os.sep}" not in real
        and f"{os.sep}dist-packages{os.sep}" not in real
    ):
        return _PYTHON
    for dist in sorted(_distributions().get(top, ())):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    # Installed, but no distribution claims it: identify it by its content.
    return _file_identity(real)


def _module_of(obj: Any) -> str:
    if isinstance(obj, types.FunctionType):
        name = obj.__globals__.get("__name__")
        if isinstance(name, str):
            return name
    name = getattr(obj, "__module__", None)
    return name if isinstance(name, str) else "?"


# ----------------------------------------------------------------------------------------------
# Sources


@dataclass(slots=True)
class _ParsedFile:
    """One source file, parsed once per CodeHasher."""

    tree: ast.Module
    functions: dict[tuple[int, str], ast.FunctionDef | ast.AsyncFunctionDef]
    imports: list[ast.stmt]
    flags: int
    # How many of its functions were checked against their code; past a few, the whole module
    # is compiled once (`compiled`, code objects by (qualname, first line)) instead of each.
    checks: int = 0
    compiled: dict[tuple[str, int], list[types.CodeType]] | None = None


# Past this many functions of one file, compiling the whole file once is cheaper than
# compiling each function alone (~100 us each, measured).
_WHOLE_FILE_AFTER = 4


def _code_objects(module_code: types.CodeType) -> dict[tuple[str, int], list[types.CodeType]]:
    found: dict[tuple[str, int], list[types.CodeType]] = {}
    stack = [module_code]
    while stack:
        current = stack.pop()
        for const in current.co_consts:
            if isinstance(const, types.CodeType):
                found.setdefault((const.co_qualname, const.co_firstlineno), []).append(const)
                stack.append(const)
    return found


def _index_functions(
    tree: ast.Module,
) -> dict[tuple[int, str], ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function definition of a module, nested ones included, by (first line, name).

    Functions are statements: only statement bodies are visited, which is much cheaper than
    `ast.walk` over every expression of a large module.
    """
    index: dict[tuple[int, str], ast.FunctionDef | ast.AsyncFunctionDef] = {}
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            # co_firstlineno is the first decorator's line; index the `def` line too.
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            index[(first, node.name)] = node
            index.setdefault((node.lineno, node.name), node)
        for field_name in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(node, field_name, None) or ():
                if isinstance(child, ast.stmt):
                    stack.append(child)
                else:  # except handlers and match cases hold statements in their body
                    stack.extend(getattr(child, "body", ()))
    return index


def _code_lines(code: types.CodeType) -> tuple[int, int] | None:
    lines = [line for _start, _end, line in code.co_lines() if line is not None]
    return (min(lines), max(lines)) if lines else None


_DOCSTRING_OWNERS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)
_CO_NESTED: Final = 0x10
_FUTURE_FLAGS: Final = (
    functools.reduce(
        lambda flags, name: flags | getattr(__future__, name).compiler_flag,
        __future__.all_feature_names,
        0,
    )
    & ~_CO_NESTED
)


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether two code objects do the same thing (positions and names of scopes aside)."""
    if (
        a.co_code != b.co_code
        or a.co_names != b.co_names
        or a.co_varnames != b.co_varnames
        or a.co_freevars != b.co_freevars
        or a.co_cellvars != b.co_cellvars
        or a.co_exceptiontable != b.co_exceptiontable
        or (a.co_flags | _CO_NESTED) != (b.co_flags | _CO_NESTED)
        or (a.co_argcount, a.co_posonlyargcount, a.co_kwonlyargcount)
        != (b.co_argcount, b.co_posonlyargcount, b.co_kwonlyargcount)
        or len(a.co_consts) != len(b.co_consts)
    ):
        return False
    for x, y in zip(a.co_consts, b.co_consts, strict=True):
        if isinstance(x, types.CodeType):
            if not isinstance(y, types.CodeType) or not _same_code(x, y):
                return False
        elif type(x) is not type(y) or not _same_const(x, y):
            return False
    return True


def _same_const(x: object, y: object) -> bool:
    try:
        return fingerprint(x) == fingerprint(y)
    except FingerprintError:
        return bool(x == y)


def _find_code(code: types.CodeType, name: str) -> types.CodeType | None:
    stack = [code]
    while stack:
        current = stack.pop()
        for const in current.co_consts:
            if isinstance(const, types.CodeType):
                if const.co_name == name:
                    return const
                stack.append(const)
    return None


def _module_imports(tree: ast.Module) -> list[ast.stmt]:
    """The module's import statements (outside functions and classes), `__future__` first.

    They matter to how a function compiles: since 3.11 `module.attr(...)` on an imported name
    compiles differently from a call on another global."""
    future: list[ast.stmt] = []
    others: list[ast.stmt] = []
    stack: list[ast.stmt] = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            future.append(node)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            others.append(node)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for field_name in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in reversed(getattr(node, field_name, None) or ()):
                    if isinstance(child, ast.stmt):
                        stack.append(child)
                    else:  # except handlers and match cases hold statements in their body
                        stack.extend(reversed(getattr(child, "body", ())))
    return future + others


_AstT = typing.TypeVar("_AstT", bound=ast.AST)


def _located(node: _AstT, where: ast.AST) -> _AstT:
    """A synthetic node placed at `where` (cheaper than `ast.fix_missing_locations` over the
    whole tree, which is what the compiler needs: every node located)."""
    return ast.copy_location(node, where)


def _no_arguments() -> ast.arguments:
    return ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[])


def _compiles_to(
    tree: ast.FunctionDef | ast.AsyncFunctionDef,
    code: types.CodeType,
    qualname: str,
    imports: list[ast.stmt],
) -> bool:
    """Whether `tree` compiles to `code`: the source we read is the source of the code that
    runs, not a later edit of the file. (Decorators are compiled in the enclosing scope, so
    they do not change the function's own code object; the tree is not modified.)

    The function is compiled where it was defined: after the module's imports, inside classes
    and functions named like the ones of its qualified name (free variables defined there).
    """
    node: ast.stmt = tree
    free = [name for name in code.co_freevars if name != "__class__"]
    enclosing = qualname.split(".")[:-1]
    assigned = False
    index = len(enclosing) - 1
    while index >= 0:
        part = enclosing[index]
        if part == "<locals>" and index >= 1:
            body: list[ast.stmt] = [node]
            if free and not assigned:
                targets: list[ast.expr] = [
                    _located(ast.Name(id=n, ctx=ast.Store()), tree) for n in free
                ]
                value = _located(ast.Constant(value=None), tree)
                body.insert(0, _located(ast.Assign(targets=targets, value=value), tree))
                assigned = True
            node = _located(
                ast.FunctionDef(
                    name=enclosing[index - 1], args=_no_arguments(), body=body, decorator_list=[]
                ),
                tree,
            )
            index -= 2
        else:
            node = _located(
                ast.ClassDef(name=part, bases=[], keywords=[], body=[node], decorator_list=[]),
                tree,
            )
            index -= 1
    if free and not assigned:
        return False
    module = ast.Module(body=[*imports, node], type_ignores=[])
    try:
        compiled = compile(
            module, code.co_filename, "exec", flags=code.co_flags & _FUTURE_FLAGS, dont_inherit=True
        )
    except (SyntaxError, ValueError, TypeError):
        return False
    found = _find_code(compiled, code.co_name)
    return found is not None and _same_code(found, code)


@dataclass(frozen=True, slots=True)
class _Summary:
    """What one traversal of a function's AST yields."""

    dump: str
    chains: frozenset[tuple[str, ...]]
    import_aliases: Mapping[str, str]


def _is_docstring(statement: ast.stmt) -> bool:
    return (
        isinstance(statement, ast.Expr)
        and isinstance(statement.value, ast.Constant)
        and isinstance(statement.value.value, str)
    )


def _summarize(root: ast.FunctionDef | ast.AsyncFunctionDef) -> _Summary:
    """The normalized dump of a function's AST, its attribute chains and local imports.

    The dump holds what `ast.dump(tree, include_attributes=False)` holds (node types, fields
    and values, no positions) for the tree without docstrings (of the function and of the
    functions and classes nested in it) and without the function's own decorators; it is
    produced directly, without copying the tree, in one pass that also collects the `a.b.c`
    chains read (rooted at a plain name) and the names bound by `import` statements.
    """
    out: list[str] = []
    chains: set[tuple[str, ...]] = set()
    aliases: dict[str, str] = {}
    inner_attributes: set[int] = set()
    append = out.append
    # An explicit stack instead of recursion: deep expressions must not hit the recursion limit.
    stack: list[Any] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):  # a closing token pushed before the children
            append(item)
            continue
        if isinstance(item, list):
            append("[")
            stack.append("]")
            stack.extend(reversed(item))
            continue
        if not isinstance(item, ast.AST):
            append(repr(item))
            append(",")
            continue
        node: ast.AST = item
        append(type(node).__name__)
        append("(")
        stack.append("),")
        if isinstance(node, ast.Attribute) and id(node) not in inner_attributes:
            parts = [node.attr]
            current = node.value
            while isinstance(current, ast.Attribute):
                inner_attributes.add(id(current))
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name):
                parts.append(current.id)
                chains.add(tuple(reversed(parts)))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.partition(".")[0]
                    aliases[top] = top
        fields: list[Any] = []
        for name in node._fields:
            value = getattr(node, name, None)
            if name == "decorator_list" and node is root:
                value = []
            elif (
                name == "body"
                and isinstance(node, _DOCSTRING_OWNERS)
                and value
                and _is_docstring(value[0])
            ):
                value = value[1:]
            fields.append(value)
        stack.extend(reversed(fields))
    return _Summary("".join(out), frozenset(chains), aliases)


# ----------------------------------------------------------------------------------------------
# Reading what code loads


@dataclass(frozen=True, slots=True)
class _Import:
    level: int
    name: str
    fromlist: tuple[str, ...] | None


_EXTENDED_ARG: Final = dis.opmap["EXTENDED_ARG"]
_LOAD_GLOBAL: Final = dis.opmap["LOAD_GLOBAL"]
_LOAD_NAME: Final = dis.opmap["LOAD_NAME"]
_LOAD_CONST: Final = dis.opmap["LOAD_CONST"]
_IMPORT_NAME: Final = dis.opmap["IMPORT_NAME"]
# How LOAD_GLOBAL's argument indexes co_names: shifted by one bit since 3.11.
_GLOBAL_SHIFT: Final = 1 if sys.version_info >= (3, 11) else 0
# Reading raw bytecode is ~10x faster than `dis.get_instructions`; only done for versions whose
# encoding is known here, `dis` otherwise.
_RAW_BYTECODE: Final = (3, 11) <= sys.version_info < (3, 14)


def _loaded_names(code: types.CodeType) -> tuple[set[str], list[_Import]]:
    """The global (and class-body) names loaded by `code` and the code nested in it, and the
    imports it executes (`import` statements inside functions)."""
    names: set[str] = set()
    imports: list[_Import] = []
    stack = [code]
    while stack:
        current = stack.pop()
        if _RAW_BYTECODE:
            _scan_raw(current, names, imports)
        else:
            _scan_dis(current, names, imports)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return names, imports


def _import(level: object, fromlist: object, name: str) -> _Import:
    return _Import(
        level if isinstance(level, int) else 0,
        name,
        tuple(str(n) for n in fromlist) if isinstance(fromlist, tuple) else None,
    )


def _scan_raw(code: types.CodeType, names: set[str], imports: list[_Import]) -> None:
    raw = code.co_code
    co_names = code.co_names
    consts = code.co_consts
    extended = 0
    # The arguments of the last two LOAD_CONSTs: an import is compiled as
    # LOAD_CONST level; LOAD_CONST fromlist; IMPORT_NAME name.
    previous: list[int] = [-1, -1]
    for offset in range(0, len(raw), 2):
        op = raw[offset]
        arg = raw[offset + 1] | extended
        if op == _EXTENDED_ARG:
            extended = arg << 8
            continue
        extended = 0
        if op == _LOAD_GLOBAL:
            names.add(co_names[arg >> _GLOBAL_SHIFT])
        elif op == _LOAD_NAME:
            names.add(co_names[arg])
        elif op == _LOAD_CONST:
            previous = [previous[1], arg]
            continue
        elif op == _IMPORT_NAME:
            level = consts[previous[0]] if previous[0] >= 0 else 0
            fromlist = consts[previous[1]] if previous[1] >= 0 else None
            imports.append(_import(level, fromlist, co_names[arg]))
        elif op == 0:  # CACHE entries (3.11+) sit between instructions
            continue
        previous = [-1, -1]


def _scan_dis(code: types.CodeType, names: set[str], imports: list[_Import]) -> None:
    instructions = list(dis.get_instructions(code))
    for index, ins in enumerate(instructions):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            names.add(str(ins.argval))
        elif ins.opname == "IMPORT_NAME" and index >= 2:
            level = instructions[index - 2].argval
            fromlist = instructions[index - 1].argval
            imports.append(_import(level, fromlist, str(ins.argval)))


# ----------------------------------------------------------------------------------------------
# Values that need special treatment

_UNDEFINED: Final = object()
_NO_LOW: Final = sys.maxsize

# Class attributes that are bookkeeping of Python, dataclasses, attrs, abc or typing, not code
# or data the user wrote (or that are covered by the fields).
_CLASS_BOOKKEEPING: Final = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__slots__",
        "__annotations__",
        "__dataclass_fields__",
        "__dataclass_params__",
        "__match_args__",
        "__attrs_attrs__",
        "__attrs_own_setattr__",
        "__attrs_props__",
        "__orig_bases__",
        "__parameters__",
        "__abstractmethods__",
        "_abc_impl",
        "__firstlineno__",
        "__static_attributes__",
        "__protocol_attrs__",
        "_is_protocol",
        "_is_runtime_protocol",
        "__non_callable_proto_members__",
        "__subclasshook__",
        "__init_subclass__",
    }
)


def _is_generated(func: types.FunctionType) -> bool:
    """Methods written by dataclasses/attrs (`__init__`, `__eq__`...): made by `exec` without a
    source file; what they do follows from the fields, which are fingerprinted."""
    filename = func.__code__.co_filename
    return filename.startswith("<") and not linecache.getlines(filename)


def _enum_internal(name: str) -> bool:
    return len(name) > 2 and name[0] == "_" and name[-1] == "_" and name[1] != "_"


# ----------------------------------------------------------------------------------------------
# The hasher


class CodeHasher:
    """Computes code fingerprints, memoized: make one per Engine (values are read once).

    Not thread-safe; cheap to create. See the module docstring for what is covered.
    """

    def __init__(self) -> None:
        # Invariant: `_memo` holds only digests that depend on nothing still being computed
        # (no back-reference into `_active` below their own depth); the object is kept so its
        # id stays unique.
        self._memo: dict[int, tuple[object, str]] = {}
        self._failures: dict[int, tuple[object, UncacheableCodeError]] = {}
        self._parts: dict[int, tuple[object, dict[str, str]]] = {}
        # Functions and classes being fingerprinted, with their depth (cycle protection).
        self._active: dict[int, int] = {}
        self._low = _NO_LOW
        self._files: dict[str, _ParsedFile | None] = {}

    # -- public ------------------------------------------------------------------------------

    def function(self, func: Callable[..., Any]) -> CodeFingerprint:
        """The fingerprint of `func`'s code and of everything it reads (see module docstring).

        Raises:
            UncacheableCodeError: a value the code reads cannot be fingerprinted.
        """
        if not isinstance(func, types.FunctionType):
            return CodeFingerprint(self.value(func, _qualname(func)), {})
        digest = self._entity(func, self._function_digest)
        found = self._parts.get(id(func))
        parts = dict(found[1]) if found is not None else {}
        return CodeFingerprint(digest, parts)

    def value(self, value: object, where: str) -> str:
        """The digest of a value read by code (`where` names it in errors).

        Raises:
            UncacheableCodeError: the value (or a part of it) cannot be fingerprinted.
        """
        try:
            return self._value(value, where)
        except RecursionError:
            raise UncacheableCodeError(
                where, "it is nested too deeply or contains itself"
            ) from None

    # -- cycle-safe memoization ----------------------------------------------------------------

    def _entity(self, obj: Any, compute: Callable[[Any], str]) -> str:
        key = id(obj)
        found = self._memo.get(key)
        if found is not None:
            return found[1]
        failed = self._failures.get(key)
        if failed is not None:
            raise failed[1]
        depth = self._active.get(key)
        if depth is not None:
            # A cycle (mutually recursive helpers, a method naming its own class): refer to
            # the object by name; its content is already being covered further up.
            self._low = min(self._low, depth)
            return hash_parts("cycle", _qualname(obj))
        depth = len(self._active)
        self._active[key] = depth
        outer_low = self._low
        self._low = _NO_LOW
        try:
            digest = compute(obj)
        except UncacheableCodeError as exc:
            # Whatever reaches this object reaches the unfingerprintable value too.
            self._failures[key] = (obj, exc)
            raise
        finally:
            del self._active[key]
            inner_low = self._low
            self._low = min(outer_low, inner_low if inner_low < depth else _NO_LOW)
        if inner_low >= depth:
            self._memo[key] = (obj, digest)
        else:
            # Part of a cycle entered further up: this digest names that entry point instead
            # of covering its code, so it is only valid inside the current computation.
            self._parts.pop(key, None)
        return digest

    # -- values --------------------------------------------------------------------------------

    def _value(self, value: Any, where: str) -> str:
        cls = type(value)
        if value is None or cls in (bool, int, float, str, bytes):
            return fingerprint(value)
        if isinstance(value, types.ModuleType):
            return self._module(value)
        if isinstance(value, types.FunctionType):
            return self._entity(value, self._function_digest)
        if isinstance(value, type):
            return self._entity(value, self._class_digest)
        if isinstance(value, types.MethodType):
            return hash_parts(
                "method",
                self._value(value.__func__, where),
                self._value(value.__self__, f"{where} (bound to)"),
            )
        if isinstance(value, staticmethod | classmethod):
            return hash_parts(cls.__name__, self._value(value.__func__, where))
        if isinstance(value, property):
            return hash_parts(
                "property",
                *(self._value(f, where) for f in (value.fget, value.fset, value.fdel)),
            )
        if isinstance(value, functools.partial):
            return hash_parts(
                "partial",
                self._value(value.func, where),
                self._value(value.args, where),
                self._value(dict(value.keywords), where),
            )
        if isinstance(
            value,
            types.BuiltinFunctionType
            | types.WrapperDescriptorType
            | types.MethodDescriptorType
            | types.ClassMethodDescriptorType
            | types.MethodWrapperType,
        ):
            owner = getattr(value, "__self__", None)
            bound = (
                self._value(owner, f"{where} (bound to)")
                if owner is not None and not isinstance(owner, types.ModuleType | type)
                else ""
            )
            module = str(
                getattr(value, "__module__", None)
                or getattr(getattr(value, "__objclass__", None), "__module__", "builtins")
            )
            return hash_parts(
                "builtin", _qualname(value), _library_identity(module) or module, bound
            )
        if isinstance(value, logging.Logger):
            return hash_parts("logger", value.name)
        if cls in (tuple, list, set, frozenset, dict):
            # Plain data is fingerprinted in one go; containers of functions, classes... item by
            # item (dispatch tables are common).
            try:
                return fingerprint(value)
            except FingerprintError:
                return self._container(value, where)
        if value is Ellipsis or value is NotImplemented:
            return hash_parts("singleton", repr(value))
        if _is_typing_construct(value):
            return hash_parts("typing", repr(value))
        wrapped = getattr(value, "__wrapped__", None) if not isinstance(value, type) else None
        if wrapped is not None and callable(value):
            return hash_parts("wrapped", _qualname(cls), self._value(wrapped, where))
        try:
            fp = fingerprint(value)
        except FingerprintError as exc:
            named = self._named_library_object(value)
            if named is not None:
                return named
            raise UncacheableCodeError(where, f"it is a {_qualname(cls)} ({exc.reason})") from None
        if isinstance(value, enum.Enum) or _library_identity(cls.__module__) is None:
            # A user class's code (methods, enum values) shapes what its instances do.
            return hash_parts("instance", fp, self._entity(cls, self._class_digest))
        return fp

    def _container(self, value: Any, where: str) -> str:
        cls = type(value)
        if cls is dict:
            pairs = sorted(
                (self._value(k, f"{where} (a key)"), self._value(v, f"{where}[{k!r}]"))
                for k, v in value.items()
            )
            return hash_parts("dict", *(p for pair in pairs for p in pair))
        if cls in (set, frozenset):
            return hash_parts(
                cls.__name__, *sorted(self._value(v, f"{where} (a member)") for v in value)
            )
        return hash_parts(
            cls.__name__, *(self._value(v, f"{where}[{i}]") for i, v in enumerate(value))
        )

    def _named_library_object(self, value: Any) -> str | None:
        """Objects of libraries that are importable by name (numpy ufuncs...)."""
        module_name = getattr(value, "__module__", None)
        qualname = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
        if not isinstance(module_name, str) or not isinstance(qualname, str):
            return None
        identity = _library_identity(module_name)
        if identity is None:
            return None
        found: Any = sys.modules.get(module_name)
        for part in qualname.split("."):
            found = getattr(found, part, None)
        if found is not value:
            return None
        return hash_parts("named", module_name, qualname, identity)

    def _module(self, module: types.ModuleType) -> str:
        identity = _library_identity(module.__name__)
        return hash_parts("module", module.__name__, identity or "")

    # -- functions -----------------------------------------------------------------------------

    def _function_digest(self, func: types.FunctionType) -> str:
        module = _module_of(func)
        identity = _library_identity(module)
        if identity is not None:
            return hash_parts("library function", module, func.__qualname__, identity)
        parts = self._function_parts(func)
        self._parts[id(func)] = (func, parts)
        flat = [p for item in sorted(parts.items()) for p in item]
        return hash_parts("function", CODE_SCHEMA, module, func.__qualname__, *flat)

    def _function_parts(self, func: types.FunctionType) -> dict[str, str]:
        qualname = f"{_module_of(func)}.{func.__qualname__}"
        code = func.__code__
        node = self._function_node(func)
        summary = _summarize(node) if node is not None else None
        parts: dict[str, str] = {}
        if summary is not None:
            parts[BODY] = hash_parts("ast", summary.dump)
        else:
            parts[BODY] = self._code_digest(code, func.__doc__)
        if func.__defaults__:
            parts["<defaults>"] = self.value(func.__defaults__, f"the defaults of `{qualname}`")
        if func.__kwdefaults__:
            parts["<kwdefaults>"] = self.value(
                dict(func.__kwdefaults__), f"the defaults of `{qualname}`"
            )
        names, imports = _loaded_names(code)
        func_globals = func.__globals__
        for name in sorted(names):
            parts[name] = self._global(func_globals, name, qualname)
        for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=True):
            try:
                contents = cell.cell_contents
            except ValueError:  # not assigned yet by the enclosing function
                parts[name] = hash_parts("unassigned")
                continue
            parts[name] = self.value(contents, f"`{name}` (a closure variable of `{qualname}`)")
        package = func_globals.get("__package__")
        local_modules: dict[str, types.ModuleType] = {}
        for spec in imports:
            self._import(spec, package, qualname, parts, local_modules, summary is None)
        if summary is not None:
            aliases = summary.import_aliases
            for chain in sorted(summary.chains):
                root = chain[0]
                if root in names and root in func_globals:
                    start = func_globals[root]
                elif root in aliases:
                    start = sys.modules.get(aliases[root])
                else:
                    continue
                self._chain(start, chain, qualname, parts)
        return parts

    def _global(self, func_globals: Mapping[str, Any], name: str, qualname: str) -> str:
        if name in func_globals:
            return self.value(func_globals[name], f"`{name}` (read by `{qualname}`)")
        found: Any = _UNDEFINED
        builtins_ns = func_globals.get("__builtins__", builtins)
        if isinstance(builtins_ns, types.ModuleType):
            found = getattr(builtins_ns, name, _UNDEFINED)
        elif isinstance(builtins_ns, Mapping):
            found = builtins_ns.get(name, _UNDEFINED)
        if found is _UNDEFINED:
            # Not defined (yet): a NameError at run time, or defined later. Either way the
            # fingerprint changes once it is.
            return hash_parts("undefined", name)
        return hash_parts("builtin", name, _PYTHON)

    def _chain(
        self, start: Any, chain: tuple[str, ...], qualname: str, parts: dict[str, str]
    ) -> None:
        """Resolve `a.b.c` through user modules; the first non-module value is fingerprinted."""
        value = start
        for index in range(1, len(chain)):
            if not isinstance(value, types.ModuleType) or _library_identity(value.__name__):
                return
            attr = chain[index]
            label = ".".join(chain[: index + 1])
            if label in parts:
                return
            value = getattr(value, attr, _UNDEFINED)
            if value is _UNDEFINED:
                parts[label] = hash_parts("missing attribute")
                return
            if not isinstance(value, types.ModuleType):
                parts[label] = self.value(value, f"`{label}` (read by `{qualname}`)")
                return

    def _import(
        self,
        spec: _Import,
        package: object,
        qualname: str,
        parts: dict[str, str],
        local_modules: dict[str, types.ModuleType],
        whole_modules: bool,
    ) -> None:
        """A module imported inside the function body, and the names taken from it."""
        try:
            name = (
                importlib.util.resolve_name("." * spec.level + spec.name, str(package or ""))
                if spec.level
                else spec.name
            )
        except (ImportError, ValueError):
            parts[f"import {spec.name}"] = hash_parts("unresolvable import", spec.name)
            return
        module = sys.modules.get(name)
        if module is None and _library_identity(name) is None:
            # User code the function would import when it runs: import it now to read it.
            try:
                module = importlib.import_module(name)
            except Exception as exc:
                raise UncacheableCodeError(
                    f"the module `{name}` (imported by `{qualname}`)", f"importing it failed: {exc}"
                ) from None
        if module is None:
            parts[f"import {name}"] = hash_parts(
                "library module", name, _library_identity(name) or ""
            )
            return
        local_modules[name] = module
        if not spec.fromlist:
            parts[f"import {name}"] = self._module(module)
            if whole_modules and _library_identity(name) is None:
                # Without the AST, attribute reads through it cannot be followed: count the
                # whole source file instead.
                file = getattr(module, "__file__", None)
                if isinstance(file, str):
                    parts[f"import {name}"] = _file_identity(file)
            return
        for attr in spec.fromlist:
            if attr == "*":
                parts[f"from {name} import *"] = self._module(module)
                continue
            value = getattr(module, attr, _UNDEFINED)
            if value is _UNDEFINED:
                value = sys.modules.get(f"{name}.{attr}", _UNDEFINED)
            label = f"from {name} import {attr}"
            if value is _UNDEFINED:
                parts[label] = hash_parts("missing attribute")
            else:
                parts[label] = self.value(
                    value, f"`{attr}` (imported from `{name}` by `{qualname}`)"
                )

    def _function_node(
        self, func: types.FunctionType
    ) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        """The function's AST node, if its source is available and compiles to its code."""
        code = func.__code__
        if code.co_name == "<lambda>":
            return None
        filename = code.co_filename
        if filename not in self._files:
            # Once per file and Engine: pick up edits made since the module was last read.
            linecache.checkcache(filename)
            lines = linecache.getlines(filename, func.__globals__)
            parsed: _ParsedFile | None = None
            if lines:
                try:
                    tree = ast.parse("".join(lines), filename)
                except (SyntaxError, ValueError):
                    parsed = None
                else:
                    parsed = _ParsedFile(
                        tree,
                        _index_functions(tree),
                        _module_imports(tree),
                        code.co_flags & _FUTURE_FLAGS,
                    )
            self._files[filename] = parsed
        parsed = self._files[filename]
        if parsed is None:
            return None
        node = parsed.functions.get((code.co_firstlineno, code.co_name))
        if node is None:
            return None
        # The file may have been edited since the module was imported: use its source only if
        # it still covers the lines the loaded code came from.
        span = _code_lines(code)
        end = node.end_lineno or node.lineno
        if span is None or span[0] < code.co_firstlineno or span[1] > end:
            return None
        parsed.checks += 1
        if parsed.compiled is None and parsed.checks > _WHOLE_FILE_AFTER:
            try:
                module_code = compile(
                    parsed.tree, filename, "exec", flags=parsed.flags, dont_inherit=True
                )
            except (SyntaxError, ValueError, TypeError):
                parsed.compiled = {}
            else:
                parsed.compiled = _code_objects(module_code)
        if parsed.compiled is not None:
            candidates = parsed.compiled.get((code.co_qualname, code.co_firstlineno), ())
            matches = any(_same_code(candidate, code) for candidate in candidates)
        else:
            matches = _compiles_to(node, code, func.__qualname__, parsed.imports)
        return node if matches else None

    def _code_digest(self, code: types.CodeType, docstring: str | None) -> str:
        """A code object without positions (for functions whose source is not available)."""
        consts: list[str] = []
        for index, const in enumerate(code.co_consts):
            if isinstance(const, types.CodeType):
                consts.append(self._code_digest(const, None))
            elif index == 0 and docstring is not None and const == docstring:
                consts.append("<docstring>")
            else:
                try:
                    consts.append(fingerprint(const))
                except FingerprintError:
                    consts.append(hash_parts("const", type(const).__name__, repr(const)))
        return hash_parts(
            "code",
            code.co_name,
            code.co_code.hex(),
            code.co_exceptiontable.hex(),
            repr(code.co_names),
            repr(code.co_varnames),
            repr(code.co_freevars),
            repr(code.co_cellvars),
            repr(
                (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)
            ),
            *consts,
        )

    # -- classes -------------------------------------------------------------------------------

    def _class_digest(self, cls: type) -> str:
        module = getattr(cls, "__module__", "?") or "?"
        identity = _library_identity(module)
        name = _qualname(cls)
        if identity is not None:
            return hash_parts("library class", name, identity)
        parts: list[str] = ["class", CODE_SCHEMA, name]
        parts.extend(self._value(base, f"a base class of `{name}`") for base in cls.__bases__)
        for field_name, field_digest in self._fields(cls, name):
            parts.extend(("field", field_name, field_digest))
        is_enum = isinstance(cls, enum.EnumMeta)
        if is_enum:
            for member in typing.cast("type[enum.Enum]", cls):
                parts.extend(
                    ("member", member.name, self._value(member.value, f"`{name}.{member.name}`"))
                )
        for attr, member in sorted(vars(cls).items()):
            if attr in _CLASS_BOOKKEEPING:
                continue
            if is_enum and (_enum_internal(attr) or isinstance(member, cls)):
                continue
            if attr == "__hash__" and member is None:
                parts.extend(("attr", attr, "None"))
                continue
            if isinstance(member, types.MemberDescriptorType | types.GetSetDescriptorType):
                continue  # slots: the fields say what they hold
            if isinstance(member, types.FunctionType) and _is_generated(member):
                continue
            parts.extend(("attr", attr, self._value(member, f"`{name}.{attr}`")))
        return hash_parts(*parts)

    def _fields(self, cls: type, name: str) -> Iterator[tuple[str, str]]:
        """Dataclass / attrs fields: name, declared type, default (and the classes named)."""
        if dataclasses.is_dataclass(cls):
            hints = _type_hints(cls)
            for f in dataclasses.fields(cls):
                tp = hints.get(f.name, f.type)
                pieces = [repr(tp), *self._types_in(tp, name)]
                if f.default is not dataclasses.MISSING:
                    pieces.append(self._value(f.default, f"the default of `{name}.{f.name}`"))
                if f.default_factory is not dataclasses.MISSING:
                    pieces.append(
                        self._value(f.default_factory, f"the default factory of `{name}.{f.name}`")
                    )
                yield f.name, hash_parts(*pieces)
        elif attrs.has(cls):
            hints = _type_hints(cls)
            for a in attrs.fields(cls):
                tp = hints.get(a.name, a.type)
                pieces = [repr(tp), *self._types_in(tp, name)]
                default = a.default
                if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                    pieces.append(self._value(default.factory, f"the default of `{name}.{a.name}`"))
                elif default is not attrs.NOTHING:
                    pieces.append(self._value(default, f"the default of `{name}.{a.name}`"))
                yield a.name, hash_parts(*pieces)

    def _types_in(self, tp: Any, owner: str) -> Iterator[str]:
        """Digests of the user classes a field type names (`tuple[Part, ...]` names Part)."""
        stack = [tp]
        seen: set[int] = set()
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            if isinstance(current, type):
                if _library_identity(getattr(current, "__module__", "") or "") is None:
                    yield self._entity(current, self._class_digest)
                continue
            stack.extend(typing.get_args(current))


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolvable forward references: the annotation text still counts
        return {}


def _is_typing_construct(value: object) -> bool:
    if isinstance(value, typing.TypeVar | types.GenericAlias | types.UnionType):
        return True
    module = getattr(type(value), "__module__", None)
    return module == "typing" and not isinstance(value, type)
