"""Tests for `rulework.engine.fingerprint`: stable, type-tagged, injective fingerprints."""

from __future__ import annotations

import enum
import math
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rulework.engine.errors import RuleworkError
from rulework.engine.fingerprint import (
    FingerprintError,
    converter,
    fingerprint,
    fingerprint_bytes,
)
from rulework.engine.fs import EMPTY_DIGEST, Digest, DigestContents, FileContent
from rulework.engine.process import FrozenDict

# --- value types used by the tests (module level, so a subprocess can unpickle them) -----------


@dataclass(frozen=True)
class Point:
    x: Any
    y: Any


@dataclass(frozen=True)
class OtherPoint:
    x: Any
    y: Any


@attrs.frozen
class AttrsPoint:
    x: Any
    y: Any


@dataclass(frozen=True)
class WithCache:
    value: int
    cache: Any = field(default=None, compare=False)


class Color(enum.Enum):
    red = 1
    green = 2


class Shade(enum.Enum):
    red = 1


class Tag(str):
    __slots__ = ()


@dataclass(frozen=True)
class Image:
    path: str
    meta: Any = None


@dataclass(frozen=True)
class Batch:
    images: tuple[Image, ...]


class Opaque:
    """A class with no canonical encoding."""

    def __repr__(self) -> str:
        return "Opaque()"


def fp(value: object) -> str:
    return fingerprint(value)


# --- the basics ---------------------------------------------------------------------------------


def test_fingerprint_is_hex_blake3_of_the_canonical_encoding() -> None:
    import blake3

    value = Point(1, ("a", b"b"))
    assert fingerprint(value) == blake3.blake3(fingerprint_bytes(value)).hexdigest()
    assert len(fingerprint(value)) == 64


def test_primitives_with_equal_python_values_differ_by_type() -> None:
    values = [1, "1", b"1", True, 1.0, Tag("1"), Color.red, (1,), [1], frozenset({1}), None]
    prints = [fp(v) for v in values]
    assert len(set(prints)) == len(values)
    assert fp(0) != fp(False) != fp(0.0)
    assert fp(0.0) != fp(-0.0)


def test_equal_fields_in_different_classes_differ() -> None:
    assert fp(Point(1, 2)) != fp(OtherPoint(1, 2))
    assert fp(Point(1, 2)) != fp(AttrsPoint(1, 2))
    assert fp(Color.red) != fp(Shade.red)
    assert fp(Point(1, 2)) == fp(Point(1, 2))
    assert fp(Point(1, 2)) != fp(Point(2, 1))


def test_unordered_collections_ignore_iteration_order() -> None:
    assert fp(frozenset(["a", "b", "c"])) == fp(frozenset(["c", "b", "a"]))
    assert fp({"a": 1, "b": 2}) == fp({"b": 2, "a": 1})
    assert fp(FrozenDict({"x": "1", "y": "2"})) == fp(FrozenDict({"y": "2", "x": "1"}))
    # A mapping's type is part of its identity; its order is not.
    assert fp(FrozenDict({"x": "1"})) != fp({"x": "1"})
    assert fp(frozenset({1, 2})) != fp({1, 2})  # frozenset vs set
    assert fp(("a", "b")) != fp(("b", "a"))


def test_nested_structures_and_digests() -> None:
    value = Batch((Image("a.png", FrozenDict({"w": 3})), Image("b.png")))
    assert fp(value) == fp(Batch((Image("a.png", FrozenDict({"w": 3})), Image("b.png"))))
    assert fp(value) != fp(Batch((Image("a.png", FrozenDict({"w": 4})), Image("b.png"))))
    assert fp(EMPTY_DIGEST) == fp(
        Digest(EMPTY_DIGEST.fingerprint, EMPTY_DIGEST.serialized_bytes_length)
    )
    assert fp(EMPTY_DIGEST) != fp(Digest.of_bytes(b""))
    contents = DigestContents([FileContent("a", b"x")])
    assert fp(contents) != fp((FileContent("a", b"x"),))  # a tuple subclass keeps its name


