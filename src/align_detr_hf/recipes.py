"""Training recipes: one definition per kind of job, shared by the demo and both example scripts.

A recipe is every training choice that depends on *what* is trained rather than on the data source: augmentation,
image scale, learning rates, frozen parts, schedule, dataset filtering and batching. Two are defined:

- `finetune` (the reference, spec sections 2.11-2.12): a pretrained checkpoint on COCO-sized images. Multi-scale
  480-800 resize and crop, backbone lr x0.1, frozen stem, AdamW lr 1e-4, 2000-step warm-up, lr x0.1 after epoch 11
  of 12, mmdet's `filter_cfg=dict(filter_empty_gt=True, min_size=32)`, aspect-ratio grouped batches of 2 per device.
- `from_scratch` (the CPU demo's): a randomly initialised network on small images. Horizontal flip only, at the
  data's native size; backbone and stem trained at the full lr; lr 5e-4, batch 8, 30-step warm-up, lr x0.1 at 80% of
  2000 steps. It does not filter by default: `min_size=32` counts pixels of COCO-sized images and would drop whole
  data sets of small images (28 px digits, 32 px tiles), and images without objects are valid background examples
  for a model that starts from nothing; both filters stay available as flags.

Why two: the reference recipe is right for fine-tuning and far behind from scratch (measured on a small set: mAP 0.036
vs 0.46 with the same network, data, steps and lr), because heavy scale jitter and a 10x slower, partly frozen
backbone slow down a network that must first learn its features.

[`recipe_for_job`] picks `finetune` when a pretrained checkpoint is loaded and `from_scratch` otherwise;
[`resolve_recipe`] applies per-field overrides (the scripts' flags) and [`describe_recipe`] prints it.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from typing import Any

from torch import nn

from .configuration_align_detr import AlignDetrConfig
from .data import Compose, RandomHorizontalFlip, build_eval_transforms, build_train_transforms
from .image_processing_align_detr import AlignDetrImageProcessor
from .modeling_align_detr import AlignDetrForObjectDetection
from .optim import (
    REFERENCE_BACKBONE_LR_MULT,
    REFERENCE_LR,
    REFERENCE_MAX_GRAD_NORM,
    REFERENCE_WARMUP_START_FACTOR,
    REFERENCE_WARMUP_STEPS,
    REFERENCE_WEIGHT_DECAY,
    lr_factor,
)

__all__ = [
    "FINETUNE",
    "FROM_SCRATCH",
    "RECIPES",
    "FittedSchedule",
    "TrainingRecipe",
    "apply_recipe_to_model",
    "build_model",
    "build_recipe_transforms",
    "describe_recipe",
    "eval_image_processor",
    "fit_schedule",
    "lr_milestones",
    "native_image_scale",
    "recipe_for_job",
    "resolve_recipe",
]

# the reference pipeline's test-time sizes; `image_scale` multiplies both
REFERENCE_SHORTEST_EDGE = 800
REFERENCE_LONGEST_EDGE = 1333


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """Every training choice that depends on the kind of job. `None` means "decided elsewhere" where noted."""

    name: str
    augment: str  # "reference" (multi-scale resize + crop), "flip" (flip, eval resize) or "none" (eval resize)
    image_scale: float | None  # multiplies the reference sizes (800/1333); None: the data's native size
    learning_rate: float
    weight_decay: float
    backbone_lr_mult: float
    train_stem: bool  # the model freezes its stem (right for pretrained weights); from scratch it must learn
    warmup_steps: int
    warmup_start_factor: float
    lr_drop_epochs: tuple[int, ...] | None  # lr x0.1 after these epochs ...
    lr_drop_fraction: float | None  # ... or at this fraction of the optimisation steps
    num_train_epochs: int | None  # training length: epochs, or
    max_train_steps: int | None  # optimisation steps (wins when set)
    batch_size: int  # per device
    max_grad_norm: float
    filter_empty_gt: bool  # drop images without any annotation (mmdet filter_cfg)
    filter_min_size: int  # drop images whose shorter side is below this (pixels)
    group_by_aspect_ratio: bool  # batches of one orientation (mmdet AspectRatioBatchSampler)


FINETUNE = TrainingRecipe(
    name="finetune",
    augment="reference",
    image_scale=1.0,
    learning_rate=REFERENCE_LR,
    weight_decay=REFERENCE_WEIGHT_DECAY,
    backbone_lr_mult=REFERENCE_BACKBONE_LR_MULT,
    train_stem=False,
    warmup_steps=REFERENCE_WARMUP_STEPS,
    warmup_start_factor=REFERENCE_WARMUP_START_FACTOR,
    lr_drop_epochs=(11,),
    lr_drop_fraction=None,
    num_train_epochs=12,
    max_train_steps=None,
    batch_size=2,
    max_grad_norm=REFERENCE_MAX_GRAD_NORM,
    filter_empty_gt=True,
    filter_min_size=32,
    group_by_aspect_ratio=True,
)

FROM_SCRATCH = TrainingRecipe(
    name="from_scratch",
    augment="flip",
    image_scale=None,
    learning_rate=5e-4,
    weight_decay=REFERENCE_WEIGHT_DECAY,
    backbone_lr_mult=1.0,
    train_stem=True,
    warmup_steps=30,
    warmup_start_factor=0.01,
    lr_drop_epochs=None,
    lr_drop_fraction=0.8,
    num_train_epochs=None,
    max_train_steps=2000,
    batch_size=8,
    max_grad_norm=REFERENCE_MAX_GRAD_NORM,
    filter_empty_gt=False,
    filter_min_size=0,
    group_by_aspect_ratio=True,
)

RECIPES = {recipe.name: recipe for recipe in (FROM_SCRATCH, FINETUNE)}
AUGMENTATIONS = ("reference", "flip", "none")


def recipe_for_job(recipe: str = "auto", pretrained: bool = False) -> TrainingRecipe:
    """`auto`: `finetune` when a pretrained checkpoint is loaded, `from_scratch` otherwise; or a recipe by name."""
    if recipe == "auto":
        return FINETUNE if pretrained else FROM_SCRATCH
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r}; choose 'auto' or one of {sorted(RECIPES)}.")
    return RECIPES[recipe]


def resolve_recipe(recipe: TrainingRecipe, overrides: Mapping[str, Any]) -> TrainingRecipe:
    """`recipe` with the fields of `overrides` that are not None replaced (the scripts pass their flags, whose
    defaults are None). Giving either training length (`num_train_epochs` / `max_train_steps`) replaces both, and
    either lr drop (`lr_drop_epochs` / `lr_drop_fraction`) replaces both, so a flag never mixes with the recipe's
    other half."""
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(TrainingRecipe)}
    if unknown:
        raise ValueError(f"Not recipe fields: {sorted(unknown)}.")
    for pair in (("num_train_epochs", "max_train_steps"), ("lr_drop_epochs", "lr_drop_fraction")):
        if any(k in given for k in pair):
            given = {**{k: None for k in pair}, **given}
    if "lr_drop_epochs" in given and given["lr_drop_epochs"] is not None:
        given["lr_drop_epochs"] = tuple(int(e) for e in given["lr_drop_epochs"])
    resolved = dataclasses.replace(recipe, **given)
    _check(resolved)
    return resolved


def _check(recipe: TrainingRecipe) -> None:
    if recipe.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {recipe.augment!r}.")
    if recipe.image_scale is not None and not recipe.image_scale > 0:
        raise ValueError(f"image_scale must be > 0, got {recipe.image_scale}.")
    if recipe.lr_drop_fraction is not None and not 0.0 < recipe.lr_drop_fraction <= 1.0:
        raise ValueError(f"lr_drop_fraction must be in (0, 1], got {recipe.lr_drop_fraction}.")
    if recipe.num_train_epochs is None and recipe.max_train_steps is None:
        raise ValueError("A recipe needs a training length: num_train_epochs or max_train_steps.")
    for name in ("learning_rate", "batch_size"):
        if not getattr(recipe, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(recipe, name)}.")


def describe_recipe(recipe: TrainingRecipe, image_scale: float | None = None) -> str:
    """One line naming the recipe and every field, for the start of a run."""
    fields = dataclasses.asdict(recipe)
    name = fields.pop("name")
    if image_scale is not None and recipe.image_scale is None:
        fields["image_scale"] = f"native ({image_scale:.4g})"
    return f"recipe {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items())


def lr_milestones(recipe: TrainingRecipe, steps_per_epoch: int, max_steps: int) -> list[int]:
    """Optimisation steps at which the lr drops x0.1."""
    if recipe.lr_drop_fraction is not None:
        return [int(max_steps * recipe.lr_drop_fraction)]
    return [int(e) * steps_per_epoch for e in recipe.lr_drop_epochs or ()]


@dataclasses.dataclass(frozen=True)
class FittedSchedule:
    """A step schedule fitted to a time budget: `max_steps` optimisation steps, linear warm-up over `warmup_steps`,
    lr x0.1 at each of `milestones`. `full_steps` is the recipe's length it was scaled down from."""

    max_steps: int
    warmup_steps: int
    milestones: tuple[int, ...]
    full_steps: int
    warmup_start_factor: float

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.warmup_steps, self.warmup_start_factor, self.milestones)

    def describe(self) -> str:
        scaled = "the full schedule" if self.max_steps == self.full_steps else f"scaled from {self.full_steps}"
        drops = ", ".join(str(m) for m in self.milestones) or "never"
        return f"{self.max_steps} steps ({scaled}), warm-up {self.warmup_steps} steps, lr x0.1 at step {drops}"


