"""API-CLIP batch scaling on a GPU: maps per second and peak GPU memory at batch 1, 8, 32, fp32 and fp16.

Each measurement calls ``ClipAttributor.attribute_batch(images, queries)`` on ``B`` distinct images with
one question each; the attributor is built with ``cache_size=0`` so no image pass is ever skipped.
Everything a user pays is inside the timing: letterboxing and normalising the PIL images on the CPU,
the image pass, the text pass and the merge; the CPU preprocessing alone is timed too
(``cpu_preprocess_s_per_batch``), since at large batches it can bound the rate. fp16 is the same
open_clip model after ``.half()`` (open_clip builds fp32; ClipAttributor runs the model in whatever
dtype it is given and does its projections in fp32). Peak memory is ``torch.cuda.max_memory_allocated``
during the timed calls, in total and above what the model alone holds.

Random weights are fine for timing. Run::

    python benchmarks/gpu_batch_scaling.py --json $OUT/gpu_batch_scaling.json           # ViT-L-14-336
    python benchmarks/gpu_batch_scaling.py --tiny                                        # CPU smoke test
"""

from __future__ import annotations

import argparse
import itertools

import open_clip
import torch
from bench_utils import QUESTIONS, environment, structured_images, timed, write_json

from api_tool.backends.clip import ClipAttributor

MIB = 1024 * 1024


def build(model_name: str, dtype: torch.dtype, device: torch.device, seed: int) -> ClipAttributor:
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None, device=device).to(dtype).eval()
    return ClipAttributor(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        model_name=model_name,
        pretrained=None,
        device=device,
        cache_size=0,
    )


def measure(attributor: ClipAttributor, batch: int, iterations: int, warmup: int, pool: list) -> dict[str, float]:
    device = attributor.device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    images = itertools.cycle(pool)
    questions = itertools.cycle(QUESTIONS)

    def step() -> None:
        attributor.attribute_batch([next(images) for _ in range(batch)], [next(questions) for _ in range(batch)])

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    seconds = sum(timed(step, synchronize) for _ in range(iterations))
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    batch_images = [next(images) for _ in range(batch)]
    preprocess = timed(lambda: [attributor.preprocess(image) for image in batch_images])
    return {
        "batch": batch,
        "maps_per_s": batch * iterations / seconds,
        "seconds_per_batch": seconds / iterations,
        "peak_mb": peak / MIB,
        "peak_above_model_mb": (peak - held) / MIB,
        "model_mb": held / MIB,
        "cpu_preprocess_s_per_batch": preprocess,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-L-14-336")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16", "bfloat16"]
    )
    parser.add_argument("--iterations", type=int, default=5, help="timed calls per batch size")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--pool", type=int, default=96, help="distinct images cycled through")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: ViT-B-32, batches 1 2, 1 iteration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.tiny:
        args.model, args.batches, args.iterations, args.warmup, args.pool = "ViT-B-32", [1, 2], 1, 1, 4
        args.dtypes = ["float32"]
    device = torch.device(args.device)
    pool = structured_images(args.pool, tuple(args.image_size), seed=args.seed)

    results = []
    print(f"{args.model} on {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'})")
    header = ("dtype", "batch", "maps/s", "s/batch", "peak MiB", "above model", "CPU prep s")
    print("  " + " ".join(f"{name:>{width}}" for name, width in zip(header, (8, 5, 8, 8, 9, 11, 10))))
    for dtype_name in args.dtypes:
        attributor = build(args.model, getattr(torch, dtype_name), device, args.seed)
        for batch in args.batches:
            row = {"dtype": dtype_name, **measure(attributor, batch, args.iterations, args.warmup, pool)}
            results.append(row)
            print(
                f"  {dtype_name:>8} {batch:>5} {row['maps_per_s']:>8.1f} {row['seconds_per_batch']:>8.3f} "
                f"{row['peak_mb']:>9.0f} {row['peak_above_model_mb']:>11.0f} "
                f"{row['cpu_preprocess_s_per_batch']:>10.3f}",
                flush=True,
            )
        del attributor
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.json, {"environment": environment(), "model": args.model, "device": str(device), "rows": results})


if __name__ == "__main__":
    main()
