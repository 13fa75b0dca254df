"""The `rulework` command.

    rulework run MODULE[:GOAL] [GOAL ARGS...]   run a goal (see `rulework.goals`)
    rulework check MODULE                        validate a module's rule graph
    rulework graph MODULE --format dot|mermaid   print the rule graph
    rulework cache stats|gc|verify               inspect and maintain the local cache
    rulework cache explain MODULE:GOAL [ARGS]    why persisted nodes hit or missed
    rulework config                              the effective configuration, with origins

MODULE is a Python file (`examples/images/workflow.py`) or an importable module name
(`examples.images.workflow`). Options of rulework itself go before MODULE; what follows
MODULE:GOAL belongs to the goal (`rulework run --trace t.json wf.py:ingest --sizes 64`).

Exit codes: 0 success; 1 the goal failed (a rule raised, a process failed, the goal returned
1); 2 a command-line mistake (unknown option, no such goal, bad goal arguments); 3 an invalid
configuration; 4 the module cannot be found or imported; 5 invalid rules (a rule definition or
rule graph error); 130 interrupted. A goal may return any other code itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import re
import sys
import time
import traceback
import types
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import trio

from . import __version__
from .engine.config import Config, load_config
from .engine.engine import Engine
from .engine.errors import ConfigError, RuleDefinitionError, RuleGraphError, RuleworkError
from .engine.graph import RuleGraphWarning
from .engine.rules import collect_rules
from .engine.scheduler import Session, Subscriber, unwrap_single
from .engine.watch import relative_path
from .goals import GoalArgumentError, GoalContext, GoalInfo, find_goal, goals_of
from .ui import PlainProgress, SummaryCollector, TraceRecorder, cacheable_rule_names
from .ui.nodes import INTRINSIC_RULES
from .ui.summary import render_summary

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_MODULE = 4
EXIT_RULES = 5
EXIT_INTERRUPTED = 130

_PROG = "rulework"
_RULEWORK_DIR = Path(__file__).resolve().parent


class CommandError(Exception):
    """A mistake the command reports with a message and an exit code, without a traceback."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `rulework` command with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return _exit_code(exc)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return handler(args)
    except CommandError as exc:
        _error(exc.message)
        return exc.exit_code
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except (RuleDefinitionError, RuleGraphError) as exc:
        _error(_with_notes(exc))
        return EXIT_RULES
    except KeyboardInterrupt:
        _error("interrupted")
        return EXIT_INTERRUPTED


# ----------------------------------------------------------------------------------------------
# The command line


