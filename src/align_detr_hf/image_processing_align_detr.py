"""Image processor for Align-DETR, tensor backend: mmdetection's test pipeline (keep-ratio resize, normalise, pad).

Two backends, named as transformers 5 names them: [`AlignDetrImageProcessor`] ("torchvision", the tensor backend,
here in plain PyTorch: torchvision is not needed) and [`AlignDetrImageProcessorPil`] ("pil", NumPy;
`image_processing_pil_align_detr.py`). Both follow one documented rule, written once in their shared base class
(`image_processing_base_align_detr.py`); only the array operations differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .image_io import to_float_rgb, to_float_tensor
from .image_processing_base_align_detr import (  # noqa: F401 (the size rules, re-exported where users import them)
    _RESAMPLE_TO_TORCH_MODE,
    ALIGN_DETR_MEAN,
    ALIGN_DETR_STD,
    AlignDetrImageProcessorBase,
    AlignDetrImageProcessorKwargs,
    get_max_height_width_output_size,
    get_resize_output_size,
    pad_and_create_pixel_mask,
)

# The NumPy twin, imported here so that `from .image_processing_align_detr import AlignDetrImageProcessorPil` works
# and transformers copies its file with this one into every saved folder (remote code names both backends).
from .image_processing_pil_align_detr import AlignDetrImageProcessorPil  # noqa: E402,F401

__all__ = [
    "ALIGN_DETR_MEAN",
    "ALIGN_DETR_STD",
    "AlignDetrImageProcessor",
    "AlignDetrImageProcessorKwargs",
    "AlignDetrImageProcessorPil",
    "get_max_height_width_output_size",
    "get_resize_output_size",
    "pad_and_create_pixel_mask",
]


class AlignDetrImageProcessor(AlignDetrImageProcessorBase):
    r"""
    Align-DETR's image processor, tensor backend (transformers' `backend="torchvision"` slot), in plain PyTorch:
    `torch.nn.functional.interpolate` reproduces mmcv's resize rule, so torchvision is not needed. This is the
    mmdetection-parity path (bit-identical preprocessing in the parity tests). Computes on `device` when given.
    See [`AlignDetrImageProcessorBase`] for the steps and options; [`AlignDetrImageProcessorPil`] is the NumPy twin.
    """

    @property
    def backend(self) -> str:
        return "torchvision"

    # One raw image -> float32 `(3, H, W)` RGB on the 0-255 scale, plus whether the source was uint8 (step 1 of the
    # class docstring; `image_io.to_float_rgb`, which the data loaders use too, so every path converts pixels alike).
    to_float_rgb = staticmethod(to_float_rgb)

    def _prepare_image(self, image, kind, device):
        return to_float_tensor(image, kind, device)

    def resize(
        self, image: torch.Tensor, size: dict[str, int], resample: int = 2, round_to_uint8: bool = False
    ) -> torch.Tensor:
        """Resize a float `(C, H, W)` image by `size` (see the class docstring for the rule and the interpolation).
        `round_to_uint8` rounds and clamps the result to integers in [0, 255], as cv2 does on uint8 images."""
        new_size = self._output_size(*image.shape[-2:], self._check_size(size))
        if new_size == tuple(image.shape[-2:]):
            return image
        return self._resize_image(image, new_size, self._check_resample(resample), round_to_uint8)

    def _resize_image(self, image, new_size, resample, round_to_uint8):
        mode = _RESAMPLE_TO_TORCH_MODE[resample]
        extra = {} if mode == "nearest" else {"align_corners": False, "antialias": False}
        resized = F.interpolate(image[None], size=new_size, mode=mode, **extra)[0]
        if round_to_uint8:
            resized = resized.round_().clamp_(0.0, 255.0)
        elif mode == "bicubic":
            resized = resized.clamp_(0.0, 255.0)  # bicubic overshoots
        return resized

    @staticmethod
    def normalize(
        image: torch.Tensor, mean: Sequence[float], std: Sequence[float], inplace: bool = False
    ) -> torch.Tensor:
        """`(x - mean) / std` per channel on a float `(3, H, W)` image (float32 arithmetic, as mmdet)."""
        mean_t = torch.tensor(mean, dtype=image.dtype, device=image.device)[:, None, None]
        std_t = torch.tensor(std, dtype=image.dtype, device=image.device)[:, None, None]
        if inplace:
            return image.sub_(mean_t).div_(std_t)
        return (image - mean_t) / std_t

    def _rescale_and_normalize(self, image, options):
        # `image` is a fresh tensor here (conversion/resize copied it), so in place is safe.
        if options["do_rescale"]:
            image = image.mul_(options["rescale_factor"])
        if options["do_normalize"]:
            image = self.normalize(image, options["image_mean"], options["image_std"], inplace=True)
        return image

    def _pad_images(self, images, pad_size):
        return pad_and_create_pixel_mask(images, pad_size)

    def _to_output(self, data, labels, return_tensors):
        if data.get("pixel_mask") is None and len({tuple(p.shape) for p in data["pixel_values"]}) == 1:
            data["pixel_values"] = torch.stack(data["pixel_values"])
        device = data["pixel_values"][0].device
        labels = None if labels is None else [
            {key: torch.from_numpy(value).to(device) for key, value in target.items()} for target in labels
        ]
        if return_tensors == "np":
            data = {key: [t.cpu().numpy() for t in value] if isinstance(value, list) else value.cpu().numpy()
                    for key, value in data.items()}
            labels = None if labels is None else [{k: v.cpu().numpy() for k, v in t.items()} for t in labels]
        return data, labels
