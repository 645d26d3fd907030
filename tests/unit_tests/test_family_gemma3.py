"""The Gemma 3 family adapter on a tiny random-weight Gemma 3: exact against eager attention, offline, on CPU.

The tiny model (tests/tiny_lvlms/gemma3.py) has one sliding-window block (local RoPE) and one global block
(global RoPE, linear scaling), random q/k norms, ``query_pre_attn_scalar`` != ``head_dim`` and a 4 x 4 pooled
image-token grid, so each of those has to be followed for the maps to match.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from api_tool.backends.lvlm import LvlmAttributor, image_attention
from api_tool.backends.lvlm_families import gemma3 as gemma3_module
from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter, PreparedPrompt
from api_tool.backends.lvlm_families.gemma3 import Gemma3Family, default_layer
from api_tool.errors import ImageTokenError, UnsupportedModelError
from tests.tiny_lvlms.gemma3 import (
    BOI,
    EOI,
    IMAGE_SOFT,
    attend_to_bright_tokens,
    build_tiny_gemma3,
    load_tiny_gemma3,
    save_tiny_gemma3,
)
from tests.tiny_models import bright_square_image
from tests.tolerances import assert_sums_close, sum_tolerance

QUESTION = "What is the colour of the circle?"
MAX_NEW_TOKENS = 4
FORWARD_TERMS = 2048
"""About how many float32 terms the sums along one tiny-Gemma-3 forward pass hold (about 40 positions, widths
up to 128, two vision and two decoder blocks): two correct paths (eager vs SDPA, a gathered subset of positions vs
the whole sequence, AVX2 vs AVX-512) may differ within that sum's rounding band."""
PROMPT_TOKENS = [
    "<bos>",
    "<start_of_turn>",
    "user",
    BOI,
    *[IMAGE_SOFT] * 16,
    EOI,
    *["what", "is", "the", "colour", "of", "the", "circle", "?"],
    "<end_of_turn>",
    "<start_of_turn>",
    "model",
]
"""The tiny tokenizer's view of Gemma 3's prompt for QUESTION (newlines are whitespace to it)."""
IMAGE_POSITIONS = list(range(4, 20))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, processor = build_tiny_gemma3(seed=0)
    return save_tiny_gemma3(model, processor, tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="module")
def tiny(saved: Path) -> tuple[torch.nn.Module, Any]:
    """The SDPA model the adapter hooks, loaded back through the Auto classes."""
    return load_tiny_gemma3(saved)


@pytest.fixture(scope="module")
def eager(saved: Path) -> torch.nn.Module:
    return load_tiny_gemma3(saved, attn_implementation="eager")[0]


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 72, 3), dtype=np.uint8))


class Probe:
    """What the shared mechanism does, in small: a forward pre-hook on one block's attention that scores the
    adapter's queries against its image keys (softmax over the image keys, mean over heads)."""

    def __init__(self, adapter: Gemma3Family, image_positions: torch.Tensor, query_positions: torch.Tensor) -> None:
        self.adapter = adapter
        self.image_positions = image_positions
        self.query_positions = query_positions
        self.keys: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.rotary: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs["position_embeddings"]
        self.rotary.append(rotary)
        if self.keys is None:
            self.keys = self.adapter.project(module, "k", hidden, rotary, self.image_positions)
            queries = self.adapter.project(module, "q", hidden, rotary, self.query_positions)
        else:
            queries = self.adapter.project(module, "q", hidden, rotary, None)
        self.rows.append(image_attention(queries, self.keys, self.adapter.scaling(module))[0])

    @contextmanager
    def attached(self, attention: torch.nn.Module) -> Iterator[Probe]:
        handle = attention.register_forward_pre_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def assert_far(actual: np.ndarray, expected: np.ndarray) -> None:
    """``actual`` differs from ``expected`` by more than ten times the band ``assert_sums_close`` allows."""
    band = sum_tolerance(FORWARD_TERMS, scale=float(np.abs(expected).max()))
    assert float(np.abs(actual - expected).max()) > 10 * band


def eager_rows(attentions: Any, layer: int, image_positions: list[int]) -> np.ndarray:
    """Last query row of block ``layer`` per step, image columns renormalised, mean over heads."""
    rows = []
    for step in attentions:
        probabilities = step[layer][0, :, -1, image_positions].double()
        rows.append((probabilities / probabilities.sum(dim=-1, keepdim=True)).mean(dim=0))
    return torch.stack(rows).numpy()


