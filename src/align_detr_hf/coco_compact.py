"""COCO box evaluation image by image, holding a few bytes per detection instead of pycocotools' ~200 KB per image.

pycocotools' `COCOeval` keeps, until `accumulate()`, one dict per image x class x area range (`evalImgs`) and every
detection as a Python dict: its memory grows by ~200 KB an image. [`CompactCocoEval`] does the same computation in
another order: each image is matched when its detections arrive (`add_image`), exactly as `COCOeval.evaluateImg`
matches it, and only what `accumulate()` reads of the result is kept, one 36-byte record per detection (score, image
index, rank in its image and class, class index, and for each of the 4 area ranges 10 "matched" and 10 "ignored"
bits, one per IoU threshold), plus the count of non-ignored ground truth per class and area range. `accumulate()`
and `summarize()` then run pycocotools' steps on those records: the same detection order (score descending, ties in
image-id order, then in the image's own order), the same cumulative sums, precision envelope, `searchsorted` on the
recall thresholds and means, so `precision`, `recall` and all 12 `stats` are pycocotools' to the last bit (tested,
also with crowds, score ties, empty images, classes without ground truth and maxDets (1, 100, 1000)).

The pycocotools rules kept, each a quiet one:
- a ground-truth box is ignored when it is a crowd (`iscrowd`) or its annotation `area` is outside the area range
  (bounds included); a detection is ignored when it matches an ignored box, or matches nothing and its box area
  (w x h) is outside the range;
- each detection (score-sorted, stable, the first `max_dets[-1]` of its image and class) takes, per IoU threshold,
  the not-yet-taken non-ignored box of largest IoU >= threshold (the last such box on ties), else an ignored one;
  crowd boxes can be taken again and their IoU is intersection / detection area (maskApi's `bbIou`, computed in the
  same float operations);
- a match to an annotation with id 0 counts as no match (pycocotools tests the matched id for truth);
- a class or area range without non-ignored ground truth scores -1 (left out of the means).

Exact per-detection state is linear in the detections kept (36 bytes each, 3.6 KB an image at 100 detections); what
does not grow is everything else: no per-image dicts, no copies of the boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["AREA_LABELS", "AREA_RANGES", "IOU_THRESHOLDS", "RECALL_THRESHOLDS", "CompactCocoEval", "bbox_iou"]

# pycocotools Params.setDetParams, written the same way so that the float values are the same
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
AREA_RANGES = np.array([[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]], dtype=np.float64)
AREA_LABELS = ("all", "small", "medium", "large")

T, R, A = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(AREA_RANGES)
# evaluateImg compares with min(t, 1 - 1e-10)
_MATCH_THRESHOLDS = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
_BITS = (np.uint16(1) << np.arange(T, dtype=np.uint16)).astype(np.uint16)  # one bit per IoU threshold (T <= 16)

DETECTION = np.dtype([("score", "f8"), ("image", "i4"), ("rank", "i4"), ("category", "i4"),
                      ("matched", "u2", (A,)), ("ignored", "u2", (A,))])
_MERGE_EVERY = 256  # image arrays gathered into one block at a time (few numpy objects whatever the image count)


def bbox_iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xywh boxes, as pycocotools' maskApi `bbIou` computes it operation by operation (so the same
    float64 values): a crowd box's union is the detection's area; no overlap (w or h <= 0) is 0."""
    da, ga = dt[:, 2] * dt[:, 3], gt[:, 2] * gt[:, 3]
    w = (np.minimum(dt[:, None, 2] + dt[:, None, 0], gt[None, :, 2] + gt[None, :, 0])
         - np.maximum(dt[:, None, 0], gt[None, :, 0]))
    h = (np.minimum(dt[:, None, 3] + dt[:, None, 1], gt[None, :, 3] + gt[None, :, 1])
         - np.maximum(dt[:, None, 1], gt[None, :, 1]))
    inter = w * h
    union = np.where(crowd[None, :], da[:, None], da[:, None] + ga[None, :] - inter)
    overlap = (w > 0) & (h > 0)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap & (union != 0))


def _outside(areas: np.ndarray) -> np.ndarray:
    """(A, n): area outside each range (pycocotools: `area < lo or area > hi`)."""
    return (areas[None, :] < AREA_RANGES[:, :1]) | (areas[None, :] > AREA_RANGES[:, 1:])


