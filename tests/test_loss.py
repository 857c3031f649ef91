"""Tests of the Align-DETR loss against mmdetection's recorded losses and on edge cases (CPU, fast)."""

import dataclasses
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from align_detr_hf.box_ops import box_xyxy_to_cxcywh
from align_detr_hf.configuration_align_detr import AlignDetrConfig
from align_detr_hf.loss_align_detr import (
    AlignDetrLoss,
    AlignDetrLossConfig,
    AlignDetrLossInputs,
    DenoisingLayout,
    build_loss,
    decoder_layer_names,
    mmdet_key_order,
    prime_sample_weights,
)
from align_detr_hf.matching_align_detr import (
    LayerMatches,
    OneToKMatcher,
    effective_num_gt_repeat,
    solve_one_to_k_assignments,
)

FIXTURES = Path(__file__).parent / "fixtures" / "small"


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded():
    return torch.load(FIXTURES / "losses.pt", weights_only=True)


def fixture_config():
    return AlignDetrConfig(
        decoder_layers=2, encoder_layers=2, num_queries=100, num_denoising_queries=20, num_gt_repeat=[2, 1, 2]
    )


def fixture_inputs(recorded):
    """Split mmdet's train-mode head outputs into our loss inputs; targets as normalised cxcywh."""
    head, dn = recorded["head"], recorded["dn"]
    num_dn = dn["num_denoising_queries"]
    scores, boxes = head["all_layers_cls_scores"], head["all_layers_bbox_preds"]
    outputs = AlignDetrLossInputs(
        logits=scores[:, :, num_dn:],
        boxes=boxes[:, :, num_dn:],
        layer_names=decoder_layer_names(scores.shape[0]),
        encoder_logits=head["enc_cls_scores"],
        encoder_boxes=head["enc_bbox_preds"],
        dn_logits=scores[:, :, :num_dn],
        dn_boxes=boxes[:, :, :num_dn],
        denoising=DenoisingLayout(dn["num_denoising_groups"], dn["max_num_target"]),
    )
    targets = []
    for gt, meta in zip(recorded["gt"], recorded["metainfo"]):
        height, width = meta["img_shape"]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        targets.append({"class_labels": gt["labels"], "boxes": box_xyxy_to_cxcywh(gt["bboxes"] / scale)})
    return outputs, targets


def random_boxes(n, generator, min_size=0.05):
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=generator) * 0.3 + min_size
    return torch.cat([centre, size], dim=-1)


