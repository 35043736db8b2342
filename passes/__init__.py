"""Graph rewrites. Each pass is one module; this registry maps pass names to classes."""
from __future__ import annotations

from passes.base import GraphPass, PassContext, PassResult
from passes.cleanup import CleanupPass
from passes.fold_rotary import FoldRotaryPass
from passes.kernel_choice import KernelChoicePass
from passes.lift_act_and_mul import LiftActAndMulPass
from passes.lift_add_layer_norm import LiftAddLayerNormPass
from passes.lift_add_rms_norm import LiftAddRmsNormPass
from passes.lift_cache_attention import LiftCacheAttentionPass
from passes.lift_layer_norm import LiftLayerNormPass
from passes.lift_rms_norm import LiftRmsNormPass
from passes.lift_rotary import LiftRotaryPass
from passes.linear_epilogue import LinearEpiloguePass
from passes.norm_prologue import NormProloguePass
from passes.qkv_fuse import QkvFusePass
from passes.qkv_split import QkvSplitPass
from passes.sdpa_masks import SdpaMasksPass

# Every pass by name, and the default pipeline. Order matters: qkv_split narrows fused
# projections before qkv_fuse joins separate ones (gate_proj and up_proj too, into the one
# projection whose halves lift_act_and_mul reads); the lifting passes turn the idioms models
# spell out in torch ops into dispatch ops (lift_add_rms_norm fuses the adds before the norms
# lift_rms_norm wrote, lift_add_layer_norm those before the norms lift_layer_norm wrote);
# lift_cache_attention turns SDPA over a StaticCache's repeated K/V into cache_attention (it
# reads a boolean mask as it is: before sdpa_masks, which converts a boolean mask the layers'
# SDPA calls share once, for the SDPA calls left); linear_epilogue turns
# the projections left into fxkiln.linear, folding in an activation that is their only reader
# (the lifted SiLU-and-mul of a fused gate_up too); norm_prologue folds a norm whose output one
# of those projections reads into it (its kernel decides per launch whether to normalize in the
# GEMV: runtime.kernels.triton_norm_linear.tuned_prologue_rows); fold_rotary folds each
# fxkiln.rotary_embedding that only feeds an attention into it (before kernel_choice, which
# binds the rotary op to a kernel and the attention op keeps); kernel_choice then binds every
# dispatch op, lifted or written by the model, to its chosen kernel; cleanup last tidies up
# after the rewrites.
PASSES: dict[str, type[GraphPass]] = {
    QkvSplitPass.name: QkvSplitPass,
    QkvFusePass.name: QkvFusePass,
    LiftRmsNormPass.name: LiftRmsNormPass,
    LiftAddRmsNormPass.name: LiftAddRmsNormPass,
    LiftLayerNormPass.name: LiftLayerNormPass,
    LiftAddLayerNormPass.name: LiftAddLayerNormPass,
    LiftActAndMulPass.name: LiftActAndMulPass,
    LiftRotaryPass.name: LiftRotaryPass,
    LiftCacheAttentionPass.name: LiftCacheAttentionPass,
    SdpaMasksPass.name: SdpaMasksPass,
    LinearEpiloguePass.name: LinearEpiloguePass,
    NormProloguePass.name: NormProloguePass,
    FoldRotaryPass.name: FoldRotaryPass,
    KernelChoicePass.name: KernelChoicePass,
    CleanupPass.name: CleanupPass,
}
DEFAULT_PIPELINE: tuple[str, ...] = (
    "qkv_split", "qkv_fuse", "lift_rms_norm", "lift_add_rms_norm", "lift_layer_norm",
    "lift_add_layer_norm", "lift_act_and_mul", "lift_rotary", "lift_cache_attention",
    "sdpa_masks", "linear_epilogue", "norm_prologue", "fold_rotary", "kernel_choice", "cleanup")

__all__ = ["DEFAULT_PIPELINE", "PASSES", "GraphPass", "PassContext", "PassResult"]
