"""Tests for `rulework.engine.store`: blob stores, the Store's intrinsics, integrity and safety.

Everything runs on real files under `tmp_path`.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rulework.abc import BlobStore
from rulework.backends.sqlite import SqliteCache, SqliteCacheConfig
from rulework.engine.errors import InvalidPathError, MissingDigestError, StoreError
from rulework.engine.fs import (
    EMPTY_DIGEST,
    EMPTY_FILE_DIGEST,
    AddPrefix,
    CreateDigest,
    Digest,
    DigestSubset,
    Directory,
    FileContent,
    FileEntry,
    GlobExpansionConjunction,
    GlobMatchErrorBehavior,
    MergeDigests,
    PathGlobs,
    RemovePrefix,
)
from rulework.engine.store import (
    INTRINSIC_DIGESTS,
    CorruptBlobWarning,
    DigestConflictError,
    FileBlobStore,
    MemoryBlobStore,
    Store,
    UnmatchedGlobsError,
    UnmatchedGlobsWarning,
    is_intrinsic,
)

# --- helpers ------------------------------------------------------------------------------------


def write_tree(root: Path, files: Mapping[str, bytes | str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


async def settle() -> None:
    """Let the stat cache's racy window (100 ms) pass, so files just written are cacheable.

    The window is measured on the files' mtime *and* ctime, and ctime cannot be backdated, so
    waiting is the only honest way to get there.
    """
    await trio.sleep(0.25)


def corrupt_file(path: Path, *, offset: int = 0) -> None:
    os.chmod(path, 0o644)  # store files are read-only (root could write anyway)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def file_blobs(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "store")


@pytest.fixture
def store(file_blobs: FileBlobStore) -> Store:
    return Store(file_blobs)


@pytest.fixture(params=["file", "memory"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    blobs: BlobStore = (
        FileBlobStore(tmp_path / "store") if request.param == "file" else MemoryBlobStore()
    )
    return Store(blobs)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    write_tree(
        root,
        {
            "README.md": "readme",
            "src/app.py": "print('app')",
            "src/lib/util.py": "def util(): ...",
            "src/lib/data.json": "{}",
            "src/gen/out.py": "# generated",
            "src/.hidden.py": "secret",
            "docs/a[1].txt": "bracket",
            "docs/b.txt": "b",
        },
    )
    (root / "empty_dir").mkdir()
    os.chmod(root / "src/app.py", 0o755)
    return root


# --- blob stores --------------------------------------------------------------------------------


@pytest.fixture(params=["file", "memory"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs")
    return MemoryBlobStore()


async def test_blob_store_protocol_round_trip(blob_store: BlobStore, tmp_path: Path) -> None:
    assert isinstance(blob_store, BlobStore)
    blobs = {Digest.of_bytes(data): data for data in (b"a", b"bb", b"", bytes(range(256)) * 100)}
    assert await blob_store.find_missing_blobs(blobs) == frozenset(blobs)
    await blob_store.write_blobs(blobs)
    assert await blob_store.find_missing_blobs(blobs) == frozenset()
    assert await blob_store.read_blobs([*blobs, Digest.of_bytes(b"absent")]) == blobs
    big = Digest.of_bytes(b"x" * 100_000)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000)
    await blob_store.write_blob_from_file(big, src)
    dest = tmp_path / "dest.bin"
    assert await blob_store.read_blob_to_file(big, dest)
    assert dest.read_bytes() == b"x" * 100_000
    assert not await blob_store.read_blob_to_file(Digest.of_bytes(b"absent"), tmp_path / "no")
    await blob_store.evict([big, Digest.of_bytes(b"a")])
    assert await blob_store.find_missing_blobs([big, Digest.of_bytes(b"bb")]) == {big}


async def test_file_blob_store_layout_is_sharded_and_read_only(file_blobs: FileBlobStore) -> None:
    digest = Digest.of_bytes(b"content")
    await file_blobs.write_blobs({digest: b"content"})
    path = file_blobs.local_path(digest)
    fp = digest.fingerprint
    assert path == file_blobs.root / fp[:2] / fp[2:]
    assert path.read_bytes() == b"content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert file_blobs.local_path(Digest.of_bytes(b"other")) is None
    # Present blobs are never rewritten.
    inode = path.stat().st_ino
    await file_blobs.write_blobs({digest: b"content"})
    assert path.stat().st_ino == inode
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


async def test_file_blob_store_treats_wrong_size_as_missing_and_repairs(
    file_blobs: FileBlobStore,
) -> None:
    digest = Digest.of_bytes(b"content")
    await file_blobs.write_blobs({digest: b"content"})
    path = file_blobs.local_path(digest)
    assert path is not None
    os.chmod(path, 0o644)
    path.write_bytes(b"cont")  # truncated
    assert await file_blobs.find_missing_blobs([digest]) == {digest}
    assert file_blobs.local_path(digest) is None
    await file_blobs.write_blobs({digest: b"content"})
    assert path.read_bytes() == b"content"


async def test_file_blob_store_batches_thread_hops(
    file_blobs: FileBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops = 0
    real = trio.to_thread.run_sync

    async def counting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        nonlocal hops
        hops += 1
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    blobs = {Digest.of_bytes(str(i).encode()): str(i).encode() for i in range(300)}
    await file_blobs.write_blobs(blobs)
    assert await file_blobs.find_missing_blobs(blobs) == frozenset()
    assert len(await file_blobs.read_blobs(blobs)) == 300
    await file_blobs.evict(blobs)
    assert hops == 4


_CRASHING_WRITER = """
import sys, trio
from pathlib import Path
from rulework.engine.fs import Digest
from rulework.engine.store import FileBlobStore

