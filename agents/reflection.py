"""The self-reflection loop: answer, annotate with attention prompting, re-ask, keep or revise.

A langgraph ``StateGraph``::

    answer -> annotate -> reflect -> (annotate | END)

* ``answer``: the target model answers the question on the original image (skipped when the caller
  passes ``first_answer``);
* ``annotate``: the tool builds the attention-prompted image. Round 1 queries the question, as the
  paper does; later rounds query the question and the current answer (the same query would give the
  same image). A backend that scores answers (LLaVA self-attribution) scores the current answer;
  The ``zoom`` strategy's annotation is the crop of the attended region resized to the tool's
  ``zoom_size`` (``style="zoom"``), from a tiled map when the image is large (the tool's ``tiles``,
  ``"auto"`` by default); its box in the original image goes into the trace (``crop_box``);
* ``reflect``: the target is re-asked with the strategy's images and text (see ``agents.prompts``);
* another round runs while rounds are left and the last one changed the answer.

Self mode: with ``tool=None`` and a target that is a :class:`~agents.chat_models.ChatTransformersVLM`
wrapping a model of an LVLM family (``api-prompt models``), the attributor is
``LvlmAttributor.from_model`` on that same model, and it scores the target's own answer (the paper's
g = f case). Otherwise the default tool uses the demo CLIP.

Example:
    >>> from agents import ChatTransformersVLM, reflect
    >>> vlm = ChatTransformersVLM.from_pretrained("demo")  # doctest: +SKIP
    >>> result = reflect("Is there a red circle?", "scene.png", vlm, max_rounds=2)  # doctest: +SKIP
    >>> result.first_answer, result.final_answer, result.changed  # doctest: +SKIP
    ('no', 'yes', True)
"""

from __future__ import annotations

import asyncio
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from PIL import Image

from agents.chat_models import ChatTransformersVLM
from agents.prompts import IMAGE_LABELS, ReflectionStrategy, get_strategy, parse_final_answer
from api_tool.errors import InvalidParameterError, UnsupportedModelError
from api_tool.images import ImageRef, encode_image, load_image
from api_tool.prompt import PromptedImage
from api_tool.tool import AttentionPromptTool, scores_answers

_PUNCTUATION = re.compile(r"[^\w\s]")


def _merge_timings(left: dict[str, float], right: dict[str, float]) -> dict[str, float]:
    return {key: left.get(key, 0.0) + right.get(key, 0.0) for key in {*left, *right}}


class ReflectionState(TypedDict, total=False):
    """The graph's state. Images are ``data:`` URIs so that any checkpointer can store the state."""

    question: str
    image: str
    first_answer: str
    answer: str
    round: int
    annotation: dict[str, Any] | None
    trace: Annotated[list[dict[str, Any]], operator.add]
    timings: Annotated[dict[str, float], _merge_timings]


