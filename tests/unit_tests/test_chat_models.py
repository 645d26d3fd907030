"""ChatTransformersVLM on a tiny random-weight LLaVA: messages -> template, images, generation, tools."""

from __future__ import annotations

import asyncio
import threading
import time
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_tests.unit_tests import ChatModelUnitTests
from PIL import Image
from pydantic import BaseModel

from agents.chat_models import (
    GENERATION_THREAD_NAME,
    ChatTransformersVLM,
    parse_tool_calls,
    resolve_model_path,
    tool_call_prefix,
    truncate_at_stop,
)
from api_tool.backends.base import model_lock
from api_tool.demo.tiny_llava import build_tiny_llava_processor
from api_tool.errors import UnknownModelError, WeightsUnavailableError
from tests.sample_images import noise as sample_noise
from tests.sample_images import png_base64
from tests.tiny_models import TinyLlava, tiny_llava


@cache
def shared_tiny() -> TinyLlava:
    return tiny_llava()


def tiny_vlm(**kwargs: Any) -> ChatTransformersVLM:
    tiny = shared_tiny()
    return ChatTransformersVLM(model="tiny-llava", hf_model=tiny.model, processor=tiny.processor, **kwargs)


def noise(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return sample_noise(seed, size)


def question_with_image(text: str, image: Image.Image, openai_style: bool = False) -> HumanMessage:
    if openai_style:
        block: dict[str, Any] = {
            "type": "image_url",
            "image_url": {"url": f"data:image/png;base64,{png_base64(image)}"},
        }
    else:
        block = {"type": "image", "base64": png_base64(image), "mime_type": "image/png"}
    return HumanMessage([block, {"type": "text", "text": text}])


class TestChatTransformersVLMStandard(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatTransformersVLM]:
        return ChatTransformersVLM

    @property
    def chat_model_params(self) -> dict[str, Any]:
        tiny = shared_tiny()
        return {"model": "tiny-llava", "hf_model": tiny.model, "processor": tiny.processor}

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True


def test_conversation_roles_images_and_tool_turns() -> None:
    vlm = tiny_vlm()
    first, second = noise(1), noise(2, size=(20, 50))
    messages = [
        SystemMessage("Be brief."),
        question_with_image("what is it?", first),
        AIMessage("", tool_calls=[{"name": "attention_prompt", "args": {"question": "q"}, "id": "c1"}]),
        ToolMessage(
            content=[
                {"type": "text", "text": "highlighted"},
                {"type": "image", "base64": png_base64(second), "mime_type": "image/png"},
            ],
            tool_call_id="c1",
            name="attention_prompt",
        ),
        HumanMessage("and now?"),
    ]
    conversation, images = vlm.to_conversation(messages)
    assert conversation == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": '{"tool": "attention_prompt", "arguments": {"question": "q"}}'}],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Tool attention_prompt (call c1) returned:\n"},
                {"type": "text", "text": "highlighted"},
                {"type": "image"},
                {"type": "text", "text": "\n"},
                {"type": "text", "text": "and now?"},
            ],
        },
    ]
    assert [image.size for image in images] == [(40, 30), (20, 50)]
    np.testing.assert_array_equal(np.asarray(images[1]), np.asarray(second))


def test_standard_and_openai_image_blocks_give_the_same_pixels() -> None:
    vlm = tiny_vlm()
    image = noise(3)
    standard = vlm._prepare([question_with_image("what?", image)], [], None)
    openai = vlm._prepare([question_with_image("what?", image, openai_style=True)], [], None)
    expected = shared_tiny().processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(standard["pixel_values"], expected, rtol=0, atol=0)
    torch.testing.assert_close(openai["pixel_values"], expected, rtol=0, atol=0)
    assert torch.equal(standard["input_ids"], openai["input_ids"])
    image_token = shared_tiny().model.config.image_token_id
    assert int((standard["input_ids"] == image_token).sum()) == 64


