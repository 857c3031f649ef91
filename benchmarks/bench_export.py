"""Deployment speed and memory on CPU: our model in PyTorch eager, exported and run by ONNX Runtime (float32, int8) and
OpenVINO (float32, int8), against transformers' DeformableDetrForObjectDetection in PyTorch eager; writes
BENCHMARKS.md's `export` section (and the README's short table).

    python benchmarks/bench_export.py                       # 512x640 and 800x1333, batch 1 and 8, every runtime
    python benchmarks/bench_export.py --model tiny --sizes 128x160 --batches 1 --rounds 1 --output /tmp/B.md \
        --readme ''                                         # a check of the script itself, in minutes

Models: full-size R-50 (benchmarks/common.py `build_model`), random weights (seed 0, the same weights for the
exported files and our eager model), no downloads; `--model tiny` swaps in small models of the same two classes
(for testing the script; its figures say nothing). The files are written by `export_pipeline.export_targets`, what
`align-detr export --int8 --openvino` runs: model.onnx (transformers' OnnxExporter), model.int8.onnx (static int8,
calibrated on 4 synthetic images: random weights make accuracy moot here, speed is what is measured), model.xml
(transformers' OpenVINOExporter) and model.int8.xml. Runtimes run through `ExportedDetector` (with eager's input
checks, as eager does them), OpenVINO at f32 inference precision.

Each measurement runs in a fresh worker process: one warm-up forward at 256x320 (kernels, sessions, arenas), then
`repeats` timed forwards at the measured size. Cases and rounds rotate the order of the runtimes, so slow phases of a
shared machine hit all of them; the latency is the median of every timed forward over all rounds. Peak memory:
resident set size (psutil RSS) polled every millisecond during the timed forwards, above the level after loading
and warm-up, maximum over rounds.
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

RUNTIMES = ("onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8", "ours", "theirs")
EXPORTED = RUNTIMES[:4]
LABELS = {
    "onnxruntime": "Align-DETR, ONNX Runtime fp32",
    "onnxruntime-int8": "Align-DETR, ONNX Runtime int8",
    "openvino": "Align-DETR, OpenVINO fp32",
    "openvino-int8": "Align-DETR, OpenVINO int8",
    "ours": "Align-DETR, PyTorch eager",
    "theirs": "transformers Deformable DETR, PyTorch eager",
}
WARMUP_SIZE = (256, 320)
TINY_WARMUP_SIZE = (96, 128)


def _inputs(batch, height, width):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, height, width, generator=generator), torch.ones(batch, height, width, dtype=torch.long)


def build(name: str, size: str):
    """'ours' or 'theirs', full size (common.build_model) or tiny (for testing this script)."""
    if size == "r50":
        return build_model(name)
    if name == "ours":
        from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection

        return AlignDetrForObjectDetection(AlignDetrConfig(backbone_config=TINY_BACKBONE, d_model=64, encoder_layers=1,
                                                           decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                           num_queries=30, num_labels=4))  # fmt: skip
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(backbone_config=TINY_BACKBONE, d_model=64, encoder_layers=1, decoder_layers=1,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=30, two_stage=True,
                                  two_stage_num_proposals=30, with_box_refine=True, num_labels=4,
                                  disable_custom_kernels=True)  # fmt: skip
    return DeformableDetrForObjectDetection(config)


TINY_BACKBONE = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1],
                 "layer_type": "basic", "out_features": ["stage2", "stage3", "stage4"]}  # fmt: skip


def _forward_fn(case):
    """A function running one forward of the case's runtime on (pixel_values, pixel_mask)."""
    if case["runtime"] in EXPORTED:
        from align_detr_hf.export_runtime import ExportedDetector

        runtime = "openvino" if case["runtime"].startswith("openvino") else "onnxruntime"
        detector = ExportedDetector(case["files"][case["runtime"]], runtime=runtime, threads=case["threads"])
        return lambda pixels, mask: detector(pixels, mask)
    torch.manual_seed(0)
    model = build(case["runtime"], case["model"]).eval()

    def forward(pixels, mask):
        with torch.inference_mode():
            return model(pixel_values=pixels, pixel_mask=mask)

    return forward


def worker(case):
    torch.set_num_threads(case["threads"])
    forward = _forward_fn(case)
    forward(*_inputs(1, *(WARMUP_SIZE if case["model"] == "r50" else TINY_WARMUP_SIZE)))
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


