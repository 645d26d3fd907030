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
from collections.abc import Sequence
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
    ``"lvlm:..."``) or ``None`` for the offline demo model. ``render_options`` go to
    ``api_tool.render.render`` (``gray_level``, ``alpha``, ``threshold``, ...).
    """
    return attention_prompt_many(image, [query], attributor, style, resample=resample, **render_options)[0]


def attention_prompt_many(
    image: ImageRef,
    queries: Sequence[str],
    attributor: Attributor | str | None = None,
    style: Style = "gray",
    *,
    resample: str = "lanczos",
    **render_options: object,
) -> list[PromptedImage]:
    """One prompted image per query on one image, loading it once and attributing all queries in one
    ``attribute_many`` call (one image pass for CLIP). Each result's ``load`` and ``attribute`` timings
    are those of the shared steps; ``upsample`` and ``render`` its own.

    Example:
        >>> results = attention_prompt_many("photo.jpg", ["where is the cup?", "where is the cat?"])  # doctest: +SKIP
        >>> [result.image.size for result in results]  # doctest: +SKIP
        [(640, 480), (640, 480)]
    """
    start = time.perf_counter()
    original = load_image(image)
    loaded = time.perf_counter()
    backend = get_attributor(attributor)
    attributions = backend.attribute_many(original, list(queries))
    attributed = time.perf_counter()
    results = []
    for attribution in attributions:
        began = time.perf_counter()
        mask = attribution.upsample(resample=resample)
        upsampled = time.perf_counter()
        prompted = render(original, mask, style, **render_options)  # type: ignore[arg-type]
        rendered = time.perf_counter()
        timings = {
            "load": loaded - start,
            "attribute": attributed - loaded,
            "upsample": upsampled - began,
            "render": rendered - upsampled,
            "total": (attributed - start) + (rendered - began),
        }
        results.append(PromptedImage(image=prompted, original=original, mask=mask, map=attribution, timings=timings))
    return results
