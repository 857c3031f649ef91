"""The reference optimisation (mmdetection's Align-DETR config): parameter groups and the learning-rate schedule."""

import pytest
import torch
from conftest import tiny_config

from align_detr_hf import AlignDetrForObjectDetection
from align_detr_hf.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups


def _group_of(groups, model):
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {name: by_id.get(id(p)) for name, p in model.named_parameters()}


def test_parameter_groups_follow_the_reference():
    model = AlignDetrForObjectDetection(tiny_config())
    groups = parameter_groups(model)
    group_of = _group_of(groups, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # each trainable parameter exactly once
    assert all(group_of[n] is None for n, p in model.named_parameters() if not p.requires_grad)  # frozen stem
    stage = "model.backbone.model.encoder.stages.0.layers.0.layer.0.convolution.weight"
    assert group_of[stage]["lr"] == pytest.approx(1e-5) and group_of[stage]["weight_decay"] == 1e-4
    for name in ("model.encoder.layers.0.self_attn_layer_norm.weight", "model.input_proj.0.1.bias",
                 "model.decoder.layer_norm.bias"):  # LayerNorm / GroupNorm: no weight decay
        assert group_of[name]["weight_decay"] == 0.0 and group_of[name]["lr"] == 1e-4, name
    for name in ("model.level_embed", "model.query_embedding.weight", "model.encoder.layers.0.fc1.bias",
                 "class_embed.0.bias", "model.input_proj.0.0.bias"):  # decayed, as mmdet's norm_decay_mult only
        assert group_of[name]["weight_decay"] == 1e-4 and group_of[name]["lr"] == 1e-4, name


def test_backbone_norm_layers_keep_weight_decay():
    """In mmdet the backbone's custom key wins over norm_decay_mult: a LayerNorm backbone keeps its decay."""
    config = tiny_config(backbone_config={"model_type": "convnext", "hidden_sizes": [16, 32, 32, 64],
                                          "depths": [1, 1, 1, 1], "out_features": ["stage2", "stage3", "stage4"]})
    model = AlignDetrForObjectDetection(config)
    group_of = _group_of(parameter_groups(model), model)
    backbone_norms = [n for n in group_of if "backbone" in n and "layernorm" in n and group_of[n] is not None]
    assert backbone_norms
    assert all(group_of[n]["weight_decay"] == 1e-4 and group_of[n]["lr"] == pytest.approx(1e-5) for n in backbone_norms)


def test_learning_rate_schedule():
    assert lr_factor(0) == pytest.approx(1e-4)
    assert lr_factor(1000) == pytest.approx(1e-4 + (1 - 1e-4) * 0.5)
    assert lr_factor(2000) == 1.0 and lr_factor(5000, milestones=[4000]) == pytest.approx(0.1)
    model = AlignDetrForObjectDetection(tiny_config())
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer, warmup_steps=2, milestones=[3])
    lrs = []
    for _ in range(4):
        lrs.append(next(g for g in optimizer.param_groups if g["name"] == "transformer")["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-8, 1e-4 * (1e-4 + (1 - 1e-4) * 0.5), 1e-4, 1e-5])
