"""Small Hugging Face models of every architecture the serving path covers, seeded random weights.

Each builder makes a model from a small config (nothing downloaded), weights from
`model_oracle.randomize_` (well-separated logits, so greedy comparisons are stable), in eval
mode. `prompt_for` gives what generation starts from: decoder prompt and encoder source.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as T

from tests.model_oracle import randomize_, random_ids

VOCAB = 101


def decoder(layers: int) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64)


def seq2seq(layers: int) -> dict[str, Any]:
    return dict(vocab_size=VOCAB, d_model=32, encoder_layers=layers, decoder_layers=layers,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                decoder_ffn_dim=48, max_position_embeddings=64, decoder_start_token_id=2)


# each builder takes the number of layers (of each stack, for encoder-decoders)
BUILDERS: dict[str, Callable[[int], Any]] = {
    "llama": lambda n: T.LlamaForCausalLM(T.LlamaConfig(**decoder(n))),
    # a window longer than the positions served: every mask is plain causal
    "mistral": lambda n: T.MistralForCausalLM(T.MistralConfig(**decoder(n), sliding_window=4096)),
    "qwen2": lambda n: T.Qwen2ForCausalLM(T.Qwen2Config(**decoder(n))),
    "qwen3": lambda n: T.Qwen3ForCausalLM(T.Qwen3Config(**decoder(n), head_dim=8)),  # q/k norm
    "gemma": lambda n: T.GemmaForCausalLM(T.GemmaConfig(**decoder(n), head_dim=8)),
    "phi3": lambda n: T.Phi3ForCausalLM(T.Phi3Config(**decoder(n), pad_token_id=0)),  # fused qkv
    "gpt2": lambda n: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=n,
                                                     n_head=4, n_positions=64, bos_token_id=1,
                                                     eos_token_id=1)),
    "opt": lambda n: T.OPTForCausalLM(T.OPTConfig(vocab_size=VOCAB, hidden_size=32,
                                                  num_hidden_layers=n, ffn_dim=48,
                                                  num_attention_heads=4, word_embed_proj_dim=32,
                                                  max_position_embeddings=64)),
    "bart": lambda n: T.BartForConditionalGeneration(T.BartConfig(**seq2seq(n))),
    "mbart": lambda n: T.MBartForConditionalGeneration(T.MBartConfig(**seq2seq(n))),
    "marian": lambda n: T.MarianMTModel(T.MarianConfig(**seq2seq(n), pad_token_id=0)),
    "whisper": lambda n: T.WhisperForConditionalGeneration(T.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, encoder_layers=n, decoder_layers=n, d_model=32,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
        decoder_ffn_dim=48, max_source_positions=16, max_target_positions=64,
        decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "t5": lambda n: T.T5ForConditionalGeneration(T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8,
                                                            d_ff=48, num_layers=n, num_heads=4,
                                                            decoder_start_token_id=0)),
}
DECODER_ONLY = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt")
ENCODER_DECODER = ("bart", "mbart", "marian")


def build(name: str, seed: int = 0, attention: str = "sdpa", layers: int = 2) -> Any:
    """Architecture `name` from its small config with `layers` layers (per stack), seeded
    weights, `attention` implementation."""
    torch.manual_seed(seed)
    model = BUILDERS[name](layers)
    model.config._attn_implementation = attention
    randomize_(model, seed)
    return model.eval()


def prompt_for(model: Any, batch: int, seed: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(decoder prompt, encoder source or None): 5 prompt tokens for decoder-only models;
    the decoder start token and 6 source tokens for encoder-decoder ones (for Whisper, random
    features: 8 mel bins, 32 frames)."""
    if model.main_input_name == "input_features":
        features = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(seed))
        return torch.full((batch, 1), model.config.decoder_start_token_id), features
    if model.config.is_encoder_decoder:
        start = model.config.decoder_start_token_id
        return (torch.full((batch, 1), start, dtype=torch.long),
                random_ids((batch, 6), VOCAB, seed + 1))
    return random_ids((batch, 5), VOCAB, seed), None
