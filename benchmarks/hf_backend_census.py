"""Op census of a replayed decode step, on CPU: what a step runs inside and outside its graph.

Hugging Face `generate(cache_implementation="static")` with `forward` compiled by the fxkiln
backend through the replay simulator (`CompileConfig(simulate_capture=True)`), on the tiny
presets; one replayed decode step is counted with a dispatch mode:

  inside_ops     aten ops the replayed graph runs that are not views, each call of a fxkiln
                 kernel (a dispatch op bound by kernel_choice) counted as one op: the proxy
                 for the kernels a GPU replay launches (native kernels run on CPU; on the GPU
                 the Triton kernel of a fused op is one launch)
  outside_ops    aten ops the signature runner runs around the replay (staging, clones)
  runner_calls   Python function calls of the runner's call, the replay itself not counted
  graph_ops      compute nodes of the rewritten graph (not views, getitems or placeholders);
                 what SDPA runs inside itself (a boolean mask's conversion) is not seen here

`before` runs the default pipeline less the passes named in `NEW_PASSES` (this branch's
before/after in one run). fxkiln's own model of the same preset, compiled with `compile_model`,
gets the graph count (`ours_graph_ops`: its serving graph, prefill included).

    python benchmarks/hf_backend_census.py [--models llama-tiny,bart-tiny] [--layers N] [--out F]
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import compiler  # noqa: E402
from compiler import CompileConfig  # noqa: E402
from passes import DEFAULT_PIPELINE  # noqa: E402
from passes.fx_utils import is_getitem, is_view_like  # noqa: E402
from runtime.piece_runner import NodeTracker  # noqa: E402
from runtime.registry import kernel_implementations, kernel_ops  # noqa: E402
from runtime.replay_simulator import SimulatedGraph  # noqa: E402
from runtime.signature_runner import SignatureRunner  # noqa: E402

NEW_PASSES = ("lift_cache_attention",)
NEW_TOKENS = 6
NO_KERNEL = frozenset({"aten._unsafe_view.default", "aten.alias.default"})


KERNELS = {impl.fn: f"fxkiln.{op}" for op in kernel_ops()
           for impl in kernel_implementations(op).values()}


class OpCount(TorchDispatchMode):
    """Counts the aten ops that are not views, inside replays and outside them apart; the ops
    inside a fxkiln kernel's call are that kernel's (counted once, by `run_node`)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside_replay = False
        self.in_kernel = False
        self.inside: collections.Counter[str] = collections.Counter()
        self.outside: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = str(func)
        if not func.is_view and name not in NO_KERNEL and not self.in_kernel:
            (self.inside if self.inside_replay else self.outside)[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_replays(count: OpCount, profile: cProfile.Profile | None = None) -> Iterator[None]:
    """Replays of simulated graphs mark their ops as inside (and are not profiled); a node
    that calls a fxkiln kernel counts as one op."""
    replay, run_node = SimulatedGraph.replay, NodeTracker.run_node

    def marked(graph: SimulatedGraph) -> None:
        if profile is not None:
            profile.disable()
        count.inside_replay = True
        try:
            replay(graph)
        finally:
            count.inside_replay = False
            if profile is not None:
                profile.enable()

    def one_per_kernel(tracker: NodeTracker, node: torch.fx.Node) -> Any:
        kernel = KERNELS.get(node.target) if node.op == "call_function" else None
        if kernel is None or not count.inside_replay:
            return run_node(tracker, node)
        count.inside[kernel] += 1
        count.in_kernel = True
        try:
            return run_node(tracker, node)
        finally:
            count.in_kernel = False

    SimulatedGraph.replay = marked  # type: ignore[method-assign]
    NodeTracker.run_node = one_per_kernel  # type: ignore[method-assign]
    try:
        yield
    finally:
        SimulatedGraph.replay = replay  # type: ignore[method-assign]
        NodeTracker.run_node = run_node  # type: ignore[method-assign]


def graph_ops(gm: torch.fx.GraphModule) -> int:
    return sum(1 for node in gm.graph.nodes if node.op in ("call_function", "call_method")
               and not is_view_like(node) and not is_getitem(node))


def hf_census(preset: str, passes: tuple[str, ...], layers: int) -> dict[str, Any]:
    """The census of one replayed decode step of HF generate with the fxkiln backend."""
    torch._dynamo.reset()
    hf = _hf(preset, layers)
    config = CompileConfig(device="cpu", simulate_capture=True, capture_sizes=(1, 2, 4),
                           prefill_capture_sizes=(), passes=passes)
    backend = compiler.backend(config)
    hf.forward = torch.compile(hf.forward, backend=backend)
    replayed: list[Any] = []  # the counted call's OpCount, the profiled call's calls
    call = SignatureRunner.__call__

    def watched(runner: SignatureRunner, *args: Any) -> Any:
        """The first replayed call is counted, the second profiled (apart: the counting
        mode's own Python calls are no runner calls)."""
        if not runner.entries or len(replayed) == 2:
            return call(runner, *args)
        count, profile = OpCount(), cProfile.Profile()
        if not replayed:
            with counting_replays(count), count:
                outputs = call(runner, *args)
            replayed.append(count)
            return outputs
        with counting_replays(count, profile):
            profile.enable()
            outputs = call(runner, *args)
            profile.disable()
        replayed.append(pstats.Stats(profile).total_calls)
        return outputs

    SignatureRunner.__call__ = watched  # type: ignore[method-assign]
    try:
        _generate(hf)
    finally:
        SignatureRunner.__call__ = call  # type: ignore[method-assign]
    count, calls = replayed
    return {"inside_ops": sum(count.inside.values()), "outside_ops": sum(count.outside.values()),
            "outside": dict(count.outside), "runner_calls": calls,
            "graph_ops": graph_ops(backend.graph_modules[-1]),
            "inside": dict(count.inside.most_common())}


def ours_graph_ops(preset: str, layers: int) -> int:
    """Compute nodes of fxkiln's own model of `preset`, compiled by `compile_model`."""
    from models import from_hf

    compiled = compiler.compile_model(from_hf(_hf(preset, layers)),
                                      config=CompileConfig(device="cpu", capture_sizes=()))
    return graph_ops(compiled.graph_module)


def _hf(preset: str, layers: int) -> Any:
    """The preset's Hugging Face model, with `layers` decoder layers (0: the preset's)."""
    from models.presets import hf_model

    if not layers:
        return hf_model(preset)
    if preset.startswith("bart"):
        return hf_model(preset, decoder_layers=layers, encoder_layers=layers)
    return hf_model(preset, num_hidden_layers=layers)


def _generate(hf: Any) -> None:
    ids = torch.randint(3, hf.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                   cache_implementation="static", disable_compile=True)
    with torch.no_grad():
        if not hf.config.is_encoder_decoder:
            options["attention_mask"] = torch.ones_like(ids)
        hf.generate(ids, **options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-tiny,bart-tiny")
    parser.add_argument("--layers", type=int, default=0,
                        help="decoder layers instead of the preset's (16: Llama-1B's count)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "hf_backend_census-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    before = tuple(name for name in DEFAULT_PIPELINE if name not in NEW_PASSES)
    rows = []
    for preset in args.models.split(","):
        row: dict[str, Any] = {"preset": preset, "layers": args.layers or None}
        for label, passes in (("before", before), ("after", DEFAULT_PIPELINE)):
            row[label] = hf_census(preset, passes, args.layers)
        row["ours_graph_ops"] = ours_graph_ops(preset, args.layers)
        rows.append(row)
        print(f"{preset}: inside the replay {row['before']['inside_ops']} -> "
              f"{row['after']['inside_ops']} ops, graph ops {row['before']['graph_ops']} -> "
              f"{row['after']['graph_ops']} (fxkiln's own model: {row['ours_graph_ops']}); "
              f"outside {row['after']['outside_ops']} ops, {row['after']['runner_calls']} "
              f"Python calls")
    result = {"benchmark": "hf_backend_census", "device_type": "cpu",
              "torch": torch.__version__, "new_passes": list(NEW_PASSES), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
