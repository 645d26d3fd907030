"""Image references in, RGB Pillow images out; and images out as PNG/JPEG bytes or base64.

``load_image`` accepts a path (``str`` or ``os.PathLike``), a ``PIL.Image.Image``, raw bytes, a
base64 string or a ``data:`` URI; ``http(s)`` URLs only with ``allow_remote=True``. It applies the
EXIF orientation, converts to RGB and rejects bad input with a specific ``ImageLoadError``.

Size: an image over ``max_pixels`` is refused from its header, before decoding, with one
``ImageTooLargeError`` that gives its size; Pillow's own ``DecompressionBombWarning`` (above 89 MP)
is silenced while Pillow reads the header (and decodes an image allowed over that limit), as this
check replaces it; no warning filter outlives the call. Pillow's ``DecompressionBombError`` (above
twice that) becomes the same ``ImageTooLargeError``. Files are decoded from the open file, not read
into memory first.

High bit depths are brought to 8 bits by these rules (Pillow's ``convert`` would clip every value
above 255 to white):

* 16-bit gray (modes ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``): the high byte, ``v >> 8``. Pillow
  itself reads 16-bit RGB, RGBA and gray + alpha PNGs that way, so a 16-bit gray picture and its
  colour twin load alike.
* 32-bit integer (``I``, e.g. a 32-bit TIFF or an int32 array; also signed 16-bit modes): decided
  from the data: all values in 0..255 are kept; all in 0..65535 are taken as 16-bit (``v >> 8``);
  otherwise (negative values, or above 65535) min-max: ``round((v - min) * (255 / (max - min)))``.
* float (``F``, e.g. a float TIFF): if the finite values all lie in [0, 1], ``round(v * 255)``;
  otherwise min-max over the finite values as above. NaN becomes 0, infinities clip to 0 and 255.

A constant image outside the directly mapped ranges becomes black (as a constant map does in
``api_tool.maps.minmax``). ``round`` is NumPy's ``rint`` (halves to even). The conversion runs in
bands of rows, so a 64 MP float image needs no float64 copy of itself.

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
import contextlib
import io
import os
import re
import threading
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import IO, Union

import numpy as np
from numpy.typing import NDArray
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
from api_tool.geometry import row_bands

ImageRef = Union[str, "os.PathLike[str]", bytes, Image.Image]

DEFAULT_MAX_PIXELS = 64_000_000
REMOTE_TIMEOUT_S = 20.0
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,(?P<payload>.*)$", re.DOTALL)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")
_MIN_BASE64_LENGTH = 32
_PILLOW_PIXEL_COUNT = re.compile(r"\((\d+) pixels\)")
_UNSIGNED_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WARNINGS_LOCK = threading.Lock()


def load_image(ref: ImageRef, *, allow_remote: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Turn ``ref`` into a fully decoded RGB image, or raise an ``ImageLoadError`` naming the problem."""
    if isinstance(ref, Image.Image):
        _check_size(ref.size, max_pixels, "the image")
        return _to_rgb(ref, owned=False)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(ref), "the image bytes", max_pixels)
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
        return _decode(io.BytesIO(_b64decode(data_uri.group("payload"), "the data URI")), "the data URI", max_pixels)
    if text.startswith(("http://", "https://")):
        if not allow_remote:
            raise RemoteImageNotAllowedError(
                f"remote image URLs are disabled: {text[:80]!r}; download the file first or pass allow_remote=True"
            )
        return _decode(io.BytesIO(_fetch(text)), f"the image at {text[:80]!r}", max_pixels)
    if _is_existing_path(text):
        return _open_path(Path(text), max_pixels)
    if len(text) >= _MIN_BASE64_LENGTH and _BASE64_CHARS.match(text):
        return _decode(io.BytesIO(_b64decode(text, "the base64 string")), "the base64 string", max_pixels)
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
    with path.open("rb") as stream:  # a stream, not a file name: Pillow then never memory-maps the file
        return _decode(stream, f"the file {str(path)!r}", max_pixels)


def _decode(stream: IO[bytes], what: str, max_pixels: int) -> Image.Image:
    """Decode the image in ``stream`` after checking its declared size; the stream is read in blocks."""
    if stream.seek(0, io.SEEK_END) == 0:
        raise NotAnImageError(f"{what} is empty (0 bytes), not an image")
    try:
        with _bomb_warning_silenced():
            image = Image.open(stream)  # reads the header only; the size is checked before decoding
    except UnidentifiedImageError:
        raise NotAnImageError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(_bomb_message(str(exc), what, max_pixels)) from None
    _check_size(image.size, max_pixels, what)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    over_pillow_limit = pillow_limit is not None and image.width * image.height > pillow_limit
    try:
        # Some decoders (TIFF, GIF, ...) check the size again; only images over Pillow's limit (allowed by a
        # raised max_pixels) can warn there, and only their decoding waits for the lock.
        with _bomb_warning_silenced() if over_pillow_limit else contextlib.nullcontext():
            image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise TruncatedImageError(f"{what} is truncated or corrupt and cannot be decoded: {exc}") from None
    return _to_rgb(image, owned=True)


