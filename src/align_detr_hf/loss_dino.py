"""DINO's own training loss (mmdetection's `DINOHead.loss_by_feat`), chosen with `config.loss_type = "dino"`.

It is the Align-DETR loss pipeline of [`AlignDetrLoss`] (same prediction layers, target checks, single host sync,
denoising pairs, loss names and order) with these differences:

* one-to-one Hungarian matching on every decoder layer and on the encoder's top-Q proposals (same focal / L1 /
  GIoU matching costs); `config.num_gt_repeat` is not used;
* classification is mmdetection's sigmoid focal loss (`config.focal_alpha`, `config.focal_gamma`) with a one-hot
  target at each matched (query, GT class) entry and all-zero targets elsewhere, summed over all Q x C entries;
* no IoU-aware targets and no rank weights: every positive has box weight 1;
* the matching-part losses are divided by the number of matched queries (`sum_b min(G_b, Q)`, which is the number
  of GT boxes unless an image has more GTs than queries); denoising terms by `#GT * num_groups`, as in Align-DETR.

Loss names are mmdetection's: `loss_{cls,bbox,iou}`, `d{i}.loss_*`, `enc_loss_*`, `dn_loss_*`, `d{i}.dn_loss_*`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .configuration_align_detr import AlignDetrConfig
from .loss_align_detr import _AVG_FACTOR_EPS, AlignDetrLoss


def sigmoid_focal_loss(
    logits: torch.Tensor, positive_index: tuple[torch.Tensor, ...], alpha: float, gamma: float
) -> torch.Tensor:
    """Summed sigmoid focal loss (mmdetection's `py_sigmoid_focal_loss`) with target 1 at `positive_index`.

    Args:
        logits: (B, Q, C) float32 logits.
        positive_index: (batch, query, class) index tensors of the positive entries.
    Returns:
        scalar sum over all B*Q*C entries (not normalised). The modulating factor is not detached (as in mmdet).
    """
    targets = torch.zeros_like(logits).index_put(positive_index, logits.new_ones(()))
    prob = logits.sigmoid()
    # p_t is the probability of the wrong answer: (1 - p) at positives, p at negatives
    wrong = (1 - prob) * targets + prob * (1 - targets)
    focal_weight = (alpha * targets + (1 - alpha) * (1 - targets)) * wrong.pow(gamma)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * focal_weight).sum()


class DinoLoss(AlignDetrLoss):
    """mmdetection's DINO loss (focal + L1 + GIoU, one-to-one matching, denoising), see the module docstring."""

    def __init__(self, config: AlignDetrConfig):
        super().__init__(config)
        self.num_gt_repeat = [1] * len(config.num_gt_repeat)  # one query per GT on every layer

    def _matching_normaliser_count(self, num_gts: list[int], num_queries: int) -> int:
        # mmdet divides by the number of positives; one-to-one, that is min(#GT, Q) per image
        return sum(min(num_gt, num_queries) for num_gt in num_gts)

    def _set_losses(self, logits, boxes, batch, query, gt, rank_groups, all_gt_labels, all_gt_boxes, normaliser):
        """cls / bbox / iou losses of one prediction set (B, Q, .) given its positives (no rank weights)."""
        config = self.config
        divisor = normaliser + _AVG_FACTOR_EPS
        positive_index = (batch, query, all_gt_labels[gt])
        loss_cls = sigmoid_focal_loss(logits, positive_index, config.focal_alpha, config.focal_gamma)
        return {"loss_cls": config.class_loss_coefficient * loss_cls / divisor,
                **self._box_losses(boxes[batch, query], all_gt_boxes[gt], None, divisor)}


# `config.loss_type` -> loss class
LOSS_CLASSES = {"align_detr": AlignDetrLoss, "dino": DinoLoss}


def build_loss(config: AlignDetrConfig) -> AlignDetrLoss:
    """The training loss chosen by `config.loss_type`."""
    if config.loss_type not in LOSS_CLASSES:
        raise ValueError(f"config.loss_type must be one of {tuple(LOSS_CLASSES)}, got {config.loss_type!r}.")
    return LOSS_CLASSES[config.loss_type](config)


__all__ = ["DinoLoss", "sigmoid_focal_loss", "build_loss", "LOSS_CLASSES"]
