"""Named model shapes: the full-size ones the GPU benchmarks use and tiny ones for CPU.

Each preset is a Hugging Face config (random weights, nothing downloaded). `hf_model(name)`
builds the Hugging Face model, the correctness oracle; `from_hf` turns it into ours.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _bart(**overrides: Any) -> Any:
    import transformers

    return transformers.BartConfig(**overrides)


def _llama(**overrides: Any) -> Any:
    import transformers

    return transformers.LlamaConfig(**overrides)


PRESETS: dict[str, Callable[[], Any]] = {
    "bart-large": lambda: _bart(
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
        encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
        decoder_ffn_dim=4096, max_position_embeddings=1024),
    "llama-1b": lambda: _llama(  # the Llama-3.2-1B shape
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-8b": lambda: _llama(  # the Llama-3-8B shape (bf16 weights: 16 GB)
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False),
    "bart-tiny": lambda: _bart(
        vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_position_embeddings=1024),
    "llama-tiny": lambda: _llama(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}
TINY_OF = {"bart-large": "bart-tiny", "llama-1b": "llama-tiny", "llama-8b": "llama-tiny"}


def hf_config(name: str) -> Any:
    """The Hugging Face config of preset `name`; ValueError naming the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def hf_model(name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             seed: int = 0, **config_overrides: Any) -> Any:
    """Hugging Face model of preset `name` with seeded random weights, in eval mode; config
    fields in `config_overrides` (say `num_hidden_layers=16`) replace the preset's."""
    import transformers

    config = hf_config(name)
    for field, value in config_overrides.items():
        setattr(config, field, value)
    classes = {"bart": transformers.BartForConditionalGeneration,
               "llama": transformers.LlamaForCausalLM}
    torch.manual_seed(seed)
    with torch.device(device):
        return classes[config.model_type](config).to(dtype).eval()