store_root, fifo, fingerprint, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
trio.run(FileBlobStore(Path(store_root)).write_blob_from_file, Digest(fingerprint, size), Path(fifo))
"""


async def test_writer_killed_mid_write_leaves_no_visible_blob(tmp_path: Path) -> None:
    """A writer SIGKILLed mid-write leaves only a temp file; the store still works."""
    root = tmp_path / "store"
    data = os.urandom(4 << 20)
    digest = Digest.of_bytes(data)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-c",
            _CRASHING_WRITER,
            str(root),
            str(fifo),
            digest.fingerprint,
            str(len(data)),
        ],
    )
    try:
        # The child copies from the FIFO into its temp file. Opening the FIFO for writing
        # waits for the child to open it; a write of 1 MiB beyond the pipe buffer returns only
        # once the child has consumed it, so the child is provably mid-copy afterwards.
        def feed_half() -> None:
            with open(fifo, "wb") as pipe:
                pipe.write(data[: len(data) // 2])
                pipe.flush()
                os.kill(process.pid, signal.SIGKILL)

        await trio.to_thread.run_sync(feed_half)
        assert await process.wait() == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    blobs = FileBlobStore(root)
    shard = root / digest.fingerprint[:2]
    leftovers = [p for p in shard.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # it really died mid-write
    assert not (shard / digest.fingerprint[2:]).exists()
    assert await blobs.find_missing_blobs([digest]) == {digest}
    assert await blobs.read_blobs([digest]) == {}
    store = Store(blobs)
    with pytest.raises(MissingDigestError):
        await store.load_bytes(digest)
    assert await store.store_bytes(data) == digest
    assert await Store(blobs).load_bytes(digest) == data
    assert await blobs.remove_stale_temp_files(max_age_seconds=3600) == 0  # too young
    assert await blobs.remove_stale_temp_files(max_age_seconds=0) == 1
    assert not leftovers[0].exists()


# --- bytes and integrity ------------------------------------------------------------------------


async def test_store_and_load_bytes(any_store: Store) -> None:
    digest = await any_store.store_bytes(b"payload")
    assert digest == Digest.of_bytes(b"payload")
    assert await any_store.load_bytes(digest) == b"payload"
    big = os.urandom(1 << 20)
    assert await any_store.load_bytes(await any_store.store_bytes(big)) == big
    assert await any_store.load_bytes(EMPTY_FILE_DIGEST) == b""
    with pytest.raises(MissingDigestError, match="is not in the store"):
        await any_store.load_bytes(Digest.of_bytes(b"never stored"))


async def test_corrupt_blob_on_disk_is_evicted_reported_once_and_never_returned(
    file_blobs: FileBlobStore,
) -> None:
    digest = await Store(file_blobs).store_bytes(b"precious bytes")
    path = file_blobs.local_path(digest)
    assert path is not None
    corrupt_file(path, offset=3)
    store = Store(file_blobs)
    with (
        pytest.warns(CorruptBlobWarning, match=digest.fingerprint) as record,
        pytest.raises(MissingDigestError),
    ):
        await store.load_bytes(digest)
    assert len(record) == 1
    assert file_blobs.local_path(digest) is None  # evicted
    assert store.statistics().corrupt_blobs_evicted == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second report: it is simply missing now
        with pytest.raises(MissingDigestError):
            await store.load_bytes(digest)
    # Storing it again repairs the entry.
    await store.store_bytes(b"precious bytes")
    assert await Store(file_blobs).load_bytes(digest) == b"precious bytes"


async def test_corrupt_blob_in_memory_store_is_detected() -> None:
    blobs = MemoryBlobStore()
    store = Store(blobs)
    digest = await store.store_bytes(b"abc")
    blobs._blobs[digest] = b"abd"
    with pytest.warns(CorruptBlobWarning), pytest.raises(MissingDigestError):
        await Store(blobs).load_bytes(digest)
    assert await blobs.find_missing_blobs([digest]) == {digest}


async def test_wrong_size_digest_is_missing_without_evicting_good_data(store: Store) -> None:
    digest = await store.store_bytes(b"abc")
    for size in (0, 2, 4, 10_000):
        with pytest.raises(MissingDigestError):
            await Store(store.blobs).load_bytes(Digest(digest.fingerprint, size))
    assert await Store(store.blobs).load_bytes(digest) == b"abc"


async def test_corrupt_directory_blob_fails_tree_operations(file_blobs: FileBlobStore) -> None:
    digest = await Store(file_blobs).create_digest(CreateDigest([FileContent("a/b.txt", b"x")]))
    path = file_blobs.local_path(digest)
    assert path is not None
    corrupt_file(path, offset=len(path.read_bytes()) - 1)
    with pytest.warns(CorruptBlobWarning), pytest.raises(MissingDigestError):
        await Store(file_blobs).contents(digest)


async def test_resnapshot_restores_an_evicted_directory_blob(
    file_blobs: FileBlobStore, workspace: Path
) -> None:
    store = Store(file_blobs)
    globs = PathGlobs(["**"])
    first = await store.snapshot(workspace, globs)
    assert (await store.snapshot(workspace, globs)) == first  # served by the listing memo
    path = file_blobs.local_path(first.digest)
    assert path is not None
    corrupt_file(path, offset=len(path.read_bytes()) - 1)
    with pytest.warns(CorruptBlobWarning), pytest.raises(MissingDigestError):
        await Store(file_blobs).contents(first.digest)  # another Store evicts it
    with pytest.warns(CorruptBlobWarning):  # ... and this one, as when it reads it itself
        await store._evict_corrupt([first.digest])
    again = await store.snapshot(workspace, globs)
    assert again == first
    assert {fc.path for fc in await Store(file_blobs).contents(again.digest)} == set(first.files)


async def test_corrupt_blob_is_not_materialized(file_blobs: FileBlobStore, tmp_path: Path) -> None:
    digest = await Store(file_blobs).create_digest(
        CreateDigest([FileContent("ok.txt", b"fine"), FileContent("bad.txt", b"will rot")])
    )
    bad = file_blobs.local_path(Digest.of_bytes(b"will rot"))
    assert bad is not None
    corrupt_file(bad)
    with pytest.warns(CorruptBlobWarning), pytest.raises(MissingDigestError, match="bad"):
        await Store(file_blobs).materialize(digest, tmp_path / "out1", read_only=True)
    assert not (tmp_path / "out1" / "bad.txt").exists()
    assert file_blobs.local_path(Digest.of_bytes(b"will rot")) is None  # evicted
    # Now it is simply missing, for copies as well as links.
    with pytest.raises(MissingDigestError, match="bad"):
        await Store(file_blobs).materialize(digest, tmp_path / "out2")


async def test_tampered_hard_link_is_caught_on_next_materialize(
    file_blobs: FileBlobStore, tmp_path: Path
) -> None:
    store = Store(file_blobs)
    digest = await store.create_digest(CreateDigest([FileContent("in.txt", b"input data")]))
    await store.materialize(digest, tmp_path / "sandbox1", read_only=True)
    link = tmp_path / "sandbox1" / "in.txt"
    # A misbehaving process chmods its read-only input and writes to it (same inode as the store).
    os.chmod(link, 0o644)
    link.write_bytes(b"tampered!!")
    with pytest.warns(CorruptBlobWarning), pytest.raises(MissingDigestError):
        await store.materialize(digest, tmp_path / "sandbox2", read_only=True)


# --- snapshots ----------------------------------------------------------------------------------


async def test_snapshot_globs(any_store: Store, workspace: Path) -> None:
    snap = await any_store.snapshot(workspace, PathGlobs(["src/**/*.py"]))
    assert snap.files == ("src/.hidden.py", "src/app.py", "src/gen/out.py", "src/lib/util.py")
    assert snap.dirs == ("src", "src/gen", "src/lib")
    excluded = await any_store.snapshot(workspace, PathGlobs(["**/*.py", "!src/gen", "!**/.*"]))
    assert excluded.files == ("src/app.py", "src/lib/util.py")
    literal = await any_store.snapshot(workspace, PathGlobs(["README.md", "docs/a[[]1].txt"]))
    assert literal.files == ("README.md", "docs/a[1].txt")
    classes = await any_store.snapshot(workspace, PathGlobs(["docs/?.txt", "src/lib/*.[jp]*"]))
    assert classes.files == ("docs/b.txt", "src/lib/data.json", "src/lib/util.py")
    dirs = await any_store.snapshot(workspace, PathGlobs(["*"]))
    assert dirs.files == ("README.md",)
    assert dirs.dirs == ("docs", "empty_dir", "src")  # matched directories, without contents
    contents = {fc.path: fc for fc in await any_store.contents(snap.digest)}
    assert contents["src/app.py"].content == b"print('app')"
    assert contents["src/app.py"].is_executable
    assert not contents["src/lib/util.py"].is_executable
    assert await any_store.snapshot_of(snap.digest) == snap


async def test_snapshot_digest_depends_only_on_content(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "one", {"a/b.txt": "x", "c.txt": "y"})
    write_tree(tmp_path / "two", {"c.txt": "y", "a/b.txt": "x"})
    globs = PathGlobs(["**"])
    first = await store.snapshot(tmp_path / "one", globs)
    second = await Store(MemoryBlobStore()).snapshot(tmp_path / "two", globs)
    assert first.digest == second.digest
    created = await store.create_digest(
        CreateDigest([FileContent("c.txt", b"y"), FileContent("a/b.txt", b"x")])
    )
    assert created == first.digest


async def test_snapshot_follows_internal_symlinks_and_rejects_escaping_ones(
    store: Store, tmp_path: Path
) -> None:
    root = tmp_path / "ws"
    write_tree(root, {"real/data.txt": "data", "target.txt": "target"})
    (root / "link.txt").symlink_to("target.txt")
    (root / "linkdir").symlink_to("real")
    (root / "dangling").symlink_to("nowhere")
    (root / "real" / "loop").symlink_to("..")
    snap = await store.snapshot(root, PathGlobs(["**"]))
    assert "link.txt" in snap.files and "linkdir/data.txt" in snap.files
    assert "dangling" not in snap.files
    contents = {fc.path: fc.content for fc in await store.contents(snap.digest)}
    assert contents["link.txt"] == b"target"
    (tmp_path / "secret.txt").write_text("outside")
    (root / "escape.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(InvalidPathError) as info:
        await store.snapshot(root, PathGlobs(["**"]))
    assert "'escape.txt'" in str(info.value) and "outside the root" in str(info.value)
    # Excluding it (or not matching it) is fine.
    ok = await store.snapshot(root, PathGlobs(["**", "!escape.txt"]))
    assert "escape.txt" not in ok.files


async def test_unmatched_glob_policies(store: Store, workspace: Path) -> None:
    globs = ["src/*.py", "nothing/**/*.rs"]
    ignored = await store.snapshot(workspace, PathGlobs(globs))
    assert ignored.files == ("src/.hidden.py", "src/app.py")
    # any_match: one glob matched, so no complaint.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await store.snapshot(
            workspace, PathGlobs(globs, glob_match_error_behavior=GlobMatchErrorBehavior.error)
        )
    with pytest.warns(UnmatchedGlobsWarning, match="'nothing/\\*\\*/\\*.rs'"):
        await store.snapshot(
            workspace,
            PathGlobs(
                globs,
                GlobMatchErrorBehavior.warn,
                GlobExpansionConjunction.all_match,
                "BUILD:app",
            ),
        )
    with pytest.raises(UnmatchedGlobsError) as info:
        await store.snapshot(
            workspace,
            PathGlobs(
                globs, GlobMatchErrorBehavior.error, GlobExpansionConjunction.all_match, "BUILD:app"
            ),
        )
    assert info.value.globs == ("nothing/**/*.rs",)
    assert "BUILD:app" in str(info.value) and "nothing/**/*.rs" in str(info.value)
    with pytest.raises(UnmatchedGlobsError, match=re.escape("'none.txt'")):
        await store.snapshot(workspace, PathGlobs(["none.txt"], GlobMatchErrorBehavior.error))


async def test_snapshot_of_missing_root_is_an_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="Cannot snapshot"):
        await store.snapshot(tmp_path / "absent", PathGlobs(["**"]))


async def test_stat_cache_makes_second_snapshot_read_nothing(store: Store, workspace: Path) -> None:
    await settle()
    globs = PathGlobs(["**"])
    first = await store.snapshot(workspace, globs)
    hashed = store.statistics().files_hashed
    assert hashed == len(first.files)
    second = await store.snapshot(workspace, globs)
    assert second == first
    stats = store.statistics()
    assert stats.files_hashed == hashed
    assert stats.stat_cache_hits == len(first.files)
    # A change is seen: new content (and so new mtime/ctime) is rehashed.
    (workspace / "README.md").write_text("changed")
    third = await store.snapshot(workspace, globs)
    assert third.digest != first.digest
    assert store.statistics().files_hashed == hashed + 1
    contents = {fc.path: fc.content for fc in await store.contents(third.digest)}
    assert contents["README.md"] == b"changed"


async def test_recently_modified_files_are_not_stat_cached(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "ws"
    write_tree(root, {"fresh.txt": "just written"})
    await store.snapshot(root, PathGlobs(["**"]))
    await store.snapshot(root, PathGlobs(["**"]))
    # Written within the racy window: a same-tick rewrite could keep its stat, so no cache.
    assert store.statistics().files_hashed == 2


async def test_persisted_stat_cache_is_used_by_a_new_store(tmp_path: Path, workspace: Path) -> None:
    await settle()
    blobs = FileBlobStore(tmp_path / "store")
    cache_file = tmp_path / "stat-cache.json"
    first_store = Store(blobs, stat_cache_path=cache_file)
    first = await first_store.snapshot(workspace, PathGlobs(["**"]))
    await first_store.aclose()
    assert cache_file.exists()
    second_store = Store(blobs, stat_cache_path=cache_file)
    assert await second_store.snapshot(workspace, PathGlobs(["**"])) == first
    assert second_store.statistics().files_hashed == 0
    # Blobs deleted behind the cache's back are noticed and re-ingested.
    readme = Digest.of_bytes(b"readme")
    await blobs.evict([readme])
    third_store = Store(blobs, stat_cache_path=cache_file)
    assert await third_store.snapshot(workspace, PathGlobs(["**"])) == first
    assert third_store.statistics().files_hashed == 1
    assert await third_store.load_bytes(readme) == b"readme"


async def test_large_files_are_hashed_from_disk_and_stored_once(
    file_blobs: FileBlobStore, tmp_path: Path
) -> None:
    root = tmp_path / "ws"
    data = os.urandom(5 << 20)
    write_tree(root, {"big.bin": data, "small.txt": "s"})
    store = Store(file_blobs)
    snap = await store.snapshot(root, PathGlobs(["**"]))
    digest = Digest.of_bytes(data)
    path = file_blobs.local_path(digest)
    assert path is not None and path.read_bytes() == data
    inode = path.stat().st_ino
    await Store(file_blobs, use_mmap=False).snapshot(root, PathGlobs(["**"]))
    assert path.stat().st_ino == inode  # already present: not written again
    contents = {fc.path: fc.content for fc in await store.contents(snap.digest)}
    assert contents["big.bin"] == data


# --- create / merge / prefixes / subsets --------------------------------------------------------


async def test_create_digest_and_read_back(any_store: Store) -> None:
    stored = await any_store.store_bytes(b"by digest")
    digest = await any_store.create_digest(
        CreateDigest(
            [
                FileContent("bin/tool", b"#!/bin/sh\n", is_executable=True),
                FileContent("a.txt", b"a"),
                FileEntry("ref/file.txt", stored),
                Directory("empty/nested"),
                FileContent("a.txt", b"a"),  # an identical duplicate is fine
            ]
        )
    )
    snap = await any_store.snapshot_of(digest)
    assert snap.files == ("a.txt", "bin/tool", "ref/file.txt")
    assert snap.dirs == ("bin", "empty", "empty/nested", "ref")
    contents = await any_store.contents(digest)
    assert [fc.path for fc in contents] == ["a.txt", "bin/tool", "ref/file.txt"]
    assert contents[1].is_executable and contents[2].content == b"by digest"
    entries = await any_store.entries(digest)
    assert [e.path for e in entries] == [
        "a.txt",
        "bin",
        "bin/tool",
        "empty",
        "empty/nested",
        "ref",
        "ref/file.txt",
    ]
    assert await any_store.create_digest(CreateDigest(entries)) == digest
    assert await any_store.create_digest(CreateDigest()) == EMPTY_DIGEST


async def test_create_digest_errors(any_store: Store) -> None:
    with pytest.raises(DigestConflictError) as info:
        await any_store.create_digest(
            CreateDigest([FileContent("a.txt", b"one"), FileContent("a.txt", b"two")])
        )
    assert info.value.path == "a.txt" and "3 bytes" in str(info.value)
    with pytest.raises(DigestConflictError, match="both a file"):
        await any_store.create_digest(
            CreateDigest([FileContent("a", b"file"), FileContent("a/b", b"below")])
        )
    with pytest.raises(MissingDigestError, match=re.escape("'ghost.txt'")):
        await any_store.create_digest(
            CreateDigest([FileEntry("ghost.txt", Digest.of_bytes(b"never stored"))])
        )


async def test_merge_digests(any_store: Store) -> None:
    a = await any_store.create_digest(
        CreateDigest([FileContent("src/a.py", b"a"), FileContent("shared.txt", b"s")])
    )
    b = await any_store.create_digest(
        CreateDigest([FileContent("src/b.py", b"b"), FileContent("shared.txt", b"s")])
    )
    merged = await any_store.merge_digests(MergeDigests([a, b, EMPTY_DIGEST, a]))
    snap = await any_store.snapshot_of(merged)
    assert snap.files == ("shared.txt", "src/a.py", "src/b.py")
    assert merged == await any_store.create_digest(
        CreateDigest(
            [
                FileContent("src/a.py", b"a"),
                FileContent("src/b.py", b"b"),
                FileContent("shared.txt", b"s"),
            ]
        )
    )
    assert await any_store.merge_digests(MergeDigests([])) == EMPTY_DIGEST
    assert await any_store.merge_digests(MergeDigests([a])) == a
    assert await any_store.merge_digests(MergeDigests([b, a])) == merged


async def test_merge_conflicts_name_both_inputs(any_store: Store) -> None:
    one = await any_store.create_digest(CreateDigest([FileContent("x/conf.ini", b"one")]))
    two = await any_store.create_digest(CreateDigest([FileContent("x/conf.ini", b"two!")]))
    exe = await any_store.create_digest(
        CreateDigest([FileContent("x/conf.ini", b"one", is_executable=True)])
    )
    as_dir = await any_store.create_digest(CreateDigest([Directory("x/conf.ini")]))
    for other, detail in ((two, "4 bytes"), (exe, "executable"), (as_dir, "a directory")):
        with pytest.raises(DigestConflictError) as info:
            await any_store.merge_digests(MergeDigests([one, other]))
        message = str(info.value)
        assert info.value.path == "x/conf.ini"
        assert one.fingerprint in message and other.fingerprint in message
        assert "#0" in message and "#1" in message and detail in message


async def test_add_and_remove_prefix(any_store: Store) -> None:
    digest = await any_store.create_digest(CreateDigest([FileContent("a/b.txt", b"x")]))
    prefixed = await any_store.add_prefix(AddPrefix(digest, "out/dir"))
    assert (await any_store.snapshot_of(prefixed)).files == ("out/dir/a/b.txt",)
    assert await any_store.remove_prefix(RemovePrefix(prefixed, "out/dir")) == digest
    assert await any_store.remove_prefix(RemovePrefix(prefixed, "out/dir/a")) == (
        await any_store.create_digest(CreateDigest([FileContent("b.txt", b"x")]))
    )
    assert await any_store.add_prefix(AddPrefix(digest, "")) == digest
    assert await any_store.remove_prefix(RemovePrefix(EMPTY_DIGEST, "anything")) == EMPTY_DIGEST
    with_other = await any_store.merge_digests(
        MergeDigests([prefixed, await any_store.create_digest(CreateDigest([Directory("out/x")]))])
    )
    with pytest.raises(StoreError, match="outside the prefix: 'out/x'"):
        await any_store.remove_prefix(RemovePrefix(with_other, "out/dir"))
    with pytest.raises(StoreError, match=re.escape("'out/dir/a/b.txt' is a file")):
        await any_store.remove_prefix(RemovePrefix(prefixed, "out/dir/a/b.txt"))
    with pytest.raises(StoreError, match="does not exist"):
        await any_store.remove_prefix(RemovePrefix(prefixed, "out/nope"))


async def test_file_digest_is_rejected_where_a_tree_is_expected(any_store: Store) -> None:
    file_digest = await any_store.store_bytes(b"not a directory")
    with pytest.raises(StoreError, match="not a directory digest"):
        await any_store.add_prefix(AddPrefix(file_digest, "p"))
    with pytest.raises(MissingDigestError):
        await any_store.contents(Digest.of_bytes(b"unknown tree"))


async def test_digest_subset(any_store: Store, workspace: Path) -> None:
    full = await any_store.snapshot(workspace, PathGlobs(["**"]))
    subset = await any_store.digest_subset(
        DigestSubset(full.digest, PathGlobs(["src/**", "!src/gen/**", "README.md"]))
    )
    snap = await any_store.snapshot_of(subset)
    assert snap.files == (
        "README.md",
        "src/.hidden.py",
        "src/app.py",
        "src/lib/data.json",
        "src/lib/util.py",
    )
    # A subtree matched whole keeps its digest (it is reused, not rebuilt).
    lib_only = await any_store.digest_subset(DigestSubset(full.digest, PathGlobs(["src/lib/**"])))
    full_lib = await any_store.remove_prefix(
        RemovePrefix(
            await any_store.digest_subset(DigestSubset(full.digest, PathGlobs(["src/lib/*"]))),
            "src/lib",
        )
    )
    assert await any_store.remove_prefix(RemovePrefix(lib_only, "src/lib")) == full_lib
    assert (
        await any_store.digest_subset(DigestSubset(full.digest, PathGlobs(["**"]))) == full.digest
    )
    with pytest.raises(UnmatchedGlobsError, match="in digest"):
        await any_store.digest_subset(
            DigestSubset(full.digest, PathGlobs(["*.rs"], GlobMatchErrorBehavior.error))
        )


async def test_tree_blobs(any_store: Store) -> None:
    digest = await any_store.create_digest(
        CreateDigest([FileContent("a/b.txt", b"b"), FileContent("c.txt", b"c"), Directory("d")])
    )
    blobs = await any_store.tree_blobs(digest)
    assert Digest.of_bytes(b"b") in blobs and Digest.of_bytes(b"c") in blobs
    assert digest in blobs and EMPTY_DIGEST in blobs
    assert len(blobs) == 5  # root, a/, d/ (empty), two files
    await any_store.blobs.evict([Digest.of_bytes(b"c")])
    with pytest.raises(MissingDigestError, match=re.escape("'c.txt'")):
        await Store(any_store.blobs).tree_blobs(digest)


# --- materialize and capture --------------------------------------------------------------------


async def _tool_digest(store: Store) -> Digest:
    return await store.create_digest(
        CreateDigest(
            [
                FileContent("bin/run.sh", b"#!/bin/sh\necho hi\n", is_executable=True),
                FileContent("data/in.txt", b"input"),
                FileContent("data/empty.txt", b""),
                Directory("out"),
            ]
        )
    )


async def test_materialize_read_only_hard_links_from_the_file_store(
    file_blobs: FileBlobStore, tmp_path: Path
) -> None:
    store = Store(file_blobs)
    digest = await _tool_digest(store)
    dest = tmp_path / "sandbox"
    await store.materialize(digest, dest, read_only=True)
    data = dest / "data" / "in.txt"
    blob = file_blobs.local_path(Digest.of_bytes(b"input"))
    assert blob is not None
    assert data.stat().st_ino == blob.stat().st_ino  # a hard link
    assert stat.S_IMODE(data.stat().st_mode) == 0o444
    tool = dest / "bin" / "run.sh"
    assert stat.S_IMODE(tool.stat().st_mode) == 0o555
    tool_blob = file_blobs.local_path(Digest.of_bytes(tool.read_bytes()))
    assert tool_blob is not None
    assert tool.stat().st_ino != tool_blob.stat().st_ino  # executables are copies
    assert (dest / "out").is_dir() and (dest / "data" / "empty.txt").read_bytes() == b""
    result = await trio.run_process([str(tool)], capture_stdout=True)
    assert result.stdout == b"hi\n"


async def test_materialize_writable_copies(any_store: Store, tmp_path: Path) -> None:
    digest = await _tool_digest(any_store)
    dest = tmp_path / "sandbox"
    await any_store.materialize(digest, dest)
    data = dest / "data" / "in.txt"
    assert stat.S_IMODE(data.stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "bin" / "run.sh").stat().st_mode) == 0o755
    data.write_bytes(b"modified by the process")  # does not touch the store
    assert await Store(any_store.blobs).load_bytes(Digest.of_bytes(b"input")) == b"input"
    assert await any_store.capture(dest, ["data/in.txt"], []) != digest
    with pytest.raises(StoreError, match="already exists"):
        await any_store.materialize(digest, dest)


async def test_materialize_missing_blob(any_store: Store, tmp_path: Path) -> None:
    digest = await _tool_digest(any_store)
    await any_store.blobs.evict([Digest.of_bytes(b"input")])
    with pytest.raises(MissingDigestError, match=re.escape("data/in.txt")):
        await Store(any_store.blobs).materialize(digest, tmp_path / "sandbox")


class CountingBlobStore:
    """A blob store passing everything to `inner`, recording which digests were read whole
    (`read_blobs`) and which streamed (`read_blob_to_file`). It offers `local_path` only when
    `inner` does, as the Store discovers it by duck typing."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.read_whole: list[Digest] = []
        self.streamed: list[Digest] = []
        self.written: list[Digest] = []
        if hasattr(inner, "local_path"):
            self.local_path = inner.local_path

    async def find_missing_blobs(self, digests: Iterable[Digest]) -> frozenset[Digest]:
        return frozenset(await self.inner.find_missing_blobs(digests))

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        wanted = list(digests)
        self.read_whole.extend(wanted)
        return dict(await self.inner.read_blobs(wanted))

    async def write_blobs(self, blobs: Mapping[Digest, bytes]) -> None:
        self.written.extend(blobs)
        await self.inner.write_blobs(blobs)

    async def read_blob_to_file(self, digest: Digest, dest: Path) -> bool:
        self.streamed.append(digest)
        return bool(await self.inner.read_blob_to_file(digest, dest))

    async def write_blob_from_file(self, digest: Digest, src: Path) -> None:
        self.written.append(digest)
        await self.inner.write_blob_from_file(digest, src)

    async def evict(self, digests: Iterable[Digest]) -> None:
        await self.inner.evict(digests)


