from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from passes import PassContext
from passes.cleanup import CleanupPass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.strategies import ModelCase, models


class Golden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        v = h.view(x.shape[0], 8)   # already (tokens, 8)
        s = v[:, 0:8]               # every column
        torch.relu(x)               # never read
        return s


GOLDEN_AFTER = """\
proj_weight = self.proj.weight
proj_bias = self.proj.bias
linear = torch._C._nn.linear(x, proj_weight, proj_bias)
return linear"""


def run_cleanup(gm: torch.fx.GraphModule):
    result = CleanupPass(PassContext())(gm)
    gm.graph.lint()
    return result


def test_golden() -> None:
    gm = trace(Golden(), (torch.randn(4, 8),))
    result = run_cleanup(gm)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified


def test_golden_graph_is_in_the_docstring() -> None:
    doc = " ".join((CleanupPass.__doc__ or "").split())
    for line in GOLDEN_AFTER.splitlines()[2:]:
        assert " ".join(line.split()) in doc


def test_op_counts() -> None:
    gm = trace(Golden(), (torch.randn(4, 8),))
    before = op_counts(gm)
    result = run_cleanup(gm)
    after = op_counts(gm)
    assert (before["view"], before["getitem"], before["relu"]) == (1, 2, 1)
    assert (after["view"], after["getitem"], after["relu"]) == (0, 0, 0)
    assert after["linear"] == before["linear"] == 1
    # view, slice, relu, and the shape lookups that only fed the view
    assert result.matches == 5


class MustNotRewrite(nn.Module):
    """Views, slices and reshapes that do change the tensor must stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        a = x.view(tokens, 2, 4)           # new shape
        b = x[:, 1:8]                      # drops a column
        c = x[:, ::2]                      # strided
        d = x.t().contiguous()             # contiguous() of a non-contiguous tensor copies
        e = x[:tokens - 1]                 # drops a token (a symbolic bound)
        f = x.narrow(1, 0, 4)              # half the features
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum() + f.sum()


def test_must_not_rewrite_real_views_and_slices() -> None:
    gm = trace(MustNotRewrite(), (torch.randn(5, 8),))
    before = op_counts(gm)
    result = run_cleanup(gm)
    after = op_counts(gm)
    for op in ("view", "contiguous", "narrow", "t"):
        assert after[op] == before[op], op
    assert after["getitem"] == before["getitem"]
    assert not result.modified


def test_dead_code_with_side_effects_stays() -> None:
    class Writes(nn.Module):
        def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            out.copy_(x * 2)   # result unused, but it writes `out`
            return x + 1

    gm = trace(Writes(), (torch.randn(3, 4), torch.empty(3, 4)))
    run_cleanup(gm)
    assert op_counts(gm)["copy_"] == 1


@given(case=models(), tokens=st.integers(1, 24), other_tokens=st.integers(1, 24))
def test_cleanup_preserves_results_and_is_idempotent(case: ModelCase, tokens: int,
                                                    other_tokens: int) -> None:
    gm = trace(case.module, case.inputs(tokens))
    nodes_before = len(gm.graph.nodes)
    run_cleanup(gm)
    assert len(gm.graph.nodes) <= nodes_before
    second = run_cleanup(gm)
    assert not second.modified and second.matches == 0
    for count in (tokens, other_tokens):  # one graph serves every token count
        (x,) = case.inputs(count, seed=count)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), case.module(x), rtol=1e-5, atol=1e-5)


class Aranges(nn.Module):
    """A StaticCache's per-layer `arange(1) + position`: equal aranges, only read."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        new = x.shape[1]  # (a literal under Dynamo; symbolic_trace would fold a literal arange)
        total = x
        for layer in range(3):
            total = total + (torch.arange(new) + positions + layer)
        return total + torch.arange(new + 1).sum()


def test_equal_aranges_are_made_once() -> None:
    inputs = (torch.randn(4, 1), torch.tensor([5]))
    gm = trace(Aranges(), inputs)
    assert op_counts(gm)["arange"] == 4
    result = run_cleanup(gm)
    assert op_counts(gm)["arange"] == 2 and result.matches == 2  # arange(1) x 3, arange(2)
    assert torch.equal(gm(*inputs), Aranges()(*inputs))


class WrittenAranges(nn.Module):
    """An arange written in place, one read through a view: each stays its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[0]
        counter = torch.arange(size)
        counter.add_(1)
        viewed = torch.arange(size).view(size, 1)
        return x + counter + torch.arange(size) + viewed.sum()


def test_must_not_share_an_arange_that_is_written_or_viewed() -> None:
    inputs = (torch.randn(3),)
    gm = trace(WrittenAranges(), inputs)
    run_cleanup(gm)
    assert op_counts(gm)["arange"] == 3
    assert torch.equal(gm(*inputs), WrittenAranges()(*inputs))
