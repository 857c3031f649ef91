"""Training losses of Align-DETR and DINO, numerically equal to mmdetection's `AlignDETRHead` / `DINOHead.loss_by_feat`.

[`AlignDetrLoss`] has two parts, each computed for every prediction layer:

* matching part (decoder layers 0..L-1 and the encoder's top-Q proposals): one-to-k Hungarian matching
  ([`OneToKMatcher`], `k` from `AlignDetrLossConfig.num_gt_repeat_decoder` / `num_gt_repeat_encoder`), IA-BCE
  classification with prime-sample rank weights, L1 and GIoU box losses, all normalised by the number of
  ground-truth boxes in the batch;
* denoising part (decoder layers only): fixed query <-> GT pairs, IA-BCE without rank weights, L1 and GIoU,
  normalised by `#GT * num_groups`.

The loss reads one typed input, [`AlignDetrLossInputs`], built by the model and by the adapters of transformers'
detectors (`loss_adapters.py`). Loss names are mmdetection's own, so the mapping from mmdet's loss dict to ours is
the identity; each term is named where it is computed, from the layer's name in `AlignDetrLossInputs.layer_names`,
and `mmdet_key_order` gives mmdetection's order:

    loss_cls, loss_bbox, loss_iou                 last decoder layer
    d{i}.loss_cls, d{i}.loss_bbox, d{i}.loss_iou  decoder layers i < L-1
    enc_loss_cls, enc_loss_bbox, enc_loss_iou     encoder top-Q proposals
    dn_loss_cls, dn_loss_bbox, dn_loss_iou        denoising queries, last decoder layer
    d{i}.dn_loss_*                                denoising queries, decoder layers i < L-1

[`DinoLoss`] is the same pipeline with other data: one-to-one matching, sigmoid focal classification and another
normaliser (see its docstring). `build_loss(config)` picks one by `config.loss_type`; the hyper-parameters of both are
[`AlignDetrLossConfig`], read off an `AlignDetrConfig` by `AlignDetrLossConfig.from_config`.

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

import dataclasses
import math
import operator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .configuration_align_detr import AlignDetrConfig
from .denoising_align_detr import DenoisingLayout
from .matching_align_detr import LayerMatches, OneToKMatcher
from .targets_align_detr import check_target_structure

# mmdet's weight_reduce_loss divides by (avg_factor + float32 eps); it uses the same reduction for the
# classification, L1 and GIoU losses.
_AVG_FACTOR_EPS = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------------------------------------------------
# Hyper-parameters
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlignDetrLossConfig:
    """Every hyper-parameter of the losses: [`AlignDetrConfig`]'s loss fields under the same names, except that its
    positional `num_gt_repeat` (decoder layers, then the encoder) is split in two named fields.

    Args:
        num_gt_repeat_decoder: queries matched to each GT, per decoder layer from first to last (Align-DETR:
            `(2, ..., 2, 1)`). DINO matches one-to-one whatever it says.
        num_gt_repeat_encoder: the same for the encoder's proposals; None: no encoder term.
        matcher_class_cost, matcher_bbox_cost, matcher_giou_cost, matcher_alpha, matcher_gamma: [`OneToKMatcher`]'s
            focal class cost, L1 and GIoU costs, and the focal cost's alpha and gamma.
        quality_alpha, quality_min, negative_gamma, rank_tau: IA-BCE (Align-DETR): target
            `t = max(p^alpha * IoU^(1 - alpha), quality_min)`, negatives weighted by `p^gamma`, prime-sample weights
            `exp(-rank / tau)`.
        focal_alpha, focal_gamma: the sigmoid focal loss (DINO).
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient: weights of the three terms.
    """

    num_gt_repeat_decoder: tuple[int, ...] = (2, 2, 2, 2, 2, 1)
    num_gt_repeat_encoder: int | None = 2
    matcher_class_cost: float = 2.0
    matcher_bbox_cost: float = 5.0
    matcher_giou_cost: float = 2.0
    matcher_alpha: float = 0.25
    matcher_gamma: float = 2.0
    quality_alpha: float = 0.25
    quality_min: float = 0.01
    negative_gamma: float = 2.0
    rank_tau: float = 1.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    class_loss_coefficient: float = 1.0
    bbox_loss_coefficient: float = 5.0
    giou_loss_coefficient: float = 2.0

    def __post_init__(self):
        decoder = tuple(int(k) for k in self.num_gt_repeat_decoder)
        if not decoder or min(decoder) < 1:
            raise ValueError(f"num_gt_repeat_decoder needs one entry >= 1 per decoder layer, got {decoder}.")
        if self.num_gt_repeat_encoder is not None and self.num_gt_repeat_encoder < 1:
            raise ValueError(f"num_gt_repeat_encoder must be >= 1 (None: no encoder term), got "
                             f"{self.num_gt_repeat_encoder}.")
        object.__setattr__(self, "num_gt_repeat_decoder", decoder)

    @classmethod
    def from_config(cls, config: AlignDetrConfig) -> AlignDetrLossConfig:
        """The loss fields of a model config; the one place where its `num_gt_repeat` list is split."""
        *decoder, encoder = config.num_gt_repeat
        same_names = {field.name: getattr(config, field.name) for field in dataclasses.fields(cls)
                      if not field.name.startswith("num_gt_repeat")}
        return cls(num_gt_repeat_decoder=tuple(decoder), num_gt_repeat_encoder=encoder, **same_names)


# --------------------------------------------------------------------------------------------------------------------
# The loss input and its names
# --------------------------------------------------------------------------------------------------------------------

LOSS_TERMS = ("loss_cls", "loss_bbox", "loss_iou")


def decoder_layer_names(num_layers: int) -> list[str]:
    """mmdetection's loss-name prefixes of L decoder layers: "d0.", ..., "d{L-2}.", then "" for the last."""
    return [f"d{i}." for i in range(num_layers - 1)] + [""]


