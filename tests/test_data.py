"""Datasets (COCO folder, `datasets` objects schema), augmentation geometry, collation."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from align_detr_hf.data import (
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    build_train_transforms,
    check_finite_batch,
    collate_fn,
    crop_image_and_boxes,
    load_coco_folder,
    load_hf_dataset,
)
from align_detr_hf.synthetic import SHAPE_CLASSES, generate_shapes_dataset


def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.arange(len(boxes)) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "class_labels": labels}


@pytest.fixture
def coco_folder(tmp_path):
    """Two images, non-contiguous category ids (3, 7) and a crowd box."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (20, 50), (200, 20, 30)).save(tmp_path / "imgs" / "b.png")
    coco = {
        "images": [{"id": 11, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 12, "file_name": "b.png", "width": 20, "height": 50}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 7, "bbox": [4, 3, 20, 12], "area": 240, "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [2, 5, 10, 40], "area": 400, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return tmp_path


def test_load_coco_folder(coco_folder):
    ds = load_coco_folder(coco_folder / "ann.json", coco_folder / "imgs")
    assert ds.id2label == {0: "cat", 1: "dog"}  # sorted by category id, contiguous
    assert len(ds) == 2
    item = ds[0]
    assert item["pixel_values"].shape == (3, 30, 40)
    labels = item["labels"]
    assert labels["class_labels"].tolist() == [1]  # the crowd box is not a training target
    torch.testing.assert_close(labels["boxes"], torch.tensor([[14 / 40, 9 / 30, 20 / 40, 12 / 30]]))
    assert labels["image_id"].tolist() == [11] and labels["orig_size"].tolist() == [30, 40]
    gt = ds.coco_ground_truth()
    assert [a["category_id"] for a in gt["annotations"]] == [1, 0, 0]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 1, 0]
    assert all(a["id"] >= 1 for a in gt["annotations"])
    assert len(ds.filter(filter_empty_gt=True, min_size=25)) == 1  # image b is 20 px wide


def test_synthetic_folder_roundtrip(tmp_path):
    ann = generate_shapes_dataset(tmp_path, num_images=6, image_size=64, seed=3)
    again = generate_shapes_dataset(tmp_path / "again", num_images=6, image_size=64, seed=3)
    assert json.loads(ann.read_text()) == json.loads(again.read_text())  # deterministic
    ds = load_coco_folder(ann)
    assert ds.id2label == dict(enumerate(SHAPE_CLASSES))
    for i in range(len(ds)):
        boxes = ds[i]["labels"]["boxes"]
        assert boxes.numel() > 0 and (boxes >= 0).all() and (boxes <= 1).all()


def _hf_dataset(class_label: bool):
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (32, 24), (i * 50, 0, 0)) for i in range(3)]
    objects = [
        {"bbox": [[1.0, 2.0, 10.0, 8.0]], "category": [2], "area": [80.0], "id": [0]},
        {"bbox": [[0.0, 0.0, 16.0, 12.0], [8.0, 4.0, 4.0, 4.0]], "category": [0, 2], "area": [192.0, 16.0], "id": [1, 2]},
        {"bbox": [], "category": [], "area": [], "id": []},
    ]
    category = datasets.ClassLabel(names=["a", "b", "c"]) if class_label else datasets.Value("int64")
    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(category),
                "area": datasets.List(datasets.Value("float32")),
                "id": datasets.List(datasets.Value("int64")),
            },
        }
    )
    return datasets.Dataset.from_dict(
        {"image_id": [5, 6, 7], "image": images, "objects": objects}, features=features
    )


def test_load_hf_dataset_with_class_label():
    ds = load_hf_dataset(_hf_dataset(class_label=True))
    assert ds.id2label == {0: "a", 1: "b", 2: "c"}
    item = ds[1]
    assert item["pixel_values"].shape == (3, 24, 32)
    assert item["labels"]["class_labels"].tolist() == [0, 2]
    torch.testing.assert_close(item["labels"]["boxes"][0], torch.tensor([0.25, 0.25, 0.5, 0.5]))
    assert item["labels"]["image_id"].tolist() == [6]
    assert ds[2]["labels"]["boxes"].shape == (0, 4)


def test_load_hf_dataset_plain_ints_are_made_contiguous():
    ds = load_hf_dataset(_hf_dataset(class_label=False))
    assert ds.id2label == {0: "0", 1: "2"}
    assert ds[1]["labels"]["class_labels"].tolist() == [0, 1]


