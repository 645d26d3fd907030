"""Does attention prompting help? Evaluate the demo LLaVA on the synthetic POPE sets, offline.

The shipped demo LLaVA answers every question plainly, then on the attention-prompted image (API, the
paper's setting), then through the reflection loop; the script prints the POPE table and where the
answers changed, and writes results.jsonl, report.md, report.json and gallery.html to --out.

    python examples/eval_demo.py                         # 20 questions per split, plain / api / verify
    python examples/eval_demo.py --n 200 --attributor self --modes plain,api,verify,masked
    python examples/eval_demo.py --resume                # continue an interrupted run

The same run from the command line: ``api-prompt eval --synthetic all --n 20 --target demo --out ...``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agents.chat_models import ChatTransformersVLM
from agents.datasets import synthetic_items
from agents.eval import EvalOptions, build_attributor, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="questions per POPE split")
    parser.add_argument("--modes", default="plain,api,verify")
    parser.add_argument("--attributor", default="demo", help="'demo' (the demo CLIP) or 'self' (the LLaVA itself)")
    parser.add_argument("--model", default="demo", help="'demo' or a local LLaVA directory")
    parser.add_argument("--out", type=Path, default=Path("out/eval_demo"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    items = synthetic_items("all", args.n)
    target = ChatTransformersVLM.from_pretrained(args.model, max_tokens=32)
    report = evaluate(
        items,
        target,
        out_dir=args.out,
        attributor=build_attributor(args.attributor, target),
        modes=tuple(args.modes.split(",")),
        resume=args.resume,
        options=EvalOptions(batch_size=16),
        target_name=args.model,
        attributor_name=args.attributor,
        data_name="synthetic:all",
    )

    print(f"{len(items)} questions, {report.run['answered']} answered now in {report.run['wall_seconds']:.1f} s\n")
    print(f"{'split':<12} {'mode':<10} {'acc':>6} {'prec':>6} {'rec':>6} {'F1':>6} {'yes%':>6}")
    for mode, entry in report.summary["modes"].items():
        for split, scores in entry["pope"].items():
            cells = [scores[key] for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
            text = " ".join(f"{100 * value:6.1f}" if value is not None else f"{'-':>6}" for value in cells)
            print(f"{split:<12} {mode:<10} {text}")
    for mode, entry in report.summary["modes"].items():
        changes = entry.get("changes")
        if changes:
            print(
                f"{mode}: changed {changes['changed']} of {changes['n']} answers against the {changes['relative_to']}"
                f" (wrong->right {changes['wrong_to_right']}, right->wrong {changes['right_to_wrong']})"
            )
    for name, path in report.files.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
