"""The loop study of issue 14 in one command: does attention prompting's loop help, measured honestly.

Four parts, each writing JSON to ``--out`` and printing Markdown tables:

* ``eval``: ``api-prompt eval`` over the chosen sets (``--stage dev|test``) in the modes ``plain``,
  ``iterative`` (the control: a second look without annotation), ``masked`` (the paper), ``verify``,
  ``zoom`` and ``self`` (the ``--self-strategy`` loop with the target's own attention as the map): accuracy
  per split with 95 % bootstrap intervals, every mode against plain and against iterative (paired interval,
  McNemar's exact test), the share of ``verify`` replies with a parsable ``FINAL:`` line, seconds per answer,
  and ``changes.html`` (answers changed against plain, with the images each mode sent). The run folder is
  an ordinary eval folder, resumed when run again.
* ``agent``: ``create_api_agent(target)`` (the real agent graph, with the default attention tool) on
  detail vs whole-scene questions: the tool-call rate per group and the answers' accuracy.
* ``two_region``: questions that need two disjoint regions ("is the red circle left of the blue square?"):
  does the map keep both objects (each object's peak >= half the map's maximum; each object's share of
  the map's mass above its share of the pixels), and does the loop help or hurt there, on the items whose
  map keeps both and on those where it loses one.
* ``sweep``: the prompt's strength in the ``api`` mode (the prompted image alone): ``gray_level`` x
  ``enhance_coe`` (gray style) and heatmap opacity x ``enhance_coe``, on the development sets only; the
  best setting (pooled dev accuracy; ties keep the earlier grid point) is then measured once on the test
  sets against plain and the default setting.

Sets are names of ``agents.datasets.SYNTHETIC_SETS`` looked up per stage (``NAME-dev`` for the
development stage, ``NAME`` for the test stage), or JSONL files (``path/to/set.jsonl``, the same items at
every stage). Whatever is missing (a mode the eval does not know yet, a set that does not exist or cannot be
loaded, a target that cannot map itself or call a tool) is skipped or reported with a message in the
output, never filled in.

Run::

    python benchmarks/loop_study.py --stage test --limit 60 --out study-out      # CPU: demo models
    python benchmarks/loop_study.py --quick --out /tmp/study-quick                # a few items, seconds
    python benchmarks/loop_study.py --parts eval --sets small --modes plain,zoom,verify --limit 300 \\
        --target llava-hf/llava-1.5-7b-hf --attributor clip:ViT-L-14-336@openai --device cuda --out study-7b
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage

from agents import datasets
from agents.agent import create_api_agent
from agents.datasets import EvalItem, item_image, scene_seed
from agents.eval_factories import build_attributor, build_target
from agents.eval_options import MODES, EvalOptions
from agents.eval_reports import interval_report_lines, paired_comparisons, split_accuracy, write_reports
from agents.eval_runner import evaluate, question_messages
from agents.metrics import (
    bootstrap_interval,
    final_line_share,
    is_correct,
    region_enrichment,
    region_peaks,
    tool_call_rates,
)
from agents.results_log import RESULTS_FILE, ResultsLog
from api_tool.backends.base import Attributor
from api_tool.demo.scenes import (
    QUESTION_TYPES,
    WHOLE_SCENE_TYPES,
    generate_scene,
    name_of,
    scene_questions,
    whole_scene_question,
)
from api_tool.errors import ApiPromptingError, DatasetError
from api_tool.render import render
from api_tool.tool import AttentionPromptTool

STUDY_MODES: tuple[str, ...] = ("plain", "iterative", "masked", "verify", "zoom", "self")
DEFAULT_SETS: tuple[str, ...] = ("random", "popular", "adversarial", "qa", "small")
PARTS: tuple[str, ...] = ("eval", "agent", "two_region", "sweep")
STAGES: tuple[str, ...] = ("dev", "test")
SELF_MODE = "self"
"""A study mode, not an eval mode: the ``--self-strategy`` loop with the target's own attention as the map."""
TWO_REGION_SETS: tuple[str, ...] = ("two-region",)
"""Names a dedicated two-region set may have in ``SYNTHETIC_SETS``; without one, the ``position`` questions
of ``qa`` whose two objects' boxes do not touch are used."""
PEAK_SHARE = 0.5
"""An object "keeps" the map when the map's largest value inside it is at least this share of the maximum."""
LOOP_MODES: tuple[str, ...] = ("iterative", "masked", "verify", "zoom")
"""The loop modes asked on the two-region questions (those the eval knows)."""
QUICK_LIMIT = 2
GRAY_LEVELS: tuple[int, ...] = (0, 100, 200)
ENHANCE_COES: tuple[float, ...] = (1.0, 3.0, 10.0)
OPACITIES: tuple[float, ...] = (0.3, 0.5, 0.7)