@dataclass(frozen=True)
class ReflectionRound:
    """One annotate + reflect round.

    Attributes:
        index: 1 for the first round.
        strategy: the strategy's name.
        query: what the attributor was asked (``None`` when the strategy uses no annotation).
        scored_answer: the answer the attributor scored (self mode), or ``None``.
        prompt: the re-ask text sent with the images.
        reply: the target's raw reply.
        answer: the answer after this round.
        parsed: whether the reply held a clear answer (``FINAL:`` line for ``verify``); if not, the
            previous answer was kept.
        changed: whether this round changed the answer.
        annotated_image: the annotated image shown, the crop for ``zoom`` (``None`` when the strategy
            uses none).
        timings: seconds for ``annotate`` and ``reflect``.
        crop_box: for ``zoom``, the crop's ``(x0, y0, x1, y1)`` in pixels of the original image.
    """

    index: int
    strategy: str
    query: str | None
    scored_answer: str | None
    prompt: str
    reply: str
    answer: str
    parsed: bool
    changed: bool
    annotated_image: Image.Image | None
    timings: dict[str, float]
    crop_box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ReflectionResult:
    """What the loop did: the first and final answers, every round, and where the time went.

    Example:
        >>> result.changed, [r.answer for r in result.rounds]  # doctest: +SKIP
        (True, ['yes'])
    """

    question: str
    strategy: str
    first_answer: str
    final_answer: str
    changed: bool
    rounds: list[ReflectionRound]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def annotated_images(self) -> list[Image.Image]:
        """The annotated images shown to the target, one per round that used one."""
        return [r.annotated_image for r in self.rounds if r.annotated_image is not None]

    @classmethod
    def from_state(cls, state: ReflectionState, strategy: str, total_seconds: float) -> ReflectionResult:
        """Build the result from the graph's final state."""
        rounds = [
            ReflectionRound(
                index=entry["round"],
                strategy=strategy,
                query=entry["query"],
                scored_answer=entry["scored_answer"],
                prompt=entry["prompt"],
                reply=entry["reply"],
                answer=entry["answer"],
                parsed=entry["parsed"],
                changed=entry["changed"],
                annotated_image=load_image(entry["annotated_image"]) if entry["annotated_image"] else None,
                timings=dict(entry["timings"]),
                crop_box=tuple(entry["crop_box"]) if entry.get("crop_box") else None,  # type: ignore[arg-type]
            )
            for entry in state.get("trace", [])
        ]
        timings = {"answer": 0.0, "annotate": 0.0, "reflect": 0.0, **state.get("timings", {})}
        timings["total"] = total_seconds
        return cls(
            question=state["question"],
            strategy=strategy,
            first_answer=state["first_answer"],
            final_answer=state["answer"],
            changed=normalize_answer(state["answer"]) != normalize_answer(state["first_answer"]),
            rounds=rounds,
            timings=timings,
        )


def normalize_answer(answer: str) -> str:
    """Lower case, no punctuation, single spaces: how answers are compared.

    Example:
        >>> normalize_answer("  Yes, a RED circle. ") == normalize_answer("yes a red circle")
        True
    """
    return " ".join(_PUNCTUATION.sub(" ", answer.lower()).split())


def image_data_uri(image: ImageRef, max_side: int | None = None) -> str:
    """The image as a PNG ``data:`` URI (downscaled to ``max_side`` if given)."""
    data, mime_type = encode_image(load_image(image), format="PNG", max_side=max_side)
    return f"data:{mime_type};base64,{data}"


def _image_block(data_uri: str) -> dict[str, Any]:
    header, data = data_uri.split(",", 1)
    return {"type": "image", "base64": data, "mime_type": header[len("data:") : header.index(";")]}


def default_tool(
    target: BaseChatModel, self_attribution: bool | None = None, **attributor_options: Any
) -> AttentionPromptTool:
    """The tool the loop uses when none is given.

    ``self_attribution``: ``None`` uses the target's own attention when it is a ``ChatTransformersVLM``
    wrapping a model of an LVLM family in ``api_tool.families`` (else the demo CLIP); ``True`` requires
    that; ``False`` always uses the demo CLIP. ``attributor_options`` go to ``LvlmAttributor.from_model``
    (``layer`` defaults to the model's ``api_attribution_layer``, else the family's default block).

    Example:
        >>> tool = default_tool(ChatTransformersVLM.from_pretrained("demo"))  # doctest: +SKIP
        >>> tool.backend.name  # doctest: +SKIP
        'llava'
    """
    family = target.self_attribution_family if isinstance(target, ChatTransformersVLM) else None
    if self_attribution is True and family is None:
        raise UnsupportedModelError(
            "self_attribution=True needs a ChatTransformersVLM target wrapping a model of an LVLM family "
            f"('api-prompt models' lists them); got {type(target).__name__}"
        )
    if family is not None and self_attribution is not False:
        assert isinstance(target, ChatTransformersVLM)
        from api_tool.backends.llava import LlavaAttributor
        from api_tool.backends.lvlm import LvlmAttributor

        attributor_class = LlavaAttributor if family == "llava" else LvlmAttributor
        attributor = attributor_class.from_model(target.hf_model, target.processor, **attributor_options)
        return AttentionPromptTool(attributor=attributor)
    return AttentionPromptTool()


