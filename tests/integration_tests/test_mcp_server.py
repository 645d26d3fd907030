"""``api-prompt serve`` as MCP clients see it: the server runs as a subprocess, over stdio and over streamable
HTTP on 127.0.0.1, and the SDK's own ``ClientSession`` (then ``langchain-mcp-adapters`` inside a LangChain
agent) talks to it. Offline: the demo CLIP, synthetic scenes with known boxes, loopback traffic only.

Scenes and queries were chosen where the demo CLIP's map does point right (its pointing game misses about
18 % of queries): seed 0's white ring and seed 11's green cross, both peaking more than 20 px inside the box.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import httpx
import pytest
from langchain.agents import create_agent
from langchain_core.language_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent, TextContent
from PIL import Image
from pydantic import Field

from agents.middleware import ImageToolMessageMiddleware
from api_tool.demo.scenes import Scene, generate_scene, name_of

TOKEN = "test-token-0123456789"
MAX_PIXELS = 500_000
SESSION_TIMEOUT_S = 90.0
START_TIMEOUT_S = 60.0
PEAK = re.compile(r"peaks at x=(\d+), y=(\d+) px")


@dataclass(frozen=True)
class Query:
    """A scene, the object asked about and the file the scene is saved to."""

    scene: Scene
    index: int
    path: Path

    @property
    def question(self) -> str:
        return f"where is the {name_of(self.scene.objects[self.index])}?"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.scene.objects[self.index].box

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.path.read_bytes()).decode()


@dataclass(frozen=True)
class Files:
    root: Path
    ring: Query  # seed 0, the white ring
    cross: Query  # seed 11, the green cross
    outside: Path
    text: Path
    huge: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    base = tmp_path_factory.mktemp("mcp")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    queries = []
    for seed, index, name in ((0, 0, "white ring"), (11, 1, "green cross")):
        scene = generate_scene(seed, size=(320, 224), n_objects=3, background="gradient")
        assert name_of(scene.objects[index]) == name
        scene.image.save(root / f"scene{seed}.png")
        queries.append(Query(scene, index, root / f"scene{seed}.png"))
    queries[0].scene.image.save(outside / "secret.png")
    (root / "notes.txt").write_text("not an image\n")
    Image.new("RGB", (1000, 1000), (90, 90, 90)).save(root / "huge.png")
    return Files(root, queries[0], queries[1], outside / "secret.png", root / "notes.txt", root / "huge.png")


def server_args(files: Files) -> list[str]:
    return ["--root", str(files.root), "--max-pixels", str(MAX_PIXELS), "--timeout", "60"]


def inside(point: tuple[int, int], box: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= point[0] < x1 and y0 <= point[1] < y1


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def png_of(result: CallToolResult) -> Image.Image:
    images = [block for block in result.content if isinstance(block, ImageContent)]
    assert len(images) == 1 and images[0].mimeType == "image/png"
    return Image.open(io.BytesIO(base64.b64decode(images[0].data)))


async def check_tool_list(session: ClientSession) -> None:
    listed = (await session.list_tools()).tools
    assert sorted(tool.name for tool in listed) == ["attention_map", "attention_prompt"]
    for tool in listed:
        properties = tool.inputSchema["properties"]
        assert {"question", "image", "model"} <= set(properties)
        assert all(spec.get("type") == "string" for spec in properties.values()), (tool.name, properties)
        assert set(tool.inputSchema["required"]) == {"question", "image"}
        assert tool.annotations is not None and tool.annotations.readOnlyHint
    prompt_tool = next(tool for tool in listed if tool.name == "attention_prompt")
    assert prompt_tool.inputSchema["properties"]["style"]["enum"] == ["gray", "heatmap", "crop", "contour", "zoom"]


async def check_both_tools(session: ClientSession, files: Files) -> list[str]:
    """Both tools point at the queried objects; returns the progress messages of the first call."""
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    ring = files.ring
    result = await session.call_tool(
        "attention_prompt", {"question": ring.question, "image": str(ring.path)}, progress_callback=on_progress
    )
    assert not result.isError, text_of(result)
    assert [block.type for block in result.content] == ["text", "image"]
    peak = PEAK.search(text_of(result))
    assert peak is not None, text_of(result)
    assert inside((int(peak[1]), int(peak[2])), ring.box), (text_of(result), ring.box)
    assert "attended box" in text_of(result) and "Timings:" in text_of(result)
    prompted = png_of(result)
    assert prompted.size == ring.scene.size
    assert prompted.convert("RGB").tobytes() != ring.scene.image.tobytes()  # faded where it does not attend

    cross = files.cross
    mapped = await session.call_tool("attention_map", {"question": cross.question, "image": cross.data_uri})
    assert not mapped.isError, text_of(mapped)
    summary = mapped.structuredContent
    assert summary is not None
    assert inside((summary["peak"]["x"], summary["peak"]["y"]), cross.box), (summary["peak"], cross.box)
    assert summary["image"].startswith("inline image") and summary["image_size"] == list(cross.scene.size)
    rows, cols = summary["grid"]
    assert len(summary["grid_values"]) == rows and {len(row) for row in summary["grid_values"]} == {cols}
    assert max(max(row) for row in summary["grid_values"]) == 1.0
    mask = png_of(mapped)
    assert mask.mode == "L" and mask.size == cross.scene.size == tuple(summary["mask_png_size"])
    assert mask.getpixel((summary["peak"]["x"], summary["peak"]["y"])) >= 250
    return progress


async def check_bad_inputs(session: ClientSession, files: Files) -> None:
    """Each bad call is a tool error saying what was wrong; the server keeps serving."""
    ring = files.ring
    bad = [
        ({"image": str(files.root / "missing.png")}, "is not an existing file inside the directories"),
        ({"image": str(files.outside)}, "is not an existing file inside the directories"),
        ({"image": str(files.root / ".." / "outside" / "secret.png")}, "is not an existing file inside"),
        ({"image": f"file://{ring.path}"}, "file: URIs are not accepted"),
        ({"image": str(files.text)}, "is not an image Pillow can read"),
        ({"image": str(files.huge)}, f"over the limit of {MAX_PIXELS:,}"),
        ({"image": "http://127.0.0.1:9/a.png"}, "remote image URLs are disabled"),
        ({"question": "   "}, "the query is empty"),
        ({"question": "where? " * 300}, "over this server's limit of 1,000"),
        ({"style": "neon"}, "Input should be 'gray', 'heatmap', 'crop', 'contour' or 'zoom'"),
        ({"model": "clip:ViT-B-32"}, "does not serve the model 'clip:ViT-B-32'"),
    ]
    for change, message in bad:
        arguments = {"question": ring.question, "image": str(ring.path), **change}
        result = await session.call_tool("attention_prompt", arguments)
        assert result.isError, (change, text_of(result))
        assert message in text_of(result), (change, text_of(result))
    missing = await session.call_tool("attention_map", {"question": ring.question})
    assert missing.isError and "image" in text_of(missing) and "Field required" in text_of(missing)
    again = await session.call_tool("attention_prompt", {"question": ring.question, "image": str(ring.path)})
    assert not again.isError


async def test_stdio_server_serves_both_tools_and_survives_bad_calls(files: Files, http_server: HttpServer) -> None:
    """(``http_server`` only starts the HTTP server's process early, so its imports overlap this test.)"""
    parameters = StdioServerParameters(
        command=sys.executable, args=["-m", "api_tool.mcp_server", *server_args(files)], env=dict(os.environ)
    )
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with stdio_client(parameters) as (read, write), ClientSession(read, write) as session:
            initialized = await session.initialize()
            assert initialized.serverInfo.name == "api-prompting"
            assert str(files.root.resolve()) in (initialized.instructions or "")
            await check_tool_list(session)
            progress = await check_both_tools(session, files)
            assert progress[0] == "loading the model 'demo' (first use)"
            assert progress[-1].startswith("model 'demo' loaded in")
            await check_bad_inputs(session, files)


class HttpServer:
    """``api-prompt serve --http 127.0.0.1:0`` with the token in its environment, started at once; ``url()``
    waits until it listens (its stderr is read to the end by a thread, so the pipe never fills)."""

    def __init__(self, files: Files) -> None:
        command = [sys.executable, "-m", "api_tool.cli", "serve", "--http", "127.0.0.1:0", *server_args(files)]
        self.process = subprocess.Popen(
            command, env={**os.environ, "API_PROMPT_MCP_TOKEN": TOKEN}, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=forward_lines, args=(self.process.stderr, self.lines), daemon=True).start()

    def url(self) -> str:
        while True:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+/mcp)", "".join(self.seen))
            if found:
                return found[1]
            try:
                self.seen.append(self.lines.get(timeout=START_TIMEOUT_S))
            except queue.Empty:
                pytest.fail(f"the server did not listen within {START_TIMEOUT_S} s: {self.seen}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def http_server(files: Files) -> Iterator[HttpServer]:
    server = HttpServer(files)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http_url(http_server: HttpServer) -> str:
    return http_server.url()


def forward_lines(stream: IO[str] | None, lines: queue.Queue[str]) -> None:
    """Read the server's stderr to its end (so the pipe never fills), line by line into ``lines``."""
    assert stream is not None
    for line in stream:
        lines.put(line)


@asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30.0, read=120.0)) as http,
        streamable_http_client(url, http_client=http) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
}


