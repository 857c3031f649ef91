"""Deployment speed: our model exported to ONNX and run by ONNX Runtime (CPU), our PyTorch eager model, and
transformers' DeformableDetrForObjectDetection (eager), side by side; writes BENCHMARKS.md's `export` section.

    python benchmarks/bench_export.py                       # 512x640 and 800x1333, batch 1 and 8
    python benchmarks/bench_export.py --sizes 256x320 --batches 1 --rounds 1 --output /tmp/B.md   # a quick check

Models: full-size R-50 (benchmarks/common.py `build_model`), random weights (seed 0, the same weights for the ONNX
file and our eager model), no downloads. Each measurement runs in a fresh worker process: one warm-up forward at
256x320 (kernels, ONNX Runtime's session and arena), then `repeats` timed forwards at the measured size. Cases and
rounds rotate the order of the three runtimes, so slow phases of a shared machine hit all of them; the latency is the
median of every timed forward over all rounds. Peak memory: resident set size (psutil RSS) polled every
millisecond during the timed forwards, above the level after loading and warm-up, maximum over rounds.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, PeakMemory, build_model, command_line, machine_info, model_description, write_section  # noqa: E402

import torch  # noqa: E402

RUNTIMES = ("onnxruntime", "ours", "theirs")
LABELS = {
    "onnxruntime": "Align-DETR, ONNX Runtime CPU (exported)",
    "ours": "Align-DETR, PyTorch eager",
    "theirs": "transformers Deformable DETR, PyTorch eager",
}
WARMUP_SIZE = (256, 320)


def _inputs(batch, height, width):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, height, width, generator=generator), torch.ones(batch, height, width, dtype=torch.long)


def _forward_fn(case):
    """A function running one forward of the case's runtime on (pixel_values, pixel_mask)."""
    if case["runtime"] == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = case["threads"]
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(case["onnx"], options, providers=["CPUExecutionProvider"])
        return lambda pixels, mask: session.run(None, {"pixel_values": pixels.numpy(), "pixel_mask": mask.numpy()})
    torch.manual_seed(0)
    model = build_model(case["runtime"]).eval()

    def forward(pixels, mask):
        with torch.inference_mode():
            return model(pixel_values=pixels, pixel_mask=mask)

    return forward


def worker(case):
    torch.set_num_threads(case["threads"])
    forward = _forward_fn(case)
    forward(*_inputs(1, *WARMUP_SIZE))
    pixels, mask = _inputs(case["batch"], case["height"], case["width"])
    times = []
    with PeakMemory("cpu", process_peak=False) as memory:  # RSS above the level after warm-up
        for _ in range(case["repeats"]):
            start = time.perf_counter()
            forward(pixels, mask)
            times.append(time.perf_counter() - start)
    print("RESULT " + json.dumps({"times_s": times, "peak_bytes": memory.peak_bytes}), flush=True)


