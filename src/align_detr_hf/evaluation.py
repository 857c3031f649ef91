"""COCO box mAP for Align-DETR with pycocotools' `COCOeval`.

- [`CocoEvaluator`]: accumulate detections from any loop (`update(image_ids, detections)`), then `compute()`.
- [`evaluate_model`]: run a model over a DataLoader made with [`align_detr_hf.data.collate_fn`] and score it.
- [`build_compute_metrics`]: a `compute_metrics` for `transformers.Trainer` (use `eval_do_concat_batches=False`
  and `remove_unused_columns=False`).

Metrics (pycocotools' standard summary, maxDets 100 for every AP, as pycocotools' `summarize` does): `map` (AP at
IoU .50:.95), `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_100` (AR@100). Note mmdet sets
maxDets to (100, 300, 1000) and so reports AP50/75/s/m/l at 1000 detections; with `top_k <= 100` detections per image
the two agree. pycocotools reports -1 for an area range without ground truth.

Detections are expected in the *original* image's absolute xyxy pixels, with contiguous category ids (the ids of
[`align_detr_hf.data.DetectionDataset.coco_ground_truth`]).

Checked, because each would otherwise give a quietly wrong score (`ValueError` naming the problem):
- NaN/inf scores or boxes (pycocotools would accept them and score a perfect prediction 0.667);
- a label that is not a category id of the ground truth: predictions in the source dataset's ids (COCO's 1..90)
  against contiguous ground-truth ids (0..79), or the reverse, would score 0 for those classes. Pass
  `unknown_labels="ignore"` for a model that predicts more classes than the ground truth has on purpose (pycocotools
  then ignores them);
- an image id that is not in the ground truth, and duplicate image ids in a ground-truth dict.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["METRIC_NAMES", "CocoEvaluator", "build_compute_metrics", "coco_summary", "evaluate_model"]

# the first 9 entries of COCOeval.stats: AP, AP50, AP75, APs, APm, APl, AR@1, AR@10, AR@100
METRIC_NAMES = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def _coco_from_dict(gt: dict):
    from pycocotools.coco import COCO

    ids = [image["id"] for image in gt.get("images", [])]
    if len(set(ids)) != len(ids):
        duplicates = sorted({str(i) for i in ids if ids.count(i) > 1})
        raise ValueError(f"Duplicate image id(s) {', '.join(duplicates[:5])} in the ground truth's 'images'.")
    coco = COCO()
    gt = copy.deepcopy(gt)
    gt.setdefault("info", {})
    gt.setdefault("licenses", [])
    for ann in gt["annotations"]:
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_summary(coco_gt: Any, results: list[dict], verbose: bool = False, backend: str = "auto") -> dict[str, float]:
    """Run COCOeval (bbox) on `results` = [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] against
    `coco_gt` (a pycocotools `COCO` or a COCO dict). Only the ground truth's images are evaluated. `backend`: see
    [`align_detr_hf.coco_backend`] (auto: faster-coco-eval when installed; pycocotools' numbers to 15 digits)."""
    from .coco_backend import run_cocoeval

    if isinstance(coco_gt, dict):
        coco_gt = _coco_from_dict(coco_gt)
    coco_eval = run_cocoeval(coco_gt, results, backend=backend, verbose=verbose)
    if coco_eval is None:
        return {name: 0.0 for name in METRIC_NAMES}
    return {name: float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats[: len(METRIC_NAMES)])}


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
    """

    def __init__(self, coco_gt: Any, unknown_labels: str = "error"):
        if unknown_labels not in ("error", "ignore"):
            raise ValueError(f"unknown_labels must be 'error' or 'ignore', got {unknown_labels!r}.")
        self.coco_gt = _coco_from_dict(coco_gt) if isinstance(coco_gt, dict) else coco_gt
        self.unknown_labels = unknown_labels
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
            image_id = int(image_id)
            scores, labels, boxes = (
                np.asarray(_to_list(det[key]), dtype=np.float64) for key in ("scores", "labels", "boxes")
            )
            self._check(image_id, scores, labels, boxes.reshape(-1, 4))
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
        return coco_summary(self.coco_gt, self.results, verbose=verbose)


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
        for prediction, labels in zip(predictions, label_ids):
            logits, pred_boxes = _split_prediction(prediction)
            image_ids, sizes = _image_ids_and_sizes(labels)
            evaluator.update(image_ids, _post_process(logits, pred_boxes, sizes, threshold, top_k))
        return evaluator.compute()

    return compute_metrics
