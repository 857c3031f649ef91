"""What a detector gets wrong, in numbers: per-class AP and an error analysis of one evaluation.

Both read a computed [`align_detr_hf.evaluation_streaming.StreamingCocoEvaluator`] (its ground truth, its top-k
detections per image, and COCOeval's precision array); [`align_detr_hf.evaluation_report`] draws them.

- [`per_class_ap`]: COCO AP per class (IoU .50:.95, .50, .75; small/medium/large), as pycocotools averages them
  for the summary but without the mean over classes.
- [`analyse_errors`]: every non-crowd ground-truth box and every detection above a score threshold, matched image by
  image at one IoU (default 0.5), ends up in one of: found (a detection of its class, the highest-scoring first, as
  COCO matches), confused (no detection of its class, but one of another class overlaps it: "mistaken for"), missed
  (counted by COCO size: small < 32x32 px, medium < 96x96, large); detections left over are false positives,
  "duplicate" when they overlap a box of their class that another detection already found, "background" otherwise.
  The confusion matrix has the ground-truth classes as rows (plus "background" for the false positives) and the
  predicted classes as columns (plus "missed").
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["AREA_RANGES", "analyse_errors", "per_class_ap"]

# COCO's area ranges (pycocotools Params.areaRng), in square pixels of the original image
AREA_RANGES = {"small": (0.0, 32.0**2), "medium": (32.0**2, 96.0**2), "large": (96.0**2, float("inf"))}


def _mean_valid(values: np.ndarray) -> float | None:
    values = values[values > -1]
    return float(values.mean()) if values.size else None


def category_names(coco_gt: Any) -> dict[int, str]:
    return {int(c["id"]): str(c.get("name", c["id"])) for c in coco_gt.loadCats(coco_gt.getCatIds())}


def per_class_ap(evaluator: Any) -> list[dict]:
    """One row per ground-truth category: `category_id`, `name`, `num_ground_truth` (non-crowd boxes), `ap`, `ap_50`,
    `ap_75`, `ap_small`, `ap_medium`, `ap_large` (None where the class has no such ground truth; 0.0 everywhere when
    there were no detections at all)."""
    coco_gt = evaluator.coco_gt
    names = category_names(coco_gt)
    counts = {cat_id: 0 for cat_id in names}
    for ann in coco_gt.dataset["annotations"]:
        if not ann.get("iscrowd", 0) and ann["category_id"] in counts:
            counts[ann["category_id"]] += 1
    rows = []
    if evaluator.precision is None:  # no detections: every class with ground truth scores 0
        for cat_id in sorted(names):
            value = 0.0 if counts[cat_id] else None
            rows.append({"category_id": cat_id, "name": names[cat_id], "num_ground_truth": counts[cat_id],
                         **{key: value for key in ("ap", "ap_50", "ap_75", "ap_small", "ap_medium", "ap_large")}})
        return rows
    params = evaluator.params
    iou_index = {round(float(t), 2): i for i, t in enumerate(params["iouThrs"])}
    area_index = {label: i for i, label in enumerate(params["areaRngLbl"])}
    for k, cat_id in enumerate(params["catIds"]):
        precision = evaluator.precision[:, :, k, :, -1]  # T x R x A at the largest maxDets (100)
        rows.append({
            "category_id": int(cat_id), "name": names.get(int(cat_id), str(cat_id)),
            "num_ground_truth": counts.get(int(cat_id), 0),
            "ap": _mean_valid(precision[:, :, area_index["all"]]),
            "ap_50": _mean_valid(precision[iou_index[0.5], :, area_index["all"]]),
            "ap_75": _mean_valid(precision[iou_index[0.75], :, area_index["all"]]),
            **{f"ap_{size}": _mean_valid(precision[:, :, area_index[size]]) for size in ("small", "medium", "large")},
        })
    return rows


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes, (n, 4) x (m, 4) -> (n, m); as pycocotools, zero-area boxes have IoU 0."""
    a, b = a.reshape(-1, 4), b.reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def size_of(area: float) -> str:
    return next(name for name, (low, high) in AREA_RANGES.items() if low <= area < high)


def _match_image(gt_boxes, gt_labels, det_boxes, det_labels, iou_threshold):
    """Greedy matching of one image (detections in descending score order): see the module docstring.
    Returns (gt_status, det_status): per box "found" / ("confused", det index) / "missed", per detection
    "found" / ("confused", gt index) / "duplicate" / "background"."""
    iou = box_iou(det_boxes, gt_boxes)
    gt_status: list[Any] = [None] * len(gt_boxes)
    det_status: list[Any] = [None] * len(det_boxes)
    for d in range(len(det_boxes)):  # 1. each detection takes the best free box of its own class
        candidates = [(iou[d, g], g) for g in range(len(gt_boxes))
                      if gt_status[g] is None and gt_labels[g] == det_labels[d] and iou[d, g] >= iou_threshold]
        if candidates:
            g = max(candidates)[1]
            gt_status[g], det_status[d] = "found", "found"
    for d in range(len(det_boxes)):  # 2. left-over detections on a box nobody found: a confusion
        if det_status[d] is not None:
            continue
        candidates = [(iou[d, g], g) for g in range(len(gt_boxes))
                      if gt_status[g] is None and gt_labels[g] != det_labels[d] and iou[d, g] >= iou_threshold]
        if candidates:
            g = max(candidates)[1]
            gt_status[g], det_status[d] = ("confused", d), ("confused", g)
    for d in range(len(det_boxes)):  # 3. the rest are false positives
        if det_status[d] is None:
            same_class_found = any(gt_labels[g] == det_labels[d] and iou[d, g] >= iou_threshold
                                   for g in range(len(gt_boxes)))
            det_status[d] = "duplicate" if same_class_found else "background"
    return ["missed" if s is None else s for s in gt_status], det_status