def export_models(folder: Path, model_size: str, runtimes) -> tuple[dict, float]:
    """The exported files of our model (seed 0), as `align-detr export --int8 --openvino` writes them."""
    from align_detr_hf import AlignDetrImageProcessor
    from align_detr_hf.export_pipeline import export_targets

    torch.manual_seed(0)
    model = build("ours", model_size).eval()
    processor = AlignDetrImageProcessor(size={"shortest_edge": 256, "longest_edge": 320})  # small calibration images
    start = time.perf_counter()
    files, _ = export_targets(
        model, processor, folder / "model.onnx", int8=any("int8" in r for r in runtimes),
        openvino=any(r.startswith("openvino") for r in runtimes), calibrate="synthetic:4", calibration_images=4,
        log=lambda line: print(line, flush=True),
    )
    return {name: str(path) for name, path in files.items()}, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["r50", "tiny"], default="r50", help="tiny: test this script (default r50)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--sizes", nargs="+", default=["512x640", "800x1333"], help="HxW input sizes")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per case (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per worker (default 2)")
    parser.add_argument(
        "--large-repeats", type=int, default=1,
        help="timed forwards per worker when batch x pixels >= 8 x 512 x 640 (default 1: minutes each on 2 cores)",
    )
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime (default 2)")
    parser.add_argument("--folder", default="/tmp/align_detr_bench", help="where the exported files go")
    parser.add_argument("--reuse", action="store_true", help="skip the export when the folder holds every file")
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
    runtimes = [r for r in RUNTIMES if r in args.runtimes]  # fixed order: rotation and tables
    if args.render_from_log:
        return render_from_log(args, runtimes)

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    print(f"started {started}, load {_load(load_before)}", flush=True)
    folder = Path(args.folder) / args.model
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "files.json"
    export_s, files = None, {}
    if args.reuse and manifest.exists():
        files = json.loads(manifest.read_text())
    if not all(r in files for r in runtimes if r in EXPORTED):
        files, export_s = export_models(folder, args.model, runtimes)
        manifest.write_text(json.dumps(files))
        print(f"exported {sorted(files)} in {export_s:.0f} s", flush=True)

    # cheapest first, so that a run stopped early has written the cases it finished
    cases = sorted(((size, batch) for size in args.sizes for batch in args.batches), key=_cost)
    results = {(size, batch, runtime): {"times_s": [], "peaks": [], "errors": []} for size, batch in cases
               for runtime in runtimes}
    text = ""
    for round_index in range(args.rounds):
        for case_index, (size, batch) in enumerate(cases):
            height, width = (int(v) for v in size.split("x"))
            large = batch * height * width >= 8 * 512 * 640
            shift = (round_index + case_index) % len(runtimes)
            for runtime in runtimes[shift:] + runtimes[:shift]:  # alternate who goes first
                case = {
                    "runtime": runtime, "batch": batch, "height": height, "width": width, "threads": args.threads,
                    "repeats": args.large_repeats if large else args.repeats, "files": files, "model": args.model,
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
            text = render(args, runtimes, cases, results, export_s, started, load_before, progress)
            write_section("export", text, args.output)
            if args.readme:
                write_section("export", render_summary(runtimes, cases, results, started, progress), args.readme)
    print(text)


_LOG_LINE = re.compile(r"^round (\d+) (\d+x\d+) b(\d+) ([\w-]+): \[([\d, ]*)\] ms, peak (-?\d+) MiB$")


def render_from_log(args, runtimes):
    """Tables of a run stopped before its end, from the lines it printed (ms and MiB as printed)."""
    cases = sorted(((size, batch) for size in args.sizes for batch in args.batches), key=_cost)
    results = {(size, batch, runtime): {"times_s": [], "peaks": [], "errors": []} for size, batch in cases
               for runtime in runtimes}
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
    total = len(cases) * args.rounds * len(runtimes)
    progress = "Written from the run's printed lines (ms, whole MiB)" + (
        "." if len(done) == total else
        f"; it stopped before the end: {len(done)} of {total} measurements (case x round x runtime) were made, the "
        "others are marked not measured."
    )
    text = render(args, runtimes, cases, results, None, started, load_before, progress)
    write_section("export", text, args.output)
    if args.readme:
        write_section("export", render_summary(runtimes, cases, results, started, progress), args.readme)
    print(text)


def _cost(case):
    size, batch = case
    height, width = (int(v) for v in size.split("x"))
    return batch * height * width


def _cell(entry):
    if not entry["times_s"]:
        return None
    return statistics.median(entry["times_s"]), min(entry["times_s"]), len(entry["times_s"]), max(entry["peaks"])


def render(args, runtimes, cases, results, export_s, started, load_before, progress=""):
    info = machine_info()
    load_after = os.getloadavg()
    model = model_description() if args.model == "r50" else (
        "TINY models (--model tiny: d_model 64, 1+1 layers, a small ResNet), for testing this script: these figures "
        "say nothing about the real models."
    )
    lines = [
        "## Deployment: exported runtimes vs PyTorch eager (CPU)",
        "",
        *([progress, ""] if progress else []),
        f"Written by `{command_line()}`, started {started}. {info['cpu']}, {info['cpu_cores']} cores, "
        f"{args.threads} intra-op threads for every runtime; torch {info['torch']}, transformers "
        f"{info['transformers']}, onnxruntime {_version('onnxruntime')}, openvino {_version('openvino')}, commit "
        f"{info['git_commit']}. Load average (1/5/15 min) at start {_load(load_before)}, at this write "
        f"{_load(load_after)}: the machine is shared, so absolute times carry that load; the ratios compare runtimes "
        "measured alternately in the same period.",
        "",
        f"Models: {model} The exported files are our model as `align-detr export --int8 --openvino` writes them "
        "(opset 18, dynamic batch/height/width, no post-processing; int8: static QDQ, calibrated on 4 synthetic "
        "images, the deformable sampling, its offsets and weights, the heads and the norms in float)"
        + (f", exported in {export_s:.0f} s." if export_s is not None else ", reused from an earlier export.")
        + " Inputs: random pixels, no padding.",
        "",
        "Latency: median of every timed forward over all rounds (each a fresh process per runtime, runtimes in "
        "rotating order, one warm-up forward first), min in brackets, n = timed forwards. Peak memory: psutil RSS "
        "polled every 1 ms during the timed forwards, above the level after loading and warm-up (max over rounds).",
        "",
        "| input | batch | runtime | latency ms (min) | n | peak RSS MiB | time vs Deformable DETR |",
        "|---|---|---|---|---|---|---|",
    ]
    goal = {runtime: [] for runtime in runtimes if runtime in EXPORTED}
    for size, batch in cases:
        theirs = _cell(results[(size, batch, "theirs")]) if "theirs" in runtimes else None
        for runtime in runtimes:
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
            if runtime in goal and theirs:
                goal[runtime].append((size, batch, median / theirs[0]))
            lines.append(
                f"| {size} | {batch} | {LABELS[runtime]} | {median * 1e3:,.0f} ({fastest * 1e3:,.0f}) | {count} | "
                f"{peak / 2**20:,.0f} | {vs} |"
            )
    lines += ["", "Goal: an exported CPU runtime at most 0.50x the time of transformers' Deformable DETR eager."]
    for runtime, ratios in goal.items():
        if ratios:
            met = [f"{size} b{batch}: {value:.2f}x" + (" met" if value <= 0.5 else "") for size, batch, value in ratios]
            lines.append(f"- {LABELS[runtime]}: {'; '.join(met)}")
    lines += ["", "GPU (ONNX Runtime CUDA provider, --fp16; TensorRT): pending, no GPU was available to this run."]
    return "\n".join(lines)


def render_summary(runtimes, cases, results, started, progress=""):
    """The README's short table: median latencies, as ratios of Deformable DETR eager's."""
    shown = [runtime for runtime in runtimes if runtime != "theirs"]
    lines = [
        *([progress, ""] if progress else []),
        f"CPU, 2 threads, full-size R-50, random weights, measured {started} on a shared machine; time as a ratio of "
        "transformers' Deformable DETR eager (ms in brackets):",
        "",
        "| input | batch | " + " | ".join(LABELS[r].replace("Align-DETR, ", "") for r in shown)
        + " | Deformable DETR eager ms |",
        "|---|---|" + "---|" * (len(shown) + 1),
    ]
    for size, batch in cases:
        theirs = _cell(results[(size, batch, "theirs")]) if "theirs" in runtimes else None
        cells = []
        for runtime in shown:
            cell = _cell(results[(size, batch, runtime)])
            if cell is None:
                cells.append("error" if results[(size, batch, runtime)]["errors"] else "not measured")
            else:
                ratio = f"{cell[0] / theirs[0]:.2f}x " if theirs else ""
                cells.append(f"{ratio}({cell[0] * 1e3:,.0f})")
        reference = f"{theirs[0] * 1e3:,.0f}" if theirs else "not measured"
        lines.append(f"| {size} | {batch} | {' | '.join(cells)} | {reference} |")
    lines += ["", "Goal: at most 0.50x. GPU figures (--fp16, ONNX Runtime CUDA provider, TensorRT): pending."]
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
