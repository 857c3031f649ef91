"""Sliced inference for large images with small, dense objects.

A DETR-style detector resizes a 4000x3000 image to ~800 px, where a 20 px object becomes 4 px, and returns at most
`top_k` detections. Slicing runs the detector on overlapping tiles at the model's native scale (each tile goes
through the image processor as an image of its own), optionally adds the usual full-image pass for large objects,
and merges everything into one result in original image coordinates:

    from align_detr_hf.slicing import SliceConfig, sliced_detect
    result = sliced_detect(model, processor, image, SliceConfig(tile_size=640, overlap=0.2), threshold=0.3)
    # {"scores": (n,), "labels": (n,), "boxes": (n, 4) xyxy pixels of `image`}

    pipe = pipeline("object-detection", model=folder)   # or the pipeline / `align-detr predict --slice`
    pipe(image, slice=SliceConfig(tile_size=640))        # `slice=True` uses the defaults

Merging (one rule for both methods): a detection is only ever merged with detections of the *same class* from
*another pass* (another tile or the full image). Within one pass the detector's set prediction is already
duplicate-free (DETR needs no NMS), so one pass is returned unchanged: a single tile covering the image with no
overlap equals the plain pass exactly. Then:
- boxes cut by a tile edge: a tile detection that touches an edge of its tile which is not an image edge (within
  `edge_margin` px) shows only part of its object; it is dropped when a whole (uncut) detection of the same class from
  another pass covers at least `cut_coverage` of it, the object being seen whole there;
- `merge="nms"`: greedy class-wise NMS in score order (a box is suppressed by a kept, higher-scoring box with IoU >
  `iou_threshold`);
- `merge="wbf"`: weighted box fusion: clusters at IoU > `iou_threshold` against the cluster's first (best) box,
  coordinates averaged with the scores as weights, the cluster keeping its best score (fusion never lowers one).
Either way a detection of the full-image pass is never dropped: it is kept, or (NMS) suppressed only by a
higher-scoring box of its class overlapping it by more than `iou_threshold`, or (WBF) the best box of its cluster
is it or scores higher. The merged detections are sorted by score and cut to `max_detections`.

Cost: the merge compares the boxes of a class pairwise (an n x n IoU matrix; WBF also loops over the boxes in
Python), so pass a score `threshold` on images with many tiles: at threshold 0, 100 tiles x 240 detections make
24,000 boxes, ~1 GiB and seconds (NMS) to minutes (WBF) on CPU.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from .box_ops import box_area, box_iou

__all__ = ["SliceConfig", "detect_passes", "merge_detections", "slice_coco_dataset", "sliced_detect", "tile_grid"]

MERGE_METHODS = ("nms", "wbf")


@dataclasses.dataclass(frozen=True)
class SliceConfig:
    """How to slice an image and merge the passes.

    Args:
        tile_size: tile side in original-image pixels. `None`: the processor's `shortest_edge` (or `height`), so each
            tile is seen at scale 1, the scale the model was trained at.
        overlap: fraction of `tile_size` shared by neighbouring tiles, in [0, 1). Objects smaller than the overlap
            are seen whole in at least one tile.
        merge: `"nms"` (class-wise non-maximum suppression) or `"wbf"` (weighted box fusion).
        full_image: also run the plain pass on the whole (resized) image, for objects larger than a tile.
        iou_threshold: IoU above which two detections of one class from different passes are one object.
        edge_margin: a tile detection within this many pixels of an inner tile edge counts as cut by it.
        cut_coverage: a cut detection is dropped when a whole one of its class covers this fraction of it.
        batch_size: tiles per forward pass.
        tile_top_k: detections per tile (and per full-image pass) before merging.
        max_detections: detections returned per image after merging (COCO's AR@1000 needs 1000).
    """

    tile_size: int | None = None
    overlap: float = 0.2
    merge: str = "nms"
    full_image: bool = True
    iou_threshold: float = 0.5
    edge_margin: float = 4.0
    cut_coverage: float = 0.6
    batch_size: int = 8
    tile_top_k: int = 300
    max_detections: int = 1000

    def __post_init__(self):
        if self.tile_size is not None and (not isinstance(self.tile_size, int) or self.tile_size < 32):
            raise ValueError(f"SliceConfig.tile_size must be an integer of at least 32 pixels, got {self.tile_size!r}.")
        if not (isinstance(self.overlap, (int, float)) and 0.0 <= self.overlap < 1.0):
            raise ValueError(f"SliceConfig.overlap must be a fraction of the tile in [0, 1), got {self.overlap!r}.")
        if self.merge not in MERGE_METHODS:
            raise ValueError(f"SliceConfig.merge must be one of {MERGE_METHODS}, got {self.merge!r}.")
        for name in ("iou_threshold", "cut_coverage"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
                raise ValueError(f"SliceConfig.{name} must be in (0, 1], got {value!r}.")
        if not (isinstance(self.edge_margin, (int, float)) and math.isfinite(self.edge_margin) and self.edge_margin >= 0):
            raise ValueError(f"SliceConfig.edge_margin must be a number of pixels >= 0, got {self.edge_margin!r}.")
        for name in ("batch_size", "tile_top_k", "max_detections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SliceConfig.{name} must be a positive integer, got {value!r}.")

    @classmethod
    def coerce(cls, value: Any) -> SliceConfig | None:
        """`None`/`False` -> no slicing; `True` -> defaults; a dict -> its fields; a SliceConfig as is."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown slice option(s) {sorted(unknown)}; known: "
                                 f"{[f.name for f in dataclasses.fields(cls)]}.")
            return cls(**value)
        raise ValueError(f"slice must be True, a dict or a SliceConfig, got {type(value).__name__}.")


