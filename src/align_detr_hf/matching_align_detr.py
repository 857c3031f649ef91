"""One-to-k matching, Align-DETR's assignment (mmdetection's `AlignDETRHead`), with one host synchronisation per step.

[`OneToKMatcher`] matches every prediction layer of a training step (decoder layers, encoder proposals) to the ground
truth. The cost is mmdetection's `FocalLossCost + BBoxL1Cost + IoUCost(giou)`; the (Q, G) cost matrix of a layer and
image is tiled k times along the GT axis and solved with scipy's Hungarian solver, so each GT gets k distinct queries
(k = 1 is DETR's one-to-one matching). k is reduced per image to `max(1, min(k, Q // G))` (mmdetection's rule): with
more GTs than queries (G > Q), Q of the GTs get one query each and the others stay unmatched.

Host synchronisation: the cost matrices of one call (all layers, all images) are computed on the device and
concatenated into one flat tensor, together with the target statistics of `targets_align_detr` (so bad targets are
reported without a read of their own), and moved to the host with a single `.cpu()`. The solutions go back to the
device in one host-to-device copy. Non-finite costs (NaN / inf predictions) are replaced by a large finite cost before
solving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from transformers.utils import is_scipy_available

# Training only: inference through remote code (a saved folder loaded without this package) must not need scipy,
# and transformers checks a remote module's imports except those under an `is_..._available()` test.
if is_scipy_available():
    from scipy.optimize import linear_sum_assignment

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .targets_align_detr import NUM_TARGET_STATISTICS, check_target_statistics, target_statistics

# Cost that replaces NaN/inf entries before the Hungarian solver (real costs are O(10)).
_LARGE_COST = 1e8


class LayerMatches(NamedTuple):
    """The positives of one prediction layer, all images: query `query[i]` of image `batch[i]` predicts GT `gt[i]`.

    All (P,) int64 device tensors, sorted by GT (and by query within a GT); `gt` indexes the batch's concatenated
    targets. `groups` (num_gt, k_max) holds the positions in P of each GT's positives, padded with -1 (it ranks the
    positives of one GT); None for fixed pairs (the denoising queries).
    """

    batch: torch.Tensor
    query: torch.Tensor
    gt: torch.Tensor
    groups: torch.Tensor | None


def effective_num_gt_repeat(k: int, num_queries: int, num_gt: int) -> int:
    """mmdet's per-image rule `max(1, min(k, Q // G))`: every GT gets k distinct queries when `k * G <= Q`."""
    if num_gt == 0:
        return 0
    return max(1, min(k, num_queries // num_gt))


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


class OneToKMatcher:
    """mmdetection's `FocalLossCost + BBoxL1Cost + IoUCost(giou)`, tiled k times along the GT axis (module docstring).

    Args:
        class_cost, bbox_cost, giou_cost: weights of the focal class cost, the L1 cost of normalised cxcywh boxes and
            the negative GIoU.
        alpha, gamma: the focal class cost's parameters.
    """

    def __init__(self, class_cost: float = 2.0, bbox_cost: float = 5.0, giou_cost: float = 2.0, alpha: float = 0.25,
                 gamma: float = 2.0):
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost
        self.alpha, self.gamma = alpha, gamma

    def __repr__(self):
        return (f"{type(self).__name__}(class_cost={self.class_cost}, bbox_cost={self.bbox_cost}, "
                f"giou_cost={self.giou_cost}, alpha={self.alpha}, gamma={self.gamma})")

    @torch.no_grad()
    def __call__(
        self,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        gt_labels: list[torch.Tensor],
        gt_boxes: list[torch.Tensor],
        ks: Sequence[int],
    ) -> list[LayerMatches]:
        """Match every prediction layer; one device->host and one host->device copy in all.

        Args:
            layers: per layer `(logits (B, Q, C), boxes (B, Q, 4) normalised cxcywh)`, on one device; Q may differ
                between layers, C may not.
            gt_labels, gt_boxes: per image `(G_b,)` int64 class ids and `(G_b, 4)` normalised cxcywh, on that device
                (structure already checked, see `targets_align_detr.check_target_structure`).
            ks: queries per GT, one per layer.
        Returns:
            One [`LayerMatches`] per layer. Raises `ValueError` for bad target values (read on the same copy).
        """
        device, num_classes = layers[0][0].device, layers[0][0].shape[-1]
        num_gts = [len(labels) for labels in gt_labels]
        pieces, problems = self._costs_on_device(layers, gt_labels, gt_boxes, ks)
        # The target checks that read device values travel with the costs (no extra synchronisation).
        statistics = [target_statistics(labels, boxes) for labels, boxes in zip(gt_labels, gt_boxes)]
        flat = torch.cat(pieces + statistics).cpu()  # the single device -> host transfer of the step
        check_target_statistics(flat[-NUM_TARGET_STATISTICS * len(num_gts):].view(-1, NUM_TARGET_STATISTICS),
                                num_gts, num_classes, gt_boxes)
        solutions = solve_one_to_k_assignments(flat, problems)
        return _matches_on_device(solutions, num_gts, len(layers), device)

    def cost(self, logits: torch.Tensor, boxes: torch.Tensor, gt_labels: torch.Tensor,
             gt_boxes: torch.Tensor) -> torch.Tensor:
        """Matching cost of predictions `logits (..., Q, C)`, `boxes (..., Q, 4)` against `gt_labels (G,)` (valid class
        ids) and `gt_boxes (G, 4)`; boxes normalised cxcywh. Returns the (..., Q, G) float32 cost."""
        lead_shape = logits.shape[:-1]
        eps, alpha, gamma = 1e-12, self.alpha, self.gamma
        prob = logits.float()[..., gt_labels].sigmoid()  # (..., Q, G): only the GT classes are needed
        neg_cost = -(1 - prob + eps).log() * (1 - alpha) * prob.pow(gamma)
        pos_cost = -(prob + eps).log() * alpha * (1 - prob).pow(gamma)
        class_cost = pos_cost - neg_cost

        flat_boxes = boxes.float().reshape(-1, 4)
        gt_boxes = gt_boxes.float()
        bbox_cost = torch.cdist(flat_boxes, gt_boxes, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(flat_boxes), box_cxcywh_to_xyxy(gt_boxes))

        box_cost = self.bbox_cost * bbox_cost + self.giou_cost * giou_cost
        return self.class_cost * class_cost + box_cost.reshape(*lead_shape, -1)

    def _costs_on_device(self, layers, gt_labels, gt_boxes, ks):
        """Flattened cost matrices of every (image with GT, layer), image-major, and their `(Q, G, k)` problems."""
        num_classes = layers[0][0].shape[-1]
        same_num_queries = len({logits.shape[1] for logits, _ in layers}) == 1
        pieces, problems = [], []
        for b, (labels, boxes) in enumerate(zip(gt_labels, gt_boxes)):
            if len(labels) == 0:
                continue
            # Clamp only so that a bad label cannot index out of range (device assert); it is reported by the caller.
            labels = labels.clamp(0, num_classes - 1)
            if same_num_queries:  # all layers of one image in one go: (num_layers, Q, G)
                cost = self.cost(torch.stack([lg[b] for lg, _ in layers]), torch.stack([bx[b] for _, bx in layers]),
                                 labels, boxes)
                pieces.append(cost.reshape(-1))
            else:
                pieces.extend(self.cost(lg[b], bx[b], labels, boxes).reshape(-1) for lg, bx in layers)
            problems.extend((logits.shape[1], len(labels), k) for (logits, _), k in zip(layers, ks))
        return pieces, problems


def _matches_on_device(solutions, num_gts: list[int], num_layers: int, device) -> list[LayerMatches]:
    """Regroup the solutions (image-major over the images with GT, layer-minor) by layer, sorted by GT, and move them
    to the device in one copy."""
    images = [b for b, num_gt in enumerate(num_gts) if num_gt > 0]
    gt_offsets = np.cumsum([0] + num_gts[:-1])
    num_gt_total = sum(num_gts)
    host_arrays = []
    for layer in range(num_layers):
        per_image = [solutions[i * num_layers + layer] for i in range(len(images))]
        batch = np.concatenate([np.full(len(q), b, dtype=np.int64) for b, (q, _) in zip(images, per_image)]
                               or [np.zeros(0, np.int64)])
        query = np.concatenate([q for q, _ in per_image] or [np.zeros(0, np.int64)])
        gt = np.concatenate([g + gt_offsets[b] for b, (_, g) in zip(images, per_image)] or [np.zeros(0, np.int64)])
        # Group the positives by GT (stable, so within a GT they stay sorted by query).
        order = np.argsort(gt, kind="stable")
        batch, query, gt = batch[order], query[order], gt[order]
        per_gt = np.bincount(gt, minlength=num_gt_total)
        groups = np.full((num_gt_total, int(per_gt.max()) if per_gt.size else 0), -1, dtype=np.int64)
        slot = np.arange(len(gt)) - (np.cumsum(per_gt) - per_gt)[gt]
        groups[gt, slot] = np.arange(len(gt))
        host_arrays.append((batch, query, gt, groups))

    # One host -> device copy for all index tensors, then split on the device.
    packed = np.concatenate([np.concatenate([b, q, g, gr.reshape(-1)]) for b, q, g, gr in host_arrays])
    packed = torch.from_numpy(packed).to(device, non_blocking=True)
    matches, offset = [], 0
    for batch, _, _, groups in host_arrays:
        p, ng = len(batch), groups.size
        chunk = packed[offset : offset + 3 * p + ng]
        offset += 3 * p + ng
        matches.append(LayerMatches(batch=chunk[:p], query=chunk[p : 2 * p], gt=chunk[2 * p : 3 * p],
                                    groups=chunk[3 * p :].view(groups.shape)))
    return matches


__all__ = ["LayerMatches", "OneToKMatcher", "effective_num_gt_repeat", "solve_one_to_k_assignments"]
