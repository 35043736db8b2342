"""One step's attention metadata for sequences of equal length, from their slot tables.

`step_metadata` lays out a step in which every sequence brings the same number of tokens and
reaches the same context (a decode step of equal-length prompts, or a capture step);
`uniform_batch_metadata` also builds the slot tables (sequence b keeps position p in slot
`b * max_len + p`). `runtime.session.DecodeSession.step` builds the metadata of steps of any
shape.
"""
from __future__ import annotations

from typing import Any

import torch

from runtime.forward_context import AttentionMetadata


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
