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

Host synchronisation: every cost matrix of one call (all layers, all images, encoder) is computed on the device,
concatenated into one flat tensor together with a few target-validation statistics, and moved to the CPU with a
single `.cpu()`. `solve_one_to_k_assignments` solves all problems from that CPU tensor; the resulting indices go
back to the device in one host-to-device copy. Nothing else in the loss reads a device value on the host.

Edge cases:
* an image without GT contributes only its all-negative classification term (box losses of that image are 0);
* if the batch has no GT at all, every normaliser is clamped to 1 and denoising (if switched on) has D = 0: the
  dn keys are returned as zeros attached to the graph;
* `k` is reduced per image to `max(1, min(k, Q // G))` (mmdet's rule). With more GTs than queries (G > Q), k = 1 and
  the rectangular assignment matches every query to a distinct GT, i.e. Q of the G GTs get one query each and the
  other GTs stay unmatched (they still count in the normaliser);
* non-finite costs (NaN / inf predictions) are replaced by a large finite cost before solving;
* bad targets raise a `ValueError` naming the image (and the first bad box): class ids outside [0, num_labels),
  NaN/inf boxes, negative width/height, values outside [0, 1] (pixel boxes). Zero-area boxes and boxes whose
  corners stick out of the image are accepted (the loss stays finite). `validate_labels` runs the same checks
  (plus NaN/inf pixels) up front, before the model uses the labels for denoising queries.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import is_scipy_available

from .box_ops import box_cxcywh_to_xyxy, box_iou, generalized_box_iou
from .configuration_align_detr import AlignDetrConfig

# Training only: inference through remote code (a saved folder loaded without this package) must not need scipy,
# and transformers checks a remote module's imports except those under an `is_..._available()` test.
if is_scipy_available():
    from scipy.optimize import linear_sum_assignment

# mmdet's weight_reduce_loss divides by (avg_factor + float32 eps); it uses the same reduction for the
# classification, L1 and GIoU losses.
_AVG_FACTOR_EPS = torch.finfo(torch.float32).eps
# Cost that replaces NaN/inf entries before the Hungarian solver (real costs are O(10)).
_LARGE_COST = 1e8
# Target statistics appended to the flat cost tensor, per image: min label, max label, #non-finite box values,
# #boxes with negative w/h, #boxes with a value outside [0, 1] (see `_target_statistics`).
_NUM_TARGET_STATS = 5
# Normalised box values may exceed [0, 1] by this much (float rounding) before they are reported as pixel boxes.
_BOX_RANGE_TOLERANCE = 1e-3


# --------------------------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------------------------


def effective_num_gt_repeat(k: int, num_queries: int, num_gt: int) -> int:
    """mmdet's per-image rule `max(1, min(k, Q // G))`: every GT gets k distinct queries when `k * G <= Q`."""
    if num_gt == 0:
        return 0
    return max(1, min(k, num_queries // num_gt))


@torch.no_grad()
def matching_cost(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    config: AlignDetrConfig,
) -> torch.Tensor:
    """Hungarian cost of mmdet's `FocalLossCost + BBoxL1Cost + IoUCost(giou)`.

    Args:
        logits: (..., Q, C) class logits.
        pred_boxes: (..., Q, 4) normalised cxcywh.
        gt_labels: (G,) int64 class ids (already valid indices).
        gt_boxes: (G, 4) normalised cxcywh.
    Returns:
        (..., Q, G) float32 cost.
    """
    lead_shape = logits.shape[:-1]
    eps, alpha, gamma = 1e-12, config.matcher_alpha, config.matcher_gamma
    prob = logits.float()[..., gt_labels].sigmoid()  # (..., Q, G): only the GT classes are needed
    neg_cost = -(1 - prob + eps).log() * (1 - alpha) * prob.pow(gamma)
    pos_cost = -(prob + eps).log() * alpha * (1 - prob).pow(gamma)
    class_cost = pos_cost - neg_cost

    flat_boxes = pred_boxes.float().reshape(-1, 4)
    gt_boxes = gt_boxes.float()
    bbox_cost = torch.cdist(flat_boxes, gt_boxes, p=1)
    giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(gt_boxes))

    box_cost = config.matcher_bbox_cost * bbox_cost + config.matcher_giou_cost * giou_cost
    return config.matcher_class_cost * class_cost + box_cost.reshape(*lead_shape, -1)


def solve_one_to_k_assignments(
    flat_costs: torch.Tensor, problems: list[tuple[int, int, int]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Solve every one-to-k assignment of a training step from ONE CPU tensor (the only host-side matching step).

    Args:
        flat_costs: 1-D CPU tensor, the concatenation of the row-major flattened (Q_i, G_i) cost matrices; it may
            hold extra trailing values (they are ignored).
        problems: one `(num_queries Q_i, num_gt G_i, k_i)` per matrix, in the order of `flat_costs`. `k_i` is the
            requested repeat; it is reduced to `max(1, min(k_i, Q_i // G_i))`.
    Returns:
        Per problem, `(query_indices, gt_indices)` int64 numpy arrays of equal length, sorted by query: the cost
        matrix is tiled k times along the GT axis (columns g0..gG-1, g0..gG-1, ...), solved with
        `scipy.optimize.linear_sum_assignment`, and column c maps to GT `c % G`. Each query gets at most one GT;
        each GT gets exactly `k` queries when `k * G <= Q` (with G > Q, Q of the GTs get one query each).
    """
    costs = flat_costs.detach().cpu().numpy()
    results, offset = [], 0
    for num_queries, num_gt, k in problems:
        size = num_queries * num_gt
        if size == 0:
            results.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
            offset += size
            continue
        cost = costs[offset : offset + size].reshape(num_queries, num_gt)
        offset += size
        # scipy rejects NaN/inf; a NaN prediction should simply be a bad match.
        cost = np.nan_to_num(cost, nan=_LARGE_COST, posinf=_LARGE_COST, neginf=-_LARGE_COST)
        k = effective_num_gt_repeat(k, num_queries, num_gt)
        if not is_scipy_available():
            raise ImportError("The Align-DETR loss (training) needs scipy for its matching: `pip install scipy`.")
        rows, cols = linear_sum_assignment(np.tile(cost, (1, k)))
        results.append((rows.astype(np.int64), (cols % num_gt).astype(np.int64)))
    if offset > costs.shape[0]:
        raise ValueError(f"flat_costs has {costs.shape[0]} values but the problems need {offset}.")
    return results


def _positive_index_arrays(
    solutions: list[tuple[np.ndarray, np.ndarray]], num_gts: list[int], num_layers: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Host-side bookkeeping: turn per-(image, layer) solutions into per-layer batch index arrays.

    `solutions` are ordered image-major, layer-minor, skipping images without GT. Returns per layer
    `(batch, query, gt, groups)`: (P,) arrays sorted by GT (gt indexes the batch's concatenated targets) and
    `groups` (num_gt_total, k_max), the positions in P of each GT's positives, padded with -1 (for rank weights).
    """
    solutions = iter(solutions)
    gt_offsets = np.cumsum([0] + num_gts[:-1])
    per_layer = [[] for _ in range(num_layers)]
    for b, num_gt in enumerate(num_gts):
        if num_gt == 0:
            continue
        for layer_index in range(num_layers):
            queries, gts = next(solutions)
            per_layer[layer_index].append((np.full(len(queries), b, dtype=np.int64), queries, gts + gt_offsets[b]))

    num_gt_total = sum(num_gts)
    arrays = []
    for layer_matches in per_layer:
        batch, query, gt = (np.concatenate([m[i] for m in layer_matches] or [np.zeros(0, np.int64)]) for i in range(3))
        # Group the positives by GT (stable, so within a GT they stay sorted by query).
        order = np.argsort(gt, kind="stable")
        batch, query, gt = batch[order], query[order], gt[order]
        per_gt = np.bincount(gt, minlength=num_gt_total)
        groups = np.full((num_gt_total, int(per_gt.max()) if per_gt.size else 0), -1, dtype=np.int64)
        slot = np.arange(len(gt)) - (np.cumsum(per_gt) - per_gt)[gt]
        groups[gt, slot] = np.arange(len(gt))
        arrays.append((batch, query, gt, groups))
    return arrays


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


def _validate_targets(targets: list[dict], batch_size: int) -> None:
    """Shape / key / dtype checks that need no device value (label range and finiteness are checked later)."""
    if not isinstance(targets, (list, tuple)) or len(targets) != batch_size:
        raise ValueError(f"targets must be a list of {batch_size} dicts (one per image), got {type(targets)} "
                         f"of length {len(targets) if hasattr(targets, '__len__') else '?'}.")
    for i, target in enumerate(targets):
        for key in ("class_labels", "boxes"):
            if key not in target:
                raise ValueError(f"targets[{i}] is missing the key '{key}'.")
        labels, boxes = target["class_labels"], target["boxes"]
        if not torch.is_tensor(labels) or labels.dim() != 1:
            raise ValueError(f"targets[{i}]['class_labels'] must be a 1-D tensor, got shape "
                             f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels)}.")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"targets[{i}]['class_labels'] must hold integer class ids, got {labels.dtype}.")
        if not torch.is_tensor(boxes) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must be a (n, 4) tensor, got shape "
                             f"{tuple(boxes.shape) if torch.is_tensor(boxes) else type(boxes)}.")
        if not boxes.is_floating_point():
            raise ValueError(f"targets[{i}]['boxes'] must be floating point, got {boxes.dtype}.")
        if boxes.shape[0] != labels.shape[0]:
            raise ValueError(f"targets[{i}] has {labels.shape[0]} class_labels but {boxes.shape[0]} boxes.")


def _target_statistics(labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(_NUM_TARGET_STATS,) float32 device tensor: min label, max label, #non-finite box values, #boxes with a
    negative width/height, #boxes with a coordinate outside [0, 1] (cxcywh, normalised)."""
    if labels.numel() == 0:
        return boxes.new_zeros(_NUM_TARGET_STATS, dtype=torch.float32)
    finite = torch.isfinite(boxes)
    return torch.stack([
        labels.min().float(), labels.max().float(), (~finite).sum().float(),
        (boxes[:, 2:] < 0).any(-1).sum().float(),
        ((boxes < -_BOX_RANGE_TOLERANCE) | (boxes > 1 + _BOX_RANGE_TOLERANCE)).any(-1).sum().float(),
    ])


def _first_index(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(mask.shape[0], -1).any(-1))[0, 0])


def _check_target_statistics(
    stats: torch.Tensor, num_gts: list[int], num_labels: int, gt_boxes: list[torch.Tensor] | None = None
) -> None:
    """Raise for bad label ids / bad boxes, from the (B, _NUM_TARGET_STATS) statistics that came back with the
    costs. `gt_boxes` is read (an extra device read, on the error path only) to name the first bad box."""
    for i, (row, num_gt) in enumerate(zip(stats.tolist(), num_gts)):
        if num_gt == 0:
            continue
        label_min, label_max, num_nonfinite, num_negative, num_outside = row
        if label_min < 0 or label_max >= num_labels:
            raise ValueError(f"targets[{i}]['class_labels'] must lie in [0, {num_labels}) (num_labels), got values "
                             f"in [{int(label_min)}, {int(label_max)}].")
        where = ""
        if num_nonfinite > 0:
            if gt_boxes is not None:
                where = f" (first at box {_first_index(~torch.isfinite(gt_boxes[i]))})"
            raise ValueError(f"targets[{i}]['boxes'] holds {int(num_nonfinite)} NaN/inf values{where}.")
        if num_negative > 0:
            if gt_boxes is not None:
                j = _first_index(gt_boxes[i][:, 2:] < 0)
                where = f"; box {j} is {[round(v, 4) for v in gt_boxes[i][j].tolist()]}"
            raise ValueError(f"targets[{i}]['boxes'] has {int(num_negative)} box(es) with a negative width or "
                             f"height (boxes are cxcywh){where}.")
        if num_outside > 0:
            if gt_boxes is not None:
                j = _first_index((gt_boxes[i] < -_BOX_RANGE_TOLERANCE) | (gt_boxes[i] > 1 + _BOX_RANGE_TOLERANCE))
                where = f"; box {j} is {[round(v, 4) for v in gt_boxes[i][j].tolist()]}"
            raise ValueError(f"targets[{i}]['boxes'] has {int(num_outside)} box(es) with values outside [0, 1]: "
                             f"boxes must be cxcywh normalised by the image size, not pixels{where}.")


def validate_labels(labels: list[dict], num_labels: int, pixel_values: torch.Tensor | None = None) -> None:
    """Check model `labels` (and optionally `pixel_values`) before they are used, with one device read.

    Raises a `ValueError` naming the image (and box) for: a wrong number of label dicts, missing keys, wrong
    shapes/dtypes, class ids outside [0, num_labels), NaN/inf boxes, negative box width/height, boxes with values
    outside [0, 1] (pixel boxes), and -- when `pixel_values` is given -- NaN/inf pixels. Zero-area boxes and boxes
    that stick out of the image (cxcywh inside [0, 1], corners outside) are accepted: the loss stays finite.
    """
    batch_size = len(labels) if pixel_values is None else pixel_values.shape[0]
    _validate_targets(labels, batch_size)
    pieces = [_target_statistics(t["class_labels"], t["boxes"]) for t in labels]
    device = pixel_values.device if pixel_values is not None else None
    if pixel_values is not None:
        nonfinite = (~torch.isfinite(pixel_values)).reshape(batch_size, -1).any(-1).float()
        pieces = [p.to(device) for p in pieces] + [nonfinite]
    flat = torch.cat(pieces).cpu() if pieces else torch.zeros(0)  # the one device -> host read
    if pixel_values is not None:
        bad = torch.nonzero(flat[-batch_size:]).flatten().tolist()
        if bad:
            raise ValueError(f"Found non-finite values in pixel_values of image {bad[0]} "
                             f"(images with NaN/inf: {bad}).")
        flat = flat[:-batch_size]
    _check_target_statistics(flat.view(-1, _NUM_TARGET_STATS), [len(t["class_labels"]) for t in labels], num_labels,
                             [t["boxes"] for t in labels])


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
        _validate_targets(targets, batch_size)
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
    def match(self, outputs: dict, targets: list[dict]) -> list[dict[str, torch.Tensor]]:
        """One-to-k assignments of every prediction layer (decoder 0..L-1, then the encoder).

        Returns per layer a dict of device tensors: "batch", "query", "gt" (P,) -- gt indexes the batch's
        concatenated targets -- and "groups" (num_gt_total, k_max), see `_match_all_layers`.
        """
        with torch.autocast(device_type=outputs["intermediate_logits"].device.type, enabled=False):
            layers, _, gt_labels, gt_boxes = self._prediction_layers(outputs, targets)
            return self._match_all_layers(layers, gt_labels, gt_boxes, [len(labels) for labels in gt_labels])

    def _forward_float32(self, outputs: dict, targets: list[dict]):
        layers, names, gt_labels, gt_boxes = self._prediction_layers(outputs, targets)
        num_layers = outputs["intermediate_logits"].shape[0]
        device = layers[0][0].device
        num_gts = [int(labels.shape[0]) for labels in gt_labels]
        all_gt_labels = torch.cat(gt_labels)
        all_gt_boxes = torch.cat(gt_boxes)

        matches = self._match_all_layers(layers, gt_labels, gt_boxes, num_gts)

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

    def _match_all_layers(self, layers, gt_labels, gt_boxes, num_gts):
        """One-to-k matching of every prediction layer; one device->host and one host->device transfer in total.

        Returns, per layer, a dict of device index tensors: "batch", "query", "gt" (index into the batch's
        concatenated GTs), each (P,), and "groups" (num_gt_total, k_max) positions of each GT's positives in P.
        """
        device = layers[0][0].device
        num_classes = layers[0][0].shape[-1]
        same_num_queries = len({logits.shape[1] for logits, _ in layers}) == 1

        pieces, problems = [], []
        for b in range(len(num_gts)):
            if num_gts[b] == 0:
                continue
            # Clamp only so that a bad label cannot index out of range (device assert); it is reported below.
            labels = gt_labels[b].clamp(0, num_classes - 1)
            if same_num_queries:  # all layers of one image in one go: (num_layers, Q, G)
                cost = matching_cost(
                    torch.stack([lg[b] for lg, _ in layers]), torch.stack([bx[b] for _, bx in layers]),
                    labels, gt_boxes[b], self.config,
                )
                pieces.append(cost.reshape(-1))
            else:
                for lg, bx in layers:
                    pieces.append(matching_cost(lg[b], bx[b], labels, gt_boxes[b], self.config).reshape(-1))
            for layer_index, (lg, _) in enumerate(layers):
                problems.append((lg.shape[1], num_gts[b], self.num_gt_repeat[layer_index]))

        # Target checks that read device values travel with the costs (no extra synchronisation).
        stats = [_target_statistics(labels, boxes) for labels, boxes in zip(gt_labels, gt_boxes)]
        flat = torch.cat(pieces + stats).cpu()  # the single device -> host transfer of the step
        _check_target_statistics(flat[-_NUM_TARGET_STATS * len(num_gts):].view(-1, _NUM_TARGET_STATS),
                                 num_gts, num_classes, gt_boxes)
        solutions = solve_one_to_k_assignments(flat, problems)
        host_arrays = _positive_index_arrays(solutions, num_gts, len(layers))

        # One host -> device copy for all index tensors, then split on the device.
        packed = np.concatenate([np.concatenate([b, q, g, gr.reshape(-1)]) for b, q, g, gr in host_arrays])
        packed = torch.from_numpy(packed).to(device, non_blocking=True)
        matches, offset = [], 0
        for batch, query, gt, groups in host_arrays:
            p, ng = len(batch), groups.size
            chunk = packed[offset : offset + 3 * p + ng]
            offset += 3 * p + ng
            matches.append({"batch": chunk[:p], "query": chunk[p : 2 * p], "gt": chunk[2 * p : 3 * p],
                            "groups": chunk[3 * p :].view(groups.shape)})
        return matches

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
        return self._set_losses(logits, boxes, match["batch"], match["query"], match["gt"], match["groups"],
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


__all__ = ["AlignDetrLoss", "matching_cost", "solve_one_to_k_assignments", "prime_sample_weights",
           "ia_bce_classification_loss", "effective_num_gt_repeat"]
