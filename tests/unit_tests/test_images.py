"""load_image: every accepted reference and every rejected input with its specific error."""

from __future__ import annotations

import base64
import io
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
