"""What a checkpoint says beyond its tensors: mmdetection's training config in `meta['cfg']`, the settings of the
DINO family's heads that the weights do not show, and the model zoo (mmdetection's names and URLs with their sha256
prefixes, the official Align-DETR and detrex DINO releases, COCO box AP), which also gives the model card of a
converted folder.

Settings the weights do not show (from mmdetection's configs):

| | Align-DETR (`AlignDETRHead`) | DINO (`DINOHead`) |
|---|---|---|
| loss | IA-BCE, one-to-k matching | sigmoid focal, one-to-one matching |
| position encoding temperature / offset | 10000 / -0.5 | 20 / 0 (the "improved" R-50 config: 10000 / -0.5) |
| ResNet `frozen_stages` | 0 (stem) | 1 (stem + first stage; "improved": -1) |
| Swin `frozen_stages`, `drop_path_rate` | | -1 (nothing), 0.2 |

The neck's conv bias is visible in the weights (Align-DETR has one, DINO none).

The official Align-DETR code (FelixCaae/AlignDETR) and detrex's DINO (`DETREX_HEAD_SETTINGS`): position encoding
10000 / -0.5 (detrex's DINO R-50 24-epoch config: 20 / 0), detectron2's `freeze_at=1` (the stem: our 0), the head's
`inverse_sigmoid` eps 1e-3 (`head_inverse_sigmoid_eps`), a neck with conv bias in both; the same loss weights,
matcher costs and denoising settings as mmdetection's configs. The weights do not tell the two apart.

Where they compute otherwise, without a switch here (the numbers a converted model gives are the official ones):
- evaluation without a padding mask: the official model builds none in eval and evaluates one image per batch; our
  model honours `pixel_mask` (equal on single images) and without one computes exactly the official batched eval.
- resize: detectron2's `ResizeShortestEdge(800, 1333)` resizes uint8 images with PIL's bilinear filter, which
  antialiases when shrinking; the image processor resizes like mmdetection's cv2 (no antialiasing). Both enlarge
  alike (to a grey level; COCO's images, at most 640 px, are all enlarged); images shrunk to 800 / 1333 px differ.
- input: RGB, mean/std as mmdetection's (`AlignDetrImageProcessor` already); boxes scaled and clipped to the image
  in post-processing as mmdetection's (detectron2 also drops boxes of zero width or height, which a box centred in
  the image only has when its predicted size underflows to 0).
- loss only: the matcher caps the queries per GT at `int(0.5 * Q / G)` (mmdetection `max(1, Q // G)`; equal unless an
  image has more than Q / (2k) objects), and the class loss is `-t log p - (1 - t) log(1 - p)` in plain `log` (ours
  the stable `binary_cross_entropy_with_logits`, equal to float rounding, finite where `log` gives inf).
"""

import ast
import os
import re
import urllib.parse
from typing import NamedTuple

from .convert_mmdet_backbones import ConversionError

HEADS = {"AlignDETRHead": "align_detr", "DINOHead": "dino"}

# config fields per loss type (= per mmdetection head) when nothing more specific is known
HEAD_SETTINGS = {
    "align_detr": {
        "loss_type": "align_detr", "position_embedding_temperature": 10000, "position_embedding_offset": -0.5
    },
    "dino": {"loss_type": "dino", "position_embedding_temperature": 20, "position_embedding_offset": 0.0},
}

# the same for checkpoints of the detrex layout: the official Align-DETR code and detrex's DINO (module docstring)
DETREX_HEAD_SETTINGS = {
    loss_type: {**HEAD_SETTINGS[loss_type], "position_embedding_temperature": 10000, "position_embedding_offset": -0.5,
                "freeze_backbone_stages": 0, "head_inverse_sigmoid_eps": 1e-3}
    for loss_type in HEAD_SETTINGS
}  # fmt: skip

# mmdetection's `frozen_stages` per (loss type, backbone type) in the released configs
FROZEN_STAGES = {("align_detr", "resnet"): 0, ("dino", "resnet"): 1, ("align_detr", "swin"): -1, ("dino", "swin"): -1}
SWIN_DROP_PATH_RATE = 0.2  # dino-5scale_swin-l configs

