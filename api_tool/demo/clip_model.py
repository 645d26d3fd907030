"""The demo CLIP: a small open_clip ViT trained by the project on synthetic scenes, shipped as weights.

Architecture (``DEMO_CLIP_ARCHITECTURE``): a standard open_clip ``CLIP`` whose image tower is a
``VisionTransformer`` (patch 16 at 288 px, 18x18 grid, width 192, 6 blocks, CLS-token pooling,
``ln_post`` and ``proj``), so the API maths can decompose its CLS token exactly as for ViT-L-14-336;
the text tower is 3 blocks of width 128 with a 32-token context.

Tokenizer: open_clip's own CLIP BPE (shipped inside open_clip, works offline), with its ids mapped onto
a compact vocabulary: the BPE ids of every word the scene language uses (``reference_vocabulary``), plus
padding, an unknown-word id, start and end. Any text tokenizes; BPE pieces outside the kept set become
the unknown id. The end token has the largest compact id, so open_clip's argmax text pooling finds it.

Training (``training.train_clip``) has two stages: the model is trained at 224 px (14x14 grid),
then refined at 288 px with its positional embeddings resized, which lets small objects on letterboxed
non-square canvases cover whole patches.

Images: the model was trained on scenes letterboxed into the square input with the OpenAI mean colour as
padding (as ``api_tool.geometry.Letterbox`` does), normalised with OpenAI's mean and std; the model's
``visual.preprocess_cfg`` records this.

Example:
    >>> from api_tool.demo.clip_model import load_demo_clip
    >>> model, tokenize = load_demo_clip()  # doctest: +SKIP
    >>> tokenize(["where is the red circle?"]).shape  # doctest: +SKIP
    torch.Size([1, 32])
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer

from api_tool.demo.scenes import reference_vocabulary
from api_tool.errors import WeightsUnavailableError

DEMO_CLIP_DIR = Path(__file__).resolve().parent / "weights" / "clip"
"""Where the shipped demo CLIP lives: ``model.safetensors`` (fp16) and ``config.json``."""
DEMO_SIGLIP_DIR = Path(__file__).resolve().parent / "weights" / "siglip"
"""The second shipped demo, SigLIP-style (sigmoid loss, attention-pool head; ``training.train_clip --loss sigmoid
--pool attention``), in the same format; its ``config.json`` carries its own ``attribution_defaults``."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

DEMO_CLIP_ARCHITECTURE: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 288, "patch_size": 16, "width": 192, "layers": 6, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "width": 128, "heads": 2, "layers": 3, "mlp_ratio": 4.0},
}

DEMO_CLIP_RECOMMENDED: dict[str, Any] = {"layer": -1, "combine": "cls", "enhance_coe": 3.0}
"""Attribution settings that point best with this model (``ClipAttributor("demo", **DEMO_CLIP_RECOMMENDED)``).

Chosen on a development set of held-out scenes (seeds 2,000,000+, disjoint from the benchmark's):
Psi_cls alone beats the paper's merge (the inverted Psi_comp is a large-CLIP effect), the last block
points better than the paper's second-to-last on this 6-block model, and a softer sigmoid (3 instead
of the paper's 10) keeps several strong cells from saturating to ties. Measured numbers:
``benchmarks/demo_clip_quality.py``. A saved model whose ``config.json`` holds ``attribution_defaults``
(the SigLIP demo) gets those instead.
"""

PAD_ID = 0
UNK_ID = 1
SOT_ID = 2
FIRST_WORD_ID = 3


