"""The evaluation harness behind ``api-prompt eval``: does attention prompting help this model on this data?

It asks a target chat model (any LangChain chat model that reads images) every question of a dataset in
several modes and scores the answers (``agents.metrics``):

* ``plain``: the original image and the question;
* ``api``: the attention-prompted image alone and the question (the paper's setting);
* ``verify``, ``masked``, ``masked_hint``, ``zoom``, ``iterative``: the self-reflection loop with that strategy
  (``agents.reflection.reflect``; see ``agents.prompts``), starting from the ``plain`` answer, which is
  therefore always computed when a reflection mode is asked for.

Maps come from the ``--attributor``: the demo CLIP, any ``clip:``/``llava:`` spec, or ``self`` (the
target's own LLaVA attention: the paper's API-LLaVA with g = f; the ``api`` mode then uses the map of the
model generating its answer, the reflection modes the map of its first answer, teacher-forced).

Batching: questions go to the target in chunks of ``--batch-size`` through ``target.batch`` (concurrent
for remote models; one at a time for a local transformers model, whose calls would only compete for the
same cores); the chunk's maps are computed ahead in one ``attributor.attribute_batch`` call and shared by
the ``api`` mode and every reflection strategy.

Resumable: every answer is appended to ``OUT/results.jsonl`` (one line per (item id, mode), flushed and
synced) as soon as it comes; ``--resume`` skips the pairs already there, so an interrupted run (Ctrl-C, a
crash, an API error) continues where it stopped and nothing done is lost. A run whose target fails stops
after saving every answer it got. ``OUT/run.json`` records the target and attributor; resuming with others
is refused. One run writes to ``OUT`` at a time: a run holds an OS lock on ``OUT/eval.lock``
(:func:`lock_output`), and a second run (or a ``--resume``) on the same ``OUT`` meanwhile is refused at once,
naming the holder's pid, host and start time. The lock dies with its process, so a killed run can be resumed.

Outputs in ``OUT``: ``results.jsonl``; ``report.json`` and ``report.md`` (accuracy, exact and normalised
match, POPE per split, changes against the first answer with right->wrong and wrong->right counts, per
question type, seconds per answer); ``gallery.html``, the questions where modes disagree (original,
annotated image, every mode's answer), with inline thumbnails; ``thumbs/`` (annotated thumbnails).

Engines: ``--engine local`` (default) runs in this process; ``--engine ray [--ray-address ADDR]`` runs the
same chunks on the actors of a Ray cluster (``agents.eval_ray``: a local Ray when no address is given),
with the same results log, resume and reports. Targets: ``demo`` or a local transformers directory, or a
served model, ``openai:MODEL@BASE_URL`` / ``ollama:MODEL@HOST`` (``agents.served``: checked before the run,
retried on 429/5xx and timeouts, request and token counts in the report). ``--benchmark NAME --data PATH
[--images DIR]`` reads POPE, MME, HallusionBench, V*Bench or TextVQA in its published format and adds
its own metric to the report (``agents.benchmarks``).

Usage::

    api-prompt eval --synthetic all --n 200 --target demo --modes plain,api,verify --out eval-out
    api-prompt eval --data pope_random.jsonl --target openai:gpt-4o-mini --attributor clip:ViT-L-14-336 \\
        --modes plain,api,verify --out eval-gpt --resume
    api-prompt eval --benchmark mme --data MME_Benchmark_release_version --engine ray --ray-address auto \\
        --target openai:Qwen/Qwen2.5-VL-7B-Instruct@http://vllm-host:8000/v1 --modes plain,api --out eval-mme

The harness lives in modules by job: ``agents.eval_options`` (modes, :class:`EvalOptions`),
``agents.eval_runner`` (:func:`evaluate`, the map cache), ``agents.eval_ray`` (the Ray engine),
``agents.results_log`` (the results log and the output-folder lock), ``agents.eval_reports`` (scores,
reports, gallery), ``agents.eval_factories`` (models from specs), ``agents.served`` (served targets) and
``agents.benchmarks`` (standard benchmarks). This module is the command line; it re-exports their public
names.

Example:
    >>> from agents.datasets import synthetic_items
    >>> report = evaluate(synthetic_items("random", 20), vlm, out_dir="eval-out",
    ...                   modes=("plain", "api"))  # doctest: +SKIP
    >>> report.summary["modes"]["api"]["pope"]["random"]["f1"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from agents.benchmarks import BENCHMARKS, load_benchmark
from agents.datasets import SYNTHETIC_SETS, EvalItem, load_jsonl, synthetic_items
from agents.eval_factories import (
    LOCAL_MAX_TOKENS,
    attributor_factory,
    build_attributor,
    build_target,
    target_factory,
)
from agents.eval_options import ANNOTATING_MODES, MODES, REFLECTION_MODES, EvalOptions, run_modes
from agents.eval_ray import RayOptions, evaluate_on_ray
from agents.eval_reports import REPORT_MD, EvalReport, disagreements, summarize, write_reports
from agents.eval_runner import MapCache, describe_attributor_name, describe_target, evaluate, map_cache
from agents.results_log import LOCK_FILE, RESULTS_FILE, ResultsLog, lock_output
from api_tool.errors import ApiPromptingError, EvalRunError, InvalidParameterError
from api_tool.maps import COMBINE_MODES
from api_tool.render import STYLES

ENGINES: tuple[str, ...] = ("local", "ray")
"""Where ``api-prompt eval`` runs: in this process, or on the actors of a Ray cluster (``agents.eval_ray``)."""

__all__ = [
    "ANNOTATING_MODES",
    "LOCAL_MAX_TOKENS",
    "LOCK_FILE",
    "MODES",
    "REFLECTION_MODES",
    "RESULTS_FILE",
    "EvalOptions",
    "EvalReport",
    "MapCache",
    "RayOptions",
    "ResultsLog",
    "build_attributor",
    "build_parser",
    "build_target",
    "describe_attributor_name",
    "describe_target",
    "disagreements",
    "evaluate",
    "evaluate_on_ray",
    "lock_output",
    "main",
    "map_cache",
    "quiet_progress_bars",
    "run_modes",
    "summarize",
    "write_reports",
]


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide the progress bars of transformers and huggingface_hub (``from_pretrained``'s "Loading weights"
    or "Loading checkpoint shards", downloads) inside the block, then set each library back as it was.

    Both settings are process-wide: bars of other threads are hidden while the block runs.

    Example:
        >>> with quiet_progress_bars():  # doctest: +SKIP
        ...     target = build_target("demo")  # loads without a progress bar
    """
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    transformers_on = transformers_logging.is_progress_bar_enabled()
    hub_off = hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # huggingface_hub's bars too
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()  # huggingface_hub's bars too
        if hub_off:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``api-prompt eval``."""
    parser = argparse.ArgumentParser(
        prog="api-prompt eval",
        description="Evaluate a vision-language model with and without attention prompting (resumable).",
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data",
        type=Path,
        help="a JSONL of {image, question, answer, type?, split?, id?}; with --benchmark, the benchmark's own file "
        "or folder",
    )
    data.add_argument(
        "--synthetic", choices=SYNTHETIC_SETS, help="the shipped synthetic sets ('all': the three POPE splits)"
    )
    parser.add_argument("--n", type=int, default=None, help="first N questions (per split for --synthetic all)")
    parser.add_argument(
        "--benchmark",
        choices=BENCHMARKS,
        default=None,
        help="read --data in this benchmark's published format (agents.benchmarks) and add its own metric",
    )
    parser.add_argument("--images", type=Path, default=None, help="with --benchmark: the folder its images are in")
    parser.add_argument(
        "--target",
        default="demo",
        help="demo | <local transformers dir> | openai:MODEL[@BASE_URL] (vLLM, SGLang, LM Studio, OpenAI; the "
        "base URL also from OPENAI_BASE_URL, the key from OPENAI_API_KEY, not needed by a server of your own) | "
        "ollama:MODEL[@HOST:PORT] (the host also from OLLAMA_HOST)",
    )
    parser.add_argument(
        "--modes", default="plain,api", help=f"comma-separated, from {','.join(MODES)} (default: plain,api)"
    )
    parser.add_argument(
        "--attributor", default="demo", help="demo | clip:<open_clip model>[@<pretrained>] | llava:<dir> | self"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (results, reports, gallery)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per chunk (default 8)")
    parser.add_argument("--concurrency", type=int, default=None, help="most target calls at once")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help=f"new-token budget (local default {LOCAL_MAX_TOKENS})"
    )
    parser.add_argument("--rounds", type=int, default=1, help="most reflection rounds (default 1)")
    parser.add_argument(
        "--combine", choices=COMBINE_MODES, default=None, help="CLIP only: how Psi_cls and Psi_comp make the mask"
    )
    parser.add_argument(
        "--enhance-coe", type=float, default=None, help="sigmoid sharpness of the mask (default: the backend's)"
    )
    parser.add_argument("--style", choices=STYLES, default="gray", help="how the prompted image is drawn")
    parser.add_argument("--gray-level", type=int, default=0, help="gray of faded regions, 0..255")
    parser.add_argument("--system", default=None, help="a system prompt sent with every question")
    parser.add_argument("--device", default=None, help="device of local models (cuda, mps, cpu)")
    parser.add_argument("--gallery-limit", type=int, default=50, help="most questions in gallery.html")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (neither the run's nor model loading's)"
    )
    ray = parser.add_argument_group("Ray engine (--engine ray; needs the [ray] extra)")
    ray.add_argument(
        "--engine", choices=ENGINES, default="local", help="local: this process; ray: actors of a Ray cluster"
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster (HOST:PORT, auto, ray://HOST:10001); default: start a local Ray",
    )
    ray.add_argument("--actors", type=int, default=None, help="actor pool size (default: as many as fit)")
    ray.add_argument(
        "--gpus-per-actor", type=float, default=None, help="GPUs per actor (default: 1 on a GPU cluster, else 0)"
    )
    ray.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    return parser


def _load_items(args: argparse.Namespace) -> tuple[list[EvalItem], str]:
    if args.benchmark is not None or args.images is not None:
        if args.benchmark is None or args.data is None:
            raise InvalidParameterError("--benchmark NAME --data PATH [--images DIR] go together")
        items = load_benchmark(args.benchmark, args.data, args.images, limit=args.n)
        return items, f"{args.benchmark}:{args.data.expanduser().resolve()}"
    if args.synthetic is not None:
        return synthetic_items(args.synthetic, args.n), f"synthetic:{args.synthetic}"
    return load_jsonl(args.data, limit=args.n), str(args.data.expanduser().resolve())


def _run_cli(args: argparse.Namespace) -> EvalReport:
    """Load the items, the target and the attributor that ``args`` name, and run :func:`evaluate`."""
    if args.out.expanduser().is_dir():
        with lock_output(args.out.expanduser()):  # refuse a second writer at once, before loading any model
            pass
    modes = tuple(mode.strip() for mode in args.modes.split(",") if mode.strip())
    options = EvalOptions(
        modes=modes,
        style=args.style,
        gray_level=args.gray_level,
        system_prompt=args.system,
        rounds=args.rounds,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        progress=not args.no_progress,
        gallery_limit=args.gallery_limit,
    )
    ray_options = _ray_options(args)
    items, data_name = _load_items(args)
    needs_maps = bool(ANNOTATING_MODES.intersection(run_modes(modes)))
    settings = (("combine", args.combine), ("enhance_coe", args.enhance_coe))
    chosen = [f"{name}={value}" for name, value in settings if value is not None]
    label = f"{args.attributor} ({', '.join(chosen)})" if chosen else args.attributor
    attributor_name = label if needs_maps else None
    if ray_options is not None:
        make_attributor = (
            attributor_factory(args.attributor, device=args.device, combine=args.combine, enhance_coe=args.enhance_coe)
            if needs_maps
            else None
        )
        return evaluate_on_ray(
            items,
            target_factory(args.target, max_tokens=args.max_tokens, device=args.device),
            attributor=make_attributor,
            out_dir=args.out,
            modes=modes,
            resume=args.resume,
            options=options,
            ray_options=ray_options,
            target_name=args.target,
            attributor_name=attributor_name,
            data_name=data_name,
        )
    target = build_target(args.target, max_tokens=args.max_tokens, device=args.device)
    attributor = (
        build_attributor(args.attributor, target, args.device, args.combine, args.enhance_coe) if needs_maps else None
    )
    return evaluate(
        items,
        target,
        out_dir=args.out,
        attributor=attributor,
        modes=modes,
        resume=args.resume,
        options=options,
        target_name=args.target,
        attributor_name=attributor_name,
        data_name=data_name,
    )


def _ray_options(args: argparse.Namespace) -> RayOptions | None:
    """The Ray engine's options, or ``None`` for the local engine (which refuses the Ray-only options)."""
    if args.engine == "ray":
        return RayOptions(
            address=args.ray_address,
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor,
        )
    given = [name for name in ("ray_address", "actors", "gpus_per_actor") if getattr(args, name) is not None]
    if args.cpus_per_actor != 1.0:
        given.append("cpus_per_actor")
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InvalidParameterError(f"{flags} apply to the Ray engine; add --engine ray")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """``api-prompt eval ...``; returns the exit status (2: bad input or ``--out`` in use by another run,
    1: the run failed, 130: interrupted). ``--no-progress`` also hides the model-loading progress bars."""
    args = build_parser().parse_args(argv)
    try:
        with quiet_progress_bars() if args.no_progress else nullcontext():
            report = _run_cli(args)
    except KeyboardInterrupt:
        print(
            f"\napi-prompt eval: interrupted; answers so far are in {args.out / RESULTS_FILE}, "
            "rerun with --resume to continue",
            file=sys.stderr,
        )
        return 130
    except EvalRunError as exc:
        print(f"api-prompt eval: {exc}", file=sys.stderr)
        return 1
    except (ApiPromptingError, OSError) as exc:
        print(f"api-prompt eval: error: {exc}", file=sys.stderr)
        return 2
    print((args.out / REPORT_MD).read_text(encoding="utf-8"))
    for name, path in report.files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
