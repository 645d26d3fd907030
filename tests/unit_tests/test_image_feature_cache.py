"""The image-feature memo: the answer's image pass serves the self-map that follows, and nothing else."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from api_tool.backends.image_feature_cache import ImageFeatureCache, share_image_features
from api_tool.backends.lvlm import LvlmAttributor
from tests.tiny_lvlms.qwen2_vl import build_tiny_qwen2_vl
from tests.tiny_models import tiny_llava

QUESTION = "what is in the image?"


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def counting_encoder(model: torch.nn.Module) -> list[int]:
    """Count the calls that reach the real image encoder (below the memo)."""
    calls: list[int] = []
    cache = share_image_features(model)
    assert isinstance(cache, ImageFeatureCache)
    real = cache.encode

    def encode(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    cache.encode = encode
    return calls


def test_scoring_the_answer_just_generated_reuses_its_image_pass_and_the_same_map() -> None:
    for model, processor in (build_tiny_qwen2_vl(seed=0), (tiny_llava(seed=1).model, tiny_llava(seed=1).processor)):
        attributor = LvlmAttributor.from_model(model, processor, layer=-1, max_new_tokens=4)
        calls = counting_encoder(model)
        generated = attributor.attribute(picture(0), QUESTION)
        attributor.clear_reuse()  # else the answer's recording serves the map with no model pass at all
        forced = attributor.attribute(picture(0), QUESTION, answer=generated.metadata["answer"])
        assert len(calls) == 1 and attributor.image_features.hits == 1  # type: ignore[union-attr]
        attributor.image_features.clear()  # type: ignore[union-attr]
        attributor.clear_reuse()
        again = attributor.attribute(picture(0), QUESTION, answer=generated.metadata["answer"])
        assert len(calls) == 2
        np.testing.assert_array_equal(forced.raw, again.raw)  # the memo returns what the encoder returns


def test_other_images_training_and_gradients_run_the_encoder() -> None:
    model, processor = build_tiny_qwen2_vl(seed=0)
    attributor = LvlmAttributor.from_model(model, processor, layer=-1, max_new_tokens=2)
    calls = counting_encoder(model)
    attributor.attribute(picture(0), QUESTION, answer="red")
    attributor.attribute(picture(1), QUESTION, answer="red")  # same shape, other pixels
    assert len(calls) == 2
    inputs = attributor.family.prepare(model, processor, picture(0), QUESTION).inputs
    model(**inputs)  # gradients on: never from the memo
    model.train()
    with torch.no_grad():
        model(**inputs)
    model.eval()
    assert len(calls) == 4
    with torch.no_grad():
        model(**inputs)  # an eval, no-grad call equal to a held one
    assert len(calls) == 4


def test_the_memo_is_installed_once_and_only_where_there_is_an_encoder() -> None:
    model, _ = build_tiny_qwen2_vl(seed=0)
    assert share_image_features(model) is share_image_features(model)
    assert share_image_features(torch.nn.Linear(2, 2)) is None
