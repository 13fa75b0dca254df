"""`Engine`: the rule graph, the configuration and the services a session runs with."""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio.from_thread
import trio

from .graph import RuleGraph
from .persist import attach_persistence
from .scheduler import CompiledGraph, Session, Subscriber, open_session, unwrap_single
from .services import open_services

_T = TypeVar("_T")


class Engine:
    """Builds and validates the rule graph once, then runs requests against it.

    Args:
        rules: rules (`@rule` functions), `QueryRule`s and `UnionRule`s, e.g.
            `[*collect_rules(), QueryRule(Thumbnails, (Batch,))]`.
        config: None to discover `rulework.toml` / `[tool.rulework]` from the working directory
            upwards (defaults when there is none); a path to a TOML file; a `Config` from
            `load_config`; or a mapping with the TOML file's structure.
        root: the workspace `PathGlobs` read from (default: the current working directory).
        strict: make unreachable rules an error instead of a warning.

    Raises:
        RuleGraphError: every problem of the rule graph at once.
        ConfigError: the configuration is invalid.

    Example::

        engine = Engine([*collect_rules(), QueryRule(Thumbnails, (Batch,))])
        thumbnails = engine.run(Thumbnails, Batch(paths=("a.jpg",)))
    """

    def __init__(
        self,
        rules: Iterable[object],
        *,
        config: Any = None,
        root: str | os.PathLike[str] | None = None,
        strict: bool = False,
    ) -> None:
        from . import intrinsics
        from .config import resolve_config

        self.root = Path(root if root is not None else os.getcwd()).resolve()
        self.config = resolve_config(config, cwd=self.root)
        self.graph = RuleGraph.build(
            [*rules, *intrinsics.rules()], strict=strict, exempt=intrinsics.rules()
        )
        self._compiled = CompiledGraph(self.graph)
        attach_persistence(self._compiled, self.graph, self.config)

    @asynccontextmanager
    async def session(
        self,
        *,
        timeout_seconds: float | None = None,
        subscribers: Sequence[Subscriber] = (),
        remote_cache: bool | None = None,
        default_environment: str | None = None,
    ) -> AsyncIterator[Session]:
        """Open a session (trio): memoization scope, cache and executor connections.

        Args:
            timeout_seconds: a deadline for the whole session; `get` raises `trio.TooSlowError`
                past it.
            subscribers: callables receiving every `Workunit` event.
            remote_cache: False to neither read nor write the remote cache for this session.
            default_environment: run Processes that name no environment here instead of the
                config's `execution.default_environment`.
        """
        try:
            async with (
                open_services(
                    self.config,
                    root=self.root,
                    remote_cache=remote_cache,
                    default_environment=default_environment,
                ) as services,
                open_session(
                    self._compiled,
                    services=services,
                    timeout_seconds=timeout_seconds,
                    subscribers=subscribers,
                ) as session,
            ):
                services.attach(session)
                yield session
        except BaseExceptionGroup as group:
            # The services' nurseries wrap what the body raised; hand it back unwrapped.
            error = unwrap_single(group)
            if error is group:
                raise
            raise error from None

    def run(
        self, output_type: type[_T], *params: object, timeout_seconds: float | None = None
    ) -> _T:
        """Compute `output_type` from `params` synchronously, in a fresh session.

        Works from plain sync code (starts trio) and from a thread already running an asyncio
        event loop (runs trio in a worker thread behind an anyio blocking portal).
        """

        async def main() -> _T:
            async with self.session(timeout_seconds=timeout_seconds) as session:
                result: _T = await session.get(output_type, *params)
                return result

        if _in_async_context():
            return _run_in_portal_thread(main)
        return trio.run(main)

    def asyncio_session(self, **options: Any) -> AbstractAsyncContextManager[AsyncioSession]:
        """An awaitable session for asyncio code (FastAPI handlers, Jupyter cells).

        The engine runs on trio in its own thread behind an anyio blocking portal::

            async with engine.asyncio_session() as session:
                result = await session.get(Out, Param(...))
        """
        return _open_asyncio_session(self, options)


class AsyncioSession:
    """The asyncio side of a session running on trio in another thread."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, session: Session) -> None:
        self._portal = portal
        self._session = session

    async def get(self, output_type: type[_T], *params: object) -> _T:
        return await asyncio.to_thread(self._portal.call, self._session.get, output_type, *params)

    async def get_many(
        self, output_type: type[_T], param_sets: Iterable[Sequence[object]]
    ) -> tuple[_T, ...]:
        sets = [tuple(p) for p in param_sets]
        return await asyncio.to_thread(self._portal.call, self._session.get_many, output_type, sets)


@asynccontextmanager
async def _open_asyncio_session(
    engine: Engine, options: Mapping[str, Any]
) -> AsyncIterator[AsyncioSession]:
    portal_cm = anyio.from_thread.start_blocking_portal(backend="trio")
    portal = await asyncio.to_thread(portal_cm.__enter__)
    try:
        session_cm = portal.wrap_async_context_manager(engine.session(**options))
        session = await asyncio.to_thread(session_cm.__enter__)
        try:
            yield AsyncioSession(portal, session)
        finally:
            await asyncio.to_thread(session_cm.__exit__, None, None, None)
    finally:
        await asyncio.to_thread(portal_cm.__exit__, None, None, None)


def _in_async_context() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return True
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def _run_in_portal_thread(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run `main` on trio in a new thread, blocking the calling thread until it is done."""
    result: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            with anyio.from_thread.start_blocking_portal(backend="trio") as portal:
                result.append(portal.call(main))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="rulework-engine", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


_ = math
