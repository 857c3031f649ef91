"""Export Align-DETR for deployment: ONNX (ONNX Runtime, TensorRT, OpenVINO) and torch.export (ExecuTorch, AOTInductor).

    export_onnx(model, "model.onnx")            # or: align-detr export --model DIR_OR_HUB_ID --output model.onnx
    program = export_program(model)              # a torch.export.ExportedProgram

Graph contract (both exports):
    inputs   pixel_values  (B, 3, H, W) float32 (float16 with fp16): normalised, zero-padded bottom/right
             pixel_mask    (B, H, W) int64: 1 for real pixels, 0 for padding
             target_sizes  (B, 2) float32, (height, width) of each original image: only with_postprocess
    outputs  logits        (B, Q, C): class logits of the last decoder layer (sigmoid gives scores)
             pred_boxes    (B, Q, 4): sigmoid cxcywh relative to the unpadded image
             scores (B, K), labels (B, K) int64, boxes (B, K, 4) xyxy in original-image pixels: only
             with_postprocess; the image processor's `post_process_object_detection` before its threshold
             (sigmoid over all Q x C pairs, top-K, clamped to the image), K = min(top_k, Q * C)
B, H and W are dynamic. The ExportedProgram checks B >= 1 and H, W in 65..8192 pixels (the export reasons about
sizes where the coarsest feature level, stride 64, has more than one cell); the ONNX graph carries no such check
and matches eager below that too (tested down to 40x48 on a tiny model). The image processor makes 800+ pixels.

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

The deformable attention is exported as standard ops (GridSample, opset >= 16): the Triton kernel is switched off
for the export (`ms_deform_attn.custom_kernels_disabled`). The exporter is PyTorch's torch.export-based one
(`torch.onnx.export(..., dynamo=True)`, the default since torch 2.9), from the same ExportedProgram that
`export_program` returns. The deprecated TorchScript tracer records Python decisions on sizes as constants (the
query count min(num_queries, encoder positions), size-1 feature maps): traced at 96x128 it gave logits off by up to
0.4 on 64x64 inputs without an error; the graph from torch.export matches eager there.

A model in training mode is exported in eval mode (inference has no denoising queries and no loss): a warning
says so, and the model's own mode is restored afterwards.
"""

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .box_ops import box_cxcywh_to_xyxy
from .file_io import atomic_write_bytes, claim_output, model_input_folders, record_output
from .ms_deform_attn import custom_kernels_disabled

INPUT_NAMES = ("pixel_values", "pixel_mask")
POSTPROCESS_INPUT_NAMES = ("target_sizes",)
OUTPUT_NAMES = ("logits", "pred_boxes")
POSTPROCESS_OUTPUT_NAMES = ("scores", "labels", "boxes")
# torch.onnx's torch.export-based exporter writes opset 18 and newer; GridSample itself needs 16
MIN_OPSET = 18
DEFAULT_OPSET = 18
DEFAULT_TOP_K = 300
MIN_SIDE, MAX_SIDE = 65, 8192  # dynamic H and W range; see the module docstring
# the example input the graph is traced with; other sizes and batches run because the dimensions are dynamic
EXAMPLE_BATCH, EXAMPLE_HEIGHT, EXAMPLE_WIDTH = 2, 256, 320


class AlignDetrExportWrapper(nn.Module):
    """The detector as a function of tensors only: returns (logits, pred_boxes) and, with top_k, the detections."""

    def __init__(self, model: nn.Module, top_k: int | None = None):
        super().__init__()
        self.model = model
        self.top_k = top_k

    def forward(self, pixel_values, pixel_mask, target_sizes=None):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, return_dict=True)
        logits, pred_boxes = outputs.logits, outputs.pred_boxes
        if self.top_k is None:
            return logits, pred_boxes
        return (logits, pred_boxes) + top_k_detections(logits, pred_boxes, target_sizes, self.top_k)


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
                   height: int = EXAMPLE_HEIGHT, width: int = EXAMPLE_WIDTH) -> tuple[torch.Tensor, ...]:
    """Inputs of the graph's dtypes on the model's device; the last image is partly padding, so the mask matters."""
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator).to(parameter.device, parameter.dtype)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=parameter.device)
    pixel_mask[-1, height * 3 // 4 :, :] = 0
    if not with_postprocess:
        return pixel_values, pixel_mask
    target_sizes = torch.tensor([[480.0, 640.0]] * batch, device=parameter.device)
    return pixel_values, pixel_mask, target_sizes


def _dynamic_shapes(with_postprocess: bool) -> dict:
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    shapes = {"pixel_values": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width}}
    if with_postprocess:
        shapes["target_sizes"] = {0: batch}
    return shapes


def _check_model(model) -> None:
    from .modeling_align_detr import AlignDetrForObjectDetection

    if not isinstance(model, AlignDetrForObjectDetection):
        raise ValueError(
            f"export needs an AlignDetrForObjectDetection, got {type(model).__name__}: this exporter only knows "
            "Align-DETR's inputs and outputs."
        )


