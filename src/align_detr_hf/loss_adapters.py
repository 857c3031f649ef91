"""The Align-DETR loss for transformers' own detectors: one loss implementation ([`AlignDetrLoss`]), adapted inputs.

    from transformers import RTDetrForObjectDetection
    from align_detr_hf.loss_adapters import use_align_detr_loss

    model = RTDetrForObjectDetection.from_pretrained("PekingU/rtdetr_r50vd")
    use_align_detr_loss(model)            # model(pixel_values, labels=labels).loss is now the Align-DETR loss
    # Trainer / Accelerate / a plain loop train it as before: only the loss changed.

transformers' detection models compute their loss through `self.loss_function(logits, labels, device, pred_boxes,
config, outputs_class, outputs_coord, **extra)`, a settable attribute. [`use_align_detr_loss`] sets it to an
[`AlignDetrLossAdapter`], which re-lays the model's predictions out as [`AlignDetrLoss`] expects them and returns
`(loss, loss_dict, auxiliary_outputs)` as transformers' loss functions do. `loss_dict` uses mmdetection's term names
(`loss_cls`, `d0.loss_bbox`, `enc_loss_iou`, `dn_loss_cls`, ...; see `loss_align_detr`).

Supported models (all predict one sigmoid logit per class, `num_labels` logits, like Align-DETR):

* `DeformableDetrForObjectDetection`, with or without `with_box_refine` and `two_stage`. Its `loss_function` is not
  given the encoder proposals; with `two_stage=True` a forward hook on `model.model` picks them up, and the
  encoder term is class-agnostic (every ground truth counts as class 0) because the model selects its top-k
  proposals by the class-0 logit of its encoder head (as the original Deformable DETR trains that head).
* `ConditionalDetrForObjectDetection`: it passes the auxiliary (per decoder layer) predictions only with
  `config.auxiliary_loss=True`; without them, pass `decoder_num_gt_repeat=[k]` (last layer only).
* `RTDetrForObjectDetection`, `RTDetrV2ForObjectDetection`: every decoder layer, the encoder's top-k proposals,
  and the contrastive denoising queries. Their denoising layout is Align-DETR's (DINO's): `dn_num_split =
  [D, Q]` with `D = 2 * max_gt * dn_num_group` and the positive query of GT `j` in group `g` at `2 * max_gt * g + j`
  (`dn_positive_idx`), so the denoising terms are Align-DETR's own.
* `DFineForObjectDetection`: as RT-DETR, plus the initial ("pre") prediction of its first decoder layer, which
  gets its own one-to-k term `pre.loss_*` (it is the only signal that trains `pre_bbox_head`). Its distribution
  losses (FGL and DDF) are kept beside ours by default (`keep_terms=("loss_fgl", "loss_ddf")`): they are computed by
  D-FINE's own loss function, on its own one-to-one matching, and added as `own.loss_fgl...`.

DETR, DAB-DETR and other softmax ("no-object" class) models are rejected with an error.

Adding a model: everything model-specific is one [`ModelFamily`] entry of `MODEL_FAMILIES`, plus its class names in
`SUPPORTED_MODELS`. Its `inputs` function turns the model's loss-function arguments into [`AlignDetrLossInputs`]
(layer-first, decoder layers first to last, denoising queries split off with their `DenoisingLayout`, encoder
proposals if any); `setup` checks the model's config and hooks what its loss function is not given; `keep_terms` and
`own_term_weight` say which of its own terms are kept and how its own total weights them. The adapter does the rest
(which layers, k, the encoder term, kept terms). A model that trains groups of queries one-to-one each (Group DETR)
fits by moving the groups into the batch axis and repeating the targets: the GT-count normaliser then counts every
group, as those models' own losses do.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .configuration_align_detr import AlignDetrConfig
from .loss_align_detr import (
    AlignDetrLoss,
    AlignDetrLossConfig,
    AlignDetrLossInputs,
    DenoisingLayout,
    decoder_layer_names,
)

# The AlignDetrLossConfig fields that `use_align_detr_loss(..., **loss_overrides)` may set: all but the k's (their
# own options) and DINO's focal loss (the adapter computes the Align-DETR loss).
LOSS_HYPER_PARAMETERS = tuple(
    field.name for field in dataclasses.fields(AlignDetrLossConfig)
    if field.name not in ("num_gt_repeat_decoder", "num_gt_repeat_encoder", "focal_alpha", "focal_gamma")
)

@dataclasses.dataclass
class AlignDetrLossOptions:
    """What the adapter computes.

    decoder_num_gt_repeat: queries matched to each GT, one entry per decoder layer (first to last), or a single
        entry: the last layer only. None: Align-DETR's `[2, ..., 2, 1]` over every decoder layer.
    encoder_num_gt_repeat: the same for the encoder's proposals; 0 switches the encoder term off. None: 2 where the
        model has encoder proposals (Deformable DETR two-stage, RT-DETR, D-FINE), off otherwise.
    loss_overrides: values for [`AlignDetrLossConfig`]'s fields (`LOSS_HYPER_PARAMETERS`).
    keep_terms: the model's own loss terms to add beside ours, by name prefix (`"loss_fgl"` keeps `loss_fgl`,
        `loss_fgl_aux_0`, `loss_fgl_dn_1`, ...), reported as `own.<name>`. They come from the model's own loss
        function (its own matching), weighted as that function weights them.
    """

    decoder_num_gt_repeat: list[int] | None = None
    encoder_num_gt_repeat: int | None = None
    loss_overrides: dict = dataclasses.field(default_factory=dict)
    keep_terms: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = sorted(set(self.loss_overrides) - set(LOSS_HYPER_PARAMETERS))
        if unknown:
            raise ValueError(
                f"Unknown Align-DETR loss hyper-parameters {unknown}; known: {list(LOSS_HYPER_PARAMETERS)}."
            )
        AlignDetrConfig(**self.loss_overrides)  # its checks refuse a bad value now, not at the first loss call
        if self.decoder_num_gt_repeat is not None:
            self.decoder_num_gt_repeat = [int(k) for k in self.decoder_num_gt_repeat]
            if not self.decoder_num_gt_repeat or min(self.decoder_num_gt_repeat) < 1:
                raise ValueError(f"decoder_num_gt_repeat needs entries >= 1, got {self.decoder_num_gt_repeat}.")
        if self.encoder_num_gt_repeat is not None and self.encoder_num_gt_repeat < 0:
            raise ValueError(f"encoder_num_gt_repeat must be >= 0, got {self.encoder_num_gt_repeat}.")
        self.keep_terms = tuple(self.keep_terms)


# ------------------------------------------------------------------------------------------------------------------
# The model families
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What the adapter knows of one family of transformers' detectors (an entry of `MODEL_FAMILIES`).

    inputs: `(adapter, logits, pred_boxes, config, outputs_class, outputs_coord, **kwargs) -> AlignDetrLossInputs`:
        the family's loss-function arguments re-laid out for the loss.
    setup: `(adapter, model) -> None`, run once by [`use_align_detr_loss`]: checks of the model's config, hooks for
        what its loss function is not given. None: nothing to do.
    keep_terms: the model's own terms kept beside ours by default (those Align-DETR has no counterpart for).
    own_term_weight: `(key, config) -> float | None`, the weight the model's own loss function gives its term `key`
        in its total (None: not in the total). None: the family's loss_dict is weighted already.
    last_layer_alone: a single prediction layer is the model's last layer, passed alone by design (D-FINE in eval
        mode), rather than a sign of switched-off auxiliary outputs.
    """

    inputs: Callable[..., AlignDetrLossInputs]
    setup: Callable[[Any, Any], None] | None = None
    keep_terms: tuple[str, ...] = ()
    own_term_weight: Callable[[str, Any], float | None] | None = None
    last_layer_alone: bool = False


