"""Tower adapters: every tower's token terms against its own modules, exact sums in float64, the two
ways of handing an attention pool's MLP to the tokens, parity between open_clip and transformers on
the same weights, geometry, refusals before loading, and the front doors (registry, CLI)."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from api_tool.backends.clip import ClipAttributor, load_clip
from api_tool.backends.psi import pooled_query_terms
from api_tool.backends.registry import AttributorSpec, clear_cache, get_attributor
from api_tool.backends.towers import tower_for
from api_tool.backends.towers.base import ClsPooling, ProbePooling, VisionTower
from api_tool.backends.towers.open_clip_vit import OPENAI_MEAN, OPENAI_STD
from api_tool.cli import main
from api_tool.errors import InvalidParameterError, UnsupportedModelError, WeightsUnavailableError
from api_tool.geometry import Letterbox
from tests import tiny_towers
from tests.conftest import TINY_CLIP_MAP_TERMS as MAP_TERMS
from tests.conftest import build_tiny_clip
from tests.tolerances import assert_sums_close

SUM_TERMS = 4096
"""About how many float64 terms lie behind one entry of a decomposed embedding (tokens x width x depth)."""
TOWERS = ["open_clip_cls", "open_clip_coca", "timm_siglip", "timm_cls", "hf_clip", "hf_siglip", "hf_siglip2"]
CLS_TOWERS = ["open_clip_cls", "timm_cls", "hf_clip"]
PROBE_TOWERS = ["open_clip_coca", "timm_siglip", "hf_siglip", "hf_siglip2"]
MLP_TOWERS = ["timm_siglip", "hf_siglip", "hf_siglip2"]
LETTERBOX_TOWERS = [name for name in TOWERS if name != "hf_siglip2"]


@functools.cache
def models() -> dict[str, tuple[torch.nn.Module, Any]]:
    """One tiny model per adapter, with its tokenizer (open_clip) or processor (transformers)."""
    siglip = tiny_towers.open_clip_model(tiny_towers.SIGLIP_NAME)
    hf_siglip, siglip_processor = tiny_towers.hf_siglip_from(siglip)
    hf_siglip2, siglip2_processor = tiny_towers.hf_siglip2_from(hf_siglip)
    clip = build_tiny_clip()
    hf_clip, clip_processor = tiny_towers.hf_clip_from(clip)
    clip_tokenizer = open_clip.get_tokenizer("ViT-B-32")
    timm_cls = tiny_towers.open_clip_model(tiny_towers.TIMM_CLS_NAME)
    return {
        "open_clip_cls": (clip, clip_tokenizer),
        "open_clip_coca": (tiny_towers.coca_style_clip(), clip_tokenizer),
        "timm_siglip": (siglip, open_clip.get_tokenizer(tiny_towers.SIGLIP_NAME)),
        "timm_cls": (timm_cls, open_clip.get_tokenizer(tiny_towers.TIMM_CLS_NAME)),
        "hf_clip": (hf_clip, clip_processor),
        "hf_siglip": (hf_siglip, siglip_processor),
        "hf_siglip2": (hf_siglip2, siglip2_processor),
    }


def picture(size: tuple[int, int] = (90, 40), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def float64_tower(name: str) -> VisionTower:
    model, companion = models()[name]
    return tower_for(copy.deepcopy(model).double(), companion, name)


def inputs_of(tower: VisionTower, image: Image.Image) -> dict[str, torch.Tensor]:
    return tower.batch([tower.prepare(image)])


def attributor(name: str, **options: Any) -> ClipAttributor:
    model, companion = models()[name]
    return ClipAttributor.from_model(model, companion, model_name=name, device="cpu", **options)


@torch.no_grad()
def run_with_hooks(
    tower: VisionTower, image: Image.Image, hooks: dict[str, tuple[torch.nn.Module, bool]]
) -> dict[str, Any]:
    """The tower's own forward with forward hooks: ``{name: (module, want_input)}`` -> what each saw."""
    seen: dict[str, Any] = {}
    handles = []
    for name, (module, want_input) in hooks.items():

        def hook(_m: Any, args: Any, output: Any, name: str = name, want_input: bool = want_input) -> None:
            seen[name] = args[0] if want_input else output

        handles.append(module.register_forward_hook(hook))
    try:
        seen["embedding"] = tower.embed(inputs_of(tower, image))
    finally:
        for handle in handles:
            handle.remove()
    return seen


