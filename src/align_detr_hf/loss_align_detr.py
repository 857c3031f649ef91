"""Training loss of Align-DETR, numerically equal to mmdetection's `AlignDETRHead.loss_by_feat`.

The loss has three parts, each computed for every prediction layer:

* matching part (decoder layers 0..L-1 and the encoder's top-Q proposals): one-to-k Hungarian matching
  (`k = config.num_gt_repeat[layer]`, layer index L = encoder), IA-BCE classification with prime-sample rank
  weights, L1 and GIoU box losses, all normalised by the number of ground-truth boxes in the batch;
* denoising part (decoder layers only): fixed query <-> GT pairs, IA-BCE without rank weights, L1 and GIoU,
  normalised by `#GT * num_groups`.

Loss names are mmdetection's own, so the mapping from mmdet's loss dict to ours is the identity:

    loss_cls, loss_bbox, loss_iou                 last decoder layer
    d{i}.loss_cls, d{i}.loss_bbox, d{i}.loss_iou  decoder layers i < L-1
    enc_loss_cls, enc_loss_bbox, enc_loss_iou     encoder top-Q proposals
    dn_loss_cls, dn_loss_bbox, dn_loss_iou        denoising queries, last decoder layer
    d{i}.dn_loss_*                                denoising queries, decoder layers i < L-1

IoU and GIoU are computed on normalised boxes (mmdet uses pixel boxes; both are invariant to per-axis scaling, so
only float noise differs).

Host synchronisation: the matching of one call (all layers, all images, encoder) costs one device->host copy and
one host->device copy, in [`OneToKMatcher`] (`matching_align_detr.py`); the target checks that read device values
ride on the same copy. Nothing else in the loss reads a device value on the host.

Edge cases:
* an image without GT contributes only its all-negative classification term (box losses of that image are 0);
* if the batch has no GT at all, every normaliser is clamped to 1 and denoising (if switched on) has D = 0: the
  dn keys are returned as zeros attached to the graph;
* `k` is reduced per image to `max(1, min(k, Q // G))` (mmdet's rule). With more GTs than queries (G > Q), k = 1 and
  Q of the G GTs get one query each; the other GTs stay unmatched (they still count in the normaliser);
* non-finite costs (NaN / inf predictions) are replaced by a large finite cost before solving;
* bad targets raise a `ValueError` naming the image (and the first bad box), see `targets_align_detr.py`;
  `validate_labels` runs the same checks (plus NaN/inf pixels) up front, before the model uses the labels for
  denoising queries.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .configuration_align_detr import AlignDetrConfig
from .matching_align_detr import LayerMatches, OneToKMatcher
from .targets_align_detr import check_target_structure

# mmdet's weight_reduce_loss divides by (avg_factor + float32 eps); it uses the same reduction for the
# classification, L1 and GIoU losses.
_AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------------------------------
# Loss pieces
# --------------------------------------------------------------------------------------------------------------------


def prime_sample_weights(quality: torch.Tensor, groups: torch.Tensor, tau: float) -> torch.Tensor:
    """Rank weights `exp(-rank / tau)`, rank of each positive's quality t among the positives of the same GT.

    Args:
        quality: (P,) the (detached) IA-BCE targets t of the positives.
        groups: (num_gt, k_max) int64 indices into `quality`, one row per GT, padded with -1.
    Returns:
        (P,) weights; the best positive of each GT gets 1, the second exp(-1/tau), ...
    """
    weights = quality.new_ones(quality.shape)
    if groups.numel() == 0:
        return weights
    valid = groups >= 0
    grouped = torch.where(valid, quality[groups.clamp(min=0)], quality.new_tensor(-math.inf))
    order = grouped.argsort(dim=1, descending=True, stable=True)  # padding (-inf) sorts last
    rank = order.argsort(dim=1).to(quality.dtype)  # position of each entry in the sorted row
    return weights.index_put((groups[valid],), torch.exp(-rank[valid] / tau))


def ia_bce_classification_loss(
    logits: torch.Tensor,
    positive_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    positive_targets: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """Summed IA-BCE: soft target t at the positives (weight 1), target 0 with weight p^gamma elsewhere.

    Args:
        logits: (B, Q, C) float32 logits.
        positive_index: (batch, query, class) index tensors of the P positive entries.
        positive_targets: (P,) detached soft targets (t times the rank weight).
    Returns:
        scalar sum over all B*Q*C entries (not normalised).
    """
    # The negative weight p^gamma is not detached (as in mmdet: it acts like a focal modulating factor).
    weights = logits.sigmoid().pow(gamma).index_put(positive_index, logits.new_ones(()))
    targets = torch.zeros_like(logits).index_put(positive_index, positive_targets)
    # binary_cross_entropy_with_logits is the numerically stable form: finite for logits of any magnitude.
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weights).sum()


def _reduce_mean(values: list[float], device: torch.device) -> list[float] | torch.Tensor:
    """Average counts over processes (mmdet's reduce_mean) when torch.distributed is initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float32, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor / torch.distributed.get_world_size()


# --------------------------------------------------------------------------------------------------------------------
# The loss module
# --------------------------------------------------------------------------------------------------------------------


class AlignDetrLoss(nn.Module):
    """Align-DETR training loss (mmdetection's `AlignDETRHead.loss_by_feat`), see the module docstring."""

    def __init__(self, config: AlignDetrConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.num_gt_repeat = list(config.num_gt_repeat)
        self.matcher = OneToKMatcher(config.matcher_class_cost, config.matcher_bbox_cost, config.matcher_giou_cost,
                                     config.matcher_alpha, config.matcher_gamma)

    def forward(self, outputs: dict, targets: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute every loss term.

        Args:
            outputs: "intermediate_logits" (L, B, Q, C), "intermediate_pred_boxes" (L, B, Q, 4) sigmoid cxcywh,
                "enc_topk_logits" (B, Q, C), "enc_topk_boxes" (B, Q, 4), "dn_logits" (L, B, D, C) or None,
                "dn_pred_boxes" (L, B, D, 4) or None, "denoising_meta" {"num_groups": G, "max_gt": M}
                (D = 2 * M * G).
            targets: per image {"class_labels": (n,) int64, "boxes": (n, 4) normalised cxcywh}.
        Returns:
            (loss, loss_dict) with loss = sum of the loss_dict values (mmdet names, see module docstring).
        """
        logits = outputs["intermediate_logits"]
        device = logits.device
        # The loss is always computed in float32 (stable under fp16/bf16 autocast and half-precision inputs).
        with torch.autocast(device_type=device.type, enabled=False):
            return self._forward_float32(outputs, targets)

    def _prediction_layers(self, outputs: dict, targets: list[dict]):
        """Float32 (logits, boxes) of every matched prediction layer (decoder 0..L-1, then encoder), their loss-name
        prefixes, and the validated targets moved to the device."""
        all_logits = outputs["intermediate_logits"].float()
        all_boxes = outputs["intermediate_pred_boxes"].float()
        if all_logits.dim() != 4 or all_boxes.shape != all_logits.shape[:-1] + (4,):
            raise ValueError(f"intermediate_logits must be (L, B, Q, C) and intermediate_pred_boxes (L, B, Q, 4); "
                             f"got {tuple(all_logits.shape)} and {tuple(all_boxes.shape)}.")
        num_layers, batch_size, _, num_classes = all_logits.shape
        if num_classes != self.num_labels:
            raise ValueError(f"The logits have {num_classes} classes but config.num_labels is {self.num_labels}.")
        if len(self.num_gt_repeat) != num_layers + 1:
            raise ValueError(f"config.num_gt_repeat has {len(self.num_gt_repeat)} entries but the outputs have "
                             f"{num_layers} decoder layers (+1 encoder entry needed).")
        check_target_structure(targets, batch_size)
        device = all_logits.device

        layers = [(all_logits[i], all_boxes[i]) for i in range(num_layers)]
        names = [f"d{i}." for i in range(num_layers - 1)] + [""]
        if outputs.get("enc_topk_logits") is not None:
            layers.append((outputs["enc_topk_logits"].float(), outputs["enc_topk_boxes"].float()))
            names.append("enc_")
        for name, (layer_logits, layer_boxes) in zip(names, layers):
            if (layer_logits.dim() != 3 or layer_logits.shape[0] != batch_size or layer_logits.shape[-1] != num_classes
                    or layer_boxes.shape != layer_logits.shape[:-1] + (4,)):
                raise ValueError(f"Prediction layer '{name or 'last'}' has logits {tuple(layer_logits.shape)} and "
                                 f"boxes {tuple(layer_boxes.shape)}; expected (B, Q, C) and (B, Q, 4).")

        gt_labels = [t["class_labels"].to(device=device, dtype=torch.long) for t in targets]
        gt_boxes = [t["boxes"].to(device=device, dtype=torch.float32) for t in targets]
        return layers, names, gt_labels, gt_boxes

    @torch.no_grad()
    def match(self, outputs: dict, targets: list[dict]) -> list[LayerMatches]:
        """The matches of every prediction layer (decoder 0..L-1, then the encoder), as the loss computes them."""
        with torch.autocast(device_type=outputs["intermediate_logits"].device.type, enabled=False):
            layers, _, gt_labels, gt_boxes = self._prediction_layers(outputs, targets)
            return self.matcher(layers, gt_labels, gt_boxes, self.num_gt_repeat[: len(layers)])

    def _forward_float32(self, outputs: dict, targets: list[dict]):
        layers, names, gt_labels, gt_boxes = self._prediction_layers(outputs, targets)
        num_layers = outputs["intermediate_logits"].shape[0]
        device = layers[0][0].device
        num_gts = [int(labels.shape[0]) for labels in gt_labels]
        all_gt_labels = torch.cat(gt_labels)
        all_gt_boxes = torch.cat(gt_boxes)

        matches = self.matcher(layers, gt_labels, gt_boxes, self.num_gt_repeat[: len(layers)])

        num_gt_total = sum(num_gts)
        dn_logits = outputs.get("dn_logits")
        dn_groups = int(outputs["denoising_meta"]["num_groups"]) if dn_logits is not None else 0
        num_queries = layers[0][0].shape[1]
        match_count = self._matching_normaliser_count(num_gts, num_queries)
        counts = _reduce_mean([float(match_count), float(num_gt_total * dn_groups)], device)
        # mmdet: max(reduce_mean(count), 1), then weight_reduce_loss adds float32 eps.
        match_normaliser = max(counts[0], 1) if isinstance(counts, list) else counts[0].clamp(min=1)
        dn_normaliser = max(counts[1], 1) if isinstance(counts, list) else counts[1].clamp(min=1)

        loss_dict = {}
        for name, (layer_logits, layer_boxes), match in zip(names, layers, matches):
            losses = self._layer_losses(layer_logits, layer_boxes, match, all_gt_labels, all_gt_boxes, match_normaliser)
            loss_dict.update({f"{name}{key}": value for key, value in losses.items()})
        # mmdet's order: last layer, d0.., enc_, then dn.
        prefixes = [""] + names[: num_layers - 1] + names[num_layers:]
        order = [f"{prefix}loss_{term}" for prefix in prefixes for term in ("cls", "bbox", "iou")]
        loss_dict = {key: loss_dict[key] for key in order}

        if dn_logits is not None:
            loss_dict.update(
                self._denoising_losses(outputs, gt_labels, num_gts, all_gt_labels, all_gt_boxes, dn_normaliser)
            )
        loss = sum(loss_dict.values())
        return loss, loss_dict

    # ---------------------------------------------------------------------------------------------------------------

    def _matching_normaliser_count(self, num_gts: list[int], num_queries: int) -> int:
        """Count that normalises the matching-part losses: Align-DETR divides by the number of GT boxes (not by the
        ~k * #GT positives)."""
        return sum(num_gts)

    def _positive_targets(self, logits, boxes, batch, query, gt, all_gt_labels, all_gt_boxes):
        """IA-BCE quality target t = clamp(p^alpha * IoU^(1-alpha), min=quality_min), detached, shape (P,)."""
        with torch.no_grad():
            labels = all_gt_labels[gt]
            prob = logits[batch, query, labels].sigmoid()
            iou = box_iou(box_cxcywh_to_xyxy(boxes[batch, query]), box_cxcywh_to_xyxy(all_gt_boxes[gt]), aligned=True)
            alpha = self.config.quality_alpha
            quality = (prob.pow(alpha) * iou.pow(1 - alpha)).clamp(min=self.config.quality_min)
        return labels, quality

    def _set_losses(self, logits, boxes, batch, query, gt, rank_groups, all_gt_labels, all_gt_boxes, normaliser):
        """cls / bbox / iou losses of one prediction set (B, Q, .) given its positives.

        `rank_groups` (num_gt, k_max) enables prime-sample weights (matching part); None means weight 1 (dn).
        """
        config = self.config
        labels, quality = self._positive_targets(logits, boxes, batch, query, gt, all_gt_labels, all_gt_boxes)
        if rank_groups is not None:
            weight = prime_sample_weights(quality, rank_groups, config.rank_tau)
        else:
            weight = torch.ones_like(quality)
        divisor = normaliser + _AVG_FACTOR_EPS

        loss_cls = ia_bce_classification_loss(logits, (batch, query, labels), quality * weight, config.negative_gamma)
        return {"loss_cls": config.class_loss_coefficient * loss_cls / divisor,
                **self._box_losses(boxes[batch, query], all_gt_boxes[gt], weight, divisor)}

    def _box_losses(self, pred, target, weight, divisor):
        """Weighted L1 (normalised cxcywh) and GIoU losses of the (P, 4) positive boxes; `weight` (P,) or None."""
        l1 = (pred - target).abs().sum(-1)
        giou_loss = 1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target), aligned=True)
        if weight is not None:
            l1, giou_loss = l1 * weight, giou_loss * weight
        # With no positive the sums are empty (0) but still attached to `boxes` through indexing.
        return {
            "loss_bbox": self.config.bbox_loss_coefficient * l1.sum() / divisor,
            "loss_iou": self.config.giou_loss_coefficient * giou_loss.sum() / divisor,
        }

    def _layer_losses(self, logits, boxes, match, all_gt_labels, all_gt_boxes, normaliser):
        return self._set_losses(logits, boxes, match.batch, match.query, match.gt, match.groups,
                                all_gt_labels, all_gt_boxes, normaliser)

    def _denoising_losses(self, outputs, gt_labels, num_gts, all_gt_labels, all_gt_boxes, normaliser):
        """dn losses of every decoder layer: positive slot 2Mg + j <-> GT j of the image, no rank weights."""
        dn_logits = outputs["dn_logits"].float()
        dn_boxes = outputs["dn_pred_boxes"].float()
        meta = outputs["denoising_meta"]
        num_groups, max_gt = int(meta["num_groups"]), int(meta["max_gt"])
        num_layers, batch_size, num_dn = dn_logits.shape[:3]
        if dn_boxes.shape != dn_logits.shape[:-1] + (4,):
            raise ValueError(f"dn_pred_boxes {tuple(dn_boxes.shape)} does not match dn_logits "
                             f"{tuple(dn_logits.shape)}.")
        if num_dn != 2 * max_gt * num_groups:
            raise ValueError(f"dn_logits has {num_dn} queries but denoising_meta gives 2 * max_gt * num_groups = "
                             f"{2 * max_gt * num_groups}.")
        if num_dn > 0 and max(num_gts) > max_gt:
            raise ValueError(f"An image has {max(num_gts)} GTs but denoising_meta['max_gt'] is {max_gt}.")

        names = [f"d{i}." for i in range(num_layers - 1)] + [""]
        loss_dict = {}
        if num_dn == 0:
            # No GT in the batch: mmdet returns zeros; keep them attached to the graph.
            zero = dn_logits.sum() * 0 + dn_boxes.sum() * 0
            for name in [""] + names[:-1]:
                loss_dict.update({f"{name}dn_loss_{t}": zero for t in ("cls", "bbox", "iou")})
            return loss_dict

        # Fixed pairs, built on the host from shapes only.
        gt_offsets = np.cumsum([0] + num_gts[:-1])
        batch, query, gt = [], [], []
        for b, n in enumerate(num_gts):
            slots = (np.arange(num_groups)[:, None] * 2 * max_gt + np.arange(n)[None]).reshape(-1)
            batch.append(np.full(slots.size, b))
            query.append(slots)
            gt.append(np.tile(np.arange(n), num_groups) + gt_offsets[b])
        index = np.stack([np.concatenate(batch), np.concatenate(query), np.concatenate(gt)]).astype(np.int64)
        index = torch.from_numpy(index)
        batch, query, gt = index.to(dn_logits.device, non_blocking=True).unbind(0)

        per_layer = {}
        for i in range(num_layers):
            losses = self._set_losses(dn_logits[i], dn_boxes[i], batch, query, gt, None, all_gt_labels, all_gt_boxes,
                                      normaliser)
            per_layer[names[i]] = losses
        for name in [""] + names[:-1]:
            loss_dict.update({f"{name}dn_{key}": value for key, value in per_layer[name].items()})
        return loss_dict


__all__ = ["AlignDetrLoss", "prime_sample_weights", "ia_bce_classification_loss"]
