"""The demo assistant's training episodes are what the agent and the reflection loop send, token for token,
and the fast training paths (forward pass, greedy generation, annotations, crops) equal the literal ones.

Tiny random-weight models (64 px input, 8 x 8 grid); no weights, no network.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from agents.chat_models import ChatTransformersVLM, parse_tool_calls
from agents.prompts import parse_final_answer
from api_tool.demo.scenes import render_layouts, sample_layouts
from api_tool.render import jet_colors
from api_tool.tool import TOOL_NAME
from tests.tiny_lvlms.demo_llava import CELLS, PATCH, SIDE, tiny_train_config
from tests.tolerances import assert_sums_close
from training.assistant_batches import IGNORE, episode_logits, greedy_generate, image_features, make_episode_batch
from training.assistant_data import (
    EPISODE_KINDS,
    EpisodeRenderer,
    View,
    ViewBatch,
    annotation_masks,
    crop_boxes,
    jet,
    plausible_wrong_answer,
    render_views,
    tool_schemas,
    with_render_window,
)
from training.train_llava import build_model


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object, EpisodeRenderer]:
    model, processor = build_model(tiny_train_config())
    chat = ChatTransformersVLM(hf_model=model.eval(), processor=processor)
    return model, processor, EpisodeRenderer(chat, CELLS)


def _episodes(renderer: EpisodeRenderer, seed: int) -> tuple[object, object, list]:
    kinds = [kind for kind in EPISODE_KINDS for _ in range(2)]
    return make_episode_batch(
        len(kinds), 0.5, torch.Generator().manual_seed(seed), random.Random(seed), renderer, kinds
    )


def test_every_call_is_rendered_as_the_chat_model_sends_it(tiny: tuple) -> None:
    """Each model call's prompt ids are ChatTransformersVLM's own inputs (messages -> template -> processor
    with real images), and the labels are exactly each reply and its ``</s>``."""
    _, _, renderer = tiny
    chat = renderer.chat_model
    _, batch, episodes = _episodes(renderer, 0)
    for row, episode in enumerate(episodes):
        ids = batch.ids[row].tolist()
        expected_labels: list[int] = []
        for call, reply in zip(episode.calls, episode.replies):
            messages = list(call)
            tools = renderer.tools if episode.tools else []
            inputs = chat._prepare(messages, tools, None)  # the inference path: template, processor, images
            prompt = inputs["input_ids"][0].tolist()
            assert prompt == renderer.prompt_ids(call, episode.tools)
            assert ids[: len(prompt)] == prompt
            reply_ids = renderer.reply_ids(reply)
            assert ids[len(prompt) : len(prompt) + len(reply_ids)] == reply_ids
            expected_labels += reply_ids
            assert int(inputs["pixel_values"].shape[0]) == prompt.count(renderer.image_id) // CELLS
        labels = [label for label in batch.labels[row].tolist() if label != IGNORE]
        assert labels == expected_labels
        assert ids.count(renderer.image_id) == CELLS * len(episode.views)


def test_replies_parse_as_the_agent_and_the_loop_read_them(tiny: tuple) -> None:
    """Decoded from the tokenizer, a tool-call reply is a valid call passing the question, a verify reply
    has a FINAL line with the right answer, whole-scene agent episodes answer directly."""
    _, _, renderer = tiny
    _, _, episodes = _episodes(renderer, 1)
    tokenizer = renderer.tokenizer
    seen = set()
    for episode in episodes:
        texts = [tokenizer.decode(renderer.reply_ids(reply), skip_special_tokens=True) for reply in episode.replies]
        if episode.kind == "agent_detail":
            _, calls, invalid = parse_tool_calls(texts[0], [TOOL_NAME])
            assert not invalid and calls[0]["args"]["question"] == episode.question.question.lower()
            assert len(episode.views) == 2
        elif episode.kind == "agent_whole":
            assert parse_tool_calls(texts[0], [TOOL_NAME])[1] == [] and len(episode.calls) == 1
        elif episode.kind == "verify":
            assert parse_final_answer(texts[0]) == episode.truth.lower()
        seen.add(episode.kind)
    assert {"agent_detail", "verify"} <= seen


def test_wrong_first_answers_are_plausible_and_wrong() -> None:
    rng = random.Random(0)
    for answer in ("yes", "red", "star", "3", "0", "top left"):
        wrong = plausible_wrong_answer(answer, rng)
        assert wrong is not None and wrong != answer
    assert plausible_wrong_answer("a red circle and a blue star", rng) is None


def _pixels(processor: object, layouts: object, batch: object) -> torch.Tensor:
    """The batch's views rendered on the CPU as the model's input, as training renders them."""
    image_processor = processor.image_processor  # type: ignore[attr-defined]
    return render_views(
        layouts,  # type: ignore[arg-type]
        batch.views,  # type: ignore[attr-defined]
        SIDE,
        PATCH,
        image_processor.image_mean,
        image_processor.image_std,
        None,
        torch.device("cpu"),
    )


def test_episode_forward_equals_the_model_forward(tiny: tuple) -> None:
    """Images anywhere in the sequence, several per sequence: the training logits at the labelled
    positions are the model's own forward pass one sequence at a time."""
    model, processor, renderer = tiny
    layouts, batch, _ = _episodes(renderer, 2)
    pixels = _pixels(processor, layouts, batch)
    with torch.no_grad():
        logits, targets = episode_logits(
            model, image_features(model, pixels), batch.ids, batch.labels, renderer.image_id
        )
        slow, first_view = [], 0
        for row in range(batch.ids.shape[0]):
            length = int((batch.labels[row] != IGNORE).nonzero().max()) + 1
            count = int((batch.ids[row] == renderer.image_id).sum()) // CELLS
            output = model(
                input_ids=batch.ids[row : row + 1, :length], pixel_values=pixels[first_view : first_view + count]
            )
            first_view += count
            labelled = (batch.labels[row, 1:length] != IGNORE).nonzero().flatten()
            slow.append(output.logits[0, labelled])
    assert_sums_close(logits, torch.cat(slow), n_terms=4096)
    assert torch.equal(targets, batch.labels[batch.labels != IGNORE])


