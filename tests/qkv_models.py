"""Small modules with the attention structures qkv_split and qkv_fuse target, and strategies.

`FusedCrossAttention` is our BART's cross-attention as vLLM first wrote it: one QKV projection
(local shard sizes under TP, as a rank holds them) called on the decoder stream keeping Q and on
the encoder stream keeping K and V. `SeparateAttention` is Hugging Face's: q_proj, k_proj and
v_proj. `DecoderStack` chains decoder layers (self-attention, cross-attention, MLP).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Shape:
    """Attention sizes of one rank: `tp` ranks share the heads, as QKVParallelLinear splits them."""

    hidden: int
    heads: int
    kv_heads: int
    tp: int = 1

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads

    @property
    def local_heads(self) -> int:
        return self.heads // self.tp

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.kv_heads // self.tp)  # fewer KV heads than ranks: one, replicated

    @property
    def q_size(self) -> int:
        return self.local_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.local_kv_heads * self.head_size


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    """(tokens, q_size) x (kv tokens, kv_size) x 2 -> (tokens, q_size), no causal mask."""
    q = q.reshape(-1, shape.local_heads, shape.head_size).transpose(0, 1)  # (heads, tok, hd)
    k = k.reshape(-1, shape.local_kv_heads, shape.head_size).transpose(0, 1)
    v = v.reshape(-1, shape.local_kv_heads, shape.head_size).transpose(0, 1)
    repeat = shape.local_heads // shape.local_kv_heads
    k, v = k.repeat_interleave(repeat, dim=0), v.repeat_interleave(repeat, dim=0)
    out = F.scaled_dot_product_attention(q, k, v)  # (heads, tokens, hd)
    return out.transpose(0, 1).reshape(-1, shape.q_size)  # (tokens, q_size)


class FusedCrossAttention(nn.Module):
    """One QKV projection called twice: Q from the decoder stream, K and V from the encoder's."""

    def __init__(self, shape: Shape, out_proj: bool = True) -> None:
        super().__init__()
        self.shape = shape
        self.sizes = [shape.q_size, shape.kv_size, shape.kv_size]
        self.qkv_proj = nn.Linear(shape.hidden, sum(self.sizes))
        self.o_proj = nn.Linear(shape.q_size, shape.hidden) if out_proj else None

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        q, _, _ = self.qkv_proj(x).split(self.sizes, dim=-1)            # (tokens, q_size)
        _, k, v = self.qkv_proj(encoder_out).split(self.sizes, dim=-1)  # (enc tokens, kv_size)
        out = attend(q, k, v, self.shape)
        return self.o_proj(out) if self.o_proj is not None else out


class FusedSelfAttention(nn.Module):
    """Self-attention through the same QKV projection: every part is read."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = shape
        self.sizes = [shape.q_size, shape.kv_size, shape.kv_size]
        self.qkv_proj = nn.Linear(shape.hidden, sum(self.sizes))
        self.o_proj = nn.Linear(shape.q_size, shape.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        return self.o_proj(attend(q, k, v, self.shape))


class SeparateAttention(nn.Module):
    """Hugging Face's layout: q_proj, k_proj, v_proj (k_proj without bias, as in Whisper)."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = shape
        self.q_proj = nn.Linear(shape.hidden, shape.q_size)
        self.k_proj = nn.Linear(shape.hidden, shape.kv_size, bias=False)
        self.v_proj = nn.Linear(shape.hidden, shape.kv_size)
        self.o_proj = nn.Linear(shape.q_size, shape.hidden)

    def forward(self, x: torch.Tensor, kv_source: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x)
        k = self.k_proj(kv_source).view(-1, self.shape.kv_size)
        v = self.v_proj(kv_source).view(-1, self.shape.kv_size)
        return self.o_proj(attend(q, k, v, self.shape))


class DecoderLayer(nn.Module):
    def __init__(self, shape: Shape, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.self_attn: nn.Module = FusedSelfAttention(shape) if fused else SeparateAttention(shape)
        self.cross_attn: nn.Module = (FusedCrossAttention(shape) if fused else
                                      SeparateAttention(shape))
        self.norm1, self.norm2 = nn.LayerNorm(shape.hidden), nn.LayerNorm(shape.hidden)
        self.fc1 = nn.Linear(shape.hidden, 3 * shape.hidden + 1)  # no width a projection has
        self.fc2 = nn.Linear(3 * shape.hidden + 1, shape.hidden)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + (self.self_attn(h) if self.fused else self.self_attn(h, h))
        x = x + self.cross_attn(self.norm2(x), encoder_out)
        return x + self.fc2(F.gelu(self.fc1(x)))


class DecoderStack(nn.Module):
    """`layers` decoder layers over one encoder output: our BART (fused) or HF's (separate)."""

    def __init__(self, shape: Shape, layers: int, fused: bool = True) -> None:
        super().__init__()
        self.shape = shape
        self.layers = nn.ModuleList(DecoderLayer(shape, fused) for _ in range(layers))

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, encoder_out)
        return x


def stream_inputs(shape: Shape, tokens: int, encoder_tokens: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, shape.hidden, generator=generator),
            torch.randn(encoder_tokens, shape.hidden, generator=generator))


def projection_flops(run: object, *inputs: torch.Tensor) -> int:
    """FLOPs of 2-D matrix products (mm, addmm: what projections become), by torch's counter.

    Attention's batched products (bmm, or SDPA's own kernels) are not counted.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        run(*inputs)  # type: ignore[operator]  (a module or a GraphModule)
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm")))


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    """Head counts 1..8, KV heads dividing them (MHA, GQA, MQA), TP 1 or 2, head size 2..8."""
    tp = draw(st.sampled_from([1, 2]))
    heads = draw(st.sampled_from([h for h in (1, 2, 4, 8) if h % tp == 0]))
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4, 8) if heads % k == 0 and k <= heads]))
    head_size = draw(st.sampled_from([2, 4, 8]))
    return Shape(hidden=heads * head_size, heads=heads, kv_heads=kv_heads, tp=tp)
