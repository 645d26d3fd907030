"""Which way of handing an attention pool's MLP to the tokens points better: first order or residual only?

A SigLIP-style tower pools with a probe that attends over the final tokens; its output ``p`` splits
exactly into per-token terms ``t_m``, and the pooled embedding is ``y = p + g(p)`` with ``g`` the pool's
``MLP(LayerNorm(.))``. ``api_tool.backends.psi.split_branch`` hands ``g`` to the tokens in two ways:
``first_order`` (token m gets ``(I + J) t_m``, ``J`` = the Jacobian of ``g`` at ``p``) and ``residual``
(token m keeps ``t_m``). Both sum to ``y`` exactly (with their bias), so they differ only in what they
say about parts of the image. Without trained weights, this script asks, on random-weight towers:

1. Reconstruction: remove a set ``R`` of tokens' terms from the pool (``p -> p - sum_R t_m``); how well
   does ``y . u - sum_R map_m(u)`` predict the true ``y(p - sum_R t_m) . u`` for random text directions
   ``u``? Error relative to the true change, for leave-one-out, 10 % and 50 % removed.
2. Agreement with the exact leave-one-token-out effect on the pooled score ``y . u``, per token, three
   ways of leaving a token out: (i) its term removed from ``p``, (ii) its key masked in the probe's
   attention (softmax renormalised over the others), (iii) the token dropped from the whole tower
   (every block runs without it). Pearson and Spearman correlation over tokens between the map and the
   effect, and how often both put their maximum on the same token.

Two regimes of random weights: timm's initialisation (near-uniform probe attention, a small MLP) and
``peaked`` (probe queries and keys scaled up, the MLP's output layer scaled up), closer to what trained
SigLIP towers do (sharp probe attention, an MLP output as large as ``p``). Images: the project's
synthetic scenes (square and non-square canvases, letterboxed as the attributor does). Run::

    .venv/bin/python benchmarks/pool_mlp_treatment.py --configs small --images 4          # CPU, ~1 min
    .venv/bin/python benchmarks/pool_mlp_treatment.py --configs small base so400m --device cuda \\
        --json benchmarks/results/pool_mlp_treatment.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.timm_model import TimmModel

from api_tool.backends.psi import POOL_MLP_MODES
from api_tool.backends.towers.base import ProbePooling
from api_tool.backends.towers.timm_vit import TimmVitTower
from api_tool.demo.scenes import generate_scene

CONFIGS: dict[str, dict[str, Any]] = {
    "small": {"name": "vit_base_patch16_siglip_224", "embed_dim": 192, "depth": 6, "num_heads": 3, "img_size": 128},
    "base": {"name": "vit_base_patch16_siglip_224"},
    "so400m": {"name": "vit_so400m_patch14_siglip_224"},
}
"""Towers: timm's SigLIP ViTs with random weights (``small``: 64 tokens; ``base``: ViT-B-16-SigLIP, 196
tokens; ``so400m``: ViT-SO400M-14-SigLIP, 256 tokens)."""
REGIMES = ("timm", "peaked")
PEAKED_QK = 4.0
PEAKED_MLP = 4.0
REMOVED_FRACTIONS = (None, 0.1, 0.5)  # None: one token (leave-one-out)


class VisionOnly(torch.nn.Module):
    """The shape ``TimmVitTower`` reads from an open_clip model: ``visual`` and ``encode_image``."""

    def __init__(self, visual: TimmModel) -> None:
        super().__init__()
        self.visual = visual

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.visual(pixels)


def build(config: dict[str, Any], regime: str, seed: int, device: str) -> VisionOnly:
    """A random-weight SigLIP tower as open_clip builds it (``TimmModel``, map pool, no projection)."""
    import timm

    torch.manual_seed(seed)
    overrides = {k: v for k, v in config.items() if k != "name"}
    visual = TimmModel(config["name"], embed_dim=0, pool="map", proj="none")
    if overrides:
        visual.trunk = timm.create_model(config["name"], num_classes=0, global_pool="map", **overrides)
        visual.image_size = (overrides["img_size"], overrides["img_size"])
    visual.preprocess_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    pool = visual.trunk.attn_pool
    with torch.no_grad():
        for name, parameter in visual.named_parameters():  # timm starts biases at zero
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.02)
        if regime == "peaked":
            pool.q.weight.mul_(PEAKED_QK)
            pool.kv.weight[: pool.kv.weight.shape[0] // 2].mul_(PEAKED_QK)
            pool.latent.normal_(0.0, 1.0)
            pool.mlp.fc2.weight.mul_(PEAKED_MLP)
    return VisionOnly(visual).to(device).eval()


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Correlation over the last axis."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks over the last axis (ties broken by order)."""
    return x.argsort(-1).argsort(-1).to(x.dtype)


