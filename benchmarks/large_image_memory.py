"""Peak memory of one ``attention_prompt`` call on a large image, per rendering style.

An 8000 x 8000 photo sits at the default 64 MP limit of ``load_image``. This script writes such an
image once (a PNG with smooth colour blobs plus noise), then measures, each in a fresh subprocess
with the offline demo CLIP (``attributor="demo"``) loaded and warmed up on a small image:

* ``load``: ``load_image(path)`` alone, the baseline (the decoded RGB image itself is 256 MiB, as
  Pillow stores RGB in 4 bytes per pixel);
* one ``attention_prompt(path, question, attributor="demo", style=...)`` per style.

For each it prints the process's peak RSS during the call (the kernel's VmHWM, reset just before
the call; ``ru_maxrss`` where the kernel does not allow the reset), the RSS before the call (Python,
torch and the model, about 1 GiB) and the rise, next to the peak this script measured on the code
before the fix (float64 masks and whole-image float64 rendering; the issue reported 7.2 GiB for
gray). The goal: every style stays under 2 GiB peak RSS for the whole call.

Run::

    .venv/bin/python benchmarks/large_image_memory.py
    .venv/bin/python benchmarks/large_image_memory.py --size 4000 3000 --styles gray --json out/mem.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_utils import current_rss_mb, environment, peak_rss_mb, reset_peak_rss, settle_memory, write_json
from PIL import Image

GOAL_MIB = 2048.0
BEFORE_MIB = {"load": 1667.0, "gray": 7400.0, "heatmap": 8863.0, "crop": 2763.0}
"""Peak RSS (MiB) at 8000 x 8000 measured by this script on the code before the fix (the parent of the
commit that added it; 2-vCPU VM, 1 torch thread). The old contour style is missing: its two rank filters
of 81 x 81 pixels take about 20 s per megapixel each, some 40 minutes at 64 MP."""
QUESTION = "Where is the red car parked?"
STAGES = ("load", "gray", "heatmap", "crop", "contour")


def write_test_image(path: Path, size: tuple[int, int], seed: int, band_rows: int = 500) -> None:
    """A PNG of ``size``: bicubic-smoothed 6 x 6 random colours plus uniform noise in [-12, 12]."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
    smooth = coarse.resize(size, Image.Resampling.BICUBIC)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, band_rows):
        bottom = min(height, top + band_rows)
        band = np.asarray(smooth.crop((0, top, width, bottom)), dtype=np.int16)
        noise = rng.integers(-12, 13, size=band.shape, dtype=np.int16)
        pixels[top:bottom] = np.clip(band + noise, 0, 255)
    del smooth
    Image.fromarray(pixels).save(path, compress_level=1)


def measure(stage: str, image_path: Path, threads: int) -> dict[str, object]:
    """In this process: load and warm up the demo model, then run ``stage`` once and read the peak RSS."""
    from api_tool import attention_prompt, get_attributor, load_image

    torch.set_num_threads(threads)
    attributor = get_attributor("demo")
    attention_prompt(Image.new("RGB", (64, 48), (120, 80, 40)), QUESTION, attributor=attributor)  # warm-up
    settle_memory()
    before = current_rss_mb()
    reset_exact = reset_peak_rss()
    start = time.perf_counter()
    if stage == "load":
        load_image(image_path)
        timings: dict[str, float] = {}
    else:
        result = attention_prompt(image_path, QUESTION, attributor=attributor, style=stage)  # type: ignore[arg-type]
        timings = result.timings
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "stage": stage,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "rise_mib": peak - before,
        "seconds": seconds,
        "timings": timings,
        "peak_reset_before_call": reset_exact,
    }


def run_child(stage: str, image_path: Path, threads: int) -> dict[str, object]:
    """``measure`` in a fresh Python process, so one stage's memory does not count in another's."""
    command = [sys.executable, __file__, "--child", stage, "--image", str(image_path), "--threads", str(threads)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {stage} measurement failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(8000, 8000), metavar=("W", "H"))
    parser.add_argument("--styles", nargs="+", choices=STAGES[1:], default=list(STAGES[1:]))
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.image, args.threads)))
        return

    width, height = args.size
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        image_path = Path(folder) / "large.png"
        write_test_image(image_path, (width, height), args.seed)
        size_mib = image_path.stat().st_size / 2**20
        print(f"image {width}x{height} ({width * height / 1e6:.0f} MP), PNG {size_mib:.0f} MiB; demo CLIP on CPU")
        print(f"  {'stage':<8} {'peak MiB':>8} {'RSS before':>10} {'rise':>6} {'seconds':>7} {'old peak':>8}  goal")
        for stage in ("load", *args.styles):
            row = run_child(stage, image_path, args.threads)
            rows.append(row)
            verdict = "" if stage == "load" else ("met" if row["peak_rss_mib"] < GOAL_MIB else "MISSED")
            old = f"{BEFORE_MIB[stage]:.0f}" if stage in BEFORE_MIB and (width, height) == (8000, 8000) else "-"
            print(
                f"  {stage:<8} {row['peak_rss_mib']:>8.0f} {row['rss_before_mib']:>10.0f} "
                f"{row['rise_mib']:>6.0f} {row['seconds']:>7.1f} {old:>8}  {verdict}"
            )
    write_json(
        args.json,
        {
            "environment": environment(),
            "image_size": [width, height],
            "goal_peak_rss_mib": GOAL_MIB,
            "before_fix_peak_rss_mib_8000x8000": BEFORE_MIB,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
