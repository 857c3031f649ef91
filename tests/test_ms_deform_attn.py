"""Multi-scale deformable attention: the PyTorch reference, the CPU gather, the Triton kernel and their dispatch,
torch.compile.

The Triton kernels are checked on CPU by Triton's interpreter: `test_triton_kernels_in_interpreter` re-runs this
file's `interpret`-marked tests in a subprocess with `TRITON_INTERPRET=1` set before triton is imported (those
tests skip in the ordinary run). On a CUDA machine the `gpu` tests compare the compiled kernels too.
"""

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from align_detr_hf import ms_deform_attn_gather
from align_detr_hf.ms_deform_attn import (
    implementation_for,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_pytorch,
)
from align_detr_hf.ms_deform_attn_gather import multi_scale_deformable_attention_gather

HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(
    not (IN_INTERPRETER and HAS_TRITON), reason="runs inside test_triton_kernels_in_interpreter's subprocess"
)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(spatial_shapes, batch=2, heads=2, head_dim=8, queries=7, points=3, dtype=torch.float32,
                device="cpu", spread=(-0.3, 1.3), seed=0):
    """Random inputs; locations drawn from `spread`, so some fall outside [0, 1]; weights not normalised."""
    generator = torch.Generator().manual_seed(seed)
    levels = len(spatial_shapes)
    num_values = sum(h * w for h, w in spatial_shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator)
    low, high = spread
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * (high - low) + low
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator)
    return value.to(device, dtype), locations.to(device), weights.to(device, dtype)


def special_locations(locations, spatial_shapes):
    """Overwrite some points with borders (0, 1), cell edges and far-away coordinates."""
    locations = locations.clone()
    specials = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.5], [-5.0, 0.5], [0.5, 7.0], [-0.01, 1.01]])
    flat = locations.view(-1, 2)
    flat[: len(specials)] = specials.to(flat)
    flat[-len(specials):] = specials.flip(0).to(flat)
    return locations


