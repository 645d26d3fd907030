"""The Idefics3 / SmolVLM family: a grid of square crops plus a global image, each pixel-shuffled.

Handles ``Idefics3ForConditionalGeneration`` (model_type ``idefics3``, e.g. Idefics3-8B-Llama3) and
``SmolVLMForConditionalGeneration`` (model_type ``smolvlm``, SmolVLM / SmolVLM2). The two share the
processor's image splitting, the vision tower, the connector and a Llama language model; they differ
only in the begin-of-text token of the chat template, so one adapter class serves both
(``SmolVLMFamily`` is ``Idefics3Family`` with another ``name`` / ``model_types`` / fallback prompt).

Image processing (``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor`` in transformers 5.24, torch
and PIL backends alike), for an original image of ``W x H`` pixels and crop side ``M =
max_image_size["longest_edge"]``:

1. resize (``do_resize``): the longest edge to ``size["longest_edge"]`` (up or down), the other edge
   ``int(longest / aspect)`` rounded up to even, then both scaled under 4096 if larger;
2. with ``do_image_splitting``: resize again so that *both* edges become multiples of ``M`` (the
   longer edge ``ceil(edge / M) * M``, the shorter ``ceil(int(longer / aspect) / M) * M``). This is a
   stretch of the whole frame, not a pad: the image still fills the canvas, whose aspect differs
   slightly from the original's. The canvas is ``rows * M`` high and ``cols * M`` wide.
   If ``rows = cols = 1`` the canvas is the only image (no split); otherwise it is cut into
   ``rows x cols`` crops of ``M x M`` (row-major) and the whole canvas, stretched to ``M x M``, is
   appended as the global image. Without ``do_image_splitting`` the image is stretched to ``M x M``.
3. every frame is ``M x M``, so the batch padding (``do_pad``) adds nothing for one image.

Vision tower and connector: a frame is cut into ``n = M // patch_size`` patches a side (the patch
convolution is "valid": when ``M`` is not a multiple of the patch size, as SmolVLM-Instruct's 384-pixel
crops with 14-pixel patches, the right and bottom ``M - n * patch_size`` pixels are dropped). The
pixel shuffle with scale ``s`` turns the ``n x n`` patches into ``g x g`` tokens, ``g = n / s``, in
row-major order: token ``i * g + j`` stacks the ``s x s`` patches of rows ``i*s .. i*s+s-1`` and
columns ``j*s .. j*s+s-1`` (see ``pixel_shuffle_patches``). So each frame's tokens form an exact
``g x g`` grid covering the frame's top-left ``n * patch_size`` pixels.

Token layout of the prompt (``Idefics3Processor`` / ``SmolVLMProcessor``), ``L = image_seq_len = g * g``::

    split:    for r in 1..rows: for c in 1..cols: <fake_token_around_image><row_r_col_c><image>*L
              then "\\n" after each row of crops, then
              "\\n"<fake_token_around_image><global-img><image>*L<fake_token_around_image>
    no split: <fake_token_around_image><global-img><image>*L<fake_token_around_image>

The ``<image>`` tokens of the prompt are therefore, in order: crop (1, 1), (1, 2), ... (rows, cols),
then the global image; ``L`` consecutive ones per frame. Tiles (one per frame, grid ``(g, g)``), in
original-image pixels with ``f = n * patch_size / M`` (1 when the patches tile the crop):

* crop ``(r, c)`` (0-based): ``x0 = c * W / cols``, ``y0 = r * H / rows``, ``x1 = x0 + f * W / cols``,
  ``y1 = y0 + f * H / rows``;
* the global image (and the single frame of an unsplit image): ``(0, 0, f * W, f * H)``.

These are exact up to resampling: every resize maps the whole frame onto the whole frame, so a
canvas pixel maps back to the original linearly in each axis. The markers ``<row_r_col_c>`` /
``<global-img>`` before each run of image tokens are checked when the tokenizer holds them as single
tokens. The language model is a Llama: 1-D RoPE, no q/k norms; ``project`` applies the block's own
projections and the ``(cos, sin)`` it receives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from api_tool.backends.lvlm_families.base import FamilyAdapter, PreparedPrompt, Tile, image_processing_device
from api_tool.errors import ImageTokenError, UnsupportedModelError
from api_tool.geometry import Box

MAX_IMAGE_SIZE = 4096
"""The processor's absolute cap on either edge after the first resize."""
SUPPORTED_TEXT_MODELS: tuple[str, ...] = ("llama",)
GLOBAL_IMAGE_TOKEN = "<global-img>"


