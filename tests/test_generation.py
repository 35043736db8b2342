"""generate on fxkiln's own models, eager: EOS (against Hugging Face), batch compaction, seeded
sampling, encoder-decoder prefill, and the checks on its arguments."""
from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import transformers
from hypothesis import given
from hypothesis import strategies as st

from models import ProjectModel, from_hf
from runtime import generate, prompts
from runtime.generation import DecodeSession
from tests.generation_helpers import (
    RecordingModel,
    finish_at_eos,
    finish_steps,
    staggered_eos,
)
from tests.model_oracle import (
    build_hf,
    decoder_prompt,
    hf_generate_eos,
    random_ids,
)

STEPS = 8


@pytest.fixture(scope="module")
def llama() -> tuple[transformers.PreTrainedModel, ProjectModel]:
    hf = build_hf("llama", seed=11, num_key_value_heads=2)
    return hf, from_hf(hf)


@pytest.fixture(scope="module")
def bart() -> tuple[transformers.PreTrainedModel, ProjectModel]:
    hf = build_hf("bart", seed=12)
    return hf, from_hf(hf)


def run(model: Any, kind: str, ids: torch.Tensor, steps: int = STEPS,
        **options: Any) -> torch.Tensor:
    """generate for a decoder-only (`ids` = prompt) or encoder-decoder (`ids` = source) model."""
    if kind == "bart":
        return generate(model, None, steps, encoder_input_ids=ids, **options)
    return generate(model, ids, steps, **options)


def hf_run(hf: transformers.PreTrainedModel, kind: str, ids: torch.Tensor,
           **options: Any) -> torch.Tensor:
    if kind == "bart":
        return hf_generate_eos(hf, decoder_prompt(hf, ids.shape[0]), STEPS, encoder_ids=ids,
                               **options)
    return hf_generate_eos(hf, ids, STEPS, **options)


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_greedy_with_eos_equals_hf_as_sequences_finish_at_different_steps(
        kind: str, request: pytest.FixtureRequest) -> None:
    hf, model = request.getfixturevalue(kind)
    ids = random_ids((5, 4 if kind == "llama" else 6), hf.config.vocab_size, seed=21)
    free = run(model, kind, ids, ignore_eos=True)
    eos = staggered_eos(free)
    steps = finish_steps(free, eos)
    assert None in steps and len({s for s in steps if s is not None}) >= 2, (free, eos)
    ours = run(model, kind, ids, eos_token_id=eos, pad_token_id=0)
    assert ours.shape == (5, STEPS)
    assert torch.equal(ours, hf_run(hf, kind, ids, eos_token_id=eos, pad_token_id=0))
    assert torch.equal(ours, finish_at_eos(free, eos, 0))


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_generation_stops_when_every_sequence_has_finished(
        kind: str, request: pytest.FixtureRequest) -> None:
    hf, model = request.getfixturevalue(kind)
    ids = random_ids((4, 5), hf.config.vocab_size, seed=22)
    free = run(model, kind, ids, ignore_eos=True)
    eos = sorted({int(free[row, row % 3]) for row in range(4)})  # every row ends by step 2
    ours = run(model, kind, ids, eos_token_id=eos, pad_token_id=0)
    assert ours.shape[1] == max(s for s in finish_steps(free, eos) if s is not None) + 1 <= 3
    assert torch.equal(ours, hf_run(hf, kind, ids, eos_token_id=eos, pad_token_id=0))
    assert torch.equal(ours, finish_at_eos(free, eos, 0))


def test_eos_and_pad_default_to_the_model_config_as_in_hf() -> None:
    hf = build_hf("llama", seed=11, num_key_value_heads=2, pad_token_id=0)
    model = from_hf(hf)
    prompt = random_ids((3, 4), hf.config.vocab_size, seed=3)
    free = generate(model, prompt, STEPS, ignore_eos=True)
    assert hf.config.eos_token_id == 2
    assert 0 < sum(s is not None for s in finish_steps(free, [2])) < 3, free  # EOS fires
    ours = generate(model, prompt, STEPS)
    assert torch.equal(ours, hf_generate_eos(hf, prompt, STEPS))
    assert torch.equal(ours, finish_at_eos(free, [2], 0))


def test_eos_without_a_pad_id_pads_with_eos_as_hf_and_warns_once(
        llama: tuple, caplog: pytest.LogCaptureFixture) -> None:
    hf, model = llama
    assert hf.config.pad_token_id is None and hf.config.eos_token_id is not None
    prompt = random_ids((5, 4), hf.config.vocab_size, seed=21)
    free = generate(model, prompt, STEPS, ignore_eos=True)
    eos = staggered_eos(free)
    assert None in finish_steps(free, eos) and len(set(finish_steps(free, eos))) >= 2
    hf.generation_config.eos_token_id = model.config.eos_token_id = eos
    prompts._warn_pad_is_eos.cache_clear()  # as in a fresh process
    try:
        with caplog.at_level(logging.WARNING, logger="runtime.prompts"):
            ours = generate(model, prompt, STEPS)
            again = generate(model, prompt, STEPS)
        expected = hf_generate_eos(hf, prompt, STEPS)  # HF pads with the first EOS id too
    finally:
        hf.generation_config.eos_token_id = model.config.eos_token_id = 2
    assert torch.equal(ours, expected) and torch.equal(again, ours)
    assert torch.equal(ours, finish_at_eos(free, eos, eos[0]))
    warned = [r for r in caplog.records if "padded with eos_token_id" in r.getMessage()]
    assert len(warned) == 1  # two calls, one warning
    with pytest.raises(ValueError, match="eos_token_id: expected an int or a non-empty"):
        generate(model, prompt, 3, eos_token_id=[], pad_token_id=0)


