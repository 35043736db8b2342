"""Triton implementations of the dispatch ops, registered as "triton".

Each launcher takes the op's arguments followed by its launch constants (block sizes, warps).
The constants are a function of the arguments' static shapes (`*_constants` below): the
kernel_choice pass computes them once from the graph and writes them into it; the eager path
computes them on every call. Launchers return their outputs without launching when handed
FakeTensors, so a rewritten graph still runs under shape propagation.

Where it runs: CUDA with float16, bfloat16 or float32; on CPU only when Triton's interpreter is
active (detected from the jitted kernels themselves, not from the environment), and there "auto"
prefers native. Without Triton installed this module registers nothing.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from runtime.registry import register_kernel

try:
    from runtime.kernels import triton_jit
except ModuleNotFoundError as missing:  # Triton absent: no "triton" implementations
    if missing.name is None or not missing.name.startswith("triton"):
        raise
    triton_jit = None  # type: ignore[assignment]  # a module or nothing

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROW_BLOCK = 65536  # one program holds a whole row for the norms
SILU_BLOCK = 1024
INTERPRETER_PROCESSORS = 2  # stands in for the multiprocessor count where Triton is interpreted


def _jitted_for_interpreter() -> bool:
    if triton_jit is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton_jit.norm_rows_kernel, InterpretedFunction)


# Fixed when the kernels were jitted (TRITON_INTERPRET=1 at that moment): a fact of this process.
_INTERPRETED = _jitted_for_interpreter()


def interpreter_active() -> bool:
    """True when the kernels were jitted for Triton's CPU interpreter."""
    return _INTERPRETED


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    if triton_jit is None or dtype not in SUPPORTED_DTYPES:
        return False
    if device.type == "cuda":
        return not interpreter_active()
    return device.type == "cpu" and interpreter_active()


def priority(device: torch.device, dtype: torch.dtype) -> int:
    """Above native on CUDA; below it on CPU, where Triton only runs interpreted."""
    return 1 if device.type == "cuda" else -1


@functools.cache
def device_processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device); a stand-in elsewhere.
    Launch plans that spread work over the device size their grids by it."""
    if device.type != "cuda":
        return INTERPRETER_PROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def dependent_launch(device: torch.device) -> bool:
    """Whether the decode kernels launch on `device` as programmatic dependents (Hopper and
    later): each one's programs may start while the kernel before finishes, wait (griddepcontrol)
    before they read or write anything, and let the next kernel start once their main loads are
    issued. In a decode step's graph of ~130 kernels that hides most of each launch gap (an
    H200 probe: 80 norm + GEMV launches of Llama-1B's shapes, 651 -> 606 µs). A fact of the
    device, read once, like its multiprocessor count."""
    if device.type != "cuda" or interpreter_active():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def dependent_options(device: torch.device) -> dict[str, Any]:
    """The kernel arguments of a launch on `device`: DEPENDENT and Triton's `launch_pdl`."""
    return {"DEPENDENT": True, "launch_pdl": True} if dependent_launch(device) else {}


# -- launch constants (compile time in graphs, per call in eager) -------------------------------
def _static(size: Any, what: str) -> int:
    if isinstance(size, int):
        return size
    raise ValueError(f"triton kernels: expected a static {what}, found symbolic size {size}")


