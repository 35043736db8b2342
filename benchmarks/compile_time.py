"""Compile time with incremental shape refresh against a full propagation after every pass.

The pass manager refreshes `meta["val"]` after each pass that changed the graph. `full` makes
every refresh propagate the whole graph (what fxkiln did before compiler/shape_refresh.py);
`incremental` re-runs only what changed. Cases (CPU, float32, capture_sizes=(): the passes
and what surrounds them, no graph capture):

  mistral-serving   compile_model(hf) of the tests' 2-layer Mistral (tests/hf_models.py):
                    capture, serving passes, check against HF, default pipeline
  llama-backend     the first call of torch.compile(llama-tiny HF model, backend=fxkiln) on
                    8 tokens: Dynamo capture and the default pipeline
  llama-traced      compile_model(from_hf(llama-tiny)): symbolic trace and the default pipeline

After one warm-up compile per case and way, `--runs` rounds, each way first in turn; the
minimum of each (CPU timings swing). Also the refreshes of one compile: how many were full and
how many nodes were re-run out of how many refreshed.

    python benchmarks/compile_time.py [--runs 3] [--case NAME ...] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

import compiler  # noqa: E402
from compiler import CompileConfig, compile_model  # noqa: E402
from compiler.capture import ShapePropagator  # noqa: E402
from compiler.shape_refresh import IncrementalPropagation, RefreshStats  # noqa: E402
from models import from_hf  # noqa: E402
from models.presets import hf_model  # noqa: E402
from tests.hf_models import build  # noqa: E402

CONFIG = CompileConfig(device="cpu", capture_sizes=())
WAYS = ("full", "incremental")


def _mistral_serving() -> None:
    compile_model(build("mistral"), config=CONFIG)


def _llama_backend() -> None:
    torch._dynamo.reset()
    model = torch.compile(hf_model("llama-tiny"), backend=compiler.backend(CONFIG))
    with torch.no_grad():
        model(torch.arange(8)[None])


def _llama_traced() -> None:
    compile_model(from_hf(hf_model("llama-tiny")), config=CONFIG)


CASES: dict[str, Callable[[], None]] = {"mistral-serving": _mistral_serving,
                                        "llama-backend": _llama_backend,
                                        "llama-traced": _llama_traced}


def _timed(case: Callable[[], None], way: str) -> tuple[float, list[RefreshStats]]:
    """Seconds of one compile, and every refresh it made, with refreshes done `way`."""
    stats: list[RefreshStats] = []
    reason, call = IncrementalPropagation._full_reason, ShapePropagator.__call__

    def recorded(self: ShapePropagator, gm: torch.fx.GraphModule) -> RefreshStats:
        result = call(self, gm)
        stats.append(result)
        return result

    ShapePropagator.__call__ = recorded  # type: ignore[method-assign]  # restored below
    if way == "full":
        IncrementalPropagation._full_reason = (  # type: ignore[method-assign]
            lambda self, gm, mode: "every refresh full")
    try:
        start = time.perf_counter()
        case()
        return time.perf_counter() - start, stats
    finally:
        ShapePropagator.__call__, IncrementalPropagation._full_reason = call, reason  # type: ignore[method-assign]


def measure(name: str, runs: int) -> dict[str, Any]:
    case = CASES[name]
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    refreshes: dict[str, list[RefreshStats]] = {}
    for way in WAYS:
        refreshes[way] = _timed(case, way)[1]  # warm-up
    for run in range(runs):
        for way in (WAYS if run % 2 == 0 else WAYS[::-1]):
            seconds[way].append(_timed(case, way)[0])
    row: dict[str, Any] = {"case": name}
    for way in WAYS:
        stats = refreshes[way]
        row[way] = {"min_s": min(seconds[way]), "runs_s": seconds[way],
                    "refreshes": len(stats), "full_refreshes": sum(s.full for s in stats),
                    "nodes_rerun": sum(len(s.recomputed) for s in stats),
                    "nodes_refreshed": sum(s.nodes for s in stats)}
    row["speedup"] = row["full"]["min_s"] / row["incremental"]["min_s"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--case", action="append", choices=sorted(CASES))
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "compile_time-cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.case or list(CASES):
        row = measure(name, args.runs)
        rows.append(row)
        print(f"{name:16s} full {row['full']['min_s']:6.2f} s ({row['full']['nodes_rerun']} "
              f"nodes run)  incremental {row['incremental']['min_s']:6.2f} s "
              f"({row['incremental']['nodes_rerun']} nodes run)  {row['speedup']:.2f}x")
    result = {"benchmark": "compile_time", "device": platform.processor() or "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "runs": args.runs, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
