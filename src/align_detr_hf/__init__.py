"""Align-DETR for Hugging Face transformers."""

from importlib.metadata import PackageNotFoundError, version

from transformers import AutoConfig, AutoModel, AutoModelForObjectDetection

# From its module, not `transformers.AutoImageProcessor`: transformers 5.17 wrongly marks the top-level name as needing
# torchvision (a placeholder that raises without it); the class itself does not need it.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .configuration_align_detr import AlignDetrConfig
from .hub import (
    ModelCardCallback,
    ModelCardTrainerMixin,
    build_model_card,
    push_to_hub_with_model_card,
    register_remote_code,
    write_model_card,
)
from .hub_kernels import use_triton_deformable_attention
from .image_processing_align_detr import AlignDetrImageProcessor
from .loss_adapters import remove_align_detr_loss, use_align_detr_loss
from .loss_align_detr import AlignDetrLoss
from .loss_dino import DinoLoss
from .modeling_align_detr import (
    AlignDetrDenoisingQueries,
    AlignDetrForObjectDetection,
    AlignDetrModel,
    AlignDetrPreTrainedModel,
)
from .pipeline_align_detr import AlignDetrObjectDetectionPipeline, register_pipeline
from .training_run import StopOnNonFiniteLossCallback, TrainingRunCallback

try:  # the installed distribution's version (pyproject.toml), the one place it is written
    __version__ = version("align-detr-hf")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "__version__",
    "AlignDetrConfig",
    "AlignDetrDenoisingQueries",
    "AlignDetrForObjectDetection",
    "AlignDetrImageProcessor",
    "AlignDetrLoss",
    "AlignDetrModel",
    "AlignDetrObjectDetectionPipeline",
    "AlignDetrPreTrainedModel",
    "DinoLoss",
    "ModelCardCallback",
    "ModelCardTrainerMixin",
    "StopOnNonFiniteLossCallback",
    "TrainingRunCallback",
    "build_model_card",
    "remove_align_detr_loss",
    "use_align_detr_loss",
    "use_triton_deformable_attention",
    "write_model_card",
]

AutoConfig.register("align_detr", AlignDetrConfig, exist_ok=True)
AutoModel.register(AlignDetrConfig, AlignDetrModel, exist_ok=True)
AutoModelForObjectDetection.register(AlignDetrConfig, AlignDetrForObjectDetection, exist_ok=True)

# One pure-PyTorch implementation serves both backend names, so AutoImageProcessor picks it with or without
# torchvision installed (and never warns about a fallback).
AutoImageProcessor.register(
    AlignDetrConfig,
    image_processor_classes={"torchvision": AlignDetrImageProcessor, "pil": AlignDetrImageProcessor},
    exist_ok=True,
)

# Every save_pretrained / push_to_hub (plain, Trainer checkpoints, trainer.push_to_hub, our scripts) writes auto_map
# and copies our code, so the folder loads with trust_remote_code=True where this package is not installed.
register_remote_code()
# Every model push carries our model card (a card already in the repository is kept).
AlignDetrPreTrainedModel.push_to_hub = push_to_hub_with_model_card
# pipeline("object-detection"): batches of mixed image sizes, and no false "not supported" error for our model.
register_pipeline()
