"""mmdetection's SwinTransformer -> transformers' SwinBackbone: parity with mmdetection's own backbone outputs, at the
fixture's size and at odd and tiny sizes (against an mmdetection-style reference written here), and the tensor
transforms (q/k/v split, patch-merging channel order, relative-position index)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, SMALL
from transformers import AutoBackbone, AutoConfig

from align_detr_hf.convert_mmdet_backbones import (
    ConversionError,
    backbone_config_from_state_dict,
    convert_backbone_state_dict,
    reorder_merged_vector,
    reorder_merged_weight,
    swin_relative_position_index,
)

SWIN = FIXTURES / "swin_small"
FEATURES_ATOL = 1e-5  # measured against mmdetection: 3.5e-6 (fixture README suggests 1e-4)


@pytest.fixture(scope="module")
def swin_state_dict(swin_small_state_dict):
    """The swin_small fixture's backbone weights, mmdetection names without the `backbone.` prefix."""
    return {k.removeprefix("backbone."): v for k, v in swin_small_state_dict.items() if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def swin_backbone(swin_state_dict):
    settings = backbone_config_from_state_dict(swin_state_dict, [32, 64, 128, 256])
    config = AutoConfig.for_model(settings.pop("model_type"), **settings, drop_path_rate=0.0)
    model = AutoBackbone.from_config(config)
    converted, unmatched = convert_backbone_state_dict(swin_state_dict, config)
    assert unmatched == []
    model.load_state_dict(converted, strict=True)
    return model.eval()


def test_architecture_is_read_off_the_shapes(swin_state_dict):
    config = backbone_config_from_state_dict(swin_state_dict, [32, 64, 128, 256])
    assert config == {
        "model_type": "swin", "num_channels": 3, "patch_size": 4, "embed_dim": 32, "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 4, 8], "window_size": 7, "mlp_ratio": 4.0, "qkv_bias": True,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    }  # fmt: skip
    three_levels = {k: v for k, v in swin_state_dict.items() if not k.startswith("norm0.")}
    three_level_config = backbone_config_from_state_dict(three_levels, [64, 128, 256])
    assert three_level_config["out_features"] == ["stage2", "stage3", "stage4"]
    with pytest.raises(ConversionError, match=r"neck takes \[32, 64, 128\] channels"):
        backbone_config_from_state_dict(swin_state_dict, [32, 64, 128])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_backbone_features_match_mmdetection(swin_backbone, mode):
    """All four levels of mmdetection's SwinTransformer on the fixture batch (160x224: the last stage is 5x7, smaller
    than the 7x7 window, padded and still shifted as in mmdetection)."""
    pixel_values = torch.load(SMALL / "inputs.pt", weights_only=True)["pixel_values"]
    reference = torch.load(SWIN / "backbone.pt", weights_only=True)["features"]
    swin_backbone.train(mode == "train")  # no dropout or drop-path in this model: the same numbers
    try:
        with torch.no_grad():
            features = swin_backbone(pixel_values).feature_maps
    finally:
        swin_backbone.eval()
    assert [tuple(f.shape) for f in features] == [(2, 32, 40, 56), (2, 64, 20, 28), (2, 128, 10, 14), (2, 256, 5, 7)]
    for ours, theirs in zip(features, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=FEATURES_ATOL, rtol=0)


# ---------------------------------------------------------------- an mmdetection-style Swin, written from its README


def _layer_norm(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)


def _shift_mask(height, width, window, shift):
    """mmdetection's 9-region mask of a shifted window, on the padded map: -100 between regions."""
    regions = torch.zeros(height, width)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[rows, cols] = count
            count += 1
    windows = regions.view(height // window, window, width // window, window).permute(0, 2, 1, 3).reshape(-1, window**2)
    return (windows[:, None, :] - windows[:, :, None]).ne(0).float() * -100.0


def _mmdet_block(tokens, height, width, sd, prefix, shift):
    """norm1, zero-pad to window multiples (padding not masked), roll, window attention with the saved index,
    unroll, crop, residual; then norm2, FFN (exact GELU), residual."""
    batch, _, channels = tokens.shape
    table = sd[prefix + "attn.w_msa.relative_position_bias_table"]
    index = sd[prefix + "attn.w_msa.relative_position_index"]
    heads, window = table.shape[1], int(index.shape[0] ** 0.5)
    x = _layer_norm(tokens, sd, prefix + "norm1").view(batch, height, width, channels)
    x = F.pad(x, (0, 0, 0, -width % window, 0, -height % window))
    padded_h, padded_w = x.shape[1:3]
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    windows = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, window**2, channels)
    qkv = F.linear(windows, sd[prefix + "attn.w_msa.qkv.weight"], sd[prefix + "attn.w_msa.qkv.bias"])
    q, k, v = qkv.view(len(windows), window**2, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (channels // heads) ** -0.5) @ k.transpose(-2, -1)
    attn = attn + table[index.view(-1)].view(window**2, window**2, heads).permute(2, 0, 1)
    if shift:
        num_windows = (padded_h // window) * (padded_w // window)
        mask = _shift_mask(padded_h, padded_w, window, shift)
        attn = (attn.view(batch, num_windows, heads, window**2, window**2) + mask[None, :, None]).flatten(0, 1)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(len(windows), window**2, channels)
    out = F.linear(out, sd[prefix + "attn.w_msa.proj.weight"], sd[prefix + "attn.w_msa.proj.bias"])
    out = out.view(batch, padded_h // window, padded_w // window, window, window, channels)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    tokens = tokens + out[:, :height, :width].reshape(batch, height * width, channels)
    hidden = F.gelu(F.linear(_layer_norm(tokens, sd, prefix + "norm2"), sd[prefix + "ffn.layers.0.0.weight"],
                             sd[prefix + "ffn.layers.0.0.bias"]))  # fmt: skip
    return tokens + F.linear(hidden, sd[prefix + "ffn.layers.1.weight"], sd[prefix + "ffn.layers.1.bias"])


def mmdet_swin_features(sd, pixel_values):
    """mmdetection's SwinTransformer forward (patch embedding with corner padding, blocks, Unfold patch merging with
    even padding, output norms) on mmdetection-named weights."""
    patch = sd["patch_embed.projection.weight"].shape[-1]
    height, width = pixel_values.shape[-2:]
    x = F.pad(pixel_values, (0, -width % patch, 0, -height % patch))
    x = F.conv2d(x, sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"], stride=patch)
    batch, _, height, width = x.shape
    tokens = _layer_norm(x.flatten(2).transpose(1, 2), sd, "patch_embed.norm")
    features, stage = [], 0
    while f"stages.{stage}.blocks.0.norm1.weight" in sd:
        block = 0
        while f"stages.{stage}.blocks.{block}.norm1.weight" in sd:
            window = int(sd[f"stages.{stage}.blocks.{block}.attn.w_msa.relative_position_index"].shape[0] ** 0.5)
            shift = window // 2 if block % 2 else 0
            tokens = _mmdet_block(tokens, height, width, sd, f"stages.{stage}.blocks.{block}.", shift)
            block += 1
        channels = tokens.shape[-1]
        if f"norm{stage}.weight" in sd:
            out = _layer_norm(tokens, sd, f"norm{stage}")
            features.append(out.view(batch, height, width, channels).permute(0, 3, 1, 2))
        if f"stages.{stage}.downsample.reduction.weight" in sd:
            grid = tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)
            grid = F.pad(grid, (0, width % 2, 0, height % 2))
            merged = F.unfold(grid, kernel_size=2, stride=2).transpose(1, 2)  # channel-major: c * 4 + dy * 2 + dx
            merged = _layer_norm(merged, sd, f"stages.{stage}.downsample.norm")
            tokens = F.linear(merged, sd[f"stages.{stage}.downsample.reduction.weight"])
            height, width = (height + 1) // 2, (width + 1) // 2
        stage += 1
    return features


def test_reference_reproduces_mmdetection(swin_state_dict):
    """The reference below is only trusted because it reproduces mmdetection's stored outputs."""
    pixel_values = torch.load(SMALL / "inputs.pt", weights_only=True)["pixel_values"]
    reference = torch.load(SWIN / "backbone.pt", weights_only=True)["features"]
    with torch.no_grad():
        features = mmdet_swin_features(swin_state_dict, pixel_values)
    for ours, theirs in zip(features, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=FEATURES_ATOL, rtol=0)


@pytest.mark.parametrize(
    "size",
    [
        (70, 90),  # patch padding (72x92), odd maps (9x12 -> 5x6 -> 3x3): merge padding, every map < window
        (32, 32),  # 8x8, 4x4, 2x2, 1x1: windows far larger than the maps, still shifted in mmdetection
        (250, 36),  # tall and narrow: one window wide, several high
    ],
)
def test_odd_and_tiny_inputs_match_mmdetection_style_reference(swin_backbone, swin_state_dict, size):
    """transformers' Swin would shrink the window and switch the shift off on maps not larger than the window
    (`always_partition=False`); SwinBackbone must not, or these maps would differ from mmdetection's."""
    torch.manual_seed(0)
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = swin_backbone(pixel_values).feature_maps
        theirs = mmdet_swin_features(swin_state_dict, pixel_values)
    assert [f.shape for f in ours] == [f.shape for f in theirs]
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=FEATURES_ATOL, rtol=0)
    blocks = [block for stage in swin_backbone.swin.encoder.layers for block in stage.blocks]
    assert [(b.window_size, b.shift_size) for b in blocks] == [(7, 0), (7, 3)] * 4  # never clamped


# ------------------------------------------------------------------------------------------------- the transforms


def test_patch_merging_reorder_gives_mmdetections_merge():
    """mmdetection merges with nn.Unfold (channel-major); transformers concatenates 2x2 positions (position-major).
    Reordered LayerNorm and reduction weights must give the same merged features."""
    torch.manual_seed(0)
    channels, out_dim = 3, 5
    grid = torch.randn(2, channels, 4, 6)
    weight, bias, reduction = torch.randn(4 * channels), torch.randn(4 * channels), torch.randn(out_dim, 4 * channels)
    unfolded = F.unfold(grid, kernel_size=2, stride=2).transpose(1, 2)
    mmdet = F.linear(F.layer_norm(unfolded, (4 * channels,), weight, bias), reduction)
    hwc = grid.permute(0, 2, 3, 1)
    concatenated = torch.cat([hwc[:, row::2, col::2] for col in range(2) for row in range(2)], -1).flatten(1, 2)
    ours = F.linear(
        F.layer_norm(concatenated, (4 * channels,), reorder_merged_vector(weight), reorder_merged_vector(bias)),
        reorder_merged_weight(reduction),
    )
    torch.testing.assert_close(ours, mmdet)


def test_relative_position_index_is_checked_then_dropped(swin_state_dict, swin_backbone):
    ours = swin_backbone.swin.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_index
    assert torch.equal(ours.view(49, 49), swin_relative_position_index(7))
    assert torch.equal(swin_state_dict["stages.0.blocks.0.attn.w_msa.relative_position_index"], ours.view(49, 49))
    config = swin_backbone.config
    converted, _ = convert_backbone_state_dict(swin_state_dict, config)
    assert not any("relative_position_index" in key for key in converted)
    broken = dict(swin_state_dict)
    broken["stages.1.blocks.0.attn.w_msa.relative_position_index"] = swin_relative_position_index(7).flip(0)
    with pytest.raises(ConversionError, match=r"stages\.1\.blocks\.0\.attn\.w_msa\.relative_position_index: holds"):
        convert_backbone_state_dict(broken, config)


def test_fused_qkv_is_split_in_order(swin_state_dict, swin_backbone):
    fused = swin_state_dict["stages.2.blocks.1.attn.w_msa.qkv.weight"]
    attention = swin_backbone.swin.encoder.layers[2].blocks[1].attention
    assert torch.equal(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]), fused)
    extra = dict(swin_state_dict, **{"stages.0.blocks.0.attn.w_msa.mystery": torch.zeros(1)})
    assert convert_backbone_state_dict(extra, swin_backbone.config)[1] == ["stages.0.blocks.0.attn.w_msa.mystery"]
