"""lift_cache_attention: SDPA over a StaticCache layer's repeated keys and values becomes
`torch.ops.fxkiln.cache_attention`, which reads the cache in place."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import fx

from passes.attention_match import (SDPA_FUNCTIONS, AttentionMatch, UnsupportedAttentionError,
                                    match_attention)
from passes.base import GraphPass, PassResult
from passes.fx_utils import call_arg, tensor_meta
from passes.writes import writes
import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)

logger = logging.getLogger(__name__)

# What the pass matches: an SDPA call (dropout 0, is_causal False, no enable_gqa) whose key and
# value are graph inputs, as they are or through Hugging Face's repeat_kv
# (`cache[:, :, None].expand(b, kv, n, L, d).reshape(b, kv * n, L, d)`,
# `passes.attention_match.before_repeat`), with static shapes: query (b, heads, q, d), caches
# (b, kv, L, d) of the query's dtype, a mask that is None or 4-d, bool or of the query's dtype,
# broadcasting to (b, heads, q, L) over all L positions. Between the repeat's copy and the
# SDPA nothing may write: the op reads the cache where the SDPA is.
# What it writes: cache_attention(query, key_cache, value_cache, mask, scale), the repeats
# erased; the cache writes before it (index_copy_) stay as they are. Except the decode step's
# (one query): when the last writes into both caches before the SDPA are
# `cache.index_copy_(2, position, new)` of one position, whose results nobody reads, and
# between them and the SDPA nothing writes and nothing reads the caches (the repeats aside),
# the writes fold into the op: cache_update_attention(query, key, value, position, key_cache,
# value_cache, mask, scale), which writes then reads, where the SDPA was.
CACHE_ATTENTION = torch.ops.fxkiln.cache_attention.default
CACHE_UPDATE_ATTENTION = torch.ops.fxkiln.cache_update_attention.default


@dataclass(frozen=True)
class CacheAttention:
    """One attention over a cache: the SDPA call and what the op reads."""

    sdpa: fx.Node
    query: fx.Node
    key_cache: fx.Node
    value_cache: fx.Node
    mask: fx.Node | None
    scale: float
    writes: tuple[fx.Node, fx.Node] | None = None  # the index_copy_ of each cache it folds in


class LiftCacheAttentionPass(GraphPass):
    """Rewrites attention over a Hugging Face StaticCache layer into fxkiln's cache_attention.

    A Hugging Face decoder layer under torch.compile writes this step's key and value into its
    StaticCache (`index_copy_` into graph inputs), repeats the whole cache's heads for
    grouped-query attention (`repeat_kv`: two copies of the cache per layer and step) and calls
    SDPA on the copies. cache_attention reads the cache in place, each query head from its KV
    head, so the copies go; its Triton kernel is a decode kernel for one query token, its
    native twin is the repeat and SDPA the graph had. The graph holds the same writes as before.
    An attention whose key or value is not a graph input (or its repeat), with a dropout,
    is_causal, enable_gqa, a mask of another shape or dtype, or symbolic sizes is left alone.
    In a decode step (one query token) the layer's cache writes of this step's key and value
    fold into the op too (cache_update_attention: one launch writes, then reads), unless
    something reads or writes the caches between them and the attention; a prefill's writes
    stay where they are, before cache_attention.

    Before (the golden test's graph):
        index_copy_ = l_k_cache_.index_copy_(2, l_position_, l_k_)
        index_copy__1 = l_v_cache_.index_copy_(2, l_position_, l_v_)
        getitem = l_k_cache_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
        expand = getitem.expand(1, 2, 2, 8, 16)
        key = expand.reshape(1, 4, 8, 16)
        getitem_1 = l_v_cache_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
        expand_1 = getitem_1.expand(1, 2, 2, 8, 16)
        value = expand_1.reshape(1, 4, 8, 16)
        scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(l_q_, key, value, attn_mask = l_mask_, scale = 0.25, dropout_p = 0.0, is_causal = False)
        return (scaled_dot_product_attention,)
    After:
        cache_update_attention_default = torch.ops.fxkiln.cache_update_attention.default(l_q_, l_k_, l_v_, l_position_, l_k_cache_, l_v_cache_, l_mask_, 0.25)
        return (cache_update_attention_default,)
    """

    name = "lift_cache_attention"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        for function in dict.fromkeys(SDPA_FUNCTIONS):  # F.scaled_dot_product_attention is
            # torch._C._nn's
            for node in list(gm.graph.find_nodes(op="call_function", target=function)):
                found = self.applies(node)
                if found is None:
                    logger.debug("lift_cache_attention: %s left alone", node.format_node())
                    continue
                _rewrite(gm.graph, found)
                matches += 1
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(node: fx.Node) -> CacheAttention | None:
        """The attention over graph-input caches `node` computes, or None (see the module)."""
        try:
            match = match_attention(node)
        except UnsupportedAttentionError:
            return None
        if match is None or match.form != "sdpa" or match.is_causal or \
                node.kwargs.get("enable_gqa", False):
            return None
        if not all(x.op == "placeholder" for x in (match.key, match.value)) or \
                not _shapes_apply(match):
            return None
        if any(_written_between(repeat, node) for repeat in _repeats(node)):
            return None
        return CacheAttention(node, match.query, match.key, match.value, match.mask,
                              match.scale, _foldable_writes(match))


def _shapes_apply(match: AttentionMatch) -> bool:
    """Static shapes: query (b, heads, q, d); caches (b, kv, L, d) with kv dividing heads, of
    the query's floating dtype; a mask None or 4-d, bool or of that dtype, broadcasting to
    (b, heads, q, L) over all L."""
    query, key, value = (tensor_meta(x) for x in (match.query, match.key, match.value))
    if query is None or key is None or value is None:
        return False
    if query.dim() != 4 or key.dim() != 4 or tuple(key.shape) != tuple(value.shape):
        return False
    shapes = (*query.shape, *key.shape)
    if not all(isinstance(size, int) for size in shapes):
        return False
    batch, heads, queries, dim = query.shape
    if key.shape[0] != batch or key.shape[3] != dim or heads % key.shape[1]:
        return False
    if not query.dtype.is_floating_point or {key.dtype, value.dtype} != {query.dtype}:
        return False
    if match.mask is None:
        return True
    mask = tensor_meta(match.mask)
    if mask is None or mask.dim() != 4 or mask.dtype not in (torch.bool, query.dtype):
        return False
    wanted = (batch, heads, queries, key.shape[2])
    return mask.shape[-1] == wanted[-1] and all(
        isinstance(size, int) and size in (1, full) for size, full in zip(mask.shape, wanted))


def _repeats(sdpa: fx.Node) -> list[fx.Node]:
    """The key's and value's arguments of the SDPA call that are not graph inputs: their
    repeats (a copy, made where the repeat's reshape is)."""
    key, value = call_arg(sdpa, 1, ("key",)), call_arg(sdpa, 2, ("value",))
    return [arg for arg in dict.fromkeys((key, value))
            if isinstance(arg, fx.Node) and arg.op != "placeholder"]


def _written_between(start: fx.Node, end: fx.Node) -> bool:
    """Some node after `start` and before `end` writes into a tensor."""
    node = start.next
    while node is not end and node.op != "root":
        if writes(node):
            return True
        node = node.next
    return False


def _foldable_writes(match: AttentionMatch) -> tuple[fx.Node, fx.Node] | None:
    """The index_copy_ of one position into the key cache and into the value cache that the
    attention reads right after (see the module), or None."""
    query = tensor_meta(match.query)
    if query is None or query.shape[2] != 1 or not match.output.users:
        return None  # (an op that writes must have a reader: kernel_choice's call is not impure)
    writes_ = (_last_write(match.key, match.output), _last_write(match.value, match.output))
    if writes_[0] is None or writes_[1] is None or writes_[0] is writes_[1]:
        return None
    key_write, value_write = writes_
    position = key_write.args[2]
    if value_write.args[2] is not position or any(w.users for w in writes_):
        return None
    index = tensor_meta(position)
    if index is None or tuple(index.shape) != (1,) or index.dtype != torch.int64:
        return None
    for write, cache in zip(writes_, (match.key, match.value)):
        new, cache_value = tensor_meta(write.args[3]), tensor_meta(cache)
        if new is None or cache_value is None or new.dtype != cache_value.dtype or \
                tuple(new.shape) != (*cache_value.shape[:2], 1, cache_value.shape[3]):
            return None
    first = min(writes_, key=_position)
    if _touched_between(first, match.output, (match.key, match.value), set(writes_)):
        return None
    return key_write, value_write


def _last_write(cache: fx.Node, before: fx.Node) -> fx.Node | None:
    """The last `cache.index_copy_(2, position, new)` before `before`, if the last node before
    it that writes into `cache` is one."""
    node = before.prev
    while node.op != "root" and node is not cache:
        if node.op == "call_method" and node.target == "index_copy_" and node.args[0] is cache \
                and len(node.args) == 4 and not node.kwargs and node.args[1] in (2, -2) and \
                all(isinstance(a, fx.Node) for a in node.args[2:]):
            return node
        if cache in node.all_input_nodes and writes(node):
            return None
        node = node.prev
    return None


def _touched_between(start: fx.Node, end: fx.Node, caches: tuple[fx.Node, ...],
                     allowed: set[fx.Node]) -> bool:
    """Some node after `start` and before `end`, but for `allowed` and the SDPA's repeats of
    the caches, writes (the folded writes read their position and new rows later) or reads a
    cache or a tensor made from one (views included)."""
    made_from = set(caches)
    for node in caches:
        _collect_users(node, end, made_from)
    repeats = set()
    for repeat in _repeats(end):
        repeats |= _chain(repeat)
    node = start.next
    while node is not end:
        if node not in allowed and node not in repeats and (
                writes(node) or any(arg in made_from for arg in node.all_input_nodes)):
            return True
        node = node.next
    return False


def _collect_users(node: fx.Node, end: fx.Node, found: set[fx.Node]) -> None:
    for user in node.users:
        if user is not end and user not in found:
            found.add(user)
            _collect_users(user, end, found)


def _chain(repeat: fx.Node) -> set[fx.Node]:
    """A repeat's nodes: the reshape back to its graph input."""
    chain, node = set(), repeat
    while node.op != "placeholder":
        chain.add(node)
        assert isinstance(node.args[0], fx.Node)
        node = node.args[0]
    return chain


def _position(node: fx.Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _rewrite(graph: fx.Graph, found: CacheAttention) -> None:
    with graph.inserting_before(found.sdpa):
        if found.writes is None:
            op = graph.call_function(CACHE_ATTENTION, (
                found.query, found.key_cache, found.value_cache, found.mask, found.scale))
        else:
            key_write, value_write = found.writes
            op = graph.call_function(CACHE_UPDATE_ATTENTION, (
                found.query, key_write.args[3], value_write.args[3], key_write.args[2],
                found.key_cache, found.value_cache, found.mask, found.scale))
    op.meta.update(found.sdpa.meta)  # the same shape and dtype: a later match reads them
    repeats = _repeats(found.sdpa)
    found.sdpa.replace_all_uses_with(op)
    graph.erase_node(found.sdpa)
    for repeat in repeats:  # reshape, expand, the inserted dim: erased while nothing reads them
        node = repeat
        while node.op != "placeholder" and not node.users:
            source = node.args[0]
            graph.erase_node(node)
            assert isinstance(source, fx.Node)
            node = source
    for write in found.writes or ():
        graph.erase_node(write)
