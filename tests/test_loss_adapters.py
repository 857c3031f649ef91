"""The Align-DETR loss on transformers' own detectors (`align_detr_hf.loss_adapters`)."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_config
from transformers import ResNetConfig, Trainer, TrainingArguments

from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection
from align_detr_hf.data import load_coco_folder
from align_detr_hf.loss_align_detr import AlignDetrLossInputs, DenoisingLayout, build_loss, decoder_layer_names
from align_detr_hf.loss_adapters import (
    MODEL_FAMILIES,
    SUPPORTED_MODELS,
    AlignDetrLossAdapter,
    AlignDetrLossOptions,
    ModelFamily,
    remove_align_detr_loss,
    use_align_detr_loss,
)

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}
TERMS = ("loss_cls", "loss_bbox", "loss_iou")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _backbone(out_features=("stage2", "stage3", "stage4")):
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
                        out_features=list(out_features))


def build(name, **overrides):
    """A tiny random-init transformers detector (two decoder layers, 8 queries; nothing downloaded)."""
    torch.manual_seed(0)
    width = dict(d_model=32, decoder_layers=2, decoder_ffn_dim=32, decoder_attention_heads=2, encoder_ffn_dim=32,
                 encoder_attention_heads=2, num_queries=8, id2label=ID2LABEL)
    if name.startswith("deformable_detr"):
        two_stage = name == "deformable_detr_two_stage"
        kwargs = dict(backbone_config=_backbone(), encoder_layers=1, num_feature_levels=3, encoder_n_points=2,
                      decoder_n_points=2, two_stage=two_stage, with_box_refine=two_stage,
                      two_stage_num_proposals=8, auxiliary_loss=True, disable_custom_kernels=True, **width)
        config = transformers.DeformableDetrConfig(**{**kwargs, **overrides})
        return transformers.DeformableDetrForObjectDetection(config)
    if name == "conditional_detr":
        kwargs = dict(backbone_config=_backbone(["stage3"]), encoder_layers=1, auxiliary_loss=True, **width)
        config = transformers.ConditionalDetrConfig(**{**kwargs, **overrides})
        return transformers.ConditionalDetrForObjectDetection(config)
    if name == "detr":
        config = transformers.DetrConfig(backbone_config=_backbone(["stage4"]), encoder_layers=1, **width)
        return transformers.DetrForObjectDetection(config)
    kwargs = dict(backbone_config=_backbone(), encoder_in_channels=[16, 16, 32], feat_strides=[8, 16, 32],
                  encoder_hidden_dim=32, hidden_expansion=0.5, decoder_in_channels=[32] * 3, num_denoising=6,
                  **width)
    kwargs.update(overrides)
    classes = {"rt_detr": ("RTDetrConfig", "RTDetrForObjectDetection"),
               "rt_detr_v2": ("RTDetrV2Config", "RTDetrV2ForObjectDetection"),
               "d_fine": ("DFineConfig", "DFineForObjectDetection")}
    config_class, model_class = (getattr(transformers, n) for n in classes[name])
    return model_class(config_class(**kwargs))


def _labels():
    return [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]


def _pixels(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _keys(prefixes, dn_prefixes=()):
    return {f"{p}{t}" for p in prefixes for t in TERMS} | {f"{p}dn_{t}" for p in dn_prefixes for t in TERMS}


# The mmdetection names each model's Align-DETR loss must have (2 decoder layers): last layer "", layer 0 "d0.",
# encoder proposals "enc_", denoising "dn_", D-FINE's initial prediction "pre." and its kept own FGL/DDF terms.
EXPECTED_KEYS = {
    "deformable_detr": _keys(["", "d0."]),
    "deformable_detr_two_stage": _keys(["", "d0.", "enc_"]),
    "conditional_detr": _keys(["", "d0."]),
    "rt_detr": _keys(["", "d0.", "enc_"], ["", "d0."]),
    "rt_detr_v2": _keys(["", "d0.", "enc_"], ["", "d0."]),
    "d_fine": _keys(["", "d0.", "pre.", "enc_"], ["", "d0.", "pre."]),
}


class _TwoImages(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return {"pixel_values": _pixels(2)[index], "labels": _labels()[index]}


def _collate(items):
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]), "labels": [i["labels"] for i in items]}


@pytest.mark.parametrize("name", list(EXPECTED_KEYS))
def test_forward_gradients_and_trainer_step(name, tmp_path):
    model = build(name)
    use_align_detr_loss(model)
    model.train()
    output = model(pixel_values=_pixels(), labels=_labels())
    own_terms = {k for k in output.loss_dict if k.startswith("own.")}
    assert set(output.loss_dict) - own_terms == EXPECTED_KEYS[name]
    if name == "d_fine":  # its distribution losses are kept beside ours, nothing else of its own
        assert own_terms and {k.split("_")[1] for k in own_terms} == {"fgl", "ddf"}
    else:
        assert not own_terms
    assert torch.isfinite(output.loss)
    assert torch.allclose(output.loss, sum(output.loss_dict.values()))
    output.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    # the last decoder layer's class and box heads learn from the loss
    class_head = [n for n in grads if "class" in n and grads[n].abs().sum() > 0]
    box_head = [n for n in grads if "bbox" in n and grads[n].abs().sum() > 0]
    assert class_head and box_head

    # one Trainer step, unchanged Trainer: the loss reaches the optimiser through forward(labels=...)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                             remove_unused_columns=False, report_to=[], save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=_TwoImages(), data_collator=_collate).train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    # eval mode with labels (a validation loss): no denoising terms; D-FINE passes its last layer alone
    model.eval()
    with torch.no_grad():
        eval_keys = set(model(pixel_values=_pixels(), labels=_labels()).loss_dict)
    without_dn = {k for k in EXPECTED_KEYS[name] if "dn_" not in k}
    assert eval_keys == (_keys(["", "enc_"]) if name == "d_fine" else without_dn)


def _spy_on_loss_inputs(model):
    """Record the arguments the model passes to its loss function."""
    adapter, calls = model.loss_function, []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return adapter(*args, **kwargs)

    model.loss_function = spy
    return calls


def _direct_loss(num_labels, num_gt_repeat, labels=None, **outputs):
    config = AlignDetrConfig(num_labels=num_labels, decoder_layers=len(num_gt_repeat) - 1, num_gt_repeat=num_gt_repeat)
    inputs = AlignDetrLossInputs(layer_names=decoder_layer_names(len(num_gt_repeat) - 1), **outputs)
    return build_loss(config)(inputs, labels or _labels())[1]


@pytest.mark.parametrize("name", ["rt_detr", "deformable_detr_two_stage", "conditional_detr"])
def test_adapter_equals_align_detr_loss_on_the_same_tensors(name):
    """Through the model + adapter == AlignDetrLoss on the same predictions, re-laid out by hand here."""
    model = build(name)
    use_align_detr_loss(model)
    calls = _spy_on_loss_inputs(model)
    model.train()
    output = model(pixel_values=_pixels(), labels=_labels())
    (logits, _, _, pred_boxes, _, outputs_class, outputs_coord), kwargs = calls[0][0][:7], calls[0][1]
    if name == "rt_detr":  # batch-first, denoising queries first
        meta = kwargs["denoising_meta_values"]
        num_dn, num_queries = meta["dn_num_split"]
        groups = meta["dn_num_group"]
        expected = _direct_loss(
            3, [2, 1, 2],
            logits=outputs_class.transpose(0, 1)[:, :, num_dn:],
            boxes=outputs_coord.transpose(0, 1)[:, :, num_dn:],
            encoder_logits=kwargs["enc_topk_logits"], encoder_boxes=kwargs["enc_topk_bboxes"],
            dn_logits=outputs_class.transpose(0, 1)[:, :, :num_dn],
            dn_boxes=outputs_coord.transpose(0, 1)[:, :, :num_dn],
            denoising=DenoisingLayout(num_groups=groups, max_gt=num_dn // (2 * groups)),
        )
        # their positive denoising slots are ours: 2 * max_gt * group + gt index
        assert [p.tolist() for p in meta["dn_positive_idx"]] == [[0, 1, 4, 5, 8, 9], [0, 4, 8]]
    else:  # layer-first
        expected = _direct_loss(3, [2, 1, 2], logits=outputs_class, boxes=outputs_coord)
        torch.testing.assert_close(outputs_class[-1], logits)
        torch.testing.assert_close(outputs_coord[-1], pred_boxes)
    if name == "deformable_detr_two_stage":  # class-agnostic encoder term on the model's own top-k (class-0 logit)
        topk = output.enc_outputs_class[..., 0].topk(8, dim=1)[1]
        class_agnostic = [{"class_labels": torch.zeros_like(t["class_labels"]), "boxes": t["boxes"]} for t in _labels()]
        encoder = _direct_loss(
            1, [2, 2], class_agnostic,
            logits=output.enc_outputs_class.gather(1, topk[..., None])[None],
            boxes=output.enc_outputs_coord_logits.gather(1, topk[..., None].expand(-1, -1, 4)).sigmoid()[None],
        )
        expected.update({f"enc_{k}": v for k, v in encoder.items()})
    assert set(output.loss_dict) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(output.loss_dict[key], value, rtol=0, atol=0, msg=key)


def test_rt_detr_layout_reproduces_our_models_loss():
    """Our own model's predictions, laid out as RT-DETR passes them (batch-first, denoising queries first, its
    denoising meta values), give exactly our model's loss through the adapter."""
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config(d_model=32, num_queries=10)).train()
    labels = _labels()
    out = model(pixel_values=_pixels(), labels=labels)
    num_dn = out.dn_logits.shape[2]
    max_gt = max(len(t["class_labels"]) for t in labels)
    groups = num_dn // (2 * max_gt)
    outputs_class = torch.cat([out.dn_logits, out.intermediate_logits], 2)  # both batch-first (B, L, ...)
    outputs_coord = torch.cat([out.dn_pred_boxes, out.intermediate_pred_boxes], 2)
    positive = [torch.cat([torch.arange(len(t["class_labels"])) + 2 * max_gt * g for g in range(groups)])
                for t in labels]
    adapter = AlignDetrLossAdapter("RTDetrForObjectDetection", AlignDetrLossOptions())
    loss, loss_dict, auxiliary = adapter(
        outputs_class[:, -1], labels, "cpu", outputs_coord[:, -1], model.config, outputs_class, outputs_coord,
        enc_topk_logits=out.enc_topk_logits, enc_topk_bboxes=out.enc_topk_boxes,
        denoising_meta_values={"dn_num_split": [num_dn, outputs_class.shape[2] - num_dn], "dn_num_group": groups,
                               "dn_positive_idx": positive},
    )
    assert list(loss_dict) == list(out.loss_dict)
    for key in loss_dict:
        torch.testing.assert_close(loss_dict[key], out.loss_dict[key], rtol=0, atol=0, msg=key)
    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=0)
    assert len(auxiliary) == 1 and auxiliary[0]["logits"].shape == out.intermediate_logits[:, 0].shape


