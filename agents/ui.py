"""``api-prompt ui``: a web page to see attention prompting work, and to try the self-reflection loop.

Drop in an image (upload, paste, or one of the demo scenes), type a question, and the page shows the
prompted image, the heatmap (with the attended box and the peak marked) and the crop side by side, where
the map peaks, the attended box and the time of each stage; the mask downloads as PNG and NumPy. Changing
the question, ``combine``, ``enhance_coe``, the kernel size, the style or the gray level re-renders at once:

* the CLIP attributor caches its image pass by image content, so a new question costs one text pass;
* the last maps are cached here by (model, layer, image, question), so ``combine``, ``enhance_coe`` and
  the kernel size are re-applied to the cached raw maps (``api_tool.maps.combine_maps``), and style and
  gray level only re-render: neither re-attributes.

Only a new image, a new layer or a new model runs the image tower again; the page counts every image
pass it causes (``image_passes`` in the JSON summary). The loop panel asks a target (the offline demo
assistant, an OpenAI-compatible server or Ollama) with a strategy of ``agents.prompts`` and shows the
trace round by round with the images each round sent.

One model per spec is loaded for the whole process and shared by every visitor (the registry); requests
wait in one queue with bounded concurrency; uploads over ``--max-upload-mb`` or ``--max-pixels`` get a
message, not an error page; the page binds to 127.0.0.1 unless ``--host`` says otherwise.

Run:
    api-prompt ui                      # http://127.0.0.1:7860, the offline demo models
    api-prompt ui --port 8080 --model clip:ViT-L-14-336@openai
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from agents.chat_models import ChatTransformersVLM
from agents.prompts import STRATEGIES
from agents.reflection import ReflectionResult, default_tool, image_data_uri, reflect
from api_tool.backends.base import Attributor
from api_tool.backends.clip import image_key
from api_tool.backends.registry import get_attributor
from api_tool.demo.scenes import Scene, SceneObject, generate_scene, name_of, with_article
from api_tool.errors import ApiPromptingError, ImageLoadError, ImageTooLargeError, InvalidParameterError
from api_tool.families import table
from api_tool.images import load_image
from api_tool.maps import COMBINE_MODES, AttributionMap, combine_maps
from api_tool.render import STYLES, Style, attention_box, render
from api_tool.tool import AttentionPromptTool

if TYPE_CHECKING:
    import gradio as gr
    from langchain_core.language_models import BaseChatModel

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MODEL = "demo"
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 25_000_000
DEFAULT_CONCURRENCY = 2
DEFAULT_QUEUE_SIZE = 32
DISPLAY_MAX_SIDE = 1024
"""Longest side of the images the page shows; the mask downloads are at the image's full size."""
TARGET_IMAGE_MAX_SIDE = 1024
"""Longest side of the original image sent to a loop target."""
BOX_THRESHOLD = 0.5
"""Mask value from which a pixel counts as attended (the box and the attended share), as in the CLI."""
MAP_CACHE_SIZE = 16
MASK_CACHE_SIZE = 2
KEPT_DOWNLOADS = 32
MODEL_CHOICES: tuple[str, ...] = (
    "demo",
    "llava:demo",
    "clip:ViT-B-16@openai",
    "clip:ViT-L-14-336@openai",
    "llava:llava-hf/llava-1.5-7b-hf",
    "lvlm:Qwen/Qwen2.5-VL-7B-Instruct",
)
MapKey = tuple[str, int, str, str]
"""A cached map's key: model spec, resolved layer, image content hash, question."""
TARGET_KINDS: tuple[str, ...] = ("demo assistant", "OpenAI-compatible", "Ollama")
ANNOTATORS: tuple[str, ...] = ("the auxiliary model above", "the target's own attention")


@dataclass(frozen=True)
class ExampleScene:
    """A demo scene offered as an example, with the object its question asks about and what the demo
    CLIP does with it (so the page can say whether the map's peak lands on that object)."""

    scene: Scene
    question: str
    queried: SceneObject
    label: str


EXAMPLE_SCENES: tuple[tuple[int, int, str], ...] = (
    (11, 1, "where is the {name}?"),
    (0, 0, "is there {article_name} in the image?"),
    (7, 0, "is there {article_name} in the image?"),
    (3, 2, "where is the {name}?"),
)
"""``(seed, object index, question template)`` of the example scenes (320 x 224, three objects, gradient
background, as ``examples/quickstart.py`` draws them). With the demo CLIP's defaults the map peaks on the
queried object in the first two and misses it in the last two (seed 7 is the README's miss)."""


