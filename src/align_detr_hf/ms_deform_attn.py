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
"""

import torch
import torch.nn.functional as F


def multi_scale_deformable_attention_pytorch(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    value_per_level = value.split([height * width for height, width in spatial_shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        # (batch * heads, head_dim, H, W)
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, height, width)
        # (batch * heads, queries, points, 2)
        grid_l = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (batch * heads, 1, queries, levels * points)
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Dispatch: a fused kernel where one is available for these inputs, else the pure-PyTorch path."""
    return multi_scale_deformable_attention_pytorch(value, spatial_shapes, sampling_locations, attention_weights)
