"""Undo in-place writes that extra runs of a graph make to live tensors.

Some runs of a graph are not calls the user made: FLOP counting and verification at compile
time, warm-ups before a capture, a capture that failed half-way. When the graph writes its
inputs in place (a Hugging Face StaticCache's keys, values and position counter), each such run
would advance the user's state. A snapshot copies the tensors once; `restore()` puts back those
a run wrote (their version counter moved), so every run starts from the state the user left.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


class InputSnapshot:
    """Copies of `tensors`; `restore()` after each run undoes what the run wrote."""

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self._saved = [(tensor, tensor.detach().clone()) for tensor in tensors]
        self._versions = [tensor._version for tensor, _ in self._saved]

    def restore(self) -> int:
        """Copy back every tensor written since the snapshot (or the last restore); how many."""
        restored = 0
        with torch.no_grad():
            for index, (tensor, copy) in enumerate(self._saved):
                if tensor._version != self._versions[index]:
                    tensor.copy_(copy)
                    self._versions[index] = tensor._version
                    restored += 1
        return restored

    @contextmanager
    def restoring(self) -> Iterator[None]:
        """Run the block, then restore (also when it raised)."""
        try:
            yield
        finally:
            self.restore()


def writable_inputs(inputs: Iterable[object]) -> list[torch.Tensor]:
    """The tensors among `inputs` that a graph may write: all but parameters (inference graphs
    do not write them) and inference tensors (nothing outside inference mode can write them)."""
    return [value for value in inputs
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
            and not value.is_inference()]
