"""Tracing helpers for model tests: symbolic_trace, attention nodes, fake-tensor propagation
with the token dimension of every input symbolic (what compile_model does)."""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.passes.fake_tensor_prop import FakeTensorProp


def trace(model: torch.nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(model)


def attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes
            if node.op == "call_function" and node.target is torch.ops.fxkiln.attention.default]


def fake_propagate(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1)))
        for t in inputs]
    return FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