def mmdet_key_order(layer_names: list[str], encoder: bool = True, denoising: bool = True) -> list[str]:
    """mmdetection's loss-dict order: the last layer, the other layers first to last, the encoder (`enc_`), then the
    denoising terms of the layers in the same order."""
    layers = [layer_names[-1], *layer_names[:-1]]
    keys = [f"{name}{term}" for name in layers + ["enc_"] * encoder for term in LOSS_TERMS]
    return keys + ([f"{name}dn_{term}" for name in layers for term in LOSS_TERMS] if denoising else [])


@dataclasses.dataclass
class AlignDetrLossInputs:
    """A detector's predictions as the loss reads them (any float dtype; the loss computes in float32).

    Args:
        logits: (L, B, Q, C) class logits of the decoder layers, first to last (LAYER-FIRST).
        boxes: (L, B, Q, 4) sigmoid cxcywh boxes of the same queries.
        layer_names: loss-name prefix of each of the L layers, `decoder_layer_names(L)` (`"d0."`, ..., `""` for the
            last) for a plain decoder; the D-FINE adapter names its initial prediction `"pre."`.
        encoder_logits, encoder_boxes: (B, K, C) and (B, K, 4): the encoder's top-K proposals (two-stage), or None.
        dn_logits, dn_boxes: (L, B, D, C) and (L, B, D, 4): the denoising queries of the same layers, or None.
        denoising: where the D denoising queries sit (`DenoisingLayout`, D = 2 * max_gt * num_groups); None exactly
            when there are none.
    """

    logits: torch.Tensor
    boxes: torch.Tensor
    layer_names: list[str]
    encoder_logits: torch.Tensor | None = None
    encoder_boxes: torch.Tensor | None = None
    dn_logits: torch.Tensor | None = None
    dn_boxes: torch.Tensor | None = None
    denoising: DenoisingLayout | None = None

    def __post_init__(self):
        if self.logits.dim() != 4 or self.boxes.shape != self.logits.shape[:-1] + (4,):
            raise ValueError(f"logits must be (L, B, Q, C) and boxes (L, B, Q, 4); got {tuple(self.logits.shape)} and "
                             f"{tuple(self.boxes.shape)}.")
        if len(self.layer_names) != self.logits.shape[0]:
            raise ValueError(f"layer_names has {len(self.layer_names)} names for {self.logits.shape[0]} layers.")
        if (self.encoder_logits is None) != (self.encoder_boxes is None):
            raise ValueError("encoder_logits and encoder_boxes come together (or neither).")
        if not (self.dn_logits is None) == (self.dn_boxes is None) == (self.denoising is None):
            raise ValueError("dn_logits, dn_boxes and denoising come together (or none of them).")
        if self.dn_logits is not None:
            num_dn = 2 * self.denoising.max_gt * self.denoising.num_groups
            expected = self.logits.shape[:2] + (num_dn, self.logits.shape[-1])
            if self.dn_logits.shape != expected or self.dn_boxes.shape != expected[:-1] + (4,):
                raise ValueError(f"dn_logits {tuple(self.dn_logits.shape)} and dn_boxes {tuple(self.dn_boxes.shape)} "
                                 f"do not fit {self.denoising} (expected {tuple(expected)}: (L, B, D, C), D = 2 * "
                                 f"max_gt * num_groups).")


