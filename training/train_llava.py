"""Train the demo LLaVA, an assistant that answers questions about synthetic scenes, calls the attention
tool through its chat template and follows the reflection loop's formats.

Recipe (what each part is for):

* Model: ``api_tool.demo.tiny_llava``'s builders; a CLIP ViT vision tower (224 px, patch 16, a
  14 x 14 grid, width 192, 4 blocks, trained from scratch here) whose last block feeds the
  projector (``vision_feature_layer=-1``, so no stored block goes unused), and a Llama (width 256,
  4 blocks, 4 query heads over 2 key/value heads). Word-level tokenizer over the scene language and
  every prompt the agent and the loop send, with newlines and ``attention_prompt`` as tokens and
  the JSON punctuation (``chat_tokens``); the processor pads images to a square with the mean colour
  (``pad_to_square``), so training letterboxes and inference match. About 4.6 M parameters, shipped
  as fp16 safetensors (the config declares float32, so a plain ``from_pretrained`` upcasts).
* Scenes: ``api_tool.demo.scenes``' sampler (1-5 objects, square and non-square canvases). Layouts
  and questions are made by DataLoader workers on the CPU; pixels are rendered on the training
  device, letterboxed into the square input with the processor's mean colour as padding (as
  ``api_tool.geometry.Letterbox`` and the attributor do), rounded to whole grey levels, half of
  them softened by a 3x3 blur (inputs resized by the attributor have soft edges). Objects occluded
  below ``SceneConfig.min_visible`` are removed, as ``generate_scene`` does.
* Questions: existence yes/no with POPE-style negatives (random / popular / adversarial, half yes,
  half no), colour, shape, count, relative position (``scenes.make_question``), and ``location``
  ("where is the red circle?" -> "top left", the canvas split into thirds). Each training sequence
  is a conversation of ``--turns`` questions about one image in the processor's chat template,
  ``USER: <image>\\n{q1} ASSISTANT: {a1} </s>USER: {q2} ASSISTANT: {a2} </s>...`` (LLaVA's
  multi-turn format): the 196 image tokens are paid once for several answers. The first turn is
  exactly the single-question prompt used at inference; held-out evaluation uses single turns.
* Assistant episodes (``training.assistant_data``, ``training.assistant_batches``; ``--episodes`` per
  step, ``--small-share`` of them on ``SMALL_OBJECT_CONFIG`` scenes, 6-12 small objects on large
  canvases, rendered at twice the input side and area-downscaled so small objects are a few pixels):
  the agent's conversation (system prompt + bound ``attention_prompt`` tool -> the JSON tool call for
  a detail question, then the tool's annotated image or crop -> the answer; a whole-scene question ->
  the answer directly), ``verify`` (original + annotated, first answers wrong 40 % of the time ->
  a judgement line and ``FINAL: <right answer>``), ``masked`` / ``masked_hint`` (annotated image
  alone), ``zoom`` (original + crop) and plain questions. The LangChain messages are built as the
  agent and the loop build them and rendered by ``ChatTransformersVLM.to_conversation`` and
  ``render_prompt``, so training ids equal inference ids. Annotations are drawn from the ground-truth
  masks on the patch grid (blurred, normalised, upsampled; gray at random levels or jet heatmap),
  15 % on a wrong object and 10 % diffuse in the two-image and agent episodes; crops are square windows
  1.3-3x the asked-about objects, offset up to a fifth (12 % placed elsewhere in the agent's tool results).
* Loss: cross-entropy on the answer tokens and each closing ``</s>`` only (so greedy decoding stops
  right after the short answer). AdamW, warm-up then cosine decay, bf16 autocast on CUDA.
* Grounding loss (``--grounding-weight``, on by default, one decoder block ``--grounding-layer``):
  at that block, the head-averaged attention over the image tokens (softmax over the image keys
  alone, exactly the quantity ``LlavaAttributor`` reads) of each position that predicts an answer
  token is pulled towards the patches covered by the object(s) the question is about (cross-entropy
  against the objects' patch coverage; questions about absent objects get none). So that block's
  map is *trained* to point; the other blocks' maps are not, and the curves report pointing for
  every block so the two can be told apart.

It prints its curves: loss; on held-out single-question prompts, exact-match accuracy per question
type and per POPE split (teacher forcing: an answer counts when every answer token and the ``</s>``
are the argmax) and, per decoder block, how often the argmax of the answer's image attention falls on
a patch of the asked-about object; and, by greedy generation on held-out prompts rendered through
``ChatTransformersVLM`` (200 per category), answer accuracy plain / with annotation / with crop on
default and small-object scenes, the tool-call rate on detail and whole-scene agent questions (and
whether the call passes the user's question), the answer after the tool's result, and the share of
``verify`` replies with a parsable ``FINAL:`` line (and its accuracy). It writes the
``save_pretrained`` directory (model + processor + ``training.json``). Seeded; ``--time-budget``
(seconds) ends training early with the schedule compressed to fit (the step count then depends on the
machine's speed). Runs on CPU too (slowly; evaluation generates): ``--device cpu --steps 3 --batch 4
--turns 2 --episodes 6 --workers 0 --eval-scenes 8 --eval-episodes 4`` with a small model.

The shipped weights came from three runs on one H200 (``.device/train_llava.sh``; otherwise the defaults):
``python -m training.train_llava --time-budget 320 --steps 1000000 --eval-every 1000 --log-every 100
--eval-episodes 200`` (2,380 steps from scratch, with the episode mix of that time: plain 0.2, verify 0.16,
masked 0.06, no iterative), then ``--init`` that folder with more verify and masked episodes, ``--lr 1e-3
--warmup 100 --time-budget 430 --eval-every 1500`` (3,143 steps), then ``--init`` again with today's mix
(``iterative`` added), ``--lr 5e-4 --warmup 50 --time-budget 240`` (1,657 steps). Each step is 128 scenes x 6
plain questions plus 96 assistant episodes. Final held-out numbers are in ``training.json``, which also keeps
the earlier runs' configs and numbers, each under the next one's ``init``. The defaults (``--steps 2800``, no
time budget) run the same recipe on a step-count schedule; the data stream is seeded per worker, so it is the
same for a given ``--workers`` (GPU kernels may still differ in the last bits from run to run). ``--init DIR``
continues a saved demo LLaVA of the same sizes and vocabulary (else ``InvalidParameterError``).

Example:
    python -m training.train_llava --out api_tool/demo/weights/llava
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from agents.chat_models import ChatTransformersVLM
from api_tool.backends.lvlm import answer_token_ids, image_attention, prompt_text
from api_tool.backends.lvlm_families.base import apply_rotary, split_heads
from api_tool.backends.lvlm_families.base import language_model_layers as decoder_layers
from api_tool.demo.scenes import (
    POPE_SPLITS,
    Layouts,
    letterbox_boxes,
    name_of,
    render_layouts,
    sample_layouts,
)
from api_tool.demo.tiny_llava import DEMO_LLAVA_DIR, build_tiny_llava, build_tiny_llava_processor, save_tiny_llava
from api_tool.errors import InvalidParameterError
from training.assistant_batches import (
    EpisodeBatch,
    EpisodeStream,
    ViewInputs,
    episode_logits,
    evaluate_generation,
    image_features,
    make_held_out_sets,
)
from training.assistant_data import EpisodeRenderer, assistant_vocabulary, render_views, soften_and_normalise
from training.flags import parse_config
from training.llava_questions import (
    TYPE_NAMES,
    canvas_extent,
    drop_hidden,
    sample_question,
    training_vocabulary,
)

IGNORE = -100
MAX_WEIGHTS_BYTES = 11 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Token sequences.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """Token ids of ``N`` conversations, ``(N, L)`` each, right-padded.

    ``labels`` holds the answer tokens and each turn's ``</s>`` (``IGNORE`` elsewhere); ``turns``
    the turn index of those label positions (-1 elsewhere).
    """

    ids: torch.Tensor
    labels: torch.Tensor
    turns: torch.Tensor

    def to(self, device: torch.device) -> Encoded:
        """The same tensors on ``device``."""
        return Encoded(*(tensor.to(device, non_blocking=True) for tensor in (self.ids, self.labels, self.turns)))

    def select(self, rows: torch.Tensor) -> Encoded:
        """The conversations picked by ``rows``."""
        return Encoded(self.ids[rows], self.labels[rows], self.turns[rows])


class PromptEncoder:
    """Turns conversations of (question, answer) turns into the token ids the processor and its chat
    template give (checked by ``check_encoding``).

    Every conversation starts with the same tokens up to the image, so the ``image_tokens`` image
    placeholders sit at ``image_start ..`` in every sequence. Token ids of each distinct text are
    cached (the scene language has a few thousand questions).
    """

    def __init__(self, processor: LlavaProcessor, image_tokens: int) -> None:
        marker, answer, follow = "qqqq", "aaaa", "ffff"
        self.first_before, self.first_after = prompt_text(processor, marker).split(marker)
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": marker}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            {"role": "user", "content": [{"type": "text", "text": follow}]},
        ]
        rendered = str(processor.apply_chat_template(conversation, add_generation_prompt=True))
        follow_up = rendered.split(processor.tokenizer.eos_token, 1)[1]
        self.next_before, self.next_after = follow_up.split(follow)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_tokens = image_tokens
        self.image_id = int(self.tokenizer.convert_tokens_to_ids(processor.image_token))
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.image_start = self.tokenizer(self.first_before).input_ids.index(self.image_id)
        self._prompts: dict[tuple[str, bool], list[int]] = {}
        self._replies: dict[str, list[int]] = {}

    def prompt_ids(self, question: str, first: bool = True) -> list[int]:
        """The ids of one user turn: the first one (with ``<s>`` and the expanded image) or a later one."""
        key = (question, first)
        if key not in self._prompts:
            if first:
                ids = self.tokenizer(self.first_before + question + self.first_after).input_ids
                if ids[self.image_start] != self.image_id:
                    raise ValueError(f"prompt does not start like the template: {ids[: self.image_start + 1]}")
                start = self.image_start
                ids = [*ids[:start], *[self.image_id] * self.image_tokens, *ids[start + 1 :]]
            else:
                ids = self.tokenizer(self.next_before + question + self.next_after, add_special_tokens=False).input_ids
            self._prompts[key] = ids
        return self._prompts[key]

    def reply_ids(self, answer: str) -> list[int]:
        """The answer's ids followed by ``</s>``."""
        if answer not in self._replies:
            ids = self.tokenizer(answer, add_special_tokens=False).input_ids
            self._replies[answer] = [*ids, self.eos_id]
        return self._replies[answer]

    def encode(self, conversations: Sequence[Sequence[tuple[str, str]]]) -> Encoded:
        """Ids, labels and turn indices of conversations of ``(question, answer)`` turns."""
        rows = []
        for conversation in conversations:
            ids: list[int] = []
            labels: list[int] = []
            turns: list[int] = []
            for turn, (question, answer) in enumerate(conversation):
                prompt, reply = self.prompt_ids(question, turn == 0), self.reply_ids(answer)
                ids += prompt + reply
                labels += [IGNORE] * len(prompt) + reply
                turns += [-1] * len(prompt) + [turn] * len(reply)
            rows.append((ids, labels, turns))
        length = max(len(ids) for ids, _, _ in rows)
        ids_array = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int64)
        labels_array = np.full((len(rows), length), IGNORE, dtype=np.int64)
        turns_array = np.full((len(rows), length), -1, dtype=np.int64)
        for row, (ids, labels, turns) in enumerate(rows):
            ids_array[row, : len(ids)] = ids
            labels_array[row, : len(ids)] = labels
            turns_array[row, : len(ids)] = turns
        return Encoded(torch.from_numpy(ids_array), torch.from_numpy(labels_array), torch.from_numpy(turns_array))


