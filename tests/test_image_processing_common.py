"""transformers' image-processing tests (its `ImageProcessingTestMixin` and the DETR-family tests of
`test_image_processing_deformable_detr.py`), adapted and run on both backends: [`AlignDetrImageProcessor`]
("torchvision", plain PyTorch) and [`AlignDetrImageProcessorPil`] ("pil", NumPy).

Where our documented preprocessing differs from transformers' DETR processors, the tests assert ours, and why:
- `{"shortest_edge", "longest_edge"}` rounds as mmcv (`int(side * scale + 0.5)`), not `get_size_with_aspect_ratio`:
  Align-DETR models are trained and evaluated with mmcv's sizes (`get_expected_values` below is that rule);
- resizing does not antialias (cv2's INTER_LINEAR), image_mean/image_std default to the 0-255 scale with
  `do_rescale=False`: mmdet's arithmetic, which the parity tests check bit for bit;
- boxes are normalised by the resized, unpadded image, not by the padded canvas (the model predicts relative to the
  valid region);
- 4-channel images lose their alpha channel (cv2's reading) and come out with 3 channels: the model takes RGB
  (transformers' `test_call_numpy_4_channels` expects 4 channels out);
- `labels` are dicts of arrays (transformers: `BatchFeature`s), and `do_pad=False` with images of different sizes
  returns a list instead of failing to stack.
"""

import json
import tempfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from align_detr_hf import AlignDetrImageProcessor, AlignDetrImageProcessorPil
from align_detr_hf.image_processing_align_detr import get_resize_output_size
from align_detr_hf.visualize import example_image_path

BACKENDS = [AlignDetrImageProcessor, AlignDetrImageProcessorPil]
IMAGE_PROCESSOR_DICT = {
    "do_resize": True,
    "size": {"shortest_edge": 18, "longest_edge": 1333},
    "do_normalize": True,
    "image_mean": [127.5, 127.5, 127.5],
    "image_std": [127.5, 127.5, 127.5],
    "do_rescale": False,
    "do_pad": True,
}
BATCH_SIZE = 7


def prepare_image_inputs(equal_resolution=False, numpify=False, torchify=False, num_channels=3, seed=0):
    """transformers' `prepare_image_inputs`: 7 random images of 30-400 px, as PIL, HWC numpy or CHW torch."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(BATCH_SIZE):
        height, width = (400, 400) if equal_resolution else rng.integers(30, 400, 2)
        images.append(rng.integers(0, 256, (num_channels, height, width), dtype=np.uint8))
    if torchify:
        return [torch.from_numpy(image) for image in images]
    images = [image.transpose(1, 2, 0) for image in images]
    return images if numpify else [Image.fromarray(image) for image in images]


def get_expected_values(images, size=IMAGE_PROCESSOR_DICT["size"], batched=False):
    """Our documented size rule (mmcv's), per image or for the padded batch."""
    sizes = []
    for image in images:
        if isinstance(image, Image.Image):
            height, width = image.height, image.width
        elif isinstance(image, np.ndarray):
            height, width = image.shape[:2]
        else:
            height, width = image.shape[1:]
        sizes.append(get_resize_output_size(height, width, size["shortest_edge"], size["longest_edge"]))
    if not batched:
        return sizes[0]
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def _pixel_values(encoding):
    return torch.as_tensor(np.stack(encoding["pixel_values"])) if isinstance(encoding["pixel_values"], list) \
        else torch.as_tensor(encoding["pixel_values"])


# ------------------------------------------------------------------------------------------ ImageProcessingTestMixin


@pytest.mark.parametrize("cls", BACKENDS)
def test_image_processor_properties(cls):
    processor = cls(**IMAGE_PROCESSOR_DICT)
    for name in ("image_mean", "image_std", "do_normalize", "do_resize", "size", "do_rescale", "rescale_factor",
                 "do_pad", "do_convert_rgb", "resample", "format", "do_convert_annotations", "backend"):
        assert hasattr(processor, name), name
    assert processor.backend == ("pil" if cls is AlignDetrImageProcessorPil else "torchvision")


@pytest.mark.parametrize("cls", BACKENDS)
def test_image_processor_from_dict_with_kwargs(cls):
    processor = cls.from_dict(IMAGE_PROCESSOR_DICT)
    assert processor.size == {"shortest_edge": 18, "longest_edge": 1333} and processor.do_pad is True
    # as DeformableDetrImageProcessor: an int size is the shortest edge, the longest defaults to 1333 (transformers'
    # from_dict passes on only `valid_kwargs` keys: the legacy max_size reaches the constructor alone)
    processor = cls.from_dict(IMAGE_PROCESSOR_DICT, size=42, max_size=84)
    assert processor.size == {"shortest_edge": 42, "longest_edge": 1333}
    processor = cls(size=42, max_size=84, pad_and_return_pixel_mask=False)
    assert processor.size == {"shortest_edge": 42, "longest_edge": 84} and processor.do_pad is False
    # every ImagesKwargs key is accepted, as by transformers' processors (issue: do_convert_rgb, do_rescale, device)
    processor = cls.from_dict({}, do_convert_rgb=False, do_rescale=True, rescale_factor=1 / 255,
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], device="cpu",
                              return_tensors="np", disable_grouping=True, default_to_square=False, image_seq_length=4)
    assert processor.do_convert_rgb is False and processor.do_rescale is True
    assert processor.return_tensors == "np" and processor.device == torch.device("cpu")
    # the DETR-family keys too (configs that carry format= load)
    processor = cls.from_dict({"format": "coco_detection", "do_convert_annotations": False})
    assert processor.format == "coco_detection" and processor.do_convert_annotations is False


