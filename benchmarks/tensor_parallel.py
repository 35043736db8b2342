"""Tensor-parallel decode: fxkiln's Llama on 2 ranks (TP=2) against one (TP=1), tokens and time.

Spawns 2 ranks itself (NCCL on CUDA, one GPU per rank; gloo on CPU). Every rank builds the same
seeded preset and loads its shard with `from_hf(hf, tp_size=2)`; rank 0 also runs the whole
model (TP=1, the same weights) for reference tokens and the TP=1 step time. Each variant runs in
its own pair of processes (a phase), so that a failed graph capture cannot spoil the other:
  passes          compile_model without graphs (the collectives run eagerly);
  passes+graphs   piecewise CUDA graphs (CPU: the replay simulator) for every batch, captured in
                  lockstep on both ranks, the all-reduces and the LM-head gather inside them.
Tokens: greedy `runtime.generate`, float32 (TF32 off) must be equal TP=2 vs TP=1; bfloat16 is
reported (reduction order differs). Step time: piecewise_decode's median synchronized decode
step (bfloat16 on CUDA, float32 on CPU). NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
and NVSHMEM_DISABLE_NVLS=1 are set for every process started here.

    python benchmarks/tensor_parallel.py [--device cpu|cuda] [--model llama-1b] [--batches 1,8]
                                         [--out PATH] [--timeout SECONDS_PER_PHASE]
On CPU the model is the preset's tiny twin. Exit status 1 when a float32 token check fails or a
rank fails; the JSON is written either way.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import queue
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tensor_parallel_rank import (  # noqa: E402  (also puts the repository on sys.path)
    SAFE_ENV,
    VARIANTS,
    Plan,
    ensure_safe_environment,
    key,
    rank_main,
)

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import transformers  # noqa: E402
from models.presets import TINY_OF  # noqa: E402
from piecewise_decode import CONTEXT, TIMED_STEPS, WARMUP_STEPS  # noqa: E402

WORLD_SIZE = 2
GRACE_S = 20.0  # after one rank fails, how long the others get to report before they are killed


@dataclass
class Phase:
    """What the ranks of one variant's processes reported."""

    variant: str
    data: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # rank -> kind -> key
    errors: dict[int, str] = field(default_factory=dict)                 # rank -> why it failed
    seconds: float = 0.0

    def get(self, rank: int, kind: str, name: str) -> Any:
        return self.data[rank].get(kind, {}).get(name)

    def error_summary(self) -> str | None:
        """The last line of each failed rank's report."""
        lines = [f"rank {rank}: {text.strip().splitlines()[-1]}"
                 for rank, text in sorted(self.errors.items())]
        return "; ".join(lines) or None


def run_phase(variant: str, plan: Plan) -> Phase:
    """Start the ranks for `variant`, collect their messages, stop them; never hangs past the
    plan's timeout (plus GRACE_S and a few seconds to stop the processes)."""
    ensure_safe_environment()  # inherited by the ranks (main() has reported any override)
    plan = replace(plan, variants=(variant,), port=_free_port())
    phase = Phase(variant, data=[{} for _ in range(WORLD_SIZE)])
    context = mp.get_context("spawn")
    messages = context.Queue()
    processes = [context.Process(target=rank_main, args=(rank, WORLD_SIZE, plan, messages),
                                 name=f"tp-rank{rank}") for rank in range(WORLD_SIZE)]
    start = time.monotonic()
    for process in processes:
        process.start()
    try:
        _collect(phase, processes, messages, start + plan.timeout_s)
    finally:
        _stop(processes, hung=[rank for rank in phase.errors if processes[rank].exitcode is None])
        messages.close()
    phase.seconds = time.monotonic() - start
    return phase


def _collect(phase: Phase, processes: list[Any], messages: Any, deadline: float) -> None:
    finished: set[int] = set()
    last_stage = {rank: "starting" for rank in range(WORLD_SIZE)}
    while len(finished) < WORLD_SIZE and time.monotonic() < deadline:
        try:
            wait = max(0.1, min(1.0, deadline - time.monotonic()))
            kind, rank, payload = messages.get(timeout=wait)
        except queue.Empty:
            for rank, process in enumerate(processes):  # died without a word (killed, segfault)
                if rank not in finished and process.exitcode is not None:
                    phase.errors[rank] = (f"exited with code {process.exitcode} without reporting; "
                                          f"last stage: {last_stage[rank]}")
                    finished.add(rank)
                    deadline = min(deadline, time.monotonic() + GRACE_S)
            continue
        if kind == "stage":
            last_stage[rank] = payload
            print(f"  [{phase.variant}] rank {rank}: {payload}", flush=True)
        elif kind == "data":
            data_kind, name, value = payload
            phase.data[rank].setdefault(data_kind, {})[name] = value
        else:  # "done" | "error"
            finished.add(rank)
            if kind == "error":
                phase.errors[rank] = payload
                print(f"  [{phase.variant}] rank {rank} failed:\n{payload}", flush=True)
                deadline = min(deadline, time.monotonic() + GRACE_S)
    for rank in range(WORLD_SIZE):
        if rank not in finished:
            phase.errors[rank] = (f"no result in time (timeout, or {GRACE_S:.0f} s after another "
                                  f"rank failed); last stage: {last_stage[rank]}")


