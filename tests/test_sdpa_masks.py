"""sdpa_masks: golden graph, op counts, what it must leave alone, properties."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from passes.sdpa_masks import SDPA, SdpaMasksPass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.lift_models import check_property, run_pass, through_dynamo


class Golden(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        first = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(first, k, v, attn_mask=mask)


GOLDEN_BEFORE = """\
scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask = mask)
scaled_dot_product_attention_1 = torch._C._nn.scaled_dot_product_attention(scaled_dot_product_attention, k, v, attn_mask = mask)
return scaled_dot_product_attention_1"""
GOLDEN_AFTER = """\
logical_not = mask.logical_not()
zeros_like = torch.zeros_like(mask, dtype = torch.float32)
masked_fill = zeros_like.masked_fill(logical_not, -inf)
scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(q, k, v, attn_mask = masked_fill)
scaled_dot_product_attention_1 = torch._C._nn.scaled_dot_product_attention(scaled_dot_product_attention, k, v, attn_mask = masked_fill)
return scaled_dot_product_attention_1"""


def _causal(rows: int, columns: int) -> torch.Tensor:
    """(1, 1, rows, columns): each query row sees the keys up to its own position."""
    return torch.ones(rows, columns, dtype=torch.bool).tril(columns - rows)[None, None]


def _inputs(batch: int = 1, heads: int = 2, rows: int = 3, columns: int = 5,
            dim: int = 4, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    q = torch.randn(batch, heads, rows, dim, dtype=dtype)
    k, v = (torch.randn(batch, heads, columns, dim, dtype=dtype) for _ in range(2))
    return q, k, v, _causal(rows, columns)


def test_golden() -> None:
    inputs = _inputs()
    gm = trace(Golden(), inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(SdpaMasksPass, gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 2
    assert torch.equal(gm(*inputs), Golden()(*inputs))


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((SdpaMasksPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


class Layers(nn.Module):
    """`layers` attention calls over one mask (by keyword or position), as HF decoders make."""

    def __init__(self, layers: int, positional: bool = False) -> None:
        super().__init__()
        self.layers, self.positional = layers, positional

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        for _ in range(self.layers):
            if self.positional:
                q = F.scaled_dot_product_attention(q, k, v, mask)
            else:
                q = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return q


def test_op_counts_one_conversion_for_every_layer() -> None:
    layers, inputs = 4, _inputs()
    gm = trace(Layers(layers), inputs)
    result = run_pass(SdpaMasksPass, gm, inputs)
    counts = op_counts(gm)
    assert result.matches == layers
    assert (counts["logical_not"], counts["zeros_like"], counts["masked_fill"]) == (1, 1, 1)
    (additive,) = gm.graph.find_nodes(op="call_method", target="masked_fill")
    assert all(node.kwargs["attn_mask"] is additive
               for node in gm.graph.find_nodes(op="call_function", target=SDPA))


class NotShared(nn.Module):
    """A mask read by one call; an additive (float) mask read by two; a mask written in place."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                bias: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        once = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        floats = F.scaled_dot_product_attention(once, k, v, attn_mask=bias)
        floats = F.scaled_dot_product_attention(floats, k, v, attn_mask=bias)
        first = F.scaled_dot_product_attention(floats, k, v, attn_mask=written)
        written.logical_not_()
        return F.scaled_dot_product_attention(first, k, v, attn_mask=written)


def test_must_not_rewrite_a_single_use_a_float_or_a_written_mask() -> None:
    q, k, v, mask = _inputs()
    inputs = (q, k, v, mask, torch.zeros(mask.shape), mask.clone())
    gm = trace(NotShared(), inputs)
    code = gm.code
    result = run_pass(SdpaMasksPass, gm, inputs)
    assert not result.modified and result.matches == 0 and gm.code == code


@settings(max_examples=8, deadline=None)
@given(layers=st.integers(2, 4), heads=st.integers(1, 3), rows=st.integers(1, 4),
       extra=st.integers(0, 4), dim=st.sampled_from([4, 8]), positional=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_shared_mask_is_bitwise_equal_idempotent_and_adds_no_flops(
        layers: int, heads: int, rows: int, extra: int, dim: int, positional: bool,
        dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    inputs = _inputs(2, heads, rows, rows + extra, dim, dtype)
    check_property(Layers(layers, positional), inputs, [SdpaMasksPass], expected_matches=layers)


def test_dynamo_graphs_share_the_mask() -> None:
    inputs = _inputs()
    backend, out = through_dynamo(Layers(3), inputs, ("sdpa_masks",))
    assert backend.reports[-1].passes["sdpa_masks"].matches == 3
    assert torch.equal(out, Layers(3)(*inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_attention_over_the_shared_mask_is_bitwise_the_same(dtype: torch.dtype) -> None:
    """On CUDA SDPA may pick cuDNN, which converts a boolean mask with -65504 instead of -inf:
    rows with an allowed key must come out the same either way (a causal decode mask)."""
    torch.manual_seed(0)
    inputs = tuple(t.cuda() for t in _inputs(2, 4, 1, 264, 64, dtype))
    backend, out = through_dynamo(Layers(3), inputs, ("sdpa_masks",), device="cuda")
    assert backend.reports[-1].passes["sdpa_masks"].matches == 3
    assert torch.equal(out, Layers(3)(*inputs))