@pytest.mark.parametrize("cls", BACKENDS)
def test_image_processor_to_json_string(cls):
    obj = json.loads(cls(**IMAGE_PROCESSOR_DICT).to_json_string())
    for key, value in IMAGE_PROCESSOR_DICT.items():
        assert obj[key] == value, key


@pytest.mark.parametrize("cls", BACKENDS)
def test_image_processor_to_json_file(cls, tmp_path):
    first = cls(**IMAGE_PROCESSOR_DICT)
    first.to_json_file(tmp_path / "image_processor.json")
    second = cls.from_json_file(tmp_path / "image_processor.json")
    assert second.to_dict() == first.to_dict()


@pytest.mark.parametrize("cls", BACKENDS)
def test_image_processor_from_and_save_pretrained(cls, tmp_path):
    first = cls(**IMAGE_PROCESSOR_DICT)
    saved = first.save_pretrained(tmp_path)[0]
    json.loads(open(saved).read())  # transformers' check_json_file_has_correct_format
    second = cls.from_pretrained(tmp_path)
    assert second.to_dict() == first.to_dict()


@pytest.mark.parametrize("backend, expected", [("torchvision", AlignDetrImageProcessor),
                                               ("pil", AlignDetrImageProcessorPil)])
@pytest.mark.parametrize("saved_by", BACKENDS)
def test_save_load_across_backends_with_autoimageprocessor(saved_by, backend, expected, tmp_path):
    """transformers' test_save_load_fast_slow(_auto): one saved config loads either backend, same settings."""
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    first = saved_by(**IMAGE_PROCESSOR_DICT)
    first.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "AlignDetrImageProcessor"
    loaded = AutoImageProcessor.from_pretrained(tmp_path, backend=backend)
    assert type(loaded) is expected
    assert loaded.to_dict() == first.to_dict()
    assert type(expected.from_pretrained(tmp_path)) is expected


def test_use_fast_is_the_deprecated_spelling_of_backend(tmp_path):
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    AlignDetrImageProcessor().save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)) is AlignDetrImageProcessorPil
    assert type(AutoImageProcessor.from_pretrained(tmp_path, use_fast=True)) is AlignDetrImageProcessor


@pytest.mark.parametrize("cls", BACKENDS)
def test_init_without_params(cls):
    assert cls() is not None


