"""The image-upload workflow: validate each upload, read its metadata, make thumbnails, and
record every image in a SQLite database.

    rulework run examples/images/workflow.py:ingest                   # the sample uploads
    rulework run examples/images/workflow.py:ingest --resize process  # resize in sandboxed Processes
    rulework run examples/images/workflow.py:ingest --help

The rules are pure: they read uploads through the engine (`PathGlobs`, digests) and return
values; nothing is written until every rule has finished. Then the goal writes the thumbnails
and commits all database rows in one transaction, so a failed run leaves the database as it
was. Per-image work is persisted (`@rule(persist=True)`) and keyed by the image's content, so
a second run is served from the cache, and a new or changed upload is the only work done.

A bad upload is not an error of the workflow: its validation says why it was rejected, the
other images complete, and the report lists it.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import trio

from examples.images import imaging
from rulework import (
    CreateDigest,
    Digest,
    DigestContents,
    DigestEntries,
    FileContent,
    FileEntry,
    Get,
    MultiGet,
    PathGlobs,
    Process,
    ProcessResult,
    QueryRule,
    Snapshot,
    collect_rules,
    rule,
    rule_helper,
)
from rulework.goals import GoalArgumentError, GoalContext, goal

HERE = Path(__file__).resolve().parent
#: The resize Process runs this very file's sibling as a script (see imaging.py).
IMAGING_SCRIPT = (HERE / "imaging.py").read_bytes()

ThumbnailFormat = Literal["PNG", "JPEG", "WEBP"]


class ResizeMethod(enum.Enum):
    """Where thumbnails are computed."""

    #: Inside the rule, with Pillow, in rulework's own process (a worker thread).
    IN_PROCESS = "in-process"
    #: In a sandboxed Process per thumbnail: cached like any Process, and it runs wherever the
    #: config's default environment says (locally, over ssh, in a container).
    PROCESS = "process"


# ----------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class UploadDir:
    """The directory of uploads, relative to the workspace root."""

    path: str


@dataclass(frozen=True)
class Upload:
    """One uploaded file, named by its content's digest (so cache keys follow the content)."""

    path: str
    file_digest: Digest = field(repr=False)  # keeps progress lines and traces readable

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class Uploads:
    items: tuple[Upload, ...]


@dataclass(frozen=True)
class ValidImage:
    """An upload that passed validation: only these get metadata and thumbnails."""

    upload: Upload
    format: str

    def __repr__(self) -> str:
        return f"ValidImage({self.upload.path!r})"


@dataclass(frozen=True)
class Validation:
    """The verdict on one upload: `image` when valid, else `problem` says why not."""

    upload: Upload
    image: ValidImage | None
    problem: str | None


@dataclass(frozen=True)
class ImageMetadata:
    path: str
    content_digest: str
    size_bytes: int
    format: str
    width: int
    height: int
    mode: str
    taken_at: str | None
    camera: str | None


@dataclass(frozen=True)
class ThumbnailSettings:
    sizes: tuple[int, ...]
    format: ThumbnailFormat
    method: ResizeMethod
    python: str  # the interpreter of the resize Process (needs Pillow)


@dataclass(frozen=True)
class ThumbnailRequest:
    """Exactly what one thumbnail depends on, so that changing the list of sizes does not
    invalidate the thumbnails of the sizes that stay."""

    image: ValidImage
    size: int
    format: ThumbnailFormat
    method: ResizeMethod
    python: str

    def __repr__(self) -> str:
        return f"ThumbnailRequest({self.image.upload.path!r}, {self.size}px)"


@dataclass(frozen=True)
class Thumbnail:
    source: str
    size: int
    width: int
    height: int
    path: str  # inside `digest`, and under the output directory
    digest: Digest


@dataclass(frozen=True)
class ProcessedImage:
    """One upload's outcome: metadata and thumbnails, or the reason it was rejected."""

    path: str
    metadata: ImageMetadata | None
    thumbnails: tuple[Thumbnail, ...]
    problem: str | None


@dataclass(frozen=True)
class IngestReport:
    images: tuple[ProcessedImage, ...]

    @property
    def accepted(self) -> tuple[ProcessedImage, ...]:
        return tuple(i for i in self.images if i.problem is None)

    @property
    def rejected(self) -> tuple[ProcessedImage, ...]:
        return tuple(i for i in self.images if i.problem is not None)


# ----------------------------------------------------------------------------------------------
# Rules


