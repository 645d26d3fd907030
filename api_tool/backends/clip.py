"""API-CLIP: query-guided attribution from an open_clip vision transformer.

With a ViT of ``L`` blocks and ``N`` tokens (CLS + patches), at block ``l``:

* Psi_cls[m] is token m's contribution to the CLS token through block l's attention,
  ``c_m = sum_h A_h[0, m] (V_h[m] W_O,h) + b_O / N``, taken through the final LayerNorm linearised
  with the CLS token's own final statistics, ``(c_m - mu / ((2L-1) N)) * gamma / sigma +
  beta / ((2L-1) N)``, projected by ``proj``, divided by the norm of the unnormalised image
  embedding and dotted with the normalised text embedding.
* Psi_comp[m] is the patch token's residual stream after block l, through the same linearisation
  with ``2L-1`` in place of ``(2L-1) N``, projected, divided by the same norm, dotted with the text.

Both are linear in the text embedding, so the image pass is independent of the query: it is run once
per image (and cached by image content) and every question costs one text pass and two small
matrix-vector products. Only block l's CLS attention row is computed; nothing per head or per layer
is materialised beyond it.

Example:
    >>> from api_tool.backends.clip import ClipAttributor
    >>> attributor = ClipAttributor("demo")  # doctest: +SKIP
    >>> amap = attributor.attribute("scene.png", "where is the red circle?")  # doctest: +SKIP
    >>> amap.mask.shape  # doctest: +SKIP
    (14, 14)
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from api_tool.backends.base import check_query, model_lock, resolve_device, resolve_layer
from api_tool.errors import (
    InvalidQueryError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from api_tool.geometry import GridBox, Letterbox
from api_tool.images import ImageRef, load_image
from api_tool.maps import AttributionMap, Combine, combine_maps

Tokenizer = Callable[[Sequence[str]], torch.Tensor]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_HOST = "huggingface.co"
LOCAL_DIR_PREFIX = "local-dir:"
HUB_PROBE_TIMEOUT_S = 3.0


# ----------------------------------------------------------------------------------------------
# The maths: small pure functions on tensors.
# ----------------------------------------------------------------------------------------------


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
    batch, tokens, width = x_ln.shape
    head_dim = width // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3, dim=0)
    b_q, b_k, b_v = in_proj_bias.chunk(3, dim=0)
    q = (x_ln[:, :1] @ w_q.T + b_q).view(batch, 1, num_heads, head_dim).transpose(1, 2)
    k = (x_ln @ w_k.T + b_k).view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    v = (x_ln @ w_v.T + b_v).view(batch, tokens, num_heads, head_dim).transpose(1, 2)
    cls_row = torch.softmax((q @ k.transpose(-1, -2)) / head_dim**0.5, dim=-1)  # (B, H, 1, N)
    weighted = (cls_row.transpose(-1, -2) * v).transpose(1, 2).reshape(batch, tokens, width)
    return weighted @ out_proj_weight.T + out_proj_bias / tokens


def linearized_layer_norm(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    share: float,
) -> torch.Tensor:
    """The final LayerNorm as a linear map with frozen statistics, split evenly over ``share`` parts.

    ``(x - mean / share) * weight / std + bias / share``; ``mean`` and ``std`` are ``(B, 1, 1)``.
    """
    return (x - mean / share) * (weight / std) + bias / share


def project_tokens(
    tokens: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    proj: torch.Tensor,
    embedding_norm: torch.Tensor,
    share: float,
) -> torch.Tensor:
    """Tokens ``(B, N, D)`` into the joint embedding space ``(B, N, E)``, scaled like the image embedding."""
    linear = linearized_layer_norm(tokens, mean, std, ln_weight, ln_bias, share)
    return (linear @ proj) / embedding_norm[:, None, None]


def score_tokens(projected: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """``(B, N, E) x (B, E) -> (B, N)``: each token's dot product with its query's text embedding."""
    return torch.einsum("bne,be->bn", projected, text_embeddings)


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` without the padding positions after the longest query's end token.

    The text tower is causal and pools at the end token (the largest id), so positions after it change
    nothing; cutting them makes short questions several times cheaper. Other text towers fall back to
    ``encode_text``.
    """
    import open_clip

    if type(model) is not open_clip.CLIP or model.text_pool_type != "argmax" or model.attn_mask is None:
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(pooled)
    return pooled @ model.text_projection if model.text_projection is not None else pooled


