"""The evaluation harness behind ``api-prompt eval``: does attention prompting help this model on this data?

It asks a target chat model (any LangChain chat model that reads images) every question of a dataset in
several modes and scores the answers (``agents.metrics``):

* ``plain``: the original image and the question;
* ``api``: the attention-prompted image alone and the question (the paper's setting);
* ``verify``, ``masked``, ``masked_hint``, ``iterative``: the self-reflection loop with that strategy
  (``agents.reflection.reflect``; see ``agents.prompts``), starting from the ``plain`` answer, which is
  therefore always computed when a reflection mode is asked for.

Maps come from the ``--attributor``: the demo CLIP, any ``clip:``/``llava:`` spec, or ``self`` (the
target's own LLaVA attention: the paper's API-LLaVA with g = f; the ``api`` mode then uses the map of the
model generating its answer, the reflection modes the map of its first answer, teacher-forced).

Batching: questions go to the target in chunks of ``--batch-size`` through ``target.batch`` (concurrent
for remote models; one at a time for a local transformers model, whose calls would only compete for the
same cores); the chunk's maps are computed ahead in one ``attributor.attribute_batch`` call and shared by
the ``api`` mode and every reflection strategy.

Resumable: every answer is appended to ``OUT/results.jsonl`` (one line per (item id, mode), flushed and
synced) as soon as it comes; ``--resume`` skips the pairs already there, so an interrupted run (Ctrl-C, a
crash, an API error) continues where it stopped and nothing done is lost. A run whose target fails stops
after saving every answer it got. ``OUT/run.json`` records the target and attributor; resuming with others
is refused. One run writes to ``OUT`` at a time: a run holds an OS lock on ``OUT/eval.lock``
(:func:`lock_output`), and a second run (or a ``--resume``) on the same ``OUT`` meanwhile is refused at once,
naming the holder's pid, host and start time. The lock dies with its process, so a killed run can be resumed.

Outputs in ``OUT``: ``results.jsonl``; ``report.json`` and ``report.md`` (accuracy, exact and normalised
match, POPE per split, changes against the first answer with right->wrong and wrong->right counts, per
question type, seconds per answer); ``gallery.html``, the questions where modes disagree (original,
annotated image, every mode's answer), with inline thumbnails; ``thumbs/`` (annotated thumbnails).

Usage::

    api-prompt eval --synthetic all --n 200 --target demo --modes plain,api,verify --out eval-out
    api-prompt eval --data pope_random.jsonl --target openai:gpt-4o-mini --attributor clip:ViT-L-14-336 \\
        --modes plain,api,verify --out eval-gpt --resume

Example:
    >>> from agents.datasets import synthetic_items
    >>> report = evaluate(synthetic_items("random", 20), vlm, out_dir="eval-out",
    ...                   modes=("plain", "api"))  # doctest: +SKIP
    >>> report.summary["modes"]["api"]["pope"]["random"]["f1"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from PIL import Image

from agents.chat_models import ChatTransformersVLM
from agents.datasets import SYNTHETIC_SETS, EvalItem, item_image, load_jsonl, synthetic_items
from agents.metrics import (
    answer_scores,
    change_counts,
    group_indices,
    is_correct,
    pope_scores,
    scored_form,
    yes_no_reference,
)
from agents.prompts import STRATEGIES
from agents.reflection import default_tool, image_data_uri, reflect
from api_tool.backends.base import Attributor
from api_tool.errors import (
    ApiPromptingError,
    EvalOutputError,
    EvalOutputLockedError,
    EvalRunError,
    InvalidParameterError,
)
from api_tool.images import ImageRef, load_image
from api_tool.maps import COMBINE_MODES, AttributionMap
from api_tool.prompt import attention_prompt
from api_tool.render import STYLES, Style
from api_tool.tool import AttentionPromptTool, scores_answers

MODES: tuple[str, ...] = ("plain", "api", "verify", "masked", "masked_hint", "iterative")
REFLECTION_MODES: tuple[str, ...] = tuple(STRATEGIES)
ANNOTATING_MODES: frozenset[str] = frozenset(
    {"api", *(name for name, strategy in STRATEGIES.items() if strategy.uses_annotation)}
)
RESULTS_FILE = "results.jsonl"
RUN_FILE = "run.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GALLERY_HTML = "gallery.html"
THUMBS_DIR = "thumbs"
LOCK_FILE = "eval.lock"
"""The file in ``OUT`` that a running evaluation holds an OS lock on (it names the holder)."""
_LOCK_RECORD_BYTES = 512
"""The holder's details are padded with spaces to this size, so a shorter record overwrites a longer one."""
_WINDOWS_LOCK_OFFSET = 1 << 30
"""Where the lock byte lies on Windows: past the holder's details, which other processes must still read."""
LOCAL_MAX_TOKENS = 64
"""New-token budget of a local transformers target built from a spec, unless ``--max-tokens`` says."""
_RUN_IDENTITY = ("target", "attributor", "data", "style", "gray_level", "system_prompt", "rounds")


