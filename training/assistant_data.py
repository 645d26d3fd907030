"""Assistant episodes for the demo LLaVA: the conversations the agent, the tool and the reflection loop
really send, rendered by ``ChatTransformersVLM``'s own code, and the images they show.

An *episode* is one training sequence: LangChain messages built exactly as ``create_api_agent`` (system
prompt, bound ``attention_prompt`` tool, the tool's result message) or the reflection loop's re-asks
(``verify``, ``masked``, ``masked_hint``, ``zoom``, ``iterative``) build them, the assistant replies to learn, and the
images shown, each a *view* of a synthetic scene: the original, an annotated copy (gray or heatmap
prompt made from the ground-truth masks, sometimes on the wrong object or diffuse) or a crop window
(sometimes missing the target). ``ChatTransformersVLM.to_conversation`` and ``render_prompt`` turn the
messages into the prompt text, so the training ids are the inference ids token for token
(``episode_ids`` asserts that each earlier reply sits where a later prompt renders it).

Kinds (``EPISODE_KINDS``):

* ``plain``: the image and a question, no tools: the answer.
* ``agent_detail``: the agent's system prompt, the tool bound, a detail question: the JSON tool call;
  then the tool's result (annotated image or crop): the answer.
* ``agent_whole``: the same with a whole-scene question ("describe the image", "how many objects are
  there?"): the answer directly.
* ``verify``: original + annotated image and ``VERIFY_TEMPLATE`` with a first answer that is wrong
  ``WRONG_FIRST_ANSWER`` of the time: a short judgement and ``FINAL: <right answer>``.
* ``masked`` / ``masked_hint``: the annotated image alone (a correct annotation) and the question.
* ``zoom``: the original and a crop of the asked-about region, then the question.
* ``iterative``: the original alone and ``ITERATIVE_TEMPLATE`` (the loop's control, a second look without
  annotation) with a first answer wrong ``WRONG_FIRST_ANSWER`` of the time: the right answer.

Example:
    >>> from training.assistant_data import verify_reply
    >>> verify_reply("red", "blue")
    'the first answer is wrong.\\nFINAL: red'
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from PIL import Image

from agents.agent import api_system_prompt
from agents.chat_models import ChatTransformersVLM, describe_tools
from agents.prompts import IMAGE_LABELS, STRATEGIES
from api_tool.demo.scenes import (
    COLOUR_NAMES,
    EXTENT,
    SHAPES,
    WHOLE_SCENE_TYPES,
    Layouts,
    ObjectFacts,
    Question,
    letterbox_boxes,
    name_of,
    render_layouts,
    whole_scene_question,
)
from api_tool.tool import TOOL_NAME, AttentionPromptTool

EPISODE_KINDS: tuple[str, ...] = (
    "plain",
    "agent_detail",
    "agent_whole",
    "verify",
    "masked",
    "masked_hint",
    "zoom",
    "iterative",
)
KIND_WEIGHTS: dict[str, float] = {
    "plain": 0.12,
    "agent_detail": 0.24,
    "agent_whole": 0.1,
    "verify": 0.2,
    "masked": 0.08,
    "masked_hint": 0.04,
    "zoom": 0.16,
    "iterative": 0.06,
}
VIEW_KINDS: tuple[str, ...] = ("original", "annotated", "crop")
STYLES: tuple[str, ...] = ("gray", "heatmap")
WRONG_FIRST_ANSWER = 0.4
"""Share of ``verify`` and ``iterative`` episodes whose first answer is wrong (the reply must then correct it)."""
WRONG_ANNOTATION = 0.15
"""Share of annotations (two-image and agent episodes) that highlight another object than the asked one."""
DIFFUSE_ANNOTATION = 0.1
"""Share of annotations that are a diffuse blob field instead of an object's mask."""
CROP_MISSES = 0.12
"""Share of crops whose window is placed away from the asked-about objects."""
CROP_IN_TOOL_RESULT = 0.3
"""Share of agent tool results that are a crop (the tool's zoom style) instead of an annotated image."""
TOOL_BACKENDS: tuple[str, ...] = ("clip (demo)", "llava (demo)", "siglip (demo-siglip)")
RIGHT_LINE = "the first answer is correct."
WRONG_LINE = "the first answer is wrong."
LOCATION_ANSWERS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)


