"""The synthetic scenes: determinism, exact ground truth, consistent questions, canvas shapes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from api_tool.demo.scenes import (
    BACKGROUNDS,
    COLOURS,
    PLURALS,
    POPE_SPLITS,
    SHAPES,
    Layouts,
    ObjectFacts,
    describe,
    existence_negative,
    generate_scene,
    hard_negative_caption,
    letterbox_boxes,
    object_frequency,
    render_layouts,
    sample_canvas_size,
    sample_layouts,
    scene_questions,
    scene_vocabulary,
    shape_masks,
    swap_binding,
    true_relations,
)
from api_tool.errors import InvalidParameterError
from api_tool.geometry import Letterbox

SIZES = [(224, 224), (320, 224), (224, 320), (97, 61)]


@pytest.fixture(scope="module")
def scenes() -> list:
    return [generate_scene(seed, size=SIZES[seed % len(SIZES)]) for seed in range(12)]


def test_same_seed_same_scene() -> None:
    a, b = generate_scene(11), generate_scene(11)
    assert np.array_equal(a.array, b.array)
    assert a.caption == b.caption and a.background == b.background
    assert [o.name for o in a.objects] == [o.name for o in b.objects]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects))
    assert not np.array_equal(a.array, generate_scene(12).array)


def test_canvas_size_and_sampled_non_square_canvases(scenes: list) -> None:
    for seed, scene in enumerate(scenes):
        assert scene.size == SIZES[seed % len(SIZES)]
        assert scene.array.shape == (scene.size[1], scene.size[0], 3)
    sampled = {sample_canvas_size(torch.Generator().manual_seed(seed)) for seed in range(40)}
    assert all(224 <= max(size) <= 320 and min(size) >= 112 for size in sampled)
    assert any(w == h for w, h in sampled) and any(w > h for w, h in sampled) and any(w < h for w, h in sampled)


def test_masks_boxes_and_colours_match_the_pixels(scenes: list) -> None:
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 5
        covered = np.zeros(scene.array.shape[:2], dtype=int)
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS
            assert obj.mask.any()
            rows, cols = np.nonzero(obj.mask)
            assert obj.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            x0, y0, x1, y1 = obj.box
            assert obj.mask.sum() == obj.mask[y0:y1, x0:x1].sum()
            assert (scene.array[obj.mask] == np.array(obj.rgb)).all()
            assert np.abs(np.array(obj.rgb) - np.array(COLOURS[obj.colour])).max() <= 15
            assert 0.3 <= obj.visible_fraction <= 1.0
            covered += obj.mask
        assert covered.max() <= 1  # visible masks never overlap


def test_objects_lie_at_their_recorded_centres() -> None:
    scene = generate_scene(5, size=(300, 200), n_objects=3, occlusion=False, background="flat")
    for obj in scene.objects:
        x, y = obj.center
        assert obj.mask[int(y), int(x)] or obj.shape in ("ring", "triangle")
        x0, y0, x1, y1 = obj.box
        assert x0 - 1 <= x <= x1 + 1 and y0 - 1 <= y <= y1 + 1
        assert max(x1 - x0, y1 - y0) <= 2 * 1.15 * obj.radius + 2


def test_fixed_options_are_obeyed() -> None:
    for background in BACKGROUNDS:
        scene = generate_scene(3, size=(128, 96), n_objects=2, background=background, occlusion=False)
        assert scene.background == background
        assert len(scene.objects) == 2
    with pytest.raises(InvalidParameterError):
        generate_scene(0, background="plaid")
    with pytest.raises(InvalidParameterError):
        generate_scene(0, size=(4, 100))


def test_flat_background_is_flat_outside_objects() -> None:
    scene = generate_scene(2, size=(160, 120), background="flat")
    outside = ~np.any([obj.mask for obj in scene.objects], axis=0)
    assert len(np.unique(scene.array[outside].reshape(-1, 3), axis=0)) == 1


def test_shape_masks_basic_geometry() -> None:
    u, v = torch.tensor([0.0, 0.7, 0.7, 0.0, 0.95]), torch.tensor([0.0, 0.7, 0.0, -0.95, 0.0])
    inside = {name: shape_masks(torch.tensor(i), u, v).tolist() for i, name in enumerate(SHAPES)}
    # points: centre, lower-right diagonal, right of centre, top, far right
    assert inside == {
        "circle": [True, True, True, True, True],
        "square": [True, True, True, False, False],
        "triangle": [True, True, False, True, False],  # apex up, wide base below
        "star": [True, False, False, True, False],  # one point straight up
        "cross": [True, False, True, True, True],
        "ring": [False, True, True, True, True],
    }


def test_batch_render_equals_single_scene_render() -> None:
    generator = torch.Generator().manual_seed(4)
    layouts = sample_layouts(3, generator, aspect=1.5)
    batch = render_layouts(layouts, (120, 80), generator=torch.Generator().manual_seed(1))
    for i in range(3):
        single = render_layouts(layouts.select(slice(i, i + 1)), (120, 80), generator=torch.Generator().manual_seed(9))
        assert torch.equal(single.labels[0], batch.labels[i])
        objects = batch.labels[i] > 0
        assert torch.equal(single.images[0][:, objects], batch.images[i][:, objects])


def test_letterboxed_batch_matches_letterbox_geometry() -> None:
    aspects = torch.tensor([1.0, 320 / 224, 224 / 320, 2.0])
    boxes = letterbox_boxes(aspects, 224)
    for box, size in zip(boxes, [(224, 224), (320, 224), (224, 320), (448, 224)]):
        letterbox = Letterbox.fit(size, 224)
        assert tuple(box.tolist()) == (*letterbox.offset, *letterbox.scaled_size)
    layouts = sample_layouts(4, torch.Generator().manual_seed(0), aspect=aspects)
    rendered = render_layouts(layouts, (224, 224), content_boxes=boxes, pad_rgb=(1.0, 2.0, 3.0))
    _, y0, _, h = (int(v) for v in boxes[3])
    assert y0 > 0 and (rendered.images[3, :, :y0] == torch.tensor([1.0, 2.0, 3.0])[:, None, None]).all()
    assert (rendered.labels[3, :y0] == 0).all() and (rendered.labels[3, y0 + h :] == 0).all()


def test_relations_follow_centres() -> None:
    left = ObjectFacts("circle", "red", (10.0, 50.0), 5.0)
    right = ObjectFacts("square", "blue", (40.0, 52.0), 5.0)
    low = ObjectFacts("star", "green", (12.0, 90.0), 5.0)
    assert true_relations(left, right) == ("left of",)
    assert true_relations(right, left) == ("right of",)
    assert true_relations(left, low) == ("above",)
    assert true_relations(left, ObjectFacts("ring", "white", (13.0, 53.0), 5.0)) == ()


def test_captions_name_every_object_and_negatives_are_false() -> None:
    rng = random.Random(0)
    objects = [
        ObjectFacts("circle", "red", (10.0, 50.0), 5.0),
        ObjectFacts("square", "blue", (40.0, 50.0), 5.0),
        ObjectFacts("star", "green", (70.0, 50.0), 5.0),
        ObjectFacts("star", "green", (70.0, 10.0), 5.0),
    ]
    true_captions = {describe(objects, random.Random(seed)) for seed in range(300)}
    assert "a red circle left of a blue square and two green stars" in true_captions
    for caption in true_captions:
        assert caption is not None
        assert "red circle" in caption and "blue square" in caption and "two green stars" in caption
    for _ in range(30):
        false = describe(objects, rng, false_relation=True)
        assert false is not None
        assert "a red circle right of a blue square" in false or "a blue square left of a red circle" in false
        swapped = swap_binding(objects, rng)
        assert swapped is not None
        assert sorted(o.name for o in swapped) != sorted(o.name for o in objects)
        assert hard_negative_caption(objects, rng) not in true_captions


def test_questions_agree_with_ground_truth(scenes: list) -> None:
    for scene in scenes:
        names = [obj.name for obj in scene.objects]
        for q in scene_questions(scene.objects, seed=scene.seed):
            if q.type == "existence":
                assert q.split in POPE_SPLITS
                assert (q.targets[0] in names) == (q.answer == "yes")
            elif q.type == "colour":
                shape = q.question.split()[-1].rstrip("?")
                assert [o.colour for o in scene.objects if o.shape == shape] == [q.answer]
            elif q.type == "shape":
                colour = q.question.split()[-2]
                assert [o.shape for o in scene.objects if o.colour == colour] == [q.answer]
            elif q.type == "count":
                counted = q.question.removeprefix("how many ").removesuffix(" are there?")
                if counted == "objects":
                    expected = len(scene.objects)
                elif counted.endswith(" objects"):
                    expected = sum(o.colour == counted.split()[0] for o in scene.objects)
                else:
                    expected = sum(PLURALS[o.shape] == counted for o in scene.objects)
                assert int(q.answer) == expected, q.question
            else:
                assert q.type == "position"
                a, b = (next(o for o in scene.objects if o.name == t) for t in q.targets)
                relation = q.question[len(f"is the {a.name} ") : -len(f" the {b.name}?")]
                assert (relation in true_relations(a, b)) == (q.answer == "yes")


def test_pope_negatives_follow_their_split() -> None:
    objects = [ObjectFacts("circle", "red", (0.0, 0.0), 1.0), ObjectFacts("square", "blue", (5.0, 0.0), 1.0)]
    absent_popular = [name for name in object_frequency() if name not in ("red circle", "blue square")]
    rng = random.Random(1)
    for _ in range(20):
        adversarial = existence_negative(objects, rng, "adversarial")
        assert adversarial in ("red square", "blue circle")
        assert existence_negative(objects, rng, "popular") in absent_popular[:3]
        assert existence_negative(objects, rng, "random") not in ("red circle", "blue square")
    with pytest.raises(InvalidParameterError):
        existence_negative(objects, rng, "hard")


def test_vocabulary_covers_generated_language(scenes: list) -> None:
    vocabulary = set(scene_vocabulary())
    for scene in scenes:
        texts = [scene.caption] + [q.question for q in scene_questions(scene.objects, seed=scene.seed)]
        for text in texts:
            assert set(text.replace("?", " ? ").replace(",", " , ").split()) <= vocabulary, text


def test_layouts_keep_objects_on_the_canvas_and_apart() -> None:
    layouts: Layouts = sample_layouts(200, torch.Generator().manual_seed(3), occlusion=False)
    for aspect, objects in zip(layouts.aspect.tolist(), layouts.facts()):
        width, height = (aspect, 1.0) if aspect >= 1 else (1.0, 1.0 / aspect)
        assert 1 <= len(objects) <= 5
        for i, a in enumerate(objects):
            assert 1.15 * a.radius - 1e-6 <= a.center[0] <= width - 1.15 * a.radius + 1e-6
            assert 1.15 * a.radius - 1e-6 <= a.center[1] <= height - 1.15 * a.radius + 1e-6
            for b in objects[i + 1 :]:
                distance = np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1])
                assert distance >= 1.1 * 1.15 * (a.radius + b.radius) - 1e-6
