"""The end-to-end generate benchmark: its figures and targets, and a failing variant recorded as
a failed row (no torch.compile here: too slow; the GPU run exercises the compiled variants)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from benchmarks import generate_e2e


def row(variant: str, batch: int, tokens_per_s: float, model: str = "llama-1b") -> dict[str, Any]:
    return {"model": model, "variant": variant, "batch": batch, "status": "ok",
            "tokens_per_s": tokens_per_s, "step_ms": 1e3 / tokens_per_s}


def test_finalize_speedups_and_targets() -> None:
    result = generate_e2e.finalize({"rows": [
        row("hf-eager", 1, 100.0), row("hf-compile-reduce-overhead", 1, 400.0),
        row("hf-fxkiln", 1, 600.0),
        row("hf-fxkiln", 1, 300.0, model="bart-large"),
        {"model": "bart-large", "variant": "hf-compile-reduce-overhead", "batch": 1,
         "status": "failed", "error": "accessing tensor output of CUDAGraphs that has been "
                                      "overwritten by a subsequent run"}]})
    ours = next(r for r in result["rows"] if r["variant"] == "hf-fxkiln" and r["batch"] == 1
                and r["model"] == "llama-1b")
    assert ours["speedup_over"] == pytest.approx({"hf-eager": 6.0,
                                                  "hf-compile-reduce-overhead": 1.5})
    targets = result["targets"]
    assert targets["llama-1b batch 1: hf-fxkiln over reduce-overhead"]["met"] is True
    bart = targets["bart-large batch 1: hf-fxkiln over reduce-overhead"]
    assert bart == {"measured": None, "peer_status": "failed", "met": True}


def test_a_failing_variant_becomes_a_failed_row(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    def failing(*args: Any) -> Any:
        raise RuntimeError("accessing tensor output of CUDAGraphs that has been overwritten")

    monkeypatch.setattr(generate_e2e, "time_batch", failing)
    generate_e2e.child_rows("cpu", "llama-1b", "hf-compile-reduce-overhead", [1, 2],
                            "float32", 1)
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith(generate_e2e.ROW_PREFIX)]
    assert len(lines) == 2 and all('"status": "failed"' in line for line in lines)
    assert "overwritten" in lines[0]


def test_tokens_are_compared_with_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """A variant whose forward favours one token disagrees with eager, and the row says so."""
    from models.presets import hf_model

    def favouring(variant: str, forward: Any, batch: int) -> tuple[Any, None]:
        def biased(*args: Any, **kwargs: Any) -> Any:
            outputs = forward(*args, **kwargs)
            outputs.logits[..., 7] += 1e4
            return outputs
        return biased, None

    monkeypatch.setattr(generate_e2e, "compiled_forward", favouring)
    measured = generate_e2e.time_batch(hf_model("llama-tiny"), "hf-fxkiln", 1, 1,
                                       torch.device("cpu"))
    assert measured["tokens_equal_eager"] is False and measured["token_agreement"] < 0.5
    assert measured["tokens_per_s"] > 0 and measured["step_ms"] > 0
