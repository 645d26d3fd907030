"""Scores and reports of an evaluation: ``report.json``, ``report.md`` (accuracy with 95 % bootstrap
intervals per split, every mode against ``plain`` and ``iterative`` with a paired interval and McNemar's
exact test), the HTML gallery of the questions where modes disagree and ``changes.html``, the answers each
mode changed against ``plain`` with the images it sent (thumbnails), built from the result records alone.

Example:
    >>> records = [{"id": "1", "mode": "plain", "answer": "Yes.", "reference": "yes", "split": "random"}]
    >>> summarize(records, ["plain"])["modes"]["plain"]["accuracy"]
    1.0
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from agents.benchmarks import BENCHMARK_TITLES, benchmark_summary
from agents.datasets import EvalItem, item_image
from agents.eval_options import REFLECTION_MODES, EvalOptions
from agents.metrics import (
    answer_scores,
    bootstrap_interval,
    change_counts,
    group_indices,
    is_correct,
    mcnemar_test,
    paired_difference_interval,
    pope_scores,
    scored_form,
    yes_no_reference,
)
from agents.prompts import STRATEGIES
from agents.results_log import RESULTS_FILE

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GALLERY_HTML = "gallery.html"
CHANGES_HTML = "changes.html"
THUMBS_DIR = "thumbs"
BASELINE_MODES: tuple[str, ...] = ("plain", "iterative")
"""What every other mode is compared with, item by item: the plain answer, and the second look without
annotation (the control that tells the annotation's effect from the re-ask's)."""
ALL_SPLITS = "all"
"""The name of the row over every split, when a run has several."""


def thumbnail_jpeg(image: Image.Image, side: int) -> bytes:
    """The image shrunk to ``side`` pixels on its longer side, as JPEG bytes (quality 85)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def thumbnail_file(image: Image.Image, side: int) -> tuple[str, bytes]:
    """A JPEG thumbnail (:func:`thumbnail_jpeg`) and its path in the output folder, named by its content:
    ``("thumbs/<hash>.jpg", data)``."""
    data = thumbnail_jpeg(image, side)
    return f"{THUMBS_DIR}/{hashlib.blake2b(data, digest_size=10).hexdigest()}.jpg", data


def store_thumbnail(out_dir: Path, name: str, data: bytes) -> str:
    """Write a thumbnail from :func:`thumbnail_file` under ``out_dir`` (unless it is there); returns ``name``."""
    path = out_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return name


def save_thumbnail(image: Image.Image, out_dir: Path, side: int) -> str:
    """Save a JPEG thumbnail named by its content under ``out_dir/thumbs``; returns ``"thumbs/<name>.jpg"``."""
    return store_thumbnail(out_dir, *thumbnail_file(image, side))


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
        entry["by_split"] = split_accuracy(rows)
        summary[mode] = entry
    return {
        "modes": summary,
        "comparisons": paired_comparisons(records, modes),
        "disagreements": len(disagreements(records, modes)),
    }


def correctness(records: Sequence[dict[str, Any]]) -> list[bool]:
    """Whether each record's answer is right (:func:`agents.metrics.is_correct` against its reference).

    Example:
        >>> correctness([{"answer": "No.", "reference": "no"}, {"answer": "red", "reference": "blue"}])
        [True, False]
    """
    return [is_correct(str(r["answer"]), str(r["reference"])) for r in records]


