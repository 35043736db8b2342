"""The tests' one way to trace (as compile_model does), and reading graphs: op counts, bodies,
attention nodes, the propagated output."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx

import runtime.attention  # noqa: F401  (registers torch.ops.fxkiln.attention)
import runtime.ops  # noqa: F401  (registers the implementations of the dispatch ops)
from compiler.capture import ShapePropagator, symbolic_propagator, symbolic_trace
from compiler.shape_refresh import RefreshStats, metadata_differences
from runtime.registry import kernel_implementations

# A projection in a traced graph, or in a compiled one (linear_epilogue and kernel_choice make
# each a call of the chosen implementation of fxkiln.linear).
LINEAR_TARGETS = (torch._C._nn.linear,
                  *(impl.fn for impl in kernel_implementations("linear").values()))
# Where a compiled projection's weight is, by target: norm_prologue makes a projection fed by a
# norm a call of fxkiln.norm_linear's / add_norm_linear's implementation, (x, [residual,] norm
# weight, norm bias, eps, norm, weight, ...).
PROJECTION_WEIGHT_INDEX = {
    **{target: 1 for target in LINEAR_TARGETS},
    **{impl.fn: 5 for impl in kernel_implementations("norm_linear").values()},
    **{impl.fn: 6 for impl in kernel_implementations("add_norm_linear").values()},
}


def projections(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, torch.Tensor]]:
    """(node, weight node, output value) of each projection of a compiled graph, norm-fed
    ones included."""
    found = []
    for node in gm.graph.nodes:
        index = PROJECTION_WEIGHT_INDEX.get(node.target) if node.op == "call_function" else None
        if index is not None:
            value = node.meta["val"]
            found.append((node, node.args[index], value[0] if isinstance(value, tuple) else value))
    return found


def trace(module: torch.nn.Module, inputs: Sequence[Any] | None = None) -> fx.GraphModule:
    """compile_model's capture: symbolic_trace through every submodule, then (given `inputs`)
    fake-tensor shape propagation with dim 0 of each tensor input symbolic (meta["val"])."""
    gm = symbolic_trace(module)
    if inputs is not None:
        symbolic_propagator(tuple(inputs))(gm)
    return gm


@contextmanager
def checked_refreshes() -> Iterator[list[tuple[RefreshStats, list[str]]]]:
    """While open, every shape refresh (a ShapePropagator call: after capture and after each
    pass that changed the graph) that was incremental is followed by a full propagation of a
    copy of the graph (a full refresh is one already); the list gets each refresh's stats and
    how its values differ from the full one's."""
    checks: list[tuple[RefreshStats, list[str]]] = []
    refresh = ShapePropagator.__call__

    def checked(self: ShapePropagator, gm: fx.GraphModule) -> RefreshStats:
        stats = refresh(self, gm)
        differences = [] if stats.full else metadata_differences(gm, self.fake_mode,
                                                                 self.fake_inputs)
        checks.append((stats, differences))
        return stats

    ShapePropagator.__call__ = checked  # type: ignore[method-assign]  # restored below
    try:
        yield checks
    finally:
        ShapePropagator.__call__ = refresh  # type: ignore[method-assign]


def assert_fresh(checks: list[tuple[RefreshStats, list[str]]]) -> None:
    """No refresh of `checks` left a value a full propagation would not give, and some were
    incremental, each re-running fewer nodes than the graph has."""
    assert [line for _, differences in checks for line in differences] == []
    incremental = [stats for stats, _ in checks if not stats.full]
    assert incremental and all(len(stats.recomputed) < stats.nodes for stats in incremental)


def output_value(gm: fx.GraphModule) -> Any:
    """The propagated value (FakeTensors, symbolic dim 0) of what the graph returns."""
    (output,) = gm.graph.find_nodes(op="output")
    return fx.node.map_arg(output.args[0], lambda node: node.meta["val"])


def attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [node for node in gm.graph.nodes
            if node.op == "call_function" and node.target is torch.ops.fxkiln.attention.default]


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