def example_scenes() -> list[ExampleScene]:
    """The demo scenes the page offers as examples, with their questions and ground truth."""
    examples = []
    for seed, index, template in EXAMPLE_SCENES:
        scene = generate_scene(seed, size=(320, 224), n_objects=3, background="gradient")
        queried = scene.objects[index]
        question = template.format(name=name_of(queried), article_name=with_article(name_of(queried)))
        examples.append(ExampleScene(scene, question, queried, f"scene {seed}: {question}"))
    return examples


@dataclass(frozen=True)
class MapSettings:
    """What the map panel asks for: the auxiliary model and how its map is turned into images."""

    model: str = DEFAULT_MODEL
    layer: int | None = None
    combine: str = "cls"
    enhance_coe: float = 3.0
    kernel_size: int = 3
    style: Style = "gray"
    gray_level: int = 0


@dataclass
class MapView:
    """What one run of the map panel shows: the three images, a JSON-ready summary and the mask files."""

    prompted: Image.Image
    heatmap: Image.Image
    crop: Image.Image
    summary: dict[str, Any]
    downloads: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PixelMask:
    """A mask at the image's full size with what is read off it, and its files for download."""

    grid: NDArray[np.float64]
    pixels: NDArray[np.float32]
    peak: tuple[int, int]
    box: tuple[int, int, int, int]
    attended_fraction: float
    downloads: list[str]


@dataclass(frozen=True)
class LoopSettings:
    """What the loop panel asks for: which target, how to reach it, the strategy and the annotator."""

    target: str = TARGET_KINDS[0]
    base_url: str = ""
    model_name: str = ""
    api_key: str = ""
    strategy: str = "verify"
    max_rounds: int = 1
    annotator: str = ANNOTATORS[0]


