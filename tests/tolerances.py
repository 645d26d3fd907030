"""Tolerances that follow the dtype and the size of the sum, so the suite passes on every machine.

A float32 sum of ``n`` terms of magnitude ``s`` may land anywhere within about ``n * eps * s`` of the
exact value (``eps`` = 1.2e-7 for float32, 2.2e-16 for float64), and machines legitimately differ
inside that band: AVX2 and AVX-512 kernels, 1 or 2 threads, and GPU kernels add in other orders.
A test that compares two correct computations must allow that band, never a fixed ``1e-9``.

Example:
    >>> round(sum_tolerance(64), 9)
    7.629e-06
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike


def sum_tolerance(n_terms: int, dtype: DTypeLike = np.float32, scale: float = 1.0) -> float:
    """The rounding band of a sum of ``n_terms`` terms of magnitude ``scale`` computed in ``dtype``."""
    return n_terms * float(np.finfo(dtype).eps) * scale


def assert_sums_close(actual: ArrayLike, expected: ArrayLike, n_terms: int, dtype: DTypeLike = np.float32) -> None:
    """``actual`` equals ``expected`` within the rounding band of ``n_terms``-term sums in ``dtype``,
    scaled by the largest magnitude in ``expected`` (absolute, so entries near zero are not held to a
    relative bound they cannot meet)."""
    expected_array = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected_array).max(initial=0.0)), float(np.finfo(dtype).tiny))
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected_array, rtol=0, atol=sum_tolerance(n_terms, dtype, scale)
    )
