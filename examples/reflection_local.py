"""The self-reflection loop with a local vision-language model, fully offline.

By default the target is the shipped demo LLaVA and a generated scene with one of its questions; in
self mode (the default for a LLaVA target) the same LLaVA scores its own first answer (API-LLaVA);
``--clip`` uses the demo CLIP instead (API-CLIP).

    python examples/reflection_local.py
    python examples/reflection_local.py --strategy masked --rounds 2 --clip
    python examples/reflection_local.py --model path/to/llava-dir --image photo.jpg --question "Is there a dog?"

Prints the first answer, each round and the final answer; writes the annotated images to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agents.chat_models import ChatTransformersVLM
from agents.prompts import STRATEGIES
from agents.reflection import reflect
from api_tool.demo.scenes import generate_scene, scene_questions
from api_tool.tool import AttentionPromptTool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="'demo' or a local LLaVA directory (or cached hub id)")
    parser.add_argument("--image", help="image path (default: a generated demo scene)")
    parser.add_argument("--question", help="question (default: one of the scene's questions)")
    parser.add_argument("--strategy", choices=tuple(STRATEGIES), default="verify")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clip", action="store_true", help="attribute with the demo CLIP instead of the LLaVA itself")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("out/reflection_local"))
    args = parser.parse_args()

    expected = None
    if args.image:
        image, question = args.image, args.question or "What is in the image?"
    else:
        scene = generate_scene(11, size=(288, 224))
        asked = scene_questions(scene.objects, seed=11)[0]
        image, question, expected = scene.image, args.question or asked.question, asked.answer
        print(f"scene: {scene.caption}")

    target = ChatTransformersVLM.from_pretrained(args.model, max_tokens=args.max_tokens, device=args.device)
    tool = AttentionPromptTool(attributor="demo") if args.clip else None
    result = reflect(question, image, target, tool, max_rounds=args.rounds, strategy=args.strategy)

    print(f"question: {question}" + (f"   (ground truth: {expected})" if expected else ""))
    print(f"first answer: {result.first_answer!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    for round_ in result.rounds:
        scored = f", scoring {round_.scored_answer!r}" if round_.scored_answer is not None else ""
        print(f"round {round_.index} (query {round_.query!r}{scored}): reply {round_.reply!r} -> {round_.answer!r}")
        if round_.annotated_image is not None:
            path = args.out / f"annotated_round{round_.index}.png"
            round_.annotated_image.save(path)
            print(f"  wrote {path}")
    print(f"final answer: {result.final_answer!r} (changed: {result.changed})")
    print("timings (s):", {stage: round(seconds, 3) for stage, seconds in result.timings.items()})


if __name__ == "__main__":
    main()
