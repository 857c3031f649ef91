"""One command that proves the GPU path: the Triton kernel, inference, a training step, torch.compile, the ONNX export
and the hub-kernel layer inside transformers' Deformable DETR, on one CUDA GPU, in under 8 minutes.

    python benchmarks/gpu_check.py --json gpu_check.json       # CUDA: measures, prints the tables, writes BENCHMARKS.md
    python benchmarks/gpu_check.py --dry-run                    # CPU: tiny shapes, Triton's interpreter, no GPU figure

Sections (each in its own worker process with its own time limit, so a failing or crashing section reports its error
and the others still run; `--sections` / `--skip` choose):
  kernel      Triton kernel vs the grid_sample reference at R-50 shapes (encoder and decoder at 800x1333, batch 2):
              forward and backward, fp32/bf16/fp16, max error and time; the dispatch without triton (a fresh process
              where `import triton` fails) falls back to the PyTorch path with the same output
  hub_kernel  our op as transformers' `MultiScaleDeformableAttention` hub-kernel layer (`align_detr_hf.hub_kernels`):
              a Deformable DETR's outputs and gradients vs its own PyTorch path (float64 as the truth), and the layer
              in fp32/bf16/fp16, forward and backward
  inference   full R-50 models at 800x1333, batch 1 and 8, fp32 and bf16 autocast: ms/image and peak memory of ours,
              transformers' DeformableDetrForObjectDetection (two-stage, box refinement; its PyTorch path) and the
              same with our kernel, alternating in the same run
  training    one step (forward + loss + backward + AdamW) at batch 2, 800x1333, bf16 autocast: images/s, peak
              memory, host synchronisations per step counted with torch.cuda.set_sync_debug_mode("warn")
  compile     torch.compile(fullgraph=True) of our model forward (a graph break raises; torch._dynamo.explain then
              lists them): compile time, speed-up over eager, output difference
  export      our fp16 ONNX export run by ONNX Runtime's CUDA provider vs eager PyTorch fp32 on the fixture images
              (tests/fixtures/small: the mmdetection reference model and its two images)

`--dry-run` runs the same code on CPU with tiny models and shapes, the Triton kernel in Triton's interpreter, and
hides any GPU (CUDA_VISIBLE_DEVICES=""): it checks that the script works (CI runs it), and its Markdown shows every
figure as "pending"; its CPU numbers stay in the JSON, marked dry-run. BENCHMARKS.md: a GPU run writes its
`gpu_check` section; a dry run writes only with `--write-pending`, and never over GPU figures unless
`--replace-gpu-figures` is given too.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import common  # benchmarks/common.py: the full-size models, inputs, timing, peak memory, BENCHMARKS.md sections

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURES = REPO / "tests" / "fixtures"
SECTION_NAME = "gpu_check"  # the BENCHMARKS.md block this script owns
GPU_MARKER = "<!-- gpu_check: GPU figures -->"  # in a block written by a GPU run
PENDING = "pending"

# section -> worker time limit in seconds, start-up and Triton's first compilations included (GPU run: 470 s in all,
# under 8 minutes; the limits bound a slow section, a normal run takes less; dry run: x4)
TIME_LIMITS = {"kernel": 60, "hub_kernel": 40, "inference": 100, "training": 60, "compile": 130, "export": 80}
# the dry run's sections that need the Triton interpreter share one worker; the others share another
INTERPRETER_SECTIONS = ("kernel", "hub_kernel")


# ---------------------------------------------------------------------------------------------------------------
# Cases: what each section measures on a GPU, and its tiny stand-in for the dry run
# ---------------------------------------------------------------------------------------------------------------

GPU_SIZE, DRY_SIZE, DRY_KERNEL_SIZE = (800, 1333), (64, 96), (32, 48)
MODELS = {"ours": "Align-DETR (ours)", "theirs": "Deformable DETR", "theirs+kernel": "Deformable DETR + our kernel"}


def level_shapes(height, width):
    """Feature-map sizes of the 4 levels (strides 8, 16, 32, 64) of an R-50 DINO-4scale at height x width."""
    return [(math.ceil(height / stride), math.ceil(width / stride)) for stride in (8, 16, 32, 64)]


def kernel_cases(dry_run):
    # the dry run's Triton interpreter costs ~0.1 s per program instance: one query block, one head, one point
    height, width = DRY_KERNEL_SIZE if dry_run else GPU_SIZE
    shapes = level_shapes(height, width)
    values = sum(h * w for h, w in shapes)
    geometry = dict(batch=1, heads=1, head_dim=4, points=1) if dry_run else dict(batch=2, heads=8, head_dim=32, points=4)
    places = (("encoder", values), ("decoder", 16 if dry_run else 900))
    return [
        {"shape": f"{place} {height}x{width}, {queries} queries", "queries": queries, "levels": shapes, "dtype": dtype, **geometry}
        for place, queries in places
        for dtype in ("fp32", "bf16", "fp16")
    ]


def hub_kernel_cases(dry_run):
    cases = [{"check": "Deformable DETR (tiny): outputs + all gradients vs its own path", "dtype": "fp32"}]
    queries = 16 if dry_run else 900
    cases += [{"check": f"layer, {queries} queries: forward + backward vs transformers' layer", "dtype": dtype,
               "queries": queries} for dtype in ("fp32", "bf16", "fp16")]
    return cases


def inference_cases(dry_run):
    height, width = DRY_SIZE if dry_run else GPU_SIZE
    return [
        {"model": model, "dtype": dtype, "batch": batch, "size": f"{height}x{width}"}
        for dtype in ("fp32", "bf16")
        for batch in ((1, 2) if dry_run else (1, 8))
        for model in MODELS
    ]


def training_cases(dry_run):
    height, width = DRY_SIZE if dry_run else GPU_SIZE
    return [{"model": model, "dtype": "bf16", "batch": 2, "size": f"{height}x{width}"} for model in MODELS]


def compile_cases(dry_run):
    height, width = DRY_SIZE if dry_run else GPU_SIZE
    return [{"model": "ours", "dtype": "fp32", "batch": 1, "size": f"{height}x{width}",
             "backend": "aot_eager" if dry_run else "inductor"}]


def export_cases(dry_run):
    runtime = "ONNX Runtime CPU" if dry_run else "ONNX Runtime CUDA"
    return [{"runtime": f"{runtime} (fp16 export)", "images": "fixture 2x3x160x224"},
            {"runtime": "PyTorch eager fp32", "images": "fixture 2x3x160x224"}]


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces of the sections (run inside a worker)
# ---------------------------------------------------------------------------------------------------------------


def dtype_of(name):
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device, dtype_name):
    if dtype_name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype_of(dtype_name))


def build_model(name, dry_run, device):
    """Ours / transformers' Deformable DETR / the latter with our kernel: full R-50 (benchmarks/common.py) or tiny."""
    torch.manual_seed(0)
    base = "theirs" if name == "theirs+kernel" else name
    if dry_run:
        model = _tiny_model(base)
    else:
        model = common.build_model(base)
    model = model.to(device)
    if name == "theirs+kernel":
        from align_detr_hf.hub_kernels import use_triton_deformable_attention

        use_triton_deformable_attention(model)
    return model


