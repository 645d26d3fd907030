"""Shared helpers for the benchmark scripts: memory readings, environment, inputs, random CLIP weights.

The scripts in this folder import it as ``bench_utils`` (Python puts the script's own folder first on
``sys.path``), so run them as ``python benchmarks/<script>.py`` from anywhere.

Example:
    >>> from bench_utils import environment, peak_rss_mb, reset_peak_rss
    >>> reset_peak_rss()  # doctest: +SKIP
    >>> environment()["torch"]  # doctest: +SKIP
    '2.14.1'
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
DEFAULT_WEIGHTS_DIR = Path(os.environ.get("API_BENCH_WEIGHTS", "/tmp/api-bench-weights"))

QUESTIONS = (
    "Where is the red car parked?",
    "What colour is the cat on the sofa?",
    "How many people are standing near the door?",
    "Is there a dog in the garden?",
    "What is written on the sign above the shop?",
    "Which hand holds the umbrella?",
    "What is the man on the left wearing?",
    "Is the traffic light green or red?",
    "What fruit is in the bowl on the table?",
    "Where is the small blue bird sitting?",
    "How many windows does the house have?",
    "What animal is lying under the tree?",
    "Is the woman holding a phone or a book?",
    "What time does the clock show?",
    "Which bottle on the shelf is empty?",
    "What sport are the children playing?",
)


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def current_rss_mb() -> float:
    """Resident set size now, MiB."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since start or the last ``reset_peak_rss``, MiB."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def settle_memory() -> None:
    """Free what Python and glibc hold so the next RSS reading is a fair baseline."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def cpu_model() -> str:
    """The CPU's model name and the cores torch uses."""
    name = platform.processor() or "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            name = match.group(1).strip()
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"


def environment() -> dict[str, str]:
    """Date, device names and library versions, for RESULTS.md."""
    import importlib.metadata as metadata

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
    }
    for dist in ("open_clip_torch", "transformers", "apiprompting"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    return info


def structured_images(count: int, size: tuple[int, int], seed: int) -> list[Image.Image]:
    """``count`` distinct RGB images of ``size`` (width, height): smooth colour blobs plus a little noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(noisy))
    return images


def random_clip_weights(model_name: str, seed: int, directory: Path = DEFAULT_WEIGHTS_DIR) -> Path:
    """A state dict of ``model_name`` with open_clip's random initialisation (seeded), saved once and reused."""
    import open_clip

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{model_name}-random-seed{seed}.pt"
    if not path.is_file():
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None)
        partial = path.with_suffix(".partial")
        torch.save(model.state_dict(), partial)
        partial.replace(path)
        del model
        settle_memory()
    return path


def load_state_dict_into(model: torch.nn.Module, weights: Path) -> torch.nn.Module:
    """Load a saved state dict (memory-mapped, then copied) into ``model``; returns it in eval mode."""
    state = torch.load(weights, map_location="cpu", mmap=True, weights_only=True)
    model.load_state_dict(state)
    del state
    settle_memory()
    return model.eval()


def timed(function: Callable[[], object], synchronize: Callable[[], None] | None = None) -> float:
    """Seconds one call of ``function`` takes (after ``synchronize``, if given, on both ends)."""
    import time

    if synchronize is not None:
        synchronize()
    start = time.perf_counter()
    function()
    if synchronize is not None:
        synchronize()
    return time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """The median; NaN for no values."""
    return float(statistics.median(values)) if values else float("nan")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays, flattened."""
    x = np.asarray(a, np.float64).ravel()
    y = np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


def write_json(path: str | os.PathLike[str] | None, payload: dict[str, object]) -> None:
    """Write ``payload`` as indented JSON when ``path`` is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
