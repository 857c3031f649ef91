"""A synthetic "shapes" detection dataset in COCO format, for demos and tests (no download).

Each image has a textured background (colour gradient, stripes or checkerboard, plus pixel noise) and a few filled
shapes of random colour, size and position. Shapes may overlap: later shapes are drawn on top of earlier ones, and
a shape that ends up mostly hidden is dropped from the annotations (and, so that the image stays consistent with its
labels, is not drawn either).

    from align_detr_hf.synthetic import generate_shapes_dataset
    ann_file = generate_shapes_dataset("shapes/train", num_images=200, image_size=128, seed=0)
    # shapes/train/annotations.json + shapes/train/images/000000.png ...

`generate_dense_dataset` makes the small-and-dense variant (large images, hundreds of 6-32 px shapes that do not
overlap, as cars in an aerial image), for sliced inference (see [`align_detr_hf.slicing`]).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")

__all__ = ["SHAPE_CLASSES", "draw_dense_image", "draw_shapes_image", "generate_dense_dataset", "generate_shapes_dataset"]


def _background(rng: random.Random, size: int) -> Image.Image:
    nrng = np.random.default_rng(rng.getrandbits(32))
    c0 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    c1 = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = rng.choice(["plain", "stripes", "checker"])
    if kind == "stripes":
        period = rng.uniform(6, 20)
        phase = np.sin(2 * math.pi * (np.cos(angle + 1.0) * xx + np.sin(angle + 1.0) * yy) * size / period)
        img = img + 25.0 * phase[..., None]
    elif kind == "checker":
        cell = rng.randint(6, 20)
        yi, xi = np.mgrid[0:size, 0:size]
        checker = ((yi // cell + xi // cell) % 2).astype(np.float32) * 2 - 1
        img = img + 20.0 * checker[..., None]
    img = img + nrng.normal(0.0, 8.0, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _shape_polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * r * 0.8, y * r * 0.8) for x, y in pts]
    elif kind == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif kind == "cross":
        a, b = r, r * 0.35
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    else:
        return None
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _contrasting_colour(rng: random.Random, background: np.ndarray) -> tuple[int, int, int]:
    for _ in range(20):
        colour = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
        if np.abs(colour - background).sum() > 150:
            break
    return tuple(int(v) for v in colour)


def draw_shapes_image(
    rng: random.Random,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 5,
    min_size: float = 0.1,
    max_size: float = 0.35,
    max_occlusion: float = 0.6,
    classes: tuple[str, ...] = SHAPE_CLASSES,
) -> tuple[Image.Image, list[dict]]:
    """One image and its objects `[{"bbox": [x, y, w, h], "category": index into classes, "area": visible px}]`.

    Sizes are fractions of `image_size` (the shape's circumscribed diameter). A shape whose visible fraction falls
    below `1 - max_occlusion` once later shapes are drawn is removed (not drawn, not annotated).
    """
    image = _background(rng, image_size)
    bg_mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
    shapes = []
    for _ in range(rng.randint(min_objects, max_objects)):
        kind_index = rng.randrange(len(classes))
        r = rng.uniform(min_size, max_size) * image_size / 2
        cx = rng.uniform(r * 0.6, image_size - r * 0.6)
        cy = rng.uniform(r * 0.6, image_size - r * 0.6)
        shapes.append((kind_index, cx, cy, r, rng.uniform(0, 2 * math.pi), _contrasting_colour(rng, bg_mean)))

    def masks_of(shape_list):
        owner = Image.new("I", (image_size, image_size), 0)
        draw = ImageDraw.Draw(owner)
        for index, (kind_index, cx, cy, r, rot, _) in enumerate(shape_list, start=1):
            polygon = _shape_polygon(classes[kind_index], cx, cy, r, rot)
            if polygon is None:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=index)
            else:
                draw.polygon(polygon, fill=index)
        return np.asarray(owner)

    # drop shapes that are too occluded, then re-check (removing one can only uncover others)
    while shapes:
        owner = masks_of(shapes)
        full = [int((masks_of([s]) > 0).sum()) for s in shapes]
        visible = [int((owner == i + 1).sum()) for i in range(len(shapes))]
        worst = min(range(len(shapes)), key=lambda i: visible[i] / max(full[i], 1))
        if full[worst] > 0 and visible[worst] / full[worst] >= 1 - max_occlusion:
            break
        shapes.pop(worst)

    draw = ImageDraw.Draw(image)
    objects = []
    owner = masks_of(shapes) if shapes else None
    for index, (kind_index, cx, cy, r, rot, colour) in enumerate(shapes):
        polygon = _shape_polygon(classes[kind_index], cx, cy, r, rot)
        if polygon is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(polygon, fill=colour)
        # the box of the full (amodal) shape, from its own rasterised mask, clipped to the image
        ys, xs = np.nonzero(masks_of([shapes[index]]))
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        objects.append(
            {
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "category": kind_index,
                "area": float((owner == index + 1).sum()),
            }
        )
    return image, objects


def generate_shapes_dataset(
    output_dir: str | Path,
    num_images: int = 200,
    image_size: int = 128,
    seed: int = 0,
    classes: tuple[str, ...] = SHAPE_CLASSES,
    **draw_kwargs,
) -> Path:
    """Write `num_images` PNGs under `output_dir/images/` and `output_dir/annotations.json` (COCO detection format,
    category ids 1..K in the order of `classes`). Deterministic for a given seed. Returns the annotation file path."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations = [], []
    for image_index in range(num_images):
        image, objects = draw_shapes_image(rng, image_size=image_size, classes=classes, **draw_kwargs)
        file_name = f"{image_index:06d}.png"
        image.save(output_dir / "images" / file_name)
        image_id = image_index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category"] + 1,
                    "bbox": obj["bbox"],
                    "area": obj["bbox"][2] * obj["bbox"][3],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    ann_file = output_dir / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
    polygon = _shape_polygon(kind, cx, cy, r, rot)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def draw_dense_image(
    rng: random.Random,
    width: int = 1024,
    height: int = 1024,
    num_objects: int = 400,
    min_px: float = 6.0,
    max_px: float = 32.0,
    classes: tuple[str, ...] = SHAPE_CLASSES,
    max_tries: int = 20,
) -> tuple[Image.Image, list[dict]]:
    """A large image with up to `num_objects` shapes of `min_px`-`max_px` px (circumscribed diameter, log-uniform),
    none overlapping another (a 2 px gap; a shape that finds no free place in `max_tries` draws is skipped).
    Returns the image and `[{"bbox": [x, y, w, h], "category": index into classes, "area": box area}]`."""
    image = _background(rng, max(width, height)).crop((0, 0, width, height))
    bg_mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(0)
    occupied = np.zeros((height, width), dtype=bool)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(num_objects):
        r = math.exp(rng.uniform(math.log(min_px), math.log(max_px))) / 2
        for _ in range(max_tries):
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            x0, y0 = max(int(cx - r) - 2, 0), max(int(cy - r) - 2, 0)
            x1, y1 = min(int(math.ceil(cx + r)) + 2, width), min(int(math.ceil(cy + r)) + 2, height)
            if not occupied[y0:y1, x0:x1].any():
                break
        else:
            continue
        occupied[y0:y1, x0:x1] = True
        kind_index = rng.randrange(len(classes))
        rot = rng.uniform(0, 2 * math.pi)
        _draw_shape(draw, classes[kind_index], cx, cy, r, rot, _contrasting_colour(rng, bg_mean))
        # the box from the shape rasterised alone in its neighbourhood (the drawn pixels, as the image shows them)
        patch = Image.new("L", (x1 - x0, y1 - y0), 0)
        _draw_shape(ImageDraw.Draw(patch), classes[kind_index], cx - x0, cy - y0, r, rot, 255)
        ys, xs = np.nonzero(np.asarray(patch))
        if len(xs) == 0:
            continue
        bx0, by0, bx1, by1 = x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1
        box = [float(bx0), float(by0), float(bx1 - bx0), float(by1 - by0)]
        objects.append({"bbox": box, "category": kind_index, "area": box[2] * box[3]})
    return image, objects


def generate_dense_dataset(
    output_dir: str | Path,
    num_images: int = 8,
    image_size: int | tuple[int, int] = 1024,
    num_objects: int = 400,
    seed: int = 0,
    classes: tuple[str, ...] = SHAPE_CLASSES,
    **draw_kwargs,
) -> Path:
    """Write a dense set of large images (see `draw_dense_image`; `image_size` is a side or `(width, height)`) as a
    COCO folder, like `generate_shapes_dataset`. Deterministic for a given seed. Returns the annotation file path."""
    width, height = (image_size, image_size) if isinstance(image_size, int) else image_size
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations = [], []
    for image_index in range(num_images):
        image, objects = draw_dense_image(rng, width, height, num_objects, classes=classes, **draw_kwargs)
        file_name = f"{image_index:06d}.png"
        image.save(output_dir / "images" / file_name)
        images.append({"id": image_index + 1, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_index + 1,
                                "category_id": obj["category"] + 1, "bbox": obj["bbox"], "area": obj["area"],
                                "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(classes)]
    ann_file = output_dir / "annotations.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return ann_file
