"""Streaming COCO evaluation gives today's accumulate-then-compute numbers to the last digit (same predictions)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from align_detr_hf import coco_backend
from align_detr_hf.evaluation import build_compute_metrics
from align_detr_hf.evaluation_streaming import CocoMetrics, StreamingCocoEvaluator, evaluate_loader, pack_detections

pytest.importorskip("pycocotools")

NUM_CLASSES, NUM_QUERIES = 4, 15


def make_ground_truth(num_images=30, seed=0):
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        images.append({"id": image_id * 7, "width": width, "height": height})  # ids need not be 1..N
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id * 7, "category_id": int(rng.integers(
                0, NUM_CLASSES)), "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    categories = [{"id": c, "name": f"c{c}"} for c in range(NUM_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def model_outputs(gt, seed=0):
    """Per image: logits (Q, C) and cxcywh boxes (Q, 4) whose first queries are jittered ground-truth boxes, some
    with the wrong class, the rest random: a realistic spread of IoUs, scores and confusions."""
    rng = np.random.default_rng(seed + 1)
    outputs = {}
    for image in gt["images"]:
        logits = rng.normal(-3.0, 1.5, (NUM_QUERIES, NUM_CLASSES)).astype(np.float32)
        boxes = np.concatenate([rng.uniform(0.2, 0.8, (NUM_QUERIES, 2)), rng.uniform(0.05, 0.4, (NUM_QUERIES, 2))], 1)
        anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
        for q, ann in enumerate(anns):
            x, y, w, h = np.asarray(ann["bbox"]) * rng.uniform(0.9, 1.1, 4)
            boxes[q] = [(x + w / 2) / image["width"], (y + h / 2) / image["height"], w / image["width"],
                        h / image["height"]]
            label = ann["category_id"] if rng.random() < 0.8 else int(rng.integers(0, NUM_CLASSES))
            logits[q, label] = rng.normal(2.0, 1.5)
        outputs[image["id"]] = (logits, boxes.astype(np.float32))
    return outputs


def labels_of(image):
    return {"image_id": torch.tensor([image["id"]]), "orig_size": torch.tensor([image["height"], image["width"]])}


def batches(gt, outputs, batch_size=4):
    images = gt["images"]
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        logits = torch.from_numpy(np.stack([outputs[i["id"]][0] for i in chunk]))
        boxes = torch.from_numpy(np.stack([outputs[i["id"]][1] for i in chunk]))
        # Trainer's per-batch prediction tuple: (loss_dict, logits, pred_boxes) when labels are given
        yield ({"loss_ce": torch.tensor(1.0)}, logits, boxes), [labels_of(i) for i in chunk]


@pytest.fixture(scope="module")
def case():
    gt = make_ground_truth()
    outputs = model_outputs(gt)
    # today's accumulate-then-compute: every batch's outputs kept, then compute_metrics once
    all_batches = list(batches(gt, outputs))
    eval_pred = SimpleNamespace(
        predictions=[tuple(p.numpy() if torch.is_tensor(p) else p for p in pred) for pred, _ in all_batches],
        label_ids=[labels for _, labels in all_batches],
    )
    with pytest.MonkeyPatch.context() as patch:  # pycocotools' numbers: the compact evaluation's, bit for bit
        patch.setattr(coco_backend, "BACKENDS", ("pycocotools",))
        reference = build_compute_metrics(gt)(eval_pred)
    assert 0.05 < reference["map"] < 0.9  # a non-trivial score, so that equality means something
    return gt, outputs, reference


@pytest.mark.parametrize("preprocess", [True, False], ids=["packed", "raw-batches"])
def test_streaming_equals_accumulate_then_compute(case, preprocess):
    gt, outputs, reference = case
    metrics_fn = CocoMetrics(gt)
    all_batches = list(batches(gt, outputs))
    result = None
    for index, (prediction, labels) in enumerate(all_batches):
        if preprocess:  # Trainer calls this on each process before gathering
            prediction = metrics_fn.preprocess_logits_for_metrics(prediction, labels)
        result = metrics_fn(SimpleNamespace(predictions=prediction, label_ids=labels),
                            compute_result=index == len(all_batches) - 1)
        if index < len(all_batches) - 1:
            assert result == {}
    assert result == reference  # every metric, to the last digit
    # the evaluator is fresh for the next evaluation; the finished one is kept for the pictures
    assert metrics_fn.evaluator.detections == {} and len(metrics_fn.last_evaluator.detections) == len(gt["images"])


def test_packed_without_batch_eval_metrics_equals(case):
    """batch_eval_metrics=False: Trainer keeps the small packed tensors (a list per batch) and calls once."""
    gt, outputs, reference = case
    metrics_fn = CocoMetrics(gt)
    packed = [metrics_fn.preprocess_logits_for_metrics(p, labels).numpy() for p, labels in batches(gt, outputs)]
    assert metrics_fn(SimpleNamespace(predictions=packed, label_ids=None)) == reference
    # gather_object (several processes) hands over one (k, 7) array per image; concatenated batches one array
    per_image = [rows for batch in packed for rows in batch]
    assert CocoMetrics(gt)(SimpleNamespace(predictions=per_image, label_ids=None)) == reference
    assert CocoMetrics(gt)(SimpleNamespace(predictions=np.concatenate(packed), label_ids=None)) == reference


def test_packing_keeps_top_k_and_threshold():
    logits = torch.tensor([[[4.0, -9.0], [0.0, -2.0], [-100.0, -100.0]]])  # scores .982, .5, .119, 0 ...
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    packed = pack_detections(logits, boxes, [11], [(100, 200)], threshold=0.3, top_k=4)
    assert packed.shape == (1, 4, 7) and packed.dtype == torch.float64
    assert packed[0, :, 0].tolist() == [11.0] * 4
    assert packed[0, :, 6].tolist() == [0.0, 0.0, -1.0, -1.0]  # two above 0.3, the rest marked -1
    # xyxy in original pixels, as the image processor gives them (float32: 0.6 * 200 is 120.0000076)
    assert packed[0, 0, 1:5].tolist() == pytest.approx([80.0, 40.0, 120.0, 60.0], rel=1e-6)
    assert packed[0, 1, 1:5].tolist() == pytest.approx([0.0, 0.0, 100.0, 50.0], rel=1e-6)
    assert packed[0, :2, 5].tolist() == pytest.approx([0.98201379, 0.5], rel=1e-6)


def test_repeated_images_count_once(case):
    """accelerate's even_batches repeats a few images to fill the last batch: they must not count twice."""
    gt, outputs, reference = case
    metrics_fn = CocoMetrics(gt)
    packed = [metrics_fn.preprocess_logits_for_metrics(p, labels) for p, labels in batches(gt, outputs)]
    packed.append(packed[0])
    assert metrics_fn(SimpleNamespace(predictions=packed, label_ids=None)) == reference


