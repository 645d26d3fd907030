"""Letterbox geometry: grid cells map back onto the right pixels of non-square images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from api_tool import geometry
from api_tool.errors import InvalidParameterError
from api_tool.geometry import Letterbox, grid_cell_of_pixel, resample_filter, row_bands, upsample_grid


@pytest.mark.parametrize(
    ("size", "scaled", "offset"),
    [((224, 224), (224, 224), (0, 0)), ((448, 224), (224, 112), (0, 56)), ((100, 300), (75, 224), (74, 0))],
)
def test_fit_keeps_aspect_and_centres(size, scaled, offset) -> None:
    letterbox = Letterbox.fit(size, 224)
    assert letterbox.scaled_size == scaled and letterbox.offset == offset


def test_apply_pads_with_fill_and_places_content() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    boxed = np.asarray(Letterbox.fit(image.size, 16).apply(image, (1, 2, 3)))
    assert boxed.shape == (16, 16, 3)
    assert (boxed[:4] == (1, 2, 3)).all() and (boxed[12:] == (1, 2, 3)).all()
    assert (boxed[4:12] == (255, 0, 0)).all()


@pytest.mark.parametrize("image_size", [(300, 100), (100, 300), (257, 131)])
def test_one_hot_cell_lands_on_its_pixels(image_size: tuple[int, int]) -> None:
    grid = (8, 8)
    letterbox = Letterbox.fit(image_size, 128)
    box = letterbox.grid_box(grid)
    width, height = image_size
    point = (0.8 * width, 0.3 * height)
    row, col = grid_cell_of_pixel(point, image_size, box, grid)
    mask = np.zeros(grid)
    mask[row, col] = 1.0
    pixels = upsample_grid(mask, box, image_size, resample="nearest")
    assert pixels.shape == (height, width)
    assert pixels[int(point[1]), int(point[0])] == 1.0
    # a pixel is lit exactly when its centre's grid position falls in cell (row, col) (edges: either way)
    gx = box[0] + (np.arange(width) + 0.5) / width * (box[2] - box[0])
    gy = box[1] + (np.arange(height) + 0.5) / height * (box[3] - box[1])
    eps = 1e-6
    inside = np.outer((gy > row + eps) & (gy < row + 1 - eps), (gx > col + eps) & (gx < col + 1 - eps))
    closed = np.outer((gy >= row - eps) & (gy <= row + 1 + eps), (gx >= col - eps) & (gx <= col + 1 + eps))
    lit = pixels == 1.0
    assert lit[inside].all() and not lit[~closed].any()
    smooth = upsample_grid(mask, box, image_size, resample="lanczos")
    peak_y, peak_x = np.unravel_index(smooth.argmax(), smooth.shape)
    assert grid_cell_of_pixel((peak_x, peak_y), image_size, box, grid) == (row, col)
    assert smooth.min() >= 0.0 and smooth.max() <= 1.0


def test_unknown_resample_is_rejected() -> None:
    with pytest.raises(InvalidParameterError, match="resample"):
        upsample_grid(np.zeros((2, 2)), (0, 0, 2, 2), (4, 4), resample="cubic-ish")


@pytest.mark.parametrize("resample", ["nearest", "bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize("band_pixels", [1, 97, 10**9])
def test_upsample_is_float32_pillow_resize_clipped_in_any_bands(
    resample: str, band_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 (half of float64's memory at pixel size); the values are Pillow's float32 resize, clipped
    to the grid's range, whatever the band size."""
    grid = np.random.default_rng(4).random((6, 6))
    box, size = (0.0, 1.5, 6.0, 4.5), (97, 48)
    monkeypatch.setattr(geometry, "BAND_PIXELS", band_pixels)
    pixels = upsample_grid(grid, box, size, resample=resample)
    assert pixels.dtype == np.float32 and pixels.shape == (48, 97)
    values = grid.astype(np.float32)
    resized = np.asarray(Image.fromarray(values).resize(size, resample=resample_filter(resample), box=box))
    np.testing.assert_array_equal(pixels, np.clip(resized, values.min(), values.max()))


@pytest.mark.parametrize(("height", "width"), [(0, 5), (1, 1), (7, 3), (30, 40), (1000, 1)])
@pytest.mark.parametrize("band_pixels", [1, 20, 121, 10**9])
@pytest.mark.parametrize("min_rows", [1, 4])
def test_row_bands_cover_every_row_once(
    height: int, width: int, band_pixels: int, min_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(geometry, "BAND_PIXELS", band_pixels)
    bands = list(row_bands(height, width, min_rows=min_rows))
    assert [row for top, bottom in bands for row in range(top, bottom)] == list(range(height))
    rows = max(min_rows, band_pixels // width, 1)
    assert all(bottom - top == rows for top, bottom in bands[:-1])
