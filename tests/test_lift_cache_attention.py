"""lift_cache_attention: golden graph, op counts, what it must leave alone, properties.

The graphs come from Dynamo, as the backend gets them: the caches are graph inputs written in
place (`index_copy_`) before the attention reads their repeat, as a Hugging Face layer over a
StaticCache does."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from compiler.capture import dynamo_propagator
from compiler.report import count_flops
from passes.base import PassContext, PassResult
from passes.lift_cache_attention import LiftCacheAttentionPass
from tests.fx_helpers import graph_body, op_counts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SDPA = "scaled_dot_product_attention"


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Hugging Face's repeat_kv: (b, kv, L, d) -> (b, kv * group, L, d)."""
    if group == 1:
        return x
    b, kv, length, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, group, length, d).reshape(b, kv * group, length, d)


class CacheLayer(nn.Module):
    """One attention step over a StaticCache layer, as Hugging Face writes it."""

    def __init__(self, group: int, scale: float = 0.25, **sdpa: Any) -> None:
        super().__init__()
        self.group, self.scale, self.sdpa = group, scale, sdpa

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v)
        key, value = repeat_kv(k_cache, self.group), repeat_kv(v_cache, self.group)
        options = {"dropout_p": 0.0, "is_causal": False, **self.sdpa}
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=self.scale,
                                              **options)


class TwoLayers(nn.Module):
    """Two cached layers in a row, the second reading the first's output as its query."""

    def __init__(self, group: int) -> None:
        super().__init__()
        self.first, self.second = CacheLayer(group), CacheLayer(group)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, mask: torch.Tensor,
                k_cache_1: torch.Tensor, v_cache_1: torch.Tensor) -> torch.Tensor:
        out = self.first(q, k_cache, v_cache, k, v, position, mask)
        return self.second(out, k_cache_1, v_cache_1, k, v, position, mask)


def step_inputs(batch: int = 1, kv_heads: int = 2, group: int = 2, cache_len: int = 8,
                head_dim: int = 16, queries: int = 1, mask: str = "bool",
                seed: int = 0) -> list[Any]:
    """q, caches, this step's k/v, their positions (the last `queries` of a cache filled up to
    a random length) and a mask over those positions ("bool", "float" or "none")."""
    generator = torch.Generator().manual_seed(seed)
    filled = int(torch.randint(queries, cache_len + 1, (), generator=generator))
    heads = kv_heads * group

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    position = torch.arange(filled - queries, filled)
    keep = torch.arange(cache_len)[None, :] <= position[:, None]          # (queries, L) causal
    keep = keep[None, None].expand(batch, 1, queries, cache_len).clone()
    keep[0, ..., : int(torch.randint(0, filled - queries + 1, (), generator=generator))] = False
    masks = {"bool": keep, "none": None,
             "float": torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))}
    cache, step = (batch, kv_heads, cache_len, head_dim), (batch, kv_heads, queries, head_dim)
    return [randn(batch, queries, heads, head_dim).transpose(1, 2), randn(*cache),
            randn(*cache), randn(*step), randn(*step), position, masks[mask]]


class Captured:
    """The graph Dynamo hands a backend for a module, shapes propagated; `run` calls it on
    fresh copies of the module's inputs (Dynamo orders its placeholders by first use)."""

    def __init__(self, module: nn.Module, inputs: Sequence[Any], dynamic: bool = False) -> None:
        captured: list[tuple[fx.GraphModule, list[Any]]] = []

        def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
            captured.append((gm, example_inputs))
            return gm.forward

        torch._dynamo.reset()
        self.inputs = list(inputs)
        fresh = clone(inputs)
        with torch.no_grad():
            torch.compile(module, backend=backend, fullgraph=True, dynamic=dynamic)(*fresh)
        self.gm, example_inputs = captured[-1]
        self.order = [next((i for i, x in enumerate(fresh) if x is example), None)
                      for example in example_inputs]  # None: a size (a dynamic graph's)
        self.refresh = dynamo_propagator(self.gm, example_inputs)
        self.refresh(self.gm)

    def run_pass(self) -> PassResult:
        result = LiftCacheAttentionPass(PassContext())(self.gm)
        self.gm.graph.lint()
        self.refresh(self.gm)
        return result

    def args(self) -> tuple[list[Any], list[Any]]:
        """Fresh copies of the inputs, and the graph's arguments among them."""
        fresh = clone(self.inputs)
        assert None not in self.order, "only graphs of static shapes are run here"
        return fresh, [fresh[i] for i in self.order if i is not None]

    def run(self) -> tuple[Any, list[Any]]:
        """The graph's output on fresh copies of the inputs, and the copies (caches written)."""
        fresh, args = self.args()
        with torch.no_grad():
            return self.gm(*args)[0], fresh

    def flops(self) -> int:
        return count_flops(self.gm, self.args()[1])