def tile_grid(width: int, height: int, tile_size: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Tiles `(x0, y0, x1, y1)` covering the image, all of one size (`tile_size`, or the image side if smaller): the
    stride is `tile_size - round(overlap * tile_size)` and the last tile of a row/column is aligned to the image edge."""

    def starts(length: int) -> list[int]:
        size = min(tile_size, length)
        stride = max(1, size - round(overlap * size))
        positions = list(range(0, max(length - size, 0) + 1, stride))
        if positions[-1] + size < length:
            positions.append(length - size)
        return positions

    tw, th = min(tile_size, width), min(tile_size, height)
    return [(x, y, x + tw, y + th) for y in starts(height) for x in starts(width)]


def _tile_size(processor, config: SliceConfig) -> int:
    if config.tile_size is not None:
        return config.tile_size
    size = getattr(processor, "size", None) or {}
    side = size.get("shortest_edge") or size.get("height")
    if not side:
        raise ValueError("SliceConfig.tile_size is None and the processor has no size['shortest_edge']; give one.")
    return int(side)


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    raise ValueError(f"sliced inference takes a PIL image, got {type(image).__name__} "
                     "(use PIL.Image.fromarray for a numpy array).")


@torch.no_grad()
def _detect(model, processor, images: list[Image.Image], top_k: int, threshold: float) -> list[dict]:
    """Plain detection of same-size images in one batch, boxes in each image's pixels."""
    device = next(model.parameters()).device
    inputs = processor(images=images, return_tensors="pt").to(device)
    outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"))
    sizes = [(image.height, image.width) for image in images]
    return processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes, top_k=top_k)


def sliced_detect(
    model, processor, image: Image.Image, config: SliceConfig | None = None, threshold: float = 0.0
) -> dict[str, torch.Tensor]:
    """Detect objects in `image` from overlapping tiles (and the full image), merged as the module doc says.

    Returns `{"scores" (n,), "labels" (n,) int64, "boxes" (n, 4) xyxy}` in `image`'s pixels, sorted by score, at most
    `config.max_detections`, each score above `threshold`.
    """
    config = config or SliceConfig()
    image = _as_pil(image)
    return merge_detections(detect_passes(model, processor, image, config, threshold), image.size, config)


