"""Forward contexts for warm-up and capture of a project model's decode step.

A runner warms up and captures by running the model itself, for each bucket size, outside any
generation loop; the attention ops still need a forward context. `decode_step_context` gives
one: `num_tokens` sequences that each bring one token, over throw-away KV caches allocated once
for the largest bucket. The graphs do not depend on it (attention runs eagerly, reading the
real context of each step), so any valid decode layout serves.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from runtime.forward_context import set_forward_context
from runtime.kv_cache import allocate_kv_caches
from runtime.session import find_generation_model
from runtime.static_decode import KVCachePlan
from runtime.step_metadata import uniform_batch_metadata

CONTEXT_LEN = 2  # positions per capture sequence: the new token and one before it


def decode_step_context(model: Any, max_tokens: int, device: torch.device | str,
                        encoder_len: int | None = None,
                        ) -> Callable[[int], AbstractContextManager[Any]]:
    """`step_context` for `make_runner`: decode-step metadata for up to `max_tokens` tokens.

    A larger step (a prefill bucket) gets `max_tokens` one-token sequences and padding rows
    past them: the attention ops run eagerly outside the graphs, so any valid layout serves.

    `model`: a project model, or a wrapper holding one as `.model`. `encoder_len`: for
    encoder-decoder models, the encoder length the cross-attention layers read (any >= 1).
    """
    spec_model = find_generation_model(model)
    if spec_model.is_encoder_decoder and not encoder_len:
        raise ValueError("encoder_len: an encoder-decoder model needs the encoder length its "
                         "cross-attention reads during capture (>= 1), found "
                         f"{encoder_len!r}")
    device = torch.device(device)
    caches = allocate_kv_caches(spec_model.attention_specs(), max_tokens * CONTEXT_LEN,
                                max_tokens * (encoder_len or 0), spec_model.dtype, device)

    def step_context(num_tokens: int) -> AbstractContextManager[Any]:
        metadata = uniform_batch_metadata(min(num_tokens, max_tokens), 1, CONTEXT_LEN,
                                          CONTEXT_LEN, device, encoder_len, 0)
        return set_forward_context(metadata, caches)

    return step_context


@dataclass(frozen=True)
class CaptureSpec:
    """How a runner should capture a model: example inputs shaped like the steps to replay,
    which of them carry the token dimension, and the forward context for warm-up and capture."""

    example_inputs: tuple[Any, ...]
    token_input_indices: tuple[int, ...]
    step_context: Callable[[int], AbstractContextManager[Any]] | None = None
    # the runner's own KV caches and layout buffers, for whole decode steps (attention included)
    kv_cache: KVCachePlan | None = None
