"""The export certificate (`--verify`), int8 quantization and OpenVINO, on a tiny model.

A random tiny model scores 0 mAP on any real labels, which would certify anything. So the verification data here are
synthetic shape images labelled with the eager model's own confident detections ("pseudo labels"): eager scores a
high mAP on them, a faithful export the same, and a file with shifted boxes much less, which the certificate must
catch. One ONNX export of the tiny model serves every test (the CLI tests copy it instead of exporting again).
"""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_config

from align_detr_hf import AlignDetrForObjectDetection
from align_detr_hf.export_align_detr import export_onnx
from align_detr_hf.export_runtime import ExportedDetector, read_metadata
from align_detr_hf.export_verify import (
    CARD_END,
    CARD_START,
    calibration_batches,
    certify,
    failures,
    load_verification_data,
    write_certificate,
)
from align_detr_hf.recipes import eval_image_processor

ort = pytest.importorskip("onnxruntime", reason="the `export` extra (pip install -e '.[dev]') brings onnxruntime")
onnx = pytest.importorskip("onnx")

SHAPES = {0: "circle", 1: "square", 2: "triangle", 3: "cross"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor, saved folder, exported ONNX file)."""
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config(encoder_layers=1, decoder_layers=1, id2label=SHAPES)).eval()
    processor = eval_image_processor(128 / 800)  # the demo's: 128-pixel images stay 128 pixels
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    path = export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, processor, folder, path


@pytest.fixture(scope="module")
def pseudo_labelled(tiny, tmp_path_factory):
    """A COCO folder of 8 synthetic images whose labels are the eager model's 3 best detections per image."""
    model, processor, _, _ = tiny
    dataset = load_verification_data("synthetic:8")
    folder = tmp_path_factory.mktemp("pseudo")
    (folder / "images").mkdir()
    images, annotations = [], []
    for index, record in enumerate(dataset.records):
        image = dataset.load_image(index)
        name = f"{index:03d}.png"
        image.save(folder / "images" / name)
        images.append({"id": index + 1, "file_name": name, "width": image.width, "height": image.height})
        inputs = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        detected = processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width)], top_k=3
        )[0]
        for label, box in zip(detected["labels"].tolist(), detected["boxes"].tolist()):
            x0, y0, x1, y1 = box
            if x1 - x0 > 2 and y1 - y0 > 2:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})  # fmt: skip
    categories = [{"id": i, "name": name} for i, name in SHAPES.items()]
    (folder / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return folder


def shifted_copy(path, destination, shift=0.3):
    """The export with the last box head's bias shifted: every box moves, the file still runs."""
    model = onnx.load(str(path))
    from onnx import numpy_helper

    biases = [init for init in model.graph.initializer if "bbox_embed" in init.name and init.name.endswith("bias")]
    last = biases[-1]
    last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) + np.float32(shift), last.name))
    onnx.save(model, str(destination))
    return destination


def test_certificate_passes_a_faithful_export_and_fails_a_shifted_one(tiny, pseudo_labelled, tmp_path):
    model, processor, _, path = tiny
    data = load_verification_data(str(pseudo_labelled))
    bad = shifted_copy(path, tmp_path / "shifted.onnx")
    report = certify(model, processor, data, {"onnxruntime": path, "shifted": bad}, data_name="pseudo")
    eager, (good, shifted) = report["eager"]["metrics"], report["targets"]
    assert eager["map"] > 0.5  # the pseudo labels make the tiny model look good
    assert good["passed"] and good["delta_map_points"] == 0.0 and good["threshold_points"] == 0.1
    assert good["max_box_diff_px"] < 1e-3 and good["max_score_diff"] < 1e-4  # measured ~1e-5 px, ~1e-7
    assert not shifted["passed"] and shifted["delta_map_points"] > 10
    assert failures(report) == [f"shifted (shifted.onnx): ΔmAP {shifted['delta_map_points']:.2f} points > 0.1"]
    assert not report["passed"]


