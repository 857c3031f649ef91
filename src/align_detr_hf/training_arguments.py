"""The command line the two example training scripts share (`examples/train_trainer.py` and
`examples/train_accelerate.py`), defined once: the data, model, recipe and run flags in the package's flag
vocabulary (`flags.py`: transformers' names, both spellings, the help of `TRAINING_FLAG_HELP`), and what the scripts
build from them (recipe, datasets, model).

    parser = argparse.ArgumentParser()
    add_training_arguments(parser)           # or the groups one by one: add_data_arguments(parser), ...
    parser.add_argument(...)                 # the script's own flags
    args = document_flags(parser).parse_args()
    recipe = recipe_from_args(args)
    train_set, val_set, scale = datasets_from_args(args, recipe, data_dir)
    model = model_from_args(args, train_set.id2label, recipe)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path

from .configuration_align_detr import LOSS_TYPES
from .data import build_eval_transforms, load_train_val_datasets
from .flags import add_deprecated_alias, add_flag
from .modeling_align_detr import AlignDetrForObjectDetection
from .recipes import (
    AUGMENTATIONS,
    RECIPES,
    TrainingRecipe,
    apply_recipe_to_model,
    build_model,
    build_recipe_transforms,
    describe_recipe,
    image_scale_for,
    recipe_for_job,
    resolve_recipe,
)

__all__ = [
    "add_data_arguments",
    "add_model_arguments",
    "add_recipe_arguments",
    "add_run_arguments",
    "add_training_arguments",
    "datasets_from_args",
    "model_from_args",
    "recipe_from_args",
]

_BOOL = argparse.BooleanOptionalAction


def add_data_arguments(parser) -> None:
    """Where the images come from (a COCO folder, a `datasets` name, or synthetic shapes) and how they are loaded."""
    group = parser.add_argument_group("data")
    for name in ("train_annotation", "train_images", "val_annotation", "val_images", "dataset_name"):
        add_flag(group, name)
    add_flag(group, "train_split", default="train")
    add_flag(group, "val_split", default="validation")
    add_flag(group, "train_val_split", type=float, default=0.15)
    add_flag(group, "synthetic_shapes", type=int, default=0)
    add_flag(group, "synthetic_image_size", type=int, default=128)
    add_flag(group, "synthetic_num_classes", type=int, default=3)
    add_flag(group, "dataloader_num_workers", type=int, default=None, deprecated=("num_workers",))
    # earlier spellings of the switches (their --no- forms too)
    add_deprecated_alias(group, add_flag(group, "dataloader_pin_memory", action=_BOOL),
                         "--pin_memory", "--no-pin_memory")
    add_deprecated_alias(group, add_flag(group, "dataloader_persistent_workers", action=_BOOL),
                         "--persistent_workers", "--no-persistent_workers")


def add_model_arguments(parser) -> None:
    """A pretrained checkpoint to fine-tune, or the architecture to train from scratch, and the loss."""
    group = parser.add_argument_group("model")
    add_flag(group, "model_name_or_path")
    add_flag(group, "ignore_mismatched_sizes", action="store_true")
    add_flag(group, "loss_type", choices=LOSS_TYPES, default=None,
             help="training loss: align_detr or dino (DINO's focal loss); default: the model config's")
    add_flag(group, "config_name")
    add_flag(group, "demo_model", action="store_true")
    add_flag(group, "d_model", type=int, default=64)
    add_flag(group, "num_queries", type=int, default=30)


def add_recipe_arguments(parser) -> None:
    """The recipe (`align_detr_hf.recipes`) and a flag per field that overrides it (default None: the recipe's)."""
    group = parser.add_argument_group("recipe (default: the recipe's value; see align_detr_hf.recipes)")
    add_flag(group, "recipe", choices=["auto", *RECIPES], default="auto")
    add_flag(group, "image_scale", type=float)
    add_flag(group, "augment", choices=AUGMENTATIONS)
    add_flag(group, "filter_empty_gt", action=_BOOL)
    add_flag(group, "filter_min_size", type=int)
    add_flag(group, "group_by_aspect_ratio", action=_BOOL)
    add_flag(group, "train_stem", action=_BOOL)
    add_flag(group, "num_train_epochs", type=int)
    add_flag(group, "max_steps", type=int, deprecated=("max_train_steps",))
    add_flag(group, "per_device_train_batch_size", type=int)
    for name in ("learning_rate", "weight_decay", "backbone_lr_mult", "max_grad_norm"):
        add_flag(group, name, type=float)
    add_flag(group, "warmup_steps", type=int)
    add_flag(group, "warmup_start_factor", type=float)
    add_flag(group, "lr_drop_epochs", type=int, nargs="*")
    add_flag(group, "lr_drop_fraction", type=float)


def add_run_arguments(parser) -> None:
    """The output folder, its run identity and checkpoints, logging and the Hub."""
    group = parser.add_argument_group("run")
    add_flag(group, "output_dir", required=True)
    add_flag(group, "overwrite_output_dir", action="store_true")
    add_flag(group, "resume_from_checkpoint")
    add_flag(group, "seed", type=int, default=42)
    add_flag(group, "per_device_eval_batch_size", type=int, default=4)
    add_flag(group, "gradient_accumulation_steps", type=int, default=1)
    add_flag(group, "save_total_limit", type=int, default=2, deprecated=("checkpoints_total_limit",))
    add_flag(group, "logging_steps", type=int, default=50)
    add_flag(group, "report_to", default="none")
    add_flag(group, "push_to_hub", action="store_true")
    add_flag(group, "hub_model_id")


def add_training_arguments(parser) -> None:
    """Every shared group: data, model, recipe, run."""
    for add in (add_data_arguments, add_model_arguments, add_recipe_arguments, add_run_arguments):
        add(parser)


def recipe_from_args(args) -> TrainingRecipe:
    """The job's recipe (`finetune` for a pretrained checkpoint, `from_scratch` otherwise) with the flags applied."""
    fields = {"augment", "image_scale", "learning_rate", "weight_decay", "backbone_lr_mult", "train_stem",
              "warmup_steps", "warmup_start_factor", "lr_drop_epochs", "lr_drop_fraction", "num_train_epochs",
              "max_grad_norm", "filter_empty_gt", "filter_min_size", "group_by_aspect_ratio"}
    overrides = {name: getattr(args, name) for name in fields}
    overrides["max_train_steps"] = args.max_steps if args.max_steps is None or args.max_steps > 0 else None
    overrides["batch_size"] = args.per_device_train_batch_size
    return resolve_recipe(recipe_for_job(args.recipe, pretrained=bool(args.model_name_or_path)), overrides)


def datasets_from_args(args, recipe: TrainingRecipe, data_dir: str | Path, log: Callable[[str], None] = print):
    """The training and validation sets the flags name, filtered and given the recipe's transforms, and the image
    scale they were given (`(train_set, val_set, scale)`). Synthetic data is generated into `data_dir`."""
    train_set, val_set = load_train_val_datasets(
        args.train_annotation, args.train_images, args.val_annotation, args.val_images, args.dataset_name,
        args.train_split, args.val_split, args.train_val_split, args.synthetic_shapes, Path(data_dir),
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
    return train_set, val_set.with_transforms(build_eval_transforms(scale=scale)), scale


def model_from_args(args, id2label: Mapping[int, str], recipe: TrainingRecipe) -> AlignDetrForObjectDetection:
    """The model the flags name (a checkpoint, a config, the small preset or the default), the recipe's frozen parts
    applied and `--loss_type` set in its config (which the model builds its loss from, and which is saved with it)."""
    model = build_model(id2label, args.model_name_or_path, args.config_name, args.demo_model, args.d_model,
                        args.num_queries, args.ignore_mismatched_sizes)
    apply_recipe_to_model(model, recipe)
    if args.loss_type:
        model.config.loss_type = args.loss_type
    return model
