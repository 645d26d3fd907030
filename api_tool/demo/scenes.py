"""Synthetic scenes of coloured shapes with exact ground truth, captions and questions.

A scene is a canvas (square or not) holding 1-5 flat-coloured objects (six shapes, seven colours,
random sizes, positions, small rotations, optional partial occlusion) on a flat, gradient, noise or
texture background. Every object comes with its visible mask and box, so a map can be scored
against the truth; the scene comes with a caption ("a red circle left of a blue square") and can be
asked questions (existence with POPE-style negatives, colour, shape, count, relative position).

Two ways to make scenes share one sampler and one renderer, so they draw the same distribution:

* ``generate_scene(seed)``: one scene as a PIL image plus ground truth, fully determined by the seed
  (rendered with torch on the CPU; a few milliseconds).
* ``sample_layouts(n, generator)`` + ``render_layouts(layouts, raster, ...)``: thousands of scenes
  per second as tensors, on any torch device (the training path). ``letterbox_boxes`` places
  non-square canvases inside a square model input, padded as ``api_tool.geometry.Letterbox`` does.

Geometry conventions: a layout stores object centres as fractions of the canvas width and height and
radii as fractions of the canvas's shorter side; pixel coordinates have x to the right, y down, and
pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``.

Example:
    >>> from api_tool.demo.scenes import QUESTION_TYPES, generate_scene, scene_questions
    >>> scene = generate_scene(7, size=(320, 224))
    >>> scene.image.size
    (320, 224)
    >>> all(obj.mask.shape == (224, 320) for obj in scene.objects)
    True
    >>> questions = scene_questions(scene.objects, seed=7)
    >>> {q.type for q in questions} <= set(QUESTION_TYPES)
    True
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import permutations
from typing import Protocol

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from api_tool.demo_notice import DEMO_SCENE_KEY
from api_tool.errors import InvalidParameterError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES} | {"cross": "crosses"}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 165, 60),
    "blue": (35, 80, 225),
    "purple": (145, 50, 185),
    "white": (245, 245, 245),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUNDS: tuple[str, ...] = ("flat", "gradient", "noise", "texture")
QUESTION_TYPES: tuple[str, ...] = ("existence", "colour", "shape", "count", "position")
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# How often each colour and shape is drawn (a mild popularity prior, so that POPE's "popular"
# negatives -- frequent objects that are absent -- mean something).
COLOUR_WEIGHTS: dict[str, float] = {
    "red": 1.4,
    "blue": 1.3,
    "green": 1.2,
    "yellow": 1.0,
    "white": 0.9,
    "orange": 0.8,
    "purple": 0.7,
}
SHAPE_WEIGHTS: dict[str, float] = {
    "circle": 1.4,
    "square": 1.3,
    "triangle": 1.1,
    "star": 1.0,
    "cross": 0.8,
    "ring": 0.7,
}

# Shape outlines in object units (the object's radius is 1): every shape fits in a circle of
# radius EXTENT, which placement uses to keep objects apart and inside the canvas.
EXTENT = 1.15
_SQUARE_HALF = 0.8
_TRIANGLE_APEX, _TRIANGLE_BASE = -1.0, 0.75
_STAR_INNER = 0.45
_CROSS_HALF_WIDTH = 0.3
_RING_INNER = 0.58


@dataclass(frozen=True)
class SceneConfig:
    """What the scene sampler draws from.

    Attributes:
        min_objects, max_objects: object count range (each object may still be dropped when no free
            place is found; the ground truth always lists what is drawn).
        min_radius, max_radius: object radius as a fraction of the canvas's shorter side.
        occlusion_probability: share of scenes whose objects may partly cover each other.
        backgrounds: background kinds to draw from (subset of ``BACKGROUNDS``).
        colour_jitter: each object's RGB is its colour's RGB plus up to this much per channel.
        square_probability: share of square canvases when the canvas shape is sampled.
        min_aspect, max_aspect: width / height range of sampled non-square canvases.
        min_side, max_side: longer side in pixels of canvases sampled by ``generate_scene``.
        min_visible: objects with less than this share of their area visible are removed.
    """

    min_objects: int = 1
    max_objects: int = 5
    min_radius: float = 0.07
    max_radius: float = 0.16
    occlusion_probability: float = 0.3
    backgrounds: tuple[str, ...] = BACKGROUNDS
    colour_jitter: int = 15
    square_probability: float = 0.5
    min_aspect: float = 0.5
    max_aspect: float = 2.0
    min_side: int = 224
    max_side: int = 320
    min_visible: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise InvalidParameterError(
                f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.0 < self.min_radius <= self.max_radius < 0.5 / EXTENT:
            raise InvalidParameterError(
                f"need 0 < min_radius <= max_radius < {0.5 / EXTENT:.3f}, got {self.min_radius}, {self.max_radius}"
            )
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if unknown or not self.backgrounds:
            raise InvalidParameterError(
                f"backgrounds must be a non-empty subset of {BACKGROUNDS}, got {self.backgrounds}"
            )
        if not 0.0 < self.min_aspect <= 1.0 <= self.max_aspect:
            raise InvalidParameterError(
                f"need 0 < min_aspect <= 1 <= max_aspect, got {self.min_aspect}, {self.max_aspect}"
            )


DEFAULT_CONFIG = SceneConfig()

SMALL_OBJECT_CONFIG = SceneConfig(
    min_objects=6,
    max_objects=12,
    min_radius=0.016,
    max_radius=0.03,
    occlusion_probability=0.0,
    min_side=1024,
    max_side=1536,
)
"""The high-resolution small-object situation (V*Bench-like): large canvases (longer side 1024-1536 px),
6-12 small objects (radius 1.6-3 % of the shorter side, so a few patches at most once an LVLM's 224-336 px
input has downscaled the canvas) and no occlusion, so every object stays countable."""


# ----------------------------------------------------------------------------------------------
# Layouts: what is where, as tensors (sampled vectorised, on the CPU).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layouts:
    """``n`` scene layouts with up to ``K`` object slots each; slots with ``valid == False`` are empty.

    Object tensors are ``(n, K)`` (``rgb``: ``(n, K, 3)``), drawn in slot order (later slots on top);
    background tensors are ``(n,)`` or ``(n, 3)``. ``aspect`` is the canvas width / height.
    """

    aspect: torch.Tensor
    valid: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    rgb: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    radius: torch.Tensor
    angle: torch.Tensor
    background: torch.Tensor
    bg_colour_a: torch.Tensor
    bg_colour_b: torch.Tensor
    bg_angle: torch.Tensor
    bg_frequency: torch.Tensor
    bg_pattern: torch.Tensor
    bg_noise: torch.Tensor
    bg_waves: torch.Tensor

    @property
    def size(self) -> int:
        """Number of scenes."""
        return int(self.valid.shape[0])

    def to(self, device: torch.device | str) -> Layouts:
        """The same layouts with every tensor on ``device``."""
        return Layouts(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self, index: torch.Tensor | slice) -> Layouts:
        """The layouts of the scenes picked by ``index``."""
        return Layouts(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def facts(self) -> list[list[ObjectFacts]]:
        """Each scene's objects, in drawing order, positions in shorter-side units (for captions)."""
        names = ("aspect", "valid", "shape", "colour", "cx", "cy", "radius")
        columns = [getattr(self, name).tolist() for name in names]
        scenes = []
        for aspect, valid, shape, colour, cx, cy, radius in zip(*columns):
            width, height = (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect)
            scenes.append(
                [
                    ObjectFacts(SHAPES[shape[k]], COLOUR_NAMES[colour[k]], (cx[k] * width, cy[k] * height), radius[k])
                    for k in range(len(valid))
                    if valid[k]
                ]
            )
        return scenes