def make_case(num_gts, num_layers=2, num_queries=12, num_classes=5, num_groups=2, denoising=True, seed=0,
              requires_grad=False):
    """Random outputs and targets with the model's layout; returns (config, outputs, targets)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(num_gts)
    max_gt = max(num_gts)
    num_groups = num_groups if max_gt > 0 else 1
    num_dn = 2 * max_gt * num_groups
    config = AlignDetrConfig(decoder_layers=num_layers, num_queries=num_queries, num_labels=num_classes,
                             num_gt_repeat=[2] * (num_layers - 1) + [1, 2])

    def logits(*shape):
        return (torch.randn(*shape, num_classes, generator=g) * 2 - 3).requires_grad_(requires_grad)

    def boxes(*shape):
        return random_boxes(math.prod(shape), g).reshape(*shape, 4).requires_grad_(requires_grad)

    outputs = AlignDetrLossInputs(
        logits=logits(num_layers, batch, num_queries),
        boxes=boxes(num_layers, batch, num_queries),
        layer_names=decoder_layer_names(num_layers),
        encoder_logits=logits(batch, num_queries),
        encoder_boxes=boxes(batch, num_queries),
        dn_logits=logits(num_layers, batch, num_dn) if denoising else None,
        dn_boxes=boxes(num_layers, batch, num_dn) if denoising else None,
        denoising=DenoisingLayout(num_groups, max_gt) if denoising else None,
    )
    targets = [
        {"class_labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": random_boxes(n, g)}
        for n in num_gts
    ]
    return config, outputs, targets


def expected_keys(num_layers, denoising=True, encoder=True):
    return mmdet_key_order(decoder_layer_names(num_layers), encoder=encoder, denoising=denoising)


def tensors_of(inputs, convert):
    """The same loss inputs with `convert` applied to every tensor."""
    return dataclasses.replace(inputs, **{field.name: convert(getattr(inputs, field.name))
                                          for field in dataclasses.fields(inputs)
                                          if torch.is_tensor(getattr(inputs, field.name))})


def assert_finite(loss, loss_dict):
    assert torch.isfinite(loss)
    for key, value in loss_dict.items():
        assert torch.isfinite(value), key


# ----------------------------------------------------------------------------------------------------------------------
# mmdetection fixture
# ----------------------------------------------------------------------------------------------------------------------


def test_losses_match_mmdetection(recorded):
    outputs, targets = fixture_inputs(recorded)
    loss, loss_dict = build_loss(fixture_config())(outputs, targets)
    reference = recorded["losses"]
    assert list(loss_dict) == list(reference)  # identity mapping of the names, mmdet's order
    rel = {key: abs(loss_dict[key].item() - value) / abs(value) for key, value in reference.items()}
    print("max relative difference per term:", {key: f"{value:.2e}" for key, value in rel.items()})
    for key, value in reference.items():
        torch.testing.assert_close(loss_dict[key], torch.tensor(value), rtol=1e-5, atol=0, msg=key)
    torch.testing.assert_close(loss, torch.tensor(recorded["total_loss"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, sum(loss_dict.values()))


def test_assignments_match_mmdetection(recorded):
    outputs, targets = fixture_inputs(recorded)
    matches = build_loss(fixture_config()).match(outputs, targets)
    batch, num_queries = outputs.encoder_logits.shape[:2]
    gt_offsets = torch.tensor([0] + [len(t["class_labels"]) for t in targets]).cumsum(0)
    for name, match in zip(["d0", "d1", "enc"], matches):
        gt_inds = torch.zeros(batch, num_queries, dtype=torch.long)  # mmdet's convention: 0 = background
        gt_inds[match.batch, match.query] = match.gt - gt_offsets[match.batch] + 1
        assert torch.equal(gt_inds, recorded["assign"][name]), name


# ----------------------------------------------------------------------------------------------------------------------
# matcher
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_queries,num_gt,k", [(20, 4, 2), (20, 4, 5), (9, 4, 3), (5, 3, 2), (7, 7, 2)])
def test_one_to_k_matcher_counts(num_queries, num_gt, k):
    cost = torch.rand(num_queries, num_gt, generator=torch.Generator().manual_seed(num_queries * 10 + num_gt))
    [(queries, gts)] = solve_one_to_k_assignments(cost.reshape(-1), [(num_queries, num_gt, k)])
    expected_k = min(k, num_queries // num_gt)
    assert effective_num_gt_repeat(k, num_queries, num_gt) == expected_k
    assert np.bincount(gts, minlength=num_gt).tolist() == [expected_k] * num_gt
    assert len(np.unique(queries)) == len(queries)  # no query serves two GTs


def test_more_gts_than_queries():
    # G > Q: k = 1, every query gets a distinct GT, G - Q GTs stay unmatched.
    cost = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    [(queries, gts)] = solve_one_to_k_assignments(cost.reshape(-1), [(3, 5, 2)])
    assert sorted(queries.tolist()) == [0, 1, 2]
    assert len(np.unique(gts)) == 3 and gts.max() < 5


def test_solver_takes_all_problems_from_one_tensor_and_handles_nonfinite():
    g = torch.Generator().manual_seed(1)
    problems = [(6, 2, 2), (6, 0, 2), (4, 3, 1), (6, 2, 1)]
    costs = [torch.rand(q, n, generator=g) for q, n, _ in problems]
    costs[2][1, 2] = float("nan")
    costs[2][0, :] = float("inf")
    costs[3][:, 0] = float("-inf")
    flat = torch.cat([c.reshape(-1) for c in costs] + [torch.tensor([7.0, 8.0])])  # trailing extras are ignored
    solutions = solve_one_to_k_assignments(flat, problems)
    assert len(solutions) == len(problems)
    for (q, n, k), cost, (queries, gts) in zip(problems, costs, solutions):
        if n == 0:
            assert queries.size == 0 and gts.size == 0
            continue
        k = effective_num_gt_repeat(k, q, n)
        assert np.bincount(gts, minlength=n).tolist() == [k] * n
        assert len(np.unique(queries)) == len(queries)
        if torch.isfinite(cost).all():  # optimal: same total as a direct solve of the tiled matrix
            from scipy.optimize import linear_sum_assignment

            tiled = np.tile(cost.numpy(), (1, k))
            rows, cols = linear_sum_assignment(tiled)
            assert np.isclose(tiled[rows, cols].sum(), cost.numpy()[queries, gts].sum())
    # the NaN / +inf entries are avoided when possible
    queries, gts = solutions[2]
    assert 0 not in queries.tolist() and (1, 2) not in list(zip(queries.tolist(), gts.tolist()))


def test_the_matcher_alone():
    """OneToKMatcher without the loss (as an adapter or another criterion would call it): k per layer, positives
    grouped by GT, bad targets reported from the same host copy."""
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 10, 3, generator=g), random_boxes(20, g).view(2, 10, 4)
    gt_labels = [torch.tensor([0, 2]), torch.zeros(0, dtype=torch.long)]
    gt_boxes = [random_boxes(2, g), torch.zeros(0, 4)]
    matcher = OneToKMatcher()
    first, last = matcher([(logits, boxes), (logits, boxes)], gt_labels, gt_boxes, ks=[3, 1])
    assert isinstance(first, LayerMatches) and first.batch.tolist() == [0] * 6  # image 1 has no GT
    assert first.gt.tolist() == [0, 0, 0, 1, 1, 1] and len(set(first.query.tolist())) == 6
    assert first.groups.shape == (2, 3) and torch.equal(first.gt[first.groups], torch.tensor([[0] * 3, [1] * 3]))
    assert last.gt.tolist() == [0, 1] and last.groups.tolist() == [[0], [1]]
    with pytest.raises(ValueError, match=r"targets\[0\]\['class_labels'\] must lie in \[0, 3\)"):
        matcher([(logits, boxes)], [torch.tensor([0, 5]), gt_labels[1]], gt_boxes, ks=[1])


def test_prime_sample_weights():
    quality = torch.tensor([0.3, 0.8, 0.5, 0.2, 0.9])
    groups = torch.tensor([[0, 1], [2, -1], [3, 4]])  # GT0: {0, 1}, GT1: {2}, GT2: {3, 4}
    weights = prime_sample_weights(quality, groups, tau=1.5)
    second = math.exp(-1 / 1.5)
    torch.testing.assert_close(weights, torch.tensor([second, 1.0, 1.0, second, 1.0]))


# ----------------------------------------------------------------------------------------------------------------------
# loss behaviour and edge cases
# ----------------------------------------------------------------------------------------------------------------------


def test_mmdet_key_order():
    """mmdetection's order: last layer, d0.., enc_, then the denoising terms in the same layer order."""
    assert mmdet_key_order(decoder_layer_names(3)) == [
        "loss_cls", "loss_bbox", "loss_iou",
        "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou",
        "d1.loss_cls", "d1.loss_bbox", "d1.loss_iou",
        "enc_loss_cls", "enc_loss_bbox", "enc_loss_iou",
        "dn_loss_cls", "dn_loss_bbox", "dn_loss_iou",
        "d0.dn_loss_cls", "d0.dn_loss_bbox", "d0.dn_loss_iou",
        "d1.dn_loss_cls", "d1.dn_loss_bbox", "d1.dn_loss_iou",
    ]  # fmt: skip
    assert mmdet_key_order(["pre.", "d0.", ""], encoder=False, denoising=False) == [
        "loss_cls", "loss_bbox", "loss_iou", "pre.loss_cls", "pre.loss_bbox", "pre.loss_iou",
        "d0.loss_cls", "d0.loss_bbox", "d0.loss_iou",
    ]  # fmt: skip
    assert mmdet_key_order([""], denoising=False) == ["loss_cls", "loss_bbox", "loss_iou", "enc_loss_cls",
                                                      "enc_loss_bbox", "enc_loss_iou"]