def detect_passes(
    model, processor, image: Image.Image, config: SliceConfig | None = None, threshold: float = 0.0
) -> list[tuple[dict, Any]]:
    """The unmerged passes of [`sliced_detect`]: `(detections in image pixels, tile (x0, y0, x1, y1) or None for the
    full image)` pairs, for [`merge_detections`] (e.g. to compare merge settings without running the model again)."""
    config = config or SliceConfig()
    image = _as_pil(image)
    tile_size = _tile_size(processor, config)
    was_training = model.training
    model.eval()
    try:
        passes = []
        if config.full_image:
            passes.append((_detect(model, processor, [image], config.tile_top_k, threshold)[0], None))
        tiles = tile_grid(image.width, image.height, tile_size, config.overlap)
        for start in range(0, len(tiles), config.batch_size):
            chunk = tiles[start : start + config.batch_size]
            found = _detect(model, processor, [image.crop(t) for t in chunk], config.tile_top_k, threshold)
            for tile, det in zip(chunk, found):
                offset = torch.tensor([tile[0], tile[1], tile[0], tile[1]], dtype=det["boxes"].dtype)
                passes.append(({**det, "boxes": det["boxes"] + offset.to(det["boxes"].device)}, tile))
    finally:
        model.train(was_training)
    return passes


