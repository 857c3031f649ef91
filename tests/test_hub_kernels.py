"""Our deformable-attention op behind transformers' hub-kernel layer `MultiScaleDeformableAttention`
(`align_detr_hf.hub_kernels`), inside transformers' own models.

The Triton kernel runs on CPU in Triton's interpreter: `test_triton_layer_in_interpreter` re-runs this file's
`interpreter_` tests in a subprocess with `TRITON_INTERPRET=1` and `ALIGN_DETR_MSDA_IMPL=triton` (the kernel for CPU
tensors too) set before triton is imported. Tolerances of the model test are measured, not guessed: the same tiny
Deformable DETR runs in float64 (its own PyTorch path) as the truth, and ours must stay within a few times the error
of transformers' own float32 path (measured: ours 0.5-2x theirs, for outputs and every parameter gradient).
"""

import copy
import importlib
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import ResNetConfig

pytest.importorskip("kernels", reason="the `kernels` extra (pip install -e '.[dev]') brings the kernels library")

from align_detr_hf.hub_kernels import (  # noqa: E402
    LAYER_NAME,
    TritonMultiScaleDeformableAttention,
    use_triton_deformable_attention,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ALIGN_DETR_MSDA_IMPL") == "triton"
interpret = pytest.mark.skipif(
    not (IN_INTERPRETER and HAS_TRITON), reason="runs inside test_triton_layer_in_interpreter's subprocess"
)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# transformers models whose sampling op is the hub-kernel layer (transformers 5.25); older releases may lack some
MODELS_WITH_THE_LAYER = (
    "deformable_detr", "rt_detr", "lw_detr", "rf_detr", "grounding_dino", "mm_grounding_dino", "omdet_turbo",
    "pp_doclayout_v2", "pp_doclayout_v3", "pp_doclayout_v4",
)


def tiny_deformable_detr(two_stage=True, seed=0):
    """Two-stage, box-refining Deformable DETR at d_model 32 (nothing downloaded). The sampling offsets are perturbed:
    at initialisation every sampling point sits exactly on a cell border, where the bilinear gradient jumps, so
    float32 and float64 gradients would differ by tens of percent whatever the implementation."""
    torch.manual_seed(seed)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=8,
        num_feature_levels=3, encoder_n_points=2, decoder_n_points=2, two_stage=two_stage,
        with_box_refine=True, two_stage_num_proposals=8, disable_custom_kernels=True, id2label={0: "a", 1: "b"},
    )
    model = transformers.DeformableDetrForObjectDetection(config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "sampling_offsets" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def pixels(batch=2, height=64, width=96, device="cpu"):
    values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, height, width, dtype=torch.long)
    mask[-1, :, width * 2 // 3:] = 0  # padding in the last image
    return values.to(device), mask.to(device)


def outputs_and_gradients(model, dtype, device="cpu"):
    """Logits, boxes and every parameter gradient (float64 copies) of a fixed scalar of the outputs. The scalar
    avoids Hungarian matching, whose discrete choices would flip under float32 noise."""
    model = model.to(device, dtype)
    model.zero_grad()
    values, mask = pixels(device=device)
    out = model(values.to(dtype), pixel_mask=mask)
    weights = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    ((out.logits * weights).sum() + out.pred_boxes.sum()).backward()
    results = {"logits": out.logits, "pred_boxes": out.pred_boxes}
    results.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return {name: tensor.detach().double().cpu() for name, tensor in results.items()}


def assert_within_float32_noise(ours, theirs, truth, factor=4.0):
    """|ours - theirs| <= factor x |theirs - truth| per tensor, plus a floor of 1e-6 of the largest value (tensors
    whose exact value is ~0, such as biases before a normalisation)."""
    assert ours.keys() == theirs.keys() == truth.keys()
    floor = 1e-6 * max(t.abs().max().item() for t in truth.values())
    for name in truth:
        noise = (theirs[name] - truth[name]).abs().max().item()
        difference = (ours[name] - theirs[name]).abs().max().item()
        assert difference <= factor * noise + floor, f"{name}: {difference:.3e} vs float32 noise {noise:.3e}"


def transformers_layer_classes():
    classes = {}
    for name in MODELS_WITH_THE_LAYER:
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            continue
        layer = getattr(module, LAYER_NAME, None)
        if layer is not None:
            classes[name] = layer
    return classes


def layer_inputs(dtype=torch.float32, device="cpu", batch=2, heads=2, head_dim=8, queries=9, points=3):
    shapes = [(5, 7), (3, 4), (2, 2)]
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=generator)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    shapes_tensor = torch.tensor(shapes)
    starts = torch.cat([shapes_tensor.new_zeros(1), shapes_tensor.prod(1).cumsum(0)[:-1]])
    return (value.to(device, dtype), shapes_tensor.to(device), shapes, starts.to(device), locations.to(device, dtype),
            weights.to(device, dtype), 64)


def forward_and_gradients(layer, args):
    """Output and the gradients w.r.t. value, locations and weights, for a fixed output gradient."""
    args = list(args)
    for index in (0, 4, 5):
        args[index] = args[index].detach().clone().requires_grad_()
    out = layer(*args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, [args[0], args[4], args[5]], grad)
    return [out.detach(), *grads]


# ---------------------------------------------------------------------------------------------------------------
# CPU (no interpreter): the layer interface, every model that has the layer, errors
# ---------------------------------------------------------------------------------------------------------------


