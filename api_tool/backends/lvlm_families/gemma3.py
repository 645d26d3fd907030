"""Gemma 3 (``model_type`` ``"gemma3"``, ``Gemma3ForConditionalGeneration``): the family adapter.

Image-token layout. The processor expands the one ``<start_of_image>`` of the chat template into
``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>`` + ``<end_of_image>\\n\\n``. The
SigLIP tower sees one square ``image_size`` input (896 px for the released models) as a ``P x P`` patch grid
(``P = image_size / patch_size``, 64), and the projector average-pools it to ``T x T`` tokens
(``T = sqrt(mm_tokens_per_image)``, 16), flattened row-major. So there is one tile: the ``T * T`` soft tokens
(``config.image_token_id``) in order, cell ``(r, c)`` covering input pixels ``[c * S / T, (c + 1) * S / T] x
[r * S / T, (r + 1) * S / T]`` with ``S = image_size``. The ``<start_of_image>`` / ``<end_of_image>`` markers
are not image tokens.

Geometry. Pan-and-scan is switched off (``do_pan_and_scan=False``) and nothing is resized by the processor
(``do_resize=False``): the image is letterboxed here onto the ``S x S`` input (scaled so its longer side is
``S``, centred, padded with the processor's mean colour, which normalises to about zero), so the grid box in
original-image pixels is exact: with the image scaled to ``(sw, sh)`` and pasted at ``(ox, oy)``, the tile's box
is ``(-ox * w / sw, -oy * h / sh, (S - ox) * w / sw, (S - oy) * h / sh)`` and reaches past the image on the
padded sides.

Attention. Gemma 3's text attention normalises queries and keys per head with its RMSNorm (``x / rms(x) *
(1 + w)``, in fp32, cast back) *before* RoPE, scales scores by ``query_pre_attn_scalar ** -0.5`` (the module's
``scaling``; not ``head_dim ** -0.5``), and alternates sliding-window blocks (local RoPE base, 10 000) with
global blocks (global RoPE base 1 000 000, linearly scaled in the 4B/12B/27B models). Each block receives the
``(cos, sin)`` of its own layer type; ``project`` applies exactly what the hooked block received. A
sliding block only sees keys less than ``sliding_window`` positions back: ``check_sequence_length`` refuses
longer sequences at such a block (the recomputed scores would include keys the model masked out).

At prefill the image tokens attend to each other bidirectionally (``token_type_ids`` = 1 on the soft tokens);
text queries, the only ones scored, stay causal and see every image key. The prepared inputs therefore carry
``token_type_ids``, and teacher forcing extends them with zeros over the answer, so the image tokens' hidden
states are those of generation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image

from api_tool.backends.lvlm_families.base import (
    FamilyAdapter,
    PreparedPrompt,
    Projection,
    Tile,
    apply_rotary,
    image_processing_device,
    split_heads,
)
from api_tool.backends.lvlm_families.llava import letterbox_tile_box
from api_tool.errors import ImageTokenError, LayerOutOfRangeError, UnsupportedModelError
from api_tool.geometry import Letterbox

MODEL_TYPES: tuple[str, ...] = ("gemma3",)
TEXT_MODEL_TYPES: tuple[str, ...] = ("gemma3_text",)
VISION_MODEL_TYPES: tuple[str, ...] = ("siglip_vision_model",)
LAYER_FRACTION = 20 / 32
"""Relative depth of the block the paper reads in LLaVA-1.5 (block 20 of 32)."""
GEMMA3_PROMPT = "{bos}<start_of_turn>user\n{image}{question}<end_of_turn>\n<start_of_turn>model\n"
"""Gemma 3's prompt for one image and question, used when the processor has no chat template."""


# ----------------------------------------------------------------------------------------------
# The maths.
# ----------------------------------------------------------------------------------------------


