"""Checkpoints of the official Align-DETR code (FelixCaae/AlignDETR) and detrex's DINO: detectron2 files, the rename
table, tied copies, settings, and parity with the official code's own outputs (tests/fixtures/detrex_small)."""

import json
import re

import pytest
import torch
from conftest import FIXTURES, SMALL, fixture_weights

from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection, AlignDetrImageProcessor
from align_detr_hf.cli import main as cli
from align_detr_hf.convert_align_detr import (
    ConversionError,
    config_from_state_dict,
    convert_state_dict,
    describe_checkpoint,
    load_checkpoint_and_meta,
    load_converted,
    mmdet_names,
)
from align_detr_hf.convert_detrex import detrex_to_mmdet, is_detrex_state_dict
from align_detr_hf.denoising_align_detr import DenoisingLayout
from align_detr_hf.loss_align_detr import AlignDetrLossInputs, build_loss, decoder_layer_names
from align_detr_hf.modeling_align_detr import AlignDetrDenoisingQueries

DETREX = FIXTURES / "detrex_small"
# tolerances from tests/fixtures/detrex_small/README.md (another implementation, CPU float32)
LOGITS_ATOL, BOXES_ATOL, SCORES_ATOL, PIXELS_ATOL, LOSS_RTOL = 1e-4, 1e-5, 1e-5, 1e-2, 1e-4
HEAD_LOSS_RTOL = 1e-5  # losses from the official stored head outputs (README: ~1e-5 relative)


@pytest.fixture(scope="module")
def detrex_state_dict():
    """The official model's `state_dict()` (tied copies included), regenerated bit-exactly."""
    sd = fixture_weights.generate_state_dict(
        fixture_weights.read_manifest(DETREX / "manifest.tsv"), seed=5, num_heads=8, num_points=4
    )
    assert fixture_weights.state_dict_sha256(sd) == json.loads((DETREX / "meta.json").read_text())["weights"][
        "state_dict_sha256"]  # fmt: skip
    return sd


@pytest.fixture(scope="module")
def detrex_model(detrex_state_dict):
    # the fixture's overrides (meta.json): dn_number 20, match_num [2, 2, 1] = ours [2, 1, 2] (decoder 0, 1, encoder)
    config = config_from_state_dict(detrex_state_dict, num_denoising_queries=20, num_gt_repeat=[2, 1, 2])
    return load_converted(detrex_state_dict, config)


