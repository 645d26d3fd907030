"""Standard benchmark loaders on tiny fixture files in each benchmark's published format
(``tests/fixtures/benchmarks``), their errors, the metric each benchmark defines, and one CLI run that
scores MME through a served mock target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agents.benchmarks import VSTAR_PROMPT, benchmark_summary, load_benchmark
from agents.datasets import EvalItem
from agents.eval import main
from agents.metrics import choice_of, hallusion_scores, mme_label, mme_scores, vqa_accuracy, vqa_normalize
from api_tool.errors import DatasetError
from tests.mock_openai_server import MockChatServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
MME = FIXTURES / "mme" / "MME_Benchmark_release_version"


def records_for(items: list[EvalItem], answers: list[str], mode: str = "plain") -> list[dict[str, Any]]:
    return [
        {"id": item.id, "mode": mode, "answer": answer, "reference": item.answer}
        for item, answer in zip(items, answers)
    ]


# ------------------------------------------------------------------------------------------------
# Loaders.
# ------------------------------------------------------------------------------------------------


def test_pope_reads_its_question_file_with_coco_images() -> None:
    items = load_benchmark("pope", FIXTURES / "pope" / "coco_pope_random.json", FIXTURES / "pope" / "val2014")
    assert [(i.id, i.answer, i.split, i.type) for i in items] == [
        ("random-1", "yes", "random", "existence"), ("random-2", "no", "random", "existence"),
        ("random-3", "yes", "random", "existence"), ("random-4", "no", "random", "existence"),
    ]  # fmt: skip
    assert items[0].image.endswith("val2014/COCO_val2014_000000310196.jpg") and items[0].extra == {"benchmark": "pope"}
    assert benchmark_summary(records_for(items, ["yes"] * 4), {i.id: i for i in items}, ["plain"]) is None


def test_mme_reads_both_folder_layouts(tmp_path: Path) -> None:
    items = load_benchmark("mme", MME)
    assert [(i.id, i.answer, i.type) for i in items] == [
        ("mme-existence-000000006040-1", "yes", "existence"), ("mme-existence-000000006040-2", "no", "existence"),
        ("mme-existence-000000018150-1", "yes", "existence"), ("mme-existence-000000018150-2", "no", "existence"),
        ("mme-artwork-10002-1", "yes", "artwork"), ("mme-artwork-10002-2", "no", "artwork"),
        ("mme-code_reasoning-0020-1", "yes", "code_reasoning"), ("mme-code_reasoning-0020-2", "no", "code_reasoning"),
    ]  # fmt: skip
    assert items[0].question == "Is there a train in this image? Please answer yes or no."
    assert items[4].image == str((MME / "artwork" / "images" / "10002.jpg").resolve())  # the split layout
    assert items[6].image.endswith("code_reasoning/0020.png") and items[6].extra["image_key"] == "code_reasoning/0020"
    shutil.copytree(MME, tmp_path / "MME_Benchmark_release_version" / "MME_Benchmark")  # how some mirrors ship it
    nested = load_benchmark("mme", tmp_path / "MME_Benchmark_release_version")
    assert [(i.id, i.question, i.answer) for i in nested] == [(i.id, i.question, i.answer) for i in items]
    assert len(load_benchmark("mme", MME, limit=3)) == 3


def test_hallusionbench_reads_its_json_and_leaves_out_questions_without_images() -> None:
    data = FIXTURES / "hallusionbench" / "HallusionBench.json"
    items = load_benchmark("hallusionbench", data)
    assert [(i.id, i.answer, i.type) for i in items] == [
        ("hb-VD-illusion-0-0-0", "yes", "VD/illusion"), ("hb-VD-illusion-0-0-1", "no", "VD/illusion"),
        ("hb-VD-illusion-0-1-0", "no", "VD/illusion"), ("hb-VD-illusion-0-1-1", "yes", "VD/illusion"),
        ("hb-VS-chart-0-1-0", "no", "VS/chart"),
    ]  # fmt: skip
    assert items[2].image == str((data.parent / "hallusion_bench" / "VD" / "illusion" / "0_1.png").resolve())
    assert items[4].extra == {
        "benchmark": "hallusionbench", "category": "VS", "subcategory": "chart", "visual_input": "2",
        "set_id": "0", "figure_id": "1", "question_id": "0",
    }  # fmt: skip


def test_vstar_reads_its_folder_as_lettered_questions_with_shuffled_options() -> None:
    items = load_benchmark("vstar", FIXTURES / "vstar" / "vstar_bench")
    assert [(i.id, i.type) for i in items] == [
        ("vstar-direct_attributes-sa_4690", "direct_attributes"),
        ("vstar-direct_attributes-sa_6183", "direct_attributes"),
        ("vstar-relative_position-sa_12345", "relative_position"),
    ]
    glove = items[0]
    options = glove.extra["options"]
    assert sorted(options) == ["cotton", "leather", "plastic", "rubber"]
    assert options[ord(glove.answer) - ord("A")] == "rubber"  # the published first option is the right one
    assert glove.question.splitlines() == [
        "What is the material of the glove?",
        *(f"({chr(ord('A') + k)}) {option}" for k, option in enumerate(options)),
        VSTAR_PROMPT,
    ]
    assert load_benchmark("vstar", FIXTURES / "vstar" / "vstar_bench") == items  # the order is fixed by the id
    assert len({item.answer for item in load_benchmark("vstar", FIXTURES / "vstar" / "vstar_bench")}) > 1


def test_textvqa_reads_its_annotation_file_with_train_images() -> None:
    data = FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json"
    items = load_benchmark("textvqa", data, FIXTURES / "textvqa" / "train_images")
    assert [(i.id, i.question, i.answer) for i in items] == [
        ("textvqa-34602", "what is the brand of this camera?", "dakota"),
        ("textvqa-34603", "what does the small white text spell?", "copenhagen"),
    ]
    assert len(items[0].extra["answers"]) == 10 and items[1].image.endswith("train_images/0054c91397f2fe05.jpg")


def test_loaders_name_the_file_and_entry_of_what_is_wrong(tmp_path: Path) -> None:
    mme = tmp_path / "mme"
    shutil.copytree(MME, mme)
    (mme / "existence" / "000000018150.txt").write_text("Is there a bed?\tMaybe\n")
    with pytest.raises(DatasetError, match=r"000000018150.txt:1: expected 'question<TAB>Yes\|No'"):
        load_benchmark("mme", mme)
    (mme / "existence" / "000000018150.jpg").unlink()
    with pytest.raises(DatasetError, match=r"000000018150.txt: no image 000000018150.jpg/.png"):
        load_benchmark("mme", mme)
    hallusion = tmp_path / "HallusionBench.json"
    hallusion.write_text(json.dumps([{"category": "VD", "question": "q"}]))
    with pytest.raises(DatasetError, match=r"HallusionBench.json\[0\]: not a HallusionBench question, missing"):
        load_benchmark("hallusionbench", hallusion)
    rows = json.loads((FIXTURES / "hallusionbench" / "HallusionBench.json").read_text())
    hallusion.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match=r"image not found: .*0_0.png \(set --images"):
        load_benchmark("hallusionbench", hallusion)
    textvqa = tmp_path / "TextVQA_0.5.1_test.json"
    textvqa.write_text(json.dumps({"data": [{"question": "q", "image_id": "x", "question_id": 1}]}))
    with pytest.raises(DatasetError, match=r"data\[0\]: no 'answers' \(the test split has none"):
        load_benchmark("textvqa", textvqa)
    with pytest.raises(DatasetError, match="unknown benchmark 'mmbench'"):
        load_benchmark("mmbench", tmp_path)
    with pytest.raises(DatasetError, match="no V\\*Bench annotations"):
        load_benchmark("vstar", tmp_path)


# ------------------------------------------------------------------------------------------------
# Metrics.
# ------------------------------------------------------------------------------------------------


def test_vqa_accuracy_is_the_standard_one() -> None:
    humans = ["dakota"] * 5 + ["dakota digital"] * 3 + ["nous les gosses", "clos culombu"]
    assert vqa_accuracy("Dakota.", humans) == 1.0
    assert vqa_accuracy("dakota digital", humans) == pytest.approx((7 * 1.0 + 3 * (2 / 3)) / 10)  # 3 matches
    assert vqa_accuracy("clos culombu", humans) == pytest.approx(9 / 10 / 3)  # 1 match: 9 of 10 subsets see it
    assert vqa_accuracy("leica", humans) == 0.0
    assert [vqa_normalize(a) for a in ("The Two Cats!", "coca-cola", "dont", "1,000", "hes here", "U.S.A")] == [
        "2 cats", "coca cola", "don't", "1000", "he's here", "usa",
    ]  # fmt: skip


def test_mme_hallusion_and_choice_metrics() -> None:
    assert [mme_label(a) for a in ("yes", "No.", "Yes, it is", "not sure", "The answer is yes")] == [
        "yes", "no", "yes", "no", "other",
    ]  # fmt: skip
    scores = mme_scores([
        ("existence", "a", "Yes", "yes"), ("existence", "a", "No", "no"),
        ("existence", "b", "Yes", "yes"), ("existence", "b", "Yes", "no"),
        ("code_reasoning", "c", "Maybe", "yes"), ("code_reasoning", "c", "No", "no"),
    ])  # fmt: skip
    assert scores["subtasks"]["existence"] == {
        "questions": 4, "images": 2, "accuracy": 0.75, "accuracy_plus": 0.5, "score": 125.0,
    }  # fmt: skip
    assert (scores["perception"], scores["cognition"]) == (125.0, 50.0)  # "Maybe" is neither: wrong
    rows = [("VD", "illusion", "0", "0", "0", True), ("VD", "illusion", "0", "0", "1", True),
            ("VD", "illusion", "0", "1", "0", False), ("VD", "illusion", "0", "1", "1", True),
            ("VS", "chart", "0", "1", "0", True)]  # fmt: skip
    assert hallusion_scores(rows) == {"questions": 5, "aAcc": 0.8, "fAcc": 2 / 3, "qAcc": 2 / 3}
    options = ["The cup is on the left side.", "The cup is on the right side."]
    assert [choice_of(a, options) for a in ("B", "(A)", "b. right", "The cup is on the right side.", "C", "")] == [
        "B", "A", None, "B", None, None,
    ]  # fmt: skip


def test_benchmark_summary_per_mode() -> None:
    vstar = load_benchmark("vstar", FIXTURES / "vstar" / "vstar_bench")
    right = [item.answer for item in vstar]
    wrong = ["A" if letter != "A" else "B" for letter in right]
    records = records_for(vstar, right, "plain") + records_for(vstar, [right[0], *wrong[1:]], "api")
    summary = benchmark_summary(records, {i.id: i for i in vstar}, ["plain", "api"])
    assert summary is not None and summary["name"] == "vstar"
    assert summary["modes"]["plain"] == {
        "questions": 3, "accuracy": 1.0, "by_category": {"direct_attributes": 1.0, "relative_position": 1.0},
    }  # fmt: skip
    assert summary["modes"]["api"]["accuracy"] == 1 / 3
    textvqa = load_benchmark("textvqa", FIXTURES / "textvqa" / "TextVQA_0.5.1_val.json")
    summary = benchmark_summary(records_for(textvqa, ["Dakota", "Thursday"]), {i.id: i for i in textvqa}, ["plain"])
    assert summary == {"name": "textvqa", "modes": {"plain": {"questions": 2, "vqa_accuracy": (1.0 + 0.3) / 2}}}
    hallusion = load_benchmark("hallusionbench", FIXTURES / "hallusionbench" / "HallusionBench.json")
    answers = ["Yes, it is.", "No.", "No.", "No, it is not.", "No."]
    summary = benchmark_summary(records_for(hallusion, answers), {i.id: i for i in hallusion}, ["plain"])
    assert summary is not None and summary["modes"]["plain"] == {
        "questions": 5,
        "aAcc": 0.8,
        "fAcc": 2 / 3,
        "qAcc": 2 / 3,
    }


# ------------------------------------------------------------------------------------------------
# End to end.
# ------------------------------------------------------------------------------------------------


def test_the_cli_scores_mme_with_its_own_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out"
    with MockChatServer(lifetime=60) as server:  # bright images get "Yes, there is.", dark ones "No, there is not."
        argv = ["--benchmark", "mme", "--data", str(MME), "--target", f"openai:mock@{server.openai_url}",
                "--modes", "plain", "--out", str(out), "--no-progress"]  # fmt: skip
        assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    mme = report["benchmark"]["modes"]["plain"]
    assert {task: s["score"] for task, s in mme["subtasks"].items()} == {
        "existence": 50.0, "artwork": 50.0, "code_reasoning": 50.0,
    }  # fmt: skip
    assert (mme["perception"], mme["cognition"]) == (100.0, 50.0)
    assert report["run"]["data"] == f"mme:{MME.resolve()}"
    printed = capsys.readouterr().out
    assert "## MME (its own metric" in printed and "| plain | 8 | 100.0 | 50.0 |" in printed
    assert main(["--synthetic", "random", "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--benchmark NAME --data PATH [--images DIR] go together" in capsys.readouterr().err
