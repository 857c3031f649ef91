"""detectron2/detrex checkpoints (the official Align-DETR code, FelixCaae/AlignDETR, and detrex's DINO) -> the
mmdetection names the rest of the conversion reads.

The official Align-DETR code and detrex's DINO build mmdetection's network (the outputs agree to ~5e-6 on the same
weights) under other module names: detectron2's ResNet (`stem`, `res2`-`res5`, FrozenBN as `<conv>.norm`), detrex's
`ChannelMapper` (`norm` for GroupNorm), `transformer.*` with `attentions`/`ffns` lists, `class_embed`/`bbox_embed`
heads and `label_enc`. `DETREX_RULES` renames every key to mmdetection's name, so that reading the architecture off
the shapes, our names and the q/k/v split stay the one mmdetection path (`convert_align_detr.py`).

What a checkpoint file holds: detectron2's `DetectionCheckpointer` saves `{"model": state_dict, "trainer": {...},
"iteration": i}` (`model_final.pth`, `model_XXXXXXX.pth`; the released files may hold `{"model": ...}` only), keys
without `module.` (the checkpointer unwraps DDP). FrozenBN's `weight`, `bias`, `running_mean`, `running_var` are
buffers and are saved; there is no `num_batches_tracked`. The model assigns its head lists to the decoder too
(`self.transformer.decoder.class_embed = self.class_embed`), so every class/box branch is saved twice, once under
`transformer.decoder.`: `check_tied_copies` requires each copy to equal its branch, then the copies are dropped.
"""

import re

import torch

from .convert_mmdet_backbones import ConversionError, Rule, apply_rules

# keys only a detrex-layout detector has (mmdetection's are `level_embed`, `query_embedding.weight`)
DETREX_SIGNATURE = ("transformer.level_embeds", "transformer.tgt_embed.weight")
_REQUIRED = ("transformer.level_embeds", "transformer.tgt_embed.weight", "class_embed.0.weight", "label_enc.weight")
_TIED = re.compile(r"transformer\.decoder\.((?:class_embed|bbox_embed)\..+)")
_RESNET_STEM = "backbone.stem.conv1.weight"


def _stage(res: str) -> int:
    return int(res) - 1  # detectron2's res2..res5 are mmdetection's layer1..layer4


_BLOCK = r"backbone\.res(\d)\.(\d+)\."
_ENCODER = r"transformer\.encoder\.layers\.(\d+)\."
_DECODER = r"transformer\.decoder\.layers\.(\d+)\."
_DEFORMABLE = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_FFN = r"ffns\.0\.layers\.(0\.0|1)\.(weight|bias)"

# official Align-DETR / detrex DINO names -> mmdetection's
DETREX_RULES = [
    # detectron2 ResNet, FrozenBN statistics and affine buffers under `<conv>.norm`
    Rule(r"backbone\.stem\.conv1\.weight", "backbone.conv1.weight"),
    Rule(r"backbone\.stem\.conv1\.norm\.(weight|bias|running_mean|running_var)", "backbone.bn1.{0}"),
    Rule(
        _BLOCK + r"conv(\d)\.weight", lambda res, block, conv: f"backbone.layer{_stage(res)}.{block}.conv{conv}.weight"
    ),
    Rule(
        _BLOCK + r"conv(\d)\.norm\.(weight|bias|running_mean|running_var)",
        lambda res, block, conv, name: f"backbone.layer{_stage(res)}.{block}.bn{conv}.{name}",
    ),
    Rule(_BLOCK + r"shortcut\.weight", lambda res, block: f"backbone.layer{_stage(res)}.{block}.downsample.0.weight"),
    Rule(
        _BLOCK + r"shortcut\.norm\.(weight|bias|running_mean|running_var)",
        lambda res, block, name: f"backbone.layer{_stage(res)}.{block}.downsample.1.{name}",
    ),
    # detrex ChannelMapper
    Rule(r"neck\.(convs|extra_convs)\.(\d+)\.conv\.(weight|bias)", "neck.{0}.{1}.conv.{2}"),
    Rule(r"neck\.(convs|extra_convs)\.(\d+)\.norm\.(weight|bias)", "neck.{0}.{1}.gn.{2}"),
    # transformer
    Rule(r"transformer\.level_embeds", "level_embed"),
    Rule(r"transformer\.tgt_embed\.weight", "query_embedding.weight"),
    Rule(r"transformer\.enc_output\.(weight|bias)", "memory_trans_fc.{0}"),
    Rule(r"transformer\.enc_output_norm\.(weight|bias)", "memory_trans_norm.{0}"),
    Rule(_ENCODER + r"attentions\.0\." + _DEFORMABLE, "encoder.layers.{0}.self_attn.{1}.{2}"),
    Rule(_ENCODER + _FFN, "encoder.layers.{0}.ffn.layers.{1}.{2}"),
    Rule(_ENCODER + r"norms\.([01])\.(weight|bias)", "encoder.layers.{0}.norms.{1}.{2}"),
    Rule(
        _DECODER + r"attentions\.0\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
        "decoder.layers.{0}.self_attn.attn.{1}",
    ),
    Rule(_DECODER + r"attentions\.1\." + _DEFORMABLE, "decoder.layers.{0}.cross_attn.{1}.{2}"),
    Rule(_DECODER + _FFN, "decoder.layers.{0}.ffn.layers.{1}.{2}"),
    Rule(_DECODER + r"norms\.([012])\.(weight|bias)", "decoder.layers.{0}.norms.{1}.{2}"),
    Rule(r"transformer\.decoder\.ref_point_head\.layers\.([01])\.(weight|bias)",
         "decoder.ref_point_head.layers.{0}.{1}"),
    Rule(r"transformer\.decoder\.norm\.(weight|bias)", "decoder.norm.{0}"),
    # the decoder's tied copies of the heads: checked by `check_tied_copies`, then dropped
    Rule(_TIED.pattern, None),
    # heads: branch i < L is decoder layer i, branch L the encoder proposals (the same order as mmdetection's)
    Rule(r"class_embed\.(\d+)\.(weight|bias)", "bbox_head.cls_branches.{0}.{1}"),
    Rule(
        r"bbox_embed\.(\d+)\.layers\.([012])\.(weight|bias)",
        lambda branch, layer, name: f"bbox_head.reg_branches.{branch}.{2 * int(layer)}.{name}",
    ),
    Rule(r"label_enc\.weight", "dn_query_generator.label_embedding.weight"),
]  # fmt: skip


