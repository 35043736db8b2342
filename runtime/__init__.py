"""fxkiln runtime: dispatch ops, attention op and forward context, KV caches, generation."""
from __future__ import annotations

from runtime import attention as _attention  # noqa: F401  (registers torch.ops.fxkiln.attention)
from runtime.generation import generate

__all__ = ["generate"]
