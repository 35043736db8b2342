"""The token streams of a serving graph: which inputs carry token ids and positions.

A graph captured for serving (`compiler.hf_capture`) takes flattened tokens, as fxkiln's own
models do: `(input_ids, positions)` for the decoder stream and, for encoder-decoder models,
`(encoder_input_ids, encoder_positions)` for the encoder stream, each `(tokens,)`. The capture
tags each placeholder with its role in `meta[ROLE_KEY]`; the serving passes find the streams
through these tags (the graph's interface), never through module names. Each stream's token
count is a symbol of the shape environment; `stream_of` says which stream a size counts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from passes.fx_utils import known_equal, node_val

ROLE_KEY = "fxkiln_input"          # placeholder meta: one of the roles below
MAX_POSITIONS_KEY = "fxkiln_max_positions"  # gm.meta: positions the model serves (int or None)
DECODER, ENCODER = "decoder", "encoder"
ROLES: dict[str, tuple[str, str]] = {  # stream -> (ids role, positions role)
    DECODER: ("input_ids", "positions"),
    ENCODER: ("encoder_input_ids", "encoder_positions"),
}


@dataclass(frozen=True)
class TokenStream:
    """One stream of flattened tokens: its ids and positions placeholders."""

    name: str
    ids: fx.Node
    positions: fx.Node

    @property
    def num_tokens(self) -> Any:
        """The stream's token count (an int or a SymInt) from shape propagation."""
        return _rows(self.ids)

    def symbols(self) -> set[Any]:
        """The sympy symbols that stand for this stream's token count."""
        found = set()
        for node in (self.ids, self.positions):
            size = _rows(node)
            if isinstance(size, torch.SymInt):
                found |= size.node.expr.free_symbols
        return found


def token_streams(graph: fx.Graph) -> dict[str, TokenStream]:
    """Stream name -> stream, for the streams whose placeholders the graph has."""
    by_role = {node.meta[ROLE_KEY]: node for node in graph.find_nodes(op="placeholder")
               if ROLE_KEY in node.meta}
    streams = {}
    for name, (ids_role, positions_role) in ROLES.items():
        if ids_role in by_role and positions_role in by_role:
            streams[name] = TokenStream(name, by_role[ids_role], by_role[positions_role])
    return streams


def stream_of(size: Any, streams: Mapping[str, TokenStream]) -> TokenStream | None:
    """The stream whose token count `size` provably is, or None."""
    for stream in streams.values():
        if known_equal(size, stream.num_tokens) or known_equal(size, _rows(stream.positions)):
            return stream
    return None


def concrete_size(value: Any, bindings: Mapping[Any, int]) -> Any:
    """`value` (an int, SymInt or a sequence of them) with stream symbols bound to ints."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        unbound = expr.free_symbols - set(bindings)
        if unbound:
            raise KeyError(f"size {expr} depends on {sorted(map(str, unbound))}, which count "
                           f"no token stream")
        return int(expr.xreplace(dict(bindings)))
    if isinstance(value, (tuple, list, torch.Size)):
        return type(value)(concrete_size(v, bindings) for v in value) \
            if not isinstance(value, torch.Size) else tuple(concrete_size(v, bindings)
                                                             for v in value)
    return value


def _rows(node: fx.Node) -> Any:
    value = node_val(node)
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
