"""API-CLIP maps per second from PIL images, side by side with the plain forward (issue 13, CLIP side).

For each tower (ViT-L-14-336 and ViT-B-16-SigLIP by default, random weights from open_clip's
``create_model(pretrained=None)``, in fp16) and each batch size, one run measures on the same 640x480 PIL
images:

* ``encode``: ``model.encode_image`` on ready normalised tensors (the GPU's own pace);
* ``oc prep+enc``: open_clip's own preprocess (``image_transform``: resize, centre crop, normalise on the
  CPU) then ``encode_image``, the baseline the targets are stated against;
* ``before``: ``ClipAttributor.attribute_batch`` of the code before this change (a copy of the old
  ``api_tool/backends/clip.py`` given with ``--before-module``; else the current attributor on its plain
  path: Pillow letterbox on the CPU, fp32 projection);
* ``after``: ``attribute_batch`` as shipped (letterbox on the device, fp16 projection, CUDA graphs for the
  image pass up to batch 8, batched merge); also timed with ``cuda_graphs=False``.

Every attributor has ``cache_size=0``, so each call runs every image. Printed per batch: maps (images)
per second, ``after`` over ``oc prep+enc``, ``after`` over ``before``, the batch-1 time ratio
``after / oc prep+enc``, peak GPU memory above the model for ``before`` and ``after``, and the exactness of
the fast path: the largest difference of the letterboxed uint8 pixels from Pillow's, and of the masks
from the fp32-projection masks of the same forward and from ``before``'s. A ``torch.profiler`` summary of
one ``after`` call at the largest and the smallest batch shows what bounds it.

With ``--cpu-demo`` it compares ``before`` and ``after`` on the CPU with the demo CLIP instead (the
no-regression check). Run::

    python benchmarks/clip_gpu_throughput.py --before-module .device/clip_before.py --json $OUT/clip_gpu.json
    python benchmarks/clip_gpu_throughput.py --cpu-demo --before-module /tmp/clip_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from bench_utils import QUESTIONS, environment, structured_images, timed, write_json
from PIL import Image

from api_tool.backends.clip import ClipAttributor, load_clip
from api_tool.backends.device_letterbox import letterbox_pixels, upload_images
from api_tool.geometry import Letterbox

MIB = 1024 * 1024
ITERATIONS = {1: 20, 8: 8, 32: 5}


def offline_tokenizer(model: torch.nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's BPE tokenizer folded into the model's vocabulary: a tokenizer that needs no hub access
    (SigLIP's own is on the hub); the text only has to be valid input for timing."""
    text = getattr(model, "text", None)
    vocab = getattr(text, "vocab_size", None)
    if vocab is None:
        return open_clip.get_tokenizer("ViT-B-32")  # type: ignore[no-any-return]
    base = open_clip.tokenizer.SimpleTokenizer(context_length=text.context_length)  # type: ignore[union-attr]
    return lambda texts: base(texts) % vocab


