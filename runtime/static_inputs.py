"""Static token buffers: where each call's token inputs are copied so that graphs can read them.

One buffer per token input, sized for the largest bucket; the arguments for bucket b are views of
its first b rows, so every bucket's graphs read fixed addresses. A call with n tokens copies its
inputs into rows [0, n); rows [n, b) are padding, which the runner's `fill_padding` may refill.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree


class StaticInputs:
    """The static buffers of the token inputs, and staging of each call's inputs into them."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any],
                 token_input_indices: Sequence[int], max_tokens: int,
                 device: torch.device) -> None:
        self.example_inputs = tuple(int(x) if isinstance(x, torch.SymInt) else x
                                    for x in example_inputs)
        self.token_indices = tuple(token_input_indices)
        for index in self.token_indices:
            if not 0 <= index < len(self.example_inputs) or \
                    not isinstance(self.example_inputs[index], torch.Tensor) or \
                    self.example_inputs[index].dim() == 0:
                raise ValueError(f"token_input_indices: expected indices of tensor inputs with a "
                                 f"token dimension (dim 0), found {index} among "
                                 f"{len(self.example_inputs)} example inputs")
        if max_tokens and not self.token_indices:
            raise ValueError("token_input_indices: expected at least one input with the token "
                             "dimension when capture_sizes is not empty, found none")
        self._is_token = frozenset(self.token_indices)
        self.buffers: dict[int, torch.Tensor] = {}
        # Non-token inputs other than parameters whose shape a graph fixes (e.g. the encoder
        # inputs of an encoder-decoder step): a call with other shapes cannot replay.
        self._fixed_shapes = tuple(
            (i, x.shape) for i, x in enumerate(self.example_inputs)
            if isinstance(x, torch.Tensor) and i not in self._is_token
            and not isinstance(x, torch.nn.Parameter))
        if not max_tokens:
            self.token_int_indices: frozenset[int] = frozenset()
            return
        example_tokens = self.num_tokens(self.example_inputs)
        if example_tokens < 1:
            raise ValueError("example inputs: expected at least one token (dim 0 of the token "
                             "inputs), found 0")
        self.token_int_indices = token_count_inputs(gm, self.example_inputs, self.token_indices,
                                                    example_tokens)
        rows = torch.arange(max_tokens) % example_tokens  # repeat the example rows to fill
        for index in self.token_indices:
            example = self.example_inputs[index]
            self.buffers[index] = example[rows.to(example.device)].to(device).contiguous()

    def is_token_input(self, index: int) -> bool:
        return index in self._is_token

    def num_tokens(self, inputs: Sequence[Any]) -> int:
        """The token count of a call: dim 0 of its token inputs, which must agree."""
        counts = {int(inputs[i].shape[0]) for i in self.token_indices}
        if len(counts) != 1:
            found = {i: tuple(inputs[i].shape) for i in self.token_indices}
            raise ValueError(f"token inputs: expected the same token count (dim 0) in every "
                             f"token input, found shapes {found}")
        return counts.pop()

    def shapes_match(self, inputs: Sequence[Any]) -> bool:
        """Whether the non-token inputs have the shapes they had at capture."""
        return all(inputs[i].shape == shape for i, shape in self._fixed_shapes)

    def capture_args(self, bucket: int) -> list[Any]:
        """Arguments for warm-up and capture at `bucket`: the example inputs, staged."""
        return [self.buffers[i][:bucket] if i in self._is_token
                else bucket if i in self.token_int_indices else x
                for i, x in enumerate(self.example_inputs)]

    def stage(self, inputs: Sequence[Any], num_tokens: int, bucket: int,
              fill_padding: Callable[[torch.Tensor], None]) -> list[Any]:
        """Copy the token inputs into the static buffers; the arguments for `bucket`."""
        if len(inputs) != len(self.example_inputs):
            raise ValueError(f"inputs: expected {len(self.example_inputs)} inputs (as in the "
                             f"example inputs), found {len(inputs)}")
        args = list(inputs)
        for index, buffer in self.buffers.items():
            value = inputs[index]
            if value.shape[1:] != buffer.shape[1:] or value.dtype != buffer.dtype:
                trailing = ", ".join(map(str, buffer.shape[1:]))
                raise ValueError(
                    f"input {index}: expected shape (tokens, {trailing}) and dtype "
                    f"{buffer.dtype} as in the example inputs, found {tuple(value.shape)} and "
                    f"{value.dtype}")
            buffer[:num_tokens].copy_(value)
            if num_tokens < bucket:
                fill_padding(buffer[num_tokens:bucket])
            args[index] = buffer[:bucket]
        for index in self.token_int_indices:
            if inputs[index] == num_tokens:
                args[index] = bucket
        return args


def _symbol(value: Any) -> Any:
    """The sympy expression of a SymInt (or None)."""
    return value.node.expr if isinstance(value, torch.SymInt) else None


def token_count_inputs(gm: fx.GraphModule, example_inputs: Sequence[Any],
                       token_indices: Sequence[int], example_tokens: int) -> frozenset[int]:
    """Positions of int inputs that hold the token count.

    With shape metadata on the placeholders (Dynamo graphs): the SymInt placeholders whose symbol
    is dim 0 of the token inputs. Without it: the ints equal to the example token count.
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values = [p.meta.get("example_value", p.meta.get("val")) for p in placeholders]
    if len(values) == len(example_inputs):
        token_dims = {_symbol(values[i].shape[0]) for i in token_indices
                      if isinstance(values[i], torch.Tensor)}
        token_dims.discard(None)
        if token_dims:
            return frozenset(i for i, v in enumerate(values)
                             if _symbol(v) is not None and _symbol(v) in token_dims)
    return frozenset(i for i, x in enumerate(example_inputs)
                     if type(x) is int and x == example_tokens)  # noqa: E721  (a bool is no count)


def static_outputs(top: fx.GraphModule, token_inputs: Callable[[int], bool]) -> tuple[bool, ...]:
    """Per output leaf: True when it is returned as is (an attribute or a non-token input)."""
    (output,) = top.graph.find_nodes(op="output")
    placeholders = list(top.graph.find_nodes(op="placeholder"))
    kinds = []
    for leaf in pytree.tree_leaves(output.args[0]):
        if not isinstance(leaf, fx.Node):
            kinds.append(True)
        elif leaf.op == "placeholder":
            kinds.append(not token_inputs(placeholders.index(leaf)))
        else:
            kinds.append(leaf.op == "get_attr")
    return tuple(kinds)
