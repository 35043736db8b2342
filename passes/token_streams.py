"""The token streams of a serving graph: which inputs carry token ids and positions.

A graph captured for serving (`compiler.hf_capture`) takes flattened tokens, as fxkiln's own
models do: `(input_ids, positions)` for the decoder stream and, for encoder-decoder models,
`(encoder_input_ids, encoder_positions)` for the encoder stream, each `(tokens,)`. The capture
tags each placeholder with its role in `meta[ROLE_KEY]`; the serving passes find the streams
through these tags (the graph's interface), never through module names. Each stream's token
count is a symbol of the shape environment; `stream_of` says which stream a size counts.

A stream may also come batched: an encoder whose input is not token ids but, say, audio features
`(sequences, mel bins, frames)` (Whisper), run per sequence with a fixed number of encoder
tokens each. Its attention operands are `(sequences, heads, tokens per sequence, head_size)`;
flattened, their rows are the stream's tokens in sequence order, as the runtime lays them out.
`stream_of_operand` finds the stream of an attention operand in either layout.
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
SEQUENCE_TOKENS_KEY = "fxkiln_tokens_per_sequence"  # gm.meta: batched stream -> its tokens each
DECODER, ENCODER = "decoder", "encoder"
ROLES: dict[str, tuple[str, str]] = {  # stream -> (ids role, positions role)
    DECODER: ("input_ids", "positions"),
    ENCODER: ("encoder_input_ids", "encoder_positions"),
}


@dataclass(frozen=True)
class TokenStream:
    """One stream of tokens: its input (flattened ids, or per-sequence features) and positions
    placeholders; a batched stream's fixed number of tokens per sequence."""

    name: str
    ids: fx.Node
    positions: fx.Node
    tokens_per_sequence: int | None = None

    @property
    def batched(self) -> bool:
        """Whether the stream's input is per sequence (features), not flattened token ids."""
        return self.tokens_per_sequence is not None

    @property
    def sequences(self) -> Any:
        """A batched stream's number of sequences (dim 0 of its input)."""
        return _rows(self.ids)

    @property
    def num_tokens(self) -> Any:
        """The stream's token count (an int or a SymInt) from shape propagation."""
        if self.tokens_per_sequence is not None:
            return self.sequences * self.tokens_per_sequence
        return _rows(self.ids)

    def symbols(self) -> set[Any]:
        """The sympy symbols that stand for this stream's token (or sequence) count."""
        found = set()
        for node in (self.ids, self.positions):
            size = _rows(node)
            if isinstance(size, torch.SymInt):
                found |= size.node.expr.free_symbols
        return found


def token_streams(gm: fx.GraphModule) -> dict[str, TokenStream]:
    """Stream name -> stream, for the streams whose placeholders the graph has."""
    by_role = {node.meta[ROLE_KEY]: node for node in gm.graph.find_nodes(op="placeholder")
               if ROLE_KEY in node.meta}
    per_sequence = gm.meta.get(SEQUENCE_TOKENS_KEY, {})
    streams = {}
    for name, (ids_role, positions_role) in ROLES.items():
        if ids_role in by_role and positions_role in by_role:
            streams[name] = TokenStream(name, by_role[ids_role], by_role[positions_role],
                                        per_sequence.get(name))
    return streams


def stream_of(size: Any, streams: Mapping[str, TokenStream]) -> TokenStream | None:
    """The stream whose token count `size` provably is, or None."""
    for stream in streams.values():
        if known_equal(size, stream.num_tokens) or known_equal(size, _rows(stream.positions)):
            return stream
    return None


def stream_of_operand(shape: tuple[Any, ...], streams: Mapping[str, TokenStream]
                      ) -> TokenStream | None:
    """The stream whose tokens an attention operand `(batch, heads, tokens, head_size)` holds:
    batch 1 over all of a stream's tokens, or a batched stream's sequences with their tokens
    each."""
    batch, tokens = shape[0], shape[2]
    if known_equal(batch, 1):
        stream = stream_of(tokens, streams)
        if stream is not None:
            return stream
    for stream in streams.values():
        if stream.batched and known_equal(batch, stream.sequences) and \
                known_equal(tokens, stream.tokens_per_sequence):
            return stream
    return None


def concrete_size(value: Any, bindings: Mapping[Any, int]) -> Any:
    """`value` (an int, SymInt or a sequence of them) with stream symbols bound to ints."""
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(concrete_size(v, bindings) for v in value)
    if not isinstance(value, torch.SymInt):
        return value
    expr = value.node.expr
    unbound = expr.free_symbols - set(bindings)
    if unbound:
        raise KeyError(f"size {expr} depends on {sorted(map(str, unbound))}, which count no "
                       f"token stream")
    return int(expr.xreplace(dict(bindings)))


def _rows(node: fx.Node) -> Any:
    value = node_val(node)
    return value.shape[0] if isinstance(value, torch.Tensor) and value.dim() else None
