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
    # Under "auto", the supported implementation with the highest priority wins; a callable
    # priority depends on (device, dtype), e.g. a Triton kernel that runs on CPU only in the
    # interpreter ranks below native there.
    priority: int | Callable[[torch.device, torch.dtype], int] = 0
    # Compile-time constants (block sizes, warps) from the op's arguments, appended to them when
    # calling `fn`: the kernel_choice pass bakes them into the graph, the eager path computes them
    # on every call. Arguments may be FakeTensors. None: `fn` takes the op's arguments as they are.
    launch_constants: Callable[..., tuple[Any, ...]] | None = None

    def priority_for(self, device: torch.device, dtype: torch.dtype) -> int:
        return self.priority(device, dtype) if callable(self.priority) else self.priority

    def call_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The arguments `fn` takes for a call of the op with `args`."""
        if self.launch_constants is None:
            return args
        return (*args, *self.launch_constants(*args))


_IMPLEMENTATIONS: dict[str, dict[str, KernelImpl]] = {}


def register_kernel(
    op: str,
    name: str,
    *,
    supports: Callable[[torch.device, torch.dtype], bool],
    priority: int | Callable[[torch.device, torch.dtype], int] = 0,
    launch_constants: Callable[..., tuple[Any, ...]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register `fn` as implementation `name` of dispatch op `op`."""
    if name == AUTO:
        raise ValueError(f"implementation name {AUTO!r} is reserved for automatic choice")

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        impls = _IMPLEMENTATIONS.setdefault(op, {})
        if name in impls:
            raise ValueError(f"op {op!r} already has an implementation named {name!r}")
        impls[name] = KernelImpl(op=op, name=name, fn=fn, supports=supports, priority=priority,
                                 launch_constants=launch_constants)
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
        return max(runnable, key=lambda impl: impl.priority_for(device, dtype))
    if requested not in impls:
        raise ValueError(f"unknown implementation {requested!r} for op {op!r}; "
                         f"expected one of {[AUTO, *sorted(impls)]}")
    impl = impls[requested]
    if impl not in runnable:
        raise ValueError(f"implementation {requested!r} of op {op!r} cannot run on device {device} "
                         f"with {dtype}; implementations that can: {sorted(i.name for i in runnable)}")
    return impl
