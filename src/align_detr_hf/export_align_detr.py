"""Export Align-DETR for deployment through transformers' exporters (`transformers.exporters`, transformers >= 5.25):
ONNX (ONNX Runtime, TensorRT), OpenVINO (`export_openvino.py`) and torch.export (ExecuTorch, AOTInductor).

    export_onnx(model, "model.onnx")            # or: align-detr export --model DIR_OR_HUB_ID --output model.onnx
    program = export_program(model)              # a torch.export.ExportedProgram

The model also exports through transformers' own API, with the dynamic shapes and settings `export_config` gives:

    from transformers.exporters import OnnxExporter
    exported = OnnxExporter().export(model, dict(processor(images, return_tensors="pt")), export_config(model))
    exported.save_pretrained("exported")         # model.onnx, export.json, config.json
    outputs = exported(**inputs)                 # an AlignDetrObjectDetectionOutput, run by ONNX Runtime

`export_onnx` is that call with Align-DETR's deployment contract: one .onnx file whose inputs and outputs are named
below (the full model output also holds every decoder layer's predictions, which deployment does not need).

Graph contract (both exports):
    inputs   pixel_values  (B, 3, H, W) float32 (float16 with fp16): normalised, zero-padded bottom/right
             pixel_mask    (B, H, W) int64: 1 for real pixels, 0 for padding (a top-left rectangle per image)
             target_sizes  (B, 2) float32, (height, width) of each original image: only with_postprocess
    outputs  logits        (B, Q, C): class logits of the last decoder layer (sigmoid gives scores)
             pred_boxes    (B, Q, 4): sigmoid cxcywh relative to the unpadded image
             scores (B, K), labels (B, K) int64, boxes (B, K, 4) xyxy in original-image pixels: only
             with_postprocess; the image processor's `post_process_object_detection` before its threshold
             (sigmoid over all Q x C pairs, top-K, clamped to the image), K = min(top_k, Q * C)
B, H and W are dynamic: B >= 1 and H, W from `min_side(config)` to 8192 pixels (65 for ResNet, where the coarsest
feature level, stride 64, has more than one cell; 96 for ConvNeXt, which rounds sizes down; 32 x window + 1 for
Swin, where every stage has more than one attention window; `export_backbones.py`). The ExportedProgram checks the
range; the ONNX graph cannot check anything, so `export_runtime.ExportedDetector` (the documented runner) does,
before running it: sizes in the range, a pixel_mask of pixel_values' (B, H, W) holding a top-left rectangle of
ones in each image (the checks of eager PyTorch), target_sizes of any real or integer dtype (cast to float32, the
graph's type). Fed directly, the graph runs on a mask of another size or one without real pixels and returns
finite numbers that mean nothing.

Feeding the graph, what `AlignDetrImageProcessor` does (so a consumer needs no Python):
    1. RGB, channels first.
    2. Keep-ratio resize, bilinear: scale s = min(800 / short side, 1333 / long side), each side int(side * s + 0.5)
       (`size` of the saved preprocessor_config.json).
    3. (pixel - mean) / std per channel on the 0-255 scale: mean (123.675, 116.28, 103.53), std (58.395, 57.12,
       57.375).
    4. Batch: zero-pad every image at the bottom/right to the largest H and W; pixel_mask is 1 on each image's own
       area, 0 on the padding.
    5. target_sizes = the original (height, width) of each image, for with_postprocess; keep scores above your
       threshold.

The deformable attention is exported as standard ops (GridSample, opset >= 16): the Triton kernel and the CPU gather
path are switched off while exporting (`ms_deform_attn`). The exporter is PyTorch's torch.export-based one, driven by
transformers' `OnnxExporter` / `DynamoExporter`. The deprecated TorchScript tracer records Python decisions on
sizes as constants (the query count min(num_queries, encoder positions), size-1 feature maps): traced at 96x128 it
gave logits off by up to 0.4 on 64x64 inputs without an error; the graph from torch.export matches eager there.

A model in training mode is exported in eval mode (inference has no denoising queries and no loss): a warning
says so, and the model's own mode is restored afterwards.
"""

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .export_backbones import MAX_SIDE, check_backbone_exportable, min_side
from .file_io import claim_output, model_input_folders, owned_file
from .ms_deform_attn import custom_kernels_disabled

