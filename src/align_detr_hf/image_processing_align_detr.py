"""Image processor for Align-DETR: mmdetection's test pipeline (keep-ratio resize, normalise, pad) in pure PyTorch."""

from __future__ import annotations

import math
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
_CHANNELS_FIRST = ("channels_first", "first")
_CHANNELS_LAST = ("channels_last", "last")

__all__ = ["AlignDetrImageProcessor", "get_resize_output_size", "pad_and_create_pixel_mask"]


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
    max_height = max(image.shape[1] for image in pixel_values_list)
    max_width = max(image.shape[2] for image in pixel_values_list)
    if pad_size is not None:
        if pad_size[0] < max_height or pad_size[1] < max_width:
            raise ValueError(
                f"pad_size {tuple(pad_size)} is smaller than the largest image ({max_height}, {max_width})."
            )
        max_height, max_width = int(pad_size[0]), int(pad_size[1])

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


class AlignDetrImageProcessor(BaseImageProcessor):
    r"""
    Image processor reproducing mmdetection's Align-DETR test pipeline (`Resize(scale=(1333, 800), keep_ratio=True)`
    followed by `DetDataPreprocessor`), implemented with PyTorch only (no torchvision, no OpenCV).

    Steps, per image:
    1. Convert to a float32 `(3, H, W)` RGB tensor on the 0-255 scale. Accepted: `PIL.Image.Image` (any mode;
       grayscale/RGBA/palette are converted to RGB, alpha is dropped; 16-bit modes `I;16*` and `I` - the mode older
       Pillow gives 16-bit PNGs - are read as 16-bit, values outside 0-65535 raise), `np.ndarray`, `torch.Tensor`,
       2-d grayscale arrays, 4-d arrays/tensors as a batch. dtypes: uint8 (0-255), uint16 (scaled by 255/65535),
       floating point in [0, 1] (scaled by 255). Anything else raises a `ValueError`.
       Channel axis (transformers' `input_data_format`): `"channels_first"` (CHW) or `"channels_last"` (HWC) when
       given. Otherwise the one axis (first or last) of size 1, 3 or 4 is the channel axis; when both could be
       (e.g. `(3, 5, 3)` or `(4, 6, 3)`) the shape is ambiguous and a `ValueError` asks for `input_data_format`
       (transformers would guess channels-first and warn; a wrong guess silently swaps height and channels).
    2. Keep-ratio resize with mmcv's rounding, see [`get_resize_output_size`] (480x640 -> 800x1067). Bilinear
       resizing is `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`: the same half-pixel
       sampling and edge clamping as cv2 `INTER_LINEAR`, and, like cv2, no antialiasing when downscaling. For uint8
       inputs the result is rounded back to integers, because cv2 works in uint8 and mmdet's resized image is
       uint8. Expected difference to cv2: at most 1 grey level, i.e. <= 1/57.12 = 0.0175 after normalisation, and
       most pixels identical: before rounding we match a float64 re-implementation of cv2's sampling rule to
       < 5e-3 grey levels (tested), while cv2's 11-bit fixed-point weights move its own value by up to ~0.25 grey
       levels before it rounds. (cv2 itself is not a dependency and was not run.)
    3. Normalise `(x - mean) / std` with mean `[123.675, 116.28, 103.53]` and std `[58.395, 57.12, 57.375]` on the
       0-255 scale (ImageNet's values x 255). Note `image_mean`/`image_std` are on the 0-255 scale here, unlike
       most transformers processors (which rescale by 1/255 first); the arithmetic is then exactly mmdet's.
    4. Zero-pad bottom/right to the largest image of the call, *after* normalisation, and return `pixel_mask`
       (int64, 1 = valid pixel). See [`pad_and_create_pixel_mask`], which data collators can reuse.

    Annotations (COCO detection format, one dict per image: `{"image_id": int, "annotations": [{"bbox": [x, y, w,
    h], "category_id": int, "iscrowd": 0/1, "area": float}, ...]}`) become `labels`: crowd boxes are dropped,
    boxes are clipped to the image and degenerate ones (zero width or height after clipping) removed;
    `category_id` is used as the class id as given. Malformed objects raise a `ValueError` naming the image_id and
    object index: a missing `bbox`/`category_id`, a bbox that is not 4 finite numbers, a negative width or height,
    an object whose `image_id` is another image's, duplicate annotation `id`s.

    **Box normalisation differs from transformers' DeformableDetr/DETR processors.** `labels[i]["boxes"]` are
    `cxcywh` normalised by the *resized, unpadded* image size (`labels[i]["size"]`), as mmdet/DINO train, and
    padding never changes them. transformers' DETR-family processors (since PR #28363) re-normalise boxes to the
    *padded* canvas when a call pads images of different sizes. The Align-DETR model predicts boxes relative to
    the valid region (it uses `pixel_mask`/valid ratios), so targets normalised to the padded canvas would be
    wrong for it.

    Args:
        do_resize (`bool`, defaults to `True`): apply the keep-ratio resize.
        size (`dict[str, int]`, defaults to `{"shortest_edge": 800, "longest_edge": 1333}`): either
            `{"shortest_edge", "longest_edge"}` (keep ratio, `longest_edge` optional) or `{"height", "width"}`
            (exact size, ratio not kept, as mmdet's `keep_ratio=False`).
        resample (`int`, defaults to `2` = `PIL.Image.Resampling.BILINEAR`): 0 (nearest), 2 (bilinear) or
            3 (bicubic).
        do_normalize (`bool`, defaults to `True`): subtract `image_mean` and divide by `image_std` (0-255 scale).
            Without it `pixel_values` are the 0-255 float pixels.
        image_mean (`list[float]`, defaults to `[123.675, 116.28, 103.53]`).
        image_std (`list[float]`, defaults to `[58.395, 57.12, 57.375]`).
        do_pad (`bool`, defaults to `True`): pad the batch and return `pixel_mask`. Without it, images of different
            sizes come back as a list of `(3, h, w)` tensors (for a collator to pad) and no `pixel_mask` is made.
        pad_size (`dict[str, int]`, *optional*): `{"height", "width"}` of a fixed padding canvas instead of the
            batch maximum.
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = ImagesKwargs

    # Class-level defaults (also what `BaseImageProcessor.to_dict` compares against).
    do_resize = True
    size = {"shortest_edge": 800, "longest_edge": 1333}
    resample = 2
    do_normalize = True
    image_mean = ALIGN_DETR_MEAN
    image_std = ALIGN_DETR_STD
    do_pad = True
    pad_size = None

    _override_names = (
        "do_resize", "size", "resample", "do_normalize", "image_mean", "image_std", "do_pad", "pad_size"
    )  # fmt: skip

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | None = None,
        resample: int = 2,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_pad: bool = True,
        pad_size: dict[str, int] | None = None,
        **kwargs,
    ) -> None:
        # transformers' legacy DETR keyword; accept it so old configs still load.
        max_size = kwargs.pop("max_size", None)
        unknown = set(kwargs) - set(_BOOKKEEPING_KEYS)
        if unknown:  # a typo such as do_normalise=False would otherwise be stored and silently ignored
            raise TypeError(self._unknown_arguments_message(unknown, "AlignDetrImageProcessor()"))
        super().__init__(**kwargs)
        if size is None:
            size = {"shortest_edge": 800, "longest_edge": 1333 if max_size is None else max_size}
        self.do_resize = do_resize
        self.size = self._check_size(size)
        self.resample = self._check_resample(resample)
        self.do_normalize = do_normalize
        self.image_mean = [float(v) for v in (ALIGN_DETR_MEAN if image_mean is None else image_mean)]
        self.image_std = [float(v) for v in (ALIGN_DETR_STD if image_std is None else image_std)]
        self.do_pad = do_pad
        self.pad_size = None if pad_size is None else self._check_pad_size(pad_size)

    # ------------------------------------------------------------------------------------------ argument checks

    @classmethod
    def _unknown_arguments_message(cls, unknown, where: str) -> str:
        import difflib

        accepted = list(cls._override_names)
        hints = []
        for key in sorted(unknown):
            close = difflib.get_close_matches(key, accepted + ["input_data_format"], n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"Unexpected keyword argument(s) for {where}: {', '.join(hints)}; accepted: {accepted}."

    @staticmethod
    def _check_size(size: Any) -> dict[str, int]:
        if not isinstance(size, dict):
            raise ValueError(f"size must be a dict, got {size!r}.")
        size = dict(size)
        if "shortest_edge" in size and set(size) <= {"shortest_edge", "longest_edge"}:
            if size.get("longest_edge") is None:
                size.pop("longest_edge", None)
            if any(int(v) <= 0 for v in size.values()):
                raise ValueError(f"size values must be positive, got {size}.")
            return {k: int(v) for k, v in size.items()}
        if set(size) == {"height", "width"}:
            if int(size["height"]) <= 0 or int(size["width"]) <= 0:
                raise ValueError(f"size values must be positive, got {size}.")
            return {"height": int(size["height"]), "width": int(size["width"])}
        raise ValueError(
            "size must be {'shortest_edge': int, 'longest_edge': int} or {'height': int, 'width': int}, "
            f"got {size}."
        )

    @staticmethod
    def _check_resample(resample: Any) -> int:
        value = int(resample)  # PIL's Resampling enum is an IntEnum
        if value not in _RESAMPLE_TO_TORCH_MODE:
            raise ValueError(f"resample must be 0 (nearest), 2 (bilinear) or 3 (bicubic), got {resample!r}.")
        return value

    @staticmethod
    def _check_pad_size(pad_size: Any) -> dict[str, int]:
        if not isinstance(pad_size, dict) or set(pad_size) != {"height", "width"}:
            raise ValueError(f"pad_size must be {{'height': int, 'width': int}}, got {pad_size!r}.")
        return {"height": int(pad_size["height"]), "width": int(pad_size["width"])}

    # ------------------------------------------------------------------------------------------ input conversion

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
    def to_float_rgb(image: Any, input_data_format: str | None = None) -> tuple[torch.Tensor, bool]:
        """
        One raw image -> float32 `(3, H, W)` RGB tensor on the 0-255 scale, plus whether the source was uint8.
        (Step 1 of the class docstring; the data loaders use it too, so every path converts pixels alike.)
        """
        if _PIL_IMAGE_TYPE and isinstance(image, _PIL_IMAGE_TYPE):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"Got a zero-size PIL image ({image.width}x{image.height}).")
            input_data_format = "channels_last"
            if image.mode == "I":  # 32-bit ints; Pillow < 10.? opens 16-bit PNGs in this mode
                image = np.array(image)
                low, high = int(image.min()), int(image.max())
                if low < 0 or high > 65535:
                    raise ValueError(
                        f"PIL mode 'I' image with values in [{low}, {high}]: read as 16-bit, values must lie in "
                        "[0, 65535]; convert it to 8-bit ('L'/'RGB') or 16-bit yourself first."
                    )
                image = image.astype(np.uint16)
            elif image.mode in _PIL_MODES_16BIT or image.mode == "F":
                image = np.array(image)  # keep 16-bit / float precision, handled below
            else:
                if image.mode != "RGB":
                    image = image.convert("RGB")  # L, LA, P, RGBA, CMYK, I, ... ; alpha is dropped like cv2 does
                # HWC uint8, writable copy so torch.from_numpy does not warn
                image = np.array(image)

        if isinstance(image, np.ndarray):
            if image.dtype == np.uint16:
                # torch has limited uint16 support; go through int32 (exact).
                tensor = torch.from_numpy(image.astype(np.int32))
                source_dtype = torch.uint16
            elif image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating):
                tensor = torch.from_numpy(np.ascontiguousarray(image))
                source_dtype = tensor.dtype
            else:
                raise ValueError(
                    f"Unsupported image dtype {image.dtype}: use uint8 (0-255), uint16 (0-65535) or float in [0, 1]."
                )
        elif isinstance(image, torch.Tensor):
            tensor = image.detach().cpu()
            source_dtype = tensor.dtype
            if source_dtype == torch.uint16:
                tensor = tensor.to(torch.int32)
            elif not (source_dtype == torch.uint8 or tensor.is_floating_point()):
                raise ValueError(
                    f"Unsupported image dtype {source_dtype}: use uint8 (0-255), uint16 (0-65535) or float in [0, 1]."
                )
        else:
            raise ValueError(
                f"Unsupported image type {type(image).__name__}: pass a PIL.Image.Image, a numpy array (HWC) or a "
                "torch tensor (CHW), or a list of them."
            )

        # Layout -> (C, H, W)
        if tensor.ndim == 2:
            tensor = tensor[None]
        elif tensor.ndim == 3:
            hwc = tensor.shape[-1] in (1, 3, 4)
            chw = tensor.shape[0] in (1, 3, 4)
            fmt = None if input_data_format is None else str(getattr(input_data_format, "value", input_data_format))
            if fmt is None:
                if hwc and chw:  # e.g. (3, 5, 3): guessing would silently swap height and channels
                    raise ValueError(
                        f"Ambiguous image shape {tuple(tensor.shape)}: both the first and the last axis could be "
                        "the channels. Pass input_data_format='channels_first' (C, H, W) or 'channels_last' (H, W, C)."
                    )
                if not (hwc or chw):
                    raise ValueError(
                        f"Cannot find the channel axis of an image of shape {tuple(tensor.shape)}: expected 1, 3 or "
                        "4 channels on the first or the last axis."
                    )
                is_hwc = hwc
            elif fmt in _CHANNELS_FIRST + _CHANNELS_LAST:
                is_hwc = fmt in _CHANNELS_LAST
                if not (hwc if is_hwc else chw):
                    raise ValueError(
                        f"Image of shape {tuple(tensor.shape)} has no 1, 3 or 4 channels on the "
                        f"{'last' if is_hwc else 'first'} axis (input_data_format={fmt!r})."
                    )
            else:
                raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {fmt!r}.")
            if is_hwc:
                tensor = tensor.permute(2, 0, 1)
        else:
            raise ValueError(
                f"An image must be 2-d (grayscale) or 3-d (with channels), got shape {tuple(tensor.shape)}."
            )
        if tensor.shape[1] == 0 or tensor.shape[2] == 0:
            raise ValueError(f"Got a zero-size image of shape {tuple(tensor.shape)} (C, H, W).")

        # Channels -> RGB
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        elif tensor.shape[0] == 4:
            tensor = tensor[:3]  # drop alpha

        # Value range -> float32 on the 0-255 scale
        if source_dtype == torch.uint8:
            tensor = tensor.to(torch.float32)
        elif source_dtype == torch.uint16:
            tensor = tensor.to(torch.float32) * (255.0 / 65535.0)
        else:
            tensor = tensor.to(torch.float32)
            low, high = tensor.min().item(), tensor.max().item()
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError("Float image contains NaN or infinite values.")
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    f"Float images must have values in [0, 1], got values in [{low:.4g}, {high:.4g}]. "
                    "Pass 0-255 data as uint8, or divide by 255 first."
                )
            tensor = tensor * 255.0
        return tensor.contiguous(), source_dtype == torch.uint8

    # ------------------------------------------------------------------------------------------ operations

    def resize(
        self, image: torch.Tensor, size: dict[str, int], resample: int = 2, round_to_uint8: bool = False
    ) -> torch.Tensor:
        """
        Resize a float `(C, H, W)` image; see the class docstring for the sizing rule and the interpolation.

        `round_to_uint8` rounds and clamps the result to integers in [0, 255], as cv2 does on uint8 images.
        """
        height, width = image.shape[-2:]
        if "shortest_edge" in size:
            new_size = get_resize_output_size(height, width, size["shortest_edge"], size.get("longest_edge"))
        else:
            new_size = (size["height"], size["width"])
        if new_size == (height, width):
            return image
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
            if image_id is not None and "image_id" in obj and obj["image_id"] != image_id:
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
    ) -> dict[str, torch.Tensor]:
        """One COCO-detection annotation dict -> Align-DETR target dict (see the class docstring)."""
        if not isinstance(annotation, dict) or "annotations" not in annotation:
            raise ValueError(
                "Each annotation must be a dict {'image_id': int, 'annotations': [{'bbox': [x, y, w, h], "
                f"'category_id': int, ...}}, ...]}} (COCO detection format), got {type(annotation).__name__}."
            )
        objects = annotation["annotations"]
        if not isinstance(objects, (list, tuple)):
            raise ValueError("annotation['annotations'] must be a list of object dicts.")
        orig_h, orig_w = orig_size
        new_h, new_w = new_size
        AlignDetrImageProcessor._check_objects(annotation.get("image_id"), objects)

        objects = [obj for obj in objects if not obj.get("iscrowd", 0)]  # crowd regions are not targets
        boxes = torch.tensor([obj["bbox"] for obj in objects], dtype=torch.float64).reshape(-1, 4)
        classes = torch.tensor([int(obj["category_id"]) for obj in objects], dtype=torch.int64)

        # xywh -> xyxy, clipped to the original image (float64 so clipping/scaling adds no float32 error)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, orig_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, orig_h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        clipped_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        area = torch.tensor(
            [float(obj["area"]) if "area" in obj else float(a) for obj, a in zip(objects, clipped_area)],
            dtype=torch.float64,
        )
        boxes, classes, area = boxes[keep], classes[keep], area[keep]

        # Actual per-axis scale factors (mmdet's scale_factor = new / old)
        scale_w, scale_h = new_w / orig_w, new_h / orig_h
        boxes[:, 0::2] *= scale_w
        boxes[:, 1::2] *= scale_h
        area = area * (scale_w * scale_h)

        # cxcywh normalised by the resized, unpadded image (not by the padded canvas, see class docstring)
        cxcywh = torch.stack(
            [
                (boxes[:, 0] + boxes[:, 2]) / 2 / new_w,
                (boxes[:, 1] + boxes[:, 3]) / 2 / new_h,
                (boxes[:, 2] - boxes[:, 0]) / new_w,
                (boxes[:, 3] - boxes[:, 1]) / new_h,
            ],
            dim=-1,
        )
        return {
            "image_id": torch.tensor([int(annotation.get("image_id", -1))], dtype=torch.int64),
            "class_labels": classes,
            "boxes": cxcywh.to(torch.float32),
            "area": area.to(torch.float32),
            "iscrowd": torch.zeros_like(classes),
            "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
            "size": torch.tensor([new_h, new_w], dtype=torch.int64),
        }

    # ------------------------------------------------------------------------------------------ main entry

    def preprocess(
        self,
        images: Any,
        annotations: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Preprocess one image or a list of images (and optionally their COCO-detection annotations).

        Args:
            images: a single image or a list of images (PIL / numpy HWC / torch CHW, see the class docstring).
            annotations (`dict` or `list[dict]`, *optional*): one COCO-detection dict per image.
            return_tensors (`str`, defaults to `"pt"`): `"pt"` (or `None`) for torch tensors, `"np"` for numpy.
            **kwargs: per-call overrides of `do_resize`, `size`, `resample`, `do_normalize`, `image_mean`,
                `image_std`, `do_pad`, `pad_size`; and `input_data_format` (`"channels_first"` /
                `"channels_last"`) for numpy/torch images whose channel axis is ambiguous (see the class docstring).

        Returns:
            [`BatchFeature`] with
            - `pixel_values`: `(B, 3, H, W)` float32 (a list of `(3, h_i, w_i)` if `do_pad=False` and sizes differ);
            - `pixel_mask`: `(B, H, W)` int64, 1 = valid pixel (only when `do_pad`);
            - `labels` (only with annotations): list of B dicts with `class_labels` (n,) int64, `boxes` (n, 4)
              float32 cxcywh normalised to the resized unpadded image, `image_id` (1,), `orig_size` (2,) and
              `size` (2,) as (h, w) int64, `area` (n,) float32 in resized pixels, `iscrowd` (n,) int64.
        """
        input_data_format = kwargs.pop("input_data_format", None)
        unknown = set(kwargs) - set(self._override_names)
        if unknown:
            raise ValueError(self._unknown_arguments_message(unknown, "AlignDetrImageProcessor.preprocess()"))
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}.")
        do_resize = kwargs.get("do_resize", self.do_resize)
        size = self._check_size(kwargs.get("size", self.size))
        resample = self._check_resample(kwargs.get("resample", self.resample))
        do_normalize = kwargs.get("do_normalize", self.do_normalize)
        image_mean = kwargs.get("image_mean", self.image_mean)
        image_std = kwargs.get("image_std", self.image_std)
        do_pad = kwargs.get("do_pad", self.do_pad)
        pad_size = kwargs.get("pad_size", self.pad_size)
        pad_size = None if pad_size is None else self._check_pad_size(pad_size)

        images = self._flatten_images(images)
        if annotations is not None:
            if isinstance(annotations, dict):
                annotations = [annotations]
            if not isinstance(annotations, (list, tuple)) or len(annotations) != len(images):
                got = len(annotations) if isinstance(annotations, (list, tuple)) else type(annotations).__name__
                raise ValueError(f"Expected one annotation dict per image ({len(images)}), got {got}.")

        pixel_values_list, labels = [], []
        for index, raw_image in enumerate(images):
            image, from_uint8 = self.to_float_rgb(raw_image, input_data_format)
            orig_size = tuple(image.shape[-2:])
            if do_resize:
                image = self.resize(image, size, resample, round_to_uint8=from_uint8)
            if do_normalize:
                # `image` is always a fresh tensor here (conversion/resize copied it), so in place is safe.
                image = self.normalize(image, image_mean, image_std, inplace=True)
            pixel_values_list.append(image)
            if annotations is not None:
                labels.append(self._convert_annotation(annotations[index], orig_size, tuple(image.shape[-2:])))

        data: dict[str, Any] = {}
        if do_pad:
            target = None if pad_size is None else (pad_size["height"], pad_size["width"])
            data["pixel_values"], data["pixel_mask"] = pad_and_create_pixel_mask(pixel_values_list, target)
        elif len({tuple(p.shape) for p in pixel_values_list}) == 1:
            data["pixel_values"] = torch.stack(pixel_values_list)
        else:
            data["pixel_values"] = pixel_values_list

        if return_tensors == "np":
            data = {
                k: [t.numpy() for t in v] if isinstance(v, list) else v.numpy() for k, v in data.items()
            }
            labels = [{k: v.numpy() for k, v in target.items()} for target in labels]
        if annotations is not None:
            data["labels"] = labels
        # Tensors are built already; no tensor_type so BatchFeature does not try to stack `labels`.
        return BatchFeature(data=data)

    def __call__(self, images: Any = None, annotations: Any = None, return_tensors: str | None = "pt", **kwargs):
        if images is None:
            raise ValueError("`images` is required.")
        return self.preprocess(images, annotations=annotations, return_tensors=return_tensors, **kwargs)

    # ------------------------------------------------------------------------------------------ post-processing

    @staticmethod
    def _check_target_sizes(target_sizes: Any, batch: int) -> None:
        """One (height, width) pair of positive numbers per image, else a ValueError saying what was given."""
        expected = f"pass one (height, width) per image, e.g. a ({batch}, 2) tensor"
        if isinstance(target_sizes, torch.Tensor):
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
                raise ValueError(f"target_sizes[{i}] must be a (height, width) pair, got {size!r}; {expected}.") from None
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
            threshold (`float`, defaults to 0.0): keep detections with score strictly above it (mmdet: none).
            target_sizes (`torch.Tensor` `(B, 2)` or list of `(h, w)`, *optional*): original image sizes. If `None`,
                boxes are returned normalised to [0, 1] (not clamped).
            top_k (`int`, defaults to 300): detections per image before thresholding (mmdet `max_per_img`).

        Returns:
            `list[dict]`, one per image: `scores` (k,), `labels` (k,) int64, `boxes` (k, 4) xyxy.
        """
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
        k = min(top_k, num_queries * num_classes)
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
            keep = s > threshold
            results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
        return results
