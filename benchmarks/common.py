"""Shared pieces of the benchmark scripts: the two models, inputs, timing and memory measurement."""

import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

NUM_LABELS = 80
REPO = Path(__file__).resolve().parent.parent


def resnet50_backbone_config():
    from transformers import ResNetConfig

    return ResNetConfig(out_features=["stage2", "stage3", "stage4"])  # R-50, strides 8/16/32


def build_model(name: str):
    """'ours': Align-DETR (DINO-4scale); 'theirs': transformers' Deformable DETR as close as it allows."""
    id2label = {i: f"class_{i}" for i in range(NUM_LABELS)}
    if name in ("ours", "ours-frozen-backbone", "ours-frozen-backbone-no-dn"):
        from align_detr_hf import AlignDetrConfig, AlignDetrForObjectDetection

        # "ours": the Align-DETR recipe, only the stem frozen (mmdetection's frozen_stages=0). "ours-frozen-backbone":
        # the whole backbone frozen, which is what transformers' Deformable DETR does with an HF ResNet (its
        # freezing test looks for "stage.1" in names spelled "stages.1", so no backbone parameter trains)
        freeze = 4 if name.startswith("ours-frozen-backbone") else 0
        # "-no-dn": without the 100 contrastive denoising queries, the work theirs does (Deformable DETR has none)
        config = AlignDetrConfig(
            backbone_config=resnet50_backbone_config(),
            id2label=id2label,
            freeze_backbone_stages=freeze,
            num_denoising_queries=0 if name.endswith("-no-dn") else 100,
        )
        return AlignDetrForObjectDetection(config)
    if name == "theirs":
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

        config = DeformableDetrConfig(
            backbone_config=resnet50_backbone_config(),
            id2label=id2label,
            d_model=256,
            encoder_layers=6,
            decoder_layers=6,
            encoder_ffn_dim=2048,
            decoder_ffn_dim=2048,
            encoder_attention_heads=8,
            decoder_attention_heads=8,
            num_feature_levels=4,
            encoder_n_points=4,
            decoder_n_points=4,
            num_queries=900,
            two_stage=True,
            two_stage_num_proposals=900,
            with_box_refine=True,
            auxiliary_loss=True,  # Align-DETR computes its loss on every decoder layer too
            dropout=0.0,  # as DINO / Align-DETR
            disable_custom_kernels=True,  # no compiled CUDA op: both sides use PyTorch or their own kernels
        )
        return DeformableDetrForObjectDetection(config)
    raise ValueError(name)


def model_description() -> str:
    return (
        "both: HF ResNet-50 backbone (ResNetConfig, out_features stage2-4, random init, no timm), 4 feature levels, "
        "d_model 256, 6 encoder + 6 decoder layers, FFN 2048, 8 heads, 4 points, 900 queries, 80 classes, "
        "dropout 0. Ours: Align-DETR (only the backbone stem frozen, as the Align-DETR config's frozen_stages=0); DINO-4scale: two-stage, look-forward-twice refinement, 100 contrastive "
        "denoising queries in training. Theirs: transformers DeformableDetrForObjectDetection with two_stage=True, "
        "with_box_refine=True, auxiliary_loss=True, disable_custom_kernels=True; with an HF ResNet it trains no backbone parameter at all (transformers "
        "looks for 'stage.1' in parameter names spelled 'stages.1'), so the training table adds "
        "'ours-frozen-backbone' (freeze_backbone_stages=4) for a like-for-like step, and 'ours-frozen-backbone-no-dn' without denoising queries (Deformable DETR has none)."
    )


def make_batch(batch: int, height: int, width: int, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, height, width, generator=generator).to(device)
    mask = torch.ones(batch, height, width, dtype=torch.long, device=device)
    labels = []
    for _ in range(batch):
        n = 6
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        labels.append(
            {
                "class_labels": torch.randint(0, NUM_LABELS, (n,), generator=generator).to(device),
                "boxes": torch.cat([centres, sizes], -1).to(device),
            }
        )
    return pixels, mask, labels


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class PeakMemory:
    """Peak memory above the level at entry. CUDA: max_memory_allocated. CPU: resident set size (RSS), polled
    every millisecond by a thread and checked against getrusage's process peak (exact when the process peak is
    reached inside the block, which is why every measurement runs in a fresh worker process)."""

    def __init__(self, device, process_peak: bool = True):
        self.device = torch.device(device)
        self.process_peak = process_peak  # CPU: also take getrusage's process maximum (needs a fresh process)
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._process = psutil.Process()
            self._base = self._process.memory_info().rss
            self._max = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if self.process_peak else 0  # KiB
            self.peak_bytes = max(self._max, max_rss) - self._base
        return False


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }
    import transformers

    info["transformers"] = transformers.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = "none"
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip() + (" (+ uncommitted changes)" if _dirty() else "")
    except Exception:
        info["git_commit"] = "unknown"
    return info


def _dirty() -> bool:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return bool(out.stdout.strip())


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    return " ".join([os.path.relpath(sys.executable)] + sys.argv)


def write_section(name: str, text: str, path=None) -> None:
    """Replace (or append) the `<!-- name:start -->` ... `<!-- name:end -->` block of BENCHMARKS.md with `text`, so
    each benchmark script owns its own section and none overwrites another's figures."""
    path = Path(path or REPO / "BENCHMARKS.md")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        current = before + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    from align_detr_hf.file_io import atomic_write_text

    atomic_write_text(path, current)  # a private temporary sibling, never a fixed name beside the user's file


def write_shapes_data(folder, writer: str, overwrite: bool, num_train: int, num_val: int, image_size: int,
                      num_classes: int = 3, val_seed: int = 10_000) -> tuple[Path, Path]:
    """The synthetic shapes train/val COCO folders in `folder`, under the package's ownership rule (file_io): built
    beside it and swapped in, replacing only an unchanged earlier copy written by `writer` (or anything with
    `overwrite`; other files are kept). Returns the two annotation files."""
    from align_detr_hf.file_io import atomic_directory
    from align_detr_hf.synthetic import SHAPE_CLASSES, generate_shapes_dataset

    classes = SHAPE_CLASSES[:num_classes]
    with atomic_directory(folder, writer, overwrite=overwrite) as staging:
        generate_shapes_dataset(staging / "train", num_train, image_size, seed=0, classes=classes)
        generate_shapes_dataset(staging / "val", num_val, image_size, seed=val_seed, classes=classes)
    return Path(folder) / "train" / "annotations.json", Path(folder) / "val" / "annotations.json"


def run_main(main) -> None:
    """Run a benchmark's `main()`; an output path it may not write (file_io's ownership rule) is one line on stderr
    and exit code 2, as in the `align-detr` commands."""
    from align_detr_hf.file_io import OutputPathError

    try:
        main()
    except OutputPathError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
