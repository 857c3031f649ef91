"""Detection datasets, the reference train-time augmentation and a padding collator for Align-DETR.

Sources:
- a local COCO-format folder (annotation json + image directory): [`load_coco_folder`];
- a `datasets.Dataset` with the common `objects` schema (`objects = {"bbox": [[x, y, w, h], ...], "category":
  [...]}`, as in cppe-5): [`load_hf_dataset`].

Both give a [`DetectionDataset`] whose categories are mapped to contiguous ids `0..K-1` (`id2label`), whose items are
`{"pixel_values": (3, h, w) float32 normalised, "labels": {"class_labels", "boxes" (cxcywh normalised to the
item's own unpadded size), "image_id", "orig_size", "size"}}`, and which can export its ground truth as a COCO dict
for [`align_detr_hf.evaluation`].

Augmentation ([`build_train_transforms`]) follows mmdetection's Align-DETR train pipeline (spec section 2.11):
horizontal flip (p=0.5), then either a multi-scale keep-ratio resize (shorter side 480..800 step 32, longer side
at most 1333) or resize (400/500/600, max 4200) -> random crop (384..600, absolute range, boxes clipped, empty boxes
dropped, crops without boxes allowed) -> the multi-scale resize. All sizes are multiplied by `scale`, so a CPU demo
can train on small images with the same recipe. It is written with torch only (no albumentations/torchvision);
resizes are bilinear without antialiasing, rounded to uint8 like cv2.

Randomness is drawn from a `torch.Generator` seeded from `(seed, epoch, index)` of each item, so augmentation does
not depend on worker processes or on global RNG state, and a resumed run sees exactly the same augmented samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .box_ops import box_xyxy_to_cxcywh
from .image_processing_align_detr import (
    ALIGN_DETR_MEAN,
    ALIGN_DETR_STD,
    AlignDetrImageProcessor,
    get_resize_output_size,
    pad_and_create_pixel_mask,
)
from .image_io import displayed_size, open_image, to_rgb8, to_rgb_tensor
from .validation import Integer, check_coco, check_objects_row

__all__ = [
    "AspectRatioBatchSampler",
    "Compose",
    "DetectionDataset",
    "EpochShuffleSampler",
    "RandomChoice",
    "RandomChoiceResize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Resize",
    "build_eval_transforms",
    "build_train_loader",
    "build_train_transforms",
    "check_finite_batch",
    "collate_fn",
    "default_num_workers",
    "load_coco_folder",
    "load_hf_dataset",
    "padding_fraction",
    "read_coco_json",
]


# ---------------------------------------------------------------------------------------------------- transforms
# A transform is `t(image, target, generator) -> (image, target)`: image a (3, H, W) float32 tensor on the 0-255
# scale, target {"boxes": (n, 4) float32 absolute xyxy, "class_labels": (n,) int64}.


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image, target, generator):
        for transform in self.transforms:
            image, target = transform(image, target, generator)
        return image, target

    def __repr__(self):
        return f"Compose({self.transforms})"


class RandomChoice:
    """Apply one of several transforms (or lists of transforms), chosen uniformly (mmcv `RandomChoice`)."""

    def __init__(self, choices: Sequence[Callable | Sequence[Callable]]):
        self.choices = [c if callable(c) else Compose(c) for c in choices]

    def __call__(self, image, target, generator):
        return self.choices[_randint(0, len(self.choices) - 1, generator)](image, target, generator)

    def __repr__(self):
        return f"RandomChoice({self.choices})"


class RandomHorizontalFlip:
    """Flip left-right with probability `p`; a box [x0, y0, x1, y1] becomes [W - x1, y0, W - x0, y1]."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, generator):
        if torch.rand((), generator=generator).item() >= self.p:
            return image, target
        width = image.shape[-1]
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        return image.flip(-1), {**target, "boxes": boxes}

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


def resize_image_and_boxes(image: torch.Tensor, target: dict, new_height: int, new_width: int):
    height, width = image.shape[-2:]
    if (new_height, new_width) != (height, width):
        image = F.interpolate(image[None], size=(new_height, new_width), mode="bilinear", align_corners=False)[0]
        image = image.round_().clamp_(0, 255)  # cv2 works in uint8
    scale = torch.tensor([new_width / width, new_height / height] * 2, dtype=torch.float32)
    return image, {**target, "boxes": target["boxes"] * scale}