def load_before(path: str | None) -> type | None:
    """``ClipAttributor`` from a copy of the old ``clip.py``, or ``None``."""
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("clip_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.ClipAttributor  # type: ignore[no-any-return]


def cuda_sync(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


def rate(step: Callable[[], object], batch: int, iterations: int, device: torch.device) -> dict[str, float]:
    """Items per second and peak memory above what was allocated before the timed calls."""
    for _ in range(2):
        step()
    sync = cuda_sync(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    seconds = sum(timed(step, sync) for _ in range(iterations))
    peak = torch.cuda.max_memory_allocated() - held if device.type == "cuda" else 0
    return {"per_s": batch * iterations / seconds, "s_per_call": seconds / iterations, "peak_above_mb": peak / MIB}


def mask_difference(first: list[Any], second: list[Any]) -> float:
    return max(float(np.abs(a.mask - b.mask).max()) for a, b in zip(first, second))


def letterbox_difference(attributor: ClipAttributor, images: list[Image.Image]) -> int:
    """Largest |device letterbox - Pillow letterbox| over the images, in uint8 levels."""
    square = attributor.tower.input
    assert square is not None
    worst = 0
    for size, pixels in upload_images(images, attributor.device).items():
        boxed = letterbox_pixels(pixels, Letterbox.fit(size, square.side), square.fill).cpu().numpy().astype(int)
        reference = [square.letterbox(image)[0].astype(int) for image in images if image.size == size]
        worst = max(worst, int(np.abs(boxed - np.stack(reference)).max()))
    return worst


def profile_summary(step: Callable[[], object], device: torch.device, rows: int = 12) -> str:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step()
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    gpu_us = sum(event.self_device_time_total for event in events) if device.type == "cuda" else 0.0
    cpu_us = sum(event.self_cpu_time_total for event in events)
    launches = sum(event.count for event in events if event.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    header = f"GPU busy {gpu_us / 1e3:.1f} ms, CPU ops {cpu_us / 1e3:.1f} ms, kernel launches {launches}\n"
    return header + events.table(sort_by=sort, row_limit=rows, max_name_column_width=48)


def cuda_graph_trial(attributor: ClipAttributor, image: Image.Image, iterations: int = 50) -> dict[str, float]:
    """Milliseconds of the image pass alone (``tower.decompose`` on a letterboxed batch of one already on the
    GPU) run eagerly and replayed from a CUDA graph: how much of batch 1 is launch overhead."""
    square = attributor.tower.input
    assert square is not None
    pixels = upload_images([image], attributor.device)[image.size]
    static = letterbox_pixels(pixels, Letterbox.fit(image.size, square.side), square.fill).clone()

    def forward() -> object:
        inputs = {"pixels": static}
        return attributor.tower.decompose(inputs, attributor.layer, attributor.pool_mlp, attributor.projection_dtype)

    with torch.inference_mode():
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(3):
                forward()
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        eager = sum(timed(forward, torch.cuda.synchronize) for _ in range(iterations)) / iterations
        replay = sum(timed(graph.replay, torch.cuda.synchronize) for _ in range(iterations)) / iterations
    return {"eager_ms": eager * 1e3, "graph_ms": replay * 1e3}


def bench_tower(
    model_name: str, args: argparse.Namespace, before_class: type | None, pool: list[Image.Image]
) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = open_clip.create_model(model_name, pretrained=None, device=device).to(dtype).eval()
    tokenizer = offline_tokenizer(model)
    common = {"model": model, "tokenizer": tokenizer, "model_name": model_name, "device": device, "cache_size": 0}
    after = ClipAttributor(**common)
    eager = ClipAttributor(**common, cuda_graphs=False)
    exact = ClipAttributor(**common, projection_dtype=torch.float32)
    plain = ClipAttributor(**common, preprocess_on_device=False, projection_dtype=torch.float32)
    before = before_class(**common) if before_class is not None else plain
    side = after.side
    square = after.tower.input
    assert square is not None
    oc_preprocess = open_clip.image_transform(side, is_train=False, mean=square.mean, std=square.std)
    images = itertools.cycle(pool)
    questions = itertools.cycle(QUESTIONS)
    print(f"\n{model_name} {args.dtype} on {device}: projection in {after.projection_dtype}, side {side}")
    columns = ("batch", "encode", "oc prep+enc", "before", "after", "after/oc", "after/before", "peak MiB before/after")
    print("  " + " | ".join(columns))
    rows = []
    for batch in args.batches:
        iterations = ITERATIONS.get(batch, 5)
        ready = torch.randn(batch, 3, side, side, device=device, dtype=dtype)

        def encode(ready: torch.Tensor = ready) -> None:
            with torch.inference_mode():
                model.encode_image(ready)

        def oc(batch: int = batch) -> None:
            with torch.inference_mode():
                tensors = torch.stack([oc_preprocess(next(images)) for _ in range(batch)])
                model.encode_image(tensors.to(device, dtype))

        def attribute_with(attributor: Any, batch: int = batch) -> Callable[[], object]:
            return lambda: attributor.attribute_batch(
                [next(images) for _ in range(batch)], [next(questions) for _ in range(batch)]
            )

        measured = {
            "encode": rate(encode, batch, iterations, device),
            "oc": rate(oc, batch, iterations, device),
            "before": rate(attribute_with(before), batch, iterations, device),
            "after": rate(attribute_with(after), batch, iterations, device),
            "after_eager": rate(attribute_with(eager), batch, iterations, device),
        }
        sample = [next(images) for _ in range(batch)]
        asked = [next(questions) for _ in range(batch)]
        fast_maps = after.attribute_batch(sample, asked)
        row = {
            "batch": batch,
            **{f"{name}_per_s": value["per_s"] for name, value in measured.items()},
            "after_over_oc": measured["after"]["per_s"] / measured["oc"]["per_s"],
            "after_over_before": measured["after"]["per_s"] / measured["before"]["per_s"],
            "time_ratio_after_to_oc": measured["after"]["s_per_call"] / measured["oc"]["s_per_call"],
            "peak_above_model_mb_before": measured["before"]["peak_above_mb"],
            "peak_above_model_mb_after": measured["after"]["peak_above_mb"],
            "after_without_graphs_per_s": measured["after_eager"]["per_s"],
            "letterbox_max_uint8_diff": letterbox_difference(after, sample),
            "mask_max_diff_fp16_vs_fp32_projection": mask_difference(fast_maps, exact.attribute_batch(sample, asked)),
            "mask_max_diff_after_vs_before": mask_difference(fast_maps, before.attribute_batch(sample, asked)),
        }
        rows.append(row)
        print(
            f"  {batch:>5} | {row['encode_per_s']:>7.1f} | {row['oc_per_s']:>11.1f} | {row['before_per_s']:>6.1f} | "
            f"{row['after_per_s']:>5.1f} | {row['after_over_oc']:>7.2f}x | {row['after_over_before']:>10.2f}x | "
            f"{row['peak_above_model_mb_before']:>6.0f} / {row['peak_above_model_mb_after']:.0f}",
            flush=True,
        )
    for row in rows:
        print(
            f"  batch {row['batch']}: time after / oc prep+enc {row['time_ratio_after_to_oc']:.2f}; without CUDA "
            f"graphs {row['after_without_graphs_per_s']:.1f} maps/s; "
            "letterbox max "
            f"{row['letterbox_max_uint8_diff']} uint8 level(s) from Pillow; mask max |fp16 - fp32 projection| "
            f"{row['mask_max_diff_fp16_vs_fp32_projection']:.2e}; mask max |after - before| "
            f"{row['mask_max_diff_after_vs_before']:.2e}"
        )
    print(f"  graph capture in the attributor: {after._image_pass.failure or 'ok'}")
    graph_trial: dict[str, float] | str = "not run"
    if device.type == "cuda":
        try:
            graph_trial = cuda_graph_trial(after, pool[0])
            print(
                f"  image pass alone at batch 1: eager {graph_trial['eager_ms']:.2f} ms, "
                f"CUDA graph replay {graph_trial['graph_ms']:.2f} ms"
            )
        except Exception as exc:  # a capture failure is a finding, not a reason to lose the run
            graph_trial = f"{type(exc).__name__}: {exc}"
            print(f"  CUDA graph capture failed: {graph_trial}")
    profiles = {}
    if args.profile:
        for batch in sorted({max(args.batches), min(args.batches)}, reverse=True):
            summary = profile_summary(attribute_with(after, batch), device)
            profiles[str(batch)] = summary
            print(f"\n  profile of one 'after' call at batch {batch}:\n{summary}")
    return {
        "model": model_name,
        "dtype": args.dtype,
        "rows": rows,
        "cuda_graph_batch1": graph_trial,
        "profiles": profiles,
    }


def cpu_time_rate(step: Callable[[], object], batch: int, iterations: int) -> float:
    """Maps per second of process CPU time (one torch thread): robust to other jobs on a shared VM."""
    step()
    start = time.process_time()
    for _ in range(iterations):
        step()
    return batch * iterations / (time.process_time() - start)


def bench_cpu_demo(args: argparse.Namespace, before_class: type | None) -> dict[str, Any]:
    """``before`` vs ``after`` with the demo CLIP on the CPU (single image and batch, one and many questions)."""
    model, tokenizer, _ = load_clip("demo", None)
    common = {"model": model, "tokenizer": tokenizer, "model_name": "demo", "device": "cpu", "cache_size": 0}
    after = ClipAttributor(**common)
    before = before_class(**common) if before_class is not None else ClipAttributor(**common)
    pool = structured_images(16, tuple(args.image_size), seed=args.seed)
    rows = []
    torch.set_num_threads(1)
    print(f"\ndemo CLIP on CPU, one thread: before vs after, maps per CPU-second (median of {args.repeats} rounds)")
    for batch in args.batches:
        images, questions = itertools.cycle(pool), itertools.cycle(QUESTIONS)

        def call(attributor: Any, batch: int = batch, images: Any = images, questions: Any = questions) -> Any:
            return lambda: attributor.attribute_batch(
                [next(images) for _ in range(batch)], [next(questions) for _ in range(batch)]
            )

        speeds: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.repeats):
            for name, attributor in (("before", before), ("after", after)):
                speeds[name].append(cpu_time_rate(call(attributor), batch, args.cpu_iterations))
        row = {"batch": batch, **{name: float(np.median(values)) for name, values in speeds.items()}}
        row["after_over_before"] = row["after"] / row["before"]
        rows.append(row)
        print(
            f"  batch {batch:>3}: before {row['before']:.1f}  after {row['after']:.1f}  "
            f"({row['after_over_before']:.2f}x)"
        )
    return {"model": "demo", "device": "cpu", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-L-14-336", "ViT-B-16-SigLIP"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--pool", type=int, default=64, help="distinct images cycled through")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--before-module", help="a copy of the old api_tool/backends/clip.py to time as 'before'")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--cpu-demo", action="store_true", help="before vs after on the CPU with the demo CLIP")
    parser.add_argument("--repeats", type=int, default=3, help="--cpu-demo: alternating rounds")
    parser.add_argument("--cpu-iterations", type=int, default=4, help="--cpu-demo: timed calls per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    before_class = load_before(args.before_module)
    if args.cpu_demo:
        result = bench_cpu_demo(args, before_class)
    else:
        pool = structured_images(args.pool, tuple(args.image_size), seed=args.seed)
        towers = []
        for name in args.models:
            try:
                towers.append(bench_tower(name, args, before_class, pool))
            except Exception:  # one tower failing must not lose the others' numbers
                print(f"\n{name}: skipped\n{traceback.format_exc()}")
        result = {"towers": towers}
    write_json(args.json, {"environment": environment(), "before_module": bool(args.before_module), **result})
    if args.json:
        print(f"\nwrote {Path(args.json)}")


if __name__ == "__main__":
    main()
