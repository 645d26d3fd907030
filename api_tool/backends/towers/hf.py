"""transformers dual encoders: ``CLIPModel`` (CLS token), ``SiglipModel`` and ``Siglip2Model`` (attention-pool
head), with their processors: loading (``hf:<hub id or directory>``), the image towers and the text side.

* ``CLIPModel``: ``pre_layrnorm``, encoder layers, ``post_layernorm`` on the CLS token, ``visual_projection``;
  images are letterboxed onto the square input with the image processor's mean and std.
* ``SiglipModel``: encoder layers, ``post_layernorm`` on every token, then the head: a probe attends over
  all tokens (``nn.MultiheadAttention``), ``x + mlp(layernorm(x))``; no projection. Letterboxed input.
* ``Siglip2Model`` (NaFlex): the same tower on a variable grid of patches. The image processor resizes
  each image to patch multiples close to its aspect ratio within ``max_num_patches`` (no crop, no
  padding), so the grid covers the whole (slightly stretched) image.

Queries are tokenised as each model was trained: SigLIP / SigLIP2 padded to ``max_length``, CLIP to the
longest query.

Example:
    >>> model, processor = load_hf_dual_encoder("google/siglip2-base-patch16-naflex")  # doctest: +SKIP
    >>> tower = HfSiglip2Tower(model, processor)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from api_tool.backends.hub import resolve_source
from api_tool.backends.psi import Affine, AttentionWeights
from api_tool.backends.towers.base import (
    ClsPooling,
    LetterboxInput,
    PreparedImage,
    ProbePooling,
    VisionTower,
    affine_of,
    check_layer_norm,
    square_side,
    unsupported,
)
from api_tool.errors import UnknownModelError, WeightsUnavailableError
from api_tool.geometry import full_grid_box

HF_PREFIX = "hf:"
HF_MODEL_TYPES = ("clip", "siglip", "siglip2")
"""``config.model_type`` of the dual encoders this module decomposes."""
SIGLIP_TYPES = ("siglip", "siglip2")


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` output: a tensor (transformers 4) or a ``BaseModelOutputWithPooling`` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hf_attention(attention: Any, where: str) -> AttentionWeights:
    """The projections of a transformers CLIP / SigLIP attention (separate q, k, v and out projections)."""
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        if not isinstance(getattr(attention, name, None), torch.nn.Linear):
            raise unsupported(f"{where} has no {name} projection ({type(attention).__name__})")
    weights = AttentionWeights.from_in_proj(
        torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
        torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]),
        attention.out_proj.weight,
        attention.out_proj.bias,
        attention.num_heads,
    )
    return replace(weights, scale=float(attention.scale))


class _HfTower(VisionTower):
    """What the transformers towers share: encoder layers with ``layer_norm1`` and ``self_attn``, and (for
    a fixed square input) the letterbox."""

    model_type: ClassVar[str]

    def __init__(self, model: Any, processor: Any = None, model_name: str = "model") -> None:
        super().__init__()
        self.model = model
        self.module = model.vision_model
        self.blocks = self.module.encoder.layers
        self.image_processor = getattr(processor, "image_processor", None)
        if self.image_processor is None:
            raise unsupported(
                f"{model_name}: a {type(model).__name__} needs its processor, got {type(processor).__name__}"
            )
        self.width = int(model.config.vision_config.hidden_size)
        self.patch = int(model.config.vision_config.patch_size)

    @classmethod
    def accepts(cls, model: object) -> bool:
        return is_hf_model(model) and getattr(model.config, "model_type", None) == cls.model_type  # type: ignore[attr-defined]

    def prepare(self, image: Image.Image) -> PreparedImage:
        assert self.input is not None
        side = self.input.side // self.patch
        return self.input.prepare(image, (side, side))

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.input is not None
        pixels = self.input.normalize(inputs["pixels"]).to(self._dtype())
        return _features(self.model.get_image_features(pixel_values=pixels))

    def block_norm(self, block: torch.nn.Module) -> torch.nn.LayerNorm:
        return check_layer_norm(block.layer_norm1, "layer_norm1")

    def block_attention(self, block: torch.nn.Module) -> AttentionWeights:
        return hf_attention(block.self_attn, "the encoder layer's attention")

    def _letterbox_input(self) -> LetterboxInput:
        side = square_side(self.model.config.vision_config.image_size)
        mean = tuple(float(v) for v in self.image_processor.image_mean)
        std = tuple(float(v) for v in self.image_processor.image_std)
        return LetterboxInput(side, mean, std)  # type: ignore[arg-type]

    def _probe(self) -> ProbePooling:
        vision = self.module
        if not getattr(vision, "use_head", True) or getattr(vision, "head", None) is None:
            raise unsupported(f"{type(self.model).__name__} has no attention-pool head (vision_use_head=False)")
        head = vision.head
        return ProbePooling(
            query=head.probe[0, 0],
            attention=AttentionWeights.from_multihead(head.attention),
            token_norm=check_layer_norm(vision.post_layernorm, "post_layernorm"),
            head=Affine.identity(self.width, head.probe.dtype, head.probe.device),
            branch=torch.nn.Sequential(check_layer_norm(head.layernorm, "the head's layernorm"), head.mlp),
        )

    def _dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


class HfClipTower(_HfTower):
    """transformers ``CLIPModel``."""

    family: ClassVar[str] = "hf_clip"
    model_type: ClassVar[str] = "clip"

    def __init__(self, model: Any, processor: Any = None, model_name: str = "model") -> None:
        super().__init__(model, processor, model_name)
        self.prefix_tokens = 1
        self.input = self._letterbox_input()
        final_norm = check_layer_norm(self.module.post_layernorm, "post_layernorm")
        self.pooling = ClsPooling(final_norm, affine_of([model.visual_projection], self.width))


class HfSiglipTower(_HfTower):
    """transformers ``SiglipModel`` (fixed square input)."""

    family: ClassVar[str] = "hf_siglip"
    model_type: ClassVar[str] = "siglip"

    def __init__(self, model: Any, processor: Any = None, model_name: str = "model") -> None:
        super().__init__(model, processor, model_name)
        self.prefix_tokens = 0
        self.input = self._letterbox_input()
        self.pooling = self._probe()


class HfSiglip2Tower(_HfTower):
    """transformers ``Siglip2Model`` (NaFlex: a grid per image, see the module docstring)."""

    family: ClassVar[str] = "hf_siglip2"
    model_type: ClassVar[str] = "siglip2"

    def __init__(self, model: Any, processor: Any = None, model_name: str = "model") -> None:
        super().__init__(model, processor, model_name)
        self.prefix_tokens = 0
        self.pooling = self._probe()

    def prepare(self, image: Image.Image) -> PreparedImage:
        encoded = self.image_processor(images=[image], return_tensors="pt")
        rows, cols = (int(v) for v in encoded["spatial_shapes"][0])
        patches = rows * cols  # the processor pads to max_num_patches; the padding is left out
        inputs = {
            "pixel_values": encoded["pixel_values"][:, :patches],
            "pixel_attention_mask": encoded["pixel_attention_mask"][:, :patches],
            "spatial_shapes": encoded["spatial_shapes"],
        }
        return PreparedImage(inputs, (rows, cols), full_grid_box((rows, cols)))

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        pixel_values = inputs["pixel_values"].to(self._dtype())
        return _features(
            self.model.get_image_features(
                pixel_values=pixel_values,
                pixel_attention_mask=inputs["pixel_attention_mask"],
                spatial_shapes=inputs["spatial_shapes"],
            )
        )


def is_hf_model(model: object) -> bool:
    """Whether ``model`` is a transformers model (rather than an open_clip one)."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def hf_text_embeddings(model: Any, processor: Any, texts: Sequence[str], device: torch.device) -> torch.Tensor:
    """The unnormalised text embeddings ``(Q, E)`` of raw queries, tokenised as the model was trained."""
    tokenizer = getattr(processor, "tokenizer", processor)
    text_config = model.config.text_config
    siglip = model.config.model_type in SIGLIP_TYPES
    encoded = tokenizer(
        list(texts),
        padding="max_length" if siglip else True,
        max_length=int(text_config.max_position_embeddings),
        truncation=True,
        return_tensors="pt",
    )
    inputs = {name: encoded[name].to(device) for name in ("input_ids", "attention_mask") if name in encoded}
    return _features(model.get_text_features(**inputs))


def load_hf_dual_encoder(source: str) -> tuple[Any, Any]:
    """A transformers ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` and its processor from a hub id
    or a ``save_pretrained`` directory. The config is checked before any weights load; offline, a hub id
    missing from the cache fails within seconds with ``WeightsUnavailableError``."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    where, local_only = resolve_source(source, example_id="google/siglip2-base-patch16-naflex")
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=local_only)
        if config.model_type not in HF_MODEL_TYPES:
            architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
            raise unsupported(f"{source}: {architecture} (model_type {config.model_type!r}) is not a dual encoder")
        model = AutoModel.from_pretrained(where, local_files_only=local_only)
        processor = AutoProcessor.from_pretrained(where, local_files_only=local_only)
    except OSError as exc:
        if not Path(where).is_dir():
            raise WeightsUnavailableError(f"{source}: the local Hugging Face cache is incomplete ({exc})") from exc
        raise UnknownModelError(f"cannot load a model and processor from {where!r}: {exc}") from exc
    return model.eval(), processor
