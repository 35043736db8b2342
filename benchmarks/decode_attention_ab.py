"""Whole decode steps with the split decode attention combining in its own launch (the last
split program, `DecodeTuning.fuse_reduce=True`) and with a separate reduce launch, in one
process, one row each per (model, batch): the A/B behind the tuning's `fuse_reduce` default.

    python benchmarks/decode_attention_ab.py [--device cuda] [--models llama-1b,bart-large]
                                             [--batches 1,8] [--out FILE]

Each form compiles the model afresh (launch plans are frozen when a step is captured) and runs
`benchmarks/decode.py`'s `fxkiln-graphs` variant: step time, kernels and kernel time per step.
The form is switched by replacing the tuning table of runtime/kernels/decode_attention.py for
the run, the benchmark's business only (the library reads no setting for it). `benchmarks/
kernels.py` times the two forms of the attention launch alone (`default-other-reduce`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.decode_variants import run_variant  # noqa: E402
from runtime.kernels import decode_attention  # noqa: E402

FIELDS = ("step_ms", "kernels_per_step", "kernel_ms_per_step")


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


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="llama-1b,bart-large")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device, batches = torch.device(args.device), [int(b) for b in args.batches.split(",")]
    rows = []
    for model in args.models.split(","):
        for fused in (True, False):
            with reduce_form(fused):
                for row in run_variant(model, "fxkiln-graphs", batches, device):
                    kept = {"model": model, "batch": row["batch"], "fuse_reduce": fused,
                            **{name: row.get(name) for name in FIELDS}}
                    print(json.dumps(kept), flush=True)
                    rows.append(kept)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