def fit_schedule(
    recipe: TrainingRecipe,
    step_seconds: float,
    budget_seconds: float,
    steps_done: int = 0,
    previous: FittedSchedule | None = None,
    min_steps: int = 1,
) -> FittedSchedule:
    """The recipe's step schedule scaled to what fits in `budget_seconds` (from step `steps_done` on) at
    `step_seconds` per step: never longer than the recipe, warm-up and lr drop at the recipe's fractions of the new
    length, so a slow machine runs a shorter but complete schedule (the lr drops before the end).

    With `previous` (a re-fit during training, as the measured step time changes), the parts already run are kept:
    its warm-up, and its lr drop once passed."""
    if recipe.max_train_steps is None or recipe.lr_drop_fraction is None:
        raise ValueError("fit_schedule needs a recipe measured in steps (max_train_steps and lr_drop_fraction).")
    if not (step_seconds > 0 and budget_seconds >= 0):
        raise ValueError(f"step_seconds must be > 0 and budget_seconds >= 0, got {step_seconds}, {budget_seconds}.")
    full = recipe.max_train_steps
    affordable = steps_done + int(budget_seconds / step_seconds)
    steps = max(min(full, affordable), min_steps, steps_done + 1 if steps_done < full else full)
    warmup = round(recipe.warmup_steps * steps / full) if recipe.warmup_steps > 0 else 0
    drop = int(steps * recipe.lr_drop_fraction)
    if recipe.lr_drop_fraction < 1.0:  # the drop lands before the last step, so the schedule completes it
        drop = max(1, min(drop, steps - 1)) if steps > 1 else drop
    if previous is not None:
        warmup = previous.warmup_steps if steps_done > 0 else warmup
        passed = [m for m in previous.milestones if m <= steps_done]
        if passed:  # the lr has dropped: the end may come earlier, not later (the drop stays near 80%)
            drop = passed[0]
            steps = min(steps, max(previous.max_steps, steps_done + 1))
        else:
            drop = max(drop, steps_done)  # a drop cannot be placed in the past
    milestones = (drop,) if drop < steps or recipe.lr_drop_fraction >= 1.0 else ()
    return FittedSchedule(steps, min(warmup, steps), milestones, full, recipe.warmup_start_factor)