INPUT_NAMES = ("pixel_values", "pixel_mask")
POSTPROCESS_INPUT_NAMES = ("target_sizes",)
OUTPUT_NAMES = ("logits", "pred_boxes")
POSTPROCESS_OUTPUT_NAMES = ("scores", "labels", "boxes")
# torch.onnx's torch.export-based exporter writes opset 18 and newer; GridSample itself needs 16
MIN_OPSET = 18
DEFAULT_OPSET = 18
DEFAULT_TOP_K = 300
MAX_BATCH = 1024
# the example input the graph is traced with; other sizes and batches run because the dimensions are dynamic
EXAMPLE_BATCH = 2


class AlignDetrExportWrapper(nn.Module):
    """The detector as a function of tensors only: {logits, pred_boxes} and, with top_k, the detections."""

    def __init__(self, model: nn.Module, top_k: int | None = None):
        super().__init__()
        self.model = model
        self.top_k = top_k
        self.config = model.config  # what transformers' exporters record in the export's metadata

    def forward(self, pixel_values, pixel_mask, target_sizes=None):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, return_dict=True)
        result = {"logits": outputs.logits, "pred_boxes": outputs.pred_boxes}
        if self.top_k is not None:
            detections = top_k_detections(outputs.logits, outputs.pred_boxes, target_sizes, self.top_k)
            result.update(zip(POSTPROCESS_OUTPUT_NAMES, detections))
        return result


def top_k_detections(logits, pred_boxes, target_sizes, top_k: int):
    """The image processor's `post_process_object_detection` without the threshold, as tensor ops:
    (scores (B, K), labels (B, K), boxes (B, K, 4) xyxy scaled to target_sizes (B, 2) = (height, width), clamped)."""
    num_classes = logits.shape[-1]
    probs = logits.float().sigmoid().flatten(1)
    scores, flat_index = probs.topk(min(top_k, logits.shape[1] * num_classes), dim=1)
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    boxes = box_cxcywh_to_xyxy(pred_boxes.float().gather(1, query_index[..., None].expand(-1, -1, 4)))
    sizes = target_sizes.to(boxes.dtype)
    scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=1)[:, None, :]
    boxes = torch.minimum((boxes * scale).clamp(min=0), scale)
    return scores, labels, boxes


def example_inputs(model: nn.Module, with_postprocess: bool = False, batch: int = EXAMPLE_BATCH,
                   height: int | None = None, width: int | None = None) -> dict[str, torch.Tensor]:
    """Inputs of the graph's names and dtypes on the model's device; the last image is partly padding, so the mask
    matters. The default size is a little above the model's smallest exportable side."""
    parameter = next(model.parameters())
    side = min_side(model.config)
    height = height or max(256, side + 31)
    width = width or max(320, side + 95)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator).to(parameter.device, parameter.dtype)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=parameter.device)
    pixel_mask[-1, height * 3 // 4 :, :] = 0
    inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    if with_postprocess:
        inputs["target_sizes"] = torch.tensor([[480.0, 640.0]] * batch, device=parameter.device)
    return inputs


def dynamic_shapes(model: nn.Module, with_postprocess: bool = False) -> dict:
    """torch.export's `dynamic_shapes` for the graph inputs: batch, height and width, in the model's exportable
    range (`min_side`)."""
    side = min_side(model.config)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=side, max=MAX_SIDE)
    width = torch.export.Dim("width", min=side, max=MAX_SIDE)
    shapes = {"pixel_values": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width}}
    if with_postprocess:
        shapes["target_sizes"] = {0: batch}
    return shapes


def export_config(model: nn.Module, export_format: str = "onnx", with_postprocess: bool = False, **settings):
    """The `transformers.exporters` config that exports this model: its dynamic shapes, and deferred runtime
    asserts. `settings` go to the config (e.g. `quantizer=...`, `opset_version=...`).

    Deferred asserts: torch's reshape rules ask questions such as "is this stage's window count 1?" that hold across
    the exported range (`min_side` makes every count at least 2) but that its solver cannot prove for symbolic
    sizes; as asserts they are checked when the ExportedProgram runs, instead of failing the export."""
    _require_exporters()
    from transformers.exporters import DynamoConfig, OnnxConfig, OpenVINOConfig

    check_exportable(model)
    config_class = {"onnx": OnnxConfig, "openvino": OpenVINOConfig, "dynamo": DynamoConfig}.get(export_format)
    if config_class is None:
        raise ValueError(f"export_format must be 'onnx', 'openvino' or 'dynamo', got {export_format!r}.")
    if export_format == "onnx":
        # onnxscript 0.7's optimizer left a node reading a value no node produces in this graph; ONNX Runtime and
        # OpenVINO optimise the graph themselves when they load it
        settings.setdefault("optimize", False)
    if export_format == "openvino":
        settings.setdefault("stateful", False)  # nothing round-trips between calls
    return config_class(
        dynamic_shapes=dynamic_shapes(model, with_postprocess),
        prefer_deferred_runtime_asserts_over_guards=True,
        **settings,
    )


