"""Image processor speed on CPU: ours in both backends vs transformers' DeformableDetrImageProcessor in both.

Each processor turns one PIL image into model inputs per call (what the pipeline does), at the default
`{"shortest_edge": 800, "longest_edge": 1333}`, from two input sizes that both give 800x1333 model inputs: 600x1000
(upscaled) and 1200x2000 (downscaled). The processors run in alternation, round after round, and each figure is
the median of the rounds (the machine is shared: its noise moves every processor alike within a round). Writes the
`image_processing` section of BENCHMARKS.md.

    python benchmarks/bench_image_processing.py [--rounds 7] [--images 8] [--threads 1]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import command_line, machine_info, write_section  # noqa: E402
from PIL import Image  # noqa: E402

INPUT_SIZES = [(600, 1000), (1200, 2000)]  # (height, width); both become 800 x 1333


def processors():
    """(name, processor or the reason it cannot run)."""
    from transformers.utils import is_torchvision_available

    from align_detr_hf import AlignDetrImageProcessor, AlignDetrImageProcessorPil

    found = [("AlignDetrImageProcessor (ours, torchvision slot: plain PyTorch)", AlignDetrImageProcessor()),
             ("AlignDetrImageProcessorPil (ours, pil: NumPy)", AlignDetrImageProcessorPil())]
    if is_torchvision_available():
        from transformers import DeformableDetrImageProcessor

        found.append(("DeformableDetrImageProcessor (transformers, torchvision)", DeformableDetrImageProcessor()))
    else:
        found.append(("DeformableDetrImageProcessor (transformers, torchvision)",
                      "not measured: torchvision is not installed here (no dependency of this package; PyPI's "
                      "torchvision 0.28 wheel is built for CUDA torch and does not import with this CPU torch)"))
    from transformers.models.deformable_detr.image_processing_pil_deformable_detr import (
        DeformableDetrImageProcessorPil,
    )

    found.append(("DeformableDetrImageProcessorPil (transformers, pil)", DeformableDetrImageProcessorPil()))
    return found


def images_per_second(processor, images) -> float:
    start = time.perf_counter()
    for image in images:
        out = processor(image, return_tensors="pt")
    elapsed = time.perf_counter() - start
    assert tuple(out["pixel_values"].shape[-2:]) == (800, 1333), out["pixel_values"].shape
    return len(images) / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--images", type=int, default=8, help="images per processor per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (NumPy/PIL are single-threaded)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    inputs = {size: [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(args.images)]
              for size in INPUT_SIZES}
    runnable = [(name, p) for name, p in processors() if not isinstance(p, str)]
    rates = {(name, size): [] for name, _ in runnable for size in INPUT_SIZES}
    for name, processor in runnable:  # warm-up
        images_per_second(processor, inputs[INPUT_SIZES[0]][:1])
    for round_index in range(args.rounds):
        order = runnable if round_index % 2 == 0 else runnable[::-1]  # alternate the order
        for size in INPUT_SIZES:
            for name, processor in order:
                rates[(name, size)].append(images_per_second(processor, inputs[size]))

    info = machine_info()
    reference = "DeformableDetrImageProcessorPil (transformers, pil)"
    lines = [
        "## Image processor speed (CPU)",
        "",
        f"Written by `benchmarks/bench_image_processing.py` ({command_line()}). One PIL image per call "
        f"(as the pipeline calls it), `return_tensors=\"pt\"`, default size (shorter side 800, longer <= 1333): "
        f"every input below becomes an 800x1333 model input. Median images/s over {args.rounds} rounds of "
        f"{args.images} images, processors alternated within each round. torch threads: {args.threads}. "
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores shared with other jobs while measured (noisy: compare "
        f"rows of one run), torch {info['torch']}, transformers {info['transformers']}, commit {info['git_commit']}.",
        "",
        "| processor | " + " | ".join(f"{h}x{w} -> 800x1333 (images/s)" for h, w in INPUT_SIZES)
        + " | vs transformers' pil backend |",
        "|---|" + "---|" * (len(INPUT_SIZES) + 1),
    ]
    for name, processor in processors():
        if isinstance(processor, str):
            lines.append(f"| {name} | " + " | ".join(["n/a"] * len(INPUT_SIZES)) + f" | {processor} |")
            continue
        medians = [statistics.median(rates[(name, size)]) for size in INPUT_SIZES]
        ratios = [m / statistics.median(rates[(reference, size)]) for m, size in zip(medians, INPUT_SIZES)]
        lines.append(f"| {name} | " + " | ".join(f"{m:.1f}" for m in medians) + " | "
                     + ", ".join(f"{r:.2f}x" for r in ratios) + " |")
    lines += [
        "",
        "Both of our backends follow one rule (mmcv's sizes, bilinear without antialiasing, 0-255 normalisation) and "
        "give the same pixels to one grey level (tested); transformers' processors antialias when downscaling and "
        "round sizes differently, so they are timed here for speed only, not as equivalents.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("image_processing", text)


if __name__ == "__main__":
    main()