def check_encoding(encoder: PromptEncoder, side: int) -> None:
    """Raise ``ValueError`` unless the encoder gives exactly the processor's ids for a two-turn
    conversation rendered by the chat template, and the first turn's answer ids are those
    ``LlavaAttributor`` scores (``answer_token_ids``)."""
    from PIL import Image

    processor = encoder.processor
    turns = [("is there a red circle in the image?", "top left"), ("what colour is the star?", "blue")]
    conversation: list[dict[str, Any]] = []
    for index, (question, answer) in enumerate(turns):
        content: list[dict[str, str]] = [{"type": "image"}] if index == 0 else []
        conversation.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    text = str(processor.apply_chat_template(conversation))
    blank = Image.new("RGB", (side, side))
    expected = list(processor(images=blank, text=text, do_resize=False, do_center_crop=False).input_ids[0])
    encoded = encoder.encode([turns])
    if encoded.ids[0].tolist() != expected:
        raise ValueError(f"training ids differ from the processor's: {encoded.ids[0].tolist()} vs {expected}")
    question, answer = turns[0]
    prompt = prompt_text(processor, question)
    first_reply = answer_token_ids(processor, prompt, question, answer)
    labelled = encoded.labels[0][encoded.turns[0] == 0].tolist()
    if labelled != [*first_reply, encoder.eos_id]:
        raise ValueError(f"first-turn labels {labelled} differ from the attributor's answer ids {first_reply} + </s>")