@dataclass(frozen=True)
class StudySet:
    """The items of one set at one stage, or why there are none.

    Attributes:
        name: the set as asked for; stage: ``dev`` or ``test``.
        items: the questions (ids prefixed with the set's name when two sets share an id), split labelled
            with the set's name where the set gives none.
        source: where they came from (``synthetic:NAME`` or a file).
        note: why the set is missing, or a caveat; ``None`` when there is nothing to say.
    """

    name: str
    stage: str
    items: list[EvalItem]
    source: str
    note: str | None = None


def resolve_set(name: str, stage: str, limit: int | None) -> StudySet:
    """The items of set ``name`` at ``stage`` (see the module docstring for the lookup), or an empty
    :class:`StudySet` whose ``note`` says why there are none.

    Example:
        >>> resolve_set("random", "test", 4).source
        'synthetic:random'
    """
    path = Path(name)
    if path.suffix == ".jsonl":
        if not path.is_file():
            return StudySet(name, stage, [], str(path), f"file not found: {path}")
        items = datasets.load_jsonl(path, limit=limit)
        return StudySet(name, stage, _labelled(items, path.stem), str(path), "a file: the same items at every stage")
    candidates = [f"{name}-{stage}"] + ([name] if stage == "test" else [])
    for candidate in candidates:
        if candidate in datasets.SYNTHETIC_SETS:
            try:
                items = datasets.synthetic_items(candidate, limit)
            except DatasetError as exc:
                return StudySet(name, stage, [], f"synthetic:{candidate}", f"cannot load it ({exc}); skipped")
            return StudySet(name, stage, _labelled(items, name), f"synthetic:{candidate}")
    known = ", ".join(datasets.SYNTHETIC_SETS)
    return StudySet(name, stage, [], "-", f"no set {' or '.join(map(repr, candidates))} (known: {known}); skipped")


def _labelled(items: Sequence[EvalItem], split: str) -> list[EvalItem]:
    return [item if item.split is not None else replace(item, split=split) for item in items]


def collect_sets(names: Sequence[str], stage: str, limit: int | None) -> tuple[list[EvalItem], list[StudySet]]:
    """Every set's items, ids made unique across sets by prefixing the set's name where two collide."""
    resolved = [resolve_set(name, stage, limit) for name in names]
    items: list[EvalItem] = []
    seen: set[str] = set()
    for study_set in resolved:
        for item in study_set.items:
            chosen = item if item.id not in seen else replace(item, id=f"{study_set.name}:{item.id}")
            seen.add(chosen.id)
            items.append(chosen)
    return items, resolved


def scope_of(item: EvalItem) -> str:
    """``whole`` for a question about the whole scene, else ``detail`` (the item's ``scope`` field wins).

    Example:
        >>> scope_of(EvalItem("1", "scene:1", "describe the image.", "x", type="describe"))
        'whole'
    """
    given = item.extra.get("scope")
    if given in ("detail", "whole"):
        return str(given)
    return "whole" if item.type in WHOLE_SCENE_TYPES else "detail"


def whole_scene_items(items: Sequence[EvalItem], limit: int) -> list[EvalItem]:
    """Whole-scene questions (``whole_scene_question``, every kind) on the default scenes the items show,
    at most ``limit`` (for sets that hold no whole-scene questions of their own)."""
    seeds = list(dict.fromkeys(seed for item in items if (seed := scene_seed(item.image)) is not None))
    made = []
    for seed in seeds:
        objects = generate_scene(seed).objects
        for kind in WHOLE_SCENE_TYPES:
            question = whole_scene_question(objects, kind, random.Random(seed))
            made.append(
                EvalItem(f"whole-{seed}-{kind}", f"scene:{seed}", question.question, question.answer, kind, "whole")
            )
    return made[:limit]


# ----------------------------------------------------------------------------------------------
# Part (a): the modes over the sets.
# ----------------------------------------------------------------------------------------------


def eval_modes(modes: Sequence[str]) -> tuple[list[str], list[str]]:
    """The asked modes the eval knows (``self`` included) and messages for the others."""
    known, notes = [], []
    for mode in modes:
        if mode == SELF_MODE or mode in MODES:
            known.append(mode)
        else:
            notes.append(f"mode {mode!r} is not in agents.eval_options.MODES {MODES}; skipped")
    return known, notes


