"""REAPI (Bazel Remote Execution API v2) backends: remote execution and a remote cache.

- `ReapiExecutor` (`kind = "reapi"` environments): runs Processes on a REAPI server.
- `ReapiCache` (`remote = "reapi"`): the server's ActionCache + CAS as rulework's remote cache.

Both need `pip install 'rulework[reapi]'` (grpcio, protobuf). The gRPC stubs are generated
code kept in `_generated/` (see `_generated/_regenerate.py`), registered in a private
descriptor pool, and only imported when a REAPI backend is selected.
"""

from .cache import ReapiCache, ReapiCacheConfig, ReapiCacheError
from .executor import (
    ReapiExecutor,
    ReapiExecutorConfig,
    ReapiExecutorError,
    ReapiExecutorStatistics,
)

__all__ = [
    "ReapiCache",
    "ReapiCacheConfig",
    "ReapiCacheError",
    "ReapiExecutor",
    "ReapiExecutorConfig",
    "ReapiExecutorError",
    "ReapiExecutorStatistics",
]
