"""Turn an image and its pixel-size mask into the prompted image. Pure: PIL/NumPy in and out.

Styles:

* ``gray`` (the paper): ``I * M + (1 - M) * g`` per pixel; unattended regions fade to gray level ``g``.
* ``heatmap``: the mask colour-mapped (jet) and alpha-blended over the image.
* ``crop``: the tight box around the attended region (``mask >= threshold``) plus a margin, as
  ViCrop does; the crop keeps the original pixels.
* ``contour``: the outline of the attended region drawn over the unchanged image.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> from api_tool.render import render
    >>> image = Image.new("RGB", (4, 4), (200, 100, 50))
    >>> render(image, np.zeros((4, 4)), style="gray", gray_level=0).getpixel((0, 0))
    (0, 0, 0)
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter

from api_tool.errors import InvalidParameterError

Style = Literal["gray", "heatmap", "crop", "contour"]
STYLES: tuple[str, ...] = ("gray", "heatmap", "crop", "contour")


def render(
    image: Image.Image,
    mask: NDArray[np.floating],
    style: Style = "gray",
    gray_level: int = 0,
    *,
    alpha: float = 0.5,
    threshold: float = 0.5,
    margin: float = 0.1,
    color: tuple[int, int, int] = (255, 0, 0),
    line_width: int | None = None,
) -> Image.Image:
    """Render ``mask`` (``(H, W)`` in [0, 1], aligned with ``image``) in the given ``style``."""
    rgb = image.convert("RGB")
    mask = _checked_mask(mask, rgb.size)
    if style == "gray":
        return blend_gray(rgb, mask, gray_level)
    if style == "heatmap":
        return overlay_heatmap(rgb, mask, alpha)
    if style == "crop":
        return rgb.crop(attention_box(mask, threshold, margin))
    if style == "contour":
        return draw_contour(rgb, mask, threshold, color, line_width)
    raise InvalidParameterError(f"style must be one of {STYLES}, got {style!r}")


def blend_gray(image: Image.Image, mask: NDArray[np.floating], gray_level: int = 0) -> Image.Image:
    """The paper's prompted image ``I * M + (1 - M) * g``."""
    if not 0 <= gray_level <= 255:
        raise InvalidParameterError(f"gray_level must be in 0..255, got {gray_level}")
    pixels = np.asarray(image, dtype=np.float64)
    weight = mask[..., None]
    blended = pixels * weight + (1.0 - weight) * float(gray_level)
    return Image.fromarray(np.rint(blended).astype(np.uint8), mode="RGB")


def jet_colors(values: NDArray[np.floating]) -> NDArray[np.uint8]:
    """The jet colormap (blue -> cyan -> yellow -> red) of values in [0, 1]: ``(..., 3)`` uint8."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def overlay_heatmap(image: Image.Image, mask: NDArray[np.floating], alpha: float = 0.5) -> Image.Image:
    """The colour-mapped mask blended over the image with opacity ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha must be in [0, 1], got {alpha}")
    pixels = np.asarray(image, dtype=np.float64)
    heat = jet_colors(mask).astype(np.float64)
    return Image.fromarray(np.rint((1.0 - alpha) * pixels + alpha * heat).astype(np.uint8), mode="RGB")


def attention_box(mask: NDArray[np.floating], threshold: float = 0.5, margin: float = 0.1) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` around ``mask >= threshold`` grown by ``margin`` of its size; whole image if empty."""
    height, width = mask.shape
    rows = np.flatnonzero((mask >= threshold).any(axis=1))
    cols = np.flatnonzero((mask >= threshold).any(axis=0))
    if rows.size == 0:
        return (0, 0, width, height)
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    pad_x, pad_y = round((x1 - x0) * margin), round((y1 - y0) * margin)
    return (max(0, x0 - pad_x), max(0, y0 - pad_y), min(width, x1 + pad_x), min(height, y1 + pad_y))


def draw_contour(
    image: Image.Image,
    mask: NDArray[np.floating],
    threshold: float = 0.5,
    color: tuple[int, int, int] = (255, 0, 0),
    line_width: int | None = None,
) -> Image.Image:
    """The boundary of ``mask >= threshold`` painted in ``color`` over the image."""
    width = line_width if line_width is not None else max(1, round(max(image.size) / 200))
    inside = Image.fromarray(((mask >= threshold) * 255).astype(np.uint8), mode="L")
    size = 2 * width + 1
    grown = np.asarray(inside.filter(ImageFilter.MaxFilter(size))) > 0
    shrunk = np.asarray(inside.filter(ImageFilter.MinFilter(size))) > 0
    outline = grown & ~shrunk
    pixels = np.array(image)
    pixels[outline] = color
    return Image.fromarray(pixels, mode="RGB")


def _checked_mask(mask: NDArray[np.floating], size: tuple[int, int]) -> NDArray[np.float64]:
    mask = np.asarray(mask, dtype=np.float64)
    width, height = size
    if mask.shape != (height, width):
        raise InvalidParameterError(
            f"mask shape {mask.shape} does not match the image (height, width) = {(height, width)}; "
            "upsample the map to the image size first (AttributionMap.upsample)"
        )
    return np.clip(mask, 0.0, 1.0)
