"""mmdetection backbone weights -> transformers `AutoBackbone` weights (ResNetBackbone, SwinBackbone).

A conversion is a table of `Rule`s: an mmdetection key pattern, our name(s), and an optional tensor transform for
what a rename cannot do (Swin's fused q/k/v, its patch-merging channel order). Keys here are relative to the
backbone (mmdetection's `backbone.` prefix removed; our names relative to the `AutoBackbone` module).
`backbone_config_from_state_dict` reads the architecture off the shapes.

What differs between mmdetection's `SwinTransformer` and transformers' `SwinBackbone`, and how it is handled:
- q/k/v: one fused `qkv` Linear (rows q | k | v, each heads-major) -> `q_proj`, `k_proj`, `v_proj`.
- `relative_position_index`: a saved buffer in mmdetection, recomputed by transformers: checked, then dropped.
- patch merging: mmdetection's `nn.Unfold` merge orders the 4C channels channel-major (`c * 4 + dy * 2 + dx`),
  transformers concatenates position-major blocks `[(0,0), (1,0), (0,1), (1,1)]`: the merge's LayerNorm and
  reduction weights are permuted to match.
- per-stage output norms `norm{i}` -> `hidden_states_norms.stage{i+1}`.
- small feature maps: mmdetection never shrinks the window nor switches the shift off; transformers' `SwinBackbone`
  calls its encoder with `always_partition=True`, which does the same (tests/test_swin.py checks odd and tiny sizes).
"""

import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says which keys or bytes are wrong."""


class Rule(NamedTuple):
    """One mmdetection key pattern and what it becomes.

    pattern: regular expression matching the whole key.
    target: our name, a `str.format` template of the pattern's groups or a function of them; a tuple of those when
        the tensor is split (the transform then returns one tensor per name); None when the key is dropped (the
        transform, if any, only checks it).
    transform: tensor -> tensor (or tensors), None to copy as is.
    """

    pattern: str
    target: str | Callable[..., str] | tuple | None
    transform: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor] | None] | None = None


def apply_rules(state_dict: dict, rules: Sequence[Rule]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename (and transform) every key by the first rule whose pattern matches it; returns (converted, unmatched)."""
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    converted, unmatched = {}, []
    for key, tensor in state_dict.items():
        for pattern, rule in compiled:
            match = pattern.fullmatch(key)
            if match:
                converted.update(_apply(rule, match.groups(), key, tensor))
                break
        else:
            unmatched.append(key)
    return converted, unmatched


def _apply(rule: Rule, groups: tuple, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    try:
        value = rule.transform(tensor) if rule.transform is not None else tensor
    except ValueError as error:
        raise ConversionError(f"{key}: {error}") from error
    if rule.target is None:
        return {}
    if isinstance(rule.target, tuple):
        return {_name(target, groups): part for target, part in zip(rule.target, value, strict=True)}
    return {_name(rule.target, groups): value}


def _name(target, groups: tuple) -> str:
    return target(*groups) if callable(target) else target.format(*groups)


def split_in_three(fused: torch.Tensor) -> list[torch.Tensor]:
    """A fused q/k/v projection (rows q | k | v) -> three tensors."""
    if fused.shape[0] % 3:
        raise ValueError(f"a fused q/k/v tensor needs a first dimension divisible by 3, got {tuple(fused.shape)}")
    return [part.clone() for part in fused.chunk(3, dim=0)]


# ---------------------------------------------------------------------------------------------------------- ResNet

# torchvision/mmdetection ResNet names -> transformers' ResNetBackbone (stages and convs are 1-based in mmdetection)
RESNET_RULES = [
    Rule(r".*\.num_batches_tracked", None),  # counters of BatchNorm with frozen statistics: meaningless here
    Rule(r"conv1\.weight", "embedder.embedder.convolution.weight"),
    Rule(r"bn1\.(\w+)", "embedder.embedder.normalization.{0}"),
    Rule(
        r"layer(\d)\.(\d+)\.conv(\d)\.weight",
        lambda stage, block, conv: f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(conv) - 1}"
        ".convolution.weight",
    ),
    Rule(
        r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)",
        lambda stage, block, norm, name: f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(norm) - 1}"
        f".normalization.{name}",
    ),
    Rule(
        r"layer(\d)\.(\d+)\.downsample\.0\.weight",
        lambda stage, block: f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.convolution.weight",
    ),
    Rule(
        r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)",
        lambda stage, block, name: f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.normalization.{name}",
    ),
]


