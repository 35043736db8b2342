"""Prefill steps through piecewise graphs (simulated): prefill buckets above the decode ones,
attention and the LM head eager, the head on the rows a step reads; decode steps as before."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import CompileConfig, compile_model
from models import from_hf
from runtime import attention, generate
from runtime.forward_context import set_forward_context
from runtime.kernels import triton_kernels
from runtime.kv_cache import allocate_kv_caches
from runtime.step import StepMode
from runtime.step_metadata import uniform_batch_metadata
from tests.model_oracle import build_hf, random_ids

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    attention.attention_jit is None or not triton_kernels.supports(torch.device("cpu"),
                                                                   torch.float32),
    reason="needs Triton (interpreted on CPU)")]  # slow: Triton attention is interpreted

DECODE, PREFILL = (1, 2, 4), (8, 16, 24)
SIMULATED = CompileConfig(device="cpu", capture_sizes=DECODE, prefill_capture_sizes=PREFILL,
                          simulate_capture=True, debug=True, kernels={"attention": "triton"},
                          kv_cache_tokens=512)  # graph-safe attention: whole decode steps too


@pytest.fixture(scope="module")
def llama() -> tuple[Any, Any]:
    model = from_hf(build_hf("llama", seed=41))
    return model, compile_model(model, config=SIMULATED)


@pytest.fixture(scope="module")
def bart() -> tuple[Any, Any]:
    """Only the buckets its one test replays (each capture runs Triton interpreted): the
    decode steps of one sequence, and the prompt chunks of 5 and 4 tokens."""
    model = from_hf(build_hf("bart", seed=42))
    return model, compile_model(model, config=SIMULATED.replace(capture_sizes=(1,),
                                                                prefill_capture_sizes=(8,)))


def prefill_context(model: Any, tokens: int, read: list[int] | None) -> Any:
    """One sequence of `tokens` prompt tokens, reading the logits of rows `read` (None: all)."""
    caches = allocate_kv_caches(model.attention_specs(), tokens, 0, model.dtype, "cpu")
    metadata = uniform_batch_metadata(1, tokens, tokens, tokens, torch.device("cpu"))
    if read is not None:
        metadata = dataclasses.replace(metadata, logits_indices=torch.tensor(read))
    return set_forward_context(metadata, caches)


def inputs(model: Any, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_ids((tokens,), model.config.vocab_size, seed=tokens), torch.arange(tokens)


@pytest.mark.parametrize("tokens, read, mode, bucket, eager_logits", [
    (3, [2], StepMode.PIECEWISE, 4, True),        # a short prompt: a decode bucket's head
    (6, [5], StepMode.PIECEWISE, 8, True),        # a prefill bucket
    (10, None, StepMode.PIECEWISE, 16, True),     # every row's logits: still no head graph
    (4, None, StepMode.PIECEWISE, 4, False),      # decode-sized, every row: the whole piece
    (25, [24], StepMode.EAGER, None, False),      # past the largest bucket
])
def test_dispatch_sends_prefill_steps_to_their_bucket(llama, tokens: int, read: list[int] | None,
                                                      mode: StepMode, bucket: int | None,
                                                      eager_logits: bool) -> None:
    model, compiled = llama
    with prefill_context(model, tokens, read):
        step = compiled._run.dispatch(tokens, inputs(model, tokens))
    assert (step.mode, step.key, step.eager_logits) == (mode, bucket, eager_logits)


def test_prefill_buckets_hold_no_lm_head_graph(llama) -> None:
    """The last piece keeps its every-row graph at decode buckets only; its head (up to
    logits_rows) has a graph at every bucket; whole decode steps stay decode-sized."""
    _, compiled = llama
    last = compiled._run.piece_runners[-1]
    assert set(last.entries) == set(DECODE)
    assert last.logits_head is not None and set(last.logits_head.entries) == {*DECODE, *PREFILL}
    assert compiled.report.captured_sizes == DECODE + PREFILL
    assert compiled.report.decode_graph_sizes == DECODE
    assert compiled.report.prefill_graph_sizes == PREFILL
    assert "LM head eager, at sizes: 8, 16, 24" in str(compiled.report)


@pytest.mark.parametrize("tokens, read", [(7, [6]), (13, [0, 12, 5]), (3, [1]), (9, None)])
def test_a_replayed_prefill_step_gives_eager_logits_for_the_rows_it_reads(
        llama, replays: list, tokens: int, read: list[int] | None) -> None:
    model, compiled = llama
    ids, positions = inputs(model, tokens)
    with prefill_context(model, tokens, read):
        expected = model(ids, positions)
    before = len(replays)
    with prefill_context(model, tokens, read):
        logits = compiled(ids, positions)
    captured = sum(piece.piece.captured for piece in compiled._run.piece_runners)
    assert len(replays) - before == captured  # every captured piece, the last one's head
    assert logits.shape == (tokens if read is None else len(read), model.config.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_generation_replays_prefill_and_decode_steps_and_keeps_eager_tokens(
        llama, replays: list) -> None:
    model, compiled = llama
    prompts = [random_ids((n,), model.config.vocab_size, seed=n) for n in (7, 2, 11)]
    expected = generate(model, prompts, 5, ignore_eos=True)
    before = len(replays)
    assert torch.equal(generate(compiled, prompts, 5, ignore_eos=True), expected)
    whole = {id(graph) for graph in compiled._run.whole_steps.graphs.values()}
    wholes = sum(id(graph) in whole for graph in replays[before:])
    captured = sum(piece.piece.captured for piece in compiled._run.piece_runners)
    assert wholes == 4  # the decode steps, one graph each
    assert len(replays) - before - wholes == captured  # the prefill of 20 tokens: bucket 24


def test_a_decoder_prompt_chunk_of_an_encoder_decoder_replays(bart, replays: list) -> None:
    """BART's first step runs the encoder (eager: encoder inputs differ from the captured
    shapes); the later chunks of a long decoder prompt bring no encoder tokens and replay."""
    model, compiled = bart
    source = [random_ids((6,), model.config.vocab_size, seed=1)]
    prompt = [random_ids((14,), model.config.vocab_size, seed=2)]
    expected = generate(model, prompt, 3, encoder_input_ids=source, ignore_eos=True)
    before = len(replays)
    tokens = generate(compiled, prompt, 3, encoder_input_ids=source, ignore_eos=True,
                      prefill_chunk_tokens=5)
    assert torch.equal(tokens, expected)
    captured = sum(piece.piece.captured for piece in compiled._run.piece_runners)
    whole = {id(graph) for graph in compiled._run.whole_steps.graphs.values()}
    pieces = sum(id(graph) not in whole for graph in replays[before:])
    assert pieces == 2 * captured  # chunks 2 and 3 (5 and 4 tokens) replay, chunk 1 does not


@settings(max_examples=6, deadline=None)  # each example generates eagerly and replayed
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
       chunk=st.sampled_from([None, 3, 7]), seed=st.integers(0, 99))
def test_property_prefill_graphs_give_eager_tokens(llama, lengths: list[int], chunk: int | None,
                                                   seed: int) -> None:
    model, compiled = llama
    prompts = [random_ids((n,), model.config.vocab_size, seed=seed + i)
               for i, n in enumerate(lengths)]
    expected = generate(model, prompts, 3, ignore_eos=True)
    assert torch.equal(generate(compiled, prompts, 3, ignore_eos=True,
                                prefill_chunk_tokens=chunk), expected)
