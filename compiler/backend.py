"""The TorchDynamo backend: `torch.compile(model, backend="fxkiln")`."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx

from compiler.capture import concrete_inputs, dynamo_propagator
from compiler.compile import optimize_graph
from compiler.config import CompileConfig
from compiler.report import CompileReport


class Backend:
    """A Dynamo backend bound to one config; keeps the report of each graph it compiled."""

    def __init__(self, config: CompileConfig | None = None) -> None:
        self.config = config if config is not None else CompileConfig()
        self.reports: list[CompileReport] = []
        self.graph_modules: list[fx.GraphModule] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        start = time.perf_counter()
        refresh = dynamo_propagator(gm, example_inputs)
        refresh(gm)
        report = CompileReport(frontend="dynamo", device=str(self.config.resolved_device()))
        inputs = concrete_inputs(example_inputs)
        with inputs_restored(inputs):  # FLOP counting and verify run the graph on them
            gm = optimize_graph(gm, inputs, self.config, refresh, report)
        report.compile_seconds = time.perf_counter() - start
        self.reports.append(report)
        self.graph_modules.append(gm)
        return gm


@contextmanager
def inputs_restored(inputs: Sequence[Any]) -> Iterator[None]:
    """Undo in-place writes that running the graph at compile time makes to its inputs.

    Dynamo hands the backend the live tensors of the call being compiled, such as a Hugging
    Face StaticCache's keys, values and position counter, which the graph updates in place.
    Without this, each compile-time run advances the user's cache (three steps instead of one).
    Parameters are not snapshotted (inference graphs do not write them); other tensors are, and
    those whose version counter moved are copied back.
    """
    saved = [(tensor, tensor._version, tensor.detach().clone()) for tensor in inputs
             if isinstance(tensor, torch.Tensor) and not isinstance(tensor, torch.nn.Parameter)]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, version, copy in saved:
                if tensor._version != version:
                    tensor.copy_(copy)


def backend(config: CompileConfig | None = None) -> Backend:
    """A backend for `torch.compile(model, backend=compiler.backend(config))`."""
    return Backend(config)


def fxkiln_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The registered "fxkiln" backend: the default config."""
    return Backend()(gm, example_inputs)
