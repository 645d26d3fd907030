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
