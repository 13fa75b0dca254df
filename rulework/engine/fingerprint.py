"""Stable, type-tagged fingerprints of values: the identity of rule inputs in cache keys.

`fingerprint(value)` is the hex BLAKE3 of a canonical binary encoding of `value`. The encoding
is the same in every process, on every machine and under every `PYTHONHASHSEED`, and it is
injective: two values get the same encoding only if they have the same types all the way down
and equal contents. So `1`, `1.0`, `True`, `"1"` and `b"1"` differ, and two dataclasses with
equal fields but different classes differ.

What is encoded, and how (every item is self-delimiting: a one-byte tag, then lengths before
variable-size payloads):

- `None`, `bool`, `int` (any size), `float` (IEEE-754 bits; every NaN is the same NaN, `-0.0`
  differs from `0.0`), `str` (UTF-8, lone surrogates kept), `bytes`, `bytearray`.
- `tuple` and `list` (in order), `frozenset` and `set` (order-independent: the members'
  encodings are sorted), any `Mapping` such as `dict` or `FrozenDict` (pairs sorted by the
  key's encoding; insertion order does not matter, as for `==`).
- Frozen (or not) dataclasses and attrs classes: the class's qualified name, then each field
  that takes part in `==` (`compare=True` / `eq=True`) as name and value, in declaration order.
- Enum members (class name + member name), classes themselves (by qualified name).
- Subclasses of the builtins above (a `tuple` subclass such as `DigestContents`, a `str`
  subclass...) are tagged with their own qualified name as well.
- Anything else is handed to `converter` (a `cattrs.Converter`): if an unstructure hook is
  registered for the type, its output is encoded, tagged with the original type's name. That is
  the extension point: `converter.register_unstructure_hook(MyType, to_primitive)`.

A value that cannot be encoded raises `FingerprintError` naming the type and where it sits
inside the value (`Batch.images[3].meta`): a key is never computed from a partial encoding.

The "qualified name" is `module.QualName`, so moving or renaming a class changes fingerprints
of its values (a cache miss, never a wrong hit).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import struct
from collections.abc import Callable, Mapping
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import attrs
import blake3
import cattrs

from .errors import RuleworkError

__all__ = ["FingerprintError", "converter", "fingerprint", "fingerprint_bytes"]

# Bump when the encoding changes: every fingerprint changes with it, so old cache entries can
# never be confused with new ones.
_ENCODING_VERSION = b"rulework-fingerprint-v1\x00"


class FingerprintError(RuleworkError, TypeError):
    """A value (or a part of it) has a type that `fingerprint` cannot encode canonically.

    `value_type` is the offending type and `path` where it sits inside the fingerprinted value,
    e.g. `Batch.images[3].meta`.
    """

    def __init__(self, value_type: type, path: str, reason: str) -> None:
        self.value_type = value_type
        self.path = path
        self.reason = reason
        super().__init__(
            f"Cannot fingerprint {path}: a value of type {_qualname(value_type)} {reason}. "
            "Use a frozen dataclass or attrs class, a tuple/frozenset/mapping, an enum or a "
            "primitive (str, int, float, bool, bytes, None); or register an unstructure hook "
            "for the type on rulework.engine.fingerprint.converter."
        )


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    # Paths are common in rule inputs; PurePath subclasses have no hooks in cattrs by default.
    for path_type in (PurePath, PurePosixPath, PureWindowsPath):
        conv.register_unstructure_hook(path_type, str)
        conv.register_structure_hook(path_type, lambda value, cls: cls(value))
    return conv


converter: cattrs.Converter = _make_converter()
"""The cattrs converter `fingerprint` consults for types it does not know natively.

