"""COCO evaluation whose memory does not grow with the model's outputs nor with COCOeval's per-image state: each batch
is post-processed as it comes, only its top-k detections per image are kept (100 x 6 numbers instead of the ~300 KB
of a DINO model's 900 x 80 logits that `Trainer` otherwise holds for the whole evaluation set; transformers #34675),
and each image is matched against its ground truth as it arrives ([`align_detr_hf.coco_compact`]), leaving 36 bytes
a detection for the final numbers instead of the ~200 KB an image of pycocotools' `COCOeval`.

- [`StreamingCocoEvaluator`]: a [`CocoEvaluator`] fed image by image (the first detections given for an image id
  count; repeats, e.g. accelerate's `even_batches` padding, are dropped); after `compute()` also the per-class
  precision/recall arrays for the pictures of [`align_detr_hf.evaluation_report`]. By default it also keeps each
  image's detections (48 bytes each) for the error analysis and the worst-image pictures; `keep_detections=False`
  keeps only the 36 bytes. `backend="pycocotools"` or `"faster_coco_eval"` runs that `COCOeval` at the end instead.
- [`CocoMetrics`]: `compute_metrics` and `preprocess_logits_for_metrics` for `transformers.Trainer`:

      metrics = CocoMetrics(val_set.coco_ground_truth())
      args = TrainingArguments(..., batch_eval_metrics=True, remove_unused_columns=False)
      trainer = Trainer(..., args=args, compute_metrics=metrics,
                        preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics)

  `preprocess_logits_for_metrics` runs on each process before Trainer gathers, on the model's device, and turns a
  batch's outputs into a fixed-size `(B, top_k, 7)` float64 tensor (image id, xyxy in original pixels, score,
  label; label -1 where the score is not above `threshold`); with `batch_eval_metrics=True` each batch is added to
  the evaluator as it comes and the metrics are computed on the last one. It also works without
  `batch_eval_metrics` (then Trainer keeps the small packed tensors) and without `preprocess_logits_for_metrics`
  (then each batch's raw outputs are post-processed when they arrive, as [`build_compute_metrics`] does). The packed
  tensors have the same shape on every process, so several processes gather them as tensors (checked with torchrun,
  2 CPU processes).
- [`evaluate_loader`]: the same for any loop (the Accelerate script), gathering across processes.

The numbers are those of [`build_compute_metrics`] with pycocotools on the same predictions, to the last digit
(tested): the same post-processing, the same float values, the same per-image order of detections, pycocotools'
matching and accumulation. faster-coco-eval (the automatic backend of [`coco_summary`]) may differ from both by a
float64 step (<= 1e-15).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .coco_backend import BACKENDS, resolve_backend
from .coco_compact import CompactCocoEval
from .evaluation import CocoEvaluator, _image_ids_and_sizes, _split_prediction, metric_names

__all__ = ["CocoMetrics", "StreamingCocoEvaluator", "evaluate_loader", "evaluator_backend", "pack_detections"]

# one packed detection: image id, x0, y0, x1, y1 (original image pixels), score, label (-1: not kept)
PACKED_WIDTH = 7


def pack_detections(
    logits: Any, pred_boxes: Any, image_ids: Sequence[int] | torch.Tensor, target_sizes: Any,
    threshold: float = 0.0, top_k: int = 100,
) -> torch.Tensor:
    """(B, k, 7) float64 on the outputs' device, k = min(top_k, queries x classes): the image processor's
    post-processing (sigmoid, top-k over query-class pairs, boxes in original pixels, score > threshold), each image's
    kept detections first and the rest of its k rows with label -1. float64 holds the float32 values and any image id
    exactly."""
    from .image_processing_align_detr import AlignDetrImageProcessor

    logits, pred_boxes = torch.as_tensor(logits), torch.as_tensor(pred_boxes)
    detections = AlignDetrImageProcessor(do_resize=False).post_process_object_detection(
        {"logits": logits, "pred_boxes": pred_boxes}, threshold=threshold, target_sizes=target_sizes, top_k=top_k
    )
    k = min(top_k, logits.shape[1] * logits.shape[2])
    device = logits.device if logits.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    packed = torch.full((len(detections), k, PACKED_WIDTH), -1.0, dtype=torch.float64, device=device)
    packed[..., 0] = torch.as_tensor(image_ids).reshape(-1, 1).to(device=device, dtype=torch.float64)
    for rows, det in zip(packed, detections):
        n = len(det["scores"])
        for columns, key in ((slice(1, 5), "boxes"), (5, "scores"), (6, "labels")):
            rows[:n, columns] = det[key].to(device, torch.float64)
    return packed


def _array(x: Any) -> np.ndarray:
    """float64 numpy copy of a tensor (any device), array or list: the values exactly."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _is_packed(x: Any) -> bool:
    return (
        hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) in (2, 3) and x.shape[-1] == PACKED_WIDTH
        and str(x.dtype).endswith("float64")
    )