def is_detrex_state_dict(state_dict: dict) -> bool:
    """Whether the keys are the detrex layout (official Align-DETR or detrex DINO) rather than mmdetection's."""
    return any(key in state_dict for key in DETREX_SIGNATURE)


def check_tied_copies(state_dict: dict) -> int:
    """Every `transformer.decoder.class_embed.*` / `bbox_embed.*` must equal the head branch it is a copy of (detrex
    saves the one module under both names). Returns the number of copies checked; a ConversionError names the first
    copy without its branch or with other values."""
    copies = [(key, match.group(1)) for key in state_dict if (match := _TIED.fullmatch(key))]
    for copy, source in copies:
        if source not in state_dict:
            raise ConversionError(f"{copy} is a copy of {source}, which the checkpoint lacks.")
        a, b = state_dict[copy], state_dict[source]
        if a is b:  # still one tensor (torch.load keeps shared storage): nothing to compare
            continue
        if a.shape != b.shape or not torch.equal(a, b):
            difference = (
                f"shapes {tuple(a.shape)} and {tuple(b.shape)}" if a.shape != b.shape
                else f"values differ by up to {(a.float() - b.float()).abs().max().item():.3g}"
            )  # fmt: skip
            raise ConversionError(
                f"{copy} should be the same tensor as {source} (detrex ties the decoder's heads to the model's), "
                f"but {difference}: the checkpoint was edited or is damaged."
            )
    return len(copies)


def detrex_to_mmdet(state_dict: dict) -> dict[str, torch.Tensor]:
    """A detrex-layout state dict under mmdetection's names (tied copies checked, then dropped). Raises a
    ConversionError for a missing detector key, a backbone other than detectron2's ResNet, or keys no rule knows."""
    missing = [key for key in _REQUIRED if key not in state_dict]
    if missing:
        raise ConversionError(f"Not an official Align-DETR / detrex DINO checkpoint: missing {missing}.")
    if _RESNET_STEM not in state_dict:
        seen = sorted({".".join(key.split(".")[:2]) for key in state_dict if key.startswith("backbone.")})
        raise ConversionError(
            f"The detrex checkpoint's backbone is not detectron2's ResNet (its backbone modules are {seen[:8]}); "
            "only ResNet backbones convert from detrex checkpoints."
        )
    check_tied_copies(state_dict)
    renamed, unknown = apply_rules(state_dict, DETREX_RULES)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint keys have no Align-DETR counterpart (is this an official Align-DETR or "
            f"detrex DINO checkpoint with a ResNet backbone?): {sorted(unknown)[:20]}"
            + (" ..." if len(unknown) > 20 else "")
        )
    return renamed


def describe_detrex(state_dict: dict) -> str:
    """One line on what was found, for the user."""
    num_copies = sum(1 for key in state_dict if _TIED.fullmatch(key))
    return (
        f"a detectron2/detrex checkpoint (the official Align-DETR / detrex DINO layout, ResNet backbone): "
        f"{len(state_dict)} keys, {num_copies} tied decoder copies of the heads checked equal and dropped"
    )