def _require_exporters() -> None:
    import importlib.util

    import transformers

    if importlib.util.find_spec("transformers.exporters") is None:
        raise ImportError(
            f"exporting needs transformers >= 5.25 (transformers.exporters); transformers {transformers.__version__} "
            "is installed: pip install -U 'transformers>=5.25'."
        )


def check_exportable(model) -> None:
    """Raise a one-line ValueError when `model` cannot be exported (not Align-DETR, or a backbone family without a
    dynamic-size export): before any tracing."""
    from .modeling_align_detr import AlignDetrForObjectDetection

    if not isinstance(model, AlignDetrForObjectDetection):
        raise ValueError(
            f"export needs an AlignDetrForObjectDetection, got {type(model).__name__}: this exporter only knows "
            "Align-DETR's inputs and outputs."
        )
    check_backbone_exportable(model.config.backbone_config)


@contextmanager
def _inference_mode_for_export(model: nn.Module):
    """Eval mode (with a warning when the model was training) and no Triton kernel; restores the mode after."""
    was_training = model.training
    if was_training:
        warnings.warn(
            "the model is in training mode; it is exported in eval mode (no denoising queries, no loss). "
            "Its training mode is restored after the export.",
            UserWarning,
            stacklevel=4,
        )
    model.eval()
    try:
        with custom_kernels_disabled(), torch.no_grad(), warnings.catch_warnings():
            # torch's own deprecation notes while translating; transformers' note that its exporters are new
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        model.train(was_training)


def _export(exporter_class, model, export_format, with_postprocess, top_k, example, **settings):
    """One component exported by transformers' exporter: (the backend's program, its metadata)."""
    _require_exporters()
    check_exportable(model)
    if with_postprocess and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer of at least 1, got {top_k!r}.")
    wrapper = AlignDetrExportWrapper(model, top_k if with_postprocess else None)
    inputs = dict(example if example is not None else example_inputs(model, with_postprocess))
    config = export_config(model, export_format, with_postprocess, **settings)
    with _inference_mode_for_export(model), _quiet_transformers_exporters():
        exporter = exporter_class()
        return exporter.export_program(wrapper.eval(), inputs, config)


@contextmanager
def _quiet_transformers_exporters():
    """Keep the exporters' chatter out of the user's terminal: transformers' "experimental, version drift" note, the
    ONNX exporter's progress lines (printed) and its registry's notes on ops this model does not use. Errors still
    raise."""
    import contextlib
    import io
    import logging as std_logging

    from transformers.utils import logging

    level = logging.get_verbosity()
    registry = std_logging.getLogger("torch.onnx._internal.exporter._registration")
    registry_level = registry.level
    logging.set_verbosity_error()
    registry.setLevel(std_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.set_verbosity(level)
        registry.setLevel(registry_level)


def export_program(
    model: nn.Module,
    with_postprocess: bool = False,
    top_k: int = DEFAULT_TOP_K,
    example: dict[str, torch.Tensor] | None = None,
) -> torch.export.ExportedProgram:
    """`torch.export` the detector (transformers' `DynamoExporter`) with dynamic batch, height and width; the
    program's inputs and outputs follow the graph contract in this module's docstring (keyword inputs, a dict out)."""
    from transformers.exporters import DynamoExporter

    program, _ = _export(DynamoExporter, model, "dynamo", with_postprocess, top_k, example)
    return program


def _check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset {opset!r} is not supported: use {MIN_OPSET} to {newest}. GridSample (the deformable attention) "
            f"needs 16, PyTorch's torch.export-based ONNX exporter writes {MIN_OPSET} and newer, and the installed "
            f"onnx {onnx.__version__} knows up to {newest}."
        )


WRITER = "align-detr export"  # how exports are recorded in the output folder's manifest (file_io)


def model_inputs(model) -> tuple[Path, ...]:
    """The folder (and files) `model` was loaded from: inputs that no export output may replace (file_io)."""
    return model_input_folders(getattr(getattr(model, "config", None), "_name_or_path", None))


