"""COCO mAP: perfect predictions, a shifted case checked against pycocotools directly, Trainer compute_metrics."""

import contextlib
import copy
import io
from types import SimpleNamespace

import pytest
import torch

from align_detr_hf.evaluation import CocoEvaluator, build_compute_metrics, evaluate_model

pytest.importorskip("pycocotools")

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 60, "height": 60}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 40, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 50, 50], "area": 2500, "iscrowd": 0},
    ],
    "categories": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}],
}


def _xyxy(bbox, dx=0.0):
    x, y, w, h = bbox
    return [x + dx, y, x + w + dx, y + h]


def _detections(dx_per_annotation, scores=None):
    per_image = {1: [], 2: []}
    for i, ann in enumerate(GT["annotations"]):
        score = 0.9 - 0.1 * i if scores is None else scores[i]
        per_image[ann["image_id"]].append((score, ann["category_id"], _xyxy(ann["bbox"], dx_per_annotation[i])))
    ids, dets = [], []
    for image_id, items in per_image.items():
        ids.append(image_id)
        dets.append({"scores": torch.tensor([s for s, _, _ in items]), "labels": torch.tensor([c for _, c, _ in items]),
                     "boxes": torch.tensor([b for _, _, b in items])})
    return ids, dets


def test_perfect_predictions_give_ap_one():
    evaluator = CocoEvaluator(GT)
    evaluator.update(*_detections([0, 0, 0]))
    metrics = evaluator.compute()
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert metrics[key] == pytest.approx(1.0)
    assert metrics["map_small"] == pytest.approx(1.0)  # areas 600 (< 32^2) ...
    assert metrics["map_medium"] == pytest.approx(1.0)  # ... 1200 and 2500
    assert metrics["map_large"] == -1.0  # no large ground truth


def test_shifted_predictions_match_pycocotools():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    shifts = [6.0, 0.0, 12.0]  # IoUs 0.667, 1.0, 0.613
    scores = [0.9, 0.5, 0.7]
    evaluator = CocoEvaluator(GT)
    evaluator.update(*_detections(shifts, scores))
    metrics = evaluator.compute()

    # independent computation with pycocotools, from the raw COCO json
    coco = COCO()
    coco.dataset = copy.deepcopy(GT)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        results = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "score": s,
             "bbox": [a["bbox"][0] + dx, a["bbox"][1], a["bbox"][2], a["bbox"][3]]}
            for a, dx, s in zip(GT["annotations"], shifts, scores)
        ]
        cocoeval = COCOeval(coco, coco.loadRes(results), "bbox")
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
    expected = cocoeval.stats
    assert metrics["map"] == pytest.approx(expected[0])
    assert metrics["map_50"] == pytest.approx(expected[1])
    assert metrics["map_75"] == pytest.approx(expected[2])
    assert metrics["mar_100"] == pytest.approx(expected[8])
    assert metrics["map_50"] == pytest.approx(1.0) and 0.0 < metrics["map"] < 1.0


def _model_outputs_for(labels_per_image, num_queries=5, num_classes=2):
    """Logits/boxes whose best queries reproduce the ground truth exactly (normalised cxcywh)."""
    logits = torch.full((len(labels_per_image), num_queries, num_classes), -8.0)
    boxes = torch.rand(len(labels_per_image), num_queries, 4) * 0.2 + 0.4
    for b, (anns, (h, w)) in enumerate(labels_per_image):
        for q, ann in enumerate(anns):
            x, y, bw, bh = ann["bbox"]
            boxes[b, q] = torch.tensor([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h])
            logits[b, q, ann["category_id"]] = 5.0
    return logits, boxes


def _per_image():
    return [
        ([a for a in GT["annotations"] if a["image_id"] == img["id"]], (img["height"], img["width"]))
        for img in GT["images"]
    ]


def test_compute_metrics_for_trainer_predictions():
    logits, boxes = _model_outputs_for(_per_image())
    labels = [{"image_id": torch.tensor([img["id"]]), "orig_size": torch.tensor([img["height"], img["width"]])}
              for img in GT["images"]]
    # Trainer with eval_do_concat_batches=False: one entry per batch; (loss_dict, logits, pred_boxes) per batch
    eval_pred = SimpleNamespace(
        predictions=[({"loss_cls": 1.0}, logits[:1].numpy(), boxes[:1].numpy()), (logits[1:].numpy(), boxes[1:].numpy())],
        label_ids=[[{k: v.numpy() for k, v in labels[0].items()}], [labels[1]]],
    )
    metrics = build_compute_metrics(GT)(eval_pred)
    assert metrics["map"] == pytest.approx(1.0, abs=1e-4)


def test_evaluate_model_from_any_loop():
    logits, boxes = _model_outputs_for(_per_image())

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, pixel_values, pixel_mask):
            return SimpleNamespace(logits=logits, pred_boxes=boxes)

    batch = {
        "pixel_values": torch.zeros(2, 3, 8, 8),
        "pixel_mask": torch.ones(2, 8, 8, dtype=torch.long),
        "labels": [{"image_id": torch.tensor([img["id"]]), "orig_size": torch.tensor([img["height"], img["width"]])}
                   for img in GT["images"]],
    }
    metrics = evaluate_model(Stub(), [batch], GT)
    assert metrics["map"] == pytest.approx(1.0, abs=1e-4)
