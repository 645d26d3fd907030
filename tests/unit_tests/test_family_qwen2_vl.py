"""The Qwen2-VL family adapter (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on tiny random-weight models, offline on CPU.

Checked: the recomputed image attention equals eager ``output_attentions`` at every generation step and
under teacher forcing (M-RoPE positions and ``rope_deltas`` included), SDPA runs give the same rows, a
planted signal lands on the right original-image pixels of stretched non-square images, ``prepare`` /
``teacher_forcing_inputs`` hold exactly the grid's tokens, and the tiny models round-trip through a
directory.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter, PreparedPrompt
from api_tool.backends.lvlm_families.qwen2_vl import (
    Qwen2VLFamily,
    combine_mrope,
    image_token_positions,
    merged_grid,
)
from api_tool.errors import ImageTokenError, InvalidParameterError, UnsupportedModelError
from tests.sample_images import noise
from tests.tiny_lvlms.qwen2_vl import (
    FACTOR,
    VARIANTS,
    attend_to_bright_tokens,
    build_tiny_qwen2_vl,
    save_tiny_qwen,
)
from tests.tiny_models import bright_square_image
from tests.tolerances import assert_sums_close

FORWARD_TERMS = 2048
"""About how many float32 terms the sums along one tiny Qwen-VL forward pass hold (about 60 positions,
widths up to 128, two vision and two decoder blocks): two correct computations (eager vs SDPA, cached
decoding vs one full forward, AVX2 vs AVX-512) may differ within that sum's rounding band."""
LAYER = 1
MAX_NEW_TOKENS = 4
QUESTION = "What is in the picture?"
FAMILY = Qwen2VLFamily()


@functools.cache
def tiny(variant: str, attention: str = "eager") -> tuple[torch.nn.Module, Any]:
    """A tiny model whose block ``LAYER`` has 10x larger q / k weights, or 4x larger q / k norm weights where
    it normalises them (peaked attention, so the comparison with eager attention is not between two
    near-uniform rows)."""
    model, processor = build_tiny_qwen2_vl(1, variant, attn_implementation=attention)
    attention_module = FAMILY.decoder_layers(model)[LAYER].self_attn
    with torch.no_grad():
        for name, factor in (("q_proj", 10.0), ("k_proj", 10.0), ("q_norm", 4.0), ("k_norm", 4.0)):
            if hasattr(attention_module, name):
                getattr(attention_module, name).weight.mul_(factor)
    return model, processor


def photo() -> Image.Image:
    """Non-square noise that the processor stretches (60 x 36 -> 64 x 32 pixels, a 4 x 8 token grid)."""
    return noise(3, (60, 36))


