"""What an mmdetection checkpoint says beyond its tensors: the training config in `meta['cfg']`, the settings of the
DINO family's heads that the weights do not show, and mmdetection's model zoo (names, URLs with their sha256
prefixes, COCO box AP), which also gives the model card of a converted folder.

Settings the weights do not show (from mmdetection's configs):

| | Align-DETR (`AlignDETRHead`) | DINO (`DINOHead`) |
|---|---|---|
| loss | IA-BCE, one-to-k matching | sigmoid focal, one-to-one matching |
| position encoding temperature / offset | 10000 / -0.5 | 20 / 0 (the "improved" R-50 config: 10000 / -0.5) |
| ResNet `frozen_stages` | 0 (stem) | 1 (stem + first stage; "improved": -1) |
| Swin `frozen_stages`, `drop_path_rate` | | -1 (nothing), 0.2 |

The neck's conv bias is visible in the weights (Align-DETR has one, DINO none).
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


class ZooEntry(NamedTuple):
    """One config of mmdetection's model zoo; `url` and `box_ap` are None where mmdetection publishes no weights."""

    name: str
    backbone: str
    epochs: int
    box_ap: float | None
    url: str | None
    settings: dict  # config fields the weights do not show


_MMDET = "https://download.openmmlab.com/mmdetection/v3.0"
_DINO, _ALIGN = HEAD_SETTINGS["dino"], HEAD_SETTINGS["align_detr"]
_DINO_R50 = {**_DINO, "freeze_backbone_stages": 1}
_SWIN = {**_DINO, "freeze_backbone_stages": -1, "drop_path_rate": SWIN_DROP_PATH_RATE}

# mmdetection's configs/dino/metafile.yml and README, projects/AlignDETR/README.md
MODEL_ZOO = [
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


def zoo_entry(path_or_url: str) -> ZooEntry | None:
    """The zoo entry whose config name starts the file name (mmdetection names files `<config>_<date>-<sha>.pth`)."""
    name = os.path.basename(urllib.parse.urlparse(str(path_or_url)).path)
    for entry in sorted(MODEL_ZOO, key=lambda e: -len(e.name)):
        if re.match(re.escape(entry.name) + r"([_.-]|$)", name):
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


def model_card_fields(entry: ZooEntry | None, config, source: str | None, model_name: str | None = None) -> dict:
    """Keyword arguments of `hub.write_model_card` for a folder converted from `source` (a zoo entry if known);
    `model_name` is the Hub id when the folder is pushed (the card's usage snippet loads it)."""
    loss = "Align-DETR" if config.loss_type == "align_detr" else "DINO"
    backbone = entry.backbone if entry else config.backbone_config.model_type
    citations = [ALIGN_DETR_CITATION, DINO_CITATION] if config.loss_type == "align_detr" else [DINO_CITATION]
    if config.backbone_config.model_type == "swin":
        citations.append(SWIN_CITATION)
    description = (
        (f"mmdetection's `{entry.name}`: " if entry else "")
        + f"{loss} ({config.num_feature_levels}-scale, {backbone} backbone) converted from the mmdetection checkpoint "
        f"`{os.path.basename(urllib.parse.urlparse(str(source)).path) if source else 'unknown'}` with "
        "`align-detr convert`; the weights are unchanged, the outputs equal mmdetection's (see the project's parity "
        "tests)."
    )
    if entry is not None and entry.box_ap is not None:
        description += f" mmdetection reports {entry.box_ap} box AP on COCO val2017 for it ({entry.epochs} epochs)."
    fields = {
        "model_name": model_name,
        "datasets": ["COCO train2017"],
        "source": entry.url if entry and entry.url else source,
        "license": "apache-2.0",  # mmdetection's license, which its model zoo is published under
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
        },
    }
    if entry is not None and entry.box_ap is not None:  # the card's metrics are COCO's 0-1 scale
        fields.update(dataset_name="COCO val2017 (as reported by mmdetection)", metrics={"map": entry.box_ap / 100})
    return fields
