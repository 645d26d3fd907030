"""Attention prompting as a LangChain tool: ``AttentionPromptTool`` (name ``attention_prompt``).

The model passes a ``question`` and, optionally, an ``image``; left empty, the tool takes the most
recent image the user sent in the conversation (read from the agent state through an injected
``ToolRuntime``, so the model never copies base64 into a call). Every argument is a plain JSON-schema
``string``, so clients that drop ``anyOf`` (Ollama) still send a typed schema. The tool answers with
``response_format="content_and_artifact"``:

* content (sent to the model): a short text (what was highlighted, with which backend, how long it
  took) and a standard image block ``{"type": "image", "base64": ..., "mime_type": "image/png"}``;
* artifact (kept in the ``ToolMessage``, never sent): the pixel-size mask, the ``AttributionMap``
  and the parameters used.

Which images the model may name: the user's images in the conversation (``conversation:N``), data
URIs and base64 strings; ``http(s)`` URLs only with ``allow_remote=True``; file paths only inside
``allowed_dirs`` (empty by default, so a prompt-injected document cannot make the agent read a local
file and send it to the model's provider). A path is resolved with ``~`` expanded and symlinks followed
and must name an existing file inside one of the (resolved) allowed directories; ``file:`` URIs are
refused. A refused path raises ``ImagePathNotAllowedError`` (reported to the model as an error telling it
to use the conversation's images). Python code calling ``annotate`` directly is trusted with any path.

Bad input (no image, unreadable or refused image, empty question, bad option) raises ``ToolException``
with a message the model can act on; ``handle_tool_error=True`` turns it into an error ``ToolMessage``.
Arguments that do not fit the schema (no ``question``, a non-string) become an error ``ToolMessage``
too, naming the argument and what it should be (``handle_validation_error=validation_error_message``).
The attributor is resolved once, on first use, through ``api_tool.backends.registry`` and shared.

Example:
    >>> from api_tool.tool import AttentionPromptTool
    >>> tool = AttentionPromptTool(attributor="demo", max_side=512, allowed_dirs=["img"])  # doctest: +SKIP
    >>> message = tool.invoke({"type": "tool_call", "id": "1", "name": "attention_prompt",
    ...                        "args": {"image": "img/a.jpg", "question": "what is on the table?"}})  # doctest: +SKIP
    >>> message.content[1]["type"], message.artifact["mask"].shape  # doctest: +SKIP
    ('image', (480, 640))
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from langchain.tools import ToolRuntime
from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.tools import ArgsSchema, BaseTool, InjectedToolArg, ToolException
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator
from pydantic.v1 import ValidationError as ValidationErrorV1

from api_tool.backends.base import Attributor, check_query
from api_tool.backends.registry import get_attributor
from api_tool.demo_notice import DEMO_NOTICE, first_notice, is_demo_model, is_user_image
from api_tool.errors import ApiPromptingError, ImageLoadError, ImagePathNotAllowedError, InvalidParameterError
from api_tool.image_refs import load_named_image, resolve_allowed_dirs
from api_tool.images import ImageRef, encode_image, load_image
from api_tool.maps import AttributionMap
from api_tool.prompt import PromptedImage, attention_prompt
from api_tool.render import ZOOM_SIZE, Style
from api_tool.tiling import Tiles

TOOL_NAME = "attention_prompt"
TOOL_DESCRIPTION = (
    "Attention prompting: returns the image with the regions relevant to a question kept and the rest "
    "darkened, so you can look again at the right place. Use it when the answer depends on a detail, a "
    "count, a colour, whether something is present, or when you are unsure. Leave `image` out to use the "
    "most recent image the user sent."
)
IMAGE_BLOCK_TYPES = frozenset({"image", "image_url"})
_CONVERSATION_REF = re.compile(r"^\s*(?:conversation|image)\s*[:#]?\s*(?P<index>-?\d+)\s*$", re.IGNORECASE)
_LATEST_REFS = frozenset({"", "latest", "last", "conversation", "current", "the image", "user image"})
_USE_CONVERSATION = (
    "Leave `image` empty to use the latest image the user sent, or pass 'conversation:N' for the N-th one."
)


class AttentionPromptInput(BaseModel):
    """Arguments of ``attention_prompt``; ``runtime`` is injected by the agent and hidden from the model."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    question: str = Field(
        description="The user's question (or the thing to look for), e.g. 'what colour is the car on the left?'"
    )
    image: str = Field(
        default="",
        description=(
            "Which image to annotate. Leave empty to use the most recent image the user sent. Or "
            "'conversation:N' for the N-th image the user sent (1 = first, -1 = latest), or a data URI or "
            "base64 string. File paths are read only from directories the developer allowed."
        ),
    )
    runtime: Annotated[ToolRuntime | None, InjectedToolArg] = None

    @field_validator("question")
    @classmethod
    def _check_question(cls, value: str) -> str:
        return check_query(value)

    @field_validator("image", mode="before")
    @classmethod
    def _none_is_the_latest_image(cls, value: object) -> object:
        return "" if value is None else value


