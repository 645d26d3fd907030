"""The main example: attention prompting and self-reflection on the offline demo models.

It draws a synthetic scene (seeded), asks a question about one object, writes the prompted images
(gray, as in the paper, and a heatmap), says which object the map peaks on (the scene's ground truth is
known, so a miss shows), lets the demo LLaVA answer, and runs the self-reflection loop (first answer ->
annotated image -> keep or revise), printing the trace.

Run:
    make example                      # sets up .venv, then runs this script
    python examples/quickstart.py --out out --seed 3 --question "is there a red circle in the image?"
    python examples/quickstart.py --image photo.jpg --question "what is on the table?" \
        --attributor clip:ViT-L-14-336@openai   # real weights (needs them cached or a connection)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from transformers.utils import logging as transformers_logging

from agents import ChatTransformersVLM, reflect
from api_tool import AttentionPromptTool, attention_prompt, get_attributor, load_image, render
from api_tool.demo.scenes import generate_scene, name_of, with_article


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="which synthetic scene")
    parser.add_argument("--image", default=None, help="use this image instead of a synthetic scene")
    parser.add_argument("--question", default=None, help="default: about one object of the scene")
    parser.add_argument("--attributor", default="demo", help="'demo', 'clip:<open_clip name>@<tag>', 'llava:...'")
    parser.add_argument("--target", default="demo", help="'demo' or a local LLaVA directory")
    parser.add_argument("--strategy", default="verify", help="verify | masked | masked_hint | iterative")
    args = parser.parse_args()
    transformers_logging.disable_progress_bar()
    args.out.mkdir(parents=True, exist_ok=True)

    scene = None
    if args.image is not None:
        image = load_image(args.image)
        question = args.question or "what is in the image?"
    else:
        scene = generate_scene(args.seed, size=(320, 224), n_objects=3, background="gradient")
        image = scene.image
        question = args.question or f"is there {with_article(name_of(scene.objects[0]))} in the image?"
        print(f"scene {args.seed}: " + ", ".join(f"{name_of(obj)} at {obj.box}" for obj in scene.objects))
    image.save(args.out / "original.png")
    print(f"question: {question}")

    start = time.perf_counter()
    attributor = get_attributor(args.attributor)
    print(f"auxiliary model {args.attributor!r} loaded in {time.perf_counter() - start:.2f} s")
    prompted = attention_prompt(image, question, attributor, style="gray")
    prompted.image.save(args.out / "prompted_gray.png")
    render(image, prompted.mask, "heatmap").save(args.out / "prompted_heatmap.png")
    stages = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in prompted.timings.items())
    print(f"wrote {args.out / 'prompted_gray.png'} and {args.out / 'prompted_heatmap.png'} ({stages})")
    if scene is not None:
        row, col = np.unravel_index(int(np.argmax(prompted.mask)), prompted.mask.shape)
        under = [
            name_of(obj) for obj in scene.objects if obj.box[0] <= col < obj.box[2] and obj.box[1] <= row < obj.box[3]
        ]
        print(f"the map peaks at ({col}, {row}): on the {' / '.join(under) if under else 'background'}")

    target = ChatTransformersVLM.from_pretrained(args.target, max_tokens=20)
    tool = AttentionPromptTool(attributor=attributor)
    result = reflect(question, image, target, tool, strategy=args.strategy)
    print(f"first answer: {result.first_answer!r}")
    for round_ in result.rounds:
        print(f"round {round_.index} ({round_.strategy}): asked the attributor {round_.query!r}")
        print(f"  target replied {round_.reply!r} -> answer {round_.answer!r} (changed: {round_.changed})")
        if round_.annotated_image is not None:
            path = args.out / f"reflection_round{round_.index}.png"
            round_.annotated_image.save(path)
            print(f"  annotated image shown to the target: {path}")
    timings = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result.timings.items())
    print(f"final answer: {result.final_answer!r} (changed: {result.changed}; {timings})")


if __name__ == "__main__":
    main()