def _placeholder_image_block() -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, format="PNG")
    return {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode(), "mime_type": "image/png"}


IMAGE_BLOCK = _placeholder_image_block()
"""Stands for every image in rendered messages (the text does not depend on the pixels)."""


def tool_schemas() -> list[dict[str, Any]]:
    """The bound tools as ``ChatTransformersVLM.bind_tools`` formats them: the default attention tool."""
    return [convert_to_openai_tool(AttentionPromptTool())]


def tool_call_text(question: str) -> str:
    """The reply that calls the tool, exactly as ``ChatTransformersVLM`` writes a past call back.

    Example:
        >>> tool_call_text("what colour is the star?")
        '{"tool": "attention_prompt", "arguments": {"question": "what colour is the star?"}}'
    """
    return json.dumps({"tool": TOOL_NAME, "arguments": {"question": question}})


def tool_result_text(question: str, backend: str, seconds: float, style: str) -> str:
    """The text ``AttentionPromptTool`` returns beside its image, for the user's latest image."""
    return (
        f"Highlighted the regions of user image 1 of 1 in the conversation most relevant to {question.strip()!r} "
        f"with the {backend} attributor in {seconds:.2f} s; the rest is de-emphasised ({style} style). "
        "The annotated image follows; check your answer against the highlighted regions."
    )


def verify_reply(right: str, first: str) -> str:
    """The ``verify`` reply: one judgement line, then ``FINAL: <right answer>``."""
    line = RIGHT_LINE if right == first else WRONG_LINE
    return f"{line}\nFINAL: {right}"


def plausible_wrong_answer(answer: str, rng: random.Random) -> str | None:
    """Another answer of the same kind (yes/no flipped, another colour, shape, number or place), or
    ``None`` for answers without a natural alternative (captions).

    Example:
        >>> plausible_wrong_answer("yes", random.Random(0))
        'no'
    """
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    for pool in (COLOUR_NAMES, SHAPES, LOCATION_ANSWERS):
        if answer in pool:
            return rng.choice([item for item in pool if item != answer])
    if answer.isdigit():
        value = int(answer)
        return str(max(0, value + rng.choice([-2, -1, 1, 2]))) if value > 0 else str(rng.choice([1, 2]))
    return None


def is_whole_scene(question: Question) -> bool:
    """Whether no one region answers the question (a caption, the count of all objects)."""
    return question.type in WHOLE_SCENE_TYPES or question.question == "how many objects are there?"


@dataclass(frozen=True)
class View:
    """One image of an episode: a view of scene ``scene``.

    ``slots``: the object slots an annotation highlights or a crop frames (empty: diffuse annotation,
    or a crop placed at random); ``style`` / ``gray_level``: how an annotation is drawn; ``miss``: the
    crop window is placed away from ``slots``.
    """

    scene: int
    kind: str
    slots: tuple[int, ...] = ()
    style: str = "gray"
    gray_level: int = 0
    miss: bool = False


@dataclass(frozen=True)
class Episode:
    """One training sequence: the messages of each model call and its reply, the tools bound, the views.

    ``calls[i]`` is the message list of the ``i``-th model call and ``replies[i]`` what the model says;
    later calls contain the earlier replies as messages.
    """

    kind: str
    calls: tuple[tuple[BaseMessage, ...], ...]
    replies: tuple[str, ...]
    tools: bool
    views: tuple[View, ...]
    question: Question
    truth: str
    whole_scene: bool


def _annotated_view(
    scene: int, target: Sequence[int], present: Sequence[int], rng: random.Random, errors: bool
) -> View:
    style = "gray" if rng.random() < 0.7 else "heatmap"
    gray_level = 0 if rng.random() < 0.6 else rng.randrange(0, 256)
    slots = tuple(target)
    if errors or not slots:
        draw = rng.random()
        others = [slot for slot in present if slot not in target]
        if draw < DIFFUSE_ANNOTATION:
            slots = ()
        elif (draw < DIFFUSE_ANNOTATION + WRONG_ANNOTATION or not slots) and others:
            slots = (rng.choice(others),)
    return View(scene, "annotated", slots, style, gray_level)


def _crop_view(scene: int, target: Sequence[int], present: Sequence[int], rng: random.Random, errors: bool) -> View:
    slots = tuple(target) or ((rng.choice(list(present)),) if present else ())
    return View(scene, "crop", slots, miss=errors and rng.random() < CROP_MISSES)


