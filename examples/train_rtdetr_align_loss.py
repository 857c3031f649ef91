#!/usr/bin/env python
"""Fine-tune transformers' RT-DETR with the Align-DETR loss (`transformers.Trainer`, unchanged), report COCO mAP.

    # a pretrained checkpoint on your COCO-format data (downloads the checkpoint)
    python examples/train_rtdetr_align_loss.py --model_name_or_path PekingU/rtdetr_r50vd \\
        --train_annotation train.json --train_images images/ --output_dir out --max_steps 5000
    # quick mode, no download: a tiny random-init RT-DETR on generated shapes
    python examples/train_rtdetr_align_loss.py --synthetic_shapes 200 --output_dir out --max_steps 300

The only Align-DETR-specific line is `use_align_detr_loss(model, ...)`: the model's `loss_function` becomes the
Align-DETR loss (one-to-k matching, IA-BCE, prime-sample weights, on every decoder layer, the encoder proposals and
RT-DETR's denoising queries); `--own_loss` trains with RT-DETR's own loss for comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrImageProcessor, Trainer, TrainingArguments

from align_detr_hf.data import (
    Compose,
    RandomHorizontalFlip,
    collate_fn,
    load_train_val_datasets,
    resize_image_and_boxes,
)
from align_detr_hf.evaluation import evaluate_model
from align_detr_hf.image_processing_align_detr import ALIGN_DETR_MEAN, ALIGN_DETR_STD
from align_detr_hf.loss_adapters import use_align_detr_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_name_or_path", help="an RT-DETR checkpoint; default in quick mode: a tiny random model")
    p.add_argument("--train_annotation")
    p.add_argument("--train_images")
    p.add_argument("--val_annotation")
    p.add_argument("--val_images")
    p.add_argument("--dataset_name", help="datasets name or save_to_disk folder with the `objects` schema")
    p.add_argument("--synthetic_shapes", type=int, default=0, help="N generated shapes images (quick mode)")
    p.add_argument("--synthetic_image_size", type=int, default=128)
    p.add_argument("--image_size", type=int, default=None,
                   help="square training/eval size (default: the processor's, 640; synthetic: its image size)")
    p.add_argument("--output_dir", default="rtdetr_align_loss")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--learning_rate", type=float, default=None, help="default 1e-4 (pretrained) or 5e-4 (random init)")
    p.add_argument("--decoder_num_gt_repeat", type=int, nargs="+", default=None)
    p.add_argument("--encoder_num_gt_repeat", type=int, default=None)
    p.add_argument("--alpha", type=float, default=0.25, help="IA-BCE quality exponent")
    p.add_argument("--gamma", type=float, default=2.0, help="IA-BCE negative weight exponent")
    p.add_argument("--tau", type=float, default=1.5, help="prime-sample weight temperature")
    p.add_argument("--own_loss", action="store_true", help="keep RT-DETR's own loss (for comparison)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def tiny_rtdetr_config(id2label: dict) -> RTDetrConfig:
    """A ~1 M-parameter RT-DETR: the demo's 4-stage ResNet (16-128 channels), width 64, 2 decoder layers."""
    backbone = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128],
                "depths": [1, 1, 1, 1], "layer_type": "basic", "out_features": ["stage2", "stage3", "stage4"]}
    return RTDetrConfig(backbone_config=backbone, encoder_in_channels=[32, 64, 128], feat_strides=[8, 16, 32],
                        encoder_hidden_dim=64, hidden_expansion=0.5, encoder_ffn_dim=256, encoder_attention_heads=4,
                        d_model=64, decoder_in_channels=[64] * 3, decoder_layers=2, decoder_ffn_dim=256,
                        decoder_attention_heads=4, num_queries=30, num_denoising=30, id2label=id2label)


class SquareResize:
    """Resize to `size` x `size` (RT-DETR's processor does the same; boxes are normalised, so they stay valid)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image, target, generator=None):
        return resize_image_and_boxes(image, target, self.size, self.size)


class RTDetrCollator:
    """`align_detr_hf.data.collate_fn`, then the checkpoint processor's pixel scaling instead of Align-DETR's."""

    def __init__(self, processor: RTDetrImageProcessor):
        self.mean = torch.tensor(ALIGN_DETR_MEAN)[:, None, None]
        self.std = torch.tensor(ALIGN_DETR_STD)[:, None, None]
        self.processor = processor

    def __call__(self, items):
        batch = collate_fn(items)
        pixels = batch["pixel_values"] * self.std + self.mean  # back to 0..255
        if self.processor.do_rescale:
            pixels = pixels * self.processor.rescale_factor
        if self.processor.do_normalize:
            mean = torch.tensor(self.processor.image_mean)[:, None, None]
            pixels = (pixels - mean) / torch.tensor(self.processor.image_std)[:, None, None]
        batch["pixel_values"] = pixels * batch["pixel_mask"][:, None]  # padding stays 0
        return batch


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    train_set, val_set = load_train_val_datasets(
        args.train_annotation, args.train_images, args.val_annotation, args.val_images, args.dataset_name,
        synthetic_shapes=args.synthetic_shapes, synthetic_dir=out / "data",
        synthetic_image_size=args.synthetic_image_size, seed=args.seed,
    )
    id2label = train_set.id2label
    if args.model_name_or_path:
        model = RTDetrForObjectDetection.from_pretrained(
            args.model_name_or_path, id2label=id2label, label2id={v: k for k, v in id2label.items()},
            ignore_mismatched_sizes=True,  # a new class head for the new classes
        )
        processor = RTDetrImageProcessor.from_pretrained(args.model_name_or_path)
    else:
        model, processor = RTDetrForObjectDetection(tiny_rtdetr_config(id2label)), RTDetrImageProcessor()
    image_size = args.image_size or (args.synthetic_image_size if args.synthetic_shapes else processor.size["height"])
    train_set = train_set.with_transforms(Compose([RandomHorizontalFlip(0.5), SquareResize(image_size)]))
    val_set = val_set.with_transforms(SquareResize(image_size))

    if not args.own_loss:
        use_align_detr_loss(model, decoder_num_gt_repeat=args.decoder_num_gt_repeat,
                            encoder_num_gt_repeat=args.encoder_num_gt_repeat, alpha=args.alpha, gamma=args.gamma,
                            tau=args.tau)
    collator = RTDetrCollator(processor)
    training_args = TrainingArguments(
        output_dir=str(out), max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate or (1e-4 if args.model_name_or_path else 5e-4), weight_decay=1e-4,
        max_grad_norm=0.1, warmup_steps=min(30, args.max_steps // 5), lr_scheduler_type="constant_with_warmup",
        remove_unused_columns=False,  # the model needs `labels` (a list of dicts)
        logging_steps=max(1, args.max_steps // 10), save_strategy="no", report_to=[], seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, data_collator=collator)
    train_result = trainer.train()

    val_loader = torch.utils.data.DataLoader(val_set, batch_size=8, collate_fn=collator)
    metrics = evaluate_model(model, val_loader, val_set.coco_ground_truth())
    model.save_pretrained(out / "model")  # a plain RT-DETR checkpoint: the loss is not part of it
    processor.save_pretrained(out / "model")
    result = {"loss": "rt_detr" if args.own_loss else "align_detr", "train_loss": train_result.training_loss,
              "steps": train_result.global_step, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(f"COCO mAP {metrics['map']:.3f}  AP50 {metrics['map_50']:.3f}  AP75 {metrics['map_75']:.3f} "
          f"({result['loss']} loss, {result['steps']} steps)")
    return result


if __name__ == "__main__":
    main()
