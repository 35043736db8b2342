"""PieceRunner: stands in for one piece of the split module and captures or replays its graphs.

The runner installs one PieceRunner per piece in place of the `submod_i` submodules, so the
split module's own forward drives the pieces in their original order. What a PieceRunner does
on each call is what the call's step descriptor says (`runtime.step.current_step()`): run the
piece eagerly, warm it up, capture a graph of it for the step's key (a bucket size or an
input-shape signature), or replay that graph. Pieces with splitting ops (attention) always run
eagerly.

The last piece, when it holds the graph's `fxkiln::logits_rows` (the rows whose logits a step
reads, before the LM head), also keeps a two-part form: a head PieceRunner for the nodes before
the op, and the op with what follows it, run eagerly. A step with `eager_logits` (a prefill
step, which reads a few rows) replays the head's graph and computes the LM head on its rows
only; at decode buckets the piece captures both forms, so decode steps keep their one graph.

A captured graph reads its inputs from the addresses they had at capture. Inputs that come
from the split module's placeholders (static token buffers, weights) or from pieces captured
for the same key keep their addresses; inputs from eagerly run pieces are fresh tensors each
call, so each is copied into a buffer the graph owns before replay.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import fx

from runtime.graph_device import CapturedGraph, CaptureOptions, GraphDevice
from runtime.logits_rows import is_logits_rows, split_at_logits_rows
from runtime.split import Piece, SplitGraph
from runtime.step import StepMode, current_step

logger = logging.getLogger(__name__)


class PieceCaptureError(RuntimeError):
    """A piece could not be captured as a graph; the message names the piece and the node."""


class StaticInputError(RuntimeError):
    """(debug mode) A graph was replayed with an input that is not the one it was captured with."""


class PieceHost(Protocol):
    """What a PieceRunner needs from its model runner."""

    graph_device: GraphDevice
    options: CaptureOptions
    host_scalars: frozenset[int]  # data pointers of inputs a capture may read on the host


@dataclass
class GraphEntry:
    """One captured graph and how to feed it: buffers to copy into, addresses it reads."""

    graph: CapturedGraph
    copy_into: tuple[tuple[int, torch.Tensor], ...]  # (argument index, buffer the graph reads)
    addresses: tuple[tuple[int, int], ...] = field(default=())  # (argument index, data_ptr)
    scalars: tuple[tuple[int, Any], ...] = field(default=())  # (argument index, value)


class NodeTracker(fx.Interpreter):
    """Runs a graph node by node, remembering the node that ran last (the one that failed)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False
        self.node: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        return super().run_node(n)

    def __call__(self, *args: Any) -> Any:
        return self.run(*args)


