"""Incremental shape propagation (compiler/shape_refresh.py): after a change, only the nodes
that changed and those whose inputs' metadata changed are re-run, and the values on the graph
are always those a full propagation gives."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import fx, nn

import compiler
from compiler import CompileConfig, compile_model
from compiler.capture import ShapePropagator, symbolic_propagator
from compiler.shape_refresh import FakeProp, metadata_differences
from models import from_hf
from models.presets import hf_model
from tests.fx_helpers import assert_fresh, checked_refreshes, trace
from tests.hf_models import build

INPUTS = (torch.randn(5, 8),)
PLAIN = CompileConfig(device="cpu", capture_sizes=())


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(8, 8)
        self.right = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.relu(self.left(x)).flatten(1)
        b = torch.tanh(self.right(x)) * 2
        return a, b


def propagated(module: nn.Module = TwoBranches()) -> tuple[fx.GraphModule, ShapePropagator]:
    gm = trace(module)
    refresh = symbolic_propagator(INPUTS)
    assert refresh(gm).full
    return gm, refresh


def named(gm: fx.GraphModule, name: str) -> fx.Node:
    (node,) = [node for node in gm.graph.nodes if node.name == name]
    return node


@pytest.fixture
def run_nodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every node FakeProp runs, in order."""
    seen: list[str] = []
    run_node = FakeProp.run_node

    def counting(self: FakeProp, node: fx.Node) -> object:
        seen.append(node.name)
        return run_node(self, node)

    monkeypatch.setattr(FakeProp, "run_node", counting)
    return seen


def test_an_unchanged_graph_reruns_no_node(run_nodes: list[str]) -> None:
    gm, refresh = propagated()
    run_nodes.clear()
    stats = refresh(gm)
    assert not stats.full and stats.recomputed == () and run_nodes == []
    assert stats.nodes == len(gm.graph.nodes)


def test_a_rewired_node_is_rerun_and_readers_of_an_unchanged_value_are_not(
        run_nodes: list[str]) -> None:
    """tanh reads the left projection instead of the right one: same shape, so `mul` and the
    output keep their values; nothing of the left branch is touched."""
    gm, refresh = propagated()
    named(gm, "tanh").replace_input_with(named(gm, "linear_1"), named(gm, "linear"))
    run_nodes.clear()
    stats = refresh(gm)
    assert stats.recomputed == ("tanh",) and run_nodes == ["tanh"]
    assert metadata_differences(gm, refresh.fake_mode, refresh.fake_inputs) == []


def test_nodes_downstream_of_a_changed_shape_are_rerun_until_the_shape_is_the_same_again(
        run_nodes: list[str]) -> None:
    """An unsqueeze before relu changes relu's shape; flatten(1) gives the old shape back, so
    the output is not re-run. The right branch is not touched."""
    gm, refresh = propagated()
    relu, left = named(gm, "relu"), named(gm, "linear")
    with gm.graph.inserting_before(relu):
        unsqueezed = gm.graph.call_method("unsqueeze", (left, 1))
    relu.replace_input_with(left, unsqueezed)
    old_relu = relu.meta["val"]
    run_nodes.clear()
    stats = refresh(gm)
    assert stats.recomputed == ("unsqueeze", "relu", "flatten") == tuple(run_nodes)
    assert relu.meta["val"].dim() == old_relu.dim() + 1
    assert metadata_differences(gm, refresh.fake_mode, refresh.fake_inputs) == []


def test_a_changed_output_shape_reaches_the_output_node(run_nodes: list[str]) -> None:
    gm, refresh = propagated()
    mul = named(gm, "mul")
    with gm.graph.inserting_after(mul):
        summed = gm.graph.call_method("sum", (mul, -1))
    mul.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not summed)
    run_nodes.clear()
    assert refresh(gm).recomputed == (summed.name, "output") == tuple(run_nodes)
    assert metadata_differences(gm, refresh.fake_mode, refresh.fake_inputs) == []


