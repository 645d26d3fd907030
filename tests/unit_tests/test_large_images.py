"""Large images: the pixel-size stages (upsample, render, load) work in bounded memory.

NumPy's and Python's allocations are traced with ``tracemalloc`` (Pillow's image memory is not, so
those checks see the working arrays only); one subprocess test reads the kernel's peak RSS around a
whole ``attention_prompt`` call. The images here are a few megapixels; the 64 MP figures are in
``benchmarks/large_image_memory.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image

from api_tool import attention_prompt, geometry
from api_tool.geometry import full_grid_box
from api_tool.images import load_image
from api_tool.maps import AttributionMap
from api_tool.render import STYLES, render

T = TypeVar("T")
WIDTH, HEIGHT = 3000, 2000
PIXELS = WIDTH * HEIGHT
GRID = np.random.default_rng(6).random((7, 7))


def traced_peak(function: Callable[[], T]) -> tuple[T, int]:
    """``function()`` and the peak bytes NumPy and Python allocated during the call."""
    tracemalloc.start()
    try:
        result = function()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def smooth_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Bicubic-smoothed random colours plus noise, so that PNG files have a realistic size."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = smooth + rng.integers(-12, 13, size=smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


class GridAttributor:
    """An attributor stub that answers every query with the same map on a 7 x 7 grid."""

    name = "grid"

    def attribute(self, image: Image.Image, query: str) -> AttributionMap:
        return AttributionMap(GRID, None, GRID, image.size, full_grid_box(GRID.shape), query)

    def attribute_many(self, image: Image.Image, queries: list[str]) -> list[AttributionMap]:
        return [self.attribute(image, query) for query in queries]


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return smooth_image((WIDTH, HEIGHT), seed=0)


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return AttributionMap(GRID, None, GRID, (WIDTH, HEIGHT), full_grid_box(GRID.shape), "q").upsample()


def test_upsample_holds_only_the_float32_result(mask: np.ndarray) -> None:
    amap = AttributionMap(GRID, None, GRID, (WIDTH, HEIGHT), full_grid_box(GRID.shape), "q")
    pixels, peak = traced_peak(amap.upsample)
    assert pixels.dtype == np.float32 and pixels.shape == (HEIGHT, WIDTH)
    assert peak < 4 * PIXELS + 2**20 + 4 * geometry.BAND_PIXELS  # the result, plus one band in flight


@pytest.mark.parametrize("style", STYLES)
def test_render_works_in_bands_of_rows(
    image: Image.Image, mask: np.ndarray, style: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 16-row bands, no style allocates as much as one byte per pixel of NumPy working memory."""
    whole = np.asarray(render(image, mask, style))  # type: ignore[arg-type]
    monkeypatch.setattr(geometry, "BAND_PIXELS", 16 * WIDTH)
    rendered, peak = traced_peak(lambda: render(image, mask, style))  # type: ignore[arg-type]
    assert peak < PIXELS
    np.testing.assert_array_equal(np.asarray(rendered), whole)


def test_load_image_does_not_read_the_whole_file_into_memory(image: Image.Image, tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    image.save(path, compress_level=1)
    assert path.stat().st_size > PIXELS  # the noise keeps the file large: > 1 byte per pixel
    loaded, peak = traced_peak(lambda: load_image(path))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
    assert peak < PIXELS // 8


def test_attention_prompt_returns_a_float32_mask(image: Image.Image, mask: np.ndarray) -> None:
    result = attention_prompt(image, "q", attributor=GridAttributor())
    assert result.mask.dtype == np.float32
    np.testing.assert_array_equal(result.mask, mask)
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(render(image, mask, "gray")))


PEAK_RSS_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from pathlib import Path

    from tests.unit_tests.test_large_images import GridAttributor
    from api_tool import attention_prompt

    def status_mib(field):
        return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024

    attention_prompt(sys.argv[1], "warm-up", attributor=GridAttributor(), style="gray")  # imports, caches
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = status_mib("VmRSS")
    attention_prompt(sys.argv[2], "q", attributor=GridAttributor(), style=sys.argv[3])
    print(json.dumps({"rise_mib": status_mib("VmHWM") - before}))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_attention_prompt_peak_rss_stays_near_three_images(image: Image.Image, style: str, tmp_path: Path) -> None:
    """One call on a 6 MP PNG: the original (Pillow keeps RGB in 4 bytes a pixel), the float32 mask and
    the result are 12 bytes a pixel; the peak RSS rise stays under 16 (it was over 60 before banding)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    smooth_image((64, 48), seed=1).save(small)
    image.save(large, compress_level=1)
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", PEAK_RSS_SCRIPT, str(small), str(large), style]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=root, check=True)
    rise = json.loads(completed.stdout.strip().splitlines()[-1])["rise_mib"] * 2**20
    assert rise < 16 * PIXELS
