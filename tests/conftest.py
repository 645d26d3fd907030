"""Shared fixtures: tiny random-weight CLIP models (no network, no pretrained weights)."""

from __future__ import annotations

import functools

import open_clip
import pytest
import torch
from PIL import Image

from api_tool.backends.clip import ClipAttributor
from tests.sample_images import noise

TINY_CLIP_MAP_TERMS = 256
"""About how many float32 terms the sums behind one tiny-CLIP map entry hold (width 48 over 17 tokens,
then a 32-wide projection and a dot product): two correct paths (batch vs loop, fast vs literal, AVX2 vs
AVX-512) may differ within that sum's rounding band, scaled by the map's magnitude."""


def build_tiny_clip(seed: int = 0, image_size: int = 64, patch_size: int = 16, layers: int = 3) -> open_clip.CLIP:
    """A random-weight open_clip CLIP small enough for CPU tests (4x4 grid at 64 px by default)."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(
            layers=layers, width=48, head_width=16, patch_size=patch_size, image_size=image_size
        ),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval()


@functools.cache
def shared_tiny_attributor() -> ClipAttributor:
    """One tiny CLIP attributor per test session, for tests that build many tools (standard suites)."""
    return ClipAttributor(
        "tiny", model=build_tiny_clip(), tokenizer=open_clip.get_tokenizer("ViT-B-32"), device="cpu", layer=-2
    )


@pytest.fixture(scope="session")
def clip_tokenizer() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture
def tiny_clip_attributor(clip_tokenizer: open_clip.tokenizer.SimpleTokenizer) -> ClipAttributor:
    return ClipAttributor("tiny", model=build_tiny_clip(), tokenizer=clip_tokenizer, device="cpu", layer=-2)


@pytest.fixture
def noise_image() -> Image.Image:
    return noise(0)