class NoLocalPath:
    """`FileBlobStore` as a blob store that does not tell where its files are."""

    def __init__(self, root: Path) -> None:
        self._inner = FileBlobStore(root)
        self.find_missing_blobs = self._inner.find_missing_blobs
        self.read_blobs = self._inner.read_blobs
        self.write_blobs = self._inner.write_blobs
        self.read_blob_to_file = self._inner.read_blob_to_file
        self.write_blob_from_file = self._inner.write_blob_from_file
        self.evict = self._inner.evict

    def path_of(self, digest: Digest) -> Path | None:
        return self._inner.local_path(digest)


@pytest.fixture
async def sqlite_cache(tmp_path: Path) -> AsyncIterator[SqliteCache]:
    cache = SqliteCache(SqliteCacheConfig(), tmp_path / "cache")  # inline up to 64 KiB
    await cache.open()
    yield cache
    await cache.aclose()


def _big(seed: int, size: int) -> bytes:
    return bytes([seed]) * 7 + os.urandom(size - 7)


async def test_materialize_links_and_copies_large_blobs_out_of_the_sqlite_cache(
    sqlite_cache: SqliteCache, tmp_path: Path
) -> None:
    big, tool = _big(1, 1 << 20), b"#!/bin/sh\n" + _big(2, 200_000)
    blobs = CountingBlobStore(sqlite_cache)
    digest = await Store(blobs).create_digest(
        CreateDigest(
            [
                FileContent("data/big.bin", big),
                FileContent("bin/tool", tool, is_executable=True),
                FileContent("small.txt", b"small"),
            ]
        )
    )
    big_digest, tool_digest = Digest.of_bytes(big), Digest.of_bytes(tool)
    blob_file = sqlite_cache.local_path(big_digest)
    assert blob_file is not None  # above the inline threshold: a file in the cache directory

    store = Store(blobs)  # a fresh Store: nothing verified or cached yet
    await store.materialize(digest, tmp_path / "ro", read_only=True)
    linked = tmp_path / "ro" / "data" / "big.bin"
    assert linked.stat().st_ino == blob_file.stat().st_ino  # a hard link, not a copy
    assert stat.S_IMODE(linked.stat().st_mode) == 0o444
    copied = tmp_path / "ro" / "bin" / "tool"  # executable: never a link to the shared blob
    assert copied.read_bytes() == tool
    assert stat.S_IMODE(copied.stat().st_mode) == 0o555
    assert (tmp_path / "ro" / "small.txt").read_bytes() == b"small"  # inline: read from the db

    await store.materialize(digest, tmp_path / "rw")
    writable = tmp_path / "rw" / "data" / "big.bin"
    assert writable.read_bytes() == big
    assert writable.stat().st_ino != blob_file.stat().st_ino
    assert stat.S_IMODE(writable.stat().st_mode) == 0o644
    # The large blobs were placed from their files: never read whole through the blob store.
    assert big_digest not in blobs.read_whole and tool_digest not in blobs.read_whole
    assert Digest.of_bytes(b"small") in blobs.read_whole
    assert blobs.streamed == []