def test_prompt_uses_the_processor_chat_template() -> None:
    vlm = tiny_vlm()
    conversation, _ = vlm.to_conversation([SystemMessage("sys"), question_with_image("what?", noise(1))])
    assert vlm.render_prompt(conversation) == "sys USER: <image>\nwhat? ASSISTANT:"


def test_greedy_invoke_is_deterministic_and_reports_usage() -> None:
    vlm = tiny_vlm(max_tokens=6)
    messages = [question_with_image("what colour is the circle?", noise(4))]
    first, second = vlm.invoke(messages), vlm.invoke(messages)
    assert first.content == second.content
    prompt_length = int(vlm._prepare(messages, [], None)["input_ids"].shape[1])
    assert first.usage_metadata["input_tokens"] == prompt_length
    assert 1 <= first.usage_metadata["output_tokens"] <= 6
    assert first.response_metadata["model_name"] == "tiny-llava"
    assert first.response_metadata["finish_reason"] in ("stop", "length")


def test_image_changes_what_the_model_sees() -> None:
    vlm = tiny_vlm()
    model = shared_tiny().model
    logits = []
    for seed in (5, 6):
        inputs = vlm._prepare([question_with_image("what?", noise(seed))], [], None)
        with torch.inference_mode():
            logits.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_stream_concatenates_to_the_invoke_output() -> None:
    vlm = tiny_vlm(max_tokens=8)
    messages = [question_with_image("what is here?", noise(7))]
    invoked = vlm.invoke(messages)
    chunks = list(vlm.stream(messages))
    assert "".join(str(chunk.content) for chunk in chunks) == invoked.content
    assert chunks[-1].usage_metadata == invoked.usage_metadata


def test_closing_a_stream_stops_generation_and_frees_the_model() -> None:
    vlm = tiny_vlm(max_tokens=2000)
    model = shared_tiny().model
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # only max_tokens or the consumer can end it
    try:
        stream = vlm.stream([question_with_image("what is here?", noise(9))])
        first = next(stream)
        started = time.perf_counter()
        stream.close()
        closed_after = time.perf_counter() - started
        lock = model_lock(model)
        assert lock.acquire(blocking=False), "the generation thread still holds the model"
        lock.release()
    finally:
        model.generation_config.eos_token_id = saved_eos
    assert isinstance(first.content, str)
    assert not generation_threads()
    assert closed_after < 5.0


def generation_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == GENERATION_THREAD_NAME]


async def test_cancelled_async_stream_gives_up_waiting_for_a_busy_model() -> None:
    vlm = tiny_vlm(max_tokens=5)
    model = shared_tiny().model
    holding, release = threading.Event(), threading.Event()

    def hold_the_model() -> None:
        with model_lock(model):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_the_model)
    holder.start()
    holding.wait(5)
    try:
        chunks = vlm.astream([question_with_image("what is here?", noise(10))])
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(anext(chunks), timeout=0.3)
        deadline = time.perf_counter() + 5.0
        while generation_threads() and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        assert not generation_threads(), "the worker still waits for the model"
        assert holder.is_alive()  # the model was busy the whole time
    finally:
        release.set()
        holder.join()


async def test_async_stream_stopped_early_frees_the_model() -> None:
    vlm = tiny_vlm(max_tokens=2000)
    model = shared_tiny().model
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        chunks = vlm.astream([question_with_image("what is here?", noise(11))])
        await anext(chunks)
        await chunks.aclose()
        lock = model_lock(model)
        deadline = time.perf_counter() + 5.0
        while not lock.acquire(blocking=False):
            assert time.perf_counter() < deadline, "generation went on after the consumer left"
            await asyncio.sleep(0.02)
        lock.release()
    finally:
        model.generation_config.eos_token_id = saved_eos


