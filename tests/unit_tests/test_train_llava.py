"""The demo LLaVA's training path computes exactly what the model and the attributor compute.

Tiny random-weight models (8 x 8 image grid); no weights, no network.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from api_tool.backends.llava import LlavaAttributor
from api_tool.demo.scenes import POPE_SPLITS, generate_scene, sample_layouts
from api_tool.errors import InvalidParameterError
from api_tool.geometry import Letterbox
from tests.tiny_lvlms.demo_llava import CELLS, PATCH, SIDE, tiny_train_config
from tests.tolerances import assert_sums_close
from training.llava_questions import location_answer
from training.train_llava import (
    IGNORE,
    TYPE_NAMES,
    AttentionInputs,
    PromptEncoder,
    answer_logits,
    build_model,
    check_encoding,
    drop_hidden,
    exact_match,
    grounding_loss,
    load_initial_weights,
    make_batch,
    patch_coverage,
    render_pixels,
    save_demo_llava,
    step_maps,
)


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object, PromptEncoder]:
    model, processor = build_model(tiny_train_config())
    encoder = PromptEncoder(processor, CELLS)
    return model.eval(), processor, encoder


def _pixels(processor: object, layouts: object) -> tuple[torch.Tensor, torch.Tensor]:
    image_processor = processor.image_processor  # type: ignore[attr-defined]
    return render_pixels(
        layouts, SIDE, image_processor.image_mean, image_processor.image_std, None, torch.device("cpu")
    )


def test_encoding_matches_processor_and_attributor(tiny: tuple[torch.nn.Module, object, PromptEncoder]) -> None:
    _, _, encoder = tiny
    check_encoding(encoder, SIDE)
    encoded = encoder.encode([[("is there a red circle in the image?", "yes"), ("where is the star?", "top left")]])
    labelled = encoded.labels[0][encoded.labels[0] != IGNORE].tolist()
    tokenizer = encoder.tokenizer
    assert tokenizer.convert_ids_to_tokens(labelled) == ["yes", "</s>", "top", "left", "</s>"]
    assert encoded.turns[0][encoded.labels[0] != IGNORE].tolist() == [0, 0, 1, 1, 1]
    assert int((encoded.ids[0] == encoder.image_id).sum()) == CELLS


def test_training_forward_equals_model_forward(tiny: tuple[torch.nn.Module, object, PromptEncoder]) -> None:
    """Multi-turn conversations, images shared between conversations: the same logits as the model's
    own forward pass one conversation at a time, and exact match = every labelled argmax right."""
    model, processor, encoder = tiny
    layouts, batch = make_batch(3, 2, 3, torch.Generator().manual_seed(1), random.Random(1), encoder)
    pixels, _ = _pixels(processor, layouts)
    encoded = batch.encoded
    expected_match = torch.zeros(encoded.ids.shape[0], 3, dtype=torch.bool)
    with torch.no_grad():
        outputs = answer_logits(model, pixels, encoded, batch.image_index, encoder.image_start)
        slow = []
        for row in range(encoded.ids.shape[0]):
            length = int((encoded.ids[row] != encoder.tokenizer.pad_token_id).sum())
            logits = model(
                input_ids=encoded.ids[row : row + 1, :length], pixel_values=pixels[batch.image_index[row]][None]
            )
            labelled = (encoded.labels[row, 1:length] != IGNORE).nonzero().flatten()
            predicted = logits.logits[0, labelled]
            slow.append(predicted)
            right = predicted.argmax(dim=-1) == encoded.labels[row, labelled + 1]
            for turn in range(3):
                expected_match[row, turn] = bool(right[encoded.turns[row, labelled + 1] == turn].all())
    assert_sums_close(outputs.logits, torch.cat(slow), n_terms=2048)  # batched vs one row: other sum orders
    assert torch.equal(outputs.targets, encoded.labels[outputs.mask])
    assert torch.equal(exact_match(outputs, encoded, 3), expected_match)


def test_training_attention_equals_attributor_map(tiny: tuple[torch.nn.Module, object, PromptEncoder]) -> None:
    model, processor, encoder = tiny
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))
    question, answer = "where is the red circle?", "top left"
    expected = LlavaAttributor.from_model(model, processor, layer=1).attribute(image, question, answer=answer)
    pixels = processor.image_processor(image, do_resize=False, do_center_crop=False, return_tensors="pt")  # type: ignore[attr-defined]
    encoded = encoder.encode([[(question, answer)]])
    probe = AttentionInputs(model, [1])
    try:
        with torch.no_grad():
            answer_logits(model, pixels["pixel_values"], encoded, torch.tensor([0]), encoder.image_start)
            attention = probe.image_attention(1, encoder.image_start, CELLS)
    finally:
        probe.remove()
    maps, valid = step_maps(attention, encoded, encoder.eos_id, encoder.image_start + CELLS, 1)
    assert bool(valid[0, 0]) and expected.metadata["steps"] == 2
    assert_sums_close(maps[0, 0].reshape(8, 8).numpy(), expected.raw, n_terms=2048)  # one tiny-LLaVA forward


def test_step_maps_average_each_turns_answer_steps() -> None:
    # Sequence: 2 prompt positions after the image, then turn 0 = one answer token + eos, turn 1 = two + eos.
    labels = torch.tensor([[IGNORE, IGNORE, 10, 3, IGNORE, 11, 12, 3]])
    turns = torch.tensor([[-1, -1, 0, 0, -1, 1, 1, 1]])
    from training.train_llava import Encoded

    encoded = Encoded(torch.zeros_like(labels), labels, turns)
    attention = torch.arange(8 * 3, dtype=torch.float32).reshape(1, 8, 3)
    maps, valid = step_maps(attention, encoded, eos_id=3, image_end=0, turns=2)
    assert valid.tolist() == [[True, True]]
    torch.testing.assert_close(maps[0, 0], attention[0, 1])
    torch.testing.assert_close(maps[0, 1], (attention[0, 4] + attention[0, 5]) / 2)


def test_grounding_loss_is_the_cross_entropy_to_the_object_coverage() -> None:
    maps = torch.tensor([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    coverage = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True]])
    expected = -(0.5 * np.log(0.5) + 0.5 * np.log(0.25))
    assert float(grounding_loss(maps, valid, coverage)) == pytest.approx(expected)
    assert float(grounding_loss(maps, valid, torch.zeros_like(coverage))) == 0.0


def test_patch_coverage_and_targets_match_the_rendered_objects(
    tiny: tuple[torch.nn.Module, object, PromptEncoder],
) -> None:
    _, processor, encoder = tiny
    layouts, batch = make_batch(6, 1, 6, torch.Generator().manual_seed(2), random.Random(2), encoder)
    _, labels = _pixels(processor, layouts)
    coverage = patch_coverage(labels, layouts.valid.shape[1], PATCH)
    for k in range(layouts.valid.shape[1]):
        pixels = (labels == k + 1).float().sum(dim=(1, 2))
        torch.testing.assert_close(coverage[:, k].sum(dim=1) * PATCH * PATCH, pixels)
    questions = iter(batch.texts)
    for scene in range(6):
        for turn in range(6):
            _, answer = next(questions)
            slots = batch.targets[scene, turn].nonzero().flatten().tolist()
            assert all(bool(layouts.valid[scene, k]) for k in slots)
            kind = TYPE_NAMES[int(batch.types[scene, turn])]
            split = int(batch.splits[scene, turn])
            if kind == "existence":
                assert (answer == "yes") == bool(slots)
                assert 0 <= split < len(POPE_SPLITS)
            else:
                assert split == -1
            if kind in ("colour", "shape", "location"):
                assert len(slots) == 1


def test_location_answers_split_the_canvas_in_thirds() -> None:
    assert location_answer(0.1, 0.1) == "top left"
    assert location_answer(0.5, 0.9) == "bottom"
    assert location_answer(0.9, 0.5) == "right"
    assert location_answer(0.5, 0.5) == "center"
    assert location_answer(0.34, 0.5) is None


def test_fast_render_matches_the_attributor_input_of_generate_scene(
    tiny: tuple[torch.nn.Module, object, PromptEncoder],
) -> None:
    """The training pixels of a layout are the attributor's letterboxed input of the same scene,
    up to resampling (edges and noise), and the padding is identical."""
    _, processor, _ = tiny
    seed, size = 5, (128, 64)
    scene = generate_scene(seed, size=size, n_objects=2, background="flat")
    generator = torch.Generator().manual_seed(seed)
    layouts = sample_layouts(1, generator, aspect=size[0] / size[1], n_objects=2, background="flat")
    fast, _ = _pixels(processor, drop_hidden(layouts))
    mean = processor.image_processor.image_mean  # type: ignore[attr-defined]
    boxed = Letterbox.fit(size, SIDE).apply(scene.image, tuple(round(255 * m) for m in mean))
    slow = processor.image_processor(boxed, do_resize=False, do_center_crop=False, return_tensors="pt")  # type: ignore[attr-defined]
    slow_pixels = slow["pixel_values"][0]
    torch.testing.assert_close(fast[0][:, :16], slow_pixels[:, :16], atol=1e-5, rtol=0)
    content = (fast[0][:, 16:48] - slow_pixels[:, 16:48]).abs().mean()
    mirrored = (fast[0].flip(-1)[:, 16:48] - slow_pixels[:, 16:48]).abs().mean()
    assert float(content) < 0.03 < float(mirrored)


def test_init_continues_a_saved_model_and_refuses_other_sizes(
    tiny: tuple[torch.nn.Module, object, PromptEncoder], tmp_path: Path
) -> None:
    model, processor, _ = tiny
    saved = save_demo_llava(model, processor, tmp_path / "saved", {"steps_run": 7}, attribution_layer=1)
    fresh, fresh_processor = build_model(tiny_train_config(seed=1))
    record = load_initial_weights(fresh, fresh_processor, str(saved))
    assert record["steps_run"] == 7
    for name, value in model.state_dict().items():
        # The saved copy is float16: each weight is the float32 one rounded once.
        torch.testing.assert_close(fresh.state_dict()[name], value.half().float(), rtol=0, atol=0)
    wider, wider_processor = build_model(tiny_train_config(hidden=96))
    with pytest.raises(InvalidParameterError, match="does not match"):
        load_initial_weights(wider, wider_processor, str(saved))