def native_image_scale(dataset) -> float:
    """The `image_scale` at which the reference shorter side (800) becomes the data's median shorter side, so the
    eval resize (and the saved image processor) keep images at about their own size."""
    sides = [min(r["width"], r["height"]) for r in dataset.records]
    if not sides:
        raise ValueError("Cannot derive a native image scale from an empty dataset.")
    return float(statistics.median(sides)) / REFERENCE_SHORTEST_EDGE


def image_scale_for(recipe: TrainingRecipe, dataset) -> float:
    return recipe.image_scale if recipe.image_scale is not None else native_image_scale(dataset)


def build_recipe_transforms(augment: str, scale: float):
    """The train transforms of an `augment` choice at `scale`: "reference" = [`build_train_transforms`], "flip" =
    horizontal flip then the eval resize (a no-op at the native size, as in the demo), "none" = the eval resize."""
    if augment == "reference":
        return build_train_transforms(scale=scale)
    if augment == "flip":
        return Compose([RandomHorizontalFlip(0.5), *build_eval_transforms(scale=scale).transforms])
    if augment == "none":
        return build_eval_transforms(scale=scale)
    raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}.")


def eval_image_processor(scale: float) -> AlignDetrImageProcessor:
    """The image processor that resizes as the eval transforms at `scale` do (saved next to trained models)."""
    return AlignDetrImageProcessor(
        size={
            "shortest_edge": max(1, round(REFERENCE_SHORTEST_EDGE * scale)),
            "longest_edge": max(1, round(REFERENCE_LONGEST_EDGE * scale)),
        }
    )


