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
FAST_DEMO = ["--quiet", "--num_train_images", "2", "--num_val_images", "1", "--steps", "1", "--image_size", "64",
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
