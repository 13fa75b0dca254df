"""Generate the sample uploads in `uploads/` (no downloads): five small valid images and three
bad ones. The output is deterministic for a given Pillow version, and committed.

    python examples/images/make_samples.py [DIRECTORY]
"""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def _gradient(
    width: int, height: int, top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> Image.Image:
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):
        t = y / max(1, height - 1)
        color = tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        draw.line([(0, y), (width, y)], fill=color)
    return image


def _exif(taken_at: str, make: str, model: str, orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = make
    exif[0x0110] = model
    exif[0x0112] = orientation
    exif.get_ifd(0x8769)[0x9003] = taken_at
    return exif


def beach() -> bytes:
    image = _gradient(360, 240, (90, 160, 230), (240, 220, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((240, 24, 312, 96), fill=(255, 230, 90))
    draw.rectangle((0, 180, 360, 240), fill=(230, 200, 140))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80, exif=_exif("2024:07:14 16:02:11", "Acme", "Snap 3"))
    return out.getvalue()


def portrait() -> bytes:
    # Stored sideways with EXIF orientation 6, as phones do: thumbnails come out upright.
    image = _gradient(300, 200, (60, 40, 80), (200, 120, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((90, 40, 210, 160), fill=(240, 200, 170))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80, exif=_exif("2024:03:02 09:30:00", "Acme", "Snap 3", 6))
    return out.getvalue()


def logo() -> bytes:
    image = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    points = [
        (128 + 112 * math.cos(math.radians(a)), 128 + 112 * math.sin(math.radians(a)))
        for a in range(-90, 270, 72)
    ]
    draw.polygon(points, fill=(40, 120, 200, 255))
    draw.ellipse((96, 96, 160, 160), fill=(255, 255, 255, 255))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def chart() -> bytes:
    image = Image.new("P", (300, 200), 0)
    image.putpalette([255, 255, 255, 200, 60, 60, 60, 160, 80, 40, 80, 200] + [0] * 756)
    draw = ImageDraw.Draw(image)
    for i, height in enumerate((60, 150, 100, 175)):
        draw.rectangle((30 + i * 65, 190 - height, 80 + i * 65, 190), fill=1 + i % 3)
    out = io.BytesIO()
    image.save(out, "GIF")
    return out.getvalue()


def mountain() -> bytes:
    image = _gradient(320, 320, (150, 190, 230), (250, 250, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon([(0, 320), (130, 90), (220, 220), (270, 160), (320, 320)], fill=(90, 100, 110))
    out = io.BytesIO()
    image.save(out, "WEBP", quality=80)
    return out.getvalue()


def samples() -> dict[str, bytes]:
    """File name -> content, valid images first."""
    good = {
        "beach.jpg": beach(),
        "portrait.jpg": portrait(),
        "logo.png": logo(),
        "chart.gif": chart(),
        "mountain.webp": mountain(),
    }
    bad = {
        # Cut mid-scan: the header is fine, so only decoding every pixel finds it.
        "truncated.jpg": good["beach.jpg"][: len(good["beach.jpg"]) * 2 // 3],
        "notes.jpg": b"Meeting notes: this upload is text with an image name.\n",
        "empty.png": b"",
    }
    return {**good, **bad}


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else HERE / "uploads"
    target.mkdir(parents=True, exist_ok=True)
    for name, content in samples().items():
        (target / name).write_bytes(content)
        print(f"{target / name}  {len(content)} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
