"""Which graph nodes write into a tensor, and which of their arguments they write.

A write is a side effect: dead-code elimination must keep it even when nothing reads its
result (`self.state[:n] = x`, `cache.copy_(k)`, `self.steps.add_(1)`), and a pass must not
move a read of a tensor across a write into it. The op's schema decides where there is one
(`Tensor(a!)` arguments, an `out=` argument); Python's own ways of writing have none
(`__setitem__`, augmented assignment such as `x += y`, an `inplace=True` flag), so they are
listed here.
"""
from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
from torch import fx

# Python-level writes into their first argument, which no op schema describes.
SETITEM_TARGETS = frozenset({operator.setitem, torch.Tensor.__setitem__, "__setitem__"})
_AUGMENTED = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor",
              "lshift", "rshift", "matmul")
IN_PLACE_OPERATORS = frozenset({
    *(getattr(operator, f"i{name}") for name in _AUGMENTED),
    *(f"__i{name}__" for name in (*_AUGMENTED, "div")),  # the same, called as tensor methods
})


def written_args(node: fx.Node) -> list[Any]:
    """The arguments `node` writes into (graph nodes, in argument order); [] when it writes none.

    An OpOverload (Dynamo, make_fx graphs) or OpOverloadPacket says so in its schema. A tensor
    method or torch function called by name (`x.add_(1)`, `torch.relu_(x)`) is looked up as the
    aten op of that name; a name ending in `_` that aten does not know is taken to write its
    first argument. `out=` is written, and so is the first argument of `__setitem__`, of an
    augmented assignment and of a call with `inplace=True`.
    """
    if node.op not in ("call_function", "call_method"):
        return []
    written: list[Any] = []
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        written = _schema_writes(node, target)
    elif target in SETITEM_TARGETS or target in IN_PLACE_OPERATORS or _inplace_flag(node):
        written = list(node.args[:1])
    elif getattr(target, "__module__", None) == "_operator":
        pass  # operator.and_, or_, not_: the trailing `_` only avoids a keyword; nothing written
    else:
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name and _writes_self(name):
            written = list(node.args[:1])
    if "out" in node.kwargs:
        written.append(node.kwargs["out"])
    return [arg for arg in _flatten(written) if isinstance(arg, fx.Node)]


def writes(node: fx.Node) -> bool:
    """`node` writes into one of its arguments (see `written_args`)."""
    return bool(written_args(node))


def _schema_writes(node: fx.Node, op: Any) -> list[Any]:
    if isinstance(op, torch._ops.OpOverload):
        overloads = [op]
    else:  # called through the packet: its default overload, else any overload may be meant
        names = ["default"] if "default" in op.overloads() else op.overloads()
        overloads = [getattr(op, name) for name in names]
    written: list[Any] = []
    for overload in overloads:
        for index, argument in enumerate(overload._schema.arguments):
            alias = argument.alias_info
            if alias is None or not alias.is_write:
                continue
            value = node.args[index] if index < len(node.args) else node.kwargs.get(argument.name)
            if value is not None and not any(value is w for w in written):
                written.append(value)
    return written


@functools.lru_cache(maxsize=None)
def _writes_self(name: str) -> bool:
    """Whether the tensor method or torch function `name` writes its first argument (`self`)."""
    if name.startswith("_"):
        return False
    packet = getattr(torch.ops.aten, name, None) if name.isidentifier() else None
    if isinstance(packet, torch._ops.OpOverloadPacket):
        for overload_name in packet.overloads():
            arguments = getattr(packet, overload_name)._schema.arguments
            if arguments and arguments[0].alias_info is not None \
                    and arguments[0].alias_info.is_write:
                return True
        return False
    return name.endswith("_") and not name.endswith("__")


def _inplace_flag(node: fx.Node) -> bool:
    """A functional call such as `F.relu(x, inplace=True)` (by keyword or by position)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op != "call_function" or not callable(node.target) or \
            not any(a is True for a in node.args):
        return False
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or other arguments
        return False
    return bound.arguments.get("inplace") is True


def _flatten(values: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for value in values:
        flat.extend(_flatten(list(value)) if isinstance(value, (list, tuple)) else [value])
    return flat
