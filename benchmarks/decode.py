"""Decode-step time, side by side: Hugging Face (eager, torch.compile) against fxkiln.

One decode step = one new token per sequence at a context of 256 tokens (BART: 256 encoder
tokens too), the same prompts for every variant; median of synchronized wall times after
warm-up steps. BART-large and the Llama-3.2-1B shape with random bf16 weights on CUDA; their
tiny presets in float32 on CPU. Variants (see `decode_variants.py`):

  hf-eager                    the HF model's forward, default DynamicCache
  hf-compile                  torch.compile(hf_model), StaticCache, fixed shapes
  hf-compile-reduce-overhead  the same with mode="reduce-overhead" (CUDA graphs)
  hf-fxkiln                   torch.compile(hf_model, backend=fxkiln with graphs for the
                              batch), StaticCache: each decode step one replayed graph on CUDA
  ours-eager                  fxkiln's own model (models.from_hf), eager
  fxkiln-passes               compile_model(ours), passes only
  fxkiln-graphs               compile_model(ours), passes + piecewise CUDA graphs

Each (model, variant) runs in its own child process, which prints one JSON line per batch; a
child that crashes or overruns `--timeout` seconds on a batch leaves a failed row for that
batch, and a new child goes on with the rest. Rows merge into `--out` (same model, variant and
batch replaced), so the script can run once per model or per variant group:

    python benchmarks/decode.py --device cuda --models bart-large [--variants ...] [--out F]
                                [--budget SECONDS] [--skip-done] [--timeout SECONDS]
    python benchmarks/decode.py --device cuda --merge F1 F2 ...   # into --out (default results/)
    python benchmarks/decode.py --table [FILE ...]     # the README table from result JSON
Weight-read bound: bytes of the weights a step reads / the device's copy bandwidth (a large
device-to-device copy, read + write bytes); `bound_fraction` = bound / measured step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import decode_report as report  # noqa: E402
from benchmarks.decode_report import VARIANTS  # noqa: E402
from benchmarks.decode_variants import CONTEXT, TIMED_STEPS, WARMUP_STEPS  # noqa: E402
from benchmarks.result_files import default_out, load_or_new  # noqa: E402

ROW_PREFIX, BANDWIDTH_PREFIX = "DECODE_ROW ", "DECODE_BANDWIDTH "
ERROR_LINES = 25


def run_child_rows(command: list[str], model: str, variant: str, batches: list[int],
                   timeout_s: float, deadline: float = float("inf"),
                   show: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Rows for `batches`, from as many children as it takes: a crash or a batch that overruns
    `timeout_s` (or the `time.monotonic()` deadline) becomes a failed row, and a new child takes
    the batches after it. `show` prints each row (default: a decode-step line)."""
    show = show or _print_row
    rows: list[dict[str, Any]] = []
    pending = list(batches)
    while pending and time.monotonic() < deadline:
        done, status, error = _run_child(
            command + ["--child", model, variant, "--batches", ",".join(map(str, pending))],
            timeout_s, deadline)
        for row in done:
            rows.append(row)
            show(row)
            pending.remove(row["batch"])
        if pending and status != "ok":
            failed = report.failed_row(model, variant, pending.pop(0), status, error)
            rows.append(failed)
            show(failed)
        elif pending:  # exited cleanly but skipped batches: record, do not loop
            rows += [report.failed_row(model, variant, batch, "failed", "no row printed")
                     for batch in pending]
            pending = []
    return rows


