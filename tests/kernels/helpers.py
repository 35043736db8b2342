"""Shared by the kernel tests: a Llama-shaped module on the dispatch ops, kernel choice and
counting, RoPE caches and tolerances (tracing: tests.fx_helpers.trace)."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import fx

import runtime.ops  # noqa: F401  (registers the fxkiln ops)
from passes.base import PassContext, PassResult
from passes.kernel_choice import KernelChoicePass

# Per dtype (rtol, atol) for Triton against native. bfloat16 is loose because Triton's CPU
# interpreter rounds float32 -> bfloat16 towards zero (the GPU rounds to nearest even).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3),
              torch.bfloat16: (3e-2, 3e-2)}
GPU_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3),
                  torch.bfloat16: (1.6e-2, 1.6e-2)}


def cos_sin_cache(max_positions: int, rotary_dim: int, base: float = 10000.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(max_positions, rotary_dim): cos of each frequency, then sin, as RoPE builds it."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq  # (pos, rot/2)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


class LlamaShapedLayer(torch.nn.Module):
    """A decoder layer with Llama's dispatch ops: two add+norms, rotary, SiLU-and-mul."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_size: int,
                 intermediate: int, max_positions: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_size = heads, kv_heads, head_size
        self.eps = 1e-5
        self.input_norm = torch.nn.Parameter(1.0 + 0.1 * torch.randn(hidden))
        self.post_attention_norm = torch.nn.Parameter(1.0 + 0.1 * torch.randn(hidden))
        width = (heads + 2 * kv_heads) * head_size
        self.qkv = torch.nn.Parameter(torch.randn(width, hidden) / math.sqrt(hidden))
        self.o = torch.nn.Parameter(torch.randn(hidden, heads * head_size) / math.sqrt(hidden))
        self.gate_up = torch.nn.Parameter(torch.randn(2 * intermediate, hidden) / math.sqrt(hidden))
        self.down = torch.nn.Parameter(torch.randn(hidden, intermediate) / math.sqrt(intermediate))
        self.register_buffer("cos_sin_cache", cos_sin_cache(max_positions, head_size))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = torch.ops.fxkiln.rms_norm(hidden, self.input_norm, self.eps)
        else:
            hidden, residual = torch.ops.fxkiln.fused_add_rms_norm(
                hidden, residual, self.input_norm, self.eps)
        q_width, kv_width = self.heads * self.head_size, self.kv_heads * self.head_size
        q, k, v = F.linear(hidden, self.qkv).split([q_width, kv_width, kv_width], dim=-1)
        q, k = torch.ops.fxkiln.rotary_embedding(positions, q, k, self.cos_sin_cache,
                                                 self.head_size, True)
        q = q.view(-1, self.heads, self.head_size).transpose(0, 1)  # (heads, tokens, head_size)
        k = k.view(-1, self.kv_heads, self.head_size).transpose(0, 1)  # (kv_heads, tokens, hs)
        v = v.reshape(-1, self.kv_heads, self.head_size).transpose(0, 1)
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (heads, tokens, hs)
        attn = attn.transpose(0, 1).reshape(-1, q_width)  # (tokens, heads * head_size)
        hidden, residual = torch.ops.fxkiln.fused_add_rms_norm(
            F.linear(attn, self.o), residual, self.post_attention_norm, self.eps)
        hidden = torch.ops.fxkiln.silu_and_mul(F.linear(hidden, self.gate_up))
        return F.linear(hidden, self.down), residual


class LlamaShaped(torch.nn.Module):
    """Embedding, layers, final add+norm, LM head: vLLM Llama's dispatch-op pattern."""

    def __init__(self, vocab: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4,
                 kv_heads: int = 2, head_size: int = 8, intermediate: int = 48,
                 max_positions: int = 64) -> None:
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden))
        self.layers = torch.nn.ModuleList(
            LlamaShapedLayer(hidden, heads, kv_heads, head_size, intermediate, max_positions)
            for _ in range(layers))
        self.norm = torch.nn.Parameter(1.0 + 0.1 * torch.randn(hidden))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = F.embedding(input_ids, self.embed)  # (tokens, hidden)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = torch.ops.fxkiln.fused_add_rms_norm(hidden, residual, self.norm, 1e-5)
        return F.linear(hidden, self.embed)  # (tokens, vocab)

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.embed.device
        return (torch.randint(0, self.embed.shape[0], (num_tokens,), device=device),
                torch.arange(num_tokens, device=device))


def choose_kernels(gm: fx.GraphModule, kernels: Mapping[str, str] | None = None,
                   device: str = "cpu") -> PassResult:
    context = PassContext(device=torch.device(device), kernels=dict(kernels or {}))
    return KernelChoicePass(context)(gm)


def count_targets(gm: fx.GraphModule, targets: object) -> int:
    wanted = set(targets) if isinstance(targets, (set, frozenset, list, tuple)) else {targets}
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in wanted)


def assert_as_accurate(actual: torch.Tensor, expected: torch.Tensor,
                       reference: torch.Tensor) -> None:
    """`actual` strays from the fp32 `reference` no further than twice what `expected` does.

    Low-precision runs with different kernels round differently, and through a few layers the
    two drift apart by more than one kernel's tolerance; against a higher-precision reference
    both must stay about equally close (a wrong kernel misses by orders of magnitude).
    """
    def error(value: torch.Tensor) -> float:
        return float((value.float() - reference.float()).norm() / reference.float().norm())

    assert error(actual) <= 2 * error(expected) + 2e-3, (error(actual), error(expected))
