"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) models and processors, offline, random weights.

The processor is the family's own (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``)
around a ``Qwen2VLImageProcessor`` with a small patch (4 px, 2 x 2 merge: one image token per 8 x 8
pixels of the resized image) and small ``min_pixels`` / ``max_pixels``, a word-level tokenizer that
knows the tiny-LLaVA vocabulary plus Qwen's special tokens (``<|im_start|> <|im_end|> <|endoftext|>
<|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>``; no BOS, as Qwen's tokenizer), and a chat
template of the real models' shape::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n          (Qwen2-VL / Qwen2.5-VL only)
    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\\n
    <|im_start|>assistant\\n

Everything round-trips through ``save_pretrained`` / ``AutoModelForImageTextToText.from_pretrained`` +
``AutoProcessor.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)

from api_tool.demo.tiny_llava import vocabulary
from tests.tiny_lvlms import suppress_special_tokens
from tests.tiny_models import reward_feature_zero

Variant = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]
VARIANTS: tuple[Variant, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

PATCH_SIZE = 4
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
"""Side in resized-image pixels of one image token (a merged 2 x 2 group of patches)."""
MIN_PIXELS = 4 * FACTOR * FACTOR
MAX_PIXELS = 96 * FACTOR * FACTOR
"""At most 96 image tokens per image: larger images are scaled down by ``smart_resize``."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen2-VL's / Qwen2.5-VL's template, reduced: default system turn, images as
``<|vision_start|><|image_pad|><|vision_end|>`` where they occur in the turn, ``<|im_end|>`` after a turn."""

QWEN3_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}",
    "",
)
"""Qwen3-VL-Instruct's template, reduced: as Qwen2-VL's without the default system turn."""


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer: the tiny-LLaVA vocabulary plus Qwen's special tokens, no BOS.

    Example:
        >>> tokenizer = build_qwen_tokenizer()
        >>> tokenizer.decode(tokenizer("<|im_start|>user a red circle").input_ids)
        '<|im_start|> user a red circle'
    """
    tokens = [*SPECIAL_TOKENS, *vocabulary()]
    ids = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )


def build_tiny_qwen_processor(variant: Variant = "qwen2_5_vl") -> Any:
    """The family's processor with a 4 px patch, 2 x 2 merge and 256..6144 pixels per image."""
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
    )
    tokenizer = build_qwen_tokenizer()
    if variant == "qwen2_vl":
        return Qwen2VLProcessor(image_processor, tokenizer, video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    if variant == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor, tokenizer, video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return Qwen3VLProcessor(image_processor, tokenizer, video_processor, chat_template=QWEN3_VL_CHAT_TEMPLATE)


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    convert = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": convert("<|image_pad|>"),
        "video_token_id": convert("<|video_pad|>"),
        "vision_start_token_id": convert("<|vision_start|>"),
        "vision_end_token_id": convert("<|vision_end|>"),
    }


def tiny_qwen_config(variant: Variant, tokenizer: PreTrainedTokenizerFast, *, hidden: int = 64, layers: int = 2) -> Any:
    """A tiny config of ``variant``: 4 query heads over 2 KV heads of 16 dims (M-RoPE sections 2/3/3 of
    the 8 rotary frequencies, interleaved 4/2/2 for Qwen3-VL), a 2-block vision tower of width 32 with
    4 px patches and a 2 x 2 merger, the tokenizer's vocabulary and special ids; Qwen3-VL-MoE with 4
    experts, 2 per token."""
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    vision = {"depth": 2, "num_heads": 2, "patch_size": PATCH_SIZE, "spatial_merge_size": MERGE_SIZE}
    vision["temporal_patch_size"] = 2
    special = _special_ids(tokenizer)
    if variant == "qwen2_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        vision.update(embed_dim=32, hidden_size=hidden, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    elif variant == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=hidden,
            window_size=2 * FACTOR,
            fullatt_block_indexes=[1],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    else:
        text["head_dim"] = hidden // 4
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=hidden,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        )
        if variant == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
            config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **special)
        else:
            config = Qwen3VLConfig(text_config=text, vision_config=vision, **special)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


_MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
}


