"""The active kernel settings read by the eager (uncompiled) dispatch path.

Eager calls of a dispatch op look their implementation up here on every call: that lookup is
the per-call cost that compile-time kernel choice removes. Settings are scoped with a context
manager and kept in a ContextVar, so two threads or tasks never see each other's choice.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

from runtime.registry import AUTO

_ACTIVE_KERNELS: ContextVar[Mapping[str, str]] = ContextVar(
    "fxkiln_active_kernels", default=MappingProxyType({})
)


def active_kernel_choice(op: str) -> str:
    """The implementation name ("auto" when unset) the eager path should use for `op`."""
    return _ACTIVE_KERNELS.get().get(op, AUTO)


@contextmanager
def kernel_settings(kernels: Mapping[str, str]) -> Iterator[None]:
    """Within the block, eager dispatch ops use `kernels` (op name -> implementation name)."""
    token = _ACTIVE_KERNELS.set(MappingProxyType(dict(kernels)))
    try:
        yield
    finally:
        _ACTIVE_KERNELS.reset(token)
