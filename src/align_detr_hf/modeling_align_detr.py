"""Align-DETR: DINO-4scale (deformable encoder/decoder, two-stage query selection, contrastive denoising,
look-forward-twice box refinement) with the Align-DETR training loss, as mmdetection codes it.

Reading order: output dataclasses, building blocks, encoder, decoder, `AlignDetrModel`,
`AlignDetrForObjectDetection`. The backbone wrapper is in `backbone_align_detr.py`, the denoising query generator in
`denoising_align_detr.py`. Module names follow transformers' DETR family; the converter in
`convert_align_detr.py` maps mmdetection's names onto them.
"""

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .backbone_align_detr import AlignDetrConvEncoder, AlignDetrFrozenBatchNorm2d  # noqa: F401 (public here too)
from .box_ops import inverse_sigmoid
from .configuration_align_detr import AlignDetrConfig
from .denoising_align_detr import AlignDetrDenoisingQueries, DenoisingLayout, build_denoising_queries
from .loss_align_detr import AlignDetrLossInputs, build_loss, decoder_layer_names
from .ms_deform_attn import multi_scale_deformable_attention
from .targets_align_detr import validate_labels

# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AlignDetrModelOutput(ModelOutput):
    """
    Outputs of [`AlignDetrModel`]. B = batch, Q = matching queries, D = denoising queries (training with labels
    only, else 0), L = decoder layers, E = encoder layers, S = encoder positions over all levels, H = attention
    heads, P = sampling points per head and level.

    BATCH-FIRST, as transformers' Deformable DETR documents its `intermediate_*` fields: every tensor output has
    the batch on its first axis, `(B, L, ...)` for the per-layer ones, so code that splits outputs per image
    (transformers' pipelines, `Trainer`'s gathering) works. (The loss works layer by layer and receives the
    layer-first view `(L, B, ...)`, mmdetection's layout, as transformers' own DETR losses do.) The `intermediate_*`
    tensors and the decoder's hidden states and attentions cover all D + Q queries, denoising queries first.

    Args:
        last_hidden_state (`(B, Q, d_model)`): last decoder layer after the decoder's final LayerNorm.
        intermediate_hidden_states (`(B, L, D + Q, d_model)`): every decoder layer after the final LayerNorm.
        intermediate_reference_points (`(B, L + 1, D + Q, 4)`): reference boxes (sigmoid cxcywh); [:, 0] are the
            initial ones, [:, l + 1] those refined by layer l (not detached: look forward twice).
        intermediate_pred_boxes (`(B, L, D + Q, 4)`): box predictions of every layer (sigmoid cxcywh).
        encoder_last_hidden_state (`(B, S, d_model)`): the encoder memory.
        enc_topk_logits (`(B, Q, num_labels)`), enc_topk_boxes (`(B, Q, 4)`): class logits and boxes of the
            proposals picked by two-stage query selection; the boxes are the decoder's first references.
        enc_topk_indices (`(B, Q)`): their flat encoder positions, in descending order of max class logit.
        num_denoising_queries (`int`), num_denoising_groups (`int`), denoising_max_gt (`int`): the denoising part,
            D = 2 * denoising_max_gt * num_denoising_groups (None without denoising queries).
        encoder_hidden_states (`tuple` of E + 1 `(B, S, d_model)`, with `output_hidden_states`): the flattened
            multi-level features entering the encoder (no position embedding), then the output of every encoder layer.
        encoder_attentions (`tuple` of E `(B, S, H, num_feature_levels, P)`, with `output_attentions`): the
            deformable-attention weights of every encoder layer (softmaxed over levels x points).
        decoder_hidden_states (`tuple` of L + 1 `(B, D + Q, d_model)`, with `output_hidden_states`): the decoder's
            input queries, then the output of every decoder layer (before the final LayerNorm, i.e. what the next
            layer receives).
        decoder_attentions (`tuple` of L `(B, H, D + Q, D + Q)`, with `output_attentions`): self-attention weights
            of every decoder layer (0 where the denoising mask forbids attending).
        cross_attentions (`tuple` of L `(B, D + Q, H, num_feature_levels, P)`, with `output_attentions`): the
            deformable cross-attention weights of every decoder layer.
    """

    last_hidden_state: torch.FloatTensor | None = None
    intermediate_hidden_states: torch.FloatTensor | None = None
    intermediate_reference_points: torch.FloatTensor | None = None
    intermediate_pred_boxes: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    enc_topk_logits: torch.FloatTensor | None = None
    enc_topk_boxes: torch.FloatTensor | None = None
    enc_topk_indices: torch.LongTensor | None = None
    num_denoising_queries: int | None = None
    num_denoising_groups: int | None = None
    denoising_max_gt: int | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class AlignDetrObjectDetectionOutput(ModelOutput):
    """
    Outputs of [`AlignDetrForObjectDetection`]; shapes and the BATCH-FIRST `(B, L, ...)` layout of the per-layer
    fields as in [`AlignDetrModelOutput`], C = num_labels.

    Args:
        loss (`()`, with `labels`): sum of `loss_dict`.
        loss_dict (`dict[str, Tensor]`, with `labels`): the Align-DETR loss terms, named as mmdetection names them.
        logits (`(B, Q, C)`), pred_boxes (`(B, Q, 4)`): last decoder layer, matching queries only. Boxes are
            sigmoid cxcywh relative to the unpadded image; use the image processor's
            `post_process_object_detection`.
        intermediate_logits (`(B, L, Q, C)`), intermediate_pred_boxes (`(B, L, Q, 4)`): every decoder layer,
            matching queries only.
        enc_topk_logits, enc_topk_boxes, enc_topk_indices: the selected encoder proposals.
        dn_logits (`(B, L, D, C)`), dn_pred_boxes (`(B, L, D, 4)`): denoising queries (training with labels).
        num_denoising_queries, num_denoising_groups, denoising_max_gt (`int`): see [`AlignDetrModelOutput`].
        last_hidden_state (`(B, Q, d_model)`), encoder_last_hidden_state (`(B, S, d_model)`).
        encoder_hidden_states, encoder_attentions, decoder_hidden_states, decoder_attentions, cross_attentions:
            with `output_hidden_states` / `output_attentions`, see [`AlignDetrModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    intermediate_logits: torch.FloatTensor | None = None
    intermediate_pred_boxes: torch.FloatTensor | None = None
    enc_topk_logits: torch.FloatTensor | None = None
    enc_topk_boxes: torch.FloatTensor | None = None
    enc_topk_indices: torch.LongTensor | None = None
    dn_logits: torch.FloatTensor | None = None
    dn_pred_boxes: torch.FloatTensor | None = None
    num_denoising_queries: int | None = None
    num_denoising_groups: int | None = None
    denoising_max_gt: int | None = None
    last_hidden_state: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


# What `Trainer` keeps of the outputs when it gathers predictions: loss, the loss terms and the last layer.
# Everything else is dropped (`config.keys_to_ignore_at_inference`, derived here so the two cannot drift apart).
PREDICTION_OUTPUT_KEYS = ("loss", "loss_dict", "logits", "pred_boxes")
AlignDetrConfig.keys_to_ignore_at_inference = [
    field.name for field in fields(AlignDetrObjectDetectionOutput) if field.name not in PREDICTION_OUTPUT_KEYS
]


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class AlignDetrMLP(nn.Module):
    """Linear layers with ReLU between them (box heads, reference-point head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_position_embedding(
    padding_mask: torch.Tensor, num_feats: int, temperature: float, offset: float, eps: float = 1e-6
) -> torch.Tensor:
    """Normalised 2-D sine encoding of a feature map: (B, H, W) bool (True = padding) -> (B, H*W, 2*num_feats).

    Coordinates are 1-based cumulative counts of valid cells, shifted by `offset` and normalised by the valid
    extent; y channels come before x channels, sin/cos interleaved (mmdetection's `SinePositionalEncoding`).
    """
    not_mask = (~padding_mask).to(torch.float32)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    y_embed = (y_embed + offset) / (y_embed[:, -1:, :] + eps) * (2 * math.pi)
    x_embed = (x_embed + offset) / (x_embed[:, :, -1:] + eps) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=padding_mask.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).flatten(1, 2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine encoding of (..., 4) cxcywh boxes -> (..., 4*num_feats), in (y, x, w, h) order, sin/cos interleaved."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    embeds = []
    for coordinate in (1, 0, 2, 3):
        pos = boxes[..., coordinate, None] * (2 * math.pi) / dim_t
        embeds.append(torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2))
    return torch.cat(embeds, dim=-1)


class AlignDetrMultiscaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), as mmcv's `MultiScaleDeformableAttention`.

    Each query samples `n_points` locations per head and level around its reference point (2-d: a point, offsets
    in units of the level's cells; 4-d: a box, offsets relative to half its size) and returns their weighted sum.
    The residual is added by the caller.
    """

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int):
        super().__init__()
        self.n_heads, self.n_levels, self.n_points = n_heads, n_levels, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query: torch.Tensor,
        value: torch.Tensor,
        value_padding_mask: torch.Tensor | None,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        offset_normalizer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, Nq, d) with position added; value (B, Nv, d); value_padding_mask (B, Nv) True = padding;
        reference_points (B, Nq, n_levels, 2 or 4) normalised; offset_normalizer (n_levels, 2) = (W, H) of each
        level, needed with 2-d reference points. Returns the output (B, Nq, d) and the attention weights
        (B, Nq, n_heads, n_levels, n_points), which cost nothing to return."""
        batch, num_queries, _ = query.shape
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:  # offsets are in cells of each level
            locations = reference_points[:, :, None, :, None, :] + offsets / offset_normalizer[None, None, None, :, None, :]
        else:
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        output = multi_scale_deformable_attention(value, spatial_shapes, locations, weights)
        return self.output_proj(output), weights


class AlignDetrSelfAttention(nn.Module):
    """Multi-head self-attention of the decoder queries (torch.nn.MultiheadAttention's maths, split q/k/v)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query_key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """attn_mask: (N, N) bool, True = may not attend. Returns the output (B, N, d) and, with
        `output_attentions`, the weights (B, n_heads, N, N) from an explicit softmax (SDPA cannot return them)."""
        batch, length, d_model = value.shape

        def heads(x):
            return x.view(batch, length, self.n_heads, d_model // self.n_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(query_key)), heads(self.k_proj(query_key)), heads(self.v_proj(value))
        weights = None
        if output_attentions:
            scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
            if attn_mask is not None:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            weights = scores.softmax(-1)
            out = weights @ v
        else:
            allowed = None if attn_mask is None else ~attn_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, d_model)), weights


class AlignDetrEncoderLayer(GradientCheckpointingLayer):
    """Post-norm: x = LN(x + MSDA(x + pos)); x = LN(x + FFN(x))."""

    def __init__(self, config: AlignDetrConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = AlignDetrMultiscaleDeformableAttention(
            d, config.encoder_attention_heads, config.num_feature_levels, config.encoder_n_points
        )
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        # nn.Dropout(0.0) still clones its input and builds a mask in training on CPU
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, hidden_states, position_embeddings, padding_mask, reference_points, spatial_shapes, normalizer):
        """Returns the new hidden states and the deformable-attention weights."""
        attended, attention_weights = self.self_attn(
            hidden_states + position_embeddings, hidden_states, padding_mask, reference_points, spatial_shapes, normalizer
        )
        hidden_states = self.self_attn_layer_norm(hidden_states + self.dropout(attended))
        ffn = self.fc2(self.dropout(F.relu(self.fc1(hidden_states))))
        return self.final_layer_norm(hidden_states + self.dropout(ffn)), attention_weights


class AlignDetrDecoderLayer(GradientCheckpointingLayer):
    """Post-norm: self-attention (pos added to q and k), deformable cross-attention (pos added to the query), FFN."""

    def __init__(self, config: AlignDetrConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = AlignDetrSelfAttention(d, config.decoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = AlignDetrMultiscaleDeformableAttention(
            d, config.decoder_attention_heads, config.num_feature_levels, config.decoder_n_points
        )
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        # nn.Dropout(0.0) still clones its input and builds a mask in training on CPU
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(
        self,
        hidden_states,
        query_pos,
        self_attn_mask,
        memory,
        memory_padding_mask,
        reference_points,
        spatial_shapes,
        output_attentions: bool = False,
    ):
        """Returns the new hidden states, the self-attention weights (None unless `output_attentions`) and the
        deformable cross-attention weights."""
        attended, self_attention = self.self_attn(
            hidden_states + query_pos, hidden_states, self_attn_mask, output_attentions=output_attentions
        )
        hidden_states = self.self_attn_layer_norm(hidden_states + self.dropout(attended))
        attended, cross_attention = self.encoder_attn(
            hidden_states + query_pos, memory, memory_padding_mask, reference_points, spatial_shapes
        )
        hidden_states = self.encoder_attn_layer_norm(hidden_states + self.dropout(attended))
        ffn = self.fc2(self.dropout(F.relu(self.fc1(hidden_states))))
        return self.final_layer_norm(hidden_states + self.dropout(ffn)), self_attention, cross_attention


# ----------------------------------------------------------------------------------------------------------------
# Pre-trained model base
# ----------------------------------------------------------------------------------------------------------------


class AlignDetrPreTrainedModel(PreTrainedModel):
    config: AlignDetrConfig
    config_class = AlignDetrConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True  # encoder and decoder layers; their tensor inputs are positional
    _no_split_modules = ["AlignDetrConvEncoder", "AlignDetrEncoderLayer", "AlignDetrDecoderLayer"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(
                f"Could not read the weights in {pretrained_model_name_or_path}: a safetensors file is truncated or "
                f"corrupted ({error}). Re-download or re-convert it."
            ) from error
        # transformers re-creates every loaded parameter with requires_grad=True: freeze the backbone again
        for module in (loaded[0] if isinstance(loaded, tuple) else loaded).modules():
            if isinstance(module, AlignDetrConvEncoder):
                module.freeze()
        return loaded

    def _initialize_weights(self, module, *args, **kwargs):
        # transformers >= 5.13 passes `is_custom_code` and then skips modules without parameters of their own for
        # code outside its tree, which would skip the deformable-attention grid and the head inits below. Every init
        # here goes through `transformers.initialization`, which leaves loaded tensors alone, so the in-tree
        # behaviour (the default, and all that older versions know) is safe.
        super()._initialize_weights(module)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """mmdetection's initialisation (DINO.init_weights, DeformableDETRHead.init_weights, ChannelMapper)."""
        if isinstance(module, AlignDetrMultiscaleDeformableAttention):
            init.zeros_(module.sampling_offsets.weight)
            # head h samples along direction (cos, sin)(2*pi*h/H), scaled so the larger component is 1,
            # point p at distance p + 1
            thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
            grid = torch.stack([thetas.cos(), thetas.sin()], -1)
            grid = grid / grid.abs().max(-1, keepdim=True)[0]
            grid = grid.view(module.n_heads, 1, 1, 2).repeat(1, module.n_levels, module.n_points, 1)
            grid = grid * torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
            init.copy_(module.sampling_offsets.bias, grid.flatten())
            init.zeros_(module.attention_weights.weight)
            init.zeros_(module.attention_weights.bias)
            for linear in (module.value_proj, module.output_proj):
                init.xavier_uniform_(linear.weight)
                init.zeros_(linear.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight)
        elif isinstance(module, AlignDetrConvEncoder):
            # the backbone's own init does not know frozen BatchNorms
            for norm in module.modules():
                if isinstance(norm, AlignDetrFrozenBatchNorm2d):
                    init.ones_(norm.weight)
                    init.zeros_(norm.bias)
                    init.zeros_(norm.running_mean)
                    init.ones_(norm.running_var)
        elif isinstance(module, AlignDetrModel):
            init.normal_(module.level_embed)
            init.xavier_uniform_(module.query_embedding.weight)
            self._init_class_head(module.enc_score_head)
            self._init_box_head(module.enc_bbox_head)
        elif isinstance(module, AlignDetrDecoder):
            for head in module.bbox_embed:
                self._init_box_head(head)
        elif isinstance(module, AlignDetrForObjectDetection):
            for head in module.class_embed:
                self._init_class_head(head)

    def _init_class_head(self, head: nn.Linear) -> None:
        _torch_default_init(head)
        prior = self.config.init_prior_prob
        init.constant_(head.bias, -math.log((1 - prior) / prior))

    @staticmethod
    def _init_box_head(head: AlignDetrMLP) -> None:
        # mmdetection's heads keep torch's default Linear init; the last box layer starts at zero
        for layer in head.layers[:-1]:
            _torch_default_init(layer)
        init.zeros_(head.layers[-1].weight)
        init.zeros_(head.layers[-1].bias)


def _torch_default_init(linear: nn.Linear) -> None:
    """`nn.Linear.reset_parameters`, through transformers' init functions (which leave loaded tensors alone)."""
    init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(linear.weight.shape[1])
    init.uniform_(linear.bias, -bound, bound)


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder
# ----------------------------------------------------------------------------------------------------------------


class AlignDetrEncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, S, d)
    hidden_states: tuple[torch.Tensor, ...] | None  # input + every layer, with output_hidden_states
    attentions: tuple[torch.Tensor, ...] | None  # every layer's deformable-attention weights, with output_attentions


