"""The public surface: exactly these names, each importable from `rulework` itself."""

from __future__ import annotations

import rulework

PUBLIC = {
    "EMPTY_DIGEST",
    "AddPrefix",
    "ExplainReport",
    "PersistWarning",
    "explain",
    "AsyncioSession",
    "CacheBackendError",
    "CacheError",
    "Config",
    "ConfigError",
    "CreateDigest",
    "CycleError",
    "Digest",
    "DigestContents",
    "DigestEntries",
    "DigestSubset",
    "Directory",
    "Engine",
    "ExecutorError",
    "FallibleProcessResult",
    "FileContent",
    "FileEntry",
    "FingerprintError",
    "FrozenDict",
    "Get",
    "GlobExpansionConjunction",
    "GlobMatchErrorBehavior",
    "InvalidPathError",
    "MergeDigests",
    "MissingDigestError",
    "MultiGet",
    "NoSuchQueryError",
    "PathGlobs",
    "Process",
    "ProcessCacheScope",
    "ProcessExecutionFailure",
    "ProcessResult",
    "ProcessResultMetadata",
    "ProcessSpecError",
    "ProcessTimeout",
    "QueryRule",
    "RemovePrefix",
    "RuleDefinitionError",
    "RuleGraph",
    "RuleGraphError",
    "RuleGraphWarning",
    "RuleworkError",
    "Session",
    "SessionStatistics",
    "Snapshot",
    "StoreError",
    "UnionMembership",
    "UnionRule",
    "Workunit",
    "collect_rules",
    "fingerprint",
    "load_config",
    "rule",
    "rule_helper",
    "union",
    "RemoteCacheWarning",
    "CorruptBlobWarning",
    "DigestConflictError",
    "UnmatchedGlobsError",
    "UnmatchedGlobsWarning",
    "WatchResult",
}


def test_all_is_exactly_the_public_names() -> None:
    assert set(rulework.__all__) == PUBLIC
    assert len(rulework.__all__) == len(PUBLIC)


def test_every_public_name_is_importable_and_documented() -> None:
    for name in rulework.__all__:
        value = getattr(rulework, name)
        if callable(value) and not isinstance(value, type(rulework.EMPTY_DIGEST)):
            assert (value.__doc__ or "").strip(), f"rulework.{name} has no docstring"


def test_errors_share_one_hierarchy() -> None:
    for name in rulework.__all__:
        value = getattr(rulework, name)
        if (
            isinstance(value, type)
            and issubclass(value, Exception)
            and not issubclass(value, Warning)
        ):
            assert issubclass(value, rulework.RuleworkError), name
