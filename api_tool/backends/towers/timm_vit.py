"""open_clip image towers built on a timm ``VisionTransformer`` (``TimmModel``): pre-norm blocks with a
fused ``qkv`` projection, pooled by a CLS token (``global_pool='token'``: MobileCLIP2-L-14, timm's
``vit_*_clip`` DFN / MetaCLIP ports) or by timm's attention-pool head (``global_pool='map'``:
SigLIP and SigLIP2, ``ViT-B-16-SigLIP2``, ``ViT-SO400M-14-SigLIP-384``, ...).

timm's ``AttentionPoolLatent`` is a latent query attending over the final normed tokens, its
output projection, then ``x + mlp(norm(x))``: the probe, its attention and the residual branch of
``ProbePooling``. EVA towers (rotary embeddings) and non-ViT timm towers are refused.

Example:
    >>> import open_clip
    >>> model = open_clip.create_model("ViT-B-16-SigLIP2")  # doctest: +SKIP
    >>> TimmVitTower(model).pooling.branch is not None  # doctest: +SKIP
    True
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from PIL import Image

from api_tool.backends.psi import AttentionWeights
from api_tool.backends.towers.base import (
    ClsPooling,
    PreparedImage,
    ProbePooling,
    VisionTower,
    affine_of,
    check_layer_norm,
    head_norm,
    unsupported,
)
from api_tool.backends.towers.open_clip_vit import letterbox_input


def timm_attention(attention: Any, where: str) -> AttentionWeights:
    """The projections of timm's ``Attention`` (fused ``qkv``, optional per-head q/k LayerNorms), or a
    refusal for attention that normalises or gates its output."""
    from timm.layers import Attention

    if type(attention) is not Attention:
        raise unsupported(f"{where} is a {type(attention).__name__}")
    if not isinstance(attention.norm, torch.nn.Identity) or attention.gate is not None:
        raise unsupported(f"{where} normalises or gates its output, which does not split over tokens")
    weights = AttentionWeights.from_in_proj(
        attention.qkv.weight, attention.qkv.bias, attention.proj.weight, attention.proj.bias, attention.num_heads
    )
    return replace(
        weights,
        scale=float(attention.scale),
        q_norm=head_norm(attention.q_norm, f"{where}'s q_norm"),
        k_norm=head_norm(attention.k_norm, f"{where}'s k_norm"),
    )


def latent_pool(pool: Any, width: int) -> tuple[torch.Tensor, AttentionWeights]:
    """The probe and the attention of timm's ``AttentionPoolLatent`` (one latent query)."""
    if pool.latent_len != 1 or pool.pool != "token" or pool.pos_embed is not None or pool.mlp is None:
        raise unsupported("the attention pool has several latents, a position embedding or no MLP")
    if isinstance(pool.q, torch.nn.Linear):
        w_q, b_q = pool.q.weight, pool.q.bias
    else:
        w_q, b_q = torch.eye(width, dtype=pool.latent.dtype, device=pool.latent.device), None
    w_k, w_v = pool.kv.weight.chunk(2, dim=0)
    b_k, b_v = (pool.kv.bias.chunk(2, dim=0)) if pool.kv.bias is not None else (None, None)
    zeros = torch.zeros(width, dtype=w_k.dtype, device=w_k.device)
    weights = AttentionWeights(
        w_q=w_q,
        b_q=b_q if b_q is not None else zeros,
        w_k=w_k,
        b_k=b_k if b_k is not None else zeros,
        w_v=w_v,
        b_v=b_v if b_v is not None else zeros,
        w_o=pool.proj.weight,
        b_o=pool.proj.bias if pool.proj.bias is not None else zeros,
        num_heads=pool.num_heads,
        scale=float(pool.scale),
        q_norm=head_norm(pool.q_norm, "the pool's q_norm"),
        k_norm=head_norm(pool.k_norm, "the pool's k_norm"),
    )
    return pool.latent[0, 0], weights


class TimmVitTower(VisionTower):
    """An open_clip model whose ``visual`` is a ``TimmModel`` over a timm ``VisionTransformer``."""

    family: ClassVar[str] = "timm_vit"

    def __init__(self, model: torch.nn.Module, processor: object = None, model_name: str = "model") -> None:
        super().__init__()
        from open_clip.timm_model import TimmModel
        from timm.models.vision_transformer import Block, VisionTransformer

        visual = getattr(model, "visual", None)
        trunk = getattr(visual, "trunk", None)
        if not isinstance(visual, TimmModel) or type(trunk) is not VisionTransformer:
            raise unsupported(f"{model_name}: the timm tower is a {type(trunk).__name__}")
        for index, block in enumerate(trunk.blocks):
            if type(block) is not Block:
                raise unsupported(f"{model_name}: block {index} is a {type(block).__name__}")
        if not isinstance(trunk.fc_norm, torch.nn.Identity):
            raise unsupported(f"{model_name}: the tower normalises after pooling ({trunk.global_pool!r} pooling)")
        self.model = model
        self.module = visual
        self.blocks = trunk.blocks
        self.prefix_tokens = int(trunk.num_prefix_tokens)
        self.input = letterbox_input(visual)
        width = int(trunk.embed_dim)
        head = affine_of([trunk.head, visual.head], width)
        final_norm = check_layer_norm(trunk.norm, "the final norm")
        if trunk.attn_pool is not None:
            pool = trunk.attn_pool
            query, attention = latent_pool(pool, width)
            self.pooling: ClsPooling | ProbePooling = ProbePooling(
                query=query,
                attention=attention,
                token_norm=final_norm,
                head=head,
                branch=torch.nn.Sequential(check_layer_norm(pool.norm, "the pool's norm"), pool.mlp),
                first_key=0 if trunk.pool_include_prefix else self.prefix_tokens,
            )
        elif trunk.global_pool == "token" and trunk.cls_token is not None:
            self.pooling = ClsPooling(final_norm, head)
        else:
            raise unsupported(f"{model_name}: the tower pools with {trunk.global_pool!r}, not a token or a probe")
        self.grid = (int(trunk.patch_embed.grid_size[0]), int(trunk.patch_embed.grid_size[1]))

    @classmethod
    def accepts(cls, model: object) -> bool:
        from open_clip.timm_model import TimmModel

        return isinstance(getattr(model, "visual", None), TimmModel)

    def prepare(self, image: Image.Image) -> PreparedImage:
        assert self.input is not None
        return self.input.prepare(image, self.grid)

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.input is not None
        dtype = self.module.trunk.patch_embed.proj.weight.dtype
        return self.model.encode_image(self.input.normalize(inputs["pixels"]).to(dtype), normalize=False)  # type: ignore[operator,no-any-return]

    def block_norm(self, block: torch.nn.Module) -> torch.nn.LayerNorm:
        return check_layer_norm(block.norm1, "norm1")

    def block_attention(self, block: torch.nn.Module) -> AttentionWeights:
        return timm_attention(block.attn, "the block's attention")

    def layer_scale(self, block: torch.nn.Module) -> torch.Tensor | None:
        scale: Any = block.ls1
        return getattr(scale, "gamma", None)
