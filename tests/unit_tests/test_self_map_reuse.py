"""The self-map from the answer's own pass and from the prompt's KV cache, on tiny random LVLMs (CPU).

Checked for LLaVA-1.5 and Qwen2.5-VL: a map read from a recording of the chat model's generation equals
the map of a fresh teacher-forcing pass over the same prompt and answer tokens; teacher forcing that
continues the prompt's kept KV cache equals the plain pass step by step; another prompt, image, answer or
block misses the recording; recording leaves the chat model's replies unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from langchain_core.messages import HumanMessage
from PIL import Image

from agents.chat_models import ChatTransformersVLM
from api_tool.backends.lvlm import SCORED_FROM, LvlmAttributor, answer_recorder
from api_tool.backends.self_map_memo import answer_extends, self_map_memo
from api_tool.maps import AttributionMap
from tests.sample_images import noise, png_base64
from tests.tiny_lvlms.qwen2_vl import build_tiny_qwen2_vl
from tests.tiny_models import tiny_llava
from tests.tolerances import assert_sums_close

FORWARD_TERMS = 2048
"""About how many float32 terms the sums along one tiny forward pass hold (under 100 positions, widths up
to 128, two or three blocks): a cached decoding step and a full pass agree within that sum's band."""
LAYER = 1
QUESTION = "what is in the picture?"
FAMILIES = ("llava", "qwen2_5_vl")


@functools.cache
def tiny(family: str) -> tuple[torch.nn.Module, Any]:
    """A tiny model of ``family`` with its processor (built once per session)."""
    if family == "llava":
        built = tiny_llava(layers=3, seed=2)
        return built.model, built.processor
    return build_tiny_qwen2_vl(0, "qwen2_5_vl", layers=3)


def picture(family: str, seed: int = 3) -> Image.Image:
    """For LLaVA the square input size itself, so the chat model's resize-and-crop and the attributor's
    letterbox give equal pixels; for Qwen a non-square image (both resize the whole image alike)."""
    return noise(seed, (64, 64) if family == "llava" else (60, 36))


def attributor(family: str) -> LvlmAttributor:
    model, processor = tiny(family)
    fresh = LvlmAttributor.from_model(model, processor, layer=LAYER, max_new_tokens=4)
    fresh.clear_reuse()
    return fresh


def chat_model(family: str, **options: Any) -> ChatTransformersVLM:
    model, processor = tiny(family)
    return ChatTransformersVLM(model=f"tiny-{family}", hf_model=model, processor=processor, max_tokens=4, **options)


def ask(image: Image.Image, question: str = QUESTION) -> list[HumanMessage]:
    block = {"type": "image", "base64": png_base64(image), "mime_type": "image/png"}
    return [HumanMessage([block, {"type": "text", "text": question}])]


def assert_same_map(got: AttributionMap, expected: AttributionMap) -> None:
    assert {got.metadata["scored_from"], expected.metadata["scored_from"]} <= set(SCORED_FROM)
    assert got.metadata["step_tokens"] == expected.metadata["step_tokens"]
    assert_sums_close(got.raw, expected.raw, n_terms=FORWARD_TERMS)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chat_models_recorded_answer_gives_the_teacher_forced_map(family: str) -> None:
    scorer = attributor(family)
    vlm = chat_model(family, record_self_maps=True, self_map_layer=LAYER)
    image = picture(family)
    answer = vlm.invoke(ask(image)).text
    assert answer
    recorded = scorer.attribute(image, QUESTION, answer=answer)
    assert recorded.metadata["scored_from"] == "recording"
    scorer.clear_reuse()
    forced = scorer.attribute(image, QUESTION, answer=answer)
    assert forced.metadata["scored_from"] == "forward"
    assert recorded.metadata["steps"] == forced.metadata["steps"] >= 2
    assert_same_map(recorded, forced)
    first_word = answer.split()[0]
    assert_same_map(
        scorer.attribute(image, QUESTION, answer=answer, focus=first_word),
        attributor(family).attribute(image, QUESTION, answer=answer, focus=first_word),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_another_prompt_image_answer_or_block_misses_the_recording(family: str) -> None:
    model, processor = tiny(family)
    attributor(family)  # clears the model's recordings
    image = picture(family)
    answer = chat_model(family, record_self_maps=True, self_map_layer=LAYER).invoke(ask(image)).text
    changed = [
        (image, "where is the square?", answer, LAYER),
        (picture(family, seed=4), QUESTION, answer, LAYER),
        (image, QUESTION, f"{answer} {answer}", LAYER),
        (image, QUESTION, answer, LAYER + 1),
    ]
    for other_image, question, other_answer, layer in changed:  # a new attributor: no prompt cache either
        scorer = LvlmAttributor.from_model(model, processor, layer=layer, max_new_tokens=4)
        assert scorer.attribute(other_image, question, answer=other_answer).metadata["scored_from"] == "forward"
    scorer = LvlmAttributor.from_model(model, processor, layer=LAYER, max_new_tokens=4)
    assert scorer.attribute(image, QUESTION, answer=answer).metadata["scored_from"] == "recording"
    assert self_map_memo(model).lookup(LAYER, {}, []) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_recording_leaves_the_replies_unchanged(family: str) -> None:
    image = picture(family)
    plain = chat_model(family, record_self_maps=False).invoke(ask(image))
    recorded = chat_model(family).invoke(ask(image))
    assert recorded.content == plain.content
    assert recorded.usage_metadata == plain.usage_metadata
    recorder = chat_model(family, record_self_maps=True).self_map_recorder()
    model, processor = tiny(family)
    assert recorder is not None and recorder.layer == LvlmAttributor.from_model(model, processor).layer


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forcing_from_the_prompt_cache_equals_the_plain_pass(family: str) -> None:
    reusing, plain = attributor(family), attributor(family)
    image = picture(family)
    first = reusing.attribute(image, QUESTION, answer="a red circle")
    assert first.metadata["scored_from"] == "forward"
    for answer, focus in (("red circle left of a blue square", None), ("red circle left", "left"), ("", None)):
        continued = reusing.attribute(image, QUESTION, answer=answer, focus=focus)
        assert continued.metadata["scored_from"] == "prompt_cache"
        plain.clear_reuse()
        fresh = plain.attribute(image, QUESTION, answer=answer, focus=focus)
        assert fresh.metadata["scored_from"] == "forward"
        assert_same_map(continued, fresh)
    assert reusing.attribute(picture(family, 5), QUESTION, answer="a").metadata["scored_from"] == "forward"


def test_answer_extends_and_an_unserved_model_has_no_recorder() -> None:
    assert answer_extends((4, 5, 2), [4, 5]) and answer_extends((4,), [])
    assert not answer_extends((4, 5), [4, 6]) and not answer_extends((4,), [4, 5])
    assert answer_recorder(torch.nn.Linear(2, 2), None) is None
    model, processor = tiny("llava")
    recorder = answer_recorder(model, processor, layer=-1)
    assert recorder is not None and recorder.layer == 2
    assert np.isclose(recorder.attention.scaling, model.config.text_config.head_dim**-0.5)
