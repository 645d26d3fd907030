"""InternVL (transformers' own ``InternVLForConditionalGeneration``, model_type ``internvl``): dynamic tiles.

The HF-native class (``OpenGVLab/InternVL3-*-hf``, ``InternVL2_5-*-hf``...), not the remote-code
``InternVLChatModel``. Everything below follows transformers 5.24's ``InternVLProcessor``,
``GotOcr2ImageProcessor.crop_image_to_patches`` and ``InternVLModel.get_image_features`` / ``pixel_shuffle``.

Tiles (``crop_to_patches``, which ``InternVLProcessor`` switches on for images): the image processor picks a
grid of ``cols x rows`` square tiles of side ``S`` (``image_processor.size``, 448 px in the real models) among
the grids with ``min_patches <= cols * rows <= max_patches`` (1 and 12 by default) whose aspect ratio
``cols / rows`` is closest to the image's ``width / height`` (ties go to the larger grid while the image's
area exceeds half the grid's, ``get_optimal_tiled_canvas``). The whole image is resized -- *stretched*, its
aspect ratio not kept -- to ``cols * S x rows * S`` and cut into tiles row-major (tile ``i`` is at row
``i // cols``, column ``i % cols``); when there is more than one tile, a thumbnail (the whole image stretched to
``S x S``) comes last. So tile ``(row, col)`` covers exactly the original-image box
``(col * W / cols, row * H / rows, (col + 1) * W / cols, (row + 1) * H / rows)`` and the thumbnail covers
``(0, 0, W, H)``: the boxes are fractions of the original image, nothing is cropped or padded, and no
letterboxing is needed for the map to align with the original image. (Cells are not square in original pixels
when the stretch is anisotropic; ``Tile.box`` carries that.)

Tokens: the prompt's one ``<IMG_CONTEXT>`` placeholder becomes ``<img>``, then ``image_seq_length`` (256)
``<IMG_CONTEXT>`` tokens per tile, tile after tile in the order above (thumbnail last), then ``</img>`` -- one
``<img> ... </img>`` pair around all tiles, no separators or newlines between tiles or rows. Within a tile the
vision tower gives ``P x P`` patches row-major (``P = S / patch_size``, 32 for 448 / 14), CLS dropped
(``vision_feature_select_strategy="default"``); the pixel shuffle with ``downsample_ratio = r`` (0.5) merges
each ``1/r x 1/r`` block of patches into one token, and its view / permute / view / permute sequence leaves the
``(r P) x (r P)`` tokens row-major as well: token ``k`` of a tile is cell ``(k // (r P), k % (r P))`` and holds
patches ``(k // (r P)) / r + i, (k % (r P)) / r + j`` for ``i, j < 1/r`` (``pixel_shuffle_patches``). So every
tile is a ``16 x 16`` grid (for 448 px tiles) of which cell ``(row, col)`` covers the tile's box split evenly.

Attention: Qwen2 blocks (InternVL2.5 / 3) and Llama blocks (InternLM2-based checkpoints converted to Llama):
1-D RoPE with the ``(cos, sin)`` the block received; Qwen3 blocks (InternVL3.5) also: their per-head RMS q/k
norms are applied with the block's own ``q_norm`` / ``k_norm`` modules before RoPE, as the block does. Other
text models (GPT-OSS's sinks and sliding windows...) are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from api_tool.backends.lvlm_families.base import (
    FamilyAdapter,
    PreparedPrompt,
    Tile,
    image_processing_device,
    language_model_layers,
)
from api_tool.errors import ImageTokenError, UnsupportedModelError
from api_tool.geometry import Box

SUPPORTED_TEXT_MODELS: tuple[str, ...] = ("qwen2", "qwen3", "llama")
QK_NORM_TEXT_MODELS: tuple[str, ...] = ("qwen3",)
"""Text models whose attention applies RMS norms to each head's queries and keys before RoPE (replicated)."""
SUPPORTED_VISION_MODELS: tuple[str, ...] = ("internvl_vision",)
CHATML_PROMPT = "<|im_start|>user\n{image}\n{query}<|im_end|>\n<|im_start|>assistant\n"
"""InternVL-HF's chat format, used when the processor has no chat template."""


# ----------------------------------------------------------------------------------------------
# Geometry and token layout: small pure functions.
# ----------------------------------------------------------------------------------------------


