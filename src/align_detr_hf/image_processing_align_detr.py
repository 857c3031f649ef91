"""Image processor for Align-DETR: mmdetection's test pipeline (keep-ratio resize, normalise, pad).

Two backends, named as transformers 5 names them: [`AlignDetrImageProcessor`] ("torchvision", the tensor backend,
here in plain PyTorch: torchvision is not needed) and [`AlignDetrImageProcessorPil`] ("pil", NumPy;
`image_processing_pil_align_detr.py`). Both follow one documented rule, written once in the shared base class
below; only the array operations differ.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs

from .box_ops import box_cxcywh_to_xyxy


try:  # Pillow is optional: PIL images are only accepted when it is installed.
    import PIL.Image

    _PIL_IMAGE_TYPE: tuple[type, ...] = (PIL.Image.Image,)
except ImportError:  # pragma: no cover
    _PIL_IMAGE_TYPE = ()


# mmdet's `DetDataPreprocessor` mean/std, on the 0-255 pixel scale, RGB order (= ImageNet mean/std x 255).
ALIGN_DETR_MEAN = [123.675, 116.28, 103.53]
ALIGN_DETR_STD = [58.395, 57.12, 57.375]

# Values follow `PIL.Image.Resampling` so that a saved config reads like other transformers processors.
# Nearest is torch's legacy "nearest" (floor(dst * in / out)), which is what cv2 INTER_NEAREST (mmcv) does.
_RESAMPLE_TO_TORCH_MODE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_PIL_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Keys transformers itself writes into a saved preprocessor config: accepted (auto_map is kept, as transformers does).
_BOOKKEEPING_KEYS = ("image_processor_type", "processor_class", "_processor_class", "feature_extractor_type", "auto_map")
# Keys of transformers' older DETR processors, still found in saved configs.
_LEGACY_KEYS = ("max_size", "pad_and_return_pixel_mask")
_CHANNELS_FIRST = ("channels_first", "first")
_CHANNELS_LAST = ("channels_last", "last")
_SIZE_FORMS = (
    "{'shortest_edge': int, 'longest_edge': int} (keep ratio, mmcv's rounding; longest_edge optional), "
    "{'max_height': int, 'max_width': int} (keep ratio, largest size that fits), {'height': int, 'width': int} "
    "(exact), an int (shortest edge) or a (height, width) pair"
)
COCO_DETECTION = "coco_detection"

__all__ = [
    "AlignDetrImageProcessor",
    "AlignDetrImageProcessorKwargs",
    "get_max_height_width_output_size",
    "get_resize_output_size",
    "pad_and_create_pixel_mask",
]


class AlignDetrImageProcessorKwargs(ImagesKwargs, total=False):
    """transformers' `ImagesKwargs` plus the DETR-family keys (as `DeformableDetrImageProcessorKwargs`).

    format (`str`, defaults to `"coco_detection"`): the annotation format; "coco_panoptic" is refused (Align-DETR is a
        box detector).
    do_convert_annotations (`bool`, defaults to `True`): boxes as `cxcywh` normalised to the resized, unpadded image
        (what the model trains on); `False` keeps absolute `xyxy` pixels of the resized image.
    """

    format: str
    do_convert_annotations: bool


def get_resize_output_size(
    height: int, width: int, shortest_edge: int, longest_edge: int | None = None
) -> tuple[int, int]:
    """
    Output `(height, width)` of mmcv's keep-ratio `imrescale(img, (longest_edge, shortest_edge))`.

    The scale is `s = min(longest_edge / long_side, shortest_edge / short_side)` and each side becomes
    `int(side * s + 0.5)` (mmcv rounds half up per axis, so the aspect ratio is kept only approximately;
    `scale_factor` is the actual per-axis ratio `new / old`). Example: 480x640 -> 800x1067.

    Deviation: mmcv can return a 0-pixel side for extreme aspect ratios (a 1x4000 image gives height
    `int(0.333 + 0.5) = 0` and cv2 then fails); we return at least 1 pixel instead.
    """
    scale = shortest_edge / min(height, width)
    if longest_edge is not None:
        scale = min(scale, longest_edge / max(height, width))
    # Python floats are doubles, as in mmcv, so the rounding is bit-for-bit mmcv's.
    new_height = max(1, int(height * scale + 0.5))
    new_width = max(1, int(width * scale + 0.5))
    return new_height, new_width


def get_max_height_width_output_size(height: int, width: int, max_height: int, max_width: int) -> tuple[int, int]:
    """`size={"max_height", "max_width"}`: transformers' rule (`get_image_size_for_max_height_width`), the largest
    keep-ratio size that fits, each side truncated (`int`); small images are scaled up. At least 1 pixel a side."""
    scale = min(max_height / height, max_width / width)
    return max(1, int(height * scale)), max(1, int(width * scale))


def pad_and_create_pixel_mask(
    pixel_values_list: Sequence[torch.Tensor], pad_size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Zero-pad images at the bottom/right to a common size and build the validity mask, as mmengine does.

    Padding is applied to the already *normalised* images, so padded pixels are exactly 0 in the model input
    (mmdet's `pad_value=0` after normalisation, no size divisor). Boxes are not touched: Align-DETR targets stay
    normalised by each image's own (unpadded) size, and the mask tells the model which part is valid.

    Args:
        pixel_values_list (`Sequence[torch.Tensor]`): B tensors of shape `(C, h_i, w_i)`, same C and dtype.
        pad_size (`tuple[int, int]`, *optional*): `(H, W)` of the output canvas; defaults to the batch maximum.
            Must be at least as large as every image.

    Returns:
        `(pixel_values, pixel_mask)`: `(B, C, H, W)` tensor (dtype of the inputs) and `(B, H, W)` int64 mask,
        1 on real pixels and 0 on padding.
    """
    if len(pixel_values_list) == 0:
        raise ValueError("pad_and_create_pixel_mask needs at least one image.")
    for image in pixel_values_list:
        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise ValueError("pad_and_create_pixel_mask expects a list of (C, h, w) torch tensors.")
    channels = pixel_values_list[0].shape[0]
    if any(image.shape[0] != channels for image in pixel_values_list):
        raise ValueError("All images must have the same number of channels.")
    max_height, max_width = _canvas_size([tuple(image.shape[-2:]) for image in pixel_values_list], pad_size)

    first = pixel_values_list[0]
    batch = len(pixel_values_list)
    # `empty` + zeroing only the padding strips: one pass over memory instead of two for large batches.
    pixel_values = first.new_empty((batch, channels, max_height, max_width))
    pixel_mask = torch.zeros((batch, max_height, max_width), dtype=torch.int64, device=first.device)
    for i, image in enumerate(pixel_values_list):
        _, height, width = image.shape
        pixel_values[i, :, :height, :width] = image
        pixel_values[i, :, :height, width:] = 0
        pixel_values[i, :, height:, :] = 0
        pixel_mask[i, :height, :width] = 1
    return pixel_values, pixel_mask


