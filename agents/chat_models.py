"""A local transformers vision-language model (LLaVA first) as a LangChain chat model.

:class:`ChatTransformersVLM` wraps any ``AutoModelForImageTextToText`` model and its processor. It reads
standard image blocks (``{"type": "image", "base64" | "url": ...}``), legacy v0 blocks and OpenAI-style
``image_url`` blocks, renders the conversation with the processor's chat template, generates greedily
(or samples when ``temperature > 0``), streams, and supports tool calling: bound tools are described in
the system prompt and a JSON object ``{"tool": <name>, "arguments": {...}}`` in the reply becomes a tool
call. Tool results, images included, are shown to the model as a user turn (most local templates have
no ``tool`` role), so the model reads images returned by tools directly.

Example:
    >>> from langchain_core.messages import HumanMessage
    >>> vlm = ChatTransformersVLM.from_pretrained("demo")  # doctest: +SKIP
    >>> vlm.invoke([HumanMessage([{"type": "text", "text": "What colour is the circle?"},
    ...     {"type": "image", "base64": b64, "mime_type": "image/png"}])]).content  # doctest: +SKIP
    'red'
"""

from __future__ import annotations

import json
import queue
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    InvalidToolCall,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.runnables.config import run_in_executor
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from PIL import Image
from pydantic import ConfigDict, Field, PrivateAttr

from agents.prompts import TOOL_CALLING_TEMPLATE
from api_tool.backends.base import model_lock
from api_tool.backends.lvlm_families.base import image_processing_device
from api_tool.backends.self_map_memo import AnswerRecorder, self_map_memo
from api_tool.errors import ImageLoadError, InvalidParameterError, UnknownModelError, WeightsUnavailableError
from api_tool.images import load_image
from api_tool.tool import image_source, is_image_block

DEMO_NAME = "demo"
GENERATION_THREAD_NAME = "ChatTransformersVLM-generate"
LOCK_POLL_SECONDS = 0.05
"""How often a streaming worker that waits for a busy model checks whether its consumer has left."""

_TOOL_NAME_KEYS = ("tool", "name")
_TOOL_ARGS_KEYS = ("arguments", "parameters", "args")
_TOOL_WRAPPERS = re.compile(r"</?tool_call>|```(?:json)?")
_SPACES = re.compile(r"[ \t]{2,}")

ToolLike = dict[str, Any] | type | Callable[..., Any] | BaseTool


def resolve_model_path(name_or_path: str) -> str:
    """``"demo"`` -> the shipped demo LLaVA directory; a local path as is; anything else as a hub id.

    Raises ``WeightsUnavailableError`` when the demo weights are not installed.
    """
    if name_or_path == DEMO_NAME:
        from api_tool.demo.tiny_llava import DEMO_LLAVA_DIR

        if not (DEMO_LLAVA_DIR / "config.json").is_file():
            raise WeightsUnavailableError(
                f"the demo LLaVA weights are missing from {DEMO_LLAVA_DIR}; train them with the demo "
                "training script, or pass the path of a local LLaVA checkpoint instead of 'demo'"
            )
        return str(DEMO_LLAVA_DIR)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{name_or_path!r} is a path but holds no config.json of a transformers model")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UnknownModelError(f"model path not found: {name_or_path!r}")
    return name_or_path


def _shares_weights(name_or_path: str) -> bool:
    """Whether a model named for ``ChatTransformersVLM`` is a local checkpoint (or the demo) of an LVLM family
    the registry serves; hub ids load directly (their download rules are the chat model's own)."""
    from transformers import AutoConfig

    from api_tool.families import lvlm_family_of_config

    path = Path(resolve_model_path(name_or_path))
    if not (path / "config.json").is_file():
        return False
    return lvlm_family_of_config(AutoConfig.from_pretrained(path, local_files_only=True)) is not None


