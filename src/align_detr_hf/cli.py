"""The `align-detr` command: `convert` (mmdetection checkpoint -> Hugging Face folder), `predict`, `evaluate`, `export`,
`demo`."""

import argparse
import dataclasses
import json
import os
import sys
import urllib.parse
from pathlib import Path

from .flags import add_flag
from .loading import load_detector


def _convert(args: argparse.Namespace) -> None:
    from .convert_align_detr import convert_checkpoint

    overrides = {}
    if args.num_denoising_queries is not None:
        overrides["num_denoising_queries"] = args.num_denoising_queries
    convert_checkpoint(
        args.checkpoint,
        args.output_dir,
        loss_type=args.loss_type,
        config_overrides=overrides,
        verify=args.verify,
        push_to_hub=_hub_repo(args),
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite_output_dir,
    )
    print(f"Wrote {args.output_dir}" + (" (verified)" if args.verify else ""))


def _hub_repo(args: argparse.Namespace) -> str | None:
    """`--push_to_hub` (flag, with --hub_model_id) or `--push_to_hub REPO` (the older form): the repository or None."""
    if args.push_to_hub is None:
        return None
    repo = args.hub_model_id if args.push_to_hub is True else args.push_to_hub
    if not repo:
        raise ValueError("--push_to_hub needs a repository: --hub_model_id REPO (or --push_to_hub REPO).")
    return repo


# ------------------------------------------------------------------------------------------------------ predict


PREDICT_WRITER = "align-detr predict"  # how predict's files are recorded in the output folder's manifest (file_io)


def _output_names(paths: list[Path]) -> list[str]:
    """`<stem>_detections.png` per image, made unique when two inputs share a stem."""
    names, used = [], set()
    for path in paths:
        name, n = f"{path.stem}_detections.png", 1
        while name in used:
            n += 1
            name = f"{path.stem}_{n}_detections.png"
        used.add(name)
        names.append(name)
    return names


def predict(
    images: list[str],
    model: str,
    threshold: float = 0.3,
    output: str = "predictions",
    device: str | None = None,
    top_k: int = 100,
    draw: bool = True,
    overwrite: bool = False,
    slice=None,
) -> dict:
    """Run the detector on image files; write `<output>/detections.json` and one `<stem>_detections.png` each.

    Those files may replace only files an earlier `predict` wrote there and nobody changed since (`overwrite`: any);
    never an input image, nor anything inside the model folder unless `overwrite` ([`file_io.claim_output`]).

    Returns the JSON content: `{"model", "threshold", "top_k", "images": [{"file", "width", "height",
    "detections": [{"label", "score", "box": [xmin, ymin, xmax, ymax]}], "drawing"}]}` (boxes in pixels of the
    original image, detections sorted by descending score). `slice` (`True`, a dict or a
    [`align_detr_hf.slicing.SliceConfig`]): sliced inference, `top_k` then caps the merged detections.
    """
    import torch

    from .file_io import (
        atomic_file,
        atomic_write_text,
        check_output_folder,
        claim_output,
        model_input_folders,
        record_output,
    )
    from .image_io import is_url, open_image, read_source, to_rgb8
    from .visualize import draw_detections

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {threshold}.")
    if top_k < 1:
        raise ValueError(f"--top_k must be at least 1, got {top_k}.")
    from .slicing import SliceConfig, sliced_detect

    slice_config = SliceConfig.coerce(slice)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"--device {device}: not a valid torch device (use cpu or cuda[:N]).") from error
    if kind not in ("cpu", "cuda", "mps", "xpu"):  # e.g. meta: no data to compute with
        raise ValueError(f"--device {device}: cannot run a model there (use cpu or cuda[:N]).")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False).")

    # fail before the (slow) model load and before writing anything: every image decodes (URLs are downloaded
    # now; a truncated file fails here, not after the first drawings were written), the output folder is writable,
    # and no output would replace a file the user owns, an input image, or a file of the model folder
    sources = {}
    for name in images:
        sources[name] = read_source(name)
        open_image(sources[name], name=name)
    out_dir = check_output_folder(output, "--output_dir", create=False)
    paths = [Path(urllib.parse.urlparse(name).path) if is_url(name) else Path(name) for name in images]
    png_names = _output_names(paths)
    inputs = [name for name in images if not is_url(name)] + list(model_input_folders(model))
    for target in ["detections.json"] + (png_names if draw else []):
        claim_output(out_dir / target, PREDICT_WRITER, overwrite=overwrite, inputs=inputs)
    processor, detector = load_detector(model, device, "align-detr predict")
    id2label = detector.config.id2label
    label2id = {str(name): int(i) for i, name in id2label.items()}

    results, written = [], []
    try:
        for name, path, png_name in zip(images, paths, png_names):
            image = open_image(sources[name], name=name)  # displayed orientation, native bit depth
            if slice_config is not None:
                config = dataclasses.replace(slice_config, max_detections=top_k)
                detected = sliced_detect(detector, processor, image, config, threshold=threshold)
            else:
                inputs = processor(images=image, return_tensors="pt").to(device)
                with torch.no_grad():
                    outputs = detector(**inputs)
                detected = processor.post_process_object_detection(
                    outputs, threshold=threshold, target_sizes=[(image.height, image.width)], top_k=top_k
                )[0]
            detections = [
                {
                    "label": str(id2label.get(int(label), id2label.get(str(int(label)), int(label)))),
                    "score": round(float(score), 5),
                    "box": [round(float(v), 2) for v in box],
                }
                for score, label, box in zip(detected["scores"], detected["labels"], detected["boxes"].cpu())
            ]
            entry = {"file": name if is_url(name) else str(path), "width": image.width, "height": image.height,
                     "detections": detections}
            if draw:
                with atomic_file(out_dir / png_name) as temp:
                    draw_detections(to_rgb8(image), detections, label2id=label2id).save(temp, format="PNG")
                written.append(out_dir / png_name)
                entry["drawing"] = str(out_dir / png_name)
            results.append(entry)
            print(f"{name}: {len(detections)} detection(s)" + (f" -> {out_dir / png_name}" if draw else ""))

        report = {"model": model, "threshold": threshold, "top_k": top_k, "images": results}
        json_path = out_dir / "detections.json"
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
        written.append(json_path)
    finally:  # what was written is recorded as ours, also when a later image failed
        record_output(written, PREDICT_WRITER)
    print(f"Wrote {json_path}")
    return report


