"""Kernel census of decode steps: how many device kernels a step runs and how long they take.

`session_census(session, tokens, device)` rewinds a prefilled `DecodeSession` by a few positions
and runs that many decode steps under torch.profiler (CUDA activity only: kernels, copies and
memsets, including the kernels inside replayed CUDA graphs). The per-step figures are what
`summarize` makes of the device events:
    kernels_per_step, kernel_ms_per_step   compute kernels (copies and memsets not counted)
    busy_ms_per_step                       time at least one compute kernel runs: kernels that
                                           launch as programmatic dependents start (and wait)
                                           before the one before ends, so their durations add
                                           up to more than the device's busy time
    copies_per_step, copy_ms_per_step      memcpy / memset activities
    category_ms_per_step                   kernel ms by what the kernel's name says it is
    top_kernels                            the costliest kernel names, calls and us per step
The one home of the census: `benchmarks/decode_variants.py` (every fxkiln row on CUDA) and
`benchmarks/profile_decode.py` call it. On CPU there are no device kernels: None.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import torch

CENSUS_STEPS = 5
TOP_KERNELS = 12
NAME_CHARS = 90
# Ordered: the first category whose marker the lower-cased kernel name contains wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gemm", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "splitk", "linear_rows", "cublas")),
    ("attention", ("attention", "attn", "fmha", "flash", "decode_reduce")),
    ("norm", ("norm",)),
    ("rotary", ("rotary", "rope")),
    ("activation", ("silu", "gelu", "act_and_mul")),
    ("sampling", ("argmax",)),   # the greedy token: torch's ArgMax reduction or fxkiln's kernels
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce_kernel", "index",
                     "gather", "scatter", "cat")),
)
COPY_MARKERS = ("memcpy", "memset")


def is_copy(name: str) -> bool:
    """Whether a device activity is a memcpy or memset, not a compute kernel."""
    return any(marker in name.lower() for marker in COPY_MARKERS)


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The greedy token as Hugging Face `generate` picks it."""
    return logits.argmax(-1)


def category(name: str) -> str:
    lowered = name.lower()
    for label, markers in CATEGORIES:
        if any(marker in lowered for marker in markers):
            return label
    return "other"


def summarize(events: Iterable[tuple[str, float]], steps: int) -> dict[str, Any]:
    """Per-step census from device events given as (name, duration in microseconds)."""
    if steps < 1:
        raise ValueError(f"summarize: expected steps >= 1, found {steps}")
    calls: collections.Counter[str] = collections.Counter()
    micros: collections.Counter[str] = collections.Counter()
    copies, copy_us = 0, 0.0
    for name, duration_us in events:
        if is_copy(name):
            copies += 1
            copy_us += duration_us
            continue
        calls[name] += 1
        micros[name] += duration_us
    by_category: collections.Counter[str] = collections.Counter()
    for name, us in micros.items():
        by_category[category(name)] += us
    top = sorted(micros, key=lambda name: -micros[name])[:TOP_KERNELS]
    return {
        "census_steps": steps,
        "kernels_per_step": sum(calls.values()) / steps,
        "kernel_ms_per_step": sum(micros.values()) / steps / 1e3,
        "copies_per_step": copies / steps,
        "copy_ms_per_step": copy_us / steps / 1e3,
        "category_ms_per_step": {label: round(us / steps / 1e3, 5)
                                 for label, us in sorted(by_category.items())},
        "top_kernels": [{"name": name[:NAME_CHARS], "category": category(name),
                         "calls_per_step": calls[name] / steps,
                         "us_per_step": round(micros[name] / steps, 2)} for name in top],
    }


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Microseconds covered by at least one of the (start, end) intervals."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def kernel_census(step: Callable[[], Any], device: torch.device,
                  steps: int = CENSUS_STEPS) -> dict[str, Any] | None:
    """The census of `steps` calls of `step()` on a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    device_events = [event for event in profile.events()
                     if event.device_type == torch.autograd.DeviceType.CUDA]
    census = summarize(((event.name, event.time_range.elapsed_us()) for event in device_events),
                       steps)
    kernels = ((event.time_range.start, event.time_range.end) for event in device_events
               if not is_copy(event.name))
    census["busy_ms_per_step"] = busy_us(kernels) / steps / 1e3
    return census


def session_census(session: Any, tokens: torch.Tensor, device: torch.device,
                   pick: Callable[[torch.Tensor], torch.Tensor] = torch_argmax,
                   steps: int = CENSUS_STEPS) -> dict[str, Any] | None:
    """The census of `steps` decode steps of a prefilled `DecodeSession`, each one's tokens
    `pick(logits)`, run over the last `steps` positions it has already
    decoded (the context stays where the timing left it)."""
    if device.type != "cuda":
        return None
    if min(session.context_lens) <= steps:
        raise ValueError(f"session_census: expected a session past {steps} positions, found "
                         f"contexts {session.context_lens}")
    session.context_lens = [n - steps for n in session.context_lens]
    current = [tokens]

    def step() -> None:
        current[0] = pick(session.decode(current[0]))

    return kernel_census(step, device, steps)
