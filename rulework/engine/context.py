"""The link between an awaited `Get`/`MultiGet` and whoever runs the rule.

The scheduler runs each rule body in its own trio task and sets `current_get_handler` in that
task's context; `rulework.testing.run_rule_with_mocks` sets a handler that answers from mocks.
`Get.__await__` and `MultiGet.__await__` only look the handler up and delegate to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .rules import Get


class GetHandler(Protocol):
    """Answers the Gets of the rule running in the current task."""

    async def get(self, get: Get[Any]) -> Any: ...

    async def multi_get(self, gets: Sequence[Get[Any]]) -> tuple[Any, ...]: ...


current_get_handler: ContextVar[GetHandler] = ContextVar("rulework_get_handler")


def get_handler_or_raise(what: str) -> GetHandler:
    try:
        return current_get_handler.get()
    except LookupError:
        raise RuntimeError(
            f"{what} was awaited outside a rule run by the rulework engine. Gets only work "
            "inside a @rule (or a @rule_helper called by one) that the engine runs; to test a "
            "rule on its own use rulework.testing.run_rule_with_mocks."
        ) from None
