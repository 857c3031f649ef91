"""The network: parity with mmdetection's own outputs, Hugging Face integration, init, freezing, batching."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import NOISE_FACTOR, assert_train_outputs_match, fixture_targets, float32_noise, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForObjectDetection

from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection, AlignDetrImageProcessor, AlignDetrModel
from align_detr_hf.modeling_align_detr import (
    AlignDetrDenoisingQueries,
    AlignDetrFrozenBatchNorm2d,
    build_denoising_queries,
)

# tolerances from tests/fixtures/small/README.md (a separate implementation, CPU float32)
LOGITS_ATOL, BOXES_ATOL, SCORES_ATOL, PIXELS_ATOL = 1e-4, 1e-5, 1e-5, 1e-2


@pytest.fixture(scope="module")
def small_eval_outputs(small_model, small_inputs):
    with torch.no_grad():
        return small_model(small_inputs["pixel_values"], small_inputs["pixel_mask"].long())


def test_encoder_topk_matches_mmdet(small_eval_outputs, small_outputs):
    ours, ref = small_eval_outputs.enc_topk_indices, small_outputs["enc_topk_indices"]
    for b in range(ours.shape[0]):
        assert set(ours[b].tolist()) == set(ref[b].tolist())
    # the order is well separated in this fixture (gaps >= 1.8e-4), so it must match too
    assert torch.equal(ours, ref)
    torch.testing.assert_close(small_eval_outputs.enc_topk_logits, small_outputs["enc_topk_logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(small_eval_outputs.enc_topk_boxes, small_outputs["enc_topk_boxes"], atol=BOXES_ATOL, rtol=0)


def test_every_decoder_layer_matches_mmdet(small_eval_outputs, small_outputs):
    out = small_eval_outputs
    # the fixture is mmdetection's layer-first (L, B, ...) layout; our outputs are batch-first (B, L, ...)
    assert out.intermediate_logits.shape == (2, 2, 100, 80)
    torch.testing.assert_close(out.intermediate_logits, small_outputs["all_dec_logits"].transpose(0, 1),
                               atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.intermediate_pred_boxes, small_outputs["all_dec_boxes"].transpose(0, 1),
                               atol=BOXES_ATOL, rtol=0)
    torch.testing.assert_close(out.logits, small_outputs["dec_logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.pred_boxes, small_outputs["dec_boxes"], atol=BOXES_ATOL, rtol=0)


def test_post_processed_detections_match_mmdet(small_eval_outputs, small_outputs, small_inputs):
    processor = AlignDetrImageProcessor()
    original_sizes = [meta["ori_shape"] for meta in small_inputs["metainfo"]]
    results = processor.post_process_object_detection(
        small_eval_outputs, threshold=0.0, target_sizes=original_sizes, top_k=300
    )
    for ours, ref in zip(results, small_outputs["results"]):
        assert len(ours["scores"]) == len(ref["scores"]) == 300
        # neighbouring scores differ by ~1e-6, so the order may differ: pair entries one to one by label, score
        # and box, and require every entry to find its partner
        unpaired = list(zip(ref["labels"].tolist(), ref["scores"], ref["bboxes"]))
        for label, score, box in zip(ours["labels"].tolist(), ours["scores"], ours["boxes"]):
            partner = next(
                i for i, (l, s, b) in enumerate(unpaired)
                if l == label and abs(s - score) < SCORES_ATOL and (b - box).abs().max() < PIXELS_ATOL
            )  # fmt: skip
            unpaired.pop(partner)
        assert unpaired == []


def test_denoising_queries_reproduce_mmdet_draws(small_model, small_losses):
    """Same seed, same draws in the same order: the generated queries equal mmdetection's."""
    dn = small_losses["dn"]
    torch.manual_seed(small_losses["dn_seed"])
    queries = build_denoising_queries(
        fixture_targets(small_losses), small_model.model.denoising_class_embed, 80, 100, 20, 0.5, 1.0
    )
    assert (queries.num_groups, queries.max_gt, queries.num_queries) == (6, 3, 36)
    torch.testing.assert_close(queries.label_query, dn["label_query"], atol=0, rtol=0)
    torch.testing.assert_close(queries.box_query_unact, dn["bbox_query_unact"], atol=1e-5, rtol=0)
    assert torch.equal(queries.attn_mask, dn["attn_mask"])


