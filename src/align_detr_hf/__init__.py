"""Align-DETR for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForObjectDetection

# From its module, not `transformers.AutoImageProcessor`: transformers 5.17 wrongly marks the top-level name as needing
# torchvision (a placeholder that raises without it); the class itself does not need it.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .configuration_align_detr import AlignDetrConfig
from .image_processing_align_detr import AlignDetrImageProcessor
from .loss_align_detr import AlignDetrLoss
from .loss_dino import DinoLoss
from .modeling_align_detr import (
    AlignDetrDenoisingQueries,
    AlignDetrForObjectDetection,
    AlignDetrModel,
    AlignDetrPreTrainedModel,
)

__all__ = [
    "AlignDetrConfig",
    "AlignDetrDenoisingQueries",
    "AlignDetrForObjectDetection",
    "AlignDetrImageProcessor",
    "AlignDetrLoss",
    "AlignDetrModel",
    "AlignDetrPreTrainedModel",
    "DinoLoss",
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
