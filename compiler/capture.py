"""Graph capture: a model becomes a torch.fx GraphModule with shapes on every node.

Two front ends give the same kind of graph. `torch.fx.symbolic_trace` (through every module,
so `nn.Linear` becomes an `F.linear` node as under Dynamo) serves models written to be
traceable, such as our own; TorchDynamo serves everything else. Either way each node ends up
with `meta["val"]`, a FakeTensor whose token dimension (dim 0 of each input) is a symbol of
torch's sympy-backed ShapeEnv, so one graph serves every token count.
"""
from __future__ import annotations

import logging
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from compiler.shape_refresh import IncrementalPropagation, RefreshStats
from passes.writes import IN_PLACE_OPERATORS

logger = logging.getLogger(__name__)


class GraphBreakError(RuntimeError):
    """Dynamo could not capture the model as one graph."""


class TraceWriteError(RuntimeError):
    """Tracing ran a write into the model's state instead of recording it in the graph."""


class _InPlaceProxy(fx.Proxy):
    """fx's Proxy, except that `x += y` is recorded as the in-place operator it is on tensors.

    fx.Proxy has no `__iadd__`, so Python falls back to `x = x + y` and a write through an
    alias (`view = self.state[:n]; view += x`) is lost.
    """


def _augmented(operation: Any) -> Any:
    def record(self: _InPlaceProxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operation, (self, other), {})

    return record


for _operation in IN_PLACE_OPERATORS:
    if callable(_operation):
        setattr(_InPlaceProxy, f"__{_operation.__name__}__", _augmented(_operation))


def _setitem(self: _InPlaceProxy, key: Any, value: Any) -> None:
    self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


_InPlaceProxy.__setitem__ = _setitem  # type: ignore[method-assign]  # fx.Proxy has none


class _ThroughModulesTracer(fx.Tracer):
    """Traces into every submodule, so layers appear as the functional calls they make.

    Buffers are proxies too (fx's default reads them as constants), so that a write into a
    buffer (`self.steps.add_(1)`) becomes a graph op that runs at every call instead of once,
    at trace time.
    """

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _attribute_writes_guarded():
            return super().trace(root, concrete_args)


@contextmanager
def _attribute_writes_guarded() -> Iterator[None]:
    """While tracing, a traced value assigned to a module attribute never reaches the module.

    `self.steps += 1` assigns the result of the in-place add (already a graph op) back to the
    buffer: that assignment is dropped, as in eager it rebinds the same tensor. Any other
    (`self.cache = x * 2`) cannot be recorded in a graph: TraceWriteError, before the model
    holds a Proxy.
    """
    original = torch.nn.Module.__setattr__

    def guarded(module: torch.nn.Module, name: str, value: Any) -> None:
        if not isinstance(value, fx.Proxy):
            original(module, name, value)
            return
        current = getattr(module, name, None)
        node = value.node
        if isinstance(current, fx.Proxy) and node.target in IN_PLACE_OPERATORS \
                and node.args and node.args[0] is current.node:
            return
        raise TraceWriteError(f"{type(module).__name__}.{name} = {node.format_node()}: a module "
                              f"attribute rebound to a traced value cannot be recorded in a graph")

    torch.nn.Module.__setattr__ = guarded  # type: ignore[method-assign]  # restored below
    try:
        yield
    finally:
        torch.nn.Module.__setattr__ = original  # type: ignore[method-assign]


def symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    """symbolic_trace through all submodules; raises whatever tracing raises.

    A trace that wrote into a parameter or buffer (a write fx could not record, through a
    tensor it does not see as the model's) raises TraceWriteError naming it.
    """
    versions = _versions(model)
    graph = _ThroughModulesTracer().trace(model)
    written = [name for name, version in _versions(model).items() if versions.get(name) != version]
    if written:
        raise TraceWriteError(f"tracing {type(model).__name__} wrote into {written} instead of "
                              f"recording the write in the graph")
    name = type(model).__name__
    return fx.GraphModule(model, graph, name)


def _versions(model: torch.nn.Module) -> dict[str, int]:
    """The version counter of every parameter and buffer that has one (inference tensors don't)."""
    versions: dict[str, int] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_inference():
            versions[name] = tensor._version
    return versions


