"""The `align-detr` command: `convert` (mmdetection checkpoint -> Hugging Face folder), `predict`, `export`, `demo`."""

import argparse
import json
import os
import sys
import urllib.parse
from pathlib import Path


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
        push_to_hub=args.push_to_hub,
        allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    print(f"Wrote {args.output_dir}" + (" (verified)" if args.verify else ""))


# ------------------------------------------------------------------------------------------------------ predict


def _looks_like_path(name: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else (absolute, ./, ~, backslashes, several slashes) is a path."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.isabs(name)
        or name.endswith("/")
    )


def _load_model(model: str, device: str):
    """Load (image processor, model) from a local folder or a Hub id, with errors that say what was looked for."""
    from transformers import AutoModelForObjectDetection
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from .image_processing_align_detr import AlignDetrImageProcessor

    local = Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"model folder {local.resolve()} has no config.json; expected a folder written by "
                "`save_pretrained` or `align-detr convert` (config.json + model.safetensors)."
            )
        source = str(local)
    elif local.exists():
        raise ValueError(f"--model {model}: {local.resolve()} is a file; pass the folder that holds config.json.")
    elif _looks_like_path(model):
        raise FileNotFoundError(f"model folder not found: {local.resolve()} (from --model {model}).")
    else:
        source = model

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    try:
        detector = AutoModelForObjectDetection.from_pretrained(source)
    except OSError as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        if local.is_dir():
            raise ValueError(f"could not load the model in folder {local.resolve()}: {first_line}") from error
        if offline:
            hint = (
                "HF_HUB_OFFLINE is set, so only the local Hugging Face cache was searched and it has no copy; "
                "unset HF_HUB_OFFLINE (with network access) to download it, or pass a local folder"
            )
        else:
            hint = "check the spelling, the network, and for private models `hf auth login`"
        raise FileNotFoundError(
            f"could not load model '{model}': there is no folder {local.resolve()}, and as a Hugging Face Hub id "
            f"it could not be loaded ({hint}). Cause: {first_line}"
        ) from error
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        print(
            f"align-detr predict: note: no image processor config in '{model}'; using AlignDetrImageProcessor() "
            "defaults (mmdetection's test pipeline).",
            file=sys.stderr,
        )
        processor = AlignDetrImageProcessor()
    return processor, detector.to(device).eval()


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
) -> dict:
    """Run the detector on image files; write `<output>/detections.json` and one `<stem>_detections.png` each.

    Returns the JSON content: `{"model", "threshold", "top_k", "images": [{"file", "width", "height",
    "detections": [{"label", "score", "box": [xmin, ymin, xmax, ymax]}], "drawing"}]}` (boxes in pixels of the
    original image, detections sorted by descending score).
    """
    import torch

    from .file_io import atomic_file, atomic_write_text, check_output_folder
    from .image_io import is_url, open_image, read_source, to_rgb8
    from .visualize import draw_detections

    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"--threshold must be between 0 and 1, got {threshold}.")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}.")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"--device {device}: not a valid torch device (use cpu or cuda[:N]).") from error
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch.cuda.is_available() is False).")

    # fail before the (slow) model load and before writing anything: every image decodes (URLs are downloaded
    # now; a truncated file fails here, not after the first drawings were written), the output folder is writable
    sources = {}
    for name in images:
        sources[name] = read_source(name)
        open_image(sources[name], name=name)
    out_dir = check_output_folder(output, "--output", create=False)
    processor, detector = _load_model(model, device)
    id2label = detector.config.id2label
    label2id = {str(name): int(i) for i, name in id2label.items()}

    paths = [Path(urllib.parse.urlparse(name).path) if is_url(name) else Path(name) for name in images]
    results = []
    for name, path, png_name in zip(images, paths, _output_names(paths)):
        image = open_image(sources[name], name=name)  # displayed orientation, native bit depth
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
            entry["drawing"] = str(out_dir / png_name)
        results.append(entry)
        print(f"{name}: {len(detections)} detection(s)" + (f" -> {out_dir / png_name}" if draw else ""))

    report = {"model": model, "threshold": threshold, "top_k": top_k, "images": results}
    json_path = out_dir / "detections.json"
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    print(f"Wrote {json_path}")
    return report