def test_certificate_is_written_beside_the_file_and_into_the_model_card(tiny, tmp_path):
    _, _, _, path = tiny
    exported = tmp_path / "model.onnx"
    shutil.copy(path, exported)
    card = tmp_path / "README.md"
    card.write_text("# My detector\n\nMy own notes.\n")
    report = {"data": "d", "images": 1, "batch_size": 1, "written": "now", "passed": True,
              "eager": {"metrics": {"map": 0.5, "map_50": 0.7, "map_75": 0.6}},
              "targets": [{"name": "onnxruntime", "file": str(exported), "runtime": "onnxruntime",
                           "precision": "fp32", "metrics": {"map": 0.5, "map_50": 0.7, "map_75": 0.6},
                           "delta_map_points": 0.0, "threshold_points": 0.1, "max_box_diff_px": 1e-5,
                           "max_score_diff": 1e-7, "passed": True}]}  # fmt: skip
    from align_detr_hf.file_io import OutputPathError

    with pytest.raises(OutputPathError, match=r"refused to replace .*README\.md: align-detr did not write it"):
        write_certificate(report, exported)  # the user's own card: only with overwrite, and nothing written before
    assert card.read_text() == "# My detector\n\nMy own notes.\n" and not (tmp_path / "model.certificate.json").exists()
    written = write_certificate(report, exported, overwrite=True)
    assert written == [tmp_path / "model.certificate.json", tmp_path / "model.certificate.md", card]
    assert json.loads(written[0].read_text()) == report
    row = "| onnxruntime | model.onnx | onnxruntime | fp32 | 50.0 | 70.0 | 60.0 | 0.00 | 0.1 |"
    assert row in written[1].read_text()
    report["targets"][0]["metrics"]["map"] = 0.4
    write_certificate(report, exported)  # again, no overwrite needed (the card is now the export's): the section is
    text = card.read_text()               # replaced, the user's text kept
    assert text.startswith("# My detector\n\nMy own notes.\n") and text.count(CARD_START) == text.count(CARD_END) == 1
    assert "| onnxruntime | model.onnx | onnxruntime | fp32 | 40.0 |" in text
    assert "| onnxruntime | model.onnx | onnxruntime | fp32 | 50.0 |" not in text
    card.write_text(text + "\nMore notes.\n")  # edited since: refused again, and the model's own files never
    with pytest.raises(OutputPathError, match=r"README\.md: it was changed since align-detr export wrote it"):
        write_certificate(report, exported)
    with pytest.raises(OutputPathError, match=r"it is the input"):
        write_certificate(report, exported, overwrite=True, inputs=[card])


def test_cli_verify_writes_the_certificate_and_fails_with_status_1(tiny, pseudo_labelled, tmp_path, monkeypatch,
                                                                   capsys):
    from align_detr_hf import export_pipeline
    from align_detr_hf.cli import main

    _, _, folder, path = tiny
    exported = {"file": path}
    def copy_instead_of_exporting(model, output, **settings):
        from align_detr_hf.export_align_detr import WRITER
        from align_detr_hf.file_io import record_output

        shutil.copy(exported["file"], output)
        record_output(output, WRITER)  # as export_onnx does: the next export may replace it

    monkeypatch.setattr(export_pipeline, "export_onnx", copy_instead_of_exporting)
    output = tmp_path / "model.onnx"
    main(["export", "--model", str(folder), "--output", str(output), "--verify", str(pseudo_labelled)])
    assert "onnxruntime: mAP" in capsys.readouterr().out and (tmp_path / "model.certificate.md").is_file()
    exported["file"] = shifted_copy(path, tmp_path / "shifted.onnx")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(folder), "--output", str(output), "--verify", str(pseudo_labelled)])
    assert exit_info.value.code == 1
    assert "align-detr export: error: certificate failed: onnxruntime (model.onnx): ΔmAP" in capsys.readouterr().err
    # a threshold of the user's: the same file passes
    main(["export", "--model", str(folder), "--output", str(output), "--verify", str(pseudo_labelled),
          "--max-map-drop", "100"])  # fmt: skip


def test_int8_keeps_the_precision_sensitive_layers_in_float(tiny, tmp_path):
    from align_detr_hf.quantize import FLOAT_MODULES, quantize_onnx

    _, processor, _, path = tiny
    calibration = calibration_batches(load_verification_data("synthetic:4", seed=4321), processor, batch_size=2)
    int8 = quantize_onnx(path, tmp_path / "tiny.int8.onnx", calibration)
    graph = onnx.load(str(int8)).graph
    producers = {output: node for node in graph.node for output in node.output}
    quantized, kept = [], []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Conv", "Gemm"):
            continue
        weight = producers.get(node.input[1])
        dequantized = weight is not None and weight.op_type == "DequantizeLinear"
        name = weight.input[0] if dequantized else node.input[1]
        (quantized if dequantized else kept).append(name)
    assert any("backbone" in name for name in quantized) and any("fc1" in name for name in quantized)
    assert not any(part in name for name in quantized for part in FLOAT_MODULES)
    assert any("sampling_offsets" in name for name in kept) and any("class_embed" in name for name in kept)
    samplers = [node for node in graph.node if node.op_type == "GridSample"]
    assert samplers and all(producers[node.input[1]].op_type != "DequantizeLinear" for node in samplers)  # float grid
    assert read_metadata(int8)["precision"] == "int8"
    pixel_values = calibration[0]["pixel_values"]
    full, reduced = ExportedDetector(path)(pixel_values), ExportedDetector(int8)(pixel_values)
    assert np.isfinite(reduced["logits"]).all()
    # a random model's scores are near-tied (~0.02), so int8 reorders its queries: compare each float box with the
    # nearest int8 one. Measured: median 0, largest 0.0625 (two cells of the finest level), relative units
    nearest = np.abs(full["pred_boxes"][:, :, None] - reduced["pred_boxes"][:, None]).max(-1).min(-1)
    assert np.median(nearest) < 0.01 and nearest.max() < 0.1
    top = lambda outputs: np.sort(1 / (1 + np.exp(-outputs["logits"].max(-1))), -1)[:, -5:]  # noqa: E731
    assert np.abs(top(full) - top(reduced)).max() < 0.02  # the five best scores; measured 0.005


