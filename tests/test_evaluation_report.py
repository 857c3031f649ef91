"""The evaluation pictures: a known confusion, known misses and false positives show up in the numbers and the PNGs."""

import json

import pytest
from PIL import Image

from align_detr_hf.data import load_coco_folder
from align_detr_hf.evaluation_analysis import analyse_errors, per_class_ap
from align_detr_hf.evaluation_report import check_report_folder, confusion_geometry, write_evaluation_report
from align_detr_hf.evaluation_streaming import StreamingCocoEvaluator
from align_detr_hf.file_io import OutputPathError
from align_detr_hf.synthetic import generate_shapes_dataset

pytest.importorskip("pycocotools")

CIRCLE, SQUARE, TRIANGLE = 0, 1, 2
BACKGROUND_BOX = [1.0, 1.0, 14.0, 14.0]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """12 shapes images and predictions that get them wrong on purpose: every triangle called a square, the first
    square of each image missed, one circle false positive on the background of each image (score 0.8, below every
    correct detection), everything else found with its exact box."""
    root = tmp_path_factory.mktemp("report")
    dataset = load_coco_folder(generate_shapes_dataset(root / "data", 12, 96, seed=3,
                                                       classes=("circle", "square", "triangle")))
    evaluator = StreamingCocoEvaluator(dataset.coco_ground_truth())
    expected = {"triangles": 0, "missed": 0, "missed_small": 0, "found": 0}
    for record in dataset.records:
        scores, labels, boxes, square_seen = [], [], [], False
        for i, ann in enumerate(record["annotations"]):
            x, y, w, h = ann["bbox"]
            if ann["category_id"] == SQUARE and not square_seen:
                square_seen = True
                expected["missed"] += 1
                expected["missed_small"] += ann["area"] < 32**2
                continue
            expected["triangles"] += ann["category_id"] == TRIANGLE
            expected["found"] += ann["category_id"] != TRIANGLE
            scores.append(0.95 - 0.01 * i)
            labels.append(SQUARE if ann["category_id"] == TRIANGLE else ann["category_id"])
            boxes.append([x, y, x + w, y + h])
        scores.append(0.8), labels.append(CIRCLE), boxes.append(BACKGROUND_BOX)
        evaluator.update([record["image_id"]], [{"scores": scores, "labels": labels, "boxes": boxes}])
    evaluator.compute()
    assert expected["triangles"] >= 3 and expected["missed"] >= 3  # the seed gives every kind of error
    return dataset, evaluator, expected, root


def test_error_analysis_finds_the_planted_errors(case):
    dataset, evaluator, expected, _ = case
    analysis = analyse_errors(evaluator, score_threshold=0.3)
    assert analysis["confusions"] == [{"ground_truth": "triangle", "predicted": "square",
                                       "count": expected["triangles"], "fraction": 1.0}]
    assert analysis["missed"]["total"] == expected["missed"]
    assert analysis["missed"]["small"] == expected["missed_small"]
    assert analysis["false_positives"] == {"background": len(dataset), "duplicate": 0}
    assert analysis["found"] == expected["found"]
    matrix = analysis["matrix"]
    assert matrix[TRIANGLE][SQUARE] == expected["triangles"] and matrix[TRIANGLE][TRIANGLE] == 0
    assert matrix[3][CIRCLE] == len(dataset)  # the background row
    assert sum(row[3] for row in matrix) == expected["missed"]  # the missed column
    # the worst image has the most errors, and each image's entry counts its own
    worst = analysis["images"][analysis["worst"][0]]
    assert worst["errors"] == max(entry["errors"] for entry in analysis["images"].values())
    assert worst["errors"] == worst["missed"] + worst["confused"] + worst["false_positives"]
    # above 0.85 the background detections (0.8) are gone
    assert analyse_errors(evaluator, score_threshold=0.85)["false_positives"]["background"] == 0


def test_per_class_ap_of_the_planted_errors(case):
    _, evaluator, _, _ = case
    rows = {row["name"]: row for row in per_class_ap(evaluator)}
    assert rows["circle"]["ap"] == pytest.approx(1.0)  # every circle found, the false positives score lower
    assert rows["triangle"]["ap"] == 0.0  # never predicted as a triangle
    assert 0.0 < rows["square"]["ap"] < 1.0  # the triangles called squares outrank some real squares
    assert rows["circle"]["ap_large"] is None  # no large circles in 96 px images


