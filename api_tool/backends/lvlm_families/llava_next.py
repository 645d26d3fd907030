"""LLaVA-NeXT and LLaVA-OneVision: any-resolution images, a base view plus one stitched high-resolution grid.

Families: ``LlavaNextForConditionalGeneration`` (model_type ``llava_next``, LLaVA-1.6) and
``LlavaOnevisionForConditionalGeneration`` (model_type ``llava_onevision``), with Llama / Mistral / Qwen2
language models (1-D RoPE, as LLaVA-1.5). Both share transformers' (5.x) any-resolution layout; they
differ in the vision tower they usually carry (CLIP with CLS, read with the ``default`` strategy, vs.
SigLIP without, read ``full``) and in OneVision's pooling of large high-resolution grids.

Notation: the original image is ``W x H`` pixels; the vision tower takes ``S x S`` crops cut into
``P x P`` patches, so one crop gives a ``g x g`` feature grid with ``g = S // P`` (covering the crop's
top-left ``g * P`` pixels: all of it for CLIP-336/14, 378 of 384 for SigLIP-384/14).

Image-token layout (one ``<image>`` placeholder, expanded by the processor into contiguous tokens)::

    [ base: g * g tokens, row-major ]  [ high-res: rows x (cols + 1) tokens: each row's cols cells, then image_newline ]

* **base** (``pixel_values[:, 0]``): the whole image *stretched* (not letterboxed) to ``S x S``, so its
  ``g x g`` grid covers the original box ``(0, 0, W * gP / S, H * gP / S)`` -- the whole image when
  ``S`` is a multiple of ``P``. No newline token follows it.
* **high resolution** (``pixel_values[:, 1:]``): ``select_best_resolution((H, W), image_grid_pinpoints)``
  picks a canvas ``bh x bw`` (multiples of ``S``: ``tr x tc`` crops). The image is resized keeping its
  aspect ratio to ``(new_w, new_h)`` (``get_patch_output_size``: the fitted side exactly, the other
  ``ceil``-ed), pasted at ``((bw - new_w) // 2, (bh - new_h) // 2)`` on a black canvas and cut into the
  crops, row-major. ``pack_image_features`` stitches the crops' features into one ``tr*g x tc*g`` grid
  (feature ``i`` along an axis covers canvas pixels ``(i // g) * S + (i % g) * P`` to ``+ P``), then
  ``unpad_image`` keeps rows ``[r0, r1)`` x cols ``[c0, c1)``: along the padded axis it drops
  ``(tr*g - int(round(H * tc*g / W, 7))) // 2`` features at each end (rows of a wide image; columns of a
  tall one likewise), a feature-level rounding of the pixel padding, so the kept grid can reach a little
  past the image or stop a little short of it.
  OneVision (``vision_aspect_ratio = "anyres_max_N"``) then bilinearly resizes that grid to
  ``(int(h // r), int(w // r))`` when ``r = sqrt(h * w / (N * g * g)) > 1.1``; the resized grid spans the
  same region. Each row is followed by one ``image_newline`` token (excluded from every tile).

Tiles and boxes (original-image pixels, exact): the base grid is one ``Tile``; the high-resolution grid
is one ``Tile`` whose box is the kept feature rows / columns mapped canvas -> image
(``x = (canvas_x - paste_x) * W / new_w``). When ``S`` is not a multiple of ``P`` (SigLIP-384/14) the
crops' features leave a ``S - gP`` pixel gap at every crop seam, so a uniform grid over the whole box
would be off by up to that gap; the high-resolution grid is then split at the crop seams into one
``Tile`` per crop (each uniform, each exact). Only a OneVision grid that was both resized and has such
gaps is laid as one tile spanning the kept features (its cells are bilinear mixes anyway; the error is
below ``S - gP`` canvas pixels).

Attention: ``q_proj`` / ``k_proj`` and 1-D RoPE with the block's own ``(cos, sin)``
(``base.rope_project``); layers with q/k norms are refused. Nothing here changes how the model runs:
``prepare`` feeds the original image to the family's own processor (no letterbox needed: the base view
is a pure stretch and the high-resolution geometry is computed exactly as above).

Example:
    >>> layout = anyres_layout((90, 40), side=32, patch=8, pinpoints=[[32, 64], [64, 32], [64, 64]])
    >>> layout.tile_grid, layout.rows, layout.cols, layout.grid, layout.num_tokens
    ((1, 2), (0, 4), (0, 8), (4, 8), 52)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from api_tool.backends.lvlm_families.base import (
    FamilyAdapter,
    PreparedPrompt,
    Tile,
    check_plain_rotary_attention,
    image_processing_device,
    language_model_layers,
)
from api_tool.backends.lvlm_families.llava import check_llava_config, image_token_id
from api_tool.errors import ImageTokenError, UnsupportedModelError
from api_tool.geometry import Box

VISION_TOKENS_PER_CROP_EXTRA = {"clip_vision_model": 1, "siglip_vision_model": 0}
"""Tokens a vision tower puts before its patch tokens (CLIP's CLS)."""
POOLING_THRESHOLD = 1.1
"""OneVision resizes a high-resolution grid whose side ratio to ``sqrt(N) * g`` exceeds this."""

Span = tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Geometry: small pure functions (sizes are (width, height) unless named otherwise).
# ----------------------------------------------------------------------------------------------


def canvas_placement(image_size: tuple[int, int], best_resolution: tuple[int, int]) -> tuple[Span, Span]:
    """``((new_w, new_h), (paste_x, paste_y))``: the resized image and its offset on the ``(bh, bw)``
    canvas, as the image processor's ``_resize_for_patching`` / ``_pad_for_patching`` make them.

    Example:
        >>> canvas_placement((90, 40), (32, 64))
        ((64, 29), (0, 1))
    """
    width, height = image_size
    target_height, target_width = best_resolution
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_height, new_width = target_height, min(math.ceil(width * scale_h), target_width)
    return (new_width, new_height), ((target_width - new_width) // 2, (target_height - new_height) // 2)


def unpadded_span(image_size: tuple[int, int], feature_shape: tuple[int, int]) -> tuple[Span, Span]:
    """``((r0, r1), (c0, c1))``: the feature rows and columns ``unpad_image`` keeps of a ``(rows, cols)``
    stitched grid for an image of ``image_size = (W, H)`` (same float arithmetic, same truncation).

    Example:
        >>> unpadded_span((100, 40), (8, 8))
        ((2, 6), (0, 8))
    """
    width, height = image_size
    rows, cols = feature_shape
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        padding = (rows - new_height) // 2
        return (padding, rows - padding), (0, cols)
    new_width = int(round(width * (rows / height), 7))
    padding = (cols - new_width) // 2
    return (0, rows), (padding, cols - padding)


def pooled_grid(shape: tuple[int, int], cells: int, max_patches: int | None) -> tuple[int, int]:
    """The high-resolution grid after OneVision's ``anyres_max_N`` resize (unchanged for LLaVA-NeXT,
    ``max_patches=None``, or when the ratio is at most ``POOLING_THRESHOLD``).

    Example:
        >>> pooled_grid((8, 12), 4, 1), pooled_grid((8, 12), 4, 9), pooled_grid((8, 12), 4, None)
        ((3, 4), (8, 12), (8, 12))
    """
    if max_patches is None:
        return shape
    height, width = shape
    ratio = math.sqrt(height * width / (max_patches * cells**2))
    if ratio > POOLING_THRESHOLD:
        return int(height // ratio), int(width // ratio)
    return shape


def feature_start(index: int, cells: int, side: int, patch: int) -> int:
    """Canvas pixel where feature ``index`` of a stitched axis begins (``g = cells`` features per crop
    of ``side`` pixels, ``patch`` pixels each).

    Example:
        >>> feature_start(5, 4, 36, 8), feature_start(5, 4, 32, 8)
        (44, 40)
    """
    return (index // cells) * side + (index % cells) * patch


def canvas_to_image(value: float, paste: int, resized: int, original: int) -> float:
    """A canvas coordinate along one axis in original-image pixels.

    Example:
        >>> canvas_to_image(0, 1, 29, 40), canvas_to_image(32, 1, 29, 40)
        (-1.3793103448275863, 42.758620689655174)
    """
    return (value - paste) * original / resized


def split_at_seams(span: Span, cells: int) -> list[Span]:
    """``span`` cut at every multiple of ``cells`` (the seams between crops).

    Example:
        >>> split_at_seams((1, 11), 4)
        [(1, 4), (4, 8), (8, 11)]
    """
    start, stop = span
    pieces, low = [], start
    while low < stop:
        high = min(stop, (low // cells + 1) * cells)
        pieces.append((low, high))
        low = high
    return pieces


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's tokens come from (see the module docstring).

    Attributes:
        image_size: ``(W, H)`` of the original image.
        side, patch, cells: the crop side ``S``, the patch side ``P`` and ``g = S // P``.
        best_resolution: the canvas ``(bh, bw)`` chosen from the grid pinpoints.
        tile_grid: ``(tr, tc)`` crops of the canvas.
        resized, paste: the image's ``(new_w, new_h)`` on the canvas and its ``(x, y)`` offset.
        rows, cols: the stitched feature rows / columns kept by ``unpad_image``.
        grid: ``(rows, cols)`` of high-resolution tokens (after OneVision's resize, if any).
    """

    image_size: tuple[int, int]
    side: int
    patch: int
    cells: int
    best_resolution: tuple[int, int]
    tile_grid: tuple[int, int]
    resized: tuple[int, int]
    paste: tuple[int, int]
    rows: Span
    cols: Span
    grid: tuple[int, int]

    @property
    def pooled(self) -> bool:
        """Whether OneVision resized the kept grid."""
        return self.grid != (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])

    @property
    def base_tokens(self) -> int:
        """Tokens of the base view."""
        return self.cells * self.cells

    @property
    def num_tokens(self) -> int:
        """Image tokens in the prompt: base, high-resolution cells and one newline per row."""
        return self.base_tokens + self.grid[0] * (self.grid[1] + 1)

    @property
    def newline_offsets(self) -> list[int]:
        """Offsets (among the image tokens) of the ``image_newline`` tokens."""
        return [self.base_tokens + row * (self.grid[1] + 1) + self.grid[1] for row in range(self.grid[0])]

    def base_box(self) -> Box:
        """The base grid in original-image pixels: the stretched ``S x S`` view, its ``g * P`` covered part."""
        width, height = self.image_size
        covered = self.cells * self.patch / self.side
        return (0.0, 0.0, width * covered, height * covered)

    def canvas_box(self, rows: Span, cols: Span) -> Box:
        """Feature rows / columns of the stitched grid in original-image pixels (exact: the features are
        contiguous in the canvas within ``rows`` x ``cols``)."""
        g, side, patch = self.cells, self.side, self.patch
        x0, x1 = feature_start(cols[0], g, side, patch), feature_start(cols[1] - 1, g, side, patch) + patch
        y0, y1 = feature_start(rows[0], g, side, patch), feature_start(rows[1] - 1, g, side, patch) + patch
        (new_w, new_h), (paste_x, paste_y) = self.resized, self.paste
        width, height = self.image_size
        return (
            canvas_to_image(x0, paste_x, new_w, width),
            canvas_to_image(y0, paste_y, new_h, height),
            canvas_to_image(x1, paste_x, new_w, width),
            canvas_to_image(y1, paste_y, new_h, height),
        )

    def tiles(self, positions: torch.Tensor) -> tuple[Tile, ...]:
        """The tiles, given the sequence positions of all ``num_tokens`` image tokens in order: the base
        grid, then the high-resolution grid (one tile, or one per crop when crop seams leave gaps)."""
        if positions.numel() != self.num_tokens:
            raise ImageTokenError(f"expected {self.num_tokens} image tokens, got {positions.numel()}")
        g = self.cells
        base = Tile(positions=positions[: self.base_tokens], grid=(g, g), box=self.base_box())
        high = positions[self.base_tokens :].view(self.grid[0], self.grid[1] + 1)[:, : self.grid[1]]
        seamless = self.side == g * self.patch
        if self.pooled or seamless:
            tile = Tile(positions=high.reshape(-1), grid=self.grid, box=self.canvas_box(self.rows, self.cols))
            return (base, tile)
        tiles = [base]
        top, left = self.rows[0], self.cols[0]
        for rows in split_at_seams(self.rows, g):
            for cols in split_at_seams(self.cols, g):
                block = high[rows[0] - top : rows[1] - top, cols[0] - left : cols[1] - left]
                grid = (rows[1] - rows[0], cols[1] - cols[0])
                tiles.append(Tile(positions=block.reshape(-1), grid=grid, box=self.canvas_box(rows, cols)))
        return tuple(tiles)


def anyres_layout(
    image_size: tuple[int, int],
    *,
    side: int,
    patch: int,
    pinpoints: list[list[int]],
    max_patches: int | None = None,
) -> AnyresLayout:
    """The any-resolution layout of an image of ``image_size = (W, H)``; ``max_patches`` is OneVision's
    ``N`` of ``anyres_max_N`` (``None`` for LLaVA-NeXT).

    Example:
        >>> layout = anyres_layout((100, 40), side=32, patch=8, pinpoints=[[64, 64]])
        >>> layout.rows, layout.cols, layout.canvas_box(layout.rows, layout.cols)
        ((2, 6), (0, 8), (0.0, -4.615384615384615, 100.0, 44.61538461538461))
    """
    width, height = image_size
    best_height, best_width = (int(v) for v in select_best_resolution((height, width), pinpoints))
    if best_height % side or best_width % side:
        raise UnsupportedModelError(f"the grid pinpoint {best_height}x{best_width} is not a multiple of {side}")
    cells = side // patch
    tile_grid = (best_height // side, best_width // side)
    resized, paste = canvas_placement(image_size, (best_height, best_width))
    rows, cols = unpadded_span(image_size, (tile_grid[0] * cells, tile_grid[1] * cells))
    grid = pooled_grid((rows[1] - rows[0], cols[1] - cols[0]), cells, max_patches)
    return AnyresLayout(
        image_size=(width, height),
        side=side,
        patch=patch,
        cells=cells,
        best_resolution=(best_height, best_width),
        tile_grid=tile_grid,
        resized=resized,
        paste=paste,
        rows=rows,
        cols=cols,
        grid=grid,
    )


def max_patches_of(aspect_ratio: str) -> int:
    """``N`` of OneVision's ``vision_aspect_ratio = "anyres_max_N"``.

    Example:
        >>> max_patches_of("anyres_max_9")
        9
    """
    prefix = "anyres_max_"
    if not aspect_ratio.startswith(prefix) or not aspect_ratio[len(prefix) :].isdigit():
        raise UnsupportedModelError(f"vision_aspect_ratio {aspect_ratio!r} is not of the form 'anyres_max_N'")
    return int(aspect_ratio[len(prefix) :])


def _size_entry(size: Any, name: str) -> int | None:
    """One entry of an image processor's ``size`` / ``crop_size`` (a ``SizeDict``, a dict or ``None``)."""
    if size is None:
        return None
    value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
    return None if value is None else int(value)


def processor_sides(image_processor: Any) -> tuple[int | None, int | None]:
    """``(base side, crop side)`` the image processor uses: the base view is resized to ``size`` (height /
    width, else shortest edge), the canvas is cut into crops of ``crop_size`` height (else ``size``)."""
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    height, width = _size_entry(size, "height"), _size_entry(size, "width")
    shortest = _size_entry(size, "shortest_edge")
    base = (height if height == width else None) if height and width else shortest
    crop_side = _size_entry(crop, "height") or height or shortest
    return base, crop_side


# ----------------------------------------------------------------------------------------------
# The adapters.
# ----------------------------------------------------------------------------------------------


class AnyresLlavaFamily(FamilyAdapter):
    """The shared adapter of LLaVA-NeXT and LLaVA-OneVision (see the module docstring); the subclasses
    name the model class and whether the high-resolution grid may be pooled."""

    name = "anyres_llava"
    model_class: type = LlavaNextForConditionalGeneration
    pools: bool = False

    # -- contract --------------------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse models / processors whose image tokens this adapter cannot place exactly."""
        if not isinstance(model, self.model_class):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not supported: the {self.name} family needs a {self.model_class.__name__}"
            )
        config = model.config
        check_llava_config(config)
        for layer in self.decoder_layers(model):
            check_plain_rotary_attention(layer.self_attn)
        vision = config.vision_config
        side, patch = int(vision.image_size), int(vision.patch_size)
        extra = VISION_TOKENS_PER_CROP_EXTRA[vision.model_type]
        strategy = config.vision_feature_select_strategy
        if (strategy == "default") != (extra == 1):
            raise UnsupportedModelError(
                f"vision_feature_select_strategy {strategy!r} with a {vision.model_type} tower does not give "
                f"{side // patch}x{side // patch} features per crop"
            )
        pinpoints = [list(map(int, point)) for point in config.image_grid_pinpoints]
        if any(height % side or width % side for height, width in pinpoints):
            raise UnsupportedModelError(f"image_grid_pinpoints {pinpoints} are not multiples of the crop side {side}")
        if self.pools:
            max_patches_of(config.vision_aspect_ratio)
        missing = [name for name in ("tokenizer", "image_processor", "image_token") if not hasattr(processor, name)]
        if missing:
            raise UnsupportedModelError(f"{type(processor).__name__} lacks {', '.join(missing)}")
        image_processor = processor.image_processor
        processor_points = getattr(image_processor, "image_grid_pinpoints", None)
        if processor_points is None or [list(map(int, p)) for p in processor_points] != pinpoints:
            raise UnsupportedModelError(
                f"the image processor's image_grid_pinpoints {processor_points} differ from the model's {pinpoints}"
            )
        base, crop = processor_sides(image_processor)
        if base != side or crop != side:
            raise UnsupportedModelError(
                f"the image processor makes a {base}-pixel base view and {crop}-pixel crops; the vision tower "
                f"takes {side}x{side}"
            )
        if self.pools and getattr(processor, "vision_aspect_ratio", None) != config.vision_aspect_ratio:
            raise UnsupportedModelError(
                f"the processor's vision_aspect_ratio {getattr(processor, 'vision_aspect_ratio', None)!r} differs "
                f"from the model's {config.vision_aspect_ratio!r}"
            )

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The language model's decoder blocks."""
        return language_model_layers(model)

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """The chat prompt with the original image through the family's processor, and the tiles."""
        from api_tool.backends.lvlm import single_image_prompt

        text = single_image_prompt(processor, question)
        rgb = image.convert("RGB")
        encoded = processor(images=rgb, text=text, return_tensors="pt", **image_processing_device(processor, model))
        layout = self.layout(model, rgb.size)
        side = layout.side
        pixels = encoded["pixel_values"]
        crops = 1 + layout.tile_grid[0] * layout.tile_grid[1]
        if tuple(pixels.shape[-2:]) != (side, side) or pixels.shape[1] != crops:
            raise UnsupportedModelError(
                f"the processor produced pixel inputs of shape {tuple(pixels.shape)}; the layout needs {crops} "
                f"crops of {side}x{side}"
            )
        if [int(v) for v in encoded["image_sizes"][0]] != [rgb.height, rgb.width]:
            raise UnsupportedModelError(f"the processor reports image size {encoded['image_sizes'][0].tolist()}")
        device = model.get_input_embeddings().weight.device
        inputs = {name: value.to(device) for name, value in encoded.items() if isinstance(value, torch.Tensor)}
        inputs["pixel_values"] = pixels.to(device, model.dtype)
        token_id = image_token_id(model.config)
        positions = (inputs["input_ids"][0] == token_id).nonzero().flatten()
        if positions.numel() != layout.num_tokens:
            raise ImageTokenError(
                f"the prompt holds {positions.numel()} image tokens (id {token_id}); the {self.name} layout of a "
                f"{rgb.width}x{rgb.height} image needs {layout.num_tokens} ({layout.base_tokens} base, "
                f"{layout.grid[0]}x{layout.grid[1]} high-resolution, {layout.grid[0]} newlines). Do the "
                "processor's patch_size / num_additional_image_tokens / num_image_tokens match the model?"
            )
        return PreparedPrompt(inputs=inputs, text=text, tiles=layout.tiles(positions))

    # -- helpers ---------------------------------------------------------------------------------

    def layout(self, model: torch.nn.Module, image_size: tuple[int, int]) -> AnyresLayout:
        """The layout the model gives an image of ``image_size = (W, H)``."""
        config = model.config
        vision = config.vision_config
        return anyres_layout(
            image_size,
            side=int(vision.image_size),
            patch=int(vision.patch_size),
            pinpoints=[list(map(int, point)) for point in config.image_grid_pinpoints],
            max_patches=max_patches_of(config.vision_aspect_ratio) if self.pools else None,
        )


class LlavaNextFamily(AnyresLlavaFamily):
    """LLaVA-NeXT (``LlavaNextForConditionalGeneration``, model_type ``llava_next``)."""

    name = "llava_next"
    model_class = LlavaNextForConditionalGeneration
    pools = False


class LlavaOnevisionFamily(AnyresLlavaFamily):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, model_type ``llava_onevision``),
    single-image prompts (several images per prompt are not tiled by the model and are not handled)."""

    name = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    pools = True