def run_worker(case, timeout):
    paths = [str(REPO / "src"), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True, env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def export_model(path: Path) -> float:
    from align_detr_hf.export_align_detr import export_onnx

    torch.manual_seed(0)
    model = build_model("ours").eval()
    start = time.perf_counter()
    export_onnx(model, path)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=["512x640", "800x1333"], help="HxW input sizes")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per case (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per worker (default 2)")
    parser.add_argument(
        "--large-repeats", type=int, default=1,
        help="timed forwards per worker when batch x pixels >= 8 x 512 x 640 (default 1: minutes each on 2 cores)",
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime (default 2)")
    parser.add_argument("--onnx", default="/tmp/align_detr_bench/align_detr_r50.onnx", help="where the export goes")
    parser.add_argument("--reuse-onnx", action="store_true", help="skip the export when --onnx exists")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per worker")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--readme", default=str(REPO / "README.md"), help="gets the short table ('' = not)")
    parser.add_argument(
        "--render-from-log", metavar="LOG",
        help="do not measure: write the tables from the per-worker lines of a stopped run's output",
    )
    parser.add_argument("--started", default="unknown", help="with --render-from-log: when that run started")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.render_from_log:
        return render_from_log(args)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    print(f"started {started}, load {_load(load_before)}", flush=True)
    onnx_path = Path(args.onnx)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    export_s = None
    if not (args.reuse_onnx and onnx_path.exists()):
        export_s = export_model(onnx_path)
        print(f"exported {onnx_path} in {export_s:.0f} s", flush=True)

    # cheapest first, so that a run stopped early has written the cases it finished
    cases = sorted(((size, batch) for size in args.sizes for batch in args.batches), key=_cost)
    results = {(size, batch, runtime): {"times_s": [], "peaks": [], "errors": []} for size, batch in cases
               for runtime in RUNTIMES}
    for round_index in range(args.rounds):
        for case_index, (size, batch) in enumerate(cases):
            height, width = (int(v) for v in size.split("x"))
            large = batch * height * width >= 8 * 512 * 640
            shift = (round_index + case_index) % len(RUNTIMES)
            for runtime in RUNTIMES[shift:] + RUNTIMES[:shift]:  # alternate who goes first
                case = {
                    "runtime": runtime, "batch": batch, "height": height, "width": width, "threads": args.threads,
                    "repeats": args.large_repeats if large else args.repeats, "onnx": str(onnx_path),
                }
                result = run_worker(case, args.timeout)
                entry = results[(size, batch, runtime)]
                if "error" in result:
                    entry["errors"].append(result["error"])
                    print(f"round {round_index} {size} b{batch} {runtime}: ERROR {result['error'][-300:]}", flush=True)
                    continue
                entry["times_s"] += result["times_s"]
                entry["peaks"].append(result["peak_bytes"])
                print(f"round {round_index} {size} b{batch} {runtime}: "
                      f"{[round(t * 1e3) for t in result['times_s']]} ms, peak {result['peak_bytes'] / 2**20:.0f} MiB",
                      flush=True)
            # rewrite the tables after every case: what is written is always what has been measured so far
            done = len(cases) * round_index + cases.index((size, batch)) + 1
            progress = "" if done == len(cases) * args.rounds else (
                f"Partial: {done} of {len(cases) * args.rounds} case-rounds measured so far (the run continues)."
            )
            text = render(args, cases, results, export_s, started, load_before, progress)
            write_section("export", text, args.output)
            if args.readme:
                write_section("export", render_summary(cases, results, started, progress), args.readme)
    print(text)


_LOG_LINE = re.compile(r"^round (\d+) (\d+x\d+) b(\d+) (\w+): \[([\d, ]*)\] ms, peak (\d+) MiB$")


def render_from_log(args):
    """Tables of a run stopped before its end, from the lines it printed (ms and MiB as printed)."""
    cases = sorted(((size, batch) for size in args.sizes for batch in args.batches), key=_cost)
    results = {(size, batch, runtime): {"times_s": [], "peaks": [], "errors": []} for size, batch in cases
               for runtime in RUNTIMES}
    done, started, load_before = set(), args.started, None
    for line in Path(args.render_from_log).read_text().splitlines():
        if line.startswith("started ") and ", load " in line:
            started, load = line[len("started "):].split(", load ")
            load_before = tuple(float(v) for v in load.split("/"))
        match = _LOG_LINE.match(line.strip())
        if match and (match[2], int(match[3]), match[4]) in results:
            entry = results[(match[2], int(match[3]), match[4])]
            entry["times_s"] += [int(v) / 1e3 for v in match[5].split(",") if v.strip()]
            entry["peaks"].append(int(match[6]) * 2**20)
            done.add((match[1], match[2], match[3], match[4]))
    total = len(cases) * args.rounds * len(RUNTIMES)
    progress = "Written from the run's printed lines (ms, whole MiB)" + (
        "." if len(done) == total else
        f"; it stopped before the end: {len(done)} of {total} measurements (case x round x runtime) were made, the "
        "others are marked not measured."
    )
    text = render(args, cases, results, None, started, load_before, progress)
    write_section("export", text, args.output)
    if args.readme:
        write_section("export", render_summary(cases, results, started, progress), args.readme)
    print(text)


def _cost(case):
    size, batch = case
    height, width = (int(v) for v in size.split("x"))
    return batch * height * width


def _cell(entry):
    if not entry["times_s"]:
        return None
    return statistics.median(entry["times_s"]), min(entry["times_s"]), len(entry["times_s"]), max(entry["peaks"])


def render(args, cases, results, export_s, started, load_before, progress=""):
    info = machine_info()
    load_after = os.getloadavg()
    lines = [
        "## Deployment: ONNX Runtime vs PyTorch eager (CPU)",
        "",
        *([progress, ""] if progress else []),
        f"Written by `{command_line()}`, started {started}. {info['cpu']}, {info['cpu_cores']} cores, "
        f"{args.threads} intra-op threads for every runtime; torch {info['torch']}, transformers "
        f"{info['transformers']}, onnxruntime {_version('onnxruntime')}, commit {info['git_commit']}. "
        f"Load average (1/5/15 min) at start {_load(load_before)}, at this write {_load(load_after)}: "
        "the machine is shared, so absolute times carry that load; the ratios compare runtimes measured "
        "alternately in the same period.",
        "",
        f"Models: {model_description()} The ONNX file is our model exported by `align-detr export` "
        f"(opset 18, float32, dynamic batch/height/width, no post-processing)"
        + (f", exported in {export_s:.0f} s." if export_s is not None else ", reused from an earlier export.")
        + " Inputs: random pixels, no padding.",
        "",
        "Latency: median of every timed forward over all rounds (each a fresh process per runtime, runtimes in "
        "rotating order, one warm-up forward at 256x320 first), min in brackets, n = timed forwards. "
        "Peak memory: psutil RSS polled every 1 ms during the timed forwards, above the level after loading and "
        "warm-up (max over rounds).",
        "",
        "| input | batch | runtime | latency ms (min) | n | peak RSS MiB | time vs Deformable DETR |",
        "|---|---|---|---|---|---|---|",
    ]
    goal_ratios = []
    for size, batch in cases:
        theirs = _cell(results[(size, batch, "theirs")])
        for runtime in RUNTIMES:
            entry = results[(size, batch, runtime)]
            cell = _cell(entry)
            if cell is None:
                if entry["errors"]:
                    status = "error: " + entry["errors"][-1].strip().splitlines()[-1][:120]
                else:
                    status = "not measured"
                lines.append(f"| {size} | {batch} | {LABELS[runtime]} | {status} | 0 | | |")
                continue
            median, fastest, count, peak = cell
            vs = f"{median / theirs[0]:.2f}x" if theirs else "n/a"
            if runtime == "onnxruntime" and theirs:
                goal_ratios.append((size, batch, median / theirs[0]))
            lines.append(
                f"| {size} | {batch} | {LABELS[runtime]} | {median * 1e3:,.0f} ({fastest * 1e3:,.0f}) | {count} | "
                f"{peak / 2**20:,.0f} | {vs} |"
            )
    lines += ["", "Goal: ONNX Runtime at most 0.50x the time of transformers' Deformable DETR."]
    for size, batch, value in goal_ratios:
        lines.append(f"- {size}, batch {batch}: {value:.2f}x ({'met' if value <= 0.5 else 'not met'})")
    lines += ["", "GPU (ONNX Runtime CUDA provider, --fp16): pending, no GPU was available to this run."]
    return "\n".join(lines)


def render_summary(cases, results, started, progress=""):
    """The README's short table: median latencies and the ratio the goal is about."""
    lines = [
        *([progress, ""] if progress else []),
        f"CPU, 2 threads, full-size R-50, random weights, measured {started} on a shared machine:",
        "",
        "| input | batch | ONNX Runtime ms | ours eager ms | Deformable DETR eager ms "
        "| ONNX Runtime / Deformable DETR |",
        "|---|---|---|---|---|---|",
    ]
    for size, batch in cases:
        cells = [_cell(results[(size, batch, runtime)]) for runtime in RUNTIMES]
        times = [
            f"{cell[0] * 1e3:,.0f}" if cell else ("error" if entry["errors"] else "not measured")
            for cell, entry in zip(cells, (results[(size, batch, runtime)] for runtime in RUNTIMES))
        ]
        ratio = f"{cells[0][0] / cells[2][0]:.2f}x" if cells[0] and cells[2] else "n/a"
        lines.append(f"| {size} | {batch} | {' | '.join(times)} | {ratio} |")
    lines += ["", "Goal: at most 0.50x. GPU figures (--fp16, ONNX Runtime CUDA provider): pending."]
    return "\n".join(lines)


def _load(values):
    return "not recorded" if values is None else "/".join(f"{v:.1f}" for v in values)


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
