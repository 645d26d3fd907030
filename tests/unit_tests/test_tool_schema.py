"""The argument schema of ``attention_prompt`` as each chat client actually sends it: every argument typed."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_ollama import ChatOllama
from ollama import Client

from api_tool.tool import AttentionPromptInput, AttentionPromptTool
from tests.conftest import shared_tiny_attributor
from tests.sample_images import noise, png_base64
from tests.unit_tests.test_tool import runtime_with, tool_call, user_message


class RequestCapturedError(Exception):
    """Stops an ollama request before it leaves the process, carrying the JSON body it would send."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("request captured")
        self.body = body


def ollama_request_body(monkeypatch: pytest.MonkeyPatch, tool: AttentionPromptTool) -> dict[str, Any]:
    """The body ``ChatOllama(...).bind_tools([tool]).invoke(...)`` would POST to the Ollama server."""

    def capture(self: Client, cls: type, method: str, path: str, **kwargs: Any) -> None:
        assert (method, path) == ("POST", "/api/chat")
        raise RequestCapturedError(kwargs["json"])

    monkeypatch.setattr(Client, "_request", capture)
    with pytest.raises(RequestCapturedError) as captured:
        ChatOllama(model="llava").bind_tools([tool]).invoke([HumanMessage("what is in the image?")])
    return captured.value.body


EXPECTED_TYPES = {"question": "string", "image": "string"}


def test_openai_gets_a_plain_string_type_for_every_argument() -> None:
    parameters = convert_to_openai_tool(AttentionPromptTool())["function"]["parameters"]
    assert parameters["required"] == ["question"]
    assert {name: spec.get("type") for name, spec in parameters["properties"].items()} == EXPECTED_TYPES
    assert all("anyOf" not in spec for spec in parameters["properties"].values())
    assert parameters["properties"]["image"]["default"] == ""


def test_ollama_request_carries_a_type_for_every_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    (sent,) = ollama_request_body(monkeypatch, AttentionPromptTool())["tools"]
    assert sent["function"]["name"] == "attention_prompt"
    parameters = sent["function"]["parameters"]
    assert parameters["required"] == ["question"]
    assert {name: spec.get("type") for name, spec in parameters["properties"].items()} == EXPECTED_TYPES
    assert "conversation:N" in parameters["properties"]["image"]["description"]


def test_none_from_python_callers_still_means_the_latest_user_image() -> None:
    assert AttentionPromptInput.model_validate({"question": "q", "image": None}).image == ""
    tool = AttentionPromptTool(attributor=shared_tiny_attributor(), max_side=None)
    runtime = runtime_with([user_message("first", noise(1)), user_message("second", noise(2))])
    message = tool.invoke(tool_call({"question": "the cat", "image": None, "runtime": runtime}))
    assert isinstance(message, ToolMessage) and message.status == "success"
    assert message.artifact["image_source"] == "user image 2 of 2 in the conversation"
    empty = tool.invoke(tool_call({"question": "the cat", "image": "", "runtime": runtime}))
    direct = tool.invoke(tool_call({"question": "the cat", "image": png_base64(noise(2))}))
    assert message.content[1] == empty.content[1] == direct.content[1]
