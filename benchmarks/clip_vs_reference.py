"""API-CLIP maps: this package's ClipAttributor vs the authors' reference code, on identical weights.

What it measures (CPU, batch 1, one image and one question per map):

* per-map time (image pass + text pass + merge; rendering excluded) of both implementations;
* peak memory of one map: the rise of the process's peak resident set size (VmHWM, reset just before
  the map) over its size with the model loaded; each implementation runs in its own fresh subprocess
  so their peaks never mix;
* parity: Pearson correlation of Psi_cls, Psi_comp and the merged mask, (a) with both fed the
  reference's own preprocessed tensor and (b) end to end on square images (where the reference's
  resize + centre crop and this package's letterbox give the same input).

The reference is PyPI ``apiprompting`` 0.1.0rc2 (its CLIP half, ``api_clip/main.py`` ``gen_mask`` and
``merge_mask`` with ``hook_prs_logger``); both models get the same random state dict, saved once
(open_clip's ViT-L-14-336 keys load into the reference's vendored open_clip fork unchanged). The
reference's ``layer_index=22`` is this package's ``layer=-2`` for a 24-block tower.

Set-up, then run (2 CPU cores: the reference takes minutes per ViT-L-14-336 map)::

    bash benchmarks/setup_reference.sh .venv          # or a new venv: bash benchmarks/setup_reference.sh
    .venv/bin/python benchmarks/clip_vs_reference.py --threads 1 --reference-reps 1 --large-square 0 \
        --json out/clip_vs_reference.json
    .venv/bin/python benchmarks/clip_vs_reference.py --model ViT-B-16 --ours-reps 3   # quicker check

Wall-clock time is reported beside process CPU time (all threads), which a busy machine disturbs less.

Goals: correlation >= 0.999 for all three maps; ours >= 3x faster and >= 5x less peak memory at
ViT-L-14-336.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_utils import (
    QUESTIONS,
    current_rss_mb,
    environment,
    load_state_dict_into,
    median,
    peak_rss_mb,
    pearson,
    random_clip_weights,
    reset_peak_rss,
    settle_memory,
    structured_images,
    timed,
    write_json,
)
from PIL import Image

PARITY_GOAL = 0.999
SPEED_GOAL = 3.0
MEMORY_GOAL = 5.0


def import_reference() -> tuple[Any, Any, Any]:
    """The reference's CLIP half: (api_clip.main, api_clip.hook, the vendored open_clip factory).

    ``import apiprompting`` would run its ``__init__``, which imports the LLaVA half (needing the authors'
    ``apillava`` fork); the CLIP half is a self-contained folder, so it is imported as top-level ``api_clip``.
    """
    spec = importlib.util.find_spec("apiprompting")
    if spec is None or spec.origin is None:
        raise SystemExit("apiprompting is not installed: run bash benchmarks/setup_reference.sh first")
    sys.path.insert(0, str(Path(spec.origin).parent))
    import api_clip.hook as hook
    import api_clip.main as main
    from api_clip.clip_prs.utils import factory

    return main, hook, factory


def reference_layer_index(layer: int, num_blocks: int) -> int:
    """The reference's non-negative ``layer_index`` for this package's (possibly negative) ``layer``."""
    return layer % num_blocks


# ----------------------------------------------------------------------------------------------
# Workers: one fresh process per implementation.
# ----------------------------------------------------------------------------------------------


def wall_and_cpu(function: Any) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of one call; CPU time is robust to other load."""
    cpu_start = time.process_time()
    wall = timed(function)
    return wall, time.process_time() - cpu_start


def memory_and_time(run_map: Any, first: Any, rest: list[Any]) -> dict[str, Any]:
    """Peak-RSS rise of the first map (cold) and the wall and CPU time of every map."""
    settle_memory()
    exact_peak = reset_peak_rss()
    baseline = current_rss_mb()
    first_time = wall_and_cpu(lambda: run_map(first))
    peak = peak_rss_mb()
    times = [first_time] + [wall_and_cpu(lambda item=item: run_map(item)) for item in rest]
    return {
        "rss_with_model_mb": baseline,
        "peak_rss_mb": peak,
        "peak_rise_mb": peak - baseline,
        "peak_exact": exact_peak,
        "times_s": [wall for wall, _ in times],
        "cpu_times_s": [cpu for _, cpu in times],
    }


