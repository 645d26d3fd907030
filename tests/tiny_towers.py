"""Tiny random-weight dual encoders for every tower adapter, built offline in well under a second each.

* open_clip: a CoCa-style attention-pool CLIP, and ``TimmModel`` towers over two tiny timm
  ``VisionTransformer`` variants registered here (``vit_tiny_test_siglip``: no CLS token, attention-pool
  head, as ``vit_base_patch16_siglip_224``; ``vit_tiny_test_clip``: CLS token, pre-norm, as timm's
  ``vit_*_clip``), each under an open_clip model name (``tiny-test-SigLIP``, ``tiny-test-timm-CLS``) whose
  tokenizer is a word-level one saved to a local folder;
* transformers: ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` whose vision weights are copied from the
  open_clip models (``hf_clip_from``, ``hf_siglip_from``, ``hf_siglip2_from``), so both loaders can be
  compared on the same weights; the CLIP copy takes the text tower too, with open_clip's BPE as a
  transformers ``CLIPTokenizer``.

Example:
    >>> model = open_clip_model("tiny-test-SigLIP")  # doctest: +SKIP
    >>> hf_model, processor = hf_siglip_from(model)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2Processor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipProcessor,
)

from api_tool.backends.towers.open_clip_vit import OPENAI_MEAN, OPENAI_STD

IMAGE_SIZE = 64
PATCH_SIZE = 16
WIDTH = 48
HEADS = 3
BLOCKS = 3
SIGLIP_MEAN = (0.5, 0.5, 0.5)
WORDS = ["where", "is", "the", "a", "red", "green", "blue", "circle", "square", "cat", "dog", "?", "field"]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
SIGLIP_NAME = "tiny-test-SigLIP"
TIMM_CLS_NAME = "tiny-test-timm-CLS"
TEXT_CONTEXT = 16


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer that appends ``</s>`` (SigLIP pools the last position)."""
    ids = {token: index for index, token in enumerate([*SPECIAL, *WORDS])}
    backend = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@functools.cache
def tokenizer_dir() -> Path:
    """A folder holding ``word_tokenizer`` (the open_clip configs' ``hf_tokenizer_name``)."""
    directory = Path(tempfile.mkdtemp(prefix="tiny-tokenizer-"))
    word_tokenizer().save_pretrained(directory)
    return directory


def _register_timm(name: str, **args: Any) -> None:
    import timm
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer

    if name in timm.list_models():
        return
    fixed = {"img_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "embed_dim": WIDTH, "depth": BLOCKS, "num_heads": HEADS}

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        for unused in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(unused, None)
        return build_model_with_cfg(VisionTransformer, name, pretrained=False, **{**fixed, **args, **kwargs})

    entrypoint.__name__ = name
    entrypoint.__module__ = "timm.models.vision_transformer"  # a plain timm ViT, as the adapter's check wants
    register_model(entrypoint)


@functools.cache
def register_tiny_models() -> None:
    """Register the tiny timm ViTs and their open_clip model names (once per process)."""
    _register_timm("vit_tiny_test_siglip", class_token=False, global_pool="map")
    _register_timm("vit_tiny_test_clip", class_token=True, global_pool="token", pre_norm=True, init_values=1e-5)
    text = {
        "context_length": TEXT_CONTEXT,
        "vocab_size": len(SPECIAL) + len(WORDS),
        "hf_tokenizer_name": str(tokenizer_dir()),
        "tokenizer_kwargs": {"clean": "canonicalize"},
        "width": 32,
        "heads": 2,
        "layers": 1,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
    }
    configs = {
        SIGLIP_NAME: {
            "embed_dim": WIDTH,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "timm_model_name": "vit_tiny_test_siglip",
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
            },
            "text_cfg": text,
        },
        TIMM_CLS_NAME: {
            "embed_dim": 32,
            "custom_text": True,
            "vision_cfg": {
                "image_size": IMAGE_SIZE,
                "timm_model_name": "vit_tiny_test_clip",
                "timm_model_pretrained": False,
                "timm_pool": "token",
                "timm_proj": "linear",
                "timm_proj_bias": True,
            },
            "text_cfg": text,
        },
    }
    folder = Path(tempfile.mkdtemp(prefix="tiny-open-clip-configs-"))
    for name, config in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def open_clip_model(name: str, seed: int = 0, pretrained: str | None = None) -> torch.nn.Module:
    """One of the registered tiny open_clip models (random weights from ``seed``, or ``pretrained``)."""
    register_tiny_models()
    torch.manual_seed(seed)
    mean, std = (SIGLIP_MEAN, SIGLIP_MEAN) if name == SIGLIP_NAME else (OPENAI_MEAN, OPENAI_STD)
    model = open_clip.create_model(name, pretrained=pretrained, force_preprocess_cfg={"mean": mean, "std": std})
    with torch.no_grad():  # timm starts biases and the probe at zero; random values exercise the maths
        for parameter_name, parameter in model.visual.named_parameters():
            if parameter_name.endswith("bias") or "latent" in parameter_name or "gamma" in parameter_name:
                parameter.normal_(0.0, 0.1)
    return model.eval()


