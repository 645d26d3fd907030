"""API-LLaVA on tiny random-weight LLaVA models: exact against eager attention, offline, on CPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration, LlavaNextConfig

from api_tool.backends.llava import LlavaAttributor
from api_tool.backends.lvlm import image_attention
from api_tool.cli import main
from api_tool.demo import tiny_llava as tiny_llava_module
from api_tool.demo.tiny_llava import LLAVA_CHAT_TEMPLATE, build_tiny_llava_processor, load_tiny_llava
from api_tool.errors import (
    FocusNotFoundError,
    ImageTokenError,
    InvalidParameterError,
    InvalidQueryError,
    LayerOutOfRangeError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from api_tool.geometry import Letterbox
from api_tool.maps import combine_maps
from api_tool.prompt import attention_prompt
from tests.tiny_models import TinyLlava, attend_to_bright_patches, bright_square_image, tiny_llava
from tests.tolerances import assert_sums_close, sum_tolerance

QUESTION = "What is the colour of the circle?"
LAYER = 1
MAX_NEW_TOKENS = 6
GRID_CELLS = 64
FORWARD_TERMS = 2048
"""About how many float32 terms the sums along one tiny-LLaVA forward pass hold (about 90 positions,
widths up to 128, two vision and two decoder blocks): two correct implementations (eager vs SDPA,
cached vs full prefill, AVX2 vs AVX-512) may differ within that sum's rounding band."""


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory: pytest.TempPathFactory) -> TinyLlava:
    # seed 2 makes the random model's greedy answer varied (distinct words), which the focus tests need.
    return tiny_llava(tmp_path_factory.mktemp("tiny-llava"), layers=3, seed=2)


@pytest.fixture(scope="module")
def attributor(saved_llava: TinyLlava) -> LlavaAttributor:
    return LlavaAttributor.from_model(
        saved_llava.model, saved_llava.processor, layer=LAYER, max_new_tokens=MAX_NEW_TOKENS
    )


@pytest.fixture(scope="module")
def eager_model(saved_llava: TinyLlava) -> LlavaForConditionalGeneration:
    assert saved_llava.directory is not None
    model = LlavaForConditionalGeneration.from_pretrained(saved_llava.directory, attn_implementation="eager")
    return model.eval()


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 72, 3), dtype=np.uint8))


