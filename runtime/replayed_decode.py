"""A session's decode steps as whole-step graph replays, with only the host work each needs.

A `DecodeSession` on a compiled model's own KV caches (`static_decode`, leased to the session
while it lives) can run each decode step (one token per running sequence) as one replay of a
whole-step graph (`runtime.whole_step.WholeStepGraphs.decode`) instead of through the model's
forward: positions and cache slots come from the session's context lengths and `SlotLayout`
on the host (no device op), and the running sequences' slot tables are gathered once per set of
running rows (`RunningTables`), which the graphs' buffers then keep until the set changes.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from runtime.forward_context import device_ints
from runtime.kv_cache import AttentionSpec, LayerKVCache, allocate_kv_caches
from runtime.slot_layout import SlotLayout
from runtime.static_decode import RunningTables
from runtime.whole_step import WholeStepGraphs


def session_caches(session: object, model: Any, specs: dict[str, AttentionSpec],
                   dtype: torch.dtype, device: torch.device, layout: SlotLayout,
                   encoder_layout: SlotLayout | None,
                   ) -> tuple[dict[str, LayerKVCache], ReplayedDecode | None]:
    """The compiled model's own KV caches (`model.static_decode`, leased to `session` until it
    is garbage) when they are free and large enough, with the decode fast path over them when
    the model has whole-step graphs; else fresh caches and no fast path."""
    state = getattr(model, "static_decode", None)
    encoder_slots = 0 if encoder_layout is None else encoder_layout.num_slots
    encoder_len = 0 if encoder_layout is None else encoder_layout.max_len
    if state is not None and state.fits(layout.num_slots, layout.max_len, encoder_slots,
                                        encoder_len, dtype, device) and state.acquire():
        weakref.finalize(session, state.release)
        graphs = getattr(model, "whole_step_graphs", None)
        fast = (ReplayedDecode(graphs, layout, encoder_layout)
                if isinstance(graphs, WholeStepGraphs) and graphs.state is state else None)
        return state.kv_caches, fast
    return allocate_kv_caches(specs, layout.num_slots, encoder_slots, dtype, device), None


class ReplayedDecode:
    """Decode steps of one session's sequences (`layout`, `encoder_layout`) through `graphs`."""

    def __init__(self, graphs: WholeStepGraphs, layout: SlotLayout,
                 encoder_layout: SlotLayout | None) -> None:
        self._graphs = graphs
        self._layout, self._encoder_layout = layout, encoder_layout
        self._rows: list[int] = []
        self._running: RunningTables | None = None

    def __call__(self, tokens: torch.Tensor, rows: list[int], positions: list[int]
                 ) -> torch.Tensor | None:
        """Logits (running, vocab) of a step in which sequence rows[i] brings tokens[i] at
        positions[i] (room checked by the caller); None when no graph serves it (nothing was
        written)."""
        if rows != self._rows or self._running is None:
            self._rows, self._running = list(rows), self._running_tables(rows)
        bases = self._layout.bases
        slots = [bases[row] + position for row, position in zip(rows, positions)]
        return self._graphs.decode(tokens, positions, slots, self._running)

    def _running_tables(self, rows: list[int]) -> RunningTables:
        tables = self._layout.tables                                       # (batch, max_len)
        encoder = self._encoder_layout
        encoder_tables = None if encoder is None else encoder.tables
        if rows != list(range(len(self._layout.lengths))):
            index = device_ints(rows, tables.device, torch.long)
            tables = tables[index]                                         # (running, max_len)
            encoder_tables = None if encoder_tables is None else encoder_tables[index]
        return RunningTables(tables, encoder_tables,
                             None if encoder is None else [encoder.lengths[r] for r in rows])
