"""The accuracy certificate of an exported file: its COCO mAP against eager PyTorch's on the same data.

    data = load_verification_data("synthetic:64")     # or a COCO folder / annotation json, or a `datasets` dataset
    report = certify(model, processor, data, {"onnxruntime": "model.onnx", "openvino-int8": "model.int8.xml"})
    write_certificate(report, "model.onnx")            # model.certificate.json / .md, and the README.md section

Every image goes through the model's image processor once; eager PyTorch and each exported file (run by
`ExportedDetector`, ONNX Runtime or OpenVINO) get the same pixel_values and pixel_mask batches, and their logits and
boxes go through the same `post_process_object_detection` (threshold 0, top 100) and COCO evaluation. Reported per
target: mAP, AP50, AP75, ΔmAP = |exported - eager| in points (0.1 point = 0.001 mAP), and the largest per-box
difference: over each image's detections (eager queries scoring at least 0.3, the usual deployment threshold and
`align-detr predict`'s default; the best one if none does; at most 100), the distance (largest of the four xyxy
coordinates, in original-image pixels) to the nearest box of the exported file's queries (nearest, because two
runtimes may order near-tied queries differently), and the score difference of that pair.

A target passes when ΔmAP <= its threshold: 0.1 points for float32, 0.5 for float16 and int8 (`max_map_drop`
replaces both).

Data (`load_verification_data`):
- "synthetic" or "synthetic:N" or "synthetic:N:SIZE": N (default 64) images of SIZE (default 128) pixels from the
  built-in shapes generator (`synthetic.py`, seed 1234, so not the demo's training or validation images);
- a COCO folder (annotations.json, or the one json file in it, and images/) or an annotation json file;
- a `datasets` dataset with the `objects` column: a folder written by `save_to_disk`, or a Hub id with an optional
  split, "NAME" or "NAME:SPLIT" (default split "validation").
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .file_io import owned_file

DEFAULT_THRESHOLDS = {"fp32": 0.1, "fp16": 0.5, "int8": 0.5}  # ΔmAP in points
MAX_QUERIES_COMPARED = 100
DETECTION_THRESHOLD = 0.3  # the queries whose boxes are compared: what a deployment keeps
TOP_K = 100
CARD_START = "<!-- align-detr export certificate: start -->"
CARD_END = "<!-- align-detr export certificate: end -->"


# --------------------------------------------------------------------------------------------------------- data


SYNTHETIC_SEED = 1234  # verification images; calibration draws from another seed


def load_verification_data(spec: str, limit: int | None = None, seed: int = SYNTHETIC_SEED):
    """A `DetectionDataset` (original images, no transforms) from a data spec (see the module docstring); `seed`
    draws the synthetic images."""
    from .data import load_coco_folder, load_hf_dataset

    spec = str(spec)
    if spec == "synthetic" or spec.startswith("synthetic:"):
        dataset = _synthetic(spec, seed)
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".json":
            dataset = load_coco_folder(path)
        elif path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                split = "validation" if "validation" in loaded else next(iter(loaded))
                loaded = loaded[split]
            dataset = load_hf_dataset(loaded)
        elif path.is_dir():
            dataset = load_coco_folder(_annotation_file(path))
        elif path.exists() or spec.startswith((".", "/", "~")):
            raise ValueError(f"verification data {spec}: expected a COCO folder, an annotation .json file, a saved "
                             "`datasets` folder, a Hub dataset id or 'synthetic[:N[:SIZE]]'.")
        else:
            dataset = _hub_dataset(spec)
    if len(dataset) == 0:
        raise ValueError(f"verification data {spec} holds no images.")
    if limit is not None:
        dataset = dataset.subset(range(min(limit, len(dataset))))
    return dataset


def _synthetic(spec: str, seed: int):
    from .data import load_coco_folder
    from .synthetic import generate_shapes_dataset

    parts = spec.split(":")[1:]
    try:
        count = int(parts[0]) if parts and parts[0] else 64
        size = int(parts[1]) if len(parts) > 1 else 128
    except ValueError as error:
        raise ValueError(f"verification data {spec}: use synthetic, synthetic:N or synthetic:N:SIZE.") from error
    if count < 1 or size < 64 or len(parts) > 2:
        raise ValueError(f"verification data {spec}: N must be at least 1 and SIZE at least 64.")
    folder = Path(tempfile.mkdtemp(prefix="align_detr_verify_"))
    return load_coco_folder(generate_shapes_dataset(folder, count, size, seed=seed))


def _annotation_file(folder: Path) -> Path:
    for name in ("annotations.json", "instances.json", "_annotations.coco.json"):
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(folder.glob("*.json")) or sorted((folder / "annotations").glob("*.json"))
    if len(candidates) != 1:
        raise ValueError(
            f"verification data {folder}: found {len(candidates)} annotation .json files; pass the one to use."
        )
    return candidates[0]


def _hub_dataset(spec: str):
    import datasets

    from .data import load_hf_dataset

    name, _, split = spec.partition(":")
    try:
        loaded = datasets.load_dataset(name, split=split or "validation")
    except Exception as error:  # offline, missing, or no such split: one line naming the spec
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"verification data {spec}: could not load it as a `datasets` dataset ({first}).") from error
    return load_hf_dataset(loaded)


def processed_batches(dataset, processor, batch_size: int):
    """(image_ids, original sizes, pixel_values, pixel_mask) per batch, through the image processor."""
    for start in range(0, len(dataset), batch_size):
        indices = range(start, min(start + batch_size, len(dataset)))
        images = [dataset.load_image(i) for i in indices]
        inputs = processor(images=images, return_tensors="pt")
        ids = [int(dataset.records[i]["image_id"]) for i in indices]
        sizes = [(image.height, image.width) for image in images]
        yield ids, sizes, inputs["pixel_values"], inputs["pixel_mask"]


def calibration_batches(dataset, processor, batch_size: int = 4, with_postprocess: bool = False) -> list[dict]:
    """Graph inputs for int8 calibration, one dict per batch."""
    batches = []
    for _, sizes, pixel_values, pixel_mask in processed_batches(dataset, processor, batch_size):
        batch = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if with_postprocess:
            batch["target_sizes"] = torch.tensor(sizes, dtype=torch.float32)
        batches.append(batch)
    return batches


# -------------------------------------------------------------------------------------------------- certificate


@dataclass
class TargetResult:
    name: str
    file: str
    runtime: str
    precision: str
    threshold_points: float
    metrics: dict = field(default_factory=dict)
    delta_map_points: float = math.nan
    max_box_diff_px: float = 0.0
    max_score_diff: float = 0.0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.delta_map_points <= self.threshold_points


class _Comparison:
    """Running maxima of the per-box and score differences of one target against eager."""

    def __init__(self):
        self.max_box, self.max_score = 0.0, 0.0

    def update(self, eager_logits, eager_boxes, logits, boxes, sizes):
        for image, (height, width) in enumerate(sizes):
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            eager_scores = eager_logits[image].float().sigmoid().amax(-1)
            top = eager_scores.topk(min(MAX_QUERIES_COMPARED, eager_scores.numel())).indices
            kept = eager_scores[top] >= DETECTION_THRESHOLD
            top = top[kept] if kept.any() else top[:1]
            reference = _xyxy(eager_boxes[image, top].float()) * scale
            candidates = _xyxy(boxes[image].float()) * scale
            distance = (reference[:, None, :] - candidates[None, :, :]).abs().amax(-1)  # (top, Q)
            nearest = distance.argmin(1)
            scores = logits[image].float().sigmoid().amax(-1)
            self.max_box = max(self.max_box, float(distance.gather(1, nearest[:, None]).max()))
            self.max_score = max(self.max_score, float((eager_scores[top] - scores[nearest]).abs().max()))


def _xyxy(boxes):
    from .box_ops import box_cxcywh_to_xyxy

    return box_cxcywh_to_xyxy(boxes)


def _precision(detector) -> str:
    return detector.metadata.get("precision") or ("fp16" if detector.session.float_dtype() == np.float16 else "fp32")


def certify(model, processor, dataset, targets: dict, batch_size: int = 4, max_map_drop: float | None = None,
            threads: int | None = None, data_name: str = "") -> dict:
    """Eager vs each exported file (`targets`: name -> path, runtime by suffix or by a name starting "openvino")."""
    from .evaluation import CocoEvaluator
    from .export_runtime import ExportedDetector

    if max_map_drop is not None and not (math.isfinite(max_map_drop) and max_map_drop >= 0):
        raise ValueError(f"the ΔmAP threshold must be a non-negative number of points, got {max_map_drop}.")
    ground_truth = dataset.coco_ground_truth()
    detectors, results = {}, {}
    for name, path in targets.items():
        runtime = "openvino" if name.startswith("openvino") else None
        detectors[name] = ExportedDetector(path, runtime=runtime, threads=threads)
        precision = _precision(detectors[name])
        threshold = DEFAULT_THRESHOLDS[precision] if max_map_drop is None else max_map_drop
        results[name] = TargetResult(name, str(path), detectors[name].runtime, precision, threshold)
    evaluators = {name: CocoEvaluator(ground_truth, unknown_labels="ignore") for name in ["eager", *targets]}
    comparisons = {name: _Comparison() for name in targets}
    eager_seconds = 0.0
    was_training = model.training
    model.eval()
    try:
        for ids, sizes, pixel_values, pixel_mask in processed_batches(dataset, processor, batch_size):
            start = time.perf_counter()
            with torch.no_grad():
                outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            eager_seconds += time.perf_counter() - start
            eager_logits, eager_boxes = outputs.logits, outputs.pred_boxes
            evaluators["eager"].update(ids, _post_process(processor, eager_logits, eager_boxes, sizes))
            for name, detector in detectors.items():
                start = time.perf_counter()
                target_sizes = torch.tensor(sizes) if detector.with_postprocess else None
                exported = detector(pixel_values, pixel_mask, target_sizes)
                results[name].seconds += time.perf_counter() - start
                logits, boxes = torch.from_numpy(exported["logits"]), torch.from_numpy(exported["pred_boxes"])
                evaluators[name].update(ids, _post_process(processor, logits, boxes, sizes))
                comparisons[name].update(eager_logits, eager_boxes, logits, boxes, sizes)
    finally:
        model.train(was_training)
    eager_metrics = _metrics(evaluators["eager"])
    for name, result in results.items():
        result.metrics = _metrics(evaluators[name])
        result.delta_map_points = round(abs(result.metrics["map"] - eager_metrics["map"]) * 100, 3)
        result.max_box_diff_px = float(f"{comparisons[name].max_box:.3g}")
        result.max_score_diff = float(f"{comparisons[name].max_score:.3g}")
        result.seconds = round(result.seconds, 2)
    return {
        "data": data_name,
        "images": len(dataset),
        "batch_size": batch_size,
        "eager": {"metrics": eager_metrics, "seconds": round(eager_seconds, 2)},
        "targets": [dict(asdict(result), passed=result.passed) for result in results.values()],
        "passed": all(result.passed for result in results.values()),
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _post_process(processor, logits, boxes, sizes):
    return processor.post_process_object_detection(
        {"logits": logits.float(), "pred_boxes": boxes.float()}, threshold=0.0, target_sizes=sizes, top_k=TOP_K
    )


def _metrics(evaluator) -> dict:
    summary = evaluator.compute()
    return {key: round(float(summary[key]), 4) for key in ("map", "map_50", "map_75")}


# ---------------------------------------------------------------------------------------------------- the report


def render_certificate(report: dict) -> str:
    """The report as a Markdown section (for the .md file and the model card)."""
    eager = report["eager"]["metrics"]
    lines = [
        "## Export certificate",
        "",
        f"Eager PyTorch vs each exported file on {report['data']} ({report['images']} images, batch "
        f"{report['batch_size']}), the same image processor and post-processing (top {TOP_K}, threshold 0), COCO "
        f"box metrics. ΔmAP = |exported - eager| in points; largest box and score differences: each image's eager "
        f"detections (score >= {DETECTION_THRESHOLD}, at most {MAX_QUERIES_COMPARED}; the best one if none) against "
        f"the nearest exported box, in original-image pixels. Written {report['written']}.",
        "",
        "| target | file | runtime | precision | mAP | AP50 | AP75 | ΔmAP (points) | threshold | largest box "
        "difference (px) | largest score difference | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| eager PyTorch | | torch | fp32 | {_pct(eager['map'])} | {_pct(eager['map_50'])} | "
        f"{_pct(eager['map_75'])} | | | | | reference |",
    ]
    for target in report["targets"]:
        metrics = target["metrics"]
        lines.append(
            f"| {target['name']} | {Path(target['file']).name} | {target['runtime']} | {target['precision']} | "
            f"{_pct(metrics['map'])} | {_pct(metrics['map_50'])} | {_pct(metrics['map_75'])} | "
            f"{target['delta_map_points']:.2f} | {target['threshold_points']:g} | {target['max_box_diff_px']:.3g} | "
            f"{target['max_score_diff']:.3g} | {'pass' if target['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{value * 100:.1f}"


def certificate_paths(model_file) -> tuple[Path, Path, Path]:
    """(json, md, model card) beside the exported file `model_file`."""
    path = Path(model_file)
    return path.with_suffix(".certificate.json"), path.with_suffix(".certificate.md"), path.parent / "README.md"


def write_certificate(report: dict, model_file, overwrite: bool = False, inputs: Iterable = ()) -> list[Path]:
    """Write the report beside `model_file` (.certificate.json, .certificate.md) and as a section of the folder's
    model card (README.md: created if absent; otherwise only the section between the certificate markers is
    replaced, or appended, and the rest of the card is kept as it is).

    The ownership rule (`file_io`) holds for all three, the card included: each may replace only a file an earlier
    export wrote and nobody changed since, unless `overwrite`; never one of `inputs` (the model's files). All three
    are checked before any is written."""
    from .export_align_detr import WRITER, _check_output_path

    paths = certificate_paths(model_file)
    for path in paths:
        _check_output_path(path, inputs, overwrite)
    json_path, md_path, card = paths
    section = render_certificate(report)
    texts = {json_path: json.dumps(report, indent=2) + "\n", md_path: section + "\n",
             card: _card(card, section, model_file)}
    for path, text in texts.items():
        with owned_file(path, WRITER, overwrite=overwrite, inputs=inputs) as temp:
            temp.write_text(text, encoding="utf-8")
    return list(paths)


def _card(card: Path, section: str, model_file) -> str:
    """The model card with `section` between the certificate markers (replaced, or appended; a new card if none)."""
    block = f"{CARD_START}\n{section}\n{CARD_END}"
    if not card.is_file():
        return f"# {Path(model_file).stem}: exported Align-DETR\n\n{block}\n"
    text = card.read_text(encoding="utf-8")
    if CARD_START in text and CARD_END in text and text.index(CARD_START) < text.index(CARD_END):
        head, rest = text.split(CARD_START, 1)
        return head + block + rest.split(CARD_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def failures(report: dict) -> list[str]:
    """One line per target over its threshold."""
    return [
        f"{t['name']} ({Path(t['file']).name}): ΔmAP {t['delta_map_points']:.2f} points > {t['threshold_points']:g}"
        for t in report["targets"] if not t["passed"]
    ]