EVALUATOR_BACKENDS = ("compact", *BACKENDS)


def evaluator_backend(backend: str | None = "auto") -> str:
    """`"auto"` (or None) and `"compact"` -> `"compact"` ([`align_detr_hf.coco_compact`]: image by image, 36 bytes a
    detection, pycocotools' numbers to the last bit); `"pycocotools"` / `"faster_coco_eval"` -> that COCOeval at the
    end over the kept detections (checked to be installed)."""
    backend = backend or "auto"
    if backend in ("auto", "compact"):
        return "compact"
    if backend not in BACKENDS:
        raise ValueError(f"COCO backend must be 'auto' or one of {', '.join(EVALUATOR_BACKENDS)}, got {backend!r}.")
    return resolve_backend(backend)


class StreamingCocoEvaluator(CocoEvaluator):
    """A [`CocoEvaluator`] that scores each image as its detections arrive ([`align_detr_hf.coco_compact`]) and keeps
    36 bytes per detection for the final numbers, instead of the ~200 KB an image of pycocotools' `COCOeval`. The
    first detections given for an image id count; later repeats are dropped.

    Args:
        coco_gt, unknown_labels, max_dets: as [`CocoEvaluator`].
        backend: `"auto"` (= `"compact"`), or `"pycocotools"` / `"faster_coco_eval"` to run that `COCOeval` at the
            end instead (it then needs the detections, kept whatever `keep_detections` says).
        keep_detections: also keep each image's detections as one `(k, 6)` float64 array (x0, y0, x1, y1, score,
            label; 48 bytes a detection) in `detections`, for the error analysis and worst-image pictures of
            [`align_detr_hf.evaluation_report`]. False keeps only the 36 bytes a detection of the metrics.

    After `compute()`: `metrics`, `stats` (pycocotools' 12), `precision` (T x R x K x A x M), `recall`
    (T x K x A x M), `params` (iouThrs, recThrs, catIds, areaRngLbl, maxDets) for per-class tables and curves.
    `nbytes`: the bytes of the per-detection state held.
    """

    def __init__(self, coco_gt: Any, unknown_labels: str = "error", backend: str = "auto",
                 max_dets: Sequence[int] = (1, 10, 100), keep_detections: bool = True):
        super().__init__(coco_gt, unknown_labels, max_dets)
        self.backend = evaluator_backend(backend)
        self.keep_detections = bool(keep_detections) or self.backend != "compact"
        self._index = {image_id: n for n, image_id in enumerate(sorted(self.image_ids))}
        self.reset()

    def reset(self) -> None:
        self.detections: dict[int, np.ndarray] = {}
        self._seen = np.zeros(len(self._index), dtype=bool)
        self._num_given = 0
        self._compact = CompactCocoEval(self.coco_gt, self.max_dets) if self.backend == "compact" else None
        self.metrics = self.stats = self.precision = self.recall = self.params = None

    @property
    def nbytes(self) -> int:
        """Bytes held per detection: the compact records plus the kept detections (without Python object
        overheads: ~100 bytes an image for each kept array)."""
        kept = sum(rows.nbytes for rows in self.detections.values())
        return kept + (self._compact.nbytes if self._compact is not None else 0)

    def update(self, image_ids: Sequence[int], detections: Sequence[dict]) -> None:
        """`detections[i]` = {"scores" (k,), "labels" (k,), "boxes" (k, 4) xyxy} for image `image_ids[i]`."""
        image_ids, detections = list(image_ids), list(detections)
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection dicts; give one per image.")
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id)
            scores, labels, boxes = (_array(det[key]) for key in ("scores", "labels", "boxes"))
            boxes = boxes.reshape(-1, 4)
            self._check(image_id, scores, labels, boxes)
            n = self._index[image_id]
            if self._seen[n]:
                continue
            self._seen[n] = True
            self._num_given += len(scores)
            if self._compact is not None:
                self._compact.add_image(image_id, boxes, scores, labels)
            if self.keep_detections:
                self.detections[image_id] = np.concatenate([boxes, scores[:, None], labels[:, None]], axis=1)

    def add_packed(self, packed: Any) -> None:
        """Add `(B, k, 7)` (or one image's `(k, 7)`) detections from [`pack_detections`]."""
        packed = _array(packed)
        for rows in packed.reshape(-1, *packed.shape[-2:]):
            kept = rows[rows[:, 6] >= 0]
            image_id = int(rows[0, 0]) if len(rows) else None
            if image_id is not None:
                self.update([image_id], [{"scores": kept[:, 5], "labels": kept[:, 6], "boxes": kept[:, 1:5]}])

    def coco_results(self) -> list[dict]:
        """The detections as COCO results ([x, y, w, h] boxes), image by image in the order they came."""
        if not self.keep_detections:
            raise ValueError("The detections were not kept (keep_detections=False); evaluate with "
                             "StreamingCocoEvaluator(..., keep_detections=True) to have them.")
        results = []
        for image_id, rows in self.detections.items():
            for x0, y0, x1, y1, score, label in rows.tolist():
                results.append({"image_id": image_id, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "score": score})
        return results

    def compute(self, verbose: bool = False) -> dict[str, float]:
        names = metric_names(self.max_dets)
        if self._num_given == 0:  # pycocotools refuses an empty result list: every metric 0
            self.metrics = {name: 0.0 for name in names}
            return dict(self.metrics)
        if self._compact is not None:
            self._compact.accumulate()
            self.stats = self._compact.summarize()
            self.precision, self.recall, self.params = self._compact.precision, self._compact.recall, \
                self._compact.params
            if verbose:
                print(self._compact.summary_text())
        else:
            from .coco_backend import run_cocoeval

            coco_eval = run_cocoeval(self.coco_gt, self.coco_results(), backend=self.backend, verbose=verbose,
                                     max_dets=self.max_dets)
            self.stats = np.asarray(coco_eval.stats[:12], dtype=np.float64)
            self.precision, self.recall = np.asarray(coco_eval.eval["precision"]), np.asarray(coco_eval.eval["recall"])
            p = coco_eval.params
            self.params = {"iouThrs": np.asarray(p.iouThrs), "recThrs": np.asarray(p.recThrs),
                           "catIds": list(p.catIds), "areaRngLbl": list(p.areaRngLbl), "maxDets": list(p.maxDets)}
        values = [float(v) for v in self.stats[: len(names)]]
        # as coco_summary: the first AP at max_dets[-1] (pycocotools takes it at 100 whatever maxDets says)
        last = self.precision[:, :, :, 0, -1]
        values[0] = float(last[last > -1].mean()) if (last > -1).any() else -1.0
        self.metrics = dict(zip(names, values))
        return dict(self.metrics)


