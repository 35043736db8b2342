"""Static decode state: the KV caches and metadata buffers a captured decode step reads.

A decode step captured as one device graph (attention included) bakes in the addresses of every
tensor its kernels touch: the KV caches, and the buffers that say which slot each token writes,
which slots each sequence reads and how long each context is. This module owns those tensors
for a runner. Before each replay, `load` copies the step's layout (from the
`AttentionMetadata` the generation loop built) into the buffers: rows past the step's sequences
get slot -1 and length 0, which the graph-safe attention kernels treat as padding. Generation
loops use the runner's caches through `acquire`/`release` (one user at a time); a step whose
layout does not fit the buffers, or that runs on other caches, is simply not replayed as a whole
(the runner falls back to its piecewise graphs).

A runner builds its state from a `KVCachePlan` once its piecewise graphs are captured: the
plan's slot count, or for "auto" one sized by a profiling forward (`runtime.memory`).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from runtime.forward_context import AttentionMetadata, ForwardContext, set_forward_context
from runtime.kv_cache import AttentionSpec, LayerKVCache, allocate_kv_caches
from runtime.memory import AUTO, CPU_KV_CACHE_TOKENS, MemoryProfile, profiled_kv_cache_tokens


class StaticDecodeState:
    """KV caches of `num_slots` (and `num_encoder_slots`) slots plus per-step layout buffers for
    up to `max_seqs` sequences of up to `max_len` positions (`max_encoder_len` encoder ones)."""

    def __init__(self, specs: Mapping[str, AttentionSpec], dtype: torch.dtype,
                 device: torch.device | str, *, max_seqs: int, num_slots: int, max_len: int,
                 num_encoder_slots: int = 0, max_encoder_len: int = 0) -> None:
        if min(max_seqs, num_slots, max_len) < 1:
            raise ValueError(f"static decode state: expected max_seqs, num_slots and max_len "
                             f">= 1, found {max_seqs}, {num_slots}, {max_len}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_seqs, self.num_slots, self.max_len = max_seqs, num_slots, max_len
        self.num_encoder_slots, self.max_encoder_len = num_encoder_slots, max_encoder_len
        self.kv_caches: dict[str, LayerKVCache] = allocate_kv_caches(
            specs, num_slots, num_encoder_slots, dtype, self.device)
        on = dict(device=self.device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, **on)
        self.slot_mapping = torch.full((max_seqs,), -1, dtype=torch.long, **on)
        self.slot_tables = torch.zeros(max_seqs, max_len, dtype=torch.int32, **on)
        self.encoder = num_encoder_slots > 0
        self.encoder_seq_lens = torch.zeros(max_seqs, dtype=torch.int32, **on)
        self.encoder_slot_tables = torch.zeros(max_seqs, max(max_encoder_len, 1),
                                               dtype=torch.int32, **on)
        self._no_slots = torch.empty(0, dtype=torch.long, **on)
        self._lock = threading.Lock()
        self._leased = False

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV caches (K and V of every cached layer)."""
        return sum(t.numel() * t.element_size() for cache in self.kv_caches.values()
                   for t in (cache.key, cache.value) if t is not None)

    # -- capture ----------------------------------------------------------------------------
    def capture_context(self, rows: int) -> AbstractContextManager[object]:
        """The forward context of a captured decode step of `rows` token rows: every row reads
        the buffers. Lengths 0 and slots -1 meanwhile, so capture writes no cache slot."""
        self._pad(0, rows)
        return set_forward_context(self._static_metadata(rows), self.kv_caches)

    def _static_metadata(self, rows: int) -> AttentionMetadata:
        encoder = dict(encoder_query_start_loc=(0,) * (rows + 1), encoder_seq_lens=(1,) * rows,
                       encoder_slot_mapping=self._no_slots,
                       encoder_slot_tables=self.encoder_slot_tables[:rows],
                       encoder_seq_lens_tensor=self.encoder_seq_lens[:rows]) if self.encoder else {}
        return AttentionMetadata(
            query_start_loc=tuple(range(rows + 1)), seq_lens=(1,) * rows,
            slot_mapping=self.slot_mapping[:rows], slot_tables=self.slot_tables[:rows],
            seq_lens_tensor=self.seq_lens[:rows], static_decode=True, **encoder)

    # -- each replayed step -----------------------------------------------------------------
    def serves(self, context: ForwardContext | None, rows: int) -> bool:
        """Whether a step run in `context` uses these caches and, padded to `rows` rows, can
        replay a captured decode step."""
        return context is not None and context.kv_caches is self.kv_caches \
            and self.accepts(context.attn_metadata, rows)

    def accepts(self, meta: AttentionMetadata, rows: int) -> bool:
        """Whether a step with `meta`, padded to `rows` rows, can replay a captured decode step."""
        if meta.static_decode or not meta.is_decode or meta.num_seqs > rows \
                or meta.num_actual_encoder_tokens or meta.slot_tables.shape[1] > self.max_len \
                or meta.logits_indices is not None:
            return False
        if not self.encoder:
            return meta.encoder_slot_tables is None
        return meta.encoder_slot_tables is not None \
            and meta.encoder_slot_tables.shape[1] <= self.max_encoder_len

    def load(self, meta: AttentionMetadata, rows: int) -> None:
        """Copy the step's layout into the buffers (call `accepts` first)."""
        n = meta.num_seqs
        self.seq_lens[:n].copy_(meta.device_seq_lens(), non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_tables[:n, :meta.slot_tables.shape[1]].copy_(meta.slot_tables,
                                                               non_blocking=True)
        if self.encoder:
            assert meta.encoder_slot_tables is not None
            self.encoder_seq_lens[:n].copy_(meta.device_encoder_seq_lens(), non_blocking=True)
            self.encoder_slot_tables[:n, :meta.encoder_slot_tables.shape[1]].copy_(
                meta.encoder_slot_tables, non_blocking=True)
        self._pad(n, rows)

    def _pad(self, start: int, rows: int) -> None:
        if start < rows:
            self.seq_lens[start:rows].zero_()
            self.slot_mapping[start:rows].fill_(-1)
            if self.encoder:
                self.encoder_seq_lens[start:rows].zero_()

    # -- who uses the caches ----------------------------------------------------------------
    def fits(self, num_slots: int, max_len: int, num_encoder_slots: int = 0,
             max_encoder_len: int = 0, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> bool:
        """Whether a generation of this size can use these caches and buffers."""
        return (num_slots <= self.num_slots and max_len <= self.max_len
                and num_encoder_slots <= self.num_encoder_slots
                and max_encoder_len <= self.max_encoder_len
                and (dtype is None or dtype == self.dtype)
                and (device is None or _same_device(torch.device(device), self.device)))

    def acquire(self) -> bool:
        """Lease the caches to one generation; False when another one holds them."""
        with self._lock:
            if self._leased:
                return False
            self._leased = True
            return True

    def release(self) -> None:
        with self._lock:
            self._leased = False


@dataclass(frozen=True)
class KVCachePlan:
    """How a runner gets its own KV caches: `tokens` slots, or "auto"; each slot costs
    `bytes_per_token`; `build(slots)` makes the state (caches and layout buffers)."""

    tokens: int | str
    bytes_per_token: int
    build: Callable[[int], StaticDecodeState]

    def slots(self, profile: Callable[[], MemoryProfile] | None,
              memory_utilization: float) -> int:
        """The slot count: `tokens` as given; "auto" sized from `profile()` (a profiling run),
        or the fixed CPU_KV_CACHE_TOKENS on a device that does not profile (`profile` None)."""
        if self.tokens != AUTO:
            assert isinstance(self.tokens, int), self.tokens
            return self.tokens
        if profile is None:
            return CPU_KV_CACHE_TOKENS
        return profiled_kv_cache_tokens(profile(), self.bytes_per_token, memory_utilization)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """"cuda" and "cuda:0" are one device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or (a.index is not None and b.index is not None):
        return a.index == b.index
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
