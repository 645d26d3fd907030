"""The contract every attribution backend fulfils, and the checks all backends share."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from api_tool.errors import DeviceUnavailableError, InvalidQueryError, LayerOutOfRangeError
from api_tool.images import ImageRef
from api_tool.maps import AttributionMap


@runtime_checkable
class Attributor(Protocol):
    """Scores how much each image region matters for a text query.

    ``attribute_batch`` pairs ``images[i]`` with ``queries[i]`` and runs them as one batch;
    ``attribute_many`` asks several questions about one image and pays for the image once.
    """

    name: str

    def attribute(self, image: ImageRef, query: str) -> AttributionMap:
        """The map for one image and one query."""
        ...

    def attribute_batch(self, images: Sequence[ImageRef], queries: Sequence[str]) -> list[AttributionMap]:
        """One map per ``(images[i], queries[i])`` pair."""
        ...

    def attribute_many(self, image: ImageRef, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per query, all on the same image."""
        ...


def default_device() -> torch.device:
    """CUDA if available, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_devices() -> list[str]:
    """The torch devices this machine has, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (``None``: the best available), or ``DeviceUnavailableError`` naming the
    devices that exist when ``device`` is malformed or absent from this machine.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if device is None:
        return default_device()
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceUnavailableError(
            f"{device!r} is not a torch device; use one of {', '.join(available_devices())}"
        ) from None
    present = (
        chosen.type == "cpu"
        or (chosen.type == "cuda" and torch.cuda.is_available() and (chosen.index or 0) < torch.cuda.device_count())
        or (chosen.type == "mps" and str(chosen) in ("mps", "mps:0") and "mps" in available_devices())
    )
    if not present:
        raise DeviceUnavailableError(
            f"device {str(chosen)!r} is not available on this machine; available: {', '.join(available_devices())}"
        )
    return chosen


def resolve_layer(layer: int, num_blocks: int, what: str = "transformer") -> int:
    """A non-negative block index into ``num_blocks`` blocks, or ``LayerOutOfRangeError``."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -num_blocks <= layer < num_blocks:
        raise LayerOutOfRangeError(
            f"layer {layer!r} is out of range for a {what} with {num_blocks} blocks; "
            f"use 0..{num_blocks - 1} or -{num_blocks}..-1"
        )
    return layer % num_blocks


def check_query(query: object) -> str:
    """The stripped query, or ``InvalidQueryError`` for a non-string or blank one."""
    if not isinstance(query, str):
        raise InvalidQueryError(f"the query must be a string, got {type(query).__name__}")
    stripped = query.strip()
    if not stripped:
        raise InvalidQueryError("the query is empty; ask a question about the image, e.g. 'where is the cat?'")
    return stripped


_model_locks: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_model_locks_guard = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The one lock of ``model``: held while a hook is on it or it runs for someone who shares it.

    Attribution hooks live on the model itself, so an attributor and a chat model that share one model
    (self-reflection) must not run it at the same time from different threads.
    """
    with _model_locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.RLock()
        return lock
