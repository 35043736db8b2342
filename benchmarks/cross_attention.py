"""What qkv_split saves on our BART: cross-attention projection time and decode-step time.

Pass off (the pipeline without qkv_split and qkv_fuse) against pass on (the default pipeline),
on fxkiln's BART (`models/bart.py`: one fused QKV projection for cross-attention, called on the
decoder stream for Q and on the encoder stream for K and V), BART-large shapes, random weights.

  cross_q        the decoder-side cross-attention projection of one layer, `batch` tokens (run
                 every decode step): the fused QKV GEMM then keep Q, against the Q GEMM alone;
  cross_kv       the encoder-side call, `batch * CONTEXT` encoder tokens (run once, at prefill):
                 the fused GEMM then keep K, V, against the KV GEMM alone;
  decode_step    one decode step of the whole model (one new token per sequence, CONTEXT tokens
                 of self-attention context and CONTEXT encoder tokens) through DecodeSession,
                 graph run eagerly; on CUDA also replayed as CUDA graphs (`+graphs`).
GEMM FLOPs of one decode step are counted by torch's flop counter (mm/addmm), and the decoder
layers' share (the LM head's FLOPs taken out) should fall by 2d^2 of 16d^2 per token: 12.5%.
Times are medians of synchronized wall times after warm-up.

    python benchmarks/cross_attention.py [--device cpu|cuda] [--dtype bf16|fp32] [--out PATH]
On CPU the model keeps BART-large widths but has 2 decoder layers, a small vocabulary and a short
context, so that it finishes in a couple of minutes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from compiler import CompileConfig, compile_model  # noqa: E402
from models import from_hf  # noqa: E402
from runtime.generation import DecodeSession  # noqa: E402

BATCHES = (1, 8, 64, 256)
PASS_OFF = ("kernel_choice", "cleanup")
PASS_ON = ("kernel_choice", "qkv_split", "qkv_fuse", "cleanup")
SETTINGS = {  # device type -> model and timing settings
    "cuda": dict(decoder_layers=12, encoder_layers=12, vocab=50265, context=256, warmup=5,
                 timed=20, projection_repeats=50),
    "cpu": dict(decoder_layers=2, encoder_layers=1, vocab=1024, context=32, warmup=2, timed=8,
                projection_repeats=8),
}


def build_bart(device: torch.device, dtype: torch.dtype, settings: dict[str, Any]) -> nn.Module:
    """Our BART with BART-large widths (d 1024, 16 heads, FFN 4096) and random weights."""
    config = transformers.BartConfig(
        vocab_size=settings["vocab"], d_model=1024, encoder_layers=settings["encoder_layers"],
        decoder_layers=settings["decoder_layers"], encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
        max_position_embeddings=1024)
    torch.manual_seed(0)
    with torch.device(device):
        hf = transformers.BartForConditionalGeneration(config).to(dtype).eval()
    return from_hf(hf)


class CrossProjection(nn.Module):
    """One decoder layer's cross-attention projection, read the way our BART reads it."""

    def __init__(self, qkv_proj: nn.Module, keep: str) -> None:
        super().__init__()
        self.qkv_proj, self.keep = qkv_proj, keep
        self.sizes = [qkv_proj.q_size, qkv_proj.kv_size, qkv_proj.kv_size]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        return (q,) if self.keep == "q" else (k, v)


