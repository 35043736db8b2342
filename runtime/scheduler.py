"""Which prompt tokens each generation step carries (chunked prefill).

Without a budget every prompt goes whole into the first step. With `chunk_tokens`, a step
carries at most that many prompt tokens in all, shortest remaining prompt first, so a long
prompt is split over several steps while sequences whose prompt is done decode in the same
steps: one long request cannot stall the others. The tokens do not depend on the split (each
chunk attends to its sequence's cached prefix), only the step count does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens [start, start + count) of sequence `row`; `completes` its prompt."""

    row: int
    start: int
    count: int
    completes: bool


class PrefillPlanner:
    """Hands out each step's prompt chunks until every prompt has been fed."""

    def __init__(self, prompt_lens: Sequence[int], chunk_tokens: int | None) -> None:
        if chunk_tokens is not None and (isinstance(chunk_tokens, bool)
                                         or not isinstance(chunk_tokens, int)
                                         or chunk_tokens < 1):
            raise ValueError(f"prefill_chunk_tokens: expected an int >= 1 or None, found "
                             f"{chunk_tokens!r}")
        self.prompt_lens = tuple(prompt_lens)
        self.chunk_tokens = chunk_tokens
        self._fed = [0] * len(self.prompt_lens)

    @property
    def pending(self) -> bool:
        return any(fed < n for fed, n in zip(self._fed, self.prompt_lens))

    def next_chunks(self) -> list[Chunk]:
        """The chunks of the next step (empty once every prompt is fed)."""
        waiting = [row for row, n in enumerate(self.prompt_lens) if self._fed[row] < n]
        if self.chunk_tokens is None:
            budget = sum(self.prompt_lens[row] - self._fed[row] for row in waiting)
        else:
            budget = self.chunk_tokens
            waiting.sort(key=lambda row: (self.prompt_lens[row] - self._fed[row], row))
        chunks = []
        for row in waiting:
            if budget == 0:
                break
            start, left = self._fed[row], self.prompt_lens[row] - self._fed[row]
            count = min(left, budget)
            chunks.append(Chunk(row, start, count, completes=count == left))
            self._fed[row] += count
            budget -= count
        return chunks
