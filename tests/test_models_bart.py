"""BART against Hugging Face: logits through prefill and cached decode steps, greedy tokens, and
the traced structure the qkv_split pass targets."""
from __future__ import annotations

import pytest
import torch

from models import UnsupportedConfigError, from_hf
from runtime import generate
from runtime.kv_cache import AttentionKind
from tests.model_oracle import (
    build_hf,
    decoder_prompt,
    hf_greedy,
    hf_logits,
    random_ids,
    step_logits,
)
from tests.fx_helpers import attention_nodes, output_value, trace

ATOL = 1e-4


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(scale_embedding=True, activation_function="relu", encoder_layers=1, decoder_layers=3),
    dict(encoder_attention_heads=2, decoder_attention_heads=8, tie_word_embeddings=False),
], ids=["base", "scaled-relu", "heads-untied"])
def test_logits_match_hf_through_prefill_and_eight_decode_steps(overrides: dict) -> None:
    hf = build_hf("bart", seed=1, **overrides)
    model = from_hf(hf)
    source = random_ids((2, 7), hf.config.vocab_size, seed=2)
    prompt = decoder_prompt(hf, 2)
    continuation = random_ids((2, 8), hf.config.vocab_size, seed=3)
    ours = step_logits(model, prompt, continuation, source)
    expected = hf_logits(hf, torch.cat([prompt, continuation], dim=1), source)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_greedy_tokens_equal_hf_generate() -> None:
    hf = build_hf("bart", seed=4)
    model = from_hf(hf)
    source = random_ids((3, 6), hf.config.vocab_size, seed=5)
    ours = generate(model, None, max_new_tokens=10, encoder_input_ids=source,
                    ignore_eos=True)
    assert ours.shape == (3, 10)
    torch.testing.assert_close(ours, hf_greedy(hf, decoder_prompt(hf, 3), 10, source), atol=0, rtol=0)


def test_generate_needs_encoder_inputs() -> None:
    model = from_hf(build_hf("bart", seed=6))
    with pytest.raises(ValueError, match="encoder_input_ids"):
        generate(model, torch.zeros(1, 1, dtype=torch.long), 2)


def test_trace_keeps_one_fused_cross_attention_projection_read_on_both_streams() -> None:
    model = from_hf(build_hf("bart", seed=7, encoder_layers=2, decoder_layers=3))
    gm = trace(model)
    kinds = [spec.kind for spec in model.attention_specs().values()]
    assert len(attention_nodes(gm)) == len(kinds) == 2 + 2 * 3
    assert kinds.count(AttentionKind.CROSS) == 3
    for index in range(3):
        weight = f"model.decoder.layers.{index}.encoder_attn.qkv_proj.weight"
        (weight_node,) = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == weight]
        projections = [user for user in weight_node.users if user.target is torch._C._nn.linear]
        assert len(projections) == 2  # decoder stream (for Q) and encoder stream (for K, V)
        for projection in projections:
            (split,) = projection.users
            assert split.target == "split" and split.args[1] == [32, 32, 32]


def test_traced_graph_runs_under_fake_tensors_with_symbolic_token_counts() -> None:
    model = from_hf(build_hf("bart", seed=8))
    out = output_value(trace(model, model.example_inputs(5)))
    assert out.shape[1] == 101 and not isinstance(out.shape[0], int)


def test_traced_graph_generates_what_the_model_generates() -> None:
    model = from_hf(build_hf("bart", seed=9))
    gm = trace(model)

    class Compiled:  # what a compiled model looks like to generate: callable, `.model` inside
        def __init__(self) -> None:
            self.model = model

        def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
            return gm(*inputs)

    source = random_ids((2, 5), 101, seed=10)
    torch.testing.assert_close(generate(Compiled(), None, 6, encoder_input_ids=source,
                                        ignore_eos=True),
                               generate(model, None, 6, encoder_input_ids=source, ignore_eos=True))


def test_unsupported_activation_names_the_config_key() -> None:
    with pytest.raises(UnsupportedConfigError, match="activation_function"):
        from_hf(build_hf("bart", seed=11, activation_function="quick_gelu"))


@pytest.mark.gpu
def test_on_cuda_logits_and_greedy_tokens_match_hf_on_cpu() -> None:
    hf = build_hf("bart", seed=12)
    model = from_hf(hf, device="cuda")
    source = random_ids((2, 7), hf.config.vocab_size, seed=13)
    prompt = decoder_prompt(hf, 2)
    continuation = random_ids((2, 8), hf.config.vocab_size, seed=14)
    ours = step_logits(model, prompt.cuda(), continuation.cuda(), source.cuda()).cpu()
    expected = hf_logits(hf, torch.cat([prompt, continuation], dim=1), source)
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)
    tokens = generate(model, None, 8, encoder_input_ids=source.cuda(),
                      ignore_eos=True).cpu()
    assert torch.equal(tokens, hf_greedy(hf, prompt, 8, source))
