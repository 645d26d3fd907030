"""Models from command-line specs: the target chat model (:func:`build_target`) and the map backend
(:func:`build_attributor`) of an evaluation.

Example:
    >>> target = build_target("demo")  # doctest: +SKIP
    >>> attributor = build_attributor("self", target)  # doctest: +SKIP
"""

from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from agents.chat_models import ChatTransformersVLM
from agents.reflection import default_tool
from api_tool.backends.base import Attributor
from api_tool.errors import InvalidParameterError

LOCAL_MAX_TOKENS = 64
"""New-token budget of a local transformers target built from a spec, unless ``--max-tokens`` says."""


def build_target(spec: str, *, max_tokens: int | None = None, device: str | None = None) -> BaseChatModel:
    """A chat model from a spec: ``demo`` or a local transformers directory (``ChatTransformersVLM``),
    ``openai:<model>`` (``ChatOpenAI``; any OpenAI-compatible server through ``OPENAI_BASE_URL``) or
    ``ollama:<model>`` (``ChatOllama``). Greedy decoding (temperature 0) everywhere.

    Example:
        >>> build_target("ollama:llava:13b")  # doctest: +SKIP
    """
    provider, sep, model = spec.partition(":")
    if sep and provider == "openai":
        try:
            from langchain_openai import ChatOpenAI
        except ImportError as exc:
            raise InvalidParameterError("--target openai:... needs `pip install langchain-openai`") from exc
        extra = {"max_tokens": max_tokens} if max_tokens is not None else {}
        return ChatOpenAI(model=model, temperature=0, **extra)
    if sep and provider == "ollama":
        try:
            from langchain_ollama import ChatOllama
        except ImportError as exc:
            raise InvalidParameterError("--target ollama:... needs `pip install langchain-ollama`") from exc
        extra = {"num_predict": max_tokens} if max_tokens is not None else {}
        return ChatOllama(model=model, temperature=0, **extra)
    return ChatTransformersVLM.from_pretrained(spec, max_tokens=max_tokens or LOCAL_MAX_TOKENS, device=device)


def build_attributor(
    spec: str,
    target: BaseChatModel,
    device: str | None = None,
    combine: str | None = None,
    enhance_coe: float | None = None,
) -> Attributor:
    """``self`` -> the target's own LLaVA (``LlavaAttributor.from_model``); anything else -> the registry,
    with ``device``, ``enhance_coe`` (the mask's sigmoid sharpness; ``None``: the backend's default) and,
    for CLIP, ``combine`` (how Psi_cls and Psi_comp make the mask)."""
    if spec == "self":
        if combine is not None:
            raise InvalidParameterError("--combine applies to CLIP attributors, not to 'self' (LLaVA)")
        options = {"enhance_coe": enhance_coe} if enhance_coe is not None else {}
        return default_tool(target, self_attribution=True, **options).backend
    from api_tool.backends.registry import get_attributor

    chosen = (("device", device), ("combine", combine), ("enhance_coe", enhance_coe))
    return get_attributor(spec, **{name: value for name, value in chosen if value is not None})
