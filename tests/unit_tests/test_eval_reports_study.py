"""The study parts of the evaluation reports, from hand-made result records (no model): accuracy per split
with its bootstrap interval, every mode against plain and iterative (paired interval, McNemar's b, c and p
checked against hand counts), the Markdown tables, and changes.html with the images each mode sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from agents.datasets import EvalItem
from agents.eval_options import EvalOptions
from agents.eval_reports import (
    CHANGES_HTML,
    changed_answers,
    changes_html,
    markdown_report,
    paired_comparisons,
    save_thumbnail,
    sent_images,
    summarize,
    write_reports,
)
from agents.metrics import bootstrap_interval, mcnemar_exact_p

# Per item: (split, plain right?, verify right?, iterative right?). 12 random + 8 popular items.
OUTCOMES: list[tuple[str, bool, bool, bool]] = (
    [("random", True, True, True)] * 5
    + [("random", False, True, False)] * 4  # verify fixes 4
    + [("random", True, False, True)] * 1  # verify breaks 1
    + [("random", False, False, True)] * 2  # iterative fixes 2
    + [("popular", True, True, False)] * 6  # iterative breaks 6
    + [("popular", False, False, False)] * 2
)


def answer(reference: str, right: bool) -> str:
    return reference if right else ("no" if reference == "yes" else "yes")


def make_records(annotated: str | None = None) -> list[dict[str, Any]]:
    records = []
    for index, (split, *rights) in enumerate(OUTCOMES):
        reference = "yes" if index % 2 else "no"
        for mode, right in zip(("plain", "verify", "iterative"), rights):
            record: dict[str, Any] = {
                "id": f"q{index}",
                "mode": mode,
                "answer": answer(reference, right),
                "reference": reference,
                "split": split,
                "question": "is there a red circle in the image?",
            }
            if mode == "verify":
                record.update(reply=f"Looked again.\nFINAL: {record['answer']}", annotated=annotated)
            records.append(record)
    return records


def test_accuracy_per_split_carries_its_interval() -> None:
    summary = summarize(make_records(), ["plain", "verify", "iterative"])
    by_split = summary["modes"]["verify"]["by_split"]
    assert list(by_split) == ["random", "popular", "all"]
    assert (by_split["random"]["n"], by_split["popular"]["n"], by_split["all"]["n"]) == (12, 8, 20)
    assert by_split["random"]["accuracy"] == 9 / 12 and by_split["all"]["accuracy"] == 15 / 20
    expected = bootstrap_interval([float(o[2]) for o in OUTCOMES if o[0] == "random"]).as_dict()
    assert by_split["random"]["interval"] == expected
    assert by_split["random"]["interval"]["low"] <= 9 / 12 <= by_split["random"]["interval"]["high"]
    assert by_split["popular"]["interval"]["estimate"] == 6 / 8


def test_paired_comparisons_count_the_discordant_pairs_by_hand() -> None:
    rows = paired_comparisons(make_records(), ["plain", "verify", "iterative"])
    keyed = {(r["mode"], r["baseline"], r["split"]): r for r in rows}
    assert set(keyed) == {
        (mode, baseline, split)
        for mode, baseline in (("verify", "plain"), ("iterative", "plain"), ("verify", "iterative"))
        for split in ("random", "popular", "all")
    }  # plain is not compared with iterative twice
    verify_random = keyed[("verify", "plain", "random")]
    assert (verify_random["n"], verify_random["mcnemar"]["b"], verify_random["mcnemar"]["c"]) == (12, 1, 4)
    assert verify_random["mcnemar"]["p_value"] == mcnemar_exact_p(1, 4)
    assert verify_random["difference"]["estimate"] == (4 - 1) / 12
    iterative_all = keyed[("iterative", "plain", "all")]
    assert (iterative_all["mcnemar"]["b"], iterative_all["mcnemar"]["c"]) == (6, 2)
    assert iterative_all["difference"]["estimate"] == (2 - 6) / 20
    same = keyed[("verify", "plain", "popular")]  # verify equals plain on popular
    assert (same["difference"]["low"], same["difference"]["high"], same["mcnemar"]["p_value"]) == (0.0, 0.0, 1.0)


def test_comparisons_pair_only_items_both_modes_answered() -> None:
    records = [r for r in make_records() if not (r["mode"] == "verify" and r["id"] == "q0")]
    row = next(r for r in paired_comparisons(records, ["plain", "verify"]) if r["split"] == "random")
    assert row["n"] == 11


def test_markdown_shows_intervals_and_comparisons() -> None:
    summary = summarize(make_records(), ["plain", "verify", "iterative"])
    run = {"target": "t", "attributor": "a", "data": "d", "items": 20, "wall_seconds": 1.0, "answered": 60}
    markdown = markdown_report(summary, {**run, "finished": "now"})
    interval = summary["modes"]["verify"]["by_split"]["random"]["interval"]
    low, high = 100 * interval["low"], 100 * interval["high"]
    assert f"| random | verify | 12 | 75.0 | [{low:.1f}, {high:.1f}] |" in markdown
    difference = summary["comparisons"][0]["difference"]
    assert summary["comparisons"][0]["split"] == "random" and summary["comparisons"][0]["mode"] == "verify"
    star = " *" if difference["excludes_zero"] else ""
    bounds = f"[{100 * difference['low']:+.1f}, {100 * difference['high']:+.1f}]"
    assert f"| random | verify | plain | 12 | +25.0{star} | {bounds} | 1 | 4 | 0.375 |" in markdown


def test_changes_page_lists_exactly_the_changed_answers_with_the_images_sent(tmp_path: Path) -> None:
    thumb = save_thumbnail(Image.new("RGB", (40, 30), (200, 10, 10)), tmp_path, side=32)
    records = make_records(annotated=thumb)
    changes = changed_answers(records, ["plain", "verify", "iterative"])
    assert changes["verify"] == {"wrong_to_right": ["q5", "q6", "q7", "q8"], "right_to_wrong": ["q9"]}
    assert changes["iterative"]["wrong_to_right"] == ["q10", "q11"]
    assert len(changes["iterative"]["right_to_wrong"]) == 6
    items = {
        f"q{i}": EvalItem(f"q{i}", "scene:3", "is there a red circle in the image?", r["reference"], split=o[0])
        for i, (o, r) in enumerate(zip(OUTCOMES, make_records()[::3]))
    }
    page = changes_html(records, items, ["plain", "verify", "iterative"], tmp_path, limit=3)
    assert "verify against plain: 4 wrong→right, 1 right→wrong" in page
    assert page.count('<section class="wrong_to_right">') == 3 + 2  # verify limited to 3, iterative 2
    assert page.count('<section class="right_to_wrong">') == 1 + 3
    # verify sent the original and the annotated image; iterative the original alone
    assert page.count("<figcaption>annotated</figcaption>") == 3 + 1
    assert page.count("<figcaption>original</figcaption>") == 4 + 5
    assert "FINAL: yes" in page


def test_sent_images_follow_the_strategy(tmp_path: Path) -> None:
    thumb = save_thumbnail(Image.fromarray(np.full((8, 8, 3), 90, np.uint8)), tmp_path, side=8)
    original = "data:image/jpeg;base64,AAAA"
    assert [label for label, _ in sent_images("verify", {"annotated": thumb}, original, tmp_path)] == [
        "original",
        "annotated",
    ]
    assert [label for label, _ in sent_images("masked", {"annotated": thumb}, original, tmp_path)] == ["annotated"]
    assert [label for label, _ in sent_images("api", {"annotated": thumb}, original, tmp_path)] == ["annotated"]
    assert [label for label, _ in sent_images("zoom", {"annotated": thumb}, original, tmp_path)] == [
        "original",
        "crop",
    ]
    assert sent_images("iterative", {}, original, tmp_path) == [("original", original)]
    assert [label for label, _ in sent_images("self", {"annotated": thumb}, original, tmp_path)] == [
        "original",
        "annotated",
    ]


def test_write_reports_writes_the_changes_page(tmp_path: Path) -> None:
    records = make_records()
    items = [EvalItem(r["id"], "scene:3", r["question"], r["reference"], split=r["split"]) for r in records[::3]]
    run = {"target": "t", "attributor": None, "data": "d", "items": 20, "wall_seconds": 1.0, "answered": 60}
    report = write_reports(
        tmp_path, records, items, ("plain", "verify", "iterative"), {**run, "finished": "now"}, EvalOptions()
    )
    assert report.files["changes"] == tmp_path / CHANGES_HTML and report.files["changes"].is_file()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["comparisons"] == report.summary["comparisons"] and len(saved["comparisons"]) == 9


def test_changes_page_shows_the_zoom_crop_and_its_box(tmp_path: Path) -> None:
    thumb = save_thumbnail(Image.new("RGB", (30, 30), (10, 200, 10)), tmp_path, side=16)
    question = "what colour is the star?"
    records = [
        {"id": "z", "mode": "plain", "answer": "red", "reference": "blue", "question": question},
        {
            "id": "z",
            "mode": "zoom",
            "answer": "blue",
            "reference": "blue",
            "annotated": thumb,
            "crop_box": [1, 2, 3, 4],
        },
    ]
    items = {"z": EvalItem("z", "scene:3", question, "blue")}
    page = changes_html(records, items, ["plain", "zoom"], tmp_path)
    assert "zoom against plain: 1 wrong→right, 0 right→wrong" in page
    assert "<figcaption>original</figcaption>" in page and "<figcaption>crop</figcaption>" in page
    assert "<th>crop box</th><td>[1, 2, 3, 4]</td>" in page
