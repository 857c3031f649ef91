"""Pictures of an evaluation, where people would rather look than read (`align-detr evaluate`, the training scripts).

    evaluator = evaluate_loader(model, loader, StreamingCocoEvaluator(val_set.coco_ground_truth()))
    write_evaluation_report("out/evaluation", evaluator, val_set)

writes into a new or empty folder (`overwrite=True`: into any folder, replacing only files of these names):
- `per_class_ap.png`: one row per class, worst first: an AP bar, AP, AP50, AP75, AP small/medium/large, boxes;
- `pr_curves.png`: precision-recall curves per class (IoU 0.50, 0.75 and the mean over 0.50:0.95);
- `confusion.png`: which classes are mistaken for which (rows ground truth + background, columns prediction +
  missed), with the largest confusions and the misses by object size written below;
- `worst_images.png`: the images with the most errors, ground truth (left; misses and confusions tagged) beside the
  detections above the score threshold (right; false positives tagged);
- `report.md` (the numbers, linking the pictures) and `evaluation.json` (everything, machine-readable).

Drawn with Pillow only (a required dependency): matplotlib would be a large optional extra for four simple
figures, and a fallback would mean two renderers to keep alike; these pictures are identical on every machine.
The error analysis is [`align_detr_hf.evaluation_analysis`].
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .evaluation_analysis import analyse_errors, category_names, per_class_ap
from .file_io import OutputPathError, atomic_file, atomic_write_text
from .visualize import _font, class_colour, draw_detections

__all__ = ["REPORT_PICTURES", "check_report_folder", "report_pictures", "write_evaluation_report"]

_BACKEND_TEXT = {"compact": "pycocotools' COCOeval computed image by image (coco_compact)"}

# (title, file name) of the pictures, in the order a reader wants them (the model card links those present)
REPORT_PICTURES = (
    ("Per-class AP", "per_class_ap.png"),
    ("Precision-recall curves per class", "pr_curves.png"),
    ("Confusions and misses", "confusion.png"),
    ("Worst images (ground truth | detections)", "worst_images.png"),
)
REPORT_FILES = tuple(name for _, name in REPORT_PICTURES) + ("report.md", "evaluation.json")

WHITE, BLACK, GRID, MUTED = (255, 255, 255), (0, 0, 0), (225, 225, 225), (110, 110, 110)
CURVES = (("IoU 0.50", (0, 130, 200), 0.5), ("IoU 0.75", (245, 130, 48), 0.75), ("mean 0.50:0.95", (60, 60, 60), None))


def report_pictures(folder: str | Path) -> list[tuple[str, str]]:
    """(title, file name) of the report pictures present in `folder`."""
    return [(title, name) for title, name in REPORT_PICTURES if (Path(folder) / name).is_file()]


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _save(image: Image.Image, path: Path) -> Path:
    with atomic_file(path) as temp:
        image.save(temp, format="PNG")
    return path


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------------ per-class AP


def draw_per_class_ap(rows: list[dict]) -> Image.Image:
    """The per-class table, classes with ground truth worst first, then those without."""
    rows = sorted(rows, key=lambda r: (r["ap"] is None, r["ap"] if r["ap"] is not None else 0.0, r["name"]))
    font, bold = _font(13), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_width = max([_text_width(probe, r["name"], font) for r in rows] + [60]) + 16
    columns = [("AP", "ap"), ("AP50", "ap_50"), ("AP75", "ap_75"), ("small", "ap_small"), ("medium", "ap_medium"),
               ("large", "ap_large"), ("boxes", "num_ground_truth")]
    bar_width, cell, row_height, top = 200, 62, 24, 58
    width = name_width + bar_width + 16 + cell * len(columns) + 10
    image = Image.new("RGB", (width, top + row_height * len(rows) + 10), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), "COCO AP per class (IoU 0.50:0.95 unless named), worst first", fill=BLACK, font=bold)
    header_y = top - row_height + 4
    draw.text((10, header_y), "class", fill=MUTED, font=font)
    draw.text((name_width, header_y), "AP (0 - 1)", fill=MUTED, font=font)
    for i, (label, _) in enumerate(columns):
        draw.text((name_width + bar_width + 16 + i * cell, header_y), label, fill=MUTED, font=font)
    for r, row in enumerate(rows):
        y = top + r * row_height
        if r % 2 == 0:
            draw.rectangle([0, y, width, y + row_height - 1], fill=(246, 246, 246))
        draw.text((10, y + 4), row["name"], fill=BLACK, font=font)
        draw.rectangle([name_width, y + 5, name_width + bar_width, y + row_height - 6], outline=GRID)
        if row["ap"] is not None:
            fill = class_colour(row["category_id"])
            draw.rectangle([name_width, y + 5, name_width + round(bar_width * row["ap"]), y + row_height - 6],
                           fill=fill, outline=BLACK)
        for i, (_, key) in enumerate(columns):
            value = row[key]
            text = str(value) if key == "num_ground_truth" else _fmt(value)
            draw.text((name_width + bar_width + 16 + i * cell, y + 4), text, fill=BLACK, font=font)
    return image


# ------------------------------------------------------------------------------------------------ PR curves


def _panel(draw, box, title, curves, font, small):
    """One precision-recall plot in `box` (x0, y0, x1, y1): grid, ticks, the curves [(colour, xs, ys)]."""
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 34, x1 - 10, y0 + 24, y1 - 26
    draw.text((x0 + 6, y0 + 4), title, fill=BLACK, font=font)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * (right - left)
        y = bottom - tick * (bottom - top)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.line([(left, y), (right, y)], fill=GRID)
        if tick in (0.0, 0.5, 1.0):
            draw.text((x - 8, bottom + 3), f"{tick:g}", fill=MUTED, font=small)
            draw.text((x0 + 16, y - 7), f"{tick:g}", fill=MUTED, font=small)
    draw.rectangle([left, top, right, bottom], outline=MUTED)
    draw.text(((left + right) // 2 - 18, bottom + 12), "recall", fill=MUTED, font=small)
    for (colour, xs, ys), width in zip(curves, (3, 2, 1)):  # thinner on top: curves that coincide stay visible
        points = [(left + x * (right - left), bottom - y * (bottom - top)) for x, y in zip(xs, ys)]
        draw.line(points, fill=colour, width=width)


def draw_pr_curves(evaluator: Any, rows: list[dict]) -> Image.Image:
    """A grid of per-class precision (y) vs recall (x) panels, all areas, at 100 detections per image."""
    font, small, bold = _font(13), _font(11), _font(14)
    names = {r["category_id"]: r for r in rows}
    params = evaluator.params
    cat_ids = list(params["catIds"]) if params else [r["category_id"] for r in rows]
    cols = min(4, max(1, len(cat_ids)))
    panel_w, panel_h, top = 260, 220, 56
    grid_rows = math.ceil(len(cat_ids) / cols)
    image = Image.new("RGB", (cols * panel_w, top + grid_rows * panel_h), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), "Precision-recall per class (all sizes, 100 detections per image)", fill=BLACK, font=bold)
    x = 10
    for label, colour, _ in CURVES:
        draw.line([(x, 38), (x + 24, 38)], fill=colour, width=3)
        draw.text((x + 30, 31), label, fill=BLACK, font=font)
        x += 60 + _text_width(draw, label, font)
    recalls = np.asarray(params["recThrs"]) if params else np.linspace(0, 1, 101)
    for i, cat_id in enumerate(cat_ids):
        row = names.get(int(cat_id), {"name": str(cat_id), "ap": None})
        x0, y0 = (i % cols) * panel_w, top + (i // cols) * panel_h
        box = (x0, y0, x0 + panel_w, y0 + panel_h)
        curves = []
        if evaluator.precision is not None and row["ap"] is not None:
            precision = evaluator.precision[:, :, i, 0, -1]  # T x R: all areas, largest maxDets
            iou_thresholds = [round(float(t), 2) for t in params["iouThrs"]]
            for _, colour, iou in CURVES:
                ys = precision.mean(0) if iou is None else precision[iou_thresholds.index(iou)]
                curves.append((colour, recalls, np.clip(ys, 0, 1)))
        title = f"{row['name']}  AP {_fmt(row['ap'])}" if row["ap"] is not None else f"{row['name']}  (no boxes)"
        _panel(draw, box, title, curves, font, small)
        label = _vertical_text("precision", small, MUTED)
        image.paste(label, (box[0] + 2, (box[1] + box[3]) // 2 - label.height // 2), label)
    return image


# ------------------------------------------------------------------------------------------------ confusion


def _vertical_text(text: str, font, fill=BLACK) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    label = Image.new("RGBA", (right - left + 2, bottom - top + 2), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((-left + 1, -top + 1), text, fill=fill, font=font)
    return label.rotate(90, expand=True)


def _summary_lines(analysis: dict, limit: int = 6) -> list[str]:
    missed, fp = analysis["missed"], analysis["false_positives"]
    lines = [f"{analysis['num_ground_truth']} boxes: {analysis['found']} found, "
             f"{sum(c['count'] for c in analysis['confusions'])} mistaken for another class, {missed['total']} missed "
             f"(small {missed['small']}, medium {missed['medium']}, large {missed['large']}).",
             f"False positives: {fp['background']} on background, {fp['duplicate']} duplicates."]
    if analysis["confusions"]:
        lines.append("Most often mistaken:")
        lines += [f"  {c['ground_truth']} -> {c['predicted']}: {c['count']} ({c['fraction']:.0%} of the "
                  f"{c['ground_truth']} boxes)" for c in analysis["confusions"][:limit]]
    else:
        lines.append("No class was mistaken for another.")
    return lines


def confusion_geometry(analysis: dict) -> tuple[int, int, int]:
    """(left, top, cell): where the matrix of `draw_confusion` starts and the side of one cell, in pixels."""
    font = _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    classes = analysis["classes"]
    cell = int(np.clip(640 // (len(classes) + 1), 14, 56))
    left = max(_text_width(probe, t, font) for t in classes + ["background", "ground truth"]) + 24
    top = max(_text_width(probe, t, font) for t in classes + ["missed"]) + 60
    return left, top, cell


def draw_confusion(analysis: dict) -> Image.Image:
    """The confusion matrix (cells shaded by the fraction of their row; the diagonal green, errors red) and the
    summary lines below it."""
    classes = analysis["classes"]
    matrix = np.asarray(analysis["matrix"])
    num = len(classes) + 1
    left, top, cell = confusion_geometry(analysis)
    font, small, bold = _font(13), _font(11 if cell < 32 else 13), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_labels, col_labels = classes + ["background"], classes + ["missed"]
    lines = _summary_lines(analysis)
    width = max(left + num * cell + 20, max(_text_width(probe, t, font) for t in lines) + 30, 480)
    height = top + num * cell + 30 + 20 * len(lines) + 10
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"Confusions at score > {analysis['score_threshold']:g}, IoU {analysis['iou_threshold']:g} "
              "(rows: ground truth, columns: prediction)", fill=BLACK, font=bold)
    totals = matrix.sum(1, keepdims=True).clip(min=1)
    for r in range(num):
        draw.text((10, top + r * cell + (cell - 14) // 2), row_labels[r], fill=BLACK, font=font)
        for c in range(num):
            fraction = matrix[r, c] / totals[r, 0]
            base = (60, 170, 75) if r == c else (215, 40, 40)
            fill = tuple(round(255 - (255 - b) * fraction) for b in base) if matrix[r, c] else WHITE
            box = [left + c * cell, top + r * cell, left + (c + 1) * cell, top + (r + 1) * cell]
            draw.rectangle(box, fill=fill, outline=GRID)
            if matrix[r, c] and cell >= 24:
                text = str(int(matrix[r, c]))
                colour = WHITE if fraction > 0.55 else BLACK
                draw.text((box[0] + (cell - _text_width(draw, text, small)) // 2, box[1] + (cell - 13) // 2), text,
                          fill=colour, font=small)
    for c, label in enumerate(col_labels):
        rotated = _vertical_text(label, font)
        image.paste(rotated, (left + c * cell + (cell - rotated.width) // 2, top - rotated.height - 6), rotated)
    draw.line([(left, top + len(classes) * cell), (left + num * cell, top + len(classes) * cell)], fill=BLACK)
    draw.line([(left + len(classes) * cell, top), (left + len(classes) * cell, top + num * cell)], fill=BLACK)
    y = top + num * cell + 20
    for line in lines:
        draw.text((10, y), line, fill=BLACK, font=font)
        y += 20
    return image


# ------------------------------------------------------------------------------------------------ worst images


def _tile(image: Image.Image, boxes: list[dict], label2id: dict, height: int = 256) -> Image.Image:
    scale = height / image.height
    if image.width * scale > 1.5 * height:  # very wide images: limit the width instead
        scale = 1.5 * height / image.width
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    scaled = [{**b, "box": [v * scale for v in b["box"]]} for b in boxes]
    return draw_detections(resized, scaled, label2id=label2id, font_size=12)


def draw_worst_images(evaluator: Any, analysis: dict, dataset: Any, num: int = 8) -> Image.Image | None:
    """Up to `num` images with the most errors: ground truth | detections above the threshold, a caption each.
    None when no image has an error."""
    worst = analysis["worst"][:num]
    if not worst:
        return None
    names = category_names(evaluator.coco_gt)
    label2id: dict[str, int] = {}
    for cat_id, name in names.items():
        label2id[name] = cat_id
    position = {int(r["image_id"]): i for i, r in enumerate(dataset.records)}
    threshold = analysis["score_threshold"]
    font, bold = _font(13), _font(14)
    pairs = []
    suffixes = {"missed": " MISSED", "background": " FP", "duplicate": " DUP"}
    for image_id in worst:
        entry = analysis["images"][image_id]
        image = dataset.load_image(position[image_id])
        gt_boxes, det_boxes = [], []
        for truth in entry["ground_truth"]:
            x, y, w, h = truth["bbox"]
            name = names[truth["category_id"]]
            label = name + suffixes.get(truth["status"], "")
            if truth["status"] == "confused":
                label = f"{name}->{names.get(truth['predicted'], truth['predicted'])}"
            label2id.setdefault(label, truth["category_id"])
            gt_boxes.append({"label": label, "box": [x, y, x + w, y + h]})
        for det in entry["detections"]:
            label = names.get(det["category_id"], str(det["category_id"])) + suffixes.get(det["status"], "")
            label2id.setdefault(label, det["category_id"])
            det_boxes.append({"label": label, "score": det["score"], "box": det["box"]})
        left, right = _tile(image, gt_boxes, label2id), _tile(image, det_boxes, label2id)
        small = sum(1 for t in entry["ground_truth"] if t["status"] == "missed" and t["size"] == "small")
        parts = [f"{entry['missed']} missed ({small} small)" if entry["missed"] else "",
                 ", ".join(f"{names[t['category_id']]}->{names.get(t['predicted'], t['predicted'])}"
                           for t in entry["ground_truth"] if t["status"] == "confused"),
                 f"{entry['false_positives']} false positive(s)" if entry["false_positives"] else ""]
        caption = f"image {image_id}: " + "; ".join(p for p in parts if p)
        pairs.append((left, right, caption))
    gap, caption_h, cols = 6, 22, 2
    pair_w = max(l.width + r.width + gap for l, r, _ in pairs)
    tile_h = max(l.height for l, _, _ in pairs)
    rows_n = math.ceil(len(pairs) / cols)
    top = 34
    canvas = Image.new("RGB", (cols * (pair_w + 16) + 8, top + rows_n * (tile_h + caption_h + 14)), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 8), f"{len(pairs)} worst images (most errors at score > {threshold:g}): ground truth | detections",
              fill=BLACK, font=bold)
    for i, (left, right, caption) in enumerate(pairs):
        x = 8 + (i % cols) * (pair_w + 16)
        y = top + (i // cols) * (tile_h + caption_h + 14)
        canvas.paste(left, (x, y))
        canvas.paste(right, (x + left.width + gap, y))
        while _text_width(draw, caption, font) > pair_w and len(caption) > 4:
            caption = caption[:-4] + "..."
        draw.text((x, y + tile_h + 4), caption, fill=BLACK, font=font)
    return canvas


# ------------------------------------------------------------------------------------------------ the report


def check_report_folder(output_dir: str | Path, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Raise `OutputPathError` (one line) unless `output_dir` may receive the report: a new or empty folder, or any
    folder with `overwrite` (then only the report's file names are replaced; nothing is deleted). Never one of the
    `inputs` (model or data folders) or a folder holding one; inside one only with `overwrite`."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputPathError(f"evaluation output {output_dir} is a file; give a folder.")
    target = output_dir.expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if target == source or source.is_relative_to(target):
            raise OutputPathError(f"evaluation output folder {output_dir} holds the input {given}; give another "
                                  "folder.")
        if source.is_dir() and target.is_relative_to(source) and not overwrite:
            raise OutputPathError(f"evaluation output folder {output_dir} is inside the input folder {given}; give "
                                  "another folder, or pass --overwrite to write there anyway.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise OutputPathError(f"evaluation output folder {output_dir} is not empty; choose a new or empty folder, or "
                              "pass --overwrite to replace the report files in it (other files are kept).")
    return output_dir


def _markdown(title: str, evaluator: Any, rows: list[dict], analysis: dict, pictures: list[tuple[str, str]],
              backend: str) -> str:
    metrics = evaluator.metrics
    lines = [f"# Evaluation: {title}", "",
             f"{len(evaluator.coco_gt.getImgIds())} images, {analysis['num_ground_truth']} ground-truth boxes; COCO "
             f"metrics by {_BACKEND_TEXT.get(backend, backend)}, errors at score > {analysis['score_threshold']:g} "
             f"and IoU {analysis['iou_threshold']:g}.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in metrics.items()]
    lines += ["", "## Per-class AP", "", "| class | boxes | AP | AP50 | AP75 | AP small | AP medium | AP large |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['num_ground_truth']} | {_fmt(r['ap'])} | {_fmt(r['ap_50'])} | {_fmt(r['ap_75'])} | "
              f"{_fmt(r['ap_small'])} | {_fmt(r['ap_medium'])} | {_fmt(r['ap_large'])} |" for r in rows]
    lines += ["", "## Errors", ""] + [line.strip() for line in _summary_lines(analysis, limit=20)] + [""]
    for picture_title, name in pictures:
        lines += [f"## {picture_title}", "", f"![{picture_title}]({name})", ""]
    return "\n".join(lines)


def write_evaluation_report(
    output_dir: str | Path, evaluator: Any, dataset: Any = None, title: str = "model", score_threshold: float = 0.3,
    iou_threshold: float = 0.5, num_worst: int = 8, overwrite: bool = False,
) -> dict[str, Path]:
    """Write the files of the module docstring for a [`StreamingCocoEvaluator`] (computed here if it was not). The
    worst images need `dataset` (a [`DetectionDataset`] of the same images: `records`, `load_image`). Returns
    {file name: path} of what was written."""
    output_dir = Path(output_dir)
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score threshold must be between 0 and 1, got {score_threshold}.")
    check_report_folder(output_dir, overwrite)
    if evaluator.metrics is None:
        evaluator.compute()
    rows = per_class_ap(evaluator)
    analysis = analyse_errors(evaluator, score_threshold, iou_threshold)
    written = {
        "per_class_ap.png": _save(draw_per_class_ap(rows), output_dir / "per_class_ap.png"),
        "pr_curves.png": _save(draw_pr_curves(evaluator, rows), output_dir / "pr_curves.png"),
        "confusion.png": _save(draw_confusion(analysis), output_dir / "confusion.png"),
    }
    worst = draw_worst_images(evaluator, analysis, dataset, num_worst) if dataset is not None else None
    if worst is not None:
        written["worst_images.png"] = _save(worst, output_dir / "worst_images.png")
    pictures = [(t, n) for t, n in REPORT_PICTURES if n in written]
    backend = evaluator.backend  # resolved when the evaluator was made: compact, pycocotools or faster_coco_eval
    # the boxes of the worst images only: all images' would make the file grow with the data set
    worst_images = {str(i): analysis["images"][i] for i in analysis["worst"][:num_worst]}
    summary = {"title": title, "backend": backend, "num_images": len(evaluator.coco_gt.getImgIds()),
               "num_images_with_detections": len(evaluator.detections), "metrics": evaluator.metrics, "per_class": rows,
               "errors": {**analysis, "images": worst_images, "worst": analysis["worst"][:num_worst]},
               "pictures": [name for _, name in pictures]}
    written["evaluation.json"] = atomic_write_text(output_dir / "evaluation.json", json.dumps(summary, indent=1) + "\n")
    written["report.md"] = atomic_write_text(output_dir / "report.md",
                                             _markdown(title, evaluator, rows, analysis, pictures, backend) + "\n")
    return written