def _match(iou: np.ndarray, gt_ignored: np.ndarray, gt_crowd: np.ndarray) -> np.ndarray:
    """evaluateImg's greedy matching for all area ranges and IoU thresholds at once: (A, T, D) index of the box each
    score-sorted detection takes (-1: none). `gt_ignored` (A, G)."""
    num_dt, num_gt = iou.shape
    taken = np.zeros((A, T, num_gt), dtype=bool)
    match = np.full((A, T, num_dt), -1, dtype=np.int64)
    groups = (~gt_ignored[:, None, :], gt_ignored[:, None, :])  # non-ignored boxes are scanned first
    reversed_index = num_gt - 1 - np.arange(num_gt)
    for d in np.flatnonzero(iou.max(1, initial=0.0) >= _MATCH_THRESHOLDS[0]):  # others match nothing anywhere
        above = (iou[d][None, None, :] >= _MATCH_THRESHOLDS[None, :, None]) & ~taken  # (A, T, G)
        found = np.full((A, T), -1, dtype=np.int64)
        for group in groups:
            candidates = above & group
            values = np.where(candidates, iou[d][None, None, :], -1.0)
            best = values.max(-1, keepdims=True)
            # the last box of the largest IoU (pycocotools replaces the match on ties)
            last = reversed_index[np.argmax((values == best)[..., ::-1] & candidates[..., ::-1], axis=-1)]
            found = np.where((found < 0) & candidates.any(-1), last, found)
        match[:, :, d] = found
        a, t = np.nonzero(found >= 0)
        g = found[a, t]
        keep = ~gt_crowd[g]  # crowd boxes stay available
        taken[a[keep], t[keep], g[keep]] = True
    return match


