"""Helpers for pass tests: trace like compile_model does, count ops, print graph bodies."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

import runtime.ops  # noqa: F401  (registers the implementations of the dispatch ops)
from compiler.capture import symbolic_propagator, symbolic_trace
from runtime.registry import kernel_implementations

# A projection in a traced graph, or in a compiled one (linear_epilogue and kernel_choice make
# each a call of the chosen implementation of fxkiln.linear).
LINEAR_TARGETS = (torch._C._nn.linear,
                  *(impl.fn for impl in kernel_implementations("linear").values()))


def trace(module: torch.nn.Module, inputs: Sequence[Any]) -> fx.GraphModule:
    """symbolic_trace plus shape propagation with a symbolic token dimension."""
    gm = symbolic_trace(module)
    symbolic_propagator(tuple(inputs))(gm)
    return gm


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    """How many nodes call each target ("view", "linear", "getitem", ...)."""
    counts: Counter[str] = Counter()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method", "call_module"):
            target = node.target
            counts[target if isinstance(target, str) else getattr(target, "__name__", str(target))] += 1
    return counts


def graph_body(gm: fx.GraphModule) -> str:
    """The graph's code without the def line and the `x = None` freeing noise."""
    lines = []
    for line in gm.code.strip().splitlines()[1:]:
        lines.append(line.split(";")[0].rstrip())
    return "\n".join(line.strip() for line in lines if line.strip())
