"""Train the demo CLIP contrastively on synthetic scenes generated on the fly.

Recipe (what each part is for):

* Scenes: 1-5 objects, square and letterboxed non-square canvases (padding = the mean colour, as the
  attributor letterboxes), half of each batch softened by a 3x3 blur (resized inputs at inference
  have soft edges). Layouts and texts are made by DataLoader workers on the CPU; pixels are rendered
  on the training device.
* Four texts per image: its full caption (all objects, often one spatial relation); a hard negative
  caption (colours re-bound between objects, or the relation flipped); a query naming one present
  object in one of the reference kinds users speak in (``api_tool.demo.scenes.REFERENCE_KINDS``: colour
  and shape, colour only "the red one", shape only, a relation "what is next to the star?", a canvas
  position "the thing in the top left corner", free phrasing "can you find the little blue square?"), or
  two objects; and an adversarial query naming an absent recombination of present attributes.
* Loss: image-to-text cross-entropy over captions and hard negatives; text-to-image with every image
  that satisfies the text as a positive (a query's positives are all images holding such an object,
  found from the layouts: an object of the query's colour, shape and canvas cell),
  ``-log sum_{positives} softmax``. Queries therefore teach the model to find one object among several,
  to bind colour to shape and to tell the canvas's regions apart.
* Optional deep supervision (``--aux-weight``): the CLS token after block ``--aux-layer`` (the block
  API reads, second-to-last by default) goes through ``ln_post`` and ``proj`` and gets the same loss,
  so that block's attention output to CLS is itself aligned with the text.
* Optional map loss (``--map-weight``, ``--map-temperature``): the contrastive losses train only pooled
  embeddings, never the per-patch map API reads. With it, each image's own query (not the adversarial
  one) gets, in the training graph, the raw map ``ClipAttributor`` reads for the demo CLIP by default
  (``PatchMaps`` at ``MAP_LAYER``, the last block, ``combine="cls"``: each patch's share of the CLS
  token's attention output through ``ln_post`` frozen at the CLS token and ``proj``, dotted with the
  query's normalised text embedding), and a multi-positive cross-entropy over the patches pulls its peak
  onto the objects the query names (``map_loss``: ``-log sum_p c_p softmax_p(z / T)``, ``z`` the map
  standardised over the patches, ``c_p`` the share of patch p that matching objects' visible pixels
  cover; matching: the query's colour, shape and canvas cell, both objects of a pair query). So that
  block's map is *trained* to point; the held-out curves report pointing per reference kind with or
  without the loss.

* Optional SigLIP-style variant (``--loss sigmoid --pool attention --aux-weight 0``): SigLIP's pairwise
  sigmoid loss with a learned bias (every (image, text) pair is a binary problem, positive where the
  text describes the image by the same multi-positive mask), and open_clip's attention-pool head
  (``CLIPVisionCfg(attentional_pool=True)``: one learned probe attends over all final tokens, then
  ``ln_post`` and ``proj``; no MLP, so API decomposes the pooled embedding exactly). The pooled head has
  no CLS token after a block to supervise, so deep supervision and the map loss are refused with it; the
  probe's map is read from the final tokens, which the loss trains directly. The bias is a parameter of
  the loss, not of the model: it is saved in ``config.json``'s metadata (``logit_bias``).

* Optional second stage (``--init DIR``): start from a saved demo CLIP, with its positional
  embeddings resized (open_clip's ``resize_pos_embed``) when ``--image-size`` differs, so a model
  trained at 224 px can be refined at a finer patch grid. A model saved with a smaller vocabulary (before
  the reference kinds' words) starts with its token embeddings mapped by BPE id; new words start random.

It prints its curves (loss and, with ``--map-weight``, the map loss; held-out caption-to-image top-1 among
100, image-to-caption top-1, the binding accuracy: the true caption outscoring its hard negative, and
pointing: how often the argmax of the attributor's grid-level mask for a reference query of each kind lies
on a patch showing one of its targets) and writes ``model.safetensors`` and ``config.json``. Seeded; runs
on CPU too (slowly): ``--device cpu --steps 20 --batch 32 --workers 0``.

Example:
    python -m training.train_clip --steps 7000 --batch 512 --max-seconds 450 --out /tmp/clip224
    python -m training.train_clip --init /tmp/clip224 --image-size 288 --lr 3e-4 --warmup 200 \
        --steps 9000 --max-seconds 440 --out api_tool/demo/weights/clip

The SigLIP-style variant (one stage, from scratch, at 288 px):
    python -m training.train_clip --loss sigmoid --pool attention --aux-weight 0 --image-size 288 \
        --steps 9000 --workers 14 --max-seconds 360 --out /tmp/siglip

The first two are the shipped demo CLIP's two stages (the second stopped by time at step 5,711 on an H200; each
saved ``config.json`` records its flags and the first stage's). With ``--max-seconds`` the schedule
depends on the machine's speed, so a rerun elsewhere draws the same data but not the same curve.

A third stage on the reference kinds' queries (``.device/train_clip.sh`` runs it and the per-kind pointing
benchmark; not shipped yet, see ``benchmarks/demo_clip_quality.py --kinds``):
    python -m training.train_clip --init api_tool/demo/weights/clip --image-size 288 --lr 3e-4 --warmup 200 \
        --steps 9000 --max-seconds 240 --workers 14 --map-weight 1.0 --out /tmp/clip_refs
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from api_tool.backends.batched_maps import combine_maps_batched
from api_tool.backends.psi import FrozenLayerNorm, pooled_query_terms, residual_share
from api_tool.backends.towers import tower_for
from api_tool.backends.towers.base import ClsPooling
from api_tool.demo.clip_model import (
    CONFIG_FILE,
    DEMO_CLIP_ARCHITECTURE,
    DEMO_CLIP_RECOMMENDED,
    FIRST_WORD_ID,
    OPENAI_MEAN,
    OPENAI_STD,
    CompactTokenizer,
    build_demo_clip,
    load_demo_clip,
    save_demo_clip,
)
from api_tool.demo.scenes import (
    COLOUR_NAMES,
    REFERENCE_KINDS,
    REGION_NAMES,
    SHAPES,
    Layouts,
    ObjectFacts,
    describe,
    existence_negative,
    hard_negative_caption,
    letterbox_boxes,
    object_query,
    pair_query,
    reference_query,
    render_layouts,
    sample_layouts,
    true_relations,
)
from api_tool.errors import InvalidParameterError
from training.flags import parse_config

LOSSES = ("contrastive", "sigmoid")
POOLS = ("token", "attention")
ATTENTION_POOL_CFG: dict[str, Any] = {"attentional_pool": True, "attn_pooler_queries": 1, "attn_pooler_heads": 4}
"""The attention-pool head of ``--pool attention``: open_clip's CoCa-style pool with one probe (query 0 is all
``_global_pool`` keeps) of 4 heads over the tower's tokens, width ``embed_dim``."""
SIGMOID_INIT_SCALE = 10.0
SIGMOID_INIT_BIAS = -10.0
"""SigLIP's initial temperature and bias (Zhai et al., 2023): at the start every pair reads as a negative."""

