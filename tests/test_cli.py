"""The `align-detr` console command: `predict` (JSON + drawings), its errors, `demo` forwarding, and the drawing."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor
from align_detr_hf.cli import main
from align_detr_hf.visualize import PALETTE, class_colour, draw_detections, example_image_path

SIZE = {"shortest_edge": 128, "longest_edge": 224}  # small processing size: fast on CPU
EXAMPLE = example_image_path()


def save_tiny(path, known: bool):
    """A random tiny model, or (known=True) one whose every query predicts "square" (score sigmoid(2)) and
    "triangle" (sigmoid(-1)) on the top-right quadrant box [W/2, 0, W, H/2] (see tests/test_pipeline.py)."""
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    if known:
        with torch.no_grad():
            model.class_embed[-1].weight.zero_()
            model.class_embed[-1].bias.copy_(torch.tensor([-5.0, 2.0, -1.0]))
            box_layer = model.model.decoder.bbox_embed[-1].layers[-1]
            box_layer.weight.zero_()
            box_layer.bias.copy_(torch.tensor([50.0, -50.0, 50.0, 50.0]))
    model.save_pretrained(path)
    AlignDetrImageProcessor(size=SIZE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("random_tiny"), known=False)


@pytest.fixture(scope="module")
def known_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("known_tiny"), known=True)


def expected_detections(model_dir, image_path, threshold, top_k):
    processor = AlignDetrImageProcessor.from_pretrained(model_dir)
    model = AlignDetrForObjectDetection.from_pretrained(model_dir).eval()
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    result = processor.post_process_object_detection(
        outputs, threshold=threshold, target_sizes=[(image.height, image.width)], top_k=top_k
    )[0]
    return [
        (model.config.id2label[label.item()], score.item(), box.tolist())
        for score, label, box in zip(result["scores"], result["labels"], result["boxes"])
    ]


def check_report(report, model_dir, threshold, top_k):
    assert report["threshold"] == threshold and report["top_k"] == top_k
    (entry,) = report["images"]
    assert Path(entry["file"]) == EXAMPLE
    assert (entry["width"], entry["height"]) == (640, 480)
    expected = expected_detections(model_dir, EXAMPLE, threshold, top_k)
    assert len(entry["detections"]) == len(expected) > 0
    for det, (label, score, box) in zip(entry["detections"], expected):
        assert set(det) == {"label", "score", "box"}
        assert det["label"] == label
        assert det["score"] == pytest.approx(score, abs=1e-5)
        assert det["box"] == pytest.approx(box, abs=0.01)
        x0, y0, x1, y1 = det["box"]
        assert 0 <= x0 <= x1 <= 640 and 0 <= y0 <= y1 <= 480
    return entry


# ------------------------------------------------------------------------------------------------------ predict


def test_predict_in_process_json_matches_model(random_dir, tmp_path, capsys):
    out = tmp_path / "out"
    main(["predict", str(EXAMPLE), "--model", str(random_dir), "--threshold", "0.0", "--top-k", "7",
          "--output", str(out), "--device", "cpu"])  # fmt: skip
    report = json.loads((out / "detections.json").read_text())
    entry = check_report(report, random_dir, 0.0, 7)
    assert len(entry["detections"]) == 7
    png = out / "shapes_detections.png"
    assert Path(entry["drawing"]) == png and png.is_file()
    with Image.open(png) as drawn, Image.open(EXAMPLE) as original:
        assert drawn.size == original.size
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(original.convert("RGB")))
    assert "7 detection(s)" in capsys.readouterr().out


def test_predict_known_model_draws_the_box(known_dir, tmp_path):
    out = tmp_path / "known"
    main(["predict", str(EXAMPLE), "--model", str(known_dir), "--threshold", "0.5", "--output", str(out)])
    (entry,) = json.loads((out / "detections.json").read_text())["images"]
    assert len(entry["detections"]) == 12  # 12 queries, only "square" scores above 0.5
    assert {d["label"] for d in entry["detections"]} == {"square"}
    assert all(d["box"] == [320.0, 0.0, 640.0, 240.0] for d in entry["detections"])

    drawn = np.asarray(Image.open(out / "shapes_detections.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(EXAMPLE).convert("RGB")).astype(int)
    square = class_colour(1)  # colour of class id 1 ("square")
    assert tuple(drawn[120, 321]) == square  # left edge of the box, half way down
    assert tuple(drawn[239, 480]) == square  # bottom edge
    changed = np.abs(drawn - original).sum(-1) > 0
    assert changed[:, 310:].any() and changed[:250].any()
    assert not changed[260:, :300].any()  # far from the box and its tag: untouched
    assert not changed[40:200, 330:630].all()  # the box is an outline, not filled


def test_predict_installed_executable(random_dir, tmp_path):
    exe = Path(sys.executable).with_name("align-detr")
    if not exe.exists():
        pytest.skip("align-detr console script not installed next to this python")
    out = tmp_path / "sub"
    proc = subprocess.run(
        [str(exe), "predict", str(EXAMPLE), "--model", str(random_dir), "--threshold", "0.0", "--top-k", "5",
         "--output", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    check_report(json.loads((out / "detections.json").read_text()), random_dir, 0.0, 5)
    assert (out / "shapes_detections.png").is_file()


def test_predict_two_images_same_name_and_no_draw(random_dir, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    small = Image.open(EXAMPLE).convert("RGB").resize((200, 150))
    small.save(tmp_path / "a" / "img.jpg")
    small.save(tmp_path / "b" / "img.jpg")
    out = tmp_path / "out"
    main(["predict", str(tmp_path / "a" / "img.jpg"), str(tmp_path / "b" / "img.jpg"), "--model", str(random_dir),
          "--threshold", "0", "--top-k", "3", "--output", str(out)])  # fmt: skip
    report = json.loads((out / "detections.json").read_text())
    assert [(e["width"], e["height"], len(e["detections"])) for e in report["images"]] == [(200, 150, 3)] * 2
    assert sorted(p.name for p in out.glob("*.png")) == ["img_2_detections.png", "img_detections.png"]

    out2 = tmp_path / "nodraw"
    main(["predict", str(tmp_path / "a" / "img.jpg"), "--model", str(random_dir), "--output", str(out2), "--no-draw"])
    assert not list(out2.glob("*.png")) and (out2 / "detections.json").is_file()


# ------------------------------------------------------------------------------------------------------- errors


def run_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_error_missing_image(random_dir, tmp_path, capsys):
    err = run_error(["predict", str(tmp_path / "nope.png"), "--model", str(random_dir)], capsys)
    assert "image not found" in err and "nope.png" in err


def test_error_unreadable_image(random_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    err = run_error(["predict", str(bad), "--model", str(random_dir), "--output", str(tmp_path / "o")], capsys)
    assert "cannot read image" in err and "bad.png" in err


def test_error_model_folder_not_found(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    err = run_error(["predict", str(EXAMPLE), "--model", str(missing)], capsys)
    assert "model folder not found" in err and str(missing) in err


def test_error_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = run_error(["predict", str(EXAMPLE), "--model", str(tmp_path / "empty")], capsys)
    assert "no config.json" in err
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(tiny_config().to_json_string())
    err = run_error(["predict", str(EXAMPLE), "--model", str(tmp_path / "no_weights")], capsys)
    assert "could not load the model in folder" in err and "model.safetensors" in err


def test_error_hub_id_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    err = run_error(["predict", str(EXAMPLE), "--model", "align-detr-tests/not-a-real-model"], capsys)
    assert "could not load model 'align-detr-tests/not-a-real-model'" in err
    assert "HF_HUB_OFFLINE" in err and str(tmp_path / "align-detr-tests" / "not-a-real-model") in err


def test_error_bad_options(random_dir, capsys):
    err = run_error(["predict", str(EXAMPLE), "--model", str(random_dir), "--threshold", "1.5"], capsys)
    assert "--threshold" in err
    if not torch.cuda.is_available():
        err = run_error(["predict", str(EXAMPLE), "--model", str(random_dir), "--device", "cuda"], capsys)
        assert "CUDA is not available" in err
    err = run_error(["predict", str(EXAMPLE), "--model", str(random_dir), "--device", "potato"], capsys)
    assert "not a valid torch device" in err


# --------------------------------------------------------------------------------------------- convert and demo


def test_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "convert" in out and "predict" in out and "demo" in out


def test_demo_forwards_all_arguments(monkeypatch):
    calls = []
    fake = types.ModuleType("align_detr_hf.demo")
    fake.main = lambda argv=None: calls.append(argv)
    monkeypatch.setitem(sys.modules, "align_detr_hf.demo", fake)
    main(["demo", "--help", "--share", "x"])
    assert calls == [["--help", "--share", "x"]]
    fake.main = lambda argv=None: 3
    with pytest.raises(SystemExit) as exc:
        main(["demo"])
    assert exc.value.code == 3


def test_real_demo_help_is_reached(capsys):
    import importlib.util

    if importlib.util.find_spec("align_detr_hf.demo") is None:
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--help"])
        assert "no align_detr_hf.demo module" in str(exc.value.code)
        return
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    if exc.value.code not in (0, None):
        pytest.skip(f"demo --help did not exit cleanly here: {exc.value.code}")
    assert "usage" in capsys.readouterr().out.lower()


# ----------------------------------------------------------------------------------------------------- drawing


def test_draw_detections_colours_and_copy():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    dets = [
        {"label": "cat", "score": 0.9, "box": [10, 30, 90, 90]},
        {"label": "dog", "score": 0.5, "box": [110, 0, 190, 60]},  # tag cannot go above: drawn inside
    ]
    drawn = draw_detections(image, dets, label2id={"cat": 0, "dog": 1})
    assert drawn is not image and image.getpixel((10, 60)) == (255, 255, 255)  # input untouched
    assert drawn.size == image.size
    assert drawn.getpixel((10, 60)) == PALETTE[0]  # left edge of the cat box
    assert drawn.getpixel((189, 40)) == PALETTE[1]  # right edge of the dog box
    assert drawn.getpixel((150, 80)) == (255, 255, 255)  # below the dog box
    # without label2id, colours follow first appearance; boxes outside the image are clipped, not an error
    drawn = draw_detections(Image.new("L", (50, 50)), [{"label": "x", "box": [-20, -20, 500, 500]}])
    assert drawn.mode == "RGB" and drawn.getpixel((49, 25)) == PALETTE[0]


def test_example_script(random_dir, tmp_path, monkeypatch, capsys):
    import runpy

    script = Path(__file__).parents[1] / "examples" / "predict.py"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), str(EXAMPLE), str(random_dir), "0.0"])
    runpy.run_path(str(script), run_name="__main__")
    assert "36 detection(s)" in capsys.readouterr().out  # 12 queries x 3 classes
    with Image.open(tmp_path / "detections.png") as drawn:
        assert drawn.size == (640, 480)
