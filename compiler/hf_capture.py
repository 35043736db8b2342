"""Capture of an unmodified Hugging Face model as one graph over flattened tokens.

The graph is the model's own forward on one sequence with the cache off, batch 1, wrapped so
that it takes fxkiln's serving inputs: `(input_ids, positions)`, each `(tokens,)`, and for
encoder-decoder models also `(encoder_input_ids, encoder_positions)`; it returns the logits
`(tokens, vocab)`. TorchDynamo exports it with the token dimension of each stream symbolic
(capture sizes differ per stream, so the two stay two symbols). Parameters and buffers become
`get_attr` nodes on the model's own tensors (nothing is copied), and each placeholder is tagged
with its role (`passes.token_streams`). Positions reach the model where its forward takes
`position_ids` (`decoder_position_ids`); elsewhere it counts them itself, and the
`token_positions` pass points those counts at the input.

transformers is imported by the caller (this module only sees a model object).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from compiler.capture import GraphBreakError, describe_graph_break
from passes.cached_attention import MODULE_PREFIX_KEY
from passes.token_streams import (DECODER, ENCODER, MAX_POSITIONS_KEY, ROLE_KEY, ROLES,
                                  SEQUENCE_TOKENS_KEY)

logger = logging.getLogger(__name__)

CAPTURE_TOKENS = {DECODER: 5, ENCODER: 7}  # >= 2 (Dynamo specializes 0 and 1), and distinct
CAPTURE_SEQUENCES = 2                      # sequences of a batched (speech) encoder input
# Captured instead of any other implementation: eager attention is plain torch ops on every
# device, where SDPA's graph on CUDA aligns masks to multiples of 8 (padded mask values, and
# guards on the token count the export solver cannot prove), so one capture serves all devices.
CAPTURE_ATTENTION = "eager"


class UnsupportedModelError(ValueError):
    """A Hugging Face model that fxkiln cannot turn into a serving graph."""


def is_transformers_model(model: Any) -> bool:
    """Whether `model` is a `transformers.PreTrainedModel` (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


class _CausalLMStep(nn.Module):
    """One sequence, cache off: `(input_ids, positions)` -> logits (tokens, vocab)."""

    def __init__(self, hf: nn.Module, positions_keyword: str | None) -> None:
        super().__init__()
        self.hf = hf
        self.positions_keyword = positions_keyword

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        extra = {self.positions_keyword: positions[None]} if self.positions_keyword else {}
        return self.hf(input_ids=input_ids[None], use_cache=False, **extra).logits[0]


class _Seq2SeqStep(_CausalLMStep):
    """`(input_ids, positions, encoder_input_ids, encoder_positions)` -> logits (tokens, vocab)."""

    def forward(  # type: ignore[override]  # four inputs where the base class takes two
            self, input_ids: torch.Tensor, positions: torch.Tensor,
            encoder_input_ids: torch.Tensor, encoder_positions: torch.Tensor) -> torch.Tensor:
        extra = {self.positions_keyword: positions[None]} if self.positions_keyword else {}
        return self.hf(input_ids=encoder_input_ids[None], decoder_input_ids=input_ids[None],
                       use_cache=False, **extra).logits[0]


class _SpeechSeq2SeqStep(_CausalLMStep):
    """`(input_ids, positions, input_features, encoder_positions)` -> logits (tokens, vocab):
    the encoder reads features (sequences, mel bins, frames), a batched stream."""

    def forward(  # type: ignore[override]  # four inputs where the base class takes two
            self, input_ids: torch.Tensor, positions: torch.Tensor,
            input_features: torch.Tensor, encoder_positions: torch.Tensor) -> torch.Tensor:
        extra = {self.positions_keyword: positions[None]} if self.positions_keyword else {}
        return self.hf(input_features=input_features, decoder_input_ids=input_ids[None],
                       use_cache=False, **extra).logits[0]


def speech_features(hf: nn.Module) -> tuple[int, int, int] | None:
    """(mel bins, frames, encoder tokens per sequence) of a speech encoder-decoder's input
    features (Whisper: the frames its convolutions reduce to `max_source_positions` tokens),
    or None for a model whose inputs are token ids."""
    if getattr(hf, "main_input_name", "input_ids") != "input_features":
        return None
    config = hf.config
    bins, tokens = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions",
                                                                  None)
    if not getattr(config, "is_encoder_decoder", False) or bins is None or tokens is None:
        raise UnsupportedModelError(f"{type(hf).__name__} takes input_features; expected an "
                                    f"encoder-decoder with num_mel_bins and "
                                    f"max_source_positions in its config (as Whisper)")
    strides = math.prod(m.stride[0] for m in hf.get_encoder().modules()
                        if isinstance(m, nn.Conv1d))
    return int(bins), int(tokens * strides), int(tokens)


def max_positions(config: Any) -> int | None:
    """Decoder positions the model serves (Whisper names them max_target_positions)."""
    return getattr(config, "max_position_embeddings", None) or \
        getattr(config, "max_target_positions", None)


def check_servable(hf: nn.Module) -> None:
    """UnsupportedModelError unless `hf` is an LM (causal or encoder-decoder) in eval mode."""
    name = type(hf).__name__
    if hf.training:
        raise UnsupportedModelError(f"{name} is in training mode (dropout is on); expected "
                                    f"model.eval() before compile_model")
    if not callable(getattr(hf, "get_output_embeddings", None)) or \
            hf.get_output_embeddings() is None:
        raise UnsupportedModelError(f"{name} has no LM head (get_output_embeddings() is None); "
                                    f"expected a causal LM or an encoder-decoder LM such as "
                                    f"LlamaForCausalLM or BartForConditionalGeneration")
    if getattr(hf, "main_input_name", "input_ids") not in ("input_ids", "input_features"):
        raise UnsupportedModelError(f"{name} takes {hf.main_input_name!r}; expected a model "
                                    f"whose inputs are input_ids (or Whisper's input_features)")


