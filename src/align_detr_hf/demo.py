"""CPU demo: train a small Align-DETR from scratch on synthetic shapes, report COCO mAP, draw detections.

    align-detr demo --output_dir demo_out          # (or: python -m align_detr_hf.demo)

Nothing is downloaded: the dataset is generated (see [`align_detr_hf.synthetic`]) and the model is randomly
initialised. The defaults are sized for ~5-7 minutes on 2 CPU cores. On a slower machine the schedule is fitted to
`--time_budget_s`: the first steps are timed, and the step count, warm-up and lr drop are scaled down together, so
the run is shorter but complete (the lr still drops before the end); it is re-fitted as the measured speed changes.
It prints the schedule it chose with the mAP measured for the closest setting, and at the end its own mAP beside it.

Outputs in `--output_dir`: `data/{train,val}` (COCO folders), `model/` (save_pretrained + image processor),
`metrics.json` (COCO metrics, steps, wall time) and `detections.png` (val images, predictions with score > 0.3).
They may replace only what an earlier demo wrote there and nobody changed since (`--overwrite`: replace the demo's
outputs anyway; other files are kept); everything is checked before any work ([`file_io.claim_output`]).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from .flags import add_flag
from .optim import build_optimizer
from .recipes import (
    FROM_SCRATCH,
    apply_recipe_to_model,
    build_recipe_transforms,
    describe_recipe,
    eval_image_processor,
    fit_schedule,
    resolve_recipe,
)
from .synthetic import generate_shapes_dataset

__all__ = ["build_parser", "demo_config", "main", "reference_results"]

PROBE_STEPS = 10  # steps timed before the schedule is fitted to the budget
# with --threads 0 on several cores, steps 1-5 run on one thread and 6-10 on all cores (given up at once if 1.5x
# slower), and the faster is kept: on a busy machine one thread can be many times faster than several competing
THREAD_PROBE_STEPS = 5
REFIT_EVERY = 10  # then re-fitted every this many steps, as the machine's speed changes ...
TIMING_WINDOW = 50  # ... from the time of the last this many steps
BUDGET_SHARE = 0.9  # of the time left that the fitted steps may fill ...
RESERVE_STEPS = 3  # ... less this many steps' time: room for the step time's noise
# the demo's mAP as measured by benchmarks/bench_demo.py (which rewrites this file) for the steps the budget allowed
REFERENCE_RESULTS = Path(__file__).parent / "assets" / "demo_reference.json"

WRITER = "align-detr demo"  # how the demo's outputs are recorded in their folders' manifests (file_io)
FOLDERS, FILES = ("data", "model"), ("metrics.json", "detections.png")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="align-detr demo", description=__doc__.split("\n")[0])
    add_flag(p, "output_dir", default="align_detr_demo", help="folder for the data, model, metrics and drawing")
    add_flag(p, "num_train_images", type=int, default=600, help="synthetic training images to generate")
    add_flag(p, "num_val_images", type=int, default=100, help="synthetic validation images to generate")
    add_flag(p, "image_size", type=int, default=128, help="side of the square synthetic images (pixels, >= 64)")
    add_flag(p, "num_classes", type=int, default=3, choices=[1, 2, 3, 4], help="circle, square, triangle, cross")
    # the training defaults are the `from_scratch` recipe's (align_detr_hf.recipes), shared with the example scripts
    add_flag(p, "max_steps", type=int, default=FROM_SCRATCH.max_train_steps, deprecated=["steps"],
             help="optimisation steps of the full schedule; fewer if they do not fit in --time_budget_s")
    add_flag(p, "per_device_train_batch_size", type=int, default=FROM_SCRATCH.batch_size, deprecated=["batch_size"],
             help="training batch size")
    add_flag(p, "learning_rate", type=float, default=FROM_SCRATCH.learning_rate, deprecated=["lr"],
             help="peak learning rate (AdamW)")
    add_flag(p, "warmup_steps", type=int, default=FROM_SCRATCH.warmup_steps,
             help="linear warm-up steps of the full schedule (scaled with it)")
    add_flag(p, "d_model", type=int, default=64, help="transformer width (a multiple of 32)")
    add_flag(p, "num_queries", type=int, default=30, help="object queries")
    add_flag(p, "augment", choices=["reference", "flip", "none"], default=FROM_SCRATCH.augment,
             help="'reference' = the full Align-DETR recipe scaled to image_size (slower to converge)")
    add_flag(p, "time_budget_s", type=float, default=480.0,
             help="training time budget in seconds: the schedule (steps, warm-up, lr drop) is fitted to it after "
             f"timing the first {PROBE_STEPS} steps, and re-fitted as the speed changes")
    add_flag(p, "threads", type=int, default=0, help="torch threads (0: all cores)")
    add_flag(p, "seed", type=int, default=0, help="random seed of the data, the model and the data order")
    add_flag(p, "score_threshold", type=float, default=0.3, help="for the drawing only")
    add_flag(p, "quiet", action="store_true", help="print nothing")
    add_flag(p, "overwrite", action="store_true", aliases=["overwrite_output_dir"],
             help="replace outputs that an earlier demo did not write or that were changed (other files are kept)")
    return p


def reference_results() -> list[dict]:
    """The demo's measured results (steps, mAP, wall time, threads), as benchmarks/bench_demo.py wrote them."""
    try:
        return json.loads(REFERENCE_RESULTS.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return []


def reference_line(steps: int) -> str:
    """What the README / BENCHMARKS.md report for the measured setting closest to `steps` steps."""
    results = reference_results()
    if not results:
        return "no reference result is packaged (benchmarks/bench_demo.py writes them)"
    near = min(results, key=lambda r: abs(math.log(max(r["steps"], 1) / max(steps, 1))))
    if not 0.67 <= near["steps"] / max(steps, 1) <= 1.5:
        return (f"no measured result near {steps} steps; README / BENCHMARKS.md report mAP {near['map']:.3f} for "
                f"the closest: {near['steps']} steps ({near['setting']})")
    return (f"README / BENCHMARKS.md report mAP {near['map']:.3f} for the closest measured setting: {near['steps']} "
            f"steps ({near['setting']})")


class StepTimer:
    """Seconds per optimisation step over the recent steps (the first step, with its one-off costs, excluded)."""

    def __init__(self, start: float):
        self.marks = [(0, start)]

    def restart(self, step: int) -> None:
        self.marks = [(step, time.perf_counter())]

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        # step 1 (allocations, first-call overheads) is not counted: the timing starts at its end
        self.marks = [(step, now)] if step == 1 else [*self.marks, (step, now)][-(TIMING_WINDOW + 1):]

    def seconds_per_step(self) -> float:
        (first, t0), (last, t1) = self.marks[0], self.marks[-1]
        return max(t1 - t0, 1e-6) / max(last - first, 1)


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError (one line, naming the flag) for arguments the demo cannot run with."""
    # image_size >= 64: the backbone's stride-32 stage keeps >= 2x2 pixels, which BatchNorm needs in a batch of one
    at_least = {"num_train_images": 1, "num_val_images": 1, "image_size": 64, "max_steps": 1,
                "per_device_train_batch_size": 1,
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
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise ValueError(f"--learning_rate must be a positive number, got {args.learning_rate}.")
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
    recipe = resolve_recipe(FROM_SCRATCH, {"augment": args.augment, "learning_rate": args.learning_rate,
                                           "batch_size": args.per_device_train_batch_size,
                                           "warmup_steps": args.warmup_steps, "max_train_steps": args.max_steps})
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
    # the schedule starts as the recipe's and is fitted to the budget once the first steps are timed
    schedule = fit_schedule(recipe, step_seconds=1.0, budget_seconds=float(recipe.max_train_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: schedule.lr_factor(i))
    log(f"[demo] model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, collate_fn=collate_fn,
                                         generator=generator, drop_last=False)  # a lone short batch is a step
    model.train()
    step, epoch, train_start, running = 0, 0, time.perf_counter(), None
    timer = StepTimer(train_start)
    cores = torch.get_num_threads()
    probe_threads = args.threads == 0 and cores > 1 and args.max_steps > PROBE_STEPS
    step_seconds = {}  # threads -> s/step in the probe
    if probe_threads:
        torch.set_num_threads(1)
    stopped_early = False
    while step < schedule.max_steps and not stopped_early:
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
            timer.tick(step)
            if probe_threads and step >= THREAD_PROBE_STEPS:
                step_seconds[torch.get_num_threads()] = timer.seconds_per_step()
                if step == THREAD_PROBE_STEPS:
                    torch.set_num_threads(cores)
                elif step == PROBE_STEPS or step_seconds[cores] > 1.5 * step_seconds[1]:
                    best = min(step_seconds, key=step_seconds.get)
                    torch.set_num_threads(best)
                    log(f"[demo] threads: {', '.join(f'{n}: {t:.3f} s/step' for n, t in step_seconds.items())}; "
                        f"training continues with {best}")
                    probe_threads = False
                timer.restart(step)
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if step == PROBE_STEPS or (step > PROBE_STEPS and step % REFIT_EVERY == 0):
                # fit (then re-fit, as the machine's speed changes) the rest of the schedule to the budget left
                remaining = args.time_budget_s - (time.perf_counter() - train_start)
                timed = timer.marks[-1][0] - timer.marks[0][0] >= 2  # else: the probe's figure just ended
                seconds = timer.seconds_per_step() if timed or not step_seconds else min(step_seconds.values())
                # room for noise: a share of the time left, and a few steps' time (which matters near the end)
                room = max(BUDGET_SHARE * remaining - RESERVE_STEPS * seconds, 0.0)
                fitted = fit_schedule(recipe, seconds, room, steps_done=step,
                                      previous=schedule if step > PROBE_STEPS else None, min_steps=PROBE_STEPS)
                if step == PROBE_STEPS:
                    log(f"[demo] measured {seconds:.3f} s/step over the first steps; schedule for "
                        f"the {args.time_budget_s:.0f}s budget: {fitted.describe()}")
                    log(f"[demo] {reference_line(fitted.max_steps)}")
                elif abs(fitted.max_steps - schedule.max_steps) >= max(5, 0.05 * schedule.max_steps):
                    log(f"[demo] step time now {timer.seconds_per_step():.3f}s: schedule re-fitted to "
                        f"{fitted.describe()}")
                schedule = fitted
            if step % 25 == 0 or step == 1:
                log(f"[demo] step {step}/{schedule.max_steps} loss {running:.3f} lr "
                    f"{scheduler.get_last_lr()[-1]:.2e} ({time.perf_counter() - train_start:.0f}s)")
            if step >= schedule.max_steps:
                break
            if time.perf_counter() - train_start > args.time_budget_s:  # a sudden slowdown the re-fits missed
                log(f"[demo] time budget {args.time_budget_s:.0f}s reached after {step} of {schedule.max_steps} "
                    "steps; stopping training")
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
        "schedule": dataclasses.asdict(schedule),
        "completed_schedule": step >= schedule.max_steps and not stopped_early,
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
    log(f"[demo] measured mAP {metrics['map']:.3f} after {step} steps; {reference_line(step)}")
    log(f"[demo] wrote {out / 'detections.png'} and {out / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
