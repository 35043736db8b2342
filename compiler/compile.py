"""compile_model: capture, rewrite, and wrap a model so that it runs the rewritten graph."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import fx

from compiler.capture import (
    GraphBreakError,
    ShapePropagator,
    describe_graph_break,
    symbolic_propagator,
    symbolic_trace,
)
from compiler.config import CompileConfig
from compiler.pass_manager import PassManager
from compiler.report import CompileReport, count_flops, weight_bytes
from passes import DEFAULT_PIPELINE, PASSES, PassContext
from runtime.memory import (MemoryProfile, kv_cache_bytes_per_token, resolve_kv_cache_tokens,
                            weight_memory_bytes)
from runtime.runner import ModelRunnerBase, make_runner
from runtime.split import DEFAULT_SPLITTING_OPS
from runtime.step_context import CaptureSpec

logger = logging.getLogger(__name__)

DEFAULT_EXAMPLE_TOKENS = 8


class CompiledModel:
    """A compiled model: call it like the original; read `report` and `graph_module`."""

    def __init__(self, run: Callable[..., Any], report: CompileReport, config: CompileConfig,
                 graph_module: fx.GraphModule, model: torch.nn.Module) -> None:
        self._run = run
        self.report = report
        self.config = config
        self.graph_module = graph_module
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self._run(*args, **kwargs)

    @property
    def static_decode(self) -> Any:
        """The runner's `StaticDecodeState` (its KV caches for whole-step decode graphs), or None.

        `runtime.generate` and `DecodeSession` use these caches when they fit, so that decode
        steps replay as one graph each."""
        return getattr(self._run, "static_decode", None)

    def __repr__(self) -> str:
        return f"CompiledModel({type(self.model).__name__}, {self.report.frontend})"


def compile_model(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
    config: CompileConfig | None = None,
) -> CompiledModel:
    """Capture `model`, rewrite its graph with the configured passes, and return it compiled.

    `example_inputs` is a tuple of positional inputs or a dict of keyword inputs; models that
    define `example_inputs(num_tokens)` (fxkiln's own) may omit it. Models that
    `torch.fx.symbolic_trace` can trace are captured that way; others through TorchDynamo as
    one graph (a graph break is an error naming where it happened).
    """
    config = config if config is not None else CompileConfig()
    device = config.resolved_device()
    _check_model_device(model, device)
    inputs = _example_inputs(model, example_inputs)
    start = time.perf_counter()
    if isinstance(inputs, tuple):
        try:
            gm = symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001  (any trace failure means: use Dynamo)
            logger.debug("symbolic_trace failed (%s: %s); capturing with Dynamo",
                         type(exc).__name__, exc)
        else:
            compiled = _compile_traced(model, gm, inputs, config, device)
            compiled.report.compile_seconds = time.perf_counter() - start
            return compiled
    compiled = _compile_with_dynamo(model, inputs, config)
    compiled.report.compile_seconds = time.perf_counter() - start
    return compiled


def _compile_traced(model: torch.nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
                    config: CompileConfig, device: torch.device) -> CompiledModel:
    refresh = symbolic_propagator(inputs)
    refresh(gm)
    report = CompileReport(frontend="symbolic_trace", device=str(device),
                           weight_memory_bytes=weight_memory_bytes(model))
    example_context = getattr(model, "example_context", None)
    run_context = (lambda: example_context(*inputs)) if callable(example_context) else None
    gm = optimize_graph(gm, inputs, config, refresh, report, run_context)
    if not config.capture_sizes:
        return CompiledModel(gm, report, config, gm, model)
    runner = build_runner(model, gm, inputs, config, device)
    stats = runner.stats
    report.pieces, report.captured_sizes = stats.pieces, stats.captured_sizes
    report.decode_graph_sizes = stats.decode_graph_sizes
    report.capture_seconds, report.graph_memory_bytes = stats.capture_seconds, stats.graph_memory_bytes
    if runner.static_decode is not None:
        report.kv_cache_tokens = runner.static_decode.num_slots
        report.kv_cache_bytes = sum(t.numel() * t.element_size()
                                    for cache in runner.static_decode.kv_caches.values()
                                    for t in (cache.key, cache.value) if t is not None)
    return CompiledModel(runner, report, config, gm, model)


def build_runner(model: torch.nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
                 config: CompileConfig, device: torch.device) -> ModelRunnerBase:
    """Split `gm` at the splitting ops and capture its pieces per token-count bucket.

    Models that say how to capture them (`capture_spec`, fxkiln's own) are captured for their
    decode steps; any other model for calls shaped like its example inputs, dim 0 of every
    tensor input being the token dimension.
    """
    describe = getattr(model, "capture_spec", None)
    if callable(describe):
        spec = describe(max(config.capture_sizes), kv_cache_tokens(model, config, device))
    else:
        token_inputs = tuple(i for i, value in enumerate(inputs)
                             if isinstance(value, torch.Tensor) and value.dim() > 0)
        spec = CaptureSpec(inputs, token_input_indices=token_inputs)
    splitting_ops = DEFAULT_SPLITTING_OPS if config.splitting_ops is None else config.splitting_ops
    return make_runner(gm, spec.example_inputs, device=device, capture_sizes=config.capture_sizes,
                       splitting_ops=splitting_ops, token_input_indices=spec.token_input_indices,
                       warmup_runs=config.capture_warmup_runs, debug=config.debug,
                       capture_failure=config.capture_failure, simulate=config.simulate_capture,
                       step_context=spec.step_context, static_decode=spec.static_decode)


def kv_cache_tokens(model: Any, config: CompileConfig, device: torch.device,
                    profile: MemoryProfile | None = None) -> int:
    """Slots of the runner's KV cache for `config.kv_cache_tokens` ("auto": see runtime.memory).

    `profile`: a profiling run's measurements; the runner passes one once it profiles after
    capture (until then "auto" on CUDA takes runtime.memory.UNPROFILED_KV_CACHE_TOKENS)."""
    bytes_per_token = kv_cache_bytes_per_token(model.attention_specs(), model.dtype)
    return resolve_kv_cache_tokens(config.kv_cache_tokens, device, profile, bytes_per_token,
                                   config.gpu_memory_utilization)


def _compile_with_dynamo(model: torch.nn.Module, inputs: tuple[Any, ...] | dict[str, Any],
                         config: CompileConfig) -> CompiledModel:
    from compiler.backend import Backend  # the backend module imports this one

    backend = Backend(config)
    optimized = torch.compile(model, backend=backend, fullgraph=True)
    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(value, 0)
    try:
        with torch.no_grad():
            optimized(*args, **kwargs)
    except torch._dynamo.exc.Unsupported as exc:
        raise GraphBreakError(f"TorchDynamo could not capture {type(model).__name__} as one "
                              f"graph: graph break at {describe_graph_break(exc)}") from exc
    if not backend.reports:
        raise GraphBreakError(f"TorchDynamo produced no graph for {type(model).__name__}")
    return CompiledModel(optimized, backend.reports[-1], config, backend.graph_modules[-1], model)


def optimize_graph(gm: fx.GraphModule, inputs: Sequence[Any], config: CompileConfig,
                   refresh: ShapePropagator, report: CompileReport,
                   run_context: Callable[[], AbstractContextManager[Any]] | None = None,
                   ) -> fx.GraphModule:
    """Run the configured pipeline on `gm`, filling `report`'s pass, FLOP and weight figures.

    `run_context` makes the context the graph needs to run at compile time (a project
    model's forward context for its attention ops); FLOP counts and verification use it.
    """
    context_factory = run_context if run_context is not None else nullcontext
    with context_factory():
        report.flops_before = count_flops(gm, inputs)
    report.weight_bytes_before = weight_bytes(gm)
    context = PassContext(device=config.resolved_device(), kernels=config.kernels)
    names = DEFAULT_PIPELINE if config.passes is None else config.passes
    manager = PassManager(
        [PASSES[name](context) for name in names],
        refresh=refresh,
        dump_dir=config.dump_dir,
        verify_inputs=random_inputs_like(gm, inputs) if config.verify else None,
        verify_context=run_context,
    )
    gm, records = manager(gm)
    report.add_passes(records)
    report.kernels = dict(gm.meta.get("fxkiln_kernels", {}))
    with context_factory():
        report.flops_after = count_flops(gm, inputs)
    report.weight_bytes_after = weight_bytes(gm)
    return gm


def random_inputs_like(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Fresh inputs shaped like `inputs`; weights (static placeholders) and sizes kept as they are.

    Floats are standard normal; integers are drawn from the example's own range, so that token
    ids and positions stay valid indices.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    randomized: list[Any] = []
    for node, value in zip(placeholders, inputs):
        if not isinstance(value, torch.Tensor) or "static_value" in node.meta:
            randomized.append(value)
        elif value.is_floating_point():
            randomized.append(torch.randn_like(value))
        elif value.dtype == torch.bool or value.numel() == 0:
            randomized.append(value.clone())
        else:
            low, high = int(value.min()), int(value.max())
            randomized.append(torch.randint_like(value, low, high + 1))
    return tuple(randomized)


def _example_inputs(model: torch.nn.Module,
                    example_inputs: Sequence[Any] | Mapping[str, Any] | None,
                    ) -> tuple[Any, ...] | dict[str, Any]:
    if example_inputs is None:
        make = getattr(model, "example_inputs", None)
        if not callable(make):
            raise ValueError(f"compile_model: {type(model).__name__} has no example_inputs("
                             f"num_tokens) method, so example inputs must be given")
        example_inputs = make(DEFAULT_EXAMPLE_TOKENS)
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise ValueError(f"compile_model: expected example_inputs as a tuple or a dict of keyword "
                     f"inputs, found {type(example_inputs).__name__}")


def _check_model_device(model: torch.nn.Module, device: torch.device) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != device.type:
            raise ValueError(f"compile_model: the config compiles for {device}, but "
                             f"{type(model).__name__}.{name} is on {tensor.device}; move the "
                             f"model (model.to({str(device)!r})) or set CompileConfig(device=...)")
