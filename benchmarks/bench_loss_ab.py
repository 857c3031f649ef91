"""The Align-DETR paper's claim in miniature: the same tiny network trained with DINO's loss and with Align-DETR's.

Both arms use the demo's synthetic shapes data (`align_detr_hf.synthetic`, one fixed train/val set), the demo's
~1 M-parameter network (`align_detr_hf.demo.demo_config`), optimiser, schedule, batch size and number of steps; only
`config.loss_type` differs ("dino": focal loss, one-to-one matching; "align_detr": IA-BCE, one-to-k matching with
prime-sample weights). Each seed sets the model initialisation, the batch order and the denoising draws; seed s of
both arms starts from the same initial weights. COCO box mAP / AP50 / AP75 on the validation set are reported as
mean and spread (sample standard deviation, min-max) over seeds and written to BENCHMARKS.md between the
`<!-- loss_ab:start -->` / `<!-- loss_ab:end -->` markers.

    python benchmarks/bench_loss_ab.py --steps 600 --seeds 0 1 2 --workers 2

Runs go to `--workers` processes with 1 torch thread each (the arms interleave, so a machine whose load changes
over time slows both alike). `--no_write` prints the table without touching BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

LOSS_TYPES = ("dino", "align_detr")
WRITER = "benchmarks/bench_loss_ab.py"  # how its files are recorded in their folders' manifests (file_io)
METRICS = (("map", "mAP"), ("map_50", "AP50"), ("map_75", "AP75"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimisation steps per run (same for both losses)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (1 torch thread each)")
    p.add_argument("--num_train_images", type=int, default=600)
    p.add_argument("--num_val_images", type=int, default=100)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--data_dir", default=None, help="where to generate the data (default: a temporary folder)")
    p.add_argument("--results_json", default=None, help="also write every run's metrics here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --results_json / --data_dir content this script did not write (other files kept)")
    p.add_argument("--no_write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--benchmarks_md", default=None, help="the BENCHMARKS.md to update (default: the repository's)")
    return p


def train_and_evaluate(loss_type: str, seed: int, args: dict, train_ann: str, val_ann: str) -> dict:
    """One run: demo network with `loss_type`, `args['steps']` steps from seed `seed`, COCO metrics on val."""
    import torch

    from align_detr_hf.data import Compose, RandomHorizontalFlip, build_eval_transforms, collate_fn, load_coco_folder
    from align_detr_hf.demo import demo_config
    from align_detr_hf.evaluation import evaluate_model
    from align_detr_hf.modeling_align_detr import AlignDetrForObjectDetection
    from align_detr_hf.optim import build_optimizer, build_scheduler

    torch.set_num_threads(1)
    start = time.perf_counter()
    train_set = load_coco_folder(train_ann, transforms=Compose([RandomHorizontalFlip(0.5)]), seed=seed)
    val_set = load_coco_folder(val_ann, transforms=build_eval_transforms(scale=args["image_size"] / 800.0))

    torch.manual_seed(seed)  # same initial weights for both arms of a seed
    config = demo_config(train_set.id2label)
    config.loss_type = loss_type
    model = AlignDetrForObjectDetection(config)
    model.model.backbone.model.embedder.requires_grad_(True)  # from scratch: train the stem too (as the demo)
    optimizer = build_optimizer(model, lr=args["lr"], backbone_lr_mult=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=args["warmup_steps"], warmup_start_factor=0.01,
                                milestones=[int(args["steps"] * 0.8)])
    loader = torch.utils.data.DataLoader(train_set, batch_size=args["batch_size"], shuffle=True,
                                         collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed),
                                         drop_last=True)
    model.train()
    step, epoch, losses = 0, 0, []
    while step < args["steps"]:
        train_set.set_epoch(epoch)
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            if step >= args["steps"]:
                break
        epoch += 1
    train_seconds = time.perf_counter() - start
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_fn)
    metrics = evaluate_model(model, val_loader, val_set.coco_ground_truth())
    result = {"loss_type": loss_type, "seed": seed, "steps": step, "train_seconds": round(train_seconds, 1),
              "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 3),
              **{key: float(metrics[key]) for key, _ in METRICS}}
    print(f"[loss_ab] {loss_type:10s} seed {seed}: mAP {result['map']:.3f} AP50 {result['map_50']:.3f} "
          f"AP75 {result['map_75']:.3f} ({step} steps, {train_seconds:.0f}s)", flush=True)
    return result


def summarise(results: list[dict]) -> dict:
    """Per loss and metric: mean, sample std, min, max over seeds."""
    table = {}
    for loss_type in LOSS_TYPES:
        runs = [r for r in results if r["loss_type"] == loss_type]
        table[loss_type] = {"seeds": [r["seed"] for r in runs]}
        for key, _ in METRICS:
            values = [r[key] for r in runs]
            table[loss_type][key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
    return table


def markdown(table: dict, results: list[dict], args: argparse.Namespace, wall_seconds: float) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import command_line, machine_info

    names = {"dino": "DINO (focal, one-to-one)", "align_detr": "Align-DETR (IA-BCE, one-to-k, rank weights)"}
    lines = [
        "## Loss A/B: DINO's loss vs Align-DETR's loss (synthetic shapes, same network and steps)",
        "",
        f"Demo network (~1 M parameters, d_model 64, 2+2 layers, 30 queries) trained from scratch for {args.steps} "
        f"steps (batch {args.batch_size}, lr {args.lr}, {args.num_train_images} train images of "
        f"{args.image_size} px), evaluated on {args.num_val_images} validation images; seeds {args.seeds}. "
        "Mean +- sample standard deviation over seeds, [min, max] in brackets. Only `config.loss_type` differs.",
        "",
        "| loss | " + " | ".join(label for _, label in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for loss_type in LOSS_TYPES:
        cells = [
            f"{s['mean']:.3f} +- {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"
            for s in (table[loss_type][key] for key, _ in METRICS)
        ]
        lines.append(f"| {names[loss_type]} | " + " | ".join(cells) + " |")
    diff = {key: table["align_detr"][key]["mean"] - table["dino"][key]["mean"] for key, _ in METRICS}
    lines += [
        "",
        "Align-DETR minus DINO (means): " + ", ".join(f"{label} {diff[key]:+.3f}" for key, label in METRICS) + ".",
        "",
        "Per run (mAP / AP50 / AP75, mean loss of the last 20 steps, training seconds):",
        "",
    ]
    for r in sorted(results, key=lambda r: (r["loss_type"], r["seed"])):
        lines.append(f"- {r['loss_type']} seed {r['seed']}: {r['map']:.3f} / {r['map_50']:.3f} / {r['map_75']:.3f}, "
                     f"loss {r['final_loss']}, {r['train_seconds']:.0f} s")
    info = machine_info()
    lines += [
        "",
        f"Command: `{command_line()}` ({wall_seconds / 60:.1f} min wall, {args.workers} parallel runs of 1 thread; "
        f"{info.get('cpu', '')}, torch {info.get('torch', '')}, commit {info.get('git_commit', '')}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from align_detr_hf.file_io import claim_output, owned_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import write_shapes_data

    if args.results_json:  # before hours of training: the file may be replaced only if it is ours
        claim_output(args.results_json, WRITER, overwrite=args.overwrite)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        train_ann, val_ann = map(str, write_shapes_data(data, WRITER, args.overwrite, args.num_train_images,
                                                        args.num_val_images, args.image_size))
        run_args = {k: getattr(args, k) for k in ("steps", "image_size", "batch_size", "lr", "warmup_steps")}
        jobs = [(loss_type, seed) for seed in args.seeds for loss_type in LOSS_TYPES]
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            futures = [pool.submit(train_and_evaluate, lt, s, run_args, train_ann, val_ann) for lt, s in jobs]
            results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    table = summarise(results)
    text = markdown(table, results, args, wall)
    print(text)
    if args.results_json:
        with owned_file(args.results_json, WRITER, overwrite=args.overwrite) as temp:
            temp.write_text(json.dumps({"results": results, "summary": table}, indent=2))
    if not args.no_write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        write_section("loss_ab", text, args.benchmarks_md)
    return {"results": results, "summary": table}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    common.run_main(main)
