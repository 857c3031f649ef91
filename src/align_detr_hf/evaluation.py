"""COCO box mAP for Align-DETR with pycocotools' `COCOeval`.

- [`CocoEvaluator`]: accumulate detections from any loop (`update(image_ids, detections)`), then `compute()`.
- [`evaluate_model`]: run a model over a DataLoader made with [`align_detr_hf.data.collate_fn`] and score it.
- [`build_compute_metrics`]: a `compute_metrics` for `transformers.Trainer` (use `eval_do_concat_batches=False`
  and `remove_unused_columns=False`).

Metrics (pycocotools' standard summary, maxDets 100 for every AP, as pycocotools' `summarize` does): `map` (AP at
IoU .50:.95), `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_100` (AR@100). Note mmdet sets
maxDets to (100, 300, 1000) and so reports AP50/75/s/m/l at 1000 detections; with `top_k <= 100` detections per image
the two agree. pycocotools reports -1 for an area range without ground truth. For dense images (more than 100
objects), pass `max_dets=(100, 300, 1000)` (mmdet's setting): the AP metrics are then computed at 1000 detections per
image and the recalls are named after their limits (`mar_100`, `mar_300`, `mar_1000`).

Detections are expected in the *original* image's absolute xyxy pixels, with contiguous category ids (the ids of
[`align_detr_hf.data.DetectionDataset.coco_ground_truth`]).

Checked, because each would otherwise give a quietly wrong score (`ValueError` naming the problem):
- the ground truth, against the COCO schema of [`align_detr_hf.validation.check_coco`] (the one COCO json files pass
  when loaded): a NaN box (pycocotools would score AP 1.0), a negative width, an annotation whose image is not in
  `images` (it would be dropped), a category id not in `categories`, duplicate ids;
- NaN/inf scores or boxes (pycocotools would accept them and score a perfect prediction 0.667), and boxes with
  x1 < x0 or y1 < y0 (scored as negative-width boxes);
- a label that is not a category id of the ground truth: predictions in the source dataset's ids (COCO's 1..90)
  against contiguous ground-truth ids (0..79), or the reverse, would score 0 for those classes. Pass
  `unknown_labels="ignore"` for a model that predicts more classes than the ground truth has on purpose (pycocotools
  then ignores them);
- an image id that is not in the ground truth;
- in `compute_metrics`, prediction batches without their label batch (or the reverse) and batches whose predictions
  and labels hold different numbers of images (zip would drop the extra silently).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .validation import Integer, check_coco

__all__ = ["METRIC_NAMES", "CocoEvaluator", "build_compute_metrics", "coco_summary", "evaluate_model", "metric_names"]

# the first 9 entries of COCOeval.stats: AP, AP50, AP75, APs, APm, APl, AR@1, AR@10, AR@100
METRIC_NAMES = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


GROUND_TRUTH = "the ground truth"


def _coco_from_dict(gt: dict):
    from pycocotools.coco import COCO

    check_coco(gt, GROUND_TRUTH)
    coco = COCO()
    gt = copy.deepcopy(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    gt.setdefault("annotations", [])
    gt.setdefault("categories", [])
    next_id = max((ann["id"] for ann in gt["annotations"] if "id" in ann), default=0) + 1
    for ann in gt["annotations"]:
        if "id" not in ann:  # pycocotools indexes annotations by id
            ann["id"], next_id = next_id, next_id + 1
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def metric_names(max_dets: Sequence[int] = (1, 10, 100)) -> tuple[str, ...]:
    """The summary's keys: the six AP metrics (at `max_dets[-1]` detections per image), then `mar_<m>` per limit."""
    max_dets = tuple(max_dets)
    if (len(max_dets) != 3 or any(not isinstance(m, int) or m < 1 for m in max_dets)
            or list(max_dets) != sorted(set(max_dets))):
        raise ValueError(f"max_dets must be 3 increasing positive integers (pycocotools' summary), got {max_dets!r}.")
    return METRIC_NAMES[:6] + tuple(f"mar_{m}" for m in max_dets)


def coco_summary(
    coco_gt: Any, results: list[dict], verbose: bool = False, max_dets: Sequence[int] = (1, 10, 100),
    backend: str = "auto",
) -> dict[str, float]:
    """Run COCOeval (bbox) on `results` = [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] against
    `coco_gt` (a pycocotools `COCO` or a COCO dict). Only the ground truth's images are evaluated. `max_dets`: the
    detections per image for the three recalls, the last also for the APs (see the module docstring). `backend`: see
    [`align_detr_hf.coco_backend`] (auto: faster-coco-eval when installed; pycocotools' numbers to 15 digits)."""
    from .coco_backend import run_cocoeval

    names = metric_names(max_dets)
    coco_gt = _checked_coco(coco_gt)
    if not results:
        return {name: 0.0 for name in names}
    coco_eval = run_cocoeval(coco_gt, results, backend=backend, verbose=verbose, max_dets=max_dets)
    stats = [float(v) for v in coco_eval.stats[: len(names)]]
    # pycocotools' summary takes the first AP at 100 detections whatever maxDets says; take it at max_dets[-1]
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (iou, recall, class) for area "all", last limit
    stats[0] = float(precision[precision > -1].mean()) if (precision > -1).any() else -1.0
    return dict(zip(names, stats))