@rule
async def find_uploads(directory: UploadDir) -> Uploads:
    """Every file directly in the upload directory (hidden files skipped)."""
    glob = f"{directory.path}/*" if directory.path else "*"
    snapshot = await Get(Snapshot, PathGlobs([glob]))
    entries = await Get(DigestEntries, Digest, snapshot.digest)
    return Uploads(
        tuple(
            Upload(entry.path, entry.file_digest)
            for entry in entries
            if isinstance(entry, FileEntry) and not PurePosixPath(entry.path).name.startswith(".")
        )
    )


@rule_helper
async def _read_upload(upload: Upload) -> bytes:
    tree = await Get(Digest, CreateDigest([FileEntry(upload.name, upload.file_digest)]))
    contents = await Get(DigestContents, Digest, tree)
    return contents[0].content


@rule(persist=True)
async def validate_upload(upload: Upload) -> Validation:
    """Is the upload a complete image in an accepted format? Decodes every pixel to be sure."""
    data = await _read_upload(upload)
    try:
        facts = await trio.to_thread.run_sync(imaging.inspect_image, data)
    except imaging.InvalidImage as exc:
        return Validation(upload, None, str(exc))
    return Validation(upload, ValidImage(upload, facts.format), None)


@rule(persist=True)
async def extract_metadata(image: ValidImage) -> ImageMetadata:
    data = await _read_upload(image.upload)
    facts = await trio.to_thread.run_sync(imaging.inspect_image, data)
    return ImageMetadata(
        path=image.upload.path,
        content_digest=image.upload.file_digest.fingerprint,
        size_bytes=image.upload.file_digest.serialized_bytes_length,
        format=facts.format,
        width=facts.width,
        height=facts.height,
        mode=facts.mode,
        taken_at=facts.taken_at,
        camera=facts.camera,
    )


@rule(persist=True)
async def make_thumbnail(request: ThumbnailRequest) -> Thumbnail:
    upload = request.image.upload
    extension = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[request.format]
    out_path = f"thumbnails/{upload.name}/{request.size}.{extension}"
    if request.method is ResizeMethod.PROCESS:
        sandbox = await Get(
            Digest,
            CreateDigest(
                [
                    FileContent("imaging.py", IMAGING_SCRIPT),
                    FileEntry(f"in/{upload.name}", upload.file_digest),
                ]
            ),
        )
        result = await Get(
            ProcessResult,
            Process(
                argv=(
                    request.python,
                    "imaging.py",
                    f"in/{upload.name}",
                    "out",
                    str(request.size),
                    request.format,
                ),
                description=f"resize {upload.path} to {request.size}px",
                input_digest=sandbox,
                output_files=("out",),
                timeout_seconds=120,
            ),
        )
        size = json.loads(result.stdout)
        (out,) = await Get(DigestContents, Digest, result.output_digest)
        data, width, height = out.content, int(size["width"]), int(size["height"])
    else:
        source = await _read_upload(upload)
        data, width, height = await trio.to_thread.run_sync(
            imaging.make_thumbnail, source, request.size, request.format
        )
    digest = await Get(Digest, CreateDigest([FileContent(out_path, data)]))
    return Thumbnail(upload.path, request.size, width, height, out_path, digest)


@rule
async def process_upload(upload: Upload, settings: ThumbnailSettings) -> ProcessedImage:
    validation = await Get(Validation, Upload, upload)
    image = validation.image
    if image is None:
        return ProcessedImage(upload.path, None, (), validation.problem)
    metadata = await Get(ImageMetadata, ValidImage, image)
    thumbnails = await MultiGet(
        Get(
            Thumbnail,
            ThumbnailRequest(image, size, settings.format, settings.method, settings.python),
        )
        for size in settings.sizes
    )
    return ProcessedImage(upload.path, metadata, thumbnails, None)


@rule
async def ingest_uploads(directory: UploadDir, settings: ThumbnailSettings) -> IngestReport:
    uploads = await Get(Uploads, UploadDir, directory)
    processed = await MultiGet(Get(ProcessedImage, Upload, upload) for upload in uploads.items)
    return IngestReport(processed)


def rules() -> list[object]:
    return [*collect_rules(), QueryRule(IngestReport, (UploadDir, ThumbnailSettings))]


# ----------------------------------------------------------------------------------------------
# The goal: the only place with side effects


