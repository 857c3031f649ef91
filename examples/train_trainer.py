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
from align_detr_hf.data import build_train_loader, collate_fn, default_num_workers
from align_detr_hf.evaluation_report import write_evaluation_report
from align_detr_hf.evaluation_streaming import CocoMetrics
from align_detr_hf.flags import add_flag, document_flags
from align_detr_hf.hub import ModelCardCallback, ModelCardTrainerMixin, training_card_kwargs
from align_detr_hf.optim import build_optimizer, build_scheduler
from align_detr_hf.recipes import TrainingRecipe, eval_image_processor, lr_milestones
from align_detr_hf.training_arguments import (
    add_training_arguments,
    datasets_from_args,
    model_from_args,
    recipe_from_args,
)
from align_detr_hf.training_run import TRAINER_CHECKPOINTS, RunFolder, StopOnNonFiniteLossCallback, TrainingRunCallback
from align_detr_hf.training_run import exit_on_error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p)  # data, model, recipe and run flags, shared with train_accelerate.py
    t = p.add_argument_group("Trainer")
    add_flag(t, "eval_strategy", default="epoch", choices=["no", "steps", "epoch"])
    add_flag(t, "eval_steps", type=int, default=None)
    add_flag(t, "save_strategy", default="epoch", choices=["no", "steps", "epoch"])
    add_flag(t, "save_steps", type=int, default=500)
    add_flag(t, "fp16", action="store_true")
    add_flag(t, "bf16", action="store_true")
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


def main(argv=None):
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    output_dir = Path(args.output_dir)
    folder = RunFolder(output_dir, TRAINER_CHECKPOINTS)  # checked before anything is written into it
    resume_from = folder.prepare(args.resume_from_checkpoint, args.overwrite_output_dir)
    train_set, val_set, scale = datasets_from_args(args, recipe, output_dir / "data",
                                                   log=lambda line: print(line, flush=True))
    torch.manual_seed(args.seed)
    model = model_from_args(args, train_set.id2label, recipe)
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
