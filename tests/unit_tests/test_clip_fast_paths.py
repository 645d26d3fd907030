"""The fast CLIP paths equal the plain ones (issue 13): letterboxing on the device against Pillow's, the
batched merge and the device upsampling against the NumPy / Pillow references, the tensor entry point
against the PIL one, batch against loop, and whole maps fast against plain.

Pillow resizes with 22-bit fixed-point weights and torch with float32 ones, so a resized pixel may round
one uint8 level apart; whole maps are compared bit-for-band only on images the letterbox does not resize
(only pads), where both paths see the same pixels, and resized ones are held to the one-level bound."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from api_tool.backends.batched_maps import (
    combine_maps_batched,
    pillow_resample_weights,
    upsample_batched,
)
from api_tool.backends.clip import ClipAttributor, default_projection_dtype
from api_tool.backends.device_letterbox import letterbox_pixels, resize_like_pillow, upload_images
from api_tool.backends.graphed_pass import GraphedPass
from api_tool.backends.towers.base import LetterboxInput
from api_tool.errors import InvalidParameterError, InvalidQueryError
from api_tool.geometry import Letterbox, upsample_grid
from api_tool.maps import COMBINE_MODES, combine_maps
from tests import tiny_towers
from tests.conftest import TINY_CLIP_MAP_TERMS as MAP_TERMS
from tests.conftest import build_tiny_clip
from tests.tolerances import assert_sums_close

SQUARE = LetterboxInput(64, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
UNRESIZED_SIZES = [(64, 64), (64, 40), (30, 64)]
"""Image sizes the 64-pixel letterbox only pads: the device and Pillow letterboxes give the same pixels."""


def noise_picture(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)


def fast_and_plain(model: torch.nn.Module, tokenizer: object) -> tuple[ClipAttributor, ClipAttributor]:
    options = {"model": model, "tokenizer": tokenizer, "device": "cpu", "cache_size": 0}
    return ClipAttributor("tiny", preprocess_on_device=True, **options), ClipAttributor("tiny", **options)


@pytest.mark.parametrize(
    "size", [(640, 480), (100, 37), (37, 100), (1000, 999), (20, 12), (64, 64), (64, 40), (3, 300)]
)
def test_device_letterbox_is_pillows_within_one_level(size: tuple[int, int]) -> None:
    images = [noise_picture(size, seed) for seed in range(2)]
    letterbox = Letterbox.fit(size, SQUARE.side)
    boxed = letterbox_pixels(as_tensor(images), letterbox, SQUARE.fill).numpy().astype(int)
    reference = np.stack([SQUARE.letterbox(image)[0] for image in images]).astype(int)
    difference = np.abs(boxed - reference)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    x0, y0, x1, y1 = (int(v) for v in letterbox.content_box)
    padding = np.ones(reference.shape[1:3], dtype=bool)
    padding[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(boxed[:, padding], reference[:, padding])  # the mean-colour fill, exactly
    if letterbox.scaled_size == size:
        np.testing.assert_array_equal(boxed, reference)


def test_resize_keeps_an_axis_it_does_not_change_and_refuses_bad_pixels() -> None:
    pixels = as_tensor([noise_picture((16, 8), 3)])
    np.testing.assert_array_equal(resize_like_pillow(pixels, (16, 8)).numpy(), pixels.float().numpy())
    with pytest.raises(InvalidParameterError, match="uint8"):
        letterbox_pixels(pixels.float(), Letterbox.fit((16, 8), 8), (0, 0, 0))
    with pytest.raises(InvalidParameterError, match=r"\(B, 3, H, W\)"):
        letterbox_pixels(pixels[0], Letterbox.fit((16, 8), 8), (0, 0, 0))
    with pytest.raises(InvalidParameterError, match="letterbox is for 9x8"):
        letterbox_pixels(pixels, Letterbox.fit((9, 8), 8), (0, 0, 0))


def test_upload_groups_images_by_size_in_order() -> None:
    images = [noise_picture(size, seed) for seed, size in enumerate([(5, 4), (3, 7), (5, 4), (5, 4)])]
    images[2] = images[2].convert("L")
    batches = upload_images(images, torch.device("cpu"))
    assert list(batches) == [(5, 4), (3, 7)]
    expected = [images[0], images[2].convert("RGB"), images[3]]
    np.testing.assert_array_equal(batches[(5, 4)].numpy(), as_tensor(expected).numpy())
    np.testing.assert_array_equal(batches[(3, 7)].numpy(), as_tensor([images[1]]).numpy())


@pytest.mark.parametrize("combine", COMBINE_MODES)
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_batched_merge_equals_the_numpy_reference(combine: str, kernel_size: int) -> None:
    rng = np.random.default_rng(kernel_size)
    cls, comp = rng.normal(size=(2, 5, 6, 7))
    cls[1] = 4.0  # a constant map: the zero-spread branches
    if combine != "paper":  # soft-OR with an all-ones map is all ones: only rounding left to rescale
        comp[2] = -1.0
    got = combine_maps_batched(
        torch.from_numpy(cls), torch.from_numpy(comp), combine=combine, enhance_coe=10.0, kernel_size=kernel_size
    )
    for index in range(len(cls)):
        expected = combine_maps(cls[index], comp[index], combine=combine, enhance_coe=10.0, kernel_size=kernel_size)
        assert_sums_close(got[index].numpy(), expected, n_terms=cls[index].size, dtype=np.float64)


def test_batched_merge_checks_its_options() -> None:
    maps = torch.zeros(1, 2, 2, dtype=torch.float64)
    with pytest.raises(InvalidParameterError, match="Psi_comp"):
        combine_maps_batched(maps, None, combine="paper")
    with pytest.raises(InvalidParameterError, match="odd"):
        combine_maps_batched(maps, maps, kernel_size=2)
    single = combine_maps_batched(torch.ones(2, 1, 1, dtype=torch.float64), None, combine="cls", kernel_size=3)
    np.testing.assert_array_equal(single.numpy(), [combine_maps(np.ones((1, 1)), None, combine="cls")] * 2)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic", "lanczos"])
@pytest.mark.parametrize(
    ("grid_box", "size"),
    [((0.0, 3.5, 24.0, 20.5), (640, 480)), ((0.0, 0.0, 6.0, 6.0), (5, 3)), ((1.25, 0, 4.75, 6), (70, 90))],
)
def test_device_upsampling_equals_pillows(resample: str, grid_box: tuple[float, ...], size: tuple[int, int]) -> None:
    rows = int(np.ceil(max(grid_box[2], grid_box[3])))
    masks = np.random.default_rng(1).random((2, rows, rows))
    got = upsample_batched(torch.from_numpy(masks), grid_box, size, resample).numpy()  # type: ignore[arg-type]
    for mask, pixels in zip(masks, got):
        assert_sums_close(pixels, upsample_grid(mask, grid_box, size, resample), n_terms=64)  # type: ignore[arg-type]


def test_resample_weights_are_normalised_and_identity_at_scale_one() -> None:
    np.testing.assert_allclose(pillow_resample_weights(7, 0.0, 7.0, 7, "lanczos"), np.eye(7), atol=1e-15)
    weights = pillow_resample_weights(9, 1.5, 7.25, 40, "bicubic")
    np.testing.assert_allclose(weights.sum(axis=1), np.ones(40), atol=1e-12)
    with pytest.raises(InvalidParameterError, match="nearest"):
        pillow_resample_weights(4, 0.0, 4.0, 8, "nearest")


def test_tensor_entry_equals_the_pil_entry_and_batch_equals_loop(clip_tokenizer: object) -> None:
    fast, _ = fast_and_plain(build_tiny_clip(), clip_tokenizer)
    images = [noise_picture((90, 40), seed) for seed in range(3)]
    queries = ["a red circle", "the blue square", "where is the cat?"]
    from_tensors = fast.attribute_tensors(as_tensor(images), queries)
    from_pil = fast.attribute_batch(images, queries)
    mixed = [*images, noise_picture((40, 70), 9)]
    batched = fast.attribute_batch(mixed, [*queries, "a dog"])
    looped = [fast.attribute(image, query) for image, query in zip(mixed, [*queries, "a dog"])]
    for got, want in [*zip(from_tensors, from_pil), *zip(batched, looped)]:
        assert_sums_close(got.cls, want.cls, n_terms=MAP_TERMS)
        assert_sums_close(got.comp, want.comp, n_terms=MAP_TERMS)
        assert got.grid_box == want.grid_box and got.image_size == want.image_size
        np.testing.assert_allclose(got.mask, combine_maps(got.cls, got.comp), atol=1e-12)


@pytest.mark.parametrize("tower", ["open_clip_cls", "timm_siglip"])
def test_whole_maps_fast_equal_plain_on_unresized_images(tower: str, clip_tokenizer: object) -> None:
    if tower == "timm_siglip":
        model = tiny_towers.open_clip_model(tiny_towers.SIGLIP_NAME)
        tokenizer = open_clip.get_tokenizer(tiny_towers.SIGLIP_NAME)
    else:
        model, tokenizer = build_tiny_clip(), clip_tokenizer
    fast, plain = fast_and_plain(model, tokenizer)
    images = [noise_picture(size, seed) for seed, size in enumerate(UNRESIZED_SIZES)]
    queries = ["a red circle", "the green field", "a dog"]
    for got, want in zip(fast.attribute_batch(images, queries), plain.attribute_batch(images, queries)):
        assert_sums_close(got.cls, want.cls, n_terms=MAP_TERMS)
        assert_sums_close(got.comp, want.comp, n_terms=MAP_TERMS)


def test_demo_clip_fast_path_on_a_resized_scene_stays_within_one_level() -> None:
    fast = ClipAttributor("demo", device="cpu", cache_size=0, preprocess_on_device=True)
    plain = ClipAttributor("demo", device="cpu", cache_size=0, model=fast.model, tokenizer=fast.tokenizer)
    image = noise_picture((fast.side, fast.side), 4)
    query = "where is the red circle?"
    assert_sums_close(fast.attribute(image, query).cls, plain.attribute(image, query).cls, n_terms=4 * MAP_TERMS)
    scene = noise_picture((400, 300), 5)
    pixels = upload_images([scene], fast.device)[(400, 300)]
    boxed = letterbox_pixels(pixels, Letterbox.fit(scene.size, fast.side), fast.tower.input.fill)  # type: ignore[union-attr]
    assert int((boxed[0].numpy().astype(int) - fast.letterbox(scene)[0].astype(int)).__abs__().max()) <= 1


def test_pixel_masks_equal_upsample(tiny_clip_attributor: ClipAttributor) -> None:
    images = [noise_picture((90, 40), 1), noise_picture((90, 40), 2), noise_picture((33, 50), 3)]
    maps = tiny_clip_attributor.attribute_batch(images, ["a cat", "a dog", "a red circle"])
    for amap, pixels in zip(maps, tiny_clip_attributor.pixel_masks(maps, resample="bicubic")):
        assert_sums_close(pixels.numpy(), amap.upsample(resample="bicubic"), n_terms=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_projection_stays_near_float32(dtype: torch.dtype, clip_tokenizer: object) -> None:
    model = build_tiny_clip()
    options = {"model": model, "tokenizer": clip_tokenizer, "device": "cpu", "cache_size": 0}
    exact = ClipAttributor("tiny", **options)
    half = ClipAttributor("tiny", projection_dtype=dtype, **options)
    image, query = noise_picture((90, 40), 7), "the blue square"
    got, want = half.attribute(image, query), exact.attribute(image, query)
    # sum_tolerance's band in the half dtype (numpy has no bfloat16): the projection's 48-term sums, then the
    # 32-term product with the text embedding
    band = (48 + 32) * float(torch.finfo(dtype).eps) * float(np.abs(want.cls).max())
    np.testing.assert_allclose(got.cls, want.cls, rtol=0, atol=band)
    assert not np.array_equal(got.cls, want.cls)  # the projection did run in half precision


def test_default_projection_dtype_and_bad_tensor_calls(tiny_clip_attributor: ClipAttributor) -> None:
    assert default_projection_dtype(torch.float16, torch.device("cuda")) == torch.float16
    assert default_projection_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert default_projection_dtype(torch.float64, torch.device("cpu")) == torch.float64
    assert tiny_clip_attributor.projection_dtype == torch.float32 and not tiny_clip_attributor.preprocess_on_device
    with pytest.raises(InvalidQueryError, match="2 images but 1 queries"):
        tiny_clip_attributor.attribute_tensors(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a cat"])
    with pytest.raises(InvalidParameterError, match="uint8"):
        tiny_clip_attributor.attribute_tensors(torch.zeros(1, 3, 8, 8), ["a cat"])


def test_graphed_pass_runs_eagerly_off_cuda_and_above_its_batch(clip_tokenizer: object) -> None:
    calls: list[tuple[int, ...]] = []

    def doubled(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x * 2

    graphed = GraphedPass(doubled, max_batch=2)
    np.testing.assert_array_equal(graphed(torch.ones(3, 2)).numpy(), np.full((3, 2), 2.0))
    assert calls == [(3, 2)] and graphed.enabled and graphed.failure is None
    options = {"model": build_tiny_clip(), "tokenizer": clip_tokenizer, "device": "cpu", "cache_size": 0}
    image = noise_picture((90, 40), 8)
    with_graphs = ClipAttributor("tiny", **options).attribute(image, "a cat")
    without = ClipAttributor("tiny", cuda_graphs=False, **options).attribute(image, "a cat")
    assert_sums_close(with_graphs.cls, without.cls, n_terms=MAP_TERMS)  # both eager on the CPU