def _weights(names: Sequence[str], weights: dict[str, float]) -> torch.Tensor:
    return torch.tensor([weights[name] for name in names], dtype=torch.float64)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def sample_aspects(n: int, generator: torch.Generator, config: SceneConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Canvas width / height for ``n`` scenes: 1 with ``square_probability``, else log-uniform."""
    square = torch.rand(n, generator=generator) < config.square_probability
    log_aspect = _uniform(generator, (n,), math.log(config.min_aspect), math.log(config.max_aspect))
    return torch.where(square, torch.ones(n), log_aspect.exp())


def sample_layouts(
    n: int,
    generator: torch.Generator,
    config: SceneConfig = DEFAULT_CONFIG,
    *,
    aspect: torch.Tensor | float | None = None,
    n_objects: int | None = None,
    background: str | None = None,
    occlusion: bool | None = None,
    candidates: int = 32,
) -> Layouts:
    """Draw ``n`` layouts on the CPU, vectorised over scenes.

    Objects are placed greedily slot by slot: each slot takes the first of ``candidates`` random
    positions that keeps clear of the objects already placed (or, in occluding scenes, keeps the
    smaller object's centre outside the larger one); a slot with no such position stays empty.

    Args:
        aspect: canvas width / height, one for all or per scene; sampled when ``None``.
        n_objects, background, occlusion: fix these instead of sampling them.

    Example:
        >>> layouts = sample_layouts(4, torch.Generator().manual_seed(0), n_objects=3)
        >>> layouts.valid.shape
        torch.Size([4, 3])
    """
    if n < 1:
        raise InvalidParameterError(f"n must be positive, got {n}")
    slots = n_objects if n_objects is not None else config.max_objects
    if n_objects is not None and not 1 <= n_objects <= 9:
        raise InvalidParameterError(f"n_objects must be between 1 and 9, got {n_objects}")
    if background is not None and background not in BACKGROUNDS:
        raise InvalidParameterError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    if aspect is None:
        aspects = sample_aspects(n, generator, config)
    else:
        aspects = torch.as_tensor(aspect, dtype=torch.float32).expand(n).clone()
    count = (
        torch.full((n,), slots)
        if n_objects is not None
        else torch.randint(config.min_objects, config.max_objects + 1, (n,), generator=generator)
    )
    shape = torch.multinomial(_weights(SHAPES, SHAPE_WEIGHTS), n * slots, True, generator=generator).view(n, slots)
    colour = torch.multinomial(_weights(COLOUR_NAMES, COLOUR_WEIGHTS), n * slots, True, generator=generator)
    colour = colour.view(n, slots)
    base_rgb = torch.tensor([COLOURS[name] for name in COLOUR_NAMES], dtype=torch.float32)
    jitter = torch.randint(-config.colour_jitter, config.colour_jitter + 1, (n, slots, 3), generator=generator)
    rgb = (base_rgb[colour] + jitter).clamp(0, 255)
    radius = _uniform(generator, (n, slots), config.min_radius, config.max_radius)
    angle = _uniform(generator, (n, slots), -0.35, 0.35)
    occluding = (
        torch.full((n,), bool(occlusion))
        if occlusion is not None
        else torch.rand(n, generator=generator) < config.occlusion_probability
    )

    # Canvas extent in shorter-side units, and candidate centres that keep each object inside.
    width = torch.where(aspects >= 1.0, aspects, torch.ones(n))
    height = torch.where(aspects >= 1.0, torch.ones(n), 1.0 / aspects)
    margin = EXTENT * radius[..., None]  # (n, K, 1)
    unit = torch.rand((n, slots, candidates, 2), generator=generator)
    cand_x = margin + unit[..., 0] * (width[:, None, None] - 2 * margin)
    cand_y = margin + unit[..., 1] * (height[:, None, None] - 2 * margin)
    pos_x = torch.zeros(n, slots)
    pos_y = torch.zeros(n, slots)
    placed = torch.zeros(n, slots, dtype=torch.bool)
    for k in range(slots):
        ok = torch.ones(n, candidates, dtype=torch.bool)
        for j in range(k):
            dist = torch.hypot(cand_x[:, k] - pos_x[:, j, None], cand_y[:, k] - pos_y[:, j, None])
            r_k, r_j = radius[:, k, None], radius[:, j, None]
            apart = dist >= 1.1 * EXTENT * (r_k + r_j)
            overlapping = dist >= torch.maximum(r_k, r_j) * EXTENT + 0.3 * torch.minimum(r_k, r_j)
            clear = torch.where(occluding[:, None], overlapping, apart)
            ok &= clear | ~placed[:, j, None]
        first = ok.int().argmax(dim=1)
        pos_x[:, k] = cand_x[:, k].gather(1, first[:, None])[:, 0]
        pos_y[:, k] = cand_y[:, k].gather(1, first[:, None])[:, 0]
        placed[:, k] = ok.any(dim=1) & (k < count)

    kinds = torch.tensor([BACKGROUNDS.index(kind) for kind in config.backgrounds])
    if background is not None:
        bg_kind = torch.full((n,), BACKGROUNDS.index(background))
    else:
        bg_kind = kinds[torch.randint(len(kinds), (n,), generator=generator)]
    gray = _uniform(generator, (n, 1), 35.0, 180.0)
    colour_a = (gray + _uniform(generator, (n, 3), -20.0, 20.0)).clamp(20.0, 190.0)
    colour_b = colour_a + _uniform(generator, (n, 1), -60.0, 60.0) + _uniform(generator, (n, 3), -15.0, 15.0)
    noise = torch.where(
        bg_kind == BACKGROUNDS.index("noise"),
        _uniform(generator, (n,), 6.0, 18.0),
        torch.where(bg_kind == BACKGROUNDS.index("flat"), torch.zeros(n), _uniform(generator, (n,), 0.0, 4.0)),
    )
    return Layouts(
        aspect=aspects.float(),
        valid=placed,
        shape=shape,
        colour=colour,
        rgb=rgb,
        cx=pos_x / width[:, None],
        cy=pos_y / height[:, None],
        radius=radius,
        angle=angle,
        background=bg_kind,
        bg_colour_a=colour_a,
        bg_colour_b=colour_b.clamp(20.0, 200.0),
        bg_angle=_uniform(generator, (n,), 0.0, 2 * math.pi),
        bg_frequency=_uniform(generator, (n,), 3.0, 9.0),
        bg_pattern=torch.randint(3, (n,), generator=generator),
        bg_noise=noise,
        bg_waves=torch.cat(
            [_uniform(generator, (n, 3, 2), -3.0, 3.0), _uniform(generator, (n, 3, 1), 0.0, 2 * math.pi)], dim=-1
        ),
    )


# ----------------------------------------------------------------------------------------------
# Rendering (torch, any device).
# ----------------------------------------------------------------------------------------------


def shape_masks(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Which points ``(u, v)`` (object units: centre 0, radius 1, y down) lie inside ``SHAPES[shape]``.

    ``shape`` broadcasts against ``u`` and ``v``. Example:
        >>> inside = shape_masks(torch.tensor(0), torch.tensor([0.0, 0.9, 1.1]), torch.zeros(3))
        >>> inside.tolist()
        [True, True, False]
    """
    rho = torch.hypot(u, v)
    circle = rho <= 1.0
    square = torch.maximum(u.abs(), v.abs()) <= _SQUARE_HALF
    height = _TRIANGLE_BASE - _TRIANGLE_APEX
    triangle = (v <= _TRIANGLE_BASE) & (u.abs() <= (v - _TRIANGLE_APEX) / height)
    # Five-pointed star, one point up: fold the angle into one point's sector and test the edge
    # from the outer vertex (1, 0) to the inner vertex at angle pi / 5.
    sector = 2 * math.pi / 5
    theta = torch.remainder(torch.atan2(v, u) + math.pi / 2 + sector / 2, sector) - sector / 2
    px, py = rho * torch.cos(theta), rho * torch.sin(theta).abs()
    inner_x, inner_y = _STAR_INNER * math.cos(sector / 2), _STAR_INNER * math.sin(sector / 2)
    star = (inner_x - 1.0) * py - inner_y * (px - 1.0) >= 0.0
    cross = ((u.abs() <= _CROSS_HALF_WIDTH) & (v.abs() <= 1.0)) | ((v.abs() <= _CROSS_HALF_WIDTH) & (u.abs() <= 1.0))
    ring = (rho <= 1.0) & (rho >= _RING_INNER)
    inside = torch.zeros_like(circle)
    for index, mask in enumerate((circle, square, triangle, star, cross, ring)):
        inside |= (shape == index) & mask
    return inside


def letterbox_boxes(aspect: torch.Tensor, side: int) -> torch.Tensor:
    """Where canvases of width / height ``aspect`` sit in a ``side x side`` input: ``(n, 4)`` x0, y0, w, h.

    The longer side fills the input; the other is scaled alike and centred (as ``Letterbox.fit``).
    """
    aspect = aspect.float()
    width = torch.where(aspect >= 1.0, torch.full_like(aspect, side), (side * aspect).round().clamp(min=1))
    height = torch.where(aspect >= 1.0, (side / aspect).round().clamp(min=1), torch.full_like(aspect, side))
    return torch.stack([(side - width) // 2, (side - height) // 2, width, height], dim=1)


@dataclass(frozen=True)
class Rendered:
    """Rendered scenes: ``images`` float RGB in [0, 255], ``(n, 3, H, W)``; ``labels`` ``(n, H, W)``
    with 0 for background and padding and ``k + 1`` where object slot ``k`` is visible;
    ``full_area`` ``(n, K)``: each object's pixel count before occlusion."""

    images: torch.Tensor
    labels: torch.Tensor
    full_area: torch.Tensor


def render_layouts(
    layouts: Layouts,
    raster: tuple[int, int],
    *,
    content_boxes: torch.Tensor | None = None,
    pad_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Rendered:
    """Draw layouts onto a ``raster = (width, height)`` pixel grid.

    ``content_boxes`` ``(n, 4)`` (x0, y0, width, height in pixels) places each canvas inside the
    raster (see ``letterbox_boxes``); pixels outside it get ``pad_rgb``. By default each canvas fills
    the raster. ``generator`` (on ``device``) draws the background's pixel noise.
    """
    device = torch.device(device) if device is not None else layouts.valid.device
    n, slots = layouts.valid.shape
    raster_w, raster_h = raster
    window = math.ceil(2 * EXTENT * float(layouts.radius.max()) * min(raster_w, raster_h)) + 3
    layouts = layouts.to(device)
    if content_boxes is None:
        content_boxes = torch.tensor([[0.0, 0.0, raster_w, raster_h]], device=device).expand(n, 4)
    boxes = content_boxes.to(device=device, dtype=torch.float32)
    ox, oy, cw, ch = (boxes[:, i] for i in range(4))
    short = torch.minimum(cw, ch)

    xs = torch.arange(raster_w, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(raster_h, device=device, dtype=torch.float32) + 0.5
    u = ((xs[None, :] - ox[:, None]) / short[:, None])[:, None, :]  # (n, 1, W), shorter-side units
    v = ((ys[None, :] - oy[:, None]) / short[:, None])[:, :, None]  # (n, H, 1)
    background = _background(layouts, u, v, cw / short, ch / short, generator, device)
    inside_content = (
        (xs[None, None, :] >= ox[:, None, None])
        & (xs[None, None, :] < (ox + cw)[:, None, None])
        & (ys[None, :, None] >= oy[:, None, None])
        & (ys[None, :, None] < (oy + ch)[:, None, None])
    )
    pad = torch.tensor(pad_rgb, device=device, dtype=torch.float32)[None, :, None, None]
    background = torch.where(inside_content[:, None], background, pad)

    # Objects, each in its own square window around its centre, merged by a max over slot numbers.
    centre_x = ox[:, None] + layouts.cx * cw[:, None]
    centre_y = oy[:, None] + layouts.cy * ch[:, None]
    radius_px = layouts.radius * short[:, None]
    start_x = torch.floor(centre_x - window / 2)
    start_y = torch.floor(centre_y - window / 2)
    offsets = torch.arange(window, device=device, dtype=torch.float32)
    pix_x = start_x[..., None] + offsets  # (n, K, S)
    pix_y = start_y[..., None] + offsets
    dx = ((pix_x + 0.5 - centre_x[..., None]) / radius_px[..., None])[:, :, None, :]  # (n, K, 1, S)
    dy = ((pix_y + 0.5 - centre_y[..., None]) / radius_px[..., None])[:, :, :, None]  # (n, K, S, 1)
    cos, sin = torch.cos(layouts.angle)[..., None, None], torch.sin(layouts.angle)[..., None, None]
    inside = shape_masks(layouts.shape[..., None, None], dx * cos + dy * sin, dy * cos - dx * sin)
    on_canvas_x = (pix_x >= ox[:, None, None]) & (pix_x < (ox + cw)[:, None, None])
    on_canvas_y = (pix_y >= oy[:, None, None]) & (pix_y < (oy + ch)[:, None, None])
    inside &= on_canvas_y[..., :, None] & on_canvas_x[..., None, :] & layouts.valid[..., None, None]
    full_area = inside.sum(dim=(-1, -2))
    slot_number = torch.arange(1, slots + 1, device=device)[None, :, None, None]
    values = torch.where(inside, slot_number, 0)
    flat_index = (
        pix_y.clamp(0, raster_h - 1).long()[..., :, None] * raster_w + pix_x.clamp(0, raster_w - 1).long()[..., None, :]
    )
    labels = torch.zeros(n, raster_h * raster_w, dtype=torch.long, device=device)
    labels.scatter_reduce_(1, flat_index.reshape(n, -1), values.reshape(n, -1), reduce="amax")
    labels = labels.view(n, raster_h, raster_w)

    palette = torch.cat([torch.zeros(n, 1, 3, device=device), layouts.rgb], dim=1)  # (n, K + 1, 3)
    object_rgb = palette.gather(1, labels.view(n, -1, 1).expand(-1, -1, 3)).view(n, raster_h, raster_w, 3)
    images = torch.where(labels[:, None] > 0, object_rgb.permute(0, 3, 1, 2), background)
    return Rendered(images=images, labels=labels, full_area=full_area)


def _background(
    layouts: Layouts,
    u: torch.Tensor,
    v: torch.Tensor,
    width: torch.Tensor,
    height: torch.Tensor,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """``(n, 3, H, W)`` backgrounds: colour a blended towards colour b by a per-kind pattern, plus noise."""
    n = layouts.size
    cos = torch.cos(layouts.bg_angle)[:, None, None]
    sin = torch.sin(layouts.bg_angle)[:, None, None]
    along = (u - width[:, None, None] / 2) * cos + (v - height[:, None, None] / 2) * sin
    reach = (width.abs() * cos.abs()[:, 0, 0] + height * sin.abs()[:, 0, 0])[:, None, None]
    gradient = (along / reach + 0.5).clamp(0.0, 1.0)
    freq = 2 * math.pi * layouts.bg_frequency[:, None, None]
    rot_u, rot_v = u * cos + v * sin, v * cos - u * sin
    stripes = 0.5 + 0.5 * torch.sin(freq * rot_u)
    checker = (torch.sin(freq * rot_u) * torch.sin(freq * rot_v) > 0).float()
    dots = (torch.cos(freq * rot_u) * torch.cos(freq * rot_v) > 0.6).float()
    pattern = layouts.bg_pattern[:, None, None]
    texture = torch.where(pattern == 0, stripes, torch.where(pattern == 1, checker, dots))
    waves = layouts.bg_waves
    blobs = sum(
        torch.sin(2 * math.pi * (wave[:, 0, None, None] * u + wave[:, 1, None, None] * v) + wave[:, 2, None, None])
        for wave in waves.unbind(dim=1)
    )
    noise_pattern = 0.5 + blobs / 6.0
    kind = layouts.background[:, None, None]
    mix = torch.where(
        kind == BACKGROUNDS.index("gradient"),
        gradient,
        torch.where(
            kind == BACKGROUNDS.index("texture"),
            texture,
            torch.where(kind == BACKGROUNDS.index("noise"), noise_pattern, torch.zeros_like(gradient)),
        ),
    )
    a = layouts.bg_colour_a[:, :, None, None]
    b = layouts.bg_colour_b[:, :, None, None]
    image = a + (b - a) * mix[:, None]
    shape = (n, 1, image.shape[-2], image.shape[-1])
    pixel_noise = torch.randn(shape, generator=generator, device=device) * layouts.bg_noise[:, None, None, None]
    return (image + pixel_noise).clamp(0.0, 255.0)


# ----------------------------------------------------------------------------------------------
# One scene with ground truth.
# ----------------------------------------------------------------------------------------------


class PlacedObject(Protocol):
    """What the language functions need of an object: names and where it is."""

    @property
    def shape(self) -> str: ...

    @property
    def colour(self) -> str: ...

    @property
    def center(self) -> tuple[float, float]: ...

    @property
    def radius(self) -> float: ...


@dataclass(frozen=True)
class ObjectFacts:
    """An object's names and position (any consistent unit), enough for captions and questions."""

    shape: str
    colour: str
    center: tuple[float, float]
    radius: float

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One drawn object and its ground truth, in pixels of the scene's canvas.

    Attributes:
        shape, colour: names from ``SHAPES`` and ``COLOURS``.
        rgb: the exact fill colour of its pixels.
        center, radius, angle: the unoccluded shape's centre (x, y), radius and rotation (radians).
        box: ``(x0, y0, x1, y1)`` of its visible pixels, ``x1``/``y1`` exclusive.
        mask: ``(H, W)`` boolean, its visible pixels.
        visible_fraction: visible pixels / pixels of the whole shape.
    """

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    radius: float
    angle: float
    box: tuple[int, int, int, int]
    mask: NDArray[np.bool_] = field(repr=False)
    visible_fraction: float

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def box_area(self) -> int:
        """Pixels in ``box``."""
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


@dataclass(frozen=True, eq=False)
class Scene:
    """A generated scene: the picture, its objects (drawing order) and a caption.

    ``background`` is one of ``BACKGROUNDS``; ``seed`` regenerates the same scene with the same
    arguments.
    """

    seed: int
    image: Image.Image
    objects: tuple[SceneObject, ...]
    background: str
    caption: str

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        return self.image.size

    @property
    def array(self) -> NDArray[np.uint8]:
        """The image as an ``(H, W, 3)`` uint8 array."""
        return np.asarray(self.image, dtype=np.uint8)


def sample_canvas_size(generator: torch.Generator, config: SceneConfig = DEFAULT_CONFIG) -> tuple[int, int]:
    """A canvas ``(width, height)``: square or not (as ``sample_aspects``), longer side in
    ``[min_side, max_side]`` rounded to a multiple of 8."""
    aspect = float(sample_aspects(1, generator, config)[0])
    longer = config.min_side + float(torch.rand(1, generator=generator)) * (config.max_side - config.min_side)
    side = max(8, round(longer / 8.0) * 8)
    if aspect >= 1.0:
        return side, max(8, round(side / aspect))
    return max(8, round(side * aspect)), side


def generate_scene(
    seed: int,
    *,
    size: tuple[int, int] | None = None,
    n_objects: int | None = None,
    background: str | None = None,
    occlusion: bool | None = None,
    config: SceneConfig = DEFAULT_CONFIG,
) -> Scene:
    """One scene, the same for the same seed and arguments.

    Args:
        seed: any integer.
        size: canvas ``(width, height)``; sampled (square or not) when ``None``.
        n_objects: how many objects to try to place (1-9); sampled from the config when ``None``.
        background: one of ``BACKGROUNDS``; sampled when ``None``.
        occlusion: allow objects to partly cover each other; sampled when ``None``.

    Example:
        >>> scene = generate_scene(3, size=(224, 224), n_objects=2, background="flat")
        >>> scene.objects[0].mask.shape
        (224, 224)
    """
    generator = torch.Generator().manual_seed(seed)
    width, height = size if size is not None else sample_canvas_size(generator, config)
    if width < 8 or height < 8:
        raise InvalidParameterError(f"the canvas must be at least 8x8 pixels, got {width}x{height}")
    layouts = sample_layouts(
        1, generator, config, aspect=width / height, n_objects=n_objects, background=background, occlusion=occlusion
    )
    noise_seed = int(torch.randint(2**62, (1,), generator=generator))
    rendered = render_layouts(layouts, (width, height), generator=torch.Generator().manual_seed(noise_seed))
    visible = torch.stack([(rendered.labels[0] == k + 1).sum() for k in range(layouts.valid.shape[1])])
    hidden = layouts.valid[0] & (visible < config.min_visible * rendered.full_area[0].clamp(min=1))
    if bool(hidden.any()):
        layouts = replace(layouts, valid=layouts.valid & ~hidden[None])
        rendered = render_layouts(layouts, (width, height), generator=torch.Generator().manual_seed(noise_seed))
    return _scene_from_render(seed, layouts, rendered, (width, height))


def _scene_from_render(seed: int, layouts: Layouts, rendered: Rendered, size: tuple[int, int]) -> Scene:
    width, height = size
    labels = rendered.labels[0].numpy()
    short = min(width, height)
    objects = []
    for k in range(layouts.valid.shape[1]):
        if not bool(layouts.valid[0, k]):
            continue
        mask = labels == k + 1
        rows, cols = np.nonzero(mask)
        objects.append(
            SceneObject(
                shape=SHAPES[int(layouts.shape[0, k])],
                colour=COLOUR_NAMES[int(layouts.colour[0, k])],
                rgb=tuple(int(c) for c in layouts.rgb[0, k].round().tolist()),  # type: ignore[arg-type]
                center=(float(layouts.cx[0, k]) * width, float(layouts.cy[0, k]) * height),
                radius=float(layouts.radius[0, k]) * short,
                angle=float(layouts.angle[0, k]),
                box=(int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1),
                mask=mask,
                visible_fraction=float(mask.sum()) / max(1, int(rendered.full_area[0, k])),
            )
        )
    pixels = rendered.images[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    image.info[DEMO_SCENE_KEY] = seed
    return Scene(
        seed=seed,
        image=image,
        objects=tuple(objects),
        background=BACKGROUNDS[int(layouts.background[0])],
        caption=describe(objects, random.Random(seed)),
    )


# ----------------------------------------------------------------------------------------------
# Language: names, relations, captions, queries.
# ----------------------------------------------------------------------------------------------


def article(word: str) -> str:
    """``"an"`` before a vowel, else ``"a"``."""
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    """``"an orange star"``."""
    return f"{article(phrase)} {phrase}"


def name_of(obj: PlacedObject) -> str:
    """``"red circle"``."""
    return f"{obj.colour} {obj.shape}"


def true_relations(a: PlacedObject, b: PlacedObject) -> tuple[str, ...]:
    """Relations from ``RELATIONS`` that clearly hold for "a <relation> b".

    a is left of b when b's centre is right of a's by more than the larger radius; likewise above.
    """
    gap = max(a.radius, b.radius)
    dx = b.center[0] - a.center[0]
    dy = b.center[1] - a.center[1]
    found = []
    if dx > gap:
        found.append("left of")
    if -dx > gap:
        found.append("right of")
    if dy > gap:
        found.append("above")
    if -dy > gap:
        found.append("below")
    return tuple(found)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _group_phrase(colour: str, shape: str, count: int) -> str:
    if count == 1:
        return with_article(f"{colour} {shape}")
    return f"{NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else count} {colour} {PLURALS[shape]}"


def describe(
    objects: Sequence[PlacedObject],
    rng: random.Random,
    *,
    relation_probability: float = 0.5,
    false_relation: bool = False,
) -> str | None:
    """A caption naming every object: "a red circle left of a blue square and two green stars".

    With ``relation_probability`` one pair of single objects in a clear relation is described by it.
    ``false_relation=True`` always uses a relation and makes it false (a hard negative); it returns
    ``None`` when no pair is in a clear relation. Objects sharing colour and shape are counted.
    """
    if not objects:
        return "an empty background"
    counts = Counter((obj.colour, obj.shape) for obj in objects)
    singles = [obj for obj in objects if counts[(obj.colour, obj.shape)] == 1]
    relation_phrase = None
    if false_relation or rng.random() < relation_probability:
        pairs = [(a, b, rels) for a, b in permutations(singles, 2) if (rels := true_relations(a, b))]
        if pairs:
            a, b, rels = rng.choice(pairs)
            relation = rng.choice(rels)
            if false_relation:
                relation = OPPOSITE_RELATION[relation]
            relation_phrase = f"{with_article(name_of(a))} {relation} {with_article(name_of(b))}"
            del counts[(a.colour, a.shape)], counts[(b.colour, b.shape)]
        elif false_relation:
            return None
    phrases = [_group_phrase(colour, shape, count) for (colour, shape), count in counts.items()]
    rng.shuffle(phrases)
    if relation_phrase is not None:
        phrases.insert(rng.randrange(len(phrases) + 1), relation_phrase)
    return _join(phrases)


def swap_binding(objects: Sequence[PlacedObject], rng: random.Random) -> list[ObjectFacts] | None:
    """The objects with colours re-bound so the multiset of (colour, shape) changes: two objects
    swap colours when possible, else one object gets another colour or shape. ``None`` if impossible."""
    facts = [ObjectFacts(o.shape, o.colour, o.center, o.radius) for o in objects]
    original = Counter((o.colour, o.shape) for o in facts)
    pairs = [
        (i, j)
        for i, j in permutations(range(len(facts)), 2)
        if i < j and facts[i].colour != facts[j].colour and facts[i].shape != facts[j].shape
    ]
    rng.shuffle(pairs)
    for i, j in pairs:
        swapped = list(facts)
        swapped[i] = replace(facts[i], colour=facts[j].colour)
        swapped[j] = replace(facts[j], colour=facts[i].colour)
        if Counter((o.colour, o.shape) for o in swapped) != original:
            return swapped
    if not facts:
        return None
    index = rng.randrange(len(facts))
    changed = list(facts)
    if rng.random() < 0.5:
        changed[index] = replace(facts[index], colour=rng.choice([c for c in COLOUR_NAMES if c != facts[index].colour]))
    else:
        changed[index] = replace(facts[index], shape=rng.choice([s for s in SHAPES if s != facts[index].shape]))
    return changed


def hard_negative_caption(objects: Sequence[PlacedObject], rng: random.Random) -> str:
    """A caption that is false for these objects but close to a true one: a flipped relation or
    re-bound colours/shapes ("a blue circle and a red square" for a red circle and a blue square)."""
    if rng.random() < 0.3:
        flipped = describe(objects, rng, false_relation=True)
        if flipped is not None:
            return flipped
    rebound = swap_binding(objects, rng)
    caption = describe(rebound if rebound is not None else objects, rng)
    assert caption is not None
    return caption


# Query templates by what they name: {x} is the object phrase, {a} its article.
OBJECT_QUERY_TEMPLATES: tuple[str, ...] = (
    "{x}",
    "{a} {x}",
    "the {x}",
    "where is the {x}?",
    "is there {a} {x}?",
    "is there {a} {x} in the image?",
    "find the {x}",
    "show me the {x}",
    "a photo of {a} {x}",
    "what is next to the {x}?",
    "the {x} in the picture",
)
SHAPE_QUERY_TEMPLATES: tuple[str, ...] = (
    "what colour is the {shape}?",
    "what color is the {shape}?",
    "how many {shapes} are there?",
    "where is the {shape}?",
    "is there {a} {shape}?",
    "the {shape}",
)
COLOUR_QUERY_TEMPLATES: tuple[str, ...] = (
    "what shape is the {colour} object?",
    "how many {colour} objects are there?",
    "where is the {colour} object?",
    "the {colour} shape",
    "is there anything {colour}?",
)
PAIR_QUERY_TEMPLATES: tuple[str, ...] = (
    "is the {x} {relation} the {y}?",
    "the {x} and the {y}",
)


def object_query(rng: random.Random, colour: str | None = None, shape: str | None = None) -> str:
    """A question or phrase about one kind of object: colour and shape, shape only, or colour only."""
    if colour is not None and shape is not None:
        phrase = f"{colour} {shape}"
        return rng.choice(OBJECT_QUERY_TEMPLATES).format(x=phrase, a=article(phrase))
    if shape is not None:
        return rng.choice(SHAPE_QUERY_TEMPLATES).format(shape=shape, shapes=PLURALS[shape], a=article(shape))
    if colour is not None:
        return rng.choice(COLOUR_QUERY_TEMPLATES).format(colour=colour)
    raise InvalidParameterError("object_query needs a colour, a shape or both")


def pair_query(rng: random.Random, first: str, second: str, relation: str) -> str:
    """A question or phrase about two objects (names like "red circle")."""
    return rng.choice(PAIR_QUERY_TEMPLATES).format(x=first, y=second, relation=relation)


# ----------------------------------------------------------------------------------------------
# Questions with answers.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """A question about a scene with its short answer.

    Attributes:
        question: the text, e.g. "is there a red circle in the image?".
        answer: lower-case short answer: "yes"/"no", a colour, a shape, a digit string, ...
        type: one of ``QUESTION_TYPES``.
        split: for existence questions the POPE split (``POPE_SPLITS``) the question was drawn for,
            else ``None``.
        targets: names of the objects the question is about ("red circle"), for pointing checks.
    """

    question: str
    answer: str
    type: str
    split: str | None = None
    targets: tuple[str, ...] = ()


def object_frequency() -> dict[str, float]:
    """Probability of each "colour shape" under the sampler's popularity prior, most frequent first."""
    total_c = sum(COLOUR_WEIGHTS.values())
    total_s = sum(SHAPE_WEIGHTS.values())
    freq = {f"{c} {s}": COLOUR_WEIGHTS[c] / total_c * SHAPE_WEIGHTS[s] / total_s for c in COLOUR_NAMES for s in SHAPES}
    return dict(sorted(freq.items(), key=lambda item: -item[1]))


def _absent(objects: Sequence[PlacedObject]) -> list[str]:
    present = {name_of(o) for o in objects}
    return [name for name in object_frequency() if name not in present]


def existence_negative(objects: Sequence[PlacedObject], rng: random.Random, split: str) -> str:
    """An absent object's name chosen as POPE does for ``split``.

    * random: any absent colour-shape;
    * popular: one of the three most frequent absent ones (the sampler's prior);
    * adversarial: an absent recombination of present attributes (a present colour on a present
      object's shape, the binding trap), else an absent object sharing a colour or a shape.
    """
    absent = _absent(objects)
    if split == "random":
        return rng.choice(absent)
    if split == "popular":
        return rng.choice(absent[:3])
    if split == "adversarial":
        colours = {o.colour for o in objects}
        shapes = {o.shape for o in objects}
        crossed = [name for name in absent if name.split()[0] in colours and name.split()[1] in shapes]
        sharing = [name for name in absent if name.split()[0] in colours or name.split()[1] in shapes]
        return rng.choice(crossed or sharing or absent)
    raise InvalidParameterError(f"split must be one of {POPE_SPLITS}, got {split!r}")


def existence_questions(
    objects: Sequence[PlacedObject], rng: random.Random, split: str, pairs: int = 1
) -> list[Question]:
    """``pairs`` yes-questions about present objects and as many no-questions drawn for ``split``."""
    present = sorted({name_of(o) for o in objects})
    template = "is there {a} {x} in the image?"
    questions = []
    for _ in range(pairs):
        yes_name = rng.choice(present)
        no_name = existence_negative(objects, rng, split)
        for name, answer in ((yes_name, "yes"), (no_name, "no")):
            questions.append(Question(template.format(a=article(name), x=name), answer, "existence", split, (name,)))
    return questions


def make_question(objects: Sequence[PlacedObject], kind: str, rng: random.Random) -> Question | None:
    """One question of type ``kind`` (not "existence"; see ``existence_questions``), or ``None``
    when this scene has no unambiguous question of that type."""
    if kind == "colour":
        shapes = Counter(o.shape for o in objects)
        unique = [o for o in objects if shapes[o.shape] == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        spelling = rng.choice(("colour", "color"))
        return Question(f"what {spelling} is the {obj.shape}?", obj.colour, "colour", None, (name_of(obj),))
    if kind == "shape":
        colours = Counter(o.colour for o in objects)
        unique = [o for o in objects if colours[o.colour] == 1]
        if not unique:
            return None
        obj = rng.choice(unique)
        return Question(f"what shape is the {obj.colour} object?", obj.shape, "shape", None, (name_of(obj),))
    if kind == "count":
        choice = rng.randrange(3)
        if choice == 0:
            everything = tuple(name_of(o) for o in objects)
            return Question("how many objects are there?", str(len(objects)), "count", None, everything)
        if choice == 1:
            shape = rng.choice([o.shape for o in objects] + list(SHAPES))
            matching = tuple(name_of(o) for o in objects if o.shape == shape)
            return Question(f"how many {PLURALS[shape]} are there?", str(len(matching)), "count", None, matching)
        colour = rng.choice([o.colour for o in objects] + list(COLOUR_NAMES))
        matching = tuple(name_of(o) for o in objects if o.colour == colour)
        return Question(f"how many {colour} objects are there?", str(len(matching)), "count", None, matching)
    if kind == "position":
        names = Counter(name_of(o) for o in objects)
        pairs = [
            (a, b, rels)
            for a, b in permutations([o for o in objects if names[name_of(o)] == 1], 2)
            if (rels := true_relations(a, b))
        ]
        if not pairs:
            return None
        a, b, rels = rng.choice(pairs)
        relation = rng.choice(rels)
        truth = rng.random() < 0.5
        asked = relation if truth else OPPOSITE_RELATION[relation]
        text = f"is the {name_of(a)} {asked} the {name_of(b)}?"
        return Question(text, "yes" if truth else "no", "position", None, (name_of(a), name_of(b)))
    raise InvalidParameterError(f"kind must be one of {QUESTION_TYPES[1:]} here, got {kind!r}")


def scene_questions(
    objects: Sequence[PlacedObject],
    *,
    seed: int,
    types: Sequence[str] = QUESTION_TYPES,
    splits: Sequence[str] = POPE_SPLITS,
) -> list[Question]:
    """A balanced set of questions about one scene: for existence a yes and a no per POPE split,
    for each other type one question when the scene allows an unambiguous one.

    Example:
        >>> scene = generate_scene(0, n_objects=3)
        >>> [q.answer for q in scene_questions(scene.objects, seed=0, types=("existence",))]
        ['yes', 'no', 'yes', 'no', 'yes', 'no']
    """
    rng = random.Random(seed)
    questions: list[Question] = []
    for kind in types:
        if kind == "existence":
            for split in splits:
                questions.extend(existence_questions(objects, rng, split))
        else:
            question = make_question(objects, kind, rng)
            if question is not None:
                questions.append(question)
    return questions


WHOLE_SCENE_TYPES: tuple[str, ...] = ("describe", "total_count")
"""Questions about the whole scene (no one region answers them): a caption, the number of objects."""
DESCRIBE_QUESTIONS: tuple[str, ...] = ("describe the image.", "what is in the image?", "describe the scene.")
TOTAL_COUNT_QUESTIONS: tuple[str, ...] = (
    "how many objects are there in all?",
    "how many objects are in the image in total?",
)


def whole_scene_question(objects: Sequence[PlacedObject], kind: str, rng: random.Random) -> Question:
    """A question of type ``kind`` (one of ``WHOLE_SCENE_TYPES``) about the whole scene, with its answer:
    ``describe`` -> a caption naming every object (``describe``), ``total_count`` -> the object count.

    Example:
        >>> scene = generate_scene(0, n_objects=2)
        >>> whole_scene_question(scene.objects, "total_count", random.Random(0)).answer
        '2'
    """
    everything = tuple(name_of(o) for o in objects)
    if kind == "describe":
        caption = describe(objects, rng, relation_probability=0.0)
        return Question(rng.choice(DESCRIBE_QUESTIONS), str(caption), kind, None, everything)
    if kind == "total_count":
        return Question(rng.choice(TOTAL_COUNT_QUESTIONS), str(len(objects)), kind, None, everything)
    raise InvalidParameterError(f"kind must be one of {WHOLE_SCENE_TYPES}, got {kind!r}")


def scene_vocabulary() -> tuple[str, ...]:
    """Every word and punctuation mark the captions, queries and questions above can produce."""
    words: set[str] = set(COLOUR_NAMES) | set(SHAPES) | set(PLURALS.values()) | set(NUMBER_WORDS)
    words |= {"a", "an", "and", ",", "?", "yes", "no", "empty", "background", "colour", "color", "object"}
    words |= {str(i) for i in range(10)}
    for relation in RELATIONS:
        words.update(relation.split())
    templates = (
        OBJECT_QUERY_TEMPLATES
        + SHAPE_QUERY_TEMPLATES
        + COLOUR_QUERY_TEMPLATES
        + PAIR_QUERY_TEMPLATES
        + ("is there {a} {x} in the image?", "how many objects are there?", "what shape is the {colour} object?")
        + DESCRIBE_QUESTIONS
        + TOTAL_COUNT_QUESTIONS
    )
    for template in templates:
        text = template
        for placeholder in ("{x}", "{a}", "{shape}", "{shapes}", "{colour}", "{y}", "{relation}"):
            text = text.replace(placeholder, " ")
        words.update(text.replace("?", " ? ").replace(",", " , ").replace(".", " . ").split())
    return tuple(sorted(words))


# ----------------------------------------------------------------------------------------------
# Reference kinds: how users point at an object ("the red one", "what is next to the star?", "the
# thing in the top left corner", "can you find the little blue square?"), with the ground truth.
# ----------------------------------------------------------------------------------------------

REFERENCE_KINDS: tuple[str, ...] = ("full", "colour", "shape", "relation", "position", "free")
"""How a query names its target: by colour and shape, by colour alone, by shape alone, by a relation to
another object, by its place in the canvas, or in free phrasing."""
CANVAS_REGIONS: dict[str, tuple[int, int]] = {
    "in the top left corner": (0, 0),
    "at the top": (1, 0),
    "in the top right corner": (2, 0),
    "on the left": (0, 1),
    "in the middle": (1, 1),
    "on the right": (2, 1),
    "in the bottom left corner": (0, 2),
    "at the bottom": (1, 2),
    "in the bottom right corner": (2, 2),
}
"""The canvas's 3 x 3 cells, (column, row), by the phrase that names them; an object is in the cell that
holds its centre."""
REGION_NAMES: tuple[str, ...] = tuple(CANVAS_REGIONS)
COLOUR_REFERENCE_TEMPLATES: tuple[str, ...] = (
    "the {colour} one",
    "the {colour} thing",
    "where is the {colour} one?",
    "what is the {colour} object?",
    "the {colour} shape",
    "find the {colour} one",
)
SHAPE_REFERENCE_TEMPLATES: tuple[str, ...] = (
    "the {shape}",
    "where is the {shape}?",
    "what colour is the {shape}?",
    "find the {shape}",
    "the {shape} one",
)
RELATION_REFERENCE_TEMPLATES: tuple[str, ...] = (
    "what is next to the {x}?",
    "the thing next to the {x}",
    "what is {relation} the {x}?",
    "the object {relation} the {x}",
)
POSITION_REFERENCE_TEMPLATES: tuple[str, ...] = (
    "the thing {where}",
    "what is {where}?",
    "the object {where}",
    "the shape {where}",
    "what's {where}?",
)
FREE_REFERENCE_TEMPLATES: tuple[str, ...] = (
    "can you find the little {x}?",
    "where's the {x}",
    "i am looking for {a} {x}",
    "do you see {a} {x} anywhere?",
    "point to the {x} please",
    "show me where the {x} is",
    "hey, where is the {x}?",
    "could you tell me where the small {x} is?",
)


@dataclass(frozen=True)
class ObjectPattern:
    """What an image must hold for a reference to find something: an object of this colour, this shape,
    in this canvas region (``None``: any)."""

    colour: str | None = None
    shape: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class Reference:
    """A query that refers to objects of a scene, with its ground truth.

    Attributes:
        text: the query, e.g. "the red one".
        kind: one of ``REFERENCE_KINDS``.
        targets: indices (into the scene's objects) of the objects a good map points at: the object
            referred to; for relations the anchor and the closest object in that relation ("what is next
            to the star?": the star and its nearest neighbour; "what is left of the star?": the star and
            the closest object left of it).
        pattern: the object an image must hold for the query to make sense (for relations: the anchor).
    """

    text: str
    kind: str
    targets: tuple[int, ...]
    pattern: ObjectPattern


def region_of(obj: PlacedObject, canvas: tuple[float, float]) -> str:
    """The name of the 3 x 3 canvas cell holding the object's centre; ``canvas`` is (width, height) in the
    units of the object's centre.

    Example:
        >>> region_of(ObjectFacts("star", "red", (10.0, 90.0), 5.0), (100.0, 100.0))
        'in the bottom left corner'
    """
    width, height = canvas
    column = min(2, max(0, int(3 * obj.center[0] / width)))
    row = min(2, max(0, int(3 * obj.center[1] / height)))
    return REGION_NAMES[row * 3 + column]


def _unique(objects: Sequence[PlacedObject], key: Callable[[PlacedObject], str]) -> list[int]:
    counts = Counter(key(o) for o in objects)
    return [i for i, o in enumerate(objects) if counts[key(o)] == 1]


def _nearest(objects: Sequence[PlacedObject], index: int, among: Sequence[int] | None = None) -> int:
    """The index of the object (of ``among``; default all others) whose centre is closest to object ``index``'s."""
    anchor = objects[index]
    return min(
        among if among is not None else [i for i in range(len(objects)) if i != index],
        key=lambda i: math.hypot(objects[i].center[0] - anchor.center[0], objects[i].center[1] - anchor.center[1]),
    )


def reference_query(
    objects: Sequence[PlacedObject], kind: str, rng: random.Random, canvas: tuple[float, float]
) -> Reference | None:
    """A query of reference kind ``kind`` about one of the objects, or ``None`` when the scene has no
    unambiguous one (e.g. no colour held by a single object for ``"colour"``).

    ``canvas`` is (width, height) in the units of the objects' centres (pixels for ``SceneObject``).

    Example:
        >>> scene = generate_scene(5, size=(320, 224), n_objects=4)
        >>> ref = reference_query(scene.objects, "colour", random.Random(0), scene.size)
        >>> ref.kind, scene.objects[ref.targets[0]].colour in ref.text
        ('colour', True)
    """
    if kind not in REFERENCE_KINDS:
        raise InvalidParameterError(f"kind must be one of {REFERENCE_KINDS}, got {kind!r}")
    if kind in ("colour", "shape"):
        unique = _unique(objects, lambda o: getattr(o, kind))
        if not unique:
            return None
        index = rng.choice(unique)
        value = {kind: getattr(objects[index], kind)}
        templates = COLOUR_REFERENCE_TEMPLATES if kind == "colour" else SHAPE_REFERENCE_TEMPLATES
        return Reference(rng.choice(templates).format(**value), kind, (index,), ObjectPattern(**value))
    if kind == "position":
        regions = [region_of(o, canvas) for o in objects]
        counts = Counter(regions)
        unique = [i for i, region in enumerate(regions) if counts[region] == 1]
        if not unique:
            return None
        index = rng.choice(unique)
        text = rng.choice(POSITION_REFERENCE_TEMPLATES).format(where=regions[index])
        return Reference(text, kind, (index,), ObjectPattern(region=regions[index]))
    by_name = _unique(objects, name_of)
    by_shape = set(_unique(objects, lambda o: o.shape))
    if kind == "relation":
        anchors = [i for i in by_name if len(objects) > 1]
        if not anchors:
            return None
        index = rng.choice(anchors)
        anchor = objects[index]
        phrase, pattern = (
            (anchor.shape, ObjectPattern(shape=anchor.shape))
            if index in by_shape and rng.random() < 0.5
            else (name_of(anchor), ObjectPattern(anchor.colour, anchor.shape))
        )
        relations = {
            relation: tuple(i for i, o in enumerate(objects) if i != index and relation in true_relations(o, anchor))
            for relation in RELATIONS
        }
        template = rng.choice(RELATION_REFERENCE_TEMPLATES)
        if "{relation}" in template:
            held = [relation for relation, related in relations.items() if related]
            if held:
                relation = rng.choice(held)
                text = template.format(x=phrase, relation=relation)
                closest = _nearest(objects, index, relations[relation])
                return Reference(text, kind, (index, closest), pattern)
            template = RELATION_REFERENCE_TEMPLATES[0]
        return Reference(template.format(x=phrase), kind, (index, _nearest(objects, index)), pattern)
    if not by_name:
        return None
    index = rng.choice(by_name)
    obj = objects[index]
    if kind == "free" and index in by_shape and rng.random() < 0.3:
        phrase, pattern = obj.shape, ObjectPattern(shape=obj.shape)
    else:
        phrase, pattern = name_of(obj), ObjectPattern(obj.colour, obj.shape)
    templates = FREE_REFERENCE_TEMPLATES if kind == "free" else OBJECT_QUERY_TEMPLATES
    return Reference(rng.choice(templates).format(x=phrase, a=article(phrase)), kind, (index,), pattern)


def reference_vocabulary() -> tuple[str, ...]:
    """``scene_vocabulary()`` plus every word the reference queries can produce (the demo CLIP's text side).

    Example:
        >>> {"corner", "next", "little"} <= set(reference_vocabulary())
        True
    """
    words = set(scene_vocabulary())
    templates = (
        COLOUR_REFERENCE_TEMPLATES
        + SHAPE_REFERENCE_TEMPLATES
        + RELATION_REFERENCE_TEMPLATES
        + POSITION_REFERENCE_TEMPLATES
        + FREE_REFERENCE_TEMPLATES
        + REGION_NAMES
    )
    for template in templates:
        text = template
        for placeholder in ("{x}", "{a}", "{shape}", "{colour}", "{relation}", "{where}"):
            text = text.replace(placeholder, " ")
        words.update(text.replace("?", " ? ").replace(",", " , ").split())
    return tuple(sorted(words))
