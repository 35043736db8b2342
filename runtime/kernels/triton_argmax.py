"""Triton implementation of `argmax` (each row's greedy token), registered as "triton".

`torch.argmax` over one row of 128k logits (Llama-3's vocabulary) is one reduction kernel that
took 28 µs on an H200, 3% of a Llama-1B decode step; these two kernels spread a row over
programs of ARGMAX_BLOCK logits and then combine the blocks (`runtime.kernels.argmax_jit`).
A row that fits one block takes one launch. The answer is `torch.argmax`'s, ties and NaNs
included. Where it runs and its priority follow `runtime.kernels.triton_kernels`.
"""
from __future__ import annotations

import torch

from runtime.kernels import argmax_jit
from runtime.kernels.triton_kernels import (_next_power_of_2, _rows, _static, observed, priority,
                                            supports)
from runtime.registry import register_kernel

ARGMAX_BLOCK = 2048   # logits per program: 63 programs for one row of a 128k vocabulary
ARGMAX_WARPS = 4
MAX_BLOCKS = 4096     # the combine holds a row's partials in one program


def argmax_constants(x: torch.Tensor) -> tuple[int, int]:
    """(logits per program, warps) for rows of `x`'s last dimension."""
    vocab = _static(x.shape[-1], "vocabulary size (last dimension)")
    block = min(_next_power_of_2(vocab), ARGMAX_BLOCK)
    if -(-vocab // block) > MAX_BLOCKS:
        raise ValueError(f"triton argmax: expected at most {MAX_BLOCKS * block} logits a row, "
                         f"found {vocab}")
    return block, ARGMAX_WARPS


def argmax(x: torch.Tensor, block: int, num_warps: int) -> torch.Tensor:
    """x (..., vocab) -> the index of each row's first maximum (...,), int64, as
    `x.argmax(-1)`; `block` logits per program."""
    if observed(x) or x.shape[-1] == 0:
        return x.argmax(-1)   # also raises torch's error for an empty row
    out = torch.empty(x.shape[:-1], dtype=torch.int64, device=x.device)
    if out.numel() == 0:
        return out
    rows = _rows(x)  # (rows, vocab)
    vocab = rows.shape[1]
    blocks = -(-vocab // block)
    if blocks == 1:
        argmax_jit.argmax_blocks_kernel[(rows.shape[0], 1)](
            out, out, out, rows, rows.stride(0), vocab, 1, BLOCK=block, SINGLE=True,
            num_warps=num_warps)
        return out
    values = torch.empty((rows.shape[0], blocks), dtype=torch.float32, device=x.device)
    indices = torch.empty((rows.shape[0], blocks), dtype=torch.int32, device=x.device)
    argmax_jit.argmax_blocks_kernel[(rows.shape[0], blocks)](
        out, values, indices, rows, rows.stride(0), vocab, blocks, BLOCK=block, SINGLE=False,
        num_warps=num_warps)
    argmax_jit.argmax_combine_kernel[(rows.shape[0],)](
        out, values, indices, blocks, BLOCK_S=_next_power_of_2(blocks), num_warps=1)
    return out


register_kernel("argmax", "triton", supports=supports, priority=priority,
                launch_constants=argmax_constants)(argmax)
