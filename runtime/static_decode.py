"""Static decode state: the KV caches and metadata buffers a captured decode step reads.

A decode step captured as one device graph (attention included) bakes in the addresses of every
tensor its kernels touch: the KV caches, the token ids and positions it reads, and the buffers
that say which slot each token writes, which slots each sequence reads and how long each context
is. This module owns those tensors for a runner. Before each replay the step's layout goes into
the buffers: rows past the step's sequences get slot -1 and length 0, which the graph-safe
attention kernels treat as padding. Slots, positions and lengths live in one packed buffer
(`runtime.packed_layout`), written by one copy per step; the slot tables change only when the
set of running sequences does, so they are copied only then (`RunningTables`).

Two ways in: `stage` (the decode fast path: a session hands host integers and its
`RunningTables`) and `load` (any decode step's `AttentionMetadata`, with its tensors).
Generation loops use the runner's caches through `acquire`/`release` (one user at a time); a
step whose layout does not fit the buffers, or that runs on other caches, is simply not
replayed as a whole (the runner falls back to its piecewise graphs).

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
from runtime.packed_layout import PackedLayout


@dataclass(frozen=True, eq=False)
class RunningTables:
    """The slot tables of the sequences a decode step runs, in step order, and their encoder
    lengths: a session makes one per set of running rows. The state copies them into its
    buffers only when handed another object than the one it loaded last (compared by
    identity: it holds that one, so its identity cannot be reused)."""

    slot_tables: torch.Tensor                  # (running, max_len)
    encoder_slot_tables: torch.Tensor | None   # (running, max_encoder_len)
    encoder_lens: list[int] | None             # (running,)


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
        self.layout = PackedLayout(max_seqs, self.device)
        packed = self.layout.device
        self.slot_mapping, self.positions = packed.slot_mapping, packed.positions
        self.seq_lens, self.encoder_seq_lens = packed.seq_lens, packed.encoder_seq_lens
        self.input_ids = torch.zeros(max_seqs, dtype=torch.long, **on)
        self.slot_tables = torch.zeros(max_seqs, max_len, dtype=torch.int32, **on)
        self.encoder = num_encoder_slots > 0
        self.encoder_slot_tables = torch.zeros(max_seqs, max(max_encoder_len, 1),
                                               dtype=torch.int32, **on)
        self._no_slots = torch.empty(0, dtype=torch.long, **on)
        self._loaded_tables: RunningTables | None = None
        self._staged: tuple[object, ...] | None = None  # what stage() last uploaded; None: other
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
        self._clear(rows)
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

    def stage(self, running: RunningTables, positions: list[int], slots: list[int],
              rows: int) -> None:
        """The fast path's layout: running sequence i is at `positions[i]` and writes cache
        slot `slots[i]`; rows up to `rows` past them are padding. One copy (none when the
        buffers hold this layout already, staged last: `WholeStepGraphs.decode` stages its
        guess of the next step's behind each replay), plus the tables when `running` is not the
        set loaded last. Token ids: write `input_ids` yourself."""
        staged = (rows, *positions, None, *slots, None, running.encoder_lens)
        if staged != self._staged:
            n = len(positions)
            host = self.layout.take()
            pad = rows - n
            host.positions[:rows] = positions + [0] * pad
            host.slot_mapping[:rows] = slots + [-1] * pad
            host.seq_lens[:rows] = [p + 1 for p in positions] + [0] * pad
            if running.encoder_lens is not None:
                host.encoder_seq_lens[:rows] = running.encoder_lens + [0] * pad
            self.layout.upload()
            self._staged = staged
        if running is not self._loaded_tables:
            self._load_tables(running.slot_tables, running.encoder_slot_tables)
            self._loaded_tables = running

    def load(self, meta: AttentionMetadata, rows: int, input_ids: torch.Tensor,
             positions: torch.Tensor) -> None:
        """Copy any decode step's layout, token ids and positions into the buffers (call
        `accepts` first)."""
        n = meta.num_seqs
        self._staged = None
        host = self.layout.take()
        pad = rows - n
        host.positions[n:rows] = [0] * pad
        host.slot_mapping[n:rows] = [-1] * pad
        host.seq_lens[:rows] = list(meta.seq_lens) + [0] * pad
        if self.encoder:
            assert meta.encoder_seq_lens is not None
            host.encoder_seq_lens[:rows] = list(meta.encoder_seq_lens) + [0] * pad
        self.layout.upload()
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self._load_tables(meta.slot_tables, meta.encoder_slot_tables)
        self._loaded_tables = None

    def _load_tables(self, tables: torch.Tensor, encoder_tables: torch.Tensor | None) -> None:
        n = tables.shape[0]
        self.slot_tables[:n, :tables.shape[1]].copy_(tables, non_blocking=True)
        if self.encoder:
            assert encoder_tables is not None
            self.encoder_slot_tables[:n, :encoder_tables.shape[1]].copy_(encoder_tables,
                                                                         non_blocking=True)

    def _clear(self, rows: int) -> None:
        """Rows [0, rows) as padding: length 0, slot -1 (the steps load over them)."""
        self._staged = None
        self.seq_lens[:rows].zero_()
        self.slot_mapping[:rows].fill_(-1)
        if self.encoder:
            self.encoder_seq_lens[:rows].zero_()

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
    `bytes_per_token`; `build(slots)` makes the state (caches and layout buffers). Whole-step
    graphs read the state's token ids and positions in place of forward's inputs
    `input_ids_index` and `positions_index`."""

    tokens: int | str
    bytes_per_token: int
    build: Callable[[int], StaticDecodeState]
    input_ids_index: int = 0
    positions_index: int = 1

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