def test_train_forward_matches_mmdet_head_outputs_and_loss(small_model, small_inputs, small_losses):
    dn, head = small_losses["dn"], small_losses["head"]
    injected = AlignDetrDenoisingQueries(
        dn["label_query"], dn["bbox_query_unact"], dn["attn_mask"], dn["num_denoising_groups"], dn["max_num_target"]
    )
    small_model.train()
    try:
        out = small_model(
            small_inputs["pixel_values"],
            small_inputs["pixel_mask"].long(),
            labels=fixture_targets(small_losses),
            denoising_queries=injected,
        )
    finally:
        small_model.eval()
    assert_train_outputs_match(out, head, dn["num_denoising_queries"], small_losses["losses"], LOGITS_ATOL, BOXES_ATOL, 1e-4)
    assert out.loss.item() == pytest.approx(small_losses["total_loss"], rel=1e-5)


def test_full_r50_checkpoint_keys_convert_into_default_model():
    """All 578 keys of the released checkpoint map onto a default-config model, nothing missing or unexpected."""
    from conftest import FIXTURES

    from align_detr_hf.convert_align_detr import config_from_state_dict, load_converted

    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for line in (FIXTURES / "mmdet_checkpoint_keys.tsv").read_text().splitlines()[1:]:
        key, shape, _kind = line.split("\t")
        shape = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
        state_dict[key] = torch.randn(shape, generator=generator) * 0.01
        if key.endswith("running_var"):
            state_dict[key] = state_dict[key].abs() + 1
    assert len(state_dict) == 578
    config = config_from_state_dict(state_dict)
    default = AlignDetrConfig()
    for name in ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "num_queries", "num_labels"):
        assert getattr(config, name) == getattr(default, name), name
    assert config.backbone_config.depths == [3, 4, 6, 3] and config.backbone_config.layer_type == "bottleneck"
    model = load_converted(state_dict, AlignDetrConfig())  # strict: raises on any missing/unexpected key
    assert model.model.decoder.layers[5].self_attn.v_proj.weight.shape == (256, 256)
    torch.testing.assert_close(
        model.model.decoder.layers[3].self_attn.k_proj.bias,
        state_dict["decoder.layers.3.self_attn.attn.in_proj_bias"][256:512],
    )
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 320))  # 1700 encoder positions >= 900 queries
    assert out.logits.shape == (1, 900, 80) and torch.isfinite(out.logits).all()


def test_save_and_load_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(pixel_values)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path).eval()
    assert type(loaded) is AlignDetrForObjectDetection
    with torch.no_grad():
        after = loaded(pixel_values)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.pred_boxes, after.pred_boxes)
    base = AutoModel.from_pretrained(tmp_path)  # the base model loads from the head checkpoint
    assert type(base) is AlignDetrModel
    torch.testing.assert_close(base.level_embed, model.model.level_embed)
    assert type(AutoConfig.for_model("align_detr")) is AlignDetrConfig