# --------------------------------------------------------------------------------------------------------------------
# Loss terms
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


# A classification term maps one prediction set and its positives to (summed classification loss, weights of the
# positives' box losses or None for 1). The loss classes below differ in their term and normaliser, not in code.


@dataclasses.dataclass(frozen=True)
class IaBceClassification:
    """Align-DETR's IA-BCE: soft target `t = max(p^alpha * IoU^(1 - alpha), quality_min)` at each positive (times its
    prime-sample weight where the positives are ranked), target 0 weighted by `p^gamma` elsewhere. The box losses
    take the same prime-sample weights."""

    alpha: float
    quality_min: float
    gamma: float
    tau: float

    @classmethod
    def from_loss_config(cls, config: AlignDetrLossConfig) -> IaBceClassification:
        return cls(config.quality_alpha, config.quality_min, config.negative_gamma, config.rank_tau)

    def __call__(self, logits, boxes, positives: LayerMatches, gt_labels, gt_boxes):
        batch, query, gt = positives.batch, positives.query, positives.gt
        labels = gt_labels[gt]
        with torch.no_grad():  # the quality target is detached
            prob = logits[batch, query, labels].sigmoid()
            iou = box_iou(box_cxcywh_to_xyxy(boxes[batch, query]), box_cxcywh_to_xyxy(gt_boxes[gt]), aligned=True)
            quality = (prob.pow(self.alpha) * iou.pow(1 - self.alpha)).clamp(min=self.quality_min)
        weight = None if positives.groups is None else prime_sample_weights(quality, positives.groups, self.tau)
        targets = quality if weight is None else quality * weight
        return ia_bce_classification_loss(logits, (batch, query, labels), targets, self.gamma), weight


@dataclasses.dataclass(frozen=True)
class SigmoidFocalClassification:
    """DINO's sigmoid focal loss: one-hot target at each positive's (query, GT class), 0 elsewhere; box weight 1."""

    alpha: float
    gamma: float

    @classmethod
    def from_loss_config(cls, config: AlignDetrLossConfig) -> SigmoidFocalClassification:
        return cls(config.focal_alpha, config.focal_gamma)

    def __call__(self, logits, boxes, positives: LayerMatches, gt_labels, gt_boxes):
        positive_index = (positives.batch, positives.query, gt_labels[positives.gt])
        return sigmoid_focal_loss(logits, positive_index, self.alpha, self.gamma), None


def count_gt_boxes(num_gts: list[int], num_queries: int) -> int:
    """Align-DETR's normaliser of the matching part: the number of GT boxes (not the ~k * #GT positives)."""
    return sum(num_gts)


def count_matched_queries(num_gts: list[int], num_queries: int) -> int:
    """DINO's (mmdetection's number of positives): one-to-one, that is `min(#GT, Q)` per image."""
    return sum(min(num_gt, num_queries) for num_gt in num_gts)


class LossNormalisers(NamedTuple):
    """The counts that divided the terms of one loss call, (matching part, denoising part), before mmdetection's
    clamp to >= 1: `local` this process's own, `reduced` their mean over the processes of `torch.distributed` (a (2,)
    device tensor), or the local counts without it."""

    local: tuple[float, float]
    reduced: tuple[float, float] | torch.Tensor


