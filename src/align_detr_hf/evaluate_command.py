"""`align-detr evaluate MODEL DATA`: COCO metrics and the report pictures of a detector on a data set.

DATA is one of:
- a COCO folder as [`align_detr_hf.data.load_coco_folder`] reads it: the annotation json itself, or a folder holding
  `annotations.json` (or a single `.json`), images in `images/` beside it or in `--images`;
- a `datasets` dataset saved with `save_to_disk` (the `objects` schema of [`align_detr_hf.data.load_hf_dataset`];
  for a `DatasetDict`, `--split`, by default validation, val or test, whichever it has);
- `synthetic`: the shapes images of [`align_detr_hf.synthetic`] (the demo's validation set: 100 images of 128 px,
  seed 10000), of the model's classes, generated in a temporary folder.

Classes are matched by name: the model may know more classes than the data (those are left out before the top-k),
but every class of the data must be one of the model's. The images go through the model's own image processor;
detections are scored by [`align_detr_hf.evaluation_streaming.StreamingCocoEvaluator`] (top-k per image, each image
matched as it comes: 36 bytes a detection for the metrics, plus the detections for the pictures; `backend` auto is
that compact evaluation, pycocotools' numbers to the last bit, or name a COCOeval) and drawn by
[`align_detr_hf.evaluation_report`].
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .data import DetectionDataset, load_coco_folder, load_hf_dataset
from .evaluation_report import check_report_folder, write_evaluation_report
from .evaluation_streaming import StreamingCocoEvaluator, evaluate_loader

__all__ = ["evaluate_detector", "evaluation_data"]

SYNTHETIC = "synthetic"
_DEFAULT_SPLITS = ("validation", "val", "test")


def _annotation_file(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = [path / "annotations.json"] if (path / "annotations.json").is_file() else sorted(path.glob("*.json"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates[:5]) or "none"
        raise ValueError(f"DATA {path}: expected a COCO annotation json, a folder with annotations.json (or one .json "
                         f"file; found: {found}), a datasets folder saved with save_to_disk, or 'synthetic'.")
    return candidates[0]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _hf_split(path: Path, split: str | None):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.Dataset):
        if split:
            raise ValueError(f"DATA {path} is a single dataset without splits; leave out --split {split}.")
        return loaded
    names = list(loaded)
    chosen = split or next((name for name in _DEFAULT_SPLITS if name in loaded), names[0] if len(names) == 1 else None)
    if chosen not in loaded:
        raise ValueError(f"DATA {path}: no split {chosen!r}; it has {', '.join(names)} (choose one with --split)."
                         if split else f"DATA {path} has the splits {', '.join(names)}; choose one with --split.")
    return loaded[chosen]


def check_data_source(data: str) -> None:
    """Fail fast (before the model is loaded) on a DATA that cannot be read."""
    if data == SYNTHETIC:
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"DATA {data}: no such file or folder (give a COCO folder or json, a datasets folder "
                                "saved with save_to_disk, or 'synthetic').")
    if not _is_saved_dataset(path):
        _annotation_file(path)


@contextmanager
def evaluation_data(data: str, model_labels: dict[int, str], split: str | None = None, images: str | None = None,
                    synthetic_images: int = 100, synthetic_image_size: int = 128, seed: int = 10_000):
    """Yield the [`DetectionDataset`] of DATA (see the module docstring); synthetic images live in a temporary
    folder for the duration of the block."""
    if data == SYNTHETIC:
        from .synthetic import SHAPE_CLASSES, generate_shapes_dataset

        names = [model_labels[i] for i in sorted(model_labels)]
        unknown = [name for name in names if name not in SHAPE_CLASSES]
        if unknown:
            raise ValueError(f"DATA synthetic has the shapes {', '.join(SHAPE_CLASSES)}; the model's classes "
                             f"{', '.join(unknown[:5])} are not among them (evaluate it on its own data).")
        with tempfile.TemporaryDirectory(prefix="align_detr_synthetic_") as folder:
            annotation = generate_shapes_dataset(folder, synthetic_images, synthetic_image_size, seed=seed,
                                                 classes=tuple(names))
            yield load_coco_folder(annotation)
        return
    path = Path(data).expanduser()
    if _is_saved_dataset(path):
        yield load_hf_dataset(_hf_split(path, split))
    else:
        yield load_coco_folder(_annotation_file(path), images)


def class_columns(model_labels: dict[int, str], data_labels: dict[int, str]) -> list[int] | None:
    """For each data class id 0..K-1, the model's logit column of that class (by name); None when they are the
    same classes in the same order. ValueError (one line) when a data class is not one of the model's."""
    model_labels = {int(k): str(v) for k, v in model_labels.items()}
    by_name = {name: i for i, name in model_labels.items()}
    missing = [name for name in data_labels.values() if name not in by_name]
    if missing:
        raise ValueError(f"the data's classes {', '.join(missing[:5])} are not classes of the model (which has "
                         f"{', '.join(list(by_name)[:10])}{', ...' if len(by_name) > 10 else ''}).")
    columns = [by_name[data_labels[i]] for i in sorted(data_labels)]
    return None if columns == list(range(len(model_labels))) else columns


