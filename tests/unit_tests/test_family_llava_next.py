"""The LLaVA-NeXT / LLaVA-OneVision adapter on tiny random-weight models, offline on CPU.

* exactness: the adapter's recomputed image attention at block ``LAYER`` equals eager attention
  probabilities (``generate(..., output_attentions=True)``) renormalised over the image keys, for the
  last prompt position and every generated step, and teacher forcing on an SDPA model gives the same rows;
* geometry: token counts, positions and boxes on non-square images against hand-computed values of the
  processor's documented geometry (wide and tall, crop seams, OneVision's pooling), the packed features
  against the vision tower run on each crop, and a planted signal landing on its pixels;
* ``prepare`` / ``teacher_forcing_inputs`` sanity, ``check_model`` refusals, the save / load round trip.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter, PreparedPrompt, Tile
from api_tool.backends.lvlm_families.llava_next import (
    AnyresLlavaFamily,
    LlavaNextFamily,
    LlavaOnevisionFamily,
    anyres_layout,
)
from api_tool.errors import ImageTokenError, UnsupportedModelError
from tests.tiny_lvlms.llava_next import (
    NEXT_PINPOINTS,
    ONEVISION_PINPOINTS,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    plant_bright_attention,
)
from tests.tiny_models import bright_square_image
from tests.tolerances import assert_sums_close

QUESTION = "What is the colour of the circle?"
LAYER = 1
NEW_TOKENS = 4
FORWARD_TERMS = 2048
"""About how many float32 terms the sums along one tiny forward pass hold (about 80 positions, 64 wide,
a 32-wide vision tower over 4 crops): the eager path and the recomputation agree within that band."""

BUILDERS = {
    "llava_next": (lambda **kw: build_tiny_llava_next(**kw), LlavaNextFamily),
    "llava_onevision": (lambda **kw: build_tiny_llava_onevision(**kw), LlavaOnevisionFamily),
    "llava_onevision_pooled": (
        lambda **kw: build_tiny_llava_onevision(vision_aspect_ratio="anyres_max_1", **kw),
        LlavaOnevisionFamily,
    ),
}


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def build(kind: str, attn: str = "sdpa") -> tuple[torch.nn.Module, object, AnyresLlavaFamily]:
    """A fresh tiny model (the caller may change it), its processor and the family adapter."""
    builder, family = BUILDERS[kind]
    model, processor = builder(attn_implementation=attn)
    return model, processor, family()


@functools.cache
def shared(kind: str, attn: str = "sdpa") -> tuple[torch.nn.Module, object, AnyresLlavaFamily]:
    """One tiny model per kind and attention implementation for the tests that do not change it."""
    return build(kind, attn)


class Probe:
    """A test-side pre-hook: the adapter's ``project`` for q / k, softmax over the image keys written here."""

    def __init__(self, family: AnyresLlavaFamily, image_positions: torch.Tensor, query_positions: torch.Tensor):
        self.family, self.image_positions, self.query_positions = family, image_positions, query_positions
        self.keys: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs):
        hidden, rotary = kwargs["hidden_states"], kwargs["position_embeddings"]
        if self.keys is None:
            self.keys = self.family.project(module, "k", hidden, rotary, self.image_positions)
            queries = self.family.project(module, "q", hidden, rotary, self.query_positions)
        else:
            queries = self.family.project(module, "q", hidden, rotary, None)
        keys = self.keys.repeat_interleave(queries.shape[1] // self.keys.shape[1], dim=1)
        scores = queries @ keys.transpose(-1, -2) * module.scaling
        self.rows.append(scores.softmax(dim=-1).mean(dim=1)[0])


def eager_rows(attentions: tuple, image_positions: torch.Tensor) -> torch.Tensor:
    """Last query row at block ``LAYER`` of every generation step, image columns renormalised, head mean."""
    rows = []
    for step in attentions:
        probabilities = step[LAYER][0, :, -1, image_positions].double()
        rows.append((probabilities / probabilities.sum(dim=-1, keepdim=True)).mean(dim=0))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# 1. Exactness against eager attention.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_recomputed_attention_equals_eager_for_generation_and_teacher_forcing(kind: str) -> None:
    model, processor, family = shared(kind, "eager")
    prompt = family.prepare(model, processor, noise_image((100, 44)), QUESTION)
    assert len(prompt.tiles) >= 2
    image_positions = prompt.image_positions
    probe = Probe(family, image_positions, torch.tensor([prompt.length - 1]))
    attention = family.decoder_layers(model)[LAYER].self_attn
    handle = attention.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        with torch.no_grad():
            output = model.generate(
                **prompt.inputs,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_attentions=True,
                return_dict_in_generate=True,
            )
    finally:
        handle.remove()
    expected = eager_rows(output.attentions, image_positions)
    generated = torch.cat(probe.rows)
    assert generated.shape == expected.shape == (NEW_TOKENS, image_positions.numel())
    assert_sums_close(generated.sum(dim=-1), np.ones(NEW_TOKENS), n_terms=image_positions.numel())
    assert_sums_close(generated, expected, n_terms=FORWARD_TERMS)

    sdpa_model, _, _ = shared(kind)
    assert sdpa_model.config._attn_implementation == "sdpa"
    answer_ids = output.sequences[0, prompt.length :].tolist()
    inputs = family.teacher_forcing_inputs(prompt, answer_ids)
    first = prompt.length - 1
    forced = Probe(family, image_positions, torch.arange(first, first + NEW_TOKENS))
    handle = family.decoder_layers(sdpa_model)[LAYER].self_attn.register_forward_pre_hook(forced, with_kwargs=True)
    try:
        with torch.no_grad():
            sdpa_model(**inputs, use_cache=False)
    finally:
        handle.remove()
    assert_sums_close(forced.rows[0], expected, n_terms=FORWARD_TERMS)


# ----------------------------------------------------------------------------------------------
# 2. Geometry: positions and boxes against hand-computed values; features; a planted signal.
# ----------------------------------------------------------------------------------------------


def assert_tile(
    tile: Tile,
    grid: tuple[int, int],
    box: tuple[float, float, float, float],
    offsets: list[int],
    first_image_position: int,
) -> None:
    assert tile.grid == grid
    np.testing.assert_allclose(tile.box, box, rtol=1e-12)
    assert (tile.positions - first_image_position).tolist() == offsets


def hires_offsets(base: int, cols: int, rows: range, columns: range) -> list[int]:
    """Offsets among the image tokens of high-resolution cells: each row of ``cols`` cells plus a newline."""
    return [base + r * (cols + 1) + c for r in rows for c in columns]


def test_llava_next_wide_image_tiles_match_the_documented_geometry() -> None:
    # 100 x 44 among pinpoints (h, w) 32x32 .. 32x96: 32x96 keeps the most pixels (72 x 32 of them), so
    # 1 x 3 crops of 32 px and a 4 x 12 feature grid. The image is resized to 73 x 32 (ceil(100 * 32 / 44))
    # and pasted at x = (96 - 73) // 2 = 11. unpad_image: 100/44 < 12/4, new width int(100 * 4 / 44) = 9,
    # (12 - 9) // 2 = 1 column dropped each side: columns 1..10 -> canvas x 8..88 -> (x - 11) * 100 / 73.
    model, processor, family = shared("llava_next")
    prompt = family.prepare(model, processor, noise_image((100, 44)), QUESTION)
    ids = prompt.inputs["input_ids"][0]
    image_token = model.config.image_token_id
    all_image = (ids == image_token).nonzero().flatten()
    assert all_image.numel() == 16 + 4 * 11 == 60
    assert all_image.numel() == processor._get_number_of_features(44, 100, 32, 32) - 1
    assert torch.equal(all_image, torch.arange(all_image[0], all_image[0] + 60))
    base, high = prompt.tiles
    start = int(all_image[0])
    assert_tile(base, (4, 4), (0.0, 0.0, 100.0, 44.0), list(range(16)), start)
    assert_tile(high, (4, 10), (-300 / 73, 0.0, 7700 / 73, 44.0), hires_offsets(16, 10, range(4), range(10)), start)
    newlines = sorted(set(all_image.tolist()) - set(prompt.image_positions.tolist()))
    assert [p - start for p in newlines] == [16 + 10, 16 + 21, 16 + 32, 16 + 43]


def test_llava_next_tall_image_crops_rows() -> None:
    # The transpose of the wide case: 3 x 1 crops (96 x 32 canvas), the image resized to 32 x 73 pasted at
    # y = 11, feature rows 1..10 kept -> canvas y 8..88.
    model, processor, family = shared("llava_next")
    prompt = family.prepare(model, processor, noise_image((44, 100)), QUESTION)
    start = int(prompt.image_positions[0])
    base, high = prompt.tiles
    assert_tile(base, (4, 4), (0.0, 0.0, 44.0, 100.0), list(range(16)), start)
    assert_tile(high, (10, 4), (0.0, -300 / 73, 44.0, 7700 / 73), hires_offsets(16, 4, range(10), range(4)), start)


def test_llava_onevision_splits_the_high_resolution_grid_at_crop_seams() -> None:
    # SigLIP 36 px crops, 8 px patches: 4 features cover 32 px of each crop (a 4 px seam gap). 100 x 44 ->
    # 1 x 3 crops (36 x 108 canvas), resized to 82 x 36 (ceil(100 * 36 / 44)), pasted at x = 13; columns
    # 1..10 kept, cut at the seams into 1..3 | 4..7 | 8..10: canvas x 8..32 | 36..68 | 72..96, y 0..32.
    model, processor, family = shared("llava_onevision")
    prompt = family.prepare(model, processor, noise_image((100, 44)), QUESTION)
    all_image = (prompt.inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    assert all_image.numel() == 16 + 4 * 11
    assert all_image.numel() == processor._get_number_of_features(44, 100, 36, 36)
    start = int(all_image[0])
    y1 = 32 * 44 / 36
    base, *blocks = prompt.tiles
    assert_tile(base, (4, 4), (0.0, 0.0, 100 * 32 / 36, y1), list(range(16)), start)
    expected = [((-5, 19), range(0, 3)), ((23, 55), range(3, 7)), ((59, 83), range(7, 10))]
    assert len(blocks) == len(expected)
    for block, ((x0, x1), columns) in zip(blocks, expected):
        box = (x0 * 100 / 82, 0.0, x1 * 100 / 82, y1)
        assert_tile(block, (4, len(columns)), box, hires_offsets(16, 10, range(4), columns), start)


def test_llava_onevision_pooled_grid_spans_the_kept_features() -> None:
    # anyres_max_1: the kept 4 x 10 grid has ratio sqrt(40 / 16) = 1.58 > 1.1 and is resized to
    # (int(4 // 1.58), int(10 // 1.58)) = (2, 6); one tile spanning canvas x 8..96, y 0..32.
    model, processor, family = shared("llava_onevision_pooled")
    prompt = family.prepare(model, processor, noise_image((100, 44)), QUESTION)
    assert prompt.image_positions.numel() == 16 + 12
    assert (prompt.inputs["input_ids"][0] == model.config.image_token_id).sum() == 16 + 2 * 7
    assert processor._get_number_of_features(44, 100, 36, 36) == 16 + 2 * 7
    start = int(prompt.image_positions[0])
    base, high = prompt.tiles
    assert_tile(base, (4, 4), (0.0, 0.0, 100 * 32 / 36, 32 * 44 / 36), list(range(16)), start)
    assert_tile(
        high, (2, 6), (-500 / 82, 0.0, 8300 / 82, 32 * 44 / 36), hires_offsets(16, 6, range(2), range(6)), start
    )


@pytest.mark.parametrize("size", [(100, 44), (20, 90)])
@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_tile_positions_hold_the_features_of_their_crop_patches(kind: str, size: tuple[int, int]) -> None:
    """The embedding the model scatters to each tile cell is the vision feature of the crop patch the
    layout says (the tower run on each crop here, independent of ``pack_image_features``)."""
    model, processor, family = shared(kind)
    prompt = family.prepare(model, processor, noise_image(size, seed=3), QUESTION)
    layout = family.layout(model, size)
    config = model.config
    with torch.no_grad():
        packed = torch.cat(
            model.model.get_image_features(prompt.inputs["pixel_values"], prompt.inputs["image_sizes"]).pooler_output
        )
        hidden = model.model.vision_tower(prompt.inputs["pixel_values"][0], output_hidden_states=True).hidden_states
        crops = hidden[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            crops = crops[:, 1:]
        crops = model.model.multi_modal_projector(crops)
    g = layout.cells
    start = int(prompt.image_positions[0])
    assert torch.equal(packed[prompt.tiles[0].positions - start], crops[0])
    high = torch.cat([tile.positions for tile in prompt.tiles[1:]]) - start - layout.base_tokens
    row = layout.rows[0] + high // (layout.grid[1] + 1)  # the stitched feature row / column of each cell
    col = layout.cols[0] + high % (layout.grid[1] + 1)
    crop = 1 + (row // g) * layout.tile_grid[1] + col // g
    assert torch.equal(packed[high + layout.base_tokens], crops[crop, (row % g) * g + col % g])
    assert (col < layout.cols[1]).all() and (row < layout.rows[1]).all()


SQUARE = (50, 22, 75, 44)
"""The bright square on a dark 100 x 44 image: base cells of 25 x 11 px, so exactly base column 2,
rows 2..3 in LLaVA-NeXT."""


def overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def cell_boxes(tile: Tile) -> list[tuple[float, float, float, float]]:
    rows, cols = tile.grid
    x0, y0, x1, y1 = tile.box
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    return [(x0 + c * w, y0 + r * h, x0 + (c + 1) * w, y0 + (r + 1) * h) for r in range(rows) for c in range(cols)]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_planted_signal_lands_on_its_pixels_in_every_tile(kind: str) -> None:
    model, processor, family = build(kind)
    plant_bright_attention(model)
    image = bright_square_image((100, 44), SQUARE)
    prompt = family.prepare(model, processor, image, QUESTION)
    probe = Probe(family, prompt.image_positions, torch.tensor([prompt.length - 1]))
    handle = family.decoder_layers(model)[0].self_attn.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**prompt.inputs)
    finally:
        handle.remove()
    attention = probe.rows[0][0].double().numpy()
    lit, start = 0.0, 0
    for tile in prompt.tiles:
        values = attention[start : start + tile.positions.numel()]
        start += tile.positions.numel()
        boxes = cell_boxes(tile)
        cell_area = (boxes[0][2] - boxes[0][0]) * (boxes[0][3] - boxes[0][1])
        inside = np.array([overlap(box, SQUARE) / cell_area for box in boxes])
        # cells mostly on the square hold attention; cells holding attention lie on the square
        assert (values[inside >= 0.75] > 0.05).all()
        assert (inside[values > 0.01] > 0.3).all()
        assert values[inside == 0].sum() < 1e-3
        lit += values[inside > 0].sum()
    assert lit > 0.99
    # the base view is a pure stretch: its lit cells are column 2, rows 2 and 3 (x 50..75, y 22..44)
    base = attention[:16].reshape(4, 4)
    assert set(zip(*np.nonzero(base > 0.01))) == {(2, 2), (3, 2)}


# ----------------------------------------------------------------------------------------------
# 3. prepare / teacher forcing sanity, refusals, save / load.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_prepare_and_teacher_forcing_inputs(kind: str) -> None:
    model, processor, family = shared(kind)
    assert isinstance(family, LvlmFamilyAdapter)
    prompt = family.prepare(model, processor, noise_image((60, 90)), QUESTION)
    assert isinstance(prompt, PreparedPrompt)
    assert prompt.text == processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    ids = prompt.inputs["input_ids"][0]
    image_token = model.config.image_token_id
    positions = prompt.image_positions
    assert positions.unique().numel() == positions.numel()
    assert bool((ids[positions] == image_token).all())
    layout = family.layout(model, (60, 90))
    assert (ids == image_token).sum() == positions.numel() + layout.grid[0]
    assert sum(t.grid[0] * t.grid[1] for t in prompt.tiles) == positions.numel()
    answer = [5, 6, 7]
    inputs = family.teacher_forcing_inputs(prompt, answer)
    assert inputs["input_ids"].tolist() == [[*ids.tolist(), *answer]]
    assert inputs["attention_mask"].tolist() == [[1] * (prompt.length + 3)]
    for name in ("pixel_values", "image_sizes", *(("batch_num_images",) if kind == "llava_onevision" else ())):
        assert torch.equal(inputs[name], prompt.inputs[name])
    assert inputs["image_sizes"].tolist() == [[90, 60]]


def test_prompt_templates_follow_the_families() -> None:
    model, processor, family = shared("llava_next")
    assert family.prepare(model, processor, noise_image((40, 40)), "Where?").text == "[INST] <image>\nWhere? [/INST]"
    model, processor, family = shared("llava_onevision")
    text = family.prepare(model, processor, noise_image((40, 40)), "Where?").text
    assert text == "<|im_start|>user\n<image>\nWhere?<|im_end|>\n<|im_start|>assistant\n"


def test_check_model_refuses_what_it_cannot_place() -> None:
    model, processor, family = build("llava_next")
    family.check_model(model, processor)
    with pytest.raises(UnsupportedModelError, match="LlavaOnevisionForConditionalGeneration"):
        LlavaOnevisionFamily().check_model(model, processor)
    processor.image_processor.image_grid_pinpoints = [[32, 64]]
    with pytest.raises(UnsupportedModelError, match="image_grid_pinpoints"):
        family.check_model(model, processor)
    processor.image_processor.image_grid_pinpoints = NEXT_PINPOINTS
    processor.image_processor.crop_size = {"height": 64, "width": 64}
    with pytest.raises(UnsupportedModelError, match="64-pixel crops"):
        family.check_model(model, processor)
    processor.image_processor.crop_size = {"height": 32, "width": 32}
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(UnsupportedModelError, match="vision_feature_select_strategy"):
        family.check_model(model, processor)
    model.config.vision_feature_select_strategy = "default"
    family.decoder_layers(model)[1].self_attn.q_norm = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="q/k"):
        family.check_model(model, processor)

    model, processor, family = build("llava_onevision")
    family.check_model(model, processor)
    processor.vision_aspect_ratio = "anyres_max_4"
    with pytest.raises(UnsupportedModelError, match="vision_aspect_ratio"):
        family.check_model(model, processor)
    model.config.image_grid_pinpoints = [[36, 72], [40, 40]]
    with pytest.raises(UnsupportedModelError, match="multiples"):
        family.check_model(model, processor)
    assert ONEVISION_PINPOINTS[0] == [36, 36]


def test_prepare_refuses_a_token_count_that_does_not_match_the_layout() -> None:
    model, processor, family = build("llava_next")
    processor.num_additional_image_tokens = 0  # the processor now writes one image token fewer
    with pytest.raises(ImageTokenError, match="needs 60"):
        family.prepare(model, processor, noise_image((100, 44)), QUESTION)


@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_round_trip_through_save_pretrained(kind: str, tmp_path) -> None:
    model, processor, family = shared(kind)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)
    family.check_model(loaded, loaded_processor)
    image = noise_image((100, 44))
    before, after = (
        family.prepare(model, processor, image, QUESTION),
        family.prepare(loaded, loaded_processor, image, QUESTION),
    )
    assert before.text == after.text
    assert torch.equal(before.inputs["input_ids"], after.inputs["input_ids"])
    assert [(t.grid, t.box) for t in before.tiles] == [(t.grid, t.box) for t in after.tiles]
    with torch.no_grad():
        assert_sums_close(loaded(**after.inputs).logits, model(**before.inputs).logits, n_terms=FORWARD_TERMS)


def test_layout_function_matches_the_processor_count_over_many_sizes() -> None:
    _, next_processor, _ = shared("llava_next")
    _, ov_processor, _ = shared("llava_onevision_pooled")
    for width in range(8, 200, 13):
        for height in range(8, 200, 17):
            layout = anyres_layout((width, height), side=32, patch=8, pinpoints=NEXT_PINPOINTS)
            assert layout.num_tokens == next_processor._get_number_of_features(height, width, 32, 32) - 1
            pooled = anyres_layout((width, height), side=36, patch=8, pinpoints=ONEVISION_PINPOINTS, max_patches=1)
            assert pooled.num_tokens == ov_processor._get_number_of_features(height, width, 36, 36)
