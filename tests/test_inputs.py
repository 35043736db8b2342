"""compile_model checks its model and example inputs before any work, and changes neither."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from compiler import CompileConfig, CompileInputError, compile_model
from models import from_hf
from tests.model_oracle import build_hf

CPU = CompileConfig(device="cpu", capture_sizes=())


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 4))


def test_a_model_in_training_mode_is_refused_with_what_to_do() -> None:
    with pytest.raises(CompileInputError, match=r"compiles for inference, but Sequential is in "
                                                r"training mode .*call model.eval\(\) first"):
        compile_model(_mlp(), (torch.randn(3, 4),), CPU)


def test_one_submodule_left_in_training_mode_is_named() -> None:
    model = _mlp().eval()
    model[1].train()
    with pytest.raises(CompileInputError, match=r"found training=True on 1\)"):
        compile_model(model, (torch.randn(3, 4),), CPU)


def test_dropout_is_off_once_compiled() -> None:
    model = _mlp().eval()
    compiled = compile_model(model, (torch.randn(3, 4),), CPU)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


class Normed(nn.Module):
    """Batch norm, whose statistics a training-mode forward would advance (Dynamo captures it:
    its input-rank check does not trace), and a call counter every forward advances."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4) if norm else nn.Identity()
        self.proj = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.proj(self.norm(x)) + self.calls


@pytest.mark.parametrize("norm, keywords, frontend", [
    (True, False, "dynamo"), (False, False, "symbolic_trace"), (False, True, "dynamo")])
def test_compiling_never_changes_parameters_or_buffers(norm: bool, keywords: bool,
                                                       frontend: str) -> None:
    model = Normed(norm).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if "running" in name:
                buffer.uniform_(0.5, 2)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    x = torch.randn(6, 4)
    compiled = compile_model(model, {"x": x} if keywords else (x,),
                             CompileConfig(device="cpu", verify=True))
    assert compiled.report.frontend == frontend
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    compiled(x)
    assert int(model.calls) == 1  # the call counts, compiling did not


@pytest.mark.parametrize("example, fragment", [
    ("abc", "expected example_inputs as a tuple of inputs or a dict of keyword inputs, found "
            "the string 'abc'"),
    (3, "expected example_inputs as a tuple of inputs or a dict of keyword inputs, found int"),
    ((np.ones((3, 4), dtype=np.float32),), "example input 0: expected a torch.Tensor, found a "
                                           "numpy ndarray; convert it with torch.from_numpy()"),
    ({"x": np.ones((3, 4))}, "example input 'x': expected a torch.Tensor, found a numpy"),
    ((torch.randn(3, 4, device="meta"),), "example input 0: expected a tensor on cpu (the device "
                                          "compiled for), found one on meta"),
    (([torch.randn(3, 4, device="meta")],), "example input 0[0]: expected a tensor on cpu"),
])
def test_unusable_example_inputs_say_what_was_expected(example: Any, fragment: str) -> None:
    with pytest.raises(CompileInputError) as info:
        compile_model(nn.Linear(4, 4).eval(), example, CPU)
    assert fragment in str(info.value)


def test_a_float_dtype_other_than_the_parameters_is_named() -> None:
    with pytest.raises(CompileInputError, match=r"example input 0: expected dtype torch.float32 "
                                                r"\(the dtype of Linear's parameters\), found "
                                                r"torch.float64"):
        compile_model(nn.Linear(4, 4).eval(), (torch.randn(3, 4, dtype=torch.float64),), CPU)


def test_a_model_that_casts_its_input_compiles() -> None:
    class Casting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x.float())

    model = Casting().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    compiled = compile_model(model, (x,), CPU)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_project_model_inputs_are_checked_against_its_own_examples() -> None:
    model = from_hf(build_hf("llama"))
    ids, positions = model.example_inputs(4)
    with pytest.raises(CompileInputError, match=r"example input 0: expected a 1-d torch.int64 "
                                                r"tensor, as LlamaForCausalLM.example_inputs\(\) "
                                                r"gives, found 1-d torch.float32"):
        compile_model(model, (ids.float(), positions), CPU)
    with pytest.raises(CompileInputError, match=r"expected 2 example inputs, as "
                                                r"LlamaForCausalLM.example_inputs\(\) gives, "
                                                r"found 1"):
        compile_model(model, (ids,), CPU)


def test_config_and_model_must_be_what_compile_model_takes() -> None:
    with pytest.raises(CompileInputError, match="expected config as a CompileConfig, found dict"):
        compile_model(nn.Linear(4, 4).eval(), (torch.randn(3, 4),), {"device": "cpu"})  # type: ignore[arg-type]  # the point of the test
    with pytest.raises(CompileInputError, match="expected a torch.nn.Module, found function"):
        compile_model(lambda x: x, (torch.randn(3, 4),), CPU)  # type: ignore[arg-type]  # the point of the test
