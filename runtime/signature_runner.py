"""The signature runner: a graph from Dynamo, captured as device graphs per input signature.

A graph that Dynamo hands the backend is called with whatever the model's caller passes; the
runner cannot make inputs of its own (a Hugging Face StaticCache has its batch baked in), so it
never pads to a bucket. It captures exact signatures (`runtime/signature_inputs.py`), lazily:

1. the first call of a signature runs the rewritten graph eagerly and is watched (which inputs
   it wrote, where they were);
2. the next call, if it has the same signature, is captured (the capture run is that call's
   real run, after warm-ups whose writes are undone) and
3. later calls of the signature replay: copied inputs into the graph's buffers, one replay,
   inputs the graph wrote copied back, and every output a caller can hold cloned out of graph
   memory (static inputs and their views are returned as they are).

So the decode step of `generate` with a static cache replays from its third step on, while
graphs whose shapes change every call (a DynamicCache grows each step) never repeat a
signature twice in a row and run the rewritten graph uncaptured; `stats.note` says why.
A graph with static shapes and no op that reads per-step host metadata (fxkiln's attention op)
is captured whole, SDPA included; any other graph is split at its splitting ops and its
pieces are captured (the splitting ops run eagerly), keyed by the signature.

Which calls get graphs: those whose leading size (dim 0 of the first per-call tensor input,
the batch of a Hugging Face step) is at most the largest of `capture_sizes`; each such size
gets graphs of its own exact signature. Calls with grad mode on run uncaptured. At most
`max_signatures` signatures hold graphs; the oldest one is dropped for a new one.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from runtime.graph_device import CapturedGraph, CaptureOptions, GraphDevice
from runtime.input_snapshot import InputSnapshot
from runtime.piece_runner import (NodeTracker, PieceCaptureError, PieceRunner, StaticInputError,
                                  install_piece_runners)
from runtime.runner import RunnerStats
from runtime.signature_inputs import (GraphInputs, InputPlan, Observation, StagedInputs, describe,
                                      stage)
from runtime.split import DEFAULT_SPLITTING_OPS, reads_host_metadata, split_graph
from runtime.step import StepDescriptor, StepMode, running

logger = logging.getLogger(__name__)

MAX_SIGNATURES = 8
# A graph dropped for a moved input before this many replays was churn (a per-call tensor that
# happened to reuse its predecessor's block); after MAX_CHURN of those, the signature copies
# every per-call input instead of reading observed ones in place.
CHURN_REPLAYS, MAX_CHURN = 4, 2
WAITING = "no signature has been called twice in a row yet (the second call is captured)"
WATCHED = "the first call of its signature: watched for in-place writes"
CHANGING = ("input shapes changed from call to call (no signature repeated on consecutive "
            "calls), so nothing is captured: a DynamicCache grows every step; a StaticCache "
            "keeps the decode step's shapes fixed")


@dataclass
class SignatureEntry:
    """One captured signature: its staged inputs, its graph (whole) and which outputs to clone."""

    step: StepDescriptor            # of its replays (made once: a replay makes no objects)
    staged: StagedInputs
    graph: CapturedGraph | None     # None when piecewise: the pieces hold the graphs
    clone_outputs: tuple[bool, ...]
    leading_size: int
    label: str
    replays: int = 0


class SignatureRunner:
    """Runs a Dynamo graph, capturing it per input signature; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, inputs: GraphInputs, example_args: Sequence[Any], *,
                 graph_device: GraphDevice, capture_sizes: Sequence[int],
                 splitting_ops: Sequence[Any] = DEFAULT_SPLITTING_OPS,
                 options: CaptureOptions = CaptureOptions(),
                 on_stats: Callable[[RunnerStats], None] | None = None,
                 max_signatures: int = MAX_SIGNATURES) -> None:
        self.gm = gm
        self.graph_device = graph_device
        self.options = options
        self.max_size = max(capture_sizes, default=0)
        self.max_signatures = max_signatures
        self.plan = InputPlan(inputs, example_args,
                              [node.name for node in gm.graph.find_nodes(op="placeholder")])
        self.host_scalars: frozenset[int] = frozenset()
        self.whole = inputs.static_shapes and not reads_host_metadata(gm)
        self.split = None if self.whole else split_graph(gm, splitting_ops)
        self._tracker = NodeTracker(gm)  # runs a whole graph's warm-ups and capture
        self.piece_runners: tuple[PieceRunner, ...] = (
            () if self.split is None else install_piece_runners(self.split, self))
        self.entries: dict[Hashable, SignatureEntry] = {}
        self._refused: dict[Hashable, str] = {}
        self._churn: dict[Hashable, int] = {}
        self._previous: Observation | None = None
        self._on_stats = on_stats
        self.stats = RunnerStats(pieces=1 if self.split is None else len(self.split.pieces),
                                 captured_sizes=(), capture_seconds=0.0, graph_memory_bytes=0,
                                 note=WAITING)
        self._publish()

    # -- calls ------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        step = self.dispatch(args)
        if step.replays:
            return self._replay(step, args)
        if step.mode is StepMode.CAPTURE:
            return self._capture(step.key, args)
        return self._eager(step, args)

    def dispatch(self, args: Sequence[Any]) -> StepDescriptor:
        """The step of this call, decided once: replay the signature's graph (whole or its
        pieces), capture it (its second call in a row), or run eagerly (watched, or not)."""
        if torch.is_grad_enabled():
            return StepDescriptor(StepMode.EAGER, reason="grad mode is on (graphs are for "
                                                         "inference)")
        key = self.plan.signature(args)
        entry = self.entries.get(key)
        if entry is not None:
            if self.options.debug:
                self._check_declared(entry, args)
            moved = entry.staged.moved(args)
            if moved is None:
                return entry.step
            self._drop(key, f"static input {moved} moved", moved=True)
        seen = self._previous
        if seen is None or seen.key != key:
            return StepDescriptor(StepMode.EAGER, key, reason=WATCHED)
        reason = self._refusal(key, args)
        return StepDescriptor(StepMode.CAPTURE, key) if reason is None else \
            StepDescriptor(StepMode.EAGER, key, reason=reason)

    def _check_declared(self, entry: SignatureEntry, args: Sequence[Any]) -> None:
        """(debug mode) A parameter or buffer must stay where the graph reads it."""
        moved = entry.staged.declared_moved(args)
        if moved is not None:
            index, address = moved
            name = self.plan.names[index]
            raise StaticInputError(
                f"graph input {name!r} (argument {index}, a parameter, buffer or tensor marked "
                f"static) is at {args[index].data_ptr():#x}, but the graph for signature "
                f"{entry.label} was captured reading {address:#x}; expected the same tensor at "
                f"every call")

    def _replay(self, step: StepDescriptor, args: Sequence[Any]) -> Any:
        self._previous = None
        entry = self.entries[step.key]
        entry.replays += 1
        staged = entry.staged
        staged.load(args)
        self.graph_device.before_replay(step.key)
        if entry.graph is not None:
            entry.graph.replay()
            outputs = entry.graph.outputs
        else:
            with running(step):
                outputs = self.split.split_module(*staged.args)  # type: ignore[union-attr]
        staged.store(args)
        return _finish(outputs, entry.clone_outputs)

    def _eager(self, step: StepDescriptor, args: Sequence[Any]) -> Any:
        """Run the rewritten graph; a first call of its signature is watched for writes."""
        if step.reason != WATCHED:
            if not self.entries:
                self._note(step.reason)
            return self.gm(*args)
        if self._previous is not None and self.stats.note == WAITING:
            self._note(CHANGING)  # a signature other than the last call's
        versions = self.plan.observe_before(args)
        outputs = self.gm(*args)
        self._previous = self.plan.observation(step.key, args, versions)
        return outputs

    def _refusal(self, key: Hashable, args: Sequence[Any]) -> str | None:
        """Why `key` gets no graph (None: it may be captured)."""
        if key in self._refused:
            return self._refused[key]
        size = self.plan.leading_size(args)
        if size > self.max_size:
            return f"leading size {size} is more than the largest capture size {self.max_size}"
        return None

    # -- capture ----------------------------------------------------------------------------
    def _capture(self, key: Hashable, args: Sequence[Any]) -> Any:
        seen = self._previous
        assert seen is not None and seen.key == key, "capture without a watched call before it"
        in_place = (self.plan.declared if self._churn.get(key, 0) >= MAX_CHURN
                    else self.plan.in_place(args, seen))
        staged = stage(self.plan, args, in_place, seen.written)
        snapshot = InputSnapshot(args[i] for i in sorted(in_place & seen.written))
        self.host_scalars = frozenset(staged.args[i].data_ptr() for i in self.plan.host_scalars)
        start = time.perf_counter()
        try:
            with self.graph_device.capturing() as profiler:
                graph, outputs = self._record(key, args, staged, snapshot)
        except Exception as error:  # noqa: BLE001  (reported below, or raised as configured)
            snapshot.restore()  # a half-run capture may have written the static inputs
            return self._capture_failed(key, args, error)
        self._previous = None
        staged.store(args)
        if len(self.entries) >= self.max_signatures:
            self._drop(next(iter(self.entries)), "more signatures than max_signatures")
        static = {args[i].untyped_storage().data_ptr() for i in in_place}
        mode = StepMode.FULL if self.whole else StepMode.PIECEWISE
        entry = SignatureEntry(step=StepDescriptor(mode, key), staged=staged, graph=graph,
                               leading_size=self.plan.leading_size(args),
                               clone_outputs=_clone_mask(outputs, static),
                               label=describe(self.plan, args, staged))
        self.entries[key] = entry
        self.stats = replace(self.stats, capture_seconds=self.stats.capture_seconds
                             + time.perf_counter() - start,
                             graph_memory_bytes=self.stats.graph_memory_bytes
                             + profiler.consumed_bytes)
        logger.info("captured %s for signature %s in %.3f s",
                    "the whole graph" if graph is not None else "the pieces' graphs",
                    entry.label, time.perf_counter() - start)
        self._publish()
        return _finish(outputs, entry.clone_outputs)

    def _record(self, key: Hashable, args: Sequence[Any], staged: StagedInputs,
                snapshot: InputSnapshot) -> tuple[CapturedGraph | None, Any]:
        """Warm up (undoing each warm-up's writes), then capture: the call's real run."""
        self._tracker.node = None
        for _ in range(self.options.warmup_runs):
            if self.split is None:
                with self.graph_device.refuse_host_sync():
                    self._tracker(*staged.args)
            else:  # the pieces to capture refuse host synchronization themselves
                self._run(StepDescriptor(StepMode.WARMUP, key), staged.args)
            snapshot.restore()
            staged.load(args, force=True)  # the warm-up may have written the buffers, mirrors too
        versions = [mirror.buffer._version for mirror in staged.mirrors]
        if self.split is None:
            recorded = self.graph_device.capture_graph(self._tracker, staged.args, key=key,
                                                       keep_outputs=True,
                                                       host_scalars=self.host_scalars)
        else:
            recorded = None, self._run(StepDescriptor(StepMode.CAPTURE, key), staged.args)
        for mirror, version in zip(staged.mirrors, versions):
            # found on the H200: a compiled prefill's `cumulative_length.to(device).add_(n)`
            # advanced the device copy of a StaticCache's fresh host counter at every replay
            mirror.clobbered = not mirror.written and mirror.buffer._version != version
        return recorded

    def _run(self, step: StepDescriptor, args: Sequence[Any]) -> Any:
        if self.split is None:
            return self.gm(*args)
        with running(step):
            return self.split.split_module(*args)

    def _capture_failed(self, key: Hashable, args: Sequence[Any], error: Exception) -> Any:
        node = self._tracker.node if self.split is None else None
        where = f" at node {node.format_node()}" if node is not None else ""
        message = (f"could not capture the graph for signature {describe(self.plan, args, None)}"
                   f"{where}: {type(error).__name__}: {error}")
        if self.options.capture_failure == "raise":
            if isinstance(error, PieceCaptureError):
                raise error
            raise PieceCaptureError(f"{message}. Expected a graph free of host synchronization; "
                                    f"set capture_failure='eager' to run it uncaptured") from error
        logger.warning("%s; running it uncaptured from now on", message)
        self._refused[key] = f"capture failed: {type(error).__name__}: {error}"
        self._previous = None
        return self._eager(StepDescriptor(StepMode.EAGER, key, self._refused[key]), args)

    def _drop(self, key: Hashable, why: str, moved: bool = False) -> None:
        entry = self.entries.pop(key)
        if moved and entry.replays < CHURN_REPLAYS:
            self._churn[key] = self._churn.get(key, 0) + 1
        for piece in self.piece_runners:
            piece.entries.pop(key, None)
        logger.info("dropped the graphs of signature %s: %s", entry.label, why)
        self._publish()

    # -- stats ------------------------------------------------------------------------------
    def _note(self, note: str) -> None:
        if note != self.stats.note:
            self.stats = replace(self.stats, note=note)
            self._publish()

    def _publish(self) -> None:
        entries = self.entries.values()
        graphs = (len(self.entries) if self.whole
                  else sum(len(p.entries) for p in self.piece_runners))
        sizes = tuple(sorted({e.leading_size for e in entries}))
        self.stats = replace(
            self.stats, captured_sizes=sizes, graphs=graphs,
            decode_graph_sizes=sizes if self.whole else (),
            captured_signatures=tuple(e.label for e in entries),
            eager_pieces=tuple(p.piece.name for p in self.piece_runners if p.capture_disabled),
            note="" if self.entries else (self.stats.note or WAITING))
        if self._on_stats is not None:
            self._on_stats(self.stats)


def _clone_mask(outputs: Any, static_storages: set[int]) -> tuple[bool, ...]:
    """Per output leaf: clone it (True) unless it is no tensor or lives in a static input."""
    return tuple(isinstance(leaf, torch.Tensor)
                 and leaf.untyped_storage().data_ptr() not in static_storages
                 for leaf in pytree.tree_leaves(outputs))


def _finish(outputs: Any, clone: tuple[bool, ...]) -> Any:
    """`outputs` with the leaves marked in `clone` cloned (a flat tuple, as Dynamo graphs
    return, without flattening)."""
    if type(outputs) is tuple and len(outputs) == len(clone) and not any(
            isinstance(leaf, (tuple, list, dict)) for leaf in outputs):
        return tuple(leaf.clone() if copy else leaf for leaf, copy in zip(outputs, clone))
    leaves, spec = pytree.tree_flatten(outputs)
    return pytree.tree_unflatten([leaf.clone() if copy else leaf
                                  for leaf, copy in zip(leaves, clone, strict=True)], spec)
