"""The image-by-image compact COCO evaluation gives pycocotools' (and faster-coco-eval's) numbers exactly."""

import contextlib
import io

import numpy as np
import pytest

from align_detr_hf.coco_compact import AREA_LABELS, AREA_RANGES, IOU_THRESHOLDS, RECALL_THRESHOLDS, CompactCocoEval
from align_detr_hf.evaluation import _coco_from_dict

pytest.importorskip("pycocotools")

NUM_CLASSES = 5  # class 4 has no ground truth; detections of it are still made


def hard_case(num_images=80, seed=0, max_per_image=260):
    """Crowds, score ties, identical boxes (IoU ties), empty images, images without ground truth but with detections
    (and the reverse), a class without ground truth, annotation areas that differ from w x h, all three sizes, more
    detections than 100 per image and class for some images, an annotation id 0."""
    rng = np.random.default_rng(seed)
    images, annotations, detections, twins = [], [], {}, []
    for n in range(num_images):
        image_id = int(rng.integers(1, 10**6)) if n else 0  # not in order, one id 0
        while any(i["id"] == image_id for i in images):
            image_id += 1
        images.append({"id": image_id, "width": 640, "height": 480})
        kind = n % 8
        boxes = []
        for _ in range(0 if kind in (0, 1) else int(rng.integers(1, 12))):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), 2))
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            crowd = int(rng.random() < 0.08)
            area = w * h * (rng.uniform(0.5, 1.0) if rng.random() < 0.3 else 1.0)
            if rng.random() < 0.1:
                w, h = float(round(w)), float(round(h))  # integer-valued boxes
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h], "area": area,
                                "category_id": int(rng.integers(0, NUM_CLASSES - 1)), "iscrowd": crowd})
            boxes.append((x, y, w, h, annotations[-1]["category_id"], not twins))  # the first twins: found exactly
            if rng.random() < 0.1 or not twins:  # an identical box of the same class: IoU ties between boxes
                twins.append(annotations[-1])
                annotations.append({**annotations[-1], "id": len(annotations) + 1, "iscrowd": 0})
        rows = []
        if kind != 0:  # images of kind 0 have neither ground truth nor detections; kind 1 only detections
            for x, y, w, h, label, exact in boxes:
                for _ in range(int(rng.integers(0, 3))):
                    jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
                    x0, y0 = x + jitter[0], y + jitter[1]
                    rows.append([x0, y0, x0 + w + jitter[2], y0 + h + jitter[3],
                                 label if rng.random() < 0.85 else int(rng.integers(0, NUM_CLASSES))])
                if rng.random() < 0.1 or exact:
                    rows.append([x, y, x + w, y + h, label])  # exactly the box
                    rows.append([x, y, x + w, y + h, label])  # twice: ties in IoU and score
            many = int(rng.integers(0, max_per_image)) if n % 5 == 0 else int(rng.integers(0, 20))
            for _ in range(many):
                w, h = np.exp(rng.uniform(np.log(2), np.log(300), 2))
                x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
                rows.append([x, y, x + w, y + h, int(rng.integers(0, 2)) if n % 5 == 0 else int(rng.integers(0, 5))])
        rows = np.array(rows, dtype=np.float64).reshape(-1, 5)
        scores = rng.uniform(0, 1, len(rows))
        ties = rng.random(len(rows)) < 0.5
        scores[ties] = np.round(scores[ties], 1)  # 11 values: many ties in score
        detections[image_id] = (rows[:, :4], scores, rows[:, 4])
    twins[0].update(id=0, iscrowd=0)  # a match to it counts as none: the tie between it and its twin decides
    categories = [{"id": c, "name": f"c{c}"} for c in range(NUM_CLASSES)]
    return {"images": images, "annotations": annotations, "categories": categories}, detections


def results_of(detections):
    return [{"image_id": image_id, "category_id": int(label), "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            for image_id, (boxes, scores, labels) in detections.items()
            for (x0, y0, x1, y1), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist())]


