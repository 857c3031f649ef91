"""Which `COCOeval` computes the numbers: faster-coco-eval's C++ one when it is installed, else pycocotools'.

    from align_detr_hf.coco_backend import run_cocoeval
    coco_eval = run_cocoeval(coco_gt, results)          # backend="auto"
    coco_eval.stats[:9], coco_eval.eval["precision"]    # (T=10 IoUs, R=101 recalls, K classes, A=4 areas, M=3)

faster-coco-eval (`pip install align-detr-hf[fast-eval]`, no torch, one ~0.6 MB wheel) re-implements
`COCOeval.evaluate`/`accumulate` in C++ on the same parameters. Its numbers are pycocotools' to 15 digits: a value of
its precision array may round its last bit differently (at most 2.2e-16), so a summary metric can differ by a float64
step or two (<= 1e-15; tests/test_coco_backend.py, and the 500-5,000-image sets of benchmarks/bench_evaluation.py).
The ground truth and the detections stay pycocotools `COCO` objects for both (built once, shared); only the
evaluation class changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Any

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "run_cocoeval"]

BACKENDS = ("faster_coco_eval", "pycocotools")  # preference order of "auto"


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as none
        return False


def available_backends() -> list[str]:
    """The installed backends, fastest first."""
    return [name for name in BACKENDS if _installed(name)]


def resolve_backend(backend: str | None = "auto") -> str:
    """`"auto"` (or None) -> the fastest installed backend; a named one is checked to be installed."""
    backend = backend or "auto"
    if backend == "auto":
        installed = available_backends()
        if not installed:
            raise ImportError("COCO evaluation needs pycocotools (a dependency): pip install pycocotools")
        return installed[0]
    if backend not in BACKENDS:
        raise ValueError(f"COCO backend must be 'auto' or one of {', '.join(BACKENDS)}, got {backend!r}.")
    if not _installed(backend):
        extra = " (pip install align-detr-hf[fast-eval])" if backend == "faster_coco_eval" else ""
        raise ValueError(f"COCO backend {backend!r} is not installed{extra}; use backend 'auto'.")
    return backend


def _cocoeval_class(backend: str):
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCOeval_faster

        return COCOeval_faster
    from pycocotools.cocoeval import COCOeval

    return COCOeval


def run_cocoeval(coco_gt: Any, results: list[dict] | None, backend: str | None = "auto", verbose: bool = False,
                 max_dets=(1, 10, 100)):
    """COCOeval (bbox) of `results` = [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}] against the
    pycocotools `COCO` `coco_gt`, over all of its images: evaluated, accumulated and summarised (printing only with
    `verbose`). Returns the evaluator (`stats`, `eval["precision"]`, `eval["recall"]`, `params`), or None when there
    are no detections (both backends refuse an empty result list). `max_dets`: the three detection limits."""
    if not results:
        return None
    cocoeval_class = _cocoeval_class(resolve_backend(backend))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_dt = coco_gt.loadRes(results)
        coco_eval = cocoeval_class(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
        if verbose:
            coco_eval.print_function = print  # faster-coco-eval logs its summary unless told to print
        coco_eval.summarize()
    if verbose:
        print(out.getvalue())
    return coco_eval
