"""Deployment exports (through transformers' exporters): ONNX run by ONNX Runtime's CPU provider and torch.export,
against PyTorch eager; the runner's input checks.

Tolerances (CPU float32; measured max differences, fixture model, in the comments where they are asserted):
logits 1e-4 and boxes 1e-5 absolute, the same as the mmdetection parity tests of tests/test_modeling.py, since the
exported graph runs the same float32 maths with other kernels. Two runtimes may order near-tied encoder top-k picks
(or equal scores) differently, which permutes queries without changing any of them; so queries are compared per
match: each exported query is paired with the eager query of nearest box, and every query must find a partner
within the tolerances (the fraction matched and the largest differences are in the assertion messages).

The exports are slow (tens of seconds each on 2 cores): each is made once per module and reused. OpenVINO, int8 and
the certificate: tests/test_export_verify.py; backbone families: tests/test_export_backbones.py.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_config

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor
from align_detr_hf import ms_deform_attn
from align_detr_hf.export_align_detr import (
    WRITER,
    AlignDetrExportWrapper,
    example_inputs,
    export_config,
    export_onnx,
    export_program,
)
from align_detr_hf.export_runtime import ExportedDetector

ort = pytest.importorskip("onnxruntime", reason="the `export` extra (pip install -e '.[dev]') brings onnxruntime")
onnx = pytest.importorskip("onnx")

LOGITS_ATOL, BOXES_ATOL, PIXELS_ATOL = 1e-4, 1e-5, 1e-2
TOP_K = 50


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def padded_batch(batch, height, width, seed):
    """Random normalised images; the last one covers only the top-left 3/4 x 2/3 (padding elsewhere)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long)
    if batch > 1:
        pixel_mask[-1, height * 3 // 4 :] = 0
        pixel_mask[-1, :, width * 2 // 3 :] = 0
        pixel_values[-1] *= pixel_mask[-1]
    return pixel_values, pixel_mask


def match_queries(logits, boxes, ref_logits, ref_boxes):
    """Pair each query of one runtime with the reference query of nearest box (one to one, per image).

    Returns (fraction of queries whose partner is within the tolerances, max |logit| diff, max |box| diff) over
    the paired queries, and how many sit at the same index in both."""
    matched = same_index = total = 0
    max_logit = max_box = 0.0
    for image in range(logits.shape[0]):
        free = torch.ones(ref_boxes.shape[1], dtype=torch.bool)
        for query in range(logits.shape[1]):
            box_diff = (ref_boxes[image] - boxes[image, query]).abs().amax(-1)
            logit_diff = (ref_logits[image] - logits[image, query]).abs().amax(-1)
            cost = torch.where(free, box_diff + logit_diff, torch.inf)
            partner = int(cost.argmin())
            free[partner] = False
            total += 1
            same_index += partner == query
            max_logit, max_box = max(max_logit, float(logit_diff[partner])), max(max_box, float(box_diff[partner]))
            matched += bool(logit_diff[partner] <= LOGITS_ATOL and box_diff[partner] <= BOXES_ATOL)
    return matched / total, max_logit, max_box, same_index / total


def assert_queries_match(logits, boxes, ref_logits, ref_boxes):
    logits, boxes = torch.as_tensor(np.asarray(logits)), torch.as_tensor(np.asarray(boxes))
    assert logits.shape == ref_logits.shape and boxes.shape == ref_boxes.shape
    fraction, max_logit, max_box, in_place = match_queries(logits, boxes, ref_logits, ref_boxes)
    report = (
        f"matched {fraction:.3f}, max logit diff {max_logit:.2e}, max box diff {max_box:.2e}, "
        f"in place {in_place:.3f}"
    )
    assert fraction == 1.0, report
    print(report)  # the measured figures, shown with `pytest -s`
    return report


@pytest.fixture(scope="module")
def small_exports(small_model, tmp_path_factory):
    """The reference fixture model exported once (with post-processing), from training mode on purpose."""
    small_model.train()
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    try:
        with pytest.warns(UserWarning, match="training mode; it is exported in eval mode"):
            export_onnx(small_model, path, with_postprocess=True, top_k=TOP_K)
        assert small_model.training  # restored
    finally:
        small_model.eval()
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config(encoder_layers=1, decoder_layers=1)).eval()
    folder = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(folder)
    return model, folder


def eager(model, pixel_values, pixel_mask, target_sizes):
    with torch.no_grad():
        outputs = AlignDetrExportWrapper(model, TOP_K)(pixel_values, pixel_mask, target_sizes)
    return [outputs[name] for name in ("logits", "pred_boxes", "scores", "labels", "boxes")]


def test_onnx_equals_mmdetection_fixture_outputs(small_exports, small_inputs, small_outputs):
    """ORT on the fixture images against mmdetection's own numbers (the export example was 2 x 256 x 320)."""
    path = small_exports
    sizes = np.array([meta["ori_shape"] for meta in small_inputs["metainfo"]], dtype=np.float32)
    logits, boxes, *_ = session(path).run(
        None,
        {
            "pixel_values": small_inputs["pixel_values"].numpy(),
            "pixel_mask": small_inputs["pixel_mask"].long().numpy(),
            "target_sizes": sizes,
        },
    )
    # measured: max logit diff ~2e-6, max box diff ~2e-7, every query at its own index
    assert_queries_match(logits, boxes, small_outputs["dec_logits"], small_outputs["dec_boxes"])


@pytest.mark.parametrize("batch, height, width", [(1, 224, 288), (3, 192, 160)])
def test_onnx_equals_eager_at_other_sizes(small_exports, small_model, batch, height, width):
    path = small_exports
    pixel_values, pixel_mask = padded_batch(batch, height, width, seed=batch)
    target_sizes = torch.tensor([[300.0, 400.0]] * batch)
    expected = eager(small_model, pixel_values, pixel_mask, target_sizes)
    outputs = session(path).run(
        None,
        {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy(), "target_sizes": target_sizes.numpy()},
    )
    assert_queries_match(outputs[0], outputs[1], expected[0], expected[1])
    # post-processing: the same detections as the image processor's, paired by label, score and box
    detections = AlignDetrImageProcessor().post_process_object_detection(
        {"logits": expected[0], "pred_boxes": expected[1]}, target_sizes=target_sizes, top_k=TOP_K
    )
    scores, labels, boxes = outputs[2:]
    assert scores.shape == (batch, TOP_K) and labels.dtype == np.int64 and boxes.shape == (batch, TOP_K, 4)
    for image, reference in enumerate(detections):
        unpaired = list(zip(reference["labels"].tolist(), reference["scores"].tolist(), reference["boxes"]))
        for label, score, box in zip(labels[image], scores[image], torch.from_numpy(boxes[image])):
            partner = next(
                i for i, (l, s, b) in enumerate(unpaired)
                if l == label and abs(s - score) < 1e-5 and (b - box).abs().max() < PIXELS_ATOL
            )  # fmt: skip
            unpaired.pop(partner)
        assert unpaired == []


@pytest.fixture(scope="module")
def tiny_program(tiny_folder):
    model, _ = tiny_folder
    return export_program(model, with_postprocess=True, top_k=TOP_K)


def test_exported_program_equals_eager(tiny_program, tiny_model, monkeypatch):
    module = tiny_program.module()
    pixel_values, pixel_mask = padded_batch(3, 208, 176, seed=7)  # exported at 2 x 256 x 320
    sizes = torch.tensor([[208.0, 176.0]] * 3)
    # the program holds the grid_sample path; eager on CPU would take the gather (its own parity is tested in
    # test_ms_deform_attn.py and by the fixture tests), so compare like with like
    monkeypatch.setattr(ms_deform_attn, "_FORCED_IMPL", "pytorch")
    expected = eager(tiny_model, pixel_values, pixel_mask, sizes)
    with torch.no_grad():
        exported = module(pixel_values=pixel_values, pixel_mask=pixel_mask, target_sizes=sizes)
    for name, want in zip(("logits", "pred_boxes", "scores", "labels", "boxes"), expected):
        # measured: bit-identical (same kernels, same order)
        torch.testing.assert_close(exported[name], want, atol=1e-6, rtol=0)
    # the program checks its size range (the ONNX graph cannot: ExportedDetector does, see below)
    with pytest.raises(Exception, match="65"):
        module(**example_inputs(tiny_model, True, 1, 64, 96))


def test_transformers_onnx_exporter_exports_the_model(tiny_model, tmp_path):
    """transformers' own API: `OnnxExporter().export(model, inputs, export_config(model))`, the saved folder loaded
    back with `ExportedModel.from_pretrained` and called like the model (the full output: every decoder layer)."""
    from transformers.exporters import ExportedModel, OnnxExporter

    inputs = example_inputs(tiny_model)
    with ms_deform_attn.custom_kernels_disabled():
        OnnxExporter().export(tiny_model, inputs, export_config(tiny_model)).save_pretrained(tmp_path)
    exported = ExportedModel.from_pretrained(tmp_path)
    pixel_values, pixel_mask = padded_batch(3, 144, 208, seed=3)
    outputs = exported(pixel_values=pixel_values, pixel_mask=pixel_mask)
    with torch.no_grad():
        expected = tiny_model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    assert type(outputs) is type(expected)  # transformers rebuilds our output class
    assert_queries_match(outputs.logits, outputs.pred_boxes, expected.logits, expected.pred_boxes)
    assert outputs.intermediate_logits.shape == expected.intermediate_logits.shape


def test_onnx_graph_is_standard_ops_with_named_dynamic_axes(small_exports):
    path = small_exports
    model = onnx.load(str(path))
    op_types = {node.op_type for node in model.graph.node}
    assert "GridSample" in op_types  # the deformable attention, as a standard op
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    dims = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in list(model.graph.input) + list(model.graph.output)
    }
    assert dims == {
        "pixel_values": ["batch", 3, "height", "width"],
        "pixel_mask": ["batch", "height", "width"],
        "target_sizes": ["batch", 2],
        "logits": ["batch", "queries", 80],
        "pred_boxes": ["batch", "queries", 4],
        "scores": ["batch", "detections"],
        "labels": ["batch", "detections"],
        "boxes": ["batch", "detections", 4],
    }