# ----------------------------------------------------------------------------------------------
# Geometry: pure functions of sizes.
# ----------------------------------------------------------------------------------------------


def resize_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """``(height, width)`` after the processor's first resize: the longest edge to ``longest_edge``,
    the other ``int(longest / aspect)`` rounded up to even, then both scaled under ``MAX_IMAGE_SIZE``.

    Example:
        >>> resize_longest_edge(50, 90, 96)
        (54, 96)
    """
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def resize_to_crop_multiples(height: int, width: int, crop: int) -> tuple[int, int]:
    """``(height, width)`` of the canvas that is cut into crops: both edges multiples of ``crop``
    (the processor's ``resize_for_vision_encoder``; the longer edge is rounded up first and the shorter
    one follows from the aspect ratio, then is rounded up).

    Example:
        >>> resize_to_crop_multiples(54, 96, 32)
        (64, 96)
        >>> resize_to_crop_multiples(360, 1000, 364)  # int(1092 / (1000 / 360)) = 393: two rows
        (728, 1092)
    """
    aspect = width / height
    if width >= height:
        width = math.ceil(width / crop) * crop
        height = math.ceil(int(width / aspect) / crop) * crop
    else:
        height = math.ceil(height / crop) * crop
        width = math.ceil(int(height * aspect) / crop) * crop
    return height, width


def size_dict(value: Any) -> dict[str, int]:
    """A processor size (dict or ``SizeDict``) as a plain dict of its set keys."""
    if value is None:
        return {}
    items = value.items() if isinstance(value, dict) else vars(value).items()
    return {str(key): int(number) for key, number in items if number is not None}


def crop_grid(image_size: tuple[int, int], image_processor: Any) -> tuple[int, int]:
    """``(rows, cols)`` of crops the image processor cuts an image of ``image_size = (width, height)``
    into; ``(0, 0)`` when it is not split (one frame, the whole image).

    Follows ``do_resize`` / ``size`` and ``do_image_splitting`` / ``max_image_size`` as the processor
    does in ``_preprocess`` (not ``get_number_of_image_patches``, which can disagree with it).

    Example:
        >>> from types import SimpleNamespace
        >>> processor = SimpleNamespace(do_resize=True, size={"longest_edge": 96},
        ...     do_image_splitting=True, max_image_size={"longest_edge": 32})
        >>> crop_grid((90, 50), processor), crop_grid((20, 20), processor), crop_grid((8, 40), processor)
        ((2, 3), (3, 3), (3, 1))
    """
    width, height = image_size
    crop = size_dict(image_processor.max_image_size)["longest_edge"]
    if getattr(image_processor, "do_resize", True):
        size = size_dict(image_processor.size)
        if "longest_edge" in size:
            height, width = resize_longest_edge(height, width, size["longest_edge"])
        elif "height" in size and "width" in size:
            height, width = size["height"], size["width"]
        else:
            raise UnsupportedModelError(f"the image processor's size {size} has neither longest_edge nor height/width")
    if not getattr(image_processor, "do_image_splitting", True):
        return 0, 0
    height, width = resize_to_crop_multiples(height, width, crop)
    if height > crop or width > crop:
        return height // crop, width // crop
    return 0, 0