@given(data=st.data(), batch=st.integers(1, 6), do_sample=st.booleans(),
       seed=st.integers(0, 2**16))
def test_stopping_at_eos_only_pads_what_follows(llama: tuple, data: st.DataObject, batch: int,
                                                do_sample: bool, seed: int) -> None:
    """Finished sequences leave the batch; the survivors' tokens, greedy or sampled with a seed,
    must be those of the same run without EOS."""
    hf, model = llama
    prompt = random_ids((batch, 3), hf.config.vocab_size, seed=seed)
    sampling = dict(do_sample=do_sample, temperature=2.0, seed=seed)
    free = generate(model, prompt, 6, ignore_eos=True, **sampling)
    seen = sorted(set(free.flatten().tolist()))
    eos = data.draw(st.lists(st.sampled_from(seen), min_size=1, max_size=2), label="eos")
    stopped = generate(model, prompt, 6, eos_token_id=eos, pad_token_id=-1, **sampling)
    assert torch.equal(stopped, finish_at_eos(free, eos, -1))


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_finished_sequences_leave_the_batch(kind: str, request: pytest.FixtureRequest) -> None:
    hf, model = request.getfixturevalue(kind)
    ids = random_ids((5, 3), hf.config.vocab_size, seed=21)
    free = run(model, kind, ids, ignore_eos=True)
    eos = staggered_eos(free)
    steps = finish_steps(free, eos)
    recording = RecordingModel(model)
    assert torch.equal(run(recording, kind, ids, eos_token_id=eos, pad_token_id=0),
                       finish_at_eos(free, eos, 0))
    # EOS is read one step late: a sequence that finishes at step s runs step s + 1 too (its
    # token discarded), then leaves
    running = [sum(s is None or s >= step - 1 for s in steps) for step in range(1, STEPS)]
    decode_tokens = [tokens for tokens, _ in recording.calls[1:]]
    assert decode_tokens == running and decode_tokens[-1] < 5
    if kind == "bart":  # the encoder runs once, in the prefill step
        assert [encoder for _, encoder in recording.calls] == [5 * 3] + [0] * (STEPS - 1)


@given(seed=st.integers(0, 2**16), temperature=st.floats(0.05, 20.0))
def test_top_k_one_samples_the_greedy_tokens(llama: tuple, seed: int, temperature: float) -> None:
    hf, model = llama
    prompt = random_ids((3, 4), hf.config.vocab_size, seed=seed)
    sampled = generate(model, prompt, 6, ignore_eos=True, do_sample=True, top_k=1,
                       temperature=temperature, seed=seed)
    assert torch.equal(sampled, generate(model, prompt, 6, ignore_eos=True))


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_seeded_sampling_repeats_and_other_seeds_differ(kind: str,
                                                        request: pytest.FixtureRequest) -> None:
    hf, model = request.getfixturevalue(kind)
    ids = random_ids((3, 4), hf.config.vocab_size, seed=23)
    options = dict(ignore_eos=True, do_sample=True, temperature=3.0, top_p=0.95)
    first = run(model, kind, ids, seed=5, **options)
    assert torch.equal(first, run(model, kind, ids, seed=5, **options))
    assert not torch.equal(first, run(model, kind, ids, seed=6, **options))
    assert not torch.equal(first, run(model, kind, ids, ignore_eos=True))  # it does sample
    assert run(model, kind, ids, seed=None, **options).shape == (3, STEPS)


def test_zero_temperature_is_refused_before_any_step(llama: tuple) -> None:
    recording = RecordingModel(llama[1])
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
        generate(recording, random_ids((1, 2), 101, seed=0), 3, do_sample=True, temperature=0.0)
    assert recording.calls == []


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_a_decode_step_over_some_rows_gives_their_logits_of_a_full_step(
        kind: str, request: pytest.FixtureRequest) -> None:
    hf, model = request.getfixturevalue(kind)
    batch, encoder_len = 4, (5 if kind == "bart" else None)
    prompt = random_ids((batch, 3), hf.config.vocab_size, seed=24)
    source = random_ids((batch, 5), hf.config.vocab_size, seed=25) if encoder_len else None
    tokens = random_ids((batch,), hf.config.vocab_size, seed=26)
    sessions = [DecodeSession(model, batch, 3, 4, encoder_len) for _ in range(2)]
    for session in sessions:
        session.prefill(prompt, source)
    full = sessions[0].decode(tokens)                      # (batch, vocab)
    rows = torch.tensor([0, 2, 3])
    some = sessions[1].decode(tokens[rows], rows)          # (3, vocab)
    torch.testing.assert_close(some, full[rows], atol=1e-5, rtol=0)
    rows = torch.tensor([2, 3])                            # and again, with row 0 gone too
    torch.testing.assert_close(sessions[1].decode(tokens[rows], rows),
                               sessions[0].decode(tokens)[rows], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expected tokens of shape \(2,\)"):
        sessions[1].decode(tokens, rows)
