"""`align-detr export` as a library call: the exported files a user asked for, then their certificate.

    files, report = export_targets(model, processor, "out/model.onnx", int8=True, openvino=True, verify="synthetic")

Files, named after `output` (model.onnx here):
    model.onnx          float32 (or float16 with fp16), transformers' OnnxExporter (`export_align_detr.py`)
    model.int8.onnx     int8 static quantization of model.onnx, calibrated on `calibrate` images (`quantize.py`)
    model.xml / .bin    OpenVINO, transformers' OpenVINOExporter (`export_openvino.py`)
    model.int8.xml/.bin OpenVINO running model.int8.onnx's int8 layers
    model.certificate.json / .md, and a section of README.md: with `verify` (`export_verify.py`)
Calibration images default to 32 synthetic ones drawn with another seed than the synthetic verification images;
calibrate on images like your own (a training folder) for a real model.
"""

from __future__ import annotations

from pathlib import Path

from .export_align_detr import _check_output_path, export_onnx

DEFAULT_CALIBRATION = "synthetic:32"
CALIBRATION_SEED = 4321


def target_files(output, fp16: bool = False, int8: bool = False, openvino: bool = False) -> dict[str, Path]:
    """{target name: file} for the requested targets (the names the certificate uses)."""
    path = Path(output)
    targets = {"onnxruntime-fp16" if fp16 else "onnxruntime": path}
    if int8:
        targets["onnxruntime-int8"] = path.with_name(f"{path.stem}.int8.onnx")
    if openvino:  # float32 (the model's own precision), whatever the ONNX file's
        targets["openvino"] = path.with_suffix(".xml")
        if int8:
            targets["openvino-int8"] = path.with_name(f"{path.stem}.int8.xml")
    return targets


def export_targets(model, processor, output, *, opset: int = 18, fp16: bool = False, int8: bool = False,
                   openvino: bool = False, with_postprocess: bool = False, top_k: int = 300,
                   calibrate: str | None = None, calibration_images: int = 32, verify: str | None = None,
                   verify_images: int | None = None, max_map_drop: float | None = None, batch_size: int = 4,
                   threads: int | None = None, log=print) -> tuple[dict[str, Path], dict | None]:
    """Export, quantize, convert and (with `verify`) certify; returns ({target: file}, the report or None)."""
    from .export_verify import calibration_batches, certify, load_verification_data, write_certificate

    if fp16 and int8:
        raise ValueError("--int8 quantizes the float32 export; drop --fp16 (an int8 file has float parts in float32).")
    if calibrate is not None and not int8:
        raise ValueError("--calibrate gives int8 calibration images; add --int8.")
    if not isinstance(calibration_images, int) or calibration_images < 1:
        raise ValueError(f"--calibration-images must be at least 1, got {calibration_images!r}.")
    _check_output_path(output)  # before the data, the calibration and the tracing
    targets = target_files(output, fp16, int8, openvino)
    if openvino:
        from .export_openvino import _check_openvino

        _check_openvino()  # before minutes of tracing
    # bad data fails before the export, not after
    verification = load_verification_data(verify, verify_images) if verify is not None else None
    calibration = None
    if int8:
        data = load_verification_data(calibrate or DEFAULT_CALIBRATION, calibration_images, seed=CALIBRATION_SEED)
        calibration = calibration_batches(data, processor, batch_size, with_postprocess)

    main = next(iter(targets.values()))
    export_onnx(model, main, opset=opset, fp16=fp16, with_postprocess=with_postprocess, top_k=top_k)
    log(f"Wrote {main} ({main.stat().st_size / 2**20:.1f} MiB)")
    if int8:
        from .quantize import quantize_onnx

        quantize_onnx(main, targets["onnxruntime-int8"], calibration)
        log(f"Wrote {targets['onnxruntime-int8']} (int8, calibrated on {len(data)} images of "
            f"{calibrate or DEFAULT_CALIBRATION})")
    if "openvino" in targets:
        from .export_openvino import export_openvino

        export_openvino(model, targets["openvino"], with_postprocess=with_postprocess, top_k=top_k)
        log(f"Wrote {targets['openvino']} (OpenVINO)")
    if "openvino-int8" in targets:
        from .export_openvino import onnx_to_openvino

        onnx_to_openvino(targets["onnxruntime-int8"], targets["openvino-int8"])
        log(f"Wrote {targets['openvino-int8']} (OpenVINO, int8)")
    if verification is None:
        return targets, None
    report = certify(model, processor, verification, targets, batch_size=batch_size, max_map_drop=max_map_drop,
                     threads=threads, data_name=str(verify))
    for path in write_certificate(report, main):
        log(f"Wrote {path}")
    for target in report["targets"]:
        log(f"{target['name']}: mAP {target['metrics']['map'] * 100:.1f} (eager "
            f"{report['eager']['metrics']['map'] * 100:.1f}), ΔmAP {target['delta_map_points']:.2f} points "
            f"(threshold {target['threshold_points']:g}), largest box difference {target['max_box_diff_px']:.3g} px: "
            f"{'pass' if target['passed'] else 'FAIL'}")
    return targets, report
