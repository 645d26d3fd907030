"""The InternVL family adapter on a tiny random-weight ``InternVLForConditionalGeneration`` (offline, CPU).

Checked: the recomputed image attention equals eager attention (generation and teacher forcing, Qwen2 and
Qwen3 text models), the pixel shuffle's token order, the tiles' count / order / boxes against the image
processor's own crops, a planted signal landing on the right original-image pixels through every tile and the
thumbnail, the prompt's image tokens, teacher-forcing inputs, refusals and the save / load round trip.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter, PreparedPrompt
from api_tool.backends.lvlm_families.internvl import (
    InternVLFamily,
    image_tiles,
    pixel_shuffle_patches,
    tile_boxes,
    tile_grid,
)
from api_tool.errors import ImageTokenError, UnsupportedModelError
from tests.tiny_lvlms.internvl import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    TILE_SIZE,
    TOKENS_PER_TILE,
    attend_to_bright_tokens,
    bright_rectangle_image,
    build_tiny_internvl,
    sharpen_attention,
)
from tests.tolerances import assert_sums_close

FORWARD_TERMS = 2048
"""About how many float32 terms the sums behind one attention entry hold in the tiny model (hidden 64 through
two blocks, 128-wide MLPs, a ~130-token softmax): the rounding band of SDPA vs eager vs the recomputation."""
QUESTION = "Where is the white square?"


def image_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax over the image keys of ``scaling * q . k`` (grouped-query heads), mean over heads: ``(Q, N)``."""
    heads, kv_heads = queries.shape[1], keys.shape[1]
    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("bhqd,bhnd->bhqn", queries, keys) * scaling
    return scores.softmax(dim=-1).mean(dim=1)[0]


