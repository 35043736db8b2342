"""Dispatch ops: `torch.ops.fxkiln.*` custom ops whose eager implementation chooses a kernel.

Each call reads the active kernel settings and asks the registry which implementation to run.
That per-call choice is the slow path the `kernel_choice` pass removes from compiled graphs;
it stays because eager users need it. Fake (meta) implementations let Dynamo and FakeTensor
shape propagation see through the ops, so each op is one node in a captured graph.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_flop_count

import runtime.kernels  # noqa: F401  (registers the implementations)
from runtime import registry, settings
from runtime.kernels.native import CARRIES, LINEAR_ACTIVATIONS, LINEAR_PROLOGUES

DISPATCH_OPS = ("rms_norm", "fused_add_rms_norm", "layer_norm", "fused_add_layer_norm",
                "silu_and_mul", "gelu_and_mul", "rotary_embedding", "rotary_cos_sin", "linear",
                "cache_attention", "cache_update_attention", "norm_linear", "add_norm_linear")


def _dispatch(op: str, x: torch.Tensor, *args: Any) -> Any:
    """Choose the implementation of `op` for `x`'s device and dtype from the active settings,
    then call it with `args`.

    Looked up through the modules on every call (the slow path), so patching
    `runtime.settings.active_kernel_choice` is seen here.
    """
    impl = registry.choose_kernel(op, settings.active_kernel_choice(op), x.device, x.dtype)
    return impl.fn(*impl.call_args(args))


@torch.library.custom_op("fxkiln::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _dispatch("rms_norm", x, x, weight, eps)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op("fxkiln::fused_add_rms_norm", mutates_args=())
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _dispatch("fused_add_rms_norm", x, x, residual, weight, eps)


@fused_add_rms_norm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(x.shape, dtype=torch.promote_types(sum_dtype, weight.dtype)),
            x.new_empty(x.shape, dtype=sum_dtype))


@torch.library.custom_op("fxkiln::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    return _dispatch("layer_norm", x, x, weight, bias, eps)


@layer_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
      eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("fxkiln::fused_add_layer_norm", mutates_args=())
def fused_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _dispatch("fused_add_layer_norm", x, x, residual, weight, bias, eps)


@fused_add_layer_norm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    return x.new_empty(x.shape, dtype=sum_dtype), x.new_empty(x.shape, dtype=sum_dtype)


@torch.library.custom_op("fxkiln::silu_and_mul", mutates_args=())
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _dispatch("silu_and_mul", x, x)


@silu_and_mul.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fxkiln::gelu_and_mul", mutates_args=())
def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(first half of the last dimension, approximate) * second half."""
    return _dispatch("gelu_and_mul", x, x, approximate)


@gelu_and_mul.register_fake
def _(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fxkiln::rotary_cos_sin", mutates_args=())
def rotary_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (the neox form), cos and sin broadcast against x.

    Takes the cos/sin tensors a model computed, not positions and a table: Hugging Face
    models build them in the graph with their own frequency scaling, once per forward."""
    return _dispatch("rotary_cos_sin", x, x, cos, sin)


@rotary_cos_sin.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.custom_op("fxkiln::rotary_embedding", mutates_args=())
def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    cos_sin_cache: torch.Tensor, head_size: int, is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _dispatch("rotary_embedding", query,
                     positions, query, key, cos_sin_cache, head_size, is_neox)


@rotary_embedding.register_fake
def _(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
      cos_sin_cache: torch.Tensor, head_size: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (query.new_empty(query.shape), key.new_empty(key.shape))


@torch.library.custom_op("fxkiln::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           activation: str) -> torch.Tensor:
    """x W^T + b, then `activation` (a name of LINEAR_ACTIVATIONS: "none", "gelu", "gelu_tanh",
    "silu_and_mul", which halves the features)."""
    return _dispatch("linear", x, x, weight, bias, activation)


@linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
      activation: str) -> torch.Tensor:
    return _projected(x, weight, activation, x.dtype, "fxkiln.linear")


def _projected(x: torch.Tensor, weight: torch.Tensor, activation: str, dtype: torch.dtype,
               op: str) -> torch.Tensor:
    """The (fake) output of projecting `x` by `weight` with `activation`, in `dtype`."""
    if activation not in LINEAR_ACTIVATIONS:
        raise ValueError(f"{op}: expected an activation in {sorted(LINEAR_ACTIVATIONS)}, "
                         f"found {activation!r}")
    features = weight.shape[0] // 2 if activation == "silu_and_mul" else weight.shape[0]
    return x.new_empty((*x.shape[:-1], features), dtype=dtype)


def _normed_dtype(op: str, norm: str, sum_dtype: torch.dtype, norm_weight: torch.Tensor,
                  norm_bias: torch.Tensor | None) -> torch.dtype:
    """The dtype of the norm's output (what the projection reads), as the norm ops give it."""
    if norm not in LINEAR_PROLOGUES:
        raise ValueError(f"{op}: expected a norm in {sorted(LINEAR_PROLOGUES)}, found {norm!r}")
    if norm == "rms" and norm_bias is not None:
        raise ValueError(f"{op}: expected no norm bias for norm 'rms', found a tensor "
                         f"of shape {tuple(norm_bias.shape)}")
    return sum_dtype if norm == "layer" else torch.promote_types(sum_dtype, norm_weight.dtype)


@torch.library.custom_op("fxkiln::norm_linear", mutates_args=())
def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
                eps: float, norm: str, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str) -> torch.Tensor:
    """linear(norm(x), weight, bias, activation): `norm` "rms" (rms_norm, no norm bias) or
    "layer" (layer_norm), each exactly as its own op."""
    return _dispatch("norm_linear", x, x, norm_weight, norm_bias, eps, norm, weight, bias,
                     activation)


