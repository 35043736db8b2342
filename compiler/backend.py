"""The TorchDynamo backend: `torch.compile(model, backend="fxkiln")`.

Each graph Dynamo hands the backend goes through the same pipeline as a traced model
(`compiler/pipeline.py`): passes, then a runner that captures it as device graphs per input
signature. The backend keeps the report and the rewritten graph of each graph it compiled.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import fx

from compiler.config import CompileConfig
from compiler.pipeline import compile_dynamo_graph
from compiler.report import CompileReport


class Backend:
    """A Dynamo backend bound to one config; keeps the report of each graph it compiled."""

    def __init__(self, config: CompileConfig | None = None) -> None:
        self.config = config if config is not None else CompileConfig()
        self.reports: list[CompileReport] = []
        self.graph_modules: list[fx.GraphModule] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        compiled = compile_dynamo_graph(gm, example_inputs, self.config)
        self.reports.append(compiled.report)
        self.graph_modules.append(compiled.graph_module)
        return compiled.run


def backend(config: CompileConfig | None = None) -> Backend:
    """A backend for `torch.compile(model, backend=compiler.backend(config))`."""
    return Backend(config)


def fxkiln_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """The registered "fxkiln" backend: the default config."""
    return Backend()(gm, example_inputs)