@pytest.fixture(scope="module")
def tiny_cli_export(tiny_folder, tmp_path_factory):
    """The one command, end to end, on a tiny model saved to a folder (an export of ~60 s on 2 quiet cores)."""
    import contextlib
    import io

    from align_detr_hf.cli import main

    _, folder = tiny_folder
    output = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["export", "--model", str(folder), "--output", str(output), "--opset", "18"])
    return output, printed.getvalue()


def test_cli_exports_a_saved_tiny_model(tiny_folder, tiny_cli_export):
    model, _ = tiny_folder
    output, printed = tiny_cli_export
    assert f"Wrote {output}" in printed
    runtime = session(output)
    assert [i.name for i in runtime.get_inputs()] == ["pixel_values", "pixel_mask"]
    assert [o.name for o in runtime.get_outputs()] == ["logits", "pred_boxes"]
    for batch, height, width in [(1, 96, 128), (4, 144, 112)]:
        pixel_values, pixel_mask = padded_batch(batch, height, width, seed=height)
        with torch.no_grad():
            expected = model(pixel_values, pixel_mask)
        logits, boxes = runtime.run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
        assert_queries_match(logits, boxes, expected.logits, expected.pred_boxes)


# ---------------------------------------------------------------------------------------------------------------
# The runner: the graph cannot check its inputs, ExportedDetector does, with eager's messages
# ---------------------------------------------------------------------------------------------------------------


