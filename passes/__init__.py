"""Graph rewrites. Each pass is one module; this registry maps pass names to classes."""
from __future__ import annotations

from passes.base import GraphPass, PassContext, PassResult
from passes.cleanup import CleanupPass
from passes.kernel_choice import KernelChoicePass
from passes.linear_epilogue import LinearEpiloguePass
from passes.qkv_fuse import QkvFusePass
from passes.qkv_split import QkvSplitPass

# Every pass by name, and the default pipeline (order matters: qkv_split narrows fused
# projections before qkv_fuse joins separate ones; linear_epilogue turns the projections they
# leave into dispatch ops; kernel_choice then binds every dispatch op to its implementation;
# cleanup last tidies up after the rewrites before it).
PASSES: dict[str, type[GraphPass]] = {
    KernelChoicePass.name: KernelChoicePass,
    QkvSplitPass.name: QkvSplitPass,
    QkvFusePass.name: QkvFusePass,
    LinearEpiloguePass.name: LinearEpiloguePass,
    CleanupPass.name: CleanupPass,
}
DEFAULT_PIPELINE: tuple[str, ...] = ("qkv_split", "qkv_fuse", "linear_epilogue", "kernel_choice",
                                     "cleanup")

__all__ = ["DEFAULT_PIPELINE", "PASSES", "GraphPass", "PassContext", "PassResult"]
