"""Property-based tests (hypothesis) of the box utilities and the one-to-k matcher."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from align_detr_hf.box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou
from align_detr_hf.loss_align_detr import AlignDetrLossInputs, build_loss, decoder_layer_names
from align_detr_hf.matching_align_detr import effective_num_gt_repeat, solve_one_to_k_assignments

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)

coordinate = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, width=32)
size = st.floats(min_value=0.125, max_value=10.0, allow_nan=False, width=32)


@st.composite
def xyxy_boxes(draw, min_boxes=1, max_boxes=6):
    """Positive-area xyxy boxes as a float64 (n, 4) tensor."""
    n = draw(st.integers(min_boxes, max_boxes))
    rows = [(x, y, x + w, y + h) for x, y, w, h in (draw(st.tuples(coordinate, coordinate, size, size))
                                                    for _ in range(n))]
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- boxes


@SETTINGS
@given(xyxy_boxes())
def test_xyxy_cxcywh_round_trip(boxes):
    assert torch.allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes, atol=1e-9)
    cxcywh = box_xyxy_to_cxcywh(boxes)
    assert (cxcywh[:, 2:] > 0).all()
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh, atol=1e-9)


@SETTINGS
@given(xyxy_boxes(), xyxy_boxes())
def test_iou_and_giou_ranges_symmetry_and_order(a, b):
    iou, giou = box_iou(a, b), generalized_box_iou(a, b)
    assert iou.shape == giou.shape == (len(a), len(b))
    assert ((iou >= 0) & (iou <= 1 + 1e-9)).all()
    assert ((giou >= -1 - 1e-9) & (giou <= 1 + 1e-9)).all()
    assert (giou <= iou + 1e-9).all()
    assert torch.allclose(iou, box_iou(b, a).T, atol=1e-12)
    assert torch.allclose(giou, generalized_box_iou(b, a).T, atol=1e-12)
    # aligned = diagonal of the pairwise matrix
    n = min(len(a), len(b))
    assert torch.allclose(box_iou(a[:n], b[:n], aligned=True), iou[range(n), range(n)], atol=1e-12)
    assert torch.allclose(generalized_box_iou(a[:n], b[:n], aligned=True), giou[range(n), range(n)], atol=1e-12)


@SETTINGS
@given(xyxy_boxes())
def test_a_box_overlaps_itself_fully(boxes):
    # eps=0 is the exact definition; the default eps=1e-6 only matters for areas near 1e-6
    assert torch.allclose(box_iou(boxes, boxes, aligned=True, eps=0), torch.ones(len(boxes), dtype=torch.float64))
    assert torch.allclose(generalized_box_iou(boxes, boxes, aligned=True, eps=0),
                          torch.ones(len(boxes), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- matcher


@SETTINGS
@given(
    num_queries=st.integers(1, 30),
    num_gt=st.integers(0, 40),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    with_nan=st.booleans(),
)
def test_one_to_k_assignment_counts(num_queries, num_gt, k, seed, with_nan):
    rng = np.random.default_rng(seed)
    cost = rng.normal(size=(num_queries, num_gt)).astype(np.float32)
    if with_nan and cost.size:
        cost.flat[rng.integers(cost.size)] = np.nan  # a NaN prediction: still a valid assignment
    flat = torch.cat([torch.from_numpy(cost.reshape(-1)), torch.zeros(3)])  # trailing values are ignored
    (queries, gts), = solve_one_to_k_assignments(flat, [(num_queries, num_gt, k)])
    assert len(queries) == len(gts)
    assert len(set(queries.tolist())) == len(queries)  # no query serves two GTs
    assert list(queries) == sorted(queries)
    counts = np.bincount(gts, minlength=num_gt)
    if num_gt == 0:
        assert len(queries) == 0
    elif num_gt <= num_queries:
        expected = min(k, num_queries // num_gt)
        assert expected == effective_num_gt_repeat(k, num_queries, num_gt)
        assert (counts == expected).all()
    else:  # more GTs than queries: every query gets a distinct GT
        assert len(queries) == num_queries and counts.max() == 1


CONFIG = tiny_config(num_gt_repeat=[2, 1, 2])


def _outputs(generator, batch, num_queries=CONFIG.num_queries):
    layers, classes = CONFIG.decoder_layers, CONFIG.num_labels
    return AlignDetrLossInputs(
        logits=torch.randn(layers, batch, num_queries, classes, generator=generator),
        boxes=torch.rand(layers, batch, num_queries, 4, generator=generator) * 0.5 + 0.25,
        layer_names=decoder_layer_names(layers),
        encoder_logits=torch.randn(batch, num_queries, classes, generator=generator),
        encoder_boxes=torch.rand(batch, num_queries, 4, generator=generator) * 0.5 + 0.25,
    )


@SETTINGS
@given(num_gts=st.lists(st.integers(0, 14), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
def test_permuting_the_ground_truth_does_not_change_the_loss(num_gts, seed):
    generator = torch.Generator().manual_seed(seed)
    outputs = _outputs(generator, len(num_gts))
    targets, permuted = [], []
    for n in num_gts:
        boxes = torch.cat([torch.rand(n, 2, generator=generator) * 0.6 + 0.2,
                           torch.rand(n, 2, generator=generator) * 0.3 + 0.05], 1)
        labels = torch.randint(0, CONFIG.num_labels, (n,), generator=generator)
        order = torch.randperm(n, generator=generator)
        targets.append({"class_labels": labels, "boxes": boxes})
        permuted.append({"class_labels": labels[order], "boxes": boxes[order]})
    criterion = build_loss(CONFIG)
    loss, parts = criterion(outputs, targets)
    loss_p, parts_p = criterion(outputs, permuted)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, loss_p, rtol=1e-5, atol=1e-6)
    for key in parts:
        assert torch.allclose(parts[key], parts_p[key], rtol=1e-5, atol=1e-6), key
    # the matched (image, query) pairs are the same sets, only the GT indices move
    for layer, layer_p in zip(criterion.match(outputs, targets), criterion.match(outputs, permuted)):
        pairs = sorted(zip(layer.batch.tolist(), layer.query.tolist()))
        assert pairs == sorted(zip(layer_p.batch.tolist(), layer_p.query.tolist()))


@pytest.mark.parametrize("num_gt, k, expected", [(0, 2, 0), (1, 2, 2), (6, 2, 2), (7, 2, 1), (13, 2, 1), (4, 5, 3)])
def test_effective_k(num_gt, k, expected):
    assert effective_num_gt_repeat(k, 12, num_gt) == expected