def test_a_node_without_a_value_is_rerun() -> None:
    gm, refresh = propagated()
    del named(gm, "flatten").meta["val"]
    assert refresh(gm).recomputed == ("flatten",)
    assert "val" in named(gm, "flatten").meta


def test_a_replaced_attribute_reruns_its_get_attr_and_what_reads_it() -> None:
    gm = trace(TwoBranches())
    gm.register_buffer("extra", torch.ones(8))
    weight = gm.graph.get_attr("extra")  # appended: moved before its reader
    mul = named(gm, "mul")
    mul.prepend(weight)
    mul.args = (mul.args[0], weight)
    refresh = symbolic_propagator(INPUTS)
    refresh(gm)
    gm.register_buffer("extra", torch.ones(3, 1, 8))
    assert refresh(gm).recomputed == ("extra", "mul", "output")
    gm.extra.data = torch.ones(2, 1, 8)  # the same tensor object, with other sizes
    assert refresh(gm).recomputed == ("extra", "mul", "output")
    assert named(gm, "mul").meta["val"].shape[0] == 2
    value = named(gm, "mul").meta["val"]
    assert value.dim() == 3 and isinstance(value.shape[1], torch.SymInt)
    assert metadata_differences(gm, refresh.fake_mode, refresh.fake_inputs) == []


def test_an_attribute_that_is_gone_fails_the_refresh_as_a_full_propagation_would() -> None:
    gm, refresh = propagated()
    del gm.left.bias
    with pytest.raises(RuntimeError, match="nonexistent target left.bias"):
        refresh(gm)


def test_another_graph_gets_a_full_propagation() -> None:
    gm, refresh = propagated()
    copy = fx.GraphModule(gm, _copied(gm.graph))
    stats = refresh(copy)
    assert stats.full and stats.reason == "another graph"


def test_a_copy_it_follows_reruns_only_what_changed_in_it(run_nodes: list[str]) -> None:
    """compile_hf_model's hand-over: the pipeline's copy of the serving graph is refreshed as
    the graph it copies, not propagated again; what a pass changes in the copy is re-run."""
    gm, refresh = propagated()
    copies: dict[fx.Node, fx.Node] = {}
    copy = fx.GraphModule(gm, _copied(gm.graph, copies))
    refresh.follow_copy(copy, copies)
    named(copy, "tanh").replace_input_with(named(copy, "linear_1"), named(copy, "linear"))
    run_nodes.clear()
    stats = refresh(copy)
    assert not stats.full and run_nodes == list(stats.recomputed) == ["tanh", "output"]
    assert metadata_differences(copy, refresh.fake_mode, refresh.fake_inputs) == []


def test_another_fake_mode_gets_a_full_propagation() -> None:
    gm, refresh = propagated()
    other = symbolic_propagator(INPUTS)
    stats = refresh.incremental(gm, other.fake_mode, other.fake_inputs)
    assert stats.full and stats.reason == "another fake mode"


def test_a_new_placeholder_gets_a_full_propagation() -> None:
    gm, refresh = propagated()
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_after(first):
        gm.graph.placeholder("scale")
    scale = refresh.fake_mode.from_tensor(torch.ones(8))
    stats = refresh.incremental(gm, refresh.fake_mode, (refresh.fake_inputs[0], scale))
    assert stats.full and stats.reason == "placeholders changed"


class ShapeWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y.t_()
        return y * 2


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(x > 0) + 1


@pytest.mark.parametrize("module, reason", [(ShapeWrite(), "changes its input's shape in place"),
                                            (DataDependent(), "unbacked symbols")])
def test_what_incremental_propagation_cannot_follow_gets_a_full_one(module: nn.Module,
                                                                    reason: str) -> None:
    gm, refresh = propagated(module)
    stats = refresh(gm)
    assert stats.full and reason in stats.reason
    assert metadata_differences(gm, refresh.fake_mode, refresh.fake_inputs) == []


