"""Map post-processing against literal torch versions of the authors' operations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from api_tool.errors import InvalidParameterError
from api_tool.geometry import full_grid_box, upsample_grid
from api_tool.maps import AttributionMap, box_filter, combine_maps, enhance, minmax, soft_or


def torch_mean_filter(values: np.ndarray, kernel_size: int) -> np.ndarray:
    """The authors' smoothing: a Conv2d of ones / k^2 with replicate padding."""
    conv = torch.nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2, padding_mode="replicate", bias=False)
    conv.weight.data = torch.ones_like(conv.weight.data, dtype=torch.float64) / kernel_size**2
    with torch.no_grad():
        return conv.double()(torch.from_numpy(values)[None, None])[0, 0].numpy()


def torch_enhance(values: np.ndarray, coe: float) -> np.ndarray:
    tensor = torch.from_numpy(values)
    return torch.sigmoid((tensor - tensor.mean()) / tensor.std() * coe).numpy()


@pytest.fixture
def raw() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(7, 9))


def test_minmax_and_constant_maps(raw: np.ndarray) -> None:
    scaled = minmax(raw)
    assert scaled.min() == 0.0 and scaled.max() == 1.0
    np.testing.assert_allclose(scaled, (raw - raw.min()) / (raw.max() - raw.min()))
    np.testing.assert_array_equal(minmax(np.full((3, 3), 2.5)), np.zeros((3, 3)))


def test_enhance_matches_torch_sigmoid_of_zscore(raw: np.ndarray) -> None:
    np.testing.assert_allclose(enhance(raw, 10.0), torch_enhance(raw, 10.0), atol=1e-12)
    np.testing.assert_array_equal(enhance(np.ones((2, 2)), 5.0), np.full((2, 2), 0.5))


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7])
def test_box_filter_matches_replicate_padded_conv(raw: np.ndarray, kernel_size: int) -> None:
    np.testing.assert_allclose(box_filter(raw, kernel_size), torch_mean_filter(raw, kernel_size), atol=1e-12)


@pytest.mark.parametrize("kernel_size", [0, 2, -3])
def test_box_filter_rejects_even_or_non_positive_kernels(kernel_size: int) -> None:
    with pytest.raises(InvalidParameterError, match="odd"):
        box_filter(np.zeros((3, 3)), kernel_size)


def test_paper_merge_matches_the_literal_recipe(raw: np.ndarray) -> None:
    comp = np.random.default_rng(1).normal(size=raw.shape)
    cls_part = torch_mean_filter(torch_enhance(minmax(raw), 10.0), 3)
    comp_part = torch_mean_filter((comp.max() - comp) / (comp.max() - comp.min()), 3)
    expected = minmax(cls_part + comp_part - cls_part * comp_part)
    np.testing.assert_allclose(combine_maps(raw, comp), expected, atol=1e-12)


def test_combine_modes(raw: np.ndarray) -> None:
    comp = np.random.default_rng(2).normal(size=raw.shape)
    np.testing.assert_allclose(combine_maps(raw, comp, combine="comp", kernel_size=1), minmax(comp))
    np.testing.assert_allclose(combine_maps(raw, comp, combine="comp_inverted", kernel_size=1), 1 - minmax(comp))
    cls_only = combine_maps(raw, None, combine="cls", enhance_coe=1.0, kernel_size=1)
    np.testing.assert_allclose(cls_only, minmax(torch_enhance(minmax(raw), 1.0)), atol=1e-12)
    assert np.unravel_index(cls_only.argmax(), raw.shape) == np.unravel_index(raw.argmax(), raw.shape)
    with pytest.raises(InvalidParameterError, match="combine must be one of"):
        combine_maps(raw, comp, combine="average")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="needs a Psi_comp"):
        combine_maps(raw, None, combine="paper")
    for bad in (0.0, -3.0, float("nan")):
        with pytest.raises(InvalidParameterError, match="enhance_coe must be positive"):
            combine_maps(raw, None, combine="cls", enhance_coe=bad)


def test_soft_or_is_probabilistic_or() -> None:
    a, b = np.array([0.0, 1.0, 0.5]), np.array([0.0, 0.2, 0.5])
    np.testing.assert_allclose(soft_or(a, b), 1 - (1 - a) * (1 - b))


def test_attribution_map_upsample_defaults_to_image_size() -> None:
    mask = np.zeros((4, 4))
    mask[1, 2] = 1.0
    amap = AttributionMap(mask, None, mask, (40, 40), full_grid_box((4, 4)), "q")
    pixels = amap.upsample(resample="nearest")
    assert pixels.shape == (40, 40) and amap.grid_shape == (4, 4)
    assert pixels[10:20, 20:30].min() == 1.0 and pixels.sum() == 100.0


def test_attribution_map_upsample_is_float32_at_the_requested_size() -> None:
    mask = np.random.default_rng(5).random((4, 4))
    amap = AttributionMap(mask, None, mask, (40, 30), (0.0, 0.5, 4.0, 3.5), "q")
    pixels = amap.upsample(size=(20, 10), resample="bilinear")
    assert pixels.dtype == np.float32 and pixels.shape == (10, 20)
    np.testing.assert_array_equal(pixels, upsample_grid(mask, amap.grid_box, (20, 10), resample="bilinear"))
    assert amap.upsample().shape == (30, 40)
