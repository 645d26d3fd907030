"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE): one dynamic-resolution grid of merged patches per image.

Models: ``Qwen2VLForConditionalGeneration`` (model_type ``qwen2_vl``),
``Qwen2_5_VLForConditionalGeneration`` (``qwen2_5_vl``), ``Qwen3VLForConditionalGeneration`` (``qwen3_vl``)
and ``Qwen3VLMoeForConditionalGeneration`` (``qwen3_vl_moe``; the attention is Qwen3-VL's, only the MLPs
are experts), with their own processors (``Qwen2VLImageProcessor`` in every case).

Image-token layout: the chat template writes ``<|vision_start|><|image_pad|><|vision_end|>``; the
processor expands the one ``<|image_pad|>`` to ``t * h * w / merge**2`` copies, where ``image_grid_thw =
(t, h, w)`` is the grid of ``patch_size`` patches of the resized image (``t = 1`` for an image) and
``merge = spatial_merge_size = 2``. Each image token is one 2 x 2 group of patches (28 x 28 pixels of
the resized image for Qwen2 / 2.5-VL's 14 px patches, 32 x 32 for Qwen3-VL's 16 px patches). The
processor orders the patches group by group, and the vision tower's merger (Qwen2.5-VL's window
attention reorders tokens internally and restores the order before returning) emits one token per group
in row-major order over the ``(h / merge, w / merge)`` grid, which is the order of the ``<|image_pad|>``
tokens in the prompt (M-RoPE gives token ``r * cols + c`` the height index ``r`` and width index ``c``).

Geometry: ``smart_resize`` scales the *whole* image to ``(h * patch, w * patch)`` pixels, multiples of
``patch * merge`` within the processor's min / max pixels, without cropping or padding; the aspect ratio
is kept only approximately, so the image is stretched slightly, separately in x and y. A resize maps the
whole image onto the whole input (pixel edges to pixel edges), so the one tile's box is the whole
original image ``(0, 0, width, height)``: cell ``(r, c)`` covers ``[c * W / cols, (c + 1) * W / cols] x
[r * H / rows, (r + 1) * H / rows]`` of the original image, whatever the resize.

Attention: Qwen2 / Qwen3 blocks (grouped-query; q/k/v biases in Qwen2) with 3-D multimodal RoPE. In
transformers 5.x the text model's rotary module already combines the temporal / height / width
frequencies (``mrope_section``: contiguous sections for Qwen2 / 2.5-VL, interleaved for Qwen3-VL) into
one ``(cos, sin)`` of shape ``(B, S, D)`` that every block's attention receives as
``position_embeddings`` and applies with the plain ``apply_rotary_pos_emb``; ``project`` applies exactly
that. Older transformers (4.45-4.5x) passed per-axis ``(3, B, S, D)`` tables and combined them inside
the attention (``apply_multimodal_rotary_pos_emb`` with ``mrope_section``); ``project`` combines those
the same way. Qwen3-VL's per-head ``q_norm`` / ``k_norm`` (RMSNorm over the head dimension, before RoPE)
are applied with the block's own modules. Any rope type works: scaling lives in the ``(cos, sin)`` the
block receives.

Positions: the 3-D position ids (and ``rope_deltas`` for decoding) are computed by the model from
``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw`` at prefill (``generate``) or over the whole
sequence (a forward pass without cache, as teacher forcing is): answer tokens are text, so their
positions continue from the prompt's last position in both cases and the two paths see the same
``(cos, sin)``. The inputs therefore always carry ``mm_token_type_ids`` (extended with zeros, "text", for
teacher forcing) and ``image_grid_thw``.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from api_tool.backends.lvlm_families.base import (
    FamilyAdapter,
    PreparedPrompt,
    Projection,
    Tile,
    continued_tokens,
    image_processing_device,
    language_model_layers,
    rotate_projected,
)
from api_tool.errors import ImageTokenError, InvalidParameterError, UnsupportedModelError
from api_tool.geometry import Box

QWEN_VL_MODEL_TYPES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
"""The HF ``model_type``s this adapter attributes."""

