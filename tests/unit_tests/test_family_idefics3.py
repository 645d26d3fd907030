"""The Idefics3 / SmolVLM family adapter: exact image attention, tile geometry, prompt layout.

Everything runs offline on tiny random-weight models (tests/tiny_lvlms/idefics3.py). Idefics3's tiny
crops are 32 pixels (8 x 8 patches of 4, pixel-shuffled by 2 into 4 x 4 tokens); SmolVLM's are 34 pixels
with the same patch grid, so its tokens cover only the crop's top-left 32 x 32 pixels.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter, PreparedPrompt
from api_tool.backends.lvlm_families.idefics3 import (
    Idefics3Family,
    SmolVLMFamily,
    crop_grid,
    pixel_shuffle_patches,
    tile_boxes,
)
from api_tool.errors import UnsupportedModelError
from tests.tiny_lvlms.idefics3 import (
    attend_to_bright_patches,
    build_tiny_idefics3,
    save_and_load,
)
from tests.tiny_models import bright_square_image
from tests.tolerances import assert_sums_close

FAMILIES = ["idefics3", "smolvlm"]
N_TERMS = 2048
"""Float32 rounding band: the tiny model's forward pass sums at most a few hundred terms per output."""
QUESTION = "What is in the picture?"


def _needs(family: str) -> None:
    if family == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words")


def _adapter(family: str) -> Idefics3Family:
    return Idefics3Family() if family == "idefics3" else SmolVLMFamily()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    _needs(request.param)
    model, processor = build_tiny_idefics3(seed=0, family=request.param)
    return request.param, model, processor


def _gradient_image(width: int, height: int) -> Image.Image:
    """R ramps with x and G with y: pixel (x, y) holds ``255 (x + 0.5) / W`` and ``255 (y + 0.5) / H``."""
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) * 255 / width
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) * 255 / height
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[..., 0] = xs.round().to(torch.uint8)[None, :]
    pixels[..., 1] = ys.round().to(torch.uint8)[:, None]
    return Image.fromarray(pixels.numpy(), "RGB")


# ----------------------------------------------------------------------------------------------
# A probe of our own (the shared mechanism is not used here): the adapter's project at one block.
# ----------------------------------------------------------------------------------------------


