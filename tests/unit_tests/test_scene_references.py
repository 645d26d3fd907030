"""Reference kinds of the demo CLIP's queries: every generated query names its ground-truth target the way
its kind says, targets are unambiguous, and every word is in the CLIP's vocabulary."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from api_tool.demo.clip_model import UNK_ID, CompactTokenizer
from api_tool.demo.scenes import (
    CANVAS_REGIONS,
    REFERENCE_KINDS,
    REGION_NAMES,
    ObjectFacts,
    generate_scene,
    name_of,
    reference_query,
    reference_vocabulary,
    region_of,
    sample_layouts,
    true_relations,
)
from api_tool.errors import InvalidParameterError


@dataclass(frozen=True)
class Canvas:
    """Objects and the canvas (width, height) in their units: what ``reference_query`` reads of a scene."""

    objects: list[ObjectFacts]
    size: tuple[float, float]


@pytest.fixture(scope="module")
def scenes() -> list[Canvas]:
    layouts = sample_layouts(60, torch.Generator().manual_seed(4))
    return [
        Canvas(objects, (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect))
        for objects, aspect in zip(layouts.facts(), layouts.aspect.tolist())
    ]


def test_scene_objects_in_pixels_give_the_same_references_as_in_shorter_side_units() -> None:
    scene = generate_scene(3, size=(320, 224), n_objects=4)
    short = min(scene.size)
    facts = [ObjectFacts(o.shape, o.colour, (o.center[0] / short, o.center[1] / short), o.radius / short)
             for o in scene.objects]  # fmt: skip
    canvas = (scene.size[0] / short, scene.size[1] / short)
    for kind in REFERENCE_KINDS:
        for trial in range(4):
            in_pixels = reference_query(scene.objects, kind, random.Random(trial), scene.size)
            assert in_pixels == reference_query(facts, kind, random.Random(trial), canvas)


def _distance(a: ObjectFacts, b: ObjectFacts) -> float:
    return math.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1])


def test_region_of_is_the_cell_holding_the_centre() -> None:
    width, height = 90.0, 60.0
    for x in range(0, 90, 7):
        for y in range(0, 60, 5):
            region = region_of(ObjectFacts("star", "red", (x + 0.5, y + 0.5), 1.0), (width, height))
            column, row = CANVAS_REGIONS[region]
            assert column * 30 <= x + 0.5 < (column + 1) * 30 and row * 20 <= y + 0.5 < (row + 1) * 20
    assert len(set(CANVAS_REGIONS.values())) == 9 and REGION_NAMES[0] == "in the top left corner"


def test_every_reference_names_its_targets_as_its_kind_says(scenes: list[Canvas]) -> None:
    found = dict.fromkeys(REFERENCE_KINDS, 0)
    for scene in scenes:
        objects = scene.objects
        names = [name_of(o) for o in objects]
        for kind in REFERENCE_KINDS:
            for trial in range(6):
                ref = reference_query(objects, kind, random.Random(trial), scene.size)
                if ref is None:
                    continue
                found[kind] += 1
                assert ref.kind == kind and len(set(ref.targets)) == len(ref.targets)
                target = objects[ref.targets[0]]
                pattern = ref.pattern
                if kind == "colour":
                    assert target.colour in ref.text and [o.colour for o in objects].count(target.colour) == 1
                    assert (pattern.colour, pattern.shape, pattern.region) == (target.colour, None, None)
                elif kind == "shape":
                    assert target.shape in ref.text and [o.shape for o in objects].count(target.shape) == 1
                    assert (pattern.colour, pattern.shape, pattern.region) == (None, target.shape, None)
                elif kind == "position":
                    region = region_of(target, scene.size)
                    assert region in ref.text and [region_of(o, scene.size) for o in objects].count(region) == 1
                    assert (pattern.colour, pattern.shape, pattern.region) == (None, None, region)
                elif kind == "relation":
                    anchor, other = target, objects[ref.targets[1]]
                    assert len(ref.targets) == 2 and names.count(name_of(anchor)) == 1
                    assert ref.text.rstrip("?").endswith((f"the {anchor.shape}", f"the {name_of(anchor)}"))
                    relation = next((r for r in ("left of", "right of", "above", "below") if r in ref.text), None)
                    candidates = [
                        o for o in objects
                        if o is not anchor and (relation is None or relation in true_relations(o, anchor))
                    ]  # fmt: skip
                    assert relation is not None or "next to" in ref.text
                    assert other in candidates
                    assert _distance(other, anchor) == min(_distance(o, anchor) for o in candidates)
                else:
                    assert names.count(name_of(target)) == 1 and len(ref.targets) == 1
                    assert target.shape in ref.text
                    if pattern.colour is not None:
                        assert name_of(target) in ref.text and pattern.colour == target.colour
                    else:
                        assert [o.shape for o in objects].count(target.shape) == 1
    assert all(count > 0 for count in found.values()), found


def test_no_reference_when_the_scene_has_no_unambiguous_one() -> None:
    twins = [ObjectFacts("star", "red", (10.0, 10.0), 2.0), ObjectFacts("star", "red", (12.0, 11.0), 2.0)]
    for kind in REFERENCE_KINDS:
        assert reference_query(twins, kind, random.Random(0), (100.0, 100.0)) is None, kind
    with pytest.raises(InvalidParameterError, match="kind must be one of"):
        reference_query(twins, "nearby", random.Random(0), (100.0, 100.0))


def test_every_reference_word_is_in_the_demo_clip_vocabulary(scenes: list[Canvas]) -> None:
    tokenize = CompactTokenizer.for_scene_language(32)
    vocabulary = set(reference_vocabulary())
    texts = [
        ref.text
        for scene in scenes
        for kind in REFERENCE_KINDS
        for trial in range(8)
        if (ref := reference_query(scene.objects, kind, random.Random(trial), scene.size)) is not None
    ]
    for text in texts:
        assert set(text.replace("?", " ? ").replace(",", " , ").split()) <= vocabulary, text
    assert not bool((tokenize(texts) == UNK_ID).any())