def _tiny_model(name):
    from transformers import ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    id2label = {i: f"class_{i}" for i in range(common.NUM_LABELS)}  # common.make_batch draws from 80 classes
    width = dict(backbone_config=backbone, id2label=id2label, d_model=32, encoder_layers=1, decoder_layers=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_n_points=2, decoder_n_points=2, num_queries=12)
    if name == "ours":
        from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection

        return AlignDetrForObjectDetection(AlignDetrConfig(num_denoising_queries=6, **width))
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(two_stage=True, with_box_refine=True, two_stage_num_proposals=12, auxiliary_loss=True,
                                  dropout=0.0, disable_custom_kernels=True, **width)
    return DeformableDetrForObjectDetection(config)


def timed(fn, device, warmup, repeats):
    """(median seconds, peak bytes above the level at entry) of `repeats` calls after `warmup` calls."""
    import statistics

    with common.PeakMemory(device, process_peak=False) as memory:
        times = common.time_it(fn, device, warmup, repeats)
    return statistics.median(times), memory.peak_bytes


def max_abs(a, b):
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


# relative to max(1, largest value): the inputs' rounding to the dtype (tests/test_ms_deform_attn.py's CUDA test)
KERNEL_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 4e-3}


def run_kernel(ctx):
    from align_detr_hf.ms_deform_attn import multi_scale_deformable_attention_pytorch
    from align_detr_hf.ms_deform_attn_triton import multi_scale_deformable_attention_triton

    device, rows = ctx["device"], []
    warmup, repeats = (0, 1) if ctx["dry_run"] else (2, 10)
    probe = start_fallback_probe(device)  # its own process, meanwhile
    for case in kernel_cases(ctx["dry_run"]):
        dtype, shapes = dtype_of(case["dtype"]), [tuple(s) for s in case["levels"]]
        generator = torch.Generator().manual_seed(0)
        num_values = sum(h * w for h, w in shapes)
        b, q, h, d, p = case["batch"], case["queries"], case["heads"], case["head_dim"], case["points"]
        # as inside the model under autocast: value and weights in the compute dtype, locations float32
        value = torch.randn(b, num_values, h, d, generator=generator).to(device, dtype)
        locations = torch.rand(b, q, h, len(shapes), p, 2, generator=generator).to(device)
        weights = torch.rand(b, q, h, len(shapes), p, generator=generator).softmax(-1).to(device, dtype)
        grad_out = torch.randn(b, q, h * d, generator=generator).to(device, dtype)
        inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
        reference_inputs = [t.detach().float().clone().requires_grad_() for t in (value, locations, weights)]

        def triton_op(v, loc, w):
            return multi_scale_deformable_attention_triton(v, shapes, loc, w)

        def reference_op(v, loc, w):
            return multi_scale_deformable_attention_pytorch(v, shapes, loc, w)

        out = triton_op(*inputs)
        expected = reference_op(*reference_inputs)  # float32 maths on the same (rounded) inputs
        grads = torch.autograd.grad(out, inputs, grad_out)
        expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out.float())
        grad_error = max(max_abs(g, e) / max(1.0, e.abs().max().item()) for g, e in zip(grads, expected_grads))

        def timing(op, with_backward):
            def step():
                if with_backward:
                    torch.autograd.grad(op(*inputs), inputs, grad_out)
                else:
                    with torch.no_grad():
                        op(*inputs)

            return timed(step, device, warmup, repeats)[0] * 1e3

        fwd_error = max_abs(out, expected) / max(1.0, expected.abs().max().item())
        row = {**{k: case[k] for k in ("shape", "dtype")}, "queries": q, "fwd_max_err": max_abs(out, expected),
               "bwd_max_rel_err": grad_error, "passed": max(fwd_error, grad_error) <= KERNEL_TOLERANCE[case["dtype"]]}
        row["triton_fwd_ms"], row["reference_fwd_ms"] = timing(triton_op, False), timing(reference_op, False)
        row["triton_fwd_bwd_ms"], row["reference_fwd_bwd_ms"] = timing(triton_op, True), timing(reference_op, True)
        row["fwd_speedup"] = row["reference_fwd_ms"] / row["triton_fwd_ms"]
        row["fwd_bwd_speedup"] = row["reference_fwd_bwd_ms"] / row["triton_fwd_bwd_ms"]
        rows.append(row)
    return {"rows": rows, "fallback_without_triton": finish_fallback_probe(probe)}


