"""Conversion of mmdetection Align-DETR/DINO checkpoints into `AlignDetrForObjectDetection` weights; checkpoints of
the official Align-DETR code and detrex's DINO (detectron2 format, `convert_detrex.py`) are first renamed to
mmdetection's names, recognised by their keys.

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
import urllib.parse
import zipfile

import torch

from .configuration_align_detr import COCO_CLASSES, AlignDetrConfig
from .download import download, is_url, sha256_prefix_from_name
from .hub import saving_remote_code  # noqa: F401  (moved to hub.py; every save carries our code now)
from .hub import write_model_card
from .convert_mmdet_backbones import (
    BACKBONES,
    ConversionError,
    Rule,
    apply_rules,
    backbone_config_from_state_dict,
    convert_backbone_state_dict,
    split_in_three,
)
from .convert_detrex import describe_detrex, detrex_to_mmdet, is_detrex_state_dict
from .image_processing_align_detr import AlignDetrImageProcessor
from .mmdet_checkpoints import (
    CODES,
    DETREX_HEAD_SETTINGS,
    FROZEN_STAGES,
    HEAD_SETTINGS,
    SWIN_DROP_PATH_RATE,
    model_card_fields,
    model_cfg_from_meta,
    settings_from_model_cfg,
    zoo_entry,
)
from .modeling_align_detr import AlignDetrForObjectDetection


def _detector_rules(num_decoder_layers: int, num_backbone_levels: int) -> list[Rule]:
    """mmdetection's detector names (all but `backbone.*`) -> ours. Box/class branch L (= the number of decoder
    layers) is the encoder-proposal head; the neck's extra convs come after the backbone levels."""
    decoder, reference_head = "model.decoder.layers.{0}.", "model.decoder.reference_points_head.layers.{0}.{1}"

    def class_branch(index, name):
        return f"class_embed.{index}.{name}" if int(index) < num_decoder_layers else f"model.enc_score_head.{name}"

    def box_branch(index, layer, name):
        head = f"model.decoder.bbox_embed.{index}" if int(index) < num_decoder_layers else "model.enc_bbox_head"
        return f"{head}.layers.{int(layer) // 2}.{name}"

    def extra_level(index, module, name):
        return f"model.input_proj.{int(index) + num_backbone_levels}.{module}.{name}"

    return [
        Rule(r"level_embed", "model.level_embed"),
        Rule(r"query_embedding\.weight", "model.query_embedding.weight"),
        Rule(r"memory_trans_fc\.(weight|bias)", "model.enc_output.{0}"),
        Rule(r"memory_trans_norm\.(weight|bias)", "model.enc_output_norm.{0}"),
        Rule(r"dn_query_generator\.label_embedding\.weight", "model.denoising_class_embed.weight"),
        # neck (mmdetection's ChannelMapper)
        Rule(r"neck\.convs\.(\d+)\.conv\.(weight|bias)", "model.input_proj.{0}.0.{1}"),
        Rule(r"neck\.convs\.(\d+)\.gn\.(weight|bias)", "model.input_proj.{0}.1.{1}"),
        Rule(r"neck\.extra_convs\.(\d+)\.conv\.(weight|bias)", lambda i, name: extra_level(i, 0, name)),
        Rule(r"neck\.extra_convs\.(\d+)\.gn\.(weight|bias)", lambda i, name: extra_level(i, 1, name)),
        # encoder
        Rule(r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)", "model.encoder.layers.{0}.self_attn.{1}.{2}"),
        Rule(r"encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", "model.encoder.layers.{0}.fc1.{1}"),
        Rule(r"encoder\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", "model.encoder.layers.{0}.fc2.{1}"),
        Rule(r"encoder\.layers\.(\d+)\.norms\.0\.(weight|bias)", "model.encoder.layers.{0}.self_attn_layer_norm.{1}"),
        Rule(r"encoder\.layers\.(\d+)\.norms\.1\.(weight|bias)", "model.encoder.layers.{0}.final_layer_norm.{1}"),
        # decoder; self-attention is torch's MultiheadAttention with fused q/k/v
        Rule(
            r"decoder\.layers\.(\d+)\.self_attn\.attn\.in_proj_(weight|bias)",
            tuple(decoder + f"self_attn.{name}_proj.{{1}}" for name in "qkv"),
            split_in_three,
        ),
        Rule(r"decoder\.layers\.(\d+)\.self_attn\.attn\.out_proj\.(weight|bias)", decoder + "self_attn.o_proj.{1}"),
        Rule(r"decoder\.layers\.(\d+)\.cross_attn\.(\w+)\.(weight|bias)", decoder + "encoder_attn.{1}.{2}"),
        Rule(r"decoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", decoder + "fc1.{1}"),
        Rule(r"decoder\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", decoder + "fc2.{1}"),
        Rule(r"decoder\.layers\.(\d+)\.norms\.0\.(weight|bias)", decoder + "self_attn_layer_norm.{1}"),
        Rule(r"decoder\.layers\.(\d+)\.norms\.1\.(weight|bias)", decoder + "encoder_attn_layer_norm.{1}"),
        Rule(r"decoder\.layers\.(\d+)\.norms\.2\.(weight|bias)", decoder + "final_layer_norm.{1}"),
        Rule(r"decoder\.ref_point_head\.layers\.(\d)\.(weight|bias)", reference_head),
        Rule(r"decoder\.norm\.(weight|bias)", "model.decoder.layer_norm.{0}"),
        # heads
        Rule(r"bbox_head\.cls_branches\.(\d+)\.(weight|bias)", class_branch),
        Rule(r"bbox_head\.reg_branches\.(\d+)\.([024])\.(weight|bias)", box_branch),
    ]


