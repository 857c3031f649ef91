"""Align-DETR (ours) versus transformers' Deformable DETR (theirs): inference, training step, deformable-attention
op, peak memory and host synchronisations; writes BENCHMARKS.md.

    python benchmarks/bench.py                          # CPU (and CUDA fp32/bf16 when present), 512x512
    python benchmarks/bench.py --size 800 1333 --batch 1 8 --repeats 10 --devices cuda

Every measurement runs in a fresh worker process (`--worker`), so peak-RSS figures on CPU are not polluted by
earlier cases and the two models never share allocator state. Ratios are ours / theirs (below 1: ours faster or
smaller).
"""

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------------
# Worker: one measurement per process
# ---------------------------------------------------------------------------------------------------------------


def _autocast(device, dtype_name):
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype_name])


def run_model_case(case):
    torch.manual_seed(0)
    device, height, width = case["device"], case["height"], case["width"]
    model = common.build_model(case["model"]).to(device)
    pixels, mask, labels = common.make_batch(case["batch"], height, width, device)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if case["kind"] == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), _autocast(device, case["dtype"]):
                model(pixels, pixel_mask=mask)

    else:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            with _autocast(device, case["dtype"]):
                out = model(pixels, pixel_mask=mask, labels=labels)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with common.PeakMemory(device) as memory:
        times = common.time_it(step, device, case["warmup"], case["repeats"])
    result = {**common.summary(times), "peak_bytes": memory.peak_bytes, "params": params}
    if case["kind"] == "train" and case["model"].startswith("ours"):
        result["syncs"] = count_loss_syncs(model, pixels, mask, labels, device)
    return result


# names of calls that force a device -> host copy (or a wait for the device) when their input is on an accelerator
SYNC_CALLS = {
    "item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
    "masked_select", "unique", "unique_consecutive", "repeat_interleave", "equal", "allclose",
}


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts calls that synchronise with the device (see SYNC_CALLS), by name. On CPU nothing synchronises, so
    this counts the *places* that would on CUDA; torch.cuda.set_sync_debug_mode counts the real ones there."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        is_host_copy = name == "to" and source is not None and source.device.type != "cpu" and any(
            (isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu")
            for a in list(args[1:]) + [kwargs.get("device")]
            if a is not None and not isinstance(a, torch.dtype)
        )
        if name in SYNC_CALLS or is_host_copy:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **kwargs)


