"""The one way images are read from files and URLs (the `predict` command, the pipeline, the image processor given a
path, `examples/predict.py`, the data loaders, the demo).

- EXIF orientation is applied, so pixels and boxes refer to the image *as displayed* (as in image viewers, the
  transformers pipeline and COCO annotation tools).
- The pixel depth is kept: 16-bit PNGs (`I;16`, or `I` from older Pillow) reach the image processor as 16-bit and
  are scaled by 255/65535 there, never clipped to 8 bits. [`to_rgb_tensor`] and [`to_rgb8`] use the processor's
  conversion, so every caller sees the same pixels.
- Failures are `ImageReadError` (a `ValueError`) with a one-line message naming the file: not an image, truncated,
  a decompression bomb (more pixels than `PIL.Image.MAX_IMAGE_PIXELS` allows), an unreachable URL.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .download import DownloadError, download, is_url
from .image_processing_align_detr import AlignDetrImageProcessor

__all__ = [
    "ImageReadError", "displayed", "displayed_size", "is_url", "open_image", "read_image", "read_source", "to_rgb8",
    "to_rgb_tensor",
]

_EXIF_ORIENTATION = 0x0112
URL_DEADLINE_S = 120.0  # a whole image download


class ImageReadError(ValueError):
    """An image file or URL that cannot be read; the message names it and says why."""


def read_source(source: str | os.PathLike, timeout: float = URL_DEADLINE_S) -> bytes | Path:
    """A URL's bytes (downloaded now, within `timeout` seconds in all, through the package's one download path) or
    the path of an existing file; raises `ImageReadError` / `FileNotFoundError`."""
    if is_url(source):
        try:  # fetched anew each time (the image at a URL may change), complete or not at all
            return download(str(source), deadline_s=timeout, refresh=True, what="image ").read_bytes()
        except DownloadError as error:
            raise ImageReadError(str(error)) from error
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ImageReadError(f"not a file: {path}")
    return path


def _open(source, name) -> Image.Image:
    """`Image.open` with our one-line errors (the image is opened lazily: only the header is read)."""
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as error:
        raise ImageReadError(
            f"cannot read image {name}: {error} Raise PIL.Image.MAX_IMAGE_PIXELS only for files you trust."
        ) from error
    except UnidentifiedImageError as error:
        raise ImageReadError(f"cannot read image {name}: not an image format Pillow can open.") from error
    except OSError as error:
        raise ImageReadError(f"cannot read image {name}: {error}") from error


def displayed_size(source: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file as displayed (EXIF rotations by 90 degrees swap them); reads the header only."""
    name = str(source)
    with _open(read_source(source), name) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block: Pillow's exif_transpose ignores it too
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def open_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """A file path, an http(s) URL or encoded bytes -> a fully loaded PIL image in displayed orientation, in its own
    mode (8-bit, 16-bit, float, palette, ...; convert with [`to_rgb_tensor`] / [`to_rgb8`])."""
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    data = source if isinstance(source, bytes) else read_source(source)
    with _open(data, name) as image:
        try:
            image.load()
            return displayed(image)
        except Image.DecompressionBombError as error:
            raise ImageReadError(f"cannot read image {name}: {error}") from error
        except (OSError, SyntaxError, ValueError) as error:  # truncated / corrupt data
            raise ImageReadError(f"cannot read image {name}: {error}") from error


def displayed(image: Image.Image) -> Image.Image:
    """The image as displayed: its EXIF orientation applied, its mode (8-bit, 16-bit, ...) kept."""
    return ImageOps.exif_transpose(image)


def read_image(image: Image.Image | str | os.PathLike | bytes) -> Image.Image:
    """What `pipeline(...)` and `examples/predict.py` accept -> a PIL image as displayed, in its own mode: a PIL image,
    a file path, an http(s) URL, encoded bytes or a `data:image/...;base64,` string (as transformers' `load_image`,
    but 16-bit images keep their depth)."""
    if isinstance(image, Image.Image):
        return displayed(image)
    if isinstance(image, str) and image.startswith("data:image/"):
        try:
            data = base64.b64decode(image.split(",", 1)[1], validate=True)
        except (IndexError, ValueError) as error:
            raise ImageReadError(f"cannot read image {image[:40]}...: not valid base64 data.") from error
        return open_image(data, name=image[:40] + "...")
    if isinstance(image, (str, os.PathLike, bytes)):
        return open_image(image)
    raise TypeError(
        f"Unsupported image {type(image).__name__}: pass a PIL image, a file path, an http(s) URL, encoded bytes or a "
        "data:image base64 string."
    )


def to_rgb_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 RGB on the 0-255 scale, converted exactly as `AlignDetrImageProcessor` converts it."""
    return AlignDetrImageProcessor.to_float_rgb(image)[0]


def to_rgb8(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy for drawing and display (16-bit images are scaled, not clipped)."""
    if image.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1"):
        return image.convert("RGB")
    pixels = to_rgb_tensor(image).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")