def image_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax of ``scaling * q . k`` over the image keys, mean over heads; grouped-query keys repeated."""
    repeat = queries.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("bhqd,bhnd->bhqn", queries, keys) * scaling
    return scores.softmax(dim=-1).mean(dim=1)[0]


class Probe:
    """Forward pre-hook on one block's attention: keys of the image positions at the first call, the
    image attention of ``query_positions`` then, of every new position at later calls."""

    def __init__(self, adapter: Idefics3Family, image_positions: torch.Tensor, query_positions: torch.Tensor):
        self.adapter = adapter
        self.image_positions = image_positions
        self.query_positions = query_positions
        self.keys: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs["position_embeddings"]
        if self.keys is None:
            self.keys = self.adapter.project(module, "k", hidden, rotary, self.image_positions)
            queries = self.adapter.project(module, "q", hidden, rotary, self.query_positions)
        else:
            queries = self.adapter.project(module, "q", hidden, rotary, None)
        self.rows.append(image_attention(queries, self.keys, float(module.scaling)))


def eager_rows(attentions: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """``attentions (1, H, Q, K)`` of eager attention: image columns renormalised, mean over heads."""
    image = attentions[0][:, :, image_positions].double()
    return (image / image.sum(dim=-1, keepdim=True)).mean(dim=0)


# ----------------------------------------------------------------------------------------------
# 1. Exactness against eager attention.
# ----------------------------------------------------------------------------------------------


LAYERS = (0, 1)


def _attach(adapter, model, image_positions, query_positions) -> tuple[list[Probe], list]:
    probes = [Probe(adapter, image_positions, query_positions) for _ in LAYERS]
    layers = adapter.decoder_layers(model)
    handles = [
        layers[layer].self_attn.register_forward_pre_hook(probe, with_kwargs=True)
        for layer, probe in zip(LAYERS, probes)
    ]
    return probes, handles


def test_rows_equal_eager_attention(tiny):
    """Both blocks of the tiny model, probed under SDPA during generation, then under eager attention in
    one teacher-forced pass: every row equals eager attention's image columns renormalised."""
    family, model, processor = tiny
    adapter = _adapter(family)
    adapter.check_model(model, processor)
    prompt = adapter.prepare(model, processor, _gradient_image(90, 50), QUESTION)
    image_positions = prompt.image_positions
    steps = 4

    model.set_attn_implementation("sdpa")
    probes, handles = _attach(adapter, model, image_positions, torch.tensor([prompt.length - 1]))
    try:
        with torch.no_grad():
            generated = model.generate(**prompt.inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    answer_ids = generated[0, prompt.length :].tolist()
    assert len(answer_ids) == steps

    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model.generate(
                **prompt.inputs,
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                output_attentions=True,
                return_dict_in_generate=True,
            )
        assert eager.sequences[0, prompt.length :].tolist() == answer_ids
        for layer, probe in zip(LAYERS, probes):
            assert len(probe.rows) == steps
            for step, row in enumerate(probe.rows):
                expected = eager_rows(eager.attentions[step][layer][:, :, -1:], image_positions)
                assert row.shape == (1, image_positions.numel())
                assert_sums_close(row.double().numpy(), expected.numpy(), n_terms=N_TERMS)

        # teacher forcing over the generated answer: one pass, the same rows at the positions predicting it
        queries = torch.arange(prompt.length - 1, prompt.length - 1 + steps)
        forced_probes, handles = _attach(adapter, model, image_positions, queries)
        try:
            with torch.no_grad():
                output = model(**adapter.teacher_forcing_inputs(prompt, answer_ids[:-1]), output_attentions=True)
        finally:
            for handle in handles:
                handle.remove()
    finally:
        model.set_attn_implementation("sdpa")
    for layer, probe, forced in zip(LAYERS, probes, forced_probes):
        expected = eager_rows(output.attentions[layer][:, :, queries], image_positions)
        assert_sums_close(forced.rows[0].double().numpy(), expected.numpy(), n_terms=N_TERMS)
        assert_sums_close(forced.rows[0].numpy(), torch.cat(probe.rows).numpy(), n_terms=N_TERMS)
    assert not torch.allclose(probes[0].rows[0], probes[1].rows[0])  # the two blocks differ: a real check


# ----------------------------------------------------------------------------------------------
# 2. Orientation: a planted bright square lands on its own pixels of a non-square, multi-tile image.
# ----------------------------------------------------------------------------------------------


def _cell_boxes(box: tuple[float, float, float, float], side: int) -> list[tuple[float, float, float, float]]:
    x0, y0, x1, y1 = box
    width, height = (x1 - x0) / side, (y1 - y0) / side
    return [
        (x0 + col * width, y0 + row * height, x0 + (col + 1) * width, y0 + (row + 1) * height)
        for row in range(side)
        for col in range(side)
    ]


def _overlap(cell: tuple[float, float, float, float], square: tuple[int, int, int, int]) -> float:
    """The fraction of ``cell`` inside ``square``."""
    width = max(0.0, min(cell[2], square[2]) - max(cell[0], square[0]))
    height = max(0.0, min(cell[3], square[3]) - max(cell[1], square[1]))
    return width * height / ((cell[2] - cell[0]) * (cell[3] - cell[1]))


# (family, image size, bright square): the square covers whole tokens of crop (row 1, col 1) of a 2 x 3 grid.
# Idefics3: 90 x 50 -> canvas 96 x 64 (crops of 32): canvas x 48..64, y 32..64 = original x 45..60, y 25..50.
# SmolVLM: 51 x 34 -> canvas 102 x 68 (crops of 34, tokens over 32): canvas x 50..66, y 34..66 = x 25..33, y 17..33.
ORIENTATION_CASES = [
    ("idefics3", (90, 50), (45, 25, 60, 50), 8),
    ("smolvlm", (51, 34), (25, 17, 33, 33), 8),
]


@pytest.mark.parametrize(("family", "size", "square", "inside_cells"), ORIENTATION_CASES)
def test_planted_square_lands_on_its_pixels(family, size, square, inside_cells):
    _needs(family)
    model, processor = build_tiny_idefics3(seed=1, family=family)
    attend_to_bright_patches(model)
    adapter = _adapter(family)
    prompt = adapter.prepare(model, processor, bright_square_image(size, square), QUESTION)
    assert [tile.grid for tile in prompt.tiles] == [(4, 4)] * 7
    probe = Probe(adapter, prompt.image_positions, torch.tensor([prompt.length - 1]))
    handle = adapter.decoder_layers(model)[0].self_attn.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**prompt.inputs)
    finally:
        handle.remove()
    row = probe.rows[0][0]

    inside = outside = 0.0
    inside_count = 0
    start = 0
    for tile in prompt.tiles:
        cells = tile.grid[0] * tile.grid[1]
        weights = row[start : start + cells]
        start += cells
        for weight, cell in zip(weights.tolist(), _cell_boxes(tile.box, tile.grid[0])):
            fraction = _overlap(cell, square)
            if fraction == 1.0:
                inside += weight
                inside_count += 1
            elif fraction == 0.0:
                outside += weight
    assert inside_count == inside_cells  # the 2 x 4 tokens of crop (1, 1) (the global image's cells straddle)
    assert inside > 0.999
    assert outside < 1e-6


