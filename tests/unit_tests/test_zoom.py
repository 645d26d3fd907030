"""The zoom crop (ViCrop-style): its geometry (api_tool.geometry.zoom_box), the rendered view, the
``zoom`` style through attention_prompt and the tool, the ``zoom`` reflection strategy and eval mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agents.eval import evaluate
from agents.eval_options import ANNOTATING_MODES, MODES, EvalOptions, run_modes
from agents.prompts import IMAGE_LABELS
from agents.reflection import areflect, reflect
from api_tool.errors import InvalidParameterError
from api_tool.geometry import ZOOM_MIN_SHARE, scale_box, zoom_box
from api_tool.prompt import attention_prompt
from api_tool.render import render, render_with_box, zoom_view
from api_tool.summary import map_summary
from api_tool.tool import AttentionPromptTool
from tests.conftest import shared_tiny_attributor
from tests.unit_tests.test_eval import RuleTarget, make_items, options, read_results
from tests.unit_tests.test_reflection import blocks, png_block, target


def blob(size: tuple[int, int], box: tuple[int, int, int, int], value: float = 1.0) -> np.ndarray:
    width, height = size
    mask = np.zeros((height, width))
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = value
    return mask


def inside(box: tuple[int, int, int, int], size: tuple[int, int]) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]


@pytest.mark.parametrize("size", [(400, 400), (1000, 300), (300, 1000)])
@pytest.mark.parametrize(
    "region", [(10, 10, 20, 20), (180, 140, 200, 160), (0, 0, 4, 4), (280, 280, 300, 300), (100, 0, 130, 5)]
)
def test_zoom_box_is_inside_holds_the_region_and_the_minimum_square(
    size: tuple[int, int], region: tuple[int, int, int, int]
) -> None:
    box = zoom_box(blob(size, region))
    assert inside(box, size)
    x0, y0, x1, y1 = box
    assert x0 <= region[0] and y0 <= region[1] and x1 >= region[2] and y1 >= region[3]
    side = ZOOM_MIN_SHARE * min(size)
    assert x1 - x0 >= side - 1 and y1 - y0 >= side - 1
    assert abs((x1 - x0) - (y1 - y0)) <= 1  # square, as LLaVA's input


def test_zoom_box_centres_on_the_region_away_from_the_borders() -> None:
    box = zoom_box(blob((1000, 600), (490, 290, 510, 310)), min_share=0.3)
    assert box == (410, 210, 590, 390)


def test_zoom_box_grows_with_a_large_region_and_its_margin() -> None:
    x0, y0, x1, y1 = zoom_box(blob((1000, 800), (200, 300, 600, 500)), margin=0.25)
    assert (x0, x1) == (100, 700) and y1 - y0 == 600 and y0 <= 300 and y1 >= 500


def test_zoom_box_ignores_an_attended_region_far_from_the_peak() -> None:
    mask = blob((1000, 1000), (100, 100, 120, 120))
    mask[800:820, 800:820] = 0.9
    _, _, x1, y1 = zoom_box(mask)
    assert x1 <= 800 and y1 <= 800


def test_zoom_box_keeps_the_target_aspect_and_cuts_only_what_the_image_lacks() -> None:
    x0, y0, x1, y1 = zoom_box(blob((1200, 800), (590, 390, 610, 410)), aspect=2.0)
    assert (x1 - x0) == 2 * (y1 - y0)
    x0, y0, x1, y1 = zoom_box(blob((1200, 100), (590, 40, 610, 60)), aspect=0.5)
    assert (x1 - x0, y1 - y0) == (30, 60)
    x0, y0, x1, y1 = zoom_box(blob((1200, 100), (590, 40, 610, 60)), aspect=0.1)
    assert (y0, y1) == (0, 100) and x1 - x0 == 30  # 300 px tall would not fit: cut to the image


def test_zoom_box_checks_its_input() -> None:
    with pytest.raises(InvalidParameterError, match="2-D mask"):
        zoom_box(np.zeros(5))
    with pytest.raises(InvalidParameterError, match="min_share"):
        zoom_box(np.zeros((5, 5)), min_share=0.0)


def test_a_box_on_the_grid_scales_to_pixels() -> None:
    assert scale_box((1, 1, 2, 3), (4, 4), (400, 200)) == (100, 50, 200, 150)
    assert scale_box((0.5, 0.5, 4, 4), (4, 4), (10, 10)) == (1, 1, 10, 10)


def test_zoom_view_is_the_box_resized_to_the_target_input() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(300, 500, 3), dtype=np.uint8))
    mask = blob((500, 300), (400, 100, 420, 120))
    view, box = zoom_view(image, mask, 336)
    assert view.size == (336, 336) and box == zoom_box(mask, margin=0.25)
    expected = image.resize((336, 336), Image.Resampling.BICUBIC, box=box)
    np.testing.assert_array_equal(np.asarray(view), np.asarray(expected))
    wide, wide_box = zoom_view(image, mask, (200, 100))
    assert wide.size == (200, 100) and (wide_box[2] - wide_box[0]) == 2 * (wide_box[3] - wide_box[1])
    np.testing.assert_array_equal(np.asarray(render(image, mask, "zoom")), np.asarray(view))
    assert render_with_box(image, mask, "gray")[1] is None
    with pytest.raises(InvalidParameterError, match="zoom_size"):
        zoom_view(image, mask, 0)


def scene_image(seed: int = 0, size: tuple[int, int] = (160, 96)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def test_attention_prompt_zoom_returns_the_crop_and_its_box() -> None:
    image = scene_image()
    result = attention_prompt(image, "the red circle", shared_tiny_attributor(), style="zoom", zoom_size=64)
    assert result.image.size == (64, 64) and result.crop_box is not None
    view, box = zoom_view(image, result.mask, 64)
    assert result.crop_box == box
    np.testing.assert_array_equal(np.asarray(result.image), np.asarray(view))
    summary = map_summary(result, image="x.png", question="the red circle", model="tiny")
    assert summary["crop_box"] == list(box)
    assert attention_prompt(image, "the red circle", shared_tiny_attributor(), style="crop").crop_box is not None


def test_tool_zoom_style_returns_the_crop_with_its_box_in_the_text() -> None:
    tool = AttentionPromptTool(attributor=shared_tiny_attributor(), style="zoom", zoom_size=48, max_side=None)
    image = scene_image(1)
    data = png_block(image)["base64"]
    message = tool.invoke(
        {"type": "tool_call", "id": "1", "name": "attention_prompt", "args": {"image": data, "question": "the star"}}
    )
    box = message.artifact["crop_box"]
    x0, y0, x1, y1 = box
    assert f"x {x0}-{x1}, y {y0}-{y1} px of the 160x96 image" in message.content[0]["text"]
    expected = tool.annotate(image, "the star")
    assert expected.crop_box == box and expected.image.size == (48, 48)
    assert message.content[1] == png_block(expected.image)


def zoom_tool() -> AttentionPromptTool:
    return AttentionPromptTool(attributor=shared_tiny_attributor(), max_side=None, zoom_size=40)


def check_zoom_reask(received: list[Any], image: Image.Image, question: str) -> None:
    expected = zoom_tool().annotate(image, question, style="zoom", tiles="auto")
    assert blocks(received[0]) == [
        {"type": "text", "text": IMAGE_LABELS["original"]},
        png_block(image),
        {"type": "text", "text": IMAGE_LABELS["crop"]},
        png_block(expected.image),
        {"type": "text", "text": question},
    ]


def test_zoom_strategy_sends_the_original_and_the_crop() -> None:
    image = scene_image(2)
    model = target("a square", "a circle")
    result = reflect("What shape is it?", image, model, zoom_tool(), strategy="zoom")
    assert (result.first_answer, result.final_answer, result.changed) == ("a square", "a circle", True)
    check_zoom_reask(model.received[1], image, "What shape is it?")
    expected = zoom_tool().annotate(image, "What shape is it?", style="zoom", tiles="auto")
    assert result.rounds[0].crop_box == expected.crop_box
    assert result.annotated_images[0].size == (40, 40)


async def test_zoom_strategy_async_with_a_first_answer() -> None:
    image = scene_image(3)
    model = target("a circle")
    result = await areflect("What shape is it?", image, model, zoom_tool(), strategy="zoom", first_answer="a star")
    assert (result.first_answer, result.final_answer) == ("a star", "a circle") and len(model.received) == 1
    check_zoom_reask(model.received[0], image, "What shape is it?")
    assert result.rounds[0].crop_box is not None


def test_zoom_is_an_annotating_eval_mode() -> None:
    assert "zoom" in MODES and "zoom" in ANNOTATING_MODES
    assert run_modes(["zoom"]) == ("plain", "zoom")
    assert EvalOptions(modes=("plain", "zoom")).modes == ("plain", "zoom")


def test_eval_zoom_mode_logs_the_crop_box(tmp_path: Path) -> None:
    items = make_items(tmp_path)[:2]
    out = tmp_path / "o"
    evaluate(items, RuleTarget(), out_dir=out, attributor=shared_tiny_attributor(), modes=("zoom",), options=options())
    records = read_results(out)
    zoomed = [record for record in records if record["mode"] == "zoom"]
    assert len(zoomed) == 2 and {record["mode"] for record in records} == {"plain", "zoom"}
    for record in zoomed:
        x0, y0, x1, y1 = record["crop_box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48 and record["annotated"]


@pytest.mark.parametrize(
    ("shape", "min_share"), [((3, 3), 0.3), ((200, 300), 0.001), ((1, 40), 0.5)], ids=["3x3", "tiny-share", "one-row"]
)
def test_zoom_box_ends_on_tiny_images_and_tiny_shares(shape: tuple[int, int], min_share: float) -> None:
    """A window that grows by less than a pixel once looped for ever; the box still holds the peak's region."""
    mask = np.zeros(shape)
    row, col = shape[0] // 2, shape[1] // 2
    mask[row, col] = 1.0
    mask[row, min(col + 1, shape[1] - 1)] = 0.9
    x0, y0, x1, y1 = zoom_box(mask, min_share=min_share)
    assert 0 <= x0 <= col < x1 <= shape[1] and 0 <= y0 <= row < y1 <= shape[0]
    assert x1 > min(col + 1, shape[1] - 1)