def test_a_stale_value_is_reported_naming_the_node() -> None:
    """The comparison the pipeline tests rely on does see a stale value."""
    gm, refresh = propagated()
    relu = named(gm, "relu")
    relu.meta["val"] = named(gm, "flatten").meta["val"].unsqueeze(0)
    (difference,) = metadata_differences(gm, refresh.fake_mode, refresh.fake_inputs)
    assert difference.startswith("%relu") and "a full propagation gives" in difference


# -- property: any sequence of edits of a graph of shape-changing ops ---------------------------
UNARY: dict[str, Callable[[fx.Graph, fx.Node], fx.Node]] = {
    "relu": lambda graph, x: graph.call_function(torch.relu, (x,)),
    "transpose": lambda graph, x: graph.call_method("transpose", (x, 0, -1)),
    "unsqueeze": lambda graph, x: graph.call_method("unsqueeze", (x, 0)),
    "sum": lambda graph, x: graph.call_method("sum", (x, -1), {"keepdim": True}),
    "double": lambda graph, x: graph.call_function(torch.cat, ([x, x], -1)),
    "half_rows": lambda graph, x: graph.call_method("narrow", (x, 0, 0, 1)),
}
ops = st.sampled_from(sorted(UNARY))


def _chain(names: list[str]) -> fx.GraphModule:
    graph = fx.Graph()
    nodes = [graph.placeholder("x")]
    for name in names:
        nodes.append(UNARY[name](graph, nodes[-1]))
    graph.output(nodes[-1])
    return fx.GraphModule(nn.Module(), graph)


@given(names=st.lists(ops, min_size=2, max_size=7),
       edits=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 99), ops), max_size=4))
def test_after_any_edits_the_values_equal_a_full_propagation(names: list[str],
                                                            edits: list[tuple[int, int, str]]
                                                            ) -> None:
    """Each edit puts a new op (its input any earlier node) in place of a node of the chain;
    after each refresh every node has the metadata a full propagation gives it."""
    gm = _chain(names)
    refresh = symbolic_propagator((torch.randn(3, 4),))
    refresh(gm)
    for where, source, name in edits:
        body = [node for node in gm.graph.nodes if node.op not in ("placeholder", "output")]
        old = body[where % len(body)]
        earlier = [node for node in gm.graph.nodes if node.op != "output"][:body.index(old) + 1]
        with gm.graph.inserting_before(old):
            new = UNARY[name](gm.graph, earlier[source % len(earlier)])
        old.replace_all_uses_with(new)
        gm.graph.erase_node(old)
        gm.graph.lint()
        stats = refresh(gm)
        assert not stats.full and new.name in stats.recomputed
        assert metadata_differences(gm, refresh.fake_mode, refresh.fake_inputs) == []


# -- the pipelines on real models ----------------------------------------------------------------
def _fxkiln_model(preset: str) -> Callable[[], object]:
    return lambda: compile_model(from_hf(hf_model(preset)), config=PLAIN)


def _dynamo_llama() -> object:
    torch._dynamo.reset()
    compiled = torch.compile(build("llama", layers=1), backend=compiler.backend(PLAIN))
    with torch.no_grad():
        return compiled(torch.arange(6)[None])


@pytest.mark.slow
@pytest.mark.parametrize("make", [_fxkiln_model("llama-tiny"), _fxkiln_model("bart-tiny"),
                                  _dynamo_llama], ids=["llama-tiny", "bart-tiny", "dynamo"])
def test_the_default_pipeline_leaves_the_values_a_full_propagation_gives(
        make: Callable[[], object]) -> None:
    """fxkiln's own models (traced) and a Hugging Face graph from Dynamo: after each pass
    every node's value has the metadata a full propagation gives (the Hugging Face serving
    pipeline is checked in tests/test_hf_serving.py, on every architecture)."""
    with checked_refreshes() as checks:
        make()
    assert_fresh(checks)


def _copied(graph: fx.Graph, copies: dict[fx.Node, fx.Node] | None = None) -> fx.Graph:
    """A copy of `graph`; `copies` gets each node's copy."""
    copied = fx.Graph()
    copied.output(copied.graph_copy(graph, {} if copies is None else copies))
    return copied
