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
from align_detr_hf.configuration_align_detr import LOSS_TYPES
from align_detr_hf.data import (
    build_eval_transforms,
    build_train_loader,
    check_finite_batch,
    collate_fn,
    default_num_workers,
    load_train_val_datasets,
)
from align_detr_hf.flags import add_deprecated_alias, document_flags
from align_detr_hf.evaluation_report import write_evaluation_report
from align_detr_hf.evaluation_streaming import StreamingCocoEvaluator, evaluate_loader
from align_detr_hf.hub import push_folder_to_hub, training_card_kwargs, write_model_card
from align_detr_hf.optim import build_optimizer, build_scheduler
from align_detr_hf.recipes import (
    apply_recipe_to_model,
    build_model,
    build_recipe_transforms,
    describe_recipe,
    eval_image_processor,
    image_scale_for,
    lr_milestones,
    recipe_for_job,
    resolve_recipe,
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
    d = p.add_argument_group("data")
    d.add_argument("--train_annotation", help="COCO json of the training set")
    d.add_argument("--train_images", help="image folder of the training set")
    d.add_argument("--val_annotation")
    d.add_argument("--val_images")
    d.add_argument("--dataset_name", help="datasets name or save_to_disk folder with the `objects` schema")
    d.add_argument("--train_split", default="train")
    d.add_argument("--val_split", default="validation")
    d.add_argument("--train_val_split", type=float, default=0.15)
    d.add_argument("--synthetic_shapes", type=int, default=0, help="generate N synthetic shapes images instead")
    d.add_argument("--synthetic_image_size", type=int, default=128)
    d.add_argument("--synthetic_num_classes", type=int, default=3, help="1-4 (the demo uses 3)")
    # transformers' names; the older spellings still work (add_deprecated_alias)
    add_deprecated_alias(d, d.add_argument("--dataloader_num_workers", type=int, default=None), "--num_workers")
    add_deprecated_alias(d, d.add_argument("--dataloader_pin_memory", action=argparse.BooleanOptionalAction),
                         "--pin_memory", "--no-pin_memory")
    add_deprecated_alias(d, d.add_argument("--dataloader_persistent_workers", action=argparse.BooleanOptionalAction),
                         "--persistent_workers", "--no-persistent_workers")
    r = p.add_argument_group("recipe (default: the recipe's value; see align_detr_hf.recipes)")
    r.add_argument("--recipe", choices=["auto", "from_scratch", "finetune"], default="auto",
                   help="auto: finetune with --model_name_or_path, from_scratch otherwise")
    r.add_argument("--image_scale", type=float, default=None,
                   help="multiply every resize/crop size of the reference pipeline (e.g. 0.16 for 128px images)")
    r.add_argument("--augment", choices=["reference", "flip", "none"], default=None)
    r.add_argument("--filter_empty_gt", action=argparse.BooleanOptionalAction, default=None,
                   help="drop training images without any annotation (mmdet filter_cfg)")
    r.add_argument("--filter_min_size", type=int, default=None, help="drop training images smaller than this")
    r.add_argument("--group_by_aspect_ratio", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--train_stem", action=argparse.BooleanOptionalAction, default=None,
                   help="train the backbone stem (frozen for pretrained models)")
    m = p.add_argument_group("model")
    m.add_argument("--model_name_or_path", help="pretrained Align-DETR (folder or Hub id)")
    m.add_argument("--ignore_mismatched_sizes", action="store_true", help="re-initialise class heads for new classes")
    m.add_argument("--loss_type", choices=LOSS_TYPES, default=None,
                   help="training loss: align_detr or dino (DINO's focal loss); default: the model config's")
    m.add_argument("--config_name", help="AlignDetrConfig json for training from scratch")
    m.add_argument("--demo_model", action="store_true", help="from scratch: the small demo architecture")
    m.add_argument("--d_model", type=int, default=64, help="with --demo_model")
    m.add_argument("--num_queries", type=int, default=30, help="with --demo_model")
    t = p.add_argument_group("training")
    t.add_argument("--output_dir", required=True)
    t.add_argument("--overwrite_output_dir", action="store_true",
                   help="write into a folder holding another run's checkpoints/final model (same names replaced)")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--per_device_train_batch_size", type=int, default=None)
    t.add_argument("--per_device_eval_batch_size", type=int, default=4)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--num_train_epochs", type=int, default=None)
    add_deprecated_alias(t, t.add_argument("--max_steps", type=int, default=None), "--max_train_steps")
    t.add_argument("--learning_rate", type=float, default=None)
    t.add_argument("--weight_decay", type=float, default=None)
    t.add_argument("--backbone_lr_mult", type=float, default=None)
    t.add_argument("--max_grad_norm", type=float, default=None)
    t.add_argument("--warmup_steps", type=int, default=None)
    t.add_argument("--warmup_start_factor", type=float, default=None)
    t.add_argument("--lr_drop_epochs", type=int, nargs="*", default=None, help="epochs after which lr x0.1")
    t.add_argument("--lr_drop_fraction", type=float, default=None, help="or: lr x0.1 at this fraction of the steps")
    t.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="overrides `accelerate launch --mixed_precision`")
    t.add_argument("--checkpointing_steps", default="epoch", help="an integer (every N optimizer steps) or 'epoch'")
    add_deprecated_alias(t, t.add_argument("--save_total_limit", type=int, default=2), "--checkpoints_total_limit")
    t.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest'")
    t.add_argument("--stop_after_steps", type=int, default=None,
                   help="end the run (after checkpointing) at this optimizer step, as if interrupted")
    t.add_argument("--no_eval", action="store_true", help="skip the per-epoch COCO evaluation")
    t.add_argument("--with_tracking", action="store_true", help="log to --report_to (tensorboard)")
    t.add_argument("--report_to", default="tensorboard")
    t.add_argument("--logging_steps", type=int, default=10)
    t.add_argument("--debug_log_normaliser", action="store_true",
                   help="record the loss normaliser (GT count all-reduced across processes) per rank to json")
    t.add_argument("--push_to_hub", action="store_true")
    t.add_argument("--hub_model_id")
    return document_flags(p).parse_args(argv)


