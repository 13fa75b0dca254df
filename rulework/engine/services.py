"""What a session runs with: the store, the cache layer and the process runner, from config."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .cache import CacheLayer, open_cache_layer
from .config import Config
from .errors import ConfigError
from .fs import PathGlobs, Snapshot
from .process import FallibleProcessResult, Process, ProcessResult, ProcessRunner
from .registry import cache_backend_class, create_executors
from .scheduler import current_node
from .store import Store

if TYPE_CHECKING:
    from ..abc import CacheBackend
    from .scheduler import Session

_CLOSE_TIMEOUT = 30.0


class Services:
    """The session's view of the store, caches and executors, used by the intrinsics."""

    def __init__(
        self,
        config: Config,
        root: Path,
        store: Store,
        cache: CacheLayer,
        processes: ProcessRunner,
    ) -> None:
        self.config = config
        self.root = root
        self.store = store
        self.cache = cache
        self.processes = processes
        self.session: Session | None = None

    def attach(self, session: Session) -> None:
        self.session = session

    async def snapshot(self, globs: PathGlobs) -> Snapshot:
        return await self.store.snapshot(self.root, globs)

    async def run_process(self, process: Process) -> FallibleProcessResult:
        result = await self.processes.run(process)
        self._count(result.metadata.source)
        return result

    async def run_process_checked(self, process: Process) -> ProcessResult:
        result = await self.processes.run_checked(process)
        self._count(result.metadata.source)
        return result

    def _count(self, source: str) -> None:
        if source != "ran" and self.session is not None:
            self.session.record_cache_hit(source)
            current_node().cache_source = source


def create_cache_backend(name: str, config: Config) -> CacheBackend:
    """Construct (not open) the cache backend `name` with its settings from `config`.

    Backends that keep files take the cache directory as a second argument `directory`.
    """
    cls: Any = cache_backend_class(name)
    settings = config.cache.settings(name)
    parameters = inspect.signature(cls).parameters
    if "directory" in parameters:
        backend: CacheBackend = cls(settings, directory=Path(config.cache.dir) / name)
    else:
        backend = cls(settings)
    return backend


async def _open_backend(backend: Any) -> None:
    opener = getattr(backend, "open", None)
    if opener is not None:
        await opener()


@asynccontextmanager
async def open_services(
    config: Config,
    *,
    root: Path,
    remote_cache: bool | None = None,
    default_environment: str | None = None,
) -> AsyncIterator[Services]:
    """Open the backends `config` selects, and close them all (shielded) on the way out."""
    environment = default_environment or config.execution.default_environment
    if environment not in config.environments:
        configured = ", ".join(sorted(config.environments))
        raise ConfigError(
            "the session options",
            [
                (
                    "execution.default_environment",
                    f"unknown environment {environment!r}; configured: {configured}",
                )
            ],
        )
    async with AsyncExitStack() as stack:
        local = remote = None
        if config.cache.local != "none":
            local = create_cache_backend(config.cache.local, config)
            stack.push_async_callback(_close_shielded, local)
            await _open_backend(local)
        use_remote = config.cache.remote != "none" and remote_cache is not False
        if use_remote:
            remote = create_cache_backend(config.cache.remote, config)
            stack.push_async_callback(_close_shielded, remote)
            await _open_backend(remote)
        layer = await stack.enter_async_context(open_cache_layer(local, remote))
        stat_cache = None
        if config.cache.local != "none":
            # Lets a new process re-snapshot an unchanged workspace without rehashing it.
            stat_cache = Path(config.cache.dir) / "stat-cache.json"
        store = Store(layer.local_blobs, stat_cache_path=stat_cache)
        layer.use_store(store)
        stack.push_async_callback(_close_shielded, store)
        executors = create_executors(config.environments)
        runner = ProcessRunner(executors, environment, store, layer, salt=config.cache.salt)
        stack.push_async_callback(_close_shielded, runner)
        # Closed first (the stack unwinds in reverse): waits for the cache writes in flight.
        runner.write_in_background(await stack.enter_async_context(trio.open_nursery()))
        # Runs before the nursery is waited for: the background writer drains and returns.
        stack.callback(runner.stop_writing_in_background)
        yield Services(config, root, store, layer, runner)


async def _close_shielded(resource: Any) -> None:
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + _CLOSE_TIMEOUT
        await resource.aclose()
