"""Every backbone family the exporter accepts exports with dynamic height and width; the others are refused up front.

One tiny model per family (ResNet: tests/test_export.py), exported once with transformers' DynamoExporter at 2 x
256 x 320, then run at other batches and sizes (odd ones, not multiples of 32) against eager PyTorch on the same
deformable-attention path (grid_sample). Measured: bit-identical (the same kernels in the same order).
"""

import pytest
import torch
from conftest import tiny_config
from transformers import AutoBackbone, AutoConfig

from align_detr_hf import AlignDetrForObjectDetection, ms_deform_attn
from align_detr_hf.export_align_detr import AlignDetrExportWrapper, export_program
from align_detr_hf.export_backbones import check_backbone_exportable, export_safe_backbone, min_side

SWIN = {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4,
        "out_features": ["stage1", "stage2", "stage3", "stage4"]}  # fmt: skip
CONVNEXT = {"model_type": "convnext", "hidden_sizes": [8, 16, 16, 32], "depths": [1, 1, 1, 1],
            "out_features": ["stage2", "stage3", "stage4"]}  # fmt: skip
FAMILIES = {
    "swin": dict(backbone_config=SWIN, num_feature_levels=5, neck_bias=False),
    "convnext": dict(backbone_config=CONVNEXT),
    "convnextv2": dict(backbone_config={**CONVNEXT, "model_type": "convnextv2"}),
}
# (batch, height, width): odd sizes, above Swin's smallest side (129 for window 4)
SIZES = [(1, 131, 197), (3, 160, 133)]


def tiny_model(family):
    torch.manual_seed(0)
    config = tiny_config(encoder_layers=1, decoder_layers=1, **FAMILIES[family])
    return AlignDetrForObjectDetection(config).eval()


def check_export_matches_eager(family, monkeypatch):
    model = tiny_model(family)
    program = export_program(model)
    monkeypatch.setattr(ms_deform_attn, "_FORCED_IMPL", "pytorch")  # the program's path (see test_export.py)
    for batch, height, width in SIZES:
        generator = torch.Generator().manual_seed(height)
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        pixel_mask = torch.ones(batch, height, width, dtype=torch.long)
        pixel_mask[-1, height * 2 // 3 :] = 0
        with torch.no_grad():
            expected = AlignDetrExportWrapper(model)(pixel_values, pixel_mask)
            exported = program.module()(pixel_values=pixel_values, pixel_mask=pixel_mask)
        for name in ("logits", "pred_boxes"):
            torch.testing.assert_close(exported[name], expected[name], atol=1e-6, rtol=0)
    return model, program


def test_swin_exports_with_dynamic_height_and_width(monkeypatch):
    """transformers' Swin pads in Python `if`s; torch.export refused it ("Constraints violated (height, width)")."""
    model, program = check_export_matches_eager("swin", monkeypatch)
    assert min_side(model.config) == 4 * 2**3 * 4 + 1  # patch x 2^(stages-1) x window + 1
    small = {"pixel_values": torch.zeros(1, 3, 128, 200), "pixel_mask": torch.ones(1, 128, 200, dtype=torch.long)}
    with pytest.raises(Exception, match="129"):  # below the range: the program's own check
        program.module()(**small)


def test_convnext_exports_with_dynamic_height_and_width(monkeypatch):
    model, _ = check_export_matches_eager("convnext", monkeypatch)
    assert min_side(model.config) == 96  # sizes rounded down: three stride-32 cells (torch.export asked for 96)


@pytest.mark.slow
def test_convnextv2_exports_with_dynamic_height_and_width(monkeypatch):
    check_export_matches_eager("convnextv2", monkeypatch)


@pytest.mark.parametrize("size", [(97, 130), (64, 64), (70, 33), (129, 129), (20, 300)])
def test_export_safe_swin_gives_transformers_numbers(size):
    """The branch-free Swin layers used while exporting equal transformers' own, also where every stage is padded
    (sizes far below the export range)."""
    torch.manual_seed(0)
    backbone = AutoBackbone.from_config(AutoConfig.for_model(**{**SWIN, "model_type": "swin"})).eval()
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = backbone(pixel_values).feature_maps
        with export_safe_backbone(backbone):
            got = backbone(pixel_values).feature_maps
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert "forward" not in vars(backbone.swin.encoder.layers[0].blocks[0])  # the instance is restored


def test_unknown_backbone_family_is_refused_before_tracing():
    backbone = {"model_type": "swinv2", "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1],
                "window_size": 4, "out_features": ["stage2", "stage3", "stage4"]}  # fmt: skip
    model = AlignDetrForObjectDetection(tiny_config(backbone_config=backbone, freeze_backbone_stages=-1))
    message = r"the 'swinv2' backbone has no tested dynamic-size export .* exportable backbones: convnext, convnextv2"
    with pytest.raises(ValueError, match=message):
        export_program(model)
    with pytest.raises(ValueError, match=message):
        check_backbone_exportable(model.config.backbone_config)