class UiEngine:
    """Everything the page does, without Gradio: load checked uploads, attribute with caches, render,
    write the mask files and run the loop. One engine serves every visitor; it is thread-safe.

    Args:
        max_upload_bytes: uploads larger than this are refused with a message.
        max_pixels: images with more pixels are refused from their header, before decoding.
        device: the torch device for the auxiliary models (``None``: the best available).
        output_dir: where the mask downloads are written (the newest ``KEPT_DOWNLOADS`` pairs are kept);
            ``None``: a temporary folder removed with the engine.

    Example:
        >>> engine = UiEngine()  # doctest: +SKIP
        >>> view = engine.attend(scene.image, "where is the red circle?", MapSettings())  # doctest: +SKIP
        >>> view.summary["peak"], view.summary["image_passes"]  # doctest: +SKIP
        ({'x': 60, 'y': 42, 'value': 1.0}, 1)
    """

    def __init__(
        self,
        *,
        max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1e6),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str | None = None,
        output_dir: Path | None = None,
    ) -> None:
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.device = device
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if output_dir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="api-prompt-ui-")
            output_dir = Path(self._own_dir.name)
        self.output_dir = output_dir
        self.examples = example_scenes()
        self._truth = {image_key(example.scene.image): example for example in self.examples}
        self._maps: OrderedDict[MapKey, AttributionMap] = OrderedDict()
        self._masks: OrderedDict[tuple[MapKey, str, float, int], PixelMask] = OrderedDict()
        self._downloads: deque[Path] = deque()
        self._hooked: set[int] = set()
        self._demo_target: ChatTransformersVLM | None = None
        self._lock = threading.Lock()
        self._target_lock = threading.Lock()
        self.image_passes = 0
        self.attributions = 0

    # -- inputs --------------------------------------------------------------------------------

    def load_upload(self, payload: Any) -> Image.Image:
        """The RGB image of an upload: a Gradio file payload (``path`` or a ``data:`` ``url``), a path, or a
        PIL image; refused with ``ImageLoadError`` when missing, too large, too many pixels or not an image.
        """
        if payload is None:
            raise ImageLoadError("no image yet: upload or paste one, or pick an example below")
        if isinstance(payload, Image.Image):
            return load_image(payload, max_pixels=self.max_pixels)
        if isinstance(payload, dict):
            path, url = payload.get("path"), payload.get("url")
            name = payload.get("orig_name") or "the upload"
            if path:
                source: str | Path = Path(path)
                size = Path(path).stat().st_size
            elif isinstance(url, str) and url.startswith("data:"):
                source, size = url, len(url) * 3 // 4
            else:
                raise ImageLoadError("the upload holds no file; upload or paste the image again")
        else:
            source, name = Path(payload), Path(payload).name
            size = source.stat().st_size
        if size > self.max_upload_bytes:
            raise ImageLoadError(
                f"{name} is {size / 1e6:.1f} MB; this page takes images up to {self.max_upload_bytes / 1e6:g} MB "
                "(api-prompt ui --max-upload-mb)"
            )
        try:
            return load_image(source, max_pixels=self.max_pixels)
        except ImageLoadError as exc:  # name the upload as its sender knows it, not by the server's copy
            message = str(exc).replace(str(source), name) if isinstance(source, Path) else str(exc)
            if isinstance(exc, ImageTooLargeError):
                message += " (this page's limit: api-prompt ui --max-pixels)"
            raise type(exc)(message) from None

    # -- models --------------------------------------------------------------------------------

    def attributor(self, model: str, layer: int | None = None) -> Attributor:
        """The shared attributor for ``model`` at ``layer`` (``None``: the model's default block); the
        model's own default attributor when ``layer`` names its default block, so both share one cache."""
        default = get_attributor(model, device=self.device)
        chosen = default if layer is None else get_attributor(model, layer=layer, device=self.device)
        if getattr(chosen, "layer", None) == getattr(default, "layer", None):
            chosen = default
        self._count_image_passes(chosen)
        return chosen

    def defaults(self, model: str) -> MapSettings:
        """The map settings the model comes with (loads the model)."""
        attributor = self.attributor(model)
        return MapSettings(
            model=model,
            layer=int(attributor.layer),  # type: ignore[attr-defined]
            combine=str(getattr(attributor, "combine", "cls")),
            enhance_coe=float(attributor.enhance_coe),  # type: ignore[attr-defined]
            kernel_size=int(attributor.kernel_size),  # type: ignore[attr-defined]
        )

    def _count_image_passes(self, attributor: Attributor) -> None:
        """Count every run of a CLIP image tower (a forward pre-hook on its visual module, once per model)."""
        visual = getattr(attributor, "visual", None)
        if visual is None:
            return
        with self._lock:
            if id(visual) in self._hooked:
                return
            self._hooked.add(id(visual))

        def counted(_module: Any, _args: Any) -> None:
            with self._lock:
                self.image_passes += 1

        visual.register_forward_pre_hook(counted)

    # -- the map panel -------------------------------------------------------------------------

    def attend(self, image: Image.Image, question: str, settings: MapSettings) -> MapView:
        """Attribute (or reuse the cached map), post-process, upsample, render and summarise."""
        question = question.strip()
        if not question:
            raise InvalidParameterError("type a question about the image first")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        attributor = self.attributor(settings.model, settings.layer)
        timings["model"] = time.perf_counter() - start
        key, amap, map_cached, image_pass_ran = self._map(attributor, settings.model, image, question, timings)
        notes = []
        combine = settings.combine
        if amap.comp is None and combine != "cls":
            notes.append(f"{attributor.name} maps have no Ψ_comp, so combine={combine!r} fell back to 'cls'")
            combine = "cls"
        mask = self._mask(key, amap, combine, settings, timings)
        prompted, heatmap, crop = self._render(image, amap, mask, settings, timings)
        col, row = mask.peak
        timings["total"] = time.perf_counter() - start
        summary: dict[str, Any] = {
            "model": settings.model,
            "backend": attributor.name,
            "layer": key[1],
            "combine": combine,
            "enhance_coe": settings.enhance_coe,
            "kernel_size": settings.kernel_size,
            "style": settings.style,
            "gray_level": settings.gray_level,
            "question": question,
            "image_size": list(image.size),
            "grid": list(amap.grid_shape),
            "peak": {"x": col, "y": row, "value": round(float(mask.pixels[row, col]), 6)},
            "box": list(mask.box),
            "attended_fraction": round(mask.attended_fraction, 6),
            "map_cached": map_cached,
            "image_pass_ran": image_pass_ran,
            "image_passes": self.image_passes,
            "attributions": self.attributions,
            "timings": {stage: round(seconds, 6) for stage, seconds in timings.items()},
        }
        if "answer" in amap.metadata:
            summary["answer"] = amap.metadata["answer"]
        summary |= self._ground_truth(key[2], col, row)
        return MapView(prompted, heatmap, crop, summary, mask.downloads, notes)

    def _map(
        self, attributor: Attributor, model: str, image: Image.Image, question: str, timings: dict[str, float]
    ) -> tuple[MapKey, AttributionMap, bool, bool]:
        """The map for the question with its cache key (model, layer, image content, question), whether it
        came from the cache, and whether an image pass ran for it."""
        start = time.perf_counter()
        key = (model, int(getattr(attributor, "layer", 0)), image_key(image), question)
        timings["hash"] = time.perf_counter() - start
        with self._lock:
            cached = self._maps.get(key)
            if cached is not None:
                self._maps.move_to_end(key)
            passes_before = self.image_passes
        if cached is not None:
            return key, cached, True, False
        image_features = getattr(attributor, "image_features", None)
        if image_features is not None:  # CLIP: the image pass (or its cache), then the text pass
            start = time.perf_counter()
            image_features(image)
            stage = "image pass" if self.image_passes > passes_before else "image pass (cached)"
            timings[stage] = time.perf_counter() - start
        start = time.perf_counter()
        amap = attributor.attribute(image, question)
        timings["text pass + map" if image_features is not None else "attribute"] = time.perf_counter() - start
        with self._lock:
            self.attributions += 1
            if image_features is None:  # an LVLM runs its whole model, image included, for every map
                self.image_passes += 1
            ran = self.image_passes > passes_before
            self._maps[key] = amap
            while len(self._maps) > MAP_CACHE_SIZE:
                self._maps.popitem(last=False)
        return key, amap, False, ran

    def _mask(
        self, map_key: MapKey, amap: AttributionMap, combine: str, settings: MapSettings, timings: dict[str, float]
    ) -> PixelMask:
        """The mask for these post-processing settings at full size, read and written to files (cached)."""
        key = (map_key, combine, settings.enhance_coe, settings.kernel_size)
        with self._lock:
            cached = self._masks.get(key)
        if cached is not None:
            return cached
        start = time.perf_counter()
        grid_mask = combine_maps(
            amap.raw,
            amap.comp,
            combine=combine,  # type: ignore[arg-type]
            enhance_coe=settings.enhance_coe,
            kernel_size=settings.kernel_size,
        )
        timings["mask"] = time.perf_counter() - start
        start = time.perf_counter()
        pixels = dataclasses.replace(amap, mask=grid_mask).upsample()
        timings["upsample"] = time.perf_counter() - start
        start = time.perf_counter()
        row, col = np.unravel_index(int(np.argmax(pixels)), pixels.shape)
        attended = pixels >= BOX_THRESHOLD
        box = attention_box(pixels, threshold=BOX_THRESHOLD, margin=0.0)
        downloads = self._write_mask(pixels, amap.query)
        timings["mask files"] = time.perf_counter() - start
        mask = PixelMask(grid_mask, pixels, (int(col), int(row)), box, float(attended.mean()), downloads)
        with self._lock:
            self._masks[key] = mask
            while len(self._masks) > MASK_CACHE_SIZE:
                self._masks.popitem(last=False)
        return mask

    def _render(
        self,
        image: Image.Image,
        amap: AttributionMap,
        mask: PixelMask,
        settings: MapSettings,
        timings: dict[str, float],
    ) -> tuple[Image.Image, Image.Image, Image.Image]:
        """The prompted image (in the chosen style), the heatmap with the box and peak drawn, and the crop,
        each at most ``DISPLAY_MAX_SIDE`` pixels on its longest side."""
        start = time.perf_counter()
        scale = min(1.0, DISPLAY_MAX_SIDE / max(image.size))
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            shown = image.resize(size, Image.Resampling.LANCZOS)
            shown_mask = dataclasses.replace(amap, mask=mask.grid).upsample(size=size)
        else:
            shown, shown_mask = image, mask.pixels
        crop = _thumbnail(render(image, mask.pixels, "crop"))
        prompted = crop if settings.style == "crop" else render(shown, shown_mask, settings.style, settings.gray_level)
        heatmap = render(shown, shown_mask, "heatmap")
        _mark(heatmap, [round(v * scale) for v in mask.box], (round(mask.peak[0] * scale), round(mask.peak[1] * scale)))
        timings["render"] = time.perf_counter() - start
        return prompted, heatmap, crop

    def _ground_truth(self, image_hash: str, x: int, y: int) -> dict[str, Any]:
        """For a demo scene (known by its content hash): the objects under the peak and whether it lands on
        the queried object."""
        example = self._truth.get(image_hash)
        if example is None:
            return {}
        under = [name_of(obj) for obj in example.scene.objects if _inside(obj.box, x, y)]
        return {
            "peak_on": under or ["background"],
            "queried_object": {"name": name_of(example.queried), "box": list(example.queried.box)},
            "peak_in_queried_box": _inside(example.queried.box, x, y),
        }

    def _write_mask(self, mask: NDArray[np.float32], question: str) -> list[str]:
        """The mask as an 8-bit PNG and a float32 ``.npy`` at the image's full size; older files are removed."""
        stem = "".join(c if c.isalnum() else "_" for c in question.lower())[:40].strip("_") or "mask"
        folder = Path(tempfile.mkdtemp(dir=self.output_dir))
        png, npy = folder / f"mask_{stem}.png", folder / f"mask_{stem}.npy"
        Image.fromarray(np.rint(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L").save(png)
        np.save(npy, mask.astype(np.float32, copy=False))
        with self._lock:
            self._downloads.append(folder)
            stale = [self._downloads.popleft() for _ in range(max(0, len(self._downloads) - KEPT_DOWNLOADS))]
        for old in stale:
            for path in old.iterdir():
                path.unlink(missing_ok=True)
            old.rmdir()
        return [str(png), str(npy)]

    # -- the loop panel ------------------------------------------------------------------------

    def target(self, loop: LoopSettings) -> BaseChatModel:
        """The chat model the loop asks: the demo assistant (loaded once), an OpenAI-compatible server or
        Ollama."""
        if loop.target == "demo assistant":
            with self._target_lock:
                if self._demo_target is None:
                    self._demo_target = ChatTransformersVLM.from_pretrained("demo", max_tokens=32)
                return self._demo_target
        if not loop.model_name.strip():
            raise InvalidParameterError(f"name the {loop.target} model to ask (e.g. gpt-4o-mini, llava)")
        base_url = loop.base_url.strip() or None
        if loop.target == "OpenAI-compatible":
            try:
                from langchain_openai import ChatOpenAI
            except ImportError:
                raise InvalidParameterError("OpenAI-compatible targets need: pip install langchain-openai") from None
            key = loop.api_key.strip() or os.environ.get("OPENAI_API_KEY") or "not-needed"
            return ChatOpenAI(model=loop.model_name.strip(), base_url=base_url, api_key=key, timeout=120, max_retries=1)  # type: ignore[call-arg]
        if loop.target == "Ollama":
            try:
                from langchain_ollama import ChatOllama
            except ImportError:
                raise InvalidParameterError("Ollama targets need: pip install langchain-ollama") from None
            return ChatOllama(model=loop.model_name.strip(), base_url=base_url)
        raise InvalidParameterError(f"target must be one of {TARGET_KINDS}, got {loop.target!r}")

    def reflect(self, image: Image.Image, question: str, settings: MapSettings, loop: LoopSettings) -> ReflectionResult:
        """Run the self-reflection loop on ``image`` with the chosen target, strategy and annotator."""
        if not question.strip():
            raise InvalidParameterError("type a question about the image first")
        target = self.target(loop)
        if loop.annotator == ANNOTATORS[1]:
            tool = default_tool(target, self_attribution=True)
        else:
            tool = AttentionPromptTool(
                attributor=self._loop_attributor(settings), style=settings.style, gray_level=settings.gray_level
            )
        return reflect(
            question.strip(),
            image,
            target,
            tool,
            strategy=loop.strategy,
            max_rounds=loop.max_rounds,
            image_max_side=TARGET_IMAGE_MAX_SIDE,
        )

    def _loop_attributor(self, settings: MapSettings) -> Attributor:
        """The map panel's model with its post-processing settings, as an attributor of its own."""
        base = self.attributor(settings.model, settings.layer)
        options: dict[str, Any] = {"enhance_coe": settings.enhance_coe, "kernel_size": settings.kernel_size}
        if hasattr(base, "combine"):
            options["combine"] = settings.combine
        chosen = get_attributor(settings.model, layer=getattr(base, "layer", None), device=self.device, **options)
        self._count_image_passes(chosen)
        return chosen


def _inside(box: Sequence[int], x: int, y: int) -> bool:
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def _thumbnail(image: Image.Image) -> Image.Image:
    """``image`` shrunk to at most ``DISPLAY_MAX_SIDE`` on its longest side (unchanged if smaller)."""
    if max(image.size) <= DISPLAY_MAX_SIDE:
        return image
    shown = image.copy()
    shown.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
    return shown


def _mark(image: Image.Image, box: Sequence[int], peak: tuple[int, int]) -> None:
    """Draw the attended box (white over black) and a cross at the peak onto ``image``, in place."""
    draw = ImageDraw.Draw(image)
    width = max(1, round(max(image.size) / 300))
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=(0, 0, 0), width=width + 2)
    draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=(255, 255, 255), width=width)
    x, y = peak
    arm = max(4, round(max(image.size) / 40))
    for colour, thickness in (((0, 0, 0), width + 2), ((255, 255, 255), width)):
        draw.line((x - arm, y, x + arm, y), fill=colour, width=thickness)
        draw.line((x, y - arm, x, y + arm), fill=colour, width=thickness)