def test_http_calls_without_the_token_are_refused(http_url: str) -> None:
    headers = {"Accept": "application/json, text/event-stream"}
    for extra in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = httpx.post(http_url, json=INITIALIZE, headers={**headers, **extra}, timeout=10)
        assert refused.status_code == 401, extra
        assert refused.headers["www-authenticate"].startswith("Bearer")
    accepted = httpx.post(
        http_url, json=INITIALIZE, headers={**headers, "Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert accepted.status_code == 200 and "api-prompting" in accepted.text


async def test_http_server_serves_both_tools_and_survives_bad_calls(http_url: str, files: Files) -> None:
    with anyio.fail_after(SESSION_TIMEOUT_S):
        async with http_session(http_url) as session:
            await check_tool_list(session)
            await check_both_tools(session, files)
            await check_bad_inputs(session, files)
            calls = [
                session.call_tool("attention_map", {"question": query.question, "image": str(query.path)})
                for query in (files.ring, files.cross) * 3
            ]
            concurrent = await asyncio.gather(*calls)
        peaks = [(result.structuredContent or {})["peak"] for result in concurrent]
        assert peaks[:2] * 3 == peaks and all(not result.isError for result in concurrent)


class ScriptedModel(FakeMessagesListChatModel):
    """Replies from a script and records every message list it receives (``bind_tools`` returns itself)."""

    received: list[list[BaseMessage]] = Field(default_factory=list)

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        self.received.append(list(messages))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def tool_call(call_id: str, image: str, question: str) -> AIMessage:
    args = {"question": question, "image": image}
    return AIMessage("", tool_calls=[{"name": "attention_prompt", "args": args, "id": call_id, "type": "tool_call"}])


async def test_langchain_agent_gets_the_prompted_image_through_the_middleware(http_url: str, files: Files) -> None:
    ring = files.ring
    client = MultiServerMCPClient(
        {"api": {"transport": "streamable_http", "url": http_url, "headers": {"Authorization": f"Bearer {TOKEN}"}}}
    )
    with anyio.fail_after(SESSION_TIMEOUT_S):
        tools = await client.get_tools()
        assert sorted(tool.name for tool in tools) == ["attention_map", "attention_prompt"]
        model = ScriptedModel(
            responses=[
                tool_call("c1", str(files.outside), ring.question),  # refused: the agent sees an error, goes on
                tool_call("c2", str(ring.path), ring.question),
                AIMessage("The white ring is on the left."),
            ]
        )
        agent = create_agent(model, tools, middleware=[ImageToolMessageMiddleware()])
        state = await agent.ainvoke({"messages": [HumanMessage("Where is the white ring in scene0.png?")]})
        async with http_session(http_url) as session:
            direct = await session.call_tool("attention_prompt", {"question": ring.question, "image": str(ring.path)})
    assert state["messages"][-1].content == "The white ring is on the left."
    refused, answered = (message for message in state["messages"] if isinstance(message, ToolMessage))
    assert refused.status == "error" and "is not an existing file inside the directories" in str(refused.content)
    assert answered.status == "success"

    last_request = model.received[-1]
    assert isinstance(last_request[-1], HumanMessage)  # the hoisted images, after the tool message
    tool_message = last_request[-2]
    assert isinstance(tool_message, ToolMessage) and tool_message.tool_call_id == "c2"
    assert "peaks at x=" in tool_message.content and "(image 1 is in the next user message)" in tool_message.content
    label, image_block = last_request[-1].content
    assert label["text"] == "Image 1, returned by the attention_prompt tool call c2:"
    assert (image_block["type"], image_block["mime_type"]) == ("image", "image/png")
    assert image_block["base64"] == png_base64(direct)  # the very PNG the MCP server returns


def png_base64(result: CallToolResult) -> str:
    return next(block.data for block in result.content if isinstance(block, ImageContent))