def test_evaluate_loader_equals(case):
    gt, outputs, reference = case

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pixel_values, pixel_mask):
            ids = [int(i) for i in pixel_values[:, 0, 0, 0]]
            return SimpleNamespace(logits=torch.from_numpy(np.stack([outputs[i][0] for i in ids])),
                                   pred_boxes=torch.from_numpy(np.stack([outputs[i][1] for i in ids])))

    loader = []
    for _, labels in batches(gt, outputs):
        ids = torch.tensor([float(t["image_id"]) for t in labels])
        loader.append({"pixel_values": ids[:, None, None, None].expand(-1, 3, 2, 2), "labels": labels,
                       "pixel_mask": torch.ones(len(labels), 2, 2, dtype=torch.long)})
    evaluator = evaluate_loader(Stub(), loader, StreamingCocoEvaluator(gt))
    assert evaluator.metrics == reference
    assert evaluator.precision.shape == (10, 101, NUM_CLASSES, 4, 3)


def test_trainer_batch_eval_metrics_equals_accumulate(case, tmp_path, monkeypatch):
    """The real Trainer: batch_eval_metrics=True with CocoMetrics == today's build_compute_metrics (pycocotools)."""
    monkeypatch.setattr(coco_backend, "BACKENDS", ("pycocotools",))
    from transformers import Trainer, TrainingArguments

    from align_detr_hf.modeling_align_detr import AlignDetrObjectDetectionOutput

    gt, outputs, reference = case

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pixel_values, pixel_mask=None, labels=None):
            ids = [int(t["image_id"]) for t in labels]
            return AlignDetrObjectDetectionOutput(
                loss=self.p * 0, loss_dict={"loss_ce": self.p * 0},
                logits=torch.from_numpy(np.stack([outputs[i][0] for i in ids])),
                pred_boxes=torch.from_numpy(np.stack([outputs[i][1] for i in ids])),
            )

    dataset = [{"pixel_values": torch.zeros(3, 2, 2), "labels": labels_of(image)} for image in gt["images"]]

    def collate(items):
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "labels": [i["labels"] for i in items]}

    def evaluate(streaming):
        metrics_fn = CocoMetrics(gt) if streaming else build_compute_metrics(gt)
        args = TrainingArguments(output_dir=str(tmp_path / str(streaming)), per_device_eval_batch_size=4,
                                 remove_unused_columns=False, report_to="none", batch_eval_metrics=streaming,
                                 eval_do_concat_batches=False, use_cpu=True)
        trainer = Trainer(model=Stub(), args=args, eval_dataset=dataset, data_collator=collate,
                          compute_metrics=metrics_fn,
                          preprocess_logits_for_metrics=metrics_fn.preprocess_logits_for_metrics if streaming else None)
        return {k[len("eval_"):]: v for k, v in trainer.evaluate().items() if k[len("eval_"):] in reference}

    assert evaluate(streaming=True) == evaluate(streaming=False) == reference