# ----------------------------------------------------------------------------------------------
# Text for the page.
# ----------------------------------------------------------------------------------------------


def summary_markdown(summary: dict[str, Any], notes: Sequence[str] = ()) -> str:
    """The human-readable form of a map summary: peak, box, cache use, timings."""
    peak, box = summary["peak"], summary["box"]
    width, height = summary["image_size"]
    lines = [
        f"**Peak** at x={peak['x']}, y={peak['y']} (value {peak['value']:.2f}) of a {width}×{height} image"
        + (f", on the **{' / '.join(summary['peak_on'])}**" if "peak_on" in summary else ""),
        f"**Attended box** (mask ≥ {BOX_THRESHOLD}) x0={box[0]}, y0={box[1]}, x1={box[2]}, y1={box[3]}: "
        f"{summary['attended_fraction']:.1%} of the image",
    ]
    if "queried_object" in summary:
        truth = summary["queried_object"]
        verdict = "hits" if summary["peak_in_queried_box"] else "**misses**"
        lines.append(f"**Ground truth**: the {truth['name']} lies in {tuple(truth['box'])}; the peak {verdict} it")
    if "answer" in summary:
        lines.append(f"**The auxiliary model's answer**: {summary['answer']}")
    source = (
        "cached map (no model work)"
        if summary["map_cached"]
        else ("image pass ran" if summary["image_pass_ran"] else "cached image pass, new text pass")
    )
    lines.append(
        f"**Work**: {source}; {summary['model']} ({summary['backend']}), layer {summary['layer']}, "
        f"grid {summary['grid'][0]}×{summary['grid'][1]}, combine {summary['combine']}, "
        f"enhance_coe {summary['enhance_coe']:g}, kernel {summary['kernel_size']}; "
        f"image passes so far: {summary['image_passes']}"
    )
    stages = ", ".join(f"{stage} {seconds * 1000:.1f} ms" for stage, seconds in summary["timings"].items())
    lines.append(f"**Timings**: {stages}")
    lines += [f"*Note*: {note}" for note in notes]
    return "\n\n".join(lines)