DINO_CITATION = """@misc{zhang2022dino,
  title={DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End Object Detection},
  author={Hao Zhang and Feng Li and Shilong Liu and Lei Zhang and Hang Su and Jun Zhu and Lionel M. Ni
          and Heung-Yeung Shum},
  year={2022},
  eprint={2203.03605},
  archivePrefix={arXiv},
  primaryClass={cs.CV}
}"""
ALIGN_DETR_CITATION = """@misc{cai2023aligndetr,
  title={Align-DETR: Improving DETR with Simple IoU-aware BCE loss},
  author={Zhi Cai and Songtao Liu and Guodong Wang and Zheng Ge and Xiangyu Zhang and Di Huang},
  year={2023},
  eprint={2304.07527},
  archivePrefix={arXiv},
  primaryClass={cs.CV}
}"""
SWIN_CITATION = """@inproceedings{liu2021swin,
  title={Swin Transformer: Hierarchical Vision Transformer using Shifted Windows},
  author={Ze Liu and Yutong Lin and Yue Cao and Han Hu and Yixuan Wei and Zheng Zhang and Stephen Lin and Baining Guo},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2021}
}"""


# who published a zoo entry / whose code a checkpoint comes from: (short name, publisher, the code in full)
CODES = {
    "mmdetection": ("mmdetection", "mmdetection", "mmdetection (open-mmlab/mmdetection)"),
    "official": ("official Align-DETR", "the authors",
                 "the official Align-DETR code (FelixCaae/AlignDETR on detrex and detectron2; the same model is "
                 "detrex's projects/align_detr)"),
    "detrex": ("detrex", "detrex", "detrex's DINO (IDEA-Research/detrex, projects/dino, on detectron2)"),
}  # fmt: skip


class ZooEntry(NamedTuple):
    """One released model: `url` is a direct download (None where nothing is published, or only a `page` to download
    from by hand); `box_ap` is None where no weights are published; `code` is a key of `CODES`."""

    name: str
    backbone: str
    epochs: int
    box_ap: float | None
    url: str | None
    settings: dict  # config fields the weights do not show
    code: str = "mmdetection"
    page: str | None = None


_MMDET = "https://download.openmmlab.com/mmdetection/v3.0"
_DINO, _ALIGN = HEAD_SETTINGS["dino"], HEAD_SETTINGS["align_detr"]
_DINO_R50 = {**_DINO, "freeze_backbone_stages": 1}
_SWIN = {**_DINO, "freeze_backbone_stages": -1, "drop_path_rate": SWIN_DROP_PATH_RATE}

# mmdetection's configs/dino/metafile.yml and README, projects/AlignDETR/README.md
MMDET_ZOO = [
    ZooEntry("dino-4scale_r50_8xb2-12e_coco", "R-50", 12, 49.0,
             f"{_MMDET}/dino/dino-4scale_r50_8xb2-12e_coco/dino-4scale_r50_8xb2-12e_coco_20221202_182705-55b2bba2.pth",
             _DINO_R50),
    ZooEntry("dino-4scale_r50_8xb2-24e_coco", "R-50", 24, None, None, _DINO_R50),
    ZooEntry("dino-4scale_r50_8xb2-36e_coco", "R-50", 36, None, None, _DINO_R50),
    ZooEntry("dino-4scale_r50_improved_8xb2-12e_coco", "R-50", 12, 50.1,
             f"{_MMDET}/dino/dino-4scale_r50_improved_8xb2-12e_coco/"
             "dino-4scale_r50_improved_8xb2-12e_coco_20230818_162607-6f47a913.pth",
             {**_DINO, "position_embedding_temperature": 10000, "position_embedding_offset": -0.5,
              "freeze_backbone_stages": -1, "class_loss_coefficient": 2.0, "num_denoising_queries": 300}),
    ZooEntry("dino-5scale_swin-l_8xb2-12e_coco", "Swin-L", 12, 57.2,
             f"{_MMDET}/dino/dino-5scale_swin-l_8xb2-12e_coco/"
             "dino-5scale_swin-l_8xb2-12e_coco_20230228_072924-a654145f.pth",
             _SWIN),
    ZooEntry("dino-5scale_swin-l_8xb2-36e_coco", "Swin-L", 36, 58.4,
             "https://github.com/RistoranteRist/mmlab-weights/releases/download/dino-swinl/"
             "dino-5scale_swin-l_8xb2-36e_coco-5486e051.pth",
             _SWIN),
    ZooEntry("align_detr-4scale_r50_8xb2-12e_coco", "R-50", 12, 50.5,
             f"{_MMDET}/align_detr/align_detr-4scale_r50_8xb2-12e_coco/"
             "align_detr-4scale_r50_8xb2-12e_coco_20230914_095734-61f921af.pth",
             {**_ALIGN, "freeze_backbone_stages": 0}),
    ZooEntry("align_detr-4scale_r50_8xb2-24e_coco", "R-50", 24, 51.4,
             f"{_MMDET}/align_detr/align_detr-4scale_r50_8xb2-24e_coco/"
             "align_detr-4scale_r50_8xb2-24e_coco_20230919_152414-f4b6cf76.pth",
             {**_ALIGN, "freeze_backbone_stages": 0}),
]  # fmt: skip


