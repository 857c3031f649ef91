"""Multi-scale deformable attention: the sampling op behind a small interface.

`multi_scale_deformable_attention` is what the model calls. It picks the fastest implementation available for the
inputs and falls back to the pure-PyTorch reference, `multi_scale_deformable_attention_pytorch`, which is written
with `grid_sample` exactly as mmcv's CPU path (bilinear, zero padding, `align_corners=False`).

Shapes:
    value:              (batch, num_values, num_heads, head_dim), num_values = sum(H_l * W_l)
    spatial_shapes:     list of (H_l, W_l) Python ints, one per level
    sampling_locations: (batch, num_queries, num_heads, num_levels, num_points, 2), (x, y) in [0, 1]
    attention_weights:  (batch, num_queries, num_heads, num_levels, num_points), softmaxed over levels x points
    returns:            (batch, num_queries, num_heads * head_dim)

Implementations, picked per call by `multi_scale_deformable_attention`:
    "triton":  `ms_deform_attn_triton.py`, fused forward/backward kernels registered as the torch custom op
               `torch.ops.align_detr_hf.ms_deform_attn` (no graph break under torch.compile). Used for CUDA
               tensors of dtype float32/bfloat16/float16 when triton is importable.
    "gather":  `ms_deform_attn_gather.py`, one `embedding_bag` per call: 3-5x faster than grid_sample on CPU in
               the forward pass, but its backward is not faster, so it serves CPU calls that need no gradient
               (inference), in eager mode.
    "pytorch": `multi_scale_deformable_attention_pytorch`, everywhere else (training on CPU, other devices,
               export, torch.compile, which fuses its weighting passes).
The environment variable `ALIGN_DETR_MSDA_IMPL` (read at import) forces one: "pytorch" uses only the reference,
"triton" also imports triton without CUDA (with `TRITON_INTERPRET=1` the kernels then run on CPU tensors, slowly:
tests only). `TRITON_INTERPRET=1` alone makes triton importable on CPU too but the CPU default stays "pytorch".

Runtime switch (like transformers' `disable_custom_kernels`, timm's `set_exportable`): `set_custom_kernels_enabled
(False)` or `with custom_kernels_disabled():` makes every call take the PyTorch path. Exporters (ONNX, torch.export)
also get the PyTorch path automatically, so the Triton kernel is never in an exported graph.

Robustness: when the kernel fails to import, or raises on its first call (a Triton compile error, an old driver, an
unsupported GPU), the module warns once (`RuntimeWarning`) and uses the PyTorch path from then on. Errors of later
calls, out-of-memory errors, and any error under `ALIGN_DETR_MSDA_IMPL=triton` are raised as they are.
"""

import importlib.util
import os
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .ms_deform_attn_gather import multi_scale_deformable_attention_gather

_FORCED_IMPL = os.environ.get("ALIGN_DETR_MSDA_IMPL", "").strip().lower() or None
if _FORCED_IMPL not in (None, "pytorch", "triton"):
    raise ValueError(f"ALIGN_DETR_MSDA_IMPL must be 'pytorch' or 'triton', got {_FORCED_IMPL!r}")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _load_triton_impl():
    """The Triton implementation, or None. Only imported where it can run (CUDA, or the interpreter)."""
    if _FORCED_IMPL == "pytorch" or importlib.util.find_spec("triton") is None:
        return None
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if not (torch.cuda.is_available() or interpret or _FORCED_IMPL == "triton"):
        return None
    try:
        from . import ms_deform_attn_triton
    except Exception as error:  # a broken triton install must not break the model
        _warn_fallback(f"the Triton kernel could not be imported ({type(error).__name__}: {error})")
        return None
    return ms_deform_attn_triton.multi_scale_deformable_attention_triton


_fallback_warned = False


def _warn_fallback(reason: str) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"Align-DETR deformable attention: {reason}; using the PyTorch path (grid_sample) instead.",
            RuntimeWarning,
            stacklevel=3,
        )


_triton_impl = _load_triton_impl()
_kernel_proven = False  # set by the first kernel call that returns; until then a failure falls back
_custom_kernels_enabled = True


