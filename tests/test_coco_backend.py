"""The COCO backend: chosen automatically, and faster-coco-eval gives pycocotools' numbers."""

import contextlib
import copy
import io

import numpy as np
import pytest

from align_detr_hf import coco_backend
from align_detr_hf.coco_backend import resolve_backend, run_cocoeval
from align_detr_hf.evaluation import _coco_from_dict, coco_summary

pytest.importorskip("pycocotools")


def generated_set(num_images, num_classes=6, seed=0):
    """COCO ground truth and results with what trips evaluators up: crowd boxes, tied scores, images without
    ground truth or without detections, a class without ground truth, all three area ranges, duplicates."""
    rng = np.random.default_rng(seed)
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(100, 700)), int(rng.integers(100, 700))
        images.append({"id": image_id, "width": width, "height": height})
        for _ in range(int(rng.integers(0, 8))):
            w, h = rng.uniform(3, width * 0.6), rng.uniform(3, height * 0.6)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = int(rng.integers(0, num_classes - 1))  # the last class has no ground truth
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections per object, jittered, sometimes misclassified
                label = category if rng.random() < 0.85 else int(rng.integers(0, num_classes))
                results.append({"image_id": image_id, "category_id": label, "score": round(float(rng.random()), 2),
                                "bbox": [x + rng.normal(0, w / 10), y + rng.normal(0, h / 10),
                                         w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]})
        if rng.random() < 0.9:  # background detections (scores rounded to 2 digits: many ties)
            for _ in range(int(rng.integers(0, 10))):
                results.append({"image_id": image_id, "category_id": int(rng.integers(0, num_classes)),
                                "score": round(float(rng.random()) * 0.6, 2),
                                "bbox": [rng.uniform(0, width - 20), rng.uniform(0, height - 20),
                                         rng.uniform(2, 150), rng.uniform(2, 150)]})
    categories = [{"id": c, "name": f"class{c}"} for c in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def both_backends(gt, results):
    coco_gt = _coco_from_dict(gt)
    return [run_cocoeval(coco_gt, copy.deepcopy(results), backend=name) for name in ("pycocotools",
                                                                                     "faster_coco_eval")]


@pytest.mark.parametrize("num_images,seed", [(5, 1), (60, 2), (400, 3)])
def test_faster_coco_eval_gives_pycocotools_numbers(num_images, seed):
    pytest.importorskip("faster_coco_eval")
    reference, fast = both_backends(*generated_set(num_images, seed=seed))
    assert 0.05 < reference.stats[0] < 0.95
    # the C++ precision may round the last bit of a value differently (measured: at most 2.2e-16 per value, so
    # 1-2 float64 steps in a mean): the same numbers to 15 digits, not always bit for bit
    np.testing.assert_allclose(np.asarray(fast.stats[:12]), reference.stats[:12], rtol=0, atol=1e-15)
    np.testing.assert_allclose(fast.eval["precision"], reference.eval["precision"], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(fast.eval["recall"], reference.eval["recall"])
    assert (reference.eval["precision"][:, :, -1] == -1).all()  # the class without ground truth, in both
    assert (fast.eval["precision"][:, :, -1] == -1).all()


def test_our_evaluation_tests_give_the_same_numbers_with_both():
    """The cases of test_evaluation.py (shifted boxes, perfect predictions) through coco_summary."""
    pytest.importorskip("faster_coco_eval")
    from test_evaluation import GT, _detections
    from align_detr_hf.evaluation import CocoEvaluator

    for shifts, scores in (([0, 0, 0], None), ([6.0, 0.0, 12.0], [0.9, 0.5, 0.7])):
        evaluator = CocoEvaluator(GT)
        evaluator.update(*_detections(shifts, scores))
        summaries = [coco_summary(GT, copy.deepcopy(evaluator.results), backend=name)
                     for name in ("pycocotools", "faster_coco_eval")]
        assert summaries[0] == pytest.approx(summaries[1], rel=0, abs=1e-15)


def test_auto_prefers_faster_coco_eval_and_falls_back(monkeypatch):
    pytest.importorskip("faster_coco_eval")
    assert resolve_backend("auto") == resolve_backend(None) == "faster_coco_eval"
    assert resolve_backend("pycocotools") == "pycocotools"
    real_find_spec = coco_backend.importlib.util.find_spec
    monkeypatch.setattr(coco_backend.importlib.util, "find_spec",
                        lambda name: None if name == "faster_coco_eval" else real_find_spec(name))
    assert resolve_backend("auto") == "pycocotools"
    with pytest.raises(ValueError, match="'faster_coco_eval' is not installed.*fast-eval"):
        resolve_backend("faster_coco_eval")


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(ValueError, match="COCO backend must be 'auto' or one of"):
        resolve_backend("detectron")


def test_no_detections_is_zero_not_an_error():
    gt, _ = generated_set(3)
    assert run_cocoeval(_coco_from_dict(gt), []) is None
    assert coco_summary(gt, [])["map"] == 0.0


def test_verbose_prints_the_summary_with_either_backend():
    gt, results = generated_set(10)
    for name in coco_backend.available_backends():
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            coco_summary(gt, copy.deepcopy(results), verbose=True, backend=name)
        assert "Average Precision" in out.getvalue(), name