def reference(coco_gt, detections, max_dets, cocoeval_class):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = cocoeval_class(coco_gt, coco_gt.loadRes(results_of(detections)), iouType="bbox")
        coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def compact(coco_gt, detections, max_dets, order=None):
    evaluation = CompactCocoEval(coco_gt, max_dets)
    for image_id in order or detections:
        evaluation.add_image(image_id, *detections[image_id])
    evaluation.summarize()
    return evaluation


def test_parameters_are_pycocotools():
    from pycocotools.cocoeval import Params

    p = Params(iouType="bbox")
    assert np.array_equal(p.iouThrs, IOU_THRESHOLDS) and np.array_equal(p.recThrs, RECALL_THRESHOLDS)
    assert np.array_equal(np.asarray(p.areaRng, dtype=np.float64), AREA_RANGES) and tuple(p.areaRngLbl) == AREA_LABELS


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 100, 1000), (1, 5, 20)])
def test_equals_pycocotools_to_the_last_bit(max_dets):
    from pycocotools.cocoeval import COCOeval

    gt, detections = hard_case()
    coco_gt = _coco_from_dict(gt)
    expected = reference(coco_gt, detections, max_dets, COCOeval)
    order = list(detections)[::-1]  # the images arrive in any order
    ours = compact(coco_gt, detections, max_dets, order)
    assert np.array_equal(ours.precision, expected.eval["precision"])
    assert np.array_equal(ours.recall, expected.eval["recall"])
    assert ours.stats.tolist() == expected.stats.tolist()  # all 12, bit for bit
    assert 0.1 < ours.stats[1] < 0.9 and (ours.stats == -1).sum() < 6  # a non-trivial score


@pytest.mark.parametrize("max_dets", [(1, 10, 100), (1, 100, 1000)])
def test_equals_faster_coco_eval(max_dets):
    """faster-coco-eval rounds a precision value's last bit differently at times (<= 2.2e-16), and takes its first
    AP at max_dets[-1] where pycocotools takes it at 100 (coco_summary does the same as faster-coco-eval)."""
    faster = pytest.importorskip("faster_coco_eval")
    gt, detections = hard_case()
    coco_gt = _coco_from_dict(gt)
    expected = reference(coco_gt, detections, max_dets, faster.COCOeval_faster)
    ours = compact(coco_gt, detections, max_dets)
    assert np.abs(ours.precision - expected.eval["precision"]).max() <= 2.3e-16
    assert np.array_equal(ours.recall, expected.eval["recall"])
    assert np.abs(ours.stats[1:] - expected.stats[1:12]).max() <= 1e-15
    last = ours.precision[:, :, :, 0, -1]
    assert abs(last[last > -1].mean() - expected.stats[0]) <= 1e-15


def test_no_detections_and_bytes_per_detection():
    from pycocotools.cocoeval import COCOeval

    gt, detections = hard_case(num_images=16)
    coco_gt = _coco_from_dict(gt)
    ours = compact(coco_gt, {i: (np.zeros((0, 4)), np.zeros(0), np.zeros(0)) for i in detections}, (1, 10, 100))
    # every class with ground truth: precision 0 and recall 0; the class without: -1
    assert set(np.unique(ours.precision[:, :, :4, 0])) == {0.0} and (ours.precision[:, :, 4] == -1).all()
    assert ours.stats[0] == 0.0 and ours.nbytes == 0
    ours = compact(coco_gt, detections, (1, 10, 100))
    kept = sum(min(100, int((labels == c).sum())) for _, _, labels in detections.values() for c in range(NUM_CLASSES))
    assert ours.nbytes == 36 * kept  # 36 bytes a detection, nothing else grows with the images
    assert ours.stats.tolist() == reference(coco_gt, detections, (1, 10, 100), COCOeval).stats.tolist()


def test_summary_text_is_pycocotools():
    from pycocotools.cocoeval import COCOeval

    gt, detections = hard_case(num_images=24)
    coco_gt = _coco_from_dict(gt)
    expected = reference(coco_gt, detections, (1, 100, 1000), COCOeval)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        expected.summarize()
    assert compact(coco_gt, detections, (1, 100, 1000)).summary_text() == printed.getvalue().rstrip("\n")
