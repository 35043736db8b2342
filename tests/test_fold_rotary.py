"""fold_rotary: golden graph, op counts, what it must leave alone, and the property: the folded
graph computes what the unfolded one does (prefill and decode steps, native and Triton
attention, the Triton decode kernel rotating in-kernel), idempotent, FLOPs never up."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from compiler.report import count_flops
from passes.base import PassContext
from passes.fold_rotary import FoldRotaryPass
from passes.kernel_choice import KernelChoicePass
from runtime.forward_context import set_forward_context
from runtime.kernels import triton_kernels
from runtime.kv_cache import AttentionSpec, allocate_kv_caches
from runtime.step_metadata import uniform_batch_metadata
from tests.fx_helpers import graph_body, op_counts, trace
from tests.kernels.helpers import cos_sin_cache

ROTARY = torch.ops.fxkiln.rotary_embedding.default
ATTENTION = torch.ops.fxkiln.attention.default


class RotaryAttention(nn.Module):
    """`layers` Llama attentions over one input: q, k rotated, then the cached attention."""

    def __init__(self, heads: int, kv_heads: int, head_size: int, rotary_dim: int,
                 is_neox: bool = True, layers: int = 1, leak_key: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_size, self.is_neox = heads, kv_heads, head_size, \
            is_neox
        self.layers, self.leak_key = layers, leak_key
        self.qkv = nn.Linear(32, (heads + 2 * kv_heads) * head_size, bias=False)
        self.register_buffer("table", cos_sin_cache(64, rotary_dim))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q_size, kv_size = self.heads * self.head_size, self.kv_heads * self.head_size
        total = torch.zeros_like(x[:, :1])
        for layer in range(self.layers):
            q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
            q, k = ROTARY(positions, q, k, self.table, self.head_size, self.is_neox)
            out = torch.empty_like(q)                          # (tokens, heads * head_size)
            ATTENTION(q, k, v, out, f"layers.{layer}.attn")
            total = total + out.sum(-1, keepdim=True)
            if self.leak_key:
                total = total + k.sum(-1, keepdim=True)        # the rotated key read again
        return total

    def specs(self) -> dict[str, AttentionSpec]:
        spec = AttentionSpec(self.heads, self.kv_heads, self.head_size, self.head_size ** -0.5)
        return {f"layers.{layer}.attn": spec for layer in range(self.layers)}


class Golden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", cos_sin_cache(16, 8))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> torch.Tensor:
        q, k = ROTARY(positions, q, k, self.table, 8, True)
        out = torch.empty_like(q)
        ATTENTION(q, k, v, out, "layers.0.attn")
        return out


GOLDEN_BEFORE = """\
table = self.table
rotary_embedding_default = torch.ops.fxkiln.rotary_embedding.default(positions, q, k, table, 8, True)
getitem = rotary_embedding_default[0]
getitem_1 = rotary_embedding_default[1]
empty_like = torch.empty_like(getitem)
attention_default = torch.ops.fxkiln.attention.default(getitem, getitem_1, v, empty_like, 'layers.0.attn')
return empty_like"""
GOLDEN_AFTER = """\
table = self.table
empty_like = torch.empty_like(q, memory_format = torch.contiguous_format)
attention_default = torch.ops.fxkiln.attention.default(q, k, v, empty_like, 'layers.0.attn', 'auto', positions, table, 8, True)
return empty_like"""


def _inputs(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 64, (tokens,), generator=generator),
            torch.randn(tokens, 32, generator=generator))


def test_golden() -> None:
    gm = trace(Golden())
    assert graph_body(gm) == GOLDEN_BEFORE
    result = FoldRotaryPass(PassContext())(gm)
    gm.graph.lint()
    assert result.matches == 1 and result.modified
    assert graph_body(gm) == GOLDEN_AFTER
    assert FoldRotaryPass.__doc__ is not None
    doc = [line.strip() for line in FoldRotaryPass.__doc__.splitlines()]
    body = [line.split(";")[0].strip() for line in GOLDEN_AFTER.splitlines()[1:]]
    assert all(line in " ".join(doc) for line in body)  # the docstring shows this graph


def test_op_counts_before_and_after() -> None:
    gm = trace(RotaryAttention(4, 2, 8, 8, layers=3), _inputs(3))
    before = op_counts(gm)
    assert before["rotary_embedding.default"] == 3 and before["attention.default"] == 3
    result = FoldRotaryPass(PassContext())(gm)
    gm.graph.lint()
    after = op_counts(gm)
    assert result.matches == 3
    assert after["rotary_embedding.default"] == 0 and after["attention.default"] == 3
    assert after["getitem"] == before["getitem"] - 6
    folded = [node for node in gm.graph.nodes if node.target is ATTENTION]
    assert all(node.args[6].name == "positions" and node.args[8:] == (8, True) for node in folded)


def test_must_not_fold_a_rotated_key_that_something_else_reads() -> None:
    gm = trace(RotaryAttention(4, 2, 8, 8, layers=2, leak_key=True), _inputs(3))
    code = gm.code
    result = FoldRotaryPass(PassContext())(gm)
    assert result.matches == 0 and not result.modified and gm.code == code


def _run(gm: torch.fx.GraphModule, module: RotaryAttention, inputs: tuple, lengths: int,
         batch: int, history: torch.Tensor) -> torch.Tensor:
    """One step of `batch` sequences, each bringing tokens // batch new tokens and reaching
    `lengths` positions, over caches holding `history`."""
    tokens = inputs[1].shape[0]
    caches = allocate_kv_caches(module.specs(), batch * 48, 0, torch.float32, "cpu")
    for cache in caches.values():
        cache.key.copy_(history)
        cache.value.copy_(history.flip(0))
    meta = uniform_batch_metadata(batch, tokens // batch, lengths, 48, torch.device("cpu"))
    with torch.no_grad(), set_forward_context(meta, caches):
        result = gm(*inputs)
    return torch.cat([result.flatten(), *(c.key.flatten() for c in caches.values())])


@pytest.mark.slow  # interpreted Triton attention: about 10 s
@settings(max_examples=8)
@given(kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       head_size=st.sampled_from([8, 16]), half=st.booleans(), is_neox=st.booleans(),
       batch=st.integers(1, 2), decode=st.booleans(), seed=st.integers(0, 2**16))
def test_folded_graph_computes_the_same(kv_heads: int, group: int, head_size: int, half: bool,
                                        is_neox: bool, batch: int, decode: bool,
                                        seed: int) -> None:
    torch.manual_seed(seed)
    rotary_dim = head_size // 2 if half else head_size
    module = RotaryAttention(kv_heads * group, kv_heads, head_size, rotary_dim, is_neox,
                             layers=2).eval()
    tokens = batch if decode else 3 * batch
    inputs = _inputs(tokens, seed)
    history = torch.randn(batch * 48, kv_heads, head_size)
    lengths = 20 if decode else 3
    reference = trace(module, inputs)
    expected = _run(reference, module, inputs, lengths, batch, history)
    flops_before = count_flops(lambda *a: _run(reference, module, a, lengths, batch, history),
                               inputs)
    gm = trace(module, inputs)
    assert FoldRotaryPass(PassContext())(gm).matches == 2
    gm.graph.lint()
    code = gm.code
    assert FoldRotaryPass(PassContext())(gm).matches == 0 and gm.code == code
    assert torch.equal(_run(gm, module, inputs, lengths, batch, history), expected)  # native
    assert count_flops(lambda *a: _run(gm, module, a, lengths, batch, history),
                       inputs) <= flops_before
    if triton_kernels.supports(torch.device("cpu"), torch.float32):
        KernelChoicePass(PassContext(kernels={"attention": "triton"}))(gm)
        gm.recompile()
        torch.testing.assert_close(_run(gm, module, inputs, lengths, batch, history), expected,
                                   rtol=1e-4, atol=1e-5)
