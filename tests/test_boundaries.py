"""Every boundary says what is wrong (issue 22), table-driven in the style of tests/test_robustness.py: config
fields, COCO json files, `datasets` rows, evaluation inputs and the files the CLI loads a model from.

A case is a function that sets up what it needs under `ctx.root` and returns the action to run; `@case(boundary,
expectation)` registers it. Expectations:
- `Err(type, pattern)`: the action raises `type` (a ValueError or OSError: what the CLI turns into one line) whose
  message is ONE line matching `pattern` -- a raw KeyError/IndexError/TypeError from inside json, numpy or torch
  fails the case;
- `Exit(pattern)`: a command exits with code 2 and prints one line to stderr matching `pattern`, no traceback;
- `Ok(check)`: the action returns and `check(result, ctx)` asserts that the result is right.
`python tests/test_boundaries.py` prints the table of the issue's closing note (cases and outcomes per boundary).
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection, AlignDetrImageProcessor  # noqa: E402
from align_detr_hf.cli import main as cli_main  # noqa: E402

CASE_TIME_LIMIT_S = 45

# ------------------------------------------------------------------------------------------------ the machinery


@dataclass
class Err:
    type: type
    pattern: str


@dataclass
class Exit:
    pattern: str


@dataclass
class Ok:
    check: Callable[[Any, Any], None] | None = None


@dataclass
class Case:
    boundary: str
    name: str
    setup: Callable
    expect: Err | Exit | Ok


CASES: list[Case] = []


def case(boundary: str, expect, name: str | None = None):
    def register(setup):
        CASES.append(Case(boundary, name or setup.__name__, setup, expect))
        return setup

    return register


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"no result within {seconds} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Ctx:
    root: Path
    capsys: Any
    request: Any
    extras: dict = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def file(self, rel: str, data: bytes | str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


PROGRESS_BAR = re.compile(r"\d+%\|")


def run_case(c: Case, ctx: Ctx):
    action = c.setup(ctx)
    expect = c.expect
    ctx.capsys.readouterr()
    with time_limit(CASE_TIME_LIMIT_S):
        if isinstance(expect, Err):
            with pytest.raises(expect.type) as info:
                action()
            message = str(info.value)
            assert "\n" not in message.strip(), f"not one line: {message!r}"
            assert re.search(expect.pattern, message), f"{message!r} does not match {expect.pattern!r}"
        elif isinstance(expect, Exit):
            with pytest.raises(SystemExit) as info:
                action()
            err = ctx.capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
            assert info.value.code == 2 and "Traceback" not in err and len(lines) == 1, err
            assert re.search(expect.pattern, lines[0]), lines[0]
        else:
            result = action()
            if expect.check is not None:
                expect.check(result, ctx)


@pytest.fixture
def ctx(tmp_path, capsys, request):
    return Ctx(tmp_path, capsys, request)


def _rgb(height=24, width=32, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------ config
# Every field of AlignDetrConfig: values outside its range, of the wrong type, NaN or inf are refused by the config
# itself, with the field, the value and the allowed values in one line.

NAN, INF = float("nan"), float("inf")

BAD_CONFIG_VALUES = [
    # field, value, what the message says is allowed
    ("d_model", 0, r"a positive multiple of 32"),
    ("d_model", 48, r"a positive multiple of 32"),
    ("d_model", "256", r"a positive multiple of 32"),
    ("freeze_backbone_stages", -2, r"an integer >= -1"),
    ("freeze_backbone_stages", 5, r"at most 4 \(the backbone's stages\)"),
    ("num_feature_levels", 0, r"an integer >= 1"),
    ("head_inverse_sigmoid_eps", 0.5, r"a finite number"),
    ("head_inverse_sigmoid_eps", 0, r"a finite number"),
    ("neck_bias", "yes", r"True or False"),
    ("encoder_layers", -1, r"an integer >= 0"),
    ("decoder_layers", 0, r"an integer >= 1"),
    ("encoder_ffn_dim", 0, r"an integer >= 1"),
    ("decoder_ffn_dim", -4, r"an integer >= 1"),
    ("encoder_attention_heads", 0, r"an integer >= 1"),
    ("decoder_attention_heads", 3, r"divides d_model \(64\)"),
    ("encoder_n_points", 0, r"an integer >= 1"),
    ("decoder_n_points", 2.5, r"an integer >= 1"),
    ("dropout", -0.1, r"a finite number in \[0, 1\]"),
    ("dropout", 1.5, r"a finite number in \[0, 1\]"),
    ("num_queries", 0, r"an integer >= 1"),
    ("num_queries", -3, r"an integer >= 1"),
    ("num_queries", 1.5, r"an integer >= 1"),
    ("num_queries", True, r"an integer >= 1"),
    ("position_embedding_temperature", 0, r"a finite number > 0"),
    ("position_embedding_temperature", INF, r"a finite number > 0"),
    ("position_embedding_offset", NAN, r"a finite number"),
    ("init_prior_prob", 0, r"a finite number in \(0, 1\)"),
    ("init_prior_prob", 1.0, r"a finite number in \(0, 1\)"),
    ("num_denoising_queries", -5, r"an integer >= 0"),
    ("label_noise_ratio", -0.5, r"a finite number in \[0, 2\]"),
    ("box_noise_scale", NAN, r"a finite number >= 0"),
    ("num_gt_repeat", [2, 0, 1], r"integers >= 1"),
    ("num_gt_repeat", [2, 1.5, 1], r"integers >= 1"),
    ("num_gt_repeat", 2, r"a list of integers"),
    ("quality_alpha", NAN, r"a finite number in \[0, 1\]"),
    ("quality_alpha", 1.5, r"a finite number in \[0, 1\]"),
    ("quality_min", -0.01, r"a finite number in \[0, 1\]"),
    ("negative_gamma", -1, r"a finite number >= 0"),
    ("rank_tau", 0, r"a finite number > 0"),
    ("rank_tau", -1.5, r"a finite number > 0"),
    ("rank_tau", NAN, r"a finite number > 0"),
    ("rank_tau", INF, r"a finite number > 0"),
    ("matcher_class_cost", -2, r"a finite number >= 0"),
    ("matcher_bbox_cost", NAN, r"a finite number >= 0"),
    ("matcher_giou_cost", "2", r"a finite number >= 0"),
    ("matcher_alpha", 1.25, r"a finite number in \[0, 1\]"),
    ("matcher_gamma", -2, r"a finite number >= 0"),
    ("class_loss_coefficient", -1, r"a finite number >= 0"),
    ("bbox_loss_coefficient", INF, r"a finite number >= 0"),
    ("giou_loss_coefficient", None, r"a finite number >= 0"),
    ("loss_type", "focal", r"one of \('align_detr', 'dino'\)"),
    ("focal_alpha", 2, r"a finite number in \[0, 1\]"),
    ("focal_gamma", NAN, r"a finite number >= 0"),
    ("num_labels", 0, r"at least one class"),
    ("id2label", {1: "a", 2: "b"}, r"ids 0\.\.1"),
    ("backbone_config", "resnet", r"a dict or a PreTrainedConfig"),
]


def _bad_config_case(field_name, value, allowed):
    pattern = rf"AlignDetrConfig\.{field_name} must be .*{allowed}.*got {re.escape(repr(value))}"
    if field_name in ("num_labels", "id2label", "decoder_attention_heads"):  # rules across fields
        pattern = rf"{field_name}.*{allowed}"

    kwargs = {field_name: value, **({"id2label": None} if field_name == "num_labels" else {})}

    def setup(ctx):
        return lambda: tiny_config(**kwargs)

    case("config", Err(ValueError, pattern), name=f"{field_name}={value!r}")(setup)


for _field_name, _value, _allowed in BAD_CONFIG_VALUES:
    _bad_config_case(_field_name, _value, _allowed)


GOOD_CONFIG_VALUES = [
    ("encoder_layers", 0), ("num_denoising_queries", 0), ("freeze_backbone_stages", -1),
    ("freeze_backbone_stages", 4), ("dropout", 0.1), ("quality_alpha", 0), ("quality_alpha", 1.0),
    ("rank_tau", 1e-3), ("rank_tau", 2), ("negative_gamma", 0), ("label_noise_ratio", 2.0),
    ("class_loss_coefficient", 0), ("position_embedding_offset", 0), ("init_prior_prob", 0.5),
    ("matcher_alpha", np.float64(0.5)), ("num_queries", 1), ("loss_type", "dino"),
]  # fmt: skip


def _good_config_case(field_name, value):
    def check(config, ctx):
        assert getattr(config, field_name) == value

    def setup(ctx):
        return lambda: tiny_config(**{field_name: value})

    case("config", Ok(check), name=f"{field_name}={value!r}")(setup)


for _field_name, _value in GOOD_CONFIG_VALUES:
    _good_config_case(_field_name, _value)


def _config_folder(ctx, **changes) -> Path:
    folder = ctx.path("model")
    tiny_config().save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data.update(changes)
    (folder / "config.json").write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them
    return folder


@case("config", Err(ValueError, r"AlignDetrConfig\.rank_tau must be a finite number > 0, got 0"))
def from_pretrained_with_rank_tau_zero(ctx):
    return lambda: AlignDetrConfig.from_pretrained(_config_folder(ctx, rank_tau=0))


@case("config", Err(ValueError, r"AlignDetrConfig\.position_embedding_temperature .* got inf"))
def from_pretrained_with_infinity(ctx):
    return lambda: AlignDetrConfig.from_pretrained(_config_folder(ctx, position_embedding_temperature=INF))


@case("config", Err(ValueError, r"AlignDetrConfig\.quality_alpha .* got nan"))
def from_pretrained_with_nan(ctx):
    return lambda: AlignDetrConfig.from_pretrained(_config_folder(ctx, quality_alpha=NAN))


@case("config", Ok(lambda config, ctx: config.to_dict() == tiny_config().to_dict()))
def from_pretrained_round_trip(ctx):
    return lambda: AlignDetrConfig.from_pretrained(_config_folder(ctx))


def _nothing_written(result, ctx):
    raise AssertionError("unreachable")


@case("config", Err(ValueError, r"AlignDetrConfig\.num_queries must be an integer >= 1, got 0"))
def save_pretrained_after_setting_a_bad_value(ctx):
    config = tiny_config()
    config.num_queries = 0

    def action():
        try:
            config.save_pretrained(ctx.path("saved"))
        finally:
            assert not ctx.path("saved/config.json").exists()

    return action


def _small_state_dict(ctx):
    return ctx.request.getfixturevalue("small_state_dict")


@case("config", Err(ValueError, r"AlignDetrConfig\.num_denoising_queries must be an integer >= 0, got -5"))
def converter_override(ctx):
    from align_detr_hf.convert_align_detr import config_from_state_dict

    state_dict = _small_state_dict(ctx)
    return lambda: config_from_state_dict(state_dict, num_denoising_queries=-5)


@case("config", Err(ValueError, r"AlignDetrConfig\.position_embedding_temperature must be a finite number > 0, "
                             r"got inf"))
def converter_meta_cfg_with_infinite_temperature(ctx):
    from align_detr_hf.convert_align_detr import config_from_state_dict

    state_dict = _small_state_dict(ctx)
    cfg = ("model = dict(type='DINO', bbox_head=dict(type='AlignDETRHead'), "
           "positional_encoding=dict(num_feats=128, normalize=True, temperature=1e999))")  # fmt: skip
    return lambda: config_from_state_dict(state_dict, meta={"cfg": cfg})


@case("config", Exit(r"align-detr convert: error: AlignDetrConfig\.num_denoising_queries must be an integer >= 0, "
                    r"got -5"))
def cli_convert_with_negative_denoising_queries(ctx):
    checkpoint = ctx.path("align_detr.pth")
    torch.save({"state_dict": _small_state_dict(ctx), "meta": {}}, checkpoint)

    def action():
        try:
            cli_main(["convert", "--checkpoint", str(checkpoint), "--output-dir", str(ctx.path("converted")),
                      "--num-denoising-queries", "-5"])  # fmt: skip
        finally:
            assert not ctx.path("converted").exists()  # nothing written

    return action


@case("config", Ok(lambda config, ctx: config.num_denoising_queries == 0))
def converter_override_in_range(ctx):
    from align_detr_hf.convert_align_detr import config_from_state_dict

    state_dict = _small_state_dict(ctx)
    return lambda: config_from_state_dict(state_dict, num_denoising_queries=0)


def _deformable_detr():
    import transformers
    from transformers import ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    config = transformers.DeformableDetrConfig(
        backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=8, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=2, auxiliary_loss=True, disable_custom_kernels=True,
        id2label={0: "a", 1: "b"},
    )  # fmt: skip
    return transformers.DeformableDetrForObjectDetection(config)


@case("config", Err(ValueError, r"AlignDetrConfig\.rank_tau must be a finite number > 0, got 0"))
def loss_adapter_rank_tau_zero(ctx):
    from align_detr_hf import use_align_detr_loss

    model = _deformable_detr()
    return lambda: use_align_detr_loss(model, tau=0)


@case("config", Err(ValueError, r"AlignDetrConfig\.rank_tau must be a finite number > 0, got 0"))
def loss_adapter_rank_tau_keyword_zero(ctx):  # the config field's own name, through **loss_overrides
    from align_detr_hf import use_align_detr_loss

    model = _deformable_detr()
    return lambda: use_align_detr_loss(model, rank_tau=0)


@case("config", Err(ValueError, r"AlignDetrConfig\.matcher_giou_cost must be a finite number >= 0, got -1"))
def loss_adapter_negative_cost(ctx):
    from align_detr_hf import use_align_detr_loss

    model = _deformable_detr()
    return lambda: use_align_detr_loss(model, matcher_giou_cost=-1)


def _adapter_finite_loss(adapter, ctx):
    model = ctx.extras["model"]
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}] * 2
    loss = model.train()(pixel_values=torch.rand(2, 3, 32, 32), labels=labels).loss
    assert torch.isfinite(loss) and adapter.options.loss_overrides["rank_tau"] == 0.5


@case("config", Ok(_adapter_finite_loss))
def loss_adapter_in_range(ctx):
    from align_detr_hf import use_align_detr_loss

    ctx.extras["model"] = model = _deformable_detr()
    return lambda: use_align_detr_loss(model, tau=0.5)


# ------------------------------------------------------------------------------------------------ COCO json

IMAGES = [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
          {"id": 2, "file_name": "b.png", "width": 32, "height": 24}]  # fmt: skip
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
    {"id": 2, "image_id": 2, "category_id": 7, "bbox": [4, 4, 20, 12], "area": 240, "iscrowd": 0},
]
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def _coco(**top) -> dict:
    coco = {"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES}
    coco.update(top)
    return json.loads(json.dumps(coco))


def _coco_folder(ctx, coco: Any = None, text: str | None = None) -> Path:
    for name in ("a.png", "b.png"):
        path = ctx.path(f"images/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        _rgb().save(path)
    return ctx.file("annotations.json", text if text is not None else json.dumps(_coco() if coco is None else coco))


def _load(ctx, coco: Any = None, text: str | None = None):
    from align_detr_hf.data import load_coco_folder

    path = _coco_folder(ctx, coco, text)
    return lambda: load_coco_folder(path)


def _edit(section: str, index: int, **changes) -> dict:
    coco = _coco()
    for key, value in changes.items():
        if value is _DELETE:
            del coco[section][index][key]
        else:
            coco[section][index][key] = value
    return coco


_DELETE = object()
FILE = r"annotations\.json"

BAD_COCO = [
    # name, coco dict, pattern (after the file name)
    ("duplicate_category_id", _coco(categories=[{"id": 3, "name": "cat"}, {"id": 3, "name": "dog"},
                                                {"id": 7, "name": "bird"}]),
     r"categories\[1\] \(id 3\): id 3 is already used by categories\[0\]"),
    ("duplicate_category_name", _coco(categories=[{"id": 3, "name": "cat"}, {"id": 7, "name": "cat"}]),
     r"categories\[1\] \(id 7\): name 'cat' is already used by categories\[0\]"),
    ("category_without_id", _edit("categories", 0, id=_DELETE), r"categories\[0\]: no 'id'"),
    ("category_record_id_a_string", _edit("categories", 1, id="7"), r"categories\[1\]: id must be an integer, got '7'"),
    ("category_name_not_a_string", _edit("categories", 0, name=3), r"categories\[0\] \(id 3\): name must be a string"),
    ("nan_coordinate", _edit("annotations", 1, bbox=[4, NAN, 20, 12]),
     r"annotations\[1\] \(id 2\): bbox must be \[x, y, width, height\]: 4 finite numbers"),
    ("infinite_width", _edit("annotations", 0, bbox=[2, 3, INF, 8]), r"annotations\[0\] \(id 1\): bbox must be"),
    ("bbox_of_three_numbers", _edit("annotations", 0, bbox=[2, 3, 10]), r"annotations\[0\] \(id 1\): bbox must be"),
    ("bbox_of_strings", _edit("annotations", 0, bbox=["2", "3", "10", "8"]), r"annotations\[0\] \(id 1\): bbox"),
    ("bbox_not_a_list", _edit("annotations", 0, bbox="2 3 10 8"), r"annotations\[0\] \(id 1\): bbox must be"),
    ("negative_width", _edit("annotations", 0, bbox=[2, 3, -10, 8]),
     r"annotations\[0\] \(id 1\): bbox width and height must be >= 0, got \[2, 3, -10, 8\]"),
    ("negative_height", _edit("annotations", 1, bbox=[4, 4, 20, -0.5]), r"annotations\[1\] \(id 2\): bbox width"),
    ("fractional_category_id", _edit("annotations", 0, category_id=1.7),
     r"annotations\[0\] \(id 1\): category_id must be an integer, got 1\.7"),
    ("category_id_a_string", _edit("annotations", 0, category_id="3"),
     r"annotations\[0\] \(id 1\): category_id must be an integer, got '3'"),
    ("unknown_category_id", _edit("annotations", 0, category_id=5),
     r"annotations\[0\] \(id 1\): category_id 5 is not in 'categories'"),
    ("image_id_not_in_images", _edit("annotations", 1, image_id=9),
     r"annotations\[1\] \(id 2\): image_id 9 is not in 'images'"),
    ("annotation_without_image_id", _edit("annotations", 0, image_id=_DELETE), r"annotations\[0\] \(id 1\): no 'image_id'"),
    ("annotation_without_bbox", _edit("annotations", 0, bbox=_DELETE), r"annotations\[0\] \(id 1\): no 'bbox'"),
    ("annotation_without_category_id", _edit("annotations", 1, category_id=_DELETE),
     r"annotations\[1\] \(id 2\): no 'category_id'"),
    ("annotation_not_an_object", _coco(annotations=[ANNOTATIONS[0], [1, 2, 3]]),
     r"annotations\[1\] must be an object"),
    ("duplicate_annotation_id", _edit("annotations", 1, id=1), r"annotations\[1\] \(id 1\): id 1 is already used"),
    ("annotation_id_fractional", _edit("annotations", 1, id=2.5), r"annotations\[1\]: id must be an integer, got 2\.5"),
    ("nan_area", _edit("annotations", 0, area=NAN), r"annotations\[0\] \(id 1\): area must be a finite number >= 0"),
    ("negative_area", _edit("annotations", 0, area=-80), r"annotations\[0\] \(id 1\): area must be"),
    ("iscrowd_two", _edit("annotations", 0, iscrowd=2), r"annotations\[0\] \(id 1\): iscrowd must be 0 or 1, got 2"),
    ("image_without_id", _edit("images", 0, id=_DELETE), r"images\[0\]: no 'id'"),
    ("image_id_a_string", _edit("images", 0, id="a"), r"images\[0\]: id must be an integer, got 'a'"),
    ("image_without_file_name", _edit("images", 1, file_name=_DELETE), r"images\[1\] \(id 2\): no 'file_name'"),
    ("image_file_name_not_a_string", _edit("images", 1, file_name=7), r"images\[1\] \(id 2\): file_name must be"),
    ("image_zero_width", _edit("images", 0, width=0), r"images\[0\] \(id 1\): width must be an integer >= 1, got 0"),
    ("image_without_height", _edit("images", 0, height=_DELETE), r"images\[0\] \(id 1\): no 'height'"),
    ("duplicate_image_id", _edit("images", 1, id=1), r"images\[1\] \(id 1\): id 1 is already used by images\[0\]"),
    ("no_images", {"annotations": [], "categories": CATEGORIES}, r"no 'images' list"),
    ("images_not_a_list", _coco(images={"1": IMAGES[0]}), r"'images' must be a list"),
    ("top_level_a_list", [IMAGES], r"the top level must be an object with 'images'"),
    ("ignore_a_string", _edit("annotations", 0, ignore="false"), r"annotations\[0\] \(id 1\): ignore must be 0 or 1"),
]  # fmt: skip


def _bad_coco_case(name, coco, pattern):
    def setup(ctx):
        return _load(ctx, coco)

    case("coco_json", Err(ValueError, rf"{FILE}: {pattern}"), name=name)(setup)


for _name, _coco_dict, _pattern in BAD_COCO:
    _bad_coco_case(_name, _coco_dict, _pattern)


@case("coco_json", Err(ValueError, rf"{FILE} is not valid JSON: .*line 1"))
def truncated_json(ctx):
    return _load(ctx, text=json.dumps(_coco())[:50])


@case("coco_json", Err(FileNotFoundError, r"missing\.json"))
def missing_file(ctx):
    from align_detr_hf.data import load_coco_folder

    return lambda: load_coco_folder(ctx.path("missing.json"))


def _two_classes(dataset, ctx):
    assert dataset.id2label == {0: "cat", 1: "dog"}
    assert [dataset[i]["labels"]["class_labels"].tolist() for i in range(2)] == [[0], [1]]


@case("coco_json", Ok(_two_classes))
def valid_file(ctx):
    return _load(ctx)


@case("coco_json", Ok(_two_classes))
def whole_number_ids_written_as_floats(ctx):
    coco = _edit("annotations", 0, category_id=3.0, image_id=1.0)
    coco["images"][0]["id"] = 1.0
    return _load(ctx, coco)


@case("coco_json", Ok(_two_classes))
def annotations_without_ids(ctx):
    coco = _coco()
    for ann in coco["annotations"]:
        del ann["id"]
    return _load(ctx, coco)


def _zero_size_box_kept_for_evaluation_only(dataset, ctx):
    assert dataset[0]["labels"]["class_labels"].tolist() == []  # mmdetection trains on boxes >= 1 px only
    assert [a["bbox"] for a in dataset.coco_ground_truth()["annotations"]][0] == [2.0, 3.0, 0.0, 8.0]


@case("coco_json", Ok(_zero_size_box_kept_for_evaluation_only))
def zero_width_box(ctx):
    return _load(ctx, _edit("annotations", 0, bbox=[2, 3, 0, 8], area=0))


@case("coco_json", Ok(lambda dataset, ctx: dataset.id2label == {0: "3", 1: "7"}))
def no_categories_uses_the_ids_seen(ctx):
    coco = _coco()
    del coco["categories"]
    return _load(ctx, coco)


@case("coco_json", Ok(lambda dataset, ctx: len(dataset) == 2 and dataset[1]["labels"]["boxes"].shape == (0, 4)))
def no_annotations_list(ctx):  # a test-set file (image_info_test) lists images only
    coco = _coco()
    del coco["annotations"]
    return _load(ctx, coco)


# ------------------------------------------------------------------------------------------------ datasets rows


def _hf_dataset(objects, category_names=None, **columns):
    datasets = pytest.importorskip("datasets")
    if category_names is not None:
        category = datasets.ClassLabel(names=category_names)
        features = datasets.Features({
            "image": datasets.Image(),
            "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                        "category": datasets.List(category)},
            **{name: datasets.Value("int64") for name in columns},
        })  # fmt: skip
        return datasets.Dataset.from_dict({"image": [_rgb()] * len(objects), "objects": objects, **columns},
                                          features=features)
    return datasets.Dataset.from_dict({"image": [_rgb()] * len(objects), "objects": objects, **columns})


ROWS = [{"bbox": [[2.0, 3.0, 10.0, 8.0]], "category": [3]}, {"bbox": [[4.0, 4.0, 20.0, 12.0]], "category": [7]}]


def _rows(index=None, **changes):
    rows = json.loads(json.dumps(ROWS))
    if index is not None:
        rows[index].update(changes)
    return rows


def _load_rows(dataset_maker, **kwargs):
    from align_detr_hf.data import load_hf_dataset

    def setup(ctx):
        dataset = dataset_maker()
        return lambda: load_hf_dataset(dataset, **kwargs)

    return setup


ROW = r"dataset row"
BAD_ROWS = [
    ("id2label_missing_a_category", lambda: _hf_dataset(_rows()), {"id2label": {3: "cat"}},
     rf"{ROW} 1: objects\.category\[0\] = 7 is not a key of id2label \(3\)"),
    ("bbox_with_nan", lambda: _hf_dataset(_rows(1, bbox=[[4.0, NAN, 20.0, 12.0]])), {},
     rf"{ROW} 1: objects\.bbox\[0\] must be \[x, y, width, height\]: 4 finite numbers"),
    ("bbox_negative_width", lambda: _hf_dataset(_rows(0, bbox=[[2.0, 3.0, -10.0, 8.0]])), {},
     rf"{ROW} 0: objects\.bbox\[0\] width and height must be >= 0"),
    ("bbox_of_three_numbers", lambda: _hf_dataset(_rows(0, bbox=[[2.0, 3.0, 10.0]])), {},
     rf"{ROW} 0: objects\.bbox\[0\] must be \[x, y, width, height\]"),
    ("more_boxes_than_categories", lambda: _hf_dataset(_rows(0, bbox=[[2.0, 3.0, 10.0, 8.0]] * 2)), {},
     rf"{ROW} 0: objects has 2 bbox but 1 category"),
    ("area_of_another_length", lambda: _hf_dataset([{**r, "area": [1.0, 2.0]} for r in _rows()]), {},
     rf"{ROW} 0: objects has 1 bbox but 2 area"),
    ("no_category_key", lambda: _hf_dataset([{"bbox": r["bbox"]} for r in ROWS]), {},
     rf"{ROW} 0: objects has no 'category'"),
    # datasets refuses ClassLabel values >= num_classes itself, but keeps -1 ("no label")
    ("class_label_missing_value", lambda: _hf_dataset(_rows(1, category=[-1]), category_names=["a", "b", "c", "d"]),
     {}, rf"{ROW} 1: objects\.category\[0\] = -1 is not a class of the ClassLabel \(0\.\.3\)"),
    ("id2label_other_than_the_class_label",
     lambda: _hf_dataset([r | {"category": [1]} for r in ROWS], category_names=["a", "b"]),
     {"id2label": {0: "a", 1: "c"}}, r"id2label .* differs from the ClassLabel names of dataset's objects\.category"),
    ("id2label_mixing_key_types", lambda: _hf_dataset(_rows()), {"id2label": {3: "cat", "7": "dog"}},
     r"id2label mixes integer and string keys"),
    ("width_column_zero", lambda: _hf_dataset(_rows(), width=[32, 0], height=[24, 24]), {},
     rf"{ROW} 1: width must be an integer >= 1, got 0"),
    ("fractional_category", lambda: _hf_dataset(_rows(0, category=[1.5])), {},
     rf"{ROW} 0: objects\.category\[0\] must be an integer or a string, got 1\.5"),
]  # fmt: skip


def _bad_rows_case(name, maker, kwargs, pattern):
    case("datasets_rows", Err(ValueError, pattern), name=name)(_load_rows(maker, **kwargs))


for _name, _maker, _kwargs, _pattern in BAD_ROWS:
    _bad_rows_case(_name, _maker, _kwargs, _pattern)


@case("datasets_rows", Err(ValueError, r"Expected an 'objects' column"))
def no_objects_column(ctx):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"image": [_rgb()], "boxes": [[[1.0, 2.0, 3.0, 4.0]]]})
    return _load_rows(lambda: dataset)(ctx)


def _labels_of(dataset):
    return [dataset[i]["labels"]["class_labels"].tolist() for i in range(len(dataset))]


@case("datasets_rows", Ok(lambda ds, ctx: ds.id2label == {0: "3", 1: "7"} and _labels_of(ds) == [[0], [1]]))
def plain_ints(ctx):
    return _load_rows(lambda: _hf_dataset(_rows()))(ctx)


@case("datasets_rows", Ok(lambda ds, ctx: ds.id2label == {0: "cat", 1: "cow", 2: "dog"}
                                         and _labels_of(ds) == [[0], [2]]))
def id2label_with_a_class_not_in_the_rows(ctx):  # the classes are id2label's, in key order
    return _load_rows(lambda: _hf_dataset(_rows()), id2label={3: "cat", 5: "cow", 7: "dog"})(ctx)


@case("datasets_rows", Ok(lambda ds, ctx: ds.id2label == {0: "cat", 1: "dog"} and _labels_of(ds) == [[1], [0]]))
def string_categories(ctx):
    rows = [ROWS[0] | {"category": ["dog"]}, ROWS[1] | {"category": ["cat"]}]
    return _load_rows(lambda: _hf_dataset(rows))(ctx)


@case("datasets_rows", Ok(lambda ds, ctx: ds.id2label == {0: "a", 1: "b", 2: "c", 3: "d"}
                                         and _labels_of(ds) == [[3], [1]]))
def class_label(ctx):
    rows = [ROWS[0] | {"category": [3]}, ROWS[1] | {"category": [1]}]
    return _load_rows(lambda: _hf_dataset(rows, category_names=["a", "b", "c", "d"]))(ctx)


@case("datasets_rows", Ok(lambda ds, ctx: _labels_of(ds) == [[0], []]))
def row_without_objects(ctx):
    return _load_rows(lambda: _hf_dataset([ROWS[0], {"bbox": [], "category": []}]))(ctx)


# ------------------------------------------------------------------------------------------------ evaluation inputs

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 0, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 40, 20, 30], "area": 600, "iscrowd": 0},
    ],
    "categories": [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}],
}
PERFECT = [
    {"scores": [0.9], "labels": [0], "boxes": [[10.0, 10.0, 40.0, 30.0]]},
    {"scores": [0.8], "labels": [1], "boxes": [[50.0, 40.0, 70.0, 70.0]]},
]


def _gt(section=None, index=0, **changes):
    gt = json.loads(json.dumps(GT))
    for key, value in changes.items():
        if value is _DELETE:
            del gt[section][index][key]
        else:
            gt[section][index][key] = value
    return gt


def _evaluate(gt=None, detections=None, image_ids=(1, 2)):
    from align_detr_hf.evaluation import CocoEvaluator

    gt = GT if gt is None else gt

    def run():
        evaluator = CocoEvaluator(json.loads(json.dumps(gt)) if isinstance(gt, dict) else gt)
        evaluator.update(list(image_ids), json.loads(json.dumps(PERFECT)) if detections is None else detections)
        return evaluator.compute()

    return run


def _detections(index, **changes):
    detections = json.loads(json.dumps(PERFECT))
    detections[index].update(changes)
    return detections


GROUND_TRUTH = r"the ground truth"
BAD_EVALUATION = [
    ("gt_nan_box", lambda: _evaluate(_gt("annotations", 1, bbox=[50, NAN, 20, 30])),
     rf"{GROUND_TRUTH}: annotations\[1\] \(id 2\): bbox must be \[x, y, width, height\]: 4 finite numbers"),
    ("gt_infinite_box", lambda: _evaluate(_gt("annotations", 0, bbox=[10, 10, INF, 20])), rf"{GROUND_TRUTH}: annotations\[0\]"),
    ("gt_negative_width", lambda: _evaluate(_gt("annotations", 0, bbox=[40, 10, -30, 20])),
     rf"{GROUND_TRUTH}: annotations\[0\] \(id 1\): bbox width and height must be >= 0"),
    ("gt_image_id_missing_from_images", lambda: _evaluate(_gt("annotations", 1, image_id=3)),
     rf"{GROUND_TRUTH}: annotations\[1\] \(id 2\): image_id 3 is not in 'images'"),
    ("gt_unknown_category", lambda: _evaluate(_gt("annotations", 1, category_id=4)),
     rf"{GROUND_TRUTH}: annotations\[1\] \(id 2\): category_id 4 is not in 'categories'"),
    ("gt_without_bbox", lambda: _evaluate(_gt("annotations", 0, bbox=_DELETE)), rf"{GROUND_TRUTH}: annotations\[0\] \(id 1\): no 'bbox'"),
    ("gt_fractional_category", lambda: _evaluate(_gt("annotations", 0, category_id=0.5)),
     rf"{GROUND_TRUTH}: annotations\[0\] \(id 1\): category_id must be an integer, got 0\.5"),
    ("gt_duplicate_annotation_id", lambda: _evaluate(_gt("annotations", 1, id=1)), rf"{GROUND_TRUTH}: annotations\[1\] \(id 1\): id 1 is already used"),
    ("gt_without_images", lambda: _evaluate({"annotations": [], "categories": []}), rf"{GROUND_TRUTH}: no 'images' list"),
    ("gt_pycocotools_object_with_nan_box", lambda: _evaluate(_pycocotools(_gt("annotations", 1, bbox=[50, NAN, 20, 30]))),
     rf"{GROUND_TRUTH}: annotations\[1\] \(id 2\): bbox must be"),
    ("prediction_inverted_box", lambda: _evaluate(detections=_detections(0, boxes=[[40.0, 10.0, 10.0, 30.0]])),
     r"detections of image_id 1: box 0 \[40\.0, 10\.0, 10\.0, 30\.0\] has x1 < x0 or y1 < y0; boxes must be \[x0, y0, x1, y1\]"),
    ("prediction_inverted_height", lambda: _evaluate(detections=_detections(1, boxes=[[50.0, 70.0, 70.0, 40.0]])),
     r"detections of image_id 2: box 0 .* has x1 < x0 or y1 < y0"),
    ("prediction_boxes_of_three_numbers", lambda: _evaluate(detections=_detections(0, boxes=[[10.0, 10.0, 40.0]])),
     r"detections of image_id 1: boxes must have shape \(k, 4\), got \(1, 3\)"),
    ("prediction_without_boxes", lambda: _evaluate(detections=[{"scores": [0.9], "labels": [0]}, PERFECT[1]]),
     r"detections of image_id 1: no 'boxes'"),
    ("prediction_fractional_image_id", lambda: _evaluate(image_ids=(1.5, 2)),
     r"image ids must be integers, got 1\.5"),
    ("more_prediction_batches_than_label_batches", lambda: _compute_metrics(num_prediction_batches=3, num_label_batches=2),
     r"3 prediction batches but 2 label batches"),
    ("fewer_prediction_batches_than_label_batches", lambda: _compute_metrics(num_prediction_batches=1, num_label_batches=2),
     r"1 prediction batches but 2 label batches"),
    ("batch_of_another_size", lambda: _compute_metrics(label_batch_sizes=(2, 1)),
     r"batch 0 holds predictions for 1 images but labels for 2"),
]  # fmt: skip


def _pycocotools(gt):
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _model_outputs():
    """Per image of GT, logits (1, 3, 2) and boxes (1, 3, 4) whose best query is its ground truth."""
    outputs = []
    for image, ann in zip(GT["images"], GT["annotations"]):
        logits = torch.full((1, 3, 2), -8.0)
        logits[0, 0, ann["category_id"]] = 5.0
        x, y, w, h = ann["bbox"]
        boxes = torch.full((1, 3, 4), 0.3)
        boxes[0, 0] = torch.tensor([(x + w / 2) / image["width"], (y + h / 2) / image["height"],
                                    w / image["width"], h / image["height"]])  # fmt: skip
        outputs.append((logits.numpy(), boxes.numpy()))
    return outputs


def _labels(image):
    return {"image_id": np.array([image["id"]]), "orig_size": np.array([image["height"], image["width"]])}


def _compute_metrics(num_prediction_batches=2, num_label_batches=2, label_batch_sizes=(1, 1)):
    from align_detr_hf.evaluation import build_compute_metrics

    outputs = _model_outputs()
    predictions = [outputs[i % 2] for i in range(num_prediction_batches)]
    label_ids = [[_labels(GT["images"][(i + j) % 2]) for j in range(label_batch_sizes[i % 2])]
                 for i in range(num_label_batches)]  # fmt: skip
    return lambda: build_compute_metrics(GT)(SimpleNamespace(predictions=predictions, label_ids=label_ids))


def _bad_evaluation_case(name, action, pattern):
    case("evaluation_inputs", Err(ValueError, pattern), name=name)(lambda ctx: action())


for _name, _action, _pattern in BAD_EVALUATION:
    _bad_evaluation_case(_name, _action, _pattern)


def _map(expected):
    def check(metrics, ctx):
        assert metrics["map"] == pytest.approx(expected), metrics

    return check


@case("evaluation_inputs", Ok(_map(1.0)))
def perfect(ctx):
    return _evaluate()


@case("evaluation_inputs", Ok(_map(0.5)))  # one of the two ground-truth boxes can never be matched
def gt_zero_size_box(ctx):
    return _evaluate(_gt("annotations", 1, bbox=[50, 40, 0, 30], area=0))


@case("evaluation_inputs", Ok(_map(0.5)))
def prediction_zero_size_box(ctx):
    return _evaluate(detections=_detections(1, boxes=[[50.0, 40.0, 50.0, 70.0]]))


@case("evaluation_inputs", Ok(_map(1.0)))
def gt_without_annotation_ids(ctx):
    gt = _gt()
    for ann in gt["annotations"]:
        del ann["id"]
    return _evaluate(gt)


@case("evaluation_inputs", Ok(_map(1.0)))
def gt_as_pycocotools_object(ctx):
    return _evaluate(_pycocotools(_gt()))


@case("evaluation_inputs", Ok(_map(1.0)))
def compute_metrics_one_batch_per_image(ctx):
    return _compute_metrics()


# ------------------------------------------------------------------------------------------------ model loading (CLI)


def _model_folder(ctx) -> Path:
    folder = ctx.path("model")
    torch.manual_seed(0)
    AlignDetrForObjectDetection(tiny_config()).save_pretrained(folder)
    AlignDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    _rgb().save(ctx.path("cat.png"))
    return folder


def _predict(ctx, folder):
    return lambda: cli_main(["predict", str(ctx.path("cat.png")), "--model", str(folder), "--output_dir",
                             str(ctx.path("out")), "--no-draw", "--device", "cpu"])  # fmt: skip


@case("loading", Exit(r"align-detr predict: error: .*model/preprocessor_config\.json.*not a valid JSON"))
def preprocessor_config_not_json(ctx):
    folder = _model_folder(ctx)
    (folder / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 64')
    return _predict(ctx, folder)


@case("loading", Exit(r"align-detr predict: error: .*model/preprocessor_config\.json.*size must be one of"))
def preprocessor_config_with_a_bad_value(ctx):
    folder = _model_folder(ctx)
    data = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**data, "size": "big"}))
    return _predict(ctx, folder)


@case("loading", Exit(r"align-detr predict: error: .*model/preprocessor_config\.json"))
def preprocessor_config_a_list(ctx):
    folder = _model_folder(ctx)
    (folder / "preprocessor_config.json").write_text("[1, 2]")
    return _predict(ctx, folder)


@case("loading", Exit(r"align-detr predict: error: .*model/config\.json: AlignDetrConfig\.rank_tau must be"))
def config_json_with_a_bad_value(ctx):
    folder = _model_folder(ctx)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "rank_tau": 0}))
    return _predict(ctx, folder)


def _predicted_with_defaults(result, ctx):
    note = ctx.capsys.readouterr().err
    assert "no image processor config" in note
    assert json.loads(ctx.path("out/detections.json").read_text())["images"][0]["width"] == 32


@case("loading", Ok(_predicted_with_defaults))
def preprocessor_config_absent_uses_defaults_with_a_note(ctx):
    folder = _model_folder(ctx)
    (folder / "preprocessor_config.json").unlink()
    return _predict(ctx, folder)


@case("loading", Ok(lambda result, ctx: ctx.path("out/detections.json").is_file()))
def valid_folder(ctx):
    return _predict(ctx, _model_folder(ctx))


# ------------------------------------------------------------------------------------------------ cli paths and flags
# Output paths and flags as users type them (the second probe's new cases): an empty value (`--output "$UNSET"`), a
# file path written as a folder ("new/"), a device that cannot compute, an output that is one of the model's own
# files even with --overwrite. Each is one line and exit code 2, with nothing written.


def _written_nothing(ctx, action, *paths):
    def run():
        before = {p: p.read_bytes() if p.is_file() else p.exists() for p in paths}
        try:
            action()
        finally:
            assert before == {p: p.read_bytes() if p.is_file() else p.exists() for p in paths}

    return run


@case("cli_paths", Exit(r"align-detr predict: error: --output_dir is empty"))
def predict_output_empty(ctx):
    folder = _model_folder(ctx)
    return lambda: cli_main(["predict", str(ctx.path("cat.png")), "--model", str(folder), "--output_dir", "",
                             "--device", "cpu"])  # fmt: skip


@case("cli_paths", Exit(r"align-detr predict: error: --model is empty"))
def predict_model_empty(ctx):
    _model_folder(ctx)
    return lambda: cli_main(["predict", str(ctx.path("cat.png")), "--model", "", "--output_dir", str(ctx.path("out"))])


@case("cli_paths", Exit(r"align-detr predict: error: --device meta: cannot run a model there"))
def predict_on_the_meta_device(ctx):
    folder = _model_folder(ctx)
    return lambda: cli_main(["predict", str(ctx.path("cat.png")), "--model", str(folder), "--output_dir",
                             str(ctx.path("out")), "--device", "meta"])  # fmt: skip


@case("cli_paths", Exit(r"align-detr convert: error: refused to write an output at an empty path"))
def convert_output_dir_empty(ctx):
    checkpoint = ctx.file("ckpt.pth", b"not read")
    return lambda: cli_main(["convert", "--checkpoint", str(checkpoint), "--output-dir", ""])


@case("cli_paths", Exit(r"align-detr export: error: refused to write .*new/: it ends with a path separator"))
def export_output_written_as_a_folder(ctx):
    folder = _model_folder(ctx)
    action = lambda: cli_main(["export", "--model", str(folder), "--output", str(ctx.path("new")) + "/"])  # noqa
    return _written_nothing(ctx, action, ctx.path("new"))


@case("cli_paths", Exit(r"align-detr export: error: refused to write .*model/config\.json: it is the input"))
def export_over_the_models_config_even_with_overwrite(ctx):
    folder = _model_folder(ctx)
    action = lambda: cli_main(["export", "--model", str(folder), "--output", str(folder / "config.json"),  # noqa
                               "--overwrite"])  # fmt: skip
    return _written_nothing(ctx, action, folder / "config.json")


@case("cli_paths", Exit(r"align-detr export: error: refused to write .*model/model\.safetensors: it is the input"))
def export_over_the_models_weights_even_with_overwrite(ctx):
    folder = _model_folder(ctx)
    action = lambda: cli_main(["export", "--model", str(folder), "--output", str(folder / "model.safetensors"),  # noqa
                               "--overwrite"])  # fmt: skip
    return _written_nothing(ctx, action, folder / "model.safetensors")


@case("cli_paths", Ok(lambda result, ctx: sorted(p.name for p in ctx.path("model").iterdir()).count(
    "detections.json") == 1))
def predict_into_the_model_folder_with_overwrite_writes_beside_its_files(ctx):
    folder = _model_folder(ctx)
    return lambda: cli_main(["predict", str(ctx.path("cat.png")), "--model", str(folder), "--output_dir", str(folder),
                             "--no-draw", "--device", "cpu", "--overwrite"])  # fmt: skip


@case("cli_paths", Ok(lambda result, ctx: ctx.path("out dir ü/detections.json").is_file()))
def predict_output_with_spaces_unicode_and_trailing_slash(ctx):
    folder = _model_folder(ctx)
    return lambda: cli_main(["predict", str(ctx.path("cat.png")), "--model", str(folder), "--output_dir",
                             str(ctx.path("out dir ü")) + "/", "--no-draw", "--device", "cpu"])  # fmt: skip


def test_predict_with_a_config_that_does_not_fit_the_weights_ends_in_one_error_line(tmp_path, capsys):
    """A hand-edited config.json (num_feature_levels 4 -> 7) makes transformers print its load report and raise a
    RuntimeError: the command ends with one error line naming the folder, not a traceback."""
    ctx = Ctx(tmp_path, capsys, None)
    folder = _model_folder(ctx)
    data = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**data, "num_feature_levels": 7}))
    with pytest.raises(SystemExit) as info:
        _predict(ctx, folder)()
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert re.match(r"align-detr predict: error: could not load the model .*model: its config\.json and weights do "
                    r"not fit together", last), last
    assert not ctx.path("out").exists()


def test_ctrl_c_mid_write_ends_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the converted folder is being staged: exit status 130, one line, no staging folder left, no
    output folder, and the next run writes it."""
    import align_detr_hf.convert_align_detr as convert

    checkpoint = tmp_path / "ckpt.pth"
    checkpoint.write_bytes(b"x")

    def interrupted(*args, **kwargs):
        from align_detr_hf.file_io import atomic_directory

        with atomic_directory(tmp_path / "out", "align-detr convert") as staging:
            (staging / "config.json").write_text("{}")
            raise KeyboardInterrupt

    monkeypatch.setattr(convert, "convert_checkpoint", interrupted)
    with pytest.raises(SystemExit) as info:
        cli_main(["convert", "--checkpoint", str(checkpoint), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 130 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "align-detr convert: interrupted (Ctrl-C); outputs not finished were not written."]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth"]


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("c", CASES, ids=[f"{c.boundary}/{c.name}" for c in CASES])
def test_case(c, ctx):
    run_case(c, ctx)


def test_every_boundary_has_cases_of_both_kinds():
    counts = Counter((c.boundary, isinstance(c.expect, Ok)) for c in CASES)
    for boundary in ("config", "coco_json", "datasets_rows", "evaluation_inputs", "loading"):
        assert counts[boundary, True] > 0 and counts[boundary, False] > 0, boundary


def test_case_names_are_unique():
    names = Counter(f"{c.boundary}/{c.name}" for c in CASES)
    assert not [name for name, n in names.items() if n > 1]


def test_errors_are_the_kinds_the_cli_reports_in_one_line():
    for c in CASES:
        if isinstance(c.expect, Err):
            assert issubclass(c.expect.type, (ValueError, OSError)), c.name


def test_every_config_field_has_a_rule():
    """A field added to AlignDetrConfig without a rule would let any value through: declare one (see validation.py)."""
    own = [name for name in AlignDetrConfig.__annotations__ if not name.startswith("_")]
    without_rule = [name for name in own if not AlignDetrConfig.__dataclass_fields__[name].metadata.get("validator")]
    assert not without_rule, without_rule
    tested = {name for name, _, _ in BAD_CONFIG_VALUES}
    untested = [name for name in own if name not in tested | {"is_encoder_decoder", "tie_word_embeddings"}]
    assert not untested, untested


def summary() -> str:
    """The table for the issue's closing note: boundary -> cases -> outcomes."""
    rows = Counter((c.boundary, "correct result" if isinstance(c.expect, Ok) else "clear error") for c in CASES)
    lines = ["| boundary | cases | clear error | correct result |", "|---|---|---|---|"]
    for boundary in dict.fromkeys(c.boundary for c in CASES):
        err, ok = rows[boundary, "clear error"], rows[boundary, "correct result"]
        lines.append(f"| {boundary} | {err + ok} | {err} | {ok} |")
    total_err = sum(v for (_, k), v in rows.items() if k == "clear error")
    lines.append(f"| **all** | {len(CASES)} | {total_err} | {len(CASES) - total_err} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