class _ReflectionNodes:
    """The graph's nodes, sync and async, bound to one target, tool and strategy."""

    def __init__(
        self,
        target: BaseChatModel,
        tool: AttentionPromptTool,
        strategy: ReflectionStrategy,
        max_rounds: int,
        system_prompt: str | None,
    ) -> None:
        self.target = target
        self.tool = tool
        self.strategy = strategy
        self.max_rounds = max_rounds
        self.system_prompt = system_prompt
        self.scores_answers = strategy.uses_annotation and scores_answers(tool.backend)
        self.zooms = "crop" in strategy.images

    def _messages(self, content: list[dict[str, Any]]) -> list[BaseMessage]:
        human = HumanMessage(content=content)  # type: ignore[arg-type]
        return [SystemMessage(self.system_prompt), human] if self.system_prompt else [human]

    def answer_messages(self, state: ReflectionState) -> list[BaseMessage]:
        """The first question: the original image, then the question."""
        return self._messages([_image_block(state["image"]), {"type": "text", "text": state["question"]}])

    def _answered(self, state: ReflectionState, reply: BaseMessage | None, seconds: float) -> dict[str, Any]:
        first = state["first_answer"] if reply is None else reply.text.strip()
        return {"first_answer": first, "answer": first, "round": 0, "timings": {"answer": seconds}}

    def answer(self, state: ReflectionState) -> dict[str, Any]:
        """Node: the target's first answer (kept when the caller supplied one)."""
        if state.get("first_answer") is not None:
            return self._answered(state, None, 0.0)
        start = time.perf_counter()
        reply = self.target.invoke(self.answer_messages(state))
        return self._answered(state, reply, time.perf_counter() - start)

    async def aanswer(self, state: ReflectionState) -> dict[str, Any]:
        """Async node: the target's first answer."""
        if state.get("first_answer") is not None:
            return self._answered(state, None, 0.0)
        start = time.perf_counter()
        reply = await self.target.ainvoke(self.answer_messages(state))
        return self._answered(state, reply, time.perf_counter() - start)

    def query(self, state: ReflectionState, round_index: int) -> tuple[str, str | None]:
        """What the attributor is asked this round, and which answer it scores (self mode)."""
        if self.scores_answers:
            return state["question"], state["answer"]
        if round_index == 1:
            return state["question"], None
        return f"{state['question']} {state['answer']}", None

    def _annotation(self, state: ReflectionState) -> tuple[int, str, str | None]:
        round_index = state.get("round", 0) + 1
        query, scored = self.query(state, round_index)
        return round_index, query, scored

    def _annotated(
        self, round_index: int, query: str, scored: str | None, prompted: PromptedImage, seconds: float
    ) -> dict:
        data, mime_type = encode_image(prompted.image, format=self.tool.image_format, max_side=self.tool.max_side)
        annotation = {
            "image": f"data:{mime_type};base64,{data}",
            "query": query,
            "scored_answer": scored,
            "seconds": seconds,
            "crop_box": list(prompted.crop_box) if self.zooms and prompted.crop_box is not None else None,
        }
        return {"round": round_index, "annotation": annotation, "timings": {"annotate": seconds}}

    def _prompted(self, image: str, query: str, scored: str | None) -> PromptedImage:
        """The tool's output for this round: the crop of the attended region for ``zoom``, else its style."""
        if not self.zooms:
            return self.tool.annotate(image, query, answer=scored)
        return self.tool.annotate(image, query, answer=scored, style="zoom")

    def annotate(self, state: ReflectionState) -> dict[str, Any]:
        """Node: the attention-prompted image (the crop for ``zoom``) for this round (nothing for ``iterative``)."""
        round_index, query, scored = self._annotation(state)
        if not self.strategy.uses_annotation:
            return {"round": round_index, "annotation": None}
        start = time.perf_counter()
        prompted = self._prompted(state["image"], query, scored)
        return self._annotated(round_index, query, scored, prompted, time.perf_counter() - start)

    async def aannotate(self, state: ReflectionState) -> dict[str, Any]:
        """Async node: as ``annotate``, the model work in a worker thread."""
        round_index, query, scored = self._annotation(state)
        if not self.strategy.uses_annotation:
            return {"round": round_index, "annotation": None}
        start = time.perf_counter()
        prompted = await asyncio.to_thread(self._prompted, state["image"], query, scored)
        return self._annotated(round_index, query, scored, prompted, time.perf_counter() - start)

    def reask_messages(self, state: ReflectionState) -> tuple[list[BaseMessage], str]:
        """The re-ask: each of the strategy's images with its label, then the strategy's text."""
        prompt = self.strategy.render(question=state["question"], answer=state["answer"])
        annotation = state.get("annotation")
        shown = annotation["image"] if annotation else None
        sources = {"original": state["image"], "annotated": shown, "crop": shown}
        content: list[dict[str, Any]] = []
        for role in self.strategy.images:
            source = sources[role]
            assert source is not None
            if len(self.strategy.images) > 1:
                content.append({"type": "text", "text": IMAGE_LABELS[role]})
            content.append(_image_block(source))
        content.append({"type": "text", "text": prompt})
        return self._messages(content), prompt

    def _reflected(self, state: ReflectionState, prompt: str, reply: BaseMessage, seconds: float) -> dict[str, Any]:
        text = reply.text.strip()
        previous = state["answer"]
        parsed_answer = parse_final_answer(text) if self.strategy.needs_final_line else (text or None)
        answer = parsed_answer if parsed_answer is not None else previous
        annotation = state.get("annotation") or {}
        entry = {
            "round": state["round"],
            "query": annotation.get("query"),
            "scored_answer": annotation.get("scored_answer"),
            "prompt": prompt,
            "reply": text,
            "answer": answer,
            "parsed": parsed_answer is not None,
            "changed": normalize_answer(answer) != normalize_answer(previous),
            "annotated_image": annotation.get("image"),
            "crop_box": annotation.get("crop_box"),
            "timings": {"annotate": annotation.get("seconds", 0.0), "reflect": seconds},
        }
        return {"answer": answer, "trace": [entry], "timings": {"reflect": seconds}}

    def reflect(self, state: ReflectionState) -> dict[str, Any]:
        """Node: re-ask the target and read its (possibly revised) answer."""
        messages, prompt = self.reask_messages(state)
        start = time.perf_counter()
        reply = self.target.invoke(messages)
        return self._reflected(state, prompt, reply, time.perf_counter() - start)

    async def areflect(self, state: ReflectionState) -> dict[str, Any]:
        """Async node: re-ask the target."""
        messages, prompt = self.reask_messages(state)
        start = time.perf_counter()
        reply = await self.target.ainvoke(messages)
        return self._reflected(state, prompt, reply, time.perf_counter() - start)

    def next_step(self, state: ReflectionState) -> str:
        """Another round while rounds are left and the last round changed the answer."""
        last = state["trace"][-1]
        return "annotate" if state["round"] < self.max_rounds and last["changed"] else END


