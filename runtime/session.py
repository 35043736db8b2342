"""DecodeSession: the KV caches and step bookkeeping of one generation, step by step.

A session drives any callable with a project model's forward signature:
    decoder-only:     model(input_ids, positions) -> logits (rows, vocab)
    encoder-decoder:  model(input_ids, positions, encoder_input_ids, encoder_positions) -> logits
It finds what it needs to allocate caches (the `GenerationModel` protocol below) on `model`
itself or, for a wrapper such as a compiled model, on `model.model`. Each step runs inside
`set_forward_context`, so attention ops see that step's metadata and the KV caches, and the
LM head computes only the rows the step reads (`runtime.logits_rows`).

Sequences may have prompts of different lengths: sequence b owns a contiguous region of cache
slots (`runtime.slot_layout`) and its own context length. A step may run any subset of the
sequences, each bringing any number of new tokens (a whole prompt, a chunk of one, or one
decoded token), which is what batched, chunked and mixed prefill need.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from runtime.forward_context import AttentionMetadata, set_forward_context
from runtime.kv_cache import AttentionSpec
from runtime.replayed_decode import session_caches
from runtime.scheduler import PrefillPlanner
from runtime.slot_layout import SlotLayout, encoder_step_tensors, step_tensors


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


class DecodeSession:
    """KV caches and step bookkeeping for `batch` sequences, prompts of any length.

    prompt_len (and encoder_len, for encoder-decoder models) is one int for all sequences or
    one per sequence; each sequence has room for its prompt plus `max_new_tokens`. Steps:
    `prefill` (equal-length prompts, every position's logits), `prefill_prompts` (prompts of
    any length, optionally in chunks; each one's last logits), `step` (any sequences, each
    bringing any number of new tokens) and `decode` (one token per running sequence). They
    return logits; the caller picks the tokens. Sequence b keeps slot-table row b for the whole
    session, so a step may run any subset of the sequences: the others' caches stay as they are.
    """

    def __init__(self, model: Callable[..., torch.Tensor], batch: int,
                 prompt_len: int | Sequence[int], max_new_tokens: int,
                 encoder_len: int | Sequence[int] | None = None,
                 device: torch.device | str = "cpu") -> None:
        spec_model = find_generation_model(model)
        self.model, self.spec_model = model, spec_model
        self.batch = batch
        self.device = torch.device(device)
        self.prompt_lens = _per_sequence("prompt_len", prompt_len, batch)
        self.encoder_lens = (None if encoder_len is None
                             else _per_sequence("encoder_len", encoder_len, batch))
        self.layout = SlotLayout([n + max_new_tokens for n in self.prompt_lens], self.device)
        self.encoder_layout = (None if self.encoder_lens is None
                               else SlotLayout(self.encoder_lens, self.device))
        self.max_len = self.layout.max_len
        self.context_lens = [0] * batch     # tokens each sequence has in the cache
        encoder = self.encoder_layout
        self.kv_caches, self._replayed = session_caches(
            self, model, spec_model.attention_specs(), spec_model.dtype, self.device,
            self.layout, encoder)
        self.slot_tables = self.layout.tables                              # (batch, max_len)
        self.encoder_slot_tables = None if encoder is None else encoder.tables
        self._all_rows = list(range(batch))

    def prefill(self, input_ids: torch.Tensor, encoder_input_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """input_ids (batch, prompt_len), equal lengths -> logits (batch, prompt_len, vocab) of
        every position. Encoder-decoder models run their encoder here, once:
        encoder_input_ids (batch, source_len). For the last position's logits only (and
        prompts of any length) use `prefill_prompts`."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch:
            raise ValueError(f"prefill: expected input_ids of shape ({self.batch}, prompt_len), "
                             f"found {tuple(input_ids.shape)}")
        encoder = None if encoder_input_ids is None else dict(enumerate(encoder_input_ids))
        logits = self.step(self._all_rows, list(input_ids), encoder, all_logits=True)
        return logits.view(self.batch, input_ids.shape[1], -1)

    def prefill_prompts(self, prompts: Sequence[torch.Tensor],
                        encoder_input_ids: Sequence[torch.Tensor] | None = None, *,
                        chunk_tokens: int | None = None) -> torch.Tensor:
        """One 1-D prompt per sequence -> logits of each prompt's last token (batch, vocab).

        Only those rows go through the LM head. chunk_tokens: at most that many prompt tokens
        per forward (chunked prefill, `runtime.scheduler`); None: all in one forward.
        """
        planner = PrefillPlanner([p.shape[0] for p in prompts], chunk_tokens)
        last: list[torch.Tensor | None] = [None] * self.batch
        while planner.pending:
            chunks = planner.next_chunks()
            encoder = (None if encoder_input_ids is None else
                       {c.row: encoder_input_ids[c.row] for c in chunks if c.start == 0})
            read = [i for i, c in enumerate(chunks) if c.completes]
            logits = self.step([c.row for c in chunks],
                               [prompts[c.row][c.start:c.start + c.count] for c in chunks],
                               encoder, read=read)
            for i, row_logits in zip(read, logits):
                last[chunks[i].row] = row_logits
        return torch.stack(last)  # type: ignore[arg-type]  # every prompt completes

    def step(self, rows: Sequence[int], tokens: torch.Tensor | Sequence[torch.Tensor],
             encoder_input_ids: Mapping[int, torch.Tensor] | None = None, *,
             counts: Sequence[int] | None = None, read: Sequence[int] | None = None,
             all_logits: bool = False) -> torch.Tensor:
        """One forward in which sequence rows[i] brings its next counts[i] tokens.

        tokens: one 1-D tensor per row, or all of them flattened with their `counts` (default:
            one each). encoder_input_ids: row -> its whole encoder input, for the rows of an
            encoder-decoder model that take their first step here (and only those).
        Returns the logits of the last new token of the rows `read` (indices into `rows`,
        default all), (len(read), vocab), computing only those; all_logits: of every new
        token, (tokens, vocab).
        """
        rows = list(rows)
        flat, counts = _flatten_tokens(tokens, counts, len(rows))
        self._check_step(rows, counts, encoder_input_ids or {})
        read = list(range(len(rows))) if read is None else list(read)
        ends = list(itertools.accumulate(counts))
        indices = (None if all_logits or (read == list(range(len(rows))) and ends[-1] == len(rows))
                   else [ends[i] - 1 for i in read])
        all_rows = rows == self._all_rows
        tensors = step_tensors(self.layout, rows, [self.context_lens[r] for r in rows], counts,
                               self.device, all_rows=all_rows, logits_indices=indices)
        for row, count in zip(rows, counts):
            self.context_lens[row] += count
        tables = self.slot_tables if tensors.rows is None else self.slot_tables[tensors.rows]
        metadata: dict[str, Any] = dict(
            query_start_loc=(0, *ends), seq_lens=tuple(self.context_lens[r] for r in rows),
            slot_mapping=tensors.slots, slot_tables=tables, logits_indices=tensors.logits_indices)
        encoder_inputs = self._encoder_step(rows, tensors.rows, encoder_input_ids or {}, metadata)
        logits = self._step(AttentionMetadata(**metadata), flat, tensors.positions,
                            encoder_inputs)
        if tensors.logits_indices is not None and logits.shape[0] == flat.shape[0]:
            logits = logits[tensors.logits_indices]  # a model that computes every row's logits
        return logits

    def decode(self, tokens: torch.Tensor, rows: torch.Tensor | Sequence[int] | None = None
               ) -> torch.Tensor:
        """One new token per running sequence -> logits (running, vocab).

        tokens: (running,), the newest token of each sequence in `rows`.
        rows: indices (into the batch) of the sequences this step runs, as ints or an int64
            tensor on the session's device (read on the host: a sync); None runs all of them.
            Sequences left out do not advance.
        On the compiled model's own caches, a step that a whole-step graph serves is that
        graph's replay (`runtime.replayed_decode`); any other step runs the model's forward.
        """
        host_rows = (self._all_rows if rows is None else
                     rows.tolist() if isinstance(rows, torch.Tensor) else list(rows))
        if tokens.shape != (len(host_rows),):
            raise ValueError(f"decode: expected tokens of shape ({len(host_rows)},) for the "
                             f"running sequences, found {tuple(tokens.shape)}")
        if rows is not None:
            self._check_rows("decode", host_rows)
        contexts = self.context_lens
        positions = [contexts[r] for r in host_rows]  # the new tokens' positions
        self._check_decode(host_rows, positions)
        if self._replayed is not None:
            logits = self._replayed(tokens, host_rows, positions)
            if logits is not None:
                for row in host_rows:
                    contexts[row] += 1
                return logits
        return self.step(host_rows, tokens)

    def _check_decode(self, rows: list[int], positions: list[int]) -> None:
        """Each running sequence prefilled, with room for one more token."""
        lengths = self.layout.lengths
        if 0 in positions or [r for r, p in zip(rows, positions) if p >= lengths[r]]:
            for row, position in zip(rows, positions):
                if position == 0:
                    raise RuntimeError(f"decode: expected prefilled sequences, found sequence "
                                       f"{row} with an empty context")
                if position >= lengths[row]:
                    raise RuntimeError(f"decode: expected room left, found sequence {row} at "
                                       f"context {position} of {lengths[row]}")

    def _encoder_step(self, rows: list[int], device_rows: torch.Tensor | None,
                      encoder_inputs: Mapping[int, torch.Tensor],
                      metadata: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """The encoder side of a step's metadata (into `metadata`) and forward's encoder inputs:
        the model's (`encoder_step_inputs`) for the rows that start here, concatenated."""
        layout = self.encoder_layout
        if layout is None:
            return ()
        starting = [r for r in rows if r in encoder_inputs]
        _, slots = encoder_step_tensors(layout, starting, self.device)
        counts = [layout.lengths[r] if r in encoder_inputs else 0 for r in rows]
        metadata.update(
            encoder_query_start_loc=(0, *itertools.accumulate(counts)),
            encoder_seq_lens=tuple(layout.lengths[r] for r in rows), encoder_slot_mapping=slots,
            encoder_slot_tables=(layout.tables if device_rows is None
                                 else layout.tables[device_rows]))
        if not starting:
            return self.spec_model.no_encoder_inputs(self.device)
        per_row = [self.spec_model.encoder_step_inputs(encoder_inputs[r].unsqueeze(0))
                   for r in starting]
        return tuple(torch.cat(parts) for parts in zip(*per_row))

    def _check_rows(self, caller: str, rows: list[int]) -> None:
        if len(set(rows)) != len(rows) or (rows and not 0 <= min(rows) <= max(rows) < self.batch):
            raise ValueError(f"{caller}: expected distinct rows in [0, {self.batch}), found "
                             f"{rows}")

    def _check_step(self, rows: list[int], counts: list[int],
                    encoder_input_ids: Mapping[int, torch.Tensor]) -> None:
        self._check_rows("step", rows)
        for row, count in zip(rows, counts):
            room = self.layout.lengths[row] - self.context_lens[row]
            if not 1 <= count <= room:
                raise ValueError(f"step: sequence {row} brings {count} tokens; expected 1 to "
                                 f"{room} (its room left)")
            if self.encoder_lens is None:
                continue
            first = self.context_lens[row] == 0
            given = encoder_input_ids.get(row)
            if first != (given is not None):
                raise ValueError(f"step: sequence {row} of an encoder-decoder session needs "
                                 f"its encoder input on its first step and only then; found "
                                 f"{'none' if given is None else 'one'} at context "
                                 f"{self.context_lens[row]}")
            found = None if given is None else self.spec_model.encoder_length(given.unsqueeze(0))
            if found is not None and found != self.encoder_lens[row]:
                raise ValueError(f"step: sequence {row}: expected {self.encoder_lens[row]} "
                                 f"encoder tokens (the session's encoder_len), found {found}")

    def _step(self, metadata: AttentionMetadata, tokens: torch.Tensor, positions: torch.Tensor,
              encoder_inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with set_forward_context(metadata, self.kv_caches):
            return self.model(tokens, positions, *encoder_inputs)  # (rows, vocab)


def _per_sequence(name: str, value: int | Sequence[int], batch: int) -> list[int]:
    values = [value] * batch if isinstance(value, int) else list(value)
    if len(values) != batch or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                   for v in values):
        raise ValueError(f"{name}: expected an int >= 1 or {batch} of them (one per sequence), "
                         f"found {value!r}")
    return values


def _flatten_tokens(tokens: torch.Tensor | Sequence[torch.Tensor], counts: Sequence[int] | None,
                    rows: int) -> tuple[torch.Tensor, list[int]]:
    if isinstance(tokens, torch.Tensor):
        counts = [1] * rows if counts is None else list(counts)
        if tokens.dim() != 1 or len(counts) != rows or tokens.shape[0] != sum(counts):
            raise ValueError(f"step: expected flat tokens ({sum(counts)},) for {rows} rows "
                             f"bringing {counts}, found {tuple(tokens.shape)}")
        return tokens, counts
    if len(tokens) != rows or any(t.dim() != 1 for t in tokens):
        raise ValueError(f"step: expected one 1-D tensor of tokens per row ({rows}), found "
                         f"{[tuple(t.shape) for t in tokens]}")
    return torch.cat(list(tokens)), [t.shape[0] for t in tokens]
