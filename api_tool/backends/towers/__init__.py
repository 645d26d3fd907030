"""Vision-tower adapters: one per kind of tower, all behind the same Psi maths (``towers/base.py``).

Each adapter is a CLIP-side row of ``api_tool.families`` (backend ``"clip"``, ``adapter_path``); a model
finds its adapter through the table, and an architecture no adapter decomposes is refused by name,
from its config, before any weights load (``check_open_clip_config``; ``hf:`` specs are checked by
``config.model_type`` in ``towers/hf.py``).

Example:
    >>> from api_tool.backends.towers import check_open_clip_config
    >>> check_open_clip_config("RN50", {"vision_cfg": {"layers": [3, 4, 6, 3]}})
    Traceback (most recent call last):
    ...
    api_tool.errors.UnsupportedModelError: RN50: a ResNet image tower has no tokens to attribute; ...
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from api_tool.backends.towers.base import SUPPORTED_TOWERS, VisionTower, unsupported

TIMM_VIT_MODULES = ("vision_transformer",)
"""timm modules whose models the timm adapter decomposes (EVA's rotary towers are not among them)."""


def tower_classes() -> list[type[VisionTower]]:
    """The adapter classes of the table's CLIP-side families, in table order."""
    from api_tool.families import FAMILIES

    classes = []
    for entry in FAMILIES:
        if entry.backend == "clip" and entry.adapter_path is not None:
            module, _, name = entry.adapter_path.partition(":")
            classes.append(getattr(import_module(module), name))
    return classes


def tower_for(model: Any, processor: Any = None, model_name: str = "model") -> VisionTower:
    """The adapter of a loaded model's image tower (``processor``: a transformers model's processor), or
    ``UnsupportedModelError`` naming the towers that work."""
    for tower_class in tower_classes():
        if tower_class.accepts(model):
            return tower_class(model, processor, model_name)  # type: ignore[call-arg]
    visual = getattr(model, "visual", None)
    described = type(visual).__name__ if visual is not None else type(model).__name__
    raise unsupported(f"{model_name}: a {described} image tower cannot be decomposed")


def check_open_clip_config(model_name: str, config: dict[str, Any]) -> None:
    """Refuse, from an open_clip model config and before any weights load, an image tower no adapter
    decomposes: ResNets, ConvNeXt / Swin / FastViT / ViTamin and other non-ViT timm towers, EVA's rotary
    ViTs, average-pooled ViTs (CLIPA) and MLP projection heads."""
    vision = config.get("vision_cfg", {})
    if isinstance(vision.get("layers"), (list, tuple)):
        raise unsupported(f"{model_name}: a ResNet image tower has no tokens to attribute")
    timm_name = vision.get("timm_model_name")
    if timm_name:
        import timm

        if not timm.models.is_model_in_modules(timm_name, TIMM_VIT_MODULES):
            raise unsupported(f"{model_name}: its timm tower {timm_name!r} is not a plain ViT")
        pool, proj = vision.get("timm_pool", "avg"), vision.get("timm_proj", "linear")
        if pool not in ("map", "token", "") or proj == "mlp":
            raise unsupported(f"{model_name}: its timm tower pools with {pool!r} / projects with {proj!r}")
        return
    if vision.get("pool_type", "tok") != "tok" or isinstance(vision.get("attentional_pool"), str):
        raise unsupported(f"{model_name}: its tower pools with {vision.get('pool_type')!r}, not a token or a probe")
    custom = ["qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"]
    if any(vision.get(key) for key in custom) or vision.get("block_type") == "custom":
        raise unsupported(f"{model_name}: custom attention blocks ({', '.join(k for k in custom if vision.get(k))})")


__all__ = ["SUPPORTED_TOWERS", "VisionTower", "check_open_clip_config", "tower_classes", "tower_for"]
