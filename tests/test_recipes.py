"""Training recipes: chosen by the job, overridable field by field, one definition shared by the demo and scripts."""

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from align_detr_hf import AlignDetrForObjectDetection
from align_detr_hf.data import load_coco_folder
from align_detr_hf.recipes import (
    FINETUNE,
    FROM_SCRATCH,
    apply_recipe_to_model,
    build_recipe_transforms,
    describe_recipe,
    eval_image_processor,
    lr_milestones,
    native_image_scale,
    recipe_for_job,
    resolve_recipe,
)
from align_detr_hf.synthetic import generate_shapes_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_job_picks_the_recipe():
    assert recipe_for_job("auto", pretrained=True) is FINETUNE
    assert recipe_for_job("auto", pretrained=False) is FROM_SCRATCH
    assert recipe_for_job("finetune", pretrained=False) is FINETUNE
    with pytest.raises(ValueError, match="Unknown recipe 'fast'"):
        recipe_for_job("fast")


def test_finetune_is_the_reference_config():
    # spec 2.11-2.12: multi-scale + crop, backbone lr x0.1, stem frozen, AdamW 1e-4 / 1e-4, clip 0.1, LinearLR over
    # 2000 iterations from 1e-4, x0.1 after epoch 11 of 12, filter_cfg=dict(filter_empty_gt=True, min_size=32)
    r = FINETUNE
    assert (r.augment, r.image_scale, r.backbone_lr_mult, r.train_stem) == ("reference", 1.0, 0.1, False)
    assert (r.learning_rate, r.weight_decay, r.max_grad_norm) == (1e-4, 1e-4, 0.1)
    assert (r.warmup_steps, r.warmup_start_factor, r.lr_drop_epochs, r.num_train_epochs) == (2000, 1e-4, (11,), 12)
    assert (r.filter_empty_gt, r.filter_min_size, r.group_by_aspect_ratio, r.batch_size) == (True, 32, True, 2)


def test_overrides_replace_single_fields_and_whole_pairs():
    r = resolve_recipe(FROM_SCRATCH, {"learning_rate": 1e-3, "filter_empty_gt": True, "augment": None})
    assert r.learning_rate == 1e-3 and r.filter_empty_gt is True and r.augment == "flip" and r.name == "from_scratch"
    # an epoch count replaces the recipe's step count; lr drops by epoch replace the drop fraction
    r = resolve_recipe(FROM_SCRATCH, {"num_train_epochs": 3, "lr_drop_epochs": [2]})
    assert (r.num_train_epochs, r.max_train_steps, r.lr_drop_epochs, r.lr_drop_fraction) == (3, None, (2,), None)
    assert lr_milestones(r, steps_per_epoch=10, max_steps=30) == [20]
    assert lr_milestones(resolve_recipe(FINETUNE, {"lr_drop_epochs": []}), 10, 120) == []  # no drop at all
    assert lr_milestones(FROM_SCRATCH, steps_per_epoch=75, max_steps=2000) == [1600]  # the demo's 80%
    assert lr_milestones(FINETUNE, steps_per_epoch=7330, max_steps=12 * 7330) == [11 * 7330]
    for bad, match in [({"augment": "mosaic"}, "augment"), ({"lr_drop_fraction": 1.5}, "lr_drop_fraction"),
                       ({"image_scale": 0.0}, "image_scale"), ({"batch_size": 0}, "batch_size"),
                       ({"epochs": 3}, "Not recipe fields")]:
        with pytest.raises(ValueError, match=match):
            resolve_recipe(FINETUNE, bad)


def test_describe_names_the_recipe_and_every_field():
    line = describe_recipe(FROM_SCRATCH, image_scale=0.16)
    assert line.startswith("recipe from_scratch: ") and "image_scale=native (0.16)" in line
    assert "filter_empty_gt=False" in line and "filter_min_size=0" in line and "backbone_lr_mult=1.0" in line
    assert "filter_empty_gt=True, filter_min_size=32" in describe_recipe(FINETUNE)


