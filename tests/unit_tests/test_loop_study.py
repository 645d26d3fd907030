"""benchmarks/loop_study.py: its pure helpers, and one ``--quick`` run on the demo models whose outputs are
checked for structure and for consistency with the per-item files it wrote (accuracy == mean of the items'
correctness, McNemar's b and c == the discordant items, rates == means of the per-item flags), with a
missing set and an unknown mode reported as skipped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agents.datasets import EvalItem, synthetic_items, write_jsonl
from agents.metrics import is_correct

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "loop_study.py"


@pytest.fixture(scope="module")
def study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("loop_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["loop_study"] = module
    spec.loader.exec_module(module)
    return module


def test_sweep_grid_and_best_setting(study: ModuleType) -> None:
    grid = study.sweep_grid([0, 200], [1.0, 10.0], [0.5])
    assert [s.label for s in grid] == [
        "gray g=0 e=1",
        "gray g=0 e=10",
        "gray g=200 e=1",
        "gray g=200 e=10",
        "heatmap a=0.5 e=1",
        "heatmap a=0.5 e=10",
    ]
    accuracy = {s.label: 0.5 for s in grid} | {"gray g=200 e=1": 0.7, "heatmap a=0.5 e=10": 0.7}
    assert study.best_setting(accuracy, grid).label == "gray g=200 e=1"  # a tie keeps the earlier point


def test_scope_and_set_lookup(study: ModuleType) -> None:
    assert study.scope_of(EvalItem("1", "scene:1", "how many objects are there in all?", "3", "total_count")) == "whole"
    assert study.scope_of(EvalItem("2", "scene:1", "what colour is the star?", "red", "colour")) == "detail"
    assert study.scope_of(EvalItem("3", "scene:1", "q", "a", "colour", extra={"scope": "whole"})) == "whole"
    missing = study.resolve_set("no_such_set", "test", 3)
    assert missing.items == [] and "skipped" in missing.note
    test = study.resolve_set("random", "test", 2)
    assert test.source == "synthetic:random" and len(test.items) == 2
    dev = study.resolve_set("random", "dev", 2)
    assert dev.items or "skipped" in dev.note  # a development set the datasets do not (yet) ship is said
    assert not {i.image for i in dev.items} & {i.image for i in test.items}  # other scenes


def test_a_jsonl_set_is_read_at_every_stage(study: ModuleType, tmp_path: Path) -> None:
    path = write_jsonl(synthetic_items("popular", 2), tmp_path / "mine.jsonl")
    for stage in ("dev", "test"):
        found = study.resolve_set(str(path), stage, None)
        assert [item.split for item in found.items] == ["popular", "popular"] and found.source == str(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_quick_run_writes_consistent_numbers(study: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "study"
    data = str(write_jsonl(synthetic_items("random", 2), tmp_path / "random.jsonl"))  # the same at both stages
    argv = ["--quick", "--out", str(out), "--sets", f"{data},no_such_set", "--sweep-sets", data]
    results = study.main([*argv, "--modes", "plain,iterative,verify,self,bogus"])
    saved = json.loads((out / "study.json").read_text())
    assert set(saved) == {"config", "seconds", "eval", "agent", "two_region", "sweep"}
    assert not [part for part in study.PARTS if "failed" in str(saved[part].get("skipped"))]
    assert saved["eval"]["summary"] == json.loads(json.dumps(results["eval"]["summary"]))
    markdown = (out / "study.md").read_text()
    assert "## (a)" in markdown and "## (d)" in markdown and "no_such_set" in markdown

    # (a): the skipped set and mode are said; accuracy and McNemar agree with the logged answers.
    part = saved["eval"]
    assert [s["items"] for s in part["sets"]] == [2, 0]
    assert any("bogus" in note for note in part["notes"])
    assert part["modes"] == ["plain", "iterative", "verify", "self"]
    records = read_jsonl(out / "eval-test" / "results.jsonl")
    self_records = read_jsonl(out / "eval-test" / "self" / "results.jsonl")
    right: dict[str, dict[str, bool]] = {}
    for record in records + [{**r, "mode": "self"} for r in self_records if r["mode"] == "masked"]:
        right.setdefault(record["mode"], {})[record["id"]] = is_correct(record["answer"], record["reference"])
    for mode, entry in part["summary"]["modes"].items():
        assert entry["by_split"]["random"]["n"] == 2
        assert entry["by_split"]["random"]["accuracy"] == sum(right[mode].values()) / 2
        assert entry["by_split"]["random"]["interval"]["low"] <= entry["by_split"]["random"]["accuracy"]
    for row in part["summary"]["comparisons"]:
        base, other = right[row["baseline"]], right[row["mode"]]
        assert row["mcnemar"]["b"] == sum(base[i] and not other[i] for i in base)
        assert row["mcnemar"]["c"] == sum(other[i] and not base[i] for i in base)
        assert row["difference"]["estimate"] == (row["mcnemar"]["c"] - row["mcnemar"]["b"]) / 2
    verify_share = part["verify_final_lines"]
    assert verify_share["n"] == 2 and 0 <= verify_share["count"] <= 2
    assert set(part["seconds_per_answer"]) == set(part["modes"])
    assert (out / "eval-test" / "changes.html").is_file()

    # (b): rates and accuracy are the means of the per-conversation rows.
    rows = read_jsonl(out / "agent-test.jsonl")
    for scope, group in saved["agent"]["groups"].items():
        mine = [row for row in rows if row["scope"] == scope]
        assert group["tool_call"]["n"] == len(mine) > 0
        assert group["tool_call"]["count"] == sum(row["tool_calls"] > 0 for row in mine)
        assert group["accuracy"]["estimate"] == sum(row["correct"] for row in mine) / len(mine)
    assert set(saved["agent"]["groups"]) == {"detail", "whole"}

    # (c): coverage shares are the means of the per-item flags; the eval split by them holds every item.
    two = saved["two_region"]
    if "skipped" not in two:
        per_item = two["per_item"]
        for key, value in two["coverage"].items():
            assert value == sum(row[key] for row in per_item) / len(per_item)
        splits = two["summary"]["modes"]["plain"]["by_split"]
        assert sum(cell["n"] for name, cell in splits.items() if name != "all") == two["items"] == len(per_item)

    # (d): the chosen setting is the dev argmax; the test compares it (and the default) with plain.
    sweep = saved["sweep"]
    grid = [label for label in sweep["dev"]["accuracy"] if label != "plain"]
    assert sweep["dev"]["accuracy"][sweep["chosen"]] == max(sweep["dev"]["accuracy"][label] for label in grid)
    for label, accuracy in sweep["dev"]["accuracy"].items():
        assert sweep["dev"]["intervals"][label]["estimate"] == accuracy
    assert {row["baseline"] for row in sweep["test"]["comparisons"]} == {"plain"}
    assert {row["mode"] for row in sweep["test"]["comparisons"]} == {sweep["chosen"], sweep["default"]}