@dataclass
class ShapePropagator:
    """Fake-tensor shape propagation of a graph; passes call it after they change the graph.

    The first call propagates the whole graph; a later call on the same graph re-runs only the
    nodes that changed and those whose inputs' metadata changed (`compiler/shape_refresh.py`).
    Ops run as Dynamo runs them when it traces (`get_fake_value`): under the Python
    dispatcher, so composite ops (matmul, linear) decompose through their Python
    implementations, which keep sizes symbolic. Their C++ implementations read concrete sizes
    in torch 2.11 (matmul's fold check asks `numel() == 0`), which guards a symbolic token
    count to the example's and leaves every later pass one count.
    """

    fake_mode: FakeTensorMode
    fake_inputs: tuple[Any, ...]
    incremental: IncrementalPropagation = field(default_factory=IncrementalPropagation,
                                                repr=False, compare=False)

    def __call__(self, gm: fx.GraphModule) -> RefreshStats:
        return self.incremental(gm, self.fake_mode, self.fake_inputs)

    def follow_copy(self, gm: fx.GraphModule, copies: dict[fx.Node, fx.Node]) -> None:
        """Refresh `gm`, an exact copy of the graph last refreshed, as that graph."""
        self.incremental.follow_copy(gm, copies)


def symbolic_propagator(example_inputs: Sequence[Any]) -> ShapePropagator:
    """Fake inputs whose dim 0 is dynamic, for graphs from `symbolic_trace`."""
    shape_env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    fakes: list[Any] = []
    for index, value in enumerate(example_inputs):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            sizes = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (value.dim() - 1)
            context = StatelessSymbolicContext(dynamic_sizes=sizes)
            # a source of its own for each input: without one, torch 2.11 fakes the sizes as
            # static (concrete) and every pass then sees one token count
            fakes.append(mode.from_tensor(value, source=ConstantSource(f"fxkiln_input_{index}"),
                                          symbolic_context=context))
        elif isinstance(value, torch.Tensor):
            fakes.append(mode.from_tensor(value))
        else:
            fakes.append(value)
    return ShapePropagator(mode, tuple(fakes))


def dynamo_propagator(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> ShapePropagator:
    """For graphs handed to a Dynamo backend: Dynamo's own fake mode and symbolic inputs.

    Placeholders that carry parameters or buffers are marked with meta["static_value"] (the
    real tensor) so passes can treat them as compile-time constants.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes: list[Any] = []
    for node, value in zip(placeholders, example_inputs):
        example = node.meta.get("example_value", node.meta.get("val"))
        if _is_static_input(node, value):
            node.meta["static_value"] = value
        fakes.append(example if example is not None else value)
    # The fake mode the example values were made in (not the tracing context's, which differs).
    modes = [value.fake_mode for value in fakes if isinstance(value, FakeTensor)]
    fake_mode = modes[0] if modes else FakeTensorMode(allow_non_fake_inputs=True)
    return ShapePropagator(fake_mode, tuple(fakes))


def _is_static_input(node: fx.Node, value: Any) -> bool:
    if isinstance(value, torch.nn.Parameter):
        return True
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return False
    name = source.name() if callable(source.name) else str(source.name)
    return "_parameters" in name or "_buffers" in name


def concrete_inputs(example_inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Dynamo hands SymInts for size inputs; running the graph needs their example values."""
    return tuple(int(v.node.hint) if isinstance(v, torch.SymInt) else v for v in example_inputs)


def describe_graph_break(exc: BaseException) -> str:
    """'file:line: reason' for the frame where Dynamo broke the graph."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = "unknown location"
    frames = getattr(exc, "real_stack", None) or []
    if frames:
        frame = frames[-1]
        where = f"{frame.filename}:{frame.lineno}"
    else:
        tb = exc.__traceback__
        user_frames = []
        while tb is not None:
            user_frames.append(tb)
            tb = tb.tb_next
        for tb_frame in reversed(user_frames):
            filename = tb_frame.tb_frame.f_code.co_filename
            if "torch/" not in filename:
                where = f"{filename}:{tb_frame.tb_lineno}"
                break
    return f"{where}: {reason}"
