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
    register_owned_saves,
    register_remote_code,
    write_model_card,
)
from .hub_kernels import use_triton_deformable_attention
from .image_processing_align_detr import AlignDetrImageProcessor
from .image_processing_pil_align_detr import AlignDetrImageProcessorPil
from .loss_adapters import remove_align_detr_loss, use_align_detr_loss
from .loss_align_detr import AlignDetrLoss, AlignDetrLossConfig, AlignDetrLossInputs, DinoLoss
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
    "AlignDetrImageProcessorPil",
    "AlignDetrLoss",
    "AlignDetrLossConfig",
    "AlignDetrLossInputs",
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

# Two backends, as transformers names them: AutoImageProcessor picks "torchvision" (our plain-PyTorch tensor backend)
# where torchvision is installed, else "pil" (the NumPy twin, same rule); `backend=` selects either explicitly.
AutoImageProcessor.register(
    AlignDetrConfig,
    image_processor_classes={"torchvision": AlignDetrImageProcessor, "pil": AlignDetrImageProcessorPil},
    exist_ok=True,
)

# Every save_pretrained / push_to_hub (plain, Trainer checkpoints, trainer.push_to_hub, our scripts) writes auto_map
# and copies our code, so the folder loads with trust_remote_code=True where this package is not installed.
register_remote_code()
# save_pretrained replaces only files an earlier save wrote and nobody changed (file_io's ownership rule).
register_owned_saves()
# Every model push carries our model card (a card already in the repository is kept).
AlignDetrPreTrainedModel.push_to_hub = push_to_hub_with_model_card
# pipeline("object-detection"): batches of mixed image sizes, and no false "not supported" error for our model.
register_pipeline()
