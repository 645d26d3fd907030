"""``api-prompt``: the command line front of ``attention_prompt``. Thin: it parses, loads the model once
and writes what the library returns.

Usage:
    api-prompt IMAGE QUESTION -o OUT.png                 one image, one question, one PNG
    api-prompt IMAGE... QUESTION -o OUT_DIR              several images (paths, folders or globs)
    api-prompt IMAGE... -q QUESTION [-q QUESTION ...] -o OUT_DIR [--json]
               [--backend clip|llava] [--model demo|ViT-L-14-336|...] [--pretrained openai|PATH]
               [--layer -2] [--style gray|heatmap|crop|contour|zoom] [--combine paper|cls|comp|comp_inverted]
               [--tiles auto|N|none] [--zoom-size 336]
               [--gray-level 0] [--device cpu|cuda] [--allow-remote] [--overwrite]

With a demo model (the default), one stderr line says once what the demo was trained on and how to use a
real model (``api_tool.demo_notice``).

    api-prompt eval --synthetic all --target demo --modes plain,api,verify --out eval-out
               (the evaluation harness in ``agents``, found through the ``api_prompt.commands`` entry point)
    api-prompt models                                    the model-family table

One process and one model load serve every image and question; each image is encoded once for all
its questions. Beside every prompted image goes a JSON summary (where the map peaks in pixels, the
attended box, the timings); ``--json`` prints them all. Exit status: 0 when every map was written,
2 when some input was bad (one line each on stderr; the rest is still done), 1 on an internal error.
Only this module's own light imports run before the arguments are parsed, so ``--help`` and usage
errors answer at once; torch and the model load only when there is work.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from api_tool.demo_notice import DEMO_NOTICE, first_notice, is_demo_model, is_user_image
from api_tool.errors import ApiPromptingError, OutputPathError, RemoteImageNotAllowedError
from api_tool.families import backend_names, table
from api_tool.maps import COMBINE_MODES
from api_tool.render import STYLES
from api_tool.summary import map_summary

if TYPE_CHECKING:
    from api_tool.prompt import PromptedImage
    from api_tool.tiling import Tiles

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
OUTPUT_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
COMMANDS_GROUP = "api_prompt.commands"
"""Entry-point group of sub-commands other packages add (``agents`` adds ``eval``)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``api-prompt``."""
    parser = argparse.ArgumentParser(
        prog="api-prompt",
        description="Attention Prompting on Image: fade what the question does not point at. "
        "'api-prompt eval --help' describes the evaluation harness.",
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE... QUESTION",
        help="image paths, folders, globs or http(s) URLs, then the question (unless -q gives the questions)",
    )
    parser.add_argument(
        "-q",
        "--question",
        action="append",
        dest="questions",
        metavar="QUESTION",
        help="a question to ask of every image (repeat for several); then every positional is an image",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="the prompted image's path for one image and one question (.png, .jpg, .webp; no suffix: PNG), "
        "else a folder (created) that receives IMAGE_STEM[_qN].png and a .json summary beside each",
    )
    parser.add_argument("--json", action="store_true", help="print every map's summary as one JSON document")
    parser.add_argument("--overwrite", action="store_true", help="allow writing over an input image")
    parser.add_argument("--allow-remote", action="store_true", help="let IMAGE be an http(s) URL and download it")
    parser.add_argument(
        "--backend",
        choices=backend_names(),
        default="clip",
        help="clip (an open_clip model), lvlm (an LVLM's own attention; the family is detected, see "
        "'api-prompt models') or llava (LLaVA-1.5 only)",
    )
    parser.add_argument(
        "--model",
        default="demo",
        help="'demo' (offline, default), an open_clip name (ViT-L-14-336, ViT-B-16-SigLIP2), local-dir:PATH, "
        "hf:ID_OR_DIR (a transformers CLIP / SigLIP / SigLIP2) or, with "
        "--backend lvlm / llava, a transformers id or local directory ('demo': the demo LLaVA)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="open_clip pretrained tag or checkpoint path (default: openai, else the model's first published tag)",
    )
    parser.add_argument("--layer", type=int, default=None, help="block index; negative counts from the end")
    parser.add_argument("--style", choices=STYLES, default="gray", help="zoom: the attended region enlarged")
    parser.add_argument(
        "--tiles",
        type=parse_tiles,
        default=None,
        help="tiled maps for large images: auto (when the image is >= 3x the model input), N tiles along the "
        "longer side, or none (default)",
    )
    parser.add_argument("--zoom-size", type=int, default=336, help="side of the zoom crop (the target's input)")
    parser.add_argument("--combine", choices=COMBINE_MODES, default=None, help="how Psi_cls and Psi_comp merge")
    parser.add_argument("--gray-level", type=int, default=0, help="gray of faded regions, 0..255")
    parser.add_argument("--enhance-coe", type=float, default=None, help="sigmoid sharpening coefficient")
    parser.add_argument("--kernel-size", type=int, default=None, help="odd mean-filter size on the grid")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    return parser


@dataclass
class Job:
    """One image with the questions to ask of it and where each prompted image goes."""

    image: str
    outputs: list[Path]


@dataclass
class Report:
    """What a run did: one summary per written map, one line per bad input."""

    summaries: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def refuse(self, message: str) -> None:
        """Record a bad input and print its one line."""
        self.errors.append(message)
        print(f"api-prompt: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. ``api-prompt eval ...`` runs the evaluation harness."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["models"]:
        print(table(), end="")
        return 0
    command = _sub_command(arguments[0]) if arguments else None
    if command is not None:
        return int(command(arguments[1:]))
    parser = build_parser()
    args = parser.parse_args(arguments)
    if args.backend != "clip" and (args.combine is not None or args.pretrained is not None):
        parser.error("--combine and --pretrained apply to the clip backend only")
    if args.pretrained is not None and (args.model == "demo" or args.model.startswith(("local-dir:", "hf:"))):
        parser.error("--pretrained applies to open_clip model names, not to 'demo', local-dir: or hf: models")
    if args.questions is None:
        if len(args.inputs) < 2:
            parser.error("give at least one IMAGE and then the QUESTION (or the questions with -q)")
        *image_refs, question = args.inputs
        questions = [question]
    else:
        image_refs, questions = args.inputs, args.questions
    report = Report()
    for number, question in enumerate(questions, start=1):
        if not question.strip():
            report.refuse(f"question {number}: the query is empty; ask about the image, e.g. 'where is the cat?'")
    images = expand_images(image_refs, report, allow_remote=args.allow_remote)
    try:
        jobs = plan_outputs(images, len(questions), args.output, overwrite=args.overwrite, report=report)
    except OutputPathError as exc:
        report.refuse(str(exc))
        return 2
    if jobs and any(question.strip() for question in questions):
        try:
            _run(args, jobs, questions, report)
        except (ApiPromptingError, OSError) as exc:  # the model could not be had: nothing can be done
            report.refuse(str(exc))
    if args.json:
        print(json.dumps({"maps": report.summaries, "errors": report.errors}, indent=2))
    return 2 if report.errors or not jobs else 0


def _sub_command(name: str) -> Any:
    """The ``main(argv) -> int`` another package registered as ``api-prompt NAME``, or ``None``."""
    from importlib.metadata import entry_points

    found = [entry for entry in entry_points(group=COMMANDS_GROUP) if entry.name == name]
    return found[0].load() if found else None


def expand_images(refs: Sequence[str], report: Report, *, allow_remote: bool) -> list[str]:
    """Paths, folders (their image files, sorted) and globs turned into image references, in order and
    without repeats; each reference that names nothing is reported and left out."""
    found: dict[str, None] = {}
    for ref in refs:
        if ref.startswith(("http://", "https://")):
            if allow_remote:
                found[ref] = None
            else:
                report.refuse(f"{ref[:80]!r} is a remote URL; pass --allow-remote to download it, or download it first")
            continue
        path = Path(ref).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                report.refuse(f"the folder {ref!r} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found.update((str(p), None) for p in inside)
        elif path.exists() or not glob.has_magic(ref):
            found[str(path)] = None  # a missing file is reported when it is loaded, with the loader's message
        else:
            matches = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
            if not matches:
                report.refuse(f"the pattern {ref!r} matches no file")
            found.update((match, None) for match in matches)
    return list(found)


def output_format(path: Path) -> str:
    """The Pillow format for an output path's suffix (no suffix: PNG), or ``OutputPathError``."""
    if not path.suffix:
        return "PNG"
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputPathError(
            f"-o {str(path)!r}: cannot write the image format {path.suffix!r}; "
            f"use one of {', '.join(sorted(OUTPUT_FORMATS))} (or a folder for several images or questions)"
        )
    return fmt


