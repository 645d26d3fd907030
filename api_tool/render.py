"""Turn an image and its pixel-size mask into the prompted image. Pure: PIL/NumPy in and out.

Styles:

* ``gray`` (the paper): ``I * M + (1 - M) * g`` per pixel; unattended regions fade to gray level ``g``.
* ``heatmap``: the mask colour-mapped (jet) and alpha-blended over the image.
* ``crop``: the tight box around the attended region (``mask >= threshold``) plus a margin, as
  ViCrop does; the crop keeps the original pixels.
* ``contour``: the outline of the attended region drawn over the unchanged image.
* ``zoom``: ViCrop's zoom for small details: a crop around the attended region, at least
  ``min_share`` of the image's shorter side, with the target's aspect (``api_tool.geometry.zoom_box``),
  resized to the target's input (``zoom_size``, 336 px by default as LLaVA-1.5's).

The mask may be float32 or float64 (any real dtype); values outside [0, 1] are clipped. Every style
works in horizontal bands of rows (``api_tool.geometry.row_bands``), converting one band of pixels
and mask to float64 at a time and writing the result into the output image, so the memory besides
the input, the mask and the output stays a few MiB at any image size, and the result is exactly the
whole-image float64 formula.

Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> from api_tool.render import render
    >>> image = Image.new("RGB", (4, 4), (200, 100, 50))
    >>> render(image, np.zeros((4, 4)), style="gray", gray_level=0).getpixel((0, 0))
    (0, 0, 0)
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from api_tool.errors import InvalidParameterError
from api_tool.geometry import ZOOM_MIN_SHARE, resample_filter, row_bands, zoom_box

Style = Literal["gray", "heatmap", "crop", "contour", "zoom"]
STYLES: tuple[str, ...] = ("gray", "heatmap", "crop", "contour", "zoom")
CROP_STYLES: frozenset[str] = frozenset({"crop", "zoom"})
"""Styles whose image is a part of the original (``crop_box`` says which part)."""
CROP_MARGIN = 0.1
"""How much the ``crop`` style grows the attended box, as a share of its size."""
ZOOM_MARGIN = 0.25
"""How much the ``zoom`` style grows the attended region before the minimum size applies."""
ZOOM_SIZE = 336
"""The zoom crop's side in pixels unless the target's input size is given (LLaVA-1.5's 336 px)."""


def render(
    image: Image.Image,
    mask: NDArray[np.floating],
    style: Style = "gray",
    gray_level: int = 0,
    **options: Any,
) -> Image.Image:
    """Render ``mask`` (``(H, W)`` in [0, 1], aligned with ``image``) in the given ``style``; ``options`` as
    :func:`render_with_box`."""
    return render_with_box(image, mask, style, gray_level, **options)[0]


def render_with_box(
    image: Image.Image,
    mask: NDArray[np.floating],
    style: Style = "gray",
    gray_level: int = 0,
    *,
    alpha: float = 0.5,
    threshold: float = 0.5,
    margin: float | None = None,
    color: tuple[int, int, int] = (255, 0, 0),
    line_width: int | None = None,
    zoom_size: int | tuple[int, int] = ZOOM_SIZE,
    min_share: float = ZOOM_MIN_SHARE,
) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    """The rendered image and, for the ``crop`` and ``zoom`` styles, the box of the original it shows
    (``(x0, y0, x1, y1)`` pixels; ``None`` for the other styles).

    ``zoom_size`` (``zoom`` style) is the target's input, a side or ``(width, height)``; ``min_share`` the
    least share of the image's shorter side the zoom crop spans; ``margin`` grows the attended region by
    that share of its size (``crop``: 0.1 by default, ``zoom``: 0.25).

    Example:
        >>> image = Image.new("RGB", (8, 8))
        >>> mask = np.zeros((8, 8))
        >>> mask[2:4, 2:4] = 1.0
        >>> render_with_box(image, mask, "crop", margin=0.0)[1]
        (2, 2, 4, 4)
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")  # read only: no full-size copy
    mask = _checked_mask(mask, rgb.size)
    if style == "zoom":
        zoom_margin = ZOOM_MARGIN if margin is None else margin
        return zoom_view(rgb, mask, zoom_size, threshold=threshold, margin=zoom_margin, min_share=min_share)
    if style == "crop":
        box = attention_box(mask, threshold, CROP_MARGIN if margin is None else margin)
        return rgb.crop(box), box
    if style == "gray":
        return blend_gray(rgb, mask, gray_level), None
    if style == "heatmap":
        return overlay_heatmap(rgb, mask, alpha), None
    if style == "contour":
        return draw_contour(rgb, mask, threshold, color, line_width), None
    raise InvalidParameterError(f"style must be one of {STYLES}, got {style!r}")


def blend_gray(image: Image.Image, mask: NDArray[np.floating], gray_level: int = 0) -> Image.Image:
    """The paper's prompted image ``I * M + (1 - M) * g``, in float64, band by band."""
    if not 0 <= gray_level <= 255:
        raise InvalidParameterError(f"gray_level must be in 0..255, got {gray_level}")
    out = Image.new("RGB", image.size)
    for top, bottom in row_bands(image.height, image.width):
        pixels = _pixel_band(image, top, bottom)
        weight = _mask_band(mask, top, bottom)[..., None]
        pixels *= weight
        pixels += (1.0 - weight) * float(gray_level)
        out.paste(Image.fromarray(np.rint(pixels, out=pixels).astype(np.uint8), mode="RGB"), (0, top))
    return out


def jet_colors(values: NDArray[np.floating]) -> NDArray[np.uint8]:
    """The jet colormap (blue -> cyan -> yellow -> red) of values in [0, 1]: ``(..., 3)`` uint8."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)[..., None]
    rgb = 4.0 * x - np.array([3.0, 2.0, 1.0])
    np.abs(rgb, out=rgb)  # in place from here on: clip(1.5 - |4x - centre|, 0, 1) * 255, rounded
    np.subtract(1.5, rgb, out=rgb)
    np.clip(rgb, 0.0, 1.0, out=rgb)
    rgb *= 255.0
    return np.rint(rgb, out=rgb).astype(np.uint8)


def overlay_heatmap(image: Image.Image, mask: NDArray[np.floating], alpha: float = 0.5) -> Image.Image:
    """The colour-mapped mask blended over the image with opacity ``alpha``, band by band."""
    if not 0.0 <= alpha <= 1.0:
        raise InvalidParameterError(f"alpha must be in [0, 1], got {alpha}")
    out = Image.new("RGB", image.size)
    for top, bottom in row_bands(image.height, image.width):
        pixels = _pixel_band(image, top, bottom)
        pixels *= 1.0 - alpha
        heat = jet_colors(_mask_band(mask, top, bottom)).astype(np.float64)
        heat *= alpha
        pixels += heat
        out.paste(Image.fromarray(np.rint(pixels, out=pixels).astype(np.uint8), mode="RGB"), (0, top))
    return out


def zoom_view(
    image: Image.Image,
    mask: NDArray[np.floating],
    zoom_size: int | tuple[int, int] = ZOOM_SIZE,
    *,
    threshold: float = 0.5,
    margin: float = ZOOM_MARGIN,
    min_share: float = ZOOM_MIN_SHARE,
    resample: str = "bicubic",
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The zoomed crop of the attended region, resized to ``zoom_size`` (the target's input: a side or
    ``(width, height)``, whose aspect the crop takes), and the crop's box in the original image.

    Example:
        >>> image = Image.new("RGB", (1000, 600), (0, 0, 0))
        >>> mask = np.zeros((600, 1000))
        >>> mask[290:310, 890:910] = 1.0
        >>> view, box = zoom_view(image, mask, 336)
        >>> view.size, box
        ((336, 336), (810, 210, 990, 390))
    """
    width, height = (zoom_size, zoom_size) if isinstance(zoom_size, int) else zoom_size
    if width < 1 or height < 1:
        raise InvalidParameterError(f"zoom_size must be positive, got {zoom_size!r}")
    box = zoom_box(
        _checked_mask(mask, image.size), threshold=threshold, margin=margin, min_share=min_share, aspect=width / height
    )
    return image.resize((width, height), resample_filter(resample), box=box), box


def attention_box(mask: NDArray[np.floating], threshold: float = 0.5, margin: float = 0.1) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` around ``mask >= threshold`` grown by ``margin`` of its size; whole image if empty."""
    height, width = np.shape(mask)
    rows_hit = np.zeros(height, dtype=bool)
    cols_hit = np.zeros(width, dtype=bool)
    for top, bottom in row_bands(height, width):
        inside = _mask_band(mask, top, bottom) >= threshold
        rows_hit[top:bottom] = inside.any(axis=1)
        cols_hit |= inside.any(axis=0)
    rows, cols = np.flatnonzero(rows_hit), np.flatnonzero(cols_hit)
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
    """The boundary of ``mask >= threshold`` painted in ``color`` over the image.

    The boundary is the region grown by ``line_width`` pixels minus the region shrunk by as much,
    both over a ``(2 * line_width + 1)``-pixel square window with the edge pixels replicated: what
    Pillow's ``MaxFilter`` and ``MinFilter`` give, computed as separable running counts band by band
    (each band reads ``line_width`` more rows on either side) in time independent of ``line_width``.
    """
    radius = line_width if line_width is not None else max(1, round(max(image.size) / 200))
    width, height = image.size
    out = image.copy()
    row_windows = _window_lengths(width, radius)
    for top, bottom in row_bands(height, width, min_rows=2 * radius):
        above, below = max(0, top - radius), min(height, bottom + radius)
        across = _window_counts(_mask_band(mask, above, below) >= threshold, radius, axis=1)
        any_across, all_across = across > 0, across == row_windows
        del across
        grown = _window_counts(any_across, radius, axis=0) > 0
        shrunk = _window_counts(all_across, radius, axis=0) == _window_lengths(below - above, radius)[:, None]
        rows = slice(top - above, bottom - above)
        out.paste(color, (0, top, width, bottom), Image.fromarray(grown[rows] & ~shrunk[rows]))
    return out


def _window_lengths(length: int, radius: int) -> NDArray[np.int32]:
    """How many positions of ``range(length)`` lie within ``radius`` of each position."""
    positions = np.arange(length, dtype=np.int32)
    return np.minimum(positions + radius + 1, length) - np.maximum(positions - radius, 0)


def _window_counts(values: NDArray[np.bool_], radius: int, axis: int) -> NDArray[np.int32]:
    """For each element, how many ``True`` lie within ``radius`` of it along ``axis`` (inside the array)."""
    length = values.shape[axis]
    sums = np.cumsum(values, axis=axis, dtype=np.int32)  # sums[i]: how many True in [0, i]
    positions = np.arange(length)
    counts = np.take(sums, np.minimum(positions + radius, length - 1), axis=axis)
    before = np.take(sums, np.maximum(positions - radius - 1, 0), axis=axis)
    np.moveaxis(before, axis, 0)[: radius + 1] = 0  # these windows start at the array's first element
    counts -= before
    return counts


def _pixel_band(image: Image.Image, top: int, bottom: int) -> NDArray[np.float64]:
    """Rows ``top:bottom`` of an RGB image as a float64 ``(rows, W, 3)`` array."""
    return np.asarray(image.crop((0, top, image.width, bottom)), dtype=np.float64)


def _mask_band(mask: NDArray[np.floating], top: int, bottom: int) -> NDArray[np.float64]:
    """Rows ``top:bottom`` of the mask, as a new float64 array, clipped to [0, 1]."""
    band = np.array(mask[top:bottom], dtype=np.float64)
    return np.clip(band, 0.0, 1.0, out=band)


def _checked_mask(mask: NDArray[np.floating], size: tuple[int, int]) -> NDArray[np.floating]:
    """The mask as an array (not copied), after checking that it matches the image's ``(height, width)``."""
    mask = np.asarray(mask)
    width, height = size
    if mask.shape != (height, width):
        raise InvalidParameterError(
            f"mask shape {mask.shape} does not match the image (height, width) = {(height, width)}; "
            "upsample the map to the image size first (AttributionMap.upsample)"
        )
    return mask