class CocoMetrics:
    """`compute_metrics` (with `compute_result`, for `batch_eval_metrics=True`) and `preprocess_logits_for_metrics`
    for `transformers.Trainer`; see the module docstring. After each evaluation `last_evaluator` holds its
    [`StreamingCocoEvaluator`] (detections and per-class arrays, for [`align_detr_hf.evaluation_report`])."""

    def __init__(self, coco_gt: Any, threshold: float = 0.0, top_k: int = 100, backend: str = "auto",
                 unknown_labels: str = "error", max_dets: Sequence[int] = (1, 10, 100), keep_detections: bool = True):
        self.threshold, self.top_k = threshold, top_k
        self.evaluator = StreamingCocoEvaluator(coco_gt, unknown_labels, backend, max_dets, keep_detections)
        self.last_evaluator: StreamingCocoEvaluator | None = None

    def preprocess_logits_for_metrics(self, logits: Any, labels: Any) -> torch.Tensor:
        if labels is None:
            raise ValueError("COCO evaluation needs the labels (image_id, orig_size) of each batch; the evaluation "
                             "dataset gave none (keep remove_unused_columns=False).")
        logits, pred_boxes = _split_prediction(logits)
        image_ids, sizes = _image_ids_and_sizes(labels)
        return pack_detections(logits, pred_boxes, image_ids, sizes, self.threshold, self.top_k)

    def __call__(self, eval_pred: Any, compute_result: bool = True) -> dict[str, float]:
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        if _is_packed(predictions):
            self.evaluator.add_packed(predictions)
        elif isinstance(predictions, (list, tuple)) and predictions and all(_is_packed(p) for p in predictions):
            for packed in predictions:  # one entry per batch, or per image after gather_object
                self.evaluator.add_packed(packed)
        else:  # raw outputs: one batch (batch_eval_metrics) or a list of batches (eval_do_concat_batches=False)
            if predictions and not isinstance(predictions[0], (list, tuple)):
                predictions, label_ids = [predictions], [label_ids]
            for prediction, labels in zip(predictions, label_ids):
                self.evaluator.add_packed(self.preprocess_logits_for_metrics(prediction, labels))
        if not compute_result:
            return {}
        metrics = self.evaluator.compute()
        evaluator = self.evaluator
        self.last_evaluator = evaluator
        self.evaluator = StreamingCocoEvaluator(evaluator.coco_gt, evaluator.unknown_labels, evaluator.backend,
                                                evaluator.max_dets, evaluator.keep_detections)
        return metrics


