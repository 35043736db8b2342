"""Kernel microbenchmark: each fxkiln Triton kernel against its native twin on the models' real
decode shapes, over a sweep of its launch parameters, in one GPU call of a few minutes.

    python benchmarks/kernels.py [--device cuda] [--budget 300] [--out FILE]
                                 [--kernels decode_attention,linear,norm,norm_linear,rotary]
                                 [--models llama-1b,bart-large,llama-8b]

Per case (kernel, model, shape: batch 1, 8, 64 at contexts 256 and 2048 for decode attention; 1
and 8 rows for the projections; 1, 8, 64 rows for add + norm and rotary) it checks the code's
current choice against native (GPU tolerances, fresh random inputs), then times native (the
baseline), the current choice and every swept variant: microseconds per call, from a CUDA graph
of calls over buffers rotated past the L2 cache, median of 5 replays. Cases run in order of
expected gain until `--budget` seconds are spent (the last, longest sweep first to go). It
writes `benchmarks/results/kernels-<dev>.json`, prints a table, and prints the tuning the sweep
suggests (`DECODE_TUNING`, `GEMV_TUNING` literals for runtime/kernels/). On CPU it is a smoke
run: tiny shapes, Triton interpreted, a one-point sweep, host timing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import kernel_cases as cases  # noqa: E402
from benchmarks.kernel_tuning import suggestions  # noqa: E402
from tests.kernels.helpers import GPU_TOLERANCES, TOLERANCES  # noqa: E402

REPLAYS = 5
SWEEPS = {
    "cuda": {"splits": (1, 2, 4, 8, 16, 32, 64),
             "blocks": ((16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)),
             "budgets": ((4096, 4), (8192, 8)), "stages": (2, 3), "norm_warps": (1, 2, 4, 8, 16),
             "rotary_warps": (1, 2, 4, 8),
             "batches": (1, 8, 64), "contexts": (256, 2048), "rows": (1, 8),
             "norm_rows": (1, 8, 64), "max_copies": 64},
    "cpu": {"splits": (1, 2), "blocks": ((16, 2),), "budgets": ((4096, 2),), "stages": (2,),
            "norm_warps": (2,), "rotary_warps": (2,), "batches": (1, 3), "contexts": (16, 40),
            "rows": (1, 3), "norm_rows": (1, 3), "max_copies": 1},
}
KERNELS = ("decode_attention", "norm", "norm_linear", "rotary", "linear")  # long sweep last


def build_cases(kernels: list[str], models: list[str], device: torch.device,
                dtype: torch.dtype, sweep: dict[str, Any]) -> Iterator[cases.Case]:
    """Cases kernel by kernel (each for every model): attention, norms and rotary, then the
    projections, whose sweep is the longest (a budget cut falls on the last of them)."""
    shapes = cases.MODELS if device.type == "cuda" else cases.TINY
    for kernel in (k for k in KERNELS if k in kernels):
        for model in models:
            shape = shapes[model]
            if kernel == "decode_attention":
                for batch in sweep["batches"]:
                    for context in sweep["contexts"]:
                        yield cases.attention_case(model, shape, batch, context, device, dtype,
                                                   sweep)
            elif kernel == "linear":
                for projection in shape.projections:
                    for rows in sweep["rows"]:
                        yield cases.linear_case(model, projection, rows, device, dtype, sweep)
            elif kernel == "norm":
                for rows in sweep["norm_rows"]:
                    yield cases.norm_case(model, shape, rows, device, dtype, sweep)
            elif kernel == "norm_linear":
                for projection in cases.NORMED[model][0] if device.type == "cuda" else (
                        shape.projections):
                    for rows in sweep["rows"]:
                        yield cases.norm_linear_case(model, shape, projection, rows, device,
                                                     dtype, sweep)
            elif shape.rotary:
                for rows in sweep["norm_rows"]:
                    yield cases.rotary_case(model, shape, rows, device, dtype, sweep)


def time_us(run: cases.Run, calls: int, device: torch.device) -> float:
    """Microseconds per call of `run(i)`, i cycling over `calls` buffer sets."""
    run(0)  # compiles, and warms up libraries
    if device.type != "cuda":
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            for index in range(calls):
                run(index)
            seconds.append((time.perf_counter() - start) / calls)
        return 1e6 * statistics.median(seconds)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for index in range(calls):
            run(index)
    graph.replay()
    millis = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        millis.append(start.elapsed_time(end))
    del graph
    return 1e3 * statistics.median(millis) / calls


def run_case(case: cases.Case, device: torch.device) -> dict[str, Any]:
    record: dict[str, Any] = {"kernel": case.kernel, "model": case.model, **case.key,
                              "copies": case.copies}
    calls = max(case.copies, 8 if device.type == "cuda" else 1)
    actual, expected = case.check()
    rtol, atol = (GPU_TOLERANCES if device.type == "cuda" else TOLERANCES)[expected.dtype]
    error = (actual.float() - expected.float()).abs().max().item()
    record["check"] = {"max_abs_error": error, "ok": bool(torch.allclose(
        actual.float(), expected.float(), rtol=rtol, atol=atol))}
    record["baseline_us"] = time_us(case.baseline, calls, device)
    record["peers_us"] = {name: time_us(run, calls, device) for name, run in case.peers.items()}
    record["variants"] = []
    for name, (params, run) in case.variants.items():
        try:
            us = time_us(run, calls, device)
        except Exception as error:  # noqa: BLE001  (a variant that cannot run is reported)
            record["variants"].append({"name": name, **params, "error": f"{type(error).__name__}:"
                                       f" {error}"[:300]})
            continue
        record["variants"].append({"name": name, **params, "us": us})
    timed = [v for v in record["variants"] if "us" in v  # the default's own variants aside
             and not v["name"].startswith("default-")]
    record["default_us"] = next((v["us"] for v in timed if v["name"] == case.default), None)
    record["best"] = min(timed, key=lambda v: v["us"]) if timed else None
    return record


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; cases after it "
                        "are listed as skipped")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--models", default="llama-1b,bart-large,llama-8b")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sweep = SWEEPS["cuda" if device.type == "cuda" else "cpu"]
    deadline = time.monotonic() + args.budget
    records, skipped = [], []
    for case in build_cases(args.kernels.split(","), args.models.split(","), device, dtype,
                            sweep):
        label = f"{case.kernel} {case.model} {case.key}"
        if time.monotonic() >= deadline:
            skipped.append(label)
            continue
        try:
            record = run_case(case, device)
        except Exception as error:  # noqa: BLE001  (reported; the other cases go on)
            record = {"kernel": case.kernel, "model": case.model, **case.key,
                      "error": f"{type(error).__name__}: {error}"[:500]}
        records.append(record)
        print(row_line(record), flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"benchmark": "kernels", "device": _device_name(device), "device_type": device.type,
              "processors": cases.triton_kernels.device_processors(device),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "dtype": str(dtype).removeprefix("torch."), "cases": records, "skipped": skipped,
              "suggestions": suggestions(records, cases.triton_kernels.device_processors(device))}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"kernels-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(records)} cases, {len(skipped)} skipped (budget); wrote {out}")
    for name, text in result["suggestions"].items():
        print(f"suggested {name} = {text}")
    return out


def row_line(record: dict[str, Any]) -> str:
    shape = ",".join(f"{k}={v}" for k, v in record.items() if k in (
        "batch", "context", "rows", "out_features", "in_features", "epilogue", "hidden"))
    head = f"{record['kernel']:16} {record['model']:10} {shape:42}"
    if "error" in record:
        return f"{head} ERROR {record['error'][:100]}"
    best = record.get("best") or {}
    params = {k: v for k, v in best.items() if k not in ("name", "us")}
    ok = "ok" if record["check"]["ok"] else f"MISMATCH {record['check']['max_abs_error']:.3g}"
    peers = "".join(f"  {name} {_us(us)}" for name, us in record.get("peers_us", {}).items())
    return (f"{head} native {record['baseline_us']:8.2f} us{peers}  default "
            f"{_us(record['default_us'])}  best {_us(best.get('us'))} {params}  {ok}")


def _us(value: float | None) -> str:
    return "       -" if value is None else f"{value:8.2f}"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