WILD_COLOUR = len(COLOUR_NAMES)
WILD_SHAPE = len(SHAPES)
WILD_REGION = len(REGION_NAMES)
ANY_OBJECT = (WILD_COLOUR, WILD_SHAPE, WILD_REGION)
REFERENCE_WEIGHTS: dict[str, float] = {
    "full": 0.3,
    "colour": 0.14,
    "shape": 0.12,
    "relation": 0.14,
    "position": 0.18,
    "free": 0.12,
}
"""How often each reference kind is drawn for a scene's query (after the 10 % of two-object queries)."""
PAD_RGB = tuple(255.0 * m for m in OPENAI_MEAN)

CAPTION, NEGATIVE, QUERY = 0, 1, 2


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (all on the command line).

    ``max_seconds`` > 0 stops training when the loop has run that long (the weights are still saved):
    a guard for fixed-length machine leases. The cosine learning-rate schedule then follows whichever
    of ``steps`` and ``max_seconds`` runs out first, so a cut-short run still ends annealed.
    ``image_size`` overrides the architecture's input side (a multiple of the patch size); ``init`` is
    a demo CLIP folder to start from (empty: random initialisation). ``loss`` is ``"contrastive"`` or
    ``"sigmoid"`` (SigLIP's), ``pool`` is ``"token"`` (CLS) or ``"attention"`` (attention-pool head, which
    needs ``aux_weight`` and ``map_weight`` 0). ``map_weight`` > 0 adds the map loss (``map_loss``, at
    ``MAP_LAYER``) with that weight; ``map_temperature`` divides its standardised maps.
    """

    steps: int = 6000
    batch: int = 512
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.1
    aux_weight: float = 0.5
    aux_layer: int = -2
    blur_probability: float = 0.5
    seed: int = 0
    workers: int = 6
    image_size: int = 224
    init: str = ""
    eval_scenes: int = 1000
    eval_every: int = 500
    max_seconds: float = 0.0
    log_every: int = 100
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = "api_tool/demo/weights/clip"
    loss: str = "contrastive"
    pool: str = "token"
    map_weight: float = 0.0
    map_temperature: float = 0.5

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidParameterError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.pool not in POOLS:
            raise InvalidParameterError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.pool == "attention" and self.aux_weight > 0:
            raise InvalidParameterError(
                "deep supervision reads the CLS token after a block, which the attention-pool head does not pool; "
                "pass --aux-weight 0 with --pool attention"
            )
        if self.pool == "attention" and self.map_weight > 0:
            raise InvalidParameterError(
                "the map loss trains the CLS token's attention row, which the attention-pool head does not have; "
                "pass --map-weight 0 with --pool attention"
            )
        if self.map_temperature <= 0:
            raise InvalidParameterError(f"map_temperature must be positive, got {self.map_temperature}")


# ----------------------------------------------------------------------------------------------
# Texts for a batch of layouts (CPU, in DataLoader workers).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextBatch:
    """Token ids ``(T, C)`` of ``T = 4 n`` texts, each text's kind (caption, negative, query) and,
    for queries, the two (colour, shape, canvas cell) atoms an image must hold (wildcards: ``ANY_OBJECT``)."""

    tokens: torch.Tensor
    kinds: torch.Tensor
    atoms: torch.Tensor


Atoms = tuple[tuple[int, int, int], ...]


def _atom(colour: str | None = None, shape: str | None = None, region: str | None = None) -> tuple[int, int, int]:
    return (
        COLOUR_NAMES.index(colour) if colour is not None else WILD_COLOUR,
        SHAPES.index(shape) if shape is not None else WILD_SHAPE,
        REGION_NAMES.index(region) if region is not None else WILD_REGION,
    )


def _query_for(objects: Sequence[ObjectFacts], rng: random.Random, canvas: tuple[float, float]) -> tuple[str, Atoms]:
    """A query about the scene and the two atoms an image must hold to satisfy it (``canvas``: the
    scene's width and height in the units of the objects' centres)."""
    if rng.random() < 0.1 and len(objects) > 1:
        obj, other = rng.sample(list(objects), 2)
        relation = rng.choice(true_relations(obj, other) or ("and",))
        text = (
            f"the {obj.colour} {obj.shape} and the {other.colour} {other.shape}"
            if relation == "and"
            else pair_query(rng, f"{obj.colour} {obj.shape}", f"{other.colour} {other.shape}", relation)
        )
        return text, (_atom(obj.colour, obj.shape), _atom(other.colour, other.shape))
    kind = rng.choices(REFERENCE_KINDS, weights=[REFERENCE_WEIGHTS[k] for k in REFERENCE_KINDS])[0]
    reference = reference_query(objects, kind, rng, canvas)
    if reference is None:
        obj = rng.choice(objects)
        return object_query(rng, obj.colour, obj.shape), (_atom(obj.colour, obj.shape), ANY_OBJECT)
    pattern = reference.pattern
    return reference.text, (_atom(pattern.colour, pattern.shape, pattern.region), ANY_OBJECT)


def _adversarial_query(objects: Sequence[ObjectFacts], rng: random.Random) -> tuple[str, Atoms]:
    name = existence_negative(objects, rng, "adversarial")
    colour, shape = name.split()
    return object_query(rng, colour, shape), (_atom(colour, shape), ANY_OBJECT)


def make_texts(
    layouts: Layouts, rng: random.Random, tokenize: CompactTokenizer, cache: dict[str, torch.Tensor]
) -> TextBatch:
    """Captions, hard negatives, queries and adversarial queries for every scene (in that order)."""
    scenes = layouts.facts()
    captions, negatives, queries, adversarial = [], [], [], []
    query_atoms, adversarial_atoms = [], []
    for objects, aspect in zip(scenes, layouts.aspect.tolist()):
        canvas = (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect)
        caption = describe(objects, rng)
        assert caption is not None
        captions.append(caption)
        negatives.append(hard_negative_caption(objects, rng))
        text, atoms = _query_for(objects, rng, canvas)
        queries.append(text)
        query_atoms.append(atoms)
        text, atoms = _adversarial_query(objects, rng)
        adversarial.append(text)
        adversarial_atoms.append(atoms)
    texts = captions + negatives + queries + adversarial
    missing = [text for text in dict.fromkeys(texts) if text not in cache]
    if missing:
        cache.update(zip(missing, tokenize(missing)))
    n = len(scenes)
    kinds = torch.tensor([CAPTION] * n + [NEGATIVE] * n + [QUERY] * (2 * n))
    atoms = torch.tensor([(ANY_OBJECT, ANY_OBJECT)] * (2 * n) + query_atoms + adversarial_atoms)
    return TextBatch(tokens=torch.stack([cache[text] for text in texts]), kinds=kinds, atoms=atoms)


class SceneTextStream(IterableDataset):
    """Endless (layouts, texts) batches; each worker has its own seeded stream."""

    def __init__(self, batch: int, seed: int, context_length: int) -> None:
        super().__init__()
        self.batch = batch
        self.seed = seed
        self.context_length = context_length

    def __iter__(self) -> Iterator[tuple[Layouts, TextBatch]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        generator = torch.Generator().manual_seed(self.seed * 1000 + worker)
        rng = random.Random(self.seed * 1000 + worker)
        tokenize = CompactTokenizer.for_scene_language(self.context_length)
        cache: dict[str, torch.Tensor] = {}
        while True:
            layouts = sample_layouts(self.batch, generator)
            yield layouts, make_texts(layouts, rng, tokenize, cache)
            if len(cache) > 200_000:
                cache.clear()


# ----------------------------------------------------------------------------------------------
# Pixels and the loss (on the training device).
# ----------------------------------------------------------------------------------------------


def render_inputs(
    layouts: Layouts, side: int, generator: torch.Generator | None, device: torch.device, blur_probability: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Letterboxed, normalised model inputs ``(n, 3, side, side)`` for the layouts, and which object slot
    each input pixel shows ``(n, side, side)`` (``Rendered.labels``: 0 background and padding, ``k + 1``
    where slot k is visible)."""
    rendered = render_layouts(
        layouts,
        (side, side),
        content_boxes=letterbox_boxes(layouts.aspect, side),
        pad_rgb=PAD_RGB,  # type: ignore[arg-type]
        generator=generator,
        device=device,
    )
    pixels = rendered.images / 255.0
    if blur_probability > 0.0:
        blurred = F.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
        chosen = torch.rand(pixels.shape[0], device=device, generator=generator) < blur_probability
        pixels = torch.where(chosen[:, None, None, None], blurred, pixels)
    mean = torch.tensor(OPENAI_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(OPENAI_STD, device=device)[None, :, None, None]
    return (pixels - mean) / std, rendered.labels


def object_regions(layouts: Layouts) -> torch.Tensor:
    """``(n, K)``: the index in ``REGION_NAMES`` of the 3 x 3 canvas cell holding each object's centre."""
    column = (layouts.cx * 3).long().clamp(0, 2)
    row = (layouts.cy * 3).long().clamp(0, 2)
    return row * 3 + column


def presence(layouts: Layouts) -> torch.Tensor:
    """``(n, C + 1, S + 1, R + 1)``: does the scene hold an object of colour c and shape s in canvas cell r
    (index C / S / R = any colour / any shape / anywhere)."""
    n = layouts.size
    shape = (n, WILD_COLOUR + 1, WILD_SHAPE + 1, WILD_REGION + 1)
    table = torch.zeros(shape, dtype=torch.bool, device=layouts.valid.device)
    scene = torch.arange(n, device=table.device)[:, None].expand_as(layouts.colour)
    valid = layouts.valid
    colour, kind, region = layouts.colour[valid], layouts.shape[valid], object_regions(layouts)[valid]
    for c, k, r in ((colour, kind, region), (colour, kind, WILD_REGION), (colour, WILD_SHAPE, region)):
        table[scene[valid], c, k, r] = True
    for c, k, r in ((colour, WILD_SHAPE, WILD_REGION), (WILD_COLOUR, kind, region), (WILD_COLOUR, kind, WILD_REGION)):
        table[scene[valid], c, k, r] = True
    table[scene[valid], WILD_COLOUR, WILD_SHAPE, region] = True
    table[:, WILD_COLOUR, WILD_SHAPE, WILD_REGION] = True
    return table


def positives(layouts: Layouts, texts: TextBatch) -> torch.Tensor:
    """``(T, n)`` boolean: which images satisfy each text (captions: their own image; negatives: none)."""
    n = layouts.size
    table = presence(layouts).view(n, -1)
    atoms = texts.atoms
    flat = (atoms[..., 0] * (WILD_SHAPE + 1) + atoms[..., 1]) * (WILD_REGION + 1) + atoms[..., 2]  # (T, 2)
    satisfied = (table[:, flat[:, 0]] & table[:, flat[:, 1]]).T
    own = torch.zeros_like(satisfied)
    own[:n].fill_diagonal_(True)
    kinds = texts.kinds[:, None]
    return torch.where(kinds == QUERY, satisfied, torch.where(kinds == CAPTION, own, torch.zeros_like(own)))


def contrastive_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, positive: torch.Tensor
) -> torch.Tensor:
    """Image-to-text CE over captions + hard negatives, and multi-positive text-to-image NCE.

    ``image`` ``(n, E)`` and ``text`` ``(T, E)`` are normalised; the first ``2 n`` texts are the
    captions then the negatives; ``positive`` is ``(T, n)``.
    """
    n = image.shape[0]
    logits = scale * text.float() @ image.float().T  # (T, n)
    image_to_text = F.cross_entropy(logits[: 2 * n].T, torch.arange(n, device=image.device))
    has_positive = positive.any(dim=1)
    masked = logits.masked_fill(~positive, float("-inf"))
    text_to_image = torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)
    return 0.5 * (image_to_text + text_to_image[has_positive].mean())


