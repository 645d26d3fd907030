"""The model-family table: the one place that knows which models the package can attribute, and how.

Every family declares how it is recognised (an HF config's ``model_type``, or a spec prefix), which
backend runs it, its defaults (block, combine recipe, enhance_coe), what it can do (score a given
answer; wrap a loaded chat model for self-attribution), its geometry and what was verified. The
registry, the CLI (``--backend`` choices, ``api-prompt models``), self-attribution in ``agents`` and
the evaluation ask this table; nothing else branches on a family's name. A new LVLM family is one
adapter file in ``api_tool/backends/lvlm_families/`` and one entry here.

Example:
    >>> from api_tool.families import family, lvlm_family_of
    >>> family("llava").backend, family("llava").defaults.layer
    ('lvlm', 20)
    >>> from types import SimpleNamespace
    >>> lvlm_family_of(SimpleNamespace(model_type="qwen2_5_vl")).name
    'qwen2_vl'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, Literal

from api_tool.errors import UnknownModelError, UnsupportedModelError

if TYPE_CHECKING:
    from api_tool.backends.lvlm_families.base import LvlmFamilyAdapter

Backend = Literal["clip", "lvlm"]


@dataclass(frozen=True)
class AttributionDefaults:
    """A family's default settings: decoder / ViT block (negative counts from the end; ``None`` = the
    middle block), how raw maps combine, and the sigmoid sharpening coefficient."""

    layer: int | None
    combine: str
    enhance_coe: float = 10.0


@dataclass(frozen=True)
class Family:
    """One row of the table (see the module docstring)."""

    name: str
    backend: Backend
    classes: str
    geometry: str
    verified: str
    defaults: AttributionDefaults
    model_types: tuple[str, ...] = ()
    adapter_path: str | None = None
    scores_answer: bool = False
    wraps_chat_model: bool = False
    spec_prefixes: tuple[str, ...] = field(default=())

    def adapter(self) -> LvlmFamilyAdapter:
        """A new instance of the family's LVLM adapter (imported on first use)."""
        if self.adapter_path is None:
            raise UnsupportedModelError(f"the {self.name} family has no LVLM adapter")
        module, _, name = self.adapter_path.partition(":")
        return getattr(import_module(module), name)()  # type: ignore[no-any-return]


