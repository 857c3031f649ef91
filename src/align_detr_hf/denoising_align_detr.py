"""DINO's contrastive denoising queries (training only), drawn as mmdetection's `CdnQueryGenerator` draws them."""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


class DenoisingLayout(NamedTuple):
    """Where the D = 2 * max_gt * num_groups denoising queries of a batch sit: group g holds queries
    [2Mg, 2M(g+1)), the positive copy of GT j at 2Mg + j, then M negatives (M = max_gt, the most GTs of an image)."""

    num_groups: int
    max_gt: int


@dataclass
class AlignDetrDenoisingQueries:
    """Contrastive denoising queries for one batch (training only).

    Args:
        label_query (`(B, D, d_model)`): content queries, the label embedding of noisy labels (zeros = padding).
        box_query_unact (`(B, D, 4)`): inverse-sigmoid noisy cxcywh boxes (zeros = padding, i.e. a centred box).
        attn_mask (`(D + Q, D + Q)` bool): True where a query may not attend (matching -> denoising, across groups).
        num_groups (`int`): G. Group g holds queries [2Mg, 2M(g+1)): M positives, then M negatives.
        max_gt (`int`): M, the most ground-truth boxes of one image in the batch.
    """

    label_query: torch.Tensor
    box_query_unact: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    max_gt: int

    @property
    def num_queries(self) -> int:
        return self.label_query.shape[1]


def build_denoising_queries(
    targets: list[dict],
    label_embedding: nn.Embedding,
    num_labels: int,
    num_matching_queries: int,
    num_denoising_queries: int,
    label_noise_ratio: float,
    box_noise_scale: float,
) -> AlignDetrDenoisingQueries:
    """DINO's contrastive denoising groups, drawn as mmdetection's `CdnQueryGenerator` draws them.

    With M = the most GT boxes of an image in the batch, there are G = max(1, num_denoising_queries // M) groups of
    2M queries: a positive copy of every GT (corners jittered by less than half the box size) then a negative one
    (jittered by 1 to 2 halves). Labels are re-drawn uniformly with probability label_noise_ratio / 2. The random
    draws happen in mmdetection's order, so the same seed gives the same queries.
    """
    device = label_embedding.weight.device
    batch = len(targets)
    num_gt = [len(t["class_labels"]) for t in targets]
    max_gt = max(num_gt, default=0)
    num_groups = max(1, num_denoising_queries // max_gt) if max_gt > 0 else 1
    total = 2 * max_gt * num_groups
    d_model = label_embedding.embedding_dim
    label_query = torch.zeros(batch, total, d_model, device=device, dtype=label_embedding.weight.dtype)
    box_query = torch.zeros(batch, total, 4, device=device)
    if max_gt > 0:
        # int64 whatever integer type the caller used (int32/uint8 labels would fail in scatter)
        labels = torch.cat([t["class_labels"] for t in targets]).to(device=device, dtype=torch.long)
        boxes = box_cxcywh_to_xyxy(torch.cat([t["boxes"] for t in targets]).to(device).float())
        num_boxes = len(labels)

        labels = labels.repeat(2 * num_groups)
        if label_noise_ratio > 0:
            redraw = torch.nonzero(torch.rand_like(labels.float()) < label_noise_ratio * 0.5).view(-1)
            labels = labels.scatter(0, redraw, torch.randint_like(redraw, 0, num_labels))

        boxes = boxes.repeat(2 * num_groups, 1)
        if box_noise_scale > 0:
            positive = torch.arange(num_boxes, device=device)[None] + 2 * num_boxes * torch.arange(
                num_groups, device=device
            )[:, None]
            negative = (positive + num_boxes).flatten()
            sign = torch.randint_like(boxes, 0, 2, dtype=torch.float32) * 2.0 - 1.0
            magnitude = torch.rand_like(boxes)
            magnitude[negative] += 1.0
            half_wh = box_xyxy_to_cxcywh(boxes)[:, 2:].repeat(1, 2)
            boxes = (boxes + magnitude * sign * half_wh * box_noise_scale / 2).clamp(0.0, 1.0)
        boxes_unact = inverse_sigmoid(box_xyxy_to_cxcywh(boxes), eps=1e-3)

        # scatter into (B, 2MG): block r (positive/negative half of a group) starts at r * M, GT j at offset j
        image_index = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(num_gt)])
        slot = torch.cat([torch.arange(n, device=device) for n in num_gt])
        slot = torch.cat([slot + max_gt * block for block in range(2 * num_groups)])
        image_index = image_index.repeat(2 * num_groups)
        label_query[image_index, slot] = label_embedding(labels)
        box_query[image_index, slot] = boxes_unact

    attn_mask = torch.zeros(total + num_matching_queries, total + num_matching_queries, dtype=torch.bool, device=device)
    attn_mask[total:, :total] = True  # matching queries must not see the answers
    for group in range(num_groups):
        start, end = 2 * max_gt * group, 2 * max_gt * (group + 1)
        attn_mask[start:end, :start] = True
        attn_mask[start:end, end:total] = True
    return AlignDetrDenoisingQueries(label_query, box_query, attn_mask, num_groups, max_gt)