def trace_markdown(result: ReflectionResult) -> str:
    """The loop's trace, round by round."""
    lines = [
        f"**Question**: {result.question}",
        f"**Round 0** (the original image): first answer *{result.first_answer}*",
    ]
    for entry in result.rounds:
        asked = f"the attributor was asked *{entry.query}*" if entry.query is not None else "no annotation"
        scored = f", scoring the answer *{entry.scored_answer}*" if entry.scored_answer is not None else ""
        verdict = "changed the answer" if entry.changed else "kept the answer"
        parsed = "" if entry.parsed else " (no clear answer in the reply: the previous one was kept)"
        lines.append(
            f"**Round {entry.index}** ({entry.strategy}): {asked}{scored}; prompt: `{_one_line(entry.prompt)}`; "
            f"reply: *{_one_line(entry.reply)}*{parsed} → answer *{entry.answer}*, {verdict} "
            f"(annotate {entry.timings.get('annotate', 0.0):.2f} s, reflect {entry.timings.get('reflect', 0.0):.2f} s)"
        )
    stages = ", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in result.timings.items())
    lines.append(f"**Final answer**: *{result.final_answer}* (changed: {result.changed}; {stages})")
    return "\n\n".join(lines)


def sent_images(image: Image.Image, result: ReflectionResult) -> list[tuple[Image.Image, str]]:
    """The images each round sent to the target, as sent (the original downscaled to
    ``TARGET_IMAGE_MAX_SIDE``), with captions: round 0 the original, then each round's images in the
    strategy's order."""
    original = load_image(image_data_uri(image, TARGET_IMAGE_MAX_SIDE))
    strategy = STRATEGIES[result.strategy]
    shown = [(original, "round 0: original")]
    for entry in result.rounds:
        for role in strategy.images:
            picture = entry.annotated_image if role in ("annotated", "crop") else original
            if picture is not None:
                shown.append((picture, f"round {entry.index}: {role}"))
    return shown


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _message(exc: BaseException) -> str:
    """A one-line message for the page; unexpected errors are also printed with their traceback."""
    if isinstance(exc, (ApiPromptingError, OSError)):
        return f"⚠️ {exc}"
    traceback.print_exception(exc, file=sys.stderr)
    return f"⚠️ internal error ({type(exc).__name__}): {exc}"