def split_accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One mode's accuracy per split (``-`` for records without one), plus ``all`` over several splits,
    each with its 95 % percentile bootstrap interval (``agents.metrics.bootstrap_interval``, seeded).

    Example:
        >>> rows = [{"answer": "yes", "reference": "yes", "split": "random"}] * 3
        >>> split_accuracy(rows)["random"]["interval"]["low"]
        1.0
    """
    correct = correctness(rows)
    groups = group_indices([_split_name(r.get("split")) for r in rows])
    if len(groups) > 1:
        groups[ALL_SPLITS] = list(range(len(rows)))
    result: dict[str, dict[str, Any]] = {}
    for split, indices in groups.items():
        chosen = [float(correct[i]) for i in indices]
        interval = bootstrap_interval(chosen)
        result[str(split)] = {"n": len(indices), "accuracy": interval.estimate, "interval": interval.as_dict()}
    return result


def paired_comparisons(
    records: Sequence[dict[str, Any]], modes: Sequence[str], baselines: Sequence[str] = BASELINE_MODES
) -> list[dict[str, Any]]:
    """Every mode against each baseline present (:data:`BASELINE_MODES`) on the items both answered, per
    split (plus ``all`` over several): the accuracy difference (mode minus baseline) with its paired 95 %
    bootstrap interval, and McNemar's exact test (``b``: baseline right, mode wrong; ``c``: the reverse).

    Example:
        >>> records = [{"id": str(i), "mode": mode, "answer": answer, "reference": "yes"} for i in range(12)
        ...            for mode, answer in (("plain", "yes" if i < 10 else "no"), ("api", "no" if i < 10 else "yes"))]
        >>> row = paired_comparisons(records, ["plain", "api"])[0]
        >>> row["mode"], row["baseline"], row["mcnemar"]["b"], row["mcnemar"]["c"], round(row["mcnemar"]["p_value"], 4)
        ('api', 'plain', 10, 2, 0.0386)
    """
    by_mode: dict[str, dict[str, dict[str, Any]]] = {mode: {} for mode in modes}
    for record in records:
        if record["mode"] in by_mode:
            by_mode[record["mode"]][str(record["id"])] = record
    rows = []
    for baseline in baselines:
        if baseline not in modes:
            continue
        for mode in modes:
            if mode == baseline or mode in baselines[: baselines.index(baseline)]:
                continue
            paired = [item_id for item_id in by_mode[mode] if item_id in by_mode[baseline]]
            if not paired:
                continue
            base = correctness([by_mode[baseline][i] for i in paired])
            other = correctness([by_mode[mode][i] for i in paired])
            groups = group_indices([_split_name(by_mode[mode][i].get("split")) for i in paired])
            if len(groups) > 1:
                groups[ALL_SPLITS] = list(range(len(paired)))
            for split, indices in groups.items():
                first = [base[i] for i in indices]
                second = [other[i] for i in indices]
                rows.append(
                    {
                        "mode": mode,
                        "baseline": baseline,
                        "split": str(split),
                        "n": len(indices),
                        "difference": paired_difference_interval(
                            [float(x) for x in first], [float(x) for x in second]
                        ).as_dict(),
                        "mcnemar": mcnemar_test(first, second).as_dict(),
                    }
                )
    return rows


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


def _engine_lines(run: dict[str, Any]) -> list[str]:
    """The report lines on how the last invocation ran: the Ray engine's actors, a served target's counts."""
    lines = []
    if run.get("engine") == "ray":
        lines.append(
            f"- engine: Ray, {run['actors']} actor(s) ({run['gpus_per_actor']} GPU, {run['cpus_per_actor']} CPU each)"
        )
    usage = run.get("target_usage")
    if usage:
        lines.append(
            f"- target requests: {usage['requests']} ({usage['retries']} retried, {usage['failed']} failed); "
            f"tokens: {usage['input_tokens']} in, {usage['output_tokens']} out"
        )
    return lines


def _benchmark_lines(scores: dict[str, Any] | None) -> list[str]:
    """The benchmark's own metric per mode (``agents.benchmarks.benchmark_summary``) as a Markdown table."""
    if not scores:
        return []
    name, modes = scores["name"], scores["modes"]
    columns = {
        "mme": [("perception", "perception (/2000)", False), ("cognition", "cognition (/800)", False)],
        "hallusionbench": [("aAcc", "aAcc", True), ("fAcc", "fAcc", True), ("qAcc", "qAcc", True)],
        "vstar": [("accuracy", "accuracy", True)],
        "textvqa": [("vqa_accuracy", "VQA accuracy", True)],
    }[name]
    lines = [
        "",
        f"## {BENCHMARK_TITLES[name]} (its own metric; see agents.benchmarks for how it is read)",
        "",
        "| mode | n | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for mode, entry in modes.items():
        n = entry.get("questions") or sum(s["questions"] for s in entry.get("subtasks", {}).values())
        cells = [f"{100 * entry[key]:.1f}" if percent else f"{entry[key]:.1f}" for key, _, percent in columns]
        lines.append(f"| {mode} | {n} | " + " | ".join(cells) + " |")
    if name == "mme":
        tasks = list(dict.fromkeys(task for entry in modes.values() for task in entry["subtasks"]))
        lines += ["", "| subtask | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
        for task in tasks:
            cells = [
                f"{entry['subtasks'][task]['score']:.1f}" if task in entry["subtasks"] else "–"
                for entry in modes.values()
            ]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines


def _percent_interval(interval: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"[{100 * interval['low']:{sign}.1f}, {100 * interval['high']:{sign}.1f}]"


def interval_report_lines(summary: dict[str, Any]) -> list[str]:
    """Accuracy per split and mode with its 95 % interval, and the paired comparisons, as Markdown lines
    (from :func:`summarize`'s ``by_split`` and ``comparisons``).

    Example:
        >>> records = [{"id": "1", "mode": "plain", "answer": "yes", "reference": "yes"}]
        >>> interval_report_lines(summarize(records, ["plain"]))[-1]
        '| - | plain | 1 | 100.0 | [100.0, 100.0] |'
    """
    modes = summary["modes"]
    splits = list(dict.fromkeys(split for entry in modes.values() for split in entry.get("by_split", {})))
    if not splits:
        return []
    lines = [
        "",
        "## Accuracy per split with 95 % bootstrap intervals (%)",
        "",
        "| split | mode | n | accuracy | 95 % interval |",
        "|---|---|---:|---:|---|",
    ]
    for split in splits:
        for mode, entry in modes.items():
            cell = entry.get("by_split", {}).get(split)
            if cell is not None:
                lines.append(
                    f"| {split} | {mode} | {cell['n']} | {_fmt(cell['accuracy'])} | "
                    f"{_percent_interval(cell['interval'])} |"
                )
    comparisons = summary.get("comparisons") or []
    if comparisons:
        lines += [
            "",
            "## Paired comparisons (accuracy difference in points, mode minus baseline; McNemar's exact test)",
            "",
            "b: the baseline right and the mode wrong; c: the reverse. The interval is a paired 95 % percentile "
            "bootstrap over items; * marks an interval that excludes 0.",
            "",
            "| split | mode | vs | n | difference | 95 % interval | b | c | p |",
            "|---|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for row in comparisons:
            difference, test = row["difference"], row["mcnemar"]
            mark = " *" if difference["excludes_zero"] else ""
            lines.append(
                f"| {row['split']} | {row['mode']} | {row['baseline']} | {row['n']} | "
                f"{100 * difference['estimate']:+.1f}{mark} | {_percent_interval(difference, signed=True)} | "
                f"{test['b']} | {test['c']} | {test['p_value']:.3g} |"
            )
    return lines


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
        *_engine_lines(run),
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
    lines += interval_report_lines(summary)
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
    lines += _benchmark_lines(summary.get("benchmark"))
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


def sent_images(mode: str, record: dict[str, Any], original: str, out_dir: Path) -> list[tuple[str, str]]:
    """``(label, data URI)`` of the images the target was sent in ``mode``: ``original`` (a data URI) and
    the annotated thumbnail the record names, labelled by their role in the strategy (the record's
    ``strategy``, else the mode; ``agents.prompts.STRATEGIES``: ``annotated`` or ``crop``); ``api`` sends
    the annotated image alone.

    Example:
        >>> sent_images("plain", {}, "data:image/jpeg;base64,...", Path("out"))
        [('original', 'data:image/jpeg;base64,...')]
    """
    strategy = STRATEGIES.get(str(record.get("strategy", mode)))
    roles = strategy.images if strategy is not None else (("annotated",) if mode == "api" else ("original",))
    thumb = record.get("annotated")
    path = out_dir / str(thumb) if thumb else None
    annotated = _jpeg_data_uri(path.read_bytes()) if path is not None and path.is_file() else None
    pictures = []
    for role in roles:
        if role == "original":
            pictures.append(("original", original))
        elif annotated is not None:
            pictures.append((role, annotated))
    if annotated is not None and not any(role != "original" for role in roles):
        pictures.append(("annotated", annotated))  # a mode outside the table that logged an annotated image
    return pictures


def changed_answers(
    records: Sequence[dict[str, Any]], modes: Sequence[str], baseline: str = "plain"
) -> dict[str, dict[str, list[str]]]:
    """Per mode, the ids whose correctness changed against ``baseline``: ``wrong_to_right`` and
    ``right_to_wrong`` (dataset order as the records come).

    Example:
        >>> records = [{"id": "1", "mode": "plain", "answer": "no", "reference": "yes"},
        ...            {"id": "1", "mode": "verify", "answer": "yes", "reference": "yes"}]
        >>> changed_answers(records, ["plain", "verify"])
        {'verify': {'wrong_to_right': ['1'], 'right_to_wrong': []}}
    """
    first = {str(r["id"]): r for r in records if r["mode"] == baseline}
    result: dict[str, dict[str, list[str]]] = {}
    for mode in modes:
        if mode == baseline:
            continue
        gained: list[str] = []
        lost: list[str] = []
        for record in records:
            item_id = str(record["id"])
            if record["mode"] != mode or item_id not in first:
                continue
            before, after = correctness([first[item_id], record])
            if after and not before:
                gained.append(item_id)
            elif before and not after:
                lost.append(item_id)
        result[mode] = {"wrong_to_right": gained, "right_to_wrong": lost}
    return result


def changes_html(
    records: Sequence[dict[str, Any]],
    items: dict[str, EvalItem],
    modes: Sequence[str],
    out_dir: Path,
    *,
    baseline: str = "plain",
    limit: int = 50,
    thumb_side: int = 160,
) -> str:
    """A self-contained HTML page of the answers each mode changed against ``baseline`` (wrong -> right,
    then right -> wrong, at most ``limit`` of each per mode): the question, the images the mode sent
    (:func:`sent_images`), the baseline's answer, the mode's answer, its raw reply and, for ``zoom``, the
    crop's box in the original image; images inline."""
    by_key = {(str(r["id"]), str(r["mode"])): r for r in records}
    changes = changed_answers(records, modes, baseline)
    originals: dict[str, str] = {}
    sections = []
    for mode, directions in changes.items():
        counts = f"{len(directions['wrong_to_right'])} wrong→right, {len(directions['right_to_wrong'])} right→wrong"
        sections.append(f"<h2>{html.escape(mode)} against {html.escape(baseline)}: {counts}</h2>")
        for direction, title in (("wrong_to_right", "wrong → right"), ("right_to_wrong", "right → wrong")):
            chosen = [item_id for item_id in directions[direction] if item_id in items][:limit]
            for item_id in chosen:
                item = items[item_id]
                if item_id not in originals:
                    originals[item_id] = _jpeg_data_uri(thumbnail_jpeg(item_image(item), thumb_side))
                record = by_key[(item_id, mode)]
                figures = "".join(
                    f'<figure><img src="{uri}" alt="{html.escape(label)}">'
                    f"<figcaption>{html.escape(label)}</figcaption></figure>"
                    for label, uri in sent_images(mode, record, originals[item_id], out_dir)
                )
                reply = str(record.get("reply", record["answer"]))
                box = record.get("crop_box")
                crop_row = f"<tr><th>crop box</th><td>{html.escape(str(box))}</td></tr>" if box else ""
                sections.append(
                    f'<section class="{direction}"><h3>{html.escape(title)} · {html.escape(item_id)}</h3>'
                    f'<p class="q">{html.escape(item.question)} <span>reference: <b>{html.escape(item.answer)}</b>'
                    f"{' · split ' + html.escape(item.split) if item.split else ''}</span></p>"
                    f'<div class="pics">{figures}</div><table>'
                    f"<tr><th>{html.escape(baseline)}</th><td>{html.escape(str(by_key[(item_id, baseline)]['answer']))}"
                    f"</td></tr><tr><th>{html.escape(mode)}</th><td>{html.escape(str(record['answer']))}</td></tr>"
                    f"<tr><th>reply</th><td><pre>{html.escape(reply)}</pre></td></tr>{crop_row}</table></section>"
                )
    style = (
        "body{font-family:sans-serif;margin:1.5em;max-width:70em}section{border-top:1px solid #ccc;padding:.5em 0}"
        "h3{font-size:1em;margin:.2em 0}.wrong_to_right h3{color:#11772d}.right_to_wrong h3{color:#b3261e}"
        ".q span{color:#555;margin-left:1em}.pics{display:flex;gap:1em}figure{margin:0}"
        "figcaption{font-size:.8em;color:#555}table{border-collapse:collapse;margin-top:.4em}"
        "th,td{padding:.15em .6em;text-align:left;border-bottom:1px solid #eee;vertical-align:top}pre{margin:0}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>Changed answers</title><style>{style}</style>'
        f"</head><body><h1>Answers changed against {html.escape(baseline)}</h1><p>Each question shows the images "
        f"the mode sent to the target (original, annotated or crop).</p>{''.join(sections)}</body></html>\n"
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
    order = {item_id: index for index, item_id in enumerate(ids)}
    chosen = sorted(  # dataset order, whatever order the answers were logged in (the Ray engine's is not fixed)
        (r for r in records if str(r["id"]) in ids and r["mode"] in modes),
        key=lambda r: (order[str(r["id"])], list(modes).index(r["mode"])),
    )
    summary = summarize(chosen, modes)
    scores = benchmark_summary(chosen, ids, modes)
    if scores is not None:
        summary["benchmark"] = scores
    files = {
        "json": out_dir / REPORT_JSON,
        "markdown": out_dir / REPORT_MD,
        "gallery": out_dir / GALLERY_HTML,
        "changes": out_dir / CHANGES_HTML,
    }
    files["json"].write_text(json.dumps({"run": run, **summary}, indent=2) + "\n", encoding="utf-8")
    files["markdown"].write_text(markdown_report(summary, run), encoding="utf-8")
    gallery = gallery_html(chosen, ids, modes, out_dir, limit=options.gallery_limit, thumb_side=options.thumb_side)
    files["gallery"].write_text(gallery, encoding="utf-8")
    changes = changes_html(chosen, ids, modes, out_dir, limit=options.gallery_limit, thumb_side=options.thumb_side)
    files["changes"].write_text(changes, encoding="utf-8")
    files["results"] = out_dir / RESULTS_FILE
    return EvalReport(summary=summary, run=run, out_dir=out_dir, files=files)