def test_mmdet_key_order_is_the_recorded_order(recorded):
    assert mmdet_key_order(decoder_layer_names(2)) == list(recorded["losses"])


def test_loss_inputs_refuse_inconsistent_shapes():
    _, outputs, _ = make_case([2, 1])
    with pytest.raises(ValueError, match="layer_names has 3 names for 2 layers"):
        dataclasses.replace(outputs, layer_names=decoder_layer_names(3))
    with pytest.raises(ValueError, match="dn_logits, dn_boxes and denoising come together"):
        dataclasses.replace(outputs, denoising=None)
    with pytest.raises(ValueError, match=r"do not fit DenoisingLayout\(num_groups=3, max_gt=2\)"):
        dataclasses.replace(outputs, denoising=DenoisingLayout(3, 2))
    with pytest.raises(ValueError, match=r"logits must be \(L, B, Q, C\)"):
        dataclasses.replace(outputs, logits=outputs.logits[0])
    with pytest.raises(ValueError, match="encoder_logits and encoder_boxes come together"):
        dataclasses.replace(outputs, encoder_boxes=None)


def test_keys_with_and_without_denoising():
    config, outputs, targets = make_case([2, 1], num_layers=6)
    _, loss_dict = build_loss(config)(outputs, targets)
    assert list(loss_dict) == expected_keys(6) and len(loss_dict) == 39
    config, outputs, targets = make_case([2, 1], num_layers=6, denoising=False)
    loss, loss_dict = build_loss(config)(outputs, targets)
    assert list(loss_dict) == expected_keys(6, denoising=False) and len(loss_dict) == 21
    torch.testing.assert_close(loss, sum(loss_dict.values()))


