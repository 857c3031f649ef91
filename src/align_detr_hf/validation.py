"""Checks of values where they enter the library. Each failure is ONE `ValueError` line that names where the value
came from (file, object), the record and the field, and says what is allowed.

- Field rules ([`Number`], [`Integer`], [`Flag`], [`OneOf`], [`ListOf`], [`Kind`]): declared on a config's dataclass
  fields with huggingface_hub's `validated_field` (the idiom of transformers 5 configs, e.g. LlamaConfig's
  `interval(min=0.0, max=1.0)(default=0.02)`) and enforced by [`check_fields`]. transformers' `@strict` would enforce
  them too, but raises `StrictDataclassFieldValidationError`: a two-line message that is not a `ValueError`, which
  callers (the CLI, the converter) would each have to translate.
- The COCO annotation schema ([`check_coco`]): a COCO json file ([`align_detr_hf.data.load_coco_folder`]) and a
  ground truth given to [`align_detr_hf.evaluation.CocoEvaluator`] pass the same checks.
- The `objects` column of a `datasets` row ([`check_objects_row`]).

Hand-written rather than a schema library: the rules are few, the messages must be one line in the project's
words, and pydantic (the candidate) would become a required dependency for about the same amount of code.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from huggingface_hub.dataclasses import validated_field

__all__ = [
    "Flag", "Integer", "Kind", "ListOf", "Number", "OneOf", "Rule", "box_problem", "check_coco", "check_fields",
    "check_objects_row",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- field rules


class Rule:
    """The allowed values of one field: `rule(value)` raises `ValueError("must be <what>, got <value>")`."""

    what = "valid"

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def __call__(self, value: Any) -> None:
        if not self.ok(value):
            raise ValueError(f"must be {self.what}, got {value!r}")

    def field(self, default: Any = dataclasses.MISSING) -> Any:
        """A dataclass field with this rule (huggingface_hub's `validated_field`)."""
        return validated_field(self, default=default)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bounds(low, high, exclude_low: bool, exclude_high: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if exclude_low else '['}{low}, {high}{')' if exclude_high else ']'}"
    if low is not None:
        return f" {'>' if exclude_low else '>='} {low}"
    if high is not None:
        return f" {'<' if exclude_high else '<='} {high}"
    return ""


class Number(Rule):
    """A finite real number (int or float, not bool) within optional bounds."""

    def __init__(self, min=None, max=None, *, exclude_min: bool = False, exclude_max: bool = False):
        self.min, self.max, self.exclude_min, self.exclude_max = min, max, exclude_min, exclude_max
        self.what = "a finite number" + _bounds(min, max, exclude_min, exclude_max)

    def ok(self, value: Any) -> bool:
        if not is_number(value) or not math.isfinite(value):
            return False
        if self.min is not None and (value <= self.min if self.exclude_min else value < self.min):
            return False
        return self.max is None or (value < self.max if self.exclude_max else value <= self.max)


class Integer(Rule):
    """An integer within optional bounds (and a multiple of `multiple_of`). `whole_floats` also takes 3.0 (JSON has
    one number type: files written by other tools may spell ids that way); configs take only ints."""

    def __init__(self, min=None, max=None, *, multiple_of: int | None = None, whole_floats: bool = False):
        self.min, self.max, self.multiple_of, self.whole_floats = min, max, multiple_of, whole_floats
        if multiple_of is not None and min == multiple_of and max is None:
            self.what = f"a positive multiple of {multiple_of}"
        else:
            self.what = "an integer" + _bounds(min, max, False, False)

    def ok(self, value: Any) -> bool:
        if isinstance(value, bool):
            return False
        whole = isinstance(value, numbers.Integral) or (
            self.whole_floats and isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
        return bool(
            whole
            and (self.min is None or value >= self.min)
            and (self.max is None or value <= self.max)
            and (self.multiple_of is None or value % self.multiple_of == 0)
        )


class Flag(Rule):
    what = "True or False"

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)


class OneOf(Rule):
    def __init__(self, *values):
        self.values = values
        self.what = f"one of {values}"

    def ok(self, value: Any) -> bool:
        return isinstance(value, type(self.values[0])) and value in self.values


class ListOf(Rule):
    """A list (or tuple) whose items all pass `item`; None too if `optional`."""

    def __init__(self, item: Rule, what: str, optional: bool = False):
        self.item, self.what, self.optional = item, what, optional

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        return isinstance(value, (list, tuple)) and all(self.item.ok(v) for v in value)


class Kind(Rule):
    """An instance of one of `types`; None too if `optional`."""

    def __init__(self, types: tuple[type, ...], what: str, optional: bool = False):
        self.types, self.what, self.optional = types, what, optional

    def ok(self, value: Any) -> bool:
        return (value is None and self.optional) or isinstance(value, self.types)


def check_fields(obj: Any) -> None:
    """Run the rules declared on the dataclass fields of `obj` (field metadata `validator`, as `validated_field`
    stores them); the first value that breaks one raises `ValueError("<Class>.<field> must be ..., got ...")`."""
    for field in dataclasses.fields(obj):
        for rule in field.metadata.get("validator", ()):
            try:
                rule(getattr(obj, field.name))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{type(obj).__name__}.{field.name} {error}") from None


# ---------------------------------------------------------------------------------------------------- boxes

BOX = "[x, y, width, height]: 4 finite numbers"


def box_problem(box: Any) -> str | None:
    """What is wrong with a COCO box `[x, y, width, height]`, or None. Zero width or height is allowed (COCO files
    hold such boxes; training skips boxes under 1 px as mmdetection does, evaluation keeps them)."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(is_number(v) and math.isfinite(v) for v in box):
        return f"must be {BOX}, got {box!r}"
    if box[2] < 0 or box[3] < 0:
        return f"width and height must be >= 0, got {box!r}"
    return None


# ---------------------------------------------------------------------------------------------------- COCO schema
# Each record first takes a fast path that accepts the common, valid spelling (a COCO train2017-sized file, 860k
# annotations: about 3 s, a third of what json.loads takes on the same machine); anything else goes through the full
# rules, which accept the rarer valid spellings (3.0 for an id) and name what is wrong.

_ID = Integer(whole_floats=True)
_SIZE = Integer(min=1, whole_floats=True)
_AREA = Number(min=0)
_FAST_NUMBER = frozenset((int, float))
_INF = math.inf


def _problem(rule: Rule, value: Any, name: str) -> str | None:
    return None if rule.ok(value) else f"{name} must be {rule.what}, got {value!r}"


def _label(records: list, section: str, i: int) -> str:
    """`images[3] (id 7)`, or `images[3]` when the record has no usable id."""
    record = records[i]
    value = record.get("id") if isinstance(record, dict) else None
    return f"{section}[{i}] (id {value})" if _ID.ok(value) else f"{section}[{i}]"


def _index_ids(records: list, section: str, where: str, required: bool) -> dict:
    """id -> position of the records of `section`; ids must be unique integers (and present if `required`)."""
    positions: dict = {}
    for i, record in enumerate(records):
        if type(record) is dict and type(value := record.get("id")) is int and value not in positions:
            positions[value] = i
            continue
        if not isinstance(record, dict):
            raise ValueError(f"{where}: {section}[{i}] must be an object, got {type(record).__name__} {record!r:.60}")
        if "id" not in record:
            if required:
                raise ValueError(f"{where}: {section}[{i}]: no 'id'")
            continue
        value = record["id"]
        if problem := _problem(_ID, value, "id"):
            raise ValueError(f"{where}: {section}[{i}]: {problem}")
        if value in positions:
            raise ValueError(f"{where}: {_label(records, section, i)}: id {value} is already used by "
                             f"{section}[{positions[value]}]")  # fmt: skip
        positions[value] = i
    return positions


def _section(coco: dict, name: str, where: str, required: bool) -> list:
    if name not in coco:
        if required:
            raise ValueError(f"{where}: no '{name}' list (a COCO file holds 'images', 'annotations', 'categories')")
        return []
    if not isinstance(coco[name], list):
        raise ValueError(f"{where}: '{name}' must be a list, got {type(coco[name]).__name__}")
    return coco[name]


def _image_problem(image: dict, image_files: bool) -> str | None:
    for name, rule in (("file_name", None), ("width", _SIZE), ("height", _SIZE)):
        if name not in image:
            if image_files:
                return f"no '{name}'"
            continue
        value = image[name]
        if rule is None:
            if not isinstance(value, str) or not value:
                return f"file_name must be a non-empty string, got {value!r}"
        elif problem := _problem(rule, value, name):
            return problem
    return None


def _fast_box(box: Any) -> bool:
    if type(box) is not list or len(box) != 4:
        return False
    x, y, w, h = box
    return (
        type(x) in _FAST_NUMBER and type(y) in _FAST_NUMBER and type(w) in _FAST_NUMBER and type(h) in _FAST_NUMBER
        and -_INF < x < _INF and -_INF < y < _INF and 0 <= w < _INF and 0 <= h < _INF
    )  # fmt: skip


def _annotation_problem(ann: dict, image_ids: dict, category_ids: dict) -> str | None:
    for name in ("image_id", "category_id", "bbox"):
        if name not in ann:
            return f"no '{name}'"
    problem = _problem(_ID, ann["image_id"], "image_id") or _problem(_ID, ann["category_id"], "category_id")
    if not problem and ann["image_id"] not in image_ids:
        problem = f"image_id {ann['image_id']} is not in 'images'"
    if not problem and category_ids and ann["category_id"] not in category_ids:
        problem = f"category_id {ann['category_id']} is not in 'categories'"
    if not problem and (box := box_problem(ann["bbox"])):
        problem = f"bbox {box}"
    if not problem and "area" in ann:
        problem = _problem(_AREA, ann["area"], "area")
    for flag in ("iscrowd", "ignore"):
        if not problem and flag in ann and ann[flag] not in (0, 1):  # False and True are 0 and 1
            problem = f"{flag} must be 0 or 1, got {ann[flag]!r}"
    return problem


def check_coco(coco: Any, where: str, image_files: bool = False) -> None:
    """Check a COCO detection dict: `images` (unique integer ids; `file_name`, `width`, `height` required when
    `image_files`), `categories` (unique integer ids, unique names), `annotations` (unique integer ids where given;
    `image_id` in `images`; integer `category_id` in `categories` when those are listed; `bbox` 4 finite numbers with
    width and height >= 0; `area` finite >= 0, `iscrowd` and `ignore` 0/1 where given). `where` names the source in
    the error (a file path, "the ground truth")."""
    if not isinstance(coco, dict):
        raise ValueError(
            f"{where}: the top level must be an object with 'images', 'annotations' and 'categories', got a "
            f"{type(coco).__name__}"
        )
    images = _section(coco, "images", where, required=True)
    annotations = _section(coco, "annotations", where, required=False)
    categories = _section(coco, "categories", where, required=False)

    image_ids = _index_ids(images, "images", where, required=True)
    for i, image in enumerate(images):
        width, height, name = image.get("width"), image.get("height"), image.get("file_name")
        if type(width) is int and type(height) is int and width >= 1 and height >= 1 and type(name) is str and name:
            continue
        if problem := _image_problem(image, image_files):
            raise ValueError(f"{where}: {_label(images, 'images', i)}: {problem}")

    category_ids = _index_ids(categories, "categories", where, required=True)
    names: dict[str, int] = {}
    for i, category in enumerate(categories):
        if "name" not in category:
            continue
        name = category["name"]
        if not isinstance(name, str):
            raise ValueError(f"{where}: {_label(categories, 'categories', i)}: name must be a string, got {name!r}")
        if name in names:
            raise ValueError(f"{where}: {_label(categories, 'categories', i)}: name {name!r} is already used by "
                             f"categories[{names[name]}]")  # fmt: skip
        names[name] = i

    _index_ids(annotations, "annotations", where, required=False)
    for i, ann in enumerate(annotations):
        image_id, category_id, area = ann.get("image_id"), ann.get("category_id"), ann.get("area", 0)
        if (
            type(image_id) is int and image_id in image_ids
            and type(category_id) is int and (category_id in category_ids or not category_ids)
            and _fast_box(ann.get("bbox"))
            and type(area) in _FAST_NUMBER and 0 <= area < _INF
            and ann.get("iscrowd", 0) in (0, 1) and ann.get("ignore", 0) in (0, 1)
        ):  # fmt: skip
            continue
        if problem := _annotation_problem(ann, image_ids, category_ids):
            raise ValueError(f"{where}: {_label(annotations, 'annotations', i)}: {problem}")


# ---------------------------------------------------------------------------------------------------- datasets rows


def check_objects_row(objects: Any, where: str) -> None:
    """Check the `objects` of one `datasets` row: `bbox` (COCO boxes) and `category` (integers or strings) of equal
    length, and `area`, `iscrowd`, `ignore` (where present) of that length too."""
    if not isinstance(objects, dict):
        raise ValueError(f"{where}: objects must be a dict with 'bbox' and 'category', got {type(objects).__name__}")
    for key in ("bbox", "category"):
        if key not in objects:
            raise ValueError(f"{where}: objects has no '{key}' (it needs 'bbox' and 'category')")
    boxes = objects["bbox"]
    for key in ("category", "area", "iscrowd", "ignore"):
        if key in objects and objects[key] is not None and len(objects[key]) != len(boxes):
            raise ValueError(f"{where}: objects has {len(boxes)} bbox but {len(objects[key])} {key}")
    for j, box in enumerate(boxes):
        if problem := box_problem(list(box) if isinstance(box, tuple) else box):
            raise ValueError(f"{where}: objects.bbox[{j}] {problem}")
    for j, category in enumerate(objects["category"]):
        if not (isinstance(category, str) or Integer().ok(category)):
            raise ValueError(f"{where}: objects.category[{j}] must be an integer or a string, got {category!r}")
    for j, area in enumerate(objects.get("area") or ()):
        if problem := _problem(_AREA, area, f"objects.area[{j}]"):
            raise ValueError(f"{where}: {problem}")
    for j, crowd in enumerate(objects.get("iscrowd") or ()):
        if crowd not in (0, 1):
            raise ValueError(f"{where}: objects.iscrowd[{j}] must be 0 or 1, got {crowd!r}")
