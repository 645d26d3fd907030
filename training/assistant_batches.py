"""Batches of assistant episodes, the training forward pass over them, and held-out evaluation by greedy
generation on prompts rendered through ``ChatTransformersVLM``.

A batch mixes default scenes and ``SMALL_OBJECT_CONFIG`` scenes (large canvases, small objects), one
episode per scene (``training.assistant_data``). Images sit anywhere in a sequence (after the agent's
system prompt, several per sequence), so the forward pass puts the image features where the ids hold
the image token, in order, as ``LlavaModel`` does.

Example:
    >>> from training.assistant_batches import generation_metrics
    >>> generation_metrics([("agent_detail", '{"tool": "attention_prompt", "arguments": {"question": "q"}}', "q")])
    {'agent_detail_tool_call_rate': 1.0, 'agent_detail_question_copied': 1.0}
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from transformers import LlavaForConditionalGeneration

from agents.chat_models import parse_tool_calls
from agents.prompts import parse_final_answer
from agents.reflection import normalize_answer
from api_tool.demo.scenes import (
    DEFAULT_CONFIG,
    SMALL_OBJECT_CONFIG,
    WHOLE_SCENE_TYPES,
    Layouts,
    ObjectFacts,
    sample_layouts,
    whole_scene_question,
)
from api_tool.tool import TOOL_NAME
from training.assistant_data import (
    EPISODE_KINDS,
    KIND_WEIGHTS,
    Episode,
    EpisodeRenderer,
    ViewBatch,
    concat_layouts,
    episode_target_slots,
    is_whole_scene,
    make_episode,
    render_views,
    whole_scene_or,
)
from training.llava_questions import canvas_extent, drop_hidden, sample_question

IGNORE = -100


@dataclass(frozen=True)
class ViewInputs:
    """How views become model inputs: input side, patch size, the processor's normalisation."""

    side: int
    patch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


WHOLE_SCENE_SHARE = 0.1
"""Share of non-agent episodes asked a whole-scene question instead of a detail one."""


@dataclass(frozen=True)
class EpisodeBatch:
    """Token ids ``(N, L)`` (right-padded), labels (``IGNORE`` off the replies), the views of every
    sequence in order, each episode's kind (index of ``EPISODE_KINDS``) and whether its scene is small."""

    ids: torch.Tensor
    labels: torch.Tensor
    views: ViewBatch
    kinds: torch.Tensor
    small: torch.Tensor


def sample_scenes(count: int, small_share: float, generator: torch.Generator) -> tuple[Layouts, list[bool]]:
    """``count`` layouts, a ``small_share`` of them from ``SMALL_OBJECT_CONFIG`` (last), the rest default."""
    small = round(count * small_share)
    parts = []
    if count - small:
        parts.append(drop_hidden(sample_layouts(count - small, generator, DEFAULT_CONFIG)))
    if small:
        parts.append(sample_layouts(small, generator, SMALL_OBJECT_CONFIG))
    return concat_layouts(parts), [False] * (count - small) + [True] * small


def scene_episode(
    kind: str,
    scene: int,
    objects: Sequence[ObjectFacts],
    slot_of: Sequence[int],
    extent: tuple[float, float],
    rng: random.Random,
) -> Episode:
    """An episode of ``kind`` about scene ``scene``: whole-scene questions for ``agent_whole``, detail
    questions for ``agent_detail`` (kind switched to ``agent_whole`` when the question is about the whole
    scene), otherwise mostly detail."""
    if kind == "agent_whole":
        question = whole_scene_question(objects, rng.choice(WHOLE_SCENE_TYPES), rng)
    else:
        question = sample_question(objects, extent, rng)
        if kind != "agent_detail":
            question = whole_scene_or(question, objects, rng, WHOLE_SCENE_SHARE)
        elif is_whole_scene(question):
            kind = "agent_whole"
    target = episode_target_slots(question, objects, slot_of)
    return make_episode(kind, scene, question, target, slot_of, rng)