class Resize:
    """Keep-ratio resize (mmcv `imrescale` rounding): shorter side to `shortest_edge`, longer side capped."""

    def __init__(self, shortest_edge: int, longest_edge: int | None = None):
        self.shortest_edge, self.longest_edge = shortest_edge, longest_edge

    def __call__(self, image, target, generator=None):
        new_h, new_w = get_resize_output_size(*image.shape[-2:], self.shortest_edge, self.longest_edge)
        return resize_image_and_boxes(image, target, new_h, new_w)

    def __repr__(self):
        return f"Resize({self.shortest_edge}, {self.longest_edge})"


class RandomChoiceResize:
    """Keep-ratio resize to one of `scales` = [(shortest_edge, longest_edge), ...], chosen uniformly."""

    def __init__(self, scales: Sequence[tuple[int, int | None]]):
        self.scales = [tuple(s) for s in scales]

    def __call__(self, image, target, generator):
        short, long = self.scales[_randint(0, len(self.scales) - 1, generator)]
        return Resize(short, long)(image, target)

    def __repr__(self):
        return f"RandomChoiceResize({self.scales})"


class RandomCrop:
    """mmdet `RandomCrop(crop_type="absolute_range", crop_size=(min, max), allow_negative_crop=True)`.

    Crop height and width are each uniform integers in [min(side, min_size), min(side, max_size)]; the offset is
    uniform over the remaining margin. Boxes are shifted, clipped to the crop, and those left with zero width or
    height are dropped (with their labels). A crop without any box is kept (`allow_negative_crop=True`).
    """

    def __init__(self, min_size: int, max_size: int):
        if min_size > max_size:
            raise ValueError(f"RandomCrop needs min_size <= max_size, got {min_size} > {max_size}.")
        self.min_size, self.max_size = min_size, max_size

    def __call__(self, image, target, generator):
        height, width = image.shape[-2:]
        crop_h = _randint(min(height, self.min_size), min(height, self.max_size), generator)
        crop_w = _randint(min(width, self.min_size), min(width, self.max_size), generator)
        top = _randint(0, height - crop_h, generator)
        left = _randint(0, width - crop_w, generator)
        return crop_image_and_boxes(image, target, top, left, crop_h, crop_w)

    def __repr__(self):
        return f"RandomCrop({self.min_size}, {self.max_size})"


def crop_image_and_boxes(image: torch.Tensor, target: dict, top: int, left: int, height: int, width: int):
    """Crop `image[..., top:top+height, left:left+width]`; clip boxes to it and drop the empty ones."""
    image = image[..., top : top + height, left : left + width]
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, {**target, "boxes": boxes[keep], "class_labels": target["class_labels"][keep]}


def _scaled(value: float, scale: float) -> int:
    return max(1, int(round(value * scale)))


def build_train_transforms(
    scale: float = 1.0,
    scales: Sequence[int] | None = None,
    max_size: int = 1333,
    crop_resize_scales: Sequence[int] = (400, 500, 600),
    crop_resize_max_size: int = 4200,
    crop_size: tuple[int, int] = (384, 600),
    flip_prob: float = 0.5,
) -> Compose:
    """The reference Align-DETR train augmentation; every size (the defaults or the ones given) is multiplied by
    `scale` (e.g. `scale=0.2` gives shorter sides 96..160 with max 267 for a CPU demo on ~128 px images).

    `scales` defaults to the shorter sides 480, 512, ..., 800 (step 32)."""
    if scales is None:
        scales = list(range(480, 801, 32))
    multi_scale = [(_scaled(s, scale), _scaled(max_size, scale)) for s in scales]
    crop_resize = [(_scaled(s, scale), _scaled(crop_resize_max_size, scale)) for s in crop_resize_scales]
    return Compose(
        [
            RandomHorizontalFlip(flip_prob),
            RandomChoice(
                [
                    RandomChoiceResize(multi_scale),
                    [
                        RandomChoiceResize(crop_resize),
                        RandomCrop(_scaled(crop_size[0], scale), _scaled(crop_size[1], scale)),
                        RandomChoiceResize(multi_scale),
                    ],
                ]
            ),
        ]
    )


