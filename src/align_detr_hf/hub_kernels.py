"""Our deformable-attention op behind transformers' hub-kernel layer `MultiScaleDeformableAttention`.

transformers marks the sampling op of Deformable DETR, RT-DETR, LW-DETR, RF-DETR, Grounding DINO, MM Grounding DINO,
OmDet-Turbo and PP-DocLayout (v2-v4) with `use_kernel_forward_from_hub("MultiScaleDeformableAttention")`: the
`kernels` library's `kernelize` may then swap that layer's forward for a stateless layer of the same signature from
a kernel repository. The one transformers maps by default (`kernels-community/deformable-detr`) is a compiled CUDA
kernel downloaded from the Hub. `TritonMultiScaleDeformableAttention` is ours: the dispatch of
`ms_deform_attn.py` (the Triton kernel on CUDA in float32, bfloat16 and float16, forward and backward, a torch custom
op that torch.compile traces without a graph break; elsewhere the CPU gather or the grid_sample reference; never the
kernel inside an export).

    from align_detr_hf.hub_kernels import use_triton_deformable_attention

    model = DeformableDetrForObjectDetection.from_pretrained("SenseTime/deformable-detr").to("cuda")
    use_triton_deformable_attention(model)  # every MultiScaleDeformableAttention layer of the model, nothing else

or, with the `kernels` API directly (`TRITON_KERNEL_REPOSITORY` is a kernel repository in the `kernels` sense: an
object whose `load()` returns the layer class, so no download):

    from kernels import Mode, kernelize, use_kernel_mapping
    with use_kernel_mapping(deformable_attention_kernel_mapping(), inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cuda")  # other hub-kernel layers: back to their own forward

Both need the optional `kernels` package (`pip install 'align-detr-hf[kernels]'`): without it, transformers leaves
the layers unmarked and nothing can be swapped. `model.reset_kernels()` (transformers) restores the original forward.
A later `model.set_use_kernels(True)` re-kernelizes with transformers' own mapping: call ours again after it.
"""

import torch
from torch import nn

from .ms_deform_attn import multi_scale_deformable_attention

__all__ = [
    "LAYER_NAME",
    "TRITON_KERNEL_REPOSITORY",
    "TritonMultiScaleDeformableAttention",
    "deformable_attention_kernel_mapping",
    "use_triton_deformable_attention",
]

LAYER_NAME = "MultiScaleDeformableAttention"


class TritonMultiScaleDeformableAttention(nn.Module):
    """Stateless replacement forward for transformers' `MultiScaleDeformableAttention` (same arguments, same output
    (batch, queries, heads * head_dim) in `value`'s dtype). `kernels` accepts a layer only without a constructor or
    members beyond these two flags."""

    can_torch_compile = True  # a registered custom op with a fake implementation: traced, not broken
    has_backward = True

    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        # the Python list of level sizes carries everything; the tensor forms and im2col_step (a CUDA-kernel batching
        # knob) are not needed
        return multi_scale_deformable_attention(value, value_spatial_shapes_list, sampling_locations, attention_weights)


class TritonKernelRepository:
    """Where `kernels` finds our layer: in this package, not on the Hub. All instances are equal, so `kernels`
    loads and validates the layer once."""

    layer_name = TritonMultiScaleDeformableAttention.__name__

    def load(self) -> type[nn.Module]:
        return TritonMultiScaleDeformableAttention

    def __eq__(self, other) -> bool:
        return isinstance(other, TritonKernelRepository)

    def __hash__(self) -> int:
        return hash(TritonKernelRepository)

    def __str__(self) -> str:
        return f"align_detr_hf (layer `{self.layer_name}`)"


TRITON_KERNEL_REPOSITORY = TritonKernelRepository()


def deformable_attention_kernel_mapping(devices=("cuda", "cpu")) -> dict:
    """A `kernels` mapping of `MultiScaleDeformableAttention` to our layer on `devices` (kernels' device types), for
    every mode (training, inference, torch.compile). The layer picks its implementation per call from the tensors'
    device, so a model kernelized on CPU and moved to CUDA afterwards runs the Triton kernel."""
    return {LAYER_NAME: {device: TRITON_KERNEL_REPOSITORY for device in devices}}


def use_triton_deformable_attention(model: nn.Module) -> nn.Module:
    """Give every `MultiScaleDeformableAttention` layer of a transformers model our forward (other kernelized layers
    are left as they are); returns the model. Raises ImportError without `kernels`, ValueError when the model has no
    such layer."""
    try:
        from kernels import Mode, kernelize, use_kernel_mapping
    except ImportError as error:
        raise ImportError(
            "use_triton_deformable_attention needs the `kernels` package: pip install 'align-detr-hf[kernels]'"
        ) from error
    layers = [module for module in model.modules() if getattr(type(module), "kernel_layer_name", None) == LAYER_NAME]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no layer registered as {LAYER_NAME!r} (transformers marks them only when the "
            "`kernels` version it supports is installed; see transformers.utils.import_utils.KERNELS_MIN_VERSION)"
        )
    device = _kernels_device_type(next(model.parameters(), torch.empty(0)).device)
    mode = (Mode.TRAINING if model.training else Mode.INFERENCE) | Mode.TORCH_COMPILE
    # only our mapping inside the block, and only these layers kernelized: nothing else of the model changes
    with use_kernel_mapping(deformable_attention_kernel_mapping(devices=(device,)), inherit_mapping=False):
        for layer in layers:
            kernelize(layer, mode=mode, device=device, use_fallback=False)
    if any(getattr(layer.forward, "__func__", None) is not TritonMultiScaleDeformableAttention.forward for layer in layers):
        raise RuntimeError("kernels kept the original MultiScaleDeformableAttention forward (DISABLE_KERNEL_MAPPING=1?)")
    return model


def _kernels_device_type(device: torch.device) -> str:
    """kernels' name for a torch device type (ROCm GPUs are `cuda` tensors to torch, `rocm` to kernels)."""
    if device.type == "cuda" and torch.version.hip is not None:
        return "rocm"
    return device.type
