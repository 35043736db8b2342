"""The step descriptor: what one call of a runner does, decided once and carried to its pieces.

A runner looks at a call's inputs once (its token count or its input-shape signature, whether
a whole-step graph serves it) and decides one `StepDescriptor`: run eagerly, replay the pieces'
graphs for a key, replay one whole-step graph, or (at start-up and on first use) warm up or
capture the pieces for a key. The split module's pieces read it through `current_step()`
while the call runs inside `running(descriptor)`; nothing else carries the decision (vLLM's
`BatchDescriptor` and `CUDAGraphMode` serve the same purpose). A descriptor is frozen, and the
context variable that holds it is scoped to the call, so nested or interleaved runners (two
compiled models, a Dynamo graph inside another) never see each other's steps.
"""
from __future__ import annotations

import enum
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


class StepMode(enum.Enum):
    """How a call runs."""

    EAGER = "eager"          # every piece runs as it is
    WARMUP = "warmup"        # eager, refusing host synchronization in pieces to capture
    CAPTURE = "capture"      # pieces to capture record a graph for `key`
    PIECEWISE = "piecewise"  # pieces replay their graphs for `key`; splitting ops run eagerly
    FULL = "full"            # one graph of the whole step for `key` (no piece runs)


@dataclass(frozen=True)
class StepDescriptor:
    """One call's step: its mode and the key its graphs are stored under.

    `key` is a bucket size (the runner of fxkiln's own models) or an input-shape signature
    (Dynamo graphs); `reason` says why an eager step is eager (for logs and the report).
    `eager_logits`: the piece holding `fxkiln::logits_rows` replays (or warms up, or captures)
    only its part before the op and runs the op and the LM head after it eagerly: the step
    reads some rows' logits, or its bucket is a prefill bucket (`runtime.buckets`).
    """

    mode: StepMode
    key: Hashable = None
    reason: str = ""
    eager_logits: bool = False

    @property
    def replays(self) -> bool:
        return self.mode in (StepMode.PIECEWISE, StepMode.FULL)


EAGER_STEP = StepDescriptor(StepMode.EAGER)

_CURRENT_STEP: ContextVar[StepDescriptor] = ContextVar("fxkiln_step", default=EAGER_STEP)


@contextmanager
def running(step: StepDescriptor) -> Iterator[StepDescriptor]:
    """Within the block, `current_step()` is `step`."""
    token = _CURRENT_STEP.set(step)
    try:
        yield step
    finally:
        _CURRENT_STEP.reset(token)


def current_step() -> StepDescriptor:
    """The step of the call running now; an eager step outside any runner call."""
    return _CURRENT_STEP.get()
