"""Rendering styles against their literal per-pixel definitions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from api_tool import geometry
from api_tool.errors import InvalidParameterError
from api_tool.render import STYLES, attention_box, jet_colors, render


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


def literal_contour(image: Image.Image, mask: np.ndarray, threshold: float, line_width: int) -> np.ndarray:
    """The outline as Pillow's rank filters define it: dilation minus erosion, edge pixels replicated."""
    inside = Image.fromarray(((np.clip(mask, 0, 1) >= threshold) * 255).astype(np.uint8))
    size = 2 * line_width + 1
    grown = np.asarray(inside.filter(ImageFilter.MaxFilter(size))) > 0
    shrunk = np.asarray(inside.filter(ImageFilter.MinFilter(size))) > 0
    pixels = np.array(image)
    pixels[grown & ~shrunk] = (0, 0, 255)
    return pixels


@pytest.fixture
def blobs() -> np.ndarray:
    """A smooth random mask (30 x 40) in [0, 1] whose attended regions touch the image borders."""
    coarse = np.random.default_rng(3).random((4, 5)).astype(np.float32)
    smooth = np.asarray(Image.fromarray(coarse).resize((40, 30), Image.Resampling.BICUBIC), dtype=np.float64)
    return np.clip(smooth, 0.0, 1.0)


@pytest.mark.parametrize("line_width", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8])
def test_contour_is_the_rank_filter_outline(
    image: Image.Image, blobs: np.ndarray, line_width: int, threshold: float
) -> None:
    out = render(image, blobs, "contour", threshold=threshold, line_width=line_width, color=(0, 0, 255))
    np.testing.assert_array_equal(np.asarray(out), literal_contour(image, blobs, threshold, line_width))


@pytest.mark.parametrize("gray_level", [0, 127, 255])
def test_gray_blend_of_a_float32_mask_is_the_float64_formula(
    image: Image.Image, blobs: np.ndarray, gray_level: int
) -> None:
    """The blend is computed in float64 from the float32 mask, so it equals the literal formula exactly."""
    mask32 = blobs.astype(np.float32)
    out = np.asarray(render(image, mask32, "gray", gray_level=gray_level))
    weight = mask32.astype(np.float64)[..., None]
    expected = np.rint(np.asarray(image, dtype=np.float64) * weight + (1.0 - weight) * gray_level)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_heatmap_is_the_literal_alpha_blend(image: Image.Image, blobs: np.ndarray) -> None:
    out = np.asarray(render(image, blobs.astype(np.float32), "heatmap", alpha=0.3))
    heat = jet_colors(blobs.astype(np.float32)).astype(np.float64)
    expected = np.rint(0.7 * np.asarray(image, dtype=np.float64) + 0.3 * heat)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


@pytest.mark.parametrize("style", STYLES)
def test_mask_values_outside_0_1_are_clipped(image: Image.Image, blobs: np.ndarray, style: str) -> None:
    stretched = (blobs - 0.5) * 4.0  # from about -2 to 2
    np.testing.assert_array_equal(
        np.asarray(render(image, stretched, style, threshold=0.5)),  # type: ignore[arg-type]
        np.asarray(render(image, np.clip(stretched, 0.0, 1.0), style, threshold=0.5)),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("band_pixels", [1, 40, 41 * 3, 1000])
@pytest.mark.parametrize("style", STYLES)
def test_bands_of_rows_give_the_whole_image_result(
    image: Image.Image, blobs: np.ndarray, style: str, band_pixels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering works in bands of rows (BAND_PIXELS pixels each); any band size gives the same image."""
    options = {"style": style, "gray_level": 90, "alpha": 0.4, "threshold": 0.6, "line_width": 3}
    whole = np.asarray(render(image, blobs, **options))  # type: ignore[arg-type]
    assert blobs.size <= geometry.BAND_PIXELS  # the default band covers this small image at once
    monkeypatch.setattr(geometry, "BAND_PIXELS", band_pixels)
    np.testing.assert_array_equal(np.asarray(render(image, blobs, **options)), whole)  # type: ignore[arg-type]
