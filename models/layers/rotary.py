"""Rotary position embedding through the `fxkiln.rotary_embedding` dispatch op."""
from __future__ import annotations

import torch
from torch import nn

import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)


class RotaryEmbedding(nn.Module):
    """Rotates query and key, flattened as (tokens, heads * head_size), by their positions.

    Holds the cos/sin table for every position up to `max_position` as a non-persistent buffer
    (max_position, rotary_dim): cos halves then sin halves, computed in fp32 the way Hugging
    Face computes its default RoPE. `is_neox` rotates the two halves of each head (Llama);
    otherwise interleaved pairs (GPT-J).
    """

    def __init__(self, head_size: int, rotary_dim: int, max_position: int, base: float,
                 is_neox: bool = True) -> None:
        super().__init__()
        if rotary_dim > head_size or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and at most head_size ({head_size}), "
                             f"found {rotary_dim}")
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        self.is_neox = is_neox
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv_freq = 1.0 / (base ** exponents)                             # (rotary_dim / 2,)
        angles = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1)       # (max_pos, rotary_dim)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        query, key = torch.ops.fxkiln.rotary_embedding.default(
            positions, query, key, self.cos_sin_cache, self.head_size, self.is_neox)
        return query, key  # (tokens, heads * head_size), (tokens, kv_heads * head_size)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_position={self.max_position}, base={self.base}, is_neox={self.is_neox}")
