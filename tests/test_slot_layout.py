"""The slot layout of a session and one step's layout tensors, against a plain construction."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from runtime.slot_layout import SlotLayout, step_tensors


@st.composite
def steps(draw: st.DrawFn) -> tuple[list[int], list[int], list[int], list[int]]:
    """(sequence lengths, rows of the step, first positions, token counts) that fit."""
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    rows = draw(st.permutations(range(len(lengths))))[:draw(st.integers(1, len(lengths)))]
    firsts, counts = [], []
    for row in rows:
        first = draw(st.integers(0, lengths[row] - 1))
        firsts.append(first)
        counts.append(draw(st.integers(1, lengths[row] - first)))
    return lengths, list(rows), firsts, counts


@settings(max_examples=60, deadline=None)
@given(steps())
def test_step_tensors_give_each_token_its_position_and_slot(case) -> None:
    lengths, rows, firsts, counts = case
    layout = SlotLayout(lengths, torch.device("cpu"))
    read = list(range(0, len(rows), 2))
    tensors = step_tensors(layout, rows, firsts, counts, torch.device("cpu"),
                           logits_indices=read)
    positions = [p for first, count in zip(firsts, counts) for p in range(first, first + count)]
    bases = [sum(lengths[:row]) for row in rows]
    slots = [base + p for base, first, count in zip(bases, firsts, counts)
             for p in range(first, first + count)]
    assert tensors.positions.tolist() == positions
    assert tensors.slots.tolist() == slots
    assert tensors.rows is not None and tensors.rows.tolist() == rows
    assert tensors.logits_indices is not None and tensors.logits_indices.tolist() == read
    assert tensors.positions.dtype == tensors.slots.dtype == torch.long
    # the slot table agrees: position p of sequence b is in slot tables[b, p]
    for row, first, count in zip(rows, firsts, counts):
        assert layout.tables[row, first:first + count].tolist() == \
            [sum(lengths[:row]) + p for p in range(first, first + count)]
