"""Model runners: run a split graph with token-count buckets, padding and (device) graphs.

`ModelRunnerBase` is device-agnostic. It owns the split graph, one static buffer per token input
and the buckets (`capture_sizes`). A call with n tokens picks the smallest bucket >= n (bisect),
copies the token inputs into the first n rows of the static buffers (rows n.. are padding), runs
the pieces (captured pieces replay their graph for that bucket) and slices the token dimension
of the outputs back to n. More tokens than the largest bucket: the pieces run eagerly on the
inputs as given, with one warning per runner. So does a call whose non-token, non-parameter tensor
inputs differ in shape from the example inputs (an encoder-decoder prefill step when the graphs
were captured for decode steps), and so does a step that reads the logits of some rows only
(`runtime.logits_rows`: a prefill step; the graphs compute every row).

Whole decode steps: given a `StaticDecodeState` (KV caches and layout buffers that stay put), the
runner also captures, per bucket, the entire forward (attention included) as one graph, with
the attention ops reading their layout from the state's buffers. A call made inside a forward
context that uses the state's caches, for a pure decode step that fits the buffers, loads the
step's layout into them and replays that one graph; any other call replays the pieces. If the
whole step cannot be captured (an attention implementation that reads host values), decode
steps stay piecewise, with one warning.

Device subclasses supply `capture_graph()`, `_cache_device_properties()` and
`memory_profiler()`. Graph use is off in the base class (`uses_graphs = False`), which is the
plain CPU runner: it runs the split module directly, without buckets.

Which outputs carry the token dimension is learned at capture: those whose dim 0 equals the
bucket at every captured size (with a single size, any output of that length counts).
Outputs of a replayed forward are returned as clones (sliced to the real tokens): graph output
memory is rewritten by the next replay of any bucket, so nothing a caller holds aliases it.
Non-token inputs are static: a graph reads the tensors it was captured with, so pass the same
tensors (weights, caches) at every call; `debug=True` checks their addresses at each replay.
An int input equal to the call's token count, at a position where the example inputs held an
int equal to their token count, is taken to be the token count and replaced by the bucket.
"""
from __future__ import annotations

import bisect
import gc
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.utils import _pytree as pytree
from tqdm import tqdm

from runtime.forward_context import peek_forward_context
from runtime.logits_rows import selects_logits_rows
from runtime.memory import DeviceMemoryProfiler
from runtime.piece_runner import (CapturedGraph, Mode, PieceRunner, RunState,
                                  install_piece_runners)
from runtime.split import DEFAULT_SPLITTING_OPS, Piece, split_graph
from runtime.static_decode import StaticDecodeState
from runtime.static_inputs import StaticInputs

logger = logging.getLogger(__name__)

CAPTURE_FAILURE_CHOICES = ("raise", "eager")
StepContext = Callable[[int], AbstractContextManager[Any]]


@dataclass(frozen=True)
class RunnerStats:
    """What the runner did at start-up, for the compile report."""

    pieces: int
    captured_sizes: tuple[int, ...]
    capture_seconds: float
    graph_memory_bytes: int
    graphs: int = 0                       # captured (piece, size) graphs
    decode_graph_sizes: tuple[int, ...] = ()  # sizes with a whole-decode-step graph
    eager_pieces: tuple[str, ...] = ()    # pieces that run eagerly at every size


@dataclass(frozen=True)
class DeviceProperties:
    """Device facts read once when a runner starts."""

    name: str
    capability: tuple[int, int] | None    # CUDA compute capability; None elsewhere
    processors: int                       # CUDA streaming multiprocessors, or CPU cores
    total_memory_bytes: int