def _reduce_mean(values: list[float], device: torch.device) -> list[float] | torch.Tensor:
    """Average counts over processes (mmdet's reduce_mean) when torch.distributed is initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float32, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor / torch.distributed.get_world_size()


# --------------------------------------------------------------------------------------------------------------------
# The loss modules
# --------------------------------------------------------------------------------------------------------------------


class AlignDetrLoss(nn.Module):
    """Align-DETR training loss (mmdetection's `AlignDETRHead.loss_by_feat`), see the module docstring.

    Args:
        num_labels: classes, one sigmoid logit each.
        loss_config: the hyper-parameters; defaults to Align-DETR's (6 decoder layers). `build_loss(config)` builds
            the loss of a model config.

    Attributes:
        normalisers ([`LossNormalisers`]): the counts that divided the last call's terms (None before the first).
    """

    # What makes the loss Align-DETR's (DinoLoss sets other values): the classification term (built from the loss
    # config), the count that divides the matching part, and whether num_gt_repeat is used or every layer is
    # matched one-to-one.
    classification_term = IaBceClassification
    normaliser = staticmethod(count_gt_boxes)
    one_to_one = False

    def __init__(self, num_labels: int, loss_config: AlignDetrLossConfig | None = None):
        super().__init__()
        try:
            self.num_labels = operator.index(num_labels)
        except TypeError:
            raise TypeError(f"{type(self).__name__}(num_labels, loss_config) takes the number of classes, not "
                            f"{type(num_labels).__name__}; build_loss(config) builds the loss of a model config."
                            ) from None
        self.loss_config = AlignDetrLossConfig() if loss_config is None else loss_config
        config = self.loss_config
        self.matcher = OneToKMatcher(config.matcher_class_cost, config.matcher_bbox_cost, config.matcher_giou_cost,
                                     config.matcher_alpha, config.matcher_gamma)
        self.classification = self.classification_term.from_loss_config(config)
        self.normalisers: LossNormalisers | None = None

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, loss_config={self.loss_config}"

    def forward(self, inputs: AlignDetrLossInputs, targets: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute every loss term.

        Args:
            inputs: the predictions, see [`AlignDetrLossInputs`].
            targets: per image {"class_labels": (n,) int64, "boxes": (n, 4) normalised cxcywh}.
        Returns:
            (loss, loss_dict) with loss = sum of the loss_dict values (mmdet names, see module docstring).
        """
        # The loss is always computed in float32 (stable under fp16/bf16 autocast and half-precision inputs).
        with torch.autocast(device_type=inputs.logits.device.type, enabled=False):
            return self._forward_float32(inputs, targets)

    @torch.no_grad()
    def match(self, inputs: AlignDetrLossInputs, targets: list[dict]) -> list[LayerMatches]:
        """The matches of every matched layer (decoder layers first to last, then the encoder), as the loss makes
        them."""
        with torch.autocast(device_type=inputs.logits.device.type, enabled=False):
            _, layers, ks, gt_labels, gt_boxes = self._matched_layers(inputs, targets)
            return self.matcher(layers, gt_labels, gt_boxes, ks)

    def _forward_float32(self, inputs: AlignDetrLossInputs, targets: list[dict]):
        names, layers, ks, gt_labels, gt_boxes = self._matched_layers(inputs, targets)
        matches = self.matcher(layers, gt_labels, gt_boxes, ks)

        device = layers[0][0].device
        num_gts = [int(labels.shape[0]) for labels in gt_labels]
        all_gt_labels, all_gt_boxes = torch.cat(gt_labels), torch.cat(gt_boxes)
        dn_groups = inputs.denoising.num_groups if inputs.denoising is not None else 0
        match_count = self.normaliser(num_gts, layers[0][0].shape[1])
        local_counts = (float(match_count), float(sum(num_gts) * dn_groups))
        counts = _reduce_mean(list(local_counts), device)
        self.normalisers = LossNormalisers(local_counts, counts if torch.is_tensor(counts) else tuple(counts))
        # mmdet: max(reduce_mean(count), 1), then weight_reduce_loss adds float32 eps.
        match_normaliser = max(counts[0], 1) if isinstance(counts, list) else counts[0].clamp(min=1)
        dn_normaliser = max(counts[1], 1) if isinstance(counts, list) else counts[1].clamp(min=1)

        losses = {}
        for name, (logits, boxes), match in zip(names, layers, matches):
            terms = self.layer_losses(logits, boxes, match, all_gt_labels, all_gt_boxes, match_normaliser)
            losses.update({f"{name}{term}": value for term, value in terms.items()})
        if inputs.denoising is not None:
            losses.update(self._denoising_losses(inputs, num_gts, all_gt_labels, all_gt_boxes, dn_normaliser))
        with_encoder = len(names) > len(inputs.layer_names)
        order = mmdet_key_order(inputs.layer_names, encoder=with_encoder, denoising=inputs.denoising is not None)
        loss_dict = {key: losses[key] for key in order}
        return sum(loss_dict.values()), loss_dict

    def _matched_layers(self, inputs: AlignDetrLossInputs, targets: list[dict]):
        """Loss-name prefix and float32 (logits, boxes) of every matched layer (decoder layers, then the encoder if
        the loss config gives it a k), their k, and the checked targets on the device."""
        num_layers, batch_size = inputs.logits.shape[:2]
        names = list(inputs.layer_names)
        layers = [(logits, boxes) for logits, boxes in zip(inputs.logits.float(), inputs.boxes.float())]
        if inputs.encoder_logits is not None and self.loss_config.num_gt_repeat_encoder is not None:
            names.append("enc_")
            layers.append((inputs.encoder_logits.float(), inputs.encoder_boxes.float()))
        for name, (logits, boxes) in zip(names, layers):
            if (logits.dim() != 3 or logits.shape[0] != batch_size or logits.shape[-1] != self.num_labels
                    or boxes.shape != logits.shape[:-1] + (4,)):
                raise ValueError(f"Prediction layer '{name or 'last'}' has logits {tuple(logits.shape)} and boxes "
                                 f"{tuple(boxes.shape)}; expected (B, Q, C) and (B, Q, 4) with B = {batch_size} and "
                                 f"C = num_labels = {self.num_labels}.")
        ks = self._num_gt_repeat(num_layers, len(layers) > num_layers)
        check_target_structure(targets, batch_size)
        device = inputs.logits.device
        gt_labels = [t["class_labels"].to(device=device, dtype=torch.long) for t in targets]
        gt_boxes = [t["boxes"].to(device=device, dtype=torch.float32) for t in targets]
        return names, layers, ks, gt_labels, gt_boxes

    def _num_gt_repeat(self, num_decoder_layers: int, with_encoder: bool) -> list[int]:
        """k of each matched layer: the decoder layers, then (with_encoder) the encoder."""
        config = self.loss_config
        if len(config.num_gt_repeat_decoder) != num_decoder_layers:
            raise ValueError(f"loss_config.num_gt_repeat_decoder has {len(config.num_gt_repeat_decoder)} entries but "
                             f"the outputs have {num_decoder_layers} decoder layers.")
        ks = [*config.num_gt_repeat_decoder, config.num_gt_repeat_encoder][: num_decoder_layers + with_encoder]
        return [1] * len(ks) if self.one_to_one else ks

    def layer_losses(self, logits, boxes, positives: LayerMatches, gt_labels, gt_boxes, normaliser) -> dict:
        """`loss_cls`, `loss_bbox`, `loss_iou` of one prediction set `logits (B, Q, C)`, `boxes (B, Q, 4)` given its
        positives (`gt_labels`, `gt_boxes`: the batch's concatenated targets), divided by `normaliser`."""
        config = self.loss_config
        divisor = normaliser + _AVG_FACTOR_EPS
        loss_cls, weight = self.classification(logits, boxes, positives, gt_labels, gt_boxes)
        pred, target = boxes[positives.batch, positives.query], gt_boxes[positives.gt]
        l1 = (pred - target).abs().sum(-1)
        giou_loss = 1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target), aligned=True)
        if weight is not None:
            l1, giou_loss = l1 * weight, giou_loss * weight
        # With no positive the sums are empty (0) but still attached to `boxes` through indexing.
        return {
            "loss_cls": config.class_loss_coefficient * loss_cls / divisor,
            "loss_bbox": config.bbox_loss_coefficient * l1.sum() / divisor,
            "loss_iou": config.giou_loss_coefficient * giou_loss.sum() / divisor,
        }

    def _denoising_losses(self, inputs: AlignDetrLossInputs, num_gts, all_gt_labels, all_gt_boxes, normaliser):
        """dn losses of every decoder layer: positive slot 2Mg + j <-> GT j of the image, no rank weights."""
        dn_logits, dn_boxes = inputs.dn_logits.float(), inputs.dn_boxes.float()
        num_groups, max_gt = inputs.denoising
        if dn_logits.shape[2] == 0:
            # No GT in the batch: mmdet returns zeros; keep them attached to the graph.
            zero = dn_logits.sum() * 0 + dn_boxes.sum() * 0
            return {f"{name}dn_{term}": zero for name in inputs.layer_names for term in LOSS_TERMS}
        if max(num_gts) > max_gt:
            raise ValueError(f"An image has {max(num_gts)} GTs but the denoising layout has max_gt={max_gt}.")

        # Fixed pairs, built on the host from shapes only.
        gt_offsets = np.cumsum([0] + num_gts[:-1])
        batch, query, gt = [], [], []
        for b, n in enumerate(num_gts):
            slots = (np.arange(num_groups)[:, None] * 2 * max_gt + np.arange(n)[None]).reshape(-1)
            batch.append(np.full(slots.size, b))
            query.append(slots)
            gt.append(np.tile(np.arange(n), num_groups) + gt_offsets[b])
        index = np.stack([np.concatenate(batch), np.concatenate(query), np.concatenate(gt)]).astype(np.int64)
        pairs = LayerMatches(*torch.from_numpy(index).to(dn_logits.device, non_blocking=True).unbind(0), groups=None)

        losses = {}
        for name, logits, boxes in zip(inputs.layer_names, dn_logits, dn_boxes):
            terms = self.layer_losses(logits, boxes, pairs, all_gt_labels, all_gt_boxes, normaliser)
            losses.update({f"{name}dn_{term}": value for term, value in terms.items()})
        return losses