def _checked_coco(coco_gt: Any):
    """A pycocotools `COCO` for a ground-truth dict or `COCO`, either checked against the COCO schema."""
    if isinstance(coco_gt, dict):
        return _coco_from_dict(coco_gt)
    if not isinstance(getattr(coco_gt, "dataset", None), dict) or not hasattr(coco_gt, "getImgIds"):
        raise ValueError(f"The ground truth must be a COCO dict or a pycocotools COCO, got {type(coco_gt).__name__}.")
    check_coco(coco_gt.dataset, GROUND_TRUTH)
    return coco_gt


def _to_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return list(x)


class CocoEvaluator:
    """Collects detections (xyxy absolute in original image pixels) and scores them with COCOeval.

    Args:
        coco_gt: a COCO ground-truth dict (e.g. `DetectionDataset.coco_ground_truth()`) or a pycocotools `COCO`.
        unknown_labels: `"error"` (default) raises on a label that is not a ground-truth category id (see the module
            docstring); `"ignore"` keeps such detections (pycocotools ignores them).
        max_dets: detections per image for the recalls and APs, e.g. `(100, 300, 1000)` for AR@1000 (module doc).
    """

    def __init__(self, coco_gt: Any, unknown_labels: str = "error", max_dets: Sequence[int] = (1, 10, 100)):
        if unknown_labels not in ("error", "ignore"):
            raise ValueError(f"unknown_labels must be 'error' or 'ignore', got {unknown_labels!r}.")
        self.coco_gt = _checked_coco(coco_gt)
        self.unknown_labels = unknown_labels
        metric_names(max_dets)  # checked here, not after the whole evaluation loop
        self.max_dets = tuple(max_dets)
        self.category_ids = set(self.coco_gt.getCatIds())
        self.image_ids = set(self.coco_gt.getImgIds())
        self.results: list[dict] = []

    def reset(self) -> None:
        self.results = []

    def update(self, image_ids: Sequence[int], detections: Sequence[dict]) -> None:
        """`detections[i]` = {"scores" (k,), "labels" (k,), "boxes" (k, 4) xyxy} for image `image_ids[i]`."""
        image_ids, detections = list(image_ids), list(detections)
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection dicts; give one per image.")
        for image_id, det in zip(image_ids, detections):
            image_id = _image_id(image_id)
            scores, labels, boxes = _arrays(image_id, det)
            self._check(image_id, scores, labels, boxes)
            for score, label, (x0, y0, x1, y1) in zip(
                _to_list(det["scores"]), _to_list(det["labels"]), _to_list(det["boxes"])
            ):
                self.results.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label),
                        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                        "score": float(score),
                    }
                )

    def _check(self, image_id: int, scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray) -> None:
        where = f"detections of image_id {image_id}"
        if image_id not in self.image_ids:
            raise ValueError(f"{where}: image_id {image_id} is not in the ground truth.")
        if not (len(scores) == len(labels) == len(boxes)):
            raise ValueError(f"{where}: {len(scores)} scores, {len(labels)} labels and {len(boxes)} boxes.")
        if not np.isfinite(scores).all() or not np.isfinite(boxes).all():
            raise ValueError(f"{where}: NaN/inf in the scores or boxes (the model output is not finite).")
        inverted = np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
        if len(inverted):
            j = int(inverted[0])
            raise ValueError(f"{where}: box {j} {boxes[j].tolist()} has x1 < x0 or y1 < y0; boxes must be [x0, y0, x1, "
                             f"y1] in pixels ({len(inverted)} such box(es)).")  # fmt: skip
        if (labels != np.round(labels)).any():
            raise ValueError(f"{where}: labels must be integer class ids, got {labels[labels != np.round(labels)][:3]}")
        unknown = sorted({int(v) for v in labels} - self.category_ids)
        if unknown and self.category_ids and self.unknown_labels == "error":
            known = sorted(self.category_ids)
            raise ValueError(
                f"{where}: label(s) {unknown[:5]} are not category ids of the ground truth ({known[0]}..{known[-1]}, "
                f"{len(known)} ids). Are the predictions in the original dataset's category ids while the ground truth "
                "uses contiguous ids (or the reverse)? Map them first, or pass unknown_labels='ignore'."
            )

    def compute(self, verbose: bool = False) -> dict[str, float]:
        return coco_summary(self.coco_gt, self.results, verbose=verbose, max_dets=self.max_dets)


_IMAGE_ID = Integer(whole_floats=True)


def _image_id(value) -> int:
    value = value.item() if isinstance(value, (torch.Tensor, np.generic, np.ndarray)) and np.size(value) == 1 else value
    if not _IMAGE_ID.ok(value):
        raise ValueError(f"image ids must be integers, got {value!r}.")
    return int(value)