def _pixel(path, xy):
    return Image.open(path).convert("RGB").getpixel(xy)


def test_report_files_are_valid_pngs_with_the_content(case, tmp_path):
    dataset, evaluator, expected, _ = case
    written = write_evaluation_report(tmp_path / "out", evaluator, dataset, title="planted")
    assert sorted(written) == sorted(["per_class_ap.png", "pr_curves.png", "confusion.png", "worst_images.png",
                                      "report.md", "evaluation.json"])
    for name in ("per_class_ap.png", "pr_curves.png", "confusion.png", "worst_images.png"):
        with Image.open(written[name]) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    assert Image.open(written["pr_curves.png"]).size == (3 * 260, 56 + 220)  # one panel per class, one row
    # the confusion cell triangle -> square is full red (all triangles), circle -> circle green, triangle ->
    # triangle white
    analysis = analyse_errors(evaluator)
    left, top, cell = confusion_geometry(analysis)

    def centre(row, col):
        return left + col * cell + cell // 4, top + row * cell + cell // 4  # off the centred count

    red, green, white = (_pixel(written["confusion.png"], centre(r, c)) for r, c in
                         ((TRIANGLE, SQUARE), (CIRCLE, CIRCLE), (TRIANGLE, TRIANGLE)))
    assert red[0] > 180 and red[1] < 80 and red[2] < 80
    assert green[1] > 140 and green[0] < 100
    assert white == (255, 255, 255)
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"triangle -> square: {expected['triangles']} (100% of the triangle boxes)" in report
    assert "![Worst images (ground truth | detections)](worst_images.png)" in report
    summary = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert summary["metrics"] == evaluator.metrics
    assert summary["num_images"] == summary["num_images_with_detections"] == len(dataset)
    assert summary["errors"]["worst"] == analysis["worst"][:8]


def test_report_without_detections_or_images(case, tmp_path):
    dataset, evaluator, _, _ = case
    empty = StreamingCocoEvaluator(evaluator.coco_gt)
    written = write_evaluation_report(tmp_path / "out", empty)  # no dataset: no worst images
    assert "worst_images.png" not in written
    rows = json.loads(written["evaluation.json"].read_text())["per_class"]
    assert {row["ap"] for row in rows} == {0.0}
    assert json.loads(written["evaluation.json"].read_text())["errors"]["missed"]["total"] > 0


def test_report_folder_must_be_new_or_empty(case, tmp_path):
    dataset, evaluator, _, root = case
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="is not empty; choose a new or empty folder, or pass --overwrite"):
        write_evaluation_report(out, evaluator, dataset)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    write_evaluation_report(out, evaluator, dataset, overwrite=True)  # ours replaced, theirs kept
    assert (out / "notes.txt").read_text() == "mine" and (out / "confusion.png").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        check_report_folder(tmp_path / "file")
    with pytest.raises(OutputPathError, match="holds the input"):
        check_report_folder(root, inputs=(root / "data",))
    with pytest.raises(OutputPathError, match="is inside the input folder"):
        check_report_folder(root / "data" / "evaluation", inputs=(root / "data",))


def test_model_card_links_the_pictures(case, tmp_path):
    from align_detr_hf.hub import write_model_card

    dataset, evaluator, _, _ = case
    write_model_card(tmp_path / "plain")
    assert "What the model gets wrong" not in (tmp_path / "plain" / "README.md").read_text()
    write_evaluation_report(tmp_path / "final" / "evaluation", evaluator, dataset)
    card = write_model_card(tmp_path / "final", metrics=evaluator.metrics)
    text = (tmp_path / "final" / "README.md").read_text()
    assert text == str(card)
    assert "## What the model gets wrong" in text and "(evaluation/report.md)" in text
    for name in ("per_class_ap.png", "pr_curves.png", "confusion.png", "worst_images.png"):
        assert f"](evaluation/{name})" in text
