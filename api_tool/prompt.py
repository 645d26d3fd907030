"""The one-call entry point: image + question -> attention-prompted image.

Example:
    >>> from api_tool import attention_prompt
    >>> result = attention_prompt("photo.jpg", "what is on the table?")  # doctest: +SKIP
    >>> result.image.save("prompted.png")  # doctest: +SKIP
    >>> result.timings  # doctest: +SKIP
    {'load': 0.004, 'attribute': 0.061, 'upsample': 0.003, 'render': 0.002, 'total': 0.07}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from api_tool.backends.base import Attributor
from api_tool.backends.registry import get_attributor
from api_tool.images import ImageRef, load_image
from api_tool.maps import AttributionMap
from api_tool.render import Style, render


@dataclass(frozen=True)
class PromptedImage:
    """What ``attention_prompt`` returns.

    Attributes:
        image: the rendered, attention-prompted image.
        original: the loaded original RGB image.
        mask: the mask at the original image's pixel size, ``(H, W)`` float32 in [0, 1].
        map: the attribution map on the patch grid, with the raw scores.
        timings: seconds per stage (``load``, ``attribute``, ``upsample``, ``render``, ``total``).
    """

    image: Image.Image
    original: Image.Image
    mask: NDArray[np.float32]
    map: AttributionMap
    timings: dict[str, float] = field(default_factory=dict)


def attention_prompt(
    image: ImageRef,
    query: str,
    attributor: Attributor | str | None = None,
    style: Style = "gray",
    *,
    resample: str = "lanczos",
    **render_options: object,
) -> PromptedImage:
    """Attribute ``query`` on ``image`` and render the prompted image.

    ``attributor`` is an Attributor, a registry spec (``"demo"``, ``"clip:ViT-L-14-336@openai"``,
    ``"llava:..."``) or ``None`` for the offline demo model. ``render_options`` go to
    ``api_tool.render.render`` (``gray_level``, ``alpha``, ``threshold``, ...).
    """
    start = time.perf_counter()
    original = load_image(image)
    loaded = time.perf_counter()
    backend = get_attributor(attributor)
    attribution = backend.attribute(original, query)
    attributed = time.perf_counter()
    mask = attribution.upsample(resample=resample)
    upsampled = time.perf_counter()
    prompted = render(original, mask, style, **render_options)  # type: ignore[arg-type]
    rendered = time.perf_counter()
    timings = {
        "load": loaded - start,
        "attribute": attributed - loaded,
        "upsample": upsampled - attributed,
        "render": rendered - upsampled,
        "total": rendered - start,
    }
    return PromptedImage(image=prompted, original=original, mask=mask, map=attribution, timings=timings)
