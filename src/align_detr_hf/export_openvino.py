"""OpenVINO, a second CPU runtime for exported Align-DETR models (the optional extra `align-detr-hf[openvino]`).

    export_openvino(model, "model.xml")              # transformers' OpenVINOExporter: the PyTorch model -> IR
    onnx_to_openvino("model.int8.onnx", "model.int8.xml")   # an exported ONNX file (the int8 QDQ one too) -> IR

An OpenVINO IR is a `.xml` graph with its `.bin` weights beside it; both are written through temporary siblings and
renamed into place, the `.bin` first. Inputs, outputs and the exported size range are those of the ONNX export
(`export_align_detr.py`); the range and the labels are stored in the IR's `rt_info` for `ExportedDetector`.
int8: OpenVINO reads the QuantizeLinear/DequantizeLinear pairs of `quantize.py`'s file and runs those layers in
int8, the rest in float32 (`ExportedDetector` asks for f32 inference precision, not the bf16 of AMX CPUs).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .export_runtime import METADATA_KEY, read_metadata


def _check_openvino():
    try:
        import openvino
    except ImportError as error:
        raise ImportError(
            "OpenVINO is not installed: pip install 'align-detr-hf[openvino]' (openvino, no torch)."
        ) from error
    return openvino


def _save_ir(ov_model, output, metadata: dict) -> Path:
    """Write `ov_model` as `output` (.xml) + .bin, each via a temporary sibling renamed into place."""
    openvino = _check_openvino()
    path = Path(output)
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is written as a .xml file (with its .bin beside it), got {path}.")
    ov_model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as staging:
        staged = Path(staging) / path.name
        openvino.save_model(ov_model, str(staged), compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)
    return path


def onnx_to_openvino(onnx_path, output) -> Path:
    """Convert an exported ONNX file (float32, float16 or int8 QDQ) to an OpenVINO IR at `output` (.xml)."""
    openvino = _check_openvino()
    ov_model = openvino.convert_model(str(onnx_path))
    return _save_ir(ov_model, output, read_metadata(onnx_path))


def export_openvino(model, output, with_postprocess: bool = False, top_k: int | None = None) -> Path:
    """Export the detector with transformers' `OpenVINOExporter` to an OpenVINO IR at `output` (.xml)."""
    _check_openvino()
    from transformers.exporters import OpenVINOExporter

    from .export_align_detr import DEFAULT_TOP_K, _export, export_metadata

    top_k = DEFAULT_TOP_K if top_k is None else top_k
    program, _ = _export(OpenVINOExporter, model, "openvino", with_postprocess, top_k, None)
    return _save_ir(program, output, export_metadata(model, with_postprocess, top_k, "fp32"))