def test_the_bare_graph_takes_inputs_eager_refuses(tiny_cli_export):
    """Why the runner exists: fed directly, the graph runs on a mask of another size or without real pixels."""
    output, _ = tiny_cli_export
    pixel_values, _ = padded_batch(2, 96, 128, seed=0)
    for mask in (np.ones((2, 80, 100), np.int64), np.zeros((2, 96, 128), np.int64)):
        logits, _ = session(output).run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": mask})
        assert np.isfinite(logits).all()


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.ones((2, 80, 100), np.int64), r"pixel_mask must be \(batch, height, width\) = \(2, 96, 128\)"),
        (np.zeros((2, 96, 128), np.int64), "pixel_mask is all zeros"),
        (np.full((2, 96, 128), 2, np.int64), "must hold only 1 \\(real pixel\\) and 0"),
    ],
)
def test_runner_refuses_a_mask_eager_refuses(tiny_cli_export, tiny_model, mask, message):
    output, _ = tiny_cli_export
    pixel_values, _ = padded_batch(2, 96, 128, seed=0)
    with pytest.raises(ValueError, match=message):
        ExportedDetector(output)(pixel_values, mask)
    with pytest.raises(ValueError, match=message):  # the same message as eager PyTorch's
        tiny_model(pixel_values, torch.from_numpy(mask))


