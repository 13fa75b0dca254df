"""Both examples end to end, through the `rulework` command (in-process)."""

from __future__ import annotations

import io
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from rulework.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "examples" / "images"
BUILD = REPO / "examples" / "build"

REJECTED = {
    "empty.png": "the file is empty (0 bytes)",
    "notes.jpg": "not an image: Pillow recognises no image format in it",
    "truncated.jpg": "truncated or corrupt JPEG data: image file is truncated",
}
ACCEPTED = ("beach.jpg", "chart.gif", "logo.png", "mountain.webp", "portrait.jpg")


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cache_line(err: str) -> str:
    match = re.search(r"^  cache      (.*)$", err, re.MULTILINE)
    assert match is not None, err
    return match.group(1)


# ----------------------------------------------------------------------------------------------
# examples/images


def test_the_sample_uploads_are_what_make_samples_generates() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from examples.images import make_samples
    finally:
        sys.path.remove(str(REPO))
    generated = make_samples.samples()
    shipped = {p.name: p.read_bytes() for p in (IMAGES / "uploads").iterdir()}
    assert sorted(shipped) == sorted(generated)
    assert all(len(content) < 8 * 1024 for content in shipped.values())  # a few KB each
    assert shipped["empty.png"] == generated["empty.png"] == b""
    assert shipped["notes.jpg"] == generated["notes.jpg"]
    # Encoders may differ between Pillow builds: compare what the images are, not their bytes.
    for name in ACCEPTED:
        with (
            Image.open(IMAGES / "uploads" / name) as ours,
            Image.open(io.BytesIO(generated[name])) as theirs,
        ):
            assert (ours.format, ours.size, ours.mode) == (theirs.format, theirs.size, theirs.mode)


def ingest(
    capsys: pytest.CaptureFixture[str], uploads: Path, out: Path, *extra: str
) -> tuple[int, str, str]:
    return cli(
        capsys,
        "run",
        "--root",
        str(uploads.parent),
        str(IMAGES / "workflow.py") + ":ingest",
        "--uploads",
        str(uploads),
        "--out",
        str(out),
        *extra,
    )


