"""CPU demo: train a small Align-DETR from scratch on synthetic shapes, report COCO mAP, draw detections.

    align-detr demo --output_dir demo_out          # (or: python -m align_detr_hf.demo)

Nothing is downloaded: the dataset is generated (see [`align_detr_hf.synthetic`]) and the model is randomly
initialised. The defaults are sized for ~5-7 minutes on 2 CPU cores; `--time_budget_s` stops training early on a
slower machine (evaluation and drawing still run), so the demo always finishes.

Outputs in `--output_dir`: `data/{train,val}` (COCO folders), `model/` (save_pretrained + image processor),
`metrics.json` (COCO metrics, steps, wall time) and `detections.png` (val images, predictions with score > 0.3).
They may replace only what an earlier demo wrote there and nobody changed since (`--overwrite`: replace the demo's
outputs anyway; other files are kept); everything is checked before any work ([`file_io.claim_output`]).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .configuration_align_detr import AlignDetrConfig
from .data import build_eval_transforms, collate_fn, load_coco_folder
from .evaluation import evaluate_model
from .file_io import atomic_directory, check_output_folder, claim_output, owned_file
from .modeling_align_detr import AlignDetrForObjectDetection
from .optim import build_optimizer, build_scheduler
from .recipes import (
    FROM_SCRATCH,
    apply_recipe_to_model,
    build_recipe_transforms,
    describe_recipe,
    eval_image_processor,
    lr_milestones,
    resolve_recipe,
)
from .synthetic import generate_shapes_dataset

__all__ = ["build_parser", "demo_config", "main"]

WRITER = "align-detr demo"  # how the demo's outputs are recorded in their folders' manifests (file_io)
FOLDERS, FILES = ("data", "model"), ("metrics.json", "detections.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align-detr demo", description=__doc__.split("\n")[0])
    p.add_argument("--output_dir", "--output-dir", default="align_detr_demo")
    p.add_argument("--num_train_images", type=int, default=600)
    p.add_argument("--num_val_images", type=int, default=100)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--num_classes", type=int, default=3, choices=[1, 2, 3, 4], help="circle, square, triangle, cross")
    # the training defaults are the `from_scratch` recipe's (align_detr_hf.recipes), shared with the example scripts
    p.add_argument("--steps", type=int, default=FROM_SCRATCH.max_train_steps, help="optimisation steps")
    p.add_argument("--batch_size", type=int, default=FROM_SCRATCH.batch_size)
    p.add_argument("--lr", type=float, default=FROM_SCRATCH.learning_rate)
    p.add_argument("--warmup_steps", type=int, default=FROM_SCRATCH.warmup_steps)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--num_queries", type=int, default=30)
    p.add_argument("--augment", choices=["reference", "flip", "none"], default=FROM_SCRATCH.augment,
                   help="'reference' = the full Align-DETR recipe scaled to image_size (slower to converge)")
    p.add_argument("--time_budget_s", type=float, default=480.0, help="stop training after this many seconds")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score_threshold", type=float, default=0.3, help="for the drawing only")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that an earlier demo did not write or that were changed (other files are kept)")
    p.add_argument("--quiet", action="store_true")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError (one line, naming the flag) for arguments the demo cannot run with."""
    # image_size >= 64: the backbone's stride-32 stage keeps >= 2x2 pixels, which BatchNorm needs in a batch of one
    at_least = {"num_train_images": 1, "num_val_images": 1, "image_size": 64, "steps": 0, "batch_size": 1,
                "warmup_steps": 0, "num_queries": 1, "threads": 0}
    for name, low in at_least.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be at least {low}, got {getattr(args, name)}.")
    if args.d_model <= 0 or args.d_model % 32:
        raise ValueError(
            f"--d_model must be a positive multiple of 32 (the neck's GroupNorm has 32 groups), got {args.d_model}."
        )
    if args.d_model == 32 and args.image_size < 128:  # one channel per group on a 1x1 stride-64 level: one value
        raise ValueError(
            f"--d_model 32 needs --image_size of at least 128 (got {args.image_size}): GroupNorm(32) on the 1x1 "
            "smallest feature level would normalise a single value; use --d_model 64 or larger images."
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}.")
    if not args.time_budget_s > 0:
        raise ValueError(f"--time_budget_s must be positive, got {args.time_budget_s}.")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score_threshold must be between 0 and 1, got {args.score_threshold}.")


def check_output_dir(out: Path, overwrite: bool = False) -> None:
    """Fail before any work if an output could not be written: a file in the way, a read-only folder, or an output
    (`data/`, `model/`, `metrics.json`, `detections.png`) that would replace something an earlier demo did not write
    (unless `overwrite`)."""
    check_output_folder(out, "--output_dir", create=False)
    for name in FOLDERS:
        claim_output(out / name, WRITER, overwrite=overwrite, folder=True)
    for name in FILES:
        claim_output(out / name, WRITER, overwrite=overwrite)


def demo_config(id2label: dict[int, str], d_model: int = 64, num_queries: int = 30) -> AlignDetrConfig:
    """A ~1 M-parameter Align-DETR: 4-stage basic-block ResNet (16-128 channels), 2+2 layers."""
    return AlignDetrConfig(
        backbone_config={
            "model_type": "resnet",
            "embedding_size": 16,
            "hidden_sizes": [16, 32, 64, 128],
            "depths": [1, 1, 1, 1],
            "layer_type": "basic",
            "out_features": ["stage2", "stage3", "stage4"],
        },
        d_model=d_model,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_n_points=4,
        decoder_n_points=4,
        num_queries=num_queries,
        num_denoising_queries=30,
        id2label=id2label,
    )


