"""One image pass per image for an LVLM's answer and the self-map that explains it.

The self-map of a given answer (teacher forcing) runs the model over prompt + answer up to the probed
block. The language-model part is short; the image encoder is not (Qwen2.5-VL-7B's 32-block ViT on a
1280 x 960 photo costs more than the prefill). When the answer was just generated from the same image,
that encoder output already exists: ``share_image_features(model)`` memoises the vision tower (the inner
model's ``visual``, ``vision_tower`` or ``vision_model``) so the next call with the very same inputs
returns its output instead of recomputing. The tower, not ``get_image_features``, because generation
and a plain forward pass reach the tower through the same code with the same arguments.

Safety: the cache answers only when gradients are off and the model is in eval mode (training or a
backward pass always runs the encoder), and only for inputs *equal* to a cached call's (tensors compared
with ``torch.equal`` after a cheap shape/dtype/device match; other arguments compared by value), and it
hands out a shallow copy of the output each time (callers reassign its fields). It keeps
the last ``capacity`` calls (their inputs and outputs) and is cleared by ``clear()``. It is installed on
the tower itself (an instance ``forward`` over the class's method), so every caller of that model shares
it: a ``ChatTransformersVLM`` answering and an ``LvlmAttributor`` scoring that answer.

Example:
    >>> cache = share_image_features(model)  # doctest: +SKIP
    >>> model.generate(**inputs)  # the image encoder runs  # doctest: +SKIP
    >>> attributor.attribute(image, question, answer=answer)  # reuses its output  # doctest: +SKIP
    >>> cache.hits  # doctest: +SKIP
    1
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_CAPACITY = 2
VISION_MODULE_NAMES: tuple[str, ...] = ("visual", "vision_tower", "vision_model")
"""Where transformers' image-text-to-text models keep their vision tower (Qwen-VL; LLaVA, Gemma 3,
InternVL; Idefics3 / SmolVLM)."""


@dataclass(frozen=True)
class _Call:
    """One memoised call: its arguments by parameter name and what it returned."""

    arguments: dict[str, Any]
    result: Any


def same_value(first: Any, second: Any) -> bool:
    """Equal values: tensors of one shape, dtype and device with equal elements; containers item by item;
    anything else by ``==``.

    Example:
        >>> same_value({"ids": torch.tensor([1, 2])}, {"ids": torch.tensor([1, 2])}), same_value([1], (1,))
        (True, False)
    """
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return (
            isinstance(first, torch.Tensor)
            and isinstance(second, torch.Tensor)
            and first.shape == second.shape
            and first.dtype == second.dtype
            and first.device == second.device
            and bool(torch.equal(first, second))
        )
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(map(same_value, first, second))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_value(first[key], second[key]) for key in first)
    try:
        return bool(first == second)
    except (TypeError, ValueError, RuntimeError):
        return first is second


class ImageFeatureCache:
    """A memo of one model's image encoder (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, encode: Callable[..., Any], capacity: int = DEFAULT_CAPACITY) -> None:
        self.model = model
        self.encode = encode
        self.capacity = capacity
        self.__signature__ = inspect.signature(encode)
        self.hits = 0
        self.misses = 0
        self._calls: list[_Call] = []
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The tower's ``forward(*args, **kwargs)``, from the memo when an equal call is held."""
        if torch.is_grad_enabled() or self.model.training:
            return self.encode(*args, **kwargs)
        arguments = dict(self.__signature__.bind(*args, **kwargs).arguments)  # positional or keyword alike
        with self._lock:
            for call in self._calls:
                if same_value(call.arguments, arguments):
                    self.hits += 1
                    return copy.copy(call.result)
        result = self.encode(*args, **kwargs)
        with self._lock:
            self.misses += 1
            self._calls = [_Call(arguments, copy.copy(result)), *self._calls][: self.capacity]
        return result

    def clear(self) -> None:
        """Forget every memoised call (frees their tensors)."""
        with self._lock:
            self._calls = []


def vision_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision tower of an HF image-text-to-text model, or ``None`` when it has none by a known name."""
    inner = getattr(model, "model", None)
    for name in VISION_MODULE_NAMES:
        module = getattr(inner, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def share_image_features(model: torch.nn.Module, capacity: int = DEFAULT_CAPACITY) -> ImageFeatureCache | None:
    """The vision-tower memo of ``model``, installed on first use and shared afterwards; ``None`` for a
    model without a known vision tower."""
    tower = vision_module(model)
    if tower is None:
        return None
    current = tower.forward
    if isinstance(current, ImageFeatureCache):
        return current
    cache = ImageFeatureCache(model, current, capacity)
    tower.forward = cache  # type: ignore[method-assign]
    return cache
