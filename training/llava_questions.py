"""Questions and scenes for the demo LLaVA's training: the question mix (the scene module's types plus
``location``), and occluded objects dropped from sampled layouts as ``generate_scene`` drops them.

Example:
    >>> from training.llava_questions import location_answer
    >>> location_answer(0.1, 0.5)
    'left'
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import torch

from api_tool.demo.scenes import (
    DEFAULT_CONFIG,
    EXTENT,
    POPE_SPLITS,
    QUESTION_TYPES,
    Layouts,
    ObjectFacts,
    Question,
    existence_questions,
    letterbox_boxes,
    make_question,
    name_of,
    render_layouts,
    scene_vocabulary,
)

LOCATION = "location"
TYPE_NAMES: tuple[str, ...] = (*QUESTION_TYPES, LOCATION)
"""Question types the demo LLaVA is trained on: the scene module's five plus ``location``."""
TYPE_WEIGHTS: dict[str, float] = {
    "existence": 0.35,
    "colour": 0.13,
    "shape": 0.13,
    "count": 0.13,
    "position": 0.13,
    LOCATION: 0.13,
}
LOCATION_TEMPLATE = "where is the {x}?"
LOCATION_MARGIN = 0.04
"""Objects whose centre lies within this share of the canvas of a third-line are not asked about."""


def location_answer(fx: float, fy: float) -> str | None:
    """Where a point at canvas fractions ``(fx, fy)`` lies in a 3x3 split of the canvas:
    ``"top left"``, ``"top"``, ..., ``"center"``; ``None`` within ``LOCATION_MARGIN`` of a line.

    Example:
        >>> location_answer(0.1, 0.5), location_answer(0.8, 0.1), location_answer(0.5, 0.5)
        ('left', 'top right', 'center')
    """
    if any(abs(value - line) < LOCATION_MARGIN for value in (fx, fy) for line in (1 / 3, 2 / 3)):
        return None
    vertical = "top" if fy < 1 / 3 else "bottom" if fy > 2 / 3 else ""
    horizontal = "left" if fx < 1 / 3 else "right" if fx > 2 / 3 else ""
    return " ".join(word for word in (vertical, horizontal) if word) or "center"


def canvas_extent(aspect: float) -> tuple[float, float]:
    """Canvas ``(width, height)`` in shorter-side units (the unit of ``ObjectFacts.center``)."""
    return (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect)


def location_question(
    objects: Sequence[ObjectFacts], extent: tuple[float, float], rng: random.Random
) -> Question | None:
    """The question "where is the red circle?" about an object whose name is unique in the scene, or ``None``."""
    names = [name_of(obj) for obj in objects]
    candidates = []
    for obj, name in zip(objects, names):
        answer = location_answer(obj.center[0] / extent[0], obj.center[1] / extent[1])
        if names.count(name) == 1 and answer is not None:
            candidates.append((name, answer))
    if not candidates:
        return None
    name, answer = rng.choice(candidates)
    return Question(LOCATION_TEMPLATE.format(x=name), answer, LOCATION, None, (name,))


def sample_question(objects: Sequence[ObjectFacts], extent: tuple[float, float], rng: random.Random) -> Question:
    """One question of a type drawn with ``TYPE_WEIGHTS``; existence when the drawn type has no
    unambiguous question in this scene. Existence questions are yes or no with equal chance, the
    negative drawn for a random POPE split."""
    kind = rng.choices(list(TYPE_WEIGHTS), weights=list(TYPE_WEIGHTS.values()))[0]
    question: Question | None = None
    if kind == LOCATION:
        question = location_question(objects, extent, rng)
    elif kind != "existence":
        question = make_question(objects, kind, rng)
    if question is None:
        pair = existence_questions(objects, rng, rng.choice(POPE_SPLITS))
        question = pair[rng.randrange(2)]
    return question


def training_vocabulary() -> list[str]:
    """Texts whose words the tokenizer must know: the scene language and the location answers."""
    locations = [location_answer(fx, fy) or "" for fx in (0.1, 0.5, 0.9) for fy in (0.1, 0.5, 0.9)]
    return [*scene_vocabulary(), LOCATION_TEMPLATE, *locations]


def overlapping(layouts: Layouts) -> torch.Tensor:
    """``(n,)``: scenes where two objects' bounding circles (radius ``EXTENT * r``) intersect."""
    width = torch.where(layouts.aspect >= 1.0, layouts.aspect, torch.ones_like(layouts.aspect))[:, None]
    height = torch.where(layouts.aspect >= 1.0, torch.ones_like(layouts.aspect), 1.0 / layouts.aspect)[:, None]
    x, y = layouts.cx * width, layouts.cy * height
    distance = torch.hypot(x[:, :, None] - x[:, None, :], y[:, :, None] - y[:, None, :])
    reach = EXTENT * (layouts.radius[:, :, None] + layouts.radius[:, None, :])
    both = layouts.valid[:, :, None] & layouts.valid[:, None, :]
    off_diagonal = ~torch.eye(layouts.valid.shape[1], dtype=torch.bool)
    return (both & off_diagonal & (distance < reach)).any(dim=(1, 2))


def drop_hidden(layouts: Layouts, min_visible: float = DEFAULT_CONFIG.min_visible, raster: int = 64) -> Layouts:
    """The layouts without objects whose visible share (measured on a ``raster``-pixel letterbox)
    is below ``min_visible``, as ``generate_scene`` removes them. Only overlapping scenes are drawn."""
    chosen = overlapping(layouts).nonzero().flatten()
    if chosen.numel() == 0:
        return layouts
    part = layouts.select(chosen)
    rendered = render_layouts(part, (raster, raster), content_boxes=letterbox_boxes(part.aspect, raster))
    slots = layouts.valid.shape[1]
    visible = torch.stack([(rendered.labels == k + 1).sum(dim=(1, 2)) for k in range(slots)], dim=1)
    hidden = torch.zeros_like(layouts.valid)
    hidden[chosen] = part.valid & (visible < min_visible * rendered.full_area.clamp(min=1))
    return replace(layouts, valid=layouts.valid & ~hidden)
