"""The decode A/B benchmark: its switches change the launch choice only inside their block, its
summary, and one CPU run end to end (tiny preset)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import compiler.pipeline
from benchmarks import decode_ab
from runtime.kernels import decode_attention, triton_kernels


def test_dependent_form_switches_launches_off_inside_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_kernels, "dependent_launch", lambda device: True)
    cuda = torch.device("cuda")
    with decode_ab.dependent_form(False):
        assert triton_kernels.dependent_options(cuda) == {}
    assert triton_kernels.dependent_options(cuda) == {"DEPENDENT": True, "launch_pdl": True}
    with decode_ab.dependent_form(True):     # as the device allows
        assert triton_kernels.dependent_options(cuda)["launch_pdl"] is True


def test_reduce_form_sets_every_tuning_and_restores() -> None:
    before = dict(decode_attention.DECODE_TUNING), decode_attention.DEFAULT_TUNING
    for fused in (True, False):
        with decode_ab.reduce_form(fused):
            tunings = [*decode_attention.DECODE_TUNING.values(), decode_attention.DEFAULT_TUNING]
            assert {tuning.fuse_reduce for tuning in tunings} == {fused}
    assert (dict(decode_attention.DECODE_TUNING), decode_attention.DEFAULT_TUNING) == before


def test_prologue_form_adds_or_drops_the_pass_and_restores() -> None:
    default = compiler.pipeline.DEFAULT_PIPELINE
    with decode_ab.prologue_form(True):
        folded = compiler.pipeline.DEFAULT_PIPELINE
    with decode_ab.prologue_form(False):
        plain = compiler.pipeline.DEFAULT_PIPELINE
    assert compiler.pipeline.DEFAULT_PIPELINE == default
    assert "norm_prologue" in folded and "norm_prologue" not in plain
    assert tuple(name for name in folded if name != "norm_prologue") == plain
    assert folded.index("norm_prologue") == folded.index("linear_epilogue") + 1


def test_summary_groups_the_interleaved_repeats() -> None:
    rows = [{"model": "m", "batch": 1, "fuse_reduce": form, "step_ms": ms, "kernels_per_step": k}
            for form, ms, k in ((True, 3.0, 10), (False, 2.0, 20), (True, 1.0, 11),
                                (False, 5.0, 21), (True, 2.0, 12))]
    on, off = decode_ab.summarize("fuse_reduce", rows)
    assert on["fuse_reduce"] is True and on["step_ms_runs"] == [3.0, 1.0, 2.0]
    assert on["step_ms_min"] == 1.0 and on["step_ms_median"] == 2.0
    assert on["kernels_per_step"] == 12                      # the last repeat's census
    assert off["step_ms_min"] == 2.0 and off["step_ms_median"] == 3.5


@pytest.mark.slow
def test_a_cpu_run_writes_both_forms(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    decode_ab.main(["--switch", "dependent_launch", "--device", "cpu", "--models", "llama-1b",
                    "--batches", "1", "--repeats", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["switch"] == "dependent_launch"
    assert [form["dependent_launch"] for form in result["forms"]] == [True, False]
    assert all(form["step_ms_min"] > 0 for form in result["forms"])
