"""lift_layer_norm: golden graph, op counts, what it must leave alone, properties."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from passes.lift_layer_norm import LiftLayerNormPass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.lift_models import PostNormStack, check_property, run_pass, through_dynamo


class Golden(nn.Module):
    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (8,), weight, bias, 1e-5)


GOLDEN_BEFORE = """\
layer_norm = torch.nn.functional.layer_norm(x, (8,), weight = weight, bias = bias, eps = 1e-05)
return layer_norm"""
GOLDEN_AFTER = """\
layer_norm_default = torch.ops.fxkiln.layer_norm.default(x, weight, bias, 1e-05)
return layer_norm_default"""


def test_golden() -> None:
    inputs = (torch.randn(3, 8), torch.randn(8), torch.randn(8))
    gm = trace(Golden(), inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(LiftLayerNormPass, gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1
    assert torch.equal(gm(*inputs), Golden()(*inputs))


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LiftLayerNormPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


def test_op_counts_on_a_post_norm_stack() -> None:
    layers = 3
    module, inputs = PostNormStack(16, layers), (torch.randn(2, 5, 16),)
    gm = trace(module, inputs)
    assert op_counts(gm)["layer_norm"] == layers
    result = run_pass(LiftLayerNormPass, gm, inputs)
    after = op_counts(gm)
    assert result.matches == layers
    assert after["layer_norm.default"] == layers and after["layer_norm"] == 0
    assert torch.equal(gm(*inputs), module(*inputs))


class NotLastDimNorms(nn.Module):
    """A norm over the last two dims; a norm without an affine weight."""

    def __init__(self) -> None:
        super().__init__()
        self.two_dims = nn.LayerNorm((4, 8))
        self.plain = nn.LayerNorm(8, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.two_dims(x), self.plain(x)


def test_must_not_lift_a_norm_over_two_dims_or_without_a_weight() -> None:
    inputs = (torch.randn(3, 4, 8),)
    gm = trace(NotLastDimNorms(), inputs)
    code = gm.code
    result = run_pass(LiftLayerNormPass, gm, inputs)
    assert not result.modified and result.matches == 0 and gm.code == code


@settings(max_examples=8)
@given(layers=st.integers(1, 3), hidden=st.integers(1, 24), tokens=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_lifted_is_bitwise_equal_idempotent_and_adds_no_flops(
        layers: int, hidden: int, tokens: int, dtype: torch.dtype, bias: bool,
        seed: int) -> None:
    torch.manual_seed(seed)
    module = PostNormStack(hidden, layers, bias).to(dtype)
    inputs = (torch.randn(tokens, hidden, dtype=dtype),)
    check_property(module, inputs, [LiftLayerNormPass], expected_matches=layers)


def test_dynamo_graphs_lift_the_norms() -> None:
    module, inputs = PostNormStack(16, 2).eval(), (torch.randn(2, 3, 16),)
    backend, out = through_dynamo(module, inputs, ("lift_layer_norm",))
    assert backend.reports[-1].passes["lift_layer_norm"].matches == 2
    with torch.no_grad():
        assert torch.equal(out, module(*inputs))
