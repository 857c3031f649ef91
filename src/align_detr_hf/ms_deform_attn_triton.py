"""Multi-scale deformable attention in Triton: forward and backward kernels, wrapped as a torch custom op.

Importing this module imports `triton`; `ms_deform_attn.py` only does so where it can be used (CUDA present, or
`TRITON_INTERPRET=1` for the interpreter-mode tests on CPU). Set `TRITON_INTERPRET=1` *before* the first import of
triton to run the kernels on CPU tensors with Triton's interpreter (slow: tests only).

Semantics are those of `multi_scale_deformable_attention_pytorch` (bilinear sampling, zero padding,
`align_corners=False`, i.e. pixel coordinate `x * W - 0.5`). Inputs may be float32, bfloat16 or float16 (each
tensor its own dtype); sampling-location math, interpolation and every accumulation are float32, the output has
`value`'s dtype and each gradient its input's dtype. The value gradient is accumulated with float32 atomics.

The op is `torch.ops.align_detr_hf.ms_deform_attn` with a fake (meta) implementation and an autograd formula, its
backward `torch.ops.align_detr_hf.ms_deform_attn_backward`, so `torch.compile(fullgraph=True)` traces through it.
"""

from collections import OrderedDict

import torch
import triton
import triton.language as tl

__all__ = ["multi_scale_deformable_attention_triton", "ms_deform_attn_op", "ms_deform_attn_backward_op"]

_FORWARD_BLOCK_Q, _FORWARD_WARPS = 64, 4
_BACKWARD_BLOCK_Q, _BACKWARD_WARPS = 32, 4


@triton.jit
def _corner(value_base, start, yi, xi, height, width, row_stride, d, d_mask, q_mask):
    """Value rows (BLOCK_Q, BLOCK_D) at integer cells (yi, xi) of one level, zeros outside; and the validity mask."""
    valid = q_mask & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    index = (start + yi * width + xi).to(tl.int64)
    index = tl.where(valid, index, 0)
    mask = valid[:, None] & d_mask[None, :]
    rows = tl.load(value_base + index[:, None] * row_stride + d[None, :], mask=mask, other=0.0).to(tl.float32)
    return rows, index, mask


