"""End-to-end training scripts on a tiny synthetic dataset: DDP normaliser agreement, exact resume, Trainer + mAP."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align_detr_hf.training_run import ACCELERATE_CHECKPOINTS, RunFolder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# ~0.1 M-parameter model on 48-64 px images: a few seconds per run
TINY = ["--synthetic_shapes", "12", "--synthetic_image_size", "64", "--demo_model", "--d_model", "32",
        "--num_queries", "10", "--image_scale", "0.08", "--warmup_steps", "2", "--seed", "3"]


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and friendly to a 2-core runner
    yield
    torch.set_num_threads(previous)


def test_accelerate_ddp_two_processes_agree_on_normaliser(tmp_path):
    # In accelerate 1.x `accelerate launch --cpu --num_processes 2` starts a *single* process (its simple launcher);
    # two CPU processes need torchrun (`--multi_gpu`) plus ACCELERATE_USE_CPU=true, which makes each process use
    # the gloo backend (DistributedType.MULTI_CPU).
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate) if accelerate.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(EXAMPLES / "train_accelerate.py"), *TINY, "--output_dir", str(tmp_path), "--max_train_steps", "3",
           "--per_device_train_batch_size", "2", "--checkpointing_steps", "100",
           "--debug_log_normaliser"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "debug" / f"normaliser_rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    rec0, rec1 = ranks[0]["records"], ranks[1]["records"]
    assert len(rec0) == len(rec1) == 3
    differing = 0
    for a, b in zip(rec0, rec1):
        assert a["reduced"] == pytest.approx(b["reduced"])  # both ranks use the same normaliser
        # ... which is the mean of the two ranks' own GT counts (matching and denoising)
        assert a["reduced"] == pytest.approx([(x + y) / 2 for x, y in zip(a["local"], b["local"])])
        differing += a["local"][0] != b["local"][0]
    assert differing > 0, "the ranks saw the same GT counts; the test would not detect a missing all_reduce"
    # the distributed run also evaluated (results gathered from both ranks) and wrote one checkpoint with both
    # ranks' RNG states
    assert "map" in json.loads((tmp_path / "train_results.json").read_text())["metrics"]
    assert (tmp_path / "checkpoints" / "step_0000003" / "random_states_1.pkl").exists()
    # every validation image once in the final evaluation's report (gathered per batch from both ranks)
    report = json.loads((tmp_path / "final" / "evaluation" / "evaluation.json").read_text())
    assert report["metrics"] == json.loads((tmp_path / "train_results.json").read_text())["metrics"]
    assert report["num_images_with_detections"] == report["num_images"] == 3


def _final_weights(output_dir):
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def test_resume_continues_exactly(tmp_path):
    script = _load_example("train_accelerate")
    # 12 images, batch 2, accumulation 2 -> 3 optimizer steps per epoch; the stop at step 4 is in the middle of the
    # second epoch (so the skipped batches must come from that epoch's shuffle) and the resumed part crosses an epoch
    # boundary (with its COCO evaluation); the reference augmentation is on
    common = [*TINY, "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--max_train_steps", "7", "--checkpointing_steps", "2"]
    script.main([*common, "--output_dir", str(tmp_path / "full")])
    script.main([*common, "--output_dir", str(tmp_path / "resumed"), "--stop_after_steps", "4"])
    interrupted = _final_weights(tmp_path / "resumed")
    state = json.loads((tmp_path / "resumed" / "checkpoints" / "step_0000004" / "training_state.json").read_text())
    assert state == {"completed_steps": 4, "epoch": 1, "batches_in_epoch": 2, "micro_step": 8}
    script.main([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"])

    full, resumed = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    assert any(not torch.equal(interrupted[k], full[k]) for k in full)  # training did continue
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    results = json.loads((tmp_path / "resumed" / "train_results.json").read_text())
    assert results["completed_steps"] == 7 and "map" in results["metrics"]


def test_trainer_steps_with_coco_eval(tmp_path):
    script = _load_example("train_trainer")
    metrics = script.main([*TINY, "--output_dir", str(tmp_path), "--max_steps", "3", "--per_device_train_batch_size",
                           "4", "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "no",
                           "--logging_steps", "1"])
    for key in ("eval_map", "eval_map_50", "eval_map_75", "eval_mar_100", "eval_loss"):
        assert key in metrics
    assert 0.0 <= metrics["eval_map"] <= 1.0
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "final" / "preprocessor_config.json").exists()
    # the final evaluation's pictures, linked from the final model's card
    card = (tmp_path / "final" / "README.md").read_text()
    for name in ("per_class_ap.png", "pr_curves.png", "confusion.png"):
        assert (tmp_path / "final" / "evaluation" / name).is_file()
        assert f"](evaluation/{name})" in card
    report = json.loads((tmp_path / "final" / "evaluation" / "evaluation.json").read_text())
    assert report["metrics"]["map"] == metrics["eval_map"]


def test_reference_optimizer_groups():
    from align_detr_hf import AlignDetrForObjectDetection
    from align_detr_hf.demo import demo_config
    from align_detr_hf.optim import build_optimizer, build_scheduler, lr_factor

    model = AlignDetrForObjectDetection(demo_config({0: "a"}, d_model=32, num_queries=5))
    optimizer = build_optimizer(model)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["transformer"]["lr"] == pytest.approx(1e-4)
    assert groups["transformer_norm"]["weight_decay"] == 0.0 and groups["transformer"]["weight_decay"] == 1e-4
    names = {id(p): n for n, p in model.named_parameters()}
    norm_names = [names[id(p)] for p in groups["transformer_norm"]["params"]]
    assert any("layer_norm" in n for n in norm_names) and any("input_proj" in n for n in norm_names)
    assert not any(n.endswith("level_embed") for n in norm_names)
    assert lr_factor(0) == pytest.approx(1e-4) and lr_factor(2000) == 1.0
    assert lr_factor(5000, milestones=[4000]) == pytest.approx(0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=10, milestones=[20])
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    assert groups["transformer"]["lr"] == pytest.approx(1e-5)  # base lr x 0.1 after the milestone
    assert groups["backbone"]["lr"] == pytest.approx(1e-6)


def test_demo_runs_end_to_end(tmp_path):
    from align_detr_hf.demo import main

    # a smoke test of the demo pipeline (data generation, training, COCO eval, PNG, save); ~20 s
    result = main(["--output_dir", str(tmp_path), "--num_train_images", "40", "--num_val_images", "8",
                   "--max_steps", "10", "--quiet"])
    assert (tmp_path / "detections.png").exists() and "map" in result["metrics"]


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_is_exact(tmp_path):
    """A real SIGKILL while the step-4 checkpoint is being written: the step-2 checkpoint stays loadable, and
    resuming from it ends with exactly the weights of an uninterrupted run."""
    script = _load_example("train_accelerate")
    common = [*TINY, "--per_device_train_batch_size", "2", "--max_train_steps", "6", "--checkpointing_steps", "2"]
    script.main([*common, "--output_dir", str(tmp_path / "full")])

    killed_dir = tmp_path / "killed"
    child = f"""