def analyse_errors(evaluator: Any, score_threshold: float = 0.3, iou_threshold: float = 0.5) -> dict:
    """The error analysis of the module docstring. Returns a JSON-able dict: `score_threshold`, `iou_threshold`,
    `classes` (names, in category id order), `matrix` ((K+1) x (K+1) counts; rows ground truth + "background",
    columns prediction + "missed"), `confusions` (largest first: {"ground_truth", "predicted", "count",
    "fraction"} of that class's boxes), `missed` ({"total", "small", "medium", "large"}), `false_positives`
    ({"background", "duplicate"}), `found`, `num_ground_truth`, `images` (per image id with any error: the counts
    `missed`, `confused`, `false_positives`, `errors` (their sum), and the boxes: `ground_truth` [{"category_id",
    "bbox", "size", "status": found/missed/confused, "predicted"}], `detections` above the threshold [{"category_id",
    "box" (xyxy), "score", "status": found/confused/duplicate/background}]), and `worst` (image ids, most errors
    first).
    """
    if not getattr(evaluator, "keep_detections", True):
        raise ValueError("The error analysis needs the detections: evaluate with "
                         "StreamingCocoEvaluator(..., keep_detections=True).")
    coco_gt = evaluator.coco_gt
    names = category_names(coco_gt)
    cat_ids = sorted(names)
    index = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    num = len(cat_ids)
    matrix = np.zeros((num + 1, num + 1), dtype=np.int64)
    missed = {"total": 0, **{size: 0 for size in AREA_RANGES}}
    false_positives = {"background": 0, "duplicate": 0}
    found = 0
    images = {}
    for image_id in sorted(coco_gt.getImgIds()):
        anns = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        gt_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        gt_labels = [a["category_id"] for a in anns]
        rows = evaluator.detections.get(image_id, np.zeros((0, 6)))
        rows = rows[rows[:, 4] > score_threshold]
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        det_labels = [int(v) for v in rows[:, 5]]
        gt_status, det_status = _match_image(gt_boxes, gt_labels, rows[:, :4], det_labels, iou_threshold)
        truths, detections = [], []
        for ann, status in zip(anns, gt_status):
            row = index.get(ann["category_id"])
            size = size_of(float(ann.get("area", ann["bbox"][2] * ann["bbox"][3])))
            truth = {"category_id": ann["category_id"], "bbox": ann["bbox"], "size": size, "status": status}
            if status == "found":
                found += 1
                matrix[row, row] += 1
            elif status == "missed":
                missed["total"] += 1
                missed[size] += 1
                matrix[row, num] += 1
            else:
                truth.update(status="confused", predicted=det_labels[status[1]])
                if truth["predicted"] in index:
                    matrix[row, index[truth["predicted"]]] += 1
            truths.append(truth)
        for d, status in enumerate(det_status):
            if status in ("background", "duplicate"):
                false_positives[status] += 1
                if status == "background" and det_labels[d] in index:
                    matrix[num, index[det_labels[d]]] += 1
            detections.append({"category_id": det_labels[d], "box": rows[d, :4].tolist(), "score": float(rows[d, 4]),
                               "status": status if isinstance(status, str) else "confused"})
        counts = {key: sum(t["status"] == key for t in truths) for key in ("missed", "confused")}
        counts["false_positives"] = sum(d["status"] in ("background", "duplicate") for d in detections)
        errors = sum(counts.values())
        if errors:
            images[image_id] = {**counts, "errors": errors, "ground_truth": truths, "detections": detections}
    per_class = matrix[:num].sum(1)
    confusions = [
        {"ground_truth": names[cat_ids[r]], "predicted": names[cat_ids[c]], "count": int(matrix[r, c]),
         "fraction": float(matrix[r, c] / per_class[r])}
        for r in range(num) for c in range(num) if r != c and matrix[r, c] > 0
    ]
    confusions.sort(key=lambda item: (-item["count"], item["ground_truth"], item["predicted"]))
    return {
        "score_threshold": score_threshold, "iou_threshold": iou_threshold,
        "classes": [names[c] for c in cat_ids], "matrix": matrix.tolist(), "confusions": confusions,
        "missed": missed, "false_positives": false_positives, "found": found, "num_ground_truth": int(per_class.sum()),
        "images": images, "worst": sorted(images, key=lambda i: (-images[i]["errors"], i)),
    }
