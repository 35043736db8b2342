"""lift_add_layer_norm: golden graph, op counts, what it must leave alone, properties."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from passes.lift_add_layer_norm import LiftAddLayerNormPass
from passes.lift_layer_norm import LiftLayerNormPass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.lift_models import PostNormStack, check_property, run_pass, through_dynamo

NORM = torch.ops.fxkiln.layer_norm


class Golden(nn.Module):
    def forward(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        return NORM(x + residual, weight, bias, 1e-5)


GOLDEN_BEFORE = """\
add = x + residual
layer_norm = torch.ops.fxkiln.layer_norm(add, weight, bias, 1e-05)
return layer_norm"""
GOLDEN_AFTER = """\
fused_add_layer_norm_default = torch.ops.fxkiln.fused_add_layer_norm.default(x, residual, weight, bias, 1e-05)
getitem = fused_add_layer_norm_default[0]
return getitem"""


def _golden_inputs() -> tuple[torch.Tensor, ...]:
    return torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8)


def test_golden() -> None:
    inputs = _golden_inputs()
    gm = trace(Golden(), inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(LiftAddLayerNormPass, gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1
    assert torch.equal(gm(*inputs), Golden()(*inputs))


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LiftAddLayerNormPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


def test_op_counts_on_a_post_norm_stack() -> None:
    layers = 3
    module, inputs = PostNormStack(16, layers), (torch.randn(2, 5, 16),)
    gm = trace(module, inputs)
    run_pass(LiftLayerNormPass, gm, inputs)
    before = op_counts(gm)
    assert (before["layer_norm.default"], before["add"]) == (layers, layers)
    result = run_pass(LiftAddLayerNormPass, gm, inputs)
    after = op_counts(gm)
    assert result.matches == layers
    assert (after["layer_norm.default"], after["fused_add_layer_norm.default"]) == (0, layers)
    assert after["add"] == 0 and after["getitem"] == layers  # the sums are read by nothing else
    assert torch.equal(gm(*inputs), module(*inputs))


class NotResidualNorms(nn.Module):
    """A broadcasting add (a bias); a sum read before the norm; a norm of a product."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor,
                weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        biased = NORM(x + bias, weight, bias, 1e-5)
        total = x + residual
        early = total * 3  # read between the add and the norm
        read_early = NORM(total, weight, None, 1e-5) + early
        product = NORM(x * residual, weight, bias, 1e-5)
        return biased, read_early, product


def test_must_not_fuse_a_broadcast_add_or_a_sum_read_before_the_norm() -> None:
    inputs = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8))
    gm = trace(NotResidualNorms(), inputs)
    code = gm.code
    result = run_pass(LiftAddLayerNormPass, gm, inputs)
    assert not result.modified and result.matches == 0 and gm.code == code


@settings(max_examples=8)
@given(layers=st.integers(1, 3), hidden=st.integers(1, 24), tokens=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fused_is_bitwise_equal_idempotent_and_adds_no_flops(
        layers: int, hidden: int, tokens: int, dtype: torch.dtype, bias: bool,
        seed: int) -> None:
    torch.manual_seed(seed)
    module = PostNormStack(hidden, layers, bias).to(dtype)
    inputs = (torch.randn(tokens, hidden, dtype=dtype),)
    check_property(module, inputs, [LiftLayerNormPass, LiftAddLayerNormPass],
                   expected_matches=layers)


def test_dynamo_graphs_fuse_the_residual_adds() -> None:
    module, inputs = PostNormStack(16, 2).eval(), (torch.randn(2, 3, 16),)
    backend, out = through_dynamo(module, inputs, ("lift_layer_norm", "lift_add_layer_norm"))
    assert backend.reports[-1].passes["lift_add_layer_norm"].matches == 2
    with torch.no_grad():
        assert torch.equal(out, module(*inputs))
