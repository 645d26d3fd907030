"""``api-prompt``: the command line front of ``attention_prompt``. Thin: it parses and calls.

Usage:
    api-prompt IMAGE QUESTION -o OUT.png [--backend clip|llava] [--model demo|ViT-L-14-336|...]
               [--pretrained openai|PATH] [--layer -2] [--style gray|heatmap|crop|contour]
               [--combine paper|cls|comp|comp_inverted] [--gray-level 0] [--device cpu|cuda]

    api-prompt eval --synthetic all --target demo --modes plain,api,verify --out eval-out
               (the evaluation harness, ``agents.eval``; ``api-prompt eval --help``)

Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from api_tool.errors import ApiPromptingError
from api_tool.maps import COMBINE_MODES
from api_tool.render import STYLES


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``api-prompt``."""
    parser = argparse.ArgumentParser(
        prog="api-prompt",
        description="Attention Prompting on Image: fade what the question does not point at.",
    )
    parser.add_argument("image", help="image path (PNG, JPEG, ...)")
    parser.add_argument("question", help="the question or text query")
    parser.add_argument("-o", "--output", required=True, type=Path, help="where to write the prompted PNG")
    parser.add_argument("--backend", choices=("clip", "llava"), default="clip", help="auxiliary model family")
    parser.add_argument(
        "--model",
        default="demo",
        help="'demo' (offline, default), an open_clip name (ViT-L-14-336, ViT-B-32), local-dir:PATH or, with "
        "--backend llava, a transformers id or local directory",
    )
    parser.add_argument(
        "--pretrained", default=None, help="open_clip pretrained tag or checkpoint path (default: openai)"
    )
    parser.add_argument("--layer", type=int, default=None, help="block index; negative counts from the end")
    parser.add_argument("--style", choices=STYLES, default="gray")
    parser.add_argument("--combine", choices=COMBINE_MODES, default=None, help="how Psi_cls and Psi_comp merge")
    parser.add_argument("--gray-level", type=int, default=0, help="gray of faded regions, 0..255")
    parser.add_argument("--enhance-coe", type=float, default=None, help="sigmoid sharpening coefficient")
    parser.add_argument("--kernel-size", type=int, default=None, help="odd mean-filter size on the grid")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. ``api-prompt eval ...`` runs the evaluation harness."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["eval"]:
        from agents.eval import main as eval_main

        return eval_main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.backend == "llava" and (args.combine is not None or args.pretrained is not None):
        parser.error("--combine and --pretrained apply to the clip backend only")
    if args.pretrained is not None and (args.model == "demo" or args.model.startswith("local-dir:")):
        parser.error("--pretrained applies to open_clip model names, not to 'demo' or local-dir: models")
    try:
        return _run(args)
    except (ApiPromptingError, OSError) as exc:
        print(f"api-prompt: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from api_tool.backends.registry import get_attributor
    from api_tool.prompt import attention_prompt

    options: dict[str, object] = {"device": args.device}
    for name in ("layer", "enhance_coe", "kernel_size"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.backend == "llava":
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        spec = f"llava:{args.model}"
    else:
        spec = "demo" if args.model == "demo" else f"clip:{args.model}@{args.pretrained or 'openai'}"
        if args.model.startswith("local-dir:"):
            spec = args.model
        if args.combine is not None:
            options["combine"] = args.combine
    start = time.perf_counter()
    attributor = get_attributor(spec, **options)
    model_seconds = time.perf_counter() - start
    result = attention_prompt(args.image, args.question, attributor, args.style, gray_level=args.gray_level)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.output)
    timings = {"model": model_seconds, **result.timings}
    stages = ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in timings.items())
    print(f"wrote {args.output} ({result.image.width}x{result.image.height}, {spec}); {stages}")
    answer = result.map.metadata.get("answer")
    if answer:
        print(f"first answer: {answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
