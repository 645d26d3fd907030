"""ImageToolMessageMiddleware: exact rewritten messages, trimming, and the payloads real backends would send."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, ModelResponse
from langchain_core.language_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from PIL import Image
from pydantic import Field

from agents.middleware import (
    DROPPED_IMAGE_NOTE,
    ImageToolMessageMiddleware,
    accepts_tool_message_images,
    downscale_image_block,
    hoist_tool_images,
)
from tests.sample_images import noise, png_base64


def png_b64(size: tuple[int, int], seed: int = 0) -> str:
    return png_base64(noise(seed, size))


def image_block(data: str) -> dict[str, Any]:
    return {"type": "image", "base64": data, "mime_type": "image/png"}


def block_size(block: dict[str, Any]) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(block["base64"]))).size


def calls(*ids: str) -> AIMessage:
    return AIMessage(
        "",
        tool_calls=[{"name": "attention_prompt", "args": {"question": "q"}, "id": i, "type": "tool_call"} for i in ids],
    )


def tool_result(call_id: str, data: str, text: str = "highlighted") -> ToolMessage:
    return ToolMessage(
        content=[{"type": "text", "text": text}, image_block(data)], tool_call_id=call_id, name="attention_prompt"
    )


USER_IMAGE = png_b64((8, 8), seed=1)
IMG_A = png_b64((16, 12), seed=2)
IMG_B = png_b64((12, 16), seed=3)


def conversation() -> list[BaseMessage]:
    return [
        HumanMessage([{"type": "text", "text": "what is it?"}, image_block(USER_IMAGE)]),
        calls("c1", "c2"),
        tool_result("c1", IMG_A, "first map"),
        tool_result("c2", IMG_B, "second map"),
    ]


def test_images_of_a_run_of_tool_messages_move_into_one_user_message() -> None:
    original = conversation()
    out = hoist_tool_images(original)
    assert out[:2] == original[:2]
    assert out[0] is original[0] and out[1] is original[1]
    assert [type(m) for m in out] == [HumanMessage, AIMessage, ToolMessage, ToolMessage, HumanMessage]
    assert out[2].content == "first map\n(image 1 is in the next user message)"
    assert out[3].content == "second map\n(image 2 is in the next user message)"
    assert (out[2].tool_call_id, out[3].tool_call_id) == ("c1", "c2")
    assert out[4].content == [
        {"type": "text", "text": "Image 1, returned by the attention_prompt tool call c1:"},
        image_block(IMG_A),
        {"type": "text", "text": "Image 2, returned by the attention_prompt tool call c2:"},
        image_block(IMG_B),
    ]
    assert original[2].content[1] == image_block(IMG_A)


def test_the_user_message_comes_after_the_run_and_before_the_next_message() -> None:
    messages = [*conversation(), AIMessage("it is a cat"), HumanMessage("thanks")]
    out = hoist_tool_images(messages)
    assert [m.type for m in out] == ["human", "ai", "tool", "tool", "human", "ai", "human"]
    assert out[5].content == "it is a cat"


def test_messages_without_tool_images_are_returned_unchanged() -> None:
    messages = [
        HumanMessage([{"type": "text", "text": "q"}, image_block(USER_IMAGE)]),
        calls("c1"),
        ToolMessage(content="text only", tool_call_id="c1"),
    ]
    out = hoist_tool_images(messages)
    assert all(a is b for a, b in zip(out, messages)) and len(out) == 3


def test_openai_style_image_blocks_are_moved_too() -> None:
    url_block = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMG_A}"}}
    messages = [calls("c1"), ToolMessage(content=[url_block], tool_call_id="c1")]
    out = hoist_tool_images(messages)
    assert out[1].content == "(image 1 is in the next user message)"
    assert out[2].content == [{"type": "text", "text": "Image 1, returned by the tool call c1:"}, url_block]


def test_only_the_newest_images_are_kept() -> None:
    messages: list[BaseMessage] = []
    for index, data in enumerate([IMG_A, IMG_B, USER_IMAGE]):
        messages += [calls(f"c{index}"), tool_result(f"c{index}", data, f"map {index}")]
    out = hoist_tool_images(messages, keep_last=2, history_max_side=None)
    assert [m.type for m in out] == ["ai", "tool", "ai", "tool", "human", "ai", "tool", "human"]
    assert out[1].content == f"map 0\n{DROPPED_IMAGE_NOTE}"
    assert out[4].content[1] == image_block(IMG_B)
    assert out[7].content[1] == image_block(USER_IMAGE)
    none_kept = hoist_tool_images(messages, keep_last=0)
    assert [m.type for m in none_kept] == ["ai", "tool"] * 3
    assert all(DROPPED_IMAGE_NOTE in m.content for m in none_kept if isinstance(m, ToolMessage))


def test_older_images_are_downscaled_and_the_newest_run_is_not() -> None:
    big_old, big_new = png_b64((200, 100), seed=4), png_b64((300, 150), seed=5)
    messages = [calls("c1"), tool_result("c1", big_old), HumanMessage("more"), calls("c2"), tool_result("c2", big_new)]
    out = hoist_tool_images(messages, history_max_side=50)
    old_block, new_block = out[2].content[1], out[6].content[1]
    assert block_size(old_block) == (50, 25)
    assert new_block == image_block(big_new)
    assert block_size(downscale_image_block(image_block(big_old), 500)) == (200, 100)
    assert downscale_image_block({"type": "image", "url": "https://x/y.png"}, 10) == {
        "type": "image",
        "url": "https://x/y.png",
    }


def test_without_hoisting_images_stay_in_tool_messages_but_are_trimmed() -> None:
    messages = [calls("c1"), tool_result("c1", IMG_A), calls("c2"), tool_result("c2", IMG_B)]
    out = hoist_tool_images(messages, hoist=False, keep_last=1, history_max_side=None)
    assert [m.type for m in out] == ["ai", "tool", "ai", "tool"]
    assert out[1].content == [{"type": "text", "text": "highlighted"}, {"type": "text", "text": DROPPED_IMAGE_NOTE}]
    assert out[3].content == [{"type": "text", "text": "highlighted"}, image_block(IMG_B)]


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        ImageToolMessageMiddleware(mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep_last"):
        ImageToolMessageMiddleware(keep_last=-1)
    with pytest.raises(ValueError, match="history_max_side"):
        hoist_tool_images(conversation(), history_max_side=0)


def chat_openai(**kwargs: Any) -> Any:
    return pytest.importorskip("langchain_openai").ChatOpenAI(model="gpt-4o", api_key="test", **kwargs)


def chat_ollama() -> Any:
    return pytest.importorskip("langchain_ollama").ChatOllama(model="llava")


def test_when_images_are_hoisted() -> None:
    plain = FakeMessagesListChatModel(responses=[])
    capable = FakeMessagesListChatModel(responses=[], profile={"image_tool_message": True})
    assert not accepts_tool_message_images(plain)
    assert accepts_tool_message_images(capable)
    assert not accepts_tool_message_images(chat_openai())
    assert accepts_tool_message_images(chat_openai(use_responses_api=True))
    assert not accepts_tool_message_images(chat_ollama())
    assert ImageToolMessageMiddleware().should_hoist(plain)
    assert not ImageToolMessageMiddleware().should_hoist(capable)
    assert ImageToolMessageMiddleware(mode="always").should_hoist(capable)
    assert not ImageToolMessageMiddleware(mode="never").should_hoist(plain)


def rewritten(model: Any, messages: list[BaseMessage]) -> list[BaseMessage]:
    request = ModelRequest(model=model, messages=messages, system_message=SystemMessage("sys"))
    return ImageToolMessageMiddleware().rewrite_request(request).messages


def test_chat_completions_payload_puts_tool_images_in_a_user_message() -> None:
    model = chat_openai()
    payload = model._get_request_payload(rewritten(model, conversation()))
    roles = [m["role"] for m in payload["messages"]]
    assert roles == ["user", "assistant", "tool", "tool", "user"]
    for message in payload["messages"]:
        if message["role"] == "tool":
            assert isinstance(message["content"], str)
    assert payload["messages"][2] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "first map\n(image 1 is in the next user message)",
    }
    assert payload["messages"][4]["content"] == [
        {"type": "text", "text": "Image 1, returned by the attention_prompt tool call c1:"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMG_A}"}},
        {"type": "text", "text": "Image 2, returned by the attention_prompt tool call c2:"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMG_B}"}},
    ]


def test_responses_api_payload_keeps_images_in_the_function_output() -> None:
    model = chat_openai(use_responses_api=True)
    payload = model._get_request_payload(rewritten(model, conversation()))
    outputs = [item for item in payload["input"] if item.get("type") == "function_call_output"]
    assert [item["call_id"] for item in outputs] == ["c1", "c2"]
    assert outputs[0]["output"][1] == {"type": "input_image", "image_url": f"data:image/png;base64,{IMG_A}"}


def test_ollama_payload_has_the_images_on_the_user_message() -> None:
    model = chat_ollama()
    sent = model._convert_messages_to_ollama_messages(rewritten(model, conversation()))
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool", "user"]
    assert sent[2]["images"] == [] and sent[3]["images"] == []
    assert sent[2]["content"] == "first map\n(image 1 is in the next user message)"
    assert sent[4]["images"] == [IMG_A, IMG_B]
    assert "Image 1, returned by the attention_prompt tool call c1:" in sent[4]["content"]
    unrewritten = model._convert_messages_to_ollama_messages(conversation())
    assert unrewritten[2]["images"] == [IMG_A]


class RecordingModel(FakeMessagesListChatModel):
    received: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> RecordingModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        self.received.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


@tool(response_format="content_and_artifact")
def picture(question: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Returns a picture."""
    return [{"type": "text", "text": f"picture for {question}"}, image_block(IMG_A)], {"question": question}