@torch.no_grad()
def evaluate_loader(
    model: torch.nn.Module, batches: Iterable[dict], evaluator: StreamingCocoEvaluator, accelerator: Any = None,
    threshold: float = 0.0, top_k: int = 100,
) -> StreamingCocoEvaluator | None:
    """Run `model` on batches of [`align_detr_hf.data.collate_fn`] and add each batch's detections to `evaluator`
    as it comes; with an `accelerate.Accelerator`, each batch is gathered from all processes (fixed-size packed
    tensors; `gather_for_metrics` drops the padding samples) and only the main process keeps them. Returns the
    evaluator with `compute()` done on the main process, None on the others. The model is restored to its mode."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    is_main = accelerator is None or accelerator.is_main_process
    try:
        for batch in batches:
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
            labels = batch["labels"]
            image_ids = torch.stack([t["image_id"].reshape(-1)[0] for t in labels])
            sizes = torch.stack([t["orig_size"].reshape(-1)[:2] for t in labels])
            packed = pack_detections(outputs.logits, outputs.pred_boxes, image_ids, sizes, threshold, top_k)
            if accelerator is not None and accelerator.num_processes > 1:
                packed = accelerator.gather_for_metrics(packed)
            if is_main:
                evaluator.add_packed(packed)
    finally:
        model.train(was_training)
    if not is_main:
        return None
    evaluator.compute()
    return evaluator