def plan_outputs(
    images: Sequence[str], n_questions: int, output: Path, *, overwrite: bool, report: Report
) -> list[Job]:
    """Where each map goes: ``output`` itself for one image and one question (unless it is a folder),
    else ``output/IMAGE_STEM.png`` (``IMAGE_STEM_qN.png`` for several questions) with repeated stems
    numbered. An output that would replace an input image is refused unless ``overwrite``."""
    single = len(images) == 1 and n_questions == 1 and not output.is_dir() and not str(output).endswith(("/", "\\"))
    if single:
        output_format(output)
        planned = [Job(images[0], [output])]
    else:
        if output.exists() and not output.is_dir():
            raise OutputPathError(
                f"-o {str(output)!r} is a file, but {len(images)} image(s) x {n_questions} question(s) need a folder"
            )
        planned, stems = [], set()
        for image in images:
            stem = Path(image).stem if not image.startswith(("http://", "https://")) else Path(image.split("?")[0]).stem
            stem = stem or "image"
            unique, number = stem, 2
            while unique in stems:
                unique, number = f"{stem}_{number}", number + 1
            stems.add(unique)
            names = [f"{unique}.png"] if n_questions == 1 else [f"{unique}_q{k}.png" for k in range(1, n_questions + 1)]
            planned.append(Job(image, [output / name for name in names]))
    inputs = {Path(image).resolve() for image in images if Path(image).exists()}
    jobs = []
    for job in planned:
        clash = next((path for path in job.outputs if path.resolve() in inputs), None)
        if clash is not None and not overwrite:
            report.refuse(
                f"-o would write {str(clash)!r} over an input image; choose another output or pass --overwrite"
            )
            continue
        jobs.append(job)
    return jobs