def probe_output(name: str, tower: VisionTower) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """The module whose output is the pool's attention output, and how to read the probe's row from it."""
    visual = tower.module
    if name == "open_clip_coca":
        return visual.attn_pool, lambda out: out[:, 0]
    if name == "timm_siglip":
        return visual.trunk.attn_pool.proj, lambda out: out[:, 0]
    return visual.head.attention, lambda out: out[0][:, 0]


def attention_branch(name: str, block: Any, x: torch.Tensor) -> torch.Tensor:
    """A block's own attention branch (layer scale included) on its input ``x``."""
    if name == "open_clip_cls":
        normed = block.ln_1(x)
        return block.ls_1(block.attn(normed, normed, normed, need_weights=False)[0])
    if name == "timm_cls":
        return block.ls1(block.attn(block.norm1(x)))
    return block.self_attn(block.layer_norm1(x))[0]


# -- the maths against each tower's own modules ---------------------------------------------------------


@pytest.mark.parametrize("name", PROBE_TOWERS)
@torch.no_grad()
def test_probe_terms_sum_to_the_pools_own_attention_output(name: str) -> None:
    tower = float64_tower(name)
    pooling = tower.pooling
    assert isinstance(pooling, ProbePooling)
    module, read = probe_output(name, tower)
    seen = run_with_hooks(tower, picture(), {"final": (tower.final_module, True), "pooled": (module, False)})
    final = seen["final"][:, pooling.first_key :]
    normed = pooling.token_norm(final)
    terms = pooled_query_terms(pooling.query.expand(final.shape[0], -1), normed, pooling.attention)
    assert terms.shape[1] == final.shape[1] > 1
    assert_sums_close(terms.sum(dim=1), read(seen["pooled"]), n_terms=SUM_TERMS, dtype=np.float64)


@pytest.mark.parametrize("name", CLS_TOWERS)
@torch.no_grad()
def test_cls_row_terms_sum_to_the_blocks_own_attention_output(name: str) -> None:
    tower = float64_tower(name)
    assert isinstance(tower.pooling, ClsPooling)
    for layer in (0, len(tower.blocks) - 1):
        block = tower.blocks[layer]
        seen = run_with_hooks(tower, picture(), {"block_input": (block, True)})
        x = seen["block_input"]
        normed = tower.block_norm(block)(x)
        terms = pooled_query_terms(normed[:, 0], normed, tower.block_attention(block))
        scale = tower.layer_scale(block)
        if scale is not None:
            terms = terms * scale
        expected = attention_branch(name, block, x)[:, 0]
        assert_sums_close(terms.sum(dim=1), expected, n_terms=SUM_TERMS, dtype=np.float64)
    if name == "timm_cls":  # the tiny timm tower has a layer scale, and a biased linear projection head
        assert tower.layer_scale(tower.blocks[0]) is not None and tower.pooling.head.bias is not None


@pytest.mark.parametrize("name", TOWERS)
@pytest.mark.parametrize("pool_mlp", ["first_order", "residual"])
def test_token_terms_and_bias_sum_to_the_image_embedding(name: str, pool_mlp: str) -> None:
    tower = float64_tower(name)
    for layer in (0, len(tower.blocks) - 1):
        with torch.no_grad():
            parts = tower.decompose(inputs_of(tower, picture()), layer, pool_mlp)  # type: ignore[arg-type]
        assert parts.terms.dtype == torch.float64 and parts.terms.shape[:2] == parts.comp.shape[:2]
        assert_sums_close(parts.terms.sum(dim=1) + parts.bias, parts.embedding, n_terms=SUM_TERMS, dtype=np.float64)
        assert float(parts.terms.abs().sum(dim=-1).min()) > 0 or tower.prefix_tokens > 0


