"""API-CLIP: query-guided attribution from the image tower of a CLIP-style dual encoder.

With a ViT of ``L`` blocks and ``N`` tokens, at block ``l`` (``api_tool.backends.psi`` holds the maths,
``api_tool.backends.towers`` one adapter per kind of tower):

* Psi_cls[m] is token m's share of the pooled image embedding through one attention row. For a CLS
  tower (open_clip ViTs, transformers CLIPModel) it is the CLS token's row in block l,
  ``c_m = sum_h A_h[0, m] (V_h[m] W_O,h) + b_O / N``, taken through the final LayerNorm linearised
  with the CLS token's own final statistics, ``(c_m - mu / ((2L-1) N)) * gamma / sigma +
  beta / ((2L-1) N)``, and projected. For an attention-pool tower (SigLIP, SigLIP2, CoCa) it is the
  probe's row over the final tokens, exact, then the pool's MLP handed to the tokens to first order
  (``pool_mlp="first_order"``) or left out (``"residual"``). Divided by the norm of the unnormalised
  image embedding and dotted with the normalised text embedding.
* Psi_comp[m] is the patch token's residual stream after block l read the same way (``2L-1`` in place
  of ``(2L-1) N``), divided by the same norm, dotted with the text.

Both are linear in the text embedding, so the image pass is independent of the query: it is run once
per image (and cached by image content) and every question costs one text pass and two small
matrix-vector products. Only one attention row is computed; nothing per head or per layer is
materialised beyond it.

Example:
    >>> from api_tool.backends.clip import ClipAttributor
    >>> attributor = ClipAttributor("demo")  # doctest: +SKIP
    >>> amap = attributor.attribute("scene.png", "where is the red circle?")  # doctest: +SKIP
    >>> amap.mask.shape  # doctest: +SKIP
    (14, 14)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from api_tool.backends.base import check_query, model_lock, resolve_device, resolve_layer
from api_tool.backends.batched_maps import combine_maps_batched, merge_dtype, upsample_batched
from api_tool.backends.device_letterbox import check_pixel_batch, decode_images, letterbox_pixels, upload_images
from api_tool.backends.graphed_pass import GraphedPass
from api_tool.backends.hub import HUB_HOST, hub_offline, hub_reachable
from api_tool.backends.psi import POOL_MLP_MODES, PoolMlp, cls_contributions, linearized_layer_norm
from api_tool.backends.towers import check_open_clip_config, tower_for
from api_tool.backends.towers.base import Decomposition, LetterboxInput, PreparedImage, ProbePooling, VisionTower
from api_tool.backends.towers.hf import HF_PREFIX, hf_text_embeddings, is_hf_model, load_hf_dual_encoder
from api_tool.errors import (
    InvalidParameterError,
    InvalidQueryError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from api_tool.geometry import GridBox, Letterbox
from api_tool.images import ImageRef
from api_tool.maps import AttributionMap, Combine, check_combine_options

__all__ = [
    "GRAPH_MAX_BATCH",
    "ClipAttributor",
    "ClipImageFeatures",
    "cls_contributions",
    "default_projection_dtype",
    "encode_text_trimmed",
    "linearized_layer_norm",
    "load_clip",
    "resolve_layer",
]

Tokenizer = Callable[[Sequence[str]], torch.Tensor]

LOCAL_DIR_PREFIX = "local-dir:"
GRAPH_MAX_BATCH = 8
"""Batches up to this size replay their image pass from a CUDA graph (launch-bound on a large GPU)."""
DEFAULT_POOL_MLP: PoolMlp = "first_order"
"""How an attention pool's MLP is handed to the tokens by default. Measured on random-weight SigLIP towers
(``benchmarks/pool_mlp_treatment.py``, results in ``benchmarks/results/pool_mlp_treatment_*.json``): the
first-order shares predict the pooled score with one token's term removed within 0.1-2 % of the true
change (residual only: 18-97 %), and correlate better with the effect of dropping a token from the whole
tower (Pearson 0.14-0.60 against 0.02-0.40) in every tower and regime tried."""


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

    ``cls_tokens`` (Psi_cls before the text: through the CLS row or the pool's probe) and ``comp_tokens``
    (Psi_comp before the text) are ``(P, E)`` float32 tensors for the ``P = rows * cols`` patches,
    row-major, divided by the norm of the image embedding.
    """

    cls_tokens: torch.Tensor
    comp_tokens: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]
    grid_box: GridBox


