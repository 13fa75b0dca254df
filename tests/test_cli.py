"""The `rulework` command: exit codes and messages for every kind of mistake, and each command.

The command runs in-process (`rulework.cli.main(argv)`), on modules written into a temporary
workspace; each test has its own cache directory (tests/conftest.py).
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rulework.cli import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_MODULE,
    EXIT_OK,
    EXIT_RULES,
    EXIT_USAGE,
    main,
)

HEADER = """\
from dataclasses import dataclass

import trio

from rulework import Get, Process, ProcessResult, QueryRule, collect_rules, rule
from rulework.goals import GoalContext, goal


@dataclass(frozen=True)
class Person:
    name: str


@dataclass(frozen=True)
class Greeting:
    text: str
"""

GREET = (
    HEADER
    + '''

@rule
async def greet_person(person: Person) -> Greeting:
    result = await Get(
        ProcessResult,
        Process(
            ("/bin/sh", "-c", 'printf "Hello, %s" "$1"', "sh", person.name),
            description=f"greet {person.name}",
        ),
    )
    return Greeting(result.stdout.decode())


def rules():
    return [*collect_rules(), QueryRule(Greeting, (Person,))]


@dataclass(frozen=True)
class GreetArgs:
    """Arguments of greet.

    Attributes:
        name: who to greet.
        times: how many times.
    """

    name: str
    times: int = 1


@goal
async def greet(ctx: GoalContext, args: GreetArgs) -> int:
    """Greet someone."""
    greeting = await ctx.session.get(Greeting, Person(args.name))
    for _ in range(args.times):
        ctx.print(greeting.text)
    return 0
'''
)


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary working directory; modules imported from it are forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if file.startswith(str(tmp_path)):
            del sys.modules[name]


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------------------------
# rulework run


def test_run_prints_the_goal_output_and_a_summary_then_serves_from_cache(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, out, err = cli(capsys, "run", "wf.py:greet", "Ada", "--times", "2")
    assert code == EXIT_OK, err
    assert out == "Hello, Ada\nHello, Ada\n"
    assert "ran     process  greet Ada (" in err
    assert "greet: finished in" in err
    assert "0 of 1 cacheable nodes served from cache" in err
    assert "processes  1 ran" in err

    code, out, err = cli(capsys, "run", "wf.py:greet", "Ada")
    assert code == EXIT_OK
    assert out == "Hello, Ada\n"
    assert "cached  process  greet Ada (local cache)" in err
    assert "the one cacheable node was served from cache (local 1)" in err
    assert "processes  0 ran, 1 from cache, saving" in err


def test_a_module_with_one_goal_needs_no_goal_name(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, out, _ = cli(capsys, "run", "-q", "wf.py", "Bo")
    assert (code, out) == (EXIT_OK, "Hello, Bo\n")


def test_quiet_prints_nothing_but_the_goal_output(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    assert cli(capsys, "run", "--quiet", "wf.py:greet", "Cy") == (EXIT_OK, "Hello, Cy\n", "")


def test_options_may_come_before_the_subcommand(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, out, _ = cli(capsys, "--set", "cache.local=memory", "run", "-q", "wf.py:greet", "Di")
    assert (code, out) == (EXIT_OK, "Hello, Di\n")


def test_modules_load_by_dotted_name_and_from_packages_with_relative_imports(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "dotted_wf.py", GREET)
    assert cli(capsys, "run", "-q", "dotted_wf:greet", "Ed")[:2] == (EXIT_OK, "Hello, Ed\n")
    write(workspace, "pkg/__init__.py", "")
    write(workspace, "pkg/texts.py", "SUFFIX = '!'\n")
    write(
        workspace,
        "pkg/wf.py",
        GREET.replace("ctx.print(greeting.text)", "ctx.print(greeting.text + SUFFIX)")
        + "\nfrom .texts import SUFFIX\n",
    )
    assert cli(capsys, "run", "-q", "pkg/wf.py:greet", "Flo")[:2] == (EXIT_OK, "Hello, Flo!\n")


def test_the_goal_help_lists_its_arguments(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, out, _ = cli(capsys, "run", "wf.py:greet", "--help")
    assert code == EXIT_OK
    assert "usage: rulework run wf.py:greet [-h] [--times INT] NAME" in out
    assert "who to greet" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "missing.py:greet"], "cannot load 'missing.py': no such file"),
        (["run", "no_such_module_xyz:greet"], "no module named 'no_such_module_xyz'"),
        (["run", "."], "it is a directory"),
        (["check", "missing.py"], "cannot load 'missing.py': no such file"),
    ],
)
def test_a_missing_module_exits_4_with_a_message(
    argv: list[str], message: str, workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, *argv)
    assert code == EXIT_MODULE
    assert message in err
    assert "Traceback" not in err


def test_a_module_that_fails_to_import_shows_where_in_the_users_code(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "deps.py", "import os\nimport not_a_real_package_for_rulework_tests\n")
    code, _, err = cli(capsys, "run", "deps.py")
    assert code == EXIT_MODULE
    assert (
        "importing 'deps.py' failed: No module named 'not_a_real_package_for_rulework_tests'" in err
    )
    assert "which is not installed in this Python" in err
    assert 'deps.py", line 2, in <module>' in err
    assert "importlib" not in err and "rulework/cli.py" not in err

    write(workspace, "boom.py", "X = 1\nraise RuntimeError('settings are missing')\n")
    code, _, err = cli(capsys, "run", "boom.py")
    assert code == EXIT_MODULE
    assert "RuntimeError: settings are missing" in err
    assert 'boom.py", line 2' in err

    write(workspace, "syntax.py", "def broken(:\n    pass\n")
    code, _, err = cli(capsys, "check", "syntax.py")
    assert code == EXIT_MODULE
    assert "SyntaxError" in err and "syntax.py" in err


def test_a_bad_goal_name_exits_2_and_suggests(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, _, err = cli(capsys, "run", "wf.py:gret", "Ada")
    assert code == EXIT_USAGE
    assert "wf.py has no goal named 'gret'. Did you mean 'greet'? Goals defined there: greet" in err

    write(
        workspace,
        "two.py",
        GREET + "\n\n@goal\nasync def other(ctx: GoalContext) -> None:\n    pass\n",
    )
    code, _, err = cli(capsys, "run", "two.py")
    assert code == EXIT_USAGE
    assert "two.py defines several goals (greet, other); name one: rulework run two.py:GOAL" in err

    write(workspace, "none.py", HEADER)
    code, _, err = cli(capsys, "run", "none.py")
    assert code == EXIT_USAGE
    assert "none.py defines no goals" in err


def test_bad_goal_arguments_exit_2(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(workspace, "wf.py", GREET)
    code, _, err = cli(capsys, "run", "wf.py:greet", "Ada", "--times", "often")
    assert code == EXIT_USAGE
    assert "argument --times: expected INT, got 'often'" in err
    code, _, err = cli(capsys, "run", "wf.py:greet")
    assert code == EXIT_USAGE
    assert "the following arguments are required: NAME" in err


def test_a_bad_config_exits_3_naming_the_file_and_every_key(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    write(
        workspace,
        "rulework.toml",
        """\
        [cache]
        local = "sqlit"

        [environments.local]
        parallelism = "2"
        """,
    )
    code, _, err = cli(capsys, "run", "wf.py:greet", "Ada")
    assert code == EXIT_CONFIG
    assert f"Invalid rulework configuration in {workspace / 'rulework.toml'} (2 problems)" in err
    assert re.search(
        r"unknown cache backend 'sqlit'; .*did you mean 'sqlite'\?.* @ cache\.local", err
    )
    assert "expected an integer, found string '2' @ environments.local.parallelism" in err
    assert "Traceback" not in err

    code, _, err = cli(capsys, "run", "--config", "elsewhere.toml", "wf.py:greet", "Ada")
    assert code == EXIT_CONFIG
    assert "elsewhere.toml" in err and "does not exist" in err


def test_an_unknown_environment_exits_3(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, _, err = cli(capsys, "run", "--env", "gpu", "wf.py:greet", "Ada")
    assert code == EXIT_CONFIG
    assert "no environment named 'gpu' is configured" in err
    assert "(set by override execution.default_environment=gpu)" in err


GRAPH_ERROR = (
    HEADER
    + """