@contextlib.contextmanager
def _bomb_warning_silenced() -> Iterator[None]:
    """Pillow's ``DecompressionBombWarning`` (above its 89 MP limit) ignored inside the block: ``max_pixels``
    is the check here, so the warning's lines would only precede our own error.

    ``warnings.catch_warnings`` swaps the process-wide filter list in and out; the lock keeps two threads
    loading images from restoring each other's copy, which would leave the filter installed for good.
    """
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _check_size(size: tuple[int, int], max_pixels: int, what: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise EmptyImageError(f"{what} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
            "downscale it or raise max_pixels"
        )


def _bomb_message(pillow_message: str, what: str, max_pixels: int) -> str:
    """The message for Pillow's refusal of an image over twice ``Image.MAX_IMAGE_PIXELS``; Pillow raises it
    from the header before the size reaches ``_check_size``, and its message holds the pixel count."""
    found = _PILLOW_PIXEL_COUNT.search(pillow_message)
    if found and int(found.group(1)) > max_pixels:
        return f"{what} is {int(found.group(1)):,} pixels, over the limit of {max_pixels:,}; downscale it"
    return f"{what} is over Pillow's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS): {pillow_message}"


def _to_rgb(image: Image.Image, *, owned: bool) -> Image.Image:
    """``image`` upright (EXIF orientation) in RGB. An ``owned`` image (decoded here, seen by no caller)
    is turned in place and returned as is when already RGB; any other is never changed or returned."""
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
        oriented = image
    else:
        oriented = ImageOps.exif_transpose(image)  # a new image, also when nothing is turned
    if oriented.mode == "RGB":
        return oriented
    if oriented.mode == "F" or oriented.mode.startswith("I"):
        return _to_eight_bit(oriented).convert("RGB")
    if oriented.mode in ("RGBA", "LA", "PA") or (oriented.mode == "P" and "transparency" in oriented.info):
        background = Image.new("RGB", oriented.size, (255, 255, 255))
        background.paste(oriented.convert("RGBA"), mask=oriented.convert("RGBA").getchannel("A"))
        return background
    return oriented.convert("RGB")


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """The ``L`` image of a 16-bit, 32-bit integer or float image, by the rules in the module docstring."""
    width, height = image.size
    mapping = _eight_bit_mapping(image)
    gray = np.empty((height, width), dtype=np.uint8)
    for top, bottom in row_bands(height, width):
        gray[top:bottom] = mapping(np.asarray(image.crop((0, top, width, bottom))))
    return Image.fromarray(gray)


def _eight_bit_mapping(image: Image.Image) -> Callable[[NDArray[np.generic]], NDArray[np.uint8]]:
    """How one band of ``image``'s values becomes uint8, chosen from its mode and (``I``, ``F``) its range."""
    if image.mode in _UNSIGNED_16_BIT_MODES:
        return _high_byte
    low, high = _finite_extrema(image)
    if image.mode != "F" and low >= 0 and high <= 255:
        return partial(np.asarray, dtype=np.uint8)
    if image.mode != "F" and low >= 0 and high <= 65535:
        return _high_byte
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        return partial(_linear, offset=0.0, scale=255.0)
    return partial(_linear, offset=low, scale=255.0 / (high - low) if high > low else 0.0)


def _finite_extrema(image: Image.Image) -> tuple[float, float]:
    """The least and greatest finite values of ``image`` (``(0, 0)`` if none is finite), band by band."""
    width, height = image.size
    low, high = np.inf, -np.inf
    for top, bottom in row_bands(height, width):
        values = np.asarray(image.crop((0, top, width, bottom)))
        finite = values[np.isfinite(values)]
        if finite.size:
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
    return (low, high) if low <= high else (0.0, 0.0)


def _high_byte(values: NDArray[np.generic]) -> NDArray[np.uint8]:
    """``v >> 8`` of 16-bit values, as uint8."""
    return (values.astype(np.uint32) >> 8).astype(np.uint8)


def _linear(values: NDArray[np.generic], offset: float, scale: float) -> NDArray[np.uint8]:
    """``round((v - offset) * scale)`` in float64, clipped to 0..255; NaN becomes 0."""
    scaled = np.rint((values.astype(np.float64) - offset) * scale)
    return np.nan_to_num(np.clip(scaled, 0.0, 255.0), nan=0.0).astype(np.uint8)


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
