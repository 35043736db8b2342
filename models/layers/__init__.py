"""Parallel layers the project's models are built from."""
from __future__ import annotations

from models.layers.activation import SiluAndMul, get_act_fn
from models.layers.attention import Attention, collect_attention_specs
from models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from models.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from models.layers.norm import LayerNorm, RMSNorm
from models.layers.rotary import RotaryEmbedding

__all__ = [
    "Attention", "ColumnParallelLinear", "LayerNorm", "MergedColumnParallelLinear",
    "ParallelLMHead", "QKVParallelLinear", "RMSNorm", "RotaryEmbedding", "RowParallelLinear",
    "SiluAndMul", "VocabParallelEmbedding", "collect_attention_specs", "get_act_fn",
]
