"""One image, N questions: what does each extra question cost with ClipAttributor.attribute_many?

Both API-CLIP maps are linear in the text embedding, so the image pass runs once per image (and is
cached by content) and every question adds one text pass plus two small products. This script times
``attribute_many(image, questions[:N])`` on a fresh image for each N (the cold image pass is included
in every measurement) and prints cost(N) / cost(1); the goal is cost(16) / cost(1) <= 2. In each
repetition the N = 1 and N = k calls run back to back and the ratio is taken per repetition (median
over repetitions), so a shared machine's changing load hits both sides alike. It also times the two
parts separately (image pass; text pass of N questions) to show where the time goes. On a small
shared VM, ``--threads 1`` gives steadier numbers (two threads on two busy vCPUs were measured 2-4x
slower than one).

Random weights (open_clip's initialisation, seeded); CPU by default. Run::

    .venv/bin/python benchmarks/many_questions.py                      # ViT-B-16, N = 1 and 16
    .venv/bin/python benchmarks/many_questions.py --model ViT-L-14-336 --reps 2 --json out/many.json
    .venv/bin/python benchmarks/many_questions.py --model ViT-B-32 --counts 1 4 16 --reps 1   # quick
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import open_clip
import torch
from bench_utils import (
    QUESTIONS,
    environment,
    load_state_dict_into,
    median,
    random_clip_weights,
    structured_images,
    timed,
    write_json,
)

from api_tool.backends.clip import ClipAttributor

GOAL = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip ViT name (random weights)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 16], help="numbers of questions N")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per N (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--image-size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if max(args.counts) > len(QUESTIONS):
        parser.error(f"at most {len(QUESTIONS)} questions are available")

    model = load_state_dict_into(
        open_clip.create_model(args.model, pretrained=None), random_clip_weights(args.model, args.seed)
    )
    attributor = ClipAttributor(
        model=model,
        tokenizer=open_clip.get_tokenizer(args.model),
        model_name=args.model,
        pretrained=None,
        device=args.device,
    )
    synchronize = torch.cuda.synchronize if attributor.device.type == "cuda" else None
    images = iter(structured_images(1 + args.reps * len(args.counts) * 2, tuple(args.image_size), seed=args.seed))
    attributor.attribute_many(next(images), list(QUESTIONS[:2]))  # warm-up: lazy initialisation, allocator

    costs: dict[int, list[float]] = {count: [] for count in args.counts}
    cpu_costs: dict[int, list[float]] = {count: [] for count in args.counts}
    image_pass: list[float] = []
    text_pass: dict[int, list[float]] = {count: [] for count in args.counts}
    for _ in range(args.reps):
        for count in args.counts:
            image, questions = next(images), list(QUESTIONS[:count])
            cpu_start = time.process_time()
            costs[count].append(timed(partial(attributor.attribute_many, image, questions), synchronize))
            cpu_costs[count].append(time.process_time() - cpu_start)
        image_pass.append(timed(partial(attributor.image_features, next(images)), synchronize))
        for count in args.counts:
            text_pass[count].append(timed(partial(attributor.encode_queries, list(QUESTIONS[:count])), synchronize))

    first = args.counts[0]
    print(f"{args.model} on {attributor.device}, image {args.image_size[0]}x{args.image_size[1]}, {args.reps} reps")
    print(f"  image pass alone: {median(image_pass):.3f} s")
    print(f"  {'N':>3} {'cost s':>8} {'ratio':>6} {'CPU s':>7} {'CPU ratio':>9} {'text pass s':>11}")
    rows = []
    for count in args.counts:
        # Ratios are taken per repetition (the N=1 and N=k calls run back to back, so they see the same
        # machine load), then the median over repetitions.
        ratio = median([cost / base for cost, base in zip(costs[count], costs[first])])
        cpu_ratio = median([cost / base for cost, base in zip(cpu_costs[count], cpu_costs[first])])
        row = {
            "questions": count,
            "cost_s": median(costs[count]),
            "ratio_to_first": ratio,
            "cpu_s": median(cpu_costs[count]),
            "cpu_ratio_to_first": cpu_ratio,
            "text_pass_s": median(text_pass[count]),
            "all_costs_s": costs[count],
            "all_cpu_s": cpu_costs[count],
        }
        rows.append(row)
        print(
            f"  {count:>3} {row['cost_s']:>8.3f} {ratio:>6.2f} {row['cpu_s']:>7.3f} {cpu_ratio:>9.2f} "
            f"{row['text_pass_s']:>11.3f}"
        )
    result: dict[str, object] = {
        "environment": environment(),
        "model": args.model,
        "device": str(attributor.device),
        "image_size": list(args.image_size),
        "image_pass_s": median(image_pass),
        "rows": rows,
    }
    if first == 1 and 16 in args.counts:
        ratio = next(row["ratio_to_first"] for row in rows if row["questions"] == 16)
        result["ratio_16_to_1"] = ratio
        result["goal_met"] = ratio <= GOAL
        print(f"  cost(16)/cost(1) = {ratio:.2f} (goal <= {GOAL}: {'met' if ratio <= GOAL else 'missed'})")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
