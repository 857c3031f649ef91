"""`pipeline("object-detection")` for Align-DETR: batches of images of any sizes, and no false "not supported" error.

transformers' `ObjectDetectionPipeline` has two problems with a third-party detector:
- it checks the model's class name against the static table of transformers' own detectors (registrations with
  `AutoModelForObjectDetection.register` are not consulted), so it logs "The model 'AlignDetrForObjectDetection' is
  not supported for object-detection. Supported models are [...]" every time, though the model works;
- with `batch_size > 1` its collate function concatenates each image's `pixel_values`, which fails for images of
  different sizes, and it splits the model output per image by indexing every field on its first axis, which is
  wrong for our layer-first `intermediate_*` fields.

`AlignDetrObjectDetectionPipeline` keeps the parent's pre- and post-processing and, for Align-DETR models only,
keeps each image's inputs apart through the collate step, runs the images that share a processed size as one batch,
and returns per-image `logits`, `pred_boxes` and `target_size`. Every result is therefore the one-image result:
images of different sizes are never padded to each other. (Give the image processor a fixed `pad_size` to put every
image in one batch.) Any other model gets the parent's behaviour unchanged.

`pipe(image, slice=True | dict | SliceConfig)` runs sliced inference on Align-DETR models (overlapping tiles plus the
full image, merged; see `align_detr_hf.slicing`); the pipeline's `threshold` applies to the merged detections.

`register_pipeline()` (run when `align_detr_hf` is imported) makes it the implementation of the "object-detection"
task. Folders loaded with `trust_remote_code=True` where this package is absent get transformers' own pipeline:
single images work there, and its log line and batching limits apply.
"""

from __future__ import annotations

import torch
from transformers.pipelines import PIPELINE_REGISTRY, ObjectDetectionPipeline
from transformers.image_utils import load_image
from transformers.utils import ModelOutput

from .slicing import SliceConfig, sliced_detect

TASK = "object-detection"
_IMAGE_INPUTS = "align_detr_image_inputs"  # not a tensor: the collate function keeps these as a list
_SLICED = "align_detr_sliced"  # sliced inference (`slice=`): the image and its SliceConfig, then the detections


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
            image = load_image(image, timeout=timeout)
            return {"target_size": torch.IntTensor([[image.height, image.width]]),
                    _SLICED: {"image": image, "config": config}}
        inputs = super().preprocess(image, timeout=timeout)
        if not self._is_align_detr():
            return inputs
        return {_IMAGE_INPUTS: dict(inputs)}

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
