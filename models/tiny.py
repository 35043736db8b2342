"""A tiny built-in decoder block (the demo ran it before it ran fxkiln's BART and Llama).

Flattened tokens in, logits out; RMSNorm and SiLU-and-mul through fxkiln's dispatch ops, causal
self-attention through SDPA. Traceable by torch.fx.symbolic_trace.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import runtime.ops  # noqa: F401  (defines torch.ops.fxkiln.*)


class TinyDecoder(nn.Module):
    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, num_heads: int = 4,
                 intermediate_size: int = 128, num_layers: int = 2, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.head_size, self.eps = num_heads, hidden_size // num_heads, eps
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(_Block(hidden_size, intermediate_size) for _ in range(num_layers))
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)  # (tokens, hidden)
        for layer in self.layers:
            hidden = layer(hidden, self.num_heads, self.head_size, self.eps)
        hidden = torch.ops.fxkiln.rms_norm(hidden, self.norm_weight, self.eps)
        return self.lm_head(hidden)  # (tokens, vocab)

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor]:
        return (torch.randint(0, self.embed.num_embeddings, (num_tokens,)),)


class _Block(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.attn_norm = nn.Parameter(torch.ones(hidden_size))
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(hidden_size))
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, num_heads: int, head_size: int, eps: float) -> torch.Tensor:
        tokens = x.shape[0]
        h = torch.ops.fxkiln.rms_norm(x, self.attn_norm, eps)
        q, k, v = self.qkv(h).view(tokens, 3, num_heads, head_size).unbind(1)  # (tokens, heads, hd)
        attn = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                              v.transpose(0, 1), is_causal=True)
        x = x + self.out(attn.transpose(0, 1).reshape(tokens, num_heads * head_size))
        h = torch.ops.fxkiln.rms_norm(x, self.mlp_norm, eps)
        return x + self.down(torch.ops.fxkiln.silu_and_mul(self.gate_up(h)))