class Probe:
    """A forward pre-hook on one block's attention: keys of the image positions at the first call, image
    attention of ``query_positions`` then (and of every position passed in later calls), via the adapter."""

    def __init__(self, family: LvlmFamilyAdapter, prompt: PreparedPrompt, query_positions: torch.Tensor) -> None:
        self.family, self.prompt, self.query_positions = family, prompt, query_positions
        self.keys: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rotary = kwargs["hidden_states"], kwargs["position_embeddings"]
        if self.keys is None:
            self.keys = self.family.project(module, "k", hidden, rotary, self.prompt.image_positions)
            queries = self.family.project(module, "q", hidden, rotary, self.query_positions)
        else:
            queries = self.family.project(module, "q", hidden, rotary, None)
        self.rows.append(image_attention(queries, self.keys, float(module.scaling)))

    @contextmanager
    def attached(self, attention: torch.nn.Module):
        handle = attention.register_forward_pre_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def eager_image_rows(attentions: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """Eager attention probabilities ``(1, H, Q, S)`` kept on the image keys, renormalised, mean over heads."""
    kept = attentions[0][..., image_positions].double()
    return (kept / kept.sum(dim=-1, keepdim=True)).mean(dim=0)


@pytest.fixture(scope="module")
def family() -> InternVLFamily:
    return InternVLFamily()


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_internvl(seed=0)


def wide_image() -> Image.Image:
    """96 x 64 with structure everywhere (so random weights give varied attention): 3 x 2 tiles + thumbnail."""
    generator = np.random.default_rng(0)
    return Image.fromarray(generator.integers(0, 256, size=(64, 96, 3), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------
# 1. Exactness against eager attention.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text_model", "layer"), [("qwen2", 0), ("qwen2", 1), ("qwen3", 1)])
def test_recomputed_attention_equals_eager_while_generating_and_teacher_forcing(family, text_model, layer):
    model, processor = build_tiny_internvl(seed=1, text_model=text_model, attn_implementation="eager")
    sharpen_attention(model)
    family.check_model(model, processor)
    prompt = family.prepare(model, processor, wide_image(), QUESTION)
    image_positions = prompt.image_positions
    last = prompt.length - 1
    attention = family.decoder_layers(model)[layer].self_attn
    steps = 3

    probe = Probe(family, prompt, torch.tensor([last]))
    with probe.attached(attention), torch.no_grad():
        out = model.generate(
            **prompt.inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    assert len(probe.rows) == steps and all(row.shape == (1, image_positions.numel()) for row in probe.rows)
    for step, row in enumerate(probe.rows):
        expected = eager_image_rows(out.attentions[step][layer][:, :, -1:], image_positions)
        assert_sums_close(row.numpy(), expected.numpy(), n_terms=FORWARD_TERMS)
        assert float(row.sum()) == pytest.approx(1.0, abs=1e-5)
    # the rows are not uniform: the comparison is not trivially true
    assert all(float(row.max() / row.min()) > 3 for row in probe.rows)

    # teacher forcing over the generated answer: same rows from one forward pass
    answer_ids = out.sequences[0, prompt.length :].tolist()
    inputs = family.teacher_forcing_inputs(prompt, answer_ids[:-1])
    queries = torch.arange(last, last + steps)
    forced = Probe(family, prompt, queries)
    with forced.attached(attention), torch.no_grad():
        full = model(**inputs, output_attentions=True)
    expected = eager_image_rows(full.attentions[layer][:, :, last : last + steps], image_positions)
    assert_sums_close(forced.rows[0].numpy(), expected.numpy(), n_terms=FORWARD_TERMS)
    assert_sums_close(forced.rows[0].numpy(), torch.cat(probe.rows).numpy(), n_terms=FORWARD_TERMS)


def test_recomputation_under_sdpa_equals_eager_attention(family):
    eager, processor = build_tiny_internvl(seed=2, attn_implementation="eager")
    sdpa, _ = build_tiny_internvl(seed=2, attn_implementation="sdpa")
    sharpen_attention(eager)
    sharpen_attention(sdpa)
    prompt = family.prepare(sdpa, processor, wide_image(), QUESTION)
    probe = Probe(family, prompt, torch.tensor([prompt.length - 1]))
    with probe.attached(family.decoder_layers(sdpa)[1].self_attn), torch.no_grad():
        sdpa(**prompt.inputs)
        reference = eager(**prompt.inputs, output_attentions=True)
    expected = eager_image_rows(reference.attentions[1][:, :, -1:], prompt.image_positions)
    assert_sums_close(probe.rows[0].numpy(), expected.numpy(), n_terms=FORWARD_TERMS)
    assert float(probe.rows[0].max() / probe.rows[0].min()) > 3


# ----------------------------------------------------------------------------------------------
# 2. Geometry: token order within a tile, tiles' order and boxes, a planted signal.
# ----------------------------------------------------------------------------------------------


def test_pixel_shuffle_token_order_is_row_major_over_two_by_two_patch_blocks(tiny):
    model, _ = tiny
    patches, channels = 8, 3
    rows, cols = torch.meshgrid(torch.arange(patches), torch.arange(patches), indexing="ij")
    # features as get_image_features builds them: the vision tower's row-major patch sequence, reshaped
    sequence = torch.stack([rows.flatten(), cols.flatten(), torch.full((patches * patches,), 7)], dim=-1).float()
    shuffled = model.model.pixel_shuffle(sequence.reshape(1, patches, patches, channels), scale_factor=0.5)
    tokens = shuffled.reshape(1, -1, shuffled.shape[-1])[0]  # (16, 4 * channels)
    held = tokens.reshape(16, 4, channels)[..., :2].long()  # (token, channel group, (row, col))
    assert torch.equal(held, pixel_shuffle_patches(patches, 0.5))
    # spelled out: token 5 is cell (1, 1) and holds patches (2, 2), (2, 3), (3, 2), (3, 3) in that order
    assert held[5].tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    assert held[3].tolist() == [[0, 6], [0, 7], [1, 6], [1, 7]]


def test_tile_grid_follows_the_aspect_ratio_rule():
    assert tile_grid((96, 64), 32, 1, 6) == (2, 3)  # aspect 1.5 -> 3 columns, 2 rows
    assert tile_grid((64, 96), 32, 1, 6) == (3, 2)
    assert tile_grid((150, 50), 32, 1, 6) == (1, 3)
    assert tile_grid((32, 32), 32, 1, 6) == (1, 1)  # small square: one tile, no thumbnail
    assert tile_grid((64, 64), 32, 1, 6) == (2, 2)  # tie on the ratio, area > half the 2x2 canvas
    assert tile_grid((1000, 100), 448, 1, 12) == (1, 10)
    assert tile_boxes((90, 60), (2, 3)) == [
        (0.0, 0.0, 30.0, 30.0),
        (30.0, 0.0, 60.0, 30.0),
        (60.0, 0.0, 90.0, 30.0),
        (0.0, 30.0, 30.0, 60.0),
        (30.0, 30.0, 60.0, 60.0),
        (60.0, 30.0, 90.0, 60.0),
        (0.0, 0.0, 90.0, 60.0),
    ]


def block_image(size: tuple[int, int], blocks: tuple[int, int], colours: list[tuple[int, int, int]]) -> Image.Image:
    """``blocks = (rows, cols)`` solid blocks of the given colours, row-major, over an image of ``size``."""
    width, height = size
    rows, cols = blocks
    array = np.zeros((height, width, 3), dtype=np.uint8)
    for index, colour in enumerate(colours):
        row, col = divmod(index, cols)
        ys = slice(row * height // rows, (row + 1) * height // rows)
        xs = slice(col * width // cols, (col + 1) * width // cols)
        array[ys, xs] = colour
    return Image.fromarray(array)


def test_tiles_are_the_processor_crops_of_their_boxes_and_the_thumbnail_is_last(tiny, family):
    """A 90 x 60 image (not a multiple of the tile size: it is stretched by 32/30) of six colour blocks that
    match the 3 x 2 tile boxes: each tile's interior is its block's colour; the thumbnail holds all six."""
    model, processor = tiny
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image = block_image((90, 60), (2, 3), colours)
    prompt = family.prepare(model, processor, image, QUESTION)
    assert [tile.box for tile in prompt.tiles] == tile_boxes((90, 60), (2, 3))
    pixels = prompt.inputs["pixel_values"]
    assert pixels.shape == (7, 3, TILE_SIZE, TILE_SIZE)
    mean = torch.tensor(processor.image_processor.image_mean)[:, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None]

    def colour_of(region: torch.Tensor) -> list[int]:
        rgb = region.reshape(3, -1) * std + mean
        assert float((rgb.max(dim=1).values - rgb.min(dim=1).values).max()) < 2 / 255  # a solid region
        return [round(255 * float(v)) for v in rgb.mean(dim=1)]

    for index, colour in enumerate(colours):
        assert colour_of(pixels[index, :, 4:-4, 4:-4]) == list(colour)
    thumbnail = pixels[6]  # 90 x 60 stretched to 32 x 32: block (r, c) -> x [c * 32/3, ...), y [r * 16, ...)
    for index, colour in enumerate(colours):
        row, col = divmod(index, 3)
        y, x = row * 16 + 8, round((col + 0.5) * 32 / 3)
        assert colour_of(thumbnail[:, y - 2 : y + 2, x - 2 : x + 2]) == list(colour)


# (image size, white rectangle): tile space is 96 x 64 (3 x 2 tiles of 32 px, 8 px token cells); the
# rectangle covers tile-space x 48..72, y 16..32 and thumbnail x 16..24, y 8..16 in both cases (the second
# image is stretched by 0.64 onto the tiles and by 32/150 x 32/100 onto the thumbnail).
BRIGHT_CASES = [((96, 64), (48, 16, 72, 32)), ((150, 100), (75, 25, 113, 50))]
EXPECTED_LIT_CELLS = {
    (1, 2, 2),  # (tile, row, col): tile 1 = top row, middle column
    (1, 2, 3),
    (1, 3, 2),
    (1, 3, 3),
    (2, 2, 0),  # tile 2 = top row, right column
    (2, 3, 0),
    (6, 1, 2),  # the thumbnail
}


@pytest.mark.parametrize(("size", "rectangle"), BRIGHT_CASES)
def test_planted_attention_lands_on_the_bright_rectangle_in_original_pixels(family, size, rectangle):
    model, processor = build_tiny_internvl(seed=0)
    attend_to_bright_tokens(model)
    image = bright_rectangle_image(size, rectangle)
    prompt = family.prepare(model, processor, image, QUESTION)
    probe = Probe(family, prompt, torch.tensor([prompt.length - 1]))
    with probe.attached(family.decoder_layers(model)[0].self_attn), torch.no_grad():
        model(**prompt.inputs)
    attention = probe.rows[0][0]
    lit, inside = set(), set()
    x0, y0, x1, y1 = rectangle
    start = 0
    for index, tile in enumerate(prompt.tiles):
        rows, cols = tile.grid
        bx0, by0, bx1, by1 = tile.box
        cell_w, cell_h = (bx1 - bx0) / cols, (by1 - by0) / rows
        for row in range(rows):
            for col in range(cols):
                if float(attention[start + row * cols + col]) > 0.01:
                    lit.add((index, row, col))
                cx0, cy0 = bx0 + col * cell_w, by0 + row * cell_h
                if x0 <= cx0 and cx0 + cell_w <= x1 and y0 <= cy0 and cy0 + cell_h <= y1:
                    inside.add((index, row, col))
        start += rows * cols
    assert lit == EXPECTED_LIT_CELLS
    assert inside == EXPECTED_LIT_CELLS  # the adapter's boxes put exactly the lit cells inside the rectangle
    lit_mass = sum(float(attention[i * TOKENS_PER_TILE + r * 4 + c]) for i, r, c in EXPECTED_LIT_CELLS)
    assert lit_mass > 0.999


# ----------------------------------------------------------------------------------------------
# 3. prepare / teacher_forcing_inputs.
# ----------------------------------------------------------------------------------------------


def test_prompt_holds_exactly_the_tiles_image_tokens_between_img_markers(tiny, family):
    model, processor = tiny
    prompt = family.prepare(model, processor, wide_image(), QUESTION)
    ids = prompt.inputs["input_ids"][0]
    tokenizer = processor.tokenizer
    context, start, end = (tokenizer.convert_tokens_to_ids(t) for t in (IMG_CONTEXT, IMG_START, IMG_END))
    assert [tile.grid for tile in prompt.tiles] == [(4, 4)] * 7
    positions = prompt.image_positions
    assert torch.equal(positions, (ids == context).nonzero().flatten())
    first = int(positions[0])
    assert torch.equal(positions, torch.arange(first, first + 7 * TOKENS_PER_TILE))  # contiguous, tile after tile
    assert int(ids[first - 1]) == start and int(ids[first + 7 * TOKENS_PER_TILE]) == end
    assert int((ids == start).sum()) == 1 and int((ids == end).sum()) == 1
    assert (
        prompt.text == "<|im_start|>user\n<IMG_CONTEXT>\nWhere is the white square?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.length == 7 * TOKENS_PER_TILE + 13
    assert prompt.inputs["pixel_values"].dtype == torch.float32


def test_teacher_forcing_inputs_append_the_answer(tiny, family):
    model, processor = tiny
    prompt = family.prepare(model, processor, wide_image(), QUESTION)
    answer_ids = processor.tokenizer("a red circle", add_special_tokens=False).input_ids
    inputs = family.teacher_forcing_inputs(prompt, answer_ids)
    assert inputs["input_ids"][0].tolist() == prompt.inputs["input_ids"][0].tolist() + answer_ids
    assert torch.equal(inputs["attention_mask"], torch.ones_like(inputs["input_ids"]))
    assert torch.equal(inputs["pixel_values"], prompt.inputs["pixel_values"])


def test_a_small_image_is_one_tile_without_thumbnail_and_max_tiles_caps_the_grid(tiny):
    model, processor = tiny
    single = InternVLFamily().prepare(model, processor, Image.new("RGB", (30, 28)), QUESTION)
    assert [(tile.grid, tile.box) for tile in single.tiles] == [((4, 4), (0.0, 0.0, 30.0, 28.0))]
    assert single.inputs["pixel_values"].shape[0] == 1
    capped = InternVLFamily(max_tiles=2).prepare(model, processor, wide_image(), QUESTION)
    assert [tile.box for tile in capped.tiles] == [
        (0.0, 0.0, 48.0, 64.0),
        (48.0, 0.0, 96.0, 64.0),
        (0.0, 0.0, 96.0, 64.0),
    ]
    assert capped.image_positions.numel() == 3 * TOKENS_PER_TILE


def test_refusals(tiny, family):
    model, processor = tiny
    from tests.tiny_models import tiny_llava

    llava = tiny_llava()
    with pytest.raises(UnsupportedModelError, match="InternVLForConditionalGeneration"):
        family.check_model(llava.model, llava.processor)
    wrong_count = build_tiny_internvl(seed=0)[1]
    wrong_count.image_seq_length = 64
    with pytest.raises(UnsupportedModelError, match="image tokens per tile"):
        family.check_model(model, wrong_count)
    full, _ = build_tiny_internvl(seed=0)
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(UnsupportedModelError, match="default"):
        family.check_model(full, processor)
    with pytest.raises(ValueError, match="max_tiles"):
        InternVLFamily(max_tiles=0)
    with pytest.raises(ImageTokenError, match="3 image tokens"):
        image_tiles(torch.tensor([5, 5, 5]), 5, [(0.0, 0.0, 1.0, 1.0)], (2, 2))
    windowed, _ = build_tiny_internvl(seed=0)
    windowed.model.language_model.layers[1].self_attn.sliding_window = 64  # a 125-token prompt exceeds it
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        family.prepare(windowed, processor, wide_image(), QUESTION)


def test_round_trip_through_save_pretrained(tiny, family, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    reloaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded).__name__ == "InternVLForConditionalGeneration" and loaded.config.model_type == "internvl"
    family.check_model(loaded, reloaded)
    before = family.prepare(model, processor, wide_image(), QUESTION)
    after = family.prepare(loaded, reloaded, wide_image(), QUESTION)
    assert torch.equal(before.inputs["input_ids"], after.inputs["input_ids"])
    assert torch.equal(before.inputs["pixel_values"], after.inputs["pixel_values"])
    with torch.no_grad():
        assert_sums_close(loaded(**after.inputs).logits, model(**before.inputs).logits, n_terms=FORWARD_TERMS)


def test_through_the_shared_mechanism_once_the_family_table_lists_internvl():
    """End to end through ``LvlmAttributor`` (generation, stitching, teacher forcing) when the table has the
    family; the stitched canvas (12.5 px cells over 150 x 100) is lit exactly under the white rectangle."""
    from api_tool.families import lvlm_family_of

    model, processor = build_tiny_internvl(seed=0)
    try:
        lvlm_family_of(model.config)
    except UnsupportedModelError:
        pytest.skip("the family table has no internvl entry yet")
    from api_tool.backends.lvlm import LvlmAttributor

    attend_to_bright_tokens(model)
    attributor = LvlmAttributor.from_model(model, processor, layer=0, max_new_tokens=2)
    image = bright_rectangle_image((150, 100), (75, 25, 113, 50))
    generated = attributor.attribute(image, QUESTION)
    forced = attributor.attribute(image, QUESTION, answer=generated.metadata["answer"])
    assert generated.raw.shape == (8, 12)
    lit = {(int(r), int(c)) for r, c in zip(*np.nonzero(generated.raw > 0.01 * generated.raw.max()))}
    assert lit == {(row, col) for row in (2, 3) for col in (6, 7, 8)}
    assert_sums_close(forced.raw, generated.raw, n_terms=FORWARD_TERMS)
    assert len(generated.metadata["tiles"]) == 7
