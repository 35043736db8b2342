"""Activations: SiLU-and-mul through the `fxkiln.silu_and_mul` dispatch op, and the plain
elementwise activations encoder-decoder models name in their configs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import runtime.ops  # noqa: F401  (registers torch.ops.fxkiln.*)
from models.errors import UnsupportedConfigError


class SiluAndMul(nn.Module):
    """(tokens, 2 * d) -> silu(x[:, :d]) * x[:, d:], shape (tokens, d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.fxkiln.silu_and_mul.default(x)


class GELU(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


class ReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class SiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


_ACTIVATIONS: dict[str, type[nn.Module] | tuple[type[nn.Module], str]] = {
    "gelu": GELU,
    "gelu_new": (GELU, "tanh"),
    "gelu_pytorch_tanh": (GELU, "tanh"),
    "relu": ReLU,
    "silu": SiLU,
    "swish": SiLU,
}


def get_act_fn(name: str, config_key: str = "activation_function") -> nn.Module:
    """The activation a Hugging Face config names; UnsupportedConfigError naming the key if
    this project does not implement it."""
    entry = _ACTIVATIONS.get(name)
    if entry is None:
        raise UnsupportedConfigError(config_key, name, sorted(_ACTIVATIONS))
    if isinstance(entry, tuple):
        cls, approximate = entry
        return cls(approximate)  # type: ignore[call-arg]  # (only GELU takes an argument)
    return entry()

