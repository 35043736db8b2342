"""Per-step attention metadata, handed to attention ops outside the graph's inputs.

The traced graph sees only token ids and positions; everything that changes from step to step
in a way the graph must not depend on (how tokens group into sequences, which cache slot each
token uses, how long each context is) lives here. A step runs inside
`set_forward_context(metadata, kv_caches)`; each attention op calls `get_forward_context()`.

Token layout is flattened, as in vLLM: the new tokens of sequence i are rows
`query_start_loc[i]:query_start_loc[i + 1]` of the step's inputs. The inputs may carry padding
rows after the last real token (a runner pads to a bucket size); those rows belong to no
sequence, get no cache slot, and the op writes zeros for them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from runtime.kv_cache import LayerKVCache


@dataclass(frozen=True)
class Rotary:
    """RoPE that an attention op applies to its query and key before attending (a
    `fxkiln.rotary_embedding` folded into it): the step's positions `(tokens,)`, the
    `(max_positions, rotary_dim)` table of cos halves then sin halves, and the layout (neox:
    rotate the two halves of the rotary features; else interleaved pairs)."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    is_neox: bool


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go and what they attend to.

    Decoder side (every model):
      query_start_loc: (num_seqs + 1) offsets of each sequence's new tokens in the step's rows.
      seq_lens: (num_seqs) context length of each sequence including this step's tokens.
      slot_mapping: (num_actual_tokens,) int64 cache slot of each new token.
      slot_tables: (num_seqs, max_len) int64 cache slot of each position of each sequence.
    Encoder side (encoder-decoder models; None otherwise):
      encoder_query_start_loc: (num_seqs + 1) offsets of each sequence's encoder tokens in this
        step's encoder rows (all zero on steps that do not run the encoder).
      encoder_seq_lens: (num_seqs) encoder length of each sequence (what cross-attention reads).
      encoder_slot_mapping: (num_actual_encoder_tokens,) cross-attention cache slot of each
        encoder token of this step.
      encoder_slot_tables: (num_seqs, max_encoder_len) cross-attention slot of each encoder position.
    Device copies of the lengths (int32), which kernels that must not read host values use;
    read them through `device_seq_lens()` / `device_encoder_seq_lens()`, which build them from
    the tuples on first use when not given (once per step, and never for steps that need none):
      seq_lens_tensor: (num_seqs,) and encoder_seq_lens_tensor: (num_seqs,).
    `device_query_start_loc()` / `device_encoder_query_start_loc()` do the same for the offsets.
    logits_indices: (rows read,) int64 step rows whose logits the caller reads (the last token
      of each sequence that finishes its prompt or decodes), in the order it reads them; None:
      every row. The LM head computes only these rows (`runtime.logits_rows`); a step that sets
      it never replays a device graph (the graphs were captured computing every row).
    static_decode: the layout lives in static device buffers that a graph reads (a captured
      decode step): every row is one sequence's new token, and a padding row has slot -1 and
      length 0 in the tensors, whatever the host tuples say. Attention must then read the
      tensors only (the host tuples describe the capture, not the replayed steps).
    """

    query_start_loc: tuple[int, ...]
    seq_lens: tuple[int, ...]
    slot_mapping: torch.Tensor
    slot_tables: torch.Tensor
    encoder_query_start_loc: tuple[int, ...] | None = None
    encoder_seq_lens: tuple[int, ...] | None = None
    encoder_slot_mapping: torch.Tensor | None = None
    encoder_slot_tables: torch.Tensor | None = None
    seq_lens_tensor: torch.Tensor | None = None
    encoder_seq_lens_tensor: torch.Tensor | None = None
    static_decode: bool = False
    logits_indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        num_seqs = len(self.seq_lens)
        _check_offsets("query_start_loc", self.query_start_loc, num_seqs)
        for i, (query_len, seq_len) in enumerate(zip(self.query_lens, self.seq_lens)):
            if query_len > seq_len:
                raise ValueError(f"sequence {i}: {query_len} new tokens but seq_lens[{i}] = {seq_len}")
        _check_rows("slot_mapping", self.slot_mapping, self.num_actual_tokens)
        _check_table("slot_tables", self.slot_tables, num_seqs, max(self.seq_lens, default=0))
        if self.logits_indices is not None and (self.logits_indices.dim() != 1
                                                or self.logits_indices.shape[0]
                                                > self.num_actual_tokens):
            raise ValueError(f"logits_indices: expected shape (rows,) with at most "
                             f"{self.num_actual_tokens} rows (the step's tokens), found "
                             f"{tuple(self.logits_indices.shape)}")
        if self.encoder_seq_lens is None:
            return
        if self.encoder_query_start_loc is None or self.encoder_slot_mapping is None \
                or self.encoder_slot_tables is None:
            raise ValueError("encoder_seq_lens given: expected encoder_query_start_loc, "
                             "encoder_slot_mapping and encoder_slot_tables too, found None")
        if len(self.encoder_seq_lens) != num_seqs:
            raise ValueError(f"encoder_seq_lens: expected {num_seqs} entries, "
                             f"found {len(self.encoder_seq_lens)}")
        _check_offsets("encoder_query_start_loc", self.encoder_query_start_loc, num_seqs)
        _check_rows("encoder_slot_mapping", self.encoder_slot_mapping, self.num_actual_encoder_tokens)
        _check_table("encoder_slot_tables", self.encoder_slot_tables, num_seqs,
                     max(self.encoder_seq_lens, default=0))

    def device_seq_lens(self) -> torch.Tensor:
        """`seq_lens` as an int32 tensor on the slot tables' device (built once, then kept)."""
        if self.seq_lens_tensor is None:
            object.__setattr__(self, "seq_lens_tensor",
                               device_ints(self.seq_lens, self.slot_tables.device))
        assert self.seq_lens_tensor is not None
        return self.seq_lens_tensor

    def device_encoder_seq_lens(self) -> torch.Tensor | None:
        """`encoder_seq_lens` likewise; None for models without an encoder."""
        if self.encoder_seq_lens is not None and self.encoder_seq_lens_tensor is None:
            object.__setattr__(self, "encoder_seq_lens_tensor",
                               device_ints(self.encoder_seq_lens, self.slot_tables.device))
        return self.encoder_seq_lens_tensor

    def device_query_start_loc(self) -> torch.Tensor:
        """`query_start_loc` as an int32 tensor on the slot tables' device (built once)."""
        return self._device("_query_start_loc_tensor", self.query_start_loc)

    def device_encoder_query_start_loc(self) -> torch.Tensor | None:
        """`encoder_query_start_loc` likewise; None for models without an encoder."""
        if self.encoder_query_start_loc is None:
            return None
        return self._device("_encoder_query_start_loc_tensor", self.encoder_query_start_loc)

    def _device(self, attribute: str, values: tuple[int, ...]) -> torch.Tensor:
        tensor = self.__dict__.get(attribute)
        if tensor is None:
            tensor = device_ints(values, self.slot_tables.device)
            object.__setattr__(self, attribute, tensor)
        return tensor

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_actual_tokens(self) -> int:
        """Real (unpadded) decoder tokens in this step."""
        return self.query_start_loc[-1]

    @property
    def num_actual_encoder_tokens(self) -> int:
        """Real encoder tokens in this step (0 on decode steps of encoder-decoder models)."""
        return 0 if self.encoder_query_start_loc is None else self.encoder_query_start_loc[-1]

    @property
    def query_lens(self) -> tuple[int, ...]:
        starts = self.query_start_loc
        return tuple(end - start for start, end in zip(starts[:-1], starts[1:]))

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token (a pure decode step)."""
        return all(query_len == 1 for query_len in self.query_lens)


@dataclass(frozen=True)
class ForwardContext:
    """What attention ops read during one forward step."""

    attn_metadata: AttentionMetadata
    kv_caches: Mapping[str, LayerKVCache]


_FORWARD_CONTEXT: ContextVar[ForwardContext | None] = ContextVar("fxkiln_forward_context",
                                                                 default=None)


@contextmanager
def set_forward_context(attn_metadata: AttentionMetadata,
                        kv_caches: Mapping[str, LayerKVCache]) -> Iterator[ForwardContext]:
    """Within the block, attention ops use `attn_metadata` and `kv_caches` (layer name -> cache)."""
    context = ForwardContext(attn_metadata, kv_caches)
    token = _FORWARD_CONTEXT.set(context)
    try:
        yield context
    finally:
        _FORWARD_CONTEXT.reset(token)


def peek_forward_context() -> ForwardContext | None:
    """The active forward context, or None outside `set_forward_context`."""
    return _FORWARD_CONTEXT.get()


def get_forward_context() -> ForwardContext:
    """The active forward context; RuntimeError outside `set_forward_context`."""
    context = _FORWARD_CONTEXT.get()
    if context is None:
        raise RuntimeError("an attention op ran outside set_forward_context(...): expected per-step "
                           "attention metadata and KV caches, found none")
    return context


def device_ints(values: Sequence[int], device: torch.device,
                dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """`values` as a tensor on `device`, copied without blocking the host (from pinned memory
    on CUDA: a plain host tensor would make the copy wait for the device's queued work)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _check_offsets(name: str, offsets: tuple[int, ...], num_seqs: int) -> None:
    if len(offsets) != num_seqs + 1 or offsets[0] != 0:
        raise ValueError(f"{name}: expected {num_seqs + 1} offsets starting at 0, found {offsets}")
    if any(end < start for start, end in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"{name}: expected non-decreasing offsets, found {offsets}")


def _check_rows(name: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.dim() != 1 or tensor.shape[0] != rows:
        raise ValueError(f"{name}: expected shape ({rows},), found {tuple(tensor.shape)}")


def _check_table(name: str, table: torch.Tensor, num_seqs: int, min_len: int) -> None:
    if table.dim() != 2 or table.shape[0] != num_seqs or table.shape[1] < min_len:
        raise ValueError(f"{name}: expected shape ({num_seqs}, >= {min_len}), "
                         f"found {tuple(table.shape)}")