@dataclass(frozen=True)
class Stamp:
    value: str


@rule
async def needs_stamp(person: Person, stamp: Stamp) -> Greeting:
    return Greeting(person.name + stamp.value)


def rules():
    return [needs_stamp, QueryRule(Greeting, (Person,))]


@goal
async def main(ctx: GoalContext) -> None:
    await ctx.session.get(Greeting, Person("x"))
"""
)


def test_a_rule_graph_error_exits_5_with_the_graph_message(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GRAPH_ERROR)
    for argv in (["run", "wf.py"], ["check", "wf.py"], ["graph", "wf.py"]):
        code, _, err = cli(capsys, *argv)
        assert code == EXIT_RULES
        assert "The rule graph has 1 problem" in err
        assert "No rule can compute `Stamp`" in err
        assert "Traceback" not in err


def test_a_malformed_rule_exits_5(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(
        workspace,
        "wf.py",
        HEADER + "\n\n@rule\ndef not_async(person: Person) -> Greeting:\n    return Greeting('')\n",
    )
    code, _, err = cli(capsys, "check", "wf.py")
    assert code == EXIT_RULES
    assert "not_async" in err and "async def" in err
    assert "Traceback" not in err


def test_a_failing_rule_exits_1_with_the_engine_traceback_and_the_users_frames(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workspace,
        "wf.py",
        HEADER
        + """

