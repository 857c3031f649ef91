"""Nothing a user owns is overwritten (issue 21): one ownership rule for every writer.

The issue's cases first (each failed before the rule existed), then the rule itself (`file_io`), then every writer x
every placement of its output (the property test; `python tests/test_ownership.py` prints the outcome table).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor, write_model_card  # noqa: E402
from align_detr_hf.cli import main as cli  # noqa: E402

SIZE = {"shortest_edge": 64, "longest_edge": 96}
# a demo that trains 1 step on 2 tiny images: the folder handling is what is tested
FAST_DEMO = ["--quiet", "--num_train_images", "2", "--num_val_images", "1", "--max_steps", "1", "--image_size", "64",
             "--d_model", "64", "--num_queries", "3", "--threads", "1"]


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (folders as '<dir>')."""
    return {str(p.relative_to(root)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def refused(argv, capsys) -> str:
    """Run the command; it must exit with code 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
    assert exit_info.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def save_like_a_training_script(folder: Path) -> None:
    """What examples/train_accelerate.py leaves in `final/`: weights, processor, code and a model card."""
    torch.manual_seed(0)
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(folder)
    AlignDetrImageProcessor(size=SIZE).save_pretrained(folder)
    write_model_card(folder, metrics={"map": 0.5})


@pytest.fixture(scope="module")
def mmdet_checkpoint(small_state_dict, tmp_path_factory):
    """The small fixture model as mmdetection publishes it: {'meta', 'state_dict'}, sha256 prefix in the name."""
    folder = tmp_path_factory.mktemp("ckpt")
    path = folder / "align_detr-small.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": small_state_dict}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return path.rename(folder / f"align_detr-small-{digest}.pth")


# ------------------------------------------------------------------------------------------------ the issue's cases


def test_issue21_case1_convert_refuses_a_fine_tuned_model_folder(mmdet_checkpoint, tmp_path, capsys):
    final = tmp_path / "out" / "final"
    save_like_a_training_script(final)
    (final / "notes.py").write_text("# my notes on this run\n")
    before = snapshot(final)
    line = refused(["convert", "--checkpoint", mmdet_checkpoint, "--output-dir", final], capsys)
    assert "refused" in line and str(final) in line and "--overwrite" in line
    assert snapshot(final) == before


def test_issue21_case4_export_refuses_to_write_over_the_models_weights(tmp_path, capsys):
    pytest.importorskip("onnx")
    model_dir = tmp_path / "M"
    save_like_a_training_script(model_dir)
    before = snapshot(model_dir)
    line = refused(["export", "--model", model_dir, "--output", model_dir / "model.safetensors"], capsys)
    assert "refused" in line and "model.safetensors" in line
    assert snapshot(model_dir) == before


def test_issue21_case5_demo_refuses_a_project_with_its_own_data(tmp_path, capsys):
    project = tmp_path / "proj"
    (project / "data" / "train" / "images").mkdir(parents=True)
    (project / "data" / "train" / "annotations.json").write_text('{"images": [], "note": "hand-labelled"}')
    (project / "data" / "train" / "images" / "000000.png").write_bytes(b"my photo")
    before = snapshot(project)
    line = refused(["demo", "--output-dir", project, *FAST_DEMO], capsys)
    assert "refused" in line and "data" in line
    assert snapshot(project) == before


# ------------------------------------------------------------------------------------------------ the rule itself


def test_claim_output_rule(tmp_path):
    from align_detr_hf.file_io import OutputPathError, claim_output, is_own_output, record_output

    mine = tmp_path / "out" / "a.json"
    mine.parent.mkdir()
    mine.write_text("{}")
    with pytest.raises(OutputPathError, match=r"^refused to replace .*a\.json: align-detr did not write it; .*--overwrite"):
        claim_output(mine, "w")
    assert claim_output(mine, "w", overwrite=True) == mine
    record_output(mine, "w")
    assert is_own_output(mine, "w") and claim_output(mine, "w") == mine
    with pytest.raises(OutputPathError, match=r"it was written by w, not by other"):
        claim_output(mine, "other")
    mine.write_text('{"edited": 1}')
    with pytest.raises(OutputPathError, match=r"it was changed since w wrote it"):
        claim_output(mine, "w")
    assert claim_output(tmp_path / "new" / "b.json", "w")  # nothing there: free
    with pytest.raises(OutputPathError, match=r"a\.json is a file, not a folder"):
        claim_output(mine / "c.json", "w")
    with pytest.raises(OutputPathError, match=r"it is a folder; give a file name"):
        claim_output(tmp_path / "out", "w")
    # inputs: never the input itself (even with overwrite), nor inside an input folder unless overwrite
    with pytest.raises(OutputPathError, match=r"it is the input"):
        claim_output(mine, "w", overwrite=True, inputs=[mine])
    with pytest.raises(OutputPathError, match=r"inside the folder .*out that this command reads"):
        claim_output(tmp_path / "out" / "new.onnx", "w", inputs=[tmp_path / "out"])
    claim_output(tmp_path / "out" / "new.onnx", "w", inputs=[tmp_path / "out"], overwrite=True)
    with pytest.raises(OutputPathError, match=r"it holds the input"):
        claim_output(tmp_path, "w", folder=True, overwrite=True, inputs=[mine])
    link = tmp_path / "link.json"
    link.symlink_to(mine)
    with pytest.raises(OutputPathError, match=r"it is the input"):  # a link to an input is that input
        claim_output(link, "w", inputs=[mine])


@pytest.mark.parametrize("path, folder, message", [
    ("", False, r"empty path"),  # `--output "$UNSET"`: never the current directory
    (" ", True, r"empty path"),
    ("new/", False, r"ends with a path separator"),  # a file output written as a folder: Path() drops the slash
])
def test_claim_output_refuses_paths_that_do_not_say_what_they_name(path, folder, message):
    from align_detr_hf.file_io import OutputPathError, check_output_folder, claim_output

    with pytest.raises(OutputPathError, match=message):
        claim_output(path, "w", folder=folder)
    if not path.strip():
        with pytest.raises(OutputPathError, match=r"--output is empty"):
            check_output_folder(path, "--output")


def test_the_files_a_model_is_loaded_from_are_never_outputs(tmp_path):
    """Writing inside a model folder needs overwrite; replacing a file loading reads (weights, config, code) is refused
    even then: the model would be gone."""
    from align_detr_hf.file_io import OutputPathError, claim_output, model_input_folders

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_x.py", "notes.txt"):
        (model / name).write_text("x")
    inputs = model_input_folders(model)
    assert {p.name for p in inputs} == {"model", "config.json", "model.safetensors", "preprocessor_config.json",
                                        "modeling_x.py"}
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_x.py"):
        with pytest.raises(OutputPathError, match=r"it is the input"):
            claim_output(model / name, "w", overwrite=True, inputs=inputs)
    assert claim_output(model / "notes.txt", "w", overwrite=True, inputs=inputs) == model / "notes.txt"
    assert claim_output(model / "model.onnx", "w", overwrite=True, inputs=inputs) == model / "model.onnx"


def test_folder_claim_names_what_is_not_ours(tmp_path):
    from align_detr_hf.file_io import OutputPathError, claim_output, record_output

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "w.bin").write_bytes(b"1")
    record_output(folder, "w")
    assert claim_output(folder, "w", folder=True) == folder
    (folder / "notes.py").write_text("# mine")
    (folder / "empty").mkdir()
    with pytest.raises(OutputPathError, match=r"^refused to replace the folder .*model: it holds empty \(align-detr did "
                                              r"not make it\) and 1 more such entry; .*--overwrite"):
        claim_output(folder, "w", folder=True)


def test_written_files_get_ordinary_modes(tmp_path):
    """mkstemp (0600), mkdtemp (0700) and safetensors (0600) are private; what lands must look like any new file."""
    import os

    from align_detr_hf.convert_align_detr import WRITER
    from align_detr_hf.file_io import atomic_directory

    previous = os.umask(0o022)
    try:
        save_like_a_training_script(tmp_path / "saved")  # save_pretrained + processor + model card
        with atomic_directory(tmp_path / "converted", WRITER) as staging:  # as the converter writes
            AlignDetrForObjectDetection(tiny_config()).save_pretrained(staging)
            write_model_card(staging)
        os.umask(0o027)
        save_like_a_training_script(tmp_path / "group")
    finally:
        os.umask(previous)
    for folder, file_mode, dir_mode in (("saved", 0o644, 0o755), ("converted", 0o644, 0o755), ("group", 0o640, 0o750)):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / folder).iterdir()}
        assert {"model.safetensors", "README.md", "config.json"} <= set(modes)
        assert set(modes.values()) == {file_mode}, (folder, modes)
        assert (tmp_path / folder).stat().st_mode & 0o777 == dir_mode


def test_save_pretrained_keeps_user_files_and_replaces_only_its_own(tmp_path):
    from align_detr_hf.file_io import OutputPathError

    model = AlignDetrForObjectDetection(tiny_config())
    folder = tmp_path / "m"
    model.save_pretrained(folder, max_shard_size="200KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    (folder / "training_notes.txt").write_text("lr 1e-4 was too high")
    model.save_pretrained(folder)  # one file now: the earlier save's shards and index go, the user's notes stay
    assert not list(folder.glob("model-*.safetensors")) and not (folder / "model.safetensors.index.json").exists()
    assert (folder / "training_notes.txt").read_text() == "lr 1e-4 was too high"
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"num_queries": 12', '"num_queries": 13'))
    with pytest.raises(OutputPathError, match=r"refused to replace .*config\.json: it was changed since save_pretrained"):
        model.save_pretrained(folder)
    model.save_pretrained(folder, overwrite=True)
    assert AlignDetrForObjectDetection.from_pretrained(folder).config.num_queries == 12


# ------------------------------------------------------------------------------------------------ every writer x placement
# Each writer runs with its output at each placement in a fresh workspace `root` (inputs under root/inputs). Refused:
# exit code 2 and one line saying "refused" (OutputPathError from the Python API), and not a byte under root changed.
# Written: the outputs are there, and every file that existed before and was not the writer's own is unchanged
# (with --overwrite, except the one file of the same name that the user asked to replace).

PLACEMENTS = {
    "input": "an input",
    "in_input_folder": "inside the input / model folder",
    "foreign_folder": "an existing foreign folder",
    "same_name": "an existing file of the same name",
    "own": "an earlier own output",
    "own_edited": "an earlier own output, edited",
    "same_name_overwrite": "a file of the same name, --overwrite",
}
R, W, NA = "refused", "written", "n/a"
EXPECTED = {  # writer -> outcome per placement, in the order of PLACEMENTS
    "convert": (R, R, R, R, W, R, W),
    "export": (R, R, W, R, W, R, W),
    "export_int8": (R, R, W, R, W, R, W),
    "export_openvino": (R, R, W, R, W, R, W),
    "export_certificate": (R, R, W, R, W, R, W),
    "predict": (R, R, W, R, W, R, W),
    "demo": (NA, NA, W, R, W, R, W),
    "save_pretrained": (W, W, W, R, W, R, W),
}


class ConvertWriter:
    """`align-detr convert`; the conversion itself is a tiny model (tests/test_convert.py converts the fixture)."""

    record, same_name, file_output = "align-detr convert", "config.json", False

    def setup(self, root, monkeypatch):
        import align_detr_hf.convert_align_detr as convert

        monkeypatch.setattr(convert, "load_checkpoint_and_meta", lambda path, allow_pickle=False: ({}, {}))
        monkeypatch.setattr(convert, "config_from_state_dict", lambda state_dict, **kwargs: tiny_config())
        monkeypatch.setattr(convert, "load_converted", lambda state_dict, config=None: tiny_model())
        self.checkpoint = root / "inputs" / "model.pth"
        self.checkpoint.write_bytes(b"PK weights")

    def placement(self, name, root):
        return {"input": self.checkpoint, "in_input_folder": self.checkpoint.parent}.get(name, root / "out")

    def run(self, location, overwrite):
        cli(["convert", "--checkpoint", str(self.checkpoint), "--output-dir", str(location)]
            + ["--overwrite"] * overwrite)  # fmt: skip

    def check(self, location):
        assert AlignDetrForObjectDetection.from_pretrained(location).config.num_queries == 12


class ExportWriter:
    """`align-detr export`; the ONNX translation is replaced by a tiny valid graph (tests/test_export.py exports).
    Its other outputs are rows of their own (below): the placement puts a file of that output's name in the way."""

    record, same_name, file_output = "align-detr export", "", True
    extra_args, target_name = [], None  # the file the placement concerns (None: the .onnx itself)

    def setup(self, root, monkeypatch):
        onnx = pytest.importorskip("onnx")
        import align_detr_hf.export_align_detr as export

        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["pixel_values"], ["logits"]),
             onnx.helper.make_node("Identity", ["pixel_mask"], ["pred_boxes"])], "tiny",
            [onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, ["b", 3, "h", "w"]),
             onnx.helper.make_tensor_value_info("pixel_mask", onnx.TensorProto.INT64, ["b", "h", "w"])],
            [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", 3, "h", "w"]),
             onnx.helper.make_tensor_value_info("pred_boxes", onnx.TensorProto.INT64, ["b", "h", "w"])])  # fmt: skip
        proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
        monkeypatch.setattr(export, "_export", lambda exporter_class, *args, **kwargs: (self.program(), None))
        monkeypatch.setattr(export, "_to_proto", lambda program: onnx.ModelProto.FromString(proto.SerializeToString()))
        self.proto = proto
        self.model_dir = root / "inputs" / "model"
        save_like_a_training_script(self.model_dir)

    def program(self):
        return None

    def placement(self, name, root):
        return {"input": self.model_dir / "model.safetensors",
                "in_input_folder": self.model_dir / "model.onnx"}.get(name, root / "out" / "model.onnx")  # fmt: skip

    def target(self, location):
        return location if self.target_name is None else location.parent / self.target_name

    def run(self, location, overwrite):
        cli(["export", "--model", str(self.model_dir), "--output", str(location), *self.extra_args]
            + ["--overwrite"] * overwrite)  # fmt: skip

    def check(self, location):
        assert location.read_bytes().startswith(b"\x08")  # an ONNX protobuf (ir_version field first)