def tile_boxes(image_size: tuple[int, int], grid: tuple[int, int], covered: float = 1.0) -> list[Box]:
    """Original-image boxes of the frames, in token order: crops row-major, then the global image.

    ``grid = (rows, cols)`` of crops (``(0, 0)``: one frame, the whole image); ``covered`` is the
    fraction of a frame's side that its patch grid covers (``n * patch_size / M``, from the top-left).

    Example:
        >>> tile_boxes((90, 50), (1, 2))
        [(0.0, 0.0, 45.0, 50.0), (45.0, 0.0, 90.0, 50.0), (0.0, 0.0, 90.0, 50.0)]
        >>> tile_boxes((100, 40), (0, 0), covered=0.5)
        [(0.0, 0.0, 50.0, 20.0)]
    """
    width, height = (float(side) for side in image_size)
    rows, cols = grid
    boxes: list[Box] = []
    if rows and cols:
        crop_w, crop_h = width / cols, height / rows
        for row in range(rows):
            for col in range(cols):
                x0, y0 = col * crop_w, row * crop_h
                boxes.append((x0, y0, x0 + covered * crop_w, y0 + covered * crop_h))
    boxes.append((0.0, 0.0, covered * width, covered * height))
    return boxes


def pixel_shuffle_patches(patches_per_side: int, scale: int) -> torch.Tensor:
    """Which vision patches each token of one frame stacks, after the connector's pixel shuffle.

    Returns ``(g * g, scale * scale)`` row-major patch indices (``patch = row * patches_per_side + col``),
    ``g = patches_per_side // scale``: token ``i * g + j`` holds the patches of rows
    ``i*scale .. i*scale+scale-1`` and columns ``j*scale .. j*scale+scale-1``, its feature blocks in that
    (row, column) order. So the tokens form a row-major ``g x g`` grid over the frame.

    Example:
        >>> pixel_shuffle_patches(4, 2).tolist()
        [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    """
    side = patches_per_side // scale
    token_row = torch.arange(side).repeat_interleave(side)
    token_col = torch.arange(side).repeat(side)
    offset_row = torch.arange(scale).repeat_interleave(scale)
    offset_col = torch.arange(scale).repeat(scale)
    rows = token_row[:, None] * scale + offset_row[None]
    cols = token_col[:, None] * scale + offset_col[None]
    return rows * patches_per_side + cols


@dataclass(frozen=True)
class FrameLayout:
    """How one ``M x M`` frame becomes tokens: ``patches_per_side = M // patch_size``, the pixel
    shuffle's ``scale``, ``tokens_per_side = patches_per_side // scale`` and the fraction ``covered`` of
    the frame's side under the patch grid."""

    crop: int
    patch_size: int
    scale: int

    @property
    def patches_per_side(self) -> int:
        return self.crop // self.patch_size

    @property
    def tokens_per_side(self) -> int:
        return self.patches_per_side // self.scale

    @property
    def tokens(self) -> int:
        return self.tokens_per_side**2

    @property
    def covered(self) -> float:
        return self.patches_per_side * self.patch_size / self.crop


def split_positions(input_ids: torch.Tensor, image_token_id: int, frames: int, tokens: int) -> list[torch.Tensor]:
    """The positions of each frame's ``tokens`` image tokens in a 1-D ``input_ids``, frame after frame.

    Example:
        >>> [p.tolist() for p in split_positions(torch.tensor([5, 9, 9, 6, 9, 9, 7]), 9, 2, 2)]
        [[1, 2], [4, 5]]
    """
    positions = (input_ids == image_token_id).nonzero().flatten()
    if positions.numel() != frames * tokens:
        raise ImageTokenError(
            f"the prompt holds {positions.numel()} image tokens (id {image_token_id}); {frames} frame(s) of "
            f"{tokens} tokens need {frames * tokens}. Does the processor's image_seq_len match the model?"
        )
    chunks = list(positions.split(tokens))
    for chunk in chunks:
        if int(chunk[-1] - chunk[0]) != tokens - 1:
            raise ImageTokenError("a frame's image tokens are not contiguous in the prompt")
    return chunks


# ----------------------------------------------------------------------------------------------
# The adapter.
# ----------------------------------------------------------------------------------------------


