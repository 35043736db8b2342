"""A bucket runner's token-count buckets: decode sizes, and prefill sizes above them.

A call of n tokens is padded up to the smallest bucket >= n. Decode buckets (`capture_sizes`)
hold the whole forward in their piecewise graphs, the LM head over every row included, and
whole decode steps. Prefill buckets (`prefill_capture_sizes`, those above the largest decode
bucket) serve prefill steps: a forward over many prompt tokens whose logits are read at a few
rows (each prompt's last token), so their graphs stop before the LM head (`runtime.logits_rows`)
and the head runs eagerly on the rows the step reads: an LM head over every padded row of a
2048-token bucket would cost more than all the launches the graphs save. Sizes at or below the
largest decode bucket are decode buckets' business; as prefill sizes they are dropped.
"""
from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Buckets:
    """Sorted, distinct decode and prefill sizes; every prefill size is above every decode one."""

    decode: tuple[int, ...] = ()
    prefill: tuple[int, ...] = ()

    @classmethod
    def of(cls, capture_sizes: Sequence[int], prefill_sizes: Sequence[int] = ()) -> Buckets:
        """Checked and normalized; ValueError naming the argument with a size that is not a
        positive int. No decode size: no buckets at all (nothing is captured)."""
        for name, sizes in (("capture_sizes", capture_sizes),
                            ("prefill_capture_sizes", prefill_sizes)):
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
                raise ValueError(f"{name}: expected positive ints, found {tuple(sizes)!r}")
        decode = tuple(sorted(set(capture_sizes)))
        if not decode:
            return cls()
        return cls(decode, tuple(sorted(s for s in set(prefill_sizes) if s > decode[-1])))

    @functools.cached_property
    def all(self) -> tuple[int, ...]:  # read once per call: kept
        return self.decode + self.prefill

    def for_tokens(self, num_tokens: int) -> int | None:
        """The smallest bucket >= num_tokens; None past the largest."""
        sizes = self.all
        index = bisect.bisect_left(sizes, num_tokens)
        return sizes[index] if index < len(sizes) else None

    def is_prefill(self, bucket: int) -> bool:
        return bool(self.prefill) and bucket >= self.prefill[0]