# ----------------------------------------------------------------------------------------------
# 3. prepare's tiles, the processor's geometry, teacher forcing.
# ----------------------------------------------------------------------------------------------


# (family, image size, crops (rows, cols), expected boxes): computed by hand from the module docstring.
GEOMETRY_CASES = [
    # 90 x 50 -> 96 x 54 -> canvas 96 x 64: 2 rows x 3 cols of 32; each crop 30 x 25 original pixels.
    (
        "idefics3",
        (90, 50),
        (2, 3),
        [(c * 30.0, r * 25.0, c * 30.0 + 30, r * 25.0 + 25) for r in range(2) for c in range(3)] + [(0, 0, 90, 50)],
    ),
    # 40 x 100 -> 38 x 96 -> canvas 64 x 96: 3 rows x 2 cols.
    (
        "idefics3",
        (40, 100),
        (3, 2),
        [(c * 20.0, r * 100 / 3, c * 20.0 + 20, (r + 1) * 100 / 3) for r in range(3) for c in range(2)]
        + [(0, 0, 40, 100)],
    ),
    # 20 x 16 -> 96 x 76 -> canvas 96 x 96: 3 x 3 (the short side rounds up to a whole crop: a stretch).
    (
        "idefics3",
        (20, 16),
        (3, 3),
        [(c * 20 / 3, r * 16 / 3, (c + 1) * 20 / 3, (r + 1) * 16 / 3) for r in range(3) for c in range(3)]
        + [(0, 0, 20, 16)],
    ),
    # SmolVLM: 51 x 34 -> canvas 102 x 68 (crops of 34): each crop 17 x 17 original pixels, tokens over 16 x 16.
    (
        "smolvlm",
        (51, 34),
        (2, 3),
        [(c * 17.0, r * 17.0, c * 17.0 + 16, r * 17.0 + 16) for r in range(2) for c in range(3)] + [(0, 0, 48, 32)],
    ),
]


@pytest.mark.parametrize(("family", "size", "grid", "boxes"), GEOMETRY_CASES)
def test_prepare_tiles_follow_the_processor(family, size, grid, boxes):
    _needs(family)
    model, processor = build_tiny_idefics3(seed=0, family=family)
    adapter = _adapter(family)
    prompt = adapter.prepare(model, processor, _gradient_image(*size), QUESTION)
    rows, cols = grid

    # the image processor itself reports that grid
    reported = processor.image_processor(_gradient_image(*size), return_row_col_info=True, return_tensors="pt")
    assert (reported["rows"][0][0], reported["cols"][0][0]) == grid
    assert crop_grid(size, processor.image_processor) == grid

    # tiles: one per crop, row-major, then the global image; boxes as computed by hand
    assert len(prompt.tiles) == rows * cols + 1
    for tile, box in zip(prompt.tiles, boxes):
        assert tile.grid == (4, 4)
        assert tile.box == pytest.approx(box)

    # positions: every <image> token exactly once, in order; each run follows its marker
    ids = prompt.inputs["input_ids"][0]
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert prompt.image_positions.tolist() == (ids == image_id).nonzero().flatten().tolist()
    markers = [f"<row_{r + 1}_col_{c + 1}>" for r in range(rows) for c in range(cols)] + ["<global-img>"]
    for tile, marker in zip(prompt.tiles, markers):
        start = int(tile.positions[0])
        assert tile.positions.tolist() == list(range(start, start + 16))
        assert tokenizer.convert_ids_to_tokens(int(ids[start - 1])) == marker

    # each cell's box holds the pixels that its patches see: on the gradient image, the mean colour of
    # a token's patches equals the gradient at its box's centre (resizing keeps a linear ramp linear)
    pixel_values = prompt.inputs["pixel_values"][0]
    assert pixel_values.shape[0] == len(prompt.tiles)
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    worst = 0.0
    for frame, tile in zip(pixel_values, prompt.tiles):
        levels = (frame * std + mean) * 255
        tokens = levels[:2, :32, :32].reshape(2, 4, 8, 4, 8).mean(dim=(2, 4))  # 8 x 8 pixels a token
        for index, cell in enumerate(_cell_boxes(tile.box, 4)):
            row, col = divmod(index, 4)
            expected_r = 255 * (cell[0] + cell[2]) / 2 / size[0]
            expected_g = 255 * (cell[1] + cell[3]) / 2 / size[1]
            worst = max(
                worst, abs(float(tokens[0, row, col]) - expected_r), abs(float(tokens[1, row, col]) - expected_g)
            )
    assert worst < 1.5  # two uint8 roundings and the ramp's own rounding (0.6 seen)


