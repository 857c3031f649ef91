"""What each backbone family needs to export with dynamic height and width (torch.export, ONNX, OpenVINO).

torch.export traces one graph for every size in a range, so a Python `if` on a size (pad when not divisible) must
be decidable for the whole range. ResNet and ConvNeXt have none. transformers' Swin has several (pad to the patch
size, to the window size, to even sizes before merging patches), which the exporter refuses ("Constraints violated
(height, width)"). While exporting, `export_safe_backbone` runs Swin's layers through the same operations written
without those branches: every pad is taken with its amount computed from the size (zero when nothing is missing),
so the traced graph holds for every size and gives the numbers of transformers' code (tests/test_export_backbones.py).

Families without a rule here are refused before tracing, in one line (`check_backbone_exportable`).
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

# families whose dynamic-size export is tested (tests/test_export_backbones.py), and what they need
EXPORTABLE_BACKBONES = {
    "resnet": "as is",
    "convnext": "as is",
    "convnextv2": "as is",
    "swin": "branch-free padding while exporting; sides above 32 x window",
}
# the sides of every exported model lie between min_side(config) and MAX_SIDE
MAX_SIDE = 8192


def min_side(config) -> int:
    """The smallest height and width an export of this model (an AlignDetrConfig) takes and reasons about.

    The traced size arithmetic holds when the coarsest feature level has more than one cell: stride 32 x 2^extra
    levels (65 pixels for the usual 4 levels from 3 backbone stages). ResNet and Swin round their stage sizes up
    (padding), ConvNeXt down (a patchify stem and 2x2 downsampling without padding), so ConvNeXt needs a third stride-32
    cell: 96 pixels. Swin also needs every stage to hold at least two attention windows along each side (torch's
    reshape rules branch on a single window): more than patch x 2^(stages - 1) x window pixels."""
    backbone = config.backbone_config
    extra = max(config.num_feature_levels - len(backbone.out_features), 0)
    coarsest = 32 * 2**extra
    if backbone.model_type in ("convnext", "convnextv2"):
        return 32 * (2**extra + 1)
    side = coarsest + 1
    if backbone.model_type == "swin":
        patch = backbone.patch_size
        patch = max(patch) if isinstance(patch, (tuple, list)) else patch
        side = max(side, patch * 2 ** (len(backbone.depths) - 1) * backbone.window_size + 1)
    return side


def check_backbone_exportable(backbone_config) -> None:
    """Raise a one-line ValueError for a backbone family whose dynamic-size export is not known to work."""
    model_type = getattr(backbone_config, "model_type", None)
    if model_type not in EXPORTABLE_BACKBONES:
        raise ValueError(
            f"the {model_type!r} backbone has no tested dynamic-size export (a size-dependent branch in its code "
            f"would fix the graph to the example's size, or fail the export after minutes); exportable backbones: "
            f"{', '.join(sorted(EXPORTABLE_BACKBONES))}, at heights and widths from 65 (ConvNeXt 96, Swin 32 x "
            f"window + 1) to {MAX_SIDE} pixels."
        )


@contextmanager
def export_safe_backbone(backbone: nn.Module):
    """Within the block, `backbone` (an AutoBackbone) runs code that torch.export can trace at every size."""
    if getattr(backbone.config, "model_type", None) != "swin":
        yield
        return
    patched = []
    for module in backbone.modules():
        kind = type(module).__name__
        if kind == "SwinPatchEmbeddings":
            patched.append((module, "maybe_pad", MethodType(_pad_to_patches, module)))
        elif kind == "SwinPatchMerging":
            patched.append((module, "maybe_pad", MethodType(_pad_to_even, module)))
        elif kind == "SwinLayer":
            patched.append((module, "forward", MethodType(_swin_layer_forward, module)))
    for module, name, method in patched:
        setattr(module, name, method)  # an instance attribute: the class and other models are untouched
    try:
        yield
    finally:
        for module, name, _ in patched:
            delattr(module, name)


def _round_up(size, multiple: int):
    """The smallest multiple of `multiple` >= size, written so that symbolic sizes stay provably divisible."""
    return (size + multiple - 1) // multiple * multiple


def _pad_to_patches(self, pixel_values, height, width):
    patch_height, patch_width = self.patch_size
    missing_width = _round_up(width, patch_width) - width
    missing_height = _round_up(height, patch_height) - height
    return nn.functional.pad(pixel_values, (0, missing_width, 0, missing_height))


def _pad_to_even(self, input_feature, height, width):
    return nn.functional.pad(input_feature, (0, 0, 0, _round_up(width, 2) - width, 0, _round_up(height, 2) - height))


def _windows(hidden_states: torch.Tensor, window: int, batch, height, width) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * H/window * W/window, window * window, C)."""
    channels = hidden_states.shape[-1]
    rows, columns = height // window, width // window
    hidden_states = hidden_states.view(batch, rows, window, columns, window, channels).transpose(2, 3)
    return hidden_states.reshape(batch * rows * columns, window * window, channels)


