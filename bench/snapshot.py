"""Benchmark `Store.snapshot` against hashing the same files with plain BLAKE3 in a loop.

Two generated trees (in a temporary directory, removed afterwards): `small` (10,000 files of
1-4 KiB in 100 directories) and `large` (20 files of 50 MB). For each, one line per figure:

    snapshot_baseline kind=K files=N seconds=S mb_per_s=T   plain blake3 loop (walk, read, hash)
    snapshot kind=K files=N seconds=S mb_per_s=T ratio=R     first snapshot into an empty store
    snapshot_stored kind=K files=N seconds=S mb_per_s=T ratio=R
                                 a new Store (cold stat cache) over a store holding the blobs
    snapshot_warm kind=K files=N seconds=S speedup=X         same Store again (stat cache)

`ratio` is seconds / baseline seconds (goal: <= 1.5); `speedup` is the first snapshot's time
over the warm one (goal: >= 10). Each figure is the best of a few runs, all files in the page
cache, so the figures compare CPU and syscall work rather than the disk.

Run: `python bench/snapshot.py [--kinds small,large] [--repeat 3]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import trio

from rulework.engine.fs import PathGlobs
from rulework.engine.store import FileBlobStore, Store

GLOBS = PathGlobs(["**"])


def make_small(root: Path) -> int:
    block = os.urandom(4096)
    for d in range(100):
        directory = root / f"pkg{d:03d}"
        directory.mkdir(parents=True)
        for f in range(100):
            size = 1024 + (d * 100 + f) * 37 % 3072
            (directory / f"mod{f:03d}.py").write_bytes(f"{d}/{f}\n".encode() + block[:size])
    return 10_000


def make_large(root: Path) -> int:
    root.mkdir(parents=True)
    block = os.urandom(50 * 1000 * 1000)
    for i in range(20):
        with open(root / f"blob{i:02d}.bin", "wb") as file:
            file.write(i.to_bytes(8, "big"))  # distinct content per file
            file.write(memoryview(block)[8:])
    return 20


def baseline(root: Path) -> int:
    """Plain BLAKE3 in a loop over `os.walk`: what a script hashing the tree would do."""
    total = 0
    buffer = bytearray(1 << 20)
    for directory, _, names in os.walk(root):
        for name in names:
            hasher = blake3.blake3()
            with open(os.path.join(directory, name), "rb", buffering=0) as file:
                while count := file.readinto(buffer):
                    hasher.update(memoryview(buffer)[:count])
                    total += count
            hasher.hexdigest()
    return total


def best_of(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def bench_kind(kind: str, workdir: Path, repeat: int) -> None:
    tree = workdir / f"tree-{kind}"
    count = make_small(tree) if kind == "small" else make_large(tree)
    total_bytes = baseline(tree)  # also warms the page cache
    os.sync()  # the generator's writeback must not be billed to the first snapshot
    mb = total_bytes / 1e6

    base = best_of(repeat, lambda: baseline(tree))
    print(
        f"snapshot_baseline kind={kind} files={count} seconds={base:.3f} mb_per_s={mb / base:.0f}",
        flush=True,
    )

    store_dir = workdir / f"store-{kind}"
    cold = float("inf")
    warm = float("inf")
    cold_repeat = repeat if kind == "small" else 1  # rewriting 1 GB per run is the disk's test
    for _ in range(cold_repeat):
        if store_dir.exists():
            shutil.rmtree(store_dir)
        os.sync()
        store = Store(FileBlobStore(store_dir))
        start = time.perf_counter()
        snapshot = trio.run(store.snapshot, tree, GLOBS)
        cold = min(cold, time.perf_counter() - start)
        assert len(snapshot.files) == count, (len(snapshot.files), count)
        for _ in range(repeat):
            start = time.perf_counter()
            again = trio.run(store.snapshot, tree, GLOBS)
            warm = min(warm, time.perf_counter() - start)
            assert again == snapshot
        assert store.statistics().stat_cache_hits >= count
    print(
        f"snapshot kind={kind} files={count} seconds={cold:.3f} mb_per_s={mb / cold:.0f} "
        f"ratio={cold / base:.2f}",
        flush=True,
    )

    def stored() -> None:
        fresh = Store(FileBlobStore(store_dir))
        assert trio.run(fresh.snapshot, tree, GLOBS) == snapshot
        assert fresh.statistics().stat_cache_hits == 0

    seconds = best_of(repeat, stored)
    print(
        f"snapshot_stored kind={kind} files={count} seconds={seconds:.3f} "
        f"mb_per_s={mb / seconds:.0f} ratio={seconds / base:.2f}",
        flush=True,
    )
    print(
        f"snapshot_warm kind={kind} files={count} seconds={warm:.4f} speedup={cold / warm:.1f}",
        flush=True,
    )
    shutil.rmtree(store_dir, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="small,large")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="rulework-bench-snapshot-"))
    try:
        for kind in args.kinds.split(","):
            bench_kind(kind, workdir, args.repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
