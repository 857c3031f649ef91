"""Bad input, broken files and interrupted runs (issue 7): every case ends in a specific, clear error or in a
correct, finite result.

Decisions (what the right outcome is), tested below:
* image processor: images of any mode/dtype it documents are converted (grayscale -> 3 equal channels, alpha
  dropped, uint16 scaled by 255/65535); float images outside [0, 1], NaN images, empty lists and zero-size images
  raise. COCO objects: boxes outside the image are clipped, boxes that end up empty are dropped, malformed objects
  (missing keys, NaN, negative width/height, another image's object, duplicate annotation ids) raise a ValueError
  naming the image_id and the object index.
* model labels (normalised cxcywh): wrong keys / dtypes / class ids / NaN / negative width or height / values
  outside [0, 1] (pixel boxes) raise a ValueError naming the image (and box). Zero-area boxes and boxes whose
  corners stick out of the image are accepted as given (not clipped) and the loss is finite.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor
from align_detr_hf.targets_align_detr import validate_labels

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def processor():
    return AlignDetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AlignDetrForObjectDetection(tiny_config())


def _labels(*boxes_per_image, classes=None):
    out = []
    for i, boxes in enumerate(boxes_per_image):
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.arange(len(boxes)) % 3 if classes is None else torch.as_tensor(classes[i])
        out.append({"class_labels": labels, "boxes": boxes})
    return out


GOOD = [[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]]


def _forward(model, labels, train, size=64, batch=2):
    torch.manual_seed(0)
    model.train(train)
    return model(torch.randn(batch, 3, size, size), labels=labels)


# ---------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "images, message",
    [
        ([], r"No images given: `images` is an empty list"),
        (np.zeros((0, 10, 3), np.uint8), r"zero-size image of shape \(3, 0, 10\)"),
        (torch.zeros(3, 10, 0), r"zero-size image of shape \(3, 10, 0\)"),
        (Image.new("RGB", (0, 10)), r"zero-size PIL image \(0x10\)"),
        (np.full((8, 8, 3), 2.0, np.float32), r"Float images must have values in \[0, 1\], got values in \[2, 2\]"),
        (np.full((8, 8, 3), -0.5, np.float32), r"got values in \[-0.5, -0.5\]. Pass 0-255 data as uint8"),
        (np.full((8, 8, 3), np.inf, np.float32), "Float image contains NaN or infinite values"),
        (np.zeros((8, 8, 3), np.int64), "Unsupported image dtype int64"),
    ],
)
def test_bad_images_raise(processor, images, message):
    with pytest.raises(ValueError, match=message):
        processor(images)


def _rgb(height=8, width=10, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_grayscale_becomes_three_equal_channels(processor):
    gray = _rgb()[..., 0]
    for image in (gray, Image.fromarray(gray), gray[..., None]):
        pixel_values = processor(image)["pixel_values"]
        assert pixel_values.shape[1] == 3
        rgb = processor(np.repeat(gray[..., None], 3, -1))["pixel_values"]
        assert torch.equal(pixel_values, rgb)


def test_rgba_drops_alpha(processor):
    rgb = _rgb()
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
    expected = processor(rgb)["pixel_values"]
    assert torch.equal(processor(rgba)["pixel_values"], expected)
    assert torch.equal(processor(Image.fromarray(rgba, "RGBA"))["pixel_values"], expected)


def test_16_bit_images_are_scaled_to_the_8_bit_range(processor):
    rgb = _rgb()
    as_16 = rgb.astype(np.uint16) * 257  # 255 -> 65535
    no_resize = dict(do_resize=False, do_normalize=False)
    assert torch.allclose(processor(as_16, **no_resize)["pixel_values"],
                          processor(rgb, **no_resize)["pixel_values"], atol=1e-3)
    gray16 = Image.fromarray(as_16[..., 0])  # PIL mode I;16
    assert gray16.mode == "I;16"
    out = processor(gray16, **no_resize)["pixel_values"]
    assert torch.allclose(out[0, 0], torch.from_numpy(rgb[..., 0]).float(), atol=1e-3)


def test_float_images_in_range_are_accepted(processor):
    rgb = _rgb()
    assert torch.allclose(processor(rgb.astype(np.float32) / 255)["pixel_values"], processor(rgb)["pixel_values"],
                          atol=0.02)


@pytest.mark.parametrize("shape", [(1, 4000, 3), (4000, 1, 3)])
def test_extreme_aspect_ratio_gives_at_least_one_pixel_and_a_finite_model_output(model, shape):
    processor = AlignDetrImageProcessor()
    annotations = {"image_id": 1, "annotations": [{"bbox": [0, 0, shape[1], shape[0]], "category_id": 0}]}
    out = processor(np.full(shape, 128, np.uint8), annotations=annotations, input_data_format="channels_last")
    assert tuple(out["pixel_values"].shape[-2:]) == ((1, 1333) if shape[0] == 1 else (1333, 1))
    assert torch.allclose(out["labels"][0]["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    model.eval()
    with torch.no_grad():
        result = model(out["pixel_values"], out["pixel_mask"], labels=out["labels"])
    assert torch.isfinite(result.logits).all() and torch.isfinite(result.pred_boxes).all()
    assert torch.isfinite(result.loss)


# ---------------------------------------------------------------------------------------------- model inputs


def test_pixel_mask_shape_mismatch(model):
    with pytest.raises(ValueError, match=r"pixel_mask must be \(batch, height, width\) = \(2, 64, 64\) to match "
                                         r"pixel_values, got \(2, 64, 32\)"):
        model(torch.randn(2, 3, 64, 64), torch.ones(2, 64, 32, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\), got \(2, 1, 64, 64\)"):
        model(torch.randn(2, 1, 64, 64))


def test_nan_image_without_labels_poisons_only_that_image(model):
    """Inference (no labels) does not check the input: the NaN image's outputs are NaN, the other image's are not
    (the encoder/decoder never mix images)."""
    pixel_values = torch.randn(2, 3, 64, 64)
    pixel_values[1, 0, 5, 5] = float("nan")
    model.eval()
    with torch.no_grad():
        out = model(pixel_values)
    assert torch.isfinite(out.logits[0]).all()
    assert not torch.isfinite(out.logits[1]).all()


# ---------------------------------------------------------------------------------------------- labels

# (labels of image 1, expected message); image 0 always gets GOOD.
BAD_LABELS = {
    "missing_boxes": ({"class_labels": torch.tensor([0, 1])}, r"targets\[1\] is missing the key 'boxes'"),
    "missing_class_labels": ({"boxes": torch.tensor(GOOD)}, r"targets\[1\] is missing the key 'class_labels'"),
    "float_class_ids": ({"class_labels": torch.tensor([0.0, 1.0]), "boxes": torch.tensor(GOOD)},
                        r"targets\[1\]\['class_labels'\] must hold integer class ids, got torch.float32"),
    "integer_boxes": ({"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])},
                      r"targets\[1\]\['boxes'\] must be floating point, got torch.int64"),
    "class_id_too_large": ({"class_labels": torch.tensor([0, 3]), "boxes": torch.tensor(GOOD)},
                           r"targets\[1\]\['class_labels'\] must lie in \[0, 3\) \(num_labels\), got values in "
                           r"\[0, 3\]"),
    "negative_class_id": ({"class_labels": torch.tensor([-1, 0]), "boxes": torch.tensor(GOOD)},
                          r"must lie in \[0, 3\) \(num_labels\), got values in \[-1, 0\]"),
    "nan_box": ({"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([GOOD[0], [0.5, float("nan"), 0.1, 0.1]])},
                r"targets\[1\]\['boxes'\] holds 1 NaN/inf values \(first at box 1\)"),
    "negative_width": ({"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([GOOD[0], [0.5, 0.5, -0.1, 0.1]])},
                       r"targets\[1\]\['boxes'\] has 1 box\(es\) with a negative width or height \(boxes are "
                       r"cxcywh\); box 1 is \[0.5, 0.5, -0.1, 0.1\]"),
    "pixel_boxes": ({"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[32.0, 32.0, 10.0, 10.0], GOOD[1]])},
                    r"targets\[1\]\['boxes'\] has 1 box\(es\) with values outside \[0, 1\]: boxes must be cxcywh "
                    r"normalised by the image size, not pixels; box 0 is \[32.0, 32.0, 10.0, 10.0\]"),
    "negative_centre": ({"class_labels": torch.tensor([0]), "boxes": torch.tensor([[-0.2, 0.5, 0.1, 0.1]])},
                        r"values outside \[0, 1\].*box 0"),
    "labels_boxes_count": ({"class_labels": torch.tensor([0]), "boxes": torch.tensor(GOOD)},
                           r"targets\[1\] has 1 class_labels but 2 boxes"),
}

@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_raise_in_eval_mode(model, case):
    bad, message = BAD_LABELS[case]
    with pytest.raises(ValueError, match=message), torch.no_grad():
        _forward(model, [_labels(GOOD)[0], bad], train=False)


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_raise_in_training_mode(model, case):
    bad, message = BAD_LABELS[case]
    with pytest.raises(ValueError, match=message):
        _forward(model, [_labels(GOOD)[0], bad], train=True)


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_validate_labels_gives_the_same_messages_up_front(case):
    bad, message = BAD_LABELS[case]
    with pytest.raises(ValueError, match=message):
        validate_labels([_labels(GOOD)[0], bad], num_labels=3, pixel_values=torch.zeros(2, 3, 4, 4))


def test_validate_labels_names_the_image_with_non_finite_pixels():
    pixel_values = torch.zeros(3, 3, 4, 4)
    pixel_values[1, 2, 3, 3] = float("inf")
    pixel_values[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in pixel_values of image 1 \(images with NaN/inf: "
                                         r"\[1, 2\]\)"):
        validate_labels(_labels(GOOD, GOOD, GOOD), num_labels=3, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="list of 3 dicts"):
        validate_labels(_labels(GOOD), num_labels=3, pixel_values=pixel_values)
    validate_labels(_labels(GOOD, [], GOOD), num_labels=3)  # fine


def test_wrong_number_of_label_dicts(model):
    with pytest.raises(ValueError, match=r"targets must be a list of 2 dicts \(one per image\)"), torch.no_grad():
        _forward(model, _labels(GOOD), train=False)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    "boxes",
    [
        pytest.param([[0.5, 0.5, 0.0, 0.2], [0.3, 0.3, 0.0, 0.0]], id="zero_area"),
        pytest.param([[0.95, 0.05, 0.3, 0.3], [0.5, 0.5, 1.0, 1.0]], id="corners_outside_image"),
    ],
)
def test_degenerate_but_legal_boxes_give_a_finite_loss(model, boxes, train):
    out = _forward(model, _labels(GOOD, boxes), train=train)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(v) for v in out.loss_dict.values())
    if train:
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()


@pytest.mark.parametrize("train", [False, True])
def test_zero_and_500_objects_in_one_batch(model, train):
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(500, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(500, 2, generator=generator) * 0.15 + 0.01
    many = {"class_labels": torch.randint(0, 3, (500,), generator=generator), "boxes": torch.cat([centres, sizes], 1)}
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    out = _forward(model, [empty, many], train=train)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert all(torch.isfinite(v) for v in out.loss_dict.values())
    if train:
        assert out.denoising_max_gt == 500 and out.num_denoising_groups == 1
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
    # no GT at all in the batch: only the all-negative classification terms
    out = _forward(model, [empty, empty], train=train)
    assert torch.isfinite(out.loss) and out.loss_dict["loss_bbox"] == 0


# ---------------------------------------------------------------------------------------------- COCO annotations


def _coco(objects, image_id=1):
    return {"image_id": image_id, "annotations": objects}


@pytest.mark.parametrize(
    "objects, message",
    [
        ([{"category_id": 0}], r"image_id 1, object 0: missing the key 'bbox'"),
        ([{"bbox": [0, 0, 4, 4], "category_id": 0}, {"bbox": [0, 0, 4, 4]}],
         r"image_id 1, object 1: missing the key 'category_id'"),
        ([{"bbox": [0, 0, 4], "category_id": 0}], r"image_id 1, object 0: 'bbox' must be 4 numbers"),
        ([{"bbox": [0, 0, float("nan"), 4], "category_id": 0}], r"image_id 1, object 0: 'bbox' holds NaN/inf"),
        ([{"bbox": [2, 2, 4, 4], "category_id": 0}, {"bbox": [5, 5, -3, 4], "category_id": 1}],
         r"image_id 1, object 1: negative width or height in bbox \[x, y, w, h\] = \[5.0, 5.0, -3.0, 4.0\]"),
        ([{"bbox": [0, 0, 4, 4], "category_id": 0, "image_id": 99}],
         r"image_id 1, object 0: the object belongs to image_id 99, not to this image"),
        ([{"id": 7, "bbox": [0, 0, 4, 4], "category_id": 0}, {"id": 7, "bbox": [1, 1, 4, 4], "category_id": 0}],
         r"image_id 1, object 1: duplicate annotation id 7 \(also object 0\)"),
        ("not a list", r"annotation\['annotations'\] must be a list"),
    ],
)
def test_bad_coco_annotations_raise(processor, objects, message):
    with pytest.raises(ValueError, match=message):
        processor(_rgb(), annotations=_coco(objects))


def test_coco_boxes_outside_the_image_are_clipped_or_dropped(processor):
    objects = [
        {"bbox": [-5, -5, 10, 10], "category_id": 0},  # clipped to [0, 0, 5, 5]
        {"bbox": [20, 2, 5, 5], "category_id": 1},  # fully right of the 10-px-wide image: dropped
        {"bbox": [3, 3, 0, 2], "category_id": 2},  # zero width: dropped
    ]
    labels = processor(_rgb(8, 10), annotations=_coco(objects), do_resize=False)["labels"][0]
    assert labels["class_labels"].tolist() == [0]
    assert torch.allclose(labels["boxes"], torch.tensor([[2.5 / 10, 2.5 / 8, 5 / 10, 5 / 8]]))


# ---------------------------------------------------------------------------------------------- COCO folders (data.py)


@pytest.fixture
def coco_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "images" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": [{"id": 5, "name": "thing"}],
    }

    def write(**changes):
        data = json.loads(json.dumps(coco))
        for key, value in changes.items():
            data[key] = data[key] + value
        (tmp_path / "annotations.json").write_text(json.dumps(data))
        return tmp_path / "annotations.json"

    return write


def test_coco_folder_loads(coco_folder):
    from align_detr_hf.data import load_coco_folder

    dataset = load_coco_folder(coco_folder())
    assert len(dataset) == 1 and dataset[0]["labels"]["class_labels"].tolist() == [0]


def test_coco_folder_annotation_of_unknown_image(coco_folder):
    from align_detr_hf.data import load_coco_folder

    path = coco_folder(annotations=[{"id": 2, "image_id": 42, "category_id": 5, "bbox": [0, 0, 2, 2]}])
    with pytest.raises(ValueError, match=r"annotations\[1\] \(id 2\): image_id 42 is not in 'images'"):
        load_coco_folder(path)


def test_coco_folder_duplicate_annotation_ids(coco_folder):
    from align_detr_hf.data import load_coco_folder

    path = coco_folder(annotations=[{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 2, 2]}])
    with pytest.raises(ValueError, match=r"annotations\[1\] \(id 1\): id 1 is already used by annotations\[0\]"):
        load_coco_folder(path)


def test_coco_folder_missing_image_file_is_reported_at_load_time(coco_folder):
    from align_detr_hf.data import load_coco_folder

    path = coco_folder(images=[{"id": 2, "file_name": "missing.png", "width": 16, "height": 16}])
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) listed in .*annotations.json do not exist.*"
                                                r"missing.png"):
        load_coco_folder(path)


# ---------------------------------------------------------------------------------------------- broken weights


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(folder)
    return folder


def _truncated_copy(saved_tiny, tmp_path, fraction):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(saved_tiny, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * fraction))])
    return folder


@pytest.mark.parametrize("fraction, message", [(0.5, "incomplete metadata, file not fully covered"),
                                               (0.0, "header too small")])
def test_truncated_safetensors_raises(saved_tiny, tmp_path, fraction, message):
    """The error names the folder and says the file is truncated or corrupted, with safetensors' own reason."""
    folder = _truncated_copy(saved_tiny, tmp_path, fraction)
    with pytest.raises(OSError, match=rf"{re.escape(str(folder))}: a safetensors file is truncated or corrupted .*{message}"):
        AlignDetrForObjectDetection.from_pretrained(folder)


