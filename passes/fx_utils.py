"""FX helpers shared by the passes: shapes, constants, liveness, call arguments, projections."""
from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from passes.writes import writes

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


def holds_tensor(node: Any) -> bool:
    """The node's value is a tensor, or a tuple or list with a tensor in it (a split's)."""
    value = node_val(node)
    if isinstance(value, (tuple, list)):
        return any(isinstance(item, torch.Tensor) for item in value)
    return isinstance(value, torch.Tensor)


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


def static_dtype(value: Any) -> torch.dtype | None:
    """The dtype `value` stands for at compile time: a dtype literal (Dynamo's graphs) or a
    `tensor.dtype` node (symbolic_trace's) of a tensor whose dtype shape propagation knows."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target is getattr \
            and value.args[1:] == ("dtype",):
        source = tensor_meta(value.args[0])
        return source.dtype if source is not None else None
    return None


# -- liveness -------------------------------------------------------------------------------

def is_impure(node: fx.Node) -> bool:
    """FX's notion (mutable schemas, asserts, random ops), plus every write it misses:
    tensor methods and `__setitem__` called by name, augmented assignment, `out=` and
    `inplace=True` (`passes.writes`)."""
    return node.is_impure() or writes(node)


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value reaches the output or a side effect (one backward sweep)."""
    live: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if is_impure(node) or any(user in live for user in node.users):
            live.add(node)
    return live


# -- call arguments -------------------------------------------------------------------------

def call_arg(node: fx.Node, index: int, names: Sequence[str], default: Any = None) -> Any:
    """Argument `index` of a call, whether it was passed by position or by one of `names`."""
    if len(node.args) > index:
        return node.args[index]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    return default


def is_call(node: fx.Node, methods: Sequence[str], functions: Sequence[Any]) -> bool:
    """`node` calls one of `methods` (as tensor methods) or one of `functions`."""
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and any(node.target is f for f in functions)


def is_dim(dim: Any, ndim: int, wanted: int) -> bool:
    """`dim` (possibly negative) names dimension `wanted` of an `ndim`-dimensional tensor."""
    return isinstance(dim, int) and not isinstance(dim, bool) and -ndim <= dim < ndim and \
        dim % ndim == wanted % ndim


# -- projections ----------------------------------------------------------------------------

LINEAR_FUNCTIONS = (torch._C._nn.linear, F.linear)
MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.Tensor.matmul)


@dataclass(frozen=True)
class Projection:
    """`input` times a compile-time constant weight: `linear(x, W, b)`, `x @ W` or `x @ W.t()`.

    `rows_dim` is the dimension of `weight_value` that indexes the output features (0 for
    linear and for a transposed weight, 1 for `x @ W`); `transpose` is the node that turns the
    weight into (in, out) for `x @ W.t()`, if any.
    """

    node: fx.Node
    input: fx.Node
    weight: fx.Node
    weight_value: torch.Tensor
    bias: fx.Node | None = None
    bias_value: torch.Tensor | None = None
    rows_dim: int = 0
    transpose: fx.Node | None = None

    @property
    def out_features(self) -> int:
        return int(self.weight_value.shape[self.rows_dim])

    @property
    def in_features(self) -> int:
        return int(self.weight_value.shape[1 - self.rows_dim])

    @property
    def is_linear(self) -> bool:
        return self.node.target in LINEAR_FUNCTIONS


def projection_of(gm: fx.GraphModule, node: fx.Node) -> Projection | None:
    """The projection `node` computes, or None if it is not a product with a constant weight."""
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        x, weight = call_arg(node, 0, ("input",)), call_arg(node, 1, ("weight",))
        bias = call_arg(node, 2, ("bias",))
        weight_value, bias_value = constant_tensor(gm, weight), constant_tensor(gm, bias)
        if not isinstance(x, fx.Node) or weight_value is None or weight_value.dim() != 2:
            return None
        if bias is not None and (bias_value is None or bias_value.dim() != 1):
            return None
        return Projection(node, x, weight, weight_value, bias, bias_value)
    if is_call(node, ("matmul", "__matmul__"), MATMUL_FUNCTIONS) and len(node.args) == 2:
        x, operand = node.args
        if not isinstance(x, fx.Node) or not isinstance(operand, fx.Node):
            return None
        value = constant_tensor(gm, operand)
        if value is not None and value.dim() == 2:
            return Projection(node, x, operand, value, rows_dim=1)
        source = _transposed_source(operand)
        value = constant_tensor(gm, source) if source is not None else None
        if source is not None and value is not None and value.dim() == 2:
            return Projection(node, x, source, value, rows_dim=0, transpose=operand)
    return None


def _transposed_source(node: fx.Node) -> fx.Node | None:
    """X when `node` is X.t(), X.T, X.mT, torch.t(X) or X.transpose(0, 1) of a matrix X."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    if is_call(node, ("t",), (torch.t,)) and len(node.args) == 1:
        return source
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return source
    if is_call(node, ("transpose",), (torch.transpose,)) and len(node.args) == 3:
        dims = {d % 2 for d in node.args[1:] if isinstance(d, int)}
        return source if dims == {0, 1} else None
    return None


# -- new constants --------------------------------------------------------------------------

def add_constant(gm: fx.GraphModule, name: str, value: torch.Tensor, *,
                 parameter: bool = False) -> str:
    """Register `value` on `gm` under a free attribute name derived from `name`; return it.

    A tensor already registered under that name with the same storage, offset, shape and
    strides is reused (so a pass that runs twice adds nothing). Views are registered as
    non-persistent buffers, so they stay views of the weight they narrow.
    """
    base = re.sub(r"\W", "_", name).strip("_") or "constant"
    candidate, suffix = base, 1
    while hasattr(gm, candidate):
        existing = getattr(gm, candidate)
        if isinstance(existing, torch.Tensor) and _same_tensor(existing, value):
            return candidate
        suffix += 1
        candidate = f"{base}_{suffix}"
    if parameter:
        gm.register_parameter(candidate, nn.Parameter(value, requires_grad=False))
    else:
        gm.register_buffer(candidate, value, persistent=False)
    return candidate


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def constant_name(node: fx.Node) -> str:
    """A readable name for a constant node: its attribute path, or the placeholder's name."""
    return str(node.target) if node.op == "get_attr" else node.name