# ----------------------------------------------------------------------------------------------
# Maps computed ahead in batches.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The results log: one JSON line per (item, mode), appended as answers come.
# ----------------------------------------------------------------------------------------------


class ResultsLog:
    """``results.jsonl``: read what is done, append new answers durably.

    A last line cut short by a crash is dropped on load (its answer is asked again); any other bad line
    is an error naming its line number.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def load(self) -> list[dict[str, Any]]:
        """Read the file (if any); returns the records, the latest answer per (id, mode) kept.

        Every record is written as one complete line ending in a newline, so a file that does not end in
        one was cut short while writing its last line: that line is removed (its answer is asked again).
        """
        if not self.path.exists():
            self.records = []
            return self.records
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):
            complete = raw.rfind(b"\n") + 1
            print(f"eval: removing the incomplete last line of {self.path}", file=sys.stderr)
            with self.path.open("r+b") as handle:
                handle.truncate(complete)
            raw = raw[:complete]
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        # Split on "\n" only: an answer may hold U+2028 or U+0085, which json.dumps leaves unescaped.
        for number, data in enumerate(raw.split(b"\n")[:-1], start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError:
                raise EvalOutputError(f"{self.path}:{number}: not UTF-8; fix or remove that line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalOutputError(
                    f"{self.path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove it"
                ) from None
            if not isinstance(record, dict) or "id" not in record or "mode" not in record:
                raise EvalOutputError(f"{self.path}:{number}: not a result record (needs 'id' and 'mode')")
            latest[(str(record["id"]), str(record["mode"]))] = record
        self.records = list(latest.values())
        return self.records

    @property
    def done(self) -> set[tuple[str, str]]:
        """The (item id, mode) pairs already answered."""
        return {(str(r["id"]), str(r["mode"])) for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and make it durable before returning."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            self.records.append(record)


# ----------------------------------------------------------------------------------------------
# One writer per output folder.
# ----------------------------------------------------------------------------------------------


def _try_lock(fd: int) -> bool:
    """Take the exclusive OS lock on ``fd`` without waiting; ``False`` when another open file holds it.

    POSIX: ``flock`` on the whole file (per open file description, so even a second open in the same
    process is refused). Windows: ``msvcrt.locking`` on one byte at :data:`_WINDOWS_LOCK_OFFSET`. Either
    lock goes away with its process, however it ends.
    """
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    """Release the lock :func:`_try_lock` took (on POSIX closing ``fd`` releases it as well)."""
    if sys.platform == "win32":
        import msvcrt

        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _lock_holder(fd: int) -> str:
    """Who holds the lock, as the lock file records it ("pid P on HOST, started TIME")."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
        return "its pid is not recorded yet"


