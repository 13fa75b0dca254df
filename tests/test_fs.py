"""Tests for `rulework.engine.fs`: digests, path validation and the Merkle directory encoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rulework.engine.errors import InvalidPathError, StoreError
from rulework.engine.fs import (
    DIRECTORY_HEADER,
    EMPTY_DIGEST,
    EMPTY_FILE_DIGEST,
    AddPrefix,
    CreateDigest,
    Digest,
    Directory,
    DirectoryEntry,
    FileContent,
    FileEntry,
    GlobExpansionConjunction,
    GlobMatchErrorBehavior,
    MergeDigests,
    PathGlobs,
    RemovePrefix,
    decode_directory,
    encode_directory,
    split_path,
)

BAD_PATHS = [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("a/../b", "'..'"),
    ("..", "'..'"),
    ("a//b", "empty component"),
    ("a/", "empty component"),
    ("./a", "'.' component"),
    ("a/\x00b", "NUL"),
]


def test_digest_of_bytes_and_validation() -> None:
    digest = Digest.of_bytes(b"hello")
    assert digest.serialized_bytes_length == 5
    assert len(digest.fingerprint) == 64
    assert Digest.of_bytes(b"") == EMPTY_FILE_DIGEST
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Digest("ABC", 1)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Digest(digest.fingerprint.upper(), 5)
    with pytest.raises(ValueError, match=">= 0"):
        Digest(digest.fingerprint, -1)


def test_empty_digest_is_the_empty_directory_listing() -> None:
    assert Digest.of_bytes(DIRECTORY_HEADER) == EMPTY_DIGEST
    assert EMPTY_DIGEST != EMPTY_FILE_DIGEST
    assert decode_directory(DIRECTORY_HEADER, EMPTY_DIGEST) == {}


@pytest.mark.parametrize(("path", "problem"), BAD_PATHS)
def test_records_reject_bad_paths_naming_them(path: str, problem: str) -> None:
    for make in (
        lambda: FileContent(path, b""),
        lambda: FileEntry(path, EMPTY_FILE_DIGEST),
        lambda: Directory(path),
    ):
        with pytest.raises(InvalidPathError) as info:
            make()
        assert repr(path) in str(info.value)
        assert problem in str(info.value)


@pytest.mark.parametrize(("path", "problem"), [p for p in BAD_PATHS if p[0] not in ("",)])
def test_prefixes_reject_bad_paths(path: str, problem: str) -> None:
    with pytest.raises(InvalidPathError, match=r"AddPrefix\.prefix"):
        AddPrefix(EMPTY_DIGEST, path)
    with pytest.raises(InvalidPathError, match=r"RemovePrefix\.prefix"):
        RemovePrefix(EMPTY_DIGEST, path)


def test_root_prefix_is_allowed_and_split_path_returns_components() -> None:
    assert AddPrefix(EMPTY_DIGEST, "").prefix == ""
    assert split_path("a/b/c", "test") == ("a", "b", "c")
    assert split_path(".", "test", allow_root=True) == ()
    with pytest.raises(InvalidPathError, match="expected a relative path as str"):
        split_path(b"a", "test")  # type: ignore[arg-type]


def test_file_content_requires_bytes() -> None:
    with pytest.raises(TypeError, match=r"must be bytes.*text.encode"):
        FileContent("a.txt", "text")  # type: ignore[arg-type]


def test_requests_check_their_members() -> None:
    with pytest.raises(TypeError, match="FileContent, FileEntry or Directory"):
        CreateDigest(["a.txt"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="MergeDigests takes Digests"):
        MergeDigests(["abc"])  # type: ignore[list-item]
    assert list(MergeDigests([EMPTY_DIGEST])) == [EMPTY_DIGEST]
    assert CreateDigest((Directory("a"),)).entries == (Directory("a"),)


@pytest.mark.parametrize(
    ("glob", "problem"),
    [
        ("/abs/*.py", "absolute"),
        ("!/abs", "absolute"),
        ("src/../x", "'..'"),
        ("", "empty"),
        ("!", "empty"),
        ("src//a", "empty component"),
        ("./src", "'.' component"),
    ],
)
def test_path_globs_reject_bad_globs_naming_glob_and_origin(glob: str, problem: str) -> None:
    with pytest.raises(InvalidPathError) as info:
        PathGlobs(["ok/*.py", glob], description_of_origin="the `sources` field of //a:b")
    message = str(info.value)
    assert repr(glob) in message
    assert "the `sources` field of //a:b" in message
    assert problem in message


def test_path_globs_split_includes_and_excludes() -> None:
    globs = PathGlobs(
        ["src/**/*.py", "!src/gen/**", "README.md"],
        glob_match_error_behavior="error",  # type: ignore[arg-type]
        conjunction=GlobExpansionConjunction.all_match,
    )
    assert globs.includes == ("src/**/*.py", "README.md")
    assert globs.excludes == ("src/gen/**",)
    assert globs.glob_match_error_behavior is GlobMatchErrorBehavior.error
    assert PathGlobs("a.txt").globs == ("a.txt",)
    assert hash(PathGlobs(["a"])) == hash(PathGlobs(("a",)))


# --- the Merkle encoding -------------------------------------------------------------------------

_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", ".."))
_digests = st.builds(
    Digest, st.binary(min_size=32, max_size=32).map(bytes.hex), st.integers(0, 2**63)
)
_entries = st.builds(
    lambda is_dir, digest, executable: DirectoryEntry(is_dir, digest, executable and not is_dir),
    st.booleans(),
    _digests,
    st.booleans(),
)
_listings = st.dictionaries(_names, _entries, max_size=8)


@settings(max_examples=150, deadline=None)
@given(_listings)
def test_directory_encoding_round_trips(listing: dict[str, DirectoryEntry]) -> None:
    data = encode_directory(listing)
    digest = Digest.of_bytes(data)
    assert decode_directory(data, digest) == listing
    # Canonical: insertion order does not matter.
    assert encode_directory(dict(reversed(list(listing.items())))) == data


@settings(max_examples=100, deadline=None)
@given(_listings, _listings)
def test_directory_encoding_is_injective(
    a: dict[str, DirectoryEntry], b: dict[str, DirectoryEntry]
) -> None:
    assert (encode_directory(a) == encode_directory(b)) == (a == b)


def test_surrogate_escaped_names_round_trip() -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")  # a Latin-1 file name on disk
    listing = {
        name: DirectoryEntry(False, EMPTY_FILE_DIGEST),
        "b": DirectoryEntry(True, EMPTY_DIGEST),
    }
    data = encode_directory(listing)
    assert decode_directory(data, Digest.of_bytes(data)) == listing


def test_decoder_rejects_non_canonical_or_foreign_blobs() -> None:
    file_digest = Digest.of_bytes(b"just a file")
    with pytest.raises(StoreError, match="is not a directory digest"):
        decode_directory(b"just a file", file_digest)
    good = encode_directory(
        {
            "a": DirectoryEntry(False, EMPTY_FILE_DIGEST),
            "b": DirectoryEntry(False, EMPTY_FILE_DIGEST),
        }
    )
    entry_len = (len(good) - len(DIRECTORY_HEADER)) // 2
    first = good[len(DIRECTORY_HEADER) : len(DIRECTORY_HEADER) + entry_len]
    second = good[len(DIRECTORY_HEADER) + entry_len :]
    cases = {
        "unsorted": DIRECTORY_HEADER + second + first,
        "duplicate": DIRECTORY_HEADER + first + first,
        "truncated": good[:-3],
        "unknown kind": DIRECTORY_HEADER + b"q" + first[1:],
        "bad name": DIRECTORY_HEADER + first[:3] + b"/" + first[4:],
    }
    for label, data in cases.items():
        with pytest.raises(StoreError, match="not a valid rulework directory listing"):
            decode_directory(data, Digest.of_bytes(data))
        assert label
