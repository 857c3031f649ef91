"""Align-DETR for Hugging Face transformers."""

from .configuration_align_detr import AlignDetrConfig

__all__ = ["AlignDetrConfig"]
