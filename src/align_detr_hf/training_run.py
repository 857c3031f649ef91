"""One identity per training run in an output folder, and what a run may write, delete, resume and save.

A run writes `run.json` ([`RunRecord`]: a random id, start time, seed, batch size, data fingerprint, model source,
command) into its output folder and into every checkpoint it saves. The rules, the same for both example scripts
(Accelerate: `checkpoints/step_N`; Trainer: `checkpoint-N`, through [`TrainingRunCallback`]):

- a new run refuses a folder that holds a final model or checkpoints of another run, unless `overwrite_output_dir`
  (then same-named outputs are replaced and the others kept, never rotated);
- rotation deletes only the run's own older checkpoints: never another run's, never a folder it did not tag;
- `latest` resumes the newest checkpoint of the folder's run and says which; a damaged one is refused in one line;
- resuming with another seed, batch size or data *warns*: the weights and optimizer state are still valid (e.g. a
  resume on fewer GPUs is legitimate), only the exact replay of the data order is lost, and the warning says so;
- non-finite weights are never saved: [`check_finite_weights`] before a save, [`StopOnNonFiniteLossCallback`] stops a
  Trainer before the optimizer step that a non-finite loss would poison (as the Accelerate script does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import uuid
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import TrainerCallback

from .file_io import atomic_write_text

__all__ = [
    "ACCELERATE_CHECKPOINTS",
    "TRAINER_CHECKPOINTS",
    "CheckpointLayout",
    "RunFolder",
    "RunRecord",
    "StopOnNonFiniteLossCallback",
    "TrainingRunCallback",
    "TrainingRunError",
    "check_finite_weights",
    "data_fingerprint",
    "exit_on_error",
    "save_checkpoint",
    "verify_checkpoint",
]

RUN_FILE = "run.json"
FINAL_DIR = "final"
# what the exact replay of a run depends on: a resume that changes one of them warns
RESUME_FIELDS = ("seed", "batch_size", "num_processes", "gradient_accumulation_steps", "data_fingerprint")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a truncated file has lost its central directory


class TrainingRunError(ValueError):
    """A refused output folder or an unusable checkpoint; the message is one line naming the path and the way out."""


@dataclass(frozen=True)
class RunRecord:
    """The identity of one training run (`run.json`)."""

    run_id: str
    started: str
    seed: int
    batch_size: int
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    data_fingerprint: str | None = None
    model_source: str | None = None
    command: str = ""

    @classmethod
    def read(cls, folder: str | os.PathLike) -> RunRecord | None:
        """The record in `folder`, or None (none, or unreadable: then nothing there counts as this run's)."""
        try:
            data = json.loads((Path(folder) / RUN_FILE).read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def write(self, folder: str | os.PathLike) -> None:
        atomic_write_text(Path(folder) / RUN_FILE, json.dumps(dataclasses.asdict(self), indent=2))

    def differences(self, previous: RunRecord) -> list[str]:
        return [f"{name} {getattr(previous, name)!r} -> {getattr(self, name)!r}" for name in RESUME_FIELDS
                if getattr(previous, name) != getattr(self, name)]


def _shared_run_id() -> str:
    """A random id, the same on every process (rank 0's)."""
    run_id = [uuid.uuid4().hex[:12]]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(run_id, src=0)
    return run_id[0]


def data_fingerprint(dataset) -> str | None:
    """A short hash of a [`DetectionDataset`]'s classes and records (file base names, sizes, boxes, categories), so
    that moving the data folder keeps it; None for datasets without `records`."""
    records = getattr(dataset, "records", None)
    if records is None:
        return None
    digest = hashlib.sha256(json.dumps(getattr(dataset, "id2label", {}), sort_keys=True).encode())
    for r in records:
        source = Path(str(r["file_name"])).name if "file_name" in r else r.get("hf_index")
        annotations = [(a["category_id"], a["bbox"], a.get("iscrowd", 0)) for a in r.get("annotations", [])]
        digest.update(json.dumps([r.get("image_id"), r.get("width"), r.get("height"), source, annotations]).encode())
    return digest.hexdigest()[:16]


def verify_checkpoint(path: str | os.PathLike) -> Path:
    """Raise [`TrainingRunError`] (one line) if a file of the checkpoint is truncated or damaged: safetensors
    headers against the file size, torch.save zip directories, json files. Nothing is loaded."""
    from safetensors import safe_open

    path = Path(path)
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix in (".bin", ".pt", ".pth", ".pkl"):
                with open(file, "rb") as f:
                    is_zip = f.read(4) == _ZIP_MAGIC
                if is_zip:
                    zipfile.ZipFile(file).close()
        except Exception as error:  # noqa: BLE001 - every reader's error means the same: unusable
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise TrainingRunError(
                f"checkpoint {path} is incomplete or damaged ({file.name}: {reason}); resume from an earlier "
                "checkpoint (pass its path) or start a new run."
            ) from None
    return path


def check_finite_weights(model: torch.nn.Module, what: str = "the model") -> None:
    """Raise `FloatingPointError` naming the first parameter or buffer with NaN/inf, so it is never saved."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"Non-finite weights in {name}; {what} is not saved. Lower the learning rate or "
                                     "check the data.")


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a training loop puts its checkpoints: `folder` (inside the output folder), the name `pattern` (one
    group: the step) and the `marker` file that only a complete checkpoint holds."""

    folder: str
    pattern: str
    marker: str

    def step(self, path: Path) -> int | None:
        match = re.fullmatch(self.pattern, path.name)
        return int(match.group(1)) if match and (path / self.marker).is_file() else None


ACCELERATE_CHECKPOINTS = CheckpointLayout("checkpoints", r"step_(\d+)", "training_state.json")
TRAINER_CHECKPOINTS = CheckpointLayout(".", r"checkpoint-(\d+)", "trainer_state.json")


class RunFolder:
    """A training output folder: its current run (`run.json`), its checkpoints and which run owns each."""

    def __init__(self, output_dir: str | os.PathLike, layout: CheckpointLayout):
        self.output_dir = Path(output_dir)
        self.layout = layout
        self.checkpoint_root = self.output_dir / layout.folder

    def checkpoints(self, run_id: str | None = None) -> list[Path]:
        """Complete checkpoints (with the marker file), oldest first; with `run_id`, only those of that run."""
        found = []
        if self.checkpoint_root.is_dir():
            for child in self.checkpoint_root.iterdir():
                step = self.layout.step(child)
                if step is not None and (run_id is None or _run_id(child) == run_id):
                    found.append((step, child))
        return [path for _, path in sorted(found)]

    def resume_target(self, spec: str | None, log=print) -> Path | None:
        """The checkpoint that `--resume_from_checkpoint spec` means: `latest` (or `true`) is the newest checkpoint of
        the folder's own run, None if it has none; anything else is a checkpoint path. Verified, never loaded."""
        if not spec:
            return None
        if spec.lower() in ("latest", "true"):
            run = RunRecord.read(self.output_dir)
            own = self.checkpoints(run.run_id) if run else []
            if not own:
                log(f"No checkpoint of {'run ' + run.run_id if run else 'a run'} in {self.output_dir}; starting a "
                    "new run.")
                return None
            path = own[-1]
        else:
            path = Path(spec)
            if not (path / self.layout.marker).is_file():
                raise TrainingRunError(f"--resume_from_checkpoint {spec}: not a checkpoint (no {self.layout.marker}).")
        return verify_checkpoint(path)

    def check(self, resume_from: Path | None, overwrite: bool) -> None:
        """Refuse the folder if it holds a final model or checkpoints of another run than the one resumed from (any
        run, for a new run), unless `overwrite`. A folder that is already the resumed run's passes: what else it holds
        was accepted when that run started."""
        run_id = _run_id(resume_from) if resume_from else None
        folder_run = RunRecord.read(self.output_dir)
        if run_id is not None and folder_run is not None and folder_run.run_id == run_id:
            return
        foreign = [p for p in self.checkpoints() if run_id is None or _run_id(p) != run_id]
        if (self.output_dir / FINAL_DIR).exists():
            foreign.append(self.output_dir / FINAL_DIR)
        if foreign and not overwrite:
            names = ", ".join(str(p.relative_to(self.output_dir)) for p in foreign[:3])
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise TrainingRunError(
                f"{self.output_dir} holds another run's final model or checkpoints ({names}{more}); choose another "
                "--output_dir, resume that run (--resume_from_checkpoint latest), or pass --overwrite_output_dir "
                "(same-named outputs are replaced, the others kept)."
            )

    def prepare(self, spec: str | None, overwrite: bool, log=print) -> Path | None:
        """Before anything is written: the checkpoint to resume from (see `resume_target`), the folder checked."""
        resume_from = self.resume_target(spec, log)
        self.check(resume_from, overwrite)
        return resume_from

    def start(self, resume_from: Path | None, *, overwrite: bool, is_main: bool, log=print, **fields) -> RunRecord:
        """The run this process continues: the resumed checkpoint's (same id; changed `RESUME_FIELDS` are warned
        about) or a new one. Checks the folder, then the main process writes the record. Call it on every process."""
        self.check(resume_from, overwrite)
        previous = RunRecord.read(resume_from) if resume_from else None
        fields.setdefault("command", shlex.join(sys.argv))
        if previous is None:
            run = RunRecord(run_id=_shared_run_id(), started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            **fields)
        else:
            run = RunRecord(run_id=previous.run_id, started=previous.started, **fields)
            changed = run.differences(previous)
            if changed:
                log(f"Warning: resuming run {run.run_id} with other settings ({'; '.join(changed)}): the weights and "
                    "optimizer state continue, but the data order is not the one of the interrupted run.")
        if is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            run.write(self.output_dir)
        log(f"Run {run.run_id}: " + (f"resumed from {resume_from}" if resume_from else f"new, in {self.output_dir}"))
        return run

    def rotate(self, run_id: str, total_limit: int | None, keep: tuple = ()) -> list[Path]:
        """Delete this run's oldest checkpoints beyond `total_limit` (the newest and `keep` are never deleted)."""
        own = self.checkpoints(run_id)
        if not total_limit or total_limit <= 0 or len(own) <= total_limit:
            return []
        kept = {own[-1].resolve(), *(Path(p).resolve() for p in keep if p)}
        deletable = [p for p in own if p.resolve() not in kept]
        deleted = deletable[: max(0, len(own) - max(total_limit, len(own) - len(deletable)))]
        for path in deleted:
            shutil.rmtree(path, ignore_errors=True)
        return deleted


def _run_id(checkpoint: Path) -> str | None:
    record = RunRecord.read(checkpoint)
    return record.run_id if record else None


def save_checkpoint(accelerator, folder: RunFolder, run: RunRecord, state: dict, total_limit: int) -> Path:
    """Accelerate's `save_state` into a temp folder with `training_state.json` and the run record, then renamed into
    place (atomic on one filesystem: a kill during the write leaves the previous checkpoint), then this run's old
    checkpoints rotated."""
    root = folder.checkpoint_root
    final = root / f"step_{state['completed_steps']:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before the other ranks write their RNG states into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / folder.layout.marker).write_text(json.dumps(state))
        run.write(tmp)
        if final.exists():  # the same step saved again (e.g. step and epoch end coincide): replace it whole
            old = root / f".old-{final.name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        folder.rotate(run.run_id, total_limit)
    accelerator.wait_for_everyone()
    return final


class TrainingRunCallback(TrainerCallback):
    """The run identity for a `transformers.Trainer` (its `checkpoint-N` folders in `args.output_dir`).

    At the start of training: refuses a folder holding another run's checkpoints or final model (unless
    `overwrite_output_dir`), and a resume (`resume_from_checkpoint=True` picks the highest step of any run) whose
    checkpoint is not of the folder's run; writes `run.json`. It takes over `args.save_total_limit` for the training
    (given back at the end) so that rotation deletes only this run's checkpoints, each tagged when saved. A resume
    from a checkpoint outside `output_dir`: set `args.resume_from_checkpoint` to its path as well.
    """

    def __init__(self, overwrite_output_dir: bool = False):
        self.overwrite_output_dir = overwrite_output_dir
        self.run: RunRecord | None = None
        self.total_limit: int | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        folder = RunFolder(args.output_dir, TRAINER_CHECKPOINTS)
        resume_from = None
        if state.global_step > 0:  # resumed: from the path given, or the folder's checkpoint of that step
            picked = Path(args.resume_from_checkpoint or folder.checkpoint_root / f"checkpoint-{state.global_step}")
            resume_from = picked if (picked / TRAINER_CHECKPOINTS.marker).is_file() else None
            folder_run = RunRecord.read(folder.output_dir)
            implicit = not args.resume_from_checkpoint  # Trainer's own pick: the highest step of any run
            if implicit and resume_from and folder_run and _run_id(resume_from) != folder_run.run_id:
                own = folder.checkpoints(folder_run.run_id)
                raise TrainingRunError(
                    f"resume_from_checkpoint=True picked {picked}, which is not of run {folder_run.run_id} (the "
                    f"folder's); resume {own[-1] if own else 'a checkpoint of it'} by its path instead."
                )
        self.run = folder.start(
            resume_from, overwrite=self.overwrite_output_dir, is_main=args.should_save, log=_log_main(args),
            seed=args.seed, batch_size=args.per_device_train_batch_size, num_processes=args.world_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            data_fingerprint=data_fingerprint(getattr(train_dataloader, "dataset", None)),
            model_source=getattr(model, "name_or_path", None) or None,
        )
        if args.save_total_limit is not None:
            self.total_limit, args.save_total_limit = args.save_total_limit, None

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = RunFolder(args.output_dir, TRAINER_CHECKPOINTS)
            self.run.write(folder.checkpoint_root / f"checkpoint-{state.global_step}")
            folder.rotate(self.run.run_id, self.total_limit, keep=(state.best_model_checkpoint,))

    def on_train_end(self, args, state, control, **kwargs):
        if self.total_limit is not None and args.save_total_limit is None:
            args.save_total_limit = self.total_limit


def _log_main(args):
    return print if args.process_index == 0 else (lambda *a, **k: None)


class StopOnNonFiniteLossCallback(TrainerCallback):
    """Stop a `transformers.Trainer` at the first non-finite loss, as the Accelerate script does: a NaN/inf gradient
    before the optimizer step raises `FloatingPointError` with the weights untouched (with fp16 the loss scaler skips
    such steps itself; the weights are then checked), and no checkpoint or final model with non-finite weights is
    written (checked before each checkpoint and at the end of training)."""

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if args.fp16 or optimizer is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
            raise FloatingPointError(f"Non-finite loss or gradients at step {state.global_step + 1}; training stopped "
                                     "before the optimizer step, weights untouched. Lower the learning rate or check "
                                     "the data.")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            check_finite_weights(model, f"the checkpoint of step {state.global_step}")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_finite_weights(model, "the trained model")


def exit_on_error(main, argv=None):
    """Run a script's `main(argv)`; a refusal or a stop (`ValueError`, `FloatingPointError`) ends the process with its
    one-line message on stderr and exit status 1, not a traceback."""
    try:
        return main(argv)
    except (ValueError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