def test_pixel_shuffle_token_order_matches_the_connector(tiny):
    _family, model, _processor = tiny
    patches = torch.arange(64, dtype=torch.float32).reshape(1, 64, 1)
    shuffled = model.model.connector.pixel_shuffle(patches, 2)
    assert shuffled[0].long().tolist() == pixel_shuffle_patches(8, 2).tolist()
    assert pixel_shuffle_patches(6, 3)[1].tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]


def test_teacher_forcing_inputs_append_the_answer(tiny):
    family, model, processor = tiny
    adapter = _adapter(family)
    prompt = adapter.prepare(model, processor, _gradient_image(90, 50), QUESTION)
    assert isinstance(adapter, LvlmFamilyAdapter)
    assert isinstance(prompt, PreparedPrompt)
    answer = processor.tokenizer("a red circle", add_special_tokens=False).input_ids
    forced = adapter.teacher_forcing_inputs(prompt, answer)
    ids = prompt.inputs["input_ids"]
    assert forced["input_ids"].tolist() == [ids[0].tolist() + answer]
    assert forced["attention_mask"].tolist() == [[1] * (prompt.length + len(answer))]
    assert torch.equal(forced["pixel_values"], prompt.inputs["pixel_values"])
    assert torch.equal(forced["pixel_attention_mask"], prompt.inputs["pixel_attention_mask"])
    assert prompt.inputs["input_ids"].shape == ids.shape  # the prompt is not changed
    bos = "<|begin_of_text|>" if family == "idefics3" else "<|im_start|>"
    assert prompt.text == f"{bos}User:<image>{QUESTION}<end_of_utterance>\nAssistant:"
    assert prompt.image_positions.numel() == 7 * 16
    assert adapter.end_token_ids(processor) == {processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")}


def test_unsplit_image_is_one_global_tile():
    model, processor = build_tiny_idefics3(seed=0, longest_edge=32)
    prompt = Idefics3Family().prepare(model, processor, _gradient_image(30, 20), QUESTION)
    assert len(prompt.tiles) == 1
    assert prompt.tiles[0].box == (0.0, 0.0, 30.0, 20.0)
    assert tile_boxes((30, 20), (0, 0)) == [(0.0, 0.0, 30.0, 20.0)]
    ids = prompt.inputs["input_ids"][0]
    assert processor.tokenizer.convert_ids_to_tokens(int(ids[int(prompt.tiles[0].positions[0]) - 1])) == "<global-img>"


def test_round_trip_through_a_directory(tiny, tmp_path):
    family, model, processor = tiny
    loaded, loaded_processor = save_and_load(model, processor, tmp_path)
    assert type(loaded) is type(model)
    assert type(loaded_processor) is type(processor)
    adapter = _adapter(family)
    adapter.check_model(loaded, loaded_processor)
    image = _gradient_image(90, 50)
    first = adapter.prepare(model, processor, image, QUESTION)
    second = adapter.prepare(loaded, loaded_processor, image, QUESTION)
    assert first.text == second.text
    assert torch.equal(first.inputs["input_ids"], second.inputs["input_ids"])
    assert [tile.box for tile in first.tiles] == [tile.box for tile in second.tiles]
    with torch.no_grad():  # the model's round trip on the same inputs: with torchvision < 0.27 AutoProcessor
        # reloads the PIL backend of the image processor, which resamples slightly differently
        logits = model(**first.inputs).logits
        loaded_logits = loaded(**first.inputs).logits
    assert_sums_close(loaded_logits, logits, n_terms=N_TERMS)


def test_check_model_refuses_what_it_cannot_attribute(tiny):
    family, model, processor = tiny
    adapter = _adapter(family)
    other = SmolVLMFamily() if family == "idefics3" else Idefics3Family()
    with pytest.raises(UnsupportedModelError, match="model_type"):
        other.check_model(model, processor)
    saved = processor.image_seq_len
    processor.image_seq_len = 9
    try:
        with pytest.raises(UnsupportedModelError, match="image_seq_len"):
            adapter.check_model(model, processor)
    finally:
        processor.image_seq_len = saved
    attention = adapter.decoder_layers(model)[0].self_attn
    attention.q_norm = torch.nn.Identity()
    try:
        with pytest.raises(UnsupportedModelError, match="q/k"):
            adapter.check_model(model, processor)
    finally:
        del attention.q_norm
    adapter.check_model(model, processor)


# ----------------------------------------------------------------------------------------------
# End to end through the shared mechanism (the family is put in the table for the test only).
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def in_the_table(monkeypatch):
    from api_tool import families

    entries = []
    for name, adapter in (("idefics3", "Idefics3Family"), ("smolvlm", "SmolVLMFamily")):
        if any(name in entry.model_types for entry in families.FAMILIES):
            continue
        entries.append(
            families.Family(
                name=name,
                backend="lvlm",
                classes=name,
                geometry="crops + global image",
                verified="test",
                defaults=families.AttributionDefaults(layer=None, combine="cls"),
                model_types=(name,),
                adapter_path=f"api_tool.backends.lvlm_families.idefics3:{adapter}",
                scores_answer=True,
            )
        )
    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + tuple(entries))


