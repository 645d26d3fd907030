"""The map merge of ``api_tool.maps`` on a batch of maps at once, on the model's device.

``combine_maps_batched`` takes ``(B, h, w)`` tensors and applies, map by map, exactly the recipe of
``api_tool.maps.combine_maps`` (the NumPy reference, kept as the literal version the tests compare with):
minmax, ``sigmoid(coe * zscore)`` with the sample standard deviation, a k x k mean filter with replicate
padding and the soft OR. It runs in float64 where the device has it (every device but Apple's MPS), so it
equals the reference to float64 rounding; nothing leaves the device.

``upsample_batched`` is ``api_tool.geometry.upsample_grid`` on the device: Pillow's resampling of a
float image (bilinear, bicubic or Lanczos, with the crop box that drops the letterbox padding) written as
two weight matrices, ``out = W_rows @ map @ W_cols^T``, whose rows are Pillow's own normalised filter
taps (``pillow_resample_weights``).

Example:
    >>> import torch
    >>> maps = torch.arange(18.0, dtype=torch.float64).reshape(2, 3, 3)
    >>> mask = combine_maps_batched(maps, None, combine="cls", enhance_coe=1.0, kernel_size=1)
    >>> mask.amin(dim=(1, 2)).tolist(), mask.amax(dim=(1, 2)).tolist()
    ([0.0, 0.0], [1.0, 1.0])
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from api_tool.errors import InvalidParameterError
from api_tool.geometry import GridBox
from api_tool.maps import Combine, check_combine_options

__all__ = [
    "PILLOW_FILTERS",
    "box_filter_batched",
    "combine_maps_batched",
    "enhance_batched",
    "merge_dtype",
    "minmax_batched",
    "pillow_resample_weights",
    "upsample_batched",
]


def merge_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 on a device without float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def minmax_batched(values: torch.Tensor) -> torch.Tensor:
    """Each ``(h, w)`` map of ``(B, h, w)`` rescaled to [0, 1]; a constant map becomes zeros."""
    low = values.amin(dim=(-2, -1), keepdim=True)
    spread = values.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(spread > 0, (values - low) / torch.where(spread > 0, spread, 1.0), 0.0)


def enhance_batched(values: torch.Tensor, coe: float) -> torch.Tensor:
    """``sigmoid(coe * (x - mean) / std)`` per map, std with one degree of freedom; a constant map (or a
    single cell) gives 0.5."""
    cells = values.shape[-2] * values.shape[-1]
    mean = values.mean(dim=(-2, -1), keepdim=True)
    std = values.std(dim=(-2, -1), keepdim=True, correction=1) if cells > 1 else torch.zeros_like(mean)
    z = coe * (values - mean) / torch.where(std > 0, std, 1.0)
    return torch.where(std > 0, torch.sigmoid(z), 0.5)


def box_filter_batched(values: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """k x k mean filter with replicate padding on each map of ``(B, h, w)`` (odd ``k``)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InvalidParameterError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if kernel_size == 1:
        return values.clone()
    radius = kernel_size // 2
    padded = F.pad(values[:, None], (radius, radius, radius, radius), mode="replicate")
    return F.avg_pool2d(padded, kernel_size, stride=1)[:, 0]


def combine_maps_batched(
    cls: torch.Tensor,
    comp: torch.Tensor | None,
    *,
    combine: Combine = "paper",
    enhance_coe: float = 10.0,
    kernel_size: int = 3,
) -> torch.Tensor:
    """``api_tool.maps.combine_maps`` on every map of ``(B, h, w)`` tensors at once (see there for the
    recipes), in the inputs' dtype on their device.

    Example:
        >>> cls = torch.rand(4, 5, 5, dtype=torch.float64)
        >>> combine_maps_batched(cls, torch.rand(4, 5, 5, dtype=torch.float64)).shape
        torch.Size([4, 5, 5])
    """
    check_combine_options(combine, enhance_coe, kernel_size, has_comp=comp is not None)
    if combine in ("paper", "cls"):
        cls_part = box_filter_batched(enhance_batched(minmax_batched(cls), enhance_coe), kernel_size)
        if combine == "cls":
            return minmax_batched(cls_part)
    assert comp is not None
    if combine == "comp":
        return minmax_batched(box_filter_batched(minmax_batched(comp), kernel_size))
    comp_part = box_filter_batched(1.0 - minmax_batched(comp), kernel_size)
    if combine == "comp_inverted":
        return minmax_batched(comp_part)
    return minmax_batched(cls_part + comp_part - cls_part * comp_part)


def _bilinear(x: NDArray[np.float64]) -> NDArray[np.float64]:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: NDArray[np.float64]) -> NDArray[np.float64]:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _lanczos(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


PILLOW_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}
"""Pillow's convolution filters and their supports (``libImaging/Resample.c``)."""


def pillow_resample_weights(
    in_size: int, start: float, end: float, out_size: int, resample: str = "lanczos"
) -> NDArray[np.float64]:
    """The ``(out_size, in_size)`` matrix with which Pillow resamples the span ``[start, end)`` of
    ``in_size`` samples to ``out_size`` samples along one axis: row ``i`` holds the normalised taps of
    output sample ``i`` (the filter widened by the downscale factor, as Pillow's antialiasing does).

    Example:
        >>> pillow_resample_weights(2, 0.0, 2.0, 4, "bilinear").round(3).tolist()
        [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
    """
    if resample not in PILLOW_FILTERS:
        raise InvalidParameterError(f"device resampling supports {sorted(PILLOW_FILTERS)}, got {resample!r}")
    kernel, support = PILLOW_FILTERS[resample]
    scale = (end - start) / out_size
    filter_scale = max(scale, 1.0)
    support *= filter_scale
    weights = np.zeros((out_size, in_size))
    for index in range(out_size):
        center = start + (index + 0.5) * scale
        first = max(0, math.trunc(center - support + 0.5))
        last = min(in_size, math.trunc(center + support + 0.5))
        taps = kernel((np.arange(first, last) - center + 0.5) / filter_scale)
        total = taps.sum()
        weights[index, first:last] = taps / total if total != 0.0 else taps
    return weights


def upsample_batched(
    masks: torch.Tensor, grid_box: GridBox, size: tuple[int, int], resample: str = "lanczos"
) -> torch.Tensor:
    """``api_tool.geometry.upsample_grid`` for each map of ``(B, h, w)`` on its device: the ``grid_box``
    part stretched to ``size = (width, height)`` pixels, ``(B, height, width)`` float32, each map clipped
    to its own value range. Equals Pillow's result within float32 rounding.

    Example:
        >>> pixels = upsample_batched(torch.rand(2, 4, 4), (0.0, 1.0, 4.0, 3.0), (40, 20))
        >>> pixels.shape
        torch.Size([2, 20, 40])
    """
    width, height = size
    x0, y0, x1, y1 = grid_box
    dtype = merge_dtype(masks.device)
    rows = torch.from_numpy(pillow_resample_weights(masks.shape[-2], y0, y1, height, resample))
    cols = torch.from_numpy(pillow_resample_weights(masks.shape[-1], x0, x1, width, resample))
    values = masks.to(dtype)
    out = rows.to(masks.device, dtype) @ values @ cols.to(masks.device, dtype).T
    low = values.amin(dim=(-2, -1), keepdim=True)
    high = values.amax(dim=(-2, -1), keepdim=True)
    return torch.maximum(torch.minimum(out, high), low).float()
