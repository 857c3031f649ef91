"""Run an exported Align-DETR file (ONNX Runtime or OpenVINO) with the checks eager PyTorch makes.

    detector = ExportedDetector("model.onnx")              # or model.xml (OpenVINO), model.int8.onnx, ...
    outputs = detector(pixel_values, pixel_mask)            # {"logits": ..., "pred_boxes": ...} as numpy arrays
    detections = detector.detect(images, processor, threshold=0.3)   # the image processor's pre/post-processing

A graph cannot check its inputs: fed a pixel_mask of another size, or one without any real pixel, the exported graph
runs and returns finite numbers that mean nothing, where eager PyTorch raises. `ExportedDetector` refuses such
inputs with the eager model's own one-line messages (`modeling_align_detr._check_pixel_mask`), and also checks what
only the export limits: heights and widths inside the exported range (read from the file), and target_sizes of any
integer or real dtype (cast to float32, the graph's type). These are the checks the export contract in
`export_align_detr.py` documents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .export_align_detr import MAX_SIDE

# the export writes these into the file's metadata (ONNX metadata_props, OpenVINO rt_info)
METADATA_KEY = "align_detr"


def read_metadata(path) -> dict:
    """The export's own description, {"min_side", "max_side", "id2label", ...}, from an ONNX or OpenVINO file."""
    path = Path(path)
    if path.suffix == ".xml":
        import openvino

        model = openvino.Core().read_model(str(path))
        if model.has_rt_info([METADATA_KEY]):
            return json.loads(model.get_rt_info([METADATA_KEY]).astype(str))
        return {}
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entries = {entry.key: entry.value for entry in model.metadata_props}
    return json.loads(entries[METADATA_KEY]) if METADATA_KEY in entries else {}


class _OnnxRuntimeSession:
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int | None, providers: list | None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = providers or ["CPUExecutionProvider"]
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # e.g. a float16 op the CPU provider lacks: one line, naming the file
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"ONNX Runtime ({providers}) cannot run {path.name}: {first}") from error
        self.input_types = {value.name: value.type for value in self.session.get_inputs()}
        self.output_names = [value.name for value in self.session.get_outputs()]

    def float_dtype(self) -> np.dtype:
        return np.float16 if self.input_types["pixel_values"] == "tensor(float16)" else np.float32

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.output_names, self.session.run(None, feeds)))


