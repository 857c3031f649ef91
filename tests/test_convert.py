"""Checkpoint conversion: the command line, integrity checks, clear errors, and nothing written on failure."""

import hashlib
import shutil

import pytest
import torch

from align_detr_hf import AlignDetrForObjectDetection
from align_detr_hf.cli import main as cli
from align_detr_hf.convert_align_detr import ConversionError, convert_state_dict, load_checkpoint


def _save_like_mmdet(state_dict, folder, name="align_detr-small_20230914_095734"):
    """Write {'meta', 'state_dict'} and rename the file with its sha256 prefix, as publish_model.py does."""
    path = folder / f"{name}.pth"
    torch.save({"meta": {"epoch": 12, "dataset_meta": {"classes": ("person",)}}, "state_dict": state_dict}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return path.rename(folder / f"{name}-{digest}.pth")


@pytest.fixture(scope="module")
def small_checkpoint(small_state_dict, tmp_path_factory):
    return _save_like_mmdet(small_state_dict, tmp_path_factory.mktemp("ckpt"))


def test_cli_converts_and_verifies_a_checkpoint(small_checkpoint, small_model, small_inputs, tmp_path):
    out = tmp_path / "converted"
    cli(["convert", "--checkpoint", str(small_checkpoint), "--output-dir", str(out), "--verify",
         "--num-denoising-queries", "20"])  # fmt: skip
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    model = AlignDetrForObjectDetection.from_pretrained(out).eval()
    assert model.config.num_denoising_queries == 20 and model.config.num_gt_repeat == [2, 1, 2]
    with torch.no_grad():
        ours = model(small_inputs["pixel_values"], small_inputs["pixel_mask"].long())
        reference = small_model(small_inputs["pixel_values"], small_inputs["pixel_mask"].long())
    assert torch.equal(ours.logits, reference.logits)


def test_wrong_sha256_prefix_is_refused_and_nothing_is_written(small_checkpoint, tmp_path):
    renamed = tmp_path / small_checkpoint.name.replace(small_checkpoint.stem[-8:], "00000000")
    shutil.copy(small_checkpoint, renamed)
    with pytest.raises(ConversionError, match="does not match the prefix 00000000"):
        load_checkpoint(renamed)
    with pytest.raises(SystemExit):
        cli(["convert", "--checkpoint", str(renamed), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_gives_a_clear_error_and_keeps_the_old_output(small_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(small_checkpoint.read_bytes()[: 100_000])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous conversion")
    with pytest.raises(ConversionError, match="Could not read .*truncated.pth"):
        load_checkpoint(truncated)
    with pytest.raises(SystemExit):
        cli(["convert", "--checkpoint", str(truncated), "--output-dir", str(out)])
    assert (out / "keep.txt").read_text() == "previous conversion"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []  # no staging left behind


def test_checkpoint_of_another_architecture_is_named_as_such(tmp_path):
    classifier = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    path = tmp_path / "resnet50.pth"
    torch.save(classifier, path)
    with pytest.raises(ConversionError, match="Not an mmdetection Align-DETR/DINO checkpoint"):
        cli_convert_state_dict(load_checkpoint(path))


def cli_convert_state_dict(state_dict):
    from align_detr_hf.convert_align_detr import load_converted

    return load_converted(state_dict)


def test_extra_and_missing_keys_are_listed(small_state_dict, small_model):
    extra = dict(small_state_dict, **{"bbox_head.mystery.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"1 checkpoint keys have no Align-DETR counterpart.*bbox_head.mystery"):
        convert_state_dict(extra, small_model.config)
    missing = dict(small_state_dict)
    del missing["decoder.layers.1.norms.2.bias"]
    with pytest.raises(ConversionError, match=r"missing \['model.decoder.layers.1.final_layer_norm.bias'\]"):
        cli_convert_state_dict(missing)


def test_batchnorm_counters_are_ignored(small_state_dict, small_model):
    with_counters = dict(small_state_dict, **{"backbone.bn1.num_batches_tracked": torch.tensor(5)})
    assert convert_state_dict(with_counters, small_model.config).keys() == convert_state_dict(
        small_state_dict, small_model.config
    ).keys()