def build_eval_transforms(scale: float = 1.0, shortest_edge: int = 800, longest_edge: int = 1333) -> Compose:
    """The reference test-time resize (shorter side 800, longer at most 1333), multiplied by `scale`."""
    return Compose([Resize(_scaled(shortest_edge, scale), _scaled(longest_edge, scale))])


# ---------------------------------------------------------------------------------------------------- datasets


class DetectionDataset(torch.utils.data.Dataset):
    """Detection records plus transforms; see the module docstring for the item format.

    Args:
        records: one dict per image: `image_id` (int), `width`, `height`, `annotations` (list of `{"bbox": [x, y, w,
            h] absolute, "category_id": contiguous id, "area": float, "iscrowd": 0/1}`), and either `file_name`
            (path) or `hf_index` (row of `hf_dataset`).
        id2label: contiguous id -> class name.
        transforms: a train/eval transform (see [`build_train_transforms`]); `None` keeps the original size.
        hf_dataset: the `datasets.Dataset` the records point into, if any.
        seed: base seed of the per-item augmentation generators.
        original_category_ids: contiguous id -> the source's category id (informational).
    """

    def __init__(
        self,
        records: list[dict],
        id2label: dict[int, str],
        transforms: Callable | None = None,
        hf_dataset: Any = None,
        seed: int = 0,
        original_category_ids: list | None = None,
        image_column: str = "image",
    ):
        self.records = records
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.label2id = {v: k for k, v in self.id2label.items()}
        self.transforms = transforms
        self.hf_dataset = hf_dataset
        self.seed = seed
        self.epoch = 0
        self.original_category_ids = original_category_ids or list(self.id2label)
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer indices (in this process). Loaders with persistent worker processes should
        index with `(index, epoch)` pairs instead, as [`AspectRatioBatchSampler`] does."""
        self.epoch = int(epoch)

    def with_transforms(self, transforms: Callable | None) -> DetectionDataset:
        return self.subset(range(len(self)), transforms)

    def subset(self, indices: Sequence[int], transforms: Callable | None = None) -> DetectionDataset:
        return DetectionDataset(
            [self.records[i] for i in indices], self.id2label, transforms, self.hf_dataset, self.seed,
            self.original_category_ids, self.image_column,
        )

    def split(self, val_fraction: float, seed: int = 0) -> tuple[DetectionDataset, DetectionDataset]:
        """Random train/val split (records only; set transforms with `with_transforms`)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        num_val = max(1, int(round(len(self) * val_fraction)))
        return self.subset(sorted(order[num_val:]), self.transforms), self.subset(sorted(order[:num_val]))

    def filter(self, filter_empty_gt: bool = True, min_size: int = 0) -> DetectionDataset:
        """mmdet's `CocoDataset.filter_data` (`filter_cfg=dict(filter_empty_gt, min_size)`).

        With `filter_empty_gt`, an image is dropped only if *no* annotation of a known category refers to it: mmdet
        tests membership in pycocotools' `catToImgs`, which lists every annotation, so images whose only annotations
        are crowd boxes, `"ignore": true` or degenerate boxes are kept (they train as negatives). Images whose shorter
        side (from the annotation file's `width`/`height`) is below `min_size` are dropped whatever they hold."""
        keep = [
            i
            for i, r in enumerate(self.records)
            if min(r["width"], r["height"]) >= min_size and (not filter_empty_gt or len(r["annotations"]) > 0)
        ]
        return self.subset(keep, self.transforms)

    def aspect_groups(self) -> list[int]:
        """Per image: 1 if width >= height, else 0 (portrait); the buckets of [`AspectRatioBatchSampler`]."""
        return [int(r["width"] >= r["height"]) for r in self.records]

    def load_image(self, index: int):
        """The 8-bit RGB PIL image of item `index` as displayed (for drawing; training reads `read_image`)."""
        return to_rgb8(self.read_image(index))

    def read_image(self, index: int):
        """The PIL image of item `index` in its own mode (16-bit stays 16-bit). Files are read by
        [`align_detr_hf.image_io.open_image`]: EXIF orientation applied, so boxes given for the displayed image (as
        COCO tools give them) line up. A `datasets` image is used as `datasets` decodes it. The image must have the
        record's width and height, else a ValueError names it."""
        record = self.records[index]
        if "file_name" in record:
            image, where = open_image(record["file_name"]), record["file_name"]
        else:
            image, where = self.hf_dataset[record["hf_index"]][self.image_column], f"row {record['hf_index']}"
        if image.size != (record["width"], record["height"]):
            raise ValueError(
                f"image {where} is {image.width}x{image.height} (width x height), but its record says "
                f"{record['width']}x{record['height']}: boxes would be misplaced."
            )
        return image

    def raw_target(self, index: int) -> dict[str, torch.Tensor]:
        """Non-crowd boxes (absolute xyxy float32) and contiguous labels of item `index`, before any transform."""
        # as mmdet's CocoDataset: no `ignore` or crowd boxes, none narrower or lower than 1 px, none with area <= 0
        objects = [
            a for a in self.records[index]["annotations"]
            if not a.get("ignore", False) and not a.get("iscrowd", 0)
            and a["bbox"][2] >= 1 and a["bbox"][3] >= 1 and a.get("area", 1) > 0
        ]  # fmt: skip
        boxes = torch.tensor([a["bbox"] for a in objects], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([int(a["category_id"]) for a in objects], dtype=torch.int64)
        return {"boxes": boxes, "class_labels": labels}

    def generator_for(self, index: int, epoch: int | None = None) -> torch.Generator:
        epoch = self.epoch if epoch is None else epoch
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        # an `(index, epoch)` pair (from `AspectRatioBatchSampler`) carries the epoch into worker processes, whose
        # copy of the dataset never sees `set_epoch` when they persist across epochs
        index, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        record = self.records[index]
        image = to_rgb_tensor(self.read_image(index))  # (3, h, w) float32 0-255, as the image processor converts
        target = self.raw_target(index)
        # clip to the image and drop degenerate boxes (as the image processor does)
        height, width = image.shape[-2:]
        target = crop_image_and_boxes(image, target, 0, 0, height, width)[1]
        if self.transforms is not None:
            image, target = self.transforms(image, target, self.generator_for(index, epoch))
        pixel_values = AlignDetrImageProcessor.normalize(image, ALIGN_DETR_MEAN, ALIGN_DETR_STD)
        return {"pixel_values": pixel_values, "labels": make_labels(target, image.shape[-2:], record)}

    def coco_ground_truth(self) -> dict[str, Any]:
        """The ground truth as a COCO dict (original image sizes, contiguous category ids, annotation ids >= 1)."""
        images, annotations = [], []
        for record in self.records:
            images.append({"id": record["image_id"], "width": record["width"], "height": record["height"]})
            for a in record["annotations"]:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": record["image_id"],
                        "category_id": int(a["category_id"]),
                        "bbox": [float(v) for v in a["bbox"]],
                        "area": float(a.get("area", a["bbox"][2] * a["bbox"][3])),
                        "iscrowd": int(a.get("iscrowd", 0)),
                    }
                )
        categories = [{"id": i, "name": name} for i, name in sorted(self.id2label.items())]
        return {"images": images, "annotations": annotations, "categories": categories}