def parse_tool_calls(text: str, tool_names: Sequence[str]) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """Split generated text into ``(remaining text, tool calls, invalid tool calls)``.

    A tool call is a JSON object with a name under ``"tool"`` or ``"name"`` and arguments under
    ``"arguments"``, ``"parameters"`` or ``"args"`` (an object, or a string holding one), anywhere in the
    text, optionally inside ``<tool_call>`` tags or a code fence. Whitespace around keys and strings is
    dropped. A call naming an unknown tool, or with arguments that are not an object, is returned as an
    invalid tool call.

    Example:
        >>> text, calls, bad = parse_tool_calls('Let me look. {"tool": "zoom", "arguments": {"x": 1}}', ["zoom"])
        >>> text, calls[0]["name"], calls[0]["args"], bad
        ('Let me look.', 'zoom', {'x': 1}, [])
    """
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    spans: list[tuple[int, int]] = []
    position = text.find("{")
    while position != -1:
        try:
            raw_value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            position = text.find("{", position + 1)
            continue
        value = _stripped(raw_value)
        name = next((value[key] for key in _TOOL_NAME_KEYS if isinstance(value, dict) and key in value), None)
        if isinstance(name, str):
            spans.append((position, end))
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            raw_args = next((value[key] for key in _TOOL_ARGS_KEYS if key in value), {})
            args = _as_arguments(raw_args)
            if name not in tool_names:
                invalid.append(_invalid(name, raw_args, call_id, f"unknown tool {name!r}; known: {list(tool_names)}"))
            elif args is None:
                invalid.append(_invalid(name, raw_args, call_id, "the arguments are not a JSON object"))
            else:
                calls.append(ToolCall(name=name, args=args, id=call_id, type="tool_call"))
        position = text.find("{", end if isinstance(name, str) else position + 1)
    remaining = "".join(text[start:end] for start, end in _gaps(spans, len(text)))
    return _SPACES.sub(" ", _TOOL_WRAPPERS.sub("", remaining)).strip(), calls, invalid


def _stripped(value: object) -> object:
    """JSON with whitespace stripped from keys and strings (small tokenizers decode '"tool"' as '" tool "')."""
    if isinstance(value, dict):
        return {str(key).strip(): _stripped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_stripped(item) for item in value]
    return value.strip() if isinstance(value, str) else value


def _as_arguments(raw: object) -> dict[str, Any] | None:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    return raw if isinstance(raw, dict) else None


def _invalid(name: str, raw_args: object, call_id: str, error: str) -> InvalidToolCall:
    args = raw_args if isinstance(raw_args, str) else json.dumps(raw_args)
    return InvalidToolCall(name=name, args=args, id=call_id, error=error, type="invalid_tool_call")


def _gaps(spans: list[tuple[int, int]], length: int) -> Iterator[tuple[int, int]]:
    start = 0
    for span_start, span_end in spans:
        yield start, span_start
        start = span_end
    yield start, length


_FREE_CHOICES = (None, "auto", "none", False)
_ANY_TOOL_CHOICES = ("any", "required", True)


def forced_tool_name(tool_choice: object) -> str | None:
    """The tool a ``tool_choice`` names (a string or an OpenAI-style dict), or ``None``."""
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not isinstance(name, str):
            raise InvalidParameterError(f"tool_choice dict names no tool: {tool_choice!r}")
        return name
    if tool_choice in _FREE_CHOICES or tool_choice in _ANY_TOOL_CHOICES:
        return None
    if isinstance(tool_choice, str):
        return tool_choice
    raise InvalidParameterError(f"tool_choice must be 'auto', 'any', 'none', a tool name or None, got {tool_choice!r}")


def tool_call_prefix(tool_choice: object) -> str:
    """Text that starts the reply so that ``tool_choice`` is obeyed: any tool, a named one, or none.

    Example:
        >>> tool_call_prefix("any"), tool_call_prefix("zoom"), tool_call_prefix("auto")
        ('{"tool": "', '{"tool": "zoom", "arguments": ', '')
    """
    name = forced_tool_name(tool_choice)
    if name is not None:
        return f'{{"tool": {json.dumps(name)}, "arguments": '
    return '{"tool": "' if tool_choice in _ANY_TOOL_CHOICES else ""