def test_stop_strings_cut_invoke_and_stream_alike() -> None:
    vlm = tiny_vlm(max_tokens=10)
    messages = [question_with_image("what is here?", noise(8))]
    full = str(vlm.invoke(messages).content)
    words = full.split()
    assert len(words) >= 3
    stop_word = words[2]
    expected = full[: full.index(stop_word)]
    stopped = vlm.invoke(messages, stop=[stop_word])
    assert stopped.content == expected.strip()
    assert stopped.response_metadata["finish_reason"] == "stop"
    assert stopped.usage_metadata["output_tokens"] < 10
    streamed = "".join(str(chunk.content) for chunk in vlm.stream(messages, stop=[stop_word]))
    assert streamed == expected
    assert truncate_at_stop("abcabc", ["c", "b"]) == ("a", True)
    assert truncate_at_stop("abc", []) == ("abc", False)


async def test_async_invoke_equals_sync() -> None:
    vlm = tiny_vlm(max_tokens=5)
    messages = [question_with_image("what?", noise(9))]
    assert (await vlm.ainvoke(messages)).content == vlm.invoke(messages).content


JSON_WORDS = ['{"tool": "zoom", "arguments": {"x": 1, "where": "left side"}}']


class ScriptedGenerator(torch.nn.Module):
    """Stands in for the transformers model: 'generates' a fixed reply tokenized by the real processor,
    and records the inputs it was given."""

    def __init__(self, processor: Any, reply: str) -> None:
        super().__init__()
        self.reply_ids = processor.tokenizer(reply, add_special_tokens=False, return_tensors="pt")["input_ids"]
        self.config = SimpleNamespace(model_type="llava")
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.prompts: list[str] = []
        self.processor = processor

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        self.prompts.append(self.processor.tokenizer.decode(input_ids[0]))
        return torch.cat([input_ids, self.reply_ids[:, :max_new_tokens]], dim=1)


def scripted_vlm(reply: str) -> tuple[ChatTransformersVLM, ScriptedGenerator]:
    processor = build_tiny_llava_processor([*JSON_WORDS, "you can call these tools look here ok verdict red"])
    generator = ScriptedGenerator(processor, reply)
    return ChatTransformersVLM(model="scripted", hf_model=generator, processor=processor), generator


@tool
def zoom(x: int, where: str = "") -> str:
    """Zoom in on a region."""
    return f"{x} {where}"


def test_a_json_reply_becomes_a_tool_call() -> None:
    vlm, generator = scripted_vlm('ok { "tool": "zoom", "arguments": {"x": 1, "where": "left side"}}')
    message = vlm.bind_tools([zoom]).invoke([question_with_image("look here", noise(1))])
    assert [(call["name"], call["args"]) for call in message.tool_calls] == [("zoom", {"x": 1, "where": "left side"})]
    assert message.content == "ok"
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert "you can call these tools" in generator.prompts[0]
    assert "zoom" in generator.prompts[0]


def test_without_bound_tools_json_stays_text() -> None:
    vlm, generator = scripted_vlm('{"tool": "zoom", "arguments": {"x": 1}}')
    message = vlm.invoke([question_with_image("look here", noise(1))])
    assert message.tool_calls == []
    assert "zoom" in message.content
    assert "you can call these tools" not in generator.prompts[0]


def test_forced_tool_choice_prefills_the_call() -> None:
    vlm, generator = scripted_vlm('{"x": 1}}')
    message = vlm.bind_tools([zoom], tool_choice="zoom").invoke([question_with_image("look here", noise(1))])
    assert [(call["name"], call["args"]) for call in message.tool_calls] == [("zoom", {"x": 1})]
    assert generator.prompts[0].replace(" ", "").endswith('assistant:{"tool":"zoom","arguments":')


def test_forced_call_that_is_not_json_is_an_invalid_tool_call() -> None:
    vlm, _ = scripted_vlm("look here")
    message = vlm.bind_tools([zoom], tool_choice="any").invoke([question_with_image("look here", noise(1))])
    assert message.tool_calls == []
    assert len(message.invalid_tool_calls) == 1
    assert "not a JSON tool call" in message.invalid_tool_calls[0]["error"]


