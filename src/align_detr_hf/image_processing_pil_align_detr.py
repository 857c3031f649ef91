"""Align-DETR's image processor, PIL/NumPy backend (transformers' `backend="pil"`): the same documented steps as the
tensor backend, in NumPy, returning NumPy arrays for `return_tensors=None` / `"np"`."""

from __future__ import annotations

import numpy as np
import torch

from .image_processing_align_detr import _TO_255, AlignDetrImageProcessorBase, _canvas_size

__all__ = ["AlignDetrImageProcessorPil", "resize_array"]

_CUBIC_A = -0.75  # torch's and cv2's bicubic coefficient


def _axis_taps(in_size: int, out_size: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices `(out, taps)` and float32 weights of one axis, computed as torch's CPU kernels compute them
    (float32, half-pixel centres, `align_corners=False`): bilinear clamps negative source positions to 0, nearest
    is the legacy `floor(dst * in / out)`, bicubic uses A = -0.75 with edge-clamped indices."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if mode == "nearest":
        index = np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)
        return index[:, None], np.ones((out_size, 1), dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    if mode == "bilinear":
        src = np.maximum(src, np.float32(0))
        first = np.floor(src).astype(np.int64)
        frac = np.clip(src - first.astype(np.float32), 0, 1)
        first = np.minimum(first, in_size - 1)
        index = np.stack([first, np.minimum(first + 1, in_size - 1)], 1)
        return index, np.stack([np.float32(1) - frac, frac], 1)
    first = np.floor(src).astype(np.int64)
    t = src - first.astype(np.float32)

    def near(x):  # |x| <= 1
        return ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A

    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], 1).astype(np.float32)
    index = np.clip(first[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return index, weights


def _resample_axis(image: np.ndarray, axis: int, index: np.ndarray, weights: np.ndarray) -> np.ndarray:
    shape = [1] * image.ndim
    shape[axis] = -1
    result = np.take(image, index[:, 0], axis=axis) * weights[:, 0].reshape(shape)
    for tap in range(1, weights.shape[1]):  # left to right, as torch adds the taps
        result += np.take(image, index[:, tap], axis=axis) * weights[:, tap].reshape(shape)
    return result


def resize_array(image: np.ndarray, new_size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize a float32 `(C, H, W)` array with the tensor backend's sampling rule (see `_axis_taps`): the width
    first, then the height, as torch's bilinear kernel combines them. Matches it to float32 rounding."""
    height, width = image.shape[-2:]
    out_h, out_w = new_size
    if out_w != width:
        image = _resample_axis(image, 2, *_axis_taps(width, out_w, mode))
    if out_h != height:
        image = _resample_axis(image, 1, *_axis_taps(height, out_h, mode))
    return np.ascontiguousarray(image, dtype=np.float32)


class AlignDetrImageProcessorPil(AlignDetrImageProcessorBase):
    r"""
    Align-DETR's image processor, PIL/NumPy backend (transformers' `backend="pil"`, the twin of
    [`AlignDetrImageProcessor`]). Same options and steps (see [`AlignDetrImageProcessorBase`]), computed with NumPy:
    the resize reimplements the tensor backend's sampling rule (mmcv's: no antialiasing) rather than calling
    `PIL.Image.resize`, which antialiases when downscaling, so both backends give the model the same pixels, to float32
    rounding (after the uint8 rounding of step 2, a pixel may differ by one grey level in rare ties; tested).
    `return_tensors=None` returns lists of NumPy arrays, one per image, as transformers' PIL backends do; `"np"`
    stacks them; `"pt"` gives torch tensors. `device` is ignored (CPU).
    """

    @property
    def backend(self) -> str:
        return "pil"

    def _prepare_image(self, image, kind, device):
        image = image.astype(np.float32)  # a copy: later steps work in place
        if _TO_255[kind] is not None:
            image *= np.float32(_TO_255[kind])
        return image

    def _resize_image(self, image, new_size, resample, round_to_uint8):
        mode = {0: "nearest", 2: "bilinear", 3: "bicubic"}[resample]
        resized = resize_array(image, new_size, mode)
        if round_to_uint8:
            np.clip(np.round(resized, out=resized), 0.0, 255.0, out=resized)
        elif mode == "bicubic":
            np.clip(resized, 0.0, 255.0, out=resized)  # bicubic overshoots
        return resized

    def _rescale_and_normalize(self, image, options):
        if options["do_rescale"]:
            image *= np.float32(options["rescale_factor"])
        if options["do_normalize"]:
            image -= np.asarray(options["image_mean"], dtype=np.float32)[:, None, None]
            image /= np.asarray(options["image_std"], dtype=np.float32)[:, None, None]
        return image

    def _pad_images(self, images, pad_size):
        height, width = _canvas_size([image.shape[-2:] for image in images], pad_size)
        padded, masks = [], []
        for image in images:
            canvas = np.zeros((image.shape[0], height, width), dtype=image.dtype)
            canvas[:, : image.shape[1], : image.shape[2]] = image
            mask = np.zeros((height, width), dtype=np.int64)
            mask[: image.shape[1], : image.shape[2]] = 1
            padded.append(canvas)
            masks.append(mask)
        return padded, masks

    def _to_output(self, data, labels, return_tensors):
        if return_tensors is not None:
            same_shape = len({tuple(p.shape) for p in data["pixel_values"]}) == 1
            data = {key: np.stack(value) if same_shape or key == "pixel_mask" else value for key, value in data.items()}
        if return_tensors == "pt":
            data = {key: [torch.from_numpy(v) for v in value] if isinstance(value, list) else torch.from_numpy(value)
                    for key, value in data.items()}
            labels = None if labels is None else [{k: torch.from_numpy(v) for k, v in t.items()} for t in labels]
        return data, labels
