"""Sliced inference (align_detr_hf.slicing), more than 300 detections, AR@1000 and more queries."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from transformers.utils import ModelOutput

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor
from align_detr_hf.box_ops import box_iou
from align_detr_hf.evaluation import coco_summary
from align_detr_hf.slicing import SliceConfig, merge_detections, sliced_detect, tile_grid


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config()).eval()
    processor = AlignDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 1333})
    return model, processor


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _plain(model, processor, image, top_k):
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_object_detection(outputs, target_sizes=[(image.height, image.width)], top_k=top_k)[0]


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_one_tile_without_overlap_equals_the_plain_pass(tiny, merge):
    model, processor = tiny
    image = _image(120, 90)
    config = SliceConfig(tile_size=120, overlap=0.0, full_image=False, merge=merge, tile_top_k=30)
    assert tile_grid(120, 90, 120, 0.0) == [(0, 0, 120, 90)]
    sliced, plain = sliced_detect(model, processor, image, config), _plain(model, processor, image, top_k=30)
    assert len(plain["scores"]) == 30
    for key in ("scores", "labels", "boxes"):
        assert torch.equal(sliced[key], plain[key]), key


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_slicing_keeps_what_the_full_image_pass_found(tiny, merge):
    """Every full-image detection is in the result, or represented by a box of its class scoring at least as high
    (NMS: overlapping it by more than the IoU threshold; WBF: the best box of its cluster)."""
    model, processor = tiny
    image = _image(260, 200, seed=1)
    config = SliceConfig(tile_size=96, overlap=0.25, merge=merge, tile_top_k=36, max_detections=5000)
    sliced = sliced_detect(model, processor, image, config)
    full = _plain(model, processor, image, top_k=36)
    passes = 1 + len(tile_grid(260, 200, 96, 0.25))
    assert len(sliced["scores"]) < passes * 36  # the merge did remove detections, so the property is not trivial
    exact = 0
    for score, label, box in zip(full["scores"], full["labels"], full["boxes"]):
        same = sliced["labels"] == label
        iou = box_iou(box[None], sliced["boxes"][same])[0]
        exact += bool(((iou > 0.999) & (sliced["scores"][same] == score)).any())
        if merge == "nms":
            assert ((iou > config.iou_threshold) & (sliced["scores"][same] >= score)).any()
        else:
            assert ((iou > 0) & (sliced["scores"][same] >= score)).any()
    assert exact > 0


class _BrightSpotDetector(torch.nn.Module):
    """A fake detector: one query boxing the pixels brighter than the image's mean + 2 (normalised units) in the
    valid area, score high when there are any. Exposes what tiling does to coordinates and cut objects."""

    config = None

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values, pixel_mask=None):
        logits, boxes = [], []
        for pixels, mask in zip(pixel_values, pixel_mask):
            height, width = int(mask.any(1).sum()), int(mask.any(0).sum())
            bright = pixels[:, :height, :width].mean(0) > 1.5
            ys, xs = bright.nonzero(as_tuple=True)
            if len(xs):
                x0, x1, y0, y1 = xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1
                box = [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]
                logits.append([[5.0]])
            else:
                box, logits = [0.5, 0.5, 0.1, 0.1], logits + [[[-5.0]]]
            boxes.append([box])
        return ModelOutput(logits=torch.tensor(logits), pred_boxes=torch.tensor(boxes))


@pytest.mark.parametrize("merge", ["nms", "wbf"])
def test_coordinates_map_back_and_cut_boxes_are_dropped(merge):
    processor = AlignDetrImageProcessor(do_resize=False)
    pixels = np.zeros((200, 300, 3), dtype=np.uint8)
    pixels[90:102, 150:160] = 255  # a 10x12 object: whole in some 64 px tiles, cut by the edges of others
    config = SliceConfig(tile_size=64, overlap=0.25, full_image=False, merge=merge, edge_margin=1)
    found = sliced_detect(_BrightSpotDetector(), processor, Image.fromarray(pixels), config, threshold=0.5)
    assert found["boxes"].tolist() == [[150.0, 90.0, 160.0, 102.0]]
    assert found["labels"].tolist() == [0]


def test_merge_drops_a_cut_box_covered_by_a_whole_one_and_nms_spares_own_pass():
    config = SliceConfig(iou_threshold=0.5)
    full = {"scores": torch.tensor([0.4, 0.3]), "labels": torch.tensor([0, 0]),
            "boxes": torch.tensor([[100.0, 100, 120, 120], [101.0, 101, 121, 121]])}  # one pass: both kept
    cut = {"scores": torch.tensor([0.9]), "labels": torch.tensor([0]), "boxes": torch.tensor([[100.0, 100, 110, 120]])}
    merged = merge_detections([(full, None), (cut, (0, 0, 110, 200))], (400, 300), config)
    assert merged["scores"].tolist() == pytest.approx([0.4, 0.3])
    whole = {"scores": torch.tensor([0.9]), "labels": torch.tensor([0]), "boxes": torch.tensor([[100.0, 100, 120, 121]])}
    merged = merge_detections([(full, None), (whole, (0, 0, 200, 200))], (400, 300), config)
    assert merged["scores"].tolist() == pytest.approx([0.9])  # suppresses both full-pass boxes (IoU > 0.5)
    other_class = {**whole, "labels": torch.tensor([1])}
    assert len(merge_detections([(full, None), (other_class, (0, 0, 200, 200))], (400, 300), config)["scores"]) == 3


def test_tile_grid_covers_the_image_with_equal_tiles():
    tiles = tile_grid(1000, 300, 256, 0.2)
    assert {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in tiles} == {(256, 256)}
    assert min(t[0] for t in tiles) == 0 and max(t[2] for t in tiles) == 1000 and max(t[3] for t in tiles) == 300
    xs = sorted({t[0] for t in tiles})
    assert all(b - a <= 256 - 51 for a, b in zip(xs, xs[1:]))  # neighbours share at least the overlap


@pytest.mark.parametrize("bad", [dict(overlap=1.0), dict(merge="soft"), dict(tile_size=8), dict(max_detections=0),
                                 dict(iou_threshold=0.0)])
def test_bad_slice_config_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="SliceConfig"):
        SliceConfig(**bad)
    with pytest.raises(ValueError, match="unknown slice option"):
        SliceConfig.coerce({"tile": 3})


def test_more_than_300_detections_and_ar_at_1000():
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(tiny_config(num_queries=400)).eval()
    processor = AlignDetrImageProcessor(size={"shortest_edge": 160, "longest_edge": 1333})
    image = _image(160, 160)  # 20x20 + 10x10 + 5x5 + 3x3 = 534 encoder proposals for the 400 queries
    found = _plain(model, processor, image, top_k=1000)
    assert len(found["scores"]) == 1000  # 400 queries x 3 classes, top 1000
    sliced = sliced_detect(model, processor, _image(300, 160), SliceConfig(tile_top_k=1000, max_detections=1000))
    assert len(sliced["scores"]) == 1000

    # 500 objects in one image, each detected: AR@100 is capped at 100/500, AR@1000 finds them all
    boxes = [[(i % 25) * 20.0, (i // 25) * 20.0, 10.0, 10.0] for i in range(500)]
    gt = {"images": [{"id": 1, "width": 500, "height": 400}], "categories": [{"id": 0, "name": "x"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 0, "bbox": b} for i, b in enumerate(boxes)]}
    results = [{"image_id": 1, "category_id": 0, "bbox": b, "score": 1.0 - i / 1000} for i, b in enumerate(boxes)]
    standard = coco_summary(gt, results)
    dense = coco_summary(gt, results, max_dets=(100, 300, 1000))
    assert standard["mar_100"] == pytest.approx(0.2)
    assert dense["mar_100"] == pytest.approx(0.2) and dense["mar_300"] == pytest.approx(0.6)
    assert dense["mar_1000"] == pytest.approx(1.0) and dense["map"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_dets"):
        coco_summary(gt, results, max_dets=(1000, 100, 10))


def test_pipeline_slice_option(tiny):
    from transformers import pipeline

    model, processor = tiny
    pipe = pipeline("object-detection", model=model, image_processor=processor)
    image = _image(200, 150, seed=2)
    config = SliceConfig(tile_size=96, tile_top_k=36)
    expected = sliced_detect(model, processor, image, config, threshold=0.0)
    out = pipe(image, threshold=0.0, slice=config)
    assert len(out) == len(expected["scores"]) > 36
    assert out[0]["score"] == pytest.approx(expected["scores"][0].item())
    assert out[0]["box"]["xmin"] == int(expected["boxes"][0, 0].item())
    batched = pipe([image, _image(100, 100)], threshold=0.0, slice=config, batch_size=2)
    assert len(batched[0]) == len(out)


def test_fine_tuning_with_more_queries(tmp_path):
    from align_detr_hf.queries import load_with_num_queries

    torch.manual_seed(0)
    trained = AlignDetrForObjectDetection(tiny_config(num_queries=12))
    trained.save_pretrained(tmp_path / "q12")
    model = load_with_num_queries(tmp_path / "q12", num_queries=30)
    rows = model.model.query_embedding.weight
    assert rows.shape == (30, 64) and model.config.num_queries == 30
    assert torch.equal(rows[:12], trained.model.query_embedding.weight)  # trained rows kept
    assert torch.equal(rows[12:24], trained.model.query_embedding.weight)  # new rows: copies, cycled

    # a fine-tuning step with the new count, then save and reload without any size mismatch
    pixel_values = torch.randn(2, 3, 128, 128)
    labels = [{"class_labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.2]])}
              for _ in range(2)]
    model.train()
    out = model(pixel_values=pixel_values, labels=labels)
    assert out.logits.shape[1] == 30 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.query_embedding.weight.grad[12:].abs().sum() > 0
    model.save_pretrained(tmp_path / "q30")
    reloaded = AlignDetrForObjectDetection.from_pretrained(tmp_path / "q30")
    assert torch.equal(reloaded.model.query_embedding.weight, rows)

    # transformers' route: the mismatched embedding is re-initialised, the rest loaded
    fresh = AlignDetrForObjectDetection.from_pretrained(tmp_path / "q12", num_queries=30, ignore_mismatched_sizes=True)
    assert fresh.model.query_embedding.weight.shape == (30, 64)
    expected = trained.state_dict()
    for name, value in fresh.state_dict().items():
        if name != "model.query_embedding.weight":
            assert torch.equal(value, expected[name]), name
    with pytest.raises(ValueError, match="num_queries"):
        load_with_num_queries(tmp_path / "q12", num_queries=0)


def test_predict_cli_slice_flags(tiny, tmp_path, capsys):
    import json

    from align_detr_hf.cli import main

    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    image = _image(200, 150, seed=3)
    image.save(tmp_path / "big.png")
    common = ["predict", str(tmp_path / "big.png"), "--model", str(tmp_path / "model"), "--threshold", "0.0",
              "--top-k", "500", "--no-draw"]
    main(common + ["--output", str(tmp_path / "plain")])
    main(common + ["--output", str(tmp_path / "sliced"), "--slice", "--slice-tile-size", "96", "--slice-merge", "wbf"])
    plain = json.loads((tmp_path / "plain" / "detections.json").read_text())["images"][0]["detections"]
    sliced = json.loads((tmp_path / "sliced" / "detections.json").read_text())["images"][0]["detections"]
    expected = sliced_detect(model, processor, image, SliceConfig(tile_size=96, merge="wbf", max_detections=500))
    assert len(plain) == 36 and len(sliced) == len(expected["scores"]) > 36
    assert sliced[0]["score"] == pytest.approx(expected["scores"][0].item(), abs=1e-5)
    with pytest.raises(SystemExit):
        main(common + ["--output", str(tmp_path / "bad"), "--slice", "--slice-overlap", "1.5"])
    assert "overlap" in capsys.readouterr().err