def adapter_generate(
    adapter: Gemma3Family, model: torch.nn.Module, prompt: PreparedPrompt, layer: int
) -> tuple[np.ndarray, torch.Tensor]:
    last = torch.tensor([prompt.length - 1])
    probe = Probe(adapter, prompt.image_positions, last)
    attention = adapter.decoder_layers(model)[layer].self_attn
    with torch.no_grad(), probe.attached(attention):
        sequences = model.generate(
            **prompt.inputs, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )
    return torch.cat(probe.rows).double().numpy(), sequences


# ----------------------------------------------------------------------------------------------
# 1. exactness against eager attention
# ----------------------------------------------------------------------------------------------


def test_adapter_satisfies_the_protocol() -> None:
    assert isinstance(Gemma3Family(), LvlmFamilyAdapter)


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding-local-rope", "global-rope"])
def test_generation_rows_equal_eager_attention(
    tiny: tuple[torch.nn.Module, Any], eager: torch.nn.Module, photo: Image.Image, layer: int
) -> None:
    model, processor = tiny
    adapter = Gemma3Family()
    adapter.check_model(model, processor)
    prompt = adapter.prepare(model, processor, photo, QUESTION)
    adapter.check_sequence_length(model, layer, prompt.length + MAX_NEW_TOKENS)
    rows, sequences = adapter_generate(adapter, model, prompt, layer)

    with torch.no_grad():
        reference = eager.generate(
            **prompt.inputs,
            max_new_tokens=MAX_NEW_TOKENS,
            min_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(reference.sequences, sequences)
    expected = eager_rows(reference.attentions, layer, IMAGE_POSITIONS)
    assert rows.shape == expected.shape == (MAX_NEW_TOKENS, 16)
    assert_sums_close(rows, expected, n_terms=FORWARD_TERMS)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, rtol=0, atol=sum_tolerance(16))
    # The rows are far from uniform (1/16) and differ between steps, so the comparison has teeth.
    for step in expected:
        assert_far(step, np.full(16, 1 / 16))
    assert_far(expected[-1], expected[0])


