"""The measured effect of the Align-DETR loss on transformers' own detectors: each supported model is trained twice
on the demo's synthetic shapes (its own loss, then the Align-DETR loss via `use_align_detr_loss`), with the same
tiny widths, data, steps and seeds, and evaluated with COCO mAP / AP50 / AP75. Writes the `loss_adapters` section
of BENCHMARKS.md (mean and sample standard deviation over seeds).

    python benchmarks/bench_loss_adapters.py                  # CPU-sized: < 30 min on 2 cores
    python benchmarks/bench_loss_adapters.py --full           # longer runs, larger data (meant for a GPU)
    python benchmarks/bench_loss_adapters.py --models rt_detr --seeds 0 --steps 20   # a quick check

Every (model, loss, seed) run is appended to `--results` (JSON lines) as it finishes; a rerun with the same settings
skips the runs already there, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

from align_detr_hf.data import (  # noqa: E402
    Compose,
    RandomHorizontalFlip,
    build_eval_transforms,
    collate_fn,
    load_coco_folder,
)
from align_detr_hf.evaluation import evaluate_model  # noqa: E402
from align_detr_hf.loss_adapters import use_align_detr_loss  # noqa: E402
from align_detr_hf.file_io import claim_output, record_output  # noqa: E402

MODELS = ("deformable_detr", "deformable_detr_two_stage", "conditional_detr", "rt_detr", "rt_detr_v2", "d_fine")
LOSSES = ("own", "align_detr")


def tiny_backbone(out_features=("stage2", "stage3", "stage4")) -> dict:
    """The demo's backbone: a 4-stage basic-block ResNet, 16-128 channels, random init (nothing downloaded)."""
    return {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
            "layer_type": "basic", "out_features": list(out_features)}


def build_detector(name: str, id2label: dict, d_model: int, num_queries: int, num_layers: int):
    """A tiny transformers detector: same backbone, width, layer count and queries for every model."""
    import transformers

    width = dict(d_model=d_model, decoder_layers=num_layers, decoder_ffn_dim=4 * d_model, decoder_attention_heads=4,
                 encoder_ffn_dim=4 * d_model, encoder_attention_heads=4, num_queries=num_queries, id2label=id2label)
    if name.startswith("deformable_detr"):
        two_stage = name.endswith("two_stage")
        config = transformers.DeformableDetrConfig(
            backbone_config=tiny_backbone(), encoder_layers=num_layers, num_feature_levels=4, dropout=0.0,
            with_box_refine=two_stage, two_stage=two_stage, two_stage_num_proposals=num_queries, auxiliary_loss=True,
            disable_custom_kernels=True, **width)
        return transformers.DeformableDetrForObjectDetection(config)
    if name == "conditional_detr":
        # single-level, stride 16 (the stride-32 map of a 128 px image is only 4x4)
        config = transformers.ConditionalDetrConfig(
            backbone_config=tiny_backbone(["stage3"]), encoder_layers=num_layers, dropout=0.0, auxiliary_loss=True,
            **width)
        return transformers.ConditionalDetrForObjectDetection(config)
    rt_kwargs = dict(backbone_config=tiny_backbone(), encoder_in_channels=[32, 64, 128], feat_strides=[8, 16, 32],
                     encoder_hidden_dim=d_model, hidden_expansion=0.5, decoder_in_channels=[d_model] * 3,
                     num_denoising=30, **width)
    if name == "rt_detr":
        return transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**rt_kwargs))
    if name == "rt_detr_v2":
        return transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**rt_kwargs))
    if name == "d_fine":
        return transformers.DFineForObjectDetection(transformers.DFineConfig(**rt_kwargs))
    raise ValueError(f"Unknown model {name!r}; choose from {MODELS}.")


WRITER = "benchmarks/bench_loss_adapters.py"  # how its files are recorded in their folders' manifests (file_io)


def make_data(out: Path, args):
    train_ann, val_ann = common.write_shapes_data(out, WRITER, args.overwrite, args.num_train_images,
                                                  args.num_val_images, args.image_size, args.num_classes)
    train = load_coco_folder(train_ann, transforms=Compose([RandomHorizontalFlip(0.5)]), seed=0)
    val = load_coco_folder(val_ann, transforms=build_eval_transforms(scale=args.image_size / 800.0))
    return train, val


