"""API-LLaVA: query-guided attribution from an LVLM's own attention to its image tokens.

The method of the paper's LLaVA variant (the authors' ``api_llava``), for transformers'
``LlavaForConditionalGeneration`` (the LLaVA-1.5 family):

1. prompt with the chat template (image + question) and decode greedily, up to ``max_new_tokens``;
2. at decoder block ``layer``, for the query position of every step (the last prompt token, then
   each generated token), take the pre-softmax scores ``q . k / sqrt(d)`` over the image-token keys
   only, softmax over those keys (so attention sinks outside the image drop out), mean over heads;
3. average over steps and reshape to the vision grid (24 x 24 for LLaVA-1.5-336);
4. post-process like the CLIP map's Psi_cls: minmax, sigmoid(coe * zscore), k x k mean filter, minmax.

With ``answer=`` the answer is scored by teacher forcing instead: one forward pass over prompt +
answer, stopped at block ``layer``'s attention (later blocks and the LM head never run), scoring the
positions that predict the answer's tokens.
On the model's own greedy answer this equals the generation path. ``focus=`` averages only the steps
that produce a chosen substring of the answer (the authors' demo variant).

A step is a position that predicts an answer token; the step that predicts the end-of-sequence
token is left out (the authors' code includes it), so a given answer scores the same whether or not
the generation that produced it was cut by ``max_new_tokens``. An empty answer scores the last
prompt position alone.

Attention capture: nothing forces eager attention and no layer's attention matrix is stored. A
forward pre-hook on block ``layer``'s self-attention receives the block's normalised hidden states
and rotary embeddings; the hook recomputes that block's keys for the image positions (once, at
prefill) and its queries for the needed positions only, with the block's own projections, RoPE and
grouped-query layout. SDPA and flash attention keep running the model itself; bf16/fp16 on GPU,
fp32 on CPU (the scores are computed in fp32).

Geometry: the image is letterboxed onto the model's square input with the processor's mean colour
(as LLaVA-1.5's "pad" mode does) before the processor sees it, with resizing and cropping switched
off, so the map on the patch grid aligns exactly with the original image.

The decoded first answer is returned in ``AttributionMap.metadata["answer"]`` (for ``answer=``,
the answer given). Other metadata: ``backend``, ``model``, ``layer`` (resolved, non-negative),
``mode`` ("generate" | "teacher_forcing"), ``focus``, ``steps`` (how many steps were averaged),
``step_tokens`` (their tokens), ``max_new_tokens``, ``enhance_coe``, ``kernel_size``.

Example:
    >>> from api_tool.backends.llava import LlavaAttributor
    >>> attributor = LlavaAttributor("llava-hf/llava-1.5-7b-hf", layer=20)  # doctest: +SKIP
    >>> amap = attributor.attribute("street.jpg", "What is the man holding?")  # doctest: +SKIP
    >>> amap.mask.shape, amap.metadata["answer"]  # doctest: +SKIP
    ((24, 24), 'The man is holding an umbrella.')
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, PretrainedConfig

from api_tool.backends.base import check_query, model_lock, resolve_device, resolve_layer
from api_tool.errors import (
    FocusNotFoundError,
    ImageTokenError,
    InvalidParameterError,
    InvalidQueryError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from api_tool.geometry import Letterbox
from api_tool.images import ImageRef, load_image
from api_tool.maps import AttributionMap, combine_maps

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
PAPER_LAYER = 20
"""The block the authors read in LLaVA-1.5 (32 or 40 blocks)."""
DEMO_MODEL = "demo"
SUPPORTED_TEXT_MODELS: tuple[str, ...] = ("llama", "mistral", "qwen2")
SUPPORTED_VISION_MODELS: tuple[str, ...] = ("clip_vision_model", "siglip_vision_model")
HUB_PROBE_TIMEOUT_S = 5.0
LLAVA_15_PROMPT = "USER: {image}\n{query} ASSISTANT:"
"""The LLaVA-1.5 prompt, used when the processor has no chat template."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ----------------------------------------------------------------------------------------------
# The maths: small pure functions on tensors.
# ----------------------------------------------------------------------------------------------


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


