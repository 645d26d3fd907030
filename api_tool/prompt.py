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
from api_tool.render import Style, render_with_box
from api_tool.tiling import PixelBox, Tiles, input_side, tile_layout, tiled_attribution


@dataclass(frozen=True)
class PromptedImage:
    """What ``attention_prompt`` returns.

    Attributes:
        image: the rendered, attention-prompted image.
        original: the loaded original RGB image.
        mask: the mask at the original image's pixel size, ``(H, W)`` float32 in [0, 1].
        map: the attribution map on the patch grid, with the raw scores.
        timings: seconds per stage (``load``, ``attribute``, ``upsample``, ``render``, ``total``).
        crop_box: for the ``crop`` and ``zoom`` styles, the part of the original the image shows,
            ``(x0, y0, x1, y1)`` in pixels; ``None`` for the other styles.
        tiles: the tiles the mask was stitched from (``api_tool.tiling``), empty when untiled; ``map`` is
            then the whole image's map and ``mask`` the stitched one.
    """

    image: Image.Image
    original: Image.Image
    mask: NDArray[np.float32]
    map: AttributionMap
    timings: dict[str, float] = field(default_factory=dict)
    crop_box: PixelBox | None = None
    tiles: tuple[PixelBox, ...] = ()


def attention_prompt(
    image: ImageRef,
    query: str,
    attributor: Attributor | str | None = None,
    style: Style = "gray",
    *,
    resample: str = "lanczos",
    tiles: Tiles = None,
    **render_options: object,
) -> PromptedImage:
    """Attribute ``query`` on ``image`` and render the prompted image.

    ``attributor`` is an Attributor, a registry spec (``"demo"``, ``"clip:ViT-L-14-336@openai"``,
    ``"lvlm:..."``) or ``None`` for the offline demo model. ``style="zoom"`` gives the crop of the attended
    region resized to the target's input (``zoom_size``, default 336). ``tiles`` attributes a large image
    tile by tile (``api_tool.tiling``): ``"auto"`` when the image is at least 3x the attributor's input,
    an int for that many tiles along the longer side, ``None`` never. ``render_options`` go to
    ``api_tool.render.render_with_box`` (``gray_level``, ``alpha``, ``threshold``, ``zoom_size``, ...).

    Example:
        >>> zoomed = attention_prompt("shelf.jpg", "the price tag", style="zoom", tiles="auto")  # doctest: +SKIP
        >>> zoomed.image.size, zoomed.crop_box  # doctest: +SKIP
        ((336, 336), (1210, 640, 1690, 1120))
    """
    return attention_prompt_many(image, [query], attributor, style, resample=resample, tiles=tiles, **render_options)[0]


def attention_prompt_many(
    image: ImageRef,
    queries: Sequence[str],
    attributor: Attributor | str | None = None,
    style: Style = "gray",
    *,
    resample: str = "lanczos",
    tiles: Tiles = None,
    **render_options: object,
) -> list[PromptedImage]:
    """One prompted image per query on one image, loading it once and attributing all queries in one
    ``attribute_many`` call (one image pass for CLIP). Each result's ``load`` and ``attribute`` timings
    are those of the shared steps; ``upsample`` and ``render`` its own. With tiling (``tiles``, see
    :func:`attention_prompt`), each query's tiles and whole image go through one ``attribute_batch`` call.

    Example:
        >>> results = attention_prompt_many("photo.jpg", ["where is the cup?", "where is the cat?"])  # doctest: +SKIP
        >>> [result.image.size for result in results]  # doctest: +SKIP
        [(640, 480), (640, 480)]
    """
    start = time.perf_counter()
    original = load_image(image)
    loaded = time.perf_counter()
    backend = get_attributor(attributor)
    tile_count = tile_layout(original.size, input_side(backend), tiles)
    if tile_count is None:
        attributions = backend.attribute_many(original, list(queries))
        stitched: list[tuple[NDArray[np.float32], tuple[PixelBox, ...]] | None] = [None] * len(attributions)
    else:
        tiled = [tiled_attribution(backend, original, query, tile_count, resample=resample) for query in queries]
        attributions = [result.global_map for result in tiled]
        stitched = [(result.mask, result.boxes) for result in tiled]
    attributed = time.perf_counter()
    results = []
    for attribution, tiled_mask in zip(attributions, stitched):
        began = time.perf_counter()
        mask = attribution.upsample(resample=resample) if tiled_mask is None else tiled_mask[0]
        upsampled = time.perf_counter()
        prompted, crop_box = render_with_box(original, mask, style, **render_options)  # type: ignore[arg-type]
        rendered = time.perf_counter()
        timings = {
            "load": loaded - start,
            "attribute": attributed - loaded,
            "upsample": upsampled - began,
            "render": rendered - upsampled,
            "total": (attributed - start) + (rendered - began),
        }
        results.append(
            PromptedImage(
                image=prompted,
                original=original,
                mask=mask,
                map=attribution,
                timings=timings,
                crop_box=crop_box,
                tiles=() if tiled_mask is None else tiled_mask[1],
            )
        )
    return results