def build_reflection_graph(
    target: BaseChatModel,
    tool: AttentionPromptTool | None = None,
    *,
    max_rounds: int = 1,
    strategy: str = "verify",
    system_prompt: str | None = None,
    self_attribution: bool | None = None,
    checkpointer: Any = None,
) -> CompiledStateGraph:
    """The compiled loop graph. Input ``{"question": str, "image": data URI}`` (plus ``"first_answer"``
    to skip the first call); output state with ``first_answer``, ``answer`` and the per-round ``trace``.

    Example:
        >>> graph = build_reflection_graph(vlm, AttentionPromptTool(), max_rounds=2)  # doctest: +SKIP
        >>> state = graph.invoke({"question": "Is there a cat?", "image": image_data_uri("cat.png")})  # doctest: +SKIP
        >>> state["answer"]  # doctest: +SKIP
        'yes'
    """
    if max_rounds < 1:
        raise InvalidParameterError(f"max_rounds must be at least 1, got {max_rounds}")
    chosen = get_strategy(strategy)
    nodes = _ReflectionNodes(target, tool or default_tool(target, self_attribution), chosen, max_rounds, system_prompt)
    graph = StateGraph(ReflectionState)
    graph.add_node("answer", _node(nodes.answer, nodes.aanswer, "answer"))
    graph.add_node("annotate", _node(nodes.annotate, nodes.aannotate, "annotate"))
    graph.add_node("reflect", _node(nodes.reflect, nodes.areflect, "reflect"))
    graph.add_edge(START, "answer")
    graph.add_edge("answer", "annotate")
    graph.add_edge("annotate", "reflect")
    graph.add_conditional_edges("reflect", nodes.next_step, ["annotate", END])
    return graph.compile(checkpointer=checkpointer, name="api_reflection")


