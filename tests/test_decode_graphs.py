"""Whole decode steps as one (simulated) graph: the runner's own KV caches and layout buffers,
graph-safe Triton attention (interpreted on CPU), eager's tokens at every batch."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import CompileConfig, compile_model
from models import from_hf
from runtime import attention, generate
from runtime.generation import DecodeSession
from runtime.kernels import triton_kernels
from tests.model_oracle import build_hf, random_ids

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    attention.attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                   torch.float32),
    reason="needs Triton (interpreted on CPU)")]  # slow: Triton attention is interpreted

WHOLE = CompileConfig(device="cpu", capture_sizes=(1, 2, 4, 8), simulate_capture=True,
                      debug=True, kernels={"attention": "triton"}, kv_cache_tokens=512,
                      prefill_capture_sizes=())  # replays counted below are decode steps


@pytest.fixture(scope="module")
def llama() -> tuple[torch.nn.Module, object]:
    # one layer: each layer's attention runs in the Triton interpreter at every capture and step
    model = from_hf(build_hf("llama", seed=21, num_key_value_heads=2, num_hidden_layers=1))
    return model, compile_model(model, config=WHOLE)


@pytest.fixture(scope="module")
def bart() -> tuple[torch.nn.Module, object]:
    model = from_hf(build_hf("bart", seed=22, encoder_layers=1, decoder_layers=1))
    # the one bucket batch 3 decodes in
    return model, compile_model(model, config=WHOLE.replace(capture_sizes=(4,)))


# past the buckets (batch 9) every step runs eagerly with Triton interpreted: two steps show it
@pytest.mark.parametrize("batch, steps", [(3, 6), (9, 2)])
def test_llama_decode_steps_replay_one_graph_each(llama, replays: list, batch: int,
                                                  steps: int) -> None:
    model, compiled = llama
    assert compiled.report.decode_graph_sizes == (1, 2, 4, 8)
    prompt = random_ids((batch, 4), model.config.vocab_size, seed=batch)
    before = len(replays)
    tokens = generate(compiled, prompt, steps, ignore_eos=True)
    assert torch.equal(tokens, generate(model, prompt, steps, ignore_eos=True))
    # the decode steps after the prefill; a step within the buckets is one replay, past none
    assert len(replays) - before == (steps - 1 if batch <= 8 else 0)


@pytest.mark.parametrize("batch", [3])  # past the buckets: the Llama test's batch 9
def test_bart_decode_steps_replay_one_graph_each(bart, replays: list, batch: int) -> None:
    model, compiled = bart
    source = random_ids((batch, 7), model.config.vocab_size, seed=batch)
    before = len(replays)
    tokens = generate(compiled, None, 5, encoder_input_ids=source, ignore_eos=True)
    expected = generate(model, None, 5, encoder_input_ids=source, ignore_eos=True)
    assert torch.equal(tokens, expected)
    assert len(replays) - before == (4 if batch <= 8 else 0)


def test_sequences_finishing_early_shrink_the_replayed_step(llama, replays: list) -> None:
    """EOS drops finished rows: later whole-step replays load fewer sequences (smaller buckets),
    and the tokens stay eager's."""
    model, compiled = llama
    prompt = random_ids((5, 4), model.config.vocab_size, seed=31)
    free = generate(model, prompt, 6, ignore_eos=True)
    eos = int(free[0, 1])  # fires for row 0 at step 1, for others later or never
    expected = generate(model, prompt, 6, eos_token_id=eos, pad_token_id=0)
    before = len(replays)
    assert torch.equal(generate(compiled, prompt, 6, eos_token_id=eos, pad_token_id=0), expected)
    assert len(replays) > before


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, 4])
def test_ragged_prompts_replay_whole_decode_steps(llama, bart, replays: list,
                                                  chunk: int | None) -> None:
    """Prompts of different lengths (prefilled by the varlen kernel, in chunks or not): every
    pure decode step replays one graph over the runner's caches, a prefill chunk within the
    buckets replays the pieces (its LM head eager), and the tokens are eager's."""
    model, compiled = llama
    prompts = [random_ids((n,), model.config.vocab_size, seed=n) for n in (2, 7, 4)]
    expected = generate(model, prompts, 5, ignore_eos=True)
    before = len(replays)
    tokens = generate(compiled, prompts, 5, ignore_eos=True, prefill_chunk_tokens=chunk)
    assert torch.equal(tokens, expected)
    whole = {id(graph) for graph in compiled._run.whole_steps.graphs.values()}
    pieces = sum(piece.piece.captured for piece in compiled._run.piece_runners)
    wholes = sum(id(graph) in whole for graph in replays[before:])
    # chunks of 4, shortest prompt first: steps of (2+2), (1 | 2+2), (2 | 4), (2 | 1), each
    # "a | b" being decode tokens | prompt chunks; the last one is decode-shaped (every sequence
    # brings one token) and replays, then 4 decode steps finish the longest-waiting sequence;
    # the first three replay the pieces (4, 5 and 6 tokens). Unchunked, the prefill of 13
    # tokens is past the buckets (eager), and 4 decode steps replay.
    assert wholes == (4 if chunk is None else 5)
    assert len(replays) - before - wholes == (0 if chunk is None else 3 * pieces)
    bart_model, bart_compiled = bart
    sources = [random_ids((n,), bart_model.config.vocab_size, seed=n) for n in (3, 8)]
    expected = generate(bart_model, None, 4, encoder_input_ids=sources, ignore_eos=True)
    before = len(replays)
    assert torch.equal(generate(bart_compiled, None, 4, encoder_input_ids=sources,
                                ignore_eos=True), expected)
    assert len(replays) - before == 3  # the decode steps; the prefill runs the encoder: eager