_BACKBONE_PREFIX, _OUR_BACKBONE_PREFIX = "backbone.", "model.backbone.model."


def mmdet_names(state_dict: dict) -> tuple[dict, str]:
    """The state dict under mmdetection's names, and its layout: `"mmdetection"`, or `"detrex"` (the official
    Align-DETR code and detrex's DINO, renamed by `convert_detrex.detrex_to_mmdet`)."""
    if is_detrex_state_dict(state_dict):
        return detrex_to_mmdet(state_dict), "detrex"
    return state_dict, "mmdetection"


def convert_state_dict(mmdet_state_dict: dict, config: AlignDetrConfig) -> dict[str, torch.Tensor]:
    """mmdetection (or detrex-layout) Align-DETR/DINO state dict -> `AlignDetrForObjectDetection` state dict.

    The backbone's keys go through its rule table (`convert_mmdet_backbones`), the rest through `_detector_rules`.
    Raises `ConversionError` listing every key that matches no rule.
    """
    mmdet_state_dict, _ = mmdet_names(mmdet_state_dict)
    backbone = {k[len(_BACKBONE_PREFIX) :]: v for k, v in mmdet_state_dict.items() if k.startswith(_BACKBONE_PREFIX)}
    rest = {k: v for k, v in mmdet_state_dict.items() if not k.startswith(_BACKBONE_PREFIX)}
    rules = _detector_rules(config.decoder_layers, len(config.backbone_config.out_features))
    converted, unknown = apply_rules(rest, rules)
    converted_backbone, unknown_backbone = convert_backbone_state_dict(backbone, config.backbone_config)
    converted.update({_OUR_BACKBONE_PREFIX + k: v for k, v in converted_backbone.items()})
    unknown = sorted(unknown + [_BACKBONE_PREFIX + k for k in unknown_backbone])
    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint keys have no Align-DETR counterpart (is this an mmdetection Align-DETR/DINO "
            f"checkpoint?): {unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
        )
    return converted


