"""Cost curves of our full-size Align-DETR (R-50, DINO-4scale): inference time and peak memory against image size
and batch size, and training-step time against objects per image with the matching time reported separately.
Writes the `cost_curves` section of BENCHMARKS.md.

    python benchmarks/bench_cost_curves.py                       # CPU defaults (about 10 minutes on 2 cores)
    python benchmarks/bench_cost_curves.py --devices cuda --repeats 10

Every case runs in a fresh worker process (peak RSS is per process).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

SIZES = [(384, 512), (512, 640), (640, 853), (800, 1333)]
BATCHES = [1, 2, 4]
OBJECTS = [1, 10, 100, 500]


def make_labels(batch: int, num_objects: int, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for _ in range(batch):
        centres = torch.rand(num_objects, 2, generator=generator) * 0.8 + 0.1
        sizes = torch.rand(num_objects, 2, generator=generator) * 0.15 + 0.02
        labels.append({
            "class_labels": torch.randint(0, common.NUM_LABELS, (num_objects,), generator=generator).to(device),
            "boxes": torch.cat([centres, sizes], -1).to(device),
        })
    return labels


def run_case(case) -> dict:
    torch.manual_seed(0)
    device = case["device"]
    model = common.build_model("ours").to(device)
    pixels, mask, _ = common.make_batch(case["batch"], case["height"], case["width"], device)
    if case["kind"] == "infer":
        model.eval()

        def step():
            with torch.inference_mode():
                model(pixels, pixel_mask=mask)

        with common.PeakMemory(device) as memory:
            times = common.time_it(step, device, case["warmup"], case["repeats"])
        return {**common.summary(times), "peak_bytes": memory.peak_bytes}

    labels = make_labels(case["batch"], case["objects"], device)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_function = model.loss_function
    match_times = []
    matcher = loss_function.matcher

    def timed_match(*args, **kwargs):  # the matching inside the real loss call: costs, host copy, solver
        common.synchronize(device)
        start = time.perf_counter()
        result = matcher(*args, **kwargs)
        common.synchronize(device)
        match_times.append(time.perf_counter() - start)
        return result

    loss_function.matcher = timed_match
    model.loss_function = loss_function

    def step():
        out = model(pixels, pixel_mask=mask, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = common.time_it(step, device, case["warmup"], case["repeats"])
    timed_matches = match_times[case["warmup"]:]
    return {**common.summary(times), "match_median_s": sorted(timed_matches)[len(timed_matches) // 2]}


def run_worker(case, timeout):
    env = {**os.environ, "PYTHONPATH": str(common.REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--devices", nargs="+", default=["cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--train_size", type=int, nargs=2, default=[320, 320])
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--output", default=str(common.REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.worker:
        case = json.loads(args.worker)
        print("RESULT " + json.dumps(run_case(case)), flush=True)
        return

    started = time.perf_counter()
    rows = {"size": [], "batch": [], "objects": []}
    for device in args.devices:
        base = {"device": device, "warmup": args.warmup, "repeats": args.repeats}
        for height, width in SIZES:
            result = run_worker({**base, "kind": "infer", "batch": 1, "height": height, "width": width}, args.timeout)
            rows["size"].append((device, f"{height}x{width}", result))
            print("size", device, height, width, result.get("median_s", result), flush=True)
        for batch in BATCHES:
            result = run_worker({**base, "kind": "infer", "batch": batch, "height": 512, "width": 640}, args.timeout)
            rows["batch"].append((device, batch, result))
            print("batch", device, batch, result.get("median_s", result), flush=True)
        height, width = args.train_size
        for objects in OBJECTS:
            case = {**base, "kind": "train", "batch": args.train_batch, "height": height, "width": width,
                    "objects": objects}
            result = run_worker(case, args.timeout)
            rows["objects"].append((device, objects, result))
            print("objects", device, objects, result.get("median_s", result), flush=True)
    common.write_section("cost_curves", render(args, rows, time.perf_counter() - started), args.output)
    print(f"wrote {args.output}")


def _ms(result, key="median_s"):
    return f"{result[key] * 1e3:,.1f}" if key in result else "error"


def render(args, rows, total) -> str:
    info = common.machine_info()
    lines = [
        "## Cost curves (ours, full-size R-50 Align-DETR, random weights)",
        "",
        f"Written by `benchmarks/bench_cost_curves.py`: `{common.command_line()}`, {total:.0f} s in all, "
        f"torch {info['torch']}, {info['cpu_cores']} cores ({info['cpu']}), gpu: {info['gpu']}, commit "
        f"{info['git_commit']}. Medians of {args.repeats} timed repetitions after {args.warmup} warm-up, each case "
        "in a fresh process; peak memory as in the main table (CPU: RSS above the level before warm-up).",
        "",
        "### Inference against image size (batch 1)",
        "",
        "| device | size | ms | images/s | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for device, size, result in rows["size"]:
        ips = f"{1 / result['median_s']:.2f}" if "median_s" in result else "error"
        lines.append(f"| {device} | {size} | {_ms(result)} | {ips} | {result.get('peak_bytes', 0) / 2**20:,.0f} |")
    lines += ["", "### Inference against batch size (512x640)", "",
              "| device | batch | ms | ms per image | peak MiB |", "|---|---|---|---|---|"]
    for device, batch, result in rows["batch"]:
        per_image = f"{result['median_s'] * 1e3 / batch:,.1f}" if "median_s" in result else "error"
        lines.append(f"| {device} | {batch} | {_ms(result)} | {per_image} | "
                     f"{result.get('peak_bytes', 0) / 2**20:,.0f} |")
    height, width = args.train_size
    lines += ["", f"### Training step against objects per image (batch {args.train_batch}, {height}x{width})", "",
              "Step = forward with labels (100 denoising queries, one-to-k matching on 6 decoder layers + encoder) + "
              "loss + backward + AdamW. Matching = cost matrices, the one host copy and the Hungarian solver, timed "
              "inside the real loss call.", "",
              "| device | objects per image | step ms | matching ms | matching share |", "|---|---|---|---|---|"]
    for device, objects, result in rows["objects"]:
        share = (f"{result['match_median_s'] / result['median_s']:.0%}" if "match_median_s" in result else "error")
        lines.append(f"| {device} | {objects} | {_ms(result)} | {_ms(result, 'match_median_s')} | {share} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
