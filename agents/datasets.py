"""Evaluation datasets: the JSONL format, a converter for POPE's own files, and the synthetic POPE-style
sets built from the demo scenes.

The JSONL format (UTF-8, one JSON object per line, blank lines ignored):

=============  ========  ===========================================================================
field          required  meaning
=============  ========  ===========================================================================
``image``      yes       a path relative to the JSONL file's folder, an absolute path,
                         ``"scene:<seed>"``: the demo scene ``api_tool.demo.scenes.generate_scene(seed)``,
                         or ``"scene:small:<seed>"``: the same with ``config=SMALL_OBJECT_CONFIG`` (large
                         canvases, small objects), regenerated on demand (so the synthetic sets ship
                         without image files)
``question``   yes       the question asked to the model
``answer``     yes       the reference answer (a string; a number is read as its text). ``yes``/``no``
                         references are scored the POPE way, others by normalised match
                         (``agents.metrics``)
``type``       no        question type for per-type accuracy (``existence``, ``colour``...)
``split``      no        group for POPE's per-split scores (``random``, ``popular``, ``adversarial``...)
``id``         no        a unique string or number; defaults to ``"<file stem>:<line>"``. Give ids when the
                         file may be edited between resumed runs: results are matched by id
=============  ========  ===========================================================================

Other keys are kept in :attr:`EvalItem.extra`; the synthetic sets below add ``scope`` (``detail``: one
object or a few answer it; ``whole``: the whole scene, e.g. "describe the image.") and ``targets`` (the
names of the objects the question is about). Example line::

    {"id": "random-7000001-0", "image": "scene:7000001", "question": "is there a red circle in the image?",
     "answer": "yes", "type": "existence", "split": "random"}

POPE's own files (``coco_pope_random.json``...: one object per line with ``question_id``, ``image``,
``text``, ``label``, images from COCO val2014) convert with :func:`convert_pope` or
``python -m agents.datasets convert-pope coco_pope_random.json val2014/ -o pope_random.jsonl``.

The synthetic sets (:func:`synthetic_items`) ship as ``api_tool/demo/data/synthetic_pope.jsonl`` (POPE's
three splits: for each scene one present and one absent object per split; absent objects drawn at random,
among the most frequent, or recombining present colours and shapes) and ``synthetic_qa.jsonl`` (colour,
shape, count and relative-position questions). Both are rebuilt exactly from seeds by
:func:`build_synthetic_pope` / :func:`build_synthetic_qa`; asking for more items than ship extends them
with further seeds.

Two more sets: ``small`` (``synthetic_small.jsonl``, :func:`build_small_objects`: scenes of
``SMALL_OBJECT_CONFIG``, 1024-1536 px canvases with 6-12 small objects, the V*Bench situation; per scene
detail questions -- existence with a POPE-style negative, colour, shape, count of a kind, relative position
-- and one whole-scene question, ``describe`` or ``total_count``) and ``two-region``
(``synthetic_two_region.jsonl``, :func:`build_two_region`: "is the red circle left of the blue square?" about
two objects at least ``TWO_REGION_MIN_DISTANCE`` of the shorter side apart, asked true and flipped).

Every set has a test version (its plain name: the final measurement only) and a development version
(``NAME-dev``: for choosing settings), on disjoint scene seeds (:data:`SEED_RANGES`), far from the seeds the
demo models were trained and benchmarked on (their scene seeds stay below 3,000,000):

=====================  ======================  ======================  ===============================
sets                   test seeds (shipped)    dev seeds (shipped)     questions (test / dev)
=====================  ======================  ======================  ===============================
POPE splits, ``all``   7,000,000+ (150)        7,500,000+ (100)        300 / 200 per split
``qa``                 7,000,000+ (150)        7,500,000+ (100)        up to 600 / 400
``small``              7,100,000+ (80)         7,600,000+ (40)         554 / 280 (about 7 per scene)
``two-region``         7,200,000+ (300)        7,700,000+ (200)        2 per scene that has a pair
=====================  ======================  ======================  ===============================

Each range owns a block of ``SEED_BLOCK`` (100,000) seeds, room for extending its set beyond what ships.

Example:
    >>> items = synthetic_items("adversarial", 4)
    >>> [(item.answer, item.split) for item in items]
    [('yes', 'adversarial'), ('no', 'adversarial'), ('yes', 'adversarial'), ('no', 'adversarial')]
    >>> item_image(items[0]).size == item_image(items[1]).size
    True
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import permutations
from pathlib import Path
from typing import Any

from PIL import Image

from api_tool.demo.scenes import (
    DEFAULT_CONFIG,
    OPPOSITE_RELATION,
    POPE_SPLITS,
    SMALL_OBJECT_CONFIG,
    WHOLE_SCENE_TYPES,
    Question,
    SceneConfig,
    SceneObject,
    existence_questions,
    generate_scene,
    make_question,
    name_of,
    scene_questions,
    true_relations,
    whole_scene_question,
)
from api_tool.errors import ApiPromptingError, DatasetError
from api_tool.images import load_image

SCENE_PREFIX = "scene:"
SCENE_CONFIGS: dict[str, SceneConfig] = {"small": SMALL_OBJECT_CONFIG}
"""Scene configurations a reference can name (``"scene:<name>:<seed>"``); ``"scene:<seed>"`` is ``DEFAULT_CONFIG``."""
REQUIRED_FIELDS: tuple[str, ...] = ("image", "question", "answer")
OPTIONAL_FIELDS: tuple[str, ...] = ("type", "split", "id")

SYNTHETIC_DATA_DIR = Path(__file__).resolve().parent.parent / "api_tool" / "demo" / "data"
SYNTHETIC_POPE_FILE = SYNTHETIC_DATA_DIR / "synthetic_pope.jsonl"
SYNTHETIC_QA_FILE = SYNTHETIC_DATA_DIR / "synthetic_qa.jsonl"
SYNTHETIC_FIRST_SEED = 7_000_000
"""Seed of the first synthetic scene (far from the seeds the demo models were trained on)."""
SHIPPED_SCENES = 150
"""Scenes in the shipped files: 300 POPE questions per split, up to 600 short-answer questions."""
QA_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position")
SMALL_DETAIL_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position")
"""The small-object split's detail questions besides existence (its counts are always of one kind)."""
TWO_REGION_MIN_DISTANCE = 0.45
"""Two-region questions ask about objects whose centres are at least this share of the shorter side apart."""


