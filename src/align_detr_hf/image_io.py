"""The one way images are read from files and URLs (the `predict` command, the pipeline, the image processor given a
path, `examples/predict.py`, the data loaders, the demo), and turned into float RGB pixels ([`to_float_rgb`], step 1
of both image processors).

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
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .download import DownloadError, download, is_url

__all__ = [
    "ImageReadError", "as_chw_array", "displayed", "displayed_size", "is_url", "open_image", "read_image",
    "read_source", "to_float_rgb", "to_float_tensor", "to_rgb8", "to_rgb_tensor",
]

_EXIF_ORIENTATION = 0x0112
URL_DEADLINE_S = 120.0  # a whole image download
_PIL_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")
CHANNELS_FIRST = ("channels_first", "first")  # the spellings of `input_data_format`
CHANNELS_LAST = ("channels_last", "last")


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
    return to_float_rgb(image)[0]


def to_rgb8(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy for drawing and display (16-bit images are scaled, not clipped)."""
    if image.mode in ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr", "1"):
        return image.convert("RGB")
    pixels = to_rgb_tensor(image).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def as_chw_array(image: Any, input_data_format: Any = None, do_convert_rgb: bool = True) -> tuple[np.ndarray, str]:
    """
    One raw image -> `(C, H, W)` NumPy array with 3 channels and its pixel kind: "uint8" (0-255), "uint16" (0-65535)
    or "float" (checked to be finite and in [0, 1]). Step 1 of the image processors (both backends).
    """
    if isinstance(image, Image.Image):
        image, input_data_format = _pil_to_array(image, do_convert_rgb), "channels_last"
    elif isinstance(image, torch.Tensor):
        tensor = image.detach()
        image = (tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor).cpu().numpy()
    elif not isinstance(image, np.ndarray):
        raise ValueError(
            f"Unsupported image type {type(image).__name__}: pass a PIL.Image.Image, a numpy array (HWC) or a "
            "torch tensor (CHW), or a list of them."
        )
    kind = _pixel_kind(image.dtype)
    image = _to_rgb_channels(_to_channels_first(image, input_data_format), do_convert_rgb)
    if kind == "float":
        _check_unit_range(image)
    return image, kind