@pytest.mark.parametrize("cls", BACKENDS)
def test_cast_dtype_device(cls):
    processor = cls(**IMAGE_PROCESSOR_DICT)
    images = prepare_image_inputs(torchify=True)
    encoding = processor(images, return_tensors="pt")
    assert encoding.pixel_values.device == torch.device("cpu") and encoding.pixel_values.dtype == torch.float32
    encoding = processor(images, return_tensors="pt").to(torch.float16)
    assert encoding.pixel_values.dtype == torch.float16 and encoding.pixel_mask.dtype == torch.int64
    encoding = processor(images, return_tensors="pt").to("cpu", torch.bfloat16)
    assert encoding.pixel_values.dtype == torch.bfloat16
    with pytest.raises(TypeError):
        processor(images, return_tensors="pt").to(torch.bfloat16, "cpu")


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize("kind", ["pil", "numpy", "pytorch"])
def test_call(cls, kind):
    """transformers' test_call_pil / test_call_numpy / test_call_pytorch: unbatched and batched output shapes."""
    processor = cls(**IMAGE_PROCESSOR_DICT)
    images = prepare_image_inputs(numpify=kind == "numpy", torchify=kind == "pytorch")
    encoded = processor(images[0], return_tensors="pt").pixel_values
    assert tuple(encoded.shape) == (1, 3, *get_expected_values(images[:1]))
    encoded = processor(images, return_tensors="pt").pixel_values
    assert tuple(encoded.shape) == (BATCH_SIZE, 3, *get_expected_values(images, batched=True))


@pytest.mark.parametrize("cls", BACKENDS)
def test_call_numpy_4_channels(cls):
    """4-channel images: the alpha channel is dropped (cv2's reading); the model takes RGB (see module docstring)."""
    processor = cls(**IMAGE_PROCESSOR_DICT)
    images = prepare_image_inputs(numpify=True, num_channels=4)
    encoded = processor(images, return_tensors="pt", input_data_format="channels_last").pixel_values
    assert tuple(encoded.shape) == (BATCH_SIZE, 3, *get_expected_values(images, batched=True))
    without_alpha = processor([image[..., :3] for image in images], return_tensors="pt").pixel_values
    assert torch.equal(encoded, without_alpha)


@pytest.mark.parametrize("cls, array_type", [(AlignDetrImageProcessor, torch.Tensor),
                                             (AlignDetrImageProcessorPil, np.ndarray)])
def test_return_tensors(cls, array_type):
    """`return_tensors=None`: the backend's own arrays (PIL backends: a list of NumPy arrays per image, as in
    transformers); "np" / "pt" are stacked NumPy arrays / torch tensors for both."""
    processor = cls(**IMAGE_PROCESSOR_DICT)
    images = prepare_image_inputs()[:2]
    annotations = [{"image_id": i, "annotations": [{"bbox": [1, 2, 10, 12], "category_id": 1}]} for i in range(2)]
    native = processor(images, annotations=annotations)
    if cls is AlignDetrImageProcessorPil:
        assert isinstance(native.pixel_values, list) and isinstance(native.pixel_mask, list)
    assert all(isinstance(v, array_type) for v in native.pixel_values)
    assert all(isinstance(v, array_type) for target in native["labels"] for v in target.values())
    for return_tensors, expected in (("np", np.ndarray), ("pt", torch.Tensor)):
        encoded = processor(images, annotations=annotations, return_tensors=return_tensors)
        assert isinstance(encoded.pixel_values, expected) and encoded.pixel_values.shape[0] == 2
        assert isinstance(encoded.pixel_mask, expected)
        assert all(isinstance(v, expected) for v in encoded["labels"][0].values())
        np.testing.assert_array_equal(np.asarray(encoded.pixel_values), np.stack(native.pixel_values))