_DETREX = "https://github.com/IDEA-Research/detrex-storage/releases/download"
_OFFICIAL_ALIGN, _DETREX_DINO = DETREX_HEAD_SETTINGS["align_detr"], DETREX_HEAD_SETTINGS["dino"]
_DRIVE = "https://drive.google.com/file/d"

# FelixCaae/AlignDETR README (Google Drive, file names not given: download by hand); the "*" rows are the authors'
# "modified IA-BCE loss that absorbs the focal loss term" (the Align Loss of the BMVC version), named here by us
DETREX_ZOO = [
    ZooEntry("aligndetr_k=2_r50_4scale_12ep", "R-50", 12, 50.3, None, _OFFICIAL_ALIGN, "official",
             f"{_DRIVE}/12xSxD_Z9KI8bejSlO1td1XcZ-Ns00rTi/view?usp=share_link"),
    ZooEntry("aligndetr_k=2_r50_4scale_24ep", "R-50", 24, 51.4, None, _OFFICIAL_ALIGN, "official",
             f"{_DRIVE}/1zQYe78fDdCmK3nwbAWYLvGCdQCFsTqoX/view?usp=share_link"),
    ZooEntry("aligndetr_align_loss_r50_4scale_12ep", "R-50", 12, 50.5, None, _OFFICIAL_ALIGN, "official",
             f"{_DRIVE}/1QLhyRuxCtmQjHXDeNtjBRA4YVL5ldHfI/view?usp=sharing"),
    ZooEntry("aligndetr_align_loss_r50_4scale_24ep", "R-50", 24, 51.7, None, _OFFICIAL_ALIGN, "official",
             f"{_DRIVE}/1RybGz8jDwxGFsqorl-u9z_sPNQirGlYQ/view?usp=sharing"),
    # detrex's projects/dino README (ResNet rows of "Main Results")
    ZooEntry("dino_r50_4scale_12ep", "R-50", 12, 49.2, f"{_DETREX}/v0.2.0/dino_r50_4scale_12ep_49_2AP.pth",
             _DETREX_DINO, "detrex"),
    ZooEntry("dino_r50_4scale_12ep_300dn", "R-50", 12, 49.5, f"{_DETREX}/v0.2.0/dino_r50_4scale_12ep_300dn.pth",
             {**_DETREX_DINO, "num_denoising_queries": 300}, "detrex"),
    ZooEntry("dino_r50_4scale_24ep", "R-50", 24, 50.6, f"{_DETREX}/v0.1.1/dino_r50_4scale_24ep.pth",
             {**_DETREX_DINO, "position_embedding_temperature": 20, "position_embedding_offset": 0.0}, "detrex"),
    ZooEntry("dino_r50_5scale_12ep", "R-50", 12, 49.6, f"{_DETREX}/v0.2.1/dino_r50_5scale_12ep.pth", _DETREX_DINO,
             "detrex"),
    ZooEntry("dino_r101_4scale_12ep", "R-101", 12, 50.0, f"{_DETREX}/v0.1.1/dino_r101_4scale_12ep.pth", _DETREX_DINO,
             "detrex"),
]  # fmt: skip
MODEL_ZOO = MMDET_ZOO + DETREX_ZOO


def zoo_entry(path_or_url: str) -> ZooEntry | None:
    """The zoo entry of a file: the one whose download has this file name, else the mmdetection config whose name
    starts the file name (mmdetection names files `<config>_<date>-<sha>.pth`)."""
    name = os.path.basename(urllib.parse.urlparse(str(path_or_url)).path)
    for entry in MODEL_ZOO:
        if entry.url and name == os.path.basename(urllib.parse.urlparse(entry.url).path):
            return entry
    for entry in sorted(MODEL_ZOO, key=lambda e: -len(e.name)):
        if entry.code == "mmdetection" and re.match(re.escape(entry.name) + r"([_.-]|$)", name):
            return entry
    return None