def _predict(args: argparse.Namespace) -> None:
    predict(
        args.images,
        args.model_name_or_path,
        threshold=args.threshold,
        output=args.output_dir,
        device=args.device,
        top_k=args.top_k,
        draw=not args.no_draw,
        overwrite=args.overwrite,
        slice=_slice_options(args),
    )


def _slice_options(args: argparse.Namespace) -> dict | None:
    """The `--slice` flags as SliceConfig fields (None without --slice)."""
    if not args.slice:
        return None
    options = {"overlap": args.slice_overlap, "merge": args.slice_merge, "full_image": not args.slice_no_full_image}
    return options if args.slice_tile_size is None else {**options, "tile_size": args.slice_tile_size}


# ----------------------------------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> None:
    """COCO metrics and report pictures (align_detr_hf.evaluate_command); nothing is loaded before the arguments,
    the output folder (new or empty, unless --overwrite) and DATA are checked."""
    import torch

    from .evaluate_command import check_data_source, evaluate_detector, evaluation_data, summary_line
    from .evaluation_report import check_report_folder

    at_least = {"batch_size": 1, "top_k": 1, "num_worst": 0, "num_workers": 0, "synthetic_images": 1,
                "synthetic_image_size": 64}
    for name, low in at_least.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}.")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {args.threshold}.")
    inputs = [p for p in (args.model, args.data, args.images) if p and p != "synthetic" and Path(p).exists()]
    check_report_folder(args.output, args.overwrite, inputs=tuple(inputs))
    check_data_source(args.data)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False).")
    processor, detector = load_detector(args.model, device, "align-detr evaluate")
    with evaluation_data(args.data, detector.config.id2label, args.split, args.images, args.synthetic_images,
                         args.synthetic_image_size, args.seed) as dataset:
        result = evaluate_detector(
            detector, processor, dataset, args.output, title=args.model, batch_size=args.batch_size,
            num_workers=args.num_workers, top_k=args.top_k, score_threshold=args.threshold,
            num_worst=args.num_worst, backend=args.backend, overwrite=args.overwrite,
        )
    print(summary_line(result))
    print(f"Wrote {', '.join(sorted(Path(f).name for f in result['files'].values()))} to {args.output}")


