"""Attribution maps and the pure post-processing that turns raw scores into a [0, 1] mask.

Every function here takes and returns NumPy arrays on the patch grid (``h x w``); none touches a
model, a file or LangChain. The post-processing reproduces the paper's reference implementation:

* ``minmax``: (x - min) / (max - min)
* ``enhance``: sigmoid(coe * zscore(x)) with the *sample* standard deviation (ddof=1), as torch's
  ``Tensor.std`` computes it in the authors' code
* ``box_filter``: k x k mean filter with replicate padding (odd k)
* ``soft_or``: a + b - a * b

These NumPy functions are the literal reference; ``api_tool.backends.batched_maps`` computes the same
merge on a batch of maps on the model's device and is tested against them.

Example:
    >>> import numpy as np
    >>> from api_tool.maps import combine_maps
    >>> cls = np.arange(9.0).reshape(3, 3)
    >>> mask = combine_maps(cls, None, combine="cls", enhance_coe=1.0, kernel_size=1)
    >>> float(mask.min()), float(mask.max())
    (0.0, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from api_tool.errors import InvalidParameterError
from api_tool.geometry import GridBox, upsample_grid

Combine = Literal["paper", "cls", "comp", "comp_inverted"]
COMBINE_MODES: tuple[str, ...] = ("paper", "cls", "comp", "comp_inverted")

FloatArray = NDArray[np.float64]


def minmax(values: NDArray[np.floating]) -> FloatArray:
    """Rescale to [0, 1]; a constant map becomes all zeros (nothing stands out)."""
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    if high - low <= 0.0:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def invert_minmax(values: NDArray[np.floating]) -> FloatArray:
    """(max - x) / (max - min): the paper's inverted normalisation of Psi_comp."""
    return 1.0 - minmax(values)


def enhance(values: NDArray[np.floating], coe: float) -> FloatArray:
    """sigmoid(coe * (x - mean) / std), std with ddof=1; a constant map stays at 0.5."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std(ddof=1) if values.size > 1 else 0.0
    if std <= 0.0:
        return np.full_like(values, 0.5)
    z = coe * (values - values.mean()) / std
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def box_filter(values: NDArray[np.floating], kernel_size: int) -> FloatArray:
    """k x k mean filter with replicate ("edge") padding; the output has the input's shape."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InvalidParameterError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    values = np.asarray(values, dtype=np.float64)
    if kernel_size == 1:
        return values.copy()
    radius = kernel_size // 2
    padded = np.pad(values, radius, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kernel_size, kernel_size))
    return windows.mean(axis=(-2, -1))


def soft_or(a: NDArray[np.floating], b: NDArray[np.floating]) -> FloatArray:
    """Probabilistic OR of two [0, 1] maps: a + b - a * b."""
    return np.asarray(a, dtype=np.float64) + b - np.asarray(a, dtype=np.float64) * b


def check_combine_options(combine: str, enhance_coe: float, kernel_size: int, *, has_comp: bool) -> None:
    """``InvalidParameterError`` naming the problem for an unknown ``combine``, a non-positive
    ``enhance_coe``, an even or non-positive ``kernel_size``, or a recipe that needs Psi_comp without it.

    Example:
        >>> check_combine_options("paper", 10.0, 3, has_comp=True)
    """
    if combine not in COMBINE_MODES:
        raise InvalidParameterError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if not enhance_coe > 0:
        raise InvalidParameterError(f"enhance_coe must be positive (10 in the paper), got {enhance_coe}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise InvalidParameterError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if combine != "cls" and not has_comp:
        raise InvalidParameterError(f"combine={combine!r} needs a Psi_comp map; this backend gives only cls")


def combine_maps(
    cls: NDArray[np.floating],
    comp: NDArray[np.floating] | None,
    *,
    combine: Combine = "paper",
    enhance_coe: float = 10.0,
    kernel_size: int = 3,
) -> FloatArray:
    """Turn the raw maps into the [0, 1] mask.

    ``combine`` chooses the recipe:

    * ``"paper"``: minmax(box(sigmoid(coe * z(minmax(cls)))) OR box(1 - minmax(comp))), the
      authors' merge, with Psi_comp inverted (a large-CLIP "register token" effect);
    * ``"cls"``: minmax(box(sigmoid(coe * z(minmax(cls))))), Psi_cls alone (also the LLaVA recipe);
    * ``"comp"``: minmax(box(minmax(comp))), Psi_comp not inverted;
    * ``"comp_inverted"``: minmax(box(1 - minmax(comp))).
    """
    check_combine_options(combine, enhance_coe, kernel_size, has_comp=comp is not None)
    if combine in ("paper", "cls"):
        cls_part = box_filter(enhance(minmax(cls), enhance_coe), kernel_size)
        if combine == "cls":
            return minmax(cls_part)
    assert comp is not None
    if combine == "comp":
        return minmax(box_filter(minmax(comp), kernel_size))
    comp_part = box_filter(invert_minmax(comp), kernel_size)
    if combine == "comp_inverted":
        return minmax(comp_part)
    return minmax(soft_or(cls_part, comp_part))


@dataclass(frozen=True)
class AttributionMap:
    """Query-guided relevance of each image region, on the model's patch grid.

    Attributes:
        raw: the backend's raw map on its grid, ``h x w``: Psi_cls for CLIP, the head- and step-averaged
            attention to the image tokens for an LVLM (several tiles stitched onto one grid).
        comp: raw Psi_comp (CLIP only), ``h x w``, or ``None``.
        mask: the processed map in [0, 1], ``h x w``; what is rendered.
        image_size: ``(width, height)`` of the original image, in pixels.
        grid_box: where the original image lies on the grid (letterbox geometry).
        query: the text the map answers.
        metadata: backend name, layer, combine mode and other parameters (JSON-safe values).

    Example:
        >>> pixels = attribution_map.upsample()  # doctest: +SKIP
        >>> pixels.shape == (attribution_map.image_size[1], attribution_map.image_size[0])  # doctest: +SKIP
        True
    """

    raw: FloatArray
    comp: FloatArray | None
    mask: FloatArray
    image_size: tuple[int, int]
    grid_box: GridBox
    query: str
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def cls(self) -> FloatArray:
        """CLIP's raw Psi_cls: the same array as ``raw`` (the name LVLM maps should not be read by)."""
        return self.raw

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the patch grid."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def upsample(self, size: tuple[int, int] | None = None, resample: str = "lanczos") -> NDArray[np.float32]:
        """The mask at pixel size, ``(height, width)`` float32, aligned with the original image, in [0, 1].

        ``size`` is ``(width, height)``; it defaults to the original image size. Only the part of
        the grid that covers the image (not the letterbox padding) is stretched onto it. float32 is
        the precision Pillow resamples in, and half the memory of float64 (256 MiB at 64 MP).
        """
        width, height = size if size is not None else self.image_size
        return upsample_grid(self.mask, self.grid_box, (width, height), resample=resample)