# ------------------------------------------------------------------------------------------------ meta['cfg']


def model_cfg_from_meta(meta) -> dict | None:
    """The `model` dict of the config text mmengine saves in `meta['cfg']`, or None when absent or unreadable.

    The text is Python; it is read with `ast` (literals and `dict(...)` only), never executed.
    """
    text = meta.get("cfg") if isinstance(meta, dict) else None
    if isinstance(text, dict):  # a config saved as a plain dict rather than text
        return text.get("model") if isinstance(text.get("model"), dict) else None
    if not isinstance(text, str):
        return None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "model" for t in node.targets):
            value = _literal(node.value)
            return value if isinstance(value, dict) else None
    return None


def _literal(node):
    """Literals, containers and `dict(key=value)` calls; anything else (names, expressions) is None."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        return -value if isinstance(node.op, ast.USub) and isinstance(value, (int, float)) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(element) for element in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    return None


def settings_from_model_cfg(model_cfg: dict) -> dict:
    """Config fields from mmdetection's `model` config: head type, position encoding, frozen stages, loss weights,
    matcher costs, denoising budget and (Align-DETR) the one-to-k matching and IA-BCE parameters."""
    head = model_cfg.get("bbox_head") or {}
    loss_type = HEADS.get(head.get("type"))
    if loss_type is None:
        raise ConversionError(
            f"The checkpoint was trained with a {head.get('type')!r} head; supported are {sorted(HEADS)}."
        )
    settings = dict(HEAD_SETTINGS[loss_type])
    backbone = model_cfg.get("backbone") or {}
    positional = model_cfg.get("positional_encoding") or {}
    found = {
        "position_embedding_temperature": positional.get("temperature"),
        "position_embedding_offset": positional.get("offset"),
        "freeze_backbone_stages": backbone.get("frozen_stages", -1),  # mmdetection's default for ResNet and Swin
        "drop_path_rate": backbone.get("drop_path_rate") if backbone.get("type") == "SwinTransformer" else None,
        "class_loss_coefficient": (head.get("loss_cls") or {}).get("loss_weight"),
        "bbox_loss_coefficient": (head.get("loss_bbox") or {}).get("loss_weight"),
        "giou_loss_coefficient": (head.get("loss_iou") or {}).get("loss_weight"),
    }
    if loss_type == "dino":
        found.update(focal_alpha=(head.get("loss_cls") or {}).get("alpha"),
                     focal_gamma=(head.get("loss_cls") or {}).get("gamma"))  # fmt: skip
    else:
        found.update(num_gt_repeat=head.get("all_layers_num_gt_repeat"), quality_alpha=head.get("alpha"),
                     negative_gamma=head.get("gamma"), rank_tau=head.get("tau"))  # fmt: skip
    dn = model_cfg.get("dn_cfg") or {}
    found.update(label_noise_ratio=dn.get("label_noise_scale"), box_noise_scale=dn.get("box_noise_scale"),
                 num_denoising_queries=(dn.get("group_cfg") or {}).get("num_dn_queries"))  # fmt: skip
    costs = {"FocalLossCost": "matcher_class_cost", "BBoxL1Cost": "matcher_bbox_cost", "IoUCost": "matcher_giou_cost"}
    assigner = ((model_cfg.get("train_cfg") or {}).get("assigner") or {})
    for cost in assigner.get("match_costs") or []:
        if isinstance(cost, dict) and cost.get("type") in costs:
            found[costs[cost["type"]]] = cost.get("weight")
    settings.update({name: value for name, value in found.items() if value is not None})
    return settings


# ---------------------------------------------------------------------------------------------------- model card


def checkpoint_code(entry: ZooEntry | None, layout: str, loss_type: str) -> str:
    """The key of `CODES` a checkpoint comes from: its zoo entry's, else from its key layout (`"mmdetection"` or
    `"detrex"`; a detrex-layout Align-DETR checkpoint is the official code's)."""
    if entry is not None:
        return entry.code
    if layout == "detrex":
        return "official" if loss_type == "align_detr" else "detrex"
    return "mmdetection"


def published_sha256_prefix(entry: ZooEntry) -> str | None:
    """The sha256 prefix mmdetection puts in its released file names (`<config>_<date>-<8 hex digits>.pth`)."""
    match = re.search(r"-([0-9a-f]{8})\.pth$", os.path.basename(urllib.parse.urlparse(entry.url or "").path))
    return match.group(1) if match else None


