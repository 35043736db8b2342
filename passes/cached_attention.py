"""cached_attention: each attention of a serving graph becomes fxkiln's cached attention op."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import fx

import runtime.attention  # noqa: F401  (registers torch.ops.fxkiln.attention)
from passes.attention_match import AttentionMatch, UnsupportedAttentionError, match_attention
from passes.base import GraphPass, PassResult
from passes.fx_utils import is_impure, node_val, same_shape
from passes.mask_proof import MaskKind, MaskProver
from passes.token_streams import (DECODER, ENCODER, MAX_POSITIONS_KEY, TokenStream,
                                  stream_of_operand, token_streams)
from runtime.kv_cache import AttentionKind, AttentionSpec

logger = logging.getLogger(__name__)

SPECS_KEY = "fxkiln_attention_specs"   # gm.meta: layer name -> AttentionSpec, for KV caches
MODULE_PREFIX_KEY = "fxkiln_module_prefix"  # gm.meta: module path prefix dropped from names
# What the pass matches (`passes.attention_match`): SDPA calls and softmax(q @ k.T * s + mask)
# @ v, over (1, heads, tokens, head_size) tensors of the graph's token streams (or a batched
# encoder's (sequences, heads, tokens each, head_size)), whose masks `passes.mask_proof` proves
# causal or full. What it writes: q, k, v flattened to (tokens, heads * head_size) (k and v from
# before any GQA repeat), an output buffer, one `fxkiln.attention` node, and the buffer viewed
# back as the operands' layout; the mask subgraph and the repeat die with the attention.
KINDS = {  # (query stream, key stream, mask) -> the cache kind that serves it
    (DECODER, DECODER, MaskKind.CAUSAL): AttentionKind.DECODER,
    (ENCODER, ENCODER, MaskKind.FULL): AttentionKind.ENCODER,
    (DECODER, ENCODER, MaskKind.FULL): AttentionKind.CROSS,
}


@dataclass(frozen=True)
class Plan:
    match: AttentionMatch
    layer_name: str
    spec: AttentionSpec


class CachedAttentionPass(GraphPass):
    """Rewrites every attention of a serving graph into `fxkiln.attention` over a KV cache.

    A Hugging Face model captured over flattened tokens (`compiler.hf_capture`) computes its
    attention with SDPA or eagerly, over a mask it builds for one sequence. The runtime serves
    many sequences at once from slot-mapped KV caches, so each attention becomes the cached op,
    with the layer's spec (heads, KV heads, head size, scale, kind) recorded in
    `gm.meta["fxkiln_attention_specs"]`. The kind comes from the streams of the query and the
    keys and from the mask, proven causal or full by evaluation (`passes.mask_proof`). Anything
    the op cannot express raises `UnsupportedAttentionError` before the graph is touched.

    Before (the golden test's graph: 2 query heads over 1 KV head of size 4, HF's mask):
        transpose = view.transpose(1, 2)
        transpose_1 = view_1.transpose(1, 2)
        getitem_2 = transpose_1[(slice(None, None, None), slice(None, None, None), None, ...)]
        expand = getitem_2.expand(1, 1, 2, getitem, 4)
        reshape = expand.reshape(1, 2, getitem, 4)
        arange = torch.arange(getitem)
        getitem_3 = arange[(None, slice(None, None, None))]
        arange_1 = torch.arange(getitem)
        getitem_4 = arange_1[(slice(None, None, None), None)]
        le = getitem_3 <= getitem_4
        getitem_5 = le[(None, None)]
        scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(
            transpose, reshape, reshape, attn_mask = getitem_5, scale = 0.5)
        transpose_2 = scaled_dot_product_attention.transpose(1, 2)
    After (the spec {'attention_0': 2 heads, 1 KV head, size 4, scale 0.5, decoder}):
        transpose = view.transpose(1, 2)
        transpose_1 = view_1.transpose(1, 2)
        transpose_3 = transpose.transpose(1, 2)
        reshape_2 = transpose_3.reshape(-1, 8)
        transpose_4 = transpose_1.transpose(1, 2)
        reshape_3 = transpose_4.reshape(-1, 4)
        empty_like = torch.empty_like(reshape_2)
        attention_default = torch.ops.fxkiln.attention.default(
            reshape_2, reshape_3, reshape_3, empty_like, 'attention_0')
        view_as = empty_like.view_as(transpose_3)
        transpose_5 = view_as.transpose(1, 2)
        transpose_2 = transpose_5.transpose(1, 2)
    """

    name = "cached_attention"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        streams = token_streams(gm)
        matches = [m for node in list(gm.graph.nodes) if (m := match_attention(node)) is not None]
        if not matches or not streams:
            return PassResult(gm, modified=False, matches=0)
        prover = MaskProver(gm, streams, gm.meta.get(MAX_POSITIONS_KEY))
        specs = dict(gm.meta.get(SPECS_KEY, {}))
        plans = []
        for index, match in enumerate(matches):  # every check before any rewrite
            spec = self.applies(match, streams, prover)
            name = _unique(_layer_name(match.output, gm.meta.get(MODULE_PREFIX_KEY, ""), index),
                           specs)
            specs[name] = spec
            plans.append(Plan(match, name, spec))
        for plan in plans:
            _rewrite(gm.graph, plan)
            logger.debug("cached_attention: %s -> %s %s", plan.match.output.name,
                         plan.layer_name, plan.spec)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        gm.meta[SPECS_KEY] = specs
        gm.recompile()
        return PassResult(gm, modified=True, matches=len(plans))

    @staticmethod
    def applies(match: AttentionMatch, streams: dict[str, TokenStream],
                prover: MaskProver) -> AttentionSpec:
        """The spec of the cache that serves `match`; UnsupportedAttentionError if none does."""
        node = match.output
        q_shape, k_shape, v_shape = (tuple(node_val(x).shape)
                                     for x in (match.query, match.key, match.value))
        if not (len(q_shape) == len(k_shape) == len(v_shape) == 4):
            raise UnsupportedAttentionError(node, f"expected 4-d query, key and value, found "
                                                  f"shapes {q_shape}, {k_shape}, {v_shape}")
        heads, kv_heads, head_size = q_shape[1], k_shape[1], q_shape[3]
        if not all(isinstance(x, int) for x in (heads, kv_heads, head_size)) or \
                k_shape[3] != head_size or v_shape[3] != head_size or v_shape[1] != kv_heads \
                or heads % kv_heads:
            raise UnsupportedAttentionError(node, f"query {q_shape}, key {k_shape} and value "
                                                  f"{v_shape}: expected static heads, a head "
                                                  f"size shared by all three and query heads a "
                                                  f"multiple of the key heads")
        query, key = stream_of_operand(q_shape, streams), stream_of_operand(k_shape, streams)
        if query is None or key is None or not same_shape(k_shape[:3], v_shape[:3]):
            raise UnsupportedAttentionError(node, f"its queries {q_shape} and keys {k_shape} "
                                                  f"are not the tokens of the graph's token "
                                                  f"streams: expected batch 1 over flattened "
                                                  f"tokens, or a batched encoder's sequences")
        if match.mask is not None:
            mask = prover.kind(node, match.mask, query, key)
        else:
            mask = MaskKind.CAUSAL if match.is_causal else MaskKind.FULL
        if match.is_causal and match.mask is None and query is not key:
            raise UnsupportedAttentionError(node, "is_causal between two token streams")
        kind = KINDS.get((query.name, key.name, mask))
        if kind is None:
            raise UnsupportedAttentionError(node, f"{mask.value} attention of {query.name} "
                                                  f"queries over {key.name} keys; expected "
                                                  f"causal decoder self-attention, full encoder "
                                                  f"self-attention or full cross-attention")
        return AttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_size=head_size,
                             scale=match.scale, kind=kind)


def _rewrite(graph: fx.Graph, plan: Plan) -> None:
    match, spec = plan.match, plan.spec
    with graph.inserting_before(match.output):
        rows: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        for tensor, heads in ((match.query, spec.num_heads), (match.key, spec.num_kv_heads),
                              (match.value, spec.num_kv_heads)):
            if tensor not in rows:  # key and value may be one tensor
                by_token = graph.call_method("transpose", (tensor, 1, 2))  # (1, tokens, heads, hd)
                rows[tensor] = by_token, graph.call_method(
                    "reshape", (by_token, -1, heads * spec.head_size))     # (tokens, heads * hd)
        (query_by_token, query), (_, key), (_, value) = (rows[match.query], rows[match.key],
                                                          rows[match.value])
        output = graph.call_function(torch.empty_like, (query,))
        graph.call_function(torch.ops.fxkiln.attention.default,
                            (query, key, value, output, plan.layer_name))
        result = graph.call_method("transpose", (
            graph.call_method("view_as", (output, query_by_token)), 1, 2))  # (1, heads, tokens, hd)
    match.output.replace_all_uses_with(result)


def _layer_name(node: fx.Node, prefix: str, index: int) -> str:
    """The attention module's path (from the capture's module stack), else attention_<i>."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"attention_{index}"
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\[[^\]]*\]\.?", "", path)
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return f"{path}.attn" if path else f"attention_{index}"


def _unique(name: str, taken: dict[str, AttentionSpec]) -> str:
    candidate, suffix = name, 2
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    return candidate