@pytest.mark.parametrize("layer", [0, 1])
def test_each_block_receives_its_own_rope_and_project_uses_it(
    tiny: tuple[torch.nn.Module, Any], eager: torch.nn.Module, photo: Image.Image, layer: int
) -> None:
    """Block 0 (sliding) receives the local-base RoPE, block 1 (global) the global one (base 1e6, linear
    scaling); ``project`` applied with the other one's (cos, sin) no longer matches the eager attention."""
    model, processor = tiny
    adapter = Gemma3Family()
    prompt = adapter.prepare(model, processor, photo, QUESTION)
    layer_types = model.config.text_config.layer_types
    assert layer_types == ["sliding_attention", "full_attention"]
    own, other = layer_types[layer], layer_types[1 - layer]
    captured: dict[str, Any] = {}

    def capture(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured["hidden"] = kwargs["hidden_states"]
        captured["rotary"] = kwargs["position_embeddings"]

    attention = adapter.decoder_layers(model)[layer].self_attn
    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**prompt.inputs)
        handle.remove()
        reference = eager(**prompt.inputs, output_attentions=True)
    rotary_emb = model.model.language_model.rotary_emb
    hidden = captured["hidden"]
    position_ids = torch.arange(prompt.length)[None]
    own_rotary, other_rotary = (rotary_emb(hidden, position_ids, kind) for kind in (own, other))
    assert all(torch.equal(got, want) for got, want in zip(captured["rotary"], own_rotary))
    assert not torch.allclose(own_rotary[0], other_rotary[0], atol=1e-3)

    images, last = prompt.image_positions, torch.tensor([prompt.length - 1])

    @torch.no_grad()
    def row(rotary: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
        keys = adapter.project(attention, "k", hidden, rotary, images)
        queries = adapter.project(attention, "q", hidden, rotary, last)
        return image_attention(queries, keys, adapter.scaling(attention))[0].double().numpy()

    expected = eager_rows([reference.attentions], layer, IMAGE_POSITIONS)
    assert_sums_close(row(captured["rotary"]), expected, n_terms=FORWARD_TERMS)
    assert_far(row(other_rotary), expected)


def test_q_k_norms_and_query_pre_attn_scalar_are_followed(
    tiny: tuple[torch.nn.Module, Any], eager: torch.nn.Module, photo: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model's q/k norms and score scale matter: skipping the norms, or scaling by head_dim ** -0.5,
    moves the map far outside the rounding band."""
    model, processor = tiny
    adapter = Gemma3Family()
    attention = adapter.decoder_layers(model)[1].self_attn
    assert adapter.scaling(attention) == 24**-0.5 != attention.head_dim**-0.5
    prompt = adapter.prepare(model, processor, photo, QUESTION)
    with torch.no_grad():
        reference = eager(**prompt.inputs, output_attentions=True)
    expected = eager_rows([reference.attentions], 1, IMAGE_POSITIONS)

    def first_row(scale: float | None = None) -> np.ndarray:
        last = torch.tensor([prompt.length - 1])
        probe = Probe(adapter, prompt.image_positions, last)
        if scale is not None:
            probe.adapter = type("Scaled", (Gemma3Family,), {"scaling": staticmethod(lambda module: scale)})()
        with torch.no_grad(), probe.attached(attention):
            model(**prompt.inputs)
        return probe.rows[0].double().numpy()

    assert_sums_close(first_row(), expected, n_terms=FORWARD_TERMS)
    assert_far(first_row(attention.head_dim**-0.5), expected)
    monkeypatch.setattr(gemma3_module, "gemma_rms_norm", lambda states, weight, eps: states)
    assert_far(first_row(), expected)


def test_gemma_rms_norm_is_the_models_norm(tiny: tuple[torch.nn.Module, Any]) -> None:
    norm = Gemma3Family().decoder_layers(tiny[0])[0].self_attn.q_norm
    states = torch.randn(2, 3, 5, norm.weight.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert float(norm.weight.abs().max()) > 0.1  # random, not Gemma's zero init
        expected = norm(states)
        assert_sums_close(gemma3_module.gemma_rms_norm(states, norm.weight, norm.eps), expected, n_terms=64)
        half = states.to(torch.bfloat16)
        assert torch.equal(gemma3_module.gemma_rms_norm(half, norm.weight, norm.eps), norm(half))


def test_teacher_forcing_equals_generation_and_eager(
    tiny: tuple[torch.nn.Module, Any], eager: torch.nn.Module, photo: Image.Image
) -> None:
    """Teacher forcing the greedy answer scores the same rows as generation (block 1, whose input depends on
    the bidirectional image block), and the eager forward pass over prompt + answer agrees; without the
    image block in ``token_type_ids`` the rows differ."""
    model, processor = tiny
    adapter, layer = Gemma3Family(), 1
    prompt = adapter.prepare(model, processor, photo, QUESTION)
    generated, sequences = adapter_generate(adapter, model, prompt, layer)
    answer_ids = sequences[0, prompt.length : prompt.length + MAX_NEW_TOKENS - 1].tolist()
    inputs = adapter.teacher_forcing_inputs(prompt, answer_ids)
    queries = torch.arange(prompt.length - 1, prompt.length - 1 + MAX_NEW_TOKENS)
    attention = adapter.decoder_layers(model)[layer].self_attn

    def forced(batch: dict[str, Any]) -> np.ndarray:
        probe = Probe(adapter, prompt.image_positions, queries)
        with torch.no_grad(), probe.attached(attention):
            model(**batch, use_cache=False)
        return probe.rows[0].double().numpy()

    rows = forced(inputs)
    assert_sums_close(rows, generated, n_terms=FORWARD_TERMS)
    with torch.no_grad():
        reference = eager(**inputs, use_cache=False, output_attentions=True).attentions[layer][0]
    probabilities = reference[:, queries][..., IMAGE_POSITIONS].double()
    expected = (probabilities / probabilities.sum(dim=-1, keepdim=True)).mean(dim=0).numpy()
    assert_sums_close(rows, expected, n_terms=FORWARD_TERMS)

    causal_images = {key: value for key, value in inputs.items() if key != "token_type_ids"}
    assert_far(forced(causal_images), rows)


# ----------------------------------------------------------------------------------------------
# 2. orientation: a planted bright square lands on the right original-image pixels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "square", "cell", "box"),
    [
        # 60x30 -> 32x16 at offset (0, 8): input x = 32/60 * x, y = 8 + 32/60 * y. The 4x4 grid covers the input
        # in 8-px cells = 15 original px; the grid reaches from y = -8 * 60/32 = -15 to 45. The square
        # [30, 45) x [0, 15) is the input cell [16, 24) x [8, 16): row 1, column 2.
        ((60, 30), (30, 0, 45, 15), (1, 2), (0.0, -15.0, 60.0, 45.0)),
        # 30x60 -> 16x32 at offset (8, 0): the grid spans x = -15 .. 45. The square [0, 15) x [45, 60) is the
        # input cell [8, 16) x [24, 32): row 3, column 1.
        ((30, 60), (0, 45, 15, 60), (3, 1), (-15.0, 0.0, 45.0, 60.0)),
    ],
    ids=["wide", "tall"],
)
def test_planted_square_lands_on_its_pixels(
    size: tuple[int, int], square: tuple[int, int, int, int], cell: tuple[int, int], box: tuple[float, ...]
) -> None:
    model, processor = build_tiny_gemma3(seed=1)
    attend_to_bright_tokens(model, layer=0)
    adapter = Gemma3Family()
    adapter.check_model(model, processor)
    prompt = adapter.prepare(model, processor, bright_square_image(size, square), QUESTION)
    (tile,) = prompt.tiles
    assert tile.grid == (4, 4)
    assert tile.box == pytest.approx(box)
    probe = Probe(adapter, prompt.image_positions, torch.tensor([prompt.length - 1]))
    with torch.no_grad(), probe.attached(adapter.decoder_layers(model)[0].self_attn):
        model(**prompt.inputs)
    grid_map = probe.rows[0].reshape(4, 4).double().numpy()
    assert np.unravel_index(grid_map.argmax(), grid_map.shape) == cell
    assert grid_map[cell] > 0.9
    row, col = cell
    x0, y0, x1, y1 = tile.box
    cell_box = (
        x0 + col * (x1 - x0) / 4,
        y0 + row * (y1 - y0) / 4,
        x0 + (col + 1) * (x1 - x0) / 4,
        y0 + (row + 1) * (y1 - y0) / 4,
    )
    assert cell_box == pytest.approx(square)


def test_tile_box_of_a_letterbox_with_rounding(tiny: tuple[torch.nn.Module, Any]) -> None:
    """When the scaled size is rounded, x and y scales differ; each axis uses its own. 100x33 onto 32 px: scaled
    to (32, 11) (10.56 rounded), pasted at (0, 10); the input's y = 0 .. 32 is original y = (0 - 10) * 33 / 11 =
    -30 .. (32 - 10) * 33 / 11 = 66, x = 0 .. 100."""
    model, processor = tiny
    (tile,) = Gemma3Family().prepare(model, processor, Image.new("RGB", (100, 33)), QUESTION).tiles
    assert tile.box == pytest.approx((0.0, -30.0, 100.0, 66.0))


# ----------------------------------------------------------------------------------------------
# 3. prepare and teacher forcing inputs
# ----------------------------------------------------------------------------------------------


def test_prepare_layout_and_teacher_forcing_inputs(tiny: tuple[torch.nn.Module, Any]) -> None:
    model, processor = tiny
    adapter = Gemma3Family()
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    prompt = adapter.prepare(model, processor, image, QUESTION)
    tokenizer = processor.tokenizer

    assert prompt.text == (f"<bos><start_of_turn>user\n{BOI}{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
    ids = prompt.inputs["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0].tolist()) == PROMPT_TOKENS  # one <bos>, 16 soft tokens
    (tile,) = prompt.tiles
    assert tile.positions.tolist() == IMAGE_POSITIONS
    assert prompt.image_positions.tolist() == IMAGE_POSITIONS
    assert (ids[0, tile.positions] == model.config.image_token_id).all()
    assert prompt.inputs["token_type_ids"][0].tolist() == [int(i in IMAGE_POSITIONS) for i in range(prompt.length)]
    assert prompt.inputs["attention_mask"].tolist() == [[1] * prompt.length]
    pixels = prompt.inputs["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    pad = (128 / 255 - 0.5) / 0.5  # letterbox rows 0..7 and 24..31 hold the mean colour
    assert torch.allclose(pixels[0, :, :8], torch.full_like(pixels[0, :, :8], pad), atol=1e-6)
    assert torch.allclose(pixels[0, :, 24:], torch.full_like(pixels[0, :, 24:], pad), atol=1e-6)
    assert torch.allclose(pixels[0, :, 8:24], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 32))

    answer_ids = tokenizer("red circle .", add_special_tokens=False).input_ids
    forced = adapter.teacher_forcing_inputs(prompt, answer_ids)
    assert forced["input_ids"][0].tolist() == ids[0].tolist() + answer_ids
    assert forced["token_type_ids"][0].tolist() == [*prompt.inputs["token_type_ids"][0].tolist(), 0, 0, 0]
    assert forced["attention_mask"].tolist() == [[1] * (prompt.length + 3)]
    assert forced["pixel_values"] is pixels
    assert adapter.teacher_forcing_inputs(prompt, [])["input_ids"].tolist() == ids.tolist()


def test_round_trip_through_auto_classes(saved: Path, tiny: tuple[torch.nn.Module, Any]) -> None:
    from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

    model, processor = tiny
    assert isinstance(model, Gemma3ForConditionalGeneration)
    assert isinstance(processor, Gemma3Processor)
    original, _ = build_tiny_gemma3(seed=0)
    loaded_state = model.state_dict()
    assert all(torch.equal(value, loaded_state[key]) for key, value in original.state_dict().items())
    assert model.generation_config.eos_token_id == [1, processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")]


# ----------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------


def test_sliding_window_limit_matches_the_mask(photo: Image.Image) -> None:
    """With a 20-token window, the last prompt position (31) of the sliding block does not see image keys 4..11
    (31 - kv >= 20): eager gives them zero probability, so the scores over every image key would be wrong and
    the adapter refuses; the global block, or a sequence within the window, is accepted."""
    model, processor = build_tiny_gemma3(seed=0, sliding_window=20, attn_implementation="eager")
    adapter = Gemma3Family()
    prompt = adapter.prepare(model, processor, photo, QUESTION)
    assert prompt.length == 32
    with torch.no_grad():
        row = model(**prompt.inputs, output_attentions=True).attentions[0][0, :, -1, IMAGE_POSITIONS]
    assert (row[:, :8] == 0).all() and (row[:, 8:] > 0).all()
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        adapter.check_sequence_length(model, 0, prompt.length)
    adapter.check_sequence_length(model, 0, 20)
    adapter.check_sequence_length(model, 1, 10_000)
    adapter.check_sequence_length(model, -1, 10_000)


def test_check_model_refuses_what_it_cannot_attribute(tiny: tuple[torch.nn.Module, Any]) -> None:
    model, processor = tiny
    adapter = Gemma3Family()
    with pytest.raises(UnsupportedModelError, match="Gemma3ForConditionalGeneration"):
        adapter.check_model(torch.nn.Linear(2, 2), processor)
    capped, capped_processor = build_tiny_gemma3(seed=0, attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        adapter.check_model(capped, capped_processor)
    pooled, pooled_processor = build_tiny_gemma3(seed=0)
    pooled.config.mm_tokens_per_image = 8
    with pytest.raises(UnsupportedModelError, match="square token grid"):
        adapter.check_model(pooled, pooled_processor)
    processor.image_seq_length, saved_length = 9, processor.image_seq_length
    try:
        with pytest.raises(UnsupportedModelError, match="9 tokens"):
            adapter.check_model(model, processor)
    finally:
        processor.image_seq_length = saved_length
    adapter.check_model(model, processor)


def test_prepare_refuses_a_template_without_one_image(tiny: tuple[torch.nn.Module, Any], photo: Image.Image) -> None:
    model, processor = tiny
    adapter = Gemma3Family()
    with pytest.raises(ImageTokenError, match="placeholders"):
        adapter.prepare(model, processor, photo, f"{BOI} {QUESTION}")


def test_default_layer_is_a_global_block_near_the_papers_depth(tiny: tuple[torch.nn.Module, Any]) -> None:
    assert default_layer(tiny[0].config) == 1
    from types import SimpleNamespace

    for blocks, expected in ((34, 23), (48, 29), (62, 41)):
        kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(blocks)]
        config = SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=blocks, layer_types=kinds))
        assert default_layer(config) == expected


# ----------------------------------------------------------------------------------------------
# through the shared mechanism
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def gemma3_in_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The family table's gemma3 row, added for the test until the table has one."""
    from api_tool import families

    if not any("gemma3" in entry.model_types for entry in families.FAMILIES):
        entry = families.Family(
            name="gemma3",
            backend="lvlm",
            classes="Gemma3ForConditionalGeneration",
            geometry="letterbox onto the square input; one pooled token grid",
            verified="test_family_gemma3",
            defaults=families.AttributionDefaults(layer=None, combine="cls"),
            model_types=("gemma3",),
            adapter_path="api_tool.backends.lvlm_families.gemma3:Gemma3Family",
            scores_answer=True,
        )
        monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, entry))


