"""One vocabulary for command-line flags: transformers' names (`--output_dir`, `--max_steps`, ...) spelled with
underscores or hyphens, old spellings kept as deprecated aliases that still work and print a note."""

from __future__ import annotations

import argparse
import sys

__all__ = ["TRAINING_FLAG_HELP", "add_deprecated_alias", "add_flag", "document_flags"]


def _spellings(name: str) -> list[str]:
    underscored = "--" + name.lstrip("-").replace("-", "_")
    hyphenated = underscored.replace("_", "-")
    return [underscored] if hyphenated == underscored else [underscored, hyphenated]


def add_flag(container, name: str, *, aliases=(), deprecated=(), **kwargs) -> argparse.Action:
    """Add `--name` in both spellings (`--output_dir`, `--output-dir`), and its short `aliases` (`--model` for
    `--model_name_or_path`); `deprecated` names (e.g. `steps` for `max_steps`) are accepted too, in both spellings,
    hidden from --help, with a note on stderr when used."""
    names = [spelling for n in (name, *aliases) for spelling in _spellings(n)]
    action = container.add_argument(*names, dest=kwargs.pop("dest", name.replace("-", "_")), **kwargs)
    for old in deprecated:
        add_deprecated_alias(container, action, *_spellings(old))
    return action


class _DeprecatedAlias(argparse.Action):
    """An old option string of `target`: parses as it does, stores through it, notes the new name on stderr."""

    def __init__(self, option_strings, dest, target: argparse.Action, **kwargs):
        super().__init__(option_strings, dest=target.dest, nargs=target.nargs, const=target.const,
                         default=argparse.SUPPRESS, type=target.type, choices=target.choices, help=argparse.SUPPRESS,
                         metavar=target.metavar)
        self.target = target

    def __call__(self, parser, namespace, values, option_string=None):
        negative = option_string.startswith("--no-")  # --no-x of a BooleanOptionalAction maps to its --no-y
        new = next((s for s in self.target.option_strings if s.startswith("--no-") == negative),
                   self.target.option_strings[0])
        print(f"{parser.prog}: note: {option_string} is deprecated; use {new}", file=sys.stderr)
        self.target(parser, namespace, values, new)


def add_deprecated_alias(container, action: argparse.Action, *option_strings: str) -> None:
    """Accept `option_strings` (old spellings) for `action`, hidden from --help, with a deprecation note."""
    container.add_argument(*option_strings, action=_DeprecatedAlias, target=action)


# Help of the flags the example scripts share (one text per name; a script's own help text wins).
TRAINING_FLAG_HELP = {
    "train_annotation": "COCO json of the training set",
    "train_images": "image folder of the training set",
    "val_annotation": "COCO json of the validation set",
    "val_images": "image folder of the validation set",
    "dataset_name": "datasets name or save_to_disk folder with the `objects` schema",
    "train_split": "training split of --dataset_name (default train)",
    "val_split": "validation split of --dataset_name (default validation; split off the training set if absent)",
    "train_val_split": "fraction of the training set held out for validation when there is no validation split",
    "synthetic_shapes": "generate N synthetic shapes images instead of reading data",
    "synthetic_image_size": "side of the synthetic images (pixels)",
    "synthetic_num_classes": "1-4 (the demo uses 3)",
    "recipe": "auto: finetune with --model_name_or_path, from_scratch otherwise",
    "image_scale": "multiply every resize/crop size of the reference pipeline (e.g. 0.16 for 128px images)",
    "augment": "reference (multi-scale resize + crop), flip (flip at the eval size) or none",
    "filter_empty_gt": "drop training images without any annotation (mmdet filter_cfg)",
    "filter_min_size": "drop training images whose shorter side is below this (pixels)",
    "group_by_aspect_ratio": "batch images of one orientation together (mmdet AspectRatioBatchSampler)",
    "train_stem": "train the backbone stem (frozen for pretrained models)",
    "model_name_or_path": "pretrained Align-DETR (folder or Hub id)",
    "ignore_mismatched_sizes": "re-initialise class heads whose size differs (new classes)",
    "config_name": "AlignDetrConfig json for training from scratch",
    "demo_model": "from scratch: the small demo architecture",
    "d_model": "transformer width of --demo_model",
    "num_queries": "object queries of --demo_model",
    "output_dir": "folder for checkpoints, the final model and results",
    "overwrite_output_dir": "write into a folder holding another run's checkpoints/final model",
    "num_train_epochs": "training epochs (default: the recipe's)",
    "max_steps": "optimizer steps; overrides the epochs (default: the recipe's)",
    "per_device_train_batch_size": "training images per device and step (default: the recipe's)",
    "per_device_eval_batch_size": "evaluation images per device and step",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "learning_rate": "peak learning rate of AdamW (default: the recipe's)",
    "weight_decay": "AdamW weight decay (default: the recipe's; none on norm layers)",
    "backbone_lr_mult": "backbone learning rate multiplier (default: the recipe's)",
    "max_grad_norm": "gradient clipping norm (default: the recipe's)",
    "warmup_steps": "linear warm-up steps (default: the recipe's)",
    "warmup_start_factor": "learning rate factor at the first warm-up step (default: the recipe's)",
    "lr_drop_epochs": "epochs after which the learning rate is multiplied by 0.1",
    "lr_drop_fraction": "or: multiply the learning rate by 0.1 at this fraction of the steps",
    "eval_strategy": "when to evaluate COCO mAP: no, steps or epoch",
    "eval_steps": "evaluate every N steps with --eval_strategy steps",
    "save_strategy": "when to save checkpoints: no, steps or epoch",
    "save_steps": "save every N steps with --save_strategy steps",
    "save_total_limit": "checkpoints of this run to keep (older ones are deleted)",
    "logging_steps": "log the loss and learning rate every N steps",
    "fp16": "float16 mixed precision (CUDA)",
    "bf16": "bfloat16 mixed precision",
    "seed": "random seed (data order, augmentation, initialisation)",
    "dataloader_num_workers": "data worker processes (default min(4, cores))",
    "dataloader_pin_memory": "pin batches in memory (default: when CUDA is available)",
    "dataloader_persistent_workers": "keep worker processes between epochs (default: when there are workers)",
    "report_to": "experiment tracker to log to (e.g. tensorboard, wandb, none)",
    "push_to_hub": "push the final model (weights, processor, code, model card) to the Hub",
    "hub_model_id": "Hub repository of --push_to_hub (default: the output folder's name)",
    "resume_from_checkpoint": "a checkpoint folder, or 'latest' (of this folder's run)",
}


def document_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give each flag of `parser` without a help text the shared one of [`TRAINING_FLAG_HELP`]."""
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        if action.help is None and action.dest in TRAINING_FLAG_HELP:
            action.help = TRAINING_FLAG_HELP[action.dest]
    return parser