FALLBACK_PROBE = """
import json, sys, warnings
sys.modules["triton"] = None  # `import triton` fails, importlib.util.find_spec("triton") is None
import torch
from align_detr_hf.ms_deform_attn import (implementation_for, multi_scale_deformable_attention,
                                          multi_scale_deformable_attention_pytorch)
device = sys.argv[1]
shapes = [(6, 8), (3, 4)]
g = torch.Generator().manual_seed(0)
value = torch.randn(2, 60, 2, 8, generator=g).to(device).requires_grad_()
locations = torch.rand(2, 5, 2, 2, 2, 2, generator=g).to(device)
weights = torch.rand(2, 5, 2, 2, 2, generator=g).to(device)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    out.sum().backward()
expected = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
print("RESULT " + json.dumps({"implementation": implementation_for(value), "max_err": (out - expected).abs().max().item(),
                              "warnings": [str(w.message) for w in caught], "has_grad": value.grad is not None}))
"""


def start_fallback_probe(device):
    """The dispatch in a fresh process where triton cannot be imported: which path runs, and its result."""
    env = {**os.environ, "ALIGN_DETR_MSDA_IMPL": "", "TRITON_INTERPRET": "0"}
    return subprocess.Popen([sys.executable, "-c", FALLBACK_PROBE, device], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish_fallback_probe(proc):
    stdout, stderr = proc.communicate(timeout=300)
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["ok"] = (result["implementation"] == "pytorch" and result["max_err"] == 0.0 and result["has_grad"]
                            and not result["warnings"])
            return result
    raise RuntimeError(f"the probe without triton failed: {(stderr or stdout)[-1500:]}")


def run_hub_kernel(ctx):
    from align_detr_hf.hub_kernels import use_triton_deformable_attention
    from align_detr_hf.ms_deform_attn import implementation_for

    device, rows = ctx["device"], []
    cases = hub_kernel_cases(ctx["dry_run"])
    # 1. a tiny two-stage Deformable DETR: ours within a few times transformers' own float32 error (float64 truth)
    model = _tiny_deformable_detr_for_gradients()
    truth = _outputs_and_gradients(copy.deepcopy(model), torch.float64, device)
    theirs = _outputs_and_gradients(copy.deepcopy(model), torch.float32, device)
    use_triton_deformable_attention(model)
    ours = _outputs_and_gradients(model, torch.float32, device)
    floor = 1e-6 * max(t.abs().max().item() for t in truth.values())
    ratio = max(max_abs(ours[k], theirs[k]) / (max_abs(theirs[k], truth[k]) + floor) for k in truth)
    rows.append({**cases[0], "implementation": implementation_for(torch.zeros(1, device=device)),
                 "max_err": max(max_abs(ours[k], theirs[k]) for k in ("logits", "pred_boxes")),
                 "noise_ratio": ratio, "passed": ratio <= 4.0})
    # 2. the layer alone in each dtype, against transformers' own layer on float32 copies
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    for case in cases[1:]:
        args = _layer_inputs(case["queries"], dtype_of(case["dtype"]), device, ctx["dry_run"])
        reference = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        expected = _forward_and_gradients(MultiScaleDeformableAttention(), reference)
        got = _forward_and_gradients(use_triton_deformable_attention(MultiScaleDeformableAttention()), args)
        errors = [max_abs(g, e) / max(1.0, e.abs().max().item()) for g, e in zip(got, expected)]
        rows.append({**case, "implementation": implementation_for(args[0]), "max_err": errors[0],
                     "max_grad_rel_err": max(errors[1:]),
                     "passed": max(errors) <= KERNEL_TOLERANCE[case["dtype"]] and all(
                         g.dtype == args[0].dtype for g in got)})
    return {"rows": rows}


def _tiny_deformable_detr_for_gradients():
    """tests/test_hub_kernels.py's model: sampling offsets perturbed off the cell borders where the bilinear gradient
    jumps (at initialisation every point sits on one)."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=8, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=2, two_stage=True, with_box_refine=True, two_stage_num_proposals=8,
        disable_custom_kernels=True, id2label={0: "a", 1: "b"},
    )
    model = DeformableDetrForObjectDetection(config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "sampling_offsets" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def _outputs_and_gradients(model, dtype, device):
    model = model.to(device, dtype)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 48, generator=generator).to(device, dtype)
    mask = torch.ones(2, 32, 48, dtype=torch.long, device=device)
    mask[1, :, 32:] = 0  # padding in the second image
    out = model(pixels, pixel_mask=mask)
    weights = torch.randn(out.logits.shape, generator=generator).to(device, dtype)
    ((out.logits * weights).sum() + out.pred_boxes.sum()).backward()
    results = {"logits": out.logits, "pred_boxes": out.pred_boxes}
    results.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return {name: tensor.detach().double().cpu() for name, tensor in results.items()}


def _layer_inputs(queries, dtype, device, dry_run):
    shapes = level_shapes(*(DRY_KERNEL_SIZE if dry_run else GPU_SIZE))
    batch, heads, head_dim, points = (1, 1, 4, 1) if dry_run else (2, 8, 32, 4)
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=generator)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator).softmax(-1)
    shapes_tensor = torch.tensor(shapes, device=device)
    starts = torch.cat([shapes_tensor.new_zeros(1), shapes_tensor.prod(1).cumsum(0)[:-1]])
    return [value.to(device, dtype), shapes_tensor, shapes, starts, locations.to(device, dtype),
            weights.to(device, dtype), 64]


def _forward_and_gradients(layer, args):
    args = list(args)
    for index in (0, 4, 5):
        args[index] = args[index].detach().clone().requires_grad_()
    out = layer(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    return [out.detach(), *torch.autograd.grad(out, [args[0], args[4], args[5]], grad)]


def run_inference(ctx):
    from align_detr_hf.ms_deform_attn import implementation_for

    device, dry_run = ctx["device"], ctx["dry_run"]
    warmup, repeats, rounds = (0, 1, 1) if dry_run else (2, 5, 2)
    models = {name: guarded(lambda name=name: build_model(name, dry_run, device).eval()) for name in MODELS}
    rows = []
    for dtype, batch, size in dict.fromkeys((c["dtype"], c["batch"], c["size"]) for c in inference_cases(dry_run)):
        height, width = (int(v) for v in size.split("x"))
        pixels, mask, _ = common.make_batch(batch, height, width, device)
        runs = {name: [] for name in MODELS}
        for round_index in range(rounds):
            for name in _rotated(round_index):
                model = models[name]
                if isinstance(model, dict) or any("error" in run for run in runs[name]):
                    continue  # it failed to build, or in an earlier round

                def step():
                    with torch.inference_mode(), autocast(device, dtype):
                        model(pixels, pixel_mask=mask)

                runs[name].append(guarded(lambda: dict(zip(("seconds", "peak"), timed(step, device, warmup,
                                                                                         repeats)))))
        for name in MODELS:
            row = {"model": name, "dtype": dtype, "batch": batch, "size": size}
            failed = models[name] if isinstance(models[name], dict) else next(
                (run for run in runs[name] if "error" in run), None)
            if failed:
                rows.append({**row, **failed})
                continue
            seconds = min(run["seconds"] for run in runs[name])  # the faster round: the other one warmed up
            row.update(seconds=seconds, ms_per_image=seconds * 1e3 / batch, images_per_s=batch / seconds,
                       peak_mib=max(run["peak"] for run in runs[name]) / 2**20)
            rows.append(row)
        _ratios_to_theirs(rows[-len(MODELS):], "seconds")
    return {"rows": rows, "msda_implementation": implementation_for(torch.zeros(1, device=device))}


def _rotated(round_index):
    """The models' order in a round: each takes each place in turn (a warmer GPU or cache favours no one)."""
    names = list(MODELS)
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def _ratios_to_theirs(rows, key):
    theirs = next((r for r in rows if r["model"] == "theirs" and key in r), None)
    for row in rows:
        row["vs_theirs"] = row[key] / theirs[key] if theirs and key in row else None


def guarded(fn):
    """fn(), or {"error": ...}: one model's failure (out of memory, a missing package) stays in its own row."""
    try:
        return fn()
    except Exception as error:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(error).__name__}: {error}"[:500]}