def _node(sync: Callable[..., dict[str, Any]], asynchronous: Callable[..., Any], name: str) -> RunnableLambda:
    return RunnableLambda(sync, afunc=asynchronous, name=name)


def _inputs(question: str, image: ImageRef, first_answer: str | None, image_max_side: int | None) -> dict[str, Any]:
    inputs: dict[str, Any] = {"question": question, "image": image_data_uri(image, image_max_side)}
    if first_answer is not None:
        inputs["first_answer"] = first_answer
    return inputs


def reflect(
    question: str,
    image: ImageRef,
    target: BaseChatModel,
    tool: AttentionPromptTool | None = None,
    *,
    max_rounds: int = 1,
    strategy: str = "verify",
    first_answer: str | None = None,
    system_prompt: str | None = None,
    self_attribution: bool | None = None,
    image_max_side: int | None = None,
) -> ReflectionResult:
    """Run the loop once: first answer, annotated image(s), final answer, and the trace.

    Args:
        question: the question about the image.
        image: path, PIL image, bytes, base64 or data URI.
        target: any LangChain chat model that reads images (ChatOpenAI, ChatOllama, ChatTransformersVLM...).
        tool: the annotation tool; ``None`` picks one (see :func:`default_tool`).
        max_rounds: most annotate + reflect rounds; the loop stops early once a round keeps the answer.
        strategy: ``verify``, ``masked``, ``masked_hint``, ``zoom`` or ``iterative`` (see ``agents.prompts``).
        first_answer: a first answer already known (the first model call is skipped).
        system_prompt: a system message sent with every call to the target.
        self_attribution: see :func:`default_tool`.
        image_max_side: downscale the original image sent to the target to this longest side.

    Example:
        >>> result = reflect("What colour is the ball?", "ball.jpg", ChatOpenAI(model="gpt-4o"))  # doctest: +SKIP
        >>> print(result.first_answer, "->", result.final_answer)  # doctest: +SKIP
    """
    graph = build_reflection_graph(
        target,
        tool,
        max_rounds=max_rounds,
        strategy=strategy,
        system_prompt=system_prompt,
        self_attribution=self_attribution,
    )
    start = time.perf_counter()
    state = graph.invoke(
        _inputs(question, image, first_answer, image_max_side), {"recursion_limit": 2 * max_rounds + 8}
    )
    return ReflectionResult.from_state(state, strategy, time.perf_counter() - start)  # type: ignore[arg-type]


async def areflect(
    question: str,
    image: ImageRef,
    target: BaseChatModel,
    tool: AttentionPromptTool | None = None,
    *,
    max_rounds: int = 1,
    strategy: str = "verify",
    first_answer: str | None = None,
    system_prompt: str | None = None,
    self_attribution: bool | None = None,
    image_max_side: int | None = None,
) -> ReflectionResult:
    """Async :func:`reflect`: model calls through ``ainvoke``, image work in worker threads.

    Example:
        >>> result = await areflect("Is there a dog?", "park.jpg", ChatOllama(model="llava"))  # doctest: +SKIP
    """
    graph = await asyncio.to_thread(  # may load models: keep the event loop free
        build_reflection_graph,
        target,
        tool,
        max_rounds=max_rounds,
        strategy=strategy,
        system_prompt=system_prompt,
        self_attribution=self_attribution,
    )
    start = time.perf_counter()
    inputs = await asyncio.to_thread(_inputs, question, image, first_answer, image_max_side)
    state = await graph.ainvoke(inputs, {"recursion_limit": 2 * max_rounds + 8})
    return ReflectionResult.from_state(state, strategy, time.perf_counter() - start)  # type: ignore[arg-type]
