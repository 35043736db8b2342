"""The stages after capture, one pipeline for both front ends: passes, split, runner, report.

`compile_graph` runs them: `optimize_graph` (the configured passes, FLOPs and weight bytes
before and after), then the front end's runner. `compile_traced` serves graphs from
`symbolic_trace` (fxkiln's own models, captured for their decode steps per token-count bucket);
`compile_dynamo_graph` serves each graph that Dynamo hands the backend, from `compile_model`'s
Dynamo path and from `torch.compile(backend="fxkiln")` alike (captured per input signature,
`runtime/signature_runner.py`). The runner's figures (pieces, captured sizes and signatures,
capture time, graph memory, or why nothing is captured) go into the report; a Dynamo graph's
as it is captured, on first use.

What `capture_sizes` means: for traced models, the token-count buckets a call is padded up to;
for Dynamo graphs, which can never be padded (a StaticCache has its batch baked in), the bound
on the leading size (dim 0 of the first per-call tensor input: a Hugging Face step's batch):
every size up to the largest gets graphs of its own exact signature, larger ones run uncaptured.
So the calls that replay are the same for both front ends. `()` captures nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from compiler.capture import (ShapePropagator, concrete_inputs, dynamo_propagator,
                              symbolic_propagator)
from compiler.compiled_model import CompiledModel
from compiler.config import CompileConfig
from compiler.pass_manager import PassManager
from compiler.report import CompileReport, count_flops, weight_bytes
from passes import DEFAULT_PIPELINE, PASSES, PassContext
from runtime.graph_device import CaptureOptions, graph_device_for
from runtime.input_snapshot import InputSnapshot, writable_inputs
from runtime.memory import weight_memory_bytes
from runtime.runner import BucketRunner, make_runner
from runtime.signature_inputs import GraphInputs
from runtime.signature_runner import SignatureRunner
from runtime.split import DEFAULT_SPLITTING_OPS
from runtime.step_context import CaptureSpec

RunContext = Callable[[], AbstractContextManager[Any]]
Runner = BucketRunner | SignatureRunner
# builds the runner of a rewritten graph, or says why there is none
RunnerBuilder = Callable[[fx.GraphModule, CompileReport], "Runner | str"]


@dataclass
class CompiledGraph:
    """What the pipeline made of one captured graph."""

    run: Callable[..., Any]          # the runner, or the rewritten graph when there is none
    report: CompileReport
    graph_module: fx.GraphModule     # the rewritten graph


def compile_graph(gm: fx.GraphModule, inputs: Sequence[Any], config: CompileConfig, *,
                  frontend: str, refresh: ShapePropagator, run_context: RunContext | None,
                  build_runner: RunnerBuilder) -> CompiledGraph:
    """The stages after capture, for either front end: passes, then split and runner, with
    every figure in the report (the runner's as it captures)."""
    start = time.perf_counter()
    report = CompileReport(frontend=frontend, device=str(config.resolved_device()))
    gm = optimize_graph(gm, inputs, config, refresh, report, run_context)
    run: Callable[..., Any] = gm
    built = build_runner(gm, report) if config.capture_sizes else "capture_sizes is empty"
    if isinstance(built, str):
        report.capture_note = built
    else:
        report.set_runtime(built.stats)
        run = built
    report.compile_seconds = time.perf_counter() - start
    return CompiledGraph(run, report, gm)


def compile_traced(model: torch.nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
                   refresh: ShapePropagator, config: CompileConfig) -> CompiledGraph:
    """The pipeline for a traced model: its runner captures per token-count bucket. A model's
    `example_context` is the forward context its compile-time runs need."""
    example_context = getattr(model, "example_context", None)
    run_context = (lambda: example_context(*inputs)) if callable(example_context) else None

    def build(rewritten: fx.GraphModule, report: CompileReport) -> Runner:
        return bucket_runner(model, rewritten, inputs, config, config.resolved_device())

    compiled = compile_graph(gm, inputs, config, frontend="symbolic_trace", refresh=refresh,
                             run_context=run_context, build_runner=build)
    compiled.report.weight_memory_bytes = weight_memory_bytes(model)
    return compiled


def compile_traced_model(model: torch.nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
                         config: CompileConfig, refresh: ShapePropagator | None = None
                         ) -> CompiledModel:
    """`compile_traced` on a traced `gm`, as a CompiledModel. Its shapes are propagated here
    from `inputs`, or refreshed by `refresh`, a propagator of these inputs that `gm` follows."""
    refresh = symbolic_propagator(inputs) if refresh is None else refresh
    refresh(gm)
    compiled = compile_traced(model, gm, inputs, refresh, config)
    return CompiledModel(compiled.run, compiled.report, config, compiled.graph_module, model)


def bucket_runner(model: torch.nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...],
                  config: CompileConfig, device: torch.device) -> BucketRunner:
    """Split `gm` at the splitting ops and capture its pieces per token-count bucket.

    Models that say how to capture them (`capture_spec`: serving models) are captured for
    their decode steps, and for prefill steps at `prefill_capture_sizes`; any other model for
    calls shaped like its example inputs, dim 0 of every tensor input being the token
    dimension, at `capture_sizes` only. Padding to a bucket is proven safe at capture unless
    the model declares `rows_independent = True` (fxkiln's own and serving models do).
    """
    describe = getattr(model, "capture_spec", None)
    prefill_sizes: tuple[int, ...] = ()
    if callable(describe):
        spec = describe(max(config.capture_sizes), config.kv_cache_tokens)
        prefill_sizes = config.prefill_capture_sizes
    else:
        token_inputs = tuple(i for i, value in enumerate(inputs)
                             if isinstance(value, torch.Tensor) and value.dim() > 0)
        spec = CaptureSpec(inputs, token_input_indices=token_inputs)
    return make_runner(gm, spec.example_inputs, device=device, capture_sizes=config.capture_sizes,
                       prefill_sizes=prefill_sizes, splitting_ops=_splitting_ops(config),
                       token_input_indices=spec.token_input_indices,
                       warmup_runs=config.capture_warmup_runs, debug=config.debug,
                       capture_failure=config.capture_failure, simulate=config.simulate_capture,
                       step_context=spec.step_context, kv_cache=spec.kv_cache,
                       memory_utilization=config.gpu_memory_utilization,
                       check_padding=not getattr(model, "rows_independent", False))


