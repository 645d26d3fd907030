"""Running an evaluation: every pending (item, mode) pair asked of the target chunk by chunk, maps
computed ahead per chunk (:class:`MapCache`), every answer appended to the results log as it comes.

:func:`evaluate` is the entry point (see ``agents.eval`` for the modes and the outputs).

Example:
    >>> from agents.datasets import synthetic_items
    >>> report = evaluate(synthetic_items("random", 20), vlm, out_dir="eval-out",
    ...                   modes=("plain", "api"))  # doctest: +SKIP
    >>> report.summary["modes"]["api"]["pope"]["random"]["f1"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from PIL import Image

from agents.chat_models import ChatTransformersVLM
from agents.datasets import EvalItem, item_image
from agents.eval_options import ANNOTATING_MODES, REFLECTION_MODES, EvalOptions, run_modes
from agents.eval_reports import EvalReport, save_thumbnail, write_reports
from agents.reflection import image_data_uri, reflect
from agents.results_log import RESULTS_FILE, RUN_FILE, ResultsLog, check_run_file, lock_output
from agents.served import ServedChatModel
from api_tool.backends.base import Attributor
from api_tool.errors import EvalRunError, InvalidParameterError
from api_tool.images import ImageRef, load_image
from api_tool.maps import AttributionMap
from api_tool.prompt import attention_prompt
from api_tool.tool import AttentionPromptTool, scores_answers


def image_digest(image: Image.Image) -> str:
    """A content hash of an image's pixels and size (how maps are cached)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.size}{image.mode}".encode())
    return digest.hexdigest()