def draw_detections(dataset, detections: list[dict], path: Path, id2label: dict, threshold: float, num: int = 8,
                    overwrite: bool = False):
    """A grid of the first `num` validation images (upscaled to 256 px) with their detections above `threshold`."""
    from PIL import Image

    from .visualize import draw_detections as draw

    tiles = []
    for index, det in list(enumerate(detections))[:num]:
        image = dataset.load_image(index)
        scale = 256 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
        kept = [
            {"label": id2label[label], "score": score, "box": [v * scale for v in box]}
            for score, label, box in zip(det["scores"].tolist(), det["labels"].tolist(), det["boxes"].tolist())
            if score > threshold
        ]
        tiles.append(draw(image, kept, label2id={name: i for i, name in id2label.items()}))
    cols = 4
    rows = max(1, math.ceil(len(tiles) / cols))
    canvas = Image.new("RGB", (cols * 256, rows * 256), (255, 255, 255))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % cols) * 256, (i // cols) * 256))
    with owned_file(path, WRITER, overwrite=overwrite) as temp:
        canvas.save(temp, format="PNG")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:  # impossible arguments and unwritable outputs: one line and exit code 2, before any work
        check_args(args)
        check_output_dir(Path(args.output_dir), args.overwrite)
    except (ValueError, OSError) as error:
        print(f"align-detr demo: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    start = time.perf_counter()
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)

    # ---- data
    from .synthetic import SHAPE_CLASSES

    classes = SHAPE_CLASSES[: args.num_classes]
    with atomic_directory(out / "data", WRITER, overwrite=args.overwrite) as staging:
        generate_shapes_dataset(staging / "train", args.num_train_images, args.image_size, seed=args.seed,
                                classes=classes)
        generate_shapes_dataset(staging / "val", args.num_val_images, args.image_size, seed=args.seed + 10_000,
                                classes=classes)
    train_ann, val_ann = (out / "data" / split / "annotations.json" for split in ("train", "val"))
    recipe = resolve_recipe(FROM_SCRATCH, {"augment": args.augment, "learning_rate": args.lr,
                                           "batch_size": args.batch_size, "warmup_steps": args.warmup_steps,
                                           "max_train_steps": args.steps})
    scale = args.image_size / 800.0  # the native size: the eval resize keeps the images as they are
    log(f"[demo] {describe_recipe(recipe, scale)}")
    train_set = load_coco_folder(train_ann, transforms=build_recipe_transforms(recipe.augment, scale), seed=args.seed)
    val_set = load_coco_folder(val_ann, transforms=build_eval_transforms(scale=scale))
    log(f"[demo] {len(train_set)} train / {len(val_set)} val images of {args.image_size}px, classes {classes} "
        f"({time.perf_counter() - start:.1f}s)")

    # ---- model: random init; from scratch the stem is trained too (the model freezes it for pretrained use)
    config = demo_config(train_set.id2label, args.d_model, args.num_queries)
    model = AlignDetrForObjectDetection(config)
    apply_recipe_to_model(model, recipe)
    optimizer = build_optimizer(model, recipe.learning_rate, recipe.weight_decay, recipe.backbone_lr_mult)
    scheduler = build_scheduler(optimizer, warmup_steps=recipe.warmup_steps,
                                warmup_start_factor=recipe.warmup_start_factor,
                                milestones=lr_milestones(recipe, len(train_set) // recipe.batch_size, args.steps))
    log(f"[demo] model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate_fn,
                                         generator=generator, drop_last=False)  # a lone short batch is a step
    model.train()
    step, epoch, train_start, running = 0, 0, time.perf_counter(), None
    stopped_early = False
    while step < args.steps and not stopped_early:
        train_set.set_epoch(epoch)
        steps_before = step
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if step % 25 == 0 or step == 1:
                log(f"[demo] step {step}/{args.steps} loss {running:.3f} lr {scheduler.get_last_lr()[-1]:.2e} "
                    f"({time.perf_counter() - train_start:.0f}s)")
            if step >= args.steps:
                break
            if time.perf_counter() - train_start > args.time_budget_s:
                log(f"[demo] time budget {args.time_budget_s:.0f}s reached after {step} steps; stopping training")
                stopped_early = True
                break
        if step == steps_before:  # every loop must end: an epoch without a step would repeat forever
            raise RuntimeError(f"the training loader yielded no batch in epoch {epoch}.")
        epoch += 1
    train_time = time.perf_counter() - train_start

    # ---- evaluation and drawing
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_fn)
    metrics = evaluate_model(model, val_loader, val_set.coco_ground_truth())
    processor = eval_image_processor(scale)  # the eval resize, for inference with the saved model
    model.eval()
    with torch.no_grad():
        batch = collate_fn([val_set[i] for i in range(min(8, len(val_set)))])
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    sizes = [tuple(t["orig_size"].tolist()) for t in batch["labels"]]
    detections = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes, top_k=100)
    draw_detections(val_set, detections, out / "detections.png", config.id2label, args.score_threshold,
                    overwrite=args.overwrite)
    with atomic_directory(out / "model", WRITER, overwrite=args.overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)

    result = {
        "metrics": metrics,
        "steps": step,
        "stopped_early": stopped_early,
        "train_seconds": round(train_time, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "args": vars(args),
    }
    with owned_file(out / "metrics.json", WRITER, overwrite=args.overwrite) as temp:
        temp.write_text(json.dumps(result, indent=2), encoding="utf-8")
    log(f"[demo] COCO bbox mAP {metrics['map']:.3f}  AP50 {metrics['map_50']:.3f}  AP75 {metrics['map_75']:.3f}  "
        f"AR@100 {metrics['mar_100']:.3f}  ({step} steps, {result['wall_seconds']:.0f}s total)")
    log(f"[demo] wrote {out / 'detections.png'} and {out / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
