#!/usr/bin/env python
"""COCO evaluation at scale (issue 27): the COCOeval backends and the compact image-by-image evaluation, and streaming
vs accumulate-then-compute in Trainer.

1. Backends: COCO-like generated ground truth (80 classes, 1-15 objects of 8-400 px per 640x480 image) and 100
   detections per image (jittered, sometimes misclassified ground truth plus background boxes); evaluation seconds
   and peak memory of `coco_summary` (loadRes, evaluate, accumulate, summarize) with pycocotools and with
   faster-coco-eval, and of `StreamingCocoEvaluator` (compact: each image matched as it is added, 36 bytes a
   detection; fed 8 images at a time, then `compute()`), 500 to 5,000 images, and the largest difference of their
   nine summary metrics from pycocotools'.
2. Trainer: `Trainer.evaluate` over N images with a stub model that outputs DINO-sized predictions (900 queries x 80
   classes, the planted boxes of the generated ground truth): today's accumulate-then-compute
   (`build_compute_metrics`, `eval_do_concat_batches=False`), streaming with COCOeval at the end (`CocoMetrics`,
   backend faster-coco-eval: how it was before the compact evaluation), and streaming compact (`CocoMetrics`'
   default; with and without the detections kept for the pictures): peak memory above the level before `evaluate`,
   seconds, and the largest metric difference from accumulate.

Every measurement runs in a fresh process (peak RSS is a process maximum); the order of the compared cases alternates
between rounds. Results go to BENCHMARKS.md between `<!-- evaluation:start -->` and `<!-- evaluation:end -->`.

    flock /tmp/timing.lock python benchmarks/bench_evaluation.py            # ~30-60 min on 2 loaded cores
    python benchmarks/bench_evaluation.py --sizes 200 --rounds 1 --no_write  # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

NUM_CLASSES, WIDTH, HEIGHT, DETECTIONS, QUERIES = 80, 640, 480, 100, 900
BACKEND_CASES = ["pycocotools", "faster_coco_eval", "compact"]
TRAINER_CASES = ["accumulate", "streaming_cocoeval", "compact", "compact_lean"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parts", nargs="+", choices=["backends", "trainer"], default=["backends", "trainer"])
    p.add_argument("--batch_size", type=int, default=8, help="Trainer eval batch")
    p.add_argument("--cases", nargs="+", choices=BACKEND_CASES + TRAINER_CASES,
                   help="measure only these cases (default: all of each part)")
    p.add_argument("--no_write", action="store_true")
    p.add_argument("--results", help="also save the raw runs to this json")
    p.add_argument("--report_only", help="re-render BENCHMARKS.md from a --results json, measuring nothing")
    p.add_argument("--worker", choices=["backend", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--num_images", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ground_truth(num_images: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT})
        for _ in range(int(rng.integers(1, 16))):
            w, h = np.exp(rng.uniform(np.log(8), np.log(400), 2))
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - min(h, HEIGHT - 1))
            h = min(h, HEIGHT - y)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                                "category_id": int(rng.integers(0, NUM_CLASSES)), "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": f"class_{c}"} for c in range(NUM_CLASSES)]}


def detections(gt: dict, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    per_image: dict[int, list] = {image["id"]: [] for image in gt["images"]}
    for ann in gt["annotations"]:
        per_image[ann["image_id"]].append(ann)
    results = []
    for image_id, anns in per_image.items():
        mine = []
        for ann in anns:
            if rng.random() < 0.85:
                x, y, w, h = ann["bbox"]
                label = ann["category_id"] if rng.random() < 0.9 else int(rng.integers(0, NUM_CLASSES))
                mine.append({"image_id": image_id, "category_id": label, "score": float(rng.uniform(0.3, 1.0)),
                             "bbox": [x + rng.normal(0, w / 12), y + rng.normal(0, h / 12), w * rng.uniform(0.85, 1.15),
                                      h * rng.uniform(0.85, 1.15)]})
        while len(mine) < DETECTIONS:
            w, h = rng.uniform(5, 200, 2)
            mine.append({"image_id": image_id, "category_id": int(rng.integers(0, NUM_CLASSES)),
                         "score": float(rng.uniform(0.0, 0.5)),
                         "bbox": [rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h]})
        results += mine
    return results


# ------------------------------------------------------------------------------------------------ workers


def backend_worker(backend: str, num_images: int) -> dict:
    from align_detr_hf.evaluation import _coco_from_dict, coco_summary
    from align_detr_hf.evaluation_streaming import StreamingCocoEvaluator

    gt = ground_truth(num_images)
    results = detections(gt)
    coco_gt = _coco_from_dict(gt)
    state_bytes = None
    if backend == "compact":  # the detections as a model's post-processing gives them: per image, xyxy arrays
        per_image: dict[int, list] = {}
        for r in results:
            x, y, w, h = r["bbox"]
            per_image.setdefault(r["image_id"], []).append([x, y, x + w, y + h, r["score"], r["category_id"]])
        arrays = [(image_id, np.array(rows)) for image_id, rows in per_image.items()]
        del results
    with common.PeakMemory("cpu") as memory:
        start = time.perf_counter()
        if backend == "compact":
            evaluator = StreamingCocoEvaluator(coco_gt)
            for i in range(0, len(arrays), 8):
                batch = arrays[i:i + 8]
                evaluator.update([image_id for image_id, _ in batch], [
                    {"boxes": rows[:, :4], "scores": rows[:, 4], "labels": rows[:, 5]} for _, rows in batch])
            metrics = evaluator.compute()
            state_bytes = evaluator.nbytes
        else:
            metrics = coco_summary(coco_gt, results, backend=backend)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mib": memory.peak_bytes / 2**20, "metrics": metrics, "state_bytes": state_bytes,
            "num_annotations": len(gt["annotations"]), "num_detections": DETECTIONS * num_images}


class StubDetector(torch.nn.Module):
    """DINO-sized outputs (900 x 80) from the labels: the first queries hold the ground-truth boxes (jittered) with a
    raised logit of their class, the rest random; deterministic per image id."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, pixel_mask=None, labels=None):
        from align_detr_hf.modeling_align_detr import AlignDetrObjectDetectionOutput

        logits, boxes = [], []
        for target in labels:
            generator = torch.Generator().manual_seed(int(target["image_id"]))
            image_logits = torch.randn(QUERIES, NUM_CLASSES, generator=generator) - 4.0
            image_boxes = torch.rand(QUERIES, 4, generator=generator) * 0.5 + 0.25
            n = len(target["boxes"])
            image_boxes[:n] = (target["boxes"] * (1 + 0.05 * torch.randn(n, 4, generator=generator))).clamp(0, 1)
            image_logits[torch.arange(n), target["class_labels"]] += 5.0 + torch.randn(n, generator=generator)
            logits.append(image_logits)
            boxes.append(image_boxes)
        zero = self.anchor * 0
        return AlignDetrObjectDetectionOutput(loss=zero, loss_dict={"loss_ce": zero}, logits=torch.stack(logits),
                                              pred_boxes=torch.stack(boxes))


