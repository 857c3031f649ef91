"""One converter for the DINO family: Swin and ResNet, 4 or 5 levels, Align-DETR or DINO heads read off the tensors and
mmdetection's meta; DINO-5scale Swin parity with mmdetection (eval and train); the full Swin-L key list; the model
zoo, the model card and the command line."""

import ast
import hashlib

import pytest
import torch
from conftest import assert_train_outputs_match, FIXTURES, fixture_targets, fixture_weights, tiny_config

from align_detr_hf import AlignDetrForObjectDetection
from align_detr_hf.cli import main as cli
from align_detr_hf.convert_align_detr import (
    ConversionError,
    config_from_state_dict,
    convert_state_dict,
    expected_sha256_prefix,
    load_converted,
)
from align_detr_hf.convert_mmdet_backbones import swin_relative_position_index
from align_detr_hf.mmdet_checkpoints import MODEL_ZOO, model_cfg_from_meta, zoo_entry
from align_detr_hf.modeling_align_detr import AlignDetrDenoisingQueries

SWIN = FIXTURES / "swin_small"
# measured against mmdetection: logits 3.8e-6, boxes 1.8e-7, loss terms 2.4e-7 relative (fixture README: 1e-4/1e-5)
LOGITS_ATOL, BOXES_ATOL, LOSS_RTOL = 1e-4, 1e-5, 1e-4


@pytest.fixture(scope="module")
def swin_model(swin_small_state_dict):
    config = config_from_state_dict(swin_small_state_dict, num_denoising_queries=20, drop_path_rate=0.0)
    return load_converted(swin_small_state_dict, config)


def test_swin_dino_settings_are_read_off_the_tensors(swin_model):
    config = swin_model.config
    assert config.backbone_config.model_type == "swin" and config.num_feature_levels == 5
    assert config.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    assert (config.loss_type, config.position_embedding_temperature, config.position_embedding_offset) == ("dino", 20, 0)
    assert config.neck_bias is False and config.freeze_backbone_stages == -1
    assert swin_model.model.input_proj[4][0].in_channels == 256 and swin_model.model.input_proj[4][0].bias is None


