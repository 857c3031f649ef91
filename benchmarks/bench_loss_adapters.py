"""The measured effect of the Align-DETR loss on transformers' own detectors: each supported model is trained with
its own loss and with the Align-DETR loss (`use_align_detr_loss`), with the same tiny widths, data, steps and seeds
(paired by seed: same init and batches), on two generated data sets (`shapes`: a few large overlapping shapes,
3 classes; `dense`: many small shapes that do not overlap, 4 classes), and evaluated with COCO mAP / AP50 / AP75.
The ablation adds IA-BCE alone (one-to-one, i.e. k = 1, where rank weights are all 1) and IA-BCE + one-to-k without
rank weights (tau -> infinity); `align_detr:k=K,tau=T` variants sweep k and tau. Writes the `loss_adapters` section
of BENCHMARKS.md (per-seed mAP, mean and sample standard deviation over seeds, Δ paired by seed).

    python benchmarks/bench_loss_adapters.py                  # CPU-sized (see --help for the defaults)
    python benchmarks/bench_loss_adapters.py --full           # longer runs, larger data (meant for a GPU)
    python benchmarks/bench_loss_adapters.py --models rt_detr --seeds 0 --steps 20   # a quick check

Every (data set, model, loss, seed) run is appended to `--results` (JSON lines) as it finishes; a rerun with the same
settings skips the runs already there, so an interrupted benchmark resumes. Several processes may share the work
(`--shard i/n`, each with its own results file); `--report_only --results a.jsonl b.jsonl ...` merges them.
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

MODELS = ("deformable_detr", "deformable_detr_two_stage", "conditional_detr", "rt_detr", "rt_detr_v2", "d_fine",
          "lw_detr", "rf_detr", "deimv2")
DEFAULT_MODELS = ("deformable_detr_two_stage", "rt_detr", "d_fine", "lw_detr", "rf_detr", "deimv2")
WITHOUT_PROPOSALS = ("deformable_detr", "conditional_detr")
DATASETS = ("shapes", "dense")
# own: the model's own loss; align_detr: ours (defaults); the ablation: IA-BCE alone (one-to-one matching: one
# positive per GT, so every rank weight is 1), + one-to-k (default k, rank weights off: tau -> infinity).
ABLATION = ("ia_bce", "ia_bce+one_to_k")
ABLATION_MODELS = ("rt_detr", "lw_detr", "rf_detr")
NO_RANK_WEIGHTS_TAU = 1e9  # exp(-rank / 1e9) = 1 - 5e-9 at rank 5


def loss_options(loss: str, model_name: str, num_layers: int) -> dict | None:
    """`use_align_detr_loss` keyword arguments of a loss variant; None: the model's own loss. Variants: `own`,
    `align_detr`, `ia_bce`, `ia_bce+one_to_k`, and `align_detr:k=K,tau=T` (k of every decoder layer but the last,
    which stays 1 as in Align-DETR, and of the encoder; either key may be left out)."""
    encoder = 0 if model_name in WITHOUT_PROPOSALS else None
    if loss == "own":
        return None
    if loss == "align_detr":
        return {}
    if loss == "ia_bce":
        return {"decoder_num_gt_repeat": [1] * num_layers, "encoder_num_gt_repeat": 1 if encoder is None else 0}
    if loss == "ia_bce+one_to_k":
        return {"tau": NO_RANK_WEIGHTS_TAU}
    if loss.startswith("align_detr:"):
        values = dict(item.split("=") for item in loss.split(":", 1)[1].split(","))
        if set(values) - {"k", "tau"}:
            raise ValueError(f"Unknown keys in loss variant {loss!r}: only k and tau.")
        options = {}
        if "k" in values:
            k = int(values["k"])
            options.update(decoder_num_gt_repeat=[k] * (num_layers - 1) + [1],
                           encoder_num_gt_repeat=k if encoder is None else 0)
        if "tau" in values:
            options["tau"] = float(values["tau"])
        return options
    raise ValueError(f"Unknown loss {loss!r}: own, align_detr, ia_bce, ia_bce+one_to_k or align_detr:k=K,tau=T.")


def tiny_backbone(out_features=("stage2", "stage3", "stage4")) -> dict:
    """The demo's backbone: a 4-stage basic-block ResNet, 16-128 channels, random init (nothing downloaded)."""
    return {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1],
            "layer_type": "basic", "out_features": list(out_features)}


