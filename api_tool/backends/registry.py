"""Attributors by name, each loaded once per process and shared.

Specs:

* ``None`` or ``"demo"``: the small CLIP shipped with the package (offline);
* ``"demo-siglip"``: the second shipped demo, SigLIP-style (sigmoid loss, attention-pool head; offline);
* ``"clip:<open_clip name>[@<pretrained tag or checkpoint path>]"``, e.g. ``"clip:ViT-L-14-336@openai"``,
  ``"clip:ViT-B-16-SigLIP2@/models/siglip2.pt"``; without a tag, ``openai`` where the model has it, else
  its first published tag (``webli`` for SigLIP); a bare open_clip name (``"ViT-B-32"``) means the same;
* ``"local-dir:<path>"``: a local open_clip model directory (``open_clip_config.json`` + weights);
* ``"hf:<hub id | local dir>"``: a transformers ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` with its
  processor (``save_pretrained`` directory), e.g. ``"hf:google/siglip2-base-patch16-naflex"``;
* ``"llava:<hub id | local dir | demo>"``, e.g. ``"llava:llava-hf/llava-1.5-7b-hf"`` (LLaVA-1.5 only);
* ``"lvlm:<hub id | local dir | demo>"``: any LVLM family in ``api_tool.families``, detected from the
  config's ``model_type`` (Qwen2-VL, LLaVA-OneVision, Gemma 3, ...).

Example:
    >>> from api_tool.backends.registry import get_attributor
    >>> attributor = get_attributor("demo")  # doctest: +SKIP
    >>> attributor is get_attributor("demo")  # doctest: +SKIP
    True
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch

from api_tool.backends.base import Attributor, resolve_device
from api_tool.errors import InvalidParameterError, UnknownModelError

DEFAULT_SPEC = "demo"
DEMO_SIGLIP_SPEC = "demo-siglip"
DEMO_SPECS = (DEFAULT_SPEC, DEMO_SIGLIP_SPEC)
LVLM_BACKENDS: dict[str, tuple[str, ...] | None] = {"llava": ("llava",), "lvlm": None}
"""Spec prefixes served by the LVLM mechanism, with the families each accepts (``None``: all of them)."""
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
        if text in DEMO_SPECS:
            return cls("clip", text)
        backend, sep, rest = text.partition(":")
        if sep and backend in ("clip", "llava", "lvlm") and rest:
            if backend in ("llava", "lvlm"):
                return cls(backend, rest)
            model, _, pretrained = rest.partition("@")
            if model in DEMO_SPECS:
                return cls("clip", model)
            return cls("clip", model, pretrained or default_pretrained(model))
        if text.startswith(("local-dir:", "hf:")):
            return cls("clip", text)
        if "llava" in text.lower():
            return cls("llava", text)
        model, _, pretrained = text.partition("@")
        import open_clip

        if model in open_clip.list_models():
            return cls("clip", model, pretrained or default_pretrained(model))
        raise UnknownModelError(
            f"unknown attributor {text!r}; use 'demo', 'demo-siglip', 'clip:<open_clip model>[@<pretrained>]', "
            "'hf:<hub id or local dir>' (CLIP / SigLIP / SigLIP2), 'llava:<hub id or local dir>' or 'lvlm:<hub id or "
            "local dir>' (any family of 'api-prompt models')"
        )


def default_pretrained(model: str) -> str:
    """The weights a bare open_clip name means: ``openai`` where the model has that tag, else its first
    published tag, else ``openai`` (which then fails with the list of known tags)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    return DEFAULT_CLIP_PRETRAINED if DEFAULT_CLIP_PRETRAINED in tags or not tags else tags[0]


MODEL_OPTIONS = ("device", "dtype")
"""Options that choose the loaded model itself; the others (``layer``, ``combine``, ...) only the
attributor over it, so attributors that differ only in those share one copy of the weights."""


@dataclass
class _Shared:
    """A loaded model with its tokenizer or processor, and the lock that serialises its loading."""

    lock: threading.Lock
    loaded: tuple[Any, Any] | None = None


_attributors: dict[tuple[AttributorSpec, tuple[tuple[str, str], ...]], Attributor] = {}
_models: dict[tuple[AttributorSpec, tuple[tuple[str, str], ...]], _Shared] = {}
_lock = threading.Lock()


def get_attributor(spec: str | Attributor | None = None, **options: object) -> Attributor:
    """The attributor for ``spec``, built on first use and shared afterwards.

    ``options`` go to the backend (``layer``, ``device``, ``combine``...); ``None`` values mean the
    backend's default. Different options give a different (also cached) attributor, but the weights
    are loaded once per spec, device and dtype and shared by all of them. Loading one model does not
    hold up requests for another. An ``Attributor`` passed in is returned as is.
    """
    if spec is not None and not isinstance(spec, str):
        return spec
    parsed = AttributorSpec.parse(spec)
    options = {name: value for name, value in options.items() if value is not None}
    _check_options(parsed, options)
    device = _normalised_device(options.pop("device", None))  # type: ignore[arg-type]
    if parsed.backend in LVLM_BACKENDS:
        from api_tool.backends.lvlm import resolve_dtype

        options["dtype"] = resolve_dtype(options.get("dtype"), device)  # type: ignore[arg-type]
    described = {"device": str(device), **{name: repr(value) for name, value in options.items()}}
    key = (parsed, tuple(sorted(described.items())))
    with _lock:
        if key in _attributors:
            return _attributors[key]
    shared = _shared(parsed, described)
    with shared.lock:
        if shared.loaded is None:
            shared.loaded = _load(parsed, device, options)
        attributor = _bind(parsed, shared.loaded, device, options)
    with _lock:
        if _models.get(_model_key(parsed, described)) is not shared:  # clear_cache() ran meanwhile
            return attributor
        return _attributors.setdefault(key, attributor)


