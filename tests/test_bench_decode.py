"""The decode benchmark's pure helpers and its crash isolation (no torch.compile here: too slow)."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import decode_report as report
from benchmarks.decode import run_child_rows
from benchmarks.decode_variants import CONTEXT, decode_weight_bytes, kv_read_bytes
from models.presets import hf_model


def ok_row(variant: str, batch: int, step_ms: float, model: str = "bart-large",
           argmax: list[int] | None = None) -> dict[str, Any]:
    row = {"model": model, "variant": variant, "batch": batch, "status": "ok", "step_ms": step_ms,
           "weight_bytes": 500_000_000, "compile_s": None, "capture_s": None,
           "graph_memory_bytes": None}
    if argmax is not None:
        row.update(first_step_argmax=argmax, first_step_logits=[[float(a) for a in argmax]])
    return row


def test_finalize_ratios_bound_targets_and_agreement() -> None:
    result = {"copy_bandwidth_runs": [4e12, 5e12, 3e12], "rows": [
        ok_row("hf-eager", 1, 9.0, argmax=[5, 6, 7, 8]),
        ok_row("hf-compile", 1, 5.0, argmax=[5, 6, 7, 9]),
        ok_row("fxkiln-graphs", 1, 1.0, argmax=[5, 6, 0, 0]),
        report.failed_row("bart-large", "hf-compile-reduce-overhead", 1, "failed", "Segfault"),
        ok_row("hf-eager", 8, 6.0, model="llama-1b"),
    ]}
    report.finalize(result)
    rows = {report.row_key(row): row for row in result["rows"]}
    graphs = rows[("bart-large", "fxkiln-graphs", 1)]
    assert graphs["speedup_over"] == pytest.approx({"hf-eager": 9.0, "hf-compile": 5.0})
    assert graphs["weight_read_bound_ms"] == pytest.approx(1e3 * 5e8 / 4e12)  # median bandwidth
    assert graphs["bound_fraction"] == pytest.approx(graphs["weight_read_bound_ms"] / 1.0)
    assert graphs["argmax_agreement"] == 0.5 and graphs["max_abs_logit_diff"] == 8.0
    assert rows[("bart-large", "hf-compile", 1)]["argmax_agreement"] == 0.75
    assert "first_step_argmax" not in graphs and result["reference"]["bart-large|1"]["argmax"]
    assert "speedup_over" not in rows[("bart-large", "hf-compile-reduce-overhead", 1)]
    assert rows[("llama-1b", "hf-eager", 8)]["speedup_over"] == {}  # no peer at that batch
    met = {name: target["met"] for name, target in result["targets"].items()}
    assert met == {"bart-large batch 1: fxkiln-graphs over hf-eager": True,
                   "bart-large batch 1: fxkiln-graphs over hf-compile": True,
                   "bart-large batch 1: hf-fxkiln over hf-compile-reduce-overhead": None,
                   "llama-1b batch 1: hf-fxkiln over hf-compile-reduce-overhead": None}
    again = report.finalize(result)  # idempotent: fingerprints gone, figures unchanged
    assert again["rows"][0].get("argmax_agreement") == result["rows"][0].get("argmax_agreement")


def test_targets_missed_or_missing() -> None:
    rows = [ok_row("hf-eager", 1, 9.0), ok_row("fxkiln-graphs", 1, 2.0)]
    result = report.finalize({"rows": rows})
    checked = result["targets"]
    assert checked["bart-large batch 1: fxkiln-graphs over hf-eager"]["met"] is False
    assert checked["bart-large batch 1: fxkiln-graphs over hf-compile"]["met"] is None
    assert result["copy_bandwidth_bytes_per_s"] is None
    assert "bound_fraction" not in result["rows"][0]


def test_merge_replaces_same_key_keeps_the_rest_in_variant_order() -> None:
    old = [ok_row("fxkiln-graphs", 1, 3.0), ok_row("hf-eager", 1, 9.0)]
    merged = report.merge_rows(old, [ok_row("fxkiln-graphs", 1, 1.0), ok_row("hf-compile", 1, 5.0)])
    assert [(row["variant"], row["step_ms"]) for row in merged] == [
        ("hf-eager", 9.0), ("hf-compile", 5.0), ("fxkiln-graphs", 1.0)]


def test_weight_read_bound_arithmetic() -> None:
    assert report.weight_read_bound_ms(500_000_000, 4.3e12) == pytest.approx(0.1163, abs=1e-4)
    with pytest.raises(ValueError, match="positive bandwidth"):
        report.weight_read_bound_ms(1, 0.0)


def test_table_shows_failures_and_ratios() -> None:
    result = report.finalize({"copy_bandwidth_runs": [1e12], "rows": [
        ok_row("hf-eager", 1, 9.0), ok_row("fxkiln-graphs", 1, 3.0),
        report.failed_row("bart-large", "hf-compile-reduce-overhead", 1, "failed",
                          "Traceback ...\nRuntimeError: CUDA graph capture failed")]})
    lines = report.table(result).splitlines()
    assert len({line.count("|") for line in lines if line.startswith("|")}) == 1
    graphs_line = next(line for line in lines if "fxkiln-graphs" in line)
    assert "| 3.000 | 3.00x |" in graphs_line and "| 16.7% |" in graphs_line  # 0.5 ms of 3 ms
    assert any("hf-compile-reduce-overhead | failed |" in line for line in lines)
    assert lines[-1].endswith("`RuntimeError: CUDA graph capture failed`")


def test_graph_built_rows_are_compared_with_the_hand_written_ones() -> None:
    """hf-serving rows: the hand-written model's step over theirs, parity within 10% or not."""
    result = report.finalize({"rows": [
        ok_row("fxkiln-graphs", 1, 2.0), ok_row("hf-serving-graphs", 1, 2.1),
        ok_row("fxkiln-passes", 8, 10.0), ok_row("hf-serving-passes", 8, 12.0),
        ok_row("hf-serving-graphs", 8, 1.0)]})  # no hand-written row at batch 8: no parity
    rows = {report.row_key(row): row for row in result["rows"]}
    assert rows[("bart-large", "hf-serving-graphs", 1)]["vs_hand_written"] == pytest.approx(2 / 2.1)
    assert "vs_hand_written" not in rows[("bart-large", "hf-serving-graphs", 8)]
    assert {name: entry["met"] for name, entry in result["parity"].items()} == {
        "bart-large batch 1: hf-serving-graphs vs fxkiln-graphs": True,
        "bart-large batch 8: hf-serving-passes vs fxkiln-passes": False}
    lines = report.table(result).splitlines()
    assert lines[-1] == ("- bart-large batch 8: hf-serving-passes vs fxkiln-passes: 0.83x "
                         "(missed: at most 10% slower)")


