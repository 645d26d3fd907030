"""``api-prompt serve``: attention prompting as an MCP server, for any host that calls tools over the Model
Context Protocol (Claude Desktop, Cursor, VS Code, LangChain through ``langchain-mcp-adapters``).

Usage:
    api-prompt serve [--root DIR ...] [--allow-remote] [--model SPEC ...] [--device cpu|cuda]
                     [--http [HOST]:PORT] [--token TOKEN] [--max-pixels N] [--max-question-chars N]
                     [--timeout SECONDS] [--max-side PIXELS]
    python -m api_tool.mcp_server ...                      the same, without the ``api-prompt`` front

Transports: stdio by default (the host starts the server as a subprocess and speaks on its stdin/stdout);
with ``--http HOST:PORT`` streamable HTTP at ``http://HOST:PORT/mcp`` (HOST defaults to 127.0.0.1, e.g.
``--http :8765``; port 0 takes a free port). The URL is printed on stderr once the socket listens. Over HTTP,
``--token`` or the environment variable ``API_PROMPT_MCP_TOKEN`` (which keeps the token out of the process
list) makes every request need ``Authorization: Bearer <token>``; any other gets 401. On loopback the SDK's
DNS-rebinding protection also checks the ``Host`` and ``Origin`` headers.

Tools:

* ``attention_prompt(question, image, style="gray", model=None)``: the prompted image (PNG, longest side at
  most ``--max-side``) as image content, then a short text: where the map peaks in pixels of the original
  image, the attended box (``mask >= 0.5``), the share of the image it covers and the timings.
* ``attention_map(question, image, model=None)``: the mask as a grayscale PNG (255 = attended, the image's
  aspect, longest side at most ``--max-side``) and, as JSON (a text block and ``structuredContent``), the same
  summary plus the grid values (``grid_values``, rows x cols in [0, 1]) and where the image lies on that grid
  (``grid_box``, in patch units), for clients that draw their own overlays.

``image`` is a data URI, a base64 string, a file path inside one of the ``--root`` directories (resolved with
symlinks followed: ``..``, links out and ``file:`` URIs are refused; no roots, no paths) or, only with
``--allow-remote``, an http(s) URL: the policy of ``api_tool.image_refs``, shared with the LangChain tool.
``model`` is one of the ``--model`` specs (default: the first; ``demo``, the offline demo CLIP, unless
given). Each model loads once, on first use, through ``api_tool.backends.registry`` and is shared by every
session and call; while it loads the call sends progress notifications (every second) to a client that
asked for them. Calls run in worker threads, so sessions are served concurrently; the attributors
serialise the passes over one model themselves.

Limits: image pixels (``--max-pixels``, checked from the header before decoding), question length
(``--max-question-chars``), inline image size (``MAX_IMAGE_ARGUMENT_CHARS``) and seconds per call
(``--timeout``; a first call's model load is not counted). A call over a limit, or with a bad argument (a
refused or missing path, not an image, an empty question, an unknown style or model), answers with a tool
error (``isError``) that says what was wrong; the server goes on serving. A call past ``--timeout`` answers
at once, while its pass finishes in the background (a forward pass cannot be interrupted) before the model
takes the next one.

Example:
    >>> from api_tool.mcp_server import ServerConfig, create_server
    >>> server = create_server(ServerConfig(roots=("~/Pictures",)))  # doctest: +SKIP
    >>> server.run("stdio")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import io
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydantic import Field, WithJsonSchema

try:
    from mcp.server.fastmcp import Context, FastMCP
    from mcp.server.fastmcp.exceptions import ToolError
    from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Receive, Scope, Send
except ModuleNotFoundError as missing:  # the `mcp` extra is optional; mcp 2 renamed FastMCP
    raise ModuleNotFoundError(
        f"api-prompt serve needs the MCP Python SDK 1.x ({missing}); install it with "
        "pip install 'langchain-api-prompting[mcp]' (mcp>=1.29,<2)"
    ) from missing

from api_tool.backends.base import Attributor, check_query, resolve_device
from api_tool.backends.registry import AttributorSpec, get_attributor
from api_tool.errors import ApiPromptingError, ImageTooLargeError, InvalidParameterError, InvalidQueryError
from api_tool.image_refs import load_named_image, reference_kind, resolve_allowed_dirs
from api_tool.images import encode_image
from api_tool.prompt import PromptedImage, attention_prompt
from api_tool.render import Style
from api_tool.summary import map_summary

SERVER_NAME = "api-prompting"
TOKEN_ENV = "API_PROMPT_MCP_TOKEN"
HTTP_PATH = "/mcp"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_MAX_QUESTION_CHARS = 1_000
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_MAX_SIDE = 1024
MAX_IMAGE_ARGUMENT_CHARS = 48 * 2**20
"""Longest ``image`` argument accepted (a data URI or base64 string of a ~36 MB file); the HTTP transport's
request-body limit is raised to fit it."""
PROGRESS_INTERVAL_S = 1.0
GRID_DECIMALS = 4
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

IMAGE_DESCRIPTION = (
    "The image: a data URI (data:image/png;base64,...) or a base64 string; a file path only inside the "
    "directories the server was started with (--root); an http(s) URL only if the server allows remote images."
)
QUESTION_DESCRIPTION = "The question about the image, or the thing to look for, e.g. 'where is the red car?'"
MODEL_DESCRIPTION = "Which attention model to use; leave it out for the server's default (see the tool description)."
STYLE_DESCRIPTION = (
    "How the attention is drawn: gray (the paper: unattended regions fade to black), heatmap (a colour "
    "overlay), crop (the attended region only), contour (its outline on the unchanged image) or zoom (the "
    "attended region enlarged to 336x336 px, for small details in large images; its box is in the text)."
)


@dataclass(frozen=True)
class ServerConfig:
    """What ``api-prompt serve`` serves and within which limits (the command's flags, see the module docstring);
    ``host`` is where HTTP binds (on loopback the SDK checks the ``Host`` and ``Origin`` headers).

    Example:
        >>> ServerConfig(models=("demo",), timeout_s=30.0).max_side
        1024
    """

    roots: tuple[str | Path, ...] = ()
    allow_remote: bool = False
    models: tuple[str, ...] = ("demo",)
    device: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_side: int = DEFAULT_MAX_SIDE
    host: str = DEFAULT_HOST

    def __post_init__(self) -> None:
        if not self.models:
            raise InvalidParameterError("serve at least one model (--model demo)")
        for name in ("max_pixels", "max_question_chars", "max_side"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise InvalidParameterError(f"timeout_s must be a positive number of seconds, got {self.timeout_s}")


@dataclass
class _Computed:
    """One call's map, with the spec of the model that made it and the timings of the call's stages."""

    result: PromptedImage
    model: str
    image: str
    timings: dict[str, float]


class AttentionServer:
    """The two tools over one set of models, roots and limits; ``create_server`` registers them on a FastMCP.

    Example:
        >>> tools = AttentionServer(ServerConfig())
        >>> tools.default_model, tools.roots
        ('demo', [])
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.roots = resolve_allowed_dirs(config.roots, what="--root")
        for spec in config.models:
            AttributorSpec.parse(spec)  # an unknown name fails at start, not at the first call
        self.device = str(resolve_device(config.device)) if config.device is not None else None
        self.default_model = config.models[0]
        self._loaded: dict[str, Attributor] = {}
        self._hint = (
            "Pass the image inline, as a data URI or base64 string."
            if not self.roots
            else "Pass the image inline (a data URI or base64 string), or a path inside those directories."
        )

    def describe(self) -> str:
        """The instructions a client reads: what the server reads and which models it serves."""
        roots = ", ".join(str(root) for root in self.roots) or "none (inline images only)"
        return (
            "Attention Prompting on Image: fade what a question does not point at, so a vision-language model "
            f"looks at the right place. Models: {', '.join(self.config.models)} (default {self.default_model}). "
            f"Image folders: {roots}. Remote images: {'allowed' if self.config.allow_remote else 'not allowed'}."
        )

    async def attention_prompt(
        self,
        question: Annotated[str, Field(description=QUESTION_DESCRIPTION)],
        image: Annotated[str, Field(description=IMAGE_DESCRIPTION)],
        ctx: Context,
        style: Annotated[Style, Field(description=STYLE_DESCRIPTION)] = "gray",
        model: Annotated[str | None, WithJsonSchema({"type": "string"}), Field(description=MODEL_DESCRIPTION)] = None,
    ) -> CallToolResult:
        """Attention prompting: the image with the regions relevant to the question kept and the rest faded,
        plus where the attention peaks and the attended box in pixels. Use it when the answer depends on a
        detail, a count, a colour or whether something is present, or when you are unsure; then look again
        at the returned image."""
        computed = await self._compute(question, image, model, style, ctx)
        start = time.perf_counter()
        data, mime_type = encode_image(computed.result.image, format="PNG", max_side=self.config.max_side)
        computed.timings["encode"] = time.perf_counter() - start
        summary = map_summary(computed.result, image=computed.image, question=question, model=computed.model)
        width, height = summary["image_size"]
        x0, y0, x1, y1 = summary["box"]
        peak = summary["peak"]
        stages = ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in computed.timings.items())
        text = (
            f"Attention for {question.strip()!r} (model {computed.model}, style {style}) on the {width}x{height} "
            f"image: the map peaks at x={peak['x']}, y={peak['y']} px; the attended box (mask >= 0.5) is "
            f"x {x0}-{x1}, y {y0}-{y1} px, {summary['attended_fraction']:.1%} of the image. The prompted image "
            f"follows; check your answer against the highlighted regions. Timings: {stages}."
        )
        if "crop_box" in summary:
            cx0, cy0, cx1, cy1 = summary["crop_box"]
            text += f" The image shows x {cx0}-{cx1}, y {cy0}-{cy1} px of the original."
        return CallToolResult(
            content=[TextContent(type="text", text=text), ImageContent(type="image", data=data, mimeType=mime_type)]
        )

    async def attention_map(
        self,
        question: Annotated[str, Field(description=QUESTION_DESCRIPTION)],
        image: Annotated[str, Field(description=IMAGE_DESCRIPTION)],
        ctx: Context,
        model: Annotated[str | None, WithJsonSchema({"type": "string"}), Field(description=MODEL_DESCRIPTION)] = None,
    ) -> CallToolResult:
        """The raw attention map for a question, for drawing your own overlay: the mask as a grayscale PNG
        (255 = attended; the image's aspect) and JSON with where it peaks, the attended box in pixels of the
        original image, and the map's values on the model's patch grid with where the image lies on it."""
        computed = await self._compute(question, image, model, "gray", ctx)
        start = time.perf_counter()
        mask_png, mask_size = _mask_png(computed.result.mask, self.config.max_side)
        computed.timings["encode"] = time.perf_counter() - start
        attribution = computed.result.map
        summary = map_summary(computed.result, image=computed.image, question=question, model=computed.model)
        summary |= {
            "mask_png_size": list(mask_size),
            "grid_box": [round(float(v), GRID_DECIMALS) for v in attribution.grid_box],
            "grid_values": np.round(attribution.mask.astype(np.float64), GRID_DECIMALS).tolist(),
            "timings": {stage: round(seconds, 6) for stage, seconds in computed.timings.items()},
        }
        return CallToolResult(
            content=[
                ImageContent(type="image", data=mask_png, mimeType="image/png"),
                TextContent(type="text", text=json.dumps(summary)),
            ],
            structuredContent=summary,
        )

    async def _compute(self, question: str, image: str, model: str | None, style: Style, ctx: Context) -> _Computed:
        """Check the arguments, have the model, and make the map and prompted image within the time limit."""
        question = self._checked_question(question)
        if len(image) > MAX_IMAGE_ARGUMENT_CHARS:
            raise ImageTooLargeError(
                f"the image argument is {len(image):,} characters long, over this server's limit of "
                f"{MAX_IMAGE_ARGUMENT_CHARS:,}; send a smaller image"
            )
        spec = model.strip() if model is not None and model.strip() else self.default_model
        if spec not in self.config.models:
            raise InvalidParameterError(
                f"this server does not serve the model {spec[:100]!r}; it serves {', '.join(self.config.models)} "
                f"(leave `model` out for {self.default_model})"
            )
        timings: dict[str, float] = {}
        attributor = await self._attributor(spec, ctx, timings)
        work = asyncio.to_thread(self._prompt, image, question, attributor, style)
        try:
            result, read_seconds = await asyncio.wait_for(work, self.config.timeout_s)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            raise ToolError(
                f"the call took longer than this server's limit of {self.config.timeout_s:g} s per call "
                "(--timeout); try a smaller image, or ask the server's owner to raise the limit"
            ) from None
        timings["read_image"] = read_seconds
        timings |= {stage: seconds for stage, seconds in result.timings.items() if stage not in ("load", "total")}
        return _Computed(result=result, model=spec, image=_describe_reference(image), timings=timings)

    def _checked_question(self, question: str) -> str:
        stripped = check_query(question)
        if len(stripped) > self.config.max_question_chars:
            raise InvalidQueryError(
                f"the question is {len(stripped):,} characters long, over this server's limit of "
                f"{self.config.max_question_chars:,}; ask a shorter question"
            )
        return stripped

    def _prompt(self, image: str, question: str, attributor: Attributor, style: Style) -> tuple[PromptedImage, float]:
        """In a worker thread: read the image by the server's policy, then attribute and render."""
        start = time.perf_counter()
        loaded = load_named_image(
            image,
            allowed_dirs=self.roots,
            allow_remote=self.config.allow_remote,
            max_pixels=self.config.max_pixels,
            hint=self._hint,
        )
        read_seconds = time.perf_counter() - start
        return attention_prompt(loaded, question, attributor, style), read_seconds

    async def _attributor(self, spec: str, ctx: Context, timings: dict[str, float]) -> Attributor:
        """The shared attributor for ``spec``; loading it (first use) reports progress every second."""
        if spec in self._loaded:
            return self._loaded[spec]
        start = time.perf_counter()
        await ctx.report_progress(0.0, message=f"loading the model {spec!r} (first use)")
        loading = asyncio.ensure_future(asyncio.to_thread(get_attributor, spec, device=self.device))
        while not (await asyncio.wait({loading}, timeout=PROGRESS_INTERVAL_S))[0]:
            elapsed = time.perf_counter() - start
            await ctx.report_progress(elapsed, message=f"loading the model {spec!r}: {elapsed:.0f} s")
        attributor = self._loaded.setdefault(spec, loading.result())
        timings["model_load"] = time.perf_counter() - start
        loaded = f"model {spec!r} loaded in {timings['model_load']:.1f} s"
        await ctx.report_progress(timings["model_load"], message=loaded)
        return attributor