def config_from_state_dict(
    mmdet_state_dict: dict, meta: dict | None = None, loss_type: str | None = None, source: str | None = None,
    **overrides,
) -> AlignDetrConfig:  # fmt: skip
    """Read the architecture (backbone type, depths and widths, levels, layer counts, FFN sizes, queries, classes)
    off the shapes, and the settings the weights do not show (loss, position encoding, frozen stages) from, in this
    order: mmdetection's `meta['cfg']`, the model-zoo entry named by `source` (file name or URL), `loss_type` (the
    loss the checkpoint was trained with), or the neck (a conv bias: Align-DETR's config; none: DINO's). A
    detrex-layout state dict (official Align-DETR, detrex DINO) without a zoo entry gets the official Align-DETR
    code's settings, or detrex DINO's with `loss_type="dino"`.
    `overrides` win over everything (`drop_path_rate` goes to a Swin backbone's config).
    """
    sd, layout = mmdet_names(mmdet_state_dict)
    required = ["query_embedding.weight", "level_embed", "bbox_head.cls_branches.0.weight"]
    missing = [key for key in required if key not in sd]
    if missing:
        raise ConversionError(f"Not an mmdetection Align-DETR/DINO checkpoint: missing {missing}. {describe_keys(sd)}")

    def count(pattern):
        return len({m.group(1) for key in sd if (m := re.match(pattern, key))})

    backbone = {k[len(_BACKBONE_PREFIX) :]: v for k, v in sd.items() if k.startswith(_BACKBONE_PREFIX)}
    neck_in = [sd[f"neck.convs.{i}.conv.weight"].shape[1] for i in range(count(r"neck\.convs\.(\d+)\."))]
    backbone_config = backbone_config_from_state_dict(backbone, neck_in)
    settings, _ = _head_settings(sd, meta, loss_type, source, layout)
    settings.setdefault("freeze_backbone_stages", FROZEN_STAGES[settings["loss_type"], backbone_config["model_type"]])
    drop_path_rate = overrides.pop("drop_path_rate", settings.pop("drop_path_rate", SWIN_DROP_PATH_RATE))
    if backbone_config["model_type"] == "swin":  # stochastic depth of the Swin blocks (training only)
        backbone_config["drop_path_rate"] = drop_path_rate
    num_classes = sd["bbox_head.cls_branches.0.weight"].shape[0]
    kwargs = dict(
        backbone_config=backbone_config,
        d_model=sd["level_embed"].shape[1],
        num_feature_levels=sd["level_embed"].shape[0],
        neck_bias="neck.convs.0.conv.bias" in sd,
        encoder_layers=count(r"encoder\.layers\.(\d+)\."),
        decoder_layers=count(r"decoder\.layers\.(\d+)\."),
        encoder_ffn_dim=sd["encoder.layers.0.ffn.layers.0.0.weight"].shape[0],
        decoder_ffn_dim=sd["decoder.layers.0.ffn.layers.0.0.weight"].shape[0],
        num_queries=sd["query_embedding.weight"].shape[0],
        **settings,
    )
    if num_classes == len(COCO_CLASSES):
        kwargs["id2label"] = dict(enumerate(COCO_CLASSES))
    else:
        kwargs["num_labels"] = num_classes
    kwargs.update(overrides)
    return AlignDetrConfig(**kwargs)


def _zoo_entry(source: str | None, layout: str):
    """The zoo entry of `source`, if it is a release of this key layout."""
    entry = zoo_entry(source) if source else None
    return entry if entry is not None and (entry.code == "mmdetection") == (layout == "mmdetection") else None


def _head_settings(sd: dict, meta, loss_type: str | None, source: str | None, layout: str) -> tuple[dict, str]:
    """The config fields the weights do not show, and where they come from (for messages)."""
    if loss_type is not None and loss_type not in HEAD_SETTINGS:
        raise ConversionError(f"loss_type must be one of {sorted(HEAD_SETTINGS)}, got {loss_type!r}.")
    model_cfg = model_cfg_from_meta(meta)
    entry = _zoo_entry(source, layout)
    if model_cfg is not None:
        settings, origin = settings_from_model_cfg(model_cfg), "its meta['cfg']"
    elif entry is not None:
        settings, origin = dict(entry.settings), f"{CODES[entry.code][0]}'s model zoo ({entry.name})"
    elif layout == "detrex":  # the weights cannot tell the official Align-DETR from detrex's DINO
        settings = dict(DETREX_HEAD_SETTINGS[loss_type or "align_detr"])
        origin = "loss_type" if loss_type else "the official Align-DETR config (for detrex's DINO: loss_type dino)"
    else:
        inferred = loss_type or ("align_detr" if "neck.convs.0.conv.bias" in sd else "dino")
        settings, origin = dict(HEAD_SETTINGS[inferred]), "loss_type" if loss_type else "its neck"
    if loss_type is not None and loss_type != settings["loss_type"]:
        raise ConversionError(
            f"loss_type={loss_type!r}, but the checkpoint was trained with {settings['loss_type']!r} (from {origin}). "
            "To fine-tune with another loss, set `loss_type` on the converted model's config."
        )
    return settings, origin


