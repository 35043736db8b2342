"""What a serving model gives the runtime besides forward: the generation and compile seams.

A serving model runs over flattened tokens (`forward(input_ids, positions[, encoder_input_ids,
encoder_positions]) -> logits (tokens, vocab)`) with one `fxkiln.attention` op per attention
layer, and describes itself to the runtime: its attention layers (for KV caches), its dtype and
device, whether it has an encoder. From that, this base class derives what `compile_model` and
the graph runner need: a forward context to run example inputs in, and how to capture decode
steps. fxkiln's own models (`models.base.ProjectModel`) and the graphs built from Hugging Face
models (`compiler.hf_serving`) share it, so both are captured and driven the same way.
"""
from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from runtime.forward_context import set_forward_context
from runtime.step_metadata import uniform_batch_metadata
from runtime.kv_cache import AttentionSpec, allocate_kv_caches
from runtime.memory import kv_cache_bytes_per_token
from runtime.static_decode import KVCachePlan, StaticDecodeState
from runtime.step_context import CaptureSpec, decode_step_context

# the longest sequence the runner's layout buffers hold when the config gives no positions: a
# slot-table row per captured sequence, so an "auto" cache of millions of slots must not set it
UNBOUNDED_LEN = 16384


class ServingModel(nn.Module):
    """Base of the models the runtime serves (implements `runtime.generation.GenerationModel`).

    Subclasses define forward over flattened tokens, `attention_specs()` and
    `example_inputs(num_tokens)`, and set `is_encoder_decoder` / `decoder_start_token_id`
    (and a Hugging Face style `config`, whose EOS and pad ids are `generate`'s defaults).
    """

    is_encoder_decoder: bool = False
    decoder_start_token_id: int | None = None
    config: Any = None
    # no token reads another's row except through the attention metadata, which pads safely:
    # the bucket runner skips its padding check (runtime/padding_check.py)
    rows_independent: bool = True

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def attention_specs(self) -> dict[str, AttentionSpec]:
        """Layer name -> this rank's attention spec, for KV cache allocation."""
        raise NotImplementedError

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        """Inputs of forward for `num_tokens` tokens (for tracing and compile_model)."""
        raise NotImplementedError

    # -- encoder inputs (encoder-decoder models) --------------------------------------------
    # `generate` takes the encoder's input per sequence, `(batch, source_len)` token ids; forward
    # takes it flattened, with positions. A model whose encoder reads something else (audio
    # features) overrides these four.
    def encoder_length(self, encoder_input: torch.Tensor) -> int:
        """Encoder tokens per sequence of `generate`'s `encoder_input_ids` (batch, ...)."""
        return int(encoder_input.shape[1])

    def encoder_step_inputs(self, encoder_input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """forward's encoder inputs for the step that runs the encoder on `encoder_input`."""
        batch, length = encoder_input.shape[:2]
        positions = torch.arange(length, device=encoder_input.device).repeat(batch)
        return encoder_input.reshape(-1), positions

    def no_encoder_inputs(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """forward's encoder inputs for a step that does not run the encoder (a decode step)."""
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty

    def encoder_tokens(self, encoder_input: torch.Tensor) -> int:
        """Encoder tokens in forward's first encoder input (flattened token ids: its rows)."""
        return int(encoder_input.shape[0])

    # -- compile and capture seams ----------------------------------------------------------
    def example_context(self, *inputs: torch.Tensor) -> AbstractContextManager[Any]:
        """A forward context under which `forward(*inputs)` runs outside generation.

        One sequence whose prompt is all of `inputs` (a prefill; for encoder-decoder models the
        encoder tokens are the third input), with fresh KV caches of just that size.
        compile_model uses it to run the graph at compile time (FLOP counts, verification).
        """
        num_tokens = inputs[0].shape[0]
        encoder_len = self.encoder_tokens(inputs[2]) if self.is_encoder_decoder else None
        caches = allocate_kv_caches(self.attention_specs(), num_tokens, encoder_len or 0,
                                    self.dtype, self.device)
        metadata = uniform_batch_metadata(1, num_tokens, num_tokens, num_tokens, self.device,
                                          encoder_len, encoder_len or 0)
        return set_forward_context(metadata, caches)

    def capture_spec(self, max_tokens: int, kv_cache_tokens: int | str = 0) -> CaptureSpec:
        """What the graph runner captures: decode steps (one new token per sequence).

        Token ids and positions carry the token dimension. Encoder-decoder models capture with
        no encoder tokens (the encoder runs once, eagerly, at prefill). `kv_cache_tokens` a
        count > 0 or "auto" (sized by the runner, `runtime.static_decode.KVCachePlan`): the
        runner keeps KV caches of that many slots (self- and cross-attention each) and
        captures whole decode steps over them; sequences are at most
        min(slots, max_position_embeddings) long there (16384 without the setting).
        """
        ids, positions = self.example_inputs(max_tokens)[:2]
        inputs: tuple[torch.Tensor, ...] = (ids, positions)
        encoder_len = None
        if self.is_encoder_decoder:
            inputs, encoder_len = (ids, positions, *self.no_encoder_inputs(ids.device)), 1
        context = decode_step_context(self, max_tokens, self.device, encoder_len)
        plan = None
        if kv_cache_tokens != 0:
            plan = KVCachePlan(kv_cache_tokens,
                               kv_cache_bytes_per_token(self.attention_specs(), self.dtype),
                               functools.partial(self._static_decode, max_tokens))
        return CaptureSpec(inputs, token_input_indices=(0, 1), step_context=context,
                           kv_cache=plan)

    def _static_decode(self, max_seqs: int, slots: int) -> StaticDecodeState:
        """The runner's caches of `slots` slots, with layout buffers for `max_seqs` sequences."""
        positions = getattr(self.config, "max_position_embeddings", None) or UNBOUNDED_LEN
        max_len = min(slots, positions)
        encoder_slots = slots if self.is_encoder_decoder else 0
        return StaticDecodeState(
            self.attention_specs(), self.dtype, self.device, max_seqs=max_seqs,
            num_slots=slots, max_len=max_len, num_encoder_slots=encoder_slots,
            max_encoder_len=max_len if encoder_slots else 0)
