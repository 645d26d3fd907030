"""The main example: attention prompting and self-reflection on the offline demo models.

Part 1 draws a synthetic scene (seeded), asks a question about one object, writes the prompted images
(gray, as in the paper, and a heatmap), says which object the map peaks on (the scene's ground truth is
known, so a miss shows), lets the demo assistant answer, and runs the self-reflection loop (first answer
-> annotated image -> keep or revise), printing the trace.

Part 2 is the small-detail situation (V*Bench-like): a 1024-1536 px scene of small objects, which the
demo assistant sees downscaled to 224 px. An agent (``create_api_agent``) gets the question and calls
the attention tool by itself; then the ``zoom`` loop (original + the crop of the attended region, from a
tiled map) re-asks it. The item is one of the development set's (``--small-item``); the default is one
where the loop corrects a wrong first answer, picked on the development set, not a typical case: the
study in the README gives the rates with their intervals on the held-out test set.

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
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from transformers.utils import logging as transformers_logging

from agents import ChatTransformersVLM, create_api_agent, reflect
from agents.datasets import SYNTHETIC_DATA_DIR, item_image, load_jsonl
from agents.metrics import is_correct
from api_tool import AttentionPromptTool, attention_prompt, get_attributor, load_image, render
from api_tool.backends.base import Attributor
from api_tool.demo.scenes import generate_scene, name_of, with_article
from api_tool.images import encode_image

SMALL_ITEM = "small-7600000-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="which synthetic scene")
    parser.add_argument("--image", default=None, help="use this image instead of a synthetic scene")
    parser.add_argument("--question", default=None, help="default: about one object of the scene")
    parser.add_argument("--attributor", default="demo", help="'demo', 'clip:<open_clip name>@<tag>', 'llava:...'")
    parser.add_argument("--target", default="demo", help="'demo' or a local LLaVA directory")
    parser.add_argument(
        "--strategy",
        default="verify",
        help="verify (the library's default) | masked (the paper's) | masked_hint | zoom | iterative",
    )
    parser.add_argument("--small-item", default=SMALL_ITEM, help="id of a small-object development item (part 2)")
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
    if args.image is None:
        small_detail(args.small_item, attributor, target, args.out)


def small_detail(item_id: str, attributor: Attributor, target: ChatTransformersVLM, out: Path) -> None:
    """Part 2: the agent calls the tool on a small detail; the zoom loop re-asks with the crop."""
    items = {item.id: item for item in load_jsonl(SYNTHETIC_DATA_DIR / "synthetic_small_dev.jsonl")}
    if item_id not in items:
        raise SystemExit(f"--small-item {item_id!r} is not in synthetic_small_dev.jsonl")
    item = items[item_id]
    image = item_image(item)
    image.save(out / "small_original.png")
    print(f"\nsmall detail: {item.image} ({image.width}x{image.height}), {item.question!r}, truth {item.answer!r}")

    tool = AttentionPromptTool(attributor=attributor, demo_notice=False)  # the scene is the demo models' own kind
    assistant = target.model_copy(update={"max_tokens": 64})  # room for a tool call; the same weights
    agent = create_api_agent(assistant, attention_tool=tool)
    data, mime_type = encode_image(image)
    image_block = {"type": "image", "base64": data, "mime_type": mime_type}
    user = HumanMessage([{"type": "text", "text": item.question}, image_block])
    for message in agent.invoke({"messages": [user]})["messages"][1:]:
        if isinstance(message, AIMessage) and message.tool_calls:
            print(f"  agent called {message.tool_calls[0]['name']} with {message.tool_calls[0]['args']}")
        elif isinstance(message, ToolMessage):
            text = (
                message.text
                if isinstance(message.content, str)
                else next((block["text"] for block in message.content if block.get("type") == "text"), "")
            )
            print(f"  tool: {text[:160]}")
        elif isinstance(message, AIMessage):
            print(f"  agent answered {message.text!r}")

    result = reflect(item.question, image, target, tool, strategy="zoom")
    print(f"  zoom loop: first answer {result.first_answer!r}")
    for round_ in result.rounds:
        if round_.annotated_image is not None:
            path = out / f"small_zoom_round{round_.index}.png"
            round_.annotated_image.save(path)
            print(f"  round {round_.index}: crop {round_.crop_box} shown beside the original ({path})")
        print(f"  round {round_.index}: answer {round_.answer!r} (changed: {round_.changed})")
    verdict = "right" if is_correct(result.final_answer, item.answer) else "wrong"
    print(f"  final answer {result.final_answer!r}: {verdict} (truth {item.answer!r})")


if __name__ == "__main__":
    main()
