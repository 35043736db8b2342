"""Proving that an attention mask is plain causal or plain bidirectional, before it is dropped.

The cached attention op knows two masks: causal over a sequence's own tokens (decoder self
attention) and none (encoder self attention, cross-attention). Replacing an attention drops its
mask subgraph, so the pass must first know that the mask is exactly one of these two for every
length the model serves. Module names prove nothing; this module proves it in two steps:

1. Structure. The mask's ancestors may read token positions (Hugging Face's packed-sequence
   detection does) and sizes (token counts), and constants that are not floating point. A mask
   that reads token ids (a padding mask from the ids) or a floating-point constant (a learned
   bias, ALiBi slopes) is refused, naming the node.
2. Evaluation (translation validation). The mask subgraph is lifted out and run for several
   token counts, one sequence at positions 0..n-1 (what the captured graph means): sizes bound
   to the probe counts, positions to `arange`. Each result must equal the causal (or the full)
   pattern, as a boolean mask or as an additive one (0 where allowed, -inf or the dtype's
   minimum where not). Besides a few small counts, each integer constant c of the subgraph
   (a sliding window's width, say) is probed at c + 1 and c + 2 tokens, capped by the positions
   the model serves, so a window shorter than those positions shows up as a refusal.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from passes.attention_match import UnsupportedAttentionError
from passes.fx_utils import node_val
from passes.token_streams import ROLE_KEY, ROLES, TokenStream, concrete_size

PROBE_TOKENS = (1, 2, 3, 5, 8, 13)
PROBE_LIMIT = 8192  # largest token count probed (a (n, n) mask per probe)
SERVED_PROBE = 64   # the positions served are probed up to this many tokens, besides constants
OTHER_STREAM_TOKENS = 3  # tokens of a stream that the probed attention does not read
METADATA_METHODS = frozenset({"new_ones", "new_zeros", "new_full", "new_empty", "new_tensor"})
METADATA_FUNCTIONS = (torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like)


class MaskKind(enum.Enum):
    CAUSAL = "causal"  # query i sees keys 0..i of its own sequence
    FULL = "full"      # every query sees every key


class MaskProver:
    """Classifies the masks of one graph's attentions; each mask subgraph is analysed once."""

    def __init__(self, gm: fx.GraphModule, streams: Mapping[str, TokenStream],
                 max_positions: int | None) -> None:
        self.gm = gm
        self.streams = streams
        self.max_positions = max_positions
        self._position_roles = {roles[1]: name for name, roles in ROLES.items()}
        self._seen: dict[fx.Node, tuple[fx.GraphModule, list[fx.Node], set[int]]] = {}

    def kind(self, attention: fx.Node, mask: fx.Node, query: TokenStream,
             key: TokenStream) -> MaskKind:
        """The kind of `mask` (an operand of `attention`); UnsupportedAttentionError if neither."""
        if mask not in self._seen:
            self._seen[mask] = self._lift(attention, mask)
        module, leaves, constants = self._seen[mask]
        kinds = {MaskKind.CAUSAL, MaskKind.FULL} if query is key else {MaskKind.FULL}
        for probe in self._probes(attention, query, key, constants):
            sizes = {name: probe.get(name, OTHER_STREAM_TOKENS) for name in self.streams}
            bindings = {symbol: sizes[stream.name] for stream in self.streams.values()
                        for symbol in stream.symbols()}
            value = module(*(self._probe_input(leaf, bindings, sizes) for leaf in leaves))
            rows, columns = sizes[query.name], sizes[key.name]
            allowed = _allowed(attention, mask, value, rows, columns)
            before = set(kinds)
            kinds &= _kinds_of(allowed, rows, columns, query is key)
            if not kinds:
                wanted = MaskKind.CAUSAL if MaskKind.CAUSAL in before else MaskKind.FULL
                raise UnsupportedAttentionError(
                    attention, f"its mask ({mask.name}) is neither causal nor full: at "
                               f"{rows} queries and {columns} keys, "
                               f"{_first_difference(allowed, wanted)} (a sliding window shorter "
                               f"than the {self.max_positions} positions served, or another "
                               f"pattern)")
        return MaskKind.CAUSAL if MaskKind.CAUSAL in kinds else MaskKind.FULL

    # -- the mask subgraph ------------------------------------------------------------------
    def _lift(self, attention: fx.Node, mask: fx.Node
              ) -> tuple[fx.GraphModule, list[fx.Node], set[int]]:
        """(the mask's subgraph as a module, the original nodes its inputs stand for, integer
        constants in it); refuses masks that read token ids or floating-point constants.

        Inputs of the subgraph: sizes, the position inputs, and tensors read only for their
        shape, dtype and device (the first argument of `new_ones`, `zeros_like`, ...)."""
        inner: set[fx.Node] = set()
        leaves: set[fx.Node] = set()
        shape_only: set[fx.Node] = set()
        stack = [mask]
        while stack:
            node = stack.pop()
            if node in inner or node in leaves:
                continue
            if _is_size(node) or node.op == "placeholder":
                self._check_leaf(attention, mask, node)
                leaves.add(node)
                continue
            if node.op == "get_attr":
                self._check_constant(attention, mask, node)
            inner.add(node)
            data = node.all_input_nodes
            if _reads_only_metadata(node) and isinstance(node.args[0], fx.Node):
                shape_only.add(node.args[0])
                data = [a for a in data if a is not node.args[0]]
            stack.extend(data)
        leaves |= shape_only - inner
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        ordered_leaves = [n for n in self.gm.graph.nodes if n in leaves]
        for leaf in ordered_leaves:
            env[leaf] = graph.placeholder(f"leaf_{leaf.name}")
        constants: set[int] = set()
        for node in self.gm.graph.nodes:
            if node in inner:
                env[node] = graph.node_copy(node, lambda n: env[n])
                constants |= _int_constants(node)
        graph.output(env[mask])
        return fx.GraphModule(self.gm, graph, "MaskSubgraph"), ordered_leaves, constants

    def _check_leaf(self, attention: fx.Node, mask: fx.Node, node: fx.Node) -> None:
        if _is_size(node):
            return
        role = node.meta.get(ROLE_KEY)
        if role not in self._position_roles:
            what = f"the token ids ({role})" if role else f"the graph input {node.name}"
            raise UnsupportedAttentionError(attention, f"its mask ({mask.name}) reads {what}: "
                                                       f"a padding or data-dependent mask")

    def _check_constant(self, attention: fx.Node, mask: fx.Node, node: fx.Node) -> None:
        value: Any = self.gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            raise UnsupportedAttentionError(attention, f"its mask ({mask.name}) reads the "
                                                       f"floating-point constant {node.target}: "
                                                       f"a bias added to the scores")

    def _probe_input(self, leaf: fx.Node, bindings: Mapping[Any, int],
                     sizes: Mapping[str, int]) -> Any:
        example = node_val(leaf)
        if _is_size(leaf):
            return concrete_size(example, bindings)
        if leaf.meta.get(ROLE_KEY) in self._position_roles:
            stream = self._position_roles[leaf.meta[ROLE_KEY]]
            return torch.arange(sizes[stream], device=example.device).to(example.dtype)
        shape = concrete_size(tuple(example.shape), bindings)  # read for its metadata only
        return torch.empty(shape, dtype=example.dtype, device=example.device)

    # -- probe sizes ------------------------------------------------------------------------
    def _probes(self, attention: fx.Node, query: TokenStream, key: TokenStream,
                constants: set[int]) -> list[dict[str, int]]:
        served = self.max_positions or PROBE_LIMIT
        counts = {n for n in PROBE_TOKENS if n <= served} | {min(served, SERVED_PROBE)}
        for constant in constants:
            counts |= {n for n in (constant + 1, constant + 2) if n <= min(served, PROBE_LIMIT)}
            if PROBE_LIMIT < constant + 1 < served:
                raise UnsupportedAttentionError(
                    attention, f"its mask holds the constant {constant} (a sliding window?), and "
                               f"the model serves {served} positions: too many to check "
                               f"(fxkiln probes masks up to {PROBE_LIMIT} tokens)")
        ordered = sorted(counts)
        if query is key:
            return [{query.name: n} for n in ordered]
        return [{query.name: q, key.name: k} for q in ordered[:4] for k in ordered[:4]] + \
            [{query.name: n, key.name: n} for n in ordered[4:]]