async def test_materialize_from_sqlite_catches_a_tampered_hard_link(
    sqlite_cache: SqliteCache, tmp_path: Path
) -> None:
    big = _big(3, 300_000)
    store = Store(sqlite_cache)
    digest = await store.create_digest(CreateDigest([FileContent("in.bin", big)]))
    await store.materialize(digest, tmp_path / "sandbox1", read_only=True)
    corrupt_file(tmp_path / "sandbox1" / "in.bin", offset=1000)  # writes the shared blob
    with (
        pytest.warns(CorruptBlobWarning),
        pytest.raises(MissingDigestError, match=re.escape("in.bin")),
    ):
        await store.materialize(digest, tmp_path / "sandbox2", read_only=True)
    assert sqlite_cache.local_path(Digest.of_bytes(big)) is None  # evicted
    assert not (tmp_path / "sandbox2" / "in.bin").exists()


async def test_materialize_reports_a_blob_file_removed_behind_the_stores_back(
    sqlite_cache: SqliteCache, tmp_path: Path
) -> None:
    big = _big(4, 100_000)
    digest = await Store(sqlite_cache).create_digest(CreateDigest([FileContent("x/in.bin", big)]))
    path = sqlite_cache.local_path(Digest.of_bytes(big))
    assert path is not None
    path.unlink()  # e.g. another process's GC
    with pytest.raises(MissingDigestError, match=re.escape("'x/in.bin'")):
        await Store(sqlite_cache).materialize(digest, tmp_path / "sandbox")