def observed(x: torch.Tensor) -> bool:
    """Whether a dispatch mode (FLOP counting) or fake tensors see this call: Triton kernels are
    invisible to both, so such a call runs the native ops."""
    return isinstance(x, FakeTensor) or _get_current_dispatch_mode() is not None


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _warps_for(block_elements: int) -> int:
    return min(max(block_elements // 512, 1), 16)


def _norm_constants(x: torch.Tensor) -> tuple[int, int]:
    hidden = _static(x.shape[-1], "hidden size (last dimension)")
    block_size = _next_power_of_2(hidden)
    if block_size > MAX_ROW_BLOCK:
        raise ValueError(f"triton rms_norm: expected hidden size <= {MAX_ROW_BLOCK}, found {hidden}")
    return block_size, _warps_for(block_size)


def rms_norm_constants(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[int, int]:
    return _norm_constants(x)


def fused_add_rms_norm_constants(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> tuple[int, int]:
    return _norm_constants(x)


def layer_norm_constants(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         eps: float) -> tuple[int, int]:
    return _norm_constants(x)


def fused_add_layer_norm_constants(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor | None, eps: float) -> tuple[int, int]:
    return _norm_constants(x)


def silu_and_mul_constants(x: torch.Tensor) -> tuple[int, int]:
    half = _static(x.shape[-1], "last dimension") // 2
    block_size = min(_next_power_of_2(half), SILU_BLOCK)
    return block_size, _warps_for(block_size)


def rotary_embedding_constants(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    cos_sin_cache: torch.Tensor, head_size: int, is_neox: bool,
) -> tuple[int, int, int, int, int]:
    """(query heads block, key heads block, half-rotary block, pass-through block, warps)."""
    half_rotary = _static(cos_sin_cache.shape[-1], "rotary dimension") // 2
    query_heads = _static(query.shape[-1], "query width") // head_size
    key_heads = _static(key.shape[-1], "key width") // head_size
    pass_through = head_size - 2 * half_rotary
    half_block = _next_power_of_2(half_rotary)
    query_block, key_block = _next_power_of_2(query_heads), _next_power_of_2(key_heads)
    pass_block = _next_power_of_2(pass_through) if pass_through > 0 else 0
    return query_block, key_block, half_block, pass_block, _warps_for(query_block * half_block)


# -- launchers (the targets the kernel_choice pass writes into graphs) -------------------------
def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, last) with a contiguous last dimension."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          bias: torch.Tensor | None, eps: float, block_size: int, num_warps: int,
          layer_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out_dtype = sum_dtype if layer_norm else torch.promote_types(sum_dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    residual_out = None if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    if isinstance(x, FakeTensor) or out.numel() == 0:
        return out, residual_out
    x_rows = _rows(x)  # (rows, hidden)
    residual_rows = x_rows if residual is None else _rows(residual)  # (rows, hidden)
    weight = weight.contiguous()
    triton_jit.norm_rows_kernel[(x_rows.shape[0],)](
        out, out if residual_out is None else residual_out, x_rows, residual_rows, weight,
        weight if bias is None else bias.contiguous(), x_rows.stride(0), residual_rows.stride(0),
        x_rows.shape[1], eps, HAS_RESIDUAL=residual is not None, LAYER_NORM=layer_norm,
        HAS_BIAS=bias is not None, BLOCK_SIZE=block_size, num_warps=num_warps,
        **dependent_options(x.device))
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, block_size: int,
             num_warps: int) -> torch.Tensor:
    return _norm(x, None, weight, None, eps, block_size, num_warps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       block_size: int, num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, residual_out = _norm(x, residual, weight, None, eps, block_size, num_warps)
    assert residual_out is not None
    return out, residual_out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               block_size: int, num_warps: int) -> torch.Tensor:
    return _norm(x, None, weight, bias, eps, block_size, num_warps, layer_norm=True)[0]


def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, eps: float, block_size: int,
                         num_warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, residual_out = _norm(x, residual, weight, bias, eps, block_size, num_warps,
                              layer_norm=True)
    assert residual_out is not None
    return out, residual_out


# The activations act_and_mul_kernel computes, by the name its ACTIVATION constant stands for.
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def act_and_mul(x: torch.Tensor, activation: str, block_size: int,
                num_warps: int) -> torch.Tensor:
    """act(first half of x's last dimension) * second half; `activation` names the act."""
    half = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], half), dtype=x.dtype, device=x.device)  # (..., half)
    if isinstance(x, FakeTensor) or out.numel() == 0:
        return out
    x_rows = _rows(x)  # (rows, 2 * half)
    grid = (x_rows.shape[0], -(-half // block_size))
    triton_jit.act_and_mul_kernel[grid](out, x_rows, x_rows.stride(0), half,
                                        ACTIVATION=ACTIVATIONS[activation],
                                        BLOCK_SIZE=block_size, num_warps=num_warps)
    return out


def silu_and_mul(x: torch.Tensor, block_size: int, num_warps: int) -> torch.Tensor:
    return act_and_mul(x, "silu", block_size, num_warps)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    cos_sin_cache: torch.Tensor, head_size: int, is_neox: bool,
    query_heads_block: int, key_heads_block: int, half_block: int, pass_block: int, num_warps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    query_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    key_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if isinstance(query, FakeTensor) or query.shape[0] == 0:
        return query_out, key_out
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    query_rows, key_rows = _rows(query), _rows(key)  # (tokens, heads * head_size) each
    triton_jit.rotary_kernel[(query_rows.shape[0],)](
        query_out, key_out, query_rows, key_rows, positions.contiguous(), cache,
        query_rows.stride(0), key_rows.stride(0), cache.stride(0),
        query_rows.shape[1] // head_size, key_rows.shape[1] // head_size, head_size,
        cache.shape[-1] // 2, IS_NEOX=is_neox, QUERY_HEADS_BLOCK=query_heads_block,
        KEY_HEADS_BLOCK=key_heads_block, HALF_BLOCK=half_block, PASS_BLOCK=pass_block,
        num_warps=num_warps)
    return query_out, key_out


if triton_jit is not None:
    for _op, _fn, _constants in (
        ("rms_norm", rms_norm, rms_norm_constants),
        ("fused_add_rms_norm", fused_add_rms_norm, fused_add_rms_norm_constants),
        ("layer_norm", layer_norm, layer_norm_constants),
        ("fused_add_layer_norm", fused_add_layer_norm, fused_add_layer_norm_constants),
        ("silu_and_mul", silu_and_mul, silu_and_mul_constants),
        ("rotary_embedding", rotary_embedding, rotary_embedding_constants),
    ):
        register_kernel(_op, "triton", supports=supports, priority=priority,
                        launch_constants=_constants)(_fn)
