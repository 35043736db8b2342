"""Hugging Face models as serving models: capture, lower attention to the KV cache, check, compile.

`compile_model(hf_model)` (no example inputs) comes here. The model is captured as one graph
over flattened tokens (`compiler.hf_capture`), then the serving passes lower it:
`view_sizes` (views that must work on zero encoder rows), `cached_attention` (each attention
becomes `fxkiln.attention` over a KV cache, its mask proven causal or full), `token_positions`
(positions the model counted itself read the positions input) and `cleanup`. The result is an
`HFServingModel`: a `runtime.serving.ServingModel` like fxkiln's own models, so the compile
pipeline, the runner's bucketed and whole-step decode graphs, `runtime.generate` and
`DecodeSession` treat it as they treat those. Before compiling it, the lowered graph is checked
against the model itself: two sequences through a prefill and a decode step must give the
logits of the model's own forward (translation validation of the whole lowering).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import fx

from compiler.capture import ShapePropagator, symbolic_propagator
from compiler.config import CompileConfig
from compiler.hf_capture import (UnsupportedModelError, capture_hf, max_positions,
                                 speech_features)
from compiler.pass_manager import PassError, PassManager, PassRecord
from compiler.pipeline import compile_traced_model
from passes import CleanupPass, PassContext
from passes.attention_match import UnsupportedAttentionError
from passes.cached_attention import SPECS_KEY, CachedAttentionPass
from passes.fx_utils import node_val
from passes.token_positions import TokenPositionsPass
from passes.token_streams import token_streams
from passes.view_sizes import ViewSizesPass
from runtime.generation import DecodeSession
from runtime.kv_cache import AttentionSpec
from runtime.serving import ServingModel

logger = logging.getLogger(__name__)

SERVING_PASSES = (ViewSizesPass, CachedAttentionPass, TokenPositionsPass, CleanupPass)
PROPAGATION_TOKENS = 8                 # example tokens of shape propagation (serving, pipeline)
CHECK_PROMPT, CHECK_SOURCE = 3, 4      # tokens per sequence of the check (decoder, encoder)
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative to the logits' scale
LOW_PRECISION_TOLERANCE = 5e-2


class ServingMismatchError(RuntimeError):
    """The lowered graph does not compute what the Hugging Face model computes."""


class HFServingModel(ServingModel):
    """A Hugging Face model's lowered graph, served like fxkiln's own models.

    forward(input_ids, positions[, encoder_input_ids, encoder_positions]) -> logits
    (tokens, vocab), over flattened tokens, inside a forward context (as `ProjectModel`).
    A speech model's encoder input is its features (sequences, mel bins, frames) instead
    (`generate(..., input_features=...)`). The graph's parameters are the Hugging Face model's
    own tensors.
    """

    def __init__(self, hf: Any, graph_module: fx.GraphModule,
                 specs: dict[str, AttentionSpec]) -> None:
        super().__init__()
        config = hf.config
        self.graph_module = graph_module
        self.config = config
        self.generation_config = getattr(hf, "generation_config", None)
        self.is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        start = getattr(config, "decoder_start_token_id", None)
        if start is None and self.generation_config is not None:
            start = getattr(self.generation_config, "decoder_start_token_id", None)
        self.decoder_start_token_id = start
        self.source_name = type(hf).__name__
        self.speech = speech_features(hf)  # (mel bins, frames, encoder tokens) or None
        self._specs = dict(specs)

    def attention_specs(self) -> dict[str, AttentionSpec]:
        return dict(self._specs)

    def example_inputs(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        return example_inputs(self.config, self.speech, num_tokens, self.device, self.dtype)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.graph_module(*inputs)

    # -- a speech encoder's input: features per sequence, not flattened ids ----------------
    def encoder_length(self, encoder_input: torch.Tensor) -> int:
        return self.speech[2] if self.speech else super().encoder_length(encoder_input)

    def encoder_step_inputs(self, encoder_input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.speech:
            return super().encoder_step_inputs(encoder_input)
        tokens = torch.arange(self.speech[2], device=encoder_input.device)
        return encoder_input.to(self.dtype), tokens.repeat(encoder_input.shape[0])

    def no_encoder_inputs(self, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        if not self.speech:
            return super().no_encoder_inputs(device)
        features = torch.zeros(0, *self.speech[:2], dtype=self.dtype, device=device)
        return features, torch.empty(0, dtype=torch.long, device=device)

    def encoder_tokens(self, encoder_input: torch.Tensor) -> int:
        if not self.speech:
            return super().encoder_tokens(encoder_input)
        return int(encoder_input.shape[0]) * self.speech[2]

    def extra_repr(self) -> str:
        return f"{self.source_name}, {len(self._specs)} attention layers"


def example_inputs(config: Any, speech: tuple[int, int, int] | None, num_tokens: int,
                   device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """forward's inputs for one sequence of `num_tokens` decoder tokens (and as many encoder
    tokens; or features of two sequences, which the example context takes for one: a count of
    1 would let shape propagation specialize the symbol)."""
    limit = max_positions(config) or num_tokens
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.arange(num_tokens, device=device) % limit
    if speech:
        features = torch.zeros(2, *speech[:2], dtype=dtype, device=device)
        return ids, positions, features, torch.arange(2 * speech[2], device=device)
    if getattr(config, "is_encoder_decoder", False):
        return ids, positions, ids.clone(), positions.clone()
    return ids, positions


def _check_symbolic_streams(gm: fx.GraphModule) -> None:
    """Every token stream's count is a symbol after propagation: the passes prove masks and
    rewrite views for all counts, which a concrete count cannot show."""
    for name, stream in token_streams(gm).items():
        if not stream.symbols():
            raise RuntimeError(f"shape propagation made the {name} token count concrete "
                               f"({node_val(stream.ids).shape[0]}); expected a symbol (torch "
                               f"{torch.__version__})")


def serving_model(hf: Any) -> tuple[HFServingModel, list[PassRecord]]:
    """Capture and lower `hf`; check the result against `hf`. Returns the records of the
    serving passes too (for the compile report)."""
    model, records, _ = _lowered(hf)
    return model, records


def _lowered(hf: Any) -> tuple[HFServingModel, list[PassRecord], ShapePropagator]:
    """serving_model, and the propagator that refreshed the serving graph's shapes."""
    gm = capture_hf(hf)
    parameter = next(hf.parameters())
    inputs = example_inputs(hf.config, speech_features(hf), PROPAGATION_TOKENS,
                            parameter.device, parameter.dtype)
    refresh = symbolic_propagator(inputs)
    refresh(gm)
    _check_symbolic_streams(gm)
    context = PassContext(device=parameter.device)
    manager = PassManager([cls(context) for cls in SERVING_PASSES], refresh=refresh)
    try:
        gm, records = manager(gm)
    except PassError as error:
        if isinstance(error.__cause__, UnsupportedAttentionError):
            raise error.__cause__ from None  # the user's error, not ours: name the node
        raise
    specs = gm.meta.get(SPECS_KEY, {})
    if not specs:
        raise UnsupportedModelError(f"{type(hf).__name__}: found no attention in its graph "
                                    f"(expected SDPA or softmax(q @ k.T) @ v) to serve from a "
                                    f"KV cache")
    model = HFServingModel(hf, gm, specs).eval()
    check_against_hf(hf, model)
    return model, records, refresh


