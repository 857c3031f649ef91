#!/usr/bin/env python
"""Do both example scripts reach the CPU demo's mAP from scratch? (issue 16)

Runs, on the same generated data (the demo's: 600 train images of 128 px, 3 shape classes, seed 0) and for the
demo's step count:
- the demo (`python -m align_detr_hf.demo`);
- `examples/train_accelerate.py --synthetic_shapes 600 --demo_model`;
- `examples/train_trainer.py --synthetic_shapes 600 --demo_model`;
each with its default recipe (the scripts pick `from_scratch` because no pretrained checkpoint is given), then
evaluates the three final models with the same code on the same validation images (the demo's 100) and writes the
table to BENCHMARKS.md between `<!-- recipes:start -->` and `<!-- recipes:end -->`.

    python benchmarks/bench_recipes.py                    # all three in parallel, 1 thread each (~15-40 min)
    python benchmarks/bench_recipes.py --steps 300        # a shorter check (the table says so)

The scripts run with `--dataloader_num_workers 0` here: on 128 px images decoding costs ~1 ms per image, and worker
processes would only take cores from the three concurrent jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

from align_detr_hf import AlignDetrForObjectDetection  # noqa: E402
from align_detr_hf.data import build_eval_transforms, collate_fn, load_coco_folder  # noqa: E402
from align_detr_hf.evaluation import evaluate_model  # noqa: E402
from align_detr_hf.file_io import claim_output, owned_file, record_output  # noqa: E402
from align_detr_hf.recipes import FROM_SCRATCH  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOBS = ("demo", "accelerate", "trainer")
WRITER = "benchmarks/bench_recipes.py"  # how its files are recorded in OUTPUT_DIR's manifest (file_io)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=FROM_SCRATCH.max_train_steps, help="default: the demo's")
    p.add_argument("--num_train_images", type=int, default=600)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    p.add_argument("--sequential", action="store_true", help="one job at a time (default: all at once)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--margin", type=float, default=0.05, help="allowed |mAP - demo mAP| (absolute)")
    p.add_argument("--output_dir", default="/tmp/bench_recipes")
    p.add_argument("--no_write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--overwrite", action="store_true",
                   help="replace logs / results.json / val data in OUTPUT_DIR that this script did not write")
    p.add_argument("--report_only", action="store_true",
                   help="no training: rewrite the table from OUTPUT_DIR/results.json of an earlier run")
    return p.parse_args(argv)


def job_command(job: str, args, out: Path) -> list[str]:
    common_data = ["--seed", str(args.seed), "--synthetic_shapes", str(args.num_train_images),
                   "--synthetic_image_size", str(args.image_size), "--demo_model"]
    if job == "demo":
        return [sys.executable, "-m", "align_detr_hf.demo", "--output_dir", str(out), "--max_steps", str(args.steps),
                "--num_train_images", str(args.num_train_images), "--image_size", str(args.image_size),
                "--seed", str(args.seed), "--threads", str(args.threads), "--time_budget_s", "1e9", "--quiet"]
    if job == "accelerate":
        return [sys.executable, str(REPO / "examples" / "train_accelerate.py"), *common_data, "--output_dir",
                str(out), "--max_steps", str(args.steps), "--dataloader_num_workers", "0", "--no_eval",
                "--checkpointing_steps", str(10 * args.steps)]
    return [sys.executable, str(REPO / "examples" / "train_trainer.py"), *common_data, "--output_dir", str(out),
            "--max_steps", str(args.steps), "--dataloader_num_workers", "0", "--eval_strategy", "no",
            "--save_strategy", "no", "--logging_steps", "100", "--report_to", "none"]


def model_dir(job: str, out: Path) -> Path:
    return out / ("model" if job == "demo" else "final")


def main(argv=None):
    args = parse_args(argv)
    root = Path(args.output_dir)
    if args.report_only:
        return rerender(root / "results.json", args.no_write)
    # before any work: the files written here (the jobs' folders follow their own commands' rules)
    for name in [f"{job}.log" for job in args.jobs] + ["results.json"]:
        claim_output(root / name, WRITER, overwrite=args.overwrite)
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false"}
    running, results, finished = {}, {}, {}
    for job in args.jobs:
        out = root / job
        cmd = job_command(job, args, out)
        log = open(root / f"{job}.log", "w")
        print(f"[bench_recipes] start {job}: {' '.join(cmd)}", flush=True)
        running[job] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO),
                        time.perf_counter(), cmd, log)
        if args.sequential:
            running[job][0].wait()
            finished[job] = time.perf_counter()
    while len(results) < len(running):
        for job, (proc, start, cmd, log) in running.items():
            if job in results or proc.poll() is None:
                continue
            log.close()
            record_output(root / f"{job}.log", WRITER)
            shown = ["python" if c == sys.executable else os.path.relpath(c, REPO) if c.startswith(str(REPO)) else c
                     for c in cmd]
            wall = finished.get(job, time.perf_counter()) - start
            results[job] = {"returncode": proc.returncode, "wall_s": round(wall, 1),
                            "command": " ".join(shown)}
            print(f"[bench_recipes] {job} finished (rc {proc.returncode}, {results[job]['wall_s']:.0f}s)", flush=True)
            if proc.returncode != 0:
                print((root / f"{job}.log").read_text()[-3000:], flush=True)
        time.sleep(1.0)
    results = {job: results[job] for job in running}

    # the same evaluation for all: the final models on the demo's validation images
    torch.set_num_threads(max(1, args.threads))
    val_annotation = root / "demo" / "data" / "val" / "annotations.json"
    if not val_annotation.is_file():  # the demo was not run: generate its validation set
        from align_detr_hf.file_io import atomic_directory
        from align_detr_hf.synthetic import SHAPE_CLASSES, generate_shapes_dataset

        with atomic_directory(root / "val", WRITER, overwrite=args.overwrite) as staging:
            generate_shapes_dataset(staging, 100, args.image_size, args.seed + 10_000, classes=SHAPE_CLASSES[:3])
        val_annotation = root / "val" / "annotations.json"
    scale = args.image_size / 800.0
    val_set = load_coco_folder(val_annotation, transforms=build_eval_transforms(scale=scale))
    loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_fn)
    for job, result in results.items():
        path = model_dir(job, root / job)
        if result["returncode"] != 0 or not (path / "config.json").is_file():
            continue
        model = AlignDetrForObjectDetection.from_pretrained(path)
        result["metrics"] = evaluate_model(model, loader, val_set.coco_ground_truth())
        print(f"[bench_recipes] {job}: mAP {result['metrics']['map']:.3f}", flush=True)
    with owned_file(root / "results.json", WRITER, overwrite=args.overwrite) as temp:
        temp.write_text(json.dumps({"args": vars(args), "results": results, "num_val": len(val_set),
                                    "command": common.command_line()}, indent=2))
    text = report(args, results, len(val_set), common.command_line())
    print(text)
    if not args.no_write:
        common.write_section("recipes", text)
    return results


def rerender(path: Path, no_write: bool) -> dict:
    saved = json.loads(path.read_text())
    command = saved["command"] + "; the table re-rendered from its results.json with --report_only"
    text = report(argparse.Namespace(**saved["args"]), saved["results"], saved["num_val"], command)
    print(text)
    if not no_write:
        common.write_section("recipes", text)
    return saved["results"]


def report(args, results: dict, num_val: int, command: str) -> str:
    demo_map = results.get("demo", {}).get("metrics", {}).get("map")
    lines = [
        "## Recipes: the example scripts from scratch vs the CPU demo",
        "",
        f"Written by `benchmarks/bench_recipes.py` ({command}). Same data for all: "
        f"{args.num_train_images} generated train images of {args.image_size} px (3 shape classes, seed {args.seed}), "
        f"{args.steps} optimisation steps (the demo's default is {FROM_SCRATCH.max_train_steps}), each job's default "
        f"recipe (the scripts choose `from_scratch`), {args.threads} torch thread(s) per job, jobs run "
        f"{'one at a time' if args.sequential else 'concurrently'} on a shared machine. "
        f"All final models evaluated by the same code on the demo's {num_val} validation images (COCO mAP, "
        f"maxDets 100). Margin: |mAP - demo mAP| <= {args.margin}.",
        "",
        "| job | mAP | AP50 | AP75 | mAP - demo | within margin | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for job, r in results.items():
        m = r.get("metrics")
        if m is None:
            lines.append(f"| {job} | failed (rc {r['returncode']}) | | | | | `{r['command']}` |")
            continue
        delta = "" if demo_map is None else f"{m['map'] - demo_map:+.3f}"
        within = "" if demo_map is None else ("yes" if abs(m["map"] - demo_map) <= args.margin else "**no**")
        lines.append(f"| {job} | {m['map']:.3f} | {m['map_50']:.3f} | {m['map_75']:.3f} | {delta} | {within} | "
                     f"`{r['command']}` |")
    info = common.machine_info()
    lines += ["", f"Machine: {info['cpu']}, {info['cpu_cores']} cores, torch {info['torch']}, transformers "
                  f"{info['transformers']}, commit {info['git_commit']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    common.run_main(main)