class ExportInt8Writer(ExportWriter):
    """`align-detr export --int8`: the calibration data and the quantizer are stand-ins (test_export_verify.py
    quantizes); what is tested is where model.int8.onnx may land."""

    extra_args, target_name = ["--int8"], "model.int8.onnx"

    def setup(self, root, monkeypatch):
        super().setup(root, monkeypatch)
        import align_detr_hf.export_verify as verify
        import align_detr_hf.quantize as quantize

        monkeypatch.setattr(verify, "load_verification_data", lambda spec, limit=None, seed=None: [0])
        monkeypatch.setattr(verify, "calibration_batches", lambda *args, **kwargs: [{}])
        identity = type("Q", (), {"quantize": lambda self, model, inputs, export_format: model})()
        monkeypatch.setattr(quantize, "int8_quantizer", lambda calibration: identity)

    def check(self, location):
        assert self.target(location).read_bytes().startswith(b"\x08")


class ExportOpenVINOWriter(ExportWriter):
    """`align-detr export --openvino`: the tiny graph converted by OpenVINO stands in for the exported model."""

    extra_args, target_name = ["--openvino"], "model.bin"

    def setup(self, root, monkeypatch):
        self.openvino = pytest.importorskip("openvino")
        super().setup(root, monkeypatch)
        self.proto_file = root / "inputs" / "tiny.onnx"
        self.proto_file.write_bytes(self.proto.SerializeToString())

    def program(self):
        return self.openvino.convert_model(self.proto_file)

    def check(self, location):
        assert self.openvino.Core().read_model(str(location.with_suffix(".xml"))).inputs


