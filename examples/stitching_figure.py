"""Make the README's picture of how tiled LVLMs' attention is laid back on the image.

InternVL's real geometry for a 640 x 320 scene (448-px tiles: a 1 x 2 grid, stretched, plus a whole-image
thumbnail; 16 x 16 tokens each) and LLaVA-OneVision-style geometry would both do; InternVL's is shown.
The attention here is *planted*: every token cell gets mass in proportion to how much of it overlaps the
queried object's box (as an LVLM attending to that object would), normalised over all tiles' tokens
together, as the mechanism's softmax is. Panels: the tiles on the image; each tile's own grid (where its
tokens look); the stitched map (``api_tool.backends.lvlm.stitch_tiles``: each cell's mass spread over its
pixels, the tiles' densities added) through the usual post-processing, as a heatmap.

Run: python examples/stitching_figure.py   (writes examples/stitching.png)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from api_tool import render
from api_tool.backends.lvlm import single_tile_grid_box, stitch_tiles
from api_tool.backends.lvlm_families.base import Tile
from api_tool.backends.lvlm_families.internvl import tile_boxes, tile_grid
from api_tool.demo.scenes import generate_scene
from api_tool.geometry import upsample_grid
from api_tool.maps import combine_maps

SIZE = (640, 320)
TOKENS = (16, 16)
TITLE_HEIGHT = 22
COLOURS = ("#e6194b", "#3cb44b", "#4363d8")


def planted_attention(tiles: list[Tile], box: tuple[float, float, float, float]) -> list[np.ndarray]:
    """Each tile's grid of mass proportional to its cells' overlap with ``box``, all tiles summing to 1."""
    grids = []
    for tile in tiles:
        rows, cols = tile.grid
        x0, y0, x1, y1 = tile.box
        xs, ys = np.linspace(x0, x1, cols + 1), np.linspace(y0, y1, rows + 1)
        across = np.clip(np.minimum(xs[1:], box[2]) - np.maximum(xs[:-1], box[0]), 0, None)
        down = np.clip(np.minimum(ys[1:], box[3]) - np.maximum(ys[:-1], box[1]), 0, None)
        grids.append(np.outer(down, across))
    total = sum(grid.sum() for grid in grids)
    return [grid / total for grid in grids]


def tile_panel(image: Image.Image, tiles: list[Tile], grids: list[np.ndarray]) -> Image.Image:
    """Each tile's grid drawn over its own box (the thumbnail's in a strip below), as a heatmap."""
    width, height = image.size
    panel = Image.new("RGB", (width, height), "white")
    peak = max(grid.max() for grid in grids)
    high, thumbnail = tiles[:-1], tiles[-1]
    for tile, grid in zip(high, grids[:-1]):
        x0, y0, x1, y1 = (round(value) for value in tile.box)
        crop = image.crop((x0, y0, x1, y1))
        values = upsample_grid(grid / peak, (0.0, 0.0, tile.grid[1], tile.grid[0]), crop.size, "nearest")
        panel.paste(render(crop, values, "heatmap"), (x0, y0))
    small = image.resize((width // 3, height // 3))
    values = upsample_grid(grids[-1] / peak, single_tile_grid_box(thumbnail, SIZE), small.size, "nearest")
    panel.paste(render(small, values, "heatmap"), (width - small.width - 4, height - small.height - 4))
    draw = ImageDraw.Draw(panel)
    for tile, colour in zip(high, COLOURS):
        draw.rectangle(tuple(round(value) for value in tile.box), outline=colour, width=3)
    draw.rectangle((width - small.width - 5, height - small.height - 5, width - 3, height - 3), outline="black")
    draw.text((width - small.width, height - small.height - 18), "thumbnail", fill="black")
    return panel


def main() -> None:
    scene = generate_scene(4, size=SIZE, n_objects=3, background="gradient")
    target = scene.objects[0]
    rows, cols = tile_grid(SIZE, 448, 1, 12)
    tiles = [Tile(torch.arange(TOKENS[0] * TOKENS[1]), TOKENS, box) for box in tile_boxes(SIZE, (rows, cols))]
    grids = planted_attention(tiles, target.box)
    canvas, grid_box = stitch_tiles(grids, tiles, SIZE)
    mask = upsample_grid(combine_maps(canvas, None, combine="cls", enhance_coe=10.0), grid_box, SIZE)
    outlined = scene.image.copy()
    draw = ImageDraw.Draw(outlined)
    for tile, colour in zip(tiles[:-1], COLOURS):
        draw.rectangle(tuple(round(value) for value in tile.box), outline=colour, width=3)
    panels = [
        (f"InternVL tiles: {rows} x {cols} + thumbnail; attention planted on the {target.name}", outlined),
        ("each tile's 16 x 16 grid (thumbnail bottom right)", tile_panel(scene.image, tiles, grids)),
        (f"stitched onto one {canvas.shape[0]} x {canvas.shape[1]} grid over the image", render(scene.image, mask)),
    ]
    width, height = SIZE
    figure = Image.new("RGB", (width, (height + TITLE_HEIGHT) * len(panels)), "white")
    draw = ImageDraw.Draw(figure)
    for index, (title, panel) in enumerate(panels):
        top = index * (height + TITLE_HEIGHT)
        draw.text((6, top + 5), title, fill="black")
        figure.paste(panel, (0, top + TITLE_HEIGHT))
    out = Path(__file__).with_name("stitching.png")
    figure.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