def gemma_rms_norm(states: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm over the last dimension: ``x / sqrt(mean(x^2) + eps) * (1 + w)`` in fp32, cast back
    to ``states``' dtype (as ``Gemma3RMSNorm`` does: the scale is applied before the cast).

    Example:
        >>> gemma_rms_norm(torch.tensor([[3.0, 4.0]]), torch.tensor([0.0, 1.0]), eps=0.0)
        tensor([[0.8485, 2.2627]])
    """
    normalised = states.float() * torch.rsqrt(states.float().pow(2).mean(-1, keepdim=True) + eps)
    return (normalised * (1.0 + weight.float())).type_as(states)


def tokens_per_side(config: Any) -> int:
    """``T`` of the ``T x T`` pooled image-token grid (``sqrt(mm_tokens_per_image)``); refuses a pooling the
    grid geometry cannot describe (a non-square token count, patches not tiling the input or the grid)."""
    tokens = int(config.mm_tokens_per_image)
    side = math.isqrt(tokens)
    vision = config.vision_config
    image_size, patch_size = int(vision.image_size), int(vision.patch_size)
    patches = image_size // patch_size
    if side * side != tokens or image_size % patch_size or patches % side:
        raise UnsupportedModelError(
            f"mm_tokens_per_image={tokens} over a {image_size}px input with {patch_size}px patches does not pool "
            "the patch grid evenly into a square token grid; its tokens cannot be placed on the image"
        )
    return side


def default_layer(config: Any) -> int:
    """The block read when none is given: the config's ``api_attribution_layer`` if set, else the global
    (``full_attention``) block nearest the paper's relative depth (20 / 32), the lower one on a tie.

    Global blocks see the whole sequence, so they have no sliding-window limit. Gemma-3-4B (34 blocks, every
    sixth global) gives block 23, 12B (48) block 29, 27B (62) block 41.

    Example:
        >>> from types import SimpleNamespace
        >>> kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]
        >>> default_layer(SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=34, layer_types=kinds)))
        23
    """
    recommended = getattr(config, "api_attribution_layer", None)
    if recommended is not None:
        return int(recommended)
    text_config = config.text_config
    blocks = int(text_config.num_hidden_layers)
    layer_types = list(getattr(text_config, "layer_types", None) or ["full_attention"] * blocks)
    candidates = [index for index, kind in enumerate(layer_types[:blocks]) if kind == "full_attention"]
    target = LAYER_FRACTION * blocks
    return min(candidates or range(blocks), key=lambda index: (abs(index - target), index))


# ----------------------------------------------------------------------------------------------
# The adapter.
# ----------------------------------------------------------------------------------------------


def _conversation(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class Gemma3Family(FamilyAdapter):
    """``LvlmFamilyAdapter`` for Gemma 3 (``Gemma3ForConditionalGeneration``, ``model_type`` ``"gemma3"``).

    Besides the protocol: ``check_sequence_length(model, layer, length)`` (the sliding-window limit of the
    hooked block), ``scaling(attention)`` (the score scale, ``query_pre_attn_scalar ** -0.5``) and
    ``default_layer(config)``.

    Example:
        >>> from tests.tiny_lvlms.gemma3 import build_tiny_gemma3
        >>> model, processor = build_tiny_gemma3()
        >>> adapter = Gemma3Family()
        >>> adapter.check_model(model, processor)
        >>> prompt = adapter.prepare(model, processor, Image.new("RGB", (60, 30)), "What is it?")
        >>> prompt.tiles[0].grid, prompt.tiles[0].box
        ((4, 4), (0.0, -15.0, 60.0, 45.0))
    """

    name = "gemma3"
    model_types = MODEL_TYPES

    # -- checks ------------------------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse what cannot be attributed exactly: another model class or tower, attention-logit
        softcapping (scores pass through ``tanh``), bidirectional text attention, q/k norms other than
        Gemma 3's RMSNorm, a token pooling that is not an even square grid, or a processor that does not
        match the model (no Gemma 3 processor, another image-token count or id)."""
        from transformers import Gemma3ForConditionalGeneration
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if not isinstance(model, Gemma3ForConditionalGeneration) or model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type {model_type!r}) is not a Gemma3ForConditionalGeneration; "
                "the gemma3 adapter handles Gemma 3 image-text models only"
            )
        text_config, vision_config = config.text_config, config.vision_config
        if getattr(text_config, "model_type", None) not in TEXT_MODEL_TYPES:
            raise UnsupportedModelError(f"a {text_config.model_type!r} language model is not a Gemma 3 text model")
        if getattr(vision_config, "model_type", None) not in VISION_MODEL_TYPES:
            raise UnsupportedModelError(f"a {vision_config.model_type!r} vision tower is not supported (SigLIP only)")
        if getattr(text_config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError(
                f"attention-logit softcapping ({text_config.attn_logit_softcapping}) passes the scores through "
                "tanh before the softmax; the recomputed q . k scores would not be the model's"
            )
        if getattr(text_config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(
                "use_bidirectional_attention lets text attend to later tokens; answer steps are not causal"
            )
        tokens_per_side(config)
        for index, block in enumerate(self.decoder_layers(model)):
            attention = block.self_attn
            missing = [
                name
                for name in ("q_proj", "k_proj", "q_norm", "k_norm", "head_dim", "scaling")
                if not hasattr(attention, name)
            ]
            if missing or not all(isinstance(getattr(attention, name), Gemma3RMSNorm) for name in ("q_norm", "k_norm")):
                raise UnsupportedModelError(
                    f"block {index}'s {type(attention).__name__} is not Gemma 3 attention (missing {missing} or "
                    "q/k norms other than Gemma3RMSNorm); its scores cannot be recomputed"
                )
        self._check_processor(model, processor)

    @staticmethod
    def _check_processor(model: torch.nn.Module, processor: Any) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        missing = [name for name in ("tokenizer", "image_processor", "image_token") if not hasattr(processor, name)]
        if missing or tokenizer is None:
            raise UnsupportedModelError(
                f"{type(processor).__name__} lacks {', '.join(missing)}; pass the model's Gemma3Processor"
            )
        config = model.config
        expected = int(config.mm_tokens_per_image)
        seq_length = getattr(processor, "image_seq_length", None)
        if seq_length is not None and int(seq_length) != expected:
            raise UnsupportedModelError(
                f"the processor expands an image into {seq_length} tokens; the model pools it into {expected}"
            )
        soft_token = getattr(tokenizer, "image_token", None)
        soft_id = tokenizer.convert_tokens_to_ids(soft_token) if soft_token else None
        if soft_id != int(config.image_token_id):
            raise UnsupportedModelError(
                f"the tokenizer's image soft token {soft_token!r} has id {soft_id}; the model's image_token_id is "
                f"{config.image_token_id}"
            )

    def check_sequence_length(self, model: torch.nn.Module, layer: int, length: int) -> None:
        """Refuse a ``length``-token sequence (prompt + answer) when block ``layer`` is a sliding-window block
        whose window it exceeds: a query there does not see keys ``sliding_window`` or more positions back,
        and the recomputed scores over every image key would not be the model's. Global blocks have no limit."""
        layers = self.decoder_layers(model)
        if not -len(layers) <= layer < len(layers):
            raise LayerOutOfRangeError(f"layer {layer} is out of range for {len(layers)} decoder blocks")
        window = getattr(layers[layer].self_attn, "sliding_window", None)
        if window is not None and length > int(window):
            raise UnsupportedModelError(
                f"the sequence ({length} tokens) exceeds the sliding window ({window}) of block {layer}; choose a "
                "global (full_attention) block or a shorter prompt / max_new_tokens"
            )

    # -- the protocol --------------------------------------------------------------------------------

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """``model.model.language_model.layers``."""
        layers = getattr(getattr(getattr(model, "model", None), "language_model", None), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise UnsupportedModelError(f"cannot find the decoder blocks of {type(model).__name__}")
        return layers

    @staticmethod
    def scaling(attention: torch.nn.Module) -> float:
        """The score scale of the block: ``query_pre_attn_scalar ** -0.5`` (``attention.scaling``)."""
        return float(attention.scaling)

    @staticmethod
    def default_layer(config: Any) -> int:
        """See ``default_layer``."""
        return default_layer(config)

    def project(
        self,
        attention: torch.nn.Module,
        projection: Projection,
        hidden: torch.Tensor,
        position_embeddings: Any,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Queries (``(B, heads, len, head_dim)``) or keys (``(B, kv_heads, len, head_dim)``) as the block
        computes them: projection, per-head Gemma RMSNorm (``q_norm`` / ``k_norm``), then RoPE with the
        ``(cos, sin)`` the block received (local or global base, whichever its layer type gets), all in the
        model's dtype like the block, returned in fp32."""
        if position_embeddings is None:
            raise UnsupportedModelError("the attention block received no rotary position embeddings")
        linear, norm = (
            (attention.q_proj, attention.q_norm) if projection == "q" else (attention.k_proj, attention.k_norm)
        )
        cos, sin = (part if part.dim() == 3 else part[None] for part in position_embeddings)
        if positions is not None:
            hidden, cos, sin = hidden[:, positions], cos[:, positions], sin[:, positions]
        states = split_heads(linear(hidden), int(attention.head_dim))
        states = gemma_rms_norm(states, norm.weight, float(norm.eps))
        return apply_rotary(states, cos.to(states.dtype), sin.to(states.dtype)).float()

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """Letterbox ``image`` onto the square input, render the chat template with the model's turn opened,
        and run the processor without resizing or pan-and-scan. Inputs: ``input_ids``, ``attention_mask``,
        ``token_type_ids`` (1 on the image soft tokens: the bidirectional image block) and ``pixel_values``
        (one image), on the model's device. One tile: the ``T x T`` soft tokens."""
        config = model.config
        side = int(config.vision_config.image_size)
        grid = tokens_per_side(config)
        letterbox = Letterbox.fit(image.size, side)
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        fill = tuple(round(255 * float(m)) for m in mean)
        text = self.prompt_text(processor, question)
        placeholder = processor.image_token
        if text.count(placeholder) != 1:
            raise ImageTokenError(
                f"the rendered prompt holds {text.count(placeholder)} {placeholder!r} placeholders, expected exactly "
                f"one; check the processor's chat template: {text!r}"
            )
        bos = processor.tokenizer.bos_token
        encoded = processor(
            images=[letterbox.apply(image, fill)],
            text=text,
            return_tensors="pt",
            do_resize=False,
            do_pan_and_scan=False,
            add_special_tokens=not (bos and text.startswith(bos)),
            **image_processing_device(processor, model),
        )
        pixels = encoded["pixel_values"]
        if tuple(pixels.shape) != (1, 3, side, side):
            raise UnsupportedModelError(
                f"the processor produced pixel inputs of shape {tuple(pixels.shape)}; the vision tower takes one "
                f"{side}x{side} image (pan-and-scan crops are not supported)"
            )
        device = model.get_input_embeddings().weight.device
        input_ids = encoded["input_ids"]
        token_type_ids = encoded.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = (input_ids == int(config.image_token_id)).long()
        inputs = {
            "input_ids": input_ids.to(device),
            "attention_mask": encoded["attention_mask"].to(device),
            "token_type_ids": token_type_ids.to(device),
            "pixel_values": pixels.to(device, model.dtype),
        }
        positions = image_token_positions(inputs["input_ids"][0], int(config.image_token_id), grid)
        if not torch.equal(inputs["token_type_ids"][0].nonzero().flatten(), positions):
            raise ImageTokenError("token_type_ids do not mark exactly the image soft tokens")
        tile = Tile(positions=positions, grid=(grid, grid), box=letterbox_tile_box(letterbox))
        return PreparedPrompt(inputs=inputs, text=text, tiles=(tile,))

    # -- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def prompt_text(processor: Any, question: str) -> str:
        """The chat template with one image and ``question`` and the model's turn opened, or Gemma 3's format
        when the processor has no template."""
        if getattr(processor, "chat_template", None):
            return str(processor.apply_chat_template(_conversation(question), add_generation_prompt=True))
        return GEMMA3_PROMPT.format(
            bos=processor.tokenizer.bos_token or "", image=processor.image_token, question=question.strip()
        )


def image_token_positions(input_ids: torch.Tensor, token_id: int, grid: int) -> torch.Tensor:
    """The positions of the ``grid * grid`` image soft tokens, which must form one contiguous run.

    Example:
        >>> image_token_positions(torch.tensor([2, 6, 8, 8, 8, 8, 7]), 8, 2).tolist()
        [2, 3, 4, 5]
    """
    positions = (input_ids == token_id).nonzero().flatten()
    cells = grid * grid
    if positions.numel() != cells or (cells and int(positions[-1] - positions[0]) != cells - 1):
        raise ImageTokenError(
            f"the prompt holds {positions.numel()} image soft tokens (id {token_id}); one {grid}x{grid} image needs "
            f"{cells} in one run. Is exactly one image in the prompt, and does the processor's image_seq_length "
            "match the model's mm_tokens_per_image?"
        )
    return positions