def test_streaming_with_tools_yields_the_tool_call() -> None:
    vlm, _ = scripted_vlm('{"tool": "zoom", "arguments": {"x": 3}}')
    chunks = list(vlm.bind_tools([zoom]).stream([question_with_image("look here", noise(1))]))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert [(call["name"], call["args"]) for call in merged.tool_calls] == [("zoom", {"x": 3})]


class verdict(BaseModel):  # noqa: N801 - the tiny word-level tokenizer lower-cases and splits at '_'
    """The colour of the object."""

    colour: str


def test_structured_output_goes_through_a_forced_tool_call() -> None:
    vlm, generator = scripted_vlm('verdict", "arguments": {"colour": "red"}}')
    parsed = vlm.with_structured_output(verdict).invoke([question_with_image("look here", noise(1))])
    assert parsed == verdict(colour="red")
    assert generator.prompts[0].replace(" ", "").endswith('assistant:{"tool":"')


def test_tool_choice_none_hides_the_tools() -> None:
    vlm, generator = scripted_vlm('{"tool": "zoom", "arguments": {"x": 3}}')
    message = vlm.bind_tools([zoom], tool_choice="none").invoke([HumanMessage("hi")])
    assert message.tool_calls == []
    assert "you can call these tools" not in generator.prompts[0]


def test_binding_an_unbound_tool_choice_fails() -> None:
    with pytest.raises(ValueError, match="not bound"):
        tiny_vlm().bind_tools([zoom], tool_choice="other")
    with pytest.raises(ValueError, match="tool_choice must be"):
        tool_call_prefix(3.5)


def test_parse_tool_calls_forms() -> None:
    text, calls, invalid = parse_tool_calls(
        'A <tool_call>{"name": "zoom", "parameters": "{\\"x\\": 2}"}</tool_call> B {"tool": "nope"} {"a": 1}',
        ["zoom"],
    )
    assert text == 'A B {"a": 1}'
    assert [(c["name"], c["args"]) for c in calls] == [("zoom", {"x": 2})]
    assert [(c["name"], c["error"]) for c in invalid] == [("nope", "unknown tool 'nope'; known: ['zoom']")]
    _, calls, invalid = parse_tool_calls('{"tool": "zoom", "arguments": [1, 2]}', ["zoom"])
    assert calls == [] and invalid[0]["error"] == "the arguments are not a JSON object"
    _, calls, _ = parse_tool_calls('{ " tool " : " zoom ", " arguments " : { " x " : 1 } }', ["zoom"])
    assert calls[0]["args"] == {"x": 1}
    assert len({c["id"] for c in parse_tool_calls('{"tool":"zoom"} {"tool":"zoom"}', ["zoom"])[1]}) == 2


def test_model_paths_are_resolved_offline(tmp_path: Any) -> None:
    with pytest.raises(UnknownModelError, match=r"holds no config\.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(UnknownModelError, match="not found"):
        resolve_model_path("./no/such/dir")
    assert resolve_model_path("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_demo_resolves_to_the_shipped_weights_or_says_they_are_missing() -> None:
    from api_tool.demo.tiny_llava import DEMO_LLAVA_DIR

    if (DEMO_LLAVA_DIR / "config.json").is_file():
        assert resolve_model_path("demo") == str(DEMO_LLAVA_DIR)
    else:
        with pytest.raises(WeightsUnavailableError, match="demo LLaVA weights are missing"):
            resolve_model_path("demo")


def test_lazy_loading_from_a_saved_directory(tmp_path: Any) -> None:
    saved = tiny_llava(tmp_path / "tiny")
    vlm = ChatTransformersVLM(model=str(saved.directory), max_tokens=4)
    assert vlm.hf_model is None
    assert vlm.is_llava
    reference = ChatTransformersVLM(model="x", hf_model=saved.model, processor=saved.processor, max_tokens=4)
    messages = [question_with_image("what?", noise(2))]
    assert vlm.invoke(messages).content == reference.invoke(messages).content
    assert ChatTransformersVLM.from_pretrained(str(saved.directory)).hf_model is not None
