"""Shape propagation after a pass, re-run only where the pass changed the graph.

The pass manager refreshes `meta["val"]` after every pass that modified the graph; a full
fake-tensor propagation of a Hugging Face serving graph costs about half a second, thirteen
times per compile. A pass changes a handful of nodes, so `IncrementalPropagation` keeps, per
node, a fingerprint from the last propagation (op, target, arguments with nodes by identity,
the attribute a `get_attr`/`call_module` names) and the value it wrote. The next refresh runs
`FakeTensorProp.run_node` only for nodes that are new, whose fingerprint changed, whose value
was overwritten since, or one of whose inputs came out with other metadata (shape with its
symbolic expressions, stride, offset, dtype, device); its inputs come from the values already
on the graph. Whatever it cannot follow (another graph or fake mode, changed placeholders,
unbacked symbols, an op that changes its input's shape in place) gets the full propagation,
except an exact copy of the graph that the caller hands over (`follow_copy`).
Both run without the fake-tensor cache: with symbolic sizes an entry costs more to make than
the op it saves (the first propagation of a serving graph took 2.0 s with it, 0.9 s without),
and the nodes a refresh re-runs are mostly new ones. `metadata_differences` compares a graph's
values with a fresh full propagation, for tests.

Both also run under the Python dispatcher, as Dynamo's own propagation does (see
`compiler.capture.ShapePropagator`): torch 2.11's C++ matmul and linear would otherwise fix a
symbolic token count to the example's. And under `no_grad`, as the compiled model runs: with
parameters that require grad, an op with `out=` after a projection (`torch.mul(x, 2, out=buf)`)
would otherwise be refused by autograd at compile time.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, disable_fake_tensor_cache
from torch.fx.experimental.proxy_tensor import snapshot_fake
from torch.fx.node import map_aggregate
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

logger = logging.getLogger(__name__)

# In-place ops that change their input's sizes or strides: after one, the input's value is no
# longer what the node that made it recorded, so reading inputs from the graph would be wrong.
_METADATA_WRITES = frozenset({"resize_", "resize_as_", "squeeze_", "unsqueeze_", "transpose_",
                              "t_", "as_strided_", "swapaxes_", "swapdims_", "set_"})
_MISSING = object()  # a node without meta["val"] (a call that returned None)
_SCALARS = (int, float, bool, str, complex, type(None), type(Ellipsis), torch.dtype,
            torch.device, torch.layout, torch.memory_format)


class FakeProp(FakeTensorProp):
    """FakeTensorProp that also fakes real constants (weights a pass added as attributes)."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value


def full_propagation(gm: fx.GraphModule, mode: FakeTensorMode, inputs: tuple[Any, ...]) -> None:
    """meta["val"] on every node of `gm`, from `inputs` (fake values of its placeholders)."""
    with mode, disable_fake_tensor_cache(mode), enable_python_dispatcher(), torch.no_grad():
        FakeProp(gm, mode).propagate_dont_convert_inputs(*inputs)


@dataclass(frozen=True)
class RefreshStats:
    """What one refresh did: a full propagation, or `recomputed` nodes of `nodes`."""

    full: bool
    recomputed: tuple[str, ...]
    nodes: int
    reason: str = ""


class _Same:
    """Equal only to a _Same of the very same object (weakly held where the object allows)."""

    __slots__ = ("_get",)

    def __init__(self, value: Any) -> None:
        try:
            self._get = weakref.ref(value)
        except TypeError:
            self._get = lambda: value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return False
        mine = self._get()
        return mine is not None and mine is other._get()

    __hash__ = None  # type: ignore[assignment]  # compared, never hashed


def _key(value: Any) -> Any:
    """`value` as a structure that compares equal only to an unchanged argument."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_key(item) for item in value))
    if isinstance(value, dict):
        return ("dict", *((key, _key(item)) for key, item in value.items()))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    if type(value) in _SCALARS:
        return (type(value), value)
    return _Same(value)


def _attribute(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The object a get_attr or call_module node names, as a key; () for other nodes."""
    if node.op not in ("get_attr", "call_module"):
        return ()
    owner: Any = gm
    try:
        for part in str(node.target).split("."):
            owner = getattr(owner, part)
    except AttributeError:
        return _Same(object())  # equal to no other key: re-run, and it fails as a full run would
    if isinstance(owner, torch.Tensor):  # the same tensor, unless its `.data` was swapped
        return (_Same(owner), tuple(owner.shape), owner.stride(), owner.dtype, owner.device)
    return _key(owner)


