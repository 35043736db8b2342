"""compile_model on fxkiln's own models runs through the piecewise runtime; generate uses it."""
from __future__ import annotations

import pytest
import torch

from compiler import CompileConfig, compile_model
from models import from_hf
from runtime import generate
from tests.model_oracle import build_hf, hf_greedy, random_ids

SIMULATED = CompileConfig(device="cpu", capture_sizes=(1, 2, 4, 8), simulate_capture=True,
                          debug=True)



def test_compiled_llama_generates_eagers_tokens_at_every_batch(replays: list) -> None:
    hf = build_hf("llama", seed=11, num_key_value_heads=2)
    model = from_hf(hf)
    compiled = compile_model(model, config=SIMULATED)
    report = compiled.report
    assert report.captured_sizes == (1, 2, 4, 8)
    assert report.pieces == 2 * model.config.num_hidden_layers + 1  # attention splits each layer
    assert report.capture_seconds > 0
    for batch in (3, 5, 9):
        prompt = random_ids((batch, 4), hf.config.vocab_size, seed=batch)
        before = len(replays)
        tokens = generate(compiled, prompt, 5)
        assert torch.equal(tokens, generate(model, prompt, 5))
        replayed = len(replays) - before
        assert (replayed > 0) == (batch <= 8)  # decode steps replay; batch 9 runs eagerly
    assert torch.equal(generate(compiled, prompt, 5), hf_greedy(hf, prompt, 5))


def test_compiled_bart_generates_eagers_tokens_at_every_batch(replays: list) -> None:
    hf = build_hf("bart", seed=12)
    model = from_hf(hf)
    compiled = compile_model(model, config=SIMULATED)
    assert compiled.report.captured_sizes == (1, 2, 4, 8)
    for batch in (3, 5, 9):
        source = random_ids((batch, 6), hf.config.vocab_size, seed=batch)
        before = len(replays)
        tokens = generate(compiled, None, 5, encoder_input_ids=source)
        assert torch.equal(tokens, generate(model, None, 5, encoder_input_ids=source))
        assert (len(replays) > before) == (batch <= 8)


def test_two_compiled_models_interleaved_keep_their_own_buffers() -> None:
    first, second = from_hf(build_hf("llama", seed=13)), from_hf(build_hf("llama", seed=14))
    compiled_first = compile_model(first, config=SIMULATED)
    compiled_second = compile_model(second, config=SIMULATED)
    prompt = random_ids((3, 4), first.config.vocab_size, seed=15)
    expected = [generate(first, prompt, 4), generate(second, prompt, 4)]
    for _ in range(2):
        assert torch.equal(generate(compiled_first, prompt, 4), expected[0])
        assert torch.equal(generate(compiled_second, prompt, 4), expected[1])


def test_no_capture_sizes_means_no_runner() -> None:
    model = from_hf(build_hf("llama", seed=16))
    compiled = compile_model(model, config=CompileConfig(device="cpu", capture_sizes=()))
    assert compiled.report.pieces == 0 and compiled.report.captured_sizes == ()
    prompt = random_ids((2, 3), model.config.vocab_size, seed=17)
    assert torch.equal(generate(compiled, prompt, 3), generate(model, prompt, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_compiled_models_on_cuda_graphs_generate_eagers_tokens(kind: str) -> None:
    hf = build_hf(kind, seed=21).cuda()
    model = from_hf(hf)
    compiled = compile_model(model, config=CompileConfig(device="cuda", capture_sizes=(1, 2, 4, 8)))
    assert compiled.report.captured_sizes == (1, 2, 4, 8)
    assert compiled.report.graph_memory_bytes >= 0 and compiled.report.capture_seconds > 0
    for batch in (3, 5, 9):
        ids = random_ids((batch, 6), hf.config.vocab_size, seed=batch).cuda()
        if kind == "llama":
            expected, actual = generate(model, ids, 5), generate(compiled, ids, 5)
        else:
            expected = generate(model, None, 5, encoder_input_ids=ids)
            actual = generate(compiled, None, 5, encoder_input_ids=ids)
        assert torch.equal(actual, expected), batch
