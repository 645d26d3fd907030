"""Where weights come from: local directories, the local Hugging Face cache, or (online) the hub.

Every loader asks here, so an offline machine fails within seconds with ``WeightsUnavailableError``
saying how to get the weights, instead of spending a minute in download retries.

Example:
    >>> resolve_source("/nonexistent/dir-or-bad id")  # doctest: +SKIP
    Traceback (most recent call last):
    api_tool.errors.UnknownModelError: '/nonexistent/dir-or-bad id' is neither an existing directory nor a hub id ...
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

from api_tool.errors import UnknownModelError, WeightsUnavailableError

HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 5.0
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_source(name: str, example_id: str = "llava-hf/llava-1.5-7b-hf") -> tuple[str, bool]:
    """``(where to load from, local files only)`` for a directory saved with ``save_pretrained`` or a hub
    id, or a clear error before any download is tried (``example_id`` shows the expected form)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{name!r} is a directory without config.json; save the model with save_pretrained")
        return str(path), True
    if not HUB_ID.match(name):
        raise UnknownModelError(f"{name!r} is neither an existing directory nor a hub id like {example_id!r}")
    if hub_cached(name):
        return name, True
    if hub_offline():
        raise WeightsUnavailableError(weights_hint(name, "offline mode is on (HF_HUB_OFFLINE)"))
    probe_hub(name)
    return name, False


def hub_cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether ``filename`` of ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def hub_offline() -> bool:
    """Whether Hugging Face's offline mode is on (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    import huggingface_hub.constants

    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return flag.lower() in ("1", "true", "yes", "on") or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def hub_reachable() -> bool:
    """Whether a TCP connection to the hub opens within ``HUB_PROBE_TIMEOUT_S`` seconds."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_TIMEOUT_S):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])


def probe_hub(repo_id: str) -> None:
    """Raise ``WeightsUnavailableError`` if the hub does not answer within seconds, ``UnknownModelError``
    if it answers that the repository does not exist."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1.0)
    if not outcome:
        raise WeightsUnavailableError(weights_hint(repo_id, "the hub did not answer"))
    error = outcome[0]
    if isinstance(error, GatedRepoError):
        raise WeightsUnavailableError(weights_hint(repo_id, f"the repository is gated ({error})"))
    if isinstance(error, RepositoryNotFoundError):
        raise UnknownModelError(f"{repo_id!r} is not a model on the hub (nor a local directory)")
    if error is not None:
        raise WeightsUnavailableError(weights_hint(repo_id, f"the hub cannot be reached ({type(error).__name__})"))


def weights_hint(name: str, reason: str) -> str:
    """The message of a model whose weights cannot be had here: why, and what to do."""
    return (
        f"the weights of {name!r} are not in the local Hugging Face cache and {reason}. On a connected machine "
        f"run `hf download {name}` and copy ~/.cache/huggingface/hub to this machine, or save the model and "
        "processor with save_pretrained and pass that directory; model 'demo' works offline"
    )
