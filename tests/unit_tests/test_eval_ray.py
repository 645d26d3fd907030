"""The Ray engine of ``api-prompt eval`` on a local 2-CPU Ray: the same records, metrics and gallery as
the local engine (demo target with the demo CLIP, and with self-attribution), and a run whose driver is
SIGKILLed midway resumes with nothing lost, written twice or asked twice, against a served target over HTTP.

Ray starts once for the module (about 3 s); each run starts its actors, which import torch and load the
demo models (10 to 20 s on two busy cores), hence the ``slow`` marks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agents.datasets import synthetic_items
from agents.eval import main
from agents.eval_factories import build_attributor, build_target
from agents.eval_options import EvalOptions
from agents.eval_ray import RayOptions, evaluate_on_ray
from agents.eval_runner import evaluate
from tests.mock_openai_server import MockChatServer

ray = pytest.importorskip("ray")

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMING = ("seconds", "map_seconds")
RAY_CPUS = 2


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local Ray with 2 CPUs for the module (no dashboard, a small object store); its GCS address."""
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, object_store_memory=128 * 1024**2, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in record.items() if key not in TIMING} for record in records]


def untimed_summary(out: Path) -> dict[str, Any]:
    modes = json.loads((out / "report.json").read_text())["modes"]
    return {mode: {k: v for k, v in entry.items() if k != "seconds_per_answer"} for mode, entry in modes.items()}


def by_key(record: dict[str, Any]) -> tuple[str, str]:
    return str(record["id"]), str(record["mode"])


def assert_same_run(local: Path, on_ray: Path) -> None:
    # the same records (the ray engine logs each chunk when it finishes, so possibly in another order)
    assert sorted(untimed(results(on_ray)), key=by_key) == sorted(untimed(results(local)), key=by_key)
    assert untimed_summary(on_ray) == untimed_summary(local)
    assert (on_ray / "gallery.html").read_text() == (local / "gallery.html").read_text()
    assert sorted(p.name for p in (on_ray / "thumbs").iterdir()) == sorted(p.name for p in (local / "thumbs").iterdir())


@pytest.mark.slow
def test_ray_and_local_engines_give_identical_results_and_metrics(ray_address: str, tmp_path: Path) -> None:
    items = synthetic_items("all", 4)  # 12 questions, 3 chunks of 4: both actors get work
    modes = ("plain", "api", "verify")
    options = EvalOptions(progress=False, batch_size=4)
    target = build_target("demo")
    evaluate(
        items,
        target,
        out_dir=tmp_path / "local",
        attributor=build_attributor("demo", target),
        modes=modes,
        options=options,
        target_name="demo",
        attributor_name="demo",
    )
    report = evaluate_on_ray(
        items, "demo", attributor="demo", out_dir=tmp_path / "ray", modes=modes, options=options,
        ray_options=RayOptions(actors=2),
    )  # fmt: skip
    assert report.run["engine"] == "ray" and report.run["actors"] == 2
    assert_same_run(tmp_path / "local", tmp_path / "ray")
    assert {r["mode"] for r in results(tmp_path / "ray")} == set(modes)
    assert "- engine: Ray, 2 actor(s)" in (tmp_path / "ray" / "report.md").read_text()


@pytest.mark.slow
def test_self_attribution_runs_in_the_ray_actors(ray_address: str, tmp_path: Path) -> None:
    items = synthetic_items("adversarial", 3)
    modes = ("api", "masked")
    options = EvalOptions(progress=False, batch_size=3)
    target = build_target("demo")
    evaluate(
        items,
        target,
        out_dir=tmp_path / "local",
        attributor=build_attributor("self", target),
        modes=modes,
        options=options,
        target_name="demo",
        attributor_name="self",
    )
    evaluate_on_ray(
        items, "demo", attributor="self", out_dir=tmp_path / "ray", modes=modes, options=options,
        ray_options=RayOptions(actors=1),
    )  # fmt: skip
    assert_same_run(tmp_path / "local", tmp_path / "ray")
    assert {r["attributor"] for r in results(tmp_path / "ray") if r["mode"] != "plain"} == {"self"}


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_free_cpus(deadline: float) -> None:
    """Until the killed driver's actors are gone (their CPUs back in the pool)."""
    while ray.available_resources().get("CPU", 0) < RAY_CPUS:
        assert time.monotonic() < deadline, "the killed run's actors did not go away"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_ray_run_killed_midway_resumes_without_loss_or_duplicates(
    ray_address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    out = tmp_path / "out"
    n, modes = 30, ("plain",)
    total = n * len(modes)
    with MockChatServer(latency=0.25, lifetime=240) as server:
        argv = ["--synthetic", "random", "--n", str(n), "--target", f"openai:mock@{server.openai_url}",
                "--modes", ",".join(modes), "--batch-size", "2", "--concurrency", "1", "--out", str(out),
                "--engine", "ray", "--actors", "1", "--no-progress"]  # fmt: skip
        env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
        driver = subprocess.Popen(
            [sys.executable, "-m", "agents.eval", *argv, "--ray-address", ray_address],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 180
        try:
            while complete_lines(out / "results.jsonl") < 6:
                assert driver.poll() is None, driver.communicate()[1].decode()[-2000:]
                assert time.monotonic() < deadline, "the ray run wrote no results in time"
                time.sleep(0.05)
            driver.send_signal(signal.SIGKILL)  # the driver dies at once: no clean-up, maybe half a line
        finally:
            driver.kill()
            driver.wait(timeout=30)
        wait_for_free_cpus(deadline)
        done = complete_lines(out / "results.jsonl")
        before = results_prefix(out, done)
        assert 0 < done < total
        asked_before = server.chat_requests
        assert main([*argv, "--resume"]) == 0  # this process's Ray: the cluster the killed driver had joined
        capsys.readouterr()
        asked = server.chat_requests - asked_before
    records = results(out)
    assert records[:done] == before  # nothing lost or rewritten
    pairs = [(r["id"], r["mode"]) for r in records]
    assert len(pairs) == len(set(pairs)) == total  # nothing twice, nothing missing
    assert asked == total - done  # nothing asked twice
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["engine"] == "ray" and report["run"]["answered"] == total - done
    assert report["run"]["target_usage"]["requests"] == asked and report["run"]["target_usage"]["retries"] == 0
    assert report["modes"]["plain"]["n"] == n


def results_prefix(out: Path, lines: int) -> list[dict[str, Any]]:
    """The first ``lines`` complete records of the log."""
    data = (out / "results.jsonl").read_bytes().split(b"\n")[:lines]
    return [json.loads(line) for line in data]
