"""Rendering styles against their literal per-pixel definitions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from api_tool.errors import InvalidParameterError
from api_tool.render import attention_box, jet_colors, render


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8))


@pytest.fixture
def mask() -> np.ndarray:
    values = np.zeros((30, 40))
    values[10:20, 25:35] = 1.0
    values[0, 0] = 0.25
    return values


@pytest.mark.parametrize("gray_level", [0, 200])
def test_gray_blend_is_the_paper_formula(image: Image.Image, mask: np.ndarray, gray_level: int) -> None:
    out = np.asarray(render(image, mask, "gray", gray_level=gray_level), dtype=np.float64)
    pixels = np.asarray(image, dtype=np.float64)
    expected = pixels * mask[..., None] + (1 - mask[..., None]) * gray_level
    np.testing.assert_allclose(out, np.rint(expected))


def test_heatmap_alpha_extremes(image: Image.Image, mask: np.ndarray) -> None:
    np.testing.assert_array_equal(np.asarray(render(image, mask, "heatmap", alpha=0.0)), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(render(image, mask, "heatmap", alpha=1.0)), jet_colors(mask))
    low, high = jet_colors(np.array([0.0, 1.0]))
    assert low[2] > low[0] and high[0] > high[2]  # blue for low, red for high


def test_crop_is_the_attended_box_with_margin(image: Image.Image, mask: np.ndarray) -> None:
    assert attention_box(mask, 0.5, 0.0) == (25, 10, 35, 20)
    assert attention_box(mask, 0.5, 0.2) == (23, 8, 37, 22)
    cropped = render(image, mask, "crop", margin=0.0)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image)[10:20, 25:35])
    assert attention_box(np.zeros((5, 6))) == (0, 0, 6, 5)


def test_contour_outlines_only_the_boundary(image: Image.Image, mask: np.ndarray) -> None:
    out = np.asarray(render(image, mask, "contour", line_width=1, color=(0, 255, 0)))
    changed = (out != np.asarray(image)).any(axis=-1)
    ring = np.zeros(changed.shape, dtype=bool)
    ring[9:21, 24:36] = True
    ring[11:19, 26:34] = False  # the outline is the band around the region above the threshold
    np.testing.assert_array_equal(changed, ring)
    assert (out[ring] == (0, 255, 0)).all()


def test_render_errors(image: Image.Image, mask: np.ndarray) -> None:
    with pytest.raises(InvalidParameterError, match="style"):
        render(image, mask, "sepia")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="upsample"):
        render(image, mask[:10], "gray")
    with pytest.raises(InvalidParameterError, match="gray_level"):
        render(image, mask, "gray", gray_level=300)