def resnet_config_from_state_dict(sd: dict, neck_in_channels: list[int]) -> dict:
    """ResNet depth, widths and block type off the shapes; `out_features` = the stages whose widths feed the neck."""
    stages = sorted({int(m.group(1)) for key in sd if (m := re.match(r"layer(\d)\.", key))})
    depths = [len({m.group(1) for key in sd if (m := re.match(rf"layer{s}\.(\d+)\.", key))}) for s in stages]
    bottleneck = "layer1.0.conv3.weight" in sd
    last_conv = "conv3" if bottleneck else "conv2"
    hidden_sizes = [sd[f"layer{s}.0.{last_conv}.weight"].shape[0] for s in stages]
    unknown = [c for c in neck_in_channels if c not in hidden_sizes]
    if unknown:
        raise ConversionError(f"The neck takes {neck_in_channels} channels but the ResNet stages give {hidden_sizes}.")
    return {
        "model_type": "resnet",
        "embedding_size": sd["conv1.weight"].shape[0],
        "hidden_sizes": hidden_sizes,
        "depths": depths,
        "layer_type": "bottleneck" if bottleneck else "basic",
        "out_features": [f"stage{hidden_sizes.index(c) + 1}" for c in neck_in_channels],
    }


# ------------------------------------------------------------------------------------------------------------ Swin

# merged 2x2 position blocks in transformers' order [(0,0), (1,0), (0,1), (1,1)] as mmdetection's dy * 2 + dx
_MERGE_ORDER = [0, 2, 1, 3]