def _unwindow(windows: torch.Tensor, window: int, batch, height, width) -> torch.Tensor:
    channels = windows.shape[-1]
    windows = windows.view(batch, height // window, width // window, window, window, channels)
    return windows.transpose(2, 3).reshape(batch, height, width, channels)


def _shift_mask(layer, batch, height, width, dtype, device):
    """transformers' `SwinLayer.get_attn_mask`, repeated for each image: (B * windows, window^2, window^2) or None.

    Repeated here rather than broadcast inside the attention, whose `batch = windows // mask windows` the exporter
    cannot simplify."""
    if layer.shift_size <= 0:
        return None
    window, shift = layer.window_size, layer.shift_size
    rows, columns = torch.arange(height, device=device), torch.arange(width, device=device)
    row_region = (rows >= height - window).long() + (rows >= height - shift).long()
    column_region = (columns >= width - window).long() + (columns >= width - shift).long()
    regions = (row_region[None, :, None, None] * 3 + column_region[None, None, :, None]).to(dtype)
    regions = _windows(regions, window, 1, height, width)[..., 0]  # (windows, window^2)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
    count = (height // window) * (width // window)
    return mask[None].expand(batch, count, window * window, window * window).reshape(
        batch * count, window * window, window * window
    )


def _swin_layer_forward(self, hidden_states, input_dimensions, always_partition=False, **kwargs):
    """transformers' `SwinLayer.forward` with `always_partition=True` (what `SwinBackbone` runs), its window padding
    and cropping done unconditionally (the crop as a negative pad, whose size the exporter can simplify)."""
    if not always_partition:
        raise RuntimeError("the export-safe Swin layer serves SwinBackbone (always_partition=True) only.")
    height, width = input_dimensions
    batch, _, channels = hidden_states.shape
    window = self.window_size
    shortcut = hidden_states
    hidden_states = self.layernorm_before(hidden_states).view(batch, height, width, channels)
    height_pad, width_pad = _round_up(height, window), _round_up(width, window)
    pad = (0, 0, 0, width_pad - width, 0, height_pad - height)
    hidden_states = nn.functional.pad(hidden_states, pad)
    windows = _windows(self.cyclic_shift(hidden_states), window, batch, height_pad, width_pad)
    attn_mask = _shift_mask(self, batch, height_pad, width_pad, hidden_states.dtype, windows.device)
    attention_output, attn_weights = self.attention(windows, attn_mask, **kwargs)
    attention_output = self.dropout(attention_output)
    attention_windows = _unwindow(attention_output, window, batch, height_pad, width_pad)
    attention_windows = nn.functional.pad(self.cyclic_shift(attention_windows, reverse=True), [-p for p in pad])
    hidden_states = shortcut + self.drop_path(attention_windows.reshape(batch, height * width, channels))
    residual = hidden_states
    hidden_states = self.mlp(self.layernorm_after(hidden_states))
    return self.dropout(hidden_states) + residual, attn_weights
