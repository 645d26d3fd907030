"""LangChain / langgraph wiring for attention prompting: a local VLM chat model, an image middleware,
the self-reflection loop and an agent preset. Imports ``api_tool``; ``api_tool`` never imports this.

Example:
    >>> from agents import ChatTransformersVLM, reflect
    >>> vlm = ChatTransformersVLM.from_pretrained("demo")  # doctest: +SKIP
    >>> result = reflect("Is there a red circle?", "scene.png", vlm)  # doctest: +SKIP
    >>> print(result.first_answer, "->", result.final_answer)  # doctest: +SKIP
"""

from agents.agent import api_system_prompt, create_api_agent
from agents.chat_models import ChatTransformersVLM, parse_tool_calls
from agents.datasets import EvalItem, convert_pope, load_jsonl, synthetic_items, write_jsonl
from agents.eval_options import EvalOptions
from agents.eval_ray import RayOptions, evaluate_on_ray
from agents.eval_reports import EvalReport
from agents.eval_runner import evaluate
from agents.metrics import (
    bootstrap_interval,
    change_counts,
    final_line_share,
    mcnemar_test,
    paired_difference_interval,
    pope_scores,
    tool_call_rates,
)
from agents.middleware import ImageToolMessageMiddleware, accepts_tool_message_images, hoist_tool_images
from agents.prompts import AGENT_SYSTEM_PROMPT, STRATEGIES, ReflectionStrategy, get_strategy, parse_final_answer
from agents.reflection import (
    ReflectionResult,
    ReflectionRound,
    ReflectionState,
    areflect,
    build_reflection_graph,
    default_tool,
    reflect,
)

__all__ = [
    "AGENT_SYSTEM_PROMPT",
    "STRATEGIES",
    "ChatTransformersVLM",
    "EvalItem",
    "EvalOptions",
    "EvalReport",
    "ImageToolMessageMiddleware",
    "RayOptions",
    "ReflectionResult",
    "ReflectionRound",
    "ReflectionState",
    "ReflectionStrategy",
    "accepts_tool_message_images",
    "api_system_prompt",
    "areflect",
    "bootstrap_interval",
    "build_reflection_graph",
    "change_counts",
    "convert_pope",
    "create_api_agent",
    "default_tool",
    "evaluate",
    "evaluate_on_ray",
    "final_line_share",
    "get_strategy",
    "hoist_tool_images",
    "load_jsonl",
    "mcnemar_test",
    "paired_difference_interval",
    "parse_final_answer",
    "parse_tool_calls",
    "pope_scores",
    "reflect",
    "synthetic_items",
    "tool_call_rates",
    "write_jsonl",
]
