from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from compiler import CompileConfig, PassError, PassManager, PassVerificationError, compile_model
from compiler.capture import symbolic_propagator
from passes import GraphPass, PassContext, PassResult
from tests.fx_helpers import trace


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).view(x.shape[0], 6)


INPUTS = (torch.randn(5, 6),)


class Recording(GraphPass):
    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__(PassContext())
        self.name = name  # type: ignore[misc]  # test passes are named per instance
        self.log = log

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.log.append(self.name)
        return PassResult(gm, modified=False, matches=len(self.log))


class ReluToSigmoid(GraphPass):
    """A wrong rewrite: verification must catch it."""

    name = "relu_to_sigmoid"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        matches = 0
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is torch.relu:
                node.target = torch.sigmoid
                matches += 1
        gm.recompile()
        return PassResult(gm, modified=matches > 0, matches=matches)


class AddZero(GraphPass):
    """A right rewrite (x -> x + 0 on the output): verification must let it through."""

    name = "add_zero"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            added = gm.graph.call_function(operator.add, (output.args[0], 0.0))
        output.args = (added,)
        gm.recompile()
        return PassResult(gm, modified=True, matches=1)


class Exploding(GraphPass):
    name = "exploding"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        raise KeyError("no such node")


def test_passes_run_in_order_and_are_recorded() -> None:
    log: list[str] = []
    manager = PassManager([Recording("first", log), Recording("second", log),
                           Recording("third", log)])
    _, records = manager(trace(Small(), INPUTS))
    assert log == ["first", "second", "third"]
    assert [(r.name, r.matches) for r in records] == [("first", 1), ("second", 2), ("third", 3)]
    assert all(r.seconds >= 0 for r in records)


def test_error_names_the_pass_and_the_passes_before_it() -> None:
    log: list[str] = []
    manager = PassManager([Recording("first", log), Recording("second", log), Exploding(PassContext())])
    with pytest.raises(PassError) as info:
        manager(trace(Small(), INPUTS))
    message = str(info.value)
    assert "pass 'exploding' failed: KeyError" in message
    assert "passes run before it: first, second" in message
    assert isinstance(info.value.__cause__, KeyError)


def test_lint_runs_after_each_pass() -> None:
    class Corrupting(GraphPass):
        name = "corrupting"

        def __call__(self, gm: fx.GraphModule) -> PassResult:
            relu = next(n for n in gm.graph.nodes if n.target is torch.relu)
            relu.args = (relu,)  # a node that reads itself
            return PassResult(gm, modified=True)

    with pytest.raises(PassError, match="pass 'corrupting' failed"):
        PassManager([Corrupting(PassContext())])(trace(Small(), INPUTS))


def test_verify_catches_a_wrong_rewrite_and_names_it() -> None:
    gm = trace(Small(), INPUTS)
    manager = PassManager([AddZero(PassContext()), ReluToSigmoid(PassContext())],
                          verify_inputs=(torch.randn(7, 6),), refresh=symbolic_propagator(INPUTS))
    with pytest.raises(PassVerificationError) as info:
        manager(gm)
    assert "pass 'relu_to_sigmoid' changed the result: output 0 differs by up to" in str(info.value)


def test_verify_accepts_a_right_rewrite() -> None:
    model = Small()
    manager = PassManager([AddZero(PassContext())], verify_inputs=(torch.randn(7, 6),),
                          refresh=symbolic_propagator(INPUTS))
    gm, records = manager(trace(model, INPUTS))
    assert records[0].modified
    torch.testing.assert_close(gm(*INPUTS), model(*INPUTS))


def test_refresh_gives_new_nodes_shapes() -> None:
    gm = trace(Small(), INPUTS)
    PassManager([AddZero(PassContext())], refresh=symbolic_propagator(INPUTS))(gm)
    added = next(n for n in gm.graph.nodes if n.target is operator.add)
    assert str(added.meta["val"].shape[0]).startswith("s")  # the symbolic token count


def test_dump_writes_each_graph_numbered_in_order(tmp_path) -> None:
    model = Small().eval()
    compile_model(model, INPUTS, CompileConfig(passes=("cleanup", "cleanup"), device="cpu",
                                               dump_dir=str(tmp_path)))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000_captured.py", "001_cleanup.py", "002_cleanup.py"]
    captured = (tmp_path / "000_captured.py").read_text()
    cleaned = (tmp_path / "001_cleanup.py").read_text()
    assert ".view(" in captured and ".view(" not in cleaned
    assert "torch._C._nn.linear" in cleaned


def test_compile_model_verify_flags_a_broken_default_pipeline(monkeypatch) -> None:
    import passes

    monkeypatch.setitem(passes.PASSES, "cleanup", ReluToSigmoid)
    with pytest.raises(PassVerificationError, match="relu_to_sigmoid"):
        compile_model(Small().eval(), INPUTS, CompileConfig(device="cpu", verify=True, passes=("cleanup",)))
    # without verify the same broken pass goes unnoticed: that is what verify is for
    compile_model(Small().eval(), INPUTS, CompileConfig(device="cpu", passes=("cleanup",)))


def test_cleanup_passes_verification() -> None:
    compiled = compile_model(Small().eval(), INPUTS, CompileConfig(device="cpu", verify=True))
    assert compiled.report.passes["cleanup"].matches >= 1