SUPPORTED_ATTENTIONS: frozenset[str] = frozenset(
    {"Qwen2VLAttention", "Qwen2_5_VLAttention", "Qwen3VLTextAttention", "Qwen3VLMoeTextAttention"}
)
"""The text attention classes whose scores ``project`` recomputes exactly."""

PER_TOKEN_INPUTS: tuple[str, ...] = ("mm_token_type_ids", "token_type_ids")
"""Per-token inputs besides ``input_ids`` / ``attention_mask``; an appended answer is text (type 0)."""

END_OF_TURN_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
"""Qwen's end-of-turn and end-of-text tokens: an answer ends at either (base configs may name only one)."""

PAPER_DEPTH = 20 / 32
"""The relative depth of the block the authors read in LLaVA-1.5-7B (block 20 of 32)."""


# ----------------------------------------------------------------------------------------------
# The maths: small pure functions on tensors.
# ----------------------------------------------------------------------------------------------


def combine_mrope(table: torch.Tensor, mrope_section: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Per-axis rotary tables ``(3, B, S, D)`` -> the one table ``(B, S, D)`` the attention applies.

    ``mrope_section`` splits the ``D / 2`` frequencies into temporal / height / width sections; frequency
    ``j`` of section ``i`` takes axis ``i``'s table, in both halves of ``D`` (older transformers'
    ``apply_multimodal_rotary_pos_emb``; the contiguous layout of Qwen2-VL and Qwen2.5-VL).

    Example:
        >>> table = torch.arange(3.0)[:, None, None, None].expand(3, 1, 1, 8)
        >>> combine_mrope(table, [1, 2, 1])[0, 0].tolist()
        [0.0, 1.0, 1.0, 2.0, 0.0, 1.0, 1.0, 2.0]
    """
    sections = list(mrope_section) * 2
    if sum(sections) != table.shape[-1]:
        raise UnsupportedModelError(f"mrope_section {list(mrope_section)} does not split {table.shape[-1]} dims")
    return torch.cat([part[index % 3] for index, part in enumerate(table.split(sections, dim=-1))], dim=-1)


def merged_grid(grid_thw: torch.Tensor | list[int], merge_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of image tokens for one image's ``image_grid_thw = (t, h, w)`` in patches.

    Example:
        >>> merged_grid([1, 8, 16], 2)
        (4, 8)
    """
    t, h, w = (int(value) for value in grid_thw)
    if t != 1 or h % merge_size or w % merge_size:
        raise ImageTokenError(
            f"image_grid_thw {(t, h, w)} is not one image frame of whole {merge_size}x{merge_size} groups"
        )
    return h // merge_size, w // merge_size


def image_token_positions(input_ids: torch.Tensor, token_id: int, grid: tuple[int, int]) -> torch.Tensor:
    """Sequence positions of one image's tokens: one contiguous run of ``rows * cols`` ``token_id``s.

    Example:
        >>> image_token_positions(torch.tensor([7, 8, 5, 5, 5, 5, 5, 5, 9, 1]), 5, (2, 3)).tolist()
        [2, 3, 4, 5, 6, 7]
    """
    positions = (input_ids == token_id).nonzero().flatten()
    cells = grid[0] * grid[1]
    if positions.numel() != cells:
        raise ImageTokenError(
            f"the prompt holds {positions.numel()} image tokens (id {token_id}); the {grid[0]}x{grid[1]} grid of "
            f"merged patches needs {cells}. Is exactly one image in the prompt?"
        )
    if cells and int(positions[-1] - positions[0]) != cells - 1:
        raise ImageTokenError("the image tokens are not one contiguous run; only one image per prompt is supported")
    return positions


def whole_image_box(size: tuple[int, int]) -> Box:
    """The tile box of a grid that covers the whole image (the resize stretches it to the grid).

    Example:
        >>> whole_image_box((60, 36))
        (0.0, 0.0, 60.0, 36.0)
    """
    return (0.0, 0.0, float(size[0]), float(size[1]))