def apply_recipe_to_model(model: nn.Module, recipe: TrainingRecipe) -> None:
    """If the recipe trains the stem, set the model's `freeze_backbone_stages` to -1 (train the whole backbone, as
    mmdetection's `frozen_stages=-1`) and unfreeze it; the config then records it, so a saved from-scratch model
    reloads with its stem trainable. Models freeze the stem by default (0), as the reference does."""
    if not recipe.train_stem:
        return
    frozen_stages = model.config.freeze_backbone_stages
    if frozen_stages > 0:
        raise ValueError(
            f"train_stem=True but the model freezes the stem and {frozen_stages} stage(s) "
            "(freeze_backbone_stages); the stem cannot train under frozen stages. Use --no-train_stem."
        )
    encoder = model.model.backbone
    model.config.freeze_backbone_stages = -1
    encoder.frozen_stages = -1
    encoder.model.requires_grad_(True)
    encoder.freeze()  # re-freezes what never trains (e.g. Swin's unused final norm)


def build_model(
    id2label: Mapping[int, str],
    model_name_or_path: str | None = None,
    config_name: str | None = None,
    demo_model: bool = False,
    d_model: int = 64,
    num_queries: int = 30,
    ignore_mismatched_sizes: bool = False,
) -> AlignDetrForObjectDetection:
    """The model of a training job: a pretrained checkpoint (with `id2label` for the new classes), else a random
    init from `config_name`, the small demo architecture, or the default (R-50) configuration."""
    id2label = {int(k): v for k, v in id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    if model_name_or_path:
        return AlignDetrForObjectDetection.from_pretrained(
            model_name_or_path, id2label=id2label, label2id=label2id, ignore_mismatched_sizes=ignore_mismatched_sizes
        )
    if config_name:
        config = AlignDetrConfig.from_pretrained(config_name, id2label=id2label, label2id=label2id)
    elif demo_model:
        from .demo import demo_config

        config = demo_config(id2label, d_model=d_model, num_queries=num_queries)
    else:
        config = AlignDetrConfig(id2label=id2label, label2id=label2id)
    return AlignDetrForObjectDetection(config)
