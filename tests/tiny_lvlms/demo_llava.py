"""The demo LLaVA's training recipe (``training.train_llava``) at test sizes: 64 px inputs with 8-px patches, two
blocks in each tower, on the CPU.

Example:
    >>> tiny_train_config(seed=1).side, CELLS
    (64, 64)
"""

from __future__ import annotations

from typing import Any

from training.train_llava import TrainConfig

SIDE, PATCH = 64, 8
CELLS = (SIDE // PATCH) ** 2
"""Image tokens of the tiny model: an 8 x 8 patch grid."""


def tiny_train_config(**changes: Any) -> TrainConfig:
    """``TrainConfig`` at the test sizes; ``changes`` override any field."""
    sizes: dict[str, Any] = {
        "device": "cpu",
        "side": SIDE,
        "patch": PATCH,
        "hidden": 64,
        "layers": 2,
        "vision_hidden": 32,
        "vision_layers": 2,
        "vision_heads": 2,
    }
    return TrainConfig(**{**sizes, **changes})
