"""Letterboxing on the model's device: upload uint8 pixels once, resize and pad there.

``LetterboxInput.letterbox`` (the reference) resizes each image with Pillow's bicubic filter on the CPU
and pastes it onto a square canvas of the mean colour. Here the same steps run on a batch of tensors on
any device: ``resize_like_pillow`` does Pillow's two passes (horizontal, then vertical) with torch's
antialiased bicubic kernel (``a = -0.5``, Pillow's), rounding and clipping to uint8 after each pass as
Pillow does. Pillow computes its weights in 22-bit fixed point, torch in float32, so a value whose exact
result lies within about 1e-4 of a rounding boundary may round the other way: the letterboxed pixels
equal Pillow's within one uint8 level (1/255 before normalisation), and in practice on under 0.1 % of
the values (``tests/unit_tests/test_clip_fast_paths.py``).

``decode_images`` loads several references on worker threads (Pillow releases the GIL while decoding);
``upload_images`` turns decoded PIL images into device tensors with one pinned host buffer and one
non-blocking copy per image size; the copies into the pinned buffer run on worker threads.

Example:
    >>> import torch
    >>> from api_tool.geometry import Letterbox
    >>> pixels = torch.full((1, 3, 20, 40), 200, dtype=torch.uint8)
    >>> boxed = letterbox_pixels(pixels, Letterbox.fit((40, 20), side=16), fill=(0, 0, 0))
    >>> boxed.shape, int(boxed[0, 0, 0, 0]), int(boxed[0, 8, 8, 0])
    (torch.Size([1, 16, 16, 3]), 0, 200)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from api_tool.errors import InvalidParameterError
from api_tool.geometry import Letterbox
from api_tool.images import ImageRef, load_image

__all__ = ["check_pixel_batch", "decode_images", "letterbox_pixels", "resize_like_pillow", "upload_images"]

RESIZE_CHUNK = 8
"""Images resized per step: bounds the float32 temporaries (about 7 MiB per 640x480 image)."""

MAX_COPY_WORKERS = 8


def resize_like_pillow(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 (or integer-valued float) pixels resized to ``size = (width, height)`` as
    ``Image.resize(size, Image.Resampling.BICUBIC)`` does: float32 with integer values in [0, 255].

    Example:
        >>> flat = torch.full((1, 3, 8, 8), 7, dtype=torch.uint8)
        >>> resize_like_pillow(flat, (4, 2)).unique().tolist()
        [7.0]
    """
    width, height = size
    values = pixels.float()
    if values.shape[-1] != width:
        values = F.interpolate(values, size=(values.shape[-2], width), mode="bicubic", antialias=True)
        values = values.round_().clamp_(0, 255)
    if values.shape[-2] != height:
        values = F.interpolate(values, size=(height, width), mode="bicubic", antialias=True)
        values = values.round_().clamp_(0, 255)
    return values


def letterbox_pixels(pixels: torch.Tensor, letterbox: Letterbox, fill: tuple[int, int, int]) -> torch.Tensor:
    """``(B, 3, H, W)`` uint8 images of ``letterbox.image_size`` letterboxed onto the square input:
    ``(B, S, S, 3)`` uint8 on the pixels' device, what ``LetterboxInput.letterbox`` gives for each image
    (within one uint8 level, see the module docstring).

    Example:
        >>> from api_tool.geometry import Letterbox
        >>> black = torch.zeros(2, 3, 10, 30, dtype=torch.uint8)
        >>> boxed = letterbox_pixels(black, Letterbox.fit((30, 10), 12), (9, 9, 9))
        >>> boxed.shape, int(boxed[1, 0, 0, 2])
        (torch.Size([2, 12, 12, 3]), 9)
    """
    check_pixel_batch(pixels)
    if (pixels.shape[-1], pixels.shape[-2]) != letterbox.image_size:
        raise InvalidParameterError(
            f"the pixels are {pixels.shape[-1]}x{pixels.shape[-2]} but the letterbox is for "
            f"{letterbox.image_size[0]}x{letterbox.image_size[1]} images"
        )
    side = letterbox.side
    (x0, y0), (width, height) = letterbox.offset, letterbox.scaled_size
    canvas = torch.tensor(fill, dtype=torch.uint8, device=pixels.device).expand(pixels.shape[0], side, side, 3)
    canvas = canvas.contiguous()
    for start in range(0, pixels.shape[0], RESIZE_CHUNK):
        resized = resize_like_pillow(pixels[start : start + RESIZE_CHUNK], (width, height))
        canvas[start : start + RESIZE_CHUNK, y0 : y0 + height, x0 : x0 + width] = resized.permute(0, 2, 3, 1).to(
            torch.uint8
        )
    return canvas


