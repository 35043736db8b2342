"""Native PyTorch implementations of the dispatch ops: run anywhere, the reference for the rest."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from runtime.registry import register_kernel


def _everywhere(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


@register_kernel("argmax", "native", supports=_everywhere)
def argmax(x: torch.Tensor) -> torch.Tensor:
    """x (..., vocab) -> the index of each row's first maximum (a NaN above every number)."""
    return x.argmax(-1)


@register_kernel("rms_norm", "native", supports=_everywhere)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_fp32 = x.float()
    variance = x_fp32.pow(2).mean(dim=-1, keepdim=True)
    return (x_fp32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


@register_kernel("fused_add_rms_norm", "native", supports=_everywhere)
def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


@register_kernel("layer_norm", "native", supports=_everywhere)
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@register_kernel("fused_add_layer_norm", "native", supports=_everywhere)
def fused_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return layer_norm(summed, weight, bias, eps), summed


@register_kernel("silu_and_mul", "native", supports=_everywhere)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # each (..., d)
    return F.silu(gate) * up


@register_kernel("gelu_and_mul", "native", supports=_everywhere)
def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # each (..., d)
    return F.gelu(gate, approximate=approximate) * up


# The activations a projection can carry as its epilogue (`fxkiln.linear`'s `activation`).
LINEAR_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda y: y,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu_and_mul": silu_and_mul,
}


@register_kernel("linear", "native", supports=_everywhere)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           activation: str) -> torch.Tensor:
    return LINEAR_ACTIVATIONS[activation](F.linear(x, weight, bias))


# The norms a projection can carry as its prologue (`fxkiln.norm_linear`'s `norm`): the norm
# alone, and with the residual added first (the ops the pair replaces).
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)


def _fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_rms_norm(x, residual, weight, eps)


LINEAR_PROLOGUES: dict[str, tuple[Callable[..., torch.Tensor],
                                  Callable[..., tuple[torch.Tensor, torch.Tensor]]]] = {
    "rms": (_rms_norm, _fused_add_rms_norm),
    "layer": (layer_norm, fused_add_layer_norm),
}


@register_kernel("norm_linear", "native", supports=_everywhere)
def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor | None,
                eps: float, norm: str, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str) -> torch.Tensor:
    return linear(LINEAR_PROLOGUES[norm][0](x, norm_weight, norm_bias, eps), weight, bias,
                  activation)


# What `fxkiln.add_norm_linear` returns beside the projection: the rows a layer carries on.
CARRIES = ("sum", "normed")  # x + residual (pre-norm layers), the norm's output (post-norm)


@register_kernel("add_norm_linear", "native", supports=_everywhere)
def add_norm_linear(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                    norm_bias: torch.Tensor | None, eps: float, norm: str, weight: torch.Tensor,
                    bias: torch.Tensor | None, activation: str,
                    carry: str) -> tuple[torch.Tensor, torch.Tensor]:
    normed, summed = LINEAR_PROLOGUES[norm][1](x, residual, norm_weight, norm_bias, eps)
    return linear(normed, weight, bias, activation), summed if carry == "sum" else normed


@register_kernel("cache_attention", "native", supports=_everywhere)
def cache_attention(
    query: torch.Tensor,        # (batch, heads, queries, head_dim)
    key_cache: torch.Tensor,    # (batch, kv_heads, cache_len, head_dim)
    value_cache: torch.Tensor,
    mask: torch.Tensor | None,  # broadcasts to (batch, heads, queries, cache_len)
    scale: float,
) -> torch.Tensor:
    """What a Hugging Face attention over a StaticCache computes: repeat_kv, then SDPA."""
    group = query.shape[1] // key_cache.shape[1]
    key, value = repeat_kv(key_cache, group), repeat_kv(value_cache, group)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                          scale=scale).contiguous()


@register_kernel("cache_update_attention", "native", supports=_everywhere)
def cache_update_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,  # key, value (b, kv, q, d)
    position: torch.Tensor,     # (q,) positions of the caches to write
    key_cache: torch.Tensor, value_cache: torch.Tensor, mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """A StaticCache layer's update (index_copy_ of this step's key and value), then
    cache_attention over it: what the graph did."""
    key_cache.index_copy_(2, position, key)
    value_cache.index_copy_(2, position, value)
    return cache_attention(query, key_cache, value_cache, mask, scale)


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """(batch, kv_heads, length, dim) -> (batch, kv_heads * group, length, dim), each head
    `group` times in a row (Hugging Face's repeat_kv; `x` itself when group is 1)."""
    if group == 1:
        return x
    batch, kv_heads, length, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, group, length, dim).reshape(
        batch, kv_heads * group, length, dim)


@register_kernel("rotary_embedding", "native", supports=_everywhere)
def rotary_embedding(
    positions: torch.Tensor,      # (tokens,)
    query: torch.Tensor,          # (tokens, q_heads * head_size)
    key: torch.Tensor,            # (tokens, kv_heads * head_size)
    cos_sin_cache: torch.Tensor,  # (max_positions, rotary_dim): cos halves then sin halves
    head_size: int,
    is_neox: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # each (tokens, rot/2)
    return (_rotate(query, cos, sin, head_size, is_neox),
            _rotate(key, cos, sin, head_size, is_neox))


@register_kernel("rotary_cos_sin", "native", supports=_everywhere)
def rotary_cos_sin(
    x: torch.Tensor,    # (..., rotary_dim)
    cos: torch.Tensor,  # broadcasts to x, e.g. (batch, 1, seq, rotary_dim) against heads
    sin: torch.Tensor,
) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # rotate_half(x)
    return x * cos + rotated * sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_size: int,
            is_neox: bool) -> torch.Tensor:
    tokens = x.shape[0]
    x = x.view(tokens, -1, head_size)  # (tokens, heads, head_size)
    rotary_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    cos = cos.unsqueeze(1).to(x.dtype)  # (tokens, 1, rot/2)
    sin = sin.unsqueeze(1).to(x.dtype)
    if is_neox:
        x1, x2 = x_rot.chunk(2, dim=-1)
    else:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox:
        rotated = torch.cat((o1, o2), dim=-1)
    else:
        rotated = torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1).reshape(tokens, -1)