class ClipAttributor:
    """API-CLIP attributor over a CLIP-style dual encoder (see ``api_tool.backends.towers`` for the towers).

    Args:
        model_name: an open_clip model name ("ViT-L-14-336", "ViT-B-16-SigLIP2", ...), a local open_clip
            model directory (``"local-dir:PATH"`` or a plain directory path holding
            ``open_clip_config.json`` and weights), ``"hf:<hub id or directory>"`` for a transformers
            ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` (a plain directory with ``config.json`` too),
            or ``"demo"`` for the small model shipped with the package (works offline).
        pretrained: an open_clip pretrained tag ("openai", "webli", ...), a local checkpoint path, or
            ``None`` for random weights (tests). Ignored for ``"demo"``, directories and ``hf:``.
        layer: block index into the vision transformer; negative counts from the end. ``None``: the
            model's own default if it carries one (``ATTRIBUTION_DEFAULTS_ATTRIBUTE``; the demo CLIP
            does, see ``api_tool.demo.DEMO_CLIP_RECOMMENDED``), else its family's (``api_tool.families``;
            -2, the paper's second-to-last block). For an attention-pool tower the probe's map is read
            after the last block; ``layer`` places Psi_comp.
        device: "cuda", "mps", "cpu" or ``None`` (CUDA, then MPS, then CPU).
        enhance_coe, kernel_size: post-processing, see ``api_tool.maps.combine_maps``; ``enhance_coe``
            ``None``: the model's or family's default (the paper's 10).
        combine: how Psi_cls and Psi_comp make the mask; ``None``: the model's or family's default.
        cache_size: how many images' features to keep (keyed by image content).
        pool_mlp: how an attention pool's MLP is handed to the tokens, ``"first_order"`` (default) or
            ``"residual"`` (see ``api_tool.backends.psi.split_branch``); CLS towers ignore it.
        model, tokenizer: an already-built model and its tokenizer (open_clip) or processor
            (transformers), to share one model; ``ClipAttributor.from_model`` is the short form.
        preprocess_on_device: letterbox on the model's device (``api_tool.backends.device_letterbox``:
            uint8 uploaded once, equal to Pillow's letterbox within one uint8 level) instead of with Pillow
            on the CPU; ``None``: on any device but the CPU, where Pillow is faster.
        projection_dtype: the dtype the Psi decomposition (the attention row, the frozen norms, the
            projection) runs in; ``None``: a half-precision model's own dtype on a GPU, else float32.
            fp16 moves the masks of ViT-L-14-336 by about 1e-3 from an fp32 decomposition of the same
            forward (``benchmarks/clip_gpu_throughput.py`` prints the error it measures).
        cuda_graphs: on a CUDA device, replay the image pass of batches up to ``GRAPH_MAX_BATCH`` images
            from CUDA graphs captured per batch shape (``api_tool.backends.graphed_pass``; the same kernels,
            a fraction of the launch cost); ``False``: always eager.

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
        pool_mlp: PoolMlp = DEFAULT_POOL_MLP,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Tokenizer | Any | None = None,
        preprocess_on_device: bool | None = None,
        projection_dtype: torch.dtype | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.device = resolve_device(device)
        if model is None:
            model, tokenizer, pretrained = load_clip(model_name, pretrained)
        elif tokenizer is None:
            raise UnsupportedModelError("pass the tokenizer (open_clip) or processor (transformers) with the model")
        assert tokenizer is not None
        if pool_mlp not in POOL_MLP_MODES:
            raise InvalidParameterError(f"pool_mlp must be one of {', '.join(POOL_MLP_MODES)}, got {pool_mlp!r}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tower: VisionTower = tower_for(self.model, tokenizer, model_name)
        self.visual = self.tower.module
        self.blocks = self.tower.blocks
        recommended = recommended_settings(self.model, self.tower)
        self.layer = resolve_layer(
            layer if layer is not None else recommended["layer"], len(self.blocks), "vision transformer"
        )
        self.enhance_coe = float(enhance_coe if enhance_coe is not None else recommended["enhance_coe"])
        self.kernel_size = kernel_size
        self.combine: Combine = combine if combine is not None else recommended["combine"]
        check_combine_options(self.combine, self.enhance_coe, kernel_size, has_comp=True)
        self.pool_mlp: PoolMlp = pool_mlp
        self.cache_size = cache_size
        self._cache: OrderedDict[str, ClipImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self._forward_lock = model_lock(self.model)
        self.preprocess_on_device = self.device.type != "cpu" if preprocess_on_device is None else preprocess_on_device
        model_dtype = next(self.visual.parameters()).dtype
        self.projection_dtype = projection_dtype or default_projection_dtype(model_dtype, self.device)
        self._image_pass: GraphedPass[Decomposition] = GraphedPass(self._decompose_pixels, GRAPH_MAX_BATCH)
        self._image_pass.enabled = cuda_graphs

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, processor: Tokenizer | Any, *, model_name: str | None = None, **options: Any
    ) -> ClipAttributor:
        """An attributor over an already-loaded model: a transformers ``CLIPModel`` / ``SiglipModel`` /
        ``Siglip2Model`` with its processor, or an open_clip model with its tokenizer.

        Example:
            >>> from transformers import AutoModel, AutoProcessor
            >>> model = AutoModel.from_pretrained("google/siglip2-base-patch16-naflex")  # doctest: +SKIP
            >>> processor = AutoProcessor.from_pretrained("google/siglip2-base-patch16-naflex")  # doctest: +SKIP
            >>> attributor = ClipAttributor.from_model(model, processor)  # doctest: +SKIP
        """
        name = model_name if model_name is not None else type(model).__name__
        return cls(name, pretrained=options.pop("pretrained", None), model=model, tokenizer=processor, **options)

    # -- public API ----------------------------------------------------------------------------

    def attribute(self, image: ImageRef, query: str) -> AttributionMap:
        """The map for one image and one query."""
        return self.attribute_many(image, [query])[0]

    def attribute_many(self, image: ImageRef, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per query on the same image: one (cached) image pass, one batched text pass."""
        features = self.image_features(image)
        texts = self.encode_queries(queries)
        return self._maps([features] * len(queries), texts, queries)

    def attribute_batch(self, images: Sequence[ImageRef], queries: Sequence[str]) -> list[AttributionMap]:
        """One map per ``(images[i], queries[i])``; uncached images run through the model as one batch."""
        if len(images) != len(queries):
            raise InvalidQueryError(f"got {len(images)} images but {len(queries)} queries; pass one query per image")
        features = self.image_features_batch(images)
        texts = self.encode_queries(queries)
        return self._maps(features, texts, queries)

    def attribute_tensors(self, pixels: torch.Tensor, queries: Sequence[str]) -> list[AttributionMap]:
        """One map per ``(pixels[i], queries[i])`` for a batch the caller already holds: ``(B, 3, H, W)``
        uint8 RGB (torchvision's ``decode_image`` layout) on any device, all of one size. Letterboxed on
        the model's device (within one uint8 level of Pillow's letterbox, see
        ``api_tool.backends.device_letterbox``); the cache is not used (hashing the pixels would cost a
        transfer).

        Example:
            >>> from torchvision.io import decode_image
            >>> batch = torch.stack([decode_image("a.jpg"), decode_image("b.jpg")])  # doctest: +SKIP
            >>> maps = attributor.attribute_tensors(batch, ["where is the cup?", "where is the cat?"])  # doctest: +SKIP
        """
        check_pixel_batch(pixels)
        if pixels.shape[0] != len(queries):
            raise InvalidQueryError(
                f"got {pixels.shape[0]} images but {len(queries)} queries; pass one query per image"
            )
        features = self._run_pixels(pixels.to(self.device, non_blocking=True))
        return self._maps(features, self.encode_queries(queries), queries)

    def pixel_masks(self, maps: Sequence[AttributionMap], resample: str = "lanczos") -> list[torch.Tensor]:
        """Each map's mask at its image's pixel size on the model's device, ``(H, W)`` float32: what
        ``AttributionMap.upsample`` gives (Pillow's filter, within float32 rounding), computed batched on
        the device for the maps of one image size.

        Example:
            >>> masks = attributor.pixel_masks(attributor.attribute_batch(images, queries))  # doctest: +SKIP
        """
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, amap in enumerate(maps):
            groups.setdefault((amap.grid_shape, amap.grid_box, amap.image_size), []).append(index)
        found: dict[int, torch.Tensor] = {}
        for (_, grid_box, image_size), indices in groups.items():
            stacked = torch.from_numpy(np.stack([maps[i].mask for i in indices])).to(self.device)
            found.update(zip(indices, upsample_batched(stacked, grid_box, image_size, resample)))
        return [found[index] for index in range(len(maps))]

    def image_features(self, image: ImageRef) -> ClipImageFeatures:
        """The cached, query-independent image pass for one image."""
        return self.image_features_batch([image])[0]

    def image_features_batch(self, images: Sequence[ImageRef]) -> list[ClipImageFeatures]:
        """Image passes for several images, batching those not in the cache."""
        loaded = decode_images(images)
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
        if is_hf_model(self.model):
            embeddings = hf_text_embeddings(self.model, self.tokenizer, cleaned, self.device)
        else:
            embeddings = encode_text_trimmed(self.model, self.tokenizer(cleaned).to(self.device))
        return F.normalize(embeddings.float(), dim=-1)

    @property
    def side(self) -> int:
        """The side of the square model input (letterboxing towers)."""
        return self._letterbox_input().side

    def letterbox(self, image: Image.Image) -> tuple[np.ndarray, Letterbox]:
        """The image letterboxed to the model's square input, ``(S, S, 3)`` uint8, and the geometry."""
        return self._letterbox_input().letterbox(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, S, S, 3)`` uint8 pixels (on any device) to the model's normalised ``(B, 3, S, S)`` input."""
        return self._letterbox_input().normalize(pixels)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, Letterbox]:
        """Letterbox and normalise one image: ``(3, S, S)`` float tensor and the geometry."""
        pixels, letterbox = self.letterbox(image)
        return self.normalize(torch.from_numpy(pixels.copy())[None])[0], letterbox

    # -- internals -----------------------------------------------------------------------------

    def _letterbox_input(self) -> LetterboxInput:
        if self.tower.input is None:
            raise UnsupportedModelError(
                f"{self.model_name}: the {self.tower.family} tower has its own geometry, not a letterboxed square "
                "input; use attributor.tower.prepare(image)"
            )
        return self.tower.input

    @torch.inference_mode()
    def _run_images(self, images: Sequence[Image.Image]) -> list[ClipImageFeatures]:
        if self.preprocess_on_device and self.tower.input is not None:
            features: dict[int, ClipImageFeatures] = {}
            positions: dict[tuple[int, int], list[int]] = {}
            for index, image in enumerate(images):
                positions.setdefault(image.size, []).append(index)
            for size, pixels in upload_images(images, self.device).items():
                features.update(zip(positions[size], self._run_pixels(pixels)))
            return [features[index] for index in range(len(images))]
        prepared = [self.tower.prepare(image) for image in images]
        groups: dict[tuple[int, int], list[int]] = {}  # one batch per grid (towers with a grid per image)
        for index, item in enumerate(prepared):
            groups.setdefault(item.grid, []).append(index)
        features = {}
        for grid, indices in groups.items():
            found = self._run_group(grid, [prepared[i] for i in indices], [images[i].size for i in indices])
            features.update(zip(indices, found))
        return [features[index] for index in range(len(images))]

    def _run_group(
        self, grid: tuple[int, int], prepared: Sequence[PreparedImage], sizes: Sequence[tuple[int, int]]
    ) -> list[ClipImageFeatures]:
        inputs = {name: tensor.to(self.device) for name, tensor in self.tower.batch(prepared).items()}
        return self._features(inputs, grid, [item.grid_box for item in prepared], sizes)

    @torch.inference_mode()
    def _run_pixels(self, pixels: torch.Tensor) -> list[ClipImageFeatures]:
        """Features of ``(B, 3, H, W)`` uint8 images of one size on the model's device, letterboxed there."""
        square = self._letterbox_input()
        letterbox = Letterbox.fit((pixels.shape[-1], pixels.shape[-2]), square.side)
        grid = self.tower.prepare(Image.new("RGB", (1, 1))).grid
        boxed = letterbox_pixels(pixels, letterbox, square.fill)
        count = pixels.shape[0]
        grid_boxes, sizes = [letterbox.grid_box(grid)] * count, [letterbox.image_size] * count
        return self._features({"pixels": boxed}, grid, grid_boxes, sizes)

    def _features(
        self,
        inputs: dict[str, torch.Tensor],
        grid: tuple[int, int],
        grid_boxes: Sequence[GridBox],
        sizes: Sequence[tuple[int, int]],
    ) -> list[ClipImageFeatures]:
        with self._forward_lock:  # a graph replay's outputs are read before the next replay
            if set(inputs) == {"pixels"}:
                parts = self._image_pass(inputs["pixels"])
            else:
                parts = self.tower.decompose(inputs, self.layer, self.pool_mlp, self.projection_dtype)
            norm = parts.embedding.float().norm(dim=-1)[:, None, None]
            prefix = self.tower.prefix_tokens
            cls_tokens = parts.terms[:, prefix:].float() / norm
            comp_tokens = parts.comp[:, prefix:].float() / norm
        return [
            ClipImageFeatures(
                cls_tokens=cls_tokens[i],
                comp_tokens=comp_tokens[i],
                grid=grid,
                image_size=size,
                grid_box=grid_box,
            )
            for i, (size, grid_box) in enumerate(zip(sizes, grid_boxes))
        ]

    def _decompose_pixels(self, pixels: torch.Tensor) -> Decomposition:
        return self.tower.decompose({"pixels": pixels}, self.layer, self.pool_mlp, self.projection_dtype)

    def _map(self, features: ClipImageFeatures, text: torch.Tensor, query: str) -> AttributionMap:
        return self._maps([features], text[None], [query])[0]

    @torch.inference_mode()
    def _maps(
        self, features: Sequence[ClipImageFeatures], texts: torch.Tensor, queries: Sequence[str]
    ) -> list[AttributionMap]:
        """The map of each ``(features[i], texts[i])``: the dot products and the merge batched on the
        device per grid shape, one transfer to the host per grid shape."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index, feat in enumerate(features):
            groups.setdefault(feat.grid, []).append(index)
        found: dict[int, AttributionMap] = {}
        for (rows, cols), indices in groups.items():
            text = texts[indices][:, :, None]
            dtype = merge_dtype(text.device)
            cls = torch.bmm(torch.stack([features[i].cls_tokens for i in indices]), text).to(dtype)
            comp = torch.bmm(torch.stack([features[i].comp_tokens for i in indices]), text).to(dtype)
            cls, comp = cls.reshape(-1, rows, cols), comp.reshape(-1, rows, cols)
            mask = combine_maps_batched(
                cls, comp, combine=self.combine, enhance_coe=self.enhance_coe, kernel_size=self.kernel_size
            )
            host = torch.stack([cls, comp, mask]).cpu().double().numpy()
            for slot, index in enumerate(indices):
                found[index] = self._attribution_map(features[index], host[:, slot], queries[index])
        return [found[index] for index in range(len(features))]

    def _attribution_map(self, features: ClipImageFeatures, maps: np.ndarray, query: str) -> AttributionMap:
        cls_map, comp_map, mask = maps
        metadata: dict[str, object] = {
            "backend": self.name,
            "model": self.model_name,
            "pretrained": self.pretrained,
            "tower": self.tower.family,
            "layer": self.layer,
            "combine": self.combine,
            "enhance_coe": self.enhance_coe,
            "kernel_size": self.kernel_size,
        }
        if isinstance(self.tower.pooling, ProbePooling):
            metadata["pool_mlp"] = self.pool_mlp
        return AttributionMap(
            raw=cls_map,
            comp=comp_map,
            mask=mask,
            image_size=features.image_size,
            grid_box=features.grid_box,
            query=query,
            metadata=metadata,
        )


# ----------------------------------------------------------------------------------------------
# Loading and checks.
# ----------------------------------------------------------------------------------------------


def default_projection_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the Psi decomposition by default: a half-precision model's own dtype on a GPU (its
    tensor cores), float64 for a float64 model, else float32.

    Example:
        >>> default_projection_dtype(torch.float16, torch.device("cuda"))
        torch.float16
        >>> default_projection_dtype(torch.float16, torch.device("cpu"))
        torch.float32
    """
    if model_dtype in (torch.float16, torch.bfloat16) and device.type != "cpu":
        return model_dtype
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def image_key(image: Image.Image) -> str:
    """A content hash of an RGB image (cache key)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.size}{image.mode}".encode())
    return digest.hexdigest()


ATTRIBUTION_DEFAULTS_ATTRIBUTE = "api_attribution_defaults"
"""A model may carry its own measured best settings in this attribute (a dict with any of ``layer``,
``combine``, ``enhance_coe``); ``load_demo_clip`` sets it, as the demo LLaVA's config carries
``api_attribution_layer``."""


def recommended_settings(model: torch.nn.Module, tower: VisionTower) -> dict[str, Any]:
    """Default ``layer``, ``combine`` and ``enhance_coe``: the model's own where it carries them, else its
    tower family's (``api_tool.families``; the paper's for every CLIP-side family so far)."""
    from api_tool.families import family

    defaults = family(tower.family).defaults
    table = {"layer": defaults.layer, "combine": defaults.combine, "enhance_coe": defaults.enhance_coe}
    return {**table, **getattr(model, ATTRIBUTION_DEFAULTS_ATTRIBUTE, {})}


def load_clip(model_name: str, pretrained: str | None) -> tuple[torch.nn.Module, Any, str | None]:
    """Build a dual encoder with its tokenizer (open_clip) or processor (``hf:``); open_clip weights from a
    tag, a local path, or none.

    The architecture is checked before any weights load (``UnsupportedModelError`` naming the towers that
    work); offline, a tag whose weights or tokenizer are not cached fails within seconds with
    ``WeightsUnavailableError``.

    Example:
        >>> model, tokenizer, _ = load_clip("ViT-B-16-SigLIP2", "/models/siglip2.pt")  # doctest: +SKIP
        >>> model, processor, _ = load_clip("hf:google/siglip2-base-patch16-naflex", None)  # doctest: +SKIP
    """
    if model_name in ("demo", "demo-siglip"):
        from api_tool.demo.clip_model import DEMO_CLIP_DIR, DEMO_SIGLIP_DIR, load_demo_clip

        model, tokenizer = load_demo_clip(directory=DEMO_CLIP_DIR if model_name == "demo" else DEMO_SIGLIP_DIR)
        return model, tokenizer, "demo"
    if model_name.startswith(HF_PREFIX):
        model, processor = load_hf_dual_encoder(model_name[len(HF_PREFIX) :])
        return model, processor, None
    import open_clip

    path = Path(model_name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file() and not (path / "open_clip_config.json").is_file():
            model, processor = load_hf_dual_encoder(str(path))
            return model, processor, None
        model_name = LOCAL_DIR_PREFIX + str(path)
    if model_name.startswith(LOCAL_DIR_PREFIX):
        directory = Path(model_name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        config_path = directory / "open_clip_config.json"
        if not config_path.is_file():
            raise UnknownModelError(
                f"{str(directory)!r} is not an open_clip model directory (no open_clip_config.json)"
            )
        check_open_clip_config(model_name, json.loads(config_path.read_text()).get("model_cfg", {}))
        return open_clip.create_model(model_name), open_clip.get_tokenizer(model_name), None
    if model_name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise UnknownModelError(f"unknown CLIP model {model_name!r}{hint} (or 'demo' for the offline model)")
    from open_clip.factory import get_model_config

    check_open_clip_config(model_name, get_model_config(model_name) or {})
    checkpoint = _resolve_pretrained(model_name, pretrained)
    tokenizer = _open_clip_tokenizer(model_name)
    force = _published_preprocess(model_name) if checkpoint is not None and Path(checkpoint).is_file() else None
    model = open_clip.create_model(model_name, pretrained=checkpoint, force_preprocess_cfg=force)
    return model, tokenizer, pretrained


def _open_clip_tokenizer(model_name: str) -> Tokenizer:
    """open_clip's tokenizer for a model; one kept on the hub (SigLIP's) is read from the local cache, or
    ``WeightsUnavailableError`` when it is not there and the hub cannot be reached."""
    import open_clip
    from open_clip.factory import get_model_config

    source = (get_model_config(model_name) or {}).get("text_cfg", {}).get("hf_tokenizer_name", "")
    if not source or Path(source).expanduser().is_dir():
        return open_clip.get_tokenizer(model_name)  # type: ignore[no-any-return]
    from huggingface_hub import try_to_load_from_cache

    fix = (
        f"On a connected machine run `hf download {source}` and copy ~/.cache/huggingface/hub to this machine; "
        "model_name='demo' works offline"
    )
    if isinstance(try_to_load_from_cache(source, "tokenizer_config.json"), str):
        try:
            return open_clip.get_tokenizer(model_name, local_files_only=True)  # type: ignore[no-any-return]
        except OSError as exc:
            raise WeightsUnavailableError(
                f"the tokenizer of {model_name} ({source!r}) is only partly in the local Hugging Face cache ({exc}). "
                + fix
            ) from exc
    if hub_offline() or not hub_reachable():
        raise WeightsUnavailableError(
            f"the tokenizer of {model_name} ({source!r} on {HUB_HOST}) is not in the local Hugging Face cache and "
            f"the hub cannot be reached. {fix}"
        )
    return open_clip.get_tokenizer(model_name)  # type: ignore[no-any-return]


def _published_preprocess(model_name: str) -> dict[str, Any] | None:
    """The mean and std every published checkpoint of ``model_name`` agrees on (SigLIP's 0.5), for a
    checkpoint file that open_clip cannot match to a tag; ``None`` when they disagree or there are none."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    found = set()
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = get_pretrained_cfg(model_name, tag)
        if "mean" in cfg and "std" in cfg:
            found.add((tuple(cfg["mean"]), tuple(cfg["std"])))
    if len(found) != 1:
        return None
    mean, std = found.pop()
    return {"mean": mean, "std": std}


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
    if not hub_reachable():
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
