"""Hugging Face `generate` end to end: eager, torch.compile(mode="reduce-overhead"), fxkiln.

64 new tokens per sequence (EOS suppressed) after a prompt of 192 tokens (BART: a source of 256
encoder tokens), static cache, greedy. Variants, each with `generate(..., disable_compile=True)`
so that generate does not compile the forward itself:

  hf-eager                    the forward as it is
  hf-compile-reduce-overhead  hf.forward = torch.compile(hf.forward, mode="reduce-overhead")
  hf-fxkiln                   hf.forward = torch.compile(hf.forward, backend=fxkiln, graphs
                              for the batch): each decode step one replayed CUDA graph

Per batch: a fresh Dynamo, one warm-up generate (compile and capture: `first_generate_s`), then
the median of `--runs` timed generates: tokens/s = batch * 64 / seconds, and `ms_per_token`.
Every run's tokens are compared with eager's (computed in the same process): in float32 they
must be equal (`tokens_equal_eager`). A variant that raises (reduce-overhead under generate
with a static cache has failed with "accessing tensor output of CUDAGraphs that has been
overwritten by a subsequent run") is a failed row with the error, and the next batch goes on.
One child process per (model, variant), as in `decode.py`; rows merge into `--out`:

    python benchmarks/generate_e2e.py --device cuda [--models bart-large,llama-1b]
        [--variants ...] [--batches 1,8] [--dtype float32|bfloat16] [--runs 3] [--out F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import decode_report as report  # noqa: E402
from benchmarks.decode import ROW_PREFIX, run_child_rows, versions  # noqa: E402

VARIANTS = ("hf-eager", "hf-compile-reduce-overhead", "hf-fxkiln")
NEW_TOKENS, PROMPT_TOKENS, SOURCE_TOKENS = 64, 192, 256
SEED = 4321
TARGETS = (("bart-large", 1), ("llama-1b", 1))  # hf-fxkiln faster than reduce-overhead
ERROR_LINES = 12


def prompts(hf: Any, batch: int, device: Any) -> Any:
    """The same prompts (BART: sources) in every process."""
    import torch

    generator = torch.Generator().manual_seed(SEED + batch)
    length = SOURCE_TOKENS if hf.config.is_encoder_decoder else PROMPT_TOKENS
    return torch.randint(3, hf.config.vocab_size, (batch, length), generator=generator).to(device)


def generate(hf: Any, ids: Any) -> Any:
    import torch

    options: dict[str, Any] = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                   do_sample=False, cache_implementation="static",
                                   disable_compile=True)
    if not hf.config.is_encoder_decoder:
        options["attention_mask"] = torch.ones_like(ids)
    with torch.no_grad():
        return hf.generate(ids, **options)


def compiled_forward(variant: str, forward: Any, batch: int) -> tuple[Any, Any]:
    """(the forward `variant` runs, the fxkiln backend or None)."""
    import torch

    if variant == "hf-eager":
        return forward, None
    if variant == "hf-compile-reduce-overhead":
        return torch.compile(forward, mode="reduce-overhead"), None
    import compiler

    backend = compiler.backend(compiler.CompileConfig(capture_sizes=(batch,)))
    return torch.compile(forward, backend=backend), backend


def time_batch(hf: Any, variant: str, batch: int, runs: int, device: Any) -> dict[str, Any]:
    """One row: compile and warm up, time `runs` generates, compare the tokens with eager's."""
    import torch

    ids = prompts(hf, batch, device)
    eager_forward = hf.forward
    expected = generate(hf, ids)
    torch._dynamo.reset()
    hf.forward, backend = compiled_forward(variant, eager_forward, batch)
    try:
        seconds, outputs = [], []
        for _ in range(runs + 1):
            _sync(device)
            start = time.perf_counter()
            outputs.append(generate(hf, ids))
            _sync(device)
            seconds.append(time.perf_counter() - start)
    finally:
        hf.forward = eager_forward
    median = statistics.median(seconds[1:])
    new = [out[:, -NEW_TOKENS:] for out in outputs]
    reference = expected[:, -NEW_TOKENS:]
    row = {"batch": batch, "status": "ok", "first_generate_s": seconds[0],
           "tokens_per_s": batch * NEW_TOKENS / median, "step_ms": 1e3 * median / NEW_TOKENS,
           "tokens_equal_eager": all(torch.equal(tokens, reference) for tokens in new),
           "token_agreement": min(float((tokens == reference).float().mean()) for tokens in new)}
    if backend is not None:
        decode = backend.reports[-1]
        row.update(fxkiln_pieces=decode.pieces, fxkiln_captured_sizes=list(decode.captured_sizes),
                   fxkiln_capture_note=decode.capture_note, capture_s=decode.capture_seconds)
    return row


