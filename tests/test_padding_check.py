"""Padding proven, not assumed (issue 14 item 2): each bucket's padded forward is checked at
capture against the exact-size forward on the real rows; a model whose rows interact replays
only at exact sizes, with one warning naming the reason. Runs through the replay simulator,
which refills padding with fresh random data before every replay (as stale device memory)."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import CompileConfig, compile_model
from models import from_hf
from tests.model_oracle import build_hf
from runtime import runner as runner_module
from runtime.padding_check import padding_leak
from runtime.runner import BucketRunner
from runtime.step import StepMode

SIZES = (1, 2, 4)
SIMULATED = CompileConfig(device="cpu", capture_sizes=SIZES, simulate_capture=True)
HIDDEN = 6


class Rows(torch.nn.Module):
    """x (tokens, HIDDEN) -> a per-row projection mixed across rows as `mix` says."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = mix
        self.proj = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x).tanh()
        if self.mix == "sum":            # every row reads every row, padding included
            return h + h.sum(0), h.sum(0)
        if self.mix == "attention":      # token-to-token softmax attention, no mask
            return (h @ h.T).softmax(-1) @ h, h.mean(0)
        if self.mix == "cumsum":         # each row reads earlier rows only: padding comes later
            return h.cumsum(0), h[0]
        if self.mix == "reverse":        # each row reads later rows: padding leaks in
            return h.flip(0).cumsum(0).flip(0), h[0]
        return h * 2, h[0]               # rows independent


LEAKS = {"sum": True, "attention": True, "cumsum": False, "reverse": True, "rowwise": False}


def compiled_rows(mix: str) -> tuple[object, BucketRunner]:
    compiled = compile_model(Rows(mix).eval(), (torch.randn(4, HIDDEN),), config=SIMULATED)
    runner = compiled._run
    assert isinstance(runner, BucketRunner)
    return compiled, runner


def test_rows_that_sum_over_the_batch_replay_only_at_exact_sizes(caplog) -> None:
    """Without the check, 3 rows padded to bucket 4 gave `x.sum(0)` off by ~0.4."""
    model = Rows("sum").eval()
    with caplog.at_level(logging.WARNING, logger="runtime.padding_check"):
        compiled = compile_model(model, (torch.randn(4, HIDDEN),), config=SIMULATED)
    warnings = [r.getMessage() for r in caplog.records if "rows interact" in r.getMessage()]
    assert len(warnings) == 1
    assert "bucket 2 with 2 real rows" not in warnings[0]  # 2 is a bucket: nothing padded
    assert "bucket 4 with 3 real rows: output 0 differs" in warnings[0]
    assert "captured at exact sizes only" in compiled.report.capture_note
    runner = compiled._run
    x = torch.randn(3, HIDDEN)
    assert runner.dispatch(3, (x,)).mode is StepMode.EAGER
    assert runner.dispatch(4, (torch.randn(4, HIDDEN),)).mode is StepMode.PIECEWISE
    with torch.no_grad():
        for got, want in zip(compiled(x), model(x)):
            torch.testing.assert_close(got, want)


def test_row_independent_models_pad_and_warn_nothing(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="runtime.padding_check"):
        compiled, runner = compiled_rows("rowwise")
    assert not [r for r in caplog.records if "rows interact" in r.getMessage()]
    assert compiled.report.capture_note == ""
    assert runner.dispatch(3, (torch.randn(3, HIDDEN),)).mode is StepMode.PIECEWISE


def test_fxkiln_models_declare_their_rows_independent_and_skip_the_check(monkeypatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the padding check ran for a model that declares its rows "
                             "independent")

    monkeypatch.setattr(runner_module, "exact_sizes_reason", refuse)
    model = from_hf(build_hf("llama", seed=3))
    assert model.rows_independent
    compiled = compile_model(model, config=CompileConfig(
        device="cpu", capture_sizes=(1, 2), prefill_capture_sizes=(), simulate_capture=True))
    assert compiled.report.captured_sizes == (1, 2)


def test_the_check_leaves_the_static_buffers_as_it_found_them() -> None:
    _, runner = compiled_rows("sum")
    buffer = runner._inputs.buffers[0]
    before = buffer.clone()
    padding_leak(runner._inputs, lambda tokens, args: runner._run_eagerly(*args),
                               SIZES)
    assert torch.equal(buffer, before)


@settings(max_examples=12, deadline=None)
@given(mix=st.sampled_from(sorted(LEAKS)), tokens=st.integers(1, 4), seed=st.integers(0, 99))
def test_compiled_rows_equal_eager_whatever_the_rows_do(mix: str, tokens: int, seed: int) -> None:
    """Property: for every mixing of rows and every token count, compiled == eager (padding
    refilled at random before each replay); exact sizes only exactly when padding leaks."""
    compiled, runner = compiled_rows(mix)
    assert bool(runner.exact_sizes_only) is LEAKS[mix]
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for got, want in zip(compiled(x), compiled.model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tolerance_of_the_check_holds_row_independent_models_in_every_dtype(
        dtype: torch.dtype) -> None:
    model = Rows("rowwise").eval().to(dtype)
    compiled = compile_model(model, (torch.randn(4, HIDDEN, dtype=dtype),), config=SIMULATED)
    assert compiled.report.capture_note == ""
