"""Attributors by name, each loaded once per process and shared.

Specs:

* ``None`` or ``"demo"``: the small CLIP shipped with the package (offline);
* ``"clip:<open_clip name>[@<pretrained tag or checkpoint path>]"``, e.g. ``"clip:ViT-L-14-336@openai"``;
  a bare open_clip name (``"ViT-B-32"``) means the same with ``@openai``;
* ``"local-dir:<path>"``: a local open_clip model directory (``open_clip_config.json`` + weights);
* ``"llava:<hub id | local dir | demo>"``, e.g. ``"llava:llava-hf/llava-1.5-7b-hf"``.

Example:
    >>> from api_tool.backends.registry import get_attributor
    >>> attributor = get_attributor("demo")  # doctest: +SKIP
    >>> attributor is get_attributor("demo")  # doctest: +SKIP
    True
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from api_tool.backends.base import Attributor
from api_tool.errors import UnknownModelError

DEFAULT_SPEC = "demo"
DEFAULT_CLIP_PRETRAINED = "openai"


@dataclass(frozen=True)
class AttributorSpec:
    """A parsed spec: which backend, which model, which weights."""

    backend: str
    model: str
    pretrained: str | None = None

    @classmethod
    def parse(cls, spec: str | None) -> AttributorSpec:
        """Parse a spec string (see the module docstring)."""
        text = (spec or DEFAULT_SPEC).strip()
        if text == "demo":
            return cls("clip", "demo")
        backend, sep, rest = text.partition(":")
        if sep and backend in ("clip", "llava") and rest:
            if backend == "llava":
                return cls("llava", rest)
            model, _, pretrained = rest.partition("@")
            if model == "demo":
                return cls("clip", "demo")
            return cls("clip", model, pretrained or DEFAULT_CLIP_PRETRAINED)
        if text.startswith("local-dir:"):
            return cls("clip", text)
        if "llava" in text.lower():
            return cls("llava", text)
        model, _, pretrained = text.partition("@")
        import open_clip

        if model in open_clip.list_models():
            return cls("clip", model, pretrained or DEFAULT_CLIP_PRETRAINED)
        raise UnknownModelError(
            f"unknown attributor {text!r}; use 'demo', 'clip:<open_clip model>[@<pretrained>]' "
            "or 'llava:<hub id or local dir>'"
        )


_cache: dict[tuple[AttributorSpec, tuple[tuple[str, object], ...]], Attributor] = {}
_lock = threading.Lock()


def get_attributor(spec: str | Attributor | None = None, **options: object) -> Attributor:
    """The attributor for ``spec``, built on first use and shared afterwards.

    ``options`` go to the backend's constructor (``layer``, ``device``, ``combine``...); ``None``
    values mean the backend's default; different options give a different (also cached) instance.
    An ``Attributor`` passed in is returned as is.
    """
    if spec is not None and not isinstance(spec, str):
        return spec
    parsed = AttributorSpec.parse(spec)
    options = {name: value for name, value in options.items() if value is not None}
    key = (parsed, tuple(sorted((name, repr(value)) for name, value in options.items())))
    with _lock:
        if key not in _cache:
            _cache[key] = _build(parsed, options)
        return _cache[key]


def clear_cache() -> None:
    """Forget every shared attributor (frees their models once nothing else holds them)."""
    with _lock:
        _cache.clear()


def _build(spec: AttributorSpec, options: dict[str, object]) -> Attributor:
    if spec.backend == "llava":
        from api_tool.backends.llava import LlavaAttributor

        return LlavaAttributor(model=spec.model, **options)  # type: ignore[arg-type]
    from api_tool.backends.clip import ClipAttributor

    return ClipAttributor(spec.model, pretrained=spec.pretrained, **options)  # type: ignore[arg-type]