def fingerprint(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...]:
    return (node.op, _key(node.target), _key(node.args), _key(node.kwargs), _attribute(gm, node))


def _same_size(a: Any, b: Any) -> bool:
    """Equal sizes: the same sympy expression (after the shape env's replacements), so a
    symbol later specialized to 5 equals 5."""
    symbolic = (torch.SymInt, torch.SymFloat, torch.SymBool)
    if isinstance(a, symbolic) or isinstance(b, symbolic):
        return _expression(a) == _expression(b)
    return type(a) is type(b) and a == b


def _expression(value: Any) -> Any:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return value.node.expr
    return sympy.sympify(value) if isinstance(value, (int, float, bool)) else value


def same_metadata(a: Any, b: Any) -> bool:
    """`a` and `b` give the same shape (symbolic expressions too), stride, offset, dtype,
    device, layout: what a consumer's propagation reads. Values are compared as structures."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if getattr(a, "constant", None) is not None or getattr(b, "constant", None) is not None:
            return a is b  # a fake tensor that knows its data: consumers may read the data
        return (a.dim() == b.dim() and (a.dtype, a.device, a.layout, a.requires_grad)
                == (b.dtype, b.device, b.layout, b.requires_grad)
                and all(map(_same_size, a.shape, b.shape))
                and all(map(_same_size, a.stride(), b.stride()))
                and _same_size(a.storage_offset(), b.storage_offset()))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_metadata, a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return type(a) is type(b) and a.keys() == b.keys() \
            and all(same_metadata(a[key], b[key]) for key in a)
    return _same_size(a, b)


@dataclass
class _Propagated:
    """What the last propagation saw and wrote: per node, its fingerprint and its value."""

    graph: weakref.ref[fx.Graph]
    mode: FakeTensorMode
    placeholders: tuple[tuple[fx.Node, Any], ...]
    nodes: dict[fx.Node, tuple[tuple[Any, ...], Any]]


class IncrementalPropagation:
    """Fake-tensor propagation of a graph that, called again, re-runs only what changed."""

    def __init__(self) -> None:
        self._last: _Propagated | None = None

    def __call__(self, gm: fx.GraphModule, mode: FakeTensorMode,
                 inputs: tuple[Any, ...]) -> RefreshStats:
        reason = self._full_reason(gm, mode)
        last, self._last = self._last, None  # a propagation that raises leaves nothing to trust
        if reason or last is None:
            full_propagation(gm, mode, inputs)
            nodes = {node: (fingerprint(gm, node), node.meta.get("val", _MISSING))
                     for node in gm.graph.nodes}
            stats = RefreshStats(True, tuple(node.name for node in nodes), len(nodes), reason)
        else:
            nodes, recomputed = _rerun_changed(gm, mode, inputs, last)
            stats = RefreshStats(False, recomputed, len(nodes))
        self._last = _Propagated(weakref.ref(gm.graph), mode, _placeholders(gm), nodes)
        logger.debug("shape refresh of %s: %s", type(gm).__name__,
                     f"full ({reason})" if stats.full
                     else f"{len(stats.recomputed)} of {stats.nodes} nodes")
        return stats

    def follow_copy(self, gm: fx.GraphModule, copies: dict[fx.Node, fx.Node]) -> None:
        """`gm` is an exact copy of the graph last propagated (`copies`: each node's copy),
        its nodes holding the same values: its next refresh re-runs only what changed since."""
        last = self._last
        if last is None or last.graph() is None:
            return
        nodes = {copies[node]: (fingerprint(gm, copies[node]), value)
                 for node, (_, value) in last.nodes.items() if node in copies}
        self._last = _Propagated(weakref.ref(gm.graph), last.mode, _placeholders(gm), nodes)

    def _full_reason(self, gm: fx.GraphModule, mode: FakeTensorMode) -> str:
        """Why the next refresh of `gm` must propagate the whole graph, or ''."""
        last = self._last
        if last is None:
            return "first propagation"
        if last.graph() is not gm.graph:
            return "another graph"
        if last.mode is not mode:
            return "another fake mode"
        if not _same_placeholders(last.placeholders, _placeholders(gm)):
            return "placeholders changed"
        for node in gm.graph.nodes:
            if "unbacked_bindings" in node.meta:
                return f"{node.name} has unbacked symbols"
            if node.op in ("call_function", "call_method") and _name(node.target) in _METADATA_WRITES:
                return f"{node.name} changes its input's shape in place"
        return ""


def _rerun_changed(gm: fx.GraphModule, mode: FakeTensorMode, inputs: tuple[Any, ...],
                   last: _Propagated) -> tuple[dict[fx.Node, tuple[tuple[Any, ...], Any]],
                                               tuple[str, ...]]:
    """Run, in graph order, each node that is new, changed, lost its value since `last`, or
    reads a node whose value came out different; the others keep theirs."""
    prop = FakeProp(gm, mode)
    placeholders = [node for node, _ in last.placeholders]
    prop.env.update(zip(placeholders, inputs))
    changed: set[fx.Node] = set()
    recomputed: list[str] = []
    nodes: dict[fx.Node, tuple[tuple[Any, ...], Any]] = {}
    with mode, disable_fake_tensor_cache(mode), enable_python_dispatcher(), torch.no_grad():
        for node in gm.graph.nodes:
            key = fingerprint(gm, node)
            before = last.nodes.get(node)
            if node.op == "placeholder" or (
                    before is not None and before[0] == key and before[1] is not _MISSING
                    and node.meta.get("val", _MISSING) is before[1]
                    and not any(source in changed for source in node.all_input_nodes)):
                nodes[node] = (key, node.meta.get("val", _MISSING))
                continue
            for source in node.all_input_nodes:
                if source not in prop.env:
                    prop.env[source] = map_aggregate(source.meta["val"], _detached)
            prop.env[node] = prop.run_node(node)
            recomputed.append(node.name)
            value = node.meta.get("val", _MISSING)
            if before is None or not same_metadata(before[1], value):
                changed.add(node)
            nodes[node] = (key, value)
    return nodes, tuple(recomputed)


def _detached(value: Any) -> Any:
    """A value of the graph as an input to a node's run: its own tensor, so that the run
    cannot touch the value on the graph."""
    return snapshot_fake(value) if isinstance(value, torch.Tensor) else value


def _placeholders(gm: fx.GraphModule) -> tuple[tuple[fx.Node, Any], ...]:
    return tuple((node, node.meta.get("val", _MISSING))
                 for node in gm.graph.find_nodes(op="placeholder"))


def _same_placeholders(a: tuple[tuple[fx.Node, Any], ...],
                       b: tuple[tuple[fx.Node, Any], ...]) -> bool:
    return len(a) == len(b) and all(x is y and u is v for (x, u), (y, v) in zip(a, b))


def _name(target: Any) -> str:
    if isinstance(target, str):
        return target
    return str(getattr(getattr(target, "overloadpacket", target), "__name__", ""))


def metadata_differences(gm: fx.GraphModule, mode: FakeTensorMode,
                         inputs: tuple[Any, ...]) -> list[str]:
    """How the values on `gm` differ from a full propagation (of a copy: `gm` is untouched),
    one line per node; [] when every node's value has the same metadata."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for copy in copies.values():
        copy.meta.pop("val", None)
    full_propagation(fx.GraphModule(gm, graph), mode, inputs)
    differences = []
    for node, copy in copies.items():
        ours, theirs = node.meta.get("val", _MISSING), copy.meta.get("val", _MISSING)
        if not same_metadata(ours, theirs):
            differences.append(f"{node.format_node()}: {_describe(ours)}, a full propagation "
                               f"gives {_describe(theirs)}")
    return differences


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "no value"
    if isinstance(value, torch.Tensor):
        return (f"{value.dtype} {tuple(value.shape)} stride {value.stride()} offset "
                f"{value.storage_offset()} on {value.device}")
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(_describe, value)) + ")"
    return repr(value)
