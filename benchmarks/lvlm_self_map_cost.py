"""What the LVLM self-map costs next to the answer it explains, and next to eager attention (GPU).

Qwen2.5-VL-7B's shape with random weights (bf16, SDPA), one image of ``--width`` x ``--height`` (1280 x
960: 1,564 image tokens after the 28-px merge), one question. Measured in one process, side by side:

* ``preprocessing``: the processor on the image and prompt (on the GPU when the model is there);
* ``answer``: preprocessing + ``model.generate`` of ``--new-tokens`` tokens (min = max, so every run
  decodes the same): what answering costs from an image;
* ``self-map (teacher forcing) after the answer``: ``LvlmAttributor.attribute(image, question, answer=...)``
  on an answer of the same length, right after that answer was generated from the image (the reflection
  loop's order): one forward pass over prompt + answer, stopped at the probed block, the image encoder's
  output taken from the answer's pass (``image_feature_cache``);
* ``self-map (teacher forcing), cold``: the same with no answer before it (the image encoder runs);
* ``self-map (generation)``: ``LvlmAttributor.attribute(image, question)``: the answer and its map in one
  generation, the probe attached;
* ``eager``: what users do without the probe: ``attn_implementation="eager"`` and
  ``generate(output_attentions=True)``, then the map from the stored attention of the probed block.

Time is the median of ``--repeats`` runs after a warm-up (CUDA synchronised), each after its own untimed
set-up (the image-feature memo cleared, and for "after the answer" the answer generated); memory is the
peak allocated during a run, also given above the weights. Prints a table and the ratios; ``--out`` writes JSON.

Example:
    python benchmarks/lvlm_self_map_cost.py --out benchmarks/results/lvlm_self_map_cost.json
"""

from __future__ import annotations