def test_horizontal_flip_maps_box():
    image = torch.zeros(3, 10, 20)
    image[:, 2:4, 1:5] = 255
    out, target = RandomHorizontalFlip(p=1.0)(image, _target([[1, 2, 5, 4]]), torch.Generator().manual_seed(0))
    torch.testing.assert_close(target["boxes"], torch.tensor([[15.0, 2.0, 19.0, 4.0]]))
    assert out[0, 2:4, 15:19].eq(255).all() and out[0].sum() == 255 * 8
    _, unchanged = RandomHorizontalFlip(p=0.0)(image, _target([[1, 2, 5, 4]]), torch.Generator())
    torch.testing.assert_close(unchanged["boxes"], torch.tensor([[1.0, 2.0, 5.0, 4.0]]))


def test_crop_clips_and_drops_boxes():
    image = torch.arange(3 * 20 * 20, dtype=torch.float32).reshape(3, 20, 20)
    target = _target([[2, 2, 8, 8], [12, 12, 18, 18], [0, 0, 3, 3]], [0, 1, 2])
    out, t = crop_image_and_boxes(image, target, top=5, left=5, height=10, width=10)
    assert out.shape == (3, 10, 10) and torch.equal(out, image[:, 5:15, 5:15])
    # box 0 clipped to the crop, box 1 clipped on the other side, box 2 lies outside -> dropped
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 0.0, 3.0, 3.0], [7.0, 7.0, 10.0, 10.0]]))
    assert t["class_labels"].tolist() == [0, 1]
    # random crop: sizes within range, capped at the image
    for seed in range(5):
        out, t = RandomCrop(8, 30)(image, target, torch.Generator().manual_seed(seed))
        assert 8 <= out.shape[1] <= 20 and 8 <= out.shape[2] <= 20
        assert (t["boxes"][:, 2] <= out.shape[2]).all() and (t["boxes"][:, 3] <= out.shape[1]).all()


def test_resize_scales_boxes_keep_ratio():
    out, t = Resize(20, 100)(torch.zeros(3, 10, 30), _target([[3, 1, 6, 5]]))
    assert out.shape == (3, 20, 60)
    torch.testing.assert_close(t["boxes"], torch.tensor([[6.0, 2.0, 12.0, 10.0]]))


def test_train_transforms_sizes_and_box_consistency():
    transform = build_train_transforms(scale=0.2)  # shorter sides 96..160, max 267
    image = torch.rand(3, 128, 128) * 255
    for seed in range(10):
        out, t = transform(image, _target([[10, 20, 60, 90]]), torch.Generator().manual_seed(seed))
        assert 96 <= min(out.shape[-2:]) <= 160 and max(out.shape[-2:]) <= 267
        if len(t["boxes"]):
            b = t["boxes"]
            assert (b[:, 2] > b[:, 0]).all() and (b[:, 0] >= 0).all() and (b[:, 2] <= out.shape[2] + 1e-4).all()


def test_augmentation_is_seeded_per_epoch_and_index(tmp_path):
    ann = generate_shapes_dataset(tmp_path, num_images=2, image_size=64, seed=0)
    ds = load_coco_folder(ann, transforms=build_train_transforms(scale=0.1), seed=1)
    first = ds[1]
    assert torch.equal(first["pixel_values"], ds[1]["pixel_values"])  # same (seed, epoch, index): same draw
    shapes = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        shapes.add(tuple(ds[1]["pixel_values"].shape))
    assert len(shapes) > 1  # other epochs draw other scales
    ds.set_epoch(0)
    assert torch.equal(first["labels"]["boxes"], ds[1]["labels"]["boxes"])


def test_collate_pads_and_masks_without_renormalising():
    a = {"pixel_values": torch.ones(3, 4, 6), "labels": {"boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
                                                       "class_labels": torch.tensor([1])}}
    b = {"pixel_values": torch.full((3, 5, 3), 2.0), "labels": {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]),
                                                              "class_labels": torch.tensor([0])}}
    batch = collate_fn([a, b])
    assert batch["pixel_values"].shape == (2, 3, 5, 6) and batch["pixel_mask"].shape == (2, 5, 6)
    assert batch["pixel_mask"][0].sum() == 24 and batch["pixel_mask"][0, :4, :6].all()
    assert batch["pixel_mask"][1].sum() == 15 and batch["pixel_mask"][1, :5, :3].all()
    assert batch["pixel_values"][0, :, 4:].eq(0).all() and batch["pixel_values"][1, :, :, 3:].eq(0).all()
    assert torch.equal(batch["labels"][0]["boxes"], a["labels"]["boxes"])  # untouched
    assert torch.equal(batch["labels"][1]["boxes"], b["labels"]["boxes"])


