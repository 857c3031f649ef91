"""One run identity per training output folder (`align_detr_hf.training_run`): refusal of another run's folder,
rotation of this run's checkpoints only, `latest` of this run only, damaged checkpoints and non-finite losses refused
in one line; for the folder logic itself, a toy Trainer, and both example scripts."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from align_detr_hf import StopOnNonFiniteLossCallback, TrainingRunCallback
from align_detr_hf.training_run import (
    ACCELERATE_CHECKPOINTS,
    TRAINER_CHECKPOINTS,
    RunFolder,
    RunRecord,
    TrainingRunError,
    data_fingerprint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# the tiny synthetic job of test_training.py, without evaluation: about a second per run
TINY = ["--synthetic_shapes", "12", "--synthetic_image_size", "64", "--demo_model", "--d_model", "32",
        "--num_queries", "10", "--image_scale", "0.08", "--warmup_steps", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH":
       os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(run_id, **fields):
    return RunRecord(run_id=run_id, started="2025-01-01T00:00:00+00:00", **{"seed": 3, "batch_size": 2, **fields})


def _checkpoint(folder: RunFolder, step: int, run_id: str | None, name: str | None = None) -> Path:
    """A complete fake checkpoint (marker file), tagged with `run_id` unless None."""
    name = name or (f"step_{step:07d}" if folder.layout is ACCELERATE_CHECKPOINTS else f"checkpoint-{step}")
    path = folder.checkpoint_root / name
    path.mkdir(parents=True)
    (path / folder.layout.marker).write_text("{}")
    if run_id:
        _record(run_id).write(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The folder rules
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [ACCELERATE_CHECKPOINTS, TRAINER_CHECKPOINTS], ids=["accelerate", "trainer"])
def test_rotation_deletes_only_this_runs_older_checkpoints(tmp_path, layout):
    folder = RunFolder(tmp_path, layout)
    others = [_checkpoint(folder, step, "a") for step in (5, 6)]  # a finished run: higher steps
    legacy = _checkpoint(folder, 4, None)  # no identity (an older version, or copied in)
    user = folder.checkpoint_root / ("step_0000000" if layout is ACCELERATE_CHECKPOINTS else "checkpoint-0")
    user.mkdir()
    (user / "notes.txt").write_text("mine")  # a user's folder that only looks like a checkpoint
    own = [_checkpoint(folder, step, "b") for step in (1, 2, 3)]
    assert folder.checkpoints("b") == own and folder.checkpoints() == [*own, legacy, *others]
    assert folder.rotate("b", total_limit=2) == [own[0]]
    assert [p.exists() for p in own] == [False, True, True]
    assert all(p.exists() for p in [*others, legacy, user])
    # the best checkpoint is kept as well as the newest, as Trainer does
    assert folder.rotate("b", total_limit=1, keep=(str(own[1]),)) == []
    assert folder.rotate("b", total_limit=1) == [own[1]] and own[2].exists()


def test_new_run_refuses_a_folder_with_another_runs_final_model_or_checkpoints(tmp_path):
    folder = RunFolder(tmp_path / "out", ACCELERATE_CHECKPOINTS)
    folder.check(None, overwrite=False)  # a folder that does not exist yet
    folder.output_dir.mkdir()
    (folder.output_dir / "notes.txt").write_text("a user's file is no training output")
    folder.check(None, overwrite=False)
    (folder.output_dir / "final").mkdir()
    with pytest.raises(TrainingRunError, match=r"holds another run's final model or checkpoints \(final\)") as error:
        folder.check(None, overwrite=False)
    assert "\n" not in str(error.value) and "--overwrite_output_dir" in str(error.value)
    folder.check(None, overwrite=True)
    checkpoint = _checkpoint(folder, 2, "a")
    with pytest.raises(TrainingRunError, match=r"checkpoints/step_0000002, final"):
        folder.check(None, overwrite=False)
    # resuming run a is refused too while the folder is not a's (its final model is of an unknown run) ...
    with pytest.raises(TrainingRunError, match=r"\(final\)"):
        folder.check(checkpoint, overwrite=False)
    _record("a").write(folder.output_dir)
    folder.check(checkpoint, overwrite=False)  # ... and accepted once it is
    _checkpoint(folder, 3, "b")
    folder.check(checkpoint, overwrite=False)  # what a's folder holds was accepted when a started


def test_latest_resumes_only_the_folders_run_and_says_which(tmp_path):
    folder = RunFolder(tmp_path, ACCELERATE_CHECKPOINTS)
    logs = []
    assert folder.resume_target("latest", logs.append) is None and "No checkpoint of a run" in logs[-1]
    _checkpoint(folder, 6, "a")  # the finished run
    own = _checkpoint(folder, 2, "b")  # the interrupted run, whose folder it is now
    _record("b").write(tmp_path)
    assert folder.resume_target("latest", logs.append) == own
    assert folder.resume_target("true", logs.append) == own
    _record("c").write(tmp_path)  # a run interrupted before its first checkpoint
    assert folder.resume_target("latest", logs.append) is None and "No checkpoint of run c" in logs[-1]
    with pytest.raises(TrainingRunError, match="not a checkpoint"):
        folder.resume_target(str(tmp_path / "nowhere"))


def test_resume_keeps_the_identity_and_warns_about_changed_settings(tmp_path):
    folder = RunFolder(tmp_path, ACCELERATE_CHECKPOINTS)
    checkpoint = _checkpoint(folder, 2, None)
    _record("a", seed=3, batch_size=2, data_fingerprint="d1").write(checkpoint)
    _record("a").write(tmp_path)
    logs = []
    run = folder.start(checkpoint, overwrite=False, is_main=True, log=logs.append, seed=4, batch_size=2,
                       data_fingerprint="d2")
    assert run.run_id == "a" and run.started == "2025-01-01T00:00:00+00:00" and run.seed == 4
    warning = next(line for line in logs if line.startswith("Warning"))
    assert "seed 3 -> 4" in warning and "data_fingerprint 'd1' -> 'd2'" in warning and "batch_size" not in warning
    assert RunRecord.read(tmp_path) == run  # later resumes compare with the new settings
    logs.clear()
    assert folder.start(checkpoint, overwrite=False, is_main=True, log=logs.append, seed=3, batch_size=2,
                        data_fingerprint="d1").run_id == "a"
    assert not any(line.startswith("Warning") for line in logs)
    new = folder.start(None, overwrite=True, is_main=True, log=logs.append, seed=3, batch_size=2)
    assert new.run_id != "a" and len(new.run_id) == 12 and RunRecord.read(tmp_path) == new


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "training_state.json"])
def test_a_truncated_checkpoint_is_refused_in_one_line(tmp_path, damaged):
    folder = RunFolder(tmp_path, ACCELERATE_CHECKPOINTS)
    checkpoint = _checkpoint(folder, 2, "a")
    save_file({"w": torch.randn(64, 64)}, str(checkpoint / "model.safetensors"))
    torch.save({"state": torch.randn(64, 64)}, checkpoint / "optimizer.bin")
    (checkpoint / "training_state.json").write_text(json.dumps({"completed_steps": 2}))
    _record("a").write(tmp_path)
    assert folder.resume_target("latest") == checkpoint
    path = checkpoint / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(TrainingRunError, match=rf"checkpoint .*step_0000002 is incomplete or damaged \({damaged}: "):
        folder.resume_target("latest")
    with pytest.raises(TrainingRunError) as error:
        folder.resume_target(str(checkpoint))
    assert "\n" not in str(error.value)


def test_data_fingerprint_follows_the_records_not_the_folder():
    from align_detr_hf.data import DetectionDataset

    def dataset(folder, x=10.0):
        return DetectionDataset([{"image_id": 1, "width": 64, "height": 48, "file_name": f"{folder}/a.jpg",
                                  "annotations": [{"bbox": [x, 5.0, 20.0, 10.0], "category_id": 0, "area": 200.0,
                                                   "iscrowd": 0}]}], {0: "circle"})

    assert data_fingerprint(dataset("/data")) == data_fingerprint(dataset("/moved/data"))
    assert data_fingerprint(dataset("/data")) != data_fingerprint(dataset("/data", x=11.0))
    assert data_fingerprint([1, 2, 3]) is None


def test_checkpoint_write_is_atomic_and_tagged(tmp_path):
    class Acc:
        is_main_process = True
        fail = False

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_bytes(b"x" * 10)
            if self.fail:
                raise KeyboardInterrupt("killed during the write")

    folder, run = RunFolder(tmp_path, ACCELERATE_CHECKPOINTS), _record("a")
    acc = Acc()
    first = save_checkpoint(acc, folder, run, {"completed_steps": 1, "epoch": 0}, total_limit=2)
    assert RunRecord.read(first) == run
    acc.fail = True
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(acc, folder, run, {"completed_steps": 2, "epoch": 0}, total_limit=2)
    # the half-written one stays in a temp folder and is never picked for resuming
    assert folder.checkpoints() == [first]
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / ".tmp-step_0000002").is_dir() and not (checkpoints / "step_0000002").exists()
    assert json.loads((first / "training_state.json").read_text())["completed_steps"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# The Trainer callbacks, on a toy model
# ---------------------------------------------------------------------------------------------------------------------


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x, y):
        return {"loss": ((self.linear(x).squeeze(-1) - y) ** 2).mean()}


def _rows(n=8, nan_row=None):
    g = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(2, generator=g), "y": torch.randn((), generator=g)} for _ in range(n)]
    if nan_row is not None:
        rows[nan_row]["y"] = torch.tensor(float("nan"))  # a bad label, as a user's data may hold
    return rows


def _toy_trainer(output_dir, max_steps, save_total_limit=None, overwrite=False, rows=None, seed=0):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=1, save_total_limit=save_total_limit, report_to="none",
                             use_cpu=True, remove_unused_columns=False, seed=seed, logging_steps=1,
                             dataloader_num_workers=0, learning_rate=0.1)
    torch.manual_seed(seed)
    return Trainer(model=_Toy(), args=args, train_dataset=rows or _rows(),
                   callbacks=[TrainingRunCallback(overwrite), StopOnNonFiniteLossCallback()])


def test_trainer_callback_rotates_only_its_run_and_refuses_another_runs_resume(tmp_path):
    out = tmp_path / "out"
    _toy_trainer(out, max_steps=3, save_total_limit=2).train()
    first_run = RunRecord.read(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    with pytest.raises(TrainingRunError, match=r"holds another run's .*checkpoint-2, checkpoint-3"):
        _toy_trainer(out, max_steps=1, save_total_limit=1).train()
    # a second run told to write there: Trainer's own rotation (save_total_limit=1, the newest by step kept) would
    # delete its new checkpoint-1 right after writing it, since the other run's steps are higher
    second = _toy_trainer(out, max_steps=1, save_total_limit=1, overwrite=True, seed=1)
    second.train()
    assert second.args.save_total_limit == 1  # lent to the callback during training, given back
    second_run = RunRecord.read(out)
    assert second_run.run_id != first_run.run_id
    assert RunRecord.read(out / "checkpoint-1") == second_run
    assert RunRecord.read(out / "checkpoint-3").run_id == first_run.run_id
    # resume_from_checkpoint=True: Trainer picks checkpoint-3, of the other run
    with pytest.raises(TrainingRunError, match=r"picked .*checkpoint-3, which is not of run .*checkpoint-1 by its path"):
        _toy_trainer(out, max_steps=2, save_total_limit=1).train(resume_from_checkpoint=True)


def test_trainer_stops_on_a_nan_loss_before_the_weights_change(tmp_path):
    trainer = _toy_trainer(tmp_path, max_steps=4, rows=_rows(8, nan_row=5))
    with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradients at step \d; .*weights untouched"):
        trainer.train()
    assert trainer.state.global_step < 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    for checkpoint in tmp_path.glob("checkpoint-*"):  # every checkpoint written before the stop is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


# ---------------------------------------------------------------------------------------------------------------------
# The example scripts
# ---------------------------------------------------------------------------------------------------------------------


def _final_weights(output_dir):
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_accelerate_second_run_in_a_finished_runs_folder(tmp_path, capsys):
    """Issue 21, case 2: a new run in the folder of a finished one is refused; told to write there, it keeps its own
    checkpoints (the finished run's steps sort higher), and `latest` after its interruption resumes it, not the other
    run, ending with the weights of its uninterrupted twin. A truncated checkpoint is then refused in one line."""
    script = _load_example("train_accelerate")
    common = [*TINY, "--per_device_train_batch_size", "2", "--checkpointing_steps", "2", "--no_eval"]
    out = tmp_path / "out"
    script.main([*common, "--seed", "3", "--max_train_steps", "6", "--output_dir", str(out)])
    first = RunRecord.read(out)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000004", "step_0000006"]

    second = [*common, "--seed", "4", "--max_train_steps", "4", "--checkpoints_total_limit", "1"]
    refused = subprocess.run([sys.executable, str(EXAMPLES / "train_accelerate.py"), *second, "--output_dir", str(out)],
                             capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith(f"error: {out} holds another run's final model")
    assert RunRecord.read(out) == first  # nothing was written

    script.main([*second, "--output_dir", str(out), "--overwrite_output_dir", "--stop_after_steps", "2"])
    run = RunRecord.read(out)
    assert run.run_id != first.run_id and run.seed == 4
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    assert RunRecord.read(checkpoints / "step_0000002") == run
    assert RunRecord.read(checkpoints / "step_0000006") == first

    capsys.readouterr()
    script.main([*second, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert f"Run {run.run_id}: resumed from {checkpoints / 'step_0000002'}" in capsys.readouterr().out
    script.main([*second, "--output_dir", str(tmp_path / "twin")])
    _assert_same_weights(_final_weights(tmp_path / "twin"), _final_weights(out))
    # rotation (limit 1) removed only this run's step 2; its step 4 replaced the other run's, whose step 6 is kept
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000004", "step_0000006"]
    assert RunRecord.read(checkpoints / "step_0000004") == RunRecord.read(out)

    model_file = checkpoints / "step_0000004" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(TrainingRunError, match=r"step_0000004 is incomplete or damaged \(model.safetensors: "):
        script.main([*second, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])


def test_accelerate_nan_loss_leaves_no_final_model(tmp_path):
    script = _load_example("train_accelerate")
    with pytest.raises(FloatingPointError, match="Non-finite loss"):
        script.main([*TINY, "--per_device_train_batch_size", "2", "--max_train_steps", "4", "--no_eval",
                     "--learning_rate", "1e12", "--checkpointing_steps", "1", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "final").exists()
    for checkpoint in RunFolder(tmp_path, ACCELERATE_CHECKPOINTS).checkpoints():
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())


TRAINER_TINY = [*TINY, "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_strategy", "steps",
                "--save_steps", "1", "--save_total_limit", "1", "--dataloader_num_workers", "0"]


def test_trainer_script_second_run_in_a_finished_runs_folder(tmp_path, capsys):
    script = _load_example("train_trainer")
    out = tmp_path / "out"
    script.main([*TRAINER_TINY, "--seed", "3", "--max_steps", "2", "--output_dir", str(out)])
    first = RunRecord.read(out)
    # (the lr drop is set by epoch, so that the interrupted run, given 1 step, has the same schedule as its twin)
    second = [*TRAINER_TINY, "--seed", "4", "--lr_drop_epochs", "5"]
    with pytest.raises(TrainingRunError, match=r"holds another run's final model or checkpoints \(checkpoint-2, final\)"):
        script.main([*second, "--max_steps", "2", "--output_dir", str(out)])
    # told to write there, an interrupted second run (1 of 2 steps) keeps its checkpoint-1 beside the other's
    script.main([*second, "--max_steps", "1", "--output_dir", str(out), "--overwrite_output_dir"])
    run = RunRecord.read(out)
    assert run.run_id != first.run_id
    assert RunRecord.read(out / "checkpoint-1") == run and RunRecord.read(out / "checkpoint-2") == first
    capsys.readouterr()
    script.main([*second, "--max_steps", "2", "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert f"Run {run.run_id}: resumed from {out / 'checkpoint-1'}" in capsys.readouterr().out
    script.main([*second, "--max_steps", "2", "--output_dir", str(tmp_path / "twin")])
    _assert_same_weights(_final_weights(tmp_path / "twin"), _final_weights(out))


def test_trainer_script_nan_loss_exits_non_zero_without_final_model(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_trainer.py"), *TRAINER_TINY, "--max_steps", "4", "--learning_rate",
         "1e12", "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: Non-finite loss or gradients at step ")
    assert not (tmp_path / "final").exists()
    for checkpoint in tmp_path.glob("checkpoint-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "model.safetensors")).values())
