"""Layers shared across model families (diffusers parameter names)."""

from diffblocks.components.models.layers.attention import Attention, CrossAttentionExtras, ExtraKeysValues, SpatialSelfAttention, multihead
from diffblocks.components.models.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D

__all__ = ["Attention", "CrossAttentionExtras", "Downsample2D", "ExtraKeysValues", "ResnetBlock2D", "SpatialSelfAttention", "Upsample2D", "multihead"]