@pytest.mark.usefixtures("gemma3_in_table")
def test_lvlm_attributor_map_equals_eager_and_teacher_forcing(
    tiny: tuple[torch.nn.Module, Any], eager: torch.nn.Module, photo: Image.Image
) -> None:
    """``LvlmAttributor`` with this adapter: the raw map is the mean of eager attention over the answer steps,
    it lies on the letterboxed part of the grid, and teacher forcing the answer gives the same map."""
    model, processor = tiny
    attributor = LvlmAttributor.from_model(model, processor, family=Gemma3Family(), layer=1, max_new_tokens=5)
    amap = attributor.attribute(photo, QUESTION)
    prompt = Gemma3Family().prepare(model, processor, photo, QUESTION)
    with torch.no_grad():
        reference = eager.generate(
            **prompt.inputs,
            max_new_tokens=5,
            do_sample=False,
            eos_token_id=model.generation_config.eos_token_id,
            output_attentions=True,
            return_dict_in_generate=True,
        )
    generated = reference.sequences[0, prompt.length :].tolist()
    ends = set(model.generation_config.eos_token_id)
    answer_ids = generated[: next((i for i, t in enumerate(generated) if t in ends), len(generated))]
    assert amap.metadata["steps"] == max(1, len(answer_ids)) > 1
    expected = eager_rows(reference.attentions, 1, IMAGE_POSITIONS)[: amap.metadata["steps"]].mean(axis=0)
    assert_sums_close(amap.raw, expected.reshape(4, 4), n_terms=FORWARD_TERMS)
    # 72x40 onto 32 px: scaled to 32x18, pasted 7 px down; on the 4x4 grid (8 px cells) rows 7/8 .. 25/8.
    assert amap.grid_box == pytest.approx((0.0, 0.875, 4.0, 3.125))
    assert amap.metadata["tiles"][0]["grid"] == [4, 4]

    forced = attributor.attribute(photo, QUESTION, answer=amap.metadata["answer"])
    assert forced.metadata["step_tokens"] == amap.metadata["step_tokens"]
    assert_sums_close(forced.raw, amap.raw, n_terms=FORWARD_TERMS)