def _cut_flags(boxes: torch.Tensor, tile, image_size, margin: float) -> torch.Tensor:
    """True for boxes within `margin` of an edge of `tile` that is not an edge of the image."""
    if tile is None:
        return torch.zeros(len(boxes), dtype=torch.bool)
    x0, y0, x1, y1 = tile
    width, height = image_size
    cut = torch.zeros(len(boxes), dtype=torch.bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + margin
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + margin
    if x1 < width:
        cut |= boxes[:, 2] >= x1 - margin
    if y1 < height:
        cut |= boxes[:, 3] >= y1 - margin
    return cut


def _coverage(small: torch.Tensor, large: torch.Tensor) -> torch.Tensor:
    """(n, m): the fraction of each box in `small` that each box in `large` covers."""
    lt = torch.maximum(small[:, None, :2], large[None, :, :2])
    rb = torch.minimum(small[:, None, 2:], large[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / box_area(small)[:, None].clamp(min=1e-6)


def merge_detections(
    passes: Sequence[tuple[dict, Any]], image_size: tuple[int, int], config: SliceConfig
) -> dict[str, torch.Tensor]:
    """Merge per-pass detections (already in image pixels). `passes`: `(detections, tile)` pairs, `tile` the pass's
    `(x0, y0, x1, y1)` or `None` for a full-image pass; `image_size` is `(width, height)`."""
    scores = torch.cat([p["scores"].float().cpu() for p, _ in passes]) if passes else torch.zeros(0)
    labels = torch.cat([p["labels"].long().cpu() for p, _ in passes]) if passes else torch.zeros(0, dtype=torch.long)
    boxes = torch.cat([p["boxes"].float().cpu() for p, _ in passes]) if passes else torch.zeros(0, 4)
    source = torch.cat([torch.full((len(p["scores"]),), i) for i, (p, _) in enumerate(passes)]) if passes else labels
    cut = (torch.cat([_cut_flags(p["boxes"].float().cpu(), t, image_size, config.edge_margin) for p, t in passes])
           if passes else torch.zeros(0, dtype=torch.bool))

    keep = torch.ones(len(scores), dtype=torch.bool)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        cut_members, whole_members = members[cut[members]], members[~cut[members]]
        if len(cut_members) and len(whole_members):
            covered = _coverage(boxes[cut_members], boxes[whole_members]) >= config.cut_coverage
            covered &= source[cut_members][:, None] != source[whole_members][None, :]
            keep[cut_members[covered.any(1)]] = False
    merge = _nms if config.merge == "nms" else _wbf
    scores, labels, boxes = merge(scores[keep], labels[keep], boxes[keep], source[keep], config.iou_threshold)
    order = scores.argsort(descending=True, stable=True)[: config.max_detections]
    return {"scores": scores[order], "labels": labels[order], "boxes": boxes[order]}


def _nms(scores, labels, boxes, source, iou_threshold):
    """Greedy class-wise NMS in which a box never suppresses a box of its own pass."""
    order = scores.argsort(descending=True, stable=True)
    scores, labels, boxes, source = scores[order], labels[order], boxes[order], source[order]
    keep = torch.ones(len(scores), dtype=torch.bool)
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()  # in score order
        if len(members) < 2 or len(source[members].unique()) < 2:
            continue
        iou = box_iou(boxes[members], boxes[members])
        other = source[members][:, None] != source[members][None, :]
        conflict = (iou > iou_threshold) & other
        alive = torch.ones(len(members), dtype=torch.bool)
        for i in range(len(members)):
            if alive[i]:
                alive[i + 1 :] &= ~conflict[i, i + 1 :]
        keep[members] = alive
    return scores[keep], labels[keep], boxes[keep]


def _wbf(scores, labels, boxes, source, iou_threshold):
    """Weighted box fusion, class-wise; a cluster holds at most one box per pass and keeps its best score."""
    order = scores.argsort(descending=True, stable=True)
    scores, labels, boxes, source = scores[order], labels[order], boxes[order], source[order]
    out_scores, out_labels, out_boxes = [], [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        iou = box_iou(boxes[members], boxes[members])
        cluster_of = torch.full((len(members),), -1, dtype=torch.long)
        seeds = torch.zeros(len(members), dtype=torch.long)  # the first `num_seeds` entries are cluster seeds
        sources: list[set] = []
        for i in range(len(members)):
            src = int(source[members[i]])
            candidates = (iou[i, seeds[: len(sources)]] > iou_threshold).nonzero().flatten().tolist()
            c = next((c for c in candidates if src not in sources[c]), None)
            if c is None:
                c = len(sources)
                seeds[c] = i
                sources.append(set())
            cluster_of[i] = c
            sources[c].add(src)
        seeds = seeds[: len(sources)]
        weights = scores[members][:, None]
        fused = torch.zeros(len(seeds), 4).index_add_(0, cluster_of, boxes[members] * weights)
        total = torch.zeros(len(seeds), 1).index_add_(0, cluster_of, weights)
        count = torch.zeros(len(seeds), dtype=torch.long).index_add_(0, cluster_of, torch.ones_like(cluster_of))
        # a lone box is returned as it is (x * w / w may round differently)
        out_boxes.append(torch.where((count == 1)[:, None], boxes[members[seeds]], fused / total.clamp(min=1e-12)))
        out_scores.append(scores[members[seeds]])
        out_labels.append(torch.full((len(seeds),), label, dtype=torch.long))
    if not out_scores:
        return scores, labels, boxes
    return torch.cat(out_scores), torch.cat(out_labels), torch.cat(out_boxes)


def slice_coco_dataset(
    ann_file, image_dir, output_dir, tile_size: int, overlap: float = 0.2, min_visible: float = 0.5
):
    """Cut a COCO detection set into tiles for training (`output_dir/images/*.png` + `annotations.json`). An object
    is kept in a tile, its box clipped to the tile, when at least `min_visible` of its box area lies inside."""
    import json
    from pathlib import Path

    coco = json.loads(Path(ann_file).read_text())
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    images, annotations = [], []
    for info in coco["images"]:
        with Image.open(Path(image_dir) / info["file_name"]) as opened:
            image = opened.convert("RGB")
        for x0, y0, x1, y1 in tile_grid(image.width, image.height, tile_size, overlap):
            tile_id = len(images) + 1
            file_name = f"{tile_id:06d}.png"
            image.crop((x0, y0, x1, y1)).save(output_dir / "images" / file_name)
            images.append({"id": tile_id, "file_name": file_name, "width": x1 - x0, "height": y1 - y0})
            for ann in by_image.get(info["id"], []):
                bx, by, bw, bh = ann["bbox"]
                cx0, cy0 = max(bx, x0), max(by, y0)
                cx1, cy1 = min(bx + bw, x1), min(by + bh, y1)
                if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < min_visible * bw * bh:
                    continue
                annotations.append({"id": len(annotations) + 1, "image_id": tile_id, "category_id": ann["category_id"],
                                    "bbox": [cx0 - x0, cy0 - y0, cx1 - cx0, cy1 - cy0],
                                    "area": (cx1 - cx0) * (cy1 - cy0), "iscrowd": 0})
    ann_out = output_dir / "annotations.json"
    ann_out.write_text(json.dumps({"images": images, "annotations": annotations, "categories": coco["categories"]}))
    return ann_out