def _arrays(image_id: int, det: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores, labels, boxes (k, 4)) of one detection dict as float64 arrays, or a ValueError naming the image."""
    where = f"detections of image_id {image_id}"
    if not isinstance(det, dict):
        raise ValueError(f"{where}: expected a dict with 'scores', 'labels' and 'boxes', got {type(det).__name__}.")
    for key in ("scores", "labels", "boxes"):
        if key not in det:
            raise ValueError(f"{where}: no '{key}' (a detection dict holds 'scores', 'labels' and 'boxes').")
    try:
        scores, labels, boxes = (
            np.asarray(_to_list(det[key]), dtype=np.float64) for key in ("scores", "labels", "boxes")
        )
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}: scores, labels and boxes must hold numbers ({error}).") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape (k, 4), got {tuple(boxes.shape)}.")
    return scores.reshape(-1), labels.reshape(-1), boxes


def _image_ids_and_sizes(labels: Iterable[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    image_ids, sizes = [], []
    for target in labels:
        image_ids.append(int(np.asarray(_to_list(target["image_id"])).reshape(-1)[0]))
        h, w = np.asarray(_to_list(target["orig_size"])).reshape(-1)[:2]
        sizes.append((int(h), int(w)))
    return image_ids, sizes


def _post_process(logits, pred_boxes, sizes, threshold: float, top_k: int):
    from .image_processing_align_detr import AlignDetrImageProcessor

    outputs = {"logits": torch.as_tensor(logits).float(), "pred_boxes": torch.as_tensor(pred_boxes).float()}
    return AlignDetrImageProcessor(do_resize=False).post_process_object_detection(
        outputs, threshold=threshold, target_sizes=sizes, top_k=top_k
    )


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    coco_gt: Any,
    threshold: float = 0.0,
    top_k: int = 100,
    device: torch.device | str | None = None,
    evaluator: CocoEvaluator | None = None,
) -> dict[str, float]:
    """COCO mAP of `model` on batches from [`align_detr_hf.data.collate_fn`] (labels must carry `image_id` and
    `orig_size`). The model is put in eval mode and restored afterwards."""
    evaluator = evaluator or CocoEvaluator(coco_gt)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in dataloader:
            outputs = model(pixel_values=batch["pixel_values"].to(device), pixel_mask=batch["pixel_mask"].to(device))
            image_ids, sizes = _image_ids_and_sizes(batch["labels"])
            evaluator.update(image_ids, _post_process(outputs.logits, outputs.pred_boxes, sizes, threshold, top_k))
    finally:
        model.train(was_training)
    return evaluator.compute()


def _split_prediction(prediction: Any) -> tuple[Any, Any]:
    """(logits, pred_boxes) from one batch of Trainer predictions.

    Trainer's prediction tuple holds the non-None output fields other than `loss` and the config's
    `keys_to_ignore_at_inference`, in the output dataclass order: `loss_dict` (a dict, only when labels were given),
    then `logits` (B, Q, C), then `pred_boxes` (B, Q, 4). Dicts are skipped; the first two array-likes are taken.
    """
    if not isinstance(prediction, (list, tuple)):
        raise ValueError(f"Expected a tuple of model outputs, got {type(prediction).__name__}.")
    arrays = [p for p in prediction if not isinstance(p, dict) and hasattr(p, "shape") and len(p.shape) == 3]
    if len(arrays) < 2 or arrays[1].shape[-1] != 4:
        raise ValueError(
            "Could not find (logits, pred_boxes) in the predictions; is keys_to_ignore_at_inference set and "
            "eval_do_concat_batches=False?"
        )
    return arrays[0], arrays[1]


def build_compute_metrics(coco_gt: Any, threshold: float = 0.0, top_k: int = 100, id2label: dict | None = None):
    """`compute_metrics(eval_pred)` for `transformers.Trainer` with `eval_do_concat_batches=False`.

    `eval_pred.predictions` is a list (one entry per eval batch) of output tuples, `eval_pred.label_ids` the list of
    per-batch label lists (dicts with `image_id` and `orig_size`). Returns the COCO metrics (see module docstring).
    `id2label` is accepted for API symmetry with transformers' example and currently unused.
    """

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        evaluator = CocoEvaluator(coco_gt)
        if predictions and not isinstance(predictions[0], (list, tuple)):
            # concatenated predictions (eval_do_concat_batches=True): a single batch
            predictions, label_ids = [predictions], [label_ids]
        if len(predictions) != len(label_ids):
            raise ValueError(
                f"compute_metrics: {len(predictions)} prediction batches but {len(label_ids)} label batches; each "
                "evaluation batch needs both (eval_do_concat_batches=False, labels with image_id and orig_size)."
            )
        for batch, (prediction, labels) in enumerate(zip(predictions, label_ids)):
            logits, pred_boxes = _split_prediction(prediction)
            image_ids, sizes = _image_ids_and_sizes(labels)
            if len(logits) != len(image_ids):
                raise ValueError(f"compute_metrics: batch {batch} holds predictions for {len(logits)} images but "
                                 f"labels for {len(image_ids)}.")  # fmt: skip
            evaluator.update(image_ids, _post_process(logits, pred_boxes, sizes, threshold, top_k))
        return evaluator.compute()

    return compute_metrics
