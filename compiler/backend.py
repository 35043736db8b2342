"""The TorchDynamo backend: `torch.compile(model, backend="fxkiln")`."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from compiler.capture import concrete_inputs, dynamo_propagator
from compiler.compile import optimize_graph
from compiler.config import CompileConfig
from compiler.inputs import inputs_restored
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


def backend(config: CompileConfig | None = None) -> Backend:
    """A backend for `torch.compile(model, backend=compiler.backend(config))`."""
    return Backend(config)


def fxkiln_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The registered "fxkiln" backend: the default config."""
    return Backend()(gm, example_inputs)