async def test_materialize_streams_large_blobs_that_are_not_local_files(tmp_path: Path) -> None:
    size = 5 << 20  # above the size that is never read whole
    big, medium = _big(5, size), _big(6, 100_000)
    blobs = CountingBlobStore(NoLocalPath(tmp_path / "store"))
    digest = await Store(blobs).create_digest(
        CreateDigest(
            [
                FileContent("big.bin", big, is_executable=True),
                FileContent("medium.bin", medium),
            ]
        )
    )
    await Store(blobs).materialize(digest, tmp_path / "sandbox", read_only=True)
    out = tmp_path / "sandbox" / "big.bin"
    assert out.read_bytes() == big
    assert stat.S_IMODE(out.stat().st_mode) == 0o555
    assert (tmp_path / "sandbox" / "medium.bin").read_bytes() == medium
    big_digest = Digest.of_bytes(big)
    assert blobs.streamed == [big_digest]
    assert big_digest not in blobs.read_whole
    assert Digest.of_bytes(medium) in blobs.read_whole  # small enough to batch in memory

    # A corrupt streamed blob is caught, evicted, and leaves no file behind.
    stored = blobs.inner.path_of(big_digest)
    assert stored is not None
    corrupt_file(stored, offset=size - 1)
    with (
        pytest.warns(CorruptBlobWarning),
        pytest.raises(MissingDigestError, match=re.escape("big.bin")),
    ):
        await Store(blobs).materialize(digest, tmp_path / "sandbox2")
    assert not (tmp_path / "sandbox2" / "big.bin").exists()
    assert blobs.inner.path_of(big_digest) is None
    with pytest.raises(StoreError, match="already exists"):
        await Store(blobs).materialize(digest, tmp_path / "sandbox")


