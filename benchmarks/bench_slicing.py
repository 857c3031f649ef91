"""Sliced inference on the dense synthetic set: accuracy with and without slicing, and its cost per megapixel (CPU).

    python benchmarks/bench_slicing.py                 # train (~35 min on 1 thread), score, time, write
    python benchmarks/bench_slicing.py --skip_train    # reuse the model in WORK_DIR/model: score, time, write

1. Generates the dense set (`align_detr_hf.synthetic.generate_dense_dataset`: large images, hundreds of 6-32 px
   shapes), cuts the training images into `--tile` px tiles (`slicing.slice_coco_dataset`) and trains the demo-size
   model (`demo.demo_config`, d_model 64, `--num_queries`) on the tiles from scratch with the `from_scratch` recipe,
   the step count fitted to `--time_budget_s`, its processor at the tile size (a tile is seen at scale 1). The model
   is saved to `--model_dir` (default /tmp/slicing26/model, outside the repository) and reused with `--skip_train`.
2. Scores the validation images (COCO bbox, maxDets 100/300/1000, so AP is at 1000 detections) with the plain
   full-image pass (the image resized to the processor's size), the plain pass at scale 1 and slicing (`--tile` px
   tiles, overlap 0.2, + the full-image pass, NMS and WBF).
3. Times each method on one generated image per size, each call in a fresh worker process run under
   `flock --lock` (the machine-wide timing lock), `--rounds` rounds in turn, and measures peak RSS above the level
   before the call (benchmarks/common.PeakMemory), per megapixel.
4. Writes the `slicing` section of BENCHMARKS.md and the before/after picture (docs/slicing_before_after.png).
"""

import argparse
import dataclasses
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline environment)
import torch

REPO = common.REPO
sys.path.insert(0, str(REPO / "src"))

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor  # noqa: E402
from align_detr_hf.data import collate_fn, load_coco_folder  # noqa: E402
from align_detr_hf.demo import demo_config  # noqa: E402
from align_detr_hf.evaluation import coco_summary  # noqa: E402
from align_detr_hf.file_io import OutputPathError, atomic_directory, claim_output, owned_file  # noqa: E402
from align_detr_hf.optim import build_optimizer  # noqa: E402
from align_detr_hf.recipes import (  # noqa: E402
    FROM_SCRATCH,
    apply_recipe_to_model,
    build_recipe_transforms,
    fit_schedule,
)
from align_detr_hf.slicing import SliceConfig, detect_passes, merge_detections, slice_coco_dataset, sliced_detect  # noqa: E402
from align_detr_hf.synthetic import generate_dense_dataset  # noqa: E402

WRITER = "benchmarks/bench_slicing.py"  # how its files are recorded in their folders' manifests (file_io)
TILE = 128  # set by --tile
MAX_DETS = (100, 300, 1000)
SIZES = (512, 1024, 2048)  # the cost curve; the table takes the middle one
SIZES_AT_0 = (1024,)  # threshold 0: the merge's pairwise IoU grows with the square of the boxes kept


def processor_for_tiles() -> AlignDetrImageProcessor:
    return AlignDetrImageProcessor(size={"shortest_edge": TILE, "longest_edge": TILE})


