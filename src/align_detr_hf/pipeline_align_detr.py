"""`pipeline("object-detection")` for Align-DETR: batches of images of any sizes, our image reading, no false error.

transformers' `ObjectDetectionPipeline`, given a third-party detector:
- checks the model's class name against the static table of transformers' own detectors (registrations with
  `AutoModelForObjectDetection.register` are not consulted), so it logs "The model 'AlignDetrForObjectDetection' is
  not supported for object-detection. Supported models are [...]" every time, though the model works;
- with `batch_size > 1` its collate function concatenates each image's `pixel_values`, which fails for images of
  different sizes;
- reads images with `load_image`, which converts them to 8-bit RGB (16-bit images are clipped).

`AlignDetrObjectDetectionPipeline` keeps the parent's post-processing and, for Align-DETR models only, reads images
with `image_io.read_image` (EXIF orientation, 16-bit depth kept: what `align-detr predict` and the image processor
read), keeps each image's inputs apart through the collate step, runs the images that share a processed size as one
batch, and returns per-image `logits`, `pred_boxes` and `target_size`. Every result is therefore the one-image result:
images of different sizes are never padded to each other. (Give the image processor a fixed `pad_size` to put every
image in one batch.) Any other model gets the parent's behaviour unchanged.

Where it is used:
- with this package imported, `register_pipeline()` makes it the implementation of the "object-detection" task;
- where the package is not installed, a saved folder names it in `config.custom_pipelines` (written by every save,
  see `AlignDetrForObjectDetection.save_pretrained`) and carries this file, so
  `pipeline("object-detection", model=FOLDER_OR_HUB_ID, trust_remote_code=True)` runs it as remote code. (A model
  *object* passed to `pipeline(...)` there gets transformers' own class, whose batching and log line apply; the
  model's outputs are batch-first, so its same-size batches work.)

`pipe(image, slice=True | dict | SliceConfig)` runs sliced inference on Align-DETR models (overlapping tiles plus the
full image, merged; see `align_detr_hf.slicing`); the pipeline's `threshold` applies to the merged detections.
"""

from __future__ import annotations

import torch
from transformers.pipelines import PIPELINE_REGISTRY, ObjectDetectionPipeline
from transformers.utils import ModelOutput

from .image_io import read_image
from .slicing import SliceConfig, sliced_detect

TASK = "object-detection"
_IMAGE_INPUTS = "align_detr_image_inputs"  # not a tensor: the collate function keeps these as a list
_SLICED = "align_detr_sliced"  # sliced inference (`slice=`): the image and its SliceConfig, then the detections


def custom_pipeline_entry() -> dict:
    """The `config.custom_pipelines[TASK]` entry naming this pipeline for remote code (transformers' format)."""
    module = __name__.rsplit(".", 1)[-1]
    return {"impl": f"{module}.{AlignDetrObjectDetectionPipeline.__name__}", "pt": ["AutoModelForObjectDetection"],
            "type": "image"}


class AlignDetrObjectDetectionPipeline(ObjectDetectionPipeline):
    """transformers' object-detection pipeline, batching Align-DETR images by processed size (see module doc)."""

    # No detector needs one, and transformers would derive a video processor entry from the image processor's
    # `auto_map` and ask whether to trust that (non-existent) remote code.
    _load_video_processor = False

    def _is_align_detr(self) -> bool:
        # also true for the classes of a folder loaded with trust_remote_code
        return getattr(self.model.config, "model_type", None) == "align_detr"

    def check_model_type(self, supported_models):
        if not self._is_align_detr():  # ours is registered with AutoModelForObjectDetection
            super().check_model_type(supported_models)

    def _sanitize_parameters(self, slice=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if slice is not None:  # `pipe(image, slice=True | dict | SliceConfig)`: see align_detr_hf.slicing
            preprocess_params["slice"] = slice
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, timeout=None, slice=None):
        config = SliceConfig.coerce(slice)
        if config is not None and self._is_align_detr():
            image = read_image(image)  # (URLs: image_io's own timeout)
            return {"target_size": torch.IntTensor([[image.height, image.width]]),
                    _SLICED: {"image": image, "config": config}}
        if not self._is_align_detr():
            return super().preprocess(image, timeout=timeout)
        image = read_image(image)  # (URLs: image_io's own timeout)
        inputs = dict(self.image_processor(images=[image], return_tensors="pt").to(self.dtype))
        inputs["target_size"] = torch.IntTensor([[image.height, image.width]])
        return {_IMAGE_INPUTS: inputs}

    def _forward(self, model_inputs):
        if _SLICED in model_inputs:
            jobs = model_inputs[_SLICED]
            jobs = jobs if isinstance(jobs, list) else [jobs]
            found = [sliced_detect(self.model, self.image_processor, job["image"], job["config"]) for job in jobs]
            return {"target_size": model_inputs["target_size"], _SLICED: found}
        if _IMAGE_INPUTS not in model_inputs:
            return super()._forward(model_inputs)
        images = model_inputs[_IMAGE_INPUTS]
        images = images if isinstance(images, list) else [images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image["pixel_values"].shape[-2:]), []).append(index)
        logits, pred_boxes = [None] * len(images), [None] * len(images)
        for indices in by_size.values():
            batch = {
                key: torch.cat([images[i][key] for i in indices])
                for key in ("pixel_values", "pixel_mask")
                if key in images[indices[0]]
            }
            outputs = self.model(**batch)
            for row, index in enumerate(indices):
                logits[index] = outputs.logits[row : row + 1]
                pred_boxes[index] = outputs.pred_boxes[row : row + 1]
        return ModelOutput(
            {
                "target_size": torch.cat([image["target_size"] for image in images]),
                "logits": torch.cat(logits),
                "pred_boxes": torch.cat(pred_boxes),
            }
        )


    def postprocess(self, model_outputs, threshold=0.5):
        if _SLICED not in model_outputs:
            return super().postprocess(model_outputs, threshold=threshold)
        found = model_outputs[_SLICED]
        found = found[0] if isinstance(found, list) else found
        keep = found["scores"] > threshold
        id2label = self.model.config.id2label
        return [
            {"score": score, "label": id2label[label], "box": self._get_bounding_box(box)}
            for score, label, box in zip(
                found["scores"][keep].tolist(), found["labels"][keep].tolist(), found["boxes"][keep]
            )
        ]


def register_pipeline() -> None:
    """Serve the "object-detection" task with `AlignDetrObjectDetectionPipeline` (idempotent).

    The registry entry's implementation is replaced in place: `PIPELINE_REGISTRY.register_pipeline` would log an
    "Overwriting pipeline" warning on every import, and the entry keeps its default model and Auto class."""
    PIPELINE_REGISTRY.supported_tasks[TASK]["impl"] = AlignDetrObjectDetectionPipeline