Register hooks on it to make your own types fingerprintable (and persistable: the cache
structures and unstructures persisted rule outputs with the same converter)."""


def _qualname(cls: type) -> str:
    module = getattr(cls, "__module__", None)
    name = str(getattr(cls, "__qualname__", None) or getattr(cls, "__name__", None) or repr(cls))
    return f"{module}.{name}" if module and module != "builtins" else name


# --- the encoding -----------------------------------------------------------------------------
# Tags. Each encoding starts with one, so items can be concatenated without ambiguity.
_NONE = b"N"
_TRUE = b"T"
_FALSE = b"F"
_INT = b"i"
_FLOAT = b"f"
_STR = b"s"
_BYTES = b"b"
_TUPLE = b"t"
_LIST = b"l"
_FROZENSET = b"z"
_SET = b"S"
_MAPPING = b"m"
_RECORD = b"c"  # dataclass / attrs instance
_ENUM = b"e"
_TYPE = b"y"
_SUBCLASS = b"@"  # a subclass of a builtin: name, then the builtin encoding
_UNSTRUCTURED = b"u"  # via the cattrs converter: name, then the encoding of the result

_pack_len = struct.Struct(">Q").pack
_pack_float = struct.Struct(">d").pack
_CANONICAL_NAN = _pack_float(math.nan)

_Out = list[bytes]
_Encoder = Callable[[Any, _Out], None]


class _Unencodable(Exception):
    """Raised inside the encoder; the path is collected (innermost first) as it propagates."""

    def __init__(self, value_type: type, reason: str) -> None:
        super().__init__(reason)
        self.value_type = value_type
        self.reason = reason
        self.segments: list[str] = []


def _name_bytes(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return _pack_len(len(data)) + data


def _encode_none(value: None, out: _Out) -> None:
    out.append(_NONE)


def _encode_bool(value: bool, out: _Out) -> None:
    out.append(_TRUE if value else _FALSE)


def _encode_int(value: int, out: _Out) -> None:
    data = int.to_bytes(value, (value.bit_length() + 8) // 8, "big", signed=True)
    out.append(_INT + _pack_len(len(data)) + data)


def _encode_float(value: float, out: _Out) -> None:
    out.append(_FLOAT + (_CANONICAL_NAN if value != value else _pack_float(value)))


def _encode_str(value: str, out: _Out) -> None:
    data = str.encode(value, "utf-8", "surrogatepass")
    out.append(_STR + _pack_len(len(data)) + data)


def _encode_bytes(value: bytes, out: _Out) -> None:
    out.append(_BYTES + _pack_len(len(value)) + bytes(value))


def _encode_sequence_items(tag: bytes, value: Any, out: _Out) -> None:
    out.append(tag + _pack_len(len(value)))
    index = 0
    try:
        for index, item in enumerate(value):  # noqa: B007 - index is read in the except clause
            _encode(item, out)
    except _Unencodable as exc:
        exc.segments.append(f"[{index}]")
        raise


def _encode_tuple(value: tuple[Any, ...], out: _Out) -> None:
    _encode_sequence_items(_TUPLE, value, out)


def _encode_list(value: list[Any], out: _Out) -> None:
    _encode_sequence_items(_LIST, value, out)


def _encode_unordered(tag: bytes, value: Any, out: _Out) -> None:
    members: list[bytes] = []
    for item in value:
        part: _Out = []
        try:
            _encode(item, part)
        except _Unencodable as exc:
            exc.segments.append(f"{{{item!r}}}" if _short_repr(item) else "{<member>}")
            raise
        members.append(b"".join(part))
    members.sort()
    out.append(tag + _pack_len(len(members)))
    out.extend(members)


def _encode_frozenset(value: frozenset[Any], out: _Out) -> None:
    _encode_unordered(_FROZENSET, value, out)


def _encode_set(value: set[Any], out: _Out) -> None:
    _encode_unordered(_SET, value, out)


def _short_repr(value: object) -> bool:
    return isinstance(value, str | int | bytes) and len(repr(value)) <= 40


def _encode_mapping_items(value: Mapping[Any, Any], out: _Out) -> None:
    pairs: list[tuple[bytes, bytes]] = []
    for key, item in value.items():
        key_part: _Out = []
        try:
            _encode(key, key_part)
        except _Unencodable as exc:
            exc.segments.append("<key>")
            raise
        item_part: _Out = []
        try:
            _encode(item, item_part)
        except _Unencodable as exc:
            exc.segments.append(f"[{key!r}]" if _short_repr(key) else "[<key>]")
            raise
        pairs.append((b"".join(key_part), b"".join(item_part)))
    # Keys are unique, so their encodings are too: sorting by the key alone is total.
    pairs.sort(key=lambda pair: pair[0])
    out.append(_MAPPING + _pack_len(len(pairs)))
    for key_bytes, item_bytes in pairs:
        out.append(key_bytes)
        out.append(item_bytes)


def _encode_dict(value: dict[Any, Any], out: _Out) -> None:
    _encode_mapping_items(value, out)


_BUILTIN_ENCODERS: dict[type, _Encoder] = {
    type(None): _encode_none,
    bool: _encode_bool,
    int: _encode_int,
    float: _encode_float,
    str: _encode_str,
    bytes: _encode_bytes,
    tuple: _encode_tuple,
    list: _encode_list,
    frozenset: _encode_frozenset,
    set: _encode_set,
    dict: _encode_dict,
}

# Per exact type, built on first use. Types are few and long-lived, so this never needs pruning.
_encoders: dict[type, _Encoder] = dict(_BUILTIN_ENCODERS)


def _encode(value: Any, out: _Out) -> None:
    cls = type(value)
    encoder = _encoders.get(cls)
    if encoder is None:
        encoder = _encoders[cls] = _make_encoder(cls)
    encoder(value, out)


def _make_encoder(cls: type) -> _Encoder:
    if isinstance(cls, type) and issubclass(cls, enum.Enum):
        return _record_like_enum_encoder(cls)
    if issubclass(cls, type):
        return _encode_type
    if dataclasses.is_dataclass(cls):
        names = tuple(f.name for f in dataclasses.fields(cls) if f.compare)
        return _record_encoder(cls, names)
    if attrs.has(cls):
        names = tuple(a.name for a in attrs.fields(cls) if a.eq)
        return _record_encoder(cls, names)
    # A subclass of a builtin (DigestContents is a tuple, a NewType-like str subclass...): the
    # builtin encoding, tagged with the subclass's name so it differs from the plain builtin.
    for base in (bool, int, float, str, bytes, tuple, list, frozenset, set, dict):
        if issubclass(cls, base):
            return _subclass_encoder(cls, _BUILTIN_ENCODERS[base])
    if cls is bytearray or cls is memoryview:
        return _subclass_encoder(cls, lambda value, out: _encode_bytes(bytes(value), out))
    if issubclass(cls, Mapping):
        return _subclass_encoder(cls, _encode_mapping_items)
    return _converter_encoder(cls)


def _record_like_enum_encoder(cls: type[enum.Enum]) -> _Encoder:
    header = _ENUM + _name_bytes(_qualname(cls))

    def encode_enum(value: enum.Enum, out: _Out) -> None:
        out.append(header + _name_bytes(value.name))

    return encode_enum


def _encode_type(value: type, out: _Out) -> None:
    out.append(_TYPE + _name_bytes(_qualname(value)))


def _record_encoder(cls: type, names: tuple[str, ...]) -> _Encoder:
    header = _RECORD + _name_bytes(_qualname(cls)) + _pack_len(len(names))
    fields = tuple((name, _name_bytes(name)) for name in names)

    def encode_record(value: Any, out: _Out) -> None:
        out.append(header)
        for name, name_bytes in fields:
            out.append(name_bytes)
            try:
                _encode(getattr(value, name), out)
            except _Unencodable as exc:
                exc.segments.append(f".{name}")
                raise

    return encode_record


def _subclass_encoder(cls: type, base_encoder: _Encoder) -> _Encoder:
    header = _SUBCLASS + _name_bytes(_qualname(cls))

    def encode_subclass(value: Any, out: _Out) -> None:
        out.append(header)
        base_encoder(value, out)

    return encode_subclass


def _converter_encoder(cls: type) -> _Encoder:
    header = _UNSTRUCTURED + _name_bytes(_qualname(cls))

    def encode_via_converter(value: Any, out: _Out) -> None:
        try:
            hook = converter.get_unstructure_hook(cls)
            primitive = hook(value)
        except Exception as exc:  # a failing user hook is reported like an unknown type
            raise _Unencodable(cls, f"has an unstructure hook that failed ({exc!r})") from exc
        if primitive is value or type(primitive) is cls:
            raise _Unencodable(cls, "has no canonical encoding")
        out.append(header)
        _encode(primitive, out)

    return encode_via_converter


def fingerprint_bytes(value: Any) -> bytes:
    """The canonical, versioned binary encoding of `value` that `fingerprint` hashes.

    Raises:
        FingerprintError: a part of `value` has a type with no canonical encoding.
    """
    out: _Out = [_ENCODING_VERSION]
    try:
        _encode(value, out)
    except _Unencodable as exc:
        path = type(value).__name__ + "".join(reversed(exc.segments))
        raise FingerprintError(exc.value_type, path, exc.reason) from None
    except RecursionError:
        raise FingerprintError(
            type(value), type(value).__name__, "is nested too deeply or contains itself"
        ) from None
    return b"".join(out)


def fingerprint(value: Any) -> str:
    """The stable, type-tagged BLAKE3 fingerprint of `value`, as 64 lowercase hex digits.

    >>> fingerprint(1) == fingerprint(1.0) or fingerprint(1) == fingerprint("1")
    False

    Raises:
        FingerprintError: a part of `value` has a type with no canonical encoding; the message
            names the type and where it is (`Batch.images[3].meta`).
    """
    return blake3.blake3(fingerprint_bytes(value)).hexdigest()