def image_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Head-averaged attention of each query over the image keys alone.

    ``queries (B, H, Q, D)``, ``keys (B, KV, N, D)`` with ``H`` a multiple of ``KV`` (grouped-query
    attention: query head ``h`` reads key head ``h // (H / KV)``). Returns ``(B, Q, N)``: the softmax
    over the N image keys of ``scaling * q . k``, averaged over the H heads (computed in fp32).

    Example:
        >>> q, k = torch.zeros(1, 4, 2, 8), torch.randn(1, 2, 5, 8)
        >>> image_attention(q, k, 0.35)[0, 0]
        tensor([0.2000, 0.2000, 0.2000, 0.2000, 0.2000])
    """
    batch, heads, length, head_dim = queries.shape
    kv_heads = keys.shape[1]
    grouped = queries.float().reshape(batch, kv_heads, heads // kv_heads, length, head_dim)
    scores = torch.einsum("bkgqd,bknd->bkgqn", grouped, keys.float()) * scaling
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def token_spans(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each token in the final text, from the decoded text of each token prefix.

    ``pieces[i]`` is the decoded text of tokens ``0..i``; token ``i`` covers what its prefix added.

    Example:
        >>> token_spans(["red", "red circle", "red circle."])
        [(0, 3), (3, 10), (10, 11)]
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for piece in pieces:
        end = max(start, len(piece))
        spans.append((start, end))
        start = end
    return spans


def focus_steps(answer: str, spans: Sequence[tuple[int, int]], focus: str) -> list[int]:
    """Indices of the tokens whose spans overlap the first occurrence of ``focus`` in ``answer``.

    The search is exact first, then case-insensitive.

    Example:
        >>> focus_steps("red circle.", [(0, 3), (3, 10), (10, 11)], "Circle")
        [1]
    """
    start = answer.find(focus)
    if start < 0:
        start = answer.lower().find(focus.lower())
    if start < 0:
        raise FocusNotFoundError(f"focus {focus!r} does not occur in the answer {answer!r}")
    end = start + len(focus)
    steps = [index for index, (first, last) in enumerate(spans) if first < end and last > start]
    if not steps:
        raise FocusNotFoundError(f"focus {focus!r} covers no token of the answer {answer!r}")
    return steps


# ----------------------------------------------------------------------------------------------
# Capturing one block's image attention.
# ----------------------------------------------------------------------------------------------


class _CaptureCompleteError(Exception):
    """Raised by the probe once it has its rows: the rest of the forward pass is not needed."""


class ImageAttentionProbe:
    """A forward pre-hook on one decoder block's self-attention that records image attention rows.

    On its first call (the prefill) it computes the keys of ``image_positions`` and scores the
    queries at ``query_positions``; on each later call (one decoding step with a KV cache) it scores
    the queries of every position passed in. ``rows`` holds one ``(Q, N)`` tensor per call. With
    ``stop_after_first`` the first call ends the forward pass (teacher forcing needs no logits).
    """

    def __init__(
        self,
        attention: torch.nn.Module,
        image_positions: torch.Tensor,
        query_positions: torch.Tensor,
        *,
        stop_after_first: bool,
    ) -> None:
        self.attention = attention
        self.image_positions = image_positions
        self.query_positions = query_positions
        self.stop_after_first = stop_after_first
        self.keys: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if rotary is None:
            raise UnsupportedModelError(
                "the attention layer received no rotary position embeddings; this transformers version "
                "computes them inside the layer, which API-LLaVA cannot follow (upgrade transformers)"
            )
        cos, sin = (part if part.dim() == 3 else part[None] for part in rotary)
        if self.keys is None:
            self.keys = self._project(module.k_proj, hidden, cos, sin, self.image_positions)
            queries = self._project(module.q_proj, hidden, cos, sin, self.query_positions)
        else:
            queries = self._project(module.q_proj, hidden, cos, sin, None)
        self.rows.append(image_attention(queries, self.keys, float(module.scaling))[0])
        if self.stop_after_first:
            raise _CaptureCompleteError

    def _project(
        self,
        projection: torch.nn.Module,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor | None,
    ) -> torch.Tensor:
        if positions is not None:
            hidden, cos, sin = hidden[:, positions], cos[:, positions], sin[:, positions]
        states = split_heads(projection(hidden), int(self.attention.head_dim)).float()
        return apply_rotary(states, cos.float(), sin.float())

    @contextmanager
    def attached(self) -> Iterator[ImageAttentionProbe]:
        """Hook the attention module for the duration of the ``with`` block."""
        handle = self.attention.register_forward_pre_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


# ----------------------------------------------------------------------------------------------
# The attributor.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prompt:
    """One (letterboxed image, question) ready for the model."""

    inputs: dict[str, torch.Tensor]
    text: str
    image_positions: torch.Tensor
    letterbox: Letterbox

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


@dataclass(frozen=True)
class _Steps:
    """The attention rows of one answer, one per step, and the answer's tokens."""

    rows: torch.Tensor
    answer_ids: list[int]
    answer: str


class LlavaAttributor:
    """API-LLaVA attributor for ``LlavaForConditionalGeneration`` models (LLaVA-1.5 family).

    Args:
        model: a transformers hub id (cached locally, or downloadable when online), a local
            directory written by ``save_pretrained`` (model and processor), or ``"demo"`` for the
            project's trained demo LLaVA shipped in ``api_tool/demo/weights/llava``.
        layer: decoder block index; negative counts from the end (the authors use 20 of 32/40).
        device: "cuda", "mps", "cpu" or ``None`` (CUDA, then MPS, then CPU).
        dtype: ``torch.dtype`` or "bfloat16" / "float16" / "float32"; ``None`` picks bf16 on CUDA
            (fp16 without bf16 support), fp16 on MPS and fp32 on CPU.
        max_new_tokens: greedy decoding budget of the generation path.
        enhance_coe, kernel_size: post-processing, see ``api_tool.maps.combine_maps`` ("cls" recipe).

    Offline, a hub id that is not in the local cache fails within seconds with
    ``WeightsUnavailableError``; LLaVA-NeXT, Qwen2-VL and other image-text-to-text classes are
    refused with ``UnsupportedModelError``.

    Example:
        >>> attributor = LlavaAttributor("path/to/llava-dir", layer=-12, device="cpu")  # doctest: +SKIP
        >>> first = attributor.attribute("photo.jpg", "What colour is the car?")  # doctest: +SKIP
        >>> again = attributor.attribute("photo.jpg", "What colour is the car?",
        ...                              answer=first.metadata["answer"], focus="car")  # doctest: +SKIP
    """

    name = "llava"

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        layer: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 20,
        enhance_coe: float = 10.0,
        kernel_size: int = 3,
    ) -> None:
        target = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, target)
        loaded, processor = load_llava(model, torch_dtype, layer=layer)
        self._bind(loaded.to(target), processor, str(model), layer, max_new_tokens, enhance_coe, kernel_size)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        processor: Any,
        *,
        layer: int | None = None,
        max_new_tokens: int = 20,
        enhance_coe: float = 10.0,
        kernel_size: int = 3,
        model_name: str | None = None,
    ) -> LlavaAttributor:
        """An attributor over an already-loaded model and processor (shared, not copied or moved).

        Example:
            >>> attributor = LlavaAttributor.from_model(model, processor, layer=20)  # doctest: +SKIP
        """
        attributor = cls.__new__(cls)
        name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        attributor._bind(model, processor, name, layer, max_new_tokens, enhance_coe, kernel_size)
        return attributor

    def _bind(
        self,
        model: torch.nn.Module,
        processor: Any,
        model_name: str,
        layer: int | None,
        max_new_tokens: int,
        enhance_coe: float,
        kernel_size: int,
    ) -> None:
        check_llava_model(model)
        check_processor(processor)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidParameterError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        combine_maps(np.zeros((2, 2)), None, combine="cls", enhance_coe=enhance_coe, kernel_size=kernel_size)
        self.model = model.eval()
        self.processor = processor
        self.model_name = model_name
        self.layers = decoder_layers(model)
        chosen = layer if layer is not None else default_attribution_layer(model.config)
        self.layer = resolve_layer(chosen, len(self.layers), "language model")
        self.max_new_tokens = max_new_tokens
        self.enhance_coe = float(enhance_coe)
        self.kernel_size = kernel_size
        vision = model.config.vision_config
        self.side = int(vision.image_size)
        self.grid = (self.side // int(vision.patch_size), self.side // int(vision.patch_size))
        self.image_token_id = image_token_id(model.config)
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.fill = tuple(round(255 * float(m)) for m in mean)
        self.eos_ids = end_token_ids(model, processor.tokenizer)
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self._lock = model_lock(model)

    @property
    def device(self) -> torch.device:
        """Where the model's input embeddings live (inputs are sent there)."""
        return self.model.get_input_embeddings().weight.device

    # -- public API ----------------------------------------------------------------------------

    def attribute(
        self, image: ImageRef, query: str, answer: str | None = None, focus: str | None = None
    ) -> AttributionMap:
        """The map for one image and question; the answer is in ``metadata["answer"]``.

        Without ``answer`` the model answers greedily and its attention while answering is used;
        with ``answer`` that answer is scored by teacher forcing (no generation). ``focus``
        averages only the steps producing that substring of the answer.
        """
        return self._attribute(load_image(image), query, answer, focus)

    def attribute_many(self, image: ImageRef, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per question on the same image (loaded once; one generation per question)."""
        loaded = load_image(image)
        return [self._attribute(loaded, query, None, None) for query in queries]

    def attribute_batch(
        self,
        images: Sequence[ImageRef],
        queries: Sequence[str],
        answers: Sequence[str | None] | None = None,
    ) -> list[AttributionMap]:
        """One map per ``(images[i], queries[i])``, optionally scoring ``answers[i]``; run one by one.

        Greedy answers differ in length, so pairs run sequentially at batch size 1.
        """
        if len(images) != len(queries):
            raise InvalidQueryError(f"got {len(images)} images but {len(queries)} queries; pass one query per image")
        chosen = list(answers) if answers is not None else [None] * len(queries)
        if len(chosen) != len(queries):
            raise InvalidQueryError(f"got {len(queries)} queries but {len(chosen)} answers; pass one per query")
        return [
            self._attribute(load_image(image), query, answer, None)
            for image, query, answer in zip(images, queries, chosen)
        ]

    # -- internals -----------------------------------------------------------------------------

    def _attribute(self, image: Image.Image, query: str, answer: str | None, focus: str | None) -> AttributionMap:
        question = check_query(query)
        if answer is not None and not isinstance(answer, str):
            raise InvalidParameterError(f"answer must be a string or None, got {type(answer).__name__}")
        if focus is not None and (not isinstance(focus, str) or not focus.strip()):
            raise InvalidParameterError("focus must be a non-empty substring of the answer, or None")
        with self._lock, torch.inference_mode():
            prompt = self._prompt(image, question)
            steps = self._generate(prompt) if answer is None else self._teacher_force(prompt, question, answer)
        selected = self._select(steps, focus)
        raw = steps.rows[selected].mean(dim=0).reshape(self.grid).double().cpu().numpy()
        mask = combine_maps(raw, None, combine="cls", enhance_coe=self.enhance_coe, kernel_size=self.kernel_size)
        tokenizer = self.processor.tokenizer
        step_tokens = [
            tokenizer.convert_ids_to_tokens(steps.answer_ids[i]) for i in selected if i < len(steps.answer_ids)
        ]
        return AttributionMap(
            cls=raw,
            comp=None,
            mask=mask,
            image_size=image.size,
            grid_box=prompt.letterbox.grid_box(self.grid),
            query=question,
            metadata={
                "backend": self.name,
                "model": self.model_name,
                "layer": self.layer,
                "mode": "generate" if answer is None else "teacher_forcing",
                "answer": steps.answer if answer is None else answer,
                "focus": focus,
                "steps": len(selected),
                "step_tokens": step_tokens,
                "max_new_tokens": self.max_new_tokens,
                "enhance_coe": self.enhance_coe,
                "kernel_size": self.kernel_size,
            },
        )

    def _prompt(self, image: Image.Image, question: str) -> _Prompt:
        letterbox = Letterbox.fit(image.size, self.side)
        text = prompt_text(self.processor, question)
        image_token = self.processor.image_token
        if text.count(image_token) != 1:
            raise ImageTokenError(
                f"the rendered prompt holds {text.count(image_token)} {image_token!r} placeholders, expected "
                f"exactly one; check the processor's chat template: {text!r}"
            )
        encoded = self.processor(
            images=letterbox.apply(image, self.fill),
            text=text,
            return_tensors="pt",
            do_resize=False,
            do_center_crop=False,
        )
        pixels = encoded["pixel_values"]
        if tuple(pixels.shape[-2:]) != (self.side, self.side):
            raise UnsupportedModelError(
                f"the processor produced {tuple(pixels.shape[-2:])} pixel inputs; the vision tower takes "
                f"{self.side}x{self.side} (tiled or any-resolution processors are not supported)"
            )
        inputs = {
            "input_ids": encoded["input_ids"].to(self.device),
            "attention_mask": encoded["attention_mask"].to(self.device),
            "pixel_values": pixels.to(self.device, self.model.dtype),
        }
        positions = image_positions(inputs["input_ids"][0], self.image_token_id, self.grid)
        return _Prompt(inputs=inputs, text=text, image_positions=positions, letterbox=letterbox)

    def _probe(self, prompt: _Prompt, query_positions: torch.Tensor, *, stop_after_first: bool) -> ImageAttentionProbe:
        attention = self.layers[self.layer].self_attn
        return ImageAttentionProbe(
            attention, prompt.image_positions, query_positions, stop_after_first=stop_after_first
        )

    def _generate(self, prompt: _Prompt) -> _Steps:
        check_sequence_length(self.model, prompt.length + self.max_new_tokens)
        last = torch.tensor([prompt.length - 1], device=self.device)
        probe = self._probe(prompt, last, stop_after_first=False)
        answer_ids: list[int] = []
        with probe.attached():
            output = self.model(**prompt.inputs, use_cache=True, **self._last_logits_only)
            while True:
                token = int(output.logits[0, -1].argmax())
                if token in self.eos_ids:
                    break
                answer_ids.append(token)
                if len(answer_ids) == self.max_new_tokens:
                    break
                step_input = torch.tensor([[token]], device=self.device)
                cache = {self._cache_argument: model_cache(output)}
                output = self.model(input_ids=step_input, use_cache=True, **cache, **self._last_logits_only)
        rows = torch.cat(probe.rows)[: max(1, len(answer_ids))]
        answer = self.processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        return _Steps(rows=rows, answer_ids=answer_ids, answer=answer)

    def _teacher_force(self, prompt: _Prompt, question: str, answer: str) -> _Steps:
        answer_ids = answer_token_ids(self.processor, prompt.text, question, answer)
        check_sequence_length(self.model, prompt.length + len(answer_ids))
        first = prompt.length - 1
        queries = torch.arange(first, first + max(1, len(answer_ids)), device=self.device)
        probe = self._probe(prompt, queries, stop_after_first=True)
        appended = torch.tensor([answer_ids], dtype=torch.long, device=self.device)
        input_ids = torch.cat([prompt.inputs["input_ids"], appended], dim=1)
        with probe.attached(), suppress(_CaptureCompleteError):
            self.model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pixel_values=prompt.inputs["pixel_values"],
                use_cache=False,
            )
        decoded = self.processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        return _Steps(rows=torch.cat(probe.rows), answer_ids=answer_ids, answer=decoded)

    def _select(self, steps: _Steps, focus: str | None) -> list[int]:
        if focus is None:
            return list(range(steps.rows.shape[0]))
        tokenizer = self.processor.tokenizer
        pieces = [
            tokenizer.decode(steps.answer_ids[: index + 1], skip_special_tokens=True).lstrip()
            for index in range(len(steps.answer_ids))
        ]
        return focus_steps(steps.answer, token_spans(pieces), focus)


# ----------------------------------------------------------------------------------------------
# Prompts and tokens.
# ----------------------------------------------------------------------------------------------


def _conversation(question: str, answer: str | None = None) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def prompt_text(processor: Any, question: str) -> str:
    """The generation prompt for one image and ``question``: the processor's chat template with the
    assistant turn opened, or LLaVA-1.5's format when the processor has none.

    Example:
        >>> from api_tool.demo.tiny_llava import build_tiny_llava_processor
        >>> prompt_text(build_tiny_llava_processor(), "What colour is it?")
        'USER: <image>\\nWhat colour is it? ASSISTANT:'
    """
    if getattr(processor, "chat_template", None):
        return str(processor.apply_chat_template(_conversation(question), add_generation_prompt=True))
    return LLAVA_15_PROMPT.format(image=processor.image_token, query=question)


def answer_token_ids(processor: Any, prompt: str, question: str, answer: str) -> list[int]:
    """The token ids that follow ``prompt`` when the assistant's turn holds ``answer``.

    The conversation with the answer is rendered by the chat template (left open, without the
    end-of-turn marker) and tokenised as a whole; the answer's ids are what comes after the prompt's
    ids. If the tokeniser merges across that boundary, the answer's text is tokenised on its own.
    """
    tokenizer = processor.tokenizer
    if getattr(processor, "chat_template", None):
        full = str(processor.apply_chat_template(_conversation(question, answer), continue_final_message=True))
    else:
        full = f"{prompt} {answer}"
    if not full.startswith(prompt):
        full = f"{prompt} {answer}"
    prompt_ids = tokenizer(prompt).input_ids
    full_ids = tokenizer(full).input_ids
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return [int(token) for token in full_ids[len(prompt_ids) :]]
    return [int(token) for token in tokenizer(full[len(prompt) :], add_special_tokens=False).input_ids]


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


def end_token_ids(model: torch.nn.Module, tokenizer: Any) -> frozenset[int]:
    """The token ids that end an answer: the generation config's EOS ids and the tokenizer's."""
    found: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return frozenset(found)


def model_cache(output: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers 5, ``past_key_values`` before)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


# ----------------------------------------------------------------------------------------------
# Loading and checks.
# ----------------------------------------------------------------------------------------------


def default_attribution_layer(config: Any) -> int:
    """The block read when none is given: the model config's ``api_attribution_layer`` if it sets one
    (the demo LLaVA does), else the paper's block 20 when the model is deeper, else its middle block."""
    recommended = getattr(config, "api_attribution_layer", None)
    if recommended is not None:
        return int(recommended)
    text_config = getattr(config, "text_config", config)
    blocks = int(text_config.num_hidden_layers)
    return PAPER_LAYER if blocks > PAPER_LAYER else blocks // 2


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: as given, or bf16 on CUDA (fp16 without bf16), fp16 on MPS, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise InvalidParameterError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def image_token_id(config: PretrainedConfig) -> int:
    """The id of the image placeholder token (``image_token_id``, formerly ``image_token_index``)."""
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = getattr(config, "image_token_index", None)
    if value is None:
        raise UnsupportedModelError("the model config names no image token id")
    return int(value)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder blocks (``model.model.language_model.layers`` in recent
    transformers, ``model.language_model.model.layers`` before)."""
    inner = getattr(model, "model", None)
    language_model = getattr(inner, "language_model", None)
    layers = getattr(language_model, "layers", None)
    if layers is None:
        layers = getattr(getattr(getattr(model, "language_model", None), "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UnsupportedModelError(f"cannot find the decoder blocks of {type(model).__name__}")
    return layers


def check_llava_config(config: PretrainedConfig) -> None:
    """Refuse, with ``UnsupportedModelError``, configs this backend cannot attribute exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llava":
        architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise UnsupportedModelError(
            f"{architecture} (model_type {model_type!r}) is not supported: LlavaAttributor handles "
            "LlavaForConditionalGeneration (the LLaVA-1.5 family) only; LLaVA-NeXT's any-resolution tiles "
            "and Qwen2-VL's dynamic grids are not mapped to the image"
        )
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


def check_llava_model(model: object) -> None:
    """Refuse anything but a ``LlavaForConditionalGeneration`` with a supported config."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: LlavaAttributor needs a LlavaForConditionalGeneration "
            "(LLaVA-1.5 family); LLaVA-NeXT, Qwen2-VL and other image-text-to-text models are refused"
        )
    check_llava_config(model.config)
    attention = decoder_layers(model)[0].self_attn
    missing = [name for name in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(attention, name)]
    if missing or hasattr(attention, "q_norm"):
        raise UnsupportedModelError(
            f"{type(attention).__name__} is not a plain rotary attention layer (missing {missing} or has q/k "
            "norms); its scores cannot be recomputed"
        )


def check_processor(processor: object) -> None:
    """Refuse a processor without tokenizer, image processor or image token."""
    missing = [name for name in ("tokenizer", "image_processor", "image_token") if not hasattr(processor, name)]
    if missing:
        raise UnsupportedModelError(
            f"{type(processor).__name__} lacks {', '.join(missing)}; pass the model's LlavaProcessor"
        )


def check_sequence_length(model: torch.nn.Module, length: int) -> None:
    """Refuse sequences longer than a sliding attention window (the recomputed scores would differ)."""
    text_config = model.config.text_config
    window = getattr(text_config, "sliding_window", None)
    if window and getattr(text_config, "use_sliding_window", True) and length > window:
        raise UnsupportedModelError(
            f"the sequence ({length} tokens) exceeds the language model's sliding window ({window})"
        )


def load_llava(
    model: str | os.PathLike[str], dtype: torch.dtype, *, layer: int | None = None
) -> tuple[LlavaForConditionalGeneration, Any]:
    """Model and processor from ``"demo"``, a local directory or a hub id.

    The config is checked (model class, towers, and ``layer`` if given) before any weights load.
    Offline, a hub id missing from the local cache fails within seconds with ``WeightsUnavailableError``.

    Example:
        >>> model, processor = load_llava("demo", torch.float32)  # doctest: +SKIP
    """
    source, local_only = _resolve_source(model)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        check_llava_config(config)
        if layer is not None:
            resolve_layer(layer, int(config.text_config.num_hidden_layers), "language model")
        dtype_argument = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
        loaded = LlavaForConditionalGeneration.from_pretrained(
            source, local_files_only=local_only, **{dtype_argument: dtype}
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    except OSError as exc:
        if not Path(source).is_dir():
            raise WeightsUnavailableError(_weights_hint(str(model), f"the local cache is incomplete ({exc})")) from exc
        raise UnknownModelError(f"cannot load a LLaVA model and processor from {source!r}: {exc}") from exc
    return loaded, processor


def _resolve_source(model: str | os.PathLike[str]) -> tuple[str, bool]:
    """``(where to load from, local files only)``, or a clear error before any download is tried."""
    name = os.fspath(model)
    if name == DEMO_MODEL:
        from api_tool.demo.tiny_llava import DEMO_LLAVA_DIR

        if not (DEMO_LLAVA_DIR / "config.json").is_file():
            raise WeightsUnavailableError(
                f"the demo LLaVA is not in this installation (expected {DEMO_LLAVA_DIR}); it is trained by the "
                "project's demo-model script. Pass a hub id or a local directory instead"
            )
        return str(DEMO_LLAVA_DIR), True
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{name!r} is a directory without config.json; save the model with save_pretrained")
        return str(path), True
    if not _HUB_ID.match(name):
        raise UnknownModelError(
            f"{name!r} is neither an existing directory nor a hub id like 'llava-hf/llava-1.5-7b-hf'"
        )
    if _hub_cached(name):
        return name, True
    if _offline():
        raise WeightsUnavailableError(_weights_hint(name, "offline mode is on (HF_HUB_OFFLINE)"))
    _probe_hub(name)
    return name, False


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _offline() -> bool:
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return flag.lower() in ("1", "true", "yes", "on") or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _probe_hub(repo_id: str) -> None:
    """Raise ``WeightsUnavailableError`` if the hub does not answer within seconds, ``UnknownModelError``
    if it answers that the repository does not exist."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1.0)
    if not outcome:
        raise WeightsUnavailableError(_weights_hint(repo_id, "the hub did not answer"))
    error = outcome[0]
    if isinstance(error, GatedRepoError):
        raise WeightsUnavailableError(_weights_hint(repo_id, f"the repository is gated ({error})"))
    if isinstance(error, RepositoryNotFoundError):
        raise UnknownModelError(f"{repo_id!r} is not a model on the hub (nor a local directory)")
    if error is not None:
        raise WeightsUnavailableError(_weights_hint(repo_id, f"the hub cannot be reached ({type(error).__name__})"))


def _weights_hint(name: str, reason: str) -> str:
    return (
        f"the weights of {name!r} are not in the local Hugging Face cache and {reason}. On a connected machine "
        f"run `hf download {name}` and copy ~/.cache/huggingface/hub to this machine, or save the model and "
        "processor with save_pretrained and pass that directory as model=...; model='demo' works offline"
    )


def _transformers_version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(re.sub(r"\D.*", "", minor) or 0)
