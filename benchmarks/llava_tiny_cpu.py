"""Time per map and peak memory of API-LLaVA on tiny random-weight LLaVA models, on CPU.

For each model size it measures, each in a fresh process:

* ``generate``: ``LlavaAttributor.attribute(image, question)`` (greedy answer, map from the
  one-layer hook, SDPA attention);
* ``teacher_forcing``: ``attribute(image, question, answer=...)`` on the model's own answer (one
  forward pass stopped after the chosen block);
* ``eager_all_layers``: the naive way, for comparison: eager attention and
  ``generate(output_attentions=True)``, which keeps every layer's attention for every step;
* ``plain_generate``: just answering (``model.generate``, SDPA, no map), the floor both are
  measured against.

Time is the median of ``--repeats`` maps after one warm-up map. Peak memory is the rise of the
process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` once the
model is built) over the resident set before the first map, so it counts activations, caches and
attention buffers, not the weights. The machine's load average is printed with each row: other
processes on the machine inflate the times. Prints a table; asserts nothing.

The third size has LLaVA-1.5-7B's attention geometry (576 image tokens, 32 blocks of 32 heads,
layer 20) on a narrow width, so attention memory is as large as in the real model while the rest
stays small; it takes a few minutes.

Usage:
    python benchmarks/llava_tiny_cpu.py [--repeats 5] [--max-new-tokens 20] [--threads 1] [--sizes 0 1 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

SIZES = {
    "test (64 px / 8, 64 image tokens, Llama 64 x 2)": {
        "image_size": 64,
        "patch_size": 8,
        "model": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "vision_hidden": 32, "vision_layers": 2},
        "layer": 1,
    },
    "demo-like (224 px / 16, 196 image tokens, Llama 256 x 6)": {
        "image_size": 224,
        "patch_size": 16,
        "model": {
            "hidden": 256,
            "layers": 6,
            "heads": 8,
            "kv_heads": 4,
            "vision_hidden": 128,
            "vision_layers": 4,
            "vision_heads": 4,
        },
        "layer": 3,
    },
    "7B-shaped attention (336 px / 14, 576 image tokens, 32 x 32 heads, width 512)": {
        "image_size": 336,
        "patch_size": 14,
        "model": {
            "hidden": 512,
            "layers": 32,
            "heads": 32,
            "kv_heads": 32,
            "vision_hidden": 64,
            "vision_layers": 2,
            "vision_heads": 2,
        },
        "layer": 20,
    },
}
MODES = ("plain_generate", "generate", "teacher_forcing", "eager_all_layers")
QUESTION = "what is the colour of the circle left of the square?"


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_mib: float
    steps: int
    peak_reset: bool
    answer: str


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _measure(size_name: str, mode: str, repeats: int, max_new_tokens: int, answer: str, threads: int) -> Measurement:
    import gc

    import numpy as np
    import torch
    from PIL import Image

    from api_tool.backends.llava import LlavaAttributor
    from api_tool.demo.tiny_llava import build_tiny_llava, build_tiny_llava_processor
    from api_tool.geometry import Letterbox

    torch.set_num_threads(threads)

    size = SIZES[size_name]
    processor = build_tiny_llava_processor(image_size=size["image_size"], patch_size=size["patch_size"])
    model = build_tiny_llava(processor, seed=2, **size["model"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(300, 480, 3), dtype=np.uint8))
    attributor = LlavaAttributor.from_model(model, processor, layer=size["layer"], max_new_tokens=max_new_tokens)

    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    square = Letterbox.fit(image.size, size["image_size"]).apply(image, fill)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    if mode == "eager_all_layers":
        model.set_attn_implementation("eager")

    if mode in ("plain_generate", "eager_all_layers"):
        keep_attentions = mode == "eager_all_layers"

        def run() -> tuple[int, str]:
            inputs = processor(images=square, text=text, return_tensors="pt")
            is_image = inputs["input_ids"][0] == model.config.image_token_id
            with torch.inference_mode():
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    output_attentions=keep_attentions,
                    return_dict_in_generate=True,
                    pad_token_id=processor.tokenizer.pad_token_id,
                )
            steps = output.sequences.shape[1] - inputs["input_ids"].shape[1]
            if keep_attentions:
                rows = []
                for step in output.attentions:
                    on_image = step[size["layer"]][0, :, -1, : is_image.numel()][:, is_image]
                    rows.append((on_image / on_image.sum(-1, keepdim=True)).mean(0))
                torch.stack(rows).mean(0)
            return steps, ""

    else:
        given = answer if mode == "teacher_forcing" else None

        def run() -> tuple[int, str]:
            amap = attributor.attribute(image, QUESTION, answer=given)
            return int(amap.metadata["steps"]), str(amap.metadata["answer"])

    gc.collect()
    baseline = _status_kib("VmRSS")
    resettable = _reset_peak()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        steps, produced = run()
        times.append(time.perf_counter() - start)
    peak_mib = max(0, _status_kib("VmHWM") - baseline) / 1024
    return Measurement(statistics.median(times), peak_mib, steps, resettable, produced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement (1: steadier)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(range(len(SIZES))), help="which model sizes (0, 1, 2)"
    )
    args = parser.parse_args()

    import torch
    import transformers

    print(
        f"# API-LLaVA on tiny LLaVA models, CPU ({platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} torch threads), torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"# max_new_tokens={args.max_new_tokens}, median of {args.repeats} maps after a warm-up map; each row")
    print("# in a fresh process; peak = rise of peak RSS over the built model during the maps")
    print(f"{'model':80} {'mode':18} {'steps':>5} {'ms/map':>9} {'peak MiB':>9} {'load avg':>8}")
    context = multiprocessing.get_context("spawn")
    for size_name in [list(SIZES)[index] for index in args.sizes]:
        answer = ""
        for mode in MODES:  # "generate" runs before "teacher_forcing", which scores its answer
            with context.Pool(1) as pool:
                result = pool.apply(
                    _measure, (size_name, mode, args.repeats, args.max_new_tokens, answer, args.threads)
                )
            if mode == "generate":
                answer = result.answer
            flag = "" if result.peak_reset else "  (peak not resettable: includes set-up)"
            timing = f"{result.steps:>5} {result.seconds * 1000:>9.1f} {result.peak_mib:>9.1f}"
            print(f"{size_name:80} {mode:18} {timing} {os.getloadavg()[0]:>8.1f}{flag}", flush=True)


if __name__ == "__main__":
    main()