def describe_checkpoint(
    state_dict: dict, meta=None, loss_type: str | None = None, source: str | None = None,
    config: AlignDetrConfig | None = None,
) -> str:  # fmt: skip
    """One line for the user: what kind of checkpoint this is and where the settings the weights do not show come
    from (the arguments of `config_from_state_dict`, or the given `config`)."""
    sd, layout = mmdet_names(state_dict)
    found = describe_detrex(state_dict) if layout == "detrex" else f"an mmdetection checkpoint ({len(sd)} keys)"
    if config is not None:
        return f"{found}; settings from the given config"
    settings, origin = _head_settings(sd, meta, loss_type, source, layout)
    loss = {"align_detr": "Align-DETR", "dino": "DINO"}[settings["loss_type"]]
    return f"{found}; {loss} settings from {origin}"


def describe_keys(state_dict: dict) -> str:
    """A guess at what a state dict that is not a supported detector is, from its top-level key names."""
    tops = sorted({key.split(".")[0] for key in state_dict})
    for name, backbone in BACKBONES.items():
        if backbone.signature in state_dict:
            return f"It looks like a bare {name} backbone (no detector keys)."
    if any(key.startswith("transformer.") for key in state_dict) or "backbone.0.body.conv1.weight" in state_dict:
        return (
            "It looks like a checkpoint of the original DINO/Deformable-DETR code (the official Align-DETR and "
            "detrex's DINO checkpoints, which convert, have transformer.level_embeds and transformer.tgt_embed)."
        )
    return f"Its top-level names are {tops[:12]}."


def expected_sha256_prefix(path_or_url: str) -> str | None:
    """mmdetection's published files end in `-<first 8 hex digits of the sha256>.pth`."""
    return sha256_prefix_from_name(path_or_url)


def file_sha256(path: str) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def _check_checkpoint_bytes(path: str, name: str | None = None) -> None:
    """Name the obvious non-checkpoints (empty file, text or HTML such as an error page saved as .pth) before
    torch.load gives an unpickling error whose allow_pickle hint cannot help. `name`: how messages call the file."""
    size = os.path.getsize(path)
    shown = name or path
    if size == 0:
        raise ConversionError(f"{shown} is empty (0 bytes): not a checkpoint (interrupted download?).")
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
        raise ConversionError(f"{shown} is {kind}, not a torch checkpoint ({size} bytes, starts with {preview!r}).")


def _check_not_wrapped(path: str, state_dict: dict) -> None:
    """A state dict saved from a DistributedDataParallel / DataParallel wrapper has every key under `module.`."""
    if state_dict and all(key.startswith("module.") for key in state_dict):
        raise ConversionError(
            f"{path}: every key starts with 'module.' (saved from a DistributedDataParallel wrapper). Strip the "
            "prefix and save again: {k.removeprefix('module.'): v for k, v in state_dict.items()}."
        )


