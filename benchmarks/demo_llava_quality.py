"""How good is the demo LLaVA, and does its own attention point at the queried object?

Measured on held-out synthetic scenes (``generate_scene`` with seeds from ``--seed-base``, a stream the
training never draws), images prepared exactly as ``LlavaAttributor`` prepares them (letterboxed onto
the model's square input with the processor's mean colour; the processor neither resizes nor crops):

1. Accuracy per question type: every question ``scene_questions`` makes (existence yes/no for each
   POPE split -- random, popular, adversarial --, colour, shape, count, relative position) plus the
   ``location`` question the model is also trained on ("where is the red circle?" -> "top left").
   An answer counts when greedy decoding gives exactly the reference and then stops. This is scored
   in one batched forward pass per scene by teacher forcing: greedy decoding reproduces the
   reference and ``</s>`` exactly when each of those tokens is the argmax after the reference's own
   prefix. (The generation path is also run on the pointing queries below and reported.)
2. The pointing game of ``LlavaAttributor``'s map, for each decoder layer: scenes with 2-5 objects,
   square and non-square; one object per scene whose colour-shape name is unique, asked about with
   "is there a <name> in the image?" and with "where is the <name>?". The attributor of the first
   layer answers greedily (generation path); the other layers score that same answer by teacher
   forcing, which the backend guarantees equals the generation path for the model's own answer.
   * pointing: the argmax of the pixel-size mask (``AttributionMap.upsample()``) lies in the object's
     box;
   * energy: the share of the mask's sum inside the box;
   * baseline: box area / image area (what a random point or a uniform mask scores).

3. The assistant (``--assistant-scenes N``, 0 skips it), through ``ChatTransformersVLM`` exactly as
   the agent and the loop call it: on ``SMALL_OBJECT_CONFIG`` scenes (1024-1536 px canvases, small
   objects), colour and shape questions asked plain and as the ``zoom`` strategy asks them (original
   plus a crop around the asked-about object, its box grown 2.4x); and, with the attention tool bound
   and the agent's system prompt, the share of detail questions answered by a tool call and of
   whole-scene questions ("describe the image.", "how many objects are there in all?") answered
   directly.

Usage:
    python benchmarks/demo_llava_quality.py [--scenes 200] [--pointing-scenes 75] [--weights DIR] [--json out.json]

About 30 minutes on 2 busy CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from PIL import Image

from agents.agent import api_system_prompt
from agents.chat_models import ChatTransformersVLM
from agents.prompts import IMAGE_LABELS
from agents.reflection import normalize_answer
from api_tool.backends.llava import LlavaAttributor
from api_tool.backends.lvlm import answer_token_ids, prompt_text
from api_tool.demo.scenes import (
    SMALL_OBJECT_CONFIG,
    WHOLE_SCENE_TYPES,
    Question,
    Scene,
    SceneObject,
    generate_scene,
    make_question,
    name_of,
    scene_questions,
    whole_scene_question,
)
from api_tool.demo.tiny_llava import DEMO_LLAVA_DIR, load_tiny_llava
from api_tool.geometry import Letterbox
from api_tool.images import encode_image
from api_tool.tool import TOOL_NAME, AttentionPromptTool
from training.llava_questions import LOCATION_TEMPLATE, TYPE_NAMES, location_answer

NON_SQUARE_SIZES: tuple[tuple[int, int], ...] = ((320, 224), (224, 320), (384, 224), (256, 384), (352, 256))
QUERY_KINDS: dict[str, str] = {"existence": "is there {a} {x} in the image?", "location": LOCATION_TEMPLATE}


def scene_location_question(scene: Scene, rng: random.Random) -> Question | None:
    """The training's location question for a scene from ``generate_scene`` (pixel coordinates)."""
    names = [obj.name for obj in scene.objects]
    width, height = scene.size
    candidates = []
    for obj in scene.objects:
        answer = location_answer(obj.center[0] / width, obj.center[1] / height)
        if names.count(obj.name) == 1 and answer is not None:
            candidates.append(Question(LOCATION_TEMPLATE.format(x=obj.name), answer, "location", None, (obj.name,)))
    return rng.choice(candidates) if candidates else None


