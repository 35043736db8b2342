"""Hugging Face oracles for the model tests: tiny configs, random weights, step-by-step logits.

Shared by the single-process tests and the tensor-parallel worker processes, so everything here
is deterministic given (kind, seed, config overrides).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import transformers

from runtime.generation import DecodeSession, find_generation_model

LLAMA_BASE: dict[str, Any] = dict(
    vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
BART_BASE: dict[str, Any] = dict(
    vocab_size=101, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)


def build_hf(kind: str, seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A Hugging Face model of `kind` ("llama" | "bart") with seeded random weights, fp32, eval."""
    if kind == "llama":
        config = transformers.LlamaConfig(**{**LLAMA_BASE, **overrides})
        model = transformers.LlamaForCausalLM(config)
    elif kind == "bart":
        config = transformers.BartConfig(**{**BART_BASE, **overrides})
        model = transformers.BartForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    config._attn_implementation = "eager"
    randomize_(model, seed)
    return model.eval()


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are well separated (greedy ties would make token
    comparisons flaky): fan-in scaled matrices, unit-scale embeddings, norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(model.named_parameters())
    tensors.update((name, buf) for name, buf in model.named_buffers() if "logits_bias" in name)
    for name, tensor in sorted(tensors.items()):
        noise = torch.randn(tensor.shape, generator=generator)
        if "norm" in name and name.endswith("weight"):
            tensor.copy_(1.0 + 0.1 * noise)
        elif tensor.dim() == 2 and "embed" not in name and "shared" not in name:
            tensor.copy_(noise / math.sqrt(tensor.shape[1]))
        elif tensor.dim() == 2:
            tensor.copy_(noise)
        else:
            tensor.copy_(0.1 * noise)


def random_ids(shape: tuple[int, ...], vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def decoder_prompt(hf: transformers.PreTrainedModel, batch: int) -> torch.Tensor:
    """BART's decoder prompt: one decoder_start_token_id per sequence."""
    return torch.full((batch, 1), hf.config.decoder_start_token_id, dtype=torch.long)


@torch.no_grad()
def hf_logits(hf: transformers.PreTrainedModel, tokens: torch.Tensor,
              encoder_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's logits for every position of `tokens` (batch, len) in one forward."""
    if encoder_ids is None:
        return hf(input_ids=tokens).logits                                  # (batch, len, vocab)
    return hf(input_ids=encoder_ids, decoder_input_ids=tokens).logits


@torch.no_grad()
def hf_greedy(hf: transformers.PreTrainedModel, prompt: torch.Tensor, max_new_tokens: int,
              encoder_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's greedy tokens, with end-of-sequence disabled, (batch, max_new_tokens)."""
    options = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                   min_new_tokens=max_new_tokens, eos_token_id=None, forced_eos_token_id=None,
                   forced_bos_token_id=None, pad_token_id=0)
    if encoder_ids is None:
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                           **options)[:, prompt.shape[1]:]
    return hf.generate(encoder_ids, attention_mask=torch.ones_like(encoder_ids),
                       decoder_input_ids=prompt, **options)[:, prompt.shape[1]:]


@torch.no_grad()
def hf_generate_eos(hf: transformers.PreTrainedModel, prompt: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                    encoder_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's greedy tokens stopping at EOS, (batch, steps run), `pad_token_id` after a
    sequence's EOS. None takes the model's generation config (as `generate` does); forced
    BOS/EOS tokens are off (fxkiln does not force them)."""
    options: dict[str, Any] = dict(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                   forced_eos_token_id=None, forced_bos_token_id=None)
    if eos_token_id is not None:
        options.update(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if encoder_ids is None:
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                           **options)[:, prompt.shape[1]:]
    return hf.generate(encoder_ids, attention_mask=torch.ones_like(encoder_ids),
                       decoder_input_ids=prompt, **options)[:, prompt.shape[1]:]


@torch.no_grad()
def step_logits(model: Any, prompt: torch.Tensor, continuation: torch.Tensor,
                encoder_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Our logits for prompt + continuation, computed as a prefill step then one decode step per
    continuation token (through the KV cache): (batch, prompt_len + steps, vocab), the layout of
    `hf_logits`."""
    batch, prompt_len = prompt.shape
    encoder_len = (None if encoder_ids is None
                   else find_generation_model(model).encoder_length(encoder_ids))
    session = DecodeSession(model, batch, prompt_len, continuation.shape[1], encoder_len,
                            prompt.device)
    outputs = [session.prefill(prompt, encoder_ids)]
    outputs += [session.decode(tokens).unsqueeze(1) for tokens in continuation.unbind(dim=1)]
    return torch.cat(outputs, dim=1)