# each session generates eagerly and replayed (Triton interpreted, its cost growing with the
# rows): up to 6 rows still pads into every bucket (1, 2, 4, 8) after a larger session
@settings(max_examples=4)
@given(batches=st.lists(st.integers(1, 6), min_size=2, max_size=3), seed=st.integers(0, 99))
def test_interleaved_sessions_of_any_size(llama, batches: list[int], seed: int) -> None:
    """Sessions of random sizes, one after another, each through the same caches and buffers:
    stale layout rows from a larger earlier step never leak into a smaller one."""
    model, compiled = llama
    for i, batch in enumerate(batches):
        prompt = random_ids((batch, 3), model.config.vocab_size, seed=seed + i)
        expected = generate(model, prompt, 4, ignore_eos=True)
        assert torch.equal(generate(compiled, prompt, 4, ignore_eos=True), expected)


def test_a_second_live_session_gets_its_own_caches(llama) -> None:
    model, compiled = llama
    first = DecodeSession(compiled, 2, 3, 4)
    second = DecodeSession(compiled, 2, 3, 4)
    assert first.kv_caches is compiled.static_decode.kv_caches
    assert second.kv_caches is not first.kv_caches  # the runner's caches are leased to one
    del first
    third = DecodeSession(compiled, 2, 3, 4)
    assert third.kv_caches is compiled.static_decode.kv_caches  # released with its session


def test_native_attention_keeps_decode_piecewise(caplog: pytest.LogCaptureFixture) -> None:
    model = from_hf(build_hf("llama", seed=23))
    config = CompileConfig(device="cpu", capture_sizes=(1, 2), simulate_capture=True,
                           kernels={"attention": "native"}, kv_cache_tokens=64,
                           prefill_capture_sizes=())
    with caplog.at_level(logging.WARNING):
        compiled = compile_model(model, config=config)
    assert compiled.report.decode_graph_sizes == ()
    assert "could not be captured" in caplog.text and "choose 'triton'" in caplog.text
    prompt = random_ids((2, 3), model.config.vocab_size, seed=1)
    expected = generate(model, prompt, 4, ignore_eos=True)
    assert torch.equal(generate(compiled, prompt, 4, ignore_eos=True), expected)


def test_fits_checks_size_dtype_and_device(llama) -> None:
    _, compiled = llama
    state = compiled.static_decode
    assert state.fits(state.num_slots, state.max_len, dtype=state.dtype, device="cpu")
    assert not state.fits(state.num_slots + 1, state.max_len)
    assert not state.fits(1, state.max_len + 1)
    assert not state.fits(1, 1, dtype=torch.float16)
    assert not state.fits(1, 1, device="meta")
