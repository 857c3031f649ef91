"""Conversion of mmdetection Align-DETR checkpoints into `AlignDetrForObjectDetection` weights.

`convert_state_dict` renames every key (and splits the decoder's fused q/k/v projection); unknown or missing keys
raise a `ConversionError` that lists them. `config_from_state_dict` reads the architecture off the tensor shapes.
`convert_checkpoint` does the whole job: load (with an integrity check of the sha256 prefix mmdetection puts in
its file names), convert, optionally verify, and write a Hub-ready folder atomically (temp folder, then rename).

Loading a pickle (`.pth`) runs code from the file: only convert checkpoints you trust. `weights_only=True` is
tried first; mmdetection's `meta` (config text, dataset info) sometimes needs `weights_only=False`, which is
only used when `allow_pickle=True`.
"""

import hashlib
import os
import re
import shutil
import tempfile
import urllib.parse
import zipfile
from pathlib import Path

import torch

from .configuration_align_detr import COCO_CLASSES, AlignDetrConfig
from .hub import saving_remote_code  # noqa: F401  (moved to hub.py; every save carries our code now)
from .image_processing_align_detr import AlignDetrImageProcessor
from .modeling_align_detr import AlignDetrForObjectDetection


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says which keys or bytes are wrong."""


# (mmdetection pattern, our name); applied in order, first match wins; {L} = number of decoder layers
_RENAMES = [
    (r"level_embed", r"model.level_embed"),
    (r"query_embedding\.weight", r"model.query_embedding.weight"),
    (r"memory_trans_fc\.(weight|bias)", r"model.enc_output.\1"),
    (r"memory_trans_norm\.(weight|bias)", r"model.enc_output_norm.\1"),
    (r"dn_query_generator\.label_embedding\.weight", r"model.denoising_class_embed.weight"),
    # ResNet (torchvision names) -> transformers' ResNetBackbone
    (r"backbone\.conv1\.weight", r"model.backbone.model.embedder.embedder.convolution.weight"),
    (r"backbone\.bn1\.(\w+)", r"model.backbone.model.embedder.embedder.normalization.\1"),
    (r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight", "BLOCK_CONV"),
    (r"backbone\.layer(\d)\.(\d+)\.bn(\d)\.(\w+)", "BLOCK_NORM"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight", "SHORTCUT_CONV"),
    (r"backbone\.layer(\d)\.(\d+)\.downsample\.1\.(\w+)", "SHORTCUT_NORM"),
    # neck
    (r"neck\.convs\.(\d+)\.conv\.(weight|bias)", r"model.input_proj.\1.0.\2"),
    (r"neck\.convs\.(\d+)\.gn\.(weight|bias)", r"model.input_proj.\1.1.\2"),
    (r"neck\.extra_convs\.(\d+)\.conv\.(weight|bias)", "EXTRA_CONV"),
    (r"neck\.extra_convs\.(\d+)\.gn\.(weight|bias)", "EXTRA_NORM"),
    # encoder
    (r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)", r"model.encoder.layers.\1.self_attn.\2.\3"),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"model.encoder.layers.\1.fc1.\2"),
    (r"encoder\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"model.encoder.layers.\1.fc2.\2"),
    (r"encoder\.layers\.(\d+)\.norms\.0\.(weight|bias)", r"model.encoder.layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.norms\.1\.(weight|bias)", r"model.encoder.layers.\1.final_layer_norm.\2"),
    # decoder
    (r"decoder\.layers\.(\d+)\.self_attn\.attn\.in_proj_(weight|bias)", "QKV"),
    (r"decoder\.layers\.(\d+)\.self_attn\.attn\.out_proj\.(weight|bias)", r"model.decoder.layers.\1.self_attn.o_proj.\2"),
    (r"decoder\.layers\.(\d+)\.cross_attn\.(\w+)\.(weight|bias)", r"model.decoder.layers.\1.encoder_attn.\2.\3"),
    (r"decoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"model.decoder.layers.\1.fc1.\2"),
    (r"decoder\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"model.decoder.layers.\1.fc2.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.0\.(weight|bias)", r"model.decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.1\.(weight|bias)", r"model.decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (r"decoder\.layers\.(\d+)\.norms\.2\.(weight|bias)", r"model.decoder.layers.\1.final_layer_norm.\2"),
    (r"decoder\.ref_point_head\.layers\.(\d)\.(weight|bias)", r"model.decoder.reference_points_head.layers.\1.\2"),
    (r"decoder\.norm\.(weight|bias)", r"model.decoder.layer_norm.\1"),
    # heads: branch index L (= number of decoder layers) is the encoder-proposal head
    (r"bbox_head\.cls_branches\.(\d+)\.(weight|bias)", "CLS_BRANCH"),
    (r"bbox_head\.reg_branches\.(\d+)\.([024])\.(weight|bias)", "REG_BRANCH"),
]
_RENAMES = [(re.compile(pattern + "$"), target) for pattern, target in _RENAMES]
_IGNORED = re.compile(r".*num_batches_tracked$")  # BatchNorm counters of non-frozen-BN variants


def _rename(key: str, match: re.Match, target: str, num_decoder_layers: int, num_backbone_levels: int):
    """Our name(s) for one mmdetection key: a list of (name, slice of the fused tensor or None)."""
    g = match.groups()
    backbone = "model.backbone.model.encoder.stages"
    if target == "BLOCK_CONV":
        return [(f"{backbone}.{int(g[0]) - 1}.layers.{g[1]}.layer.{int(g[2]) - 1}.convolution.weight", None)]
    if target == "BLOCK_NORM":
        return [(f"{backbone}.{int(g[0]) - 1}.layers.{g[1]}.layer.{int(g[2]) - 1}.normalization.{g[3]}", None)]
    if target == "SHORTCUT_CONV":
        return [(f"{backbone}.{int(g[0]) - 1}.layers.{g[1]}.shortcut.convolution.weight", None)]
    if target == "SHORTCUT_NORM":
        return [(f"{backbone}.{int(g[0]) - 1}.layers.{g[1]}.shortcut.normalization.{g[2]}", None)]
    if target in ("EXTRA_CONV", "EXTRA_NORM"):
        index = int(g[0]) + num_backbone_levels
        return [(f"model.input_proj.{index}.{0 if target == 'EXTRA_CONV' else 1}.{g[1]}", None)]
    if target == "QKV":
        prefix = f"model.decoder.layers.{g[0]}.self_attn"
        return [(f"{prefix}.{name}_proj.{g[1]}", i) for i, name in enumerate("qkv")]
    if target == "CLS_BRANCH":
        index = int(g[0])
        return [(f"class_embed.{index}.{g[1]}" if index < num_decoder_layers else f"model.enc_score_head.{g[1]}", None)]
    if target == "REG_BRANCH":
        index, layer = int(g[0]), int(g[1]) // 2
        head = f"model.decoder.bbox_embed.{index}" if index < num_decoder_layers else "model.enc_bbox_head"
        return [(f"{head}.layers.{layer}.{g[2]}", None)]
    return [(match.expand(target), None)]


def convert_state_dict(mmdet_state_dict: dict, config: AlignDetrConfig) -> dict[str, torch.Tensor]:
    """mmdetection Align-DETR state dict -> `AlignDetrForObjectDetection` state dict.

    Raises `ConversionError` listing every key that matches no rule.
    """
    num_backbone_levels = len(config.backbone_config.out_features)
    converted, unknown = {}, []
    for key, tensor in mmdet_state_dict.items():
        if _IGNORED.match(key):
            continue
        for pattern, target in _RENAMES:
            match = pattern.match(key)
            if match:
                for name, part in _rename(key, match, target, config.decoder_layers, num_backbone_levels):
                    converted[name] = tensor if part is None else tensor.chunk(3, dim=0)[part].clone()
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint keys have no Align-DETR counterpart (is this an mmdetection Align-DETR/DINO "
            f"checkpoint?): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    return converted


def config_from_state_dict(mmdet_state_dict: dict, **overrides) -> AlignDetrConfig:
    """Read the architecture (ResNet depth and widths, layer counts, FFN sizes, queries, classes) off the shapes.

    Training-only settings that leave no trace in the weights (denoising budget, `num_gt_repeat`) keep their
    defaults unless given in `overrides`; position-encoding settings are Align-DETR's.
    """
    sd = mmdet_state_dict
    required = ["backbone.conv1.weight", "query_embedding.weight", "level_embed", "bbox_head.cls_branches.0.weight"]
    missing = [key for key in required if key not in sd]
    if missing:
        raise ConversionError(f"Not an mmdetection Align-DETR/DINO checkpoint: missing {missing}.")

    def count(pattern):
        return len({m.group(1) for key in sd if (m := re.match(pattern, key))})

    stages = sorted({int(m.group(1)) for key in sd if (m := re.match(r"backbone\.layer(\d)\.", key))})
    depths = [count(rf"backbone\.layer{s}\.(\d+)\.") for s in stages]
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    last_conv = "conv3" if bottleneck else "conv2"
    hidden_sizes = [sd[f"backbone.layer{s}.0.{last_conv}.weight"].shape[0] for s in stages]
    neck_in = [sd[f"neck.convs.{i}.conv.weight"].shape[1] for i in range(count(r"neck\.convs\.(\d+)\."))]
    out_features = [f"stage{hidden_sizes.index(c) + 1}" for c in neck_in]
    num_classes = sd["bbox_head.cls_branches.0.weight"].shape[0]
    backbone_config = {
        "model_type": "resnet",
        "embedding_size": sd["backbone.conv1.weight"].shape[0],
        "hidden_sizes": hidden_sizes,
        "depths": depths,
        "layer_type": "bottleneck" if bottleneck else "basic",
        "out_features": out_features,
    }
    kwargs = dict(
        backbone_config=backbone_config,
        d_model=sd["level_embed"].shape[1],
        num_feature_levels=sd["level_embed"].shape[0],
        encoder_layers=count(r"encoder\.layers\.(\d+)\."),
        decoder_layers=count(r"decoder\.layers\.(\d+)\."),
        encoder_ffn_dim=sd["encoder.layers.0.ffn.layers.0.0.weight"].shape[0],
        decoder_ffn_dim=sd["decoder.layers.0.ffn.layers.0.0.weight"].shape[0],
        num_queries=sd["query_embedding.weight"].shape[0],
    )
    if num_classes == len(COCO_CLASSES):
        kwargs["id2label"] = dict(enumerate(COCO_CLASSES))
    else:
        kwargs["num_labels"] = num_classes
    kwargs.update(overrides)
    return AlignDetrConfig(**kwargs)


def expected_sha256_prefix(path_or_url: str) -> str | None:
    """mmdetection's published files end in `-<first 8 hex digits of the sha256>.pth`."""
    match = re.search(r"-([0-9a-f]{8})\.pth$", os.path.basename(urllib.parse.urlparse(str(path_or_url)).path))
    return match.group(1) if match else None


