"""Attention Prompting on Image (API): query-guided visual prompts for vision-language models.

Example:
    >>> from api_tool import attention_prompt
    >>> result = attention_prompt("photo.jpg", "where is the red circle?")  # doctest: +SKIP
    >>> result.image.save("prompted.png")  # doctest: +SKIP
"""

from typing import TYPE_CHECKING, Any

from api_tool.backends.base import Attributor
from api_tool.backends.clip import ClipAttributor
from api_tool.backends.registry import get_attributor
from api_tool.images import encode_image, load_image
from api_tool.maps import AttributionMap
from api_tool.prompt import PromptedImage, attention_prompt
from api_tool.render import render

if TYPE_CHECKING:
    from api_tool.backends.llava import LlavaAttributor
    from api_tool.tool import AttentionPromptTool

__all__ = [
    "AttentionPromptTool",
    "AttributionMap",
    "Attributor",
    "ClipAttributor",
    "LlavaAttributor",
    "PromptedImage",
    "attention_prompt",
    "encode_image",
    "get_attributor",
    "load_image",
    "render",
]


def __getattr__(name: str) -> Any:
    """Import the LangChain tool and the LLaVA backend lazily (LangChain / transformers import cost)."""
    if name == "AttentionPromptTool":
        from api_tool.tool import AttentionPromptTool

        return AttentionPromptTool
    if name == "LlavaAttributor":
        from api_tool.backends.llava import LlavaAttributor

        return LlavaAttributor
    raise AttributeError(f"module 'api_tool' has no attribute {name!r}")
