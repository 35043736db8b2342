"""Host overhead of one replayed step of a Dynamo graph: what the signature runner adds.

A Hugging Face Llama with the Llama-3.2-1B layer count (16 layers, so as many cache tensors
per step as the real model) but tiny widths; its decode step with a StaticCache is compiled
through the fxkiln pipeline, and its runner is given a graph device whose "graphs" replay
nothing. What a step then costs on the host is the runner's own work: the signature, the
address checks of the cache tensors, copying the per-call inputs in, writing back, cloning
the outputs. Two figures, median over `--steps` calls after warm-up:

  runner_us    SignatureRunner.__call__ on the step's arguments (the replay path alone)
  forward_us   the compiled forward on the arguments generate gave it (Dynamo's guards and
               the runner; the null graphs leave the cache as it was, so every call is alike)

    python benchmarks/replay_overhead.py [--steps 2000] [--out F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402

from compiler import CompileConfig  # noqa: E402
from compiler.capture import concrete_inputs  # noqa: E402
from compiler.pipeline import compile_dynamo_graph, dynamo_graph_inputs  # noqa: E402
from runtime.graph_device import CapturedGraph, GraphDevice  # noqa: E402
from runtime.signature_runner import SignatureRunner  # noqa: E402

LAYERS = 16


class _NoGraph:
    def __init__(self, outputs: Any) -> None:
        self.outputs = outputs

    def replay(self) -> None:
        """Nothing: the device's own work is not what is measured."""


class NullGraphDevice(GraphDevice):
    """A device whose captured graphs replay nothing (the outputs of the capture run stay)."""

    uses_graphs = True

    def capture_graph(self, run: Callable[..., Any], args: Sequence[Any], *, key: Hashable,
                      keep_outputs: bool, host_scalars: frozenset[int] = frozenset(),
                      ) -> tuple[CapturedGraph, Any]:
        outputs = run(*args)
        return _NoGraph(outputs), outputs


def _median_us(call: Callable[[], Any], steps: int) -> float:
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return 1e6 * statistics.median(seconds[steps // 10:])


def measure(steps: int) -> dict[str, Any]:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    slots: dict[str, Any] = {}

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = compile_dynamo_graph(gm, example_inputs, CompileConfig(device="cpu",
                                                                          capture_sizes=()))
        inputs = concrete_inputs(example_inputs)
        slots["runner"] = runner = SignatureRunner(
            compiled.graph_module, dynamo_graph_inputs(compiled.graph_module, inputs), inputs,
            graph_device=NullGraphDevice("cpu"), capture_sizes=(1,))

        def call(*args: Any) -> Any:
            slots["args"] = args
            return runner(*args)
        return call

    # generate drives the compiled forward as a user's would: prefill and decode graphs
    compiled_forward = torch.compile(hf.forward, backend=backend)
    recorded: dict[str, Any] = {}

    def recording(*args: Any, **kwargs: Any) -> Any:
        recorded["kwargs"] = kwargs
        return compiled_forward(*args, **kwargs)

    hf.forward = recording
    ids = torch.zeros(1, 8, dtype=torch.long)
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                    min_new_tokens=6, do_sample=False, cache_implementation="static",
                    disable_compile=True)  # the decode step: watched, captured, replayed
        runner, args, kwargs = slots["runner"], slots["args"], recorded["kwargs"]
        runner_us = _median_us(lambda: runner(*args), steps)
        forward_us = _median_us(lambda: compiled_forward(**kwargs), steps // 4)
    (entry,) = runner.entries.values()
    return {"runner_us": runner_us, "forward_us": forward_us, "layers": LAYERS,
            "graph_inputs": len(args), "copied_inputs": len(entry.staged.copy_into),
            "checked_in_place": len(entry.staged.checked),
            "declared_static": len(entry.staged.declared), "signature": entry.label}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "replay_overhead-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"benchmark": "replay_overhead", "device": platform.processor() or "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              **measure(args.steps)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"runner {result['runner_us']:.1f} us, forward through Dynamo "
          f"{result['forward_us']:.1f} us per replayed step ({result['graph_inputs']} graph "
          f"inputs, {result['checked_in_place']} checked in place, {result['copied_inputs']} "
          f"copied); wrote {args.out}")


if __name__ == "__main__":
    main()