def test_runner_refuses_sizes_outside_the_exported_range(tiny_cli_export):
    output, _ = tiny_cli_export
    detector = ExportedDetector(output)
    assert (detector.min_side, detector.max_side) == (65, 8192)
    with pytest.raises(ValueError, match="takes heights and widths from 65 to 8192 pixels, got 64x128"):
        detector(torch.zeros(1, 3, 64, 128))


def test_runner_matches_onnx_runtime_and_takes_numpy_or_torch(tiny_cli_export):
    output, _ = tiny_cli_export
    pixel_values, pixel_mask = padded_batch(2, 96, 128, seed=0)
    direct = session(output).run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    outputs = ExportedDetector(output, threads=1)(pixel_values.numpy(), pixel_mask)
    np.testing.assert_array_equal(outputs["logits"], direct[0])
    with pytest.raises(ValueError, match="exported without post-processing and takes no target_sizes"):
        ExportedDetector(output)(pixel_values, pixel_mask, target_sizes=[[96, 128]] * 2)


def test_post_processing_graph_takes_integer_target_sizes_through_the_runner(small_exports):
    """The graph's target_sizes input is float32 (one dtype per ONNX input); the runner casts integers."""
    detector = ExportedDetector(small_exports)
    pixel_values, pixel_mask = padded_batch(2, 128, 160, seed=1)
    as_float = detector(pixel_values, pixel_mask, torch.tensor([[300.0, 400.0]] * 2))
    as_int = detector(pixel_values, pixel_mask, torch.tensor([[300, 400]] * 2))  # int64, as users have sizes
    np.testing.assert_array_equal(as_float["boxes"], as_int["boxes"])
    assert np.abs(as_int["boxes"]).max() > 1  # pixels, not relative
    for bad, message in [([[300, 400]], r"must be \(batch, 2\) = \(2, 2\)"), ([[300, 0]] * 2, "must be positive"),
                         (None, "give target_sizes")]:
        with pytest.raises(ValueError, match=message):
            detector(pixel_values, pixel_mask, bad)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_folder):
    return tiny_folder[0]


@pytest.mark.parametrize("opset", [16, 17, 999])
def test_unsupported_opset_is_refused(tiny_model, tmp_path, opset):
    with pytest.raises(ValueError, match=f"opset {opset} is not supported: use 18 to"):
        export_onnx(tiny_model, tmp_path / "model.onnx", opset=opset)
    assert not (tmp_path / "model.onnx").exists()


def test_output_in_a_missing_folder_or_a_folder_is_refused(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="output folder .*missing.* does not exist"):
        export_onnx(tiny_model, tmp_path / "missing" / "model.onnx")
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        export_onnx(tiny_model, tmp_path)


def test_a_model_that_is_not_align_detr_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs an AlignDetrForObjectDetection, got Linear"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="needs an AlignDetrForObjectDetection, got Linear"):
        export_program(torch.nn.Linear(2, 2))