def test_backends_equivalence():
    """transformers' test_slow_fast_equivalence (allclose atol 1e-1, mean abs diff <= 1e-3), on the packaged image
    resized up and down: here at most one grey level after normalisation and a far smaller mean, because both
    backends sample alike; labels identical."""
    with Image.open(example_image_path()) as image:
        image = image.convert("RGB")
    annotation = {"image_id": 7, "annotations": [{"bbox": [10.5, 20, 100, 50], "category_id": 2, "area": 5000}]}
    for size in ({"shortest_edge": 800, "longest_edge": 1333}, {"shortest_edge": 200, "longest_edge": 300}):
        tensor = AlignDetrImageProcessor(size=size)(image, annotations=annotation, return_tensors="pt")
        pil = AlignDetrImageProcessorPil(size=size)(image, annotations=annotation, return_tensors="pt")
        difference = (tensor.pixel_values - pil.pixel_values).abs()
        assert difference.max().item() <= 1 / 57.12 + 1e-6
        assert difference.mean().item() <= 1e-5
        assert torch.equal(tensor.pixel_mask, pil.pixel_mask)
        for key, value in tensor["labels"][0].items():
            assert torch.equal(value, pil["labels"][0][key]), key
    # resample nearest and bicubic, from float input (no uint8 rounding): float32 rounding only
    floats = np.asarray(image, dtype=np.float32) / 255
    for resample in (0, 3):
        tensor = AlignDetrImageProcessor(resample=resample)(floats, return_tensors="pt").pixel_values
        pil = AlignDetrImageProcessorPil(resample=resample)(floats, return_tensors="pt").pixel_values
        torch.testing.assert_close(tensor, pil, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ DETR-family options


@pytest.mark.parametrize("cls", BACKENDS)
def test_max_width_max_height_resizing_and_pad_strategy(cls):
    """`size={"max_height", "max_width"}` (transformers' object-detection guide, run_object_detection.py) with a
    fixed `pad_size`, as transformers' DETR test: the largest keep-ratio size that fits, truncated."""
    image = torch.ones([200, 100, 3], dtype=torch.uint8)
    processor = cls(size={"max_height": 100, "max_width": 100}, do_pad=False)
    assert tuple(processor(image, return_tensors="pt").pixel_values.shape) == (1, 3, 100, 50)
    processor = cls(size={"max_height": 300, "max_width": 100}, do_pad=False)
    assert tuple(processor(image, return_tensors="pt").pixel_values.shape) == (1, 3, 200, 100)
    processor = cls(size={"max_height": 100, "max_width": 100}, do_pad=True, pad_size={"height": 100, "width": 100})
    encoded = processor(image, return_tensors="pt")
    assert tuple(encoded.pixel_values.shape) == (1, 3, 100, 100)
    assert encoded.pixel_mask[0, :, :50].all() and not encoded.pixel_mask[0, :, 50:].any()
    processor = cls(size={"max_height": 300, "max_width": 100}, do_pad=True, pad_size={"height": 301, "width": 101})
    assert tuple(processor(image, return_tensors="pt").pixel_values.shape) == (1, 3, 301, 101)
    # small images are scaled up (transformers' rule): 100 x 1500 into 300 x 100 -> 6 x 100
    image = torch.ones([100, 1500, 3], dtype=torch.uint8)
    processor = cls(size={"max_height": 300, "max_width": 100}, do_pad=False)
    assert tuple(processor(image, return_tensors="pt").pixel_values.shape) == (1, 3, 6, 100)


@pytest.mark.parametrize("cls", BACKENDS)
def test_longest_edge_shortest_edge_resizing_strategy(cls):
    """transformers' DETR test, with mmcv's rounding (module docstring): the shorter side to shortest_edge unless the
    longer one would exceed longest_edge."""
    # min(800 / 1, 1333 / 3) = 444.33 -> int(1 * 444.33 + 0.5) = 444 rows, int(3 * 444.33 + 0.5) = 1333 columns
    cases = [((1333, 800), (1333, 800)), ((1000, 400), (1333, 533)), ((400, 1000), (533, 1333)),
             ((1, 3), (444, 1333)), ((480, 640), (800, 1067)), ((610, 300), (1333, 656))]
    processor = cls(size={"shortest_edge": 800, "longest_edge": 1333}, do_pad=False)
    for (height, width), expected in cases:
        image = torch.ones([3, height, width], dtype=torch.uint8)
        encoded = processor(image, return_tensors="pt", input_data_format="channels_first")
        assert tuple(encoded.pixel_values.shape[-2:]) == expected, (height, width)
    # {"height", "width"}: exact, ratio not kept; an int is the shortest edge (default_to_square=False)
    image = torch.ones([3, 50, 100], dtype=torch.uint8)
    assert tuple(cls(size={"height": 30, "width": 40})(image, return_tensors="pt").pixel_values.shape[-2:]) == (30, 40)
    assert tuple(cls(size=40)(image, return_tensors="pt").pixel_values.shape[-2:]) == (40, 80)
    assert tuple(cls(size=(20, 30))(image, return_tensors="pt").pixel_values.shape[-2:]) == (20, 30)


@pytest.mark.parametrize("cls", BACKENDS)
@pytest.mark.parametrize("do_convert_annotations", [True, False])
def test_batched_coco_detection_annotations(cls, do_convert_annotations):
    """transformers' test_batched_coco_detection_annotations: two images, padded together; boxes as cxcywh of the
    unpadded image (ours, see module docstring) or, with do_convert_annotations=False, absolute xyxy pixels."""
    images = [np.zeros((480, 640, 3), np.uint8), np.zeros((200, 300, 3), np.uint8)]
    annotations = [
        {"image_id": 39769, "annotations": [{"bbox": [40, 60, 200, 100], "category_id": 17, "area": 20000},
                                            {"bbox": [300, 10, 100, 400], "category_id": 75, "iscrowd": 0}]},
        {"image_id": 1, "annotations": [{"bbox": [0, 0, 150, 100], "category_id": 3, "iscrowd": 1},
                                        {"bbox": [30, 40, 60, 60], "category_id": 5}]},
    ]
    processor = cls(size={"shortest_edge": 400, "longest_edge": 600}, do_convert_annotations=do_convert_annotations)
    encoded = processor(images, annotations=annotations, return_tensors="pt")
    assert tuple(encoded.pixel_values.shape) == (2, 3, 400, 600)  # 400 x 533 and 400 x 600, padded
    first, second = encoded["labels"]
    assert first["size"].tolist() == [400, 533] and first["orig_size"].tolist() == [480, 640]
    assert second["size"].tolist() == [400, 600] and second["image_id"].tolist() == [1]
    assert first["class_labels"].tolist() == [17, 75] and second["class_labels"].tolist() == [5]  # crowd dropped
    sx, sy = 533 / 640, 400 / 480
    xyxy = torch.tensor([[40 * sx, 60 * sy, 240 * sx, 160 * sy], [300 * sx, 10 * sy, 400 * sx, 410 * sy]])
    if do_convert_annotations:
        expected = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / 533, (xyxy[:, 1] + xyxy[:, 3]) / 2 / 400,
                                (xyxy[:, 2] - xyxy[:, 0]) / 533, (xyxy[:, 3] - xyxy[:, 1]) / 400], -1)
        torch.testing.assert_close(second["boxes"], torch.tensor([[60 / 300, 70 / 200, 60 / 300, 60 / 200]]))
    else:
        expected = xyxy
        torch.testing.assert_close(second["boxes"], torch.tensor([[60.0, 80.0, 180.0, 200.0]]))
    torch.testing.assert_close(first["boxes"], expected)
    torch.testing.assert_close(first["area"], torch.tensor([20000 * sx * sy, 40000 * sx * sy]))