def median_ms(runs: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
              timed: int) -> dict[str, float]:
    """Per name, the median wall time of run() in ms; the runs take turns, so drifts in machine
    load fall on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(warmup + timed):
        for name, run in runs.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def projection_rows(model: nn.Module, batch: int, device: torch.device, dtype: torch.dtype,
                    settings: dict[str, Any]) -> dict[str, Any]:
    qkv_proj = model.model.decoder.layers[0].encoder_attn.qkv_proj
    row: dict[str, Any] = {}
    for keep, tokens in (("q", batch), ("kv", batch * settings["context"])):
        x = torch.randn(tokens, 1024, device=device, dtype=dtype)
        runs = {}
        for label, passes in (("off", PASS_OFF), ("on", PASS_ON)):
            config = CompileConfig(device=device.type, passes=passes, capture_sizes=())
            compiled = compile_model(CrossProjection(qkv_proj, keep).eval(), (x,), config)
            runs[f"cross_{keep}_{label}_ms"] = lambda compiled=compiled: compiled(x)
        with torch.no_grad():
            row.update(median_ms(runs, device, 3, settings["projection_repeats"]))
        row[f"cross_{keep}_on_over_off"] = row[f"cross_{keep}_on_ms"] / row[f"cross_{keep}_off_ms"]
    return row


def decode_session(step_model: Any, model: nn.Module, batch: int, device: torch.device,
                   settings: dict[str, Any]) -> tuple[DecodeSession, torch.Tensor]:
    context, steps = settings["context"], settings["warmup"] + settings["timed"] + 1
    session = DecodeSession(step_model, batch, context - steps, steps + 1, context, device)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (batch, context - steps), device=device)
    source = torch.randint(3, vocab, (batch, context), device=device)
    with torch.no_grad():
        tokens = session.prefill(prompt, source)[:, -1].argmax(-1)
    return session, tokens


def step_row(variants: dict[str, Any], model: nn.Module, batch: int, device: torch.device,
             settings: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    steps = {}
    for label, step_model in variants.items():
        session, tokens = decode_session(step_model, model, batch, device, settings)
        steps[label] = _stepper(session, tokens)
        if "+graphs" not in label:  # replayed graphs run no ops the counter could see
            with torch.no_grad():
                row[f"decode_step_{label}_gemm_flops"] = _gemm_flops(steps[label])
    with torch.no_grad():
        times = median_ms(steps, device, settings["warmup"], settings["timed"] - 1)
    row.update({f"decode_step_{label}_ms": ms for label, ms in times.items()})
    for suffix in ("", "+graphs"):
        if f"decode_step_off{suffix}_ms" in row:
            row[f"decode_step{suffix}_on_over_off"] = (row[f"decode_step_on{suffix}_ms"] /
                                                      row[f"decode_step_off{suffix}_ms"])
    lm_head = 2 * batch * 1024 * model.config.vocab_size
    off, on = (row[f"decode_step_{label}_gemm_flops"] - lm_head for label in ("off", "on"))
    row["decoder_layer_gemm_flops_off"], row["decoder_layer_gemm_flops_on"] = off, on
    row["decoder_layer_gemm_flops_fall"] = 1 - on / off
    return row


def _stepper(session: DecodeSession, tokens: torch.Tensor) -> Callable[[], None]:
    state = {"tokens": tokens}

    def step() -> None:
        state["tokens"] = session.decode(state["tokens"]).argmax(-1)

    return step


def _gemm_flops(run: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    counts = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm")))


def run(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    settings = SETTINGS[device.type]
    model = build_bart(device, dtype, settings)
    variants: dict[str, Any] = {}
    reports = {}
    for label, passes in (("off", PASS_OFF), ("on", PASS_ON)):
        compiled = compile_model(model, config=CompileConfig(device=device.type, passes=passes,
                                                             capture_sizes=()))
        variants[label], reports[label] = compiled, compiled.report
        if device.type == "cuda":
            graphs = CompileConfig(device="cuda", passes=passes, capture_sizes=BATCHES)
            variants[f"{label}+graphs"] = compile_model(model, config=graphs)
    rows = []
    for batch in BATCHES:
        row = {"batch": batch, **projection_rows(model, batch, device, dtype, settings),
               **step_row(variants, model, batch, device, settings)}
        rows.append(row)
        print(f"batch {batch:4}: cross Q {row['cross_q_off_ms']:8.3f} -> "
              f"{row['cross_q_on_ms']:8.3f}"
              f" ms ({row['cross_q_on_over_off']:.2f}x)  cross KV {row['cross_kv_off_ms']:8.3f} ->"
              f" {row['cross_kv_on_ms']:8.3f} ms ({row['cross_kv_on_over_off']:.2f}x)  step "
              f"{row['decode_step_off_ms']:8.3f} -> {row['decode_step_on_ms']:8.3f} ms "
              f"({row['decode_step_on_over_off']:.3f}x)"
              + (f"  graphs {row['decode_step_off+graphs_ms']:7.3f} -> "
                 f"{row['decode_step_on+graphs_ms']:7.3f} ms "
                 f"({row['decode_step+graphs_on_over_off']:.3f}x)"
                 if "decode_step_off+graphs_ms" in row else "")
              + f"  layer GEMM FLOPs -{100 * row['decoder_layer_gemm_flops_fall']:.2f}%",
              flush=True)
    return {
        "settings": {**settings, "d_model": 1024, "heads": 16, "ffn": 4096, "batches": BATCHES},
        "compile_report_flops": {label: [r.flops_before, r.flops_after]
                                 for label, r in reports.items()},
        "compile_report_weight_bytes": {label: [r.weight_bytes_before, r.weight_bytes_after]
                                        for label, r in reports.items()},
        "qkv_split_matches": reports["on"].passes["qkv_split"].matches,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                        help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    result = {
        "benchmark": "cross_attention",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "dtype": dtype_name,
        "pass_off": PASS_OFF, "pass_on": PASS_ON,
        **run(device, dtype),
    }
    default_out = Path(__file__).parent / "results" / f"cross_attention-{device.type}.json"
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
