"""What every project model provides besides forward: the generation and compile seams."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from models.errors import UnsupportedConfigError
from models.layers.attention import collect_attention_specs
from runtime.kv_cache import AttentionSpec


class ProjectModel(nn.Module):
    """Base of fxkiln's own models (implements `runtime.generation.GenerationModel`).

    Subclasses set the class attributes below and define forward over flattened tokens.
    stacked_params_mapping: (fused parameter name part, checkpoint name part, shard id), e.g.
        ("qkv_proj", "q_proj", "q"): checkpoint tensors `...q_proj.*` load into `...qkv_proj.*`.
    """

    is_encoder_decoder: ClassVar[bool] = False
    stacked_params_mapping: ClassVar[tuple[tuple[str, str, str | int], ...]] = ()
    decoder_start_token_id: int | None = None

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def attention_specs(self) -> dict[str, AttentionSpec]:
        """Layer name -> this rank's attention spec, for KV cache allocation."""
        return collect_attention_specs(self)

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        """Inputs of forward for `num_tokens` tokens (for tracing and compile_model)."""
        raise NotImplementedError


def require_config(config: Any, key: str, supported: tuple[Any, ...]) -> Any:
    """`config.<key>` if it is one of `supported`, else UnsupportedConfigError naming the key."""
    value = getattr(config, key, None)
    if value not in supported:
        raise UnsupportedConfigError(key, value, list(supported))
    return value