class CompactCocoEval:
    """pycocotools' bbox `COCOeval` over all images of `coco_gt` (a pycocotools `COCO`), fed image by image; see
    the module docstring. `add_image` once per image (the caller drops repeats), then `accumulate()` (precision
    T x R x K x A x M, recall T x K x A x M) and `summarize()` (the 12 `stats`)."""

    def __init__(self, coco_gt: Any, max_dets: Sequence[int] = (1, 10, 100)):
        self.coco_gt = coco_gt
        self.max_dets = [int(m) for m in max_dets]
        self.cat_ids = sorted(coco_gt.getCatIds())
        self.img_ids = sorted(coco_gt.getImgIds())
        self.cat_index = {cat_id: k for k, cat_id in enumerate(self.cat_ids)}
        self.img_index = {img_id: n for n, img_id in enumerate(self.img_ids)}
        # non-ignored ground truth per class and area range, over all images (as accumulate's npig)
        self.num_gt = np.zeros((len(self.cat_ids), A), dtype=np.int64)
        for img_id in self.img_ids:
            boxes = self._ground_truth(img_id)
            for k, (_, areas, crowd, _) in boxes.items():
                self.num_gt[k] += (~(crowd[None, :] | _outside(areas))).sum(1)
        self._blocks: list[np.ndarray] = []
        self._pending: list[np.ndarray] = []
        self.precision = self.recall = self.stats = None

    def _ground_truth(self, img_id: int) -> dict[int, tuple]:
        """{class index: (xywh (G, 4), annotation areas (G,), crowd (G,), ids (G,))} in the annotations' order."""
        by_class: dict[int, list] = {}
        for ann in self.coco_gt.imgToAnns.get(img_id, []):
            k = self.cat_index.get(ann["category_id"])
            if k is not None:
                by_class.setdefault(k, []).append(ann)
        return {k: (np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4),
                    np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float64),
                    np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
                    np.array([a["id"] for a in anns], dtype=np.int64))
                for k, anns in by_class.items()}

    def add_image(self, img_id: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """Match one image's detections (xyxy float64 boxes, as COCO results would hold them after conversion to
        [x0, y0, x1 - x0, y1 - y0]) and keep their records. Labels that are not ground-truth classes are dropped,
        as pycocotools drops them."""
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        labels = labels.astype(np.int64)
        ground_truth = self._ground_truth(img_id)
        records = []
        for label in np.unique(labels):
            k = self.cat_index.get(int(label))
            if k is None:
                continue
            mine = np.flatnonzero(labels == label)
            mine = mine[np.argsort(-scores[mine], kind="mergesort")][: self.max_dets[-1]]
            dt = xywh[mine]
            rows = np.zeros(len(mine), dtype=DETECTION)
            rows["score"], rows["rank"] = scores[mine], np.arange(len(mine))
            rows["image"], rows["category"] = self.img_index[img_id], k
            outside = _outside(dt[:, 2] * dt[:, 3])  # (A, D) loadRes' area: w x h
            if k in ground_truth:
                gt, gt_areas, crowd, ids = ground_truth[k]
                gt_ignored = crowd[None, :] | _outside(gt_areas)  # (A, G)
                match = _match(bbox_iou(dt, gt, crowd), gt_ignored, crowd)  # (A, T, D)
                box = np.maximum(match, 0)
                matched = (match >= 0) & (ids[box] != 0)  # dtMatches holds the box id, tested for truth
                ignored = ((match >= 0) & gt_ignored[np.arange(A)[:, None, None], box]) | (~matched & outside[:, None])
            else:
                matched = np.zeros((A, T, len(mine)), dtype=bool)
                ignored = np.repeat(outside[:, None, :], T, axis=1)
            rows["matched"] = (matched * _BITS[None, :, None]).sum(1, dtype=np.uint16).T
            rows["ignored"] = (ignored * _BITS[None, :, None]).sum(1, dtype=np.uint16).T
            records.append(rows)
        if records:
            self._pending.append(np.concatenate(records))
        if len(self._pending) >= _MERGE_EVERY:
            self._blocks.append(np.concatenate(self._pending))
            self._pending = []

    def _merge_pending(self) -> None:
        if self._pending:
            self._blocks.append(np.concatenate(self._pending))
            self._pending = []

    @property
    def nbytes(self) -> int:
        """Bytes of the per-detection records held."""
        return sum(block.nbytes for block in self._blocks + self._pending)

    def _class_records(self, k: int) -> np.ndarray:
        """Class `k`'s records in pycocotools' accumulate order: the images concatenated in id order, each
        score-sorted, then sorted stably by score (so: score descending, ties by image, then by rank). Gathered one
        class at a time, so that sorting needs memory for one class, not for all records."""
        rows = np.concatenate([block[block["category"] == k] for block in self._blocks] or
                              [np.zeros(0, dtype=DETECTION)])
        return rows[np.lexsort((rows["rank"], rows["image"], -rows["score"]))]

    def accumulate(self) -> None:
        """pycocotools' `accumulate()` on the records: `precision` (T, R, K, A, M) and `recall` (T, K, A, M)."""
        self._merge_pending()
        num_classes, num_limits = len(self.cat_ids), len(self.max_dets)
        precision = -np.ones((T, R, num_classes, A, num_limits))
        recall = -np.ones((T, num_classes, A, num_limits))
        for k in range(num_classes):
            if not self.num_gt[k].any():
                continue  # no non-ignored ground truth in any area range: -1 throughout
            mine = self._class_records(k)
            for a in range(A):
                npig = int(self.num_gt[k, a])
                if npig == 0:
                    continue
                for m, max_det in enumerate(self.max_dets):
                    rows = mine[mine["rank"] < max_det]
                    matched = (rows["matched"][:, a][None, :] & _BITS[:, None]) != 0  # (T, nd)
                    ignored = (rows["ignored"][:, a][None, :] & _BITS[:, None]) != 0
                    tp_sum = np.cumsum(matched & ~ignored, axis=1).astype(dtype=float)
                    fp_sum = np.cumsum(~matched & ~ignored, axis=1).astype(dtype=float)
                    nd = tp_sum.shape[1]
                    rc = tp_sum / npig
                    pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
                    recall[:, k, a, m] = rc[:, -1] if nd else 0
                    pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the precision envelope
                    for t in range(T):
                        inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
                        q = np.zeros(R)
                        q[inds < nd] = pr[t, inds[inds < nd]]
                        precision[t, :, k, a, m] = q
        self.precision, self.recall = precision, recall

    def _summarize(self, ap: bool, iou: float | None = None, area: str = "all", max_dets: int = 100) -> float:
        aind = [i for i, label in enumerate(AREA_LABELS) if label == area]
        mind = [i for i, m in enumerate(self.max_dets) if m == max_dets]
        s = self.precision if ap else self.recall
        if iou is not None:
            s = s[np.where(iou == IOU_THRESHOLDS)[0]]
        s = s[:, :, :, aind, mind] if ap else s[:, :, aind, mind]
        return -1.0 if len(s[s > -1]) == 0 else float(np.mean(s[s > -1]))

    def _specs(self) -> list[tuple]:
        """pycocotools' `_summarizeDets`: (AP?, IoU, area, maxDets) of the 12 stats; the first AP at 100 detections
        whatever `max_dets` says."""
        md = self.max_dets
        return [(True, None, "all", 100), (True, 0.5, "all", md[2]), (True, 0.75, "all", md[2]),
                *((True, None, area, md[2]) for area in AREA_LABELS[1:]),
                *((False, None, "all", m) for m in md),
                *((False, None, area, md[2]) for area in AREA_LABELS[1:])]

    def summarize(self) -> np.ndarray:
        """pycocotools' 12 `stats`."""
        if self.precision is None:
            self.accumulate()
        self.stats = np.array([self._summarize(ap, iou, area, m) for ap, iou, area, m in self._specs()])
        return self.stats

    def summary_text(self) -> str:
        """The 12 lines pycocotools' `summarize()` prints."""
        lines = []
        for (ap, iou, area, max_dets), value in zip(self._specs(), self.summarize()):
            iou_text = f"{IOU_THRESHOLDS[0]:0.2f}:{IOU_THRESHOLDS[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
            title = "Average Precision  (AP)" if ap else "Average Recall     (AR)"
            lines.append(f" {title} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {value:0.3f}")
        return "\n".join(lines)

    @property
    def params(self) -> dict:
        return {"iouThrs": IOU_THRESHOLDS, "recThrs": RECALL_THRESHOLDS, "catIds": list(self.cat_ids),
                "areaRngLbl": list(AREA_LABELS), "maxDets": list(self.max_dets)}
