"""benchmarks/tensor_parallel.py's verdicts, without starting ranks: the token comparison and
when a row counts as ok (the GPU run is judged by these, so a wrong "yes" would hide a bug)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load("tensor_parallel")
key = bench.key


@given(data=st.data(), batch=st.integers(1, 4), steps=st.integers(1, 6))
def test_token_comparison_finds_the_first_differing_step(data: st.DataObject, batch: int,
                                                         steps: int) -> None:
    reference = data.draw(st.lists(st.lists(st.integers(0, 9), min_size=steps, max_size=steps),
                                   min_size=batch, max_size=batch))
    changed = data.draw(st.sets(st.tuples(st.integers(0, batch - 1), st.integers(0, steps - 1))))
    tokens = [row[:] for row in reference]
    for sequence, step in changed:
        tokens[sequence][step] += 1
    verdict = bench.compare_tokens(reference, tokens)
    assert verdict["equal"] == (not changed)
    assert verdict["first_difference"] == min((s for _, s in changed), default=None)
    assert verdict["equal_fraction"] == pytest.approx(1 - len(changed) / (batch * steps))


PLAN = bench.Plan(device_type="cpu", preset="llama-tiny", batches=(2,), variants=(),
                  prompt_len=4, new_tokens=3, timing_dtype="float32",
                  token_dtypes=("float32", "bfloat16"), timeout_s=1.0, port=0)
TOKENS = [[5, 6, 7], [8, 9, 10]]


def complete_phase(variant: str = "passes+graphs") -> Any:
    phase = bench.Phase(variant, data=[{}, {}])
    for rank in (0, 1):
        for tp in ((1, 2) if rank == 0 else (2,)):
            data = phase.data[rank]
            data.setdefault("step_ms", {})[key(variant, tp, "float32", 2)] = 2.0 / tp
            data.setdefault("compile", {})[key(variant, tp, "float32")] = {
                "compile_s": 1.0, "capture_s": 0.5, "graph_memory_bytes": 0, "pieces": 5,
                "captured_sizes": [1, 2], "collectives_in_graphs": 6 if tp == 2 else 0}
            for dtype in PLAN.token_dtypes:
                data.setdefault("tokens", {})[key(variant, tp, dtype, 2)] = TOKENS
    return phase


def test_a_complete_phase_with_equal_tokens_is_ok() -> None:
    row = bench.make_row(complete_phase(), PLAN, "llama-tiny", 2)
    assert row["status"] == "ok" and row["error"] is None
    assert row["float32_tokens_equal"] is True and row["tp2_ranks_agree"] is True
    assert row["tp1_over_tp2"] == pytest.approx(2.0)
    assert bench.graphs_summary([complete_phase()])["captured"] is True


def test_rows_fail_on_rank_disagreement_a_compile_failure_or_a_lost_rank() -> None:
    phase = complete_phase()
    phase.data[1]["tokens"][key("passes+graphs", 2, "bfloat16", 2)] = [[5, 6, 7], [8, 9, 0]]
    assert bench.make_row(phase, PLAN, "llama-tiny", 2)["status"] == "failed"

    phase = complete_phase()
    phase.data[0]["failure"] = {key("passes+graphs", 2): "rank 1: PieceCaptureError: boom"}
    row = bench.make_row(phase, PLAN, "llama-tiny", 2)
    assert row["status"] == "failed" and "boom" in row["error"]
    summary = bench.graphs_summary([phase])
    assert summary["captured"] is False and "boom" in summary["error"]

    phase = complete_phase()
    del phase.data[0]["step_ms"][key("passes+graphs", 2, "float32", 2)]
    phase.errors[1] = "no result in time; last stage: compiling"
    row = bench.make_row(phase, PLAN, "llama-tiny", 2)
    assert row["status"] == "failed" and "rank 1" in row["error"]