def _detr_inputs(adapter, logits, pred_boxes, config, outputs_class=None, outputs_coord=None, **kwargs):
    """Deformable / Conditional DETR: `outputs_class` (L, B, Q, C) layer-first, None without auxiliary outputs.
    Two-stage Deformable DETR's proposals come from the hook on its base model, ranked by their class-0 logit as the
    model ranks them: one logit each, so their term is class-agnostic (see the module docstring)."""
    if outputs_class is not None:
        logits, pred_boxes = outputs_class, outputs_coord
    else:
        logits, pred_boxes = logits[None], pred_boxes[None]
    encoder_logits = encoder_boxes = None
    if adapter.hook_handle is not None:
        encoder_class, encoder_coord_logits = adapter.pop_encoder_outputs()
        if encoder_class is None and adapter.options.encoder_num_gt_repeat != 0:
            raise ValueError(
                f"{adapter.model_class_name} (two_stage=True) ran its loss without the encoder outputs of its base "
                f"model's forward (the hook set by use_align_detr_loss on model.model did not see them). Call "
                f"the model as model(pixel_values, labels=...), or pass encoder_num_gt_repeat=0."
            )
        if encoder_class is not None:
            topk = encoder_class[..., 0].topk(min(logits.shape[2], encoder_class.shape[1]), dim=1)[1]
            encoder_logits = encoder_class.gather(1, topk[..., None])  # (B, K, 1)
            encoder_boxes = encoder_coord_logits.gather(1, topk[..., None].expand(-1, -1, 4)).sigmoid()
    return AlignDetrLossInputs(logits, pred_boxes, decoder_layer_names(logits.shape[0]), encoder_logits, encoder_boxes)