@pytest.mark.parametrize("cls", BACKENDS)
def test_annotations_without_image_id_are_refused(cls):
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match=r"annotations\[1\] has no 'image_id'"):
        cls()([image, image], annotations=[{"image_id": 0, "annotations": []}, {"annotations": []}])
    with pytest.raises(ValueError, match="'image_id'] must be an integer"):
        cls()(image, annotations={"image_id": "a", "annotations": []})


@pytest.mark.parametrize("cls", BACKENDS)
def test_panoptic_format_and_masks_are_refused(cls):
    with pytest.raises(ValueError, match="coco_panoptic' is not supported"):
        cls(format="coco_panoptic")
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="coco_panoptic' is not supported"):
        cls()(image, format="coco_panoptic")
    with pytest.raises(ValueError, match="masks are not produced"):
        cls()(image, return_segmentation_masks=True)


@pytest.mark.parametrize("cls", BACKENDS)
def test_normalization_arguments_are_checked(cls):
    """image_std 0 gave inf pixels; a mean/std on the wrong scale gave quietly wrong pixels."""
    with pytest.raises(ValueError, match="image_std must be positive.*infinite"):
        cls(image_std=[58.0, 0.0, 57.0])
    image = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="image_std must be positive"):
        cls()(image, image_std=0)
    with pytest.raises(ValueError, match="on the 0-1 scale.*do_rescale=True"):
        cls(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    with pytest.raises(ValueError, match="outside the pixel range 0-1"):
        cls(do_rescale=True)  # the default mean/std are on the 0-255 scale
    with pytest.raises(ValueError, match="image_mean must be finite"):
        cls(image_mean=[float("nan")] * 3)


@pytest.mark.parametrize("cls", BACKENDS)
def test_do_rescale_with_0_1_mean_std_equals_the_defaults(cls):
    """transformers' convention (rescale by 1/255, then ImageNet 0-1 mean/std) and ours (0-255 mean/std) give the
    same pixels to float32 rounding."""
    images = prepare_image_inputs()[:2]
    ours = _pixel_values(cls(size={"shortest_edge": 64, "longest_edge": 96})(images, return_tensors="pt"))
    theirs = _pixel_values(cls(size={"shortest_edge": 64, "longest_edge": 96}, do_rescale=True,
                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])(
        images, return_tensors="pt"))
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)
    no_normalize = _pixel_values(cls(do_normalize=False, do_rescale=True, size=IMAGE_PROCESSOR_DICT["size"])(
        images, return_tensors="pt"))
    assert 0 <= no_normalize.min() and no_normalize.max() <= 1


