"""Image references in, RGB Pillow images out; and images out as PNG/JPEG bytes or base64.

``load_image`` accepts a path (``str`` or ``os.PathLike``), a ``PIL.Image.Image``, raw bytes, a
base64 string or a ``data:`` URI; ``http(s)`` URLs only with ``allow_remote=True``. It applies the
EXIF orientation, converts to RGB and rejects bad input with a specific ``ImageLoadError``.

Example:
    >>> from PIL import Image
    >>> from api_tool.images import load_image, encode_image
    >>> image = load_image(Image.new("L", (4, 2)))
    >>> image.mode, image.size
    ('RGB', (4, 2))
    >>> encode_image(image)[1]
    'image/png'
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.request
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from api_tool.errors import (
    EmptyImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidParameterError,
    NotAnImageError,
    RemoteImageNotAllowedError,
    TruncatedImageError,
)

ImageRef = Union[str, "os.PathLike[str]", bytes, Image.Image]

DEFAULT_MAX_PIXELS = 64_000_000
REMOTE_TIMEOUT_S = 20.0
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,(?P<payload>.*)$", re.DOTALL)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")
_MIN_BASE64_LENGTH = 32


def load_image(ref: ImageRef, *, allow_remote: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Turn ``ref`` into a fully decoded RGB image, or raise an ``ImageLoadError`` naming the problem."""
    if isinstance(ref, Image.Image):
        _check_size(ref.size, max_pixels, "the image")
        return _to_rgb(ref)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _decode(bytes(ref), "the image bytes", max_pixels)
    if isinstance(ref, os.PathLike):
        return _open_path(Path(ref), max_pixels)
    if not isinstance(ref, str):
        raise NotAnImageError(
            f"cannot load an image from a {type(ref).__name__}; pass a path, PIL image, bytes, base64 or data URI"
        )
    text = ref.strip()
    if not text:
        raise ImageNotFoundError("the image reference is empty; pass a file path, data URI or base64 string")
    data_uri = _DATA_URI.match(text)
    if data_uri:
        return _decode(_b64decode(data_uri.group("payload"), "the data URI"), "the data URI", max_pixels)
    if text.startswith(("http://", "https://")):
        if not allow_remote:
            raise RemoteImageNotAllowedError(
                f"remote image URLs are disabled: {text[:80]!r}; download the file first or pass allow_remote=True"
            )
        return _decode(_fetch(text), f"the image at {text[:80]!r}", max_pixels)
    if _is_existing_path(text):
        return _open_path(Path(text), max_pixels)
    if len(text) >= _MIN_BASE64_LENGTH and _BASE64_CHARS.match(text):
        return _decode(_b64decode(text, "the base64 string"), "the base64 string", max_pixels)
    raise ImageNotFoundError(f"image file not found: {text[:200]!r}")


def encode_image(image: Image.Image, format: str = "PNG", max_side: int | None = None) -> tuple[str, str]:
    """``(base64 string, mime type)`` of ``image`` as PNG or JPEG, downscaled to ``max_side`` if given."""
    fmt = format.upper().replace("JPG", "JPEG")
    if fmt not in ("PNG", "JPEG"):
        raise InvalidParameterError(f"format must be PNG or JPEG, got {format!r}")
    if max_side is not None:
        if max_side < 1:
            raise InvalidParameterError(f"max_side must be a positive number of pixels, got {max_side}")
        if max(image.size) > max_side:
            image = image.copy()
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return base64.b64encode(buffer.getvalue()).decode("ascii"), f"image/{fmt.lower()}"


def _is_existing_path(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).exists()
    except OSError:  # e.g. a long base64 string: "file name too long"
        return False


def _open_path(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise ImageNotFoundError(f"image file not found: {str(path)!r}")
    if not path.is_file():
        raise ImageNotFoundError(f"not a file: {str(path)!r}")
    return _decode(path.read_bytes(), f"the file {str(path)!r}", max_pixels)


def _decode(data: bytes, what: str, max_pixels: int) -> Image.Image:
    if not data:
        raise NotAnImageError(f"{what} is empty (0 bytes), not an image")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only; the size is checked before decoding
    except UnidentifiedImageError:
        raise NotAnImageError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(f"{what} declares too many pixels (decompression-bomb guard)") from None
    _check_size(image.size, max_pixels, what)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise TruncatedImageError(f"{what} is truncated or corrupt and cannot be decoded: {exc}") from None
    return _to_rgb(image)


def _check_size(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise EmptyImageError(f"{what} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
            "downscale it or raise max_pixels"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    oriented = ImageOps.exif_transpose(image)
    if oriented.mode == "RGB":
        return oriented if oriented is not image else image.copy()
    if oriented.mode in ("RGBA", "LA", "PA") or (oriented.mode == "P" and "transparency" in oriented.info):
        background = Image.new("RGB", oriented.size, (255, 255, 255))
        background.paste(oriented.convert("RGBA"), mask=oriented.convert("RGBA").getchannel("A"))
        return background
    return oriented.convert("RGB")


def _b64decode(payload: str, what: str) -> bytes:
    cleaned = "".join(payload.split())
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned + "=" * (-len(cleaned) % 4))
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise NotAnImageError(f"{what} is not valid base64") from None


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:
            return bytes(response.read())
    except OSError as exc:
        raise ImageNotFoundError(f"could not download {url[:80]!r}: {exc}") from None
