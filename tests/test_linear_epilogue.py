"""linear_epilogue pass: golden graph, op counts, what it must leave alone, properties."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from compiler.report import count_flops
from passes import PassContext
from passes.kernel_choice import KernelChoicePass
from passes.linear_epilogue import LINEAR_OP, LinearEpiloguePass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.strategies import ModelCase, models


class Golden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


GOLDEN_BEFORE = """\
fc1_weight = self.fc1.weight
fc1_bias = self.fc1.bias
linear = torch._C._nn.linear(x, fc1_weight, fc1_bias)
gelu = torch._C._nn.gelu(linear)
fc2_weight = self.fc2.weight
linear_1 = torch._C._nn.linear(gelu, fc2_weight, None)
return linear_1"""
GOLDEN_AFTER = """\
fc1_weight = self.fc1.weight
fc1_bias = self.fc1.bias
linear_default = torch.ops.fxkiln.linear.default(x, fc1_weight, fc1_bias, 'gelu')
fc2_weight = self.fc2.weight
linear_default_1 = torch.ops.fxkiln.linear.default(linear_default, fc2_weight, None, 'none')
return linear_default_1"""


class GatedMLP(nn.Module):
    """Llama's MLP: gate_up projection, SiLU-and-mul, down; a tanh-GELU projection too."""

    def __init__(self, hidden: int = 8, inner: int = 12) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)
        self.extra = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.ops.fxkiln.silu_and_mul(self.gate_up(x)))
        return F.gelu(self.extra(h), approximate="tanh")


def run_pass(gm: torch.fx.GraphModule):
    result = LinearEpiloguePass(PassContext())(gm)
    gm.graph.lint()
    return result


def _epilogues(gm: torch.fx.GraphModule) -> list[str]:
    return [node.args[3] for node in gm.graph.nodes if node.target is LINEAR_OP]


def test_golden() -> None:
    gm = trace(Golden(), (torch.randn(4, 8),))
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(gm)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 2


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LinearEpiloguePass.__doc__ or "").split())
    for golden in (GOLDEN_BEFORE, GOLDEN_AFTER):  # the compute lines (not the weight lookups)
        compute = [line for line in golden.splitlines() if "= self." not in line]
        assert " ".join(" ".join(compute).split()) in doc


def test_op_counts_and_folded_activations() -> None:
    gm = trace(GatedMLP(), (torch.randn(3, 8),))
    before = op_counts(gm)
    assert (before["linear"], before["silu_and_mul"], before["gelu"]) == (3, 1, 1)
    result = run_pass(gm)
    after = op_counts(gm)
    assert (after["linear"], after["silu_and_mul"], after["gelu"]) == (0, 0, 0)
    assert after["linear.default"] == result.matches == 3
    assert _epilogues(gm) == ["silu_and_mul", "none", "gelu_tanh"]


class SharedActivationInput(nn.Module):
    """The projection's output is read twice (a residual): its activation must stay apart."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return F.gelu(h) + h + F.gelu(x @ y)  # x @ y: a product of two activations, no weight


def test_must_not_fold_an_activation_whose_input_has_other_readers() -> None:
    gm = trace(SharedActivationInput(), (torch.randn(3, 8), torch.randn(8, 8)))
    result = run_pass(gm)
    after = op_counts(gm)
    assert result.matches == 1 and _epilogues(gm) == ["none"]
    assert after["gelu"] == 2 and after["matmul"] == 1


@given(case=models(max_blocks=2), tokens=st.integers(1, 12),
       other_tokens=st.integers(1, 12))
def test_rewrite_preserves_results_flops_and_is_idempotent(case: ModelCase, tokens: int,
                                                          other_tokens: int) -> None:
    gm = trace(case.module, case.inputs(tokens))
    flops_before = count_flops(gm, case.inputs(tokens))
    projections = op_counts(gm)["linear"]
    first = run_pass(gm)
    assert first.matches == projections and op_counts(gm)["linear"] == 0
    assert count_flops(gm, case.inputs(tokens)) == flops_before  # the dispatch op counts too
    second = run_pass(gm)
    assert not second.modified and second.matches == 0
    KernelChoicePass(PassContext())(gm)  # native on CPU: the graph runs without dispatch
    assert count_flops(gm, case.inputs(tokens)) == flops_before
    for count in (tokens, other_tokens):
        (x,) = case.inputs(count, seed=count)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), case.module(x), rtol=1e-5, atol=1e-5)
