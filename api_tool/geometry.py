"""All coordinate geometry between the original image, the model input and the patch grid.

The package *letterboxes*: the image is scaled so its longer side fits the model's square input and
the shorter side is padded evenly (with the model's mean colour, which normalises to zero). Nothing
is cropped, so every pixel of the original image has a place on the patch grid, and a map on the
grid maps back onto the image exactly. (The authors' code centre-crops and then stretches the mask
over the whole image, which misaligns it on non-square images.)

Coordinates are ``(x0, y0, x1, y1)`` boxes with x to the right and y down; a grid box is measured
in patch units (cell ``(row, col)`` spans ``[col, col + 1] x [row, row + 1]``).

Work at pixel size (upsampling a map, rendering, rescaling high-bit-depth images) runs in horizontal
bands of rows (``row_bands``) of about ``BAND_PIXELS`` pixels each, so that its temporary arrays stay
small whatever the image size: at the 64 MP limit a float64 copy of an RGB image would be 1.5 GiB.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from api_tool.errors import InvalidParameterError

Box = tuple[float, float, float, float]
GridBox = Box

BAND_PIXELS = 1 << 16
"""About how many pixels one band of ``row_bands`` holds (8 rows of an 8000-pixel-wide image): a
float64 RGB band is then 1.5 MiB, and all of a band's temporaries stay under 10 MiB."""

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def resample_filter(name: str) -> Image.Resampling:
    """The Pillow filter for ``"nearest" | "bilinear" | "bicubic" | "lanczos"``."""
    try:
        return _RESAMPLE[name.lower()]
    except KeyError:
        raise InvalidParameterError(f"resample must be one of {sorted(_RESAMPLE)}, got {name!r}") from None


