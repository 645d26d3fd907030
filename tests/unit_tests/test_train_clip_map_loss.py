"""The demo CLIP's map loss (``training.train_clip --map-weight``): the queried objects' patch coverage on a
hand-made layout, the differentiable map against ``ClipAttributor``'s raw map, the loss and the held-out
pointing against literal loops.

Random-weight demo CLIPs; no shipped weights, no network.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from api_tool.backends.clip import ClipAttributor
from api_tool.demo.clip_model import (
    DEMO_CLIP_RECOMMENDED,
    OPENAI_MEAN,
    OPENAI_STD,
    CompactTokenizer,
    build_demo_clip,
    load_demo_clip,
    save_demo_clip,
)
from api_tool.demo.scenes import COLOUR_NAMES, SHAPES, sample_layouts
from api_tool.errors import InvalidParameterError
from api_tool.maps import combine_maps
from tests.tolerances import assert_sums_close
from training.train_clip import (
    ANY_OBJECT,
    MAP_LAYER,
    PatchMaps,
    TrainConfig,
    _atom,
    architecture_for,
    map_loss,
    matching_slots,
    parse_args,
    patch_coverage,
    pointing_hits,
    render_inputs,
    train,
)

SIDE, PATCH = 64, 16


def hand_made_layouts(copies: int):
    """``copies`` identical square 64 px scenes (4 x 4 patches of 16 px), axis-aligned objects placed so their
    pixels are known: slot 0 a red square filling patch (1, 1) exactly (half side 8.2 px around (24, 24):
    pixels 16..31); slot 1 a blue square of 8 x 8 pixels (52..59, 4..11) in patch (0, 3); slot 2 a red square
    of 8 x 8 pixels (4..11, 52..59) in patch (3, 0); slot 3 a green circle of radius 4.2 px around (40, 40),
    inside patch (2, 2); slot 4 an empty (invalid) red square on patch (0, 0)."""
    base = sample_layouts(copies, torch.Generator().manual_seed(0), aspect=1.0)
    short = float(SIDE)
    half_big, half_small, circle = 8.2, 4.2, 4.2
    square_radius = 0.8 * short  # a square's half side is 0.8 radii

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor([values] * copies)

    return replace(
        base,
        valid=torch.tensor([[True, True, True, True, False]] * copies),
        shape=torch.tensor([[SHAPES.index(s) for s in ("square", "square", "square", "circle", "square")]] * copies),
        colour=torch.tensor([[COLOUR_NAMES.index(c) for c in ("red", "blue", "red", "green", "red")]] * copies),
        rgb=torch.tensor([[(220.0, 30.0, 35.0), (35.0, 80.0, 225.0), (220.0, 30.0, 35.0), (35.0, 165.0, 60.0),
                           (220.0, 30.0, 35.0)]] * copies),
        cx=column([24 / 64, 56 / 64, 8 / 64, 40 / 64, 8 / 64]),
        cy=column([24 / 64, 8 / 64, 56 / 64, 40 / 64, 8 / 64]),
        radius=column([half_big / square_radius, half_small / square_radius, half_small / square_radius,
                       circle / short, half_small / square_radius]),
        angle=torch.zeros(copies, 5),
    )  # fmt: skip


def circle_pixels() -> int:
    """Pixels whose centres lie within 4.2 px of (40, 40): slot 3's area, counted one by one."""
    return sum(1 for y in range(64) for x in range(64) if math.hypot(x + 0.5 - 40, y + 0.5 - 40) <= 4.2)


def test_coverage_of_a_hand_made_layout_is_the_named_objects_visible_share_of_each_patch() -> None:
    queries = [
        (_atom("red"), ANY_OBJECT),  # colour only: both red squares, not the invalid slot
        (_atom("blue", "square"), ANY_OBJECT),
        (_atom(region="in the top right corner"), ANY_OBJECT),  # the blue square's canvas cell
        (_atom("red", "square"), _atom("green", "circle")),  # a pair: the union
        (_atom(shape="circle"), ANY_OBJECT),
        (_atom(region="in the middle"), ANY_OBJECT),  # centres (24, 24) and (40, 40) are both in the middle cell
        (_atom("green", "square"), ANY_OBJECT),  # absent
    ]
    layouts = hand_made_layouts(len(queries))
    atoms = torch.tensor(queries)
    slots = matching_slots(layouts, atoms)
    assert slots.tolist() == [
        [True, False, True, False, False],
        [False, True, False, False, False],
        [False, True, False, False, False],
        [True, False, True, True, False],
        [False, False, False, True, False],
        [True, False, False, True, False],
        [False, False, False, False, False],
    ]
    _, labels = render_inputs(layouts, SIDE, None, torch.device("cpu"))
    coverage = patch_coverage(labels, slots, PATCH)
    big, small, circle = 1.0, 64 / 256, circle_pixels() / 256
    expected = torch.zeros(len(queries), 16)
    cells_per_query = [
        {5: big, 12: small},
        {3: small},
        {3: small},
        {5: big, 12: small, 10: circle},
        {10: circle},
        {5: big, 10: circle},
        {},
    ]
    for row, cells in enumerate(cells_per_query):
        for cell, share in cells.items():
            expected[row, cell] = share
    assert 0 < circle_pixels() < 81
    assert torch.equal(coverage, expected)