# ----------------------------------------------------------------------------------------------
# The image pass.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipImageFeatures:
    """The query-independent result of one image pass: patch tokens in embedding space.

    ``cls_tokens`` (Psi_cls before the text) and ``comp_tokens`` (Psi_comp before the text) are
    ``(P, E)`` float32 CPU/GPU tensors for the ``P = rows * cols`` patches, row-major.
    """

    cls_tokens: torch.Tensor
    comp_tokens: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]
    grid_box: GridBox


@dataclass
class _Captured:
    block_input: torch.Tensor | None = None
    block_output: torch.Tensor | None = None
    final_cls: torch.Tensor | None = None


@contextmanager
def _capture(visual: torch.nn.Module, block: torch.nn.Module) -> Iterator[_Captured]:
    captured = _Captured()

    def before_block(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.block_input = args[0]

    def after_block(_module: torch.nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured.block_output = output

    def before_ln_post(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        captured.final_cls = x[:, 0] if x.dim() == 3 else x

    handles = [
        block.register_forward_pre_hook(before_block),
        block.register_forward_hook(after_block),
        visual.ln_post.register_forward_pre_hook(before_ln_post),
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class ClipAttributor:
    """API-CLIP attributor over any open_clip ViT.

    Args:
        model_name: an open_clip model name ("ViT-L-14-336", "ViT-B-32", ...), a local open_clip
            model directory (``"local-dir:PATH"`` or a plain directory path holding
            ``open_clip_config.json`` and weights), or ``"demo"`` for the small model shipped with
            the package (works offline).
        pretrained: an open_clip pretrained tag ("openai", ...), a local checkpoint path, or ``None``
            for random weights (tests). Ignored for ``"demo"``.
        layer: block index into the visual transformer; negative counts from the end. ``None``: the
            model's own default if it carries one (``ATTRIBUTION_DEFAULTS_ATTRIBUTE``; the demo CLIP
            does, see ``api_tool.demo.DEMO_CLIP_RECOMMENDED``), else -2, the paper's second-to-last block.
        device: "cuda", "mps", "cpu" or ``None`` (CUDA, then MPS, then CPU).
        enhance_coe, kernel_size: post-processing, see ``api_tool.maps.combine_maps``; ``enhance_coe``
            ``None``: the model's own default, else the paper's 10.
        combine: how Psi_cls and Psi_comp make the mask; ``None``: the model's own default, else
            ``"paper"``.
        cache_size: how many images' features to keep (keyed by image content).
        model, tokenizer: an already-built open_clip model and its tokenizer, to share one model.

    Example:
        >>> attributor = ClipAttributor("ViT-B-32", pretrained=None, device="cpu")  # doctest: +SKIP
        >>> maps = attributor.attribute_many(image, ["where is the cat?", "where is the dog?"])  # doctest: +SKIP
    """

    name = "clip"

    def __init__(
        self,
        model_name: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        layer: int | None = None,
        device: str | torch.device | None = None,
        enhance_coe: float | None = None,
        kernel_size: int = 3,
        combine: Combine | None = None,
        cache_size: int = 32,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if model is None:
            model, tokenizer, pretrained = load_clip(model_name, pretrained)
        elif tokenizer is None:
            raise UnsupportedModelError("pass the tokenizer together with an already-built model")
        assert tokenizer is not None
        self.model_name = model_name
        self.pretrained = pretrained
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.visual = _checked_visual(self.model, model_name)
        self.blocks = self.visual.transformer.resblocks
        recommended = recommended_settings(model)
        self.layer = resolve_layer(
            layer if layer is not None else recommended["layer"], len(self.blocks), "vision transformer"
        )
        self.enhance_coe = float(enhance_coe if enhance_coe is not None else recommended["enhance_coe"])
        self.kernel_size = kernel_size
        self.combine: Combine = combine if combine is not None else recommended["combine"]
        combine_maps(np.zeros((2, 2)), np.zeros((2, 2)), combine=self.combine, kernel_size=kernel_size)
        self.side = _input_side(self.visual)
        preprocess_cfg = getattr(self.visual, "preprocess_cfg", None) or {}
        self.mean = tuple(float(v) for v in preprocess_cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(float(v) for v in preprocess_cfg.get("std", OPENAI_STD))
        self.fill = tuple(round(255 * m) for m in self.mean)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, ClipImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self._forward_lock = model_lock(self.model)

    # -- public API ----------------------------------------------------------------------------

    def attribute(self, image: ImageRef, query: str) -> AttributionMap:
        """The map for one image and one query."""
        return self.attribute_many(image, [query])[0]

    def attribute_many(self, image: ImageRef, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per query on the same image: one (cached) image pass, one batched text pass."""
        features = self.image_features(image)
        texts = self.encode_queries(queries)
        return [self._map(features, text, query) for text, query in zip(texts, queries)]

    def attribute_batch(self, images: Sequence[ImageRef], queries: Sequence[str]) -> list[AttributionMap]:
        """One map per ``(images[i], queries[i])``; uncached images run through the model as one batch."""
        if len(images) != len(queries):
            raise InvalidQueryError(f"got {len(images)} images but {len(queries)} queries; pass one query per image")
        features = self.image_features_batch(images)
        texts = self.encode_queries(queries)
        return [self._map(feat, text, query) for feat, text, query in zip(features, texts, queries)]

    def image_features(self, image: ImageRef) -> ClipImageFeatures:
        """The cached, query-independent image pass for one image."""
        return self.image_features_batch([image])[0]

    def image_features_batch(self, images: Sequence[ImageRef]) -> list[ClipImageFeatures]:
        """Image passes for several images, batching those not in the cache."""
        loaded = [load_image(image) for image in images]
        if self.cache_size == 0:
            return self._run_images(loaded)
        keys = [image_key(image) for image in loaded]
        with self._lock:
            found = {key: self._cache[key] for key in keys if key in self._cache}
        missing = list(dict.fromkeys(key for key in keys if key not in found))
        if missing:
            first_index = {key: keys.index(key) for key in missing}
            fresh = self._run_images([loaded[first_index[key]] for key in missing])
            found.update(zip(missing, fresh))
            with self._lock:
                for key, feat in zip(missing, fresh):
                    self._cache[key] = feat
                    self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return [found[key] for key in keys]

    @torch.inference_mode()
    def encode_queries(self, queries: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``(Q, E)`` (float32) of the raw queries (no prompt template)."""
        cleaned = [check_query(query) for query in queries]
        tokens = self.tokenizer(cleaned).to(self.device)
        return F.normalize(encode_text_trimmed(self.model, tokens).float(), dim=-1)

    def letterbox(self, image: Image.Image) -> tuple[np.ndarray, Letterbox]:
        """The image letterboxed to the model's square input, ``(S, S, 3)`` uint8, and the geometry."""
        letterbox = Letterbox.fit(image.size, self.side)
        return np.asarray(letterbox.apply(image, self.fill), dtype=np.uint8), letterbox

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, S, S, 3)`` uint8 pixels (on any device) to the model's normalised ``(B, 3, S, S)`` input."""
        mean = torch.tensor(self.mean, device=pixels.device)
        std = torch.tensor(self.std, device=pixels.device)
        return ((pixels.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, Letterbox]:
        """Letterbox and normalise one image: ``(3, S, S)`` float tensor and the geometry."""
        pixels, letterbox = self.letterbox(image)
        return self.normalize(torch.from_numpy(pixels.copy())[None])[0], letterbox

    # -- internals -----------------------------------------------------------------------------

    @torch.inference_mode()
    def _run_images(self, images: Sequence[Image.Image]) -> list[ClipImageFeatures]:
        prepared = [self.letterbox(image) for image in images]
        batch = torch.from_numpy(np.stack([pixels for pixels, _ in prepared])).to(self.device)
        pixels = self.normalize(batch).to(self.visual.conv1.weight.dtype)
        block = self.blocks[self.layer]
        with self._forward_lock, _capture(self.visual, block) as captured:
            embedding = self.model.encode_image(pixels, normalize=False)
        assert captured.block_input is not None and captured.block_output is not None
        assert captured.final_cls is not None
        cls_tokens, comp_tokens = self._project(
            block, captured.block_input, captured.block_output, captured.final_cls, embedding
        )
        rows, cols = self.visual.grid_size
        return [
            ClipImageFeatures(
                cls_tokens=cls_tokens[i, 1:],
                comp_tokens=comp_tokens[i, 1:],
                grid=(rows, cols),
                image_size=image.size,
                grid_box=letterbox.grid_box((rows, cols)),
            )
            for i, (image, (_, letterbox)) in enumerate(zip(images, prepared))
        ]

    def _project(
        self,
        block: torch.nn.Module,
        block_input: torch.Tensor,
        block_output: torch.Tensor,
        final_cls: torch.Tensor,
        embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = block.attn
        x_ln = block.ln_1(block_input).float()
        contributions = cls_contributions(
            x_ln,
            attn.in_proj_weight.float(),
            attn.in_proj_bias.float(),
            attn.out_proj.weight.float(),
            attn.out_proj.bias.float(),
            attn.num_heads,
        )
        contributions = block.ls_1(contributions.to(block_input.dtype)).float()
        final = final_cls.float()
        mean = final.mean(dim=-1)[:, None, None]
        ln_post = self.visual.ln_post
        std = torch.sqrt(final.var(dim=-1, unbiased=False) + ln_post.eps)[:, None, None]
        num_blocks = len(self.blocks)
        tokens = block_input.shape[1]
        common = {
            "mean": mean,
            "std": std,
            "ln_weight": ln_post.weight.float(),
            "ln_bias": ln_post.bias.float(),
            "proj": self.visual.proj.float(),
            "embedding_norm": embedding.float().norm(dim=-1),
        }
        cls_tokens = project_tokens(contributions, share=(2 * num_blocks - 1) * tokens, **common)
        comp_tokens = project_tokens(block_output.float(), share=2 * num_blocks - 1, **common)
        return cls_tokens, comp_tokens

    def _map(self, features: ClipImageFeatures, text: torch.Tensor, query: str) -> AttributionMap:
        rows, cols = features.grid
        cls_map = (features.cls_tokens @ text).reshape(rows, cols).double().cpu().numpy()
        comp_map = (features.comp_tokens @ text).reshape(rows, cols).double().cpu().numpy()
        mask = combine_maps(
            cls_map, comp_map, combine=self.combine, enhance_coe=self.enhance_coe, kernel_size=self.kernel_size
        )
        return AttributionMap(
            raw=cls_map,
            comp=comp_map,
            mask=mask,
            image_size=features.image_size,
            grid_box=features.grid_box,
            query=query,
            metadata={
                "backend": self.name,
                "model": self.model_name,
                "pretrained": self.pretrained,
                "layer": self.layer,
                "combine": self.combine,
                "enhance_coe": self.enhance_coe,
                "kernel_size": self.kernel_size,
            },
        )


# ----------------------------------------------------------------------------------------------
# Loading and checks.
# ----------------------------------------------------------------------------------------------


def image_key(image: Image.Image) -> str:
    """A content hash of an RGB image (cache key)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.size}{image.mode}".encode())
    return digest.hexdigest()


PAPER_SETTINGS: dict[str, Any] = {"layer": -2, "combine": "paper", "enhance_coe": 10.0}
ATTRIBUTION_DEFAULTS_ATTRIBUTE = "api_attribution_defaults"
"""A model may carry its own measured best settings in this attribute (a dict with any of ``layer``,
``combine``, ``enhance_coe``); ``load_demo_clip`` sets it, as the demo LLaVA's config carries
``api_attribution_layer``."""


def recommended_settings(model: torch.nn.Module) -> dict[str, Any]:
    """Default ``layer``, ``combine`` and ``enhance_coe``: the model's own where it carries them, else the
    paper's."""
    return {**PAPER_SETTINGS, **getattr(model, ATTRIBUTION_DEFAULTS_ATTRIBUTE, {})}


def load_clip(model_name: str, pretrained: str | None) -> tuple[torch.nn.Module, Tokenizer, str | None]:
    """Build an open_clip model with its tokenizer; weights from a tag, a local path, or none.

    Offline, a tag whose weights are not cached fails within seconds with ``WeightsUnavailableError``.
    """
    if model_name == "demo":
        from api_tool.demo.clip_model import load_demo_clip

        model, tokenizer = load_demo_clip()
        return model, tokenizer, "demo"
    import open_clip

    if Path(model_name).expanduser().is_dir():
        model_name = LOCAL_DIR_PREFIX + str(Path(model_name).expanduser())
    if model_name.startswith(LOCAL_DIR_PREFIX):
        directory = Path(model_name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not (directory / "open_clip_config.json").is_file():
            raise UnknownModelError(
                f"{str(directory)!r} is not an open_clip model directory (no open_clip_config.json)"
            )
        return open_clip.create_model(model_name), open_clip.get_tokenizer(model_name), None
    if model_name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise UnknownModelError(f"unknown CLIP model {model_name!r}{hint} (or 'demo' for the offline model)")
    checkpoint = _resolve_pretrained(model_name, pretrained)
    model = open_clip.create_model(model_name, pretrained=checkpoint)
    return model, open_clip.get_tokenizer(model_name), pretrained


def _resolve_pretrained(model_name: str, pretrained: str | None) -> str | None:
    if pretrained is None:
        return None
    if Path(pretrained).expanduser().is_file():
        return str(Path(pretrained).expanduser())
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise UnknownModelError(
            f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {model_name}; "
            f"known tags: {', '.join(tags) or 'none'}"
        )
    cfg = get_pretrained_cfg(model_name, pretrained)
    cached = _cached_checkpoint(cfg)
    if cached is not None:
        return cached
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"the {model_name}/{pretrained} weights are not in the local cache and {HUB_HOST} cannot be "
            f'reached. On a machine with internet run: python -c "import open_clip; '
            f"open_clip.create_model('{model_name}', pretrained='{pretrained}')\" and copy "
            "~/.cache/huggingface to this machine, or pass pretrained=/path/to/checkpoint; "
            "model_name='demo' works offline"
        )
    return pretrained


def _cached_checkpoint(cfg: dict[str, str]) -> str | None:
    hub_path = cfg.get("hf_hub", "")
    if hub_path:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub_path)
        filename = filename or "open_clip_pytorch_model.bin"
        stem = filename.rsplit(".", 1)[0]
        for candidate in (f"{stem}.safetensors", "open_clip_model.safetensors", filename):
            found = try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        local = Path("~/.cache/clip").expanduser() / Path(url).name
        if local.is_file():
            return str(local)
    return None


def _hub_reachable() -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_TIMEOUT_S):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])


def _checked_visual(model: torch.nn.Module, model_name: str) -> torch.nn.Module:
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"{model_name}: API-CLIP needs an open_clip VisionTransformer image tower, "
            f"got {type(visual).__name__} (ResNet and timm towers are not supported)"
        )
    if visual.attn_pool is not None or getattr(visual, "pool_type", "tok") != "tok" or visual.proj is None:
        raise UnsupportedModelError(
            f"{model_name}: API-CLIP decomposes the CLS token; this tower pools with "
            f"{'attention' if visual.attn_pool is not None else getattr(visual, 'pool_type', '?')} "
            "or has no projection"
        )
    if not hasattr(visual.transformer.resblocks[0], "ln_1") or not isinstance(
        visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention
    ):
        raise UnsupportedModelError(f"{model_name}: custom attention blocks are not supported")
    return visual


def _input_side(visual: torch.nn.Module) -> int:
    size = visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        raise UnsupportedModelError(f"non-square model inputs ({height}x{width}) are not supported")
    return int(height)