def run_training(ctx):
    device, dry_run = ctx["device"], ctx["dry_run"]
    warmup, repeats = (1, 1) if dry_run else (2, 5)
    rows = []
    for case in training_cases(dry_run):
        rows.append({**case, **guarded(lambda case=case: training_step_figures(case, device, dry_run, warmup,
                                                                              repeats))})
    _ratios_to_theirs(rows, "ms_per_step")
    return {"rows": rows}


def training_step_figures(case, device, dry_run, warmup, repeats):
    model = build_model(case["model"], dry_run, device).train()
    height, width = (int(v) for v in case["size"].split("x"))
    pixels, mask, labels = common.make_batch(case["batch"], height, width, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with autocast(device, case["dtype"]):
            loss = model(pixels, pixel_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, device, warmup, repeats)
    figures = {"ms_per_step": seconds * 1e3, "images_per_s": case["batch"] / seconds, "peak_mib": peak / 2**20}
    # one more step, its host synchronisations counted: CUDA's own count, and the calls that synchronise by name
    with sync_like_counter(device) as counter:
        figures["cuda_syncs"] = count_cuda_syncs(step, device)
    figures.update(sync_like_calls=sum(counter.calls.values()), sync_like_by_name=counter.calls)
    return figures


def sync_like_counter(device):
    """Counts, by name, the calls that synchronise with an accelerator (benchmarks/bench.py's list: item, tolist,
    cpu, nonzero, ...) made on tensors of `device`; on CPU (dry run) on any tensor, i.e. the places."""
    from bench import SYNC_CALLS

    class Counter(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name in SYNC_CALLS and args and torch.is_tensor(args[0]) and args[0].device.type == device:
                self.calls[name] = self.calls.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    return Counter()


def count_cuda_syncs(fn, device):
    """Synchronising CUDA calls of `fn`, as torch.cuda.set_sync_debug_mode("warn") reports them; None on CPU."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def run_compile(ctx):
    device, dry_run = ctx["device"], ctx["dry_run"]
    warmup, repeats = (0, 1) if dry_run else (2, 5)
    case = compile_cases(dry_run)[0]
    model = build_model(case["model"], dry_run, device).eval()
    height, width = (int(v) for v in case["size"].split("x"))
    pixels, mask, _ = common.make_batch(case["batch"], height, width, device)
    with torch.no_grad():
        eager_out = model(pixels, pixel_mask=mask)
        eager_s, _ = timed(lambda: model(pixels, pixel_mask=mask), device, warmup, repeats)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=case["backend"], fullgraph=True, dynamic=False)
        start = time.perf_counter()
        try:
            compiled_out = compiled(pixels, pixel_mask=mask)  # fullgraph=True: a graph break raises here
        except Exception as error:
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model)(pixels, pixel_mask=mask)
            reasons = [str(getattr(r, "reason", r))[:300] for r in explained.break_reasons[:5]]
            raise RuntimeError(f"{explained.graph_break_count} graph break(s): {reasons}") from error
        if device == "cuda":
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        compiled_s, _ = timed(lambda: compiled(pixels, pixel_mask=mask), device, warmup, repeats)
    row = {**case, "graph_breaks": 0, "compile_s": compile_s, "eager_ms": eager_s * 1e3,
           "compiled_ms": compiled_s * 1e3, "speedup": eager_s / compiled_s,
           "max_logit_diff": max_abs(compiled_out.logits, eager_out.logits),
           "max_box_diff": max_abs(compiled_out.pred_boxes, eager_out.pred_boxes)}
    return {"rows": [row]}


def run_export(ctx):
    import numpy as np
    import onnxruntime as ort

    from align_detr_hf.export_align_detr import export_onnx

    device, dry_run = ctx["device"], ctx["dry_run"]
    warmup, repeats = (0, 1) if dry_run else (3, 20)
    provider = "CPUExecutionProvider" if dry_run else "CUDAExecutionProvider"
    if provider not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no {provider} (install onnxruntime-gpu)")
    model = _tiny_model("ours") if dry_run else _fixture_model()
    model.eval()
    inputs = torch.load(FIXTURES / "small" / "inputs.pt")
    pixels, mask = inputs["pixel_values"], inputs["pixel_mask"].long()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "model_fp16.onnx", fp16=True)
        export_s = time.perf_counter() - start
        session = ort.InferenceSession(str(path), providers=[provider])
        if session.get_providers()[0] != provider:  # ORT quietly falls back to CPU when the CUDA provider fails
            raise RuntimeError(f"ONNX Runtime did not load {provider}: providers {session.get_providers()}")
        feed = {"pixel_values": pixels.half().numpy(), "pixel_mask": mask.numpy()}
        logits, boxes = session.run(None, feed)[:2]
        ort_s, _ = timed(lambda: session.run(None, feed), "cpu", warmup, repeats)  # session.run returns on the host
    model = model.to(device)
    with torch.inference_mode():
        eager = model(pixels.to(device), pixel_mask=mask.to(device))
        eager_s, _ = timed(lambda: model(pixels.to(device), pixel_mask=mask.to(device)), device, warmup, repeats)
    agreement = paired_agreement(np.asarray(logits, np.float32), np.asarray(boxes, np.float32),
                                 eager.logits.float().cpu().numpy(), eager.pred_boxes.float().cpu().numpy())
    cases = export_cases(dry_run)
    rows = [{**cases[0], "ms_per_batch": ort_s * 1e3, "vs_eager": ort_s / eager_s, **agreement},
            {**cases[1], "ms_per_batch": eager_s * 1e3, "vs_eager": 1.0}]
    return {"rows": rows, "export_s": export_s, "tolerances": {"logit": LOGIT_TOL, "box": BOX_TOL}}


LOGIT_TOL, BOX_TOL = 0.05, 0.01  # fp16 vs fp32


def paired_agreement(logits, boxes, ref_logits, ref_boxes):
    """Queries of two runtimes paired one to one per image (Hungarian on box + logit distance): two-stage top-k picks
    that are near ties may come out in another order, or another proposal, in fp16. Returns the fraction of queries
    whose partner lies within the fp16 tolerances, and the largest differences over those that do."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    within, total, worst_logit, worst_box = 0, 0, 0.0, 0.0
    for image in range(logits.shape[0]):
        box_diff = np.abs(boxes[image][:, None] - ref_boxes[image][None]).max(-1)
        logit_diff = np.abs(logits[image][:, None] - ref_logits[image][None]).max(-1)
        rows, cols = linear_sum_assignment(box_diff + logit_diff)
        ok = (logit_diff[rows, cols] <= LOGIT_TOL) & (box_diff[rows, cols] <= BOX_TOL)
        within, total = within + int(ok.sum()), total + len(rows)
        if ok.any():
            worst_logit = max(worst_logit, float(logit_diff[rows, cols][ok].max()))
            worst_box = max(worst_box, float(box_diff[rows, cols][ok].max()))
    return {"queries_within_tol": within / total, "max_logit_diff": worst_logit, "max_box_diff": worst_box}


def _fixture_model():
    """The mmdetection reference model of tests/fixtures/small (random weights regenerated from the manifest)."""
    sys.path.insert(0, str(FIXTURES))
    import weights

    from align_detr_hf.convert_align_detr import config_from_state_dict, load_converted

    state_dict = weights.generate_state_dict(weights.read_manifest(FIXTURES / "small" / "manifest.tsv"), seed=0,
                                             num_heads=8, num_points=4)
    return load_converted(state_dict, config_from_state_dict(state_dict, num_denoising_queries=20,
                                                             num_gt_repeat=[2, 1, 2]))


RUNNERS = {"kernel": run_kernel, "hub_kernel": run_hub_kernel, "inference": run_inference, "training": run_training,
           "compile": run_compile, "export": run_export}


def worker(spec):
    """Run the sections of `spec` one after another; each prints its own RESULT line as soon as it ends."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = "cpu" if spec["dry_run"] else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        for name in spec["sections"]:
            emit(name, {"status": "error", "error": "no CUDA device here: run with --dry-run to check on CPU"})
        return
    for name in spec["sections"]:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            result = {"status": "ok", **RUNNERS[name]({"device": device, "dry_run": spec["dry_run"]})}
        except Exception as error:
            result = {"status": "error", "error": f"{type(error).__name__}: {error}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
        result.update(seconds=time.perf_counter() - start, cpu_s=time.process_time() - cpu_start, device=device,
                      dry_run=spec["dry_run"])
        emit(name, result)
        if device == "cuda":
            torch.cuda.empty_cache()


def emit(name, result):
    print(f"RESULT {name} " + json.dumps(result, default=str), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def worker_groups(sections, dry_run):
    """GPU: one worker per section (a crashed CUDA context takes only its own section down). Dry run: the
    interpreter's sections in one worker, the others in another (each worker's start costs seconds of imports)."""
    if not dry_run:
        return [[name] for name in sections]
    groups = [[n for n in sections if n in INTERPRETER_SECTIONS], [n for n in sections if n not in INTERPRETER_SECTIONS]]
    return [group for group in groups if group]


def worker_env(group, dry_run):
    env = {**os.environ, "ALIGN_DETR_MSDA_IMPL": "", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run measures nothing on a GPU, even where there is one
        if set(group) & set(INTERPRETER_SECTIONS):
            # the Triton kernel on CPU tensors, in the interpreter (set before triton is imported)
            env.update(TRITON_INTERPRET="1", ALIGN_DETR_MSDA_IMPL="triton")
    return env


def run_groups(groups, dry_run, scale):
    """Each group in a worker process with the sum of its sections' time limits. A GPU run's workers run one after
    another (nothing else on the GPU while one measures); a dry run's run side by side (no figure of theirs is a
    measurement, and two processes halve the wait on two cores)."""
    results, running = {}, []
    for group in groups:
        limit = sum(TIME_LIMITS[name] for name in group) * scale
        command = [sys.executable, __file__, "--worker", json.dumps({"sections": group, "dry_run": dry_run})]
        print(f"running {', '.join(group)} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=worker_env(group, dry_run))
        running.append((group, proc, limit, time.perf_counter(), dry_run))
        if not dry_run:
            results.update(finish_group(*running.pop()))
    for job in running:
        results.update(finish_group(*job))
    return results


def finish_group(group, proc, limit, start, dry_run):
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, limit - (time.perf_counter() - start)))
        failure = f"worker exited with code {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        failure = f"timed out after {limit:.0f} s"
    results = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            name, payload = line[len("RESULT "):].split(" ", 1)
            results[name] = json.loads(payload)
            print(f"  {name}: {results[name]['status']} ({results[name]['seconds']:.0f} s, "
                  f"{results[name]['cpu_s']:.0f} s CPU)", file=sys.stderr)
    for name in group:  # sections the worker never reported: it crashed or ran out of time in them
        results.setdefault(name, {"status": "error", "error": f"{failure}; stderr: {stderr[-1500:]}",
                                  "seconds": time.perf_counter() - start, "dry_run": dry_run})
    return results


def machine():
    """Versions and devices, from the parent process (torch only; the workers import the rest)."""
    import platform

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for package in ("triton", "transformers", "kernels", "onnxruntime"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = "not installed"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=REPO, check=True).stdout.strip()
    except Exception:
        info["git_commit"] = "unknown"
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter; no GPU figure")
    parser.add_argument("--sections", nargs="+", choices=list(RUNNERS), default=list(RUNNERS))
    parser.add_argument("--skip", nargs="+", choices=list(RUNNERS), default=[])
    parser.add_argument("--json", help="write the full results here as JSON")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="the file with the gpu_check section")
    parser.add_argument("--no-write", action="store_true", help="GPU run: do not write the BENCHMARKS.md section")
    parser.add_argument("--write-pending", action="store_true",
                        help="dry run: write the section with every GPU figure pending")
    parser.add_argument("--replace-gpu-figures", action="store_true",
                        help="with --write-pending: even over a section that holds figures of a GPU run")
    parser.add_argument("--from-json", metavar="JSON",
                        help="measure nothing: render (and write, as the flags say) the report of an earlier run")
    parser.add_argument("--time-scale", type=float, default=None,
                        help="multiply every section's time limit (default 1 on a GPU, 4 in a dry run)")
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.replace_gpu_figures and not args.write_pending:
        parser.error("--replace-gpu-figures goes with --write-pending")
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        report = measure(args)
        if report is None:
            print("gpu_check: no CUDA device here; run with --dry-run to check the script on CPU", file=sys.stderr)
            return 2
    markdown = render(report)
    print(markdown)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")
    dry_run = report["dry_run"]
    if dry_run and args.write_pending or not dry_run and not args.no_write:
        try:
            write_benchmarks(args.output, markdown, gpu_figures=not dry_run, replace=args.replace_gpu_figures)
        except ValueError as error:
            print(f"gpu_check: {error}", file=sys.stderr)
            return 2
    failed = [name for name, result in report["sections"].items() if result["status"] != "ok"]
    print(f"gpu_check: {len(report['sections']) - len(failed)}/{len(report['sections'])} sections ok"
          + (f", failed: {', '.join(failed)}" if failed else "") + f" ({report['total_s']:.0f} s)", file=sys.stderr)
    return 1 if failed else 0


def measure(args):
    """Run the chosen sections; the report (None when a GPU run finds no GPU)."""
    sections = [name for name in args.sections if name not in args.skip]
    started, wall, info = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.perf_counter(), machine()
    if not args.dry_run and info["gpu"] is None:
        return None
    scale = args.time_scale or (4.0 if args.dry_run else 1.0)
    results = run_groups(worker_groups(sections, args.dry_run), args.dry_run, scale)
    return {
        "script": "benchmarks/gpu_check.py", "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
        "dry_run": args.dry_run, "gpu_figures": not args.dry_run, "started": started, "machine": info,
        "total_s": time.perf_counter() - wall, "sections": {name: results[name] for name in sections},
        "skipped": [name for name in RUNNERS if name not in sections],
    }


def write_benchmarks(path, markdown, gpu_figures, replace=False):
    """Write the gpu_check block of `path`; a pending table never replaces a GPU run's figures unless `replace`."""
    path = Path(path)
    current = path.read_text() if path.exists() else ""
    start, end = f"<!-- {SECTION_NAME}:start -->", f"<!-- {SECTION_NAME}:end -->"
    block = current.split(start, 1)[1].split(end, 1)[0] if start in current and end in current else ""
    if not gpu_figures and GPU_MARKER in block and not replace:
        raise ValueError(f"{path} holds figures of a GPU run; a dry run does not replace them "
                         "(add --replace-gpu-figures to do so)")
    common.write_section(SECTION_NAME, markdown, path)


