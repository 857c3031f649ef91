"""Multi-scale deformable attention as one weighted gather (`F.embedding_bag`): the CPU implementation.

The maths are the grid_sample reference's (bilinear, zero padding, `align_corners=False`); only the order of work
differs. The reference samples every level into a (batch * heads, head_dim, queries, points) tensor and then
weights and sums it, and on CPU those broadcast passes over a small inner dimension cost more than the sampling.
Here each output row (one corner of one query and head) is a single weighted bag of `levels * points` value rows,
gathered and summed by `embedding_bag` without any intermediate tensor; the four bilinear corners are four bags.

Out-of-map corners: every level is stored with a one-cell zero border, so a corner outside the map is clamped onto
the border and reads zeros, exactly grid_sample's `padding_mode="zeros"`.

Indices are built in floating point (float32 below 2**24 table rows, float64 above or for float64 values) from
tensors whose inner dimension is `levels * points`, which keeps every elementwise op vectorised.

It is differentiable, but its backward (embedding_bag's scatter) is not faster than grid_sample's on CPU, so
`ms_deform_attn.py` sends it only calls that need no gradient.
"""

import torch
import torch.nn.functional as F

FLOAT32_EXACT_LIMIT = 2**24  # integers up to here are exact in float32; bigger tables index in float64


def multi_scale_deformable_attention_gather(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Same signature, shapes and result as `multi_scale_deformable_attention_pytorch`."""
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    table, level_starts = _bordered_value_table(value, spatial_shapes)
    rows_per_image = table.shape[0] // batch
    exact_in_float32 = table.shape[0] < FLOAT32_EXACT_LIMIT and value.dtype != torch.float64
    index_dtype = torch.float32 if exact_in_float32 else torch.float64
    locations = sampling_locations.to(index_dtype)

    def per_level(numbers):  # (levels, points), broadcast against (..., levels, points)
        column = torch.tensor(numbers, device=value.device, dtype=index_dtype)[:, None]
        return column.expand(num_levels, num_points).contiguous()

    widths = per_level([width for _, width in spatial_shapes])
    heights = per_level([height for height, _ in spatial_shapes])
    x = locations[..., 0] * widths - 0.5  # pixel coordinates, (batch, queries, heads, levels, points)
    y = locations[..., 1] * heights - 0.5
    with torch.no_grad():
        x_low, y_low = x.floor(), y.floor()
    x_frac, y_frac = x - x_low, y - y_low
    with torch.no_grad():
        # a NaN location (a NaN image) must not become a wild index: it reads a border row, and its NaN weight
        # makes that query's output NaN, as grid_sample's does
        rows = _corner_rows(x_low.nan_to_num(nan=-2.0), y_low.nan_to_num(nan=-2.0), widths, heights, level_starts,
                            rows_per_image, num_heads)
        rows = rows.to(torch.int32 if table.shape[0] < 2**31 else torch.int64)
    weights_y = ((1 - y_frac) * attention_weights, y_frac * attention_weights)
    weights_x = (1 - x_frac, x_frac)
    corner_weights = torch.stack([wy * wx for wy in weights_y for wx in weights_x]).to(value.dtype)
    bags = 4 * batch * num_queries * num_heads
    sampled = F.embedding_bag(
        rows.view(bags, num_levels * num_points),
        table,
        per_sample_weights=corner_weights.view(bags, num_levels * num_points),
        mode="sum",
    )
    return sampled.view(4, batch, num_queries, num_heads * head_dim).sum(0)


def _bordered_value_table(value: torch.Tensor, spatial_shapes) -> tuple[torch.Tensor, list[int]]:
    """(batch * positions * heads, head_dim) rows, each level padded by one zero cell on every side; and the first
    position of each level within an image."""
    batch, _, num_heads, head_dim = value.shape
    levels, starts, start = [], [], 0
    per_level = value.split([height * width for height, width in spatial_shapes], dim=1)
    for level_value, (height, width) in zip(per_level, spatial_shapes):
        grid = level_value.reshape(batch, height, width, num_heads * head_dim)
        levels.append(F.pad(grid, (0, 0, 1, 1, 1, 1)).view(batch, -1, num_heads, head_dim))
        starts.append(start)
        start += (height + 2) * (width + 2)
    return torch.cat(levels, dim=1).view(-1, head_dim), starts


def _corner_rows(x_low, y_low, widths, heights, level_starts, rows_per_image, num_heads) -> torch.Tensor:
    """Table rows of the four bilinear corners, (4, batch, queries, heads, levels, points): top-left, top-right,
    bottom-left, bottom-right, as exact integers in the index dtype."""
    batch, _, _, num_levels, num_points = x_low.shape
    dtype, device = x_low.dtype, x_low.device
    # +1 / +2: the border shifts every cell by one; clamping onto the border reads zeros
    x_rows = [torch.minimum((x_low + shift).clamp_(min=0), widths + 1) * num_heads for shift in (1, 2)]
    image = torch.arange(batch, device=device, dtype=dtype).view(batch, 1, 1, 1) * rows_per_image
    level = torch.tensor(level_starts, device=device, dtype=dtype).view(1, 1, num_levels, 1) * num_heads
    head = torch.arange(num_heads, device=device, dtype=dtype).view(1, num_heads, 1, 1)
    base = (image + level + head).expand(batch, num_heads, num_levels, num_points).unsqueeze(1).contiguous()
    row_stride = (widths + 2) * num_heads
    y_rows = [torch.addcmul(base, torch.minimum((y_low + shift).clamp_(min=0), heights + 1), row_stride)
              for shift in (1, 2)]
    rows = torch.empty((4, *x_low.shape), device=device, dtype=dtype)
    for corner, (y_row, x_row) in enumerate((y, x) for y in y_rows for x in x_rows):
        torch.add(y_row, x_row, out=rows[corner])
    return rows