@pytest.mark.parametrize("name", MLP_TOWERS)
def test_first_order_hands_each_token_the_jacobian_of_the_pool_mlp(name: str) -> None:
    tower = float64_tower(name)
    pooling = tower.pooling
    assert isinstance(pooling, ProbePooling) and pooling.branch is not None
    inputs = inputs_of(tower, picture())
    with torch.no_grad():
        first = tower.decompose(inputs, 1, "first_order")
        residual = tower.decompose(inputs, 1, "residual")
    terms = residual.terms[0]  # t_m: the probe's exact terms (SigLIP has no projection)
    pooled = terms.sum(dim=0)
    jacobian = torch.autograd.functional.jacobian(pooling.branch, pooled)  # literal D x D Jacobian
    with torch.no_grad():
        value = pooling.branch(pooled)
    assert_sums_close(residual.bias[0], value, n_terms=SUM_TERMS, dtype=np.float64)
    assert_sums_close(first.terms[0], terms + terms @ jacobian.T, n_terms=SUM_TERMS, dtype=np.float64)
    assert_sums_close(first.bias[0], value - jacobian @ pooled, n_terms=SUM_TERMS, dtype=np.float64)
    assert_sums_close(first.comp[0], residual.comp[0] + residual.comp[0] @ jacobian.T, SUM_TERMS, np.float64)


@pytest.mark.parametrize("name", MLP_TOWERS)
def test_first_order_error_on_leaving_a_token_out_is_second_order(name: str) -> None:
    """The first-order share of token m predicts what removing ``eps * t_m`` from the pool does, with an
    error that shrinks as ``eps ** 2`` (the MLP is smooth); the residual-only share does not."""
    tower = float64_tower(name)
    pooling = tower.pooling
    assert isinstance(pooling, ProbePooling) and pooling.branch is not None
    inputs = inputs_of(tower, picture())
    with torch.no_grad():
        first = tower.decompose(inputs, 1, "first_order")
        residual = tower.decompose(inputs, 1, "residual")
        terms, pooled = residual.terms[0], residual.terms[0].sum(dim=0)
        embedding = pooled + pooling.branch(pooled)

        def errors(eps: float, shares: torch.Tensor) -> torch.Tensor:
            exact = embedding - (pooled - eps * terms + pooling.branch(pooled - eps * terms))  # (N, D)
            return (exact - eps * shares).norm(dim=-1) / exact.norm(dim=-1)

        ratio = (errors(0.05, first.terms[0]) / errors(0.1, first.terms[0])).median()
        assert 0.4 < float(ratio) < 0.6  # relative error ~ eps: absolute error ~ eps ** 2
        assert float(errors(1.0, first.terms[0]).median()) < float(errors(1.0, residual.terms[0]).median())


@pytest.mark.parametrize("name", TOWERS)
def test_maps_are_linear_in_the_text_embedding(name: str) -> None:
    tool = attributor(name)
    image = picture()
    features = tool.image_features(image)
    texts = tool.encode_queries(["a red circle", "the dog"])
    cat, dog = (tool._map(features, text, "q") for text in texts)
    mixed = tool._map(features, 0.3 * texts[0] + 0.7 * texts[1], "mixed")
    assert_sums_close(mixed.raw, 0.3 * cat.raw + 0.7 * dog.raw, n_terms=MAP_TERMS)
    assert mixed.comp is not None and cat.comp is not None and dog.comp is not None
    assert_sums_close(mixed.comp, 0.3 * cat.comp + 0.7 * dog.comp, n_terms=MAP_TERMS)
    assert mixed.metadata["tower"] == tool.tower.family
    assert ("pool_mlp" in mixed.metadata) == isinstance(tool.tower.pooling, ProbePooling)