def naive_reference(value, spatial_shapes, locations, weights):
    """Direct bilinear sampling with zero padding, point by point (float64, tiny inputs only)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, head_dim, dtype=torch.float64)
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (height, width) in enumerate(spatial_shapes):
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0].item() * width - 0.5
                        y = locations[b, q, m, lvl, p, 1].item() * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi, xi, coeff in (
                            (y0, x0, (1 - (x - x0)) * (1 - (y - y0))),
                            (y0, x0 + 1, (x - x0) * (1 - (y - y0))),
                            (y0 + 1, x0, (1 - (x - x0)) * (y - y0)),
                            (y0 + 1, x0 + 1, (x - x0) * (y - y0)),
                        ):
                            if 0 <= xi < width and 0 <= yi < height:
                                row = value[b, starts[lvl] + yi * width + xi, m].double()
                                out[b, q, m] += weights[b, q, m, lvl, p].item() * coeff * row
    return out.view(batch, queries, heads * head_dim)


SHAPE_SETS = {
    "three_levels": [(5, 7), (3, 4), (2, 2)],
    "four_levels_with_1x1": [(6, 6), (3, 3), (2, 2), (1, 1)],
    "one_level_wide": [(2, 9)],
}


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference, CPU gather and dispatch (always run)
# ---------------------------------------------------------------------------------------------------------------


IMPLEMENTATIONS = {"pytorch": multi_scale_deformable_attention_pytorch, "gather": multi_scale_deformable_attention_gather}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
def test_cpu_paths_match_point_by_point_sampling(shapes, implementation):
    value, locations, weights = make_inputs(shapes, queries=4, dtype=torch.float64)
    locations = special_locations(locations.double(), shapes)
    expected = naive_reference(value, shapes, locations, weights)
    got = implementation(value, shapes, locations, weights)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS.values(), ids=IMPLEMENTATIONS.keys())
def test_cpu_paths_gradients_are_correct(implementation):
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes, batch=1, queries=3, points=2, dtype=torch.float64)
    inputs = (value.requires_grad_(), locations.double().requires_grad_(), weights.requires_grad_())
    assert torch.autograd.gradcheck(lambda v, loc, w: implementation(v, shapes, loc, w), inputs)


def test_gather_float64_indices_for_big_tables(monkeypatch):
    """Above FLOAT32_EXACT_LIMIT table rows the indices are built in float64: same result."""
    shapes = SHAPE_SETS["four_levels_with_1x1"]
    value, locations, weights = make_inputs(shapes, queries=9)
    locations = special_locations(locations, shapes)
    expected = multi_scale_deformable_attention_gather(value, shapes, locations, weights)
    monkeypatch.setattr(ms_deform_attn_gather, "FLOAT32_EXACT_LIMIT", 8)
    torch.testing.assert_close(multi_scale_deformable_attention_gather(value, shapes, locations, weights), expected)


def test_gather_non_finite_locations_stay_in_their_query():
    """A NaN/inf location (from a NaN image) must not index outside the table; the other queries are unaffected."""
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes)
    locations[0, 1] = float("nan")
    locations[1, 2, 0, 0, 0] = torch.tensor([float("inf"), float("-inf")])
    got = multi_scale_deformable_attention_gather(value, shapes, locations, weights)
    reference = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    assert got[0, 1].isnan().all()
    clean = torch.ones(got.shape[:2], dtype=torch.bool)
    clean[0, 1] = clean[1, 2] = False
    torch.testing.assert_close(got[clean], reference[clean])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gather_half_precision_on_cpu(dtype):
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes)
    expected = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    got = multi_scale_deformable_attention_gather(value.to(dtype), shapes, locations.to(dtype), weights.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=0.05, rtol=0.02)


def test_dispatch_on_cpu_gather_without_autograd_reference_with_it():
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes)
    reference = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    forced = os.environ.get("ALIGN_DETR_MSDA_IMPL")
    if forced is None:
        assert implementation_for(value) == "gather"
        with torch.inference_mode():
            assert implementation_for(value) == "gather"
        assert implementation_for(value.clone().requires_grad_()) == "pytorch"  # the gather's backward is slower
        with torch.no_grad():
            assert implementation_for(value.clone().requires_grad_()) == "gather"
    torch.testing.assert_close(multi_scale_deformable_attention(value, shapes, locations, weights), reference)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = multi_scale_deformable_attention(inputs[0], shapes, inputs[1], inputs[2])
    assert out.grad_fn is not None
    torch.testing.assert_close(out, reference)


def test_dispatch_never_gathers_when_exporting_compiling_or_forced(monkeypatch):
    from align_detr_hf import ms_deform_attn

    value, _, _ = make_inputs(SHAPE_SETS["three_levels"])
    monkeypatch.setattr(ms_deform_attn, "_FORCED_IMPL", None)
    assert implementation_for(value) == "gather"
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_exporting", lambda: True)
        assert implementation_for(value) == "pytorch"
    with monkeypatch.context() as patch:
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert implementation_for(value) == "pytorch"
    monkeypatch.setattr(ms_deform_attn, "_FORCED_IMPL", "pytorch")  # ALIGN_DETR_MSDA_IMPL=pytorch
    assert implementation_for(value) == "pytorch"


def test_package_imports_without_triton():
    """A fresh interpreter with triton hidden: the model builds and runs on the PyTorch path."""
    code = (
        "import sys; sys.modules['triton'] = None  # import triton now fails, find_spec('triton') is None\n"
        "import torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import tiny_config\n"
        "from align_detr_hf import AlignDetrForObjectDetection\n"
        "from align_detr_hf import ms_deform_attn\n"
        "assert ms_deform_attn._triton_impl is None\n"
        "model = AlignDetrForObjectDetection(tiny_config()).eval()\n"
        "with torch.no_grad(): out = model(torch.randn(1, 3, 64, 64))\n"
        "assert out.logits.shape == (1, 12, 3)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "ALIGN_DETR_MSDA_IMPL": "", "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parent.parent, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Dispatch robustness: a kernel that cannot build or launch falls back (simulated on CPU), runtime switch
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def pretend_kernel_applies(monkeypatch):
    """Pretend CPU tensors are ones the kernel serves, with fresh dispatch state; yields the module."""
    from align_detr_hf import ms_deform_attn

    monkeypatch.setattr(ms_deform_attn, "_FORCED_IMPL", None)
    monkeypatch.setattr(ms_deform_attn, "_kernel_supports", lambda *tensors: True)
    monkeypatch.setattr(ms_deform_attn, "_kernel_proven", False)
    monkeypatch.setattr(ms_deform_attn, "_fallback_warned", False)
    monkeypatch.setattr(ms_deform_attn, "_custom_kernels_enabled", True)
    return ms_deform_attn


def test_kernel_failing_on_first_call_warns_once_and_falls_back(pretend_kernel_applies, monkeypatch):
    ms_deform_attn = pretend_kernel_applies
    calls = []

    def broken_kernel(*args):  # what an unsupported GPU / missing compiler looks like from Python
        calls.append(1)
        raise RuntimeError("triton.compiler.errors.CompilationError: PTX version not supported by the driver")

    monkeypatch.setattr(ms_deform_attn, "_triton_impl", broken_kernel)
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes)
    expected = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    with pytest.warns(RuntimeWarning, match="failed on its first call.*PTX version.*using the PyTorch path"):
        first = multi_scale_deformable_attention(value, shapes, locations, weights)
    torch.testing.assert_close(first, expected, atol=0, rtol=0)
    assert implementation_for(value) == "gather"  # the CPU path without the kernel (these inputs need no grad)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        second = multi_scale_deformable_attention(value, shapes, locations, weights)
    torch.testing.assert_close(second, expected)
    assert len(calls) == 1  # the broken kernel is not retried


def test_kernel_that_worked_once_is_trusted_and_later_errors_raise(pretend_kernel_applies, monkeypatch):
    ms_deform_attn = pretend_kernel_applies
    outcomes = iter(["ok", "fail"])

    def flaky_kernel(value, shapes, locations, weights):
        if next(outcomes) == "fail":
            raise RuntimeError("illegal memory access")
        return multi_scale_deformable_attention_pytorch(value, shapes, locations, weights) + 1.0

    monkeypatch.setattr(ms_deform_attn, "_triton_impl", flaky_kernel)
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes)
    expected = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights) + 1.0
    torch.testing.assert_close(multi_scale_deformable_attention(value, shapes, locations, weights), expected)
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a real error is not hidden
        multi_scale_deformable_attention(value, shapes, locations, weights)


def test_forced_kernel_and_out_of_memory_errors_are_not_swallowed(pretend_kernel_applies, monkeypatch):
    ms_deform_attn = pretend_kernel_applies
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes)

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ms_deform_attn, "_triton_impl", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        multi_scale_deformable_attention(value, shapes, locations, weights)

    def broken_kernel(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(ms_deform_attn, "_triton_impl", broken_kernel)
    monkeypatch.setattr(ms_deform_attn, "_FORCED_IMPL", "triton")  # ALIGN_DETR_MSDA_IMPL=triton: asked for, so raise
    with pytest.raises(RuntimeError, match="no compiler"):
        multi_scale_deformable_attention(value, shapes, locations, weights)


def test_runtime_switch_and_export_keep_the_kernel_out(pretend_kernel_applies, monkeypatch):
    ms_deform_attn = pretend_kernel_applies

    def marked_kernel(value, shapes, locations, weights):
        return multi_scale_deformable_attention_pytorch(value, shapes, locations, weights) + 1.0

    monkeypatch.setattr(ms_deform_attn, "_triton_impl", marked_kernel)
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes)
    reference = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    assert implementation_for(value) == "triton"
    with ms_deform_attn.custom_kernels_disabled():
        assert implementation_for(value) == "gather"  # the CPU path without the kernel
        torch.testing.assert_close(multi_scale_deformable_attention(value, shapes, locations, weights), reference)
    assert ms_deform_attn.custom_kernels_enabled()
    ms_deform_attn.set_custom_kernels_enabled(False)
    assert implementation_for(value) == "gather"
    ms_deform_attn.set_custom_kernels_enabled(True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # what torch.export / the ONNX exporter set
    assert implementation_for(value) == "pytorch"


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (CPU)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the driver of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]' brings it)")
def test_triton_kernels_in_interpreter():
    """Runs the `interpret` tests below in a subprocess with TRITON_INTERPRET=1 set before triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "ALIGN_DETR_MSDA_IMPL": ""}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreter_"],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"interpreter run ({time.perf_counter() - start:.1f}s): {summary}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary, summary


