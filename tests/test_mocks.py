"""Tests for `run_rule_with_mocks` / `arun_rule_with_mocks`: one rule's body, Gets from mocks."""

from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.lowlevel

from rulework.engine.context import current_get_handler
from rulework.engine.errors import RuleDefinitionError
from rulework.engine.rules import (
    Get,
    MultiGet,
    UnionMembership,
    UnionRule,
    rule,
    rule_helper,
    union,
)
from rulework.testing._mocks import UnmockedGetError, arun_rule_with_mocks, run_rule_with_mocks


@dataclass(frozen=True)
class ImageFile:
    path: str


@dataclass(frozen=True)
class Meta:
    size: int


@dataclass(frozen=True)
class Thumbnail:
    path: str
    size: int


@dataclass(frozen=True)
class Batch:
    paths: tuple[str, ...]


@dataclass(frozen=True)
class Thumbnails:
    items: tuple[Thumbnail, ...]


@dataclass(frozen=True)
class Options:
    scale: int


@rule
async def make_thumbnail(image: ImageFile) -> Thumbnail:
    meta = await Get(Meta, ImageFile, image)
    return Thumbnail(image.path, meta.size)


@rule
async def make_all(batch: Batch) -> Thumbnails:
    thumbs = await MultiGet(Get(Thumbnail, ImageFile(p)) for p in batch.paths)
    return Thumbnails(tuple(thumbs))


def test_a_get_is_answered_by_its_mock() -> None:
    result = run_rule_with_mocks(
        make_thumbnail,
        [ImageFile("a.jpg")],
        mocks={(Meta, ImageFile): lambda image: Meta(len(image.path))},
    )
    assert result == Thumbnail("a.jpg", 5)


def test_multiget_answers_every_get_in_order() -> None:
    seen: list[str] = []

    def thumbnail(image: ImageFile) -> Thumbnail:
        seen.append(image.path)
        return Thumbnail(image.path, 1)

    result = run_rule_with_mocks(
        make_all, [Batch(("a", "b", "c"))], mocks={(Thumbnail, ImageFile): thumbnail}
    )
    assert result == Thumbnails(tuple(Thumbnail(p, 1) for p in "abc"))
    assert seen == ["a", "b", "c"]


def test_async_mocks_are_awaited_and_may_use_trio() -> None:
    async def meta(image: ImageFile) -> Meta:
        await trio.lowlevel.checkpoint()
        return Meta(7)

    result = run_rule_with_mocks(make_thumbnail, [ImageFile("x")], mocks={(Meta, ImageFile): meta})
    assert result == Thumbnail("x", 7)


@rule
async def scaled(image: ImageFile, options: Options) -> Thumbnail:
    meta = await Get(Meta, {image: ImageFile, options: Options})
    return Thumbnail(image.path, meta.size)


def test_a_get_with_several_inputs_gets_all_values_in_order() -> None:
    calls: list[tuple[Any, ...]] = []

    def meta(image: ImageFile, options: Options) -> Meta:
        calls.append((image, options))
        return Meta(options.scale)

    args = [ImageFile("a"), Options(3)]
    assert run_rule_with_mocks(
        scaled, args, mocks={(Meta, frozenset({ImageFile, Options})): meta}
    ) == Thumbnail("a", 3)
    assert run_rule_with_mocks(scaled, args, mocks={(Meta, (Options, ImageFile)): meta}) == (
        Thumbnail("a", 3)
    )
    assert calls == [(ImageFile("a"), Options(3))] * 2


@union
class Checkable:
    pass


@dataclass(frozen=True)
class PyCheck:
    name: str


@dataclass(frozen=True)
class ShellCheck:
    name: str


@rule
async def run_check(image: ImageFile) -> Meta:
    target: Any = PyCheck(image.path) if image.path.endswith(".py") else ShellCheck(image.path)
    return await Get(Meta, Checkable, target)


def test_union_gets_use_the_base_or_the_member_mock() -> None:
    by_base = {(Meta, Checkable): lambda member: Meta(1)}
    by_member = {(Meta, Checkable): lambda member: Meta(1), (Meta, PyCheck): lambda m: Meta(2)}
    assert run_rule_with_mocks(run_check, [ImageFile("a.sh")], mocks=by_base) == Meta(1)
    assert run_rule_with_mocks(run_check, [ImageFile("a.py")], mocks=by_member) == Meta(2)
    assert run_rule_with_mocks(run_check, [ImageFile("a.sh")], mocks=by_member) == Meta(1)


def test_union_membership_is_checked_when_given() -> None:
    membership = UnionMembership.from_rules([UnionRule(Checkable, PyCheck)])
    with pytest.raises(RuleDefinitionError) as exc:
        run_rule_with_mocks(
            run_check,
            [ImageFile("a.sh")],
            mocks={(Meta, Checkable): lambda m: Meta(1)},
            union_membership=membership,
        )
    assert "ShellCheck is not a member of the union Checkable" in str(exc.value)
    assert "UnionRule(Checkable, ShellCheck)" in str(exc.value)


