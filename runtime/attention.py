"""The attention op: `torch.ops.fxkiln.attention(query, key, value, output, layer_name) -> None`.

The op writes its result into `output`, a buffer the caller allocated (in a piecewise-captured
graph the piece before the op allocates it, so its address is stable inside the graph pool). It
takes no metadata as arguments: the layer's spec and KV cache, and the step's sequence layout,
come from the forward context (`runtime.forward_context`), so one traced graph serves prefill and
decode steps alike. In a traced graph the op is one opaque node that mutates `output`.

Inputs, all flattened over tokens:
    query  (tokens, num_heads * head_size)
    key    (tokens or encoder tokens, num_kv_heads * head_size)
    value  like key
    output like query
For cross-attention, key and value are the encoder's projections: they are written to the cache
only on steps that carry encoder tokens (`num_actual_encoder_tokens > 0`); on decode steps they
have no real rows and the op reads the cached K/V. Rows past the step's real tokens (padding
added by a runner) are neither computed nor cached; the op writes zeros there.

With `positions` and `cos_sin_cache` (a `fxkiln.rotary_embedding` folded in by the fold_rotary
pass) query and key arrive unrotated and the op applies RoPE itself (`rotary_head_size` must be
the layer's head size): the Triton decode kernel of a decoder layer rotates them on load, any
other step runs the rotary kernel first.

Implementations are registered as the dispatch op "attention" and chosen from the active kernel
settings ("auto": the highest priority the device supports):
- "native" (`native_attention`): torch SDPA, one call for a decode step's whole batch (over K/V
  gathered from the cache), one call per sequence otherwise. It reads host-side lengths, so it
  cannot serve a captured decode step.
- "triton" (`triton_attention`): Triton kernels that read the layout from device tensors only,
  GQA without copies, so a CUDA graph can hold them. Decode steps
  (`AttentionMetadata.static_decode` or one new token per sequence):
  `runtime.kernels.decode_attention` (one program per sequence, KV head and context split for
  the whole query group, the step's cache write in the same kernel; a split context is combined
  by a small reduce launch, or by its last-arriving split program where the tuning says so).
  Every other step (a prefill of many prompts, chunks over a cached prefix, chunks mixed with
  decode tokens): the cache write, then one variable-length attention launch
  for all the step's sequences (`runtime.kernels.varlen_attention_jit`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime import registry, settings
from runtime.forward_context import AttentionMetadata, Rotary, get_forward_context
from runtime.kernels import native, triton_kernels
from runtime.kv_cache import AttentionKind, LayerKVCache

try:
    from runtime.kernels import attention_jit, decode_attention, varlen_attention_jit
except ModuleNotFoundError as missing:  # Triton absent: native attention only
    if missing.name is None or not missing.name.startswith("triton"):
        raise
    attention_jit = decode_attention = varlen_attention_jit = None  # type: ignore[assignment]

VARLEN_BLOCK_M = 64  # query rows per program of the variable-length kernel
VARLEN_BLOCK_N = 64  # key positions per inner step


class GraphUnsafeAttentionError(RuntimeError):
    """A captured (static) decode step met an attention implementation that reads host values."""


@torch.library.custom_op("fxkiln::attention", mutates_args=("output",))
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
              layer_name: str, implementation: str = "auto",
              positions: torch.Tensor | None = None, cos_sin_cache: torch.Tensor | None = None,
              rotary_head_size: int = 0, rotary_neox: bool = True) -> None:
    """`implementation` "auto" reads the active kernel settings on every call (the eager path);
    the kernel_choice pass writes the chosen name into compiled graphs instead."""
    context = get_forward_context()
    try:
        cache = context.kv_caches[layer_name]
    except KeyError:
        raise LookupError(f"attention layer {layer_name!r} has no entry in the forward context's "
                       f"kv_caches; expected one of {sorted(context.kv_caches)}") from None
    rotary = None
    if positions is not None and cos_sin_cache is not None:
        if rotary_head_size != cache.spec.head_size:
            raise ValueError(f"attention layer {layer_name!r}: a folded rotary of head size "
                             f"{rotary_head_size} expected the layer's head size, found "
                             f"{cache.spec.head_size}")
        rotary = Rotary(positions, cos_sin_cache, rotary_neox)
    fn = _IMPLEMENTATIONS.get(implementation)
    if fn is None:
        fn = registry.choose_kernel("attention", settings.active_kernel_choice("attention")
                                    if implementation == registry.AUTO else implementation,
                                    query.device, query.dtype).fn
    fn(query, key, value, output, cache, context.attn_metadata, rotary)


@attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor,
      layer_name: str, implementation: str = "auto", positions: torch.Tensor | None = None,
      cos_sin_cache: torch.Tensor | None = None, rotary_head_size: int = 0,
      rotary_neox: bool = True) -> None:
    return None


def native_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     output: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                     rotary: Rotary | None = None) -> None:
    """Reference implementation: rotate query and key (`rotary`), write K/V to the cache, then
    SDPA per sequence into `output`."""
    if meta.static_decode:
        raise GraphUnsafeAttentionError(
            "a captured decode step needs attention that reads its layout from device tensors; "
            "found the native implementation, which reads host lengths (choose 'triton')")
    spec = cache.spec
    if rotary is not None:
        query, key = native.rotary_embedding(rotary.positions, query, key, rotary.cos_sin_cache,
                                             spec.head_size, rotary.is_neox)
    if spec.kind is AttentionKind.ENCODER:
        num_queries, starts = meta.num_actual_encoder_tokens, meta.encoder_query_start_loc
    else:
        num_queries, starts = meta.num_actual_tokens, meta.query_start_loc
    if starts is None:
        raise ValueError(f"{spec.kind.value} attention needs encoder metadata, found none")
    output[num_queries:].zero_()  # padding rows
    q = query[:num_queries].reshape(num_queries, spec.num_heads, spec.head_size)  # (tokens, heads, hd)

    if spec.kind is AttentionKind.ENCODER:
        k = key[:num_queries].reshape(num_queries, spec.num_kv_heads, spec.head_size)
        v = value[:num_queries].reshape(num_queries, spec.num_kv_heads, spec.head_size)
        for i in range(len(starts) - 1):
            rows = slice(starts[i], starts[i + 1])
            _attend(q[rows], k[rows], v[rows], output[rows], spec.scale, causal=False)
        return

    assert cache.key is not None and cache.value is not None, "cached layer without cache tensors"
    if spec.kind is AttentionKind.DECODER:
        _write_cache(cache, key, value, meta.slot_mapping)
        tables, context_lens = meta.slot_tables, meta.seq_lens
    else:
        assert meta.encoder_slot_mapping is not None and meta.encoder_slot_tables is not None
        assert meta.encoder_seq_lens is not None
        _write_cache(cache, key, value, meta.encoder_slot_mapping)
        tables, context_lens = meta.encoder_slot_tables, meta.encoder_seq_lens
    causal = spec.kind is AttentionKind.DECODER
    if num_queries == len(context_lens) and num_queries > 0:  # decode: one query per sequence
        _attend_decode(q, cache, tables, context_lens, output[:num_queries], spec.scale)
        return
    for i, context_len in enumerate(context_lens):
        rows = slice(starts[i], starts[i + 1])
        slots = tables[i, :context_len]
        _attend(q[rows], cache.key[slots], cache.value[slots], output[rows], spec.scale, causal)


def _attend_decode(q: torch.Tensor, cache: LayerKVCache, tables: torch.Tensor,
                   context_lens: tuple[int, ...], out: torch.Tensor, scale: float) -> None:
    """All sequences at once when each brings one query (its newest position, so causality
    is just the context length): one gather and one SDPA call, however large the batch."""
    assert cache.key is not None and cache.value is not None
    batch, longest = q.shape[0], max(context_lens)
    slots = tables[:, :longest]                                     # (batch, longest)
    k = cache.key[slots].transpose(1, 2)                            # (batch, kv_heads, longest, hd)
    v = cache.value[slots].transpose(1, 2)
    mask = None
    if min(context_lens) != longest:  # ragged contexts: hide each sequence's unused slots
        lens = torch.tensor(context_lens, device=q.device)
        mask = (torch.arange(longest, device=q.device) < lens[:, None])[:, None, None, :]
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)                       # (batch, heads, longest, hd)
        v = v.repeat_interleave(group, dim=1)
    result = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale)
    out.copy_(result.reshape(batch, -1))                            # (batch, heads * hd)


def _write_cache(cache: LayerKVCache, key: torch.Tensor, value: torch.Tensor,
                 slots: torch.Tensor) -> None:
    assert cache.key is not None and cache.value is not None
    num_tokens = slots.shape[0]
    if num_tokens == 0:
        return
    kv_heads, head_size = cache.key.shape[1:]
    cache.key[slots] = key[:num_tokens].reshape(num_tokens, kv_heads, head_size)
    cache.value[slots] = value[:num_tokens].reshape(num_tokens, kv_heads, head_size)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
            causal: bool) -> None:
    """One sequence: q (new, heads, hd) over k, v (context, kv_heads, hd); the new tokens are the
    last `new` positions of the context, so query j sees keys up to context - new + j."""
    num_new, num_context = q.shape[0], k.shape[0]
    if num_new == 0:
        return
    mask = None
    whole = causal and num_new == num_context  # a plain prefill: SDPA's own (fast) causal mask
    if causal and num_new > 1 and not whole:   # a chunk over a cached prefix
        key_pos = torch.arange(num_context, device=q.device)
        query_pos = torch.arange(num_new, device=q.device) + (num_context - num_new)
        mask = key_pos[None, :] <= query_pos[:, None]  # (new, context)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (context, heads, hd)
        v = v.repeat_interleave(group, dim=1)
    result = F.scaled_dot_product_attention(  # 4-D: 3-D inputs miss the fused CPU kernels
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, is_causal=whole and num_new > 1,
    )[0]  # (heads, new, hd)
    out.copy_(result.transpose(0, 1).reshape(num_new, -1))


def triton_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     output: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata,
                     rotary: Rotary | None = None) -> None:
    """Decode steps through the Triton decode kernels (`rotary` applied inside where it can be),
    any other step through the rotary kernel (`rotary`) and the variable-length kernel; all
    graph-safe."""
    spec = cache.spec
    decode_step = meta.static_decode or (meta.is_decode and meta.num_actual_encoder_tokens == 0
                                         and meta.num_seqs > 0)
    if spec.kind is AttentionKind.ENCODER and meta.static_decode:
        output.zero_()  # a decode step brings no encoder tokens: these rows are all padding
        return
    if spec.kind is AttentionKind.ENCODER or not decode_step:
        if rotary is not None:
            query, key = decode_attention.rotate(query, key, rotary, spec.head_size)
        _launch_varlen(query, key, value, output, cache, meta)
        return
    decode_attention.decode_step(query, key, value, output, cache, meta, rotary)


def _launch_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   output: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata) -> None:
    """Write the step's K/V to the cache (cached kinds), then attend every sequence's new rows
    in one launch: causal over the cache (decoder), over the encoder's cached K/V (cross), or
    over the step's own rows (encoder). Rows past the step's real tokens are zeroed."""
    spec = cache.spec
    tables = lengths = None
    if spec.kind is AttentionKind.ENCODER:
        rows, starts = meta.num_actual_encoder_tokens, meta.device_encoder_query_start_loc()
        keys, values = key[:rows], value[:rows]
    else:
        assert cache.key is not None and cache.value is not None
        rows, starts = meta.num_actual_tokens, meta.device_query_start_loc()
        if spec.kind is AttentionKind.DECODER:
            decode_attention.write_kv(cache, key, value, meta.slot_mapping)
            tables, lengths = meta.slot_tables, meta.device_seq_lens()
        else:
            if meta.encoder_slot_mapping is not None:
                decode_attention.write_kv(cache, key, value, meta.encoder_slot_mapping)
            tables, lengths = meta.encoder_slot_tables, meta.device_encoder_seq_lens()
        keys, values = cache.key, cache.value                 # (slots, kv_heads, head_size)
    if starts is None or (spec.kind is not AttentionKind.ENCODER and tables is None):
        raise ValueError(f"{spec.kind.value} attention needs encoder metadata, found none")
    output[rows:].zero_()  # padding rows
    if rows == 0:
        return
    contiguous = decode_attention.rows_contiguous
    keys, values = contiguous(keys), contiguous(values)
    queries, out = contiguous(query[:rows]), output[:rows]
    if out.stride(-1) != 1:
        raise ValueError(f"attention output: expected a contiguous last dimension, found "
                         f"strides {tuple(output.stride())}")
    tables = None if tables is None else tables if tables.stride(1) == 1 else tables.contiguous()
    num_seqs = starts.shape[0] - 1
    varlen_attention_jit.varlen_attention_kernel[(rows // VARLEN_BLOCK_M + num_seqs,
                                                  spec.num_heads)](
        out, queries, keys, values, starts if tables is None else tables, starts,
        starts if lengths is None else lengths, num_seqs, queries.stride(0), out.stride(0),
        keys.stride(0), values.stride(0), 0 if tables is None else tables.stride(0), spec.scale,
        GROUP=spec.num_heads // spec.num_kv_heads, HEAD_SIZE=spec.head_size,
        BLOCK_M=VARLEN_BLOCK_M, BLOCK_N=VARLEN_BLOCK_N,
        BLOCK_D=max(16, triton_kernels._next_power_of_2(spec.head_size)),
        CAUSAL=spec.kind is AttentionKind.DECODER, PAGED=tables is not None,
        IEEE=query.dtype == torch.float32, num_warps=4)


registry.register_kernel("attention", "native", supports=native._everywhere)(native_attention)
_IMPLEMENTATIONS = {"native": native_attention}  # a name baked into a graph: no lookup per call
if attention_jit is not None:
    registry.register_kernel("attention", "triton", supports=triton_kernels.supports,
                             priority=triton_kernels.priority)(triton_attention)
    _IMPLEMENTATIONS["triton"] = triton_attention
