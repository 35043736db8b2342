"""Tensor parallelism on CPU: 2 gloo ranks give the TP=1 logits and tokens (eager, and compiled
with simulated graphs whose pieces hold the collectives), and a hypothesis property over sizes,
heads, KV heads, layers and TP size in {1, 2} against Hugging Face."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from models.llama import LlamaForCausalLM
from models.parallel import TensorParallel
from tests.model_oracle import (
    build_hf,
    hf_logits,
    random_ids,
)
from tests.tp_worker import TPPool, TPTask, run_task
from tests.fx_helpers import output_value, trace

ATOL = 1e-4


@pytest.fixture(scope="module")
def tp_pool() -> Iterator[TPPool]:
    pool = TPPool(world_size=2)
    yield pool
    pool.close()


def task_for(kind: str, seed: int, overrides: dict[str, Any], mode: str = "logits",
             steps: int = 8) -> TPTask:
    vocab = overrides.get("vocab_size", 101)
    if kind == "llama":
        return TPTask(kind, seed, random_ids((2, 4), vocab, seed + 1),
                      random_ids((2, steps), vocab, seed + 2), None, overrides, mode)
    return TPTask(kind, seed, torch.full((2, 1), 2), random_ids((2, steps), vocab, seed + 2),
                  random_ids((2, 5), vocab, seed + 3), overrides, mode)


@pytest.mark.slow  # the first test to use the pool starts its two rank processes
@pytest.mark.parametrize(("kind", "overrides"), [
    ("llama", dict(num_key_value_heads=2, vocab_size=101)),  # odd vocab: padded vocab shards
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),  # KV head replicated
    ("bart", dict()),
], ids=["llama-gqa", "llama-mqa-tied", "bart"])
def test_two_ranks_give_the_single_rank_logits_and_tokens(tp_pool: TPPool, kind: str,
                                                          overrides: dict) -> None:
    task = task_for(kind, 3, overrides)
    torch.testing.assert_close(tp_pool.run(task), run_task(task, tp_size=1), atol=ATOL, rtol=0)
    task = task_for(kind, 4, overrides, mode="generate", steps=6)
    assert torch.equal(tp_pool.run(task), run_task(task, tp_size=1))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_two_compiled_ranks_replaying_graphs_give_the_single_rank_eager_tokens(
        tp_pool: TPPool, kind: str) -> None:
    # passes + simulated graphs on each rank: the collectives sit inside replayed pieces, and
    # batch 3 decodes in the bucket of 4 (a padding row goes through every all-reduce)
    batch, vocab = 3, 101
    prompt = random_ids((batch, 4), vocab, 7) if kind == "llama" else torch.full((batch, 1), 2)
    encoder_ids = random_ids((batch, 5), vocab, 8) if kind == "bart" else None
    task = TPTask(kind, 6, prompt, torch.empty((batch, 6)), encoder_ids, {}, "compiled-generate")
    eager = TPTask(kind, 6, prompt, torch.empty((batch, 6)), encoder_ids, {}, "generate")
    assert torch.equal(tp_pool.run(task), run_task(eager, tp_size=1))


def test_tp_graph_holds_one_collective_per_row_parallel_layer_and_embedding() -> None:
    hf = build_hf("llama", seed=5, num_hidden_layers=2)
    model = LlamaForCausalLM(hf.config, tp=TensorParallel(2, 0, group_name="unused"))
    gm = trace(model, model.example_inputs(3))
    collectives = [str(node.target) for node in gm.graph.nodes if "c10d" in str(node.target)]
    # embedding + (o_proj, down_proj) per layer reduce; the LM head gathers; each waits once
    assert collectives.count("_c10d_functional.all_reduce.default") == 1 + 2 * 2
    assert collectives.count("_c10d_functional.all_gather_into_tensor.default") == 1
    assert collectives.count("_c10d_functional.wait_tensor.default") == 1 + 2 * 2 + 1
    assert output_value(gm).shape[1] == 101


@st.composite
def model_cases(draw: st.DrawFn) -> tuple[str, int, dict[str, Any]]:
    kind = draw(st.sampled_from(["llama", "bart"]))
    tp = draw(st.sampled_from([1, 2]))
    heads = draw(st.sampled_from([2, 4, 8]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    layers = draw(st.integers(1, 2))
    ffn = draw(st.sampled_from([16, 24, 40]))
    vocab = draw(st.integers(40, 120))
    if kind == "llama":
        kv_heads = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
        return kind, tp, dict(hidden_size=hidden, num_attention_heads=heads,
                              num_key_value_heads=kv_heads, num_hidden_layers=layers,
                              intermediate_size=ffn, vocab_size=vocab)
    return kind, tp, dict(d_model=hidden, encoder_attention_heads=heads,
                          decoder_attention_heads=heads, encoder_layers=layers,
                          decoder_layers=draw(st.integers(1, 2)), encoder_ffn_dim=ffn,
                          decoder_ffn_dim=ffn, vocab_size=vocab)


@pytest.mark.slow
@given(case=model_cases(), seed=st.integers(0, 1000))
def test_logits_equal_hf_for_any_size_heads_kv_heads_layers_and_tp(
        tp_pool: TPPool, case: tuple[str, int, dict[str, Any]], seed: int) -> None:
    kind, tp, overrides = case
    event(f"{kind}, tp={tp}")
    task = task_for(kind, seed, overrides, steps=3)
    ours = tp_pool.run(task) if tp == 2 else run_task(task, tp_size=1)
    hf = build_hf(kind, seed, **overrides)
    tokens = torch.cat([task.prompt, task.continuation], dim=1)
    torch.testing.assert_close(ours, hf_logits(hf, tokens, task.encoder_ids), atol=ATOL, rtol=0)
