"""Tiled attribution for images far larger than the auxiliary model's input.

An auxiliary model sees a large image downscaled to its input (288 px for the demo CLIP, 336 px for
ViT-L-14-336): an object of 40 px in a 1500 px scene is then a fraction of one patch, and its map is a
blur. Tiling gives the detail back: the image is cut into overlapping square tiles of about the input's
size, each tile is attributed at full resolution (all tiles and the whole image in one
``attribute_batch`` call), the tile maps are blended onto the image by overlap weights, and the result is
combined with the global map, which keeps the tiles from lighting up where the whole scene says nothing.

The maths (``tile_layout``, ``tile_boxes``, ``axis_weights``, ``stitch_tiles``, ``combine_with_global``)
is pure NumPy; ``tiled_attribution`` is the one function that calls a model.

Each tile's mask is in [0, 1] on its own, so a tile that holds nothing of the query would shine as
brightly as the one that holds it: each tile mask is weighted by the tile's relevance (``tile_relevance``:
its raw peak score, rescaled across the tiles to [0, 1]) before stitching. How the maps are combined was
chosen on SMALL_OBJECT_CONFIG scenes (development seeds 5000-5029) with the demo CLIP by how often the
peak lands inside the queried object (``benchmarks/tiling_pointing.py``): relevance-weighted tiles times
the global mask hit 18/30 with 4 tiles (unweighted tiles times global 8/30, the plain map 0/30; 3 tiles
13/30, 5 tiles 15/30). The mask
is the geometric mean ``sqrt(tiled * global)`` rescaled to [0, 1] (the product's peak, a softer mask).

Example:
    >>> tile_boxes((1000, 500), tiles=2)
    [(0, 0, 572, 500), (428, 0, 1000, 500)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from api_tool.errors import InvalidParameterError, UnsupportedModelError
from api_tool.maps import AttributionMap, minmax

if TYPE_CHECKING:
    from PIL import Image

    from api_tool.backends.base import Attributor

PixelBox = tuple[int, int, int, int]
Tiles = Literal["auto"] | int | None
GlobalCombine = Literal["geometric", "product", "mean", "max", "tiles"]
GLOBAL_COMBINES: tuple[str, ...] = ("geometric", "product", "mean", "max", "tiles")

OVERLAP = 0.25
"""Share of a tile's side that it shares with its neighbour."""
AUTO_MIN_RATIO = 3.0
"""``tiles="auto"`` tiles only when the image's longer side is at least this many times the model's input."""
AUTO_MAX_TILES = 4
"""``tiles="auto"`` uses about one tile per input side along the longer side, at most this many (16 tiles
on a square image): on the development scenes 4 tiles pointed best (18/30 vs 15/30 with 5, 13/30 with 3)."""
MIN_WEIGHT = 1e-3
"""The smallest blending weight, at a tile's inner edge, so every covered pixel has a positive total."""