class DinoLoss(AlignDetrLoss):
    """mmdetection's DINO loss (`DINOHead.loss_by_feat`): [`AlignDetrLoss`]'s pipeline (same prediction layers, target
    checks, single host sync, denoising pairs, loss names and order) with other data:

    * one-to-one Hungarian matching on every decoder layer and on the encoder's proposals (same matching costs);
      `num_gt_repeat_*` only say which layers there are;
    * sigmoid focal classification (`focal_alpha`, `focal_gamma`) with a one-hot target at each matched (query, GT
      class) entry, summed over all Q x C entries; no IoU-aware targets and no rank weights (box weight 1);
    * the matching part divided by the number of matched queries (`sum_b min(G_b, Q)`: the number of GT boxes unless
      an image has more GTs than queries); the denoising part by `#GT * num_groups`, as Align-DETR.
    """

    classification_term = SigmoidFocalClassification
    normaliser = staticmethod(count_matched_queries)
    one_to_one = True


# `AlignDetrConfig.loss_type` -> loss class
LOSS_CLASSES = {"align_detr": AlignDetrLoss, "dino": DinoLoss}


def build_loss(config: AlignDetrConfig) -> AlignDetrLoss:
    """The training loss of a model config: the class chosen by `config.loss_type`, its hyper-parameters read off
    the config by `AlignDetrLossConfig.from_config`."""
    if config.loss_type not in LOSS_CLASSES:
        raise ValueError(f"config.loss_type must be one of {tuple(LOSS_CLASSES)}, got {config.loss_type!r}.")
    return LOSS_CLASSES[config.loss_type](config.num_labels, AlignDetrLossConfig.from_config(config))


__all__ = ["LOSS_CLASSES", "LOSS_TERMS", "AlignDetrLoss", "AlignDetrLossConfig", "AlignDetrLossInputs",
           "DenoisingLayout", "DinoLoss", "IaBceClassification", "LossNormalisers", "SigmoidFocalClassification",
           "build_loss",
           "count_gt_boxes", "count_matched_queries", "decoder_layer_names", "ia_bce_classification_loss",
           "mmdet_key_order", "prime_sample_weights", "sigmoid_focal_loss"]