def make_labels(target: dict, size: tuple[int, int], record: dict) -> dict[str, torch.Tensor]:
    """Absolute xyxy -> cxcywh normalised by `size` = (h, w) of this (unpadded) image."""
    height, width = int(size[0]), int(size[1])
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return {
        "class_labels": target["class_labels"].to(torch.int64),
        "boxes": (box_xyxy_to_cxcywh(target["boxes"].float()) / scale).reshape(-1, 4),
        "image_id": torch.tensor([int(record["image_id"])], dtype=torch.int64),
        "orig_size": torch.tensor([int(record["height"]), int(record["width"])], dtype=torch.int64),
        "size": torch.tensor([height, width], dtype=torch.int64),
    }


def load_coco_folder(
    annotation_file: str | Path,
    image_dir: str | Path | None = None,
    transforms: Callable | None = None,
    seed: int = 0,
) -> DetectionDataset:
    """A COCO-format dataset from disk. `image_dir` defaults to `images/` next to the annotation file if that
    exists, else the annotation file's folder. Category ids are mapped to contiguous ids in sorted id order;
    names come from `categories`. The file is checked first ([`read_coco_json`]): a malformed record is a ValueError
    naming the file, the record and the field, never a phantom class or a silently dropped box."""
    annotation_file = Path(annotation_file)
    coco = read_coco_json(annotation_file)
    if image_dir is None:
        image_dir = annotation_file.parent / "images"
        if not image_dir.is_dir():
            image_dir = annotation_file.parent
    image_dir = Path(image_dir)
    categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
    if not categories:  # no category table: use the ids seen
        categories = [{"id": c} for c in sorted({a["category_id"] for a in coco.get("annotations", [])})]
    cat_to_contiguous = {c["id"]: i for i, c in enumerate(categories)}
    id2label = {i: c.get("name", str(int(c["id"]))) for i, c in enumerate(categories)}
    by_image: dict[int, list] = {img["id"]: [] for img in coco["images"]}
    for a in coco.get("annotations", []):
        by_image[a["image_id"]].append(
            {
                "bbox": [float(v) for v in a["bbox"]],
                "category_id": cat_to_contiguous[a["category_id"]],
                "area": float(a.get("area", a["bbox"][2] * a["bbox"][3])),
                "iscrowd": int(a.get("iscrowd", 0)),
                "ignore": bool(a.get("ignore", False)),  # mmdet skips these in training
            }
        )
    records = [
        {
            "image_id": int(img["id"]),
            "file_name": str(image_dir / img["file_name"]),
            "width": int(img["width"]),
            "height": int(img["height"]),
            "annotations": by_image[img["id"]],
        }
        for img in coco["images"]
    ]
    missing = [r["file_name"] for r in records if not Path(r["file_name"]).is_file()]
    if missing:  # fail now, not in the middle of an epoch
        raise FileNotFoundError(
            f"{len(missing)} image file(s) listed in {annotation_file} do not exist under {image_dir}: "
            + ", ".join(missing[:5])
            + (" ..." if len(missing) > 5 else "")
        )
    _check_image_sizes(records, annotation_file)
    return DetectionDataset(records, id2label, transforms, seed=seed,
                            original_category_ids=[int(c["id"]) for c in categories])