async def test_intrinsic_blobs_are_never_stored(tmp_path: Path) -> None:
    assert frozenset({EMPTY_DIGEST, EMPTY_FILE_DIGEST}) == INTRINSIC_DIGESTS
    assert is_intrinsic(EMPTY_DIGEST) and is_intrinsic(EMPTY_FILE_DIGEST)
    assert not is_intrinsic(Digest.of_bytes(b"x"))
    blobs = CountingBlobStore(MemoryBlobStore())
    store = Store(blobs)
    assert await store.store_bytes(b"") == EMPTY_FILE_DIGEST
    assert await store.create_digest(CreateDigest([])) == EMPTY_DIGEST
    digest = await store.create_digest(CreateDigest([FileContent("empty", b""), Directory("d")]))
    assert not set(blobs.written) & INTRINSIC_DIGESTS
    assert await store.load_bytes(EMPTY_FILE_DIGEST) == b""
    await store.materialize(digest, tmp_path / "sandbox")
    assert (tmp_path / "sandbox" / "empty").read_bytes() == b""
    assert not set(blobs.read_whole) & INTRINSIC_DIGESTS


async def test_snapshot_writes_only_the_file_blobs_the_blob_store_lacks(
    workspace: Path,
) -> None:
    inner = MemoryBlobStore()
    globs = PathGlobs(["**"])
    first = await Store(inner).snapshot(workspace, globs)
    file_digests = {
        fc.path: Digest.of_bytes(fc.content) for fc in await Store(inner).contents(first.digest)
    }
    # A new Store (nothing known present, no stat cache) over blobs that are all held.
    blobs = CountingBlobStore(inner)
    assert await Store(blobs).snapshot(workspace, globs) == first
    assert not set(blobs.written) & set(file_digests.values())
    # One changed file: exactly its new blob is written.
    (workspace / "README.md").write_text("changed again")
    blobs.written.clear()
    await Store(blobs).snapshot(workspace, globs)
    assert Digest.of_bytes(b"changed again") in blobs.written
    assert not set(blobs.written) & set(file_digests.values())


