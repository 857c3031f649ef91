"""`transformers.pipeline("object-detection", model=DIR)` with a saved Align-DETR folder.

Two tiny models: a random one, whose pipeline output must equal our own processor + model + post-processing run on
the same image, and one with hand-set final heads whose output is known exactly (labels and boxes), so the test
can check the label names and the scaling of boxes to the original image size without a trained model.
"""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from align_detr_hf import AlignDetrForObjectDetection, AlignDetrImageProcessor, AlignDetrImageProcessorPil
from align_detr_hf.visualize import example_image_path

pipeline = pytest.importorskip("transformers").pipeline

# A small processing size keeps the CPU forward pass fast; the boxes are still mapped back to the original size.
SIZE = {"shortest_edge": 128, "longest_edge": 224}
CLASS_BIAS = [-5.0, 2.0, -1.0]  # circle, square, triangle -> scores sigmoid(bias) for every query


def known_output_model(config):
    """Every query predicts scores sigmoid(CLASS_BIAS) and the box covering the top-right quadrant.

    The last decoder layer's class head and last box-MLP layer get zero weights, so they output their bias. The box
    is sigmoid(bias + inverse_sigmoid(reference)) with inverse_sigmoid clamped to about +-11.5, so a bias of +-50
    saturates the sigmoid to exactly 1 or 0 (in float32): cx = 1, cy = 0, w = h = 1, i.e. xyxy (0.5, -0.5, 1.5, 0.5)
    -> clamped to the image: [W/2, 0, W, H/2].
    """
    torch.manual_seed(0)
    model = AlignDetrForObjectDetection(config).eval()
    with torch.no_grad():
        head = model.class_embed[-1]
        head.weight.zero_()
        head.bias.copy_(torch.tensor(CLASS_BIAS))
        box_layer = model.model.decoder.bbox_embed[-1].layers[-1]
        box_layer.weight.zero_()
        box_layer.bias.copy_(torch.tensor([50.0, -50.0, 50.0, 50.0]))
    return model


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("random_tiny")
    torch.manual_seed(0)
    AlignDetrForObjectDetection(tiny_config()).eval().save_pretrained(path)
    AlignDetrImageProcessor(size=SIZE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def known_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("known_tiny")
    known_output_model(tiny_config()).save_pretrained(path)
    AlignDetrImageProcessor(size=SIZE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def random_pipe(random_dir):
    return pipeline("object-detection", model=str(random_dir))


@pytest.fixture(scope="module")
def known_pipe(known_dir):
    return pipeline("object-detection", model=str(known_dir))


@pytest.fixture(scope="module")
def image():
    with Image.open(example_image_path()) as img:
        return img.convert("RGB")


def test_example_image_is_packaged():
    path = example_image_path()
    assert path.is_file() and path.stat().st_size < 100_000
    with Image.open(path) as img:
        assert img.size == (640, 480)


def test_pipeline_loads_our_classes(random_pipe):
    from transformers.utils import is_torchvision_available

    detector = random_pipe
    assert isinstance(detector.model, AlignDetrForObjectDetection)
    # AutoImageProcessor's rule: the torchvision backend where torchvision is installed, else the PIL one
    expected = AlignDetrImageProcessor if is_torchvision_available() else AlignDetrImageProcessorPil
    assert type(detector.image_processor) is expected


def test_pipeline_matches_processor_model_post_process(random_pipe, random_dir, image):
    got = random_pipe(image, threshold=0.0)

    processor = AlignDetrImageProcessor.from_pretrained(random_dir)
    model = AlignDetrForObjectDetection.from_pretrained(random_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    sizes = [(image.height, image.width)]
    expected = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)[0]

    assert len(got) == len(expected["scores"]) == 36  # 12 queries x 3 classes (top_k 300 keeps all)
    id2label = model.config.id2label
    for det, score, label, box in zip(got, expected["scores"], expected["labels"], expected["boxes"]):
        assert det["score"] == pytest.approx(score.item(), abs=1e-6)
        assert det["label"] == id2label[label.item()]
        # the pipeline truncates to int pixels of the original image
        assert [det["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == box.int().tolist()
    for det in got:
        b = det["box"]
        assert 0 <= b["xmin"] <= b["xmax"] <= image.width
        assert 0 <= b["ymin"] <= b["ymax"] <= image.height
        assert det["label"] in {"circle", "square", "triangle"}


def test_pipeline_known_labels_and_boxes(known_pipe, image):
    detector = known_pipe
    w, h = image.size  # 640 x 480: a swapped width/height would give a different box
    top_right = {"xmin": w // 2, "ymin": 0, "xmax": w, "ymax": h // 2}
    sig = [1 / (1 + math.exp(-b)) for b in CLASS_BIAS]  # 0.0067, 0.881, 0.269

    default = detector(image)  # pipeline default threshold 0.5: only "square"
    assert len(default) == 12
    for det in default:
        assert det["label"] == "square"
        assert det["score"] == pytest.approx(sig[1], abs=1e-5)
        assert det["box"] == top_right

    lower = detector(str(example_image_path()), threshold=0.2)  # a path works too; adds the triangles
    assert sorted(d["label"] for d in lower) == ["square"] * 12 + ["triangle"] * 12
    assert all(d["box"] == top_right for d in lower)
    assert [d["score"] for d in lower] == sorted((d["score"] for d in lower), reverse=True)

    everything = detector(image, threshold=0.001)
    assert {d["label"] for d in everything} == {"circle", "square", "triangle"} and len(everything) == 36


def test_pipeline_batch_and_other_image_size(known_pipe, image):
    detector = known_pipe
    small = image.resize((300, 200))
    results = detector([image, small], threshold=0.5)
    assert len(results) == 2
    assert results[0][0]["box"] == {"xmin": 320, "ymin": 0, "xmax": 640, "ymax": 240}
    assert results[1][0]["box"] == {"xmin": 150, "ymin": 0, "xmax": 300, "ymax": 100}
    assert all(d["label"] == "square" for r in results for d in r)


def _random_images(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator).numpy())
            for h, w in sizes]


def _count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]),
                                             with_kwargs=True)
    return calls, handle