FAMILIES: tuple[Family, ...] = (
    Family(
        name="clip",
        backend="clip",
        classes="open_clip VisionTransformer CLIPs: CLS token (ViT-B-32, ViT-L-14-336, DFN / MetaCLIP tags, ...; "
        "'demo') or CoCa's attention pool (attentional_pool=True: query 0, ln_post, proj; 'demo-siglip')",
        geometry="letterbox onto the square input; one patch grid",
        verified="Psi_cls / Psi_comp equal the literal formulas and the authors' code on the same weights; token "
        "terms + bias = image embedding in float64 (CLS and attention pool); same map as transformers CLIPModel on "
        "copied weights",
        defaults=AttributionDefaults(layer=-2, combine="paper", enhance_coe=10.0),
        adapter_path="api_tool.backends.towers.open_clip_vit:OpenClipVitTower",
        spec_prefixes=("clip", "local-dir"),
    ),
    Family(
        name="timm_vit",
        backend="clip",
        classes="open_clip TimmModel towers over a timm VisionTransformer (fused qkv): attention-pool head "
        "(ViT-B-16-SigLIP, ViT-B-16-SigLIP2, ViT-SO400M-14-SigLIP-384, ...) or CLS token (MobileCLIP2-L-14, "
        "timm vit_*_clip ports of DFN / MetaCLIP); needs timm",
        geometry="letterbox onto the square input; one patch grid",
        verified="token terms + bias = image embedding in float64 (probe terms exact; the pool's MLP to first order "
        "or residual only); same map as transformers SiglipModel on copied weights; random-weight checkpoint "
        "through 'api-prompt --model NAME --pretrained FILE'",
        defaults=AttributionDefaults(layer=-2, combine="paper", enhance_coe=10.0),
        adapter_path="api_tool.backends.towers.timm_vit:TimmVitTower",
        spec_prefixes=("clip", "local-dir"),
    ),
    Family(
        name="hf_clip",
        backend="clip",
        classes="transformers CLIPModel ('hf:<hub id or save_pretrained directory>')",
        geometry="letterbox onto the square input; one patch grid",
        verified="same map as the open_clip CLIP on copied weights (text included); token terms + bias = image "
        "embedding in float64; save_pretrained directory through 'hf:DIR' and the CLI",
        defaults=AttributionDefaults(layer=-2, combine="paper", enhance_coe=10.0),
        model_types=("clip",),
        adapter_path="api_tool.backends.towers.hf:HfClipTower",
        spec_prefixes=("hf",),
    ),
    Family(
        name="hf_siglip",
        backend="clip",
        classes="transformers SiglipModel (SigLIP, fixed-resolution SigLIP2 checkpoints; 'hf:...')",
        geometry="letterbox onto the square input; one patch grid",
        verified="same map as open_clip's timm SigLIP tower on copied weights; token terms + bias = image embedding "
        "in float64",
        defaults=AttributionDefaults(layer=-2, combine="paper", enhance_coe=10.0),
        model_types=("siglip",),
        adapter_path="api_tool.backends.towers.hf:HfSiglipTower",
        spec_prefixes=("hf",),
    ),
    Family(
        name="hf_siglip2",
        backend="clip",
        classes="transformers Siglip2Model (SigLIP2 NaFlex; 'hf:...')",
        geometry="the image processor's aspect-preserving resize to patch multiples (max_num_patches), no crop or "
        "padding: one grid per image whose box is the whole image",
        verified="same map as SiglipModel on the same weights where the grids agree; token terms + bias = image "
        "embedding in float64; a planted patch lands on its own cell of a non-square grid",
        defaults=AttributionDefaults(layer=-2, combine="paper", enhance_coe=10.0),
        model_types=("siglip2",),
        adapter_path="api_tool.backends.towers.hf:HfSiglip2Tower",
        spec_prefixes=("hf",),
    ),
    Family(
        name="llava",
        backend="lvlm",
        classes="LlavaForConditionalGeneration (LLaVA-1.5; Llama / Mistral / Qwen2 text models)",
        geometry="letterbox onto the square input; one patch grid (24 x 24 at 336 px)",
        verified="map = eager output_attentions; teacher forcing = generation; planted signal lands on its pixels",
        defaults=AttributionDefaults(layer=20, combine="cls", enhance_coe=10.0),
        model_types=("llava",),
        adapter_path="api_tool.backends.lvlm_families.llava:LlavaFamily",
        scores_answer=True,
        wraps_chat_model=True,
        spec_prefixes=("llava",),
    ),
    Family(
        name="qwen2_vl",
        backend="lvlm",
        classes="Qwen2VL / Qwen2_5_VL / Qwen3VL / Qwen3VLMoe ForConditionalGeneration (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)",
        geometry="dynamic resolution: the whole image stretched to multiples of 28 px (32 for Qwen3-VL), no crop; "
        "one grid of 2 x 2-merged tokens whose box is the whole image",
        verified="map = eager output_attentions at every generation step and under teacher forcing (3-D M-RoPE "
        "tables identical in both); Qwen3-VL q/k norms; planted square lands on its pixels on stretched images",
        defaults=AttributionDefaults(layer=None, combine="cls"),
        model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"),
        adapter_path="api_tool.backends.lvlm_families.qwen2_vl:Qwen2VLFamily",
        scores_answer=True,
        wraps_chat_model=True,
    ),
    Family(
        name="llava_next",
        backend="lvlm",
        classes="LlavaNextForConditionalGeneration (LLaVA-NeXT / 1.6; Llama / Mistral / Qwen2 text models)",
        geometry="base view (whole image, stretched) + one unpadded any-resolution grid (newline tokens left "
        "out; its box = the kept features mapped back through the canvas); tiles stitched by area",
        verified="map = eager output_attentions (generation and teacher forcing); tile boxes computed by hand on "
        "wide and tall images; every cell's feature = its crop patch's; planted signal lands on its pixels",
        defaults=AttributionDefaults(layer=20, combine="cls"),
        model_types=("llava_next",),
        adapter_path="api_tool.backends.lvlm_families.llava_next:LlavaNextFamily",
        scores_answer=True,
        wraps_chat_model=True,
    ),
    Family(
        name="llava_onevision",
        backend="lvlm",
        classes="LlavaOnevisionForConditionalGeneration (LLaVA-OneVision; SigLIP + Qwen2), single images",
        geometry="as llava_next; the high-resolution grid split at crop seams when the crop side is not a "
        "patch multiple (SigLIP 384/14), one pooled tile for anyres_max_N",
        verified="as llava_next, plus the seam split and anyres_max pooling",
        defaults=AttributionDefaults(layer=-12, combine="cls"),
        model_types=("llava_onevision",),
        adapter_path="api_tool.backends.lvlm_families.llava_next:LlavaOnevisionFamily",
        scores_answer=True,
        wraps_chat_model=True,
    ),
    Family(
        name="gemma3",
        backend="lvlm",
        classes="Gemma3ForConditionalGeneration (Gemma 3 4B / 12B / 27B; SigLIP + Gemma 3 text)",
        geometry="letterbox onto the square input, pan-and-scan off; one pooled token grid (16 x 16 at 896 px)",
        verified="map = eager output_attentions (sliding / local-RoPE and global blocks, generation and teacher "
        "forcing); q/k norms, scaling and token_type_ids each checked to matter; planted signal lands on its pixels",
        defaults=AttributionDefaults(layer=None, combine="cls"),
        model_types=("gemma3",),
        adapter_path="api_tool.backends.lvlm_families.gemma3:Gemma3Family",
        scores_answer=True,
        wraps_chat_model=True,
    ),
    Family(
        name="idefics3",
        backend="lvlm",
        classes="Idefics3ForConditionalGeneration (Idefics3-8B; SigLIP + Llama 3)",
        geometry="stretched to rows x cols square crops (+ a global image last), each a pixel-shuffled grid; "
        "tiles stitched by area",
        verified="map = eager output_attentions (generation and teacher forcing); token colours in the "
        "processor's own frames match the tile boxes; planted square lands on its pixels",
        defaults=AttributionDefaults(layer=20, combine="cls"),
        model_types=("idefics3",),
        adapter_path="api_tool.backends.lvlm_families.idefics3:Idefics3Family",
        scores_answer=True,
        wraps_chat_model=True,
    ),
    Family(
        name="smolvlm",
        backend="lvlm",
        classes="SmolVLMForConditionalGeneration (SmolVLM / SmolVLM2; Idefics3's layout)",
        geometry="as idefics3 (a crop side that is not a patch multiple drops a strip, left to the global image)",
        verified="as idefics3",
        defaults=AttributionDefaults(layer=-12, combine="cls"),
        model_types=("smolvlm",),
        adapter_path="api_tool.backends.lvlm_families.idefics3:SmolVLMFamily",
        scores_answer=True,
        wraps_chat_model=True,
    ),
    Family(
        name="internvl",
        backend="lvlm",
        classes="InternVLForConditionalGeneration (InternVL 2.5 / 3 / 3.5 '-hf'; Qwen2 / Llama / Qwen3 text)",
        geometry="aspect-ratio grid of square tiles (stretched; boxes = W/cols x H/rows) + a whole-image "
        "thumbnail last, each a pixel-shuffled grid; tiles stitched by area",
        verified="map = eager output_attentions (generation and teacher forcing, Qwen2 and Qwen3 q/k norms); "
        "pixel-shuffle order; tiles = the processor's crops; planted signal lands on its pixels",
        defaults=AttributionDefaults(layer=-12, combine="cls"),
        model_types=("internvl",),
        adapter_path="api_tool.backends.lvlm_families.internvl:InternVLFamily",
        scores_answer=True,
        wraps_chat_model=True,
    ),
)