def test_coverage_counts_visible_pixels_only() -> None:
    layouts = hand_made_layouts(1)
    on_top = replace(layouts, cx=layouts.cx.clone(), cy=layouts.cy.clone())
    on_top.cx[0, 3], on_top.cy[0, 3] = 24 / 64, 24 / 64  # the circle (drawn later) now covers part of slot 0
    _, labels = render_inputs(on_top, SIDE, None, torch.device("cpu"))
    red_square = patch_coverage(labels, torch.tensor([[True, False, False, False, False]]), PATCH)
    assert float(red_square[0, 5]) == (256 - circle_pixels()) / 256


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, CompactTokenizer]:
    """A random-weight demo CLIP at 64 px, saved and loaded as the demo is (so the attributor reads it with
    ``DEMO_CLIP_RECOMMENDED``)."""
    tokenize = CompactTokenizer.for_scene_language(32)
    torch.manual_seed(3)
    model = build_demo_clip(tokenize.vocab_size, architecture_for(SIDE))
    directory = save_demo_clip(model, tokenize, tmp_path_factory.mktemp("clip"), architecture=architecture_for(SIDE))
    loaded, loaded_tokenize = load_demo_clip("cpu", directory)
    assert isinstance(loaded_tokenize, CompactTokenizer)
    return loaded, loaded_tokenize


def test_patch_maps_equal_the_attributors_raw_map(demo_like: tuple[torch.nn.Module, CompactTokenizer]) -> None:
    model, tokenize = demo_like
    attributor = ClipAttributor.from_model(model, tokenize, device="cpu", model_name="demo")
    assert attributor.layer == len(attributor.blocks) + MAP_LAYER and attributor.combine == "cls"
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, SIDE, SIDE), dtype=np.uint8))
    queries = ["the red one", "where is the blue square?", "the thing in the top left corner"]
    expected = np.stack([amap.raw for amap in attributor.attribute_tensors(pixels, queries)])
    mean = torch.tensor(OPENAI_MEAN)[None, :, None, None]
    std = torch.tensor(OPENAI_STD)[None, :, None, None]
    inputs = (pixels.float() / 255.0 - mean) / std
    patch_maps = PatchMaps(model)
    try:
        embedding = model.encode_image(inputs)
        text = model.encode_text(tokenize(queries), normalize=True)
        maps = patch_maps(embedding, text)
    finally:
        patch_maps.remove()
    assert maps.requires_grad and maps.shape == (3, 16)
    width, tokens = 192, 1 + 16
    assert_sums_close(maps.detach().view(3, 4, 4).numpy(), expected, n_terms=tokens * width)
    assert np.abs(expected).max() > 0


def literal_map_loss(maps: list[list[float]], coverage: list[list[float]], temperature: float) -> float:
    losses = []
    for row, weights in zip(maps, coverage):
        if sum(weights) == 0:
            continue
        mean = sum(row) / len(row)
        std = math.sqrt(sum((value - mean) ** 2 for value in row) / len(row))
        exps = [math.exp((value - mean) / std / temperature) for value in row]
        losses.append(-math.log(sum(w * e for w, e in zip(weights, exps)) / sum(exps)))
    return sum(losses) / len(losses)


def test_map_loss_equals_the_literal_multi_positive_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(1)
    maps = torch.randn(4, 9, generator=generator) * 0.01 + 0.003
    coverage = torch.zeros(4, 9)
    coverage[0, 2] = 1.0
    coverage[1, [0, 1, 5]] = torch.tensor([0.25, 1.0, 0.5])
    coverage[3, [7, 8]] = torch.tensor([0.125, 0.75])  # row 2 covers nothing and is left out
    for temperature in (0.5, 1.0):
        expected = literal_map_loss(maps.tolist(), coverage.tolist(), temperature)
        assert_sums_close(float(map_loss(maps, coverage, temperature)), expected, n_terms=9 * 9)
    loss = map_loss(maps * 7.0 - 2.0, coverage, 0.5)  # blind to a map's positive scale and offset
    assert_sums_close(float(loss), literal_map_loss(maps.tolist(), coverage.tolist(), 0.5), n_terms=9 * 9 * 8)
    assert float(map_loss(maps, torch.zeros(4, 9), 0.5)) == 0.0


def test_pointing_is_the_argmax_of_the_attributors_grid_mask_on_a_covered_patch() -> None:
    generator = torch.Generator().manual_seed(2)
    maps = torch.randn(6, 25, generator=generator, dtype=torch.float64)
    coverage = (torch.rand(6, 25, generator=generator, dtype=torch.float64) < 0.3).double()
    hits = pointing_hits(maps, coverage, 5)
    for q in range(6):
        mask = combine_maps(
            maps[q].view(5, 5).numpy(),
            None,
            combine=DEMO_CLIP_RECOMMENDED["combine"],
            enhance_coe=DEMO_CLIP_RECOMMENDED["enhance_coe"],
        )
        assert bool(hits[q]) == bool(coverage[q, int(np.argmax(mask))] > 0)


def test_flags_and_refusals() -> None:
    assert parse_args(["--map-weight", "0.5", "--map-temperature", "1"]) == TrainConfig(
        map_weight=0.5, map_temperature=1.0
    )
    with pytest.raises(InvalidParameterError, match="--map-weight 0"):
        TrainConfig(pool="attention", aux_weight=0.0, map_weight=1.0)
    with pytest.raises(InvalidParameterError, match="map_temperature must be positive"):
        TrainConfig(map_temperature=0.0)


def test_training_with_the_map_loss_reports_held_out_pointing(tmp_path: Path) -> None:
    config = TrainConfig(
        steps=2, batch=8, warmup=1, workers=0, eval_scenes=100, device="cpu", image_size=SIDE,
        map_weight=1.0, out=str(tmp_path / "clip"),
    )  # fmt: skip
    metrics = train(config)
    assert 0.0 <= metrics["pointing"] <= 1.0
    assert {f"point_{kind}" for kind in ("full", "colour", "shape", "relation", "position", "free")} <= set(metrics)