# ---------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------


def _ms(value):
    return f"{value:,.1f}"


def _ratio(value):
    return f"{value:.2f}x"


def _err(value):
    return f"{value:.1e}"


def _mib(value):
    return f"{value:,.0f}"


def _yes(value):
    return "yes" if value else "**no**"


def _count(value):
    return "n/a" if value is None else str(value)


# section -> (title, plan of the GPU cases, label columns, figure columns); a column: (key, header, format)
TABLES = {
    "kernel": ("1. Triton kernel vs the grid_sample reference (R-50 shapes, batch 2)", kernel_cases,
               [("shape", "shapes", str), ("dtype", "dtype", str)],
               [("passed", "within tolerance", _yes), ("fwd_max_err", "fwd max abs err", _err),
                ("bwd_max_rel_err", "bwd max rel err", _err),
                ("triton_fwd_ms", "Triton fwd ms", _ms), ("reference_fwd_ms", "grid_sample fwd ms", _ms),
                ("fwd_speedup", "fwd speed-up", _ratio), ("triton_fwd_bwd_ms", "Triton fwd+bwd ms", _ms),
                ("reference_fwd_bwd_ms", "grid_sample fwd+bwd ms", _ms), ("fwd_bwd_speedup", "fwd+bwd speed-up", _ratio)]),
    "hub_kernel": ("2. Our op as transformers' MultiScaleDeformableAttention hub-kernel layer", hub_kernel_cases,
                   [("check", "check", str), ("dtype", "dtype", str)],
                   [("implementation", "path taken", str), ("max_err", "max output err", _err),
                    ("max_grad_rel_err", "max grad rel err", _err), ("noise_ratio", "diff / fp32 noise", _ratio),
                    ("passed", "within tolerance", _yes)]),
    "inference": ("3. Inference (eval, `torch.inference_mode`)", inference_cases,
                  [("model", "model", lambda m: MODELS[m]), ("dtype", "dtype", str), ("batch", "batch", str),
                   ("size", "input", str)],
                  [("ms_per_image", "ms/image", _ms), ("images_per_s", "images/s", lambda v: f"{v:,.2f}"),
                   ("peak_mib", "peak MiB", _mib), ("vs_theirs", "time vs Deformable DETR", _ratio)]),
    "training": ("4. Training step (forward + loss + backward + AdamW, bf16 autocast)", training_cases,
                 [("model", "model", lambda m: MODELS[m]), ("dtype", "dtype", str), ("batch", "batch", str),
                  ("size", "input", str)],
                 [("ms_per_step", "ms/step", _ms), ("images_per_s", "images/s", lambda v: f"{v:,.2f}"),
                  ("peak_mib", "peak MiB", _mib), ("cuda_syncs", "host syncs/step (CUDA count)", _count),
                  ("sync_like_calls", "sync-like calls/step", _count),
                  ("vs_theirs", "time vs Deformable DETR", _ratio)]),
    "compile": ("5. torch.compile of our model forward (fullgraph=True)", compile_cases,
                [("model", "model", lambda m: MODELS[m]), ("dtype", "dtype", str), ("batch", "batch", str),
                 ("size", "input", str), ("backend", "backend", str)],
                [("graph_breaks", "graph breaks", _count), ("compile_s", "compile s", lambda v: f"{v:,.1f}"),
                 ("eager_ms", "eager ms", _ms), ("compiled_ms", "compiled ms", _ms), ("speedup", "speed-up", _ratio),
                 ("max_logit_diff", "max logit diff", _err), ("max_box_diff", "max box diff", _err)]),
    "export": ("6. ONNX export (fp16) on the fixture images vs eager fp32", export_cases,
               [("runtime", "runtime", str), ("images", "images", str)],
               [("ms_per_batch", "ms/batch", _ms), ("vs_eager", "time vs eager", _ratio),
                ("queries_within_tol", "queries within fp16 tol", lambda v: f"{v:.1%}"),
                ("max_logit_diff", "max logit diff", _err), ("max_box_diff", "max box diff", _err)]),
}


