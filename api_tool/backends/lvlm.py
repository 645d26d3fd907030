"""API with an LVLM's own attention: one mechanism for every family in ``api_tool.families``.

The method of the paper's LLaVA variant (the authors' ``api_llava``), for any image-text-to-text model
whose family has an adapter (``api_tool.backends.lvlm_families``):

1. prompt with the family's chat template (image + question) and decode greedily (``model.generate``),
   up to ``max_new_tokens``;
2. at decoder block ``layer``, for the query position of every step (the last prompt token, then each
   generated token), take the pre-softmax scores ``q . k / sqrt(d)`` over the image-token keys only,
   softmax over those keys (so attention sinks outside the image drop out), mean over heads;
3. average over steps; split the image tokens into the family's tiles (one grid for LLaVA-1.5, Gemma 3
   and Qwen2-VL; a base image plus high-resolution tiles for LLaVA-NeXT / OneVision, Idefics3 / SmolVLM
   and InternVL) and lay every tile back on the original image (``stitch_tiles``);
4. post-process like the CLIP map's Psi_cls: minmax, sigmoid(coe * zscore), k x k mean filter, minmax.

With ``answer=`` the answer is scored by teacher forcing instead: one forward pass over prompt + answer,
stopped at block ``layer``'s attention (later blocks and the LM head never run). On the model's own
greedy answer this equals the generation path. ``focus=`` averages only the steps that produce a chosen
substring of the answer (the authors' demo variant). The step that predicts the end-of-sequence token
is left out; an empty answer scores the last prompt position alone.

Reuse, exact inputs only (``metadata["scored_from"]`` says which pass the rows come from):

* the answer's own generation: a generation by this attributor, or by a ``ChatTransformersVLM`` sharing
  the model with ``record_self_maps`` on, records the probed block's image keys and per-step queries
  (``api_tool.backends.self_map_memo``); scoring that answer on equal inputs (prompt tokens, pixels, the
  same block) reads its rows from the recording, with no model pass;
* the prompt's KV cache: teacher forcing keeps the cache of the blocks below the probed one over the
  prompt, so scoring another answer on equal inputs runs only the answer's tokens up to that block
  (families with ``continues_prompt_cache``);
* image passes: the model's image encoder is memoised (``image_feature_cache``), so scoring an answer
  that was just generated from the same image reruns only the language model up to the probed block.

Attention capture: nothing forces eager attention and no attention matrix is stored. A forward pre-hook
on block ``layer``'s self-attention receives the block's normalised hidden states and rotary embeddings;
the family adapter recomputes that block's keys for the image positions and its queries for the needed
positions only (while teacher forcing; after generation, from the block inputs the recorder kept). SDPA
and flash attention keep running the model itself.

Metadata: ``backend``, ``family``, ``model``, ``layer`` (resolved), ``mode`` ("generate" |
"teacher_forcing"), ``scored_from`` (``SCORED_FROM``), ``answer``, ``focus``, ``steps``, ``step_tokens``,
``tiles``, ``max_new_tokens``, ``enhance_coe``, ``kernel_size``.

Example:
    >>> from api_tool.backends.lvlm import LvlmAttributor
    >>> attributor = LvlmAttributor("Qwen/Qwen2.5-VL-7B-Instruct", layer=-8)  # doctest: +SKIP
    >>> amap = attributor.attribute("street.jpg", "What is the man holding?")  # doctest: +SKIP
    >>> amap.metadata["family"], amap.metadata["answer"]  # doctest: +SKIP
    ('qwen2_vl', 'An umbrella.')
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, DynamicCache

from api_tool.backends.base import check_query, model_lock, resolve_device, resolve_layer
from api_tool.backends.hub import resolve_source, weights_hint
from api_tool.backends.image_feature_cache import share_image_features
from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter, PreparedPrompt, Tile
from api_tool.backends.self_map_memo import (
    AnswerRecorder,
    PromptState,
    image_attention,
    self_map_memo,
)
from api_tool.errors import (
    FocusNotFoundError,
    ImageTokenError,
    InvalidParameterError,
    InvalidQueryError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from api_tool.geometry import GridBox
from api_tool.images import ImageRef, load_image
from api_tool.maps import AttributionMap, combine_maps

PAPER_LAYER = 20
"""The block the authors read in LLaVA-1.5 (32 or 40 blocks)."""
DEMO_MODEL = "demo"
LLAVA_15_PROMPT = "USER: {image}\n{query} ASSISTANT:"
"""The LLaVA-1.5 prompt, used when the processor has no chat template."""
MAX_STITCHED_CELLS = 1 << 16
"""Upper bound on the cells of the grid that several tiles are stitched onto."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# ----------------------------------------------------------------------------------------------
# The maths: small pure functions on tensors and arrays.
# ----------------------------------------------------------------------------------------------


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