def build_detector(name: str, id2label: dict, d_model: int, num_queries: int, num_layers: int, image_size: int):
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
    if name in ("lw_detr", "rf_detr"):
        # their own backbone kind (a windowed ViT; theirs cannot take a ResNet): 4 blocks of width d_model, patch 8,
        # features of blocks 2 and 4; Group DETR's default 13 query groups
        vit = dict(model_type="lw_detr_vit" if name == "lw_detr" else "rf_detr_dinov2", hidden_size=d_model,
                   num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=image_size, patch_size=8,
                   num_windows=4, out_indices=[2, 4])
        group_kwargs = dict(backbone_config=vit, d_model=d_model, decoder_layers=num_layers,
                            decoder_ffn_dim=4 * d_model, decoder_self_attention_heads=4,
                            decoder_cross_attention_heads=4, num_queries=num_queries, id2label=id2label)
        if name == "lw_detr":
            return transformers.LwDetrForObjectDetection(
                transformers.LwDetrConfig(projector_scale_factors=[1.0], **group_kwargs))
        return transformers.RfDetrForObjectDetection(transformers.RfDetrConfig(**group_kwargs))
    rt_kwargs = dict(backbone_config=tiny_backbone(), encoder_in_channels=[32, 64, 128], feat_strides=[8, 16, 32],
                     encoder_hidden_dim=d_model, hidden_expansion=0.5, decoder_in_channels=[d_model] * 3,
                     num_denoising=30, **width)
    if name == "rt_detr":
        return transformers.RTDetrForObjectDetection(transformers.RTDetrConfig(**rt_kwargs))
    if name == "rt_detr_v2":
        return transformers.RTDetrV2ForObjectDetection(transformers.RTDetrV2Config(**rt_kwargs))
    if name == "d_fine":
        return transformers.DFineForObjectDetection(transformers.DFineConfig(**rt_kwargs))
    if name == "deimv2":
        return transformers.Deimv2ForObjectDetection(transformers.Deimv2Config(**rt_kwargs))
    raise ValueError(f"Unknown model {name!r}; choose from {MODELS}.")


WRITER = "benchmarks/bench_loss_adapters.py"  # how its files are recorded in their folders' manifests (file_io)


def write_dense_data(folder: Path, overwrite: bool, num_train: int, num_val: int, image_size: int) -> tuple[Path, Path]:
    """The second data set: many small shapes that do not overlap (`generate_dense_dataset`), all 4 classes, 6 to
    image_size / 4 px, up to image_size / 8 objects an image; under the ownership rule as `write_shapes_data`."""
    from align_detr_hf.file_io import atomic_directory
    from align_detr_hf.synthetic import generate_dense_dataset

    shape = dict(image_size=image_size, num_objects=image_size // 8, min_px=6.0, max_px=image_size / 4)
    with atomic_directory(folder, WRITER, overwrite=overwrite) as staging:
        generate_dense_dataset(staging / "train", num_train, seed=0, **shape)
        generate_dense_dataset(staging / "val", num_val, seed=10_000, **shape)
    return folder / "train" / "annotations.json", folder / "val" / "annotations.json"


def make_data(out: Path, dataset: str, args):
    if dataset == "shapes":
        train_ann, val_ann = common.write_shapes_data(out, WRITER, args.overwrite, args.num_train_images,
                                                      args.num_val_images, args.image_size, args.num_classes)
    else:
        train_ann, val_ann = write_dense_data(out, args.overwrite, args.num_train_images, args.num_val_images,
                                              args.image_size)
    train = load_coco_folder(train_ann, transforms=Compose([RandomHorizontalFlip(0.5)]), seed=0)
    val = load_coco_folder(val_ann, transforms=build_eval_transforms(scale=args.image_size / 800.0))
    return train, val


def _to_device(batch: dict, device) -> dict:
    labels = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch["labels"]]
    return {"pixel_values": batch["pixel_values"].to(device), "pixel_mask": batch["pixel_mask"].to(device),
            "labels": labels}


def train_and_evaluate(dataset: str, model_name: str, loss: str, seed: int, train_set, val_set, args,
                       device="cpu") -> dict:
    torch.manual_seed(seed)
    model = build_detector(model_name, train_set.id2label, args.d_model, args.num_queries, args.num_layers,
                           args.image_size)
    model.to(device)
    options = loss_options(loss, model_name, args.num_layers)
    if options is not None:
        use_align_detr_loss(model, **options)
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
    return {"dataset": dataset, "model": model_name, "loss": loss, "seed": seed, "steps": step, "map": metrics["map"],
            "map_50": metrics["map_50"], "map_75": metrics["map_75"], "final_train_loss": last_loss,
            "train_seconds": round(train_seconds, 1)}


