"""Attention Prompting on Image (API): query-guided visual prompts for vision-language models.

Public names are imported on first use, so ``import api_tool`` (and ``api-prompt --help``) stays
cheap: torch, open_clip, transformers and LangChain load only when a name that needs them is used.

Example:
    >>> from api_tool import attention_prompt
    >>> result = attention_prompt("photo.jpg", "where is the red circle?")  # doctest: +SKIP
    >>> result.image.save("prompted.png")  # doctest: +SKIP
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

# ``render`` names both a submodule and its function: importing the submodule (as ``api_tool.prompt``
# does) would leave the module object under the package's ``render``, so the light function is bound now.
from api_tool.render import render

if TYPE_CHECKING:
    from api_tool.backends.base import Attributor
    from api_tool.backends.clip import ClipAttributor
    from api_tool.backends.llava import LlavaAttributor
    from api_tool.backends.lvlm import LvlmAttributor
    from api_tool.backends.registry import get_attributor
    from api_tool.images import encode_image, load_image
    from api_tool.maps import AttributionMap
    from api_tool.prompt import PromptedImage, attention_prompt, attention_prompt_many
    from api_tool.tiling import tiled_attribution
    from api_tool.tool import AttentionPromptTool

_MODULE_OF = {
    "AttentionPromptTool": "api_tool.tool",
    "AttributionMap": "api_tool.maps",
    "Attributor": "api_tool.backends.base",
    "ClipAttributor": "api_tool.backends.clip",
    "LlavaAttributor": "api_tool.backends.llava",
    "LvlmAttributor": "api_tool.backends.lvlm",
    "PromptedImage": "api_tool.prompt",
    "attention_prompt": "api_tool.prompt",
    "attention_prompt_many": "api_tool.prompt",
    "encode_image": "api_tool.images",
    "get_attributor": "api_tool.backends.registry",
    "load_image": "api_tool.images",
    "tiled_attribution": "api_tool.tiling",
}

__all__ = [
    "AttentionPromptTool",
    "AttributionMap",
    "Attributor",
    "ClipAttributor",
    "LlavaAttributor",
    "LvlmAttributor",
    "PromptedImage",
    "attention_prompt",
    "attention_prompt_many",
    "encode_image",
    "get_attributor",
    "load_image",
    "render",
    "tiled_attribution",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (torch, transformers and LangChain cost seconds)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'api_tool' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