def _check_zip_integrity(path: str) -> None:
    """torch.save files are zip archives with a CRC-32 per entry, which torch.load does not check: flipped bytes in
    the tensor data would load silently. Verify every entry's CRC (one read of the file, like the sha256 check)."""
    if not zipfile.is_zipfile(path):
        return  # legacy (pre-1.6) format, or too broken to be a zip: torch.load reports it
    try:
        with zipfile.ZipFile(path) as archive:
            bad_entry = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ConversionError(f"{path} is a corrupted checkpoint archive ({type(error).__name__}: {error}).") from error
    if bad_entry is not None:
        raise ConversionError(
            f"{path} is corrupted: the entry {bad_entry} fails its CRC-32 check (damaged download or disk?)."
        )


def _download(url: str, timeout: float = 60.0) -> str:
    """Download `url` once into the temp folder (atomically: a failed download leaves nothing behind)."""
    import urllib.error
    import urllib.request

    from .file_io import atomic_file

    name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.pth"
    local = Path(tempfile.gettempdir()) / name
    if local.is_file() and local.stat().st_size > 0:
        return str(local)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, atomic_file(local) as temp:  # noqa: S310
            with open(temp, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
    except urllib.error.HTTPError as error:
        raise ConversionError(f"cannot download {url}: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ConversionError(f"cannot download {url}: {getattr(error, 'reason', error)}.") from error
    return str(local)


def _check_checkpoint_bytes(path: str) -> None:
    """Name the obvious non-checkpoints (empty file, text or HTML such as an error page saved as .pth) before
    torch.load gives an unpickling error whose allow_pickle hint cannot help."""
    size = os.path.getsize(path)
    if size == 0:
        raise ConversionError(f"{path} is empty (0 bytes): not a checkpoint (interrupted download?).")
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # zip (torch >= 1.6) or a pickle (legacy torch.save)
        return
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return  # binary of some other kind: torch.load says what it can
    if all(c.isprintable() or c.isspace() for c in text):
        html = "<html" in text.lower() or "<!doctype" in text.lower()
        kind = "HTML (an error page saved instead of the file?)" if html else "text"
        preview = text.strip().splitlines()[0][:60] if text.strip() else ""
        raise ConversionError(f"{path} is {kind}, not a torch checkpoint ({size} bytes, starts with {preview!r}).")


def _check_not_wrapped(path: str, state_dict: dict) -> None:
    """A state dict saved from a DistributedDataParallel / DataParallel wrapper has every key under `module.`."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        raise ConversionError(
            f"{path}: every key starts with 'module.' (saved from a DistributedDataParallel wrapper). Strip the "
            "prefix and save again: {k.removeprefix('module.'): v for k, v in state_dict.items()}."
        )


def load_checkpoint(path_or_url: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read an mmdetection checkpoint (`{'meta', 'state_dict'}` or a bare state dict) from a path or URL, after
    checking the sha256 prefix of its file name when it has one."""
    path = str(path_or_url)
    if re.match(r"https?://", path):
        path = _download(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    _check_checkpoint_bytes(path)
    prefix = expected_sha256_prefix(path)
    if prefix is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if not digest.hexdigest().startswith(prefix):
            raise ConversionError(
                f"{path}: sha256 {digest.hexdigest()[:8]}... does not match the prefix {prefix} in its name "
                "(truncated or corrupted download?)."
            )
    _check_zip_integrity(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a pickle needing arbitrary classes, or a broken file
        # only an unpickler refusing a global can be helped by allow_pickle; "invalid load key" etc. cannot
        needs_pickle = "Weights only load failed" in str(error) and "Unsupported" in str(error)
        if not allow_pickle or not needs_pickle:
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            raise ConversionError(
                f"Could not read {path} as a torch checkpoint ({type(error).__name__}: {first_line})"
                + (" If you trust the file and it needs full unpickling, pass allow_pickle."
                   if needs_pickle and not allow_pickle else "")
            ) from error
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path} holds no state dict of tensors.")
    _check_not_wrapped(path, state_dict)
    return state_dict


def load_converted(mmdet_state_dict: dict, config: AlignDetrConfig | None = None):
    """Build `AlignDetrForObjectDetection` from an mmdetection state dict; every weight must be used and set."""
    config = config or config_from_state_dict(mmdet_state_dict)
    converted = convert_state_dict(mmdet_state_dict, config)
    model = AlignDetrForObjectDetection(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = [k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape]
    if missing or unexpected or wrong_shape:
        raise ConversionError(
            f"Checkpoint does not fit the model: missing {missing[:20]}, unexpected {unexpected[:20]}, "
            f"wrong shapes {[(k, tuple(converted[k].shape), tuple(expected[k].shape)) for k in wrong_shape[:20]]}."
        )
    model.load_state_dict(converted, strict=True)
    return model.eval()


# What a conversion (or `save_pretrained` of our model + processor, remote code, model card) leaves in a folder.
_CONVERSION_FILES = re.compile(
    r"(config\.json|preprocessor_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|README\.md|\w+\.py)$"
)


def is_previous_conversion(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds only what a conversion writes (an align_detr `config.json`, safetensors weights, the
    preprocessor config, code files, a model card): then a new conversion may replace it without `overwrite`."""
    import json

    folder = Path(folder)
    entries = list(folder.iterdir())
    if any(not entry.is_file() or not _CONVERSION_FILES.match(entry.name) for entry in entries):
        return False
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type == "align_detr" and any(entry.name.endswith(".safetensors") for entry in entries)


def convert_checkpoint(
    checkpoint: str,
    output_dir: str,
    config: AlignDetrConfig | None = None,
    verify: bool = False,
    push_to_hub: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
):
    """Convert `checkpoint` (path or URL) and write safetensors, `config.json`, the preprocessor config and our code
    (for `trust_remote_code`) to `output_dir`. Nothing is written there unless everything (and `verify`) succeeds.

    `output_dir` is built in a staging folder beside it and swapped in by renames ([`file_io.atomic_directory`]).
    Refused before anything is read: an `output_dir` that is a file, holds the checkpoint or the current directory,
    or is a non-empty folder that is not a previous conversion (unless `overwrite`)."""
    from .file_io import atomic_directory

    protected = () if re.match(r"https?://", str(checkpoint)) else (checkpoint,)
    with atomic_directory(
        output_dir, overwrite=overwrite, is_replaceable=is_previous_conversion, protected=protected
    ) as staging:
        state_dict = load_checkpoint(checkpoint, allow_pickle=allow_pickle)
        model = load_converted(state_dict, config)
        processor = AlignDetrImageProcessor()
        model.save_pretrained(staging)  # with our code and auto_map (align_detr_hf.hub)
        processor.save_pretrained(staging)
        if verify:
            verify_conversion(state_dict, staging)
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        processor.push_to_hub(push_to_hub)
    return model


def verify_conversion(mmdet_state_dict: dict, saved_dir, atol: float = 1e-4) -> float:
    """Reload the saved folder and check that every saved weight equals its source and that the model runs to a
    finite output; returns the largest weight difference."""
    model = AlignDetrForObjectDetection.from_pretrained(saved_dir).eval()
    reference = convert_state_dict(mmdet_state_dict, model.config)
    state = model.state_dict()
    worst = max((state[k].float() - v.float()).abs().max().item() for k, v in reference.items())
    if worst > atol:
        raise ConversionError(f"Saved weights differ from the checkpoint by {worst:.3g}.")
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 128, 128))
    if not torch.isfinite(out.logits).all() or not torch.isfinite(out.pred_boxes).all():
        raise ConversionError("The converted model produced non-finite outputs.")
    return worst