def _compare(value, shapes, locations, weights, grad_dtype_tol):
    """Triton op vs the PyTorch op on float32 copies of the same (rounded) inputs: values and all gradients."""
    from align_detr_hf.ms_deform_attn_triton import multi_scale_deformable_attention_triton

    atol, rtol = grad_dtype_tol
    inputs = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    reference_inputs = [t.detach().float().clone().requires_grad_() for t in (value, locations, weights)]
    out = multi_scale_deformable_attention_triton(inputs[0], shapes, inputs[1], inputs[2])
    expected = multi_scale_deformable_attention_pytorch(reference_inputs[0], shapes, *reference_inputs[1:])
    assert out.dtype == value.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    got_grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad)
    for name, got, want, original in zip(("value", "locations", "weights"), got_grads, expected_grads, inputs):
        assert got.dtype == original.dtype, name
        scale = max(1.0, want.abs().max().item())  # location gradients scale with the map size
        torch.testing.assert_close(got.float(), want, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@interpret
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
def test_interpreter_matches_pytorch_float32(shapes):
    value, locations, weights = make_inputs(shapes)
    _compare(value, shapes, special_locations(locations, shapes), weights, (1e-5, 1e-5))


@interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_interpreter_matches_pytorch_half(dtype):
    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes, dtype=dtype)
    tol = (2e-2, 2e-2) if dtype == torch.bfloat16 else (3e-3, 3e-3)
    _compare(value, shapes, special_locations(locations, shapes), weights, tol)