@dataclass(frozen=True)
class IngestArgs:
    """The command-line arguments of `ingest` (`--help` shows them).

    Attributes:
        uploads: the directory of uploaded images (inside the workspace root).
        out: where thumbnails and the database go.
        sizes: thumbnail sizes in pixels (the longer side).
        format: the thumbnails' image format.
        resize: compute thumbnails in-process, or each in a sandboxed Process.
        python: the interpreter of the resize Processes (it needs Pillow).
        strict: exit with 1 when any upload was rejected.
    """

    uploads: Path = HERE / "uploads"
    out: Path = Path("build/images")
    sizes: tuple[int, ...] = (64, 128, 256)
    format: ThumbnailFormat = "PNG"
    resize: ResizeMethod = ResizeMethod.IN_PROCESS
    python: str = sys.executable
    strict: bool = False

    def __post_init__(self) -> None:
        if not self.sizes or any(size < 1 or size > 4096 for size in self.sizes):
            raise ValueError(f"--sizes must be between 1 and 4096 pixels, got {self.sizes}")


_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS images (
        path TEXT PRIMARY KEY,
        content_digest TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        format TEXT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        mode TEXT NOT NULL,
        taken_at TEXT,
        camera TEXT,
        thumbnails TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS rejected_uploads (
        path TEXT PRIMARY KEY,
        reason TEXT NOT NULL
    )""",
)


def write_database(path: Path, report: IngestReport, out: Path) -> None:
    """Record every image (and every rejection) in one transaction: all rows or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                connection.execute(statement)
            for image in report.accepted:
                meta = image.metadata
                assert meta is not None
                thumbnails = [
                    {
                        "size": t.size,
                        "width": t.width,
                        "height": t.height,
                        "file": str(out / t.path),
                    }
                    for t in image.thumbnails
                ]
                connection.execute(
                    "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (path) DO UPDATE SET content_digest = excluded.content_digest, "
                    "size_bytes = excluded.size_bytes, format = excluded.format, "
                    "width = excluded.width, height = excluded.height, mode = excluded.mode, "
                    "taken_at = excluded.taken_at, camera = excluded.camera, "
                    "thumbnails = excluded.thumbnails",
                    (
                        meta.path,
                        meta.content_digest,
                        meta.size_bytes,
                        meta.format,
                        meta.width,
                        meta.height,
                        meta.mode,
                        meta.taken_at,
                        meta.camera,
                        json.dumps(thumbnails),
                    ),
                )
                connection.execute("DELETE FROM rejected_uploads WHERE path = ?", (meta.path,))
            for image in report.rejected:
                connection.execute(
                    "INSERT INTO rejected_uploads VALUES (?, ?) "
                    "ON CONFLICT (path) DO UPDATE SET reason = excluded.reason",
                    (image.path, image.problem),
                )
                connection.execute("DELETE FROM images WHERE path = ?", (image.path,))
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    finally:
        connection.close()


@goal
async def ingest(ctx: GoalContext, args: IngestArgs) -> int:
    """Validate uploaded images, make thumbnails and record them in a SQLite database."""
    uploads = ctx.workspace_path(args.uploads)
    if not (ctx.root / uploads).is_dir():
        raise GoalArgumentError(f"the upload directory {args.uploads} does not exist")
    settings = ThumbnailSettings(args.sizes, args.format, args.resize, args.python)
    report: IngestReport = await ctx.session.get(IngestReport, UploadDir(uploads), settings)

    # Files first, then the rows that point at them: the database never names a missing file.
    for image in report.accepted:
        for thumbnail in image.thumbnails:
            await ctx.write_digest(thumbnail.digest, args.out)
    database = args.out / "images.sqlite3"
    await trio.to_thread.run_sync(write_database, database, report, args.out)

    for image in report.images:
        if image.metadata is not None:
            meta = image.metadata
            sizes = " ".join(f"{t.width}x{t.height}" for t in image.thumbnails)
            extra = "".join(
                f", {label} {value}"
                for label, value in (("taken", meta.taken_at), ("camera", meta.camera))
                if value
            )
            ctx.print(
                f"ok        {image.path}: {meta.format} {meta.width}x{meta.height}{extra}; "
                f"thumbnails {sizes}"
            )
        else:
            ctx.print(f"rejected  {image.path}: {image.problem}")
    ctx.print(
        f"{len(report.accepted)} images recorded in {database}, "
        f"{len(report.rejected)} rejected; thumbnails in {args.out / 'thumbnails'}"
    )
    return 1 if args.strict and report.rejected else 0