def _stop(processes: list[Any], hung: list[int]) -> None:
    """Join the ranks; terminate, then kill, the `hung` ones and any still running after 10 s
    (only processes started here)."""
    deadline = time.monotonic() + 10.0
    for rank, process in enumerate(processes):
        if rank not in hung:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def compare_tokens(reference: list[list[int]] | None, tokens: list[list[int]] | None
                   ) -> dict[str, Any]:
    """Equal or not, the fraction of equal tokens and the first step where any sequence differs."""
    if reference is None or tokens is None:
        return {"equal": None, "equal_fraction": None, "first_difference": None}
    expected, found = torch.tensor(reference), torch.tensor(tokens)  # (batch, new_tokens)
    same = expected == found
    differing_steps = (~same).any(dim=0).nonzero().flatten().tolist()
    return {"equal": bool(same.all()), "equal_fraction": float(same.float().mean()),
            "first_difference": differing_steps[0] if differing_steps else None}


def make_row(phase: Phase, plan: Plan, model_name: str, batch: int) -> dict[str, Any]:
    variant, tp, timing = phase.variant, WORLD_SIZE, plan.timing_dtype
    row: dict[str, Any] = {"model": model_name, "variant": variant, "batch": batch}
    row["tp1_step_ms"] = phase.get(0, "step_ms", key(variant, 1, timing, batch))
    row["tp2_step_ms"] = phase.get(0, "step_ms", key(variant, tp, timing, batch))
    row["tp2_rank1_step_ms"] = phase.get(1, "step_ms", key(variant, tp, timing, batch))
    row["tp1_over_tp2"] = (row["tp1_step_ms"] / row["tp2_step_ms"]
                           if row["tp1_step_ms"] and row["tp2_step_ms"] else None)
    complete = row["tp1_step_ms"] is not None and row["tp2_step_ms"] is not None
    ranks_agree = True
    for dtype in plan.token_dtypes:
        tp1_tokens = phase.get(0, "tokens", key(variant, 1, dtype, batch))
        tp2_tokens = phase.get(0, "tokens", key(variant, tp, dtype, batch))
        complete = complete and tp1_tokens is not None and tp2_tokens is not None
        for rank in range(1, WORLD_SIZE):
            ranks_agree = ranks_agree and phase.get(rank, "tokens",
                                                    key(variant, tp, dtype, batch)) == tp2_tokens
        for name, value in compare_tokens(tp1_tokens, tp2_tokens).items():
            row[f"{dtype}_tokens_{name}"] = value
    row["tp2_ranks_agree"] = ranks_agree
    for label, size in (("tp1", 1), ("tp2", tp)):
        stats = phase.get(0, "compile", key(variant, size, timing)) or {}
        for name in ("compile_s", "capture_s", "graph_memory_bytes", "pieces",
                     "collectives_in_graphs"):
            row[f"{label}_{name}"] = stats.get(name)
    failure = phase.get(0, "failure", key(variant, tp))
    row["status"] = "ok" if complete and ranks_agree and not failure else "failed"
    row["error"] = failure or phase.error_summary()
    return row


def print_row(row: dict[str, Any]) -> None:
    def ms(value: float | None) -> str:
        return "     n/a" if value is None else f"{value:8.3f}"

    ratio = "  n/a" if row["tp1_over_tp2"] is None else f"{row['tp1_over_tp2']:5.2f}"
    fp32 = {True: "yes", False: "NO", None: "n/a"}[row["float32_tokens_equal"]]
    bf16 = row.get("bfloat16_tokens_equal_fraction")
    first = row.get("bfloat16_tokens_first_difference")
    bf16_text = "n/a" if bf16 is None else (
        f"{bf16:.0%} equal" + ("" if first is None else f", first difference at step {first}"))
    print(f"{row['model']} {row['variant']:13} batch {row['batch']:3}: "
          f"TP=1 {ms(row['tp1_step_ms'])} ms  TP=2 {ms(row['tp2_step_ms'])} ms  "
          f"TP1/TP2 {ratio}x  fp32 tokens equal: {fp32}  bf16 tokens: {bf16_text}  "
          f"[{row['status']}]" + (f"\n    error: {row['error']}" if row["error"] else ""),
          flush=True)


