"""Where a session's sequences keep their tokens in the KV cache, and one step's layout tensors.

Sequence b of a session owns the contiguous slots [base_b, base_b + length_b): position p in
slot base_b + p. Its row of the slot table lists them (entries past its length repeat its last
slot: never read, since attention reads a sequence's first seq_len entries only). Sequences of
equal length get the layout `b * length + p`, the one `uniform_batch_metadata` builds.

`StepTensors` builds what one step of any shape needs on the device (every token's position
and cache slot, the rows of the sequences it runs, which rows' logits are read) from host
integers with one host-to-device copy.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class SlotLayout:
    """Contiguous cache regions of `lengths[b]` slots for each sequence b, on `device`."""

    def __init__(self, lengths: Sequence[int], device: torch.device) -> None:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"slot layout: expected one length >= 1 per sequence, found "
                             f"{list(lengths)}")
        self.lengths = tuple(lengths)
        self.bases = tuple(itertools.accumulate(self.lengths, initial=0))[:-1]
        self.num_slots = sum(self.lengths)
        self.max_len = max(self.lengths)
        self.uniform = len(set(self.lengths)) == 1
        positions = torch.arange(self.max_len)                             # (max_len,)
        lengths_tensor = torch.tensor(self.lengths)
        tables = torch.tensor(self.bases)[:, None] + torch.minimum(
            positions[None, :], lengths_tensor[:, None] - 1)              # (batch, max_len)
        self.tables = tables.to(device)


@dataclass(frozen=True)
class StepTensors:
    """Device tensors of one step: `positions` and `slots` (tokens,), `rows` (sequences,) or
    None when the step runs every sequence in order, `logits_indices` (rows read,) or None."""

    positions: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor | None
    logits_indices: torch.Tensor | None


def step_tensors(layout: SlotLayout, rows: Sequence[int], first_positions: Sequence[int],
                 counts: Sequence[int], device: torch.device, *, all_rows: bool = False,
                 logits_indices: Sequence[int] | None = None) -> StepTensors:
    """Sequence rows[i] brings counts[i] tokens at positions first_positions[i] onwards.

    all_rows: the step runs every sequence of the layout, in order (no row index needed).
    logits_indices: the step rows whose logits are read (None: every row).
    """
    bases = [layout.bases[r] for r in rows]
    positions = _runs(first_positions, counts, [0] * len(rows))           # (tokens,)
    slots = _runs(first_positions, counts, bases)                         # (tokens,)
    parts = [positions, slots]                                           # each (tokens,)
    if not all_rows:
        parts.append(torch.tensor(rows, dtype=torch.long))
    if logits_indices is not None:
        parts.append(torch.tensor(logits_indices, dtype=torch.long))
    host = torch.cat(parts)
    if device.type == "cuda":
        host = host.pin_memory()
    on_device = list(host.to(device, non_blocking=True).split([p.shape[0] for p in parts]))
    rows_tensor = None if all_rows else on_device[2]
    indices = on_device[-1] if logits_indices is not None else None
    return StepTensors(on_device[0], on_device[1], rows_tensor, indices)


def _runs(firsts: Sequence[int], counts: Sequence[int], offsets: Sequence[int]) -> torch.Tensor:
    """offsets[i] + firsts[i] + j for j < counts[i], row after row, as one int64 tensor.

    Built from one arange per row of several tokens and one tensor per run of one-token rows
    (decode rows): no `repeat_interleave`, which on CPU wakes the whole thread pool for any
    size (1.5-6 ms for an 8 x 1024-token prefill step on a 16-core host).
    """
    pieces: list[torch.Tensor] = []
    singles: list[int] = []
    for first, count, offset in zip(firsts, counts, offsets):
        if count == 1:
            singles.append(offset + first)
            continue
        if singles:
            pieces.append(torch.tensor(singles, dtype=torch.long))
            singles = []
        pieces.append(torch.arange(offset + first, offset + first + count))
    if singles:
        pieces.append(torch.tensor(singles, dtype=torch.long))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def encoder_step_tensors(layout: SlotLayout, rows: Sequence[int], device: torch.device,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, slots) on `device` of the whole encoder input of each sequence in `rows`."""
    if not rows:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    tensors = step_tensors(layout, rows, [0] * len(rows), [layout.lengths[r] for r in rows],
                           device, all_rows=True)
    return tensors.positions, tensors.slots
