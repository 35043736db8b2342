"""Whole decode steps of fxkiln's own models as one device graph per bucket.

Given a `StaticDecodeState` (KV caches, token and layout buffers that stay put), the bucket
runner also captures, per bucket, the entire forward (attention included) as one graph that
reads its token ids and positions from the state's buffers and its layout from the state's
layout buffers. Two ways to replay one:

- `decode` (the fast path `DecodeSession.decode` takes): the session hands host integers
  (each running sequence's position and cache slot) and its `RunningTables`; the step costs one
  token copy, the replay and the clone of the logits, with no forward context, no metadata
  object and no dispatch. Its layout copy comes after the replay: the next step's layout,
  guessed (each sequence one position on) and staged while the device runs this one, so a step
  that finds its layout staged starts with the replay (another one stages its own first; the
  tables are copied only when the running set changes);
- `replay` (a `StepMode.FULL` call of the runner): a call made inside a forward context that
  uses the state's caches, for a pure decode step that fits the buffers, loads that step's
  `AttentionMetadata` and inputs into the buffers.

If a whole step cannot be captured (an attention implementation that reads host values),
decode steps stay piecewise, with one warning.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from runtime.forward_context import peek_forward_context
from runtime.graph_device import CapturedGraph, CaptureOptions, GraphDevice
from runtime.static_decode import RunningTables, StaticDecodeState

logger = logging.getLogger(__name__)


class WholeStepGraphs:
    """One graph per bucket of a whole decode step over `state`'s caches and buffers.

    `input_ids_index`, `positions_index`: which forward inputs are the token ids and positions
    (the state's buffers stand in for them). `padded`: a step of n rows may replay the graph of
    the smallest bucket above n (else only a graph of exactly n rows)."""

    def __init__(self, state: StaticDecodeState, device: GraphDevice, options: CaptureOptions,
                 *, input_ids_index: int = 0, positions_index: int = 1,
                 padded: bool = True) -> None:
        self.state = state
        self._device = device
        self._options = options
        self._input_ids_index, self._positions_index = input_ids_index, positions_index
        self._padded = padded
        self.graphs: dict[int, CapturedGraph] = {}
        self._bucket_of: dict[int, int] = {}          # rows -> the bucket a decode replays
        self._token_views: dict[int, torch.Tensor] = {}     # rows -> input_ids[:rows]
        self._logits_views: dict[int, torch.Tensor] = {}    # rows -> its graph's logits[:rows]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(sorted(self.graphs))

    def capture(self, bucket: int, args: Sequence[Any], forward: Callable[..., Any]) -> bool:
        """Capture `forward(*args)` for `bucket` decode rows, the token ids and positions
        replaced by the state's buffers; False (warned) if it cannot be."""
        args = list(args)
        args[self._input_ids_index] = self.state.input_ids[:bucket]
        args[self._positions_index] = self.state.positions[:bucket]
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
        sizes = self.sizes
        fast = all(isinstance(g.outputs, torch.Tensor) for g in self.graphs.values())
        self._bucket_of = {rows: next(size for size in sizes if size >= rows)
                           for rows in range(1, sizes[-1] + 1)
                           if fast and (self._padded or rows in self.graphs)}
        return True

    def serves(self, bucket: int) -> bool:
        """Whether the call running now (its forward context) can replay `bucket`'s graph."""
        return bucket in self.graphs and self.state.serves(peek_forward_context(), bucket)

    def replay(self, bucket: int, inputs: Sequence[Any]) -> Any:
        """Load the step's layout and inputs into the state's buffers and replay (after
        `serves`); the graph's outputs, which the next replay rewrites."""
        context = peek_forward_context()
        assert context is not None, "replay() without serves(): no forward context"
        self.state.load(context.attn_metadata, bucket, inputs[self._input_ids_index],
                        inputs[self._positions_index])
        graph = self.graphs[bucket]
        graph.replay()
        return graph.outputs

    def decode(self, tokens: torch.Tensor, positions: list[int], slots: list[int],
               running: RunningTables) -> torch.Tensor | None:
        """One decode step of the running sequences, without a forward context: sequence i
        brings `tokens[i]` at `positions[i]`, written to cache slot `slots[i]`; its logits
        (rows, vocab), a copy. None when no graph serves that many rows, or the graphs return
        more than one tensor (run the step another way: nothing was written)."""
        rows = len(positions)
        bucket = self._bucket_of.get(rows)
        if bucket is None:
            return None
        self.state.stage(running, positions, slots, bucket)
        token_view = self._token_views.get(rows)
        if token_view is None:
            token_view = self._token_views[rows] = self.state.input_ids[:rows]
        if tokens.data_ptr() != token_view.data_ptr():  # else written there already
            token_view.copy_(tokens, non_blocking=True)
        self._device.before_replay(bucket)
        self.graphs[bucket].replay()
        # the next step's layout, guessed (each sequence one position on), staged while the
        # device runs this one: its copy lands after the replay, in stream order; the next
        # step then finds it staged, or (another layout) stages over it
        self.state.stage(running, [p + 1 for p in positions], [s + 1 for s in slots], bucket)
        logits = self._logits_views.get(rows)
        if logits is None:
            logits = self._logits_views[rows] = self.graphs[bucket].outputs[:rows]
        return logits.clone()
