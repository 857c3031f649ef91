"""Tests of AlignDetrImageProcessor: mmdet parity of preprocessing and post-processing, I/O, annotations, errors."""

import json
import types

import numpy as np
import pytest
import torch

import align_detr_hf
from align_detr_hf import AlignDetrImageProcessor, AlignDetrImageProcessorPil
from align_detr_hf.image_processing_align_detr import get_resize_output_size, pad_and_create_pixel_mask

PIL_Image = pytest.importorskip("PIL.Image")



@pytest.fixture
def processor():
    return AlignDetrImageProcessor()


def _random_uint8(height, width, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def _cv2_linear_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """
    float64 resize following cv2 INTER_LINEAR's sampling rule (without its 11-bit fixed-point rounding):
    src = (dst + 0.5) * in / out - 0.5, clamped to the image, 2-tap linear weights per axis, no antialiasing.
    """

    def axis(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(image.shape[0], out_h)
    x0, x1, fx = axis(image.shape[1], out_w)
    img = image.astype(np.float64)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


# ---------------------------------------------------------------------------------------------- config / Auto


def test_defaults_are_the_released_test_pipeline(processor):
    assert processor.size == {"shortest_edge": 800, "longest_edge": 1333}
    assert processor.image_mean == [123.675, 116.28, 103.53]
    assert processor.image_std == [58.395, 57.12, 57.375]
    assert processor.resample == 2  # PIL BILINEAR
    assert processor.do_resize and processor.do_normalize and processor.do_pad
    assert processor.model_input_names == ["pixel_values", "pixel_mask"]


def test_save_load_round_trip(tmp_path):
    processor = AlignDetrImageProcessor(size={"shortest_edge": 640, "longest_edge": 1000}, do_pad=False)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "AlignDetrImageProcessor"
    assert saved["size"] == {"shortest_edge": 640, "longest_edge": 1000}
    loaded = AlignDetrImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    # from_pretrained kwargs override the saved values
    assert AlignDetrImageProcessor.from_pretrained(tmp_path, do_pad=True).do_pad is True


def test_auto_image_processor(tmp_path):
    # (not `from transformers import AutoImageProcessor`: a torchvision-requiring placeholder in 5.17 without it)
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from transformers.utils import is_torchvision_available

    assert align_detr_hf.AlignDetrImageProcessor is AlignDetrImageProcessor
    AlignDetrImageProcessor().save_pretrained(tmp_path)
    # transformers' rule: the torchvision backend where torchvision is installed, else the PIL one
    default = AlignDetrImageProcessor if is_torchvision_available() else AlignDetrImageProcessorPil
    for backend, expected in ((None, default), ("pil", AlignDetrImageProcessorPil),
                              ("torchvision", AlignDetrImageProcessor)):
        kwargs = {} if backend is None else {"backend": backend}
        loaded = AutoImageProcessor.from_pretrained(tmp_path, **kwargs)
        assert type(loaded) is expected
        assert loaded.backend == (backend or loaded.backend)


# ---------------------------------------------------------------------------------------------- mmdet parity


def test_preprocessing_parity_with_mmdet_fixture(processor, small_inputs):
    """Unresized fixture images must give mmdet's normalised, padded batch and mask exactly (max abs diff 0)."""
    encoding = processor(small_inputs["images"], do_resize=False, return_tensors="pt")
    assert encoding["pixel_values"].dtype == torch.float32
    assert encoding["pixel_values"].shape == small_inputs["pixel_values"].shape
    torch.testing.assert_close(encoding["pixel_values"], small_inputs["pixel_values"], atol=0, rtol=0)
    assert encoding["pixel_mask"].dtype == torch.int64
    assert torch.equal(encoding["pixel_mask"].bool(), small_inputs["pixel_mask"])


def test_post_processing_parity_with_mmdet_fixture(processor, small_inputs, small_outputs):
    """Top-300 detections equal mmdet's as sets keyed by (query, label); scores atol 1e-5, boxes atol 1e-2 px."""
    outputs = types.SimpleNamespace(logits=small_outputs["dec_logits"], pred_boxes=small_outputs["dec_boxes"])
    target_sizes = [meta["ori_shape"] for meta in small_inputs["metainfo"]]
    results = processor.post_process_object_detection(outputs, 0.0, target_sizes)  # positional, as the pipeline
    assert len(results) == 2
    for b, (ours, ref) in enumerate(zip(results, small_outputs["results"])):
        assert ours["scores"].shape == (300,) and ours["boxes"].shape == (300, 4)
        assert ours["labels"].dtype == torch.int64
        probs = small_outputs["dec_logits"][b].sigmoid()
        ours_by_key = {}
        for score, label, box in zip(ours["scores"], ours["labels"], ours["boxes"]):
            # recover the query: the score is sigmoid(logit[query, label]) computed from the same tensor
            queries = (probs[:, label] == score).nonzero().flatten()
            assert len(queries) == 1
            ours_by_key[(queries.item(), label.item())] = (score, box)
        ref_by_key = {
            (q.item(), l.item()): (s, box)
            for q, l, s, box in zip(ref["query_index"], ref["labels"], ref["scores"], ref["bboxes"])
        }
        assert set(ours_by_key) == set(ref_by_key)
        for key, (score, box) in ours_by_key.items():
            torch.testing.assert_close(score, ref_by_key[key][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(box, ref_by_key[key][1], atol=1e-2, rtol=0)


def test_post_processing_threshold_normalised_and_validation(processor):
    torch.manual_seed(0)
    logits = torch.randn(2, 10, 3)
    boxes = torch.tensor([0.5, 0.5, 1.4, 0.2]).expand(2, 10, 4)  # reaches outside the image
    outputs = {"logits": logits, "pred_boxes": boxes}

    normalised = processor.post_process_object_detection(outputs, top_k=300)  # k clipped to Q*C = 30
    assert normalised[0]["scores"].shape == (30,)
    torch.testing.assert_close(normalised[0]["boxes"][0], torch.tensor([-0.2, 0.4, 1.2, 0.6]))

    clamped = processor.post_process_object_detection(outputs, 0.5, torch.tensor([[100, 200], [50, 80]]))
    for result, (h, w) in zip(clamped, [(100, 200), (50, 80)]):
        assert (result["scores"] > 0.5).all()
        assert torch.allclose(result["boxes"][0], torch.tensor([0.0, 0.4 * h, float(w), 0.6 * h]))
    assert sum(len(r["scores"]) for r in clamped) == int((logits.sigmoid() > 0.5).sum())

    with pytest.raises(ValueError, match="target_sizes"):
        processor.post_process_object_detection(outputs, 0.0, [(100, 200)])


# ---------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    "height, width, expected",
    [
        ((480, 640), None, (800, 1067)),
        ((640, 480), None, (1067, 800)),
        ((427, 640), None, (800, 1199)),
        ((200, 1000), None, (267, 1333)),  # long side binds
        ((800, 1333), None, (800, 1333)),
        ((1, 4000), None, (1, 1333)),  # mmcv would give 0 rows; we keep at least 1
        ((4000, 1), None, (1333, 1)),
    ],
    ids=lambda v: str(v),
)
def test_resize_output_size_follows_mmcv_rounding(height, width, expected):
    h, w = height
    scale = min(1333 / max(h, w), 800 / min(h, w))
    mmcv = (int(h * scale + 0.5), int(w * scale + 0.5))
    assert get_resize_output_size(h, w, 800, 1333) == expected
    assert expected == tuple(max(1, v) for v in mmcv)


def test_resize_matches_cv2_linear_sampling(processor):
    """Up- and downscale: same sampling as cv2 INTER_LINEAR; uint8 results are rounded like cv2's uint8 output."""
    cases = [((37, 53), {"shortest_edge": 64, "longest_edge": 100}), ((90, 70), {"height": 31, "width": 20})]
    for shape, size in cases:
        image = _random_uint8(*shape, seed=1)
        float_image = image.astype(np.float32) / 255
        ours_float = processor(float_image, size=size, do_normalize=False)["pixel_values"][0].permute(1, 2, 0)
        ours_uint8 = processor(image, size=size, do_normalize=False)["pixel_values"][0].permute(1, 2, 0)
        reference = _cv2_linear_reference(image, *ours_float.shape[:2])
        # float32 sampling coordinates/weights: ~1e-3 grey levels (cv2's 11-bit weights alone give up to ~0.12)
        assert np.abs(ours_float.double().numpy() - reference).max() < 5e-3
        # rounding to integers, as cv2 returns uint8: within 0.5 of the exact value
        assert np.abs(ours_uint8.double().numpy() - reference).max() <= 0.5 + 5e-3
        assert torch.equal(ours_uint8, ours_uint8.round())

    image = _random_uint8(480, 640)
    encoding = processor(image)
    assert encoding["pixel_values"].shape == (1, 3, 800, 1067)
    assert encoding["pixel_mask"].all()


# ---------------------------------------------------------------------------------------------- input types


def test_input_types_agree(processor):
    rgb = _random_uint8(30, 40)
    expected = processor(rgb, do_resize=False)["pixel_values"]
    mean = torch.tensor([123.675, 116.28, 103.53])[:, None, None]
    std = torch.tensor([58.395, 57.12, 57.375])[:, None, None]
    expected_manual = (torch.from_numpy(rgb).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(expected[0], expected_manual, atol=0, rtol=0)

    variants = {
        "pil_rgb": PIL_Image.fromarray(rgb),
        "pil_rgba": PIL_Image.fromarray(np.concatenate([rgb, np.full((30, 40, 1), 7, np.uint8)], -1)),
        "numpy_float": rgb.astype(np.float64) / 255,
        "torch_chw_uint8": torch.from_numpy(rgb).permute(2, 0, 1),
        "torch_chw_float": torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        "numpy_chw_uint8": rgb.transpose(2, 0, 1),
        "numpy_rgba": np.concatenate([rgb, np.zeros((30, 40, 1), np.uint8)], -1),
        "numpy_uint16": rgb.astype(np.uint16) * 257,  # 65535 / 255 = 257
    }
    for name, image in variants.items():
        for do_resize in (False, True):
            got = processor(image, do_resize=do_resize)["pixel_values"]
            want = processor(rgb, do_resize=do_resize)["pixel_values"]
            # only uint8 inputs are re-quantised after resizing (as cv2 does): allow half a grey level otherwise
            atol = 0.5 / 57.12 + 1e-5 if do_resize and ("float" in name or "uint16" in name) else 1e-4
            torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=name)

    gray = rgb[..., 0]
    gray_expected = processor(np.repeat(gray[..., None], 3, -1), do_resize=False)["pixel_values"]
    for image in (gray, gray[..., None], PIL_Image.fromarray(gray), torch.from_numpy(gray)[None]):
        torch.testing.assert_close(processor(image, do_resize=False)["pixel_values"], gray_expected, atol=0, rtol=0)


def test_batch_padding_and_mask(processor):
    images = [_random_uint8(20, 30, seed=0), _random_uint8(25, 10, seed=1), PIL_Image.fromarray(_random_uint8(5, 7))]
    encoding = processor(images, do_resize=False)
    pixel_values, pixel_mask = encoding["pixel_values"], encoding["pixel_mask"]
    assert pixel_values.shape == (3, 3, 25, 30) and pixel_values.dtype == torch.float32
    assert pixel_mask.shape == (3, 25, 30) and pixel_mask.dtype == torch.int64
    for i, (h, w) in enumerate([(20, 30), (25, 10), (5, 7)]):
        assert pixel_mask[i, :h, :w].all() and pixel_mask[i].sum() == h * w
        assert (pixel_values[i][:, pixel_mask[i] == 0] == 0).all()  # zero padding after normalisation
        single = processor(images[i], do_resize=False)["pixel_values"][0]
        torch.testing.assert_close(pixel_values[i, :, :h, :w], single, atol=0, rtol=0)

    # without padding: a list of per-image tensors, no mask, ready for a collator
    unpadded = processor(images, do_resize=False, do_pad=False)
    assert "pixel_mask" not in unpadded and [tuple(p.shape) for p in unpadded["pixel_values"]] == [
        (3, 20, 30), (3, 25, 10), (3, 5, 7)
    ]  # fmt: skip
    values, mask = pad_and_create_pixel_mask(unpadded["pixel_values"])
    assert torch.equal(values, pixel_values) and torch.equal(mask, pixel_mask)
    values, mask = pad_and_create_pixel_mask(unpadded["pixel_values"], pad_size=(32, 32))
    assert values.shape == (3, 3, 32, 32) and mask.sum() == pixel_mask.sum()
    fixed = processor(images, do_resize=False, pad_size={"height": 32, "width": 40})
    assert fixed["pixel_values"].shape[-2:] == (32, 40) and fixed["pixel_mask"].shape[-2:] == (32, 40)

    np_encoding = processor(images, do_resize=False, return_tensors="np")
    assert isinstance(np_encoding["pixel_values"], np.ndarray) and np_encoding["pixel_mask"].dtype == np.int64


# ---------------------------------------------------------------------------------------------- annotations


def test_annotation_conversion(processor):
    image = _random_uint8(480, 640)  # resized to 800 x 1067: scale_factor (1067/640, 800/480)
    annotation = {
        "image_id": 42,
        "annotations": [
            {"bbox": [10.0, 20.0, 100.0, 50.0], "category_id": 3, "iscrowd": 0, "area": 4000.0},
            {"bbox": [0.0, 0.0, 50.0, 50.0], "category_id": 7, "iscrowd": 1, "area": 2500.0},  # crowd: dropped
            {"bbox": [600.0, 400.0, 100.0, 200.0], "category_id": 5, "iscrowd": 0},  # clipped to 40 x 80
            {"bbox": [700.0, 10.0, 20.0, 20.0], "category_id": 1, "iscrowd": 0, "area": 400.0},  # outside: removed
            {"bbox": [30.0, 30.0, 0.0, 10.0], "category_id": 2, "iscrowd": 0, "area": 0.0},  # zero width: removed
        ],
    }
    encoding = processor(image, annotations=annotation)
    labels = encoding["labels"]
    assert isinstance(labels, list) and len(labels) == 1
    target = labels[0]
    assert target["class_labels"].tolist() == [3, 5] and target["class_labels"].dtype == torch.int64
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (2, 4)
    assert target["image_id"].tolist() == [42]
    assert target["orig_size"].tolist() == [480, 640] and target["size"].tolist() == [800, 1067]
    assert target["iscrowd"].tolist() == [0, 0]
    # normalised by the resized image = normalised by the original image (per-axis scaling cancels)
    expected = torch.tensor([[60 / 640, 45 / 480, 100 / 640, 50 / 480], [620 / 640, 440 / 480, 40 / 640, 80 / 480]])
    torch.testing.assert_close(target["boxes"], expected)
    scale_area = (1067 / 640) * (800 / 480)
    torch.testing.assert_close(target["area"], torch.tensor([4000.0 * scale_area, 40 * 80 * scale_area]))

    # padding must not change the normalisation (DINO convention, unlike transformers' DeformableDetr)
    tall = _random_uint8(610, 300)  # resized to 1333 x 656 (the long side binds)
    batch = processor([image, tall], annotations=[annotation, {"image_id": 1, "annotations": []}])
    torch.testing.assert_close(batch["labels"][0]["boxes"], expected)
    assert batch["labels"][1]["boxes"].shape == (0, 4) and batch["labels"][1]["class_labels"].shape == (0,)
    assert batch["labels"][1]["size"].tolist() == [1333, 656]
    assert batch["pixel_values"].shape == (2, 3, 1333, 1067)

    no_resize = processor(image, annotations=annotation, do_resize=False)["labels"][0]
    assert no_resize["size"].tolist() == [480, 640]
    torch.testing.assert_close(no_resize["boxes"], expected)
    torch.testing.assert_close(no_resize["area"], torch.tensor([4000.0, 40 * 80]))


def test_fixture_gt_boxes(processor, small_inputs):
    """Annotation conversion reproduces the fixture's normalised GT boxes (normalised by img_shape)."""
    annotations = []
    for i, (boxes, classes) in enumerate(zip(small_inputs["gt_bboxes_xyxy"], small_inputs["gt_labels"])):
        objects = [
            {"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": int(c), "iscrowd": 0}
            for (x0, y0, x1, y1), c in zip(boxes.tolist(), classes)
        ]
        annotations.append({"image_id": i, "annotations": objects})
    labels = processor(small_inputs["images"], annotations=annotations, do_resize=False)["labels"]
    for target, boxes, classes in zip(labels, small_inputs["gt_bboxes_cxcywh_norm"], small_inputs["gt_labels"]):
        torch.testing.assert_close(target["boxes"], boxes.float(), atol=1e-6, rtol=0)
        assert torch.equal(target["class_labels"], classes)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "empty"),
        (np.zeros((0, 10, 3), np.uint8), "zero-size"),
        (torch.zeros(3, 10, 0, dtype=torch.uint8), "zero-size"),
        (np.zeros((10,), np.uint8), "2-d"),
        (np.zeros((1, 1, 10, 10, 3), np.uint8), "2-d"),
        (np.zeros((10, 10, 3), np.int32), "dtype"),
        (torch.zeros(3, 10, 10, dtype=torch.int64), "dtype"),
        (np.full((10, 10, 3), 255.0, np.float32), r"\[0, 1\]"),
        (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
        (np.zeros((10, 10, 7), np.uint8), "channel"),
        (b"not an image", "cannot read image"),
        (3.5, "Unsupported image type"),
        ([[np.zeros((4, 4, 3), np.uint8)]], "Nested"),
    ],
)
def test_bad_inputs_raise(processor, images, message):
    with pytest.raises(ValueError, match=message):
        processor(images)


def test_bad_arguments_raise(processor):
    image = _random_uint8(8, 8)
    with pytest.raises(ValueError, match="one annotation dict per image"):
        processor([image, image], annotations=[{"image_id": 0, "annotations": []}])
    with pytest.raises(ValueError, match="COCO detection"):
        processor(image, annotations={"image_id": 0, "boxes": []})
    with pytest.raises(ValueError, match="Unexpected keyword"):
        processor(image, do_centre_crop=True)
    with pytest.raises(ValueError, match="not center-cropped"):
        processor(image, do_center_crop=True)
    with pytest.raises(ValueError, match="size"):
        AlignDetrImageProcessor(size={"longest_edge": 3})
    with pytest.raises(ValueError, match="resample"):
        processor(image, resample=1)
    with pytest.raises(ValueError, match="pad_size"):
        processor(image, pad_size={"height": 2, "width": 2}, do_resize=False)