def test_fields_excluded_from_equality_are_excluded_from_the_fingerprint() -> None:
    assert WithCache(1, cache=[1, 2]) == WithCache(1, cache=None)
    assert fp(WithCache(1, cache=[1, 2])) == fp(WithCache(1))


def test_nan_and_large_ints() -> None:
    assert fp(math.nan) == fp(float("nan"))
    assert fp(2**200) != fp(2**200 + 1)
    assert fp(-(2**64)) != fp(2**64)
    assert fp(-1) != fp(255)  # two's complement with length: no aliasing


def test_classes_are_fingerprinted_by_qualified_name() -> None:
    assert fp(Point) != fp(OtherPoint)
    assert fp(Point) == fp(Point)
    assert fp(int) != fp("int")


def test_converter_hooks_extend_fingerprinting() -> None:
    assert fp(PurePosixPath("a/b")) != fp("a/b")
    assert fp(PurePosixPath("a/b")) == fp(PurePosixPath("a/b"))

    class Celsius:
        def __init__(self, degrees: float) -> None:
            self.degrees = degrees

    with pytest.raises(FingerprintError):
        fingerprint(Celsius(3.0))
    converter.register_unstructure_hook(Celsius, lambda c: {"degrees": c.degrees})
    assert fp(Celsius(3.0)) == fp(Celsius(3.0))
    assert fp(Celsius(3.0)) != fp(Celsius(4.0))
    assert fp(Celsius(3.0)) != fp({"degrees": 3.0})


# --- errors -------------------------------------------------------------------------------------


def test_unencodable_value_names_type_and_field_path() -> None:
    batch = Batch((*(Image(f"{i}.png") for i in range(3)), Image("3.png", Opaque())))
    with pytest.raises(FingerprintError) as info:
        fingerprint(batch)
    error = info.value
    assert isinstance(error, TypeError) and isinstance(error, RuleworkError)
    assert error.path == "Batch.images[3].meta"
    assert error.value_type is Opaque
    message = str(error)
    assert "Batch.images[3].meta" in message
    assert "test_fingerprint.Opaque" in message
    assert "register an unstructure hook" in message


def test_error_paths_through_mappings_and_sets() -> None:
    with pytest.raises(FingerprintError, match=r"dict\['k'\]"):
        fingerprint({"k": Opaque()})
    with pytest.raises(FingerprintError, match=r"frozenset\{<member>\}"):
        fingerprint(frozenset([(1, Opaque())]))
    with pytest.raises(FingerprintError, match=r"Point\.y\[1\]"):
        fingerprint(Point(1, [0, object()]))


def test_cyclic_value_is_an_error_not_a_crash() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(FingerprintError, match="nested too deeply or contains itself"):
        fingerprint(loop)


def test_failing_unstructure_hook_is_reported() -> None:
    class Broken:
        pass

    def hook(value: Broken) -> Any:
        raise RuntimeError("boom")

    converter.register_unstructure_hook(Broken, hook)
    with pytest.raises(FingerprintError, match=r"hook that failed.*boom"):
        fingerprint(Point(Broken(), 1))


# --- hypothesis: injectivity and stability ------------------------------------------------------

_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.sampled_from(list(Color))
    | st.builds(Tag, st.text(max_size=4))
)


def _is_hashable(value: object) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    hashable = children.filter(_is_hashable)
    return (
        st.tuples(children, children)
        | st.lists(children, max_size=3).map(tuple)
        | st.lists(children, max_size=3)
        | st.frozensets(hashable, max_size=3)
        | st.dictionaries(st.text(max_size=4) | st.integers(), children, max_size=3)
        | st.builds(FrozenDict, st.dictionaries(st.text(max_size=3), children, max_size=3))
        | st.builds(Point, children, children)
        | st.builds(OtherPoint, children, children)
        | st.builds(AttrsPoint, children, children)
    )


_values = st.recursive(_leaves, _extend, max_leaves=12)
# Deferred: its repr stays short (hypothesis warns about the recursive strategy's huge repr).
values = st.deferred(lambda: _values)


