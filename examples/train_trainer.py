#!/usr/bin/env python
"""Fine-tune (or train from scratch) Align-DETR with `transformers.Trainer` and report COCO mAP.

    python examples/train_trainer.py --model_name_or_path path/to/align-detr-r50 --ignore_mismatched_sizes \\
        --dataset_name cppe-5 --output_dir out --num_train_epochs 12 --per_device_train_batch_size 2
    python examples/train_trainer.py --synthetic_shapes 600 --demo_model --output_dir out

Distributed: `torchrun --nproc_per_node 8 examples/train_trainer.py ...` or `accelerate launch ...`.

Recipe (`align_detr_hf.recipes`, printed at start): `--recipe auto` picks `finetune` (the reference) with
`--model_name_or_path` and `from_scratch` (the demo's) otherwise; every field has an overriding flag. The optimiser
and schedule (`align_detr_hf.optim`: AdamW, backbone lr multiplier, no weight decay on norm layers, warm-up then
x0.1 steps) are installed by overriding `Trainer.create_optimizer` / `create_scheduler`; the training loader
(aspect-ratio batches, worker processes) by overriding `get_train_dataloader`. COCO evaluation (`eval_map`, ...) keeps
only each batch's top-100 detections (`CocoMetrics`, `batch_eval_metrics=True`: memory flat in the number of images);
pictures of the last one go to final/evaluation/. Detection models need `remove_unused_columns=False`.
Our callbacks (`align_detr_hf.training_run`) give the output folder one run identity, as in train_accelerate.py
(another run's folder refused unless --overwrite_output_dir; only this run's checkpoints rotated or resumed by
`latest`), and stop at the first non-finite loss; nothing non-finite is saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import align_detr_hf  # noqa: F401  (registers the Auto classes)
from align_detr_hf.configuration_align_detr import LOSS_TYPES
from align_detr_hf.data import build_eval_transforms, build_train_loader, collate_fn, default_num_workers
from align_detr_hf.data import load_train_val_datasets
from align_detr_hf.flags import document_flags
from align_detr_hf.evaluation_report import write_evaluation_report
from align_detr_hf.evaluation_streaming import CocoMetrics
from align_detr_hf.hub import ModelCardCallback, ModelCardTrainerMixin, training_card_kwargs
from align_detr_hf.optim import build_optimizer, build_scheduler
from align_detr_hf.recipes import (
    TrainingRecipe,
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
from align_detr_hf.training_run import TRAINER_CHECKPOINTS, RunFolder, StopOnNonFiniteLossCallback, TrainingRunCallback
from align_detr_hf.training_run import exit_on_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_annotation")
    p.add_argument("--train_images")
    p.add_argument("--val_annotation")
    p.add_argument("--val_images")
    p.add_argument("--dataset_name", help="datasets name or save_to_disk folder with the `objects` schema")
    p.add_argument("--train_split", default="train")
    p.add_argument("--val_split", default="validation")
    p.add_argument("--train_val_split", type=float, default=0.15)
    p.add_argument("--synthetic_shapes", type=int, default=0)
    p.add_argument("--synthetic_image_size", type=int, default=128)
    p.add_argument("--synthetic_num_classes", type=int, default=3, help="1-4 (the demo uses 3)")
    r = p.add_argument_group("recipe (default: the recipe's value; see align_detr_hf.recipes)")
    r.add_argument("--recipe", choices=["auto", "from_scratch", "finetune"], default="auto",
                   help="auto: finetune with --model_name_or_path, from_scratch otherwise")
    r.add_argument("--image_scale", type=float, default=None)
    r.add_argument("--augment", choices=["reference", "flip", "none"], default=None)
    r.add_argument("--filter_empty_gt", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--filter_min_size", type=int, default=None)
    r.add_argument("--group_by_aspect_ratio", action=argparse.BooleanOptionalAction, default=None)
    r.add_argument("--train_stem", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--model_name_or_path")
    p.add_argument("--ignore_mismatched_sizes", action="store_true")
    p.add_argument("--loss_type", choices=LOSS_TYPES, default=None,
                   help="training loss: align_detr or dino (DINO's focal loss); default: the model config's")
    p.add_argument("--config_name", help="AlignDetrConfig json (from scratch)")
    p.add_argument("--demo_model", action="store_true", help="from scratch: the small demo architecture")
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--num_queries", type=int, default=30)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true", help="write into another run's folder (see above)")
    p.add_argument("--num_train_epochs", type=int, default=None)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--per_device_train_batch_size", type=int, default=None)
    p.add_argument("--per_device_eval_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--weight_decay", type=float, default=None)
    p.add_argument("--backbone_lr_mult", type=float, default=None)
    p.add_argument("--max_grad_norm", type=float, default=None)
    p.add_argument("--warmup_steps", type=int, default=None)
    p.add_argument("--warmup_start_factor", type=float, default=None)
    p.add_argument("--lr_drop_epochs", type=int, nargs="*", default=None)
    p.add_argument("--lr_drop_fraction", type=float, default=None)
    p.add_argument("--eval_strategy", default="epoch", choices=["no", "steps", "epoch"])
    p.add_argument("--eval_steps", type=int, default=None)
    p.add_argument("--save_strategy", default="epoch", choices=["no", "steps", "epoch"])
    p.add_argument("--save_steps", type=int, default=500)
    p.add_argument("--save_total_limit", type=int, default=2)
    p.add_argument("--logging_steps", type=int, default=50)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataloader_num_workers", type=int, default=None, help="default min(4, cores)")
    p.add_argument("--dataloader_pin_memory", action=argparse.BooleanOptionalAction, default=None,
                   help="default: when CUDA is available")
    p.add_argument("--dataloader_persistent_workers", action=argparse.BooleanOptionalAction, default=None,
                   help="default: when there are workers")
    p.add_argument("--report_to", default="none")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id")
    p.add_argument("--resume_from_checkpoint", help="a checkpoint folder, or 'latest' (of this folder's run)")
    return document_flags(p).parse_args(argv)


class AlignDetrTrainer(ModelCardTrainerMixin, Trainer):  # trainer.push_to_hub(): our model card
    """Trainer with the recipe's parameter groups, warm-up + step-decay schedule and training loader (aspect-ratio
    batches of (index, epoch) pairs, so augmentation follows the epoch in persistent worker processes)."""

    def __init__(self, *args, recipe: TrainingRecipe, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        loader = build_train_loader(
            self.train_dataset, self._train_batch_size, seed=self.args.seed,
            group_by_aspect_ratio=self.recipe.group_by_aspect_ratio, num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory, persistent_workers=self.args.dataloader_persistent_workers,
        )
        # accelerate shards whole batches across processes and forwards `set_epoch` to the shuffling sampler
        return self.accelerator.prepare(loader)

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                self.model, self.args.learning_rate, self.args.weight_decay, self.recipe.backbone_lr_mult,
                (self.args.adam_beta1, self.args.adam_beta2), self.args.adam_epsilon,
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            steps_per_epoch = max(1, math.ceil(num_training_steps / max(self.args.num_train_epochs, 1e-9)))
            if self.args.max_steps > 0:
                dataloader = self.get_train_dataloader()
                steps_per_epoch = max(1, math.ceil(len(dataloader) / self.args.gradient_accumulation_steps))
            self.lr_scheduler = build_scheduler(
                optimizer or self.optimizer, self.recipe.warmup_steps,
                lr_milestones(self.recipe, steps_per_epoch, num_training_steps),
                warmup_start_factor=self.recipe.warmup_start_factor,
            )
        return self.lr_scheduler


def recipe_from_args(args) -> TrainingRecipe:
    """The job's recipe (finetune for a pretrained checkpoint, from_scratch otherwise) with the flags applied."""
    return resolve_recipe(recipe_for_job(args.recipe, pretrained=bool(args.model_name_or_path)), {
        "augment": args.augment, "image_scale": args.image_scale, "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay, "backbone_lr_mult": args.backbone_lr_mult, "train_stem": args.train_stem,
        "warmup_steps": args.warmup_steps, "warmup_start_factor": args.warmup_start_factor,
        "lr_drop_epochs": args.lr_drop_epochs, "lr_drop_fraction": args.lr_drop_fraction,
        "num_train_epochs": args.num_train_epochs,
        "max_train_steps": args.max_steps if args.max_steps is None or args.max_steps > 0 else None,
        "batch_size": args.per_device_train_batch_size, "max_grad_norm": args.max_grad_norm,
        "filter_empty_gt": args.filter_empty_gt, "filter_min_size": args.filter_min_size,
        "group_by_aspect_ratio": args.group_by_aspect_ratio,
    })


