"""Intrinsics: the engine's own rules, giving rules the store and process execution via Get.

They are ordinary rules (so they are memoized per session and appear in the rule graph), whose
bodies call the session's services: `await Get(Snapshot, PathGlobs([...]))`,
`await Get(Digest, CreateDigest([...]))`, `await Get(ProcessResult, Process(...))`...

There is deliberately no `PathGlobs -> Digest` intrinsic (use the Snapshot's `.digest`): with
it, `Get(Snapshot, PathGlobs)` could be served both directly and through `Digest -> Snapshot`,
which the rule graph rightly reports as ambiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from .errors import ProcessExecutionFailure
from .fs import (
    AddPrefix,
    CreateDigest,
    Digest,
    DigestContents,
    DigestEntries,
    DigestSubset,
    MergeDigests,
    PathGlobs,
    RemovePrefix,
    Snapshot,
)
from .process import FallibleProcessResult, Process, ProcessResult
from .rules import rule
from .scheduler import current_node

if TYPE_CHECKING:
    from .services import Services


def _services() -> Services:
    services: Services = current_node().session.services
    return services


@rule
async def snapshot_from_path_globs(globs: PathGlobs) -> Snapshot:
    services = _services()
    return await services.snapshot(globs)


_MAGIC = frozenset("*?[")


def _may_match(glob: Sequence[str], path: Sequence[str]) -> bool:
    """Could `glob` (components) match `path`, or something below `path` if it is a directory?"""
    while True:
        if not path:
            return True  # `path` is a directory that may hold a match (or the match itself)
        if not glob:
            return False
        head = glob[0]
        if head == "**":
            return _may_match(glob[1:], path) or _may_match(glob, path[1:])
        if head != path[0] and (_MAGIC.isdisjoint(head) or not fnmatchcase(path[0], head)):
            return False
        glob, path = glob[1:], path[1:]


def globs_may_match(values: tuple[Any, ...], changed: Sequence[str]) -> bool:
    """Does a change to any of `changed` (relative paths) possibly affect these PathGlobs?

    Conservative (exclusions are ignored): a false positive only costs re-snapshotting,
    after which an unchanged Snapshot stops the invalidation (early cutoff).
    """
    (globs,) = values
    includes = [g.split("/") for g in globs.globs if not g.startswith("!")]
    for path in changed:
        parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
        if any(_may_match(glob, parts) for glob in includes):
            return True
    return False


snapshot_from_path_globs.__rulework_reads_paths__ = globs_may_match  # type: ignore[attr-defined]


@rule
async def snapshot_from_digest(digest: Digest) -> Snapshot:
    return await _services().store.snapshot_of(digest)


@rule
async def create_digest(request: CreateDigest) -> Digest:
    return await _services().store.create_digest(request)


@rule
async def merge_digests(request: MergeDigests) -> Digest:
    return await _services().store.merge_digests(request)


@rule
async def add_prefix(request: AddPrefix) -> Digest:
    return await _services().store.add_prefix(request)


@rule
async def remove_prefix(request: RemovePrefix) -> Digest:
    return await _services().store.remove_prefix(request)


@rule
async def digest_subset(request: DigestSubset) -> Digest:
    return await _services().store.digest_subset(request)


@rule
async def digest_contents(digest: Digest) -> DigestContents:
    return await _services().store.contents(digest)


@rule
async def digest_entries(digest: Digest) -> DigestEntries:
    return await _services().store.entries(digest)


@rule
async def run_fallible_process(process: Process) -> FallibleProcessResult:
    return await _services().run_process(process)


@rule
async def run_process(process: Process) -> ProcessResult:
    return await _services().run_process_checked(process)


def process_workunit_metadata(node: Any, kind: str) -> dict[str, Any]:
    """What progress displays and traces show about a process node's events."""
    process: Process = node.values[0]
    metadata: dict[str, Any] = {
        "description": process.description,
        "environment": process.environment,
    }
    if kind == "end":
        result = node.value
        if result is not None:
            metadata.update(
                environment=result.metadata.environment,
                source=result.metadata.source,
                duration_seconds=result.metadata.duration_seconds,
                exit_code=getattr(result, "exit_code", 0),
            )
        elif isinstance(node.error, ProcessExecutionFailure):
            metadata.update(
                environment=node.error.environment, source="ran", exit_code=node.error.exit_code
            )
    return metadata


for _process_rule in (run_fallible_process, run_process):
    setattr(_process_rule, "__rulework_workunit_metadata__", process_workunit_metadata)  # noqa: B010


_RULES: tuple[Any, ...] = (
    snapshot_from_path_globs,
    snapshot_from_digest,
    create_digest,
    merge_digests,
    add_prefix,
    remove_prefix,
    digest_subset,
    digest_contents,
    digest_entries,
    run_fallible_process,
    run_process,
)


def rules() -> tuple[Any, ...]:
    """The intrinsic rules every Engine includes (exempt from reachability warnings)."""
    return _RULES
