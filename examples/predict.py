"""Detect objects in one image with Align-DETR (a copy-and-edit starting point).

    python examples/predict.py IMAGE MODEL_DIR_OR_HUB_ID [THRESHOLD]

MODEL is a folder written by `align-detr convert` / `save_pretrained`, or a Hub id. Without arguments it runs on the
packaged example image and needs MODEL_DIR set in the environment.
"""

import argparse
import os

import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection

# Importing the package registers Align-DETR with the Auto classes. (On transformers 5.17 only, the top-level
# AutoImageProcessor wrongly asks for torchvision: import it from transformers.models.auto.image_processing_auto.)
import align_detr_hf  # noqa: F401
from align_detr_hf.image_io import read_image, to_rgb8
from align_detr_hf.visualize import draw_detections, example_image_path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("image", nargs="?", default=str(example_image_path()), help="image file (default: the example)")
parser.add_argument("model_name_or_path", nargs="?", default=os.environ.get("MODEL_DIR"),
                    help="model folder or Hub id (default: $MODEL_DIR)")
parser.add_argument("threshold", nargs="?", type=float, default=0.3, help="minimum score (default 0.3)")
args = parser.parse_args()
if args.model_name_or_path is None:
    parser.error("give MODEL_DIR_OR_HUB_ID (or set MODEL_DIR in the environment)")
image_path, model_id, threshold = args.image, args.model_name_or_path, args.threshold

processor = AutoImageProcessor.from_pretrained(model_id)
model = AutoModelForObjectDetection.from_pretrained(model_id).eval()

# read as `align-detr predict` and the pipeline read it: EXIF orientation applied, 16-bit depth kept (a path or URL)
image = read_image(image_path)
inputs = processor(images=image, return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)

# boxes come back as [xmin, ymin, xmax, ymax] in pixels of the original image
result = processor.post_process_object_detection(
    outputs, threshold=threshold, target_sizes=[(image.height, image.width)], top_k=100
)[0]
detections = []
for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
    name = model.config.id2label[label.item()]
    detections.append({"label": name, "score": score.item(), "box": box.tolist()})
    print(f"{name:>12s} {score:.3f} [{', '.join(f'{v:.1f}' for v in box.tolist())}]")

draw_detections(to_rgb8(image), detections, label2id=model.config.label2id).save("detections.png")
print(f"{len(detections)} detection(s); drawing written to detections.png")