def graphs_summary(phases: list[Phase]) -> dict[str, Any]:
    """Did TP=2 capture graphs with the collectives inside? If not, why (then TP=2 is
    passes-only: the `passes` rows)."""
    for phase in phases:
        if phase.variant != "passes+graphs":
            continue
        stats = [value for name, value in phase.data[0].get("compile", {}).items()
                 if name.startswith(f"passes+graphs|{WORLD_SIZE}|")]
        failure = phase.get(0, "failure", key("passes+graphs", WORLD_SIZE))
        collectives = [s["collectives_in_graphs"] or 0 for s in stats]
        captured = bool(stats) and all(s["captured_sizes"] for s in stats) and all(collectives)
        return {"captured": captured and not failure and not phase.errors,
                "error": failure or phase.error_summary(),
                "collectives_in_graphs": min(collectives, default=0)}
    return {"captured": None, "error": "not run"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="llama-1b", choices=("llama-1b", "llama-tiny"))
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per phase (default: 150 on CUDA, 120 on CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    overridden = ensure_safe_environment()
    for name, value in overridden.items():
        print(f"note: {name}={value!r} in the environment; using {SAFE_ENV[name]!r} (NVLink "
              f"multicast stays off)", flush=True)
    cuda = args.device == "cuda"
    if cuda and torch.cuda.device_count() < WORLD_SIZE:
        print(f"error: --device cuda needs {WORLD_SIZE} GPUs (one per rank), found "
              f"{torch.cuda.device_count()}", file=sys.stderr)
        return 2
    model_name = args.model if cuda else TINY_OF.get(args.model, args.model)
    plan = Plan(device_type=args.device, preset=model_name,
                batches=tuple(int(b) for b in args.batches.split(",")), variants=(),
                prompt_len=16 if cuda else 8, new_tokens=32 if cuda else 8,
                timing_dtype="bfloat16" if cuda else "float32",
                token_dtypes=("float32", "bfloat16"),
                timeout_s=args.timeout or (150.0 if cuda else 120.0), port=0)
    phases, rows = [], []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            parser.error(f"--variants: expected names from {VARIANTS}, found {variant!r}")
        print(f"{variant}: starting {WORLD_SIZE} ranks ({args.device})", flush=True)
        phases.append(phase := run_phase(variant, plan))
        for batch in plan.batches:
            rows.append(make_row(phase, plan, model_name, batch))
            print_row(rows[-1])
    graphs = graphs_summary(phases)
    if graphs["captured"]:
        print(f"TP={WORLD_SIZE} graphs captured with {graphs['collectives_in_graphs']} collectives "
              f"inside", flush=True)
    elif graphs["captured"] is False:
        print(f"TP={WORLD_SIZE} graphs with collectives did not capture; TP={WORLD_SIZE} falls "
              f"back to passes only (the 'passes' rows). Why: {graphs['error']}", flush=True)
    write_result(args, plan, phases, rows, graphs)
    failed = [row for row in rows if row["status"] != "ok" or row["float32_tokens_equal"] is False]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows ok", flush=True)
    return 1 if failed else 0


def write_result(args: argparse.Namespace, plan: Plan, phases: list[Phase],
                 rows: list[dict[str, Any]], graphs: dict[str, Any]) -> None:
    info = next((p.data[0].get("info", {}) for p in phases if p.data[0].get("info")), {})
    result = {
        "benchmark": "tensor_parallel",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info.get("device", platform.processor() or "cpu"),
        "world_size": WORLD_SIZE, "backend": "nccl" if args.device == "cuda" else "gloo",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "triton": _version("triton"), "python": platform.python_version(),
                     "nccl": info.get("nccl")},
        "environment": dict(SAFE_ENV),
        "model": plan.preset, "prompt_tokens": plan.prompt_len, "new_tokens": plan.new_tokens,
        "token_dtypes": list(plan.token_dtypes), "timing_dtype": plan.timing_dtype,
        "context_tokens": CONTEXT, "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS,
        "graphs_with_collectives": graphs,
        "phases": [{"variant": p.variant, "seconds": p.seconds, "errors": p.errors}
                   for p in phases],
        "rows": rows,
    }
    default = Path(__file__).parent / "results" / f"tensor_parallel-{args.device}.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
