"""What API adds to an answer: LLaVA-1.5-7B answering, vs the same plus an API-CLIP map or an API-LLaVA self map.

The target is the LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 vision tower, Llama-2-7B language
model, 2-layer GELU projector) with random weights in bf16, built straight on the GPU from a
``LlavaConfig``. Its processor is made offline (``api_tool.demo.tiny_llava``'s word-level tokenizer,
padded with synthetic words to the 7B vocabulary of 32064 ids, and a 336-pixel CLIP image processor),
so prompts have LLaVA-1.5's length: the chat template plus 576 image tokens.

Per repetition, on a fresh image (640x480 by default) and one question:

* ``answer``: processor + ``generate`` with exactly 20 new tokens (greedy; end-of-sequence and special
  tokens suppressed so every answer is 20 tokens long);
* ``clip``: ``ClipAttributor.attribute(image, question)`` with ViT-L-14-336 (random weights), in fp32
  (what the package runs by default: open_clip builds fp32) and in fp16 (model ``.half()``);
* ``llava_teacher_forced``: ``LlavaAttributor.from_model(model, processor, layer=20).attribute(image,
  question, answer=<the 20-token answer>)``, the self-reflection path: one forward pass stopped after
  block 20, no generation;
* ``llava_generate``: the same attributor without ``answer``: it answers (up to 20 tokens) and maps in
  one pass; shown for comparison with ``answer``.

Overheads are medians over repetitions, divided by the answer's median time. Goals: CLIP <= 10 %;
LLaVA self map by teacher forcing <= 30 %. Run::

    python benchmarks/loop_overhead.py --json $OUT/loop_overhead.json     # GPU, 7B architecture
    python benchmarks/loop_overhead.py --tiny                              # CPU smoke test, tiny sizes
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import open_clip
import torch
from bench_utils import QUESTIONS, environment, median, structured_images, timed, write_json
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from api_tool.backends.clip import ClipAttributor
from api_tool.backends.llava import LlavaAttributor
from api_tool.demo.tiny_llava import build_tiny_llava_processor, build_tiny_tokenizer, llava_15_config

LLAVA_7B = {
    "vocab_size": 32064,
    "hidden": 4096,
    "intermediate": 11008,
    "layers": 32,
    "heads": 32,
    "kv_heads": 32,
    "vision_hidden": 1024,
    "vision_intermediate": 4096,
    "vision_layers": 24,
    "vision_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}
TINY = {
    "vocab_size": 2048,
    "hidden": 64,
    "intermediate": 128,
    "layers": 3,
    "heads": 4,
    "kv_heads": 4,
    "vision_hidden": 32,
    "vision_intermediate": 64,
    "vision_layers": 2,
    "vision_heads": 2,
    "image_size": 112,
    "patch_size": 14,
}
CLIP_GOAL = 0.10
TEACHER_FORCING_GOAL = 0.30


def build_processor(sizes: dict[str, int]) -> LlavaProcessor:
    """An offline LLaVA-1.5 processor whose tokenizer has exactly ``vocab_size`` ids (synthetic words pad it)."""
    base = len(build_tiny_tokenizer())
    filler = " ".join(f"w{index:05d}" for index in range(sizes["vocab_size"] - base))
    processor = build_tiny_llava_processor([filler], image_size=sizes["image_size"], patch_size=sizes["patch_size"])
    if len(processor.tokenizer) != sizes["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(processor.tokenizer)} ids, expected {sizes['vocab_size']}")
    return processor


def build_llava(
    sizes: dict[str, int], processor: LlavaProcessor, device: torch.device, dtype: torch.dtype
) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 wiring with the given sizes and random weights, initialised directly on ``device``."""
    tokenizer = processor.tokenizer
    config = llava_15_config(
        tokenizer,
        image_size=sizes["image_size"],
        patch_size=sizes["patch_size"],
        hidden=sizes["hidden"],
        intermediate=sizes["intermediate"],
        layers=sizes["layers"],
        heads=sizes["heads"],
        kv_heads=sizes["kv_heads"],
        vision_hidden=sizes["vision_hidden"],
        vision_intermediate=sizes["vision_intermediate"],
        vision_layers=sizes["vision_layers"],
        vision_heads=sizes["vision_heads"],
        max_positions=4096,
        rms_norm_eps=1e-5,
    )
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def keep(holder: dict[str, Any], key: str, function: Callable[..., Any], *args: Any) -> None:
    """Call ``function(*args)`` and keep its result in ``holder[key]`` (timed calls return nothing)."""
    holder[key] = function(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--layer", type=int, default=20, help="LLaVA decoder block for the self map")
    parser.add_argument("--clip-model", default="ViT-L-14-336")
    parser.add_argument("--clip-dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny LLaVA, ViT-B-32, fp32, 2 reps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = TINY if args.tiny else LLAVA_7B
    llava_dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.bfloat16
    if args.tiny:
        args.clip_model, args.clip_dtypes, args.reps, args.layer = "ViT-B-32", ["float32"], 2, 1
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    processor = build_processor(sizes)
    model = build_llava(sizes, processor, device, llava_dtype)
    build_s = time.perf_counter() - started
    special = [processor.tokenizer.convert_tokens_to_ids(token) for token in processor.tokenizer.all_special_tokens]
    llava_attributor = LlavaAttributor.from_model(model, processor, layer=args.layer, max_new_tokens=args.new_tokens)
    clip_attributors = {}
    for dtype_name in args.clip_dtypes:
        clip = open_clip.create_model(args.clip_model, pretrained=None, device=device).to(getattr(torch, dtype_name))
        clip_attributors[dtype_name] = ClipAttributor(
            model=clip,
            tokenizer=open_clip.get_tokenizer(args.clip_model),
            model_name=args.clip_model,
            pretrained=None,
            device=device,
            cache_size=0,
        )
    images = structured_images(args.reps + 1, tuple(args.image_size), seed=args.seed)

    def answer(image: Any, question: str) -> str:
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(llava_dtype)
        with torch.inference_mode():
            output = model.generate(
                **inputs,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                suppress_tokens=special,
            )
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answer.prompt_tokens = int(inputs["input_ids"].shape[1])  # type: ignore[attr-defined]
        answer.new_tokens = int(new_tokens.numel())  # type: ignore[attr-defined]
        return processor.tokenizer.decode(new_tokens, skip_special_tokens=True)

    times: dict[str, list[float]] = {"answer": [], "llava_teacher_forced": [], "llava_generate": []}
    times.update({f"clip_{name}": [] for name in clip_attributors})
    details: dict[str, Any] = {}
    for rep, image in enumerate(images):
        question = QUESTIONS[rep % len(QUESTIONS)]
        holder: dict[str, Any] = {}
        measured = {"answer": timed(partial(keep, holder, "text", answer, image, question), synchronize)}
        for name, attributor in clip_attributors.items():
            measured[f"clip_{name}"] = timed(partial(attributor.attribute, image, question), synchronize)
        teacher_forced = partial(llava_attributor.attribute, image, question, answer=holder["text"])
        measured["llava_teacher_forced"] = timed(partial(keep, holder, "map", teacher_forced), synchronize)
        measured["llava_generate"] = timed(partial(llava_attributor.attribute, image, question), synchronize)
        if rep == 0:
            details = {
                "prompt_tokens": answer.prompt_tokens,  # type: ignore[attr-defined]
                "answer_tokens": answer.new_tokens,  # type: ignore[attr-defined]
                "teacher_forced_steps": holder["map"].metadata["steps"],
                "warmup_times_s": measured,
            }
            continue  # the first repetition warms up kernels and allocators
        for key, value in measured.items():
            times[key].append(value)

    medians = {key: median(values) for key, values in times.items()}
    overhead = {key: medians[key] / medians["answer"] for key in medians if key != "answer"}
    goals = {f"clip_{name}<=10%": overhead[f"clip_{name}"] <= CLIP_GOAL for name in clip_attributors}
    goals["llava_teacher_forced<=30%"] = overhead["llava_teacher_forced"] <= TEACHER_FORCING_GOAL
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    print(
        f"LLaVA ({'tiny' if args.tiny else '1.5-7B architecture'}, {llava_dtype}) on {device}; "
        f"built in {build_s:.1f} s; prompt {details['prompt_tokens']} tokens, answer {details['answer_tokens']} "
        f"tokens, teacher forcing scored {details['teacher_forced_steps']} steps; {len(times['answer'])} timed reps"
    )
    for key, value in medians.items():
        share = "" if key == "answer" else f"  ({100 * overhead[key]:.1f} % of the answer)"
        print(f"  {key:<22} {value:.4f} s{share}")
    print(f"  goals: {goals}")
    if peak is not None:
        print(f"  peak GPU memory: {peak:.0f} MiB")
    write_json(
        args.json,
        {
            "environment": environment(),
            "llava_dtype": str(llava_dtype),
            "clip_model": args.clip_model,
            "sizes": sizes,
            "details": details,
            "times_s": times,
            "median_s": medians,
            "overhead_vs_answer": overhead,
            "goals": goals,
            "peak_gpu_mb": peak,
            "build_s": build_s,
        },
    )


if __name__ == "__main__":
    main()
