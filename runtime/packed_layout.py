"""A captured decode step's per-step layout in one device buffer, written by one host copy.

What changes from one decode step to the next (each row's cache slot, position and context
length; for encoder-decoder models each row's encoder length) is small: a few integers per
row. Copying each piece separately costs a device op (5-10 us of host time on CUDA) apiece, so
the pieces live side by side in one int32 device buffer whose views the graph reads:

    words [0, 2m)   slot_mapping      int64 (m,)  the cache slot each row writes (-1: padding)
    words [2m, 4m)  positions         int64 (m,)  each row's position (the graph's input)
    words [4m, 5m)  seq_lens          int32 (m,)  context length with this step's token (0: pad)
    words [5m, 6m)  encoder_seq_lens  int32 (m,)  encoder length (0: padding)

The host writes a step's values into a host buffer of the same layout through ctypes arrays
over its memory (no torch op, no numpy) and `upload()` copies the whole buffer with one
non-blocking copy. On CUDA the host buffers are pinned and used in a ring of `RING_DEPTH`: each
is written again only after the copy that read it has run (a CUDA event), so the host may run
up to that many steps ahead of the device without overwriting a copy still in flight (past
that it waits: back-pressure, no more). On other devices the copy is synchronous and one host
buffer serves.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch

RING_DEPTH = 8


@dataclass(frozen=True)
class LayoutViews:
    """Views of one packed layout buffer: device tensors, or ctypes arrays over a host buffer
    (slice assignment from a list of ints writes them)."""

    slot_mapping: Any
    positions: Any
    seq_lens: Any
    encoder_seq_lens: Any


def _device_views(words: torch.Tensor, rows: int) -> LayoutViews:
    return LayoutViews(slot_mapping=words[:2 * rows].view(torch.int64),
                       positions=words[2 * rows:4 * rows].view(torch.int64),
                       seq_lens=words[4 * rows:5 * rows], encoder_seq_lens=words[5 * rows:])


def _host_views(words: torch.Tensor, rows: int) -> LayoutViews:
    """ctypes arrays over a contiguous int32 CPU tensor that outlives them."""
    address = words.data_ptr()
    wide, narrow = ctypes.c_int64 * rows, ctypes.c_int32 * rows
    return LayoutViews(slot_mapping=wide.from_address(address),
                       positions=wide.from_address(address + 8 * rows),
                       seq_lens=narrow.from_address(address + 16 * rows),
                       encoder_seq_lens=narrow.from_address(address + 20 * rows))


class PackedLayout:
    """The device buffer of `rows` rows (`device` views) and its host staging (`take()`)."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.buffer = torch.zeros(6 * rows, dtype=torch.int32, device=device)
        self.device = _device_views(self.buffer, rows)
        self.device.slot_mapping.fill_(-1)
        cuda = device.type == "cuda"
        self._hosts = [torch.zeros(6 * rows, dtype=torch.int32, pin_memory=cuda)
                       for _ in range(RING_DEPTH if cuda else 1)]
        self._host_views = [_host_views(host, rows) for host in self._hosts]
        for views in self._host_views:
            views.slot_mapping[:] = [-1] * rows
        self._events = [torch.cuda.Event() for _ in self._hosts] if cuda else None
        self._next = 0

    def take(self) -> LayoutViews:
        """The host buffer to write the next step into; then call `upload()`."""
        if self._events is not None:
            event = self._events[self._next]
            if not event.query():  # the device is RING_DEPTH copies behind: wait for one
                event.synchronize()
        return self._host_views[self._next]

    def upload(self) -> None:
        """Copy the host buffer last taken into the device buffer (one non-blocking copy)."""
        index = self._next
        self.buffer.copy_(self._hosts[index], non_blocking=True)
        if self._events is not None:
            self._events[index].record()
        self._next = (index + 1) % len(self._hosts)
