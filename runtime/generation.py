"""Greedy generation on a project model, eager or compiled.

`generate` drives any callable with a project model's forward signature:
    decoder-only:     model(input_ids, positions) -> logits (tokens, vocab)
    encoder-decoder:  model(input_ids, positions, encoder_input_ids, encoder_positions) -> logits
It finds what it needs to allocate caches (the `GenerationModel` protocol below) on `model`
itself or, for a wrapper such as a compiled model, on `model.model`. Each step runs inside
`set_forward_context`, so attention ops see that step's metadata and the KV caches.
`DecodeSession` is the step-level API underneath (prefill, then one decode step per call), for
callers that choose tokens themselves; `uniform_batch_metadata` builds one step's metadata.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import weakref

import torch

from runtime.forward_context import AttentionMetadata, set_forward_context
from runtime.kv_cache import AttentionSpec, LayerKVCache, allocate_kv_caches


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
        query_start_loc=_offsets(batch, new_tokens),
        seq_lens=(context_len,) * batch,
        slot_mapping=slot_tables[:, new_positions].reshape(-1),  # (batch * new_tokens,)
        slot_tables=slot_tables,
    )
    if encoder_len is not None:
        encoder_tables = torch.arange(batch * encoder_len, device=device).view(batch, encoder_len)
        metadata.update(
            encoder_query_start_loc=_offsets(batch, encoder_tokens),
            encoder_seq_lens=(encoder_len,) * batch,
            encoder_slot_mapping=encoder_tables[:, :encoder_tokens].reshape(-1),
            encoder_slot_tables=encoder_tables,
        )
    return AttentionMetadata(**metadata)


def _offsets(batch: int, per_sequence: int) -> tuple[int, ...]:
    return tuple(index * per_sequence for index in range(batch + 1))


class DecodeSession:
    """KV caches and step bookkeeping for `batch` sequences of equal prompt length.

    `prefill` runs the prompts (and the encoder, for encoder-decoder models); each `decode` call
    then adds one token per sequence. Both return logits; the caller picks the tokens.
    """

    def __init__(self, model: Callable[..., torch.Tensor], batch: int, prompt_len: int,
                 max_new_tokens: int, encoder_len: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        spec_model = find_generation_model(model)
        self.model = model
        self.batch, self.prompt_len, self.encoder_len = batch, prompt_len, encoder_len
        self.max_len = prompt_len + max_new_tokens
        self.device = torch.device(device)
        self.context_len = 0
        self.kv_caches = _session_caches(self, model, spec_model, batch * self.max_len,
                                         self.max_len, batch * (encoder_len or 0),
                                         encoder_len or 0, self.device)

    def prefill(self, input_ids: torch.Tensor, encoder_input_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """input_ids (batch, prompt_len) -> logits (batch, prompt_len, vocab)."""
        positions = torch.arange(self.prompt_len, device=self.device).repeat(self.batch)
        encoder_inputs: tuple[torch.Tensor, ...] = ()
        if encoder_input_ids is not None:
            encoder_positions = torch.arange(encoder_input_ids.shape[1], device=self.device)
            encoder_inputs = (encoder_input_ids.reshape(-1), encoder_positions.repeat(self.batch))
        logits = self._step(self.prompt_len, input_ids.reshape(-1), positions, encoder_inputs,
                            encoder_tokens=self.encoder_len or 0)
        return logits.view(self.batch, self.prompt_len, -1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (batch,), one new token per sequence -> logits (batch, vocab)."""
        if self.context_len == 0 or self.context_len >= self.max_len:
            raise RuntimeError(f"decode: expected a prefilled session with room left, found "
                               f"context {self.context_len} of {self.max_len}")
        positions = torch.full((self.batch,), self.context_len, dtype=torch.long,
                               device=self.device)
        no_encoder_tokens = tokens.new_empty((0,))
        encoder_inputs = (no_encoder_tokens, no_encoder_tokens) if self.encoder_len else ()
        return self._step(1, tokens, positions, encoder_inputs, encoder_tokens=0)

    def _step(self, new_tokens: int, tokens: torch.Tensor, positions: torch.Tensor,
              encoder_inputs: tuple[torch.Tensor, ...], encoder_tokens: int) -> torch.Tensor:
        self.context_len += new_tokens
        metadata = uniform_batch_metadata(self.batch, new_tokens, self.context_len, self.max_len,
                                          self.device, self.encoder_len, encoder_tokens)
        with set_forward_context(metadata, self.kv_caches):
            return self.model(tokens, positions, *encoder_inputs)  # (tokens, vocab)


def _session_caches(session: object, model: Any, spec_model: GenerationModel, num_slots: int,
                    max_len: int, num_encoder_slots: int, max_encoder_len: int,
                    device: torch.device) -> dict[str, LayerKVCache]:
    """The compiled model's own KV caches (`model.static_decode`, leased to `session` until it
    is garbage) when they are free and large enough, so decode steps replay as whole graphs;
    else fresh caches."""
    state = getattr(model, "static_decode", None)
    if state is not None and state.fits(num_slots, max_len, num_encoder_slots, max_encoder_len,
                                        spec_model.dtype, device) and state.acquire():
        weakref.finalize(session, state.release)
        return state.kv_caches
    return allocate_kv_caches(spec_model.attention_specs(), num_slots, num_encoder_slots,
                              spec_model.dtype, device)


@torch.no_grad()
def generate(model: Callable[..., torch.Tensor], input_ids: torch.Tensor | None,
             max_new_tokens: int, encoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding; returns the new token ids, `(batch, max_new_tokens)`.

    input_ids: (batch, prompt_len) prompts of equal length. For encoder-decoder models it is the
        decoder prompt; None means one `decoder_start_token_id` per sequence.
    encoder_input_ids: (batch, source_len), required by encoder-decoder models only.
    No early stop at end-of-sequence: every sequence gets exactly `max_new_tokens` tokens.
    """
    input_ids = _check_inputs(find_generation_model(model), input_ids, encoder_input_ids)
    batch, prompt_len = input_ids.shape
    if max_new_tokens <= 0:
        return input_ids.new_empty((batch, 0))
    encoder_len = None if encoder_input_ids is None else encoder_input_ids.shape[1]
    session = DecodeSession(model, batch, prompt_len, max_new_tokens, encoder_len,
                            input_ids.device)
    logits = session.prefill(input_ids, encoder_input_ids)[:, -1]  # (batch, vocab)
    generated = [logits.argmax(dim=-1)]                            # each (batch,)
    while len(generated) < max_new_tokens:
        generated.append(session.decode(generated[-1]).argmax(dim=-1))
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
