"""What every project model provides besides forward: the generation and compile seams."""
from __future__ import annotations

from typing import Any, ClassVar

from models.errors import UnsupportedConfigError
from models.layers.attention import collect_attention_specs
from runtime.kv_cache import AttentionSpec
from runtime.serving import ServingModel


class ProjectModel(ServingModel):
    """Base of fxkiln's own models (implements `runtime.generation.GenerationModel`).

    Subclasses set the class attributes below and define forward over flattened tokens; the
    compile and capture seams (`example_context`, `capture_spec`) come from
    `runtime.serving.ServingModel`, shared with the graphs built from Hugging Face models.
    stacked_params_mapping: (fused parameter name part, checkpoint name part, shard id), e.g.
        ("qkv_proj", "q_proj", "q"): checkpoint tensors `...q_proj.*` load into `...qkv_proj.*`.
    """

    is_encoder_decoder = False
    stacked_params_mapping: ClassVar[tuple[tuple[str, str, str | int], ...]] = ()
    decoder_start_token_id: int | None = None

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    def attention_specs(self) -> dict[str, AttentionSpec]:
        """Layer name -> this rank's attention spec, for KV cache allocation."""
        return collect_attention_specs(self)


def require_config(config: Any, key: str, supported: tuple[Any, ...]) -> Any:
    """`config.<key>` if it is one of `supported`, else UnsupportedConfigError naming the key."""
    value = getattr(config, key, None)
    if value not in supported:
        raise UnsupportedConfigError(key, value, list(supported))
    return value