def test_batched_pipeline_equals_one_by_one_for_mixed_sizes(random_pipe):
    # two images share a processed size (batched together), the others are alone: every result must be the
    # one-image result, in input order
    images = _random_images([(100, 150), (200, 120), (64, 64), (100, 150), (90, 300)])
    one_by_one = [random_pipe(image, threshold=0.0) for image in images]
    calls, handle = _count_forwards(random_pipe.model)
    try:
        batched = random_pipe(images, threshold=0.0, batch_size=4)
    finally:
        handle.remove()
    # pipeline batches of 4 + 1 images; in the first, the two 100x150 images share a processed size: one pass
    assert calls == [2, 1, 1, 1]
    assert len(batched) == len(images)
    for index, (got, expected) in enumerate(zip(batched, one_by_one)):
        assert len(got) == 36
        if index in (0, 3):
            assert_same_detections(got, expected)
        else:
            assert got == expected  # alone in its pass: the one-image computation, exactly


def test_batched_pipeline_with_a_fixed_canvas_runs_one_pass(random_dir):
    # with `pad_size` every image has the same input size, so a whole pipeline batch is one forward pass
    processor = AlignDetrImageProcessor(size=SIZE, pad_size={"height": 224, "width": 224})
    detector = pipeline("object-detection", model=str(random_dir), image_processor=processor)
    images = _random_images([(100, 150), (200, 120), (64, 64)], seed=1)
    one_by_one = [detector(image, threshold=0.0) for image in images]
    calls, handle = _count_forwards(detector.model)
    try:
        batched = detector(images, threshold=0.0, batch_size=3)
    finally:
        handle.remove()
    assert calls == [3]
    for got, expected in zip(batched, one_by_one):
        assert_same_detections(got, expected)


def assert_same_detections(got, expected):
    """Equal up to the last bits of batched matrix products: sorted scores, then the top detection's label and box
    (near-equal scores may swap places, and an int-truncated box coordinate may move by 1 px)."""
    assert len(got) == len(expected)
    assert sorted(d["score"] for d in got) == pytest.approx(sorted(d["score"] for d in expected), abs=1e-5)
    assert got[0]["label"] == expected[0]["label"]
    for key in ("xmin", "ymin", "xmax", "ymax"):
        assert abs(got[0]["box"][key] - expected[0]["box"][key]) <= 1


