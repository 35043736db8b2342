"""Kernel registry: every implementation of a dispatch op, by op name and implementation name.

The registry lists what *can* run; it never remembers what was *chosen*. Choices live in a
`CompileConfig` (compile time) or in the active kernel settings (the eager slow path).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

AUTO = "auto"


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of a dispatch op."""

    op: str
    name: str
    fn: Callable[..., Any]
    supports: Callable[[torch.device, torch.dtype], bool]
    priority: int = 0  # under "auto", the supported implementation with the highest priority wins


_IMPLEMENTATIONS: dict[str, dict[str, KernelImpl]] = {}


def register_kernel(
    op: str,
    name: str,
    *,
    supports: Callable[[torch.device, torch.dtype], bool],
    priority: int = 0,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as implementation `name` of dispatch op `op`."""
    if name == AUTO:
        raise ValueError(f"implementation name {AUTO!r} is reserved for automatic choice")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        impls = _IMPLEMENTATIONS.setdefault(op, {})
        if name in impls:
            raise ValueError(f"op {op!r} already has an implementation named {name!r}")
        impls[name] = KernelImpl(op=op, name=name, fn=fn, supports=supports, priority=priority)
        return fn

    return decorate


def kernel_ops() -> tuple[str, ...]:
    """Names of all dispatch ops that have at least one implementation."""
    return tuple(sorted(_IMPLEMENTATIONS))


def kernel_implementations(op: str) -> dict[str, KernelImpl]:
    """Implementations of `op` by name; ValueError naming the known ops if `op` is unknown."""
    try:
        return dict(_IMPLEMENTATIONS[op])
    except KeyError:
        raise ValueError(f"unknown dispatch op {op!r}; expected one of {list(kernel_ops())}") from None


def choose_kernel(op: str, requested: str, device: torch.device, dtype: torch.dtype) -> KernelImpl:
    """The implementation of `op` to run on `device` for `dtype`.

    `requested` is an implementation name or "auto". An explicit choice the device cannot run
    raises ValueError naming the implementations that can.
    """
    impls = kernel_implementations(op)
    runnable = [impl for impl in impls.values() if impl.supports(device, dtype)]
    if requested == AUTO:
        if not runnable:
            raise ValueError(f"no implementation of {op!r} supports device {device} with {dtype}; "
                             f"registered: {sorted(impls)}")
        return max(runnable, key=lambda impl: impl.priority)
    if requested not in impls:
        raise ValueError(f"unknown implementation {requested!r} for op {op!r}; "
                         f"expected one of {[AUTO, *sorted(impls)]}")
    impl = impls[requested]
    if impl not in runnable:
        raise ValueError(f"implementation {requested!r} of op {op!r} cannot run on device {device} "
                         f"with {dtype}; implementations that can: {sorted(i.name for i in runnable)}")
    return impl