def validation_error_message(error: ValidationError | ValidationErrorV1) -> str:
    """The error text the model reads when its arguments do not fit ``AttentionPromptInput``: each problem,
    named by argument, with what that argument should be (``handle_validation_error`` of the tool).

    Example:
        >>> try:
        ...     AttentionPromptInput.model_validate({})
        ... except ValidationError as error:
        ...     print(validation_error_message(error))  # doctest: +ELLIPSIS
        attention_prompt was called with invalid arguments: `question` is required (The user's question ...
    """
    problems = []
    for detail in error.errors():
        name = ".".join(str(part) for part in detail["loc"])
        if detail["type"] == "missing":
            problem = f"`{name}` is required"
        else:
            problem = f"`{name}`: {str(detail['msg']).removeprefix('Value error, ')}"
        field = AttentionPromptInput.model_fields.get(name)
        if field is not None and field.description:
            problem += f" ({field.description})"
        problems.append(problem)
    return f"{TOOL_NAME} was called with invalid arguments: {'; '.join(problems)}. Call it again with them fixed."


def is_image_block(block: object) -> bool:
    """True for a content block that carries an image (standard, legacy v0 or OpenAI ``image_url``)."""
    return isinstance(block, dict) and block.get("type") in IMAGE_BLOCK_TYPES


def image_base64(block: dict[str, Any]) -> tuple[str, str] | None:
    """``(base64, mime type)`` of an inline image block, or ``None`` for a URL or file-id image.

    Example:
        >>> image_base64({"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}})
        ('/9j/', 'image/jpeg')
    """
    if block.get("type") == "image":
        data = block.get("base64") or (block.get("data") if block.get("source_type") == "base64" else None)
        if isinstance(data, str):
            return data, str(block.get("mime_type") or "image/png")
        return None
    url = _image_url(block)
    if isinstance(url, str) and url.startswith("data:image/") and ";base64," in url:
        header, data = url.split(",", 1)
        return data, header[len("data:") : header.index(";")]
    return None


def image_source(block: dict[str, Any]) -> str | None:
    """A ``data:`` URI or URL for an image block, or ``None`` when it has neither (e.g. a file id).

    Example:
        >>> image_source({"type": "image", "base64": "iVBORw0KGgo=", "mime_type": "image/png"})
        'data:image/png;base64,iVBORw0KGgo='
    """
    inline = image_base64(block)
    if inline is not None:
        return f"data:{inline[1]};base64,{inline[0]}"
    url = block.get("url") if block.get("type") == "image" else _image_url(block)
    return url if isinstance(url, str) else None


def _image_url(block: dict[str, Any]) -> object:
    image_url = block.get("image_url")
    return image_url.get("url") if isinstance(image_url, dict) else image_url


def user_image_sources(messages: Sequence[BaseMessage]) -> list[str]:
    """The images the user sent (``HumanMessage`` image blocks), oldest first, as data URIs or URLs."""
    sources = []
    for message in messages:
        if isinstance(message, HumanMessage) and isinstance(message.content, list):
            for block in message.content:
                if is_image_block(block):
                    source = image_source(block)  # type: ignore[arg-type]
                    if source is not None:
                        sources.append(source)
    return sources


def conversation_image_index(reference: str | None) -> int | None:
    """Which user image a reference names: ``-1`` for "latest" (or no reference), ``N-1`` for
    ``"conversation:N"``, negative ``N`` from the end; ``None`` when it is not a conversation reference.

    Example:
        >>> [conversation_image_index(ref) for ref in (None, "conversation:2", "conversation:-2", "a.png")]
        [-1, 1, -2, None]
    """
    if reference is None or reference.strip().lower() in _LATEST_REFS:
        return -1
    match = _CONVERSATION_REF.match(reference)
    if match is None:
        return None
    number = int(match.group("index"))
    if number == 0:
        raise InvalidParameterError("conversation image numbers start at 1 (or -1 for the latest); got 0")
    return number - 1 if number > 0 else number