def run_modes(
    items: Sequence[EvalItem],
    target: BaseChatModel,
    attributor: Attributor,
    modes: Sequence[str],
    out_dir: Path,
    args: argparse.Namespace,
    name: str,
) -> dict[str, Any]:
    """Ask every item in every mode (``self`` as its own eval run over the target's own maps, relabelled),
    write the combined reports into ``out_dir`` and return the summary, the records and the timings."""
    known, notes = eval_modes(modes)
    plain_modes = [mode for mode in known if mode != SELF_MODE]
    options = EvalOptions(progress=False, batch_size=args.batch_size, rounds=args.rounds)
    started = time.perf_counter()
    report = evaluate(
        items,
        target,
        out_dir=out_dir,
        attributor=attributor,
        modes=plain_modes,
        resume=True,
        options=options,
        target_name=args.target,
        attributor_name=args.attributor,
        data_name=name,
    )
    seconds = {"modes": time.perf_counter() - started}
    ids = {item.id for item in items}
    logged = ResultsLog(out_dir / RESULTS_FILE).load()
    records = [r for r in logged if r["mode"] in report.run["modes"] and str(r["id"]) in ids]
    chosen = list(report.run["modes"])
    if SELF_MODE in known:
        started = time.perf_counter()
        self_records, note = run_self_mode(items, target, out_dir, args, name)
        seconds[SELF_MODE] = time.perf_counter() - started
        if note is not None:
            notes.append(note)
        else:
            records += self_records
            chosen.append(SELF_MODE)
    ordered = list(dict.fromkeys(mode for mode in (*STUDY_MODES, *chosen) if mode in chosen))
    combined = write_reports(out_dir, records, items, ordered, report.run, options)
    return {"summary": combined.summary, "records": records, "modes": ordered, "notes": notes, "seconds": seconds}


def run_self_mode(
    items: Sequence[EvalItem], target: BaseChatModel, out_dir: Path, args: argparse.Namespace, name: str
) -> tuple[list[dict[str, Any]], str | None]:
    """The ``self`` mode: the ``--self-strategy`` loop with the target's own attention (an eval run in
    ``out_dir/self``, started from the plain answers logged in ``out_dir``, so plain is not asked twice);
    its records relabelled ``self`` (``strategy`` keeps the strategy), thumbnails copied into ``out_dir``.
    Returns the records, or a message when the target cannot map itself."""
    try:
        attributor = build_attributor("self", target, args.device)
    except ApiPromptingError as exc:
        return [], f"mode 'self' skipped: the target cannot give its own maps ({exc})"
    folder = out_dir / SELF_MODE
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / RESULTS_FILE).exists():  # the loop starts from the plain answers already logged
        log = ResultsLog(folder / RESULTS_FILE)
        for record in ResultsLog(out_dir / RESULTS_FILE).load():
            if record["mode"] == "plain":
                log.append(record)
    evaluate(
        items,
        target,
        out_dir=folder,
        attributor=attributor,
        modes=(args.self_strategy,),
        resume=True,
        options=EvalOptions(progress=False, batch_size=args.batch_size, rounds=args.rounds),
        target_name=args.target,
        attributor_name="self",
        data_name=name,
    )
    ids = {item.id for item in items}
    records = []
    for record in ResultsLog(folder / RESULTS_FILE).load():
        if record["mode"] != args.self_strategy or str(record["id"]) not in ids:
            continue
        thumb = record.get("annotated")
        if thumb and not (out_dir / thumb).exists():
            (out_dir / thumb).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / thumb, out_dir / thumb)
        records.append({**record, "mode": SELF_MODE, "strategy": args.self_strategy})
    return records, None


def seconds_per_answer(records: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, float | None]:
    """Mean seconds per answer of each mode, from the records (``seconds``; plus ``map_seconds`` for api)."""
    result: dict[str, float | None] = {}
    for mode in modes:
        values = [
            float(r.get("seconds") or 0.0) + float(r.get("map_seconds") or 0.0) for r in records if r["mode"] == mode
        ]
        result[mode] = sum(values) / len(values) if values else None
    return result


