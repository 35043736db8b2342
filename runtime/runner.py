"""The bucket runner: runs a split graph of fxkiln's own models with token-count buckets.

`BucketRunner` is device-agnostic; it holds a `GraphDevice` (`runtime/graph_device.py`) that
captures. It owns the split graph, one static buffer per token input (`runtime/static_inputs.py`)
and the buckets (`runtime/buckets.py`: decode sizes, and prefill sizes above them). A call with
n tokens picks the smallest bucket >= n, copies the token inputs into the first n rows of the
static buffers (rows n.. are padding), runs the pieces (captured pieces replay their graph for
that bucket) and slices the token dimension of the outputs back to n. More tokens than the
largest bucket: the pieces run eagerly on the inputs as given, with one warning per runner. So
does a call whose non-token, non-parameter tensor inputs differ in shape from the example inputs
(an encoder-decoder step that runs the encoder, when the graphs were captured without it).

A step that reads the logits of some rows only (`runtime.logits_rows`: a prefill step), and any
step at a prefill bucket, replays the pieces up to the op and runs the op and the LM head after
it eagerly, on the rows read (`StepDescriptor.eager_logits`, `runtime/piece_runner.py`); a
graph whose last piece does not hold its one logits_rows op runs steps that read rows eagerly
and gets no prefill buckets. Whole decode steps (one graph, attention included) come from
`runtime/whole_step.py` when the runner is given a `KVCachePlan`: after the piecewise captures
it builds its own KV caches (for "auto", sized by a profiling forward at the largest bucket on
devices that profile, `runtime.memory`), then captures the whole steps over them at the
decode buckets.

Each call's step mode (whole-step graph, piecewise replay, eager) is decided once, in
`dispatch()`, and carried to the pieces in a frozen `StepDescriptor` (`runtime/step.py`).
On a device without graphs (the plain CPU) the runner runs the split module directly, without
buckets.

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

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree
from tqdm import tqdm

from runtime.buckets import Buckets
from runtime.graph_device import CaptureOptions, DeviceProperties, GraphDevice, graph_device_for
from runtime.logits_rows import is_logits_rows, selects_logits_rows
from runtime.memory import MemoryProfile, weight_memory_bytes
from runtime.padding_check import exact_sizes_reason
from runtime.piece_runner import PieceRunner, install_piece_runners, split_logits_piece
from runtime.split import DEFAULT_SPLITTING_OPS, split_graph
from runtime.static_decode import KVCachePlan, StaticDecodeState
from runtime.static_inputs import StaticInputs, static_outputs
from runtime.step import EAGER_STEP, StepDescriptor, StepMode, running
from runtime.whole_step import WholeStepGraphs

logger = logging.getLogger(__name__)

StepContext = Callable[[int], AbstractContextManager[Any]]


@dataclass(frozen=True)
class RunnerStats:
    """What a runner captured, for the compile report.

    `note` says why nothing is captured (or what a graph of a Dynamo signature runner still
    waits for); `captured_signatures` names the input-shape signatures with graphs (signature
    runners only).
    """

    pieces: int
    captured_sizes: tuple[int, ...]
    capture_seconds: float
    graph_memory_bytes: int
    graphs: int = 0                       # captured graphs (piece graphs and whole steps)
    decode_graph_sizes: tuple[int, ...] = ()  # sizes with a whole-step graph
    prefill_graph_sizes: tuple[int, ...] = ()  # prefill buckets (their LM head eager)
    eager_pieces: tuple[str, ...] = ()    # pieces that run eagerly at every size
    captured_signatures: tuple[str, ...] = ()
    note: str = ""
    kv_cache_tokens: int = 0              # slots of the runner's own KV cache (0: none)
    kv_cache_bytes: int = 0


class BucketRunner:
    """Runs `gm` piece by piece; see the module docstring for buckets, padding and outputs."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                 graph_device: GraphDevice, capture_sizes: Sequence[int] = (),
                 prefill_sizes: Sequence[int] = (),
                 splitting_ops: Sequence[Any] = DEFAULT_SPLITTING_OPS,
                 token_input_indices: Sequence[int] = (),
                 options: CaptureOptions = CaptureOptions(),
                 step_context: StepContext | None = None,
                 kv_cache: KVCachePlan | None = None, memory_utilization: float = 0.9,
                 check_padding: bool = False) -> None:
        buckets = Buckets.of(capture_sizes, prefill_sizes)
        self.graph_device = graph_device
        self.device = graph_device.device
        self.options = options
        self.step_context = step_context
        graphs = graph_device.uses_graphs
        self.kv_cache = kv_cache if graphs else None
        self.memory_utilization = memory_utilization
        self.static_decode: StaticDecodeState | None = None   # built by capture()
        self.whole_steps: WholeStepGraphs | None = None
        self.buckets = buckets if graphs else Buckets()
        self.split = split_graph(gm, splitting_ops)
        self.piece_runners: tuple[PieceRunner, ...] = install_piece_runners(self.split, self)
        # steps that read some rows' logits: any graph if the model computes every row anyway
        self._rows_matter = any(is_logits_rows(node) for node in gm.graph.nodes)
        self._eager_logits = self._rows_matter and split_logits_piece(self.piece_runners)
        if self.buckets.prefill and not self._eager_logits:
            logger.info("no prefill graphs: the graph has no logits_rows op to stop them at "
                        "(they would compute and keep every row's logits)")
            self.buckets = Buckets(self.buckets.decode)
        self._inputs = StaticInputs(gm, example_inputs, token_input_indices,
                                    max(self.buckets.all, default=0), self.device)
        self.host_scalars = frozenset(
            x.data_ptr() for i, x in enumerate(self._inputs.example_inputs)
            if isinstance(x, torch.Tensor) and x.dim() == 0 and not self._inputs.is_token_input(i))
        self._token_outputs: tuple[bool, ...] | None = None
        self._static_outputs = static_outputs(self.split.split_module, self._inputs.is_token_input)
        self._warned_eager = False
        self.check_padding = check_padding
        self.exact_sizes_only = ""  # why calls replay only at a bucket's exact size, if they do
        self.stats = RunnerStats(pieces=len(self.split.pieces), captured_sizes=(),
                                 capture_seconds=0.0, graph_memory_bytes=0,
                                 eager_pieces=self._eager_pieces(),
                                 note="" if graphs else f"{self.device.type} has no device graphs",
                                 **self._cache_stats())

    @property
    def device_properties(self) -> DeviceProperties:
        return self.graph_device.properties

    # -- capture --------------------------------------------------------------------------
    def capture(self) -> RunnerStats:
        """Warm up and capture every bucket, largest first; then, given a KV cache plan, build
        the runner's caches and capture whole decode steps over them. Fills `stats`."""
        if not self.buckets.all or self.stats.captured_sizes:
            return self.stats  # nothing to capture, or captured already
        start = time.perf_counter()
        if self.check_padding:
            self._check_padding()
        leading_dims: dict[int, list[int | None]] = {}
        sizes = sorted(self.buckets.all, reverse=True)
        with self.graph_device.capturing() as profiler:
            for bucket in tqdm(sizes, desc="capturing graphs", unit="size", disable=None):
                leading_dims[bucket] = self._capture_bucket(bucket)
        self._token_outputs = tuple(all(dims[i] == b for b, dims in leading_dims.items())
                                    for i in range(len(leading_dims[sizes[0]])))
        graph_bytes = profiler.consumed_bytes
        if self.kv_cache is not None:
            graph_bytes += self._capture_whole_steps(self.kv_cache, graph_bytes)
        seconds = time.perf_counter() - start
        whole = self.whole_steps.sizes if self.whole_steps is not None else ()
        graphs = sum(p.graph_count for p in self.piece_runners) + len(whole)
        self.stats = RunnerStats(
            pieces=len(self.split.pieces), captured_sizes=self.buckets.all,
            capture_seconds=seconds, graph_memory_bytes=graph_bytes,
            graphs=graphs, eager_pieces=self._eager_pieces(), decode_graph_sizes=whole,
            prefill_graph_sizes=self.buckets.prefill, **self._cache_stats(),
            note=f"captured at exact sizes only: {self.exact_sizes_only}"
            if self.exact_sizes_only else "")
        logger.info("captured %d graphs for %d sizes (%d prefill) in %.2f s, %.2f GiB", graphs,
                    len(self.buckets.all), len(self.buckets.prefill), seconds,
                    graph_bytes / 2**30)
        return self.stats

    def _capture_whole_steps(self, plan: KVCachePlan, graph_bytes: int) -> int:
        """Build the runner's KV caches (sized now, after the piecewise graphs) and capture a
        whole decode step per bucket over them; returns the memory those graphs keep."""
        profile = ((lambda: self._profile_largest_step(graph_bytes))
                   if self.graph_device.profiles_memory else None)
        self.static_decode = plan.build(plan.slots(profile, self.memory_utilization))
        self.whole_steps = WholeStepGraphs(
            self.static_decode, self.graph_device, self.options,
            input_ids_index=plan.input_ids_index, positions_index=plan.positions_index,
            padded=not self.exact_sizes_only)
        logger.info("runner KV cache: %d tokens, %.3f GiB", self.static_decode.num_slots,
                    self.static_decode.cache_bytes / 2**30)
        with self.graph_device.capturing() as profiler:
            for bucket in sorted(self.buckets.decode, reverse=True):
                if not self.whole_steps.capture(bucket, self._inputs.capture_args(bucket),
                                                self._run_eagerly):
                    break
        return profiler.consumed_bytes

    def _profile_largest_step(self, graph_bytes: int) -> MemoryProfile:
        """An eager forward at the largest bucket (every row's logits: the most a step of that
        size computes), measured by the device, with this model's weights and graphs."""
        bucket = self.buckets.all[-1]
        args = self._inputs.capture_args(bucket)
        with torch.no_grad(), self._step_context(bucket):
            measured = self.graph_device.profile_forward(lambda: self._run_eagerly(*args))
        return dataclasses.replace(measured, graph_bytes=graph_bytes,
                                   weight_bytes=weight_memory_bytes(self.split.split_module))

    def _check_padding(self) -> None:
        """Calls replay only at a bucket's exact size if padding changes real rows."""
        def run(tokens: int, args: Sequence[Any]) -> Any:
            with self._step_context(tokens):
                return self._run_eagerly(*args)

        self.exact_sizes_only = exact_sizes_reason(self._inputs, run, self.buckets.all)

    def _capture_bucket(self, bucket: int) -> list[int | None]:
        args = self._inputs.capture_args(bucket)
        eager_logits = self.buckets.is_prefill(bucket)
        with self._step_context(bucket):
            for _ in range(self.options.warmup_runs):
                self._run(StepDescriptor(StepMode.WARMUP, bucket, eager_logits=eager_logits),
                          args)
            outputs = self._run(StepDescriptor(StepMode.CAPTURE, bucket,
                                               eager_logits=eager_logits), args)
        return [leaf.shape[0] if isinstance(leaf, torch.Tensor) and leaf.dim() else None
                for leaf in pytree.tree_leaves(outputs)]

    def _step_context(self, bucket: int) -> AbstractContextManager[Any]:
        return self.step_context(bucket) if self.step_context is not None else nullcontext()

    def _cache_stats(self) -> dict[str, int]:
        state = self.static_decode
        if state is None:
            return {}
        return {"kv_cache_tokens": state.num_slots, "kv_cache_bytes": state.cache_bytes}

    def _eager_pieces(self) -> tuple[str, ...]:
        return tuple(p.piece.name for p in self.piece_runners if p.capture_disabled)

    # -- calls ----------------------------------------------------------------------------
    def _run(self, step: StepDescriptor, args: Sequence[Any]) -> Any:
        with running(step):
            return self.split.split_module(*args)

    def _run_eagerly(self, *args: Any) -> Any:
        return self._run(EAGER_STEP, args)

    def dispatch(self, num_tokens: int, inputs: Sequence[Any]) -> StepDescriptor:
        """The step for a call of `num_tokens` tokens: decided here, once per call."""
        bucket = self.buckets.for_tokens(num_tokens)
        if bucket is None:
            if not self._warned_eager:
                self._warned_eager = True
                logger.warning("%d tokens is more than the largest captured size %d; running "
                               "eagerly (warned once)", num_tokens, self.buckets.all[-1])
            return StepDescriptor(StepMode.EAGER, reason="more tokens than the largest bucket")
        if not self._inputs.shapes_match(inputs):
            logger.debug("non-token inputs differ in shape from the example inputs; eager step")
            return StepDescriptor(StepMode.EAGER, reason="non-token input shapes differ")
        if self.exact_sizes_only and bucket != num_tokens:
            return StepDescriptor(StepMode.EAGER, reason=self.exact_sizes_only)
        reads_rows = self._rows_matter and selects_logits_rows()
        if reads_rows and not self._eager_logits:  # the graphs compute every row's logits
            return StepDescriptor(StepMode.EAGER, reason="the step reads some rows' logits")
        eager_logits = self._eager_logits and (reads_rows or self.buckets.is_prefill(bucket))
        if not eager_logits and self.whole_steps is not None and self.whole_steps.serves(bucket):
            return StepDescriptor(StepMode.FULL, bucket)
        return StepDescriptor(StepMode.PIECEWISE, bucket, eager_logits=eager_logits)

    def __call__(self, *inputs: Any) -> Any:
        if not self.buckets.all:
            return self._run(EAGER_STEP, inputs)
        num_tokens = self._inputs.num_tokens(inputs)
        step = self.dispatch(num_tokens, inputs)
        if not step.replays:
            return self._run(step, inputs)
        bucket = step.key
        with torch.no_grad():
            if step.mode is StepMode.FULL:  # the whole step reads the state's own buffers
                assert self.whole_steps is not None
                self.graph_device.before_replay(bucket)
                return self._finish(self.whole_steps.replay(bucket, inputs), num_tokens, bucket)
            args = self._inputs.stage(inputs, num_tokens, bucket, self.graph_device.fill_padding)
            self.graph_device.before_replay(bucket)
            return self._finish(self._run(step, args), num_tokens, bucket)

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


