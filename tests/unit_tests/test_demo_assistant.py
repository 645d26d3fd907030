"""The shipped demo LLaVA behaves as an assistant where the agent depends on it (real weights, CPU):
with the attention tool bound it calls the tool for a detail question and answers a whole-scene question
directly; without tools it answers; a ``verify`` re-ask gets a parsable ``FINAL:`` line.
"""

from __future__ import annotations

import base64
import io

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from agents.agent import api_system_prompt
from agents.chat_models import ChatTransformersVLM
from agents.prompts import IMAGE_LABELS, STRATEGIES, parse_final_answer
from api_tool.demo.scenes import generate_scene
from api_tool.tool import TOOL_NAME, AttentionPromptTool


@pytest.fixture(scope="module")
def demo() -> ChatTransformersVLM:
    return ChatTransformersVLM.from_pretrained("demo", max_tokens=48, device="cpu")


def _image_block(seed: int) -> dict[str, str]:
    buffer = io.BytesIO()
    generate_scene(seed, size=(320, 320), n_objects=3).image.save(buffer, format="PNG")
    return {"type": "image", "base64": base64.b64encode(buffer.getvalue()).decode(), "mime_type": "image/png"}


def _agent_reply(demo: ChatTransformersVLM, question: str, seed: int) -> AIMessage:
    bound = demo.bind_tools([AttentionPromptTool()])
    messages = [
        SystemMessage(api_system_prompt()),
        HumanMessage([{"type": "text", "text": question}, _image_block(seed)]),
    ]
    reply = bound.invoke(messages)
    assert isinstance(reply, AIMessage)
    return reply


def test_detail_question_with_the_tool_bound_calls_it(demo: ChatTransformersVLM) -> None:
    question = "is there a red square in the image?"
    reply = _agent_reply(demo, question, 2)
    assert reply.invalid_tool_calls == []
    assert [call["name"] for call in reply.tool_calls] == [TOOL_NAME]
    assert reply.tool_calls[0]["args"]["question"] == question


def test_whole_scene_question_is_answered_directly(demo: ChatTransformersVLM) -> None:
    reply = _agent_reply(demo, "how many objects are there in all?", 5)
    assert reply.tool_calls == [] and reply.invalid_tool_calls == []
    assert reply.text.strip() and "{" not in reply.text


def test_without_tools_it_answers_and_verify_ends_with_a_final_line(demo: ChatTransformersVLM) -> None:
    image = _image_block(6)
    question = "is there a blue circle in the image?"
    first = demo.invoke([HumanMessage([image, {"type": "text", "text": question}])]).text.strip()
    assert first in ("yes", "no")
    strategy = STRATEGIES["verify"]
    content = []
    for role in strategy.images:
        content += [{"type": "text", "text": IMAGE_LABELS[role]}, image]
    content.append({"type": "text", "text": strategy.render(question=question, answer=first)})
    assert parse_final_answer(demo.invoke([HumanMessage(content)]).text) in ("yes", "no")