def reorder_merged_weight(weight: torch.Tensor) -> torch.Tensor:
    """Patch-merging reduction (out, 4C): channel-major columns (mmdetection) -> position-major (transformers)."""
    out_dim, merged = weight.shape
    return weight.reshape(out_dim, merged // 4, 4)[:, :, _MERGE_ORDER].transpose(1, 2).reshape(out_dim, merged)


def reorder_merged_vector(vector: torch.Tensor) -> torch.Tensor:
    """Patch-merging LayerNorm weight or bias (4C), reordered like the reduction's columns."""
    return vector.reshape(-1, 4)[:, _MERGE_ORDER].T.reshape(-1).clone()


def swin_relative_position_index(window_size: int) -> torch.Tensor:
    """The original Swin index for a square window: (hi - hj + w - 1) * (2w - 1) + (wi - wj + w - 1)."""
    rows = torch.arange(window_size * window_size) // window_size
    cols = torch.arange(window_size * window_size) % window_size
    return (rows[:, None] - rows[None, :] + window_size - 1) * (2 * window_size - 1) + (
        cols[:, None] - cols[None, :] + window_size - 1
    )


def check_relative_position_index(index: torch.Tensor) -> None:
    """transformers recomputes the index from the window size: the saved one must be that same index."""
    window_size = math.isqrt(index.shape[0])
    if index.dim() != 2 or index.shape[0] != index.shape[1] or window_size**2 != index.shape[0]:
        raise ValueError(f"a relative_position_index of shape {tuple(index.shape)} is not a square window's")
    if not torch.equal(index.long(), swin_relative_position_index(window_size)):
        raise ValueError("holds another relative-position index than Swin's; transformers would not reproduce it")


_BLOCK = r"stages\.(\d+)\.blocks\.(\d+)\."
_OUR_BLOCK = "swin.encoder.layers.{0}.blocks.{1}."

# mmdetection's SwinTransformer names -> transformers' SwinBackbone
SWIN_RULES = [
    Rule(r"patch_embed\.projection\.(weight|bias)", "swin.embeddings.patch_embeddings.projection.{0}"),
    Rule(r"patch_embed\.norm\.(weight|bias)", "swin.embeddings.norm.{0}"),
    Rule(_BLOCK + r"norm1\.(weight|bias)", _OUR_BLOCK + "layernorm_before.{2}"),
    Rule(_BLOCK + r"norm2\.(weight|bias)", _OUR_BLOCK + "layernorm_after.{2}"),
    Rule(
        _BLOCK + r"attn\.w_msa\.qkv\.(weight|bias)",
        tuple(_OUR_BLOCK + f"attention.{name}_proj.{{2}}" for name in "qkv"),
        split_in_three,
    ),
    Rule(_BLOCK + r"attn\.w_msa\.proj\.(weight|bias)", _OUR_BLOCK + "attention.o_proj.{2}"),
    Rule(
        _BLOCK + r"attn\.w_msa\.relative_position_bias_table",
        _OUR_BLOCK + "attention.relative_position_bias.relative_position_bias_table",
    ),
    Rule(_BLOCK + r"attn\.w_msa\.relative_position_index", None, check_relative_position_index),
    Rule(_BLOCK + r"ffn\.layers\.0\.0\.(weight|bias)", _OUR_BLOCK + "mlp.fc1.{2}"),
    Rule(_BLOCK + r"ffn\.layers\.1\.(weight|bias)", _OUR_BLOCK + "mlp.fc2.{2}"),
    Rule(
        r"stages\.(\d+)\.downsample\.reduction\.weight",
        "swin.encoder.layers.{0}.downsample.reduction.weight",
        reorder_merged_weight,
    ),
    Rule(
        r"stages\.(\d+)\.downsample\.norm\.(weight|bias)",
        "swin.encoder.layers.{0}.downsample.norm.{1}",
        reorder_merged_vector,
    ),
    Rule(r"norm(\d)\.(weight|bias)", lambda level, name: f"hidden_states_norms.stage{int(level) + 1}.{name}"),
]


def swin_config_from_state_dict(sd: dict, neck_in_channels: list[int]) -> dict:
    """Swin widths, depths, heads, window and MLP ratio off the shapes; `out_features` = stages with an output norm."""
    projection = sd["patch_embed.projection.weight"]
    embed_dim = projection.shape[0]
    stages = sorted({int(m.group(1)) for key in sd if (m := re.match(r"stages\.(\d+)\.", key))})
    depths = [len({m.group(1) for key in sd if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", key))}) for s in stages]
    widths = [sd[f"stages.{s}.blocks.0.norm1.weight"].shape[0] for s in stages]
    if widths != [embed_dim * 2**s for s in stages]:
        raise ConversionError(f"Swin stage widths {widths} do not double from {embed_dim} as transformers' Swin needs.")
    if "patch_embed.norm.weight" not in sd:
        raise ConversionError("A Swin without a patch-embedding norm (patch_norm=False) is not supported.")
    if any(key.startswith("absolute_pos_embed") for key in sd):
        raise ConversionError("A Swin with an absolute position embedding (use_abs_pos_embed=True) is not supported.")
    table = sd["stages.0.blocks.0.attn.w_msa.relative_position_bias_table"]
    window_size = (math.isqrt(table.shape[0]) + 1) // 2
    if (2 * window_size - 1) ** 2 != table.shape[0]:
        raise ConversionError(f"relative_position_bias_table has {table.shape[0]} rows: not a square window's.")
    out_levels = sorted(int(m.group(1)) for key in sd if (m := re.fullmatch(r"norm(\d)\.weight", key)))
    if [widths[level] for level in out_levels] != list(neck_in_channels):
        raise ConversionError(
            f"The neck takes {neck_in_channels} channels but the Swin output norms give "
            f"{[widths[level] for level in out_levels]} (levels {out_levels})."
        )
    return {
        "model_type": "swin",
        "num_channels": projection.shape[1],
        "patch_size": projection.shape[-1],
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": [sd[f"stages.{s}.blocks.0.attn.w_msa.relative_position_bias_table"].shape[1] for s in stages],
        "window_size": window_size,
        "mlp_ratio": sd["stages.0.blocks.0.ffn.layers.0.0.weight"].shape[0] / embed_dim,
        "qkv_bias": "stages.0.blocks.0.attn.w_msa.qkv.bias" in sd,
        "out_features": [f"stage{level + 1}" for level in out_levels],
    }


def _swin_unused_parameters(backbone_config) -> dict[str, torch.Tensor]:
    # SwinModel's final LayerNorm: SwinBackbone computes it but returns only the stage outputs; mmdetection has none
    width = backbone_config.embed_dim * 2 ** (len(backbone_config.depths) - 1)
    return {"swin.layernorm.weight": torch.ones(width), "swin.layernorm.bias": torch.zeros(width)}


# --------------------------------------------------------------------------------------------------------- family

class _Backbone(NamedTuple):
    signature: str  # a key only this backbone's checkpoints have
    rules: list
    config_from_state_dict: Callable[[dict, list[int]], dict]
    unused_parameters: Callable | None  # our parameters mmdetection has no counterpart for (they change no output)


BACKBONES = {
    "resnet": _Backbone("conv1.weight", RESNET_RULES, resnet_config_from_state_dict, None),
    "swin": _Backbone(
        "patch_embed.projection.weight", SWIN_RULES, swin_config_from_state_dict, _swin_unused_parameters
    ),
}


def backbone_type(backbone_state_dict: dict) -> str:
    """'resnet' or 'swin', recognised by a key only that backbone has; a ConversionError naming what was seen."""
    for name, backbone in BACKBONES.items():
        if backbone.signature in backbone_state_dict:
            return name
    seen = sorted({key.split(".")[0] for key in backbone_state_dict})
    raise ConversionError(
        f"Unsupported backbone: its top-level modules are {seen[:12]}; supported are mmdetection's ResNet (conv1, "
        "bn1, layer1-4) and SwinTransformer (patch_embed, stages, norm0-3)."
    )


def backbone_config_from_state_dict(backbone_state_dict: dict, neck_in_channels: list[int]) -> dict:
    """The `AutoBackbone` config (as a dict with `model_type`) of an mmdetection backbone state dict."""
    return BACKBONES[backbone_type(backbone_state_dict)].config_from_state_dict(backbone_state_dict, neck_in_channels)


def convert_backbone_state_dict(backbone_state_dict: dict, backbone_config) -> tuple[dict, list[str]]:
    """mmdetection backbone weights -> `AutoBackbone` weights for `backbone_config`; returns (converted, unmatched)."""
    backbone = BACKBONES.get(backbone_config.model_type)
    if backbone is None:
        raise ConversionError(f"No mmdetection conversion rules for a {backbone_config.model_type!r} backbone.")
    converted, unmatched = apply_rules(backbone_state_dict, backbone.rules)
    if backbone.unused_parameters is not None:
        converted.update(backbone.unused_parameters(backbone_config))
    return converted, unmatched