def compile_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[Any],
                         config: CompileConfig) -> CompiledGraph:
    """The pipeline for a graph Dynamo hands the backend: its runner captures per signature.

    Every compile-time run of the graph (FLOP counts, verification) gets the call's live
    tensors back as they were: a StaticCache must not advance while the graph compiles.
    """
    refresh = dynamo_propagator(gm, example_inputs)
    refresh(gm)
    inputs = concrete_inputs(example_inputs)
    snapshot = InputSnapshot(writable_inputs(inputs))

    def build(rewritten: fx.GraphModule, report: CompileReport) -> Runner | str:
        device = config.resolved_device()
        graph_device = graph_device_for(device, config.simulate_capture)
        if not graph_device.uses_graphs:
            return (f"{device.type} has no device graphs "
                    f"(CompileConfig(simulate_capture=True) simulates them)")
        options = CaptureOptions(warmup_runs=config.capture_warmup_runs,
                                 capture_failure=config.capture_failure, debug=config.debug)
        graph_inputs = dynamo_graph_inputs(rewritten, inputs, config.resolved_device())
        return SignatureRunner(rewritten, graph_inputs, inputs,
                               graph_device=graph_device, capture_sizes=config.capture_sizes,
                               splitting_ops=_splitting_ops(config), options=options,
                               on_stats=report.set_runtime)

    return compile_graph(gm, inputs, config, frontend="dynamo", refresh=refresh,
                         run_context=snapshot.restoring, build_runner=build)


def dynamo_graph_inputs(gm: fx.GraphModule, inputs: Sequence[Any],
                        device: torch.device | None = None) -> GraphInputs:
    """Which of a Dynamo graph's inputs are static, host scalars, host tensors a device graph
    reads through a mirror; whether its shapes are static.

    Static: placeholders `dynamo_propagator` marked (parameters, buffers) and tensors marked
    with `torch._dynamo.mark_static_address`. Host scalars: Python numbers Dynamo passes as
    0-dim CPU tensors. Mirrored (graphs for a CUDA `device` only): the other CPU tensors, such
    as a Hugging Face StaticCache's position counter when the cache was set up inside a compiled
    prefill; a graph that reads one cannot be captured (its copy to the device syncs), so it
    reads a device copy instead. Static shapes: no SymInt input and no symbolic size in any input.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    static, scalars, static_shapes = set(), set(), True
    for index, (node, value) in enumerate(zip(placeholders, inputs)):
        if "static_value" in node.meta or getattr(value, "_dynamo_static_input_type", None):
            static.add(index)
        if getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False):
            scalars.add(index)
        example = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(example, torch.SymInt) or (
                isinstance(example, torch.Tensor)
                and any(isinstance(size, torch.SymInt) for size in example.shape)):
            static_shapes = False
    mirrored = frozenset() if device is None or device.type == "cpu" else frozenset(
        i for i, value in enumerate(inputs)
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and i not in scalars)
    return GraphInputs(declared_static=frozenset(static - mirrored),
                       host_scalars=frozenset(scalars), static_shapes=static_shapes,
                       mirrored=mirrored, device=device if mirrored else None)


def optimize_graph(gm: fx.GraphModule, inputs: Sequence[Any], config: CompileConfig,
                   refresh: ShapePropagator, report: CompileReport,
                   run_context: RunContext | None = None) -> fx.GraphModule:
    """Run the configured passes on `gm`, filling `report`'s pass, FLOP and weight figures.

    `run_context` makes the context each compile-time run of the graph needs (a project
    model's forward context for its attention ops; for Dynamo graphs, one that undoes the
    run's writes to the live inputs); FLOP counts and verification use it.
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


def _splitting_ops(config: CompileConfig) -> tuple[Any, ...]:
    return DEFAULT_SPLITTING_OPS if config.splitting_ops is None else config.splitting_ops
