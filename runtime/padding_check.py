"""Translation validation of padding: each bucket's padded forward against the exact-size one.

The bucket runner pads a call of n tokens to the smallest bucket b >= n: rows [n, b) of the
token inputs hold whatever the static buffers held (stale data on a device), and rows [0, n)
of the outputs are returned. That is right only if no real output row reads a padding row: the
rows must be independent. A model that sums over its rows, or lets tokens attend to each other
without the runtime's attention metadata, is not; nothing in its graph says so reliably, so the
runner checks instead of assuming. For each bucket, once, before capture: the forward at n real
rows (n = one more than the next smaller bucket, the most padding the bucket sees) against the
forward at b rows, rows [n, b) filled with other data (floats drawn at random; integers are
the example's rows repeated, so that ids stay valid), on the real rows and on every output without the
token dimension. A difference beyond the dtype's rounding names the bucket and the output.

fxkiln's own models, and Hugging Face serving graphs, declare their rows independent
(`rows_independent = True`: their attention reads each sequence's own tokens through the
metadata) and skip the check.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from runtime.static_inputs import StaticInputs

logger = logging.getLogger(__name__)

# (rtol, atol) a row-independent forward stays within when only its batch size changes (kernels
# may block a different M differently); a leak of padding into real rows is far beyond these
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-7, 1e-9)}
LOW_PRECISION_TOLERANCE = (2e-2, 2e-2)  # bfloat16, float16


def exact_sizes_reason(inputs: StaticInputs, run: Callable[[int, Sequence[Any]], Any],
                       buckets: Sequence[int]) -> str:
    """Why graphs may replay only for calls of exactly a bucket's size ("" when padding is
    safe), warned once."""
    with torch.no_grad():
        leak = padding_leak(inputs, run, buckets)
    if leak is None:
        return ""
    reason = f"padding changes real rows ({leak})"
    logger.warning("the model's rows interact: %s; graphs replay only for calls of exactly a "
                   "captured size, other calls run eagerly", reason)
    return reason


def padding_leak(inputs: StaticInputs, run: Callable[[int, Sequence[Any]], Any],
                 buckets: Sequence[int]) -> str | None:
    """Why padding changes real rows (the first bucket and output where it does), or None.

    `run(tokens, args)` is the eager forward of a step of `tokens` tokens. The static buffers
    are left as they were found.
    """
    saved = {index: buffer.clone() for index, buffer in inputs.buffers.items()}
    generator = torch.Generator().manual_seed(0)
    try:
        smaller = 0
        for bucket in sorted(buckets):
            real, smaller = smaller + 1, bucket
            if real == bucket:
                continue  # nothing padded
            exact = pytree.tree_leaves(_cloned(run(real, inputs.capture_args(real))))
            for buffer in inputs.buffers.values():  # rows [real, bucket) are the padding
                _refill(buffer[real:bucket], generator)
            padded = pytree.tree_leaves(run(bucket, inputs.capture_args(bucket)))
            reason = _difference(exact, padded, real, bucket)
            if reason is not None:
                return f"bucket {bucket} with {real} real rows: {reason}"
        return None
    finally:
        for index, buffer in saved.items():
            inputs.buffers[index].copy_(buffer)


def _cloned(outputs: Any) -> Any:
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, outputs)


def _refill(rows: torch.Tensor, generator: torch.Generator) -> None:
    """Padding rows unlike the real ones: random floats. Integer rows keep what the buffer holds
    (the example's rows repeated), so that ids and positions stay valid."""
    if rows.is_floating_point():
        rows.copy_(torch.randn(rows.shape, generator=generator).to(rows))


def _difference(exact: list[Any], padded: list[Any], real: int, bucket: int) -> str | None:
    if len(exact) != len(padded):
        return f"{len(padded)} outputs padded, {len(exact)} at the exact size"
    for index, (want, got) in enumerate(zip(exact, padded)):
        if not isinstance(want, torch.Tensor):
            if want != got:
                return f"output {index} is {got!r} padded, {want!r} at the exact size"
            continue
        if got.dim() and got.shape[0] == bucket and want.dim() and want.shape[0] == real:
            got = got[:real]
        if got.shape != want.shape:
            return (f"output {index} has shape {tuple(got.shape)} padded, "
                    f"{tuple(want.shape)} at the exact size")
        if not _close(got, want):
            worst = (got.double() - want.double()).abs().max().item()
            return f"output {index} differs on the real rows by up to {worst:.3g}"
    return None


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if not want.is_floating_point():
        return torch.equal(got, want)
    rtol, atol = TOLERANCES.get(want.dtype, LOW_PRECISION_TOLERANCE)
    return torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
