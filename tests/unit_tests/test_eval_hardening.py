"""Hardening of ``api-prompt eval`` found in a user's test run: one writer per output folder (an OS file
lock, released when its process dies), dataset files that are not UTF-8 or not valid JSON (the real line
and column), result lines holding Unicode line separators, and ``--no-progress`` hiding the weight-loading
progress bars of transformers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.utils as hub_utils
import pytest
from transformers.utils import logging as transformers_logging

from agents.datasets import convert_pope, load_jsonl
from agents.eval import main, quiet_progress_bars
from agents.eval_runner import evaluate
from agents.results_log import LOCK_FILE, ResultsLog, lock_output
from api_tool.backends import registry
from api_tool.errors import DatasetError, EvalOutputError, EvalOutputLockedError
from tests.tiny_models import tiny_llava
from tests.unit_tests.test_eval import RuleTarget, make_items, options, read_results, write_lines

REPO_ROOT = Path(__file__).resolve().parents[2]
HOLDER = r"pid (?P<pid>\d+) on (?P<host>\S+), started (?P<started>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00)"
GOOD_LINE = '{"image": "scene:1", "question": "q?", "answer": "yes", "id": "a"}'


# ------------------------------------------------------------------------------------------------
# One writer per output folder.
# ------------------------------------------------------------------------------------------------


def test_a_second_lock_in_the_same_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with lock_output(tmp_path):
        with pytest.raises(EvalOutputLockedError) as refused, lock_output(tmp_path):
            pytest.fail("a second lock on the same folder was granted")
        message = str(refused.value)
        assert "\n" not in message and str(tmp_path) in message and "choose another --out" in message
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert f"pid {os.getpid()} on {socket.gethostname()}, started {holder['started']}" in message
    with lock_output(tmp_path):  # released on leaving the block: the folder can be locked again
        pass


def test_evaluate_refuses_a_folder_another_run_is_writing(tmp_path: Path) -> None:
    items = make_items(tmp_path)[:2]
    out = tmp_path / "out"
    out.mkdir()
    target = RuleTarget()
    with lock_output(out), pytest.raises(EvalOutputLockedError, match=HOLDER):
        evaluate(items, target, out_dir=out, modes=("plain",), options=options())
    assert target.calls == 0 and not (out / "results.jsonl").exists()
    for resume in (False, True):
        with lock_output(out), pytest.raises(EvalOutputLockedError):
            evaluate(items, RuleTarget(), out_dir=out, modes=("plain",), resume=resume, options=options())
    evaluate(items, target, out_dir=out, modes=("plain",), options=options())  # once free, the run goes ahead
    assert len(read_results(out)) == 2


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process that holds the lock on ``tmp_path / "out"`` until it is killed."""
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import sys\nfrom agents.results_log import lock_output\n"
        f"with lock_output({str(out)!r}):\n    print('locked', flush=True)\n    sys.stdin.read()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "locked\n"
        yield process, out
    finally:
        process.kill()
        process.wait(timeout=30)