class RowProbe:
    """A forward pre-hook on one block's attention recording, per call, the head-mean softmax over the
    image keys of the scaled q . k (keys of the first call, queries of ``query_positions`` then every
    position), computed only with ``LvlmFamilyAdapter.project``; also records the ``cos`` table received."""

    def __init__(self, family: LvlmFamilyAdapter, prompt: PreparedPrompt, query_positions: torch.Tensor) -> None:
        self.family, self.image_positions, self.query_positions = family, prompt.image_positions, query_positions
        self.keys: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.cos: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, rotary = kwargs["hidden_states"], kwargs["position_embeddings"]
        self.cos.append(rotary[0])
        if self.keys is None:
            self.keys = self.family.project(module, "k", hidden, rotary, self.image_positions)
            queries = self.family.project(module, "q", hidden, rotary, self.query_positions)
        else:
            queries = self.family.project(module, "q", hidden, rotary, None)
        keys = self.keys.repeat_interleave(queries.shape[1] // self.keys.shape[1], dim=1)
        scores = torch.einsum("bhqd,bhnd->bhqn", queries, keys) * float(module.scaling)
        self.rows.append(scores.softmax(dim=-1).mean(dim=1)[0])


def run_hooked(model: torch.nn.Module, probe: RowProbe, call: Any) -> Any:
    handle = FAMILY.decoder_layers(model)[LAYER].self_attn.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        with torch.no_grad():
            return call()
    finally:
        handle.remove()


def eager_image_rows(attentions: torch.Tensor, image_positions: torch.Tensor) -> np.ndarray:
    """``(heads, queries, keys)`` eager probabilities -> image columns renormalised, mean over heads."""
    image = attentions[:, :, image_positions].double()
    return (image / image.sum(dim=-1, keepdim=True)).mean(dim=0).numpy()


def generate(model: torch.nn.Module, prompt: PreparedPrompt, probe: RowProbe) -> Any:
    return run_hooked(
        model,
        probe,
        lambda: model.generate(
            **prompt.inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            min_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
        ),
    )


# ----------------------------------------------------------------------------------------------
# 1. Exactness.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_and_teacher_forcing_rows_equal_eager_attention(variant: str) -> None:
    model, processor = tiny(variant)
    prompt = FAMILY.prepare(model, processor, photo(), QUESTION)
    generation = RowProbe(FAMILY, prompt, torch.tensor([prompt.length - 1]))
    output = generate(model, prompt, generation)
    assert len(output.attentions) == len(generation.rows) == MAX_NEW_TOKENS
    for step, (attentions, row) in enumerate(zip(output.attentions, generation.rows)):
        layer_attention = attentions[LAYER][0]
        assert layer_attention.shape[1] == (prompt.length if step == 0 else 1)  # prefill, then one token
        expected = eager_image_rows(layer_attention[:, -1:], prompt.image_positions)
        assert_sums_close(row.numpy(), expected, n_terms=FORWARD_TERMS)
        assert expected.max() > 3.0 / prompt.image_positions.numel()  # peaked, not near-uniform
        assert math.isclose(float(row.sum()), 1.0, rel_tol=1e-5)

    # Teacher forcing: one forward (no cache) over prompt + the generated answer.
    answer = output.sequences[0, prompt.length :].tolist()
    assert len(answer) == MAX_NEW_TOKENS
    queries = torch.arange(prompt.length - 1, prompt.length - 1 + len(answer))
    forced = RowProbe(FAMILY, prompt, queries)
    inputs = FAMILY.teacher_forcing_inputs(prompt, answer)
    result = run_hooked(model, forced, lambda: model(**inputs, use_cache=False, output_attentions=True))
    # The same M-RoPE tables at every position: prefill + one per decoding step (rope_deltas) == one
    # full forward (3-D positions recomputed over the whole sequence).
    generated_cos = torch.cat(generation.cos, dim=1)
    assert torch.equal(generated_cos, forced.cos[0][:, : generated_cos.shape[1]])
    assert not torch.equal(forced.cos[0][0, :, 0], forced.cos[0][0, :, -1])  # 3-D sections differ
    expected = eager_image_rows(result.attentions[LAYER][0][:, queries], prompt.image_positions)
    assert_sums_close(forced.rows[0].numpy(), expected, n_terms=FORWARD_TERMS)
    assert_sums_close(forced.rows[0].numpy(), torch.cat(generation.rows).numpy(), n_terms=FORWARD_TERMS)


def test_sdpa_model_gives_the_eager_rows() -> None:
    eager, processor = tiny("qwen2_5_vl")
    sdpa, _ = tiny("qwen2_5_vl", "sdpa")
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    prompt = FAMILY.prepare(sdpa, processor, photo(), QUESTION)
    eager_probe = RowProbe(FAMILY, prompt, torch.tensor([prompt.length - 1]))
    sdpa_probe = RowProbe(FAMILY, prompt, torch.tensor([prompt.length - 1]))
    reference = generate(eager, prompt, eager_probe)
    run_hooked(sdpa, sdpa_probe, lambda: sdpa.generate(**prompt.inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False))
    assert len(sdpa_probe.rows) == MAX_NEW_TOKENS
    for step, row in enumerate(sdpa_probe.rows):
        expected = eager_image_rows(reference.attentions[step][LAYER][0][:, -1:], prompt.image_positions)
        assert_sums_close(row.numpy(), expected, n_terms=FORWARD_TERMS)


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_per_axis_rotary_tables_combine_like_the_rotary_module(variant: str) -> None:
    model, processor = tiny(variant)
    prompt = FAMILY.prepare(model, processor, photo(), QUESTION)
    position_ids, _ = model.model.get_rope_index(
        prompt.inputs["input_ids"],
        mm_token_type_ids=prompt.inputs["mm_token_type_ids"],
        image_grid_thw=prompt.inputs["image_grid_thw"],
    )
    rotary = model.model.language_model.rotary_emb
    hidden = torch.zeros(1, prompt.length, model.config.text_config.hidden_size)
    cos, sin = rotary(hidden, position_ids)
    angles = position_ids[..., None].float() * rotary.inv_freq  # (3, B, S, D/2), per axis
    per_axis_cos, per_axis_sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    section = model.config.text_config.rope_parameters["mrope_section"]
    assert torch.equal(combine_mrope(per_axis_cos, section), cos)
    assert torch.equal(combine_mrope(per_axis_sin, section), sin)
    attention = FAMILY.decoder_layers(model)[LAYER].self_attn
    hidden = torch.randn(1, prompt.length, model.config.text_config.hidden_size)
    for projection in ("q", "k"):
        combined = FAMILY.project(attention, projection, hidden, (cos, sin), None)
        per_axis = FAMILY.project(attention, projection, hidden, (per_axis_cos, per_axis_sin), None)
        assert torch.equal(combined, per_axis)


def test_qwen3_q_k_norms_are_applied() -> None:
    model, _ = tiny("qwen3_vl")
    attention = FAMILY.decoder_layers(model)[LAYER].self_attn
    hidden = torch.randn(1, 5, model.config.text_config.hidden_size)
    cos, sin = torch.ones(1, 5, attention.head_dim), torch.zeros(1, 5, attention.head_dim)  # no rotation
    with torch.no_grad():
        queries = FAMILY.project(attention, "q", hidden, (cos, sin), None)
        keys = FAMILY.project(attention, "k", hidden, (cos, sin), torch.tensor([1, 3]))
        raw = attention.q_proj(hidden).view(1, 5, -1, attention.head_dim).transpose(1, 2)
        # RMSNorm over each head's D values, weighted: recomputed here from its definition.
        rms = raw.pow(2).mean(dim=-1, keepdim=True).add(attention.q_norm.variance_epsilon).sqrt()
        expected = raw / rms * attention.q_norm.weight
        raw_keys = attention.k_proj(hidden[:, [1, 3]]).view(1, 2, -1, attention.head_dim).transpose(1, 2)
        expected_keys = attention.k_norm(raw_keys)
    assert_sums_close(queries.numpy(), expected.numpy(), n_terms=64)
    assert not torch.allclose(queries, raw)
    assert torch.equal(keys, expected_keys)


# ----------------------------------------------------------------------------------------------
# 2. Orientation on stretched non-square images.
# ----------------------------------------------------------------------------------------------


SCENES = [
    # (variant, image size, bright square, token grid worked out by hand from smart_resize with factor 8)
    ("qwen2_5_vl", (60, 36), (37, 9, 53, 27), (4, 8)),  # 64 x 32 px: stretched 1.07x in x, 0.89x in y
    ("qwen2_vl", (200, 90), (124, 12, 176, 63), (6, 14)),  # over max_pixels: 112 x 48 px
    ("qwen3_vl", (40, 100), (4, 60, 22, 95), (12, 5)),  # portrait: 40 x 96 px
    ("qwen3_vl_moe", (90, 60), (8, 37, 25, 53), (8, 11)),  # round(7.5) = 8, round(11.25) = 11: 88 x 64 px
]


@pytest.mark.parametrize(("variant", "size", "square", "grid"), SCENES)
def test_planted_signal_lands_on_the_bright_square(
    variant: str, size: tuple[int, int], square: tuple[int, int, int, int], grid: tuple[int, int]
) -> None:
    model, processor = build_tiny_qwen2_vl(0, variant)
    attend_to_bright_tokens(model, layer=0)
    prompt = FAMILY.prepare(model, processor, bright_square_image(size, square), QUESTION)
    (tile,) = prompt.tiles
    assert tile.grid == grid
    assert tile.box == (0.0, 0.0, float(size[0]), float(size[1]))
    probe = RowProbe(FAMILY, prompt, torch.tensor([prompt.length - 1]))
    handle = FAMILY.decoder_layers(model)[0].self_attn.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**prompt.inputs)
    finally:
        handle.remove()
    attention = probe.rows[0][0].reshape(grid).numpy()

    # Cells laid on the original image by the tile box: cell (r, c) spans [c W / cols, (c + 1) W / cols] x ...
    rows, cols = grid
    x0, y0, x1, y1 = tile.box
    inside, touching = np.zeros(grid, dtype=bool), np.zeros(grid, dtype=bool)
    for r in range(rows):
        for c in range(cols):
            left, right = x0 + c * (x1 - x0) / cols, x0 + (c + 1) * (x1 - x0) / cols
            top, bottom = y0 + r * (y1 - y0) / rows, y0 + (r + 1) * (y1 - y0) / rows
            inside[r, c] = square[0] <= left and right <= square[2] and square[1] <= top and bottom <= square[3]
            touching[r, c] = left < square[2] and square[0] < right and top < square[3] and square[1] < bottom
    strong = attention > 0.5 * attention.max()
    assert inside.sum() >= 2
    assert np.all(strong[inside]), "every cell inside the square is strongly attended"
    assert np.all(touching[strong]), "no strongly attended cell lies off the square"
    assert attention[touching].sum() > 0.9