def coca_style_clip(seed: int = 0) -> open_clip.CLIP:
    """An open_clip CLIP whose ``VisionTransformer`` pools with CoCa's attention pool (query 0, then
    ``ln_post`` and ``proj``); the pool's width (32) differs from the tower's (48), as in CoCa."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=BLOCKS,
            width=WIDTH,
            head_width=16,
            patch_size=PATCH_SIZE,
            image_size=IMAGE_SIZE,
            attentional_pool=True,
            attn_pooler_queries=4,
            attn_pooler_heads=2,
        ),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    with torch.no_grad():
        model.visual.attn_pool.attn.in_proj_bias.normal_(0.0, 0.1)
    return model.eval()


def clip_tokenizer_from_open_clip() -> CLIPTokenizer:
    """open_clip's own CLIP BPE as a transformers ``CLIPTokenizer`` (the same ids for the same text)."""
    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    return CLIPTokenizer(
        vocab=dict(bpe.encoder),
        merges=[tuple(merge) for merge in merges],
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        unk_token="<end_of_text>",
        pad_token="<end_of_text>",
    )


def _layer(source: dict[str, torch.Tensor], prefix: str, target: str, fused: str, out: str) -> dict[str, torch.Tensor]:
    """An open_clip / timm pre-norm block's weights under transformers' encoder-layer names."""
    norms = ("ln_1", "ln_2") if f"{prefix}ln_1.weight" in source else ("norm1", "norm2")
    fc = ("mlp.c_fc", "mlp.c_proj") if f"{prefix}mlp.c_fc.weight" in source else ("mlp.fc1", "mlp.fc2")
    state: dict[str, torch.Tensor] = {}
    for name, kind in zip(norms, ("layer_norm1", "layer_norm2")):
        for part in ("weight", "bias"):
            state[f"{target}{kind}.{part}"] = source[f"{prefix}{name}.{part}"]
    for part in ("weight", "bias"):
        q, k, v = source[f"{prefix}{fused}_{part}" if "in_proj" in fused else f"{prefix}{fused}.{part}"].chunk(3)
        state.update({f"{target}self_attn.{n}_proj.{part}": t for n, t in zip("qkv", (q, k, v))})
        state[f"{target}self_attn.out_proj.{part}"] = source[f"{prefix}{out}.{part}"]
        state[f"{target}mlp.fc1.{part}"] = source[f"{prefix}{fc[0]}.{part}"]
        state[f"{target}mlp.fc2.{part}"] = source[f"{prefix}{fc[1]}.{part}"]
    return state


