"""All coordinate geometry between the original image, the model input and the patch grid.

The package *letterboxes*: the image is scaled so its longer side fits the model's square input and
the shorter side is padded evenly (with the model's mean colour, which normalises to zero). Nothing
is cropped, so every pixel of the original image has a place on the patch grid, and a map on the
grid maps back onto the image exactly. (The authors' code centre-crops and then stretches the mask
over the whole image, which misaligns it on non-square images.)

Coordinates are ``(x0, y0, x1, y1)`` boxes with x to the right and y down; a grid box is measured
in patch units (cell ``(row, col)`` spans ``[col, col + 1] x [row, row + 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from api_tool.errors import InvalidParameterError

Box = tuple[float, float, float, float]
GridBox = Box

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
        canvas.paste(image.convert("RGB").resize(self.scaled_size, Image.Resampling.BICUBIC), self.offset)
        return canvas


def full_grid_box(grid: tuple[int, int]) -> GridBox:
    """The grid box of an image that fills the whole grid (no padding)."""
    rows, cols = grid
    return (0.0, 0.0, float(cols), float(rows))


def upsample_grid(
    grid_values: NDArray[np.floating],
    grid_box: GridBox,
    size: tuple[int, int],
    resample: str = "lanczos",
) -> NDArray[np.float64]:
    """Resample the ``grid_box`` part of a grid map to ``size = (width, height)`` pixels.

    Returns a ``(height, width)`` float array clipped to the input's value range (Lanczos rings).
    """
    values = np.asarray(grid_values, dtype=np.float32)
    picture = Image.fromarray(values, mode="F")
    resized = picture.resize(size, resample=resample_filter(resample), box=grid_box)
    out = np.asarray(resized, dtype=np.float64)
    return np.clip(out, float(values.min()), float(values.max()))


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
