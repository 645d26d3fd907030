"""Make the README's picture: two demo scenes, the paper's gray prompt and heatmaps from both demo backends.

Run: python examples/readme_figure.py   (writes examples/readme_example.png)
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from api_tool import attention_prompt, render
from api_tool.demo.scenes import generate_scene

SCENES = ((7, (320, 224), "is there a blue square in the image?"), (11, (320, 224), "where is the blue circle?"))
TITLE_HEIGHT = 22


def panels_for(seed: int, size: tuple[int, int], question: str) -> list[tuple[str, Image.Image]]:
    scene = generate_scene(seed, size=size, n_objects=3, background="gradient")
    clip = attention_prompt(scene.image, question, "demo", style="gray")
    llava = attention_prompt(scene.image, question, "llava:demo", style="heatmap")
    return [
        (f"scene {seed}: {question}", scene.image),
        ("API-CLIP, gray (paper)", clip.image),
        ("API-CLIP, heatmap", render(scene.image, clip.mask, "heatmap")),
        ("API-LLaVA, heatmap", llava.image),
    ]


def main() -> None:
    rows = [panels_for(*scene) for scene in SCENES]
    width, height = rows[0][0][1].size
    row_height = height + TITLE_HEIGHT
    figure = Image.new("RGB", (width * len(rows[0]), row_height * len(rows)), "white")
    draw = ImageDraw.Draw(figure)
    for row_index, panels in enumerate(rows):
        for index, (title, panel) in enumerate(panels):
            figure.paste(panel, (index * width, row_index * row_height + TITLE_HEIGHT))
            draw.text((index * width + 6, row_index * row_height + 5), title, fill="black")
    out = Path(__file__).with_name("readme_example.png")
    figure.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
