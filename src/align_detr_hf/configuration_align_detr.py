"""Configuration of Align-DETR: the single source of every hyper-parameter of the network and its loss."""

from transformers import AutoConfig, PreTrainedConfig, ResNetConfig

from .validation import Flag, Integer, Kind, ListOf, Number, OneOf, check_fields

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


# Values of `AlignDetrConfig.loss_type`: the Align-DETR loss, or mmdetection DINO's own loss.
LOSS_TYPES = ("align_detr", "dino")


class AlignDetrConfig(PreTrainedConfig):
    r"""
    Configuration of [`AlignDetrModel`] and [`AlignDetrForObjectDetection`]. The defaults are mmdetection's released
    `align_detr-4scale_r50_8xb2-12e_coco` model: ResNet-50, 4 feature levels, 6+6 deformable layers, 900 queries,
    80 COCO classes.

    Network:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*): any `AutoBackbone` config. Defaults to
            transformers' ResNet-50 with `out_features=["stage2", "stage3", "stage4"]` (strides 8, 16, 32). All its
            BatchNorms become frozen BatchNorms.
        freeze_backbone_stages (`int`, defaults to 0): mmdetection's `frozen_stages`: -1 trains the whole backbone
            (mmdetection's Swin default), 0 freezes the stem (ResNet stem, Swin patch embedding), k the stem and the
            first k stages too (Align-DETR: 0; mmdetection's DINO R-50: 1).
        d_model (`int`, defaults to 256): width of the transformer.
        num_feature_levels (`int`, defaults to 4): backbone levels plus extra stride-2 levels.
        neck_bias (`bool`, defaults to `True`): whether the neck's convolutions (before their GroupNorm) have a bias;
            Align-DETR's do, mmdetection's DINO configs have none (`bias='auto'` with a norm).
        encoder_layers / decoder_layers (`int`, defaults to 6): number of layers.
        encoder_ffn_dim / decoder_ffn_dim (`int`, defaults to 2048): hidden size of the feed-forward networks.
        encoder_attention_heads / decoder_attention_heads (`int`, defaults to 8).
        encoder_n_points / decoder_n_points (`int`, defaults to 4): sampling points per head and level.
        dropout (`float`, defaults to 0.0): dropout after attention and feed-forward blocks (0 in the reference).
        num_queries (`int`, defaults to 900): matching queries, chosen from the encoder's top-k proposals.
        position_embedding_temperature (`float`, defaults to 10000) and position_embedding_offset (`float`,
            defaults to -0.5): the normalised sine position encoding of the feature maps (mmdetection's DINO
            configs: 20 and 0).
        init_prior_prob (`float`, defaults to 0.01): class-logit bias is initialised to log(p / (1 - p)).
        head_inverse_sigmoid_eps (`float`, defaults to 1e-5): the clamp of `inverse_sigmoid(reference)` when a
            decoder layer's box head adds its deltas to the layer's reference box (`pred_boxes`): mmdetection uses
            1e-5, detrex and the official Align-DETR code 1e-3 (what `align-detr convert` sets for their
            checkpoints). It changes only boxes whose reference lies within 1e-3 of 0 or 1, e.g. denoising boxes
            clamped to the image border (up to 1.2e-4 in training). The refined reference passed on to the next
            layer always uses 1e-3, as in both codes.

    Contrastive denoising (training only):
        num_denoising_queries (`int`, defaults to 100): budget per positive/negative half; the number of groups is
            `max(1, num_denoising_queries // max_gt_per_image)`. 0 switches denoising off.
        label_noise_ratio (`float`, defaults to 0.5): a denoising label is re-drawn with probability ratio / 2.
        box_noise_scale (`float`, defaults to 1.0): corner noise, as a fraction of half the box size.

    Align-DETR loss:
        num_gt_repeat (`list[int]`, *optional*): queries matched to each ground truth, per prediction layer, in
            mmdetection's order: decoder layers 0..L-1, then the encoder proposals. Defaults to 2 for every layer
            except the last decoder layer (1): `[2, 2, 2, 2, 2, 1, 2]`.
        quality_alpha (`float`, defaults to 0.25): target `t = p^alpha * IoU^(1 - alpha)`.
        quality_min (`float`, defaults to 0.01): lower clamp of `t`.
        negative_gamma (`float`, defaults to 2.0): negatives are weighted by `p^gamma`.
        rank_tau (`float`, defaults to 1.5): prime-sample weight `exp(-rank / tau)`.
        matcher_class_cost, matcher_bbox_cost, matcher_giou_cost (`float`, defaults to 2, 5, 2): Hungarian costs
            (focal class cost, L1 on normalised cxcywh, negative GIoU).
        matcher_alpha, matcher_gamma (`float`, defaults to 0.25, 2.0): focal cost parameters.
        class_loss_coefficient, bbox_loss_coefficient, giou_loss_coefficient (`float`, defaults to 1, 5, 2).

    Loss choice:
        loss_type (`str`, defaults to `"align_detr"`): `"align_detr"` (the loss above) or `"dino"` (mmdetection's
            `DINOHead`: one-to-one Hungarian matching on every layer -- `num_gt_repeat` and the IA-BCE/rank fields
            are unused -- sigmoid focal classification loss, the same matcher costs, L1/GIoU coefficients and
            denoising; the matching-part losses are normalised by the number of matched queries).
        focal_alpha, focal_gamma (`float`, defaults to 0.25, 2.0): the DINO loss's sigmoid focal loss.
    """

    model_type = "align_detr"
    sub_configs = {"backbone_config": AutoConfig}
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads"}
    # `keys_to_ignore_at_inference` (what Trainer drops from predictions) is derived from the output dataclass in
    # modeling_align_detr.py, so the field list lives in one place.

    # Each field declares the values it takes (see validation.py); `__post_init__` and `validate()` (which
    # `save_pretrained` calls) enforce them, so every path -- constructor, from_pretrained, the converter, the loss
    # adapter -- refuses a bad value with one line naming the field, the value and what is allowed.
    backbone_config: dict | PreTrainedConfig | None = Kind(
        (dict, PreTrainedConfig), "a dict or a PreTrainedConfig (an AutoBackbone config)", optional=True
    ).field(None)
    freeze_backbone_stages: int = Integer(min=-1).field(0)
    d_model: int = Integer(min=32, multiple_of=32).field(256)  # the neck's GroupNorm has 32 groups
    num_feature_levels: int = Integer(min=1).field(4)
    neck_bias: bool = Flag().field(True)
    encoder_layers: int = Integer(min=0).field(6)
    decoder_layers: int = Integer(min=1).field(6)
    encoder_ffn_dim: int = Integer(min=1).field(2048)
    decoder_ffn_dim: int = Integer(min=1).field(2048)
    encoder_attention_heads: int = Integer(min=1).field(8)
    decoder_attention_heads: int = Integer(min=1).field(8)
    encoder_n_points: int = Integer(min=1).field(4)
    decoder_n_points: int = Integer(min=1).field(4)
    dropout: float | int = Number(0, 1).field(0.0)
    num_queries: int = Integer(min=1).field(900)
    position_embedding_temperature: float | int = Number(min=0, exclude_min=True).field(10000)
    position_embedding_offset: float | int = Number().field(-0.5)
    init_prior_prob: float = Number(0, 1, exclude_min=True, exclude_max=True).field(0.01)
    head_inverse_sigmoid_eps: float = Number(0, 0.5, exclude_min=True, exclude_max=True).field(1e-5)

    num_denoising_queries: int = Integer(min=0).field(100)
    label_noise_ratio: float | int = Number(0, 2).field(0.5)  # re-drawn with probability ratio / 2
    box_noise_scale: float | int = Number(min=0).field(1.0)

    num_gt_repeat: list[int] | tuple[int, ...] | None = ListOf(
        Integer(min=1), "a list of integers >= 1 (one per decoder layer, then the encoder)", optional=True
    ).field(None)
    quality_alpha: float | int = Number(0, 1).field(0.25)
    quality_min: float | int = Number(0, 1).field(0.01)
    negative_gamma: float | int = Number(min=0).field(2.0)
    rank_tau: float | int = Number(min=0, exclude_min=True).field(1.5)
    matcher_class_cost: float | int = Number(min=0).field(2.0)
    matcher_bbox_cost: float | int = Number(min=0).field(5.0)
    matcher_giou_cost: float | int = Number(min=0).field(2.0)
    matcher_alpha: float | int = Number(0, 1).field(0.25)
    matcher_gamma: float | int = Number(min=0).field(2.0)
    class_loss_coefficient: float | int = Number(min=0).field(1.0)
    bbox_loss_coefficient: float | int = Number(min=0).field(5.0)
    giou_loss_coefficient: float | int = Number(min=0).field(2.0)
    loss_type: str = OneOf(*LOSS_TYPES).field("align_detr")
    focal_alpha: float | int = Number(0, 1).field(0.25)
    focal_gamma: float | int = Number(min=0).field(2.0)

    is_encoder_decoder: bool = Flag().field(True)
    tie_word_embeddings: bool = Flag().field(False)

    def __post_init__(self, **kwargs):
        check_fields(self)  # before anything is derived from them
        if self.backbone_config is None:
            self.backbone_config = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
        elif isinstance(self.backbone_config, dict):
            backbone_kwargs = dict(self.backbone_config)
            self.backbone_config = AutoConfig.for_model(backbone_kwargs.pop("model_type", "resnet"), **backbone_kwargs)
        if self.num_gt_repeat is None:
            self.num_gt_repeat = [2] * (self.decoder_layers - 1) + [1, 2]
        self.num_gt_repeat = list(self.num_gt_repeat)
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(COCO_CLASSES))
        super().__post_init__(**kwargs)
        if self.label2id is None or len(self.label2id) != len(self.id2label):
            self.label2id = {name: index for index, name in self.id2label.items()}
        self._drop_custom_pipelines_served_here()
        self._check_across_fields()

    def validate(self):
        """transformers' validation hook (`save_pretrained` calls it): a value set after construction is checked
        before it is written."""
        super().validate()
        check_fields(self)
        self._check_across_fields()

    def _drop_custom_pipelines_served_here(self):
        """A saved folder names our pipeline in `custom_pipelines`, so that where this package is not installed
        `pipeline(..., trust_remote_code=True)` runs it. Where a task is already served by that pipeline (the
        installed package registers it), the entry is dropped: transformers would demand `trust_remote_code` for it."""
        import sys

        custom = getattr(self, "custom_pipelines", None)
        pipelines = sys.modules.get("transformers.pipelines")  # not imported: no pipeline is being built
        if not isinstance(custom, dict) or not custom or pipelines is None:
            return
        served = {task: getattr(entry.get("impl"), "__name__", None)
                  for task, entry in pipelines.PIPELINE_REGISTRY.supported_tasks.items()}
        kept = {task: entry for task, entry in custom.items()
                if not (isinstance(entry, dict) and served.get(task) == str(entry.get("impl", "")).rsplit(".", 1)[-1])}
        if kept:
            self.custom_pipelines = kept
        else:
            del self.custom_pipelines

    def _check_across_fields(self):
        def refuse(name: str, allowed: str, got) -> None:
            raise ValueError(f"{type(self).__name__}.{name} must be {allowed}, got {got}.")

        stages = getattr(self.backbone_config, "depths", None)
        if stages is not None and self.freeze_backbone_stages > len(stages):
            refuse("freeze_backbone_stages", f"at most {len(stages)} (the backbone's stages)",
                   self.freeze_backbone_stages)  # fmt: skip
        if len(self.num_gt_repeat) != self.decoder_layers + 1:
            refuse("num_gt_repeat", f"a list of decoder_layers + 1 = {self.decoder_layers + 1} entries (one per "
                   "decoder layer, then the encoder)", self.num_gt_repeat)  # fmt: skip
        num_backbone_levels = len(self.backbone_config.out_features)
        if num_backbone_levels > self.num_feature_levels:
            refuse("num_feature_levels", f">= the {num_backbone_levels} feature maps the backbone gives",
                   self.num_feature_levels)  # fmt: skip
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                refuse(name, f"a number that divides d_model ({self.d_model})", getattr(self, name))
        if self.num_labels < 1:
            refuse("num_labels", ">= 1 (at least one class)", self.num_labels)
        if sorted(self.id2label) != list(range(self.num_labels)):
            ids = sorted(self.id2label)
            refuse("id2label", f"a map of the class ids 0..{self.num_labels - 1} to names",
                   f"the ids {ids[:10]}{' ...' if len(ids) > 10 else ''}")  # fmt: skip