def test_pool_mlp_changes_only_attention_pool_maps_and_is_checked() -> None:
    image = picture()
    for name, changes in (("timm_siglip", True), ("open_clip_cls", False)):
        first = attributor(name, pool_mlp="first_order").attribute(image, "a red circle")
        residual = attributor(name, pool_mlp="residual").attribute(image, "a red circle")
        assert (not np.allclose(first.raw, residual.raw)) == changes
    with pytest.raises(InvalidParameterError, match="pool_mlp"):
        attributor("timm_siglip", pool_mlp="second_order")


# -- the same weights through open_clip and transformers -------------------------------------------------


def test_open_clip_and_transformers_clip_give_the_same_maps() -> None:
    ours, theirs = attributor("open_clip_cls"), attributor("hf_clip")
    queries = ["where is the red circle?", "A photo of Two DOGS, running!"]
    assert_sums_close(theirs.encode_queries(queries), ours.encode_queries(queries), n_terms=MAP_TERMS)
    for image in (picture((90, 40)), picture((40, 90), seed=1)):
        for got, want in zip(theirs.attribute_many(image, queries), ours.attribute_many(image, queries)):
            assert got.grid_box == want.grid_box and got.raw.shape == (4, 4)
            assert_sums_close(got.raw, want.raw, n_terms=MAP_TERMS)
            assert_sums_close(got.comp, want.comp, n_terms=MAP_TERMS)  # type: ignore[arg-type]


def test_open_clip_siglip_and_transformers_siglip_give_the_same_maps() -> None:
    """The vision weights are shared (the text towers are not): same features, and the same map for one
    text vector."""
    ours, theirs = attributor("timm_siglip"), attributor("hf_siglip")
    text = ours.encode_queries(["a red circle"])[0]
    for image in (picture((90, 40)), picture((64, 64), seed=2)):
        got, want = theirs.image_features(image), ours.image_features(image)
        assert got.grid_box == want.grid_box
        assert_sums_close(got.cls_tokens, want.cls_tokens, n_terms=MAP_TERMS)
        assert_sums_close(got.comp_tokens, want.comp_tokens, n_terms=MAP_TERMS)
        assert_sums_close(theirs._map(got, text, "q").raw, ours._map(want, text, "q").raw, n_terms=MAP_TERMS)


def test_siglip2_equals_siglip_where_the_grids_agree() -> None:
    """A square image at the native size gives Siglip2 (NaFlex) the 4 x 4 grid SiglipModel sees."""
    flexible, fixed = attributor("hf_siglip2"), attributor("hf_siglip")
    image = picture((64, 64), seed=3)
    got, want = flexible.image_features(image), fixed.image_features(image)
    assert got.grid == want.grid == (4, 4) and got.grid_box == want.grid_box == (0.0, 0.0, 4.0, 4.0)
    assert_sums_close(got.cls_tokens, want.cls_tokens, n_terms=MAP_TERMS)
    assert_sums_close(got.comp_tokens, want.comp_tokens, n_terms=MAP_TERMS)