def test_untouched_copy_loads(saved_tiny):
    model = AlignDetrForObjectDetection.from_pretrained(saved_tiny)
    assert all(math.isfinite(p.sum().item()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------- corrupted checkpoint


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_converter_detects_flipped_bytes_in_a_pth(tmp_path, where):
    """torch.load does not check the zip CRCs: flipped tensor bytes used to load silently as wrong weights."""
    from align_detr_hf.cli import main as cli
    from align_detr_hf.convert_align_detr import ConversionError, load_checkpoint

    state_dict = {f"layer{i}.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(i))
                  for i in range(4)}
    path = tmp_path / "model.pth"  # no sha256 prefix in the name: the CRCs are the only check
    torch.save({"meta": {}, "state_dict": state_dict}, path)
    data = bytearray(path.read_bytes())
    middle = int(len(data) * where)
    for k in range(middle, middle + 8):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))
    # flipped tensor bytes fail the entry's CRC; flipped bytes in a zip header make the archive unreadable
    with pytest.raises(ConversionError, match=r"model.pth (is corrupted: the entry \S+ fails its CRC-32 check|is a "
                                              r"corrupted checkpoint archive)"):
        load_checkpoint(path)
    with pytest.raises(SystemExit):
        cli(["convert", "--checkpoint", str(path), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