@contextmanager
def lock_output(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the exclusive lock on an output folder for the block: one writer per ``results.jsonl``.

    The lock is an OS lock on ``folder/eval.lock`` (see :func:`_try_lock`), so it vanishes with its process
    even when that is killed: a lock file left behind blocks nothing, and kill-then-``--resume`` works.
    While held, the file records the holder's pid, host and start time (UTC) for the refusal message.
    The file is left in place afterwards (removing it could let two writers lock two different files).

    Raises ``EvalOutputLockedError`` at once, naming the holder, when another run holds the folder.

    Example:
        >>> with lock_output("eval-out"):  # doctest: +SKIP
        ...     ...  # write eval-out/results.jsonl
    """
    path = Path(folder) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise EvalOutputLockedError(
                f"{Path(folder)} is being written by another eval run ({_lock_holder(fd)}); wait for it to "
                "finish or stop it (then rerun with --resume), or choose another --out"
            )
        try:
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, holder.ljust(_LOCK_RECORD_BYTES).encode("utf-8"))
            yield path
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# Running the modes.
# ----------------------------------------------------------------------------------------------


def _image_block(image: Image.Image) -> dict[str, Any]:
    header, data = image_data_uri(image).split(",", 1)
    return {"type": "image", "base64": data, "mime_type": header[len("data:") : header.index(";")]}


def question_messages(image: Image.Image, question: str, system_prompt: str | None = None) -> list[BaseMessage]:
    """What the target receives in the ``plain`` and ``api`` modes: the image, then the question
    (as the reflection loop asks its first question)."""
    human = HumanMessage(content=[_image_block(image), {"type": "text", "text": question}])  # type: ignore[list-item]
    return [SystemMessage(system_prompt), human] if system_prompt else [human]


def thumbnail_jpeg(image: Image.Image, side: int) -> bytes:
    """The image shrunk to ``side`` pixels on its longer side, as JPEG bytes (quality 85)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def save_thumbnail(image: Image.Image, directory: Path, side: int) -> str:
    """Save a JPEG thumbnail named by its content under ``directory``; returns ``"thumbs/<name>.jpg"``."""
    data = thumbnail_jpeg(image, side)
    name = f"{hashlib.blake2b(data, digest_size=10).hexdigest()}.jpg"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if not path.exists():
        path.write_bytes(data)
    return f"{directory.name}/{name}"


@dataclass(frozen=True)
class EvalOptions:
    """How the modes are run.

    Attributes:
        modes: which modes, in run order (``plain`` first when reflection needs it).
        style, gray_level: how the attention-prompted image is drawn (``api_tool.render``).
        system_prompt: a system message sent with every call to the target.
        rounds: most reflection rounds.
        batch_size: questions per chunk (target batch, map batch).
        concurrency: most target calls at once (``None``: the batch size, or 1 for a local
            transformers target).
        progress: show a progress bar with ETA on stderr.
        gallery_limit: most questions in the HTML gallery.
        thumb_side: longest side of gallery thumbnails, in pixels.
    """

    modes: tuple[str, ...] = ("plain", "api")
    style: Style = "gray"
    gray_level: int = 0
    system_prompt: str | None = None
    rounds: int = 1
    batch_size: int = 8
    concurrency: int | None = None
    progress: bool = True
    gallery_limit: int = 50
    thumb_side: int = 160

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.modes if mode not in MODES]
        if unknown or not self.modes:
            raise InvalidParameterError(f"unknown or no modes {unknown or list(self.modes)}; choose from {MODES}")
        if self.style not in STYLES:
            raise InvalidParameterError(f"style must be one of {STYLES}, got {self.style!r}")
        if not 0 <= self.gray_level <= 255:
            raise InvalidParameterError(f"gray_level must be in 0..255, got {self.gray_level}")
        for name in ("rounds", "batch_size", "gallery_limit", "thumb_side"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise InvalidParameterError(f"concurrency must be at least 1, got {self.concurrency}")


def run_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The modes in run order, without repeats, with ``plain`` first when a reflection mode needs it.

    Example:
        >>> run_modes(["verify", "api", "verify"])
        ('plain', 'api', 'verify')
    """
    chosen = list(dict.fromkeys(modes))
    if any(mode in REFLECTION_MODES for mode in chosen) and "plain" not in chosen:
        chosen.insert(0, "plain")
    return tuple(sorted(chosen, key=MODES.index))


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide the progress bars of transformers and huggingface_hub (``from_pretrained``'s "Loading weights"
    or "Loading checkpoint shards", downloads) inside the block, then set each library back as it was.

    Both settings are process-wide: bars of other threads are hidden while the block runs.

    Example:
        >>> with quiet_progress_bars():  # doctest: +SKIP
        ...     target = build_target("demo")  # loads without a progress bar
    """
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    transformers_on = transformers_logging.is_progress_bar_enabled()
    hub_off = hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # huggingface_hub's bars too
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()  # huggingface_hub's bars too
        if hub_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


class _Progress:
    """tqdm on stderr when available and wanted, else nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm comes with transformers
                return
            self._bar = tqdm(total=total, desc="eval", unit="answer", file=sys.stderr, dynamic_ncols=True)

    def step(self, mode: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(mode, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Runner:
    """Runs the pending (item, mode) pairs chunk by chunk and logs each answer as it comes."""

    def __init__(
        self,
        target: BaseChatModel,
        attributor: Attributor | None,
        options: EvalOptions,
        log: ResultsLog,
        thumbs: Path,
        identity: dict[str, Any],
    ) -> None:
        self.target = target
        self.cache = map_cache(attributor) if attributor is not None else None
        self.options = options
        self.log = log
        self.thumbs = thumbs
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
        self.progress = _Progress(0, enabled=False)

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
            self.log.append(self._record(item, mode, answer=text, reply=text, seconds=seconds, **more))
            self.progress.step(mode)

    def run_chunk(self, chunk: list[tuple[EvalItem, list[str]]], plain: dict[str, str]) -> None:
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
            thumbs = [{"annotated": save_thumbnail(p, self.thumbs, self.options.thumb_side)} for p in prompted]
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
                annotated=save_thumbnail(annotated[0], self.thumbs, self.options.thumb_side) if annotated else None,
            )

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [(item, pool.submit(one, item)) for item in items]
            for item, future in futures:
                try:
                    record = future.result()
                except Exception as exc:
                    self.failures.append((item.id, mode, exc))
                    continue
                self.log.append(record)
                self.progress.step(mode)

    def _stop_on_failure(self) -> None:
        if self.failures:
            item_id, mode, exc = self.failures[0]
            raise EvalRunError(
                f"{len(self.failures)} question(s) failed, first {item_id!r} in mode {mode!r}: "
                f"{type(exc).__name__}: {exc}; the answers obtained so far are saved, rerun with --resume to continue"
            ) from exc

    def run(self, pending: list[tuple[EvalItem, list[str]]], plain: dict[str, str]) -> None:
        self.progress = _Progress(sum(len(modes) for _, modes in pending), self.options.progress)
        try:
            for start in range(0, len(pending), self.options.batch_size):
                self.run_chunk(pending[start : start + self.options.batch_size], plain)
                if self.cache is not None:
                    self.cache.clear()
        finally:
            self.progress.close()


# ----------------------------------------------------------------------------------------------
# Scoring and reports.
# ----------------------------------------------------------------------------------------------


def _split_name(split: object) -> str:
    return str(split) if split is not None else "-"


def summarize(records: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, Any]:
    """Scores per mode from result records (pure): accuracy (exact / normalised too), POPE per split of
    the yes/no questions (plus ``all`` over several splits), accuracy per question type, changes against
    the first answer (reflection: the loop's first answer; ``api``: the plain answer), seconds per answer.

    Example:
        >>> records = [{"id": "1", "mode": "plain", "answer": "Yes.", "reference": "yes", "split": "random"}]
        >>> summarize(records, ["plain"])["modes"]["plain"]["pope"]["random"]["accuracy"]
        1.0
    """
    by_mode = {mode: [r for r in records if r["mode"] == mode] for mode in modes}
    plain = {str(r["id"]): str(r["answer"]) for r in by_mode.get("plain", [])}
    summary: dict[str, Any] = {}
    for mode, rows in by_mode.items():
        answers = [str(r["answer"]) for r in rows]
        references = [str(r["reference"]) for r in rows]
        entry: dict[str, Any] = {"n": len(rows), **answer_scores(answers, references).as_dict()}
        yes_no = [i for i, ref in enumerate(references) if yes_no_reference(ref) is not None]
        splits = group_indices([_split_name(rows[i].get("split")) for i in yes_no])
        pope = {
            split: pope_scores([answers[yes_no[j]] for j in idx], [references[yes_no[j]] for j in idx]).as_dict()
            for split, idx in splits.items()
        }
        if len(splits) > 1:
            pope["all"] = pope_scores([answers[i] for i in yes_no], [references[i] for i in yes_no]).as_dict()
        entry["pope"] = pope
        types = group_indices([str(r.get("type") or "-") for r in rows])
        entry["by_type"] = {
            kind: answer_scores([answers[i] for i in idx], [references[i] for i in idx]).as_dict()
            for kind, idx in types.items()
        }
        if mode in REFLECTION_MODES:
            firsts = [str(r.get("first_answer", "")) for r in rows]
            entry["changes"] = {"relative_to": "first answer", **change_counts(firsts, answers, references).as_dict()}
            entry["parsed_rate"] = sum(bool(r.get("parsed")) for r in rows) / len(rows) if rows else None
        elif mode != "plain" and plain:
            paired = [i for i, r in enumerate(rows) if str(r["id"]) in plain]
            entry["changes"] = {
                "relative_to": "plain",
                **change_counts(
                    [plain[str(rows[i]["id"])] for i in paired],
                    [answers[i] for i in paired],
                    [references[i] for i in paired],
                ).as_dict(),
            }
        seconds = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
        entry["seconds_per_answer"] = sum(seconds) / len(seconds) if seconds else None
        summary[mode] = entry
    return {"modes": summary, "disagreements": len(disagreements(records, modes))}


def disagreements(records: Sequence[dict[str, Any]], modes: Sequence[str]) -> list[str]:
    """Ids of the questions whose answers differ between modes (in the scored form), in first-seen order.

    Example:
        >>> disagreements([{"id": "1", "mode": "plain", "answer": "yes", "reference": "no"},
        ...                {"id": "1", "mode": "api", "answer": "No.", "reference": "no"}], ["plain", "api"])
        ['1']
    """
    forms: dict[str, set[str]] = {}
    for record in records:
        if record["mode"] in modes:
            forms.setdefault(str(record["id"]), set()).add(scored_form(str(record["answer"]), str(record["reference"])))
    return [item_id for item_id, seen in forms.items() if len(seen) > 1]


def _fmt(value: object, percent: bool = True) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if percent else f"{value:.2f}"
    return str(value)


def markdown_report(summary: dict[str, Any], run: dict[str, Any]) -> str:
    """The report as Markdown tables (percentages, one decimal)."""
    modes = summary["modes"]
    lines = [
        "# Evaluation report",
        "",
        f"- target: `{run['target']}`",
        f"- attributor: `{run['attributor']}`",
        f"- data: `{run['data']}` ({run['items']} questions)",
        f"- modes: {', '.join(modes)}",
        f"- wall time of the last invocation: {run['wall_seconds']:.1f} s ({run['answered']} answers); "
        f"finished {run['finished']}",
        "",
        "## Accuracy (%)",
        "",
        "| mode | n | accuracy | exact match | normalised match | s / answer |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, entry in modes.items():
        lines.append(
            f"| {mode} | {entry['n']} | {_fmt(entry['accuracy'])} | {_fmt(entry['exact_accuracy'])} | "
            f"{_fmt(entry['normalized_accuracy'])} | {_fmt(entry['seconds_per_answer'], percent=False)} |"
        )
    splits = list(dict.fromkeys(split for entry in modes.values() for split in entry["pope"]))
    if splits:
        lines += [
            "",
            "## POPE (%; yes/no questions, 'yes' is positive)",
            "",
            "| split | mode | n | accuracy | precision | recall | F1 | yes ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for split in splits:
            for mode, entry in modes.items():
                scores = entry["pope"].get(split)
                if scores is not None:
                    lines.append(
                        f"| {split} | {mode} | {scores['n']} | {_fmt(scores['accuracy'])} | "
                        f"{_fmt(scores['precision'])} | {_fmt(scores['recall'])} | {_fmt(scores['f1'])} | "
                        f"{_fmt(scores['yes_ratio'])} |"
                    )
    changed = {mode: entry["changes"] for mode, entry in modes.items() if "changes" in entry}
    if changed:
        lines += [
            "",
            "## Changes against the first answer",
            "",
            "| mode | relative to | n | changed | right→wrong | wrong→right | net gain |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for mode, counts in changed.items():
            lines.append(
                f"| {mode} | {counts['relative_to']} | {counts['n']} | {counts['changed']} | "
                f"{counts['right_to_wrong']} | {counts['wrong_to_right']} | {counts['net_gain']:+d} |"
            )
        parsed = {mode: modes[mode].get("parsed_rate") for mode in changed if "parsed_rate" in modes[mode]}
        if "verify" in parsed:
            lines += ["", f"verify: {_fmt(parsed['verify'])}% of replies held a FINAL line (else the answer is kept)."]
    types = list(dict.fromkeys(kind for entry in modes.values() for kind in entry["by_type"]))
    if any(kind != "-" for kind in types):
        lines += [
            "",
            "## Accuracy by question type (%)",
            "",
            "| type | " + " | ".join(modes) + " |",
            "|---|" + "---:|" * len(modes),
        ]
        for kind in types:
            cells = [
                f"{_fmt(entry['by_type'][kind]['accuracy'])} (n={entry['by_type'][kind]['n']})"
                if kind in entry["by_type"]
                else "–"
                for entry in modes.values()
            ]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", f"Questions where modes disagree: {summary['disagreements']} (see gallery.html)."]
    return "\n".join(lines) + "\n"


def _jpeg_data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


def gallery_html(
    records: Sequence[dict[str, Any]],
    items: dict[str, EvalItem],
    modes: Sequence[str],
    out_dir: Path,
    *,
    limit: int = 50,
    thumb_side: int = 160,
) -> str:
    """A self-contained HTML page of the questions where modes disagree: the original image, the
    annotated image(s), and every mode's answer (green right, red wrong), images inline."""
    by_id: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(str(record["id"]), {})[str(record["mode"])] = record
    chosen = [item_id for item_id in disagreements(records, modes) if item_id in items][:limit]
    rows = []
    for item_id in chosen:
        item = items[item_id]
        answers = by_id[item_id]
        pictures = [("original", _jpeg_data_uri(thumbnail_jpeg(item_image(item), thumb_side)))]
        for thumb in dict.fromkeys(r.get("annotated") for r in answers.values() if r.get("annotated")):
            path = out_dir / str(thumb)
            if path.is_file():
                uri = _jpeg_data_uri(path.read_bytes())
                used = ", ".join(mode for mode, r in answers.items() if r.get("annotated") == thumb)
                pictures.append((f"annotated ({used})", uri))
        figures = "".join(
            f'<figure><img src="{uri}" alt="{html.escape(label)}">'
            f"<figcaption>{html.escape(label)}</figcaption></figure>"
            for label, uri in pictures
        )
        cells = []
        for mode in modes:
            record = answers.get(mode)
            if record is None:
                continue
            right = is_correct(str(record["answer"]), item.answer)
            cells.append(
                f'<tr class="{"right" if right else "wrong"}"><th>{html.escape(mode)}</th>'
                f"<td>{html.escape(str(record['answer']))}</td></tr>"
            )
        rows.append(
            f'<section><h2>{html.escape(item_id)}</h2><p class="q">{html.escape(item.question)} '
            f"<span>reference: <b>{html.escape(item.answer)}</b>"
            f"{' · split ' + html.escape(item.split) if item.split else ''}</span></p>"
            f'<div class="pics">{figures}</div><table>{"".join(cells)}</table></section>'
        )
    total = len(disagreements(records, modes))
    shown = f"{len(chosen)} of {total}" if total > len(chosen) else str(total)
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:70em}section{border-top:1px solid #ccc;padding:.5em 0}"
        "h2{font-size:1em;margin:.2em 0}.q span{color:#555;margin-left:1em}.pics{display:flex;gap:1em}"
        "figure{margin:0}figcaption{font-size:.8em;color:#555}table{border-collapse:collapse;margin-top:.4em}"
        "th,td{padding:.15em .6em;text-align:left;border-bottom:1px solid #eee}"
        ".right td{color:#11772d}.wrong td{color:#b3261e}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Where modes disagree</title><style>{style}</style>'
        f"</head><body><h1>Where modes disagree ({shown} questions)</h1>"
        f"<p>Modes: {html.escape(', '.join(modes))}. Green: right, red: wrong.</p>{''.join(rows)}</body></html>\n"
    )


@dataclass(frozen=True)
class EvalReport:
    """What :func:`evaluate` produced: the summary (as in ``report.json``) and where the files are."""

    summary: dict[str, Any]
    run: dict[str, Any]
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)


