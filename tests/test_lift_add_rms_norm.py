"""lift_add_rms_norm: golden graph, op counts, what it must leave alone, properties."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from passes.lift_add_rms_norm import LiftAddRmsNormPass
from passes.lift_rms_norm import LiftRmsNormPass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.lift_models import ResidualStack, check_property, run_pass, through_dynamo

FUSED = torch.ops.fxkiln.fused_add_rms_norm.default


class Golden(nn.Module):
    """The sum is normalized and read again (the next residual)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
        total = x + residual
        return torch.ops.fxkiln.rms_norm(total, weight, 1e-6) + total * 2


GOLDEN_BEFORE = """\
add = x + residual
rms_norm = torch.ops.fxkiln.rms_norm(add, weight, 1e-06)
mul = add * 2
add_1 = rms_norm + mul
return add_1"""
GOLDEN_AFTER = """\
fused_add_rms_norm_default = torch.ops.fxkiln.fused_add_rms_norm.default(x, residual, weight, 1e-06)
getitem = fused_add_rms_norm_default[0]
getitem_1 = fused_add_rms_norm_default[1]
mul = getitem_1 * 2
add_1 = getitem + mul
return add_1"""


def _golden_inputs() -> tuple[torch.Tensor, ...]:
    return torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)


def test_golden() -> None:
    inputs = _golden_inputs()
    gm = trace(Golden(), inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(LiftAddRmsNormPass, gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1
    assert torch.equal(gm(*inputs), Golden()(*inputs))


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LiftAddRmsNormPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


def test_op_counts_on_a_residual_stack() -> None:
    layers = 3
    module, inputs = ResidualStack(16, layers), (torch.randn(2, 5, 16),)
    gm = trace(module, inputs)
    run_pass(LiftRmsNormPass, gm, inputs)
    before = op_counts(gm)
    assert (before["rms_norm.default"], before["add"]) == (layers + 1, layers)
    result = run_pass(LiftAddRmsNormPass, gm, inputs)
    after = op_counts(gm)
    # every norm but the first reads a residual sum
    assert result.matches == layers
    assert (after["rms_norm.default"], after["fused_add_rms_norm.default"]) == (1, layers)
    # two results each, but the last sum (read by the final norm alone) is not taken out
    assert after["add"] == 0 and after["getitem"] == 2 * layers - 1
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    for earlier, later in zip(fused, fused[1:]):  # each sum is the next block's residual
        assert any(arg.args == (earlier, 1) for arg in later.args[:2] if arg.op != "placeholder")
    assert torch.equal(gm(*inputs), module(*inputs))


class NotResidualNorms(nn.Module):
    """A broadcasting add (a bias); a sum read before the norm; a norm of a product."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor,
                weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        biased = torch.ops.fxkiln.rms_norm(x + bias, weight, 1e-6)
        total = x + residual
        early = total * 3  # read between the add and the norm
        read_early = torch.ops.fxkiln.rms_norm(total, weight, 1e-6) + early
        product = torch.ops.fxkiln.rms_norm(x * residual, weight, 1e-6)
        return biased, read_early, product


def test_must_not_fuse_a_broadcast_add_or_a_sum_read_before_the_norm() -> None:
    inputs = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8), torch.randn(8))
    gm = trace(NotResidualNorms(), inputs)
    code = gm.code
    result = run_pass(LiftAddRmsNormPass, gm, inputs)
    assert not result.modified and result.matches == 0 and gm.code == code


@settings(max_examples=8)
@given(layers=st.integers(1, 3), hidden=st.integers(1, 24), tokens=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       norm=st.sampled_from(["llama", "gemma"]), seed=st.integers(0, 2**16))
def test_fused_is_bitwise_equal_idempotent_and_adds_no_flops(
        layers: int, hidden: int, tokens: int, dtype: torch.dtype, norm: str,
        seed: int) -> None:
    torch.manual_seed(seed)
    module = ResidualStack(hidden, layers, norm).to(dtype)
    inputs = (torch.randn(tokens, hidden, dtype=dtype),)
    # Gemma's bfloat16 norm reads the float32 cast of the sum, which the fused op cannot
    # express exactly: those adds stay apart.
    fused = 0 if norm == "gemma" and dtype != torch.float32 else layers
    check_property(module, inputs, [LiftRmsNormPass, LiftAddRmsNormPass], expected_matches=fused)


def test_dynamo_graphs_fuse_the_residual_adds() -> None:
    module, inputs = ResidualStack(16, 2).eval(), (torch.randn(2, 3, 16),)
    backend, out = through_dynamo(module, inputs, ("lift_rms_norm", "lift_add_rms_norm"))
    assert backend.reports[-1].passes["lift_add_rms_norm"].matches == 2
    with torch.no_grad():
        assert torch.equal(out, module(*inputs))
