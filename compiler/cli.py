"""Command line: `python -m compiler <command>` (also installed as `fxkiln`)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import torch

from compiler.compile import compile_model
from compiler.config import CompileConfig
from passes import DEFAULT_PIPELINE, PASSES
from runtime.registry import kernel_implementations, kernel_ops


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compiler",
                                     description="fxkiln: an inference compiler for PyTorch models")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    demo = commands.add_parser("demo", help="compile a small built-in model, run it, print the report")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    demo.add_argument("--tokens", type=int, default=16, help="tokens per call (default 16)")
    demo.add_argument("--verify", action="store_true", help="check every pass numerically")
    commands.add_parser("passes", help="list the passes and the default pipeline")
    commands.add_parser("kernels", help="list the dispatch ops and their implementations")
    commands.add_parser("config", help="print the config FXKILN_* variables give, and its hash")
    args = parser.parse_args(argv)
    command = {"demo": _demo, "passes": _passes, "kernels": _kernels, "config": _config}[args.command]
    try:
        return command(args)
    except ValueError as exc:  # bad config or input: say what, without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _demo(args: argparse.Namespace) -> int:
    from models.tiny import TinyDecoder

    torch.manual_seed(0)
    config = CompileConfig(device=args.device, verify=args.verify)
    device = config.resolved_device()
    model = TinyDecoder().to(device).eval()
    print(f"model: TinyDecoder ({sum(p.numel() for p in model.parameters()):,} parameters) "
          f"on {device}")
    compiled = compile_model(model, config=config)
    print(compiled.report)
    (input_ids,) = model.example_inputs(args.tokens)
    input_ids = input_ids.to(device)
    with torch.no_grad():
        expected = model(input_ids)
    start = time.perf_counter()
    actual = compiled(input_ids)
    seconds = time.perf_counter() - start
    equal = torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)
    difference = (actual - expected).abs().max().item()
    print(f"ran {args.tokens} tokens in {seconds * 1e3:.2f} ms; "
          f"equal to eager: {'yes' if equal else 'NO'} (largest difference {difference:.2e})")
    return 0 if equal else 1


def _passes(args: argparse.Namespace) -> int:
    for name, cls in PASSES.items():
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:16} {summary}")
    print(f"default pipeline: {', '.join(DEFAULT_PIPELINE)}")
    return 0


def _kernels(args: argparse.Namespace) -> int:
    for op in kernel_ops():
        print(f"{op:20} {', '.join(sorted(kernel_implementations(op)))}")
    return 0


def _config(args: argparse.Namespace) -> int:
    config = CompileConfig.from_env()
    print(json.dumps(config.to_dict(), indent=2))
    print(f"hash: {config.hash()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