def test_greedy_generation_equals_generate(tiny: tuple) -> None:
    model, processor, renderer = tiny
    layouts, batch, episodes = _episodes(renderer, 3)
    pixels = _pixels(processor, layouts, batch)
    prompts, first_views, view = [], [], 0
    for episode in episodes[:3]:
        prompts.append(renderer.prompt_ids(episode.calls[0], episode.tools))
        first_views.append(view)
        view += len(episode.views)
    counts = [p.count(renderer.image_id) // CELLS for p in prompts]
    rows = torch.cat([torch.arange(start, start + count) for start, count in zip(first_views, counts)])
    features = image_features(model, pixels[rows])
    fast = greedy_generate(model, features, prompts, renderer.image_id, renderer.eos_id, 0, 6)
    for prompt, start, count, generated in zip(prompts, first_views, counts, fast):
        output = model.generate(
            input_ids=torch.tensor([prompt]),
            pixel_values=pixels[start : start + count],
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=renderer.eos_id,
            pad_token_id=0,
        )
        expected = [t for t in output[0, len(prompt) :].tolist() if t != renderer.eos_id]
        assert generated == expected[: len(generated)] and len(generated) in (len(expected), 6)


def test_heatmap_colours_are_the_renderers() -> None:
    values = np.linspace(0.0, 1.0, 101)
    np.testing.assert_array_equal(jet(torch.from_numpy(values)).round().numpy().astype(np.uint8), jet_colors(values))


def test_annotation_mask_peaks_on_its_object_and_is_diffuse_without_one() -> None:
    layouts = sample_layouts(4, torch.Generator().manual_seed(4), n_objects=3)
    labels = render_layouts(layouts, (SIDE, SIDE)).labels
    slots = torch.zeros(4, layouts.valid.shape[1], dtype=torch.bool)
    slots[:3, 1] = True
    masks = annotation_masks(labels, slots, PATCH, torch.Generator().manual_seed(0))
    for row in range(3):
        inside = labels[row] == 2
        assert float(masks[row][inside].max()) > 0.75  # the normalised peak, blurred by bilinear upsampling
        assert float(masks[row][inside].mean()) > 2 * float(masks[row][~inside].mean())
    assert float(masks[3].max()) > 0.75 and float((masks[3] > 0.05).float().mean()) > 0.05


def test_crops_frame_the_whole_target_enlarged() -> None:
    """A crop window holds the target object whole (no pixel of it cut off) and larger than the original
    view shows it."""
    layouts = sample_layouts(6, torch.Generator().manual_seed(5), n_objects=2)
    views = [View(scene, "crop", (0,)) for scene in range(6)]
    batch = ViewBatch.of(views, layouts.valid.shape[1], random.Random(0))
    boxes = crop_boxes(layouts, batch, SIDE)
    zoomed = render_layouts(with_render_window(layouts, 0.5 / 1.15), (SIDE, SIDE), content_boxes=boxes)
    from api_tool.demo.scenes import letterbox_boxes

    plain = render_layouts(layouts, (SIDE, SIDE), content_boxes=letterbox_boxes(layouts.aspect, SIDE))
    for scene in range(6):
        target = zoomed.labels[scene] == 1
        assert bool(target.any())
        assert int(target.sum()) > int((plain.labels[scene] == 1).sum())
        edge = torch.cat([target[0], target[-1], target[:, 0], target[:, -1]])
        assert not bool(edge.any())


def test_tool_schema_is_the_bound_tools(tiny: tuple) -> None:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from api_tool.tool import AttentionPromptTool

    assert tool_schemas() == [convert_to_openai_tool(AttentionPromptTool())]
