"""The image work itself, with Pillow: validate, read metadata, make a thumbnail.

Plain functions over bytes, with no rulework in them: the rules in `workflow.py` call them
in-process, and this same file is shipped into the sandbox of a resize `Process` and run as a
script there:

    python imaging.py INPUT OUTPUT SIZE FORMAT     # prints {"width": W, "height": H}
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

#: What uploads may be; anything else Pillow can read is rejected as unsupported.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP")
#: Larger images are rejected before being decoded (a decompression bomb is tiny on disk).
MAX_PIXELS = 40_000_000

_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 0x9003
_MAKE = 0x010F
_MODEL = 0x0110


@dataclass(frozen=True)
class Facts:
    """What `inspect_image` found in a valid image."""

    format: str
    width: int
    height: int
    mode: str
    taken_at: str | None
    camera: str | None


class InvalidImage(ValueError):
    """The bytes are not an acceptable image; the message says why, for the uploader."""


def inspect_image(data: bytes) -> Facts:
    """Check that `data` is a complete image in an accepted format and read its facts.

    Raises:
        InvalidImage: empty, not an image, an unsupported format, too large, truncated or
            corrupt; the message says which.
    """
    if not data:
        raise InvalidImage("the file is empty (0 bytes)")
    image_format = "image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format or "unknown"
            width, height = image.size
            if image_format not in ACCEPTED_FORMATS:
                raise InvalidImage(
                    f"unsupported format {image_format}; accepted: {', '.join(ACCEPTED_FORMATS)}"
                )
            if width * height > MAX_PIXELS:
                raise InvalidImage(
                    f"too large: {width}x{height} pixels (at most {MAX_PIXELS:,} pixels)"
                )
            # verify() checks the structure (PNG chunk CRCs...) without decoding pixels.
            image.verify()
        # A truncated JPEG passes verify(); decoding every pixel is the only sure check.
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            exif = image.getexif()
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage(
            f"not an image: Pillow recognises no image format in it (it starts with {data[:16]!r})"
        ) from None
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"truncated or corrupt {image_format} data: {exc}") from None
    taken_at = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL)
    make, model = exif.get(_MAKE), exif.get(_MODEL)
    camera = " ".join(str(part).strip() for part in (make, model) if part) or None
    return Facts(
        format=image_format,
        width=width,
        height=height,
        mode=mode,
        taken_at=str(taken_at) if taken_at else None,
        camera=camera,
    )


def make_thumbnail(data: bytes, size: int, image_format: str) -> tuple[bytes, int, int]:
    """A thumbnail of `data` whose longer side is at most `size` pixels, encoded as
    `image_format`, turned upright per its EXIF orientation. Returns (bytes, width, height).
    """
    with Image.open(io.BytesIO(data)) as original:
        image = ImageOps.exif_transpose(original)
        if image.mode not in ("RGB", "RGBA", "L"):
            image = image.convert("RGBA")
        if image_format == "JPEG" and image.mode == "RGBA":
            image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        # No timestamps or optimiser passes: the same input gives the same bytes, so the
        # thumbnail's digest is stable and every copy of it shares one cache entry.
        image.save(out, format=image_format)
        return out.getvalue(), image.width, image.height


def main(argv: list[str]) -> int:
    """The resize Process: `imaging.py INPUT OUTPUT SIZE FORMAT`."""
    if len(argv) != 4:
        print("usage: imaging.py INPUT OUTPUT SIZE FORMAT", file=sys.stderr)
        return 2
    source, target, size, image_format = argv
    with open(source, "rb") as f:
        data = f.read()
    thumbnail, width, height = make_thumbnail(data, int(size), image_format)
    with open(target, "wb") as f:
        f.write(thumbnail)
    print(json.dumps({"width": width, "height": height}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