# -- geometry ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LETTERBOX_TOWERS)
def test_letterboxed_towers_keep_pixels_on_their_grid_cells(name: str) -> None:
    tool = attributor(name)
    image = Image.new("RGB", (160, 80), (0, 0, 0))
    image.paste((255, 255, 255), (120, 60, 140, 80))  # bottom right
    pixels, letterbox = tool.preprocess(image)
    bright = (pixels.mean(dim=0) > 0.9).nonzero()
    rows = {int(y) // tiny_towers.PATCH_SIZE for y, _ in bright}
    cols = {int(x) // tiny_towers.PATCH_SIZE for _, x in bright}
    gx0, gy0, gx1, gy1 = letterbox.grid_box((4, 4))
    assert rows == {int(gy0 + 70 / 80 * (gy1 - gy0))} and cols == {int(gx0 + 130 / 160 * (gx1 - gx0))}
    amap = tool.attribute(image, "a white square")
    assert amap.grid_box == Letterbox.fit((160, 80), tiny_towers.IMAGE_SIZE).grid_box((4, 4))


def test_naflex_grid_covers_the_whole_non_square_image() -> None:
    tool = attributor("hf_siglip2")
    image = Image.new("RGB", (160, 40), (0, 0, 0))
    image.paste((255, 255, 255), (120, 0, 160, 40))  # the right quarter
    prepared = tool.tower.prepare(image)
    assert prepared.grid == (2, 8) and prepared.grid_box == (0.0, 0.0, 8.0, 2.0)  # 16 patches, 4:1
    patches = prepared.inputs["pixel_values"][0].reshape(2, 8, -1)
    assert {(r, c) for r, c in (patches.mean(dim=-1) > 0.9).nonzero().tolist()} == {
        (r, c) for r in (0, 1) for c in (6, 7)
    }
    amap = tool.attribute(image, "a white square")
    assert amap.mask.shape == (2, 8) and amap.grid_box == (0.0, 0.0, 8.0, 2.0)
    with pytest.raises(UnsupportedModelError, match="own geometry"):
        tool.preprocess(image)


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["RN50", "convnext_base", "EVA02-B-16", "ViT-H-14-CLIPA", "swin_base_patch4_window7_224", "MobileCLIP-S1"]
)
def test_towers_that_cannot_be_decomposed_are_refused_before_any_weights_load(name: str, monkeypatch) -> None:
    def no_loading(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(open_clip, "create_model", no_loading)
    with pytest.raises(UnsupportedModelError, match=name) as info:
        load_clip(name, None)
    assert "SigLIP" in str(info.value) and "CLIPModel" in str(info.value) and "ViT-L-14-336" in str(info.value)


def test_transformers_models_that_are_no_dual_encoder_are_refused_before_loading(tmp_path: Path, monkeypatch) -> None:
    import transformers

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UnsupportedModelError, match=r"BertModel.*SiglipModel"):
        load_clip(f"hf:{tmp_path}", None)


def test_a_loaded_resnet_is_refused_naming_the_towers_that_work(clip_tokenizer) -> None:
    resnet = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    with pytest.raises(UnsupportedModelError, match=r"ModifiedResNet.*SiglipModel"):
        ClipAttributor("rn", model=resnet, tokenizer=clip_tokenizer, device="cpu")


def test_a_siglip_tokenizer_missing_offline_is_a_clear_error_before_loading(tmp_path: Path, monkeypatch) -> None:
    from api_tool.backends import clip as clip_module

    checkpoint = tmp_path / "siglip2.pt"
    checkpoint.write_bytes(b"not read")
    monkeypatch.setattr(clip_module, "hub_reachable", lambda: False)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(WeightsUnavailableError, match=r"tokenizer of ViT-B-16-SigLIP2 .*timm/ViT-B-16-SigLIP2"):
        load_clip("ViT-B-16-SigLIP2", str(checkpoint))


# -- front doors --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SigLIP as an open_clip checkpoint file, and the transformers models as saved folders."""
    folder = tmp_path_factory.mktemp("towers")
    checkpoint = folder / "tiny-siglip.pt"
    torch.save(models()["timm_siglip"][0].state_dict(), checkpoint)
    found = {"checkpoint": checkpoint}
    for name in ("hf_clip", "hf_siglip2"):
        model, processor = models()[name]
        model.save_pretrained(folder / name)
        processor.save_pretrained(folder / name)
        found[name] = folder / name
    return found


def test_specs_for_transformers_models_and_default_tags() -> None:
    assert AttributorSpec.parse("hf:google/siglip2-base-patch16-naflex") == AttributorSpec(
        "clip", "hf:google/siglip2-base-patch16-naflex"
    )
    assert AttributorSpec.parse("ViT-B-16-SigLIP2") == AttributorSpec("clip", "ViT-B-16-SigLIP2", "webli")
    assert AttributorSpec.parse("clip:ViT-B-16-SigLIP2@/x.pt") == AttributorSpec("clip", "ViT-B-16-SigLIP2", "/x.pt")
    assert AttributorSpec.parse("clip:ViT-B-32") == AttributorSpec("clip", "ViT-B-32", "openai")


def test_registry_loads_a_saved_transformers_model_once(saved: dict[str, Path]) -> None:
    image = picture()
    clear_cache()
    try:
        first = get_attributor(f"hf:{saved['hf_siglip2']}", device="cpu")
        again = get_attributor(f"hf:{saved['hf_siglip2']}", device="cpu", pool_mlp="residual")
        assert isinstance(first, ClipAttributor) and first.tower.family == "hf_siglip2"
        assert isinstance(again, ClipAttributor) and again.model is first.model and again.pool_mlp == "residual"
        want = attributor("hf_siglip2").image_features(image)  # the test tokenizer does not survive a round
        got = first.image_features(image)  # trip through Siglip2Processor, so the image side is compared
        assert_sums_close(got.cls_tokens, want.cls_tokens, n_terms=MAP_TERMS)
        clip = get_attributor(f"hf:{saved['hf_clip']}", device="cpu")
        expected = attributor("hf_clip").attribute(image, "a red circle")
        assert_sums_close(clip.attribute(image, "a red circle").raw, expected.raw, n_terms=MAP_TERMS)
    finally:
        clear_cache()


def test_a_plain_saved_transformers_directory_loads_too(saved: dict[str, Path]) -> None:
    tool = ClipAttributor(str(saved["hf_clip"]), device="cpu")
    assert tool.tower.family == "hf_clip" and tool.pretrained is None
    want = attributor("hf_clip").attribute(picture(), "a cat")
    assert_sums_close(tool.attribute(picture(), "a cat").raw, want.raw, n_terms=MAP_TERMS)


def test_cli_open_clip_siglip_with_a_local_checkpoint(saved: dict[str, Path], tmp_path: Path) -> None:
    image_path, out = tmp_path / "scene.png", tmp_path / "out.png"
    picture((120, 60)).save(image_path)
    argv = [str(image_path), "a red circle", "-o", str(out), "--device", "cpu"]
    assert main([*argv, "--model", tiny_towers.SIGLIP_NAME, "--pretrained", str(saved["checkpoint"])]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["grid"] == [4, 4]
    clear_cache()
    loaded = get_attributor(f"clip:{tiny_towers.SIGLIP_NAME}@{saved['checkpoint']}", device="cpu")
    assert isinstance(loaded, ClipAttributor) and loaded.tower.family == "timm_vit"
    same = copy.deepcopy(models()["timm_siglip"][0])  # a file without published tags keeps open_clip's default
    same.visual.preprocess_cfg = dict(same.visual.preprocess_cfg, mean=OPENAI_MEAN, std=OPENAI_STD)
    want = ClipAttributor.from_model(same, loaded.tokenizer, device="cpu").attribute(picture((120, 60)), "a red circle")
    assert_sums_close(loaded.attribute(Image.open(image_path), "a red circle").raw, want.raw, n_terms=MAP_TERMS)
    clear_cache()


def test_a_checkpoint_file_takes_the_preprocessing_its_published_weights_use() -> None:
    from api_tool.backends.clip import _published_preprocess

    assert _published_preprocess("ViT-B-16-SigLIP2") == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert _published_preprocess("ViT-L-14-336") == {"mean": OPENAI_MEAN, "std": OPENAI_STD}
    assert _published_preprocess(tiny_towers.SIGLIP_NAME) is None


@pytest.mark.parametrize("name", ["hf_clip", "hf_siglip2"])
def test_cli_transformers_model_from_a_saved_directory(name: str, saved: dict[str, Path], tmp_path: Path) -> None:
    image_path, out = tmp_path / "scene.png", tmp_path / "out.png"
    picture((160, 40)).save(image_path)
    argv = [str(image_path), "a red circle", "-o", str(out), "--device", "cpu", "--model", f"hf:{saved[name]}"]
    assert main(argv) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["grid"] == ([2, 8] if name == "hf_siglip2" else [4, 4])
    with pytest.raises(SystemExit):
        main([*argv, "--pretrained", "openai"])
    clear_cache()
