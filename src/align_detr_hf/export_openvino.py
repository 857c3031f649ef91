"""OpenVINO, a second CPU runtime for exported Align-DETR models (the optional extra `align-detr-hf[openvino]`).

    export_openvino(model, "model.xml")              # transformers' OpenVINOExporter: the PyTorch model -> IR
    onnx_to_openvino("model.int8.onnx", "model.int8.xml")   # an exported ONNX file (the int8 QDQ one too) -> IR

An OpenVINO IR is a `.xml` graph with its `.bin` weights beside it; both are written through temporary siblings and
renamed into place, the `.bin` first, under the ownership rule (`file_io`: each may replace only a file an earlier
export wrote and nobody changed since, unless `overwrite`; never an input). Inputs, outputs and the exported size
range are those of the ONNX export (`export_align_detr.py`); the range and the labels are stored in the IR's
`rt_info` for `ExportedDetector`. int8: OpenVINO reads the QuantizeLinear/DequantizeLinear pairs of `quantize.py`'s
file and runs those layers in int8, the rest in float32 (`ExportedDetector` asks for f32 inference precision, not
the bf16 of AMX CPUs).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .export_runtime import METADATA_KEY, read_metadata
from .file_io import owned_file


def _check_openvino():
    try:
        import openvino
    except ImportError as error:
        raise ImportError(
            "OpenVINO is not installed: pip install 'align-detr-hf[openvino]' (openvino, no torch)."
        ) from error
    return openvino


def _ir_paths(output, inputs: Iterable, overwrite: bool) -> tuple[Path, Path]:
    """(the .xml, its .bin), both checked against the ownership rule before any work."""
    from .export_align_detr import _check_output_path

    path = Path(output).expanduser()
    if path.suffix != ".xml":
        raise ValueError(f"an OpenVINO model is written as a .xml file (with its .bin beside it), got {path}.")
    return _check_output_path(path, inputs, overwrite), _check_output_path(path.with_suffix(".bin"), inputs, overwrite)


def _save_ir(ov_model, output, metadata: dict, inputs: Iterable, overwrite: bool) -> Path:
    """Write `ov_model` as `output` (.xml) + .bin, each via a temporary sibling renamed into place (the .bin
    first) and recorded as this export's."""
    from .export_align_detr import WRITER

    openvino = _check_openvino()
    xml, weights = _ir_paths(output, inputs, overwrite)
    ov_model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=f".{xml.stem}.") as staging:
        staged = Path(staging) / "model.xml"
        openvino.save_model(ov_model, str(staged), compress_to_fp16=False)
        # OpenVINO reads the .bin of the .xml's name; the .xml does not name it, so both may be renamed
        with owned_file(xml, WRITER, overwrite=overwrite, inputs=inputs) as xml_temp:
            with owned_file(weights, WRITER, overwrite=overwrite, inputs=inputs) as bin_temp:
                os.replace(staged.with_suffix(".bin"), bin_temp)
            os.replace(staged, xml_temp)
    return xml


def onnx_to_openvino(onnx_path, output, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """Convert an exported ONNX file (float32, float16 or int8 QDQ) to an OpenVINO IR at `output` (.xml).
    `overwrite` and `inputs` (besides `onnx_path`): the ownership rule, see the module docstring."""
    openvino = _check_openvino()
    inputs = (Path(onnx_path), *inputs)
    _ir_paths(output, inputs, overwrite)  # before the conversion
    ov_model = openvino.convert_model(str(onnx_path))
    return _save_ir(ov_model, output, read_metadata(onnx_path), inputs, overwrite)


def export_openvino(model, output, with_postprocess: bool = False, top_k: int | None = None,
                    overwrite: bool = False) -> Path:
    """Export the detector with transformers' `OpenVINOExporter` to an OpenVINO IR at `output` (.xml); `overwrite`:
    the ownership rule, see the module docstring (the model's folder is an input)."""
    _check_openvino()
    from transformers.exporters import OpenVINOExporter

    from .export_align_detr import DEFAULT_TOP_K, _export, export_metadata, model_inputs

    inputs = model_inputs(model)
    _ir_paths(output, inputs, overwrite)  # before the export

    top_k = DEFAULT_TOP_K if top_k is None else top_k
    program, _ = _export(OpenVINOExporter, model, "openvino", with_postprocess, top_k, None)
    return _save_ir(program, output, export_metadata(model, with_postprocess, top_k, "fp32"), inputs, overwrite)