def agreement(maps: torch.Tensor, effects: torch.Tensor) -> dict[str, float]:
    """``maps`` and ``effects`` are ``(U, N)``: one row per text direction."""
    return {
        "pearson": float(pearson(maps, effects).mean()),
        "spearman": float(pearson(ranks(maps), ranks(effects)).mean()),
        "same_argmax": float((maps.argmax(-1) == effects.argmax(-1)).double().mean()),
    }


@torch.no_grad()
def leave_one_out_whole_tower(model: VisionOnly, pixels: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(N, D)``: the pooled embedding with each token dropped from the sequence before the blocks."""
    trunk = model.visual.trunk
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixels))))[0]
    tokens = x.shape[0]
    keep = torch.stack([torch.cat([torch.arange(m), torch.arange(m + 1, tokens)]) for m in range(tokens)])
    out = []
    for rows in keep.to(x.device).split(chunk):
        out.append(trunk.forward_head(trunk.norm(trunk.blocks(x[rows]))))
    return torch.cat(out)


@torch.no_grad()
def leave_one_out_masked_key(model: VisionOnly, pixels: torch.Tensor) -> torch.Tensor:
    """``(N, D)``: the pooled embedding with each token's key masked in the probe's attention."""
    trunk = model.visual.trunk
    normed = trunk.forward_features(pixels)[0]
    tokens = normed.shape[0]
    mask = torch.zeros(tokens, 1, 1, tokens, device=normed.device, dtype=normed.dtype)
    mask[torch.arange(tokens), 0, 0, torch.arange(tokens)] = float("-inf")
    return trunk.attn_pool(normed.expand(tokens, -1, -1), attn_mask=mask)


def measure(model: VisionOnly, image: Any, directions: torch.Tensor, rng: np.random.Generator, chunk: int) -> dict:
    """Every number of the module docstring for one tower and one image (float64 maths)."""
    tower = TimmVitTower(model)
    inputs = {k: v.to(directions.device) for k, v in tower.batch([tower.prepare(image)]).items()}
    with torch.no_grad():
        parts = {mode: tower.decompose(inputs, len(tower.blocks) - 1, mode) for mode in POOL_MLP_MODES}
    terms = {mode: part.terms[0].double() for mode, part in parts.items()}  # (N, D)
    t = terms["residual"]
    y = parts["residual"].embedding[0].double()
    p = t.sum(0)
    pooling = tower.pooling
    assert isinstance(pooling, ProbePooling) and pooling.branch is not None
    branch = pooling.branch

    def pooled(q: torch.Tensor) -> torch.Tensor:
        return q + branch(q)

    pixels = tower.input.normalize(inputs["pixels"]).double()  # type: ignore[union-attr]
    with torch.no_grad():
        tokens = t.shape[0]
        result: dict[str, Any] = {
            "tokens": tokens,
            "y_from_p_error": float((pooled(p) - y).norm() / y.norm()),
            "mlp_to_p_norm": float(branch(p).norm() / p.norm()),
            "probe_entropy": probe_entropy(model, pixels, pooling),
        }
        # 1. reconstruction of partial pools
        for fraction in REMOVED_FRACTIONS:
            label = "leave_one_out" if fraction is None else f"removed_{int(fraction * 100)}pct"
            errors = {mode: [] for mode in POOL_MLP_MODES}
            changes = []
            for _ in range(16):
                size = 1 if fraction is None else max(1, round(fraction * tokens))
                removed = torch.as_tensor(rng.choice(tokens, size=size, replace=False), device=t.device)
                truth = pooled(p - t[removed].sum(0)) @ directions.T  # (U,)
                changes.append((y @ directions.T - truth).abs())
                for mode in POOL_MLP_MODES:
                    predicted = (y - terms[mode][removed].sum(0)) @ directions.T
                    errors[mode].append((predicted - truth).abs())
            scale = torch.cat(changes).mean()
            result[label] = {mode: float(torch.cat(errors[mode]).mean() / scale) for mode in POOL_MLP_MODES}
        # linearisation error of first order, leave-one-out, per token
        exact = y - pooled(p[None] - t)  # (N, D): y(p) - y(p - t_m)
        first = terms["first_order"]
        result["first_order_taylor_error"] = float(((exact - first).norm(dim=-1) / exact.norm(dim=-1)).median())
        # 2. agreement with leave-one-out effects
        effects = {
            "term_removed": exact,
            "key_masked": y - leave_one_out_masked_key(model, pixels),
            "token_dropped": y - leave_one_out_whole_tower(model, pixels, chunk),
        }
        for name, effect in effects.items():
            truth = directions @ effect.T  # (U, N)
            result[name] = {mode: agreement(directions @ terms[mode].T, truth) for mode in POOL_MLP_MODES}
    return result


def probe_entropy(model: VisionOnly, pixels: torch.Tensor, pooling: ProbePooling) -> float:
    """The probe attention's entropy over the tokens, as a fraction of the uniform one (head average)."""
    normed = model.visual.trunk.forward_features(pixels)[0]
    weights = pooling.attention
    heads = weights.num_heads
    q = (pooling.query @ weights.w_q.T + weights.b_q).view(heads, -1)
    k = (normed @ weights.w_k.T + weights.b_k).view(normed.shape[0], heads, -1).transpose(0, 1)
    attention = torch.softmax((k @ q[:, :, None])[..., 0] * weights.scale, dim=-1)  # (H, N)
    entropy = -(attention * attention.clamp_min(1e-300).log()).sum(-1)
    return float((entropy / math.log(normed.shape[0])).mean())


def mean_of(rows: Sequence[dict]) -> dict:
    """Average nested dicts of floats."""
    first = rows[0]
    if isinstance(first, dict):
        return {key: mean_of([row[key] for row in rows]) for key in first}
    return float(np.mean(rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["small"], choices=sorted(CONFIGS))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    parser.add_argument("--images", type=int, default=8, help="scenes per tower (half of them non-square)")
    parser.add_argument("--directions", type=int, default=32, help="random text directions per image")
    parser.add_argument("--seeds", type=int, default=2, help="random towers per config and regime")
    parser.add_argument("--chunk", type=int, default=64, help="sequences per batch in the whole-tower leave-one-out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json)}, "towers": {}}
    for config_name in args.configs:
        for regime in args.regimes:
            rows = []
            started = time.time()
            for seed in range(args.seeds):
                model = build(CONFIGS[config_name], regime, seed, args.device).double()
                width = model.visual.trunk.embed_dim
                generator = torch.Generator().manual_seed(seed)
                directions = torch.randn(args.directions, width, generator=generator, dtype=torch.float64)
                directions = (directions / directions.norm(dim=-1, keepdim=True)).to(args.device)
                rng = np.random.default_rng(seed)
                for index in range(args.images):
                    size = (224, 224) if index % 2 == 0 else (320, 180)
                    image = generate_scene(10_000 * seed + index, size=size).image
                    rows.append(measure(model, image, directions, rng, args.chunk))
            summary = mean_of(rows)
            summary["seconds"] = round(time.time() - started, 1)
            results["towers"][f"{config_name}/{regime}"] = summary
            print(
                f"\n== {config_name} / {regime}: {summary['tokens']:.0f} tokens, |g(p)|/|p| = "
                f"{summary['mlp_to_p_norm']:.3f}, probe entropy / uniform {summary['probe_entropy']:.3f}, "
                f"y from p error {summary['y_from_p_error']:.1e}, first-order Taylor error (leave-one-out, "
                f"median) {summary['first_order_taylor_error']:.3f}"
            )
            print("reconstruction error relative to the true change (lower is better):")
            for label in ("leave_one_out", "removed_10pct", "removed_50pct"):
                cells = ", ".join(f"{mode} {summary[label][mode]:.4f}" for mode in POOL_MLP_MODES)
                print(f"  {label:14s} {cells}")
            print("agreement with the exact leave-one-token-out effect (pearson / spearman / same argmax):")
            for name in ("term_removed", "key_masked", "token_dropped"):
                cells = "; ".join(
                    f"{mode} {summary[name][mode]['pearson']:.3f} / {summary[name][mode]['spearman']:.3f} / "
                    f"{summary[name][mode]['same_argmax']:.2f}"
                    for mode in POOL_MLP_MODES
                )
                print(f"  {name:14s} {cells}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