def check_pixel_batch(pixels: object) -> None:
    """Refuse anything but a ``(B, 3, H, W)`` uint8 tensor with ``B, H, W >= 1``, naming what is wrong.

    Example:
        >>> check_pixel_batch(torch.zeros(1, 3, 4, 4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        api_tool.errors.InvalidParameterError: pixels must be uint8 RGB values in [0, 255] ... got torch.float32
    """
    if not isinstance(pixels, torch.Tensor):
        raise InvalidParameterError(f"pixels must be a torch.Tensor of shape (B, 3, H, W), got {type(pixels).__name__}")
    if pixels.dtype != torch.uint8:
        raise InvalidParameterError(
            f"pixels must be uint8 RGB values in [0, 255] (torchvision's decode_image gives them), got {pixels.dtype}"
        )
    if pixels.dim() != 4 or pixels.shape[1] != 3 or min(pixels.shape) == 0:
        raise InvalidParameterError(
            f"pixels must have shape (B, 3, H, W) with B, H, W >= 1 (channels first, RGB), got {tuple(pixels.shape)}"
        )


def decode_images(images: Sequence[ImageRef]) -> list[Image.Image]:
    """``api_tool.images.load_image`` of each reference, in order, on worker threads when there are several
    (decoding files, and the upright copy ``load_image`` makes of a PIL image).

    Example:
        >>> from PIL import Image
        >>> [image.mode for image in decode_images([Image.new("L", (2, 2)), Image.new("RGB", (3, 3))])]
        ['RGB', 'RGB']
    """
    # each object once: two threads loading one lazily opened PIL image would share its file pointer
    distinct = list({id(image): image for image in images}.values())
    workers = min(MAX_COPY_WORKERS, len(distinct), os.cpu_count() or 1)
    if workers < 2:
        loaded = [load_image(image) for image in distinct]
    else:
        with ThreadPoolExecutor(workers) as pool:
            loaded = list(pool.map(load_image, distinct))
    by_id = {id(image): result for image, result in zip(distinct, loaded)}
    return [by_id[id(image)] for image in images]


def upload_images(images: Sequence[Image.Image], device: torch.device) -> dict[tuple[int, int], torch.Tensor]:
    """RGB PIL images as ``(B, 3, H, W)`` uint8 tensors on ``device``, one per image size ``(width,
    height)``, with the images of each size in their order in ``images``; each size is one copy from a
    pinned host buffer (non-blocking on CUDA).

    Example:
        >>> from PIL import Image
        >>> batches = upload_images([Image.new("RGB", (4, 2))] * 3, torch.device("cpu"))
        >>> batches[(4, 2)].shape
        torch.Size([3, 3, 2, 4])
    """
    by_size: dict[tuple[int, int], list[Image.Image]] = {}
    for image in images:
        by_size.setdefault(image.size, []).append(image if image.mode == "RGB" else image.convert("RGB"))
    pin = device.type == "cuda"
    uploaded = {}
    for (width, height), group in by_size.items():
        host = torch.empty((len(group), height, width, 3), dtype=torch.uint8, pin_memory=pin)
        host_array = host.numpy()

        def copy_in(index: int, group: list[Image.Image] = group, host_array: np.ndarray = host_array) -> None:
            host_array[index] = np.asarray(group[index])

        workers = min(MAX_COPY_WORKERS, len(group), os.cpu_count() or 1)
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(copy_in, range(len(group))))
        else:
            for index in range(len(group)):
                copy_in(index)
        uploaded[(width, height)] = host.to(device, non_blocking=pin).permute(0, 3, 1, 2)
    return uploaded
