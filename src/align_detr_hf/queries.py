"""More (or fewer) matching queries than a checkpoint was trained with, e.g. 900 -> 1500 for dense images.

The number of detections a DETR returns is at most its number of queries (x classes, before `top_k`). In Align-DETR
(DINO two-stage) the queries' *positions* come from the encoder's top-`num_queries` proposals, so only one weight
depends on the count: `query_embedding` (`num_queries`, d_model), the content query of each proposal rank. Two ways
to change it:

    # keeps the trained rows and fills the new ones with copies of them (cycled): the model predicts at once as
    # before for the first 900 ranks, and fine-tuning starts from trained content queries
    model = load_with_num_queries("my-900-query-model", num_queries=1500)

    # transformers' own route: the mismatched `query_embedding` is re-initialised at random (all rows)
    model = AlignDetrForObjectDetection.from_pretrained(folder, num_queries=1500, ignore_mismatched_sizes=True)

[`resize_queries`] does the first on a model already loaded. Fine-tune afterwards as usual (more queries also need
`top_k` in post-processing and `max_dets` in evaluation above the number of objects per image).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_with_num_queries", "resize_queries"]


def resize_queries(model, num_queries: int):
    """Set `model`'s matching queries to `num_queries` in place (config and `query_embedding`); returns `model`.
    Growing keeps the trained rows and fills the new rows with copies of them, in order and cycled; shrinking keeps
    the first rows (the highest-ranked proposals')."""
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
        raise ValueError(f"num_queries must be a positive integer, got {num_queries!r}.")
    base = getattr(model, "model", model)
    if not hasattr(base, "query_embedding") or getattr(model.config, "model_type", None) != "align_detr":
        raise ValueError("resize_queries expects an Align-DETR model (AlignDetrModel / AlignDetrForObjectDetection).")
    old = base.query_embedding.weight
    index = torch.arange(num_queries, device=old.device) % old.shape[0]
    embedding = nn.Embedding(num_queries, old.shape[1], device=old.device, dtype=old.dtype)
    with torch.no_grad():
        embedding.weight.copy_(old[index])
    embedding.weight.requires_grad_(old.requires_grad)
    base.query_embedding = embedding
    model.config.num_queries = num_queries
    if base is not model:
        base.config.num_queries = num_queries
    return model


def load_with_num_queries(pretrained, num_queries: int, **kwargs):
    """`AlignDetrForObjectDetection.from_pretrained(pretrained, **kwargs)`, then [`resize_queries`]."""
    from .modeling_align_detr import AlignDetrForObjectDetection

    return resize_queries(AlignDetrForObjectDetection.from_pretrained(pretrained, **kwargs), num_queries)