# ----------------------------------------------------------------------------------------------
# 3. prepare / teacher_forcing_inputs.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_prepare_holds_exactly_the_grid_tokens(variant: str) -> None:
    model, processor = tiny(variant)
    image = photo()
    prompt = FAMILY.prepare(model, processor, image, QUESTION)
    ids = prompt.inputs["input_ids"][0]
    (tile,) = prompt.tiles
    # 60 x 36 -> smart_resize (factor 8): round(36 / 8) = 4 (half to even) -> 32 px, round(60 / 8) = 8 -> 64 px.
    assert tile.grid == (32 // FACTOR, 64 // FACTOR)
    assert prompt.inputs["image_grid_thw"].tolist() == [[1, 32 // 4, 64 // 4]]
    assert tile.box == (0.0, 0.0, 60.0, 36.0)
    image_id = model.config.image_token_id
    first = int(tile.positions[0])
    assert tile.positions.tolist() == list(range(first, first + 32))
    assert int((ids == image_id).sum()) == 32
    assert int(ids[first - 1]) == model.config.vision_start_token_id
    assert int(ids[first + 32]) == model.config.vision_end_token_id
    assert prompt.inputs["mm_token_type_ids"][0].tolist() == [int(token == image_id) for token in ids.tolist()]
    assert prompt.inputs["pixel_values"].shape == (32 * 4, 3 * 2 * 4 * 4)
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|> assistant")
    assert prompt.text.endswith("<|im_start|>assistant\n") and QUESTION in prompt.text
    has_system = variant in ("qwen2_vl", "qwen2_5_vl")  # Qwen3-VL's template adds no default system turn
    assert prompt.text.startswith("<|im_start|>system\n") == has_system


def test_teacher_forcing_inputs_append_the_answer_as_text() -> None:
    model, processor = tiny("qwen2_5_vl")
    prompt = FAMILY.prepare(model, processor, photo(), QUESTION)
    answer = processor.tokenizer("a red circle", add_special_tokens=False).input_ids
    inputs = FAMILY.teacher_forcing_inputs(prompt, answer)
    assert inputs["input_ids"][0].tolist() == prompt.inputs["input_ids"][0].tolist() + answer
    assert inputs["attention_mask"].tolist() == [[1] * (prompt.length + len(answer))]
    assert inputs["mm_token_type_ids"][0].tolist() == [*prompt.inputs["mm_token_type_ids"][0].tolist(), 0, 0, 0]
    assert inputs["pixel_values"] is prompt.inputs["pixel_values"]
    assert inputs["image_grid_thw"] is prompt.inputs["image_grid_thw"]
    assert set(inputs) == set(prompt.inputs)


def test_max_pixels_caps_the_grid_and_keeps_the_whole_image_box() -> None:
    model, processor = tiny("qwen2_5_vl")
    image = bright_square_image((200, 90), (124, 12, 176, 63))
    assert FAMILY.prepare(model, processor, image, QUESTION).tiles[0].grid == (6, 14)  # processor's 6144 px
    capped = Qwen2VLFamily(max_pixels=1024).prepare(model, processor, image, QUESTION)
    # smart_resize by hand: beta = sqrt(200 * 90 / 1024); floor(90 / beta / 8) * 8 = 16, floor(200 / beta / 8) * 8 = 40.
    assert capped.inputs["image_grid_thw"].tolist() == [[1, 16 // 4, 40 // 4]]
    (tile,) = capped.tiles
    assert tile.grid == (2, 5) and tile.box == (0.0, 0.0, 200.0, 90.0)
    assert int((capped.inputs["input_ids"] == model.config.image_token_id).sum()) == 10
    assert processor.image_processor.size.longest_edge == 96 * FACTOR * FACTOR  # the processor is unchanged
    with pytest.raises(InvalidParameterError):
        Qwen2VLFamily(max_pixels=0)


def test_small_helpers() -> None:
    assert merged_grid(torch.tensor([1, 6, 14]), 2) == (3, 7)
    with pytest.raises(ImageTokenError):
        merged_grid([2, 6, 14], 2)
    with pytest.raises(ImageTokenError):
        image_token_positions(torch.tensor([5, 5, 1, 5, 5]), 5, (2, 2))
    with pytest.raises(ImageTokenError):
        image_token_positions(torch.tensor([5, 5, 5]), 5, (2, 2))


def test_refusals() -> None:
    model, processor = tiny("qwen2_5_vl")
    assert isinstance(FAMILY, LvlmFamilyAdapter)
    FAMILY.check_model(model, processor)
    other, other_processor = build_tiny_qwen2_vl(0, "qwen2_vl")
    other_processor.image_processor.merge_size = 1
    with pytest.raises(UnsupportedModelError, match="merge_size"):
        FAMILY.check_model(other, other_processor)
    other_processor.image_processor.merge_size = 2
    other.config.model_type = "llava"
    with pytest.raises(UnsupportedModelError, match="llava"):
        FAMILY.check_model(other, other_processor)
    other.config.model_type = "qwen2_vl"
    processor_without_image = type("P", (), {})()
    with pytest.raises(UnsupportedModelError, match="lacks"):
        FAMILY.check_model(model, processor_without_image)
    FAMILY.check_model(other, other_processor)
    other_processor.chat_template = other_processor.chat_template.replace("<|image_pad|>", "")
    with pytest.raises(ImageTokenError, match="placeholders"):
        FAMILY.prepare(other, other_processor, photo(), QUESTION)


def test_sliding_window_blocks_refuse_longer_sequences_and_the_other_hooks() -> None:
    model, processor = build_tiny_qwen2_vl(0, "qwen2_vl")
    FAMILY.check_sequence_length(model, 1, 10_000)  # no sliding window in the tiny (or released) models
    model.config.text_config.layer_types = ["full_attention", "sliding_attention"]
    model.config.text_config.sliding_window = 16
    FAMILY.check_sequence_length(model, 1, 16)
    FAMILY.check_sequence_length(model, 0, 10_000)  # block 0 attends to everything
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        FAMILY.check_sequence_length(model, 1, 17)
    tokenizer = processor.tokenizer
    ends = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    assert FAMILY.end_token_ids(processor) == frozenset(ends) and len(ends) == 2
    assert FAMILY.default_layer(model.config) == 1  # floor(2 * 20 / 32)
    qwen25_7b = type("C", (), {"text_config": type("T", (), {"num_hidden_layers": 28})()})()
    assert FAMILY.default_layer(qwen25_7b) == 17


@pytest.mark.parametrize("variant", VARIANTS)
def test_directory_round_trip(variant: str, tmp_path: Path) -> None:
    model, processor = build_tiny_qwen2_vl(0, variant)
    directory = save_tiny_qwen(model, processor, tmp_path / variant)
    loaded = AutoModelForImageTextToText.from_pretrained(directory).eval()
    loaded_processor = AutoProcessor.from_pretrained(directory)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    FAMILY.check_model(loaded, loaded_processor)
    prompt = FAMILY.prepare(model, processor, photo(), QUESTION)
    again = FAMILY.prepare(loaded, loaded_processor, photo(), QUESTION)
    assert prompt.text == again.text
    assert prompt.tiles[0].positions.tolist() == again.tiles[0].positions.tolist()
    for key, value in prompt.inputs.items():
        assert torch.equal(value, again.inputs[key]), key
    with torch.no_grad():
        logits, loaded_logits = model(**prompt.inputs).logits, loaded(**again.inputs).logits
    assert_sums_close(loaded_logits.numpy(), logits.numpy(), n_terms=FORWARD_TERMS)