def _canvas_size(sizes: Sequence[tuple[int, int]], pad_size: tuple[int, int] | None) -> tuple[int, int]:
    max_height, max_width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if pad_size is None:
        return max_height, max_width
    if pad_size[0] < max_height or pad_size[1] < max_width:
        raise ValueError(f"pad_size {tuple(pad_size)} is smaller than the largest image ({max_height}, {max_width}).")
    return int(pad_size[0]), int(pad_size[1])


def _as_chw_array(image: Any, input_data_format: Any = None, do_convert_rgb: bool = True) -> tuple[np.ndarray, str]:
    """
    One raw image -> `(C, H, W)` NumPy array with 3 channels and its pixel kind: "uint8" (0-255), "uint16" (0-65535)
    or "float" (checked to be finite and in [0, 1]). Step 1 of the class docstring, shared by both backends.
    """
    if _PIL_IMAGE_TYPE and isinstance(image, _PIL_IMAGE_TYPE):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"Got a zero-size PIL image ({image.width}x{image.height}).")
        input_data_format = "channels_last"
        if image.mode == "I":  # 32-bit ints; older Pillow opens 16-bit PNGs in this mode
            image = np.asarray(image)
            low, high = int(image.min()), int(image.max())
            if low < 0 or high > 65535:
                raise ValueError(
                    f"PIL mode 'I' image with values in [{low}, {high}]: read as 16-bit, values must lie in "
                    "[0, 65535]; convert it to 8-bit ('L'/'RGB') or 16-bit yourself first."
                )
            image = image.astype(np.uint16)
        elif image.mode in _PIL_MODES_16BIT or image.mode == "F":
            image = np.asarray(image)  # keep 16-bit / float precision, handled below
        elif image.mode == "RGB" or not do_convert_rgb:
            image = np.asarray(image)
        else:  # L, LA, P, RGBA, CMYK, ... ; alpha is dropped as cv2 (mmcv) does
            image = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        image = tensor.cpu().numpy()
    elif not isinstance(image, np.ndarray):
        raise ValueError(
            f"Unsupported image type {type(image).__name__}: pass a PIL.Image.Image, a numpy array (HWC) or a "
            "torch tensor (CHW), or a list of them."
        )

    if image.dtype == np.uint8:
        kind = "uint8"
    elif image.dtype == np.uint16:
        kind = "uint16"
    elif np.issubdtype(image.dtype, np.floating):
        kind = "float"
    else:
        raise ValueError(
            f"Unsupported image dtype {image.dtype}: use uint8 (0-255), uint16 (0-65535) or float in [0, 1]."
        )

    # Layout -> (C, H, W)
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3:
        hwc = image.shape[-1] in (1, 3, 4)
        chw = image.shape[0] in (1, 3, 4)
        fmt = None if input_data_format is None else str(getattr(input_data_format, "value", input_data_format))
        if fmt is None:
            if hwc and chw:  # e.g. (3, 5, 3): guessing would silently swap height and channels
                raise ValueError(
                    f"Ambiguous image shape {tuple(image.shape)}: both the first and the last axis could be "
                    "the channels. Pass input_data_format='channels_first' (C, H, W) or 'channels_last' (H, W, C)."
                )
            if not (hwc or chw):
                raise ValueError(
                    f"Cannot find the channel axis of an image of shape {tuple(image.shape)}: expected 1, 3 or "
                    "4 channels on the first or the last axis."
                )
            is_hwc = hwc
        elif fmt in _CHANNELS_FIRST + _CHANNELS_LAST:
            is_hwc = fmt in _CHANNELS_LAST
            if not (hwc if is_hwc else chw):
                raise ValueError(
                    f"Image of shape {tuple(image.shape)} has no 1, 3 or 4 channels on the "
                    f"{'last' if is_hwc else 'first'} axis (input_data_format={fmt!r})."
                )
        else:
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}.")
        if is_hwc:
            image = image.transpose(2, 0, 1)
    else:
        raise ValueError(f"An image must be 2-d (grayscale) or 3-d (with channels), got shape {tuple(image.shape)}.")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"Got a zero-size image of shape {tuple(image.shape)} (C, H, W).")

    # Channels -> RGB
    if image.shape[0] != 3:
        if not do_convert_rgb:
            raise ValueError(
                f"do_convert_rgb=False, but the image has {image.shape[0]} channel(s); the model takes 3 (RGB). "
                "Leave do_convert_rgb on to convert grayscale (repeated) and RGBA (alpha dropped) images."
            )
        image = np.broadcast_to(image, (3, *image.shape[1:])) if image.shape[0] == 1 else image[:3]

    if kind == "float":
        low, high = float(image.min()), float(image.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("Float image contains NaN or infinite values.")
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"Float images must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]. "
                "Pass 0-255 data as uint8, or divide by 255 first."
            )
    return image, kind


