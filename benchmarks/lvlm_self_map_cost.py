"""What the LVLM self-map costs next to the answer it explains (GPU): LLaVA-1.5-7B's and Qwen2.5-VL-7B's shapes.

Random weights in the published shapes (bf16, SDPA, built on the GPU): ``llava-1.5-7b`` (Llama-2-7B: 32
blocks of width 4096, 32 heads; CLIP ViT-L/14 at 336 px: 576 image tokens; block 20 probed, the paper's)
and ``qwen2.5-vl-7b`` (28 blocks of width 3584, 28 heads over 4 KV heads, a 32-block window-attention ViT;
block 17). One ``--width`` x ``--height`` image (1280 x 960), one question, a ``--new-tokens`` answer
(20; every answer is forced to the same tokens, so all rows decode the same sequence). Measured in one
process, side by side, per shape:

* ``preprocessing``: the family adapter's ``prepare`` (processor; on the GPU when the model is there);
* ``answer``: preprocessing + ``model.generate`` (what answering costs from an image);
* ``answer, recording on``: the same with the self-map recorder attached, as ``ChatTransformersVLM`` with
  ``record_self_maps`` does (``api_tool.backends.self_map_memo``), the recording stored in the memo;
* ``self-map: (a) teacher forcing, cold``: ``LvlmAttributor.attribute(image, question, answer=...)`` with
  every memo cleared (the image encoder runs);
* ``(b) teacher forcing after the answer``: right after a plain answer (the image encoder's output is
  reused; one pass over prompt + answer up to the probed block);
* ``(c) KV reuse``: after the answer and a teacher forcing of another answer on the same prompt: only the
  answer's tokens run, up to the probed block, from the prompt's kept KV cache;
* ``(d) from the recording``: after an answer with recording on: no model pass; its cost is this row
  plus the recording's overhead on the answer;
* ``generation with map``: ``LvlmAttributor.attribute(image, question)`` (greedy answer + its map).

Time is the median of ``--repeats`` runs after a warm-up (CUDA synchronised), each after its own untimed
set-up; memory is the peak allocated during a run, also given above the weights. The plain and recorded
answers are timed alternately, so drift hits both alike. Prints a table and the ratios per shape; ``--out``
writes JSON. ``--shape tiny-llava`` / ``tiny-qwen`` run the script on CPU in seconds (a smoke test).

Example:
    python benchmarks/lvlm_self_map_cost.py --shape llava-1.5-7b --shape qwen2.5-vl-7b --out results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from api_tool.backends.lvlm import LvlmAttributor, answer_token_ids
from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter
from api_tool.backends.lvlm_families.llava import LlavaFamily
from api_tool.backends.lvlm_families.qwen2_vl import Qwen2VLFamily
from api_tool.backends.self_map_memo import AnswerRecorder
from api_tool.demo.tiny_llava import build_tiny_llava_processor, llava_15_config
from tests.tiny_lvlms.qwen2_vl import (
    QWEN2_VL_CHAT_TEMPLATE,
    build_qwen_tokenizer,
    build_tiny_qwen_processor,
    tiny_qwen_config,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ANSWER = "the red circle is on the left of the blue square and the green star is at the top right of the image"
OTHER_ANSWER = "a green star"
SHAPES = ("llava-1.5-7b", "qwen2.5-vl-7b", "tiny-llava", "tiny-qwen")
LLAVA_VOCAB = 32064
"""llava-hf/llava-1.5-7b-hf's vocabulary (Llama-2's 32,000 plus the image and padding tokens)."""


def llava15_7b_config(tokenizer: Any) -> LlavaConfig:
    """LLaVA-1.5-7B's published shape: Llama-2-7B (32 blocks of width 4096, 32 heads, MLP 11008) over CLIP
    ViT-L/14 at 336 px (24 blocks of width 1024, 16 heads; 576 image tokens), read at its second-to-last
    layer, a 2-layer GELU projector; the offline tokenizer's special ids, LLaVA-1.5's vocabulary size."""
    config = llava_15_config(
        tokenizer,
        image_size=336,
        patch_size=14,
        hidden=4096,
        intermediate=11008,
        layers=32,
        heads=32,
        kv_heads=32,
        vision_hidden=1024,
        vision_intermediate=4096,
        vision_layers=24,
        vision_heads=16,
        max_positions=4096,
        rms_norm_eps=1e-5,
    )
    config.text_config.vocab_size = LLAVA_VOCAB
    return config


def qwen25_7b_config(tokenizer: Any) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's published shape (28 decoder blocks of width 3584, 28 query heads over 4 KV
    heads, M-RoPE sections 16/24/24; a 32-block ViT of width 1280 with window attention), the tokenizer's ids."""
    convert = tokenizer.convert_tokens_to_ids
    text = {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    vision = {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=convert("<|image_pad|>"),
        video_token_id=convert("<|video_pad|>"),
        vision_start_token_id=convert("<|vision_start|>"),
        vision_end_token_id=convert("<|vision_end|>"),
    )
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def qwen25_processor() -> Qwen2_5_VLProcessor:
    """The released image processing (14-px patches, 2 x 2 merge, 3,136..12,845,056 pixels, CLIP's mean and
    std) around the offline word-level tokenizer with Qwen's special tokens and chat template."""
    sizes = {"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "patch_size": 14, "merge_size": 2}
    image_processor = Qwen2VLImageProcessor(**sizes, temporal_patch_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    video_processor = Qwen2VLVideoProcessor(**sizes, temporal_patch_size=2)
    return Qwen2_5_VLProcessor(
        image_processor, build_qwen_tokenizer(), video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )


def photo(width: int, height: int) -> Image.Image:
    """A smooth random picture (upsampled noise), so the resize and patching do real work."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


class ForcedTokens(LogitsProcessor):
    """Makes greedy decoding emit ``tokens`` (one per step; the last one repeats): every answer decodes
    the same sequence, the one the self-map scores."""

    def __init__(self, tokens: list[int], prompt_length: int) -> None:
        self.tokens = tokens
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = min(input_ids.shape[1] - self.prompt_length, len(self.tokens) - 1)
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device, setup: Callable[[], Any]) -> tuple[float, float]:
    """Seconds and peak allocated GiB (0 off CUDA) of one ``run()`` after an untimed ``setup()``."""
    setup()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return seconds, peak


def measure(
    runs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], repeats: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """Per name, the median seconds and the largest peak over ``repeats`` runs after one warm-up of each;
    the named ``(run, setup)`` pairs are timed in turn, round after round, so drift hits them alike."""
    for run, setup in runs.values():
        timed(run, device, setup)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, setup) in runs.items():
            samples[name].append(timed(run, device, setup))
    return {
        name: {"seconds": statistics.median(s for s, _ in got), "peak_gib": max(p for _, p in got)}
        for name, got in samples.items()
    }


def build(shape: str, device: torch.device) -> tuple[torch.nn.Module, Any, LvlmFamilyAdapter]:
    """The random-weight model (built directly on ``device``), its processor and its family adapter."""
    torch.manual_seed(0)
    family: LvlmFamilyAdapter
    if shape in ("llava-1.5-7b", "tiny-llava"):
        big = shape == "llava-1.5-7b"
        processor = build_tiny_llava_processor(image_size=336 if big else 64, patch_size=14 if big else 8)
        if big:
            config, dtype = llava15_7b_config(processor.tokenizer), torch.bfloat16
        else:
            config, dtype = tiny_llava_config(processor.tokenizer), torch.float32
        model_class: Any = LlavaForConditionalGeneration
        family = LlavaFamily()
    else:
        big = shape == "qwen2.5-vl-7b"
        processor = qwen25_processor() if big else build_tiny_qwen_processor("qwen2_5_vl")
        if big:
            config, dtype = qwen25_7b_config(processor.tokenizer), torch.bfloat16
        else:
            config, dtype = tiny_qwen_config("qwen2_5_vl", processor.tokenizer), torch.float32
        model_class = Qwen2_5_VLForConditionalGeneration
        family = Qwen2VLFamily()
    with device:
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    return model, processor, family


def tiny_llava_config(tokenizer: Any) -> LlavaConfig:
    """A small LLaVA-1.5 for the CPU smoke run."""
    return llava_15_config(
        tokenizer,
        image_size=64,
        patch_size=8,
        hidden=64,
        intermediate=128,
        layers=4,
        heads=4,
        kv_heads=2,
        vision_hidden=32,
        vision_intermediate=64,
        vision_layers=2,
        vision_heads=2,
        max_positions=512,
    )


def run_shape(shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every row for one shape; prints the table and returns the record."""
    device = torch.device("cpu" if shape.startswith("tiny") else "cuda")
    start = time.perf_counter()
    model, processor, family = build(shape, device)
    build_seconds = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    image, question = photo(args.width, args.height), "what is in the image?"
    attributor = LvlmAttributor.from_model(
        model, processor, family=family, layer=args.layer, max_new_tokens=args.new_tokens
    )
    prompt = family.prepare(model, processor, image, question)
    words = ANSWER.split()
    answer = " ".join(words[: args.new_tokens])
    answer_ids = answer_token_ids(processor, prompt.text, question, answer)[: args.new_tokens]
    answer = processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    if answer_token_ids(processor, prompt.text, question, answer) != answer_ids:
        raise SystemExit(f"the answer's tokens do not round-trip through its text: {answer!r}")
    steps = {"min_new_tokens": len(answer_ids), "max_new_tokens": len(answer_ids), "do_sample": False}
    recorder = AnswerRecorder(family, attributor.layers[attributor.layer].self_attn, attributor.layer)
    cache = attributor.image_features
    assert cache is not None

    def answered(recording: bool) -> Any:
        prepared = family.prepare(model, processor, image, question)
        forced = LogitsProcessorList([ForcedTokens(answer_ids, prepared.length)])
        with torch.inference_mode():
            if not recording:
                return model.generate(**prepared.inputs, **steps, logits_processor=forced)
            with recorder.attached():
                output = model.generate(**prepared.inputs, **steps, logits_processor=forced)
            attributor.memo.store(recorder.recording(prepared.inputs, output[0, prepared.length :]))
            return output

    def cold() -> None:
        cache.clear()
        attributor.clear_reuse()

    def after_answer() -> None:
        cold()
        answered(False)

    def after_other_answer() -> None:
        after_answer()
        attributor.attribute(image, question, answer=OTHER_ANSWER)

    def after_recorded_answer() -> None:
        cold()
        answered(True)

    def self_map() -> Any:
        return attributor.attribute(image, question, answer=answer)

    sources = {}
    for name, setup in (("cold", cold), ("after", after_answer), ("kv", after_other_answer)):
        setup()
        sources[name] = self_map().metadata["scored_from"]
    after_recorded_answer()
    sources["recorded"] = self_map().metadata["scored_from"]
    rows = measure({"preprocessing": (lambda: family.prepare(model, processor, image, question), cold)}, 3, device)
    rows |= measure(
        {"answer": (lambda: answered(False), cold), "answer, recording on": (lambda: answered(True), cold)},
        args.answer_repeats,
        device,
    )
    rows |= measure(
        {
            "(a) teacher forcing, cold": (self_map, cold),
            "(b) teacher forcing after the answer": (self_map, after_answer),
            "(c) KV reuse (teacher forcing of the answer's tokens)": (self_map, after_other_answer),
            "(d) from the recording (no model pass)": (self_map, after_recorded_answer),
            "generation with map": (lambda: attributor.attribute(image, question), cold),
        },
        args.repeats,
        device,
    )
    plain = rows["answer"]["seconds"]
    overhead = rows["answer, recording on"]["seconds"] - plain
    ratios = {
        "recording overhead on the answer": overhead / plain,
        "(a) teacher forcing cold / answer": rows["(a) teacher forcing, cold"]["seconds"] / plain,
        "(b) teacher forcing after the answer / answer": rows["(b) teacher forcing after the answer"]["seconds"]
        / plain,
        "(c) KV reuse / answer": rows["(c) KV reuse (teacher forcing of the answer's tokens)"]["seconds"] / plain,
        "(d) recording overhead + map from the recording / answer": (
            overhead + rows["(d) from the recording (no model pass)"]["seconds"]
        )
        / plain,
        "generation with map / answer - 1": rows["generation with map"]["seconds"] / plain - 1.0,
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n== {shape}: {device_name}, random weights, {model.dtype}, SDPA")
    print(
        f"image {args.width}x{args.height} -> {prompt.image_positions.numel()} image tokens; prompt {prompt.length} "
        f"tokens; {len(answer_ids)}-token answer; probed block {attributor.layer} of {len(attributor.layers)}; "
        f"weights {weights_gib:.2f} GiB (built in {build_seconds:.0f} s); paths taken: {sources}"
    )
    print(f"{'':56} {'seconds':>9} {'peak GiB':>9} {'above weights':>14}")
    for name, row in rows.items():
        print(f"{name:56} {row['seconds']:9.4f} {row['peak_gib']:9.2f} {row['peak_gib'] - weights_gib:14.2f}")
    for name, value in ratios.items():
        print(f"{name}: {100 * value:.2f} %")
    record = {
        "shape": shape,
        "device": device_name,
        "torch": torch.__version__,
        "dtype": str(model.dtype),
        "image": [args.width, args.height],
        "image_tokens": int(prompt.image_positions.numel()),
        "prompt_tokens": prompt.length,
        "answer_tokens": len(answer_ids),
        "layer": attributor.layer,
        "weights_gib": weights_gib,
        "paths": sources,
        "rows": rows,
        "ratios": ratios,
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", action="append", choices=SHAPES, help="repeatable; default: both 7B shapes")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=960)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--answer-repeats", type=int, default=9, help="repeats of the plain / recorded answer pair")
    parser.add_argument("--layer", type=int, default=None, help="probed block (default: the family's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    records = []
    for shape in args.shape or SHAPES[:2]:
        records.append(run_shape(shape, args))
        gc.collect()  # the previous shape's model (the image memo on its tower refers back to it)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
