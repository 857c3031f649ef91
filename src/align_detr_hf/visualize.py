"""Draw labelled detection boxes on a PIL image (used by `align-detr predict`).

    from align_detr_hf.visualize import draw_detections
    drawn = draw_detections(image, [{"label": "cat", "score": 0.91, "box": [x0, y0, x1, y1]}])

Every class gets its own colour (a fixed palette, indexed by the class id when given, else by the order in which
labels first appear). Boxes are drawn in the class colour between two thin dark/light edges, and the "label score"
text sits on a filled tag of the class colour with black or white text (whichever contrasts more), so both stay
readable on light, dark and busy backgrounds. Line width and font size scale with the image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "class_colour", "draw_detections", "example_image_path"]

# 20 well-separated, saturated colours (ordered so that neighbouring class ids differ strongly)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip


def example_image_path() -> Path:
    """Path of the packaged example image (`assets/shapes.png`: a 640x480 scene with two circles, a square and a
    triangle)."""
    return Path(str(resources.files(__package__).joinpath("assets", "shapes.png")))


def class_colour(class_index: int) -> tuple[int, int, int]:
    """The palette colour of a class id (wraps around after 20 classes)."""
    return PALETTE[int(class_index) % len(PALETTE)]


def _text_colour(fill: Sequence[int]) -> tuple[int, int, int]:
    # relative luminance (sRGB weights, no gamma: good enough to choose black vs white)
    luminance = 0.2126 * fill[0] + 0.7152 * fill[1] + 0.0722 * fill[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font when Pillow has FreeType
    except (TypeError, OSError):  # pragma: no cover - old Pillow or no FreeType: small bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image,
    detections: Iterable[Mapping[str, Any]],
    label2id: Mapping[str, int] | None = None,
    line_width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """
    Return an RGB copy of `image` with one labelled box per detection (the input is not modified).

    Args:
        image: any PIL image (converted to RGB).
        detections: dicts with `label` (str), `score` (float, optional) and `box` `[xmin, ymin, xmax, ymax]` in
            pixels of `image`. Drawn lowest score first, so the most confident boxes and tags end on top.
        label2id: class name -> id, to colour by class id (stable across images); labels not in it, or all labels
            when it is `None`, get colours in order of first appearance.
        line_width, font_size: default to values scaled with the image's shorter side.
    """
    canvas = image.convert("RGB")  # always a new image, also when `image` is RGB already
    width, height = canvas.size
    short = min(width, height)
    line_width = line_width or max(2, round(short / 240))
    font = _font(font_size or max(12, round(short / 30)))
    draw = ImageDraw.Draw(canvas)

    detections = list(detections)
    colour_index: dict[str, int] = {}
    for det in detections:
        label = str(det["label"])
        if label not in colour_index:
            if label2id is not None and label in label2id:
                colour_index[label] = int(label2id[label])
            else:
                colour_index[label] = len(colour_index)

    for det in sorted(detections, key=lambda d: float(d.get("score", 0.0))):
        label = str(det["label"])
        colour = class_colour(colour_index[label])
        x0, y0, x1, y1 = (float(v) for v in det["box"])
        x0, x1 = sorted((min(max(x0, 0.0), width - 1.0), min(max(x1, 0.0), width - 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), height - 1.0), min(max(y1, 0.0), height - 1.0)))

        # dark outer edge, coloured band, light inner edge: visible on any background
        draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], outline=(0, 0, 0), width=1)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=line_width)
        if x1 - x0 > 2 * line_width + 2 and y1 - y0 > 2 * line_width + 2:
            inner = [x0 + line_width, y0 + line_width, x1 - line_width, y1 - line_width]
            draw.rectangle(inner, outline=(255, 255, 255), width=1)

        text = label if det.get("score") is None else f"{label} {float(det['score']):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(2, line_width)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tag_x = min(max(x0, 0.0), max(width - tag_w, 0.0))
        tag_y = y0 - tag_h if y0 - tag_h >= 0 else min(y0, max(height - tag_h, 0.0))  # above the box, else inside
        draw.rectangle([tag_x, tag_y, tag_x + tag_w, tag_y + tag_h], fill=colour, outline=(0, 0, 0), width=1)
        draw.text((tag_x + pad - left, tag_y + pad - top), text, fill=_text_colour(colour), font=font)
    return canvas
