#!/usr/bin/env python
"""Convert an mmdetection Align-DETR checkpoint into a Hub-ready Hugging Face folder.

    python scripts/convert_checkpoint.py \
        --checkpoint https://download.openmmlab.com/mmdetection/v3.0/align_detr/align_detr-4scale_r50_8xb2-12e_coco/align_detr-4scale_r50_8xb2-12e_coco_20230914_095734-61f921af.pth \
        --output-dir align-detr-r50-12e --verify [--push-to-hub your-name/align-detr-r50]

The same as `align-detr convert`. Reading a .pth file unpickles it: only convert checkpoints you trust.
"""

from align_detr_hf.cli import main

if __name__ == "__main__":
    main(["convert", *__import__("sys").argv[1:]])
