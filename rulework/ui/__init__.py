"""What the `rulework` command shows while and after it runs: all `Workunit` subscribers.

- `PlainProgress`: one log line per finished node worth reporting (for logs and CI).
- `RichProgress` (in `rulework.ui.rich_progress`, needs `pip install 'rulework[ui]'`): a live
  display of the running rules and processes, for terminals.
- `TraceRecorder`: a Chrome trace-event JSON file (Perfetto, chrome://tracing).
- `SummaryCollector` / `RunSummary` / `render_summary`: the numbers printed at the end.

Each is a plain callable taking a `Workunit`, so any of them can be passed to
`Engine.session(subscribers=[...])` from user code too.
"""

from __future__ import annotations

from .nodes import NodeKind, ProcessInfo, cacheable_rule_names, node_kind, node_label, process_info
from .plain import PlainProgress
from .summary import RunSummary, SummaryCollector, render_summary
from .trace import TraceRecorder

__all__ = [
    "NodeKind",
    "PlainProgress",
    "ProcessInfo",
    "RunSummary",
    "SummaryCollector",
    "TraceRecorder",
    "cacheable_rule_names",
    "node_kind",
    "node_label",
    "process_info",
    "render_summary",
]
