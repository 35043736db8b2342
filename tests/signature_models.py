"""A decode step in miniature for the signature runner's tests, and a backend whose graphs get a
fresh signature runner per test example (Dynamo compiles once per module, not per example)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from compiler import CompileConfig
from compiler.capture import concrete_inputs
from compiler.pipeline import compile_dynamo_graph, dynamo_graph_inputs
from runtime.graph_device import CaptureOptions
from runtime.replay_simulator import SimulatedGraphDevice
from runtime.signature_inputs import GraphInputs
from runtime.signature_runner import SignatureRunner

HIDDEN, SLOTS = 8, 4
SIZES = (1, 2, 4)
PASSES_ONLY = CompileConfig(device="cpu", capture_sizes=())


class ToyStep(nn.Module):
    """forward(x, cache, step, scratch): `x` (batch, HIDDEN) is per call; `cache` (batch, SLOTS,
    HIDDEN) and the 0-dim `step` are written in place as a StaticCache's are; `scratch`
    (batch, HIDDEN) is written in place too. SDPA over the cache is a splitting op. Returns a
    fresh tensor, the projection and a view of the cache."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, step: torch.Tensor,
                scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.proj(x)                                            # (batch, HIDDEN)
        slot = torch.remainder(step, SLOTS).view(1)
        cache.index_copy_(1, slot, h.unsqueeze(1))                  # (batch, SLOTS, HIDDEN)
        step.add_(1)
        scratch.mul_(0.5).add_(h)
        query = h[:, None, None]                                    # (batch, 1, 1, HIDDEN)
        keys = cache[:, None]                                       # (batch, 1, SLOTS, HIDDEN)
        mixed = F.scaled_dot_product_attention(query, keys, keys)   # (batch, 1, 1, HIDDEN)
        return mixed.flatten(1) + scratch, h, cache[:, :1]


class FreshRunners:
    """A Dynamo backend: the passes run once per graph; `fresh()` gives every graph a new
    simulated signature runner, so that each test example starts from nothing captured."""

    def __init__(self) -> None:
        self.graphs: list[tuple[fx.GraphModule, GraphInputs, tuple[Any, ...]]] = []
        self.runners: list[Callable[..., Any]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = compile_dynamo_graph(gm, example_inputs, PASSES_ONLY)
        inputs = concrete_inputs(example_inputs)
        self.graphs.append((compiled.graph_module, dynamo_graph_inputs(compiled.graph_module,
                                                                       inputs), inputs))
        self.runners.append(compiled.run)
        index = len(self.runners) - 1
        return lambda *args: self.runners[index](*args)

    def fresh(self, **options: Any) -> list[SignatureRunner]:
        runners = [SignatureRunner(gm, graph_inputs, inputs,
                                   graph_device=SimulatedGraphDevice("cpu"),
                                   capture_sizes=SIZES, options=CaptureOptions(**options))
                   for gm, graph_inputs, inputs in self.graphs]
        self.runners = list(runners)
        return runners


class ToyCaller:
    """Calls the compiled toy and an eager twin on copies of the same state; checks they agree."""

    def __init__(self, model: nn.Module, optimized: Callable[..., Any]) -> None:
        self.model, self.optimized = model, optimized
        self.caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # every tensor made stays alive, so a new one never reuses an old one's memory by chance
        self.kept: list[torch.Tensor] = []
        self.held: list[tuple[torch.Tensor, torch.Tensor]] = []

    def call(self, batch: int, new_cache: bool = False, seed: int = 0) -> Any:
        if new_cache or batch not in self.caches:
            self.caches[batch] = (torch.zeros(batch, SLOTS, HIDDEN),
                                  torch.zeros((), dtype=torch.long))
        cache, step = self.caches[batch]
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, HIDDEN, generator=generator)
        scratch = torch.randn(batch, HIDDEN, generator=generator)
        twin = cache.clone(), step.clone(), scratch.clone()
        self.kept += [cache, step, x, scratch]
        with torch.no_grad():
            expected = self.model(x, *twin)
            got = self.optimized(x, cache, step, scratch)
        for value, reference in zip((*got, cache, step, scratch), (*expected, *twin)):
            torch.testing.assert_close(value, reference)
        self.held += [(got[0], expected[0].clone()), (got[1], expected[1].clone())]
        return got

    def check_held(self) -> None:
        """Outputs the caller kept are untouched by every later call."""
        for value, reference in self.held:
            torch.testing.assert_close(value, reference)
