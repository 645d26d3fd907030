"""The demo CLIP's training script: the second stage starts exactly from the first stage's weights; the
SigLIP-style variant's loss is SigLIP's formula and its model has an attention pool API decomposes exactly.

Random-weight demo CLIPs; no shipped weights, no network.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from api_tool.backends.towers import tower_for
from api_tool.backends.towers.base import ClsPooling, ProbePooling
from api_tool.demo.clip_model import CompactTokenizer, build_demo_clip, load_demo_clip, save_demo_clip
from api_tool.demo.scenes import COLOUR_NAMES, REGION_NAMES, SHAPES, region_of, sample_layouts
from api_tool.errors import InvalidParameterError
from tests.tolerances import assert_sums_close
from training.flags import parse_config
from training.train_clip import (
    ATTENTION_POOL_CFG,
    TrainConfig,
    architecture_for,
    cosine_lr,
    load_initial_weights,
    make_texts,
    parse_args,
    positives,
    presence,
    sigmoid_loss,
    train,
)


@pytest.fixture(scope="module")
def tokenize() -> CompactTokenizer:
    return CompactTokenizer.for_scene_language(32)


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory: pytest.TempPathFactory, tokenize: CompactTokenizer) -> Path:
    torch.manual_seed(0)
    model = build_demo_clip(tokenize.vocab_size, architecture_for(224))
    return save_demo_clip(
        model, tokenize, tmp_path_factory.mktemp("stage1"), architecture=architecture_for(224), metadata={"stage": 1}
    )


def test_architecture_for_sets_the_input_side_and_checks_the_patch_grid() -> None:
    assert architecture_for(288)["vision_cfg"]["image_size"] == 288
    assert architecture_for(224)["vision_cfg"]["patch_size"] == 16
    with pytest.raises(InvalidParameterError, match="multiple of the patch size 16"):
        architecture_for(250)


def test_cosine_follows_whichever_of_steps_and_time_runs_out_first() -> None:
    by_steps = TrainConfig(steps=1100, warmup=100, lr=1.0, max_seconds=0.0)
    assert cosine_lr(1.0, 100, 999.0, by_steps) == pytest.approx(1.0)
    assert cosine_lr(1.0, 600, 999.0, by_steps) == pytest.approx(0.5)
    assert cosine_lr(1.0, 1100, 0.0, by_steps) == pytest.approx(0.0)
    by_time = replace(by_steps, max_seconds=100.0)
    assert cosine_lr(1.0, 200, 50.0, by_time) == pytest.approx(0.5)
    assert cosine_lr(1.0, 200, 100.0, by_time) == pytest.approx(0.0)
    assert cosine_lr(1.0, 200, 500.0, by_time) == pytest.approx(0.0)
    assert cosine_lr(1.0, 600, 1.0, by_time) == pytest.approx(0.5)


def test_same_size_init_copies_every_weight(stage_one: Path, tokenize: CompactTokenizer) -> None:
    original, _ = load_demo_clip("cpu", stage_one)
    model = build_demo_clip(tokenize.vocab_size, architecture_for(224))
    metadata = load_initial_weights(model, str(stage_one), tokenize)
    assert metadata == {"stage": 1}
    for (name, value), (_, expected) in zip(model.state_dict().items(), original.state_dict().items()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)


def test_larger_input_resizes_only_the_patch_positions(stage_one: Path, tokenize: CompactTokenizer) -> None:
    original, _ = load_demo_clip("cpu", stage_one)
    model = build_demo_clip(tokenize.vocab_size, architecture_for(288))
    load_initial_weights(model, str(stage_one), tokenize)
    before, after = original.state_dict(), model.state_dict()
    for name, value in after.items():
        if name != "visual.positional_embedding":
            torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    positions, old_positions = after["visual.positional_embedding"], before["visual.positional_embedding"]
    assert positions.shape == (1 + 18 * 18, old_positions.shape[1])
    torch.testing.assert_close(positions[0], old_positions[0], rtol=0, atol=0)
    grid_mean = positions[1:].mean(dim=0)
    torch.testing.assert_close(grid_mean, old_positions[1:].mean(dim=0), rtol=0, atol=0.05)


def test_init_refuses_a_model_with_another_vocabulary(stage_one: Path) -> None:
    other = CompactTokenizer(CompactTokenizer.for_scene_language(32).kept_ids[:-1], 32)
    model = build_demo_clip(other.vocab_size, architecture_for(224))
    with pytest.raises(InvalidParameterError, match="another vocabulary"):
        load_initial_weights(model, str(stage_one), other)


def test_second_stage_trains_and_records_its_provenance(stage_one: Path, tmp_path: Path) -> None:
    config = TrainConfig(
        steps=2, batch=8, warmup=1, workers=0, eval_scenes=100, device="cpu", image_size=288,
        init=str(stage_one), out=str(tmp_path / "stage2"),
    )  # fmt: skip
    metrics = train(config)
    assert 0.0 <= metrics["t2i_top1"] <= 1.0
    saved = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert saved["architecture"]["vision_cfg"]["image_size"] == 288
    assert saved["metadata"]["init"] == {"stage": 1}
    model, _ = load_demo_clip("cpu", tmp_path / "stage2")
    assert model.visual.positional_embedding.shape[0] == 1 + 18 * 18


def test_flags_cover_every_config_field() -> None:
    config = parse_args(["--image-size", "288", "--init", "stage1", "--lr", "5e-4", "--max-seconds", "440"])
    assert config == TrainConfig(image_size=288, init="stage1", lr=5e-4, max_seconds=440.0)
    assert parse_args([]) == TrainConfig()


def test_flags_need_a_plain_default_for_each_field() -> None:
    @dataclass(frozen=True)
    class Flagged:
        ids: tuple[int, ...] = ()

    with pytest.raises(TypeError, match=r"Flagged\.ids needs an int, float or str default"):
        parse_config(Flagged, [], None)


def test_sigmoid_loss_is_siglips_formula_over_every_pair() -> None:
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    positive = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=torch.bool)
    scale, bias = 7.0, -2.5
    expected = 0.0
    for t in range(5):
        for i in range(3):
            z = 1.0 if positive[t, i] else -1.0
            logit = scale * sum(float(text[t, e]) * float(image[i, e]) for e in range(8)) + bias
            expected -= math.log(1.0 / (1.0 + math.exp(-z * logit)))
    loss = sigmoid_loss(image, text, torch.tensor(scale), torch.tensor(bias), positive)
    assert_sums_close(float(loss), expected / 3, n_terms=5 * 3 * 8)


def test_attention_pool_model_has_one_probe_that_api_decomposes_exactly(tokenize: CompactTokenizer) -> None:
    assert "attentional_pool" not in architecture_for(288)["vision_cfg"]
    torch.manual_seed(0)
    model = build_demo_clip(tokenize.vocab_size, architecture_for(64, "attention")).double().eval()
    pool = model.visual.attn_pool
    assert pool is not None and model.visual.attn_pool_contrastive is None
    assert pool.query.shape == (1, 128) and pool.attn.num_heads == ATTENTION_POOL_CFG["attn_pooler_heads"]
    tower = tower_for(model)
    assert isinstance(tower.pooling, ProbePooling) and tower.pooling.branch is None
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8))
    with torch.no_grad():
        parts = tower.decompose(tower.batch([tower.prepare(image)]), len(tower.blocks) - 1, "first_order")
    assert parts.terms.shape[1] == 1 + 4 * 4
    assert_sums_close(parts.terms.sum(dim=1) + parts.bias, parts.embedding, n_terms=17 * 192 * 6, dtype=np.float64)
    assert isinstance(tower_for(build_demo_clip(tokenize.vocab_size, architecture_for(64))).pooling, ClsPooling)


def test_attention_pool_refuses_deep_supervision_and_unknown_names_are_refused() -> None:
    with pytest.raises(InvalidParameterError, match="--aux-weight 0"):
        TrainConfig(pool="attention")
    with pytest.raises(InvalidParameterError, match="loss must be one of contrastive, sigmoid"):
        TrainConfig(loss="softmax")
    with pytest.raises(InvalidParameterError, match="pool must be one of token, attention"):
        TrainConfig(pool="mean", aux_weight=0.0)
    flags = ["--loss", "sigmoid", "--pool", "attention", "--aux-weight", "0"]
    assert parse_args(flags) == TrainConfig(loss="sigmoid", pool="attention", aux_weight=0.0)


def test_siglip_variant_trains_and_saves_a_loadable_model_with_its_bias(tmp_path: Path) -> None:
    config = TrainConfig(
        steps=2, batch=8, warmup=1, workers=0, eval_scenes=100, device="cpu", image_size=64,
        loss="sigmoid", pool="attention", aux_weight=0.0, out=str(tmp_path / "siglip"),
    )  # fmt: skip
    metrics = train(config)
    assert 0.0 <= metrics["t2i_top1"] <= 1.0
    saved = json.loads((tmp_path / "siglip" / "config.json").read_text())
    assert saved["architecture"]["vision_cfg"]["attentional_pool"] is True
    assert saved["metadata"]["train_config"]["loss"] == "sigmoid"
    assert saved["metadata"]["logit_bias"] == pytest.approx(-10.0, abs=0.01)
    model, _ = load_demo_clip("cpu", tmp_path / "siglip")
    assert float(model.logit_scale.detach().exp()) == pytest.approx(10.0, rel=0.01)
    assert isinstance(tower_for(model).pooling, ProbePooling)


def test_presence_with_regions_equals_the_literal_table() -> None:
    layouts = sample_layouts(24, torch.Generator().manual_seed(5))
    table = presence(layouts)
    assert table.shape == (24, len(COLOUR_NAMES) + 1, len(SHAPES) + 1, len(REGION_NAMES) + 1)
    for scene, (objects, aspect) in enumerate(zip(layouts.facts(), layouts.aspect.tolist())):
        canvas = (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect)
        held = {(o.colour, o.shape, region_of(o, canvas)) for o in objects}
        for c, colour in enumerate((*COLOUR_NAMES, None)):
            for s, shape in enumerate((*SHAPES, None)):
                for r, region in enumerate((*REGION_NAMES, None)):
                    expected = any(
                        colour in (None, h[0]) and shape in (None, h[1]) and region in (None, h[2]) for h in held
                    ) or (colour is None and shape is None and region is None)
                    assert bool(table[scene, c, s, r]) == expected, (scene, colour, shape, region)


def test_query_positives_are_the_images_holding_the_pattern(tokenize: CompactTokenizer) -> None:
    layouts = sample_layouts(16, torch.Generator().manual_seed(6))
    texts = make_texts(layouts, random.Random(6), tokenize, {})
    positive = positives(layouts, texts)
    table = presence(layouts)
    n = layouts.size
    for t in range(2 * n, 4 * n):
        (c0, s0, r0), (c1, s1, r1) = texts.atoms[t].tolist()
        expected = table[:, c0, s0, r0] & table[:, c1, s1, r1]
        assert torch.equal(positive[t], expected)
    assert torch.equal(positive[:n], torch.eye(n, dtype=torch.bool)) and not positive[n : 2 * n].any()


def test_token_embeddings_map_by_bpe_id_across_vocabularies(stage_one: Path, tokenize: CompactTokenizer) -> None:
    smaller = CompactTokenizer(tokenize.kept_ids[::2], 32)
    torch.manual_seed(1)
    old = build_demo_clip(smaller.vocab_size, architecture_for(224)).eval()
    directory = save_demo_clip(old, smaller, stage_one.parent / "smaller", architecture=architecture_for(224))
    old, _ = load_demo_clip("cpu", directory)
    model = build_demo_clip(tokenize.vocab_size, architecture_for(224))
    before = model.token_embedding.weight.detach().clone()
    load_initial_weights(model, str(directory), tokenize)
    model.eval()
    texts = ["where is the red circle?", "a blue square left of a red star"]
    known = [text for text in texts if not bool((smaller(text) == 1).any())]
    for text in known:
        torch.testing.assert_close(model.encode_text(tokenize(text)), old.encode_text(smaller(text)), rtol=0, atol=0)
    new_rows = [3 + i for i, bpe in enumerate(tokenize.kept_ids) if bpe not in set(smaller.kept_ids)]
    torch.testing.assert_close(model.token_embedding.weight[new_rows], before[new_rows], rtol=0, atol=0)
    old_rows = [3 + tokenize.kept_ids.index(bpe) for bpe in smaller.kept_ids]
    torch.testing.assert_close(model.token_embedding.weight[old_rows], old.token_embedding.weight[3:-1], rtol=0, atol=0)
    torch.testing.assert_close(model.token_embedding.weight[-1], old.token_embedding.weight[-1], rtol=0, atol=0)
