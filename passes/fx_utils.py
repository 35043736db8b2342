"""FX helpers shared by the passes: shapes from node metadata, constant lookup, node kinds."""
from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

# Ops whose output is a view of their first argument with its elements unchanged in order.
VIEW_METHODS = frozenset({"view", "reshape", "flatten", "contiguous"})
VIEW_FUNCTIONS = frozenset({torch.reshape, torch.flatten, torch.Tensor.view, torch.Tensor.reshape})


def node_val(node: Any) -> Any:
    """The example value (usually a FakeTensor) that shape propagation stored on `node`."""
    if isinstance(node, fx.Node):
        return node.meta.get("val", node.meta.get("example_value"))
    return node


def tensor_meta(node: Any) -> torch.Tensor | None:
    value = node_val(node)
    return value if isinstance(value, torch.Tensor) else None


def known_equal(a: Any, b: Any) -> bool:
    """True only when `a == b` is provable (ints or sympy-backed SymInts)."""
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001  (an unprovable comparison is simply not known)
        return False


def same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def is_view_like(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    return node.op == "call_function" and node.target in VIEW_FUNCTIONS


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def constant_tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor behind `node` if it is a compile-time constant, else None.

    symbolic_trace graphs hold weights as `get_attr` nodes; Dynamo graphs pass them in as
    placeholders, which capture marks with meta["static_value"].
    """
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "placeholder":
        value = node.meta.get("static_value")
        return value if isinstance(value, torch.Tensor) else None
    return None
