"""Served targets (``openai:MODEL@BASE_URL``, ``ollama:MODEL@HOST``): spec parsing, keys optional for a
server of your own, retries with backoff and usage counts, the local engine over HTTP against a mock
server on 127.0.0.1 (the same answers as an in-process fake), and bad or unreachable targets refused with
exit status 2 and one line saying what to set, on both engines, before anything starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from langchain_core.messages import HumanMessage

from agents.datasets import write_jsonl
from agents.eval import main
from agents.eval_options import EvalOptions
from agents.eval_runner import evaluate
from agents.served import (
    PLACEHOLDER_API_KEY,
    ServedChatModel,
    is_retryable,
    parse_served_spec,
    retry_delay,
    served_chat_model,
)
from api_tool.errors import TargetUnavailableError
from tests.mock_openai_server import MockChatServer
from tests.unit_tests.test_eval import RuleTarget, make_items, read_results


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ------------------------------------------------------------------------------------------------
# Specs.
# ------------------------------------------------------------------------------------------------


def test_served_specs_resolve_address_and_key() -> None:
    spec = parse_served_spec("openai:Qwen/Qwen2.5-VL-7B-Instruct@http://10.0.0.5:8000/v1/", environ={})
    assert spec is not None and (spec.model, spec.base_url) == (
        "Qwen/Qwen2.5-VL-7B-Instruct",
        "http://10.0.0.5:8000/v1",
    )
    assert spec.api_key == PLACEHOLDER_API_KEY and PLACEHOLDER_API_KEY not in repr(spec)
    env = {"OPENAI_BASE_URL": "http://box:30000/v1", "OPENAI_API_KEY": "sk-x"}
    spec = parse_served_spec("openai:gpt-4o-mini", environ=env)
    assert spec is not None and (spec.base_url, spec.api_key) == ("http://box:30000/v1", "sk-x")
    spec = parse_served_spec("openai:gpt-4o-mini", environ={"OPENAI_API_KEY": "sk-y"})
    assert spec is not None and spec.base_url == "https://api.openai.com/v1"
    assert parse_served_spec("ollama:llava:13b@gpu-box:11434", environ={}).base_url == "http://gpu-box:11434"  # type: ignore[union-attr]
    spec = parse_served_spec("ollama:llava:13b", environ={"OLLAMA_HOST": "0.0.0.0:9999"})
    assert spec is not None and (spec.model, spec.base_url) == ("llava:13b", "http://0.0.0.0:9999")
    assert parse_served_spec("ollama:llava", environ={}).base_url == "http://127.0.0.1:11434"  # type: ignore[union-attr]
    assert parse_served_spec("demo") is None and parse_served_spec("/models/llava") is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("openai:gpt-4o", r"needs OPENAI_API_KEY: set it, or point at your own server"),
        ("openai:qwen@localhost:8000/v1", r"must start with http:// or https://"),
        ("openai:@http://127.0.0.1:8000/v1", r"names no model"),
        ("ollama:llava@ftp://box", r"is not an http\(s\) address"),
    ],
)
def test_bad_served_specs_say_what_to_set(spec: str, message: str) -> None:
    with pytest.raises(TargetUnavailableError, match=message):
        parse_served_spec(spec, environ={})


def test_retries_are_for_what_may_pass_and_back_off_with_jitter() -> None:
    class StatusError(Exception):
        def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
            self.status_code = status_code
            self.response = SimpleNamespace(status_code=status_code, headers=headers or {})

    assert [is_retryable(StatusError(code)) for code in (400, 401, 404, 408, 429, 500, 503)] == [
        False, False, False, True, True, True, True,
    ]  # fmt: skip
    assert is_retryable(TimeoutError()) and is_retryable(ConnectionRefusedError()) and not is_retryable(KeyError())
    delays = [retry_delay(attempt, RuntimeError(), base=0.5, cap=4.0) for attempt in range(6) for _ in range(20)]
    assert all(0.25 <= delay <= 4.0 for delay in delays) and len(set(delays)) > 100  # jittered, capped
    assert retry_delay(0, StatusError(429, {"retry-after": "1.5"}), base=0.5, cap=4.0) == 1.5  # the server's word


# ------------------------------------------------------------------------------------------------
# Over HTTP, with the local engine.
# ------------------------------------------------------------------------------------------------


def test_served_chat_model_retries_then_gives_up_and_counts() -> None:
    with MockChatServer(fail_first=2, fail_status=503, lifetime=30) as server:
        spec = parse_served_spec(f"openai:mock@{server.openai_url}", environ={})
        assert spec is not None
        model = served_chat_model(spec, max_retries=3)
        model = model.model_copy(update={"backoff_base": 0.01})
        assert model.invoke([HumanMessage("FINAL: ?")]).text.endswith("FINAL: yes")
        assert model.usage() == {"requests": 3, "retries": 2, "failed": 0, "input_tokens": 10, "output_tokens": 4}
    with MockChatServer(fail_first=10, fail_status=500, lifetime=30) as server:
        spec = parse_served_spec(f"openai:mock@{server.openai_url}", environ={})
        assert spec is not None
        stubborn = served_chat_model(spec, max_retries=2).model_copy(update={"backoff_base": 0.01})
        with pytest.raises(Exception, match="try again later"):
            stubborn.invoke([HumanMessage("hello")])
        assert isinstance(stubborn, ServedChatModel) and stubborn.take_usage()["failed"] == 1
        assert stubborn.usage()["requests"] == 0 and server.chat_requests == 3


def test_the_local_engine_asks_a_served_target_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a server of your own needs no key
    items = make_items(tmp_path)
    data = write_jsonl(items, tmp_path / "set.jsonl")
    evaluate(items, RuleTarget(), out_dir=tmp_path / "fake", modes=("plain",), options=EvalOptions(progress=False))
    expected = {(r["id"], r["mode"]): r["answer"] for r in read_results(tmp_path / "fake")}
    with MockChatServer(fail_first=2, lifetime=60) as server:
        target = f"openai:mock@{server.openai_url}"
        argv = ["--data", str(data), "--target", target, "--modes", "plain", "--out", str(tmp_path / "served"),
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        answers = {(r["id"], r["mode"]): r["answer"] for r in read_results(tmp_path / "served")}
        assert answers == expected  # the mock answers by the fake's rule: the images went over HTTP intact
        run = json.loads((tmp_path / "served" / "report.json").read_text())["run"]
        n = len(items)
        assert run["target_usage"] == {
            "requests": n + 2, "retries": 2, "failed": 0, "input_tokens": 10 * n, "output_tokens": 4 * n,
        }  # fmt: skip
        assert f"- target requests: {n + 2} (2 retried, 0 failed); tokens: {10 * n} in, {4 * n} out" in (
            capsys.readouterr().out
        )
        ollama = ["--data", str(data), "--target", f"ollama:mock@{server.ollama_host}", "--modes", "plain",
                  "--out", str(tmp_path / "ollama"), "--no-progress"]  # fmt: skip
        assert main(ollama) == 0
        assert {(r["id"], r["mode"]): r["answer"] for r in read_results(tmp_path / "ollama")} == answers


# ------------------------------------------------------------------------------------------------
# Bad or unreachable targets: exit 2, one line, before anything starts.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_bad_or_unreachable_targets_exit_2_with_one_line(
    engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    port = free_port()
    with MockChatServer(lifetime=60) as server:
        cases = [
            (f"openai:qwen@http://127.0.0.1:{port}/v1", "cannot reach http://127.0.0.1:"),
            (f"ollama:llava@127.0.0.1:{port}", "start the server or set its address: --target ollama:llava@HOST:PORT"),
            (f"openai:other@{server.openai_url}", "does not serve model 'other'; choose one of: mock"),
            (f"ollama:other@{server.ollama_host}", "run `ollama pull other` or choose one of: mock:latest"),
            ("openai:gpt-4o", "needs OPENAI_API_KEY"),
            (str(tmp_path / "no-such-model"), "model path not found"),
        ]
        for target, message in cases:
            argv = ["--synthetic", "random", "--n", "2", "--target", target, "--modes", "plain",
                    "--out", str(tmp_path / "out"), "--no-progress", "--engine", engine]  # fmt: skip
            assert main(argv) == 2, target
            captured = capsys.readouterr()
            assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
            assert message in captured.err, captured.err
        assert server.chat_requests == 0


def test_ray_only_options_need_the_ray_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--synthetic", "random", "--n", "1", "--modes", "plain", "--out", str(tmp_path / "o")]
    assert main([*base, "--ray-address", "127.0.0.1:6379", "--actors", "2"]) == 2
    assert "--ray-address, --actors apply to the Ray engine; add --engine ray" in capsys.readouterr().err


def test_an_unreachable_ray_cluster_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("this process already joined a Ray, which --engine ray would use")
    argv = ["--synthetic", "random", "--n", "1", "--modes", "plain", "--out", str(tmp_path / "o"), "--no-progress",
            "--engine", "ray", "--ray-address", f"127.0.0.1:{free_port()}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "cannot reach the Ray cluster at 127.0.0.1:" in err
    assert "set --ray-address to the head's HOST:PORT" in err