def describe_tools(tools: Sequence[dict[str, Any]]) -> str:
    """The system-prompt text that teaches the model the bound tools and the call format."""
    lines = []
    for tool in tools:
        function = tool.get("function", tool)
        parameters = json.dumps(function.get("parameters", {}), separators=(",", ":"))
        lines.append(f"- {function['name']}: {function.get('description', '').strip()} Arguments schema: {parameters}")
    return TOOL_CALLING_TEMPLATE.format(tools="\n".join(lines))


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string, and whether one was found."""
    cut = min((index for index in (text.find(s) for s in stop if s) if index != -1), default=-1)
    return (text[:cut], True) if cut != -1 else (text, False)


@dataclass(frozen=True)
class GeneratedReply:
    """What one ``generate`` call produced: the text (cut at a stop string) and its token counts."""

    text: str
    prompt_tokens: int
    new_tokens: int
    hit_stop: bool
    hit_limit: bool

    @property
    def usage(self) -> UsageMetadata:
        """Token counts as LangChain usage metadata."""
        return UsageMetadata(
            input_tokens=self.prompt_tokens,
            output_tokens=self.new_tokens,
            total_tokens=self.prompt_tokens + self.new_tokens,
        )


class ChatTransformersVLM(BaseChatModel):
    """A local image-text-to-text transformers model (LLaVA, ...) as a LangChain chat model.

    The weights load on first use (or at once with :meth:`from_pretrained`); ``hf_model`` and
    ``processor`` may also be passed already loaded. Generation is greedy when ``temperature`` is 0.

    Example:
        >>> vlm = ChatTransformersVLM(model="path/to/llava", max_tokens=32)  # doctest: +SKIP
        >>> vlm.bind_tools([AttentionPromptTool()]).invoke("Where is the cat?")  # doctest: +SKIP
    """

    model: str = DEMO_NAME
    """``"demo"``, a local checkpoint directory, or a hub id (needs network or a filled cache)."""
    hf_model: Any = Field(default=None, exclude=True)
    """The loaded transformers model; loaded from ``model`` on first use when not given."""
    processor: Any = Field(default=None, exclude=True)
    """The matching processor (image processor + tokenizer + chat template)."""
    max_tokens: int = 256
    """Most new tokens per reply."""
    temperature: float = 0.0
    """0 decodes greedily; above 0 samples."""
    top_p: float | None = None
    stop: list[str] | None = None
    """Stop strings: generation ends before the first one."""
    streaming: bool = False
    device: str | None = None
    """Device for weights loaded by this class (``"cuda"``, ``"cpu"``...); ``None`` keeps the default."""
    dtype: str | None = None
    """``"bfloat16"``, ``"float16"``... for weights loaded by this class; ``None`` keeps the checkpoint's."""
    allow_remote_images: bool = False
    """Download ``http(s)`` image URLs found in messages."""
    local_files_only: bool = True
    """Never reach a model hub when loading; set False to download a hub id."""
    record_self_maps: bool = True
    """While answering (``invoke`` / ``ainvoke``), keep what the answer's self-map needs: references to the
    probed block's inputs at each step (``api_tool.backends.self_map_memo``; nothing is computed while
    generating). An ``LvlmAttributor`` over the same model (the reflection loop's self mode) then scores
    this answer on equal inputs (same prompt tokens and pixels) with no model pass. Only for models of an
    LVLM family in ``api_tool.families``; the cost is in benchmarks/RESULTS.md section 5. LLaVA-1.5: this
    class lets the processor resize and centre-crop while the attributor letterboxes, so their pixels (and
    the recording) agree only for images already square at the vision input's size."""
    self_map_layer: int | None = None
    """The block recorded with ``record_self_maps``: ``None`` is the one ``LvlmAttributor.from_model``
    reads by default; an attributor reading another block runs its own pass."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _recorder: AnswerRecorder | None = PrivateAttr(default=None)
    _recorder_made: bool = PrivateAttr(default=False)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEMO_NAME, **kwargs: Any) -> ChatTransformersVLM:
        """Load ``"demo"``, a local directory or a hub id now, and wrap it.

        Example:
            >>> vlm = ChatTransformersVLM.from_pretrained("demo", max_tokens=16)  # doctest: +SKIP
        """
        chat_model = cls(model=name_or_path, **kwargs)
        chat_model.load()
        return chat_model

    @property
    def _llm_type(self) -> str:
        return "transformers-vlm"

    @property
    def self_attribution_family(self) -> str | None:
        """The model-family table's name for the wrapped model when its own attention can make the map
        (``api_tool.families``: a family that wraps chat models), else ``None``."""
        from api_tool.families import lvlm_family_of_model

        entry = lvlm_family_of_model(self.load())
        return entry.name if entry is not None and entry.wraps_chat_model else None

    def self_map_recorder(self) -> AnswerRecorder | None:
        """The recorder ``record_self_maps`` attaches while answering (made once), or ``None`` when the
        wrapped model belongs to no LVLM family that can score it.

        Example:
            >>> ChatTransformersVLM.from_pretrained("demo").self_map_recorder().layer  # doctest: +SKIP
            2
        """
        if not self._recorder_made:
            from api_tool.backends.lvlm import answer_recorder

            self._recorder = answer_recorder(self.load(), self.processor, self.self_map_layer)
            self._recorder_made = True
        return self._recorder

    @property
    def is_llava(self) -> bool:
        """Whether the wrapped model is a LLaVA-1.5 model."""
        return self.self_attribution_family == "llava"

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            image_inputs=True,
            image_url_inputs=self.allow_remote_images,
            image_tool_message=True,
            tool_calling=True,
            tool_choice=True,
            structured_output=True,
        )

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="transformers",
            ls_model_name=kwargs.get("model", self.model),
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def load(self) -> Any:
        """The transformers model, loading it (and the processor) on first call.

        A local model of a family in ``api_tool.families`` (``"demo"`` included) comes from the shared
        registry (``api_tool.backends.registry.shared_model``), so an attributor over the same model
        (``get_attributor("lvlm:...")``, self-attribution) holds the same copy of the weights.
        """
        with self._load_lock:
            if self.hf_model is None and self.processor is None and _shares_weights(self.model):
                from api_tool.backends.registry import shared_model

                model, self.processor = shared_model(f"lvlm:{self.model}", device=self.device, dtype=self.dtype)
                self.hf_model = model.eval()
            if self.hf_model is None or self.processor is None:
                from transformers import AutoModelForImageTextToText, AutoProcessor

                path = resolve_model_path(self.model)
                options: dict[str, Any] = {"local_files_only": self.local_files_only}
                if self.hf_model is None:
                    if self.dtype is not None:
                        options["dtype"] = getattr(torch, self.dtype)
                    try:
                        loaded = AutoModelForImageTextToText.from_pretrained(path, **options)
                    except OSError as exc:
                        raise WeightsUnavailableError(f"cannot load the model {self.model!r}: {exc}") from exc
                    if self.device is not None:
                        loaded = loaded.to(self.device)
                    self.hf_model = loaded.eval()
                if self.processor is None:
                    self.processor = AutoProcessor.from_pretrained(path, local_files_only=self.local_files_only)
        return self.hf_model

    def bind_tools(
        self,
        tools: Sequence[ToolLike],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools: they are described in the system prompt and JSON calls in replies are parsed.

        ``tool_choice``: ``"auto"``/``None`` (the model decides), ``"any"``/``"required"`` (the reply starts
        as a tool call), a tool name (the reply starts as a call of that tool), ``"none"`` (tools hidden).

        Example:
            >>> bound = ChatTransformersVLM(model="demo").bind_tools([AttentionPromptTool()])  # doctest: +SKIP
        """
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        names = [tool["function"]["name"] for tool in formatted]
        forced = forced_tool_name(tool_choice)
        if forced is not None and forced not in names:
            raise InvalidParameterError(f"tool_choice names a tool that is not bound: {tool_choice!r}; bound: {names}")
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def to_conversation(
        self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] = ()
    ) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """The chat-template conversation and the images in order of appearance.

        Roles: system, user, assistant; a tool result becomes a user turn that names the call; a tool
        call made by the assistant is written back as the JSON it would generate. Consecutive turns of one
        role are merged (many templates require alternating roles).
        """
        conversation: list[dict[str, Any]] = []
        images: list[Image.Image] = []
        if tools:
            conversation.append({"role": "system", "content": [{"type": "text", "text": describe_tools(tools)}]})
        for message in messages:
            role, parts = self._turn(message, images)
            if conversation and conversation[-1]["role"] == role:
                conversation[-1]["content"].extend([{"type": "text", "text": "\n"}, *parts])
            else:
                conversation.append({"role": role, "content": parts})
        return conversation, images

    def _turn(self, message: BaseMessage, images: list[Image.Image]) -> tuple[str, list[dict[str, Any]]]:
        parts = self._content_parts(message.content, images)
        if isinstance(message, SystemMessage):
            return "system", parts
        if isinstance(message, AIMessage):
            calls = [json.dumps({"tool": call["name"], "arguments": call["args"]}) for call in message.tool_calls]
            return "assistant", parts + [{"type": "text", "text": text} for text in calls]
        if isinstance(message, ToolMessage):
            name = f" {message.name}" if message.name else ""
            status = " failed" if message.status == "error" else " returned"
            header = {"type": "text", "text": f"Tool{name} (call {message.tool_call_id}){status}:\n"}
            return "user", [header, *parts]
        if isinstance(message, HumanMessage) or message.type in ("human", "user"):
            return "user", parts
        raise InvalidParameterError(f"unsupported message type {message.type!r} for a local chat template")

    def _content_parts(self, content: str | list[Any], images: list[Image.Image]) -> list[dict[str, Any]]:
        if isinstance(content, str):
            return [{"type": "text", "text": content}] if content else []
        parts: list[dict[str, Any]] = []
        for block in content:
            if isinstance(block, str):
                parts.append({"type": "text", "text": block})
            elif is_image_block(block):
                source = image_source(block)
                if source is None:
                    raise ImageLoadError(f"image block without inline data or URL: keys {sorted(block)}")
                images.append(load_image(source, allow_remote=self.allow_remote_images))
                parts.append({"type": "image"})
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append({"type": "text", "text": str(block.get("text", ""))})
        return parts

    def render_prompt(self, conversation: list[dict[str, Any]]) -> str:
        """The prompt text from the processor's chat template; a template without a system role gets the
        system text folded into the first user turn."""
        from jinja2 import TemplateError

        self.load()
        try:
            return str(self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False))
        except TemplateError:
            if not conversation or conversation[0]["role"] != "system":
                raise
            system, rest = conversation[0], conversation[1:]
            if rest and rest[0]["role"] == "user":
                rest = [{"role": "user", "content": system["content"] + rest[0]["content"]}, *rest[1:]]
            else:
                rest = [{"role": "user", "content": system["content"]}, *rest]
            return str(self.processor.apply_chat_template(rest, add_generation_prompt=True, tokenize=False))

    def _prepare(
        self, messages: list[BaseMessage], tools: Sequence[dict[str, Any]], tool_choice: object
    ) -> dict[str, Any]:
        conversation, images = self.to_conversation(messages, tools)
        prefix = tool_call_prefix(tool_choice) if tools else ""
        prompt = self.render_prompt(conversation) + prefix
        model = self.hf_model
        transformers_model = hasattr(model, "get_input_embeddings")
        on_device = image_processing_device(self.processor, model) if images and transformers_model else {}
        inputs = self.processor(text=prompt, images=images or None, return_tensors="pt", **on_device)
        inputs = {key: value.to(model.device) for key, value in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        return inputs

    def _generation_kwargs(self, stop: list[str], prompt_tokens: int, **overrides: Any) -> dict[str, Any]:
        temperature = float(overrides.get("temperature", self.temperature))
        max_tokens = int(overrides.get("max_tokens", self.max_tokens))
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0.0}
        if temperature > 0.0:
            kwargs["temperature"] = temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        tokenizer = self.processor.tokenizer
        kwargs["pad_token_id"] = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if stop:
            kwargs["stopping_criteria"] = _stop_criteria(tokenizer, stop, prompt_tokens)
        return kwargs

    def _message(self, reply: GeneratedReply, tools: Sequence[dict[str, Any]], tool_choice: object) -> AIMessage:
        names = [tool.get("function", tool)["name"] for tool in tools]
        prefix = tool_call_prefix(tool_choice) if tools else ""
        text = prefix + reply.text
        content, calls, invalid = parse_tool_calls(text, names) if tools else (text.strip(), [], [])
        if prefix and not calls and not invalid:
            forced = forced_tool_name(tool_choice) or ""
            error = "tool_choice forced a tool call but the reply is not a JSON tool call"
            invalid = [_invalid(forced, text, f"call_{uuid.uuid4().hex[:24]}", error)]
            content = ""
        finish = "tool_calls" if calls else "stop" if reply.hit_stop or not reply.hit_limit else "length"
        return AIMessage(
            content=content,
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=reply.usage,
            response_metadata={"model_name": self.model, "finish_reason": finish, "model_provider": "transformers"},
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.load()
        tool_choice = kwargs.get("tool_choice")
        tools = [] if tool_choice == "none" else list(kwargs.get("tools") or [])
        inputs = self._prepare(messages, tools, tool_choice)
        stops = list(stop or self.stop or [])
        prompt_tokens = int(inputs["input_ids"].shape[1])
        generation = self._generation_kwargs(stops, prompt_tokens, **kwargs)
        recorder = self.self_map_recorder() if self.record_self_maps else None
        with model_lock(self.hf_model), torch.inference_mode():
            with recorder.attached() if recorder is not None else nullcontext():
                output = self.hf_model.generate(**inputs, **generation)
            if recorder is not None:
                self_map_memo(self.hf_model).store(recorder.recording(inputs, output[0, prompt_tokens:]))
        new_ids = output[0, prompt_tokens:]
        text, hit_stop = truncate_at_stop(self.processor.tokenizer.decode(new_ids, skip_special_tokens=True), stops)
        reply = GeneratedReply(
            text=text,
            prompt_tokens=prompt_tokens,
            new_tokens=int(new_ids.shape[0]),
            hit_stop=hit_stop,
            hit_limit=int(new_ids.shape[0]) >= generation["max_new_tokens"],
        )
        return ChatResult(generations=[ChatGeneration(message=self._message(reply, tools, tool_choice))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._stream_until(threading.Event(), messages, stop, run_manager, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """``_stream`` stepped in worker threads; generation stops when the async consumer stops or is
        cancelled, also while a step is still waiting in its thread."""
        cancelled = threading.Event()
        sync_manager = run_manager.get_sync() if run_manager else None
        chunks = self._stream_until(cancelled, messages, stop, sync_manager, **kwargs)
        done = object()
        try:
            while (chunk := await run_in_executor(None, next, chunks, done)) is not done:
                yield chunk  # type: ignore[misc]
        finally:
            cancelled.set()

    def _stream_until(
        self,
        cancelled: threading.Event,
        messages: list[BaseMessage],
        stop: list[str] | None,
        run_manager: CallbackManagerForLLMRun | None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """The chunks of one reply; generation stops early once ``cancelled`` is set."""
        tools = kwargs.get("tools") or []
        if tools and kwargs.get("tool_choice") != "none":
            message = self._generate(messages, stop=stop, run_manager=run_manager, **kwargs).generations[0].message
            assert isinstance(message, AIMessage)
            yield ChatGenerationChunk(message=_as_chunk(message))
            return
        self.load()
        inputs = self._prepare(messages, [], None)
        stops = list(stop or self.stop or [])
        prompt_tokens = int(inputs["input_ids"].shape[1])
        generation = self._generation_kwargs(stops, prompt_tokens, **kwargs)
        emitted = ""
        text = ""
        new_tokens = 0
        hold_back = max((len(s) for s in stops), default=1) - 1
        with closing(self._generate_in_thread(inputs, generation, cancelled)) as progress:
            for text_so_far, token_count in progress:
                text, new_tokens = text_so_far, token_count
                safe, hit_stop = truncate_at_stop(text, stops)
                if not hit_stop:
                    safe = text[: max(len(emitted), len(text) - hold_back)]
                if len(safe) > len(emitted):
                    piece = safe[len(emitted) :]
                    emitted = safe
                    if run_manager:
                        run_manager.on_llm_new_token(piece)
                    yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if hit_stop:
                    break
        final, hit_stop = truncate_at_stop(text, stops)
        if final.startswith(emitted) and len(final) > len(emitted):
            piece = final[len(emitted) :]
            if run_manager:
                run_manager.on_llm_new_token(piece)
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
        finish = "stop" if hit_stop or new_tokens < generation["max_new_tokens"] else "length"
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=UsageMetadata(
                    input_tokens=prompt_tokens, output_tokens=new_tokens, total_tokens=prompt_tokens + new_tokens
                ),
                response_metadata={"model_name": self.model, "finish_reason": finish, "model_provider": "transformers"},
                chunk_position="last",
            )
        )

    def _generate_in_thread(
        self, inputs: dict[str, Any], generation: dict[str, Any], cancelled: threading.Event
    ) -> Iterator[tuple[str, int]]:
        """Run ``generate`` in a worker thread; yield ``(decoded text so far, new token count)``.

        Setting ``cancelled``, or closing the iterator early (a consumer that stops reading), stops
        generation at the next token, or before it starts if another call holds the model. Closing
        also waits for the worker, so the model and its lock are free again when ``close()`` returns.
        """
        streamer = _TokenQueue()
        failure: list[BaseException] = []
        criteria = _with_cancel(generation.get("stopping_criteria"), cancelled)

        def work() -> None:
            lock = model_lock(self.hf_model)
            try:
                while not lock.acquire(timeout=LOCK_POLL_SECONDS):
                    if cancelled.is_set():  # the consumer left while another call held the model
                        return
                try:
                    if not cancelled.is_set():
                        with torch.inference_mode():
                            self.hf_model.generate(
                                **{**inputs, **generation, "stopping_criteria": criteria}, streamer=streamer
                            )
                finally:
                    lock.release()
            except BaseException as exc:  # re-raised in the consuming thread
                failure.append(exc)
            finally:
                streamer.end()

        worker = threading.Thread(target=work, name=GENERATION_THREAD_NAME, daemon=True)
        worker.start()
        tokenizer = self.processor.tokenizer
        ids: list[int] = []
        try:
            for chunk in streamer:
                ids.extend(chunk)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                if not text.endswith("\ufffd"):
                    yield text, len(ids)
        finally:
            cancelled.set()
            worker.join()
        if failure:
            raise failure[0]
        yield tokenizer.decode(ids, skip_special_tokens=True), len(ids)


class _TokenQueue:
    """A transformers streamer: ``generate`` puts token ids, the consumer iterates over new ones.

    The first ``put`` carries the prompt and is skipped.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[list[int] | None] = queue.Queue()
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self._queue.put([int(token) for token in value.reshape(-1).tolist()])

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (item := self._queue.get()) is not None:
            yield item


def _stop_criteria(tokenizer: Any, stop: list[str], prompt_tokens: int) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        """Ends generation once the text generated so far contains a stop string."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_tokens:], skip_special_tokens=True)
            return torch.tensor([any(s in text for s in stop) for text in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


def _with_cancel(criteria: Any, cancelled: threading.Event) -> Any:
    """``criteria`` (a ``StoppingCriteriaList`` or ``None``) plus one that stops once ``cancelled`` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopWhenCancelled(StoppingCriteria):
        """Ends generation for every sequence once the consumer has gone away."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([*(criteria or []), StopWhenCancelled()])


def _as_chunk(message: AIMessage) -> AIMessageChunk:
    return AIMessageChunk(
        content=message.content,
        tool_call_chunks=[
            {
                "name": call["name"],
                "args": json.dumps(call["args"]),
                "id": call["id"],
                "index": index,
                "type": "tool_call_chunk",
            }
            for index, call in enumerate(message.tool_calls)
        ],
        invalid_tool_calls=message.invalid_tool_calls,
        usage_metadata=message.usage_metadata,
        response_metadata=message.response_metadata,
        chunk_position="last",
    )