def test_check_finite_batch_names_the_batch():
    batch = {"pixel_values": torch.zeros(1, 3, 2, 2), "labels": [{"boxes": torch.zeros(1, 4)}]}
    check_finite_batch(batch, 0)
    batch["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 7"):
        check_finite_batch(batch, 7)
    batch = {"pixel_values": torch.zeros(1, 3, 2, 2), "labels": [{"boxes": torch.tensor([[0, 0, np.inf, 1.0]])}]}
    with pytest.raises(ValueError, match=r"batch 3: labels\[0\]"):
        check_finite_batch(batch, 3)


@pytest.fixture
def filter_folder(tmp_path):
    """Six images for mmdet's filter_cfg: objects / crowd only / `ignore` only / degenerate box only / nothing /
    an annotated image whose shorter side is 31 px."""
    (tmp_path / "images").mkdir()
    sizes = {1: (64, 48), 2: (64, 48), 3: (48, 64), 4: (64, 48), 5: (64, 48), 6: (31, 80)}  # id: (width, height)
    images = []
    for image_id, (w, h) in sizes.items():
        Image.new("RGB", (w, h), (image_id * 30, 60, 90)).save(tmp_path / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": w, "height": h})
    box = [4, 4, 20, 16]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": 320, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 20, 10, 10], "area": 100, "iscrowd": 0,
         "ignore": True},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": box, "area": 320, "iscrowd": 1},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": box, "area": 320, "iscrowd": 0, "ignore": 1},
        {"id": 5, "image_id": 4, "category_id": 1, "bbox": [4, 4, 0.5, 16], "area": 8, "iscrowd": 0},
        {"id": 6, "image_id": 6, "category_id": 1, "bbox": box, "area": 320, "iscrowd": 0},
    ]
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    return load_coco_folder(tmp_path / "annotations.json")


def test_filter_is_mmdet_filter_cfg(filter_folder):
    ids = lambda ds: [r["image_id"] for r in ds.records]  # noqa: E731
    # the reference filter_cfg=dict(filter_empty_gt=True, min_size=32): only the image without any annotation and the
    # 31 px one go; crowd-only, ignore-only and degenerate-only images stay (mmdet counts any annotation of a known
    # category through pycocotools' catToImgs)
    assert ids(filter_folder.filter(filter_empty_gt=True, min_size=32)) == [1, 2, 3, 4]
    assert ids(filter_folder.filter(filter_empty_gt=True, min_size=0)) == [1, 2, 3, 4, 6]
    assert ids(filter_folder.filter(filter_empty_gt=False, min_size=32)) == [1, 2, 3, 4, 5]
    assert ids(filter_folder.filter(filter_empty_gt=False, min_size=0)) == [1, 2, 3, 4, 5, 6]


def test_ignore_annotations_are_not_trained_on_but_kept_for_evaluation(filter_folder):
    assert [a["ignore"] for a in filter_folder.records[0]["annotations"]] == [False, True]
    labels = filter_folder[0]["labels"]  # image 1: one object, one `ignore`
    torch.testing.assert_close(labels["boxes"], torch.tensor([[14 / 64, 12 / 48, 20 / 64, 16 / 48]]))
    assert filter_folder[2]["labels"]["boxes"].shape == (0, 4)  # image 3: `ignore` only -> a negative image
    assert filter_folder[1]["labels"]["boxes"].shape == (0, 4)  # image 2: crowd only
    # pycocotools' COCOeval replaces `ignore` by `iscrowd`, so for evaluation these are ordinary boxes (as in mmdet)
    assert len(filter_folder.coco_ground_truth()["annotations"]) == 6


def test_epoch_pair_index_selects_that_epochs_augmentation(tmp_path):
    ann = generate_shapes_dataset(tmp_path, num_images=2, image_size=64, seed=0)
    ds = load_coco_folder(ann, transforms=build_train_transforms(scale=0.1), seed=1)
    ds.set_epoch(5)
    at_five = ds[1]
    ds.set_epoch(0)
    assert torch.equal(ds[(1, 5)]["pixel_values"], at_five["pixel_values"])
    assert torch.equal(ds[(1, 5)]["labels"]["boxes"], at_five["labels"]["boxes"])
