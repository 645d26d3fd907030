"""Move images returned by tools into a user message, for chat backends that reject them in tool messages.

The attention-prompting tool answers with a text block and an image block inside a ``ToolMessage``.
OpenAI's Chat Completions API (and most OpenAI-compatible servers such as vLLM), Ollama and the chat
templates of most local models accept images only in user messages. :class:`ImageToolMessageMiddleware`
rewrites the *request* sent to the model (the agent's state is never changed):

* every run of consecutive ``ToolMessage`` s loses its image blocks, which are gathered, each labelled
  with the tool call it came from, into one ``HumanMessage`` placed right after the run;
* only the newest ``keep_last`` tool images are sent at all; older ones become a short text note;
* tool images of earlier turns are downscaled to ``history_max_side`` pixels (the newest run is sent
  at full size).

The pure function :func:`hoist_tool_images` does the work; the middleware only decides whether to hoist
(``mode``) and calls it.

Example:
    >>> from langchain.agents import create_agent  # doctest: +SKIP
    >>> middleware = [ImageToolMessageMiddleware()]
    >>> agent = create_agent(model, [AttentionPromptTool()], middleware=middleware)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.agents.middleware.types import ModelCallResult
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AnyMessage, HumanMessage, ToolMessage

from api_tool.errors import ImageLoadError, InvalidParameterError
from api_tool.images import encode_image, load_image
from api_tool.tool import image_base64, is_image_block

HoistMode = Literal["auto", "always", "never"]
HOIST_MODES: tuple[str, ...] = ("auto", "always", "never")

DROPPED_IMAGE_NOTE = "[an older image returned by this tool was removed to keep the conversation short]"


@functools.lru_cache(maxsize=64)
def _downscaled(data: str, mime_type: str, max_side: int) -> tuple[str, str]:
    image = load_image(data)
    if max(image.size) <= max_side:
        return data, mime_type
    return encode_image(image, format="JPEG" if mime_type == "image/jpeg" else "PNG", max_side=max_side)


def downscale_image_block(block: dict[str, Any], max_side: int) -> dict[str, Any]:
    """A standard image block no larger than ``max_side`` pixels; URL images and bad data pass unchanged."""
    inline = image_base64(block)
    if inline is None:
        return block
    try:
        data, mime_type = _downscaled(inline[0], inline[1], max_side)
    except ImageLoadError:
        return block
    if data == inline[0]:
        return block
    return {"type": "image", "base64": data, "mime_type": mime_type}


def hoist_tool_images(
    messages: Sequence[AnyMessage],
    *,
    hoist: bool = True,
    keep_last: int | None = 3,
    history_max_side: int | None = 512,
) -> list[AnyMessage]:
    """The request's messages with tool images moved into user messages (when ``hoist``) and trimmed.

    Args:
        messages: the conversation sent to the model (no system message needed).
        hoist: move image blocks out of each run of consecutive ``ToolMessage`` s into one
            ``HumanMessage`` right after the run; ``False`` leaves them in place (only trimming).
        keep_last: how many of the newest tool images to send; older ones become a text note.
            ``None`` keeps all.
        history_max_side: longest side, in pixels, of tool images before the newest run of tool
            messages; ``None`` sends them at full size.

    Messages without tool images are returned as the same objects; changed ones are copies.

    Example:
        >>> from langchain_core.messages import ToolMessage
        >>> block = {"type": "image", "url": "https://example.com/a.png"}
        >>> out = hoist_tool_images([ToolMessage(content=["done", block], tool_call_id="c1")])
        >>> [type(m).__name__ for m in out], out[0].content
        (['ToolMessage', 'HumanMessage'], 'done\\n(image 1 is in the next user message)')
    """
    if keep_last is not None and keep_last < 0:
        raise InvalidParameterError(f"keep_last must be >= 0 or None, got {keep_last}")
    if history_max_side is not None and history_max_side < 1:
        raise InvalidParameterError(f"history_max_side must be a positive number of pixels, got {history_max_side}")
    positions = [
        (index, block_index)
        for index, message in enumerate(messages)
        if isinstance(message, ToolMessage) and isinstance(message.content, list)
        for block_index, block in enumerate(message.content)
        if is_image_block(block)
    ]
    if not positions:
        return list(messages)
    kept = set(positions if keep_last is None else positions[len(positions) - min(keep_last, len(positions)) :])
    indices_with_images = {index for index, _ in positions}
    newest_run_start = _run_start(messages, positions[-1][0])

    output: list[AnyMessage] = []
    pending: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if index not in indices_with_images:
            if pending and not isinstance(message, ToolMessage):
                output.append(_images_message(pending))
                pending = []
            output.append(message)
            continue
        new_content: list[str | dict[str, Any]] = []
        moved: list[int] = []
        for block_index, block in enumerate(message.content):
            if not is_image_block(block):
                new_content.append(block)
            elif (index, block_index) not in kept:
                new_content.append({"type": "text", "text": DROPPED_IMAGE_NOTE})
            else:
                assert isinstance(block, dict)
                if history_max_side is not None and index < newest_run_start:
                    block = downscale_image_block(block, history_max_side)
                if hoist:
                    pending.append(_labelled(block, message, len(pending) + 1))
                    moved.append(len(pending))
                else:
                    new_content.append(block)
        if hoist:
            output.append(message.model_copy(update={"content": _text_with_note(new_content, moved)}))
        else:
            output.append(message.model_copy(update={"content": new_content}))
    if pending:
        output.append(_images_message(pending))
    return output


def _run_start(messages: Sequence[AnyMessage], index: int) -> int:
    while index > 0 and isinstance(messages[index - 1], ToolMessage):
        index -= 1
    return index


def _labelled(block: dict[str, Any], message: ToolMessage, number: int) -> dict[str, Any]:
    source = f"{message.name} " if message.name else ""
    label = f"Image {number}, returned by the {source}tool call {message.tool_call_id}:"
    return {"label": label, "block": block}


def _images_message(pending: list[dict[str, Any]]) -> HumanMessage:
    content: list[str | dict[str, Any]] = []
    for item in pending:
        content.append({"type": "text", "text": item["label"]})
        content.append(item["block"])
    return HumanMessage(content=content)


def _text_with_note(content: list[str | dict[str, Any]], moved: list[int]) -> str:
    texts = [
        block if isinstance(block, str) else str(block.get("text", ""))
        for block in content
        if isinstance(block, str) or block.get("type") == "text"
    ]
    if moved:
        numbers = ", ".join(str(number) for number in moved)
        noun = "image" if len(moved) == 1 else "images"
        verb = "is" if len(moved) == 1 else "are"
        texts.append(f"({noun} {numbers} {verb} in the next user message)")
    return "\n".join(text for text in texts if text)


def accepts_tool_message_images(model: BaseChatModel) -> bool:
    """Whether ``model`` is known to read images inside tool messages.

    True only when ``model.profile["image_tool_message"]`` is true and, for models with a
    ``use_responses_api`` switch (``ChatOpenAI``), that switch is on: the profile describes the model,
    and OpenAI's Chat Completions endpoint rejects images in tool messages whatever the model.
    """
    profile = getattr(model, "profile", None) or {}
    if not profile.get("image_tool_message", False):
        return False
    return getattr(model, "use_responses_api", True) is True


class ImageToolMessageMiddleware(AgentMiddleware):
    """Agent middleware: tool-returned images reach the model as a user message; old ones are trimmed.

    Args:
        mode: ``"auto"`` hoists unless :func:`accepts_tool_message_images` says the model reads images in
            tool messages; ``"always"`` and ``"never"`` force the choice. Trimming applies in every mode.
        keep_last: how many of the newest tool images to send (``None``: all).
        history_max_side: longest side of tool images from earlier turns (``None``: full size).

    Example:
        >>> from langchain.agents import create_agent  # doctest: +SKIP
        >>> agent = create_agent(model, tools, middleware=[ImageToolMessageMiddleware(keep_last=2)])  # doctest: +SKIP
    """

    def __init__(
        self, *, mode: HoistMode = "auto", keep_last: int | None = 3, history_max_side: int | None = 512
    ) -> None:
        super().__init__()
        if mode not in HOIST_MODES:
            raise InvalidParameterError(f"mode must be one of {HOIST_MODES}, got {mode!r}")
        if keep_last is not None and keep_last < 0:
            raise InvalidParameterError(f"keep_last must be >= 0 or None, got {keep_last}")
        if history_max_side is not None and history_max_side < 1:
            raise InvalidParameterError(f"history_max_side must be a positive number of pixels, got {history_max_side}")
        self.mode = mode
        self.keep_last = keep_last
        self.history_max_side = history_max_side

    def should_hoist(self, model: BaseChatModel) -> bool:
        """Whether images leave the tool messages for this model."""
        if self.mode == "auto":
            return not accepts_tool_message_images(model)
        return self.mode == "always"

    def rewrite_request(self, request: ModelRequest) -> ModelRequest:
        """The request with its messages passed through :func:`hoist_tool_images`."""
        messages = hoist_tool_images(
            request.messages,
            hoist=self.should_hoist(request.model),
            keep_last=self.keep_last,
            history_max_side=self.history_max_side,
        )
        return request.override(messages=messages)

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ModelCallResult:
        """Rewrite the request, then call the model."""
        return handler(self.rewrite_request(request))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ModelCallResult:
        """Rewrite the request in a worker thread (images may be decoded), then call the model."""
        return await handler(await asyncio.to_thread(self.rewrite_request, request))
