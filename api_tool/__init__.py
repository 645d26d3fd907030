"""Attention Prompting on Image (API): query-guided visual prompts for vision-language models.

Example:
    >>> from api_tool import attention_prompt
    >>> result = attention_prompt("photo.jpg", "where is the red circle?")  # doctest: +SKIP
    >>> result.image.save("prompted.png")  # doctest: +SKIP
"""

from api_tool.backends.base import Attributor
from api_tool.backends.clip import ClipAttributor
from api_tool.backends.registry import get_attributor
from api_tool.images import encode_image, load_image
from api_tool.maps import AttributionMap
from api_tool.prompt import PromptedImage, attention_prompt
from api_tool.render import render

__all__ = [
    "AttributionMap",
    "Attributor",
    "ClipAttributor",
    "PromptedImage",
    "attention_prompt",
    "encode_image",
    "get_attributor",
    "load_image",
    "render",
]