def count_loss_syncs(model, pixels, mask, labels, device):
    """Host synchronisations inside the loss (matching included) of one training step."""
    counts = {}
    loss_function = model.loss_function

    def counted_loss(*args, **kwargs):
        if torch.device(device).type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = loss_function(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts["cuda_sync_debug_warnings"] = sum("synchroniz" in str(w.message).lower() for w in caught)
        with SyncCounter() as counter:
            out = loss_function(*args, **kwargs)
        counts["sync_like_calls"] = counter.calls
        return out

    model.loss_function = counted_loss  # the model's own loss, counted
    try:
        model(pixels, pixel_mask=mask, labels=labels)
    finally:
        model.loss_function = None
    return counts


def level_shapes(height, width, levels=4):
    shapes = []
    for level in range(levels):
        stride = 8 * 2**level
        shapes.append((math.ceil(height / stride), math.ceil(width / stride)))
    return shapes


def run_op_case(case):
    from align_detr_hf.ms_deform_attn import multi_scale_deformable_attention_pytorch

    torch.manual_seed(0)
    device, dtype = case["device"], DTYPES[case["dtype"]]
    shapes = level_shapes(case["height"], case["width"])
    num_values = sum(h * w for h, w in shapes)
    batch, heads, head_dim, points, queries = case["batch"], 8, 32, 4, case["queries"] or num_values
    value = torch.randn(batch, num_values, heads, head_dim, device=device, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, device=device)
    weights = torch.rand(batch, queries, heads, len(shapes), points, device=device).softmax(-1).to(dtype)
    if case["impl"] == "ours-pytorch":
        locations = locations.to(dtype)  # grid_sample wants one dtype

        def op(v, loc, w):
            return multi_scale_deformable_attention_pytorch(v, shapes, loc, w)

    elif case["impl"] == "ours-gather":
        from align_detr_hf.ms_deform_attn_gather import multi_scale_deformable_attention_gather

        def op(v, loc, w):
            return multi_scale_deformable_attention_gather(v, shapes, loc, w)

    elif case["impl"] == "ours-triton":
        from align_detr_hf.ms_deform_attn_triton import multi_scale_deformable_attention_triton

        def op(v, loc, w):
            return multi_scale_deformable_attention_triton(v, shapes, loc, w)

    else:  # transformers' pure-PyTorch op
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

        module = MultiScaleDeformableAttention()
        shapes_tensor = torch.tensor(shapes, device=device)
        starts = torch.cat([shapes_tensor.new_zeros(1), shapes_tensor.prod(1).cumsum(0)[:-1]])
        locations = locations.to(dtype)

        def op(v, loc, w):
            return module(v, shapes_tensor, shapes, starts, loc, w, 64)

    if case["direction"] == "backward":
        value.requires_grad_()
        locations.requires_grad_()
        weights.requires_grad_()
        grad = torch.randn(batch, queries, heads * head_dim, device=device, dtype=dtype)

        def step():
            out = op(value, locations, weights)
            torch.autograd.grad(out, (value, locations, weights), grad)

    else:

        def step():
            with torch.no_grad():
                op(value, locations, weights)

    with common.PeakMemory(device) as memory:
        times = common.time_it(step, device, case["warmup"], case["repeats"])
    return {**common.summary(times), "peak_bytes": memory.peak_bytes, "shapes": shapes, "queries": queries}


def worker(case):
    torch.set_num_threads(case.get("threads") or torch.get_num_threads())
    result = run_op_case(case) if case["kind"] == "op" else run_model_case(case)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def run_worker(case, timeout):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(case)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    wall = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["worker_wall_s"] = wall
            return result
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def mib(n):
    return f"{n / 2**20:,.0f}"


def ms(result):
    return f"{result['median_s'] * 1e3:,.1f}" if "median_s" in result else "error"


def ratio(a, b, key="median_s"):
    if key not in a or key not in b or not b[key]:
        return "n/a"
    return f"{a[key] / b[key]:.2f}x"


TRAIN_MODELS = ("ours", "ours-frozen-backbone", "ours-frozen-backbone-no-dn", "theirs")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=2, action="append", metavar=("H", "W"),
                        help="inference input size, repeatable (default: 512 640 and 800 1333)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="inference batch sizes")
    parser.add_argument("--train-case", type=int, nargs=3, action="append", metavar=("H", "W", "BATCH"),
                        help="training-step case, repeatable (default: 512 640 1, 512 640 8, 800 1333 1)")
    parser.add_argument("--train-models", nargs="+", default=list(TRAIN_MODELS), choices=TRAIN_MODELS)
    parser.add_argument("--op-batch", type=int, default=2)
    parser.add_argument("--op-queries", type=int, default=0, help="0: as many queries as values (encoder)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    parser.add_argument("--gpu-dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per round on CPU")
    parser.add_argument("--rounds", type=int, default=1,
                        help="ours and theirs alternate this many times per case, each in a fresh process; the "
                             "timed repetitions of all rounds are pooled")
    parser.add_argument("--gpu-warmup", type=int, default=3)
    parser.add_argument("--gpu-repeats", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], choices=["infer", "train", "op"])
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--timeout", type=int, default=3600, help="per worker, seconds")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    args.size = args.size or [[512, 640], [800, 1333]]
    args.train_case = args.train_case or [[512, 640, 1], [512, 640, 8], [800, 1333, 1]]

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    started = time.perf_counter()
    rows = {"infer": [], "train": [], "op": []}
    for device in devices:
        dtypes = ["fp32"] if device == "cpu" else args.gpu_dtypes
        warmup, repeats = (args.warmup, args.repeats) if device == "cpu" else (args.gpu_warmup, args.gpu_repeats)
        base = {"device": device, "warmup": warmup, "repeats": repeats}
        for dtype in dtypes:
            if "infer" not in args.skip:
                for height, width in args.size:
                    for batch in args.batch:
                        case = {**base, "kind": "infer", "dtype": dtype, "batch": batch, "height": height,
                                "width": width}
                        pair = run_alternating(case, ("ours", "theirs"), args.rounds, args.timeout)
                        rows["infer"].append((device, dtype, f"{height}x{width}", batch, pair))
            if "train" not in args.skip:
                for height, width, batch in args.train_case:
                    case = {**base, "kind": "train", "dtype": dtype, "batch": batch, "height": height,
                            "width": width}
                    pair = run_alternating(case, args.train_models, args.rounds, args.timeout)
                    rows["train"].append((device, dtype, f"{height}x{width}", batch, pair))
            if "op" not in args.skip:
                height, width = args.size[0]
                impls = ["ours-pytorch", "ours-gather", "transformers-pytorch"]
                if device == "cuda":
                    impls = ["ours-triton", "ours-pytorch", "transformers-pytorch"]
                for direction in ("forward", "backward"):
                    results = {}
                    for impl in impls:
                        if impl == "ours-gather" and direction == "backward":
                            continue  # the gather serves calls without autograd only
                        case = {**base, "kind": "op", "impl": impl, "dtype": dtype, "direction": direction,
                                "batch": args.op_batch, "queries": args.op_queries, "height": height, "width": width}
                        results[impl] = run_worker(case, args.timeout)
                        print(f"op {device} {dtype} {direction} {impl}: {ms(results[impl])} ms", flush=True)
                    rows["op"].append((device, dtype, f"{height}x{width}", direction, results))
    total = time.perf_counter() - started
    if rows["infer"] or rows["op"]:
        common.write_section("bench", render(args, devices, rows, total), args.output)
    if rows["train"]:
        common.write_section("bench-train", render_train(args, rows, total), args.output)
    print(f"wrote {args.output} ({total:.0f}s)")


def run_alternating(case, models, rounds, timeout) -> dict:
    """Each model `rounds` times, alternating (A B A B ...), each run a fresh worker; timings pooled."""
    results = {model: [] for model in models}
    for _ in range(rounds):
        for model in models:
            result = run_worker({**case, "model": model}, timeout)
            results[model].append(result)
            label = f"{case['kind']} {case['device']} {case['dtype']} {case['height']}x{case['width']} b{case['batch']}"
            print(f"{label} {model}: {ms(result)} ms", flush=True)
    pooled = {}
    for model, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if len(good) < len(runs):
            pooled[model] = next(r for r in runs if "error" in r)
            continue
        times = [t for r in good for t in r["times_s"]]
        pooled[model] = {**good[0], **common.summary(times), "peak_bytes": max(r["peak_bytes"] for r in good)}
    return pooled


def render(args, devices, rows, total):
    info = common.machine_info()
    sizes = ", ".join(f"{h}x{w}" for h, w in args.size)
    lines = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/bench.py` (do not edit by hand; re-run it). Ratios are ours / theirs: below 1.00x "
        "ours is faster or uses less memory. Times are medians of the timed repetitions; every case runs in a "
        "fresh process.",
        "",
        "## Machine and versions",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        "",
        "## Command",
        "",
        f"    {common.command_line()}",
        "",
        f"Total wall time {total:.0f} s. Devices: {', '.join(devices)}. Random pixels, full pixel mask. CPU: "
        f"{args.warmup} warm-up + {args.repeats} timed repetitions per round, {args.rounds} round(s) in which the "
        f"models alternate, each run a fresh process, repetitions pooled; GPU: {args.gpu_warmup} + "
        f"{args.gpu_repeats}. Inference sizes {sizes}.",
        "",
        "## Models",
        "",
        common.model_description(),
        "",
        "Peak memory: CUDA `torch.cuda.max_memory_allocated()` above the level before the timed block; CPU peak "
        "resident set size (RSS, polled every ms plus getrusage's maximum) above the RSS before the warm-up, in MiB. "
        "CPU RSS includes allocator caching and is coarser than the CUDA figure.",
        "",
    ]
    if rows["infer"]:
        lines += [
            "## Inference (eval mode, `torch.inference_mode`, no loss)",
            "",
            "| device | dtype | input | batch | ours ms | theirs ms | ours/theirs time | ours img/s | theirs img/s "
            "| ours peak MiB | theirs peak MiB | ours/theirs memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for device, dtype, size, batch, pair in rows["infer"]:
            ours, theirs = pair["ours"], pair["theirs"]
            tput = lambda r: f"{batch / r['median_s']:.2f}" if "median_s" in r else "error"  # noqa: E731
            lines.append(
                f"| {device} | {dtype} | {size} | {batch} | {ms(ours)} | {ms(theirs)} | {ratio(ours, theirs)} "
                f"| {tput(ours)} "
                f"| {tput(theirs)} | {mib(ours.get('peak_bytes', 0))} | {mib(theirs.get('peak_bytes', 0))} "
                f"| {ratio(ours, theirs, 'peak_bytes')} |"
            )
        lines.append("")
    if rows["op"]:
        op_shapes = None
        lines += [
            "## Multi-scale deformable attention op alone",
            "",
            "| device | dtype | direction | implementation | ms | vs ours-pytorch | peak MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for device, dtype, size, direction, results in rows["op"]:
            reference = results.get("ours-pytorch", {})
            for impl, result in results.items():
                op_shapes = op_shapes or (result.get("shapes"), result.get("queries"))
                lines.append(
                    f"| {device} | {dtype} | {direction} | {impl} | {ms(result)} | {ratio(result, reference)} "
                    f"| {mib(result.get('peak_bytes', 0))} |"
                )
        lines += [
            "",
            f"Shapes: batch {args.op_batch}, 8 heads x 32 channels, 4 points, levels {op_shapes[0] if op_shapes else '?'}"
            f" (the encoder's at {args.size[0][0]}x{args.size[0][1]}), {op_shapes[1] if op_shapes else '?'} queries. "
            "'backward' is forward + backward w.r.t. value, locations and weights. transformers-pytorch is "
            "`MultiScaleDeformableAttention` of transformers' Deformable DETR (its pure-PyTorch path). ours-gather "
            "is `ms_deform_attn_gather.py`, which the model uses on CPU for calls without autograd (inference). "
            "ours-pytorch rows in bf16 cast the locations to bf16 (grid_sample needs one dtype); ours-triton keeps "
            "them float32.",
            "",
        ]
    errors = [
        (kind, row[:4], name, result["error"])
        for kind in rows
        for row in rows[kind]
        for name, result in row[4].items()
        if "error" in result
    ]
    if errors:
        lines += ["## Errors", ""]
        for kind, key, name, error in errors:
            lines += [f"- {kind} {key} {name}:", "", "```", error.strip(), "```", ""]
    if "cuda" not in devices:
        lines += [
            "## Pending",
            "",
            "GPU rows (inference fp32/bf16, training step, Triton kernel forward/backward) are pending: no CUDA "
            "device on the machine that wrote this file. On a GPU machine run `python benchmarks/bench.py` (or with "
            "`--devices cuda --size 800 1333`) to add them.",
            "",
        ]
    return "\n".join(lines)


def render_train(args, rows, total) -> str:
    """The training-step table: its own BENCHMARKS.md section, so inference can be re-measured on its own."""
    lines = [
        "## Training step (train mode: forward with labels + loss + backward + AdamW step)",
        "",
        f"Written by `benchmarks/bench.py` ({common.command_line()}), {total:.0f} s in all; machine and models as in "
        f"the section above. {args.warmup} warm-up + {args.repeats} timed steps per round, {args.rounds} round(s).",
        "",
    ]
    if rows["train"]:
        lines += [
            "Ours includes contrastive denoising (100 queries) and Align-DETR's matching/loss on 6 decoder layers "
            "+ encoder proposals; theirs Hungarian matching and focal/L1/GIoU loss on 6 layers + the two-stage "
            "proposals. 6 boxes per image. bf16 rows use autocast.",
            "",
            "| device | dtype | input | batch | ours ms | theirs ms | ours/theirs time | ours peak MiB "
            "| theirs peak MiB | ours/theirs memory | trainable params ours / theirs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for device, dtype, size, batch, pair in rows["train"]:
            for variant in [name for name in pair if name != "theirs"]:
                ours, theirs = pair[variant], pair["theirs"]
                lines.append(
                    f"| {device} | {dtype} | {size} | {batch} | {variant}: {ms(ours)} | {ms(theirs)} "
                    f"| {ratio(ours, theirs)} "
                    f"| {mib(ours.get('peak_bytes', 0))} | {mib(theirs.get('peak_bytes', 0))} "
                    f"| {ratio(ours, theirs, 'peak_bytes')} | {ours.get('params', 0) / 1e6:.1f}M / "
                    f"{theirs.get('params', 0) / 1e6:.1f}M |"
                )
        lines.append("")
        lines += ["### Host synchronisations in our loss (one training step)", ""]
        for device, dtype, size, batch, pair in rows["train"]:
            syncs = next((r.get("syncs") for name, r in pair.items() if name.startswith("ours")), None)
            if syncs is not None:
                lines.append(f"- {device} {dtype} {size} batch {batch}: {json.dumps(syncs)}")
        lines += [
            "",
            "`sync_like_calls` counts, by name, the calls inside `AlignDetrLoss.forward` that would synchronise "
            "with a GPU (item, tolist, cpu, nonzero, ... through a TorchFunctionMode); on CPU they only mark the "
            "places (`cpu` on an already-host tensor is free on GPU too; `.to` is counted only from an accelerator to "
            "the host). `cuda_sync_debug_warnings` (CUDA only) counts the real ones via "
            "`torch.cuda.set_sync_debug_mode('warn')`.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
