"""Pure helpers of the decode benchmark: merging rows, ratios, the weight-read bound, the table.

No torch, no devices: `decode.py` and `plot_decode.py` use these on the result JSON, which is

    {"benchmark": "decode", "device": ..., "versions": {...}, "dtype": ..., "context_tokens": ...,
     "copy_bandwidth_runs": [bytes/s, ...], "copy_bandwidth_bytes_per_s": median of the runs,
     "reference": {"<model>|<batch>": {"argmax": [...], "logits": [[...]]}},   # hf-eager's step one
     "rows": [{"model", "variant", "batch", "status", "step_ms", ...}], "targets": {...}}

A row's `status` is "ok", "failed" or "timeout"; failed rows carry `error` (the child's last lines).
"""
from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable
from typing import Any

HF_VARIANTS = ("hf-eager", "hf-compile", "hf-compile-reduce-overhead", "hf-fxkiln")
OUR_VARIANTS = ("ours-eager", "fxkiln-passes", "fxkiln-graphs")
# compile_model(hf_model): the graph-built serving model, beside its hand-written counterpart
HAND_WRITTEN = {"hf-serving-passes": "fxkiln-passes", "hf-serving-graphs": "fxkiln-graphs"}
SERVING_VARIANTS = tuple(HAND_WRITTEN)
VARIANTS = HF_VARIANTS + OUR_VARIANTS + SERVING_VARIANTS  # also the order of the table's rows
REFERENCE_VARIANT = "hf-eager"
PEERS = ("hf-eager", "hf-compile", "hf-compile-reduce-overhead", "ours-eager")
PARITY_WITHIN = 0.10  # graph-built steps within 10% of the hand-written model's (issue 12)
TABLE_PEERS = ("hf-eager", "hf-compile", "hf-compile-reduce-overhead")
TARGETS = (  # (model, batch, variant, peer, at least this many times faster), issues 7 and 11
    ("bart-large", 1, "fxkiln-graphs", "hf-eager", 8.0),
    ("bart-large", 1, "fxkiln-graphs", "hf-compile", 4.0),
    ("bart-large", 1, "hf-fxkiln", "hf-compile-reduce-overhead", 1.2),
    ("llama-1b", 1, "hf-fxkiln", "hf-compile-reduce-overhead", 1.2),
)
FINGERPRINT_KEYS = ("first_step_argmax", "first_step_logits")
NOTES = {  # what the figures of a row mean, written into every result
    "speedup_over": "peer step ms / this row's step ms (> 1: this row is faster)",
    "compile_s": "torch.compile variants: the first step's time (compiled afresh per batch); "
                 "fxkiln: CompileReport.compile_seconds (capture included)",
    "capture_s": "fxkiln-graphs: CompileReport.capture_seconds; reduce-overhead: the second "
                 "step's time, the call that records the CUDA graphs",
    "graph_memory_bytes": "fxkiln-graphs: CompileReport.graph_memory_bytes; reduce-overhead: "
                          "CUDA reserved-memory growth over compile and warm-up, after prefill",
    "vs_hand_written": "hf-serving rows: the hand-written model's step ms (fxkiln-passes or "
                       "fxkiln-graphs, same model and batch) / this row's; parity is met at "
                       ">= 1 / (1 + PARITY_WITHIN)",
    "weight_bytes": "weights one decode step reads (decoder + LM head; not the encoder nor "
                    "BART's cross-attention K/V projections); weight_read_bound_ms = "
                    "weight_bytes / copy bandwidth (read + write bytes of a device copy)",
    "kernels_per_step": "fxkiln rows on CUDA: the kernel census (benchmarks/kernel_census.py) "
                        "of 5 decode steps run again over the timed context under torch.profiler:"
                        " compute kernels per step and their time (kernel_ms_per_step), copies "
                        "and memsets apart, by category, and the costliest kernels; "
                        "busy_ms_per_step: the time at least one kernel runs. fxkiln's decode "
                        "kernels launch as programmatic dependents on Hopper: each starts, and "
                        "waits, before the one before ends, so kernel ms (and each kernel's us) "
                        "include that wait and can exceed the step",
}


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    return row["model"], row["variant"], int(row["batch"])