def test_gradient_reaches_logits_and_boxes():
    config, outputs, targets = make_case([3, 1], requires_grad=True)
    loss, _ = build_loss(config)(outputs, targets)
    loss.backward()
    for key in ("logits", "boxes", "encoder_logits", "encoder_boxes", "dn_logits", "dn_boxes"):
        grad = getattr(outputs, key).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, key


def test_image_without_gt():
    config, outputs, targets = make_case([0], requires_grad=True)
    assert outputs.dn_logits.shape[2] == 0  # no GT in the batch: D = 0
    loss, loss_dict = build_loss(config)(outputs, targets)
    assert_finite(loss, loss_dict)
    assert list(loss_dict) == expected_keys(2)
    for key, value in loss_dict.items():
        if "bbox" in key or "iou" in key or "dn_" in key:
            assert value.item() == 0, key
    # all-negative classification: sum p^2 * BCE(z, 0), normaliser clamped to 1
    logits = outputs.logits[-1].detach()
    negative = (logits.sigmoid() ** 2 * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                                            reduction="none")).sum()
    torch.testing.assert_close(loss_dict["loss_cls"].detach(), negative)
    loss.backward()  # the dn zeros keep the graph
    assert outputs.dn_logits.grad is not None and outputs.boxes.grad is not None


def test_batch_mixing_empty_and_non_empty_images():
    config, outputs, targets = make_case([0, 3, 0])
    loss_fn = build_loss(config)
    loss, loss_dict = loss_fn(outputs, targets)
    assert_finite(loss, loss_dict)
    # The empty images only add their all-negative term; the box losses equal those of image 1 alone.
    single = dataclasses.replace(
        outputs, logits=outputs.logits[:, 1:2], boxes=outputs.boxes[:, 1:2], encoder_logits=outputs.encoder_logits[1:2],
        encoder_boxes=outputs.encoder_boxes[1:2], dn_logits=outputs.dn_logits[:, 1:2], dn_boxes=outputs.dn_boxes[:, 1:2],
    )
    _, single_dict = loss_fn(single, targets[1:2])
    for key in loss_dict:
        if "bbox" in key or "iou" in key:
            torch.testing.assert_close(loss_dict[key], single_dict[key])
    logits = outputs.logits[-1][[0, 2]]
    negative = (logits.sigmoid() ** 2 * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                                            reduction="none")).sum() / 3
    torch.testing.assert_close(loss_dict["loss_cls"], single_dict["loss_cls"] + negative)


