"""Whole decode steps with one kernel choice switched on and off, in one process: the A/B behind
a default. Each form compiles the model afresh (launch choices are frozen when a step is
captured) and runs `benchmarks/decode.py`'s `fxkiln-graphs` variant; the forms alternate
(on, off, on, off, ...) `--repeats` times, since step times drift within a process.

    python benchmarks/decode_ab.py --switch dependent_launch|fuse_reduce|norm_prologue
        [--device cuda]
        [--models llama-1b,bart-large] [--batches 1,8] [--repeats 2] [--out FILE]

Switches (each replaced for the run, the benchmark's business only; the library reads no
setting for them):
  fuse_reduce       the split decode attention combines its partials in the last split program
                    (`DecodeTuning.fuse_reduce`) against a separate reduce launch
  dependent_launch  the decode kernels launch as programmatic dependents on Hopper
                    (`triton_kernels.dependent_launch`) against plain launches
  norm_prologue     the default pipeline, with the norm_prologue pass (each norm folded into the
                    GEMV that reads it), against the same pipeline without it

Per (model, batch, form): every repeat's step ms, their minimum and median, and the census
(kernels, kernel ms and busy ms per step) of the last repeat. `--out` defaults to
benchmarks/results/decode_ab-<switch>-<device>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import compiler.pipeline  # noqa: E402
from runtime.kernels import decode_attention, triton_kernels  # noqa: E402

CENSUS = ("kernels_per_step", "kernel_ms_per_step", "busy_ms_per_step")


@contextlib.contextmanager
def reduce_form(fused: bool) -> Iterator[None]:
    """Every tuning of the decode attention with `fuse_reduce=fused`, restored afterwards."""
    table, default = dict(decode_attention.DECODE_TUNING), decode_attention.DEFAULT_TUNING
    decode_attention.DECODE_TUNING.update(
        {size: dataclasses.replace(tuning, fuse_reduce=fused) for size, tuning in table.items()})
    decode_attention.DEFAULT_TUNING = dataclasses.replace(default, fuse_reduce=fused)
    decode_attention.decode_plan.cache_clear()
    try:
        yield
    finally:
        decode_attention.DECODE_TUNING.update(table)
        decode_attention.DEFAULT_TUNING = default
        decode_attention.decode_plan.cache_clear()


@contextlib.contextmanager
def dependent_form(dependent: bool) -> Iterator[None]:
    """Dependent launches as the device allows (True) or never (False), restored afterwards."""
    real = triton_kernels.dependent_launch
    if not dependent:
        triton_kernels.dependent_launch = lambda device: False  # type: ignore[assignment]
    try:
        yield
    finally:
        triton_kernels.dependent_launch = real


@contextlib.contextmanager
def prologue_form(folded: bool) -> Iterator[None]:
    """The default pipeline (what `CompileConfig(passes=None)` runs, norm_prologue in it) or
    the same without norm_prologue, restored afterwards."""
    default = compiler.pipeline.DEFAULT_PIPELINE
    compiler.pipeline.DEFAULT_PIPELINE = (
        default if folded else tuple(name for name in default if name != "norm_prologue"))
    try:
        yield
    finally:
        compiler.pipeline.DEFAULT_PIPELINE = default


SWITCHES: dict[str, Callable[[bool], contextlib.AbstractContextManager[None]]] = {
    "fuse_reduce": reduce_form, "dependent_launch": dependent_form,
    "norm_prologue": prologue_form}


def summarize(switch: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (model, batch, form) from the repeats' rows, in the order first seen."""
    grouped: dict[tuple[str, int, bool], list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((row["model"], row["batch"], row[switch]), []).append(row)
    out = []
    for (model, batch, form), repeats in grouped.items():
        steps = [row["step_ms"] for row in repeats]
        out.append({"model": model, "batch": batch, switch: form, "step_ms_runs": steps,
                    "step_ms_min": min(steps), "step_ms_median": statistics.median(steps),
                    **{name: repeats[-1].get(name) for name in CENSUS}})
    return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", required=True, choices=sorted(SWITCHES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="llama-1b,bart-large")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected at least 1, found {args.repeats}")
    from benchmarks.decode import versions
    from benchmarks.decode_variants import run_variant

    device, batches = torch.device(args.device), [int(b) for b in args.batches.split(",")]
    rows = []
    forms = [form for _ in range(args.repeats) for form in (True, False)]  # interleaved
    for model in args.models.split(","):
        for form in forms:
            with SWITCHES[args.switch](form):
                for row in run_variant(model, "fxkiln-graphs", batches, device):
                    kept = {"model": model, "batch": row["batch"], args.switch: form,
                            "step_ms": row["step_ms"], **{name: row.get(name) for name in CENSUS}}
                    print(json.dumps(kept), flush=True)
                    rows.append(kept)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"decode_ab-{args.switch}-{device.type}.json")
    summary = summarize(args.switch, rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    out.write_text(json.dumps({"benchmark": "decode_ab", "device": name, "versions": versions(),
                               "switch": args.switch, "repeats": args.repeats,
                               "forms": summary}, indent=1))
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