def read_coco_json(path: str | Path) -> dict:
    """A COCO detection json file, checked against the schema of [`align_detr_hf.validation.check_coco`] (a
    ValueError names the file, the record and the field)."""
    path = Path(path)
    try:
        coco = json.loads(path.read_bytes())
    except ValueError as error:  # not JSON, or not UTF-8/16/32 text
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    check_coco(coco, str(path), image_files=True)
    return coco


def _check_image_sizes(records: list[dict], annotation_file: Path) -> None:
    """The json's width/height must be each file's displayed size (EXIF applied); reads image headers only."""
    wrong = []
    for r in records:
        size = displayed_size(r["file_name"])
        if size != (r["width"], r["height"]):
            rotated = " (the json gives the stored size; the EXIF orientation rotates it)" if size == (
                r["height"], r["width"]) else ""
            wrong.append(f"{r['file_name']} is {size[0]}x{size[1]}, the json says {r['width']}x{r['height']}{rotated}")
    if wrong:
        raise ValueError(
            f"{len(wrong)} image(s) in {annotation_file} do not have the width x height the json gives, so their "
            f"boxes would be misplaced: " + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else "")
        )


def _category_names(features: Any) -> list[str] | None:
    """ClassLabel names of `objects.category`, for the dict and the legacy Sequence(dict) feature layouts."""
    try:
        objects = features["objects"]
        category = objects["category"] if isinstance(objects, dict) else objects.feature["category"]
        category = getattr(category, "feature", category)
        return list(category.names)
    except (KeyError, AttributeError, TypeError):
        return None