def _rt_detr_inputs(adapter, logits, pred_boxes, config, outputs_class, outputs_coord, enc_topk_logits=None,
                    enc_topk_bboxes=None, denoising_meta_values=None, **kwargs):
    """RT-DETR / RT-DETRv2: `outputs_class` (B, L, D + Q, C) batch-first, denoising queries first (`dn_num_split`,
    DINO's layout), the encoder's top-k proposals as `enc_topk_*`."""
    logits, boxes = outputs_class.transpose(0, 1), outputs_coord.transpose(0, 1)
    dn_logits = dn_boxes = denoising = None
    if denoising_meta_values is not None:
        num_dn, num_queries = denoising_meta_values["dn_num_split"]
        num_groups = int(denoising_meta_values["dn_num_group"])
        dn_logits, logits = logits.split([num_dn, num_queries], dim=2)
        dn_boxes, boxes = boxes.split([num_dn, num_queries], dim=2)
        denoising = DenoisingLayout(num_groups, num_dn // (2 * num_groups))
    return AlignDetrLossInputs(logits, boxes, decoder_layer_names(logits.shape[0]), enc_topk_logits, enc_topk_bboxes,
                               dn_logits, dn_boxes, denoising)


def _d_fine_inputs(adapter, logits, pred_boxes, config, outputs_class, outputs_coord, **kwargs):
    """D-FINE: RT-DETR's layout, boxes clamped to the image as D-FINE's own loss does (its distance2bbox can leave
    it). In training, entry 0 is the first layer's initial prediction (`pre_bbox_head`), named `pre.`; in eval mode
    it passes its evaluation layer alone."""
    inputs = _rt_detr_inputs(adapter, logits, pred_boxes, config, outputs_class, outputs_coord.clamp(0, 1), **kwargs)
    if inputs.logits.shape[0] == config.decoder_layers + 1:
        inputs = dataclasses.replace(inputs, layer_names=["pre."] + decoder_layer_names(config.decoder_layers))
    return inputs


def _refuse_encoder_term(adapter) -> None:
    if adapter.options.encoder_num_gt_repeat:
        raise ValueError(f"encoder_num_gt_repeat={adapter.options.encoder_num_gt_repeat} asks for an encoder term, but "
                         f"{adapter.model_class_name} has no encoder proposals (Deformable DETR needs two_stage=True).")


def _deformable_detr_setup(adapter, model) -> None:
    if model.config.two_stage:  # its loss function is not given the proposals: a hook on the base model keeps them
        adapter.hook_handle = model.model.register_forward_hook(adapter.capture_encoder_outputs)
    else:
        _refuse_encoder_term(adapter)


def _conditional_detr_setup(adapter, model) -> None:
    if not model.config.auxiliary_loss and len(adapter.options.decoder_num_gt_repeat or [0, 0]) > 1:
        raise ValueError("ConditionalDetrForObjectDetection passes its per-layer predictions to the loss only with "
                         "config.auxiliary_loss=True; set it, or pass decoder_num_gt_repeat=[k] (last layer only).")
    _refuse_encoder_term(adapter)


def _detr_own_term_weight(key: str, config) -> float | None:
    """Deformable / Conditional DETR weight their terms (`loss_ce`, `loss_bbox`, `loss_giou` and the per-layer
    `..._<i>` copies) only when they add them up."""
    base = key.rsplit("_", 1)[0] if key[-1].isdigit() else key
    weights = {"loss_ce": 1.0, "loss_bbox": config.bbox_loss_coefficient, "loss_giou": config.giou_loss_coefficient}
    return None if base not in weights else float(weights[base])


MODEL_FAMILIES = {
    "deformable_detr": ModelFamily(_detr_inputs, _deformable_detr_setup, own_term_weight=_detr_own_term_weight),
    "conditional_detr": ModelFamily(_detr_inputs, _conditional_detr_setup, own_term_weight=_detr_own_term_weight),
    "rt_detr": ModelFamily(_rt_detr_inputs),
    "d_fine": ModelFamily(_d_fine_inputs, keep_terms=("loss_fgl", "loss_ddf"), last_layer_alone=True),
}

# Model class name -> its family in MODEL_FAMILIES.
SUPPORTED_MODELS = {
    "DeformableDetrForObjectDetection": "deformable_detr",
    "ConditionalDetrForObjectDetection": "conditional_detr",
    "RTDetrForObjectDetection": "rt_detr",
    "RTDetrV2ForObjectDetection": "rt_detr",
    "DFineForObjectDetection": "d_fine",
}


# ------------------------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------------------------


class AlignDetrLossAdapter:
    """A transformers `loss_function` computing the Align-DETR loss for one model family (see module docstring).

    Not an `nn.Module` (it holds no parameters; `model.loss_function = module` would register it as a sub-module
    instead of replacing the loss). Built by [`use_align_detr_loss`].
    """

    def __init__(self, model_class_name: str, options: AlignDetrLossOptions, own_loss_function=None):
        if model_class_name not in SUPPORTED_MODELS:
            raise ValueError(
                f"The Align-DETR loss adapter does not support {model_class_name}; supported: "
                f"{sorted(SUPPORTED_MODELS)}. (Softmax detectors with a 'no-object' class, such as DETR or DAB-DETR, "
                f"do not fit a sigmoid IA-BCE loss.)"
            )
        self.model_class_name = model_class_name
        self.family = MODEL_FAMILIES[SUPPORTED_MODELS[model_class_name]]
        self.options = options
        self.own_loss_function = own_loss_function
        if options.keep_terms and own_loss_function is None:
            raise ValueError("keep_terms needs the model's own loss function.")
        self._captured = threading.local()  # base-model outputs of the current forward (Deformable DETR two-stage)
        self._losses: dict[tuple, AlignDetrLoss] = {}
        self.hook_handle = None  # the hook set by the family's setup, if any

    def __getstate__(self):  # deepcopy / pickle (e.g. an EMA copy of the model): not the thread-local slot
        return {k: v for k, v in self.__dict__.items() if k not in ("_captured", "_losses")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._captured, self._losses = threading.local(), {}

    # ---------------------------------------------------------------------------------------------------- hooks

    def capture_encoder_outputs(self, module, args, output) -> None:
        """Forward hook on Deformable DETR's base model: keep the two-stage encoder outputs for the loss call."""
        self._captured.encoder = (getattr(output, "enc_outputs_class", None),
                                  getattr(output, "enc_outputs_coord_logits", None))

    def pop_encoder_outputs(self) -> tuple:
        """The encoder outputs captured in this thread's current forward, once (a later call must not see stale
        tensors); (None, None) if there are none."""
        captured = getattr(self._captured, "encoder", (None, None))
        self._captured.encoder = (None, None)
        return captured

    # ---------------------------------------------------------------------------------------------------- loss

    def __call__(self, logits, labels, device, pred_boxes, config, outputs_class=None, outputs_coord=None, **kwargs):
        inputs = self.adapt(logits, pred_boxes, config, outputs_class, outputs_coord, **kwargs)
        loss_dict = self.align_detr_losses(inputs, labels, config)
        if self.options.keep_terms:
            # D-FINE in eval mode computes no distribution losses: nothing to keep is not an error there
            loss_dict.update(self._kept_own_terms(
                not self._last_layer_alone(inputs), logits, labels, device, pred_boxes, config, outputs_class,
                outputs_coord, **kwargs))
        loss = sum(loss_dict.values())
        auxiliary_outputs = [{"logits": lg, "pred_boxes": bx} for lg, bx in zip(inputs.logits[:-1], inputs.boxes[:-1])]
        return loss, loss_dict, auxiliary_outputs

    def adapt(self, logits, pred_boxes, config, outputs_class=None, outputs_coord=None,
              **kwargs) -> AlignDetrLossInputs:
        """Re-lay a model's loss-function arguments out as [`AlignDetrLoss`] reads them (the family's `inputs`)."""
        if logits.shape[-1] != config.num_labels:
            raise ValueError(f"{self.model_class_name} gives {logits.shape[-1]} logits per query but config.num_labels "
                             f"is {config.num_labels}; the Align-DETR loss needs one sigmoid logit per class.")
        return self.family.inputs(self, logits, pred_boxes, config, outputs_class, outputs_coord, **kwargs)

    def align_detr_losses(self, inputs: AlignDetrLossInputs, labels: list[dict], config) -> dict:
        """The Align-DETR terms of a model's adapted predictions, named as mmdetection names them."""
        inputs, decoder_k = self._select_layers(inputs, config)
        encoder_k = self._encoder_num_gt_repeat(inputs)
        # Proposals scored by one logit (two-stage Deformable DETR ranks and trains them by its class-0 logit) are
        # class-agnostic: their term is a one-class problem of its own, every GT counting as class 0.
        num_labels = inputs.logits.shape[-1]
        class_agnostic = encoder_k > 0 and inputs.encoder_logits.shape[-1] == 1 < num_labels
        loss_fn = self._loss(num_labels, decoder_k, encoder_k if encoder_k > 0 and not class_agnostic else None)
        loss_dict = loss_fn(inputs, labels)[1]
        if class_agnostic:
            agnostic = [{"class_labels": torch.zeros_like(t["class_labels"]), "boxes": t["boxes"]} for t in labels]
            encoder = AlignDetrLossInputs(inputs.encoder_logits[None], inputs.encoder_boxes[None], ["enc_"])
            loss_dict.update(self._loss(1, [encoder_k], None)(encoder, agnostic)[1])
        return loss_dict

    # ---------------------------------------------------------------------------------------------------------------

    def _last_layer_alone(self, inputs: AlignDetrLossInputs) -> bool:
        """Whether the model passed its last layer alone by design (D-FINE in eval mode)."""
        return self.family.last_layer_alone and inputs.logits.shape[0] == 1

    def _select_layers(self, inputs: AlignDetrLossInputs, config) -> tuple[AlignDetrLossInputs, list[int]]:
        """The prediction layers the loss covers and their k, from `decoder_num_gt_repeat` (see the options)."""
        requested = self.options.decoder_num_gt_repeat
        if self._last_layer_alone(inputs):
            return inputs, [requested[-1] if requested else 1]
        has_pre = inputs.layer_names[0] == "pre."  # D-FINE: the pre prediction takes the first layer's k
        num_layers = inputs.logits.shape[0] - has_pre
        auxiliary_off = " (auxiliary outputs are off: set config.auxiliary_loss=True)" if num_layers == 1 else ""
        if requested is None:
            if num_layers == 1 and getattr(config, "decoder_layers", 1) > 1:
                raise ValueError(
                    f"{self.model_class_name} passed only the last decoder layer's predictions{auxiliary_off}, but "
                    f"the default decoder_num_gt_repeat covers all {config.decoder_layers} layers. Pass "
                    f"decoder_num_gt_repeat=[k] to train the last layer only."
                )
            requested = [2] * (num_layers - 1) + [1]
        if len(requested) == 1 and num_layers > 1:  # last layer only
            last = slice(-1, None)
            dn_logits = inputs.dn_logits[last] if inputs.dn_logits is not None else None
            dn_boxes = inputs.dn_boxes[last] if inputs.dn_boxes is not None else None
            inputs = dataclasses.replace(inputs, logits=inputs.logits[last], boxes=inputs.boxes[last], layer_names=[""],
                                         dn_logits=dn_logits, dn_boxes=dn_boxes)
            return inputs, list(requested)
        if len(requested) != num_layers:
            raise ValueError(
                f"decoder_num_gt_repeat has {len(requested)} entries but {self.model_class_name} passed {num_layers} "
                f"decoder prediction layers{auxiliary_off}; give one entry per layer, or one for the last layer only."
            )
        return inputs, ([requested[0]] if has_pre else []) + list(requested)

    def _encoder_num_gt_repeat(self, inputs: AlignDetrLossInputs) -> int:
        requested = self.options.encoder_num_gt_repeat
        if inputs.encoder_logits is None:
            if requested:
                raise ValueError(f"encoder_num_gt_repeat={requested} asks for an encoder term, but "
                                 f"{self.model_class_name} gave no encoder proposals (Deformable DETR has them only "
                                 f"with two_stage=True; Conditional DETR never).")
            return 0
        return 2 if requested is None else requested

    def _loss(self, num_labels: int, decoder_k: list[int], encoder_k: int | None) -> AlignDetrLoss:
        key = (num_labels, tuple(decoder_k), encoder_k)
        if key not in self._losses:
            loss_config = AlignDetrLossConfig(num_gt_repeat_decoder=tuple(decoder_k), num_gt_repeat_encoder=encoder_k,
                                              **self.options.loss_overrides)
            self._losses[key] = AlignDetrLoss(num_labels, loss_config)
        return self._losses[key]

    def _kept_own_terms(self, must_match: bool, *args, **kwargs) -> dict:
        own_dict = self.own_loss_function(*args, **kwargs)[1]
        config = args[4]
        kept = {}
        for key, value in own_dict.items():
            if any(key == term or key.startswith(term + "_") for term in self.options.keep_terms):
                kept[f"own.{key}"] = value * self._own_weight(key, config)
        if not kept and must_match:
            raise ValueError(f"keep_terms={list(self.options.keep_terms)} matched none of the model's own loss terms "
                             f"{sorted(own_dict)}.")
        return kept

    def _own_weight(self, key: str, config) -> float:
        """The weight the model's own loss function gives `key` in its total."""
        if self.family.own_term_weight is None:
            return 1.0
        weight = self.family.own_term_weight(key, config)
        if weight is None:
            raise ValueError(f"Cannot keep '{key}': {self.model_class_name}'s loss does not add it to its total.")
        return weight


def use_align_detr_loss(
    model,
    decoder_num_gt_repeat: Sequence[int] | None = None,
    encoder_num_gt_repeat: int | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    tau: float = 1.5,
    keep_terms: Sequence[str] | None = None,
    **loss_overrides,
) -> AlignDetrLossAdapter:
    """Make `model` (a transformers detector, see module docstring) train with the Align-DETR loss.

    Args:
        model: a `DeformableDetrForObjectDetection`, `ConditionalDetrForObjectDetection`, `RTDetrForObjectDetection`,
            `RTDetrV2ForObjectDetection` or `DFineForObjectDetection` instance.
        decoder_num_gt_repeat: k per decoder layer (first to last), or `[k]` for the last layer only. Default
            Align-DETR's `[2, ..., 2, 1]`.
        encoder_num_gt_repeat: k of the encoder proposals (0: no encoder term). Default 2 where there are proposals.
        alpha: IA-BCE quality target `t = p^alpha * IoU^(1 - alpha)` (`AlignDetrLossConfig.quality_alpha`).
        gamma: negatives weighted by `p^gamma` (`negative_gamma`).
        tau: prime-sample weight `exp(-rank / tau)` (`rank_tau`).
        keep_terms: the model's own terms to keep beside ours (name prefixes, e.g. `("loss_fgl", "loss_ddf")`);
            default: D-FINE's distribution losses for D-FINE, none otherwise.
        **loss_overrides: other [`AlignDetrLossConfig`] fields (`LOSS_HYPER_PARAMETERS`), e.g. `matcher_giou_cost`.
    Returns:
        The [`AlignDetrLossAdapter`] now set as `model.loss_function`. Undo with [`remove_align_detr_loss`].
    """
    class_name = type(model).__name__
    if isinstance(getattr(model, "_loss_function", None), AlignDetrLossAdapter):
        raise ValueError(f"This {class_name} already uses the Align-DETR loss; call remove_align_detr_loss first.")
    family = MODEL_FAMILIES.get(SUPPORTED_MODELS.get(class_name))
    options = AlignDetrLossOptions(
        decoder_num_gt_repeat=None if decoder_num_gt_repeat is None else list(decoder_num_gt_repeat),
        encoder_num_gt_repeat=encoder_num_gt_repeat,
        loss_overrides={"quality_alpha": alpha, "negative_gamma": gamma, "rank_tau": tau, **loss_overrides},
        keep_terms=(family.keep_terms if family else ()) if keep_terms is None else tuple(keep_terms),
    )
    adapter = AlignDetrLossAdapter(class_name, options, own_loss_function=model.loss_function)
    if adapter.family.setup is not None:
        adapter.family.setup(adapter, model)
    model.loss_function = adapter
    return adapter


def remove_align_detr_loss(model) -> None:
    """Give `model` its own loss back (undoes [`use_align_detr_loss`])."""
    adapter = getattr(model, "_loss_function", None)
    if not isinstance(adapter, AlignDetrLossAdapter):
        raise ValueError(f"This {type(model).__name__} does not use the Align-DETR loss.")
    if getattr(adapter, "hook_handle", None) is not None:
        adapter.hook_handle.remove()
    del model._loss_function


__all__ = ["AlignDetrLossAdapter", "AlignDetrLossOptions", "LOSS_HYPER_PARAMETERS", "MODEL_FAMILIES", "ModelFamily",
           "SUPPORTED_MODELS", "remove_align_detr_loss", "use_align_detr_loss"]