def merge_rows(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]]
               ) -> list[dict[str, Any]]:
    """`old` rows with every (model, variant, batch) that `new` has replaced by the new row."""
    merged = {row_key(row): row for row in old}
    merged.update({row_key(row): row for row in new})
    order = {variant: index for index, variant in enumerate(VARIANTS)}
    return sorted(merged.values(), key=lambda row: (row["model"], row["batch"],
                                                    order.get(row["variant"], len(order))))


def weight_read_bound_ms(weight_bytes: int, bandwidth_bytes_per_s: float) -> float:
    """The time to read `weight_bytes` once at the measured copy bandwidth, in ms."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"weight_read_bound_ms: expected a positive bandwidth, found "
                         f"{bandwidth_bytes_per_s} bytes/s")
    return 1e3 * weight_bytes / bandwidth_bytes_per_s


def failed_row(model: str, variant: str, batch: int, status: str, error: str) -> dict[str, Any]:
    return {"model": model, "variant": variant, "batch": batch, "status": status, "error": error}


def finalize(result: dict[str, Any]) -> dict[str, Any]:
    """Fill the derived figures of every row from the raw ones; idempotent.

    Per ok row: `weight_read_bound_ms` and `bound_fraction` (bound / step), `speedup_over`
    (peer step ms / this step ms, for each ok peer row of the same model and batch), and, against
    hf-eager's first decode step, `argmax_agreement` and `max_abs_logit_diff`. hf-eager rows' own
    first-step fingerprints move to `result["reference"]`; other rows' are dropped once compared
    (kept while no reference is there, so that merging the reference in later compares them).
    """
    runs = result.get("copy_bandwidth_runs", [])
    bandwidth = statistics.median(runs) if runs else None
    result["copy_bandwidth_bytes_per_s"] = bandwidth
    reference = result.setdefault("reference", {})
    rows = result["rows"] = merge_rows([], result["rows"])  # sorted, one row per key
    for row in rows:
        if row.get("status") == "ok" and row["variant"] == REFERENCE_VARIANT and \
                "first_step_argmax" in row:
            reference[f"{row['model']}|{row['batch']}"] = {
                "argmax": row["first_step_argmax"], "logits": row["first_step_logits"]}
    step_ms = {row_key(row): row["step_ms"] for row in rows if row.get("status") == "ok"}
    for row in rows:
        if row.get("status") != "ok":
            continue
        model, _, batch = row_key(row)
        if bandwidth:
            row["weight_read_bound_ms"] = weight_read_bound_ms(row["weight_bytes"], bandwidth)
            row["bound_fraction"] = row["weight_read_bound_ms"] / row["step_ms"]
        row["speedup_over"] = {peer: step_ms[(model, peer, batch)] / row["step_ms"]
                               for peer in PEERS
                               if peer != row["variant"] and (model, peer, batch) in step_ms}
        hand = (model, HAND_WRITTEN.get(row["variant"], ""), batch)
        if hand in step_ms:
            row["vs_hand_written"] = step_ms[hand] / row["step_ms"]
        ref = reference.get(f"{model}|{batch}")
        if ref is not None and "first_step_argmax" in row:  # else kept for a later merge
            row.update(agreement(ref, row["first_step_argmax"], row["first_step_logits"]))
            for key in FINGERPRINT_KEYS:
                row.pop(key)
    result["targets"] = targets(rows)
    result["parity"] = parity(rows)
    result["notes"] = NOTES
    return result


def agreement(reference: dict[str, Any], argmax: list[int], logits: list[list[float]]
              ) -> dict[str, float]:
    """How close a first decode step came to the reference's: argmax match rate, max |diff|."""
    if len(argmax) != len(reference["argmax"]):
        raise ValueError(f"agreement: expected {len(reference['argmax'])} sequences, found "
                         f"{len(argmax)}")
    same = sum(a == b for a, b in zip(argmax, reference["argmax"]))
    diffs = [abs(a - b) for row, ref_row in zip(logits, reference["logits"])
             for a, b in zip(row, ref_row)]
    return {"argmax_agreement": same / len(argmax), "max_abs_logit_diff": max(diffs, default=0.0)}


def targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each of TARGETS: the measured speedup (None if a row is missing) and whether it is met."""
    found = {row_key(row): row for row in rows if row.get("status") == "ok"}
    checked = {}
    for model, batch, variant, peer, at_least in TARGETS:
        row = found.get((model, variant, batch))
        measured = row["speedup_over"].get(peer) if row else None
        checked[f"{model} batch {batch}: {variant} over {peer}"] = {
            "at_least": at_least, "measured": measured,
            "met": None if measured is None else measured >= at_least}
    return checked


def parity(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per graph-built row with its hand-written counterpart in the same run: how the two steps
    compare (hand-written ms / graph-built ms) and whether it is within PARITY_WITHIN."""
    checked = {}
    for row in rows:
        if row.get("status") == "ok" and "vs_hand_written" in row:
            measured = row["vs_hand_written"]
            checked[f"{row['model']} batch {row['batch']}: {row['variant']} vs "
                    f"{HAND_WRITTEN[row['variant']]}"] = {
                "measured": measured, "met": measured >= 1 / (1 + PARITY_WITHIN)}
    return checked


def dump(result: dict[str, Any]) -> str:
    """JSON with two-space indents, lists of numbers kept on one line."""
    text = json.dumps(result, indent=2)
    numbers = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")
    return numbers.sub(lambda m: "[" + re.sub(r"\s+", "", m.group(1)).replace(",", ", ") + "]",
                       text) + "\n"


def table(result: dict[str, Any]) -> str:
    """The README's markdown table: one line per (model, batch, variant), failures listed after."""
    header = ("| model | batch | variant | step ms | x HF eager | x compile | x reduce-overhead "
              "| of weight-read bound | kernels/step | kernel ms | compile s | capture s "
              "| graph MiB | argmax agrees |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    failures = []
    for row in result["rows"]:
        cells = [row["model"], str(row["batch"]), row["variant"]]
        if row.get("status") != "ok":
            cells += [row.get("status", "failed")] + ["-"] * 10
            last = (row.get("error") or "").strip().splitlines()[-1:] or ["no output"]
            failures.append(f"- {row['model']} batch {row['batch']} {row['variant']}: "
                            f"{row.get('status')}: `{last[0][:160]}`")
        else:
            speedups = row.get("speedup_over", {})
            cells += [f"{row['step_ms']:.3f}"]
            cells += [_times(speedups.get(peer)) for peer in TABLE_PEERS]
            fraction = row.get("bound_fraction")
            cells += ["-" if fraction is None else f"{100 * fraction:.1f}%",
                      _number(row.get("kernels_per_step"), "{:.0f}"),
                      _number(row.get("kernel_ms_per_step"), "{:.3f}"),
                      _number(row.get("compile_s"), "{:.1f}"),
                      _number(row.get("capture_s"), "{:.2f}"),
                      _number(None if row.get("graph_memory_bytes") is None
                              else row["graph_memory_bytes"] / 2**20, "{:.0f}"),
                      _number(row.get("argmax_agreement"), "{:.0%}")]
        lines.append("| " + " | ".join(cells) + " |")
    checks = [f"- {name}: {entry['measured']:.2f}x ("
              f"{'met' if entry['met'] else 'missed'}: at most {PARITY_WITHIN:.0%} slower)"
              for name, entry in result.get("parity", {}).items()]
    return "\n".join(lines + ([""] + failures if failures else []) +
                     (["", "Graph-built against hand-written (their step ms / ours):", *checks]
                      if checks else []))


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def load_results(texts: Iterable[str]) -> dict[str, Any]:
    """One result from several JSON texts (say one file per model): later rows win, bandwidth
    runs are pooled, and the derived figures are computed again over the merged rows."""
    merged: dict[str, Any] | None = None
    for text in texts:
        result = json.loads(text)
        if merged is None:
            merged = result
            continue
        merged["rows"] = merge_rows(merged["rows"], result["rows"])
        merged["reference"] = {**merged.get("reference", {}), **result.get("reference", {})}
        merged["copy_bandwidth_runs"] = (merged.get("copy_bandwidth_runs", []) +
                                         result.get("copy_bandwidth_runs", []))
    if merged is None:
        raise ValueError("load_results: expected at least one result JSON, found none")
    return finalize(merged)