def load_hf_dataset(
    dataset: Any,
    transforms: Callable | None = None,
    seed: int = 0,
    id2label: dict | None = None,
    image_column: str = "image",
) -> DetectionDataset:
    """A `datasets.Dataset` with `image` and `objects = {"bbox": [[x, y, w, h]], "category": [...], ("area",
    "iscrowd", "ignore")}` columns (optional `image_id`, `width`, `height`).

    Categories: if `objects.category` is a `ClassLabel`, its names give `id2label` and the ids are used as they are;
    otherwise the classes are the keys of `id2label` if given (category value -> name; a category that is not a key
    is an error), else the distinct values; either way sorted and mapped to 0..K-1. Every row is checked when loaded
    ([`align_detr_hf.validation.check_objects_row`]): a ValueError names the dataset, the row and the field.
    """
    columns = set(dataset.column_names)
    if "objects" not in columns:
        raise ValueError(f"Expected an 'objects' column (bbox/category), got columns {sorted(columns)}.")
    source = _dataset_label(dataset)
    objects_column = dataset["objects"]
    objects_list = [objects_column[i] for i in range(len(dataset))]
    for i, objects in enumerate(objects_list):
        check_objects_row(objects, f"{source} row {i}")
    mapping, id2label = _category_mapping(dataset.features, objects_list, id2label, source)
    image_ids = _integer_column(dataset, "image_id", Integer(whole_floats=True), source)
    widths = _integer_column(dataset, "width", Integer(min=1, whole_floats=True), source)
    heights = _integer_column(dataset, "height", Integer(min=1, whole_floats=True), source)
    records = []
    for i, objects in enumerate(objects_list):
        if widths is not None and heights is not None:
            width, height = widths[i], heights[i]
        else:
            width, height = dataset[i][image_column].size
        n = len(objects["bbox"])
        records.append(
            {
                "image_id": image_ids[i] if image_ids is not None else i + 1,
                "hf_index": i,
                "width": width,
                "height": height,
                "annotations": [
                    {
                        "bbox": [float(v) for v in objects["bbox"][j]],
                        "category_id": mapping[objects["category"][j]],
                        "area": float(objects["area"][j]) if objects.get("area") is not None else
                        float(objects["bbox"][j][2] * objects["bbox"][j][3]),
                        "iscrowd": int(objects["iscrowd"][j]) if objects.get("iscrowd") is not None else 0,
                        "ignore": bool(objects["ignore"][j]) if objects.get("ignore") is not None else False,
                    }
                    for j in range(n)
                ],
            }
        )
    if len({r["image_id"] for r in records}) != len(records):
        for i, r in enumerate(records):  # duplicate image ids would break COCO evaluation
            r["image_id"] = i + 1
    return DetectionDataset(records, id2label, transforms, hf_dataset=dataset, seed=seed,
                            original_category_ids=list(mapping), image_column=image_column)


def _dataset_label(dataset: Any) -> str:
    """How errors name a `datasets.Dataset`: `dataset 'cppe-5' (train split)`, or just `dataset`."""
    info = getattr(dataset, "info", None)
    name = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    split = getattr(dataset, "split", None)
    return "dataset" + (f" {name!r}" if name else "") + (f" ({split} split)" if split else "")


def _integer_column(dataset: Any, column: str, rule: Integer, source: str) -> list[int] | None:
    if column not in dataset.column_names:
        return None
    values = dataset[column]
    for i, value in enumerate(values):
        if not rule.ok(value):
            raise ValueError(f"{source} row {i}: {column} must be {rule.what}, got {value!r}")
    return [int(v) for v in values]


def _category_mapping(features: Any, objects_list: list, id2label: dict | None, source: str) -> tuple[dict, dict]:
    """(category value -> contiguous id, contiguous id -> name); every category of every row must be mapped."""
    names = _category_names(features)
    if names is not None:
        classes = {i: name for i, name in enumerate(names)}
        if id2label is not None and {str(k): v for k, v in id2label.items()} != {str(k): v for k, v in classes.items()}:
            raise ValueError(f"id2label {id2label} differs from the ClassLabel names of {source}'s objects.category "
                             f"{classes}; pass id2label=None to use the ClassLabel.")  # fmt: skip
        mapping, id2label, known = {i: i for i in classes}, classes, f"the ClassLabel (0..{len(classes) - 1})"
        wrong = "is not a class of"
    else:
        if id2label is None:
            keys = sorted({c for o in objects_list for c in o["category"]})
            id2label = {k: str(k) for k in keys}
        else:
            keys = _sorted_keys(id2label)
        mapping = {k: i for i, k in enumerate(keys)}
        id2label = {i: id2label[k] for k, i in mapping.items()}
        known = f"id2label ({', '.join(map(str, keys[:10]))}{' ...' if len(keys) > 10 else ''})"
        wrong = "is not a key of"
    for i, objects in enumerate(objects_list):
        for j, category in enumerate(objects["category"]):
            if category not in mapping:
                raise ValueError(f"{source} row {i}: objects.category[{j}] = {category!r} {wrong} {known}")
    return mapping, id2label


