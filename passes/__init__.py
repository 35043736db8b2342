"""Graph rewrites. Each pass is one module; this registry maps pass names to classes."""
from __future__ import annotations

from passes.base import GraphPass, PassContext, PassResult
from passes.cleanup import CleanupPass
from passes.kernel_choice import KernelChoicePass

# Every pass by name, and the default pipeline (order matters: kernel_choice first, so later
# passes see direct kernel calls; cleanup last tidies up after the rewrites before it).
PASSES: dict[str, type[GraphPass]] = {
    KernelChoicePass.name: KernelChoicePass,
    CleanupPass.name: CleanupPass,
}
DEFAULT_PIPELINE: tuple[str, ...] = ("kernel_choice", "cleanup")

__all__ = ["DEFAULT_PIPELINE", "PASSES", "GraphPass", "PassContext", "PassResult"]
