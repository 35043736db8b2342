"""benchmarks/prefill.py without running models: workloads, ratios, token agreement, table."""
from __future__ import annotations

from typing import Any

import torch

from benchmarks import prefill
from benchmarks.prefill_variants import MIXED, left_padded, prompt_lengths


def row(variant: str, batch: int, ttft_ms: float, tokens_per_s: float, hashes: list[str],
        workload: str = "1024") -> dict[str, Any]:
    return {"model": "llama-1b", "variant": variant, "workload": workload, "batch": batch,
            "status": "ok", "ttft_ms": ttft_ms, "tokens_per_s": tokens_per_s,
            "sequence_hashes": hashes}


def test_workloads_and_left_padding() -> None:
    assert prompt_lengths("128", 8) == [128] * 8
    assert prompt_lengths("mixed", 3) == list(MIXED[:3]) and len(set(MIXED)) == len(MIXED)
    ids, mask = left_padded([torch.tensor([5, 6, 7]), torch.tensor([9])], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_ratios_token_agreement_and_targets() -> None:
    rows = [row("hf-eager", 8, 43.0, 100.0, ["a", "b"]),
            row("hf-compile", 8, 40.0, 200.0, ["a", "b"]),
            row("fxkiln-graphs", 8, 21.5, 400.0, ["a", "x"]),
            row("hf-eager", 1, 15.2, 50.0, ["c"]),
            row("fxkiln-graphs", 1, 17.8, 60.0, ["c"]),
            {"model": "llama-1b", "variant": "fxkiln-chunked", "workload": "mixed", "batch": 8,
             "status": "failed", "error": "Traceback\nValueError: boom"}]
    result = prefill.finalize({"rows": rows})
    ours = rows[2]
    assert ours["ttft_over"] == {"hf-eager": 2.0, "hf-compile": 40.0 / 21.5}
    assert ours["tokens_per_s_over"] == {"hf-eager": 4.0, "hf-compile": 2.0}
    assert ours["same_tokens"] == 1 and rows[0]["same_tokens"] == 2
    targets = result["targets"]
    assert targets["ttft 1024 batch 8: fxkiln-graphs >= 1.5x hf-eager"]["met"]
    assert not targets["ttft 1024 batch 1: fxkiln-graphs >= 1.0x hf-eager"]["met"]
    assert prefill.finalize(result) == result  # idempotent
    text = prefill.table(result)
    assert "| 1024 | 8 | fxkiln-graphs | 21.50 | 2.00x | 1.86x | 400.0 | 4.00x | 2.00x | 1/2 |" \
        in text
    assert "mixed batch 8 fxkiln-chunked: failed: `ValueError: boom`" in text
    widths = {line.count("|") for line in text.splitlines() if line.startswith("|")}
    assert widths == {12}
