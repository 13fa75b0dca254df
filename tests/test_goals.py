"""`@goal`, and goal arguments parsed from a dataclass's annotated fields."""

from __future__ import annotations

import enum
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from rulework.goals import (
    GoalArgumentError,
    GoalContext,
    GoalDefinitionError,
    find_goal,
    goal,
    goal_info,
    goals_of,
)


class Speed(enum.Enum):
    SLOW = "slow"
    FAST = "fast"


@dataclass(frozen=True)
class Options:
    """Options of the demo goal.

    Attributes:
        target: what to build.
        jobs: how many at once,
            at most the CPU count.
        sizes: the sizes.
        mode: how to do it.
        speed: how fast.
        out: where to write.
        dry_run: only say what would happen.
        label: an optional label.
    """

    target: str
    jobs: int = 2
    sizes: tuple[int, ...] = (1, 2)
    mode: Literal["a", "b"] = "a"
    speed: Speed = Speed.SLOW
    out: Path = Path("out")
    dry_run: bool = False
    label: str | None = field(default=None, metadata={"help": "from metadata"})

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"--jobs must be at least 1, got {self.jobs}")


@goal
async def build(ctx: GoalContext, args: Options) -> int:
    """Build things.

    More text that --help does not show first.
    """
    return 0


@goal(name="hello-world", help="Say hello.")
async def hello(ctx: GoalContext) -> None:
    return None


def test_a_goal_keeps_its_function_and_gets_a_name_and_help() -> None:
    info = goal_info(build)
    assert info is not None
    assert (info.name, info.help, info.func) == ("build", "Build things.", build)
    assert goal_info(hello) is not None and goal_info(hello).name == "hello-world"  # type: ignore[union-attr]
    assert goal_info(len) is None


def test_every_field_kind_parses_from_the_command_line() -> None:
    info = goal_info(build)
    assert info is not None
    args = info.parse_arguments(
        [
            "app",
            "--jobs",
            "4",
            "--sizes",
            "8,16",
            "32",
            "--mode",
            "b",
            "--speed",
            "fast",
            "--out",
            "dist",
            "--dry-run",
            "--label",
            "x",
        ],
        prog="t",
    )
    assert args == Options("app", 4, (8, 16, 32), "b", Speed.FAST, Path("dist"), True, "x")


def test_defaults_are_the_dataclass_defaults() -> None:
    info = goal_info(build)
    assert info is not None
    assert info.parse_arguments(["app"], prog="t") == Options("app")


def test_help_comes_from_the_docstring_attributes_and_field_metadata(
    capsys: pytest.CaptureFixture[str],
) -> None:
    info = goal_info(build)
    assert info is not None
    with pytest.raises(SystemExit) as exit_info:
        info.parse_arguments(["--help"], prog="rulework run m.py:build")
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: rulework run m.py:build" in text
    assert "how many at once, at most the CPU count. (default: 2)" in text
    assert "(one of: slow, fast) (default: slow)" in text
    assert "from metadata" in text
    assert "--dry-run, --no-dry-run" in text
    assert "(default: 1,2)" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["app", "--jobs", "many"], "argument --jobs: expected INT, got 'many'"),
        (["app", "--mode", "c"], "invalid choice 'c' (choose from a, b)"),
        (["app", "--speed", "warp"], "invalid choice 'warp' (choose from slow, fast)"),
        ([], "the following arguments are required: TARGET"),
    ],
)
def test_malformed_arguments_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    info = goal_info(build)
    assert info is not None
    with pytest.raises(SystemExit) as exit_info:
        info.parse_arguments(argv, prog="t")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_value_the_dataclass_rejects_is_a_goal_argument_error() -> None:
    info = goal_info(build)
    assert info is not None
    with pytest.raises(GoalArgumentError, match="Invalid arguments for goal `build`: --jobs"):
        info.parse_arguments(["app", "--jobs", "0"], prog="t")


def test_a_goal_without_arguments_takes_none() -> None:
    info = goal_info(hello)
    assert info is not None
    assert info.arguments_type() is None
    assert info.parse_arguments([], prog="t") is None


def test_goal_must_be_async() -> None:
    def sync_goal(ctx: GoalContext) -> None:
        return None

    with pytest.raises(GoalDefinitionError, match="@goal decorates an `async def`"):
        goal(sync_goal)  # type: ignore[type-var]


@dataclass(frozen=True)
class Unsupported:
    mapping: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NeedsDefault:
    flag: bool


async def _takes(ctx: GoalContext, args: Unsupported) -> None:
    return None


async def _needs_default(ctx: GoalContext, args: NeedsDefault) -> None:
    return None


async def _not_a_dataclass(ctx: GoalContext, args: int) -> None:
    return None


async def _too_many(ctx: GoalContext, a: Options, b: Options) -> None:
    return None


@pytest.mark.parametrize(
    ("func", "message"),
    [
        (_takes, "`Unsupported.mapping` of type dict[str, int], which the command line cannot"),
        (_needs_default, "a bool field needs a default"),
        (_not_a_dataclass, "is annotated int, which is not a dataclass"),
        (_too_many, "takes 3 parameters"),
    ],
)
def test_malformed_goals_are_reported_with_the_fix(func: object, message: str) -> None:
    info = goal_info(goal(func))  # type: ignore[call-overload]
    assert info is not None
    with pytest.raises(GoalDefinitionError, match="Goal `") as exc_info:
        info.arguments_type()
    assert message in str(exc_info.value)
    assert "test_goals.py" in str(exc_info.value)  # where the goal is


def test_goals_of_a_module_and_lookup_by_either_spelling() -> None:
    module = types.ModuleType("fake_goals")
    build_copy = goal(_copy_function(build, "fake_goals"))
    module.build = build_copy  # type: ignore[attr-defined]
    module.imported = hello  # type: ignore[attr-defined]  # defined elsewhere: not listed
    found = goals_of(module)
    assert list(found) == ["build"]
    assert find_goal({"hello-world": goal_info(hello)}, "hello_world") is goal_info(hello)  # type: ignore[dict-item]
    assert find_goal(found, "nope") is None


def _copy_function(func: object, module: str) -> types.FunctionType:
    original: types.FunctionType = func  # type: ignore[assignment]
    copy = types.FunctionType(
        original.__code__, original.__globals__, original.__name__, original.__defaults__
    )
    copy.__module__ = module
    copy.__annotations__ = dict(original.__annotations__)
    return copy
