"""Semantic checks on the second shipped demo, SigLIP-style (offline, CPU): it loads by its registry spec with
its own attribution defaults and its map points at the queried object.

The weights (``api_tool/demo/weights/siglip``) were trained by ``training.train_clip --loss sigmoid --pool
attention`` on synthetic scenes; its defaults (Psi_comp after block -3 through the attention pool) were chosen
on development scenes by ``benchmarks/demo_clip_quality.py --choose``. The scene is a fixed seed on which
every object's best cell beats every cell outside its box by 0.30 or more of the mask's range (asserted:
0.25), so a sign error, a transposed grid or a misaligned letterbox fails, and machine rounding cannot.
"""

from __future__ import annotations

import numpy as np
import pytest

from api_tool.backends.clip import ClipAttributor
from api_tool.backends.registry import AttributorSpec, get_attributor
from api_tool.backends.towers.base import ProbePooling
from api_tool.demo.clip_model import DEMO_SIGLIP_DIR
from api_tool.demo.scenes import generate_scene

SQUARE, WIDE = (224, 224), (320, 192)


@pytest.fixture(scope="module")
def siglip() -> ClipAttributor:
    if not (DEMO_SIGLIP_DIR / "model.safetensors").is_file():
        pytest.fail(f"the demo SigLIP weights are missing from {DEMO_SIGLIP_DIR}")
    attributor = get_attributor("demo-siglip", device="cpu")
    assert isinstance(attributor, ClipAttributor)
    return attributor


def test_demo_siglip_is_a_small_attention_pool_model_with_its_own_defaults(siglip: ClipAttributor) -> None:
    assert (DEMO_SIGLIP_DIR / "model.safetensors").stat().st_size <= 8 * 1024 * 1024
    assert (
        AttributorSpec.parse("demo-siglip")
        == AttributorSpec.parse("clip:demo-siglip")
        == AttributorSpec("clip", "demo-siglip")
    )
    assert isinstance(siglip.tower.pooling, ProbePooling)
    assert (siglip.layer - len(siglip.blocks), siglip.combine) == (-3, "comp")


@pytest.mark.parametrize("size", [SQUARE, WIDE], ids=["square", "non-square"])
def test_demo_siglip_map_points_at_the_queried_object(siglip: ClipAttributor, size: tuple[int, int]) -> None:
    picture = generate_scene(11, size=size, n_objects=3, background="noise")
    queries = [f"where is the {obj.name}?" for obj in picture.objects]
    for obj, amap in zip(picture.objects, siglip.attribute_many(picture.image, queries)):
        mask = amap.upsample()
        x0, y0, x1, y1 = obj.box
        outside = mask.copy()
        outside[y0:y1, x0:x1] = -np.inf
        assert mask[y0:y1, x0:x1].max() - outside.max() > 0.25, (obj.name, obj.box)
        assert amap.metadata["model"] == "demo-siglip"