def _to_device(batch: dict, device) -> dict:
    labels = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch["labels"]]
    return {"pixel_values": batch["pixel_values"].to(device), "pixel_mask": batch["pixel_mask"].to(device),
            "labels": labels}


def train_and_evaluate(model_name: str, loss: str, seed: int, train_set, val_set, args, device="cpu") -> dict:
    torch.manual_seed(seed)
    model = build_detector(model_name, train_set.id2label, args.d_model, args.num_queries, args.num_layers)
    model.to(device)
    if loss == "align_detr":
        use_align_detr_loss(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = max(1, min(args.warmup_steps, args.steps // 5))
    milestone = int(args.steps * 0.8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, 0.01 + 0.99 * s / warmup) * (0.1 if s >= milestone else 1.0))
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))
    start, step, epoch, last_loss = time.perf_counter(), 0, 0, math.nan
    while step < args.steps:
        train_set.set_epoch(epoch)
        for batch in loader:
            output = model(**_to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            scheduler.step()
            step, last_loss = step + 1, output.loss.item()
            if step >= args.steps:
                break
        epoch += 1
    train_seconds = time.perf_counter() - start
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=16, collate_fn=collate_fn)
    metrics = evaluate_model(model, val_loader, val_set.coco_ground_truth(), device=device)
    return {"model": model_name, "loss": loss, "seed": seed, "steps": step, "map": metrics["map"],
            "map_50": metrics["map_50"], "map_75": metrics["map_75"], "final_train_loss": last_loss,
            "train_seconds": round(train_seconds, 1)}


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _paired_difference(results: list[dict], model_name: str) -> str:
    """Align-DETR minus own mAP, per seed (same seed = same init and batches), mean ± sample std."""
    by_seed = {(r["loss"], r["seed"]): r["map"] for r in results if r["model"] == model_name}
    diffs = [by_seed[("align_detr", s)] - by_seed[("own", s)] for (loss, s) in by_seed
             if loss == "own" and ("align_detr", s) in by_seed]
    if not diffs:
        return "-"
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.3f} ± {spread:.3f}"