def tile_grids(attention: np.ndarray, tiles: Sequence[Tile]) -> list[np.ndarray]:
    """Split one attention vector over all tiles' image tokens (tile after tile) into each tile's grid.

    Example:
        >>> grid = torch.arange(2)
        >>> [g.tolist() for g in tile_grids(np.arange(6.0), [Tile(grid, (1, 2), (0, 0, 2, 1)),
        ...                                                  Tile(grid, (2, 2), (0, 0, 2, 2))])]
        [[[0.0, 1.0]], [[2.0, 3.0], [4.0, 5.0]]]
    """
    grids, start = [], 0
    for tile in tiles:
        rows, cols = tile.grid
        grids.append(np.asarray(attention[start : start + rows * cols], dtype=np.float64).reshape(rows, cols))
        start += rows * cols
    return grids


def single_tile_grid_box(tile: Tile, image_size: tuple[int, int]) -> GridBox:
    """Where the original image lies on one tile's grid, in cell units (the tile's box may reach past
    the image, as a letterboxed input does).

    Example:
        >>> single_tile_grid_box(Tile(torch.arange(4), (2, 2), (0.0, -50.0, 100.0, 150.0)), (100, 100))
        (0.0, 0.5, 2.0, 1.5)
    """
    rows, cols = tile.grid
    x0, y0, x1, y1 = tile.box
    width, height = image_size
    return (
        (0.0 - x0) / (x1 - x0) * cols,
        (0.0 - y0) / (y1 - y0) * rows,
        (width - x0) / (x1 - x0) * cols,
        (height - y0) / (y1 - y0) * rows,
    )


