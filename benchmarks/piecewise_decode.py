"""Decode-step time of fxkiln's own models: eager, fxkiln passes only, passes + piecewise graphs.

One decode step = one new token per sequence, with a self-attention context of CONTEXT tokens
(and CONTEXT encoder tokens for BART), through `runtime.generation.DecodeSession`. Each
variant's step time is the median over timed steps after warm-up steps, each step synchronized
(wall time, so host overhead counts, as it does for a user). Random weights from configs.

    python benchmarks/piecewise_decode.py [--device cuda] [--models bart-large,llama-1b]
                                          [--batches 1,8] [--out PATH]
On CPU the shapes are tiny (the point there is that the script runs, not the times).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from compiler import CompileConfig, compile_model  # noqa: E402
from models import from_hf  # noqa: E402
from models.presets import TINY_OF, hf_model  # noqa: E402
from runtime.generation import DecodeSession  # noqa: E402

CONTEXT = 256
WARMUP_STEPS, TIMED_STEPS = 5, 20

def build(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    hf = hf_model(name if device.type == "cuda" else TINY_OF[name], device, dtype)
    model = from_hf(hf)
    del hf
    return model


def prefilled_session(step_model: Any, spec_model: Any, batch: int, device: torch.device,
                      steps: int) -> tuple[DecodeSession, torch.Tensor]:
    """A session prefilled with random prompts of CONTEXT - steps tokens (and CONTEXT encoder
    tokens for encoder-decoder models), with room for `steps` decode steps; and the tokens
    the prefill chose, which the first decode step takes."""
    prompt_len = CONTEXT - steps
    encoder_len = CONTEXT if spec_model.is_encoder_decoder else None
    session = DecodeSession(step_model, batch, prompt_len, steps + 1, encoder_len, device)
    vocab = spec_model.config.vocab_size
    prompt = torch.randint(3, vocab, (batch, prompt_len), device=device)
    source = torch.randint(3, vocab, (batch, CONTEXT), device=device) if encoder_len else None
    with torch.no_grad():
        return session, session.prefill(prompt, source)[:, -1].argmax(-1)


def step_ms(step_model: Any, spec_model: Any, batch: int, device: torch.device) -> float:
    """Median wall time of one decode step (one token per sequence) in milliseconds."""
    steps = WARMUP_STEPS + TIMED_STEPS
    session, tokens = prefilled_session(step_model, spec_model, batch, device, steps)
    with torch.no_grad():
        times = []
        for step in range(steps):
            _sync(device)
            start = time.perf_counter()
            tokens = session.decode(tokens).argmax(-1)
            _sync(device)
            if step >= WARMUP_STEPS:
                times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(names: list[str], batches: list[int], device: torch.device) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name in names:
        model = build(name, device, dtype)
        sizes = tuple(sorted({1, 2, 4, 8, 16, 32, *batches}))
        # Eager first, before anything is compiled, and once more at the end: compiling and
        # capturing must not change what the eager model costs (a drift shows up there).
        eager_first = {batch: step_ms(model, model, batch, device) for batch in batches}
        variants: dict[str, Any] = {}
        for label, config in (("passes", CompileConfig(capture_sizes=())),
                              ("passes+graphs", CompileConfig(
                                  capture_sizes=sizes,
                                  kv_cache_tokens=max(batches) * (CONTEXT + 1)))):
            compiled = compile_model(model, config=config)
            variants[label] = (compiled, compiled.report)
        for batch in batches:
            row: dict[str, Any] = {"model": name, "batch": batch, "eager_ms": eager_first[batch]}
            for label, (step_model, report) in variants.items():
                row[f"{label}_ms"] = step_ms(step_model, model, batch, device)
                row[f"{label}_compile_s"] = report.compile_seconds
                row[f"{label}_capture_s"] = report.capture_seconds
                row[f"{label}_graph_memory_bytes"] = report.graph_memory_bytes
            row["eager_again_ms"] = step_ms(model, model, batch, device)
            row["eager_over_graphs"] = row["eager_ms"] / row["passes+graphs_ms"]
            row["eager_over_passes"] = row["eager_ms"] / row["passes_ms"]
            rows.append(row)
            print(f"{name:11} batch {batch:4}: eager {row['eager_ms']:8.3f} ms  passes "
                  f"{row['passes_ms']:8.3f} ms  passes+graphs {row['passes+graphs_ms']:8.3f} ms  "
                  f"eager/graphs {row['eager_over_graphs']:6.2f}x  (eager again "
                  f"{row['eager_again_ms']:8.3f} ms)", flush=True)
        del variants, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="bart-large,llama-1b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: intra-op threads only contend
    rows = run(args.models.split(","), [int(b) for b in args.batches.split(",")], device)
    result = {
        "benchmark": "piecewise_decode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "context_tokens": CONTEXT, "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS,
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "rows": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"piecewise_decode-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
