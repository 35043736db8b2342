"""BART: encoder-decoder, post-LayerNorm, learned positions (offset 2), tied embeddings.

Every LayerNorm follows a residual add (post-LN), so each is one `fused_add_layer_norm`
dispatch op (the sum it also returns is unread).

Forward over flattened tokens:
    forward(input_ids, positions, encoder_input_ids, encoder_positions) -> logits (tokens, vocab)
The encoder runs on whatever encoder tokens the step carries: all of them on the first step, none
on decode steps (0-row inputs), when cross-attention reads the K/V it cached on the first step.

Cross-attention keeps ONE fused `QKVParallelLinear`, called on the decoder stream (only Q is
read) and on the encoder stream (only K and V are read), the way vLLM's BART did before it split
the projection. The waste is deliberate: this is the structure the `qkv_split` pass removes.
Module and parameter names follow Hugging Face's `BartForConditionalGeneration`, with q/k/v
stacked into `qkv_proj`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.base import ProjectModel
from models.layers import (
    Attention,
    ColumnParallelLinear,
    LayerNorm,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    get_act_fn,
)
from models.layers.params import make_param, set_weight_loader
from models.parallel import TensorParallel, current_tp, tensor_parallel
from runtime.kv_cache import AttentionKind

POSITION_OFFSET = 2  # BART's learned positions start at row 2 of the table


class BartLearnedPositionalEmbedding(nn.Module):
    """Position p reads row p + 2 of a (max_positions + 2, dim) table (replicated under TP)."""

    def __init__(self, num_positions: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = make_param(num_positions + POSITION_OFFSET, embedding_dim)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + POSITION_OFFSET, self.weight)  # (tokens, dim)


class BartSelfAttention(nn.Module):
    """Encoder (bidirectional) or decoder (causal, cached) self-attention."""

    def __init__(self, embed_dim: int, num_heads: int, kind: AttentionKind, prefix: str) -> None:
        super().__init__()
        head_dim = embed_dim // num_heads
        self.qkv_proj = QKVParallelLinear(embed_dim, head_dim, num_heads, num_heads, bias=True)
        self.out_proj = RowParallelLinear(embed_dim, embed_dim, bias=True)
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5,
                              self.qkv_proj.num_kv_heads, kind, layer_name=f"{prefix}.attn")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # (tokens, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.out_proj(self.attn(q, k, v))  # (tokens, embed_dim)


class BartCrossAttention(BartSelfAttention):
    """Decoder queries over the encoder output, through one fused QKV projection (see module doc)."""

    def __init__(self, embed_dim: int, num_heads: int, prefix: str) -> None:
        super().__init__(embed_dim, num_heads, AttentionKind.CROSS, prefix)

    def forward(self, decoder_hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        sizes = [self.q_size, self.kv_size, self.kv_size]
        qkv_dec = self.qkv_proj(decoder_hidden_states)  # (tokens, q + 2 kv): only q is read
        q, _, _ = qkv_dec.split(sizes, dim=-1)
        qkv_enc = self.qkv_proj(encoder_hidden_states)  # (encoder tokens, q + 2 kv): k, v read
        _, k, v = qkv_enc.split(sizes, dim=-1)
        return self.out_proj(self.attn(q, k, v))         # (tokens, embed_dim)


class BartEncoderLayer(nn.Module):
    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        dim = config.d_model
        self.self_attn = BartSelfAttention(dim, config.encoder_attention_heads,
                                           AttentionKind.ENCODER, prefix=f"{prefix}.self_attn")
        self.self_attn_layer_norm = LayerNorm(dim)
        self.fc1 = ColumnParallelLinear(dim, config.encoder_ffn_dim, bias=True)
        self.activation_fn = get_act_fn(config.activation_function)
        self.fc2 = RowParallelLinear(config.encoder_ffn_dim, dim, bias=True)
        self.final_layer_norm = LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.self_attn_layer_norm(self.self_attn(hidden_states), hidden_states)
        feed_forward = self.fc2(self.activation_fn(self.fc1(hidden_states)))  # (tokens, d_model)
        hidden_states, _ = self.final_layer_norm(feed_forward, hidden_states)  # add + norm
        return hidden_states


class BartDecoderLayer(nn.Module):
    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        dim, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = BartSelfAttention(dim, heads, AttentionKind.DECODER,
                                           prefix=f"{prefix}.self_attn")
        self.self_attn_layer_norm = LayerNorm(dim)
        self.encoder_attn = BartCrossAttention(dim, heads, prefix=f"{prefix}.encoder_attn")
        self.encoder_attn_layer_norm = LayerNorm(dim)
        self.fc1 = ColumnParallelLinear(dim, config.decoder_ffn_dim, bias=True)
        self.activation_fn = get_act_fn(config.activation_function)
        self.fc2 = RowParallelLinear(config.decoder_ffn_dim, dim, bias=True)
        self.final_layer_norm = LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states, _ = self.self_attn_layer_norm(self.self_attn(hidden_states), hidden_states)
        cross = self.encoder_attn(hidden_states, encoder_hidden_states)
        hidden_states, _ = self.encoder_attn_layer_norm(cross, hidden_states)
        feed_forward = self.fc2(self.activation_fn(self.fc1(hidden_states)))  # (tokens, d_model)
        hidden_states, _ = self.final_layer_norm(feed_forward, hidden_states)  # add + norm
        return hidden_states


class BartStack(nn.Module):
    """Embeddings plus layers: the encoder or the decoder (they differ only in their layers)."""

    def __init__(self, config: Any, embed_tokens: VocabParallelEmbedding, layers: nn.ModuleList
                 ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens  # the shared embedding, unless the config unties it
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_position_embeddings,
                                                              config.d_model)
        self.layernorm_embedding = LayerNorm(config.d_model)
        self.layers = layers

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = self.embed_tokens(input_ids)  # (tokens, d_model)
        if self.embed_scale != 1.0:
            tokens = tokens * self.embed_scale
        normed, _ = self.layernorm_embedding(tokens, self.embed_positions(positions))  # add + norm
        return normed


class BartModel(nn.Module):
    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        self.shared = VocabParallelEmbedding(config.vocab_size, config.d_model)
        tied = getattr(config, "tie_word_embeddings", True)  # untied: each stack has its own

        def embedding() -> VocabParallelEmbedding:
            return self.shared if tied else VocabParallelEmbedding(config.vocab_size, config.d_model)

        self.encoder = BartStack(config, embedding(), nn.ModuleList(
            BartEncoderLayer(config, prefix=f"{prefix}.encoder.layers.{index}")
            for index in range(config.encoder_layers)))
        self.decoder = BartStack(config, embedding(), nn.ModuleList(
            BartDecoderLayer(config, prefix=f"{prefix}.decoder.layers.{index}")
            for index in range(config.decoder_layers)))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                encoder_input_ids: torch.Tensor, encoder_positions: torch.Tensor) -> torch.Tensor:
        encoder_hidden = self.encoder.embed(encoder_input_ids, encoder_positions)  # (enc, d_model)
        for encoder_layer in self.encoder.layers:
            encoder_hidden = encoder_layer(encoder_hidden)
        hidden_states = self.decoder.embed(input_ids, positions)                  # (tokens, d_model)
        for decoder_layer in self.decoder.layers:
            hidden_states = decoder_layer(hidden_states, encoder_hidden)
        return hidden_states


class BartForConditionalGeneration(ProjectModel):
    """BART with its LM head and final logits bias; see the module docstring."""

    is_encoder_decoder = True
    stacked_params_mapping = (
        ("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
    )

    def __init__(self, config: Any, tp: TensorParallel | None = None) -> None:
        super().__init__(config)
        self.decoder_start_token_id = config.decoder_start_token_id
        with tensor_parallel(tp or current_tp()):
            self.model = BartModel(config, prefix="model")
            self.lm_head = ParallelLMHead(config.vocab_size, config.d_model, bias=True)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.tie_weights(self.model.shared)
        assert self.lm_head.bias is not None
        # Hugging Face keeps the LM head's bias as a (1, vocab) buffer named final_logits_bias.
        self.final_logits_bias = set_weight_loader(self.lm_head.bias, self._load_final_logits_bias)

    def _load_final_logits_bias(self, param: nn.Parameter, loaded_weight: torch.Tensor,
                                shard_id: object = None) -> None:
        if loaded_weight.dim() == 2 and loaded_weight.shape[0] == 1:
            loaded_weight = loaded_weight[0]  # (vocab,)
        self.lm_head.weight_loader(param, loaded_weight, shard_id)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                encoder_input_ids: torch.Tensor, encoder_positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.model(input_ids, positions, encoder_input_ids, encoder_positions)
        return self.lm_head(hidden_states)  # (tokens, vocab)

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        device = self.device
        ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
        positions = torch.arange(num_tokens, device=device) % self.config.max_position_embeddings
        return ids, positions, ids.clone(), positions.clone()
