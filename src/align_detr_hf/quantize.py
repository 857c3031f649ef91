"""int8 static quantization of an exported Align-DETR ONNX file, calibrated on images, for CPU runtimes.

    quantize_onnx("model.onnx", "model.int8.onnx", calibration)   # calibration: dicts of graph inputs (torch/numpy)

transformers' `OnnxRuntimeQuantizer` (ONNX Runtime's `quantize_static`, QDQ format) does the work; this module
chooses what it quantizes. Quantized (int8 weights per output channel, uint8 activations calibrated by their
min/max over the calibration images): the convolutions and the linear layers that carry features (backbone, neck,
value and output projections, feed-forward layers, self-attention projections). Kept in float, because small errors
there move boxes or reorder queries:
- the sampling offsets and attention weights of every deformable attention (where the sampling points land and how
  they are mixed), and the sampling itself (GridSample);
- softmax, layer norm and group norm, and the attention products (activation x activation matmuls);
- the box heads (encoder proposals, decoder refinement), the reference-point head, the encoder's proposal scoring
  (`enc_output`, `enc_score_head`, which pick the queries) and the class head.
`FLOAT_MODULES` lists them by parameter name; `nodes_to_quantize` finds the graph's nodes through their weights.

The same QDQ file runs int8 on ONNX Runtime and, converted, on OpenVINO (`export_openvino.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .export_align_detr import WRITER, _check_output_path, set_metadata
from .file_io import owned_file

# parameter-name parts of the layers kept in float (see the module docstring)
FLOAT_MODULES = (
    "sampling_offsets",
    "attention_weights",
    "bbox_embed",
    "enc_bbox_head",
    "reference_points_head",
    "enc_output",
    "enc_score_head",
    "class_embed",
)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# nodes between a weight initializer and the op that reads it
_PASS_THROUGH = ("Transpose", "Identity", "Cast", "Reshape")


def fold_weight_transposes(onnx_model) -> None:
    """Replace each Transpose of an initializer (how the exporter writes `linear`) by a transposed initializer named
    `<weight>.T`, so the quantizer sees the weight as a constant (quantized once, per channel) and keeps its name."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in onnx_model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in onnx_model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    kept = []
    for node in onnx_model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in initializers:
            weight = numpy_helper.to_array(initializers[node.input[0]])
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded = numpy_helper.from_array(np.ascontiguousarray(np.transpose(weight, perm)), node.output[0])
            onnx_model.graph.initializer.append(folded)
            # readable: the folded weight carries the parameter's name
            _rename_value(onnx_model, node.output[0], f"{node.input[0]}.T")
            consumers[node.input[0]] -= 1
            continue
        kept.append(node)
    del onnx_model.graph.node[:]
    onnx_model.graph.node.extend(kept)
    unused = {name for name, count in consumers.items() if count == 0 and name in initializers}
    remaining = [init for init in onnx_model.graph.initializer if init.name not in unused]
    del onnx_model.graph.initializer[:]
    onnx_model.graph.initializer.extend(remaining)


def _rename_value(onnx_model, old: str, new: str) -> None:
    for init in onnx_model.graph.initializer:
        if init.name == old:
            init.name = new
    for node in onnx_model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for info in onnx_model.graph.value_info:
        if info.name == old:
            info.name = new


def _weight_name(node, producers: dict, initializers: set) -> str | None:
    """The initializer a Conv/MatMul/Gemm multiplies by (its second input), followed through pass-through nodes."""
    if len(node.input) < 2:
        return None
    name = node.input[1]
    for _ in range(4):
        if name in initializers:
            return name
        producer = producers.get(name)
        if producer is None or producer.op_type not in _PASS_THROUGH:
            return None
        name = producer.input[0]
    return None


def nodes_to_quantize(onnx_model) -> list[str]:
    """Names of the Conv/MatMul/Gemm nodes whose weight is a parameter outside `FLOAT_MODULES`."""
    initializers = {init.name for init in onnx_model.graph.initializer}
    producers = {output: node for node in onnx_model.graph.node for output in node.output}
    names = []
    for node in onnx_model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weight = _weight_name(node, producers, initializers)
        if weight is not None and not any(part in weight for part in FLOAT_MODULES):
            names.append(node.name)
    return names


def int8_quantizer(calibration: Iterable[dict]):
    """transformers' `OnnxRuntimeQuantizer` set up for Align-DETR: static QDQ, uint8 activations (min/max
    calibrated on `calibration`), int8 weights per output channel; `nodes_to_quantize` is filled in per graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from transformers.exporters import OnnxRuntimeQuantizer, OnnxRuntimeStaticConfig

    class AlignDetrStaticQuantizer(OnnxRuntimeQuantizer):
        def quantize(self, model, sample_inputs, export_format):
            import onnx_ir
            from onnx_ir.passes.common import LiftConstantsToInitializersPass

            LiftConstantsToInitializersPass()(model)  # constant biases as initializers, which QDQ quantizes
            proto = onnx_ir.to_proto(model)
            fold_weight_transposes(proto)
            self.config.nodes_to_quantize = nodes_to_quantize(proto)
            with _quiet_root_logger():  # onnxruntime.quantization logs its notes on the root logger
                return super().quantize(onnx_ir.from_proto(proto), sample_inputs, export_format)

    config = OnnxRuntimeStaticConfig(
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        calibration_providers=["CPUExecutionProvider"],
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
    )
    return AlignDetrStaticQuantizer(config, calibration_dataset=list(calibration))


@contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_onnx(model_path, output, calibration: Iterable[dict], overwrite: bool = False,
                  inputs: Iterable = ()) -> Path:
    """Write an int8 copy of the float32 ONNX file `model_path` at `output` (atomically), calibrated on the graph
    inputs in `calibration` (one dict per batch, as the image processor makes them).

    `output` follows the ownership rule (`file_io`): it may replace only an int8 file an earlier export wrote and
    nobody changed since, unless `overwrite`; never `model_path` nor any of `inputs` (the model's files)."""
    import onnx
    import onnx_ir

    inputs = (Path(model_path), *inputs)
    path = _check_output_path(output, inputs, overwrite)  # before the (slow) calibration
    calibration = list(calibration)
    if not calibration:
        raise ValueError("int8 quantization needs at least one calibration batch (images from --calibrate).")
    source = onnx.load(str(model_path))
    metadata = {entry.key: entry.value for entry in source.metadata_props}
    if "align_detr" in metadata and json.loads(metadata["align_detr"]).get("precision") != "fp32":
        raise ValueError(f"{model_path} is not a float32 export; int8 quantization starts from the float32 file.")
    quantized = int8_quantizer(calibration).quantize(onnx_ir.from_proto(source), calibration[0], "onnx")
    proto = onnx_ir.to_proto(quantized)
    if "align_detr" in metadata:
        set_metadata(proto, {**json.loads(metadata["align_detr"]), "precision": "int8"})
    onnx.checker.check_model(proto)
    with owned_file(path, WRITER, overwrite=overwrite, inputs=inputs) as temp:
        temp.write_bytes(proto.SerializeToString())
    return path
