"""Host work of a whole-step decode outside its replayed graph, counted on CPU.

A CPU proxy for the host time a GPU decode step spends before and after its replay: the tiny
presets compiled with the replay simulator (`simulate_capture=True`, Triton attention
interpreted), one prefilled `DecodeSession`, then steady-state `decode` steps. Per step:

  ops           aten ops dispatched outside the graph (a TorchDispatchMode, paused while the
                simulator replays a graph: what runs there is the graph's own work)
  copies        of those, the ops that write device memory (everything but views and metadata)
  python_calls  Python and C function calls (sys.setprofile), also paused during replays
  generate_*    the same per decode step of `generate` (the step and the loop's own work:
                choosing and recording tokens, EOS flags), without and with (`_eos`) EOS

Each CUDA op costs roughly 5-10 us of host time, a Python call ~0.1-1 us; the counts, unlike
CPU timings, are stable on a shared machine.

    python benchmarks/host_work.py [--models llama-tiny,bart-tiny] [--batches 1,4] [--out F]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CAPTURE_SIZES = (1, 2, 4)
PROMPT_LEN, STEPS = 4, 6
# ops that only make views or read metadata: no kernel on a device
VIEW_OPS = frozenset({"slice", "select", "view", "_unsafe_view", "alias", "as_strided",
                      "unsqueeze", "squeeze", "expand", "t", "transpose", "permute",
                      "reshape", "detach", "split", "unbind", "narrow", "view_as"})


class OutsideGraphOps(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active and not `paused`, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if not self.paused:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def copies(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in VIEW_OPS)


@contextmanager
def replays_paused(*pausable: Any) -> Iterator[None]:
    """While active, each of `pausable` is `paused` while the simulator replays a graph or does
    its own bookkeeping (clobbering graph memory, refilling padding: no work on a GPU)."""
    from runtime.replay_simulator import SimulatedGraph, SimulatedGraphDevice

    def pausing(method: Callable[..., Any]) -> Callable[..., Any]:
        def paused(*args: Any) -> Any:
            for counter in pausable:
                counter.paused = True
            try:
                return method(*args)
            finally:
                for counter in pausable:
                    counter.paused = False
        return paused

    patched = [(SimulatedGraph, "replay"), (SimulatedGraphDevice, "before_replay"),
               (SimulatedGraphDevice, "fill_padding")]
    originals = [getattr(owner, name) for owner, name in patched]
    for (owner, name), method in zip(patched, originals):
        setattr(owner, name, pausing(method))
    try:
        yield
    finally:
        for (owner, name), method in zip(patched, originals):
            setattr(owner, name, method)


class PythonCalls:
    """Counts Python and C calls (sys.setprofile) while active and not `paused`."""

    def __init__(self) -> None:
        self.paused = False
        self.calls = 0

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if not self.paused and event in ("call", "c_call"):
            self.calls += 1

    @contextmanager
    def counting(self) -> Iterator[None]:
        sys.setprofile(self._profile)
        try:
            yield
        finally:
            sys.setprofile(None)


def count_steps(step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """Per-step averages of `steps` calls of `step()` (ops, copies, Python calls)."""
    ops, calls = OutsideGraphOps(), PythonCalls()
    with replays_paused(ops, calls), ops:
        for _ in range(steps):
            step()
    with replays_paused(calls), calls.counting():  # apart: the mode's own calls would count
        for _ in range(steps):
            step()
    return {"ops": sum(ops.ops.values()) / steps, "copies": ops.copies / steps,
            "python_calls": calls.calls / steps,
            "ops_by_name": {name: n / steps for name, n in sorted(ops.ops.items())}}


def compiled_tiny(preset: str) -> tuple[Any, Any]:
    """(our model, compiled with whole-step graphs in the replay simulator) of a tiny preset."""
    from compiler import CompileConfig, compile_model
    from models import from_hf
    from models.presets import hf_model

    model = from_hf(hf_model(preset))
    config = CompileConfig(device="cpu", capture_sizes=CAPTURE_SIZES, simulate_capture=True,
                           kernels={"attention": "triton"}, kv_cache_tokens=256,
                           prefill_capture_sizes=())
    return model, compile_model(model, config=config)


def decode_host_work(model: Any, compiled: Any, batch: int) -> dict[str, Any]:
    """Counts of steady-state `DecodeSession.decode` steps of `compiled` at `batch` rows."""
    from runtime.generation import DecodeSession

    generator = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    encoder = model.is_encoder_decoder
    session = DecodeSession(compiled, batch, PROMPT_LEN, 3 * STEPS + 2,
                            PROMPT_LEN if encoder else None)
    source = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=generator)
    prompt = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=generator)
    tokens = session.prefill(prompt, source if encoder else None)[:, -1].argmax(-1)
    whole = session.kv_caches is compiled.static_decode.kv_caches
    session.decode(tokens)  # the first step after the prefill (its tables loaded)
    # the same tokens every step: a step's host work does not depend on their values
    return {"batch": batch, "whole_step_graphs": whole,
            **count_steps(lambda: session.decode(tokens), STEPS)}


def generate_host_work(compiled: Any, batch: int, eos: bool) -> dict[str, float]:
    """Per decode step of `generate` (the step and the loop's work around it: choosing the
    tokens, recording them, EOS flags): the counts of a run of 3 * STEPS new tokens less those
    of STEPS, over the 2 * STEPS steps between (the prefill cancels out)."""
    from runtime import generate

    vocab = compiled.model.config.vocab_size
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(3, vocab, (batch, PROMPT_LEN), generator=generator)
    options: dict[str, Any] = {"ignore_eos": True}
    if compiled.model.is_encoder_decoder:
        options["encoder_input_ids"] = prompt
        prompt = None
    if eos:  # an id the run never emits: every step reads its EOS flags, none fires
        free = generate(compiled, prompt, 3 * STEPS, **options)
        unused = sorted(set(range(vocab)) - set(free.flatten().tolist()))[0]
        options.update(ignore_eos=False, eos_token_id=unused, pad_token_id=0)
    counts = [count_steps(lambda: generate(compiled, prompt, new, **options), 1)
              for new in (STEPS, 3 * STEPS)]
    return {f"generate_{key}": (counts[1][key] - counts[0][key]) / (2 * STEPS)
            for key in ("ops", "copies", "python_calls")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-tiny,bart-tiny")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                             "host_work-cpu.json"))
    args = parser.parse_args(argv)
    rows = []
    for preset in args.models.split(","):
        model, compiled = compiled_tiny(preset)
        for batch in map(int, args.batches.split(",")):
            row = {"model": preset, **decode_host_work(model, compiled, batch)}
            for eos in (False, True):
                figures = generate_host_work(compiled, batch, eos)
                row.update({f"{key}{'_eos' if eos else ''}": value
                            for key, value in figures.items()})
            rows.append(row)
            print(f"{preset:12s} batch {batch}: {row['ops']:5.1f} ops outside the graph "
                  f"({row['copies']:.1f} writing), {row['python_calls']:6.0f} Python calls "
                  f"a step; whole-step graphs: {row['whole_step_graphs']}; in generate "
                  f"{row['generate_ops']:.1f} ops, {row['generate_python_calls']:.0f} calls "
                  f"(with EOS {row['generate_ops_eos']:.1f}, "
                  f"{row['generate_python_calls_eos']:.0f})")
    Path(args.out).write_text(json.dumps({"benchmark": "host_work", "device_type": "cpu",
                                          "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if not torch.cuda.is_available():  # Triton attention runs interpreted on the CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    main()