def make_runner(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                device: torch.device | str, capture_sizes: Sequence[int],
                prefill_sizes: Sequence[int] = (),
                splitting_ops: Sequence[Any] = DEFAULT_SPLITTING_OPS,
                token_input_indices: Sequence[int], warmup_runs: int = 1, debug: bool = False,
                capture_failure: str = "raise", simulate: bool = False,
                step_context: StepContext | None = None, kv_cache: KVCachePlan | None = None,
                memory_utilization: float = 0.9, check_padding: bool = False) -> BucketRunner:
    """Build the bucket runner for `device` (see `graph_device_for`) and capture its graphs.

    `step_context(num_tokens)`: a context manager entered around each warm-up and capture
    forward (set the per-step attention metadata there); calls need it set by the caller.
    `prefill_sizes`: buckets above the largest capture size for prefill steps, their LM head
    run eagerly (`runtime.buckets`). `kv_cache`: build the runner's own KV caches after the piecewise captures (sized from a
    profiling forward for "auto" on devices that profile, taking `memory_utilization` of the
    device less what the model needs besides) and capture whole decode steps over them
    (`runtime/whole_step.py`). `check_padding`: prove at capture that padding leaves real rows
    alone (`runtime/padding_check.py`), for models that do not declare their rows independent.
    """
    options = CaptureOptions(warmup_runs=warmup_runs, capture_failure=capture_failure,
                             debug=debug)
    runner = BucketRunner(gm, example_inputs, graph_device=graph_device_for(device, simulate),
                          capture_sizes=capture_sizes, prefill_sizes=prefill_sizes,
                          splitting_ops=splitting_ops,
                          token_input_indices=token_input_indices, options=options,
                          step_context=step_context, kv_cache=kv_cache,
                          memory_utilization=memory_utilization, check_padding=check_padding)
    runner.capture()
    return runner
