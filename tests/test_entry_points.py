"""The three entry points (the `align-detr` CLI, train_trainer.py, train_accelerate.py) and the demo speak one
vocabulary of flags, each with help; old spellings still work with a note; and the first-use edges (issue 30)."""

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import align_detr_hf
from align_detr_hf import cli, demo

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Parser(Exception):
    pass


def _script_parser(name, monkeypatch):
    """The ArgumentParser a script builds in parse_args (caught as it starts parsing)."""
    module = _load_example(name)

    def catch(self, args=None, namespace=None):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parser) as caught:
        module.parse_args([])
    monkeypatch.undo()
    return caught.value.args[0]


@pytest.fixture(scope="module")
def parsers():
    with pytest.MonkeyPatch.context() as mp:
        found = {"train_trainer.py": _script_parser("train_trainer", mp)}
    with pytest.MonkeyPatch.context() as mp:
        found["train_accelerate.py"] = _script_parser("train_accelerate", mp)
    found["align-detr demo"] = demo.build_parser()
    root = cli.build_parser()
    found["align-detr"] = root
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name != "demo":  # parsed by demo.build_parser
                    found[f"align-detr {name}"] = sub
    return found


def _flags(parser):
    return {o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS}


def test_every_flag_of_every_entry_point_has_help(parsers):
    missing = [f"{name}: {a.option_strings or a.dest}" for name, p in parsers.items() for a in p._actions
               if not a.help]
    assert not missing, missing


def test_shared_flags_have_one_name_everywhere(parsers):
    trainer, accelerate, demo_flags = (_flags(parsers[n]) for n in
                                       ("train_trainer.py", "train_accelerate.py", "align-detr demo"))
    convert, predict = _flags(parsers["align-detr convert"]), _flags(parsers["align-detr predict"])
    export = _flags(parsers["align-detr export"])
    for flag in ("--max_steps", "--per_device_train_batch_size", "--learning_rate", "--warmup_steps", "--seed",
                 "--output_dir", "--d_model", "--num_queries", "--augment"):
        assert flag in trainer and flag in accelerate and flag in demo_flags, flag
    for flag in ("--overwrite_output_dir", "--push_to_hub", "--hub_model_id"):
        assert flag in trainer and flag in accelerate and flag in convert, flag
    for flag in ("--dataloader_num_workers", "--dataloader_pin_memory", "--save_total_limit", "--num_train_epochs",
                 "--resume_from_checkpoint", "--logging_steps", "--report_to", "--loss_type"):
        assert flag in trainer and flag in accelerate, flag
    assert "--model_name_or_path" in trainer & accelerate & predict & export
    assert "--output_dir" in convert and "--output_dir" in predict
    # every flag both scripts have is spelled the same (no --max_train_steps beside --max_steps)
    trainer_dests = {a.dest: set(a.option_strings) for a in parsers["train_trainer.py"]._actions}
    for action in parsers["train_accelerate.py"]._actions:
        if action.dest in trainer_dests and action.help != argparse.SUPPRESS and action.option_strings:
            assert set(action.option_strings) == trainer_dests[action.dest], action.dest
    # the CLI takes both spellings
    for flag in ("--output_dir", "--output-dir", "--top_k", "--top-k", "--no_draw", "--no-draw"):
        assert flag in predict, flag


@pytest.mark.parametrize("argv, dest, value, note", [
    (["--steps", "7"], "max_steps", 7, "--steps is deprecated; use --max_steps"),
    (["--lr", "0.001"], "learning_rate", 0.001, "--lr is deprecated; use --learning_rate"),
    (["--batch-size", "4"], "per_device_train_batch_size", 4, "--batch-size is deprecated"),
    (["--max-steps", "9"], "max_steps", 9, None),
])
def test_the_demo_takes_old_spellings_with_a_note(argv, dest, value, note, capsys):
    args = demo.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert getattr(args, dest) == value
    assert (note in err) if note else err == ""


def test_the_scripts_and_cli_take_old_spellings_with_a_note(capsys):
    accelerate = _load_example("train_accelerate")
    args = accelerate.parse_args(["--output_dir", "o", "--max_train_steps", "3", "--num_workers", "0",
                                  "--no-pin_memory", "--checkpoints_total_limit", "1"])
    assert (args.max_steps, args.dataloader_num_workers, args.dataloader_pin_memory, args.save_total_limit) == (
        3, 0, False, 1)
    err = capsys.readouterr().err
    assert "--max_train_steps is deprecated; use --max_steps" in err
    assert "--no-pin_memory is deprecated; use --no-dataloader_pin_memory" in err
    parser = cli.build_parser()
    args = parser.parse_args(["convert", "--checkpoint", "c.pth", "--output-dir", "o", "--overwrite"])
    assert args.output_dir == "o" and args.overwrite_output_dir is True
    assert "deprecated" not in capsys.readouterr().err  # every writer takes --overwrite, the refusals name it
    args = parser.parse_args(["predict", "x.png", "--model", "m", "--output", "out", "--top-k", "3"])
    assert (args.model_name_or_path, args.output_dir, args.top_k) == ("m", "out", 3)
    assert "--output is deprecated; use --output_dir" in capsys.readouterr().err


def test_convert_push_to_hub_takes_the_repo_either_way():
    parser = cli.build_parser()
    base = ["convert", "--checkpoint", "c.pth", "--output_dir", "o"]
    assert cli._hub_repo(parser.parse_args(base)) is None
    assert cli._hub_repo(parser.parse_args([*base, "--push_to_hub", "--hub_model_id", "me/m"])) == "me/m"
    assert cli._hub_repo(parser.parse_args([*base, "--push-to-hub", "me/old"])) == "me/old"
    with pytest.raises(ValueError, match="--push_to_hub needs a repository: --hub_model_id"):
        cli._hub_repo(parser.parse_args([*base, "--push_to_hub"]))


def test_version_is_the_installed_distributions():
    try:
        expected = importlib.metadata.version("align-detr-hf")
    except importlib.metadata.PackageNotFoundError:
        expected = "0.0.0+unknown"
    assert align_detr_hf.__version__ == expected and "__version__" in align_detr_hf.__all__


def test_example_predict_help_needs_no_model_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MODEL_DIR"}
    run = subprocess.run([sys.executable, str(EXAMPLES / "predict.py"), "--help"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and "MODEL_DIR" in run.stdout and "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, str(EXAMPLES / "predict.py")], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: give MODEL_DIR_OR_HUB_ID (or set MODEL_DIR in the environment)" in run.stderr