def make_episode_batch(
    count: int,
    small_share: float,
    generator: torch.Generator,
    rng: random.Random,
    renderer: EpisodeRenderer,
    kinds: Sequence[str] | None = None,
) -> tuple[Layouts, EpisodeBatch, list[Episode]]:
    """``count`` scenes, one episode each (kinds drawn with ``KIND_WEIGHTS``, or given per scene)."""
    layouts, small = sample_scenes(count, small_share, generator)
    slots = layouts.valid.shape[1]
    episodes, rows, views = [], [], []
    for scene, (aspect, objects, present) in enumerate(
        zip(layouts.aspect.tolist(), layouts.facts(), layouts.valid.tolist())
    ):
        kind = kinds[scene] if kinds else rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        slot_of = [k for k in range(slots) if present[k]]
        episode = scene_episode(kind, scene, objects, slot_of, canvas_extent(aspect), rng)
        episodes.append(episode)
        rows.append(renderer.episode_ids(episode))
        views.extend(episode.views)
    length = max(len(ids) for ids, _ in rows)
    pad = renderer.tokenizer.pad_token_id
    ids_array = np.full((count, length), pad, dtype=np.int64)
    labels_array = np.full((count, length), IGNORE, dtype=np.int64)
    for row, (ids, labels) in enumerate(rows):
        ids_array[row, : len(ids)] = ids
        labels_array[row, : len(labels)] = labels
    batch = EpisodeBatch(
        ids=torch.from_numpy(ids_array),
        labels=torch.from_numpy(labels_array),
        views=ViewBatch.of(views, slots, rng),
        kinds=torch.tensor([EPISODE_KINDS.index(e.kind) for e in episodes]),
        small=torch.tensor(small),
    )
    return layouts, batch, episodes


