"""lift_rms_norm: golden graph, op counts, what it must leave alone, properties, both front ends."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from passes.lift_rms_norm import LiftRmsNormPass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.lift_models import GemmaRMSNorm, LlamaRMSNorm, check_property, run_pass, through_dynamo

RMS_NORM = torch.ops.fxkiln.rms_norm.default
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


class Golden(nn.Module):
    """Llama's RMSNorm as Dynamo records it in a float32 model: a literal output dtype."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return weight * h.to(torch.float32)


GOLDEN_BEFORE = """\
to = x.to(torch.float32)
pow_1 = to.pow(2)
mean = pow_1.mean(-1, keepdim = True)
add = mean + 1e-06
rsqrt = torch.rsqrt(add)
mul = to * rsqrt
to_1 = mul.to(torch.float32)
mul_1 = weight * to_1
return mul_1"""
GOLDEN_AFTER = """\
rms_norm_default = torch.ops.fxkiln.rms_norm.default(x, weight, 1e-06)
return rms_norm_default"""


def test_golden() -> None:
    inputs = (torch.randn(3, 8), torch.randn(8))
    gm = trace(Golden(), inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(LiftRmsNormPass, gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1
    torch.testing.assert_close(gm(*inputs), Golden()(*inputs), rtol=0, atol=0)


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LiftRmsNormPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_form_folds_one_plus_weight_and_keeps_the_float32_product(
        dtype: torch.dtype) -> None:
    norm = GemmaRMSNorm(8).to(dtype)
    inputs = (torch.randn(2, 3, 8, dtype=dtype),)
    gm = trace(norm, inputs)
    before = op_counts(gm)
    assert (before["float"], before["pow"], before["rsqrt"], before["mul"]) == (2, 1, 1, 2)
    assert run_pass(LiftRmsNormPass, gm, inputs).matches == 1
    after = op_counts(gm)
    assert after["rms_norm.default"] == 1 and after["pow"] == after["rsqrt"] == after["mul"] == 0
    # bfloat16: the norm runs on the float32 input, so nothing rounds before the weight
    assert (after["float"], after["type_as"]) == ((0, 0) if dtype == torch.float32 else (1, 1))
    norm_node = next(n for n in gm.graph.nodes if n.target is RMS_NORM)
    folded = getattr(gm, norm_node.args[1].target)
    assert folded.dtype == torch.float32
    assert torch.equal(folded, 1.0 + norm.weight.detach().float())
    assert torch.equal(gm(*inputs), norm(*inputs))


def test_gemma_form_with_a_weight_that_is_no_constant_keeps_the_add() -> None:
    class WeightIn(nn.Module):
        def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            h = x.float()
            out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return (out * (1.0 + weight.float())).type_as(x)

    inputs = (torch.randn(3, 8), torch.randn(8))
    gm = trace(WeightIn(), inputs)
    assert run_pass(LiftRmsNormPass, gm, inputs).matches == 1
    after = op_counts(gm)
    assert after["rms_norm.default"] == 1 and after["add"] == 1 and after["float"] == 1
    assert torch.equal(gm(*inputs), WeightIn()(*inputs))


def test_chained_norms_read_the_replacement_of_the_one_before() -> None:
    module = nn.Sequential(LlamaRMSNorm(8), LlamaRMSNorm(8, eps=1e-5))
    inputs = (torch.randn(4, 8),)
    gm = trace(module, inputs)
    assert run_pass(LiftRmsNormPass, gm, inputs).matches == 2
    norms = [n for n in gm.graph.nodes if n.target is RMS_NORM]
    assert norms[1].args[0] is norms[0] and [n.args[2] for n in norms] == [1e-6, 1e-5]
    assert torch.equal(gm(*inputs), module(*inputs))


class NotRmsNorms(nn.Module):
    """Near misses: no eps; a mean over another dim; the result cast to another dtype;
    T5's form (the input, not its float32 cast, times rsqrt); a weight of another width."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.wide = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(1, 8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = x.to(torch.float32)
        no_eps = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True))).to(x.dtype)
        g = x.to(torch.float32)
        other_dim = self.weight * (g * torch.rsqrt(g.pow(2).mean(0, keepdim=True) + 1e-6)).to(
            x.dtype)
        c = x.to(torch.float32)
        recast = self.weight * (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6)).to(
            torch.bfloat16)
        t5 = self.weight * (x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True)
                                            + 1e-6))
        w = x.to(torch.float32)
        wide = self.wide * (w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return no_eps, other_dim, recast, t5, wide


def test_must_not_rewrite_a_norm_without_eps_over_another_dim_or_recast() -> None:
    inputs = (torch.randn(3, 8, dtype=torch.float16),)
    gm = trace(NotRmsNorms().to(torch.float16), inputs)
    code = gm.code
    result = run_pass(LiftRmsNormPass, gm, inputs)
    assert not result.modified and result.matches == 0 and gm.code == code


@settings(max_examples=10)
@given(leading=st.lists(st.integers(1, 4), min_size=0, max_size=3), hidden=st.integers(1, 40),
       dtype=DTYPES, form=st.sampled_from(["llama", "gemma"]),
       eps=st.sampled_from([1e-6, 1e-5, 0.1]), seed=st.integers(0, 2**16))
def test_lifted_norm_is_bitwise_equal_idempotent_and_adds_no_flops(
        leading: list[int], hidden: int, dtype: torch.dtype, form: str, eps: float,
        seed: int) -> None:
    torch.manual_seed(seed)
    norm = (LlamaRMSNorm(hidden, eps) if form == "llama" else GemmaRMSNorm(hidden, eps)).to(dtype)
    inputs = (torch.randn(*leading, 1 + seed % 5, hidden, dtype=dtype),)
    check_property(norm, inputs, [LiftRmsNormPass], expected_matches=1)


def test_dynamo_graphs_lift_with_weights_as_placeholders() -> None:
    module = nn.Sequential(LlamaRMSNorm(16), nn.Linear(16, 16), GemmaRMSNorm(16)).eval()
    inputs = (torch.randn(2, 3, 16),)
    backend, out = through_dynamo(module, inputs, ("lift_rms_norm", "kernel_choice"))
    assert backend.reports[-1].passes["lift_rms_norm"].matches == 2
    assert backend.reports[-1].passes["kernel_choice"].matches == 2
    with torch.no_grad():
        assert torch.equal(out, module(*inputs))