def _common_options(*, suppress: bool) -> argparse.ArgumentParser:
    """Options accepted both before and after the subcommand.

    The copy on each subcommand has SUPPRESS defaults, so that an option given before the
    subcommand is not reset by the subcommand's parser.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("configuration")
    group.add_argument(
        "--config",
        metavar="FILE",
        default=default(None),
        help="the config file (default: rulework.toml or [tool.rulework] in pyproject.toml, "
        "from the working directory upwards; else built-in defaults)",
    )
    group.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=default([]),
        help="override one config key, e.g. --set environments.local.parallelism=2 (repeatable)",
    )
    group.add_argument(
        "--env",
        metavar="NAME",
        default=default(None),
        help="run Processes that name no environment in environment NAME "
        "(overrides execution.default_environment)",
    )
    group.add_argument(
        "--no-remote-cache",
        action="store_true",
        default=default(False),
        help="neither read nor write the remote cache",
    )
    group.add_argument(
        "--root",
        metavar="DIR",
        default=default(None),
        help="the workspace root that rules read files from (default: the working directory)",
    )
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Run and inspect rulework workflows.",
        parents=[_common_options(suppress=False)],
        epilog="Exit codes: 0 ok, 1 the goal failed, 2 usage, 3 config, 4 module, 5 rules, "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"rulework {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = [_common_options(suppress=True)]

    run = sub.add_parser(
        "run",
        parents=common,
        help="run a goal defined in a module",
        description="Run a goal: `rulework run MODULE[:GOAL] [GOAL ARGS...]`. Options of "
        "rulework go before MODULE; everything after it goes to the goal "
        "(`rulework run wf.py:ingest --help` shows the goal's own options).",
    )
    run.add_argument("target", metavar="MODULE[:GOAL]")
    run.add_argument("goal_args", nargs=argparse.REMAINDER, metavar="GOAL ARGS")
    output = run.add_argument_group("output")
    output.add_argument(
        "--trace",
        metavar="FILE",
        help="write a Chrome trace-event JSON of every node (open it in Perfetto or "
        "chrome://tracing)",
    )
    output.add_argument(
        "-q", "--quiet", action="store_true", help="no progress and no summary; errors only"
    )
    output.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every finished node, not only processes, persisted rules and failures",
    )
    output.add_argument(
        "--progress",
        choices=("auto", "live", "plain", "none"),
        default="auto",
        help="live: a display redrawn in place (needs rich and a terminal); plain: log lines; "
        "auto: live on a terminal, else plain (default)",
    )
    output.add_argument(
        "--traceback",
        action="store_true",
        help="show the full Python traceback when the goal fails",
    )
    run.add_argument(
        "--timeout", metavar="SECONDS", type=float, help="give up after this many seconds"
    )
    run.add_argument(
        "--watch",
        action="store_true",
        help="after the run, watch the workspace and re-run the goal whenever files it read "
        "change (only what changed re-runs); Ctrl-C stops",
    )
    run.set_defaults(handler=_cmd_run)

    check = sub.add_parser(
        "check",
        parents=common,
        help="validate a module's rules and goals",
        description="Build the module's rule graph and report every problem; also checks "
        "that each goal's arguments can be given on the command line.",
    )
    check.add_argument("module", metavar="MODULE")
    check.add_argument(
        "--strict", action="store_true", help="treat rules no query can reach as errors"
    )
    check.set_defaults(handler=_cmd_check)

    graph = sub.add_parser(
        "graph",
        parents=common,
        help="print a module's rule graph",
        description="Print the solved rule graph as Graphviz DOT or a Mermaid flowchart.",
    )
    graph.add_argument("module", metavar="MODULE")
    graph.add_argument("--format", choices=("dot", "mermaid"), default="dot")
    graph.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    graph.set_defaults(handler=_cmd_graph)

    cache = sub.add_parser(
        "cache",
        parents=common,
        help="inspect and maintain the caches",
        description="Inspect and maintain the configured local cache.",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    stats = cache_sub.add_parser("stats", parents=common, help="where the caches are, how big")
    stats.set_defaults(handler=_cmd_cache_stats)
    gc = cache_sub.add_parser(
        "gc",
        parents=common,
        help="remove least recently used entries",
        description="Remove least recently used entries until the local cache is under a "
        "size (default: 90%% of its max_bytes).",
    )
    gc.add_argument(
        "--target-size",
        metavar="SIZE",
        type=_parse_size,
        help="shrink to at most SIZE (bytes, or with a unit: 500M, 2G, 1GiB)",
    )
    gc.add_argument(
        "--min-age",
        metavar="SECONDS",
        type=float,
        default=0.0,
        help="keep entries used in the last SECONDS (protects concurrent runs)",
    )
    gc.set_defaults(handler=_cmd_cache_gc)
    verify = cache_sub.add_parser(
        "verify",
        parents=common,
        help="re-hash every blob, repair what is wrong",
        description="Re-hash every blob of the local cache; evict corrupt ones and tidy "
        "leftovers of interrupted writes. Exits with 1 if anything was wrong.",
    )
    verify.set_defaults(handler=_cmd_cache_verify)
    explain = cache_sub.add_parser(
        "explain",
        parents=common,
        help="why persisted nodes hit or missed",
        description="Run a goal (MODULE:GOAL [GOAL ARGS]) and show, for each request it makes, "
        "every persisted node it visited: whether the cache served it and, for a miss, which "
        "part of its key changed since the last recorded run (the code of which rule, which "
        "param, the version, the salt).",
    )
    explain.add_argument("target", metavar="MODULE[:GOAL]")
    explain.add_argument("query_args", nargs=argparse.REMAINDER, metavar="ARGS")
    explain.set_defaults(handler=_cmd_cache_explain)
    cache.set_defaults(handler=lambda _args: _usage(cache))

    config = sub.add_parser(
        "config",
        parents=common,
        help="show the effective configuration",
        description="Every configuration key with its effective value and where it came "
        "from (the file, an environment variable, a command-line override, or the default).",
    )
    config.set_defaults(handler=_cmd_config)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def _parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 500000, 500M or 2GiB, got {text!r}"
        )
    number, unit, _ = match.groups()
    scale = 1024 ** ("KMGT".index(unit.upper()) + 1) if unit else 1
    return int(float(number) * scale)


# ----------------------------------------------------------------------------------------------
# Shared steps: configuration, modules, engines


def _root(args: argparse.Namespace) -> Path:
    root = Path(args.root) if getattr(args, "root", None) else Path.cwd()
    if not root.is_dir():
        raise CommandError(f"--root {args.root!r} is not a directory", EXIT_USAGE)
    return root.resolve()


def _load_config(args: argparse.Namespace, root: Path) -> Config:
    overrides = list(getattr(args, "set", None) or [])
    for item in overrides:
        if "=" not in item:
            raise CommandError(
                f"--set {item!r}: expected KEY=VALUE, e.g. --set cache.local=memory", EXIT_USAGE
            )
    if getattr(args, "env", None):
        overrides.append(f"execution.default_environment={args.env}")
    if getattr(args, "no_remote_cache", False):
        overrides.append("cache.remote=none")
    return load_config(getattr(args, "config", None), cwd=root, overrides=overrides)


def load_module(reference: str) -> types.ModuleType:
    """Import the module a command names: a `.py` file path or a dotted module name.

    A file inside packages (directories with `__init__.py`) is imported under its full dotted
    name, with the directory above its top package on `sys.path`, so that its relative
    imports work; a dotted name is looked up from the working directory too (like
    `python -m`).

    Raises:
        CommandError: (exit code 4) the module does not exist or fails to import.
        RuleDefinitionError: a rule in it is malformed.
    """
    path = Path(reference)
    if path.is_dir():
        raise CommandError(
            f"cannot load {reference!r}: it is a directory; name the .py file that defines "
            "the rules and goals",
            EXIT_MODULE,
        )
    if reference.endswith(".py") or "/" in reference or os.sep in reference:
        if not path.is_file():
            raise CommandError(f"cannot load {reference!r}: no such file", EXIT_MODULE)
        return _import_file(path.resolve(), reference)
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", reference):
        raise CommandError(
            f"cannot load {reference!r}: not a file path (ending in .py) nor a module name "
            "(like examples.images.workflow)",
            EXIT_MODULE,
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return _import_name(reference, reference)


def _import_file(path: Path, reference: str) -> types.ModuleType:
    parts = [path.stem]
    directory = path.parent
    while (directory / "__init__.py").is_file():
        parts.insert(0, directory.name)
        directory = directory.parent
    name = ".".join(parts)
    loaded = sys.modules.get(name)
    if loaded is not None:
        if _same_file(getattr(loaded, "__file__", None), path):
            return loaded
        # Another file of the same module name was loaded before (tests do this): forget it.
        del sys.modules[name]
    search = str(directory)
    if search not in sys.path:
        sys.path.insert(0, search)
    if len(parts) > 1:
        _import_name(".".join(parts[:-1]), reference)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CommandError(f"cannot load {reference!r}: not a Python module", EXIT_MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        _raise_import_failure(exc, reference)
    return module


def _import_name(name: str, reference: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise CommandError(
                f"cannot load {reference!r}: no module named {missing!r} (searched the working "
                "directory and sys.path; a file path must end in .py)",
                EXIT_MODULE,
            ) from None
        _raise_import_failure(exc, reference)
    except BaseException as exc:
        _raise_import_failure(exc, reference)


def _raise_import_failure(exc: BaseException, reference: str) -> NoReturn:
    if isinstance(exc, RuleDefinitionError | KeyboardInterrupt | SystemExit):
        raise exc
    if not isinstance(exc, Exception):
        raise exc
    if isinstance(exc, ModuleNotFoundError):
        hint = (
            f" The module imports {exc.name!r}, which is not installed in this Python "
            f"({sys.executable}); install it (for the examples: pip install 'rulework[examples]')."
        )
        raise CommandError(
            f"importing {reference!r} failed: {exc}.{hint}\n{_user_traceback(exc)}",
            EXIT_MODULE,
        ) from None
    if isinstance(exc, SyntaxError):
        detail = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
        raise CommandError(f"importing {reference!r} failed:\n{detail}", EXIT_MODULE) from None
    raise CommandError(
        f"importing {reference!r} failed: {type(exc).__name__}: {exc}\n{_user_traceback(exc)}",
        EXIT_MODULE,
    ) from None


def _same_file(a: str | None, b: Path) -> bool:
    if a is None:
        return False
    try:
        return Path(a).resolve() == b
    except OSError:
        return False


def _module_rules(module: types.ModuleType, reference: str) -> list[object]:
    """The module's rules: its `rules()` (or `rules` list), else its @rule functions."""
    factory = getattr(module, "rules", None)
    if factory is None:
        return list(collect_rules(module))
    try:
        produced = factory() if callable(factory) else factory
        return list(produced)
    except (RuleDefinitionError, RuleGraphError):
        raise
    except Exception as exc:  # a bug in the user's rules(): show where
        raise CommandError(
            f"{reference}: rules() failed: {type(exc).__name__}: {exc}\n{_user_traceback(exc)}",
            EXIT_MODULE,
        ) from None