def build_tiny_qwen2_vl(
    seed: int = 0, variant: Variant = "qwen2_5_vl", *, layers: int = 2, attn_implementation: str = "sdpa"
) -> tuple[torch.nn.Module, Any]:
    """A tiny random-weight model of ``variant`` (Qwen2.5-VL by default) and its processor; eval, float32.

    Example:
        >>> model, processor = build_tiny_qwen2_vl(0, "qwen2_vl")
        >>> model.config.model_type, processor.image_processor.merge_size
        ('qwen2_vl', 2)
    """
    processor = build_tiny_qwen_processor(variant)
    config = tiny_qwen_config(variant, processor.tokenizer, layers=layers)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[variant](config).float().eval()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    suppress_special_tokens(model, processor.tokenizer)
    return model, processor


def save_tiny_qwen(model: torch.nn.Module, processor: Any, directory: Path) -> Path:
    """Save model and processor to ``directory`` (for ``from_pretrained``)."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@torch.no_grad()
def attend_to_bright_tokens(model: torch.nn.Module, layer: int = 0) -> None:
    """Rewire ``model`` in place so that, at decoder block ``layer`` (must be 0), every text query attends
    to the image tokens of bright 8 x 8 groups of the resized image and ignores dark ones.

    End to end through the real pixel path (patch order, window reordering, merger, placement):

    * vision tower: the patch embedding puts a patch's mean normalised value in channel 0 (positive for
      white, negative for black with the CLIP mean / std), learned position embeddings (Qwen3-VL) are
      zero, and every block adds nothing (attention and MLP outputs zero), so the residual stream is
      the patch embedding;
    * merger: its norm turns channel 0's sign into ``+-sqrt(C - 1)`` in channel 0; the first linear sums
      channel 0 over the 2 x 2 group (GELU keeps bright groups, zeroes dark ones), the second writes it
      to text channel 0 and a constant 1 to text channel 2;
    * text: every token embedding carries a large constant in channel 1; block 0's keys read channel 0
      and queries read channel 1, both on the slowest rotary pair (theta 1e6: positions barely rotate
      them; Qwen3-VL's per-head q/k norms, which would scale them to the head's RMS, weigh 2). Bright image
      keys score about +16, dark ones 0.
    """
    if layer != 0:
        raise ValueError("the construction acts on the input of decoder block 0")
    visual = model.model.visual
    patch = visual.patch_embed.proj
    patch.weight.zero_()
    patch.weight[0] = 1.0 / patch.weight[0].numel()
    if getattr(patch, "bias", None) is not None:
        patch.bias.zero_()
    if hasattr(visual, "pos_embed"):
        visual.pos_embed.weight.zero_()
    for block in visual.blocks:
        block.attn.proj.weight.zero_()
        if block.attn.proj.bias is not None:
            block.attn.proj.bias.zero_()
        mlp = block.mlp
        last = next(getattr(mlp, name) for name in ("down_proj", "linear_fc2", "fc2") if hasattr(mlp, name))
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    _plant_merger(visual.merger)
    for merger in getattr(visual, "deepstack_merger_list", ()):
        _plant_merger(merger, constant=0.0)

    language_model = model.model.language_model
    language_model.embed_tokens.weight[:, 1] = 10.0
    block = language_model.layers[layer]
    block.input_layernorm.weight.fill_(1.0)
    attention = block.self_attn
    reward_feature_zero(attention)
    for norm in (getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)):
        if norm is not None:
            norm.weight.fill_(2.0)


def _plant_merger(merger: torch.nn.Module, constant: float = 1.0) -> None:
    """Merger: norm (LayerNorm or RMSNorm) weight one, then bright-group sum in channel 0, ``constant``
    in channel 2."""
    norm = merger.ln_q if hasattr(merger, "ln_q") else merger.norm
    norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()
    first, second = (merger.mlp[0], merger.mlp[2]) if hasattr(merger, "mlp") else (merger.linear_fc1, merger.linear_fc2)
    width = first.weight.shape[1] // (MERGE_SIZE * MERGE_SIZE)
    first.weight.zero_()
    first.bias.zero_()
    for sub in range(MERGE_SIZE * MERGE_SIZE):
        first.weight[0, sub * width] = 1.0
    second.weight.zero_()
    second.bias.zero_()
    second.weight[0, 0] = 1.0
    second.bias[2] = constant
