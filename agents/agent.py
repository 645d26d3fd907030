"""``create_api_agent``: a ``langchain.agents.create_agent`` preset with attention prompting.

It adds the :class:`~api_tool.tool.AttentionPromptTool` (unless one is among ``tools``), the
:class:`~agents.middleware.ImageToolMessageMiddleware` (innermost, so it rewrites exactly what reaches
the model) and a system prompt that says when to call the tool (:data:`agents.prompts.AGENT_SYSTEM_PROMPT`,
after the caller's own system prompt if one is given).

Example:
    >>> from langchain_openai import ChatOpenAI  # doctest: +SKIP
    >>> agent = create_api_agent(ChatOpenAI(model="gpt-4o-mini"))  # doctest: +SKIP
    >>> agent.invoke({"messages": [{"role": "user", "content": [
    ...     {"type": "text", "text": "How many red circles are there?"},
    ...     {"type": "image", "base64": b64, "mime_type": "image/png"}]}]})  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool
from langgraph.graph.state import CompiledStateGraph

from agents.middleware import ImageToolMessageMiddleware
from agents.prompts import AGENT_SYSTEM_PROMPT
from api_tool.demo_notice import is_demo_model, warn_demo_model
from api_tool.tool import AttentionPromptTool


def api_system_prompt(system_prompt: str | None = None) -> str:
    """The caller's system prompt (if any) followed by the guidance on when to call the tool.

    Example:
        >>> api_system_prompt("Answer in French.").startswith("Answer in French.\\n\\nYou are a careful")
        True
    """
    return AGENT_SYSTEM_PROMPT if not system_prompt else f"{system_prompt}\n\n{AGENT_SYSTEM_PROMPT}"


def create_api_agent(
    model: str | BaseChatModel,
    tools: Sequence[BaseTool | Callable[..., Any] | dict[str, Any]] = (),
    *,
    attention_tool: AttentionPromptTool | None = None,
    system_prompt: str | None = None,
    middleware: Sequence[AgentMiddleware] = (),
    image_middleware: ImageToolMessageMiddleware | None = None,
    **kwargs: Any,
) -> CompiledStateGraph:
    """An agent that can call ``attention_prompt`` on the user's images.

    Args:
        model: a chat model that reads images, or a ``"provider:model"`` string for ``init_chat_model``.
        tools: more tools; an ``AttentionPromptTool`` among them replaces the default one.
        attention_tool: the attention tool to add (default: ``AttentionPromptTool()``, the demo CLIP; then a
            ``DemoModelWarning``, once per process, says what the demo was trained on and how to use a real
            model; a demo tool with ``demo_notice=False`` stays silent).
        system_prompt: the caller's instructions, placed before the tool guidance.
        middleware: more middleware, outside the image middleware.
        image_middleware: the image middleware (default: ``ImageToolMessageMiddleware()``).
        **kwargs: passed to ``langchain.agents.create_agent`` (``checkpointer``, ``response_format``...).

    Example:
        >>> agent = create_api_agent(ChatOllama(model="llava"), checkpointer=InMemorySaver())  # doctest: +SKIP
    """
    all_tools = list(tools)
    if not any(isinstance(tool, AttentionPromptTool) for tool in all_tools):
        all_tools.insert(0, attention_tool or AttentionPromptTool())
    attention = next(tool for tool in all_tools if isinstance(tool, AttentionPromptTool))
    if attention.demo_notice and is_demo_model(attention.attributor):
        warn_demo_model("agent")
    return create_agent(
        model,
        all_tools,
        system_prompt=api_system_prompt(system_prompt),
        middleware=[*middleware, image_middleware or ImageToolMessageMiddleware()],
        **kwargs,
    )
