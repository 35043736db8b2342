"""Greedy generation on a project model, eager or compiled.

`generate` drives any callable with a project model's forward signature:
    decoder-only:     model(input_ids, positions) -> logits (tokens, vocab)
    encoder-decoder:  model(input_ids, positions, encoder_input_ids, encoder_positions) -> logits
It finds what it needs to allocate caches (the `GenerationModel` protocol below) on `model`
itself or, for a wrapper such as a compiled model, on `model.model`. Each step runs inside
`set_forward_context`, so attention ops see that step's metadata and the KV caches.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from runtime.forward_context import AttentionMetadata, set_forward_context
from runtime.kv_cache import AttentionSpec, allocate_kv_caches


@runtime_checkable
class GenerationModel(Protocol):
    """What generation needs to know about a model besides calling it."""

    is_encoder_decoder: bool
    decoder_start_token_id: int | None

    @property
    def dtype(self) -> torch.dtype: ...

    def attention_specs(self) -> Mapping[str, AttentionSpec]: ...


def find_generation_model(model: Any) -> GenerationModel:
    """`model` if it describes itself (`GenerationModel`), else `model.model`; TypeError if neither."""
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, GenerationModel):
            return candidate
    raise TypeError(f"generate: expected a project model (with attention_specs(), dtype, "
                    f"is_encoder_decoder) or a wrapper holding one as `.model`, "
                    f"found {type(model).__name__}")


def uniform_batch_metadata(batch: int, new_tokens: int, context_len: int, max_len: int,
                           device: torch.device, encoder_len: int | None = None,
                           encoder_tokens: int = 0) -> AttentionMetadata:
    """Metadata for `batch` sequences that each bring `new_tokens` tokens, reaching `context_len`.

    Sequence b keeps position p in slot `b * max_len + p` (and encoder position p in cross slot
    `b * encoder_len + p`). `encoder_tokens` is how many encoder tokens each sequence brings this
    step: `encoder_len` on the step that runs the encoder, else 0.
    """
    slot_tables = torch.arange(batch * max_len, device=device).view(batch, max_len)
    new_positions = slice(context_len - new_tokens, context_len)
    metadata: dict[str, Any] = dict(
        query_start_loc=tuple(range(0, batch * new_tokens + 1, new_tokens)) if new_tokens
        else (0,) * (batch + 1),
        seq_lens=(context_len,) * batch,
        slot_mapping=slot_tables[:, new_positions].reshape(-1),  # (batch * new_tokens,)
        slot_tables=slot_tables,
    )
    if encoder_len is not None:
        encoder_tables = torch.arange(batch * encoder_len, device=device).view(batch, encoder_len)
        metadata.update(
            encoder_query_start_loc=tuple(range(0, batch * encoder_tokens + 1, encoder_tokens))
            if encoder_tokens else (0,) * (batch + 1),
            encoder_seq_lens=(encoder_len,) * batch,
            encoder_slot_mapping=encoder_tables[:, :encoder_tokens].reshape(-1),
            encoder_slot_tables=encoder_tables,
        )
    return AttentionMetadata(**metadata)


@torch.no_grad()
def generate(model: Callable[..., torch.Tensor], input_ids: torch.Tensor | None,
             max_new_tokens: int, encoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding; returns the new token ids, `(batch, max_new_tokens)`.

    input_ids: (batch, prompt_len) prompts of equal length. For encoder-decoder models it is the
        decoder prompt; None means one `decoder_start_token_id` per sequence.
    encoder_input_ids: (batch, source_len), required by encoder-decoder models only.
    No early stop at end-of-sequence: every sequence gets exactly `max_new_tokens` tokens.
    """
    spec_model = find_generation_model(model)
    input_ids = _check_inputs(spec_model, input_ids, encoder_input_ids)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if max_new_tokens <= 0:
        return input_ids.new_empty((batch, 0))
    max_len = prompt_len + max_new_tokens
    encoder_len = None if encoder_input_ids is None else encoder_input_ids.shape[1]
    caches = allocate_kv_caches(spec_model.attention_specs(), batch * max_len,
                                batch * (encoder_len or 0), spec_model.dtype, device)

    tokens = input_ids.reshape(-1)                                       # (batch * prompt_len,)
    positions = torch.arange(prompt_len, device=device).repeat(batch)    # (batch * prompt_len,)
    encoder_inputs: tuple[torch.Tensor, ...] = ()
    if encoder_input_ids is not None:
        assert encoder_len is not None
        encoder_inputs = (encoder_input_ids.reshape(-1),                 # (batch * source_len,)
                          torch.arange(encoder_len, device=device).repeat(batch))
    no_encoder_tokens = (input_ids.new_empty((0,)), input_ids.new_empty((0,)))

    generated: list[torch.Tensor] = []
    new_tokens, context_len = prompt_len, prompt_len
    for _ in range(max_new_tokens):
        encoder_tokens = (encoder_len or 0) if not generated else 0  # the encoder runs once
        metadata = uniform_batch_metadata(batch, new_tokens, context_len, max_len, device,
                                          encoder_len, encoder_tokens)
        with set_forward_context(metadata, caches):
            logits = model(tokens, positions, *encoder_inputs)           # (tokens, vocab)
        last_rows = torch.tensor(metadata.query_start_loc[1:], device=device) - 1
        next_tokens = logits[last_rows].argmax(dim=-1)                   # (batch,)
        generated.append(next_tokens)
        tokens = next_tokens
        positions = torch.full((batch,), context_len, dtype=torch.long, device=device)
        if encoder_inputs:
            encoder_inputs = no_encoder_tokens
        new_tokens, context_len = 1, context_len + 1
    return torch.stack(generated, dim=1)


def _check_inputs(model: GenerationModel, input_ids: torch.Tensor | None,
                  encoder_input_ids: torch.Tensor | None) -> torch.Tensor:
    if model.is_encoder_decoder:
        if encoder_input_ids is None or encoder_input_ids.dim() != 2:
            found = None if encoder_input_ids is None else tuple(encoder_input_ids.shape)
            raise ValueError(f"generate: encoder-decoder model needs encoder_input_ids of shape "
                             f"(batch, source_len), found {found}")
        if input_ids is None:
            if model.decoder_start_token_id is None:
                raise ValueError("generate: input_ids is None and the model has no "
                                 "decoder_start_token_id")
            input_ids = encoder_input_ids.new_full((encoder_input_ids.shape[0], 1),
                                                   model.decoder_start_token_id)
        if input_ids.shape[0] != encoder_input_ids.shape[0]:
            raise ValueError(f"generate: input_ids has batch {input_ids.shape[0]} but "
                             f"encoder_input_ids has batch {encoder_input_ids.shape[0]}")
    elif encoder_input_ids is not None:
        raise ValueError("generate: encoder_input_ids given to a decoder-only model")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        found = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"generate: expected input_ids of shape (batch, prompt_len >= 1), "
                         f"found {found}")
    return input_ids