def _allowed(attention: fx.Node, mask: fx.Node, value: Any, rows: int,
             columns: int) -> torch.Tensor:
    """The mask as booleans (..., rows, columns): True where a query may see a key."""
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        raise UnsupportedAttentionError(attention, f"its mask ({mask.name}) is not a tensor of "
                                                   f"at least 2 dims: {value!r}")
    if value.is_floating_point():
        floor = torch.finfo(value.dtype).min / 2
        allowed, masked = value == 0, (value <= floor) | value.isneginf()
        if not bool((allowed | masked).all()):
            raise UnsupportedAttentionError(attention, f"its mask ({mask.name}) adds values "
                                                       f"other than 0 and -inf to the scores: "
                                                       f"a float bias")
        value = allowed
    elif value.dtype != torch.bool:
        raise UnsupportedAttentionError(attention, f"its mask ({mask.name}) has dtype "
                                                   f"{value.dtype}; expected bool or float")
    try:
        shape = torch.broadcast_shapes(value.shape, (1,) * (value.dim() - 2) + (rows, columns))
    except RuntimeError:
        shape = None
    if shape is None or tuple(shape[-2:]) != (rows, columns) or any(s != 1 for s in shape[:1]):
        raise UnsupportedAttentionError(attention, f"its mask ({mask.name}) has shape "
                                                   f"{tuple(value.shape)} for {rows} queries "
                                                   f"and {columns} keys of one sequence")
    return value.expand(shape)