@dataclass(frozen=True)
class Letterbox:
    """How an image of ``image_size`` sits inside a square model input of side ``side``.

    Example:
        >>> lb = Letterbox.fit((400, 200), side=224)
        >>> lb.content_box
        (0.0, 56.0, 224.0, 168.0)
        >>> lb.grid_box(grid=(14, 14))
        (0.0, 3.5, 14.0, 10.5)
    """

    image_size: tuple[int, int]
    side: int
    scaled_size: tuple[int, int]
    offset: tuple[int, int]

    @classmethod
    def fit(cls, image_size: tuple[int, int], side: int) -> Letterbox:
        """Scale the longer side to ``side``, keep the aspect ratio, centre the result."""
        width, height = image_size
        scale = side / max(width, height)
        scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
        offset = ((side - scaled[0]) // 2, (side - scaled[1]) // 2)
        return cls(image_size=(width, height), side=side, scaled_size=scaled, offset=offset)

    @property
    def content_box(self) -> Box:
        """Where the image lies in model-input pixels."""
        x0, y0 = self.offset
        return (float(x0), float(y0), float(x0 + self.scaled_size[0]), float(y0 + self.scaled_size[1]))

    def grid_box(self, grid: tuple[int, int]) -> GridBox:
        """Where the image lies on a ``(rows, cols)`` patch grid, in patch units."""
        rows, cols = grid
        x0, y0, x1, y1 = self.content_box
        return (x0 * cols / self.side, y0 * rows / self.side, x1 * cols / self.side, y1 * rows / self.side)

    def apply(self, image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
        """The letterboxed ``side x side`` RGB image."""
        canvas = Image.new("RGB", (self.side, self.side), fill)
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # no full-size copy of an RGB image
        canvas.paste(rgb.resize(self.scaled_size, Image.Resampling.BICUBIC), self.offset)
        return canvas


def full_grid_box(grid: tuple[int, int]) -> GridBox:
    """The grid box of an image that fills the whole grid (no padding)."""
    rows, cols = grid
    return (0.0, 0.0, float(cols), float(rows))


def row_bands(height: int, width: int, min_rows: int = 1) -> Iterator[tuple[int, int]]:
    """``(top, bottom)`` row ranges that cover ``range(height)`` in order, each of about ``BAND_PIXELS``
    pixels of a ``width``-pixel-wide image and at least ``min_rows`` rows (the last may be shorter)."""
    rows = max(1, min_rows, BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, min(height, top + rows)


def upsample_grid(
    grid_values: NDArray[np.floating],
    grid_box: GridBox,
    size: tuple[int, int],
    resample: str = "lanczos",
) -> NDArray[np.float32]:
    """Resample the ``grid_box`` part of a grid map to ``size = (width, height)`` pixels.

    Returns a ``(height, width)`` float32 array (Pillow resamples in float32) clipped to the input's
    value range (Lanczos rings). It is filled band by band from Pillow's image, so the only full-size
    memory besides Pillow's is the result itself.
    """
    values = np.asarray(grid_values, dtype=np.float32)
    picture = Image.fromarray(values, mode="F")
    resized = picture.resize(size, resample=resample_filter(resample), box=grid_box)
    width, height = size
    low, high = values.min(), values.max()
    out = np.empty((height, width), dtype=np.float32)
    for top, bottom in row_bands(height, width):
        np.clip(np.asarray(resized.crop((0, top, width, bottom))), low, high, out=out[top:bottom])
    return out


def grid_cell_of_pixel(
    point: tuple[float, float], image_size: tuple[int, int], grid_box: GridBox, grid: tuple[int, int]
) -> tuple[int, int]:
    """``(row, col)`` of the grid cell under pixel ``point = (x, y)`` of the original image."""
    width, height = image_size
    gx0, gy0, gx1, gy1 = grid_box
    col = gx0 + (point[0] / width) * (gx1 - gx0)
    row = gy0 + (point[1] / height) * (gy1 - gy0)
    rows, cols = grid
    return (min(rows - 1, max(0, int(row))), min(cols - 1, max(0, int(col))))


ZOOM_MIN_SHARE = 0.3
"""The zoom crop's shorter side is at least this share of the image's shorter side, so the crop keeps
some context around a small attended region (ViCrop's crops keep a similar share)."""


def zoom_box(
    mask: NDArray[np.floating],
    *,
    threshold: float = 0.5,
    margin: float = 0.25,
    min_share: float = ZOOM_MIN_SHARE,
    aspect: float = 1.0,
) -> tuple[int, int, int, int]:
    """The crop ``(x0, y0, x1, y1)`` (pixels, ``x1``/``y1`` exclusive) that zooms on the attended region of
    a pixel ``mask`` (``(H, W)``; a grid map works too, in grid cells), ViCrop-style.

    The attended region is the box of the pixels at or above ``threshold`` times the mask's maximum that
    are reached from the peak: the search starts in a window of the minimum crop size around the peak and
    grows while the region touches the window's edge, so a region far from the peak is not pulled in. The
    box is grown by ``margin`` of its size on each side, to at least ``min_share`` of the image's shorter
    side, to the ``aspect`` (width / height) of the target's input (1 for LLaVA-style square inputs), kept
    centred on the region and then shifted (not shrunk) inside the image; only a side longer than the
    image's is cut to it.

    Example:
        >>> mask = np.zeros((100, 200))
        >>> mask[40:50, 150:160] = 1.0
        >>> zoom_box(mask, min_share=0.3)
        (140, 30, 170, 60)
    """
    values = np.asarray(mask)  # not copied: read band by band, as a 64 MP float32 mask can be
    if values.ndim != 2 or values.size == 0:
        raise InvalidParameterError(f"zoom_box needs a non-empty 2-D mask, got shape {values.shape}")
    if not aspect > 0 or not 0.0 < min_share <= 1.0 or margin < 0:
        raise InvalidParameterError(
            f"need aspect > 0, 0 < min_share <= 1 and margin >= 0; got {aspect}, {min_share}, {margin}"
        )
    height, width = values.shape
    (peak_col, peak_row), peak = _clipped_peak(values)
    level = threshold * peak
    min_side = min_share * min(width, height)
    window = _fit_box((peak_col + 0.5, peak_row + 0.5), min_side, min_side, (width, height))
    grow = max(1.0, min_side / 2)
    previous = None
    while True:
        rounded = tuple(round(v) for v in window)
        if rounded == previous:
            break
        wx0, wy0, wx1, wy1 = previous = rounded
        region = _region_in_window(values, rounded, level)
        touches = (
            (region[0] == wx0 and wx0 > 0)
            or (region[1] == wy0 and wy0 > 0)
            or (region[2] == wx1 and wx1 < width)
            or (region[3] == wy1 and wy1 < height)
        )
        if not touches:
            break
        window = (
            max(0.0, region[0] - grow),
            max(0.0, region[1] - grow),
            min(float(width), region[2] + grow),
            min(float(height), region[3] + grow),
        )
    rx0, ry0, rx1, ry1 = region
    box_width = max((rx1 - rx0) * (1 + 2 * margin), min_side)
    box_height = max((ry1 - ry0) * (1 + 2 * margin), min_side)
    box_width, box_height = max(box_width, box_height * aspect), max(box_height, box_width / aspect)
    x0, y0, x1, y1 = _fit_box(((rx0 + rx1) / 2, (ry0 + ry1) / 2), box_width, box_height, (width, height))
    return (round(x0), round(y0), round(x1), round(y1))


def _clipped_peak(values: NDArray[np.floating]) -> tuple[tuple[int, int], float]:
    """``(x, y)`` of the first maximum of ``clip(values, 0, 1)`` and that maximum, read band by band."""
    height, width = values.shape
    best, where = -1.0, (0, 0)
    for top, bottom in row_bands(height, width):
        band = np.clip(values[top:bottom], 0.0, 1.0)
        index = int(np.argmax(band))
        if band.flat[index] > best:
            best, where = float(band.flat[index]), (index % width, top + index // width)
    return where, best


def _region_in_window(
    values: NDArray[np.floating], window: tuple[int, int, int, int], level: float
) -> tuple[int, int, int, int]:
    """The box of the pixels of ``window`` where ``clip(values, 0, 1) >= level`` (the window holds at least
    one: the peak), read band by band."""
    x0, y0, x1, y1 = window
    rows_hit = np.zeros(y1 - y0, dtype=bool)
    cols_hit = np.zeros(x1 - x0, dtype=bool)
    for top, bottom in row_bands(y1 - y0, x1 - x0):
        inside = np.clip(values[y0 + top : y0 + bottom, x0:x1], 0.0, 1.0) >= level
        rows_hit[top:bottom] = inside.any(axis=1)
        cols_hit |= inside.any(axis=0)
    rows, cols = np.flatnonzero(rows_hit), np.flatnonzero(cols_hit)
    return (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)


def _fit_box(
    centre: tuple[float, float], box_width: float, box_height: float, size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """A ``box_width x box_height`` box centred on ``centre``, shifted inside ``size = (width, height)``;
    a side longer than the image's is cut to it."""
    width, height = size
    box_width, box_height = min(box_width, float(width)), min(box_height, float(height))
    x0 = min(max(centre[0] - box_width / 2, 0.0), width - box_width)
    y0 = min(max(centre[1] - box_height / 2, 0.0), height - box_height)
    return (x0, y0, x0 + box_width, y0 + box_height)


def scale_box(
    box: tuple[float, float, float, float], from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A box measured on a ``from_size = (width, height)`` map (e.g. the part of a grid that covers the
    image) in pixels of an image of ``to_size``, rounded outwards and kept inside the image.

    Example:
        >>> scale_box((1, 1, 2, 3), (4, 4), (400, 200))
        (100, 50, 200, 150)
    """
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x0, y0, x1, y1 = box
    return (
        max(0, int(np.floor(x0 * sx))),
        max(0, int(np.floor(y0 * sy))),
        min(to_size[0], int(np.ceil(x1 * sx))),
        min(to_size[1], int(np.ceil(y1 * sy))),
    )
