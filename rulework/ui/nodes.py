"""How the displays name and classify the nodes that `Workunit` events are about."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..engine import intrinsics
from ..engine.rules import rule_info
from ..engine.scheduler import Workunit

if TYPE_CHECKING:
    from ..engine.engine import Engine

_TYPE_TWICE = re.compile(r"\b(\w+)=\1\(")

NodeKind = Literal["rule", "process", "intrinsic"]

#: The intrinsic rules that run a Process.
PROCESS_RULES: frozenset[str] = frozenset(
    rule_info(r).name for r in (intrinsics.run_process, intrinsics.run_fallible_process)
)
#: Every intrinsic rule (store operations, snapshots, processes).
INTRINSIC_RULES: frozenset[str] = frozenset(rule_info(r).name for r in intrinsics.rules())


def node_kind(name: str) -> NodeKind:
    """ "process" for the Process intrinsics, "intrinsic" for the other engine-provided rules
    (snapshots, digests), "rule" for user rules."""
    if name in PROCESS_RULES:
        return "process"
    if name in INTRINSIC_RULES:
        return "intrinsic"
    return "rule"


def short_name(name: str) -> str:
    """A rule's name without its module: `pkg.mod.make_thumbnail` -> `make_thumbnail`."""
    return name.rsplit(".", 1)[-1]


def cacheable_rule_names(engine: Engine) -> frozenset[str]:
    """Names of the rules whose nodes a cache can serve: Processes and `@rule(persist=True)`."""
    persisted = {info.name for info in engine.graph.rules if getattr(info, "persist", False)}
    return PROCESS_RULES | persisted


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What an event about a Process node says about the Process.

    Attributes:
        description: the Process's `description`.
        environment: the environment it ran in (or was looked up for), when known.
        source: on "end" events: "ran", "local_cache" or "remote_cache"; None if unknown.
        duration_seconds: on "end" events: how long the process ran (for a cached result,
            how long it took when it ran: the time the cache saved).
        exit_code: on "end" events, when known.
    """

    description: str
    environment: str | None = None
    source: str | None = None
    duration_seconds: float | None = None
    exit_code: int | None = None


def process_info(unit: Workunit) -> ProcessInfo | None:
    """The Process details of an event about a Process node, else None.

    Read from `unit.metadata` (keys `description`, `environment`, `source`,
    `duration_seconds`, `exit_code`) when the engine provides them there.
    """
    if unit.name not in PROCESS_RULES:
        return None
    metadata = unit.metadata
    if metadata and "description" in metadata:
        return _from_metadata(metadata)
    return None


def _from_metadata(metadata: Mapping[str, Any]) -> ProcessInfo:
    duration = metadata.get("duration_seconds")
    exit_code = metadata.get("exit_code")
    return ProcessInfo(
        description=str(metadata["description"]),
        environment=_str_or_none(metadata.get("environment")),
        source=_str_or_none(metadata.get("source")),
        duration_seconds=float(duration) if isinstance(duration, int | float) else None,
        exit_code=exit_code if isinstance(exit_code, int) else None,
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def node_label(unit: Workunit) -> str:
    """A readable label: a Process's description, or the node's description with the rule's
    module left out (`make_thumbnail(ThumbnailRequest=...)`)."""
    info = process_info(unit)
    if info is not None:
        return info.description
    description = unit.description
    if description.startswith(unit.name):
        description = short_name(unit.name) + description[len(unit.name) :]
    # `rule(Upload=Upload(path=...))` says the type twice: `rule(Upload(path=...))`.
    return _TYPE_TWICE.sub(r"\1(", description)