def render(results: list[dict], args, seconds: float) -> str:
    lines = [
        f"## Align-DETR loss on transformers' detectors: "
        f"{'all supported models' if set(args.models) == set(MODELS) else ', '.join(args.models)}, {args.steps} steps "
        f"(`benchmarks/bench_loss_adapters.py`)",
        "",
        f"Each model trained twice from random init on the synthetic shapes ({args.num_train_images} train / "
        f"{args.num_val_images} val images, {args.image_size} px, {args.num_classes} classes): with its own loss and "
        f"with the Align-DETR loss (`use_align_detr_loss(model)`, defaults). Same tiny widths (demo ResNet backbone "
        f"16-128 channels, d_model {args.d_model}, {args.num_layers} encoder + {args.num_layers} decoder layers, "
        f"{args.num_queries} queries), {args.steps} steps of batch {args.batch_size}, AdamW lr {args.lr}, grad clip "
        f"0.1, flip augmentation, seeds {args.seeds}. COCO bbox metrics on the val set: mean ± sample std over seeds; "
        f"Δ mAP: Align-DETR minus own, paired by seed.",
        "",
        "| model | loss | seeds | mAP | AP50 | AP75 | Δ mAP | train s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model_name in args.models:
        for loss in LOSSES:
            runs = [r for r in results if r["model"] == model_name and r["loss"] == loss]
            if not runs:
                continue
            cells = [_mean_spread([r[k] for r in runs]) for k in ("map", "map_50", "map_75")]
            delta = _paired_difference(results, model_name) if loss == "align_detr" else ""
            mean_time = statistics.mean(r["train_seconds"] for r in runs)
            lines.append(f"| {model_name} | {loss} | {len(runs)} | {' | '.join(cells)} | {delta} | {mean_time:.0f} |")
    expected = len(args.models) * len(LOSSES) * len(args.seeds)
    if len(results) < expected:
        lines += ["", f"**Partial: {len(results)} of {expected} runs finished.**"]
    best = max((r["map"] for r in results), default=0.0)
    if best < 0.1:
        lines += ["", f"At this size every run is far from converged (best mAP {best:.3f}): a Δ within its spread is seed "
                      f"noise, and none of these figures predicts converged accuracy; `--full` runs are needed for that."]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    total_train = sum(r["train_seconds"] for r in results) / 60
    how = (f"re-rendered (`--report_only`) from the runs recorded by `bench_loss_adapters.py` with these settings"
           if args.report_only else f"{seconds / 60:.1f} min of wall time in this invocation")
    lines += ["", f"Command: `{common.command_line()}`; {how}; {total_train:.0f} min of training in all. "
                  f"Train times are wall-clock on a machine shared with other jobs (1-min load average at writing: "
                  f"{load:.1f} on {os.cpu_count()} cores).",
              f"Machine: {json.dumps(common.machine_info())}"]
    if not args.full:
        lines.append("GPU (`--full`) figures: pending (no GPU run yet).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true",
                   help="longer runs: 2000 steps of batch 8, 600 train images, d_model 128, 5 seeds (for a GPU)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--d_model", type=int, default=None)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--num_queries", type=int, default=30)
    p.add_argument("--num_train_images", type=int, default=None)
    p.add_argument("--num_val_images", type=int, default=None)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--num_classes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--work_dir", default="/tmp/bench_loss_adapters")
    p.add_argument("--results", default=None, help="JSON lines of finished runs (default: <work_dir>/runs.jsonl)")
    p.add_argument("--output", default=str(common.REPO / "BENCHMARKS.md"))
    p.add_argument("--no_write", action="store_true", help="do not touch BENCHMARKS.md")
    p.add_argument("--overwrite", action="store_true",
                   help="take over a --results file / --work_dir data this script did not write (other files kept)")
    p.add_argument("--section", default="loss_adapters",
                   help="BENCHMARKS.md section to write (another name keeps a second table, e.g. longer runs)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: rewrite the BENCHMARKS.md section from the runs in --results")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    full_defaults = {"seeds": [0, 1, 2, 3, 4], "steps": 2000, "batch_size": 8, "d_model": 128,
                     "num_train_images": 600, "num_val_images": 100}
    cpu_defaults = {"seeds": [0, 1, 2], "steps": 120, "batch_size": 4, "d_model": 64, "num_train_images": 200,
                    "num_val_images": 50}
    for key, value in (full_defaults if args.full else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work_dir)
    results_path = Path(args.results or work / "runs.jsonl")
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "d_model", "num_layers", "num_queries",
                                              "num_train_images", "num_val_images", "image_size", "num_classes")}
    settings["device"] = device
    done = []
    if results_path.exists():
        done = [r for r in map(json.loads, results_path.read_text().splitlines()) if r.get("settings") == settings]
    start = time.perf_counter()
    if args.report_only:
        common.write_section(args.section, render(done, args, 0.0), args.output)
        return done
    claim_output(results_path, WRITER, overwrite=args.overwrite)  # appended to: it must be ours, as we left it
    train_set, val_set = make_data(work / "data", args)
    for seed in args.seeds:
        for model_name in args.models:
            for loss in LOSSES:
                if any(r["model"] == model_name and r["loss"] == loss and r["seed"] == seed for r in done):
                    continue
                result = train_and_evaluate(model_name, loss, seed, train_set, val_set, args, device)
                result["settings"] = settings
                done.append(result)
                results_path.parent.mkdir(parents=True, exist_ok=True)
                with results_path.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                record_output(results_path, WRITER)
                if not args.no_write:  # after every run: an interrupted benchmark still leaves its table
                    common.write_section(args.section, render(done, args, time.perf_counter() - start),
                                         args.output)
                print(f"[bench] {model_name:26s} {loss:10s} seed {seed}: mAP {result['map']:.3f} AP50 "
                      f"{result['map_50']:.3f} AP75 {result['map_75']:.3f} ({result['train_seconds']:.0f}s train, "
                      f"{(time.perf_counter() - start) / 60:.1f} min so far)", flush=True)
    return done


if __name__ == "__main__":
    common.run_main(main)