def _kinds_of(allowed: torch.Tensor, rows: int, columns: int, self_attention: bool
              ) -> set[MaskKind]:
    kinds = set()
    if bool(allowed.all()):
        kinds.add(MaskKind.FULL)
    if self_attention and rows == columns:
        causal = torch.ones(rows, columns, dtype=torch.bool, device=allowed.device).tril()
        if bool((allowed == causal).all()):
            kinds.add(MaskKind.CAUSAL)
    return kinds


def _first_difference(allowed: torch.Tensor, wanted: MaskKind) -> str:
    """Where `allowed` departs from the `wanted` pattern, in words."""
    rows, columns = allowed.shape[-2:]
    expected = torch.ones(rows, columns, dtype=torch.bool, device=allowed.device)
    if wanted is MaskKind.CAUSAL:
        expected = expected.tril()
    head, query, key = (int(i) for i in (allowed != expected).reshape(-1, rows, columns)
                        .nonzero()[0])
    sees = "sees" if bool(allowed.reshape(-1, rows, columns)[head, query, key]) else \
        "does not see"
    return f"query {query} {sees} key {key} (head {head}), unlike {wanted.value} attention"


def _is_size(node: fx.Node) -> bool:
    """A node whose value is a size (an int or SymInt, or a tuple of them): evaluated from the
    probe's token counts instead of from its inputs."""
    value = node_val(node)
    if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
        return True
    return isinstance(value, (tuple, list, torch.Size)) and len(value) > 0 and \
        all(isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool) for v in value)


def _reads_only_metadata(node: fx.Node) -> bool:
    """`x.new_ones(...)`, `torch.zeros_like(x)` and the like read x's shape, dtype and device."""
    if node.op == "call_method":
        return node.target in METADATA_METHODS
    return node.op == "call_function" and node.target in METADATA_FUNCTIONS


def _int_constants(node: fx.Node) -> set[int]:
    found: set[int] = set()

    def visit(arg: Any) -> Any:
        if isinstance(arg, int) and not isinstance(arg, bool) and arg >= 2:
            found.add(arg)
        return arg

    fx.node.map_aggregate((node.args, tuple(node.kwargs.values())), visit)
    return found
