"""Hypothesis strategies for random small models; later passes' property tests reuse them.

`models()` draws a `ModelCase`: a module built from random blocks (MLPs, residual blocks,
attention-like blocks) of random sizes, with no-op views and slices sprinkled in, plus a
function giving example inputs for any token count. Every module traces with symbolic_trace.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


@dataclass
class ModelCase:
    module: nn.Module
    hidden: int
    description: str

    def inputs(self, num_tokens: int, seed: int = 0) -> tuple[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (torch.randn(num_tokens, self.hidden, generator=generator),)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, activation: str, noop_view: bool) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden, bias=False)
        self.activation, self.noop_view = activation, noop_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (tokens, inner)
        if self.noop_view:
            h = h.view(x.shape[0], -1)[:, : h.shape[1]]  # no-op view and slice
        h = F.gelu(h) if self.activation == "gelu" else F.silu(h)
        return self.down(h)


class Residual(nn.Module):
    def __init__(self, hidden: int, inner: int, noop_view: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, inner, "silu", noop_view)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class AttentionLike(nn.Module):
    """Self-attention over the token dimension: fused QKV projection, split, SDPA, output."""

    def __init__(self, hidden: int, heads: int, noop_view: bool) -> None:
        super().__init__()
        self.heads, self.head_size = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.noop_view = noop_view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).split(self.heads * self.head_size, dim=-1)  # each (tokens, hidden)
        q = q.reshape(tokens, self.heads, self.head_size).transpose(0, 1)  # (heads, tokens, hd)
        k = k.reshape(tokens, self.heads, self.head_size).transpose(0, 1)
        v = v.reshape(tokens, self.heads, self.head_size).transpose(0, 1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (heads, tokens, hd)
        merged = attn.transpose(0, 1).reshape(tokens, -1)  # (tokens, hidden)
        if self.noop_view:
            merged = merged.reshape(tokens, self.heads * self.head_size)
        return x + self.out(merged)


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@st.composite
def blocks(draw: st.DrawFn, hidden: int) -> tuple[nn.Module, str]:
    kind = draw(st.sampled_from(["mlp", "residual", "attention"]))
    noop_view = draw(st.booleans())
    inner = draw(st.integers(1, 4)) * 8
    if kind == "mlp":
        return MLP(hidden, inner, draw(st.sampled_from(["gelu", "silu"])), noop_view), f"mlp{inner}"
    if kind == "residual":
        return Residual(hidden, inner, noop_view), f"residual{inner}"
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if hidden % h == 0]))
    return AttentionLike(hidden, heads, noop_view), f"attention{heads}h"


@st.composite
def models(draw: st.DrawFn, max_blocks: int = 3) -> ModelCase:
    """A random small model of 1..max_blocks blocks with hidden size 8..32."""
    hidden = draw(st.sampled_from([8, 16, 24, 32]))
    drawn = [draw(blocks(hidden)) for _ in range(draw(st.integers(1, max_blocks)))]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    module = Stack([block for block, _ in drawn]).eval()
    return ModelCase(module, hidden, f"hidden{hidden}:" + ",".join(name for _, name in drawn))


token_counts: Callable[[], st.SearchStrategy[int]] = lambda: st.integers(1, 40)  # noqa: E731