def set_custom_kernels_enabled(enabled: bool) -> None:
    """Allow (True, the default) or forbid (False) the Triton kernel for all later calls."""
    global _custom_kernels_enabled
    _custom_kernels_enabled = bool(enabled)


def custom_kernels_enabled() -> bool:
    return _custom_kernels_enabled


@contextmanager
def custom_kernels_disabled():
    """Within this block every call takes the PyTorch path (exporting, debugging); restores the setting after."""
    previous = _custom_kernels_enabled
    set_custom_kernels_enabled(False)
    try:
        yield
    finally:
        set_custom_kernels_enabled(previous)


def multi_scale_deformable_attention_pytorch(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([height * width for height, width in spatial_shapes], dim=1)
    # grid_sample wants [-1, 1] and the grid in the value's dtype: a half/bf16 model computes in its own dtype
    # (locations arrive in float32 from the float32 reference points; a no-op for float32 and under autocast)
    sampling_grids = (2 * sampling_locations - 1).to(value.dtype)
    # (batch * heads, 1, queries, levels, points)
    weights = attention_weights.to(value.dtype).transpose(1, 2)
    weights = weights.reshape(batch * num_heads, 1, num_queries, num_levels, num_points)
    output = None
    for level, (height, width) in enumerate(spatial_shapes):
        # (batch * heads, head_dim, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, height, width)
        # (batch * heads, queries, points, 2)
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (batch * heads, head_dim, queries, points), weighted and summed per level: no stacked copy of all levels
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        contribution = (sampled * weights[:, :, :, level]).sum(-1)
        output = contribution if output is None else output + contribution
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Dispatch: the Triton kernel where it can run these inputs, the gather on CPU without autograd, else the
    pure-PyTorch reference."""
    if not _use_triton(value, sampling_locations, attention_weights):
        if _use_gather(value, sampling_locations, attention_weights):
            return multi_scale_deformable_attention_gather(value, spatial_shapes, sampling_locations, attention_weights)
        return multi_scale_deformable_attention_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    if _kernel_proven or _FORCED_IMPL == "triton" or torch.compiler.is_compiling():
        # under torch.compile the op is only traced here; the eager first call is where a broken kernel shows
        return _triton_impl(value, spatial_shapes, sampling_locations, attention_weights)
    return _first_kernel_call(value, spatial_shapes, sampling_locations, attention_weights)


def _first_kernel_call(value, spatial_shapes, sampling_locations, attention_weights):
    """Run the kernel once; if it cannot compile or launch here, warn once and switch to the PyTorch path."""
    global _triton_impl, _kernel_proven
    try:
        output = _triton_impl(value, spatial_shapes, sampling_locations, attention_weights)
    except torch.cuda.OutOfMemoryError:
        raise  # the inputs' fault, not the kernel's: the PyTorch path would need more memory still
    except Exception as error:
        _triton_impl = None
        _warn_fallback(f"the Triton kernel failed on its first call ({type(error).__name__}: {error})")
        return multi_scale_deformable_attention_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
    _kernel_proven = True
    return output


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


def _use_triton(value, sampling_locations, attention_weights) -> bool:
    if _triton_impl is None or not _custom_kernels_enabled or _exporting():
        return False
    return _FORCED_IMPL == "triton" or _kernel_supports(value, sampling_locations, attention_weights)


def _use_gather(value, sampling_locations, attention_weights) -> bool:
    if _FORCED_IMPL == "pytorch" or value.device.type != "cpu" or _exporting() or torch.compiler.is_compiling():
        return False
    needs_grad = any(t.requires_grad for t in (value, sampling_locations, attention_weights))
    return not (needs_grad and torch.is_grad_enabled())


def _kernel_supports(value, sampling_locations, attention_weights) -> bool:
    return (
        value.is_cuda
        and value.dtype in _KERNEL_DTYPES
        and sampling_locations.dtype in _KERNEL_DTYPES
        and attention_weights.dtype in _KERNEL_DTYPES
    )


def implementation_for(value: torch.Tensor) -> str:
    """Which implementation `multi_scale_deformable_attention` uses for `value` (same-dtype inputs)."""
    if _use_triton(value, value, value):
        return "triton"
    return "gather" if _use_gather(value, value, value) else "pytorch"