def test_every_transformers_model_with_the_layer_takes_ours():
    """Each model's MultiScaleDeformableAttention (same signature in all) is kernelized and computes what its own
    forward computes, with gradients (CPU: our grid_sample reference with autograd, the gather without)."""
    classes = transformers_layer_classes()
    assert "deformable_detr" in classes and "rt_detr" in classes
    for name, layer_class in classes.items():
        assert layer_class.kernel_layer_name == LAYER_NAME, name
        layer = layer_class()
        args = layer_inputs()
        expected = forward_and_gradients(layer, args)
        with torch.no_grad():
            expected_no_grad = layer(*args)
        use_triton_deformable_attention(layer)
        assert layer.forward.__func__ is TritonMultiScaleDeformableAttention.forward, name
        for got, want in zip(forward_and_gradients(layer, args), expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        with torch.no_grad():
            torch.testing.assert_close(layer(*args), expected_no_grad, atol=1e-5, rtol=1e-5)


def test_deformable_detr_on_cpu_matches_its_own_path_and_resets():
    model = tiny_deformable_detr()
    truth = outputs_and_gradients(copy.deepcopy(model), torch.float64)
    theirs = outputs_and_gradients(copy.deepcopy(model), torch.float32)
    assert use_triton_deformable_attention(model) is model
    ours = outputs_and_gradients(model, torch.float32)
    assert_within_float32_noise(ours, theirs, truth)
    values, mask = pixels()
    with torch.no_grad():  # inference: the CPU gather
        torch.testing.assert_close(model(values, pixel_mask=mask).logits.double(), theirs["logits"], atol=1e-5,
                                   rtol=1e-5)
    model.reset_kernels()  # transformers' own switch back
    layers = [m for m in model.modules() if getattr(type(m), "kernel_layer_name", None) == LAYER_NAME]
    assert layers and all("forward" not in layer.__dict__ for layer in layers)


def test_other_layers_are_left_alone():
    """Only the deformable-attention layers change; a model without one is refused in one line."""
    model = tiny_deformable_detr()
    before = {name: module.__dict__.get("forward") for name, module in model.named_modules()}
    use_triton_deformable_attention(model)
    changed = {name for name, module in model.named_modules() if module.__dict__.get("forward") is not before[name]}
    assert changed and all(type(model.get_submodule(name)).__name__ == LAYER_NAME for name in changed)
    with pytest.raises(ValueError, match="ResNetModel has no layer registered as 'MultiScaleDeformableAttention'"):
        use_triton_deformable_attention(transformers.ResNetModel(ResNetConfig(depths=[1], hidden_sizes=[8])))


def test_without_kernels_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` now raises ImportError
    with pytest.raises(ImportError, match=r"needs the `kernels` package: pip install 'align-detr-hf\[kernels\]'"):
        use_triton_deformable_attention(tiny_deformable_detr())


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel in the interpreter (CPU)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the driver of the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e '.[dev]' brings it)")
def test_triton_layer_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "ALIGN_DETR_MSDA_IMPL": "triton"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreter_"],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"interpreter run ({time.perf_counter() - start:.1f}s): {summary}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "passed" in summary and "skipped" not in summary, summary


@interpret
def test_interpreter_deformable_detr_outputs_and_gradients_within_float32_noise():
    """Inside transformers' DeformableDetrForObjectDetection (two-stage, box refinement, a padded image): logits,
    boxes and every parameter gradient with the Triton kernel vs its own PyTorch path, float64 as the truth."""
    from align_detr_hf.ms_deform_attn import implementation_for

    model = tiny_deformable_detr()
    truth = outputs_and_gradients(copy.deepcopy(model), torch.float64)
    theirs = outputs_and_gradients(copy.deepcopy(model), torch.float32)
    use_triton_deformable_attention(model)
    assert implementation_for(torch.zeros(1)) == "triton"
    assert_within_float32_noise(outputs_and_gradients(model, torch.float32), theirs, truth)


@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_interpreter_layer_forward_backward_each_dtype(dtype):
    """The kernelized layer in each dtype against transformers' own forward on float32 copies of the same (rounded)
    inputs; output and gradients keep their input's dtype. Tolerances: those of the op's own tests
    (tests/test_ms_deform_attn.py), i.e. the inputs' rounding."""
    from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention

    args = layer_inputs(dtype)
    reference_args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    expected = forward_and_gradients(MultiScaleDeformableAttention(), reference_args)
    layer = use_triton_deformable_attention(MultiScaleDeformableAttention())
    got = forward_and_gradients(layer, args)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    for name, g, want in zip(("output", "value", "locations", "weights"), got, expected):
        assert g.dtype == dtype, name
        scale = max(1.0, want.abs().max().item())  # location gradients scale with the map size
        torch.testing.assert_close(g.float(), want, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


@interpret
def test_interpreter_layer_compiles_without_graph_break():
    layer = use_triton_deformable_attention(
        importlib.import_module("transformers.models.deformable_detr.modeling_deformable_detr")
        .MultiScaleDeformableAttention()
    )
    args = layer_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: layer(*a).square().sum(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), layer(*args).square().sum())


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cuda_deformable_detr_runs_the_kernel_within_float32_noise():
    from align_detr_hf.ms_deform_attn import implementation_for

    model = tiny_deformable_detr()
    truth = outputs_and_gradients(copy.deepcopy(model), torch.float64, "cuda")
    theirs = outputs_and_gradients(copy.deepcopy(model), torch.float32, "cuda")
    use_triton_deformable_attention(model.cuda())
    assert implementation_for(torch.zeros(1, device="cuda")) == "triton"
    assert_within_float32_noise(outputs_and_gradients(model, torch.float32, "cuda"), theirs, truth)