def child_rows(device_name: str, model: str, variant: str, batches: list[int],
               dtype_name: str, runs: int) -> None:
    import torch

    from models.presets import TINY_OF, hf_model

    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: intra-op threads only contend
    preset = model if device.type == "cuda" else TINY_OF[model]
    hf = hf_model(preset, device, getattr(torch, dtype_name))
    base = {"model": model, "preset": preset, "variant": variant, "dtype": dtype_name}
    for batch in batches:
        try:
            row = {**base, **time_batch(hf, variant, batch, runs, device)}
        except Exception:  # noqa: BLE001  (a variant that fails is a result, not a crash)
            lines = traceback.format_exc().strip().splitlines()[-ERROR_LINES:]
            row = report.failed_row(model, variant, batch, "failed", "\n".join(lines))
            row.update(preset=preset, dtype=dtype_name)
        print(ROW_PREFIX + json.dumps(row), flush=True)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def finalize(result: dict[str, Any]) -> dict[str, Any]:
    """Speedups in tokens/s over the other variants of the same (model, batch); the targets."""
    rows = result["rows"] = report.merge_rows([], result["rows"])
    speed = {report.row_key(row): row["tokens_per_s"] for row in rows if row["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok":
            model, variant, batch = report.row_key(row)
            row["speedup_over"] = {peer: row["tokens_per_s"] / speed[(model, peer, batch)]
                                   for peer in VARIANTS
                                   if peer != variant and (model, peer, batch) in speed}
    status = {report.row_key(row): row for row in rows}
    result["targets"] = {}
    for model, batch in TARGETS:
        ours = status.get((model, "hf-fxkiln", batch))
        peer = status.get((model, "hf-compile-reduce-overhead", batch))
        ratio = (ours or {}).get("speedup_over", {}).get("hf-compile-reduce-overhead")
        if ratio is not None:
            met: bool | None = ratio > 1.0
        elif ours and ours["status"] == "ok" and peer and peer["status"] != "ok":
            met = True  # ours ran, reduce-overhead failed: its failure is recorded in its row
        else:
            met = None  # a row is missing
        result["targets"][f"{model} batch {batch}: hf-fxkiln over reduce-overhead"] = {
            "measured": ratio, "peer_status": None if peer is None else peer["status"],
            "met": met}
    return result


def run(args: argparse.Namespace) -> Path:
    cuda = args.device.startswith("cuda")
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"generate-{'cuda' if cuda else 'cpu'}-{args.dtype}.json")
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "generate",
                                                               "rows": []}
    command = [sys.executable, str(Path(__file__).resolve()), "--device", args.device,
               "--dtype", args.dtype, "--runs", str(args.runs)]
    batches = [int(b) for b in args.batches.split(",")]
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            rows = run_child_rows(command, model, variant, batches, args.timeout)
            result["rows"] = report.merge_rows(result["rows"], rows)
            result.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), versions=versions(), device=args.device, dtype=args.dtype,
                new_tokens=NEW_TOKENS, prompt_tokens=PROMPT_TOKENS, source_tokens=SOURCE_TOKENS)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(report.dump(finalize(result)))
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--models", default="bart-large,llama-1b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batches", default=None, help="default 1,8 on cuda; 1,2 on cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--runs", type=int, default=3, help="timed generates per batch")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a child may take per batch (default 600 cuda, 900 cpu)")
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/generate-<device>-<dtype>.json")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batches = args.batches or ("1,8" if cuda else "1,2")
    args.timeout = args.timeout or (600.0 if cuda else 900.0)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: expected some of {list(VARIANTS)}")
    if args.child:
        child_rows(args.device, *args.child, [int(b) for b in args.batches.split(",")],
                   args.dtype, args.runs)
    else:
        run(args)


if __name__ == "__main__":
    main()
