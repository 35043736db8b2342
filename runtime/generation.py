"""Generation on a project model, eager or compiled: greedy or seeded sampling, stopping at EOS.

`generate` drives any callable with a project model's forward signature:
    decoder-only:     model(input_ids, positions) -> logits (tokens, vocab)
    encoder-decoder:  model(input_ids, positions, encoder_input_ids, encoder_positions) -> logits
It finds what it needs to allocate caches (the `GenerationModel` protocol below) on `model`
itself or, for a wrapper such as a compiled model, on `model.model`. Each step runs inside
`set_forward_context`, so attention ops see that step's metadata and the KV caches.
`DecodeSession` is the step-level API underneath (prefill, then one decode step per call), for
callers that choose tokens themselves; `step_metadata` and `uniform_batch_metadata` build one
step's metadata.

Sequences that finish (emit an end-of-sequence token) leave the running batch: later decode
steps carry only the running sequences, whose KV slots stay where they are (the metadata is
built from their rows of the slot table), so a compiled model replays a smaller bucket.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import weakref

import torch

from runtime.forward_context import AttentionMetadata, set_forward_context
from runtime.kv_cache import AttentionSpec, LayerKVCache, allocate_kv_caches
from runtime.sampling import SamplingParams, TokenChooser


@runtime_checkable
class GenerationModel(Protocol):
    """What generation needs to know about a model besides calling it.

    A model may also carry a Hugging Face style `config` whose `eos_token_id` and
    `pad_token_id` are `generate`'s defaults (fxkiln's own models do).
    """

    is_encoder_decoder: bool
    decoder_start_token_id: int | None

    @property
    def dtype(self) -> torch.dtype: ...

    def attention_specs(self) -> Mapping[str, AttentionSpec]: ...

    # encoder inputs: see runtime.serving.ServingModel, which defines them for token ids
    def encoder_length(self, encoder_input: torch.Tensor) -> int: ...

    def encoder_step_inputs(self, encoder_input: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def no_encoder_inputs(self, device: torch.device | str) -> tuple[torch.Tensor, ...]: ...


def find_generation_model(model: Any) -> GenerationModel:
    """`model` if it describes itself (`GenerationModel`), else `model.model`; TypeError if neither."""
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, GenerationModel):
            return candidate
    raise TypeError(f"generate: expected a project model (with attention_specs(), dtype, "
                    f"is_encoder_decoder) or a wrapper holding one as `.model`, "
                    f"found {type(model).__name__}")


def step_metadata(slot_tables: torch.Tensor, new_tokens: int, context_len: int,
                  encoder_slot_tables: torch.Tensor | None = None,
                  encoder_tokens: int = 0) -> AttentionMetadata:
    """Metadata for one step of the sequences whose slot-table rows are `slot_tables`.

    slot_tables: (sequences, max_len), the cache slot of each position of each sequence in this
        step, in step order; each brings `new_tokens` tokens and reaches `context_len`.
    encoder_slot_tables: (sequences, encoder_len), their cross-attention slots (encoder-decoder
        models); `encoder_tokens` is how many encoder tokens each brings this step (the encoder
        length on the step that runs the encoder, else 0).
    """
    num_seqs = slot_tables.shape[0]
    metadata: dict[str, Any] = dict(
        query_start_loc=_offsets(num_seqs, new_tokens),
        seq_lens=(context_len,) * num_seqs,
        slot_mapping=slot_tables[:, context_len - new_tokens:context_len].reshape(-1),
        slot_tables=slot_tables,
    )
    if encoder_slot_tables is not None:
        metadata.update(
            encoder_query_start_loc=_offsets(num_seqs, encoder_tokens),
            encoder_seq_lens=(encoder_slot_tables.shape[1],) * num_seqs,
            encoder_slot_mapping=encoder_slot_tables[:, :encoder_tokens].reshape(-1),
            encoder_slot_tables=encoder_slot_tables,
        )
    return AttentionMetadata(**metadata)


def uniform_batch_metadata(batch: int, new_tokens: int, context_len: int, max_len: int,
                           device: torch.device, encoder_len: int | None = None,
                           encoder_tokens: int = 0) -> AttentionMetadata:
    """Metadata for `batch` sequences that each bring `new_tokens` tokens, reaching `context_len`.

    Sequence b keeps position p in slot `b * max_len + p` (and encoder position p in cross slot
    `b * encoder_len + p`). `encoder_tokens` is how many encoder tokens each sequence brings this
    step: `encoder_len` on the step that runs the encoder, else 0.
    """
    encoder_tables = None if encoder_len is None else _slot_tables(batch, encoder_len, device)
    return step_metadata(_slot_tables(batch, max_len, device), new_tokens, context_len,
                         encoder_tables, encoder_tokens)


def _slot_tables(batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch * length, device=device).view(batch, length)  # (batch, length)


def _offsets(batch: int, per_sequence: int) -> tuple[int, ...]:
    return tuple(index * per_sequence for index in range(batch + 1))


class DecodeSession:
    """KV caches and step bookkeeping for `batch` sequences of equal prompt length.

    `prefill` runs the prompts (and the encoder, for encoder-decoder models); each `decode` call
    then adds one token to each running sequence. Both return logits; the caller picks the
    tokens. Sequence b keeps its slot-table row b for the whole session, so `decode` may run any
    subset of the sequences (`rows`): the others' caches are left as they are.
    """

    def __init__(self, model: Callable[..., torch.Tensor], batch: int, prompt_len: int,
                 max_new_tokens: int, encoder_len: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        spec_model = find_generation_model(model)
        self.model, self.spec_model = model, spec_model
        self.batch, self.prompt_len, self.encoder_len = batch, prompt_len, encoder_len
        self.max_len = prompt_len + max_new_tokens
        self.device = torch.device(device)
        self.context_len = 0
        self.kv_caches = _session_caches(self, model, spec_model, batch * self.max_len,
                                         self.max_len, batch * (encoder_len or 0),
                                         encoder_len or 0, self.device)
        self.slot_tables = _slot_tables(batch, self.max_len, self.device)  # (batch, max_len)
        self.encoder_slot_tables = (None if encoder_len is None else
                                    _slot_tables(batch, encoder_len, self.device))

    def prefill(self, input_ids: torch.Tensor, encoder_input_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """input_ids (batch, prompt_len) -> logits (batch, prompt_len, vocab).

        Encoder-decoder models run their encoder here, once: encoder_input_ids (batch, source_len).
        """
        positions = torch.arange(self.prompt_len, device=self.device).repeat(self.batch)
        encoder_inputs: tuple[torch.Tensor, ...] = ()
        if encoder_input_ids is not None:
            encoder_inputs = self.spec_model.encoder_step_inputs(encoder_input_ids)
        metadata = self._metadata(None, self.prompt_len, encoder_tokens=self.encoder_len or 0)
        logits = self._step(metadata, input_ids.reshape(-1), positions, encoder_inputs)
        return logits.view(self.batch, self.prompt_len, -1)

    def decode(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per running sequence -> logits (running, vocab).

        tokens: (running,), the newest token of each sequence in `rows`.
        rows: (running,) int64 indices (into the prefilled batch) of the sequences this step
            runs, on the session's device; None runs all of them. Sequences left out do not
            advance; they may not be run again later (their context would be stale).
        """
        if self.context_len == 0 or self.context_len >= self.max_len:
            raise RuntimeError(f"decode: expected a prefilled session with room left, found "
                               f"context {self.context_len} of {self.max_len}")
        running = self.batch if rows is None else rows.shape[0]
        if tokens.shape != (running,):
            raise ValueError(f"decode: expected tokens of shape ({running},) for the running "
                             f"sequences, found {tuple(tokens.shape)}")
        positions = torch.full((running,), self.context_len, dtype=torch.long,
                               device=self.device)
        encoder_inputs = self.spec_model.no_encoder_inputs(self.device) if self.encoder_len else ()
        metadata = self._metadata(rows, 1, encoder_tokens=0)
        return self._step(metadata, tokens, positions, encoder_inputs)

    def _metadata(self, rows: torch.Tensor | None, new_tokens: int,
                  encoder_tokens: int) -> AttentionMetadata:
        self.context_len += new_tokens
        tables, encoder_tables = self.slot_tables, self.encoder_slot_tables
        if rows is not None:
            tables = tables[rows]                                          # (running, max_len)
            encoder_tables = None if encoder_tables is None else encoder_tables[rows]
        return step_metadata(tables, new_tokens, self.context_len, encoder_tables, encoder_tokens)

    def _step(self, metadata: AttentionMetadata, tokens: torch.Tensor, positions: torch.Tensor,
              encoder_inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
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
             max_new_tokens: int, encoder_input_ids: torch.Tensor | None = None, *,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             ignore_eos: bool = False, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             input_features: torch.Tensor | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` tokens per sequence; returns them, `(batch, steps_run)`.

    input_ids: (batch, prompt_len) prompts of equal length (ragged prompts are not supported).
        For encoder-decoder models it is the decoder prompt; None means one
        `decoder_start_token_id` per sequence.
    encoder_input_ids: (batch, source_len), required by encoder-decoder models only; the encoder
        runs once, in the prefill step.
    eos_token_id: an id or ids that end a sequence; None takes the model config's (as Hugging
        Face does). A sequence that emits one is finished: it leaves the running batch and its
        later positions hold `pad_token_id` (None: the config's; an error if there is none).
        Generation stops when every sequence is finished or after max_new_tokens steps.
        Hugging Face's forced BOS/EOS tokens (`forced_eos_token_id`) are not applied.
    ignore_eos: True generates exactly max_new_tokens tokens for every sequence.
    do_sample, temperature, top_k, top_p, seed: greedy (default) or sampling; see
        `runtime.sampling.SamplingParams`. The same seed gives the same tokens, eager or
        compiled, and whatever other sequences of the batch do.
    input_features: the encoder input of models whose encoder reads features instead of
        token ids (Whisper: (batch, mel bins, frames)); in place of encoder_input_ids.
    """
    spec_model = find_generation_model(model)
    if input_features is not None:
        if encoder_input_ids is not None:
            raise ValueError("generate: expected encoder_input_ids or input_features, found both")
        encoder_input_ids = input_features
    input_ids = _check_inputs(spec_model, input_ids, encoder_input_ids)
    chooser_params = SamplingParams(do_sample, temperature, top_k, top_p, seed)
    eos_ids, pad_id = _stop_tokens(spec_model, eos_token_id, pad_token_id, ignore_eos)
    batch, prompt_len = input_ids.shape
    if max_new_tokens <= 0:
        return input_ids.new_empty((batch, 0))
    encoder_len = (None if encoder_input_ids is None
                   else spec_model.encoder_length(encoder_input_ids))
    session = DecodeSession(model, batch, prompt_len, max_new_tokens, encoder_len,
                            input_ids.device)
    choose = TokenChooser(chooser_params, batch, input_ids.device)
    generated = input_ids.new_full((batch, max_new_tokens), pad_id)
    eos = None if eos_ids is None else torch.tensor(eos_ids, device=input_ids.device)
    rows: torch.Tensor | None = None                   # running sequences; None: all of them
    logits = session.prefill(input_ids, encoder_input_ids)[:, -1]  # (batch, vocab)
    for step in range(max_new_tokens):
        if step:
            logits = session.decode(tokens, rows)      # (running, vocab)
        tokens = choose(logits, rows)                  # (running,)
        if rows is None:
            generated[:, step] = tokens
        else:
            generated[rows, step] = tokens
        if eos is not None:
            rows, tokens = _drop_finished(rows, tokens, eos, batch)
            if tokens.numel() == 0:
                return generated[:, :step + 1]
    return generated


def _drop_finished(rows: torch.Tensor | None, tokens: torch.Tensor, eos: torch.Tensor,
                   batch: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The running rows and their tokens, less the sequences that just emitted EOS."""
    keep = (~torch.isin(tokens, eos)).nonzero().squeeze(1)  # (still running,); syncs the host
    if keep.shape[0] == tokens.shape[0]:
        return rows, tokens
    all_rows = torch.arange(batch, device=tokens.device) if rows is None else rows
    return all_rows[keep], tokens[keep]


def _stop_tokens(model: GenerationModel, eos_token_id: int | Sequence[int] | None,
                 pad_token_id: int | None, ignore_eos: bool,
                 ) -> tuple[tuple[int, ...] | None, int]:
    """(EOS ids or None when nothing stops a sequence, the id that fills finished rows)."""
    if ignore_eos:
        return None, 0
    config = getattr(model, "config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if eos is None:
        return None, 0
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos)
    if not eos_ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
        raise ValueError(f"eos_token_id: expected an int or a non-empty sequence of ints, "
                         f"found {eos!r}")
    pad = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
    if pad is None:
        source = "given" if eos_token_id is not None else "from the model config"
        raise ValueError(f"generate: eos_token_id {eos!r} ({source}) needs a pad_token_id to "
                         f"fill finished sequences, found none in the arguments or the model "
                         f"config; pass pad_token_id=..., or ignore_eos=True to generate "
                         f"max_new_tokens for every sequence")
    return eos_ids, pad


def _check_inputs(model: GenerationModel, input_ids: torch.Tensor | None,
                  encoder_input_ids: torch.Tensor | None) -> torch.Tensor:
    if model.is_encoder_decoder:
        if encoder_input_ids is None or encoder_input_ids.dim() < 2:
            found = None if encoder_input_ids is None else tuple(encoder_input_ids.shape)
            raise ValueError(f"generate: encoder-decoder model needs encoder_input_ids of shape "
                             f"(batch, source_len) (or input_features), found {found}")
        if input_ids is None:
            if model.decoder_start_token_id is None:
                raise ValueError("generate: input_ids is None and the model has no "
                                 "decoder_start_token_id")
            input_ids = torch.full((encoder_input_ids.shape[0], 1), model.decoder_start_token_id,
                                   dtype=torch.long, device=encoder_input_ids.device)
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