def write_reports(
    out_dir: Path,
    records: Sequence[dict[str, Any]],
    items: Sequence[EvalItem],
    modes: Sequence[str],
    run: dict[str, Any],
    options: EvalOptions,
) -> EvalReport:
    """Write ``report.json``, ``report.md`` and ``gallery.html`` for the given items and modes."""
    ids = {item.id: item for item in items}
    chosen = [r for r in records if str(r["id"]) in ids and r["mode"] in modes]
    summary = summarize(chosen, modes)
    files = {"json": out_dir / REPORT_JSON, "markdown": out_dir / REPORT_MD, "gallery": out_dir / GALLERY_HTML}
    files["json"].write_text(json.dumps({"run": run, **summary}, indent=2) + "\n", encoding="utf-8")
    files["markdown"].write_text(markdown_report(summary, run), encoding="utf-8")
    gallery = gallery_html(chosen, ids, modes, out_dir, limit=options.gallery_limit, thumb_side=options.thumb_side)
    files["gallery"].write_text(gallery, encoding="utf-8")
    files["results"] = out_dir / RESULTS_FILE
    return EvalReport(summary=summary, run=run, out_dir=out_dir, files=files)


# ----------------------------------------------------------------------------------------------
# The entry points.
# ----------------------------------------------------------------------------------------------


