"""compile_model: capture, rewrite, and wrap a model so that it runs the rewritten graph."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from compiler.backend import Backend
from compiler.capture import GraphBreakError, describe_graph_break, symbolic_trace
from compiler.config import CompileConfig
from compiler.hf_capture import is_transformers_model
from compiler.inputs import (
    CompileInputError,
    check_model,
    describe_dtype_mismatch,
    model_state,
)
from compiler.inputs import example_inputs as checked_example_inputs
from compiler.pass_manager import PassError
from compiler.compiled_model import CompiledModel
from compiler.pipeline import compile_traced_model
from compiler.report import CompileReport
from runtime.input_snapshot import InputSnapshot, writable_inputs

logger = logging.getLogger(__name__)


def compile_model(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    config: CompileConfig | None = None,
) -> CompiledModel:
    """Capture `model`, rewrite its graph with the configured passes, and return it compiled.

    `example_inputs` is a tuple of positional inputs or a dict of keyword inputs; models that
    define `example_inputs(num_tokens)` (fxkiln's own) may omit it. A Hugging Face causal or
    encoder-decoder LM given without them becomes a serving graph (`compiler.hf_serving`):
    its attention runs over the runtime's KV caches and `runtime.generate` drives it. Models that
    `torch.fx.symbolic_trace` can trace are captured that way; others through TorchDynamo as
    one graph (a graph break is an error naming where it happened). The model must be in eval
    mode; model and inputs are checked before any work (`compiler.inputs`, CompileInputError),
    and compiling leaves the model's buffers and the inputs as they were.
    """
    config = config if config is not None else CompileConfig()
    if not isinstance(config, CompileConfig):
        raise CompileInputError(f"compile_model: expected config as a CompileConfig, found "
                                f"{type(config).__name__}")
    device = config.resolved_device()
    check_model(model, device)
    if example_inputs is None and is_transformers_model(model):  # a serving graph of it
        from compiler.hf_serving import compile_hf_model

        start = time.perf_counter()
        compiled = compile_hf_model(model, config, device)
        compiled.report.compile_seconds = time.perf_counter() - start
        return compiled
    inputs = checked_example_inputs(model, example_inputs, device)
    start = time.perf_counter()
    snapshot = InputSnapshot(writable_inputs(model_state(model, inputs)))
    with snapshot.restoring():  # compile-time runs write nothing the caller keeps
        try:
            compiled = _capture_and_compile(model, inputs, config, device)
        except PassError:
            raise
        except Exception as exc:
            mismatch = describe_dtype_mismatch(model, inputs)
            if mismatch is None:
                raise
            raise CompileInputError(f"compile_model: {mismatch}") from exc
    compiled.report.compile_seconds = time.perf_counter() - start
    return compiled


def _capture_and_compile(model: torch.nn.Module, inputs: tuple[Any, ...] | dict[str, Any],
                         config: CompileConfig, device: torch.device) -> CompiledModel:
    if isinstance(inputs, tuple):
        try:
            gm = symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001  (any trace failure means: use Dynamo)
            logger.debug("symbolic_trace failed (%s: %s); capturing with Dynamo",
                         type(exc).__name__, exc)
        else:
            return compile_traced_model(model, gm, inputs, config)
    return _compile_with_dynamo(model, inputs, config)


def _compile_with_dynamo(model: torch.nn.Module, inputs: tuple[Any, ...] | dict[str, Any],
                         config: CompileConfig) -> CompiledModel:
    """One graph through Dynamo, dim 0 of every tensor input dynamic.

    The dynamic marks go on aliases of the caller's tensors (same storage, new tensor objects),
    so compiling leaves nothing on the caller's own tensors."""
    backend = Backend(config)
    optimized = torch.compile(model, backend=backend, fullgraph=True)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    args, kwargs = tuple(_marked_alias(v) for v in args), {k: _marked_alias(v)
                                                          for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            optimized(*args, **kwargs)
    except torch._dynamo.exc.Unsupported as exc:
        raise GraphBreakError(f"TorchDynamo could not capture {type(model).__name__} as one "
                              f"graph: graph break at {describe_graph_break(exc)}") from exc
    if not backend.reports:
        raise GraphBreakError(f"TorchDynamo produced no graph for {type(model).__name__}")
    return CompiledModel(optimized, backend.reports[-1], config, backend.graph_modules[-1], model)


def _marked_alias(value: Any) -> Any:
    """A tensor with dim >= 1: an alias of it with dim 0 marked dynamic; anything else: as is."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    alias = value.detach()
    torch._dynamo.maybe_mark_dynamic(alias, 0)
    return alias