class ExportCertificateWriter(ExportInt8Writer):
    """`align-detr export --verify DATA`: the certificate (.json, .md) and the model card (README.md) beside the
    file; the evaluation is a stand-in (test_export_verify.py certifies)."""

    extra_args, target_name = ["--verify", "synthetic:1"], "README.md"

    def setup(self, root, monkeypatch):
        super().setup(root, monkeypatch)
        import align_detr_hf.export_verify as verify

        metrics = {"map": 0.5, "map_50": 0.7, "map_75": 0.5}

        def certify(model, processor, dataset, targets, **kwargs):
            return {"data": "synthetic:1", "images": 1, "batch_size": 1, "eager": {"metrics": metrics},
                    "written": "now", "targets": [
                        {"name": name, "file": str(path), "runtime": "onnxruntime", "precision": "fp32",
                         "metrics": metrics, "delta_map_points": 0.0, "threshold_points": 0.1,
                         "max_box_diff_px": 0.0, "max_score_diff": 0.0, "passed": True}
                        for name, path in targets.items()]}  # fmt: skip

        monkeypatch.setattr(verify, "certify", certify)

    def check(self, location):
        from align_detr_hf.export_verify import CARD_START

        assert CARD_START in self.target(location).read_text()
        assert json.loads(location.with_suffix(".certificate.json").read_text())["targets"][0]["passed"]


