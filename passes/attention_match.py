"""Finding attention in an aten-free torch graph: SDPA calls and eager softmax(q @ k.T) @ v.

Both forms are matched from the graph's structure and shapes alone. A match gives the query,
key and value in the (batch, heads, tokens, head_size) layout the model used, with key and value
taken from before any grouped-query repeat (`repeat_kv`'s unsqueeze-expand-reshape, or
`repeat_interleave` on the heads), the mask operand (boolean or additive, proven plain by
`passes.mask_proof`), SDPA's `is_causal` flag and the scale. An attention whose scores pass
through something the cached attention op cannot express (a softcap's tanh, a second bias, a
non-zero dropout) is an `UnsupportedAttentionError` naming the node, never a silent rewrite.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from passes.fx_utils import MATMUL_FUNCTIONS, call_arg, is_call, node_val, same_shape

SDPA_FUNCTIONS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax)
CAST_METHODS = ("to", "type", "float", "type_as", "contiguous")
DROPOUT_FUNCTIONS = (F.dropout, torch.dropout)
SCORES_SEARCH_DEPTH = 8  # ops between q @ k.T and the softmax that the search looks through


class UnsupportedAttentionError(ValueError):
    """An attention (or its mask) that fxkiln's cached attention op cannot express."""

    def __init__(self, node: fx.Node, reason: str) -> None:
        super().__init__(f"cannot serve the attention at node {node.format_node()}: {reason}")
        self.node = node
        self.reason = reason


@dataclass(frozen=True)
class AttentionMatch:
    """One attention: `output` (batch, heads, queries, head_size) = attend(query, key, value)."""

    output: fx.Node
    query: fx.Node
    key: fx.Node       # (batch, kv_heads, keys, head_size), before any grouped-query repeat
    value: fx.Node
    mask: fx.Node | None
    is_causal: bool
    scale: float
    form: str          # "sdpa" | "eager"


def match_attention(node: fx.Node) -> AttentionMatch | None:
    """The attention `node` computes (an SDPA call, or the softmax of an eager attention)."""
    if node.op == "call_function" and node.target in SDPA_FUNCTIONS:
        return _match_sdpa(node)
    if is_call(node, ("softmax",), SOFTMAX_FUNCTIONS):
        return _match_eager(node)
    return None


def _match_sdpa(node: fx.Node) -> AttentionMatch:
    query, key, value = (call_arg(node, i, (name,)) for i, name in
                         enumerate(("query", "key", "value")))
    mask = call_arg(node, 3, ("attn_mask",))
    dropout = call_arg(node, 4, ("dropout_p",), 0.0)
    is_causal = call_arg(node, 5, ("is_causal",), False)
    scale = call_arg(node, 6, ("scale",))
    if dropout != 0.0:
        raise UnsupportedAttentionError(node, f"dropout_p={dropout!r} (expected 0.0: inference)")
    if not isinstance(is_causal, bool) or not (scale is None or isinstance(scale, (int, float))):
        raise UnsupportedAttentionError(node, f"is_causal={is_causal!r} and scale={scale!r}: "
                                              f"expected a bool and a number known at capture")
    if not all(isinstance(x, fx.Node) for x in (query, key, value)) or \
            not (mask is None or isinstance(mask, fx.Node)):
        raise UnsupportedAttentionError(node, "expected query, key, value and mask from the graph")
    if not node.kwargs.get("enable_gqa", False):
        key, value = before_repeat(key), before_repeat(value)
    if scale is None:
        scale = float(_shape(query)[-1]) ** -0.5
    return AttentionMatch(node, query, key, value, mask, is_causal, float(scale), "sdpa")


def _match_eager(softmax: fx.Node) -> AttentionMatch | None:
    source = call_arg(softmax, 0, ("input",))
    dim = call_arg(softmax, 1, ("dim",))
    output = _weights_times_value(softmax)
    if output is None or not isinstance(source, fx.Node):
        return None
    path = _path_to_scores(source)
    if path is None:
        return None  # a softmax that is no attention (say, a router): left alone
    scores = path[-1]
    query, key_t = scores.args[0], scores.args[1]
    if not isinstance(dim, int) or dim not in (-1, len(_shape(source)) - 1):
        raise UnsupportedAttentionError(softmax, f"softmax over dim {dim!r}; expected the keys "
                                                 f"(the last dim)")
    scale, mask = 1.0, None
    for node in path[:-1]:
        factor = _scalar_factor(node)
        if factor is not None:
            scale *= factor
        elif _is_cast(node):
            continue
        elif _is_add(node) and mask is None:
            mask = next(a for a in node.args if isinstance(a, fx.Node) and a not in path)
        else:
            reason = ("a second term added to the scores (a float bias such as T5's relative "
                      "position bias)" if _is_add(node) else
                      f"{_describe(node)} on the scores before the softmax (a softcap or "
                      f"another transform the cached attention op cannot express)")
            raise UnsupportedAttentionError(node, reason)
    value = output.args[1]
    key = _transposed_last_two(key_t)
    assert isinstance(query, fx.Node) and key is not None and isinstance(value, fx.Node)
    return AttentionMatch(output, query, before_repeat(key), before_repeat(value), mask,
                          False, scale, "eager")


