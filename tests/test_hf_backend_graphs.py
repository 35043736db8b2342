"""Hugging Face `generate` with `forward` compiled by the fxkiln backend, through the replay
simulator on CPU: eager's tokens, decode steps replayed from a static cache, reports that show
what was captured and why nothing was for a DynamicCache."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import transformers

import compiler
from compiler import CompileConfig
from models.presets import hf_config, hf_model
from runtime.signature_runner import CHANGING
from tests.model_oracle import randomize_, random_ids

pytestmark = pytest.mark.slow

SIZES = (1, 2, 4)
SIMULATED = CompileConfig(device="cpu", simulate_capture=True, capture_sizes=SIZES, debug=True,
                          prefill_capture_sizes=())
NEW_TOKENS = 6
DECODE_CALLS = NEW_TOKENS - 1          # forward calls after the prefill
REPLAYED = DECODE_CALLS - 2            # the first is watched, the second captured


def _hf(kind: str) -> Any:
    """A tiny Hugging Face model with well separated logits (greedy ties would be flaky)."""
    if kind == "mistral":  # Llama-tiny's widths on Mistral's classes
        base = hf_config("llama-tiny").to_dict()
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        config = transformers.MistralConfig(**{k: base[k] for k in keys}, sliding_window=None)
        hf = transformers.MistralForCausalLM(config).eval()
    else:
        hf = hf_model(f"{kind}-tiny")
    randomize_(hf, seed=3)
    return hf


def _generate(hf: Any, ids: torch.Tensor, **options: Any) -> torch.Tensor:
    options["disable_compile"] = True  # no auto-compile of generate's own (CUDA only anyway)
    with torch.no_grad():
        if hf.config.is_encoder_decoder:
            return hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False, **options)
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False, **options)


def _compiled_generate(hf: Any, ids: torch.Tensor, backend: compiler.Backend,
                       **options: Any) -> torch.Tensor:
    eager_forward = hf.forward
    hf.forward = torch.compile(eager_forward, backend=backend)
    try:
        return _generate(hf, ids, **options)
    finally:
        hf.forward = eager_forward


@pytest.mark.parametrize("kind", ["llama", "mistral", "bart"])
def test_static_cache_decode_steps_replay_one_whole_graph_each(kind: str, replays: list) -> None:
    hf = _hf(kind)
    # within the buckets, batch 1 and 3 (Mistral's and BART's; Llama's path is Mistral's, on
    # Llama-tiny's widths, and Llama's batch 1 replays in the Triton test below); past them,
    # Llama's batch 5
    batches = (5,) if kind == "llama" else (1, 3)
    for batch in batches:  # a fresh Dynamo per batch: every decode graph has static shapes
        torch._dynamo.reset()
        ids = random_ids((batch, 5), hf.config.vocab_size, seed=batch)
        expected = _generate(hf, ids, cache_implementation="static")
        backend, before = compiler.backend(SIMULATED), len(replays)
        tokens = _compiled_generate(hf, ids, backend, cache_implementation="static")
        assert torch.equal(tokens, expected), f"{kind}, batch {batch}"
        decode = backend.reports[-1]  # the decode step's graph, compiled after the prefill's
        captured = batch <= SIZES[-1]
        assert len(replays) - before == (REPLAYED if captured else 0)
        assert decode.pieces == 1  # the whole step, SDPA included
        assert decode.captured_sizes == ((batch,) if captured else ())
        assert decode.decode_graph_sizes == decode.captured_sizes
        if not captured:
            assert decode.capture_note == (f"leading size {batch} is more than the largest "
                                           f"capture size {SIZES[-1]}")
        assert "signature" in str(decode) or not captured
        # every attention reads its StaticCache layer in place, self-attention writing this
        # step's key and value in the same op (BART's cross-attention reads its cache only)
        attentions = hf.config.num_hidden_layers * (2 if kind == "bart" else 1)
        assert decode.passes["lift_cache_attention"].matches == attentions
        assert decode.kernels["cache_update_attention"] == "native"  # "auto" on CPU
        assert ("cache_attention" in decode.kernels) == (kind == "bart")
        if kind != "bart":  # lifted RMSNorm, add + RMSNorm, rotary, and the projections
            assert decode.passes["kernel_choice"].matches > 0  # (SiLU-and-mul in gate_up's)
            # the layers' norms folded into the projections they feed; the final add + norm
            # reaches the LM head through the logits' row slice
            assert {"norm_linear", "add_norm_linear", "fused_add_rms_norm", "rotary_cos_sin",
                    "linear"} <= set(decode.kernels)


@pytest.mark.parametrize("kind, batch", [("llama", 1), ("mistral", 3)])
def test_static_cache_decode_with_the_triton_cache_update_attention_gives_eager_tokens(
        kind: str, batch: int, replays: list) -> None:
    """The decode kernel itself (interpreted), not its twin, in every replayed step: one
    batch each of two near-identical architectures (the same kernel and pass path; a padded
    bucket at 3)."""
    hf = _hf(kind)
    config = dataclasses.replace(SIMULATED, kernels={"cache_update_attention": "triton"})
    torch._dynamo.reset()
    ids = random_ids((batch, 5), hf.config.vocab_size, seed=batch)
    expected = _generate(hf, ids, cache_implementation="static")
    backend, before = compiler.backend(config), len(replays)
    assert torch.equal(_compiled_generate(hf, ids, backend, cache_implementation="static"),
                       expected), f"{kind}, batch {batch}"
    decode = backend.reports[-1]
    assert decode.kernels["cache_update_attention"] == "triton"
    assert decode.passes["lift_cache_attention"].matches == hf.config.num_hidden_layers
    assert len(replays) - before == REPLAYED


def test_one_compiled_forward_for_every_batch_replays_pieces_of_the_dynamic_graph(
        replays: list) -> None:
    """Dynamo makes the batch dynamic at the second batch: that graph is split at SDPA and its
    pieces are captured per signature."""
    torch._dynamo.reset()
    hf, backend = _hf("llama"), compiler.backend(SIMULATED)
    counts = []
    for batch in (1, 3, 2):
        ids = random_ids((batch, 5), hf.config.vocab_size, seed=batch)
        expected = _generate(hf, ids, cache_implementation="static")
        before = len(replays)
        assert torch.equal(_compiled_generate(hf, ids, backend, cache_implementation="static"),
                           expected)
        counts.append(len(replays) - before)
    dynamic = [r for r in backend.reports if r.pieces > 1]
    assert dynamic and dynamic[-1].captured_sizes == (2, 3)
    pieces = dynamic[-1].pieces - hf.config.num_hidden_layers  # SDPA pieces run eagerly
    assert counts == [REPLAYED, REPLAYED * pieces, REPLAYED * pieces]


def test_dynamic_cache_generate_runs_uncaptured_and_says_why(replays: list) -> None:
    torch._dynamo.reset()
    hf, backend = _hf("llama"), compiler.backend(SIMULATED)
    ids = random_ids((2, 5), hf.config.vocab_size, seed=7)
    assert torch.equal(_compiled_generate(hf, ids, backend), _generate(hf, ids))
    assert replays == []
    assert any(report.capture_note == CHANGING for report in backend.reports)
    assert all(report.captured_sizes == () for report in backend.reports)


def test_a_new_static_cache_is_read_where_it_is(replays: list) -> None:
    """A StaticCache marks its keys and values static (mark_static_address) and `generate`
    makes a new one per call: a graph captured over the first cache must not go on reading it
    when the second arrives (the first is kept alive, so the second cannot take its memory)."""
    torch._dynamo.reset()
    hf = _hf("llama")
    forward = torch.compile(hf.forward, backend=compiler.backend(SIMULATED))
    ids = random_ids((1, 4), hf.config.vocab_size, seed=2)
    caches = []
    with torch.no_grad():
        for _ in range(2):
            caches.append(transformers.StaticCache(config=hf.config, max_cache_len=16))
            eager_cache = transformers.StaticCache(config=hf.config, max_cache_len=16)
            for cache in (caches[-1], eager_cache):
                hf(input_ids=ids, past_key_values=cache, use_cache=True)  # prefill, eagerly
            token = ids[:, -1:]
            for _ in range(4):
                logits = forward(input_ids=token, past_key_values=caches[-1],
                                 use_cache=True).logits
                expected = hf(input_ids=token, past_key_values=eager_cache,
                              use_cache=True).logits
                torch.testing.assert_close(logits, expected)
                token = expected[:, -1:].argmax(-1)
    assert len(replays) >= 2  # the second cache's steps replay too, from its own graph
    torch._dynamo.reset()