def load_checkpoint(path_or_url: str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint (mmdetection's `{'meta', 'state_dict'}`, detectron2's `{'model', 'trainer', 'iteration'}` or
    a bare state dict) from a path or URL, after checking the sha256 prefix of its file name when it has one."""
    return load_checkpoint_and_meta(path_or_url, allow_pickle)[0]


def load_checkpoint_and_meta(
    path_or_url: str, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """`load_checkpoint`, and mmdetection's `meta` (training config text, dataset info) when the file has one."""
    path, prefix = str(path_or_url), expected_sha256_prefix(path_or_url)
    if is_url(path):  # the one download path: cached per user by URL, complete or not at all, sha256 checked
        # an error page served as the file is refused before it is cached, so a retry asks the server again
        check = lambda file: _check_checkpoint_bytes(str(file), name="the file")  # noqa: E731
        path, prefix = str(download(path, sha256=prefix, check=check)), None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint at {path}.")
    _check_checkpoint_bytes(path)
    if prefix is not None:
        digest = file_sha256(path)
        if not digest.startswith(prefix):
            raise ConversionError(
                f"{path}: sha256 {digest[:8]}... does not match the prefix {prefix} in its name "
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
    state_dict, meta = _unwrap(checkpoint)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path} holds no state dict of tensors.")
    _check_not_wrapped(path, state_dict)
    return state_dict, meta if isinstance(meta, dict) else None


def _unwrap(checkpoint) -> tuple:
    """(state dict, meta) of what torch.load returned: mmdetection's `{"meta", "state_dict"}`, detectron2's
    `{"model", "trainer", "iteration"}` (as `DetectionCheckpointer` saves `model_final.pth`; the optimizer and
    scheduler state are ignored, the iteration kept as meta), or a bare state dict."""
    if not isinstance(checkpoint, dict):
        return None, None
    if "state_dict" in checkpoint:
        return checkpoint["state_dict"], checkpoint.get("meta")
    if isinstance(checkpoint.get("model"), dict):
        iteration = checkpoint.get("iteration")
        return checkpoint["model"], {"iteration": iteration} if isinstance(iteration, int) else None
    return checkpoint, None


def load_converted(mmdet_state_dict: dict, config: AlignDetrConfig | None = None):
    """Build `AlignDetrForObjectDetection` from an mmdetection (or detrex-layout) state dict; every weight must be
    used and set."""
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


WRITER = "align-detr convert"  # the name under which conversions are recorded in a folder's manifest (file_io)


def convert_checkpoint(
    checkpoint: str,
    output_dir: str,
    config: AlignDetrConfig | None = None,
    verify: bool = False,
    push_to_hub: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    loss_type: str | None = None,
    config_overrides: dict | None = None,
):
    """Convert `checkpoint` (path or URL) and write safetensors, `config.json`, the preprocessor config, our code
    (for `trust_remote_code`) and a model card to `output_dir`. Nothing is written there unless everything (and
    `verify`) succeeds. Without `config`, it is read off the checkpoint (`config_from_state_dict` with its `meta`,
    `loss_type` and `config_overrides`).

    `output_dir` is built in a staging folder beside it and swapped in by renames ([`file_io.atomic_directory`]).
    Refused before anything is read ([`file_io.claim_output`]): an `output_dir` that is a file, is or holds the
    checkpoint or the current directory, or holds anything but an unchanged earlier conversion (a fine-tuned model
    saved in that folder, a user's file), unless `overwrite`, which replaces only the files a conversion writes."""
    from .file_io import atomic_directory

    inputs = () if is_url(checkpoint) else (checkpoint,)
    with atomic_directory(output_dir, WRITER, overwrite=overwrite, inputs=inputs) as staging:
        state_dict, meta = load_checkpoint_and_meta(checkpoint, allow_pickle=allow_pickle)
        print(f"{_file_name(checkpoint)}: {describe_checkpoint(state_dict, meta, loss_type, str(checkpoint), config)}")
        if config is None:
            config = config_from_state_dict(
                state_dict, meta=meta, loss_type=loss_type, source=str(checkpoint), **(config_overrides or {})
            )
        model = load_converted(state_dict, config)
        processor = AlignDetrImageProcessor()
        model.save_pretrained(staging)  # with our code and auto_map (align_detr_hf.hub)
        processor.save_pretrained(staging)
        layout = mmdet_names(state_dict)[1]
        entry = _zoo_entry(str(checkpoint), layout)
        local = _download(str(checkpoint)) if re.match(r"https?://", str(checkpoint)) else str(checkpoint)
        card = model_card_fields(
            entry, model.config, str(checkpoint), model_name=push_to_hub, layout=layout,
            iteration=(meta or {}).get("iteration") if layout == "detrex" else None,
            sha256=file_sha256(local) if entry is not None else None,  # is it the release its name suggests?
        )  # fmt: skip
        write_model_card(staging, **card)
        if verify:
            verify_conversion(state_dict, staging)
    if push_to_hub:
        model.push_to_hub(push_to_hub)
        processor.push_to_hub(push_to_hub)
    return model


def _file_name(path_or_url) -> str:
    return os.path.basename(urllib.parse.urlparse(str(path_or_url)).path) or str(path_or_url)


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