# ------------------------------------------------------------------------------------------------ helpers


def recipe_from_args(args):
    """The job's recipe (finetune for a pretrained checkpoint, from_scratch otherwise) with the flags applied."""
    return resolve_recipe(recipe_for_job(args.recipe, pretrained=bool(args.model_name_or_path)), {
        "augment": args.augment, "image_scale": args.image_scale, "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay, "backbone_lr_mult": args.backbone_lr_mult, "train_stem": args.train_stem,
        "warmup_steps": args.warmup_steps, "warmup_start_factor": args.warmup_start_factor,
        "lr_drop_epochs": args.lr_drop_epochs, "lr_drop_fraction": args.lr_drop_fraction,
        "num_train_epochs": args.num_train_epochs, "max_train_steps": args.max_steps,
        "batch_size": args.per_device_train_batch_size, "max_grad_norm": args.max_grad_norm,
        "filter_empty_gt": args.filter_empty_gt, "filter_min_size": args.filter_min_size,
        "group_by_aspect_ratio": args.group_by_aspect_ratio,
    })


class NormaliserRecorder:
    """Wraps the model's loss function to record, at every call, the GT counts that normalised it on this rank and
    their mean over the ranks (`AlignDetrLoss.normalisers`)."""

    def __init__(self, model):
        self.model, self.records = model, []

    def __enter__(self):
        loss_function = self.model.loss_function

        def recording_loss(inputs, labels):
            result = loss_function(inputs, labels)
            local, reduced = loss_function.normalisers
            self.records.append({"local": list(local),
                                 "reduced": reduced.tolist() if torch.is_tensor(reduced) else list(reduced)})
            return result

        self.model.loss_function = recording_loss
        return self

    def __exit__(self, *exc):
        self.model.loss_function = None  # the model's own loss again


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
    if args.with_tracking:
        accelerator_kwargs["log_with"] = args.report_to
    accelerator = Accelerator(**accelerator_kwargs)
    log = accelerator.print

    recipe = recipe_from_args(args)
    folder = RunFolder(output_dir, ACCELERATE_CHECKPOINTS)  # checked before anything is written into it
    resume_from = folder.prepare(args.resume_from_checkpoint, args.overwrite_output_dir, log)

    # ---- data (generation/reading on the main process first)
    with accelerator.main_process_first():
        train_set, val_set = load_train_val_datasets(
            args.train_annotation, args.train_images, args.val_annotation, args.val_images, args.dataset_name,
            args.train_split, args.val_split, args.train_val_split, args.synthetic_shapes, output_dir / "data",
            args.synthetic_image_size, seed=args.seed, synthetic_num_classes=args.synthetic_num_classes,
        )
    scale = image_scale_for(recipe, train_set)
    log(describe_recipe(recipe, scale))
    if recipe.filter_empty_gt or recipe.filter_min_size > 0:
        num_before = len(train_set)
        train_set = train_set.filter(recipe.filter_empty_gt, recipe.filter_min_size)
        log(f"filter (filter_empty_gt={recipe.filter_empty_gt}, min_size={recipe.filter_min_size}): kept "
            f"{len(train_set)} of {num_before} training images")
    if len(train_set) == 0:
        raise ValueError("No training images left (after filtering); check the data or --no-filter_empty_gt.")
    train_set = train_set.with_transforms(build_recipe_transforms(recipe.augment, scale))
    val_set = val_set.with_transforms(build_eval_transforms(scale=scale))
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
    model = build_model(train_set.id2label, args.model_name_or_path, args.config_name, args.demo_model,
                        args.d_model, args.num_queries, args.ignore_mismatched_sizes)
    apply_recipe_to_model(model, recipe)
    if args.loss_type:
        model.config.loss_type = args.loss_type  # the model builds its loss from the config (saved with it)
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

    if args.with_tracking:
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
    recorder = NormaliserRecorder(accelerator.unwrap_model(model)) if args.debug_log_normaliser else None
    if recorder:
        recorder.__enter__()
    model.train()
    stop, metrics, evaluated_at = False, None, None
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
            if recorder:
                recorder.records[-1].update(micro_step=micro_step - 1, loss=loss.item())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            completed_steps += 1
            progress.update(1)
            if completed_steps % args.logging_steps == 0 or completed_steps == 1:
                progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[-1]:.2e}")
                if args.with_tracking:
                    accelerator.log({"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[-1],
                                     **{f"train/{k}": v.item() for k, v in outputs.loss_dict.items()}},
                                    step=completed_steps)
            state = {"completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                     "micro_step": micro_step}
            stop = completed_steps >= max_steps or (args.stop_after_steps and completed_steps >= args.stop_after_steps)
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
                if args.with_tracking:
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
    if recorder:
        recorder.__exit__()
        debug_dir = output_dir / "debug"
        debug_dir.mkdir(parents=True, exist_ok=True)
        (debug_dir / f"normaliser_rank{accelerator.process_index}.json").write_text(
            json.dumps({"rank": accelerator.process_index, "world_size": accelerator.num_processes,
                        "records": recorder.records})
        )

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
    if args.with_tracking:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return completed_steps


if __name__ == "__main__":
    exit_on_error(main)
