"""Small graphs shaped like Hugging Face attention, over flattened tokens, for the serving passes.

`HFStyleDecoder` spells out what HF's Llama-family attention does (per-sequence q/k/v views,
`repeat_kv`, a mask built from aranges as `masking_utils` does, SDPA or the eager softmax form),
at one sequence with batch 1, traced by symbolic_trace: the passes' unit tests see the same
node shapes as in a captured HF model in a fraction of the capture time. `serving_graph` tags
the placeholders with their stream roles, as `compiler.hf_capture` does.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compiler.capture import symbolic_propagator, symbolic_trace
from passes.token_streams import MAX_POSITIONS_KEY, ROLE_KEY, ROLES
from runtime.forward_context import set_forward_context
from runtime.generation import uniform_batch_metadata
from runtime.kv_cache import AttentionSpec, allocate_kv_caches

MASKS = ("causal", "causal_additive", "is_causal", "sliding", "bias", "ids_padding", "full")


class HFStyleDecoder(nn.Module):
    """Embeddings, `layers` attention layers as HF writes them, an LM head: (tokens,) ->
    (tokens, vocab). One mask serves all layers, as in HF's models.

    form: "sdpa" | "eager" | "softcap" (eager with a tanh softcap on the scores). gqa:
    "repeat_kv" (unsqueeze-expand-reshape), "interleave" (repeat_interleave on dim 1) or
    "enable_gqa" (SDPA's flag). mask: one of MASKS.
    """

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_size: int = 8, vocab: int = 61,
                 form: str = "sdpa", gqa: str = "repeat_kv", mask: str = "causal",
                 window: int = 4, max_positions: int = 64, layers: int = 1) -> None:
        super().__init__()
        hidden = heads * head_size
        self.form, self.gqa, self.mask_kind, self.window = form, gqa, mask, window
        self.embed = nn.Embedding(vocab, hidden)
        self.positions = nn.Embedding(max_positions, hidden)
        self.layers = nn.ModuleList(_Attention(heads, kv_heads, head_size) for _ in range(layers))
        self.bias = nn.Parameter(torch.randn(max_positions, max_positions) * 0.1)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = input_ids.shape[0]
        hidden = self.embed(input_ids[None]) + self.positions(positions[None])  # (1, T, hidden)
        mask = self._mask(input_ids, tokens)
        for layer in self.layers:
            hidden = hidden + layer(hidden, mask, self.form, self.gqa, self.mask_kind, tokens)
        return self.lm_head(hidden)[0]  # (tokens, vocab)

    def _mask(self, input_ids: torch.Tensor, tokens: Any) -> torch.Tensor | None:
        q_idx = torch.arange(tokens)[:, None]
        kv_idx = torch.arange(tokens)[None, :]
        if self.mask_kind == "is_causal":
            return None
        if self.mask_kind == "full":
            return (q_idx >= 0).expand(tokens, tokens)[None, None]
        allowed = q_idx.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx)  # as masking_utils
        if self.mask_kind == "sliding":
            allowed = allowed & (kv_idx > q_idx - self.window)
        elif self.mask_kind == "ids_padding":
            allowed = allowed & (input_ids != 0)[None, :]
        mask = allowed[None, None]                                      # (1, 1, T, T)
        if self.mask_kind == "causal_additive":
            return _additive(mask)
        if self.mask_kind == "bias":
            return _additive(mask) + self.bias[:tokens, :tokens]
        return mask


class _Attention(nn.Module):
    def __init__(self, heads: int, kv_heads: int, head_size: int) -> None:
        super().__init__()
        hidden = heads * head_size
        self.heads, self.kv_heads, self.head_size = heads, kv_heads, head_size
        self.q_proj = nn.Linear(hidden, heads * head_size, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_size, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_size, bias=False)
        self.o_proj = nn.Linear(heads * head_size, hidden, bias=False)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, form: str, gqa: str,
                mask_kind: str, tokens: Any) -> torch.Tensor:
        q = self.q_proj(hidden).view(1, tokens, -1, self.head_size).transpose(1, 2)
        k = self.k_proj(hidden).view(1, tokens, -1, self.head_size).transpose(1, 2)
        v = self.v_proj(hidden).view(1, tokens, -1, self.head_size).transpose(1, 2)
        groups = self.heads // self.kv_heads
        if gqa == "repeat_kv":
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        elif gqa == "interleave":
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = 1.0 / math.sqrt(self.head_size)
        if form == "sdpa":
            extra = {"enable_gqa": True} if gqa == "enable_gqa" else {}
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                                 scale=scale, is_causal=mask is None, **extra)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * scale   # (1, heads, T, T)
            if form == "softcap":
                scores = torch.tanh(scores / 30.0) * 30.0
            if mask is not None:
                scores = scores + (mask if mask_kind in ("causal_additive", "bias")
                                   else _additive(mask))
            weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(weights, v)
        out = out.transpose(1, 2).contiguous().reshape(1, tokens, -1)
        return self.o_proj(out)                                  # (1, T, hidden)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, kv_heads, tokens, head_size = x.shape
    if groups == 1:
        return x
    x = x[:, :, None, :, :].expand(batch, kv_heads, groups, tokens, head_size)
    return x.reshape(batch, kv_heads * groups, tokens, head_size)


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as HF's additive one: 0 where allowed, the dtype's minimum elsewhere."""
    zeros = torch.zeros(mask.shape, dtype=torch.float32)
    return zeros.masked_fill(~mask, torch.finfo(torch.float32).min)


def example_inputs(tokens: int, vocab: int = 61, seed: int = 0) -> tuple[torch.Tensor, ...]:
    ids = torch.randint(1, vocab, (tokens,), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(tokens)


def serving_graph(module: nn.Module, inputs: tuple[torch.Tensor, ...],
                  max_positions: int | None = 64) -> fx.GraphModule:
    """symbolic_trace, placeholders tagged with their roles, shapes with symbolic tokens."""
    gm = symbolic_trace(module)
    roles = [role for stream in ROLES.values() for role in stream]
    for node, role in zip(gm.graph.find_nodes(op="placeholder"), roles):
        node.meta[ROLE_KEY] = role
    gm.meta[MAX_POSITIONS_KEY] = max_positions
    symbolic_propagator(inputs)(gm)
    return gm


@contextmanager
def one_sequence(specs: dict[str, AttentionSpec], tokens: int) -> Iterator[None]:
    """A forward context of one sequence whose prompt is `tokens` tokens, fresh caches."""
    caches = allocate_kv_caches(specs, tokens, 0, torch.float32, "cpu")
    with set_forward_context(uniform_batch_metadata(1, tokens, tokens, tokens,
                                                    torch.device("cpu")), caches):
        yield
