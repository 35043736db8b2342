"""Where a compiled decode step's time goes: host time per part, and device kernel time.

For each model and batch, compiles our model with passes + piecewise graphs and runs decode
steps through `DecodeSession` (as benchmarks/piecewise_decode.py does), then reports per step:
    step_ms         synchronized wall time (median)
    host parts      unsynchronized host time (median per step) spent in
                    metadata (building the step's AttentionMetadata), stage (copying inputs into
                    static buffers), replay (replayed pieces: copies + graph launch),
                    attention (pieces run eagerly: the attention ops), finish (slicing/cloning
                    outputs), and the rest of the step (split-module Python, argmax, context)
    kernels_ms      device kernel time per step, with the rest of the kernel census
                    (benchmarks/kernel_census.py: kernels per step, by category, top kernels)
and writes the top host functions of a cProfile of the timed steps.

    python benchmarks/profile_decode.py [--device cuda] [--models bart-large,llama-1b]
                                        [--batches 1] [--out DIR]
The timers wrap library methods from outside (this script only); nothing in the library changes.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from compiler import CompileConfig, compile_model  # noqa: E402
from models import from_hf  # noqa: E402
from models.presets import TINY_OF, hf_model  # noqa: E402
from runtime import runner as runner_module, session as session_module  # noqa: E402
from kernel_census import session_census  # noqa: E402  (the one census)
from piecewise_decode import _sync, prefilled_session  # noqa: E402  (one session setup)
from runtime.piece_runner import PieceRunner  # noqa: E402

WARMUP, TIMED = 30, 50
PARTS = ("metadata", "stage", "replay", "attention", "finish")
_totals: collections.Counter[str] = collections.Counter()


def _timed(part: str | None, function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            name = part or ("attention" if args[0].piece.is_splitting else "replay")
            _totals[name] += time.perf_counter() - start
    return wrapper


def instrument() -> None:
    session_module.step_metadata = _timed("metadata", session_module.step_metadata)
    runner_module.StaticInputs.stage = _timed("stage", runner_module.StaticInputs.stage)
    runner_module.BucketRunner._finish = _timed("finish", runner_module.BucketRunner._finish)
    PieceRunner.__call__ = _timed(None, PieceRunner.__call__)


def profile(compiled: Any, model: Any, batch: int, device: torch.device, out: Path,
            label: str) -> dict[str, Any]:
    steps = WARMUP + TIMED
    session, tokens = prefilled_session(compiled, model, batch, device, steps)
    walls, hosts = [], collections.defaultdict(list)
    profiler = cProfile.Profile()
    with torch.no_grad():
        for step in range(steps):
            _totals.clear()
            _sync(device)
            if step >= WARMUP:
                profiler.enable()
            start = time.perf_counter()
            tokens = session.decode(tokens).argmax(-1)
            host = time.perf_counter() - start
            _sync(device)
            wall = time.perf_counter() - start
            profiler.disable()
            if step >= WARMUP:
                walls.append(wall)
                hosts["host"].append(host)
                for part in PARTS:
                    hosts[part].append(_totals[part])
                hosts["rest"].append(host - sum(_totals[p] for p in PARTS))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    (out / f"cprofile-{label}.txt").write_text(text.getvalue())
    row: dict[str, Any] = {"step_ms": 1e3 * statistics.median(walls)}
    row.update({f"{k}_ms": 1e3 * statistics.median(v) for k, v in hosts.items()})
    census = session_census(session, tokens, device)
    if census is not None:
        row["kernels_ms"] = census["kernel_ms_per_step"]
        row.update(census)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="bart-large,llama-1b")
    parser.add_argument("--batches", default="1")
    parser.add_argument("--out", default="benchmarks/results/profile")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    instrument()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for name in args.models.split(","):
        model = from_hf(hf_model(name if device.type == "cuda" else TINY_OF[name], device, dtype))
        compiled = compile_model(model, config=CompileConfig(capture_sizes=tuple(batches)))
        for batch in batches:
            row = {"model": name, "batch": batch, "pieces": compiled.report.pieces
                   if hasattr(compiled.report, "pieces") else None,
                   **profile(compiled, model, batch, device, out, f"{name}-{batch}")}
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                              for k, v in row.items()}), flush=True)
        del compiled, model
    (out / f"profile-{device.type}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
