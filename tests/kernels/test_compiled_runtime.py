"""Compiled graphs carry their own kernel choice: no settings read at run time, no shared state."""
from __future__ import annotations

import collections
import copy
from typing import Any

import pytest
import torch

from passes.kernel_choice import MATCHED_TARGETS, chosen_kernels
from runtime import registry, settings
from runtime.kernels import triton_kernels
from runtime.registry import KernelImpl
from runtime.settings import kernel_settings
from tests.fx_helpers import trace
from tests.kernels.helpers import LlamaShaped, assert_as_accurate, choose_kernels, count_targets

needs_interpreter = pytest.mark.skipif(
    not triton_kernels.interpreter_active(), reason="Triton kernels are not interpreted here")


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("kernel settings were read at run time")


def _compile(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...],
             kernels: dict[str, str], device: str = "cpu") -> torch.fx.GraphModule:
    gm = trace(model, inputs)
    choose_kernels(gm, kernels, device)
    return gm


@needs_interpreter
def test_llama_shaped_with_triton_rms_norm_never_reads_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = LlamaShaped(layers=2)
    inputs = model.example_inputs(5)
    with torch.inference_mode():
        expected = model(*inputs)
        gm = _compile(model, inputs, {"rms_norm": "triton"})
    assert chosen_kernels(gm)["rms_norm"] == "triton"
    assert count_targets(gm, set(MATCHED_TARGETS)) == 0
    assert count_targets(gm, triton_kernels.rms_norm) == 1
    monkeypatch.setattr(settings, "active_kernel_choice", _refuse)
    monkeypatch.setattr(registry, "choose_kernel", _refuse)
    with torch.inference_mode():
        with pytest.raises(AssertionError, match="read at run time"):
            model(*inputs)  # the eager model does read them: the patch is live
        actual = gm(*inputs)
        other_length = model.example_inputs(3)
        gm(*other_length)  # another token count: the token dimension stayed dynamic
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def _counting(op: str, name: str, counts: collections.Counter[str]) -> KernelImpl:
    reference = registry.kernel_implementations(op)["native"].fn

    def counted(*args: Any) -> Any:
        counts[f"{op}/{name}"] += 1
        return reference(*args)

    return KernelImpl(op=op, name=name, fn=counted, supports=lambda device, dtype: True,
                      priority=-100)


@pytest.fixture
def counting_kernels(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Implementations "count_a" and "count_b" of the norms, removed again after the test."""
    counts: collections.Counter[str] = collections.Counter()
    for op in ("rms_norm", "fused_add_rms_norm"):
        for name in ("count_a", "count_b"):
            monkeypatch.setitem(registry._IMPLEMENTATIONS[op], name, _counting(op, name, counts))
    return counts


def test_two_models_interleaved_each_run_their_own_choice(
        counting_kernels: collections.Counter[str], monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    layers = 2
    model_a, model_b = LlamaShaped(layers=layers), LlamaShaped(layers=layers)
    inputs = model_a.example_inputs(4)
    with torch.inference_mode():
        expected = {"a": model_a(*inputs), "b": model_b(*inputs)}
        compiled = {
            "a": _compile(model_a, inputs, {"rms_norm": "count_a", "fused_add_rms_norm": "count_a"}),
            "b": _compile(model_b, inputs, {"rms_norm": "count_b", "fused_add_rms_norm": "count_b"}),
        }
    assert chosen_kernels(compiled["b"])["fused_add_rms_norm"] == "count_b"
    assert not counting_kernels  # eager "auto" and shape propagation never ran them
    monkeypatch.setattr(settings, "active_kernel_choice", _refuse)
    order = "abaab"
    with torch.inference_mode():
        for which in order:
            torch.testing.assert_close(compiled[which](*inputs), expected[which])
    runs = collections.Counter(order)
    assert counting_kernels == {
        "rms_norm/count_a": runs["a"], "fused_add_rms_norm/count_a": runs["a"] * 2 * layers,
        "rms_norm/count_b": runs["b"], "fused_add_rms_norm/count_b": runs["b"] * 2 * layers,
    }


def test_eager_settings_do_not_leak_into_compiled_graphs(
        counting_kernels: collections.Counter[str]) -> None:
    model = LlamaShaped(layers=1)
    inputs = model.example_inputs(3)
    with torch.inference_mode():
        gm = _compile(model, inputs, {"rms_norm": "count_a"})
        with kernel_settings({"rms_norm": "count_b", "fused_add_rms_norm": "count_b"}):
            gm(*inputs)   # compiled: count_a for rms_norm, native for the fused norms
            model(*inputs)  # eager: the active settings, count_b for both
    assert counting_kernels == {"rms_norm/count_a": 1, "rms_norm/count_b": 1,
                                "fused_add_rms_norm/count_b": 2}


# -- GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [{"rms_norm": "triton"}, {}])
def test_llama_shaped_on_gpu_matches_eager_without_settings(
        kernels: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = LlamaShaped(hidden=256, layers=2, heads=8, kv_heads=2, head_size=32,
                        intermediate=512).to("cuda", dtype)
    reference_model = copy.deepcopy(model).float()
    inputs = tuple(t.cuda() for t in model.example_inputs(17))
    with torch.inference_mode(), kernel_settings({op: "native" for op in MATCHED_TARGETS.values()}):
        expected = model(*inputs)
        reference = reference_model(*inputs)  # fp32: what both bf16 runs approximate
    with torch.inference_mode():
        gm = _compile(model, inputs, kernels, device="cuda")
    assert chosen_kernels(gm)["rms_norm"] == "triton"  # explicit, or "auto" on CUDA
    assert count_targets(gm, set(MATCHED_TARGETS)) == 0
    monkeypatch.setattr(settings, "active_kernel_choice", _refuse)
    monkeypatch.setattr(registry, "choose_kernel", _refuse)
    with torch.inference_mode():
        actual = gm(*inputs)
    assert_as_accurate(actual, expected, reference)