def test_more_gts_than_queries_in_the_loss():
    # Q = 4: image 0 has 3 GTs (k=2 -> k=1 since G*k > Q), image 1 has 6 GTs (> Q: only 4 matched).
    config, outputs, targets = make_case([3, 6], num_queries=4, requires_grad=True)
    loss_fn = build_loss(config)
    loss, loss_dict = loss_fn(outputs, targets)
    assert_finite(loss, loss_dict)
    loss.backward()
    for match in loss_fn.match(outputs, targets):
        per_image = torch.bincount(match.batch, minlength=2).tolist()
        assert per_image == [3, 4]
        assert len(set(zip(match.batch.tolist(), match.query.tolist()))) == 7  # no query matched twice


def test_degenerate_boxes_give_finite_loss():
    config, outputs, targets = make_case([2, 2], requires_grad=True)
    with torch.no_grad():
        outputs.boxes[..., 2] = 0  # zero-width predictions
        outputs.encoder_boxes[..., 3] = 0
        outputs.dn_boxes[..., 2:] = 0
    targets[0]["boxes"][0, 2] = 0  # zero-width and zero-area GTs
    targets[1]["boxes"][1, 2:] = 0
    loss, loss_dict = build_loss(config)(outputs, targets)
    assert_finite(loss, loss_dict)
    loss.backward()
    for key in ("logits", "boxes", "encoder_boxes", "dn_boxes"):
        assert torch.isfinite(getattr(outputs, key).grad).all(), key