def _random_rt_detr_inputs(num_layers=2, num_queries=8, num_classes=3):
    generator = torch.Generator().manual_seed(0)
    outputs_class = torch.randn(2, num_layers, num_queries, num_classes, generator=generator)
    outputs_coord = torch.rand(2, num_layers, num_queries, 4, generator=generator) * 0.5 + 0.25
    enc = (torch.randn(2, num_queries, num_classes, generator=generator),
           torch.rand(2, num_queries, 4, generator=generator) * 0.5 + 0.25)
    return outputs_class, outputs_coord, enc


class _Config:
    num_labels, decoder_layers = 3, 2


def test_hyper_parameters_and_num_gt_repeat_reach_the_loss():
    outputs_class, outputs_coord, (enc_logits, enc_boxes) = _random_rt_detr_inputs()
    call = (outputs_class[:, -1], _labels(), "cpu", outputs_coord[:, -1], _Config, outputs_class, outputs_coord)
    options = AlignDetrLossOptions(decoder_num_gt_repeat=[3, 1], encoder_num_gt_repeat=4,
                                   loss_overrides={"quality_alpha": 0.5, "negative_gamma": 1.0, "rank_tau": 3.0})
    got = AlignDetrLossAdapter("RTDetrV2ForObjectDetection", options)(
        *call, enc_topk_logits=enc_logits, enc_topk_bboxes=enc_boxes)[1]
    config = AlignDetrConfig(num_labels=3, decoder_layers=2, num_gt_repeat=[3, 1, 4], quality_alpha=0.5,
                             negative_gamma=1.0, rank_tau=3.0)
    expected = build_loss(config)(AlignDetrLossInputs(outputs_class.transpose(0, 1), outputs_coord.transpose(0, 1),
                                                      decoder_layer_names(2), enc_logits, enc_boxes), _labels())[1]
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    default = AlignDetrLossAdapter("RTDetrV2ForObjectDetection", AlignDetrLossOptions())(
        *call, enc_topk_logits=enc_logits, enc_topk_bboxes=enc_boxes)[1]
    assert abs(float(default["loss_cls"] - got["loss_cls"])) > 1e-3  # the hyper-parameters changed the loss

    # encoder term off, last decoder layer only
    last_only = AlignDetrLossAdapter(
        "RTDetrForObjectDetection", AlignDetrLossOptions(decoder_num_gt_repeat=[1], encoder_num_gt_repeat=0))(
        *call, enc_topk_logits=enc_logits, enc_topk_bboxes=enc_boxes)[1]
    assert set(last_only) == set(TERMS)
    torch.testing.assert_close(last_only["loss_cls"], default["loss_cls"], rtol=0, atol=0)


