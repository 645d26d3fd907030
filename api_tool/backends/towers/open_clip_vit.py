"""open_clip's own ``VisionTransformer``: a CLS token (OpenAI CLIP, LAION, DFN, MetaCLIP) or CoCa's
attention pool (``attentional_pool=True``: query 0 of ``attn_pool`` is the pooled vector, then ``ln_post``
and ``proj``).

Example:
    >>> import open_clip
    >>> model = open_clip.create_model("ViT-B-32")  # doctest: +SKIP
    >>> OpenClipVitTower(model).pooling.head.weight.shape  # doctest: +SKIP
    torch.Size([768, 512])
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from api_tool.backends.psi import Affine, AttentionWeights
from api_tool.backends.towers.base import (
    ClsPooling,
    LetterboxInput,
    PreparedImage,
    ProbePooling,
    VisionTower,
    check_layer_norm,
    square_side,
    unsupported,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def letterbox_input(visual: torch.nn.Module) -> LetterboxInput:
    """The square input of an open_clip image tower, with the mean and std open_clip recorded for it."""
    preprocess_cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = tuple(float(v) for v in preprocess_cfg.get("mean", OPENAI_MEAN))
    std = tuple(float(v) for v in preprocess_cfg.get("std", OPENAI_STD))
    return LetterboxInput(square_side(visual.image_size), mean, std)  # type: ignore[arg-type]


class OpenClipVitTower(VisionTower):
    """An open_clip model whose ``visual`` is open_clip's ``VisionTransformer``."""

    family: ClassVar[str] = "clip"

    def __init__(self, model: torch.nn.Module, processor: object = None, model_name: str = "model") -> None:
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise unsupported(f"{model_name}: the image tower is a {type(visual).__name__}")
        for block in visual.transformer.resblocks:
            if type(block) is not ResidualAttentionBlock or not isinstance(block.attn, torch.nn.MultiheadAttention):
                raise unsupported(f"{model_name}: custom attention blocks ({type(block).__name__})")
        if visual.proj is None:
            raise unsupported(f"{model_name}: the tower has no projection")
        self.model = model
        self.module = visual
        self.blocks = visual.transformer.resblocks
        self.prefix_tokens = 1
        self.input = letterbox_input(visual)
        head = Affine(visual.proj)
        if visual.attn_pool is None:
            if visual.pool_type != "tok":
                raise unsupported(f"{model_name}: the tower pools with {visual.pool_type!r}, not a token")
            self.pooling: ClsPooling | ProbePooling = ClsPooling(check_layer_norm(visual.ln_post, "ln_post"), head)
        else:
            pooler = visual.attn_pool
            if visual.attn_pool_contrastive is not None or visual.pool_type != "tok":
                raise unsupported(f"{model_name}: only CoCa's attention pool (query 0, then ln_post) is decomposed")
            ln_q = check_layer_norm(pooler.ln_q, "attn_pool.ln_q")
            with torch.no_grad():
                query = ln_q(pooler.query[:1])[0]
            self.pooling = ProbePooling(
                query=query,
                attention=AttentionWeights.from_multihead(pooler.attn),
                token_norm=check_layer_norm(pooler.ln_k, "attn_pool.ln_k"),
                head=head,
                post_norm=check_layer_norm(visual.ln_post, "ln_post"),
            )
        self.grid = (int(visual.grid_size[0]), int(visual.grid_size[1]))

    @classmethod
    def accepts(cls, model: object) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(getattr(model, "visual", None), VisionTransformer)

    def prepare(self, image: Image.Image) -> PreparedImage:
        assert self.input is not None
        return self.input.prepare(image, self.grid)

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.input is not None
        pixels = self.input.normalize(inputs["pixels"]).to(self.module.conv1.weight.dtype)
        return self.model.encode_image(pixels, normalize=False)  # type: ignore[operator,no-any-return]

    def block_norm(self, block: torch.nn.Module) -> torch.nn.LayerNorm:
        return check_layer_norm(block.ln_1, "ln_1")

    def block_attention(self, block: torch.nn.Module) -> AttentionWeights:
        return AttentionWeights.from_multihead(block.attn)  # type: ignore[arg-type]

    def layer_scale(self, block: torch.nn.Module) -> torch.Tensor | None:
        scale: Any = block.ls_1
        return getattr(scale, "gamma", None)