def test_stem_is_trained_only_from_scratch():
    def stem_trainable(recipe):
        model = AlignDetrForObjectDetection(tiny_config())
        apply_recipe_to_model(model, recipe)
        flags = {p.requires_grad for p in model.model.backbone.model.embedder.parameters()}
        assert len(flags) == 1
        return flags.pop()

    assert stem_trainable(FROM_SCRATCH) is True
    assert stem_trainable(FINETUNE) is False
    model = AlignDetrForObjectDetection(tiny_config())
    apply_recipe_to_model(model, FROM_SCRATCH)
    assert model.config.freeze_backbone_stages == -1  # recorded in the config: reloads with the stem trainable
    assert all(p.requires_grad for p in model.model.backbone.parameters())
    with pytest.raises(ValueError, match="frozen stages"):
        apply_recipe_to_model(AlignDetrForObjectDetection(tiny_config(freeze_backbone_stages=1)), FROM_SCRATCH)


def test_flip_recipe_keeps_native_size_and_reference_recipe_rescales(tmp_path):
    ann = generate_shapes_dataset(tmp_path, num_images=3, image_size=128, seed=0)
    ds = load_coco_folder(ann)
    scale = native_image_scale(ds)
    assert scale == pytest.approx(128 / 800)
    assert eval_image_processor(scale).size == {"shortest_edge": 128, "longest_edge": 213}
    flip = ds.with_transforms(build_recipe_transforms("flip", scale))
    plain = ds.with_transforms(None)
    flipped_any = False
    for epoch in range(4):
        flip.set_epoch(epoch)
        out, ref = flip[0], plain[0]
        assert out["pixel_values"].shape == (3, 128, 128)
        same = torch.equal(out["pixel_values"], ref["pixel_values"])
        mirrored = torch.equal(out["pixel_values"], ref["pixel_values"].flip(-1))
        assert same or mirrored  # a flip and nothing else: no resampling at the native size
        flipped_any |= mirrored and not same
    assert flipped_any
    reference = ds.with_transforms(build_recipe_transforms("reference", scale))
    sizes = set()
    for epoch in range(6):
        reference.set_epoch(epoch)
        sizes.add(tuple(reference[0]["pixel_values"].shape[1:]))
    assert len(sizes) > 1 and all(min(s) >= round(480 * scale) - 1 for s in sizes)


def test_demo_defaults_are_the_from_scratch_recipe():
    from align_detr_hf.demo import build_parser

    args = build_parser().parse_args([])
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate, args.warmup_steps, args.augment) == (
        FROM_SCRATCH.max_train_steps, FROM_SCRATCH.batch_size, FROM_SCRATCH.learning_rate,
        FROM_SCRATCH.warmup_steps, FROM_SCRATCH.augment)


@pytest.mark.parametrize("script", ["train_accelerate", "train_trainer"])
def test_scripts_pick_the_recipe_by_the_job_and_apply_flags(script):
    module = _load_example(script)
    steps_flag = "--max_steps"  # one name in both scripts
    scratch = module.recipe_from_args(module.parse_args(["--output_dir", "x", "--demo_model"]))
    assert scratch == FROM_SCRATCH
    tuned = module.recipe_from_args(module.parse_args(["--output_dir", "x", "--model_name_or_path", "ckpt"]))
    assert tuned == FINETUNE
    overridden = module.recipe_from_args(module.parse_args(
        ["--output_dir", "x", "--model_name_or_path", "ckpt", "--no-filter_empty_gt", "--filter_min_size", "0",
         "--augment", "flip", "--backbone_lr_mult", "1", "--train_stem", "--no-group_by_aspect_ratio",
         "--learning_rate", "2e-4", steps_flag, "100", "--lr_drop_fraction", "0.5", "--per_device_train_batch_size",
         "4", "--warmup_start_factor", "0.5", "--image_scale", "0.5"]))
    assert overridden.name == "finetune"
    assert (overridden.filter_empty_gt, overridden.filter_min_size, overridden.augment) == (False, 0, "flip")
    assert (overridden.backbone_lr_mult, overridden.train_stem, overridden.group_by_aspect_ratio) == (1.0, True, False)
    assert (overridden.learning_rate, overridden.max_train_steps, overridden.num_train_epochs) == (2e-4, 100, None)
    assert (overridden.lr_drop_fraction, overridden.lr_drop_epochs, overridden.batch_size) == (0.5, None, 4)
    assert (overridden.warmup_start_factor, overridden.image_scale) == (0.5, 0.5)
    forced = module.recipe_from_args(module.parse_args(["--output_dir", "x", "--demo_model", "--recipe", "finetune"]))
    assert forced == FINETUNE