@triton.jit
def _sample_point(loc_ptr, attn_ptr, point_offset, q_mask, height, width):
    """Attention weight, cell coordinates of the top-left corner and fractional parts of one point (all fp32)."""
    weight = tl.load(attn_ptr + point_offset, mask=q_mask, other=0.0).to(tl.float32)
    loc_x = tl.load(loc_ptr + 2 * point_offset, mask=q_mask, other=0.0).to(tl.float32)
    loc_y = tl.load(loc_ptr + 2 * point_offset + 1, mask=q_mask, other=0.0).to(tl.float32)
    width_f = width.to(tl.float32)
    height_f = height.to(tl.float32)
    # align_corners=False: pixel coordinate x * W - 0.5. Clamping far-away points to just outside the map changes
    # no result (all four corners stay invalid) and keeps the int conversion in range.
    x = tl.minimum(tl.maximum(loc_x * width_f - 0.5, -2.0), width_f + 1.0)
    y = tl.minimum(tl.maximum(loc_y * height_f - 0.5, -2.0), height_f + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return weight, x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@triton.jit
def _msda_forward_kernel(
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    out_ptr,
    num_values,
    num_queries,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    row_stride = num_heads * head_dim
    bqh = (b.to(tl.int64) * num_queries + q) * num_heads + h  # (BLOCK_Q,) row of (B, Q, H)
    value_base = value_ptr + b.to(tl.int64) * num_values * row_stride + h * head_dim
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            point_offset = bqh * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            weight, x0, y0, fx, fy = _sample_point(loc_ptr, attn_ptr, point_offset, q_mask, height, width)
            v00, _, _ = _corner(value_base, start, y0, x0, height, width, row_stride, d, d_mask, q_mask)
            v01, _, _ = _corner(value_base, start, y0, x0 + 1, height, width, row_stride, d, d_mask, q_mask)
            v10, _, _ = _corner(value_base, start, y0 + 1, x0, height, width, row_stride, d, d_mask, q_mask)
            v11, _, _ = _corner(value_base, start, y0 + 1, x0 + 1, height, width, row_stride, d, d_mask, q_mask)
            top = v00 + (v01 - v00) * fx[:, None]
            bottom = v10 + (v11 - v10) * fx[:, None]
            acc += (top + (bottom - top) * fy[:, None]) * weight[:, None]
    out_ptrs = out_ptr + bqh[:, None] * head_dim + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _msda_backward_kernel(
    grad_out_ptr,
    value_ptr,
    shapes_ptr,
    starts_ptr,
    loc_ptr,
    attn_ptr,
    grad_value_ptr,  # float32, zero-initialised, same layout as value
    grad_loc_ptr,  # float32, same layout as the sampling locations
    grad_attn_ptr,  # float32, same layout as the attention weights
    num_values,
    num_queries,
    num_heads,
    head_dim,
    NUM_LEVELS: tl.constexpr,
    NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    row_stride = num_heads * head_dim
    bqh = (b.to(tl.int64) * num_queries + q) * num_heads + h
    value_offset = b.to(tl.int64) * num_values * row_stride + h * head_dim
    value_base = value_ptr + value_offset
    grad_value_base = grad_value_ptr + value_offset
    grad_out = tl.load(
        grad_out_ptr + bqh[:, None] * head_dim + d[None, :], mask=q_mask[:, None] & d_mask[None, :], other=0.0
    ).to(tl.float32)
    for level in tl.static_range(NUM_LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(starts_ptr + level)
        for point in tl.static_range(NUM_POINTS):
            point_offset = bqh * (NUM_LEVELS * NUM_POINTS) + level * NUM_POINTS + point
            weight, x0, y0, fx, fy = _sample_point(loc_ptr, attn_ptr, point_offset, q_mask, height, width)
            v00, i00, m00 = _corner(value_base, start, y0, x0, height, width, row_stride, d, d_mask, q_mask)
            v01, i01, m01 = _corner(value_base, start, y0, x0 + 1, height, width, row_stride, d, d_mask, q_mask)
            v10, i10, m10 = _corner(value_base, start, y0 + 1, x0, height, width, row_stride, d, d_mask, q_mask)
            v11, i11, m11 = _corner(value_base, start, y0 + 1, x0 + 1, height, width, row_stride, d, d_mask, q_mask)
            gx = 1.0 - fx
            gy = 1.0 - fy
            # d(output)/d(attention weight) = the sampled value
            sampled = (v00 * gx[:, None] + v01 * fx[:, None]) * gy[:, None] + (
                v10 * gx[:, None] + v11 * fx[:, None]
            ) * fy[:, None]
            tl.store(grad_attn_ptr + point_offset, tl.sum(grad_out * sampled, axis=1), mask=q_mask)
            # d(output)/d(location): derivative of the bilinear form, times W (H) from x = loc * W - 0.5
            d_fx = (v01 - v00) * gy[:, None] + (v11 - v10) * fy[:, None]
            d_fy = (v10 - v00) * gx[:, None] + (v11 - v01) * fx[:, None]
            grad_x = tl.sum(grad_out * d_fx, axis=1) * weight * width.to(tl.float32)
            grad_y = tl.sum(grad_out * d_fy, axis=1) * weight * height.to(tl.float32)
            tl.store(grad_loc_ptr + 2 * point_offset, grad_x, mask=q_mask)
            tl.store(grad_loc_ptr + 2 * point_offset + 1, grad_y, mask=q_mask)
            # d(output)/d(value): scatter the weighted output gradient onto the four corners
            weighted = grad_out * weight[:, None]
            tl.atomic_add(
                grad_value_base + i00[:, None] * row_stride + d[None, :], weighted * (gx * gy)[:, None], mask=m00
            )
            tl.atomic_add(
                grad_value_base + i01[:, None] * row_stride + d[None, :], weighted * (fx * gy)[:, None], mask=m01
            )
            tl.atomic_add(
                grad_value_base + i10[:, None] * row_stride + d[None, :], weighted * (gx * fy)[:, None], mask=m10
            )
            tl.atomic_add(
                grad_value_base + i11[:, None] * row_stride + d[None, :], weighted * (fx * fy)[:, None], mask=m11
            )


# (spatial shapes, device) -> (shapes (L, 2) int32, level starts (L,) int32) on that device; bounded so
# multi-scale training does not grow it without end, and cached so steady-state calls do no host->device copy
_GEOMETRY_CACHE: "OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()
_GEOMETRY_CACHE_SIZE = 128


def _level_geometry(spatial_shapes: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (tuple(spatial_shapes), str(device))
    cached = _GEOMETRY_CACHE.get(key)
    if cached is None:
        sizes = [spatial_shapes[i] * spatial_shapes[i + 1] for i in range(0, len(spatial_shapes), 2)]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        cached = (
            torch.tensor(spatial_shapes, dtype=torch.int32).to(device),
            torch.tensor(starts, dtype=torch.int32).to(device),
        )
        _GEOMETRY_CACHE[key] = cached
        if len(_GEOMETRY_CACHE) > _GEOMETRY_CACHE_SIZE:
            _GEOMETRY_CACHE.popitem(last=False)
    else:
        _GEOMETRY_CACHE.move_to_end(key)
    return cached


def _check(value, spatial_shapes, sampling_locations, attention_weights):
    batch, num_values, num_heads, _ = value.shape
    num_levels = len(spatial_shapes) // 2
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be (B, Q, H, L, P, 2), got {tuple(sampling_locations.shape)}")
    b, q, h, levels, points, _ = sampling_locations.shape
    if (b, h, levels) != (batch, num_heads, num_levels):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not fit value {tuple(value.shape)} "
            f"and {num_levels} levels"
        )
    if tuple(attention_weights.shape) != (b, q, h, levels, points):
        raise ValueError(f"attention_weights must be {(b, q, h, levels, points)}, got {tuple(attention_weights.shape)}")
    total = sum(spatial_shapes[i] * spatial_shapes[i + 1] for i in range(0, len(spatial_shapes), 2))
    if total != num_values:
        raise ValueError(f"value has {num_values} positions but the spatial shapes cover {total}")


@torch.library.custom_op("align_detr_hf::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (B, S, H, D); spatial_shapes flat [H_0, W_0, H_1, W_1, ...]; returns (B, Q, H * D) in value's dtype."""
    _check(value, spatial_shapes, sampling_locations, attention_weights)
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes, starts = _level_geometry(spatial_shapes, value.device)
    output = value.new_empty(batch, num_queries, num_heads * head_dim)
    if output.numel() == 0:
        return output
    grid = (triton.cdiv(num_queries, _FORWARD_BLOCK_Q), batch * num_heads)
    _msda_forward_kernel[grid](
        value,
        shapes,
        starts,
        sampling_locations,
        attention_weights,
        output,
        num_values,
        num_queries,
        num_heads,
        head_dim,
        NUM_LEVELS=num_levels,
        NUM_POINTS=num_points,
        BLOCK_Q=_FORWARD_BLOCK_Q,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=_FORWARD_WARPS,
    )
    return output


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, sampling_locations, attention_weights):
    batch, _, num_heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], num_heads * head_dim)


@torch.library.custom_op("align_detr_hf::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: list[int],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. value, sampling_locations and attention_weights, each in its input's dtype."""
    grad_output = grad_output.contiguous()
    value = value.contiguous()
    sampling_locations = sampling_locations.contiguous()
    attention_weights = attention_weights.contiguous()
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes, starts = _level_geometry(spatial_shapes, value.device)
    grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    grad_loc = torch.empty(sampling_locations.shape, dtype=torch.float32, device=value.device)
    grad_attn = torch.empty(attention_weights.shape, dtype=torch.float32, device=value.device)
    if grad_loc.numel() > 0 and value.numel() > 0:
        grid = (triton.cdiv(num_queries, _BACKWARD_BLOCK_Q), batch * num_heads)
        _msda_backward_kernel[grid](
            grad_output,
            value,
            shapes,
            starts,
            sampling_locations,
            attention_weights,
            grad_value,
            grad_loc,
            grad_attn,
            num_values,
            num_queries,
            num_heads,
            head_dim,
            NUM_LEVELS=num_levels,
            NUM_POINTS=num_points,
            BLOCK_Q=_BACKWARD_BLOCK_Q,
            BLOCK_D=triton.next_power_of_2(head_dim),
            num_warps=_BACKWARD_WARPS,
        )
    else:
        grad_loc.zero_()
        grad_attn.zero_()
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )


@ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, sampling_locations, attention_weights):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output):
    value, spatial_shapes, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, sampling_locations, attention_weights)
    ctx.spatial_shapes = spatial_shapes


def _backward(ctx, grad_output):
    value, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward_op(
        grad_output, value, ctx.spatial_shapes, sampling_locations, attention_weights
    )
    return grad_value, None, grad_loc, grad_attn


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


def multi_scale_deformable_attention_triton(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same interface as `multi_scale_deformable_attention_pytorch`, run by the Triton kernels."""
    flat = [int(size) for shape in spatial_shapes for size in shape]
    return ms_deform_attn_op(value, flat, sampling_locations, attention_weights)