def test_cli_refuses_a_second_writer_and_a_killed_writer_does_not_block(
    lock_holder: tuple[subprocess.Popen[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    process, out = lock_holder
    data = write_lines(tmp_path / "set.jsonl", [GOOD_LINE])
    argv = ["--data", str(data), "--target", str(tmp_path / "never-loaded"), "--modes", "plain", "--out", str(out)]
    for extra in ([], ["--resume"]):
        assert main([*argv, *extra]) == 2  # refused before loading the target (its path does not exist)
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and captured.out == ""
        assert f"pid {process.pid} on {socket.gethostname()}, started " in lines[0]
    with pytest.raises(EvalOutputLockedError, match=f"pid {process.pid} "):
        evaluate(make_items(tmp_path)[:1], RuleTarget(), out_dir=out, modes=("plain",), options=options())
    process.send_signal(signal.SIGKILL)  # dies holding the lock: no clean-up runs
    process.wait(timeout=30)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == process.pid  # the dead holder's file stays
    items = make_items(tmp_path)[:2]
    evaluate(items, RuleTarget(), out_dir=out, modes=("plain",), options=options())
    assert len(read_results(out)) == 2
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


# ------------------------------------------------------------------------------------------------
# Dataset files that are not UTF-8 or not valid JSON.
# ------------------------------------------------------------------------------------------------


def test_a_dataset_that_is_not_utf8_names_its_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "set.jsonl"
    data.write_bytes(GOOD_LINE.encode() + b'\n{"image": "scene:2", "question": "caf\xe9?", "answer": "no"}\n')
    with pytest.raises(DatasetError, match=r"set\.jsonl:2: not UTF-8 \(byte 0xe9 at byte 38 of the line\)"):
        load_jsonl(data)
    assert main(["--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{data}:2: not UTF-8" in err and "save it as UTF-8" in err


@pytest.mark.parametrize(
    ("line", "column"),
    [
        ('{"image": "scene:1", "question": "q?"', 38),  # cut short: the fault is past the last character
        ('{"image": "scene:1" "question": "q?", "answer": "yes"}', 21),  # a missing comma
        ('{"image": "scene:1", "question": "q?", "answer": "yes"}\r', None),  # CRLF endings are fine
    ],
)
def test_invalid_json_reports_the_real_line_and_column(tmp_path: Path, line: str, column: int | None) -> None:
    data = write_lines(tmp_path / "set.jsonl", [GOOD_LINE.replace('"a"', '"b"'), "", line])
    if column is None:
        assert [item.question for item in load_jsonl(data)] == ["q?", "q?"]
        return
    with pytest.raises(DatasetError, match=rf"set\.jsonl:3: not valid JSON \(.* at column {column}\)"):
        load_jsonl(data)
    pope = write_lines(tmp_path / "coco_pope_random.json", ["", "", line])
    with pytest.raises(DatasetError, match=rf"pope_random\.json:3: not valid JSON \(.* at column {column}\)"):
        convert_pope(pope, tmp_path)


# ------------------------------------------------------------------------------------------------
# The results log.
# ------------------------------------------------------------------------------------------------


def test_results_holding_unicode_line_separators_load_back(tmp_path: Path) -> None:
    log = ResultsLog(tmp_path / "results.jsonl")
    answers = ["one\u2028two", "three\u2029four\x85five"]  # json.dumps leaves these unescaped
    for number, answer in enumerate(answers):
        log.append({"id": f"q{number}", "mode": "plain", "answer": answer})
    assert [record["answer"] for record in ResultsLog(log.path).load()] == answers


def test_results_that_are_not_utf8_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"id": "q0", "mode": "plain", "answer": "a"}\n{"id": "q1", "mode": "plain", "answer": "\xff"}\n')
    with pytest.raises(EvalOutputError, match=r"results\.jsonl:2: not UTF-8"):
        ResultsLog(path).load()


# ------------------------------------------------------------------------------------------------
# --no-progress hides the weight-loading progress bars.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("transformers_on", "hub_on"), [(True, True), (True, False), (False, True), (False, False)])
def test_quiet_progress_bars_restores_what_was_set(transformers_on: bool, hub_on: bool) -> None:
    try:
        (transformers_logging.enable_progress_bar if transformers_on else transformers_logging.disable_progress_bar)()
        (hub_utils.enable_progress_bars if hub_on else hub_utils.disable_progress_bars)()
        with quiet_progress_bars():
            assert not transformers_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
        assert transformers_logging.is_progress_bar_enabled() == transformers_on
        assert hub_utils.are_progress_bars_disabled() == (not hub_on)
    finally:
        transformers_logging.enable_progress_bar()


def test_no_progress_hides_the_weight_loading_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tiny_llava(tmp_path / "tiny-llava").directory
    capsys.readouterr()  # saving it shows bars of its own
    assert transformers_logging.is_progress_bar_enabled()  # what a caller who never touched it has
    argv = ["--synthetic", "random", "--n", "1", "--target", str(model_dir), "--modes", "plain",
            "--max-tokens", "2", "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s]" not in err
    assert transformers_logging.is_progress_bar_enabled()  # the global setting is back as it was
    registry.clear_cache()  # the chat model's weights are shared through the registry: load them again
    assert main([*argv[:-1], "--resume"]) == 0  # the control: without --no-progress the bar shows
    assert "Loading weights" in capsys.readouterr().err