class ModelRunnerBase:
    """Runs `gm` piece by piece; see the module docstring for buckets, padding and outputs."""

    uses_graphs: ClassVar[bool] = False

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                 device: torch.device | str, capture_sizes: Sequence[int] = (),
                 splitting_ops: Sequence[Any] = DEFAULT_SPLITTING_OPS,
                 token_input_indices: Sequence[int] = (), warmup_runs: int = 1,
                 debug: bool = False, capture_failure: str = "raise",
                 step_context: StepContext | None = None,
                 static_decode: StaticDecodeState | None = None) -> None:
        if capture_failure not in CAPTURE_FAILURE_CHOICES:
            raise ValueError(f"capture_failure: expected one of {CAPTURE_FAILURE_CHOICES}, "
                             f"found {capture_failure!r}")
        if isinstance(warmup_runs, bool) or not isinstance(warmup_runs, int) or warmup_runs < 0:
            raise ValueError(f"warmup_runs: expected an int >= 0, found {warmup_runs!r}")
        sizes = tuple(capture_sizes)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"capture_sizes: expected positive ints, found {sizes!r}")
        self.device = torch.device(device)
        self.debug = debug
        self.capture_failure = capture_failure
        self.warmup_runs = warmup_runs
        self.step_context = step_context
        self.static_decode = static_decode if self.uses_graphs else None
        self._decode_graphs: dict[int, CapturedGraph] = {}
        self.capture_sizes = tuple(sorted(set(sizes))) if self.uses_graphs else ()
        self.device_properties = self._cache_device_properties()
        self.split = split_graph(gm, splitting_ops)
        self._state = RunState()
        self.piece_runners: tuple[PieceRunner, ...] = install_piece_runners(
            self.split, self, self._state)
        self._inputs = StaticInputs(gm, example_inputs, token_input_indices,
                                    max(self.capture_sizes, default=0), self.device)
        self._token_outputs: tuple[bool, ...] | None = None
        self._static_outputs = static_outputs(self.split.split_module, self._inputs.is_token_input)
        self._warned_eager = False
        self.stats = RunnerStats(pieces=len(self.split.pieces), captured_sizes=(),
                                 capture_seconds=0.0, graph_memory_bytes=0,
                                 eager_pieces=self._eager_pieces())

    # -- device hooks ---------------------------------------------------------------------
    def _cache_device_properties(self) -> DeviceProperties:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError, AttributeError):
            memory = 0
        return DeviceProperties(name=platform.processor() or platform.machine() or "cpu",
                                capability=None, processors=os.cpu_count() or 1,
                                total_memory_bytes=memory)

    def memory_profiler(self) -> DeviceMemoryProfiler:
        return DeviceMemoryProfiler(self.device)

    def capture_graph(self, piece: Piece | None, args: Sequence[Any], run: Callable[..., Any],
                      is_last: bool) -> tuple[CapturedGraph, Any]:
        """Capture `run(*args)` as a graph; returns (graph, outputs of the capture run).

        `piece` is None for a whole decode step. `graph.outputs` is what replays return; the
        capture run's outputs feed the next pieces of the capture forward and must hold real
        values (replay once if capture only records).
        """
        raise NotImplementedError(f"{type(self).__name__} does not capture graphs "
                                  f"(uses_graphs is False)")

    def refuse_host_sync(self) -> AbstractContextManager[Any]:
        """A context in which a host synchronization raises (warm-up of pieces to capture)."""
        return nullcontext()

    def _capture_session(self) -> AbstractContextManager[Any]:
        """Device set-up around all captures (CUDA: the shared memory pool and stream)."""
        return nullcontext()

    def _fill_padding(self, padding: torch.Tensor) -> None:
        """Rows of a static token buffer past the real tokens, before a replay (default: stale)."""

    def _before_replay(self, bucket: int) -> None:
        """Called before each replayed forward (the simulator clobbers other buckets' memory)."""

    # -- capture --------------------------------------------------------------------------
    def capture(self) -> RunnerStats:
        """Warm up and capture every bucket, largest first; fills and returns `stats`."""
        if not self.capture_sizes or self.stats.captured_sizes:
            return self.stats  # nothing to capture, or captured already
        start = time.perf_counter()
        leading_dims: dict[int, list[int | None]] = {}
        profiler = self.memory_profiler()
        with torch.no_grad(), profiler, _gc_frozen(), self._capture_session():
            sizes = sorted(self.capture_sizes, reverse=True)
            for bucket in tqdm(sizes, desc="capturing graphs", unit="size", disable=None):
                leading_dims[bucket] = self._capture_bucket(bucket)
            for bucket in sizes if self.static_decode is not None else ():
                if not self._capture_decode_step(bucket):
                    break
        self._token_outputs = tuple(all(dims[i] == b for b, dims in leading_dims.items())
                                    for i in range(len(leading_dims[sizes[0]])))
        seconds = time.perf_counter() - start
        graphs = sum(len(p.entries) for p in self.piece_runners) + len(self._decode_graphs)
        self.stats = RunnerStats(
            pieces=len(self.split.pieces), captured_sizes=self.capture_sizes,
            capture_seconds=seconds, graph_memory_bytes=profiler.consumed_bytes,
            graphs=graphs, eager_pieces=self._eager_pieces(),
            decode_graph_sizes=tuple(sorted(self._decode_graphs)))
        logger.info("captured %d graphs for %d sizes in %.2f s, %.2f GiB", graphs,
                    len(self.capture_sizes), seconds, profiler.consumed_bytes / 2**30)
        return self.stats

    def _capture_bucket(self, bucket: int) -> list[int | None]:
        args = self._inputs.capture_args(bucket)
        with self._step(bucket):
            for _ in range(self.warmup_runs):
                self._run(Mode.WARMUP, bucket, args)
            outputs = self._run(Mode.CAPTURE, bucket, args)
        return [leaf.shape[0] if isinstance(leaf, torch.Tensor) and leaf.dim() else None
                for leaf in pytree.tree_leaves(outputs)]

    def _capture_decode_step(self, bucket: int) -> bool:
        """Capture the whole forward for `bucket` decode rows; False (warned) if it cannot be."""
        assert self.static_decode is not None
        args = self._inputs.capture_args(bucket)

        def forward(*inputs: Any) -> Any:
            return self._run(Mode.EAGER, 0, inputs)

        try:
            with self.static_decode.capture_context(bucket):
                for _ in range(self.warmup_runs):
                    with self.refuse_host_sync():
                        forward(*args)
                graph, _ = self.capture_graph(None, args, forward, is_last=True)
        except Exception as error:  # noqa: BLE001  (reported; decode stays piecewise)
            logger.warning("decode steps replay piecewise: a whole decode step of %d tokens "
                           "could not be captured: %s: %s", bucket, type(error).__name__, error)
            return False
        self._decode_graphs[bucket] = graph
        return True

    def _decode_graph(self, bucket: int) -> CapturedGraph | None:
        """The whole-step graph for this call, its layout loaded; None if the call cannot use it."""
        graph = self._decode_graphs.get(bucket)
        if graph is None:
            return None
        context = peek_forward_context()
        state = self.static_decode
        if context is None or state is None or context.kv_caches is not state.kv_caches \
                or not state.accepts(context.attn_metadata, bucket):
            return None
        state.load(context.attn_metadata, bucket)
        return graph

    def _step(self, bucket: int) -> AbstractContextManager[Any]:
        return self.step_context(bucket) if self.step_context is not None else nullcontext()

    def _eager_pieces(self) -> tuple[str, ...]:
        return tuple(p.piece.name for p in self.piece_runners if p.capture_disabled)

    # -- calls ----------------------------------------------------------------------------
    def _run(self, mode: Mode, bucket: int, args: Sequence[Any]) -> Any:
        self._state.mode, self._state.bucket = mode, bucket
        try:
            return self.split.split_module(*args)
        finally:
            self._state.mode = Mode.EAGER

    def __call__(self, *inputs: Any) -> Any:
        if not self.capture_sizes:
            return self._run(Mode.EAGER, 0, inputs)
        num_tokens = self._inputs.num_tokens(inputs)
        index = bisect.bisect_left(self.capture_sizes, num_tokens)
        if index == len(self.capture_sizes):
            if not self._warned_eager:
                self._warned_eager = True
                logger.warning("%d tokens is more than the largest captured size %d; running "
                               "eagerly (warned once)", num_tokens, self.capture_sizes[-1])
            return self._run(Mode.EAGER, 0, inputs)
        if not self._inputs.shapes_match(inputs):
            logger.debug("non-token inputs differ in shape from the example inputs; eager step")
            return self._run(Mode.EAGER, 0, inputs)
        if selects_logits_rows():  # graphs compute every row's logits; this step reads some
            return self._run(Mode.EAGER, 0, inputs)
        bucket = self.capture_sizes[index]
        with torch.no_grad():
            args = self._inputs.stage(inputs, num_tokens, bucket, self._fill_padding)
            self._before_replay(bucket)
            decode_graph = self._decode_graph(bucket)
            if decode_graph is not None:
                decode_graph.replay()
                return self._finish(decode_graph.outputs, num_tokens, bucket)
            outputs = self._run(Mode.REPLAY, bucket, args)
            return self._finish(outputs, num_tokens, bucket)

    def _finish(self, outputs: Any, num_tokens: int, bucket: int) -> Any:
        """Slice token outputs to the real tokens; clone those that may live in graph memory."""
        leaves, spec = pytree.tree_flatten(outputs)
        token_outputs = self._token_outputs or tuple(
            isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == bucket
            for leaf in leaves)
        finished = []
        for leaf, is_token, static in zip(leaves, token_outputs, self._static_outputs,
                                          strict=True):
            if isinstance(leaf, torch.Tensor) and not static:
                leaf = (leaf[:num_tokens] if is_token else leaf).clone()
            finished.append(leaf)
        return pytree.tree_unflatten(finished, spec)


