"""Served targets: chat models behind an HTTP server, named by a spec.

* ``openai:MODEL[@BASE_URL]``: any OpenAI-compatible server (vLLM, SGLang, LM Studio, llama.cpp) or
  OpenAI itself. The base URL comes from the spec, else ``OPENAI_BASE_URL``, else OpenAI's. The key comes
  from ``OPENAI_API_KEY``; a server of your own needs none (a placeholder is sent), OpenAI's does.
* ``ollama:MODEL[@HOST]``: an Ollama server; the host comes from the spec, else ``OLLAMA_HOST``, else
  ``127.0.0.1:11434``.

:func:`check_served` asks the server once before a run (its model list), so a wrong address, a refused key
or a model the server does not have fails at once with one line saying what to set
(``TargetUnavailableError``). :class:`ServedChatModel` retries what may pass on a second try (HTTP 408,
409, 429, 5xx, timeouts, dropped connections) with jittered exponential backoff (honouring ``Retry-After``)
and counts requests, retries and tokens for the report.

Example:
    >>> spec = parse_served_spec("openai:Qwen/Qwen2.5-VL-7B-Instruct@http://127.0.0.1:8000/v1")
    >>> spec.provider, spec.model, spec.base_url
    ('openai', 'Qwen/Qwen2.5-VL-7B-Instruct', 'http://127.0.0.1:8000/v1')
    >>> parse_served_spec("ollama:llava:13b@gpu-box:11434").base_url
    'http://gpu-box:11434'
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from pydantic import PrivateAttr

from api_tool.errors import TargetUnavailableError

SERVED_PROVIDERS: tuple[str, ...] = ("openai", "ollama")
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
OLLAMA_DEFAULT_HOST = "http://127.0.0.1:11434"
PLACEHOLDER_API_KEY = "EMPTY"
"""The key sent to an OpenAI-compatible server of your own when ``OPENAI_API_KEY`` is not set (vLLM's convention)."""
RETRY_STATUSES: frozenset[int] = frozenset({408, 409, 429})
"""HTTP statuses retried besides every 5xx."""
USAGE_KEYS: tuple[str, ...] = ("requests", "retries", "failed", "input_tokens", "output_tokens")
"""The counters of :meth:`ServedChatModel.usage`."""


@dataclass(frozen=True)
class ServedSpec:
    """A resolved served-target spec.

    Attributes:
        provider: ``openai`` or ``ollama``.
        model: the model name the server knows.
        base_url: ``http(s)://HOST[:PORT][/PATH]`` (for OpenAI-compatible servers, usually ending in ``/v1``).
        api_key: the key to send (OpenAI-compatible only; never shown in reprs).
    """

    provider: str
    model: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``provider:model@base_url``."""
        return f"{self.provider}:{self.model}@{self.base_url}"


def _split_model_and_address(rest: str, provider: str) -> tuple[str, str | None]:
    """``MODEL@ADDRESS`` -> (model, address). The address starts at the first ``@http://`` or ``@https://``;
    without a scheme (Ollama's ``HOST:PORT``) at the last ``@``."""
    for scheme in ("@http://", "@https://"):
        if scheme in rest:
            model, _, address = rest.partition(scheme[:1])
            return model, address
    if "@" not in rest:
        return rest, None
    if provider == "openai":
        raise TargetUnavailableError(
            f"the base URL after '@' in 'openai:{rest}' must start with http:// or https://; "
            "write openai:MODEL@http://HOST:PORT/v1"
        )
    model, _, address = rest.rpartition("@")
    return model, address


def _checked_url(url: str, spec: str, example: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TargetUnavailableError(f"{url!r} in --target {spec} is not an http(s) address; write {example}")
    return url.rstrip("/")


def parse_served_spec(spec: str, environ: Mapping[str, str] | None = None) -> ServedSpec | None:
    """The served target a spec names, with its address and key resolved (see the module docstring);
    ``None`` when the spec names no served provider (``demo``, a local directory...).

    Raises ``TargetUnavailableError`` for a spec without a model, an address that is not http(s), and
    ``openai:MODEL`` on OpenAI's own server without ``OPENAI_API_KEY``.
    """
    env = os.environ if environ is None else environ
    provider, sep, rest = spec.partition(":")
    if not sep or provider not in SERVED_PROVIDERS:
        return None
    model, address = _split_model_and_address(rest, provider)
    if not model.strip():
        raise TargetUnavailableError(f"--target {spec} names no model; write {provider}:MODEL[@ADDRESS]")
    if provider == "openai":
        example = f"openai:{model}@http://HOST:PORT/v1"
        base_url = _checked_url(address or env.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL, spec, example)
        key = env.get("OPENAI_API_KEY")
        if not key:
            if urlsplit(base_url).hostname == urlsplit(OPENAI_DEFAULT_BASE_URL).hostname:
                raise TargetUnavailableError(
                    f"--target openai:{model} on api.openai.com needs OPENAI_API_KEY: set it, or point at your "
                    f"own server with --target {example} (or OPENAI_BASE_URL)"
                )
            key = PLACEHOLDER_API_KEY
        return ServedSpec("openai", model, base_url, key)
    host = address or env.get("OLLAMA_HOST") or OLLAMA_DEFAULT_HOST
    if "://" not in host:
        host = f"http://{host}"
    return ServedSpec("ollama", model, _checked_url(host, spec, f"ollama:{model}@HOST:PORT"), None)


def _served_models(spec: ServedSpec, timeout: float) -> list[str] | None:
    """The model names the server lists; ``None`` when it has no list to give (an endpoint it lacks)."""
    import httpx

    if spec.provider == "openai":
        url, headers = f"{spec.base_url}/models", {"Authorization": f"Bearer {spec.api_key}"}
    else:
        url, headers = f"{spec.base_url}/api/tags", {}
    response = httpx.get(url, headers=headers, timeout=timeout)
    if response.status_code in (401, 403):
        raise TargetUnavailableError(
            f"{spec.base_url} refused the key (HTTP {response.status_code}); set OPENAI_API_KEY to a key it accepts"
        )
    if response.status_code != 200:
        return None
    try:
        body = response.json()
        if spec.provider == "openai":
            return [str(entry["id"]) for entry in body["data"]]
        return [str(entry.get("name") or entry["model"]) for entry in body["models"]]
    except (ValueError, KeyError, TypeError):
        return None


def _same_ollama_model(wanted: str, listed: str) -> bool:
    return wanted == listed or (":" not in wanted and listed == f"{wanted}:latest")


def check_served(spec: ServedSpec, timeout: float = 5.0) -> None:
    """Ask the server for its models once: raise ``TargetUnavailableError`` (one line, what to set) when it
    cannot be reached, refuses the key, or lists models without ``spec.model``. A server without a model
    list passes.

    Example:
        >>> check_served(parse_served_spec("openai:qwen@http://127.0.0.1:9/v1"))  # doctest: +SKIP
        TargetUnavailableError: cannot reach http://127.0.0.1:9/v1 (ConnectError: ...); start the server ...
    """
    import httpx

    try:
        models = _served_models(spec, timeout)
    except httpx.HTTPError as exc:
        if spec.provider == "openai":
            fix = f"--target openai:{spec.model}@http://HOST:PORT/v1 (or OPENAI_BASE_URL)"
        else:
            fix = f"--target ollama:{spec.model}@HOST:PORT (or OLLAMA_HOST); start it with `ollama serve`"
        reason = str(exc).splitlines()[0] if str(exc) else "no answer"
        raise TargetUnavailableError(
            f"cannot reach {spec.base_url} ({type(exc).__name__}: {reason}); start the server or set its address: {fix}"
        ) from None
    if models is None:
        return
    if spec.provider == "openai":
        found = spec.model in models
    else:
        found = any(_same_ollama_model(spec.model, name) for name in models)
    if not found:
        shown = ", ".join(models[:8]) + (", ..." if len(models) > 8 else "")
        hint = f"run `ollama pull {spec.model}` or choose" if spec.provider == "ollama" else "choose"
        raise TargetUnavailableError(
            f"{spec.base_url} does not serve model {spec.model!r}; {hint} one of: {shown or 'none listed'}"
        )


def is_retryable(exc: BaseException) -> bool:
    """Whether a failed request may pass when sent again: HTTP 408/409/429/5xx, a timeout, a dropped or
    refused connection.

    Example:
        >>> is_retryable(TimeoutError()), is_retryable(ValueError("bad request"))
        (True, False)
    """
    status = getattr(exc, "status_code", None)
    if status is None:
        status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return status in RETRY_STATUSES or status >= 500
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    import httpx

    if isinstance(exc, httpx.TransportError):
        return True
    try:
        import openai
    except ImportError:  # pragma: no cover - only without langchain-openai
        return False
    return isinstance(exc, openai.APIConnectionError)


def retry_delay(attempt: int, exc: BaseException, base: float, cap: float) -> float:
    """Seconds to wait before retry ``attempt`` (0 for the first): the server's ``Retry-After`` when it
    gives one, else ``min(cap, base * 2**attempt)`` scaled by a random factor in [0.5, 1) (jitter, so that
    many clients do not retry in step)."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is not None:
        try:
            return min(cap, max(0.0, float(headers.get("retry-after"))))
        except (TypeError, ValueError):
            pass
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)


class ServedChatModel(BaseChatModel):
    """A served chat model with retries and usage counts: each call goes to ``inner`` (``ChatOpenAI`` or
    ``ChatOllama``, built without retries of their own) and is sent again after a jittered exponential
    backoff while :func:`is_retryable` says so, at most ``max_retries`` times.

    Attributes:
        inner: the provider's chat model.
        model: ``provider:model@base_url`` (how the target is named).
        max_retries: most retries of one call.
        backoff_base, backoff_max: first delay and largest delay, in seconds.
    """

    inner: BaseChatModel
    model: str
    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    _usage: dict[str, int] = PrivateAttr(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "served"

    def _count(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._usage[key] += value

    def usage(self) -> dict[str, int]:
        """Requests sent (retries included), retries, calls that failed for good, input and output tokens."""
        with self._lock:
            return dict(self._usage)

    def take_usage(self) -> dict[str, int]:
        """:meth:`usage` since the last call, then zero the counters."""
        with self._lock:
            taken = dict(self._usage)
            self._usage = dict.fromkeys(USAGE_KEYS, 0)
        return taken

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        attempt = 0
        while True:
            self._count(requests=1)
            try:
                message = self.inner.invoke(messages, stop=stop, **kwargs)
            except Exception as exc:
                if attempt >= self.max_retries or not is_retryable(exc):
                    self._count(failed=1)
                    raise
                self._count(retries=1)
                time.sleep(retry_delay(attempt, exc, self.backoff_base, self.backoff_max))
                attempt += 1
                continue
            usage = getattr(message, "usage_metadata", None) or {}
            tokens_in, tokens_out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
            self._count(input_tokens=tokens_in, output_tokens=tokens_out)
            return ChatResult(generations=[ChatGeneration(message=message)])


def served_chat_model(
    spec: ServedSpec, *, max_tokens: int | None = None, timeout: float = 120.0, max_retries: int = 5
) -> ServedChatModel:
    """The chat model of a served spec (greedy: temperature 0), with retries and usage counts.

    ``timeout`` bounds one request in seconds; a request that times out is retried.

    Example:
        >>> target = served_chat_model(parse_served_spec("openai:qwen@http://127.0.0.1:8000/v1"))  # doctest: +SKIP
    """
    inner: BaseChatModel
    if spec.provider == "openai":
        try:
            from langchain_openai import ChatOpenAI
        except ImportError as exc:
            raise TargetUnavailableError("--target openai:... needs `pip install langchain-openai`") from exc
        extra: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens is not None else {}
        inner = ChatOpenAI(
            model=spec.model,
            base_url=spec.base_url,
            api_key=spec.api_key,  # type: ignore[arg-type]
            temperature=0,
            max_retries=0,
            timeout=timeout,
            **extra,
        )
    else:
        try:
            from langchain_ollama import ChatOllama
        except ImportError as exc:
            raise TargetUnavailableError("--target ollama:... needs `pip install langchain-ollama`") from exc
        extra = {"num_predict": max_tokens} if max_tokens is not None else {}
        inner = ChatOllama(
            model=spec.model, base_url=spec.base_url, temperature=0, client_kwargs={"timeout": timeout}, **extra
        )
    return ServedChatModel(inner=inner, model=spec.label, max_retries=max_retries)