@rule
async def explode(person: Person) -> Greeting:
    raise ValueError(f"cannot greet {person.name}")


def rules():
    return [explode, QueryRule(Greeting, (Person,))]


@goal
async def main(ctx: GoalContext) -> None:
    await ctx.session.get(Greeting, Person("Bob"))
""",
    )
    code, _, err = cli(capsys, "run", "wf.py")
    assert code == EXIT_FAILURE
    assert "rulework: error: ValueError: cannot greet Bob" in err
    assert (
        "Engine traceback (outermost rule first):\n  in wf.explode(Person=Person(name='Bob'))"
        in err
    )
    assert re.search(r'wf\.py", line \d+, in explode', err)
    assert "rulework/engine" not in err and "trio" not in err
    assert "main: FAILED in" in err
    assert "1 failed" in err

    code, _, err = cli(capsys, "run", "--traceback", "wf.py")
    assert code == EXIT_FAILURE
    assert "rulework/engine/scheduler.py" in err  # the whole traceback, on request


def test_a_failing_process_exits_1_with_its_stderr(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workspace,
        "wf.py",
        HEADER
        + """

@rule
async def fail(person: Person) -> Greeting:
    await Get(
        ProcessResult,
        Process(("/bin/sh", "-c", "echo 'disk full' >&2; exit 3"), description="write report"),
    )
    return Greeting("")


def rules():
    return [fail, QueryRule(Greeting, (Person,))]


@goal
async def main(ctx: GoalContext) -> None:
    await ctx.session.get(Greeting, Person("Bob"))
""",
    )
    code, _, err = cli(capsys, "run", "wf.py")
    assert code == EXIT_FAILURE
    assert "Process 'write report' failed with exit code 3 in environment 'local'" in err
    assert "disk full" in err
    assert "FAILED  process  write report" in err
    assert "Traceback" not in err


def test_the_goal_exit_code_is_the_commands(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workspace,
        "wf.py",
        HEADER
        + """

@goal
async def seven(ctx: GoalContext) -> int:
    return 7


@goal
async def wrong(ctx: GoalContext) -> str:
    return "yes"


@goal
async def slow(ctx: GoalContext) -> None:
    await trio.sleep(60)
""",
    )
    assert cli(capsys, "run", "-q", "wf.py:seven")[0] == 7
    code, _, err = cli(capsys, "run", "wf.py:wrong")
    assert code == EXIT_FAILURE
    assert "goal 'wrong' returned 'yes'; a goal returns an exit code (int) or None" in err
    code, _, err = cli(capsys, "run", "--timeout", "0.1", "wf.py:slow")
    assert code == EXIT_FAILURE
    assert "the run took longer than --timeout 0.1 seconds" in err


def test_trace_writes_one_complete_event_per_node(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, _, err = cli(capsys, "run", "--trace", "out/trace.json", "wf.py:greet", "Ada")
    assert code == EXIT_OK
    completed = int(re.search(r"nodes\s+(\d+) completed", err).group(1))  # type: ignore[union-attr]
    document = json.loads((workspace / "out" / "trace.json").read_text())
    events = [e for e in document["traceEvents"] if e["ph"] == "X"]
    assert len(events) == completed
    assert f"trace: {completed} nodes written to" in err
    process = next(e for e in events if e["cat"] == "process")
    assert process["name"] == "greet Ada"
    assert process["args"]["cache"] == "miss"


# ----------------------------------------------------------------------------------------------
# check, graph, config


def test_check_reports_the_graph_and_the_goals(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", GREET)
    code, out, err = cli(capsys, "check", "wf.py")
    assert code == EXIT_OK, err
    assert out.startswith("wf.py: the rule graph is valid: 1 rules, 1 queries, ")
    assert "  query  QueryRule(Greeting, (Person,))" in out
    assert "  goal   greet  (Greet someone.)" in out


def test_check_warns_about_unreachable_rules_and_fails_on_them_when_strict(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = (
        GREET
        + "\n\n@rule\nasync def orphan(greeting: Greeting) -> Person:\n    return Person('')\n"
    )
    write(workspace, "wf.py", unreachable)
    code, _, err = cli(capsys, "check", "wf.py")
    assert code == EXIT_OK
    assert "rulework: warning: 1 rule is not reachable" in err
    assert "orphan" in err
    code, _, err = cli(capsys, "check", "--strict", "wf.py")
    assert code == EXIT_RULES
    assert "orphan" in err


def test_check_rejects_a_goal_whose_arguments_cannot_be_parsed(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workspace,
        "wf.py",
        HEADER
        + """

