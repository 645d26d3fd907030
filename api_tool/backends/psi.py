"""The Psi maths of API-CLIP on any pooled vision tower: small pure functions on tensors.

A vision tower pools its tokens into one vector before the projection, either through a CLS token
(OpenAI CLIP, EVA, DFN, MetaCLIP) or through an attention-pool probe, a learned query that attends over
every final token (SigLIP, SigLIP2, CoCa). Both pool through one attention row, and that row splits
exactly into one term per token (``pooled_query_terms``):

    out = sum_m [ sum_h A_h[q, m] (V_h[m] W_O,h) + b_O / N ]

* CLS towers: the row is the CLS token's in block l; the terms go through the final LayerNorm with the
  CLS token's own final statistics frozen (``FrozenLayerNorm``), then the projection (``Affine``).
* Attention-pool towers: the row is the probe's, over the final normed tokens, so its terms sum to the
  pooled vector ``p`` exactly. SigLIP then adds ``MLP(LayerNorm(p))``, which is not linear; two ways to
  hand it to the tokens (``split_branch``): ``"first_order"`` gives token m ``(I + J) t_m`` with ``J`` the
  branch's Jacobian at ``p`` and leaves ``branch(p) - J p`` as a bias; ``"residual"`` keeps the residual
  path only (token m keeps ``t_m``) and leaves ``branch(p)`` as a bias. Both sum to the pooled output.
  ``"first_order"`` is the default: on random-weight SigLIP towers it predicts leaving tokens out far
  better and agrees better with the exact leave-one-token-out effect (``benchmarks/pool_mlp_treatment.py``).

Psi_comp reads a token's residual stream after block l the way the pooled vector is read (the same frozen
norms and maps), with the norm's mean and bias split over ``2L - 1`` parts as the reference does.

Example:
    >>> import torch
    >>> in_proj = torch.cat([torch.eye(4)] * 3)  # q, k, v: identities
    >>> weights = AttentionWeights.from_in_proj(in_proj, torch.zeros(12), torch.eye(4), torch.zeros(4), 2)
    >>> tokens = torch.randn(1, 5, 4)
    >>> terms = pooled_query_terms(tokens[:, 0], tokens, weights)
    >>> terms.shape
    torch.Size([1, 5, 4])
    >>> head = tokens[0, :, :2]  # head 0 reads channels 0 and 1
    >>> attention = torch.softmax(head[:1] @ head.T / 2**0.5, dim=-1)
    >>> bool(torch.allclose(terms.sum(1)[0, :2], (attention @ head)[0], atol=1e-6))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch

PoolMlp = Literal["first_order", "residual"]
POOL_MLP_MODES: tuple[PoolMlp, ...] = ("first_order", "residual")
HeadNorm = Callable[[torch.Tensor], torch.Tensor]
"""A per-head norm on queries or keys ``(B, H, T, head_dim)`` (timm's ``qk_norm``)."""


@dataclass(frozen=True)
class AttentionWeights:
    """One multi-head attention's projections in ``nn.Linear`` layout (``(out, in)``), with its scale.

    ``q_norm`` / ``k_norm`` act per head on queries / keys (``None``: no norm).

    Example:
        >>> mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        >>> AttentionWeights.from_multihead(mha).num_heads
        2
    """

    w_q: torch.Tensor
    b_q: torch.Tensor
    w_k: torch.Tensor
    b_k: torch.Tensor
    w_v: torch.Tensor
    b_v: torch.Tensor
    w_o: torch.Tensor
    b_o: torch.Tensor
    num_heads: int
    scale: float
    q_norm: HeadNorm | None = None
    k_norm: HeadNorm | None = None

    @classmethod
    def from_in_proj(
        cls,
        in_proj_weight: torch.Tensor,
        in_proj_bias: torch.Tensor | None,
        out_proj_weight: torch.Tensor,
        out_proj_bias: torch.Tensor | None,
        num_heads: int,
    ) -> AttentionWeights:
        """From a fused ``(3 D, D)`` q/k/v projection (``nn.MultiheadAttention``, timm's ``qkv``)."""
        w_q, w_k, w_v = in_proj_weight.chunk(3, dim=0)
        width = w_q.shape[0]
        bias = in_proj_bias if in_proj_bias is not None else in_proj_weight.new_zeros(3 * width)
        b_q, b_k, b_v = bias.chunk(3, dim=0)
        b_o = out_proj_bias if out_proj_bias is not None else out_proj_weight.new_zeros(out_proj_weight.shape[0])
        return cls(w_q, b_q, w_k, b_k, w_v, b_v, out_proj_weight, b_o, num_heads, (width // num_heads) ** -0.5)

    @classmethod
    def from_multihead(cls, attention: torch.nn.MultiheadAttention) -> AttentionWeights:
        """From ``nn.MultiheadAttention``, with a fused or (``kdim != embed_dim``) a split projection."""
        out = attention.out_proj
        if attention.in_proj_weight is not None:
            return cls.from_in_proj(
                attention.in_proj_weight, attention.in_proj_bias, out.weight, out.bias, attention.num_heads
            )
        width = attention.embed_dim
        bias = attention.in_proj_bias if attention.in_proj_bias is not None else out.weight.new_zeros(3 * width)
        b_q, b_k, b_v = bias.chunk(3, dim=0)
        b_o = out.bias if out.bias is not None else out.weight.new_zeros(out.weight.shape[0])
        return cls(
            attention.q_proj_weight,
            b_q,
            attention.k_proj_weight,
            b_k,
            attention.v_proj_weight,
            b_v,
            out.weight,
            b_o,
            attention.num_heads,
            (width // attention.num_heads) ** -0.5,
        )

    def to(self, dtype: torch.dtype, device: torch.device) -> AttentionWeights:
        """The same weights in ``dtype`` on ``device`` (the per-head norms follow their input)."""
        names = ("w_q", "b_q", "w_k", "b_k", "w_v", "b_v", "w_o", "b_o")
        return replace(self, **{name: getattr(self, name).to(device=device, dtype=dtype) for name in names})

    def value_out(self, x: torch.Tensor, share: float) -> torch.Tensor:
        """``x`` through the value and output projections of every head at attention weight 1, biases
        divided by ``share``: how the pooled output reads a token's content."""
        return (x @ self.w_v.T + self.b_v / share) @ self.w_o.T + self.b_o / share


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    return x.view(batch, tokens, num_heads, width // num_heads).transpose(1, 2)


def pooled_query_terms(query: torch.Tensor, keys: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """Per-token terms of one query's attention output, ``(B, N, D_out)``.

    ``query`` is the query's input ``(B, D_q)`` (the CLS token's normed state, or the probe), ``keys``
    the normed tokens it attends over ``(B, N, D_k)``. Row m is ``sum_h A_h[m] V_h[m] W_O,h^T + b_O / N``;
    the rows sum to the attention output at the query.
    """
    batch, tokens, _ = keys.shape
    heads = weights.num_heads
    q = _heads((query @ weights.w_q.T + weights.b_q)[:, None], heads)
    k = _heads(keys @ weights.w_k.T + weights.b_k, heads)
    v = _heads(keys @ weights.w_v.T + weights.b_v, heads)
    if weights.q_norm is not None:
        q = weights.q_norm(q)
    if weights.k_norm is not None:
        k = weights.k_norm(k)
    row = torch.softmax((q @ k.transpose(-1, -2)) * weights.scale, dim=-1)  # (B, H, 1, N)
    weighted = (row.transpose(-1, -2) * v).transpose(1, 2).reshape(batch, tokens, -1)
    return weighted @ weights.w_o.T + weights.b_o / tokens


def cls_contributions(
    x_ln: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Per-token contributions to the CLS token's attention output, ``(B, N, D)``.

    ``x_ln`` is the block's LayerNorm-ed input ``(B, N, D)`` (token 0 is CLS). Row m is
    ``sum_h A_h[0, m] V_h[m] W_O,h^T + b_O / N``; the rows sum to the attention output at CLS.
    """
    weights = AttentionWeights.from_in_proj(in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads)
    return pooled_query_terms(x_ln[:, 0], x_ln, weights)


def linearized_layer_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    share: float,
) -> torch.Tensor:
    """The final LayerNorm as a linear map with frozen statistics, split evenly over ``share`` parts.

    ``(x - mean / share) * weight / std + bias / share``; ``mean`` and ``std`` broadcast against ``x``.
    ``share = inf`` gives a part no share of the mean and bias.
    """
    return (x - mean / share) * (weight / std) + bias / share


@dataclass(frozen=True)
class FrozenLayerNorm:
    """A LayerNorm whose statistics are frozen at the vectors it normalised: linear in its input.

    Example:
        >>> ln = torch.nn.LayerNorm(4)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(FrozenLayerNorm.at(x, ln)(x, share=1), ln(x), atol=1e-6)
        True
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def at(cls, x: torch.Tensor, norm: torch.nn.LayerNorm) -> FrozenLayerNorm:
        """Frozen at ``x`` (any leading shape; statistics over the last axis, kept for broadcasting)."""
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mean = x.mean(dim=-1, keepdim=True)
        std = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)
        width = x.shape[-1]
        weight = norm.weight if norm.weight is not None else torch.ones(width, device=x.device)
        bias = norm.bias if norm.bias is not None else torch.zeros(width, device=x.device)
        return cls(mean, std, weight.to(x.dtype), bias.to(x.dtype))

    def to(self, dtype: torch.dtype) -> FrozenLayerNorm:
        """The same map with its statistics and affine parameters in ``dtype`` (computed in float32 for a
        half-precision input by ``at``, then rounded once)."""
        return FrozenLayerNorm(self.mean.to(dtype), self.std.to(dtype), self.weight.to(dtype), self.bias.to(dtype))

    def __call__(self, x: torch.Tensor, share: float) -> torch.Tensor:
        return linearized_layer_norm(x, self.mean, self.std, self.weight, self.bias, share)


@dataclass(frozen=True)
class Affine:
    """``x @ weight + bias`` (``weight`` is ``(D_in, D_out)``), the bias split over ``share`` parts.

    Example:
        >>> Affine.identity(3, torch.float32)(torch.ones(2, 3), share=1).shape
        torch.Size([2, 3])
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def identity(cls, width: int, dtype: torch.dtype, device: torch.device | None = None) -> Affine:
        """The identity on ``width`` channels."""
        return cls(torch.eye(width, dtype=dtype, device=device))

    def then(self, other: Affine) -> Affine:
        """This map followed by ``other``."""
        bias = None if self.bias is None else self.bias @ other.weight
        if other.bias is not None:
            bias = other.bias if bias is None else bias + other.bias
        return Affine(self.weight @ other.weight, bias)

    def to(self, dtype: torch.dtype, device: torch.device) -> Affine:
        """The same map in ``dtype`` on ``device``."""
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return Affine(self.weight.to(device=device, dtype=dtype), bias)

    def __call__(self, x: torch.Tensor, share: float) -> torch.Tensor:
        out = x @ self.weight
        return out if self.bias is None else out + self.bias / share


@dataclass(frozen=True)
class BranchSplit:
    """The pooled terms after a residual branch ``y = p + branch(p)``: ``tokens.sum(1) + bias = y``, and
    ``read`` maps any other vectors (Psi_comp) the way the tokens' terms were mapped."""

    tokens: torch.Tensor
    bias: torch.Tensor
    read: Callable[[torch.Tensor], torch.Tensor]


def split_branch(terms: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], mode: PoolMlp) -> BranchSplit:
    """Hand a nonlinear residual branch (SigLIP's ``MLP(LayerNorm(p))``) to the terms ``(B, N, D)`` of
    ``p = terms.sum(1)``.

    ``"first_order"``: token m gets ``t_m + J t_m`` with ``J`` the branch's Jacobian at ``p`` (forward-mode
    AD, no matrix is formed), the bias is ``branch(p) - J p``. ``"residual"``: token m keeps ``t_m``, the
    bias is ``branch(p)``. Exact in both cases: the tokens plus the bias give ``p + branch(p)``.

    Example:
        >>> mlp = torch.nn.Sequential(torch.nn.LayerNorm(4), torch.nn.Linear(4, 4), torch.nn.GELU())
        >>> terms = torch.randn(2, 6, 4)
        >>> split = split_branch(terms, mlp, "first_order")
        >>> p = terms.sum(1)
        >>> torch.allclose(split.tokens.sum(1) + split.bias, p + mlp(p), atol=1e-5)
        True
    """
    pooled = terms.sum(dim=1)
    value = branch(pooled)
    if mode == "residual":
        return BranchSplit(terms, value, lambda vectors: vectors)

    def jacobian_times(vectors: torch.Tensor) -> torch.Tensor:
        at = pooled[:, None].expand_as(vectors).contiguous()
        return torch.func.jvp(branch, (at,), (vectors.contiguous(),))[1]

    along_pooled = jacobian_times(pooled[:, None])[:, 0]
    return BranchSplit(terms + jacobian_times(terms), value - along_pooled, lambda v: v + jacobian_times(v))


def residual_share(num_blocks: int) -> float:
    """How many parts the reference splits the final norm's mean and bias into for one token's
    residual stream (Psi_comp): ``2L - 1``."""
    return float(2 * num_blocks - 1)


def rest_share(parts: int, share: float) -> float:
    """The share of one more part that completes ``parts`` parts of share ``share`` to a whole (``1 / (1 -
    parts / share)``; ``inf`` when they already make the whole)."""
    remainder = 1.0 - parts / share
    return math.inf if abs(remainder) < 1e-12 else 1.0 / remainder
