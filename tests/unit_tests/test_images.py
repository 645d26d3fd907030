"""load_image: every accepted reference and every rejected input with its specific error."""

from __future__ import annotations

import base64
import io
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from api_tool.errors import (
    EmptyImageError,
    ImageLoadError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidParameterError,
    NotAnImageError,
    RemoteImageNotAllowedError,
    TruncatedImageError,
)
from api_tool.images import encode_image, load_image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def handmade_png(width: int, height: int, bit_depth: int, color_type: int, data: bytes) -> bytes:
    """A PNG written by hand (signature, IHDR, one zlib IDAT of ``data``, IEND), independently of Pillow."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG of ``(H, W)`` gray or ``(H, W, 3)`` RGB uint16 samples (filter type 0 on every row)."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[row].astype(">u2").tobytes() for row in range(height))
    return handmade_png(width, height, 16, 0 if samples.ndim == 2 else 2, rows)


def tiff_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")
    return buffer.getvalue()


def gray_of(image: Image.Image) -> np.ndarray:
    """The one channel of a gray RGB image (asserting the three are equal)."""
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    return pixels[..., 0]


RAMP16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
"""Every 16-bit value once; row r holds r * 256 .. r * 256 + 255, whose high byte (v >> 8) is r."""


@pytest.fixture
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8))


def test_all_reference_kinds_give_the_same_pixels(picture: Image.Image, tmp_path: Path) -> None:
    data = png_bytes(picture)
    path = tmp_path / "p.png"
    path.write_bytes(data)
    encoded = base64.b64encode(data).decode()
    refs = [picture, data, str(path), path, encoded, f"data:image/png;base64,{encoded}"]
    for ref in refs:
        loaded = load_image(ref)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(picture))


def test_modes_are_converted_to_rgb() -> None:
    rgba = Image.new("RGBA", (3, 3), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert load_image(Image.new("L", (2, 2), 7)).getpixel((1, 1)) == (7, 7, 7)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (10, 30)


@pytest.mark.parametrize(
    ("ref", "error", "message"),
    [
        ("/no/such/file.png", ImageNotFoundError, "not found"),
        ("", ImageNotFoundError, "empty"),
        (b"", NotAnImageError, "empty"),
        (b"this is certainly not an image file at all", NotAnImageError, "not an image"),
        ("https://example.com/cat.png", RemoteImageNotAllowedError, "allow_remote"),
        ("data:image/png;base64,@@@@", NotAnImageError, "base64"),
        (12345, NotAnImageError, "int"),
    ],
)
def test_bad_references(ref: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_image(ref)  # type: ignore[arg-type]


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageNotFoundError, match="not a file"):
        load_image(tmp_path)


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(NotAnImageError, match=r"notes\.png"):
        load_image(path)


def test_truncated_file(picture: Image.Image, tmp_path: Path) -> None:
    big = picture.resize((200, 200))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(TruncatedImageError, match="truncated"):
        load_image(path)


def test_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 MP, a few KB on disk
    assert path.stat().st_size < 100_000
    with pytest.raises(ImageTooLargeError, match="72,000,000 pixels"):
        load_image(path)
    with pytest.raises(ImageTooLargeError):
        load_image(Image.new("RGB", (50, 50)), max_pixels=100)


def test_zero_size_image() -> None:
    with pytest.raises(EmptyImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


def test_errors_are_value_errors() -> None:
    assert issubclass(ImageLoadError, ValueError)


def test_encode_image_round_trip_and_downscale(picture: Image.Image) -> None:
    data, mime = encode_image(picture)
    assert mime == "image/png"
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(picture))
    small, mime = encode_image(picture.resize((400, 200)), format="jpeg", max_side=100)
    assert mime == "image/jpeg" and load_image(small).size == (100, 50)
    with pytest.raises(InvalidParameterError):
        encode_image(picture, format="GIF")


def test_long_non_path_strings_give_image_errors_not_os_errors() -> None:
    with pytest.raises(ImageLoadError):
        load_image("A" * 300)
    with pytest.raises(ImageLoadError):
        load_image("x" * 3000 + ".png")


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_gray_keeps_its_tones(mode: str) -> None:
    """A 16-bit gray ramp maps to its high byte (v >> 8), as Pillow reads 16-bit colour PNGs; not all white."""
    expected = (RAMP16 >> 8).astype(np.uint8)
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    image = Image.frombytes(mode, (256, 256), RAMP16.astype(dtype).tobytes())
    np.testing.assert_array_equal(gray_of(load_image(image)), expected)
    file_data = png16(RAMP16) if mode == "I;16" else tiff_bytes(image)
    decoded = Image.open(io.BytesIO(file_data))
    assert decoded.mode == mode if mode != "I;16L" else decoded.mode == "I;16"  # TIFF stores I;16L as I;16
    np.testing.assert_array_equal(gray_of(load_image(file_data)), expected)


def test_16_bit_gray_and_16_bit_rgb_pngs_load_alike() -> None:
    """Pillow reads a 48-bit RGB PNG as 8-bit RGB, keeping the high byte; the gray PNG now agrees."""
    rgb = np.stack([RAMP16, 65535 - RAMP16, RAMP16], axis=-1)
    loaded = np.asarray(load_image(png16(rgb)))
    np.testing.assert_array_equal(loaded, (rgb >> 8).astype(np.uint8))
    np.testing.assert_array_equal(gray_of(load_image(png16(RAMP16))), loaded[..., 0])


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.arange(256), np.arange(256)),  # within 0..255: kept
        (RAMP16.ravel(), RAMP16.ravel() >> 8),  # within 0..65535: 16-bit, the high byte
        (np.arange(256) * 1000 - 5, np.arange(256)),  # negative: min-max, round((v - min) * 255 / (max - min))
        (np.arange(256) * 300_000, np.arange(256)),  # above 65535: min-max
    ],
)
def test_32_bit_integer_images_are_scaled_by_their_range(values: np.ndarray, expected: np.ndarray) -> None:
    image = Image.fromarray(values.astype(np.int32).reshape(-1, 256))
    assert image.mode == "I"
    for ref in (image, tiff_bytes(image)):
        np.testing.assert_array_equal(gray_of(load_image(ref)).ravel(), expected.astype(np.uint8))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.arange(256) / 255, np.arange(256)),  # within [0, 1]: round(v * 255)
        (np.arange(256) * 10.0 - 1000.0, np.arange(256)),  # any other range: min-max
        (np.arange(256) * 0.5, np.arange(256)),  # 0..127.5 is not [0, 1]: min-max
    ],
)
def test_float_images_are_scaled_by_their_range(values: np.ndarray, expected: np.ndarray) -> None:
    image = Image.fromarray(values.astype(np.float32).reshape(-1, 256))
    assert image.mode == "F"
    for ref in (image, tiff_bytes(image)):
        np.testing.assert_array_equal(gray_of(load_image(ref)).ravel(), expected.astype(np.uint8))


def test_float_images_with_non_finite_values() -> None:
    """NaN becomes 0 and infinities clip; the finite values alone set the range."""
    values = np.array([[np.nan, -np.inf, np.inf, 0.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(gray_of(load_image(Image.fromarray(values))), [[0, 0, 255, 0, 128, 255]])
    values = np.array([[np.nan, -np.inf, np.inf, -2.0, 0.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(gray_of(load_image(Image.fromarray(values))), [[0, 0, 255, 0, 128, 255]])


@pytest.mark.parametrize("values", [np.full((2, 3), 70_000, np.int32), np.full((2, 3), 7.5, np.float32)])
def test_constant_images_outside_the_direct_ranges_are_black(values: np.ndarray) -> None:
    np.testing.assert_array_equal(gray_of(load_image(Image.fromarray(values))), np.zeros((2, 3), np.uint8))


def large_png_header(width: int, height: int) -> bytes:
    """A 1-bit gray PNG declaring ``width x height`` pixels, with only one row of data (never decoded here)."""
    return handmade_png(width, height, 1, 0, b"\x00" * (1 + (width + 7) // 8))


@pytest.mark.parametrize(
    ("size", "pixels"),
    [
        ((9000, 8000), "9000x8000 = 72,000,000 pixels"),  # over max_pixels, under Pillow's warning limit
        ((10000, 10000), "10000x10000 = 100,000,000 pixels"),  # over Pillow's warning limit (89.5 MP)
        ((14000, 13000), "182,000,000 pixels"),  # over Pillow's error limit (179 MP): Pillow refuses first
    ],
)
def test_too_large_images_give_one_error_and_no_warning(size: tuple[int, int], pixels: str, tmp_path: Path) -> None:
    data = large_png_header(*size)
    path = tmp_path / "large.png"
    path.write_bytes(data)
    for ref in (data, path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ImageTooLargeError, match=f"{pixels}, over the limit of 64,000,000"):
                load_image(ref)
        assert [str(warning.message) for warning in caught] == []


def test_pillow_refusal_above_a_raised_max_pixels_names_pillows_limit() -> None:
    data = large_png_header(14000, 13000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageTooLargeError, match=r"MAX_IMAGE_PIXELS.*182000000 pixels"):
            load_image(data, max_pixels=10**9)
    assert caught == []


def test_an_image_allowed_over_pillows_limit_loads_without_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """With max_pixels raised over Pillow's limit (lowered here to 1000 pixels, so that the image is small),
    neither opening nor decoding warns: TIFF checks the size again while decoding."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    image = Image.fromarray(np.arange(1200, dtype=np.uint8).reshape(30, 40) % 251)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_image(tiff_bytes(image), max_pixels=1500)
    assert [str(warning.message) for warning in caught] == []
    np.testing.assert_array_equal(gray_of(loaded), np.asarray(image))
    assert warnings.filters == filters  # no filter left behind


def test_loading_from_many_threads_leaves_no_warning_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = tiff_bytes(Image.new("L", (40, 30), 9))
    filters = list(warnings.filters)
    errors: list[BaseException] = []

    def load_many() -> None:
        try:
            for _ in range(100):
                assert load_image(data, max_pixels=1500).getpixel((0, 0)) == (9, 9, 9)
                with pytest.raises(ImageTooLargeError, match="40x30"):
                    load_image(data, max_pixels=1100)
        except BaseException as exc:  # checked in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=load_many) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert warnings.filters == filters