def _pil_to_array(image: Any, do_convert_rgb: bool) -> np.ndarray:
    """A PIL image -> `(H, W[, C])` array at its own depth: 16-bit and float modes kept, 32-bit "I" read as 16-bit,
    other modes converted to RGB (alpha dropped, as cv2/mmcv do) unless `do_convert_rgb` is off."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Got a zero-size PIL image ({image.width}x{image.height}).")
    if image.mode == "I":  # 32-bit ints; older Pillow opens 16-bit PNGs in this mode
        array = np.asarray(image)
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise ValueError(
                f"PIL mode 'I' image with values in [{low}, {high}]: read as 16-bit, values must lie in "
                "[0, 65535]; convert it to 8-bit ('L'/'RGB') or 16-bit yourself first."
            )
        return array.astype(np.uint16)
    if image.mode in _PIL_MODES_16BIT or image.mode in ("F", "RGB") or not do_convert_rgb:
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))  # L, LA, P, RGBA, CMYK, ...


def _pixel_kind(dtype: np.dtype) -> str:
    """"uint8", "uint16" or "float": the pixel scales the processors accept."""
    if dtype == np.uint8:
        return "uint8"
    if dtype == np.uint16:
        return "uint16"
    if np.issubdtype(dtype, np.floating):
        return "float"
    raise ValueError(f"Unsupported image dtype {dtype}: use uint8 (0-255), uint16 (0-65535) or float in [0, 1].")


def _to_channels_first(image: np.ndarray, input_data_format: Any) -> np.ndarray:
    """A 2-d (grayscale) or 3-d image -> `(C, H, W)`; the channel axis is the one `input_data_format` names, or the
    only axis of size 1, 3 or 4 among the first and the last (both: refused as ambiguous)."""
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3:
        if _is_channels_last(image.shape, input_data_format):
            image = image.transpose(2, 0, 1)
    else:
        raise ValueError(f"An image must be 2-d (grayscale) or 3-d (with channels), got shape {tuple(image.shape)}.")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"Got a zero-size image of shape {tuple(image.shape)} (C, H, W).")
    return image


def _is_channels_last(shape: tuple[int, ...], input_data_format: Any) -> bool:
    hwc, chw = shape[-1] in (1, 3, 4), shape[0] in (1, 3, 4)
    fmt = None if input_data_format is None else str(getattr(input_data_format, "value", input_data_format))
    if fmt is None:
        if hwc and chw:  # e.g. (3, 5, 3): guessing would silently swap height and channels
            raise ValueError(
                f"Ambiguous image shape {tuple(shape)}: both the first and the last axis could be the channels. "
                "Pass input_data_format='channels_first' (C, H, W) or 'channels_last' (H, W, C)."
            )
        if not (hwc or chw):
            raise ValueError(
                f"Cannot find the channel axis of an image of shape {tuple(shape)}: expected 1, 3 or 4 channels on "
                "the first or the last axis."
            )
        return hwc
    if fmt not in CHANNELS_FIRST + CHANNELS_LAST:
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}.")
    is_hwc = fmt in CHANNELS_LAST
    if not (hwc if is_hwc else chw):
        raise ValueError(
            f"Image of shape {tuple(shape)} has no 1, 3 or 4 channels on the {'last' if is_hwc else 'first'} axis "
            f"(input_data_format={fmt!r})."
        )
    return is_hwc


def _to_rgb_channels(image: np.ndarray, do_convert_rgb: bool) -> np.ndarray:
    """`(C, H, W)` -> `(3, H, W)`: grayscale repeated, a fourth (alpha) channel dropped."""
    if image.shape[0] == 3:
        return image
    if not do_convert_rgb:
        raise ValueError(
            f"do_convert_rgb=False, but the image has {image.shape[0]} channel(s); the model takes 3 (RGB). "
            "Leave do_convert_rgb on to convert grayscale (repeated) and RGBA (alpha dropped) images."
        )
    return np.broadcast_to(image, (3, *image.shape[1:])) if image.shape[0] == 1 else image[:3]


def _check_unit_range(image: np.ndarray) -> None:
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("Float image contains NaN or infinite values.")
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Float images must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]. "
            "Pass 0-255 data as uint8, or divide by 255 first."
        )


# Factor from each pixel kind to the 0-255 scale.
TO_255 = {"uint8": None, "uint16": 255.0 / 65535.0, "float": 255.0}


def to_float_tensor(array: np.ndarray, kind: str, device: torch.device | str | None = None) -> torch.Tensor:
    """An [`as_chw_array`] result -> float32 tensor on the 0-255 scale (on `device` when given)."""
    if kind == "uint16":  # torch has limited uint16 support; int32 is exact
        array = array.astype(np.int32)
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # e.g. a view of a PIL image: torch would warn
        array = array.copy()
    tensor = torch.from_numpy(array)
    if device is not None:
        tensor = tensor.to(device)  # before the float conversion: moves 1 byte per uint8 pixel, not 4
    tensor = tensor.to(torch.float32)
    if TO_255[kind] is not None:
        tensor = tensor * TO_255[kind]
    return tensor.contiguous()


def to_float_rgb(image: Any, input_data_format: str | None = None) -> tuple[torch.Tensor, bool]:
    """One raw image (PIL, NumPy HWC/CHW, torch CHW) -> float32 `(3, H, W)` RGB tensor on the 0-255 scale, plus
    whether the source was uint8; what both image processors and the data loaders start from."""
    array, kind = as_chw_array(image, input_data_format)
    return to_float_tensor(array, kind), kind == "uint8"