def _run_child(command: list[str], timeout_s: float, deadline: float
               ) -> tuple[list[dict[str, Any]], str, str]:
    """(rows printed, "ok" | "failed" | "timeout", last lines of output)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True)
    reader.start()
    rows, tail = [], []
    row_deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = lines.get(timeout=max(0.0, min(row_deadline, deadline) - time.monotonic()))
        except queue.Empty:
            os.killpg(process.pid, 9)  # the child's own process group, started above
            process.wait()
            why = (f"no row within {timeout_s:g} s" if row_deadline <= deadline
                   else "the run's --budget was spent")
            return rows, "timeout", "\n".join(tail + [why])
        if line is None:
            break
        if line.startswith(ROW_PREFIX):
            rows.append(json.loads(line[len(ROW_PREFIX):]))
            row_deadline = time.monotonic() + timeout_s
        else:
            tail = (tail + [line.rstrip()])[-ERROR_LINES:]
    code = process.wait()
    if code != 0:
        return rows, "failed", "\n".join(tail + [f"child exited with status {code}"])
    return rows, "ok", ""


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _print_row(row: dict[str, Any]) -> None:
    where = f"{row['model']:10} {row['variant']:27} batch {row['batch']:4}"
    if row.get("status") != "ok":
        last = (row.get("error") or "").strip().splitlines()[-1:] or [""]
        print(f"{where}: {row['status'].upper()}  {last[0][:120]}", flush=True)
        return
    compile_s = row.get("compile_s")
    print(f"{where}: {row['step_ms']:9.3f} ms"
          + ("" if compile_s is None else f"  (compile {compile_s:.1f} s)"), flush=True)


def measure_bandwidth(device: str, command: list[str], timeout_s: float) -> dict[str, Any]:
    """Copy bandwidth and device name, measured in a child (the parent never touches CUDA)."""
    process = subprocess.run(command + ["--child-bandwidth"], capture_output=True, text=True,
                             cwd=ROOT, timeout=timeout_s)
    for line in process.stdout.splitlines():
        if line.startswith(BANDWIDTH_PREFIX):
            return json.loads(line[len(BANDWIDTH_PREFIX):])
    raise RuntimeError(f"bandwidth child on {device} printed no result:\n"
                       f"{process.stdout[-2000:]}{process.stderr[-2000:]}")


def child_bandwidth(device_name: str) -> dict[str, Any]:
    """A large device-to-device copy (read + write bytes), median of 5 after warm-up."""
    import statistics

    import torch

    from benchmarks.decode_variants import sync

    device = torch.device(device_name)
    size = 2**30 if device.type == "cuda" else 2**26
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = []
    for index in range(7):
        sync(device)
        start = time.perf_counter()
        target.copy_(source)
        sync(device)
        if index >= 2:
            seconds.append(time.perf_counter() - start)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    return {"bytes_per_s": 2 * size / statistics.median(seconds), "device_name": name,
            "copy_bytes": size}


def child_rows(device_name: str, model: str, variant: str, batches: list[int]) -> None:
    import torch

    from benchmarks.decode_variants import run_variant

    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: intra-op threads only contend
    for row in run_variant(model, variant, batches, device):
        print(ROW_PREFIX + json.dumps({**row, "status": "ok"}), flush=True)


def versions() -> dict[str, str]:
    import torch
    import transformers
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def run(args: argparse.Namespace) -> Path:
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or default_out("decode", device_type == "cuda"))
    command = [sys.executable, str(Path(__file__).resolve()), "--device", args.device]
    result = load_or_new(out, "decode", device_type, copy_bandwidth_runs=[], reference={})
    measured = measure_bandwidth(args.device, command, args.timeout)
    result["device"] = measured["device_name"]
    result["copy_bandwidth_runs"].append(measured["bytes_per_s"])
    print(f"{result['device']}: copy bandwidth {measured['bytes_per_s'] / 1e9:.0f} GB/s",
          flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    deadline = time.monotonic() + (args.budget or float("inf"))
    done = {report.row_key(row) for row in result["rows"] if row.get("status") == "ok"}
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            todo = [batch for batch in batches
                    if not (args.skip_done and (model, variant, batch) in done)]
            if not todo or time.monotonic() >= deadline:
                if todo:
                    print(f"{model} {variant}: not run, --budget spent", flush=True)
                continue
            rows = run_child_rows(command, model, variant, todo, args.timeout, deadline)
            result["rows"] = report.merge_rows(result["rows"], rows)
            _write(out, result)  # after every variant: a later crash of the parent loses nothing
    print(f"wrote {out}")
    return out


def _write(out: Path, result: dict[str, Any]) -> None:
    result.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=versions(), dtype="bfloat16" if result["device_type"] == "cuda" else "float32",
        context_tokens=CONTEXT, warmup_steps=WARMUP_STEPS, timed_steps=TIMED_STEPS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.dump(report.finalize(result)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--models", default="bart-large,llama-1b")
    parser.add_argument("--batches", default=None, help="default 1,8,64,256 on cuda; 1,8 on cpu")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None, help="default benchmarks/results/decode-<dev>.json")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a child may take per batch (default 300 cuda, 900 cpu)")
    parser.add_argument("--budget", type=float, default=None,
                        help="stop starting work after this many seconds (rows run so far are "
                             "kept; rerun with --skip-done to finish)")
    parser.add_argument("--skip-done", action="store_true",
                        help="skip (model, variant, batch) rows already ok in --out")
    parser.add_argument("--table", nargs="*", default=None, metavar="FILE",
                        help="print the README table from result files (default: --out)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                        help="merge result files (say one per GPU command) into --out")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--child-bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batches = args.batches or ("1,8,64,256" if cuda else "1,8")
    args.timeout = args.timeout or (300.0 if cuda else 900.0)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: expected some of {list(VARIANTS)}")
    if args.child_bandwidth:
        print(BANDWIDTH_PREFIX + json.dumps(child_bandwidth(args.device)), flush=True)
    elif args.child:
        child_rows(args.device, *args.child, [int(b) for b in args.batches.split(",")])
    elif args.merge:
        out = Path(args.out or default_out("decode", cuda))
        out.write_text(report.dump(report.load_results(Path(f).read_text() for f in args.merge)))
        print(f"wrote {out}")
    elif args.table is not None:
        files = args.table or [args.out or default_out("decode", cuda)]
        print(report.table(report.load_results(Path(f).read_text() for f in files)))
    else:
        run(args)


if __name__ == "__main__":
    main()
