"""Test-wide settings: every test gets its own cache directory, never the user's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Point `cache.dir` at a fresh directory so tests never touch ~/.cache/rulework."""
    path = tmp_path_factory.mktemp("rulework-cache")
    monkeypatch.setenv("RULEWORK_CACHE_DIR", str(path))
    yield path
