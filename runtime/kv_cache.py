"""Preallocated per-layer KV caches, addressed by slot index.

A slot holds the key and value of one token of one sequence for one layer. The generation loop
(or a runner) decides which slot each token goes to and says so in the attention metadata; the
attention op only reads and writes the slots it is told about. Caches are allocated once, for the
largest batch and length the caller will run, so their addresses never change between steps.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch


class AttentionKind(str, enum.Enum):
    """What an attention layer attends over, which decides its cache and its mask."""

    DECODER = "decoder"  # causal self-attention over this sequence's cached tokens
    ENCODER = "encoder"  # bidirectional self-attention over this step's encoder tokens; no cache
    CROSS = "cross"      # decoder queries over the encoder's K/V, cached once at prefill


@dataclass(frozen=True)
class AttentionSpec:
    """The static shape of one attention layer on this rank (head counts are per TP shard)."""

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    kind: AttentionKind = AttentionKind.DECODER

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")


@dataclass(frozen=True)
class LayerKVCache:
    """One layer's spec and cache tensors, each `(num_slots, num_kv_heads, head_size)`.

    Encoder self-attention keeps no cache: `key` and `value` are None.
    """

    spec: AttentionSpec
    key: torch.Tensor | None
    value: torch.Tensor | None


def allocate_kv_caches(
    specs: Mapping[str, AttentionSpec],
    num_slots: int,
    num_encoder_slots: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> dict[str, LayerKVCache]:
    """Zero-filled caches for every layer in `specs` (layer name -> spec).

    Decoder self-attention layers get `num_slots` slots, cross-attention layers
    `num_encoder_slots`, encoder self-attention layers none.
    """
    caches: dict[str, LayerKVCache] = {}
    for layer_name, spec in specs.items():
        if spec.kind is AttentionKind.ENCODER:
            caches[layer_name] = LayerKVCache(spec, None, None)
            continue
        slots = num_encoder_slots if spec.kind is AttentionKind.CROSS else num_slots
        shape = (slots, spec.num_kv_heads, spec.head_size)
        caches[layer_name] = LayerKVCache(
            spec,
            torch.zeros(shape, dtype=dtype, device=device),  # (slots, kv_heads, head_size)
            torch.zeros(shape, dtype=dtype, device=device),
        )
    return caches
