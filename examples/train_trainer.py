#!/usr/bin/env python
"""Fine-tune (or train from scratch) Align-DETR with `transformers.Trainer` and report COCO mAP.

    python examples/train_trainer.py --model_name_or_path path/to/align-detr-r50 --ignore_mismatched_sizes \\
        --dataset_name cppe-5 --output_dir out --num_train_epochs 12 --per_device_train_batch_size 2
    python examples/train_trainer.py --synthetic_shapes 200 --demo_model --image_scale 0.16 --output_dir out

Distributed: `torchrun --nproc_per_node 8 examples/train_trainer.py ...` or `accelerate launch ...`.

The optimiser and schedule are the reference recipe (`align_detr_hf.optim`: AdamW, backbone lr x0.1, no weight
decay on norm layers, grad-norm clip 0.1, linear warm-up then step decay at `--lr_drop_epochs`), installed by
overriding `Trainer.create_optimizer` / `create_scheduler`. Evaluation uses pycocotools (`map`, `map_50`, ...; the
Trainer prefixes them with `eval_`). Detection models need `remove_unused_columns=False` (the dataset yields
`pixel_values`/`labels` dicts) and `eval_do_concat_batches=False` (images of different sizes per batch).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import align_detr_hf  # noqa: F401  (registers the Auto classes)
from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection, AlignDetrImageProcessor
from align_detr_hf.data import build_eval_transforms, build_train_transforms, collate_fn, load_train_val_datasets
from align_detr_hf.evaluation import build_compute_metrics
from align_detr_hf.optim import REFERENCE_MAX_GRAD_NORM, build_optimizer, build_scheduler


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
    p.add_argument("--image_scale", type=float, default=1.0)
    p.add_argument("--augment", choices=["reference", "none"], default="reference")
    p.add_argument("--model_name_or_path")
    p.add_argument("--ignore_mismatched_sizes", action="store_true")
    p.add_argument("--config_name", help="AlignDetrConfig json (from scratch)")
    p.add_argument("--demo_model", action="store_true", help="from scratch: the small demo architecture")
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--num_queries", type=int, default=30)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_train_epochs", type=float, default=12)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--per_device_train_batch_size", type=int, default=2)
    p.add_argument("--per_device_eval_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--backbone_lr_mult", type=float, default=0.1)
    p.add_argument("--max_grad_norm", type=float, default=REFERENCE_MAX_GRAD_NORM)
    p.add_argument("--warmup_steps", type=int, default=2000)
    p.add_argument("--lr_drop_epochs", type=int, nargs="*", default=[11])
    p.add_argument("--eval_strategy", default="epoch", choices=["no", "steps", "epoch"])
    p.add_argument("--eval_steps", type=int, default=None)
    p.add_argument("--save_strategy", default="epoch", choices=["no", "steps", "epoch"])
    p.add_argument("--save_steps", type=int, default=500)
    p.add_argument("--save_total_limit", type=int, default=2)
    p.add_argument("--logging_steps", type=int, default=50)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--report_to", default="none")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id")
    p.add_argument("--resume_from_checkpoint")
    return p.parse_args(argv)


class AlignDetrTrainer(Trainer):
    """Trainer with the reference Align-DETR parameter groups and warm-up + step-decay schedule."""

    def __init__(self, *args, backbone_lr_mult=0.1, warmup_steps=2000, lr_drop_epochs=(11,), **kwargs):
        super().__init__(*args, **kwargs)
        self.backbone_lr_mult, self.warmup_steps, self.lr_drop_epochs = backbone_lr_mult, warmup_steps, lr_drop_epochs

    def create_optimizer(self, *args, **kwargs):
        if self.optimizer is None:
            self.optimizer = build_optimizer(
                self.model, self.args.learning_rate, self.args.weight_decay, self.backbone_lr_mult,
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
                optimizer or self.optimizer, self.warmup_steps, [e * steps_per_epoch for e in self.lr_drop_epochs]
            )
        return self.lr_scheduler


class SetDatasetEpoch(TrainerCallback):
    """Tell the dataset the epoch, so each epoch draws new augmentations (with several processes accelerate's
    dataloader does not reach the dataset's `set_epoch`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


def build_model(args, id2label):
    label2id = {v: k for k, v in id2label.items()}
    if args.model_name_or_path:
        return AlignDetrForObjectDetection.from_pretrained(
            args.model_name_or_path, id2label=id2label, label2id=label2id,
            ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        )
    if args.config_name:
        return AlignDetrForObjectDetection(
            AlignDetrConfig.from_pretrained(args.config_name, id2label=id2label, label2id=label2id)
        )
    if args.demo_model:
        from align_detr_hf.demo import demo_config

        return AlignDetrForObjectDetection(demo_config(id2label, args.d_model, args.num_queries))
    return AlignDetrForObjectDetection(AlignDetrConfig(id2label=id2label, label2id=label2id))


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    train_set, val_set = load_train_val_datasets(
        args.train_annotation, args.train_images, args.val_annotation, args.val_images, args.dataset_name,
        args.train_split, args.val_split, args.train_val_split, args.synthetic_shapes, output_dir / "data",
        args.synthetic_image_size, seed=args.seed,
    )
    train_set = train_set.with_transforms(
        build_train_transforms(scale=args.image_scale) if args.augment == "reference"
        else build_eval_transforms(scale=args.image_scale)
    )
    val_set = val_set.with_transforms(build_eval_transforms(scale=args.image_scale))
    torch.manual_seed(args.seed)
    model = build_model(args, train_set.id2label)
    processor = AlignDetrImageProcessor(
        size={"shortest_edge": round(800 * args.image_scale), "longest_edge": round(1333 * args.image_scale)}
    )

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        eval_strategy=args.eval_strategy,
        eval_steps=args.eval_steps,
        save_strategy=args.save_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        fp16=args.fp16,
        bf16=args.bf16,
        seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False,  # items are {"pixel_values", "labels"}; keep them
        eval_do_concat_batches=False,  # per-batch predictions of different image sizes
        report_to=args.report_to,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        metric_for_best_model="eval_map" if args.eval_strategy != "no" else None,
        greater_is_better=True,
        load_best_model_at_end=False,
    )
    trainer = AlignDetrTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=val_set if args.eval_strategy != "no" else None,
        data_collator=collate_fn,
        processing_class=processor,
        compute_metrics=build_compute_metrics(val_set.coco_ground_truth()),
        backbone_lr_mult=args.backbone_lr_mult,
        warmup_steps=args.warmup_steps,
        lr_drop_epochs=args.lr_drop_epochs,
        callbacks=[SetDatasetEpoch(train_set)],
    )
    train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(str(output_dir / "final"))
    metrics = dict(train_result.metrics)
    if args.eval_strategy != "no":
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    if trainer.is_world_process_zero():
        (output_dir / "all_results.json").write_text(json.dumps(metrics, indent=2))
    if args.push_to_hub:
        trainer.push_to_hub(finetuned_from=args.model_name_or_path, tasks="object-detection")
    return metrics


if __name__ == "__main__":
    main()