def static_outputs(top: fx.GraphModule, token_inputs: Callable[[int], bool]) -> tuple[bool, ...]:
    """Per output leaf: True when it is returned as is (an attribute or a non-token input)."""
    (output,) = top.graph.find_nodes(op="output")
    placeholders = list(top.graph.find_nodes(op="placeholder"))
    kinds = []
    for leaf in pytree.tree_leaves(output.args[0]):
        if not isinstance(leaf, fx.Node):
            kinds.append(True)
        elif leaf.op == "placeholder":
            kinds.append(not token_inputs(placeholders.index(leaf)))
        else:
            kinds.append(leaf.op == "get_attr")
    return tuple(kinds)


class CPURunner(ModelRunnerBase):
    """No graphs: runs the split module directly on the inputs, without buckets or padding."""


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """Freeze the heap: collections during capture skip every object that existed before it."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def make_runner(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                device: torch.device | str, capture_sizes: Sequence[int],
                splitting_ops: Sequence[Any] = DEFAULT_SPLITTING_OPS,
                token_input_indices: Sequence[int], warmup_runs: int = 1, debug: bool = False,
                capture_failure: str = "raise", simulate: bool = False,
                step_context: StepContext | None = None,
                static_decode: StaticDecodeState | None = None) -> ModelRunnerBase:
    """Build the runner for `device` and capture its graphs.

    `simulate=True`: the replay simulator (CUDA-graph buffer semantics with eager kernels) on
    any device. Else CUDA devices get the CUDA-graph runner and CPU the plain runner.
    `step_context(num_tokens)`: a context manager entered around each warm-up and capture
    forward (set the per-step attention metadata there); calls need it set by the caller.
    `static_decode`: capture whole decode steps too, reading that state (module docstring).
    """
    device = torch.device(device)
    runner_class: type[ModelRunnerBase]
    if simulate:
        from runtime.replay_simulator import ReplaySimulatorRunner
        runner_class = ReplaySimulatorRunner
    elif device.type == "cuda":
        from runtime.cuda_runner import CUDARunner
        runner_class = CUDARunner
    else:
        runner_class = CPURunner
    runner = runner_class(gm, example_inputs, device=device, capture_sizes=capture_sizes,
                          splitting_ops=splitting_ops, token_input_indices=token_input_indices,
                          warmup_runs=warmup_runs, debug=debug, capture_failure=capture_failure,
                          step_context=step_context, static_decode=static_decode)
    runner.capture()
    return runner