async def test_capture_declared_outputs(any_store: Store, tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    write_tree(sandbox, {"out.txt": "o", "dist/pkg/a.whl": "w", "dist/b.txt": "b", "junk.txt": "j"})
    (sandbox / "dist" / "emptydir").mkdir()
    os.chmod(sandbox / "dist" / "b.txt", 0o755)
    digest = await any_store.capture(
        sandbox, ["out.txt", "missing.txt", "nested/missing"], ["dist", "nope"]
    )
    snap = await any_store.snapshot_of(digest)
    assert snap.files == ("dist/b.txt", "dist/pkg/a.whl", "out.txt")
    assert snap.dirs == ("dist", "dist/emptydir", "dist/pkg")
    contents = {fc.path: fc for fc in await any_store.contents(digest)}
    assert contents["dist/b.txt"].is_executable
    everything = await any_store.capture(sandbox, [], ["."])
    assert "junk.txt" in (await any_store.snapshot_of(everything)).files
    assert await any_store.capture(sandbox, [], []) == EMPTY_DIGEST
    assert await any_store.capture(sandbox, ["missing"], []) == EMPTY_DIGEST


async def test_capture_errors(store: Store, tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    write_tree(sandbox, {"dir/file.txt": "x", "file.txt": "y"})
    for bad in ("../escape", "/etc/passwd", "a//b", "a/\x00"):
        with pytest.raises(InvalidPathError) as info:
            await store.capture(sandbox, [bad], [])
        assert repr(bad) in str(info.value)
    with pytest.raises(StoreError, match="output file 'dir' is a directory"):
        await store.capture(sandbox, ["dir"], [])
    with pytest.raises(StoreError, match=re.escape("output directory 'file.txt' is a file")):
        await store.capture(sandbox, [], ["file.txt"])
    (sandbox / "leak").symlink_to("/etc")
    with pytest.raises(InvalidPathError, match="'leak' is a symlink"):
        await store.capture(sandbox, [], ["."])


async def test_round_trip_materialize_capture(any_store: Store, tmp_path: Path) -> None:
    digest = await _tool_digest(any_store)
    await any_store.materialize(digest, tmp_path / "sb")
    assert await any_store.capture(tmp_path / "sb", [], ["."]) == digest


async def test_cancelled_snapshot_leaves_a_consistent_store(
    file_blobs: FileBlobStore, tmp_path: Path
) -> None:
    root = tmp_path / "ws"
    write_tree(root, {f"d{i % 20}/f{i}.txt": f"content {i}" for i in range(600)})
    store = Store(file_blobs)
    with trio.move_on_after(0.01):
        await store.snapshot(root, PathGlobs(["**"]))
    # Whatever was written is complete and verifiable; a fresh snapshot works.
    fresh = Store(file_blobs)
    snap = await fresh.snapshot(root, PathGlobs(["**"]))
    assert len(snap.files) == 600
    contents = await fresh.contents(snap.digest)
    assert contents[0].content.startswith(b"content ")
    leftovers = await trio.to_thread.run_sync(lambda: list(file_blobs.root.glob("*/.tmp-*")))
    assert leftovers == []


_components = st.sampled_from(["a", "b", "c.txt", "d e", "ü", ".hidden"])
_paths = st.lists(_components, min_size=1, max_size=3).map("/".join)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(_paths, st.tuples(st.binary(max_size=16), st.booleans()), max_size=8),
    st.lists(_paths, max_size=3),
)
async def test_trees_round_trip_through_every_view(
    files: dict[str, tuple[bytes, bool]], extra_dirs: list[str]
) -> None:
    # A path cannot be both a file and a directory holding other paths.
    files = {p: v for p, v in files.items() if not any(q.startswith(p + "/") for q in files)}
    dirs = [d for d in extra_dirs if not any(f == d or d.startswith(f + "/") for f in files)]
    store = Store(MemoryBlobStore())
    request = CreateDigest(
        [FileContent(p, c, x) for p, (c, x) in files.items()] + [Directory(d) for d in dirs]
    )
    digest = await store.create_digest(request)
    contents = await store.contents(digest)
    assert {fc.path: (fc.content, fc.is_executable) for fc in contents} == files
    assert [fc.path for fc in contents] == sorted(files)
    assert await store.create_digest(CreateDigest(await store.entries(digest))) == digest
    snap = await store.snapshot_of(digest)
    assert snap.files == tuple(sorted(files))
    assert set(dirs) <= set(snap.dirs)
    # Reversing the order of the request changes nothing: the encoding is canonical.
    assert await store.create_digest(CreateDigest(reversed(request.entries))) == digest
    # Splitting the tree and merging the parts gives it back.
    halves = [await store.create_digest(CreateDigest(request.entries[i::2])) for i in range(2)]
    assert await store.merge_digests(MergeDigests(halves)) == digest
    prefixed = await store.add_prefix(AddPrefix(digest, "p/q"))
    assert await store.remove_prefix(RemovePrefix(prefixed, "p/q")) == digest
    assert await store.digest_subset(DigestSubset(digest, PathGlobs(["**"]))) == digest