def _labelled_images(roles: Sequence[str]) -> list[Any]:
    content: list[Any] = []
    for role in roles:
        if len(roles) > 1:
            content.append({"type": "text", "text": IMAGE_LABELS[role]})  # type: ignore[index]
        content.append(IMAGE_BLOCK)
    return content


def make_episode(
    kind: str,
    scene: int,
    question: Question,
    target: Sequence[int],
    present: Sequence[int],
    rng: random.Random,
) -> Episode:
    """The episode of ``kind`` about ``question`` on scene ``scene`` (``target``: the slots the question is
    about; ``present``: the scene's valid slots). Messages follow ``create_api_agent`` and the reflection
    loop's ``reask_messages``."""
    q, truth = question.question, question.answer
    original = View(scene, "original")
    whole = is_whole_scene(question)
    if kind in ("agent_detail", "agent_whole"):
        system = SystemMessage(api_system_prompt())
        user = HumanMessage([{"type": "text", "text": q}, IMAGE_BLOCK])
        if whole:
            return Episode(kind, ((system, user),), (truth,), True, (original,), question, truth, whole)
        crop = rng.random() < CROP_IN_TOOL_RESULT
        view = (_crop_view if crop else _annotated_view)(scene, target, present, rng, True)
        call_id = f"call_{rng.getrandbits(96):024x}"
        call = AIMessage(content="", tool_calls=[{"name": TOOL_NAME, "args": {"question": q}, "id": call_id}])
        style = "crop" if crop else view.style
        text = tool_result_text(q, rng.choice(TOOL_BACKENDS), rng.uniform(0.01, 3.0), style)
        result = ToolMessage(
            content=[{"type": "text", "text": text}, IMAGE_BLOCK], tool_call_id=call_id, name=TOOL_NAME
        )
        calls = ((system, user), (system, user, call, result))
        return Episode(kind, calls, (tool_call_text(q), truth), True, (original, view), question, truth, whole)
    if kind == "plain":
        return Episode(
            kind,
            ((HumanMessage([IMAGE_BLOCK, {"type": "text", "text": q}]),),),
            (truth,),
            False,
            (original,),
            question,
            truth,
            whole,
        )
    strategy = STRATEGIES[kind]
    first = truth
    if kind in ("verify", "iterative") and rng.random() < WRONG_FIRST_ANSWER:
        first = plausible_wrong_answer(truth, rng) or truth
    views = []
    for role in strategy.images:
        if role == "original":
            views.append(original)
        elif role == "annotated":
            views.append(_annotated_view(scene, target, present, rng, kind == "verify"))
        else:
            views.append(_crop_view(scene, target, present, rng, False))
    content = [*_labelled_images(strategy.images), {"type": "text", "text": strategy.render(question=q, answer=first)}]
    reply = verify_reply(truth, first) if kind == "verify" else truth
    return Episode(kind, ((HumanMessage(content),),), (reply,), False, tuple(views), question, truth, whole)


def whole_scene_or(question: Question, objects: Sequence[ObjectFacts], rng: random.Random, share: float) -> Question:
    """``question``, or with probability ``share`` a whole-scene question about the same scene."""
    if rng.random() < share:
        return whole_scene_question(objects, rng.choice(WHOLE_SCENE_TYPES), rng)
    return question


