"""File-system value types: digests, snapshots and the requests the file intrinsics answer.

These are plain frozen records; the work happens in `rulework.engine.store`. Rules request them
through Gets, e.g. `await Get(Snapshot, PathGlobs(["src/**/*.py"]))`.

Paths inside digests are relative, `/`-separated and normalized: no leading `/`, no empty, `.`
or `..` component, no NUL. The records validate their paths on construction and raise
`InvalidPathError` naming the path, so a bad path fails where it is written, not deep inside a
process sandbox.

Directory trees are Merkle trees: a directory is one blob, its *canonical listing* (see
`encode_directory`), whose entries name files and subdirectories by digest. `EMPTY_DIGEST` is
the digest of the empty directory, `EMPTY_FILE_DIGEST` the digest of an empty file.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import blake3

from .errors import InvalidPathError, StoreError

__all__ = [
    "EMPTY_DIGEST",
    "EMPTY_FILE_DIGEST",
    "AddPrefix",
    "CreateDigest",
    "Digest",
    "DigestContents",
    "DigestEntries",
    "DigestSubset",
    "Directory",
    "DirectoryEntry",
    "FileContent",
    "FileEntry",
    "GlobExpansionConjunction",
    "GlobMatchErrorBehavior",
    "MergeDigests",
    "PathGlobs",
    "RemovePrefix",
    "Snapshot",
    "decode_directory",
    "encode_directory",
    "split_path",
]

_HEX64 = re.compile(r"[0-9a-f]{64}")

# Invariant: a Digest's fingerprint is the lowercase hex BLAKE3 of exactly
# `serialized_bytes_length` bytes (a file's content, or a directory's canonical encoding).


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """Names a blob (a file's bytes or a directory's canonical listing) by BLAKE3 and size.

    Raises:
        ValueError: `fingerprint` is not 64 lowercase hex digits or the size is negative.
    """

    fingerprint: str
    serialized_bytes_length: int

    def __post_init__(self) -> None:
        if type(self.fingerprint) is not str or not _HEX64.fullmatch(self.fingerprint):
            raise ValueError(
                f"Digest fingerprint must be 64 lowercase hex digits (a BLAKE3 hash), "
                f"got {self.fingerprint!r}."
            )
        size = self.serialized_bytes_length
        if type(size) is not int or size < 0:
            raise ValueError(
                f"Digest serialized_bytes_length must be an int >= 0, got {size!r} "
                f"for {self.fingerprint}."
            )

    def __hash__(self) -> int:
        # The fingerprint alone (equal digests have equal fingerprints), and a str caches its
        # hash: cheaper than the generated hash of a (fingerprint, size) tuple, which showed up
        # in profiles of snapshots, where each file's digest is hashed several times.
        return hash(self.fingerprint)

    @classmethod
    def of_bytes(cls, data: bytes) -> Digest:
        """The digest of `data`."""
        return _trusted_digest(blake3.blake3(data).hexdigest(), len(data))


def _trusted_digest(fingerprint: str, size: int) -> Digest:
    """A Digest from values known to be valid (fresh from a hasher), skipping validation:
    building one per file of a ten-thousand-file snapshot is on the hot path."""
    digest = object.__new__(Digest)
    object.__setattr__(digest, "fingerprint", fingerprint)
    object.__setattr__(digest, "serialized_bytes_length", size)
    return digest


EMPTY_FILE_DIGEST = Digest.of_bytes(b"")
"""The digest of an empty file."""


# --- paths ---------------------------------------------------------------------------------------


def split_path(path: str, what: str, *, allow_root: bool = False) -> tuple[str, ...]:
    """Validate a relative, normalized path and return its components.

    `what` describes where the path comes from, for the error message. With `allow_root`, `""`
    and `"."` name the root and give `()`.

    Raises:
        InvalidPathError: the path is absolute, empty, has an empty, `.` or `..` component,
            contains NUL, or is not a `str`.
    """
    if type(path) is not str:
        if isinstance(path, str):
            path = str(path)
        else:
            raise InvalidPathError(
                f"{what}: expected a relative path as str, got {type(path).__name__} {path!r}."
            )
    if allow_root and path in ("", "."):
        return ()
    problem = _path_problem(path)
    if problem is not None:
        raise InvalidPathError(f"{what}: invalid path {path!r}: {problem}.")
    return tuple(path.split("/"))


def _path_problem(path: str) -> str | None:
    if not path:
        return "the path is empty"
    if "\x00" in path:
        return "it contains a NUL character"
    if path.startswith("/"):
        return "it is absolute; paths inside digests are relative to the digest's root"
    for component in path.split("/"):
        if component == "..":
            return "it contains '..'; paths may not leave the digest's root"
        if component == ".":
            return "it contains a '.' component; write the path without './'"
        if not component:
            return "it has an empty component (a doubled or trailing '/')"
    try:
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "it is not encodable as a file name (it contains a lone surrogate)"
    return None


def _checked_path(path: str, what: str) -> str:
    split_path(path, what)
    return path


@dataclass(frozen=True, slots=True)
class FileContent:
    """A file to create (`CreateDigest`) or a file read back (`DigestContents`)."""

    path: str
    content: bytes
    is_executable: bool = False

    def __post_init__(self) -> None:
        _checked_path(self.path, "FileContent.path")
        if not isinstance(self.content, bytes):
            raise TypeError(
                f"FileContent.content for {self.path!r} must be bytes, got "
                f"{type(self.content).__name__}; encode text first, e.g. text.encode()."
            )


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file by digest, without its content in memory."""

    path: str
    file_digest: Digest
    is_executable: bool = False

    def __post_init__(self) -> None:
        _checked_path(self.path, "FileEntry.path")
        if not isinstance(self.file_digest, Digest):
            raise TypeError(
                f"FileEntry.file_digest for {self.path!r} must be a Digest, got "
                f"{type(self.file_digest).__name__}."
            )


