"""The reference Align-DETR optimisation (mmdetection config, spec section 2.12).

- AdamW, lr 1e-4, weight decay 1e-4, betas (0.9, 0.999), eps 1e-8;
- parameters whose name contains `backbone`: lr x 0.1 (`custom_keys={'backbone': lr_mult 0.1}`);
- parameters of normalisation layers (LayerNorm, GroupNorm, BatchNorm): no weight decay (`norm_decay_mult=0`);
  conv/linear biases, embeddings and `level_embed` keep their weight decay, as in mmdet;
- gradient clipping: global L2 norm 0.1 (call `torch.nn.utils.clip_grad_norm_` / `accelerator.clip_grad_norm_`
  with [`REFERENCE_MAX_GRAD_NORM`]);
- schedule, per optimisation step: linear warm-up from `warmup_start_factor` (1e-4) to 1 over `warmup_steps` (2000)
  iterations, times `gamma` (0.1) for every milestone (in steps) passed; mmdet's `MultiStepLR(milestones=[11])` is by
  epoch, i.e. `milestones=[11 * steps_per_epoch]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

REFERENCE_LR = 1e-4
REFERENCE_WEIGHT_DECAY = 1e-4
REFERENCE_MAX_GRAD_NORM = 0.1
REFERENCE_BACKBONE_LR_MULT = 0.1
REFERENCE_WARMUP_STEPS = 2000
REFERENCE_WARMUP_START_FACTOR = 1e-4

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)

__all__ = [
    "REFERENCE_LR",
    "REFERENCE_MAX_GRAD_NORM",
    "REFERENCE_WEIGHT_DECAY",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "parameter_groups",
]


def _norm_parameter_names(model: nn.Module) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower():
            for param_name, _ in module.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def parameter_groups(
    model: nn.Module,
    lr: float = REFERENCE_LR,
    weight_decay: float = REFERENCE_WEIGHT_DECAY,
    backbone_lr_mult: float = REFERENCE_BACKBONE_LR_MULT,
) -> list[dict]:
    """Up to four groups (backbone or not) x (norm or not) of the trainable parameters, with `name` keys."""
    norm_names = _norm_parameter_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # mmdet: the backbone's lr multiplier wins over norm_decay_mult, so backbone norms keep weight decay
        key = ("backbone" in name, name in norm_names and "backbone" not in name)
        groups.setdefault(key, []).append(param)
    result = []
    for (is_backbone, is_norm), params in sorted(groups.items()):
        result.append(
            {
                "params": params,
                "lr": lr * (backbone_lr_mult if is_backbone else 1.0),
                "weight_decay": 0.0 if is_norm else weight_decay,
                "name": f"{'backbone' if is_backbone else 'transformer'}{'_norm' if is_norm else ''}",
            }
        )
    return result


def build_optimizer(
    model: nn.Module,
    lr: float = REFERENCE_LR,
    weight_decay: float = REFERENCE_WEIGHT_DECAY,
    backbone_lr_mult: float = REFERENCE_BACKBONE_LR_MULT,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, lr, weight_decay, backbone_lr_mult), lr=lr, betas=betas, eps=eps)


def lr_factor(
    step: int,
    warmup_steps: int = REFERENCE_WARMUP_STEPS,
    warmup_start_factor: float = REFERENCE_WARMUP_START_FACTOR,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base lr at optimisation step `step` (0-based)."""
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
    return factor * gamma ** sum(step >= m for m in milestones)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int = REFERENCE_WARMUP_STEPS,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_start_factor: float = REFERENCE_WARMUP_START_FACTOR,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with [`lr_factor`]; step it once per optimisation step."""
    milestones = tuple(int(m) for m in milestones)

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, warmup_start_factor, milestones, gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