# Four decimals: CPU-sized runs sit around mAP 0.001, where three would show every row equal.
def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def _paired_difference(results: list[dict], dataset: str, model_name: str, loss: str, metric: str = "map") -> str:
    """`loss` minus own `metric`, per seed (same seed = same init and batches), mean ± sample std, and on how many
    seeds `loss` is ahead."""
    by_seed = {(r["loss"], r["seed"]): r[metric] for r in results if r["model"] == model_name
               and r["dataset"] == dataset}
    diffs = [by_seed[(loss, s)] - by_seed[("own", s)] for (name, s) in by_seed
             if name == "own" and (loss, s) in by_seed]
    if not diffs:
        return "-"
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return f"{statistics.mean(diffs):+.4f} ± {spread:.4f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def planned_runs(args) -> list[tuple[str, str, str, int]]:
    """(data set, model, loss, seed) of every run, in the order they run: seed by seed, so that a stopped benchmark
    still has paired seeds of every model."""
    runs = []
    for seed in args.seeds:
        for dataset in args.datasets:
            for model_name in args.models:
                losses = list(args.losses)
                if model_name in args.ablation_models:
                    losses += [loss for loss in ABLATION if loss not in losses]
                if model_name in args.sweep_models and dataset in args.sweep_datasets:
                    losses += [loss for loss in args.sweep if loss not in losses]
                runs += [(dataset, model_name, loss, seed) for loss in losses]
    return runs