class PieceRunner(torch.nn.Module):
    """Eager run, warm-up, capture or replay of one piece, as the call's step says."""

    def __init__(self, piece: Piece, host: PieceHost,
                 producers: tuple[PieceRunner | None, ...], is_last: bool) -> None:
        super().__init__()
        self.piece = piece
        self.graph_module = piece.graph_module
        self.entries: dict[Hashable, GraphEntry] = {}
        self.capture_disabled = piece.is_splitting
        self.is_last = is_last
        self._host = host
        self._producers = producers
        self._placeholders = tuple(piece.graph_module.graph.find_nodes(op="placeholder"))
        self._arg_names = tuple(n.name for n in self._placeholders)
        # steps with eager_logits: the head's graph, then logits_rows and the LM head eagerly
        self.logits_form: fx.GraphModule | None = None
        self.logits_head: PieceRunner | None = None

    @property
    def graph_count(self) -> int:
        return len(self.entries) + (0 if self.logits_head is None else len(self.logits_head.entries))

    def __call__(self, *args: Any) -> Any:  # skips nn.Module's hook machinery on the hot path
        step = current_step()
        if step.eager_logits and self.logits_form is not None and step.mode is not StepMode.EAGER:
            return self.logits_form(*args)  # its head replays, warms up or captures
        if step.mode is StepMode.PIECEWISE:
            entry = self.entries.get(step.key)
            if entry is not None:
                return self._replay(entry, args)
        elif step.mode is StepMode.CAPTURE and not self.capture_disabled:
            if self.logits_head is not None:
                self.logits_form(*args)  # the head too, for steps at this key that read rows
            return self._capture(step.key, args)
        elif step.mode is StepMode.WARMUP and not self.capture_disabled:
            return self._warm_up(step.key, args)
        return self.graph_module(*args)

    def split_logits(self) -> None:
        """Give this piece (holding the graph's logits_rows) its two-part form."""
        two = split_at_logits_rows(self.graph_module)
        if two is None:  # nothing before the op: those steps run the whole piece eagerly
            self.logits_form = self.graph_module
            return
        (call,) = two.graph.find_nodes(op="call_module", target="submod_0")
        outer = {node.name: i for i, node in enumerate(two.graph.find_nodes(op="placeholder"))}
        producers = tuple(self._producers[outer[arg.name]]
                          if isinstance(arg, fx.Node) and arg.name in outer else None
                          for arg in call.args)
        head = Piece(f"{self.piece.name}.head", two.submod_0, is_splitting=False,
                     node_names=tuple(n.name for n in two.submod_0.graph.nodes))
        self.logits_head = PieceRunner(head, self._host, producers, is_last=True)
        two.submod_0 = self.logits_head
        self.logits_form = two

    def _warm_up(self, key: Hashable, args: tuple[Any, ...]) -> Any:
        """Run eagerly, refusing host synchronization: a piece that syncs cannot be captured,
        and finding that out here, before any capture begins, leaves the device state clean
        (an aborted stream capture can leave the allocator and the RNG mid-capture)."""
        tracker = NodeTracker(self.graph_module)
        try:
            with self._host.graph_device.refuse_host_sync():
                return tracker(*args)
        except Exception as error:  # noqa: BLE001  (any failure is reported with its node)
            return self._capture_failed(key, args, tracker.node, error)

    def _replay(self, entry: GraphEntry, args: tuple[Any, ...]) -> Any:
        for index, buffer in entry.copy_into:
            buffer.copy_(args[index])
        if self._host.options.debug:
            self._check_static_args(entry, args)
        entry.graph.replay()
        return entry.graph.outputs

    def _capture(self, key: Hashable, args: tuple[Any, ...]) -> Any:
        staged = list(args)
        copy_into = []
        tracker = NodeTracker(self.graph_module)
        for index, (value, producer) in enumerate(zip(args, self._producers)):
            if producer is None or key in producer.entries:
                continue  # a placeholder of the model, or a graph output: a fixed address
            if not isinstance(value, torch.Tensor):
                error = ValueError(f"input {self._arg_names[index]!r} is {value!r}, computed by "
                                   f"the eagerly run piece {producer.piece.name!r}; a graph "
                                   f"would freeze it")
                return self._capture_failed(key, args, self._placeholder(index), error)
            staged[index] = buffer = value.clone()  # an eager piece's output: fresh each call
            copy_into.append((index, buffer))
        try:
            graph, outputs = self._host.graph_device.capture_graph(
                tracker, staged, key=key, keep_outputs=self.is_last,
                host_scalars=self._host.host_scalars)
        except Exception as error:  # noqa: BLE001  (any failure is reported with its node)
            return self._capture_failed(key, args, tracker.node, error)
        copied = {index for index, _ in copy_into}
        self.entries[key] = GraphEntry(
            graph=graph, copy_into=tuple(copy_into),
            addresses=tuple((i, v.data_ptr()) for i, v in enumerate(staged)
                            if isinstance(v, torch.Tensor) and i not in copied),
            scalars=tuple((i, v) for i, v in enumerate(staged) if not isinstance(v, torch.Tensor)),
        )
        return outputs

    def _capture_failed(self, key: Hashable, args: tuple[Any, ...], node: fx.Node | None,
                        error: Exception) -> Any:
        where = node.format_node() if node is not None else "(before its first node)"
        what = f"{key} tokens" if isinstance(key, int) else f"signature {key}"
        message = (f"could not capture piece {self.piece.name!r} for {what} as a graph: "
                   f"node {where} raised {type(error).__name__}: {error}")
        if self._host.options.capture_failure == "raise":
            raise PieceCaptureError(f"{message}. Expected a piece free of host synchronization; "
                                    f"set capture_failure='eager' to run it eagerly") from error
        logger.warning("%s; running piece %r eagerly from now on", message, self.piece.name)
        self.capture_disabled = True
        return self.graph_module(*args)

    def _placeholder(self, index: int) -> fx.Node:
        return self._placeholders[index]

    def _check_static_args(self, entry: GraphEntry, args: tuple[Any, ...]) -> None:
        for index, address in entry.addresses:
            found = args[index].data_ptr()
            if found != address:
                raise StaticInputError(
                    f"piece {self.piece.name!r}: input {self._arg_names[index]!r} (argument "
                    f"{index}) is at {found:#x}, but the graph was captured reading {address:#x}; "
                    f"expected the same tensor at every call (non-token inputs are static)")
        for index, value in entry.scalars:
            if args[index] != value:
                raise StaticInputError(
                    f"piece {self.piece.name!r}: input {self._arg_names[index]!r} (argument "
                    f"{index}) is {args[index]!r}, but the graph was captured with {value!r}")


def _producer_name(node: Any) -> str | None:
    """The submodule whose output `node` is, or None for placeholders and attributes."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return str(node.target) if node.op == "call_module" else None


def install_piece_runners(split: SplitGraph, host: PieceHost) -> tuple[PieceRunner, ...]:
    """Replace each `submod_i` of the split module with a PieceRunner; returns them in order."""
    top = split.split_module
    calls = {str(n.target): n for n in top.graph.find_nodes(op="call_module")}
    runners: dict[str, PieceRunner] = {}
    for position, piece in enumerate(split.pieces):
        call = calls[piece.name]
        producers = tuple(runners[name] if (name := _producer_name(arg)) else None
                          for arg in call.args)
        runners[piece.name] = PieceRunner(piece, host, producers,
                                          is_last=position == len(split.pieces) - 1)
        setattr(top, piece.name, runners[piece.name])
    return tuple(runners.values())


def split_logits_piece(runners: tuple[PieceRunner, ...]) -> bool:
    """Give the last piece its two-part form when it holds the graph's only logits_rows node
    (and so computes nothing another piece reads after the op); whether it did."""
    holders = [runner for runner in runners for node in runner.graph_module.graph.nodes
               if is_logits_rows(node)]
    if len(holders) != 1 or holders[0] is not runners[-1] or runners[-1].capture_disabled:
        return False
    runners[-1].split_logits()
    return True