def letterboxed(image: Image.Image, side: int, processor: object) -> Image.Image:
    """The image as ``LlavaAttributor`` feeds it to the processor."""
    mean = processor.image_processor.image_mean  # type: ignore[attr-defined]
    fill = tuple(round(255 * float(m)) for m in mean)
    return Letterbox.fit(image.size, side).apply(image, fill)  # type: ignore[arg-type]


@torch.inference_mode()
def exact_matches(
    model: torch.nn.Module, processor: object, image: Image.Image, questions: Sequence[Question]
) -> list[bool]:
    """For each question: would greedy decoding answer exactly ``answer`` and stop? (teacher forcing)"""
    side = int(model.config.vision_config.image_size)
    boxed = letterboxed(image, side, processor)
    tokenizer = processor.tokenizer  # type: ignore[attr-defined]
    rows = []
    for question in questions:
        prompt = prompt_text(processor, question.question)
        encoded = processor(images=boxed, text=prompt, do_resize=False, do_center_crop=False)  # type: ignore[operator]
        reply = [*answer_token_ids(processor, prompt, question.question, question.answer), tokenizer.eos_token_id]
        rows.append((list(encoded["input_ids"][0]), reply))
    pixels = processor.image_processor(  # type: ignore[attr-defined]
        boxed, do_resize=False, do_center_crop=False, return_tensors="pt"
    )["pixel_values"]
    length = max(len(prompt) + len(reply) for prompt, reply in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (prompt, reply) in enumerate(rows):
        ids[row, : len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        mask[row, : len(prompt) + len(reply)] = 1
    logits = model(
        input_ids=ids, attention_mask=mask, pixel_values=pixels.expand(len(rows), -1, -1, -1).to(model.dtype)
    ).logits
    results = []
    for row, (prompt, reply) in enumerate(rows):
        predicted = logits[row, len(prompt) - 1 : len(prompt) + len(reply) - 1].argmax(dim=-1)
        results.append(bool((predicted == torch.tensor(reply)).all()))
    return results


@dataclass(frozen=True)
class AccuracyRow:
    """One question's outcome."""

    type: str
    split: str | None
    canvas: str
    answer: str
    correct: bool


def accuracy(model: torch.nn.Module, processor: object, count: int, seed_base: int) -> list[AccuracyRow]:
    """Every question of ``count`` held-out scenes (mixed canvases, 1-5 objects), scored."""
    rows = []
    for i in range(count):
        seed = seed_base + i
        scene = generate_scene(seed)
        questions = scene_questions(scene.objects, seed=seed)
        location = scene_location_question(scene, random.Random(seed))
        if location is not None:
            questions.append(location)
        canvas = "square" if scene.size[0] == scene.size[1] else "non-square"
        for question, correct in zip(questions, exact_matches(model, processor, scene.image, questions)):
            rows.append(AccuracyRow(question.type, question.split, canvas, question.answer, correct))
    return rows


def pointing_scores(mask: np.ndarray, obj: SceneObject, size: tuple[int, int]) -> tuple[bool, float, float]:
    """(argmax inside the box, share of the mask's sum inside the box, box area / image area)."""
    x0, y0, x1, y1 = obj.box
    row, col = np.unravel_index(int(np.argmax(mask)), mask.shape)
    total = float(mask.sum())
    energy = float(mask[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0
    return bool(x0 <= col < x1 and y0 <= row < y1), energy, obj.box_area / (size[0] * size[1])


def pointing_scenes(count: int, seed_base: int, square: bool) -> list[Scene]:
    """``count`` scenes with 2-5 objects, square (224x224) or cycling through ``NON_SQUARE_SIZES``."""
    scenes = []
    for i in range(count):
        seed = seed_base + i
        size = (224, 224) if square else NON_SQUARE_SIZES[i % len(NON_SQUARE_SIZES)]
        scenes.append(generate_scene(seed, size=size, n_objects=2 + random.Random(seed).randrange(4)))
    return scenes


@dataclass(frozen=True)
class PointingRow:
    """One query's map at one layer, scored (``expected`` is ``None`` for a location too close to a
    third-line to have one right answer)."""

    layer: int
    kind: str
    canvas: str
    hit: bool
    energy: float
    baseline: float
    answer: str
    expected: str | None


def pointing(
    attributors: dict[int, LlavaAttributor], scenes: Sequence[Scene], canvas: str, seed: int
) -> list[PointingRow]:
    """The pointing game on ``scenes`` for every layer's attributor and both query kinds."""
    rng = random.Random(seed)
    layers = list(attributors)
    rows = []
    for scene in scenes:
        names = [obj.name for obj in scene.objects]
        target = rng.choice([obj for obj in scene.objects if names.count(obj.name) == 1] or list(scene.objects))
        width, height = scene.size
        where = location_answer(target.center[0] / width, target.center[1] / height)
        expected = {"existence": "yes", "location": where}
        for kind, template in QUERY_KINDS.items():
            article = "an" if target.name[0] in "aeiou" else "a"
            query = template.format(a=article, x=target.name)
            first = attributors[layers[0]].attribute(scene.image, query)
            answer = str(first.metadata["answer"])
            for layer in layers:
                amap = first if layer == layers[0] else attributors[layer].attribute(scene.image, query, answer=answer)
                hit, energy, baseline = pointing_scores(amap.upsample(), target, scene.size)
                rows.append(PointingRow(layer, kind, canvas, hit, energy, baseline, answer, expected[kind]))
    return rows


def summarise_accuracy(rows: Sequence[AccuracyRow]) -> dict[str, dict[str, float]]:
    """Accuracy and counts per type, per POPE split and per canvas (existence)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        groups["all"].append(row.correct)
        groups[row.type].append(row.correct)
        if row.split:
            groups[f"existence/{row.split}"].append(row.correct)
        if row.type == "existence":
            groups[f"existence/{row.canvas}"].append(row.correct)
    return {name: {"accuracy": float(np.mean(v)), "questions": len(v)} for name, v in groups.items()}


def summarise_pointing(rows: Sequence[PointingRow]) -> list[dict[str, object]]:
    """Pointing, energy and baseline per (layer, query kind, canvas) and per (layer, all)."""
    keys: dict[tuple[int, str, str], list[PointingRow]] = defaultdict(list)
    for row in rows:
        keys[(row.layer, row.kind, row.canvas)].append(row)
        keys[(row.layer, "all", "all")].append(row)
    table = []
    for (layer, kind, canvas), group in sorted(keys.items()):
        table.append(
            {
                "layer": layer,
                "kind": kind,
                "canvas": canvas,
                "queries": len(group),
                "pointing": float(np.mean([r.hit for r in group])),
                "energy": float(np.mean([r.energy for r in group])),
                "baseline": float(np.mean([r.baseline for r in group])),
                "answered_as_expected": float(
                    np.mean([r.answer == r.expected for r in group if r.expected is not None] or [np.nan])
                ),
            }
        )
    return table


def _image_block(image: Image.Image) -> dict[str, str]:
    data, mime_type = encode_image(image, format="PNG")
    return {"type": "image", "base64": data, "mime_type": mime_type}


def object_crop(scene: Scene, obj: SceneObject, grow: float = 2.4) -> Image.Image:
    """A square crop centred on ``obj``'s box, ``grow`` times its longer side."""
    x0, y0, x1, y1 = obj.box
    half = max(x1 - x0, y1 - y0) * grow / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return scene.image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))


def assistant(chat: ChatTransformersVLM, count: int, seed_base: int) -> dict[str, dict[str, float]]:
    """Plain vs zoom accuracy on small-object scenes, and the agent's tool-call rates (see the module doc)."""
    bound = chat.bind_tools([AttentionPromptTool()])
    hits: dict[str, list[bool]] = {"plain": [], "zoom": [], "tool_call_detail": [], "tool_call_whole": []}
    for index in range(count):
        scene = generate_scene(seed_base + 700_000 + index, config=SMALL_OBJECT_CONFIG)
        rng = random.Random(seed_base + index)
        question = make_question(scene.objects, rng.choice(["colour", "shape"]), rng)
        if question is None:
            continue
        obj = next(o for o in scene.objects if name_of(o) in question.targets)
        image = _image_block(scene.image)
        text = {"type": "text", "text": question.question}
        plain = chat.invoke([HumanMessage([image, text])]).text
        labelled = [{"type": "text", "text": IMAGE_LABELS["original"]}, image]
        labelled += [{"type": "text", "text": IMAGE_LABELS["crop"]}, _image_block(object_crop(scene, obj)), text]
        zoom = chat.invoke([HumanMessage(labelled)]).text
        hits["plain"].append(normalize_answer(plain) == question.answer)
        hits["zoom"].append(normalize_answer(zoom) == question.answer)
        whole = whole_scene_question(scene.objects, WHOLE_SCENE_TYPES[index % 2], rng)
        for key, asked in (("tool_call_detail", question), ("tool_call_whole", whole)):
            messages = [
                SystemMessage(api_system_prompt()),
                HumanMessage([{"type": "text", "text": asked.question}, image]),
            ]
            reply = bound.invoke(messages)
            assert isinstance(reply, AIMessage)
            hits[key].append(any(call["name"] == TOOL_NAME for call in reply.tool_calls))
    return {key: {"rate": float(np.mean(values)), "questions": len(values)} for key, values in hits.items()}


def main(argv: Sequence[str] | None = None) -> None:
    """Run both measurements and print a Markdown summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes for accuracy (all questions)")
    parser.add_argument("--pointing-scenes", type=int, default=75, help="scenes per canvas kind for pointing")
    parser.add_argument("--seed-base", type=int, default=2_000_000)
    parser.add_argument("--weights", default=str(DEMO_LLAVA_DIR), help="save_pretrained folder of the demo LLaVA")
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="decoder layers (default: all)")
    parser.add_argument("--assistant-scenes", type=int, default=40, help="small-object scenes for the assistant part")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    started = time.time()
    model, processor = load_tiny_llava(Path(args.weights))
    model = model.float().eval()
    layers = args.layers if args.layers is not None else list(range(model.config.text_config.num_hidden_layers))
    attributors = {layer: LlavaAttributor.from_model(model, processor, layer=layer) for layer in layers}

    rows = accuracy(model, processor, args.scenes, args.seed_base)
    summary = summarise_accuracy(rows)
    print(f"held-out accuracy (greedy exact match), {args.scenes} scenes, {len(rows)} questions:")
    print("| question type | accuracy | questions |")
    print("|---|---|---|")
    order = ["all", *TYPE_NAMES, *(k for k in summary if k.startswith("existence/"))]
    for name in order:
        if name in summary:
            print(f"| {name} | {summary[name]['accuracy']:.3f} | {summary[name]['questions']} |")

    point_rows = []
    for canvas, square in (("square", True), ("non-square", False)):
        scenes = pointing_scenes(args.pointing_scenes, args.seed_base + (500_000 if square else 600_000), square)
        point_rows.extend(pointing(attributors, scenes, canvas, args.seed_base))
    table = summarise_pointing(point_rows)
    print(f"\npointing game of LlavaAttributor's map, {args.pointing_scenes} scenes per canvas kind, 2-5 objects:")
    print("| layer | query | canvas | queries | pointing | energy in box | random baseline | answered as expected |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['layer']} | {r['kind']} | {r['canvas']} | {r['queries']} | {r['pointing']:.3f} | "
            f"{r['energy']:.3f} | {r['baseline']:.3f} | {r['answered_as_expected']:.3f} |"
        )
    overall = [r for r in table if r["kind"] == "all"]
    best = max(overall, key=lambda r: (r["pointing"], r["energy"]))
    print(f"\nbest layer by pointing (all queries): {best['layer']}  ({time.time() - started:.0f}s)")
    assistant_rates = {}
    if args.assistant_scenes:
        chat = ChatTransformersVLM(model=str(args.weights), hf_model=model, processor=processor, max_tokens=48)
        assistant_rates = assistant(chat, args.assistant_scenes, args.seed_base)
        print("\nassistant through ChatTransformersVLM (small-object scenes; tool calls with the tool bound):")
        for key, value in assistant_rates.items():
            print(f"  {key}: {value['rate']:.3f} of {value['questions']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "accuracy": summary,
                    "pointing": table,
                    "best_layer": best["layer"],
                    "assistant": assistant_rates,
                    "weights": args.weights,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