class CompactTokenizer:
    """open_clip's CLIP BPE tokenizer with ids remapped onto a small vocabulary.

    Compact ids: 0 padding, 1 unknown piece, 2 start, ``3 .. 3 + len(kept_ids) - 1`` the kept BPE
    ids in the order given, and the end token last (largest). ``kept_ids`` must not contain the BPE
    start/end ids.

    Example:
        >>> tokenize = CompactTokenizer.for_scene_language(context_length=8)
        >>> ids = tokenize(["a red circle", "a zebra"])
        >>> ids.shape, int(ids[1, 2]) == UNK_ID
        (torch.Size([2, 8]), True)
    """

    def __init__(self, kept_ids: Sequence[int], context_length: int) -> None:
        self.bpe = SimpleTokenizer(context_length=context_length)
        special = {self.bpe.sot_token_id, self.bpe.eot_token_id}
        if special & set(kept_ids) or len(set(kept_ids)) != len(kept_ids):
            raise ValueError("kept_ids must be distinct BPE ids without the start/end tokens")
        self.kept_ids = tuple(int(i) for i in kept_ids)
        self.context_length = context_length
        self.eot_id = FIRST_WORD_ID + len(self.kept_ids)
        lookup = torch.full((len(self.bpe.encoder),), UNK_ID, dtype=torch.long)
        lookup[0] = PAD_ID
        lookup[self.bpe.sot_token_id] = SOT_ID
        lookup[self.bpe.eot_token_id] = self.eot_id
        lookup[torch.tensor(self.kept_ids, dtype=torch.long)] = torch.arange(
            FIRST_WORD_ID, FIRST_WORD_ID + len(self.kept_ids)
        )
        self.lookup = lookup

    @classmethod
    def for_scene_language(cls, context_length: int = 32) -> CompactTokenizer:
        """A tokenizer keeping the BPE ids of every word in ``reference_vocabulary()`` (captions, questions and
        the reference kinds' queries)."""
        return cls(scene_token_ids(), context_length)

    @property
    def vocab_size(self) -> int:
        """Number of compact ids (the text tower's embedding rows)."""
        return self.eot_id + 1

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """``(len(texts), context_length)`` compact ids; long texts are cut and end with the end token."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        return self.lookup[self.bpe(batch)]


def scene_token_ids() -> list[int]:
    """The CLIP BPE ids of the scene language's words, sorted (the compact vocabulary)."""
    bpe = SimpleTokenizer()
    ids: set[int] = set()
    for word in reference_vocabulary():
        ids.update(bpe.encode(word))
    ids.discard(0)
    return sorted(ids)


def build_demo_clip(vocab_size: int, architecture: dict[str, Any] | None = None) -> open_clip.CLIP:
    """The demo CLIP with random weights, its ``preprocess_cfg`` set (input side, OpenAI mean/std)."""
    arch = architecture if architecture is not None else DEMO_CLIP_ARCHITECTURE
    text_cfg = {**arch["text_cfg"], "vocab_size": vocab_size}
    model = open_clip.CLIP(
        embed_dim=arch["embed_dim"],
        vision_cfg=open_clip.CLIPVisionCfg(**arch["vision_cfg"]),
        text_cfg=open_clip.CLIPTextCfg(**text_cfg),
    )
    side = arch["vision_cfg"]["image_size"]
    open_clip.set_model_preprocess_cfg(
        model,
        {
            "size": (side, side),
            "mode": "RGB",
            "mean": OPENAI_MEAN,
            "std": OPENAI_STD,
            "interpolation": "bicubic",
            "resize_mode": "longest",
            "fill_color": 0,
        },
    )
    return model


def save_demo_clip(
    model: open_clip.CLIP,
    tokenizer: CompactTokenizer,
    directory: str | Path,
    *,
    architecture: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` (fp16) and ``config.json`` (architecture, kept ids, metadata)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu", torch.float16).contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    config = {
        "architecture": architecture if architecture is not None else DEMO_CLIP_ARCHITECTURE,
        "kept_token_ids": list(tokenizer.kept_ids),
        "context_length": tokenizer.context_length,
        "preprocess": {"mean": OPENAI_MEAN, "std": OPENAI_STD, "letterbox_fill": "mean"},
        "metadata": metadata or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return out


def load_demo_clip(
    device: str | torch.device | None = None, directory: str | Path | None = None
) -> tuple[open_clip.CLIP, Callable[[Sequence[str]], torch.Tensor]]:
    """The shipped demo CLIP (float32, eval mode, on ``device``; CPU when ``None``) and its tokenizer, or the
    demo saved in ``directory`` (``DEMO_SIGLIP_DIR``: the SigLIP-style demo).

    Raises ``WeightsUnavailableError`` when the weight files are missing.

    Example:
        >>> model, tokenize = load_demo_clip()  # doctest: +SKIP
        >>> model.encode_text(tokenize(["a red circle"])).shape  # doctest: +SKIP
        torch.Size([1, 128])
    """
    from safetensors.torch import load_file

    folder = Path(directory) if directory is not None else DEMO_CLIP_DIR
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config_path.is_file():
        raise WeightsUnavailableError(
            f"the demo CLIP weights are missing from {folder} (expected {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "reinstall the package, or train them with: python -m training.train_clip --out "
            f"{folder}"
        )
    config = json.loads(config_path.read_text())
    tokenizer = CompactTokenizer(config["kept_token_ids"], config["context_length"])
    model = build_demo_clip(tokenizer.vocab_size, config["architecture"])
    state = load_file(str(weights))
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True)
    model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
    from api_tool.backends.clip import ATTRIBUTION_DEFAULTS_ATTRIBUTE

    setattr(model, ATTRIBUTION_DEFAULTS_ATTRIBUTE, dict(config.get("attribution_defaults", DEMO_CLIP_RECOMMENDED)))
    return model, tokenizer