class _Records(__import__("logging").Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _logged_while(create):
    import logging

    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        result = create()
    finally:
        logger.removeHandler(records)
    return result, records.messages


def test_creating_the_pipeline_logs_no_unsupported_model_error(random_dir, monkeypatch):
    from transformers import ObjectDetectionPipeline

    # the saved folder has `auto_map`: nothing may ask whether to trust remote code (transformers' video-processor
    # lookup would, for a video processor derived from the image processor's entry; the answer is swallowed)
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    detector, messages = _logged_while(lambda: pipeline("object-detection", model=str(random_dir)))
    assert not [m for m in messages if "is not supported for object-detection" in m], messages
    assert prompts == []
    # transformers' own class logs it for our model (its check reads a static table of its own detectors), so the
    # capture above would have seen it
    _, vanilla = _logged_while(
        lambda: ObjectDetectionPipeline(model=detector.model, image_processor=detector.image_processor,
                                        task="object-detection")
    )
    assert any("'AlignDetrForObjectDetection' is not supported for object-detection" in m for m in vanilla)


def test_pipeline_other_models_keep_transformers_behaviour(random_pipe):
    from align_detr_hf import AlignDetrObjectDetectionPipeline
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    assert type(random_pipe) is AlignDetrObjectDetectionPipeline
    config = DetrConfig(backbone_config=ResNetConfig(hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1],
                                                     embedding_size=8, out_features=["stage4"]),
                        d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=16, decoder_ffn_dim=16,
                        num_queries=5, use_timm_backbone=False)
    detr = DetrForObjectDetection(config).eval()
    detector = AlignDetrObjectDetectionPipeline(model=detr, image_processor=random_pipe.image_processor)
    inputs = detector.preprocess(_random_images([(64, 64)])[0])
    assert set(inputs) == {"pixel_values", "pixel_mask", "target_size"}  # the parent's inputs, not ours


def test_transformers_own_pipeline_batches_more_images_than_decoder_layers(random_dir):
    """transformers' ObjectDetectionPipeline (what a model object gets where the package is absent) splits every
    tensor output on its first axis: the batch-first `intermediate_*` outputs make batches of any size work."""
    from transformers import ObjectDetectionPipeline

    model = AlignDetrForObjectDetection.from_pretrained(random_dir).eval()
    assert model.config.decoder_layers == 2
    detector = ObjectDetectionPipeline(model=model, image_processor=AlignDetrImageProcessor(size=SIZE))
    images = _random_images([(100, 150)] * 5, seed=3)  # one size: its collate function cannot pad
    batched = detector(images, threshold=0.0, batch_size=5)
    for got, image in zip(batched, images):
        assert_same_detections(got, detector(image, threshold=0.0))


def _known_box(width, height):
    return {"xmin": width // 2, "ymin": 0, "xmax": width, "ymax": height // 2}


def test_pipeline_reads_files_as_align_detr_predict_does(known_pipe, random_pipe, tmp_path):
    """Same file, same answers: the pipeline reads paths with image_io (EXIF orientation applied, 16-bit depth
    kept), as `align-detr predict`, examples/predict.py and the image processor do."""
    from align_detr_hf.image_io import read_image

    # EXIF orientation 6 (rotate 90): stored 80 wide x 40 high, displayed 40 x 80
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif)
    result = known_pipe(str(tmp_path / "rotated.jpg"))
    assert result and all(d["box"] == _known_box(40, 80) for d in result)  # in displayed coordinates

    # a 16-bit PNG whose values all exceed 255: clipped to 8 bits it would be a white image
    values = (np.linspace(300, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    got = random_pipe(str(tmp_path / "deep.png"), threshold=0.0)
    image = read_image(tmp_path / "deep.png")
    assert image.mode.startswith("I") and np.array(image).max() > 255
    assert got == random_pipe(image, threshold=0.0)
    white = random_pipe(Image.new("RGB", (64, 48), (255, 255, 255)), threshold=0.0)
    assert [d["score"] for d in got] != pytest.approx([d["score"] for d in white], abs=1e-4)


def test_pipeline_output_format_as_transformers_pipeline_tests(random_pipe, tmp_path):
    """transformers' ObjectDetectionPipelineTests.run_pipeline_test: one list per input, each detection a dict with a
    float score, a label of config.id2label and an int box; the `images=` keyword; paths and PIL images alike."""
    image = _random_images([(70, 90)], seed=5)[0]
    image.save(tmp_path / "image.png")
    outputs = random_pipe(images=[image, str(tmp_path / "image.png")], threshold=0.0)
    assert len(outputs) == 2 and outputs[0] == outputs[1]
    for detection in outputs[0]:
        assert set(detection) == {"score", "label", "box"}
        assert isinstance(detection["score"], float) and 0.0 <= detection["score"] <= 1.0
        assert detection["label"] in random_pipe.model.config.id2label.values()
        assert set(detection["box"]) == {"xmin", "ymin", "xmax", "ymax"}
        assert all(isinstance(v, int) for v in detection["box"].values())
    scores = [d["score"] for d in outputs[0]]
    assert scores == sorted(scores, reverse=True)
    high = random_pipe(image, threshold=0.9)
    assert all(d["score"] > 0.9 for d in high) and len(high) < len(outputs[0])
