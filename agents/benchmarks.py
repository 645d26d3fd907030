"""Standard benchmarks read from their published files, and the metric each defines.

Every loader reads the files as their authors publish them (no conversion step), finds images under an
``images`` root, downloads nothing, and returns :class:`agents.datasets.EvalItem` s whose ``extra`` keeps
what the benchmark's metric needs (``extra["benchmark"]`` names it). :func:`benchmark_summary` computes
that metric per mode from result records; the reports show it next to the generic scores.

=================  ===========================================  ===========================================
benchmark          ``data`` (as published)                      images (``images`` root)
=================  ===========================================  ===========================================
``pope``           ``coco_pope_{random,popular,adversarial}``   COCO ``val2014/`` (the file's ``image``)
                   ``.json``: JSON lines ``question_id, image,
                   text, label`` (POPE's ``output/coco``)
``mme``            ``MME_Benchmark_release_version/`` (or the   the same folder (default): ``<subtask>/
                   ``MME_Benchmark/`` inside it): per subtask   <stem>.{jpg,png}`` or ``<subtask>/images/``
                   ``<stem>.txt`` with two lines
                   ``question<TAB>Yes|No``, beside the image
                   or in ``questions_answers_YN/``
``hallusionbench`` ``HallusionBench.json``: a JSON list of      the folder holding ``hallusion_bench/``
                   ``category, subcategory, visual_input,       (``filename`` is ``./hallusion_bench/VD/
                   set_id, figure_id, sample_note,              illusion/0_0.png``)
                   question_id, question, gt_answer_details,
                   gt_answer ("1" yes, "0" no), filename``
``vstar``          ``vstar_bench/`` with ``direct_attributes/``  the same folder (default)
                   and ``relative_position/``: per image
                   ``<stem>.json`` holding ``question,
                   options`` (the first is right),
                   ``target_object, bbox``
``textvqa``        ``TextVQA_0.5.1_val.json``: ``{"data": [{     ``train_images/`` (``<image_id>.jpg``)
                   question, image_id, answers (10), question_
                   id, ...}]}``
=================  ===========================================  ===========================================

Metrics: POPE accuracy / precision / recall / F1 / yes ratio per split (the generic report already gives
them); MME's per-subtask ``acc``, ``acc+`` and score, and the perception and cognition totals
(``agents.metrics.mme_scores``, answers read by MME's own rule); HallusionBench's ``aAcc``, ``fAcc`` and
``qAcc`` (``agents.metrics.hallusion_scores``); V*Bench accuracy per category and overall; TextVQA's VQA
accuracy (``agents.metrics.vqa_accuracy``).

Where this differs from the authors' tools (stated in the report too): HallusionBench's official
evaluation asks GPT-4 whether each answer agrees with the reference; here the yes/no answer is read by the
POPE rule (``agents.metrics.is_correct``), and the questions without an image (``visual_input`` "0") are
left out, since every question here is asked about an image. V*Bench's official script ranks the options
by the model's likelihood; a chat target instead gets the options lettered (A), (B)... in an order
shuffled per question (fixed by its id, so the right answer is not always A) and is scored on the letter
it picks (``agents.metrics.choice_of``).

Example:
    >>> items = load_benchmark("mme", "MME_Benchmark_release_version")  # doctest: +SKIP
    >>> items[0].extra["subtask"], items[0].answer  # doctest: +SKIP
    ('existence', 'yes')
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from agents.datasets import EvalItem, convert_pope
from agents.metrics import (
    MME_COGNITION,
    MME_PERCEPTION,
    choice_of,
    hallusion_scores,
    is_correct,
    mme_scores,
    vqa_accuracy,
)
from api_tool.errors import DatasetError

BENCHMARKS: tuple[str, ...] = ("pope", "mme", "hallusionbench", "vstar", "textvqa")
BENCHMARK_TITLES: dict[str, str] = {
    "pope": "POPE",
    "mme": "MME",
    "hallusionbench": "HallusionBench",
    "vstar": "V*Bench",
    "textvqa": "TextVQA",
}
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp")
VSTAR_CATEGORIES: tuple[str, ...] = ("direct_attributes", "relative_position")
VSTAR_PROMPT = "Answer with the option's letter from the given choices directly."
"""What V*Bench questions end with (LLaVA's multiple-choice instruction)."""
_HALLUSION_FIELDS: tuple[str, ...] = ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id")


def _image(root: Path, name: str, where: str) -> str:
    path = root / name
    if not path.is_file():
        raise DatasetError(f"{where}: image not found: {path} (set --images to the folder that holds it)")
    return str(path.resolve())


def load_pope(data: Path, images: Path) -> list[EvalItem]:
    """POPE's question file (one split) with its COCO images (``agents.datasets.convert_pope``)."""
    return [replace(item, extra={"benchmark": "pope"}) for item in convert_pope(data, images)]


def _mme_root(data: Path) -> Path:
    inner = data / "MME_Benchmark"
    return inner if inner.is_dir() and not (data / "existence").is_dir() else data


def load_mme(data: Path, images: Path) -> list[EvalItem]:
    """MME's release folder: every subtask folder's question files, two yes/no questions per image."""
    root, image_root = _mme_root(data), _mme_root(images)
    if not root.is_dir():
        raise DatasetError(f"MME folder not found: {data}")
    items: list[EvalItem] = []
    for task in (*MME_PERCEPTION, *MME_COGNITION):
        folder = root / task
        if not folder.is_dir():
            continue
        split = (folder / "questions_answers_YN").is_dir()
        questions = folder / "questions_answers_YN" if split else folder
        for text_file in sorted(questions.glob("*.txt")):
            image_dir = image_root / task / "images" if split else image_root / task
            found = [image_dir / f"{text_file.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
            image = next((path for path in found if path.is_file()), None)
            if image is None:
                raise DatasetError(f"{text_file}: no image {text_file.stem}.jpg/.png in {image_dir}")
            lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            for number, line in enumerate(lines, start=1):
                question, tab, answer = line.rpartition("\t")
                if not tab or answer.strip().lower() not in ("yes", "no"):
                    raise DatasetError(f"{text_file}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
                items.append(
                    EvalItem(
                        id=f"mme-{task}-{text_file.stem}-{number}",
                        image=str(image.resolve()),
                        question=question.strip(),
                        answer=answer.strip().lower(),
                        type=task,
                        extra={"benchmark": "mme", "subtask": task, "image_key": f"{task}/{text_file.stem}"},
                    )
                )
    if not items:
        raise DatasetError(f"no MME subtask folders (existence, count, ... OCR) with questions under {data}")
    return items


def load_hallusionbench(data: Path, images: Path) -> list[EvalItem]:
    """``HallusionBench.json`` with its images; the questions without an image are left out."""
    try:
        rows = json.loads(data.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read HallusionBench file {data}: {exc}") from None
    if not isinstance(rows, list):
        raise DatasetError(f"{data}: expected a JSON list of questions")
    items = []
    for index, row in enumerate(rows):
        where = f"{data}[{index}]"
        missing = [
            key for key in (*_HALLUSION_FIELDS, "question", "gt_answer") if not isinstance(row, dict) or key not in row
        ]
        if missing:
            raise DatasetError(f"{where}: not a HallusionBench question, missing {missing}")
        if str(row["visual_input"]) == "0" or not row.get("filename"):
            continue
        if str(row["gt_answer"]) not in ("0", "1"):
            raise DatasetError(f"{where}: gt_answer must be '0' or '1', got {row['gt_answer']!r}")
        keys = {key: str(row[key]) for key in _HALLUSION_FIELDS}
        items.append(
            EvalItem(
                id="hb-"
                + "-".join(keys[key] for key in ("category", "subcategory", "set_id", "figure_id", "question_id")),
                image=_image(images, str(row["filename"]).removeprefix("./"), where),
                question=str(row["question"]),
                answer="yes" if str(row["gt_answer"]) == "1" else "no",
                type=f"{keys['category']}/{keys['subcategory']}",
                extra={"benchmark": "hallusionbench", **keys},
            )
        )
    if not items:
        raise DatasetError(f"{data}: no HallusionBench question with an image")
    return items


def _shuffled_options(item_id: str, options: list[str]) -> tuple[list[str], str]:
    """The options in an order fixed by ``item_id``, and the letter of the first (the right) one."""
    seed = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "big")
    order = list(range(len(options)))
    random.Random(seed).shuffle(order)
    return [options[i] for i in order], chr(ord("A") + order.index(0))


def load_vstar(data: Path, images: Path) -> list[EvalItem]:
    """V*Bench's folder: each image's ``.json`` (question, options with the right one first), as a lettered
    multiple-choice question."""
    items = []
    for category in VSTAR_CATEGORIES:
        folder = data / category
        if not folder.is_dir():
            continue
        for annotation in sorted(folder.glob("*.json")):
            where = str(annotation)
            try:
                record = json.loads(annotation.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc})") from None
            options = record.get("options") if isinstance(record, dict) else None
            if not isinstance(options, list) or len(options) < 2 or not isinstance(record.get("question"), str):
                raise DatasetError(f"{where}: a V*Bench annotation needs 'question' and a list of 'options'")
            found = [images / category / f"{annotation.stem}{suffix}" for suffix in IMAGE_SUFFIXES]
            image = next((path for path in found if path.is_file()), None)
            if image is None:
                raise DatasetError(f"{where}: no image {annotation.stem}.jpg/.png in {images / category}")
            item_id = f"vstar-{category}-{annotation.stem}"
            shuffled, letter = _shuffled_options(item_id, [str(option) for option in options])
            lettered = "\n".join(f"({chr(ord('A') + i)}) {option}" for i, option in enumerate(shuffled))
            items.append(
                EvalItem(
                    id=item_id,
                    image=str(image.resolve()),
                    question=f"{record['question']}\n{lettered}\n{VSTAR_PROMPT}",
                    answer=letter,
                    type=category,
                    extra={"benchmark": "vstar", "options": shuffled, "target_object": record.get("target_object")},
                )
            )
    if not items:
        raise DatasetError(f"no V*Bench annotations under {data}/{{{','.join(VSTAR_CATEGORIES)}}}")
    return items


def load_textvqa(data: Path, images: Path) -> list[EvalItem]:
    """TextVQA's annotation file; the reference shown is the most frequent human answer, the score the VQA
    accuracy against all ten."""
    try:
        body = json.loads(data.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read TextVQA file {data}: {exc}") from None
    rows = body.get("data") if isinstance(body, dict) else None
    if not isinstance(rows, list):
        raise DatasetError(f"{data}: expected TextVQA's {{'data': [...]}}")
    items = []
    for index, row in enumerate(rows):
        where = f"{data}:data[{index}]"
        if not isinstance(row, dict) or any(key not in row for key in ("question", "image_id", "question_id")):
            raise DatasetError(f"{where}: not a TextVQA question (needs question, image_id, question_id)")
        answers = [str(answer) for answer in row.get("answers") or []]
        if not answers:
            raise DatasetError(f"{where}: no 'answers' (the test split has none; use train or val)")
        items.append(
            EvalItem(
                id=f"textvqa-{row['question_id']}",
                image=_image(images, f"{row['image_id']}.jpg", where),
                question=str(row["question"]),
                answer=max(answers, key=answers.count),
                extra={"benchmark": "textvqa", "answers": answers},
            )
        )
    if not items:
        raise DatasetError(f"{data}: no questions")
    return items


_LOADERS: dict[str, Callable[[Path, Path], list[EvalItem]]] = {
    "pope": load_pope,
    "mme": load_mme,
    "hallusionbench": load_hallusionbench,
    "vstar": load_vstar,
    "textvqa": load_textvqa,
}


def _default_images(name: str, source: Path) -> Path:
    """Where a benchmark's images are when ``--images`` is not given: MME and V*Bench ship them in their
    folder; TextVQA's ``train_images/`` beside the annotation file (LLaVA's layout); else the file's folder."""
    if name in ("mme", "vstar"):
        return source
    if name == "textvqa" and (source.parent / "train_images").is_dir():
        return source.parent / "train_images"
    return source.parent


def load_benchmark(
    name: str,
    data: str | os.PathLike[str],
    images: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[EvalItem]:
    """The questions of a standard benchmark from its published files (see the module docstring).

    Args:
        name: one of :data:`BENCHMARKS`.
        data: the benchmark's file or folder.
        images: the images root; defaults to ``data`` itself for MME and V*Bench (which ship their images),
            to ``train_images/`` beside TextVQA's file, and to ``data``'s folder otherwise.
        limit: keep the first ``limit`` questions.

    Raises ``DatasetError`` naming the file (and entry) for anything missing or malformed.
    """
    if name not in _LOADERS:
        raise DatasetError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of items, got {limit}")
    source = Path(data).expanduser()
    if not source.exists():
        raise DatasetError(f"{name} data not found: {source}")
    root = Path(images).expanduser() if images is not None else _default_images(name, source)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    items = _LOADERS[name](source, root)
    return items if limit is None else items[:limit]


def benchmark_summary(
    records: Sequence[dict[str, Any]], items: dict[str, EvalItem], modes: Sequence[str]
) -> dict[str, Any] | None:
    """The benchmark's own metric per mode for the records of benchmark items (``None`` when no item comes
    from a benchmark with a metric of its own: POPE's is in the generic report).

    Example:
        >>> benchmark_summary(records, {item.id: item for item in items}, ["plain", "api"])  # doctest: +SKIP
        {'name': 'mme', 'modes': {'plain': {'perception': 1480.2, ...}}}
    """
    names = {item.extra.get("benchmark") for item in items.values()} - {None, "pope"}
    if len(names) != 1:
        return None
    name = str(names.pop())
    per_mode: dict[str, Any] = {}
    for mode in modes:
        rows = [(r, items[str(r["id"])]) for r in records if r["mode"] == mode and str(r["id"]) in items]
        if rows:
            per_mode[mode] = _SCORERS[name]([(str(r["answer"]), item) for r, item in rows])
    return {"name": name, "modes": per_mode}


def _mme(answers: list[tuple[str, EvalItem]]) -> dict[str, Any]:
    return mme_scores(
        [(item.extra["subtask"], item.extra["image_key"], answer, item.answer) for answer, item in answers]
    )


def _hallusion(answers: list[tuple[str, EvalItem]]) -> dict[str, Any]:
    keys = ("category", "subcategory", "set_id", "figure_id", "question_id")
    rows = [(*(str(item.extra[key]) for key in keys), is_correct(answer, item.answer)) for answer, item in answers]
    return hallusion_scores(rows)  # type: ignore[arg-type]


def _vstar(answers: list[tuple[str, EvalItem]]) -> dict[str, Any]:
    right: dict[str, list[bool]] = {(item.type or "-"): [] for _, item in answers}
    for answer, item in answers:
        right[item.type or "-"].append(choice_of(answer, item.extra["options"]) == item.answer)
    every = [value for values in right.values() for value in values]
    return {
        "questions": len(every),
        "accuracy": sum(every) / len(every),
        "by_category": {category: sum(values) / len(values) for category, values in right.items()},
    }


def _textvqa(answers: list[tuple[str, EvalItem]]) -> dict[str, Any]:
    scores = [vqa_accuracy(answer, item.extra["answers"]) for answer, item in answers]
    return {"questions": len(scores), "vqa_accuracy": sum(scores) / len(scores)}


_SCORERS: dict[str, Callable[[list[tuple[str, EvalItem]]], dict[str, Any]]] = {
    "mme": _mme,
    "hallusionbench": _hallusion,
    "vstar": _vstar,
    "textvqa": _textvqa,
}