def tile_layout(image_size: tuple[int, int], input_side: int, tiles: Tiles) -> int | None:
    """How many tiles along the image's longer side (``None``: no tiling).

    ``tiles=None`` never tiles; an int is taken as is (1 tiles with one tile, the whole image) up to the
    count whose tiles are half the input's side (more would only upsample slivers: refused);
    ``"auto"`` tiles only images whose longer side is at least ``AUTO_MIN_RATIO`` times ``input_side``,
    with ``longer / input_side`` tiles along it (rounded), at most ``AUTO_MAX_TILES``.

    Example:
        >>> tile_layout((1536, 1024), 288, "auto"), tile_layout((640, 480), 288, "auto")
        (4, None)
    """
    if tiles is None:
        return None
    if tiles == "auto":
        longer = max(image_size)
        if longer < AUTO_MIN_RATIO * input_side:
            return None
        return min(AUTO_MAX_TILES, max(2, round(longer / input_side)))
    if isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1:
        raise InvalidParameterError(f"tiles must be 'auto', a positive integer or None, got {tiles!r}")
    most = max(1, 2 * max(image_size) // input_side)
    if tiles > most:
        raise InvalidParameterError(
            f"tiles={tiles} would cut the {image_size[0]}x{image_size[1]} image into tiles smaller than half the "
            f"auxiliary model's {input_side} px input; use at most {most} (or 'auto')"
        )
    return tiles


def _axis_starts(length: int, tile: int, count: int) -> list[int]:
    """``count`` evenly spaced starts of ``tile``-long segments covering ``range(length)``."""
    if count == 1:
        return [0]
    return [round(index * (length - tile) / (count - 1)) for index in range(count)]


def tile_boxes(image_size: tuple[int, int], tiles: int, overlap: float = OVERLAP) -> list[PixelBox]:
    """``(x0, y0, x1, y1)`` of square tiles covering the image, ``tiles`` along its longer side, each
    sharing about ``overlap`` of its side with its neighbour (row by row, top to bottom). A tile is never
    larger than the image: along a side shorter than the tile, it spans that side.

    Example:
        >>> tile_boxes((300, 200), tiles=1)
        [(0, 0, 300, 200)]
    """
    if tiles < 1:
        raise InvalidParameterError(f"tiles must be at least 1, got {tiles}")
    if not 0.0 <= overlap < 1.0:
        raise InvalidParameterError(f"overlap must be in [0, 1), got {overlap}")
    width, height = image_size
    longer = max(width, height)
    side = longer if tiles == 1 else math.ceil(longer / (tiles - (tiles - 1) * overlap))
    boxes_per_axis = []
    for length in (width, height):
        tile = min(side, length)
        count = tiles if length == longer else _count_along(length, tile, overlap)
        boxes_per_axis.append([(start, start + tile) for start in _axis_starts(length, tile, count)])
    return [(x0, y0, x1, y1) for y0, y1 in boxes_per_axis[1] for x0, x1 in boxes_per_axis[0]]


def _count_along(length: int, tile: int, overlap: float) -> int:
    """The fewest ``tile``-long segments with at least ``overlap`` shared that cover ``length``."""
    if length <= tile:
        return 1
    return math.ceil((length - tile) / (tile * (1.0 - overlap))) + 1


def axis_weights(start: int, stop: int, length: int, ramp: float) -> NDArray[np.float64]:
    """Blending weights of a tile's pixels ``start..stop-1`` along one axis of ``length`` pixels.

    1 in the tile's middle, falling linearly over ``ramp`` pixels towards an edge that lies inside the
    image (to ``MIN_WEIGHT``), flat up to an edge that is the image's border (no neighbour shares it).

    Example:
        >>> axis_weights(0, 4, 8, ramp=2.0).tolist()
        [1.0, 1.0, 0.75, 0.25]
    """
    centres = np.arange(start, stop, dtype=np.float64) + 0.5
    inner = np.full(stop - start, np.inf)
    if start > 0:
        inner = np.minimum(inner, centres - start)
    if stop < length:
        inner = np.minimum(inner, stop - centres)
    if ramp <= 0:
        return np.ones(stop - start)
    return np.clip(inner / ramp, MIN_WEIGHT, 1.0)


def stitch_tiles(
    tile_masks: Sequence[NDArray[np.floating]],
    boxes: Sequence[PixelBox],
    image_size: tuple[int, int],
    ramp: float | None = None,
) -> NDArray[np.float64]:
    """Blend per-tile pixel masks onto the whole image: at each pixel the weighted mean of the tiles that
    cover it, with separable ``axis_weights`` (``ramp``: the overlap in pixels; ``None``: ``OVERLAP`` of
    the first tile's shorter side). Pixels no tile covers are 0.

    Example:
        >>> boxes = tile_boxes((8, 4), tiles=2, overlap=0.0)
        >>> stitch_tiles([np.zeros((4, 4)), np.ones((4, 4))], boxes, (8, 4))[0].tolist()
        [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    """
    if len(tile_masks) != len(boxes):
        raise InvalidParameterError(f"got {len(tile_masks)} tile masks for {len(boxes)} boxes")
    width, height = image_size
    if ramp is None:
        x0, y0, x1, y1 = boxes[0]
        ramp = OVERLAP * min(x1 - x0, y1 - y0)
    total = np.zeros((height, width))
    weights = np.zeros((height, width))
    for mask, (x0, y0, x1, y1) in zip(tile_masks, boxes):
        values = np.asarray(mask, dtype=np.float64)
        if values.shape != (y1 - y0, x1 - x0):
            raise InvalidParameterError(f"a tile mask of shape {values.shape} does not fit its box {(x0, y0, x1, y1)}")
        weight = np.outer(axis_weights(y0, y1, height, ramp), axis_weights(x0, x1, width, ramp))
        total[y0:y1, x0:x1] += weight * values
        weights[y0:y1, x0:x1] += weight
    covered = weights > 0
    total[covered] /= weights[covered]
    return total


def tile_relevance(peaks: Sequence[float]) -> NDArray[np.float64]:
    """Each tile's weight from its raw peak score: the peaks rescaled to [0, 1] across the tiles (all 1
    when they are equal, so equal tiles stay equal).

    Example:
        >>> tile_relevance([1.0, 5.0, 3.0]).tolist()
        [0.0, 1.0, 0.5]
    """
    values = np.asarray(peaks, dtype=np.float64)
    if values.size == 0 or values.max() - values.min() <= 0.0:
        return np.ones_like(values)
    return minmax(values)


def combine_with_global(
    tiled: NDArray[np.floating], global_mask: NDArray[np.floating], combine: GlobalCombine = "geometric"
) -> NDArray[np.float64]:
    """The stitched tile mask and the global mask (both ``(H, W)`` in [0, 1]) as one mask in [0, 1].

    ``geometric``: minmax(sqrt(tiled * global)); ``product``: minmax(tiled * global); ``mean``:
    minmax((tiled + global) / 2); ``max``: minmax(max(tiled, global)); ``tiles``: minmax(tiled), the
    global map ignored.

    Example:
        >>> combine_with_global(np.array([[1.0, 0.25]]), np.array([[1.0, 1.0]])).tolist()
        [[1.0, 0.0]]
    """
    tiled = np.asarray(tiled, dtype=np.float64)
    global_mask = np.asarray(global_mask, dtype=np.float64)
    if tiled.shape != global_mask.shape:
        raise InvalidParameterError(f"the tiled mask {tiled.shape} and the global mask {global_mask.shape} differ")
    if combine == "geometric":
        return minmax(np.sqrt(np.clip(tiled * global_mask, 0.0, None)))
    if combine == "product":
        return minmax(tiled * global_mask)
    if combine == "mean":
        return minmax((tiled + global_mask) / 2.0)
    if combine == "max":
        return minmax(np.maximum(tiled, global_mask))
    if combine == "tiles":
        return minmax(tiled)
    raise InvalidParameterError(f"combine must be one of {GLOBAL_COMBINES}, got {combine!r}")


@dataclass(frozen=True)
class TiledAttribution:
    """What ``tiled_attribution`` computed.

    Attributes:
        mask: the combined mask at the image's pixel size, ``(H, W)`` float32 in [0, 1].
        global_map: the map of the whole image (what an untiled call gives).
        tile_maps: one map per tile, in ``boxes`` order.
        boxes: the tiles, ``(x0, y0, x1, y1)`` in pixels of the image.
    """

    mask: NDArray[np.float32]
    global_map: AttributionMap
    tile_maps: tuple[AttributionMap, ...]
    boxes: tuple[PixelBox, ...]


def tiled_attribution(
    attributor: Attributor,
    image: Image.Image,
    query: str,
    tiles: int,
    *,
    combine: GlobalCombine = "geometric",
    resample: str = "lanczos",
    overlap: float = OVERLAP,
    weighted: bool = True,
) -> TiledAttribution:
    """Attribute ``query`` on ``tiles`` tiles along the longer side of ``image`` (a PIL image) and on the
    whole image, in one ``attributor.attribute_batch`` call, and stitch the maps onto the image (each tile
    mask weighted by ``tile_relevance`` of the tiles' raw peaks unless ``weighted`` is False).

    Example:
        >>> from api_tool.backends.registry import get_attributor  # doctest: +SKIP
        >>> tiled = tiled_attribution(get_attributor("demo"), scene.image, "the red star", tiles=4)  # doctest: +SKIP
        >>> tiled.mask.shape == (scene.image.height, scene.image.width)  # doctest: +SKIP
        True
    """
    boxes = tile_boxes(image.size, tiles, overlap)
    crops = [image.crop(box) for box in boxes]
    maps = attributor.attribute_batch([*crops, image], [query] * (len(crops) + 1))
    tile_maps, global_map = maps[:-1], maps[-1]
    weights = tile_relevance([float(tile_map.raw.max()) for tile_map in tile_maps]) if weighted else None
    tile_masks = [tile_map.upsample(resample=resample) for tile_map in tile_maps]
    if weights is not None:
        tile_masks = [mask * weight for mask, weight in zip(tile_masks, weights)]
    x0, y0, x1, y1 = boxes[0]
    tiled = stitch_tiles(tile_masks, boxes, image.size, ramp=overlap * min(x1 - x0, y1 - y0))
    mask = combine_with_global(tiled, global_map.upsample(resample=resample), combine).astype(np.float32)
    return TiledAttribution(mask=mask, global_map=global_map, tile_maps=tuple(tile_maps), boxes=tuple(boxes))


def input_side(attributor: object, default: int = 336) -> int:
    """The side of the attributor's square input when it says (``attributor.side``), else ``default``.

    Example:
        >>> input_side(object())
        336
    """
    try:
        side = getattr(attributor, "side", None)
    except UnsupportedModelError:  # a tower with its own geometry (no square input) says so
        return default
    return side if isinstance(side, int) and side > 0 else default