class PredictWriter:
    """`align-detr predict` on one small image."""

    record, same_name, file_output = "align-detr predict", "detections.json", False

    def setup(self, root, monkeypatch):
        from PIL import Image

        self.model_dir = root / "inputs" / "model"
        save_like_a_training_script(self.model_dir)
        self.images = [root / "inputs" / "images" / "a.png"]
        self.images[0].parent.mkdir()
        Image.new("RGB", (48, 32), (200, 30, 30)).save(self.images[0])

    def placement(self, name, root):
        if name == "input":  # a second run over a folder picks up the first run's drawing as an input
            self.images.append(self.images[0].with_name("a_detections.png"))
            self.images[1].write_bytes(self.images[0].read_bytes())
            return self.images[0].parent
        return self.model_dir / "predictions" if name == "in_input_folder" else root / "out"

    def run(self, location, overwrite):
        cli(["predict", *map(str, self.images), "--model", str(self.model_dir), "--output_dir", str(location),
             "--threshold", "0", "--top-k", "2"] + ["--overwrite"] * overwrite)  # fmt: skip

    def check(self, location):
        assert len(json.loads((location / "detections.json").read_text())["images"]) == len(self.images)
        assert (location / "a_detections.png").is_file()


class DemoWriter:
    """`align-detr demo`, 1 step on 2 tiny images."""

    record, same_name, file_output = "align-detr demo", "metrics.json", False

    def setup(self, root, monkeypatch):
        pass

    def placement(self, name, root):
        return root / "out"

    def run(self, location, overwrite):
        cli(["demo", "--output-dir", str(location), *FAST_DEMO] + ["--overwrite"] * overwrite)

    def check(self, location):
        assert json.loads((location / "metrics.json").read_text())["steps"] == 1
        assert (location / "data" / "train" / "annotations.json").is_file() and (location / "detections.png").is_file()
        AlignDetrForObjectDetection.from_pretrained(location / "model")


