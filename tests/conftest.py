"""Test set-up: Triton runs under its interpreter when there is no GPU (patching
`triton.language` once per launch, without the overflow checks it discards:
tests/triton_interpret.py); hypothesis profiles."""
from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.triton_interpret import patch_once_per_launch, skip_discarded_overflow_checks

# Must be set before any Triton kernel is defined: triton.jit picks the interpreter then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        patch_once_per_launch()  # a fifth of an interpreted compile, a third of its steps
        skip_discarded_overflow_checks()  # about a third of what is left of a step

settings.register_profile(
    "ci", max_examples=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the GPU machine through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# Tiny models on a 2-core machine: intra-op threads only contend (a tiny BART step measured
# 2.7 s with the default threads under load, 0.03 s with one).
torch.set_num_threads(1)


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every replay of a simulated graph (runtime.replay_simulator), in order."""
    from runtime.replay_simulator import SimulatedGraph

    seen: list[SimulatedGraph] = []
    replay = SimulatedGraph.replay

    def counting(graph: SimulatedGraph) -> None:
        seen.append(graph)
        replay(graph)

    monkeypatch.setattr(SimulatedGraph, "replay", counting)
    return seen