def test_an_unmocked_get_names_the_rule_the_get_and_the_mocks() -> None:
    with pytest.raises(UnmockedGetError) as exc:
        run_rule_with_mocks(
            make_thumbnail,
            [ImageFile("a.jpg")],
            mocks={(Thumbnail, ImageFile): lambda i: Thumbnail("", 0)},
        )
    message = str(exc.value)
    assert "make_thumbnail" in message
    assert "Get(Meta, ImageFile, ImageFile(path='a.jpg'))" in message
    assert "Mocks given: (Thumbnail, ImageFile)" in message
    assert "mocks={(Meta, ImageFile): lambda ...: ...}" in message


def test_a_mock_returning_the_wrong_type_is_reported() -> None:
    with pytest.raises(RuleDefinitionError, match=r"The mock for \(Meta, ImageFile\) returned"):
        run_rule_with_mocks(
            make_thumbnail, [ImageFile("a")], mocks={(Meta, ImageFile): lambda i: "big"}
        )


def _sneaky_get(image: ImageFile) -> Get[Meta]:
    return Get(Meta, Options, Options(1))


@rule
async def undeclared(image: ImageFile) -> Meta:
    return await _sneaky_get(image)


def test_a_get_the_rule_does_not_declare_is_rejected_like_the_engine_would() -> None:
    with pytest.raises(RuleDefinitionError) as exc:
        run_rule_with_mocks(
            undeclared, [ImageFile("a")], mocks={(Meta, Options): lambda o: Meta(1)}
        )
    assert "no such Get appears in its source" in str(exc.value)
    assert "@rule_helper" in str(exc.value)


@rule_helper
async def fetch_meta(image: ImageFile) -> Meta:
    return await Get(Meta, ImageFile, image)


@rule
async def via_helper(image: ImageFile) -> Thumbnail:
    meta = await fetch_meta(image)
    return Thumbnail(image.path, meta.size)


def test_gets_in_rule_helpers_are_mocked_too() -> None:
    result = run_rule_with_mocks(
        via_helper, [ImageFile("b")], mocks={(Meta, ImageFile): lambda i: Meta(9)}
    )
    assert result == Thumbnail("b", 9)


class MetaUnavailable(Exception):
    pass


@rule
async def tolerant(image: ImageFile) -> Meta:
    try:
        return await Get(Meta, ImageFile, image)
    except MetaUnavailable:
        return Meta(-1)


def test_exceptions_from_mocks_reach_the_rule_unchanged() -> None:
    def fail(image: ImageFile) -> Meta:
        raise MetaUnavailable(image.path)

    assert run_rule_with_mocks(tolerant, [ImageFile("a")], mocks={(Meta, ImageFile): fail}) == (
        Meta(-1)
    )


@rule
async def concurrent(batch: Batch) -> Thumbnails:
    results: list[Thumbnail] = []

    async def one(path: str) -> None:
        results.append(await Get(Thumbnail, ImageFile(path)))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for path in batch.paths:
                nursery.start_soon(one, path)
    return Thumbnails(tuple(sorted(results, key=lambda t: t.path)))


def test_trio_primitives_and_child_tasks_work_inside_the_rule() -> None:
    async def thumbnail(image: ImageFile) -> Thumbnail:
        await trio.lowlevel.checkpoint()
        return Thumbnail(image.path, 2)

    result = run_rule_with_mocks(
        concurrent, [Batch(("b", "a"))], mocks={(Thumbnail, ImageFile): thumbnail}
    )
    assert result == Thumbnails((Thumbnail("a", 2), Thumbnail("b", 2)))


async def test_the_async_variant_runs_in_the_current_trio_run() -> None:
    result = await arun_rule_with_mocks(
        make_thumbnail, [ImageFile("abc")], mocks={(Meta, ImageFile): lambda i: Meta(3)}
    )
    assert result == Thumbnail("abc", 3)
    assert current_get_handler.get(None) is None  # the handler does not leak out of the run


async def test_the_sync_variant_refuses_to_nest_in_trio() -> None:
    with pytest.raises(RuntimeError, match="arun_rule_with_mocks"):
        run_rule_with_mocks(make_thumbnail, [ImageFile("a")])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "takes 1 argument (image: ImageFile); got 0"),
        ([ImageFile("a"), ImageFile("b")], "got 2"),
        (["a.jpg"], "parameter `image` should be a ImageFile; got 'a.jpg' (str)"),
    ],
)
def test_arguments_are_checked_against_the_signature(args: list[Any], fragment: str) -> None:
    with pytest.raises(RuleDefinitionError) as exc:
        run_rule_with_mocks(make_thumbnail, args, mocks={})
    assert fragment in str(exc.value)


@rule
async def wrong_result(image: ImageFile) -> Meta:
    return image  # type: ignore[return-value]


def test_a_rule_returning_the_wrong_type_is_reported() -> None:
    with pytest.raises(
        RuleDefinitionError, match=r"returned ImageFile.*return annotation says Meta"
    ):
        run_rule_with_mocks(wrong_result, [ImageFile("a")])


def test_a_non_rule_is_rejected() -> None:
    async def plain(image: ImageFile) -> Meta:
        return Meta(1)

    with pytest.raises(RuleDefinitionError, match="is not a rule: decorate"):
        run_rule_with_mocks(plain, [ImageFile("a")])
