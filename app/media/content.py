"""What an upload really is: its type by magic bytes, and images decoded and re-encoded.

The declared Content-Type must agree with the first bytes. Images are decoded
by Pillow under a pixel limit (a decompression bomb is refused before it is
expanded), then written anew from their pixels only: EXIF, GPS, XMP and comments
of the original are never stored or served. GIFs keep their first frame.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageOps

from app.errors import InvalidInput, UnsupportedMediaType

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")
FILE_TYPES = ("application/pdf", "application/zip", "text/plain", "application/octet-stream")
ACCEPTED_TYPES = IMAGE_TYPES + FILE_TYPES
SNIFF_BYTES = 16
_PILLOW_FORMAT = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP", "image/gif": "GIF"}


def sniff(head: bytes) -> str | None:
    """The type the first bytes announce, or None when they name none we know."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "application/zip"
    return None


def check_declared_type(declared: str, head: bytes) -> None:
    """UnsupportedMediaType unless the declared type is one we take and the bytes are of it.

    text/plain must not look like any known binary format; octet-stream takes any
    bytes that are not an image (an image must be declared as one, so it is cleaned)."""
    if declared not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(f"Content-Type {declared!r} is not accepted; use one of "
                                   + ", ".join(ACCEPTED_TYPES))
    actual = sniff(head)
    if declared in ("text/plain", "application/octet-stream"):
        if actual in IMAGE_TYPES or (declared == "text/plain" and actual is not None):
            raise UnsupportedMediaType(f"the content is {actual}, not {declared}")
        if declared == "text/plain":
            try:
                head.decode("utf-8")
            except UnicodeDecodeError as exc:
                if exc.start < len(head) - 3:  # a character cut at the sniff boundary is fine
                    raise UnsupportedMediaType("the content is not UTF-8 text") from None
        return
    if actual != declared:
        raise UnsupportedMediaType(f"the content is {actual or 'of an unknown type'}, not {declared}")


@dataclass(frozen=True)
class CleanImage:
    width: int
    height: int


def clean_image(source: BinaryIO, declared: str, target: BinaryIO, thumbnail: BinaryIO, max_pixels: int,
                thumbnail_px: int) -> CleanImage:
    """Decode `source` (checked to be `declared`), write it re-encoded without metadata to `target`
    and a WebP thumbnail (longest side thumbnail_px) to `thumbnail`. InvalidInput for a broken or
    truncated image, UnsupportedMediaType for one too large to decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source, formats=[_PILLOW_FORMAT[declared]])
            if image.width * image.height > max_pixels:  # refused from the header, before decoding
                raise UnsupportedMediaType(f"the image has {image.width}x{image.height} pixels; at most "
                                           f"{max_pixels} are accepted")
            image.seek(0)  # a GIF's first frame
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UnsupportedMediaType(f"the image has more than {max_pixels} pixels") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidInput(f"the image cannot be decoded ({exc.__class__.__name__}): "
                               "is it complete?") from None
    image = ImageOps.exif_transpose(image)  # keep the orientation the EXIF said, then drop EXIF
    pixels = _without_metadata(image)
    save = {"image/jpeg": dict(format="JPEG", quality=90), "image/png": dict(format="PNG", optimize=True),
            "image/webp": dict(format="WEBP", quality=90), "image/gif": dict(format="GIF")}[declared]
    (pixels.convert("RGB") if declared == "image/jpeg" else pixels).save(target, **save)
    thumb = pixels.copy()
    thumb.thumbnail((thumbnail_px, thumbnail_px))
    thumb.save(thumbnail, format="WEBP", quality=80)
    return CleanImage(pixels.width, pixels.height)


def _without_metadata(image: Image.Image) -> Image.Image:
    """A new image holding only the pixels (and palette): no info dict, no EXIF, no ICC-borne text."""
    mode = image.mode if image.mode in ("1", "L", "LA", "P", "RGB", "RGBA") else "RGBA"
    source = image.convert(mode) if mode != image.mode else image
    clean = Image.new(mode, source.size)
    clean.paste(source)
    if mode == "P" and source.getpalette():
        clean.putpalette(source.getpalette())
        if "transparency" in source.info and isinstance(source.info["transparency"], int):
            clean.info["transparency"] = source.info["transparency"]
    return clean