def tokens_per_side(tile_side: int, patch_size: int, downsample_ratio: float) -> int:
    """Side of one tile's token grid: ``tile_side / patch_size`` patches, merged ``1/r`` at a time.

    Example:
        >>> tokens_per_side(448, 14, 0.5)
        16
    """
    merge = round(1 / downsample_ratio)
    if abs(merge * downsample_ratio - 1) > 1e-9:
        raise UnsupportedModelError(f"downsample_ratio {downsample_ratio} is not 1 / an integer")
    patches, remainder = divmod(tile_side, patch_size)
    if remainder or patches % merge:
        raise UnsupportedModelError(
            f"{tile_side} px tiles in {patch_size} px patches do not shuffle evenly by {downsample_ratio}"
        )
    return patches // merge


def pixel_shuffle_patches(patches_per_side: int, downsample_ratio: float) -> torch.Tensor:
    """Which vision patches each image token of a tile holds after ``InternVLModel.pixel_shuffle``.

    Returns ``(tokens, merge * merge, 2)``: for token ``k`` (row-major over the ``(r P) x (r P)`` token grid) the
    ``(row, col)`` of the patch in each of its ``merge * merge`` channel groups, in channel order. Token ``k`` is
    cell ``(k // (r P), k % (r P))`` and holds the ``merge x merge`` block of patches under that cell, row-major.

    Example:
        >>> pixel_shuffle_patches(4, 0.5)[1].tolist()  # token 1 = cell (0, 1)
        [[0, 2], [0, 3], [1, 2], [1, 3]]
    """
    merge = round(1 / downsample_ratio)
    side = patches_per_side // merge
    cell_row = torch.arange(side).repeat_interleave(side)
    cell_col = torch.arange(side).repeat(side)
    offset_row = torch.arange(merge).repeat_interleave(merge)
    offset_col = torch.arange(merge).repeat(merge)
    rows = cell_row[:, None] * merge + offset_row[None]
    cols = cell_col[:, None] * merge + offset_col[None]
    return torch.stack([rows, cols], dim=-1)


