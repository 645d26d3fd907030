"""The synthetic evaluation sets: ``scene:small:<seed>`` references, disjoint development and test seeds, the
shipped files equal to what their builders make, the small-object split's scopes and the two-region pairs."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import numpy as np
import pytest

from agents.datasets import (
    _FAMILIES,
    SEED_BLOCK,
    SEED_RANGES,
    SYNTHETIC_SETS,
    WHOLE_SCENE_TYPES,
    EvalItem,
    SceneReference,
    build_two_region,
    item_image,
    load_jsonl,
    scene_reference,
    scene_seed,
    set_stage,
    synthetic_items,
)
from api_tool.demo.scenes import SMALL_OBJECT_CONFIG, generate_scene, name_of, true_relations
from api_tool.errors import DatasetError


def test_scene_references_parse_both_forms_and_name_the_known_configurations() -> None:
    assert scene_reference("scene:12") == SceneReference(None, 12)
    assert scene_reference("scene:small:7100003") == SceneReference("small", 7100003)
    assert str(SceneReference("small", 5)) == "scene:small:5" and str(SceneReference(None, 5)) == "scene:5"
    assert scene_reference("photo.jpg") is None and scene_reference("scene:x") is None
    assert scene_seed("scene:12") == 12 and scene_seed("scene:small:12") is None
    with pytest.raises(DatasetError, match=r"unknown scene configuration 'huge'.*scene:small:<seed>"):
        scene_reference("scene:huge:3")


def test_a_jsonl_line_may_name_a_small_object_scene_and_refuses_an_unknown_one(tmp_path) -> None:
    good = {"image": "scene:small:3", "question": "q?", "answer": "yes"}
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert load_jsonl(path)[0].image == "scene:small:3"
    path.write_text(json.dumps({**good, "image": "scene:big:3"}) + "\n")
    with pytest.raises(DatasetError, match=r"set.jsonl:1: unknown scene configuration 'big'"):
        load_jsonl(path)


def test_small_object_reference_regenerates_the_small_object_scene() -> None:
    image = item_image(EvalItem("x", "scene:small:7100000", "q", "yes"))
    expected = generate_scene(7100000, config=SMALL_OBJECT_CONFIG).image
    assert image.size == expected.size and max(image.size) >= SMALL_OBJECT_CONFIG.min_side
    assert np.array_equal(np.asarray(image), np.asarray(expected))


def test_development_and_test_seeds_are_disjoint_and_far_from_training_seeds() -> None:
    blocks = {(r.first, r.first + SEED_BLOCK) for stages in SEED_RANGES.values() for r in stages.values()}
    assert all(r.shipped <= SEED_BLOCK for stages in SEED_RANGES.values() for r in stages.values())
    assert len(blocks) == 6  # the POPE splits and qa share their scenes; every other stage has its own block
    ordered = sorted(blocks)
    assert ordered[0][0] >= 3_000_000
    assert all(end <= next_first for (_, end), (next_first, _) in pairwise(ordered))
    assert SEED_RANGES["pope"] == SEED_RANGES["qa"]


@pytest.mark.parametrize("family", ["pope", "qa", "small", "two-region"])
def test_shipped_files_hold_their_stage_seeds_and_start_as_their_builder_builds(family: str) -> None:
    for stage in ("test", "dev"):
        seeds = SEED_RANGES[family][stage]
        items = load_jsonl(_FAMILIES[family].files[stage])
        refs = {scene_reference(item.image) for item in items}
        assert all(seeds.first <= ref.seed < seeds.first + seeds.shipped for ref in refs if ref is not None)
        first = min(ref.seed for ref in refs if ref is not None)
        rebuilt = _FAMILIES[family].build(1, first)
        scene_items = [item for item in items if scene_reference(item.image).seed == first]
        assert [i.to_json() for i in rebuilt] == [i.to_json() for i in scene_items]


def test_set_names_cover_every_stage() -> None:
    for name in ("random", "popular", "adversarial", "all", "qa", "small", "two-region"):
        assert name in SYNTHETIC_SETS and f"{name}-dev" in SYNTHETIC_SETS
        assert set_stage(f"{name}-dev") == (name, "dev") and set_stage(name) == (name, "test")
    with pytest.raises(DatasetError, match="unknown synthetic set 'tiny'"):
        synthetic_items("tiny")


def test_small_object_split_types_its_scope_and_asks_one_whole_scene_question_per_scene() -> None:
    for name in ("small", "small-dev"):
        items = synthetic_items(name)
        assert all(item.split == "small" and item.image.startswith("scene:small:") for item in items)
        assert all((item.extra["scope"] == "whole") == (item.type in WHOLE_SCENE_TYPES) for item in items)
        assert all(item.question != "how many objects are there?" for item in items)
        per_scene: dict[str, int] = {}
        for item in items:
            per_scene[item.image] = per_scene.get(item.image, 0) + (item.extra["scope"] == "whole")
        assert set(per_scene.values()) == {1}
        existence = [item.answer for item in items if item.type == "existence"]
        assert existence.count("yes") == existence.count("no")
    assert 300 <= len(synthetic_items("small")) <= 600 and len(synthetic_items("small-dev")) >= 200


def test_two_region_questions_ask_about_far_apart_objects_and_answer_truly() -> None:
    items = build_two_region(6, SEED_RANGES["two-region"]["dev"].first)
    assert items and [item.answer for item in items] == ["yes", "no"] * (len(items) // 2)
    for item in items:
        scene = generate_scene(scene_seed(item.image))
        a, b = (next(o for o in scene.objects if name_of(o) == name) for name in item.extra["targets"])
        assert math.dist(a.center, b.center) >= 0.45 * min(scene.size)
        relation = item.question[len(f"is the {name_of(a)} ") : -len(f" the {name_of(b)}?")]
        assert (relation in true_relations(a, b)) == (item.answer == "yes")


def test_asking_beyond_the_shipped_items_extends_from_the_stage_seeds() -> None:
    shipped = synthetic_items("two-region-dev")
    extended = synthetic_items("two-region-dev", len(shipped) + 2)
    assert extended[: len(shipped)] == shipped
    seeds = SEED_RANGES["two-region"]["dev"]
    assert all(scene_seed(item.image) >= seeds.first + seeds.shipped for item in extended[len(shipped) :])
