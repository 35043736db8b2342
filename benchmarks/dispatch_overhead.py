"""What a kernel decision costs on the hot path, and what compile-time choice saves per token.

Measures, per call (median of many repetitions):
  env_read     an environment-backed lazy setting: a module `__getattr__` reading os.environ on
               every access (the pattern of vLLM's envs.py), defined below;
  attr_read    an attribute of a plain object;
  eager_op     the `fxkiln.rms_norm` dispatch op, which chooses its kernel on every call;
  specialized  the node the kernel_choice pass writes in its place, run inside a compiled graph;
  direct       the chosen kernel called directly from Python.
The three op timings are per op of a chain of CHAIN calls (a graph before the pass, the same
graph after it, a Python loop), so a graph's own call overhead is spread as it is in a model.
Per token: the dispatch ops of a Llama-3.2-1B-shaped graph (16 layers), counted on the traced
graph, times the per-op saving; and the measured difference of one-token forwards of that
graph (small widths, so the dispatch overhead is not buried under GEMMs) eager vs compiled.

    python benchmarks/dispatch_overhead.py [--device cpu|cuda] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from passes.kernel_choice import MATCHED_TARGETS  # noqa: E402
from runtime.registry import choose_kernel  # noqa: E402
from tests.fx_helpers import trace  # noqa: E402
from tests.kernels.helpers import LlamaShaped, choose_kernels, count_targets  # noqa: E402

CHAIN = 32
LLAMA_3_2_1B_LAYERS = 16
RESULTS = Path(__file__).resolve().parent / "results"


# -- the two ways of reading a setting ----------------------------------------------------------
def _env_backed_settings() -> types.ModuleType:
    """A module whose attributes are read from the environment on each access."""
    settings = types.ModuleType("env_settings")
    readers: dict[str, Callable[[], Any]] = {
        "FXKILN_BENCH_RMS_NORM": lambda: os.getenv("FXKILN_BENCH_RMS_NORM", "auto").lower(),
    }

    def __getattr__(name: str) -> Any:  # noqa: N807  (module-level __getattr__, PEP 562)
        if name in readers:
            return readers[name]()
        raise AttributeError(name)

    settings.__getattr__ = __getattr__  # type: ignore[method-assign]  # PEP 562 hook
    return settings


@dataclass(frozen=True)
class AttributeSettings:
    rms_norm: str = "auto"


# -- timing ---------------------------------------------------------------------------------------
def per_call_ns(fns: dict[str, tuple[Callable[[], Any], int]], device: torch.device,
                repeats: int, number: int) -> dict[str, float]:
    """Per name: median over `repeats` runs of `number` calls of fn, per call fn makes.

    The candidates take turns within each repetition, so drifts in machine load (other jobs,
    clock changes) fall on all of them alike.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for fn, _ in fns.values():  # warm-up
        for _ in range(max(number // 10, 1)):
            fn()
    for _ in range(repeats):
        for name, (fn, calls_per_run) in fns.items():
            sync()
            start = time.perf_counter_ns()
            for _ in range(number):
                fn()
            sync()
            runs[name].append((time.perf_counter_ns() - start) / (number * calls_per_run))
    return {name: statistics.median(values) for name, values in runs.items()}


class Chain(torch.nn.Module):
    """CHAIN dispatch-op calls in a row."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(CHAIN):
            x = torch.ops.fxkiln.rms_norm(x, self.weight, 1e-6)
        return x


def measure_ops(device: torch.device, dtype: torch.dtype, hidden: int,
                repeats: int, number: int) -> dict[str, Any]:
    x = torch.randn(1, hidden, device=device, dtype=dtype)  # one decode token
    weight = torch.ones(hidden, device=device, dtype=dtype)
    eager = trace(Chain(weight), (x,))
    compiled = trace(Chain(weight), (x,))
    choose_kernels(compiled, {}, device.type)
    (node,) = {n.target: n for n in compiled.graph.nodes if n.op == "call_function"}.values()
    constants = node.args[3:]
    kernel = node.target
    impl = choose_kernel("rms_norm", "auto", device, dtype)
    assert impl.fn is kernel

    def direct() -> None:
        y = x
        for _ in range(CHAIN):
            y = kernel(y, weight, 1e-6, *constants)

    env, attrs = _env_backed_settings(), AttributeSettings()
    read_number = number * 200
    with torch.inference_mode():
        timings = per_call_ns({
            "env_read": (lambda: env.FXKILN_BENCH_RMS_NORM, 1),
            "attr_read": (lambda: attrs.rms_norm, 1),
            "empty_call": (lambda: None, 1),
        }, device, repeats, read_number)
        timings |= per_call_ns({
            "eager_op": (lambda: eager(x), CHAIN),
            "specialized": (lambda: compiled(x), CHAIN),
            "direct": (direct, CHAIN),
        }, device, repeats, number)
    return {"kernel": f"{impl.name} ({kernel.__module__}.{kernel.__name__})",
            "launch_constants": list(constants), "median_ns": timings}


def _dispatch_op_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    return {op: count_targets(gm, {t for t, name in MATCHED_TARGETS.items() if name == op})
            for op in sorted(set(MATCHED_TARGETS.values()))}


def project_llama_counts() -> tuple[dict[str, int] | None, str]:
    """Dispatch ops in the traced graph of the project's Llama with Llama-3.2-1B's 16 layers.

    Widths are small (they do not change the op count); None when models.llama is absent.
    """
    try:
        import transformers

        from models.llama import LlamaForCausalLM
    except ImportError as missing:
        return None, f"models.llama unavailable ({missing})"
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=LLAMA_3_2_1B_LAYERS, max_position_embeddings=64)
    gm = torch.fx.symbolic_trace(LlamaForCausalLM(config))
    return _dispatch_op_counts(gm), "models.llama.LlamaForCausalLM, symbolic_trace"


def measure_llama(device: torch.device, dtype: torch.dtype, repeats: int,
                  number: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LlamaShaped(vocab=128, hidden=64, layers=LLAMA_3_2_1B_LAYERS, heads=4, kv_heads=2,
                        head_size=16, intermediate=128).to(device, dtype)
    inputs = tuple(t.to(device) for t in model.example_inputs(1))  # one decode token
    with torch.inference_mode():
        eager = trace(model, inputs)
        counts = _dispatch_op_counts(eager)
        compiled = trace(model, inputs)
        choose_kernels(compiled, {}, device.type)
        forward_ns = per_call_ns({"eager": (lambda: eager(*inputs), 1),
                                  "compiled": (lambda: compiled(*inputs), 1)},
                                 device, repeats, number)
    project_counts, project_source = project_llama_counts()
    if project_counts is not None and project_counts != counts:
        raise RuntimeError(f"the timed Llama-shaped graph has dispatch ops {counts}, the project "
                           f"Llama {project_counts}: make them agree before comparing")
    return {"layers": LLAMA_3_2_1B_LAYERS, "dispatch_ops": counts,
            "dispatch_ops_total": sum(counts.values()), "forward_ns": forward_ns,
            "counted": "call_function nodes targeting torch.ops.fxkiln.* in the symbolic_trace "
                       "graph with Llama-3.2-1B's 16 layers (vLLM's pattern: first layer "
                       "rms_norm + fused_add, later layers 2 fused_add, one rotary and one "
                       "silu_and_mul per layer, final fused_add)",
            "counted_on": {"timed": "tests.kernels.helpers.LlamaShaped (hidden 64)",
                           "cross_checked": project_source,
                           "project_llama_dispatch_ops": project_counts}}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def run(device: torch.device) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = 2048  # Llama-3.2-1B's hidden size
    ops = measure_ops(device, dtype, hidden, repeats=15, number=60)
    llama = measure_llama(device, dtype, repeats=9, number=10)
    ns = ops["median_ns"]
    saved_per_op = ns["eager_op"] - ns["specialized"]
    total = llama["dispatch_ops_total"]
    ratios = {
        "env_read/attr_read": ns["env_read"] / ns["attr_read"],
        "eager_op/specialized": ns["eager_op"] / ns["specialized"],
        "specialized/direct": ns["specialized"] / ns["direct"],
    }
    return {
        "benchmark": "dispatch_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(), **_versions(),
        "op": "rms_norm", "shape": [1, hidden], "dtype": str(dtype).removeprefix("torch."),
        "chain": CHAIN, **ops, "ratios": ratios,
        "target_specialized_over_direct": 1.05,
        "meets_target": ratios["specialized/direct"] <= 1.05,
        "llama": llama,
        "per_token_us": {
            "dispatch_overhead_from_per_op": total * saved_per_op / 1e3,
            "env_reads_one_per_op": total * ns["env_read"] / 1e3,
            "measured_eager_minus_compiled":
                (llama["forward_ns"]["eager"] - llama["forward_ns"]["compiled"]) / 1e3,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    ns = result["median_ns"]
    print(f"dispatch overhead on {result['device_name']} ({result['device']}), torch "
          f"{result['torch']}, triton {result['triton']}, {result['dtype']} {result['shape']}")
    print(f"kernel: {result['kernel']}")
    print(f"{'per call':<34}{'median ns':>12}")
    for key, label in (("env_read", "environment-backed lazy read"),
                       ("attr_read", "attribute read"), ("empty_call", "empty call (baseline)"),
                       ("eager_op", "eager dispatch op"), ("specialized", "specialized op (graph)"),
                       ("direct", "kernel called directly")):
        print(f"{label:<34}{ns[key]:>12.1f}")
    for name, value in result["ratios"].items():
        print(f"{name:<34}{value:>12.3f}")
    print(f"{'specialized/direct <= 1.05':<34}{str(result['meets_target']):>12}")
    llama = result["llama"]
    print(f"Llama-3.2-1B-shaped graph: {llama['dispatch_ops_total']} dispatch ops "
          f"{llama['dispatch_ops']}")
    for name, value in result["per_token_us"].items():
        print(f"per token, {name:<40}{value:>10.1f} us")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/dispatch_overhead-<device>.json)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.device == "cpu":
        torch.set_num_threads(1)  # one decode token: threads only add noise
    result = run(torch.device(args.device))
    out = args.out or RESULTS / f"dispatch_overhead-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
