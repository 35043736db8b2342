"""Parallel layers: every rank's shard of a full checkpoint tensor recombines into the full
layer; layers trace to plain linear / dispatch-op nodes; norms and RoPE equal Hugging Face's."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import fx
from transformers.models.llama import modeling_llama

from models import UnsupportedConfigError
from models.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_act_fn,
)
from models.parallel import TensorParallel


def ranks(size: int) -> list[TensorParallel]:
    """One TP state per rank, for building shards in one process (no collective is called)."""
    return [TensorParallel(size, rank, group_name="unused") for rank in range(size)]


def targets(gm: fx.GraphModule) -> list[object]:
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


@given(tp=st.sampled_from([1, 2, 4]), width=st.sampled_from([4, 8]), tokens=st.integers(0, 3))
def test_column_then_row_parallel_shards_recombine_into_the_full_mlp(tp: int, width: int,
                                                                     tokens: int) -> None:
    hidden, inner = 3 * width, 4 * width
    w1, b1, w2, b2 = (torch.randn(inner, hidden), torch.randn(inner), torch.randn(hidden, inner),
                      torch.randn(hidden))
    x = torch.randn(tokens, hidden)
    partial_sums = []
    for state in ranks(tp):
        column = ColumnParallelLinear(hidden, inner, tp=state)
        row = RowParallelLinear(inner, hidden, reduce_results=False, tp=state)
        column.weight.weight_loader(column.weight, w1)
        column.bias.weight_loader(column.bias, b1)
        row.weight.weight_loader(row.weight, w2)
        row.bias.data.copy_(b2)
        partial_sums.append(row(F.relu(column(x))))  # (tokens, hidden): this rank's share
    expected = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    torch.testing.assert_close(sum(partial_sums), expected, atol=1e-4, rtol=1e-4)


@given(tp=st.sampled_from([1, 2, 4]), kv_heads=st.sampled_from([1, 2, 4]),
       group=st.sampled_from([1, 2]), head_size=st.sampled_from([2, 4]))
def test_qkv_shards_hold_their_heads_and_replicate_kv_heads_when_fewer_than_ranks(
        tp: int, kv_heads: int, group: int, head_size: int) -> None:
    heads = kv_heads * group
    if heads % tp or (kv_heads < tp and tp % kv_heads) or (kv_heads >= tp and kv_heads % tp):
        return
    hidden = 8
    wq, wk, wv = (torch.randn(n * head_size, hidden) for n in (heads, kv_heads, kv_heads))
    x = torch.randn(3, hidden)
    q_parts, k_parts = [], []
    for state in ranks(tp):
        layer = QKVParallelLinear(hidden, head_size, heads, kv_heads, bias=False, tp=state)
        for shard_id, tensor in zip("qkv", (wq, wk, wv)):
            layer.weight.weight_loader(layer.weight, tensor, shard_id)
        q, k, v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=-1)
        assert layer.num_kv_heads == max(1, kv_heads // tp)
        q_parts.append(q)
        k_parts.append(k)
        kv_rank = state.rank if kv_heads >= tp else state.rank // (tp // kv_heads)  # kv_size units
        kv_rows = slice(kv_rank * layer.kv_size, (kv_rank + 1) * layer.kv_size)
        torch.testing.assert_close(v, F.linear(x, wv[kv_rows]))
    torch.testing.assert_close(torch.cat(q_parts, dim=-1), F.linear(x, wq))
    full_k = F.linear(x, wk)
    if kv_heads >= tp:
        torch.testing.assert_close(torch.cat(k_parts, dim=-1), full_k)


def test_qkv_loader_takes_an_already_stacked_checkpoint_tensor() -> None:
    weight = torch.randn((4 + 2 * 2) * 3, 6)
    layer = QKVParallelLinear(6, 3, 4, 2, bias=False)
    layer.weight.weight_loader(layer.weight, weight)
    assert torch.equal(layer.weight, weight)


def test_merged_column_parallel_places_each_part_in_its_rows() -> None:
    gate, up = torch.randn(8, 5), torch.randn(8, 5)
    shards = []
    for state in ranks(2):
        layer = MergedColumnParallelLinear(5, [8, 8], bias=False, tp=state)
        layer.weight.weight_loader(layer.weight, up, 1)
        layer.weight.weight_loader(layer.weight, gate, 0)
        shards.append(layer.weight.detach().clone())
    assert torch.equal(shards[1], torch.cat([gate[4:], up[4:]]))
    assert torch.equal(shards[0], torch.cat([gate[:4], up[:4]]))


def test_vocab_shards_pad_the_last_rank_with_zero_rows() -> None:
    table = torch.randn(7, 3)
    first, last = (VocabParallelEmbedding(7, 3, tp=state) for state in ranks(2))
    for layer in (first, last):
        layer.weight.weight_loader(layer.weight, table)
    assert torch.equal(first.weight, table[:4])
    assert torch.equal(last.weight, torch.cat([table[4:], torch.zeros(1, 3)]))


def test_loader_errors_say_expected_and_found() -> None:
    layer = ColumnParallelLinear(4, 6)
    with pytest.raises(ValueError, match=r"expected shape \(6, 4\), found \(6, 5\)"):
        layer.weight.weight_loader(layer.weight, torch.randn(6, 5))
    qkv = QKVParallelLinear(4, 2, 2)
    with pytest.raises(ValueError, match="shard id 'q', 'k' or 'v', found 'x'"):
        qkv.weight.weight_loader(qkv.weight, torch.randn(4, 4), "x")


def test_tp_size_above_one_needs_a_process_group_and_divisible_sizes() -> None:
    with pytest.raises(ValueError, match="needs a process group"):
        TensorParallel(2, 0)
    with pytest.raises(ValueError, match=r"output_size \(6\) must be divisible"):
        ColumnParallelLinear(4, 6, tp=ranks(4)[0])


def test_layers_at_tp_one_trace_to_plain_linear_and_dispatch_ops() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = RMSNorm(8)
            self.up = MergedColumnParallelLinear(8, [16, 16])
            self.act = SiluAndMul()
            self.down = RowParallelLinear(16, 8)
            self.head = ParallelLMHead(11, 8)

        def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            x, residual = self.norm(x, residual)
            return self.head(self.down(self.act(self.up(self.norm(x)))) + residual)

    assert targets(fx.symbolic_trace(Block())) == [
        torch.ops.fxkiln.fused_add_rms_norm.default, operator.getitem, operator.getitem,
        torch.ops.fxkiln.rms_norm.default, torch._C._nn.linear,
        torch.ops.fxkiln.silu_and_mul.default, torch._C._nn.linear, operator.add,
        torch.ops.fxkiln.logits_rows.default, torch._C._nn.linear]  # the head: rows read only


def test_rms_norm_and_rotary_equal_hugging_face() -> None:
    x = torch.randn(5, 16)
    ours = RMSNorm(16, eps=1e-5)
    theirs = modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    ours.weight.data.normal_()
    theirs.weight.data.copy_(ours.weight)
    torch.testing.assert_close(ours(x), theirs(x))

    head_size, heads, base = 8, 2, 500.0
    rope = RotaryEmbedding(head_size, head_size, 32, base)
    positions = torch.tensor([0, 3, 7, 31, 12])
    q, k = torch.randn(5, heads * head_size), torch.randn(5, head_size)
    q_rot, k_rot = rope(positions, q, k)
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)
    angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)  # (tokens, head_size)
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(
        q.view(5, heads, head_size).transpose(0, 1), k.view(5, 1, head_size).transpose(0, 1),
        angles.cos(), angles.sin(), unsqueeze_dim=0)
    torch.testing.assert_close(q_rot, q_ref.transpose(0, 1).reshape(5, -1))
    torch.testing.assert_close(k_rot, k_ref.transpose(0, 1).reshape(5, -1))


def test_unknown_activation_names_the_config_key() -> None:
    assert torch.equal(get_act_fn("gelu")(torch.ones(2)), F.gelu(torch.ones(2)))
    with pytest.raises(UnsupportedConfigError, match="'activation_function'.*'quick_gelu'"):
        get_act_fn("quick_gelu")
