"""Triton device code of `fxkiln.cache_attention` for one query token: attention over a
Hugging Face StaticCache layer, read in place with grouped-query heads. Needs `triton`.

The launcher and its plan live in `runtime.kernels.triton_cache_attention`; the reduce of
split partials is `runtime.kernels.attention_jit.decode_reduce_kernel` (same partial layout).
"""
from __future__ import annotations

import triton
import triton.language as tl

NO_MASK, BOOL_MASK, ADDITIVE_MASK = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def cache_attention_kernel(
    out_ptr, partial_ptr, stats_ptr, query_ptr, key_ptr, value_ptr, mask_ptr,
    new_key_ptr, new_value_ptr, position_ptr,
    query_stride0, query_stride1, query_stride3,
    new_key_stride0, new_key_stride1, new_key_stride3,
    new_value_stride0, new_value_stride1, new_value_stride3,
    key_stride0, key_stride1, key_stride2, key_stride3,
    value_stride0, value_stride1, value_stride2, value_stride3,
    mask_stride0, mask_stride1, mask_stride3,
    out_row_stride, stats_plane, scale,
    CACHE_LEN: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, WRITE_NEW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (batch row, KV head, split): the KV head's GROUP query heads over the split's
    positions [split * CHUNK, (split + 1) * CHUNK) of the cache, each K/V row loaded once per
    group. The mask is read with the strides of its broadcast to (batch, heads, 1, CACHE_LEN)
    (0 where it broadcasts): BOOL_MASK keeps positions where it is true, ADDITIVE_MASK adds it
    to the scaled scores; a block that no query head of the group may attend (all false, all
    -inf) loads no K/V. A query head with no position to attend gets a zero row (SDPA's safe
    softmax). Online softmax in float32; one split writes the output, several write partials
    (acc, running max, running sum) for the reduce. WRITE_NEW: first the cache takes this
    step's key and value (batch, kv_heads, 1, head_dim) at position position_ptr[0], written
    by the split that holds the position (none when it is outside the cache), then the cache
    is read: index_copy_ and the attention in one launch. UPCAST: products in float32
    (Triton's CPU interpreter has no bfloat16 arithmetic)."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    heads = tl.arange(0, BLOCK_G)
    head_mask = heads < GROUP
    q_heads = kv_head * GROUP + heads                                          # (BLOCK_G,)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_SIZE
    group_mask = head_mask[:, None] & dim_mask[None, :]
    dot_dtype = tl.float32 if UPCAST else key_ptr.dtype.element_ty
    query = tl.load(query_ptr + row * query_stride0 + q_heads[:, None] * query_stride1
                    + dims[None, :] * query_stride3, mask=group_mask, other=0.0).to(dot_dtype)
    key_base = key_ptr + row * key_stride0 + kv_head * key_stride1
    value_base = value_ptr + row * value_stride0 + kv_head * value_stride1
    mask_rows = mask_ptr + row * mask_stride0 + q_heads[:, None] * mask_stride1  # (BLOCK_G, 1)
    running_max = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    lo = split * CHUNK
    if WRITE_NEW:
        position = tl.load(position_ptr).to(tl.int32)
        if (position >= lo) & (position < lo + CHUNK) & (position < CACHE_LEN):
            new_key = tl.load(new_key_ptr + row * new_key_stride0 + kv_head * new_key_stride1
                              + dims * new_key_stride3, mask=dim_mask)
            new_value = tl.load(new_value_ptr + row * new_value_stride0
                                + kv_head * new_value_stride1 + dims * new_value_stride3,
                                mask=dim_mask)
            tl.store(key_base + position * key_stride2 + dims * key_stride3, new_key,
                     mask=dim_mask)
            tl.store(value_base + position * value_stride2 + dims * value_stride3, new_value,
                     mask=dim_mask)
        tl.debug_barrier()  # the program's threads read the rows it wrote
    for offset in range(0, CHUNK, BLOCK_N):
        positions = lo + offset + tl.arange(0, BLOCK_N)                        # (BLOCK_N,)
        in_cache = head_mask[:, None] & (positions < CACHE_LEN)[None, :]       # (BLOCK_G, BLOCK_N)
        bias = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        if MASK_KIND == BOOL_MASK:
            keep = tl.load(mask_rows + positions[None, :] * mask_stride3, mask=in_cache, other=0)
            allowed = in_cache & (keep != 0)
        elif MASK_KIND == ADDITIVE_MASK:
            bias = tl.load(mask_rows + positions[None, :] * mask_stride3, mask=in_cache,
                           other=float("-inf")).to(tl.float32)
            allowed = in_cache & (bias > float("-inf"))
        else:
            allowed = in_cache
        if tl.max(allowed.to(tl.int32)) > 0:  # some head of the group attends in this block
            kv_mask = (positions < CACHE_LEN)[:, None] & dim_mask[None, :]     # (BLOCK_N, BLOCK_D)
            key = tl.load(key_base + positions[:, None] * key_stride2 + dims[None, :] * key_stride3,
                          mask=kv_mask, other=0.0).to(dot_dtype)
            value = tl.load(value_base + positions[:, None] * value_stride2
                            + dims[None, :] * value_stride3, mask=kv_mask, other=0.0).to(dot_dtype)
            scores = tl.dot(query, tl.trans(key), input_precision=DOT_PRECISION) * scale + bias
            scores = tl.where(allowed, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            shift = tl.where(new_max > float("-inf"), new_max, 0.0)  # no position yet: exp -> 0
            probs = tl.exp(scores - shift[:, None])
            correction = tl.exp(running_max - shift)
            acc = acc * correction[:, None] + tl.dot(probs.to(value.dtype), value,
                                                     input_precision=DOT_PRECISION)
            running_sum = running_sum * correction + tl.sum(probs, axis=1)
            running_max = new_max
    if SPLITS == 1:
        result = tl.where(running_sum[:, None] > 0,
                          acc / tl.maximum(running_sum, 1e-30)[:, None], 0.0)
        tl.store(out_ptr + row * out_row_stride + q_heads[:, None] * HEAD_SIZE + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=group_mask)
    else:
        base = (row * NUM_HEADS + q_heads) * SPLITS + split                     # (BLOCK_G,)
        tl.store(partial_ptr + base[:, None] * HEAD_SIZE + dims[None, :], acc, mask=group_mask)
        tl.store(stats_ptr + base, running_max, mask=head_mask)
        tl.store(stats_ptr + stats_plane + base, running_sum, mask=head_mask)
