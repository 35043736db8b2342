"""Time to first token and end-to-end tokens/s: Hugging Face (eager, compiled) against fxkiln.

Workloads: prompts of 128 tokens, of 1024 tokens, and of mixed lengths (333, 1024, 96, 512,
17, 768, 256, 40: batch b takes the first b), at batch 1 and 8, greedy with EOS off. The
Llama-3.2-1B shape with random bf16 weights on CUDA; its tiny preset in float32 on CPU.
Variants and what each row measures: `prefill_variants.py`. Each (model, variant, workload)
runs in its own child process (`decode.py`'s runner: a crash or a timeout is a failed row and
the rest go on); rows merge into `--out`. "x peer" is the peer's time over the row's (above 1:
the row is faster); "same tokens" counts the sequences whose tokens equal hf-eager's.

    python benchmarks/prefill.py [--device cuda] [--variants ...] [--workloads 128,1024,mixed]
                                 [--batches 1,8] [--out F] [--budget S] [--skip-done]
    python benchmarks/prefill.py --device cuda --merge F1 F2 ...
    python benchmarks/prefill.py --table [FILE ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import decode_report  # noqa: E402
from benchmarks.decode import ROW_PREFIX, run_child_rows, versions  # noqa: E402
from benchmarks.prefill_variants import VARIANTS, WORKLOADS  # noqa: E402
from benchmarks.result_files import default_out, load_or_new  # noqa: E402

REFERENCE = "hf-eager"
PEERS = ("hf-eager", "hf-compile")


def row_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return row["model"], row["variant"], row["workload"], int(row["batch"])


def finalize(result: dict[str, Any]) -> dict[str, Any]:
    """Per ok row: `ttft_over` and `tokens_per_s_over` (peer / row ratios, above 1 = faster)
    and `same_tokens` (sequences equal to hf-eager's). Idempotent."""
    found = {row_key(r): r for r in result["rows"] if r.get("status") == "ok"}
    for row in found.values():
        model, _, workload, batch = row_key(row)
        row["ttft_over"], row["tokens_per_s_over"] = {}, {}
        for peer in PEERS:
            other = found.get((model, peer, workload, batch))
            if other is not None and other is not row:
                row["ttft_over"][peer] = other["ttft_ms"] / row["ttft_ms"]
                row["tokens_per_s_over"][peer] = row["tokens_per_s"] / other["tokens_per_s"]
        reference = found.get((model, REFERENCE, workload, batch))
        if reference is not None:
            row["same_tokens"] = sum(a == b for a, b in zip(row["sequence_hashes"],
                                                            reference["sequence_hashes"]))
    targets = {}
    for batch, at_least in ((1, 1.0), (8, 1.5)):
        row = found.get(("llama-1b", "fxkiln-graphs", "1024", batch))
        measured = None if row is None else row["ttft_over"].get(REFERENCE)
        targets[f"ttft 1024 batch {batch}: fxkiln-graphs >= {at_least}x hf-eager"] = {
            "measured": measured, "met": measured is not None and measured >= at_least}
    result["targets"] = targets
    return result


def table(result: dict[str, Any]) -> str:
    header = ("| workload | batch | variant | TTFT ms | x HF eager | x HF compile | tokens/s "
              "| x HF eager | x HF compile | same tokens | compile s |")
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    failures = []
    order = {v: i for i, v in enumerate(VARIANTS)}
    for row in sorted(result["rows"], key=lambda r: (r["model"], WORKLOADS.index(r["workload"]),
                                                     r["batch"], order[r["variant"]])):
        where = f"| {row['workload']} | {row['batch']} | {row['variant']} |"
        if row.get("status") != "ok":
            lines.append(f"{where} {row['status']} |" + " - |" * 7)
            failures.append(f"- {row['workload']} batch {row['batch']} {row['variant']}: "
                            f"{row['status']}: `{_last_line(row.get('error'))}`")
            continue
        ttft, tps = row.get("ttft_over", {}), row.get("tokens_per_s_over", {})
        same = ("-" if row.get("same_tokens") is None
                else f"{row['same_tokens']}/{len(row['sequence_hashes'])}")
        compile_s = "-" if row.get("compile_s") is None else f"{row['compile_s']:.1f}"
        lines.append(
            f"{where} {row['ttft_ms']:.2f} | {_x(ttft.get('hf-eager'))} | "
            f"{_x(ttft.get('hf-compile'))} | {row['tokens_per_s']:.1f} | "
            f"{_x(tps.get('hf-eager'))} | {_x(tps.get('hf-compile'))} | {same} | {compile_s} |")
    return "\n".join(lines + [""] + failures)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _last_line(error: str | None) -> str:
    lines = (error or "").strip().splitlines()
    return lines[-1][:160] if lines else ""


def _show(row: dict[str, Any]) -> None:
    where = f"{row['variant']:24} {row.get('workload', '?'):6} batch {row['batch']:3}"
    if row.get("status") != "ok":
        print(f"{where}: {row['status'].upper()} {_last_line(row.get('error'))}", flush=True)
        return
    print(f"{where}: TTFT {row['ttft_ms']:9.2f} ms  {row['tokens_per_s']:9.1f} tokens/s",
          flush=True)


def run(args: argparse.Namespace) -> Path:
    cuda = args.device.startswith("cuda")
    out = Path(args.out or default_out("prefill", cuda))
    result = load_or_new(out, "prefill", "cuda" if cuda else "cpu")
    done = {row_key(r) for r in result["rows"] if r.get("status") == "ok"}
    batches = [int(b) for b in args.batches.split(",")]
    deadline = time.monotonic() + (args.budget or float("inf"))
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            for workload in args.workloads.split(","):
                todo = [b for b in batches
                        if not (args.skip_done and (model, variant, workload, b) in done)]
                if not todo or time.monotonic() >= deadline:
                    continue
                command = [sys.executable, str(Path(__file__).resolve()), "--device",
                           args.device, "--workloads", workload, "--new-tokens",
                           str(args.new_tokens), "--runs", str(args.runs)]
                rows = run_child_rows(command, model, variant, todo, args.timeout, deadline,
                                      show=_show)
                for row in rows:
                    row.setdefault("workload", workload)
                merged = {row_key(r): r for r in result["rows"]}
                merged.update({row_key(r): r for r in rows})
                result["rows"] = list(merged.values())
                _write(out, result, args)
    print(f"wrote {out}")
    return out


def _write(out: Path, result: dict[str, Any], args: argparse.Namespace) -> None:
    import torch

    result.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions=versions(), device=(torch.cuda.get_device_name() if result["device_type"] ==
                                     "cuda" and torch.cuda.is_available() else "cpu"),
        dtype="bfloat16" if result["device_type"] == "cuda" else "float32",
        new_tokens=args.new_tokens, runs=args.runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(decode_report.dump(finalize(result)))


def child_rows(args: argparse.Namespace) -> None:
    import torch

    from benchmarks.prefill_variants import run_variant

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: intra-op threads only contend
    model, variant = args.child
    batches = [int(b) for b in args.batches.split(",")]
    for row in run_variant(model, variant, args.workloads, batches, device, args.new_tokens,
                           args.runs):
        print(ROW_PREFIX + json.dumps({**row, "status": "ok"}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--models", default="llama-1b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens per sequence end to end (default 64 cuda, 16 cpu)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls (5 cuda, 2 cpu)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/prefill-<dev>.json")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a child may take per batch (default 600)")
    parser.add_argument("--budget", type=float, default=None,
                        help="stop starting work after this many seconds")
    parser.add_argument("--skip-done", action="store_true")
    parser.add_argument("--table", nargs="*", default=None, metavar="FILE")
    parser.add_argument("--merge", nargs="+", default=None, metavar="FILE")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.new_tokens = args.new_tokens or (64 if cuda else 16)
    args.runs = args.runs or (5 if cuda else 2)
    args.timeout = args.timeout or 600.0
    for name, valid in (("variants", VARIANTS), ("workloads", WORKLOADS)):
        unknown = sorted(set(getattr(args, name).split(",")) - set(valid))
        if unknown:
            parser.error(f"unknown {name} {unknown}: expected some of {list(valid)}")
    if args.child:
        child_rows(args)
    elif args.merge:
        out = Path(args.out or default_out("prefill", cuda))
        results = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {row_key(r): r for result in results for r in result["rows"]}
        out.write_text(decode_report.dump(finalize({**results[-1], "rows": list(merged.values())})))
        print(f"wrote {out}")
    elif args.table is not None:
        files = args.table or [args.out or default_out("prefill", cuda)]
        rows = {row_key(r): r for f in files for r in json.loads(Path(f).read_text())["rows"]}
        print(table(finalize({"rows": list(rows.values())})))
    else:
        run(args)


if __name__ == "__main__":
    main()