import argparse
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
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from api_tool.backends.lvlm import LvlmAttributor
from api_tool.backends.lvlm_families.qwen2_vl import Qwen2VLFamily
from tests.tiny_lvlms.qwen2_vl import (
    QWEN2_VL_CHAT_TEMPLATE,
    build_qwen_tokenizer,
    build_tiny_qwen_processor,
    tiny_qwen_config,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ANSWER = "the red circle is on the left of the blue square and the green star is at the top right of the image"


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


def measure(
    run: Callable[[], Any], repeats: int, device: torch.device, setup: Callable[[], Any] = lambda: None
) -> dict[str, float]:
    """Median seconds and the largest peak of allocated memory (CUDA only; 0 elsewhere) over ``repeats``
    runs after one warm-up, each run after an untimed ``setup()``."""
    cuda = device.type == "cuda"
    setup()
    run()
    seconds, peaks = [], [0]
    for _ in range(repeats):
        setup()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device))
        seconds.append(time.perf_counter() - start)
    return {"seconds": statistics.median(seconds), "peak_gib": max(peaks) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=960)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layer", type=int, default=None, help="probed block (default: the family's)")
    parser.add_argument("--shape", choices=("7b", "tiny"), default="7b", help="tiny: a CPU smoke run of the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if args.shape == "7b" else "cpu")
    torch.manual_seed(0)
    if args.shape == "7b":
        processor = qwen25_processor()
        config, dtype = qwen25_7b_config(processor.tokenizer), torch.bfloat16
    else:
        processor = build_tiny_qwen_processor("qwen2_5_vl")
        config, dtype = tiny_qwen_config("qwen2_5_vl", processor.tokenizer), torch.float32
    start = time.perf_counter()
    with device:
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    build_seconds = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    image, question = photo(args.width, args.height), "what is in the image?"
    family = Qwen2VLFamily()
    attributor = LvlmAttributor.from_model(
        model, processor, family=family, layer=args.layer, max_new_tokens=args.new_tokens
    )
    prompt = family.prepare(model, processor, image, question)
    image_tokens = int(prompt.image_positions.numel())
    answer_ids = processor.tokenizer(ANSWER, add_special_tokens=False).input_ids[: args.new_tokens]
    answer = processor.tokenizer.decode(answer_ids)
    steps = {"min_new_tokens": args.new_tokens, "max_new_tokens": args.new_tokens, "do_sample": False}

    def preprocessing() -> Any:
        return family.prepare(model, processor, image, question)

    def plain_answer() -> Any:
        with torch.inference_mode():
            return model.generate(**preprocessing().inputs, **steps)

    def teacher_forced() -> Any:
        return attributor.attribute(image, question, answer=answer)

    def generated_with_map() -> Any:
        return attributor.attribute(image, question)

    cache = attributor.image_features
    assert cache is not None

    def answered_before() -> None:
        cache.clear()
        plain_answer()

    rows = {
        "preprocessing": measure(preprocessing, args.repeats, device),
        "answer": measure(plain_answer, args.repeats, device, cache.clear),
        "self-map (teacher forcing) after the answer": measure(teacher_forced, args.repeats, device, answered_before),
        "self-map (teacher forcing), cold": measure(teacher_forced, args.repeats, device, cache.clear),
        "self-map (generation)": measure(generated_with_map, args.repeats, device, cache.clear),
    }
    forced_steps = teacher_forced().metadata["steps"]
    model.set_attn_implementation("eager")
    layer = attributor.layer
    positions = prompt.image_positions.to(device)

    def eager_map() -> np.ndarray:
        with torch.inference_mode():
            output = model.generate(**prompt.inputs, **steps, output_attentions=True, return_dict_in_generate=True)
        rows_per_step = []
        for step in output.attentions:
            scores = step[layer][0, :, -1, positions].float()
            rows_per_step.append((scores / scores.sum(dim=-1, keepdim=True)).mean(dim=0))
        return torch.stack(rows_per_step).mean(dim=0).cpu().numpy()

    rows["eager output_attentions"] = measure(eager_map, max(1, args.repeats // 2), device, cache.clear)
    answer_row, after = rows["answer"], rows["self-map (teacher forcing) after the answer"]
    ratios = {
        "teacher forcing after the answer / answer (time)": after["seconds"] / answer_row["seconds"],
        "teacher forcing after the answer: peak / answer peak": after["peak_gib"] / max(answer_row["peak_gib"], 1e-9),
        "teacher forcing cold / answer (time)": rows["self-map (teacher forcing), cold"]["seconds"]
        / answer_row["seconds"],
        "generation with map / answer (time)": rows["self-map (generation)"]["seconds"] / answer_row["seconds"],
        "eager / answer (time)": rows["eager output_attentions"]["seconds"] / answer_row["seconds"],
        "eager peak / answer peak": rows["eager output_attentions"]["peak_gib"] / max(answer_row["peak_gib"], 1e-9),
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}; Qwen2.5-VL {args.shape} shape, random weights, {dtype}, SDPA")
    print(
        f"image {args.width}x{args.height} -> {image_tokens} image tokens; prompt {prompt.length} tokens; "
        f"{args.new_tokens} new tokens; probed block {layer}; teacher forcing scored {forced_steps} steps; "
        f"weights {weights_gib:.2f} GiB (built in {build_seconds:.0f} s)"
    )
    print(f"{'':44} {'seconds':>9} {'peak GiB':>9} {'above weights':>14}")
    for name, row in rows.items():
        above = row["peak_gib"] - weights_gib
        print(f"{name:44} {row['seconds']:9.3f} {row['peak_gib']:9.2f} {above:14.2f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if args.out is not None:
        record = {
            "device": device_name,
            "shape": args.shape,
            "torch": torch.__version__,
            "image": [args.width, args.height],
            "image_tokens": image_tokens,
            "prompt_tokens": prompt.length,
            "new_tokens": args.new_tokens,
            "layer": layer,
            "weights_gib": weights_gib,
            "rows": rows,
            "ratios": ratios,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