def test_int8_refuses_a_file_that_is_not_float32(tiny, tmp_path):
    from align_detr_hf.export_align_detr import set_metadata
    from align_detr_hf.quantize import quantize_onnx

    _, _, _, path = tiny
    model = onnx.load(str(path))
    set_metadata(model, {**read_metadata(path), "precision": "int8"})
    onnx.save(model, str(tmp_path / "already.onnx"))
    with pytest.raises(ValueError, match="is not a float32 export"):
        quantize_onnx(tmp_path / "already.onnx", tmp_path / "again.onnx", [{}])
    with pytest.raises(ValueError, match="needs at least one calibration batch"):
        quantize_onnx(path, tmp_path / "none.onnx", [])


def test_detect_gives_the_processor_and_eager_detections(tiny):
    model, processor, _, path = tiny
    data = load_verification_data("synthetic:2")
    images = [data.load_image(0), data.load_image(1)]
    detections = ExportedDetector(path).detect(images, processor, threshold=0.0, top_k=10)
    inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    expected = processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=[(im.height, im.width) for im in images], top_k=10
    )
    for got, want in zip(detections, expected):
        torch.testing.assert_close(got["scores"], want["scores"], atol=1e-5, rtol=0)
        # near-tied scores may come in another order: each box has a partner of its label (pixels; measured ~1e-5)
        for label, box in zip(got["labels"], got["boxes"]):
            assert ((want["boxes"] - box).abs().amax(-1)[want["labels"] == label] < 1e-3).any()


# ------------------------------------------------------------------------------------------------------ OpenVINO


def test_openvino_runs_the_onnx_export_like_onnx_runtime(tiny, tmp_path):
    pytest.importorskip("openvino", reason="the `openvino` extra")
    from align_detr_hf.export_openvino import onnx_to_openvino

    _, processor, _, path = tiny
    xml = onnx_to_openvino(path, tmp_path / "tiny.xml")
    assert xml.with_suffix(".bin").is_file() and read_metadata(xml) == read_metadata(path)
    batch = calibration_batches(load_verification_data("synthetic:3"), processor, batch_size=3)[0]
    expected = ExportedDetector(path)(**batch)
    got = ExportedDetector(xml)(**batch)
    assert ExportedDetector(xml).runtime == "openvino"
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-4)  # measured ~2e-6
    np.testing.assert_allclose(got["pred_boxes"], expected["pred_boxes"], atol=1e-5)


def test_openvino_through_transformers_exporter_equals_eager(tiny, tmp_path):
    pytest.importorskip("openvino", reason="the `openvino` extra")
    from align_detr_hf.export_openvino import export_openvino

    model, processor, _, _ = tiny
    xml = export_openvino(model, tmp_path / "tiny.xml")
    batch = calibration_batches(load_verification_data("synthetic:2"), processor, batch_size=2)[0]
    got = ExportedDetector(xml)(**batch)
    with torch.no_grad():
        expected = model(**batch)
    np.testing.assert_allclose(got["logits"], expected.logits.numpy(), atol=1e-4)  # measured ~1e-6
    np.testing.assert_allclose(got["pred_boxes"], expected.pred_boxes.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="takes heights and widths from 65"):
        ExportedDetector(xml)(torch.zeros(1, 3, 60, 80))


# ---------------------------------------------------------------------------------------------------------- data


def test_verification_data_specs(pseudo_labelled, tmp_path):
    datasets = pytest.importorskip("datasets")
    assert len(load_verification_data("synthetic:5:96")) == 5
    assert len(load_verification_data(str(pseudo_labelled), limit=3)) == 3
    assert len(load_verification_data(str(pseudo_labelled / "annotations.json"))) == 8
    from PIL import Image

    rows = {"image": [Image.new("RGB", (80, 96))] * 2,
            "objects": [{"bbox": [[1.0, 2.0, 30.0, 40.0]], "category": [0]}, {"bbox": [], "category": []}]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    assert len(load_verification_data(str(tmp_path / "saved"))) == 2
    for spec, message in [("synthetic:x", "use synthetic, synthetic:N"), ("synthetic:4:32", "SIZE at least 64"),
                          (str(tmp_path / "missing"), "expected a COCO folder")]:
        with pytest.raises(ValueError, match=message):
            load_verification_data(spec)


# ------------------------------------------------------------------------------------------------------ profiling


def test_profiling_writes_nothing_into_the_current_directory(tiny, tmp_path, monkeypatch):
    """benchmarks/profile_export.py: ONNX Runtime's profile file goes to a temporary folder, never the cwd."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_export.py"
    spec = importlib.util.spec_from_file_location("profile_export", script)
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    _, _, _, path = tiny
    monkeypatch.chdir(tmp_path)
    totals = profile.onnxruntime_profile(path, profile._feeds(96, 128), threads=1)
    assert {"Conv", "GridSample"} <= set(totals) and all(value >= 0 for value in totals.values())
    assert "Conv" in profile.shares(totals)
    assert list(tmp_path.iterdir()) == []
