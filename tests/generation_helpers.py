"""Token bookkeeping for the generation tests: where EOS ids would stop an EOS-free run."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch


def finish_steps(tokens: torch.Tensor, eos_ids: Sequence[int]) -> list[int | None]:
    """Per row of `tokens` (batch, steps): the first step that emits one of `eos_ids`, or None."""
    steps: list[int | None] = []
    for row in tokens.tolist():
        hits = [step for step, token in enumerate(row) if token in eos_ids]
        steps.append(hits[0] if hits else None)
    return steps


def finish_at_eos(tokens: torch.Tensor, eos_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """What generation stopping at `eos_ids` must return, given the same run without EOS: each
    row padded after its first EOS, and the steps cut after the last row finishes."""
    steps = finish_steps(tokens, eos_ids)
    expected = tokens.clone()
    for row, step in enumerate(steps):
        if step is not None:
            expected[row, step + 1:] = pad_token_id
    if all(step is not None for step in steps):
        expected = expected[:, :max(s for s in steps if s is not None) + 1]
    return expected


def staggered_eos(tokens: torch.Tensor, max_ids: int = 2) -> list[int]:
    """EOS ids, taken from an EOS-free run's tokens, under which rows finish at as many different
    steps as possible while at least one row never finishes (so the batch shrinks, more than
    once when it can, and decoding goes on for the survivors)."""
    candidates = sorted(set(tokens.flatten().tolist()))
    best: tuple[int, list[int]] = (-1, [])
    for size in range(1, max_ids + 1):
        for ids in itertools.combinations(candidates, size):
            steps = finish_steps(tokens, ids)
            if all(step is not None for step in steps):
                continue
            spread = len({step for step in steps if step is not None})
            if spread > best[0]:
                best = (spread, list(ids))
    return best[1]


class RecordingModel:
    """Calls `forward` and records each call's decoder and encoder token counts; looks like a
    compiled model to `generate` (the project model is `.model`)."""

    def __init__(self, model: Any, forward: Callable[..., torch.Tensor] | None = None) -> None:
        self.model = model
        self.forward = forward if forward is not None else model
        self.calls: list[tuple[int, int]] = []   # (decoder tokens, encoder tokens) per call

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        encoder_tokens = inputs[2].shape[0] if len(inputs) > 2 else 0
        self.calls.append((inputs[0].shape[0], encoder_tokens))
        return self.forward(*inputs)