def test_trust_remote_code_loads_in_a_process_without_the_package(tmp_path):
    """Config, model, image processor and pipeline load from a folder saved with our code, in a process where
    importing align_detr_hf is impossible."""
    from align_detr_hf.convert_align_detr import saving_remote_code

    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    with saving_remote_code():
        model.save_pretrained(tmp_path)
        AlignDetrImageProcessor().save_pretrained(tmp_path)
    assert AlignDetrForObjectDetection._auto_class == "AutoModelForObjectDetection"  # registered at import
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.save({"pixel_values": pixel_values, "logits": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from PIL import Image
        sys.meta_path.insert(0, type("Block", (), {{"find_spec": staticmethod(
            lambda name, *a: (_ for _ in ()).throw(ImportError("blocked")) if name.startswith("align_detr_hf") else None)}})())
        from transformers import AutoModelForObjectDetection, pipeline
        from transformers.models.auto.image_processing_auto import AutoImageProcessor
        model = AutoModelForObjectDetection.from_pretrained(r"{tmp_path}", trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(r"{tmp_path}", trust_remote_code=True)
        io = torch.load(r"{tmp_path / 'io.pt'}", weights_only=True)
        with torch.no_grad():
            logits = model(io["pixel_values"]).logits
        detector = pipeline("object-detection", model=r"{tmp_path}", trust_remote_code=True)
        found = detector(Image.new("RGB", (80, 60), "white"), threshold=0.0)
        assert "align_detr_hf" not in sys.modules
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        # AutoImageProcessor's rule there too: the torchvision backend with torchvision installed, else the PIL one
        assert type(processor).__name__ in ("AlignDetrImageProcessor", "AlignDetrImageProcessorPil"), type(processor)
        assert found and found[0]["label"] in ("circle", "square", "triangle"), found[:1]
        print("max_diff", (logits - io["logits"]).abs().max().item())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("max_diff")[-1]) < 1e-5  # same weights; thread scheduling only


def test_padded_image_keeps_its_geometry_in_a_batch(small_model, small_inputs, small_outputs):
    """Inside a padded batch an image keeps its own proposals and masks: the encoder never selects a padded position
    (the rest of the padded path is covered by the parity tests, whose image 1 is padded). Outputs are not bit-equal
    to running the image alone: as in mmdetection, the CNN and the GroupNorm of the neck see the zero padding."""
    pixel_values, pixel_mask = small_inputs["pixel_values"], small_inputs["pixel_mask"].long()
    with torch.no_grad():
        batched = small_model(pixel_values, pixel_mask)
    # padded image 1: the top-k never picks a padded position (mmdetection's memory mask, True = padding)
    memory_mask = small_outputs["memory_mask"]
    assert memory_mask[1].sum() > 0  # the image is padded
    assert not memory_mask[1, batched.enc_topk_indices[1]].any()


def test_padded_batch_is_exact_for_the_unpadded_member():
    """Padding one image must not change the other image of the batch at all."""
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    big = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        alone = model(big)
        batch = torch.cat([big, torch.randn(1, 3, 96, 128)])
        mask = torch.ones(2, 96, 128, dtype=torch.long)
        mask[1, 64:, :] = 0
        together = model(batch, mask)
    # up to the float32 rounding of another batch size (see conftest)
    noise = float32_noise(model, [{"pixel_values": big}], lambda out: {"logits": out.logits[0]})
    torch.testing.assert_close(alone.logits[0], together.logits[0], atol=NOISE_FACTOR * noise["logits"], rtol=0)


@pytest.mark.parametrize("build", ["constructor", "from_pretrained_without_weights"])
def test_init_follows_mmdetection(build):
    """mmdetection's non-default inits, also when transformers initialises missing weights in from_pretrained."""
    torch.manual_seed(0)
    config = tiny_config()
    if build == "constructor":
        model = AlignDetrForObjectDetection(config)
    else:
        model = AlignDetrForObjectDetection.from_pretrained(None, config=config, state_dict={})
    assert all(t.device.type != "meta" for t in model.state_dict().values())
    prior_bias = -math.log((1 - 0.01) / 0.01)
    for head in [*model.class_embed, model.model.enc_score_head]:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior_bias))
    for head in [*model.model.decoder.bbox_embed, model.model.enc_bbox_head]:
        assert head.layers[-1].weight.abs().sum() == 0 and head.layers[-1].bias.abs().sum() == 0
        assert head.layers[0].weight.abs().max() <= 1 / math.sqrt(config.d_model)  # torch's default Linear init
    attn = model.model.encoder.layers[0].self_attn
    offsets = attn.sampling_offsets.bias.view(attn.n_heads, attn.n_levels, attn.n_points, 2)
    torch.testing.assert_close(offsets[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))  # head 0 looks right
    torch.testing.assert_close(offsets[1, 2], torch.tensor([[0.0, 1.0], [0.0, 2.0]]))  # head 1 of 4 looks down
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.sampling_offsets.weight.abs().sum() == 0
    norms = [m for m in model.modules() if isinstance(m, AlignDetrFrozenBatchNorm2d)]
    assert norms and all(torch.equal(n.running_var, torch.ones_like(n.running_var)) for n in norms)
    for name in ("decoder.layers.0.fc1.weight", "encoder.layers.1.self_attn.value_proj.weight", "enc_output.weight"):
        weight = model.model.get_parameter(name)
        bound = math.sqrt(6 / sum(weight.shape))  # xavier-uniform
        assert weight.abs().max() <= bound and weight.abs().max() > 0.5 * bound, name