def eval_part(target: BaseChatModel, attributor: Attributor, args: argparse.Namespace) -> dict[str, Any]:
    """Part (a) on ``--stage``: the table with intervals and McNemar, FINAL-line share, timings."""
    items, sets = collect_sets(args.sets, args.stage, args.limit)
    result: dict[str, Any] = {"stage": args.stage, "sets": [_set_json(s) for s in sets]}
    if not items:
        return {**result, "skipped": "no items in any set"}
    run = run_modes(items, target, attributor, args.modes, args.out / f"eval-{args.stage}", args, f"study:{args.stage}")
    verify = [str(r.get("reply", "")) for r in run["records"] if r["mode"] == "verify"]
    result.update(
        modes=run["modes"],
        notes=run["notes"],
        summary=run["summary"],
        verify_final_lines=final_line_share(verify).as_dict() if verify else None,
        seconds_per_answer=seconds_per_answer(run["records"], run["modes"]),
        wall_seconds=run["seconds"],
        items=len(items),
    )
    return result


# ----------------------------------------------------------------------------------------------
# Part (b): the agent on detail vs whole-scene questions.
# ----------------------------------------------------------------------------------------------


def ask_agent(agent: Any, item: EvalItem) -> dict[str, Any]:
    """One conversation through the agent graph: the tool calls it made, its final answer, right or wrong."""
    started = time.perf_counter()
    try:
        state = agent.invoke(
            {"messages": question_messages(item_image(item), item.question)}, config={"recursion_limit": 8}
        )
    except Exception as exc:  # the agent's own failure is a measured outcome, not a crash of the study
        return {"id": item.id, "tool_calls": 0, "answer": "", "correct": False, "error": f"{type(exc).__name__}: {exc}"}
    replies = [m for m in state["messages"] if isinstance(m, AIMessage)]
    answer = replies[-1].text.strip() if replies else ""
    return {
        "id": item.id,
        "tool_calls": sum(len(m.tool_calls) for m in replies),
        "answer": answer,
        "correct": is_correct(answer, item.answer),
        "seconds": time.perf_counter() - started,
    }