class AlignDetrEncoder(nn.Module):
    def __init__(self, config: AlignDetrConfig):
        super().__init__()
        self.layers = nn.ModuleList(AlignDetrEncoderLayer(config) for _ in range(config.encoder_layers))

    @staticmethod
    def reference_points(spatial_shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Cell centres of every level, normalised by the valid extent -> (B, S, num_levels, 2)."""
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5,  # not linspace: export-safe
                torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        features,
        position_embeddings,
        padding_mask,
        spatial_shapes,
        valid_ratios,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> AlignDetrEncoderOutput:
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        # (W, H) per level, filled on the device (a host tensor would cost a host-to-device sync per forward)
        normalizer = features.new_empty(len(spatial_shapes), 2, dtype=torch.float32)
        for level, (height, width) in enumerate(spatial_shapes):
            normalizer[level, 0], normalizer[level, 1] = width, height
        all_hidden_states = [features] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for layer in self.layers:
            # tensors positional: gradient checkpointing (reentrant) only sees positional inputs
            features, attention_weights = layer(
                features, position_embeddings, padding_mask, reference_points, spatial_shapes, normalizer
            )
            if output_hidden_states:
                all_hidden_states.append(features)
            if output_attentions:
                all_attentions.append(attention_weights)
        return AlignDetrEncoderOutput(
            last_hidden_state=features,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


class AlignDetrDecoderOutput(NamedTuple):
    hidden_states: torch.Tensor  # (B, L, N, d) every layer after the final LayerNorm
    references: torch.Tensor  # (B, L + 1, N, 4)
    pred_boxes: torch.Tensor  # (B, L, N, 4)
    all_hidden_states: tuple[torch.Tensor, ...] | None  # input + every layer (not normed), with output_hidden_states
    self_attentions: tuple[torch.Tensor, ...] | None  # with output_attentions
    cross_attentions: tuple[torch.Tensor, ...] | None  # with output_attentions


class AlignDetrDecoder(nn.Module):
    """DINO decoder: query position from the sine-encoded reference box, refinement after every layer.

    Look forward twice: the reference passed to the next layer is detached, but the one returned for layer l's
    box prediction is not, so layer l's loss also trains layer l-1's box head.
    """

    def __init__(self, config: AlignDetrConfig):
        super().__init__()
        d = config.d_model
        self.layers = nn.ModuleList(AlignDetrDecoderLayer(config) for _ in range(config.decoder_layers))
        self.reference_points_head = AlignDetrMLP(2 * d, d, d, 2)
        self.layer_norm = nn.LayerNorm(d)
        self.bbox_embed = nn.ModuleList(AlignDetrMLP(d, d, 4, 3) for _ in range(config.decoder_layers))
        self.head_eps = config.head_inverse_sigmoid_eps

    def forward(
        self,
        queries,
        reference_points,
        memory,
        memory_padding_mask,
        spatial_shapes,
        valid_ratios,
        attn_mask,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> AlignDetrDecoderOutput:
        """queries (B, N, d); reference_points (B, N, 4) sigmoid cxcywh, detached; attn_mask (N, N) bool or None."""
        num_feats = queries.shape[-1] // 2
        box_ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, levels, 4)
        hidden_states, references, pred_boxes = [], [reference_points], []
        all_hidden_states = [queries] if output_hidden_states else None
        self_attentions, cross_attentions = ([], []) if output_attentions else (None, None)
        for layer, bbox_head in zip(self.layers, self.bbox_embed):
            reference_input = reference_points[:, :, None] * box_ratios
            query_pos = self.reference_points_head(
                box_sine_embedding(reference_input[:, :, 0], num_feats).to(queries.dtype)
            )
            # tensors positional: gradient checkpointing (reentrant) only sees positional inputs
            queries, self_attention, cross_attention = layer(
                queries,
                query_pos,
                attn_mask,
                memory,
                memory_padding_mask,
                reference_input,
                spatial_shapes,
                output_attentions=output_attentions,
            )
            new_reference = (bbox_head(queries) + inverse_sigmoid(reference_points, eps=1e-3)).sigmoid()
            normed = self.layer_norm(queries)
            # the prediction uses the normed output and the previous (undetached) reference; eps: mmdetection 1e-5,
            # detrex 1e-3 (config.head_inverse_sigmoid_eps)
            pred_boxes.append((bbox_head(normed) + inverse_sigmoid(references[-1], eps=self.head_eps)).sigmoid())
            hidden_states.append(normed)
            references.append(new_reference)
            reference_points = new_reference.detach()
            if output_hidden_states:
                all_hidden_states.append(queries)
            if output_attentions:
                self_attentions.append(self_attention)
                cross_attentions.append(cross_attention)
        return AlignDetrDecoderOutput(
            hidden_states=torch.stack(hidden_states, 1),
            references=torch.stack(references, 1),
            pred_boxes=torch.stack(pred_boxes, 1),
            all_hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            self_attentions=tuple(self_attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
        )


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class AlignDetrFeatureLevels(NamedTuple):
    """The neck's output, flattened over all levels (S positions)."""

    features: torch.Tensor  # (B, S, d)
    position_embeddings: torch.Tensor  # (B, S, d), level embedding included
    padding_mask: torch.Tensor  # (B, S) bool, True = padding
    spatial_shapes: list[tuple[int, int]]  # (H_l, W_l) per level
    valid_ratios: torch.Tensor  # (B, levels, 2): (w, h) fraction of each map that is real pixels, >= 1 cell


class AlignDetrQuerySelection(NamedTuple):
    """The top-Q encoder proposals of two-stage query selection."""

    logits: torch.Tensor  # (B, Q, C)
    coords_unact: torch.Tensor  # (B, Q, 4) inverse-sigmoid cxcywh, not detached (the encoder loss trains them)
    indices: torch.Tensor  # (B, Q) flat encoder positions


class AlignDetrModel(AlignDetrPreTrainedModel):
    """Backbone, neck, deformable encoder, two-stage query selection and DINO decoder (no class heads)."""

    def __init__(self, config: AlignDetrConfig):
        super().__init__(config)
        d = config.d_model
        self.backbone = AlignDetrConvEncoder(config)
        in_channels = self.backbone.channels
        # 1x1 conv + GN per backbone level; extra levels: 3x3 stride-2 conv on the last backbone map, then on
        # the previous extra level (mmdetection's ChannelMapper)
        bias = config.neck_bias
        projections = [nn.Sequential(nn.Conv2d(c, d, 1, bias=bias), nn.GroupNorm(32, d)) for c in in_channels]
        for extra in range(config.num_feature_levels - len(in_channels)):
            source = in_channels[-1] if extra == 0 else d
            projections.append(
                nn.Sequential(nn.Conv2d(source, d, 3, stride=2, padding=1, bias=bias), nn.GroupNorm(32, d))
            )
        self.input_proj = nn.ModuleList(projections)
        self.level_embed = nn.Parameter(torch.empty(config.num_feature_levels, d))
        self.encoder = AlignDetrEncoder(config)
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_score_head = nn.Linear(d, config.num_labels)
        self.enc_bbox_head = AlignDetrMLP(d, d, 4, 3)
        self.query_embedding = nn.Embedding(config.num_queries, d)
        self.denoising_class_embed = nn.Embedding(config.num_labels, d)
        self.decoder = AlignDetrDecoder(config)
        self.post_init()

    def _multi_level_features(self, pixel_values, pixel_mask) -> AlignDetrFeatureLevels:
        """Backbone + neck -> flattened features, position embeddings, padding masks and level geometry."""
        feature_maps = self.backbone(pixel_values)
        levels = [proj(fm) for proj, fm in zip(self.input_proj, feature_maps)]
        for proj in self.input_proj[len(feature_maps) :]:
            levels.append(proj(feature_maps[-1] if len(levels) == len(feature_maps) else levels[-1]))
        padding = ~pixel_mask.bool()
        features, positions, masks, spatial_shapes, valid_ratios = [], [], [], [], []
        num_feats = self.config.d_model // 2
        for level, feature in enumerate(levels):
            height, width = feature.shape[-2:]
            mask = F.interpolate(padding[None].float(), size=(height, width))[0].bool()
            position = sine_position_embedding(
                mask, num_feats, self.config.position_embedding_temperature, self.config.position_embedding_offset
            )
            features.append(feature.flatten(2).transpose(1, 2))
            positions.append(position.to(feature.dtype) + self.level_embed[level])
            masks.append(mask.flatten(1))
            spatial_shapes.append((height, width))
            valid = ~mask
            # at least one cell: an all-padding image (a legal, empty batch member) must not divide by zero
            valid_width, valid_height = valid[:, 0, :].sum(1).clamp(min=1), valid[:, :, 0].sum(1).clamp(min=1)
            valid_ratios.append(torch.stack([valid_width / width, valid_height / height], -1).float())
        return AlignDetrFeatureLevels(
            features=torch.cat(features, 1),
            position_embeddings=torch.cat(positions, 1),
            padding_mask=torch.cat(masks, 1),
            spatial_shapes=spatial_shapes,
            valid_ratios=torch.stack(valid_ratios, 1),
        )

    @staticmethod
    def _encoder_proposals(memory, padding_mask, spatial_shapes):
        """One proposal box per encoder position (cell centre, size 0.05 * 2^level), in logit space; positions
        that are padding or whose box is not inside (0.01, 0.99) get +inf and zero memory."""
        batch = memory.shape[0]
        proposals, start = [], 0
        for level, (height, width) in enumerate(spatial_shapes):
            valid = ~padding_mask[:, start : start + height * width].view(batch, height, width)
            # clamped like the valid ratios: an all-padding image has every proposal invalid, none divided by 0
            scale = torch.stack([valid[:, 0, :].sum(1), valid[:, :, 0].sum(1)], -1).clamp(min=1).view(batch, 1, 1, 2)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=memory.device),  # not linspace: export-safe
                torch.arange(width, dtype=torch.float32, device=memory.device),
                indexing="ij",
            )
            grid = (torch.stack([grid_x, grid_y], -1)[None].expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.full_like(grid, 0.05 * (2.0**level))
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        proposals = torch.cat(proposals, 1)
        invalid = padding_mask[..., None] | ~((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals)).masked_fill(invalid, float("inf"))
        return memory.masked_fill(invalid, 0.0), proposals

    def _select_queries(self, memory, levels: AlignDetrFeatureLevels) -> AlignDetrQuerySelection:
        """Two-stage query selection: the top-Q encoder positions by max class logit of the encoder head."""
        output_memory, proposals = self._encoder_proposals(memory, levels.padding_mask, levels.spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_logits = self.enc_score_head(output_memory)
        num_queries = min(self.config.num_queries, enc_logits.shape[1])
        topk_indices = enc_logits.max(-1)[0].topk(num_queries, dim=1)[1]
        topk_logits = enc_logits.gather(1, topk_indices[..., None].expand(-1, -1, enc_logits.shape[-1]))
        # the box head is per position: run it on the selected positions only
        topk_memory = output_memory.gather(1, topk_indices[..., None].expand(-1, -1, output_memory.shape[-1]))
        topk_proposals = proposals.gather(1, topk_indices[..., None].expand(-1, -1, 4))
        return AlignDetrQuerySelection(
            logits=topk_logits,
            coords_unact=self.enc_bbox_head(topk_memory) + topk_proposals,
            indices=topk_indices,
        )

    def _denoising_queries(self, labels, denoising_queries, num_queries: int):
        """The given denoising queries, else new ones when training with labels, else None."""
        if denoising_queries is not None:
            return denoising_queries
        if not (self.training and labels is not None and self.config.num_denoising_queries > 0):
            return None
        return build_denoising_queries(
            targets=labels,
            label_embedding=self.denoising_class_embed,
            num_labels=self.config.num_labels,
            num_matching_queries=num_queries,
            num_denoising_queries=self.config.num_denoising_queries,
            label_noise_ratio=self.config.label_noise_ratio,
            box_noise_scale=self.config.box_noise_scale,
        )

    def _decoder_inputs(self, selection: AlignDetrQuerySelection, denoising_queries):
        """Content queries, inverse-sigmoid reference boxes (detached) and the self-attention mask of the decoder:
        learnt content queries on the selected proposals, denoising queries (if any) first."""
        batch, num_queries = selection.indices.shape
        queries = self.query_embedding.weight[:num_queries][None].expand(batch, -1, -1)
        reference_unact = selection.coords_unact.detach()
        if denoising_queries is None:
            return queries, reference_unact, None
        queries = torch.cat([denoising_queries.label_query.to(queries.dtype), queries], 1)
        reference_unact = torch.cat([denoising_queries.box_query_unact.to(reference_unact.dtype), reference_unact], 1)
        attn_mask = denoising_queries.attn_mask if denoising_queries.num_queries > 0 else None
        return queries, reference_unact, attn_mask

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.LongTensor | None = None,
        labels: list[dict] | None = None,
        denoising_queries: AlignDetrDenoisingQueries | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlignDetrModelOutput | tuple:
        r"""
        pixel_values (`(B, 3, H, W)`): normalised images, zero-padded bottom/right to a common size.
        pixel_mask (`(B, H, W)`, *optional*): 1 for real pixels, 0 for padding (transformers' convention; the
            original DETR's 1 = padding is refused). Real pixels must fill a top-left rectangle, as the image
            processor pads; an all-zero mask (an empty batch slot) gives finite, meaningless predictions.
            Defaults to all ones.
        labels (`list[dict]`, *optional*): per image `class_labels` (n,) and `boxes` (n, 4) normalised cxcywh.
            In training mode they are used to draw contrastive denoising queries.
        denoising_queries (`AlignDetrDenoisingQueries`, *optional*): use these instead of drawing new ones.
        output_attentions, output_hidden_states, return_dict (`bool`, *optional*): default to the config's.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        pixel_values, pixel_mask = _check_inputs(pixel_values, pixel_mask, self.dtype)

        levels = self._multi_level_features(pixel_values, pixel_mask)
        encoder_output = self.encoder(
            features=levels.features,
            position_embeddings=levels.position_embeddings,
            padding_mask=levels.padding_mask,
            spatial_shapes=levels.spatial_shapes,
            valid_ratios=levels.valid_ratios,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        memory = encoder_output.last_hidden_state
        selection = self._select_queries(memory, levels)
        num_queries = selection.indices.shape[1]
        denoising_queries = self._denoising_queries(labels, denoising_queries, num_queries)
        queries, reference_unact, attn_mask = self._decoder_inputs(selection, denoising_queries)
        decoder_output = self.decoder(
            queries=queries,
            reference_points=reference_unact.sigmoid(),
            memory=memory,
            memory_padding_mask=levels.padding_mask,
            spatial_shapes=levels.spatial_shapes,
            valid_ratios=levels.valid_ratios,
            attn_mask=attn_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

        output = AlignDetrModelOutput(
            last_hidden_state=decoder_output.hidden_states[:, -1, -num_queries:],
            intermediate_hidden_states=decoder_output.hidden_states,
            intermediate_reference_points=decoder_output.references,
            intermediate_pred_boxes=decoder_output.pred_boxes,
            encoder_last_hidden_state=memory,
            enc_topk_logits=selection.logits,
            enc_topk_boxes=selection.coords_unact.sigmoid(),
            enc_topk_indices=selection.indices,
            num_denoising_queries=None if denoising_queries is None else denoising_queries.num_queries,
            num_denoising_groups=None if denoising_queries is None else denoising_queries.num_groups,
            denoising_max_gt=None if denoising_queries is None else denoising_queries.max_gt,
            encoder_hidden_states=encoder_output.hidden_states,
            encoder_attentions=encoder_output.attentions,
            decoder_hidden_states=decoder_output.all_hidden_states,
            decoder_attentions=decoder_output.self_attentions,
            cross_attentions=decoder_output.cross_attentions,
        )
        return output if return_dict else output.to_tuple()


def _remote_pipelines() -> dict:
    """`config.custom_pipelines` of a saved folder. The relative import (not run at import time: it loads
    transformers' pipelines) is also what makes transformers copy the pipeline's code into every saved folder."""
    from .pipeline_align_detr import TASK, custom_pipeline_entry

    return {TASK: custom_pipeline_entry()}


def _check_inputs(pixel_values, pixel_mask, model_dtype):
    """Shape and mask checks; returns pixel values in the model's dtype and the pixel mask (all ones if not given).

    A mask must be 0/1 (or bool) with the real pixels (1) filling a top-left rectangle of each image, the layout
    the valid ratios, position embeddings and proposals assume. Checking that costs one small device read; it is
    skipped while tracing or compiling (export), where the caller vouches for the mask.
    """
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (batch, 3, height, width), got {tuple(pixel_values.shape)}.")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floating point (normalised images), got {pixel_values.dtype}.")
    batch, _, height, width = pixel_values.shape
    if pixel_mask is None:
        pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=pixel_values.device)
    elif tuple(pixel_mask.shape) != (batch, height, width):
        raise ValueError(
            f"pixel_mask must be (batch, height, width) = {(batch, height, width)} to match pixel_values, "
            f"got {tuple(pixel_mask.shape)}."
        )
    elif not _is_tracing():
        _check_pixel_mask(pixel_mask)
    # e.g. a half/bf16 model fed float32 images (what the image processor returns): convert, do not fail in a conv
    if pixel_values.dtype != model_dtype:
        pixel_values = pixel_values.to(model_dtype)
    return pixel_values, pixel_mask


def _is_tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    exporting = getattr(compiler, "is_exporting", lambda: False)()
    onnx_export = torch.onnx.is_in_onnx_export()
    return torch.jit.is_tracing() or torch.jit.is_scripting() or compiler.is_compiling() or exporting or onnx_export


def _check_pixel_mask(pixel_mask: torch.Tensor) -> None:
    """Raise a ValueError naming the image and the problem for a mask the model cannot honour (see `_check_inputs`)."""
    # a few elementwise passes over the mask (as large as the images), one device read
    batch, height, width = pixel_mask.shape
    flat = pixel_mask.view(batch, -1) if pixel_mask.is_contiguous() else pixel_mask.reshape(batch, -1)
    if pixel_mask.dtype == torch.bool:
        valid, non_binary = pixel_mask, torch.zeros(batch, dtype=torch.bool, device=pixel_mask.device)
    elif pixel_mask.is_floating_point():
        valid = pixel_mask == 1
        non_binary = ~((flat == 0) | (flat == 1)).all(1)  # NaN and fractions too
    else:
        valid = pixel_mask == 1
        low, high = torch.aminmax(flat, dim=1)
        non_binary = (low < 0) | (high > 1)
    rectangle = _top_left_rectangle(valid)
    not_rectangle = (valid != rectangle).view(batch, -1).any(1)
    # with the mask a rectangle, it is empty when its first row or column is
    empty = ~(valid[:, 0, 0])
    problems = torch.cat([torch.stack([non_binary, not_rectangle], 1).flatten(), empty.all()[None]]).tolist()
    for image in range(batch):  # the line above is the one device read
        if problems[2 * image]:
            other = pixel_mask[image][(pixel_mask[image] != 0) & (pixel_mask[image] != 1)][0].item()
            raise ValueError(
                f"pixel_mask must hold only 1 (real pixel) and 0 (padding); image {image} holds {other}."
            )
        if problems[2 * image + 1]:
            if bool(valid[image, 0, 0]):
                hint = "Its real pixels do not form one top-left rectangle."
            else:
                hint = "Its top-left pixel is padding (0): padding at the top or left (e.g. a letterbox) is not supported."
                if bool((~valid[image] == _top_left_rectangle(~valid[image : image + 1])[0]).all()):
                    hint += _INVERTED_MASK_HINT
            raise ValueError(
                f"pixel_mask of image {image} is not supported: real pixels (1) must fill a top-left rectangle, with "
                f"padding (0) only at the bottom and right, as the image processor pads. {hint}"
            )
    if problems[-1]:
        # one empty slot in a batch is legal (and harmless); a batch without any real pixel is a convention mix-up
        raise ValueError(f"pixel_mask is all zeros (all padding) for every image of the batch.{_INVERTED_MASK_HINT}")


_INVERTED_MASK_HINT = (
    " Is it inverted? Here 1 marks real pixels and 0 padding (transformers' convention), not 1 = padding as in the "
    "original DETR; then pass 1 - mask."
)


def _top_left_rectangle(valid: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the top-left rectangle spanned by each mask's first column and first row."""
    _, height, width = valid.shape
    rows = torch.arange(height, device=valid.device) < valid[:, :, 0].sum(1, keepdim=True)
    cols = torch.arange(width, device=valid.device) < valid[:, 0, :].sum(1, keepdim=True)
    return rows[:, :, None] & cols[:, None, :]


class AlignDetrForObjectDetection(AlignDetrPreTrainedModel):
    """[`AlignDetrModel`] with a class head per decoder layer; computes the Align-DETR loss when given `labels`."""

    def __init__(self, config: AlignDetrConfig):
        super().__init__(config)
        self.model = AlignDetrModel(config)
        self.class_embed = nn.ModuleList(
            nn.Linear(config.d_model, config.num_labels) for _ in range(config.decoder_layers)
        )
        self.post_init()

    @property
    def loss_function(self):
        """The training criterion: `loss, loss_dict = loss_function(inputs, labels)`, `inputs` an
        [`AlignDetrLossInputs`].

        Defaults to `_build_loss()` (transformers would otherwise dispatch "ForObjectDetection" to DETR's softmax
        cross-entropy loss). Settable like transformers' own: `model.loss_function = my_loss`.
        """
        custom = self.__dict__.get("_loss_function")
        return custom if custom is not None else self._build_loss()

    @loss_function.setter
    def loss_function(self, value):
        self.__dict__["_loss_function"] = value  # None restores the default

    def __setattr__(self, name, value):
        if name == "loss_function":  # nn.Module would register a loss *module* as a submodule and bypass the setter
            self.__dict__["_loss_function"] = value
        else:
            super().__setattr__(name, value)

    def save_pretrained(self, *args, **kwargs):
        if self._auto_class is not None:  # remote code (see hub.py): AutoModel then loads the base model from this
            # folder, as it does from transformers' own detection checkpoints
            base = f"{AlignDetrModel.__module__.rsplit('.', 1)[-1]}.{AlignDetrModel.__name__}"
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": base}
            # and `pipeline("object-detection", ..., trust_remote_code=True)` runs our pipeline from the folder
            self.config.custom_pipelines = {**(getattr(self.config, "custom_pipelines", None) or {}),
                                            **_remote_pipelines()}
        return super().save_pretrained(*args, **kwargs)

    def _build_loss(self) -> nn.Module:
        """The loss for `self.config` (`config.loss_type`), built on demand (it holds no tensors, so building it is
        free)."""
        return build_loss(self.config)

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.LongTensor | None = None,
        labels: list[dict] | None = None,
        denoising_queries: AlignDetrDenoisingQueries | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlignDetrObjectDetectionOutput | tuple:
        r"""
        pixel_values, pixel_mask, denoising_queries, output_attentions, output_hidden_states: see
            [`AlignDetrModel.forward`].
        labels (`list[dict]`, *optional*): per image `class_labels` (n,) integer class ids and `boxes` (n, 4)
            float, cxcywh normalised to the unpadded image. With labels, `loss` and `loss_dict` are returned; in
            training mode they include the denoising terms.
        return_dict (`bool`, *optional*): defaults to `config.return_dict`; False gives `to_tuple()` of the output.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if labels is not None:
            # checked before anything reads them (denoising uses the labels; a NaN image would poison the weights);
            # one device read
            validate_labels(labels, self.config.num_labels, pixel_values)
        outputs = self.model(
            pixel_values,
            pixel_mask=pixel_mask,
            labels=labels,
            denoising_queries=denoising_queries,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.intermediate_hidden_states
        all_logits = torch.stack([head(hidden_states[:, i]) for i, head in enumerate(self.class_embed)], 1)
        all_boxes = outputs.intermediate_pred_boxes
        # denoising queries come first; they exist only in training with labels (D may be 0 without any GT)
        num_dn = outputs.num_denoising_queries or 0
        dn_logits = dn_boxes = None
        if outputs.num_denoising_queries is not None:
            dn_logits, dn_boxes = all_logits[:, :, :num_dn], all_boxes[:, :, :num_dn]
        logits, boxes = all_logits[:, :, num_dn:], all_boxes[:, :, num_dn:]

        loss = loss_dict = None
        if labels is not None:
            denoising = None
            if outputs.num_denoising_queries is not None:
                denoising = DenoisingLayout(outputs.num_denoising_groups, outputs.denoising_max_gt)
            # the loss works layer by layer: it receives layer-first views (L, B, ...), as transformers' DETR
            # losses receive theirs
            loss_inputs = AlignDetrLossInputs(
                logits=logits.transpose(0, 1),
                boxes=boxes.transpose(0, 1),
                layer_names=decoder_layer_names(len(self.class_embed)),
                encoder_logits=outputs.enc_topk_logits,
                encoder_boxes=outputs.enc_topk_boxes,
                dn_logits=None if dn_logits is None else dn_logits.transpose(0, 1),
                dn_boxes=None if dn_boxes is None else dn_boxes.transpose(0, 1),
                denoising=denoising,
            )
            loss, loss_dict = self.loss_function(loss_inputs, labels)
        output = AlignDetrObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits[:, -1],
            pred_boxes=boxes[:, -1],
            intermediate_logits=logits,
            intermediate_pred_boxes=boxes,
            enc_topk_logits=outputs.enc_topk_logits,
            enc_topk_boxes=outputs.enc_topk_boxes,
            enc_topk_indices=outputs.enc_topk_indices,
            dn_logits=dn_logits,
            dn_pred_boxes=dn_boxes,
            num_denoising_queries=outputs.num_denoising_queries,
            num_denoising_groups=outputs.num_denoising_groups,
            denoising_max_gt=outputs.denoising_max_gt,
            last_hidden_state=outputs.last_hidden_state,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
        )
        return output if return_dict else output.to_tuple()
