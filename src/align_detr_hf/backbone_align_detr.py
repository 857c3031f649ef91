"""The backbone of Align-DETR: any transformers `AutoBackbone` with frozen BatchNorms and mmdetection's
`frozen_stages` policy, per backbone type."""

import torch
from torch import nn
from transformers import AutoBackbone

from .configuration_align_detr import AlignDetrConfig
from .export_backbones import export_safe_backbone


class AlignDetrFrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (never trained, never updated)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # present in BatchNorm checkpoints, meaningless here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return torch.addcmul(shift[None, :, None, None], x, scale[None, :, None, None])  # one pass over x


def _freeze_batch_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, AlignDetrFrozenBatchNorm2d(child.num_features, child.eps))
        else:
            _freeze_batch_norms(child)


def _staged_parts(backbone: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], list[nn.Module]]:
    # ResNet names its stem `embedder`, ConvNeXt `embeddings`; both keep their stages in `encoder.stages`
    stem = backbone.embedder if hasattr(backbone, "embedder") else backbone.embeddings
    return stem, [[stage] for stage in backbone.encoder.stages], []


def _swin_parts(backbone: nn.Module) -> tuple[nn.Module, list[list[nn.Module]], list[nn.Module]]:
    # as mmdetection's SwinTransformer: a frozen stage freezes its output norm too; SwinModel's final LayerNorm
    # feeds no feature map, so it never trains (and leaves no unused parameter for DistributedDataParallel)
    norms = backbone.hidden_states_norms
    stages = [
        [layer] + ([norms[f"stage{i + 1}"]] if f"stage{i + 1}" in norms else [])
        for i, layer in enumerate(backbone.swin.encoder.layers)
    ]
    return backbone.swin.embeddings, stages, [backbone.swin.layernorm]


# per backbone model type: (stem, modules of each stage, modules that never train)
_BACKBONE_PARTS = {"resnet": _staged_parts, "convnext": _staged_parts, "convnextv2": _staged_parts, "swin": _swin_parts}


class AlignDetrConvEncoder(nn.Module):
    """Any `AutoBackbone` with frozen BatchNorms and mmdetection's `frozen_stages` policy.

    `config.freeze_backbone_stages` = -1 trains everything, 0 freezes the stem, k the stem and the first k stages
    (`requires_grad=False`). Which modules are the stem and the stages is known per backbone type (`_BACKBONE_PARTS`);
    freezing any other type raises instead of silently training it.
    """

    def __init__(self, config: AlignDetrConfig):
        super().__init__()
        self.model = AutoBackbone.from_config(config.backbone_config)
        _freeze_batch_norms(self.model)
        self.model_type, self.frozen_stages = config.backbone_config.model_type, config.freeze_backbone_stages
        self.freeze()
        self.channels = [
            self.model.num_features[self.model.stage_names.index(name)] for name in config.backbone_config.out_features
        ]

    def freeze(self) -> None:
        """Set `requires_grad=False` on the frozen parts (again after `from_pretrained`, which re-creates them)."""
        model_type, num_stages = self.model_type, self.frozen_stages
        parts = _BACKBONE_PARTS.get(model_type)
        if parts is None:
            if num_stages < 0:
                return
            raise ValueError(
                f"freeze_backbone_stages={num_stages} but the stages of a {model_type!r} backbone are not known "
                f"(known: {sorted(_BACKBONE_PARTS)}); use -1 to train the whole backbone."
            )
        stem, stages, never_trained = parts(self.model)
        if num_stages > len(stages):
            raise ValueError(f"freeze_backbone_stages={num_stages} but the backbone has {len(stages)} stages.")
        frozen = list(never_trained)
        if num_stages >= 0:
            frozen += [stem] + [module for stage in stages[:num_stages] for module in stage]
        for module in frozen:
            module.requires_grad_(False)

    def set_frozen_stages(self, num_stages: int) -> None:
        """Freeze the stem and the first `num_stages` stages (mmdetection's `frozen_stages`; -1 trains the whole
        backbone), unfreezing what an earlier setting froze. The model's config is the caller's to update."""
        if not isinstance(num_stages, int) or num_stages < -1:
            raise ValueError(f"frozen stages must be an integer >= -1, got {num_stages!r}.")
        previous = self.frozen_stages
        self.frozen_stages = num_stages
        self.model.requires_grad_(True)
        try:
            self.freeze()
        except ValueError:
            self.frozen_stages = previous
            self.model.requires_grad_(True)
            self.freeze()
            raise

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if torch.compiler.is_exporting():  # any exporter, ours or transformers': see export_backbones.py
            with export_safe_backbone(self.model):
                return list(self.model(pixel_values).feature_maps)
        return list(self.model(pixel_values).feature_maps)
