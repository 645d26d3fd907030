"""Does tiling make the demo CLIP point at small objects in large scenes? (issue 14)

On SMALL_OBJECT_CONFIG scenes (large canvases, 6-12 small objects), for one object per scene whose colour
and shape are unique in it, the map's peak counts as a hit when it lies inside the object's box. It
compares the plain (whole-image) map with tiled maps for several tile counts and ways of combining the
stitched tiles with the global map (``api_tool.tiling.combine_with_global``), all measured in one run.

Usage:
    .venv/bin/python benchmarks/tiling_pointing.py --seeds 30 --first-seed 5000
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from api_tool.backends.registry import get_attributor
from api_tool.demo.scenes import SMALL_OBJECT_CONFIG, Scene, SceneObject, generate_scene, object_query
from api_tool.tiling import GLOBAL_COMBINES, combine_with_global, input_side, tile_layout, tiled_attribution


def queried_object(scene: Scene) -> SceneObject | None:
    """The first object whose colour and shape no other object in the scene shares."""
    names = [obj.name for obj in scene.objects]
    return next((obj for obj in scene.objects if names.count(obj.name) == 1), None)


def hit(mask: np.ndarray, obj: SceneObject) -> bool:
    """Whether the mask's peak lies inside the object's box."""
    row, col = np.unravel_index(int(np.argmax(mask)), mask.shape)
    x0, y0, x1, y1 = obj.box
    return bool(x0 <= col < x1 and y0 <= row < y1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--first-seed", type=int, default=5000)
    parser.add_argument("--tiles", default="2,3,4,auto")
    args = parser.parse_args()
    attributor = get_attributor("demo")
    side = input_side(attributor)
    choices = [value if value == "auto" else int(value) for value in args.tiles.split(",")]
    hits: dict[str, int] = {}
    seconds: dict[str, float] = {}
    hit_seeds: dict[str, list[int]] = {}
    count = 0
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        scene = generate_scene(seed, config=SMALL_OBJECT_CONFIG)
        obj = queried_object(scene)
        if obj is None:
            continue
        count += 1
        query = object_query(random.Random(seed), colour=obj.colour, shape=obj.shape)
        start = time.perf_counter()
        plain = attributor.attribute(scene.image, query).upsample()
        seconds["plain"] = seconds.get("plain", 0.0) + time.perf_counter() - start
        hits["plain"] = hits.get("plain", 0) + hit(plain, obj)
        if hit(plain, obj):
            hit_seeds.setdefault("plain", []).append(seed)
        for choice in choices:
            tiles = tile_layout(scene.image.size, side, choice)
            if tiles is None:
                continue
            for weighted in (True, False):
                start = time.perf_counter()
                tiled = tiled_attribution(attributor, scene.image, query, tiles, combine="tiles", weighted=weighted)
                key = f"tiles={choice}" + ("" if weighted else " unweighted")
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
                global_mask = tiled.global_map.upsample()
                for combine in GLOBAL_COMBINES:
                    name = f"{key} {combine}"
                    mask = combine_with_global(tiled.mask, global_mask, combine)
                    hits[name] = hits.get(name, 0) + hit(mask, obj)
                    if hit(mask, obj):
                        hit_seeds.setdefault(name, []).append(seed)
    print(f"{count} scenes (seeds {args.first_seed}..{args.first_seed + args.seeds - 1}), demo CLIP input {side} px")
    for name, value in hits.items():
        print(f"{name:40s} peak inside the object: {value}/{count} = {value / count:.3f}")
    for name, value in seconds.items():
        print(f"{name:40s} {value / count:.3f} s per map (image passes cached by content: later rows reuse them)")
    for name in ("plain", "tiles=auto geometric"):
        print(f"seeds where {name} hits: {hit_seeds.get(name, [])}")


if __name__ == "__main__":
    main()