class _DataClasses(torch.nn.Module):
    """The detector with its class columns picked and reordered into the data's class ids."""

    def __init__(self, model: torch.nn.Module, columns: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.tensor(columns), persistent=False)

    def forward(self, pixel_values, pixel_mask):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return SimpleNamespace(logits=outputs.logits[..., self.columns.to(outputs.logits.device)],
                               pred_boxes=outputs.pred_boxes)


class _Preprocess:
    """collate_fn: dataset indices -> the model processor's pixel_values/pixel_mask and the labels to score."""

    def __init__(self, dataset: DetectionDataset, processor: Any):
        self.dataset, self.processor = dataset, processor

    def __call__(self, indices: list[int]) -> dict:
        inputs = self.processor(images=[self.dataset.read_image(i) for i in indices], return_tensors="pt")
        records = [self.dataset.records[i] for i in indices]
        labels = [{"image_id": torch.tensor([r["image_id"]]), "orig_size": torch.tensor([r["height"], r["width"]])}
                  for r in records]
        return {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"], "labels": labels}


def evaluate_detector(
    model: torch.nn.Module, processor: Any, dataset: DetectionDataset, output_dir: str | Path, *,
    title: str = "model", batch_size: int = 8, num_workers: int = 0, top_k: int = 100, score_threshold: float = 0.3,
    num_worst: int = 8, backend: str = "auto", overwrite: bool = False, progress: Any = None,
) -> dict:
    """COCO metrics of `model` on `dataset` and the report of [`write_evaluation_report`] in `output_dir`.
    Returns {"metrics", "files", "num_images", "evaluator"} (the [`StreamingCocoEvaluator`], with the detections)."""
    check_report_folder(Path(output_dir), overwrite)
    columns = class_columns(model.config.id2label, dataset.id2label)
    scored = model if columns is None else _DataClasses(model, columns)
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(
        list(range(len(dataset))), batch_size=batch_size, collate_fn=_Preprocess(dataset, processor),
        num_workers=num_workers,
    )
    batches = ({**b, "pixel_values": b["pixel_values"].to(device), "pixel_mask": b["pixel_mask"].to(device)}
               for b in (progress(loader) if progress else loader))
    evaluator = evaluate_loader(scored, batches, StreamingCocoEvaluator(dataset.coco_ground_truth(), backend=backend),
                                top_k=top_k)
    files = write_evaluation_report(output_dir, evaluator, dataset, title=title, score_threshold=score_threshold,
                                    num_worst=num_worst, overwrite=overwrite)
    return {"metrics": evaluator.metrics, "files": {name: str(path) for name, path in files.items()},
            "num_images": len(dataset), "evaluator": evaluator}


def summary_line(result: dict) -> str:
    m = result["metrics"]
    return (f"COCO bbox mAP {m['map']:.4f}  AP50 {m['map_50']:.4f}  AP75 {m['map_75']:.4f}  AR@100 {m['mar_100']:.4f}"
            f"  ({result['num_images']} images)")