@dataclass(frozen=True)
class SeedRange:
    """The scene seeds of one stage of a set: ``first`` and how many of them the shipped file holds."""

    first: int
    shipped: int


SEED_BLOCK = 100_000
"""Seeds each stage of a set owns from its first seed on (the ranges of ``SEED_RANGES`` are that far apart)."""
SEED_RANGES: dict[str, dict[str, SeedRange]] = {
    "pope": {"test": SeedRange(SYNTHETIC_FIRST_SEED, SHIPPED_SCENES), "dev": SeedRange(7_500_000, 100)},
    "qa": {"test": SeedRange(SYNTHETIC_FIRST_SEED, SHIPPED_SCENES), "dev": SeedRange(7_500_000, 100)},
    "small": {"test": SeedRange(7_100_000, 80), "dev": SeedRange(7_600_000, 40)},
    "two-region": {"test": SeedRange(7_200_000, 300), "dev": SeedRange(7_700_000, 200)},
}
"""Test and development seeds of each family of sets (see the module docstring's table)."""
STAGES: tuple[str, ...] = ("test", "dev")
DEV_SUFFIX = "-dev"
_TEST_SETS: tuple[str, ...] = (*POPE_SPLITS, "all", "qa", "small", "two-region")
SYNTHETIC_SETS: tuple[str, ...] = (*_TEST_SETS, *(name + DEV_SUFFIX for name in _TEST_SETS))

_POPE_FIELDS: tuple[str, ...] = ("question_id", "image", "text", "label")
_SCENE_REFERENCE = re.compile(r"^scene:(?:(?P<config>[a-z_]+):)?(?P<seed>-?\d+)$")