def _sorted_keys(id2label: dict) -> list:
    keys = list(id2label)
    if len({isinstance(k, str) for k in keys}) > 1:
        raise ValueError(f"id2label mixes integer and string keys: {keys[:6]}")
    return sorted(keys)


# ---------------------------------------------------------------------------------------------------- batching


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation seeded by `(seed, epoch)`: identical on every process and reproducible on resume."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class AspectRatioBatchSampler(torch.utils.data.Sampler):
    """Batches of one orientation, as mmdet's `AspectRatioBatchSampler`: indices from `sampler` go to one of two
    buckets (`groups[i]`: 1 for width >= height, 0 for portrait; see [`DetectionDataset.aspect_groups`]) and a bucket
    is emitted as a batch when it holds `batch_size` indices. At the end of the epoch the leftovers (portrait first,
    then landscape) are emitted in `batch_size` chunks, the last one short unless `drop_last`. `groups=None` batches
    in sampler order (no grouping). The number of batches is the plain `ceil(len / batch_size)` either way.

    Batches hold `(index, epoch)` pairs: the epoch travels with each index into the dataset (see
    [`DetectionDataset.__getitem__`]), so augmentation stays a function of (seed, epoch, index) in persistent
    worker processes. With an [`EpochShuffleSampler`] the batches are a function of (seed, epoch) alone: a resumed
    run skips the same batches (accelerate's `skip_first_batches`), and `accelerate.prepare` shards whole batches
    across processes (`BatchSamplerShard`), so every process still gets single-orientation batches.
    """

    def __init__(self, sampler, batch_size: int, groups: Sequence[int] | None = None, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if groups is not None and len(groups) != len(sampler):
            raise ValueError(f"{len(groups)} aspect groups for a sampler of {len(sampler)} indices.")
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), drop_last
        self.groups = None if groups is None else [int(g) for g in groups]

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        buckets: dict[int, list] = {0: [], 1: []}
        for index in self.sampler:
            bucket = buckets[self.groups[index] if self.groups is not None else 1]
            bucket.append((int(index), epoch))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()
        left = buckets[0] + buckets[1]
        for start in range(0, len(left), self.batch_size):
            chunk = left[start : start + self.batch_size]
            if len(chunk) == self.batch_size or not self.drop_last:
                yield chunk

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size


def padding_fraction(batches: Sequence[Sequence[int]], sizes: Sequence[tuple[int, int]]) -> float:
    """Fraction of the padded batch tensors' pixels that are padding, for `batches` of indices into `sizes` =
    [(height, width), ...] (images padded bottom/right to the batch maximum, as [`collate_fn`] does)."""
    padded = real = 0
    for batch in batches:
        hw = [sizes[i[0] if isinstance(i, tuple) else i] for i in batch]
        padded += len(hw) * max(h for h, _ in hw) * max(w for _, w in hw)
        real += sum(h * w for h, w in hw)
    return 1.0 - real / padded if padded else 0.0


def default_num_workers() -> int:
    """Data-loading worker processes: one per available core, at most 4 (mmdet uses 2 per GPU)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores))


def build_train_loader(
    dataset: DetectionDataset,
    batch_size: int,
    seed: int = 0,
    group_by_aspect_ratio: bool = True,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """The training loader of both example scripts: an [`EpochShuffleSampler`] (seed, epoch), batched by
    [`AspectRatioBatchSampler`] (grouped unless `group_by_aspect_ratio=False`), decoded and augmented in
    `num_workers` worker processes (default [`default_num_workers`]), pinned memory when CUDA is available,
    persistent workers when there are workers. Call `loader.batch_sampler.set_epoch(epoch)` (or accelerate's
    `loader.set_epoch`) before each epoch."""
    num_workers = default_num_workers() if num_workers is None else int(num_workers)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers and num_workers > 0
    batch_sampler = AspectRatioBatchSampler(
        EpochShuffleSampler(len(dataset), seed=seed),
        batch_size,
        dataset.aspect_groups() if group_by_aspect_ratio else None,
        drop_last=drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=persistent_workers,
        # the loader draws its workers' base seed when an iterator is created, which persistent workers do once
        # and a resumed run once more: drawn from the global RNG, that extra draw would shift the denoising noise
        # after a resume (Trainer). Augmentation does not use it (per-item generators).
        generator=torch.Generator().manual_seed(seed),
    )


def collate_fn(batch: list[dict]) -> dict[str, Any]:
    """Zero-pad `pixel_values` to the batch maximum and build `pixel_mask` (1 = real pixel). Boxes are left as they
    are: normalised to each image's own unpadded size, which is what the model expects."""
    pixel_values, pixel_mask = pad_and_create_pixel_mask([item["pixel_values"] for item in batch])
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": [item["labels"] for item in batch]}


