"""rulework: a Pants-style workflow engine for Python, on trio.

Rules are `async` functions whose annotations declare their inputs and output; `await Get(...)`
and `await MultiGet(...)` ask the engine for other rules' outputs. The engine validates the rule
graph before anything runs, memoizes and runs rules concurrently, caches process results and
files, and runs processes locally or remotely as the config file says.

Everything public is importable from this module; extension interfaces for backend authors live
in `rulework.abc`, test helpers in `rulework.testing`.
"""

from .engine.cache import RemoteCacheWarning as RemoteCacheWarning
from .engine.config import Config as Config
from .engine.config import load_config as load_config
from .engine.engine import AsyncioSession as AsyncioSession
from .engine.engine import Engine as Engine
from .engine.errors import CacheBackendError as CacheBackendError
from .engine.errors import CacheError as CacheError
from .engine.errors import ConfigError as ConfigError
from .engine.errors import CycleError as CycleError
from .engine.errors import ExecutorError as ExecutorError
from .engine.errors import InvalidPathError as InvalidPathError
from .engine.errors import MissingDigestError as MissingDigestError
from .engine.errors import NoSuchQueryError as NoSuchQueryError
from .engine.errors import ProcessExecutionFailure as ProcessExecutionFailure
from .engine.errors import ProcessTimeout as ProcessTimeout
from .engine.errors import RuleDefinitionError as RuleDefinitionError
from .engine.errors import RuleGraphError as RuleGraphError
from .engine.errors import RuleworkError as RuleworkError
from .engine.errors import StoreError as StoreError
from .engine.fingerprint import FingerprintError as FingerprintError
from .engine.fingerprint import fingerprint as fingerprint
from .engine.fs import EMPTY_DIGEST as EMPTY_DIGEST
from .engine.fs import AddPrefix as AddPrefix
from .engine.fs import CreateDigest as CreateDigest
from .engine.fs import Digest as Digest
from .engine.fs import DigestContents as DigestContents
from .engine.fs import DigestEntries as DigestEntries
from .engine.fs import DigestSubset as DigestSubset
from .engine.fs import Directory as Directory
from .engine.fs import FileContent as FileContent
from .engine.fs import FileEntry as FileEntry
from .engine.fs import GlobExpansionConjunction as GlobExpansionConjunction
from .engine.fs import GlobMatchErrorBehavior as GlobMatchErrorBehavior
from .engine.fs import MergeDigests as MergeDigests
from .engine.fs import PathGlobs as PathGlobs
from .engine.fs import RemovePrefix as RemovePrefix
from .engine.fs import Snapshot as Snapshot
from .engine.graph import RuleGraph as RuleGraph
from .engine.graph import RuleGraphWarning as RuleGraphWarning
from .engine.persist import ExplainReport as ExplainReport
from .engine.persist import PersistWarning as PersistWarning
from .engine.persist import explain as explain
from .engine.process import FallibleProcessResult as FallibleProcessResult
from .engine.process import FrozenDict as FrozenDict
from .engine.process import Process as Process
from .engine.process import ProcessCacheScope as ProcessCacheScope
from .engine.process import ProcessResult as ProcessResult
from .engine.process import ProcessResultMetadata as ProcessResultMetadata
from .engine.process import ProcessSpecError as ProcessSpecError
from .engine.rules import Get as Get
from .engine.rules import MultiGet as MultiGet
from .engine.rules import QueryRule as QueryRule
from .engine.rules import UnionMembership as UnionMembership
from .engine.rules import UnionRule as UnionRule
from .engine.rules import collect_rules as collect_rules
from .engine.rules import rule as rule
from .engine.rules import rule_helper as rule_helper
from .engine.rules import union as union
from .engine.scheduler import Session as Session
from .engine.scheduler import SessionStatistics as SessionStatistics
from .engine.scheduler import Workunit as Workunit
from .engine.store import CorruptBlobWarning as CorruptBlobWarning
from .engine.store import DigestConflictError as DigestConflictError
from .engine.store import UnmatchedGlobsError as UnmatchedGlobsError
from .engine.store import UnmatchedGlobsWarning as UnmatchedGlobsWarning
from .engine.watch import WatchResult as WatchResult

__version__ = "0.1.0"

__all__ = [
    "EMPTY_DIGEST",
    "AddPrefix",
    "AsyncioSession",
    "CacheBackendError",
    "CacheError",
    "Config",
    "ConfigError",
    "CorruptBlobWarning",
    "CreateDigest",
    "CycleError",
    "Digest",
    "DigestConflictError",
    "DigestContents",
    "DigestEntries",
    "DigestSubset",
    "Directory",
    "Engine",
    "ExecutorError",
    "ExplainReport",
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
    "PersistWarning",
    "Process",
    "ProcessCacheScope",
    "ProcessExecutionFailure",
    "ProcessResult",
    "ProcessResultMetadata",
    "ProcessSpecError",
    "ProcessTimeout",
    "QueryRule",
    "RemoteCacheWarning",
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
    "UnmatchedGlobsError",
    "UnmatchedGlobsWarning",
    "WatchResult",
    "Workunit",
    "collect_rules",
    "explain",
    "fingerprint",
    "load_config",
    "rule",
    "rule_helper",
    "union",
]