# Factor from each pixel kind to the 0-255 scale.
_TO_255 = {"uint8": None, "uint16": 255.0 / 65535.0, "float": 255.0}


class AlignDetrImageProcessorBase(BaseImageProcessor):
    r"""
    What both backends share: the arguments, the sizing rule, annotations and post-processing. The steps, per image:

    1. Convert to a `(3, H, W)` RGB image on the 0-255 scale. Accepted: `PIL.Image.Image` (any mode;
       grayscale/RGBA/palette are converted to RGB, alpha is dropped as cv2 does in mmcv - transformers composites
       RGBA onto white instead; 16-bit modes `I;16*` and `I` - the mode older Pillow gives 16-bit PNGs - are read as
       16-bit, values outside 0-65535 raise), `np.ndarray`, `torch.Tensor`, 2-d grayscale arrays, 4-d
       arrays/tensors as a batch, and file paths / URLs (read with EXIF orientation, 16-bit kept, as
       `align-detr predict` reads them). dtypes: uint8 (0-255), uint16 (scaled by 255/65535), floating point in
       [0, 1] (scaled by 255). Anything else raises a `ValueError`. `do_convert_rgb=False` takes 3-channel images as
       they are and refuses others (the model needs RGB).
       Channel axis (transformers' `input_data_format`): `"channels_first"` (CHW) or `"channels_last"` (HWC) when
       given. Otherwise the one axis (first or last) of size 1, 3 or 4 is the channel axis; when both could be
       (e.g. `(3, 5, 3)` or `(4, 6, 3)`) the shape is ambiguous and a `ValueError` asks for `input_data_format`
       (transformers would guess channels-first and warn; a wrong guess silently swaps height and channels).
    2. Resize (`do_resize`), by `size`:
       - `{"shortest_edge", "longest_edge"}` (default 800/1333): keep ratio with mmcv's rounding, see
         [`get_resize_output_size`] (480x640 -> 800x1067). transformers' DETR processors round differently
         (`get_size_with_aspect_ratio`); mmcv's rule is what Align-DETR models are trained and evaluated with.
       - `{"max_height", "max_width"}`: transformers' rule, see [`get_max_height_width_output_size`].
       - `{"height", "width"}`: exact size (mmdet's `keep_ratio=False`).
       Interpolation: bilinear with half-pixel sampling, edge clamping and, like cv2 `INTER_LINEAR`, no antialiasing
       when downscaling (transformers' torchvision backends antialias; a model trained on cv2-resized images expects
       cv2's). uint8 inputs are rounded back to integers after resizing, because cv2 works in uint8 and mmdet's
       resized image is uint8. Expected difference to cv2: at most 1 grey level (<= 1/57.12 = 0.0175 after
       normalisation), most pixels identical: we match a float64 re-implementation of cv2's sampling rule to
       < 5e-3 grey levels before rounding (tested), while cv2's 11-bit fixed-point weights move its own value by up
       to ~0.25 grey levels. (cv2 itself is not a dependency and was not run.)
    3. Rescale (`do_rescale`, off by default) by `rescale_factor`, then normalise (`do_normalize`) with
       `(x - image_mean) / image_std`. **The defaults are on the 0-255 scale**: mean `[123.675, 116.28, 103.53]`, std
       `[58.395, 57.12, 57.375]` (ImageNet's x 255, mmdet's arithmetic exactly); transformers' processors rescale by
       1/255 first and normalise with 0-1 values. Both work here: `do_rescale=True` with 0-1 `image_mean`/`image_std`
       is accepted, and a mean/std that does not fit the pixel scale (0-1 values without rescaling, or 0-255 values
       with it) raises instead of giving wrong pixels; so does a std of 0.
    4. Zero-pad bottom/right to the largest image of the call (or to `pad_size`), *after* normalisation, and return
       `pixel_mask` (int64, 1 = valid pixel). See [`pad_and_create_pixel_mask`], which data collators can reuse.

    Annotations (`format="coco_detection"`, one dict per image: `{"image_id": int, "annotations": [{"bbox": [x, y,
    w, h], "category_id": int, "iscrowd": 0/1, "area": float}, ...]}`) become `labels`: crowd boxes are dropped,
    boxes are clipped to the image and degenerate ones (zero width or height after clipping) removed;
    `category_id` is used as the class id as given. Refused with a `ValueError` that names the image and object: a
    missing `image_id` (as transformers refuses), a missing `bbox`/`category_id`, a bbox that is not 4 finite numbers,
    a negative width or height, an object whose `image_id` is another image's, duplicate annotation `id`s.
    `format="coco_panoptic"` and segmentation masks are refused (Align-DETR is a box detector).

    **Box normalisation differs from transformers' DeformableDetr/DETR processors.** With `do_convert_annotations`
    (default), `labels[i]["boxes"]` are `cxcywh` normalised by the *resized, unpadded* image size
    (`labels[i]["size"]`), as mmdet/DINO train, and padding never changes them. transformers' DETR-family
    processors re-normalise boxes to the *padded* canvas when a call pads images of different sizes. The Align-DETR
    model predicts boxes relative to the valid region (it uses `pixel_mask`/valid ratios), so targets normalised to
    the padded canvas would be wrong for it. `do_convert_annotations=False` gives absolute `xyxy` boxes in pixels of
    the resized image, as transformers does.

    Args (all also accepted per call, and by `from_dict`/`from_pretrained` as overrides, as transformers'
    `ImagesKwargs`):
        do_resize (`bool`, defaults to `True`), size (`dict`, defaults to `{"shortest_edge": 800, "longest_edge":
            1333}`; see step 2), resample (`int`, defaults to `2` = `PIL.Image.Resampling.BILINEAR`; 0 nearest,
            2 bilinear, 3 bicubic).
        do_rescale (`bool`, defaults to `False`), rescale_factor (`float`, defaults to 1/255).
        do_normalize (`bool`, defaults to `True`), image_mean / image_std (3 floats or one, defaults on the 0-255
            scale, see step 3).
        do_convert_rgb (`bool`, defaults to `True`), see step 1.
        do_pad (`bool`, defaults to `True`): pad the batch and return `pixel_mask`. Without it, images of different
            sizes come back as a list of `(3, h, w)` arrays (for a collator to pad) and no `pixel_mask` is made.
        pad_size (`dict[str, int]`, *optional*): `{"height", "width"}` of a fixed padding canvas.
        format (`str`, defaults to `"coco_detection"`), do_convert_annotations (`bool`, defaults to `True`).
        return_tensors (`"pt"`, `"np"` or `None`): `None` gives the backend's own arrays (torch tensors for
            [`AlignDetrImageProcessor`], lists of NumPy arrays for [`AlignDetrImageProcessorPil`], as transformers'
            PIL backends).
        device (`str` or `torch.device`): where [`AlignDetrImageProcessor`] computes (the PIL backend ignores it).
        input_data_format: see step 1. data_format: only `"channels_first"` (the model's layout).
        default_to_square (defaults to `False`: an int `size` is the shortest edge), disable_grouping,
            image_seq_length: accepted for compatibility, no effect here. do_center_crop / crop_size: refused when set
            (a detector's images are not cropped).
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = AlignDetrImageProcessorKwargs

    # Class-level defaults, one per key of `valid_kwargs` (also what `to_dict` compares against).
    do_convert_rgb = True
    do_resize = True
    size = {"shortest_edge": 800, "longest_edge": 1333}
    default_to_square = False
    crop_size = None
    resample = 2
    do_rescale = False
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = ALIGN_DETR_MEAN
    image_std = ALIGN_DETR_STD
    do_pad = True
    pad_size = None
    do_center_crop = None
    data_format = None
    input_data_format = None
    device = None
    return_tensors = None
    disable_grouping = None
    image_seq_length = None
    format = COCO_DETECTION
    do_convert_annotations = True

    def __init__(self, **kwargs) -> None:
        max_size = kwargs.pop("max_size", None)  # transformers' legacy DETR keyword: {"shortest_edge", "longest_edge"}
        if "pad_and_return_pixel_mask" in kwargs:
            kwargs.setdefault("do_pad", kwargs.pop("pad_and_return_pixel_mask"))
        bookkeeping = {key: kwargs.pop(key) for key in _BOOKKEEPING_KEYS if key in kwargs}
        self._reject_unknown(kwargs, f"{type(self).__name__}()")
        super().__init__(**bookkeeping)
        # as DeformableDetrImageProcessor's constructor: an int size is the shortest edge, the longest edge max_size
        # or 1333
        if max_size is not None and kwargs.get("size") is None:
            kwargs["size"] = {"shortest_edge": 800, "longest_edge": max_size}
        elif isinstance(kwargs.get("size"), int) and not kwargs.get("default_to_square"):
            kwargs["size"] = {"shortest_edge": kwargs["size"], "longest_edge": max_size or 1333}
        for key, value in self._resolve(kwargs, defaults=type(self)).items():
            setattr(self, key, value)

    # ------------------------------------------------------------------------------------------ arguments

    @classmethod
    def _option_names(cls) -> list[str]:
        return list(cls.valid_kwargs.__annotations__)

    @classmethod
    def _reject_unknown(cls, kwargs: dict, where: str, error: type[Exception] = TypeError) -> None:
        """A typo such as do_normalise=False would otherwise be silently ignored."""
        accepted = cls._option_names()
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, accepted, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise error(f"Unexpected keyword argument(s) for {where}: {', '.join(hints)}; accepted: {accepted}.")

    def _resolve(self, overrides: dict, defaults: Any = None) -> dict[str, Any]:
        """Every option, from `overrides` where given (not None) else from `defaults` (the instance), checked and in
        canonical form. The one place options are validated: constructor, `from_dict` and every call."""
        defaults = self if defaults is None else defaults
        options = {}
        for key in self._option_names():
            value = overrides.get(key)
            options[key] = value if value is not None else getattr(defaults, key, None)
        options["size"] = self._check_size(options["size"], options["default_to_square"])
        options["resample"] = self._check_resample(options["resample"])
        options["pad_size"] = None if options["pad_size"] is None else self._check_pad_size(options["pad_size"])
        options["image_mean"] = self._check_channel_values("image_mean", options["image_mean"])
        options["image_std"] = self._check_channel_values("image_std", options["image_std"], positive=True)
        factor = options["rescale_factor"]
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"rescale_factor must be a positive finite number, got {factor!r}.")
        options["rescale_factor"] = float(factor)
        if options["do_normalize"]:
            self._check_normalization_scale(options)
        options["format"] = self._check_format(options["format"])
        if options["do_center_crop"] or options["crop_size"] is not None:
            raise ValueError(
                "do_center_crop / crop_size: an object detector's images are not center-cropped (boxes would leave "
                "the image); leave them unset."
            )
        data_format = options["data_format"]
        if data_format is not None and str(getattr(data_format, "value", data_format)) not in _CHANNELS_FIRST:
            raise ValueError(f"data_format must be 'channels_first' (the model's layout), got {data_format!r}.")
        return_tensors = options["return_tensors"]
        return_tensors = None if return_tensors is None else str(getattr(return_tensors, "value", return_tensors))
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        options["return_tensors"] = return_tensors
        if options["device"] is not None:
            options["device"] = torch.device(options["device"])
        return options

    @staticmethod
    def _check_size(size: Any, default_to_square: bool = False) -> dict[str, int]:
        if isinstance(size, bool):
            raise ValueError(f"size must be one of {_SIZE_FORMS}; got {size!r}.")
        if isinstance(size, int):
            size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            size = {"height": size[0], "width": size[1]}
        if not isinstance(size, dict):
            raise ValueError(f"size must be one of {_SIZE_FORMS}; got {size!r}.")
        size = {key: value for key, value in dict(size).items() if value is not None}
        if set(size) not in ({"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"max_height", "max_width"},
                             {"height", "width"}):
            raise ValueError(f"size must be one of {_SIZE_FORMS}; got {size}.")
        for key, value in size.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"size values must be positive integers, got {key}={value!r}.")
        return {key: int(value) for key, value in size.items()}

    @staticmethod
    def _check_resample(resample: Any) -> int:
        try:
            value = int(resample)  # PIL's Resampling enum is an IntEnum
        except (TypeError, ValueError):
            value = None
        if value not in _RESAMPLE_TO_TORCH_MODE:
            raise ValueError(f"resample must be 0 (nearest), 2 (bilinear) or 3 (bicubic), got {resample!r}.")
        return value

    @staticmethod
    def _check_pad_size(pad_size: Any) -> dict[str, int]:
        if isinstance(pad_size, int) and not isinstance(pad_size, bool):
            pad_size = {"height": pad_size, "width": pad_size}
        elif isinstance(pad_size, (list, tuple)) and len(pad_size) == 2:
            pad_size = {"height": pad_size[0], "width": pad_size[1]}
        if not isinstance(pad_size, dict) or set(pad_size) != {"height", "width"}:
            raise ValueError(f"pad_size must be {{'height': int, 'width': int}}, got {pad_size!r}.")
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 for v in pad_size.values()):
            raise ValueError(f"pad_size values must be positive integers, got {pad_size}.")
        return {"height": int(pad_size["height"]), "width": int(pad_size["width"])}

    @staticmethod
    def _check_channel_values(name: str, values: Any, positive: bool = False) -> list[float]:
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values] * 3
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be 3 numbers (R, G, B) or one number, got {values!r}.") from None
        if len(values) != 3:
            raise ValueError(f"{name} must be 3 numbers (R, G, B) or one number, got {len(values)}: {values}.")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} must be finite, got {values}.")
        if positive and min(values) <= 0:
            raise ValueError(
                f"{name} must be positive, got {values}: normalising divides by it (a 0 gives infinite pixels)."
            )
        return values

    @staticmethod
    def _check_normalization_scale(options: dict) -> None:
        """image_mean/image_std must be on the scale of the pixels they normalise: 0-255, or 0-1 after rescaling."""
        scale = 255.0 * (options["rescale_factor"] if options["do_rescale"] else 1.0)
        mean, std = options["image_mean"], options["image_std"]
        rescaled = "do_rescale=True" if options["do_rescale"] else "do_rescale=False"
        if max(abs(v) for v in mean) > scale * (1 + 1e-6):
            raise ValueError(
                f"image_mean {mean} is outside the pixel range 0-{scale:g} ({rescaled}, rescale_factor="
                f"{options['rescale_factor']:g}): with do_rescale=True, give image_mean/image_std on the 0-1 scale "
                "(e.g. [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225]); without it, on the 0-255 scale (the defaults)."
            )
        if scale > 2 and max(abs(v) for v in mean) <= 1 and max(std) <= 1:
            raise ValueError(
                f"image_mean {mean} / image_std {std} are on the 0-1 scale, but the pixels are on the 0-{scale:g} "
                f"scale ({rescaled}): pass do_rescale=True to rescale by 1/255 first, or 0-255-scale values "
                "(the defaults: [123.675, 116.28, 103.53] / [58.395, 57.12, 57.375])."
            )

    @staticmethod
    def _check_format(value: Any) -> str:
        value = str(getattr(value, "value", value))
        if value == "coco_panoptic":
            raise ValueError(
                "format='coco_panoptic' is not supported: Align-DETR is a box detector and its processor reads "
                "COCO detection annotations (format='coco_detection'); panoptic segments and masks are not used."
            )
        if value != COCO_DETECTION:
            raise ValueError(f"format must be 'coco_detection', got {value!r}.")
        return value

    def to_dict(self) -> dict[str, Any]:
        output = {key: value for key, value in super().to_dict().items() if not key.startswith("_valid")}
        for key in self._option_names():  # unset options (None, default None) are left out, as transformers does
            if output.get(key, "missing") is None and getattr(type(self), key, None) is None:
                output.pop(key, None)
        output.pop("device", None)  # where to compute is the caller's machine, not the model's
        if output.get("image_processor_type", "").endswith("Pil"):
            # one saved config for both backends (AutoImageProcessor picks the class), as transformers' PIL backends
            output["image_processor_type"] = output["image_processor_type"][:-3]
        if isinstance(output.get("auto_map", {}).get("AutoImageProcessor"), str):
            # remote code: name both backends (the twin's file travels with this one), so `backend=` and the
            # torchvision-or-pil default work there as they do with the package installed
            output["auto_map"] = {**output["auto_map"], "AutoImageProcessor": {
                "torchvision": "image_processing_align_detr.AlignDetrImageProcessor",
                "pil": "image_processing_pil_align_detr.AlignDetrImageProcessorPil",
            }}
        return output

    @property
    def backend(self) -> str:
        """The transformers backend name of this class: "torchvision" (tensor backend) or "pil"."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ input handling

    @staticmethod
    def _flatten_images(images: Any) -> list[Any]:
        """A single image, a 4-d batch, or a list/tuple of images -> flat list of single images."""
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("No images given: `images` is an empty list.")
            flat = []
            for image in images:
                if isinstance(image, (list, tuple)):
                    raise ValueError("Nested lists of images are not supported; pass a flat list of images.")
                if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim == 4:
                    raise ValueError(
                        f"Each image in a list must be 2-d or 3-d, got an array of shape {tuple(image.shape)}."
                    )
                flat.append(image)
            return flat
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            if images.shape[0] == 0:
                raise ValueError("No images given: the batch dimension is 0.")
            return list(images)
        return [images]

    @staticmethod
    def _read(image: Any) -> Any:
        """Paths, URLs and encoded bytes are read as `align-detr predict` reads them (EXIF, 16-bit; see image_io)."""
        if isinstance(image, (str, bytes, os.PathLike)):
            from .image_io import read_image

            return read_image(image)
        return image

    @staticmethod
    def _output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
        if "shortest_edge" in size:
            return get_resize_output_size(height, width, size["shortest_edge"], size.get("longest_edge"))
        if "max_height" in size:
            return get_max_height_width_output_size(height, width, size["max_height"], size["max_width"])
        return size["height"], size["width"]

    # ------------------------------------------------------------------------------------------ annotations

    @staticmethod
    def _check_annotations(annotations: Any, num_images: int) -> list[dict]:
        if isinstance(annotations, dict):
            annotations = [annotations]
        if not isinstance(annotations, (list, tuple)) or len(annotations) != num_images:
            got = len(annotations) if isinstance(annotations, (list, tuple)) else type(annotations).__name__
            raise ValueError(f"Expected one annotation dict per image ({num_images}), got {got}.")
        for index, annotation in enumerate(annotations):
            if not isinstance(annotation, dict) or "annotations" not in annotation:
                raise ValueError(
                    f"annotations[{index}] must be a dict {{'image_id': int, 'annotations': [{{'bbox': [x, y, w, h], "
                    f"'category_id': int, ...}}, ...]}} (COCO detection format), got {type(annotation).__name__}"
                    + (f" with keys {sorted(annotation)}" if isinstance(annotation, dict) else "") + "."
                )
            if "image_id" not in annotation:
                raise ValueError(
                    f"annotations[{index}] has no 'image_id': COCO detection annotations need one per image "
                    "({'image_id': int, 'annotations': [...]}), as transformers' DETR processors require."
                )
            image_id = annotation["image_id"]
            integer_tensor = isinstance(image_id, torch.Tensor) and image_id.numel() == 1 and not (
                image_id.is_floating_point() or image_id.dtype == torch.bool)
            if not integer_tensor and (isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer))):
                raise ValueError(f"annotations[{index}]['image_id'] must be an integer, got {image_id!r}.")
            if not isinstance(annotation["annotations"], (list, tuple)):
                raise ValueError(f"annotation['annotations'] must be a list of object dicts (annotations[{index}]).")
            AlignDetrImageProcessorBase._check_objects(int(image_id), annotation["annotations"])
        return list(annotations)

    @staticmethod
    def _check_objects(image_id: Any, objects: Sequence[Any]) -> None:
        """Clear errors for malformed COCO objects (naming the image and the object index) instead of a KeyError
        or a silently dropped box: missing keys, a bbox that is not 4 finite numbers, a negative width/height,
        an object of another image, duplicate annotation ids. Zero-size boxes stay legal (they are dropped)."""
        seen_ids: dict[Any, int] = {}
        for j, obj in enumerate(objects):
            where = f"image_id {image_id}, object {j}"
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: each object must be a dict with 'bbox' and 'category_id', got "
                                 f"{type(obj).__name__}.")
            for key in ("bbox", "category_id"):
                if key not in obj:
                    raise ValueError(f"{where}: missing the key '{key}' (COCO detection format).")
            try:
                bbox = [float(v) for v in obj["bbox"]]
            except (TypeError, ValueError):
                raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {obj['bbox']!r}.") from None
            if len(bbox) != 4:
                raise ValueError(f"{where}: 'bbox' must be 4 numbers [x, y, w, h], got {obj['bbox']!r}.")
            if not all(math.isfinite(v) for v in bbox):
                raise ValueError(f"{where}: 'bbox' holds NaN/inf: {bbox}.")
            if bbox[2] < 0 or bbox[3] < 0:
                raise ValueError(f"{where}: negative width or height in bbox [x, y, w, h] = {bbox}.")
            if "image_id" in obj and obj["image_id"] != image_id:
                raise ValueError(f"{where}: the object belongs to image_id {obj['image_id']}, not to this image.")
            if "id" in obj:
                if obj["id"] in seen_ids:
                    raise ValueError(f"{where}: duplicate annotation id {obj['id']} (also object "
                                     f"{seen_ids[obj['id']]}).")
                seen_ids[obj["id"]] = j

    @staticmethod
    def _convert_annotation(
        annotation: dict[str, Any],
        orig_size: tuple[int, int],
        new_size: tuple[int, int],
        do_convert_annotations: bool = True,
    ) -> dict[str, np.ndarray]:
        """One checked COCO-detection annotation dict -> Align-DETR target dict of NumPy arrays (class docstring)."""
        orig_h, orig_w = orig_size
        new_h, new_w = new_size
        objects = [obj for obj in annotation["annotations"] if not obj.get("iscrowd", 0)]  # crowds are not targets
        boxes = np.array([[float(v) for v in obj["bbox"]] for obj in objects], dtype=np.float64).reshape(-1, 4)
        classes = np.array([int(obj["category_id"]) for obj in objects], dtype=np.int64)

        # xywh -> xyxy, clipped to the original image (float64 so clipping/scaling adds no float32 error)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, orig_w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, orig_h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        clipped_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        area = np.array([float(obj["area"]) if "area" in obj else float(a) for obj, a in zip(objects, clipped_area)],
                        dtype=np.float64)
        boxes, classes, area = boxes[keep], classes[keep], area[keep]

        # Actual per-axis scale factors (mmdet's scale_factor = new / old)
        scale_w, scale_h = new_w / orig_w, new_h / orig_h
        boxes[:, 0::2] *= scale_w
        boxes[:, 1::2] *= scale_h
        area = area * (scale_w * scale_h)

        if do_convert_annotations:  # cxcywh normalised by the resized, unpadded image (see the class docstring)
            boxes = np.stack(
                [
                    (boxes[:, 0] + boxes[:, 2]) / 2 / new_w,
                    (boxes[:, 1] + boxes[:, 3]) / 2 / new_h,
                    (boxes[:, 2] - boxes[:, 0]) / new_w,
                    (boxes[:, 3] - boxes[:, 1]) / new_h,
                ],
                axis=-1,
            )
        return {
            "image_id": np.array([int(annotation["image_id"])], dtype=np.int64),
            "class_labels": classes,
            "boxes": boxes.astype(np.float32).reshape(-1, 4),
            "area": area.astype(np.float32),
            "iscrowd": np.zeros_like(classes),
            "orig_size": np.array([orig_h, orig_w], dtype=np.int64),
            "size": np.array([new_h, new_w], dtype=np.int64),
        }

    # ------------------------------------------------------------------------------------------ backend operations

    def _prepare_image(self, image: np.ndarray, kind: str, device: torch.device | None) -> Any:
        """A checked `(3, H, W)` array of `kind` -> the backend's float32 image on the 0-255 scale."""
        raise NotImplementedError

    def _resize_image(self, image: Any, new_size: tuple[int, int], resample: int, round_to_uint8: bool) -> Any:
        raise NotImplementedError

    def _rescale_and_normalize(self, image: Any, options: dict) -> Any:
        raise NotImplementedError

    def _pad_images(self, images: list, pad_size: tuple[int, int] | None) -> tuple[Any, Any]:
        raise NotImplementedError

    def _to_output(self, data: dict, labels: list[dict] | None, return_tensors: str | None) -> tuple[dict, list]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ main entry

    def preprocess(
        self,
        images: Any,
        annotations: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        return_segmentation_masks: bool | None = None,
        masks_path: Any = None,
        **kwargs,
    ) -> BatchFeature:
        """
        Preprocess one image or a list of images (and optionally their COCO-detection annotations).

        Args:
            images: a single image or a list of images (PIL / numpy HWC / torch CHW / path / URL, see the class
                docstring).
            annotations (`dict` or `list[dict]`, *optional*): one COCO-detection dict per image.
            return_segmentation_masks, masks_path: accepted for transformers' signature; masks are not supported.
            **kwargs: per-call overrides of any option (see the class docstring), e.g. `size`, `do_pad`,
                `return_tensors`, `input_data_format`, `device`.

        Returns:
            [`BatchFeature`] with
            - `pixel_values`: `(B, 3, H, W)` float32 (a list of `(3, h_i, w_i)` if `do_pad=False` and sizes differ);
            - `pixel_mask`: `(B, H, W)` int64, 1 = valid pixel (only when `do_pad`);
            - `labels` (only with annotations): list of B dicts with `class_labels` (n,) int64, `boxes` (n, 4)
              float32 (see `do_convert_annotations`), `image_id` (1,), `orig_size` (2,) and `size` (2,) as (h, w)
              int64, `area` (n,) float32 in resized pixels, `iscrowd` (n,) int64.
        """
        self._reject_unknown(kwargs, f"{type(self).__name__}.preprocess()", ValueError)
        if return_segmentation_masks:
            raise ValueError("return_segmentation_masks=True: Align-DETR is a box detector; masks are not produced.")
        if masks_path is not None:
            raise ValueError("masks_path is for format='coco_panoptic', which Align-DETR does not use.")
        options = self._resolve(kwargs)
        images = [self._read(image) for image in self._flatten_images(images)]
        if annotations is not None:
            annotations = self._check_annotations(annotations, len(images))

        pixel_values, labels = [], []
        for index, raw_image in enumerate(images):
            array, kind = _as_chw_array(raw_image, options["input_data_format"], options["do_convert_rgb"])
            image = self._prepare_image(array, kind, options["device"])
            orig_size = tuple(array.shape[-2:])
            new_size = self._output_size(*orig_size, options["size"]) if options["do_resize"] else orig_size
            if new_size != orig_size:
                image = self._resize_image(image, new_size, options["resample"], round_to_uint8=kind == "uint8")
            image = self._rescale_and_normalize(image, options)
            pixel_values.append(image)
            if annotations is not None:
                labels.append(self._convert_annotation(annotations[index], orig_size, new_size,
                                                       options["do_convert_annotations"]))

        data: dict[str, Any] = {}
        if options["do_pad"]:
            pad_size = options["pad_size"]
            target = None if pad_size is None else (pad_size["height"], pad_size["width"])
            data["pixel_values"], data["pixel_mask"] = self._pad_images(pixel_values, target)
        else:
            data["pixel_values"] = pixel_values
        data, labels = self._to_output(data, labels if annotations is not None else None, options["return_tensors"])
        if annotations is not None:
            data["labels"] = labels
        # Arrays are built already; no tensor_type so BatchFeature does not try to stack `labels`.
        return BatchFeature(data=data)

    def __call__(self, images: Any = None, annotations: Any = None, **kwargs) -> BatchFeature:
        if images is None:
            raise ValueError("`images` is required.")
        return self.preprocess(images, annotations=annotations, **kwargs)

    # ------------------------------------------------------------------------------------------ post-processing

    @staticmethod
    def _check_target_sizes(target_sizes: Any, batch: int) -> None:
        """One (height, width) pair of positive numbers per image, else a ValueError saying what was given."""
        expected = f"pass one (height, width) per image, e.g. a ({batch}, 2) tensor"
        if isinstance(target_sizes, (torch.Tensor, np.ndarray)):
            if target_sizes.ndim != 2 or target_sizes.shape[1] != 2:
                raise ValueError(f"target_sizes must have shape ({batch}, 2), got {tuple(target_sizes.shape)}; "
                                 f"{expected}.")
            sizes = target_sizes.tolist()
        else:
            sizes = list(target_sizes)
        if len(sizes) != batch:
            raise ValueError(
                f"target_sizes has {len(sizes)} entries but the outputs hold {batch} images; {expected}."
            )
        for i, size in enumerate(sizes):
            try:
                height, width = (float(v) for v in size)
            except (TypeError, ValueError):
                raise ValueError(
                    f"target_sizes[{i}] must be a (height, width) pair, got {size!r}; {expected}."
                ) from None
            if not (math.isfinite(height) and math.isfinite(width) and height > 0 and width > 0):
                raise ValueError(f"target_sizes[{i}] must be positive finite (height, width), got {size!r}.")

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.0,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        top_k: int = 300,
    ) -> list[dict[str, torch.Tensor]]:
        """
        Turn raw detector outputs into detections, as mmdet's `DETRHead._predict_by_feat_single` (no NMS).

        Sigmoid over all `Q x C` query-class pairs, top-`top_k` over the flattened scores (query = index // C,
        label = index % C, so a query can appear with several labels), boxes cxcywh -> xyxy, scaled by each target
        size and clamped to the image, then `score > threshold` is kept.

        mmdet scales to the resized image, clamps there and divides by the per-axis scale factor; scaling the
        normalised boxes by the original size and clamping to `[0, w] x [0, h]` is the same up to float rounding
        (~1e-4 px), because `clamp(0, new_w) / (new_w / w) == clamp(0, w)`.

        Args:
            outputs: object with `logits` `(B, Q, C)` and `pred_boxes` `(B, Q, 4)` (cxcywh in [0, 1]).
            threshold (`float`, defaults to 0.0): keep detections with score strictly above it (mmdet: none); a
                finite number (NaN would silently keep nothing).
            target_sizes (`torch.Tensor` `(B, 2)` or list of `(h, w)`, *optional*): original image sizes. If `None`,
                boxes are returned normalised to [0, 1] (not clamped).
            top_k (`int`, defaults to 300): detections per image before thresholding (mmdet `max_per_img`).

        Returns:
            `list[dict]`, one per image: `scores` (k,), `labels` (k,) int64, `boxes` (k, 4) xyxy.
        """
        try:
            threshold_value = float(threshold)
        except (TypeError, ValueError):
            threshold_value = float("nan")
        if not math.isfinite(threshold_value):
            raise ValueError(f"threshold must be a finite number (a score between 0 and 1), got {threshold!r}.")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        pred_boxes = outputs["pred_boxes"] if isinstance(outputs, dict) else outputs.pred_boxes
        if logits.ndim != 3 or pred_boxes.ndim != 3 or pred_boxes.shape[:2] != logits.shape[:2]:
            raise ValueError(
                f"Expected logits (B, Q, C) and pred_boxes (B, Q, 4), got {tuple(logits.shape)} and "
                f"{tuple(pred_boxes.shape)}."
            )
        batch, num_queries, num_classes = logits.shape
        # float32 whatever the model's dtype: bf16 has 8 mantissa bits, 16 px steps at 5000 px
        logits, pred_boxes = logits.float(), pred_boxes.float()
        finite = torch.isfinite(logits).flatten(1).all(1) & torch.isfinite(pred_boxes).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise ValueError(
                f"The model outputs hold non-finite values (NaN/inf) for image(s) {bad[:10]}: detections would be "
                "meaningless. Check those input images (NaN pixels?) and the model weights."
            )
        if target_sizes is not None:
            self._check_target_sizes(target_sizes, batch)

        probs = logits.sigmoid().flatten(1)  # (B, Q*C)
        k = min(int(top_k), num_queries * num_classes)
        scores, flat_index = probs.topk(k, dim=1)
        query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
        labels = flat_index % num_classes
        boxes = box_cxcywh_to_xyxy(pred_boxes.gather(1, query_index[..., None].expand(-1, -1, 4)))

        if target_sizes is not None:
            if isinstance(target_sizes, torch.Tensor):
                sizes = target_sizes.reshape(batch, 2).to(device=boxes.device, dtype=boxes.dtype)
            else:
                sizes = torch.tensor(
                    [[float(h), float(w)] for h, w in target_sizes], device=boxes.device, dtype=boxes.dtype
                )
            heights, widths = sizes[:, 0], sizes[:, 1]
            scale = torch.stack([widths, heights, widths, heights], dim=1)[:, None, :]  # (B, 1, 4)
            boxes = boxes * scale
            # clamp each coordinate to [0, w] or [0, h] (mmdet clamps to the image)
            boxes = torch.minimum(boxes.clamp(min=0), scale)

        results = []
        for s, l, b in zip(scores, labels, boxes):
            keep = s > threshold_value
            results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
        return results


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

    @staticmethod
    def to_float_rgb(image: Any, input_data_format: str | None = None) -> tuple[torch.Tensor, bool]:
        """One raw image -> float32 `(3, H, W)` RGB tensor on the 0-255 scale, plus whether the source was uint8.
        (Step 1 of the class docstring; the data loaders use it too, so every path converts pixels alike.)"""
        array, kind = _as_chw_array(image, input_data_format)
        return AlignDetrImageProcessor._to_float_tensor(array, kind, None), kind == "uint8"

    @staticmethod
    def _to_float_tensor(array: np.ndarray, kind: str, device: torch.device | None) -> torch.Tensor:
        if kind == "uint16":  # torch has limited uint16 support; int32 is exact
            array = array.astype(np.int32)
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # e.g. a view of a PIL image: torch would warn
            array = array.copy()
        tensor = torch.from_numpy(array)
        if device is not None:
            tensor = tensor.to(device)  # before the float conversion: moves 1 byte per uint8 pixel, not 4
        tensor = tensor.to(torch.float32)
        if _TO_255[kind] is not None:
            tensor = tensor * _TO_255[kind]
        return tensor.contiguous()

    def _prepare_image(self, image, kind, device):
        return self._to_float_tensor(image, kind, device)

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


def __getattr__(name: str):
    # The NumPy twin lives in its own file (transformers' layout); importing it at module level would be a cycle.
    # This relative import also makes transformers copy that file with this one into every saved folder.
    if name == "AlignDetrImageProcessorPil":
        from .image_processing_pil_align_detr import AlignDetrImageProcessorPil

        return AlignDetrImageProcessorPil
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