def shared_model(spec: str, device: str | torch.device | None = None, dtype: object = None) -> tuple[Any, Any]:
    """The model of an LVLM spec (``"lvlm:<dir | id | demo>"``) with its processor, loaded once per model,
    device and dtype and shared with every attributor over it: ``ChatTransformersVLM`` takes its weights
    here, so a chat model and the attributor scoring its answers hold one copy.

    Example:
        >>> model, processor = shared_model("lvlm:demo", device="cpu")  # doctest: +SKIP
        >>> get_attributor("lvlm:demo", device="cpu").model is model  # doctest: +SKIP
        True
    """
    from api_tool.backends.lvlm import resolve_dtype

    parsed = AttributorSpec.parse(spec)
    if parsed.backend not in LVLM_BACKENDS:
        raise InvalidParameterError(f"shared_model takes an LVLM spec ('lvlm:<dir or id>'), got {spec!r}")
    chosen = _normalised_device(device)  # type: ignore[arg-type]
    options = {"dtype": resolve_dtype(dtype, chosen)}  # type: ignore[arg-type]
    shared = _shared(parsed, {"device": str(chosen), "dtype": repr(options["dtype"])})
    with shared.lock:
        if shared.loaded is None:
            shared.loaded = _load(parsed, chosen, options)
        return shared.loaded


def _model_key(spec: AttributorSpec, described: dict[str, str]) -> tuple[AttributorSpec, tuple[tuple[str, str], ...]]:
    """What identifies loaded weights: the model (``llava:`` and ``lvlm:`` name the same weights), device and dtype."""
    weights = AttributorSpec("lvlm", spec.model) if spec.backend in LVLM_BACKENDS else spec
    return weights, tuple(sorted((name, value) for name, value in described.items() if name in MODEL_OPTIONS))


def _shared(spec: AttributorSpec, described: dict[str, str]) -> _Shared:
    with _lock:
        return _models.setdefault(_model_key(spec, described), _Shared(threading.Lock()))


def clear_cache() -> None:
    """Forget every shared attributor and model (frees the models once nothing else holds them)."""
    with _lock:
        _attributors.clear()
        _models.clear()


def _check_options(spec: AttributorSpec, options: dict[str, object]) -> None:
    """Refuse option names the backend does not take, before any weights load.

    The accepted names are the backend's own keyword arguments, less those the registry fills in.
    """
    if spec.backend in LVLM_BACKENDS:
        from api_tool.backends.lvlm import LvlmAttributor

        taken = {*inspect.signature(LvlmAttributor.from_model).parameters, *MODEL_OPTIONS}
        allowed = taken - {"model", "processor", "model_name", "family"}
    else:
        from api_tool.backends.clip import ClipAttributor

        allowed = set(inspect.signature(ClipAttributor).parameters) - {"model_name", "pretrained", "model", "tokenizer"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InvalidParameterError(
            f"{spec.backend} attributors take no option {', '.join(map(repr, unknown))}; "
            f"they take {', '.join(sorted(allowed))}"
        )


def _normalised_device(device: str | torch.device | None) -> torch.device:
    """The device with its index filled in, so "cuda" and "cuda:0" name one place for the shared weights."""
    chosen = resolve_device(device)
    if chosen.type == "cuda" and chosen.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if chosen.type == "mps" and chosen.index is None:
        return torch.device("mps", 0)
    return chosen


def _load(spec: AttributorSpec, device: torch.device, options: dict[str, object]) -> tuple[Any, Any]:
    """The model (on ``device``) and its tokenizer or processor."""
    if spec.backend in LVLM_BACKENDS:
        from api_tool.backends.lvlm import load_lvlm, resolve_dtype

        dtype = resolve_dtype(options.get("dtype"), device)  # type: ignore[arg-type]
        families = LVLM_BACKENDS[spec.backend]
        model, processor = load_lvlm(spec.model, dtype, layer=options.get("layer"), families=families)  # type: ignore[arg-type]
        return model.to(device), processor
    from api_tool.backends.clip import load_clip

    model, tokenizer, pretrained = load_clip(spec.model, spec.pretrained)
    return model.to(device), (tokenizer, pretrained)


def _bind(
    spec: AttributorSpec, loaded: tuple[Any, Any], device: torch.device, options: dict[str, object]
) -> Attributor:
    """An attributor over the shared model with the attributor-level options."""
    model, companion = loaded
    settings = {name: value for name, value in options.items() if name not in MODEL_OPTIONS}
    if spec.backend in LVLM_BACKENDS:
        from api_tool.backends.llava import LlavaAttributor
        from api_tool.backends.lvlm import LvlmAttributor

        attributor_class = LlavaAttributor if spec.backend == "llava" else LvlmAttributor
        return attributor_class.from_model(model, companion, model_name=spec.model, **settings)  # type: ignore[arg-type]
    from api_tool.backends.clip import ClipAttributor

    tokenizer, pretrained = companion  # an open_clip tokenizer or a transformers processor
    return ClipAttributor.from_model(
        model, tokenizer, model_name=spec.model, pretrained=pretrained, device=device, **settings
    )