import importlib.util, os, signal, sys, torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("train_accelerate", {str(EXAMPLES / "train_accelerate.py")!r})
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
real_save = script.save_checkpoint

def save_then_die(accelerator, folder, run, state, total_limit):
    if state["completed_steps"] == 4:
        write = accelerator.save_state

        def partial_write(path):
            write(path)
            os.kill(os.getpid(), signal.SIGKILL)  # after the files, before the rename

        accelerator.save_state = partial_write
    return real_save(accelerator, folder, run, state, total_limit)

script.save_checkpoint = save_then_die
script.main({[*common, "--output_dir", str(killed_dir)]!r})
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == -9, result.stderr[-2000:]
    checkpoints = killed_dir / "checkpoints"
    assert (checkpoints / ".tmp-step_0000004").is_dir() and not (checkpoints / "step_0000004").exists()
    assert [p.name for p in RunFolder(killed_dir, ACCELERATE_CHECKPOINTS).checkpoints()] == ["step_0000002"]

    script.main([*common, "--output_dir", str(killed_dir), "--resume_from_checkpoint", "latest"])
    full, resumed = _final_weights(tmp_path / "full"), _final_weights(killed_dir)
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_accelerate_run_shorter_than_one_epoch_is_evaluated_at_its_end(tmp_path, capsys):
    """12 images in batches of 2 = 6 steps per epoch; a 3-step run ends inside epoch 0 and still reports COCO mAP."""
    script = _load_example("train_accelerate")
    steps = script.main([*TINY, "--per_device_train_batch_size", "2", "--max_steps", "3", "--dataloader_num_workers",
                         "0", "--checkpointing_steps", "100", "--output_dir", str(tmp_path)])
    assert steps == 3
    results = json.loads((tmp_path / "train_results.json").read_text())
    assert results["completed_steps"] == 3 and set(results["metrics"]) >= {"map", "map_50"}
    assert 0.0 <= results["metrics"]["map"] <= 1.0
    assert "step 3: map " in capsys.readouterr().out
