"""lift_rotary: golden graph, op counts, what it must leave alone, properties."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from passes.lift_rotary import LiftRotaryPass
from tests.fx_helpers import graph_body, op_counts, trace
from tests.lift_models import (
    RotaryAttentionInputs,
    check_property,
    cos_sin,
    rotate_half,
    run_pass,
    through_dynamo,
)

ROTARY = torch.ops.fxkiln.rotary_cos_sin.default


class Golden(nn.Module):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x, 4) * sin


GOLDEN_BEFORE = """\
mul = x * cos
getitem = x[(Ellipsis, slice(None, 4, None))]
getitem_1 = x[(Ellipsis, slice(4, None, None))]
neg = -getitem_1
cat = torch.cat((neg, getitem), dim = -1)
mul_1 = cat * sin
add = mul + mul_1
return add"""
GOLDEN_AFTER = """\
rotary_cos_sin_default = torch.ops.fxkiln.rotary_cos_sin.default(x, cos, sin)
return rotary_cos_sin_default"""


def _golden_inputs() -> tuple[torch.Tensor, ...]:
    cos, sin = cos_sin(2, 3, 8)
    return torch.randn(2, 4, 3, 8), cos.unsqueeze(1), sin.unsqueeze(1)


def test_golden() -> None:
    inputs = _golden_inputs()
    gm = trace(Golden(), inputs)
    assert graph_body(gm) == GOLDEN_BEFORE
    result = run_pass(LiftRotaryPass, gm, inputs)
    assert graph_body(gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1
    assert torch.equal(gm(*inputs), Golden()(*inputs))


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LiftRotaryPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


@pytest.mark.parametrize("rotary_dim", [8, 4], ids=["full", "partial"])
def test_op_counts_for_query_and_key_full_and_partial(rotary_dim: int) -> None:
    module = RotaryAttentionInputs(16, heads=4, kv_heads=2, head_dim=8, rotary_dim=rotary_dim)
    cos, sin = cos_sin(2, 5, rotary_dim)
    inputs = (torch.randn(2, 5, 16), cos, sin)
    gm = trace(module, inputs)
    before = op_counts(gm)
    partial = rotary_dim < 8
    assert before["cat"] == 2 * (1 + partial) and before["neg"] == 2
    result = run_pass(LiftRotaryPass, gm, inputs)
    after = op_counts(gm)
    assert result.matches == 2 and after["rotary_cos_sin.default"] == 2
    # partial rotary: the op rotates the first rotary_dim features; the rest joins as before
    assert after["neg"] == 0 and after["cat"] == (2 if partial else 0)
    rotated = [n for n in gm.graph.nodes if n.target is ROTARY]
    assert [tuple(n.meta["val"].shape[-1:]) for n in rotated] == [(rotary_dim,)] * 2
    assert torch.equal(gm(*inputs), module(*inputs))


class NotRotaryHalves(nn.Module):
    """A concatenation without the negation; halves swapped the other way; halves cut at a
    third of the width; x broadcast up to cos's shape."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wide: torch.Tensor,
                one: torch.Tensor) -> tuple[torch.Tensor, ...]:
        no_neg = x * cos + torch.cat((x[..., 4:], x[..., :4]), dim=-1) * sin
        swapped = x * cos + torch.cat((-x[..., :4], x[..., 4:]), dim=-1) * sin
        # 12 wide: rotate_half cuts at 6; cut at 4, the halves differ in width
        third = wide * cos[..., :1] + torch.cat((-wide[..., 4:], wide[..., :4]), dim=-1) \
            * sin[..., :1]
        broadcast = one * cos + rotate_half(one, 4) * sin  # (1, 3, 8) by (2, 3, 8)
        return no_neg, swapped, third, broadcast


def test_must_not_rewrite_a_cat_that_is_not_rotate_half() -> None:
    cos, sin = cos_sin(2, 3, 8)
    inputs = (torch.randn(2, 3, 8), cos, sin, torch.randn(2, 3, 12), torch.randn(1, 3, 8))
    gm = trace(NotRotaryHalves(), inputs)
    code = gm.code
    result = run_pass(LiftRotaryPass, gm, inputs)
    assert not result.modified and result.matches == 0 and gm.code == code


@settings(max_examples=8)
@given(batch=st.integers(1, 3), seq=st.integers(1, 5), kv_heads=st.integers(1, 2),
       group=st.integers(1, 2), half=st.integers(1, 6), partial=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_lifted_rotary_is_bitwise_equal_idempotent_and_adds_no_flops(
        batch: int, seq: int, kv_heads: int, group: int, half: int, partial: bool,
        dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    head_dim = 2 * half * (2 if partial else 1)
    module = RotaryAttentionInputs(8, kv_heads * group, kv_heads, head_dim, 2 * half).to(dtype)
    cos, sin = cos_sin(batch, seq, 2 * half, dtype, seed)
    inputs = (torch.randn(batch, seq, 8, dtype=dtype), cos, sin)
    check_property(module, inputs, [LiftRotaryPass], expected_matches=2)


def test_dynamo_graphs_lift_rotate_half_written_with_shape_arithmetic() -> None:
    class ShapeHalves(nn.Module):
        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            return x * cos + rotate_half(x, x.shape[-1] // 2) * sin

    inputs = _golden_inputs()
    backend, out = through_dynamo(ShapeHalves(), inputs, ("lift_rotary",))
    assert backend.reports[-1].passes["lift_rotary"].matches == 1
    assert torch.equal(out, ShapeHalves()(*inputs))