@pytest.fixture(scope="module")
def inputs():
    # the same images, pixel values (bit for bit) and GT as the official fixture's inputs.pt
    return torch.load(SMALL / "inputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def outputs():
    return torch.load(DETREX / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def recorded():
    return torch.load(DETREX / "losses.pt", weights_only=True)


def official_to_our_loss_name(name: str) -> str:
    """loss_class / loss_bbox_0 / loss_giou_enc / loss_class_dn_0 -> loss_cls / d0.loss_bbox / enc_loss_iou / ..."""
    kind, dn, layer = re.fullmatch(r"loss_(class|bbox|giou)(_dn)?(?:_(\d+|enc))?", name).groups()
    prefix = "enc_" if layer == "enc" else f"d{layer}." if layer else ""
    return f"{prefix}{'dn_' if dn else ''}loss_{ {'class': 'cls', 'bbox': 'bbox', 'giou': 'iou'}[kind]}"


def official_targets(recorded):
    return [{"class_labels": gt["labels"], "boxes": gt["boxes_cxcywh_norm"]} for gt in recorded["gt"]]


# ----------------------------------------------------------------------------------------- reading the checkpoint


def test_detrex_layout_is_recognised_and_gets_the_official_settings(detrex_state_dict, detrex_model):
    assert is_detrex_state_dict(detrex_state_dict) and len(detrex_state_dict) == 253
    renamed, layout = mmdet_names(detrex_state_dict)
    assert layout == "detrex" and len(renamed) == 229  # the 24 tied copies dropped
    line = describe_checkpoint(detrex_state_dict)
    assert "detectron2/detrex checkpoint" in line and "24 tied decoder copies" in line and "Align-DETR settings" in line
    config = detrex_model.config
    assert (config.loss_type, config.position_embedding_temperature, config.position_embedding_offset) == (
        "align_detr", 10000, -0.5)  # fmt: skip
    assert (config.head_inverse_sigmoid_eps, config.freeze_backbone_stages, config.neck_bias) == (1e-3, 0, True)
    backbone = config.backbone_config
    assert (backbone.layer_type, backbone.depths, backbone.hidden_sizes) == ("basic", [2] * 4, [16, 32, 64, 128])
    assert backbone.out_features == ["stage2", "stage3", "stage4"] and config.num_feature_levels == 4
    # detectron2's FrozenBN buffers land in our frozen BatchNorm (res3 = stage 2, block 0, conv2's norm)
    norm = detrex_model.model.backbone.model.encoder.stages[1].layers[0].layer[1].normalization
    assert torch.equal(norm.running_var, detrex_state_dict["backbone.res3.0.conv2.norm.running_var"])
    assert torch.equal(norm.weight, detrex_state_dict["backbone.res3.0.conv2.norm.weight"])
    # the heads: branch L is the encoder's, decoder layer i's box branch keeps its three layers
    assert torch.equal(detrex_model.model.enc_score_head.weight, detrex_state_dict["class_embed.2.weight"])
    assert torch.equal(detrex_model.model.decoder.bbox_embed[1].layers[2].bias,
                       detrex_state_dict["bbox_embed.1.layers.2.bias"])  # fmt: skip
    # a DINO checkpoint of detrex looks the same: the loss type is the user's to say
    dino = config_from_state_dict(detrex_state_dict, loss_type="dino")
    assert (dino.loss_type, dino.position_embedding_temperature, dino.head_inverse_sigmoid_eps) == ("dino", 10000, 1e-3)
    # detrex's 24-epoch DINO, known by its file name, has DINO's original position encoding
    zoo = config_from_state_dict(detrex_state_dict, source="/x/dino_r50_4scale_24ep.pth")
    assert (zoo.loss_type, zoo.position_embedding_temperature, zoo.position_embedding_offset) == ("dino", 20, 0)


def test_a_tied_copy_that_differs_is_refused_in_one_line(detrex_state_dict):
    edited = dict(detrex_state_dict)
    edited["transformer.decoder.bbox_embed.1.layers.0.bias"] = edited["bbox_embed.1.layers.0.bias"] + 1e-3
    with pytest.raises(ConversionError) as error:
        detrex_to_mmdet(edited)
    message = str(error.value)
    assert "\n" not in message and "transformer.decoder.bbox_embed.1.layers.0.bias" in message
    assert "bbox_embed.1.layers.0.bias" in message and "differ by up to 0.001" in message
    equal_copy = dict(detrex_state_dict, **{"transformer.decoder.class_embed.0.weight":
                                            detrex_state_dict["class_embed.0.weight"].clone()})  # fmt: skip
    assert detrex_to_mmdet(equal_copy).keys() == detrex_to_mmdet(detrex_state_dict).keys()
    orphan = {k: v for k, v in detrex_state_dict.items() if k != "class_embed.1.bias"}
    with pytest.raises(ConversionError, match=r"decoder.class_embed.1.bias is a copy of class_embed.1.bias, which"):
        detrex_to_mmdet(orphan)


def test_unknown_missing_and_misshaped_keys_are_refused(detrex_state_dict, detrex_model):
    extra = dict(detrex_state_dict, **{"transformer.mystery.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match=r"1 checkpoint keys have no Align-DETR counterpart.*transformer.mystery"):
        convert_state_dict(extra, detrex_model.config)
    missing = {k: v for k, v in detrex_state_dict.items() if k != "transformer.decoder.layers.1.norms.2.bias"}
    with pytest.raises(ConversionError, match=r"missing \['model.decoder.layers.1.final_layer_norm.bias'\]"):
        load_converted(missing, detrex_model.config)
    wrong = dict(detrex_state_dict, **{"transformer.encoder.layers.0.norms.0.weight": torch.ones(255)})
    with pytest.raises(ConversionError, match=r"wrong shapes .*encoder.layers.0.self_attn_layer_norm.weight"):
        load_converted(wrong, detrex_model.config)
    no_queries = {k: v for k, v in detrex_state_dict.items() if k != "transformer.tgt_embed.weight"}
    with pytest.raises(ConversionError, match=r"Not an official Align-DETR / detrex DINO checkpoint: missing"):
        config_from_state_dict(no_queries)
    swin = {k: v for k, v in detrex_state_dict.items() if not k.startswith("backbone.")}
    swin["backbone.layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"not detectron2's ResNet .*backbone.layers"):
        config_from_state_dict(swin)


# ------------------------------------------------------------------------------------- eval parity (official code)


class EvalRun(dict):
    """One eval forward of the base model, with every decoder layer's class logits added (the detection model's
    heads): `enc_topk_*`, `intermediate_logits`, `intermediate_pred_boxes`, `intermediate_reference_points`, and
    `logits` / `pred_boxes` of the last layer for the image processor."""

    @classmethod
    def of(cls, model, pixel_values):
        with torch.no_grad():
            base = model.model(pixel_values)
            hidden = base.intermediate_hidden_states.transpose(0, 1)  # the outputs are batch-first, the fixture not
            logits = torch.stack([head(h) for head, h in zip(model.class_embed, hidden)])
        layer_first = {name: getattr(base, name).transpose(0, 1)
                       for name in ("intermediate_pred_boxes", "intermediate_reference_points")}
        return cls(base, **layer_first, intermediate_logits=logits, logits=logits[-1],
                   pred_boxes=layer_first["intermediate_pred_boxes"][-1])


@pytest.fixture(scope="module")
def single_image_runs(detrex_model, inputs):
    """detrex evaluates one image per batch (no padding): each image alone."""
    sizes = [meta["img_shape"] for meta in inputs["metainfo"]]
    return [EvalRun.of(detrex_model, inputs["pixel_values"][i : i + 1, :, :h, :w]) for i, (h, w) in enumerate(sizes)]


@pytest.fixture(scope="module")
def batched_run(detrex_model, inputs):
    """Both images in one padded batch without a mask: the official eval builds none (padding counts as image)."""
    return EvalRun.of(detrex_model, inputs["pixel_values"])


def _assert_eval_matches(run, reference):
    assert torch.equal(run["enc_topk_indices"], reference["enc_topk_indices"])  # set and order (gaps >= 1.4e-5)
    for ours, theirs, atol in [
        ("enc_topk_logits", "enc_topk_logits", LOGITS_ATOL),
        ("enc_topk_boxes", "enc_topk_boxes", BOXES_ATOL),
        ("intermediate_logits", "all_dec_logits", LOGITS_ATOL),
        ("intermediate_pred_boxes", "all_dec_boxes", BOXES_ATOL),
        ("intermediate_reference_points", "dec_references", BOXES_ATOL),
    ]:
        assert run[ours].shape == reference[theirs].shape, ours
        torch.testing.assert_close(run[ours], reference[theirs], atol=atol, rtol=0, msg=ours)


def test_each_image_alone_matches_the_official_evaluation(single_image_runs, outputs):
    for run, reference in zip(single_image_runs, outputs["single_image"], strict=True):
        _assert_eval_matches(run, reference)


def test_batch_without_a_mask_is_the_official_batched_evaluation(batched_run, outputs):
    """The official model builds no padding mask in eval: image 1's padding counts as image. Called without
    `pixel_mask`, ours computes exactly that."""
    assert not outputs["memory_mask"].any()
    _assert_eval_matches(batched_run, outputs)


def _assert_same_detections(ours, reference):
    """Neighbouring scores are ~2e-7 apart, so the order may differ: pair one to one by label, score and box."""
    assert len(ours["scores"]) == len(reference["scores"]) == 300 and reference["top300"]["kept"].all()
    free = torch.ones(len(reference["scores"]), dtype=torch.bool)
    for label, score, box in zip(ours["labels"], ours["scores"], ours["boxes"]):
        candidates = free & (reference["labels"] == label) & ((reference["scores"] - score).abs() < SCORES_ATOL)
        candidates &= (reference["bboxes"] - box).abs().amax(1) < PIXELS_ATOL
        assert candidates.any(), (label, score, box)
        free[candidates.nonzero()[0, 0]] = False
    assert not free.any()


def test_post_processed_detections_match_detectron2s(single_image_runs, batched_run, inputs, outputs):
    """detector_postprocess: top 300 of sigmoid over queries x classes, boxes scaled to the original image and
    clipped to it, as the image processor does."""
    processor = AlignDetrImageProcessor()
    original_sizes = [meta["ori_shape"] for meta in inputs["metainfo"]]
    for run, size, reference in zip(single_image_runs, original_sizes, outputs["single_image"], strict=True):
        (ours,) = processor.post_process_object_detection(run, target_sizes=[size])
        _assert_same_detections(ours, reference["results"][0])
    # batched without a mask: image 1's boxes refer to the padded canvas, leave the image and get clipped
    for ours, reference in zip(processor.post_process_object_detection(batched_run, target_sizes=original_sizes),
                               outputs["results"], strict=True):  # fmt: skip
        _assert_same_detections(ours, reference)


# ----------------------------------------------------------------------------------------- training parity


def _head_outputs(recorded):
    head, dn = recorded["head"], recorded["dn"]
    num_dn = dn["num_denoising_queries"]
    return AlignDetrLossInputs(
        logits=head["all_layers_cls_scores"][:, :, num_dn:],
        boxes=head["all_layers_bbox_preds"][:, :, num_dn:],
        layer_names=decoder_layer_names(head["all_layers_cls_scores"].shape[0]),
        encoder_logits=head["enc_cls_scores"],
        encoder_boxes=head["enc_bbox_preds"],
        dn_logits=head["all_layers_cls_scores"][:, :, :num_dn],
        dn_boxes=head["all_layers_bbox_preds"][:, :, :num_dn],
        denoising=DenoisingLayout(dn["dn_num"], dn["single_padding"] // 2),
    )


def test_loss_terms_and_matchings_from_the_official_head_outputs(detrex_model, recorded):
    """The official criterion's 15 terms and its matchings in every layer, from its own head outputs."""
    loss = build_loss(detrex_model.config)
    head_outputs, targets = _head_outputs(recorded), official_targets(recorded)
    total, loss_dict = loss(head_outputs, targets)
    assert len(loss_dict) == len(recorded["losses"]) == 15
    for name, value in recorded["losses"].items():
        assert loss_dict[official_to_our_loss_name(name)].item() == pytest.approx(value, rel=HEAD_LOSS_RTOL), name
    assert total.item() == pytest.approx(recorded["total_loss"], rel=HEAD_LOSS_RTOL)
    matches = loss.match(head_outputs, targets)  # decoder layers 0, 1, then the encoder
    offsets = [0, len(targets[0]["class_labels"])]
    for layer, name in zip(matches, ("d0", "d1", "enc")):
        reference = recorded["match"][name]
        for image, offset in enumerate(offsets):
            in_image = layer.batch == image
            ours = set(zip(layer.query[in_image].tolist(), (layer.gt[in_image] - offset).tolist()))
            expected = set(zip(reference["src"][image].tolist(), reference["tgt"][image].tolist()))
            assert ours == expected, (name, image)


def test_train_forward_matches_the_official_head_outputs_and_losses(detrex_model, inputs, recorded):
    """Train mode with the official denoising queries injected: head outputs of every layer (denoising part
    included, which needs the head's eps 1e-3) and all 15 loss terms."""
    out = _train_forward(detrex_model, inputs, recorded)
    head, num_dn = recorded["head"], recorded["dn"]["num_denoising_queries"]
    assert torch.equal(out.enc_topk_indices, head["enc_topk_indices"])
    scores, boxes = head["all_layers_cls_scores"], head["all_layers_bbox_preds"]
    torch.testing.assert_close(out.dn_logits.transpose(0, 1), scores[:, :, :num_dn], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.intermediate_logits.transpose(0, 1), scores[:, :, num_dn:], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.dn_pred_boxes.transpose(0, 1), boxes[:, :, :num_dn], atol=BOXES_ATOL, rtol=0)
    torch.testing.assert_close(out.intermediate_pred_boxes.transpose(0, 1), boxes[:, :, num_dn:], atol=BOXES_ATOL, rtol=0)
    torch.testing.assert_close(out.enc_topk_logits, head["enc_cls_scores"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.enc_topk_boxes, head["enc_bbox_preds"], atol=BOXES_ATOL, rtol=0)
    for name, value in recorded["losses"].items():
        assert out.loss_dict[official_to_our_loss_name(name)].item() == pytest.approx(value, rel=LOSS_RTOL), name
    assert out.loss.item() == pytest.approx(recorded["total_loss"], rel=LOSS_RTOL)


def test_mmdetections_head_eps_would_move_the_clamped_denoising_boxes(detrex_model, inputs, recorded):
    """Why `head_inverse_sigmoid_eps` is a setting: with mmdetection's 1e-5 the denoising boxes clamped to the
    border leave the official outputs by far more than the tolerance."""
    decoder = detrex_model.model.decoder
    decoder.head_eps = 1e-5
    try:
        out = _train_forward(detrex_model, inputs, recorded)
    finally:
        decoder.head_eps = detrex_model.config.head_inverse_sigmoid_eps
    num_dn = recorded["dn"]["num_denoising_queries"]
    difference = (out.dn_pred_boxes.transpose(0, 1) - recorded["head"]["all_layers_bbox_preds"][:, :, :num_dn]).abs().max().item()
    assert difference > 5 * BOXES_ATOL  # 8.1e-5 measured


def _train_forward(model, inputs, recorded):
    dn = recorded["dn"]
    injected = AlignDetrDenoisingQueries(
        dn["label_query"], dn["bbox_query_unact"], dn["attn_mask"], dn["dn_num"], dn["single_padding"] // 2
    )
    model.train()
    try:
        return model(inputs["pixel_values"], inputs["pixel_mask"].long(), labels=official_targets(recorded),
                     denoising_queries=injected)  # fmt: skip
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------- files and the CLI


def test_cli_converts_a_detectron2_model_final_and_says_what_it_found(detrex_state_dict, detrex_model, inputs,
                                                                       tmp_path, capsys):  # fmt: skip
    path = tmp_path / "model_final.pth"
    trainer = {"iteration": 89999, "hooks": {"LRScheduler": {"base_lrs": [1e-4], "last_epoch": 89999}},
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]}}  # fmt: skip
    torch.save({"model": detrex_state_dict, "trainer": trainer, "iteration": 89999}, path)
    state_dict, meta = load_checkpoint_and_meta(path)
    assert state_dict.keys() == detrex_state_dict.keys() and meta == {"iteration": 89999}
    out = tmp_path / "converted"
    cli(["convert", "--checkpoint", str(path), "--output-dir", str(out), "--verify", "--num-denoising-queries", "20"])
    printed = capsys.readouterr().out
    assert "model_final.pth: a detectron2/detrex checkpoint" in printed and "24 tied decoder copies" in printed
    model = AlignDetrForObjectDetection.from_pretrained(out).eval()
    assert model.config.head_inverse_sigmoid_eps == 1e-3 and model.config.loss_type == "align_detr"
    with torch.no_grad():
        converted = model(inputs["pixel_values"][:1])
        reference = detrex_model(inputs["pixel_values"][:1])
    assert torch.equal(converted.logits, reference.logits)
    card = (out / "README.md").read_text()
    assert "converted from the official Align-DETR checkpoint `model_final.pth` (saved at iteration 89999)" in card
    assert "FelixCaae/AlignDETR" in card and "50.3 / 51.4 box AP" in card and "cai2023aligndetr" in card


def test_bare_detrex_dino_state_dict_with_loss_type_dino(detrex_state_dict, tmp_path):
    path = tmp_path / "dino_r50_mine.pth"
    torch.save(detrex_state_dict, path)
    cli(["convert", "--checkpoint", str(path), "--output-dir", str(tmp_path / "out"), "--loss-type", "dino"])
    config = AlignDetrForObjectDetection.from_pretrained(tmp_path / "out").config
    assert (config.loss_type, config.position_embedding_temperature, config.head_inverse_sigmoid_eps) == (
        "dino", 10000, 1e-3)  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    assert "DINO (4-scale, resnet backbone) converted from the detrex checkpoint `dino_r50_mine.pth`" in card
    assert "IDEA-Research/detrex" in card


# ------------------------------------------------------------------------------- the full R-50 official key list


def official_r50_state_dict(fill=torch.zeros):
    """The 634 keys of the official R-50 checkpoint: 578 distinct tensors, the 56 tied copies the same tensors."""
    rows = [line.split("\t") for line in (FIXTURES / "detrex_aligndetr_r50_keys.tsv").read_text().splitlines()[2:]]
    tensors = {}
    for key, shape, _dtype, role in rows:
        if not role.startswith("same tensor as "):
            tensors[key] = fill([int(s) for s in shape.split("x")])
            if key.endswith("running_var"):
                tensors[key] = tensors[key].abs() + 1
    return {key: tensors[role.removeprefix("same tensor as ") if role.startswith("same ") else key]
            for key, _shape, _dtype, role in rows}  # fmt: skip


def test_full_official_r50_key_list_maps_onto_the_default_model():
    sd = official_r50_state_dict()
    assert len(sd) == 634 and len({id(v) for v in sd.values()}) == 578
    config = config_from_state_dict(sd)
    default = AlignDetrConfig()
    for name in ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "num_queries", "num_labels",
                 "num_feature_levels", "num_gt_repeat", "freeze_backbone_stages"):  # fmt: skip
        assert getattr(config, name) == getattr(default, name), name
    assert config.backbone_config.depths == [3, 4, 6, 3] and config.backbone_config.layer_type == "bottleneck"
    assert config.head_inverse_sigmoid_eps == 1e-3
    with torch.device("meta"):
        model = AlignDetrForObjectDetection(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in convert_state_dict(sd, config).items()}
    assert converted == expected


@pytest.mark.slow
def test_full_size_official_model_final_converts_with_one_command(tmp_path):
    """A full-size official R-50 `model_final.pth` (generated weights, detectron2's layout) -> a verified folder."""
    generator = torch.Generator().manual_seed(0)
    sd = official_r50_state_dict(lambda shape: torch.randn(shape, generator=generator) * 0.02)
    path = tmp_path / "model_final.pth"
    torch.save({"model": sd, "trainer": {"iteration": 89999}, "iteration": 89999}, path)
    out = tmp_path / "aligndetr-r50-12ep"
    cli(["convert", "--checkpoint", str(path), "--output-dir", str(out), "--verify"])
    model = AlignDetrForObjectDetection.from_pretrained(out).eval()
    assert model.config.num_queries == 900 and model.config.head_inverse_sigmoid_eps == 1e-3
    assert torch.equal(model.model.query_embedding.weight, sd["transformer.tgt_embed.weight"])
    torch.testing.assert_close(
        model.model.decoder.layers[3].self_attn.k_proj.bias,
        sd["transformer.decoder.layers.3.attentions.0.attn.in_proj_bias"][256:512], atol=0, rtol=0,
    )