def test_a_new_model_is_one_family_entry(monkeypatch):
    """Adding a model: its class name in SUPPORTED_MODELS and a ModelFamily (here RT-DETR's layout, seen through a
    wrapper) in MODEL_FAMILIES; the adapter does the rest."""
    seen = []

    def inputs(adapter, *args, **kwargs):
        seen.append(adapter.model_class_name)
        return MODEL_FAMILIES["rt_detr"].inputs(adapter, *args, **kwargs)

    monkeypatch.setitem(MODEL_FAMILIES, "new_detr", ModelFamily(inputs))
    monkeypatch.setitem(SUPPORTED_MODELS, "NewDetrForObjectDetection", "new_detr")
    outputs_class, outputs_coord, (enc_logits, enc_boxes) = _random_rt_detr_inputs()
    call = (outputs_class[:, -1], _labels(), "cpu", outputs_coord[:, -1], _Config, outputs_class, outputs_coord)
    extra = {"enc_topk_logits": enc_logits, "enc_topk_bboxes": enc_boxes}
    got = AlignDetrLossAdapter("NewDetrForObjectDetection", AlignDetrLossOptions())(*call, **extra)[1]
    expected = AlignDetrLossAdapter("RTDetrForObjectDetection", AlignDetrLossOptions())(*call, **extra)[1]
    assert seen == ["NewDetrForObjectDetection"] and list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_d_fine_initial_prediction_is_a_named_layer():
    """D-FINE passes L + 1 prediction sets (its first layer's initial boxes first): 'pre.' gets layer 0's k."""
    outputs_class, outputs_coord, _ = _random_rt_detr_inputs(num_layers=3)
    adapter = AlignDetrLossAdapter("DFineForObjectDetection", AlignDetrLossOptions(decoder_num_gt_repeat=[3, 1]))
    got = adapter.align_detr_losses(adapter.adapt(outputs_class[:, -1], outputs_coord[:, -1], _Config, outputs_class,
                                                  outputs_coord), _labels(), _Config)
    expected = _direct_loss(3, [3, 3, 1, 1], logits=outputs_class.transpose(0, 1),
                            boxes=outputs_coord.transpose(0, 1))
    renamed = {"d0.": "pre.", "d1.": "d0."}
    assert set(got) == {renamed.get(k[:3], "") + k.split(".", 1)[-1] for k in expected}
    for key, value in expected.items():
        torch.testing.assert_close(got[renamed.get(key[:3], "") + key.split(".", 1)[-1]], value, rtol=0, atol=0)