def figure_columns(name):
    return [header for _, header, _ in TABLES[name][3]]


def render(report):
    dry_run, info = report["dry_run"], report["machine"]
    lines = ["## GPU check", ""]
    if dry_run:
        lines += [
            f"**Every GPU figure below is {PENDING}**: this section was written by a dry run "
            "(`python benchmarks/gpu_check.py --dry-run`: CPU, tiny models and shapes, the Triton kernel in Triton's "
            "interpreter), which only checks that the script works; no figure here is a GPU measurement. On a CUDA "
            "machine, `python benchmarks/gpu_check.py --json gpu_check.json` (under 8 minutes on one GPU) fills it.",
            "",
        ]
    else:
        lines += [GPU_MARKER, "", f"Measured on {info['gpu']} (CUDA {info['cuda']}) by `{report['command']}`, "
                  f"{report['started']}, {report['total_s']:.0f} s in all.", ""]
    lines += [f"Versions: torch {info['torch']}, triton {info['triton']}, transformers {info['transformers']}, kernels "
              f"{info['kernels']}, onnxruntime {info['onnxruntime']}; commit {info['git_commit']}.", ""]
    for name, (title, plan, labels, figures) in TABLES.items():
        lines += [f"### {title}", ""]
        result = report["sections"].get(name)
        if result is None:
            lines += ["Not run (skipped).", ""]
            continue
        columns = labels + figures
        lines += ["| " + " | ".join(header for _, header, _ in columns) + " |", "|" + "---|" * len(columns)]
        if dry_run:
            rows = plan(False)  # the GPU cases, each figure pending
        else:
            rows = result.get("rows", [])
        for row in rows:
            cells = [fmt(row[key]) if key in row else "" for key, _, fmt in labels]
            for key, _, fmt in figures:
                if dry_run:
                    cells.append(PENDING)
                elif "error" in row:
                    cells.append("error")
                else:
                    cells.append(fmt(row[key]) if row.get(key) is not None else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += _section_notes(name, result, dry_run)
    return "\n".join(lines).rstrip() + "\n"


def _section_notes(name, result, dry_run):
    notes = []
    if result["status"] != "ok":
        notes.append(f"**Section failed** ({'dry run' if dry_run else 'GPU run'}): `{result.get('error', '?')}`")
    if name == "kernel":
        notes.append("Inputs as inside the model under autocast: value and weights in the row's dtype, locations "
                     "float32; errors against the float32 reference on the same rounded inputs, gradient errors "
                     "relative to max(1, largest gradient); tolerance (relative to max(1, largest value)) "
                     f"{KERNEL_TOLERANCE['fp32']:g} / {KERNEL_TOLERANCE['bf16']:g} / {KERNEL_TOLERANCE['fp16']:g} "
                     "for fp32 / bf16 / fp16.")
        fallback = result.get("fallback_without_triton")
        if fallback and not dry_run:
            notes.append(f"Without triton (a fresh process where `import triton` fails): the dispatch takes the "
                         f"`{fallback['implementation']}` path, output difference {fallback['max_err']:.1e}, "
                         f"{len(fallback['warnings'])} warning(s): {'clean fallback' if fallback['ok'] else 'NOT clean'}.")
        elif dry_run:
            notes.append(f"Without triton (fallback of the dispatch in a fresh process): {PENDING} on the GPU.")
    if name == "hub_kernel":
        notes.append("`use_triton_deformable_attention(model)` kernelizes only the `MultiScaleDeformableAttention` "
                     "layers (kernels library). The model row: transformers' two-stage Deformable DETR (tiny), a "
                     "fixed scalar of logits and boxes backpropagated; 'diff / fp32 noise' is max over outputs and "
                     "every parameter gradient of |ours - theirs| / |theirs fp32 - theirs fp64| (pass: <= 4). Layer "
                     "rows: each dtype against transformers' own layer on float32 copies (tolerance 1e-4 / 3e-2 / 4e-3).")
    if name == "inference":
        notes.append("Models: both R-50 (HF ResNetConfig, random init), d_model 256, 6+6 layers, 900 queries, 80 "
                     "classes; Deformable DETR two-stage with box refinement, its own PyTorch path "
                     "(`disable_custom_kernels=True`), and the same with our kernel through "
                     "`use_triton_deformable_attention`. Two rounds, order rotated, 2 warm-up + 5 timed forwards "
                     "each; the faster round's median. Peak: `torch.cuda.max_memory_allocated` above the level before.")
        if not dry_run and result.get("msda_implementation"):
            notes.append(f"Our model's deformable attention ran the `{result['msda_implementation']}` path.")
    if name == "training":
        notes.append("Host syncs: `torch.cuda.set_sync_debug_mode('warn')` over one whole step (forward, loss with "
                     "matching, backward, optimizer), warnings counted; sync-like calls: calls on CUDA tensors that "
                     "synchronise (item, tolist, cpu, nonzero, ...; benchmarks/bench.py's list) counted through a "
                     "TorchFunctionMode, by name in the JSON. Deformable DETR trains no backbone parameter here (its "
                     "freezing rule misses HF ResNet names; see the bench section); ours trains all but the stem.")
    if name == "compile":
        notes.append("`torch.compile(model, fullgraph=True, dynamic=False)`: a graph break raises, and the section "
                     "then lists them with `torch._dynamo.explain`; compile s is the first compiled call.")
    if name == "export":
        notes.append("Model and images: tests/fixtures/small (the mmdetection reference model, random weights, two "
                     "images padded to 160x224). Queries are paired one to one per image (Hungarian on box + logit "
                     f"distance); within tolerance: |logit| <= {LOGIT_TOL}, |box| <= {BOX_TOL}; the max diffs are over "
                     "those. ONNX Runtime times include host<->device copies (numpy in and out).")
    return [f"{note}\n" for note in notes]


if __name__ == "__main__":
    sys.exit(main())
