"""sdpa_masks: a boolean attention mask read by several SDPA calls is made additive once."""
from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import fx

from passes.base import GraphPass, PassResult
from passes.fx_utils import is_impure, tensor_meta

logger = logging.getLogger(__name__)

# What the pass matches: SDPA calls (Dynamo records `torch._C._nn.scaled_dot_product_attention`,
# which `F.scaled_dot_product_attention` is) whose `attn_mask` is one boolean tensor node that
# at least one other SDPA call with a query of the same dtype reads too.
SDPA = F.scaled_dot_product_attention
MASK_POSITION = 3  # attn_mask: query, key, value, attn_mask, ...
# What it writes: once, before the first of those calls, the additive mask SDPA itself would
# make of the boolean one for each call (0 where allowed, -inf where not, in the query's dtype):
#     additive = torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask.logical_not(), -inf)
# and every such call reads it instead.


class SdpaMasksPass(GraphPass):
    """Converts a shared boolean SDPA mask to the additive one once, not once per layer.

    Hugging Face decoders build one boolean mask per step and hand it to every layer's SDPA
    call; SDPA turns a boolean mask into an additive one (`where(~mask, -inf, 0)` in the
    query's dtype) at each call: two or three kernels per layer, the same values every time.
    Converted once, the layers read one additive mask: the values SDPA would have made, so the
    attention computes the same. A mask read by one call, a mask that is not boolean, and a
    mask something writes in place are left alone.

    Before (the golden test's graph):
        scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask = mask)
        scaled_dot_product_attention_1 = torch._C._nn.scaled_dot_product_attention(scaled_dot_product_attention, k, v, attn_mask = mask)
        return scaled_dot_product_attention_1
    After:
        logical_not = mask.logical_not()
        zeros_like = torch.zeros_like(mask, dtype = torch.float32)
        masked_fill = zeros_like.masked_fill(logical_not, -inf)
        scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask = masked_fill)
        scaled_dot_product_attention_1 = torch._C._nn.scaled_dot_product_attention(scaled_dot_product_attention, k, v, attn_mask = masked_fill)
        return scaled_dot_product_attention_1
    """

    name = "sdpa_masks"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        groups: dict[tuple[fx.Node, torch.dtype], list[fx.Node]] = defaultdict(list)
        for node in gm.graph.find_nodes(op="call_function", target=SDPA):
            key = _mask_key(node)
            if key is not None:
                groups[key].append(node)
        matches = 0
        for (mask, dtype), calls in groups.items():
            if not self.applies(mask, calls):
                logger.debug("sdpa_masks: mask %s left alone", mask.format_node())
                continue
            with gm.graph.inserting_before(calls[0]):
                inverted = gm.graph.call_method("logical_not", (mask,))
                zeros = gm.graph.call_function(torch.zeros_like, (mask,), {"dtype": dtype})
                additive = gm.graph.call_method("masked_fill", (zeros, inverted, float("-inf")))
            for call in calls:
                _set_mask(call, additive)
            matches += len(calls)
        if matches:
            gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)

    @staticmethod
    def applies(mask: fx.Node, calls: list[fx.Node]) -> bool:
        """Read by two calls or more, and written by nothing."""
        return len(calls) >= 2 and not any(is_impure(user) for user in mask.users)


def _mask(node: fx.Node) -> object:
    if len(node.args) > MASK_POSITION:
        return node.args[MASK_POSITION]
    return node.kwargs.get("attn_mask")


def _set_mask(node: fx.Node, mask: fx.Node) -> None:
    if len(node.args) > MASK_POSITION:
        node.update_arg(MASK_POSITION, mask)
    else:
        node.update_kwarg("attn_mask", mask)


def _mask_key(node: fx.Node) -> tuple[fx.Node, torch.dtype] | None:
    """(boolean mask node, query dtype) of an SDPA call, or None."""
    mask, query = _mask(node), tensor_meta(node.args[0]) if node.args else None
    mask_value = tensor_meta(mask)
    if not isinstance(mask, fx.Node) or mask_value is None or query is None:
        return None
    if mask_value.dtype != torch.bool or not query.dtype.is_floating_point:
        return None
    return mask, query.dtype