def model_card_fields(
    entry: ZooEntry | None, config, source: str | None, model_name: str | None = None, layout: str = "mmdetection",
    iteration: int | None = None, sha256: str | None = None,
) -> dict:  # fmt: skip
    """Keyword arguments of `hub.write_model_card` for a folder converted from `source` (a zoo entry if known);
    `model_name` is the Hub id when the folder is pushed (the card's usage snippet loads it). `layout` is the
    checkpoint's key layout (`"mmdetection"` or `"detrex"`), `iteration` what a detectron2 checkpoint records.

    A file name only suggests a zoo entry: the card names the entry and gives its published AP as this model's
    only when `source` is the entry's download URL or `sha256` (the file's) starts with the sha256 prefix of the
    entry's published file."""
    prefix = published_sha256_prefix(entry) if entry is not None else None
    downloaded = entry is not None and entry.url is not None and source == entry.url  # fetched from the release
    is_release = downloaded or (prefix is not None and sha256 is not None and sha256.startswith(prefix))
    named_like = None if is_release else entry
    entry = entry if is_release else None
    loss = "Align-DETR" if config.loss_type == "align_detr" else "DINO"
    backbone = entry.backbone if entry else config.backbone_config.model_type
    code = checkpoint_code(entry, layout, config.loss_type)
    short, publisher, full = CODES[code]
    citations = [ALIGN_DETR_CITATION, DINO_CITATION] if config.loss_type == "align_detr" else [DINO_CITATION]
    if config.backbone_config.model_type == "swin":
        citations.append(SWIN_CITATION)
    file_name = os.path.basename(urllib.parse.urlparse(str(source)).path) if source else "unknown"
    description = (
        (f"{publisher}'{'' if publisher.endswith('s') else 's'} `{entry.name}`: " if entry else "")
        + f"{loss} ({config.num_feature_levels}-scale, {backbone} backbone) converted from the {short} checkpoint "
        f"`{file_name}`" + (f" (saved at iteration {iteration})" if iteration is not None else "")
        + " with `align-detr convert`; the weights are unchanged, "
        + {
            "mmdetection": "the outputs equal mmdetection's (see the project's parity tests).",
            "official": "the outputs equal the official code's (the project's parity tests run against its own "
            f"outputs). Code: {full}.",
            "detrex": "the official Align-DETR code builds on this network, and the project's parity tests run "
            f"against that code's outputs. Code: {full}.",
        }[code]
    )
    if entry is not None and entry.box_ap is not None:
        reports = {"mmdetection": "mmdetection reports", "official": "The authors report", "detrex": "detrex reports"}
        description += f" {reports[code]} {entry.box_ap} box AP on COCO val2017 for it ({entry.epochs} epochs)."
    elif named_like is not None and named_like.box_ap is not None:
        description += (
            f" Its file name matches `{named_like.name}`, for which {CODES[named_like.code][1]} reports "
            f"{named_like.box_ap} box AP on COCO val2017, but its sha256 "
            + ("does not match the published file's" if published_sha256_prefix(named_like) else
               "cannot be checked (no published checksum)")
            + ", so that figure is not claimed for these weights."
        )
    elif code == "official":
        description += (
            " The authors report 50.3 / 51.4 box AP on COCO val2017 for their released R-50 checkpoints (12 / 24 "
            "epochs), 50.5 / 51.7 for those trained with the Align Loss; the weights do not tell which one this is."
        )
    fields = {
        "model_name": model_name,
        "datasets": ["COCO train2017"],
        "source": (entry.url or entry.page or source) if entry else source,
        "license": "apache-2.0",  # mmdetection's, detrex's and the official code's license
        "citation": "\n\n".join(citations),
        "description": description,
        "hyperparameters": {
            "loss_type": config.loss_type,
            "backbone": backbone,
            "num_feature_levels": config.num_feature_levels,
            "num_queries": config.num_queries,
            "position_embedding_temperature": config.position_embedding_temperature,
            "position_embedding_offset": config.position_embedding_offset,
            "freeze_backbone_stages": config.freeze_backbone_stages,
            "head_inverse_sigmoid_eps": config.head_inverse_sigmoid_eps,
        },
    }
    if entry is not None and entry.box_ap is not None:  # the card's metrics are COCO's 0-1 scale
        fields.update(dataset_name=f"COCO val2017 (as reported by {publisher})", metrics={"map": entry.box_ap / 100})
    return fields