class MapCache:
    """An attributor that serves maps computed ahead (``prefetch``, one ``attribute_batch`` call) and
    computes, then keeps, any other map on demand. So the ``api`` mode and every reflection strategy
    share one batched map per question.

    Example:
        >>> cache = map_cache(get_attributor("demo"))  # doctest: +SKIP
        >>> cache.prefetch(images, questions)  # doctest: +SKIP
        >>> attention_prompt(images[0], questions[0], attributor=cache)  # doctest: +SKIP
    """

    def __init__(self, backend: Attributor) -> None:
        self.backend = backend
        self.name = backend.name
        self.model_name = getattr(backend, "model_name", None)
        self._maps: dict[tuple[str, str, str | None], AttributionMap] = {}
        self._lock = threading.Lock()

    def prefetch(
        self, images: Sequence[Image.Image], queries: Sequence[str], answers: Sequence[str | None] | None = None
    ) -> float:
        """Compute the maps not yet cached in one batch call; returns the seconds it took."""
        chosen = list(answers) if answers is not None else [None] * len(queries)
        wanted: dict[tuple[str, str, str | None], tuple[Image.Image, str, str | None]] = {}
        for image, query, answer in zip(images, queries, chosen):
            key = (image_digest(image), query, answer)
            if key not in self._maps:
                wanted[key] = (image, query, answer)
        if not wanted:
            return 0.0
        start = time.perf_counter()
        keys = list(wanted)
        batch_images = [wanted[key][0] for key in keys]
        batch_queries = [wanted[key][1] for key in keys]
        batch_answers = [wanted[key][2] for key in keys]
        if any(answer is not None for answer in batch_answers):
            maps = self.backend.attribute_batch(batch_images, batch_queries, answers=batch_answers)  # type: ignore[call-arg]
        else:
            maps = self.backend.attribute_batch(batch_images, batch_queries)
        with self._lock:
            self._maps.update(zip(keys, maps))
        return time.perf_counter() - start

    def _attribute(self, image: ImageRef, query: str, answer: str | None) -> AttributionMap:
        loaded = load_image(image)
        key = (image_digest(loaded), query, answer)
        with self._lock:
            found = self._maps.get(key)
        if found is not None:
            return found
        if answer is None:
            fresh = self.backend.attribute(loaded, query)
        else:
            fresh = self.backend.attribute(loaded, query, answer=answer)  # type: ignore[call-arg]
        with self._lock:
            self._maps[key] = fresh
        return fresh

    def attribute(self, image: ImageRef, query: str) -> AttributionMap:
        """The cached map for ``(image, query)``, computed now if it was not prefetched."""
        return self._attribute(image, query, None)

    def attribute_batch(self, images: Sequence[ImageRef], queries: Sequence[str]) -> list[AttributionMap]:
        """One map per pair (the missing ones computed as one batch)."""
        loaded = [load_image(image) for image in images]
        self.prefetch(loaded, queries)
        return [self.attribute(image, query) for image, query in zip(loaded, queries)]

    def attribute_many(self, image: ImageRef, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per query on one image."""
        loaded = load_image(image)
        return self.attribute_batch([loaded] * len(queries), queries)

    def clear(self) -> None:
        """Forget every cached map."""
        with self._lock:
            self._maps.clear()


class AnswerScoringMapCache(MapCache):
    """A :class:`MapCache` over a backend that scores given answers (LLaVA): ``attribute`` takes ``answer``."""

    def attribute(self, image: ImageRef, query: str, answer: str | None = None) -> AttributionMap:  # type: ignore[override]
        """The cached map for ``(image, query, answer)``; ``answer=None`` is the generation path."""
        return self._attribute(image, query, answer)


def map_cache(backend: Attributor) -> MapCache:
    """A :class:`MapCache` over ``backend``, answer-scoring when the backend is."""
    return AnswerScoringMapCache(backend) if scores_answers(backend) else MapCache(backend)


def describe_error(exc: BaseException) -> str:
    """``"Type: message"``, as failures are reported."""
    return f"{type(exc).__name__}: {exc}"


def failed_run_error(count: int, item_id: str, mode: str, error: str) -> EvalRunError:
    """The error a run stops with when questions failed (``error``: the first failure, ``"Type: message"``)."""
    return EvalRunError(
        f"{count} question(s) failed, first {item_id!r} in mode {mode!r}: {error}; "
        "the answers obtained so far are saved, rerun with --resume to continue"
    )


def _image_block(image: Image.Image) -> dict[str, Any]:
    header, data = image_data_uri(image).split(",", 1)
    return {"type": "image", "base64": data, "mime_type": header[len("data:") : header.index(";")]}


def question_messages(image: Image.Image, question: str, system_prompt: str | None = None) -> list[BaseMessage]:
    """What the target receives in the ``plain`` and ``api`` modes: the image, then the question
    (as the reflection loop asks its first question)."""
    human = HumanMessage(content=[_image_block(image), {"type": "text", "text": question}])  # type: ignore[list-item]
    return [SystemMessage(system_prompt), human] if system_prompt else [human]


class ProgressBar:
    """tqdm on stderr when available and wanted, else nothing: one step per answer logged."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm comes with transformers
                return
            self._bar = tqdm(total=total, desc="eval", unit="answer", file=sys.stderr, dynamic_ncols=True)

    def step(self, mode: str) -> None:
        """One more answer, in ``mode``."""
        if self._bar is not None:
            self._bar.set_postfix_str(mode, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()


class RecordSink(Protocol):
    """Where a :class:`ChunkRunner` puts each result record: the :class:`ResultsLog` of a local run, a list
    in a Ray actor (the driver writes the log)."""

    def append(self, record: dict[str, Any]) -> None:
        """Keep one record."""


class ChunkRunner:
    """Runs the pending (item, mode) pairs chunk by chunk and hands each answer to ``sink`` as it comes.

    Args:
        target: the chat model asked.
        attributor: the map backend (``None`` when no mode needs maps).
        options: how the modes run.
        sink: receives each result record.
        thumbnail: saves an annotated image's thumbnail and returns its path relative to the output folder.
        identity: the run's names (``target``, ``attributor``), copied into every record.
    """

    def __init__(
        self,
        target: BaseChatModel,
        attributor: Attributor | None,
        options: EvalOptions,
        sink: RecordSink,
        thumbnail: Callable[[Image.Image], str],
        identity: dict[str, Any],
    ) -> None:
        self.target = target
        self.cache = map_cache(attributor) if attributor is not None else None
        self.options = options
        self.sink = sink
        self.thumbnail = thumbnail
        self.identity = identity
        local = isinstance(target, ChatTransformersVLM)
        self.concurrency = options.concurrency or (1 if local else options.batch_size)
        self.tool = (
            AttentionPromptTool(
                attributor=self.cache, style=options.style, gray_level=options.gray_level, max_side=None
            )
            if self.cache is not None
            else None
        )
        self.failures: list[tuple[str, str, BaseException]] = []
        self.progress = ProgressBar(0, enabled=False)

    def _record(self, item: EvalItem, mode: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": item.id,
            "mode": mode,
            "question": item.question,
            "reference": item.answer,
            "type": item.type,
            "split": item.split,
            **fields,
            "target": self.identity["target"],
            "attributor": self.identity["attributor"] if mode in ANNOTATING_MODES else None,
        }

    def _ask(self, inputs: list[list[BaseMessage]]) -> tuple[list[Any], float]:
        start = time.perf_counter()
        replies = self.target.batch(inputs, config={"max_concurrency": self.concurrency}, return_exceptions=True)
        return replies, (time.perf_counter() - start) / max(1, len(inputs))

    def _log_replies(
        self, items: list[EvalItem], mode: str, replies: list[Any], seconds: float, extra: list[dict[str, Any]]
    ) -> None:
        for item, reply, more in zip(items, replies, extra):
            if isinstance(reply, BaseException):
                self.failures.append((item.id, mode, reply))
                continue
            text = reply.text.strip()
            self._emit(self._record(item, mode, answer=text, reply=text, seconds=seconds, **more))

    def _emit(self, record: dict[str, Any]) -> None:
        self.sink.append(record)
        self.progress.step(str(record["mode"]))

    def run_chunk(self, chunk: list[tuple[EvalItem, list[str]]], plain: dict[str, str]) -> None:
        """Ask one chunk: ``plain`` first (adding its answers to ``plain``), then the chunk's maps in one
        batch, ``api``, and each reflection mode; raises ``EvalRunError`` (answers so far handed over) after
        the first step in which a question failed."""
        images = {item.id: item_image(item) for item, _ in chunk}
        system = self.options.system_prompt
        todo = [item for item, modes in chunk if "plain" in modes]
        if todo:
            replies, seconds = self._ask([question_messages(images[i.id], i.question, system) for i in todo])
            self._log_replies(todo, "plain", replies, seconds, [{}] * len(todo))
            for item, reply in zip(todo, replies):
                if not isinstance(reply, BaseException):
                    plain[item.id] = reply.text.strip()
        self._stop_on_failure()
        map_seconds = self._prefetch(chunk, images, plain)
        todo = [item for item, modes in chunk if "api" in modes]
        if todo:
            assert self.cache is not None
            prompted = [
                attention_prompt(
                    images[i.id], i.question, self.cache, self.options.style, gray_level=self.options.gray_level
                ).image
                for i in todo
            ]
            thumbs = [{"annotated": self.thumbnail(p)} for p in prompted]
            replies, seconds = self._ask([question_messages(p, i.question, system) for p, i in zip(prompted, todo)])
            for more in thumbs:
                more["map_seconds"] = map_seconds
            self._log_replies(todo, "api", replies, seconds, thumbs)
        self._stop_on_failure()
        for mode in REFLECTION_MODES:
            todo = [item for item, modes in chunk if mode in modes]
            if todo:
                self._reflect(mode, todo, images, plain)
                self._stop_on_failure()

    def _prefetch(
        self, chunk: list[tuple[EvalItem, list[str]]], images: dict[str, Image.Image], plain: dict[str, str]
    ) -> float:
        """Compute the chunk's maps in one batch; returns the seconds per map.

        ``api`` uses the map of the question; the annotating strategies use the same map, except with an
        answer-scoring backend (LLaVA self-attribution), whose map scores the plain answer.
        """
        if self.cache is None:
            return 0.0
        scoring = isinstance(self.cache, AnswerScoringMapCache)
        pairs: list[tuple[Image.Image, str, str | None]] = []
        for item, modes in chunk:
            annotating = ANNOTATING_MODES.intersection(modes)
            strategies = annotating - {"api"}
            if "api" in annotating or (strategies and not scoring):
                pairs.append((images[item.id], item.question, None))
            if strategies and scoring and item.id in plain:
                pairs.append((images[item.id], item.question, plain[item.id]))
        if not pairs:
            return 0.0
        seconds = self.cache.prefetch([p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs])
        return seconds / len(pairs)

    def _reflect(self, mode: str, items: list[EvalItem], images: dict[str, Image.Image], plain: dict[str, str]) -> None:
        def one(item: EvalItem) -> dict[str, Any]:
            result = reflect(
                item.question,
                images[item.id],
                self.target,
                self.tool,
                strategy=mode,
                max_rounds=self.options.rounds,
                first_answer=plain[item.id],
                system_prompt=self.options.system_prompt,
                self_attribution=False,
            )
            annotated = result.annotated_images
            return self._record(
                item,
                mode,
                answer=result.final_answer,
                reply=result.rounds[-1].reply if result.rounds else "",
                first_answer=result.first_answer,
                changed=result.changed,
                parsed=all(r.parsed for r in result.rounds),
                rounds=len(result.rounds),
                seconds=result.timings.get("total", 0.0),
                annotated=self.thumbnail(annotated[0]) if annotated else None,
                crop_box=list(result.rounds[0].crop_box) if result.rounds and result.rounds[0].crop_box else None,
            )

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [(item, pool.submit(one, item)) for item in items]
            for item, future in futures:
                try:
                    record = future.result()
                except Exception as exc:
                    self.failures.append((item.id, mode, exc))
                    continue
                self._emit(record)

    def _stop_on_failure(self) -> None:
        if self.failures:
            item_id, mode, exc = self.failures[0]
            raise failed_run_error(len(self.failures), item_id, mode, describe_error(exc)) from exc

    def run(self, pending: list[tuple[EvalItem, list[str]]], plain: dict[str, str]) -> None:
        """Run every chunk of ``batch_size`` pending items in order, with a progress bar when asked."""
        self.progress = ProgressBar(sum(len(modes) for _, modes in pending), self.options.progress)
        try:
            for start in range(0, len(pending), self.options.batch_size):
                self.run_chunk(pending[start : start + self.options.batch_size], plain)
                if self.cache is not None:
                    self.cache.clear()
        finally:
            self.progress.close()


def describe_target(target: BaseChatModel) -> str:
    """A short name for a chat model: its class and model name."""
    name = getattr(target, "model", None) or getattr(target, "model_name", None)
    return f"{type(target).__name__}({name})" if name else type(target).__name__


@dataclass
class PendingRun:
    """What a run still has to ask, handed to an engine (:func:`run_locally`, or Ray's).

    Attributes:
        pending: the items with the modes not yet answered, in dataset order.
        plain: the plain answers already logged, by item id (reflection starts from them).
        log: the results log (open, locked); engines append every answer to it as it comes.
        out_dir: the output folder (thumbnails go to ``out_dir/thumbs``).
        identity: the run's names (what ``run.json`` holds).
        options: how the modes run (``modes`` in run order).
        usage: a served target's request and token counts, filled in by the engine.
        engine: how the engine describes itself in the report (``{"engine": "local"}``...).
    """

    pending: list[tuple[EvalItem, list[str]]]
    plain: dict[str, str]
    log: ResultsLog
    out_dir: Path
    identity: dict[str, Any]
    options: EvalOptions
    usage: dict[str, int] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=lambda: {"engine": "local"})


Engine = Callable[[PendingRun], None]
"""Asks the pending questions of a :class:`PendingRun`, appending every answer to its log."""


def add_usage(total: dict[str, int], more: dict[str, int]) -> None:
    """Add served-target counters (``ServedChatModel.usage``) into ``total``."""
    for key, value in more.items():
        total[key] = total.get(key, 0) + int(value)


def run_evaluation(
    items: Sequence[EvalItem],
    engine: Engine,
    *,
    out_dir: str | os.PathLike[str],
    modes: Sequence[str],
    resume: bool,
    options: EvalOptions | None,
    target_name: str,
    attributor_name: str | None,
    has_attributor: bool,
    data_name: str,
) -> EvalReport:
    """What every engine shares: check the modes and ids, lock ``out_dir``, read the results log, refuse a
    different run, hand the pending (item, mode) pairs to ``engine``, and write the reports (also when the
    engine fails). See :func:`evaluate` for the arguments and errors."""
    chosen_modes = run_modes(modes)
    base = options or EvalOptions()
    settings = replace(base, modes=chosen_modes)
    if not has_attributor and ANNOTATING_MODES.intersection(chosen_modes):
        needing = sorted(ANNOTATING_MODES.intersection(chosen_modes))
        raise InvalidParameterError(f"modes {needing} need an attributor")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise InvalidParameterError("item ids must be unique")
    folder = Path(out_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with lock_output(folder):
        log = ResultsLog(folder / RESULTS_FILE)
        records = list(log.load())
        identity = {
            "target": target_name,
            "attributor": attributor_name,
            "data": data_name,
            "style": settings.style,
            "gray_level": settings.gray_level,
            "system_prompt": settings.system_prompt,
            "rounds": settings.rounds,
        }
        check_run_file(folder / RUN_FILE, identity, resume, bool(records))
        (folder / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
        done = log.done
        plain = {str(r["id"]): str(r["answer"]) for r in records if r["mode"] == "plain"}
        pending = [
            (item, [mode for mode in chosen_modes if (item.id, mode) not in done])
            for item in items
            if any((item.id, mode) not in done for mode in chosen_modes)
        ]
        start = time.perf_counter()
        work = PendingRun(pending, plain, log, folder, identity, settings)
        try:
            engine(work)
        finally:
            run = {
                **identity,
                **work.engine,
                "items": len(items),
                "modes": list(chosen_modes),
                "answered": len(log.records) - len(records),
                "wall_seconds": time.perf_counter() - start,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if work.usage:
                run["target_usage"] = dict(work.usage)
            report = write_reports(folder, log.records, items, chosen_modes, run, settings)
    return report


def evaluate(
    items: Sequence[EvalItem],
    target: BaseChatModel,
    *,
    out_dir: str | os.PathLike[str],
    attributor: Attributor | None = None,
    modes: Sequence[str] = ("plain", "api"),
    resume: bool = False,
    options: EvalOptions | None = None,
    target_name: str | None = None,
    attributor_name: str | None = None,
    data_name: str = "items",
) -> EvalReport:
    """Ask ``target`` every item in every mode, append the answers to ``out_dir/results.jsonl`` as they come,
    and write the reports.

    Args:
        items: the questions (``agents.datasets``).
        target: any LangChain chat model that reads images.
        out_dir: where results and reports go.
        attributor: the map backend for ``api`` and the annotating strategies (``None`` is allowed when
            no mode needs one).
        modes: from :data:`MODES`; reflection modes bring ``plain`` with them.
        resume: continue the run already in ``out_dir`` (skip answered (id, mode) pairs).
        options: batching, drawing and report options (``modes`` here overrides ``options.modes``).
        target_name, attributor_name, data_name: how the run is named in ``run.json`` and reports
            (resuming requires the same target and attributor names).

    The run holds the lock on ``out_dir`` (:func:`lock_output`) from before reading earlier results until
    the reports are written.

    Raises ``EvalRunError`` after saving every answer obtained when the target fails,
    ``EvalOutputLockedError`` when another run is writing to ``out_dir`` (at once, before asking anything),
    and ``EvalOutputError`` when ``out_dir`` holds a different run.

    Example:
        >>> report = evaluate(synthetic_items("all", 100), ChatTransformersVLM.from_pretrained("demo"),
        ...                   out_dir="eval-out", attributor=get_attributor("demo"),
        ...                   modes=("plain", "api", "verify"))  # doctest: +SKIP
    """
    return run_evaluation(
        items,
        partial(run_locally, target, attributor),
        out_dir=out_dir,
        modes=modes,
        resume=resume,
        options=options,
        target_name=target_name or describe_target(target),
        attributor_name=attributor_name or (describe_attributor_name(attributor) if attributor is not None else None),
        has_attributor=attributor is not None,
        data_name=data_name,
    )


def run_locally(target: BaseChatModel, attributor: Attributor | None, run: PendingRun) -> None:
    """The local engine: this process asks ``target`` chunk by chunk (:class:`ChunkRunner`), appending each
    answer to the log; a served target's request and token counts go to ``run.usage``."""
    thumbnail = partial(save_thumbnail, out_dir=run.out_dir, side=run.options.thumb_side)
    runner = ChunkRunner(target, attributor, run.options, run.log, thumbnail, run.identity)
    before = target.usage() if isinstance(target, ServedChatModel) else None
    try:
        runner.run(run.pending, run.plain)
    finally:
        if isinstance(target, ServedChatModel) and before is not None:
            add_usage(run.usage, {key: value - before[key] for key, value in target.usage().items()})


def describe_attributor_name(attributor: Attributor) -> str:
    """A short name for an attributor: its backend and, when known, its model."""
    model = getattr(attributor, "model_name", None)
    return f"{attributor.name}({model})" if isinstance(model, str) else str(attributor.name)
