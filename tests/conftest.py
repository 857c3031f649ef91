import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# downloads (loopback servers in tests) go to a private cache of this session, never to the user's
os.environ.setdefault("ALIGN_DETR_CACHE", __import__("tempfile").mkdtemp(prefix="align_detr_test_cache_"))
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = FIXTURES / "small"
sys.path.insert(0, str(FIXTURES))

import weights as fixture_weights  # noqa: E402


def tiny_config(**overrides):
    """A few-hundred-kilobyte Align-DETR: ResNet-style basic blocks, d_model 64, 2+2 layers, 12 queries."""
    from align_detr_hf import AlignDetrConfig

    kwargs = dict(
        backbone_config={
            "model_type": "resnet",
            "embedding_size": 8,
            "hidden_sizes": [8, 16, 16, 32],
            "depths": [1, 1, 1, 1],
            "layer_type": "basic",
            "out_features": ["stage2", "stage3", "stage4"],
        },
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=12,
        num_denoising_queries=6,
        id2label={0: "circle", 1: "square", 2: "triangle"},
    )
    kwargs.update(overrides)
    return AlignDetrConfig(**kwargs)


# Batched and one-image runs of the same weights differ by float32 rounding only: another batch size makes the CPU's
# BLAS pick another blocking of the same matrix products (e.g. AVX-512 vs AVX2 kernels on EPYC vs Xeon), so the sums
# round differently, by the order of the rounding error itself. That error is measured on the machine running the test,
# against a float64 run of the same weights (`float32_noise`), and a batch may differ from one image by
# NOISE_FACTOR times it (the largest ratio seen is about 1.5); mixing up images would differ by orders more.
NOISE_FACTOR = 4.0


@torch.no_grad()
def float32_noise(model, runs, outputs):
    """{name: largest |float32 - float64| of `outputs(model(**kwargs))[name]` over `runs`}, at least one float32
    ulp of the output's magnitude. `runs`: forward kwargs of one-image runs; float tensors are run in float64 too."""
    import copy

    reference = copy.deepcopy(model).double()
    noise = {}
    for kwargs in runs:
        ours = outputs(model(**kwargs))
        exact = outputs(reference(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                                     for k, v in kwargs.items()}))
        for name, tensor in ours.items():
            error = (tensor.double() - exact[name]).abs().max().item()
            ulp = torch.finfo(torch.float32).eps * exact[name].abs().max().item()
            noise[name] = max(noise.get(name, 0.0), error, ulp)
    return noise


@pytest.fixture(scope="session")
def small_state_dict():
    """mmdetection-named weights of the small reference model, regenerated bit-exactly."""
    sd = fixture_weights.generate_state_dict(
        fixture_weights.read_manifest(SMALL / "manifest.tsv"), seed=0, num_heads=8, num_points=4
    )
    meta = json.loads((SMALL / "meta.json").read_text())
    assert fixture_weights.state_dict_sha256(sd) == meta["weights"]["state_dict_sha256"]
    return sd


@pytest.fixture(scope="session")
def swin_small_state_dict():
    """mmdetection-named weights of the DINO-5scale Swin reference model (tests/fixtures/swin_small)."""
    folder = FIXTURES / "swin_small"
    sd = fixture_weights.generate_state_dict(
        fixture_weights.read_manifest(folder / "manifest.tsv"), seed=0, num_heads=8, num_points=4
    )
    meta = json.loads((folder / "meta.json").read_text())
    assert fixture_weights.state_dict_sha256(sd) == meta["weights"]["state_dict_sha256"]
    return sd


@pytest.fixture(scope="session")
def small_model(small_state_dict):
    from align_detr_hf.convert_align_detr import config_from_state_dict, load_converted

    config = config_from_state_dict(small_state_dict, num_denoising_queries=20, num_gt_repeat=[2, 1, 2])
    return load_converted(small_state_dict, config)


@pytest.fixture(scope="session")
def small_inputs():
    return torch.load(SMALL / "inputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def small_outputs():
    return torch.load(SMALL / "outputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def small_losses():
    return torch.load(SMALL / "losses.pt", weights_only=True)


def fixture_targets(losses):
    """The fixture's ground truth as transformers-style labels (cxcywh normalised by the unpadded image)."""
    from align_detr_hf.box_ops import box_xyxy_to_cxcywh

    targets = []
    for gt, meta in zip(losses["gt"], losses["metainfo"]):
        height, width = meta["img_shape"]
        boxes = gt["bboxes"] / torch.tensor([width, height, width, height], dtype=torch.float32)
        targets.append({"class_labels": gt["labels"], "boxes": box_xyxy_to_cxcywh(boxes)})
    return targets


def assert_train_outputs_match(out, head: dict, num_dn: int, losses: dict, logits_atol: float, boxes_atol: float,
                               loss_rtol: float) -> None:
    """A train-mode forward (mmdetection's denoising queries injected) against mmdetection's recorded head outputs
    and loss terms: identical encoder top-k, denoising and matching parts of every layer, every loss term."""
    assert torch.equal(out.enc_topk_indices, head["enc_topk_indices"])
    # mmdetection's head outputs are layer-first (L, B, ...); ours are batch-first (B, L, ...)
    scores, boxes = head["all_layers_cls_scores"].transpose(0, 1), head["all_layers_bbox_preds"].transpose(0, 1)
    torch.testing.assert_close(out.dn_logits, scores[:, :, :num_dn], atol=logits_atol, rtol=0)
    torch.testing.assert_close(out.intermediate_logits, scores[:, :, num_dn:], atol=logits_atol, rtol=0)
    torch.testing.assert_close(out.dn_pred_boxes, boxes[:, :, :num_dn], atol=boxes_atol, rtol=0)
    torch.testing.assert_close(out.intermediate_pred_boxes, boxes[:, :, num_dn:], atol=boxes_atol, rtol=0)
    assert set(out.loss_dict) == set(losses)
    for name, value in losses.items():
        assert out.loss_dict[name].item() == pytest.approx(value, rel=loss_rtol), name
