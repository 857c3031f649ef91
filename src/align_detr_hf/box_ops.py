"""Box conversions and overlaps.

Boxes are `(..., 4)` tensors: `cxcywh` (centre, width, height) or `xyxy` (corners). IoU and GIoU are
invariant under per-axis scaling, so they give the same value on normalised and on pixel boxes.
"""

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _overlaps(boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool, eps: float):
    """Intersection, union and enclosing area of xyxy boxes, pairwise (N, M) or aligned (N,)."""
    if not aligned:
        boxes1, boxes2 = boxes1[:, None], boxes2[None]
    area1, area2 = box_area(boxes1), box_area(boxes2)
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = (area1 + area2 - inter).clamp(min=eps)
    enclose_wh = (torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2]))
    enclose = enclose_wh.clamp(min=0).prod(-1).clamp(min=eps)
    return inter, union, enclose


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """IoU of xyxy boxes: (N, M) pairwise, or (N,) when `aligned` (row i with row i)."""
    inter, union, _ = _overlaps(boxes1, boxes2, aligned, eps)
    return inter / union


def generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, aligned: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """GIoU of xyxy boxes, in [-1, 1]: (N, M) pairwise, or (N,) when `aligned`."""
    inter, union, enclose = _overlaps(boxes1, boxes2, aligned, eps)
    return inter / union - (enclose - union) / enclose


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (mmdet's definition)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