@dataclass(frozen=True)
class EvalItem:
    """One question of an evaluation set.

    Attributes:
        id: unique within the set.
        image: an absolute path, or ``"scene:<seed>"`` (see the module docstring).
        question: the question text.
        answer: the reference answer.
        type: question type, or ``None``.
        split: group for POPE's per-split scores, or ``None``.
        extra: any other fields of the JSONL line.
    """

    id: str
    image: str
    question: str
    answer: str
    type: str | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, base_dir: Path | None = None) -> dict[str, Any]:
        """The JSONL object; with ``base_dir`` a file path is written relative to it."""
        image = self.image
        if base_dir is not None and not image.startswith(SCENE_PREFIX):
            image = os.path.relpath(image, base_dir)
        line: dict[str, Any] = {"id": self.id, "image": image, "question": self.question, "answer": self.answer}
        if self.type is not None:
            line["type"] = self.type
        if self.split is not None:
            line["split"] = self.split
        return {**line, **self.extra}


@dataclass(frozen=True)
class SceneReference:
    """A parsed ``"scene:[<config>:]<seed>"`` reference: the scene configuration's name (``None``: the
    default) and the seed."""

    config: str | None
    seed: int

    @property
    def scene_config(self) -> SceneConfig:
        """The configuration the scene is generated with."""
        return DEFAULT_CONFIG if self.config is None else SCENE_CONFIGS[self.config]

    def __str__(self) -> str:
        return f"{SCENE_PREFIX}{self.seed}" if self.config is None else f"{SCENE_PREFIX}{self.config}:{self.seed}"


def scene_reference(image: str) -> SceneReference | None:
    """The parsed ``"scene:<seed>"`` or ``"scene:<config>:<seed>"`` reference, else ``None``; an unknown
    configuration name raises ``DatasetError`` naming the known ones.

    Example:
        >>> scene_reference("scene:small:7100000"), scene_reference("photo.jpg")
        (SceneReference(config='small', seed=7100000), None)
    """
    match = _SCENE_REFERENCE.match(image)
    if match is None:
        return None
    config = match.group("config")
    if config is not None and config not in SCENE_CONFIGS:
        known = ", ".join(f"scene:{name}:<seed>" for name in SCENE_CONFIGS)
        raise DatasetError(f"unknown scene configuration {config!r} in {image!r}; write scene:<seed> or {known}")
    return SceneReference(config, int(match.group("seed")))


def scene_seed(image: str) -> int | None:
    """The seed of a ``"scene:<seed>"`` reference (a default-configuration scene), else ``None`` (also for
    ``"scene:small:<seed>"``: see :func:`scene_reference`).

    Example:
        >>> scene_seed("scene:7000001"), scene_seed("scene:small:7000001"), scene_seed("photo.jpg")
        (7000001, None, None)
    """
    reference = scene_reference(image) if image.startswith(SCENE_PREFIX) else None
    return reference.seed if reference is not None and reference.config is None else None


@lru_cache(maxsize=256)
def _scene_image(reference: SceneReference) -> Image.Image:
    return generate_scene(reference.seed, config=reference.scene_config).image


def item_image(item: EvalItem) -> Image.Image:
    """The item's image as an RGB PIL image (a demo scene is regenerated from its reference, and cached).

    Example:
        >>> item_image(EvalItem("x", "scene:3", "q", "yes")).mode
        'RGB'
    """
    reference = scene_reference(item.image)
    if reference is not None:
        return _scene_image(reference).copy()
    return load_image(item.image)


def _text_field(record: dict[str, Any], name: str, where: str, *, numbers: bool, required: bool) -> str | None:
    value = record.get(name)
    if value is None:
        if required:
            raise DatasetError(
                f"{where}: missing required field {name!r} (each line needs {', '.join(REQUIRED_FIELDS)})"
            )
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float) if numbers else str):
        kind = "a string or number" if numbers else "a string"
        raise DatasetError(f"{where}: field {name!r} must be {kind}, got {type(value).__name__} {value!r}")
    text = str(value)
    if required and not text.strip():
        raise DatasetError(f"{where}: field {name!r} is empty")
    return text


