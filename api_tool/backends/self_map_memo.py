"""The self-map of an answer from the answer's own pass: what one decoder block saw while the model answered.

A self-map (``LvlmAttributor.attribute(image, question, answer=...)``) needs, at decoder block ``layer``,
the keys of the prompt's image tokens and the query of every step that produced the answer. Generation
already computes what both come from: the prefill runs the prompt through block ``layer`` and each
decoding step runs one new token through it. ``AnswerRecorder`` is a forward pre-hook on that block's
attention that keeps references to what the block receives while a model answers (its normalised hidden
states and rotary tables: no computation at all during generation, so the answer is not slowed), and the
keys and queries are computed from them only when a map is asked for. ``SelfMapMemo`` holds such
recordings per model, keyed by the exact inputs: the block, the prompt's tensors (token ids, pixels,
grids: compared with ``torch.equal``) and the generated token ids. Teacher forcing of an answer whose
tokens start the recorded ones, on equal inputs, reads its rows from the recording instead of running
the model: step ``i`` of teacher forcing sees the
prompt and the answer's first ``i`` tokens, exactly what generation step ``i`` saw (causal attention).
Anything else (another prompt, image, block or answer) misses and runs the model as before.

``PromptState`` is the other reuse: the key / value cache of the blocks below ``layer`` over the prompt
(all but its last token) and the image keys at ``layer``, kept by the attributor after a teacher-forcing
pass, so scoring another answer on the same inputs runs only the answer's tokens up to block ``layer``.

Example:
    >>> memo = self_map_memo(model)  # doctest: +SKIP
    >>> recorder = AnswerRecorder(family, family.decoder_layers(model)[17].self_attn, layer=17)  # doctest: +SKIP
    >>> with recorder.attached():  # doctest: +SKIP
    ...     output = model.generate(**inputs, max_new_tokens=20)
    >>> memo.store(recorder.recording(inputs, output[0, inputs["input_ids"].shape[1]:]))  # doctest: +SKIP
    >>> memo.lookup(17, inputs, answer_ids) is not None  # doctest: +SKIP
    True
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from api_tool.backends.image_feature_cache import same_value
from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter

DEFAULT_CAPACITY = 2
"""Recordings kept per model (the newest first)."""


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


def answer_extends(recorded: Sequence[int], answer: Sequence[int]) -> bool:
    """Whether ``answer``'s tokens are the first tokens of ``recorded`` (its steps were all recorded).

    Example:
        >>> answer_extends([5, 6, 2], [5, 6]), answer_extends([5, 6], [5, 7]), answer_extends([5], [5, 6])
        (True, False, False)
    """
    return len(answer) <= len(recorded) and list(recorded[: len(answer)]) == list(answer)


@dataclass(frozen=True)
class BlockInput:
    """What one call of a decoder block's attention received: normalised hidden states ``(1, S, E)`` and
    the rotary embedding (as the block got it)."""

    hidden: torch.Tensor
    rotary: Any


@dataclass(frozen=True)
class AnswerRecording:
    """What block ``layer`` received while a model answered ``inputs`` with ``token_ids``.

    Attributes:
        layer: the decoder block.
        inputs: the prompt's model inputs (the memo key, compared by value).
        token_ids: the generated tokens, end-of-sequence included when generated.
        family: the adapter that turns hidden states into queries and keys.
        attention: the block's attention module.
        prompt: the prefill's input to the block (every prompt position).
        steps: each decoding step's input (one generated token each, in order).
    """

    layer: int
    inputs: dict[str, Any]
    token_ids: tuple[int, ...]
    family: LvlmFamilyAdapter
    attention: torch.nn.Module
    prompt: BlockInput
    steps: tuple[BlockInput, ...]

    @property
    def step_count(self) -> int:
        """Steps whose queries were recorded: the last prompt position, then each decoding step."""
        return 1 + len(self.steps)

    def rows(self, image_positions: torch.Tensor, steps: int) -> torch.Tensor:
        """``(steps, N)``: the first ``steps`` steps' attention over the image keys at ``image_positions``
        (keys and queries recomputed from the recorded block inputs, as the probe does while generating).

        Example:
            >>> recording.rows(prompt.image_positions, 5).shape  # doctest: +SKIP
            torch.Size([5, 576])
        """
        prompt, project = self.prompt, self.family.project
        positions = image_positions.to(prompt.hidden.device)
        keys = project(self.attention, "k", prompt.hidden, prompt.rotary, positions)
        last = torch.tensor([prompt.hidden.shape[1] - 1], device=prompt.hidden.device)
        queries = [project(self.attention, "q", prompt.hidden, prompt.rotary, last)]
        queries += [project(self.attention, "q", call.hidden, call.rotary, None) for call in self.steps[: steps - 1]]
        return image_attention(torch.cat(queries, dim=2), keys, float(self.attention.scaling))[0]


class AnswerRecorder:
    """A forward pre-hook on one decoder block's self-attention that keeps, while the model generates, a
    reference to what each call receives (hidden states and rotary tables; the first call is the prefill,
    each later one a decoding step). Nothing is computed during generation."""

    def __init__(self, family: LvlmFamilyAdapter, attention: torch.nn.Module, layer: int) -> None:
        self.family = family
        self.attention = attention
        self.layer = layer
        self.calls: list[BlockInput] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        self.calls.append(BlockInput(hidden, rotary))

    @contextmanager
    def attached(self) -> Iterator[AnswerRecorder]:
        """Hook the attention module for the duration of the ``with`` block (starting empty)."""
        self.calls = []
        handle = self.attention.register_forward_pre_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def recording(self, inputs: dict[str, Any], token_ids: Sequence[int] | torch.Tensor) -> AnswerRecording | None:
        """The recording of one finished generation from ``inputs`` (``None`` when nothing was recorded)."""
        if not self.calls:
            return None
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        recording = AnswerRecording(
            layer=self.layer,
            inputs=dict(inputs),
            token_ids=tuple(int(token) for token in ids),
            family=self.family,
            attention=self.attention,
            prompt=self.calls[0],
            steps=tuple(self.calls[1:]),
        )
        self.calls = []
        return recording


class SelfMapMemo:
    """The newest ``capacity`` answer recordings of one model (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._recordings: list[AnswerRecording] = []
        self._lock = threading.Lock()

    def store(self, recording: AnswerRecording | None) -> None:
        """Keep ``recording`` (the oldest one beyond ``capacity`` is dropped); ``None`` is ignored."""
        if recording is None:
            return
        with self._lock:
            self._recordings = [recording, *self._recordings][: self.capacity]

    def lookup(self, layer: int, inputs: dict[str, Any], answer_ids: Sequence[int]) -> AnswerRecording | None:
        """A recording of block ``layer`` from inputs equal to ``inputs`` whose tokens start with
        ``answer_ids`` and whose steps cover them, else ``None``.

        Example:
            >>> memo.lookup(17, prompt.inputs, [450, 2654]) is None  # doctest: +SKIP
            False
        """
        steps = max(1, len(answer_ids))
        with self._lock:
            candidates = list(self._recordings)
        for recording in candidates:
            if (
                recording.layer == layer
                and recording.step_count >= steps
                and answer_extends(recording.token_ids, answer_ids)
                and same_value(recording.inputs, inputs)
            ):
                with self._lock:
                    self.hits += 1
                return recording
        with self._lock:
            self.misses += 1
        return None

    def clear(self) -> None:
        """Forget every recording (frees their tensors)."""
        with self._lock:
            self._recordings = []


_MEMOS: weakref.WeakKeyDictionary[torch.nn.Module, SelfMapMemo] = weakref.WeakKeyDictionary()
_MEMOS_LOCK = threading.Lock()


def self_map_memo(model: torch.nn.Module) -> SelfMapMemo:
    """The answer-recording memo of ``model``, made on first use and shared by every caller (a chat model
    answering and an attributor scoring its answer); it goes away with the model.

    Example:
        >>> self_map_memo(model) is self_map_memo(model)  # doctest: +SKIP
        True
    """
    with _MEMOS_LOCK:
        memo = _MEMOS.get(model)
        if memo is None:
            memo = _MEMOS[model] = SelfMapMemo()
        return memo


@dataclass(frozen=True)
class PromptState:
    """The prompt of the last teacher-forcing pass, kept to score another answer on the same inputs.

    Attributes:
        layer: the probed block.
        inputs: the prompt's model inputs (compared by value).
        past: per block below ``layer``, its ``(keys, values)`` cache over the prompt's first
            ``length - 1`` positions (the last prompt position is rerun: its query starts the map).
        image_keys: ``(1, KV, N, D)`` fp32 keys of the image positions at block ``layer``.
    """

    layer: int
    inputs: dict[str, Any]
    past: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    image_keys: torch.Tensor

    def matches(self, layer: int, inputs: dict[str, Any]) -> bool:
        """Whether this state belongs to block ``layer`` and inputs equal to ``inputs``."""
        return self.layer == layer and same_value(self.inputs, inputs)


__all__ = [
    "AnswerRecorder",
    "AnswerRecording",
    "BlockInput",
    "PromptState",
    "SelfMapMemo",
    "answer_extends",
    "image_attention",
    "self_map_memo",
]
