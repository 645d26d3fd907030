"""A JSON-ready description of one attention map: where it peaks, what it attends, sizes and settings.

The CLI writes it beside every prompted image (and prints it with ``--json``); the MCP server returns it
with every map. Pixel coordinates are those of the original image: x to the right, y down.

Example:
    >>> from api_tool import attention_prompt
    >>> from api_tool.summary import map_summary
    >>> result = attention_prompt("photo.jpg", "where is the cat?")  # doctest: +SKIP
    >>> map_summary(result, image="photo.jpg", question="where is the cat?", model="demo")["peak"]  # doctest: +SKIP
    {'x': 212, 'y': 140, 'value': 1.0}
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api_tool.prompt import PromptedImage

BOX_THRESHOLD = 0.5
"""Mask value from which a pixel counts as attended (the box and the attended fraction)."""


def map_summary(
    result: PromptedImage, *, image: str, question: str, model: str, output: Path | None = None
) -> dict[str, Any]:
    """A JSON-ready description of one map: where it peaks in pixels (``x``, ``y`` of the mask's
    maximum), the attended box (``mask >= 0.5``, as ``x0, y0, x1, y1``), sizes and settings; ``output``
    (where the prompted image was written) is included when given, the part of the image a ``crop`` or
    ``zoom`` shows (``crop_box``), the tiles of a tiled map (``tiles``) and the answer of an LVLM backend."""
    import numpy as np

    from api_tool.render import attention_box

    mask = result.mask
    row, col = np.unravel_index(int(np.argmax(mask)), mask.shape)
    summary: dict[str, Any] = {"image": image, "question": question}
    if output is not None:
        summary["output"] = str(output)
    summary |= {
        "model": model,
        "image_size": list(result.original.size),
        "grid": list(result.map.grid_shape),
        "peak": {"x": int(col), "y": int(row), "value": round(float(mask[row, col]), 6)},
        "box": list(attention_box(mask, threshold=BOX_THRESHOLD, margin=0.0)),
        "attended_fraction": round(float((mask >= BOX_THRESHOLD).mean()), 6),
    }
    if result.crop_box is not None:
        summary["crop_box"] = list(result.crop_box)
    if result.tiles:
        summary["tiles"] = [list(tile) for tile in result.tiles]
    answer = result.map.metadata.get("answer")
    if answer is not None:
        summary["answer"] = answer
    return summary
