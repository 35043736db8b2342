"""compile_model on fxkiln's own models runs through the piecewise runtime; generate uses it."""
from __future__ import annotations

import bisect
import logging
from typing import Any

import pytest
import torch

from compiler import CompileConfig, compile_model
from models import from_hf
from runtime import generate
from runtime.replay_simulator import SimulatedGraphDevice
from tests.generation_helpers import RecordingModel, finish_at_eos, finish_steps, staggered_eos
from tests.model_oracle import build_hf, hf_generate_eos, random_ids

CAPTURE_SIZES = (1, 2, 4, 8)
SIMULATED = CompileConfig(device="cpu", capture_sizes=CAPTURE_SIZES, simulate_capture=True,
                          debug=True, prefill_capture_sizes=())  # prefill: tests/test_prefill_graphs.py
EAGER_WARNING = "more than the largest captured size"


@pytest.fixture
def replayed_buckets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bucket of every replayed forward of a simulated runner, in order."""
    buckets: list[int] = []
    before_replay = SimulatedGraphDevice.before_replay

    def recording(device: SimulatedGraphDevice, bucket: int) -> None:
        buckets.append(bucket)
        before_replay(device, bucket)

    monkeypatch.setattr(SimulatedGraphDevice, "before_replay", recording)
    return buckets


def expected_buckets(calls: list[tuple[int, int]]) -> list[int]:
    """The buckets a runner must replay for these (tokens, encoder tokens) calls: steps with
    encoder tokens (a prefill) or more tokens than the largest bucket run eagerly."""
    return [CAPTURE_SIZES[bisect.bisect_left(CAPTURE_SIZES, tokens)] for tokens, encoder in calls
            if encoder == 0 and tokens <= CAPTURE_SIZES[-1]]


def generate_both(kind: str, model: Any, compiled: Any, ids: torch.Tensor, steps: int,
                  **options: Any) -> tuple[torch.Tensor, torch.Tensor, RecordingModel]:
    """(eager tokens, compiled tokens, the compiled calls' record)."""
    recording = RecordingModel(model, compiled)
    prompt, source = (None, ids) if kind == "bart" else (ids, None)
    eager = generate(model, prompt, steps, encoder_input_ids=source, **options)
    return eager, generate(recording, prompt, steps, encoder_input_ids=source, **options), recording


def build(kind: str, seed: int) -> tuple[Any, Any]:
    """(Hugging Face model, ours) of `kind` with seeded weights."""
    hf = build_hf(kind, seed=seed)
    return hf, from_hf(hf)


def hf_tokens(hf: Any, kind: str, ids: torch.Tensor, steps: int, eos: list[int]) -> torch.Tensor:
    if kind == "bart":
        prompt = torch.full((ids.shape[0], 1), hf.config.decoder_start_token_id)
        return hf_generate_eos(hf, prompt, steps, eos, 0, encoder_ids=ids)
    return hf_generate_eos(hf, ids, steps, eos, 0)


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_compiled_decode_replays_shrinking_buckets_and_equals_eager_with_eos(
        kind: str, replays: list, replayed_buckets: list[int],
        caplog: pytest.LogCaptureFixture) -> None:
    """Batches 3, 5 and 9 (9 > the largest bucket: eager until sequences finish), EOS firing
    at different steps: the compiled model replays the bucket of each step's running batch and
    gives eager's tokens, which are Hugging Face's."""
    hf, model = build(kind, seed=11 if kind == "llama" else 12)
    compiled = compile_model(model, config=SIMULATED)
    report = compiled.report
    assert report.captured_sizes == CAPTURE_SIZES and report.capture_seconds > 0
    layers = model.config.num_hidden_layers if kind == "llama" else model.config.decoder_layers
    assert report.pieces >= 2 * layers + 1  # split at the attention of each layer
    shrunk = False
    for batch in (3, 5, 9):
        ids = random_ids((batch, 4 if kind == "llama" else 6), hf.config.vocab_size, seed=batch)
        free = generate_both(kind, model, compiled, ids, 8, ignore_eos=True)[0]
        eos = staggered_eos(free)
        assert None in finish_steps(free, eos) and len(set(finish_steps(free, eos))) >= 2
        del replays[:], replayed_buckets[:]
        eager, tokens, recording = generate_both(kind, model, compiled, ids, 8,
                                                 eos_token_id=eos, pad_token_id=0)
        assert torch.equal(tokens, eager) and torch.equal(eager, finish_at_eos(free, eos, 0))
        assert replayed_buckets == expected_buckets(recording.calls)
        assert (len(replays) > 0) == (len(replayed_buckets) > 0)
        encoder_tokens = [encoder for _, encoder in recording.calls]
        assert encoder_tokens[1:] == [0] * (len(encoder_tokens) - 1)  # the encoder runs once,
        assert encoder_tokens[0] == (ids.numel() if kind == "bart" else 0)  # at prefill
        first_decode, last_decode = recording.calls[1][0], recording.calls[-1][0]
        shrunk |= expected_buckets([(last_decode, 0)]) != expected_buckets([(first_decode, 0)])
        if batch == 3:
            assert torch.equal(tokens, hf_tokens(hf, kind, ids, 8, eos))
    assert shrunk  # some run moved to a smaller bucket as its sequences finished
    warnings = [r for r in caplog.records if EAGER_WARNING in r.getMessage()]
    assert len(warnings) == 1  # eager past the largest bucket, warned once


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_compiled_sampling_with_a_seed_equals_eager(kind: str, replayed_buckets: list[int]) -> None:
    hf, model = build(kind, seed=13)
    compiled = compile_model(model, config=SIMULATED)
    ids = random_ids((5, 4), hf.config.vocab_size, seed=14)
    options = dict(do_sample=True, temperature=2.0, top_k=20, top_p=0.9, seed=7)
    free = generate_both(kind, model, compiled, ids, 6, ignore_eos=True, **options)[0]
    eos = staggered_eos(free)
    del replayed_buckets[:]
    eager, tokens, recording = generate_both(kind, model, compiled, ids, 6, eos_token_id=eos,
                                             pad_token_id=0, **options)
    assert torch.equal(tokens, eager) and torch.equal(eager, finish_at_eos(free, eos, 0))
    assert replayed_buckets and replayed_buckets == expected_buckets(recording.calls)


def test_two_compiled_models_interleaved_keep_their_own_buffers() -> None:
    first, second = from_hf(build_hf("llama", seed=13)), from_hf(build_hf("llama", seed=14))
    compiled_first = compile_model(first, config=SIMULATED)
    compiled_second = compile_model(second, config=SIMULATED)
    prompt = random_ids((3, 4), first.config.vocab_size, seed=15)
    expected = [generate(first, prompt, 4, ignore_eos=True),
                generate(second, prompt, 4, ignore_eos=True)]
    for _ in range(2):
        assert torch.equal(generate(compiled_first, prompt, 4, ignore_eos=True), expected[0])
        assert torch.equal(generate(compiled_second, prompt, 4, ignore_eos=True), expected[1])


def test_no_capture_sizes_means_no_runner() -> None:
    model = from_hf(build_hf("llama", seed=16))
    compiled = compile_model(model, config=CompileConfig(device="cpu", capture_sizes=()))
    assert compiled.report.pieces == 0 and compiled.report.captured_sizes == ()
    prompt = random_ids((2, 3), model.config.vocab_size, seed=17)
    assert torch.equal(generate(compiled, prompt, 3, ignore_eos=True),
                       generate(model, prompt, 3, ignore_eos=True))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_compiled_models_on_cuda_graphs_generate_eagers_tokens(kind: str) -> None:
    """On CUDA graphs, with EOS firing at different steps so that the batch shrinks."""
    hf = build_hf(kind, seed=21).cuda()
    model = from_hf(hf)
    compiled = compile_model(model, config=CompileConfig(device="cuda",
                                                         capture_sizes=CAPTURE_SIZES))
    assert compiled.report.decode_graph_sizes == CAPTURE_SIZES  # (and prefill buckets)
    assert set(CAPTURE_SIZES) <= set(compiled.report.captured_sizes)
    assert compiled.report.graph_memory_bytes >= 0 and compiled.report.capture_seconds > 0
    for batch in (3, 5, 9):
        ids = random_ids((batch, 6), hf.config.vocab_size, seed=batch).cuda()
        free = generate_both(kind, model, compiled, ids, 8, ignore_eos=True)[0]
        eos = staggered_eos(free.cpu())
        eager, tokens, _ = generate_both(kind, model, compiled, ids, 8, eos_token_id=eos,
                                         pad_token_id=0)
        assert torch.equal(tokens, eager), batch
        assert torch.equal(eager.cpu(), finish_at_eos(free.cpu(), eos, 0)), batch
    options = dict(do_sample=True, temperature=2.0, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    eager, tokens, _ = generate_both(kind, model, compiled, ids, 8, **options)
    assert torch.equal(tokens, eager)
