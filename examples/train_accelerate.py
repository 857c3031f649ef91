#!/usr/bin/env python
"""Fine-tune (or train from scratch) Align-DETR with Hugging Face Accelerate.

Single process:
    python examples/train_accelerate.py --synthetic_shapes 200 --output_dir out --num_train_epochs 2
Several processes / machines (DDP; DeepSpeed or FSDP through `accelerate config`), mixed precision:
    accelerate launch --num_processes 8 --mixed_precision bf16 examples/train_accelerate.py \\
        --model_name_or_path path/to/align-detr-r50 --ignore_mismatched_sizes \\
        --train_annotation coco/annotations/instances_train2017.json --train_images coco/train2017 \\
        --val_annotation coco/annotations/instances_val2017.json --val_images coco/val2017 \\
        --per_device_train_batch_size 2 --num_train_epochs 12 --lr_drop_epochs 11 --output_dir out
Several CPU processes (gloo): `accelerate launch --cpu` starts only one process in accelerate 1.x; use
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py ...
Resume after an interruption (exactly: same data order, optimizer/scheduler state and weights):
    ... --resume_from_checkpoint latest     (or a path out/checkpoints/step_000500)
Jobs with a time limit (preemptible, queue slots): `--steps_this_run N` trains N steps, checkpoints and exits; the
same command with `--resume_from_checkpoint latest` continues.
Run identity (`align_detr_hf.training_run`): `run.json` in the output folder and in each checkpoint. A new run refuses
a folder holding another run's checkpoints or final model (unless --overwrite_output_dir), rotation deletes only this
run's checkpoints, `latest` resumes only the folder's run; a non-finite loss stops the run, nothing non-finite is saved.

Recipe (`align_detr_hf.recipes`, printed at start): `--recipe auto` picks `finetune` (the reference: multi-scale
resize + crop, backbone lr x0.1, frozen stem, filter_empty_gt + min_size 32, 12 epochs, AdamW lr 1e-4) when
`--model_name_or_path` loads a pretrained checkpoint, and `from_scratch` (the CPU demo's: flip at native size, full
lr everywhere, lr 5e-4, 2000 steps, x0.1 at 80%) otherwise. Every recipe field has a flag that overrides it. The
reference batch is 16 images (8 GPUs x 2); scale `--learning_rate` if yours differs.

Data loading: images are decoded and augmented in `--num_workers` worker processes (default min(4, cores)),
batched by aspect ratio (mmdet's AspectRatioBatchSampler), pinned when CUDA is available.

Determinism: the shuffling order is a function of (seed, epoch) and every sample's augmentation of (seed, epoch,
index); the global torch RNG (used by the denoising queries) is re-seeded from (seed, micro-batch, rank) before each
micro-batch. A resumed run therefore replays exactly what the uninterrupted run would have done. Checkpoints are
written to a temporary folder and renamed into place, so a kill during a write leaves the previous one intact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from tqdm.auto import tqdm

import align_detr_hf  # noqa: F401  (registers the Auto classes)
from align_detr_hf.data import build_train_loader, check_finite_batch, collate_fn, default_num_workers
from align_detr_hf.evaluation_report import write_evaluation_report
from align_detr_hf.evaluation_streaming import StreamingCocoEvaluator, evaluate_loader
from align_detr_hf.flags import add_flag, document_flags
from align_detr_hf.hub import push_folder_to_hub, training_card_kwargs, write_model_card
from align_detr_hf.optim import build_optimizer, build_scheduler
from align_detr_hf.recipes import eval_image_processor, lr_milestones
from align_detr_hf.training_arguments import (
    add_training_arguments,
    datasets_from_args,
    model_from_args,
    recipe_from_args,
)
from align_detr_hf.training_run import (
    ACCELERATE_CHECKPOINTS,
    RunFolder,
    check_finite_weights,
    data_fingerprint,
    exit_on_error,
    save_checkpoint,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)  # data, model, recipe and run flags, shared with train_trainer.py
    p.set_defaults(logging_steps=10)
    t = p.add_argument_group("accelerate")
    add_flag(t, "mixed_precision", choices=["no", "fp16", "bf16"], default=None,
             help="overrides `accelerate launch --mixed_precision`")
    add_flag(t, "checkpointing_steps", default="epoch", help="an integer (every N optimizer steps) or 'epoch'")
    add_flag(t, "steps_this_run", type=int, default=None,
             help="train at most N optimizer steps in this invocation, checkpoint and exit (then resume with "
                  "--resume_from_checkpoint latest): for preemptible or time-limited jobs")
    add_flag(t, "no_eval", action="store_true", help="skip the per-epoch COCO evaluation")
    return document_flags(p).parse_args(argv)


def evaluate(accelerator, model, loader, evaluator):
    """COCO metrics (main process; None elsewhere): each batch post-processed as it comes, top-100 per image kept."""
    batches = tqdm(loader, desc="eval", disable=not accelerator.is_local_main_process, leave=False)
    done = evaluate_loader(model, batches, evaluator, accelerator)
    return done.metrics if done else None


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator_kwargs = dict(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the denoising branch is unused on batches without ground truth
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if args.mixed_precision is not None:
        accelerator_kwargs["mixed_precision"] = args.mixed_precision
    tracking = args.report_to != "none"
    if tracking:
        accelerator_kwargs["log_with"] = args.report_to
    accelerator = Accelerator(**accelerator_kwargs)
    log = accelerator.print

    recipe = recipe_from_args(args)
    folder = RunFolder(output_dir, ACCELERATE_CHECKPOINTS)  # checked before anything is written into it
    resume_from = folder.prepare(args.resume_from_checkpoint, args.overwrite_output_dir, log)

    # ---- data (generation/reading on the main process first)
    with accelerator.main_process_first():
        train_set, val_set, scale = datasets_from_args(args, recipe, output_dir / "data", log)
    evaluator = StreamingCocoEvaluator(val_set.coco_ground_truth())
    num_workers = default_num_workers() if args.dataloader_num_workers is None else args.dataloader_num_workers
    train_loader = build_train_loader(
        train_set, recipe.batch_size, seed=args.seed, group_by_aspect_ratio=recipe.group_by_aspect_ratio,
        num_workers=num_workers, pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
    )
    sampler = train_loader.batch_sampler.sampler
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn, num_workers=num_workers,
        pin_memory=train_loader.pin_memory,
    )
    log(f"data loading: {num_workers} worker process(es), pin_memory={train_loader.pin_memory}, "
        f"persistent_workers={train_loader.persistent_workers}")

    # ---- model, optimizer, schedule
    torch.manual_seed(args.seed)  # the same random init on every process
    model = model_from_args(args, train_set.id2label, recipe)
    optimizer = build_optimizer(model, recipe.learning_rate, recipe.weight_decay, recipe.backbone_lr_mult)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = recipe.max_train_steps or steps_per_epoch * recipe.num_train_epochs
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    # the scheduler steps once per optimizer step; it is not passed to prepare() (which would step it once per
    # process) but registered so that save_state/load_state include it
    scheduler = build_scheduler(optimizer, recipe.warmup_steps, lr_milestones(recipe, steps_per_epoch, max_steps),
                                warmup_start_factor=recipe.warmup_start_factor)
    accelerator.register_for_checkpointing(scheduler)

    if tracking:
        accelerator.init_trackers("align_detr", config={k: v for k, v in vars(args).items()
                                                        if isinstance(v, (int, float, str, bool))})

    # ---- run identity, resume
    run = folder.start(resume_from, overwrite=args.overwrite_output_dir, is_main=accelerator.is_main_process, log=log,
                       seed=args.seed, batch_size=recipe.batch_size, num_processes=accelerator.num_processes,
                       gradient_accumulation_steps=args.gradient_accumulation_steps,
                       data_fingerprint=data_fingerprint(train_set), model_source=args.model_name_or_path)
    completed_steps, start_epoch, skip_batches, micro_step = 0, 0, 0, 0
    if resume_from:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / "training_state.json").read_text())
        completed_steps, start_epoch = state["completed_steps"], state["epoch"]
        skip_batches, micro_step = state["batches_in_epoch"], state["micro_step"]
        log(f"Resumed at step {completed_steps}, epoch {start_epoch}, batch {skip_batches}")

    log(f"{len(train_set)} train / {len(val_set)} val images, {accelerator.num_processes} process(es), "
        f"{steps_per_epoch} steps/epoch, {max_steps} steps")
    progress = tqdm(total=max_steps, initial=completed_steps, disable=not accelerator.is_local_main_process,
                    desc="train")
    checkpoint_every = None if args.checkpointing_steps == "epoch" else int(args.checkpointing_steps)
    model.train()
    stop, metrics, evaluated_at = False, None, None
    stop_at = min(max_steps, completed_steps + args.steps_this_run) if args.steps_this_run else max_steps
    for epoch in range(start_epoch, num_epochs):
        # accelerate's prepared loader re-sets its sampler's epoch from its own iteration counter when iterated,
        # so the epoch is given to the loader (not only to our sampler), also for the resumed partial epoch
        train_loader.set_epoch(epoch)
        loader = train_loader
        batches_in_epoch = 0
        if epoch == start_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_loader, skip_batches)
            loader.set_epoch(epoch)
            batches_in_epoch = skip_batches
        assert sampler.epoch == epoch
        for batch in loader:
            check_finite_batch(batch, micro_step)
            # the denoising noise depends only on (seed, micro-batch, rank): identical after a resume
            torch.manual_seed(args.seed * 1_000_003 + micro_step * 1009 + accelerator.process_index)
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss = outputs.loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"Non-finite loss {loss.item()} at batch {micro_step}; weights untouched.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and recipe.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == 1:
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
                if tracking:
                    accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[-1],
                                     **{f"train/{k}": v.item() for k, v in outputs.loss_dict.items()}},
                                    step=completed_steps)
            state = {"completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                     "micro_step": micro_step}
            stop = completed_steps >= stop_at
            if stop or (checkpoint_every and completed_steps % checkpoint_every == 0):
                save_checkpoint(accelerator, folder, run, state, args.save_total_limit)
            if stop:
                break
        if stop and batches_in_epoch < len(train_loader):
            break
        # ---- end of epoch: evaluation and checkpoint
        if not args.no_eval:
            metrics, evaluated_at = evaluate(accelerator, model, val_loader, evaluator), completed_steps
            if accelerator.is_main_process:
                log(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if tracking:
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
        if args.checkpointing_steps == "epoch":
            state = {"completed_steps": completed_steps, "epoch": epoch + 1, "batches_in_epoch": 0,
                     "micro_step": micro_step}
            save_checkpoint(accelerator, folder, run, state, args.save_total_limit)
        if stop:
            break
    progress.close()
    if not args.no_eval and completed_steps >= max_steps and evaluated_at != completed_steps:
        # a run that ends inside an epoch (e.g. shorter than one) is evaluated at its end
        metrics, evaluated_at = evaluate(accelerator, model, val_loader, evaluator), completed_steps
        if accelerator.is_main_process:
            log(f"step {completed_steps}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if completed_steps < max_steps:  # --steps_this_run: the checkpoint is the result, no final model yet
        log(f"Stopped after step {completed_steps} of {max_steps} (--steps_this_run); continue with "
            "--resume_from_checkpoint latest")
        if tracking:
            accelerator.end_training()
        accelerator.wait_for_everyone()
        return completed_steps

    # ---- final model
    accelerator.wait_for_everyone()
    final_dir = output_dir / "final"
    unwrapped = accelerator.unwrap_model(model)
    check_finite_weights(unwrapped, f"{final_dir}")
    unwrapped.save_pretrained(final_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(model))
    if accelerator.is_main_process:
        eval_image_processor(scale).save_pretrained(final_dir)
        if evaluated_at == completed_steps:  # pictures of the final weights' evaluation, linked from the card
            write_evaluation_report(final_dir / "evaluation", evaluator, val_set, title="final model", overwrite=True)
        repo_id = args.hub_model_id or (output_dir.resolve().name if args.push_to_hub else None)
        hyperparameters = {"recipe": recipe.name, **dataclasses.asdict(recipe), "num_processes":
                           accelerator.num_processes, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                           "completed_steps": completed_steps, "seed": args.seed}
        # README.md: base model, data, the last COCO evaluation, recipe, usage (the folder already holds our code)
        write_model_card(final_dir, metrics=metrics, **training_card_kwargs(
            model_name_or_path=args.model_name_or_path, dataset_name=args.dataset_name,
            train_annotation=args.train_annotation, synthetic_shapes=args.synthetic_shapes, hub_model_id=repo_id,
            hyperparameters=hyperparameters,
        ))
        summary = {"completed_steps": completed_steps, "metrics": metrics, "recipe": recipe.name}
        (output_dir / "train_results.json").write_text(json.dumps(summary, indent=2))
        if args.push_to_hub:  # the final folder as it is: weights, processor, code and card in one commit
            push_folder_to_hub(final_dir, repo_id, commit_message=f"Align-DETR after {completed_steps} steps")
    if tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return completed_steps


if __name__ == "__main__":
    exit_on_error(main)