def check_finite_batch(batch: dict, batch_index: int) -> None:
    """Raise `ValueError` naming `batch_index` if the inputs or label boxes hold NaN/inf."""
    problems = []
    if not torch.isfinite(batch["pixel_values"]).all():
        problems.append("pixel_values")
    for i, target in enumerate(batch.get("labels") or []):
        if not torch.isfinite(target["boxes"]).all():
            problems.append(f"labels[{i}]['boxes']")
    if problems:
        raise ValueError(f"Non-finite values (NaN/inf) in batch {batch_index}: {', '.join(problems)}.")


def reference_scale_for(image_size: int) -> float:
    """The `scale` that maps the reference shorter side 800 to `image_size`."""
    return image_size / 800.0



def load_train_val_datasets(
    train_annotation: str | None = None,
    train_images: str | None = None,
    val_annotation: str | None = None,
    val_images: str | None = None,
    dataset_name: str | None = None,
    train_split: str = "train",
    val_split: str | None = "validation",
    train_val_split: float = 0.15,
    synthetic_shapes: int = 0,
    synthetic_dir: str | Path | None = None,
    synthetic_image_size: int = 128,
    seed: int = 0,
    synthetic_num_classes: int = 3,
) -> tuple[DetectionDataset, DetectionDataset]:
    """(train, val) datasets, without transforms, from one of three sources (used by the example scripts):

    - `train_annotation` (+ `train_images`, optional `val_annotation`/`val_images`): COCO folders;
    - `dataset_name`: a `datasets` dataset with the `objects` schema, either a `save_to_disk` folder or a name for
      `datasets.load_dataset` (Hub or local); `val_split` if present, else `train_val_split` of train is held out;
    - `synthetic_shapes=N`: N generated shapes images (plus N // 4 for validation) of the first
      `synthetic_num_classes` shapes (the demo's 3 by default), written under `synthetic_dir`.
    """
    if synthetic_shapes:
        from .synthetic import SHAPE_CLASSES, generate_shapes_dataset

        if not 1 <= synthetic_num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"synthetic_num_classes must be in 1..{len(SHAPE_CLASSES)}, got {synthetic_num_classes}.")
        classes = SHAPE_CLASSES[:synthetic_num_classes]
        root = Path(synthetic_dir or "shapes_data")
        train_annotation = str(
            generate_shapes_dataset(root / "train", synthetic_shapes, synthetic_image_size, seed, classes=classes)
        )
        val_annotation = str(
            generate_shapes_dataset(root / "val", max(2, synthetic_shapes // 4), synthetic_image_size, seed + 10_000,
                                    classes=classes)
        )
        train_images = val_images = None
    if train_annotation:
        train = load_coco_folder(train_annotation, train_images, seed=seed)
        if val_annotation:
            val = load_coco_folder(val_annotation, val_images, seed=seed)
            if val.id2label != train.id2label:
                raise ValueError(f"Train and val categories differ: {train.id2label} vs {val.id2label}.")
        else:
            train, val = train.split(train_val_split, seed)
        return train, val
    if dataset_name:
        import datasets

        if Path(dataset_name).is_dir() and any(
            (Path(dataset_name) / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")
        ):
            loaded = datasets.load_from_disk(dataset_name)
        else:
            loaded = datasets.load_dataset(dataset_name)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({train_split: loaded})
        train = load_hf_dataset(loaded[train_split], seed=seed)
        if val_split and val_split in loaded:  # the train split's classes, in its order, even if val lacks some
            classes = {source: train.id2label[i] for i, source in enumerate(train.original_category_ids)}
            val = load_hf_dataset(loaded[val_split], seed=seed, id2label=classes)
        else:
            train, val = train.split(train_val_split, seed)
        return train, val
    raise ValueError("Give --train_annotation, --dataset_name or --synthetic_shapes.")