class EpisodeRenderer:
    """Token ids of episodes, rendered through ``ChatTransformersVLM.to_conversation`` and ``render_prompt``.

    ``image_tokens`` placeholders stand for each image (the processor's expansion of ``<image>``).
    """

    def __init__(self, chat_model: ChatTransformersVLM, image_tokens: int) -> None:
        self.chat_model = chat_model
        self.tokenizer = chat_model.processor.tokenizer
        self.image_tokens = image_tokens
        self.image_id = int(self.tokenizer.convert_tokens_to_ids(chat_model.processor.image_token))
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.tools = tool_schemas()

    def prompt_text(self, messages: Sequence[BaseMessage], tools: bool) -> str:
        """What ``ChatTransformersVLM`` sends for ``messages`` (the tools bound or not)."""
        conversation, _ = self.chat_model.to_conversation(list(messages), self.tools if tools else [])
        return self.chat_model.render_prompt(conversation)

    def text_ids(self, text: str) -> list[int]:
        """The processor's ids of a prompt text, each ``<image>`` expanded to ``image_tokens`` placeholders."""
        ids: list[int] = []
        for token in self.tokenizer(text).input_ids:
            ids.extend([self.image_id] * self.image_tokens if token == self.image_id else [token])
        return ids

    def prompt_ids(self, messages: Sequence[BaseMessage], tools: bool) -> list[int]:
        """The ids the model is given for ``messages``."""
        return self.text_ids(self.prompt_text(messages, tools))

    def reply_ids(self, reply: str) -> list[int]:
        """A reply's ids and the closing ``</s>``."""
        return [*self.tokenizer(reply, add_special_tokens=False).input_ids, self.eos_id]

    def episode_ids(self, episode: Episode) -> tuple[list[int], list[int]]:
        """``(ids, labels)``: the last call's prompt and reply; labels hold every reply (``-100`` elsewhere).
        Raises ``ValueError`` if an earlier reply is not where the later prompt renders it."""
        last_prompt = self.prompt_ids(episode.calls[-1], episode.tools)
        ids = [*last_prompt, *self.reply_ids(episode.replies[-1])]
        labels = [-100] * len(ids)
        for call, reply in zip(episode.calls, episode.replies):
            start = len(self.prompt_ids(call, episode.tools))
            reply_ids = self.reply_ids(reply)
            if ids[start : start + len(reply_ids)] != reply_ids:
                raise ValueError(f"reply {reply!r} is not rendered where the model writes it in {episode.kind}")
            labels[start : start + len(reply_ids)] = reply_ids
        return ids, labels


def assistant_vocabulary() -> list[str]:
    """The texts of every prompt, tool description and reply form (without a model)."""
    tools = tool_schemas()
    texts = [api_system_prompt(), describe_tools(tools), RIGHT_LINE, WRONG_LINE, "FINAL:", tool_call_text("q")]
    texts += [strategy.template for strategy in STRATEGIES.values()] + list(IMAGE_LABELS.values())
    texts += [tool_result_text("q", backend, 0.0, style) for backend in TOOL_BACKENDS for style in (*STYLES, "crop")]
    texts += ["Tool attention_prompt (call c) returned:", *LOCATION_ANSWERS]
    return texts