class AnswerScoringAttributor:
    """An attributor that scores a given answer: ``attribute(image, query)`` calls the wrapped
    backend's ``attribute(image, query, answer=answer)`` (LLaVA self-attribution, the paper's g = f)."""

    def __init__(self, backend: Attributor, answer: str) -> None:
        self.backend = backend
        self.answer = answer
        self.name = f"{backend.name}+answer"

    def attribute(self, image: ImageRef, query: str) -> AttributionMap:
        """The backend's map for ``query`` while generating ``answer``."""
        return self.backend.attribute(image, query, answer=self.answer)  # type: ignore[call-arg]

    def attribute_batch(self, images: Sequence[ImageRef], queries: Sequence[str]) -> list[AttributionMap]:
        """One map per pair, all scoring the same answer."""
        return [self.attribute(image, query) for image, query in zip(images, queries)]

    def attribute_many(self, image: ImageRef, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per query on one image, all scoring the same answer."""
        return [self.attribute(image, query) for query in queries]


def scores_answers(attributor: Attributor) -> bool:
    """Whether ``attributor.attribute`` takes an ``answer`` (it can score a given answer)."""
    try:
        return "answer" in inspect.signature(attributor.attribute).parameters
    except (TypeError, ValueError):
        return False


def describe_attributor(attributor: Attributor) -> str:
    """A short name for messages: the backend and, when known, its model."""
    model = getattr(attributor, "model_name", None)
    return f"{attributor.name} ({model})" if isinstance(model, str) else str(attributor.name)


class AttentionPromptTool(BaseTool):
    """API (Attention Prompting on Image) as a LangChain tool.

    Fields:
        attributor: an ``Attributor``, a registry spec (``"demo"``, ``"clip:ViT-L-14-336@openai"``,
            ``"llava:<dir>"``) or ``None`` for the offline demo CLIP; resolved once, on first use.
        attributor_options: keyword arguments for ``get_attributor`` (``layer``, ``device``, ...).
        style, gray_level: how the mask is drawn (``api_tool.render``); ``style="zoom"`` returns the crop of
            the attended region resized to ``zoom_size`` (ViCrop), its box named in the text.
        zoom_size: the zoom crop's side in pixels (the target's input; 336 as LLaVA-1.5).
        tiles: tiled attribution for large images (``api_tool.tiling``): ``"auto"`` (the default: tiles only
            for images at least 3x the auxiliary's input), a number of tiles along the longer side, or
            ``None`` (never).
        max_side: longest side of the returned image in pixels (``None``: the original size).
        image_format: ``"PNG"`` or ``"JPEG"`` for the returned image.
        allow_remote: let ``image`` be an ``http(s)`` URL.
        allowed_dirs: directories the model may name image files in (default none: every path in a tool
            call is refused with ``ImagePathNotAllowedError``). Each is resolved once, at construction
            (``~`` expanded, symlinks followed, must exist); a path in a call is resolved the same way and
            must be an existing file inside one of them, so ``..``, symlinks pointing out and ``file:``
            URIs are refused. Images the user sent, data URIs and base64 strings need no permission.
        demo_notice: with a demo attributor, the first result's text (once per process) says what the demo
            was trained on and how to use a real model; set ``False`` when the conversation's images are
            demo scenes themselves (examples, the study), where the sentence would only be noise.

    Example:
        >>> from langchain.agents import create_agent  # doctest: +SKIP
        >>> agent = create_agent(model, [AttentionPromptTool()])  # doctest: +SKIP
    """

    name: str = TOOL_NAME
    description: str = TOOL_DESCRIPTION
    args_schema: ArgsSchema | None = AttentionPromptInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], str] | None = True
    handle_validation_error: bool | str | Callable[[ValidationError | ValidationErrorV1], str] | None = (
        validation_error_message
    )

    attributor: Any = None
    attributor_options: dict[str, Any] = Field(default_factory=dict)
    style: Style = "gray"
    gray_level: int = Field(default=0, ge=0, le=255)
    zoom_size: int = Field(default=ZOOM_SIZE, ge=8)
    tiles: Tiles = "auto"
    max_side: int | None = Field(default=768, ge=1)
    image_format: Literal["PNG", "JPEG"] = "PNG"
    allow_remote: bool = False
    allowed_dirs: list[Path] = Field(default_factory=list)
    demo_notice: bool = True

    _backend: Attributor | None = PrivateAttr(default=None)
    _backend_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @field_validator("attributor")
    @classmethod
    def _check_attributor(cls, value: object) -> object:
        if value is None or isinstance(value, (str, Attributor)):
            return value
        raise InvalidParameterError(
            f"attributor must be an Attributor, a spec string such as 'demo', or None; got {type(value).__name__}"
        )

    @field_validator("allowed_dirs")
    @classmethod
    def _resolve_allowed_dirs(cls, value: list[Path]) -> list[Path]:
        return resolve_allowed_dirs(value)

    @property
    def backend(self) -> Attributor:
        """The attributor, resolved (and for a spec, loaded through the shared registry) on first use."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = get_attributor(self.attributor, **self.attributor_options)
            return self._backend

    def annotate(
        self,
        image: ImageRef,
        question: str,
        *,
        answer: str | None = None,
        style: Style | None = None,
        tiles: Tiles | Literal["default"] = "default",
    ) -> PromptedImage:
        """The prompted image for ``question``; with ``answer`` and a backend that scores answers (LLaVA),
        the map is the one of generating that answer. ``style`` and ``tiles`` override the tool's own for
        this call (the reflection loop's ``zoom`` strategy asks for ``style="zoom"``). The caller is trusted:
        ``image`` may be any path (``allowed_dirs`` only limits the paths a model names in a tool call).

        Raises the package's errors (``ImageLoadError``, ``InvalidQueryError``...) on bad input.

        Example:
            >>> AttentionPromptTool().annotate("photo.jpg", "where is the cat?").image.save("out.png")  # doctest: +SKIP
        """
        backend = self.backend
        if answer is not None and scores_answers(backend):
            backend = AnswerScoringAttributor(backend, answer)
        return attention_prompt(
            image,
            question,
            attributor=backend,
            style=style or self.style,
            gray_level=self.gray_level,
            tiles=self.tiles if tiles == "default" else tiles,
            zoom_size=self.zoom_size,
        )

    def _run(
        self,
        question: str,
        image: str | None = None,
        runtime: ToolRuntime | None = None,
        run_manager: CallbackManagerForToolRun | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        loaded, origin = self._resolve_image(image, runtime)
        try:
            result = self.annotate(loaded, question)
            data, mime_type = encode_image(result.image, format=self.image_format, max_side=self.max_side)
        except ApiPromptingError as exc:
            raise ToolException(f"attention_prompt could not run: {exc}") from exc
        total = result.timings.get("total", sum(result.timings.values()))
        backend = describe_attributor(self.backend)
        if result.crop_box is not None:
            x0, y0, x1, y1 = result.crop_box
            width, height = result.original.size
            action = "Zoomed in on" if self.style == "zoom" else "Cropped to"
            text = (
                f"{action} the region of {origin} most relevant to {question.strip()!r} with the {backend} "
                f"attributor in {total:.2f} s: x {x0}-{x1}, y {y0}-{y1} px of the {width}x{height} image "
                f"({self.style} style). The region follows; check your answer against its details."
            )
        else:
            text = (
                f"Highlighted the regions of {origin} most relevant to {question.strip()!r} with the {backend} "
                f"attributor in {total:.2f} s; the rest is de-emphasised ({self.style} style). "
                "The annotated image follows; check your answer against the highlighted regions."
            )
        if self.demo_notice and is_demo_model(self.backend) and is_user_image(loaded) and first_notice("tool"):
            text = f"{text} {DEMO_NOTICE}"
        content = [{"type": "text", "text": text}, {"type": "image", "base64": data, "mime_type": mime_type}]
        artifact = {
            "mask": result.mask,
            "map": result.map,
            "question": question,
            "image_source": origin,
            "image_size": result.original.size,
            "backend": backend,
            "style": self.style,
            "gray_level": self.gray_level,
            "crop_box": result.crop_box,
            "tiles": result.tiles,
            "max_side": self.max_side,
            "timings": dict(result.timings),
        }
        return content, artifact

    async def _arun(
        self,
        question: str,
        image: str | None = None,
        runtime: ToolRuntime | None = None,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        sync_manager = run_manager.get_sync() if run_manager is not None else None
        return await asyncio.to_thread(self._run, question, image, runtime, sync_manager)

    def _resolve_image(self, image: str | None, runtime: ToolRuntime | None) -> tuple[Image.Image, str]:
        try:
            index = conversation_image_index(image)
        except InvalidParameterError as exc:
            raise ToolException(str(exc)) from exc
        if index is None:
            assert image is not None
            try:
                loaded = load_named_image(
                    image, allowed_dirs=self.allowed_dirs, allow_remote=self.allow_remote, hint=_USE_CONVERSATION
                )
                return loaded, "the given image"
            except ImagePathNotAllowedError as exc:
                raise ToolException(str(exc)) from exc
            except ImageLoadError as exc:
                raise ToolException(f"could not load the image: {exc}. {_USE_CONVERSATION}") from exc
        state = runtime.state if runtime is not None else None
        messages = state.get("messages", []) if isinstance(state, dict) else getattr(state, "messages", [])
        sources = user_image_sources(messages)
        if not sources:
            raise ToolException(
                "no image was given and the conversation holds no user image; pass `image` as a data URI or "
                "base64 string, or ask the user to send the image"
            )
        if not -len(sources) <= index < len(sources):
            raise ToolException(
                f"the conversation holds {len(sources)} user image(s); {image!r} is out of range "
                f"(use conversation:1 .. conversation:{len(sources)}, or leave `image` out for the latest)"
            )
        try:
            loaded = load_image(sources[index], allow_remote=self.allow_remote)
        except ImageLoadError as exc:
            raise ToolException(f"the image in the conversation could not be loaded: {exc}") from exc
        position = index + 1 if index >= 0 else len(sources) + index + 1
        return loaded, f"user image {position} of {len(sources)} in the conversation"