class EpisodeStream(IterableDataset):
    """Endless episode batches; each DataLoader worker has its own seeded stream."""

    def __init__(self, count: int, small_share: float, seed: int, renderer: EpisodeRenderer) -> None:
        super().__init__()
        self.count = count
        self.small_share = small_share
        self.seed = seed
        self.renderer = renderer

    def __iter__(self) -> Iterator[tuple[Layouts, EpisodeBatch]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(self.seed * 1000 + 500 + worker)
        rng = random.Random(self.seed * 1000 + 500 + worker)
        while True:
            layouts, batch, _ = make_episode_batch(self.count, self.small_share, generator, rng, self.renderer)
            yield layouts, batch


def image_features(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image tokens ``(n, N, hidden)``, as ``LlavaModel.get_image_features`` makes them."""
    config = model.config
    output = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    features = output.hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return model.model.multi_modal_projector(features)


def merged_embeddings(
    model: LlavaForConditionalGeneration, features: torch.Tensor, ids: torch.Tensor, image_id: int
) -> torch.Tensor:
    """Token embeddings of ``ids`` with the image features ``(V, N, hidden)`` put, in order, where the ids
    hold the image token (``LlavaModel``'s ``masked_scatter``)."""
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == image_id)[..., None].expand_as(embeds)
    return embeds.masked_scatter(mask, features.to(embeds.dtype))


def episode_logits(
    model: LlavaForConditionalGeneration,
    features: torch.Tensor,
    ids: torch.Tensor,
    labels: torch.Tensor,
    image_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)`` at the labelled positions (each predicted from the position before)."""
    embeds = merged_embeddings(model, features, ids, image_id)
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    mask = labels != IGNORE
    mask[:, 0] = False
    predicting = torch.zeros_like(mask)
    predicting[:, :-1] = mask[:, 1:]
    return model.lm_head(hidden[predicting]), labels[mask]


@torch.no_grad()
def greedy_generate(
    model: LlavaForConditionalGeneration,
    features: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    image_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (their images' features in order in ``features``), each up to
    ``</s>`` (excluded) or ``max_new_tokens``; the whole sequence is recomputed at every step."""
    device = features.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((len(prompts), int(lengths.max()) + max_new_tokens), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(list(prompt), device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    rows = torch.arange(len(prompts), device=device)
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        embeds = merged_embeddings(model, features, ids[:, :width], image_id)
        hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        token = model.lm_head(hidden[rows, lengths - 1]).argmax(dim=-1)
        done |= token == eos_id
        ids[rows[~done], lengths[~done]] = token[~done]
        lengths = torch.where(done, lengths, lengths + 1)
        if bool(done.all()):
            break
    return [ids[row, len(prompt) : int(lengths[row])].tolist() for row, prompt in enumerate(prompts)]


def generation_metrics(records: Sequence[tuple[str, str, str]]) -> dict[str, float]:
    """Metrics of ``(category, generated text, truth)`` records: answer accuracy (normalised exact match)
    for answer categories, tool-call rate (and whether the call passes the question) for agent
    categories, parsable ``FINAL`` share and its accuracy for ``verify``."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for category, text, truth in records:
        grouped.setdefault(category, []).append((text, truth))
    metrics: dict[str, float] = {}
    for category, items in grouped.items():
        if category.startswith("agent_") and not category.startswith("agent_answer"):
            calls = [parse_tool_calls(text, [TOOL_NAME])[1] for text, _ in items]
            metrics[f"{category}_tool_call_rate"] = float(np.mean([bool(c) for c in calls]))
            if category == "agent_detail":
                copied = [
                    bool(c) and normalize_answer(str(c[0]["args"].get("question", ""))) == normalize_answer(t)
                    for c, (_, t) in zip(calls, items)
                ]
                metrics[f"{category}_question_copied"] = float(np.mean(copied))
        elif category.startswith("verify"):
            finals = [parse_final_answer(text) for text, _ in items]
            metrics[f"{category}_final_parsed"] = float(np.mean([f is not None for f in finals]))
            right = [f is not None and normalize_answer(f) == normalize_answer(t) for f, (_, t) in zip(finals, items)]
            metrics[f"{category}_final_accuracy"] = float(np.mean(right))
        else:
            metrics[f"{category}_accuracy"] = float(
                np.mean([normalize_answer(text) == normalize_answer(truth) for text, truth in items])
            )
    return metrics


EVAL_CATEGORIES: dict[str, tuple[str, float, int]] = {
    "plain_default": ("plain", 0.0, 0),
    "plain_small": ("plain", 1.0, 0),
    "annotated_default": ("masked", 0.0, 0),
    "annotated_small": ("masked", 1.0, 0),
    "crop_default": ("zoom", 0.0, 0),
    "crop_small": ("zoom", 1.0, 0),
    "agent_detail": ("agent_detail", 0.5, 0),
    "agent_whole": ("agent_whole", 0.5, 0),
    "agent_answer": ("agent_detail", 0.5, 1),
    "verify": ("verify", 0.5, 0),
}
"""Held-out categories: ``(episode kind, share of small-object scenes, which model call is asked)``."""


@dataclass(frozen=True)
class HeldOutSet:
    """Held-out prompts of one category: the scenes, the views each prompt shows, prompt ids, truths."""

    category: str
    layouts: Layouts
    views: ViewBatch
    prompts: list[list[int]]
    truths: list[str]


def make_held_out_sets(renderer: EpisodeRenderer, per_category: int, seed: int) -> list[HeldOutSet]:
    """``per_category`` prompts of every ``EVAL_CATEGORIES`` entry from a seeded stream disjoint from
    training; detail categories keep detail questions only. A prompt is the real rendering of the asked
    model call; the truth is the question for tool calls, else the right answer."""
    sets = []
    for index, (category, (kind, small_share, call)) in enumerate(EVAL_CATEGORIES.items()):
        generator = torch.Generator().manual_seed(2_000_003 + 7919 * seed + index)
        rng = random.Random(2_000_003 + 7919 * seed + index)
        kinds = [kind] * per_category
        layouts, _, episodes = make_episode_batch(per_category, small_share, generator, rng, renderer, kinds)
        chosen = [e for e in episodes if e.kind == kind and (kind == "agent_whole" or not e.whole_scene)]
        views, prompts, truths = [], [], []
        for episode in chosen:
            views.extend(episode.views[: call + 1] if episode.kind.startswith("agent") else episode.views)
            prompts.append(renderer.prompt_ids(episode.calls[call], episode.tools))
            truths.append(episode.question.question if category == "agent_detail" else episode.truth)
        slots = layouts.valid.shape[1]
        sets.append(HeldOutSet(category, layouts, ViewBatch.of(views, slots, rng), prompts, truths))
    return sets


@torch.no_grad()
def evaluate_generation(
    model: LlavaForConditionalGeneration,
    sets: Sequence[HeldOutSet],
    renderer: EpisodeRenderer,
    inputs: ViewInputs,
    device: torch.device,
    max_new_tokens: int = 48,
    chunk: int = 50,
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Greedy replies to every held-out prompt: ``generation_metrics`` and the first three replies of
    each category."""
    was_training = model.training
    model.eval()
    records: list[tuple[str, str, str]] = []
    examples: dict[str, list[str]] = {}
    tokenizer = renderer.tokenizer
    noise = torch.Generator(device=device).manual_seed(17)
    for held in sets:
        counts = [sum(1 for t in p if t == renderer.image_id) // renderer.image_tokens for p in held.prompts]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for start in range(0, len(held.prompts), chunk):
            stop = min(start + chunk, len(held.prompts))
            rows = torch.arange(int(offsets[start]), int(offsets[stop]))
            views = ViewBatch(*(getattr(held.views, name)[rows] for name in held.views.__dataclass_fields__))
            pixels = render_views(
                held.layouts, views, inputs.side, inputs.patch, inputs.mean, inputs.std, noise, device
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                features = image_features(model, pixels)
                replies = greedy_generate(
                    model,
                    features,
                    held.prompts[start:stop],
                    renderer.image_id,
                    renderer.eos_id,
                    int(tokenizer.pad_token_id),
                    max_new_tokens,
                )
            for reply, truth in zip(replies, held.truths[start:stop]):
                text = tokenizer.decode(reply, skip_special_tokens=True)
                records.append((held.category, text, truth))
                if len(examples.setdefault(held.category, [])) < 3:
                    examples[held.category].append(f"{text!r} (truth {truth!r})")
    model.train(was_training)
    return generation_metrics(records), examples
