"""Sliced inference on the dense synthetic set: accuracy with and without slicing, and its cost per megapixel (CPU).

    python benchmarks/bench_slicing.py --threads 2

1. Generates the dense set (`align_detr_hf.synthetic.generate_dense_dataset`: large images, hundreds of 6-36 px
   shapes), cuts the training images into `--tile` px tiles (`slicing.slice_coco_dataset`) and trains the demo-size model
   (`demo.demo_config`, d_model 64, `--num_queries`) on the tiles from scratch for `--steps` steps (the demo's
   `from_scratch` recipe), its processor at the tile size (a tile is seen at scale 1).
2. Scores the validation images (COCO bbox, maxDets 100/300/1000, so AP is at 1000 detections) with the plain
   full-image pass (the image resized to the processor's size) and with slicing (`--tile` px tiles, overlap 0.2, + the
   full-image pass, NMS and WBF).
3. Times both on one image per size in a fresh worker process each (median of `--repeats` after one warm-up) and
   measures peak RSS above the level before the run (benchmarks/common.PeakMemory), per megapixel.
4. Writes the `slicing` section of BENCHMARKS.md and a before/after picture (docs/slicing_before_after.png).
"""

import argparse
import json
import os
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
from align_detr_hf.optim import build_optimizer, build_scheduler  # noqa: E402
from align_detr_hf.recipes import FROM_SCRATCH, apply_recipe_to_model, build_recipe_transforms  # noqa: E402
from align_detr_hf.slicing import SliceConfig, detect_passes, merge_detections, slice_coco_dataset, sliced_detect  # noqa: E402
from align_detr_hf.synthetic import generate_dense_dataset  # noqa: E402

TILE = 128  # set by --tile
MAX_DETS = (100, 300, 1000)
SIZES = (512, 1024)


def processor_for_tiles() -> AlignDetrImageProcessor:
    return AlignDetrImageProcessor(size={"shortest_edge": TILE, "longest_edge": TILE})


def train(args, work: Path) -> Path:
    train_ann = generate_dense_dataset(work / "dense_train", args.train_images, args.train_size, args.objects, seed=0)
    tiles_ann = slice_coco_dataset(train_ann, work / "dense_train" / "images", work / "tiles", TILE, overlap=0.2)
    dataset = load_coco_folder(tiles_ann, transforms=build_recipe_transforms("flip", TILE / 800), seed=0)
    model = AlignDetrForObjectDetection(demo_config(dataset.id2label, d_model=64, num_queries=args.num_queries))
    apply_recipe_to_model(model, FROM_SCRATCH)
    optimizer = build_optimizer(model, FROM_SCRATCH.learning_rate, FROM_SCRATCH.weight_decay,
                                FROM_SCRATCH.backbone_lr_mult)
    scheduler = build_scheduler(optimizer, warmup_steps=FROM_SCRATCH.warmup_steps,
                                warmup_start_factor=FROM_SCRATCH.warmup_start_factor,
                                milestones=[int(args.steps * 0.8)])
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    step, start, epoch = 0, time.perf_counter(), 0
    while step < args.steps and time.perf_counter() - start < args.time_budget_s:
        dataset.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), FROM_SCRATCH.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 25 == 0:
                print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
            if step >= args.steps or time.perf_counter() - start > args.time_budget_s:
                break
        epoch += 1
    folder = work / "model"
    model.save_pretrained(folder)
    processor_for_tiles().save_pretrained(folder)
    info = {"steps": step, "train_s": round(time.perf_counter() - start, 1), "tiles": len(dataset),
            "train_objects": sum(len(r["annotations"]) if "annotations" in r else 0 for r in dataset.records)}
    (folder / "train_info.json").write_text(json.dumps(info))
    return folder


def load(folder: Path):
    return AlignDetrForObjectDetection.from_pretrained(folder).eval(), AlignDetrImageProcessor.from_pretrained(folder)


def plain_detect(model, processor, image, top_k=1000):
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_object_detection(outputs, target_sizes=[(image.height, image.width)], top_k=top_k)[0]