def compile_hf_model(hf: Any, config: CompileConfig, device: torch.device) -> Any:
    """compile_model's path for a Hugging Face model given without example inputs."""
    start = time.perf_counter()
    model, records, refresh = _lowered(hf)
    graph, copies = _copy(model.graph_module.graph)
    lowered = fx.GraphModule(model.graph_module, graph, type(model.graph_module).__name__)
    # the pipeline refreshes the copy's shapes from the serving graph's (the same fake
    # inputs: the model's example inputs), instead of propagating the whole graph again
    refresh.follow_copy(lowered, copies)
    compiled = compile_traced_model(model, lowered, model.example_inputs(PROPAGATION_TOKENS),
                                    config, refresh)
    report = compiled.report
    report.frontend = "hf_serving"
    pipeline = list(report.passes.values())
    report.passes = {}
    report.add_passes([*records, *pipeline])  # serving passes first; a second cleanup is #2
    logger.info("served %s as %d attention layers in %.2f s", type(hf).__name__,
                len(model.attention_specs()), time.perf_counter() - start)
    return compiled


@torch.no_grad()
def check_against_hf(hf: Any, model: HFServingModel) -> None:
    """Two sequences, a prefill and one decode step through `model`, against `hf`'s forward
    on the whole sequences; ServingMismatchError if the logits differ beyond rounding."""
    device, vocab = model.device, model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, CHECK_PROMPT + 1), generator=generator).to(device)
    source = torch.randint(0, vocab, (2, CHECK_SOURCE), generator=generator).to(device)
    if model.speech:
        source = torch.randn(2, *model.speech[:2], generator=generator).to(device, model.dtype)
    encoder_len = model.encoder_length(source) if model.is_encoder_decoder else None
    session = DecodeSession(model, 2, CHECK_PROMPT, 1, encoder_len, device)
    ours = torch.cat([session.prefill(tokens[:, :CHECK_PROMPT],
                                      source if encoder_len else None),
                      session.decode(tokens[:, CHECK_PROMPT])[:, None]], dim=1)
    if model.speech:
        theirs = hf(input_features=source, decoder_input_ids=tokens, use_cache=False).logits
    elif model.is_encoder_decoder:
        theirs = hf(input_ids=source, decoder_input_ids=tokens, use_cache=False).logits
    else:
        theirs = hf(input_ids=tokens, use_cache=False).logits
    scale = float(theirs.abs().max()) or 1.0
    tolerance = CHECK_TOLERANCE.get(theirs.dtype, LOW_PRECISION_TOLERANCE)
    difference = float((ours.float() - theirs.float()).abs().max())
    if not difference <= tolerance * scale:
        raise ServingMismatchError(
            f"the serving graph of {type(hf).__name__} gives logits that differ from the "
            f"model's own forward by {difference:.3g} (allowed {tolerance * scale:.3g}) on two "
            f"sequences of {CHECK_PROMPT} tokens and one decode step; some op of the graph "
            f"mixes the tokens of different sequences or counts positions in a way the "
            f"serving passes did not see")
    logger.debug("serving graph of %s matches its forward (max difference %.3g)",
                 type(hf).__name__, difference)


def _copy(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of `graph` (its nodes' meta too, values shared) and each node's copy."""
    copied, copies = fx.Graph(), {}
    copied.output(copied.graph_copy(graph, copies))
    return copied, copies