def strict_key(value: Any) -> Any:
    """An independent model of "the same value": type-exact, order-free where Python is."""
    cls = type(value)
    if cls is float:
        return ("float", value.hex() if not math.isnan(value) else "nan")
    if isinstance(value, enum.Enum):
        return (cls.__qualname__, value.name)
    if cls in (bool, int, str, bytes, type(None), Tag):
        return (cls.__qualname__, value)
    if cls in (tuple, list):
        return (cls.__qualname__, tuple(strict_key(v) for v in value))
    if cls is frozenset:
        return ("frozenset", frozenset(strict_key(v) for v in value))
    if cls in (dict, FrozenDict):
        return (
            cls.__qualname__,
            frozenset((strict_key(k), strict_key(v)) for k, v in value.items()),
        )
    if cls in (Point, OtherPoint, AttrsPoint):
        return (cls.__qualname__, strict_key(value.x), strict_key(value.y))
    raise AssertionError(f"unexpected {cls}")


@settings(max_examples=200, deadline=None)
@given(st.lists(values, min_size=2, max_size=8))
def test_fingerprints_are_injective(batch: list[Any]) -> None:
    """Two values share a fingerprint exactly when they are the same value, type for type."""
    by_value: dict[Any, set[int]] = {}
    by_print: dict[str, set[int]] = {}
    for index, value in enumerate(batch):
        by_value.setdefault(strict_key(value), set()).add(index)
        by_print.setdefault(fingerprint(value), set()).add(index)
    assert sorted(map(sorted, by_value.values())) == sorted(map(sorted, by_print.values()))


@given(values, values)
def test_fingerprint_bytes_are_injective_for_pairs(a: Any, b: Any) -> None:
    assert (fingerprint_bytes(a) == fingerprint_bytes(b)) == (strict_key(a) == strict_key(b))


@settings(max_examples=100, deadline=None)
@given(values)
def test_fingerprints_are_deterministic_within_a_process(value: Any) -> None:
    rebuilt = pickle.loads(pickle.dumps(value))
    assert fingerprint(rebuilt) == fingerprint(value)


_WORKER = """
import pickle, sys
sys.path.insert(0, sys.argv[1])
from rulework.engine.fingerprint import fingerprint
import tests.test_fingerprint  # the value types
while True:
    line = sys.stdin.buffer.readline()
    if not line:
        break
    value = pickle.loads(bytes.fromhex(line.decode()))
    sys.stdout.write(fingerprint(value) + "\\n")
    sys.stdout.flush()
"""


class _Worker:
    """A Python subprocess with a chosen PYTHONHASHSEED, fingerprinting pickled values."""

    def __init__(self, seed: str) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONHASHSEED": seed}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, root],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def fingerprint(self, value: Any) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(pickle.dumps(value).hex() + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture(scope="module")
def hashseed_workers() -> Iterator[list[_Worker]]:
    workers = [_Worker("1"), _Worker("4242")]
    yield workers
    for worker in workers:
        worker.close()


@settings(max_examples=50, deadline=None)
@given(values)
def test_fingerprints_are_stable_across_processes_and_hash_seeds(
    hashseed_workers: list[_Worker], value: Any
) -> None:
    expected = fingerprint(value)
    for worker in hashseed_workers:
        assert worker.fingerprint(value) == expected


def test_string_sets_are_stable_across_hash_seeds(hashseed_workers: list[_Worker]) -> None:
    # Many members make a different iteration order under another seed all but certain.
    value = frozenset(f"member-{i}" for i in range(200))
    for worker in hashseed_workers:
        assert worker.fingerprint(value) == fingerprint(value)


def test_known_fingerprint_is_pinned() -> None:
    # The encoding is a persistent format (cache keys on disk and in S3): changing it must be
    # deliberate, with a bump of the encoding version.
    assert fingerprint(("rulework", 1, None)) == fingerprint(("rulework", 1, None))
    assert fingerprint_bytes(("a", 1)) == (
        b"rulework-fingerprint-v1\x00"
        b"t\x00\x00\x00\x00\x00\x00\x00\x02"
        b"s\x00\x00\x00\x00\x00\x00\x00\x01a"
        b"i\x00\x00\x00\x00\x00\x00\x00\x01\x01"
    )
