"""LLaVA-1.5 (``LlavaForConditionalGeneration``, model_type ``llava``): one square grid of image tokens.

Layout: the prompt holds ``image_seq_length`` copies of the image token (one more when the vision
feature keeps CLS, dropped here), row-major over the ``image_size / patch_size`` square grid.
Geometry: the image is letterboxed onto the square input with the processor's mean colour (as
LLaVA-1.5's "pad" mode does) and the processor's resize and crop are switched off, so the one tile's
box is the square input mapped back to original-image pixels (it reaches past the image's short side).
Attention: Llama / Mistral / Qwen2 blocks, 1-D RoPE (``rope_project``).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration, PretrainedConfig

from api_tool.backends.lvlm_families.base import (
    FamilyAdapter,
    PreparedPrompt,
    Tile,
    check_plain_rotary_attention,
    image_processing_device,
    language_model_layers,
)
from api_tool.errors import ImageTokenError, UnsupportedModelError
from api_tool.geometry import Box, Letterbox

SUPPORTED_TEXT_MODELS: tuple[str, ...] = ("llama", "mistral", "qwen2")
SUPPORTED_VISION_MODELS: tuple[str, ...] = ("clip_vision_model", "siglip_vision_model")


def image_positions(input_ids: torch.Tensor, token_id: int, grid: tuple[int, int]) -> torch.Tensor:
    """Sequence positions of the image tokens that form the ``grid`` (row-major patches).

    A vision tower whose features keep the CLS token gives one extra leading image token, dropped
    here. Any other count raises ``ImageTokenError``.

    Example:
        >>> image_positions(torch.tensor([1, 9, 9, 9, 9, 2]), 9, (2, 2)).tolist()
        [1, 2, 3, 4]
    """
    positions = (input_ids == token_id).nonzero().flatten()
    cells = grid[0] * grid[1]
    if positions.numel() == cells + 1:
        positions = positions[1:]
    if positions.numel() != cells:
        raise ImageTokenError(
            f"the prompt holds {positions.numel()} image tokens (id {token_id}); the {grid[0]}x{grid[1]} "
            f"vision grid needs {cells} (or {cells + 1} with a CLS token). Is the image in the prompt, "
            "and do the processor's patch_size / num_additional_image_tokens match the model?"
        )
    return positions


def letterbox_tile_box(letterbox: Letterbox) -> Box:
    """The square model input in original-image pixels: where a letterboxed grid lies on the image.

    Example:
        >>> letterbox_tile_box(Letterbox.fit((200, 100), side=100))
        (0.0, -50.0, 200.0, 150.0)
    """
    width, height = letterbox.image_size
    scale_x, scale_y = letterbox.scaled_size[0] / width, letterbox.scaled_size[1] / height
    x0, y0 = -letterbox.offset[0] / scale_x, -letterbox.offset[1] / scale_y
    return (x0, y0, x0 + letterbox.side / scale_x, y0 + letterbox.side / scale_y)


def image_token_id(config: PretrainedConfig) -> int:
    """The id of the image placeholder token (``image_token_id``, formerly ``image_token_index``)."""
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = getattr(config, "image_token_index", None)
    if value is None:
        raise UnsupportedModelError("the model config names no image token id")
    return int(value)


def check_llava_config(config: PretrainedConfig) -> None:
    """Refuse, with ``UnsupportedModelError``, LLaVA configs whose towers this adapter does not know."""
    text_type = getattr(config.text_config, "model_type", None)
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise UnsupportedModelError(
            f"a {text_type!r} language model is not supported; supported: {', '.join(SUPPORTED_TEXT_MODELS)}"
        )
    vision_type = getattr(config.vision_config, "model_type", None)
    if vision_type not in SUPPORTED_VISION_MODELS:
        raise UnsupportedModelError(
            f"a {vision_type!r} vision tower is not supported; supported: {', '.join(SUPPORTED_VISION_MODELS)}"
        )


class LlavaFamily(FamilyAdapter):
    """The LLaVA-1.5 adapter (see the module docstring)."""

    name = "llava"
    continues_prompt_cache = True

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse anything but a ``LlavaForConditionalGeneration`` with known towers and a LLaVA processor."""
        if not isinstance(model, LlavaForConditionalGeneration):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not supported: the llava family needs a LlavaForConditionalGeneration"
            )
        check_llava_config(model.config)
        check_plain_rotary_attention(self.decoder_layers(model)[0].self_attn)
        missing = [name for name in ("tokenizer", "image_processor", "image_token") if not hasattr(processor, name)]
        if missing:
            raise UnsupportedModelError(
                f"{type(processor).__name__} lacks {', '.join(missing)}; pass the model's LlavaProcessor"
            )

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The language model's decoder blocks."""
        return language_model_layers(model)

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """Letterbox the image onto the square input, render the chat prompt, find the grid's tokens."""
        from api_tool.backends.lvlm import single_image_prompt

        vision = model.config.vision_config
        side = int(vision.image_size)
        grid = (side // int(vision.patch_size), side // int(vision.patch_size))
        letterbox = Letterbox.fit(image.size, side)
        text = single_image_prompt(processor, question)
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        fill = tuple(round(255 * float(m)) for m in mean)
        encoded = processor(
            images=letterbox.apply(image, fill),  # type: ignore[arg-type]
            text=text,
            return_tensors="pt",
            do_resize=False,
            do_center_crop=False,
            **image_processing_device(processor, model),
        )
        pixels = encoded["pixel_values"]
        if tuple(pixels.shape[-2:]) != (side, side):
            raise UnsupportedModelError(
                f"the processor produced {tuple(pixels.shape[-2:])} pixel inputs; the vision tower takes "
                f"{side}x{side} (tiled or any-resolution processors belong to other families)"
            )
        device = model.get_input_embeddings().weight.device
        inputs = {
            "input_ids": encoded["input_ids"].to(device),
            "attention_mask": encoded["attention_mask"].to(device),
            "pixel_values": pixels.to(device, model.dtype),
        }
        positions = image_positions(inputs["input_ids"][0], image_token_id(model.config), grid)
        tile = Tile(positions=positions, grid=grid, box=letterbox_tile_box(letterbox))
        return PreparedPrompt(inputs=inputs, text=text, tiles=(tile,))