@contextmanager
def _inference_mode_for_export(model: nn.Module):
    """Eval mode (with a warning when the model was training) and no Triton kernel; restores the mode after."""
    was_training = model.training
    if was_training:
        warnings.warn(
            "the model is in training mode; it is exported in eval mode (no denoising queries, no loss). "
            "Its training mode is restored after the export.",
            UserWarning,
            stacklevel=3,
        )
    model.eval()
    try:
        with custom_kernels_disabled(), torch.no_grad():
            yield
    finally:
        model.train(was_training)


def export_program(
    model: nn.Module,
    with_postprocess: bool = False,
    top_k: int = DEFAULT_TOP_K,
    example: tuple[torch.Tensor, ...] | None = None,
) -> torch.export.ExportedProgram:
    """`torch.export` the detector with dynamic batch, height and width; the program's inputs and outputs follow the
    graph contract in this module's docstring (positional, in that order)."""
    _check_model(model)
    if with_postprocess and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    wrapper = AlignDetrExportWrapper(model, top_k if with_postprocess else None)
    if example is None:
        example = example_inputs(model, with_postprocess)
    with _inference_mode_for_export(model):
        return torch.export.export(
            wrapper.eval(), tuple(example), dynamic_shapes=_dynamic_shapes(with_postprocess), strict=False
        )


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


def _check_output_path(output, model, overwrite: bool) -> Path:
    """The ownership rule (file_io): replace only an unchanged earlier export, never write into the model's folder
    (its weights!) unless `overwrite`."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise ValueError(f"output {path} is a folder; give a file name such as {path / 'model.onnx'}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent.resolve()} does not exist; create it first.")
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    return claim_output(path, WRITER, overwrite=overwrite, inputs=model_input_folders(source))


def export_onnx(
    model: nn.Module,
    output,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    with_postprocess: bool = False,
    top_k: int = DEFAULT_TOP_K,
    program: torch.export.ExportedProgram | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the detector as an ONNX file at `output` (atomically: a failed export leaves no file) and return its path.

    `output` may replace only a file an earlier export wrote and nobody changed since, and may not lie in the folder
    the model was loaded from, unless `overwrite` (checked before the export).

    fp16 exports a float16 copy of the model (float16 pixel_values, logits and pred_boxes; meant for GPU runtimes;
    ONNX Runtime's CPU provider runs it too, see tests/test_export.py). `program`: reuse an ExportedProgram
    from `export_program` with the same `with_postprocess` and `top_k` (saves the tracing time).
    """
    _check_model(model)
    _check_opset(opset)
    path = _check_output_path(output, model, overwrite)
    if fp16 and program is not None:
        raise ValueError("fp16 exports its own float16 copy of the model; do not pass a float32 program with it.")
    if fp16:
        import copy

        model = copy.deepcopy(model).half()
    if program is None:
        program = export_program(model, with_postprocess=with_postprocess, top_k=top_k)
    input_names = list(INPUT_NAMES + (POSTPROCESS_INPUT_NAMES if with_postprocess else ()))
    output_names = list(OUTPUT_NAMES + (POSTPROCESS_OUTPUT_NAMES if with_postprocess else ()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notes while translating
        onnx_program = torch.onnx.export(
            program,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            # onnxscript 0.7's optimizer left a node reading a value no node produces in this graph;
            # ONNX Runtime optimises the graph itself when it loads it
            optimize=False,
            verbose=False,
        )
    onnx_model = onnx_program.model_proto
    _name_dynamic_axes(onnx_model, with_postprocess)
    _check_graph(onnx_model)
    claim_output(path, WRITER, overwrite=overwrite)  # still ours after the (slow) export?
    _write_atomically(path, onnx_model.SerializeToString())
    record_output(path, WRITER)
    return path


def _name_dynamic_axes(onnx_model, with_postprocess: bool) -> None:
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


def _check_graph(onnx_model) -> None:
    """Refuse to write a graph ONNX's checker rejects, or one that still holds a non-standard op."""
    import onnx

    onnx.checker.check_model(onnx_model)
    custom = sorted({node.op_type for node in onnx_model.graph.node if node.domain not in ("", "ai.onnx")})
    if custom:
        raise RuntimeError(f"the exported graph holds non-standard ops {custom}; please report this.")


def _write_atomically(path: Path, data: bytes) -> None:
    """Temporary sibling, fsync, rename: a failed export leaves no file and keeps an older one."""
    atomic_write_bytes(path, data)


def load_for_export(model: str):
    """An `AlignDetrForObjectDetection` from a folder or Hub id, with the CLI's error messages."""
    from .cli import _load_model

    _, detector = _load_model(model, "cpu")
    _check_model(detector)
    return detector
