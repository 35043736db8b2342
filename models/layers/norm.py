"""RMSNorm and LayerNorm through the dispatch ops (`fxkiln.rms_norm` / `fused_add_rms_norm`,
`fxkiln.layer_norm` / `fused_add_layer_norm`), the targets of kernel choice."""
from __future__ import annotations

import torch
from torch import nn

import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)
from models.layers.params import make_param


class RMSNorm(nn.Module):
    """x / rms(x) * weight. With a residual: adds it first and returns (normed, new residual)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = make_param(hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return torch.ops.fxkiln.rms_norm.default(x, self.weight, self.eps)  # (tokens, hidden)
        normed, new_residual = torch.ops.fxkiln.fused_add_rms_norm.default(
            x, residual, self.weight, self.eps)                                # each (tokens, hidden)
        return normed, new_residual

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNorm(nn.Module):
    """Standard layer norm with weight and bias (replicated under TP). With a residual: adds it
    first (one kernel) and returns (normed, sum), as RMSNorm does."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = make_param(hidden_size)
        self.bias = make_param(hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return torch.ops.fxkiln.layer_norm.default(x, self.weight, self.bias, self.eps)
        normed, summed = torch.ops.fxkiln.fused_add_layer_norm.default(
            x, residual, self.weight, self.bias, self.eps)                     # each (tokens, hidden)
        return normed, summed

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
