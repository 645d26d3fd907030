"""The attention-prompting tool on its own, exactly as an agent would call it.

Runs offline on the shipped demo CLIP and a generated scene by default:

    python examples/tool_alone.py
    python examples/tool_alone.py --image photo.jpg --question "what is on the table?" \
        --attributor clip:ViT-L-14-336@openai --style heatmap --out out/tool

Prints the text the model would read and the timings; writes the annotated image (what the model
sees), the mask and the original to --out.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from api_tool.demo.scenes import generate_scene
from api_tool.render import STYLES
from api_tool.tool import AttentionPromptTool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="image path (default: a generated demo scene)")
    parser.add_argument("--question", help="what to look for (default: the scene's first object)")
    parser.add_argument("--attributor", default="demo", help="'demo', 'clip:<name>@<pretrained>' or 'llava:<dir>'")
    parser.add_argument("--style", choices=STYLES, default="gray")
    parser.add_argument("--gray-level", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=768)
    parser.add_argument("--out", type=Path, default=Path("out/tool_alone"))
    args = parser.parse_args()

    if args.image:
        image_ref, question = args.image, args.question or "what is in the image?"
    else:
        scene = generate_scene(7, size=(320, 224))
        args.out.mkdir(parents=True, exist_ok=True)
        image_ref = str(args.out / "scene.png")
        scene.image.save(image_ref)
        question = args.question or f"where is the {scene.objects[0].name}?"
        print(f"scene: {scene.caption}")

    # A model may name files only inside the directories the developer allows (here: the image's own).
    tool = AttentionPromptTool(
        attributor=args.attributor,
        style=args.style,
        gray_level=args.gray_level,
        max_side=args.max_side,
        allowed_dirs=[Path(image_ref).resolve().parent],
    )
    message = tool.invoke(
        {"type": "tool_call", "id": "example", "name": tool.name, "args": {"image": image_ref, "question": question}}
    )
    if message.status == "error":
        raise SystemExit(f"tool error: {message.content}")
    text_block, image_block = message.content
    print(f"question: {question}")
    print(f"tool text: {text_block['text']}")
    print("timings (s):", {stage: round(seconds, 4) for stage, seconds in message.artifact["timings"].items()})

    args.out.mkdir(parents=True, exist_ok=True)
    annotated = Image.open(io.BytesIO(base64.b64decode(image_block["base64"])))
    annotated.save(args.out / "annotated.png")
    mask = message.artifact["mask"]
    Image.fromarray(np.rint(mask * 255).astype(np.uint8), mode="L").save(args.out / "mask.png")
    print(f"wrote {args.out / 'annotated.png'} ({annotated.size[0]}x{annotated.size[1]}) and {args.out / 'mask.png'}")


if __name__ == "__main__":
    main()