def family(name: str) -> Family:
    """The family called ``name``, or ``UnknownModelError`` listing the families there are."""
    for entry in FAMILIES:
        if entry.name == name:
            return entry
    raise UnknownModelError(f"no model family {name!r}; families: {', '.join(entry.name for entry in FAMILIES)}")


def lvlm_families() -> tuple[Family, ...]:
    """The families whose backend is the LVLM self-attribution mechanism."""
    return tuple(entry for entry in FAMILIES if entry.backend == "lvlm")


def lvlm_family_of(config: Any, allowed: Sequence[str] | None = None, model_class: str | None = None) -> Family:
    """The LVLM family of an HF config (by ``model_type``), or ``UnsupportedModelError`` naming the
    model (``model_class`` when a loaded model is at hand) and the families that work. ``allowed``
    narrows the choice (e.g. ``LlavaAttributor``)."""
    model_type = getattr(config, "model_type", None)
    candidates = [entry for entry in lvlm_families() if allowed is None or entry.name in allowed]
    for entry in candidates:
        if model_type in entry.model_types:
            return entry
    architecture = model_class or (getattr(config, "architectures", None) or [type(config).__name__])[0]
    supported = "; ".join(f"{entry.name} ({', '.join(entry.model_types)})" for entry in candidates)
    hint = "" if allowed is None else " (api_tool.LvlmAttributor detects every family)"
    raise UnsupportedModelError(
        f"{architecture} is not supported (model_type {model_type!r}){hint}; supported families: {supported}"
    )


def lvlm_family_of_model(model: object) -> Family | None:
    """The LVLM family of a loaded model, or ``None`` when it belongs to none (a remote chat model)."""
    return lvlm_family_of_config(getattr(model, "config", None))


def lvlm_family_of_config(config: object) -> Family | None:
    """The LVLM family of an HF config (by ``model_type``), or ``None`` when it belongs to none."""
    model_type = getattr(config, "model_type", None)
    return next((entry for entry in lvlm_families() if model_type in entry.model_types), None)


def backend_names() -> tuple[str, ...]:
    """What ``api-prompt --backend`` accepts: ``clip``, ``lvlm`` (every LVLM family, detected) and the
    spec prefix of each LVLM family that has one (``llava``: LLaVA-1.5 only)."""
    prefixes = [prefix for entry in lvlm_families() for prefix in entry.spec_prefixes]
    return ("clip", "lvlm", *prefixes)


def table() -> str:
    """The table as text, one block per family (``api-prompt models`` prints it)."""
    lines = []
    for entry in FAMILIES:
        recognised = ", ".join(entry.model_types) or ", ".join(f"{p}:" for p in entry.spec_prefixes)
        defaults = entry.defaults
        lines += [
            f"{entry.name}  [{entry.backend}]  {recognised}",
            f"  classes:   {entry.classes}",
            f"  geometry:  {entry.geometry}",
            f"  defaults:  layer {defaults.layer}, combine {defaults.combine}, enhance_coe {defaults.enhance_coe:g}",
            f"  abilities: scores a given answer: {'yes' if entry.scores_answer else 'no'}; "
            f"self-attribution of a loaded chat model: {'yes' if entry.wraps_chat_model else 'no'}",
            f"  verified:  {entry.verified}",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"
