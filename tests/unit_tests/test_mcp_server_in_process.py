"""The MCP server in process (the SDK's in-memory transport) with a tiny CLIP: limits, progress while a model
loads, concurrency, the image policy, the token middleware and the command line. The subprocess transports
(stdio, HTTP) are in ``tests/integration_tests/test_mcp_server.py``."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from mcp import ClientSession
from mcp.shared.memory import create_connected_server_and_client_session
from mcp.types import CallToolResult, ImageContent, TextContent
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

import api_tool.mcp_server as mcp_server
from api_tool.backends.clip import ClipAttributor
from api_tool.errors import InvalidParameterError
from api_tool.image_refs import reference_kind
from api_tool.maps import AttributionMap
from api_tool.mcp_server import (
    BearerTokenMiddleware,
    ServerConfig,
    create_server,
    main,
    parse_http_address,
)
from api_tool.prompt import attention_prompt
from api_tool.summary import map_summary
from tests.conftest import shared_tiny_attributor
from tests.sample_images import noise, png_base64

CALL_TIMEOUT_S = 30.0


class SlowAttributor:
    """The tiny CLIP, ``delay`` seconds slower per map."""

    name = "slow"

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def attribute(self, image: Any, query: str) -> AttributionMap:
        time.sleep(self.delay)
        return shared_tiny_attributor().attribute(image, query)

    def attribute_batch(self, images: Sequence[Any], queries: Sequence[str]) -> list[AttributionMap]:
        return [self.attribute(image, query) for image, query in zip(images, queries)]

    def attribute_many(self, image: Any, queries: Sequence[str]) -> list[AttributionMap]:
        return [self.attribute(image, query) for query in queries]


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> ClipAttributor:
    """Every spec the server loads is the tiny CLIP (no weights read)."""
    attributor = shared_tiny_attributor()
    monkeypatch.setattr(mcp_server, "get_attributor", lambda spec, **options: attributor)
    return attributor


@asynccontextmanager
async def connected(config: ServerConfig) -> AsyncIterator[ClientSession]:
    with anyio.fail_after(CALL_TIMEOUT_S):
        async with create_connected_server_and_client_session(create_server(config)) as session:
            yield session


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def image_of(result: CallToolResult) -> Image.Image:
    block = next(block for block in result.content if isinstance(block, ImageContent))
    return Image.open(io.BytesIO(base64.b64decode(block.data)))


def data_uri(image: Image.Image) -> str:
    return f"data:image/png;base64,{png_base64(image)}"


async def test_prompt_and_map_match_the_library(tiny: ClipAttributor) -> None:
    image = noise(1, (96, 64))
    expected = attention_prompt(image, "where is the red square?", tiny, "heatmap")
    async with connected(ServerConfig()) as session:
        prompted = await session.call_tool(
            "attention_prompt", {"question": "where is the red square?", "image": data_uri(image), "style": "heatmap"}
        )
        mapped = await session.call_tool(
            "attention_map", {"question": "where is the red square?", "image": png_base64(image)}
        )
    assert not prompted.isError and not mapped.isError
    np.testing.assert_array_equal(np.asarray(image_of(prompted)), np.asarray(expected.image))
    summary = map_summary(expected, image="inline image", question="where is the red square?", model="demo")
    assert f"peaks at x={summary['peak']['x']}, y={summary['peak']['y']} px" in text_of(prompted)
    assert "style heatmap" in text_of(prompted)
    structured = mapped.structuredContent
    assert structured is not None
    assert {key: structured[key] for key in ("peak", "box", "attended_fraction", "grid")} == {
        key: summary[key] for key in ("peak", "box", "attended_fraction", "grid")
    }
    np.testing.assert_allclose(structured["grid_values"], expected.map.mask, atol=5e-5)
    mask = np.asarray(image_of(mapped))
    np.testing.assert_array_equal(mask, np.rint(np.clip(expected.mask, 0, 1) * 255).astype(np.uint8))


async def test_returned_images_are_shrunk_to_max_side(tiny: ClipAttributor) -> None:
    image = noise(2, (200, 100))
    async with connected(ServerConfig(max_side=50)) as session:
        prompted = await session.call_tool("attention_prompt", {"question": "q", "image": data_uri(image)})
        mapped = await session.call_tool("attention_map", {"question": "q", "image": data_uri(image)})
    assert image_of(prompted).size == image_of(mapped).size == (50, 25)
    assert mapped.structuredContent is not None and mapped.structuredContent["image_size"] == [200, 100]


async def test_a_call_over_the_time_limit_is_a_tool_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_server, "get_attributor", lambda spec, **options: SlowAttributor(1.0))
    async with connected(ServerConfig(timeout_s=0.05)) as session:
        start = time.perf_counter()
        result = await session.call_tool("attention_prompt", {"question": "q", "image": data_uri(noise(3))})
        assert time.perf_counter() - start < 0.9  # answered while the pass still runs
    assert result.isError
    assert "took longer than this server's limit of 0.05 s per call (--timeout)" in text_of(result)


async def test_loading_a_model_reports_progress_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []

    def slow_load(spec: str, **options: object) -> ClipAttributor:
        loads.append(spec)
        time.sleep(0.35)
        return shared_tiny_attributor()

    monkeypatch.setattr(mcp_server, "get_attributor", slow_load)
    monkeypatch.setattr(mcp_server, "PROGRESS_INTERVAL_S", 0.1)
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with connected(ServerConfig()) as session:
        for _ in range(2):
            arguments = {"question": "q", "image": data_uri(noise(4))}
            result = await session.call_tool("attention_prompt", arguments, progress_callback=on_progress)
            assert not result.isError, text_of(result)
    assert loads == ["demo"]
    messages = [message for _, message in progress]
    assert messages[0] == "loading the model 'demo' (first use)"
    assert messages[-1] is not None and messages[-1].startswith("model 'demo' loaded in")
    assert len(messages) >= 4 and all("loading the model 'demo': " in m for m in messages[1:-1] if m)
    assert [value for value, _ in progress] == sorted(value for value, _ in progress)
    assert "model_load" not in text_of(result)  # the second call loaded nothing


async def test_concurrent_calls_give_the_sequential_results(tiny: ClipAttributor) -> None:
    questions = [f"where is the {colour} circle?" for colour in ("red", "blue", "green", "white")]
    images = [data_uri(noise(seed)) for seed in range(4)]
    async with connected(ServerConfig()) as session:
        sequential = [
            await session.call_tool("attention_map", {"question": q, "image": i}) for q, i in zip(questions, images)
        ]
        results: list[CallToolResult | None] = [None] * 8

        async def call(index: int) -> None:
            arguments = {"question": questions[index % 4], "image": images[index % 4]}
            results[index] = await session.call_tool("attention_map", arguments)

        async with anyio.create_task_group() as group:
            for index in range(8):
                group.start_soon(call, index)
    grids = [result.structuredContent["grid_values"] for result in sequential if result.structuredContent]
    assert [result.structuredContent["grid_values"] for result in results if result and result.structuredContent] == (
        grids * 2
    )


async def test_limits_and_models_are_tool_errors(tiny: ClipAttributor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mcp_server, "MAX_IMAGE_ARGUMENT_CHARS", 200)
    config = ServerConfig(models=("demo", "clip:ViT-B-32@openai"), max_question_chars=20, max_pixels=1000)
    async with connected(config) as session:
        cases = [
            ({"question": "q" * 21}, "the question is 21 characters long, over this server's limit of 20"),
            ({"image": "A" * 201}, "the image argument is 201 characters long, over this server's limit of 200"),
            ({"image": data_uri(Image.new("RGB", (40, 30)))}, "1,200 pixels, over the limit of 1,000"),
            ({"model": "ViT-L-14"}, "it serves demo, clip:ViT-B-32@openai (leave `model` out for demo)"),
        ]
        small = png_base64(Image.new("RGB", (20, 10), (200, 30, 30)))
        for change, message in cases:
            result = await session.call_tool("attention_prompt", {"question": "q", "image": small, **change})
            assert result.isError and message in text_of(result), (change, text_of(result))
        chosen = await session.call_tool(
            "attention_prompt", {"question": "q", "image": small, "model": "clip:ViT-B-32@openai"}
        )
        listed = (await session.list_tools()).tools
    assert "model clip:ViT-B-32@openai" in text_of(chosen)
    assert all("Models: demo, clip:ViT-B-32@openai (default demo)." in (tool.description or "") for tool in listed)


async def test_paths_follow_the_roots_and_refused_ones_are_never_read(
    tiny: ClipAttributor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, private = tmp_path / "root", tmp_path / "private"
    root.mkdir()
    private.mkdir()
    noise(7).save(root / "a.png")
    noise(8).save(private / "b.png")
    (root / "link.png").symlink_to(private / "b.png")
    async with connected(ServerConfig(roots=(root,))) as session:
        allowed = await session.call_tool("attention_prompt", {"question": "q", "image": str(root / "a.png")})
        assert not allowed.isError, text_of(allowed)
        read: list[object] = []
        monkeypatch.setattr("api_tool.image_refs.load_image", lambda ref, **options: read.append(ref))
        for reference in (str(private / "b.png"), str(root / "link.png"), f"{root}/../private/b.png", "HTTP://x/y"):
            refused = await session.call_tool("attention_prompt", {"question": "q", "image": reference})
            assert refused.isError and "is not an existing file inside the directories this tool may read" in (
                text_of(refused)
            )
            assert "or a path inside those directories" in text_of(refused)
    assert read == []
    async with connected(ServerConfig()) as session:
        nowhere = await session.call_tool("attention_prompt", {"question": "q", "image": str(root / "a.png")})
    assert nowhere.isError and "this tool reads no files named in a tool call" in text_of(nowhere)
    assert "Pass the image inline, as a data URI or base64 string." in text_of(nowhere)


async def test_remote_images_need_allow_remote(tiny: ClipAttributor, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []

    def fake_fetch(url: str) -> bytes:
        fetched.append(url)
        return base64.b64decode(png_base64(noise(9)))

    monkeypatch.setattr("api_tool.images._fetch", fake_fetch)
    arguments = {"question": "q", "image": "https://example.com/a.png"}
    async with connected(ServerConfig()) as session:
        refused = await session.call_tool("attention_map", arguments)
        closed = (await session.list_tools()).tools[0].annotations
    assert refused.isError and "remote image URLs are disabled" in text_of(refused) and fetched == []
    async with connected(ServerConfig(allow_remote=True)) as session:
        allowed = await session.call_tool("attention_map", arguments)
        open_world = (await session.list_tools()).tools[0].annotations
    assert not allowed.isError and fetched == ["https://example.com/a.png"]
    assert allowed.structuredContent is not None and allowed.structuredContent["image"] == "https://example.com/a.png"
    assert (
        closed is not None
        and open_world is not None
        and (closed.openWorldHint, open_world.openWorldHint)
        == (
            False,
            True,
        )
    )


def test_bearer_token_middleware() -> None:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = BearerTokenMiddleware(Starlette(routes=[Route("/", hello)]), "s3cret")
    with TestClient(app) as client:
        assert client.get("/", headers={"Authorization": "Bearer s3cret"}).text == "hello"
        for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "s3cret"}, {"X-Token": "s3cret"}):
            refused = client.get("/", headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer realm="api-prompt"'


def test_http_addresses() -> None:
    assert parse_http_address("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_http_address(":8765") == parse_http_address("8765") == ("127.0.0.1", 8765)
    assert parse_http_address("[::1]:0") == ("::1", 0)
    assert parse_http_address("0.0.0.0:80") == ("0.0.0.0", 80)
    for bad in ("localhost", "host:port", "127.0.0.1:70000", ""):
        with pytest.raises(InvalidParameterError, match="give HOST:PORT"):
            parse_http_address(bad)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--token", "x"], "--token applies to --http only"),
        (["--root", "/no/such/dir"], "--root: '/no/such/dir' is not an existing directory"),
        (["--http", "nowhere"], "give HOST:PORT"),
        (["--timeout", "0"], "timeout_s must be a positive number of seconds"),
        (["--max-pixels", "0"], "max_pixels must be a positive integer"),
        (["--model", "no-such-model"], "unknown attributor 'no-such-model'"),
        (["--device", "cuda:99"], "cuda:99"),
    ],
)
def test_bad_command_lines_exit_with_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_summary_and_reference_kinds(tiny: ClipAttributor) -> None:
    result = attention_prompt(noise(10), "q", tiny)
    summary = map_summary(result, image="a.png", question="q", model="demo")
    assert "output" not in summary and list(summary)[:3] == ["image", "question", "model"]
    with_output = map_summary(result, image="a.png", question="q", model="demo", output=Path("o.png"))
    assert list(with_output)[:4] == ["image", "question", "output", "model"] and with_output["output"] == "o.png"
    assert [reference_kind(r) for r in ("https://x/a.png", "data:image/png;base64,AAAA", "A" * 32, "a.png")] == [
        "url",
        "data_uri",
        "base64",
        "path",
    ]