class Idefics3Family(FamilyAdapter):
    """``LvlmFamilyAdapter`` for Idefics3 (``Idefics3ForConditionalGeneration``); see the module docstring.

    Example:
        >>> adapter = Idefics3Family()
        >>> adapter.check_model(model, processor)  # doctest: +SKIP
        >>> prompt = adapter.prepare(model, processor, image, "What is on the table?")  # doctest: +SKIP
        >>> [tile.box for tile in prompt.tiles]  # doctest: +SKIP
    """

    name = "idefics3"
    model_types: ClassVar[tuple[str, ...]] = ("idefics3",)
    fallback_prompt: ClassVar[str] = "<|begin_of_text|>User:<image>{question}<end_of_utterance>\nAssistant:"
    """The checkpoint's chat template rendered, for a processor without one."""

    # -- checks ---------------------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse, with ``UnsupportedModelError``, what this adapter cannot attribute exactly: another
        model type, a non-Llama language model, attention with q/k norms or a sliding window, and a
        processor whose crops do not give the model's ``image_seq_len`` tokens."""
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in self.model_types:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type {model_type!r}) is not handled by the {self.name} adapter "
                f"(model types {', '.join(self.model_types)})"
            )
        text_type = getattr(config.text_config, "model_type", None)
        if text_type not in SUPPORTED_TEXT_MODELS:
            raise UnsupportedModelError(
                f"a {text_type!r} language model is not supported by the {self.name} adapter; "
                f"supported: {', '.join(SUPPORTED_TEXT_MODELS)}"
            )
        attention = self.decoder_layers(model)[0].self_attn
        missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
        if missing or hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            raise UnsupportedModelError(
                f"{type(attention).__name__} is not a plain rotary attention layer (missing {missing} or has q/k "
                "norms); its scores cannot be recomputed"
            )
        if getattr(attention, "sliding_window", None):
            raise UnsupportedModelError(f"{type(attention).__name__} uses a sliding window, which is not replicated")
        self._check_processor(model, processor)

    def _check_processor(self, model: torch.nn.Module, processor: Any) -> None:
        missing = [name for name in ("tokenizer", "image_processor", "image_seq_len") if not hasattr(processor, name)]
        if missing:
            raise UnsupportedModelError(
                f"{type(processor).__name__} lacks {', '.join(missing)}; pass the model's Idefics3/SmolVLM processor"
            )
        image_processor = processor.image_processor
        if "longest_edge" not in size_dict(getattr(image_processor, "max_image_size", None)):
            raise UnsupportedModelError(f"{type(image_processor).__name__} has no max_image_size; not an Idefics3 one")
        layout = self.frame_layout(model, processor)
        if layout.patches_per_side % layout.scale or layout.tokens != int(processor.image_seq_len):
            raise UnsupportedModelError(
                f"a {layout.crop}-pixel crop gives {layout.patches_per_side} patches a side, which the pixel shuffle "
                f"(scale {layout.scale}) cannot turn into the processor's image_seq_len {processor.image_seq_len}"
            )
        image_token = getattr(processor, "image_token", "<image>")
        expected = int(model.config.image_token_id)
        if processor.tokenizer.convert_tokens_to_ids(image_token) != expected:
            raise UnsupportedModelError(
                f"the tokenizer's {image_token} id differs from the model's image_token_id {expected}"
            )

    @staticmethod
    def frame_layout(model: torch.nn.Module, processor: Any) -> FrameLayout:
        """The crop side (the processor's ``max_image_size``), patch size and pixel-shuffle scale."""
        patch = model.config.vision_config.patch_size
        patch_size = int(patch if isinstance(patch, int) else patch[0])
        return FrameLayout(
            crop=size_dict(processor.image_processor.max_image_size)["longest_edge"],
            patch_size=patch_size,
            scale=int(model.config.scale_factor),
        )

    # -- the contract -----------------------------------------------------------------------------

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """``model.model.text_model.layers`` (the Llama's blocks)."""
        layers = getattr(getattr(getattr(model, "model", None), "text_model", None), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise UnsupportedModelError(f"cannot find the decoder blocks of {type(model).__name__}")
        return layers

    def prompt_text(self, processor: Any, question: str) -> str:
        """The generation prompt: the processor's chat template (one image, then the question) with the
        assistant turn opened, or the checkpoint's format when the processor has no template."""
        if getattr(processor, "chat_template", None):
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return str(processor.apply_chat_template(chat, add_generation_prompt=True))
        return self.fallback_prompt.format(question=question)

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """Inputs (``input_ids``, ``attention_mask``, ``pixel_values``, ``pixel_attention_mask``) on the
        model's device, and one ``Tile`` per frame: the crops row-major, then the global image."""
        rgb = image.convert("RGB")
        text = self.prompt_text(processor, question)
        encoded = processor(images=[rgb], text=text, return_tensors="pt", **image_processing_device(processor, model))
        input_ids = encoded["input_ids"][0].cpu()
        grid = crop_grid(rgb.size, processor.image_processor)
        frames = grid[0] * grid[1] + 1 if grid[0] else 1
        if int(encoded["pixel_values"].shape[1]) != frames:
            raise ImageTokenError(
                f"the image processor made {encoded['pixel_values'].shape[1]} frames; its geometry ({grid[0]} x "
                f"{grid[1]} crops) predicts {frames}"
            )
        layout = self.frame_layout(model, processor)
        positions = split_positions(input_ids, int(model.config.image_token_id), frames, layout.tokens)
        self._check_markers(processor.tokenizer, input_ids, positions, grid)
        boxes = tile_boxes(rgb.size, grid, layout.covered)
        side = layout.tokens_per_side
        tiles = tuple(Tile(positions=chunk, grid=(side, side), box=box) for chunk, box in zip(positions, boxes))
        weight = model.get_input_embeddings().weight
        inputs: dict[str, Any] = {}
        for key, value in encoded.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.is_floating_point():
                inputs[key] = value.to(device=weight.device, dtype=weight.dtype)
            else:
                inputs[key] = value.to(weight.device)
        return PreparedPrompt(inputs=inputs, text=text, tiles=tiles)

    @staticmethod
    def _check_markers(
        tokenizer: Any, input_ids: torch.Tensor, positions: Sequence[torch.Tensor], grid: tuple[int, int]
    ) -> None:
        """Each frame's image tokens follow its marker (``<row_r_col_c>``, last ``<global-img>``) when the
        tokenizer holds that marker as one token."""
        rows, cols = grid
        names = [f"<row_{row + 1}_col_{col + 1}>" for row in range(rows) for col in range(cols)]
        names.append(GLOBAL_IMAGE_TOKEN)
        unknown = getattr(tokenizer, "unk_token_id", None)
        for name, chunk in zip(names, positions):
            marker = tokenizer.convert_tokens_to_ids(name)
            if marker is None or marker == unknown:
                continue
            start = int(chunk[0])
            if start == 0 or int(input_ids[start - 1]) != marker:
                raise ImageTokenError(f"the image tokens at position {start} do not follow {name}")

    def end_token_ids(self, processor: Any) -> frozenset[int]:
        """Ids that end the assistant's turn besides the configured EOS ids: ``<end_of_utterance>``, which
        the chat template puts after every turn (SmolVLM's tokenizer has it as EOS; Idefics3-8B's may not)."""
        token = getattr(processor, "end_of_utterance_token", "<end_of_utterance>")
        tokenizer = processor.tokenizer
        found = tokenizer.convert_tokens_to_ids(token)
        if found is None or found == getattr(tokenizer, "unk_token_id", None):
            return frozenset()
        return frozenset({int(found)})


class SmolVLMFamily(Idefics3Family):
    """``LvlmFamilyAdapter`` for SmolVLM / SmolVLM2 (``SmolVLMForConditionalGeneration``): Idefics3's layout."""

    name = "smolvlm"
    model_types: ClassVar[tuple[str, ...]] = ("smolvlm",)
    fallback_prompt: ClassVar[str] = "<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"