def capture_hf(hf: nn.Module) -> fx.GraphModule:
    """The serving graph of `hf`, before any pass: see the module docstring."""
    check_servable(hf)
    config = hf.config
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    keyword = "decoder_position_ids" if seq2seq else "position_ids"
    takes_positions = keyword in inspect.signature(hf.forward).parameters
    speech = speech_features(hf)
    step_class = _SpeechSeq2SeqStep if speech else _Seq2SeqStep if seq2seq else _CausalLMStep
    step = step_class(hf, keyword if takes_positions else None)
    streams = (DECODER, ENCODER) if seq2seq else (DECODER,)
    parameter = next(hf.parameters())
    inputs, dynamic = [], []
    for stream in streams:
        n = CAPTURE_TOKENS[stream]
        # DYNAMIC, not a named Dim: device kernels add guards on the token count that hold for
        # every count but that the export solver cannot prove (CUDA SDPA aligns masks to 8)
        dim = torch.export.Dim.DYNAMIC
        ids = torch.zeros(n, dtype=torch.long, device=parameter.device)
        if stream == ENCODER and speech:  # two sequences of features, a symbolic count
            ids = torch.zeros(CAPTURE_SEQUENCES, *speech[:2], dtype=parameter.dtype,
                              device=parameter.device)
            n = CAPTURE_SEQUENCES * speech[2]
        inputs += [ids, torch.arange(n, device=parameter.device)]
        # a batched input's count may meet shape heuristics (conv's "batch < 16" guard) that do
        # not change the graph: AUTO keeps it symbolic without refusing such guards
        dynamic += [{0: torch.export.Dim.AUTO}, {0: dim}] if ids.dim() > 1 \
            else [{0: dim}, {0: dim}]
    # without the fake-tensor cache: for symbolic sizes an entry costs more to make than the
    # op it saves (a 2-layer Mistral's capture: 1.7 s without, 2.2 s with; min of 3)
    with torch.no_grad(), _matched_attention(hf), \
            torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        try:
            exported = torch._dynamo.export(step, dynamic_shapes=tuple(dynamic))(*inputs)
        except torch._dynamo.exc.Unsupported as exc:
            raise GraphBreakError(f"TorchDynamo could not capture {type(hf).__name__} as one "
                                  f"graph: graph break at {describe_graph_break(exc)}") from exc
        except torch._dynamo.exc.UserError as exc:
            raise UnsupportedModelError(f"TorchDynamo could not capture {type(hf).__name__} "
                                        f"with a symbolic token count: {exc}") from exc
    roles = [role for stream in streams for role in ROLES[stream]]
    gm = _plain_graph_module(exported.graph_module, roles, type(hf).__name__)
    gm.meta[MAX_POSITIONS_KEY] = max_positions(config)
    if speech:
        gm.meta[SEQUENCE_TOKENS_KEY] = {ENCODER: speech[2]}
    gm.meta[MODULE_PREFIX_KEY] = "hf."
    logger.debug("captured %s: %d nodes, positions %s", type(hf).__name__,
                 len(gm.graph.nodes), "passed" if takes_positions else "counted by the model")
    return gm


@contextlib.contextmanager
def _matched_attention(hf: Any) -> Iterator[None]:
    """Capture with eager attention whatever the model's implementation (SDPA, flash, flex...):
    the weights are the same, and the passes replace attention anyway (see CAPTURE_ATTENTION)."""
    current = getattr(hf.config, "_attn_implementation", None)
    if current == CAPTURE_ATTENTION or not hasattr(hf, "set_attn_implementation"):
        yield
        return
    logger.info("capturing %s with %s attention instead of %s", type(hf).__name__,
                CAPTURE_ATTENTION, current)
    hf.set_attn_implementation(CAPTURE_ATTENTION)
    try:
        yield
    finally:
        hf.set_attn_implementation(current)


def _plain_graph_module(exported: fx.GraphModule, roles: list[str], name: str
                        ) -> fx.GraphModule:
    """`exported` with plain placeholders named by role (no pytree codegen), one output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = list(exported.graph.find_nodes(op="placeholder"))
    assert len(placeholders) == len(roles), "the export kept one placeholder per input"
    for node, role in zip(placeholders, roles):
        env[node] = graph.placeholder(role)
        env[node].meta = {**_own_meta(node), ROLE_KEY: role}
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            leaves = [leaf for leaf in pytree.tree_leaves(node.args[0]) if leaf is not None]
            if len(leaves) != 1:
                raise UnsupportedModelError(f"{name}: expected the step to return the logits "
                                            f"alone, found {len(leaves)} outputs")
            graph.output(env[leaves[0]])
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        env[node].meta = _own_meta(node)
    return fx.GraphModule(exported, graph, f"{name}Serving")


def _own_meta(node: fx.Node) -> dict[str, Any]:
    """Node meta without Dynamo's example values: their symbols belong to the export's shape
    environment (shape propagation gives every node a fresh `val`), and split_module would
    read them as this graph's."""
    return {key: value for key, value in node.meta.items() if key != "example_value"}
