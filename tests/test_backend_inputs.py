"""The fxkiln Dynamo backend must not leave compile-time graph runs written into the inputs."""
from __future__ import annotations

import torch
from torch import nn

import compiler  # noqa: F401  (registers the "fxkiln" backend)
from compiler.backend import inputs_restored


class CountingCache(nn.Module):
    """A module that, like a static KV cache, writes its state in place on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("keys", torch.zeros(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.keys.index_copy_(0, self.steps.view(1), x[:1])
        self.steps.add_(1)
        return self.linear(x) + self.keys.sum()


def test_compiled_call_advances_the_state_once_per_call() -> None:
    torch._dynamo.reset()
    eager, compiled_model = CountingCache(), CountingCache()
    compiled_model.load_state_dict(eager.state_dict())
    optimized = torch.compile(compiled_model, backend="fxkiln")
    for step in range(3):
        x = torch.randn(2, 4)
        torch.testing.assert_close(optimized(x), eager(x))
        assert int(compiled_model.steps) == step + 1
    torch.testing.assert_close(compiled_model.keys, eager.keys)


def test_inputs_restored_copies_back_only_what_was_written() -> None:
    written, untouched = torch.zeros(3), torch.ones(3)
    weight = nn.Parameter(torch.ones(2))
    with inputs_restored((written, untouched, weight, 5)):
        written.add_(2)
    assert written.tolist() == [0.0, 0.0, 0.0]
    assert untouched._version == 0