def _weights_times_value(softmax: fx.Node) -> fx.Node | None:
    """The `weights @ value` node the softmax feeds (through casts and a no-op dropout)."""
    node = softmax
    while len(node.users) == 1:
        (user,) = node.users
        if _is_cast(user) or _is_noop_dropout(user):
            node = user
            continue
        if _is_matmul(user) and user.args[0] is node and isinstance(user.args[1], fx.Node):
            return user
        return None
    return None


def _path_to_scores(start: fx.Node) -> list[fx.Node] | None:
    """[start, ..., q @ k.T]: the chain from the softmax input up to the scores matmul, following
    the operand that leads there; None if no such matmul is within reach."""
    frontier: list[list[fx.Node]] = [[start]]
    for _ in range(SCORES_SEARCH_DEPTH):
        next_frontier = []
        for path in frontier:
            node = path[-1]
            if _is_matmul(node) and isinstance(node.args[1], fx.Node) and \
                    _transposed_last_two(node.args[1]) is not None:
                return path
            next_frontier += [[*path, arg] for arg in node.all_input_nodes
                              if isinstance(node_val(arg), torch.Tensor) and
                              node_val(arg).dim() >= 2]
        frontier = next_frontier
    return None


def before_repeat(node: fx.Node) -> fx.Node:
    """The key or value before a grouped-query repeat of its heads (dim 1), else `node` itself.

    Recognized: `x[:, :, None].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)` (repeat_kv: head
    h reads kv head h // n, as the cached op's GQA does) and `x.repeat_interleave(n, dim=1)`;
    the shapes must say exactly that."""
    if is_call(node, ("repeat_interleave",), (torch.repeat_interleave,)):
        source = node.args[0]
        if call_arg(node, 2, ("dim",)) == 1 and isinstance(source, fx.Node):
            return source
        return node
    if not is_call(node, ("reshape", "view"), (torch.reshape,)) or \
            not isinstance(node.args[0], fx.Node):
        return node
    expanded = node.args[0]
    if not is_call(expanded, ("expand",), ()) or not isinstance(expanded.args[0], fx.Node):
        return node
    inserted = expanded.args[0]
    if not _inserts_dim(inserted) or not isinstance(inserted.args[0], fx.Node):
        return node
    source = inserted.args[0]
    b, kv, s, d = _shape(source)
    repeats = _shape(expanded)[2]
    if same_shape(_shape(inserted), (b, kv, 1, s, d)) and \
            same_shape(_shape(expanded), (b, kv, repeats, s, d)) and \
            same_shape(_shape(node), (b, kv * repeats, s, d)):
        return source
    return node


def _inserts_dim(node: fx.Node) -> bool:
    """`x.unsqueeze(k)` or `x[...]` indexed with full slices, None and Ellipsis only."""
    if is_call(node, ("unsqueeze",), (torch.unsqueeze,)):
        return True
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    full = slice(None, None, None)
    return None in index and all(i is None or i is Ellipsis or i == full for i in index)


def _transposed_last_two(node: Any) -> fx.Node | None:
    """X when `node` swaps the last two dims of a 4-d X (`X.transpose(-1, -2)`, (2, 3), mT)."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    value = node_val(source)
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return None
    if is_call(node, ("transpose",), (torch.transpose,)) and len(node.args) == 3:
        dims = {d % 4 for d in node.args[1:] if isinstance(d, int)}
        return source if dims == {2, 3} else None
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return source
    return None


def _scalar_factor(node: fx.Node) -> float | None:
    """c when `node` is `x * c`, `c * x` or `x / c` for a number c known at capture."""
    if not (is_call(node, ("mul", "div", "__mul__", "__truediv__"),
                    (operator.mul, operator.truediv, torch.mul, torch.div))
            and len(node.args) == 2):
        return None
    name = node.target if isinstance(node.target, str) else node.target.__name__
    divides = "div" in name
    for position, arg in enumerate(node.args):
        number = _number(arg)
        if number is not None and not (divides and position == 0):
            return 1.0 / number if divides else number
    return None


def _number(arg: Any) -> float | None:
    """A Python number, or the fill value of a 0-d `torch.full([], c)` node."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target is torch.full \
            and tuple(call_arg(arg, 0, ("size",), ())) == () and \
            isinstance(call_arg(arg, 1, ("fill_value",)), (int, float)):
        return float(call_arg(arg, 1, ("fill_value",)))
    return None


def _is_matmul(node: fx.Node) -> bool:
    return is_call(node, ("matmul", "__matmul__"), MATMUL_FUNCTIONS) and len(node.args) == 2


def _is_cast(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in CAST_METHODS:
        return True
    return False


def _is_add(node: fx.Node) -> bool:
    return is_call(node, ("add", "__add__"), (operator.add, torch.add)) and len(node.args) == 2


def _is_noop_dropout(node: fx.Node) -> bool:
    if not is_call(node, ("dropout",), DROPOUT_FUNCTIONS):
        return False
    p = call_arg(node, 1, ("p",), 0.5)
    training = call_arg(node, 2, ("training", "train"), True)
    return p == 0.0 or training is False


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__",
                                                                      str(node.target))
    return f"{node.op} {target}"


def _shape(node: Any) -> tuple[Any, ...]:
    value = node_val(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()
