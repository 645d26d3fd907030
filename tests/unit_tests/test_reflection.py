"""The reflection loop with recording fake targets and a tiny CLIP: what reaches the target, keep vs revise."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from langchain_core.language_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from PIL import Image
from pydantic import Field

from agents.chat_models import ChatTransformersVLM
from agents.prompts import IMAGE_LABELS, parse_final_answer
from agents.reflection import (
    ReflectionResult,
    areflect,
    build_reflection_graph,
    default_tool,
    image_data_uri,
    normalize_answer,
    reflect,
)
from api_tool.errors import UnsupportedModelError
from api_tool.images import ImageRef, encode_image
from api_tool.maps import AttributionMap
from api_tool.tool import AttentionPromptTool
from tests.conftest import shared_tiny_attributor
from tests.tiny_models import tiny_llava

QUESTION = "What colour is the circle?"


class RecordingTarget(FakeMessagesListChatModel):
    """A fake target that replies from a script and records every message list it receives."""

    received: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> RecordingTarget:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        self.received.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def target(*replies: str) -> RecordingTarget:
    return RecordingTarget(responses=[AIMessage(reply) for reply in replies], received=[])


def scene(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8))


def clip_tool(**kwargs: Any) -> AttentionPromptTool:
    return AttentionPromptTool(attributor=shared_tiny_attributor(), max_side=None, **kwargs)


def blocks(message: BaseMessage) -> list[dict[str, Any]]:
    assert isinstance(message.content, list)
    return message.content  # type: ignore[return-value]


def png_block(image: Image.Image) -> dict[str, Any]:
    data, mime_type = encode_image(image, format="PNG")
    return {"type": "image", "base64": data, "mime_type": mime_type}


def test_verify_keeps_an_answer_it_confirms() -> None:
    image = scene()
    model = target("red", "The highlighted circle is red.\nFINAL: Red.")
    result = reflect(QUESTION, image, model, clip_tool())
    assert (result.first_answer, result.final_answer, result.changed) == ("red", "Red.", False)
    assert len(result.rounds) == 1 and result.rounds[0].parsed and not result.rounds[0].changed
    first_call, reask = model.received
    assert blocks(first_call[0]) == [png_block(image), {"type": "text", "text": QUESTION}]
    annotated = clip_tool().annotate(image, QUESTION).image
    assert blocks(reask[0])[:4] == [
        {"type": "text", "text": IMAGE_LABELS["original"]},
        png_block(image),
        {"type": "text", "text": IMAGE_LABELS["annotated"]},
        png_block(annotated),
    ]
    text = blocks(reask[0])[4]["text"]
    assert "Your first answer was: red" in text and f"Question: {QUESTION}" in text and "FINAL:" in text
    np.testing.assert_array_equal(np.asarray(result.annotated_images[0]), np.asarray(annotated))
    assert result.rounds[0].query == QUESTION and result.rounds[0].scored_answer is None


def test_verify_revises_a_wrong_answer() -> None:
    model = target("blue", "Looking again at the highlighted region...\n**Final answer:** red")
    result = reflect(QUESTION, scene(), model, clip_tool())
    assert (result.first_answer, result.final_answer, result.changed) == ("blue", "red", True)
    assert result.rounds[0].changed and len(model.received) == 2


def test_verify_without_a_final_line_keeps_the_previous_answer() -> None:
    result = reflect(QUESTION, scene(), target("blue", "I think it might be red or blue."), clip_tool())
    assert result.final_answer == "blue" and not result.changed
    assert not result.rounds[0].parsed
    assert result.rounds[0].reply == "I think it might be red or blue."


def test_rounds_continue_while_the_answer_changes_up_to_max_rounds() -> None:
    image = scene(1)
    model = target("a", "FINAL: b", "FINAL: c", "FINAL: d", "FINAL: e")
    result = reflect(QUESTION, image, model, clip_tool(), max_rounds=3)
    assert [r.answer for r in result.rounds] == ["b", "c", "d"]
    assert result.final_answer == "d" and len(model.received) == 4
    assert [r.query for r in result.rounds] == [QUESTION, f"{QUESTION} b", f"{QUESTION} c"]
    second_annotation = clip_tool().annotate(image, f"{QUESTION} b").image
    assert blocks(model.received[2][0])[3] == png_block(second_annotation)
    assert "Your first answer was: b" in blocks(model.received[2][0])[4]["text"]


def test_a_round_that_keeps_the_answer_ends_the_loop() -> None:
    model = target("a", "FINAL: b", "FINAL: B", "FINAL: never asked")
    result = reflect(QUESTION, scene(), model, clip_tool(), max_rounds=5)
    assert [r.answer for r in result.rounds] == ["b", "B"]
    assert result.final_answer == "B" and result.changed
    assert len(model.received) == 3


def test_masked_shows_only_the_annotated_image_and_the_question() -> None:
    image = scene(2)
    model = target("red", "green")
    result = reflect(QUESTION, image, model, clip_tool(gray_level=200), strategy="masked")
    annotated = clip_tool(gray_level=200).annotate(image, QUESTION).image
    assert blocks(model.received[1][0]) == [png_block(annotated), {"type": "text", "text": QUESTION}]
    assert result.final_answer == "green" and result.changed


def test_masked_hint_adds_the_hint() -> None:
    model = target("red", "red")
    result = reflect(QUESTION, scene(), model, clip_tool(), strategy="masked_hint")
    assert blocks(model.received[1][0])[-1]["text"] == (
        f"{QUESTION} (Hint: The answer is related to the unmasked visible regions.)"
    )
    assert not result.changed


class CountingAttributor:
    """Counts calls (and scores answers when asked): the tiny CLIP underneath."""

    name = "counting"

    def __init__(self) -> None:
        self.answers: list[str | None] = []

    def attribute(self, image: ImageRef, query: str, answer: str | None = None) -> AttributionMap:
        self.answers.append(answer)
        return shared_tiny_attributor().attribute(image, query)

    def attribute_batch(self, images: Any, queries: Any) -> list[AttributionMap]:
        return [self.attribute(image, query) for image, query in zip(images, queries)]

    def attribute_many(self, image: Any, queries: Any) -> list[AttributionMap]:
        return [self.attribute(image, query) for query in queries]


def test_iterative_reasks_with_the_original_image_and_no_annotation() -> None:
    image = scene(3)
    counting = CountingAttributor()
    model = target("red", "blue")
    result = reflect(QUESTION, image, model, AttentionPromptTool(attributor=counting), strategy="iterative")
    assert counting.answers == []
    reask = f"{QUESTION} \n Your previous answer is red. Evaluate the quality of the answer and provide a new answer."
    assert blocks(model.received[1][0]) == [png_block(image), {"type": "text", "text": reask}]
    assert result.final_answer == "blue" and result.annotated_images == [] and result.rounds[0].query is None


def test_an_answer_scoring_backend_scores_the_current_answer() -> None:
    counting = CountingAttributor()
    model = target("red", "FINAL: blue", "FINAL: blue")
    result = reflect(QUESTION, scene(), model, AttentionPromptTool(attributor=counting), max_rounds=2)
    assert counting.answers == ["red", "blue"]
    assert [(r.query, r.scored_answer) for r in result.rounds] == [(QUESTION, "red"), (QUESTION, "blue")]


def test_a_known_first_answer_skips_the_first_call() -> None:
    model = target("FINAL: red")
    result = reflect(QUESTION, scene(), model, clip_tool(), first_answer="blue")
    assert len(model.received) == 1
    assert "Your first answer was: blue" in blocks(model.received[0][0])[4]["text"]
    assert result.first_answer == "blue" and result.final_answer == "red" and result.timings["answer"] == 0.0


def test_system_prompt_goes_with_every_call() -> None:
    model = target("red", "FINAL: red")
    reflect(QUESTION, scene(), model, clip_tool(), system_prompt="Answer in one word.")
    assert all(call[0] == SystemMessage("Answer in one word.") for call in model.received)
    assert all(isinstance(call[1], HumanMessage) for call in model.received)


def test_timings_and_trace() -> None:
    result = reflect(QUESTION, scene(), target("red", "FINAL: red"), clip_tool())
    assert set(result.timings) == {"answer", "annotate", "reflect", "total"}
    assert result.timings["total"] >= result.timings["annotate"] > 0
    assert result.rounds[0].timings["annotate"] == result.timings["annotate"]
    assert result.strategy == "verify" and result.question == QUESTION


async def test_async_loop_matches_the_sync_loop() -> None:
    image = scene(4)
    sync_result = reflect(QUESTION, image, target("a", "FINAL: b", "FINAL: b"), clip_tool(), max_rounds=2)
    async_model = target("a", "FINAL: b", "FINAL: b")
    async_result = await areflect(QUESTION, image, async_model, clip_tool(), max_rounds=2)
    assert [r.answer for r in async_result.rounds] == [r.answer for r in sync_result.rounds] == ["b", "b"]
    assert [r.prompt for r in async_result.rounds] == [r.prompt for r in sync_result.rounds]
    for a, b in zip(async_result.annotated_images, sync_result.annotated_images):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(async_model.received) == 3


def test_graph_shape_and_direct_use() -> None:
    graph = build_reflection_graph(target("red", "FINAL: red"), clip_tool())
    assert set(graph.get_graph().nodes) == {"__start__", "answer", "annotate", "reflect", "__end__"}
    state = graph.invoke({"question": QUESTION, "image": image_data_uri(scene())})
    assert state["answer"] == "red" and state["round"] == 1 and len(state["trace"]) == 1
    result = ReflectionResult.from_state(state, "verify", 1.0)
    assert result.final_answer == "red" and result.timings["total"] == 1.0


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown reflection strategy"):
        build_reflection_graph(target(), clip_tool(), strategy="shout")
    with pytest.raises(ValueError, match="max_rounds must be at least 1"):
        build_reflection_graph(target(), clip_tool(), max_rounds=0)
    with pytest.raises(UnsupportedModelError, match="self_attribution=True needs"):
        default_tool(target(), self_attribution=True)


def test_self_mode_uses_the_targets_own_llava() -> None:
    tiny = tiny_llava(layers=2)
    vlm = ChatTransformersVLM(model="tiny", hf_model=tiny.model, processor=tiny.processor)
    tool = default_tool(vlm)
    assert tool.backend.name == "llava"
    assert tool.backend.model is tiny.model
    assert tool.backend.layer == 1  # the middle of 2 blocks: the paper's block 20 does not exist
    assert default_tool(vlm, self_attribution=False).attributor is None


def test_helpers() -> None:
    assert normalize_answer(" Red, mostly! ") == "red mostly"
    assert parse_final_answer("reasoning\nFINAL: a\nmore\nFinal: b") == "b"
    assert parse_final_answer("final : red") == "red"
    assert parse_final_answer("FINAL:   ") is None
