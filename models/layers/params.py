"""Parameters that know how to load themselves from a full (unsharded) checkpoint tensor.

Every parameter of a project layer carries `param.weight_loader(param, loaded_weight, shard_id)`,
which takes the checkpoint tensor as Hugging Face saved it (full size, never sharded), cuts out
this rank's shard and copies it in. A wrong shape raises ValueError saying
what was expected and what was found; the caller adds the tensor's name.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WeightLoader = Callable[..., None]


def make_param(*shape: int) -> nn.Parameter:
    """An uninitialized, frozen parameter (inference only: weights come from a checkpoint)."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> nn.Parameter:
    param.weight_loader = loader  # type: ignore[attr-defined]  # (vLLM's convention: an attribute)
    return param


def get_weight_loader(param: nn.Parameter) -> WeightLoader:
    return getattr(param, "weight_loader", default_weight_loader)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor,
                          shard_id: Any = None) -> None:
    """Replicated parameter: the checkpoint tensor must match it exactly."""
    if shard_id is not None:
        raise ValueError(f"replicated parameter takes no shard id, found {shard_id!r}")
    check_shape(tuple(loaded_weight.shape), tuple(param.shape))
    param.data.copy_(loaded_weight)


def check_shape(found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if found != expected:
        raise ValueError(f"expected shape {expected}, found {found}")


def load_rows(param: nn.Parameter, loaded_weight: torch.Tensor, *, dim: int, dst_start: int,
              size: int, src_start: int, src_total: int) -> None:
    """Copy `loaded_weight[src_start : src_start + size]` along `dim` into `param` at `dst_start`.

    `src_total` is the size the checkpoint tensor must have along `dim`; all other dims must
    equal the parameter's.
    """
    expected = list(param.shape)
    expected[dim] = src_total
    check_shape(tuple(loaded_weight.shape), tuple(expected))
    shard = loaded_weight.narrow(dim, src_start, size)
    param.data.narrow(dim, dst_start, size).copy_(shard)