# ----------------------------------------------------------------------------------------------
# Batches of scenes and questions (DataLoader workers, CPU).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionBatch:
    """Conversations about ``n`` scenes: conversation ``i`` (``T`` turns) is about scene ``image_index[i]``.

    ``types`` ``(N, T)`` index ``TYPE_NAMES``; ``splits`` ``(N, T)`` index ``POPE_SPLITS`` for
    existence questions, -1 otherwise; ``targets`` ``(N, T, K)``: the object slots each question is
    about (those whose colour-shape name it names; none for an absent object).
    """

    encoded: Encoded
    image_index: torch.Tensor
    types: torch.Tensor
    splits: torch.Tensor
    targets: torch.Tensor
    texts: tuple[tuple[str, str], ...]


def make_batch(
    scenes: int,
    conversations: int,
    turns: int,
    generator: torch.Generator,
    rng: random.Random,
    encoder: PromptEncoder,
) -> tuple[Layouts, QuestionBatch]:
    """``scenes`` layouts and ``conversations`` conversations of ``turns`` questions about each."""
    layouts = drop_hidden(sample_layouts(scenes, generator))
    slots = layouts.valid.shape[1]
    chats: list[list[tuple[str, str]]] = []
    types, splits, targets = [], [], []
    valid = layouts.valid.tolist()
    for aspect, objects, present in zip(layouts.aspect.tolist(), layouts.facts(), valid):
        extent = canvas_extent(aspect)
        slot_of = [k for k in range(slots) if present[k]]
        for _ in range(conversations):
            questions = [sample_question(objects, extent, rng) for _ in range(turns)]
            chats.append([(q.question, q.answer) for q in questions])
            types.append([TYPE_NAMES.index(q.type) for q in questions])
            splits.append([POPE_SPLITS.index(q.split) if q.split else -1 for q in questions])
            rows = []
            for q in questions:
                about = [False] * slots
                if not (q.type == "existence" and q.answer == "no"):
                    for obj, slot in zip(objects, slot_of):
                        about[slot] = name_of(obj) in q.targets
                rows.append(about)
            targets.append(rows)
    batch = QuestionBatch(
        encoded=encoder.encode(chats),
        image_index=torch.arange(scenes).repeat_interleave(conversations),
        types=torch.tensor(types),
        splits=torch.tensor(splits),
        targets=torch.tensor(targets, dtype=torch.bool),
        texts=tuple(turn for chat in chats for turn in chat),
    )
    return layouts, batch


class SceneQuestionStream(IterableDataset):
    """Endless (layouts, questions) batches of multi-turn plain questions, each paired with a batch of
    assistant episodes (``training.assistant_batches``); each worker has its own seeded stream."""

    def __init__(self, scenes: int, turns: int, seed: int, encoder: PromptEncoder, episodes: EpisodeStream) -> None:
        super().__init__()
        self.scenes = scenes
        self.turns = turns
        self.seed = seed
        self.encoder = encoder
        self.episodes = episodes

    def __iter__(self) -> Iterator[tuple[Layouts, QuestionBatch, Layouts, EpisodeBatch]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:
            torch.set_num_threads(1)
        generator = torch.Generator().manual_seed(self.seed * 1000 + worker)
        rng = random.Random(self.seed * 1000 + worker)
        for episode_layouts, episodes in self.episodes:
            yield (*make_batch(self.scenes, 1, self.turns, generator, rng, self.encoder), episode_layouts, episodes)


# ----------------------------------------------------------------------------------------------
# Pixels, patch coverage and the forward pass (training device).
# ----------------------------------------------------------------------------------------------


def render_pixels(
    layouts: Layouts,
    side: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None,
    device: torch.device,
    blur_probability: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Letterboxed, normalised inputs ``(n, 3, side, side)`` and the object labels ``(n, side, side)``.

    The padding is the processor's mean colour in whole grey levels (as the attributor's
    ``Letterbox.apply`` fills it), pixels are rounded to whole grey levels like a PIL image, and a
    ``blur_probability`` share of the images is 3x3-blurred."""
    fill = tuple(float(round(255 * m)) for m in mean)
    rendered = render_layouts(
        layouts,
        (side, side),
        content_boxes=letterbox_boxes(layouts.aspect, side),
        pad_rgb=fill,  # type: ignore[arg-type]
        generator=generator,
        device=device,
    )
    return soften_and_normalise(rendered.images, blur_probability, mean, std, generator), rendered.labels


def patch_coverage(labels: torch.Tensor, slots: int, patch: int) -> torch.Tensor:
    """``(n, slots, cells)``: the share of each patch (row-major) covered by each object slot.

    Example:
        >>> labels = torch.zeros(1, 4, 4, dtype=torch.long); labels[0, :2, :2] = 1
        >>> patch_coverage(labels, 1, 2)[0, 0].tolist()
        [1.0, 0.0, 0.0, 0.0]
    """
    n, height, width = labels.shape
    one_hot = F.one_hot(labels, slots + 1)[..., 1:].permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, patch).reshape(n, slots, (height // patch) * (width // patch))


class AttentionInputs:
    """Forward pre-hooks that keep the inputs (normalised hidden states, rotary cos/sin) of some
    decoder blocks' self-attention, so their image attention can be recomputed with gradients."""

    def __init__(self, model: LlavaForConditionalGeneration, layers: Sequence[int]) -> None:
        self.blocks = decoder_layers(model)
        self.layers = list(layers)
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handles = [
            self.blocks[layer].self_attn.register_forward_pre_hook(self._keeper(layer), with_kwargs=True)
            for layer in self.layers
        ]

    def _keeper(self, layer: int) -> Any:
        def keep(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            self.kept[layer] = (hidden, cos, sin)

        return keep

    def image_attention(self, layer: int, image_start: int, image_tokens: int) -> torch.Tensor:
        """``(M, L - image_end, N)``: for every position after the image, block ``layer``'s
        head-averaged softmax over the image keys alone (the attributor's map before averaging)."""
        hidden, cos, sin = self.kept[layer]
        attention = self.blocks[layer].self_attn
        cos = cos.expand(hidden.shape[0], -1, -1)
        sin = sin.expand(hidden.shape[0], -1, -1)
        image_end = image_start + image_tokens
        head_dim = int(attention.head_dim)
        keys = split_heads(attention.k_proj(hidden[:, image_start:image_end]), head_dim).float()
        keys = apply_rotary(keys, cos[:, image_start:image_end].float(), sin[:, image_start:image_end].float())
        queries = split_heads(attention.q_proj(hidden[:, image_end:]), head_dim).float()
        queries = apply_rotary(queries, cos[:, image_end:].float(), sin[:, image_end:].float())
        return image_attention(queries, keys, float(attention.scaling))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass(frozen=True)
class Outputs:
    """Logits for the labelled tokens and their targets, in row-major order of ``mask`` ``(N, L)``:
    the positions ``p`` holding a labelled token (predicted at ``p - 1``)."""

    logits: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def answer_logits(
    model: LlavaForConditionalGeneration,
    pixels: torch.Tensor,
    encoded: Encoded,
    image_index: torch.Tensor,
    image_start: int,
) -> Outputs:
    """The model's own forward pass (image features replace the placeholders, causal language
    model), each image encoded once and shared by its conversations; logits only where labelled."""
    features = image_features(model, pixels)
    embeds = model.get_input_embeddings()(encoded.ids)
    count = features.shape[1]
    embeds = torch.cat(
        [embeds[:, :image_start], features[image_index].to(embeds.dtype), embeds[:, image_start + count :]], dim=1
    )
    hidden = model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    mask = encoded.labels != IGNORE
    mask[:, 0] = False
    predicting = torch.zeros_like(mask)
    predicting[:, :-1] = mask[:, 1:]
    return Outputs(model.lm_head(hidden[predicting]), encoded.labels[mask], mask)


def answer_steps(encoded: Encoded, eos_id: int) -> torch.Tensor:
    """``(N, L)``: positions that predict an answer token other than ``</s>`` (the steps the
    attributor averages), marked at the predicting position."""
    labels = encoded.labels
    answer = (labels != IGNORE) & (labels != eos_id)
    steps = torch.zeros_like(answer)
    steps[:, :-1] = answer[:, 1:]
    return steps


def step_maps(
    attention: torch.Tensor, encoded: Encoded, eos_id: int, image_end: int, turns: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each turn's answer-step attention rows: ``(N, T, cells)`` maps and ``(N, T)`` validity."""
    steps = answer_steps(encoded, eos_id)[:, image_end:]
    turn_of = torch.zeros_like(encoded.turns)
    turn_of[:, :-1] = encoded.turns[:, 1:]
    turn_of = turn_of[:, image_end:]
    one_hot = F.one_hot(turn_of.clamp(min=0), turns).to(attention.dtype) * steps[..., None].to(attention.dtype)
    sums = torch.einsum("nlt,nlc->ntc", one_hot, attention)
    counts = one_hot.sum(dim=1)
    return sums / counts.clamp(min=1)[..., None], counts > 0


def grounding_loss(maps: torch.Tensor, valid: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the answer maps ``(N, T, cells)`` against the normalised patch coverage of
    the asked-about objects ``(N, T, cells)``, over turns that have both (0 if none)."""
    mass = coverage.sum(dim=-1)
    chosen = valid & (mass > 0)
    if not bool(chosen.any()):
        return maps.sum() * 0.0
    target = coverage[chosen] / mass[chosen][:, None]
    return -(target * maps[chosen].clamp(min=1e-8).log()).sum(dim=-1).mean()


def exact_match(outputs: Outputs, encoded: Encoded, turns: int) -> torch.Tensor:
    """``(N, T)``: every labelled token of the turn is the argmax (greedy decoding would give exactly
    the answer and stop)."""
    wrong = torch.zeros(outputs.mask.shape[0], turns, dtype=torch.long, device=outputs.mask.device)
    rows = outputs.mask.nonzero()[:, 0]
    turn = encoded.turns[outputs.mask]
    wrong.index_put_((rows, turn), (outputs.logits.argmax(dim=-1) != outputs.targets).long(), accumulate=True)
    return wrong == 0


# ----------------------------------------------------------------------------------------------
# Configuration, held-out evaluation, training.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters and model size (all on the command line)."""

    steps: int = 2800
    batch: int = 128
    turns: int = 6
    episodes: int = 96
    small_share: float = 0.5
    eval_episodes: int = 200
    lr: float = 1.5e-3
    warmup: int = 150
    weight_decay: float = 0.05
    blur_probability: float = 0.5
    grounding_weight: float = 0.2
    grounding_layer: int = 2
    seed: int = 0
    workers: int = 14
    side: int = 224
    patch: int = 16
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    eval_scenes: int = 1000
    eval_questions: int = 4
    eval_every: int = 500
    log_every: int = 50
    time_budget: float = 0.0
    init: str = ""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = str(DEMO_LLAVA_DIR)


@dataclass(frozen=True)
class HeldOut:
    """A fixed held-out set (its own seed) of single-question prompts, rendered at each evaluation."""

    layouts: Layouts
    questions: QuestionBatch
    seed: int


def make_held_out(config: TrainConfig, encoder: PromptEncoder) -> HeldOut:
    """``eval_scenes`` scenes from a stream disjoint from training, ``eval_questions`` single-turn
    prompts each."""
    seed = 1_000_003 + config.seed
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    layouts, questions = make_batch(config.eval_scenes, config.eval_questions, 1, generator, rng, encoder)
    return HeldOut(layouts, questions, seed)


@dataclass(frozen=True)
class Inputs:
    """How pixels and prompts are made for the model: input side, patch, normalisation, prompt layout."""

    side: int
    patch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_start: int
    image_tokens: int
    eos_id: int
    yes_id: int


@torch.no_grad()
def evaluate(
    model: LlavaForConditionalGeneration, held_out: HeldOut, inputs: Inputs, device: torch.device, chunk: int = 100
) -> dict[str, float]:
    """Exact-match accuracy over all questions, per question type and per POPE split; the share of
    existence questions answered "yes"; and, per decoder block, the pointing rate: the argmax of
    the answer's image attention falls on a patch covered by the one object a question is about."""
    was_training = model.training
    model.eval()
    layers = list(range(len(decoder_layers(model))))
    probe = AttentionInputs(model, layers)
    noise = torch.Generator(device=device).manual_seed(held_out.seed)
    q = held_out.questions
    hits, said_yes, pointed, single = [], [], {layer: [] for layer in layers}, []
    image_end = inputs.image_start + inputs.image_tokens
    try:
        for start in range(0, held_out.layouts.size, chunk):
            part = slice(start, min(start + chunk, held_out.layouts.size))
            rows = (q.image_index >= part.start) & (q.image_index < part.stop)
            pixels, labels = render_pixels(
                held_out.layouts.select(part), inputs.side, inputs.mean, inputs.std, noise, device
            )
            encoded = q.encoded.select(rows).to(device)
            image_index = (q.image_index[rows] - part.start).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                outputs = answer_logits(model, pixels, encoded, image_index, inputs.image_start)
            hits.append(exact_match(outputs, encoded, 1)[:, 0].cpu())
            counts = outputs.mask.sum(dim=1)
            first_rows = counts.cumsum(0) - counts
            said_yes.append((outputs.logits[first_rows].argmax(dim=-1) == inputs.yes_id).cpu())
            targets = q.targets[rows][:, 0].to(device)
            single.append((targets.sum(dim=-1) == 1).cpu())
            coverage = torch.einsum(
                "nk,nkc->nc", targets.float(), patch_coverage(labels, targets.shape[-1], inputs.patch)[image_index]
            )
            for layer in layers:
                maps, _ = step_maps(
                    probe.image_attention(layer, inputs.image_start, inputs.image_tokens),
                    encoded,
                    inputs.eos_id,
                    image_end,
                    1,
                )
                best = maps[:, 0].argmax(dim=-1)
                pointed[layer].append((coverage.gather(1, best[:, None])[:, 0] > 0).cpu())
    finally:
        probe.remove()
    correct = torch.cat(hits).float()
    yes = torch.cat(said_yes).float()
    types, splits = q.types[:, 0], q.splits[:, 0]
    metrics = {"all": float(correct.mean())}
    for index, name in enumerate(TYPE_NAMES):
        chosen = types == index
        if chosen.any():
            metrics[name] = float(correct[chosen].mean())
    for index, split in enumerate(POPE_SPLITS):
        chosen = splits == index
        if chosen.any():
            metrics[f"pope_{split}"] = float(correct[chosen].mean())
    existence = types == TYPE_NAMES.index("existence")
    if existence.any():
        metrics["existence_yes_ratio"] = float(yes[existence].mean())
    one_object = torch.cat(single)
    for layer in layers:
        metrics[f"pointing_L{layer}"] = float(torch.cat(pointed[layer])[one_object].float().mean())
    model.train(was_training)
    return metrics


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embed" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(config: TrainConfig) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The untrained demo LLaVA and its processor for ``config``'s sizes."""
    processor = build_tiny_llava_processor(
        [*training_vocabulary(), *assistant_vocabulary()],
        image_size=config.side,
        patch_size=config.patch,
        pad_to_square=True,
        chat_tokens=True,
    )
    model = build_tiny_llava(
        processor,
        hidden=config.hidden,
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        vision_hidden=config.vision_hidden,
        vision_layers=config.vision_layers,
        vision_heads=config.vision_heads,
        max_positions=2048,
        seed=config.seed,
    )
    model.config.vision_feature_layer = -1
    model.generation_config.max_new_tokens = 64
    model.generation_config.do_sample = False
    return model, processor


INIT_RECORD_KEYS = ("train_config", "steps_run", "held_out", "init")
"""What ``training.json`` keeps of the model a run continued from (its own ``init`` too: the chain of runs)."""


def load_initial_weights(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, directory: str
) -> dict[str, Any]:
    """Copy a saved demo LLaVA's weights into ``model`` (same sizes and vocabulary, else
    ``InvalidParameterError``) and return its ``training.json`` record (empty when absent)."""
    saved = LlavaProcessor.from_pretrained(directory)
    if saved.tokenizer.get_vocab() != processor.tokenizer.get_vocab():
        raise InvalidParameterError(
            f"{directory}: its tokenizer differs from this recipe's vocabulary; train from scratch"
        )
    try:
        source = LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
        model.load_state_dict(source.state_dict())
    except (RuntimeError, ValueError) as error:
        raise InvalidParameterError(f"{directory}: its model does not match this recipe's sizes ({error})") from error
    record_path = Path(directory) / "training.json"
    return json.loads(record_path.read_text()) if record_path.is_file() else {}


def save_demo_llava(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    directory: str | Path,
    record: dict[str, object],
    attribution_layer: int,
) -> Path:
    """Save fp16 weights, processor and ``training.json``; the config declares float32 so a plain
    ``from_pretrained`` upcasts, and ``api_attribution_layer`` (the block ``LlavaAttributor`` reads by
    default). Refuses weights over ``MAX_WEIGHTS_BYTES``."""
    half = LlavaForConditionalGeneration(model.config)
    half.load_state_dict(model.state_dict())
    half.generation_config = model.generation_config
    path = save_tiny_llava(half.to(torch.float16).eval(), processor, directory)
    config_path = path / "config.json"
    stored = json.loads(config_path.read_text())
    for section in (stored, stored.get("text_config", {}), stored.get("vision_config", {})):
        if "dtype" in section:
            section["dtype"] = "float32"
    stored["api_attribution_layer"] = attribution_layer
    config_path.write_text(json.dumps(stored, indent=2, sort_keys=True) + "\n")
    size = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    if size > MAX_WEIGHTS_BYTES:
        raise ValueError(f"the weights take {size / 2**20:.1f} MiB, over the {MAX_WEIGHTS_BYTES / 2**20:.0f} MiB cap")
    (path / "training.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.3f}" for name, value in metrics.items())


def train(config: TrainConfig) -> dict[str, float]:
    """Train, print curves, save the model; returns the final held-out metrics."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model, processor = build_model(config)
    grid = config.side // config.patch
    encoder = PromptEncoder(processor, grid * grid)
    check_encoding(encoder, config.side)
    inputs = Inputs(
        side=config.side,
        patch=config.patch,
        mean=tuple(float(m) for m in processor.image_processor.image_mean),
        std=tuple(float(s) for s in processor.image_processor.image_std),
        image_start=encoder.image_start,
        image_tokens=grid * grid,
        eos_id=encoder.eos_id,
        yes_id=int(processor.tokenizer.convert_tokens_to_ids("yes")),
    )
    init_record = load_initial_weights(model, processor, config.init) if config.init else None
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    print(f"params: {params:,}; vocab {len(processor.tokenizer)}; grid {grid}x{grid}; {asdict(config)}", flush=True)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98))

    def lr_at(progress: float, step: int) -> float:
        warm = min(1.0, (step + 1) / config.warmup)
        return config.lr * warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    renderer = EpisodeRenderer(ChatTransformersVLM(hf_model=model, processor=processor), grid * grid)
    view_inputs = ViewInputs(config.side, config.patch, inputs.mean, inputs.std)
    episodes = EpisodeStream(config.episodes, config.small_share, config.seed, renderer)
    stream = SceneQuestionStream(config.batch, config.turns, config.seed, encoder, episodes)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=config.workers,
        prefetch_factor=4 if config.workers > 0 else None,
        persistent_workers=config.workers > 0,
    )
    held_out = make_held_out(config, encoder)
    held_out_sets = make_held_out_sets(renderer, config.eval_episodes, config.seed)

    def evaluate_all() -> dict[str, float]:
        metrics = evaluate(model, held_out, inputs, device)
        generated, examples = evaluate_generation(model, held_out_sets, renderer, view_inputs, device)
        for category, replies in examples.items():
            print(f"  {category}: {' | '.join(replies)}", flush=True)
        return {**metrics, **generated}

    noise = torch.Generator(device=device).manual_seed(config.seed)
    use_amp = device.type == "cuda"
    grounding = AttentionInputs(model, [config.grounding_layer]) if config.grounding_weight > 0 else None
    image_end = inputs.image_start + inputs.image_tokens
    curves: list[dict[str, float]] = []
    started = time.time()
    step = 0
    for layouts, questions, episode_layouts, episode_batch in loader:
        elapsed = time.time() - started
        progress = step / config.steps
        if config.time_budget > 0:
            progress = max(progress, elapsed / config.time_budget)
        if progress >= 1.0:
            break
        lr = lr_at(progress, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels, labels = render_pixels(
            layouts, inputs.side, inputs.mean, inputs.std, noise, device, config.blur_probability
        )
        encoded = questions.encoded.to(device)
        image_index = questions.image_index.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            outputs = answer_logits(model, pixels, encoded, image_index, inputs.image_start)
            answer_loss = F.cross_entropy(outputs.logits.float(), outputs.targets)
            loss = answer_loss
            ground = torch.zeros((), device=device)
            if grounding is not None:
                attention = grounding.image_attention(config.grounding_layer, inputs.image_start, inputs.image_tokens)
                maps, valid = step_maps(attention, encoded, inputs.eos_id, image_end, config.turns)
                targets = questions.targets.to(device).float()
                slots = targets.shape[-1]
                coverage = torch.einsum(
                    "ntk,nkc->ntc", targets, patch_coverage(labels, slots, inputs.patch)[image_index]
                )
                ground = grounding_loss(maps, valid, coverage)
                loss = loss + config.grounding_weight * ground
            episode_pixels = render_views(
                episode_layouts,
                episode_batch.views,
                config.side,
                config.patch,
                inputs.mean,
                inputs.std,
                noise,
                device,
                config.blur_probability,
            )
            reply_logits, reply_targets = episode_logits(
                model,
                image_features(model, episode_pixels),
                episode_batch.ids.to(device, non_blocking=True),
                episode_batch.labels.to(device, non_blocking=True),
                renderer.image_id,
            )
            episode_loss = F.cross_entropy(reply_logits.float(), reply_targets)
            loss = loss + episode_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % config.log_every == 0:
            print(
                f"step {step:6d}  loss {float(answer_loss.detach()):.4f}  episodes {float(episode_loss.detach()):.4f}  "
                f"grounding {float(ground.detach()):.4f}  "
                f"lr {lr:.2e}  {(step + 1) * config.batch / max(elapsed, 1e-9):7.0f} img/s  {elapsed:6.0f}s",
                flush=True,
            )
        step += 1
        if step % config.eval_every == 0:
            metrics = evaluate_all()
            curves.append(
                {"step": step, "seconds": time.time() - started, "loss": float(answer_loss.detach()), **metrics}
            )
            print(f"eval step {step:6d}  {_format(metrics)}", flush=True)
    train_seconds = time.time() - started
    if grounding is not None:
        grounding.remove()
    model.eval()
    metrics = evaluate_all()
    print(f"final  {_format(metrics)}", flush=True)
    record = {
        "train_config": asdict(config),
        "steps_run": step,
        "train_seconds": train_seconds,
        "parameters": params,
        "held_out": metrics,
        "curves": curves,
        "vision_tower_init": f"continued from {config.init}" if config.init else "random (trained from scratch)",
        **(
            {"init": {key: init_record.get(key) for key in ("train_config", "steps_run", "held_out")}}
            if init_record
            else {}
        ),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    out = save_demo_llava(model.cpu(), processor, config.out, record, config.grounding_layer)
    size = sum(file.stat().st_size for file in out.glob("*.safetensors"))
    print(f"saved to {out} ({size / 2**20:.2f} MiB of weights) after {step} steps in {train_seconds:.0f}s", flush=True)
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command-line flags, one per ``TrainConfig`` field."""
    return parse_config(TrainConfig, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -m training.train_llava``."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
