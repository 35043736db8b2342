"""Whole decode steps of fxkiln's own models as one device graph per bucket.

Given a `StaticDecodeState` (KV caches and layout buffers that stay put), the bucket runner
also captures, per bucket, the entire forward (attention included) as one graph, with the
attention ops reading their layout from the state's buffers. A call made inside a forward
context that uses the state's caches, for a pure decode step that fits the buffers, loads the
step's layout into them and replays that one graph (a `StepMode.FULL` step); any other call
replays the pieces. If a whole step cannot be captured (an attention implementation that reads
host values), decode steps stay piecewise, with one warning.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from runtime.forward_context import peek_forward_context
from runtime.graph_device import CapturedGraph, CaptureOptions, GraphDevice
from runtime.static_decode import StaticDecodeState

logger = logging.getLogger(__name__)


class WholeStepGraphs:
    """One graph per bucket of a whole decode step over `state`'s caches and buffers."""

    def __init__(self, state: StaticDecodeState, device: GraphDevice,
                 options: CaptureOptions) -> None:
        self.state = state
        self._device = device
        self._options = options
        self.graphs: dict[int, CapturedGraph] = {}

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.graphs))

    def capture(self, bucket: int, args: Sequence[Any], forward: Callable[..., Any]) -> bool:
        """Capture `forward(*args)` for `bucket` decode rows; False (warned) if it cannot be."""
        try:
            with self.state.capture_context(bucket):
                for _ in range(self._options.warmup_runs):
                    with self._device.refuse_host_sync():
                        forward(*args)
                graph, _ = self._device.capture_graph(forward, args, key=("whole", bucket),
                                                      keep_outputs=True)
        except Exception as error:  # noqa: BLE001  (reported; decode stays piecewise)
            logger.warning("decode steps replay piecewise: a whole decode step of %d tokens "
                           "could not be captured: %s: %s", bucket, type(error).__name__, error)
            return False
        self.graphs[bucket] = graph
        return True

    def serves(self, bucket: int) -> bool:
        """Whether the call running now (its forward context) can replay `bucket`'s graph."""
        return bucket in self.graphs and self.state.serves(peek_forward_context(), bucket)

    def replay(self, bucket: int) -> Any:
        """Load the step's layout into the state's buffers and replay (after `serves`)."""
        context = peek_forward_context()
        assert context is not None, "replay() without serves(): no forward context"
        self.state.load(context.attn_metadata, bucket)
        graph = self.graphs[bucket]
        graph.replay()
        return graph.outputs