@norm_linear.register_fake
def _(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None, eps: float,
      norm: str, weight: torch.Tensor, bias: torch.Tensor | None,
      activation: str) -> torch.Tensor:
    dtype = _normed_dtype("fxkiln.norm_linear", norm, x.dtype, norm_weight, norm_bias)
    return _projected(x, weight, activation, dtype, "fxkiln.norm_linear")


@torch.library.custom_op("fxkiln::add_norm_linear", mutates_args=())
def add_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                    norm_bias: torch.Tensor | None, eps: float, norm: str, weight: torch.Tensor,
                    bias: torch.Tensor | None, activation: str,
                    carry: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm or fused_add_layer_norm, then the projection of its normalized rows:
    (projection, the rows the layer carries on: x + residual for `carry` "sum", the normalized
    rows for "normed")."""
    return _dispatch("add_norm_linear", x, x, residual, norm_weight, norm_bias, eps, norm, weight,
                     bias, activation, carry)


@add_norm_linear.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
      norm_bias: torch.Tensor | None, eps: float, norm: str, weight: torch.Tensor,
      bias: torch.Tensor | None, activation: str, carry: str) -> tuple[torch.Tensor, torch.Tensor]:
    op = "fxkiln.add_norm_linear"
    if carry not in CARRIES:
        raise ValueError(f"{op}: expected carry in {list(CARRIES)}, found {carry!r}")
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    dtype = _normed_dtype(op, norm, sum_dtype, norm_weight, norm_bias)
    return (_projected(x, weight, activation, dtype, op),
            x.new_empty(x.shape, dtype=sum_dtype if carry == "sum" else dtype))


def _projection_flops(x_shape: torch.Size, weight_shape: torch.Size) -> int:
    """A projection's multiply-adds (the epilogue and a norm prologue are not counted, as for
    F.linear and the norm ops)."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * weight_shape[1]


@register_flop_formula(torch.ops.fxkiln.linear)
def _linear_flops(x_shape: torch.Size, weight_shape: torch.Size, *args: object,
                  **kwargs: object) -> int:
    return _projection_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.fxkiln.norm_linear)
def _norm_linear_flops(x_shape: torch.Size, norm_weight_shape: torch.Size,
                       norm_bias_shape: object, eps: object, norm: object,
                       weight_shape: torch.Size, *args: object, **kwargs: object) -> int:
    return _projection_flops(x_shape, weight_shape)


@register_flop_formula(torch.ops.fxkiln.add_norm_linear)
def _add_norm_linear_flops(x_shape: torch.Size, residual_shape: object,
                           norm_weight_shape: torch.Size, norm_bias_shape: object, eps: object,
                           norm: object, weight_shape: torch.Size, *args: object,
                           **kwargs: object) -> int:
    return _projection_flops(x_shape, weight_shape)


@torch.library.custom_op("fxkiln::cache_attention", mutates_args=())
def cache_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA of `query` (batch, heads, queries, head_dim) over a cache's keys and values
    (batch, kv_heads, cache_len, head_dim), read in place: query head h reads kv head
    h // (heads // kv_heads), as Hugging Face's repeat_kv lays them out. `mask` broadcasts to
    (batch, heads, queries, cache_len): boolean (True: attend) or additive, as SDPA's."""
    return _dispatch("cache_attention", query, query, key_cache, value_cache, mask, scale)


@cache_attention.register_fake
def _(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
      mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return query.new_empty(query.shape)


@torch.library.custom_op("fxkiln::cache_update_attention",
                         mutates_args=("key_cache", "value_cache"))
def cache_update_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           position: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """`key_cache.index_copy_(2, position, key)`, the same for value, then cache_attention over
    the caches: a StaticCache layer's update and attention in one op."""
    return _dispatch("cache_update_attention", query, query, key, value, position, key_cache,
                     value_cache, mask, scale)


@cache_update_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor,
      key_cache: torch.Tensor, value_cache: torch.Tensor, mask: torch.Tensor | None,
      scale: float) -> torch.Tensor:
    return query.new_empty(query.shape)


@register_flop_formula(torch.ops.fxkiln.cache_update_attention)
def _cache_update_attention_flops(query_shape: torch.Size, key_shape: torch.Size,
                                  value_shape: torch.Size, position_shape: torch.Size,
                                  key_cache_shape: torch.Size, value_cache_shape: torch.Size,
                                  *args: object, **kwargs: object) -> int:
    return sdpa_flop_count(query_shape, key_cache_shape, value_cache_shape)


@register_flop_formula(torch.ops.fxkiln.cache_attention)
def _cache_attention_flops(query_shape: torch.Size, key_shape: torch.Size,
                           value_shape: torch.Size, *args: object, **kwargs: object) -> int:
    """SDPA's count over the grouped heads (the two products; the softmax is not counted)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)