def _describe_reference(image: str) -> str:
    """The ``image`` field of a summary: a path or URL as given, an inline image by its size."""
    text = image.strip()
    if reference_kind(text) in ("data_uri", "base64"):
        return f"inline image ({len(text):,} characters)"
    return text[:1000]


def _mask_png(mask: NDArray[np.floating], max_side: int) -> tuple[str, tuple[int, int]]:
    """``(base64 PNG, (width, height))`` of ``mask`` as 8-bit gray, shrunk to ``max_side`` if larger."""
    picture = Image.fromarray(np.rint(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), picture.size


def create_server(config: ServerConfig) -> FastMCP:
    """A FastMCP server with the two tools, not yet running (``.run("stdio")``, ``.streamable_http_app()``).

    Raises ``InvalidParameterError`` / ``UnknownModelError`` / ``DeviceUnavailableError`` for a bad config
    (a root that is no directory, an unknown model, a missing device).

    Example:
        >>> server = create_server(ServerConfig(models=("demo",)))
        >>> server.name
        'api-prompting'
    """
    tools = AttentionServer(config)
    server = FastMCP(
        SERVER_NAME,
        instructions=tools.describe(),
        host=config.host,
        max_request_body_size=MAX_IMAGE_ARGUMENT_CHARS + 2**20,
        streamable_http_path=HTTP_PATH,
        log_level="WARNING",
    )
    annotations = ToolAnnotations(readOnlyHint=True, idempotentHint=True, openWorldHint=config.allow_remote)
    for function in (tools.attention_prompt, tools.attention_map):
        server.add_tool(
            function,
            description=f"{function.__doc__} Models: {', '.join(config.models)} (default {tools.default_model}).",
            annotations=annotations,
            structured_output=False,
        )
    return server


class BearerTokenMiddleware:
    """ASGI middleware: an HTTP request without ``Authorization: Bearer <token>`` gets 401 (compared in
    constant time); other scopes (lifespan) pass.

    Example:
        >>> app = BearerTokenMiddleware(create_server(ServerConfig()).streamable_http_app(), "s3cret")  # doctest: +SKIP
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or pass on one request."""
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = JSONResponse(
                    {"error": "invalid_token", "error_description": "send Authorization: Bearer <token>"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="api-prompt"'},
                )
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``api-prompt serve``."""
    parser = argparse.ArgumentParser(
        prog="api-prompt serve",
        description="Serve attention prompting over MCP (stdio by default, streamable HTTP with --http).",
    )
    parser.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="DIR",
        help="a directory whose image files clients may name by path (repeatable); without any, only inline images",
    )
    parser.add_argument("--allow-remote", action="store_true", help="let clients pass http(s) image URLs")
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="SPEC",
        help="a model clients may use (repeatable; the first is the default): 'demo' (offline, the default), "
        "'clip:ViT-L-14-336@openai', 'lvlm:<hub id or dir>', ...",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    parser.add_argument(
        "--http",
        default=None,
        metavar="[HOST]:PORT",
        help=f"serve streamable HTTP at http://HOST:PORT{HTTP_PATH} instead of stdio (HOST: {DEFAULT_HOST})",
    )
    parser.add_argument(
        "--token",
        default=None,
        help=f"with --http, require 'Authorization: Bearer TOKEN' (or set {TOKEN_ENV}, which ps does not show)",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image, in pixels")
    parser.add_argument(
        "--max-question-chars", type=int, default=DEFAULT_MAX_QUESTION_CHARS, help="longest question, in characters"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per call (a model's first load not counted)"
    )
    parser.add_argument(
        "--max-side", type=int, default=DEFAULT_MAX_SIDE, help="longest side of the returned images, in pixels"
    )
    return parser


def parse_http_address(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1).

    Example:
        >>> parse_http_address(":8765"), parse_http_address("[::1]:0")
        (('127.0.0.1', 8765), ('::1', 0))
    """
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or int(port) > 65535:
        raise InvalidParameterError(f"--http {text!r}: give HOST:PORT, e.g. 127.0.0.1:8765 (port 0: any free port)")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``api-prompt serve``; returns the exit status once the server stops (0)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.token is not None and args.http is None:
        parser.error("--token applies to --http only (over stdio only the host that started the server talks to it)")
    try:
        host, port = parse_http_address(args.http) if args.http is not None else (DEFAULT_HOST, 0)
        config = ServerConfig(
            roots=tuple(args.root),
            allow_remote=args.allow_remote,
            models=tuple(dict.fromkeys(args.models or ["demo"])),
            device=args.device,
            max_pixels=args.max_pixels,
            max_question_chars=args.max_question_chars,
            timeout_s=args.timeout,
            max_side=args.max_side,
            host=host,
        )
        server = create_server(config)
    except ApiPromptingError as exc:
        parser.error(str(exc))
    if args.http is None:
        server.run("stdio")
        return 0
    return _serve_http(server, host, port, token)


def _serve_http(server: FastMCP, host: str, port: int, token: str | None) -> int:
    """Serve streamable HTTP on ``host:port`` until interrupted; the URL goes to stderr once it listens."""
    import uvicorn

    app: ASGIApp = server.streamable_http_app()
    if token is not None:
        app = BearerTokenMiddleware(app, token)
    elif host not in _LOOPBACK_HOSTS:
        _say(f"warning: serving {host} without --token: anyone who can reach this port can use the server")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(128)  # connections made before uvicorn accepts wait in the backlog
    bound_port = listener.getsockname()[1]
    _say(f"listening on http://{f'[{host}]' if ':' in host else host}:{bound_port}{HTTP_PATH}")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def _say(message: str) -> None:
    print(f"api-prompt serve: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