def mrope_section_of(attention: torch.nn.Module) -> list[int]:
    """The ``mrope_section`` of an attention layer's config (``rope_parameters`` in transformers 5,
    ``rope_scaling`` before)."""
    for source in (getattr(attention, "rope_parameters", None), getattr(attention, "rope_scaling", None)):
        if isinstance(source, dict) and "mrope_section" in source:
            return [int(value) for value in source["mrope_section"]]
    config = getattr(attention, "config", None)
    for name in ("rope_parameters", "rope_scaling"):
        source = getattr(config, name, None)
        if isinstance(source, dict) and "mrope_section" in source:
            return [int(value) for value in source["mrope_section"]]
    raise UnsupportedModelError(f"{type(attention).__name__} names no mrope_section for its per-axis rotary tables")


def rotary_tables(attention: torch.nn.Module, position_embeddings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``(B, S, D)`` as the attention applies them, from what it received."""
    if position_embeddings is None:
        raise UnsupportedModelError(
            "the attention layer received no rotary position embeddings; this transformers version computes "
            "them inside the layer, which the attention probe cannot follow (upgrade transformers)"
        )
    cos, sin = position_embeddings
    if cos.dim() == 4:
        section = mrope_section_of(attention)
        if getattr(attention, "config", None) is not None and _interleaved(attention.config):
            raise UnsupportedModelError("per-axis rotary tables with interleaved M-RoPE are not supported")
        cos, sin = combine_mrope(cos, section), combine_mrope(sin, section)
    elif cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return cos, sin


def _interleaved(config: Any) -> bool:
    for name in ("rope_parameters", "rope_scaling"):
        source = getattr(config, name, None)
        if isinstance(source, dict) and (source.get("mrope_interleaved") or source.get("interleaved")):
            return True
    return False


def mrope_project(
    attention: torch.nn.Module,
    projection: Projection,
    hidden: torch.Tensor,
    position_embeddings: Any,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """Queries / keys of a Qwen-VL text attention for ``positions``: ``q_proj`` / ``k_proj``, split into
    heads, ``q_norm`` / ``k_norm`` over the head dimension where the block has them (Qwen3-VL), then the
    rotary embedding with the combined M-RoPE ``(cos, sin)``; fp32 ``(B, heads, len, D)``."""
    cos, sin = rotary_tables(attention, position_embeddings)
    return rotate_projected(attention, projection, hidden, cos, sin, positions)


# ----------------------------------------------------------------------------------------------
# Checks.
# ----------------------------------------------------------------------------------------------


def check_qwen_vl_config(config: Any) -> None:
    """Refuse configs outside the family."""
    model_type = getattr(config, "model_type", None)
    if model_type not in QWEN_VL_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by the qwen2_vl family ({', '.join(QWEN_VL_MODEL_TYPES)})"
        )


def sliding_window_of(model: torch.nn.Module, attention: torch.nn.Module, layer: int) -> int | None:
    """The sliding window of decoder block ``layer`` (``None`` for full attention): the attention's own
    ``sliding_window``, else the text config's when ``layer_types[layer]`` is ``"sliding_attention"``
    (Qwen2-VL / 2.5-VL with ``use_sliding_window``: blocks from ``max_window_layers`` on; the released
    checkpoints have none)."""
    window = getattr(attention, "sliding_window", None)
    if window:
        return int(window)
    text_config = getattr(model.config, "text_config", model.config)
    layer_types = getattr(text_config, "layer_types", None) or ()
    window = getattr(text_config, "sliding_window", None)
    if layer < len(layer_types) and layer_types[layer] == "sliding_attention" and window:
        return int(window)
    return None


def relative_depth_layer(config: Any, depth: float = PAPER_DEPTH) -> int:
    """The block at ``depth`` of the text model's blocks (floor), e.g. block 17 of Qwen2.5-VL-7B's 28.

    Example:
        >>> from types import SimpleNamespace
        >>> [relative_depth_layer(SimpleNamespace(num_hidden_layers=n)) for n in (28, 36, 80)]
        [17, 22, 50]
    """
    text_config = getattr(config, "text_config", config)
    return int(int(text_config.num_hidden_layers) * depth)


def check_qwen_vl_processor(config: Any, processor: Any) -> None:
    """Refuse a processor that is not this model's: no tokenizer / image processor / image token, or a
    patch, merge or image token that differs from the model's."""
    missing = [name for name in ("tokenizer", "image_processor", "image_token") if not hasattr(processor, name)]
    if missing:
        raise UnsupportedModelError(
            f"{type(processor).__name__} lacks {', '.join(missing)}; pass the model's processor"
        )
    image_processor, vision = processor.image_processor, config.vision_config
    for name, expected in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size)):
        value = getattr(image_processor, name, None)
        if value is None or int(value) != int(expected):
            raise UnsupportedModelError(f"the image processor's {name} ({value}) differs from the model's ({expected})")
    token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    if token_id != int(config.image_token_id):
        raise UnsupportedModelError(
            f"the processor's image token {processor.image_token!r} has id {token_id}; the model expects "
            f"{config.image_token_id}"
        )