def train(args, work: Path, folder: Path) -> Path:
    """Train the demo-size model on tiles of the dense set; the step count is fitted to `--time_budget_s` from the
    measured step time (`recipes.fit_schedule`: warm-up and lr drop at the recipe's fractions of the fitted length).
    Saves the model, its processor and train_info.json to `folder` every `--save_every` steps and at the end."""
    # the data under the ownership rule: built beside `work/train_data`, replacing only an unchanged earlier copy
    with atomic_directory(work / "train_data", WRITER, overwrite=args.overwrite) as staging:
        dense_ann = generate_dense_dataset(staging / "dense", args.train_images, args.train_size, args.objects, seed=0)
        slice_coco_dataset(dense_ann, staging / "dense" / "images", staging / "tiles", TILE, overlap=0.2)
    tiles_ann = work / "train_data" / "tiles" / "annotations.json"
    dataset = load_coco_folder(tiles_ann, transforms=build_recipe_transforms("flip", TILE / 800), seed=0)
    model = AlignDetrForObjectDetection(demo_config(dataset.id2label, d_model=args.d_model,
                                                    num_queries=args.num_queries))
    apply_recipe_to_model(model, FROM_SCRATCH)
    recipe = dataclasses.replace(FROM_SCRATCH, max_train_steps=args.steps, warmup_steps=max(1, args.steps // 60))
    optimizer = build_optimizer(model, args.lr, recipe.weight_decay, recipe.backbone_lr_mult)
    schedule = fit_schedule(recipe, step_seconds=1e-6, budget_seconds=args.time_budget_s)  # re-fit once timed
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr_factor(step))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    train_objects = sum(len(r.get("annotations", [])) for r in dataset.records)
    folder.mkdir(parents=True, exist_ok=True)
    model.train()
    step, epoch, start, losses, step_times = 0, 0, time.perf_counter(), [], []

    def save():
        model.save_pretrained(folder)
        processor_for_tiles().save_pretrained(folder)
        info = {"steps": step, "planned_steps": schedule.max_steps, "milestones": list(schedule.milestones),
                "train_s": round(time.perf_counter() - start, 1), "tiles": len(dataset), "train_objects": train_objects,
                "threads": torch.get_num_threads(), "batch_size": args.batch_size, "lr": args.lr,
                "d_model": args.d_model, "num_queries": args.num_queries,
                "final_loss": round(sum(losses[-50:]) / max(len(losses[-50:]), 1), 3)}
        with owned_file(folder / "train_info.json", WRITER, overwrite=args.overwrite) as temp:
            Path(temp).write_text(json.dumps(info))

    while step < schedule.max_steps:
        dataset.set_epoch(epoch)
        for batch in loader:
            tick = time.perf_counter()
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            step_times.append(time.perf_counter() - tick)
            if step % 50 == 0 or step == 10:  # re-fit the schedule to the budget from the last 50 step times
                recent = step_times[-50:]
                schedule = fit_schedule(recipe, sum(recent) / len(recent),
                                        max(args.time_budget_s - (time.perf_counter() - start), 0), step, schedule)
            if step % 50 == 0:
                print(f"step {step}/{schedule.max_steps} loss {sum(losses[-50:]) / 50:.3f} "
                      f"lr {scheduler.get_last_lr()[0]:.1e} ({time.perf_counter() - start:.0f}s, "
                      f"{sum(step_times[-50:]) / 50:.2f} s/step)", flush=True)
            if step % args.save_every == 0:
                save()
            if step >= schedule.max_steps:
                break
        epoch += 1
    save()
    return folder


def load(folder: Path):
    return AlignDetrForObjectDetection.from_pretrained(folder).eval(), AlignDetrImageProcessor.from_pretrained(folder)


def plain_detect(model, processor, image, threshold=0.0, top_k=1000):
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_object_detection(outputs, threshold=threshold,
                                                   target_sizes=[(image.height, image.width)], top_k=top_k)[0]


def native_detect(model, processor, image, threshold=0.0):
    """The plain pass with the processor's size set to the image's own, so the model sees it at scale 1 in one pass
    (bounded by the model's queries, not by the resize)."""
    native = AlignDetrImageProcessor.from_dict({**processor.to_dict(), "size": {
        "shortest_edge": min(image.size), "longest_edge": max(image.size)}})
    return plain_detect(model, native, image, threshold)


METHODS = {
    "full image": plain_detect,
    "full image at scale 1": native_detect,
    "sliced (NMS)": lambda m, p, image, threshold=0.0: sliced_detect(m, p, image, SliceConfig(tile_size=TILE),
                                                                     threshold),
}


def evaluate(folder: Path, val_ann: Path) -> dict:
    """COCO scores of the plain passes and of the merges (from one run of the sliced passes per image), all at score
    threshold 0 so that up to 1000 detections per image are ranked."""
    from PIL import Image

    model, processor = load(folder)
    gt = json.loads(val_ann.read_text())
    merges = {"sliced (NMS)": SliceConfig(tile_size=TILE), "sliced (WBF)": SliceConfig(tile_size=TILE, merge="wbf")}
    results = {name: [] for name in ("full image", "full image at scale 1", *merges, "tiles only (NMS)")}
    for info in gt["images"]:
        image = Image.open(val_ann.parent / "images" / info["file_name"]).convert("RGB")
        passes = detect_passes(model, processor, image, merges["sliced (NMS)"])
        found = {"full image": plain_detect(model, processor, image),
                 "full image at scale 1": native_detect(model, processor, image),
                 "tiles only (NMS)": merge_detections([p for p in passes if p[1] is not None], image.size,
                                                      merges["sliced (NMS)"])}
        found.update({name: merge_detections(passes, image.size, config) for name, config in merges.items()})
        for name, det in found.items():
            for score, label, (x0, y0, x1, y1) in zip(det["scores"].tolist(), det["labels"].tolist(),
                                                       det["boxes"].tolist()):
                results[name].append({"image_id": info["id"], "category_id": label + 1, "score": score,
                                      "bbox": [x0, y0, x1 - x0, y1 - y0]})
    scores = {name: coco_summary(gt, found, max_dets=MAX_DETS) for name, found in results.items()}
    for name, summary in scores.items():
        print(name, {k: round(v, 3) for k, v in summary.items()}, flush=True)
    return scores


def run_case(case) -> dict:
    """One timing case in this (fresh) process: a dense image of `size` px, one method, one timed run after a
    warm-up on a 512 px crop."""
    import random

    from align_detr_hf.synthetic import draw_dense_image

    global TILE
    TILE = case["tile"]
    torch.set_num_threads(case["threads"])
    model, processor = load(Path(case["folder"]))
    size = case["size"]
    image, objects = draw_dense_image(random.Random(size), size, size, num_objects=size * size // 1700)
    method = METHODS[case["method"]]
    found = method(model, processor, image.crop((0, 0, 512, 512)), case["threshold"])  # warm-up
    with common.PeakMemory("cpu", process_peak=False) as memory:  # the import-time peak is not ours
        start = time.perf_counter()
        found = method(model, processor, image, case["threshold"])
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": memory.peak_bytes, "detections": len(found["scores"]),
            "objects": len(objects)}


def run_worker(case, timeout=1800):
    """A timing case in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def measure_costs(args, folder: Path) -> dict:
    """`--rounds` rounds; each round runs every (size, method) case once, in a fresh process, in turn (so load
    changes hit all cases alike), all of it holding the machine-wide timing lock (`flock(2)` on `--lock`, the lock
    `flock LOCK command` takes), so no other benchmark times meanwhile.
    Returns {(size, method, threshold): {"seconds": [...], "peak_bytes": [...], "detections": [...]}}."""
    cases = [(size, name, args.threshold) for size in SIZES for name in METHODS]
    cases += [(size, "sliced (NMS)", 0.0) for size in SIZES_AT_0]  # the setting scored above (merge cost)
    costs = {case: {"seconds": [], "peak_bytes": [], "detections": []} for case in cases} if args.rounds else {}
    lock = open(args.lock, "a") if args.lock and args.rounds else None
    if lock:
        print(f"waiting for the timing lock {args.lock}", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        print("timing lock held", flush=True)
    try:
        for round_index in range(args.rounds):
            time_round(args, folder, cases, costs, round_index)
    finally:
        if lock:
            lock.close()  # releases the lock
    return costs


def time_round(args, folder, cases, costs, round_index):
    for size, name, threshold in cases:
        result = run_worker({"folder": str(folder), "size": size, "method": name, "threads": args.threads,
                             "tile": TILE, "threshold": threshold})
        if "error" in result:
            print(size, name, threshold, "error:", result["error"], flush=True)
            continue
        for key in ("seconds", "peak_bytes", "detections"):
            costs[(size, name, threshold)][key].append(result[key])
        print(f"round {round_index} {size} {name} t={threshold}: {result['seconds']:.2f} s, "
              f"{result['peak_bytes'] / 2**20:.0f} MiB, {result['detections']} detections "
              f"({result['objects']} objects)", flush=True)


CLASS_COLOURS = ((230, 25, 75), (0, 130, 200), (255, 160, 0), (60, 180, 75))  # one per shape class


def draw_panel(image, found, threshold, title, crop):
    """`image` cropped to `crop`, with the boxes scoring above `threshold` outlined in their class's colour (no tags:
    hundreds of 6-32 px objects leave no room for them)."""
    from PIL import ImageDraw

    keep = found["scores"] > threshold
    panel = image.crop(crop)
    draw = ImageDraw.Draw(panel)
    shown = 0
    for label, (x0, y0, x1, y1) in zip(found["labels"][keep].tolist(), found["boxes"][keep].tolist()):
        if x0 < crop[2] and y0 < crop[3]:
            shown += 1
            draw.rectangle((x0 - crop[0], y0 - crop[1], x1 - crop[0], y1 - crop[1]),
                           outline=CLASS_COLOURS[label % len(CLASS_COLOURS)], width=2)
    draw.rectangle((0, 0, panel.width, 16), fill=(255, 255, 255))
    draw.text((4, 2), f"{title}: {shown} here, {int(keep.sum())} in the whole image", fill=(0, 0, 0))
    return panel


def picture(
    folder: Path, val_ann: Path, output: Path, threshold: float, overwrite: bool = False, crop: int = 384
) -> dict:
    """Ground truth, full-image pass and sliced on the top-left crop of the first validation image, at 1:1 pixels."""
    from PIL import Image

    model, processor = load(folder)
    gt = json.loads(val_ann.read_text())
    info = gt["images"][0]
    image = Image.open(val_ann.parent / "images" / info["file_name"]).convert("RGB")
    boxes = [a for a in gt["annotations"] if a["image_id"] == info["id"]]
    truth = {"scores": torch.ones(len(boxes)), "labels": torch.tensor([a["category_id"] - 1 for a in boxes]),
             "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in boxes)])}
    box = (0, 0, crop, crop)
    counts = {"objects": len(boxes)}
    panels = [draw_panel(image, truth, 0.5, "ground truth", box)]
    for name in ("full image", "sliced (NMS)"):
        found = METHODS[name](model, processor, image, threshold)
        counts[name] = int((found["scores"] > threshold).sum())
        panels.append(draw_panel(image, found, threshold, f"{name}, score > {threshold}", box))
    canvas = Image.new("RGB", (3 * crop + 16, crop), (255, 255, 255))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * (crop + 8), 0))
    output.parent.mkdir(parents=True, exist_ok=True)
    colours = 64
    with owned_file(output, WRITER, overwrite=overwrite) as temp:
        while True:  # an 8-bit palette keeps the README picture small
            canvas.quantize(colours, dither=Image.Dither.NONE).save(temp, format="PNG", optimize=True)
            if Path(temp).stat().st_size < 300_000 or colours <= 8:
                break
        colours //= 2
    return counts


def render(args, info, scores, costs, counts, total_s, loads) -> str:
    mpix_ref = SIZES[-2] ** 2 / 1e6

    def median(values):
        return statistics.median(values) if values else float("nan")

    def cost(size, name, threshold):
        c = costs.get((size, name, threshold), {})
        return median(c.get("seconds", [])), median(c.get("peak_bytes", [])) / 2**20

    lines = [
        "## Sliced inference on small, dense objects (CPU)",
        "",
        f"Command: `{common.command_line()}` (the model trained by the same script without `--skip_train`); "
        f"{total_s / 60:.1f} min for scoring and timing (timing included the wait for the lock). Machine: "
        f"{common.machine_info()['cpu']}, 2 cores shared with other jobs"
        + (f" (1-minute load average {loads[0]:.1f} before the timing, {loads[1]:.1f} after): timings are noisy. "
           f"Timing held the machine-wide lock `{args.lock}` (no other benchmark timed meanwhile), {args.threads} "
           "torch thread(s)." if args.rounds else "."),
        "",
        f"Data: `synthetic.generate_dense_dataset` (shapes of 6-32 px, 4 classes, none overlapping). Training: "
        f"{args.train_images} images of {args.train_size} px with {args.objects} objects each, cut into "
        f"{info['tiles']} tiles of {TILE} px (`slicing.slice_coco_dataset`, overlap 0.2; {info['train_objects']} "
        f"objects); the demo-size model (`demo.demo_config`: ~1 M parameters, d_model {info['d_model']}, 2+2 layers, "
        f"{info['num_queries']} queries) trained from scratch, `from_scratch` recipe (AdamW lr {info['lr']:g}, flip), "
        f"batch {info['batch_size']}, {info['steps']} steps in {info['train_s'] / 60:.1f} min on "
        f"{info['threads']} thread(s) (schedule fitted to the time budget, lr x0.1 at step "
        f"{info['milestones'][0] if info['milestones'] else '-'}; final loss {info['final_loss']}). "
        f"Validation: {args.val_images} images of {args.val_size} px with {args.val_objects} objects drawn each "
        f"(seed 1). Processor: shortest and longest edge {TILE}, so a tile is seen at scale 1 and the plain pass sees "
        f"the whole image at {TILE}/{args.val_size}. \"full image at scale 1\": the plain pass with the processor's "
        f"size set to the image's ({args.val_size} px), one pass at the training scale but at most "
        f"{info['num_queries']} distinct boxes (the queries). Sliced: `SliceConfig(tile_size={TILE})` (overlap 0.2, "
        "full-image pass added, class-wise merge between passes, 1000 detections kept); \"tiles only\" is the "
        "same without the full-image pass. Scored at threshold 0, COCO bbox with maxDets (100, 300, 1000): AP, AP50 "
        f"and AP_small at 1000 detections ({info['val_small']:.0%} of the objects are COCO-small, < 32x32 px, so "
        f"AP_small ~ AP). The cost columns come from the cost curve below (the {SIZES[-2]} px image, threshold "
        f"{args.threshold}).",
        "",
        f"| method | AP | AP50 | AP_small | AR@100 | AR@1000 | s / MPix ({SIZES[-2]} px image) "
        f"| peak MiB ({SIZES[-2]} px image) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in scores.items():
        seconds, peak = cost(SIZES[-2], name, args.threshold)
        timed = f"{seconds / mpix_ref:.2f} | {peak:,.0f}" if seconds == seconds else "- | -"
        lines.append(f"| {name} | {s['map']:.3f} | {s['map_50']:.3f} | {s['map_small']:.3f} | {s['mar_100']:.3f} | "
                     f"{s['mar_1000']:.3f} | {timed} |")
    lines += [] if not args.rounds else [
        "",
        f"Cost curve: one generated image per size (~590 objects per MPix), each case in a fresh process, a warm-up on "
        f"a 512 px crop, then one timed call; {args.rounds} rounds, the cases in turn within each round, medians "
        "shown. "
        f"Detection threshold {args.threshold} as a user would run it (the README's), and the sliced pass also at "
        "threshold 0 as scored above (the merge then compares every kept box of a class pairwise). Peak memory: RSS "
        "above the level before the call, polled every millisecond.",
        "",
        "| image | MPix | method | threshold | s | s / MPix | peak MiB | peak MiB / MPix | detections |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (size, name, threshold), c in costs.items():
        mpix = size * size / 1e6
        if not c["seconds"]:
            lines.append(f"| {size}x{size} | {mpix:.2f} | {name} | {threshold} | error | | | | |")
            continue
        seconds, peak = cost(size, name, threshold)
        lines.append(f"| {size}x{size} | {mpix:.2f} | {name} | {threshold} | {seconds:.2f} | {seconds / mpix:.2f} | "
                     f"{peak:,.0f} | {peak / mpix:,.0f} | {int(median(c['detections']))} |")
    lines += [
        "",
        f"Picture (`docs/slicing_before_after.png`): the top-left 384 px of the first validation image at 1:1 pixels; "
        f"ground truth, the plain pass and the sliced pass, detections above {args.picture_threshold} "
        f"(in the whole image: {counts.get('full image', 0)} plain, {counts.get('sliced (NMS)', 0)} sliced; "
        f"{counts['objects']} objects).",
        "",
        "![ground truth, full image, sliced](docs/slicing_before_after.png)",
        "",
        "GPU figures: pending (no GPU on this run).",
    ]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", default="/tmp/slicing26", help="generated data (and the model by default)")
    parser.add_argument("--model_dir", help="where the trained model is saved / reused (default WORK_DIR/model)")
    parser.add_argument("--skip_train", action="store_true", help="reuse the model in MODEL_DIR")
    parser.add_argument("--train_only", action="store_true", help="train, then stop")
    parser.add_argument("--tile", type=int, default=128, help="tile side = the processor's size")
    parser.add_argument("--steps", type=int, default=10000, help="the schedule's length on a fast machine")
    parser.add_argument("--time_budget_s", type=float, default=2100, help="the schedule is fitted to this")
    parser.add_argument("--save_every", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=FROM_SCRATCH.learning_rate)
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--num_queries", type=int, default=60)
    parser.add_argument("--train_images", type=int, default=32)
    parser.add_argument("--train_size", type=int, default=512)
    parser.add_argument("--objects", type=int, default=150)
    parser.add_argument("--val_images", type=int, default=2)
    parser.add_argument("--val_size", type=int, default=768)
    parser.add_argument("--val_objects", type=int, default=340)
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (0: no timing)")
    parser.add_argument("--threshold", type=float, default=0.3, help="detection threshold of the timed calls")
    parser.add_argument("--picture_threshold", type=float, default=0.3)
    parser.add_argument("--lock", default="/tmp/timing.lock", help="machine-wide timing lock ('' for none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core machine)")
    parser.add_argument("--picture", default=str(REPO / "docs" / "slicing_before_after.png"))
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files in WORK_DIR, MODEL_DIR or --picture that this script did not write")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_case(json.loads(args.worker))), flush=True)
        return
    global TILE
    TILE = args.tile
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    work = Path(args.work_dir)
    folder = Path(args.model_dir) if args.model_dir else work / "model"
    try:  # every file written at the end is claimed before the (long) work
        for path in (work / "results.json", Path(args.picture)):
            claim_output(path, WRITER, overwrite=args.overwrite)
    except OutputPathError as error:
        raise SystemExit(f"bench_slicing: error: {error}") from None
    if not args.skip_train:
        train(args, work, folder)
    if args.train_only:
        return
    info = json.loads((folder / "train_info.json").read_text())
    with atomic_directory(work / "val_data", WRITER, overwrite=args.overwrite) as staging:
        generate_dense_dataset(staging, args.val_images, args.val_size, args.val_objects, seed=1)
    val_ann = work / "val_data" / "annotations.json"
    gt = json.loads(val_ann.read_text())
    info["val_small"] = sum(a["area"] < 32**2 for a in gt["annotations"]) / len(gt["annotations"])
    scores = evaluate(folder, val_ann)
    counts = picture(folder, val_ann, Path(args.picture), args.picture_threshold, args.overwrite)
    if args.rounds:  # the scores now, the timing (which may wait for the lock) when it is done
        untimed = argparse.Namespace(**{**vars(args), "rounds": 0})
        text = render(untimed, info, scores, {}, counts, time.perf_counter() - started, [os.getloadavg()[0]] * 2)
        common.write_section("slicing", text + "\n\nTiming: pending (waiting for the timing lock).", args.output)
    loads = [os.getloadavg()[0]]
    costs = measure_costs(args, folder)
    loads.append(os.getloadavg()[0])
    with owned_file(work / "results.json", WRITER, overwrite=args.overwrite) as temp:
        Path(temp).write_text(json.dumps({"scores": scores, "counts": counts, "loads": loads,
                                          "costs": [[*k, v] for k, v in costs.items()]}))
    text = render(args, info, scores, costs, counts, time.perf_counter() - started, loads)
    common.write_section("slicing", text, args.output)
    print(f"wrote {args.output} and {args.picture}")


if __name__ == "__main__":
    main()
