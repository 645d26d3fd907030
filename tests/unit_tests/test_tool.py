"""AttentionPromptTool: content and artifact, images from the conversation, errors, async, agents."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np
import pytest
from langchain.agents import create_agent
from langchain.tools import ToolRuntime
from langchain_core.language_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_tests.unit_tests import ToolsUnitTests
from PIL import Image
from pydantic import Field

from api_tool.backends.clip import ClipAttributor
from api_tool.images import ImageRef, encode_image, load_image
from api_tool.maps import AttributionMap
from api_tool.prompt import attention_prompt
from api_tool.tool import (
    AnswerScoringAttributor,
    AttentionPromptTool,
    conversation_image_index,
    image_source,
    scores_answers,
    user_image_sources,
)
from tests.conftest import shared_tiny_attributor
from tests.sample_images import decode_block, noise, png_base64


def tool_call(args: dict[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {"type": "tool_call", "id": call_id, "name": "attention_prompt", "args": args}


def runtime_with(messages: list[BaseMessage]) -> ToolRuntime:
    return ToolRuntime(
        state={"messages": messages},
        context=None,
        config={},
        stream_writer=lambda _: None,
        tool_call_id="c",
        store=None,
    )


def user_message(text: str, *images: Image.Image) -> HumanMessage:
    blocks: list[Any] = [{"type": "text", "text": text}]
    blocks += [{"type": "image", "base64": png_base64(image), "mime_type": "image/png"} for image in images]
    return HumanMessage(content=blocks)


class TestAttentionPromptToolStandard(ToolsUnitTests):
    @property
    def tool_constructor(self) -> type[AttentionPromptTool]:
        return AttentionPromptTool

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"attributor": shared_tiny_attributor(), "max_side": 64}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return {"question": "where is the red square?", "image": png_base64(noise(1))}


@pytest.fixture
def tool() -> AttentionPromptTool:
    return AttentionPromptTool(attributor=shared_tiny_attributor(), max_side=None)


def test_schema_shows_question_and_image_but_hides_runtime(tool: AttentionPromptTool) -> None:
    schema = tool.tool_call_schema.model_json_schema()
    assert set(schema["properties"]) == {"question", "image"}
    assert schema["required"] == ["question"]
    assert tool.name == "attention_prompt"
    assert tool.response_format == "content_and_artifact"
    assert tool.handle_tool_error is True


def test_content_is_text_then_the_exact_prompted_image(tool: AttentionPromptTool) -> None:
    image = noise(2)
    message = tool.invoke(tool_call({"question": "where is the cat?", "image": png_base64(image)}))
    assert isinstance(message, ToolMessage) and message.status == "success"
    text, block = message.content
    assert text["type"] == "text" and "'where is the cat?'" in text["text"] and "clip (tiny)" in text["text"]
    assert block["type"] == "image" and block["mime_type"] == "image/png"
    expected = attention_prompt(image, "where is the cat?", attributor=shared_tiny_attributor(), gray_level=0)
    np.testing.assert_array_equal(np.asarray(decode_block(block)), np.asarray(expected.image))
    np.testing.assert_array_equal(message.artifact["mask"], expected.mask)
    assert isinstance(message.artifact["map"], AttributionMap)
    np.testing.assert_array_equal(message.artifact["map"].mask, expected.map.mask)
    assert message.artifact["image_size"] == (80, 48)
    assert message.artifact["style"] == "gray" and message.artifact["gray_level"] == 0
    assert message.artifact["image_source"] == "the given image"
    assert set(message.artifact["timings"]) >= {"attribute", "render", "total"}


def test_plain_invoke_returns_the_content_only(tool: AttentionPromptTool) -> None:
    content = tool.invoke({"question": "where is the cat?", "image": png_base64(noise(2))})
    assert [block["type"] for block in content] == ["text", "image"]


def test_max_side_downscales_the_returned_image_keeping_its_aspect() -> None:
    tool = AttentionPromptTool(attributor=shared_tiny_attributor(), max_side=40, gray_level=128, style="heatmap")
    message = tool.invoke(tool_call({"question": "a dog", "image": png_base64(noise(3))}))
    image = decode_block(message.content[1])
    assert image.size == (40, 24)
    full = attention_prompt(noise(3), "a dog", attributor=shared_tiny_attributor(), style="heatmap", gray_level=128)
    expected_b64, _ = encode_image(full.image, max_side=40)
    assert message.content[1]["base64"] == expected_b64
    assert message.artifact["mask"].shape == (48, 80)


def test_jpeg_output_has_the_jpeg_mime_type() -> None:
    tool = AttentionPromptTool(attributor=shared_tiny_attributor(), image_format="JPEG")
    message = tool.invoke(tool_call({"question": "a dog", "image": png_base64(noise(3))}))
    assert message.content[1]["mime_type"] == "image/jpeg"
    assert decode_block(message.content[1]).size == (80, 48)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [(None, 1), ("latest", 1), ("conversation:1", 0), ("conversation:2", 1), ("conversation:-2", 0), ("image 1", 0)],
)
def test_image_is_taken_from_the_conversation(tool: AttentionPromptTool, reference: str | None, expected: int) -> None:
    images = [noise(10), noise(11, size=(64, 64))]
    messages = [user_message("first", images[0]), AIMessage("ok"), user_message("second", images[1])]
    args: dict[str, Any] = {"question": "the cat", "runtime": runtime_with(messages)}
    if reference is not None:
        args["image"] = reference
    content, artifact = tool._run(**args)
    direct, _ = tool._run(question="the cat", image=png_base64(images[expected]))
    assert content[1]["base64"] == direct[1]["base64"]
    assert artifact["image_source"] == f"user image {expected + 1} of 2 in the conversation"


def test_tool_images_in_the_conversation_are_not_user_images() -> None:
    image_block = {"type": "image", "base64": png_base64(noise(1)), "mime_type": "image/png"}
    messages = [
        HumanMessage([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]),
        ToolMessage(content=[image_block], tool_call_id="c"),
    ]
    assert user_image_sources(messages) == ["https://x/y.png"]


def test_conversation_references() -> None:
    assert [conversation_image_index(r) for r in (None, "", "LAST", "conversation:3", "#-1", "x.png")] == [
        -1,
        -1,
        -1,
        2,
        None,
        None,
    ]
    assert image_source({"type": "image", "source_type": "base64", "data": "AAAA", "mime_type": "image/jpeg"}) == (
        "data:image/jpeg;base64,AAAA"
    )
    assert (
        image_source({"type": "image_url", "image_url": "data:image/png;base64,QQ=="}) == "data:image/png;base64,QQ=="
    )
    assert image_source({"type": "image", "file_id": "f"}) is None


@pytest.mark.parametrize(
    ("args", "runtime_messages", "fragment"),
    [
        ({"question": "x"}, None, "no image was given and the conversation holds no user image"),
        ({"question": "x"}, [HumanMessage("text only")], "no image was given"),
        ({"question": "x", "image": "conversation:3"}, "two", "holds 2 user image(s)"),
        ({"question": "x", "image": "conversation:0"}, "two", "start at 1"),
        ({"question": "x", "image": "missing/file.png"}, None, "this tool reads no files named in a tool call"),
        ({"question": "x", "image": "https://example.com/a.png"}, None, "remote image URLs are disabled"),
        (
            {"question": "x", "image": base64.b64encode(b"not an image at all, just text").decode()},
            None,
            "not an image",
        ),
        ({"question": "   ", "image": "conversation:1"}, "two", "the query is empty"),
    ],
)
def test_bad_input_becomes_an_error_tool_message(
    tool: AttentionPromptTool, args: dict[str, Any], runtime_messages: Any, fragment: str
) -> None:
    if runtime_messages == "two":
        runtime_messages = [user_message("a", noise(1)), user_message("b", noise(2))]
    if runtime_messages is not None:
        args = {**args, "runtime": runtime_with(runtime_messages)}
    message = tool.invoke(tool_call(args))
    assert isinstance(message, ToolMessage)
    assert message.status == "error"
    assert fragment in message.content


def test_options_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="Input should be 'gray', 'heatmap'"):
        AttentionPromptTool(style="sepia")
    with pytest.raises(ValueError, match="attributor must be an Attributor"):
        AttentionPromptTool(attributor=42)
    with pytest.raises(ValueError):
        AttentionPromptTool(gray_level=300)


def test_attributor_spec_is_resolved_lazily_and_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, dict[str, Any]]] = []

    def fake_get_attributor(spec: Any, **options: Any) -> ClipAttributor:
        calls.append((spec, options))
        return shared_tiny_attributor()

    monkeypatch.setattr("api_tool.tool.get_attributor", fake_get_attributor)
    tool = AttentionPromptTool(attributor="clip:ViT-B-32@openai", attributor_options={"layer": -3})
    assert calls == []
    image = png_base64(noise(4))
    tool.invoke({"question": "a", "image": image})
    tool.invoke({"question": "b", "image": image})
    assert calls == [("clip:ViT-B-32@openai", {"layer": -3})]
    assert tool.backend is shared_tiny_attributor()


def test_unknown_spec_is_reported_to_the_model() -> None:
    tool = AttentionPromptTool(attributor="nonsense-backend-name")
    message = tool.invoke(tool_call({"question": "a", "image": png_base64(noise(4))}))
    assert message.status == "error"
    assert "unknown attributor" in message.content


class RecordingAnswerAttributor:
    """An Attributor that can score answers: a real tiny-CLIP map, and a record of the answers asked."""

    name = "recorder"

    def __init__(self) -> None:
        self.answers: list[str | None] = []

    def attribute(self, image: ImageRef, query: str, answer: str | None = None) -> AttributionMap:
        self.answers.append(answer)
        return shared_tiny_attributor().attribute(image, query if answer is None else f"{query} {answer}")

    def attribute_batch(self, images: Any, queries: Any) -> list[AttributionMap]:
        return [self.attribute(image, query) for image, query in zip(images, queries)]

    def attribute_many(self, image: Any, queries: Any) -> list[AttributionMap]:
        return [self.attribute(image, query) for query in queries]


def test_annotate_scores_the_answer_only_with_backends_that_take_one() -> None:
    recorder = RecordingAnswerAttributor()
    assert scores_answers(recorder) and not scores_answers(shared_tiny_attributor())
    tool = AttentionPromptTool(attributor=recorder)
    result = tool.annotate(noise(5), "what colour?", answer="red")
    assert recorder.answers == ["red"]
    expected = attention_prompt(noise(5), "what colour? red", attributor=shared_tiny_attributor())
    np.testing.assert_array_equal(result.mask, expected.mask)
    clip_tool = AttentionPromptTool(attributor=shared_tiny_attributor())
    ignored = clip_tool.annotate(noise(5), "what colour?", answer="red")
    plain = attention_prompt(noise(5), "what colour?", attributor=shared_tiny_attributor())
    np.testing.assert_array_equal(ignored.mask, plain.mask)
    assert AnswerScoringAttributor(recorder, "blue").name == "recorder+answer"


class SlowAttributor(RecordingAnswerAttributor):
    def attribute(self, image: ImageRef, query: str, answer: str | None = None) -> AttributionMap:
        time.sleep(0.3)
        return super().attribute(image, query, answer)


async def test_arun_does_not_block_the_event_loop() -> None:
    tool = AttentionPromptTool(attributor=SlowAttributor())
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    message = await tool.ainvoke(tool_call({"question": "a", "image": png_base64(noise(6))}))
    task.cancel()
    assert message.status == "success"
    assert ticks >= 10


async def test_async_bad_input_becomes_an_error_tool_message(tool: AttentionPromptTool) -> None:
    message = await tool.ainvoke(tool_call({"question": "x"}))
    assert message.status == "error" and "no image was given" in message.content


async def test_async_result_equals_sync_result(tool: AttentionPromptTool) -> None:
    args = {"question": "where is the cat?", "image": png_base64(noise(7))}
    sync_message = tool.invoke(tool_call(args))
    async_message = await tool.ainvoke(tool_call(args))
    assert async_message.content[1] == sync_message.content[1]
    np.testing.assert_array_equal(async_message.artifact["mask"], sync_message.artifact["mask"])


class ScriptedChatModel(FakeMessagesListChatModel):
    """Replies from a script and records every message list it receives; tools bind to itself."""

    received: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        self.received.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def call(args: dict[str, Any], call_id: str) -> AIMessage:
    return AIMessage("", tool_calls=[{"name": "attention_prompt", "args": args, "id": call_id, "type": "tool_call"}])


def test_inside_create_agent_the_user_image_is_used_and_errors_do_not_crash(tool: AttentionPromptTool) -> None:
    model = ScriptedChatModel(
        responses=[call({"question": "where is the cat?"}, "c1"), call({"question": ""}, "c2"), AIMessage("done")],
        received=[],
    )
    agent = create_agent(model, [tool])
    image = noise(8)
    result = agent.invoke({"messages": [user_message("where is the cat?", image)]})
    tool_messages = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.status for m in tool_messages] == ["success", "error"]
    expected = attention_prompt(image, "where is the cat?", attributor=shared_tiny_attributor())
    np.testing.assert_array_equal(np.asarray(decode_block(tool_messages[0].content[1])), np.asarray(expected.image))
    assert tool_messages[0].artifact["image_source"] == "user image 1 of 1 in the conversation"
    assert "the query is empty" in tool_messages[1].content
    assert result["messages"][-1].content == "done"
    assert len(model.received) == 3


def test_loaded_image_reference_round_trip(tool: AttentionPromptTool) -> None:
    image = noise(9)
    data_uri = f"data:image/png;base64,{png_base64(image)}"
    content_from_uri, _ = tool._run(question="q", image=data_uri)
    content_from_b64, _ = tool._run(question="q", image=png_base64(image))
    assert content_from_uri[1] == content_from_b64[1]
    np.testing.assert_array_equal(np.asarray(load_image(data_uri)), np.asarray(image))


def test_missing_weights_reach_the_agent_as_an_error_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from api_tool.backends import clip as clip_module

    monkeypatch.setattr(clip_module, "hub_reachable", lambda: False)
    monkeypatch.setattr(clip_module, "_cached_checkpoint", lambda cfg: None)
    tool = AttentionPromptTool(attributor="clip:ViT-B-32@openai")
    call = {"type": "tool_call", "id": "w1", "name": "attention_prompt", "args": {"question": "a cat?"}}
    call["args"]["image"] = png_base64(noise(2))
    message = tool.invoke(call)
    assert isinstance(message, ToolMessage) and message.status == "error"
    assert "not in the local cache" in message.content


QUESTION_HELP = "The user's question (or the thing to look for)"


@pytest.mark.parametrize("args", [{}, {"image": "conversation:1"}])
def test_a_missing_question_is_an_error_message_naming_it(tool: AttentionPromptTool, args: dict[str, Any]) -> None:
    message = tool.invoke(tool_call(args))
    assert isinstance(message, ToolMessage) and message.status == "error" and message.tool_call_id == "call_1"
    assert message.content.startswith("attention_prompt was called with invalid arguments: `question` is required")
    assert QUESTION_HELP in message.content


async def test_async_missing_question_is_an_error_message(tool: AttentionPromptTool) -> None:
    message = await tool.ainvoke(tool_call({}))
    assert message.status == "error" and "`question` is required" in message.content


@pytest.mark.parametrize(
    ("question", "fragment"),
    [
        (3, "`question`: Input should be a valid string"),
        ("", "`question`: the query is empty; ask a question about the image, e.g. 'where is the cat?'"),
        ("  \n ", "`question`: the query is empty"),
    ],
)
def test_a_bad_question_is_reported_before_the_image_is_looked_for(
    tool: AttentionPromptTool, question: object, fragment: str
) -> None:
    message = tool.invoke(tool_call({"question": question}))
    assert message.status == "error"
    assert fragment in message.content and QUESTION_HELP in message.content
    assert "no image was given" not in message.content


def test_inside_create_agent_the_model_reads_which_argument_is_missing(tool: AttentionPromptTool) -> None:
    model = ScriptedChatModel(responses=[call({}, "c1"), AIMessage("done")], received=[])
    result = create_agent(model, [tool]).invoke({"messages": [user_message("where is the cat?", noise(8))]})
    (tool_message,) = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert tool_message.status == "error" and "`question` is required" in tool_message.content
    assert model.received[1][-1].content == tool_message.content
