"""Token choice: top-k / top-p filtering, seeded draws, and the checks on sampling options."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from runtime.sampling import SamplingParams, TokenChooser, filter_logits, sampling_probs


def distinct_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """(rows, vocab) logits with no ties: a random permutation of spaced values per row."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.arange(vocab, dtype=torch.float32) * 0.37 - vocab * 0.1
    return torch.stack([values[torch.randperm(vocab, generator=generator)] for _ in range(rows)])


def kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered]


@given(rows=st.integers(1, 4), vocab=st.integers(2, 40), k=st.integers(1, 50),
       seed=st.integers(0, 2**16))
def test_top_k_keeps_exactly_the_k_highest_logits(rows: int, vocab: int, k: int,
                                                  seed: int) -> None:
    logits = distinct_logits(rows, vocab, seed)
    filtered = filter_logits(logits, top_k=k)
    for row, kept_ids in zip(logits, kept(filtered)):
        ranked = sorted(range(vocab), key=lambda i: -float(row[i]))
        assert kept_ids == set(ranked[:k])
    finite = torch.isfinite(filtered)
    assert torch.equal(filtered[finite], logits[finite])  # kept logits are unchanged


@given(rows=st.integers(1, 4), vocab=st.integers(2, 40),
       top_p=st.floats(0.01, 1.0, exclude_min=False), seed=st.integers(0, 2**16))
def test_top_p_keeps_the_shortest_head_reaching_top_p(rows: int, vocab: int, top_p: float,
                                                      seed: int) -> None:
    logits = distinct_logits(rows, vocab, seed)
    filtered = filter_logits(logits, top_p=top_p)
    for row, kept_ids in zip(logits, kept(filtered)):
        probs = row.double().softmax(dim=0).tolist()
        ranked = sorted(range(vocab), key=lambda i: -probs[i])
        head = ranked[:len(kept_ids)]
        assert kept_ids == set(head)                                  # a prefix of the ranking
        mass = sum(probs[i] for i in head)
        assert mass >= top_p - 1e-5                                   # reaches top_p
        assert mass - probs[head[-1]] < top_p + 1e-5                  # and is the shortest


@given(rows=st.integers(1, 3), vocab=st.integers(2, 30), k=st.integers(1, 10),
       top_p=st.floats(0.05, 1.0), temperature=st.floats(0.1, 5.0), seed=st.integers(0, 2**16))
def test_sampled_tokens_never_leave_the_filtered_set(rows: int, vocab: int, k: int, top_p: float,
                                                     temperature: float, seed: int) -> None:
    logits = distinct_logits(rows, vocab, seed)
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=k, top_p=top_p,
                            seed=seed)
    allowed = kept(filter_logits(logits / temperature, top_k=k, top_p=top_p))
    top_k_sets = kept(filter_logits(logits, top_k=k))  # temperature keeps the order
    choose = TokenChooser(params, rows, torch.device("cpu"))
    for _ in range(20):
        for token, allowed_ids, top_ids in zip(choose(logits).tolist(), allowed, top_k_sets):
            assert token in allowed_ids and token in top_ids


def test_draws_follow_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 4000
    for temperature in (0.5, 2.0):
        params = SamplingParams(do_sample=True, temperature=temperature, seed=3)
        choose = TokenChooser(params, batch=draws, device=torch.device("cpu"))
        tokens = choose(logits.expand(draws, -1))
        counts = torch.bincount(tokens, minlength=4).double()
        expected = (logits[0] / temperature).double().softmax(dim=0) * draws
        sigma = (expected * (1 - expected / draws)).sqrt()
        assert ((counts - expected).abs() <= 5 * sigma).all(), (temperature, counts, expected)


def test_a_row_draws_the_same_token_whatever_rows_run_beside_it() -> None:
    logits = distinct_logits(5, 30, seed=4)
    params = SamplingParams(do_sample=True, temperature=3.0, seed=9)
    everyone = TokenChooser(params, 5, torch.device("cpu"))(logits)
    rows = torch.tensor([1, 4])
    some = TokenChooser(params, 5, torch.device("cpu"))(logits[rows], rows)
    assert torch.equal(some, everyone[rows])


def test_the_same_seed_draws_the_same_tokens_and_another_seed_others() -> None:
    logits = distinct_logits(8, 50, seed=5)

    def draw(seed: int) -> torch.Tensor:
        choose = TokenChooser(SamplingParams(do_sample=True, temperature=10.0, seed=seed), 8,
                              torch.device("cpu"))
        return torch.stack([choose(logits) for _ in range(4)])

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_sampling_probs_are_a_distribution_over_the_kept_tokens() -> None:
    logits = distinct_logits(3, 20, seed=6)
    params = SamplingParams(do_sample=True, temperature=0.7, top_k=5, top_p=0.8)
    probs = sampling_probs(logits, params)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(3))
    assert kept(probs.log()) == kept(filter_logits(logits / 0.7, top_k=5, top_p=0.8))


@given(temperature=st.one_of(st.floats(max_value=0.0, allow_nan=False),
                             st.sampled_from([math.nan, math.inf])))
def test_temperature_must_be_positive(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
        SamplingParams(do_sample=True, temperature=temperature)


@pytest.mark.parametrize("options, message", [
    (dict(top_k=0), "top_k: expected an int >= 1"),
    (dict(top_k=2.5), "top_k: expected an int >= 1"),
    (dict(top_p=0.0), r"top_p: expected a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p: expected a number in \(0, 1\]"),
    (dict(seed="7"), "seed: expected an int"),
    (dict(do_sample=1), "do_sample: expected a bool"),
])
def test_bad_sampling_options_say_what_was_expected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)