def main(argv=None):
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    output_dir = Path(args.output_dir)
    folder = RunFolder(output_dir, TRAINER_CHECKPOINTS)  # checked before anything is written into it
    resume_from = folder.prepare(args.resume_from_checkpoint, args.overwrite_output_dir)
    train_set, val_set = load_train_val_datasets(
        args.train_annotation, args.train_images, args.val_annotation, args.val_images, args.dataset_name,
        args.train_split, args.val_split, args.train_val_split, args.synthetic_shapes, output_dir / "data",
        args.synthetic_image_size, seed=args.seed, synthetic_num_classes=args.synthetic_num_classes,
    )
    scale = image_scale_for(recipe, train_set)
    print(describe_recipe(recipe, scale), flush=True)
    if recipe.filter_empty_gt or recipe.filter_min_size > 0:
        num_before = len(train_set)
        train_set = train_set.filter(recipe.filter_empty_gt, recipe.filter_min_size)
        print(f"filter (filter_empty_gt={recipe.filter_empty_gt}, min_size={recipe.filter_min_size}): kept "
              f"{len(train_set)} of {num_before} training images", flush=True)
    if len(train_set) == 0:
        raise ValueError("No training images left (after filtering); check the data or --no-filter_empty_gt.")
    train_set = train_set.with_transforms(build_recipe_transforms(recipe.augment, scale))
    val_set = val_set.with_transforms(build_eval_transforms(scale=scale))
    torch.manual_seed(args.seed)
    model = build_model(train_set.id2label, args.model_name_or_path, args.config_name, args.demo_model,
                        args.d_model, args.num_queries, args.ignore_mismatched_sizes)
    apply_recipe_to_model(model, recipe)
    if args.loss_type:
        model.config.loss_type = args.loss_type  # the model builds its loss from the config (saved with it)
    processor = eval_image_processor(scale)
    num_workers = default_num_workers() if args.dataloader_num_workers is None else args.dataloader_num_workers
    pin_memory = torch.cuda.is_available() if args.dataloader_pin_memory is None else args.dataloader_pin_memory
    persistent = num_workers > 0 if args.dataloader_persistent_workers is None else args.dataloader_persistent_workers
    print(f"data loading: {num_workers} worker process(es), pin_memory={pin_memory}, persistent_workers={persistent}",
          flush=True)

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=recipe.num_train_epochs or 1,
        max_steps=recipe.max_train_steps or -1,
        per_device_train_batch_size=recipe.batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate, weight_decay=recipe.weight_decay, max_grad_norm=recipe.max_grad_norm,
        eval_strategy=args.eval_strategy, eval_steps=args.eval_steps,
        save_strategy=args.save_strategy, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, fp16=args.fp16, bf16=args.bf16, seed=args.seed,
        dataloader_num_workers=num_workers, dataloader_pin_memory=pin_memory,
        dataloader_persistent_workers=persistent and num_workers > 0,
        remove_unused_columns=False,  # items are {"pixel_values", "labels"}; keep them
        batch_eval_metrics=True,  # CocoMetrics adds each batch as it comes instead of Trainer keeping all outputs
        report_to=args.report_to,
        push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
        metric_for_best_model="eval_map" if args.eval_strategy != "no" else None,
        greater_is_better=True, load_best_model_at_end=False,
        resume_from_checkpoint=str(resume_from) if resume_from else None,
    )
    # README.md (base model, data, last COCO evaluation, recipe, usage) in every checkpoint, push and the final save
    model_card = ModelCardCallback(**training_card_kwargs(
        model_name_or_path=args.model_name_or_path, dataset_name=args.dataset_name,
        train_annotation=args.train_annotation, synthetic_shapes=args.synthetic_shapes, hub_model_id=args.hub_model_id,
        hyperparameters={"recipe": recipe.name, **dataclasses.asdict(recipe)},
    ))
    coco_metrics = CocoMetrics(val_set.coco_ground_truth())  # post-processes each batch on its process
    trainer = AlignDetrTrainer(
        model=model, args=training_args, train_dataset=train_set,
        eval_dataset=val_set if args.eval_strategy != "no" else None,
        data_collator=collate_fn, processing_class=processor,
        compute_metrics=coco_metrics, preprocess_logits_for_metrics=coco_metrics.preprocess_logits_for_metrics,
        recipe=recipe,
        callbacks=[model_card, TrainingRunCallback(args.overwrite_output_dir), StopOnNonFiniteLossCallback()],
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    if args.eval_strategy != "no":
        metrics.update(trainer.evaluate())  # before the final save, so that the model card shows it
    trainer.log_metrics("all", metrics)
    final_dir = output_dir / "final"
    if args.eval_strategy != "no" and trainer.is_world_process_zero():  # the final evaluation's pictures
        write_evaluation_report(final_dir / "evaluation", coco_metrics.last_evaluator, val_set, overwrite=True)
    # weights, processor and our code; with --push_to_hub, Trainer.save_model also pushes (trainer.push_to_hub: the
    # output folder with our code and, through create_model_card, our card)
    trainer.save_model(str(final_dir))
    if trainer.is_world_process_zero():
        model_card.write(final_dir)
        (output_dir / "all_results.json").write_text(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    exit_on_error(main)