def _predict(args: argparse.Namespace) -> None:
    predict(
        args.images,
        args.model,
        threshold=args.threshold,
        output=args.output,
        device=args.device,
        top_k=args.top_k,
        draw=not args.no_draw,
    )


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
    except (OutputPathError, OSError) as error:  # e.g. the disk filled up while writing outputs
        print(f"align-detr demo: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    if isinstance(result, int) and result != 0:
        raise SystemExit(result)


# ------------------------------------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> None:
    from .export_align_detr import check_exportable
    from .export_pipeline import export_targets
    from .export_verify import failures

    processor, model = _load_model(args.model, "cpu")
    check_exportable(model)
    try:
        _, report = export_targets(
            model,
            processor,
            args.output,
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
        )
    except ImportError as error:  # transformers < 5.25 (no exporters), or an extra that is not installed
        print(f"align-detr export: error: {_one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    failed = failures(report) if report is not None else []
    if failed:
        print(f"align-detr export: error: certificate failed: {'; '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align-detr", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert an mmdetection Align-DETR or DINO (R-50, Swin) checkpoint")
    convert.add_argument("--checkpoint", required=True, help="path or URL of the .pth file")
    convert.add_argument(
        "--output-dir",
        required=True,
        help="folder to write: new, empty or a previous conversion (built beside it, swapped in only on success)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty output folder that is not a previous conversion"
    )
    convert.add_argument("--verify", action="store_true", help="reload the written folder and check it")
    convert.add_argument("--push-to-hub", default=None, metavar="REPO", help="also push to this Hub repository")
    convert.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow full unpickling if weights_only loading fails (runs code from the file: trusted files only)",
    )
    convert.add_argument("--num-denoising-queries", type=int, default=None, help="training-only setting to record")
    convert.add_argument(
        "--loss-type",
        choices=["align_detr", "dino"],
        default=None,
        help="the loss the checkpoint was trained with, for files whose meta does not say (mmdetection's files do); "
        "picks that head's settings (position encoding, frozen stages)",
    )
    convert.set_defaults(func=_convert)

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
    predict_parser.add_argument("--model", required=True, help="model folder (save_pretrained / convert) or Hub id")
    predict_parser.add_argument("--threshold", type=float, default=0.3, help="minimum score (default 0.3)")
    predict_parser.add_argument("--output", default="predictions", help="output folder (default ./predictions)")
    predict_parser.add_argument(
        "--device", default=None, help="cpu or cuda[:N] (default: cuda when available, else cpu)"
    )
    predict_parser.add_argument("--top-k", type=int, default=100, help="detections per image before thresholding")
    predict_parser.add_argument("--no-draw", action="store_true", help="write only the JSON, no PNG drawings")
    predict_parser.set_defaults(func=_predict)

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
    export_parser.add_argument("--model", required=True, help="model folder (save_pretrained / convert) or Hub id")
    export_parser.add_argument("--output", required=True, help="the .onnx file to write (its folder must exist)")
    export_parser.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    export_parser.add_argument("--fp16", action="store_true", help="float16 weights and inputs (for GPU runtimes)")
    export_parser.add_argument(
        "--int8", action="store_true",
        help="also write OUTPUT.int8.onnx: int8 static quantization calibrated on --calibrate images (CPU)",
    )
    export_parser.add_argument(
        "--openvino", action="store_true",
        help="also write OUTPUT.xml/.bin for OpenVINO (and OUTPUT.int8.xml with --int8); needs the openvino extra",
    )
    export_parser.add_argument(
        "--with-postprocess",
        action="store_true",
        help="also take target_sizes (B, 2) = original (height, width) and return top-k scores, labels and "
        "boxes (xyxy pixels)",
    )
    export_parser.add_argument("--top-k", type=int, default=300, help="detections per image with --with-postprocess")
    export_parser.add_argument(
        "--verify", metavar="DATA", default=None,
        help="certify every written file on DATA: a COCO folder or annotation .json, a saved `datasets` folder or "
        "Hub id[:split], or synthetic[:N[:SIZE]] (built-in shapes)",
    )
    export_parser.add_argument(
        "--verify-images", type=int, default=None, metavar="N", help="use only the first N images of DATA"
    )
    export_parser.add_argument(
        "--max-map-drop", type=float, default=None, metavar="POINTS",
        help="largest accepted |ΔmAP| in points (default 0.1 for float32, 0.5 for float16 and int8)",
    )
    export_parser.add_argument(
        "--calibrate", metavar="DATA", default=None,
        help="int8 calibration images, DATA as for --verify (default synthetic:32; use images like yours)",
    )
    export_parser.add_argument(
        "--calibration-images", type=int, default=32, metavar="N", help="calibration images used (default 32)"
    )
    export_parser.set_defaults(func=_export)

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


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename:
        text = f"{error.strerror or type(error).__name__}: {error.filename}"
    return text


if __name__ == "__main__":
    main()