# ----------------------------------------------------------------------------------------------
# The adapter.
# ----------------------------------------------------------------------------------------------


def resize_kwargs(image_processor: Any, max_pixels: int | None) -> dict[str, Any]:
    """Processor-call kwargs that cap the resized image at ``max_pixels`` (``{}`` for the processor's own
    limits): ``size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}``, the minimum lowered to
    the cap if it exceeds it.

    Example:
        >>> resize_kwargs(type("P", (), {"size": {"shortest_edge": 3136, "longest_edge": 12845056}})(), 1003520)
        {'size': {'shortest_edge': 3136, 'longest_edge': 1003520}}
    """
    if max_pixels is None:
        return {}
    size = getattr(image_processor, "size", None)
    current = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    minimum = min(int(current), max_pixels) if current else max_pixels
    return {"size": {"shortest_edge": minimum, "longest_edge": max_pixels}}


class Qwen2VLFamily(FamilyAdapter):
    """The Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapter (see the module docstring).

    Args:
        max_pixels: cap on the resized image's pixels (``None``: the processor's own ``longest_edge``,
            12845056 px = up to 16384 image tokens in the released Qwen2.5-VL processors); e.g.
            ``1280 * 28 * 28`` limits a Qwen2 / 2.5-VL image to 1280 tokens. The box stays the whole image.
    """

    name = "qwen2_vl"

    def __init__(self, max_pixels: int | None = None) -> None:
        if max_pixels is not None and (
            isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
        ):
            raise InvalidParameterError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
        self.max_pixels = max_pixels

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse other model types, unknown attention classes and processors that do not match the model."""
        config = getattr(model, "config", None)
        check_qwen_vl_config(config)
        for index, layer in enumerate(self.decoder_layers(model)):
            attention = getattr(layer, "self_attn", None)
            kind = type(attention).__name__
            missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
            if kind not in SUPPORTED_ATTENTIONS or missing:
                raise UnsupportedModelError(
                    f"block {index}'s attention {kind} is not a Qwen-VL text attention this adapter recomputes "
                    f"({', '.join(sorted(SUPPORTED_ATTENTIONS))})"
                )
            if hasattr(attention, "q_norm") != hasattr(attention, "k_norm"):
                raise UnsupportedModelError(f"block {index}'s attention normalises only one of queries and keys")
        check_qwen_vl_processor(config, processor)

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The text decoder blocks."""
        return language_model_layers(model)

    def project(
        self,
        attention: torch.nn.Module,
        projection: Projection,
        hidden: torch.Tensor,
        position_embeddings: Any,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Queries / keys with q/k norms (Qwen3-VL) and M-RoPE (see ``mrope_project``)."""
        return mrope_project(attention, projection, hidden, position_embeddings, positions)

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """Render the chat prompt, let the processor resize the whole image to its dynamic grid, and
        return the inputs (with ``image_grid_thw`` and ``mm_token_type_ids``) and the one tile."""
        from api_tool.backends.lvlm import single_image_prompt

        text = single_image_prompt(processor, question)
        rgb = image.convert("RGB")
        extra = resize_kwargs(processor.image_processor, self.max_pixels)
        encoded = processor(
            images=[rgb], text=[text], return_tensors="pt", **extra, **image_processing_device(processor, model)
        )
        merge = int(model.config.vision_config.spatial_merge_size)
        grid_thw = encoded["image_grid_thw"]
        if grid_thw.shape[0] != 1:
            raise ImageTokenError(f"the processor produced {grid_thw.shape[0]} image grids for one image")
        grid = merged_grid(grid_thw[0], merge)
        device = model.get_input_embeddings().weight.device
        inputs: dict[str, Any] = {}
        for key, value in encoded.items():
            if not isinstance(value, torch.Tensor):
                continue
            inputs[key] = value.to(device, model.dtype) if value.is_floating_point() else value.to(device)
        positions = image_token_positions(inputs["input_ids"][0], int(model.config.image_token_id), grid)
        tile = Tile(positions=positions, grid=grid, box=whole_image_box(rgb.size))
        return PreparedPrompt(inputs=inputs, text=text, tiles=(tile,))

    def teacher_forcing_inputs(self, prompt: PreparedPrompt, answer_ids: list[int]) -> dict[str, Any]:
        """The prompt's inputs with the answer appended: ``input_ids`` extended, ``attention_mask`` ones,
        ``mm_token_type_ids`` extended with 0 (text), ``pixel_values`` and ``image_grid_thw`` kept; the
        model recomputes the 3-D positions over the whole sequence."""
        input_ids = prompt.inputs["input_ids"]
        appended = torch.tensor([answer_ids], dtype=input_ids.dtype, device=input_ids.device)
        inputs = dict(prompt.inputs)
        inputs["input_ids"] = torch.cat([input_ids, appended], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        for name in PER_TOKEN_INPUTS:
            value = prompt.inputs.get(name)
            if isinstance(value, torch.Tensor):
                inputs[name] = torch.cat([value, torch.zeros_like(appended, dtype=value.dtype)], dim=1)
        return inputs

    continues_prompt_cache = True

    def continuation_inputs(
        self, model: torch.nn.Module, prompt: PreparedPrompt, answer_ids: list[int], start: int
    ) -> dict[str, Any]:
        """``continued_tokens`` with their 3-D M-RoPE positions, taken from the model's ``get_rope_index``
        over the whole teacher-forcing sequence (passed explicitly, so the model's stored ``rope_deltas``,
        which any other generation overwrites, play no part), and a mask over cache + new tokens."""
        input_ids = continued_tokens(prompt, answer_ids, start)
        length = input_ids.shape[1]
        full = self.teacher_forcing_inputs(prompt, answer_ids)
        names = ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
        positions, _ = model.model.get_rope_index(**{name: full[name] for name in names if name in full})
        mask = torch.ones((1, start + length), dtype=torch.long, device=input_ids.device)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions[..., start : start + length].to(input_ids.device),
        }

    def default_layer(self, config: Any) -> int | None:
        """The block at the paper's relative depth (20 / 32): 17 of 28 (Qwen2-VL-7B, Qwen2.5-VL-7B,
        Qwen3-VL-2B), 22 of 36 (Qwen2.5-VL-3B, Qwen3-VL-4B / 8B), 50 of 80 (Qwen2.5-VL-72B)."""
        return relative_depth_layer(config)

    def check_sequence_length(self, model: torch.nn.Module, layer: int, length: int) -> None:
        """Refuse a sequence longer than block ``layer``'s sliding window, when that block has one."""
        attention = self.decoder_layers(model)[layer].self_attn
        window = sliding_window_of(model, attention, layer)
        if window is not None and length > window:
            raise UnsupportedModelError(
                f"the sequence ({length} tokens) exceeds block {layer}'s sliding window ({window}); read a "
                "full-attention block or shorten the prompt"
            )

    def end_token_ids(self, processor: Any) -> frozenset[int]:
        """``<|im_end|>`` and ``<|endoftext|>``, where the tokenizer has them."""
        tokenizer = processor.tokenizer
        found: set[int] = set()
        for token in END_OF_TURN_TOKENS:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                found.add(token_id)
        return frozenset(found)