@torch.no_grad()
def eager_step_maps(
    model: LlavaForConditionalGeneration,
    processor: object,
    image: Image.Image,
    question: str,
    layer: int,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Per-step image attention from ``generate(output_attentions=True)`` with eager attention.

    The full post-softmax rows of block ``layer`` are restricted to the image keys and renormalised,
    then averaged over heads: one ``(64,)`` map per step. The step that emitted EOS is dropped.
    """
    side = model.config.vision_config.image_size
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    square = Letterbox.fit(image.size, side).apply(image, fill)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=square, text=prompt, return_tensors="pt")
    eos = model.generation_config.eos_token_id if eos_token_id is None else eos_token_id
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_attentions=True,
        return_dict_in_generate=True,
        eos_token_id=eos,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    is_image = inputs["input_ids"][0] == model.config.image_token_id
    maps = []
    for step_attentions in output.attentions:
        last_row = step_attentions[layer][0, :, -1, : is_image.numel()]
        on_image = last_row[:, is_image]
        maps.append((on_image / on_image.sum(dim=-1, keepdim=True)).mean(dim=0).double().numpy())
    generated = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    if generated and generated[-1] == eos and len(generated) > 1:
        generated, maps = generated[:-1], maps[:-1]
    return np.stack(maps), generated


def test_image_attention_matches_literal_grouped_query_softmax() -> None:
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(1, 6, 3, 8, generator=generator), torch.randn(1, 2, 5, 8, generator=generator)
    expected = torch.zeros(3, 5)
    for head in range(6):
        scores = queries[0, head] @ keys[0, head // 3].T * 0.3
        expected += scores.softmax(dim=-1) / 6
    assert_sums_close(image_attention(queries, keys, 0.3)[0], expected, n_terms=8 * 6)


def test_generation_map_equals_eager_output_attentions(
    attributor: LlavaAttributor, eager_model: LlavaForConditionalGeneration, saved_llava: TinyLlava, photo: Image.Image
) -> None:
    amap = attributor.attribute(photo, QUESTION)
    steps, generated = eager_step_maps(eager_model, saved_llava.processor, photo, QUESTION, LAYER, MAX_NEW_TOKENS)
    assert amap.metadata["answer"] == saved_llava.processor.tokenizer.decode(generated, skip_special_tokens=True)
    assert amap.metadata["steps"] == len(steps) == MAX_NEW_TOKENS
    assert_sums_close(amap.raw, steps.mean(axis=0).reshape(8, 8), n_terms=FORWARD_TERMS)
    assert amap.raw.sum() == pytest.approx(1.0, abs=sum_tolerance(2 * GRID_CELLS))  # float32 softmax, float64 sum
    assert amap.mask.min() == 0.0 and amap.mask.max() == 1.0
    assert amap.metadata["backend"] == "llava" and amap.metadata["layer"] == LAYER
    assert amap.metadata["mode"] == "generate"


def test_teacher_forcing_equals_generation_on_own_answer(attributor: LlavaAttributor, photo: Image.Image) -> None:
    generated = attributor.attribute(photo, QUESTION)
    answer = generated.metadata["answer"]
    assert isinstance(answer, str) and answer
    recorded = attributor.attribute(photo, QUESTION, answer=answer)
    assert recorded.metadata["scored_from"] == "recording"
    assert_sums_close(recorded.raw, generated.raw, n_terms=FORWARD_TERMS)
    attributor.clear_reuse()
    forced = attributor.attribute(photo, QUESTION, answer=answer)
    assert forced.metadata["mode"] == "teacher_forcing" and forced.metadata["answer"] == answer
    assert forced.metadata["scored_from"] == "forward"
    assert forced.metadata["step_tokens"] == generated.metadata["step_tokens"]
    assert_sums_close(forced.raw, generated.raw, n_terms=FORWARD_TERMS)
    recipe = {"combine": "cls", "enhance_coe": attributor.enhance_coe, "kernel_size": attributor.kernel_size}
    np.testing.assert_array_equal(forced.mask, combine_maps(forced.raw, None, **recipe))


def test_teacher_forcing_of_another_answer_scores_its_own_steps(
    attributor: LlavaAttributor, eager_model: LlavaForConditionalGeneration, saved_llava: TinyLlava, photo: Image.Image
) -> None:
    answer = "a red circle left of a blue square."
    forced = attributor.attribute(photo, QUESTION, answer=answer)
    assert forced.metadata["steps"] == len(saved_llava.processor.tokenizer(answer, add_special_tokens=False).input_ids)
    assert not np.allclose(forced.raw, attributor.attribute(photo, QUESTION).raw, atol=1e-4)
    empty = attributor.attribute(photo, QUESTION, answer="")
    first_step, _ = eager_step_maps(eager_model, saved_llava.processor, photo, QUESTION, LAYER, 1)
    assert empty.metadata["steps"] == 1
    assert_sums_close(empty.raw, first_step[0].reshape(8, 8), n_terms=FORWARD_TERMS)


def test_focus_averages_only_the_steps_of_the_substring(
    attributor: LlavaAttributor, eager_model: LlavaForConditionalGeneration, saved_llava: TinyLlava, photo: Image.Image
) -> None:
    steps, generated = eager_step_maps(eager_model, saved_llava.processor, photo, QUESTION, LAYER, MAX_NEW_TOKENS)
    words = saved_llava.processor.tokenizer.convert_ids_to_tokens(generated)
    index = next(i for i, word in enumerate(words) if words.count(word) == 1 and word.isalpha())
    focused = attributor.attribute(photo, QUESTION, focus=words[index].upper())
    assert focused.metadata["steps"] == 1 and focused.metadata["step_tokens"] == [words[index]]
    assert_sums_close(focused.raw, steps[index].reshape(8, 8), n_terms=FORWARD_TERMS)
    two_words = index + 1 < len(words) and words[index + 1].isalpha()
    span = f"{words[index]} {words[index + 1]}" if two_words else words[index]
    pair = attributor.attribute(photo, QUESTION, answer=focused.metadata["answer"], focus=span)
    expected = steps[index : index + len(span.split())].mean(axis=0)
    assert_sums_close(pair.raw, expected.reshape(8, 8), n_terms=FORWARD_TERMS)
    with pytest.raises(FocusNotFoundError, match="zebra"):
        attributor.attribute(photo, QUESTION, focus="zebra")


def test_end_of_sequence_step_is_left_out(saved_llava: TinyLlava, eager_model, photo: Image.Image) -> None:
    _, generated = eager_step_maps(eager_model, saved_llava.processor, photo, QUESTION, LAYER, MAX_NEW_TOKENS)
    stop_at = next(i for i in range(1, len(generated)) if generated[i] not in generated[:i])
    model = saved_llava.model
    original_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = generated[stop_at]
    try:
        stopping = LlavaAttributor.from_model(model, saved_llava.processor, layer=LAYER, max_new_tokens=MAX_NEW_TOKENS)
        amap = stopping.attribute(photo, QUESTION)
    finally:
        model.generation_config.eos_token_id = original_eos
    steps, kept = eager_step_maps(
        eager_model, saved_llava.processor, photo, QUESTION, LAYER, MAX_NEW_TOKENS, eos_token_id=generated[stop_at]
    )
    assert kept == generated[:stop_at] and amap.metadata["steps"] == stop_at == len(steps)
    assert_sums_close(amap.raw, steps.mean(axis=0).reshape(8, 8), n_terms=FORWARD_TERMS)


def test_attention_forced_onto_one_patch_lands_on_its_cell_and_pixels() -> None:
    tiny = tiny_llava(layers=1, seed=0)
    attend_to_bright_patches(tiny.model)
    # 320 x 160 letterboxes to 64 x 32 at y = 16..48 of the 64 x 64 input (grid rows 2..5 of 8).
    # The white square x 160..200, y 40..80 becomes x 32..40, y 24..32: exactly grid cell (3, 4).
    square = (160, 40, 200, 80)
    image = bright_square_image((320, 160), square)
    sharp = LlavaAttributor.from_model(tiny.model, tiny.processor, layer=0, max_new_tokens=2, kernel_size=1)
    amap = sharp.attribute(image, "where is the square?")
    assert np.unravel_index(np.argmax(amap.raw), amap.raw.shape) == (3, 4)
    assert amap.raw[3, 4] > 0.99
    assert amap.grid_box == pytest.approx((0.0, 2.0, 8.0, 6.0))
    pixels = amap.upsample()
    assert pixels.shape == (160, 320)
    row, col = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert square[0] <= col < square[2] and square[1] <= row < square[3]
    assert pixels[60, 180] > 0.95
    inside = np.zeros(pixels.shape, dtype=bool)
    inside[square[1] : square[3], square[0] : square[2]] = True
    assert pixels[inside].mean() > 20 * pixels[~inside].mean()

    smoothed = LlavaAttributor.from_model(tiny.model, tiny.processor, layer=0, max_new_tokens=2)
    plateau = smoothed.attribute(image, "where is the square?").upsample()
    ys, xs = np.mgrid[0:160, 0:320]
    centroid = ((xs * plateau).sum() / plateau.sum(), (ys * plateau).sum() / plateau.sum())
    assert centroid == pytest.approx((180.0, 60.0), abs=5.0)  # one grid cell is 40 px here


def test_batch_and_many_equal_single_calls(saved_llava: TinyLlava, photo: Image.Image) -> None:
    short = LlavaAttributor.from_model(saved_llava.model, saved_llava.processor, layer=LAYER, max_new_tokens=2)
    other = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    single = [short.attribute(photo, QUESTION), short.attribute(other, "is there a square?", answer="yes")]
    batch = short.attribute_batch([photo, other], [QUESTION, "is there a square?"], answers=[None, "yes"])
    many = short.attribute_many(photo, [QUESTION, "is there a square?"])
    for expected, got in zip(single, batch):  # the batch's second map continues the single call's prompt cache
        assert_sums_close(got.raw, expected.raw, n_terms=FORWARD_TERMS)
        assert {**expected.metadata, "scored_from": None} == {**got.metadata, "scored_from": None}
    np.testing.assert_array_equal(many[0].raw, single[0].raw)
    assert many[1].query == "is there a square?" and many[1].metadata["mode"] == "generate"
    with pytest.raises(InvalidQueryError, match="2 images but 1 queries"):
        short.attribute_batch([photo, other], [QUESTION])


def test_local_directory_round_trip(saved_llava: TinyLlava, attributor: LlavaAttributor, photo: Image.Image) -> None:
    assert saved_llava.directory is not None
    model, processor = load_tiny_llava(saved_llava.directory)
    for name, tensor in saved_llava.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert processor.chat_template == LLAVA_CHAT_TEMPLATE
    assert processor.tokenizer.get_vocab() == saved_llava.processor.tokenizer.get_vocab()
    from_dir = LlavaAttributor(model=saved_llava.directory, layer=LAYER, device="cpu", max_new_tokens=MAX_NEW_TOKENS)
    assert from_dir.model.dtype == torch.float32
    loaded_map = from_dir.attribute(photo, QUESTION)
    shared_map = attributor.attribute(photo, QUESTION)
    assert_sums_close(loaded_map.raw, shared_map.raw, n_terms=FORWARD_TERMS)
    assert loaded_map.metadata["answer"] == shared_map.metadata["answer"]


def test_tokenizer_round_trips_decoded_answers() -> None:
    tokenizer = build_tiny_llava_processor(["a zebra stands left of the tree."]).tokenizer
    text = "a zebra stands left of the tree, yes!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == text
    assert tokenizer(decoded, add_special_tokens=False).input_ids == ids
    assert tokenizer.unk_token_id not in ids


def test_bfloat16_on_cpu_is_close_to_float32(saved_llava: TinyLlava, attributor: LlavaAttributor, photo) -> None:
    assert saved_llava.directory is not None
    half = LlavaAttributor(model=saved_llava.directory, layer=LAYER, device="cpu", dtype="bfloat16")
    answer = attributor.attribute(photo, QUESTION).metadata["answer"]
    assert isinstance(answer, str)
    low = half.attribute(photo, QUESTION, answer=answer)
    full = attributor.attribute(photo, QUESTION, answer=answer)
    assert half.model.dtype == torch.bfloat16
    assert np.corrcoef(low.raw.ravel(), full.raw.ravel())[0, 1] > 0.99


def test_demo_resolves_to_the_shipped_directory(saved_llava: TinyLlava, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_llava_module, "DEMO_LLAVA_DIR", saved_llava.directory)
    assert LlavaAttributor(model="demo", layer=0, device="cpu").model_name == "demo"
    monkeypatch.setattr(tiny_llava_module, "DEMO_LLAVA_DIR", Path("/nonexistent/demo/llava"))
    with pytest.raises(WeightsUnavailableError, match="demo LLaVA is not in this installation"):
        LlavaAttributor(model="demo", device="cpu")


def test_uncached_hub_id_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match="hf download api-prompting-tests/no-such-llava"):
        LlavaAttributor(model="api-prompting-tests/no-such-llava", device="cpu")
    assert time.perf_counter() - start < 5.0


def test_uncached_hub_id_without_offline_flag_fails_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises((WeightsUnavailableError, UnknownModelError)):
        LlavaAttributor(model="api-prompting-tests/no-such-llava", device="cpu")
    assert time.perf_counter() - start < 10.0


def test_missing_directory_and_bad_names_are_unknown() -> None:
    with pytest.raises(UnknownModelError, match="neither an existing directory"):
        LlavaAttributor(model="/nonexistent/llava-dir", device="cpu")


def test_other_model_classes_are_refused(tmp_path: Path, saved_llava: TinyLlava) -> None:
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM is not supported"):
        LlavaAttributor.from_model(LlamaForCausalLM(config), saved_llava.processor)
    next_config = LlavaNextConfig()
    next_config.architectures = ["LlavaNextForConditionalGeneration"]
    next_config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="LlavaNextForConditionalGeneration"):
        LlavaAttributor(model=tmp_path, device="cpu")


def test_layer_out_of_range(saved_llava: TinyLlava, tmp_path: Path) -> None:
    for layer in (3, -4, 99):
        with pytest.raises(LayerOutOfRangeError, match="language model with 3 blocks"):
            LlavaAttributor.from_model(saved_llava.model, saved_llava.processor, layer=layer)
    assert LlavaAttributor.from_model(saved_llava.model, saved_llava.processor, layer=-1).layer == 2
    assert saved_llava.directory is not None
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((saved_llava.directory / "config.json").read_bytes())
    # checked before loading any weights
    with pytest.raises(LayerOutOfRangeError, match="language model with 3 blocks"):
        LlavaAttributor(model=config_only, layer=20, device="cpu")


def test_cli_writes_a_prompted_image_with_a_local_llava(
    saved_llava: TinyLlava, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image_path, output = tmp_path / "scene.png", tmp_path / "prompted.png"
    bright_square_image((120, 80), (40, 20, 80, 60)).save(image_path)
    argv = [str(image_path), QUESTION, "-o", str(output), "--backend", "llava", "--model"]
    status = main([*argv, str(saved_llava.directory), "--layer", "1", "--device", "cpu"])
    assert status == 0
    expected = attention_prompt(
        image_path, QUESTION, LlavaAttributor(model=saved_llava.directory, layer=1, device="cpu")
    ).image
    np.testing.assert_array_equal(np.asarray(Image.open(output)), np.asarray(expected))
    assert "first answer:" in capsys.readouterr().out
    assert main([*argv, str(saved_llava.directory), "--layer", "9", "--device", "cpu"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_image_missing_from_the_prompt(saved_llava: TinyLlava, photo: Image.Image) -> None:
    no_image = build_tiny_llava_processor()
    no_image.chat_template = LLAVA_CHAT_TEMPLATE.replace("{{ '<image>\n' }}", "")
    attributor = LlavaAttributor.from_model(saved_llava.model, no_image, layer=0)
    with pytest.raises(ImageTokenError, match="0 '<image>' placeholders"):
        attributor.attribute(photo, QUESTION)
    wrong_count = build_tiny_llava_processor()
    wrong_count.num_additional_image_tokens = 0
    attributor = LlavaAttributor.from_model(saved_llava.model, wrong_count, layer=0)
    with pytest.raises(ImageTokenError, match="63 image tokens"):
        attributor.attribute(photo, QUESTION)


def test_bad_parameters(attributor: LlavaAttributor, saved_llava: TinyLlava, photo: Image.Image) -> None:
    with pytest.raises(InvalidQueryError):
        attributor.attribute(photo, "   ")
    with pytest.raises(InvalidParameterError, match="focus"):
        attributor.attribute(photo, QUESTION, focus=" ")
    with pytest.raises(InvalidParameterError, match="max_new_tokens"):
        LlavaAttributor.from_model(saved_llava.model, saved_llava.processor, max_new_tokens=0)
    with pytest.raises(InvalidParameterError, match="kernel_size"):
        LlavaAttributor.from_model(saved_llava.model, saved_llava.processor, layer=0, kernel_size=2)
    with pytest.raises(InvalidParameterError, match="dtype"):
        LlavaAttributor(model=saved_llava.directory, layer=0, device="cpu", dtype="int8")


def test_default_layer_follows_the_config() -> None:
    from types import SimpleNamespace

    from api_tool.backends.lvlm import default_attribution_layer

    def config(blocks: int, **extra: int) -> SimpleNamespace:
        return SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=blocks), **extra)

    assert default_attribution_layer(config(32)) == 20
    assert default_attribution_layer(config(4)) == 2
    assert default_attribution_layer(config(4, api_attribution_layer=1)) == 1
