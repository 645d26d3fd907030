"""Models from command-line specs: the target chat model (:func:`build_target`) and the map backend
(:func:`build_attributor`) of an evaluation, and picklable factories of both for Ray actors
(:func:`target_factory`, :func:`attributor_factory`).

Example:
    >>> target = build_target("demo")  # doctest: +SKIP
    >>> attributor = build_attributor("self", target)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from langchain_core.language_models import BaseChatModel

from agents.chat_models import ChatTransformersVLM, resolve_model_path
from agents.reflection import default_tool
from agents.served import check_served, parse_served_spec, served_chat_model
from api_tool.backends.base import Attributor
from api_tool.errors import InvalidParameterError

LOCAL_MAX_TOKENS = 64
"""New-token budget of a local transformers target built from a spec, unless ``--max-tokens`` says."""

TargetFactory = Callable[[], BaseChatModel]
"""Builds a target chat model where it is called (in a Ray actor: one replica per actor)."""
AttributorFactory = Callable[[BaseChatModel], Attributor]
"""Builds an attributor for a target where it is called (``self`` needs the target's model)."""
_SELF_COMBINE = "--combine applies to CLIP attributors, not to 'self' (LLaVA)"


def build_target(
    spec: str, *, max_tokens: int | None = None, device: str | None = None, check: bool = True
) -> BaseChatModel:
    """A chat model from a spec: ``demo`` or a local transformers directory (``ChatTransformersVLM``), or a
    served target, ``openai:MODEL[@BASE_URL]`` or ``ollama:MODEL[@HOST]`` (``agents.served``: retries,
    usage counts; with ``check`` the server is asked once for its models first, so a wrong address or model
    fails at once with ``TargetUnavailableError``). Greedy decoding (temperature 0) everywhere.

    Example:
        >>> build_target("ollama:llava:13b@127.0.0.1:11434")  # doctest: +SKIP
    """
    served = parse_served_spec(spec)
    if served is not None:
        if check:
            check_served(served)
        return served_chat_model(served, max_tokens=max_tokens)
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
            raise InvalidParameterError(_SELF_COMBINE)
        options = {"enhance_coe": enhance_coe} if enhance_coe is not None else {}
        return default_tool(target, self_attribution=True, **options).backend
    from api_tool.backends.registry import get_attributor

    chosen = (("device", device), ("combine", combine), ("enhance_coe", enhance_coe))
    return get_attributor(spec, **{name: value for name, value in chosen if value is not None})


def target_factory(spec: str, *, max_tokens: int | None = None, device: str | None = None) -> TargetFactory:
    """A picklable zero-argument function that builds the target of ``spec`` where it is called (a Ray
    actor). A served spec is resolved (address, key) and checked here, once, so every actor talks to the
    same server and a bad target fails before any actor starts.

    Example:
        >>> make = target_factory("openai:qwen@http://127.0.0.1:8000/v1")  # doctest: +SKIP
        >>> make().invoke("hi")  # doctest: +SKIP
    """
    served = parse_served_spec(spec)
    if served is not None:
        check_served(served)
        return partial(served_chat_model, served, max_tokens=max_tokens)
    resolve_model_path(spec)  # a path that does not exist fails here, not in every actor
    return partial(build_target, spec, max_tokens=max_tokens, device=device)


def attributor_factory(
    spec: str, *, device: str | None = None, combine: str | None = None, enhance_coe: float | None = None
) -> AttributorFactory:
    """A picklable function of the target that builds the attributor of ``spec`` (:func:`build_attributor`)
    where it is called. The spec is checked here (an unknown one raises ``UnknownModelError``).

    Example:
        >>> make = attributor_factory("demo")
        >>> attributor = make(target)  # doctest: +SKIP
    """
    if spec == "self":
        if combine is not None:
            raise InvalidParameterError(_SELF_COMBINE)
    else:
        from api_tool.backends.registry import AttributorSpec

        AttributorSpec.parse(spec)
    return partial(build_attributor, spec, device=device, combine=combine, enhance_coe=enhance_coe)