class SaveWriter:
    """`model.save_pretrained(folder)` (and the processor's), through our API."""

    record, same_name, file_output = "save_pretrained", "config.json", False

    def setup(self, root, monkeypatch):
        self.model_dir = root / "inputs" / "model"
        save_like_a_training_script(self.model_dir)
        self.model = AlignDetrForObjectDetection.from_pretrained(self.model_dir)

    def placement(self, name, root):
        return {"input": self.model_dir, "in_input_folder": self.model_dir / "copy"}.get(name, root / "out")

    def run(self, location, overwrite):
        self.model.save_pretrained(location, overwrite=overwrite)
        AlignDetrImageProcessor(size=SIZE).save_pretrained(location, overwrite=overwrite)

    def check(self, location):
        assert AlignDetrForObjectDetection.from_pretrained(location).config.num_queries == 12


WRITERS = {"convert": ConvertWriter, "export": ExportWriter, "export_int8": ExportInt8Writer,
           "export_openvino": ExportOpenVINOWriter, "export_certificate": ExportCertificateWriter,
           "predict": PredictWriter, "demo": DemoWriter, "save_pretrained": SaveWriter}


def tiny_model():
    torch.manual_seed(0)
    return AlignDetrForObjectDetection(tiny_config()).eval()


def place(writer, name: str, root: Path) -> Path:
    """Prepare the placement `name` for `writer`; returns where its output goes."""
    location = writer.placement(name, root)
    target = writer.target(location) if writer.file_output else location / writer.same_name
    if writer.file_output:
        location.parent.mkdir(parents=True, exist_ok=True)  # export writes into an existing folder
    if name == "foreign_folder":
        folder = location.parent if writer.file_output else location
        (folder / "sub").mkdir(parents=True)
        (folder / "notes.txt").write_text("my notes")
        (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    elif name in ("same_name", "same_name_overwrite"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text('{"mine": "hand-written"}')
        (target.parent / "notes.txt").write_text("my notes")
    elif name in ("own", "own_edited"):
        writer.run(location, overwrite=False)  # the earlier run
        if not isinstance(writer, ConvertWriter):  # a converted folder holding a user's file is not only ours
            (target.parent / "notes.txt").write_text("my notes")  # the user keeps a file beside the outputs
        if name == "own_edited":
            target.write_bytes(target.read_bytes() + b" ")
    return location


def _not_ours(root: Path, record: str) -> dict[str, str]:
    from align_detr_hf.file_io import MANIFEST_NAME, is_own_output

    return {rel: digest for rel, digest in snapshot(root).items()
            if digest != "<dir>" and not rel.endswith(MANIFEST_NAME) and not is_own_output(root / rel, record)}


def run_cell(writer_name: str, placement: str, root: Path, monkeypatch, capsys) -> str:
    """Run one cell of the table and check its outcome; returns the outcome."""
    from align_detr_hf.file_io import OutputPathError

    expected = EXPECTED[writer_name][list(PLACEMENTS).index(placement)]
    if expected == NA:
        return NA
    (root / "inputs").mkdir(parents=True)
    monkeypatch.chdir(root)
    writer = WRITERS[writer_name]()
    writer.setup(root, monkeypatch)
    location = place(writer, placement, root)
    before, users = snapshot(root), _not_ours(root, writer.record)
    overwrite = placement == "same_name_overwrite"
    capsys.readouterr()
    try:
        writer.run(location, overwrite=overwrite)
        outcome = W
    except SystemExit as exit_info:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]
        assert exit_info.code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert re.search(r"error: refused to (write|replace) ", lines[0]), lines[0]
        outcome = R
    except OutputPathError as error:
        assert str(error).startswith("refused to ") and "\n" not in str(error)
        outcome = R
    assert outcome == expected, (writer_name, placement, outcome)
    if outcome == R:
        assert snapshot(root) == before
        return outcome
    writer.check(location)
    after = snapshot(root)
    asked = writer.target(location) if writer.file_output else location / writer.same_name
    changed = [rel for rel, digest in users.items()
               if after.get(rel) != digest and not (overwrite and root / rel == asked)]
    assert changed == [], f"{writer_name} at {placement} changed the user's files {changed}"
    assert not [rel for rel in after if re.search(r"(^|/)\.[^/]*(\.staging-|\.old-|\.tmp$)", rel)]
    return outcome


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("writer_name", list(WRITERS))
def test_every_writer_at_every_placement(writer_name, placement, tmp_path, monkeypatch, capsys):
    if EXPECTED[writer_name][list(PLACEMENTS).index(placement)] == NA:
        pytest.skip(f"{writer_name} reads no input")
    run_cell(writer_name, placement, tmp_path / "ws", monkeypatch, capsys)


def outcome_table() -> str:
    """The writers x placements table of the issue's closing note (the outcomes the test asserts)."""
    lines = ["| writer | " + " | ".join(PLACEMENTS.values()) + " |", "|---" * (len(PLACEMENTS) + 1) + "|"]
    for name, outcomes in EXPECTED.items():
        lines.append(f"| {name} | " + " | ".join(outcomes) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(outcome_table())


def test_trainer_copies_of_our_checkpoint_files_are_adopted(tmp_path):
    """A Trainer pushing from checkpoints copies their weights into output_dir; its final save_model() must not
    refuse those copies (ModelCardCallback.on_save adopts exact copies of our files, nothing else)."""
    import shutil
    from types import SimpleNamespace

    from align_detr_hf.file_io import OutputPathError
    from align_detr_hf.hub import ModelCardCallback

    out, model = tmp_path / "run", tiny_model()
    model.save_pretrained(out / "checkpoint-2")
    for name in ("config.json", "model.safetensors"):  # what Trainer._push_from_checkpoint does
        shutil.copy(out / "checkpoint-2" / name, out / name)
    (out / "preprocessor_config.json").write_text('{"mine": 1}')  # not a copy of ours: never adopted
    with pytest.raises(OutputPathError, match=r"refused to replace .*config\.json: align-detr did not write it"):
        model.save_pretrained(out)
    args = SimpleNamespace(output_dir=str(out), should_save=True, hub_model_id=None)
    ModelCardCallback().on_save(args, SimpleNamespace(global_step=2), None)
    model.save_pretrained(out)  # the final save over the adopted copies
    with pytest.raises(OutputPathError, match=r"preprocessor_config\.json: align-detr did not write it"):
        AlignDetrImageProcessor().save_pretrained(out)


def test_the_manifest_is_not_uploaded(tmp_path, monkeypatch):
    import fnmatch

    from align_detr_hf import hub
    from align_detr_hf.file_io import MANIFEST_NAME

    uploads = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            uploads.append(sorted(p.name for p in Path(folder_path).iterdir()
                                  if not any(fnmatch.fnmatch(p.name, pattern) for pattern in ignore_patterns)))

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub.ModelCard, "load", staticmethod(lambda repo_id, token=None: (_ for _ in ()).throw(
        hub.EntryNotFoundError("none"))))
    save_like_a_training_script(tmp_path / "m")
    assert (tmp_path / "m" / MANIFEST_NAME).is_file()
    hub.push_folder_to_hub(tmp_path / "m", "org/m")
    tiny_model().push_to_hub("org/m")
    assert all("config.json" in names and MANIFEST_NAME not in names for names in uploads) and len(uploads) == 2