def worker_reference(args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    main, hook, factory = import_reference()
    model, _, preprocess = factory.create_model_and_transforms(args.model, pretrained=None)
    model = load_state_dict_into(model, Path(inputs["weights"]))
    tokenizer = factory.get_tokenizer(args.model)
    layer_index = reference_layer_index(args.layer, len(model.visual.transformer.resblocks))
    prs = hook.hook_prs_logger(model, "cpu", layer_index)
    images = [Image.open(path).convert("RGB") for path in inputs["reference_images"]]
    queries = inputs["reference_queries"]
    maps: dict[str, list[np.ndarray]] = {"cls": [], "comp": [], "mask": [], "pixels": []}

    @torch.no_grad()
    def run_map(index: int) -> None:
        image, query = [images[index]], queries[index]
        _, cls_maps, comp_maps = main.gen_mask(model, prs, preprocess, "cpu", tokenizer, image, query)
        mask = main.merge_mask(cls_maps[0], comp_maps[0], kernel_size=args.kernel_size, enhance_coe=args.enhance_coe)
        maps["cls"].append(cls_maps[0].double().numpy())
        maps["comp"].append(comp_maps[0].double().numpy())
        maps["mask"].append(mask.double().numpy())

    result = memory_and_time(run_map, 0, list(range(1, len(images))))
    maps["pixels"] = [preprocess(image).numpy() for image in images]
    np.savez(inputs["reference_maps"], **{key: np.stack(value) for key, value in maps.items()})
    result["layer_index"] = layer_index
    return result


def worker_ours(args: argparse.Namespace, inputs: dict[str, Any]) -> dict[str, Any]:
    import open_clip

    from api_tool.backends.clip import ClipAttributor
    from api_tool.geometry import Letterbox

    model = load_state_dict_into(open_clip.create_model(args.model, pretrained=None), Path(inputs["weights"]))
    settings: dict[str, Any] = {
        "model": model,
        "tokenizer": open_clip.get_tokenizer(args.model),
        "model_name": args.model,
        "pretrained": None,
        "layer": args.layer,
        "device": "cpu",
        "enhance_coe": args.enhance_coe,
        "kernel_size": args.kernel_size,
    }
    attributor = ClipAttributor(**settings)
    timing_images = [Image.open(path).convert("RGB") for path in inputs["ours_images"]]
    timing_queries = inputs["ours_queries"]

    def run_map(index: int) -> None:
        attributor.attribute(timing_images[index], timing_queries[index])

    result = memory_and_time(run_map, 0, list(range(1, len(timing_images))))
    warm = timing_images[0]
    result["cached_image_times_s"] = [
        timed(lambda query=query: attributor.attribute(warm, query)) for query in QUESTIONS[1:4]
    ]

    reference = np.load(inputs["reference_maps"])
    parity_images = [Image.open(path).convert("RGB") for path in inputs["reference_images"]]
    parity_queries = inputs["reference_queries"]
    end_to_end = [attributor.attribute(image, query) for image, query in zip(parity_images, parity_queries)]

    class ReferencePixels(ClipAttributor):
        """Feeds the reference's preprocessed tensor instead of this package's letterbox."""

        pixels: torch.Tensor

        def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, Letterbox]:
            return self.pixels, Letterbox.fit((self.side, self.side), self.side)

    same_input = ReferencePixels(**settings, cache_size=0)
    same_tensor = []
    for index, (image, query) in enumerate(zip(parity_images, parity_queries)):
        same_input.pixels = torch.from_numpy(reference["pixels"][index])
        same_tensor.append(same_input.attribute(image, query))
    ours_pixels = np.stack([attributor.preprocess(image)[0].numpy() for image in parity_images])
    result["input_max_abs_diff"] = float(np.abs(ours_pixels - reference["pixels"]).max())
    result["parity"] = {
        name: {
            kind: [pearson(getattr(amap, kind), reference[kind][i]) for i, amap in enumerate(maps)]
            for kind in ("cls", "comp", "mask")
        }
        for name, maps in (("same_tensor", same_tensor), ("end_to_end", end_to_end))
    }
    result["parity_max_abs_diff_cls_relative"] = [
        float(np.abs(amap.cls - reference["cls"][i]).max() / np.abs(reference["cls"][i]).max())
        for i, amap in enumerate(same_tensor)
    ]
    return result


# ----------------------------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------------------------


