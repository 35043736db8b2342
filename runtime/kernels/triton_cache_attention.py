"""Triton implementations of `fxkiln.cache_attention` and `fxkiln.cache_update_attention`,
registered as "triton": a decode kernel for one query token over a StaticCache layer, read in
place with grouped-query heads; the update writes this step's key and value into the caches
in the same launch first (`cache_attention_jit`'s WRITE_NEW).

The plan (`cache_attention_constants`: splits of the cache, positions per split and per block,
padded group and head sizes, warps) depends only on static shapes and the device, so the
kernel_choice pass bakes it into the graph. It follows the decode kernel's tuning
(`runtime.kernels.decode_attention.decode_plan`) for the same head counts and rows. Calls with
more than one query token (a prefill over the cache), and calls under a dispatch mode (FLOP
counting, fake tensors), run the native twin: repeat_kv and SDPA, what the graph computed. That
branch is on a static shape, so each captured graph freezes it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from runtime.kernels import attention_jit, cache_attention_jit, native, triton_kernels
from runtime.kernels.decode_attention import decode_plan, reduce_warps
from runtime.kernels.triton_kernels import (_next_power_of_2, _static, device_processors,
                                            observed)
from runtime.kv_cache import AttentionSpec
from runtime.registry import register_kernel


@dataclass(frozen=True)
class CachePlan:
    """How one cache_attention launch runs (the kernel's compile-time constants)."""

    splits: int
    chunk: int       # cache positions per split, a multiple of block_n
    block_n: int
    block_g: int
    block_d: int
    num_warps: int
    reduce_warps: int  # of the reduce of the splits' partials


def _check_shapes(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[int, ...]:
    """(batch, heads, kv_heads, cache_len, head_dim), all static; ValueError naming what
    differs from what the op takes."""
    where = "triton cache_attention"
    if query.dim() != 4 or key_cache.dim() != 4 or tuple(key_cache.shape) != tuple(
            value_cache.shape):
        raise ValueError(f"{where}: expected a 4-d query and key and value caches of one 4-d "
                         f"shape, found {tuple(query.shape)}, {tuple(key_cache.shape)}, "
                         f"{tuple(value_cache.shape)}")
    batch, heads, _, head_dim = (_static(s, "query size") for s in query.shape)
    _, kv_heads, cache_len, cache_dim = (_static(s, "cache size") for s in key_cache.shape)
    if heads % kv_heads or cache_dim != head_dim or key_cache.shape[0] != batch:
        raise ValueError(f"{where}: expected caches (batch {batch}, a divisor of {heads} heads, "
                         f"length, {head_dim}), found {tuple(key_cache.shape)}")
    if mask is not None:
        wanted = (batch, heads, query.shape[2], cache_len)
        if mask.dim() != 4 or mask.shape[-1] != cache_len or any(
                size not in (1, full) for size, full in zip(mask.shape, wanted)) or \
                mask.dtype not in (torch.bool, query.dtype):
            raise ValueError(f"{where}: expected a bool or {query.dtype} mask broadcasting to "
                             f"{wanted} with all {cache_len} positions, found {mask.dtype} "
                             f"{tuple(mask.shape)}")
    return batch, heads, kv_heads, cache_len, head_dim


def cache_attention_constants(query: torch.Tensor, key_cache: torch.Tensor,
                              value_cache: torch.Tensor, mask: torch.Tensor | None,
                              scale: float) -> tuple[int, ...]:
    """The fields of its `CachePlan`, in order."""
    batch, heads, kv_heads, cache_len, head_dim = _check_shapes(query, key_cache, value_cache,
                                                                mask)
    spec = AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_size=head_dim,
                         scale=scale)
    decode = decode_plan(spec, batch, device_processors(query.device))
    blocks = -(-cache_len // decode.block_n)
    splits = min(decode.splits, blocks)
    chunk = -(-blocks // splits) * decode.block_n
    splits = -(-cache_len // chunk)  # no split left without a position
    plan = CachePlan(splits=splits, chunk=chunk, block_n=decode.block_n, block_g=decode.block_g,
                     block_d=decode.block_d, num_warps=decode.num_warps,
                     reduce_warps=reduce_warps(dataclasses.replace(decode, splits=splits)))
    return dataclasses.astuple(plan)


def _mask_kind(mask: torch.Tensor | None) -> int:
    if mask is None:
        return cache_attention_jit.NO_MASK.value
    if mask.dtype == torch.bool:
        return cache_attention_jit.BOOL_MASK.value
    return cache_attention_jit.ADDITIVE_MASK.value


def cache_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    mask: torch.Tensor | None, scale: float, *plan: int) -> torch.Tensor:
    """`plan`: the fields of the call's CachePlan (from `cache_attention_constants`)."""
    if observed(query) or query.shape[2] != 1:
        return native.cache_attention(query, key_cache, value_cache, mask, scale)
    return _launch(query, key_cache, value_cache, mask, scale, CachePlan(*plan), None)


def cache_update_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           position: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, mask: torch.Tensor | None, scale: float,
                           *plan: int) -> torch.Tensor:
    """The caches take key and value at `position`, then cache_attention reads them: one
    launch. The caches' version counters move as index_copy_ moves them (the runners see
    in-place writes by them)."""
    if observed(query) or query.shape[2] != 1:
        return native.cache_update_attention(query, key, value, position, key_cache,
                                             value_cache, mask, scale)
    out = _launch(query, key_cache, value_cache, mask, scale, CachePlan(*plan),
                  (key, value, position))
    torch.autograd.graph.increment_version((key_cache, value_cache))
    return out


def cache_update_constants(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           position: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> tuple[int, ...]:
    """cache_attention's plan; this step's key and value must be one position of the caches'."""
    wanted = (*key_cache.shape[:2], 1, key_cache.shape[3])
    if tuple(key.shape) != wanted or tuple(value.shape) != wanted or \
            tuple(position.shape) != (1,):
        raise ValueError(f"triton cache_update_attention: expected key and value {wanted} at "
                         f"one position, found {tuple(key.shape)}, {tuple(value.shape)} at "
                         f"positions of shape {tuple(position.shape)}")
    return cache_attention_constants(query, key_cache, value_cache, mask, scale)


def _launch(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
            mask: torch.Tensor | None, scale: float, plan: CachePlan,
            new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """The kernel (and the reduce of its splits) for one query token; `new`: (key, value,
    position) to write into the caches first."""
    batch, heads, _, head_dim = query.shape
    kv_heads, cache_len = key_cache.shape[1], key_cache.shape[2]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    mask_view = query if mask is None else torch.broadcast_to(
        mask, (batch, heads, 1, cache_len))
    if mask is not None and mask.dtype == torch.bool:
        mask_view = mask_view.view(torch.uint8)
    new_key, new_value, position = new if new is not None else (query, query, query)
    partial = stats = out
    stats_plane = 0
    if plan.splits > 1:
        partial = torch.empty((batch, heads, plan.splits, head_dim), dtype=torch.float32,
                              device=query.device)
        stats = torch.empty((2, batch, heads, plan.splits), dtype=torch.float32,
                            device=query.device)  # running maxima, then running sums
        stats_plane = stats.stride(0)
    interpreted = triton_kernels.interpreter_active()
    mask_strides = mask_view.stride()
    cache_attention_jit.cache_attention_kernel[(batch, kv_heads, plan.splits)](
        out, partial, stats, query, key_cache, value_cache, mask_view, new_key, new_value,
        position, query.stride(0), query.stride(1), query.stride(3), new_key.stride(0),
        new_key.stride(1), new_key.stride(3), new_value.stride(0), new_value.stride(1),
        new_value.stride(3), *key_cache.stride(), *value_cache.stride(), mask_strides[0],
        mask_strides[1], mask_strides[3], out.stride(0), stats_plane, scale,
        CACHE_LEN=cache_len, CHUNK=plan.chunk, SPLITS=plan.splits, NUM_HEADS=heads,
        GROUP=heads // kv_heads, HEAD_SIZE=head_dim, BLOCK_G=plan.block_g,
        BLOCK_D=plan.block_d, BLOCK_N=plan.block_n, MASK_KIND=_mask_kind(mask),
        WRITE_NEW=new is not None,
        DOT_PRECISION="ieee" if interpreted or query.dtype == torch.float32 else "tf32",
        UPCAST=interpreted, num_warps=plan.num_warps)
    if plan.splits > 1:
        attention_jit.decode_reduce_kernel[(batch, heads)](
            out, partial, stats, out.stride(0), stats_plane, plan.splits, NUM_HEADS=heads,
            HEAD_SIZE=head_dim, BLOCK_S=_next_power_of_2(plan.splits), BLOCK_D=plan.block_d,
            num_warps=plan.reduce_warps)
    return out


for _op, _fn, _constants in (
    ("cache_attention", cache_attention, cache_attention_constants),
    ("cache_update_attention", cache_update_attention, cache_update_constants),
):
    register_kernel(_op, "triton", supports=triton_kernels.supports,
                    priority=triton_kernels.priority, launch_constants=_constants)(_fn)
