"""The issue's "done when", through the public entry points: compile_model and the backend."""
from __future__ import annotations

import copy

import pytest
import torch

import compiler
from compiler import CompileConfig, compile_model
from passes.kernel_choice import MATCHED_TARGETS
from runtime import registry, settings
from runtime.kernels import triton_kernels
from runtime.settings import kernel_settings
from tests.kernels.helpers import LlamaShaped, assert_as_accurate, count_targets

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("kernel settings were read at run time")


def _check_done(compiled: compiler.CompiledModel, model: torch.nn.Module,
                inputs: tuple[torch.Tensor, ...], expected: torch.Tensor,
                monkeypatch: pytest.MonkeyPatch, rtol: float = 0.0, atol: float = 0.0,
                reference: torch.Tensor | None = None) -> None:
    assert compiled.report.kernels["rms_norm"] == "triton"
    assert "rms_norm=triton" in str(compiled.report)
    assert count_targets(compiled.graph_module, set(MATCHED_TARGETS)) == 0
    assert count_targets(compiled.graph_module, triton_kernels.rms_norm) >= 1
    monkeypatch.setattr(settings, "active_kernel_choice", _refuse)
    monkeypatch.setattr(registry, "choose_kernel", _refuse)
    with torch.inference_mode():
        with pytest.raises(AssertionError, match="read at run time"):
            model(*inputs)  # the patch is live: eager dispatch would read the settings
        actual = compiled(*inputs)
    if reference is not None:
        assert_as_accurate(actual, expected, reference)
    else:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@needs_interpreter
def test_compile_model_with_triton_rms_norm_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = LlamaShaped(layers=2).eval()
    inputs = model.example_inputs(5)
    with torch.inference_mode():
        expected = model(*inputs)
    config = CompileConfig(kernels={"rms_norm": "triton"}, device="cpu")
    compiled = compile_model(model, config=config)  # the model's own example_inputs(8)
    assert compiled.report.frontend == "symbolic_trace"
    passes = compiled.report.passes
    assert passes["linear_epilogue"].matches == 4 * 2 + 1  # qkv, o, gate_up, down; LM head
    # per layer 2 norms and rotary (SiLU-and-mul rides on gate_up), the final norm, projections;
    # norm_prologue folds each add + norm into the projection it feeds (one op for the pair),
    # not the plain RMSNorm pinned to Triton apart from the fused op
    assert passes["norm_prologue"].matches == 2 * 2
    assert passes["kernel_choice"].matches == (3 * 2 + 1 + passes["linear_epilogue"].matches
                                               - passes["norm_prologue"].matches)
    assert compiled.report.kernels["rms_norm"] == "triton"
    _check_done(compiled, model, inputs, expected, monkeypatch, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_dynamo_backend_graph_gets_the_same_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = LlamaShaped(layers=1)
    inputs = model.example_inputs(4)
    with torch.inference_mode():
        expected = model(*inputs)
    backend = compiler.backend(CompileConfig(kernels={"rms_norm": "triton"}, device="cpu"))
    torch._dynamo.reset()
    optimized = torch.compile(model, backend=backend, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(optimized(*inputs), expected, rtol=1e-5, atol=1e-5)
    (gm,) = backend.graph_modules
    assert backend.reports[-1].kernels["rms_norm"] == "triton"
    assert count_targets(gm, set(MATCHED_TARGETS)) == 0
    assert count_targets(gm, triton_kernels.rms_norm) == 1
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compile_model_with_triton_rms_norm_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = LlamaShaped(hidden=256, layers=2, heads=8, kv_heads=2, head_size=32,
                        intermediate=512).to("cuda", dtype).eval()
    inputs = tuple(t.cuda() for t in model.example_inputs(9))
    with torch.inference_mode(), kernel_settings({op: "native" for op in MATCHED_TARGETS.values()}):
        expected = model(*inputs)
        reference = copy.deepcopy(model).float()(*inputs)
    config = CompileConfig(kernels={"rms_norm": "triton"}, device="cuda")
    compiled = compile_model(model, config=config)
    _check_done(compiled, model, inputs, expected, monkeypatch, reference=reference)