def trainer_worker(case: str, num_images: int, batch_size: int) -> dict:
    import tempfile

    from transformers import Trainer, TrainingArguments

    from align_detr_hf.evaluation import build_compute_metrics
    from align_detr_hf.evaluation_streaming import CocoMetrics

    gt = ground_truth(num_images)
    by_image: dict[int, list] = {image["id"]: [] for image in gt["images"]}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]].append(ann)
    scale = torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT], dtype=torch.float32)
    dataset = []
    for image_id, anns in by_image.items():
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        cxcywh = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], 1) / scale
        dataset.append({"pixel_values": torch.zeros(3, 4, 4), "labels": {
            "image_id": torch.tensor([image_id]), "orig_size": torch.tensor([HEIGHT, WIDTH]), "boxes": cxcywh,
            "class_labels": torch.tensor([a["category_id"] for a in anns])}})

    def collate(items):
        return {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "labels": [i["labels"] for i in items]}

    from align_detr_hf.coco_backend import resolve_backend

    streaming = case != "accumulate"
    metrics_fn = (build_compute_metrics(gt) if case == "accumulate"
                  else CocoMetrics(gt, backend=resolve_backend("auto")) if case == "streaming_cocoeval"
                  else CocoMetrics(gt, keep_detections=case == "compact"))
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, per_device_eval_batch_size=batch_size, use_cpu=True,
                                 remove_unused_columns=False, report_to="none", disable_tqdm=True,
                                 batch_eval_metrics=streaming, eval_do_concat_batches=False)
        trainer = Trainer(model=StubDetector(), args=args, eval_dataset=dataset, data_collator=collate,
                          compute_metrics=metrics_fn,
                          preprocess_logits_for_metrics=metrics_fn.preprocess_logits_for_metrics if streaming else None)
        with common.PeakMemory("cpu") as memory:
            start = time.perf_counter()
            metrics = trainer.evaluate()
            seconds = time.perf_counter() - start
    state_bytes = metrics_fn.last_evaluator.nbytes if case.startswith("compact") else None
    return {"seconds": seconds, "peak_mib": memory.peak_bytes / 2**20, "state_bytes": state_bytes,
            "metrics": {k[len("eval_"):]: v for k, v in metrics.items()
                        if k.startswith("eval_map") or k.startswith("eval_mar")}}


# ------------------------------------------------------------------------------------------------ driver


