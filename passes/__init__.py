"""Graph rewrites. Each pass is one module; this registry maps pass names to classes."""
from __future__ import annotations

from passes.base import GraphPass, PassContext, PassResult
from passes.cleanup import CleanupPass

# Every pass by name, and the default pipeline (order matters: cleanup last tidies up after
# the rewrites before it).
PASSES: dict[str, type[GraphPass]] = {
    CleanupPass.name: CleanupPass,
}
DEFAULT_PIPELINE: tuple[str, ...] = ("cleanup",)

__all__ = ["DEFAULT_PIPELINE", "PASSES", "GraphPass", "PassContext", "PassResult"]