def test_load_results_merges_files() -> None:
    first = report.dump({"copy_bandwidth_runs": [2e12], "rows": [ok_row("hf-eager", 1, 9.0)]})
    second = report.dump({"copy_bandwidth_runs": [4e12], "rows": [ok_row("fxkiln-graphs", 1, 3.0)]})
    merged = report.load_results([first, second])
    assert merged["copy_bandwidth_bytes_per_s"] == 3e12
    assert merged["rows"][1]["speedup_over"] == {"hf-eager": 3.0}


def test_agreement_is_computed_when_the_reference_arrives_in_a_later_merge() -> None:
    without_reference = report.dump(report.finalize(
        {"rows": [ok_row("hf-compile", 1, 5.0, argmax=[1, 2, 3, 4])]}))
    reference = report.dump(report.finalize(
        {"rows": [ok_row("hf-eager", 1, 9.0, argmax=[1, 2, 3, 5])]}))
    merged = report.load_results([without_reference, reference])
    compiled = next(row for row in merged["rows"] if row["variant"] == "hf-compile")
    assert compiled["argmax_agreement"] == 0.75 and compiled["max_abs_logit_diff"] == 1.0
    assert "first_step_argmax" not in compiled


FAKE_CHILD = textwrap.dedent("""
    import json, sys, time
    args = sys.argv
    model, variant = args[args.index("--child") + 1: args.index("--child") + 3]
    for batch in map(int, args[args.index("--batches") + 1].split(",")):
        if batch == 8:
            print("Traceback (most recent call last):\\nRuntimeError: boom at 8", flush=True)
            sys.exit(3)
        if batch == 16:
            time.sleep(60)
        row = {"model": model, "variant": variant, "batch": batch, "status": "ok", "step_ms": 1.0}
        print("DECODE_ROW " + json.dumps(row), flush=True)
""")


def test_a_crashing_or_hanging_child_fails_its_batch_and_the_rest_go_on(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD)
    rows = run_child_rows([sys.executable, str(script)], "bart-large", "hf-compile",
                          [1, 8, 16, 64], timeout_s=1.5)
    assert [(row["batch"], row["status"]) for row in rows] == [
        (1, "ok"), (8, "failed"), (16, "timeout"), (64, "ok")]
    assert "boom at 8" in rows[1]["error"] and "status 3" in rows[1]["error"]
    assert "no row within 1.5 s" in rows[2]["error"]


def test_decode_weight_bytes_counts_what_a_bart_step_reads() -> None:
    hf = hf_model("bart-tiny")
    config = hf.config
    d, ffn, vocab = config.d_model, config.decoder_ffn_dim, config.vocab_size
    per_layer = 6 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 3 * 2 * d  # no cross K, V
    expected = config.decoder_layers * per_layer + 2 * d + vocab * d  # + embedding norm, head
    assert decode_weight_bytes(hf) == 4 * expected  # float32
    assert kv_read_bytes(hf, 3) == config.decoder_layers * 3 * CONTEXT * 4 * d * 4


def test_decode_weight_bytes_counts_what_a_llama_step_reads() -> None:
    hf = hf_model("llama-tiny", dtype=torch.bfloat16)
    config = hf.config
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    expected = config.num_hidden_layers * per_layer + h + vocab * h  # + final norm, tied head
    assert decode_weight_bytes(hf) == 2 * expected  # bfloat16
    assert kv_read_bytes(hf, 2) == config.num_hidden_layers * 2 * CONTEXT * 2 * kv * 2
