"""Graph-safe Triton decode attention: the launch plan and the launchers.

One program per (sequence, KV head, split) handles the KV head's whole query group, so with
grouped-query attention each cached K/V row is read once per group, not once per query head.
At small batch the context is split over several programs (flash-decoding) and a small reduce
kernel combines their partials, or (`DecodePlan.fuse_reduce`, one launch) the split program
that arrives last at a per-(sequence, KV head) counter does; the number of splits is fixed per
launch shape, and each split's range is computed in the kernel from the device length, so a
captured graph stays valid for any context. Decoder self-attention writes this step's K/V into
the cache inside the same kernel (`DecodePlan.fuse_write`).

The plan is a pure function of static facts: the layer's spec, the launch's row count (a
captured graph's bucket: every capture freezes its plan), the dtype and the device's
multiprocessor count (read once per device). It reads no settings. `DECODE_TUNING` holds the
chosen launch parameters per head size; `benchmarks/kernels.py` sweeps them on the GPU.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from runtime.forward_context import AttentionMetadata, Rotary
from runtime.kernels import attention_jit, triton_kernels
from runtime.kernels.triton_kernels import _next_power_of_2, device_processors
from runtime.kv_cache import AttentionKind, AttentionSpec, LayerKVCache

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class DecodeTuning:
    """Launch parameters of the decode kernels for one head size."""

    block_n: int              # cached positions per loop iteration
    num_warps: int
    programs_per_processor: int  # split until rows * kv_heads * splits reaches this many per SM
    max_splits: int
    fuse_write: bool = True   # write the step's K/V inside the attention kernel
    min_block_g: int = 16     # query heads per program padded to at least this (tensor cores)
    # split: the last split program combines (no reduce launch). Off: on the H200
    # (results/decode_attention_ab-cuda.json, from what is now `benchmarks/decode_ab.py
    # --switch fuse_reduce`; Llama-1B batch 1, context 256, one process) the in-kernel combine
    # saved its 16 launches but its serial tail cost more: 0.979 ms of kernels and a 1.075 ms
    # step against 0.912 ms and 1.062 ms with the reduce launch.
    fuse_reduce: bool = False


# Provisional, from first principles (one to two K/V tiles of 8 KB per iteration, two waves of
# programs on the device); to be replaced by the sweep of benchmarks/kernels.py on the H200.
DEFAULT_TUNING = DecodeTuning(block_n=64, num_warps=4, programs_per_processor=2, max_splits=32)
# Head size 128 takes 8 warps: with 4, its K/V tiles of 32 or more positions spill registers
# (ptxas for sm_90: 255 registers and a stack frame; 8 warps: 186 registers, no stack).
# Measured (benchmarks/kernels.py on an H200, 2026-12-01, results/kernels-cuda.json): head size
# 64 at 4 programs per SM; head size 128 at 8 per SM and up to 64 splits (the sweep's 4 warps
# spill registers at these tiles, so it keeps 8, the sweep's choice at long contexts).
DECODE_TUNING: dict[int, DecodeTuning] = {
    64: DecodeTuning(block_n=64, num_warps=4, programs_per_processor=4, max_splits=32),
    128: DecodeTuning(block_n=32, num_warps=8, programs_per_processor=8, max_splits=64),
}


@dataclass(frozen=True)
class DecodePlan:
    """How one decode launch runs (all compile-time constants of the kernels)."""

    splits: int
    block_n: int
    num_warps: int
    block_g: int       # query heads per program, the group padded to a power of two
    block_d: int       # head size, padded to a power of two (>= 16)
    fuse_write: bool
    fuse_reduce: bool = True  # splits > 1: combine in the last-arriving split, not a 2nd launch


@functools.cache
def decode_plan(spec: AttentionSpec, rows: int, processors: int,
                tuning: DecodeTuning | None = None) -> DecodePlan:
    """The plan for `rows` decode rows of a layer with `spec` on a device of `processors` SMs:
    the largest power-of-two split count whose grid stays within the tuning's programs per SM
    (at least one split, at most `max_splits`)."""
    tuning = tuning or DECODE_TUNING.get(spec.head_size, DEFAULT_TUNING)
    programs = max(rows * spec.num_kv_heads, 1)
    wanted = min(processors * tuning.programs_per_processor // programs, tuning.max_splits)
    splits = 1 << (max(wanted, 1).bit_length() - 1)  # a power of two, at most what fills it
    return DecodePlan(splits=splits, block_n=tuning.block_n,
                      num_warps=tuning.num_warps,
                      block_g=max(tuning.min_block_g,
                                  _next_power_of_2(spec.num_heads // spec.num_kv_heads)),
                      block_d=max(16, _next_power_of_2(spec.head_size)),
                      fuse_write=tuning.fuse_write, fuse_reduce=tuning.fuse_reduce)


def decode_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                output: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                rotary: Rotary | None = None) -> None:
    """A decode step of a cached (decoder or cross) attention layer, graph-safe.

    Static (captured) layouts run every row, padding rows included (length 0: zero rows); other
    steps run the real sequences and zero the rows past them. `rotary`: rotate query and key
    first, inside the attention kernel where it writes the cache itself (decoder
    self-attention, `fuse_write`), else by the rotary kernel before it.
    """
    spec = cache.spec
    rows = query.shape[0] if meta.static_decode else meta.num_seqs
    if not meta.static_decode:
        output[rows:].zero_()  # padding rows
    if rows == 0:
        return
    plan = decode_plan(spec, rows, device_processors(query.device))
    if rotary is not None and not (spec.kind is AttentionKind.DECODER and plan.fuse_write):
        query, key = rotate(query, key, rotary, spec.head_size)
        rotary = None
    slots = None
    if spec.kind is AttentionKind.DECODER:
        slots = meta.slot_mapping[:rows]
        tables, lengths = meta.slot_tables, meta.device_seq_lens()
        if not plan.fuse_write:
            write_kv(cache, key, value, slots)
            slots = None
    else:
        tables, lengths = meta.encoder_slot_tables, meta.device_encoder_seq_lens()
    assert tables is not None and lengths is not None
    launch_decode(query, key, value, output, cache, tables, lengths, slots, rows, plan, rotary)


def rotate(query: torch.Tensor, key: torch.Tensor, rotary: Rotary,
           head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """query and key rotated by `rotary` through the rotary kernel (a launch of its own)."""
    args = (rotary.positions[:query.shape[0]], query, key, rotary.cos_sin_cache, head_size,
            rotary.is_neox)
    return triton_kernels.rotary_embedding(*args, *triton_kernels.rotary_embedding_constants(
        *args))


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """`x` as (rows, features) with a contiguous last dimension (a view when it already is)."""
    x = x.reshape(x.shape[0], -1)
    return x if x.stride(-1) == 1 else x.contiguous()


def write_kv(cache: LayerKVCache, key: torch.Tensor, value: torch.Tensor,
             slots: torch.Tensor) -> None:
    """cache[slots[i]] = key[i], value[i] for each row (slot -1: nothing), one program a row."""
    assert cache.key is not None and cache.value is not None
    rows = slots.shape[0]
    if rows == 0:
        return
    key, value = rows_contiguous(key[:rows]), rows_contiguous(value[:rows])
    row = cache.key.shape[1] * cache.key.shape[2]
    attention_jit.write_kv_kernel[(rows,)](
        cache.key, cache.value, key, value, slots, slots.stride(0), key.stride(0), value.stride(0),
        ROW=row, BLOCK=_next_power_of_2(row))


def launch_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  output: torch.Tensor, cache: LayerKVCache, tables: torch.Tensor,
                  lengths: torch.Tensor, slots: torch.Tensor | None, rows: int,
                  plan: DecodePlan, rotary: Rotary | None = None) -> None:
    """Attention of the first `rows` query rows over the cache, by `plan`.

    `slots` (rows,): write key/value row i to cache slot slots[i] in the same kernel (the
    newest position of each sequence is then read from key/value); None: the cache already
    holds every position. `rotary` (with `slots` only): query and key rows arrive unrotated.
    """
    assert cache.key is not None and cache.value is not None
    spec = cache.spec
    query, out = rows_contiguous(query[:rows]), output[:rows]
    if out.stride(-1) != 1:
        raise ValueError(f"attention output: expected a contiguous last dimension, found "
                         f"strides {tuple(output.stride())}")
    tables = tables if tables.stride(1) == 1 else tables.contiguous()
    lengths = lengths if lengths.stride(0) == 1 else lengths.contiguous()
    fuse = slots is not None
    interpreted = triton_kernels.interpreter_active()
    key_rows = rows_contiguous(key[:rows]) if fuse else query
    value_rows = rows_contiguous(value[:rows]) if fuse else query
    slot_rows = slots if slots is not None else lengths
    partial, stats, arrivals = _split_workspace(spec, rows, plan, query.device, out)
    if rotary is not None and not fuse:
        raise ValueError("decode attention: a rotary to apply needs the cache write in the "
                         "kernel (slots), found slots None")
    positions = lengths if rotary is None else rotary.positions
    positions = positions if positions.stride(0) == 1 else positions.contiguous()
    table = out if rotary is None else rotary.cos_sin_cache
    table = table if table.stride(-1) == 1 else table.contiguous()
    try:
        attention_jit.grouped_decode_attention_kernel[(rows, spec.num_kv_heads, plan.splits)](
            out, partial, stats, query, key_rows, value_rows, cache.key, cache.value, tables,
            lengths, slot_rows, lengths if arrivals is None else arrivals, positions, table,
            query.stride(0), key_rows.stride(0), value_rows.stride(0), out.stride(0),
            tables.stride(0), slot_rows.stride(0), stats.stride(0) if plan.splits > 1 else 0,
            table.stride(0), table.shape[-1] // 2, spec.scale, plan.splits, NUM_HEADS=spec.num_heads, GROUP=spec.num_heads // spec.num_kv_heads,
            HEAD_SIZE=spec.head_size, KV_ROW=spec.num_kv_heads * spec.head_size,
            BLOCK_G=plan.block_g, BLOCK_D=plan.block_d, BLOCK_N=plan.block_n,
            PARTIAL=plan.splits > 1, COMBINE=arrivals is not None,
            BLOCK_S=_next_power_of_2(plan.splits), WRITE_NEW=fuse, ROTARY=rotary is not None,
            IS_NEOX=rotary is None or rotary.is_neox, UPCAST=interpreted,
            num_warps=plan.num_warps, **triton_kernels.dependent_options(query.device),
            DOT_PRECISION="ieee" if interpreted or cache.key.dtype == torch.float32 else "tf32")
    except BaseException:
        if arrivals is not None:  # a launch that failed part-way (interpreted) may have counted
            arrivals.zero_()
        raise
    if plan.splits > 1 and arrivals is None:
        attention_jit.decode_reduce_kernel[(rows, spec.num_heads)](
            out, partial, stats, out.stride(0), stats.stride(0), plan.splits,
            NUM_HEADS=spec.num_heads, HEAD_SIZE=spec.head_size,
            BLOCK_S=_next_power_of_2(plan.splits), BLOCK_D=plan.block_d,
            num_warps=reduce_warps(plan), **triton_kernels.dependent_options(query.device))


def _split_workspace(spec: AttentionSpec, rows: int, plan: DecodePlan, device: torch.device,
                     out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(partials, stats, arrival counters) of a launch by `plan`: for one split, `out` stands in
    for the unused buffers. Partials and stats are allocated per call (inside a capture, from the
    graph's pool, as the kernel overwrites them every replay); the counters (fuse_reduce) are the
    device's shared workspace, or None when the separate reduce kernel combines."""
    if plan.splits == 1:
        return out, out, None
    partial = torch.empty((rows, spec.num_heads, plan.splits, spec.head_size),
                          dtype=torch.float32, device=device)
    stats = torch.empty((2, rows, spec.num_heads, plan.splits), dtype=torch.float32,
                        device=device)  # running maxima, then running sums
    arrivals = arrival_counters(device, rows * spec.num_kv_heads) if plan.fuse_reduce else None
    return partial, stats, arrivals