@interpret
def test_interpreter_padding_like_zeros_and_odd_sizes():
    """Zeroed value rows (padding), zero weights, head_dim not a power of two, more queries than one block."""
    shapes = [(4, 5), (2, 3)]
    value, locations, weights = make_inputs(shapes, batch=2, heads=3, head_dim=6, queries=70, points=2)
    value[1, 10:] = 0.0
    weights[0, :5] = 0.0
    _compare(value, shapes, locations, weights, (1e-5, 1e-5))


@interpret
def test_interpreter_opcheck_and_compile_without_graph_break():
    from align_detr_hf.ms_deform_attn_triton import ms_deform_attn_op, multi_scale_deformable_attention_triton

    shapes = SHAPE_SETS["three_levels"]
    value, locations, weights = make_inputs(shapes, batch=1, queries=3)
    args = (value.requires_grad_(), [s for shape in shapes for s in shape], locations.requires_grad_(),
            weights.requires_grad_())
    torch.library.opcheck(ms_deform_attn_op, args)

    def f(v, loc, w):
        return multi_scale_deformable_attention_triton(v, shapes, loc, w).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(*(args[0], args[2], args[3]))
    loss.backward()
    torch.testing.assert_close(loss, f(args[0], args[2], args[3]))


@interpret
def test_interpreter_dispatch_in_the_model(monkeypatch):
    """The tiny model with the kernel forced into the dispatch point matches the PyTorch path, with gradients."""
    from align_detr_hf import AlignDetrForObjectDetection, ms_deform_attn
    from align_detr_hf.ms_deform_attn_triton import multi_scale_deformable_attention_triton

    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    pixels = torch.randn(1, 3, 48, 64)
    eager = model(pixels)
    eager.logits.sum().backward()
    expected_grad = model.model.encoder.layers[0].self_attn.value_proj.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr(ms_deform_attn, "_triton_impl", multi_scale_deformable_attention_triton)
    monkeypatch.setattr(ms_deform_attn, "_FORCED_IMPL", "triton")
    assert implementation_for(pixels) == "triton"
    fused = model(pixels)
    fused.logits.sum().backward()
    torch.testing.assert_close(fused.logits, eager.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.pred_boxes, eager.pred_boxes, atol=1e-5, rtol=1e-4)
    grad = model.model.encoder.layers[0].self_attn.value_proj.weight.grad
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shapes", [SHAPE_SETS["three_levels"], [(64, 80), (32, 40), (16, 20), (8, 10)]],
                         ids=["small", "dino_like"])
