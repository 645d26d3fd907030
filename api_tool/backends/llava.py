"""API-LLaVA: ``LlavaAttributor``, the LVLM mechanism (``api_tool.backends.lvlm``) held to LLaVA-1.5.

The authors' LLaVA variant for transformers' ``LlavaForConditionalGeneration`` (the LLaVA-1.5 family):
the model answers greedily and, at decoder block ``layer``, its attention from every answer step to the
image tokens (softmax over the image keys only, mean over heads and steps) is the map. Other families
(Qwen2-VL, LLaVA-OneVision, Gemma 3, ...) go through ``api_tool.LvlmAttributor``, which detects them;
this class refuses them, as it always has, and defaults to the paper's block 20.

Example:
    >>> from api_tool.backends.llava import LlavaAttributor
    >>> attributor = LlavaAttributor("llava-hf/llava-1.5-7b-hf", layer=20)  # doctest: +SKIP
    >>> amap = attributor.attribute("street.jpg", "What is the man holding?")  # doctest: +SKIP
    >>> amap.mask.shape, amap.metadata["answer"]  # doctest: +SKIP
    ((24, 24), 'The man is holding an umbrella.')
"""

from __future__ import annotations

import os

import torch

from api_tool.backends.lvlm import DEMO_MODEL, LvlmAttributor, load_lvlm

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"


class LlavaAttributor(LvlmAttributor):
    """API-LLaVA attributor for ``LlavaForConditionalGeneration`` models (LLaVA-1.5 family).

    Takes the arguments of ``LvlmAttributor`` (``model`` defaults to LLaVA-1.5-7B; ``"demo"`` is the
    project's trained demo LLaVA). Offline, a hub id that is not in the local cache fails within seconds
    with ``WeightsUnavailableError``; other image-text-to-text classes are refused with
    ``UnsupportedModelError`` (``api_tool.LvlmAttributor`` takes them).

    Example:
        >>> attributor = LlavaAttributor("path/to/llava-dir", layer=-12, device="cpu")  # doctest: +SKIP
        >>> first = attributor.attribute("photo.jpg", "What colour is the car?")  # doctest: +SKIP
    """

    name = "llava"

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        layer: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_new_tokens: int = 20,
        enhance_coe: float = 10.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__(model, layer, device, dtype, max_new_tokens, enhance_coe, kernel_size)

    @classmethod
    def _families(cls) -> tuple[str, ...] | None:
        return ("llava",)


def load_llava(
    model: str | os.PathLike[str], dtype: torch.dtype, *, layer: int | None = None
) -> tuple[torch.nn.Module, object]:
    """Model and processor of a LLaVA-1.5 checkpoint (``"demo"``, a local directory or a hub id); other
    families are refused before any weights load."""
    return load_lvlm(model, dtype, layer=layer, families=("llava",))


__all__ = ["DEFAULT_MODEL", "DEMO_MODEL", "LlavaAttributor", "load_llava"]