@dataclass(frozen=True)
class Args:
    weights: dict[str, int]


@goal
async def main(ctx: GoalContext, args: Args) -> None:
    pass
""",
    )
    code, _, err = cli(capsys, "check", "wf.py")
    assert code == EXIT_RULES
    assert "Goal `main`" in err and "`Args.weights` of type dict[str, int]" in err


def test_graph_prints_dot_or_mermaid(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(workspace, "wf.py", GREET)
    code, out, _ = cli(capsys, "graph", "wf.py")
    assert code == EXIT_OK
    assert out.startswith("digraph rulework {") and "greet_person" in out
    code, out, _ = cli(capsys, "graph", "wf.py", "--format", "mermaid", "-o", "g.mmd")
    assert (code, out) == (EXIT_OK, "")
    assert (workspace / "g.mmd").read_text().startswith("flowchart LR")


def test_config_shows_each_value_and_where_it_came_from(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "rulework.toml", "[environments.local]\nparallelism = 3\n")
    code, out, _ = cli(capsys, "config", "--set", "cache.salt=v2", "--no-remote-cache")
    assert code == EXIT_OK
    source = workspace / "rulework.toml"
    assert out.startswith(f"# configuration from {source}\n")
    assert f"environments.local.parallelism = 3  # {source}" in out
    assert 'cache.salt = "v2"  # override cache.salt=v2' in out
    assert 'cache.remote = "none"  # override cache.remote=none' in out
    assert 'execution.default_environment = "local"  # default' in out


# ----------------------------------------------------------------------------------------------
# rulework cache ...

BIG = GREET.replace(
    "('/bin/sh', '-c', 'printf \"Hello, %s\" \"$1\"', 'sh', person.name)", ""
).replace(
    '("/bin/sh", "-c", \'printf "Hello, %s" "$1"\', "sh", person.name)',
    '("/bin/sh", "-c", \'head -c 200000 /dev/zero; printf "Hello, %s" "$1"\', "sh", person.name)',
)


def test_cache_stats_gc_and_verify(
    workspace: Path, capsys: pytest.CaptureFixture[str], _isolated_cache_dir: Path
) -> None:
    write(workspace, "wf.py", BIG)
    assert cli(capsys, "run", "-q", "wf.py:greet", "Ada")[0] == EXIT_OK

    code, out, _ = cli(capsys, "cache", "stats")
    assert code == EXIT_OK
    assert "local cache:  sqlite (default)" in out
    assert f"directory   {_isolated_cache_dir / 'sqlite'}" in out
    size = re.search(r"size        ([\d.]+) KiB of 10.0 GiB", out)
    assert size is not None and float(size.group(1)) > 190  # the 200 kB stdout

    code, out, _ = cli(capsys, "cache", "verify")
    assert (code, out.splitlines()[-1]) == (EXIT_OK, "the cache is consistent")

    # Damage the large blob on disk: verify finds it, evicts it, and says so.
    blob = max((_isolated_cache_dir / "sqlite" / "blobs").rglob("*"), key=_size)
    blob.chmod(0o644)
    blob.write_bytes(b"x" * _size(blob))
    code, out, _ = cli(capsys, "cache", "verify")
    assert code == EXIT_FAILURE
    assert "1 corrupt blobs evicted" in out

    code, out, _ = cli(capsys, "cache", "gc", "--target-size", "0")
    assert code == EXIT_OK
    match = re.search(r"removed (\d+) action entries and (\d+) blobs: .* -> 0 B", out)
    assert match is not None and int(match.group(1)) >= 1
    code, _, err = cli(capsys, "run", "wf.py:greet", "Ada")
    assert code == EXIT_OK
    assert "processes  1 ran" in err  # nothing left to serve it


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1


def test_cache_commands_explain_what_a_backend_cannot_do(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, "cache", "gc", "--set", "cache.local=memory")
    assert code == EXIT_USAGE
    assert "the 'memory' cache backend has no garbage collection" in err
    code, _, err = cli(capsys, "cache", "verify", "--set", "cache.local=none")
    assert code == EXIT_CONFIG
    assert 'no local cache is configured (cache.local = "none")' in err
    code, _, err = cli(capsys, "cache", "gc", "--target-size", "lots")
    assert code == EXIT_USAGE
    assert "expected a size such as 500000, 500M or 2GiB" in err


PERSISTED = (
    HEADER
    + """