def describe_target(target: BaseChatModel) -> str:
    """A short name for a chat model: its class and model name."""
    name = getattr(target, "model", None) or getattr(target, "model_name", None)
    return f"{type(target).__name__}({name})" if name else type(target).__name__


def _check_run_file(path: Path, identity: dict[str, Any], resume: bool, has_results: bool) -> None:
    if has_results and not resume:
        raise EvalOutputError(
            f"{path.parent} already holds results; pass --resume to continue that run or choose another --out"
        )
    if resume and path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        differing = [key for key in _RUN_IDENTITY if previous.get(key) != identity.get(key)]
        if differing:
            details = "; ".join(f"{key}: {previous.get(key)!r} then, {identity.get(key)!r} now" for key in differing)
            raise EvalOutputError(f"cannot resume {path.parent}: the run differs ({details})")


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
    chosen_modes = run_modes(modes)
    base = options or EvalOptions()
    settings = replace(base, modes=chosen_modes)
    if attributor is None and ANNOTATING_MODES.intersection(chosen_modes):
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
            "target": target_name or describe_target(target),
            "attributor": attributor_name or (describe_attributor_name(attributor) if attributor is not None else None),
            "data": data_name,
            "style": settings.style,
            "gray_level": settings.gray_level,
            "system_prompt": settings.system_prompt,
            "rounds": settings.rounds,
        }
        _check_run_file(folder / RUN_FILE, identity, resume, bool(records))
        (folder / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n", encoding="utf-8")
        done = log.done
        plain = {str(r["id"]): str(r["answer"]) for r in records if r["mode"] == "plain"}
        pending = [
            (item, [mode for mode in chosen_modes if (item.id, mode) not in done])
            for item in items
            if any((item.id, mode) not in done for mode in chosen_modes)
        ]
        start = time.perf_counter()
        runner = _Runner(target, attributor, settings, log, folder / THUMBS_DIR, identity)
        try:
            runner.run(pending, plain)
        finally:
            run = {
                **identity,
                "items": len(items),
                "modes": list(chosen_modes),
                "answered": len(log.records) - len(records),
                "wall_seconds": time.perf_counter() - start,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            report = write_reports(folder, log.records, items, chosen_modes, run, settings)
    return report


def describe_attributor_name(attributor: Attributor) -> str:
    """A short name for an attributor: its backend and, when known, its model."""
    model = getattr(attributor, "model_name", None)
    return f"{attributor.name}({model})" if isinstance(model, str) else str(attributor.name)


def build_target(spec: str, *, max_tokens: int | None = None, device: str | None = None) -> BaseChatModel:
    """A chat model from a spec: ``demo`` or a local transformers directory (``ChatTransformersVLM``),
    ``openai:<model>`` (``ChatOpenAI``; any OpenAI-compatible server through ``OPENAI_BASE_URL``) or
    ``ollama:<model>`` (``ChatOllama``). Greedy decoding (temperature 0) everywhere.

    Example:
        >>> build_target("ollama:llava:13b")  # doctest: +SKIP
    """
    provider, sep, model = spec.partition(":")
    if sep and provider == "openai":
        try:
            from langchain_openai import ChatOpenAI
        except ImportError as exc:
            raise InvalidParameterError("--target openai:... needs `pip install langchain-openai`") from exc
        extra = {"max_tokens": max_tokens} if max_tokens is not None else {}
        return ChatOpenAI(model=model, temperature=0, **extra)
    if sep and provider == "ollama":
        try:
            from langchain_ollama import ChatOllama
        except ImportError as exc:
            raise InvalidParameterError("--target ollama:... needs `pip install langchain-ollama`") from exc
        extra = {"num_predict": max_tokens} if max_tokens is not None else {}
        return ChatOllama(model=model, temperature=0, **extra)
    return ChatTransformersVLM.from_pretrained(spec, max_tokens=max_tokens or LOCAL_MAX_TOKENS, device=device)


def build_attributor(
    spec: str,
    target: BaseChatModel,
    device: str | None = None,
    combine: str | None = None,
    enhance_coe: float | None = None,
) -> Attributor:
    """``self`` -> the target's own LLaVA (``LlavaAttributor.from_model``); anything else -> the registry,
    with ``device``, ``enhance_coe`` (the mask's sigmoid sharpness; ``None``: the backend's default) and,
    for CLIP, ``combine`` (how Psi_cls and Psi_comp make the mask)."""
    if spec == "self":
        if combine is not None:
            raise InvalidParameterError("--combine applies to CLIP attributors, not to 'self' (LLaVA)")
        options = {"enhance_coe": enhance_coe} if enhance_coe is not None else {}
        return default_tool(target, self_attribution=True, **options).backend
    from api_tool.backends.registry import get_attributor

    chosen = (("device", device), ("combine", combine), ("enhance_coe", enhance_coe))
    return get_attributor(spec, **{name: value for name, value in chosen if value is not None})


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``api-prompt eval``."""
    parser = argparse.ArgumentParser(
        prog="api-prompt eval",
        description="Evaluate a vision-language model with and without attention prompting (resumable).",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help="a JSONL of {image, question, answer, type?, split?, id?}")
    data.add_argument(
        "--synthetic", choices=SYNTHETIC_SETS, help="the shipped synthetic sets ('all': the three POPE splits)"
    )
    parser.add_argument("--n", type=int, default=None, help="first N questions (per split for --synthetic all)")
    parser.add_argument(
        "--target", default="demo", help="demo | openai:<model> | ollama:<model> | <local transformers dir>"
    )
    parser.add_argument(
        "--modes", default="plain,api", help=f"comma-separated, from {','.join(MODES)} (default: plain,api)"
    )
    parser.add_argument(
        "--attributor", default="demo", help="demo | clip:<open_clip model>[@<pretrained>] | llava:<dir> | self"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (results, reports, gallery)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per chunk (default 8)")
    parser.add_argument("--concurrency", type=int, default=None, help="most target calls at once")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help=f"new-token budget (local default {LOCAL_MAX_TOKENS})"
    )
    parser.add_argument("--rounds", type=int, default=1, help="most reflection rounds (default 1)")
    parser.add_argument(
        "--combine", choices=COMBINE_MODES, default=None, help="CLIP only: how Psi_cls and Psi_comp make the mask"
    )
    parser.add_argument(
        "--enhance-coe", type=float, default=None, help="sigmoid sharpness of the mask (default: the backend's)"
    )
    parser.add_argument("--style", choices=STYLES, default="gray", help="how the prompted image is drawn")
    parser.add_argument("--gray-level", type=int, default=0, help="gray of faded regions, 0..255")
    parser.add_argument("--system", default=None, help="a system prompt sent with every question")
    parser.add_argument("--device", default=None, help="device of local models (cuda, mps, cpu)")
    parser.add_argument("--gallery-limit", type=int, default=50, help="most questions in gallery.html")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (neither the run's nor model loading's)"
    )
    return parser


def _load_items(args: argparse.Namespace) -> tuple[list[EvalItem], str]:
    if args.synthetic is not None:
        return synthetic_items(args.synthetic, args.n), f"synthetic:{args.synthetic}"
    return load_jsonl(args.data, limit=args.n), str(args.data.expanduser().resolve())


def _run_cli(args: argparse.Namespace) -> EvalReport:
    """Load the items, the target and the attributor that ``args`` name, and run :func:`evaluate`."""
    if args.out.expanduser().is_dir():
        with lock_output(args.out.expanduser()):  # refuse a second writer at once, before loading any model
            pass
    modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    options = EvalOptions(
        modes=modes,
        style=args.style,
        gray_level=args.gray_level,
        system_prompt=args.system,
        rounds=args.rounds,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        progress=not args.no_progress,
        gallery_limit=args.gallery_limit,
    )
    items, data_name = _load_items(args)
    target = build_target(args.target, max_tokens=args.max_tokens, device=args.device)
    needs_maps = bool(ANNOTATING_MODES.intersection(run_modes(modes)))
    attributor = (
        build_attributor(args.attributor, target, args.device, args.combine, args.enhance_coe) if needs_maps else None
    )
    settings = (("combine", args.combine), ("enhance_coe", args.enhance_coe))
    chosen = [f"{name}={value}" for name, value in settings if value is not None]
    label = f"{args.attributor} ({', '.join(chosen)})" if chosen else args.attributor
    return evaluate(
        items,
        target,
        out_dir=args.out,
        attributor=attributor,
        modes=modes,
        resume=args.resume,
        options=options,
        target_name=args.target,
        attributor_name=label if needs_maps else None,
        data_name=data_name,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``api-prompt eval ...``; returns the exit status (2: bad input or ``--out`` in use by another run,
    1: the run failed, 130: interrupted). ``--no-progress`` also hides the model-loading progress bars."""
    args = build_parser().parse_args(argv)
    try:
        with quiet_progress_bars() if args.no_progress else nullcontext():
            report = _run_cli(args)
    except KeyboardInterrupt:
        print(
            f"\napi-prompt eval: interrupted; answers so far are in {args.out / RESULTS_FILE}, "
            "rerun with --resume to continue",
            file=sys.stderr,
        )
        return 130
    except EvalRunError as exc:
        print(f"api-prompt eval: {exc}", file=sys.stderr)
        return 1
    except (ApiPromptingError, OSError) as exc:
        print(f"api-prompt eval: error: {exc}", file=sys.stderr)
        return 2
    print((args.out / REPORT_MD).read_text(encoding="utf-8"))
    for name, path in report.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