def agent_and_model() -> tuple[Any, RecordingModel]:
    model = RecordingModel(
        responses=[
            AIMessage("", tool_calls=[{"name": "picture", "args": {"question": "q"}, "id": "c9", "type": "tool_call"}]),
            AIMessage("final"),
        ],
        received=[],
    )
    return create_agent(model, [picture], middleware=[ImageToolMessageMiddleware()]), model


def check_agent_run(result: dict[str, Any], model: RecordingModel) -> None:
    second_request = model.received[1]
    assert [m.type for m in second_request] == ["human", "ai", "tool", "human"]
    assert second_request[2].content == "picture for q\n(image 1 is in the next user message)"
    assert second_request[3].content[1] == image_block(IMG_A)
    state_tool = next(m for m in result["messages"] if isinstance(m, ToolMessage))
    assert state_tool.content[1] == image_block(IMG_A)
    assert [m.type for m in result["messages"]] == ["human", "ai", "tool", "ai"]


def test_inside_create_agent_only_the_request_is_rewritten() -> None:
    agent, model = agent_and_model()
    check_agent_run(agent.invoke({"messages": [HumanMessage("go")]}), model)


async def test_inside_create_agent_async() -> None:
    agent, model = agent_and_model()
    check_agent_run(await agent.ainvoke({"messages": [HumanMessage("go")]}), model)


def test_wrap_model_call_passes_the_rewritten_request_to_the_handler() -> None:
    seen: list[ModelRequest] = []

    def handler(request: ModelRequest) -> ModelResponse:
        seen.append(request)
        return ModelResponse(result=[AIMessage("ok")])

    request = ModelRequest(model=FakeMessagesListChatModel(responses=[]), messages=conversation())
    ImageToolMessageMiddleware().wrap_model_call(request, handler)
    assert [m.type for m in seen[0].messages] == ["human", "ai", "tool", "tool", "human"]
    assert [m.type for m in request.messages] == ["human", "ai", "tool", "tool"]
