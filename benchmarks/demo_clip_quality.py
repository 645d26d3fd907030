"""How good is the demo CLIP (or another saved demo model), and do its API maps point at the queried object?

Measured on held-out synthetic scenes (seeds from ``--seed-base``, a stream the training never draws):

1. Zero-shot caption -> image top-1 among 100 (and image -> caption), scenes of mixed canvas shapes,
   images prepared exactly as ``ClipAttributor`` prepares them (letterbox to the model input).
2. The pointing game with ``api_tool.backends.clip.ClipAttributor(model_name="demo", combine=...)``
   for every combine mode, on square and on non-square scenes with 2-5 objects. Each object whose
   colour-shape name is unique in its scene is queried with "where is the <colour> <shape>?" (or
   ``--query``, e.g. "is there {a} {name} in the image?"):
   * pointing: the argmax of the pixel-size mask (``AttributionMap.upsample()``) lies in the
     object's box;
   * energy: the share of the mask's sum inside the box;
   * baseline: box area / image area (what a random point or a uniform mask scores).
3. With ``--choose``: the layer, combine mode and ``enhance_coe`` are first chosen on development scenes
   (``--dev-seed-base``, 2,000,000 on: the same kinds of scenes and queries, disjoint from the test
   scenes) as the best mean pointing over the two canvas kinds among ``--choose-layers`` x ``--modes`` x
   ``--choose-coes`` (the coefficient only sharpens the cls and paper modes); the test scenes are then
   measured at the chosen layer and coefficient, and the chosen mode is reported, never re-chosen on them.

4. With ``--kinds``: pointing per reference kind (``api_tool.demo.scenes.REFERENCE_KINDS``: colour and shape,
   colour only "the red one", shape only, a relation "what is next to the star?", a canvas position "the
   thing in the top left corner", free phrasing "can you find the little blue square?"), one query per kind
   and scene from ``reference_query`` with its ground-truth targets; a hit is the mask's argmax within
   ``--tolerance`` pixels of a target's own pixels (its mask, not its box). ``--kinds-on dev`` measures
   the development scenes (for choosing), ``test`` (default) the test scenes (for reporting).

``--weights DIR`` evaluates any demo model saved by ``training.train_clip`` (the CLS-token demo CLIP or
the SigLIP-style attention-pool demo), on the same scenes and queries.

Usage:
    python benchmarks/demo_clip_quality.py [--scenes 200] [--weights DIR] [--choose] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from api_tool.backends.clip import ClipAttributor
from api_tool.demo.clip_model import load_demo_clip
from api_tool.demo.scenes import REFERENCE_KINDS, Scene, article, generate_scene, reference_query
from api_tool.maps import COMBINE_MODES

DEFAULT_QUERY = "where is the {name}?"
NON_SQUARE_SIZES: tuple[tuple[int, int], ...] = ((320, 224), (224, 320), (384, 224), (256, 384), (352, 256))
SHARPENED_MODES = ("paper", "cls")
"""The combine modes ``enhance_coe`` acts on (``api_tool.maps.combine_maps``)."""
CANVASES = (("square", True), ("non-square", False))
CANVAS_SEED_OFFSET = {"square": 0, "non-square": 100_000}


@dataclass(frozen=True)
class PointingResult:
    """Pointing-game scores for one combine mode on one set of scenes."""

    mode: str
    canvas: str
    queries: int
    pointing: float
    energy: float
    baseline: float


@dataclass(frozen=True)
class Setting:
    """One attribution setting's pointing on the development scenes (``enhance_coe`` ``None``: unused)."""

    layer: int
    mode: str
    enhance_coe: float | None
    square: float
    non_square: float

    @property
    def mean(self) -> float:
        """Mean pointing over the two canvas kinds (what the choice maximises)."""
        return 0.5 * (self.square + self.non_square)


def held_out_scenes(count: int, seed_base: int, square: bool) -> list[Scene]:
    """``count`` scenes with 2-5 objects, square (224x224) or cycling through ``NON_SQUARE_SIZES``."""
    scenes = []
    for i in range(count):
        seed = seed_base + i
        size = (224, 224) if square else NON_SQUARE_SIZES[i % len(NON_SQUARE_SIZES)]
        n_objects = 2 + random.Random(seed).randrange(4)
        scenes.append(generate_scene(seed, size=size, n_objects=n_objects))
    return scenes