def _resolve_image(reference: str, base_dir: Path, where: str) -> str:
    if reference.startswith(SCENE_PREFIX):
        try:
            parsed = scene_reference(reference)
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None
        if parsed is None:
            raise DatasetError(
                f"{where}: {reference!r} is not a scene reference; write scene:<integer seed> or scene:small:<seed>"
            )
        return reference
    path = Path(reference).expanduser()
    resolved = path if path.is_absolute() else base_dir / path
    if not resolved.is_file():
        raise DatasetError(f"{where}: image not found: {resolved}")
    return str(resolved.resolve())


def parse_item(record: object, where: str, base_dir: Path, default_id: str) -> EvalItem:
    """One JSONL object as an :class:`EvalItem`; ``where`` ("file:line") prefixes every error message."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    image = _text_field(record, "image", where, numbers=False, required=True)
    question = _text_field(record, "question", where, numbers=False, required=True)
    answer = _text_field(record, "answer", where, numbers=True, required=True)
    item_id = _text_field(record, "id", where, numbers=True, required=False)
    assert image is not None and question is not None and answer is not None
    return EvalItem(
        id=item_id if item_id is not None else default_id,
        image=_resolve_image(image, base_dir, where),
        question=question,
        answer=answer,
        type=_text_field(record, "type", where, numbers=False, required=False),
        split=_text_field(record, "split", where, numbers=False, required=False),
        extra={key: value for key, value in record.items() if key not in REQUIRED_FIELDS + OPTIONAL_FIELDS},
    )


def _json_records(source: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "file:line", parsed JSON)`` for each non-blank line.

    Lines end at ``\n`` (JSON Lines; a ``\r`` before it is dropped) and are decoded one by one, so bytes
    that are not UTF-8 and invalid JSON are reported with their line, and invalid JSON with its column
    (counted in characters from 1, the line terminator excluded).
    """
    with source.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{source}:{number}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{where}: not UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
                    "save it as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
                ) from None
            yield number, where, record