def agent_part(target: BaseChatModel, args: argparse.Namespace) -> dict[str, Any]:
    """Part (b): tool-call rate and accuracy per scope (detail / whole) through ``create_api_agent``."""
    items, sets = collect_sets(args.sets, args.stage, args.limit)
    detail = [item for item in items if scope_of(item) == "detail"][: args.agent_limit]
    whole = [item for item in items if scope_of(item) == "whole"][: args.agent_limit]
    note = None
    if not whole:
        whole = whole_scene_items(items, args.agent_limit)
        note = "the sets hold no whole-scene questions; asked whole_scene_question on their default scenes"
    chosen = detail + whole
    if not chosen:
        return {"skipped": "no items", "sets": [_set_json(s) for s in sets]}
    tool = AttentionPromptTool(attributor=args.attributor, demo_notice=False)  # the sets are demo scenes
    agent = create_api_agent(target, attention_tool=tool)
    rows = []
    for item in chosen:
        rows.append({**ask_agent(agent, item), "scope": scope_of(item), "question": item.question})
    with (args.out / f"agent-{args.stage}.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    scopes = [row["scope"] for row in rows]
    rates = tool_call_rates([row["tool_calls"] for row in rows], scopes)
    groups: dict[str, Any] = {}
    for scope, rate in rates.items():
        correct = [float(row["correct"]) for row in rows if row["scope"] == scope]
        called = [float(row["tool_calls"] > 0) for row in rows if row["scope"] == scope]
        groups[str(scope)] = {
            "tool_call": rate.as_dict(),
            "tool_call_interval": bootstrap_interval(called).as_dict(),
            "accuracy": bootstrap_interval(correct).as_dict(),
            "errors": sum("error" in row for row in rows if row["scope"] == scope),
        }
    return {"stage": args.stage, "groups": groups, "note": note, "items": len(rows)}


# ----------------------------------------------------------------------------------------------
# Part (c): two disjoint regions.
# ----------------------------------------------------------------------------------------------


def question_targets(item: EvalItem) -> tuple[str, ...] | None:
    """The names of the objects a question is about: the item's ``targets`` field, else the question
    regenerated from its default scene (``scene_questions``); ``None`` when neither is known."""
    given = item.extra.get("targets")
    if isinstance(given, list) and all(isinstance(name, str) for name in given):
        return tuple(given)
    seed = scene_seed(item.image)
    if seed is None:
        return None
    objects = generate_scene(seed).objects
    for question in scene_questions(objects, seed=seed, types=QUESTION_TYPES[1:]):
        if question.question == item.question:
            return question.targets
    return None


def target_masks(item: EvalItem, names: Sequence[str]) -> np.ndarray | None:
    """``(K, H, W)`` masks of the named objects in the item's default scene, or ``None`` when an object
    is not there exactly once, or the two boxes touch (not two disjoint regions)."""
    seed = scene_seed(item.image)
    if seed is None:
        return None
    objects = generate_scene(seed).objects
    found = [[o for o in objects if name_of(o) == name] for name in names]
    if any(len(matches) != 1 for matches in found):
        return None
    boxes = [matches[0].box for matches in found]
    if len(boxes) == 2:
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
        if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
            return None
    return np.stack([matches[0].mask for matches in found])


def two_region_items(names: Sequence[str], stage: str, limit: int | None) -> tuple[list[EvalItem], str]:
    """The two-region questions at ``stage``: the first of the sets ``names`` that exists, else the
    ``position`` questions of ``qa``."""
    for name in names:
        found = resolve_set(name, stage, limit)
        if found.items:
            return found.items, found.source
    qa = resolve_set("qa", stage, None if limit is None else 8 * limit)
    position = [replace(item, split=None) for item in qa.items if item.type == "position"]
    return position[:limit] if limit else position, f"position questions of qa ({qa.source})"


def map_coverage(attributor: Attributor, item: EvalItem, masks: np.ndarray) -> dict[str, Any]:
    """How the map of ``item``'s question covers its two objects: peaks, enrichment, where its argmax is."""
    amap = attributor.attribute(item_image(item), item.question)
    pixels = amap.upsample()
    peaks = region_peaks(pixels, masks)
    enrichment = region_enrichment(pixels, masks)
    row, col = np.unravel_index(int(np.argmax(pixels)), pixels.shape)
    return {
        "peaks": peaks.tolist(),
        "enrichment": enrichment.tolist(),
        "keeps_both_peaks": bool((peaks >= PEAK_SHARE).all()),
        "keeps_both_mass": bool((enrichment > 1.0).all()),
        "argmax_in_a_target": bool(masks[:, row, col].any()),
    }


def two_region_part(
    target: BaseChatModel, attributor: Attributor, args: argparse.Namespace, modes: Sequence[str]
) -> dict[str, Any]:
    """Part (c): map coverage of both regions, then plain vs the loop on the items where it keeps both and
    where it loses one (the split of the eval run)."""
    items, source = two_region_items(args.two_region_sets, args.stage, args.limit)
    rows, kept = [], []
    for item in items:
        names = question_targets(item)
        masks = target_masks(item, names) if names is not None and len(names) == 2 else None
        if masks is None:
            continue
        coverage = map_coverage(attributor, item, masks)
        rows.append({"id": item.id, "targets": list(names or ()), **coverage})
        group = "map keeps both" if coverage["keeps_both_peaks"] else "map loses one"
        kept.append(replace(item, split=group))
    if not rows:
        return {"skipped": f"no two-region questions with ground truth ({source})"}
    shares = {
        key: float(np.mean([row[key] for row in rows]))
        for key in ("keeps_both_peaks", "keeps_both_mass", "argmax_in_a_target")
    }
    known, notes = eval_modes(["plain", *modes])
    run = run_modes(
        kept, target, attributor, known, args.out / f"two-region-{args.stage}", args, f"two-region:{args.stage}"
    )
    return {
        "stage": args.stage,
        "source": source,
        "items": len(rows),
        "coverage": shares,
        "per_item": rows,
        "summary": run["summary"],
        "notes": notes + run["notes"],
    }


# ----------------------------------------------------------------------------------------------
# Part (d): the prompt-strength sweep (dev), the chosen setting measured once (test).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSetting:
    """How strongly the prompted image marks the map: style, gray level or heatmap opacity, enhance_coe."""

    style: str
    enhance_coe: float
    gray_level: int = 0
    opacity: float = 0.5

    @property
    def label(self) -> str:
        """``gray g=100 e=10`` or ``heatmap a=0.5 e=10``."""
        strength = f"g={self.gray_level}" if self.style == "gray" else f"a={self.opacity}"
        return f"{self.style} {strength} e={self.enhance_coe:g}"


def sweep_grid(
    gray_levels: Sequence[int], enhance_coes: Sequence[float], opacities: Sequence[float]
) -> list[PromptSetting]:
    """Every gray setting, then every heatmap setting, each over every ``enhance_coe``.

    Example:
        >>> [s.label for s in sweep_grid([0], [1.0, 10.0], [0.5])]
        ['gray g=0 e=1', 'gray g=0 e=10', 'heatmap a=0.5 e=1', 'heatmap a=0.5 e=10']
    """
    gray = [PromptSetting("gray", e, gray_level=g) for g in gray_levels for e in enhance_coes]
    heat = [PromptSetting("heatmap", e, opacity=a) for a in opacities for e in enhance_coes]
    return gray + heat


def api_correctness(
    items: Sequence[EvalItem],
    target: BaseChatModel,
    attributor_for: Callable[[float], Attributor],
    settings: Sequence[PromptSetting],
    batch_size: int,
) -> dict[str, list[bool]]:
    """Per setting, whether the target answers each item right from the prompted image alone (``api``),
    plus ``plain`` (the original image). One map per item and ``enhance_coe``."""
    result: dict[str, list[bool]] = {"plain": []}
    result.update({setting.label: [] for setting in settings})
    coes = list(dict.fromkeys(setting.enhance_coe for setting in settings))
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        images = [item_image(item) for item in chunk]
        questions = [item.question for item in chunk]
        inputs = [question_messages(image, q) for image, q in zip(images, questions)]
        result["plain"] += _right(target, inputs, chunk)
        for coe in coes:
            masks = [m.upsample() for m in attributor_for(coe).attribute_batch(images, questions)]
            for setting in (s for s in settings if s.enhance_coe == coe):
                prompted = [
                    render(image, mask, setting.style, setting.gray_level, alpha=setting.opacity)  # type: ignore[arg-type]
                    for image, mask in zip(images, masks)
                ]
                asked = [question_messages(p, q) for p, q in zip(prompted, questions)]
                result[setting.label] += _right(target, asked, chunk)
    return result


def _right(target: BaseChatModel, inputs: list[Any], chunk: Sequence[EvalItem]) -> list[bool]:
    replies = target.batch(inputs, config={"max_concurrency": 1})
    return [is_correct(reply.text.strip(), item.answer) for reply, item in zip(replies, chunk)]


def outcome_records(items: Sequence[EvalItem], right: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """Result records (mode = setting label) whose answer is ``yes`` when right and ``no`` when wrong against
    the reference ``yes``, so the report functions score exactly the given outcomes.

    Example:
        >>> outcome_records([EvalItem("1", "scene:1", "q", "red", split="random")], {"plain": [True]})[0]["answer"]
        'yes'
    """
    return [
        {"id": item.id, "mode": label, "answer": "yes" if flag else "no", "reference": "yes", "split": item.split}
        for label, flags in right.items()
        for item, flag in zip(items, flags)
    ]


def best_setting(accuracy: dict[str, float], settings: Sequence[PromptSetting]) -> PromptSetting:
    """The setting with the highest accuracy; ties keep the earlier one in ``settings``.

    Example:
        >>> grid = sweep_grid([0, 100], [10.0], [])
        >>> best_setting({"gray g=0 e=10": 0.8, "gray g=100 e=10": 0.8}, grid).label
        'gray g=0 e=10'
    """
    return max(settings, key=lambda s: (accuracy[s.label], -settings.index(s)))


def sweep_part(target: BaseChatModel, attributor: Attributor, args: argparse.Namespace) -> dict[str, Any]:
    """Part (d): the grid on the development sets, the best setting and the default setting (gray level 0,
    ``attributor``'s ``enhance_coe``) once on the test sets."""
    attributors: dict[float, Attributor] = {}

    def attributor_for(coe: float) -> Attributor:
        if coe not in attributors:
            attributors[coe] = build_attributor(args.attributor, target, args.device, None, coe)
        return attributors[coe]

    dev, dev_sets = collect_sets(args.sweep_sets, "dev", args.sweep_limit)
    test, test_sets = collect_sets(args.sweep_sets, "test", args.sweep_limit)
    if not dev or not test:
        return {"skipped": "no development or no test items for the sweep", "sets": [_set_json(s) for s in dev_sets]}
    grid = sweep_grid(args.gray_levels, args.enhance_coes, args.opacities)
    started = time.perf_counter()
    dev_right = api_correctness(dev, target, attributor_for, grid, args.batch_size)
    dev_seconds = time.perf_counter() - started
    dev_accuracy = {label: float(np.mean(flags)) for label, flags in dev_right.items()}
    chosen = best_setting(dev_accuracy, grid)
    default = PromptSetting("gray", float(getattr(attributor, "enhance_coe", 10.0)))
    measured = [chosen] if chosen == default else [chosen, default]
    test_right = api_correctness(test, target, attributor_for, measured, args.batch_size)
    records = outcome_records(test, test_right)
    return {
        "dev": {
            "items": len(dev),
            "sets": [_set_json(s) for s in dev_sets],
            "accuracy": dev_accuracy,
            "intervals": {label: bootstrap_interval([float(x) for x in f]).as_dict() for label, f in dev_right.items()},
            "seconds": dev_seconds,
        },
        "chosen": chosen.label,
        "default": default.label,
        "test": {
            "items": len(test),
            "sets": [_set_json(s) for s in test_sets],
            "accuracy": {label: split_accuracy([r for r in records if r["mode"] == label]) for label in test_right},
            "comparisons": paired_comparisons(records, list(test_right), baselines=("plain",)),
        },
    }


# ----------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------


def _set_json(study_set: StudySet) -> dict[str, Any]:
    return {
        "name": study_set.name,
        "stage": study_set.stage,
        "items": len(study_set.items),
        "source": study_set.source,
        "note": study_set.note,
    }


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _interval(interval: dict[str, Any]) -> str:
    return f"{_pct(interval['estimate'])} [{_pct(interval['low'])}, {_pct(interval['high'])}]"


def markdown(results: dict[str, Any]) -> str:
    """The study's Markdown: one section per part that ran, with its notes."""
    lines = [f"# Loop study ({results['config']['target']}, attributor {results['config']['attributor']})", ""]
    if "eval" in results:
        part = results["eval"]
        lines += [f"## (a) Modes over the sets, stage {results['config']['stage']}", ""]
        lines += [
            f"- set {s['name']}: {s['items']} items from {s['source']}" + (f" ({s['note']})" if s["note"] else "")
            for s in part.get("sets", [])
        ]
        lines += [f"- {note}" for note in part.get("notes", [])]
        if "summary" in part:
            lines += interval_report_lines(part["summary"])
            share = part["verify_final_lines"]
            if share is not None:
                lines += [
                    "",
                    f"verify replies with a parsable FINAL line: {share['count']}/{share['n']} "
                    f"({_pct(share['rate'])} %)",
                ]
            lines += ["", "| mode | s / answer |", "|---|---:|"]
            lines += [
                f"| {mode} | {'–' if s is None else f'{s:.3f}'} |" for mode, s in part["seconds_per_answer"].items()
            ]
        else:
            lines.append(f"- skipped: {part['skipped']}")
    if "agent" in results:
        part = results["agent"]
        lines += [
            "",
            f"## (b) The agent: tool calls on detail vs whole-scene questions, stage {results['config']['stage']}",
            "",
        ]
        if "groups" in part:
            if part["note"]:
                lines += [f"- {part['note']}", ""]
            lines += [
                "| scope | n | tool-call rate (%) [95 %] | accuracy (%) [95 %] | errors |",
                "|---|---:|---|---|---:|",
            ]
            for scope, group in part["groups"].items():
                lines.append(
                    f"| {scope} | {group['tool_call']['n']} | {_interval(group['tool_call_interval'])} | "
                    f"{_interval(group['accuracy'])} | {group['errors']} |"
                )
            detail = part["groups"].get("detail", {}).get("tool_call", {})
            if detail.get("count") == 0:
                lines += ["", "The target made no tool call on any detail question (it does not call tools yet)."]
            share = results.get("eval", {}).get("verify_final_lines")
            if share is not None:
                lines += ["", f"verify replies with a parsable FINAL line (part a): {_pct(share['rate'])} %"]
        else:
            lines.append(f"- skipped: {part['skipped']}")
    if "two_region" in results:
        part = results["two_region"]
        lines += ["", "## (c) Two disjoint regions", ""]
        if "coverage" in part:
            coverage = part["coverage"]
            lines += [
                f"- {part['items']} questions ({part['source']})",
                f"- the map keeps both objects (peak >= {PEAK_SHARE} of the maximum in each): "
                f"{_pct(coverage['keeps_both_peaks'])} %",
                f"- both objects hold more of the map's mass than of the pixels: {_pct(coverage['keeps_both_mass'])} %",
                f"- the map's maximum lies on one of the two objects: {_pct(coverage['argmax_in_a_target'])} %",
            ]
            lines += [f"- {note}" for note in part["notes"]]
            lines += interval_report_lines(part["summary"])
        else:
            lines.append(f"- skipped: {part['skipped']}")
    if "sweep" in results:
        part = results["sweep"]
        lines += ["", "## (d) Prompt strength (api mode: the prompted image alone)", ""]
        if "chosen" in part:
            lines += [
                f"Development: {part['dev']['items']} items.",
                "",
                "| setting | dev accuracy (%) [95 %] |",
                "|---|---|",
            ]
            lines += [f"| {label} | {_interval(interval)} |" for label, interval in part["dev"]["intervals"].items()]
            lines += [
                "",
                f"Chosen on dev: **{part['chosen']}** (default: {part['default']}); "
                f"test: {part['test']['items']} items.",
                "",
            ]
            lines += ["| setting | split | test accuracy (%) [95 %] |", "|---|---|---|"]
            for label, splits in part["test"]["accuracy"].items():
                lines += [f"| {label} | {split} | {_interval(cell['interval'])} |" for split, cell in splits.items()]
            lines += [
                "",
                "| setting | split | vs | n | difference (points) [95 %] | b | c | p |",
                "|---|---|---|---:|---|---:|---:|---:|",
            ]
            for row in part["test"]["comparisons"]:
                d, test = row["difference"], row["mcnemar"]
                lines.append(
                    f"| {row['mode']} | {row['split']} | {row['baseline']} | {row['n']} | "
                    f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | "
                    f"{test['b']} | {test['c']} | {test['p_value']:.3g} |"
                )
        else:
            lines.append(f"- skipped: {part['skipped']}")
    timings = results.get("seconds", {})
    lines += ["", "Wall time per part (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The study's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (eval folders, JSON, Markdown)")
    parser.add_argument(
        "--stage", choices=STAGES, default="test", help="dev or test sets for parts eval, agent, two_region"
    )
    parser.add_argument(
        "--sets", type=_names, default=list(DEFAULT_SETS), help=f"comma-separated (default {','.join(DEFAULT_SETS)})"
    )
    parser.add_argument(
        "--modes", type=_names, default=list(STUDY_MODES), help=f"comma-separated (default {','.join(STUDY_MODES)})"
    )
    parser.add_argument("--parts", type=_names, default=list(PARTS), help=f"comma-separated from {','.join(PARTS)}")
    parser.add_argument("--limit", type=int, default=60, help="items per set (default 60)")
    parser.add_argument(
        "--agent-limit", type=int, default=None, help="questions per scope for the agent (default --limit)"
    )
    parser.add_argument(
        "--two-region-sets",
        type=_names,
        default=list(TWO_REGION_SETS),
        help="the two-region set's possible names (first found wins; else qa's position questions)",
    )
    parser.add_argument(
        "--sweep-sets", type=_names, default=["random", "popular", "adversarial"], help="sets of the sweep"
    )
    parser.add_argument("--sweep-limit", type=int, default=None, help="items per set in the sweep (default --limit)")
    parser.add_argument("--gray-levels", type=lambda t: [int(x) for x in _floats(t)], default=list(GRAY_LEVELS))
    parser.add_argument("--enhance-coes", type=_floats, default=list(ENHANCE_COES))
    parser.add_argument("--opacities", type=_floats, default=list(OPACITIES))
    parser.add_argument("--target", default="demo", help="as api-prompt eval's --target (default demo)")
    parser.add_argument("--attributor", default="demo", help="as api-prompt eval's --attributor (default demo)")
    parser.add_argument("--self-strategy", default="masked", help="the loop of the 'self' mode (default masked)")
    parser.add_argument("--device", default=None, help="device of local models")
    parser.add_argument("--rounds", type=int, default=1, help="most reflection rounds (default 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_LIMIT} items per set, one question per scope for the agent, a 2-point sweep",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the parts asked for; print the Markdown; write ``study.json`` and ``study.md`` in ``--out``."""
    args = build_parser().parse_args(argv)
    if args.quick:
        args.limit = QUICK_LIMIT
        args.gray_levels, args.enhance_coes, args.opacities = [0], [args.enhance_coes[-1]], [0.5]
        args.agent_limit = args.agent_limit or 1
    args.agent_limit = args.agent_limit or args.limit
    args.sweep_limit = args.sweep_limit or args.limit
    unknown = [part for part in args.parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"loop_study: unknown parts {unknown}; choose from {PARTS}")
    args.out.mkdir(parents=True, exist_ok=True)
    target = build_target(args.target, device=args.device)
    attributor = build_attributor(args.attributor, target, args.device)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    results: dict[str, Any] = {"config": config, "seconds": {}}
    loop = [mode for mode in args.modes if mode in LOOP_MODES]
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "eval": lambda: eval_part(target, attributor, args),
        "agent": lambda: agent_part(target, args),
        "two_region": lambda: two_region_part(target, attributor, args, loop),
        "sweep": lambda: sweep_part(target, attributor, args),
    }
    for part in args.parts:
        started = time.perf_counter()
        try:
            results[part] = runners[part]()
        except Exception as exc:  # one part's failure (e.g. a piece still in progress) must not lose the others
            traceback.print_exc()
            results[part] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
        results["seconds"][part] = time.perf_counter() - started
    (args.out / "study.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    text = markdown(results)
    (args.out / "study.md").write_text(text, encoding="utf-8")
    print(text)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