def test_compact_state_equals_cocoeval_backends(case):
    """The default (compact, image by image) gives pycocotools' COCOeval numbers bit for bit and keeps 36 bytes a
    detection (+48 with the detections kept for the pictures); the COCOeval backends stay selectable."""
    gt, outputs, reference = case
    packed = [CocoMetrics(gt).preprocess_logits_for_metrics(p, labels) for p, labels in batches(gt, outputs)]
    evaluators = {}
    for backend, keep in (("auto", True), ("auto", False), ("pycocotools", False)):
        evaluator = StreamingCocoEvaluator(gt, backend=backend, keep_detections=keep)
        for batch in packed:
            evaluator.add_packed(batch)
        assert evaluator.compute() == reference
        evaluators[backend, keep] = evaluator
    compact, pycocotools = evaluators["auto", True], evaluators["pycocotools", False]
    assert compact.backend == "compact" and pycocotools.backend == "pycocotools" and pycocotools.keep_detections
    assert np.array_equal(compact.precision, pycocotools.precision) and compact.stats.tolist() == \
        pycocotools.stats.tolist()
    num_detections = sum(len(rows) for rows in compact.detections.values())
    assert evaluators["auto", False].nbytes == 36 * num_detections and evaluators["auto", False].detections == {}
    assert compact.nbytes == (36 + 48) * num_detections
    with pytest.raises(ValueError, match="keep_detections=True"):
        evaluators["auto", False].coco_results()
    from align_detr_hf.evaluation_analysis import analyse_errors

    with pytest.raises(ValueError, match="keep_detections=True"):
        analyse_errors(evaluators["auto", False])
    with pytest.raises(ValueError, match="compact"):
        StreamingCocoEvaluator(gt, backend="fast")
    if coco_backend._installed("faster_coco_eval"):
        faster = StreamingCocoEvaluator(gt, backend="faster_coco_eval")
        for batch in packed:
            faster.add_packed(batch)
        assert max(abs(faster.compute()[k] - reference[k]) for k in reference) <= 1e-15


def test_max_dets_follow_coco_summary(case):
    from align_detr_hf.evaluation import coco_summary

    gt, outputs, _ = case
    metrics_fn = CocoMetrics(gt, top_k=40, max_dets=(1, 10, 30))
    packed = [metrics_fn.preprocess_logits_for_metrics(p, labels) for p, labels in batches(gt, outputs)]
    metrics = metrics_fn(SimpleNamespace(predictions=packed, label_ids=None))
    results = metrics_fn.last_evaluator.coco_results()
    assert metrics == coco_summary(gt, results, max_dets=(1, 10, 30), backend="pycocotools")
    assert set(metrics) >= {"mar_1", "mar_10", "mar_30"}