def run_worker(kind: str, case: str, num_images: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--case", case, "--num_images", str(num_images),
           "--batch_size", str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {case} {num_images}: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_average"] = os.getloadavg()[0]  # the machine's 1-minute load when the run ended
    print(f"[evaluation] {kind} {case} {num_images}: {result['seconds']:.1f} s, {result['peak_mib']:.0f} MiB",
          flush=True)
    return result


def measure(kind: str, cases: list[str], sizes: list[int], rounds: int, batch_size: int) -> dict:
    runs: dict = {(case, n): [] for case in cases for n in sizes}
    for r in range(rounds):
        for n in sizes:
            for case in (cases if r % 2 == 0 else cases[::-1]):  # alternate which goes first
                runs[case, n].append(run_worker(kind, case, n, batch_size))
    return runs


def median(runs, key):
    return statistics.median(run[key] for run in runs)


def max_metric_difference(a: list[dict], b: list[dict]) -> float:
    return max(abs(x["metrics"][k] - y["metrics"][k]) for x in a for y in b for k in x["metrics"])


def _difference(a: list[dict], b: list[dict]) -> str:
    value = max_metric_difference(a, b)
    return "0 (bit for bit)" if value == 0 else f"{value:.1e}"


def slope(runs: dict, case: str, sizes: list[int]) -> float:
    """MiB per image between the smallest and the largest size."""
    low, high = min(sizes), max(sizes)
    return (median(runs[case, high], "peak_mib") - median(runs[case, low], "peak_mib")) / max(high - low, 1)


def _load(*parts) -> str:
    loads = [run["load_average"] for part in parts if part for runs in part.values() for run in runs
             if "load_average" in run]
    return f" (1-minute load average {min(loads):.1f}-{max(loads):.1f})" if loads else ""


def report(args, backend_runs, trainer_runs, measured=None) -> str:
    info = common.machine_info()
    measured = measured or {"command": common.command_line(), "commit": info["git_commit"]}
    lines = ["## COCO evaluation at scale (issue 27)", "",
             f"Written by `benchmarks/bench_evaluation.py` (measured: {measured['command']}). Machine: {info['cpu']}, "
             f"{info['cpu_cores']} cores, **shared with other jobs while measured**"
             f"{_load(backend_runs, trainer_runs)}: seconds are noisy; each cell is the median of {args.rounds} "
             "round(s) in fresh processes, the "
             f"compared cases alternating which runs first. Peak memory: the process's resident memory above its "
             f"level just before the measured call. torch {info['torch']}, commit {measured['commit']}."]
    if backend_runs:
        lines += ["", "### COCOeval backends and the compact evaluation", "",
                  "`coco_summary` (loadRes + evaluate + accumulate + summarize) with each COCOeval, and "
                  "`StreamingCocoEvaluator` (compact, the default: each image matched as it is added, 8 images an "
                  "`update`, then `compute()`; the detections also kept for the pictures) on generated COCO-like "
                  "data: 80 classes, 1-15 objects of 8-400 px per 640x480 image, 100 detections per image. "
                  "Differences: the largest of the nine summary metrics from pycocotools'."]
        cases = [case for case in BACKEND_CASES if (case, args.sizes[0]) in backend_runs]  # a saved run may lack one
        if "compact" not in cases:
            lines[-1] += " (The compact evaluation is not in this saved run: see the Trainer table for it.)"
        lines.append("")
        names = {"pycocotools": "pycocotools", "faster_coco_eval": "faster-coco-eval", "compact": "compact"}
        state = "compact" in cases
        lines += ["| images | boxes | detections | " + " | ".join(f"{names[c]} s" for c in cases) + " | "
                  + " | ".join(f"{names[c]} peak MiB" for c in cases) + (" | compact state KB/image" if state else "")
                  + "".join(f" | {names[c]} difference" for c in cases[1:]) + " |",
                  "|---" * (3 + 2 * len(cases) + state + len(cases) - 1) + "|"]
        for n in args.sizes:
            runs = [backend_runs[case, n] for case in cases]
            first = runs[0][0]
            lines.append(
                f"| {n} | {first['num_annotations']} | {first['num_detections']} | "
                + " | ".join(f"{median(r, 'seconds'):.1f}" for r in runs) + " | "
                + " | ".join(f"{median(r, 'peak_mib'):.0f}" for r in runs)
                + (f" | {backend_runs['compact', n][0]['state_bytes'] / n / 1000:.1f}" if state else "")
                + "".join(f" | {_difference(runs[0], r)}" for r in runs[1:]) + " |")
        lines += ["", f"Growth per image from {min(args.sizes)} to {max(args.sizes)} images: "
                  + ", ".join(f"{names[case]} {slope(backend_runs, case, args.sizes) * 1024:.0f} KiB"
                              for case in cases) + "."]
    if trainer_runs:
        lines += ["", "### Trainer: streaming vs accumulate-then-compute", "",
                  f"`Trainer.evaluate` (CPU, eval batch {args.batch_size}) with a stub model giving DINO-sized outputs "
                  f"({QUERIES} queries x {NUM_CLASSES} classes) on the generated data above. Accumulate: today's "
                  "`build_compute_metrics` (`eval_do_concat_batches=False`; Trainer keeps every batch's outputs; "
                  "COCOeval by the automatic backend, faster-coco-eval here). Streaming + COCOeval: `CocoMetrics` "
                  "(`batch_eval_metrics=True`, `preprocess_logits_for_metrics`, top-100 per image kept) running "
                  "faster-coco-eval at the end, as before the compact evaluation. Compact: `CocoMetrics`' default "
                  "(each image matched as its batch comes, 36 bytes a detection, plus the detections for the "
                  "pictures, 48 bytes each); lean: `keep_detections=False` (metrics and per-class curves only).", "",
                  "| images | accumulate peak MiB | streaming + COCOeval peak MiB | compact peak MiB | lean peak MiB "
                  "| accumulate s | streaming + COCOeval s | compact s | lean s | compact state KB/image | lean "
                  "state KB/image | compact difference from accumulate |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in args.sizes:
            acc, stream, compact, lean = (trainer_runs[case, n] for case in TRAINER_CASES)
            lines.append(
                f"| {n} | " + " | ".join(f"{median(r, 'peak_mib'):.0f}" for r in (acc, stream, compact, lean))
                + " | " + " | ".join(f"{median(r, 'seconds'):.1f}" for r in (acc, stream, compact, lean))
                + f" | {compact[0]['state_bytes'] / n / 1000:.1f} | {lean[0]['state_bytes'] / n / 1000:.1f} | "
                f"{_difference(acc, compact)} |")
        lines += ["", f"Growth per image from {min(args.sizes)} to {max(args.sizes)} images: "
                  + ", ".join(f"{name} {slope(trainer_runs, case, args.sizes) * 1024:.0f} KiB" for name, case in (
                      ("accumulate", "accumulate"), ("streaming + COCOeval", "streaming_cocoeval"),
                      ("compact", "compact"), ("lean", "compact_lean")))
                  + ". Accumulate holds the model outputs (900 x 80 float32 logits + boxes, ~290 KB an image) until "
                  "the end; streaming + COCOeval holds ~5 KB of detections an image but builds COCOeval's per-image "
                  "dicts at the end (~200 KB an image); compact holds 100 x (36 + 48) bytes an image (8.4 KB), lean "
                  "100 x 36 (3.6 KB): exact per-detection state is linear in the detections kept; `compute()` sorts "
                  "one class at a time, so its extra memory is one class's records plus the fixed-size precision "
                  "array. The rest of the growth is the ground truth itself (a pycocotools `COCO`, made once), "
                  "Trainer's own per-batch bookkeeping and the allocator."]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        result = (backend_worker(args.case, args.num_images) if args.worker == "backend"
                  else trainer_worker(args.case, args.num_images, args.batch_size))
        print(json.dumps(result))
        return
    measured = None
    if args.report_only:
        saved = json.loads(Path(args.report_only).read_text())
        args.sizes, args.rounds, args.batch_size = saved["sizes"], saved["rounds"], saved["batch_size"]
        measured = {"command": saved["command"], "commit": saved["commit"]}
        runs = {part: {(case, n): r for case, n, r in saved[part]} if saved[part] else None
                for part in ("backends", "trainer")}
    else:
        runs = {"backends": None, "trainer": None}
        if "backends" in args.parts:
            runs["backends"] = measure("backend", [c for c in BACKEND_CASES if c in (args.cases or BACKEND_CASES)], args.sizes, args.rounds,
                                       args.batch_size)
        if "trainer" in args.parts:
            runs["trainer"] = measure("trainer", [c for c in TRAINER_CASES if c in (args.cases or TRAINER_CASES)], args.sizes, args.rounds,
                                      args.batch_size)
        if args.results:
            Path(args.results).write_text(json.dumps({
                "sizes": args.sizes, "rounds": args.rounds, "batch_size": args.batch_size,
                "command": common.command_line(), "commit": common.machine_info()["git_commit"],
                **{part: [[case, n, r] for (case, n), r in found.items()] if found else None
                   for part, found in runs.items()}}, indent=1))
    if args.cases and not args.report_only:  # a partial run: its runs are for --results, tables need every case
        print("[evaluation] partial run (--cases): runs saved with --results, BENCHMARKS.md left as it is")
        return
    text = report(args, runs["backends"], runs["trainer"], measured)
    print(text)
    if not args.no_write:
        common.write_section("evaluation", text)


if __name__ == "__main__":
    main()