# --------------------------------------------------------------------------------------------------------- demo


def _demo(argv: list[str]) -> None:
    """Forward everything after `demo` to `align_detr_hf.demo.main` (imported only now: it may need extras)."""
    import importlib

    try:
        demo = importlib.import_module(".demo", __package__)
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.demo":
            raise SystemExit(
                f"align-detr demo: error: the demo needs a package that is not installed: {error.name}"
            ) from error
        raise SystemExit("align-detr demo: error: this installation has no align_detr_hf.demo module.") from error
    from .file_io import OutputPathError

    try:
        result = demo.main(argv)
    except KeyboardInterrupt:
        _interrupted("demo")
    except (OutputPathError, OSError) as error:  # e.g. the disk filled up while writing outputs
        print(f"align-detr demo: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    if isinstance(result, int) and result != 0:
        raise SystemExit(result)


# ------------------------------------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> None:
    from .export_align_detr import check_exportable
    from .export_pipeline import claim_targets, export_targets
    from .export_verify import failures

    # every file the export would write is checked before loading anything (export_targets checks again with the
    # loaded model's folder)
    claim_targets(os.path.expanduser(args.output), args.model_name_or_path, fp16=args.fp16, int8=args.int8,
                  openvino=args.openvino, verify=args.verify is not None, overwrite=args.overwrite)
    processor, model = load_detector(args.model_name_or_path, "cpu", "align-detr export")
    check_exportable(model)
    try:
        _, report = export_targets(
            model,
            processor,
            os.path.expanduser(args.output),
            opset=args.opset,
            fp16=args.fp16,
            int8=args.int8,
            openvino=args.openvino,
            with_postprocess=args.with_postprocess,
            top_k=args.top_k,
            calibrate=args.calibrate,
            calibration_images=args.calibration_images,
            verify=args.verify,
            verify_images=args.verify_images,
            max_map_drop=args.max_map_drop,
            overwrite=args.overwrite,
        )
    except ImportError as error:  # transformers < 5.25 (no exporters), or an extra that is not installed
        print(f"align-detr export: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    failed = failures(report) if report is not None else []
    if failed:
        print(f"align-detr export: error: certificate failed: {'; '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


def _add_convert_command(commands) -> None:
    convert = commands.add_parser(
        "convert",
        help="convert an mmdetection Align-DETR or DINO (R-50, Swin), official Align-DETR or detrex DINO checkpoint",
    )
    add_flag(convert, "checkpoint", required=True, help="path or URL of the .pth file")
    add_flag(
        convert,
        "output_dir",
        required=True,
        help="folder to write: new, empty or an unchanged earlier conversion (built beside it, swapped in only on "
        "success)",
    )
    add_flag(
        convert,
        "overwrite_output_dir",
        action="store_true",
        aliases=["overwrite"],
        help="write into an output folder that holds more than an unchanged earlier conversion: the conversion's "
        "files are replaced, other files are kept",
    )
    add_flag(convert, "verify", action="store_true", help="reload the written folder and check it")
    add_flag(
        convert,
        "push_to_hub",
        nargs="?",
        const=True,
        default=None,
        metavar="REPO",
        help="also push to the Hub: to --hub_model_id, or to REPO when given",
    )
    add_flag(convert, "hub_model_id", default=None, metavar="REPO", help="the Hub repository of --push_to_hub")
    add_flag(
        convert,
        "allow_pickle",
        action="store_true",
        help="allow full unpickling if weights_only loading fails (runs code from the file: trusted files only)",
    )
    add_flag(convert, "num_denoising_queries", type=int, default=None, help="training-only setting to record")
    add_flag(
        convert,
        "loss_type",
        choices=["align_detr", "dino"],
        default=None,
        help="the loss the checkpoint was trained with, for files whose meta does not say (mmdetection's files do); "
        "picks that head's settings (position encoding, frozen stages); official Align-DETR / detrex files: "
        "align_detr unless told dino",
    )
    convert.set_defaults(func=_convert)


def _add_predict_command(commands) -> None:
    predict_parser = commands.add_parser(
        "predict",
        help="detect objects in images; write detections.json and a drawing per image",
        description="Detect objects in image files. Writes OUTPUT/detections.json (per image: file, width, height, "
        "detections [{label, score, box: [xmin, ymin, xmax, ymax]}] in original-image pixels) and "
        "OUTPUT/<name>_detections.png with labelled boxes.",
    )
    predict_parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files or http(s) URLs (any format Pillow reads)"
    )
    add_flag(predict_parser, "model_name_or_path", required=True, aliases=["model"],
             help="model folder (save_pretrained / convert) or Hub id")
    add_flag(predict_parser, "threshold", type=float, default=0.3, help="minimum score (default 0.3)")
    add_flag(predict_parser, "output_dir", default="predictions", deprecated=["output"],
             help="output folder (default ./predictions)")
    add_flag(predict_parser, "device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)")
    add_flag(predict_parser, "top_k", type=int, default=100, help="detections per image before thresholding")
    add_flag(predict_parser, "no_draw", action="store_true", help="write only the JSON, no PNG drawings")
    add_flag(predict_parser, "overwrite", action="store_true", aliases=["overwrite_output_dir"],
             help="replace output files that an earlier predict did not write (or that were changed since), and "
             "allow writing inside the model folder")
    slicing = predict_parser.add_argument_group("sliced inference (large images, small objects)")
    add_flag(slicing, "slice", action="store_true", help="detect on overlapping tiles + the full image and "
                         "merge (--top-k then caps the merged detections: raise it for dense images, e.g. 1000)")
    add_flag(slicing, "slice_tile_size", type=int, default=None,
                         help="tile side in pixels (default: the processor's shortest_edge, scale 1)")
    add_flag(slicing, "slice_overlap", type=float, default=0.2, help="tile overlap fraction (default 0.2)")
    add_flag(slicing, "slice_merge", choices=["nms", "wbf"], default="nms", help="merge method (default nms)")
    add_flag(slicing, "slice_no_full_image", action="store_true", help="tiles only, no full-image pass")
    predict_parser.set_defaults(func=_predict)


def _add_export_command(commands) -> None:
    export_parser = commands.add_parser(
        "export",
        help="export to ONNX / OpenVINO (float32, float16, int8), optionally certified on data",
        description="Export the detector with dynamic batch, height and width through transformers' exporters. "
        "Inputs pixel_values (B, 3, H, W) as the image processor makes them and pixel_mask (B, H, W); outputs "
        "logits and pred_boxes. See align_detr_hf/export_align_detr.py for the preprocessing steps a consumer must "
        "do, and align_detr_hf/export_runtime.py for the runner that checks inputs as eager PyTorch does. With "
        "--verify DATA each file is run over DATA against eager PyTorch; the report is written beside the file and "
        "into the folder's README.md, and the command exits with status 1 when a file's mAP differs by more than "
        "its threshold.",
    )
    add_flag(export_parser, "model_name_or_path", required=True, aliases=["model"],
             help="model folder (save_pretrained / convert) or Hub id")
    add_flag(export_parser, "output", required=True, help="the .onnx file to write (its folder must exist)")
    add_flag(export_parser, "opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    add_flag(export_parser, "fp16", action="store_true", help="float16 weights and inputs (for GPU runtimes)")
    add_flag(export_parser, "int8", action="store_true",
             help="also write OUTPUT.int8.onnx: int8 static quantization calibrated on --calibrate images (CPU)")
    add_flag(export_parser, "openvino", action="store_true",
             help="also write OUTPUT.xml/.bin for OpenVINO (and OUTPUT.int8.xml/.bin with --int8); needs the "
             "openvino extra")
    add_flag(
        export_parser,
        "with_postprocess",
        action="store_true",
        help="also take target_sizes (B, 2) = original (height, width) and return top-k scores, labels and "
        "boxes (xyxy pixels)",
    )
    add_flag(export_parser, "top_k", type=int, default=300, help="detections per image with --with_postprocess")
    add_flag(export_parser, "verify", metavar="DATA", default=None,
             help="certify every written file on DATA: a COCO folder or annotation .json, a saved `datasets` folder "
             "or Hub id[:split], or synthetic[:N[:SIZE]] (built-in shapes)")
    add_flag(export_parser, "verify_images", type=int, default=None, metavar="N",
             help="use only the first N images of --verify DATA")
    add_flag(export_parser, "max_map_drop", type=float, default=None, metavar="POINTS",
             help="largest accepted |ΔmAP| in points (default 0.1 for float32, 0.5 for float16 and int8)")
    add_flag(export_parser, "calibrate", metavar="DATA", default=None,
             help="int8 calibration images, DATA as for --verify (default synthetic:32; use images like yours)")
    add_flag(export_parser, "calibration_images", type=int, default=32, metavar="N",
             help="calibration images used (default 32)")
    add_flag(export_parser, "overwrite", action="store_true",
             help="replace output files (the .onnx, .int8.onnx, OpenVINO .xml/.bin, the certificate, the README.md "
             "model card) that an earlier export did not write or that were changed since, and allow writing inside "
             "the model folder (never over the model's own files)")
    export_parser.set_defaults(func=_export)


def _add_evaluate_command(commands) -> None:
    evaluate_parser = commands.add_parser(
        "evaluate",
        help="COCO mAP on a data set, with pictures: per-class AP, PR curves, confusions, worst images",
        description="Evaluate a detector on DATA: a COCO annotation json or a folder holding annotations.json (images "
        "in images/ beside it, or --images), a datasets folder saved with save_to_disk, or 'synthetic' (the demo's "
        "shapes). Writes OUTPUT/report.md, evaluation.json, per_class_ap.png, pr_curves.png, confusion.png and "
        "worst_images.png; OUTPUT must be new or empty unless --overwrite.",
    )
    evaluate_parser.add_argument("model", metavar="MODEL", help="model folder (save_pretrained / convert) or Hub id")
    evaluate_parser.add_argument("data", metavar="DATA", help="COCO json or folder, save_to_disk folder, or synthetic")
    add_flag(evaluate_parser, "output_dir", dest="output", deprecated=["output"], default="evaluation",
             help="output folder (default ./evaluation)")
    add_flag(evaluate_parser, "overwrite", action="store_true",
                                 help="write into a non-empty folder (the report's files are replaced, others kept)")
    add_flag(evaluate_parser, "split", default=None, help="split of a DatasetDict (default validation/val/test)")
    add_flag(evaluate_parser, "images", default=None, help="image folder of a COCO json (default images/ beside)")
    add_flag(evaluate_parser, "batch_size", type=int, default=8, help="images per forward pass (default 8)")
    add_flag(evaluate_parser, "num_workers", type=int, default=0, help="image decoding processes (default 0)")
    add_flag(evaluate_parser, "device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    add_flag(evaluate_parser, "top_k", type=int, default=100, help="detections per image scored (default 100)")
    add_flag(evaluate_parser, "threshold", type=float, default=0.3,
                                 help="score above which a detection counts in the confusions and drawings")
    add_flag(evaluate_parser, "num_worst", type=int, default=8, help="worst images drawn (default 8)")
    add_flag(evaluate_parser, "backend", choices=["auto", "faster_coco_eval", "pycocotools"], default="auto",
                                 help="evaluation implementation (auto: the compact streaming one, pycocotools' numbers bit for bit, "
                                 "memory ~10 KiB per image; faster_coco_eval / pycocotools run COCOeval at the end)")
    add_flag(evaluate_parser, "synthetic_images", type=int, default=100, help="with DATA synthetic")
    add_flag(evaluate_parser, "synthetic_image_size", type=int, default=128, help="with DATA synthetic")
    add_flag(evaluate_parser, "seed", type=int, default=10_000, help="with DATA synthetic (the demo's val seed)")
    evaluate_parser.set_defaults(func=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align-detr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, help="the command to run")

    _add_convert_command(commands)
    _add_predict_command(commands)
    _add_export_command(commands)
    _add_evaluate_command(commands)
    # parsed by main() itself so that every argument (--help included) reaches demo.main; listed here for --help
    commands.add_parser("demo", help="run the demo (arguments are passed on: `align-detr demo --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as error:  # bad input or a file-system refusal: one line, no traceback
        print(f"align-detr {args.command}: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    except KeyboardInterrupt:
        _interrupted(args.command)


def _interrupted(command: str) -> None:
    """Ctrl-C: one line and the shell's exit status for SIGINT. Writes are atomic (file_io): an output is either
    complete or absent, and staging folders are removed on the way out."""
    print(f"align-detr {command}: interrupted (Ctrl-C); outputs not finished were not written.", file=sys.stderr)
    raise SystemExit(130)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename:
        text = f"{error.strerror or type(error).__name__}: {error.filename}"
    return text


if __name__ == "__main__":
    main()
