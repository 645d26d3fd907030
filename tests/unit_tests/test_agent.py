"""create_api_agent: tool, middleware and system prompt wired into create_agent, with a recording fake model."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from langchain_core.language_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from PIL import Image
from pydantic import Field

from agents.agent import api_system_prompt, create_api_agent
from agents.middleware import ImageToolMessageMiddleware
from agents.prompts import AGENT_SYSTEM_PROMPT
from api_tool.images import encode_image
from api_tool.tool import AttentionPromptTool
from tests.conftest import shared_tiny_attributor


class RecordingModel(FakeMessagesListChatModel):
    """Replies from a script; records the tools it is bound to and every message list it receives."""

    received: list[list[BaseMessage]] = Field(default_factory=list)
    bound: list[list[str]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> RecordingModel:
        self.bound.append([getattr(t, "name", None) or t["function"]["name"] for t in tools])
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        self.received.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def attention_call(args: dict[str, Any], call_id: str = "c1") -> AIMessage:
    return AIMessage("", tool_calls=[{"name": "attention_prompt", "args": args, "id": call_id, "type": "tool_call"}])


def model_with(*responses: AIMessage, **kwargs: Any) -> RecordingModel:
    return RecordingModel(responses=list(responses), received=[], bound=[], **kwargs)


def scene() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8))


def user_turn(image: Image.Image) -> HumanMessage:
    data, mime_type = encode_image(image)
    image_block = {"type": "image", "base64": data, "mime_type": mime_type}
    return HumanMessage([{"type": "text", "text": "Is there a cat?"}, image_block])


def clip_tool() -> AttentionPromptTool:
    return AttentionPromptTool(attributor=shared_tiny_attributor(), max_side=None)


def test_agent_calls_the_tool_on_the_user_image_and_sees_the_result() -> None:
    image = scene()
    model = model_with(attention_call({"question": "Is there a cat?"}), AIMessage("No cat."))
    agent = create_api_agent(model, attention_tool=clip_tool())
    result = agent.invoke({"messages": [user_turn(image)]})
    assert model.bound[0] == ["attention_prompt"]
    first, second = model.received
    assert first[0] == SystemMessage(AGENT_SYSTEM_PROMPT)
    assert [m.type for m in second] == ["system", "human", "ai", "tool", "human"]
    expected = clip_tool().annotate(image, "Is there a cat?").image
    hoisted_image = second[4].content[1]
    shown = Image.open(io.BytesIO(base64.b64decode(hoisted_image["base64"]))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(expected))
    assert [m.type for m in result["messages"]] == ["human", "ai", "tool", "ai"]
    assert result["messages"][-1].content == "No cat."
    assert result["messages"][2].artifact["image_source"] == "user image 1 of 1 in the conversation"


def test_a_model_that_reads_tool_images_gets_them_in_place() -> None:
    model = model_with(attention_call({"question": "cat"}), AIMessage("done"), profile={"image_tool_message": True})
    create_api_agent(model, attention_tool=clip_tool()).invoke({"messages": [user_turn(scene())]})
    second = model.received[1]
    assert [m.type for m in second] == ["system", "human", "ai", "tool"]
    assert second[3].content[1]["type"] == "image"


def test_tool_errors_become_error_messages_and_the_agent_goes_on() -> None:
    model = model_with(attention_call({"question": "cat"}), AIMessage("I could not look closer."))
    result = create_api_agent(model, attention_tool=clip_tool()).invoke({"messages": [HumanMessage("no image here")]})
    tool_message = result["messages"][2]
    assert isinstance(tool_message, ToolMessage) and tool_message.status == "error"
    assert "no image was given" in tool_message.content
    assert result["messages"][-1].content == "I could not look closer."
    assert model.received[1][-1].type == "tool"


async def test_async_agent_run() -> None:
    model = model_with(attention_call({"question": "cat"}), AIMessage("ok"))
    result = await create_api_agent(model, attention_tool=clip_tool()).ainvoke({"messages": [user_turn(scene())]})
    assert [m.type for m in result["messages"]] == ["human", "ai", "tool", "ai"]
    assert result["messages"][2].status == "success"
    assert [m.type for m in model.received[1]] == ["system", "human", "ai", "tool", "human"]


@tool
def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


def test_extra_tools_system_prompt_and_middleware_are_combined() -> None:
    own_tool = clip_tool()
    model = model_with(AIMessage("hello"))
    agent = create_api_agent(
        model,
        [word_count, own_tool],
        system_prompt="Answer in French.",
        image_middleware=ImageToolMessageMiddleware(mode="never"),
    )
    agent.invoke({"messages": [HumanMessage("hi")]})
    assert model.bound[0] == ["word_count", "attention_prompt"]
    assert model.received[0][0].content == f"Answer in French.\n\n{AGENT_SYSTEM_PROMPT}"
    assert api_system_prompt() == AGENT_SYSTEM_PROMPT