def clone(inputs: Sequence[Any]) -> list[Any]:
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]


GOLDEN_BEFORE = """\
index_copy_ = l_k_cache_.index_copy_(2, l_position_, l_k_)
index_copy__1 = l_v_cache_.index_copy_(2, l_position_, l_v_)
getitem = l_k_cache_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
expand = getitem.expand(1, 2, 2, 8, 16)
key = expand.reshape(1, 4, 8, 16)
getitem_1 = l_v_cache_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))]
expand_1 = getitem_1.expand(1, 2, 2, 8, 16)
value = expand_1.reshape(1, 4, 8, 16)
scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(l_q_, key, value, attn_mask = l_mask_, scale = 0.25, dropout_p = 0.0, is_causal = False)
return (scaled_dot_product_attention,)"""
GOLDEN_AFTER = """\
cache_update_attention_default = torch.ops.fxkiln.cache_update_attention.default(l_q_, l_k_, l_v_, l_position_, l_k_cache_, l_v_cache_, l_mask_, 0.25)
return (cache_update_attention_default,)"""


def _body(gm: fx.GraphModule) -> str:
    """The graph body without Dynamo's placeholder renaming lines (`l_x_ = L_x_`)."""
    return "\n".join(line for line in graph_body(gm).splitlines()
                     if not line.startswith("l_") or " = L_" not in line)


def test_golden() -> None:
    graph = Captured(CacheLayer(group=2), step_inputs())
    assert _body(graph.gm) == GOLDEN_BEFORE
    expected, expected_inputs = graph.run()
    result = graph.run_pass()
    assert _body(graph.gm) == GOLDEN_AFTER
    assert result.modified and result.matches == 1
    actual, actual_inputs = graph.run()
    assert torch.equal(actual, expected)
    assert all(torch.equal(a, b) for a, b in zip(actual_inputs[1:3], expected_inputs[1:3]))


def test_golden_graphs_are_in_the_docstring() -> None:
    doc = " ".join((LiftCacheAttentionPass.__doc__ or "").split())
    for line in (GOLDEN_BEFORE + "\n" + GOLDEN_AFTER).splitlines():
        assert " ".join(line.split()) in doc


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("queries", [1, 2], ids=["decode", "prefill"])
def test_op_counts_of_two_layers_with_and_without_a_repeat(group: int, queries: int) -> None:
    inputs = step_inputs(group=group, queries=queries)
    inputs += [torch.randn(inputs[1].shape), torch.randn(inputs[2].shape)]
    graph = Captured(TwoLayers(group), inputs)
    before = op_counts(graph.gm)
    repeats = 2 * 2 if group > 1 else 0  # key and value of each layer
    assert before[SDPA] == 2 and before["expand"] == before["reshape"] == repeats
    assert before["index_copy_"] == 4
    result = graph.run_pass()
    after = op_counts(graph.gm)
    assert result.matches == 2
    assert after[SDPA] == after["expand"] == after["reshape"] == after["getitem"] == 0
    if queries == 1:  # a decode step: each layer's cache writes fold into its attention
        assert after["cache_update_attention.default"] == 2 and after["index_copy_"] == 0
    else:  # a prefill: the writes stay, cache_attention reads what they wrote
        assert after["cache_attention.default"] == 2 and after["index_copy_"] == 4


MUST_NOT_REWRITE: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "dropout": (lambda: CacheLayer(2, dropout_p=0.1), {}),
    "is_causal with two queries": (lambda: CacheLayer(2, is_causal=True), {"mask": "none",
                                                                           "queries": 2}),
    "enable_gqa": (lambda: CacheLayer(1, enable_gqa=True), {"mask": "none"}),
}