def test_swin_dino_eval_outputs_match_mmdetection(swin_model, small_inputs):
    reference = torch.load(SWIN / "outputs.pt", weights_only=True)
    with torch.no_grad():
        out = swin_model(small_inputs["pixel_values"], small_inputs["pixel_mask"].long())
    assert torch.equal(out.enc_topk_indices, reference["enc_topk_indices"])  # set and order (gaps >= 5.2e-5)
    torch.testing.assert_close(out.enc_topk_logits, reference["enc_topk_logits"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.enc_topk_boxes, reference["enc_topk_boxes"], atol=BOXES_ATOL, rtol=0)
    assert out.intermediate_logits.shape == reference["all_dec_logits"].shape == (2, 2, 100, 80)
    # the reference is layer-first (L, B, ...), our outputs batch-first (B, L, ...)
    torch.testing.assert_close(out.intermediate_logits, reference["all_dec_logits"].transpose(0, 1),
                               atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.intermediate_pred_boxes, reference["all_dec_boxes"].transpose(0, 1),
                               atol=BOXES_ATOL, rtol=0)


def test_swin_dino_train_outputs_and_losses_match_mmdetection(swin_model, small_inputs):
    recorded = torch.load(SWIN / "losses.pt", weights_only=True)
    dn, head = recorded["dn"], recorded["head"]
    injected = AlignDetrDenoisingQueries(
        dn["label_query"], dn["bbox_query_unact"], dn["attn_mask"], dn["num_denoising_groups"], dn["max_num_target"]
    )
    swin_model.train()
    try:
        out = swin_model(small_inputs["pixel_values"], small_inputs["pixel_mask"].long(),
                         labels=fixture_targets(recorded), denoising_queries=injected)  # fmt: skip
    finally:
        swin_model.eval()
    assert_train_outputs_match(out, head, dn["num_denoising_queries"], recorded["losses"], LOGITS_ATOL, BOXES_ATOL, LOSS_RTOL)


def test_plain_conversion_of_mmdetections_dino_r50_matches_its_eval_outputs(small_inputs):
    """dino_small through `config_from_state_dict` with nothing but the weights: the bias-free neck and the counters
    say DINO, so position encoding 20/0 and frozen stage 1 follow, and the outputs are mmdetection's."""
    folder = FIXTURES / "dino_small"
    sd = fixture_weights.generate_state_dict(
        fixture_weights.read_manifest(folder / "manifest.tsv"), seed=0, num_heads=8, num_points=4
    )
    model = load_converted(sd)
    assert (model.config.loss_type, model.config.position_embedding_temperature, model.config.neck_bias) == (
        "dino", 20, False)  # fmt: skip
    reference = torch.load(folder / "outputs.pt", weights_only=True)
    with torch.no_grad():
        out = model(small_inputs["pixel_values"], small_inputs["pixel_mask"].long())
    assert torch.equal(out.enc_topk_indices, reference["enc_topk_indices"])
    torch.testing.assert_close(out.intermediate_logits, reference["all_dec_logits"].transpose(0, 1),
                               atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(out.intermediate_pred_boxes, reference["all_dec_boxes"].transpose(0, 1),
                               atol=BOXES_ATOL, rtol=0)


# ------------------------------------------------------------------------------------ key lists of real checkpoints


def state_dict_from_key_list(path, device="meta"):
    """Tensors of the listed shapes (no data) for a whole checkpoint; integer buffers get their real values."""
    sd = {}
    for line in path.read_text().splitlines()[1:]:
        key, shape, kind = line.split("\t")
        shape = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
        if key.endswith("relative_position_index"):
            sd[key] = swin_relative_position_index(int(shape[0] ** 0.5))
        else:
            sd[key] = torch.empty(shape, device=device)
    return sd


def assert_converts_exactly(sd, config):
    """Every key maps, and the converted names and shapes are exactly the model's (built without memory)."""
    with torch.device("meta"):
        model = AlignDetrForObjectDetection(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in convert_state_dict(sd, config).items()}
    assert sorted(set(expected) ^ set(converted)) == []
    assert [k for k in expected if expected[k] != converted[k]] == []


def test_full_swin_l_dino_key_list_maps_onto_a_swin_l_model():
    """dino-5scale_swin-l: all 669 keys, read as Swin-L (192 wide, depths 2-2-18-2, window 12), 5 levels, DINO."""
    sd = state_dict_from_key_list(FIXTURES / "mmdet_dino_swin_l_keys.tsv")
    assert len(sd) == 669
    config = config_from_state_dict(sd)
    swin = config.backbone_config
    assert (swin.embed_dim, swin.depths, swin.num_heads, swin.window_size) == (192, [2, 2, 18, 2], [6, 12, 24, 48], 12)
    assert swin.out_features == ["stage1", "stage2", "stage3", "stage4"] and swin.drop_path_rate == 0.2
    assert (config.num_feature_levels, config.num_queries, config.decoder_layers, config.num_labels) == (5, 900, 6, 80)
    assert (config.loss_type, config.position_embedding_temperature, config.freeze_backbone_stages) == ("dino", 20, -1)
    assert_converts_exactly(sd, config)


def test_r50_align_detr_and_dino_key_lists_get_their_heads_settings():
    align = state_dict_from_key_list(FIXTURES / "mmdet_checkpoint_keys.tsv")
    config = config_from_state_dict(align)
    assert (config.loss_type, config.position_embedding_temperature, config.position_embedding_offset) == (
        "align_detr", 10000, -0.5)  # fmt: skip
    assert config.neck_bias and config.freeze_backbone_stages == 0 and config.backbone_config.model_type == "resnet"
    assert_converts_exactly(align, config)
    # mmdetection's DINO R-50 differs by its neck (no conv bias) and BatchNorm counters (53 of them)
    dino = {k: v for k, v in align.items() if not (k.startswith("neck.") and k.endswith("conv.bias"))}
    norms = [k[: -len(".running_var")] for k in align if k.startswith("backbone.") and k.endswith(".running_var")]
    dino.update({f"{norm}.num_batches_tracked": torch.zeros((), dtype=torch.long) for norm in norms})
    assert len(dino) == 627
    config = config_from_state_dict(dino)
    assert (config.loss_type, config.position_embedding_temperature, config.position_embedding_offset) == ("dino", 20, 0)
    assert not config.neck_bias and config.freeze_backbone_stages == 1
    assert_converts_exactly(dino, config)


# ----------------------------------------------------------------------------------------------- mmdetection's meta


def mmengine_text(model_config_file):
    """`meta['cfg']` as mmengine writes it (`model = dict(type='DINO', ...)`) from a fixture's model_config.txt."""

    def render(value):
        if isinstance(value, dict):
            return "dict(" + ", ".join(f"{k}={render(v)}" for k, v in value.items()) + ")"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(render(v) for v in value) + "]"
        return repr(value)

    text = model_config_file.read_text()
    model = ast.literal_eval(text[text.index("{") :])
    return f"_base_ = []\nfp16 = dict(loss_scale=512.0)\nmodel = {render(model)}\nwork_dir = './work_dirs'\n"


@pytest.mark.parametrize(
    "fixture, expected",
    [
        ("dino_small", dict(loss_type="dino", position_embedding_temperature=20, position_embedding_offset=0.0,
                            freeze_backbone_stages=1, num_denoising_queries=20, class_loss_coefficient=1.0)),
        ("swin_small", dict(loss_type="dino", position_embedding_temperature=20, freeze_backbone_stages=-1)),
        ("small", dict(loss_type="align_detr", position_embedding_temperature=10000, position_embedding_offset=-0.5,
                       freeze_backbone_stages=0, num_gt_repeat=[2, 1, 2], num_denoising_queries=20)),
    ],
)  # fmt: skip
def test_settings_come_from_mmdetections_config_in_meta(fixture, expected, small_state_dict, swin_small_state_dict):
    meta = {"cfg": mmengine_text(FIXTURES / fixture / "model_config.txt"), "epoch": 12}
    sd = swin_small_state_dict if fixture == "swin_small" else small_state_dict  # the weights do not decide here
    config = config_from_state_dict(sd, meta=meta)
    assert {name: getattr(config, name) for name in expected} == expected
    if fixture == "swin_small":
        assert config.backbone_config.drop_path_rate == 0.0  # the fixture's config, not Swin-L's 0.2


def test_improved_dino_config_and_zoo_entry_keep_deformable_detrs_position_encoding(small_state_dict):
    text = mmengine_text(FIXTURES / "dino_small" / "model_config.txt")
    text = text.replace("offset=0.0, temperature=20", "offset=-0.5, temperature=10000")
    assert "temperature=10000" in text
    config = config_from_state_dict(small_state_dict, meta={"cfg": text})
    assert (config.loss_type, config.position_embedding_temperature, config.position_embedding_offset) == (
        "dino", 10000, -0.5)  # fmt: skip
    # a bare state dict named like the zoo's file gets the zoo's settings
    name = "dino-4scale_r50_improved_8xb2-12e_coco_20230818_162607-6f47a913.pth"
    config = config_from_state_dict(small_state_dict, source=f"/tmp/{name}")
    assert (config.loss_type, config.position_embedding_temperature, config.freeze_backbone_stages) == ("dino", 10000, -1)
    assert (config.class_loss_coefficient, config.num_denoising_queries) == (2.0, 300)


def test_loss_type_flag_decides_without_meta_and_conflicts_are_refused(small_state_dict):
    # the Align-DETR weights' neck has a bias; told it is a DINO checkpoint, DINO's settings apply
    assert config_from_state_dict(small_state_dict).loss_type == "align_detr"
    config = config_from_state_dict(small_state_dict, loss_type="dino")
    assert (config.loss_type, config.position_embedding_temperature, config.neck_bias) == ("dino", 20, True)
    meta = {"cfg": mmengine_text(FIXTURES / "dino_small" / "model_config.txt")}
    with pytest.raises(ConversionError, match=r"loss_type='align_detr', but the checkpoint was trained with 'dino'"):
        config_from_state_dict(small_state_dict, meta=meta, loss_type="align_detr")
    with pytest.raises(ConversionError, match=r"trained with a 'DeformableDETRHead' head"):
        config_from_state_dict(small_state_dict, meta={"cfg": meta["cfg"].replace("DINOHead", "DeformableDETRHead")})
    assert model_cfg_from_meta({"cfg": "model = dict(type='DINO'"}) is None  # unreadable text: ignored
    assert model_cfg_from_meta({"cfg": "import os\nmodel = os.system('exit 3')"}) is None  # never executed
    assert model_cfg_from_meta({"cfg": {"model": {"type": "DINO"}}}) == {"type": "DINO"}


def test_what_is_not_a_supported_detector_is_named(small_state_dict, swin_small_state_dict):
    bare_swin = {k.removeprefix("backbone."): v for k, v in swin_small_state_dict.items() if k.startswith("backbone.")}
    with pytest.raises(ConversionError, match="Not an mmdetection Align-DETR/DINO checkpoint.*bare swin backbone"):
        config_from_state_dict(bare_swin)
    other = {k.replace("backbone.conv1.", "backbone.stem.conv."): v for k, v in small_state_dict.items()}
    with pytest.raises(ConversionError, match=r"Unsupported backbone: its top-level modules are \['bn1', 'layer1'"):
        config_from_state_dict(other)
    extra = dict(swin_small_state_dict, **{"backbone.stages.0.blocks.0.attn.w_msa.mystery": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"1 checkpoint keys .*backbone\.stages\.0\.blocks\.0\.attn\.w_msa\.mystery"):
        load_converted(extra)


# ------------------------------------------------------------------------------------------------- freezing


def tiny_swin_config(**overrides):
    backbone = {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2],
                "window_size": 4, "out_features": ["stage1", "stage2", "stage3", "stage4"]}  # fmt: skip
    return tiny_config(backbone_config=backbone, num_feature_levels=5, neck_bias=False, **overrides)


def frozen_names(model):
    return {name.removeprefix("model.backbone.model.") for name, p in model.named_parameters() if not p.requires_grad}


def test_swin_freezing_follows_mmdetections_frozen_stages(tmp_path):
    never = {"swin.layernorm.weight", "swin.layernorm.bias"}  # SwinModel's final norm feeds no feature map
    assert frozen_names(AlignDetrForObjectDetection(tiny_swin_config(freeze_backbone_stages=-1))) == never
    stem = frozen_names(AlignDetrForObjectDetection(tiny_swin_config(freeze_backbone_stages=0))) - never
    assert stem and all(name.startswith("swin.embeddings.") for name in stem)
    model = AlignDetrForObjectDetection(tiny_swin_config(freeze_backbone_stages=2))
    frozen = frozen_names(model)
    assert {n.split(".")[3] for n in frozen if n.startswith("swin.encoder.layers.")} == {"0", "1"}
    assert {n for n in frozen if n.startswith("hidden_states_norms.")} == {
        f"hidden_states_norms.stage{s}.{p}" for s in (1, 2) for p in ("weight", "bias")}  # fmt: skip
    model.save_pretrained(tmp_path)  # transformers re-creates loaded parameters trainable: frozen again after loading
    assert frozen_names(AlignDetrForObjectDetection.from_pretrained(tmp_path)) == frozen
    with pytest.raises(ValueError, match=r"freeze_backbone_stages must be at most 4 \(the backbone's stages\), got 5"):
        tiny_swin_config(freeze_backbone_stages=5)  # the config refuses it before a model is built


def test_freezing_an_unknown_backbone_type_is_refused():
    backbone = {"model_type": "swinv2", "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                "window_size": 4, "out_features": ["stage2", "stage3", "stage4"]}  # fmt: skip
    with pytest.raises(ValueError, match="stages of a 'swinv2' backbone are not known"):
        AlignDetrForObjectDetection(tiny_config(backbone_config=backbone, freeze_backbone_stages=0))
    model = AlignDetrForObjectDetection(tiny_config(backbone_config=backbone, freeze_backbone_stages=-1))
    assert frozen_names(model) == set()


def test_convnext_freezes_its_stem_and_stages():
    backbone = {"model_type": "convnext", "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1],
                "out_features": ["stage2", "stage3", "stage4"]}  # fmt: skip
    frozen = frozen_names(AlignDetrForObjectDetection(tiny_config(backbone_config=backbone, freeze_backbone_stages=1)))
    assert frozen and all(n.startswith(("embeddings.", "encoder.stages.0.")) for n in frozen)
    assert any(n.startswith("embeddings.") for n in frozen) and any(n.startswith("encoder.stages.0.") for n in frozen)


# ------------------------------------------------------------------------------------- zoo, model card, command line


def test_model_zoo_entries_and_readme_table():
    readme = (FIXTURES.parent.parent / "README.md").read_text()
    for entry in MODEL_ZOO:
        assert f"| `{entry.name}` |" in readme, entry.name
        if entry.url:
            assert entry.url in readme and zoo_entry(entry.url) == entry, entry.name
            assert f"align-detr convert --checkpoint {entry.url}" in readme, entry.name
            if entry.code == "mmdetection":
                assert len(expected_sha256_prefix(entry.url)) == 8, entry.name
        if entry.page:  # downloaded by hand (Google Drive)
            assert f"[Google Drive]({entry.page})" in readme and entry.url is None, entry.name
    assert zoo_entry("/tmp/dino-4scale_r50_8xb2-12e_coco_20221202_182705-55b2bba2.pth").box_ap == 49.0
    assert zoo_entry("my_model.pth") is None


def _save_like_mmdet(state_dict, folder, name, meta):
    path = folder / f"{name}.pth"
    torch.save({"meta": meta, "state_dict": state_dict}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return path.rename(folder / f"{name}-{digest}.pth")


def test_cli_converts_a_swin_dino_checkpoint_with_meta_and_writes_a_model_card(swin_small_state_dict, tmp_path):
    meta = {"cfg": mmengine_text(SWIN / "model_config.txt"), "epoch": 12}
    checkpoint = _save_like_mmdet(swin_small_state_dict, tmp_path, "dino-5scale_swin-l_8xb2-12e_coco_20230228", meta)
    out = tmp_path / "converted"
    cli(["convert", "--checkpoint", str(checkpoint), "--output-dir", str(out), "--verify"])
    model = AlignDetrForObjectDetection.from_pretrained(out)
    assert (model.config.loss_type, model.config.num_feature_levels, model.config.num_denoising_queries) == ("dino", 5, 20)
    assert model.config.backbone_config.drop_path_rate == 0.0  # from meta, not the zoo's 0.2
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "zhang2022dino" in card
    # named like the zoo's file, but not it (its sha256 is not the published one): the zoo's AP is not claimed
    assert "its sha256 does not match the published file's, so that figure is not claimed" in card
    assert "model-index" not in card and "download.openmmlab.com" not in card
    with pytest.raises(SystemExit):  # the checkpoint's meta says DINO
        cli(["convert", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "x"), "--loss-type", "align_detr"])
    assert not (tmp_path / "x").exists()


def test_zoo_ap_in_the_model_card_only_for_the_released_file(small_state_dict, tmp_path, monkeypatch):
    """A file named like a zoo entry gets the zoo's AP only when its sha256 matches the published prefix."""
    import align_detr_hf.mmdet_checkpoints as zoo

    name = "align_detr-4scale_r50_8xb2-12e_coco.pth"  # a zoo name without the sha256 suffix: nothing checked on load
    path = tmp_path / name
    torch.save({"meta": {"epoch": 12}, "state_dict": small_state_dict}, path)
    cli(["convert", "--checkpoint", str(path), "--output_dir", str(tmp_path / "renamed")])
    card = (tmp_path / "renamed" / "README.md").read_text()
    assert "50.5 box AP" in card and "so that figure is not claimed for these weights" in card
    assert "model-index" not in card and "mmdetection reports 50.5 box AP on COCO val2017 for it" not in card

    # the same bytes, as if they were the release: its published file name carries this file's sha256 prefix
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    entry = zoo_entry(name)
    released = entry._replace(url=entry.url.rsplit("-", 1)[0] + f"-{digest[:8]}.pth")
    monkeypatch.setattr(zoo, "MODEL_ZOO", [released if e is entry else e for e in zoo.MODEL_ZOO])
    cli(["convert", "--checkpoint", str(path), "--output_dir", str(tmp_path / "release")])
    card = (tmp_path / "release" / "README.md").read_text()
    assert "mmdetection reports 50.5 box AP on COCO val2017 for it (12 epochs)" in card
    assert "model-index" in card and "0.505" in card


def test_cli_loss_type_flag_for_a_bare_state_dict(small_state_dict, tmp_path):
    path = tmp_path / "mine.pth"
    torch.save(small_state_dict, path)
    cli(["convert", "--checkpoint", str(path), "--output-dir", str(tmp_path / "out"), "--loss-type", "dino"])
    config = AlignDetrForObjectDetection.from_pretrained(tmp_path / "out").config
    assert (config.loss_type, config.position_embedding_temperature, config.position_embedding_offset) == ("dino", 20, 0)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "DINO (4-scale, resnet backbone) converted from the mmdetection checkpoint `mine.pth`" in card