def render(results: list[dict], args, seconds: float) -> str:
    lines = [
        f"## Align-DETR loss on transformers' detectors: {', '.join(args.models)}, {args.steps} steps "
        f"(`benchmarks/bench_loss_adapters.py`)",
        "",
        " ".join([
            "Each model trained from random init with its own loss and with the Align-DETR loss",
            "(`use_align_detr_loss(model)`, defaults), on two generated data sets: `shapes` (a few large overlapping",
            f"shapes, {args.num_classes} classes) and `dense` (up to {args.image_size // 8} small non-overlapping",
            f"shapes of 6-{args.image_size // 4} px, 4 classes); {args.num_train_images} train /",
            f"{args.num_val_images} val images of {args.image_size} px each. Same tiny widths for every model",
            f"(d_model {args.d_model}, {args.num_layers} decoder layers, {args.num_queries} queries; the demo's",
            "ResNet backbone 16-128 channels, except LW-DETR and RF-DETR, which need their ViT: 4 blocks of width",
            f"{args.d_model}, patch 8; their Group DETR default of 13 query groups), {args.steps} steps of batch",
            f"{args.batch_size}, AdamW lr {args.lr}, grad clip 0.1, flip augmentation, seeds {args.seeds}. COCO bbox",
            "mAP on the val set per seed, mean ± sample std over seeds; Δ mAP: the row's loss minus the model's own,",
            "paired by seed (on how many seeds it is ahead); Δ AP50 the same for AP50. Ablation rows: `ia_bce` =",
            "IA-BCE with one-to-one matching (k = 1, so no rank weights), `ia_bce+one_to_k` = default k with rank",
            "weights off (tau = 1e9); `align_detr` = both plus rank weights (tau 1.5); `align_detr:k=K,tau=T` = k of",
            "every decoder layer but the last (and of the encoder), tau of the rank weights.",
        ]),
        "",
        "| data | model | loss | mAP per seed | mAP | AP50 | AP75 | Δ mAP vs own | Δ AP50 vs own | train s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    planned = planned_runs(args)
    for dataset in args.datasets:
        for model_name in args.models:
            losses = dict.fromkeys(loss for d, m, loss, _ in planned if d == dataset and m == model_name)
            for loss in losses:
                runs = sorted((r for r in results if (r["dataset"], r["model"], r["loss"]) ==
                               (dataset, model_name, loss)), key=lambda r: r["seed"])
                if not runs:
                    continue
                per_seed = " ".join(f"{r['map']:.4f}" for r in runs)
                cells = [_mean_spread([r[k] for r in runs]) for k in ("map", "map_50", "map_75")]
                delta = " | ".join(_paired_difference(results, dataset, model_name, loss, metric) if loss != "own"
                                   else "" for metric in ("map", "map_50"))
                mean_time = statistics.mean(r["train_seconds"] for r in runs)
                lines.append(f"| {dataset} | {model_name} | {loss} | {per_seed} | {' | '.join(cells)} | {delta} | "
                             f"{mean_time:.0f} |")
    if len(results) < len(planned):
        lines += ["", f"**Partial: {len(results)} of {len(planned)} runs finished.**"]
    best = max((r["map"] for r in results), default=0.0)
    if best < 0.1:
        lines += ["", f"At this size every run is far from converged (best mAP {best:.3f}): a Δ within its spread is seed "
                      f"noise, and none of these figures predicts converged accuracy; `--full` runs are needed for that."]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    total_train = sum(r["train_seconds"] for r in results) / 60
    how = ("re-rendered (`--report_only`) from the runs recorded by `bench_loss_adapters.py` with these settings"
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
                   help="longer runs: 2000 steps of batch 8, 600 train images of 128 px, d_model 128 (for a GPU)")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--losses", nargs="+", default=["own", "align_detr"], help="loss variants of every model")
    p.add_argument("--ablation_models", nargs="*", default=list(ABLATION_MODELS), choices=MODELS,
                   help=f"models that also run the ablation {ABLATION}")
    p.add_argument("--sweep", nargs="*", default=["align_detr:k=3", "align_detr:tau=0.5", "align_detr:tau=4"],
                   help="k / tau variants (align_detr:k=K,tau=T) run for --sweep_models on --sweep_datasets")
    p.add_argument("--sweep_models", nargs="*", default=["rt_detr"], choices=MODELS)
    p.add_argument("--sweep_datasets", nargs="*", default=["shapes"], choices=DATASETS)
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
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--num_classes", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th planned run from the i-th (parallel processes)")
    p.add_argument("--work_dir", default="/tmp/bench_loss_adapters")
    p.add_argument("--results", nargs="+", default=None,
                   help="JSON lines of finished runs: appended to the first (default <work_dir>/runs.jsonl), all "
                        "read (runs of other shards)")
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
                     "num_train_images": 600, "num_val_images": 100, "image_size": 128}
    cpu_defaults = {"seeds": [0, 1, 2, 3, 4], "steps": 80, "batch_size": 4, "d_model": 32, "num_train_images": 120,
                    "num_val_images": 40, "image_size": 64}
    for key, value in (full_defaults if args.full else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for loss in [*args.losses, *args.sweep]:
        loss_options(loss, "rt_detr", args.num_layers)  # an unknown variant: one line now, not after an hour
    shard, num_shards = (int(x) for x in args.shard.split("/"))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work_dir)
    results_paths = [Path(r) for r in (args.results or [work / "runs.jsonl"])]
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "d_model", "num_layers", "num_queries",
                                              "num_train_images", "num_val_images", "image_size", "num_classes")}
    settings["device"] = device
    done = [r for path in results_paths if path.exists() for r in map(json.loads, path.read_text().splitlines())
            if r.get("settings") == settings]
    start = time.perf_counter()
    if args.report_only:
        common.write_section(args.section, render(done, args, 0.0), args.output)
        return done
    results_path = results_paths[0]
    claim_output(results_path, WRITER, overwrite=args.overwrite)  # appended to: it must be ours, as we left it
    data = {}
    for dataset, model_name, loss, seed in planned_runs(args)[shard::num_shards]:
        if any((r["dataset"], r["model"], r["loss"], r["seed"]) == (dataset, model_name, loss, seed) for r in done):
            continue
        if dataset not in data:  # each shard reads the data; shard 0 (or a single process) writes it
            folder = work / f"data_{dataset}"
            if shard == 0 or not (folder / "val" / "annotations.json").exists():
                data[dataset] = make_data(folder, dataset, args)
            else:
                data[dataset] = (load_coco_folder(folder / "train" / "annotations.json",
                                                  transforms=Compose([RandomHorizontalFlip(0.5)]), seed=0),
                                 load_coco_folder(folder / "val" / "annotations.json",
                                                  transforms=build_eval_transforms(scale=args.image_size / 800.0)))
        result = train_and_evaluate(dataset, model_name, loss, seed, *data[dataset], args, device)
        result["settings"] = settings
        done.append(result)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        with results_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        record_output(results_path, WRITER)
        if not args.no_write:  # after every run: an interrupted benchmark still leaves its table
            common.write_section(args.section, render(done, args, time.perf_counter() - start), args.output)
        print(f"[bench] {dataset:6s} {model_name:26s} {loss:22s} seed {seed}: mAP {result['map']:.3f} AP50 "
              f"{result['map_50']:.3f} ({result['train_seconds']:.0f}s train, "
              f"{(time.perf_counter() - start) / 60:.1f} min so far)", flush=True)
    return done


if __name__ == "__main__":
    common.run_main(main)