def test_images_ingest_then_a_second_run_is_served_from_the_cache(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uploads = workspace / "uploads"
    shutil.copytree(IMAGES / "uploads", uploads)
    out = workspace / "out"

    code, stdout, err = ingest(capsys, uploads, out)
    assert code == EXIT_OK, err
    for name, reason in REJECTED.items():
        assert f"rejected  uploads/{name}: {reason}" in stdout
    for name in ACCEPTED:
        assert re.search(rf"^ok        uploads/{re.escape(name)}: ", stdout, re.MULTILINE)
    assert (
        "ok        uploads/beach.jpg: JPEG 360x240, taken 2024:07:14 16:02:11, camera Acme Snap 3; thumbnails 64x43 128x85 256x171"
        in stdout
    )
    assert "5 images recorded" in stdout and "3 rejected" in stdout
    # 8 validations, 5 metadata, 15 thumbnails: all computed.
    assert cache_line(err) == "0 of 28 cacheable nodes served from cache"

    with sqlite3.connect(out / "images.sqlite3") as db:
        rows = dict(db.execute("SELECT path, format FROM images").fetchall())
        rejected = dict(db.execute("SELECT path, reason FROM rejected_uploads").fetchall())
    assert rows == {
        "uploads/beach.jpg": "JPEG",
        "uploads/chart.gif": "GIF",
        "uploads/logo.png": "PNG",
        "uploads/mountain.webp": "WEBP",
        "uploads/portrait.jpg": "JPEG",
    }
    assert {p.removeprefix("uploads/") for p in rejected} == set(REJECTED)
    # The portrait is stored sideways with an EXIF rotation: thumbnails come out upright.
    with Image.open(out / "thumbnails" / "portrait.jpg" / "128.png") as thumbnail:
        assert thumbnail.size == (85, 128)
    assert sum(p.is_file() for p in (out / "thumbnails").rglob("*")) == 15

    code, stdout_again, err = ingest(capsys, uploads, out)
    assert code == EXIT_OK
    assert stdout_again == stdout
    assert cache_line(err) == "all 28 cacheable nodes served from cache (local 28)"

    # A new upload is the only work done.
    shutil.copy(uploads / "logo.png", uploads / "logo-copy.png")
    code, stdout, err = ingest(capsys, uploads, out, "--strict")
    assert code == EXIT_FAILURE  # --strict: some uploads were rejected
    assert "ok        uploads/logo-copy.png: PNG 256x256" in stdout
    # Its validation, metadata and 3 thumbnails are the only misses.
    assert cache_line(err) == "28 of 33 cacheable nodes served from cache (local 28)"


def test_images_resized_by_processes_are_cached_like_any_process(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uploads = workspace / "uploads"
    uploads.mkdir()
    for name in ("beach.jpg", "logo.png", "notes.jpg"):
        shutil.copy(IMAGES / "uploads" / name, uploads / name)
    out = workspace / "out"
    code, stdout, err = ingest(capsys, uploads, out, "--resize", "process", "--sizes", "48")
    assert code == EXIT_OK, err
    assert (
        "ok        uploads/beach.jpg: JPEG 360x240, taken 2024:07:14 16:02:11, camera Acme Snap 3; thumbnails 48x32"
        in stdout
    )
    assert "ran     process  resize uploads/logo.png to 48px (" in err
    assert "processes  2 ran" in err
    with Image.open(out / "thumbnails" / "logo.png" / "48.png") as thumbnail:
        assert thumbnail.size == (48, 48)

    # The in-process and the Process resize make the same bytes.
    code, _, err = ingest(capsys, uploads, workspace / "out2", "--sizes", "48")
    assert code == EXIT_OK
    for name in ("beach.jpg", "logo.png"):
        path = Path("thumbnails") / name / "48.png"
        assert (out / path).read_bytes() == (workspace / "out2" / path).read_bytes()


def test_a_failed_run_leaves_the_database_untouched(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uploads = workspace / "uploads"
    uploads.mkdir()
    shutil.copy(IMAGES / "uploads" / "chart.gif", uploads / "chart.gif")
    out = workspace / "out"
    code, _, err = ingest(
        capsys, uploads, out, "--resize", "process", "--python", "/nonexistent/python3"
    )
    assert code == EXIT_FAILURE
    assert "resize uploads/chart.gif to" in err
    assert not (out / "images.sqlite3").exists()

    assert ingest(capsys, uploads, out, "--sizes", "32")[0] == EXIT_OK
    before = (out / "images.sqlite3").read_bytes()
    shutil.copy(IMAGES / "uploads" / "logo.png", uploads / "logo.png")
    code, _, _ = ingest(
        capsys, uploads, out, "--resize", "process", "--python", "/nonexistent/python3"
    )
    assert code == EXIT_FAILURE
    assert (out / "images.sqlite3").read_bytes() == before


def test_images_reports_an_upload_directory_outside_the_workspace(
    workspace: Path, capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    code, _, err = cli(
        capsys, "run", str(IMAGES / "workflow.py") + ":ingest", "--uploads", str(elsewhere)
    )
    assert code == EXIT_USAGE
    assert "is outside the workspace root" in err and "pass --root" in err
    code, _, err = cli(
        capsys, "run", str(IMAGES / "workflow.py") + ":ingest", "--uploads", "nowhere"
    )
    assert code == EXIT_USAGE
    assert "the upload directory nowhere does not exist" in err


def test_python_dash_m_examples_images_is_the_same_goal() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.images", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: rulework run examples.images.workflow:ingest" in result.stdout


# ----------------------------------------------------------------------------------------------
# examples/build


def test_build_runs_each_test_file_in_its_own_process_and_reruns_only_what_changed(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = workspace / "project"
    shutil.copytree(BUILD / "project", project)
    target = str(BUILD / "workflow.py") + ":test"

    code, out, err = cli(capsys, "run", target, "--project", str(project), "--verbose")
    assert code == EXIT_OK, out + err
    assert "PASS  tests/test_stats.py: 3 passed" in out
    # Only what the test imports is in its sandbox (found by reading imports).
    assert "sandbox: calc/__init__.py, calc/arith.py, calc/stats.py, tests/test_stats.py" in out
    assert "sandbox: calc/__init__.py, calc/text.py, tests/test_text.py" in out
    assert "3 of 3 test files passed; 3 ran, 0 served from cache" in out
    assert "processes  3 ran" in err

    code, out, err = cli(capsys, "run", target, "--project", str(project))
    assert code == EXIT_OK
    assert "3 of 3 test files passed; 0 ran, 3 served from cache" in out
    assert cache_line(err) == "all 3 cacheable nodes served from cache (local 3)"

    # Break calc/text.py: only its test file re-runs, and the failure is shown.
    text = project / "calc" / "text.py"
    text.write_text(text.read_text().replace(":.1f}%", ":.2f}%"))
    code, out, err = cli(capsys, "run", target, "--project", str(project))
    assert code == EXIT_FAILURE
    assert "FAIL  tests/test_text.py: 1 passed, 1 failed" in out
    assert "assert '33.33%' == '33.3%'" in out
    assert "PASS  tests/test_arith.py: 2 passed" in out and "local cache)" in out
    assert "2 of 3 test files passed; 1 ran, 2 served from cache" in out
    assert "ran     process  pytest tests/test_text.py" in err
    assert "pytest tests/test_arith.py" not in err.replace(
        "cached  process  pytest tests/test_arith.py", ""
    )
