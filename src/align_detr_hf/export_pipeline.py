"""`align-detr export` as a library call: the exported files a user asked for, then their certificate.

    files, report = export_targets(model, processor, "out/model.onnx", int8=True, openvino=True, verify="synthetic")

Files, named after `output` (model.onnx here):
    model.onnx          float32 (or float16 with fp16), transformers' OnnxExporter (`export_align_detr.py`)
    model.int8.onnx     int8 static quantization of model.onnx, calibrated on `calibrate` images (`quantize.py`)
    model.xml / .bin    OpenVINO, transformers' OpenVINOExporter (`export_openvino.py`)
    model.int8.xml/.bin OpenVINO running model.int8.onnx's int8 layers
    model.certificate.json / .md, and a section of README.md: with `verify` (`export_verify.py`)
Every one of them follows the ownership rule (`file_io`): it may replace only a file an earlier export wrote and
nobody changed since (or any, with `overwrite`), never one of the model's own files, and lies in the model's folder
only with `overwrite`. All of them are checked before any work (`claim_targets`), and each again as it lands.
Calibration images default to 32 synthetic ones drawn with another seed than the synthetic verification images;
calibrate on images like your own (a training folder) for a real model.
"""

from __future__ import annotations

import os
from pathlib import Path

from .export_align_detr import WRITER, _check_output_path, export_onnx, model_inputs
from .file_io import claim_output, model_input_folders

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


def output_files(output, fp16: bool = False, int8: bool = False, openvino: bool = False,
                 verify: bool = False) -> list[Path]:
    """Every file an export with these options writes: the targets (an OpenVINO .xml with its .bin), and with
    `verify` the certificate (.json, .md) and the model card (README.md) beside the main file."""
    from .export_verify import certificate_paths

    targets = target_files(output, fp16, int8, openvino)
    files = [file for path in targets.values()
             for file in ((path, path.with_suffix(".bin")) if path.suffix == ".xml" else (path,))]
    if verify:
        files.extend(certificate_paths(next(iter(targets.values()))))
    if len({file.resolve() for file in files}) != len(files):
        raise ValueError(f"output {output}: its exported files would share a name ({', '.join(f.name for f in files)});"
                         " give an .onnx file name such as model.onnx.")
    return files


def claim_targets(output, inputs, *, fp16: bool = False, int8: bool = False, openvino: bool = False,
                  verify: bool = False, overwrite: bool = False) -> list[Path]:
    """Check, before any work, that an export may write every one of its files (`output_files`); `inputs` is the
    model (a folder or Hub id, or the model itself) whose files no output may replace. Raises a one-line
    `file_io.OutputPathError` naming the first file refused."""
    if isinstance(inputs, (str, Path)):
        inputs = model_input_folders(inputs)
    elif hasattr(inputs, "config"):
        inputs = model_inputs(inputs)
    # the path as given first: an empty one, or one ending in a separator (a folder), is refused as such
    claim_output(os.path.expanduser(str(output)), WRITER, overwrite=overwrite, inputs=inputs)
    files = output_files(Path(output).expanduser(), fp16, int8, openvino, verify)
    for file in files:
        _check_output_path(file, inputs, overwrite)
    return files


def export_targets(model, processor, output, *, opset: int = 18, fp16: bool = False, int8: bool = False,
                   openvino: bool = False, with_postprocess: bool = False, top_k: int = 300,
                   calibrate: str | None = None, calibration_images: int = 32, verify: str | None = None,
                   verify_images: int | None = None, max_map_drop: float | None = None, batch_size: int = 4,
                   threads: int | None = None, overwrite: bool = False,
                   log=print) -> tuple[dict[str, Path], dict | None]:
    """Export, quantize, convert and (with `verify`) certify; returns ({target: file}, the report or None).
    `overwrite`: see the module docstring."""
    from .export_verify import calibration_batches, certify, load_verification_data, write_certificate

    if fp16 and int8:
        raise ValueError("--int8 quantizes the float32 export; drop --fp16 (an int8 file has float parts in float32).")
    if calibrate is not None and not int8:
        raise ValueError("--calibrate gives int8 calibration images; add --int8.")
    if not isinstance(calibration_images, int) or calibration_images < 1:
        raise ValueError(f"--calibration_images must be at least 1, got {calibration_images!r}.")
    output = Path(output).expanduser()
    inputs = model_inputs(model)
    # before the data, the calibration and the tracing
    claim_targets(output, inputs, fp16=fp16, int8=int8, openvino=openvino, verify=verify is not None,
                  overwrite=overwrite)
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
    export_onnx(model, main, opset=opset, fp16=fp16, with_postprocess=with_postprocess, top_k=top_k,
                overwrite=overwrite)
    log(f"Wrote {main} ({main.stat().st_size / 2**20:.1f} MiB)")
    if int8:
        from .quantize import quantize_onnx

        quantize_onnx(main, targets["onnxruntime-int8"], calibration, overwrite=overwrite, inputs=inputs)
        log(f"Wrote {targets['onnxruntime-int8']} (int8, calibrated on {len(data)} images of "
            f"{calibrate or DEFAULT_CALIBRATION})")
    if "openvino" in targets:
        from .export_openvino import export_openvino

        export_openvino(model, targets["openvino"], with_postprocess=with_postprocess, top_k=top_k,
                        overwrite=overwrite)
        log(f"Wrote {targets['openvino']} (OpenVINO)")
    if "openvino-int8" in targets:
        from .export_openvino import onnx_to_openvino

        onnx_to_openvino(targets["onnxruntime-int8"], targets["openvino-int8"], overwrite=overwrite, inputs=inputs)
        log(f"Wrote {targets['openvino-int8']} (OpenVINO, int8)")
    if verification is None:
        return targets, None
    report = certify(model, processor, verification, targets, batch_size=batch_size, max_map_drop=max_map_drop,
                     threads=threads, data_name=str(verify))
    for path in write_certificate(report, main, overwrite=overwrite, inputs=inputs):
        log(f"Wrote {path}")
    for target in report["targets"]:
        log(f"{target['name']}: mAP {target['metrics']['map'] * 100:.1f} (eager "
            f"{report['eager']['metrics']['map'] * 100:.1f}), ΔmAP {target['delta_map_points']:.2f} points "
            f"(threshold {target['threshold_points']:g}), largest box difference {target['max_box_diff_px']:.3g} px: "
            f"{'pass' if target['passed'] else 'FAIL'}")
    return targets, report