def run_worker(kind: str, args: argparse.Namespace, inputs_path: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--inputs",
        str(inputs_path),
        "--model",
        args.model,
        "--layer",
        str(args.layer),
        "--enhance-coe",
        str(args.enhance_coe),
        "--kernel-size",
        str(args.kernel_size),
        "--threads",
        str(args.threads),
    ]
    print(f"[{kind}] running in a fresh process ...", flush=True)
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(args: argparse.Namespace, ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    ours_time = median(ours["times_s"])
    reference_time = median(reference["times_s"])
    speedup = reference_time / ours_time
    ours_cpu = median(ours["cpu_times_s"])
    reference_cpu = median(reference["cpu_times_s"])
    memory_ratio = reference["peak_rise_mb"] / max(ours["peak_rise_mb"], 1e-9)
    min_corr = {name: {kind: min(values) for kind, values in table.items()} for name, table in ours["parity"].items()}
    return {
        "model": args.model,
        "layer": args.layer,
        "reference_layer_index": reference["layer_index"],
        "ours_time_per_map_s": ours_time,
        "reference_time_per_map_s": reference_time,
        "ours_cached_image_time_per_map_s": median(ours["cached_image_times_s"]),
        "speedup": speedup,
        "ours_cpu_time_per_map_s": ours_cpu,
        "reference_cpu_time_per_map_s": reference_cpu,
        "cpu_time_speedup": reference_cpu / ours_cpu,
        "ours_peak_rise_mb": ours["peak_rise_mb"],
        "reference_peak_rise_mb": reference["peak_rise_mb"],
        "ours_peak_rss_mb": ours["peak_rss_mb"],
        "reference_peak_rss_mb": reference["peak_rss_mb"],
        "memory_ratio": memory_ratio,
        "min_correlation": min_corr,
        "goals": {
            "parity>=0.999": all(value >= PARITY_GOAL for table in min_corr.values() for value in table.values()),
            "speedup>=3": speedup >= SPEED_GOAL,
            "cpu_time_speedup>=3": reference_cpu / ours_cpu >= SPEED_GOAL,
            "memory_ratio>=5": memory_ratio >= MEMORY_GOAL,
        },
    }


def print_summary(summary: dict[str, Any], ours: dict[str, Any], reference: dict[str, Any]) -> None:
    print(
        f"\nmodel {summary['model']}, layer {summary['layer']} "
        f"(reference layer_index {summary['reference_layer_index']})"
    )
    print(
        f"  per-map time   ours {summary['ours_time_per_map_s']:.3f} s   reference "
        f"{summary['reference_time_per_map_s']:.3f} s   -> {summary['speedup']:.1f}x faster"
    )
    print(
        f"  CPU time       ours {summary['ours_cpu_time_per_map_s']:.3f} s   reference "
        f"{summary['reference_cpu_time_per_map_s']:.3f} s   -> {summary['cpu_time_speedup']:.1f}x less"
    )
    print(f"  (ours, image already cached: {summary['ours_cached_image_time_per_map_s']:.3f} s per map)")
    print(
        f"  peak RSS rise  ours {summary['ours_peak_rise_mb']:.0f} MiB   reference "
        f"{summary['reference_peak_rise_mb']:.0f} MiB   -> {summary['memory_ratio']:.1f}x less"
    )
    print(
        f"  peak RSS total ours {summary['ours_peak_rss_mb']:.0f} MiB   "
        f"reference {summary['reference_peak_rss_mb']:.0f} MiB"
        f"   (with the model: ours {ours['rss_with_model_mb']:.0f}, reference {reference['rss_with_model_mb']:.0f})"
    )
    for name, table in summary["min_correlation"].items():
        cells = "  ".join(f"{kind} {value:.6f}" for kind, value in table.items())
        print(f"  min Pearson r ({name}): {cells}")
    print(f"  input tensors, max |ours - reference|: {ours['input_max_abs_diff']:.2e}")
    print(f"  goals: {summary['goals']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-L-14-336", help="open_clip ViT name (random weights)")
    parser.add_argument("--layer", type=int, default=-2, help="block index (ours); the reference gets layer %% L")
    parser.add_argument("--reference-reps", type=int, default=2, help="maps timed for the reference (slow)")
    parser.add_argument("--ours-reps", type=int, default=5, help="maps timed for ours")
    parser.add_argument(
        "--large-square",
        type=int,
        default=512,
        help="side of one extra square parity image that both must resize (0: none)",
    )
    parser.add_argument("--enhance-coe", type=float, default=10.0)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        inputs = json.loads(Path(args.inputs).read_text())
        worker = worker_ours if args.worker == "ours" else worker_reference
        print(json.dumps(worker(args, inputs)))
        return

    import open_clip

    side = open_clip.get_model_config(args.model)["vision_cfg"]["image_size"]
    weights = random_clip_weights(args.model, args.seed)
    with tempfile.TemporaryDirectory(prefix="clip_vs_reference_") as tmp:
        folder = Path(tmp)
        sizes = [(side, side)] * args.reference_reps
        if args.large_square:
            sizes.append((args.large_square, args.large_square))
        reference_images = []
        for index, size in enumerate(sizes):
            path = folder / f"parity_{index}.png"
            structured_images(1, size, seed=args.seed + 100 + index)[0].save(path)
            reference_images.append(str(path))
        ours_images = []
        for index, image in enumerate(structured_images(args.ours_reps, (side, side), seed=args.seed + 1)):
            path = folder / f"timing_{index}.png"
            image.save(path)
            ours_images.append(str(path))
        inputs = {
            "weights": str(weights),
            "reference_images": reference_images,
            "reference_queries": [QUESTIONS[i % len(QUESTIONS)] for i in range(len(reference_images))],
            "ours_images": ours_images,
            "ours_queries": [QUESTIONS[(i + 5) % len(QUESTIONS)] for i in range(len(ours_images))],
            "reference_maps": str(folder / "reference_maps.npz"),
        }
        inputs_path = folder / "inputs.json"
        inputs_path.write_text(json.dumps(inputs))
        reference = run_worker("reference", args, inputs_path)
        ours = run_worker("ours", args, inputs_path)

    summary = summarise(args, ours, reference)
    print_summary(summary, ours, reference)
    write_json(args.json, {"environment": environment(), "summary": summary, "ours": ours, "reference": reference})


if __name__ == "__main__":
    main()