def tile_grid(image_size: tuple[int, int], tile_side: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """``(rows, cols)`` of the tiles ``GotOcr2ImageProcessor.crop_image_to_patches`` cuts an image of
    ``image_size = (width, height)`` into (the aspect-ratio rule in the module docstring).

    Example:
        >>> tile_grid((800, 400), 448, 1, 12)
        (1, 2)
        >>> tile_grid((300, 900), 448, 1, 12)
        (3, 1)
    """
    width, height = image_size
    cols, rows = get_optimal_tiled_canvas((height, width), (tile_side, tile_side), min_tiles, max_tiles)
    return int(rows), int(cols)


def tile_boxes(image_size: tuple[int, int], grid: tuple[int, int]) -> list[Box]:
    """Original-image boxes of the tiles of a ``(rows, cols)`` grid, row-major, then the thumbnail (the whole
    image) when there is more than one tile. The image is stretched onto the grid, so the boxes split it evenly.

    Example:
        >>> tile_boxes((300, 100), (1, 2))
        [(0.0, 0.0, 150.0, 100.0), (150.0, 0.0, 300.0, 100.0), (0.0, 0.0, 300.0, 100.0)]
        >>> tile_boxes((300, 100), (1, 1))
        [(0.0, 0.0, 300.0, 100.0)]
    """
    width, height = image_size
    rows, cols = grid
    boxes: list[Box] = [
        (col * width / cols, row * height / rows, (col + 1) * width / cols, (row + 1) * height / rows)
        for row in range(rows)
        for col in range(cols)
    ]
    if len(boxes) > 1:
        boxes.append((0.0, 0.0, float(width), float(height)))
    return boxes


def image_tiles(
    input_ids: torch.Tensor, image_token_id: int, boxes: list[Box], token_grid: tuple[int, int]
) -> tuple[Tile, ...]:
    """Split the prompt's ``<IMG_CONTEXT>`` positions into one ``Tile`` per box (``token_grid`` tokens each).

    Raises ``ImageTokenError`` unless the prompt holds exactly ``len(boxes) * rows * cols`` image tokens.

    Example:
        >>> ids = torch.tensor([7, 8, 9, 9, 9, 9, 9, 9, 9, 9, 6])
        >>> tiles = image_tiles(ids, 9, [(0, 0, 1, 1), (0, 0, 2, 2)], (2, 2))
        >>> [tile.positions.tolist() for tile in tiles]
        [[2, 3, 4, 5], [6, 7, 8, 9]]
    """
    positions = (input_ids == image_token_id).nonzero().flatten()
    per_tile = token_grid[0] * token_grid[1]
    if positions.numel() != per_tile * len(boxes):
        raise ImageTokenError(
            f"the prompt holds {positions.numel()} image tokens (id {image_token_id}); {len(boxes)} tiles of "
            f"{token_grid[0]}x{token_grid[1]} need {per_tile * len(boxes)}. Is the image in the prompt once, and "
            "do the processor's image_seq_length and tile size match the model?"
        )
    return tuple(
        Tile(positions=positions[index * per_tile : (index + 1) * per_tile], grid=token_grid, box=box)
        for index, box in enumerate(boxes)
    )


def sliding_window_limit(layers: torch.nn.ModuleList) -> int | None:
    """The shortest sliding attention window of any block (``None`` when every block attends globally)."""
    windows = [int(w) for layer in layers if (w := getattr(layer.self_attn, "sliding_window", None))]
    return min(windows) if windows else None


# ----------------------------------------------------------------------------------------------
# The adapter.
# ----------------------------------------------------------------------------------------------


def _conversation(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class InternVLFamily(FamilyAdapter):
    """The InternVL adapter (see the module docstring): dynamic tiles + thumbnail, pixel-shuffled token grids.

    Args:
        max_tiles: cap on the number of tiles (``max_patches``); ``None`` keeps the image processor's (12 in the
            real models; each tile costs 256 tokens). The thumbnail comes on top when there is more than one tile.
    """

    name = "internvl"

    def __init__(self, max_tiles: int | None = None) -> None:
        if max_tiles is not None and (isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 1):
            raise ValueError(f"max_tiles must be a positive integer or None, got {max_tiles!r}")
        self.max_tiles = max_tiles

    # -- checks --------------------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse what cannot be attributed exactly: another class (the remote-code ``InternVLChatModel``
        included), an unknown text model, q/k norms other than Qwen3's, CLS kept in the vision features,
        M-RoPE, a processor whose tiles or token counts do not match the model."""
        if not isinstance(model, InternVLForConditionalGeneration):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not supported: the internvl family needs transformers' "
                "InternVLForConditionalGeneration (the '-hf' checkpoints), not the remote-code InternVLChatModel"
            )
        config = model.config
        text_type = getattr(config.text_config, "model_type", None)
        if text_type not in SUPPORTED_TEXT_MODELS:
            raise UnsupportedModelError(
                f"an InternVL with a {text_type!r} language model is not supported; supported: "
                f"{', '.join(SUPPORTED_TEXT_MODELS)}"
            )
        vision_type = getattr(config.vision_config, "model_type", None)
        if vision_type not in SUPPORTED_VISION_MODELS:
            raise UnsupportedModelError(f"an InternVL with a {vision_type!r} vision tower is not supported")
        if getattr(config, "vision_feature_select_strategy", "default") != "default":
            raise UnsupportedModelError(
                "vision_feature_select_strategy must be 'default' (CLS dropped): with CLS kept the features "
                "do not form the square patch grid the pixel shuffle needs"
            )
        rope = getattr(config.text_config, "rope_parameters", None) or getattr(config.text_config, "rope_scaling", None)
        if isinstance(rope, dict) and "mrope_section" in rope:
            raise UnsupportedModelError("multimodal (3-D) RoPE is not supported by the internvl family")
        for layer in self.decoder_layers(model):
            self._check_attention(layer.self_attn, text_type)
        self._check_processor(model, processor)

    @staticmethod
    def _check_attention(attention: torch.nn.Module, text_type: str) -> None:
        missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
        norms = [name for name in ("q_norm", "k_norm") if getattr(attention, name, None) is not None]
        if missing or (norms and (text_type not in QK_NORM_TEXT_MODELS or len(norms) != 2)):
            raise UnsupportedModelError(
                f"{type(attention).__name__} is not a rotary attention layer whose scores can be recomputed "
                f"(missing {missing}, q/k norms {norms} on a {text_type!r} model)"
            )

    @staticmethod
    def _check_processor(model: torch.nn.Module, processor: Any) -> None:
        missing = [
            name
            for name in ("tokenizer", "image_processor", "image_token", "image_seq_length")
            if not hasattr(processor, name)
        ]
        image_processor = getattr(processor, "image_processor", None)
        if not missing:
            missing = [
                name
                for name in ("size", "min_patches", "max_patches", "crop_image_to_patches")
                if not hasattr(image_processor, name)
            ]
        if missing:
            raise UnsupportedModelError(
                f"{type(processor).__name__} lacks {', '.join(missing)}; pass the model's InternVLProcessor "
                "(with its GotOcr2 image processor)"
            )
        config = model.config
        vision = config.vision_config
        side = _square(vision.image_size, "the vision tower's image_size")
        size = image_processor.size
        tile = _square((size["height"], size["width"]), "the image processor's tile size")
        if tile != side:
            raise UnsupportedModelError(
                f"the image processor cuts {tile} px tiles but the vision tower takes {side} px images"
            )
        grid = tokens_per_side(side, _square(vision.patch_size, "patch_size"), float(config.downsample_ratio))
        if int(processor.image_seq_length) != grid * grid:
            raise UnsupportedModelError(
                f"the processor puts {processor.image_seq_length} image tokens per tile; the model makes {grid * grid}"
            )
        token_id = getattr(processor, "image_token_id", None)
        if token_id is not None and int(token_id) != int(config.image_token_id):
            raise UnsupportedModelError(
                f"the processor's image token id {token_id} differs from the model's {config.image_token_id}"
            )

    # -- the contract --------------------------------------------------------------------------

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The language model's decoder blocks (``model.model.language_model.layers``)."""
        return language_model_layers(model)

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """Render the chat prompt, let the processor tile the image, and find each tile's tokens and box."""
        config = model.config
        image_processor = processor.image_processor
        side = _square(config.vision_config.image_size, "the vision tower's image_size")
        min_tiles = int(image_processor.min_patches)
        max_tiles = int(self.max_tiles if self.max_tiles is not None else image_processor.max_patches)
        min_tiles = min(min_tiles, max_tiles)
        grid = tile_grid(image.size, side, min_tiles, max_tiles)
        boxes = tile_boxes(image.size, grid)
        text = self.prompt_text(processor, question)
        encoded = processor(
            images=image.convert("RGB"),
            text=text,
            return_tensors="pt",
            crop_to_patches=True,
            min_patches=min_tiles,
            max_patches=max_tiles,
            **image_processing_device(processor, model),
        )
        pixels = encoded["pixel_values"]
        if pixels.shape[0] != len(boxes) or tuple(pixels.shape[-2:]) != (side, side):
            raise UnsupportedModelError(
                f"the processor produced pixel inputs of shape {tuple(pixels.shape)}; the {grid[0]}x{grid[1]} tile "
                f"grid (+ thumbnail) of a {image.size[0]}x{image.size[1]} image needs {len(boxes)} tiles of {side} px"
            )
        device = model.get_input_embeddings().weight.device
        inputs = {
            "input_ids": encoded["input_ids"].to(device),
            "attention_mask": encoded["attention_mask"].to(device),
            "pixel_values": pixels.to(device, model.dtype),
        }
        vision = config.vision_config
        per_side = tokens_per_side(side, _square(vision.patch_size, "patch_size"), float(config.downsample_ratio))
        tiles = image_tiles(inputs["input_ids"][0], int(config.image_token_id), boxes, (per_side, per_side))
        limit = sliding_window_limit(self.decoder_layers(model))
        if limit is not None and inputs["input_ids"].shape[1] > limit:
            raise UnsupportedModelError(
                f"the prompt ({inputs['input_ids'].shape[1]} tokens) exceeds the language model's sliding window "
                f"({limit}); pass fewer tiles (max_tiles)"
            )
        return PreparedPrompt(inputs=inputs, text=text, tiles=tiles)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def prompt_text(processor: Any, question: str) -> str:
        """The generation prompt: the chat template over ``[image, question]`` with the assistant turn opened
        (InternVL-HF's ChatML when the processor has no template). It must hold one image placeholder."""
        if getattr(processor, "chat_template", None):
            text = str(processor.apply_chat_template(_conversation(question), add_generation_prompt=True))
        else:
            text = CHATML_PROMPT.format(image=processor.image_token, query=question)
        count = text.count(processor.image_token)
        if count != 1:
            raise ImageTokenError(
                f"the rendered prompt holds {count} {processor.image_token!r} placeholders, expected exactly one; "
                f"check the processor's chat template: {text!r}"
            )
        return text


def _square(value: Any, what: str) -> int:
    """The side of a square size given as an int or a ``(height, width)`` pair."""
    if isinstance(value, (list, tuple)):
        height, width = (int(v) for v in value)
        if height != width:
            raise UnsupportedModelError(f"{what} is {height}x{width}; the internvl family needs square tiles")
        return height
    return int(value)
