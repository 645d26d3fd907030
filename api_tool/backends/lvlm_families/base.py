"""The contract of an LVLM family adapter: everything that differs between LLaVA-1.5, Qwen2-VL, Gemma 3...

The shared mechanism (``api_tool.backends.lvlm``) runs the model, hooks one decoder block's
self-attention and recomputes that block's queries and keys for the positions it needs. What it asks
of a family is small:

* which decoder blocks there are, and how the block's attention turns hidden states into rotary-
  embedded queries / keys (``project``: 1-D RoPE for Llama-style blocks, Qwen's 3-D M-RoPE, q/k norms);
* how an image and a question become model inputs (``prepare``), and where the image tokens sit:
  one ``Tile`` per grid of image tokens, with the part of the *original* image that grid covers;
* how the prompt is extended by an answer for teacher forcing (``teacher_forcing_inputs``).

``FamilyAdapter`` is the base class adapters derive from: it gives the common answers (Llama-style
``project``, the prompt extended by the answer, the language model's own sliding-window limit, no extra
end tokens, the table's default block) and leaves ``check_model``, ``decoder_layers`` and ``prepare``.

Attention is normalised over the union of all tiles' image tokens (softmax over those keys only),
then each tile's share is laid back on the original image by ``api_tool.geometry.stitch_tiles``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from PIL import Image

from api_tool.errors import UnsupportedModelError
from api_tool.geometry import Box

Projection = Literal["q", "k"]


@dataclass(frozen=True)
class Tile:
    """One grid of image tokens and where it lies on the original image.

    Attributes:
        positions: ``(rows * cols,)`` sequence positions of the tile's image tokens, row-major
            (cell ``(r, c)`` is ``positions[r * cols + c]``); separator or newline tokens excluded.
        grid: ``(rows, cols)``.
        box: ``(x0, y0, x1, y1)`` in original-image pixels covered by the whole grid: cell ``(r, c)``
            spans ``x0 + c * (x1 - x0) / cols`` to ``x0 + (c + 1) * (x1 - x0) / cols`` (and likewise in
            y). The box may reach past the image (letterbox padding); the part outside is dropped.
    """

    positions: torch.Tensor
    grid: tuple[int, int]
    box: Box


@dataclass(frozen=True)
class PreparedPrompt:
    """One (image, question) ready for the model: prefill inputs on the model's device, the prompt text
    (to find an answer's tokens for teacher forcing) and the image tiles."""

    inputs: dict[str, Any]
    text: str
    tiles: tuple[Tile, ...]

    @property
    def length(self) -> int:
        """Tokens in the prompt."""
        return int(self.inputs["input_ids"].shape[1])

    @property
    def image_positions(self) -> torch.Tensor:
        """Every tile's image-token positions, tile after tile: the keys the attention is normalised over."""
        return torch.cat([tile.positions for tile in self.tiles])


@runtime_checkable
class LvlmFamilyAdapter(Protocol):
    """What one LVLM family tells the shared mechanism (see the module docstring)."""

    name: str

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Raise ``UnsupportedModelError`` for a model / processor this adapter cannot attribute exactly."""
        ...

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The language model's decoder blocks; block ``i``'s ``self_attn`` is what gets hooked."""
        ...

    def project(
        self,
        attention: torch.nn.Module,
        projection: Projection,
        hidden: torch.Tensor,
        position_embeddings: Any,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Queries (``"q"``) or keys (``"k"``) of ``hidden (B, S, E)`` as the block computes them, rotary
        embedding applied, for ``positions`` only (all when ``None``): ``(B, heads, len, head_dim)`` fp32.
        ``position_embeddings`` is what the block's attention received (e.g. ``(cos, sin)``)."""
        ...

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """Model inputs for ``image`` and ``question`` with the assistant's turn opened, and the tiles."""
        ...

    def teacher_forcing_inputs(self, prompt: PreparedPrompt, answer_ids: list[int]) -> dict[str, Any]:
        """Inputs for one forward pass over the prompt followed by ``answer_ids``."""
        ...

    continues_prompt_cache: bool
    """Whether ``continuation_inputs`` is exact for this family (teacher forcing may then reuse a prompt's
    KV cache)."""

    def continuation_inputs(
        self, model: torch.nn.Module, prompt: PreparedPrompt, answer_ids: list[int], start: int
    ) -> dict[str, Any]:
        """Inputs for a pass that continues a KV cache of the prompt's first ``start`` positions with the
        rest of the prompt + answer sequence, ``max(1, len(answer_ids))`` tokens from ``start`` on."""
        ...

    def default_layer(self, config: Any) -> int | None:
        """The block to read when the caller names none (``None``: the family table's default)."""
        ...

    def check_sequence_length(self, model: torch.nn.Module, layer: int, length: int) -> None:
        """Raise ``UnsupportedModelError`` when block ``layer`` cannot see ``length`` tokens back (a sliding
        window shorter than the sequence: the recomputed scores over every image key would be wrong)."""
        ...

    def end_token_ids(self, processor: Any) -> frozenset[int]:
        """Ids that end an answer besides the configured EOS ids (e.g. an end-of-turn marker)."""
        ...


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(-x2, x1)`` for the two halves of the last dimension (the Llama RoPE convention)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``states (B, H, S, D)`` with ``cos, sin (B, S, D)``."""
    return states * cos[:, None] + rotate_half(states) * sin[:, None]


def split_heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(B, S, H * D) -> (B, H, S, D)``."""
    batch, length, _ = projected.shape
    return projected.view(batch, length, -1, head_dim).transpose(1, 2)


def rope_project(
    attention: torch.nn.Module,
    projection: Projection,
    hidden: torch.Tensor,
    position_embeddings: Any,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """``LvlmFamilyAdapter.project`` for Llama-style blocks (Llama, Mistral, Qwen2, Qwen3): see
    ``rotate_projected``, with the ``(cos, sin)`` the block received."""
    if position_embeddings is None:
        raise UnsupportedModelError(
            "the attention layer received no rotary position embeddings; this transformers version computes "
            "them inside the layer, which the attention probe cannot follow (upgrade transformers)"
        )
    cos, sin = (part if part.dim() == 3 else part[None] for part in position_embeddings)
    return rotate_projected(attention, projection, hidden, cos, sin, positions)


def rotate_projected(
    attention: torch.nn.Module,
    projection: Projection,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """Queries / keys as the block computes them, for ``positions`` only (all when ``None``): ``q_proj`` /
    ``k_proj`` in the model's dtype, the block's per-head ``q_norm`` / ``k_norm`` when it has them (Qwen3,
    Qwen3-VL), then rotary embedding with ``cos, sin (B, S, D)`` in fp32. Returns ``(B, heads, len, D)`` fp32."""
    if positions is not None:
        hidden, cos, sin = hidden[:, positions], cos[:, positions], sin[:, positions]
    linear = attention.q_proj if projection == "q" else attention.k_proj
    norm = getattr(attention, "q_norm" if projection == "q" else "k_norm", None)
    batch, length, _ = hidden.shape
    states = linear(hidden).view(batch, length, -1, int(attention.head_dim))
    if norm is not None:
        states = norm(states)
    return apply_rotary(states.transpose(1, 2).float(), cos.float(), sin.float())


def language_model_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder blocks: ``model.model.language_model.layers`` (transformers >= 4.52),
    else ``model.language_model.model.layers`` or ``model.model.layers``."""
    inner = getattr(model, "model", None)
    candidates = (
        getattr(getattr(inner, "language_model", None), "layers", None),
        getattr(getattr(getattr(model, "language_model", None), "model", None), "layers", None),
        getattr(inner, "layers", None),
    )
    for layers in candidates:
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise UnsupportedModelError(f"cannot find the decoder blocks of {type(model).__name__}")


def check_plain_rotary_attention(attention: torch.nn.Module) -> None:
    """Refuse an attention layer whose scores ``rope_project`` cannot recompute (no q/k projections, or
    q/k norms it does not apply)."""
    missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
    if missing or hasattr(attention, "q_norm"):
        raise UnsupportedModelError(
            f"{type(attention).__name__} is not a plain rotary attention layer (missing {missing} or has q/k "
            "norms); its scores cannot be recomputed"
        )


def image_processing_device(processor: Any, model: torch.nn.Module) -> dict[str, Any]:
    """``{"device": ...}`` for a processor call when the image processor runs on torch tensors (transformers'
    torchvision backend) and the model sits on a GPU: resizing and normalising the image there instead of
    on the CPU (about 100 ms for a 1280 x 960 photo on a small CPU). Empty otherwise (PIL/NumPy processors,
    CPU models), so results on the CPU are unchanged."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
    except ImportError:
        return {}
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda" or not isinstance(getattr(processor, "image_processor", None), TorchvisionBackend):
        return {}
    return {"device": device}


def continued_tokens(prompt: PreparedPrompt, answer_ids: list[int], start: int) -> torch.Tensor:
    """``(1, max(1, len(answer_ids)))`` token ids of prompt + answer from position ``start`` on: what a pass
    continuing a cache of ``start`` positions feeds so that its queries are teacher forcing's from ``start``.

    Example:
        >>> prompt = PreparedPrompt({"input_ids": torch.tensor([[1, 2, 3]])}, "", ())
        >>> continued_tokens(prompt, [7, 8], 2).tolist()
        [[3, 7]]
    """
    input_ids = prompt.inputs["input_ids"]
    appended = torch.tensor([answer_ids], dtype=input_ids.dtype, device=input_ids.device).reshape(1, -1)
    sequence = torch.cat([input_ids, appended], dim=1)
    return sequence[:, start : start + max(1, len(answer_ids))]


def appended_inputs(prompt: PreparedPrompt, answer_ids: list[int]) -> dict[str, Any]:
    """The prompt's inputs with ``answer_ids`` appended: ``input_ids`` extended, ``attention_mask`` all
    ones, other per-token tensors (``token_type_ids``...) extended with zeros, the rest (pixels, grids)
    kept. The default ``teacher_forcing_inputs``."""
    input_ids = prompt.inputs["input_ids"]
    appended = torch.tensor([answer_ids], dtype=input_ids.dtype, device=input_ids.device)
    inputs = dict(prompt.inputs)
    inputs["input_ids"] = torch.cat([input_ids, appended], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for name, value in prompt.inputs.items():
        per_token = isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == input_ids.shape
        if name not in ("input_ids", "attention_mask") and per_token:
            inputs[name] = torch.cat([value, torch.zeros_like(appended, dtype=value.dtype)], dim=1)
    return inputs


class FamilyAdapter:
    """The common answers of an ``LvlmFamilyAdapter``; a family adapter derives from it and supplies
    ``name``, ``check_model``, ``decoder_layers`` and ``prepare`` (and overrides what differs)."""

    name: str = ""

    def check_model(self, model: torch.nn.Module, processor: Any) -> None:
        """Refuse what the adapter cannot attribute exactly (every adapter says what it takes)."""
        raise NotImplementedError

    def decoder_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The language model's decoder blocks."""
        raise NotImplementedError

    def prepare(self, model: torch.nn.Module, processor: Any, image: Image.Image, question: str) -> PreparedPrompt:
        """Model inputs for ``image`` and ``question`` and the tiles."""
        raise NotImplementedError

    def project(
        self,
        attention: torch.nn.Module,
        projection: Projection,
        hidden: torch.Tensor,
        position_embeddings: Any,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        """Llama-style queries / keys with 1-D RoPE (``rope_project``)."""
        return rope_project(attention, projection, hidden, position_embeddings, positions)

    def teacher_forcing_inputs(self, prompt: PreparedPrompt, answer_ids: list[int]) -> dict[str, Any]:
        """The prompt's inputs with the answer appended (``appended_inputs``)."""
        return appended_inputs(prompt, answer_ids)

    continues_prompt_cache: bool = False
    """Off unless the adapter's ``continuation_inputs`` is proven equal to teacher forcing by tests."""

    def continuation_inputs(
        self, model: torch.nn.Module, prompt: PreparedPrompt, answer_ids: list[int], start: int
    ) -> dict[str, Any]:
        """1-D positions: ``continued_tokens``, an attention mask over cache + new tokens, positions from
        ``start`` on."""
        input_ids = continued_tokens(prompt, answer_ids, start)
        length = input_ids.shape[1]
        positions = torch.arange(start, start + length, device=input_ids.device)[None]
        mask = torch.ones((1, start + length), dtype=torch.long, device=input_ids.device)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}

    def default_layer(self, config: Any) -> int | None:
        """``None``: the family table's default block."""
        return None

    def check_sequence_length(self, model: torch.nn.Module, layer: int, length: int) -> None:
        """Refuse sequences longer than the language model's sliding window, when it uses one."""
        text_config = getattr(model.config, "text_config", model.config)
        window = getattr(text_config, "sliding_window", None)
        if window and getattr(text_config, "use_sliding_window", True) and length > window:
            raise UnsupportedModelError(
                f"the sequence ({length} tokens) exceeds the language model's sliding window ({window})"
            )

    def end_token_ids(self, processor: Any) -> frozenset[int]:
        """No end tokens beyond the configured EOS ids."""
        return frozenset()