def test_permuting_gt_order_does_not_change_the_loss():
    config, outputs, targets = make_case([4, 3], num_groups=1, denoising=False)
    loss_fn = build_loss(config)
    loss, loss_dict = loss_fn(outputs, targets)
    permuted = []
    for i, target in enumerate(targets):
        perm = torch.randperm(len(target["class_labels"]), generator=torch.Generator().manual_seed(i + 3))
        permuted.append({"class_labels": target["class_labels"][perm], "boxes": target["boxes"][perm]})
    loss_p, loss_dict_p = loss_fn(outputs, permuted)
    for key in loss_dict:
        torch.testing.assert_close(loss_dict_p[key], loss_dict[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_autocast_is_finite_and_close_to_float32(dtype):
    config, outputs, targets = make_case([3, 2])
    # saturated logits: a naive log(sigmoid) in half precision gives -inf here
    outputs.logits[..., 0] = 30.0
    outputs.logits[..., 1] = -30.0
    outputs.encoder_logits[..., 0] = 30.0
    outputs.dn_logits[..., 1] = -30.0
    assert torch.isinf(torch.log(1 - torch.sigmoid(torch.tensor(30.0, dtype=dtype))))
    half = tensors_of(outputs, lambda value: value.to(dtype))
    # the reference: the same (rounded) values in float32
    rounded = tensors_of(half, lambda value: value.float())
    half_targets = [{"class_labels": t["class_labels"], "boxes": t["boxes"].to(dtype)} for t in targets]
    rounded_targets = [{"class_labels": t["class_labels"], "boxes": t["boxes"].float()} for t in half_targets]
    loss_fn = build_loss(config)
    loss32, dict32 = loss_fn(rounded, rounded_targets)
    with torch.autocast("cpu", dtype=dtype):
        loss16, dict16 = loss_fn(half, half_targets)
    assert_finite(loss16, dict16)
    assert loss16.dtype == torch.float32
    for key in dict32:
        torch.testing.assert_close(dict16[key], dict32[key], rtol=1e-4, atol=1e-5, msg=key)


def test_normalisers_of_each_call_are_public():
    config, outputs, targets = make_case([2, 1])  # 3 GTs, 2 denoising groups
    loss_fn = build_loss(config)
    assert loss_fn.normalisers is None
    loss_fn(outputs, targets)
    assert loss_fn.normalisers == ((3.0, 6.0), (3.0, 6.0))  # (matching, denoising): this process's, the mean
    config, outputs, targets = make_case([5], num_queries=3, denoising=False)
    loss_fn(outputs, targets)
    assert loss_fn.normalisers.local == (5.0, 0.0)  # Align-DETR divides by the GTs, matched or not
    config.loss_type = "dino"
    dino = build_loss(config)
    dino(outputs, targets)
    assert dino.normalisers.local == (3.0, 0.0)  # DINO by the matched queries


def test_distributed_normaliser_single_process():
    """With torch.distributed initialised (world size 1) the all_reduce path gives the same losses."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    config, outputs, targets = make_case([2, 1])
    loss_fn = build_loss(config)
    _, expected = loss_fn(outputs, targets)
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}",
                                             rank=0, world_size=1)
        try:
            _, loss_dict = loss_fn(outputs, targets)
        finally:
            torch.distributed.destroy_process_group()
    for key in expected:
        torch.testing.assert_close(loss_dict[key], expected[key], msg=key)
    assert loss_fn.normalisers.local == (3.0, 6.0) and loss_fn.normalisers.reduced.tolist() == [3.0, 6.0]


# ----------------------------------------------------------------------------------------------------------------------
# hyper-parameters
# ----------------------------------------------------------------------------------------------------------------------


def test_loss_config_is_read_off_the_model_config():
    config = AlignDetrConfig(decoder_layers=3, num_gt_repeat=[3, 2, 1, 4], quality_alpha=0.5, matcher_giou_cost=1.0,
                             focal_gamma=1.5, bbox_loss_coefficient=4.0)
    loss_config = AlignDetrLossConfig.from_config(config)
    assert loss_config.num_gt_repeat_decoder == (3, 2, 1) and loss_config.num_gt_repeat_encoder == 4
    for field in dataclasses.fields(AlignDetrLossConfig):  # every other field by the config's own name
        if not field.name.startswith("num_gt_repeat"):
            assert getattr(loss_config, field.name) == getattr(config, field.name), field.name
    loss_fn = build_loss(config)
    assert type(loss_fn) is AlignDetrLoss and loss_fn.loss_config == loss_config
    assert loss_fn.matcher.giou_cost == 1.0 and loss_fn.classification.alpha == 0.5


def test_a_loss_config_gives_the_loss_of_the_model_config():
    config, outputs, targets = make_case([2, 1], num_layers=3)  # num_gt_repeat [2, 2, 1, 2]
    _, expected = build_loss(config)(outputs, targets)
    loss_fn = AlignDetrLoss(5, AlignDetrLossConfig(num_gt_repeat_decoder=[2, 2, 1], num_gt_repeat_encoder=2))
    _, loss_dict = loss_fn(outputs, targets)
    assert list(loss_dict) == list(expected)
    for key in expected:
        torch.testing.assert_close(loss_dict[key], expected[key], rtol=0, atol=0, msg=key)
    # num_gt_repeat_encoder=None: no encoder term, the other terms unchanged
    loss_fn = AlignDetrLoss(5, AlignDetrLossConfig(num_gt_repeat_decoder=(2, 2, 1), num_gt_repeat_encoder=None))
    _, loss_dict = loss_fn(outputs, targets)
    assert list(loss_dict) == expected_keys(3, encoder=False)
    for key in loss_dict:
        torch.testing.assert_close(loss_dict[key], expected[key], rtol=0, atol=0, msg=key)


def test_loss_config_errors_are_clear():
    with pytest.raises(ValueError, match="num_gt_repeat_decoder needs one entry >= 1"):
        AlignDetrLossConfig(num_gt_repeat_decoder=(2, 0))
    with pytest.raises(ValueError, match="num_gt_repeat_encoder must be >= 1"):
        AlignDetrLossConfig(num_gt_repeat_encoder=0)
    with pytest.raises(TypeError, match=r"takes the number of classes, not AlignDetrConfig; build_loss\(config\)"):
        AlignDetrLoss(AlignDetrConfig())
    config, outputs, targets = make_case([2, 1], num_layers=3)
    with pytest.raises(ValueError, match="num_gt_repeat_decoder has 6 entries but the outputs have 3 decoder layers"):
        AlignDetrLoss(config.num_labels)(outputs, targets)  # the default config is for 6 decoder layers
    with pytest.raises(ValueError, match=r"layer 'd0.' has logits \(2, 12, 5\).* C = num_labels = 4"):
        AlignDetrLoss(4, AlignDetrLossConfig.from_config(config))(outputs, targets)


# ----------------------------------------------------------------------------------------------------------------------
# bad targets
# ----------------------------------------------------------------------------------------------------------------------


def _bad(targets, image, **changes):
    targets = [dict(t) for t in targets]
    for key, value in changes.items():
        if value is None:
            del targets[image][key]
        else:
            targets[image][key] = value
    return targets


@pytest.mark.parametrize(
    "change,message",
    [
        ({"class_labels": None}, "missing the key 'class_labels'"),
        ({"boxes": None}, "missing the key 'boxes'"),
        ({"class_labels": torch.tensor([0, 5])}, "num_labels"),
        ({"class_labels": torch.tensor([-1, 0])}, "num_labels"),
        ({"boxes": torch.tensor([[0.5, 0.5, float("nan"), 0.1], [0.5, 0.5, 0.2, 0.2]])}, "NaN"),
        ({"boxes": torch.rand(2, 3)}, r"\(n, 4\)"),
        ({"boxes": torch.rand(3, 4)}, "2 class_labels but 3 boxes"),
        ({"class_labels": torch.tensor([[0, 1]])}, "1-D"),
        ({"class_labels": torch.tensor([0.0, 1.0])}, "integer"),
    ],
)
def test_bad_targets_raise(change, message):
    config, outputs, targets = make_case([2, 2])
    with pytest.raises(ValueError, match=message):
        build_loss(config)(outputs, _bad(targets, 1, **change))


def test_wrong_number_of_targets_raises():
    config, outputs, targets = make_case([2, 2])
    with pytest.raises(ValueError, match="list of 2 dicts"):
        build_loss(config)(outputs, targets[:1])


def test_tiny_model_overfits_one_image():
    """Training on one image drives the loss down and the two objects come out with the right class and box."""
    from conftest import tiny_config

    from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor
    from align_detr_hf.box_ops import box_cxcywh_to_xyxy, box_iou

    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).train()
    image = torch.zeros(1, 3, 96, 96)
    image[:, 0, 10:40, 15:60] = 2.0
    image[:, 2, 55:90, 50:85] = 2.0
    boxes = torch.tensor([[37.5, 25.0, 45.0, 30.0], [67.5, 72.5, 35.0, 35.0]]) / 96
    labels = [{"class_labels": torch.tensor([1, 0]), "boxes": boxes}]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    curve = []
    for _ in range(160):
        loss = model(image, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        optimizer.step()
        curve.append(loss.item())
    assert sum(curve[-10:]) / 10 < 0.4 * curve[0]
    model.eval()
    with torch.no_grad():
        detections = AlignDetrImageProcessor().post_process_object_detection(
            model(image), target_sizes=[(96, 96)], top_k=2
        )[0]
    iou = box_iou(detections["boxes"], box_cxcywh_to_xyxy(boxes) * 96)
    for label, row, score in zip(detections["labels"].tolist(), iou, detections["scores"].tolist()):
        gt = [1, 0].index(label)
        assert row[gt] > 0.8 and score > 0.5
    assert sorted(detections["labels"].tolist()) == [0, 1]