def overlap_lengths(starts: np.ndarray, ends: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """``(len(starts), len(lows))`` lengths of the overlaps of intervals ``[starts, ends)`` and ``[lows, highs)``.

    Example:
        >>> overlap_lengths(np.array([0.0, 2.0]), np.array([2.0, 4.0]), np.array([1.0]), np.array([3.0])).tolist()
        [[1.0], [1.0]]
    """
    low = np.maximum(starts[:, None], lows[None, :])
    high = np.minimum(ends[:, None], highs[None, :])
    return np.clip(high - low, 0.0, None)


def stitch_tiles(
    grids: Sequence[np.ndarray], tiles: Sequence[Tile], image_size: tuple[int, int]
) -> tuple[np.ndarray, GridBox]:
    """Lay several tiles' attention on one grid over the original image: ``(canvas, grid_box)``.

    Each tile cell's attention is spread evenly over the image area it covers and every canvas cell
    collects what falls inside it (exact area overlaps), from every tile: a region seen both in the base
    image and in a high-resolution tile gets the attention of both views. Attention on cells outside the
    image (letterbox padding) is dropped. The canvas's cells are as fine as the finest tile's (capped at
    ``MAX_STITCHED_CELLS``), it starts at the image's top-left corner, and ``grid_box`` says where the
    image ends on it.

    Example:
        >>> whole = Tile(torch.arange(1), (1, 1), (0.0, 0.0, 4.0, 2.0))
        >>> halves = Tile(torch.arange(2), (1, 2), (0.0, 0.0, 4.0, 2.0))
        >>> canvas, box = stitch_tiles([np.array([[0.5]]), np.array([[0.5, 0.0]])], [whole, halves], (4, 2))
        >>> canvas.tolist(), box
        ([[0.75, 0.25]], (0.0, 0.0, 2.0, 1.0))
    """
    width, height = image_size
    cell_w = min((tile.box[2] - tile.box[0]) / tile.grid[1] for tile in tiles)
    cell_h = min((tile.box[3] - tile.box[1]) / tile.grid[0] for tile in tiles)
    scale = max(1.0, math.sqrt((width / cell_w) * (height / cell_h) / MAX_STITCHED_CELLS))
    cell_w, cell_h = cell_w * scale, cell_h * scale
    cols, rows = max(1, math.ceil(width / cell_w - 1e-9)), max(1, math.ceil(height / cell_h - 1e-9))
    canvas_x = np.minimum(np.arange(cols + 1) * cell_w, width)
    canvas_y = np.minimum(np.arange(rows + 1) * cell_h, height)
    canvas = np.zeros((rows, cols))
    for values, tile in zip(grids, tiles):
        tile_rows, tile_cols = tile.grid
        x0, y0, x1, y1 = tile.box
        tile_x = np.linspace(x0, x1, tile_cols + 1)
        tile_y = np.linspace(y0, y1, tile_rows + 1)
        density = values / ((x1 - x0) / tile_cols * (y1 - y0) / tile_rows)
        across = overlap_lengths(tile_x[:-1], tile_x[1:], canvas_x[:-1], canvas_x[1:])
        down = overlap_lengths(tile_y[:-1], tile_y[1:], canvas_y[:-1], canvas_y[1:])
        canvas += down.T @ density @ across
    return canvas, (0.0, 0.0, width / cell_w, height / cell_h)


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
    ``stop_after_first`` the first call ends the forward pass (teacher forcing needs no logits). Given
    ``keys`` (the image keys of an earlier pass over the same prompt), every call scores the queries of
    all the positions passed in (a pass that continues the prompt from its KV cache).
    The family adapter turns hidden states into rotary-embedded queries and keys.
    """

    def __init__(
        self,
        family: LvlmFamilyAdapter,
        attention: torch.nn.Module,
        image_positions: torch.Tensor,
        query_positions: torch.Tensor | None,
        *,
        stop_after_first: bool,
        keys: torch.Tensor | None = None,
    ) -> None:
        self.family = family
        self.attention = attention
        self.image_positions = image_positions
        self.query_positions = query_positions
        self.stop_after_first = stop_after_first
        self.keys = keys
        self.rows: list[torch.Tensor] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if self.keys is None:
            self.keys = self.family.project(module, "k", hidden, rotary, self.image_positions)
            queries = self.family.project(module, "q", hidden, rotary, self.query_positions)
        else:
            queries = self.family.project(module, "q", hidden, rotary, None)
        self.rows.append(image_attention(queries, self.keys, float(module.scaling))[0])
        if self.stop_after_first:
            raise _CaptureCompleteError

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
class _Steps:
    """The attention rows of one answer, one per step, the answer's tokens, and how the rows were
    obtained (``SCORED_FROM``)."""

    rows: torch.Tensor
    answer_ids: list[int]
    answer: str
    scored_from: str


SCORED_FROM: dict[str, str] = {
    "generation": "the attributor's own greedy generation, probe attached",
    "recording": "a recording of the same answer's generation on equal inputs (no model pass)",
    "prompt_cache": "teacher forcing of the answer's tokens only, continuing the same prompt's KV cache",
    "forward": "teacher forcing: one pass over prompt + answer up to the probed block",
}
"""The values of ``metadata["scored_from"]``: which pass the map's rows come from."""


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values``.

    Example:
        >>> cache_argument(model)  # doctest: +SKIP
        'cache'
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt_cache_pairs(
    cache: DynamicCache, blocks: int, length: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
    """The ``(keys, values)`` of the first ``blocks`` cache layers cut to the first ``length`` positions, or
    ``None`` when a layer was not filled (or is not a plain full-attention layer).

    Example:
        >>> prompt_cache_pairs(DynamicCache(), 0, 5)
        ()
    """
    layers = list(getattr(cache, "layers", ()))[:blocks]
    if len(layers) < blocks or any(getattr(layer, "keys", None) is None for layer in layers):
        return None
    return tuple((layer.keys[:, :, :length], layer.values[:, :, :length]) for layer in layers)


class LvlmAttributor:
    """Self-attribution (API with the LVLM's own attention) for every family in ``api_tool.families``.

    Args:
        model: a transformers hub id (cached locally, or downloadable when online), a local directory
            written by ``save_pretrained`` (model and processor), or ``"demo"`` for the project's
            trained demo LLaVA. The family is detected from the config's ``model_type``.
        layer: decoder block index; negative counts from the end. ``None``: the model config's
            ``api_attribution_layer``, else the family's default.
        device: "cuda", "mps", "cpu" or ``None`` (CUDA, then MPS, then CPU).
        dtype: ``torch.dtype`` or "bfloat16" / "float16" / "float32"; ``None`` picks bf16 on CUDA
            (fp16 without bf16 support), fp16 on MPS and fp32 on CPU.
        max_new_tokens: greedy decoding budget of the generation path.
        enhance_coe, kernel_size: post-processing, see ``api_tool.maps.combine_maps`` ("cls" recipe).

    Example:
        >>> attributor = LvlmAttributor("path/to/qwen2.5-vl-dir", device="cpu")  # doctest: +SKIP
        >>> first = attributor.attribute("photo.jpg", "What colour is the car?")  # doctest: +SKIP
        >>> again = attributor.attribute("photo.jpg", "What colour is the car?",
        ...                              answer=first.metadata["answer"], focus="car")  # doctest: +SKIP
    """

    name = "lvlm"

    def __init__(
        self,
        model: str | os.PathLike[str] = DEMO_MODEL,
        layer: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 20,
        enhance_coe: float = 10.0,
        kernel_size: int = 3,
    ) -> None:
        target = resolve_device(device)
        loaded, processor = load_lvlm(model, resolve_dtype(dtype, target), layer=layer, families=self._families())
        self._bind(loaded.to(target), processor, None, str(model), layer, max_new_tokens, enhance_coe, kernel_size)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        processor: Any,
        *,
        family: LvlmFamilyAdapter | None = None,
        layer: int | None = None,
        max_new_tokens: int = 20,
        enhance_coe: float = 10.0,
        kernel_size: int = 3,
        model_name: str | None = None,
    ) -> LvlmAttributor:
        """An attributor over an already-loaded model and processor (shared, not copied or moved).

        Example:
            >>> attributor = LvlmAttributor.from_model(model, processor, layer=20)  # doctest: +SKIP
        """
        attributor = cls.__new__(cls)
        name = model_name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        attributor._bind(model, processor, family, name, layer, max_new_tokens, enhance_coe, kernel_size)
        return attributor

    @classmethod
    def _families(cls) -> tuple[str, ...] | None:
        """The family names this class accepts (``None``: every LVLM family in the table)."""
        return None

    def _bind(
        self,
        model: torch.nn.Module,
        processor: Any,
        family: LvlmFamilyAdapter | None,
        model_name: str,
        layer: int | None,
        max_new_tokens: int,
        enhance_coe: float,
        kernel_size: int,
    ) -> None:
        from api_tool.families import lvlm_family_of

        entry = lvlm_family_of(
            getattr(model, "config", None), allowed=self._families(), model_class=type(model).__name__
        )
        self.family = family if family is not None else entry.adapter()
        self.family_name = entry.name
        self.family.check_model(model, processor)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidParameterError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        combine_maps(np.zeros((2, 2)), None, combine="cls", enhance_coe=enhance_coe, kernel_size=kernel_size)
        self.model = model.eval()
        self.processor = processor
        self.model_name = model_name
        self.layers = self.family.decoder_layers(model)
        self.layer = attribution_layer(model, self.family, entry.defaults.layer, layer)
        self.max_new_tokens = max_new_tokens
        self.enhance_coe = float(enhance_coe)
        self.kernel_size = kernel_size
        self.eos_ids = end_token_ids(model, processor.tokenizer) | self.family.end_token_ids(processor)
        self.image_features = share_image_features(model)
        self.memo = self_map_memo(model)
        self._prompt_state: PromptState | None = None
        self._lock = model_lock(model)

    def clear_reuse(self) -> None:
        """Forget the model's answer recordings (``self.memo``) and this attributor's last prompt state, so
        the next map runs the model (the image encoder's memo is ``self.image_features``).

        Example:
            >>> attributor.clear_reuse()  # doctest: +SKIP
        """
        self.memo.clear()
        self._prompt_state = None

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
            prompt = self.family.prepare(self.model, self.processor, image, question)
            steps = self._generate(prompt) if answer is None else self._teacher_force(prompt, question, answer)
        selected = self._select(steps, focus)
        attention = steps.rows[selected].mean(dim=0).double().cpu().numpy()
        grids = tile_grids(attention, prompt.tiles)
        if len(grids) == 1:
            raw, grid_box = grids[0], single_tile_grid_box(prompt.tiles[0], image.size)
        else:
            raw, grid_box = stitch_tiles(grids, prompt.tiles, image.size)
        mask = combine_maps(raw, None, combine="cls", enhance_coe=self.enhance_coe, kernel_size=self.kernel_size)
        tokenizer = self.processor.tokenizer
        step_tokens = [
            tokenizer.convert_ids_to_tokens(steps.answer_ids[i]) for i in selected if i < len(steps.answer_ids)
        ]
        return AttributionMap(
            raw=raw,
            comp=None,
            mask=mask,
            image_size=image.size,
            grid_box=grid_box,
            query=question,
            metadata={
                "backend": self.name,
                "family": self.family_name,
                "model": self.model_name,
                "layer": self.layer,
                "mode": "generate" if answer is None else "teacher_forcing",
                "scored_from": steps.scored_from,
                "answer": steps.answer if answer is None else answer,
                "focus": focus,
                "steps": len(selected),
                "step_tokens": step_tokens,
                "tiles": [{"grid": list(tile.grid), "box": [float(v) for v in tile.box]} for tile in prompt.tiles],
                "max_new_tokens": self.max_new_tokens,
                "enhance_coe": self.enhance_coe,
                "kernel_size": self.kernel_size,
            },
        )

    def _probe(
        self, prompt: PreparedPrompt, query_positions: torch.Tensor, *, stop_after_first: bool
    ) -> ImageAttentionProbe:
        attention = self.layers[self.layer].self_attn
        positions = prompt.image_positions.to(self.device)
        return ImageAttentionProbe(
            self.family, attention, positions, query_positions, stop_after_first=stop_after_first
        )

    def _generate(self, prompt: PreparedPrompt) -> _Steps:
        self.family.check_sequence_length(self.model, self.layer, prompt.length + self.max_new_tokens)
        recorder = AnswerRecorder(self.family, self.layers[self.layer].self_attn, self.layer)
        tokenizer = self.processor.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        with recorder.attached():
            output = self.model.generate(
                **prompt.inputs,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=sorted(self.eos_ids) or None,
                pad_token_id=pad,
            )
        generated = [int(token) for token in output[0, prompt.length :].tolist()]
        answer_ids = []
        for token in generated:
            if token in self.eos_ids:
                break
            answer_ids.append(token)
        recording = recorder.recording(prompt.inputs, generated)
        if recording is None:
            raise UnsupportedModelError(f"decoder block {self.layer} did not run during generation")
        self.memo.store(recording)
        rows = recording.rows(prompt.image_positions, max(1, len(answer_ids)))
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        return _Steps(rows=rows, answer_ids=answer_ids, answer=answer, scored_from="generation")

    def _teacher_force(self, prompt: PreparedPrompt, question: str, answer: str) -> _Steps:
        """The answer's rows: from a recording of its generation on equal inputs, else by continuing the
        same prompt's KV cache, else by one pass over prompt + answer (which keeps the prompt's cache)."""
        answer_ids = answer_token_ids(self.processor, prompt.text, question, answer)
        self.family.check_sequence_length(self.model, self.layer, prompt.length + len(answer_ids))
        decoded = self.processor.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
        recording = self.memo.lookup(self.layer, prompt.inputs, answer_ids)
        if recording is not None:
            rows = recording.rows(prompt.image_positions, max(1, len(answer_ids)))
            return _Steps(rows=rows, answer_ids=answer_ids, answer=decoded, scored_from="recording")
        state = self._prompt_state
        if state is not None and state.matches(self.layer, prompt.inputs):
            rows = self._continue_prompt(state, prompt, answer_ids)
            return _Steps(rows=rows, answer_ids=answer_ids, answer=decoded, scored_from="prompt_cache")
        rows = self._forward(prompt, answer_ids)
        return _Steps(rows=rows, answer_ids=answer_ids, answer=decoded, scored_from="forward")

    def _forward(self, prompt: PreparedPrompt, answer_ids: list[int]) -> torch.Tensor:
        """Teacher forcing in one pass over prompt + answer, stopped at the probed block; when the family
        can continue a prompt's cache, the blocks below keep their KV cache for ``_continue_prompt``."""
        first = prompt.length - 1
        queries = torch.arange(first, first + max(1, len(answer_ids)), device=self.device)
        probe = self._probe(prompt, queries, stop_after_first=True)
        inputs = self.family.teacher_forcing_inputs(prompt, answer_ids)
        keeps_cache = self.family.continues_prompt_cache and self.layer > 0
        cache = DynamicCache() if keeps_cache else None
        extra = {cache_argument(self.model): cache} if keeps_cache else {}
        with probe.attached(), suppress(_CaptureCompleteError):
            # as generation calls it, so the vision tower's memo answers (no other keywords: LLaVA hands them
            # on to the tower, and the memo matches arguments exactly)
            self.model(**inputs, **extra)
        pairs = prompt_cache_pairs(cache, self.layer, first) if cache is not None else None
        if pairs is not None and probe.keys is not None:
            self._prompt_state = PromptState(self.layer, dict(prompt.inputs), pairs, probe.keys)
        return torch.cat(probe.rows)

    def _continue_prompt(self, state: PromptState, prompt: PreparedPrompt, answer_ids: list[int]) -> torch.Tensor:
        """Teacher forcing from the prompt's kept cache: only the last prompt token and the answer's tokens
        run, up to the probed block, whose image keys were kept too."""
        first = prompt.length - 1
        inputs = self.family.continuation_inputs(self.model, prompt, answer_ids, first)
        attention = self.layers[self.layer].self_attn
        positions = prompt.image_positions.to(self.device)
        probe = ImageAttentionProbe(
            self.family, attention, positions, None, stop_after_first=True, keys=state.image_keys
        )
        cache = DynamicCache(ddp_cache_data=state.past)
        with probe.attached(), suppress(_CaptureCompleteError):
            self.model(**inputs, **{cache_argument(self.model): cache, "use_cache": True})
        return torch.cat(probe.rows)

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


def single_image_prompt(processor: Any, question: str) -> str:
    """``prompt_text`` checked to hold the processor's image placeholder exactly once, else ``ImageTokenError``."""
    text = prompt_text(processor, question)
    image_token = processor.image_token
    if text.count(image_token) != 1:
        raise ImageTokenError(
            f"the rendered prompt holds {text.count(image_token)} {image_token!r} placeholders, expected "
            f"exactly one; check the processor's chat template: {text!r}"
        )
    return text


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


# ----------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------


def default_attribution_layer(config: Any, family_layer: int | None = PAPER_LAYER) -> int:
    """The block read when none is given: the model config's ``api_attribution_layer`` if it sets one
    (the demo LLaVA does), else the family's default block when the model is deeper (block 20 for
    LLaVA-1.5, as the paper), else the model's middle block."""
    recommended = getattr(config, "api_attribution_layer", None)
    if recommended is not None:
        return int(recommended)
    text_config = getattr(config, "text_config", config)
    blocks = int(text_config.num_hidden_layers)
    if family_layer is not None and -blocks <= family_layer < blocks:
        return family_layer % blocks
    return blocks // 2


def attribution_layer(
    model: torch.nn.Module, family: LvlmFamilyAdapter, table_layer: int | None, layer: int | None = None
) -> int:
    """The decoder block an attributor reads, resolved to ``0..blocks-1``: ``layer`` when given, else
    ``default_attribution_layer`` with the adapter's default block, else the family table's ``table_layer``.

    Example:
        >>> attribution_layer(model, LlavaFamily(), 20)  # doctest: +SKIP
        20
    """
    blocks = len(family.decoder_layers(model))
    family_layer = family.default_layer(model.config)
    chosen = (
        layer
        if layer is not None
        else default_attribution_layer(model.config, family_layer if family_layer is not None else table_layer)
    )
    return resolve_layer(chosen, blocks, "language model")


def answer_recorder(model: torch.nn.Module, processor: Any, layer: int | None = None) -> AnswerRecorder | None:
    """A recorder of ``model``'s answers at the block an ``LvlmAttributor.from_model(model, processor,
    layer=layer)`` reads, for chat models whose replies should carry their self-map
    (``api_tool.backends.self_map_memo``); ``None`` when no LVLM family in the table wraps the model as a
    chat model or its adapter refuses the model.

    Example:
        >>> recorder = answer_recorder(model, processor)  # doctest: +SKIP
        >>> with recorder.attached():  # doctest: +SKIP
        ...     output = model.generate(**inputs)
        >>> self_map_memo(model).store(recorder.recording(inputs, output[0, prompt_length:]))  # doctest: +SKIP
    """
    from api_tool.families import lvlm_family_of_model

    entry = lvlm_family_of_model(model)
    if entry is None or not entry.wraps_chat_model or entry.adapter_path is None:
        return None
    family = entry.adapter()
    try:
        family.check_model(model, processor)
    except UnsupportedModelError:
        return None
    index = attribution_layer(model, family, entry.defaults.layer, layer)
    return AnswerRecorder(family, family.decoder_layers(model)[index].self_attn, index)


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


def load_lvlm(
    model: str | os.PathLike[str],
    dtype: torch.dtype,
    *,
    layer: int | None = None,
    families: Sequence[str] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Model and processor from ``"demo"``, a local directory or a hub id, for any LVLM family in the table.

    The config is checked (a known family, one of ``families`` if given, and ``layer`` if given) before
    any weights load. Offline, a hub id missing from the local cache fails within seconds with
    ``WeightsUnavailableError``.

    Example:
        >>> model, processor = load_lvlm("demo", torch.float32)  # doctest: +SKIP
    """
    from api_tool.families import lvlm_family_of

    source, local_only = model_source(model)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        lvlm_family_of(config, allowed=families)
        if layer is not None:
            text_config = getattr(config, "text_config", config)
            resolve_layer(layer, int(text_config.num_hidden_layers), "language model")
        dtype_argument = "dtype" if _transformers_version() >= (4, 56) else "torch_dtype"
        loaded = AutoModelForImageTextToText.from_pretrained(
            source, local_files_only=local_only, **{dtype_argument: dtype}
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
    except OSError as exc:
        if not Path(source).is_dir():
            raise WeightsUnavailableError(weights_hint(str(model), f"the local cache is incomplete ({exc})")) from exc
        raise UnknownModelError(f"cannot load a model and processor from {source!r}: {exc}") from exc
    return loaded, processor


def model_source(model: str | os.PathLike[str]) -> tuple[str, bool]:
    """``(where to load from, local files only)`` for ``"demo"`` (the shipped demo LLaVA), a directory or a
    hub id, or a clear error before any download is tried (``api_tool.backends.hub``)."""
    name = os.fspath(model)
    if name != DEMO_MODEL:
        return resolve_source(name)
    from api_tool.demo.tiny_llava import DEMO_LLAVA_DIR

    if not (DEMO_LLAVA_DIR / "config.json").is_file():
        raise WeightsUnavailableError(
            f"the demo LLaVA is not in this installation (expected {DEMO_LLAVA_DIR}); it is trained by the "
            "project's demo-model script. Pass a hub id or a local directory instead"
        )
    return str(DEMO_LLAVA_DIR), True


def _transformers_version() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(re.sub(r"\D.*", "", minor) or 0)