class ComputedKeys(CacheLayer):
    """Keys and values made in the graph (scaled caches), then repeated: not a graph input."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        return super().forward(q, k_cache * 2, v_cache * 2, k, v, position, mask)


class WriteAfterRepeat(CacheLayer):
    """The cache is written after its repeat was copied: the SDPA reads the copy from before."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        key, value = repeat_kv(k_cache, self.group), repeat_kv(v_cache, self.group)
        k_cache.index_copy_(2, position, k)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=self.scale)


class FlatMask(CacheLayer):
    """A 2-d (queries, cache_len) mask: a shape the op does not take."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        assert mask is not None
        return super().forward(q, k_cache, v_cache, k, v, position, mask[0, 0])


@pytest.mark.parametrize("case", [*MUST_NOT_REWRITE, "computed keys", "write after the repeat",
                                  "a 2-d mask", "symbolic sizes"])
def test_must_not_rewrite(case: str) -> None:
    make, options = MUST_NOT_REWRITE.get(case, (lambda: CacheLayer(2), {}))
    module = {"computed keys": ComputedKeys(2), "write after the repeat": WriteAfterRepeat(2),
              "a 2-d mask": FlatMask(2)}.get(case) or make()
    graph = Captured(module, step_inputs(**options), dynamic=case == "symbolic sizes")
    code = graph.gm.code
    result = graph.run_pass()
    assert not result.modified and result.matches == 0 and graph.gm.code == code


class ReadBetween(CacheLayer):
    """The key cache is read (summed) between its write and the attention."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v)
        total = k_cache.sum()
        key, value = repeat_kv(k_cache, self.group), repeat_kv(v_cache, self.group)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask,
                                              scale=self.scale) + total


class TwoPositions(CacheLayer):
    """This step's key written at two positions (a write the decode kernel does not make)."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        two = torch.cat((position, position - 1))
        return super().forward(q, k_cache, v_cache, k.expand(-1, -1, 2, -1),
                               v.expand(-1, -1, 2, -1), two, mask)


class NewKeyWrittenAfter(CacheLayer):
    """This step's key is scaled in place after the cache took it: folded, the cache would
    take the scaled key."""

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        k_cache.index_copy_(2, position, k)
        v_cache.index_copy_(2, position, v)
        k.mul_(2)
        key, value = repeat_kv(k_cache, self.group), repeat_kv(v_cache, self.group)
        return F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=self.scale)


@pytest.mark.parametrize("case", ["a read between", "two positions", "a write between"])
def test_writes_that_cannot_fold_stay_before_cache_attention(case: str) -> None:
    module = {"a read between": ReadBetween(2), "two positions": TwoPositions(2),
              "a write between": NewKeyWrittenAfter(2)}[case]
    graph = Captured(module, step_inputs())
    expected, expected_inputs = graph.run()
    assert graph.run_pass().matches == 1
    after = op_counts(graph.gm)
    assert after["cache_attention.default"] == 1 and after["index_copy_"] == 2
    assert "cache_update_attention.default" not in after
    actual, actual_inputs = graph.run()
    assert torch.equal(actual, expected)
    assert all(torch.equal(a, b) for a, b in zip(actual_inputs[1:3], expected_inputs[1:3]))


@settings(max_examples=8)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       cache_len=st.integers(2, 20), queries=st.integers(1, 2),
       mask=st.sampled_from(["bool", "float", "none"]), seed=st.integers(0, 2**16))
def test_rewrite_is_bitwise_equal_idempotent_and_counts_the_same_flops(
        batch: int, kv_heads: int, group: int, cache_len: int, queries: int, mask: str,
        seed: int) -> None:
    inputs = step_inputs(batch, kv_heads, group, cache_len, 8, queries, mask, seed)
    graph = Captured(CacheLayer(group), inputs)
    flops_before = graph.flops()
    expected, expected_inputs = graph.run()
    assert graph.run_pass().matches == 1
    code = graph.gm.code
    again = graph.run_pass()
    assert not again.modified and again.matches == 0 and graph.gm.code == code
    assert graph.flops() == flops_before > 0  # the same attention, counted as SDPA
    actual, actual_inputs = graph.run()
    assert torch.equal(actual, expected)
    assert all(torch.equal(a, b) for a, b in zip(actual_inputs[1:3], expected_inputs[1:3]))