def sigmoid_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positive: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over every (text, image) pair, summed and divided by the images.

    ``-(1 / n) sum_{t, i} log sigmoid(z_ti (scale <text_t, image_i> + bias))`` with ``z_ti = +1`` where
    ``positive[t, i]`` (the text describes the image) and ``-1`` elsewhere (hard negatives: everywhere).
    ``image`` ``(n, E)`` and ``text`` ``(T, E)`` are normalised; the logits are computed in float32.
    """
    with torch.autocast(image.device.type, enabled=False):
        logits = scale.float() * text.float() @ image.float().T + bias.float()  # (T, n)
        signs = positive.float() * 2.0 - 1.0
        return -F.logsigmoid(signs * logits).sum() / image.shape[0]


# ----------------------------------------------------------------------------------------------
# The map loss: the attributor's raw map, trained to point at the queried objects.
# ----------------------------------------------------------------------------------------------

MAP_LAYER: int = DEMO_CLIP_RECOMMENDED["layer"]
"""The block whose map ``ClipAttributor`` reads for the demo CLIP by default (``DEMO_CLIP_RECOMMENDED``: the
last block, ``combine="cls"``, so Psi_cls alone makes the mask): the block ``--map-weight`` trains."""


def matching_slots(layouts: Layouts, atoms: torch.Tensor) -> torch.Tensor:
    """``(n, K)`` boolean: the object slots of scene i its query names, given the query's two atoms
    ``atoms[i]`` (``(n, 2, 3)``, see ``TextBatch``): a slot is named when its colour, shape and canvas cell
    fit one of the atoms (a wildcard fits anything); an atom of wildcards only (``ANY_OBJECT``, a
    one-object query's second atom) names no object, so a pair query names the union of its two objects.
    """
    colour, shape, region = (atoms[..., i, None] for i in range(3))  # (n, 2, 1) each
    fits = (
        ((colour == WILD_COLOUR) | (colour == layouts.colour[:, None]))
        & ((shape == WILD_SHAPE) | (shape == layouts.shape[:, None]))
        & ((region == WILD_REGION) | (region == object_regions(layouts)[:, None]))
    )  # (n, 2, K)
    names_something = (atoms != torch.tensor(ANY_OBJECT, device=atoms.device)).any(dim=-1)  # (n, 2)
    return (fits & names_something[..., None]).any(dim=1) & layouts.valid


def patch_coverage(labels: torch.Tensor, slots: torch.Tensor, patch: int) -> torch.Tensor:
    """``(n, P)``: the share of each ``patch x patch`` patch (row-major) whose pixels show one of the slots
    ``slots`` ``(n, K)`` picks, from the rendered labels ``(n, H, W)`` (visible pixels: an occluded part
    does not count).

    Example:
        >>> labels = torch.zeros(1, 4, 4, dtype=torch.long); labels[0, :2, :1] = 1; labels[0, 3, 3] = 2
        >>> patch_coverage(labels, torch.tensor([[True, False]]), 2)[0].tolist()
        [0.5, 0.0, 0.0, 0.0]
    """
    n = labels.shape[0]
    picked = torch.cat([slots.new_zeros(n, 1), slots], dim=1).float()  # label 0: background
    shown = picked.gather(1, labels.reshape(n, -1)).view(n, 1, *labels.shape[1:])
    return F.avg_pool2d(shown, patch).flatten(1)


class PatchMaps:
    """The raw map ``ClipAttributor`` reads (``AttributionMap.raw``, Psi_cls) at block ``layer``, computed
    with gradients from the model's own image forward.

    Each patch's term is its share of the CLS token's attention output in that block (``pooled_query_terms``,
    times the block's layer scale), through ``ln_post`` frozen at the final CLS token with its mean and bias
    split over ``(2 L - 1) N`` parts and through ``proj``; the map is the terms dotted with the normalised
    text and divided by the image embedding's norm: ``VisionTower._decompose_cls`` and ``ClipAttributor``
    with the same ``api_tool.backends.psi`` pieces (``test_train_clip_map_loss`` checks the two agree).
    Forward pre-hooks keep the inputs of the block and of ``ln_post`` during each image forward; a call
    reads (and forgets) the latest.
    """

    def __init__(self, model: torch.nn.Module, layer: int = MAP_LAYER) -> None:
        self.tower = tower_for(model)
        if not isinstance(self.tower.pooling, ClsPooling):
            raise InvalidParameterError("the map loss reads a CLS token's attention row; this tower pools otherwise")
        self.pooling: ClsPooling = self.tower.pooling
        self.block = self.tower.blocks[layer]
        self.block_input: torch.Tensor | None = None
        self.final: torch.Tensor | None = None
        self.handles = [
            self.block.register_forward_pre_hook(self._keep_block_input),
            self.pooling.final_norm.register_forward_pre_hook(self._keep_final),
        ]

    def _keep_block_input(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.block_input = args[0]

    def _keep_final(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.final = args[0]

    def __call__(self, embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``(B, P)`` float32: image i's map for text i, patches row-major, from the latest image forward
        (``embedding``: its unnormalised image embeddings ``(B, E)``; ``text``: normalised ``(B, E)``). The
        attention row runs under the caller's autocast; the readout (norm, ``proj``, text) in float32."""
        block_input, final = self.block_input, self.final
        assert block_input is not None and final is not None, "no image forward since the last map"
        self.block_input = self.final = None
        tower = self.tower
        x_ln = tower.block_norm(self.block)(block_input)
        contributions = pooled_query_terms(x_ln[:, 0], x_ln, tower.block_attention(self.block))
        scale = tower.layer_scale(self.block)
        with torch.autocast(block_input.device.type, enabled=False):
            contributions = contributions.float() * (scale.float() if scale is not None else 1.0)
            cls_final = (final[:, 0] if final.dim() == 3 else final)[:, None].float()
            norm = FrozenLayerNorm.at(cls_final, self.pooling.final_norm).to(torch.float32)
            share = residual_share(len(tower.blocks)) * block_input.shape[1]
            head = self.pooling.head.to(torch.float32, block_input.device)
            terms = head(norm(contributions[:, tower.prefix_tokens :], share), share)  # (B, P, E)
            maps = torch.einsum("bpe,be->bp", terms, text.float())
            return maps / embedding.float().norm(dim=-1, keepdim=True)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self.handles:
            handle.remove()


def map_loss(maps: torch.Tensor, coverage: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-positive cross-entropy over the patches, pulling each map's peak into its objects.

    ``-log sum_p c_p softmax_p(z / temperature)`` per map, with ``z`` the raw map ``maps`` ``(Q, P)``
    standardised over its patches (zero mean, unit standard deviation) and ``c_p`` the share of patch p the
    query's objects cover (``coverage`` ``(Q, P)``, in [0, 1]); the mean over the maps whose objects cover
    some patch (0 if none), in float32.

    Why this form: the attributor min-max normalises each map, so only its shape counts; standardising
    makes the loss blind to the same per-map offsets and scales (a larger map cannot lower it), with a
    gradient on every patch (min and max would give it to two). Pointing wants the peak inside *one* of
    the objects, so the softmax mass may sit anywhere on them (``-log sum_{covered} softmax``) instead of
    being spread over all their patches as a cross-entropy against the normalised coverage would demand
    (which fights a sharp peak on large objects and on pair queries' two objects); weighting each patch by
    its coverage makes a patch an object barely touches count little.
    """
    with torch.autocast(maps.device.type, enabled=False):
        maps, coverage = maps.float(), coverage.float()
        covered = coverage.sum(dim=1) > 0
        weights = torch.where(covered[:, None], coverage, torch.ones_like(coverage))  # no -inf rows
        centred = maps - maps.mean(dim=1, keepdim=True)
        z = centred / centred.square().mean(dim=1, keepdim=True).sqrt().clamp(min=1e-12)
        log_p = torch.log_softmax(z / temperature, dim=1)
        per_map = -torch.logsumexp(log_p + weights.log(), dim=1)
        return (per_map * covered).sum() / covered.sum().clamp(min=1)


def pointing_hits(maps: torch.Tensor, coverage: torch.Tensor, grid: int) -> torch.Tensor:
    """``(Q,)`` boolean: the argmax of the attributor's grid-level mask (the raw maps ``(Q, grid * grid)``
    min-max normalised and enhanced as ``DEMO_CLIP_RECOMMENDED`` says, box-filtered by the merge's default
    3 x 3) falls on a patch that shows one of the query's objects (``coverage`` ``(Q, P)`` > 0)."""
    mask = combine_maps_batched(
        maps.float().view(-1, grid, grid),
        None,
        combine=DEMO_CLIP_RECOMMENDED["combine"],
        enhance_coe=DEMO_CLIP_RECOMMENDED["enhance_coe"],
    )
    best = mask.flatten(1).argmax(dim=1)
    return coverage.gather(1, best[:, None])[:, 0] > 0


class ClsAfterBlock:
    """Captures the CLS token after one visual block (forward hook)."""

    def __init__(self, block: torch.nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = block.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.value = output[:, 0]


# ----------------------------------------------------------------------------------------------
# Held-out evaluation.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOut:
    """A fixed held-out set: inputs, caption tokens and hard-negative tokens; one reference query per scene
    (``query_kinds``: its index in ``REFERENCE_KINDS``, -1 where the scene has none of that kind) and the
    share of each patch its target objects cover ``(count, P)``."""

    inputs: torch.Tensor
    captions: torch.Tensor
    negatives: torch.Tensor
    queries: torch.Tensor
    query_kinds: torch.Tensor
    coverage: torch.Tensor


def held_out_queries(layouts: Layouts, rng: random.Random) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Scene i's query of reference kind ``REFERENCE_KINDS[i % 6]`` (``reference_query``), its kind's index
    (-1 and an empty text where the scene has none) and its targets as object slots ``(n, K)`` (for
    relations, the anchor and the related object, as the per-kind benchmark scores)."""
    texts, kinds = [], []
    targets = torch.zeros_like(layouts.valid)
    for i, (objects, aspect) in enumerate(zip(layouts.facts(), layouts.aspect.tolist())):
        canvas = (aspect, 1.0) if aspect >= 1.0 else (1.0, 1.0 / aspect)
        kind = i % len(REFERENCE_KINDS)
        reference = reference_query(objects, REFERENCE_KINDS[kind], rng, canvas)
        texts.append(reference.text if reference is not None else "")
        kinds.append(kind if reference is not None else -1)
        if reference is not None:
            slots = layouts.valid[i].nonzero()[:, 0]
            targets[i, slots[list(reference.targets)]] = True
    return texts, torch.tensor(kinds), targets


def make_held_out(count: int, seed: int, side: int, tokenize: CompactTokenizer, device: torch.device) -> HeldOut:
    """``count`` scenes from a stream disjoint from training (its own seed), with captions and reference
    queries (drawn after the captions from their own stream, so the captions do not depend on them)."""
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    layouts = sample_layouts(count, generator)
    scenes = layouts.facts()
    captions = [describe(objects, rng) or "" for objects in scenes]
    negatives = [hard_negative_caption(objects, rng) for objects in scenes]
    queries, kinds, targets = held_out_queries(layouts, random.Random(seed + 1))
    noise = torch.Generator(device=device).manual_seed(seed)
    patch = DEMO_CLIP_ARCHITECTURE["vision_cfg"]["patch_size"]
    inputs, coverage = [], []
    for i in range(0, count, 250):
        chunk, labels = render_inputs(layouts.select(slice(i, i + 250)), side, noise, device)
        inputs.append(chunk)
        coverage.append(patch_coverage(labels, targets[i : i + 250].to(device), patch))
    return HeldOut(
        torch.cat(inputs),
        tokenize(captions).to(device),
        tokenize(negatives).to(device),
        tokenize(queries).to(device),
        kinds.to(device),
        torch.cat(coverage),
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, held_out: HeldOut, patch_maps: PatchMaps | None = None, group: int = 100
) -> dict[str, float]:
    """Caption-to-image and image-to-caption top-1 among ``group``, and binding accuracy; with
    ``patch_maps``, pointing (``pointing_hits``) of the held-out reference queries, overall and per kind."""
    model.eval()
    image_parts, hits = [], []
    query_texts = model.encode_text(held_out.queries, normalize=True)
    for chunk, text, coverage in zip(held_out.inputs.split(250), query_texts.split(250), held_out.coverage.split(250)):
        embedding = model.encode_image(chunk)
        image_parts.append(F.normalize(embedding, dim=-1))
        if patch_maps is not None:
            grid = round(math.sqrt(coverage.shape[1]))
            hits.append(pointing_hits(patch_maps(embedding, text), coverage, grid))
    images = torch.cat(image_parts)
    captions = model.encode_text(held_out.captions, normalize=True)
    negatives = model.encode_text(held_out.negatives, normalize=True)
    text_hits = image_hits = 0
    groups = images.shape[0] // group
    for g in range(groups):
        part = slice(g * group, (g + 1) * group)
        similarity = captions[part] @ images[part].T
        target = torch.arange(group, device=images.device)
        text_hits += int((similarity.argmax(dim=1) == target).sum())
        image_hits += int((similarity.argmax(dim=0) == target).sum())
    binding = ((images * captions).sum(-1) > (images * negatives).sum(-1)).float().mean()
    model.train()
    total = groups * group
    metrics = {"t2i_top1": text_hits / total, "i2t_top1": image_hits / total, "binding": float(binding)}
    if patch_maps is not None:
        hit, kinds = torch.cat(hits), held_out.query_kinds
        metrics["pointing"] = float(hit[kinds >= 0].float().mean())
        for index, kind in enumerate(REFERENCE_KINDS):
            metrics[f"point_{kind}"] = float(hit[kinds == index].float().mean())
    return metrics


# ----------------------------------------------------------------------------------------------
# Training loop.
# ----------------------------------------------------------------------------------------------


def _param_groups(
    model: torch.nn.Module, weight_decay: float, extra: Sequence[torch.nn.Parameter] = ()
) -> list[dict[str, object]]:
    """AdamW groups: matrices decay; vectors, embeddings, the temperature and ``extra`` (the loss's bias) do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("class_embedding"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay + list(extra), "weight_decay": 0.0}]


def cosine_lr(peak: float, step: int, elapsed: float, config: TrainConfig) -> float:
    """Cosine decay from ``peak`` after warm-up; progress is the larger of the step and time fractions."""
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    if config.max_seconds > 0:
        progress = max(progress, elapsed / config.max_seconds)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def architecture_for(image_size: int, pool: str = "token") -> dict[str, Any]:
    """``DEMO_CLIP_ARCHITECTURE`` with the vision tower's input side set to ``image_size``, pooling with
    the CLS token (``"token"``) or the attention-pool head (``"attention"``, ``ATTENTION_POOL_CFG``)."""
    patch = DEMO_CLIP_ARCHITECTURE["vision_cfg"]["patch_size"]
    if image_size <= 0 or image_size % patch:
        raise InvalidParameterError(
            f"image_size must be a positive multiple of the patch size {patch}, got {image_size}"
        )
    vision = {**DEMO_CLIP_ARCHITECTURE["vision_cfg"], "image_size": image_size}
    if pool == "attention":
        vision.update(ATTENTION_POOL_CFG)
    return {**DEMO_CLIP_ARCHITECTURE, "vision_cfg": vision}


def load_initial_weights(model: torch.nn.Module, directory: str, tokenize: CompactTokenizer) -> dict[str, Any]:
    """Copy a saved demo CLIP's weights into ``model`` (positional embeddings resized to its grid; token
    embeddings mapped by BPE id when the saved vocabulary is a subset of ``tokenize``'s, words new to it
    keeping ``model``'s initial rows); returns the saved model's metadata, to be kept with the new weights."""
    initial, initial_tokenize = load_demo_clip("cpu", directory)
    saved_ids = list(getattr(initial_tokenize, "kept_ids", ()))
    if not set(saved_ids) <= set(tokenize.kept_ids):
        raise InvalidParameterError(
            f"{directory} was trained with words the scene language no longer has (another vocabulary)"
        )
    state = initial.state_dict()
    resize_pos_embed(state, model)
    state["token_embedding.weight"] = map_token_embedding(
        state["token_embedding.weight"], saved_ids, model.state_dict()["token_embedding.weight"], tokenize.kept_ids
    )
    model.load_state_dict(state, strict=True)
    return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("metadata", {})


def map_token_embedding(
    saved: torch.Tensor, saved_ids: Sequence[int], initial: torch.Tensor, kept_ids: Sequence[int]
) -> torch.Tensor:
    """Token embedding rows for the compact vocabulary of ``kept_ids``: the special rows (padding, unknown,
    start, end) and every BPE id both vocabularies keep come from ``saved``; the others from ``initial``.

    Example:
        >>> saved = torch.arange(6.0)[:, None]  # pad, unk, start, ids 7 and 9, end
        >>> map_token_embedding(saved, [7, 9], torch.full((7, 1), -1.0), [7, 8, 9])[:, 0].tolist()
        [0.0, 1.0, 2.0, 3.0, -1.0, 4.0, 5.0]
    """
    rows = initial.clone()
    rows[:FIRST_WORD_ID] = saved[:FIRST_WORD_ID]
    rows[-1] = saved[-1]
    position = {bpe: FIRST_WORD_ID + i for i, bpe in enumerate(kept_ids)}
    for i, bpe in enumerate(saved_ids):
        rows[position[bpe]] = saved[FIRST_WORD_ID + i]
    return rows


def train(config: TrainConfig) -> dict[str, float]:
    """Train, print curves, save the weights; returns the final held-out metrics."""
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    tokenize = CompactTokenizer.for_scene_language(DEMO_CLIP_ARCHITECTURE["text_cfg"]["context_length"])
    architecture = architecture_for(config.image_size, config.pool)
    model = build_demo_clip(tokenize.vocab_size, architecture)
    init_metadata = load_initial_weights(model, config.init, tokenize) if config.init else None
    model = model.to(device).train()
    sigmoid = config.loss == "sigmoid"
    initial_bias = (init_metadata or {}).get("logit_bias", SIGMOID_INIT_BIAS)
    logit_bias = torch.nn.Parameter(torch.tensor(float(initial_bias), device=device))
    if sigmoid and not config.init:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(SIGMOID_INIT_SCALE))
    print(f"params: {sum(p.numel() for p in model.parameters()):,}; vocab {tokenize.vocab_size}; {asdict(config)}")
    groups = _param_groups(model, config.weight_decay, [logit_bias] if sigmoid else [])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_at(step: int, elapsed: float) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        return cosine_lr(config.lr, step, elapsed, config)

    stream = SceneTextStream(config.batch, config.seed, tokenize.context_length)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=config.workers,
        prefetch_factor=4 if config.workers > 0 else None,
        persistent_workers=config.workers > 0,
    )
    held_out = make_held_out(config.eval_scenes, 10_000 + config.seed, config.image_size, tokenize, device)
    noise = torch.Generator(device=device).manual_seed(config.seed)
    blocks = model.visual.transformer.resblocks
    aux = ClsAfterBlock(blocks[config.aux_layer]) if config.aux_weight > 0 else None
    patch_maps = PatchMaps(model) if config.pool == "token" else None
    patch = architecture["vision_cfg"]["patch_size"]
    map_value: torch.Tensor | None = None
    use_amp = device.type == "cuda"
    started = time.time()
    metrics: dict[str, float] = {}
    for step, (layouts, texts) in enumerate(loader):
        elapsed = time.time() - started
        if step >= config.steps or (config.max_seconds > 0 and elapsed > config.max_seconds):
            print(f"stopping at step {step} after {elapsed:.0f}s", flush=True)
            break
        lr = lr_at(step, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens = texts.tokens.to(device, non_blocking=True)
        text_batch = TextBatch(tokens, texts.kinds.to(device), texts.atoms.to(device))
        inputs, labels = render_inputs(layouts, config.image_size, noise, device, config.blur_probability)
        on_device = layouts.to(device)
        positive = positives(on_device, text_batch)
        n = layouts.size
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            embedding = model.encode_image(inputs)
            image = F.normalize(embedding, dim=-1)
            text = model.encode_text(tokens, normalize=True)
            scale = model.logit_scale.exp()
            if sigmoid:
                loss = sigmoid_loss(image, text, scale, logit_bias, positive)
            else:
                loss = contrastive_loss(image, text, scale, positive)
            if aux is not None:
                assert aux.value is not None
                aux_image = F.normalize(model.visual.ln_post(aux.value) @ model.visual.proj, dim=-1)
                loss = loss + config.aux_weight * contrastive_loss(aux_image, text, scale, positive)
            if config.map_weight > 0:
                assert patch_maps is not None
                queries = slice(2 * n, 3 * n)  # text i of the query block is image i's own query
                coverage = patch_coverage(labels, matching_slots(on_device, text_batch.atoms[queries]), patch)
                map_value = map_loss(patch_maps(embedding, text[queries]), coverage, config.map_temperature)
                loss = loss + config.map_weight * map_value
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % config.log_every == 0:
            elapsed = time.time() - started
            bias_text = f"  bias {float(logit_bias.detach()):6.2f}" if sigmoid else ""
            map_text = f"  map {float(map_value.detach()):.4f}" if map_value is not None else ""
            print(
                f"step {step:6d}  loss {float(loss.detach()):.4f}{map_text}  scale {float(scale.detach()):6.2f}"
                f"{bias_text}  "
                f"lr {lr:.2e}  {(step + 1) * config.batch / max(elapsed, 1e-9):7.0f} img/s  {elapsed:6.0f}s",
                flush=True,
            )
        if (step + 1) % config.eval_every == 0:
            metrics = evaluate(model, held_out, patch_maps)
            print(f"eval step {step + 1:6d}  " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    model.eval()
    metrics = evaluate(model, held_out, patch_maps)
    metrics["train_seconds"] = time.time() - started
    metrics["steps"] = step
    out = save_demo_clip(
        model,
        tokenize,
        config.out,
        architecture=architecture,
        metadata={
            "train_config": asdict(config),
            "held_out": metrics,
            "torch": torch.__version__,
            "init": init_metadata,
            **({"logit_bias": float(logit_bias.detach())} if sigmoid else {}),
        },
    )
    print(f"final  {metrics}  saved to {out}")
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command-line flags, one per ``TrainConfig`` field (``--aux-weight 0`` turns deep supervision off)."""
    return parse_config(TrainConfig, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -m training.train_clip``."""
    train(parse_args(argv))


if __name__ == "__main__":
    main()
