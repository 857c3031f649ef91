"""Checks of training targets (model `labels`): what a valid target is, read with no extra host synchronisation.

Structure (keys, shapes, dtypes) is checked without reading a device value (`check_target_structure`). Values are
checked from a few statistics per image (`target_statistics`) computed on the device and read on the host together
with something that is read anyway: the matcher's cost matrices (`OneToKMatcher`) or, up front in the model, the
pixel check (`validate_labels`). Bad targets raise a `ValueError` naming the image (and the first bad box): class
ids outside [0, num_labels), NaN/inf boxes, negative width/height, values outside [0, 1] (pixel boxes). Zero-area
boxes and boxes whose corners stick out of the image are accepted (the loss stays finite).
"""

from __future__ import annotations

import torch

# Statistics per image, in this order: min label, max label, #non-finite box values, #boxes with negative w/h,
# #boxes with a value outside [0, 1] (see `target_statistics`).
NUM_TARGET_STATISTICS = 5
# Normalised box values may exceed [0, 1] by this much (float rounding) before they are reported as pixel boxes.
_BOX_RANGE_TOLERANCE = 1e-3


def check_target_structure(targets: list[dict], batch_size: int) -> None:
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


def target_statistics(labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(NUM_TARGET_STATISTICS,) float32 device tensor: min label, max label, #non-finite box values, #boxes with a
    negative width/height, #boxes with a coordinate outside [0, 1] (cxcywh, normalised)."""
    if labels.numel() == 0:
        return boxes.new_zeros(NUM_TARGET_STATISTICS, dtype=torch.float32)
    finite = torch.isfinite(boxes)
    return torch.stack([
        labels.min().float(), labels.max().float(), (~finite).sum().float(),
        (boxes[:, 2:] < 0).any(-1).sum().float(),
        ((boxes < -_BOX_RANGE_TOLERANCE) | (boxes > 1 + _BOX_RANGE_TOLERANCE)).any(-1).sum().float(),
    ])


def _first_index(mask: torch.Tensor) -> int:
    return int(torch.nonzero(mask.reshape(mask.shape[0], -1).any(-1))[0, 0])


def check_target_statistics(
    stats: torch.Tensor, num_gts: list[int], num_labels: int, gt_boxes: list[torch.Tensor] | None = None
) -> None:
    """Raise for bad label ids / bad boxes, from the (B, NUM_TARGET_STATISTICS) host statistics of the images.
    `gt_boxes` is read (an extra device read, on the error path only) to name the first bad box."""
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
    check_target_structure(labels, batch_size)
    pieces = [target_statistics(t["class_labels"], t["boxes"]) for t in labels]
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
    check_target_statistics(flat.view(-1, NUM_TARGET_STATISTICS), [len(t["class_labels"]) for t in labels],
                            num_labels, [t["boxes"] for t in labels])


__all__ = ["NUM_TARGET_STATISTICS", "check_target_statistics", "check_target_structure", "target_statistics",
           "validate_labels"]