# ----------------------------------------------------------------------------------------------
# Views on the training device: originals (supersampled), annotations and crops.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewBatch:
    """The views of a batch as tensors: ``scene``, ``kind`` (index of ``VIEW_KINDS``), ``slots`` ``(V, K)``,
    ``heatmap``, ``gray_level``, ``miss``, and ``jitter`` ``(V, 3)`` uniform numbers for crop windows."""

    scene: torch.Tensor
    kind: torch.Tensor
    slots: torch.Tensor
    heatmap: torch.Tensor
    gray_level: torch.Tensor
    miss: torch.Tensor
    jitter: torch.Tensor

    @classmethod
    def of(cls, views: Sequence[View], slots: int, rng: random.Random) -> ViewBatch:
        """Pack ``views`` (``slots`` object slots per scene)."""
        mask = torch.zeros(len(views), slots, dtype=torch.bool)
        for row, view in enumerate(views):
            mask[row, list(view.slots)] = True
        return cls(
            scene=torch.tensor([view.scene for view in views]),
            kind=torch.tensor([VIEW_KINDS.index(view.kind) for view in views]),
            slots=mask,
            heatmap=torch.tensor([view.style == "heatmap" for view in views]),
            gray_level=torch.tensor([float(view.gray_level) for view in views]),
            miss=torch.tensor([view.miss for view in views]),
            jitter=torch.tensor([[rng.random() for _ in range(3)] for _ in views]),
        )

    def to(self, device: torch.device) -> ViewBatch:
        """The same tensors on ``device``."""
        return ViewBatch(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def pad_slots(layouts: Layouts, slots: int) -> Layouts:
    """``layouts`` with empty object slots appended up to ``slots`` (to stack scenes of two samplers)."""
    extra = slots - layouts.valid.shape[1]
    if extra <= 0:
        return layouts
    padded = {}
    for name in layouts.__dataclass_fields__:
        value = getattr(layouts, name)
        if value.ndim >= 2 and value.shape[1] == layouts.valid.shape[1] and name not in ("bg_colour_a", "bg_colour_b"):
            value = torch.cat(
                [value, torch.zeros(value.shape[0], extra, *value.shape[2:], dtype=value.dtype, device=value.device)],
                dim=1,
            )
        padded[name] = value
    return Layouts(**padded)


def concat_layouts(parts: Sequence[Layouts]) -> Layouts:
    """Scenes of several layouts, slots padded to the widest."""
    slots = max(part.valid.shape[1] for part in parts)
    padded = [pad_slots(part, slots) for part in parts]
    return Layouts(**{name: torch.cat([getattr(p, name) for p in padded]) for name in parts[0].__dataclass_fields__})


def jet(values: torch.Tensor) -> torch.Tensor:
    """``api_tool.render.jet_colors`` in torch: ``(..., 3)`` in [0, 255] (unrounded)."""
    x = values.clamp(0.0, 1.0)[..., None]
    centres = torch.tensor([3.0, 2.0, 1.0], device=values.device)
    return (1.5 - (4.0 * x - centres).abs()).clamp(0.0, 1.0) * 255.0


def annotation_masks(
    labels: torch.Tensor, slots: torch.Tensor, patch: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``(V, S, S)`` masks in [0, 1]: the slots' pixels averaged on the patch grid, blurred, normalised
    to a peak of 1 and bilinearly upsampled (as an attribution map is rendered); rows without slots get a
    diffuse random blob field."""
    side = labels.shape[-1]
    chosen = (F.one_hot(labels, slots.shape[1] + 1)[..., 1:] & slots[:, None, None, :]).any(dim=-1).float()
    grid = F.avg_pool2d(chosen[:, None], patch)
    noise = torch.rand(grid.shape, device=labels.device, generator=generator)
    grid = torch.where(slots.any(dim=1)[:, None, None, None], grid, F.avg_pool2d(noise, 5, 1, 2) ** 4)
    grid = F.avg_pool2d(grid, 3, 1, 1, count_include_pad=False)
    grid = grid / grid.amax(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[:, 0].clamp(0.0, 1.0)


def crop_boxes(layouts: Layouts, views: ViewBatch, side: int) -> torch.Tensor:
    """``(V, 4)`` content boxes that render each crop view's window into the ``side`` input: the window is
    a square around the union of the view's objects (1.3-3x its size, offset up to a fifth), or anywhere
    for a missed crop."""
    scene = views.scene
    boxes = letterbox_boxes(layouts.aspect, side).to(views.jitter.device)[scene].float()
    bx, by, bw, bh = boxes.unbind(1)
    short = torch.minimum(bw, bh)
    px = bx[:, None] + layouts.cx[scene] * bw[:, None]
    py = by[:, None] + layouts.cy[scene] * bh[:, None]
    reach = EXTENT * layouts.radius[scene] * short[:, None]
    big = torch.tensor(1e9, device=px.device)
    x0 = torch.where(views.slots, px - reach, big).amin(dim=1)
    x1 = torch.where(views.slots, px + reach, -big).amax(dim=1)
    y0 = torch.where(views.slots, py - reach, big).amin(dim=1)
    y1 = torch.where(views.slots, py + reach, -big).amax(dim=1)
    has = views.slots.any(dim=1)
    extent = torch.where(has, torch.maximum(x1 - x0, y1 - y0), short / 4).clamp(min=4.0)
    window = (extent * (1.3 + 1.7 * views.jitter[:, 0])).clamp(max=float(side))
    cx = torch.where(has, (x0 + x1) / 2, bx + bw / 2) + (views.jitter[:, 1] - 0.5) * 0.4 * window
    cy = torch.where(has, (y0 + y1) / 2, by + bh / 2) + (views.jitter[:, 2] - 0.5) * 0.4 * window
    cx = torch.where(views.miss, bx + bw * views.jitter[:, 2], cx)
    cy = torch.where(views.miss, by + bh * views.jitter[:, 1], cy)
    zoom = side / window
    return torch.stack([(bx - (cx - window / 2)) * zoom, (by - (cy - window / 2)) * zoom, bw * zoom, bh * zoom], dim=1)


def with_render_window(layouts: Layouts, radius: float) -> Layouts:
    """``layouts`` plus one empty slot of ``radius``: ``render_layouts`` sizes its per-object window from
    the largest radius, so zoomed objects (larger than the raster's scale) are drawn whole."""
    widened = pad_slots(layouts, layouts.valid.shape[1] + 1)
    radius_column = widened.radius.clone()
    radius_column[:, -1] = radius
    return replace(widened, radius=radius_column)


def render_views(
    layouts: Layouts,
    views: ViewBatch,
    side: int,
    patch: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None,
    device: torch.device,
    blur_probability: float = 0.0,
) -> torch.Tensor:
    """Normalised inputs ``(V, 3, side, side)`` of every view: originals letterboxed and rendered at twice
    the side then area-downscaled (as a large image is resized), annotations drawn over them, crops
    rendered through their window."""
    fill = tuple(float(round(255 * m)) for m in mean)
    layouts = layouts.to(device)
    views = views.to(device)
    scenes = layouts.select(views.scene)
    rendered = render_layouts(
        scenes,
        (2 * side, 2 * side),
        content_boxes=letterbox_boxes(scenes.aspect, 2 * side),
        pad_rgb=fill,  # type: ignore[arg-type]
        generator=generator,
        device=device,
    )
    pixels = F.avg_pool2d(rendered.images, 2)
    labels = rendered.labels[:, ::2, ::2]
    annotated = views.kind == VIEW_KINDS.index("annotated")
    if bool(annotated.any()):
        rows = annotated.nonzero().flatten()
        mask = annotation_masks(labels[rows], views.slots[rows], patch, generator)[:, None]
        base = pixels[rows]
        gray = base * mask + (1.0 - mask) * views.gray_level[rows][:, None, None, None]
        heat = 0.5 * base + 0.5 * jet(mask[:, 0]).permute(0, 3, 1, 2)
        pixels[rows] = torch.where(views.heatmap[rows][:, None, None, None], heat, gray)
    crops = views.kind == VIEW_KINDS.index("crop")
    if bool(crops.any()):
        rows = crops.nonzero().flatten()
        part = scenes.select(rows)
        zoomed = render_layouts(
            with_render_window(part, 0.5 / EXTENT),
            (side, side),
            content_boxes=crop_boxes(
                layouts, ViewBatch(*(getattr(views, f)[rows] for f in views.__dataclass_fields__)), side
            ),
            pad_rgb=fill,  # type: ignore[arg-type]
            generator=generator,
            device=device,
        )
        pixels[rows] = zoomed.images
    return soften_and_normalise(pixels, blur_probability, mean, std, generator)


def soften_and_normalise(
    pixels: torch.Tensor,
    blur_probability: float,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Rendered ``(B, 3, S, S)`` pixels (0-255 floats) as the model's input: a share ``blur_probability`` of
    them softened by a 3x3 box blur (inputs resized by the attributor have soft edges), rounded to whole grey
    levels, scaled to [0, 1] and normalised by the processor's ``mean`` / ``std``.

    Example:
        >>> soften_and_normalise(torch.full((1, 3, 2, 2), 255.0), 0.0, [0.5] * 3, [0.5] * 3, None).unique().tolist()
        [1.0]
    """
    if blur_probability > 0.0:
        blurred = F.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
        chosen = torch.rand(pixels.shape[0], device=pixels.device, generator=generator) < blur_probability
        pixels = torch.where(chosen[:, None, None, None], blurred, pixels)
    pixels = pixels.round() / 255.0
    mean_t = torch.tensor(mean, device=pixels.device, dtype=torch.float32)[None, :, None, None]
    std_t = torch.tensor(std, device=pixels.device, dtype=torch.float32)[None, :, None, None]
    return (pixels - mean_t) / std_t


def views_to_images(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> list[Image.Image]:
    """Normalised inputs back to PIL images (to look at them, and to feed the real processor in tests)."""
    mean_t = torch.tensor(mean)[None, :, None, None]
    std_t = torch.tensor(std)[None, :, None, None]
    values = ((pixels.detach().cpu().float() * std_t + mean_t) * 255.0).round().clamp(0, 255).byte()
    return [Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())) for image in values]


def episode_target_slots(question: Question, objects: Sequence[ObjectFacts], slot_of: Sequence[int]) -> list[int]:
    """The slots whose objects the question names (none for an absent object or "no" existence answer)."""
    if question.type == "existence" and question.answer == "no":
        return []
    return [slot for obj, slot in zip(objects, slot_of) if name_of(obj) in question.targets]
