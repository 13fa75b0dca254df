"""Code fingerprints: what counts (code, values read, helpers, closures) and what does not."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rulework.engine.codehash import (
    BODY,
    CodeHasher,
    UncacheableCodeError,
    code_fingerprint,
)


class Modules:
    """Write modules into a temporary directory on sys.path and (re)import them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loaded: list[str] = []
        self._clock = 1_000_000_000

    def write(self, name: str, source: str) -> Path:
        path = self.root / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        # A distinct mtime for every version, so no stale bytecode or source cache is used.
        self._clock += 10
        os.utime(path, (self._clock, self._clock))
        return path

    def load(self, name: str, source: str | None = None) -> types.ModuleType:
        if source is not None:
            self.write(name, source)
        sys.modules.pop(name, None)
        importlib.invalidate_caches()
        self.loaded.append(name)
        return importlib.import_module(name)


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Modules]:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    found = Modules(tmp_path)
    yield found
    for name in found.loaded:
        sys.modules.pop(name, None)


def fp(func: Callable[..., object]) -> str:
    return code_fingerprint(func)


BASE = """
    import json
    LIMIT = 10
    UNRELATED = 1

    def helper(x):
        return x + LIMIT

    def compute(x):
        return helper(x) * 2
"""


def test_comments_docstrings_and_formatting_do_not_count(modules: Modules) -> None:
    before = fp(modules.load("ch_fmt", BASE).compute)
    after = fp(
        modules.load(
            "ch_fmt",
            '''
            """Module docstring."""
            import json
            LIMIT = 10
            UNRELATED = 1


            def helper(x):
                """Adds the limit."""
                # a comment
                return (x +
                        LIMIT)  # trailing


            def compute(  x  ):
                """Doubles."""

                return helper(x)*2
            ''',
        ).compute
    )
    assert before == after


@pytest.mark.parametrize(
    ("edit", "changes"),
    [
        (lambda s: s.replace("* 2", "* 3"), True),  # the function's own body
        (lambda s: s.replace("x + LIMIT", "x - LIMIT"), True),  # a helper's body
        (lambda s: s.replace("LIMIT = 10", "LIMIT = 11"), True),  # a constant a helper reads
        (lambda s: s.replace("UNRELATED = 1", "UNRELATED = 2"), False),  # nobody reads it
        (lambda s: s + "\ndef other():\n    return 1\n", False),  # an unrelated function
    ],
)
def test_what_changes_the_fingerprint(
    modules: Modules, edit: Callable[[str], str], changes: bool
) -> None:
    source = textwrap.dedent(BASE)
    before = fp(modules.load("ch_edit", source).compute)
    after = fp(modules.load("ch_edit", edit(source)).compute)
    assert (before != after) is changes


def test_parts_name_what_was_read(modules: Modules) -> None:
    module = modules.load("ch_parts", BASE)
    parts = CodeHasher().function(module.compute).parts
    assert set(parts) == {BODY, "helper"}
    helper_parts = CodeHasher().function(module.helper).parts
    assert set(helper_parts) == {BODY, "LIMIT"}


def test_mutually_recursive_helpers_are_fully_covered(modules: Modules) -> None:
    source = textwrap.dedent(
        """
        def even(n):
            return n == 0 or odd(n - 1)

        def odd(n):
            return n != 0 and even(n - 1)

        def uses_odd(n):
            return odd(n)

        def uses_even(n):
            return even(n)
        """
    )
    module = modules.load("ch_cycle", source)
    hasher = CodeHasher()
    # Computing one entry point first must not leave a partial digest memoized for the other.
    first = (hasher.function(module.uses_even).digest, hasher.function(module.uses_odd).digest)
    edited = modules.load("ch_cycle", source.replace("n == 0 or", "n <= 0 or"))
    hasher = CodeHasher()
    second = (hasher.function(edited.uses_even).digest, hasher.function(edited.uses_odd).digest)
    # `uses_odd` reaches `even` only through the cycle: it must still see the change.
    assert first[0] != second[0]
    assert first[1] != second[1]


def test_closure_variables_count_like_globals() -> None:
    def make(factor: int) -> Callable[[int], int]:
        def scaled(x: int) -> int:
            return x * factor

        return scaled

    assert fp(make(2)) == fp(make(2))
    assert fp(make(2)) != fp(make(3))


def test_attribute_reads_through_user_modules(modules: Modules) -> None:
    helpers = "def norm(x):\n    return x.strip()\n"
    modules.load("ch_helpers", helpers)
    user = """
        import ch_helpers
        def clean(x):
            return ch_helpers.norm(x)
        """
    before = fp(modules.load("ch_user", user).clean)
    modules.load("ch_helpers", helpers.replace("strip()", "lower()"))
    after = fp(modules.load("ch_user", user).clean)
    assert before != after


def test_imports_inside_the_function_are_followed(modules: Modules) -> None:
    helpers = "SEP = ','\n"
    modules.load("ch_lazy", helpers)
    user = """
        def join(items):
            from ch_lazy import SEP
            return SEP.join(items)
        """
    before = fp(modules.load("ch_lazy_user", user).join)
    modules.load("ch_lazy", "SEP = ';'\n")
    assert fp(modules.load("ch_lazy_user", user).join) != before