def _check_output_path(output, inputs, overwrite: bool) -> Path:
    """The ownership rule (file_io) for one output file: replace only an unchanged earlier export, never an input
    (the model's config, weights, code), never write into the model's folder unless `overwrite`."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name such as {path / 'model.onnx'}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent.resolve()} does not exist; create it first.")
    return claim_output(path, WRITER, overwrite=overwrite, inputs=inputs)


def export_onnx(
    model: nn.Module,
    output,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    with_postprocess: bool = False,
    top_k: int = DEFAULT_TOP_K,
    overwrite: bool = False,
) -> Path:
    """Write the detector as an ONNX file at `output` (atomically: a failed export leaves no file) and return its path.

    transformers' `OnnxExporter` traces it. `output` may replace only a file an earlier export wrote and nobody
    changed since, and may not lie in the folder the model was loaded from, unless `overwrite`; the model's own
    files (config, weights, code) are never replaced (checked before the export, and again before the file lands).

    fp16 exports a float16 copy of the model (float16 pixel_values, logits and pred_boxes; meant for GPU runtimes;
    ONNX Runtime's CPU provider runs it too, see tests/test_export.py).
    """
    from transformers.exporters import OnnxExporter

    check_exportable(model)
    _check_opset(opset)
    path = _check_output_path(output, model_inputs(model), overwrite)
    if fp16:
        model = copy.deepcopy(model).half()
    program, _ = _export(OnnxExporter, model, "onnx", with_postprocess, top_k, None, opset_version=opset)
    onnx_model = _to_proto(program)
    _name_dynamic_axes(onnx_model)
    _check_graph(onnx_model, with_postprocess)
    set_metadata(onnx_model, export_metadata(model, with_postprocess, top_k, "fp16" if fp16 else "fp32"))
    with owned_file(path, WRITER, overwrite=overwrite, inputs=model_inputs(model)) as temp:
        temp.write_bytes(onnx_model.SerializeToString())
    return path


def export_metadata(model, with_postprocess: bool, top_k: int, precision: str) -> dict:
    """What a runner needs to know about an exported file, stored in it (`export_runtime.read_metadata`)."""
    return {
        "min_side": min_side(model.config),
        "max_side": MAX_SIDE,
        "with_postprocess": with_postprocess,
        "top_k": top_k if with_postprocess else None,
        "precision": precision,
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
    }


def set_metadata(onnx_model, metadata: dict) -> None:
    """Store `metadata` as the ONNX model's `align_detr` metadata entry (replacing an older one)."""
    import json

    entries = [entry for entry in onnx_model.metadata_props if entry.key != "align_detr"]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(entries)
    entry = onnx_model.metadata_props.add()
    entry.key, entry.value = "align_detr", json.dumps(metadata)


def _to_proto(program):
    import onnx_ir

    return onnx_ir.to_proto(program)


def _name_dynamic_axes(onnx_model) -> None:
    """Readable names for the dynamic axes (the exporter writes symbols such as s35 and formulas of them).

    The queries axis is min(num_queries, encoder positions), the detections axis min(top_k, queries x classes)."""
    names = {
        "pixel_values": ("batch", None, "height", "width"),
        "pixel_mask": ("batch", "height", "width"),
        "target_sizes": ("batch", None),
        "logits": ("batch", "queries", None),
        "pred_boxes": ("batch", "queries", None),
        "scores": ("batch", "detections"),
        "labels": ("batch", "detections"),
        "boxes": ("batch", "detections", None),
    }
    for value in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim, names.get(value.name, ())):
            if name is not None and dim.HasField("dim_param"):
                dim.dim_param = name


def _check_graph(onnx_model, with_postprocess: bool) -> None:
    """Refuse to write a graph ONNX's checker rejects, one that still holds a non-standard op, or one whose inputs
    and outputs are not the contract's."""
    import onnx

    onnx.checker.check_model(onnx_model)
    custom = sorted({node.op_type for node in onnx_model.graph.node if node.domain not in ("", "ai.onnx")})
    if custom:
        raise RuntimeError(f"the exported graph holds non-standard ops {custom}; please report this.")
    inputs = [value.name for value in onnx_model.graph.input]
    outputs = [value.name for value in onnx_model.graph.output]
    expected_inputs = list(INPUT_NAMES + (POSTPROCESS_INPUT_NAMES if with_postprocess else ()))
    expected_outputs = list(OUTPUT_NAMES + (POSTPROCESS_OUTPUT_NAMES if with_postprocess else ()))
    if inputs != expected_inputs or outputs != expected_outputs:
        raise RuntimeError(
            f"the exported graph has inputs {inputs} and outputs {outputs}, expected {expected_inputs} and "
            f"{expected_outputs}; please report this."
        )
