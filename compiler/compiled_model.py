"""CompiledModel: what `compile_model` returns, whichever front end captured the model."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from compiler.config import CompileConfig
from compiler.report import CompileReport


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

    @property
    def whole_step_graphs(self) -> Any:
        """The runner's `WholeStepGraphs` (its decode fast path over `static_decode`), or None."""
        return getattr(self._run, "whole_steps", None)

    def __repr__(self) -> str:
        return f"CompiledModel({type(self.model).__name__}, {self.report.frontend})"
