"""Command line: `python -m compiler <command>` (also installed as `fxkiln`)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from compiler.config import CompileConfig
from compiler.demo import DEFAULT_MODELS, DTYPES, resolve_dtype, run_demo
from models.presets import PRESETS
from passes import DEFAULT_PIPELINE, PASSES
from runtime.registry import kernel_implementations, kernel_ops


NOISY_SPREAD = 0.5  # a run 50% slower than the best of its side


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compiler",
                                     description="fxkiln: an inference compiler for PyTorch models")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    demo = commands.add_parser(
        "demo", help="compile fxkiln's BART and Llama, generate, compare with eager")
    demo.add_argument("--model", action="append", choices=sorted(PRESETS), metavar="NAME",
                      help=f"a model preset, repeatable: {', '.join(sorted(PRESETS))} "
                           f"(default: {' and '.join(DEFAULT_MODELS)})")
    demo.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    demo.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                      help="auto (default: bfloat16 on CUDA, else float32)")
    demo.add_argument("--batch", type=_positive, default=4, help="sequences (default 4)")
    demo.add_argument("--prompt-len", type=_positive, default=8,
                      help="prompt tokens per sequence (default 8)")
    demo.add_argument("--new-tokens", type=_positive, default=32,
                      help="tokens to generate per sequence (default 32)")
    demo.add_argument("--threads", type=_positive, default=1,
                      help="CPU intra-op threads (default 1: tiny models only contend for more)")
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
    torch.set_num_threads(args.threads)
    config = CompileConfig(device=args.device, verify=args.verify)
    dtype = resolve_dtype(args.dtype, config.resolved_device())
    all_equal = True
    for name in args.model or DEFAULT_MODELS:
        run = run_demo(name, config, dtype, args.batch, args.prompt_len, args.new_tokens)
        print(f"== {name}: {run.description}")
        print(run.compiled.report)
        timing = run.timing
        eager_rate = run.tokens_per_second(timing.eager_best)
        compiled_rate = run.tokens_per_second(timing.compiled_best)
        difference = run.first_difference()
        where = "" if difference is None else \
            f" (first difference: sequence {difference[0]}, step {difference[1]})"
        print(f"generated {args.batch} x {args.new_tokens} tokens (greedy, prompt "
              f"{args.prompt_len}); equal to eager: {'yes' if run.equal else 'NO'}{where}")
        print(f"tokens/s: eager {eager_rate:,.1f}, compiled {compiled_rate:,.1f} "
              f"({timing.speedup:.2f}x; best of {len(timing.eager)} runs each, interleaved"
              f"{_noise(timing.spread)})")
        print(_graphs_note(config.resolved_device(), run.compiled.report.captured_sizes))
        print()
        all_equal &= run.equal
    return 0 if all_equal else 1


def _noise(spread: float) -> str:
    """A warning when runs varied so much that the ratio is mostly the machine's noise."""
    return f"; noisy: runs varied by up to {spread:.0%}" if spread > NOISY_SPREAD else ""


def _graphs_note(device: torch.device, captured: Sequence[int]) -> str:
    if device.type != "cuda":
        return (f"note: CUDA graphs are GPU-only; on {device.type} nothing is captured, so this "
                f"compares the rewritten graph (the passes alone) with eager")
    if not captured:
        return "note: no graphs were captured; the compiled pieces run eagerly"
    return f"graphs: captured for token counts {', '.join(map(str, captured))}"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text}")
    return value


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
