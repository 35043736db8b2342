"""Triton implementations of the ops the lifting passes write, registered as "triton".

`gelu_and_mul` runs the activation-and-mul kernel that `silu_and_mul` runs; `rotary_cos_sin`
has a kernel of its own (`runtime.kernels.lifted_jit`). Where they run, their priority, launch
constants and FakeTensor behaviour follow `runtime.kernels.triton_kernels`.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor

from runtime.kernels import triton_kernels
from runtime.kernels.triton_kernels import _next_power_of_2, _static, _warps_for
from runtime.registry import register_kernel

try:
    from runtime.kernels import lifted_jit
except ModuleNotFoundError as missing:  # Triton absent: no "triton" implementations
    if missing.name is None or not missing.name.startswith("triton"):
        raise
    lifted_jit = None  # type: ignore[assignment]  # a module or nothing

GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}  # F.gelu's `approximate` -> kernel's
ROTARY_TILE = 1024  # elements of one half-row block a rotary program holds
MAX_ROTARY_DIMS = 4


def gelu_and_mul_constants(x: torch.Tensor, approximate: str) -> tuple[int, int]:
    if approximate not in GELU_ACTIVATIONS:
        raise ValueError(f"triton gelu_and_mul: expected approximate in "
                         f"{sorted(GELU_ACTIVATIONS)}, found {approximate!r}")
    return triton_kernels.silu_and_mul_constants(x)


def gelu_and_mul(x: torch.Tensor, approximate: str, block_size: int,
                 num_warps: int) -> torch.Tensor:
    return triton_kernels.act_and_mul(x, GELU_ACTIVATIONS[approximate], block_size, num_warps)


def rotary_cos_sin_constants(x: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor) -> tuple[int, int, int]:
    """(rows per program, half-row block, warps) from x's static last dimension."""
    if x.dim() > MAX_ROTARY_DIMS:
        raise ValueError(f"triton rotary_cos_sin: expected at most {MAX_ROTARY_DIMS} "
                         f"dimensions, found x of shape {tuple(x.shape)}")
    width = _static(x.shape[-1], "rotary dimension (last dimension)")
    if width % 2:
        raise ValueError(f"triton rotary_cos_sin: expected an even last dimension, found {width}")
    half_block = _next_power_of_2(width // 2)
    rows_block = max(ROTARY_TILE // half_block, 1)
    return rows_block, half_block, _warps_for(rows_block * half_block)


def rotary_cos_sin(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows_block: int,
                   half_block: int, num_warps: int) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if isinstance(x, FakeTensor) or out.numel() == 0:
        return out
    lead = (None,) * (MAX_ROTARY_DIMS - x.dim())  # x as (size0, size1, size2, 2 * half)
    x4 = x[lead]
    cos4, sin4 = torch.broadcast_to(cos, x.shape)[lead], torch.broadcast_to(sin, x.shape)[lead]
    rows = math.prod(x4.shape[:3])
    lifted_jit.rotary_cos_sin_kernel[(-(-rows // rows_block),)](
        out, x4, cos4, sin4, rows, x4.shape[1], x4.shape[2], x4.shape[3] // 2,
        *x4.stride(), *cos4.stride(), *sin4.stride(),
        ROWS_BLOCK=rows_block, HALF_BLOCK=half_block, num_warps=num_warps)
    return out


if lifted_jit is not None and triton_kernels.triton_jit is not None:
    for _op, _fn, _constants in (
        ("gelu_and_mul", gelu_and_mul, gelu_and_mul_constants),
        ("rotary_cos_sin", rotary_cos_sin, rotary_cos_sin_constants),
    ):
        register_kernel(_op, "triton", supports=triton_kernels.supports,
                        priority=triton_kernels.priority, launch_constants=_constants)(_fn)