METHODS = {
    "full image": lambda m, p, image: plain_detect(m, p, image),
    "sliced (NMS)": lambda m, p, image: sliced_detect(m, p, image, SliceConfig(tile_size=TILE, merge="nms")),
}


def evaluate(folder: Path, val_ann: Path) -> dict:
    """COCO scores of the full-image pass and of the merges, from one run of the passes per image."""
    from PIL import Image

    model, processor = load(folder)
    gt = json.loads(val_ann.read_text())
    merges = {"sliced (NMS)": SliceConfig(tile_size=TILE), "sliced (WBF)": SliceConfig(tile_size=TILE, merge="wbf")}
    results = {name: [] for name in ("full image", *merges, "tiles only (NMS)")}
    for info in gt["images"]:
        image = Image.open(val_ann.parent / "images" / info["file_name"]).convert("RGB")
        passes = detect_passes(model, processor, image, merges["sliced (NMS)"])
        found = {"full image": plain_detect(model, processor, image),
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
    """One timing case in this (fresh) process: a dense image of `size` px, plain or sliced."""
    import random

    from align_detr_hf.synthetic import draw_dense_image

    global TILE
    TILE = case["tile"]
    torch.set_num_threads(case["threads"])
    model, processor = load(Path(case["folder"]))
    size = case["size"]
    image, _ = draw_dense_image(random.Random(size), size, size, num_objects=size * size // 2600)
    method = METHODS[case["method"]]
    method(model, processor, image.crop((0, 0, 512, 512)))  # warm-up (a crop: the full size is slow on CPU)
    with common.PeakMemory("cpu", process_peak=False) as memory:  # the import-time peak is not ours
        times = common.time_it(lambda: method(model, processor, image), "cpu", warmup=0, repeats=case["repeats"])
    return {**common.summary(times), "peak_bytes": memory.peak_bytes}


def run_worker(case, timeout=1800):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def picture(folder: Path, val_ann: Path, output: Path, threshold: float, crop: int = 448) -> None:
    """Full-image pass (left) and sliced (right) on a crop of the first validation image, 1:1 pixels."""
    from PIL import Image, ImageDraw

    from align_detr_hf.visualize import draw_detections

    model, processor = load(folder)
    gt = json.loads(val_ann.read_text())
    image = Image.open(val_ann.parent / "images" / gt["images"][0]["file_name"]).convert("RGB")
    id2label = model.config.id2label
    label2id = {name: int(i) for i, name in id2label.items()}
    panels = []
    for name in ("full image", "sliced (NMS)"):
        found = METHODS[name](model, processor, image)
        keep = found["scores"] > threshold
        detections = [{"label": id2label[int(label)], "score": float(score), "box": box}
                      for score, label, box in zip(found["scores"][keep], found["labels"][keep],
                                                   found["boxes"][keep].tolist())]
        drawn = draw_detections(image, detections, label2id=label2id).crop((0, 0, crop, crop))
        header = ImageDraw.Draw(drawn)
        header.rectangle((0, 0, crop, 18), fill=(255, 255, 255))
        header.text((4, 3), f"{name}: {int(keep.sum())} detections > {threshold} in the whole image",
                    fill=(0, 0, 0))
        panels.append(drawn)
    canvas = Image.new("RGB", (2 * crop + 8, crop), (255, 255, 255))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (crop + 8, 0))
    output.parent.mkdir(parents=True, exist_ok=True)
    colours = 64
    while True:  # an 8-bit palette keeps the README picture small
        canvas.quantize(colours, dither=Image.Dither.NONE).save(output, optimize=True)
        if output.stat().st_size < 300_000 or colours <= 8:
            break
        colours //= 2


def render(args, info, scores, costs, total_s) -> str:
    lines = [
        "## Sliced inference on small, dense objects (CPU)",
        "",
        f"Command: `{common.command_line()}`; {total_s / 60:.1f} min in all. Machine: {common.machine_info()['cpu']}, "
        f"{args.threads} torch threads, shared with other jobs: timings are noisy.",
        "",
        f"Data: `generate_dense_dataset` (shapes of 6-36 px, none overlapping). Training: {args.train_images} images "
        f"of {args.train_size} px with {args.objects} objects each, cut into {info['tiles']} tiles of {TILE} px "
        f"(overlap 0.2); the demo-size model (d_model 64, 2+2 layers, {args.num_queries} queries) trained from "
        f"scratch for {info['steps']} steps of {args.batch_size} tiles ({info['train_s'] / 60:.1f} min). "
        f"Validation: {args.val_images} images of {args.val_size} px with {args.val_objects} objects each (seed 1). "
        f"Processor: shortest and longest edge {TILE}, so a tile is seen at scale 1 and the full image at "
        f"{TILE}/{args.val_size}. Sliced: `SliceConfig(tile_size={TILE})` (overlap 0.2, full-image pass added, "
        "1000 detections kept). COCO bbox with maxDets (100, 300, 1000): AP and AP_small at 1000 detections.",
        "",
        "| method | AP | AP50 | AP_small | AR@100 | AR@1000 |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in scores.items():
        lines.append(f"| {name} | {s['map']:.3f} | {s['map_50']:.3f} | {s['map_small']:.3f} | {s['mar_100']:.3f} | "
                     f"{s['mar_1000']:.3f} |")
    lines += [
        "",
        f"Cost per image (one image per size, fresh process each, median of {args.repeats} after a warm-up; peak "
        "memory: RSS above the level before the timed runs, polled every millisecond):",
        "",
        "| image | method | s | s / MPix | peak MiB | peak MiB / MPix |",
        "|---|---|---|---|---|---|",
    ]
    for (size, name), result in costs.items():
        mpix = size * size / 1e6
        if "median_s" not in result:
            lines.append(f"| {size}x{size} | {name} | error | | | |")
            continue
        peak = result["peak_bytes"] / 2**20
        lines.append(f"| {size}x{size} | {name} | {result['median_s']:.2f} | {result['median_s'] / mpix:.2f} | "
                     f"{peak:,.0f} | {peak / mpix:,.0f} |")
    lines += ["", "![full image vs sliced](docs/slicing_before_after.png)"]
    lines += ["", "GPU figures: pending (no GPU on this run)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", default="/tmp/bench_slicing")
    parser.add_argument("--tile", type=int, default=128, help="tile side = the processor's size")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--time_budget_s", type=float, default=540)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_queries", type=int, default=60)
    parser.add_argument("--train_images", type=int, default=4)
    parser.add_argument("--train_size", type=int, default=512)
    parser.add_argument("--objects", type=int, default=150)
    parser.add_argument("--val_images", type=int, default=2)
    parser.add_argument("--val_size", type=int, default=768)
    parser.add_argument("--val_objects", type=int, default=340)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_train", action="store_true", help="reuse WORK_DIR/model")
    parser.add_argument("--picture", default=str(REPO / "docs" / "slicing_before_after.png"))
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
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
    folder = work / "model" if args.skip_train else train(args, work)
    info = json.loads((folder / "train_info.json").read_text())
    val_ann = generate_dense_dataset(work / "dense_val", args.val_images, args.val_size, args.val_objects, seed=1)
    scores = evaluate(folder, val_ann)
    picture(folder, val_ann, Path(args.picture), threshold=0.3)
    costs = {}
    for size in SIZES:
        for name in ("full image", "sliced (NMS)"):
            case = {"folder": str(folder), "size": size, "method": name, "repeats": args.repeats,
                    "threads": args.threads, "tile": TILE}
            costs[(size, name)] = run_worker(case)
            print(size, name, costs[(size, name)].get("median_s", costs[(size, name)]), flush=True)
    common.write_section("slicing", render(args, info, scores, costs, time.perf_counter() - started), args.output)
    print(f"wrote {args.output} and {args.picture}")


if __name__ == "__main__":
    main()