class _OpenVINOSession:
    runtime = "openvino"

    def __init__(self, path: Path, threads: int | None, device: str = "CPU"):
        import openvino

        config = {"INFERENCE_PRECISION_HINT": "f32"}  # CPUs with AMX would otherwise run float parts in bf16
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = openvino.Core().compile_model(str(path), device, config)
        self.input_types = {port.any_name: str(port.get_element_type()) for port in self.compiled.inputs}
        self.output_names = [port.any_name for port in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def float_dtype(self) -> np.dtype:
        return np.float16 if self.input_types["pixel_values"] == "<Type: 'float16'>" else np.float32

    def run(self, feeds: dict) -> dict:
        results = self.request.infer(feeds)
        return {port.any_name: np.array(results[port]) for port in self.compiled.outputs}


def runtime_for(path) -> str:
    """"openvino" for an OpenVINO IR (.xml), "onnxruntime" for an .onnx file."""
    suffix = Path(path).suffix
    if suffix == ".xml":
        return "openvino"
    if suffix == ".onnx":
        return "onnxruntime"
    raise ValueError(f"{path}: not an exported model (expected a .onnx file or an OpenVINO .xml file).")


class ExportedDetector:
    """An exported Align-DETR file run by ONNX Runtime (.onnx) or OpenVINO (.xml, or `runtime="openvino"` on an .onnx
    file), with eager PyTorch's input checks. `threads`: intra-op threads (default: the runtime's own choice)."""

    def __init__(self, path, runtime: str | None = None, threads: int | None = None, providers: list | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"exported model {path} not found.")
        self.path = path
        self.runtime = runtime or runtime_for(path)
        if self.runtime == "onnxruntime":
            self.session = _OnnxRuntimeSession(path, threads, providers)
        elif self.runtime == "openvino":
            self.session = _OpenVINOSession(path, threads)
        else:
            raise ValueError(f"runtime must be 'onnxruntime' or 'openvino', got {self.runtime!r}.")
        self.metadata = read_metadata(path)
        self.min_side = int(self.metadata.get("min_side", 1))
        self.max_side = int(self.metadata.get("max_side", MAX_SIDE))
        self.with_postprocess = "target_sizes" in self.session.input_types

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, runtime={self.runtime!r})"

    def __call__(self, pixel_values, pixel_mask=None, target_sizes=None) -> dict[str, np.ndarray]:
        """The graph's outputs by name, after eager's checks (see the module docstring)."""
        return self.session.run(self.feeds(pixel_values, pixel_mask, target_sizes))

    def feeds(self, pixel_values, pixel_mask=None, target_sizes=None) -> dict[str, np.ndarray]:
        """The checked graph inputs; raises a one-line ValueError naming the problem."""
        from .modeling_align_detr import _check_inputs

        pixel_values = torch.as_tensor(np.asarray(pixel_values) if not torch.is_tensor(pixel_values) else pixel_values)
        if pixel_mask is not None and not torch.is_tensor(pixel_mask):
            pixel_mask = torch.as_tensor(np.asarray(pixel_mask))
        # eager's checks and messages: shape, dtype, a mask of pixel_values' size holding a top-left rectangle
        pixel_values, pixel_mask = _check_inputs(pixel_values, pixel_mask, pixel_values.dtype)
        batch, _, height, width = pixel_values.shape
        if not (self.min_side <= height <= self.max_side and self.min_side <= width <= self.max_side):
            raise ValueError(
                f"{self.path.name} takes heights and widths from {self.min_side} to {self.max_side} pixels, got "
                f"{height}x{width}; resize (the image processor makes 800+ pixels) or pad the batch."
            )
        feeds = {
            "pixel_values": pixel_values.detach().cpu().numpy().astype(self.session.float_dtype(), copy=False),
            "pixel_mask": pixel_mask.detach().cpu().numpy().astype(np.int64, copy=False),
        }
        if self.with_postprocess:
            feeds["target_sizes"] = _check_target_sizes(target_sizes, batch)
        elif target_sizes is not None:
            raise ValueError(
                f"{self.path.name} was exported without post-processing and takes no target_sizes; post-process "
                "its logits and pred_boxes with the image processor, or export with --with_postprocess."
            )
        return feeds

    def detect(self, images, processor, threshold: float = 0.3, top_k: int = 100) -> list[dict]:
        """Detections per image, through `processor` (the model's `AlignDetrImageProcessor`): the same pre- and
        post-processing as `processor` + the eager model. Returns the processor's dicts (torch tensors)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        inputs = processor(images=list(images), return_tensors="pt")
        sizes = [_original_size(image) for image in images]
        outputs = self(inputs["pixel_values"], inputs["pixel_mask"],
                       torch.tensor(sizes) if self.with_postprocess else None)
        return processor.post_process_object_detection(
            {"logits": torch.from_numpy(outputs["logits"]).float(),
             "pred_boxes": torch.from_numpy(outputs["pred_boxes"]).float()},
            threshold=threshold, target_sizes=sizes, top_k=top_k,
        )


def _original_size(image) -> tuple[int, int]:
    if hasattr(image, "height") and hasattr(image, "width") and not hasattr(image, "shape"):
        return int(image.height), int(image.width)
    array = np.asarray(image)
    # channels first (3, H, W) or last (H, W, 3), as the image processor accepts
    return (int(array.shape[1]), int(array.shape[2])) if array.shape[0] in (1, 3) else tuple(array.shape[:2])


def _check_target_sizes(target_sizes, batch: int) -> np.ndarray:
    if target_sizes is None:
        raise ValueError("this graph post-processes: give target_sizes, the (height, width) of each original image.")
    sizes = np.asarray(target_sizes.detach().cpu() if torch.is_tensor(target_sizes) else target_sizes)
    if sizes.shape != (batch, 2):
        raise ValueError(f"target_sizes must be (batch, 2) = ({batch}, 2), got shape {sizes.shape}.")
    if not (np.issubdtype(sizes.dtype, np.integer) or np.issubdtype(sizes.dtype, np.floating)):
        raise ValueError(f"target_sizes must hold numbers (integer or real), got dtype {sizes.dtype}.")
    sizes = sizes.astype(np.float32)
    if not np.isfinite(sizes).all() or (sizes <= 0).any():
        raise ValueError(f"target_sizes must be positive (height, width) pairs, got {sizes.tolist()}.")
    return sizes


def default_threads() -> int:
    """Threads for one runtime session: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
