"""Small models with random weights for tests: fast to build (well under a second), offline.

Example:
    >>> tiny = tiny_llava(tmp_path)  # doctest: +SKIP
    >>> LlavaAttributor(model=tiny.directory, layer=0, device="cpu")  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from api_tool.demo.tiny_llava import build_tiny_llava, build_tiny_llava_processor, save_tiny_llava
from tests.tiny_lvlms import suppress_special_tokens

TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8


@dataclass(frozen=True)
class TinyLlava:
    """A tiny LLaVA, its processor, and the directory it was saved to (``None`` if not saved)."""

    model: LlavaForConditionalGeneration
    processor: LlavaProcessor
    directory: Path | None


def tiny_llava(
    directory: Path | None = None,
    *,
    layers: int = 2,
    seed: int = 0,
    image_size: int = TINY_IMAGE_SIZE,
    patch_size: int = TINY_PATCH_SIZE,
) -> TinyLlava:
    """A tiny LLaVA (8 x 8 grid of image tokens by default; Llama with 4 heads over 2 KV heads).

    With ``directory`` the model and processor are also saved there (``LlavaAttributor(model=dir)``).
    """
    processor = build_tiny_llava_processor(image_size=image_size, patch_size=patch_size)
    model = build_tiny_llava(processor, layers=layers, seed=seed)
    suppress_special_tokens(model, processor.tokenizer)
    saved = save_tiny_llava(model, processor, directory) if directory is not None else None
    return TinyLlava(model=model, processor=processor, directory=saved)


@torch.no_grad()
def attend_to_bright_patches(model: LlavaForConditionalGeneration, layer: int = 0) -> None:
    """Rewire ``model`` in place so that, at decoder block ``layer`` (must be 0), every text query
    attends to the image tokens of bright patches and ignores dark ones.

    The construction, end to end through the real pixel path:

    * vision tower: the patch embedding puts a patch's mean normalised value minus 0.5 in channel 0
      (all other channels and the position embeddings zero), the encoder layers add nothing, and
      the pre-LayerNorm turns channel 0's sign into a fixed vector ``+u`` (bright) or ``-u`` (dark);
    * projector: ``gelu(4 u . x)`` in text channel 0, so bright patches carry a large value there and
      dark ones (and the letterbox padding, at the mean colour) carry zero;
    * block 0's keys read text channel 0 and its queries read channel 1, which every token
      embedding sets to a large constant; both use the slowest rotary pair, so positions barely
      rotate them. Image keys of bright patches score about +16, dark ones 0.
    """
    if layer != 0:
        raise ValueError("the construction acts on the input of decoder block 0")
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    embeddings = vision.embeddings
    patch = embeddings.patch_embedding
    patch.weight.zero_()
    patch.weight[0] = 1.0 / (patch.weight.shape[1] * patch.weight.shape[2] * patch.weight.shape[3])
    embeddings.position_embedding.weight.zero_()
    embeddings.position_embedding.weight[:, 0] = -0.5
    embeddings.class_embedding.zero_()
    vision.pre_layrnorm.weight.fill_(1.0)
    vision.pre_layrnorm.bias.zero_()
    for block in vision.encoder.layers:
        for linear in (block.self_attn.out_proj, block.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    projector = model.model.multi_modal_projector
    projector.linear_1.weight.zero_()
    projector.linear_1.bias.zero_()
    projector.linear_1.weight[0, 0] = 4.0
    projector.linear_2.weight.copy_(torch.eye(projector.linear_2.weight.shape[0]))
    projector.linear_2.bias.zero_()

    language_model = model.model.language_model
    language_model.embed_tokens.weight[:, 1] = 10.0
    block = language_model.layers[layer]
    block.input_layernorm.weight.fill_(1.0)
    reward_feature_zero(block.self_attn)


@torch.no_grad()
def reward_feature_zero(attention: torch.nn.Module) -> None:
    """Make one attention block score a key by its hidden feature 0, for every query whose feature 1 is a
    large constant: keys read feature 0 and queries feature 1, both on the slowest-rotating rotary pair of
    every head, so positions barely rotate them. The family-specific plantings route image brightness into
    feature 0 and set feature 1 in every token embedding."""
    head_dim = int(attention.head_dim)
    slow_pair = head_dim // 2 - 1
    for linear in (attention.q_proj, attention.k_proj):
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()
    for kv_head in range(attention.k_proj.weight.shape[0] // head_dim):
        attention.k_proj.weight[kv_head * head_dim + slow_pair, 0] = 1.0
    for head in range(attention.q_proj.weight.shape[0] // head_dim):
        attention.q_proj.weight[head * head_dim + slow_pair, 1] = 1.0


def bright_square_image(
    size: tuple[int, int], square: tuple[int, int, int, int], background: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """An RGB image of ``size = (width, height)``, dark, with a white ``square = (x0, y0, x1, y1)``."""
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).rectangle((square[0], square[1], square[2] - 1, square[3] - 1), fill=(255, 255, 255))
    return image