def test_cli_reports_bad_input_in_one_line(tiny_folder, tmp_path, capsys):
    from align_detr_hf.cli import main

    _, folder = tiny_folder
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(folder), "--output", str(tmp_path / "nope" / "m.onnx")])
    assert exit_info.value.code == 2
    assert "align-detr export: error: output folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--model", str(tmp_path / "no_such_model"), "--output", str(tmp_path / "m.onnx")])
    assert "model folder not found" in capsys.readouterr().err


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from align_detr_hf.file_io import MANIFEST_NAME, is_own_output, owned_file, record_output

    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous export")
    record_output(path, WRITER)  # an earlier export's file: replaceable without --overwrite
    with pytest.raises(TypeError), owned_file(path, WRITER) as temp:  # how every export file is written
        temp.write_bytes(object())  # not bytes: fails half-way, after the temporary file was created
    assert path.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "model.onnx"]
    with owned_file(path, WRITER) as temp:
        temp.write_bytes(b"new export")
    assert path.read_bytes() == b"new export" and sorted(os.listdir(tmp_path)) == [MANIFEST_NAME, "model.onnx"]
    assert is_own_output(path, WRITER)


@pytest.mark.slow
def test_fp16_export_is_a_valid_float16_graph(tiny_model, tmp_path):
    path = export_onnx(tiny_model, tmp_path / "fp16.onnx", fp16=True)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    elem_type = {value.name: value.type.tensor_type.elem_type for value in model.graph.input}
    assert elem_type["pixel_values"] == onnx.TensorProto.FLOAT16
    assert next(tiny_model.parameters()).dtype == torch.float32  # the caller's model is untouched
    pixel_values, pixel_mask = padded_batch(2, 96, 128, seed=0)
    try:
        runtime = session(path)
    except Exception as error:  # ORT's CPU provider has no float16 kernel for some ops: a GPU provider runs it
        warnings.warn(f"ONNX Runtime CPU cannot run the float16 graph: {error}")
        pytest.skip("ONNX Runtime's CPU provider cannot run this float16 graph; it is meant for GPU providers")
    logits, boxes = runtime.run(None, {"pixel_values": pixel_values.half().numpy(), "pixel_mask": pixel_mask.numpy()})
    with torch.no_grad():
        expected = tiny_model(pixel_values, pixel_mask)
    assert np.abs(boxes.astype(np.float32) - expected.pred_boxes.numpy()).max() < 2e-2
    assert np.abs(logits.astype(np.float32) - expected.logits.numpy()).max() < 5e-2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fp16", "--int8"], "--int8 quantizes the float32 export; drop --fp16"),
        (["--calibrate", "synthetic"], "--calibrate gives int8 calibration images; add --int8"),
        (["--verify", "synthetic:0"], "verification data synthetic:0: N must be at least 1"),
        (["--verify", "/no/such/folder"], "verification data /no/such/folder: expected a COCO folder"),
    ],
)
def test_cli_refuses_bad_export_options_before_exporting(tiny_folder, tmp_path, capsys, extra, message):
    from align_detr_hf.cli import main

    _, folder = tiny_folder
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(folder), "--output", str(tmp_path / "m.onnx"), *extra])
    assert exit_info.value.code == 2
    assert f"align-detr export: error: {message}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing exported


@pytest.mark.parametrize("name, extra", [("m.xml", ["--openvino"]), ("README.md", ["--verify", "synthetic"])])
def test_cli_refuses_an_output_name_its_side_files_would_share(tiny_folder, tmp_path, capsys, name, extra):
    """model.xml with --openvino would be both the ONNX file and the OpenVINO graph; README.md with --verify both the
    file and its model card. A name without .onnx is fine when nothing collides."""
    from align_detr_hf.cli import main
    from align_detr_hf.export_pipeline import output_files

    assert [p.name for p in output_files(tmp_path / "m", int8=True, openvino=True, verify=True)] == [
        "m", "m.int8.onnx", "m.xml", "m.bin", "m.int8.xml", "m.int8.bin", "m.certificate.json", "m.certificate.md",
        "README.md"]
    _, folder = tiny_folder
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(folder), "--output", str(tmp_path / name), *extra])
    assert exit_info.value.code == 2
    assert "its exported files would share a name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