def load_jsonl(path: str | os.PathLike[str], limit: int | None = None) -> list[EvalItem]:
    """Read an evaluation JSONL (see the module docstring); ``limit`` keeps the first items.

    Raises ``DatasetError`` naming the file and line for a missing file, invalid JSON, a missing or
    mistyped field, a duplicate id, or an image that does not exist.

    Example:
        >>> items = load_jsonl(SYNTHETIC_POPE_FILE, limit=2)
        >>> items[0].image.startswith("scene:"), items[0].split
        (True, 'random')
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise DatasetError(f"dataset file not found: {source}")
    if not source.is_file():
        raise DatasetError(f"dataset path is not a file: {source}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of items, got {limit}")
    base_dir = source.resolve().parent
    items: list[EvalItem] = []
    first_line: dict[str, int] = {}
    for number, where, record in _json_records(source):
        item = parse_item(record, where, base_dir, default_id=f"{source.stem}:{number}")
        if item.id in first_line:
            raise DatasetError(f"{where}: duplicate id {item.id!r} (first used on line {first_line[item.id]})")
        first_line[item.id] = number
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DatasetError(f"dataset file holds no items: {source}")
    return items


def write_jsonl(items: Iterable[EvalItem], path: str | os.PathLike[str]) -> Path:
    """Write items as JSONL, image paths relative to the file's folder; returns the path.

    Example:
        >>> write_jsonl(synthetic_items("random", 10), "random.jsonl")  # doctest: +SKIP
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    base_dir = target.resolve().parent
    with target.open("w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item.to_json(base_dir), ensure_ascii=False) + "\n")
    return target


def pope_split_of(path: Path) -> str | None:
    """The POPE split a file name names (``coco_pope_adversarial.json`` -> ``"adversarial"``), else ``None``."""
    found = [split for split in POPE_SPLITS if split in path.stem.lower()]
    return found[0] if len(found) == 1 else None


def convert_pope(
    pope_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    split: str | None = None,
) -> list[EvalItem]:
    """Convert one of POPE's question files into :class:`EvalItem` s (and write them to ``output``).

    POPE's lines hold ``question_id``, ``image`` (a file name in ``image_dir``, e.g. COCO val2014),
    ``text`` (the question) and ``label`` (``yes``/``no``). The split comes from ``split`` or the file
    name; ids are ``"<split>-<question_id>"``; type is ``existence``.

    Example:
        >>> items = convert_pope("coco_pope_random.json", "val2014", "pope_random.jsonl")  # doctest: +SKIP
        >>> items[0].split, items[0].answer  # doctest: +SKIP
        ('random', 'yes')
    """
    source = Path(pope_file).expanduser()
    images = Path(image_dir).expanduser()
    if not source.is_file():
        raise DatasetError(f"POPE file not found: {source}")
    if not images.is_dir():
        raise DatasetError(f"image folder not found: {images}")
    chosen = split or pope_split_of(source)
    prefix = chosen or source.stem
    items: list[EvalItem] = []
    seen: set[str] = set()
    for _number, where, record in _json_records(source):
        if not isinstance(record, dict) or any(key not in record for key in _POPE_FIELDS):
            missing = [key for key in _POPE_FIELDS if not isinstance(record, dict) or key not in record]
            raise DatasetError(f"{where}: not a POPE line, missing {missing} (POPE lines hold {list(_POPE_FIELDS)})")
        label = str(record["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise DatasetError(f"{where}: POPE label must be 'yes' or 'no', got {record['label']!r}")
        item_id = f"{prefix}-{record['question_id']}"
        if item_id in seen:
            raise DatasetError(f"{where}: duplicate question_id {record['question_id']!r}")
        seen.add(item_id)
        image = images / str(record["image"])
        if not image.is_file():
            raise DatasetError(f"{where}: image not found: {image}")
        items.append(
            EvalItem(
                id=item_id,
                image=str(image.resolve()),
                question=str(record["text"]),
                answer=label,
                type="existence",
                split=chosen,
            )
        )
    if not items:
        raise DatasetError(f"POPE file holds no questions: {source}")
    if output is not None:
        write_jsonl(items, output)
    return items


def build_synthetic_pope(n_scenes: int, first_seed: int = SYNTHETIC_FIRST_SEED) -> list[EvalItem]:
    """The synthetic POPE set over scenes ``first_seed .. first_seed + n_scenes - 1``: split by split, for
    each scene a question about a present object (``yes``) and one about an absent object (``no``) chosen
    as ``api_tool.demo.scenes.existence_negative`` does for that split.

    Example:
        >>> [(item.id, item.answer) for item in build_synthetic_pope(1)][:3]
        [('random-7000000-0', 'yes'), ('random-7000000-1', 'no'), ('popular-7000000-0', 'yes')]
    """
    by_split: dict[str, list[EvalItem]] = {split: [] for split in POPE_SPLITS}
    for seed in range(first_seed, first_seed + n_scenes):
        objects = generate_scene(seed).objects
        if not objects:
            continue
        counters = dict.fromkeys(POPE_SPLITS, 0)
        for question in scene_questions(objects, seed=seed, types=("existence",)):
            split = question.split
            assert split is not None
            by_split[split].append(
                EvalItem(
                    id=f"{split}-{seed}-{counters[split]}",
                    image=f"{SCENE_PREFIX}{seed}",
                    question=question.question,
                    answer=question.answer,
                    type=question.type,
                    split=split,
                )
            )
            counters[split] += 1
    return [item for split in POPE_SPLITS for item in by_split[split]]


def build_synthetic_qa(n_scenes: int, first_seed: int = SYNTHETIC_FIRST_SEED) -> list[EvalItem]:
    """Short-answer questions (colour, shape, count, relative position) over the same scenes as
    :func:`build_synthetic_pope`: one of each type per scene where the scene allows an unambiguous one.

    Example:
        >>> sorted({item.type for item in build_synthetic_qa(6)}) <= sorted(QA_TYPES)
        True
    """
    items = []
    for seed in range(first_seed, first_seed + n_scenes):
        objects = generate_scene(seed).objects
        if not objects:
            continue
        for question in scene_questions(objects, seed=seed, types=QA_TYPES):
            items.append(
                EvalItem(
                    id=f"qa-{seed}-{question.type}",
                    image=f"{SCENE_PREFIX}{seed}",
                    question=question.question,
                    answer=question.answer,
                    type=question.type,
                )
            )
    return items


def small_object_questions(objects: Sequence[SceneObject], rng: random.Random, negative_split: str) -> list[Question]:
    """The small-object split's questions about one scene: existence (one present object, one absent chosen
    as POPE's ``negative_split`` does), colour, shape, count of one kind and relative position where the
    scene allows an unambiguous one, and one whole-scene question (``describe`` or ``total_count``).

    Example:
        >>> scene = generate_scene(7100000, config=SMALL_OBJECT_CONFIG)  # doctest: +SKIP
        >>> [q.type for q in small_object_questions(scene.objects, random.Random(0), "random")]  # doctest: +SKIP
        ['existence', 'existence', 'colour', 'shape', 'count', 'position', 'describe']
    """
    questions = existence_questions(objects, rng, negative_split)
    for kind in SMALL_DETAIL_TYPES:
        drawn = [make_question(objects, kind, rng) for _ in range(8 if kind == "count" else 1)]
        kept = [q for q in drawn if q is not None and q.question != "how many objects are there?"]
        if kept:
            questions.append(kept[0])
    questions.append(whole_scene_question(objects, rng.choice(WHOLE_SCENE_TYPES), rng))
    return questions


def _question_item(item_id: str, image: str, question: Question, split: str) -> EvalItem:
    whole = question.type in WHOLE_SCENE_TYPES
    extra: dict[str, Any] = {"scope": "whole" if whole else "detail"}
    if not whole:
        extra["targets"] = list(question.targets)
    return EvalItem(item_id, image, question.question, question.answer, question.type, split, extra)


def build_small_objects(n_scenes: int, first_seed: int = SEED_RANGES["small"]["test"].first) -> list[EvalItem]:
    """The small-object split over scenes ``first_seed ..`` of ``SMALL_OBJECT_CONFIG`` (``scene:small:<seed>``):
    :func:`small_object_questions` per scene, the existence negative's POPE split cycling with the seed.

    Example:
        >>> items = build_small_objects(1)  # doctest: +SKIP
        >>> items[0].image, items[0].split, items[0].extra["scope"]  # doctest: +SKIP
        ('scene:small:7100000', 'small', 'detail')
    """
    items = []
    for seed in range(first_seed, first_seed + n_scenes):
        reference = SceneReference("small", seed)
        objects = generate_scene(seed, config=reference.scene_config).objects
        if not objects:
            continue
        questions = small_object_questions(objects, random.Random(seed), POPE_SPLITS[seed % len(POPE_SPLITS)])
        items.extend(_question_item(f"small-{seed}-{i}", str(reference), q, "small") for i, q in enumerate(questions))
    return items


def far_apart_pairs(
    objects: Sequence[SceneObject], shorter_side: float, min_distance: float = TWO_REGION_MIN_DISTANCE
) -> list[tuple[SceneObject, SceneObject, tuple[str, ...]]]:
    """Ordered pairs of uniquely named objects in a clear relation whose centres are at least
    ``min_distance * shorter_side`` apart, with the relations that hold ("a <relation> b").

    Example:
        >>> scene = generate_scene(7200000)
        >>> all(rels for _, _, rels in far_apart_pairs(scene.objects, min(scene.size)))
        True
    """
    names = Counter(name_of(o) for o in objects)
    unique = [o for o in objects if names[name_of(o)] == 1]
    return [
        (a, b, relations)
        for a, b in permutations(unique, 2)
        if math.dist(a.center, b.center) >= min_distance * shorter_side and (relations := true_relations(a, b))
    ]


def build_two_region(n_scenes: int, first_seed: int = SEED_RANGES["two-region"]["test"].first) -> list[EvalItem]:
    """Questions that need two disjoint regions, over default scenes ``first_seed .. + n_scenes - 1``: for each
    scene with :func:`far_apart_pairs`, one pair asked with a relation that holds (``yes``) and flipped (``no``).

    Example:
        >>> [(item.answer, item.extra["targets"] == build_two_region(3)[0].extra["targets"])
        ...  for item in build_two_region(3)[:2]]
        [('yes', True), ('no', True)]
    """
    items = []
    for seed in range(first_seed, first_seed + n_scenes):
        scene = generate_scene(seed)
        pairs = far_apart_pairs(scene.objects, min(scene.size))
        if not pairs:
            continue
        rng = random.Random(seed)
        a, b, relations = rng.choice(pairs)
        relation = rng.choice(relations)
        for answer, asked in (("yes", relation), ("no", OPPOSITE_RELATION[relation])):
            question = Question(f"is the {name_of(a)} {asked} the {name_of(b)}?", answer, "position", None,
                                (name_of(a), name_of(b)))  # fmt: skip
            items.append(_question_item(f"two-region-{seed}-{answer}", f"{SCENE_PREFIX}{seed}", question, "two-region"))
    return items


@dataclass(frozen=True)
class _SetFamily:
    """How a family of synthetic sets is built and where each stage ships."""

    build: Callable[[int, int], list[EvalItem]]
    files: dict[str, Path]


_FAMILIES: dict[str, _SetFamily] = {
    "pope": _SetFamily(
        build_synthetic_pope, {"test": SYNTHETIC_POPE_FILE, "dev": SYNTHETIC_DATA_DIR / "synthetic_pope_dev.jsonl"}
    ),
    "qa": _SetFamily(
        build_synthetic_qa, {"test": SYNTHETIC_QA_FILE, "dev": SYNTHETIC_DATA_DIR / "synthetic_qa_dev.jsonl"}
    ),
    "small": _SetFamily(
        build_small_objects,
        {"test": SYNTHETIC_DATA_DIR / "synthetic_small.jsonl", "dev": SYNTHETIC_DATA_DIR / "synthetic_small_dev.jsonl"},
    ),
    "two-region": _SetFamily(
        build_two_region,
        {
            "test": SYNTHETIC_DATA_DIR / "synthetic_two_region.jsonl",
            "dev": SYNTHETIC_DATA_DIR / "synthetic_two_region_dev.jsonl",
        },
    ),
}


def set_stage(name: str) -> tuple[str, str]:
    """A synthetic set's name split into its base name and stage: ``"small-dev"`` -> ``("small", "dev")``.

    Example:
        >>> set_stage("random"), set_stage("qa-dev")
        (('random', 'test'), ('qa', 'dev'))
    """
    if name.endswith(DEV_SUFFIX):
        return name[: -len(DEV_SUFFIX)], "dev"
    return name, "test"


def synthetic_items(name: str, n: int | None = None) -> list[EvalItem]:
    """A shipped synthetic set: ``random``, ``popular`` or ``adversarial`` (POPE splits), ``all`` (the
    three splits), ``qa`` (short answers), ``small`` (small objects on large canvases) or ``two-region``; each
    with ``-dev`` appended for its development version (other seeds). ``n`` keeps the first ``n`` items (per
    split for ``all``); beyond what ships, the set is extended from further seeds exactly as it was built.

    Example:
        >>> items = synthetic_items("all", 10)
        >>> len(items), sorted({item.split for item in items})
        (30, ['adversarial', 'popular', 'random'])
        >>> synthetic_items("random-dev", 1)[0].image
        'scene:7500000'
    """
    if name not in SYNTHETIC_SETS:
        raise DatasetError(f"unknown synthetic set {name!r}; choose one of {', '.join(SYNTHETIC_SETS)}")
    if n is not None and n < 1:
        raise DatasetError(f"n must be a positive number of items, got {n}")
    base, stage = set_stage(name)
    suffix = DEV_SUFFIX if stage == "dev" else ""
    if base == "all":
        return [item for split in POPE_SPLITS for item in synthetic_items(split + suffix, n)]
    family = "pope" if base in POPE_SPLITS else base
    seeds = SEED_RANGES[family][stage]
    source = _FAMILIES[family].files[stage]
    if not source.is_file():
        raise DatasetError(
            f"the shipped set file {source} is missing; rebuild it: python -m agents.datasets build-synthetic"
        )
    split = base if family == "pope" else None
    return _take(load_jsonl(source), n, _FAMILIES[family].build, split, seeds.first + seeds.shipped)


def _take(
    shipped: list[EvalItem],
    n: int | None,
    build: Callable[[int, int], list[EvalItem]],
    split: str | None,
    next_seed: int,
) -> list[EvalItem]:
    """The first ``n`` items of ``shipped`` (of ``split``), extended from the scenes from ``next_seed`` on."""
    chosen = [item for item in shipped if split is None or item.split == split]
    while n is not None and len(chosen) < n:
        scenes = max(1, n - len(chosen))
        chosen += [item for item in build(scenes, next_seed) if split is None or item.split == split]
        next_seed += scenes
    return chosen if n is None else chosen[:n]


def write_shipped_sets(families: Sequence[str] = tuple(_FAMILIES)) -> list[Path]:
    """Rebuild the shipped synthetic files of ``families`` (both stages) from their seeds (``build-synthetic``).

    Example:
        >>> write_shipped_sets(["two-region"])  # doctest: +SKIP
    """
    unknown = set(families) - set(_FAMILIES)
    if unknown:
        raise DatasetError(f"unknown set families {sorted(unknown)}; choose among {', '.join(_FAMILIES)}")
    written = []
    for family in families:
        for stage in STAGES:
            seeds = SEED_RANGES[family][stage]
            written.append(
                write_jsonl(_FAMILIES[family].build(seeds.shipped, seeds.first), _FAMILIES[family].files[stage])
            )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agents.datasets convert-pope FILE IMAGE_DIR -o OUT.jsonl`` | ``build-synthetic``
    | ``export-synthetic NAME -o OUT.jsonl [--n N] [--images DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m agents.datasets", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pope = commands.add_parser("convert-pope", help="convert one of POPE's question files to the JSONL format")
    pope.add_argument("pope_file", type=Path)
    pope.add_argument("image_dir", type=Path, help="the folder holding POPE's images (COCO val2014)")
    pope.add_argument("-o", "--output", type=Path, required=True)
    pope.add_argument("--split", default=None, help="split name (default: from the file name)")
    build = commands.add_parser("build-synthetic", help="rebuild the shipped synthetic files from their seeds")
    build.add_argument("--families", nargs="+", default=list(_FAMILIES), choices=list(_FAMILIES))
    export = commands.add_parser("export-synthetic", help="write a synthetic set with its images as PNG files")
    export.add_argument("name", choices=SYNTHETIC_SETS)
    export.add_argument("-o", "--output", type=Path, required=True)
    export.add_argument("--n", type=int, default=None, help="items (per split for 'all')")
    args = parser.parse_args(argv)
    try:
        if args.command == "convert-pope":
            items = convert_pope(args.pope_file, args.image_dir, args.output, split=args.split)
            print(f"wrote {len(items)} questions to {args.output}")
        elif args.command == "build-synthetic":
            for path in write_shipped_sets(args.families):
                print(f"wrote {path}")
        else:
            path = export_synthetic(args.name, args.output, args.n)
            print(f"wrote {path} and its images")
    except (ApiPromptingError, OSError) as exc:
        print(f"agents.datasets: error: {exc}", file=sys.stderr)
        return 2
    return 0


def export_synthetic(name: str, output: str | os.PathLike[str], n: int | None = None) -> Path:
    """Write a synthetic set as a plain JSONL whose images are PNG files in ``<output stem>_images/``
    (for tools that do not know ``scene:`` references).

    Example:
        >>> export_synthetic("random", "random.jsonl", 20)  # doctest: +SKIP
    """
    target = Path(output).expanduser()
    image_dir = target.parent / f"{target.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    exported = []
    for item in synthetic_items(name, n):
        path = image_dir / f"{str(scene_reference(item.image)).replace(':', '-')}.png"
        if not path.exists():
            item_image(item).save(path)
        exported.append(
            EvalItem(item.id, str(path.resolve()), item.question, item.answer, item.type, item.split, item.extra)
        )
    return write_jsonl(exported, target)


if __name__ == "__main__":
    raise SystemExit(main())
