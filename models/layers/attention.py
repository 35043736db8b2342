"""The attention layer: allocates the output buffer, then one `fxkiln.attention` op node."""
from __future__ import annotations

import torch
from torch import nn

import runtime.attention  # noqa: F401  (registers torch.ops.fxkiln.attention)
from runtime.kv_cache import AttentionKind, AttentionSpec


class Attention(nn.Module):
    """Attention over flattened tokens; cache, mask and sequence layout come from the forward
    context (see `runtime.attention`). Head counts are this rank's (already divided by TP).

    `layer_name` must be unique in the model: it keys the layer's KV cache.
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 kind: AttentionKind = AttentionKind.DECODER, *, layer_name: str) -> None:
        super().__init__()
        self.layer_name = layer_name
        self.spec = AttentionSpec(num_heads=num_heads, num_kv_heads=num_kv_heads or num_heads,
                                  head_size=head_size, scale=scale, kind=kind)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output = torch.empty_like(query)  # (tokens, heads * head_size)
        torch.ops.fxkiln.attention.default(query, key, value, output, self.layer_name)
        return output

    def extra_repr(self) -> str:
        spec = self.spec
        return (f"{self.layer_name!r}, {spec.kind.value}, heads={spec.num_heads}, "
                f"kv_heads={spec.num_kv_heads}, head_size={spec.head_size}")


def collect_attention_specs(model: nn.Module) -> dict[str, AttentionSpec]:
    """Layer name -> spec for every Attention module in `model`; ValueError on a duplicate name."""
    specs: dict[str, AttentionSpec] = {}
    for module in model.modules():
        if isinstance(module, Attention):
            if module.layer_name in specs:
                raise ValueError(f"two attention layers share the name {module.layer_name!r}")
            specs[module.layer_name] = module.spec
    return specs