def test_backbone_uses_frozen_batchnorm_and_freezes_only_the_stem():
    model = AlignDetrForObjectDetection(tiny_config())
    backbone = model.model.backbone.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, AlignDetrFrozenBatchNorm2d) for m in backbone.modules())
    assert all(not p.requires_grad for p in backbone.embedder.parameters())
    assert all(p.requires_grad for p in backbone.encoder.parameters())
    frozen_more = AlignDetrForObjectDetection(tiny_config(freeze_backbone_stages=1)).model.backbone.model
    assert all(not p.requires_grad for p in frozen_more.encoder.stages[0].parameters())
    assert all(p.requires_grad for p in frozen_more.encoder.stages[1].parameters())


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).train()
    with torch.no_grad():  # zero-initialised layers (last box layers, attention offsets/weights) block gradients
        for name, param in model.named_parameters():
            if param.ndim == 2 and param.abs().sum() == 0:
                param.normal_(std=0.01)
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    out = model(torch.randn(2, 3, 64, 96), labels=labels)
    assert len(out.loss_dict) == 2 * 3 + 3 + 2 * 3  # decoder layers, encoder, denoising (2 decoder layers)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []
    assert all(p.grad is None for p in model.model.backbone.model.embedder.parameters())


def test_denoising_can_be_switched_off():
    model = AlignDetrForObjectDetection(tiny_config(num_denoising_queries=0)).train()
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    out = model(torch.randn(1, 3, 64, 64), labels=labels)
    assert out.dn_logits is None and len(out.loss_dict) == 2 * 3 + 3
    assert not any("dn" in name for name in out.loss_dict)


def test_clear_errors_for_bad_pixel_inputs():
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="pixel_mask must be"):
        model(torch.randn(1, 3, 64, 64), torch.ones(1, 64, 32, dtype=torch.long))


def test_return_dict_false_gives_a_tuple_with_logits_first_without_labels():
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (1, 12, 3) and out[1].shape == (1, 12, 4)


def test_fine_tuning_start_with_new_classes_reinitialises_only_the_class_layers(tmp_path):
    torch.manual_seed(0)
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(tmp_path)
    model = AlignDetrForObjectDetection.from_pretrained(
        tmp_path, id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}, ignore_mismatched_sizes=True
    )
    prior_bias = -math.log((1 - 0.01) / 0.01)
    for head in [*model.class_embed, model.model.enc_score_head]:
        assert head.weight.shape == (5, 64)
        torch.testing.assert_close(head.bias, torch.full((5,), prior_bias))
    assert model.model.denoising_class_embed.weight.shape == (5, 64)
    original = AlignDetrForObjectDetection.from_pretrained(tmp_path)
    torch.testing.assert_close(model.model.level_embed, original.model.level_embed)


def test_loss_is_align_detr_and_comes_first():
    from align_detr_hf import AlignDetrLoss

    model = AlignDetrForObjectDetection(tiny_config()).train()
    assert isinstance(model.loss_function, AlignDetrLoss)  # not transformers' "ForObjectDetection" DETR loss
    labels = [{"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]])}]
    out = model(torch.randn(1, 3, 64, 64), labels=labels)
    assert list(out.keys())[:2] == ["loss", "loss_dict"]
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.loss_dict.values()), rel=1e-6)
    assert out.to_tuple()[0] is out.loss


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).train()
    with torch.no_grad():  # make every parameter receive a gradient (see the test above)
        for param in model.parameters():
            if param.ndim == 2 and param.abs().sum() == 0:
                param.normal_(std=0.01)
    pixel_values = torch.randn(2, 3, 64, 96)
    labels = [
        {"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)  # the same denoising draws
        model(pixel_values, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.model.encoder.layers[0].gradient_checkpointing
    checkpointed = gradients()
    model.gradient_checkpointing_disable()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