@pytest.mark.usefixtures("gemma3_in_table")
def test_lvlm_attributor_loads_the_saved_directory(saved: Path, tiny: tuple[torch.nn.Module, Any]) -> None:
    """``LvlmAttributor(DIR)`` (what ``api-prompt --backend lvlm --model DIR`` runs) finds the family by model_type,
    loads model and processor through the Auto classes and gives the same map as the in-memory model."""
    image = Image.new("RGB", (48, 64), (40, 90, 200))
    from_directory = LvlmAttributor(str(saved), layer=0, device="cpu", max_new_tokens=3)
    assert from_directory.family_name == "gemma3"
    assert isinstance(from_directory.family, Gemma3Family)
    in_memory = LvlmAttributor.from_model(*tiny, family=Gemma3Family(), layer=0, max_new_tokens=3)
    loaded, expected = from_directory.attribute(image, QUESTION), in_memory.attribute(image, QUESTION)
    assert loaded.metadata["answer"] == expected.metadata["answer"]
    assert_sums_close(loaded.raw, expected.raw, n_terms=FORWARD_TERMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_project_is_the_blocks_own_computation(
    tiny: tuple[torch.nn.Module, Any], photo: Image.Image, dtype: torch.dtype
) -> None:
    """Over the whole sequence, ``project`` equals, bit for bit, the block's own q_proj -> view -> q_norm -> RoPE
    (transformers' ``apply_rotary_pos_emb``) in the model's dtype (bf16 too: norm scaled in fp32 then cast, RoPE in
    bf16), for both layer types."""
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    model, processor = tiny
    adapter = Gemma3Family()
    prompt = adapter.prepare(model, processor, photo, QUESTION)
    layer_types = model.config.text_config.layer_types
    hidden = torch.randn(1, prompt.length, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    positions = torch.arange(prompt.length)[None]
    with torch.no_grad():
        for layer, block in enumerate(adapter.decoder_layers(model)):
            attention = copy.deepcopy(block.self_attn).to(dtype)
            rotary = model.model.language_model.rotary_emb(hidden, positions, layer_types[layer])
            shape = (1, prompt.length, -1, attention.head_dim)
            queries = attention.q_norm(attention.q_proj(hidden).view(shape).transpose(1, 2))
            keys = attention.k_norm(attention.k_proj(hidden).view(shape).transpose(1, 2))
            queries, keys = apply_rotary_pos_emb(queries, keys, *rotary)
            assert rotary[0].dtype == dtype
            assert torch.equal(adapter.project(attention, "q", hidden, rotary, None), queries.float())
            assert torch.equal(adapter.project(attention, "k", hidden, rotary, None), keys.float())
