"""`align-detr evaluate MODEL DATA` on a tiny model: synthetic, COCO-folder and save_to_disk data; refusals."""

import json

import pytest
import torch
from PIL import Image

from align_detr_hf.cli import main
from align_detr_hf.evaluate_command import class_columns
from align_detr_hf.synthetic import generate_shapes_dataset

pytest.importorskip("pycocotools")

PICTURES = ("per_class_ap.png", "pr_curves.png", "confusion.png", "worst_images.png")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import tiny_config

    from align_detr_hf import AlignDetrForObjectDetection
    from align_detr_hf.recipes import eval_image_processor

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(folder)  # circle, square, triangle
    eval_image_processor(64 / 800).save_pretrained(folder)  # 64 px images stay 64 px
    return folder


def _evaluate(model_dir, data, out, *extra):
    main(["evaluate", str(model_dir), str(data), "--output_dir", str(out), "--device", "cpu", "--batch-size", "3",
          *extra])
    return json.loads((out / "evaluation.json").read_text())


def _check_report(out, num_images):
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["num_images"] == summary["num_images_with_detections"] == num_images
    assert set(summary["metrics"]) >= {"map", "map_50", "mar_100"}
    for name in PICTURES:
        with Image.open(out / name) as image:
            image.verify()
        assert f"]({name})" in (out / "report.md").read_text()
    return summary


def test_synthetic_data_writes_the_report(model_dir, tmp_path, capsys):
    summary = _evaluate(model_dir, "synthetic", tmp_path / "out", "--synthetic-images", "5",
                        "--synthetic-image-size", "64")
    _check_report(tmp_path / "out", 5)
    assert [row["name"] for row in summary["per_class"]] == ["circle", "square", "triangle"]
    assert "COCO bbox mAP" in capsys.readouterr().out


def test_coco_folder_json_and_saved_dataset_give_the_same_numbers(model_dir, tmp_path):
    annotation = generate_shapes_dataset(tmp_path / "coco", 4, 64, seed=5, classes=("circle", "square", "triangle"))
    from_folder = _evaluate(model_dir, tmp_path / "coco", tmp_path / "a")
    from_json = _evaluate(model_dir, annotation, tmp_path / "b")
    _check_report(tmp_path / "a", 4)
    assert from_folder["metrics"] == from_json["metrics"]

    import datasets

    coco = json.loads(annotation.read_text())
    rows = {"image": [], "image_id": [], "objects": []}
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        rows["image"].append(Image.open(tmp_path / "coco" / "images" / image["file_name"]).convert("RGB"))
        rows["image_id"].append(image["id"])
        rows["objects"].append({"bbox": [a["bbox"] for a in anns], "category": [a["category_id"] - 1 for a in anns]})
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("int64"),
        "objects": {"bbox": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
                    "category": datasets.Sequence(datasets.ClassLabel(names=["circle", "square", "triangle"]))},
    })
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "hf"))
    from_disk = _evaluate(model_dir, tmp_path / "hf", tmp_path / "c")
    # the same images and boxes (float32 in the dataset: equal here, the boxes are whole pixels)
    assert from_disk["metrics"] == from_folder["metrics"]


def test_classes_are_matched_by_name():
    model = {0: "circle", 1: "square", 2: "triangle"}
    assert class_columns(model, {0: "circle", 1: "square", 2: "triangle"}) is None
    assert class_columns(model, {0: "triangle", 1: "circle"}) == [2, 0]
    with pytest.raises(ValueError, match="the data's classes cross are not classes of the model"):
        class_columns(model, {0: "circle", 1: "cross"})


@pytest.mark.parametrize("case", ["missing-data", "non-empty-output", "inside-model", "foreign-classes",
                                  "bad-threshold", "bad-split"])
def test_refusals_are_one_line(model_dir, tmp_path, capsys, case):
    out, data, extra = tmp_path / "out", "synthetic", []
    if case == "missing-data":
        data = tmp_path / "nowhere"
    elif case == "non-empty-output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif case == "inside-model":
        out = model_dir / "evaluation"
    elif case == "foreign-classes":
        data = generate_shapes_dataset(tmp_path / "coco", 2, 64, seed=1, classes=("circle", "cross")).parent
    elif case == "bad-threshold":
        extra = ["--threshold", "1.5"]
    elif case == "bad-split":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"objects": [{"bbox": [], "category": []}]})}
                             ).save_to_disk(str(tmp_path / "hf"))
        data, extra = tmp_path / "hf", ["--split", "validation"]
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(model_dir), str(data), "--output_dir", str(out), "--synthetic-images", "2",
              "--synthetic-image-size", "64", *extra])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]  # (after transformers' weight-loading bar, when the model was loaded)
    assert error.startswith("align-detr evaluate: error: ") and "Traceback" not in stderr
    expected = {"missing-data": "no such file or folder", "non-empty-output": "is not empty",
                "inside-model": "is inside the input folder", "foreign-classes": "cross are not classes of the model",
                "bad-threshold": "--threshold must be between 0 and 1", "bad-split": "no split 'validation'"}[case]
    assert expected in error
    if case == "non-empty-output":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not (model_dir / "evaluation").exists()


def test_same_detections_as_the_demo_evaluation(model_dir, tmp_path):
    """The command's path (the saved image processor) gives the detections of the training scripts' evaluation (the
    dataset's eval transforms, `collate_fn`) on the demo's validation images: every top-100 box, score and label."""
    import numpy as np

    from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor
    from align_detr_hf.data import build_eval_transforms, collate_fn, load_coco_folder
    from align_detr_hf.evaluate_command import evaluate_detector
    from align_detr_hf.evaluation_streaming import StreamingCocoEvaluator, evaluate_loader

    model = AlignDetrForObjectDetection.from_pretrained(model_dir)
    annotation = generate_shapes_dataset(tmp_path / "val", 6, 64, seed=10_000, classes=("circle", "square",
                                                                                     "triangle"))
    val_set = load_coco_folder(annotation, transforms=build_eval_transforms(scale=64 / 800))
    loader = torch.utils.data.DataLoader(val_set, batch_size=4, collate_fn=collate_fn)
    expected = evaluate_loader(model, loader, StreamingCocoEvaluator(val_set.coco_ground_truth()))
    result = evaluate_detector(model, AlignDetrImageProcessor.from_pretrained(model_dir), load_coco_folder(annotation),
                               tmp_path / "out", batch_size=3)
    assert result["metrics"] == expected.metrics
    assert result["evaluator"].detections.keys() == expected.detections.keys()
    # other batch compositions round the same sums differently (conftest's float32 noise): a few float32 steps of
    # the values' scale (64 px boxes, scores <= 1); the order and the labels are the same
    eps = float(np.finfo(np.float32).eps)
    for image_id, rows in expected.detections.items():
        ours = result["evaluator"].detections[image_id]
        assert rows.shape == ours.shape == (36, 6)  # 12 queries x 3 classes
        np.testing.assert_allclose(ours[:, :4], rows[:, :4], rtol=0, atol=64 * eps * 64)
        np.testing.assert_allclose(ours[:, 4], rows[:, 4], rtol=0, atol=64 * eps)
        np.testing.assert_array_equal(ours[:, 5], rows[:, 5])
