"""Semantic checks on the shipped demo models (offline, CPU): they answer and point correctly.

The demo LLaVA (``api_tool/demo/weights/llava``) and the demo CLIP (``api_tool/demo/weights/clip``)
were trained by the project on synthetic scenes (``training.train_llava`` / ``train_clip``).
Scenes here come from ``generate_scene`` with fixed seeds; answers and maps are deterministic.
A sign error (map inverted), a transposed grid or a misaligned letterbox (mask stretched over a
non-square image) moves the argmax off the queried object and fails the pointing tests.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from api_tool.backends.clip import ClipAttributor
from api_tool.backends.llava import LlavaAttributor
from api_tool.demo.scenes import Scene, article, existence_negative, generate_scene
from api_tool.demo.tiny_llava import DEMO_LLAVA_DIR
from api_tool.maps import AttributionMap

DEMO_LLAVA_LAYER = 2
"""The decoder block whose map the demo LLaVA was trained to ground (best pointing; see
benchmarks/demo_llava_quality.py)."""
CLIP_DIR = Path(__file__).resolve().parents[2] / "api_tool" / "demo" / "weights" / "clip"
SQUARE, WIDE = (224, 224), (320, 192)


@pytest.fixture(scope="module")
def llava() -> LlavaAttributor:
    return LlavaAttributor(model="demo", layer=DEMO_LLAVA_LAYER, device="cpu")


@pytest.fixture(scope="module")
def clip() -> ClipAttributor:
    if not (CLIP_DIR / "model.safetensors").is_file():
        pytest.fail(f"the demo CLIP weights are missing from {CLIP_DIR}")
    return ClipAttributor("demo", device="cpu")


def scene(seed: int, size: tuple[int, int]) -> Scene:
    return generate_scene(seed, size=size, n_objects=3, background="noise")


def argmax_in_box(amap: AttributionMap, box: tuple[int, int, int, int]) -> bool:
    mask = amap.upsample()
    row, col = np.unravel_index(int(np.argmax(mask)), mask.shape)
    x0, y0, x1, y1 = box
    return bool(x0 <= col < x1 and y0 <= row < y1)


def test_demo_llava_loads_offline_with_plain_transformers() -> None:
    weights = DEMO_LLAVA_DIR / "model.safetensors"
    assert weights.stat().st_size <= 11 * 1024 * 1024
    model = LlavaForConditionalGeneration.from_pretrained(DEMO_LLAVA_DIR, local_files_only=True)
    processor = AutoProcessor.from_pretrained(DEMO_LLAVA_DIR, local_files_only=True)
    assert model.dtype == torch.float32
    picture = scene(8, SQUARE)
    question = f"is there {article(picture.objects[0].name)} {picture.objects[0].name} in the image?"
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=picture.image, text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :].tolist()
    assert new_tokens == [processor.tokenizer.convert_tokens_to_ids("yes"), processor.tokenizer.eos_token_id]


@pytest.mark.parametrize(("seed", "size"), [(12, SQUARE), (8, WIDE)])
def test_demo_llava_answers_existence_questions(llava: LlavaAttributor, seed: int, size: tuple[int, int]) -> None:
    """A present object gets "yes"; an absent recombination of present colours and shapes (POPE's
    adversarial negative, the binding trap) gets "no"."""
    picture = scene(seed, size)
    present = picture.objects[0].name
    absent = existence_negative(picture.objects, random.Random(seed), "adversarial")
    assert absent not in {obj.name for obj in picture.objects}
    for name, expected in ((present, "yes"), (absent, "no")):
        amap = llava.attribute(picture.image, f"is there {article(name)} {name} in the image?")
        assert amap.metadata["answer"] == expected, (name, amap.metadata["answer"])


def test_demo_llava_generation_is_deterministic(llava: LlavaAttributor) -> None:
    picture = scene(8, WIDE)
    question = f"where is the {picture.objects[1].name}?"
    first, second = llava.attribute(picture.image, question), llava.attribute(picture.image, question)
    assert first.metadata["answer"] == second.metadata["answer"] == "bottom left"
    np.testing.assert_array_equal(first.raw, second.raw)
    np.testing.assert_array_equal(first.mask, second.mask)


@pytest.mark.parametrize("size", [SQUARE, WIDE], ids=["square", "non-square"])
def test_demo_llava_map_points_at_the_queried_object(llava: LlavaAttributor, size: tuple[int, int]) -> None:
    picture = scene(8, size)
    for obj in picture.objects:
        amap = llava.attribute(picture.image, f"where is the {obj.name}?")
        assert argmax_in_box(amap, obj.box), (obj.name, obj.box)


@pytest.mark.parametrize("size", [SQUARE, WIDE], ids=["square", "non-square"])
def test_demo_clip_map_points_at_the_queried_object(clip: ClipAttributor, size: tuple[int, int]) -> None:
    picture = scene(8, size)
    queries = [f"where is the {obj.name}?" for obj in picture.objects]
    for obj, amap in zip(picture.objects, clip.attribute_many(picture.image, queries)):
        assert argmax_in_box(amap, obj.box), (obj.name, obj.box)