# ----------------------------------------------------------------------------------------------
# The Gradio page.
# ----------------------------------------------------------------------------------------------

INTRO = """# Attention Prompting on Image
Upload or paste an image (or pick a demo scene below), ask a question, and see where the auxiliary model \
looks: the prompted image, the heatmap (white box: the attended region, cross: the peak) and the crop. \
Sliders re-render from the cached map; only a new image, layer or model runs the image tower."""


def build_app(engine: UiEngine, model: str = DEFAULT_MODEL) -> gr.Blocks:
    """The page over ``engine``; ``model`` is the auxiliary model selected at start (loaded now)."""
    import gradio as gr

    defaults = engine.defaults(model)
    with gr.Blocks(title="Attention Prompting on Image", delete_cache=(600, 3600)) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="image (upload or paste)",
                    sources=["upload", "clipboard"],
                    type="filepath",
                    format="png",
                    height=300,
                    elem_id="input-image",
                )
                question = gr.Textbox(label="question", placeholder="where is the red circle?", elem_id="question")
                run = gr.Button("Show where the model looks", variant="primary", elem_id="run")
            with gr.Column(scale=1):
                model_box = gr.Dropdown(
                    list(dict.fromkeys((model, *MODEL_CHOICES))),
                    value=model,
                    allow_custom_value=True,
                    label="auxiliary model (a registry spec; see the families below)",
                )
                with gr.Row():
                    layer = gr.Number(
                        value=defaults.layer, precision=0, label="layer (block; negative from the end; empty: default)"
                    )
                    combine = gr.Dropdown(list(COMBINE_MODES), value=defaults.combine, label="combine")
                enhance_coe = gr.Slider(0.5, 20.0, value=defaults.enhance_coe, step=0.5, label="enhance_coe")
                kernel_size = gr.Slider(1, 9, value=defaults.kernel_size, step=2, label="kernel size")
                with gr.Row():
                    style = gr.Radio(list(STYLES), value="gray", label="style of the prompted image", elem_id="style")
                    gray_level = gr.Slider(0, 255, value=0, step=1, label="gray level")
        status = gr.Markdown(elem_id="status")
        with gr.Row(equal_height=True):
            prompted = gr.Image(label="prompted image", type="pil", format="png", elem_id="prompted-image")
            heatmap = gr.Image(label="heatmap (box, peak)", type="pil", format="png", elem_id="heatmap-image")
            crop = gr.Image(label="crop", type="pil", format="png", elem_id="crop-image")
        summary_text = gr.Markdown(elem_id="map-summary")
        with gr.Row():
            downloads = gr.File(label="mask (PNG, NumPy .npy)", file_count="multiple", elem_id="downloads")
            summary_json = gr.JSON(label="summary (JSON)", elem_id="summary-json")
        gr.Examples(
            examples=[[example.scene.image, example.question] for example in engine.examples],
            inputs=[image, question],
            example_labels=[example.label for example in engine.examples],
            label="demo scenes (the last two: the demo CLIP's map misses the object)",
            elem_id="examples",
        )
        with gr.Accordion("Self-reflection loop: ask a target with the prompted image", open=True):
            with gr.Row():
                target = gr.Radio(list(TARGET_KINDS), value=TARGET_KINDS[0], label="target")
                strategy = gr.Dropdown(
                    [(f"{name}: {s.when_to_use}", name) for name, s in STRATEGIES.items()],
                    value="verify",
                    label="strategy",
                )
                rounds = gr.Slider(1, 3, value=1, step=1, label="most rounds")
                annotator = gr.Radio(list(ANNOTATORS), value=ANNOTATORS[0], label="annotated by")
            with gr.Row():
                base_url = gr.Textbox(
                    label="base URL (OpenAI-compatible or Ollama; empty: the default)",
                    placeholder="http://localhost:8000/v1 or http://localhost:11434",
                )
                target_model = gr.Textbox(label="model name", placeholder="gpt-4o-mini, llava, ...")
                api_key = gr.Textbox(label="API key (if the server needs one)", type="password")
            ask = gr.Button("Ask the target", elem_id="ask")
            loop_status = gr.Markdown()
            trace = gr.Markdown(elem_id="trace")
            sent = gr.Gallery(
                label="images sent to the target, round by round",
                columns=4,
                height=240,
                format="png",
                interactive=False,
                elem_id="sent-images",
            )
        with gr.Accordion("Model families the registry knows", open=False):
            gr.Markdown(f"```\n{table()}```")

        map_inputs = [image, question, model_box, layer, combine, enhance_coe, kernel_size, style, gray_level]
        map_outputs = [prompted, heatmap, crop, summary_text, summary_json, downloads, status]

        def attend(*values: Any) -> tuple[Any, ...]:
            payload, text = values[0], values[1]
            try:
                loaded = engine.load_upload(payload)
                view = engine.attend(loaded, str(text or ""), _settings(values[2:]))
            except Exception as exc:  # the page's edge: every failure becomes a message
                return (None, None, None, "", None, None, _message(exc))
            notes = summary_markdown(view.summary, view.notes)
            return (view.prompted, view.heatmap, view.crop, notes, view.summary, view.downloads, "")

        def model_defaults(spec: str) -> tuple[Any, ...]:
            try:
                loaded = engine.defaults(str(spec).strip())
            except Exception as exc:
                return (gr.update(), gr.update(), gr.update(), gr.update(), _message(exc))
            return (loaded.layer, loaded.combine, loaded.enhance_coe, loaded.kernel_size, f"loaded {spec}")

        def ask_target(*values: Any) -> tuple[Any, ...]:
            try:
                loaded = engine.load_upload(values[0])
                target_kind, url, name, key, strategy_name, most_rounds, annotated_by = values[9:]
                loop = LoopSettings(
                    target=str(target_kind),
                    base_url=str(url or ""),
                    model_name=str(name or ""),
                    api_key=str(key or ""),
                    strategy=str(strategy_name),
                    max_rounds=int(most_rounds),
                    annotator=str(annotated_by),
                )
                result = engine.reflect(loaded, str(values[1] or ""), _settings(values[2:9]), loop)
            except Exception as exc:
                return ("", [], _message(exc))
            return (trace_markdown(result), sent_images(loaded, result), "")

        listen: dict[str, Any] = {
            "fn": attend,
            "inputs": map_inputs,
            "outputs": map_outputs,
            "preprocess": False,  # the upload is loaded and checked here, with this page's limits
            "concurrency_id": "models",
            "trigger_mode": "always_last",
            "api_visibility": "private",
        }
        run.click(**{**listen, "api_visibility": "public"}, api_name="attend")
        question.submit(**listen)
        image.change(**listen)
        for widget in (combine, style):
            widget.input(**listen)
        layer.submit(**listen)
        layer.blur(**listen)
        for slider in (enhance_coe, kernel_size, gray_level):
            slider.release(**listen)
        model_box.input(
            model_defaults,
            [model_box],
            [layer, combine, enhance_coe, kernel_size, status],
            concurrency_id="models",
            api_visibility="private",
        ).then(**listen)
        ask.click(
            ask_target,
            [*map_inputs, target, base_url, target_model, api_key, strategy, rounds, annotator],
            [trace, sent, loop_status],
            preprocess=False,
            concurrency_id="models",
            api_name="reflect",
        )
    return app


