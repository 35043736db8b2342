"""lift_act_and_mul: golden graph, op counts, what it must leave alone, properties."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from passes.lift_act_and_mul import LiftActAndMulPass
from passes.qkv_fuse import QkvFusePass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.lift_models import (
    ACTIVATIONS,
    GatedMLP,
    check_property,
    run_pass,
    through_dynamo,
    tolerance,
)


class Golden(nn.Module):
    """What qkv_fuse leaves of Llama's MLP gate: one projection, split in halves."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(8, 32, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split([16, 16], dim=-1)
        return self.act(gate) * up


GOLDEN_BEFORE = """\
gate_up_weight = self.gate_up.weight
linear = torch._C._nn.linear(x, gate_up_weight, None)
split = linear.split([16, 16], dim = -1)
getitem = split[0]
getitem_1 = split[1]
silu = torch.nn.functional.silu(getitem, inplace = False)
mul = silu * getitem_1
return mul"""
GOLDEN_AFTER = """\
gate_up_weight = self.gate_up.weight
linear = torch._C._nn.linear(x, gate_up_weight, None)
silu_and_mul_default = torch.ops.fxkiln.silu_and_mul.default(linear)
return silu_and_mul_default"""


def test_golden() -> None:
    module, inputs = Golden(), (torch.randn(3, 8),)
    gm = trace(module, inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(LiftActAndMulPass, gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1
    assert torch.equal(gm(*inputs), module(*inputs))


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LiftActAndMulPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


@pytest.mark.parametrize(("act", "fused", "up_first", "op"), [
    ("silu", False, False, "silu_and_mul.default"),          # Llama, after qkv_fuse
    ("silu_module", True, True, "silu_and_mul.default"),     # Phi3: chunked, up * act(gate)
    ("gelu_tanh", False, False, "gelu_and_mul.default"),     # Gemma
    ("gelu", True, False, "gelu_and_mul.default"),
])
def test_op_counts_for_each_gate_form(act: str, fused: bool, up_first: bool, op: str) -> None:
    module = GatedMLP(8, 12, act, fused=fused, up_first=up_first)
    inputs = (torch.randn(2, 3, 8),)
    gm = trace(module, inputs)
    assert run_pass(QkvFusePass, gm, inputs).matches == (0 if fused else 1)
    before = op_counts(gm)
    assert before["linear"] == 2 and before["split" if not fused else "chunk"] == 1
    result = run_pass(LiftActAndMulPass, gm, inputs)
    after = op_counts(gm)
    assert result.matches == 1 and after[op] == 1 and after["linear"] == 2
    assert after["mul"] == after["split"] == after["chunk"] == after["getitem"] == 0
    assert after["silu"] == after["gelu"] == 0
    if op.startswith("gelu"):
        node = next(n for n in gm.graph.nodes if n.target is torch.ops.fxkiln.gelu_and_mul.default)
        assert node.args[1] == ("tanh" if act == "gelu_tanh" else "none")
    torch.testing.assert_close(gm(*inputs), module(*inputs), **tolerance(torch.float32))


class NotGates(nn.Module):
    """A product of two separate tensors; the activation of the second half; unequal halves;
    a gate also read elsewhere."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        separate = F.silu(x) * y
        first, second = x.chunk(2, dim=-1)
        swapped = F.silu(second) * first
        small, large = y.split([4, 12], dim=-1)
        unequal = F.silu(small) * large[..., :4]
        gate, up = y.chunk(2, dim=-1)
        activated = F.gelu(gate)
        shared = activated * up + activated
        return separate, swapped, unequal, shared


def test_must_not_rewrite_a_mul_that_is_not_a_gate() -> None:
    inputs = (torch.randn(3, 16), torch.randn(3, 16))
    gm = trace(NotGates(), inputs)
    code = gm.code
    result = run_pass(LiftActAndMulPass, gm, inputs)
    assert not result.modified and result.matches == 0 and gm.code == code


@settings(max_examples=8)
@given(hidden=st.integers(1, 16), inner=st.integers(1, 24), act=st.sampled_from(list(ACTIVATIONS)),
       fused=st.booleans(), up_first=st.booleans(), tokens=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_lifted_gate_is_bitwise_equal_idempotent_and_adds_no_flops(
        hidden: int, inner: int, act: str, fused: bool, up_first: bool, tokens: int,
        dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    module = GatedMLP(hidden, inner, act, fused=fused, up_first=up_first).to(dtype)
    inputs = (torch.randn(tokens, hidden, dtype=dtype),)
    check_property(module, inputs, [QkvFusePass, LiftActAndMulPass], expected_matches=1)


def test_dynamo_graphs_lift_the_gate_after_qkv_fuse() -> None:
    module = nn.Sequential(GatedMLP(8, 12, "silu"), GatedMLP(8, 12, "gelu_tanh")).eval()
    inputs = (torch.randn(2, 3, 8),)
    backend, out = through_dynamo(module, inputs, ("qkv_fuse", "lift_act_and_mul"))
    assert backend.reports[-1].passes["lift_act_and_mul"].matches == 2
    with torch.no_grad():
        torch.testing.assert_close(out, module(*inputs), **tolerance(torch.float32))