def test_kept_own_terms_are_the_models_own_values():
    model = build("rt_detr")
    adapter = use_align_detr_loss(model, keep_terms=["loss_vfl"])
    calls = _spy_on_loss_inputs(model)
    model.train()
    output = model(pixel_values=_pixels(), labels=_labels())
    args, kwargs = calls[0]
    own = adapter.own_loss_function(*args, **kwargs)[1]  # RT-DETR's own loss on the same inputs
    kept = {k: v for k, v in output.loss_dict.items() if k.startswith("own.")}
    assert set(kept) == {f"own.{k}" for k in own if k.startswith("loss_vfl")} and len(kept) > 1
    for key, value in kept.items():
        torch.testing.assert_close(value, own[key[4:]])
    ours = sum(v for k, v in output.loss_dict.items() if not k.startswith("own."))
    torch.testing.assert_close(output.loss, ours + sum(kept.values()))


def test_remove_gives_the_models_own_loss_back():
    model = build("conditional_detr")
    use_align_detr_loss(model)
    with pytest.raises(ValueError, match="already uses the Align-DETR loss"):
        use_align_detr_loss(model)
    remove_align_detr_loss(model)
    output = model(pixel_values=_pixels(), labels=_labels())
    assert "loss_ce" in output.loss_dict and "loss_cls" not in output.loss_dict
    with pytest.raises(ValueError, match="does not use the Align-DETR loss"):
        remove_align_detr_loss(model)