def hf_clip_from(model: open_clip.CLIP) -> tuple[CLIPModel, CLIPProcessor]:
    """A transformers ``CLIPModel`` holding the weights of ``tests.conftest.build_tiny_clip()``, and its
    processor (open_clip's BPE and OpenAI's mean and std)."""
    config = CLIPConfig(
        projection_dim=32,
        vision_config={
            "hidden_size": WIDTH,
            "intermediate_size": 4 * WIDTH,
            "num_hidden_layers": BLOCKS,
            "num_attention_heads": HEADS,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_act": "gelu",
        },
        text_config={
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
    )
    source = model.state_dict()
    state = {
        "vision_model.embeddings.class_embedding": source["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": source["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": source["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": source["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": source["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": source["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": source["visual.ln_post.bias"],
        "visual_projection.weight": source["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": source["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": source["positional_embedding"],
        "text_model.final_layer_norm.weight": source["ln_final.weight"],
        "text_model.final_layer_norm.bias": source["ln_final.bias"],
        "text_projection.weight": source["text_projection"].T,
        "logit_scale": source["logit_scale"],
    }
    for index in range(BLOCKS):
        state.update(
            _layer(
                source,
                f"visual.transformer.resblocks.{index}.",
                f"vision_model.encoder.layers.{index}.",
                "attn.in_proj",
                "attn.out_proj",
            )
        )
    state.update(
        _layer(source, "transformer.resblocks.0.", "text_model.encoder.layers.0.", "attn.in_proj", "attn.out_proj")
    )
    hf_model = CLIPModel(config)
    hf_model.load_state_dict(state, strict=False)
    missing = set(hf_model.state_dict()) - set(state) - {n for n in hf_model.state_dict() if n.endswith("position_ids")}
    assert not missing, missing
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size=size, image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD)
    )
    return hf_model.eval(), CLIPProcessor(image_processor=images, tokenizer=clip_tokenizer_from_open_clip())


def _siglip_text_config() -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": len(SPECIAL) + len(WORDS),
        "max_position_embeddings": TEXT_CONTEXT,
        "hidden_act": "gelu",
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "layer_norm_eps": 1e-6,
        "projection_size": WIDTH,
    }


def _siglip_vision_config() -> dict[str, Any]:
    return {
        "hidden_size": WIDTH,
        "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": BLOCKS,
        "num_attention_heads": HEADS,
        "patch_size": PATCH_SIZE,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
    }


def hf_siglip_from(model: torch.nn.Module) -> tuple[SiglipModel, SiglipProcessor]:
    """A transformers ``SiglipModel`` whose vision tower holds the weights of the ``tiny-test-SigLIP``
    open_clip model (its text tower stays random), and its processor."""
    trunk = model.visual.trunk.state_dict()
    state = {
        "embeddings.patch_embedding.weight": trunk["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": trunk["patch_embed.proj.bias"],
        "embeddings.position_embedding.weight": trunk["pos_embed"][0],
        "post_layernorm.weight": trunk["norm.weight"],
        "post_layernorm.bias": trunk["norm.bias"],
        "head.probe": trunk["attn_pool.latent"],
        "head.attention.in_proj_weight": torch.cat([trunk["attn_pool.q.weight"], trunk["attn_pool.kv.weight"]]),
        "head.attention.in_proj_bias": torch.cat([trunk["attn_pool.q.bias"], trunk["attn_pool.kv.bias"]]),
        "head.attention.out_proj.weight": trunk["attn_pool.proj.weight"],
        "head.attention.out_proj.bias": trunk["attn_pool.proj.bias"],
        "head.layernorm.weight": trunk["attn_pool.norm.weight"],
        "head.layernorm.bias": trunk["attn_pool.norm.bias"],
        "head.mlp.fc1.weight": trunk["attn_pool.mlp.fc1.weight"],
        "head.mlp.fc1.bias": trunk["attn_pool.mlp.fc1.bias"],
        "head.mlp.fc2.weight": trunk["attn_pool.mlp.fc2.weight"],
        "head.mlp.fc2.bias": trunk["attn_pool.mlp.fc2.bias"],
    }
    for index in range(BLOCKS):
        state.update(_layer(trunk, f"blocks.{index}.", f"encoder.layers.{index}.", "attn.qkv", "attn.proj"))
    vision = {**_siglip_vision_config(), "image_size": IMAGE_SIZE}
    hf_model = SiglipModel(SiglipConfig(vision_config=vision, text_config=_siglip_text_config()))
    hf_model.vision_model.load_state_dict(state, strict=True)
    images = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return hf_model.eval(), SiglipProcessor(image_processor=images, tokenizer=word_tokenizer())


def hf_siglip2_from(siglip: SiglipModel, max_num_patches: int = 16) -> tuple[Siglip2Model, Siglip2Processor]:
    """A transformers ``Siglip2Model`` (NaFlex) with the weights of a ``SiglipModel`` (the patch convolution
    as the linear layer over the processor's ``(row, col, channel)`` patch vectors), and its processor."""
    vision = {**_siglip_vision_config(), "num_patches": (IMAGE_SIZE // PATCH_SIZE) ** 2}
    hf_model = Siglip2Model(Siglip2Config(vision_config=vision, text_config=_siglip_text_config()))
    state = dict(siglip.state_dict())
    convolution = state.pop("vision_model.embeddings.patch_embedding.weight")
    state["vision_model.embeddings.patch_embedding.weight"] = convolution.permute(0, 2, 3, 1).reshape(WIDTH, -1)
    state.pop("text_model.embeddings.position_ids", None)
    hf_model.load_state_dict(state, strict=False)
    images = Siglip2ImageProcessor(patch_size=PATCH_SIZE, max_num_patches=max_num_patches)
    return hf_model.eval(), Siglip2Processor(image_processor=images, tokenizer=word_tokenizer())