def _settings(values: Sequence[Any]) -> MapSettings:
    """Map settings from the page's raw widget values (model, layer, combine, enhance_coe, kernel, style,
    gray level), checked."""
    model, layer, combine, enhance_coe, kernel_size, style, gray_level = values
    if style not in STYLES:
        raise InvalidParameterError(f"style must be one of {STYLES}, got {style!r}")
    if combine not in COMBINE_MODES:
        raise InvalidParameterError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    return MapSettings(
        model=str(model or DEFAULT_MODEL).strip(),
        layer=None if layer is None or layer == "" else int(layer),
        combine=str(combine),
        enhance_coe=float(enhance_coe),
        kernel_size=int(kernel_size),
        style=style,
        gray_level=int(gray_level),
    )


# ----------------------------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """``api-prompt ui``'s options."""
    parser = argparse.ArgumentParser(
        prog="api-prompt ui",
        description="A web page to see attention prompting work (Gradio).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind; 0.0.0.0 opens it to the network")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="auxiliary model selected at start (a registry spec)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (None: the best available)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="most pixels of an image")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests that run at once; the rest wait"
    )
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, help="most requests waiting")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``api-prompt ui``; serves until interrupted and returns the exit status."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.max_upload_mb <= 0 or args.max_pixels < 1 or args.concurrency < 1 or args.queue_size < 1:
        print("api-prompt ui: error: the limits must be positive", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('api-prompt ui: error: the page needs Gradio: pip install "langchain-api-prompting[ui]"', file=sys.stderr)
        return 2
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    engine = UiEngine(max_upload_bytes=int(args.max_upload_mb * 1e6), max_pixels=args.max_pixels, device=args.device)
    try:
        app = build_app(engine, args.model)
    except ApiPromptingError as exc:
        print(f"api-prompt ui: error: {exc}", file=sys.stderr)
        return 2
    app.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    print(f"api-prompt ui: serving {args.model!r} on http://{args.host}:{args.port}", flush=True)
    app.launch(
        server_name=args.host,
        server_port=args.port,
        max_file_size=int(args.max_upload_mb * 1e6),
        show_error=True,
        ssr_mode=False,
        quiet=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
