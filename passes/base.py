"""What every pass is: a callable from GraphModule to PassResult, built from a PassContext."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx


@dataclass
class PassResult:
    """torch.fx infra's (graph_module, modified), plus how many places the pass rewrote."""

    graph_module: fx.GraphModule
    modified: bool
    matches: int = 0


@dataclass(frozen=True)
class PassContext:
    """What a pass may know of the compilation; handed in, never looked up.

    `kernels`: op name -> implementation name or "auto" (from the config).
    `device`: the device the compiled model runs on.
    """

    device: torch.device = torch.device("cpu")
    kernels: Mapping[str, str] = field(default_factory=dict)


class GraphPass:
    """Base class: subclasses set `name` and implement `__call__`."""

    name: ClassVar[str] = ""

    def __init__(self, context: PassContext) -> None:
        self.context = context

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError
