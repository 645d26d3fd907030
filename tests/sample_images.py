"""Images for tests: seeded noise, and the base64 PNG form messages and tools carry."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image


def noise(seed: int, size: tuple[int, int] = (80, 48)) -> Image.Image:
    """A seeded RGB noise image of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def png_base64(image: Image.Image) -> str:
    """``image`` as a base64 PNG string (encoded here, independently of ``api_tool.images``)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_block(block: dict[str, Any]) -> Image.Image:
    """The RGB image of a standard base64 image content block."""
    return Image.open(io.BytesIO(base64.b64decode(block["base64"]))).convert("RGB")