@pytest.mark.parametrize(("family", "size", "square", "inside_cells"), ORIENTATION_CASES)
def test_lvlm_attributor_maps_the_planted_square(in_the_table, family, size, square, inside_cells):
    _needs(family)
    from api_tool.backends.lvlm import LvlmAttributor

    model, processor = build_tiny_idefics3(seed=1, family=family)
    attend_to_bright_patches(model)
    attributor = LvlmAttributor.from_model(model, processor, layer=0, max_new_tokens=3)
    image = bright_square_image(size, square)
    generated = attributor.attribute(image, QUESTION)
    assert len(generated.metadata["tiles"]) == 7
    raw, (gx0, gy0, gx1, gy1) = generated.raw, generated.grid_box
    rows, cols = raw.shape
    # the stitched canvas starts at the image's corner; its cell (r, c) spans these original pixels
    cell_w, cell_h = size[0] / (gx1 - gx0), size[1] / (gy1 - gy0)
    cells = [
        (float(raw[r, c]), (c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h))
        for r in range(rows)
        for c in range(cols)
    ]
    total = float(raw.sum())
    # no attention on canvas cells away from the square; its centre of mass is the square's centre
    # (within the canvas cells' quantisation: they start at the image's corner, not at the crops')
    assert sum(value for value, cell in cells if _overlap(cell, square) == 0.0) < 1e-6 * total
    centre_x = sum(value * (cell[0] + cell[2]) / 2 for value, cell in cells) / total
    centre_y = sum(value * (cell[1] + cell[3]) / 2 for value, cell in cells) / total
    assert centre_x == pytest.approx((square[0] + square[2]) / 2, abs=cell_w / 2)
    assert centre_y == pytest.approx((square[1] + square[3]) / 2, abs=cell_h / 2)

    # teacher forcing on the model's own answer scores the same
    forced = attributor.attribute(image, QUESTION, answer=generated.metadata["answer"])
    assert forced.metadata["steps"] == generated.metadata["steps"]
    assert_sums_close(forced.raw, generated.raw, n_terms=N_TERMS)