def test_classes_count_by_fields_methods_and_enum_values(modules: Modules) -> None:
    source = textwrap.dedent(
        """
        import enum
        from dataclasses import dataclass

        class Mode(enum.Enum):
            FAST = 1
            SLOW = 2

        @dataclass(frozen=True)
        class Point:
            x: int
            y: int = 0

            def norm(self):
                return abs(self.x) + abs(self.y)

        def use(p):
            return Point(p, 1).norm(), Mode.FAST
        """
    )
    base = fp(modules.load("ch_cls", source).use)
    for edit in (
        lambda s: s.replace("abs(self.x) + abs(self.y)", "abs(self.x)"),  # a method
        lambda s: s.replace("y: int = 0", "y: float = 0"),  # a field's type
        lambda s: s.replace("y: int = 0", "y: int = 5"),  # a field's default
        lambda s: s.replace("FAST = 1", "FAST = 3"),  # an enum value
    ):
        assert fp(modules.load("ch_cls", edit(source)).use) != base
    assert fp(modules.load("ch_cls", source).use) == base


def test_dispatch_tables_of_functions_are_fingerprinted_item_by_item(modules: Modules) -> None:
    source = textwrap.dedent(
        """
        def a(x):
            return x + 1

        def b(x):
            return x + 2

        HANDLERS = {"a": a, "b": b}

        def dispatch(name, x):
            return HANDLERS[name](x)
        """
    )
    before = fp(modules.load("ch_table", source).dispatch)
    after = fp(modules.load("ch_table", source.replace("x + 2", "x + 20")).dispatch)
    assert before != after


def test_unfingerprintable_values_are_reported_never_skipped(modules: Modules) -> None:
    module = modules.load(
        "ch_lock",
        """
        import threading
        LOCK = threading.Lock()

        def guarded(x):
            with LOCK:
                return x

        def caller(x):
            return guarded(x)
        """,
    )
    with pytest.raises(UncacheableCodeError) as info:
        fp(module.caller)
    message = str(info.value)
    assert "`LOCK`" in message
    assert "ch_lock.guarded" in message
    assert "lock" in info.value.reason
    assert "unstructure hook" in message  # says how to fix it


def test_loggers_library_functions_and_builtins_are_identified_by_name(modules: Modules) -> None:
    module = modules.load(
        "ch_lib",
        """
        import json
        import logging
        from os.path import join
        from functools import lru_cache

        log = logging.getLogger("ch_lib")

        @lru_cache
        def cached(x):
            return x * 2

        def work(x):
            log.info("working")
            return json.dumps([join("a", x), len(x), cached(3)])
        """,
    )
    parts = CodeHasher().function(module.work).parts
    assert {"json", "log", "join", "len", "cached"} <= set(parts)
    assert fp(module.work) == fp(module.work)


def test_lambdas_and_functions_without_source_use_their_code_object() -> None:
    namespace: dict[str, object] = {"LIMIT": 1}
    exec("f = lambda x: x + LIMIT\ng = lambda x: x - LIMIT", namespace)
    f, g = namespace["f"], namespace["g"]
    assert callable(f) and callable(g)
    before = fp(f)
    assert before != fp(g)
    namespace["LIMIT"] = 2
    assert fp(f) != before


def test_a_file_edited_after_import_is_not_trusted(modules: Modules) -> None:
    module = modules.load("ch_stale", BASE)
    # Edit the file without re-importing: the code that runs is still the old one, so its
    # fingerprint must not be taken from the new source (that would file the old code's
    # results under the new code's key).
    modules.write("ch_stale", textwrap.dedent(BASE).replace("* 2", "* 5"))
    stale = fp(module.compute)
    fresh = fp(modules.load("ch_stale").compute)
    assert stale != fresh


def test_fingerprints_are_the_same_in_another_process(modules: Modules) -> None:
    source = (
        textwrap.dedent(BASE)
        + "\nKEYS = frozenset({'a', 'b', 'c'})\n\ndef with_set(x):\n    return x in KEYS\n"
    )
    modules.write("ch_proc", source)
    module = modules.load("ch_proc")
    here = fp(module.with_set)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import ch_proc; "
        "from rulework.engine.codehash import code_fingerprint; "
        "print(code_fingerprint(ch_proc.with_set))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script, str(modules.root)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert out.stdout.strip() == here


def test_user_modules_named_like_standard_ones_are_read(
    modules: Modules, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `tabnanny` is a standard-library name; a user's module of that name is still user code.
    monkeypatch.delitem(sys.modules, "tabnanny", raising=False)  # restored afterwards
    user = "import tabnanny\ndef check(x):\n    return tabnanny.verdict(x)\n"
    modules.load("tabnanny", "def verdict(x):\n    return x > 1\n")
    before = fp(modules.load("ch_shadow", user).check)
    modules.load("tabnanny", "def verdict(x):\n    return x > 2\n")
    after = fp(modules.load("ch_shadow", user).check)
    assert before != after