@pytest.mark.parametrize("cls", BACKENDS)
def test_do_convert_rgb(cls):
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8))
    converted = cls(do_resize=False)(gray, return_tensors="pt").pixel_values
    assert torch.equal(converted, cls(do_resize=False)(gray.convert("RGB"), return_tensors="pt").pixel_values)
    with pytest.raises(ValueError, match="do_convert_rgb=False, but the image has 1 channel"):
        cls(do_convert_rgb=False)(gray)
    rgb = gray.convert("RGB")
    assert torch.equal(cls(do_convert_rgb=False, do_resize=False)(rgb, return_tensors="pt").pixel_values, converted)


@pytest.mark.parametrize("cls", BACKENDS)
def test_other_images_kwargs(cls):
    image = np.zeros((20, 30, 3), np.uint8)
    processor = cls()
    processor(image, device="cpu", disable_grouping=True, data_format="channels_first", image_seq_length=1)
    with pytest.raises(ValueError, match="not center-cropped"):
        processor(image, do_center_crop=True)
    with pytest.raises(ValueError, match="data_format must be 'channels_first'"):
        processor(image, data_format="channels_last")
    with pytest.raises(ValueError, match="size must be one of"):
        processor(image, size={"longest_edge": 10})


def test_threshold_nan_is_refused():
    outputs = {"logits": torch.zeros(1, 4, 2), "pred_boxes": torch.full((1, 4, 4), 0.5)}
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        AlignDetrImageProcessor().post_process_object_detection(outputs, threshold=float("nan"))
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        AlignDetrImageProcessor().post_process_object_detection(outputs, top_k=0)
    result = AlignDetrImageProcessorPil().post_process_object_detection(outputs, threshold=0.4)[0]
    assert len(result["scores"]) == 8  # sigmoid(0) = 0.5 > 0.4 for every query and class


def test_old_configs_keep_their_pixels(tmp_path):
    """A preprocessor_config.json saved before the backends (no do_rescale key) loads to the same pixels."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_pad": True, "do_resize": True, "image_mean": [123.675, 116.28, 103.53],
        "image_std": [58.395, 57.12, 57.375], "image_processor_type": "AlignDetrImageProcessor", "pad_size": None,
        "resample": 2, "size": {"longest_edge": 96, "shortest_edge": 64},
        "auto_map": {"AutoImageProcessor": "image_processing_align_detr.AlignDetrImageProcessor"}}))
    images = prepare_image_inputs()[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = AlignDetrImageProcessor.from_pretrained(tmp_path)
    expected = AlignDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    assert torch.equal(loaded(images).pixel_values, expected(images).pixel_values)
    with tempfile.TemporaryDirectory() as folder:
        loaded.save_pretrained(folder)
        assert AlignDetrImageProcessor.from_pretrained(folder).to_dict() == loaded.to_dict()
