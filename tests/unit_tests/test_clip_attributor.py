"""API-CLIP maths checked exactly against slow, literal implementations of the paper's formulas."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from api_tool.backends.clip import (
    ClipAttributor,
    cls_contributions,
    encode_text_trimmed,
    linearized_layer_norm,
    resolve_layer,
)
from api_tool.backends.registry import AttributorSpec, get_attributor
from api_tool.demo.clip_model import load_demo_clip
from api_tool.demo.scenes import generate_scene
from api_tool.errors import (
    InvalidParameterError,
    InvalidQueryError,
    LayerOutOfRangeError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from api_tool.maps import combine_maps
from tests.conftest import TINY_CLIP_MAP_TERMS as MAP_TERMS
from tests.conftest import build_tiny_clip
from tests.tolerances import assert_sums_close


@torch.no_grad()
def literal_psi(attributor: ClipAttributor, image: Image.Image, query: str) -> tuple[np.ndarray, np.ndarray]:
    """Psi_cls and Psi_comp written out token by token and head by head, in float64."""
    model = copy.deepcopy(attributor.model).double()
    visual = model.visual
    pixels, _ = attributor.preprocess(image)
    with torch.no_grad():
        x = visual._embeds(pixels[None].double())
        block_input = block_output = None
        for index, block in enumerate(visual.transformer.resblocks):
            if index == attributor.layer:
                block_input = x.clone()
            x = block(x)
            if index == attributor.layer:
                block_output = x.clone()
        final_cls = x[0, 0]
        ln_post = visual.ln_post
        embedding = ln_post(final_cls) @ visual.proj
        text = model.encode_text(attributor.tokenizer([query]))[0]
    text = text / text.norm()
    mu = final_cls.mean()
    sigma = torch.sqrt(((final_cls - mu) ** 2).mean() + ln_post.eps)
    num_blocks = len(visual.transformer.resblocks)
    tokens = x.shape[1]
    block = visual.transformer.resblocks[attributor.layer]
    heads = block.attn.num_heads
    width = block_input.shape[-1]
    head_dim = width // heads
    with torch.no_grad():
        x_ln = block.ln_1(block_input)[0]
    w_in, b_in = block.attn.in_proj_weight, block.attn.in_proj_bias
    w_out, b_out = block.attn.out_proj.weight, block.attn.out_proj.bias

    def linear_ln(vector: torch.Tensor, share: float) -> torch.Tensor:
        return (vector - mu / share) * ln_post.weight / sigma + ln_post.bias / share

    cls_scores, comp_scores = [], []
    for m in range(1, tokens):
        contribution = b_out / tokens
        for h in range(heads):
            rows = slice(h * head_dim, (h + 1) * head_dim)
            q = x_ln[0] @ w_in[:width][rows].T + b_in[:width][rows]
            keys = [x_ln[j] @ w_in[width : 2 * width][rows].T + b_in[width : 2 * width][rows] for j in range(tokens)]
            logits = torch.stack([q @ k / head_dim**0.5 for k in keys])
            weight = torch.softmax(logits, dim=0)[m]
            value = x_ln[m] @ w_in[2 * width :][rows].T + b_in[2 * width :][rows]
            contribution = contribution + weight * (value @ w_out[:, rows].T)
        cls_vec = linear_ln(contribution, (2 * num_blocks - 1) * tokens) @ visual.proj
        comp_vec = linear_ln(block_output[0, m], 2 * num_blocks - 1) @ visual.proj
        cls_scores.append(float(cls_vec @ text / embedding.norm()))
        comp_scores.append(float(comp_vec @ text / embedding.norm()))
    rows_, cols_ = visual.grid_size
    return np.array(cls_scores).reshape(rows_, cols_), np.array(comp_scores).reshape(rows_, cols_)


def test_contributions_sum_to_attention_output() -> None:
    torch.manual_seed(1)
    attn = torch.nn.MultiheadAttention(24, 3, batch_first=True).double()
    torch.nn.init.normal_(attn.in_proj_bias)
    torch.nn.init.normal_(attn.out_proj.bias)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    parts = cls_contributions(
        x, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, attn.num_heads
    )
    expected = attn(x, x, x, need_weights=False)[0][:, 0]
    torch.testing.assert_close(parts.sum(dim=1), expected, rtol=1e-12, atol=1e-12)


def test_linearized_layer_norm_parts_sum_to_layer_norm() -> None:
    torch.manual_seed(2)
    ln = torch.nn.LayerNorm(16).double()
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    parts = torch.randn(5, 16, dtype=torch.float64)
    total = parts.sum(dim=0)
    mean = total.mean()
    std = torch.sqrt(total.var(unbiased=False) + ln.eps)
    linear = linearized_layer_norm(parts, mean, std, ln.weight, ln.bias, share=5)
    torch.testing.assert_close(linear.sum(dim=0), ln(total), rtol=1e-12, atol=1e-12)


def test_fast_maps_equal_literal_formulas(tiny_clip_attributor: ClipAttributor, noise_image: Image.Image) -> None:
    amap = tiny_clip_attributor.attribute(noise_image, "where is the red circle?")
    cls_literal, comp_literal = literal_psi(tiny_clip_attributor, noise_image, "where is the red circle?")
    assert_sums_close(amap.cls, cls_literal, n_terms=MAP_TERMS)
    assert_sums_close(amap.comp, comp_literal, n_terms=MAP_TERMS)
    expected_mask = combine_maps(amap.cls, amap.comp, combine="paper", enhance_coe=10.0, kernel_size=3)
    assert_sums_close(amap.mask, expected_mask, n_terms=amap.mask.size, dtype=np.float64)  # batched float64 merge


def test_layer_choice_changes_the_map(clip_tokenizer, noise_image: Image.Image) -> None:
    model = build_tiny_clip()
    last = ClipAttributor("tiny", model=model, tokenizer=clip_tokenizer, device="cpu", layer=-1)
    first = ClipAttributor("tiny", model=model, tokenizer=clip_tokenizer, device="cpu", layer=0)
    assert last.layer == 2 and first.layer == 0
    assert not np.allclose(last.attribute(noise_image, "a dog").cls, first.attribute(noise_image, "a dog").cls)


def test_batch_equals_loop(tiny_clip_attributor: ClipAttributor) -> None:
    rng = np.random.default_rng(5)
    images = [
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
        for shape in [(64, 64, 3), (40, 90, 3), (100, 30, 3)]
    ]
    queries = ["a red circle", "the blue square on the left", "what colour is the star?"]
    batched = tiny_clip_attributor.attribute_batch(images, queries)
    tiny_clip_attributor._cache.clear()
    looped = [tiny_clip_attributor.attribute(image, query) for image, query in zip(images, queries)]
    for got, want in zip(batched, looped):
        assert_sums_close(got.cls, want.cls, n_terms=MAP_TERMS)
        assert_sums_close(got.comp, want.comp, n_terms=MAP_TERMS)
        assert got.grid_box == want.grid_box and got.image_size == want.image_size


def test_many_queries_cost_one_image_pass(tiny_clip_attributor: ClipAttributor, noise_image: Image.Image) -> None:
    calls = []
    handle = tiny_clip_attributor.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        queries = [f"question number {i}" for i in range(6)]
        many = tiny_clip_attributor.attribute_many(noise_image, queries)
        again = tiny_clip_attributor.attribute(noise_image.copy(), queries[3])
    finally:
        handle.remove()
    assert len(calls) == 1
    assert_sums_close(many[3].cls, again.cls, n_terms=MAP_TERMS)
    assert not np.allclose(many[0].cls, many[1].cls)


def test_maps_are_linear_in_the_text_embedding(tiny_clip_attributor: ClipAttributor, noise_image) -> None:
    features = tiny_clip_attributor.image_features(noise_image)
    texts = tiny_clip_attributor.encode_queries(["a cat", "a dog"])
    cat, dog = tiny_clip_attributor.attribute_many(noise_image, ["a cat", "a dog"])
    mixed = tiny_clip_attributor._map(features, 0.3 * texts[0] + 0.7 * texts[1], "mixed")
    assert_sums_close(mixed.cls, 0.3 * cat.cls + 0.7 * dog.cls, n_terms=MAP_TERMS)
    assert_sums_close(mixed.comp, 0.3 * cat.comp + 0.7 * dog.comp, n_terms=MAP_TERMS)


def test_letterbox_keeps_pixels_on_their_grid_cells(clip_tokenizer) -> None:
    attributor = ClipAttributor("tiny", model=build_tiny_clip(), tokenizer=clip_tokenizer, device="cpu")
    image = Image.new("RGB", (160, 80), (0, 0, 0))
    image.paste((255, 255, 255), (120, 60, 140, 80))  # bottom right
    pixels, letterbox = attributor.preprocess(image)
    bright = (pixels.mean(dim=0) > 1.0).nonzero()
    rows = {int(y) // 16 for y, _ in bright}
    cols = {int(x) // 16 for _, x in bright}
    gx0, gy0, gx1, gy1 = letterbox.grid_box((4, 4))
    expected_col = int(gx0 + 130 / 160 * (gx1 - gx0))
    expected_row = int(gy0 + 70 / 80 * (gy1 - gy0))
    assert rows == {expected_row} and cols == {expected_col}


def test_bad_inputs_give_clear_errors(tiny_clip_attributor: ClipAttributor, noise_image, clip_tokenizer) -> None:
    with pytest.raises(InvalidQueryError, match="empty"):
        tiny_clip_attributor.attribute(noise_image, "   ")
    with pytest.raises(LayerOutOfRangeError, match=r"layer 7 is out of range .* 3 blocks"):
        ClipAttributor("tiny", model=build_tiny_clip(), tokenizer=clip_tokenizer, device="cpu", layer=7)
    with pytest.raises(LayerOutOfRangeError):
        resolve_layer(-4, 3)
    with pytest.raises(UnknownModelError, match="ViT-B-32"):
        ClipAttributor("ViT-B-33", pretrained=None)
    with pytest.raises(UnknownModelError, match="known tags"):
        ClipAttributor("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(UnsupportedModelError, match="tokenizer"):
        ClipAttributor("tiny", model=build_tiny_clip())


def test_open_clip_model_by_name_with_random_weights() -> None:
    attributor = ClipAttributor("ViT-B-32", pretrained=None, device="cpu", layer=-2)
    assert attributor.layer == 10 and attributor.side == 224
    amap = attributor.attribute(Image.new("RGB", (30, 20), (10, 200, 30)), "a green field")
    assert amap.mask.shape == (7, 7) and amap.image_size == (30, 20)
    height = round(20 * 224 / 30)  # 149 rows of image, centred with (224 - 149) // 2 = 37 rows above
    top = (224 - height) // 2
    assert amap.grid_box == (0.0, top / 32, 7.0, (top + height) / 32)
    assert (amap.mask.min(), amap.mask.max()) == (0.0, 1.0)


def test_missing_weights_fail_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from api_tool.backends import clip as clip_module

    monkeypatch.setattr(clip_module, "hub_reachable", lambda: False)
    monkeypatch.setattr(clip_module, "_cached_checkpoint", lambda cfg: None)
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="not in the local cache") as info:
        ClipAttributor("ViT-B-32", pretrained="openai", device="cpu")
    assert time.perf_counter() - start < 10
    assert "pretrained=/path/to/checkpoint" in str(info.value) and "demo" in str(info.value)


def test_local_checkpoint_path_loads_those_weights(tmp_path) -> None:
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    attributor = ClipAttributor("ViT-B-32", pretrained=str(path), device="cpu")
    torch.testing.assert_close(attributor.visual.proj, model.visual.proj)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, AttributorSpec("clip", "demo")),
        ("demo", AttributorSpec("clip", "demo")),
        ("clip:ViT-L-14-336", AttributorSpec("clip", "ViT-L-14-336", "openai")),
        ("clip:ViT-B-32@laion2b_s34b_b79k", AttributorSpec("clip", "ViT-B-32", "laion2b_s34b_b79k")),
        ("ViT-B-16", AttributorSpec("clip", "ViT-B-16", "openai")),
        ("llava:llava-hf/llava-1.5-7b-hf", AttributorSpec("llava", "llava-hf/llava-1.5-7b-hf")),
        ("llava-hf/llava-1.5-13b-hf", AttributorSpec("llava", "llava-hf/llava-1.5-13b-hf")),
        ("local-dir:/models/x", AttributorSpec("clip", "local-dir:/models/x")),
    ],
)
def test_registry_specs(spec: str | None, expected: AttributorSpec) -> None:
    assert AttributorSpec.parse(spec) == expected


def test_registry_shares_instances_and_rejects_unknown(tiny_clip_attributor: ClipAttributor) -> None:
    assert get_attributor(tiny_clip_attributor) is tiny_clip_attributor
    with pytest.raises(UnknownModelError, match="unknown attributor"):
        get_attributor("resnet-9000")


def test_registry_loads_weights_once_per_spec_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import api_tool.backends.clip as clip_backend
    from api_tool.backends import registry

    loads: list[str] = []
    real_load = clip_backend.load_clip

    def counting_load(model_name: str, pretrained: str | None) -> Any:
        loads.append(model_name)
        return real_load(model_name, pretrained)

    monkeypatch.setattr(clip_backend, "load_clip", counting_load)
    registry.clear_cache()
    try:
        default = get_attributor("demo", device="cpu")
        assert get_attributor("demo", device="cpu", layer=None) is default
        other_layer = get_attributor("demo", device="cpu", layer=-2, combine="paper")
        assert other_layer is not default and other_layer.layer != default.layer  # type: ignore[attr-defined]
        assert other_layer.model is default.model  # type: ignore[attr-defined]
        assert loads == ["demo"]
        image = generate_scene(3, size=(64, 48)).image
        alone = ClipAttributor("demo", device="cpu", layer=-2, combine="paper").attribute(image, "the red circle")
        np.testing.assert_allclose(other_layer.attribute(image, "the red circle").mask, alone.mask, atol=1e-6)
        loads.clear()
        with pytest.raises(InvalidParameterError, match="clip attributors take no option 'dtype'"):
            get_attributor("clip:ViT-B-32@openai", device="cpu", dtype="float16")
        with pytest.raises(InvalidParameterError, match="no option 'layr'"):
            get_attributor("clip:ViT-B-32@openai", device="cpu", layr=-1)
        assert loads == []  # refused before any weights load
    finally:
        registry.clear_cache()


def test_registry_shares_one_llava_across_dtype_spellings(monkeypatch: pytest.MonkeyPatch) -> None:
    import api_tool.backends.lvlm as lvlm_backend
    from api_tool.backends import registry

    loads: list[object] = []
    real_load = lvlm_backend.load_lvlm

    def counting_load(model: Any, dtype: torch.dtype, **options: Any) -> Any:
        loads.append(dtype)
        return real_load(model, dtype, **options)

    monkeypatch.setattr(lvlm_backend, "load_lvlm", counting_load)
    registry.clear_cache()
    try:
        spelled = [
            get_attributor("llava:demo", device="cpu"),
            get_attributor("llava:demo", device="cpu", dtype="float32"),
            get_attributor("llava:demo", device="cpu", dtype=torch.float32, layer=1),
        ]
        assert loads == [torch.float32]
        assert spelled[0] is spelled[1] and spelled[2] is not spelled[0]
        assert spelled[2].model is spelled[0].model  # type: ignore[attr-defined]
        assert get_attributor("llava:demo", device="cpu", dtype="bfloat16").model is not spelled[0].model  # type: ignore[attr-defined]
        assert loads == [torch.float32, torch.bfloat16]
    finally:
        registry.clear_cache()


def test_concurrent_calls_do_not_mix_captures(tiny_clip_attributor: ClipAttributor) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(9)
    images = [Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)) for _ in range(8)]
    expected = [tiny_clip_attributor.attribute(image, "a cat").cls for image in images]
    tiny_clip_attributor._cache.clear()
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda image: tiny_clip_attributor.attribute(image, "a cat").cls, images))
    for a, b in zip(got, expected):
        assert_sums_close(a, b, n_terms=MAP_TERMS)


def test_trimmed_text_pass_equals_the_full_one(tiny_clip_attributor: ClipAttributor) -> None:
    queries = ["a", "where is the small red circle next to the blue square?", "dog"]
    tokens = tiny_clip_attributor.tokenizer(queries)
    with torch.no_grad():
        full = tiny_clip_attributor.model.encode_text(tokens)
        trimmed = encode_text_trimmed(tiny_clip_attributor.model, tokens)
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]
    assert_sums_close(trimmed, full, n_terms=MAP_TERMS)


def test_without_cache_every_call_runs_the_image(clip_tokenizer, noise_image) -> None:
    attributor = ClipAttributor("tiny", model=build_tiny_clip(), tokenizer=clip_tokenizer, device="cpu", cache_size=0)
    calls = []
    handle = attributor.visual.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = attributor.attribute(noise_image, "a cat")
        second = attributor.attribute(noise_image, "a cat")
    finally:
        handle.remove()
    assert len(calls) == 2 and not attributor._cache
    np.testing.assert_allclose(first.cls, second.cls)


def test_default_settings_paper_for_real_models_measured_best_for_demo(clip_tokenizer) -> None:
    from api_tool.demo import DEMO_CLIP_RECOMMENDED

    tiny = ClipAttributor("tiny", model=build_tiny_clip(), tokenizer=clip_tokenizer, device="cpu")
    assert tiny.layer == 1 and tiny.combine == "paper"  # 3 blocks: the paper's -2 is block 1
    assert tiny.enhance_coe == 10.0
    demo = ClipAttributor("demo", device="cpu")
    assert demo.layer == DEMO_CLIP_RECOMMENDED["layer"] % len(demo.blocks)
    assert demo.combine == DEMO_CLIP_RECOMMENDED["combine"]
    assert demo.enhance_coe == DEMO_CLIP_RECOMMENDED["enhance_coe"]
    model, tokenizer = load_demo_clip()
    renamed = ClipAttributor("my-copy", device="cpu", model=model, tokenizer=tokenizer)
    assert (renamed.layer, renamed.combine, renamed.enhance_coe) == (demo.layer, demo.combine, demo.enhance_coe)
    own = build_tiny_clip()
    own.api_attribution_defaults = {"combine": "comp"}  # type: ignore[assignment]
    partly = ClipAttributor("tiny", model=own, tokenizer=clip_tokenizer, device="cpu")
    assert (partly.layer, partly.combine, partly.enhance_coe) == (1, "comp", 10.0)
    chosen = ClipAttributor("demo", device="cpu", layer=-2, combine="paper", enhance_coe=10.0)
    assert (chosen.layer, chosen.combine, chosen.enhance_coe) == (len(demo.blocks) - 2, "paper", 10.0)