@rule(persist=True)
async def polite(person: Person) -> Greeting:
    return Greeting("Good day, " + person.name)


def rules():
    return [polite, QueryRule(Greeting, (Person,))]


@goal
async def main(ctx: GoalContext) -> None:
    ctx.print((await ctx.session.get(Greeting, Person("Ada"))).text)
"""
)


def test_cache_explain_runs_the_goal_and_explains_each_persisted_node(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(workspace, "wf.py", PERSISTED)
    code, out, _ = cli(capsys, "cache", "explain", "wf.py:main")
    assert code == EXIT_OK
    assert out.startswith("Good day, Ada\ncache explain: Greeting from (Person(name='Ada'))")
    assert "miss" in out and "no previous run recorded" in out
    code, out, _ = cli(capsys, "cache", "explain", "wf.py")
    assert code == EXIT_OK
    assert "hit (local_cache)" in out
    assert "1 persisted node: 1 hit, 0 misses, 0 uncacheable" in out


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys)
    assert code == EXIT_USAGE
    assert "usage: rulework" in err
    code, out, _ = cli(capsys, "--version")
    assert code == EXIT_OK and out.startswith("rulework ")


WATCHED = """\
from dataclasses import dataclass

from rulework import Digest, DigestContents, Get, PathGlobs, QueryRule, Snapshot, collect_rules, rule
from rulework.goals import GoalContext, goal


@dataclass(frozen=True)
class Notes:
    glob: str


@dataclass(frozen=True)
class Words:
    count: int


@rule
async def count_words(notes: Notes) -> Words:
    snapshot = await Get(Snapshot, PathGlobs([notes.glob]))
    contents = await Get(DigestContents, Digest, snapshot.digest)
    return Words(sum(len(fc.content.split()) for fc in contents))


def rules():
    return [*collect_rules(), QueryRule(Words, (Notes,))]


@goal
async def words(ctx: GoalContext) -> int:
    result = await ctx.session.get(Words, Notes("notes/*.txt"))
    ctx.print(f"words: {result.count}")
    return 0
"""


def test_an_interrupt_grouped_with_other_exits_is_still_an_interrupt(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(
        workspace,
        "wf.py",
        """\
        from rulework.goals import GoalContext, goal


        def rules():
            return []


        @goal
        async def stop(ctx: GoalContext) -> int:
            raise BaseExceptionGroup(
                "closing", [KeyboardInterrupt(), RuntimeError("the watcher thread stopped")]
            )
        """,
    )
    code, _, err = cli(capsys, "run", "--progress", "none", "wf.py")
    assert code == 130
    assert "interrupted" in err
    assert "Traceback" not in err


def test_watch_reruns_the_goal_when_an_input_changes_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    import os
    import signal
    import subprocess
    import threading
    import time

    workspace = tmp_path / "ws"  # the cache lives outside the watched tree
    write(workspace, "wf.py", WATCHED)
    write(workspace, "notes/a.txt", "one two three\n")
    env = {**os.environ, "RULEWORK_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "rulework.cli", "run", "--progress", "none", "--watch", "wf.py"],
        cwd=workspace,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    seen = threading.Condition()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with seen:
                lines.append(line.rstrip("\n"))
                seen.notify_all()

    def wait_for(text: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        with seen:
            while not any(text in line for line in lines):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                seen.wait(left)
        return True

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert wait_for("words: 3"), lines
        assert wait_for("watching"), lines
        (workspace / "notes" / "b.txt").write_text("four five\n")
        assert wait_for("re-ran"), lines
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130, lines
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    runs = [line for line in lines if line.startswith("words:")]
    assert runs[:2] == ["words: 3", "words: 5"]
    assert "changed: notes/b.txt" in lines, lines
