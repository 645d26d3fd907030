"""The evaluation harness: JSONL loading and its errors, the POPE converter, the shipped synthetic sets,
runs with deterministic fake targets (exact report numbers, resume after a failure, the gallery), and the
``api-prompt eval`` entry point on a tiny random LLaVA with self-attribution."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from PIL import Image
from pydantic import PrivateAttr

from agents.datasets import (
    SHIPPED_SCENES,
    SYNTHETIC_FIRST_SEED,
    SYNTHETIC_POPE_FILE,
    SYNTHETIC_QA_FILE,
    EvalItem,
    build_synthetic_pope,
    build_synthetic_qa,
    convert_pope,
    item_image,
    load_jsonl,
    scene_seed,
    synthetic_items,
    write_jsonl,
)
from agents.eval import main
from agents.eval_factories import build_attributor
from agents.eval_options import EvalOptions, run_modes
from agents.eval_reports import disagreements
from agents.eval_runner import MapCache, evaluate
from agents.metrics import pope_scores
from agents.results_log import ResultsLog
from api_tool.demo.scenes import generate_scene
from api_tool.errors import (
    DatasetError,
    EvalOutputError,
    EvalRunError,
    InvalidParameterError,
    UnsupportedModelError,
)
from api_tool.prompt import attention_prompt
from tests.conftest import TINY_CLIP_MAP_TERMS as MAP_TERMS
from tests.conftest import shared_tiny_attributor
from tests.tiny_models import tiny_llava
from tests.tolerances import assert_sums_close

BRIGHT_THRESHOLD = 150.0


class RuleTarget(BaseChatModel):
    """A deterministic fake target that looks at what it receives.

    It answers "Yes, there is." when the last image's mean is above ``BRIGHT_THRESHOLD`` and
    "No, there is not." otherwise; a verify re-ask (its text holds "FINAL:") gets "FINAL: yes". It counts
    calls and, with ``fail_after``, raises on every call after that many.
    """

    fail_after: int | None = None
    _calls: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "rule-target"

    @property
    def calls(self) -> int:
        return self._calls

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        with self._lock:
            self._calls += 1
            if self.fail_after is not None and self._calls > self.fail_after:
                raise RuntimeError("quota exceeded")
        content = messages[-1].content
        assert isinstance(content, list)
        images = [decode(block) for block in content if isinstance(block, dict) and block.get("type") == "image"]
        text = [block["text"] for block in content if isinstance(block, dict) and block.get("type") == "text"][-1]
        reply = "Looking again at the highlighted part.\nFINAL: yes" if "FINAL:" in text else rule_answer(images[-1])
        return ChatResult(generations=[ChatGeneration(message=AIMessage(reply))])


def decode(block: dict[str, Any]) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(block["base64"]))).convert("RGB")


def rule_answer(image: Image.Image) -> str:
    return (
        "Yes, there is."
        if float(np.asarray(image, dtype=np.float64).mean()) > BRIGHT_THRESHOLD
        else "No, there is not."
    )


# (brightness, reference, type, split): plain answers are yes for bright images, no for dark ones.
CASES: list[tuple[int, str, str, str | None]] = [
    (200, "yes", "existence", "random"),  # TP
    (200, "no", "existence", "random"),  # FP
    (50, "no", "existence", "random"),  # TN
    (50, "yes", "existence", "random"),  # FN
    (200, "yes", "existence", "popular"),  # TP
    (50, "no", "existence", "popular"),  # TN
    (200, "yes, there is", "phrase", None),  # right by normalised match, not exact
]


def make_items(directory: Path) -> list[EvalItem]:
    rng = np.random.default_rng(0)
    items = []
    for index, (level, reference, kind, split) in enumerate(CASES):
        pixels = np.clip(level + rng.normal(0.0, 25.0, size=(48, 64, 3)), 0, 255).astype(np.uint8)
        path = directory / f"image{index}.png"
        Image.fromarray(pixels).save(path)
        items.append(EvalItem(f"q{index}", str(path), "is there a cat?", reference, kind, split))
    return items


def read_results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def options(**kwargs: Any) -> EvalOptions:
    return EvalOptions(progress=False, **{"batch_size": 3, **kwargs})


# ------------------------------------------------------------------------------------------------
# The JSONL loader.
# ------------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_reads_items_and_resolves_relative_images(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    absolute = tmp_path / "b.png"
    Image.new("RGB", (8, 8)).save(absolute)
    data = write_lines(
        tmp_path / "set.jsonl",
        [
            json.dumps({"image": "imgs/a.png", "question": "q1?", "answer": "yes", "split": "random", "id": 7}),
            "",
            json.dumps({"image": str(absolute), "question": "q2?", "answer": 3, "type": "count", "source": "x"}),
            json.dumps({"image": "scene:12", "question": "q3?", "answer": "red"}),
        ],
    )
    items = load_jsonl(data)
    assert [item.id for item in items] == ["7", "set:3", "set:4"]
    assert items[0].image == str((tmp_path / "imgs" / "a.png").resolve()) and items[0].split == "random"
    assert items[1].answer == "3" and items[1].type == "count" and items[1].extra == {"source": "x"}
    assert items[2].image == "scene:12" and scene_seed(items[2].image) == 12
    assert item_image(items[2]).size == generate_scene(12).image.size
    assert len(load_jsonl(data, limit=2)) == 2


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    items = make_items(tmp_path)
    path = write_jsonl(items, tmp_path / "sub" / "set.jsonl")
    assert json.loads(path.read_text().splitlines()[0])["image"] == "../image0.png"
    assert load_jsonl(path) == items


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset file not found: .*nowhere\.jsonl"):
        load_jsonl(tmp_path / "nowhere.jsonl")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "scene:1", "question": "q?", ', r"set.jsonl:2: not valid JSON"),
        ('["scene:1", "q?", "yes"]', r"set.jsonl:2: expected a JSON object, got list"),
        ('{"image": "scene:1", "answer": "yes"}', r"set.jsonl:2: missing required field 'question'"),
        ('{"question": "q?", "answer": "yes"}', r"set.jsonl:2: missing required field 'image'"),
        ('{"image": "scene:1", "question": "q?"}', r"set.jsonl:2: missing required field 'answer'"),
        ('{"image": "scene:1", "question": 5, "answer": "yes"}', r"set.jsonl:2: field 'question' must be a string"),
        ('{"image": "scene:1", "question": "q?", "answer": true}', r"field 'answer' must be a string or number"),
        ('{"image": "scene:1", "question": " ", "answer": "yes"}', r"set.jsonl:2: field 'question' is empty"),
        ('{"image": "scene:x", "question": "q?", "answer": "yes"}', r"set.jsonl:2: 'scene:x' is not a scene"),
        ('{"image": "missing.png", "question": "q?", "answer": "yes"}', r"set.jsonl:2: image not found: .*missing"),
        (
            '{"image": "scene:2", "question": "q?", "answer": "no", "id": "a"}',
            r"set.jsonl:2: duplicate id 'a' .*line 1",
        ),
    ],
)
def test_load_jsonl_bad_line_names_its_line(tmp_path: Path, line: str, message: str) -> None:
    data = write_lines(
        tmp_path / "set.jsonl", ['{"image": "scene:1", "question": "q?", "answer": "yes", "id": "a"}', line]
    )
    with pytest.raises(DatasetError, match=message):
        load_jsonl(data)


def test_load_jsonl_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="holds no items"):
        load_jsonl(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------------------
# POPE converter.
# ------------------------------------------------------------------------------------------------


def pope_fixture(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "val2014"
    images.mkdir()
    for name in ("COCO_val2014_000000000001.jpg", "COCO_val2014_000000000002.jpg"):
        Image.new("RGB", (16, 12), (10, 20, 30)).save(images / name)
    lines = [
        {
            "question_id": 1,
            "image": "COCO_val2014_000000000001.jpg",
            "text": "Is there a dog in the image?",
            "label": "yes",
        },
        {
            "question_id": 2,
            "image": "COCO_val2014_000000000001.jpg",
            "text": "Is there a cat in the image?",
            "label": "no",
        },
        {
            "question_id": 3,
            "image": "COCO_val2014_000000000002.jpg",
            "text": "Is there a car in the image?",
            "label": "Yes",
        },
    ]
    pope = tmp_path / "coco_pope_adversarial.json"
    pope.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return pope, images


def test_convert_pope_writes_a_loadable_jsonl(tmp_path: Path) -> None:
    pope, images = pope_fixture(tmp_path)
    output = tmp_path / "out" / "pope_adversarial.jsonl"
    items = convert_pope(pope, images, output)
    assert [(i.id, i.question, i.answer, i.type, i.split) for i in items] == [
        ("adversarial-1", "Is there a dog in the image?", "yes", "existence", "adversarial"),
        ("adversarial-2", "Is there a cat in the image?", "no", "existence", "adversarial"),
        ("adversarial-3", "Is there a car in the image?", "yes", "existence", "adversarial"),
    ]
    assert items[2].image == str((images / "COCO_val2014_000000000002.jpg").resolve())
    first = json.loads(output.read_text().splitlines()[0])
    assert first["image"] == "../val2014/COCO_val2014_000000000001.jpg"
    assert load_jsonl(output) == items
    assert convert_pope(pope, images, split="mine")[0].id == "mine-1"


def test_convert_pope_errors(tmp_path: Path) -> None:
    pope, images = pope_fixture(tmp_path)
    with pytest.raises(DatasetError, match="POPE file not found"):
        convert_pope(tmp_path / "none.json", images)
    with pytest.raises(DatasetError, match="image folder not found"):
        convert_pope(pope, tmp_path / "nope")
    bad = tmp_path / "coco_pope_random.json"
    bad.write_text(json.dumps({"question_id": 1, "image": "COCO_val2014_000000000009.jpg", "text": "q", "label": "no"}))
    with pytest.raises(DatasetError, match=r"coco_pope_random.json:1: image not found: .*000000000009"):
        convert_pope(bad, images)
    bad.write_text(json.dumps({"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "q", "label": "2"}))
    with pytest.raises(DatasetError, match="label must be 'yes' or 'no', got '2'"):
        convert_pope(bad, images)
    bad.write_text(json.dumps({"question_id": 1, "text": "q"}))
    with pytest.raises(DatasetError, match=r"missing \['image', 'label'\]"):
        convert_pope(bad, images)


# ------------------------------------------------------------------------------------------------
# The shipped synthetic sets.
# ------------------------------------------------------------------------------------------------


def test_shipped_synthetic_sets_are_rebuilt_exactly_from_their_seeds() -> None:
    scenes = 3
    seeds = {f"scene:{SYNTHETIC_FIRST_SEED + k}" for k in range(scenes)}
    shipped_pope = [item for item in load_jsonl(SYNTHETIC_POPE_FILE) if item.image in seeds]
    assert shipped_pope == build_synthetic_pope(scenes)
    shipped_qa = [item for item in load_jsonl(SYNTHETIC_QA_FILE) if item.image in seeds]
    assert shipped_qa == build_synthetic_qa(scenes)


def test_shipped_pope_splits_are_balanced() -> None:
    for split in ("random", "popular", "adversarial"):
        items = synthetic_items(split)
        assert len(items) == 2 * SHIPPED_SCENES
        assert sum(item.answer == "yes" for item in items) == SHIPPED_SCENES
        assert {item.split for item in items} == {split}
    assert {item.type for item in synthetic_items("qa")} == {"colour", "shape", "count", "position"}
    assert [item.id for item in synthetic_items("all", 2)] == [
        f"{split}-{SYNTHETIC_FIRST_SEED}-{k}" for split in ("random", "popular", "adversarial") for k in (0, 1)
    ]


def test_synthetic_sets_extend_past_the_shipped_scenes() -> None:
    items = synthetic_items("popular", 2 * SHIPPED_SCENES + 2)
    extra = [item for item in build_synthetic_pope(1, SYNTHETIC_FIRST_SEED + SHIPPED_SCENES) if item.split == "popular"]
    assert items[-2:] == extra
    with pytest.raises(DatasetError, match="unknown synthetic set 'weird'"):
        synthetic_items("weird")


# ------------------------------------------------------------------------------------------------
# Runs with a fake target.
# ------------------------------------------------------------------------------------------------


def test_report_holds_the_exact_numbers_for_a_fake_target(tmp_path: Path) -> None:
    items = make_items(tmp_path)
    out = tmp_path / "out"
    modes = ("plain", "api", "verify", "masked", "iterative")
    report = evaluate(
        items, RuleTarget(), out_dir=out, attributor=shared_tiny_attributor(), modes=modes, options=options()
    )
    for name in ("results.jsonl", "report.json", "report.md", "gallery.html", "run.json"):
        assert (out / name).is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["modes"] == report.summary["modes"] and saved["run"]["items"] == 7
    plain = saved["modes"]["plain"]
    assert (plain["n"], plain["correct"], plain["exact"], plain["normalized"]) == (7, 5, 0, 1)
    assert plain["pope"]["random"] == {
        "n": 4, "tp": 1, "fp": 1, "tn": 1, "fn": 1,
        "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5,
    }  # fmt: skip
    assert plain["pope"]["popular"]["accuracy"] == 1.0 and plain["pope"]["all"]["f1"] == 2 / 3
    assert set(plain["pope"]) == {"random", "popular", "all"}  # the phrase question is not yes/no
    assert plain["by_type"]["phrase"]["correct"] == 1
    # verify always ends with FINAL: yes: every plain "no" changes.
    verify = saved["modes"]["verify"]
    assert verify["pope"]["random"]["yes_ratio"] == 1.0 and verify["pope"]["random"]["recall"] == 1.0
    assert verify["changes"] == {
        "relative_to": "first answer", "n": 7, "changed": 4, "change_rate": 4 / 7,
        "right_to_wrong": 3, "wrong_to_right": 1, "right_to_right": 2, "wrong_to_wrong": 1, "net_gain": -2,
    }  # fmt: skip
    assert verify["parsed_rate"] == 1.0
    # api: the target sees only the prompted image; the expected answers come from rendering it here.
    prompted = [
        rule_answer(attention_prompt(item.image, item.question, shared_tiny_attributor()).image) for item in items
    ]
    plain_answers = [rule_answer(item_image(item)) for item in items]
    assert prompted != plain_answers  # the prompted image is darker: some answers must change
    results = read_results(out)
    assert [r["answer"] for r in results if r["mode"] == "api"] == prompted
    assert [r["answer"] for r in results if r["mode"] == "masked"] == prompted  # one shared map per question
    assert [r["answer"] for r in results if r["mode"] == "iterative"] == plain_answers
    yes_no = [i for i, case in enumerate(CASES) if case[2] == "existence"]
    expected = pope_scores([prompted[i] for i in yes_no], [items[i].answer for i in yes_no]).as_dict()
    assert saved["modes"]["api"]["pope"]["all"] == expected
    api_changes = saved["modes"]["api"]["changes"]
    assert api_changes["relative_to"] == "plain"
    assert api_changes["changed"] == sum(a != b for a, b in zip(prompted, plain_answers))
    markdown = (out / "report.md").read_text()
    assert "| plain | 7 | 71.4 | 0.0 | 14.3 |" in markdown
    assert "| random | plain | 4 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |" in markdown
    assert "| verify | first answer | 7 | 4 | 3 | 1 | -2 |" in markdown


def test_gallery_shows_exactly_the_questions_where_modes_disagree(tmp_path: Path) -> None:
    items = make_items(tmp_path)
    out = tmp_path / "out"
    evaluate(
        items,
        RuleTarget(),
        out_dir=out,
        attributor=shared_tiny_attributor(),
        modes=("plain", "verify"),
        options=options(),
    )
    gallery = (out / "gallery.html").read_text()
    # verify turns every "no" into "yes": q2, q3 and q5 (plain "no") and q6 (a phrase "yes" -> "yes" differs).
    expected = disagreements(read_results(out), ["plain", "verify"])
    assert expected == ["q2", "q3", "q5", "q6"]
    assert [f"<h2>{item.id}</h2>" in gallery for item in items] == [False, False, True, True, False, True, True]
    assert gallery.count("data:image/jpeg;base64,") == 2 * len(expected)  # original + annotated each
    assert "annotated (verify)" in gallery and '<tr class="wrong"><th>verify</th><td>yes</td></tr>' in gallery


def test_resume_after_a_failing_target_finishes_without_duplicates(tmp_path: Path) -> None:
    items = make_items(tmp_path)
    out = tmp_path / "out"
    modes = ("plain", "api", "iterative")
    failing = RuleTarget(fail_after=5)
    with pytest.raises(EvalRunError, match="rerun with --resume"):
        evaluate(
            items, failing, out_dir=out, attributor=shared_tiny_attributor(), modes=modes, options=options(batch_size=2)
        )
    first_lines = (out / "results.jsonl").read_text().splitlines()
    assert len(first_lines) == 5  # every answer obtained before the failure is saved
    assert (out / "report.md").is_file()  # and a partial report written
    with pytest.raises(EvalOutputError, match="pass --resume"):
        evaluate(items, RuleTarget(), out_dir=out, attributor=shared_tiny_attributor(), modes=modes, options=options())
    healthy = RuleTarget()
    report = evaluate(
        items,
        healthy,
        out_dir=out,
        attributor=shared_tiny_attributor(),
        modes=modes,
        resume=True,
        options=options(batch_size=2),
    )
    assert healthy.calls == 3 * len(items) - 5  # nothing asked twice
    assert report.run["answered"] == 3 * len(items) - 5
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[:5] == first_lines
    pairs = [(r["id"], r["mode"]) for r in map(json.loads, lines)]
    assert len(pairs) == len(set(pairs)) == 3 * len(items)
    assert set(pairs) == {(item.id, mode) for item in items for mode in modes}
    assert report.summary["modes"]["plain"]["n"] == len(items)
    again = RuleTarget()
    evaluate(
        items, again, out_dir=out, attributor=shared_tiny_attributor(), modes=modes, resume=True, options=options()
    )
    assert again.calls == 0 and (out / "results.jsonl").read_text().splitlines() == lines


def test_resume_drops_a_line_cut_short_and_asks_it_again(tmp_path: Path) -> None:
    items = make_items(tmp_path)[:2]
    out = tmp_path / "out"
    evaluate(items, RuleTarget(), out_dir=out, modes=("plain",), options=options())
    results = out / "results.jsonl"
    complete = results.read_text().splitlines()
    results.write_text(complete[0] + "\n" + complete[1][:25])  # a crash while writing the second line
    target = RuleTarget()
    evaluate(items, target, out_dir=out, modes=("plain",), resume=True, options=options())
    assert target.calls == 1
    lines = results.read_text().splitlines()
    assert lines[0] == complete[0] and len(lines) == 2
    redone, before = json.loads(lines[1]), json.loads(complete[1])
    assert {k: v for k, v in redone.items() if k != "seconds"} == {k: v for k, v in before.items() if k != "seconds"}


def test_resume_refuses_another_target_and_bad_result_lines(tmp_path: Path) -> None:
    items = make_items(tmp_path)[:2]
    out = tmp_path / "out"
    evaluate(items, RuleTarget(), out_dir=out, modes=("plain",), options=options(), target_name="model-a")
    with pytest.raises(EvalOutputError, match="target: 'model-a' then, 'model-b' now"):
        evaluate(items, RuleTarget(), out_dir=out, modes=("plain",), resume=True, target_name="model-b")
    results = out / "results.jsonl"
    results.write_text("not json\n" + results.read_text())
    with pytest.raises(EvalOutputError, match=r"results.jsonl:1: not valid JSON"):
        ResultsLog(results).load()


def test_modes_and_options_are_checked(tmp_path: Path) -> None:
    items = make_items(tmp_path)[:1]
    assert run_modes(["iterative", "api"]) == ("plain", "api", "iterative")
    with pytest.raises(InvalidParameterError, match=r"modes \['api'\] need an attributor"):
        evaluate(items, RuleTarget(), out_dir=tmp_path / "o", modes=("api",))
    with pytest.raises(InvalidParameterError, match="unknown or no modes"):
        EvalOptions(modes=("plain", "zoomed"))
    with pytest.raises(InvalidParameterError, match="batch_size must be at least 1"):
        EvalOptions(batch_size=0)
    with pytest.raises(InvalidParameterError, match="--combine applies to CLIP"):
        build_attributor("self", RuleTarget(), combine="cls")
    with pytest.raises(
        UnsupportedModelError, match="needs a ChatTransformersVLM target wrapping a model of an LVLM family"
    ):
        build_attributor("self", RuleTarget())


def test_attributor_settings_reach_the_registry_attributor() -> None:
    from api_tool.demo import DEMO_CLIP_RECOMMENDED

    default = build_attributor("demo", RuleTarget(), device="cpu")
    chosen = build_attributor("demo", RuleTarget(), device="cpu", combine="paper", enhance_coe=10.0)
    assert default.enhance_coe == DEMO_CLIP_RECOMMENDED["enhance_coe"]  # type: ignore[attr-defined]
    assert (chosen.combine, chosen.enhance_coe) == ("paper", 10.0)  # type: ignore[attr-defined]


def test_map_cache_serves_prefetched_maps_from_one_batch(tmp_path: Path) -> None:
    calls: list[int] = []
    batches: list[list[Any]] = []

    class CountingClip:
        name = "counting"

        def attribute(self, image: Any, query: str) -> Any:
            calls.append(1)
            return shared_tiny_attributor().attribute(image, query)

        def attribute_batch(self, images: Any, queries: Any) -> Any:
            calls.append(len(images))
            batches.append(shared_tiny_attributor().attribute_batch(images, queries))
            return batches[-1]

        def attribute_many(self, image: Any, queries: Any) -> Any:
            return shared_tiny_attributor().attribute_many(image, queries)

    images = [item_image(item) for item in make_items(tmp_path)[:3]]
    cache = MapCache(CountingClip())
    cache.prefetch(images + images[:1], ["a", "b", "c", "a"])
    assert calls == [3]  # one batch, the repeated pair computed once
    served = cache.attribute(images[1].copy(), "b")  # found by content, not by object
    assert served is batches[0][1] and calls == [3]
    alone = shared_tiny_attributor().attribute(images[1], "b")  # batch of 3 vs 1: sums in another order
    assert_sums_close(served.cls, alone.cls, n_terms=MAP_TERMS)
    assert_sums_close(served.comp, alone.comp, n_terms=MAP_TERMS)
    cache.attribute(images[1], "other question")
    assert calls == [3, 1]


# ------------------------------------------------------------------------------------------------
# The entry point, end to end on a tiny random LLaVA (ChatTransformersVLM) with self-attribution.
# ------------------------------------------------------------------------------------------------


def test_main_runs_a_local_llava_with_self_attribution(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tiny_llava(tmp_path / "tiny-llava").directory
    out = tmp_path / "out"
    argv = ["--synthetic", "adversarial", "--n", "2", "--target", str(model_dir), "--attributor", "self",
            "--modes", "api,masked", "--max-tokens", "3", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "# Evaluation report" in printed and "gallery:" in printed
    results = read_results(out)
    assert sorted((r["id"], r["mode"]) for r in results) == sorted(
        (f"adversarial-{SYNTHETIC_FIRST_SEED}-{k}", mode) for k in (0, 1) for mode in ("plain", "api", "masked")
    )
    assert {r["attributor"] for r in results if r["mode"] != "plain"} == {"self"}
    assert all(
        r["annotated"].startswith("thumbs/") and (out / r["annotated"]).is_file()
        for r in results
        if r["mode"] != "plain"
    )
    masked = [r for r in results if r["mode"] == "masked"]
    plain = {r["id"]: r["answer"] for r in results if r["mode"] == "plain"}
    assert all(r["first_answer"] == plain[r["id"]] for r in masked)
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["target"] == str(model_dir) and report["modes"]["api"]["n"] == 2
    assert main([*argv, "--resume"]) == 0  # everything done: nothing asked, reports rebuilt
    assert read_results(out) == results


def test_main_reports_bad_input_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "dataset file not found" in capsys.readouterr().err
    assert main(["--synthetic", "random", "--n", "1", "--modes", "plain,zoomed", "--out", str(tmp_path / "o")]) == 2
    assert "unknown or no modes" in capsys.readouterr().err
