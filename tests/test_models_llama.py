"""Llama against Hugging Face: logits through prefill and cached decode steps, greedy tokens,
tracing, and config keys we refuse."""
from __future__ import annotations

import pytest
import torch

from models import UnsupportedConfigError, from_hf
from models.llama import LlamaForCausalLM
from runtime import generate
from tests.model_oracle import (
    build_hf,
    hf_greedy,
    hf_logits,
    random_ids,
    step_logits,
)
from tests.fx_helpers import attention_nodes, output_value, trace

ATOL = 1e-4


@pytest.mark.parametrize("overrides", [
    dict(num_key_value_heads=2),                                   # GQA
    dict(num_key_value_heads=1, tie_word_embeddings=True),         # MQA, tied LM head
    dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, head_dim=16),
], ids=["gqa", "mqa-tied", "mha-bias-headdim"])
def test_logits_match_hf_through_prefill_and_eight_decode_steps(overrides: dict) -> None:
    hf = build_hf("llama", seed=1, **overrides)
    model = from_hf(hf)
    prompt = random_ids((2, 5), hf.config.vocab_size, seed=2)
    continuation = random_ids((2, 8), hf.config.vocab_size, seed=3)
    ours = step_logits(model, prompt, continuation)
    expected = hf_logits(hf, torch.cat([prompt, continuation], dim=1))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_greedy_tokens_equal_hf_generate() -> None:
    hf = build_hf("llama", seed=4, num_key_value_heads=2, num_hidden_layers=3)
    model = from_hf(hf)
    prompt = random_ids((3, 4), hf.config.vocab_size, seed=5)
    ours = generate(model, prompt, max_new_tokens=10, ignore_eos=True)
    assert ours.shape == (3, 10)
    torch.testing.assert_close(ours, hf_greedy(hf, prompt, 10), atol=0, rtol=0)


def test_generate_accepts_a_wrapper_holding_the_model_as_dot_model() -> None:
    model = from_hf(build_hf("llama", seed=6))

    class Wrapper:  # what a compiled model looks like to generate
        def __init__(self, inner: LlamaForCausalLM) -> None:
            self.model = inner

        def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(*inputs)

    prompt = random_ids((2, 3), 101, seed=7)
    torch.testing.assert_close(generate(Wrapper(model), prompt, 4, ignore_eos=True),
                               generate(model, prompt, 4, ignore_eos=True))


def test_symbolic_trace_has_one_attention_node_per_layer_and_no_collectives() -> None:
    model = from_hf(build_hf("llama", seed=8, num_hidden_layers=3))
    gm = trace(model)
    assert len(attention_nodes(gm)) == 3
    assert {node.args[4] for node in attention_nodes(gm)} == set(model.attention_specs())
    assert not [n for n in gm.graph.nodes if "c10d" in str(n.target)]
    linears = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    assert len(linears) == 3 * 4 + 1  # qkv, o, gate_up, down per layer; the LM head


def test_traced_graph_runs_under_fake_tensors_with_symbolic_token_count() -> None:
    model = from_hf(build_hf("llama", seed=9))
    out = output_value(trace(model, model.example_inputs(7)))
    assert out.shape[1] == 101 and not isinstance(out.shape[0], int)  # (s0, vocab)


def test_example_inputs_give_a_runnable_step() -> None:
    model = from_hf(build_hf("llama", seed=10))
    input_ids, positions = model.example_inputs(6)
    assert input_ids.shape == positions.shape == (6,) and input_ids.dtype == torch.long


@pytest.mark.parametrize(("overrides", "key"), [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
     "rope_parameters.rope_type"),
])
def test_config_that_changes_the_math_and_is_not_implemented_is_refused(overrides: dict,
                                                                        key: str) -> None:
    hf = build_hf("llama", seed=11, **overrides)
    with pytest.raises(UnsupportedConfigError, match=key.replace(".", r"\.")):
        from_hf(hf)


@pytest.mark.gpu
def test_on_cuda_logits_and_greedy_tokens_match_hf_on_cpu() -> None:
    hf = build_hf("llama", seed=12, num_key_value_heads=2)
    model = from_hf(hf, device="cuda")
    prompt = random_ids((2, 5), hf.config.vocab_size, seed=13)
    continuation = random_ids((2, 8), hf.config.vocab_size, seed=14)
    ours = step_logits(model, prompt.cuda(), continuation.cuda()).cpu()
    expected = hf_logits(hf, torch.cat([prompt, continuation], dim=1))
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)
    tokens = generate(model, prompt.cuda(), 8, ignore_eos=True).cpu()
    assert torch.equal(tokens, hf_greedy(hf, prompt, 8))
