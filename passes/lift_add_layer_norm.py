"""lift_add_layer_norm: a residual add whose sum a layer_norm reads becomes fused_add_layer_norm."""
from __future__ import annotations

import torch

from passes.lift_add_rms_norm import AddNormPass, add_norm_patterns
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)

# What the pass matches: layer_norm(a + b) as lift_layer_norm writes it (or a model calls it),
# the sum read elsewhere or nowhere else. What it writes: fused_add_layer_norm(a, b, weight,
# bias, eps), whose results are the norm and the sum; its native kernel adds as `a + b` does and
# normalizes that sum with the same `F.layer_norm`.
PATTERNS = add_norm_patterns("layer_norm", torch.ops.fxkiln.layer_norm, with_bias=True)
FUSED = torch.ops.fxkiln.fused_add_layer_norm.default


class LiftAddLayerNormPass(AddNormPass):
    """Fuses the residual add before a LayerNorm into fxkiln's fused_add_layer_norm.

    A post-norm block (BART, Whisper's decoder... every `residual + sublayer(x)` followed by
    `nn.LayerNorm`) writes the sum and reads it back for the norm: fused, it is one kernel
    that reads both addends once. The fused op's second result is the sum, for any other
    reader. Only adds of two tensors of the sum's shape are fused (no broadcast bias).

    Before (the golden test's graph):
        add = x + residual
        layer_norm = torch.ops.fxkiln.layer_norm(add, weight, bias, 1e-05)
        return layer_norm
    After:
        fused_add_layer_norm_default = torch.ops.fxkiln.fused_add_layer_norm.default(x, residual, weight, bias, 1e-05)
        getitem = fused_add_layer_norm_default[0]
        return getitem
    """

    name = "lift_add_layer_norm"

    patterns = PATTERNS
    fused = FUSED
    norm_arguments = ("weight", "bias", "eps")
