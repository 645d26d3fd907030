"""End to end, offline: the reflection loop with a tiny local LLaVA as the target and a tiny CLIP (or the
LLaVA itself) as the attributor. Random weights, so the answers are noise; the checks are that every
step of the loop is the model's own deterministic output on exactly the messages the loop built."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import open_clip
from langchain_core.messages import BaseMessage, HumanMessage
from PIL import Image
from pydantic import Field

from agents.chat_models import ChatTransformersVLM
from agents.reflection import areflect, reflect
from api_tool.backends.clip import ClipAttributor
from api_tool.backends.llava import LlavaAttributor
from api_tool.images import encode_image
from api_tool.prompt import attention_prompt
from api_tool.tool import AttentionPromptTool
from tests.conftest import build_tiny_clip
from tests.tiny_models import TinyLlava, tiny_llava

QUESTION = "what colour is the circle?"


@cache
def shared_tiny() -> TinyLlava:
    return tiny_llava(layers=2, seed=1)


class RecordingVLM(ChatTransformersVLM):
    """The real local chat model, also keeping every message list it was asked about."""

    received: list[list[BaseMessage]] = Field(default_factory=list)

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        self.received.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def local_target() -> RecordingVLM:
    tiny = shared_tiny()
    return RecordingVLM(model="tiny-llava", hf_model=tiny.model, processor=tiny.processor, max_tokens=6, received=[])


def scene() -> Image.Image:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 60, size=(60, 90, 3), dtype=np.uint8))
    image.paste((230, 30, 30), (50, 10, 80, 40))
    return image


def fresh_reply(messages: list[BaseMessage]) -> str:
    tiny = shared_tiny()
    fresh = ChatTransformersVLM(model="fresh", hf_model=tiny.model, processor=tiny.processor, max_tokens=6)
    return str(fresh.invoke(messages).content).strip()


def tiny_clip_tool() -> AttentionPromptTool:
    attributor = ClipAttributor(
        "tiny", model=build_tiny_clip(), tokenizer=open_clip.get_tokenizer("ViT-B-32"), device="cpu", layer=-2
    )
    return AttentionPromptTool(attributor=attributor, max_side=None)


def check_loop(result: Any, target: RecordingVLM, image: Image.Image, expected_annotated: Image.Image) -> None:
    first_call, reask = target.received[:2]
    assert result.first_answer == fresh_reply(first_call)
    assert result.rounds[0].reply == fresh_reply(reask)
    data, _ = encode_image(expected_annotated)
    assert reask[0].content[3]["base64"] == data
    assert f"Your first answer was: {result.first_answer}" in reask[0].content[4]["text"]
    np.testing.assert_array_equal(np.asarray(result.annotated_images[0]), np.asarray(expected_annotated))
    assert result.timings["total"] > 0


def test_loop_with_local_llava_target_and_tiny_clip() -> None:
    image, target, tool = scene(), local_target(), tiny_clip_tool()
    result = reflect(QUESTION, image, target, tool, max_rounds=2)
    expected = attention_prompt(image, QUESTION, attributor=tool.backend).image
    check_loop(result, target, image, expected)
    assert len(result.rounds) == (2 if result.rounds[0].changed else 1)  # another round only after a change
    assert result.final_answer == result.rounds[-1].answer
    assert len(target.received) == 1 + len(result.rounds)


def test_self_mode_scores_the_first_answer_with_the_same_llava() -> None:
    image, target = scene(), local_target()
    result = reflect(QUESTION, image, target, max_rounds=1)
    round_one = result.rounds[0]
    assert round_one.scored_answer == result.first_answer
    attributor = LlavaAttributor.from_model(shared_tiny().model, shared_tiny().processor, layer=1)
    attribution = attributor.attribute(image, QUESTION, answer=result.first_answer)
    expected = attention_prompt(image, QUESTION, attributor=_Fixed(attribution)).image
    check_loop(result, target, image, expected)


class _Fixed:
    """An attributor that returns one precomputed map (to render the expected image the loop should show)."""

    name = "fixed"

    def __init__(self, attribution: Any) -> None:
        self.attribution = attribution

    def attribute(self, image: Any, query: str) -> Any:
        return self.attribution

    def attribute_batch(self, images: Any, queries: Any) -> list[Any]:
        return [self.attribution for _ in queries]

    def attribute_many(self, image: Any, queries: Any) -> list[Any]:
        return [self.attribution for _ in queries]


async def test_async_masked_loop_with_local_llava() -> None:
    image, target, tool = scene(), local_target(), tiny_clip_tool()
    result = await areflect(QUESTION, image, target, tool, strategy="masked")
    reask = target.received[1]
    assert isinstance(reask[0], HumanMessage) and len(reask[0].content) == 2
    assert result.final_answer == (fresh_reply(reask) or result.first_answer)