# Per device, every arrival-counter workspace allocated so far (the last is the one in use; the
# older ones stay alive, as recorded graphs may hold their addresses).
_ARRIVALS: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, count: int) -> torch.Tensor | None:
    """An int32 workspace of at least `count` zero counters on `device`, shared by every
    one-launch split decode there: launches on one stream run one after another and each leaves
    its counters zero (the last arriver resets them), so layers and replays can share it.

    Allocated once per device, sized for the largest split grid a tuning's plan makes (splits
    > 1 needs rows x KV heads <= processors x programs per processor / 2); a larger request
    (a hand-made plan) gets a larger one. None while a CUDA graph is being captured and none
    is large enough: an allocation there would be zeroed only when the graph replays, so the
    caller takes the separate reduce kernel instead."""
    held = _ARRIVALS.setdefault(device, [])
    if held and held[-1].numel() >= count:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        logger.debug("decode attention: no arrival counters for %d (rows x KV heads) on %s "
                     "inside a capture; the split takes the separate reduce", count, device)
        return None
    tunings = (DEFAULT_TUNING, *DECODE_TUNING.values())
    size = max(count, device_processors(device) * max(t.programs_per_processor for t in tunings))
    held.append(torch.zeros(size, dtype=torch.int32, device=device))
    return held[-1]


def reduce_warps(plan: DecodePlan) -> int:
    """Warps of the reduce: one for a few partials, four once (splits, head) tiles are large
    (32 x 128 fp32 in one warp takes 149 registers; 64 x 128 spills)."""
    return 4 if _next_power_of_2(plan.splits) * plan.block_d >= 2048 else 1
