"""Where exported files spend their time: ONNX Runtime's and OpenVINO's own profilers, per operator type.

    python benchmarks/profile_export.py --folder /tmp/align_detr_bench/r50 --size 512x640 --threads 2

Profiles the files `bench_export.py` (or `align-detr export --int8 --openvino`) wrote in FOLDER: model.onnx and
model.int8.onnx on ONNX Runtime's CPU provider, model.xml and model.int8.xml on OpenVINO's CPU plugin (f32 inference
precision, as `ExportedDetector` runs them). One warm-up run, then the second run's operator times: the share of each
operator type. ONNX Runtime writes its profile as a file; it goes into a temporary folder that is removed afterwards
(never the current directory).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

TOP = 8


def _feeds(height: int, width: int, batch: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.standard_normal((batch, 3, height, width), dtype=np.float32),
            "pixel_mask": np.ones((batch, height, width), np.int64)}


def onnxruntime_profile(path, feeds: dict, threads: int = 2) -> dict[str, float]:
    """Operator type -> microseconds of the second run on ONNX Runtime (the profile file lives in a temporary
    folder)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="align_detr_ort_profile_") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "onnxruntime_profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(2):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    start = [event["ts"] for event in events if event.get("name") == "model_run"][-1]
    totals = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["ts"] >= start and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    return dict(totals)


def openvino_profile(path, feeds: dict, threads: int = 2) -> dict[str, float]:
    """Operator type -> microseconds of the second run on OpenVINO's CPU plugin."""
    import openvino

    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                 "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    for _ in range(2):
        request.infer(feeds)
    totals = collections.Counter()
    for info in request.get_profiling_info():
        totals[info.node_type] += info.real_time.total_seconds() * 1e6
    return dict(totals)


def shares(totals: dict[str, float], top: int = TOP) -> str:
    total = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return f"{total / 1e3:,.0f} ms of operators: " + ", ".join(f"{name} {value / total:.0%}" for name, value in ranked)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, help="folder holding model.onnx, model.int8.onnx, model.xml, ...")
    parser.add_argument("--size", default="512x640", help="HxW input size (default 512x640)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    args = parser.parse_args(argv)
    height, width = (int(side) for side in args.size.split("x"))
    feeds = _feeds(height, width, args.batch)
    folder = Path(args.folder)
    for name, profile in (("model.onnx", onnxruntime_profile), ("model.int8.onnx", onnxruntime_profile),
                          ("model.xml", openvino_profile), ("model.int8.xml", openvino_profile)):
        if (folder / name).is_file():
            runtime = "ONNX Runtime" if name.endswith(".onnx") else "OpenVINO"
            print(f"{runtime} {name} {args.size} b{args.batch}: {shares(profile(folder / name, feeds, args.threads))}",
                  flush=True)


if __name__ == "__main__":
    main()