def pointing_game(
    attributor: ClipAttributor,
    scenes: Sequence[Scene],
    canvas: str,
    modes: Sequence[str],
    query: str = DEFAULT_QUERY,
) -> list[PointingResult]:
    """Score the attributor's masks, for each combine mode, against the box of every uniquely named object.

    The attributor's ``combine`` is switched per mode, so each scene's image pass is computed once
    (the attributor caches it) and shared by all modes.
    """
    scores: dict[str, list[tuple[bool, float, float]]] = {mode: [] for mode in modes}
    for scene in scenes:
        names = [obj.name for obj in scene.objects]
        targets = [obj for obj in scene.objects if names.count(obj.name) == 1]
        queries = [query.format(name=obj.name, a=article(obj.name)) for obj in targets]
        width, height = scene.size
        for mode in modes:
            attributor.combine = mode  # type: ignore[assignment]
            for obj, amap in zip(targets, attributor.attribute_many(scene.image, queries) if queries else []):
                mask = amap.upsample()
                x0, y0, x1, y1 = obj.box
                row, col = np.unravel_index(int(np.argmax(mask)), mask.shape)
                total = float(mask.sum())
                energy = float(mask[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0
                scores[mode].append((bool(x0 <= col < x1 and y0 <= row < y1), energy, obj.box_area / (width * height)))
    return [
        PointingResult(
            mode=mode,
            canvas=canvas,
            queries=len(rows),
            pointing=float(np.mean([r[0] for r in rows])),
            energy=float(np.mean([r[1] for r in rows])),
            baseline=float(np.mean([r[2] for r in rows])),
        )
        for mode, rows in scores.items()
    ]


@dataclass(frozen=True)
class KindResult:
    """Pointing for one reference kind on one canvas kind: hits among queries, and the share of the image
    the targets' pixels cover (what a random point scores)."""

    kind: str
    canvas: str
    queries: int
    pointing: float
    baseline: float


def point_hits_mask(point: tuple[int, int], mask: np.ndarray, tolerance: float) -> bool:
    """Whether pixel ``point`` (row, col) is within ``tolerance`` pixels of a ``True`` pixel of ``mask``.

    Example:
        >>> mask = np.zeros((5, 5), dtype=bool); mask[0, 0] = True
        >>> point_hits_mask((2, 1), mask, 2.0), point_hits_mask((2, 2), mask, 2.0)
        (False, False)
        >>> point_hits_mask((1, 1), mask, 2.0)
        True
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return False
    return bool(np.min(np.hypot(rows - point[0], cols - point[1])) <= tolerance)


def reference_pointing(
    attributor: ClipAttributor, scenes: Sequence[Scene], canvas: str, tolerance: float
) -> list[KindResult]:
    """Pointing per reference kind: for every scene one ``reference_query`` of each kind (the scene's seed and
    the kind seed the query), scored by whether the argmax of the upsampled map hits a target's pixels."""
    rows: dict[str, list[tuple[bool, float]]] = {kind: [] for kind in REFERENCE_KINDS}
    for scene in scenes:
        width, height = scene.size
        references = [
            (kind, ref)
            for kind in REFERENCE_KINDS
            if (ref := reference_query(scene.objects, kind, random.Random(f"{scene.seed}-{kind}"), scene.size))
        ]
        maps = attributor.attribute_many(scene.image, [ref.text for _, ref in references]) if references else []
        for (kind, ref), amap in zip(references, maps):
            mask = amap.upsample()
            point = np.unravel_index(int(np.argmax(mask)), mask.shape)
            union = np.logical_or.reduce([scene.objects[i].mask for i in ref.targets])
            rows[kind].append((point_hits_mask(point, union, tolerance), float(union.sum()) / (width * height)))
    return [
        KindResult(
            kind=kind,
            canvas=canvas,
            queries=len(found),
            pointing=float(np.mean([hit for hit, _ in found])) if found else float("nan"),
            baseline=float(np.mean([share for _, share in found])) if found else float("nan"),
        )
        for kind, found in rows.items()
    ]


def choose_setting(
    model: torch.nn.Module,
    tokenizer: object,
    device: str,
    layers: Sequence[int],
    coes: Sequence[float],
    modes: Sequence[str],
    scenes: int,
    seed_base: int,
    query: str = DEFAULT_QUERY,
) -> tuple[Setting, list[Setting]]:
    """Pointing of every (layer, mode, coefficient) on ``scenes`` development scenes per canvas kind; the
    best by mean pointing (ties: the first in the order given) and all rows."""
    development = {
        canvas: held_out_scenes(scenes, seed_base + CANVAS_SEED_OFFSET[canvas], square) for canvas, square in CANVASES
    }
    rows = []
    for layer in layers:
        attributor = ClipAttributor(
            "demo", layer=layer, device=device, model=model, tokenizer=tokenizer, cache_size=2 * scenes
        )
        for index, coe in enumerate(coes):
            attributor.enhance_coe = coe
            measured = [mode for mode in modes if mode in SHARPENED_MODES or index == 0]
            found = {
                canvas: {r.mode: r.pointing for r in pointing_game(attributor, kept, canvas, measured, query)}
                for canvas, kept in development.items()
            }
            rows.extend(
                Setting(
                    layer=layer,
                    mode=mode,
                    enhance_coe=coe if mode in SHARPENED_MODES else None,
                    square=found["square"][mode],
                    non_square=found["non-square"][mode],
                )
                for mode in measured
            )
    return max(rows, key=lambda row: row.mean), rows


@torch.inference_mode()
def retrieval_top1(attributor: ClipAttributor, count: int, seed_base: int, group: int = 100) -> dict[str, float]:
    """Caption -> image and image -> caption top-1 among ``group`` on mixed-canvas held-out scenes."""
    scenes = [generate_scene(seed_base + i) for i in range(count)]
    model = attributor.model
    pixels = torch.stack([attributor.preprocess(scene.image)[0] for scene in scenes]).to(attributor.device)
    images = torch.cat([model.encode_image(chunk, normalize=True) for chunk in pixels.split(200)])
    texts = attributor.encode_queries([scene.caption for scene in scenes])
    text_hits = image_hits = 0
    groups = count // group
    for g in range(groups):
        part = slice(g * group, (g + 1) * group)
        similarity = texts[part] @ images[part].T.float()
        target = torch.arange(group, device=similarity.device)
        text_hits += int((similarity.argmax(dim=1) == target).sum())
        image_hits += int((similarity.argmax(dim=0) == target).sum())
    total = groups * group
    return {"caption_to_image_top1": text_hits / total, "image_to_caption_top1": image_hits / total, "scenes": total}


def main(argv: Sequence[str] | None = None) -> None:
    """Run both measurements and print a Markdown summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=200, help="scenes per canvas kind for the pointing game")
    parser.add_argument("--retrieval-scenes", type=int, default=1000, help="held-out scenes for top-1 (x100)")
    parser.add_argument("--seed-base", type=int, default=1_000_000)
    parser.add_argument("--weights", default=None, help="a saved demo model's folder (default: the demo CLIP)")
    parser.add_argument("--layer", type=int, default=None, help="default: the demo model's recommended block")
    parser.add_argument("--enhance-coe", type=float, default=None, help="default: the demo model's recommended")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", default=list(COMBINE_MODES))
    parser.add_argument("--query", default=DEFAULT_QUERY, help="question template ({name}, {a}: its article)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--choose", action="store_true", help="choose layer, mode and coe on development scenes")
    parser.add_argument("--dev-seed-base", type=int, default=2_000_000, help="development scenes (with --choose)")
    parser.add_argument("--dev-scenes", type=int, default=100, help="development scenes per canvas kind")
    parser.add_argument("--choose-layers", type=int, nargs="+", default=None, help="default: every block")
    parser.add_argument("--choose-coes", type=float, nargs="+", default=[2.0, 3.0, 5.0, 10.0])
    parser.add_argument("--kinds", action="store_true", help="pointing per reference kind instead (see 4.)")
    parser.add_argument("--kinds-on", choices=("dev", "test"), default="test", help="scenes for --kinds")
    parser.add_argument("--tolerance", type=float, default=4.0, help="--kinds: pixels a hit may miss a mask by")
    args = parser.parse_args(argv)
    if args.choose and (args.layer is not None or args.enhance_coe is not None):
        parser.error("--choose picks the layer and enhance_coe; leave --layer and --enhance-coe out")

    started = time.time()
    model, tokenizer = load_demo_clip(args.device, args.weights)
    chosen, development = None, []
    if args.choose:
        blocks = model.visual.transformer.resblocks  # every demo model is an open_clip VisionTransformer
        chosen, development = choose_setting(
            model, tokenizer, args.device, args.choose_layers or list(range(-1, -len(blocks) - 1, -1)),
            args.choose_coes, args.modes, args.dev_scenes, args.dev_seed_base, args.query,
        )  # fmt: skip
        print(f"development scenes ({args.dev_scenes} per canvas kind, seeds {args.dev_seed_base}+):")
        print("| layer | combine | enhance_coe | square | non-square | mean |\n|---|---|---|---|---|---|")
        for row in development:
            coe = "-" if row.enhance_coe is None else f"{row.enhance_coe:g}"
            print(f"| {row.layer} | {row.mode} | {coe} | {row.square:.3f} | {row.non_square:.3f} | {row.mean:.3f} |")
        print(f"chosen: layer {chosen.layer}, combine {chosen.mode}, enhance_coe {chosen.enhance_coe}\n")
    layer_arg = chosen.layer if chosen is not None else args.layer
    coe_arg = chosen.enhance_coe if chosen is not None and chosen.enhance_coe is not None else args.enhance_coe
    attributor = ClipAttributor(
        "demo", layer=layer_arg, device=args.device, enhance_coe=coe_arg, model=model, tokenizer=tokenizer
    )
    layer = attributor.layer - len(attributor.blocks)
    if args.kinds:
        run_kinds(attributor, args, layer, started)
        return
    retrieval = retrieval_top1(attributor, args.retrieval_scenes, args.seed_base + 500_000)
    print(f"held-out retrieval on {retrieval['scenes']} scenes (groups of 100):")
    print(f"  caption->image top-1 {retrieval['caption_to_image_top1']:.3f}")
    print(f"  image->caption top-1 {retrieval['image_to_caption_top1']:.3f}  (chance 0.010)")

    results = []
    for canvas, square in CANVASES:
        scenes = held_out_scenes(args.scenes, args.seed_base + CANVAS_SEED_OFFSET[canvas], square)
        results.extend(pointing_game(attributor, scenes, canvas, args.modes, args.query))
    pooling = type(attributor.tower.pooling).__name__
    print(
        f"\npointing game ({pooling}), layer {layer}, enhance_coe {attributor.enhance_coe:g}, {args.scenes} scenes per"
        f" canvas kind, 2-5 objects, query {args.query!r}:"
    )
    print("| combine | canvas | queries | pointing | energy in box | random baseline |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.mode} | {r.canvas} | {r.queries} | {r.pointing:.3f} | {r.energy:.3f} | {r.baseline:.3f} |")
    best = max(args.modes, key=lambda m: np.mean([r.pointing for r in results if r.mode == m]))
    print(f"\nbest combine mode by mean pointing: {best}  ({time.time() - started:.0f}s)")
    if chosen is not None:
        test = {r.canvas: r.pointing for r in results if r.mode == chosen.mode}
        print(f"mode chosen on development scenes, {chosen.mode}: square {test['square']:.3f}, ", end="")
        print(f"non-square {test['non-square']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "retrieval": retrieval,
                    "pointing": [r.__dict__ for r in results],
                    "best_mode": best,
                    "layer": layer,
                    "enhance_coe": attributor.enhance_coe,
                    "query": args.query,
                    "weights": args.weights or "shipped",
                    "pooling": pooling,
                    **(
                        {
                            "chosen": asdict(chosen),
                            "development": [asdict(row) for row in development],
                            "dev_seed_base": args.dev_seed_base,
                            "dev_scenes": args.dev_scenes,
                        }
                        if chosen is not None
                        else {}
                    ),
                },
                handle,
                indent=1,
            )


def run_kinds(attributor: ClipAttributor, args: argparse.Namespace, layer: int, started: float) -> None:
    """``--kinds``: pointing per reference kind and canvas kind, then caption -> image retrieval; prints a
    Markdown table and writes ``--json``."""
    seed_base = args.dev_seed_base if args.kinds_on == "dev" else args.seed_base
    results = []
    for canvas, square in CANVASES:
        scenes = held_out_scenes(args.scenes, seed_base + CANVAS_SEED_OFFSET[canvas], square)
        results.extend(reference_pointing(attributor, scenes, canvas, args.tolerance))
    retrieval = retrieval_top1(attributor, args.retrieval_scenes, args.seed_base + 500_000)
    print(
        f"pointing per reference kind ({args.kinds_on} scenes, seeds {seed_base}+, {args.scenes} per canvas kind, "
        f"2-5 objects; layer {layer}, {attributor.combine}, enhance_coe {attributor.enhance_coe:g}; hit = argmax "
        f"within {args.tolerance:g} px of a target's pixels):"
    )
    print("| kind | canvas | queries | pointing | random baseline |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r.kind} | {r.canvas} | {r.queries} | {r.pointing:.3f} | {r.baseline:.3f} |")
    print(f"caption->image top-1 {retrieval['caption_to_image_top1']:.3f}, image->caption top-1 ", end="")
    print(f"{retrieval['image_to_caption_top1']:.3f}  ({time.time() - started:.0f}s)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "kinds": [asdict(r) for r in results],
                    "retrieval": retrieval,
                    "scenes": args.kinds_on,
                    "seed_base": seed_base,
                    "tolerance": args.tolerance,
                    "layer": layer,
                    "combine": attributor.combine,
                    "enhance_coe": attributor.enhance_coe,
                    "weights": args.weights or "shipped",
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
