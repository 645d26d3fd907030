"""The contract of a vision-tower adapter, and the one Psi pipeline all towers share.

An adapter says where a tower keeps what the Psi maths needs: its blocks, each block's pre-attention
norm, attention projections and layer scale, how many prefix tokens (CLS, registers) come before the
patches, how it pools (``ClsPooling`` or ``ProbePooling``), how an image becomes its input, and how the
model's own forward gives the image embedding. ``VisionTower.decompose`` runs that forward once with
hooks on block l and on the final norm, and returns every token's share of the pooled embedding
(``Decomposition``).

Example:
    >>> from api_tool.backends.towers import tower_for
    >>> tower = tower_for(model)  # doctest: +SKIP
    >>> parts = tower.decompose(tower.batch([tower.prepare(image)]), layer=-2, pool_mlp="first_order")  # doctest: +SKIP
    >>> torch.allclose(parts.terms.sum(1) + parts.bias, parts.embedding)  # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from api_tool.backends.psi import (
    Affine,
    AttentionWeights,
    FrozenLayerNorm,
    HeadNorm,
    PoolMlp,
    pooled_query_terms,
    residual_share,
    rest_share,
    split_branch,
)
from api_tool.errors import UnsupportedModelError
from api_tool.geometry import GridBox, Letterbox

SUPPORTED_TOWERS = (
    "open_clip VisionTransformer with a CLS token or CoCa's attention pool (ViT-B-32, ViT-L-14-336, coca_ViT-B-32, "
    "...); open_clip timm ViTs with a CLS token or an attention-pool head (ViT-B-16-SigLIP, ViT-B-16-SigLIP2, "
    "ViT-SO400M-14-SigLIP-384, MobileCLIP2-L-14, ...); transformers CLIPModel, SiglipModel and Siglip2Model "
    "('hf:<hub id or directory>')"
)
"""The towers that can be decomposed, for error messages."""


def unsupported(what: str) -> UnsupportedModelError:
    """An ``UnsupportedModelError`` that names the towers that work."""
    return UnsupportedModelError(f"{what}; API-CLIP decomposes these towers: {SUPPORTED_TOWERS}")


@dataclass(frozen=True)
class PreparedImage:
    """One image as its tower's input (tensors with a batch axis of one) and where it lies on the grid.

    Images whose ``grid`` is the same batch together (``VisionTower.batch``).
    """

    inputs: dict[str, torch.Tensor]
    grid: tuple[int, int]
    grid_box: GridBox


@dataclass(frozen=True)
class ClsPooling:
    """The pooled token is the CLS token at position 0: its final state goes through ``final_norm`` and
    ``head``; Psi_cls is its attention row in block l."""

    final_norm: torch.nn.LayerNorm
    head: Affine


@dataclass(frozen=True)
class ProbePooling:
    """An attention-pool probe: ``query`` (the input of the probe's q projection) attends over the final
    tokens from ``first_key`` on, after ``token_norm``; then an optional residual ``branch`` (SigLIP's
    ``MLP(LayerNorm(.))``), an optional ``post_norm`` (CoCa's ``ln_post``) and ``head``."""

    query: torch.Tensor
    attention: AttentionWeights
    token_norm: torch.nn.LayerNorm
    head: Affine
    branch: torch.nn.Module | None = None
    post_norm: torch.nn.LayerNorm | None = None
    first_key: int = 0


@dataclass(frozen=True)
class Decomposition:
    """One image pass split over its ``N`` tokens (prefix tokens first), in the embedding space.

    ``terms[:, m]`` is token m's share of the unnormalised image embedding (Psi_cls before the text:
    through block l's CLS row, or through the probe) and ``terms.sum(1) + bias == embedding`` (exact for
    the linear parts; ``bias`` holds the rest: the CLS token's other paths, or what a pool's MLP does
    that is not handed to tokens). ``comp[:, m]`` is token m's residual stream after block l read the
    same way (Psi_comp before the text).
    """

    terms: torch.Tensor
    bias: torch.Tensor
    comp: torch.Tensor
    embedding: torch.Tensor


@dataclass
class _Trace:
    block_input: torch.Tensor | None = None
    block_output: torch.Tensor | None = None
    final: torch.Tensor | None = None


@dataclass(frozen=True)
class LetterboxInput:
    """A square model input: images are letterboxed onto ``side x side`` with the mean colour, then
    normalised with ``mean`` / ``std`` on the model's device."""

    side: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def fill(self) -> tuple[int, int, int]:
        """The letterbox colour: the mean, which normalises to zero."""
        red, green, blue = (round(255 * m) for m in self.mean)
        return (red, green, blue)

    def letterbox(self, image: Image.Image) -> tuple[np.ndarray, Letterbox]:
        """The image letterboxed to the square input, ``(S, S, 3)`` uint8, and the geometry."""
        letterbox = Letterbox.fit(image.size, self.side)
        return np.asarray(letterbox.apply(image, self.fill), dtype=np.uint8), letterbox

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, S, S, 3)`` uint8 pixels (on any device) to the normalised ``(B, 3, S, S)`` input."""
        mean, std = channel_constants(self.mean, self.std, pixels.device)
        return ((pixels.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)

    def prepare(self, image: Image.Image, grid: tuple[int, int]) -> PreparedImage:
        """One image as uint8 ``pixels`` (normalised later, on the device) on a ``grid`` of patches."""
        pixels, letterbox = self.letterbox(image)
        return PreparedImage({"pixels": torch.from_numpy(pixels.copy())[None]}, grid, letterbox.grid_box(grid))


@functools.lru_cache(maxsize=16)
def channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 tensors on ``device``, made once (no host-to-device copy per call,
    which a CUDA graph capture would refuse)."""
    return torch.tensor(mean, device=device), torch.tensor(std, device=device)


def square_side(size: int | Sequence[int]) -> int:
    """The side of a square model input, or ``UnsupportedModelError`` for a non-square one."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise UnsupportedModelError(f"non-square model inputs ({height}x{width}) are not supported")
    return int(height)


def check_layer_norm(module: object, where: str) -> torch.nn.LayerNorm:
    """``module`` if it is a LayerNorm (the only norm the linearisation handles), else a refusal."""
    if not isinstance(module, torch.nn.LayerNorm):
        raise unsupported(f"{where} is a {type(module).__name__}, not a LayerNorm")
    return module


def head_norm(module: torch.nn.Module, where: str) -> HeadNorm | None:
    """A per-head LayerNorm on queries or keys as a function in its input's dtype (``None`` for
    ``nn.Identity``), or a refusal for another norm."""
    if isinstance(module, torch.nn.Identity):
        return None
    norm = check_layer_norm(module, where)
    return lambda x: _layer_norm(x, norm)


def affine_of(modules: Sequence[torch.nn.Module], width: int) -> Affine:
    """The affine map of a chain of ``nn.Linear`` / ``nn.Identity`` / ``nn.Dropout`` modules (a tower's
    projection head), or a refusal for anything else (an MLP head is not linear)."""
    reference = next((parameter for module in modules for parameter in module.parameters()), None)
    dtype = reference.dtype if reference is not None else torch.float32
    device = reference.device if reference is not None else None
    total = Affine.identity(width, dtype, device)
    for module in modules:
        for part in module.children() if isinstance(module, torch.nn.Sequential) else (module,):
            if isinstance(part, torch.nn.Linear):
                total = total.then(Affine(part.weight.T.to(dtype), None if part.bias is None else part.bias.to(dtype)))
            elif not isinstance(part, (torch.nn.Identity, torch.nn.Dropout)):
                raise unsupported(f"the projection head holds a {type(part).__name__}, which is not linear")
    return total


class VisionTower(ABC):
    """One vision tower, seen the way the Psi maths needs it (see the module docstring).

    Subclasses set ``module`` (the image tower, whose forward hooks see one call per image pass),
    ``blocks``, ``prefix_tokens`` and ``pooling``, and implement the abstract methods.
    """

    family: ClassVar[str]
    """The tower's row in ``api_tool.families``."""

    module: torch.nn.Module
    blocks: Sequence[torch.nn.Module]
    prefix_tokens: int
    pooling: ClsPooling | ProbePooling
    input: LetterboxInput | None = None
    """The square letterbox input, or ``None`` for a tower with its own geometry (Siglip2's NaFlex)."""

    @classmethod
    @abstractmethod
    def accepts(cls, model: object) -> bool:
        """Whether ``model`` has this kind of tower (its constructor then checks the details)."""

    @abstractmethod
    def prepare(self, image: Image.Image) -> PreparedImage:
        """One image as the tower's input."""

    @abstractmethod
    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own image forward on a batch (on the model's device): the unnormalised embedding."""

    @abstractmethod
    def block_norm(self, block: torch.nn.Module) -> torch.nn.LayerNorm:
        """The norm in front of a block's attention."""

    @abstractmethod
    def block_attention(self, block: torch.nn.Module) -> AttentionWeights:
        """A block's attention projections."""

    def __init__(self) -> None:
        self._branches: dict[tuple[torch.dtype, torch.device], torch.nn.Module] = {}

    def layer_scale(self, block: torch.nn.Module) -> torch.Tensor | None:
        """The per-channel scale on a block's attention output (``None``: none)."""
        return None

    # -- shared ------------------------------------------------------------------------------------

    def batch(self, prepared: Sequence[PreparedImage]) -> dict[str, torch.Tensor]:
        """Inputs of images on one grid concatenated into one batch."""
        return {name: torch.cat([p.inputs[name] for p in prepared]) for name in prepared[0].inputs}

    @property
    def final_module(self) -> torch.nn.Module:
        """The module whose input is the final residual stream (the CLS token's, or every token's)."""
        pooling = self.pooling
        return pooling.final_norm if isinstance(pooling, ClsPooling) else pooling.token_norm

    def decompose(
        self,
        inputs: dict[str, torch.Tensor],
        layer: int,
        pool_mlp: PoolMlp,
        compute_dtype: torch.dtype | None = None,
    ) -> Decomposition:
        """Run one batch through the model and split its embedding over the tokens, in ``compute_dtype``
        (``None``: float32; float64 for a float64 model; a half-precision ``compute_dtype`` keeps the
        LayerNorm statistics in float32 and rounds them once). ``layer`` is a non-negative block index;
        ``pool_mlp`` how a pool's MLP is handed to the tokens (``api_tool.backends.psi.split_branch``)."""
        with self._trace(self.blocks[layer]) as trace:
            embedding = self.embed(inputs)
        assert trace.block_input is not None and trace.block_output is not None and trace.final is not None
        dtype = compute_dtype or (torch.float64 if embedding.dtype == torch.float64 else torch.float32)
        block_input, block_output = trace.block_input.to(dtype), trace.block_output.to(dtype)
        final, embedding = trace.final.to(dtype), embedding.to(dtype)
        if isinstance(self.pooling, ClsPooling):
            return self._decompose_cls(self.blocks[layer], block_input, block_output, final, embedding)
        return self._decompose_probe(block_output, final, embedding, pool_mlp)

    def _decompose_cls(
        self,
        block: torch.nn.Module,
        block_input: torch.Tensor,
        block_output: torch.Tensor,
        final: torch.Tensor,
        embedding: torch.Tensor,
    ) -> Decomposition:
        pooling = self.pooling
        assert isinstance(pooling, ClsPooling)
        dtype, device = block_input.dtype, block_input.device
        x_ln = _layer_norm(block_input, self.block_norm(block))
        contributions = pooled_query_terms(x_ln[:, 0], x_ln, self.block_attention(block).to(dtype, device))
        scale = self.layer_scale(block)
        if scale is not None:
            contributions = contributions * scale.to(device=device, dtype=dtype)
        cls_final = (final[:, 0] if final.dim() == 3 else final)[:, None]  # (B, 1, D)
        norm = FrozenLayerNorm.at(cls_final, pooling.final_norm).to(dtype)
        head = pooling.head.to(dtype, device)
        tokens = block_input.shape[1]
        comp_share = residual_share(len(self.blocks))
        share = comp_share * tokens
        rest = cls_final - contributions.sum(dim=1, keepdim=True)
        left = rest_share(tokens, share)
        return Decomposition(
            terms=head(norm(contributions, share), share),
            bias=head(norm(rest, left), left)[:, 0],
            comp=head(norm(block_output, comp_share), comp_share),
            embedding=embedding,
        )

    def _decompose_probe(
        self, block_output: torch.Tensor, final: torch.Tensor, embedding: torch.Tensor, pool_mlp: PoolMlp
    ) -> Decomposition:
        pooling = self.pooling
        assert isinstance(pooling, ProbePooling)
        dtype, device = final.dtype, final.device
        attention = pooling.attention.to(dtype, device)
        query = pooling.query.to(device=device, dtype=dtype).expand(final.shape[0], -1)
        attended = final[:, pooling.first_key :]
        terms = pooled_query_terms(query, _layer_norm(attended, pooling.token_norm), attention)
        comp_share = residual_share(len(self.blocks))
        token_norm = FrozenLayerNorm.at(final, pooling.token_norm).to(dtype)
        comp = attention.value_out(token_norm(block_output, comp_share), comp_share)
        bias = terms.new_zeros(terms.shape[0], terms.shape[2])
        if pooling.branch is not None:
            split = split_branch(terms, self._branch_in(pooling.branch, dtype, terms.device), pool_mlp)
            terms, bias, comp = split.tokens, split.bias, split.read(comp)
        parts = terms.shape[1] + 1  # the attended tokens and the bias
        if pooling.post_norm is not None:
            pooled = terms.sum(dim=1) + bias
            post = FrozenLayerNorm.at(pooled[:, None], pooling.post_norm).to(dtype)
            terms, bias, comp = post(terms, parts), post(bias[:, None], parts)[:, 0], post(comp, comp_share)
        head = pooling.head.to(dtype, device)
        terms = head(terms, parts)
        skipped = terms.new_zeros(terms.shape[0], pooling.first_key, terms.shape[2])  # tokens the probe ignores
        return Decomposition(
            terms=torch.cat([skipped, terms], dim=1),
            bias=head(bias, parts),
            comp=head(comp, comp_share),
            embedding=embedding,
        )

    def _branch_in(self, branch: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """The residual branch in the dtype the maths runs in (a float copy of a half-precision branch)."""
        if next(branch.parameters()).dtype == dtype:
            return branch
        if (dtype, device) not in self._branches:
            self._branches[(dtype, device)] = copy.deepcopy(branch).to(device=device, dtype=dtype)
        return self._branches[(dtype, device)]

    @contextmanager
    def _trace(self, block: torch.nn.Module) -> Iterator[_Trace]:
        trace = _Trace()

        def before_block(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            trace.block_input = args[0] if args else kwargs["hidden_states"]

        def after_block(_module: torch.nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            trace.block_output = output[0] if isinstance(output, tuple) else output

        def before_final(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            trace.final = args[0]

        handles = [
            block.register_forward_pre_hook(before_block, with_kwargs=True),
            block.register_forward_hook(after_block),
            self.final_module.register_forward_pre_hook(before_final),
        ]
        try:
            yield trace
        finally:
            for handle in handles:
                handle.remove()


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """``norm(x)`` computed in ``x``'s dtype."""
    weight = None if norm.weight is None else norm.weight.to(x.dtype)
    bias = None if norm.bias is None else norm.bias.to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def module_branch(norm: torch.nn.Module, mlp: torch.nn.Module) -> torch.nn.Module:
    """A pool's residual branch ``mlp(norm(x))`` as one module."""
    return torch.nn.Sequential(norm, mlp)
