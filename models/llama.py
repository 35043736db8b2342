"""Llama: decoder-only, grouped-query attention, RoPE, RMSNorm, SiLU-and-mul MLP.

Forward over flattened tokens: `forward(input_ids, positions) -> logits`, both inputs
`(num_tokens,)` int64, logits `(num_tokens, vocab_size)`. Module and parameter names follow
Hugging Face's `LlamaForCausalLM`, except that q/k/v and gate/up projections are stacked
(`qkv_proj`, `gate_up_proj`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.base import ProjectModel, require_config
from models.errors import UnsupportedConfigError
from models.layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
)
from models.parallel import TensorParallel, current_tp, tensor_parallel
from runtime.kv_cache import AttentionKind


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, prefix: str) -> None:
        super().__init__()
        hidden_size = config.hidden_size
        total_heads = config.num_attention_heads
        head_dim = _head_dim(config)
        self.qkv_proj = QKVParallelLinear(hidden_size, head_dim, total_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(total_heads * head_dim, hidden_size,
                                        bias=config.attention_bias)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.rotary_emb = rotary_emb  # shared by all layers: one cos/sin table
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads, AttentionKind.DECODER,
                              layer_name=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # (tokens, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)    # (tokens, q_size)
        return self.o_proj(attn_output)     # (tokens, hidden)


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        require_config(config, "hidden_act", ("silu",))
        hidden, intermediate = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate],
                                                       bias=config.mlp_bias)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(intermediate, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)    # (tokens, 2 * intermediate / tp)
        return self.down_proj(self.act_fn(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, prefix: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary_emb, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: nothing to add yet
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual  # each (tokens, hidden)


class LlamaModel(nn.Module):
    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise UnsupportedConfigError("rope_parameters.rope_type", rope["rope_type"], ["default"])
        head_dim = _head_dim(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(head_dim, head_dim, config.max_position_embeddings,
                                          base=rope.get("rope_theta", 10000.0), is_neox=True)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary_emb, prefix=f"{prefix}.layers.{index}")
            for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)  # (tokens, hidden)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(ProjectModel):
    """Llama with its LM head; see the module docstring for the forward contract."""

    stacked_params_mapping = (
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, config: Any, tp: TensorParallel | None = None) -> None:
        super().__init__(config)
        with tensor_parallel(tp or current_tp()):
            self.model = LlamaModel(config, prefix="model")
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.model(input_ids, positions)  # (tokens, hidden)
        return self.lm_head(hidden_states)                 # (tokens, vocab)

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device
        positions = torch.arange(num_tokens, device=device) % self.config.max_position_embeddings
        return torch.zeros(num_tokens, dtype=torch.long, device=device), positions


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