def test_cuda_kernel_matches_pytorch(dtype, shapes):
    value, locations, weights = make_inputs(shapes, batch=2, heads=8, head_dim=32, queries=300, points=4,
                                            dtype=dtype, device="cuda")
    locations = special_locations(locations, shapes)
    tol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (4e-3, 4e-3)}[dtype]
    _compare(value, shapes, locations, weights, tol)


@gpu
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_dispatch_picks_triton_and_compiles_fullgraph():
    shapes = [(16, 20), (8, 10), (4, 5), (2, 3)]
    value, locations, weights = make_inputs(shapes, heads=8, head_dim=32, queries=50, points=4, device="cuda")
    assert implementation_for(value) == "triton"
    torch._dynamo.reset()
    compiled = torch.compile(lambda v, l, w: multi_scale_deformable_attention(v, shapes, l, w), fullgraph=True)
    torch.testing.assert_close(compiled(value, locations, weights),
                               multi_scale_deformable_attention_pytorch(value, shapes, locations, weights),
                               atol=1e-4, rtol=1e-4)


@gpu
def test_cuda_training_loss_synchronises_at_most_once():
    """All matching of one step costs one device->host transfer (the packed cost matrices)."""
    import warnings

    from align_detr_hf import AlignDetrForObjectDetection
    from align_detr_hf.loss_align_detr import AlignDetrLossInputs, decoder_layer_names

    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).cuda().train()
    labels = [{"class_labels": torch.tensor([0, 2], device="cuda"),
               "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]], device="cuda")},
              {"class_labels": torch.tensor([1], device="cuda"),
               "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]], device="cuda")}]
    outputs = model(torch.randn(2, 3, 64, 64, device="cuda"))  # warm-up, no loss
    # the loss takes the per-layer predictions layer-first (L, B, ...); the outputs are batch-first
    loss_inputs = AlignDetrLossInputs(outputs.intermediate_logits.transpose(0, 1),
                                      outputs.intermediate_pred_boxes.transpose(0, 1),
                                      decoder_layer_names(2), outputs.enc_topk_logits, outputs.enc_topk_boxes)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model.loss_function(loss_inputs, labels)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


# ---------------------------------------------------------------------------------------------------------------
# torch.compile of the whole model (CPU, inductor: needs a C++ compiler)
# ---------------------------------------------------------------------------------------------------------------


def _compiled_vs_eager(backend, fullgraph):
    from align_detr_hf import AlignDetrForObjectDetection

    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    pixels = torch.randn(2, 3, 64, 64)
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    mask[1, :, 48:] = 0
    with torch.no_grad():
        eager = model(pixels, mask)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=fullgraph)(pixels, mask)
    for name in ("logits", "pred_boxes", "enc_topk_logits", "encoder_last_hidden_state"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), atol=1e-4, rtol=1e-4, msg=name)
    assert torch.equal(compiled.enc_topk_indices, eager.enc_topk_indices)


def test_compiled_model_has_no_graph_break_and_matches_eager():
    """Dynamo + AOTAutograd (fake tensors, functionalisation) over the whole model in one graph, ~15 s."""
    _compiled_vs_eager("aot_eager", fullgraph=True)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager_on_cpu():
    """Inductor's C++ code generation for the whole model: about 4-6 minutes on a 2-core machine, hence slow."""
    _compiled_vs_eager("inductor", fullgraph=True)