def _run(args: argparse.Namespace, jobs: Sequence[Job], questions: Sequence[str], report: Report) -> None:
    from api_tool.backends.registry import get_attributor
    from api_tool.images import load_image
    from api_tool.prompt import attention_prompt_many

    spec, options = _spec_and_options(args)
    tiles = args.tiles
    if is_demo_model(spec) and any(is_user_image(job.image) for job in jobs) and first_notice("cli"):
        print(DEMO_NOTICE, file=sys.stderr)
    start = time.perf_counter()
    attributor = get_attributor(spec, **options)
    model_seconds = time.perf_counter() - start
    print(f"model {spec} loaded in {model_seconds * 1000:.0f} ms", file=sys.stderr if args.json else sys.stdout)
    for job in jobs:
        load_start = time.perf_counter()
        try:
            image = load_image(job.image, allow_remote=args.allow_remote)
        except RemoteImageNotAllowedError:
            report.refuse(f"{job.image[:80]!r} is a remote URL; pass --allow-remote to download it")
            continue
        except (ApiPromptingError, OSError) as exc:
            report.refuse(f"{job.image}: {exc}")
            continue
        load_seconds = time.perf_counter() - load_start
        asked = [(question, output) for question, output in zip(questions, job.outputs) if question.strip()]
        try:
            results = attention_prompt_many(
                image,
                [question for question, _ in asked],
                attributor,
                args.style,
                gray_level=args.gray_level,
                tiles=tiles,
                zoom_size=args.zoom_size,
            )
        except (ApiPromptingError, OSError) as exc:
            report.refuse(f"{job.image}: {exc}")
            continue
        for (question, output), result in zip(asked, results):
            try:
                write_seconds = _write(result, output)
            except (ApiPromptingError, OSError) as exc:
                report.refuse(f"{job.image} / {question!r}: cannot write {str(output)!r}: {exc}")
                continue
            timings = {"load": load_seconds, **result.timings, "write": write_seconds}
            timings.pop("total", None)
            summary = map_summary(result, image=job.image, question=question, output=output, model=spec)
            summary["timings"] = {stage: round(seconds, 6) for stage, seconds in timings.items()}
            output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
            report.summaries.append(summary)
            if not args.json:
                _print_line(summary)


def parse_tiles(value: str) -> Tiles:
    """``--tiles``: ``auto``, ``none`` or a positive number of tiles along the longer side.

    Example:
        >>> parse_tiles("auto"), parse_tiles("none"), parse_tiles("3")
        ('auto', None, 3)
    """
    lowered = value.strip().lower()
    if lowered in ("auto", "none"):
        return "auto" if lowered == "auto" else None
    if not lowered.isdigit() or int(lowered) < 1:
        raise argparse.ArgumentTypeError(f"must be auto, none or a positive integer, got {value!r}")
    return int(lowered)


def _spec_and_options(args: argparse.Namespace) -> tuple[str, dict[str, object]]:
    options: dict[str, object] = {"device": args.device}
    for name in ("layer", "enhance_coe", "kernel_size"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.backend != "clip":
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        return f"{args.backend}:{args.model}", options
    if args.combine is not None:
        options["combine"] = args.combine
    if args.model == "demo" or args.model.startswith(("local-dir:", "hf:")):
        return args.model, options
    return f"clip:{args.model}" + (f"@{args.pretrained}" if args.pretrained else ""), options


def _write(result: PromptedImage, output: Path) -> float:
    start = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(output, format=output_format(output))
    return time.perf_counter() - start


def _print_line(summary: dict[str, Any]) -> None:
    stages = ", ".join(f"{stage} {seconds * 1000:.0f} ms" for stage, seconds in summary["timings"].items())
    width, height = summary["image_size"]
    peak = summary["peak"]
    print(f"wrote {summary['output']} ({width}x{height}); peak at x={peak['x']}, y={peak['y']}; {stages}")
    if "answer" in summary:
        print(f"first answer: {summary['answer']}")


if __name__ == "__main__":
    sys.exit(main())