@dataclass(frozen=True, slots=True)
class Directory:
    """An (possibly empty) directory to create in `CreateDigest`."""

    path: str

    def __post_init__(self) -> None:
        _checked_path(self.path, "Directory.path")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A directory tree's digest plus the sorted lists of the files and directories in it."""

    digest: Digest
    files: tuple[str, ...]
    dirs: tuple[str, ...]


class DigestContents(tuple[FileContent, ...]):
    """The files of a digest with their content, sorted by path."""

    __slots__ = ()


class DigestEntries(tuple[FileEntry | Directory, ...]):
    """The entries of a digest (files by digest, and directories), sorted by path."""

    __slots__ = ()


# --- globs ---------------------------------------------------------------------------------------


class GlobMatchErrorBehavior(enum.Enum):
    """What to do when a glob in `PathGlobs` matches nothing."""

    ignore = "ignore"
    warn = "warn"
    error = "error"


class GlobExpansionConjunction(enum.Enum):
    """With `error`/`warn`: must every glob match (`all_match`) or at least one (`any_match`)?"""

    all_match = "all_match"
    any_match = "any_match"


def _as_tuple(items: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(items, str):
        return (items,)
    return tuple(items)


def _glob_problem(glob: str) -> str | None:
    if type(glob) is not str:
        return f"expected str, got {type(glob).__name__}"
    pattern = glob[1:] if glob.startswith("!") else glob
    if not pattern:
        return "the glob is empty"
    if "\x00" in pattern:
        return "it contains a NUL character"
    if pattern.startswith("/"):
        return (
            "it is absolute; globs are relative to the engine's root "
            f"(write {pattern.lstrip('/')!r})"
        )
    for component in pattern.split("/"):
        if component == "..":
            return "it contains '..'; globs may not leave the engine's root"
        if component == ".":
            return "it contains a '.' component; write the glob without './'"
        if not component:
            return "it has an empty component (a doubled or trailing '/')"
    return None


@dataclass(frozen=True, slots=True)
class PathGlobs:
    """Globs relative to the engine's root; `**` matches any number of directories and a
    leading `!` excludes. `Get(Snapshot, PathGlobs(["src/**/*.py", "!src/gen/**"]))`.

    `*`, `?` and `[...]` match within one path component (`*` also matches names starting with
    a dot). A glob that matches a directory includes the directory itself (and, with `**`
    after it, everything in it). An exclude that matches a directory prunes it whole.
    `glob_match_error_behavior` says what happens when globs match nothing: with `all_match`
    every include glob must match a file or directory, with `any_match` at least one must.

    Raises:
        InvalidPathError: a glob is empty, absolute, contains `..`, `.`, an empty component or
            NUL; the message names the glob and `description_of_origin`.
    """

    globs: tuple[str, ...]
    glob_match_error_behavior: GlobMatchErrorBehavior = GlobMatchErrorBehavior.ignore
    conjunction: GlobExpansionConjunction = GlobExpansionConjunction.any_match
    description_of_origin: str | None = None

    def __init__(
        self,
        globs: Iterable[str] | str,
        glob_match_error_behavior: GlobMatchErrorBehavior = GlobMatchErrorBehavior.ignore,
        conjunction: GlobExpansionConjunction = GlobExpansionConjunction.any_match,
        description_of_origin: str | None = None,
    ) -> None:
        globs = _as_tuple(globs)
        for glob in globs:
            problem = _glob_problem(glob)
            if problem is not None:
                origin = f" (from {description_of_origin})" if description_of_origin else ""
                raise InvalidPathError(f"Invalid glob {glob!r} in PathGlobs{origin}: {problem}.")
        object.__setattr__(self, "globs", globs)
        object.__setattr__(
            self, "glob_match_error_behavior", GlobMatchErrorBehavior(glob_match_error_behavior)
        )
        object.__setattr__(self, "conjunction", GlobExpansionConjunction(conjunction))
        object.__setattr__(self, "description_of_origin", description_of_origin)

    @property
    def includes(self) -> tuple[str, ...]:
        """The globs that add paths, in order."""
        return tuple(g for g in self.globs if not g.startswith("!"))

    @property
    def excludes(self) -> tuple[str, ...]:
        """The globs that remove paths, without their leading `!`."""
        return tuple(g[1:] for g in self.globs if g.startswith("!"))


# --- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateDigest:
    """Files and directories to write into a new digest."""

    entries: tuple[FileContent | FileEntry | Directory, ...] = field(default=())

    def __init__(self, entries: Iterable[FileContent | FileEntry | Directory] = ()) -> None:
        entries = tuple(entries)
        for entry in entries:
            if not isinstance(entry, FileContent | FileEntry | Directory):
                raise TypeError(
                    "CreateDigest entries must be FileContent, FileEntry or Directory, got "
                    f"{type(entry).__name__} {entry!r}."
                )
        object.__setattr__(self, "entries", entries)

    def __iter__(self) -> Iterator[FileContent | FileEntry | Directory]:
        return iter(self.entries)


@dataclass(frozen=True, slots=True)
class MergeDigests:
    """Digests to merge into one; the same path with different content is an error."""

    digests: tuple[Digest, ...] = field(default=())

    def __init__(self, digests: Iterable[Digest] = ()) -> None:
        digests = tuple(digests)
        for digest in digests:
            if not isinstance(digest, Digest):
                raise TypeError(
                    f"MergeDigests takes Digests, got {type(digest).__name__} {digest!r}."
                )
        object.__setattr__(self, "digests", digests)

    def __iter__(self) -> Iterator[Digest]:
        return iter(self.digests)


@dataclass(frozen=True, slots=True)
class AddPrefix:
    """Move every entry of `digest` under the directory `prefix` (`""` leaves it unchanged)."""

    digest: Digest
    prefix: str

    def __post_init__(self) -> None:
        split_path(self.prefix, "AddPrefix.prefix", allow_root=True)


@dataclass(frozen=True, slots=True)
class RemovePrefix:
    """Strip the directory `prefix` from every entry of `digest`; entries outside it are an error."""

    digest: Digest
    prefix: str

    def __post_init__(self) -> None:
        split_path(self.prefix, "RemovePrefix.prefix", allow_root=True)


@dataclass(frozen=True, slots=True)
class DigestSubset:
    """The part of `digest` that `globs` match."""

    digest: Digest
    globs: PathGlobs


# --- the canonical directory encoding ------------------------------------------------------------
#
# Version 1, one blob per directory:
#   header  b"rulework-directory\x00\x01"
#   entries, sorted by the name's bytes (UTF-8, surrogateescape), each:
#     kind  1 byte: b"f" file, b"x" executable file, b"d" directory
#     name  2-byte big-endian length + bytes (a single path component)
#     hash  32 raw bytes (the entry's BLAKE3)
#     size  8-byte big-endian serialized_bytes_length
# A decoder rejects anything else (unknown kind, unsorted or duplicate names, invalid names,
# trailing bytes), so a digest has exactly one listing and a listing exactly one digest.

DIRECTORY_HEADER = b"rulework-directory\x00\x01"
_KIND_FILE = 0x66  # "f"
_KIND_EXECUTABLE = 0x78  # "x"
_KIND_DIR = 0x64  # "d"
_KIND_BYTES = (b"f", b"x", b"d")


class DirectoryEntry(NamedTuple):
    """One entry of a directory listing: a file (maybe executable) or a subdirectory.

    A named tuple rather than a dataclass: listings hold one per file, and building them is
    on the snapshot's hot path.
    """

    is_dir: bool
    digest: Digest
    is_executable: bool = False


def encode_directory(entries: Mapping[str, DirectoryEntry]) -> bytes:
    """The canonical listing of a directory whose entries are `{name: entry}`.

    Names must be single, valid path components (the callers validate paths on the way in).
    """
    parts = [DIRECTORY_HEADER]
    append = parts.append
    fromhex = bytes.fromhex
    for name_bytes, entry in sorted(
        (name.encode("utf-8", "surrogateescape"), e) for name, e in entries.items()
    ):
        is_dir, digest, executable = entry
        append(
            _KIND_BYTES[2 if is_dir else 1 if executable else 0]
            + len(name_bytes).to_bytes(2, "big")
            + name_bytes
            + fromhex(digest.fingerprint)
            + digest.serialized_bytes_length.to_bytes(8, "big")
        )
    return b"".join(parts)


def decode_directory(data: bytes, digest: Digest) -> dict[str, DirectoryEntry]:
    """Parse a canonical listing (as written by `encode_directory`) into `{name: entry}`.

    Raises:
        StoreError: `data` (the blob of `digest`) is not a canonical directory listing, e.g.
            the digest names a file, not a directory.
    """
    if not data.startswith(DIRECTORY_HEADER):
        raise StoreError(
            f"{digest} is not a directory digest (it names a file or a blob of another "
            "kind); file intrinsics take the digest of a directory tree."
        )
    entries: dict[str, DirectoryEntry] = {}
    offset = len(DIRECTORY_HEADER)
    end = len(data)
    previous: bytes | None = None
    try:
        while offset < end:
            kind = data[offset]
            name_len = int.from_bytes(data[offset + 1 : offset + 3], "big")
            name_end = offset + 3 + name_len
            name_bytes = data[offset + 3 : name_end]
            if name_end + 40 > end or len(name_bytes) != name_len:
                raise ValueError("truncated entry")
            if previous is not None and name_bytes <= previous:
                raise ValueError("entries are not strictly sorted")
            previous = name_bytes
            name = name_bytes.decode("utf-8", "surrogateescape")
            if "/" in name or name in ("", ".", "..") or "\x00" in name:
                raise ValueError(f"invalid entry name {name!r}")
            entry_digest = _trusted_digest(
                data[name_end : name_end + 32].hex(),
                int.from_bytes(data[name_end + 32 : name_end + 40], "big"),
            )
            if kind == _KIND_DIR:
                entries[name] = DirectoryEntry(True, entry_digest)
            elif kind == _KIND_FILE:
                entries[name] = DirectoryEntry(False, entry_digest)
            elif kind == _KIND_EXECUTABLE:
                entries[name] = DirectoryEntry(False, entry_digest, True)
            else:
                raise ValueError(f"unknown entry kind {kind:#x}")
            offset = name_end + 40
    except (ValueError, IndexError) as exc:
        raise StoreError(f"{digest} is not a valid rulework directory listing: {exc}.") from None
    return entries


EMPTY_DIGEST = Digest.of_bytes(encode_directory({}))
"""The digest of the empty directory (the default input of a `Process`)."""
