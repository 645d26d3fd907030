"""A mock vision chat server on 127.0.0.1 for tests and benchmarks: OpenAI's ``/v1/chat/completions`` and
``/v1/models`` (what vLLM, SGLang and LM Studio serve) and Ollama's ``/api/chat`` and ``/api/tags``.

It answers like ``tests.unit_tests.test_eval.RuleTarget``: "Yes, there is." when the last image of the last
message is bright (mean above 150), else "No, there is not."; a verify re-ask (its text holds "FINAL:") gets
"FINAL: yes". Every reply reports token usage. It can wait a fixed ``latency`` before answering and answer
the first ``fail_first`` chat requests with ``fail_status`` (429, 503...) to exercise retries.

Bounded: the server stops by itself ``lifetime`` seconds after it starts (and on leaving the ``with`` block).

Example:
    >>> with MockChatServer(latency=0.05) as server:  # doctest: +SKIP
    ...     target = f"openai:mock@{server.openai_url}"
    ...     ...  # evaluate against it
    ...     server.chat_requests
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

BRIGHT_THRESHOLD = 150.0
MODEL_NAME = "mock"


def rule_reply(text: str, image: Image.Image | None) -> str:
    """The mock's answer to a question ``text`` about ``image`` (see the module docstring)."""
    if "FINAL:" in text:
        return "Looking again at the highlighted part.\nFINAL: yes"
    if image is None:
        return "No image."
    bright = float(np.asarray(image.convert("RGB"), dtype=np.float64).mean()) > BRIGHT_THRESHOLD
    return "Yes, there is." if bright else "No, there is not."


def _decode(data: str) -> Image.Image:
    if data.startswith("data:"):
        data = data.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data)))


def _openai_question(messages: list[dict[str, Any]]) -> tuple[str, Image.Image | None]:
    content = messages[-1].get("content", "")
    if isinstance(content, str):
        return content, None
    texts = [part["text"] for part in content if part.get("type") == "text"]
    images = [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
    return (texts[-1] if texts else ""), (_decode(images[-1]) if images else None)


def _ollama_question(messages: list[dict[str, Any]]) -> tuple[str, Image.Image | None]:
    last = messages[-1]
    images = last.get("images") or []
    return str(last.get("content", "")), (_decode(images[-1]) if images else None)


class MockChatServer:
    """The mock server (see the module docstring), serving from a daemon thread.

    Attributes:
        openai_url: the OpenAI-compatible base URL (``http://127.0.0.1:PORT/v1``).
        ollama_host: the Ollama host (``127.0.0.1:PORT``).
        chat_requests: chat requests received (failed ones included).
    """

    def __init__(
        self, *, latency: float = 0.0, fail_first: int = 0, fail_status: int = 429, lifetime: float = 120.0
    ) -> None:
        self.latency = latency
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.lifetime = lifetime
        self.chat_requests = 0
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        port = self._httpd.server_address[1]
        self.openai_url = f"http://127.0.0.1:{port}/v1"
        self.ollama_host = f"127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="mock-chat-server", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    def start(self) -> MockChatServer:
        """Start serving (and the lifetime timer)."""
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> MockChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self) -> bool:
        """Count a chat request; ``True`` when it must fail."""
        with self._lock:
            self.chat_requests += 1
            return self.chat_requests <= self.fail_first

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any] | str, content_type: str = "application/json") -> None:
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})
                elif self.path.rstrip("/") == "/api/tags":
                    self._send(200, {"models": [{"name": f"{MODEL_NAME}:latest", "model": f"{MODEL_NAME}:latest"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if self.path.rstrip("/") not in ("/v1/chat/completions", "/api/chat"):
                    self._send(404, {"error": "not found"})
                    return
                failing = server._count()
                time.sleep(server.latency)
                if failing:
                    self._send(server.fail_status, {"error": {"message": "try again later", "type": "overloaded"}})
                    return
                if self.path.startswith("/v1/"):
                    text, image = _openai_question(request["messages"])
                    reply = rule_reply(text, image)
                    self._send(
                        200,
                        {
                            "id": f"chatcmpl-{server.chat_requests}",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": request.get("model", MODEL_NAME),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": reply},
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
                        },
                    )
                    return
                text, image = _ollama_question(request["messages"])
                answer = {
                    "model": request.get("model", MODEL_NAME),
                    "created_at": "2024-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": rule_reply(text, image)},
                    "done": True,
                    "done_reason": "stop",
                    "prompt_eval_count": 10,
                    "eval_count": 4,
                }
                self._send(200, json.dumps(answer) + "\n", content_type="application/x-ndjson")

        return Handler
