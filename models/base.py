"""What every project model provides besides forward: the generation and compile seams."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch
from torch import nn

from models.errors import UnsupportedConfigError
from models.layers.attention import collect_attention_specs
from runtime.forward_context import set_forward_context
from runtime.kv_cache import AttentionSpec, allocate_kv_caches
from runtime.static_decode import StaticDecodeState
from runtime.step_context import CaptureSpec, decode_step_context
from runtime.step_metadata import uniform_batch_metadata


class ProjectModel(nn.Module):
    """Base of fxkiln's own models (implements `runtime.generation.GenerationModel`).

    Subclasses set the class attributes below and define forward over flattened tokens.
    stacked_params_mapping: (fused parameter name part, checkpoint name part, shard id), e.g.
        ("qkv_proj", "q_proj", "q"): checkpoint tensors `...q_proj.*` load into `...qkv_proj.*`.
    """

    is_encoder_decoder: ClassVar[bool] = False
    stacked_params_mapping: ClassVar[tuple[tuple[str, str, str | int], ...]] = ()
    decoder_start_token_id: int | None = None

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def attention_specs(self) -> dict[str, AttentionSpec]:
        """Layer name -> this rank's attention spec, for KV cache allocation."""
        return collect_attention_specs(self)

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        """Inputs of forward for `num_tokens` tokens (for tracing and compile_model)."""
        raise NotImplementedError

    def example_context(self, *inputs: torch.Tensor) -> AbstractContextManager[Any]:
        """A forward context under which `forward(*inputs)` runs outside generation.

        One sequence whose prompt is all of `inputs` (a prefill; for encoder-decoder models the
        encoder tokens are the third input), with fresh KV caches of just that size.
        compile_model uses it to run the graph at compile time (FLOP counts, verification).
        """
        num_tokens = inputs[0].shape[0]
        encoder_len = inputs[2].shape[0] if self.is_encoder_decoder else None
        caches = allocate_kv_caches(self.attention_specs(), num_tokens, encoder_len or 0,
                                    self.dtype, self.device)
        metadata = uniform_batch_metadata(1, num_tokens, num_tokens, num_tokens, self.device,
                                          encoder_len, encoder_len or 0)
        return set_forward_context(metadata, caches)


    def capture_spec(self, max_tokens: int, kv_cache_tokens: int = 0) -> CaptureSpec:
        """What the graph runner captures: decode steps (one new token per sequence).

        Token ids and positions carry the token dimension. Encoder-decoder models capture with
        no encoder tokens (the encoder runs once, eagerly, at prefill). `kv_cache_tokens` > 0:
        the runner keeps KV caches of that many slots (self- and cross-attention each) and
        captures whole decode steps over them; sequences are at most min(kv_cache_tokens,
        max_position_embeddings) long there.
        """
        ids, positions = self.example_inputs(max_tokens)[:2]
        inputs: tuple[torch.Tensor, ...] = (ids, positions)
        encoder_len = None
        if self.is_encoder_decoder:
            no_tokens = ids.new_empty((0,))
            inputs, encoder_len = (ids, positions, no_tokens, no_tokens), 1
        context = decode_step_context(self, max_tokens, self.device, encoder_len)
        static = None
        if kv_cache_tokens > 0:
            max_len = min(kv_cache_tokens,
                          getattr(self.config, "max_position_embeddings", kv_cache_tokens))
            encoder_slots = kv_cache_tokens if self.is_encoder_decoder else 0
            static = StaticDecodeState(
                self.attention_specs(), self.dtype, self.device, max_seqs=max_tokens,
                num_slots=kv_cache_tokens, max_len=max_len, num_encoder_slots=encoder_slots,
                max_encoder_len=max_len if encoder_slots else 0)
        return CaptureSpec(inputs, token_input_indices=(0, 1), step_context=context,
                           static_decode=static)


def require_config(config: Any, key: str, supported: tuple[Any, ...]) -> Any:
    """`config.<key>` if it is one of `supported`, else UnsupportedConfigError naming the key."""
    value = getattr(config, key, None)
    if value not in supported:
        raise UnsupportedConfigError(key, value, list(supported))
    return value