def test_a_deep_copy_keeps_the_loss_and_its_encoder_hook():
    model = build("deformable_detr_two_stage").eval()
    use_align_detr_loss(model)
    copied = copy.deepcopy(model)  # e.g. an EMA model
    assert copied.loss_function is not model.loss_function
    with torch.no_grad():
        original = model(pixel_values=_pixels(), labels=_labels()).loss_dict
        # the copy's hook feeds the copy's adapter (else: "without the encoder outputs")
        again = copied(pixel_values=_pixels(), labels=_labels()).loss_dict
    assert "enc_loss_cls" in again and list(again) == list(original)
    for key in original:
        torch.testing.assert_close(again[key], original[key], rtol=0, atol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="does not support DetrForObjectDetection.*Softmax detectors"):
        use_align_detr_loss(build("detr"))
    with pytest.raises(ValueError, match="Unknown Align-DETR loss hyper-parameters \\['rank_temperature'\\]"):
        use_align_detr_loss(build("conditional_detr"), rank_temperature=2.0)
    with pytest.raises(ValueError, match="Unknown Align-DETR loss hyper-parameters \\['focal_alpha'\\]"):
        use_align_detr_loss(build("conditional_detr"), focal_alpha=0.5)  # DINO's focal loss: not what we compute

    # Conditional DETR without auxiliary outputs: an error by default, the last layer alone when asked
    no_aux = build("conditional_detr", auxiliary_loss=False)
    with pytest.raises(ValueError, match="auxiliary_loss=True"):
        use_align_detr_loss(no_aux)
    with pytest.raises(ValueError, match="no encoder proposals"):
        use_align_detr_loss(no_aux, decoder_num_gt_repeat=[1], encoder_num_gt_repeat=2)
    use_align_detr_loss(no_aux, decoder_num_gt_repeat=[1])
    assert set(no_aux(pixel_values=_pixels(), labels=_labels()).loss_dict) == set(TERMS)

    # a num_gt_repeat list that does not fit the model's decoder layers
    wrong_length = build("deformable_detr")
    use_align_detr_loss(wrong_length, decoder_num_gt_repeat=[2, 2, 1])
    with pytest.raises(ValueError, match="decoder_num_gt_repeat has 3 entries but .* passed 2 decoder"):
        wrong_length(pixel_values=_pixels(), labels=_labels())

    # the two-stage encoder outputs come from the base model's forward; a bare loss call has none
    two_stage = build("deformable_detr_two_stage")
    adapter = use_align_detr_loss(two_stage)
    outputs_class, outputs_coord, _ = _random_rt_detr_inputs()
    with pytest.raises(ValueError, match="without the encoder outputs"):
        adapter(outputs_class[:, -1], _labels(), "cpu", outputs_coord[:, -1], two_stage.config,
                outputs_class.transpose(0, 1), outputs_coord.transpose(0, 1))

    with pytest.raises(ValueError, match="matched none of the model's own loss terms"):
        model = build("rt_detr")
        use_align_detr_loss(model, keep_terms=["loss_focal"])
        model.train()(pixel_values=_pixels(), labels=_labels())


def test_example_fine_tunes_rt_detr_with_the_align_detr_loss(tmp_path):
    spec = importlib.util.spec_from_file_location("train_rtdetr_align_loss", EXAMPLES / "train_rtdetr_align_loss.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--synthetic_shapes", "8", "--synthetic_image_size", "64", "--max_steps", "2",
                           "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path)])
    assert result["loss"] == "align_detr" and result["steps"] == 2
    assert torch.isfinite(torch.tensor(result["train_loss"]))
    assert 0.0 <= result["metrics"]["map"] <= 1.0
    reloaded = transformers.RTDetrForObjectDetection.from_pretrained(tmp_path / "model")
    trained_on = load_coco_folder(tmp_path / "data" / "train" / "annotations.json")
    assert reloaded.config.id2label == trained_on.id2label and len(trained_on.id2label) >= 3