def _build_engine(
    module: types.ModuleType,
    reference: str,
    config: Config,
    root: Path,
    *,
    strict: bool = False,
    warn: Callable[[str], None],
) -> Engine:
    rules = _module_rules(module, reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuleGraphWarning)
        engine = Engine(rules, config=config, root=root, strict=strict)
    for warning in caught:
        if issubclass(warning.category, RuleGraphWarning):
            warn(str(warning.message))
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return engine


def _split_target(target: str) -> tuple[str, str | None]:
    module, sep, name = target.rpartition(":")
    if not sep or not module:
        return target, None
    return module, name or None


def _pick_goal(module: types.ModuleType, reference: str, name: str | None) -> GoalInfo:
    goals = goals_of(module)
    listing = ", ".join(goals) or "(none)"
    if name is None:
        if len(goals) == 1:
            return next(iter(goals.values()))
        if not goals:
            raise CommandError(
                f"{reference} defines no goals; decorate an `async def main(ctx: GoalContext)` "
                "with @goal (from rulework.goals) to make one",
                EXIT_USAGE,
            )
        raise CommandError(
            f"{reference} defines several goals ({listing}); name one: "
            f"rulework run {reference}:GOAL",
            EXIT_USAGE,
        )
    found = find_goal(goals, name)
    if found is None:
        close = difflib.get_close_matches(name, list(goals), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise CommandError(
            f"{reference} has no goal named {name!r}.{hint} Goals defined there: {listing}",
            EXIT_USAGE,
        )
    return found


# ----------------------------------------------------------------------------------------------
# rulework run


def _cmd_run(args: argparse.Namespace) -> int:
    root = _root(args)
    config = _load_config(args, root)
    reference, goal_name = _split_target(args.target)
    module = load_module(reference)
    goal = _pick_goal(module, reference, goal_name)
    goal.arguments_type()  # a malformed goal is reported before anything runs
    try:
        goal_args = goal.parse_arguments(args.goal_args, prog=f"{_PROG} run {args.target}")
    except SystemExit as exc:  # argparse: --help, or a usage error it already printed
        return _exit_code(exc)
    except GoalArgumentError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    quiet: bool = args.quiet
    engine = _build_engine(
        module, reference, config, root, warn=lambda text: _warn(text) if not quiet else None
    )
    return _Run(engine, goal, goal_args, args).execute()


class _Run:
    """One `rulework run`: the session, its subscribers, the goal, the summary, the trace."""

    def __init__(
        self, engine: Engine, goal: GoalInfo, goal_args: Any, args: argparse.Namespace
    ) -> None:
        self.engine = engine
        self.goal = goal
        self.goal_args = goal_args
        self.args = args
        self.cacheable = cacheable_rule_names(engine)
        self.summary = SummaryCollector(cacheable=self.cacheable)
        self.trace = TraceRecorder(cacheable=self.cacheable) if args.trace else None
        self.statistics: Any = None

    def execute(self) -> int:
        mode = self._progress_mode()
        subscribers: list[Subscriber] = [self.summary]
        if self.trace is not None:
            subscribers.append(self.trace)
        started = time.perf_counter()
        code: int = EXIT_FAILURE
        try:
            if mode == "live":
                code = self._execute_live(subscribers, started)
            else:
                if mode == "plain":
                    subscribers.append(
                        PlainProgress(
                            sys.stderr, cacheable=self.cacheable, verbose=self.args.verbose
                        )
                    )
                code = self._execute(subscribers, started, sys.stderr)
        finally:
            if self.trace is not None:
                path = self.trace.write(self.args.trace)
                if not self.args.quiet:
                    print(
                        f"trace: {len(self.trace)} nodes written to {path} "
                        "(open it in Perfetto or chrome://tracing)",
                        file=sys.stderr,
                    )
        return code

    def _progress_mode(self) -> str:
        mode: str = self.args.progress
        if self.args.quiet:
            return "none"
        if mode in ("auto", "live"):
            usable = _rich_available()
            terminal = (
                sys.stderr.isatty() and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
            )
            if mode == "live" and not usable:
                _warn("the live display needs rich (pip install 'rulework[ui]'); logging lines")
            if usable and (terminal or mode == "live"):
                return "live"
            return "plain"
        return mode

    def _execute_live(self, subscribers: list[Subscriber], started: float) -> int:
        from rich.console import Console

        from .ui.rich_progress import RichProgress

        console = Console(file=sys.stderr)
        display = RichProgress(console, title=self.goal.name, cacheable=self.cacheable)
        with display.live():
            code = self._execute([*subscribers, display], started, None)
        self._print_summary(started, code, sys.stderr)
        return code

    def _execute(self, subscribers: list[Subscriber], started: float, out: TextIO | None) -> int:
        try:
            code = trio.run(self._main, subscribers)
        except KeyboardInterrupt:
            _error("interrupted")
            code = EXIT_INTERRUPTED
        except BaseExceptionGroup as group:
            # Ctrl-C lands in whichever task is running at that instant; tasks ending at the
            # same time (a file watcher's thread, a task group closing) can group it with
            # their own exits. It is still the user's interrupt.
            if group.subgroup(KeyboardInterrupt) is None:
                raise
            _error("interrupted")
            code = EXIT_INTERRUPTED
        except GoalArgumentError as exc:
            _error(str(exc))
            code = EXIT_USAGE
        except trio.TooSlowError:
            _error(f"the run took longer than --timeout {self.args.timeout:g} seconds")
            code = EXIT_FAILURE
        except Exception as exc:  # rulework errors and bugs in rules: reported, not raised
            _error(self._describe_failure(exc))
            code = EXIT_FAILURE
        if out is not None:
            self._print_summary(started, code, out)
        return code

    async def _main(self, subscribers: list[Subscriber]) -> int:
        async with self.engine.session(subscribers=subscribers) as session:
            code = await self._run_goal(session)
            if self.args.watch:
                await self._watch(session)
        return code

    async def _watch(self, session: Session) -> None:
        """Re-run the goal in the same session after each batch of relevant file changes."""
        try:
            import watchfiles
        except ImportError:
            raise CommandError(
                "--watch needs the watchfiles package: pip install 'rulework[watch]'", EXIT_USAGE
            ) from None
        root = self.engine.root
        session.collect_garbage()
        stop = trio.Event()  # stops watchfiles' thread at its next step when we leave
        watching = False
        try:
            # With yield_on_timeout, the first (empty) batch says the watcher is in place.
            async for changes in watchfiles.awatch(
                root,
                stop_event=stop,
                debounce=1600,
                step=100,
                rust_timeout=300,
                yield_on_timeout=True,
            ):
                if not watching:
                    watching = True
                    _print_line(f"watching {root} for changes (Ctrl-C to stop)")
                if not changes:
                    continue
                changed = sorted({relative_path(path, root) for _, path in changes})
                # Files nothing read (e.g. the goal's own outputs) dirty nothing: no re-run.
                if not session.invalidate_paths(changed):
                    continue
                before = session.statistics().nodes_rerun
                shown = ", ".join(changed[:3]) + (
                    f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
                )
                _print_line(f"changed: {shown}")
                try:
                    code = await self._run_goal(session)
                except Exception as exc:  # reported; watching goes on
                    _error(self._describe_failure(exc))
                    code = EXIT_FAILURE
                reran = session.statistics().nodes_rerun - before
                session.collect_garbage()
                _print_line(
                    f"re-ran {reran} node{'s' if reran != 1 else ''}; goal "
                    f"{'succeeded' if code == EXIT_OK else f'failed (exit {code})'}; watching"
                )
        finally:
            stop.set()

    async def _run_goal(self, session: Session) -> int:
        timeout = self.args.timeout
        try:
            # The deadline covers the goal's own code too, not only its requests.
            with trio.fail_after(timeout if timeout is not None else math.inf):
                context = GoalContext(self.engine, session, _print_line)
                if self.goal_args is None:
                    result = await self.goal.func(context)
                else:
                    result = await self.goal.func(context, self.goal_args)
        finally:
            self.statistics = session.statistics()
        if result is None:
            return EXIT_OK
        if isinstance(result, bool) or not isinstance(result, int):
            raise CommandError(
                f"goal {self.goal.name!r} returned {result!r}; a goal returns an exit code "
                "(int) or None",
                EXIT_FAILURE,
            )
        return result

    def _print_summary(self, started: float, code: int, out: TextIO) -> None:
        if self.args.quiet or code == EXIT_USAGE:
            return
        lines = render_summary(
            self.summary.summary(self.statistics),
            title=self.goal.name,
            elapsed_seconds=time.perf_counter() - started,
            ok=code == EXIT_OK,
        )
        out.write("\n".join(lines) + "\n")
        out.flush()

    def _describe_failure(self, exc: BaseException) -> str:
        exc = unwrap_single(exc)
        if isinstance(exc, CommandError):
            return exc.message
        if self.args.traceback:
            return "".join(traceback.format_exception(exc)).rstrip()
        if isinstance(exc, RuleworkError):
            return _with_notes(exc)
        # Not a rulework error: a bug in a rule or the goal. Show where, in the user's code.
        return f"{type(exc).__name__}: {_with_notes(exc)}\n{_user_traceback(exc)}".rstrip()


def _print_line(text: str) -> None:
    # sys.stdout is looked up at each call: the live display redirects it while it is shown.
    print(text, flush=True)


def _rich_available() -> bool:
    return importlib.util.find_spec("rich") is not None


# ----------------------------------------------------------------------------------------------
# rulework check / graph


def _cmd_check(args: argparse.Namespace) -> int:
    root = _root(args)
    config = _load_config(args, root)
    module = load_module(args.module)
    goals = goals_of(module)
    for goal in goals.values():
        goal.arguments_type()
    warnings_seen: list[str] = []
    engine = _build_engine(
        module, args.module, config, root, strict=args.strict, warn=warnings_seen.append
    )
    for text in warnings_seen:
        _warn(text)
    graph = engine.graph
    user_rules = [
        info for info in graph.rules if not info.builtin and info.name not in INTRINSIC_RULES
    ]
    print(
        f"{args.module}: the rule graph is valid: {len(user_rules)} rules, "
        f"{len(graph.queries)} queries, {len(graph.nodes())} nodes"
    )
    for query in graph.queries:
        print(f"  query  {query!r}")
    for goal in goals.values():
        print(f"  goal   {goal.name}" + (f"  ({goal.help})" if goal.help else ""))
    return EXIT_OK


def _cmd_graph(args: argparse.Namespace) -> int:
    root = _root(args)
    config = _load_config(args, root)
    module = load_module(args.module)
    engine = _build_engine(module, args.module, config, root, warn=_warn)
    text = engine.graph.to_dot() if args.format == "dot" else engine.graph.to_mermaid()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# rulework cache ...


@contextlib.asynccontextmanager
async def _open_local_cache(config: Config) -> AsyncIterator[Any]:
    from .engine.services import create_cache_backend

    name = config.cache.local
    if name == "none":
        raise CommandError(
            'no local cache is configured (cache.local = "none"); set cache.local to "sqlite" '
            "to keep results between runs",
            EXIT_CONFIG,
        )
    backend = create_cache_backend(name, config)
    opener = getattr(backend, "open", None)
    if opener is not None:
        await opener()
    try:
        yield backend
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + 30
            await backend.aclose()


def _format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cache_location(config: Config) -> str:
    return str(Path(config.cache.dir) / config.cache.local)


def _cmd_cache_stats(args: argparse.Namespace) -> int:
    config = _load_config(args, _root(args))

    async def stats() -> None:
        name = config.cache.local
        print(
            f"local cache:  {name}"
            + ("" if name == "none" else f" ({config.origin('cache.local')})")
        )
        if name != "none":
            print(f"  directory   {_cache_location(config)}")
            async with _open_local_cache(config) as backend:
                total_bytes = getattr(backend, "total_bytes", None)
                if total_bytes is None:
                    print(f"  size        not reported by the {name!r} backend")
                else:
                    total = await total_bytes()
                    limit = getattr(getattr(backend, "config", None), "max_bytes", None)
                    line = f"  size        {_format_bytes(total)}"
                    if limit:
                        line += f" of {_format_bytes(limit)} ({100 * total / limit:.1f}%)"
                    print(line)
        remote = config.cache.remote
        print(f"remote cache: {remote}")
        if remote != "none":
            settings = config.cache.settings(remote)
            if dataclasses.is_dataclass(settings):
                for field in dataclasses.fields(settings):
                    print(f"  {field.name:<11} {getattr(settings, field.name)!r}")

    trio.run(stats)
    return EXIT_OK


def _cmd_cache_gc(args: argparse.Namespace) -> int:
    config = _load_config(args, _root(args))

    async def gc() -> int:
        async with _open_local_cache(config) as backend:
            collect = getattr(backend, "gc", None)
            if collect is None:
                raise CommandError(
                    f"the {config.cache.local!r} cache backend has no garbage collection",
                    EXIT_USAGE,
                )
            report = await collect(target_bytes=args.target_size, min_age_seconds=args.min_age)
        print(
            f"removed {report.actions_removed} action entries and {report.blobs_removed} blobs: "
            f"{_format_bytes(report.bytes_before)} -> {_format_bytes(report.bytes_after)}"
        )
        if not report.complete:
            print(
                "stopped early: what is left was used more recently than --min-age "
                "(or the time budget ran out)"
            )
        return EXIT_OK

    return trio.run(gc)


def _cmd_cache_verify(args: argparse.Namespace) -> int:
    config = _load_config(args, _root(args))

    async def verify() -> int:
        async with _open_local_cache(config) as backend:
            check = getattr(backend, "verify", None)
            if check is None:
                raise CommandError(
                    f"the {config.cache.local!r} cache backend cannot be verified", EXIT_USAGE
                )
            report = await check()
        print(
            f"checked {report.blobs_checked} blobs ({_format_bytes(report.bytes_checked)}) in "
            f"{_cache_location(config)}"
        )
        problems = [
            (len(report.corrupt), "corrupt blobs evicted"),
            (len(report.missing_files), "index entries whose file was gone, removed"),
            (report.orphans_adopted, "complete files without an index entry, adopted"),
            (report.orphans_removed, "stray files removed"),
            (report.temp_files_removed, "stale temporary files removed"),
        ]
        for count, what in problems:
            if count:
                print(f"  {count} {what}")
        for problem in report.database_problems:
            print(f"  database: {problem}")
        if report.ok:
            print("the cache is consistent")
            return EXIT_OK
        print("problems were found (and repaired as listed)")
        return EXIT_FAILURE

    return trio.run(verify)


def _cmd_cache_explain(args: argparse.Namespace) -> int:
    """`cache explain MODULE:GOAL [ARGS]`: run the goal; explain every request it makes."""
    from .engine.persist import explain

    root = _root(args)
    config = _load_config(args, root)
    reference, goal_name = _split_target(args.target)
    module = load_module(reference)
    goal = _pick_goal(module, reference, goal_name)
    try:
        goal_args = goal.parse_arguments(
            args.query_args, prog=f"{_PROG} cache explain {args.target}"
        )
    except SystemExit as exc:
        return _exit_code(exc)
    except GoalArgumentError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    engine = _build_engine(module, reference, config, root, warn=_warn)
    reports: list[str] = []

    class ExplainingSession:
        """The goal's session: each `get` is run through `explain` first."""

        def __init__(self, session: Any) -> None:
            self._session = session

        async def get(self, output_type: type[Any], *params: object) -> Any:
            report = await explain(self._session, output_type, *params)
            reports.append(report.render())
            # Computed (or served) by `explain` just now: this is a memo hit.
            return await self._session.get(output_type, *params)

        async def get_many(
            self, output_type: type[Any], param_sets: Iterable[Sequence[object]]
        ) -> tuple[Any, ...]:
            return tuple([await self.get(output_type, *params) for params in param_sets])

        def __getattr__(self, name: str) -> Any:
            return getattr(self._session, name)

    async def main() -> int:
        async with engine.session() as session:
            context = GoalContext(engine, ExplainingSession(session), _print_line)  # type: ignore[arg-type]
            if goal_args is None:
                result = await goal.func(context)
            else:
                result = await goal.func(context, goal_args)
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    try:
        code = trio.run(main)
    except GoalArgumentError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    except Exception as exc:  # the goal failed: report it with whatever was explained
        for text in reports:
            print(text)
        raise CommandError(_with_notes(exc), EXIT_FAILURE) from None
    for text in reports:
        print(text)
    return code


# ----------------------------------------------------------------------------------------------
# rulework config


def _cmd_config(args: argparse.Namespace) -> int:
    config = _load_config(args, _root(args))
    print(f"# configuration from {config.source}")
    for line in config.describe():
        print(line)
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# Messages


def _error(message: str) -> None:
    print(f"{_PROG}: error: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"{_PROG}: warning: {message}", file=sys.stderr, flush=True)


def _with_notes(exc: BaseException) -> str:
    notes = getattr(exc, "__notes__", None) or []
    return "\n".join([str(exc), *notes])


def _user_traceback(exc: BaseException) -> str:
    """The traceback of `exc` without the frames of rulework, trio and the import machinery:
    what is left is the user's code, where the mistake is."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not _is_internal(frame.filename)
    ]
    if not frames:
        return ""
    return (
        "Traceback (your code, most recent call last):\n"
        + "".join(traceback.format_list(frames)).rstrip()
    )


def _is_internal(filename: str) -> bool:
    if filename.startswith("<frozen importlib"):
        return True
    try:
        path = Path(filename).resolve()
    except OSError:
        return False
    if path.is_relative_to(_RULEWORK_DIR):
        return True
    return any(part in ("trio", "anyio", "_pytest", "pluggy") for part in path.parts[-3:-1])


if __name__ == "__main__":  # pragma: no cover - `python -m rulework.cli`
    raise SystemExit(main())
